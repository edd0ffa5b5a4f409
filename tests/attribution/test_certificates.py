"""Certificates that act (explaind_fast.attribution.certificate): every way found to get a wrong
number silently now warns, and raises under strict=True; exact runs stay silent.

Oracles: the step identity is exact for the recorded optimizer (docs/design.md §3), so on a run
attributed with the training loss and model the per-step relative identity defect is rounding
(< 1e-12 in float64, tests/recording/test_recorder.py bounds the same quantity); a wrong loss, a
BatchNorm that used batch statistics, another forward branch or bfloat16 autocast change the
gradients by 1e-3 or more relative, far above IDENTITY_REL (1e-9 float64, 1e-3 float32).
"""
import tempfile
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from explaind_fast import AttributionWarning, CertificateError, Trajectory, attribute
from explaind_fast.testing.models import DT, TinyMLP, mlp_data
from explaind_fast.testing.runs import tiny_mlp_run, tiny_optimizer, train_recorded


def _silent(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("error", AttributionWarning)
        return fn()


@pytest.fixture(scope="module")
def run():
    model, traj, train, Xte, Yte, _ = tiny_mlp_run(kind="adamw", steps=4)
    return dict(model=model, traj=traj, train=train, Xte=Xte, Yte=Yte)


def attr(run, model=None, **kw):
    kw.setdefault("quadrature", "gauss-legendre:4")
    kw.setdefault("progress", False)
    return attribute(model or run["model"], run["traj"], run["Xte"], test_targets=run["Yte"],
                     train_data=run["train"], **kw)


@pytest.mark.parametrize("kind", ["adamw", "sgd", "adam"])
def test_exact_runs_pass_silently(kind):
    model, traj, train, Xte, Yte, _ = tiny_mlp_run(kind=kind, steps=4)
    r = dict(model=model, traj=traj, train=train, Xte=Xte, Yte=Yte)
    for kw in (dict(data="all", steps="each"), dict(data="label", steps="each"),
               dict(data="sample", credit="gradient"), dict(data="sample", credit="update")):
        a = _silent(lambda: attr(r, **kw))
        assert a.certificate["problems"] == [], (kind, kw)
        assert a.certificate["reconstruction_defect"] <= a.certificate["reconstruction_tolerance"]
        if kw["data"] == "all":
            assert bool(torch.isnan(a.step_identity).all())      # exact by construction
        else:
            assert float(a.step_identity.max()) < 1e-12, (kind, kw, a.step_identity)


def test_identity_same_in_both_credits(run):
    """The update credit checks steps forward, the gradient credit backward: same numbers."""
    lossy = dict(loss_fn=lambda o, y: F.cross_entropy(o, y, reduction="none", label_smoothing=0.2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AttributionWarning)
        u = attr(run, data="sample", credit="update", **lossy)
        g = attr(run, data="sample", credit="gradient", **lossy)
    assert torch.allclose(u.step_identity, g.step_identity, rtol=1e-9, atol=0)
    assert float(u.step_identity.min()) > 1e-3


def _expect_warning(fn, *needles):
    with pytest.warns(AttributionWarning) as caught:
        a = fn(strict=False)
    msg = " ".join(str(w.message) for w in caught)
    for n in needles:
        assert n in msg, msg
    with pytest.raises(CertificateError):
        fn(strict=True)
    return a, msg


def test_loss_fn_mismatch_warns(run):
    smooth = lambda o, y: F.cross_entropy(o, y, reduction="none", label_smoothing=0.1)  # noqa: E731
    for data in ("sample", "label"):
        a, msg = _expect_warning(lambda strict: attr(run, data=data, loss_fn=smooth, strict=strict),
                                 "step identity", "loss_fn", "steps 0, 1, 2, 3")
        assert a.certificate["identity_failed_steps"] == [0, 1, 2, 3]


class BNNet(nn.Module):
    def __init__(self, branch=False):
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)
        self.branch = branch

    def forward(self, x):
        h = self.bn(self.fc1(x))
        return self.fc2(torch.tanh(h) if not self.branch else torch.sin(h))


def _recorded(model, X, Y, steps=4, autocast=None):
    opt = tiny_optimizer(model, "adamw")
    d = tempfile.mkdtemp(prefix="explaind_cert_")
    g = torch.Generator().manual_seed(1)
    batches = [torch.randperm(X.shape[0], generator=g)[:6] for _ in range(steps)]

    def loss(out, y):
        return F.cross_entropy(out.float() if autocast else out, y)

    if autocast is None:
        train_recorded(model, opt, d, X, Y, batches, loss=loss, dataset_size=X.shape[0],
                       fsync=False)
    else:
        class Autocast(nn.Module):       # the training forward runs under autocast
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, x):
                with torch.autocast("cpu", dtype=autocast):
                    return self.m(x)
        # the recorder must see the inner model's parameters under their own names
        wrapped = Autocast(model)
        opt2 = tiny_optimizer(model, "adamw")
        from explaind_fast import TrajectoryRecorder
        with TrajectoryRecorder(model, opt2, d, dataset_size=X.shape[0], fsync=False) as rec:
            for idx in batches:
                rec.set_batch(idx)
                opt2.zero_grad()
                loss(wrapped(X[idx]), Y[idx]).backward()
                opt2.step()
    return Trajectory.load(d)


def test_batchnorm_trained_in_train_mode_warns():
    torch.manual_seed(0)
    Xtr, Ytr, Xte, Yte = mlp_data()
    model = BNNet().to(DT)
    traj = _recorded(model, Xtr, Ytr)          # BatchNorm in train mode: batch statistics
    model.eval()
    r = dict(model=model, traj=traj, train=(Xtr, Ytr), Xte=Xte, Yte=Yte)
    _expect_warning(lambda strict: attr(r, data="label", strict=strict), "step identity",
                    "BatchNorm (bn)")


def test_forward_branch_differs_warns():
    torch.manual_seed(0)
    Xtr, Ytr, Xte, Yte = mlp_data()
    model = BNNet().to(DT)
    model.bn = nn.Identity()
    traj = _recorded(model, Xtr, Ytr)
    model.branch = True                          # attribute another function than the trained one
    r = dict(model=model, traj=traj, train=(Xtr, Ytr), Xte=Xte, Yte=Yte)
    _expect_warning(lambda strict: attr(r, data="sample", strict=strict), "step identity",
                    "forward differs")


def test_bfloat16_autocast_training_warns():
    torch.manual_seed(0)
    Xtr, Ytr, Xte, Yte = mlp_data()
    Xtr, Xte = Xtr.float(), Xte.float()
    model = TinyMLP("tanh").float()
    traj = _recorded(model, Xtr, Ytr, autocast=torch.bfloat16)
    r = dict(model=model, traj=traj, train=(Xtr, Ytr), Xte=Xte, Yte=Yte)
    a, _ = _expect_warning(lambda strict: attr(r, data="sample", strict=strict), "step identity",
                           "autocast")
    # the same run trained in float32 passes: the tolerance separates the two
    model32 = TinyMLP("tanh").float()
    traj32 = _recorded(model32, Xtr, Ytr)
    r32 = dict(model=model32, traj=traj32, train=(Xtr, Ytr), Xte=Xte, Yte=Yte)
    b = _silent(lambda: attr(r32, data="sample"))
    assert float(b.step_identity.max()) * 10 < float(a.step_identity.max())


@pytest.mark.parametrize("kw", [dict(mode="reverse", data="all", params="tensor"),
                                dict(mode="reverse", data="label"),
                                dict(mode="forward", data="label", steps="each")])
def test_nan_test_input_stays_in_its_row(run, kw):
    X = run["Xte"].clone()
    X[2, 1] = float("nan")
    r = dict(run, Xte=X)
    a, msg = _expect_warning(lambda strict: attr(r, strict=strict, **kw), "test rows 2")
    clean = _silent(lambda: attr(dict(run, Xte=run["Xte"][[0, 1, 3]], Yte=run["Yte"][[0, 1, 3]]),
                                 **kw))
    ti = a.dims.index("test")
    keep = a.kernel.index_select(ti, torch.tensor([0, 1, 3]))
    assert bool(torch.isfinite(keep).all())
    assert torch.allclose(keep, clean.kernel, rtol=1e-10, atol=1e-13)
    assert not bool(torch.isfinite(a.kernel.select(ti, 2)).all())
    assert a.certificate["nonfinite_rows"] == [2]
    assert bool(torch.isfinite(a.step_residual_relative).all())   # other rows' residuals kept


def test_inexact_rule_warns_but_adaptive_meets_its_own_tolerance(run):
    relu = TinyMLP("relu").to(DT)
    model, traj, train, Xte, Yte, _ = tiny_mlp_run(act="relu", kind="adamw", steps=3)
    r = dict(model=model, traj=traj, train=train, Xte=Xte, Yte=Yte)
    del relu
    _expect_warning(lambda strict: attr(r, quadrature="midpoint:3", strict=strict),
                    "quadrature rule is not exact")
    a = _silent(lambda: attr(r, quadrature="adaptive:1e-3"))
    assert a.certificate["quadrature_tolerance"] == 1e-3


def test_certificate_survives_save_and_load(run, tmp_path):
    a = attr(run, data="label", steps="each")
    a.save(str(tmp_path / "a.safetensors"))
    from explaind_fast import Attribution
    b = Attribution.load(str(tmp_path / "a.safetensors"))
    assert torch.equal(a.step_identity, b.step_identity) and a.certificate == b.certificate


# ------------------------------------------------------------------------------ input checks
def test_params_patterns_checked(run):
    with pytest.raises(ValueError, match=r"pattern 'fc9\*' of group 'x' matches no"):
        attr(run, params={"x": ["fc9*"]})
    with pytest.raises(ValueError, match=r"'fc1.weight' matches the patterns of several groups"):
        attr(run, params={"a": "fc1.*", "b": ["*.weight"]})


@pytest.mark.parametrize("budget", [0, -5, float("nan"), float("inf"), "1GB", True])
def test_memory_budget_checked(run, budget):
    with pytest.raises(ValueError, match="memory_budget"):
        attr(run, memory_budget=budget)


def test_partition_ids_checked(run):
    n = run["train"][0].shape[0]
    ids = torch.zeros(n, dtype=torch.int64)
    ids[0] = 10 ** 7
    with pytest.raises(ValueError, match="consecutive ids"):
        attr(run, data=ids)


def test_result_larger_than_memory_refused(run, monkeypatch):
    import explaind_fast.attribution.problem as problem
    monkeypatch.setattr(problem, "_device_memory", lambda device: 10_000)
    with pytest.raises(ValueError, match="the result alone needs"):
        attr(run, data="sample", steps="each", params="parameter")


def test_output_checks_name_the_output(run):
    with pytest.raises(ValueError, match="no outputs"):
        attr(run, output=lambda out, tgt: out[:, :0])
    with pytest.raises(ValueError, match=r"output=7 could not be applied"):
        attr(run, output=7)
    with pytest.raises(ValueError, match=r"output=\[0, 5\] could not be applied"):
        attr(run, output=[0, 5])
