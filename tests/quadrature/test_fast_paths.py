"""The fast evaluation paths of the kink-aware and default rules, each against an independent
computation (float64).

* PathMode / PathFunction (rows (sample, t) evaluated with the ops split along the segment) against
  the model evaluated at materialised parameters θ_s + tΔ_s: same numbers to rounding (1e-12
  relative; both sides evaluate the same products in a different order).
* Chebyshev interpolants: roots of known polynomials and transcendental functions; the Lagrange
  cumulative integrals of the soft patterns integrate polynomials of degree < Q exactly.
* Soft activation patterns at shared nodes: against the closed-form ∫ J·v dt of a two-layer ReLU
  net (any direction v), and, through the engine, against the full-tensor naive reference
  evaluated at per-sample Gauss–Legendre nodes between the breakpoints of the *bracket* search (a
  different search, a different quadrature, a different contraction): 1e-10 relative.
* quadrature="auto": what it chooses and that it meets its residual tolerance; the deferred
  residual check of a checked rule that must refine.
"""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from explaind_fast.attribution import attribute
from explaind_fast.attribution.granularity import parse_data, parse_output, parse_params, parse_steps
from explaind_fast.model import FunctionalModel, ParamLayout, TestFunction
from explaind_fast.quadrature import PathStep, gauss_legendre, parse_quadrature
from explaind_fast.quadrature.kinks import chebyshev as ch
from explaind_fast.quadrature.kinks import find_kinks, nodes_from_breakpoints
from explaind_fast.quadrature.kinks.capture import _Path
from explaind_fast.quadrature.kinks.patterns import (Patterns, affine_in_patterns,
                                                     lagrange_cumulative, pattern_blocks,
                                                     soft_masks)
from explaind_fast.quadrature.pathmode import PathFunction
from explaind_fast.quadrature.rules import AutoRule, GaussLegendreCheckedRule, KinkRule
from explaind_fast.testing.naive import check_path_function, naive_tensor
from explaind_fast.testing.runs import tiny_mlp_run, tiny_transformer_run

DT = torch.float64


def _setup(model, scale, seed=0):
    g = torch.Generator().manual_seed(seed)
    layout = ParamLayout.from_model(model)
    th = layout.flatten_model(model).clone()
    dl = scale * torch.randn(th.shape, generator=g, dtype=DT)
    return layout, th, dl


# ------------------------------------------------------------------------------------ PathMode
class Mixed(nn.Module):
    """Every kind of parameter use PathMode handles: split ops (conv, batch norm in eval mode,
    group/layer norm, linear, embedding) and ops it materialises (a parameter used through *,
    a matmul with a parameter's transpose, MultiheadAttention's packed projection)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.gn = nn.GroupNorm(2, 4)
        self.lin = nn.Linear(4 * 16, 6)
        self.ln = nn.LayerNorm(6)
        self.emb = nn.Embedding(5, 6)
        self.att = nn.MultiheadAttention(6, 2, batch_first=True)
        self.scale = nn.Parameter(torch.ones(6))
        self.W = nn.Parameter(torch.randn(6, 3))

    def forward(self, x):
        img, tok = x[:, :64].reshape(-1, 1, 8, 8), x[:, 64:].long()
        h = F.relu(F.max_pool2d(self.gn(self.bn(self.conv(img))), 2))
        h = self.ln(self.lin(h.flatten(1)))
        e = self.emb(tok) * self.scale + h[:, None]
        a, _ = self.att(e, e, e)
        return a[:, -1] @ self.W


def _mixed():
    torch.manual_seed(0)
    model = Mixed().to(DT).train()          # (MultiheadAttention's fused eval path has no JVP)
    model.bn.eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.5, 2)
    g = torch.Generator().manual_seed(1)
    X = torch.cat([torch.randn(5, 64, generator=g, dtype=DT),
                   torch.randint(0, 5, (5, 3), generator=g).to(DT)], 1)
    layout, th, dl = _setup(model, 0.3)
    tf = TestFunction(FunctionalModel(model, layout, DT), X, None, lambda o, y: o)
    return tf, th, dl


def test_path_function_equals_materialised_parameters():
    tf, th, dl = _mixed()
    pf = PathFunction.of(tf, th, dl)
    sample = torch.tensor([0, 3, 4, 1, 3])
    t = torch.tensor([0.1, 0.9, 0.5, 0.0, 1.0], dtype=DT)
    V = torch.randn(3, th.shape[0], generator=torch.Generator().manual_seed(2), dtype=DT)
    check_path_function(pf, tf, th, dl, sample, t, V, torch.tensor([0.25, 0.8], dtype=DT),
                        jacobians=True)
    by_tensor = pf.jacobian_rows_by_tensor(sample, t, slice(1, 3))      # per tensor, outputs 1:3
    assert list(by_tensor) == list(tf.fm.layout.names)
    flat = torch.cat([j.reshape(5, 2, -1) for j in by_tensor.values()], dim=-1)
    assert torch.equal(flat, pf.jacobian_rows(sample, t, slice(1, 3)))  # same numbers, bit for bit


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.lin = nn.Linear(4 * 16, 3)

    def forward(self, x):
        return self.lin(F.relu(F.max_pool2d(self.bn(self.conv(x)), 2)).flatten(1))


def test_rows_folded_into_the_batch_equal_vmap_over_nodes():
    from explaind_fast.quadrature import pathmode
    torch.manual_seed(3)
    model = ConvBN().to(DT).eval()
    with torch.no_grad():
        model.bn.running_mean.normal_()
        model.bn.weight.normal_()
    layout, th, dl = _setup(model, 0.3, seed=3)
    X = torch.randn(6, 1, 8, 8, dtype=DT)
    tf = TestFunction(FunctionalModel(model, layout, DT), X, None, lambda o, y: o)
    pf = PathFunction.of(tf, th, dl)
    V = torch.randn(2, layout.D, generator=torch.Generator().manual_seed(4), dtype=DT)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=DT)
    folded = pf.jvp_shared(t, slice(1, 5), V, split=True)
    assert pathmode._FOLD_OK[model] is True
    nodes = pf._jvp_nodes(t, slice(1, 5), V, None, split=False)
    assert (folded - nodes).abs().max() < 1e-12 * float(nodes.abs().max())


# ---------------------------------------------------------------------------------- Chebyshev
def test_chebyshev_roots_and_directions():
    n = 16
    x = ch.lobatto(n)
    fs = [lambda x: (x - 0.3) * (x + 0.5), lambda x: (x - 0.1) ** 2 - 1e-4,
          lambda x: x ** 2 + 0.1, lambda x: (x - 0.2) ** 2, lambda x: torch.exp(2 * x) - 1.5]
    c = ch.coefficients(torch.stack([f(x) for f in fs], -1)[None])[0].T
    fi, r, d = ch.roots(c)
    got = {i: sorted(zip(r[fi == i].tolist(), d[fi == i].tolist())) for i in range(len(fs))}
    exp_ = {0: [(-0.5, -1.0), (0.3, 1.0)], 1: [(0.09, -1.0), (0.11, 1.0)], 2: [], 3: [],
            4: [(math.log(1.5) / 2, 1.0)]}
    for i, want in exp_.items():
        assert len(got[i]) == len(want), (i, got[i])
        for (a, da), (b, db) in zip(got[i], want):
            assert abs(a - b) < 1e-13 and da == db, (i, a, b)
    # a sine with 5 roots: tail of the series shows it is not resolved at n = 8, resolved at 32
    c8 = ch.coefficients(torch.sin(9 * ch.lobatto(8))[None, :, None])[0, :, 0]
    c32 = ch.coefficients(torch.sin(9 * ch.lobatto(32))[None, :, None])[0, :, 0]
    assert float(c8[-2:].abs().sum()) > 1e-3 > 1e-12 > float(c32[-2:].abs().sum())


@pytest.mark.parametrize("Q", [1, 2, 5, 8, 16])
def test_lagrange_cumulative_is_exact_for_degree_below_Q(Q):
    t, w = gauss_legendre(Q)
    tau = torch.tensor([0.0, 0.123, 0.5, 0.77, 1.0], dtype=DT)
    C = lagrange_cumulative(tau, Q)
    coef = torch.randn(Q, generator=torch.Generator().manual_seed(Q), dtype=DT)
    f = sum(coef[k] * t ** k for k in range(Q))
    F_ = sum(coef[k] * tau ** (k + 1) / (k + 1) for k in range(Q))
    assert (C @ f - F_).abs().max() < 1e-14 * float(coef.abs().sum())
    assert torch.allclose(C[-1], w, rtol=0, atol=1e-15)


# ----------------------------------------------------------------------- soft patterns, exact
class TwoLayer(nn.Module):
    def __init__(self, d_in=3, hidden=40, d_out=2):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _closed_form(layout, th, dl, x, v):
    """∫_0^1 J(θ(t))·v dt for TwoLayer, unit by unit (z_u(t) = a + bt)."""
    p, d, q = layout.unflatten(th), layout.unflatten(dl), layout.unflatten(v)
    a = x @ p["fc1.weight"].T + p["fc1.bias"]
    b = x @ d["fc1.weight"].T + d["fc1.bias"]
    vz = x @ q["fc1.weight"].T + q["fc1.bias"]
    root = -a / b
    lo = torch.where(b > 0, root.clamp(0, 1), torch.zeros_like(a))
    hi = torch.where(b > 0, torch.ones_like(a), root.clamp(0, 1))
    lo = torch.where(b == 0, torch.zeros_like(a), lo)
    hi = torch.where(b == 0, ((b == 0) & (a > 0)).to(DT), hi)
    L, int_t = hi - lo, (hi ** 2 - lo ** 2) / 2
    int_relu = a * L + b * int_t
    return (int_relu @ q["fc2.weight"].T + (vz * L) @ p["fc2.weight"].T
            + (vz * int_t) @ d["fc2.weight"].T + q["fc2.bias"])


def test_soft_patterns_match_closed_form_in_any_direction():
    torch.manual_seed(1)
    model = TwoLayer(hidden=30).to(DT)
    layout, th, dl = _setup(model, 0.4, seed=1)
    x = torch.randn(5, 3, dtype=DT)
    path = _Path(model, layout, th, dl, x, None, 1 << 24)
    k = find_kinks(model, layout, th, dl, x)
    assert k.smooth and sum(len(b) for b in k.breakpoints) > 10
    blocks = pattern_blocks(path)
    tf = TestFunction(FunctionalModel(model, layout, DT), x, None, lambda o, y: o)
    pf = PathFunction.of(tf, th, dl, Patterns(None, blocks))
    assert affine_in_patterns(pf, blocks, DT)[0]
    V = torch.randn(3, layout.D, generator=torch.Generator().manual_seed(7), dtype=DT)
    exact = torch.stack([_closed_form(layout, th, dl, x, v) for v in V])
    for Q in (3, 8):           # the smooth parts are quadratic in t: 3 nodes interpolate them
        t, w, mu = soft_masks(k, Q)
        for split in (True, False):        # rows folded into the batch / θ(t_q) per node
            got = torch.tensordot(pf.jvp_shared(t, slice(None), V, mu, split=split), w,
                                  dims=([1], [0]))
            assert (got - exact).abs().max() < 1e-12 * float(exact.abs().max()), (Q, split)
    # the same nodes without the patterns are far off (the test can fail)
    t, w, _ = soft_masks(k, 8)
    blind = torch.tensordot(pf.jvp_shared(t, slice(None), V), w, dims=([1], [0]))
    assert (blind - exact).abs().max() > 1e-4 * float(exact.abs().max())


def test_affinity_test_refuses_stacked_relus_and_a_nonlinearity_after_the_relu():
    torch.manual_seed(2)
    x = torch.randn(4, 3, dtype=DT)
    for model, ok in ((TwoLayer().to(DT), True),
                      (nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                                     nn.Linear(8, 2)).to(DT), False),
                      (nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2),
                                     nn.Tanh()).to(DT), False)):
        layout, th, dl = _setup(model, 0.3)
        path = _Path(model, layout, th, dl, x, None, 1 << 24)
        blocks = pattern_blocks(path)
        tf = TestFunction(FunctionalModel(model, layout, DT), x, None, lambda o, y: o)
        pf = PathFunction.of(tf, th, dl, Patterns(None, blocks))
        assert affine_in_patterns(pf, blocks, DT)[0] is ok


# ------------------------------------------------------------------------- engine, end to end
def ce(o, y):
    return F.cross_entropy(o, y, reduction="none")


def _bracket_piece_nodes(model, traj, X, n=8):
    """Per-sample GL-n between the breakpoints of the *bracket* search (the old method)."""
    def nodes(s):
        th = traj.theta(s, dtype=DT)
        k = find_kinks(model, traj.layout, th, traj.theta(s + 1, dtype=DT) - th, X,
                       method="bracket", warn=False)
        return nodes_from_breakpoints(k.breakpoints, n)
    return nodes


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_soft_pattern_attribution_matches_naive_reference(mode):
    model, traj, (Xtr, Ytr), Xte, Yte, _ = tiny_transformer_run(act="relu", steps=3)
    rule = KinkRule("kinks:3", 3)
    a = attribute(model, traj, Xte, test_targets=Yte, train_data=(Xtr, Ytr), params="tensor",
                  data="label", steps="each", quadrature=rule, mode=mode, progress=False)
    assert rule.counts == {"soft": traj.num_steps, "pieces": 0}
    assert float(a.step_residual_relative.max()) < 1e-12
    nt = naive_tensor(model, traj, Xte, parse_output("logits", ce).h, Yte, Xtr, Ytr, ce,
                      _bracket_piece_nodes(model, traj, Xte))
    g = parse_params("tensor", traj.layout)
    p = parse_data("label", Xtr.shape[0], Ytr)
    k, r = nt.reduce(parse_steps("each", traj.num_steps).bounds, g.ids, g.G, p.ids, p.P,
                     credit=a.credit)
    scale = float(k.abs().max())
    assert (a.kernel - k).abs().max() < 1e-10 * scale
    assert (a.reg - r).abs().max() < 1e-10 * scale
    # the run switches units: a rule blind to the kinks is off by far more
    gl = attribute(model, traj, Xte, quadrature="gauss-legendre:8", params="tensor",
                   steps="each", progress=False)
    assert float(gl.step_residual_relative.max()) > 1e-7


def test_auto_chooses_by_the_model_and_meets_its_tolerance():
    relu = tiny_mlp_run(act="relu", steps=3)
    a = attribute(relu[0], relu[1], relu[3], params="all", steps="each", progress=False)
    assert a.quadrature.startswith("auto → kinks:3 (piecewise ops relu)")
    assert "Gauss–Legendre-3 on every smooth piece" in a.quadrature    # stacked ReLUs: pieces
    assert float(a.step_residual_relative.max()) < 1e-12
    smooth = tiny_mlp_run(act="tanh", steps=3)
    b = attribute(smooth[0], smooth[1], smooth[3], params="all", steps="each", progress=False)
    assert b.quadrature.startswith("auto → gauss-legendre(checked) (no piecewise ops")
    # (accepted at 1e-12 of the change or at the outputs' rounding, 1e3·eps·max|h|)
    assert float(b.step_residual_relative.max()) < 1e-10
    assert b.certificate["problems"] == []
    tr = tiny_transformer_run(act="relu", steps=3)
    c = attribute(tr[0], tr[1], tr[3], params="all", steps="each", progress=False)
    assert "soft activation patterns" in c.quadrature
    assert float(c.step_residual_relative.max()) < 1e-12


def test_deferred_check_contracts_again_until_the_residual_passes():
    model, traj, _, Xte, _, _ = tiny_transformer_run(act="gelu", steps=3)
    rule = GaussLegendreCheckedRule(check_tol=1e-13, start=4)
    a = attribute(model, traj, Xte, quadrature=rule, params="all", steps="each", progress=False)
    assert float(a.step_residual_relative.max()) < 1e-12
    assert max(rule.q_used) > 4                       # GL-4 is not enough here: it refined
    # the same rule checking itself (not deferred) picks the same node counts
    rule2 = GaussLegendreCheckedRule(check_tol=1e-13, start=4)
    tf = TestFunction(FunctionalModel(model, traj.layout, DT), Xte, None, lambda o, y: o)
    for s in range(traj.num_steps):
        th = traj.theta(s, dtype=DT)
        dl = traj.theta(s + 1, dtype=DT) - th
        with torch.no_grad():
            ends = (tf.values(th), tf.values(th + dl))
        rule2.evaluate(PathStep(s, th, dl, tf, lambda: ends))
    assert rule2.q_used == rule.q_used


def test_data_all_two_tangents_equal_three():
    from explaind_fast.attribution import contraction
    model, traj, _, Xte, _, _ = tiny_transformer_run(act="relu", steps=2)
    runs = {}
    for trick in (True, False):
        orig = torch.equal
        if not trick:
            contraction.torch = _NoEqual(torch)
        try:
            runs[trick] = attribute(model, traj, Xte, params="tensor", steps="each",
                                    quadrature="gauss-legendre:3", mode="forward",
                                    progress=False)
        finally:
            contraction.torch = torch
        assert torch.equal is orig
    d = (runs[True].kernel - runs[False].kernel).abs().max()
    assert d < 1e-13 * float(runs[False].kernel.abs().max())


class _NoEqual:
    """torch with torch.equal always False (forward_step then uses one tangent per row of B)."""

    def __init__(self, mod):
        self._mod = mod

    def __getattr__(self, name):
        if name == "equal":
            return lambda a, b: False
        return getattr(self._mod, name)


def test_parse_auto():
    assert isinstance(parse_quadrature("auto"), AutoRule)
    assert isinstance(parse_quadrature(" Auto "), AutoRule)
    with pytest.raises(ValueError, match="auto"):
        parse_quadrature("automatic")
