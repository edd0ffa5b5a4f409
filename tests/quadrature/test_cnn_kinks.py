"""The split convolution / eval-mode batch norm of PathMode and the kink-aware rule on a ReLU +
max-pool CNN with BatchNorm in eval mode (float64).

* PathFunction rows and shared nodes on convolutions with and without bias, a grouped one (not
  stacked), batch norm with and without affine parameters, and a split convolution of an
  unbatched input, against the model evaluated at the materialised parameters θ_s + tΔ_s: 1e-12
  relative (the same products in another order).
* kinks:3 through the engine against the full-tensor naive reference (explaind_fast.testing.naive)
  at per-sample Gauss–Legendre-8 nodes between the breakpoints of the *bracket* search (another
  search, another quadrature order, another contraction): 1e-10 relative per step. On each
  smooth piece the logits are polynomials of degree 6 in t (six parameter layers), so both rules
  are exact up to rounding; 1e-10 leaves room for the rounding of D-sized sums and the bracket
  search's breakpoint tolerance (1e-14).
"""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from explaind_fast.attribution import attribute
from explaind_fast.attribution.granularity import parse_data, parse_output, parse_params, parse_steps
from explaind_fast.model import FunctionalModel, ParamLayout, TestFunction
from explaind_fast.quadrature.kinks import find_kinks, nodes_from_breakpoints
from explaind_fast.quadrature.pathmode import PathFunction
from explaind_fast.testing.naive import check_path_function, naive_tensor
from explaind_fast.testing.runs import per_sample_cross_entropy as ce
from explaind_fast.testing.runs import train_tiny

DT = torch.float64


class ConvVariants(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4, affine=False)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.bn2 = nn.BatchNorm2d(4)
        self.c3 = nn.Conv1d(4, 2, 3)
        self.lin = nn.Linear(2 * 14, 3)

    def forward(self, x):
        h = F.relu(self.bn1(self.c1(x)))
        h = F.max_pool2d(self.bn2(self.c2(h)), 2)                  # [B, 4, 4, 4]
        return self.lin(torch.tanh(self.c3(h.flatten(2))).flatten(1))


def test_split_convolutions_and_eval_batch_norm_equal_materialised_parameters():
    torch.manual_seed(0)
    model = ConvVariants().to(DT).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
        for bn in (model.bn1, model.bn2):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2)
    layout = ParamLayout.from_model(model)
    th = layout.flatten_model(model).clone()
    g = torch.Generator().manual_seed(1)
    dl = 0.3 * torch.randn(th.shape, generator=g, dtype=DT)
    X = torch.randn(5, 1, 8, 8, generator=g, dtype=DT)
    tf = TestFunction(FunctionalModel(model, layout, DT), X, None, lambda o, y: o)
    pf = PathFunction.of(tf, th, dl)
    sample = torch.tensor([0, 3, 4, 1, 3])
    t = torch.tensor([0.1, 0.9, 0.5, 0.0, 1.0], dtype=DT)
    V = torch.randn(3, th.shape[0], generator=g, dtype=DT)
    check_path_function(pf, tf, th, dl, sample, t, V, torch.tensor([0.25, 0.8], dtype=DT))


def test_split_convolution_of_an_unbatched_input():
    from explaind_fast.quadrature.pathmode import PathMode
    g = torch.Generator().manual_seed(2)
    W, b = torch.randn(4, 2, 3, 3, generator=g, dtype=DT), torch.randn(4, generator=g, dtype=DT)
    dW, db = torch.randn(W.shape, generator=g, dtype=DT), torch.randn(4, generator=g, dtype=DT)
    for x in (torch.randn(2, 2, 5, 5, generator=g, dtype=DT),
              torch.randn(2, 5, 5, generator=g, dtype=DT)):             # batched, unbatched
        with PathMode({id(W): dW, id(b): db}, 0.3):
            y = F.conv2d(x, W, b, padding=1)
        ref = F.conv2d(x, W + 0.3 * dW, b + 0.3 * db, padding=1)
        assert (y - ref).abs().max() < 1e-12 * float(ref.abs().max())


class BNPoolCNN(nn.Module):
    """bench/bench_kinks_speed.py's CNN layout, smaller: conv-BN-maxpool-ReLU twice, a ReLU MLP."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.linear1 = nn.Linear(4 * 4, 8)
        self.linear2 = nn.Linear(8, 3)

    def forward(self, x):
        x = F.relu(F.max_pool2d(self.bn1(self.conv1(x)), 2))
        x = F.relu(F.max_pool2d(self.bn2(self.conv2(x)), 2))
        return self.linear2(F.relu(self.linear1(x.flatten(1))))


def _cnn_run(steps=3):
    torch.manual_seed(0)
    model = BNPoolCNN().to(DT).eval()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.running_mean.normal_(0, 0.2)
            bn.running_var.uniform_(0.5, 2)
    g = torch.Generator().manual_seed(1)
    Xtr = torch.randn(24, 1, 8, 8, generator=g, dtype=DT)
    Ytr = torch.randint(0, 3, (24,), generator=g)
    Xte = torch.randn(3, 1, 8, 8, generator=g, dtype=DT)
    Yte = torch.randint(0, 3, (3,), generator=g)
    traj = train_tiny(model, Xtr, Ytr, steps=steps, record="memory")
    return model, traj, Xtr, Ytr, Xte, Yte


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_bn_maxpool_cnn_kinks_match_naive_reference(mode):
    model, traj, Xtr, Ytr, Xte, Yte = _cnn_run()
    a = attribute(model, traj, Xte, test_targets=Yte, train_data=(Xtr, Ytr), params="tensor",
                  data="label", steps="each", quadrature="kinks:3", mode=mode, progress=False)
    assert float(a.step_residual_relative.max()) < 1e-10

    def nodes(s):
        th = traj.theta(s, dtype=DT)
        k = find_kinks(model, traj.layout, th, traj.theta(s + 1, dtype=DT) - th, Xte,
                       method="bracket", warn=False)
        return nodes_from_breakpoints(k.breakpoints, 8)
    nt = naive_tensor(model, traj, Xte, parse_output("logits", ce).h, Yte, Xtr, Ytr, ce, nodes)
    g = parse_params("tensor", traj.layout)
    p = parse_data("label", Xtr.shape[0], Ytr)
    bounds = parse_steps("each", traj.num_steps).bounds
    k, r = nt.reduce(bounds, g.ids, g.G, p.ids, p.P, credit=a.credit)
    for s in range(traj.num_steps):                                    # per step
        scale = float(k[s].abs().max())
        assert (a.kernel[s] - k[s]).abs().max() < 1e-10 * scale, s
        assert (a.reg[s] - r[s]).abs().max() < 1e-10 * max(scale, float(r[s].abs().max())), s
    # the run crosses kinks: a rule blind to them is off by far more
    assert a.kernel.shape[0] == traj.num_steps
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                        # its certificate fails, as it should
        gl = attribute(model, traj, Xte, quadrature="gauss-legendre:8", params="tensor",
                       steps="each", progress=False)
    assert float(gl.step_residual_relative.max()) > 1e-7
