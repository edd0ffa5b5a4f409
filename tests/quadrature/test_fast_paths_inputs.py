"""The fast paths of the kink-aware rules (quadrature.pathmode, the kink search's _Path) with the
real-model calling convention of explaind_fast.model.inputs.

Rows (sample, t) evaluated with shared weights must accept what the general path accepts: dict
inputs with non-tensor leaves, Mapping outputs selected by model_output, models on which vmap
refuses data-dependent control flow (the rows are then looped, as FunctionalModel.vmap does for
every per-sample function) and torch.compile'd submodules (run eagerly under the path's
function mode), and the kink search must evaluate with the trajectory's recorded buffers. The
reference everywhere is the same run attributed through a plain module with tensor inputs, or the
trained module.
"""
import tempfile

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import explaind_fast as ef
from explaind_fast.model import FunctionalModel, TestFunction
from explaind_fast.quadrature import NodeSet
from explaind_fast.quadrature.kinks.capture import _Path
from explaind_fast.quadrature.nodes import gauss_legendre
from explaind_fast.quadrature.pathmode import PathFunction
from explaind_fast.testing.models import DT, TinyMLP, small_data
from explaind_fast.testing.runs import tiny_mlp_run


class MaskedMLP(TinyMLP):
    """TinyMLP's parameters; keyword inputs with a mask checked in Python (vmap over samples
    refuses it, as it refuses Hugging Face's attention-mask checks) and a dict output."""

    def forward(self, features, mask, scale=1.0):
        if bool((mask == 0).any()):
            features = features * mask
        return {"hidden": features, "logits": super().forward(features) * scale}


@pytest.fixture(scope="module")
def relu_run():
    model, traj, (Xtr, Ytr), Xte, Yte, _ = tiny_mlp_run(act="relu", steps=3)
    return dict(model=model, traj=traj, Xtr=Xtr, Ytr=Ytr, Xte=Xte, Yte=Yte)


def _masked(run):
    m = MaskedMLP("relu").to(DT)
    m.load_state_dict(run["model"].state_dict())
    return m


def _inputs(X):
    return {"features": X, "mask": torch.ones_like(X), "scale": 1.0}


def _close(a, b, tol=1e-12):
    assert a.kernel.shape == b.kernel.shape
    scale = float(b.kernel.abs().max())
    assert float((a.kernel - b.kernel).abs().max()) <= tol * scale, \
        float((a.kernel - b.kernel).abs().max()) / scale


def _attr(model, traj, X, **kw):
    return ef.attribute(model, traj, X, progress=False, **kw)


def _per_sample_gl(M, n=6):
    """A callable per-sample rule: every test sample at Gauss–Legendre-n, its own row ([M, Q])."""
    t, w = gauss_legendre(n)

    def rule(s, theta_s, delta_s):
        return NodeSet(t[None].repeat(M, 1), w[None].repeat(M, 1))
    return rule


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_rows_loop_where_vmap_refuses_dict_inputs_and_mapping_output(relu_run, mode):
    """Per-sample nodes (PathFunction.jvp_rows / jacobian_rows) and the kink search's rows on a
    model whose mask check vmap refuses: looped, the same numbers as the tensor model."""
    run = relu_run
    mm = _masked(run)
    M = run["Xte"].shape[0]
    kw = dict(mode=mode, data="sample", train_data=(run["Xtr"], run["Ytr"]))
    train = (_inputs(run["Xtr"]), run["Ytr"])
    for quad in ("kinks:2", _per_sample_gl(M)):
        ref = _attr(run["model"], run["traj"], run["Xte"], quadrature=quad, **kw)
        got = _attr(mm, run["traj"], _inputs(run["Xte"]), quadrature=quad,
                    **{**kw, "train_data": train})
        assert got.plan["per_sample"].startswith("loop over samples")
        assert ref.plan["per_sample"] == "vmap"
        _close(got, ref)
    # model_output selects another entry of the dict output through the fast path too
    hid = _attr(mm, run["traj"], _inputs(run["Xte"]), quadrature="kinks:2", mode=mode,
                model_output="hidden")
    assert hid.kernel.shape == (M, 5) and float(hid.kernel.abs().max()) == 0


def test_default_auto_on_dict_inputs_where_vmap_refuses(relu_run):
    run = relu_run
    ref = _attr(run["model"], run["traj"], run["Xte"])
    got = _attr(_masked(run), run["traj"], _inputs(run["Xte"]))
    assert got.quadrature.startswith("auto → kinks:3") and ref.quadrature == got.quadrature
    assert got.certificate["problems"] == []
    _close(got, ref)


def test_path_function_rows_with_pytrees_against_materialised_theta(relu_run):
    """PathFunction values / JVP rows / Jacobian rows / shared-node JVPs on dict inputs with a
    loop (vmap refused) equal the model evaluated at θ_s + tΔ_s formed explicitly."""
    run = relu_run
    mm = _masked(run)
    layout, traj = run["traj"].layout, run["traj"]
    th, th1 = traj.theta(1), traj.theta(2)
    dl = th1 - th
    X = _inputs(run["Xte"])
    fm = FunctionalModel(mm, layout, DT)
    tf = TestFunction(fm, X, None, lambda o, y: o)
    pf = PathFunction.of(tf, th, dl)
    sample = torch.tensor([0, 3, 1, 3])
    t = torch.tensor([0.1, 0.4, 0.75, 0.9], dtype=DT)
    v = torch.randn(2, layout.D, generator=torch.Generator().manual_seed(0), dtype=DT)
    ref_f = FunctionalModel(run["model"], layout, DT)
    Xt = run["Xte"]
    vals = pf.values(sample, t)
    jr = pf.jvp_rows(sample, t, v)
    jac = pf.jacobian_rows(sample, t)
    assert not fm.vectorize                                 # vmap refused: the rows looped
    for r in range(len(sample)):
        x = Xt[sample[r]][None]
        at = th + t[r] * dl
        assert torch.allclose(vals[r], ref_f(at, x)[0], rtol=1e-12, atol=1e-13)
        for i in range(len(v)):
            g = torch.func.jvp(lambda p: ref_f(p, x)[0], (at,), (v[i],))[1]
            assert torch.allclose(jr[i, r], g, rtol=1e-12, atol=1e-13)
        J = torch.func.jacrev(lambda p: ref_f(p, x)[0])(at)
        assert torch.allclose(jac[r], J, rtol=1e-12, atol=1e-13)
    ts = torch.tensor([0.2, 0.6], dtype=DT)
    for split in (True, False):
        js = pf.jvp_shared(ts, slice(None), v, split=split)          # [T, q, M, K]
        for q in range(len(ts)):
            at = th + ts[q] * dl
            for i in range(len(v)):
                g = torch.func.jvp(lambda p: ref_f(p, Xt), (at,), (v[i],))[1]
                assert torch.allclose(js[i, q], g, rtol=1e-12, atol=1e-13)


def test_kink_search_rows_with_dict_inputs_where_vmap_refuses(relu_run):
    run = relu_run
    layout, traj = run["traj"].layout, run["traj"]
    th, th1 = traj.theta(0), traj.theta(1)
    ref = _Path(run["model"], layout, th, th1 - th, run["Xte"], None, 1 << 24)
    got = _Path(_masked(run), layout, th, th1 - th, _inputs(run["Xte"]), None, 1 << 24)
    assert got.K == ref.K > 0
    sample = torch.tensor([0, 1, 2, 3, 0])
    t = torch.tensor([0.05, 0.3, 0.5, 0.7, 0.95], dtype=DT)
    z, dz = got.rows(sample, t)
    assert not got.fm.vectorize
    z0, dz0 = ref.rows(sample, t)
    assert torch.allclose(z, z0, rtol=1e-13, atol=1e-14)
    assert torch.allclose(dz, dz0, rtol=1e-13, atol=1e-14)
    assert torch.allclose(got.values(sample, t), z0, rtol=1e-13, atol=1e-14)


def test_compiled_submodule_through_the_fast_paths(relu_run):
    """A torch.compile'd submodule runs eagerly under PathMode (dynamo would trace the mode):
    kink search, soft patterns / pieces and per-sample rows give the plain model's numbers."""
    run = relu_run
    plain = run["model"]
    comp = TinyMLP("relu").to(DT)
    comp.load_state_dict(plain.state_dict())
    comp.fc1 = torch.compile(comp.fc1, backend="eager")
    torch._dynamo.reset()        # the first compile of fc1 happens under the path's function mode
    M = run["Xte"].shape[0]
    for quad, mode in (("kinks:2", "reverse"), ("kinks:2", "forward"), ("auto", "forward"),
                       (_per_sample_gl(M), "forward")):
        kw = dict(quadrature=quad, mode=mode, data="sample", train_data=(run["Xtr"], run["Ytr"]))
        _close(_attr(comp, run["traj"], run["Xte"], **kw),
               _attr(plain, run["traj"], run["Xte"], **kw))


class BNReluNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(F.relu(self.bn(self.fc1(x))))


def test_kink_rules_use_the_recorded_buffers():
    """A fresh module (other BatchNorm statistics) gives the trained module's numbers with the
    kink-aware rules too: the kink search evaluates with the recorded buffers."""
    X, Y = small_data(DT)
    torch.manual_seed(0)
    model = BNReluNet().to(DT)
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    opt = torch.optim.AdamW(model.parameters(), lr=0.03, weight_decay=0.1)
    d = tempfile.mkdtemp(prefix="explaind_bnrelu_")
    g = torch.Generator().manual_seed(3)
    with ef.TrajectoryRecorder(model, opt, d, dataset_size=len(X), fsync=False) as rec:
        for _ in range(3):
            idx = torch.randperm(len(X), generator=g)[:8]
            model.train()
            model.bn.eval()
            rec.set_batch(idx)
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), Y[idx]).backward()
            opt.step()
    model.eval()
    traj = ef.Trajectory.load(d)
    fresh = BNReluNet().to(DT).eval()
    Xte = X[:6]
    for quad in ("kinks:3", "auto"):
        ref = _attr(model, traj, Xte, quadrature=quad)
        got = _attr(fresh, traj, Xte, quadrature=quad)
        assert "recorded final values" in got.plan["buffers"]
        assert got.certificate["problems"] == []
        _close(got, ref, tol=1e-13)


def test_theta_view_into_a_larger_buffer(relu_run):
    """The store's reader returns θ_s as a view into a step's file buffer: the JVP primal gets its
    own storage (forward AD would copy every tangent into a buffer of the whole storage's size),
    with the same numbers."""
    run = relu_run
    layout, traj = run["traj"].layout, run["traj"]
    th, dl = traj.theta(1), traj.theta(2) - traj.theta(1)
    buf = torch.cat([torch.zeros(7, dtype=DT), th, torch.ones(layout.D, dtype=DT)])
    view = buf[7:7 + layout.D]
    tf = TestFunction(FunctionalModel(run["model"], layout, DT), run["Xte"], None,
                      lambda o, y: o)
    a, b = PathFunction.of(tf, view, dl), PathFunction.of(tf, th.clone(), dl)
    assert a.theta_s.storage_offset() == 0 and \
        a.theta_s.untyped_storage().nbytes() == layout.D * 8
    v = torch.randn(3, layout.D, generator=torch.Generator().manual_seed(1), dtype=DT)
    t = torch.tensor([0.25, 0.5], dtype=DT)
    assert torch.equal(a.jvp_shared(t, slice(None), v), b.jvp_shared(t, slice(None), v))
    s = torch.tensor([0, 2])
    assert torch.equal(a.jvp_rows(s, t, v), b.jvp_rows(s, t, v))
