"""What ordinary training code does, recorded without rewriting it, and attributed exactly.

* gradient clipping and scaling between backward() and the step: torch.nn.utils.clip_grad_norm_,
  torch.amp.GradScaler (unscale_, skipped steps, the fused path), a manual g.mul_(c) on every
  gradient — recorded as the step's common factor; value clipping that clamps, per-tensor
  clipping and sign flips refused, naming the parameter;
* parameters without a gradient at a step (an unused table, a head used on some batches) for
  AdamW, Adam-L2 and SGD-momentum, and zero_grad(set_to_none=False);
* gradient accumulation with indices declared per micro-batch, and steps that a loop skips.

Exactness oracle (every case, float64): ``attribute`` with per-sample data must pass its
certificate (the recomputed gradients reproduce every recorded update: relative step-identity
defect < 1e-12, measured ≤ 5e-14 here) and reconstruct the output change to 1e-9 relative (the
summed contributions equal the real forward passes; Gauss–Legendre 8 on these smooth tanh
models leaves ≤ 1e-14 relative); ``verify`` replays every update (θ error ≤ 4·eps·|θ|, relative
second-moment error ≤ 1e-12).
"""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import explaind_fast as ef
from explaind_fast.recording import TrajectoryRecorder
from explaind_fast.store import Trajectory
from explaind_fast.testing.models import N_SAMPLES, small_data, small_model
from explaind_fast.testing.runs import small_optimizer

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def exact(model, traj, X, Y, data="sample", **kw):
    """attribute(...) that must pass its certificate and reconstruct to 1e-9 of the change."""
    kw.setdefault("quadrature", "gauss-legendre:8")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ef.AttributionWarning)
        a = ef.attribute(model, traj, X[:5], test_targets=Y[:5], output="loss",
                         data=data, train_data=(X, Y) if data != "all" else None,
                         progress=False, **kw)
    assert a.certificate["problems"] == []
    change = float((a.final - a.initial).abs().max())
    assert change > 1e-4
    assert a.reconstruction_error <= 1e-9 * change, (a.reconstruction_error, change)
    if data != "all":
        assert float(a.step_identity.max()) < 1e-12, a.step_identity
    return a


def verified(traj, model):
    report = traj.verify(model)
    eps = torch.finfo(F64).eps
    for s, e in enumerate(report.theta_error):
        assert e <= 4 * eps * float(traj.theta(s + 1).abs().max()) + 1e-12 * report.step_size[s]
    if traj.optimizer_kind != "sgd":
        assert report.max_moment_error <= 1e-12
    return report


def batches(n_steps=6, size=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(N_SAMPLES, generator=g)[:size] for _ in range(n_steps)]


# ------------------------------------------------------------------------------ clipping, scaling
@pytest.mark.parametrize("kind", ["adamw", "adam", "sgd"])
def test_torch_clip_grad_norm_is_recorded(tmp_path, kind):
    """The loop every transformer script has: torch's clip_grad_norm_ after backward()."""
    X, Y = small_data(F64)
    model = small_model(F64)
    opt = small_optimizer(model, kind)
    norms = []
    with TrajectoryRecorder(model, opt, tmp_path / "t", dataset_size=N_SAMPLES, fsync=False) as rec:
        for idx in batches():
            rec.set_batch(idx)
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), Y[idx]).backward()
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.3)))
            opt.step()
    traj = Trajectory.load(tmp_path / "t")
    clips = [traj.step(s).clip_factor for s in range(traj.num_steps)]
    want = [min(1.0, 0.3 / (n + 1e-6)) for n in norms]
    assert min(want) < 1.0 and max(want) == 1.0       # clipped steps and unclipped ones
    assert clips == pytest.approx(want, rel=1e-14, abs=0)
    assert [c for c, w in zip(clips, want) if w == 1.0] == [1.0] * want.count(1.0)   # exactly 1
    verified(traj, model)
    exact(model, traj, X, Y)


def test_manual_common_scale_is_recorded(tmp_path):
    X, Y = small_data(F64)
    model = small_model(F64)
    opt = small_optimizer(model, "adamw")
    with TrajectoryRecorder(model, opt, tmp_path / "t", dataset_size=N_SAMPLES, fsync=False) as rec:
        for s, idx in enumerate(batches(4)):
            rec.set_batch(idx, torch.ones(len(idx)))     # the weights of the loss backpropagated
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), Y[idx], reduction="sum").backward()
            for p in model.parameters():
                p.grad.mul_(0.25 if s % 2 else 1 / 6)      # e.g. a mean taken by hand
            opt.step()
    traj = Trajectory.load(tmp_path / "t")
    assert [traj.step(s).clip_factor for s in range(4)] == pytest.approx(
        [1 / 6, 0.25, 1 / 6, 0.25], rel=1e-14)
    exact(model, traj, X, Y)


@pytest.mark.parametrize("edit,needle", [
    (lambda m: torch.nn.utils.clip_grad_value_(m.parameters(), 0.05),
     r"'embed.weight' changed between backward\(\) and optimizer.step\(\) other than by a common "
     r"scale.*value clipping.*does not decompose per sample"),
    (lambda m: [torch.nn.utils.clip_grad_norm_([p], 0.01) for p in m.parameters()],
     r"changed between backward\(\) and optimizer.step\(\) by a factor .*different factors"),
    (lambda m: [p.grad.neg_() for p in m.parameters()],
     r"'embed.weight' changed .* other than by a common scale"),
    (lambda m: m.fc1.weight.grad[0, 0].add_(1.0),
     r"'fc1.weight' changed .* other than by a common scale"),
    (lambda m: m.fc2.bias.grad.mul_(3.0),
     r"'fc2.bias' changed .* by a factor 3, the other parameters' by about 1"),
])
def test_non_uniform_changes_refused(tmp_path, edit, needle):
    X, Y = small_data(F64)
    model = small_model(F64)
    opt = small_optimizer(model, "adamw")
    rec = TrajectoryRecorder(model, opt, tmp_path / "t", fsync=False)
    rec.set_batch(torch.arange(8))
    F.cross_entropy(model(X[:8]), Y[:8]).backward()
    edit(model)
    theta = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=needle):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(theta, model.parameters()))
    assert Trajectory.load(tmp_path / "t").num_steps == 0


def test_value_clipping_that_clamps_nothing_is_accepted(tmp_path):
    X, Y = small_data(F64)
    model = small_model(F64)
    opt = small_optimizer(model, "adamw")
    with TrajectoryRecorder(model, opt, tmp_path / "t", fsync=False) as rec:
        rec.set_batch(torch.arange(8))
        F.cross_entropy(model(X[:8]), Y[:8]).backward()
        torch.nn.utils.clip_grad_value_(model.parameters(), 1e6)
        opt.step()
    assert Trajectory.load(tmp_path / "t").step(0).clip_factor == 1.0


@pytest.mark.parametrize("how", ["given", "found", "fused"])
def test_grad_scaler(tmp_path, how):
    """torch.amp.GradScaler on the CPU: the loss scale S multiplies backward()'s gradients,
    unscale_ (explicit here, with torch's clipping after it) divides them again; a step with
    inf/NaN gradients is skipped by the scaler and must not be recorded, nor its batch kept.
    "given": grad_scaler=scaler, the first step overflows; "found": the recorder recognises
    scaler.step in its call stack; "fused": fused AdamW, which unscales inside its step and is
    called with found_inf set (torch reverts its step counter)."""
    X, Y = small_data(F64)
    model = small_model(F64)
    opt = small_optimizer(model, "adamw", **({"fused": True} if how == "fused" else {}))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=2)
    overflow = {"given": 0, "found": 2, "fused": 1}[how]
    kw = {"grad_scaler": scaler} if how == "given" else {}
    recorded = []
    with TrajectoryRecorder(model, opt, tmp_path / "t", dataset_size=N_SAMPLES, fsync=False,
                            **kw) as rec:
        for s, idx in enumerate(batches(6)):
            rec.set_batch(idx)
            opt.zero_grad()
            loss = F.cross_entropy(model(X[idx]), Y[idx])
            if s == overflow:
                loss = loss * float("inf")
            scaler.scale(loss).backward()
            if how != "fused":
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.3)
            scaler.step(opt)
            scaler.update()
            if s != overflow:
                recorded.append(idx)
        assert rec.skipped_steps == 1
    traj = Trajectory.load(tmp_path / "t")
    assert traj.num_steps == 5
    for s, idx in enumerate(recorded):
        assert torch.equal(traj.step(s).batch_indices, idx)
        assert traj.step(s).step_count == s + 1
    if how == "fused":
        assert all(traj.step(s).clip_factor == 1.0 for s in range(5))   # S / grad_scale, exactly
    verified(traj, model)
    exact(model, traj, X, Y)
    assert "step" not in vars(scaler)          # the recorder's wrapper is gone after close()


# ------------------------------------------------------------------------------ no gradient
class Routed(nn.Module):
    """embed -> tanh -> head, plus a second head for the samples whose first feature exceeds 0.8
    (computed for those rows only: a batch without such a sample leaves it without gradient),
    and a positional table that the forward never uses."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 6)
        self.pos = nn.Parameter(torch.randn(5, 6))
        self.head = nn.Linear(6, 3)
        self.extra = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.embed(x))
        out = self.head(h)
        rows = x[:, 0] > 0.8
        if bool(rows.any()):
            out = out.index_add(0, rows.nonzero().flatten(), self.extra(h[rows]))
        return out


def _routed_batches(X):
    rows = X[:, 0] > 0.8
    inside, outside = rows.nonzero().flatten(), (~rows).nonzero().flatten()
    assert len(inside) >= 2 and len(outside) >= 12
    # steps 0, 2, 3: no routed sample (extra gets no gradient); 1, 4: some
    return [outside[:6], torch.cat([outside[6:10], inside[:2]]), outside[2:8],
            outside[5:11], torch.cat([inside[1:2], outside[:5]])]


@pytest.mark.parametrize("kind", ["adamw", "adam", "sgd"])
def test_parameters_without_gradient(tmp_path, kind):
    X, Y = small_data(F64)
    torch.manual_seed(0)
    model = Routed().to(F64)
    wd = 0.1
    groups = [{"params": [model.embed.weight, model.embed.bias, model.pos], "weight_decay": wd},
              {"params": list(model.head.parameters()) + list(model.extra.parameters()),
               "weight_decay": 0.01}]
    if kind == "sgd":
        opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    else:
        opt = (torch.optim.AdamW if kind == "adamw" else torch.optim.Adam)(groups, lr=0.02)
    steps = _routed_batches(X)
    pos0 = model.pos.detach().clone()
    with TrajectoryRecorder(model, opt, tmp_path / "t", dataset_size=N_SAMPLES, fsync=False) as rec:
        for idx in steps:
            rec.set_batch(idx)
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), Y[idx]).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
    assert torch.equal(model.pos, pos0)            # torch never touched it: no decay either
    traj = Trajectory.load(tmp_path / "t")
    names = traj.layout.names
    pos, ew, eb = names.index("pos"), names.index("extra.weight"), names.index("extra.bias")
    assert [list(traj.step(s).inactive) for s in range(5)] == \
        [[pos, ew, eb], [pos], [pos, ew, eb], [pos, ew, eb], [pos]]
    if kind == "sgd":
        assert traj.step(4).tensor_step_counts is None
    else:      # torch's own counters: pos never stepped, extra stepped at steps 1 and 4
        counts = traj.step(4).tensor_step_counts
        assert counts[pos] == 0 and counts[ew] == counts[eb] == 2
        assert counts[names.index("embed.weight")] == 5
    verified(traj, model)
    for data in ("sample", "label", "all"):
        a = exact(model, traj, X, Y, data=data, params="tensor", steps="each")
        pi = a.axes["param"].index("pos")
        assert float(a.kernel.select(a.dims.index("param"), pi).abs().max()) == 0.0
        assert float(a.reg.select(a.dims.index("param"), pi).abs().max()) == 0.0
    # gradient-step credit (the backward recursion), and its identity check, agree
    g = exact(model, traj, X, Y, data="sample", credit="gradient")
    u = exact(model, traj, X, Y, data="sample", credit="update")
    assert torch.allclose(g.kernel, u.kernel, rtol=0, atol=1e-12 * float(u.kernel.abs().max()))
    assert torch.allclose(g.step_identity, u.step_identity, rtol=1e-6, atol=1e-15)


def test_zero_grad_set_to_none_false(tmp_path):
    """A gradient left at zero (zero_grad(set_to_none=False)) where backward() did not reach is
    a zero gradient: torch decays the weights and the moments, and so does the recording."""
    X, Y = small_data(F64)
    torch.manual_seed(0)
    model = Routed().to(F64)
    opt = torch.optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.1)
    with TrajectoryRecorder(model, opt, tmp_path / "t", dataset_size=N_SAMPLES, fsync=False) as rec:
        for idx in _routed_batches(X):
            rec.set_batch(idx)
            opt.zero_grad(set_to_none=False)
            F.cross_entropy(model(X[idx]), Y[idx]).backward()
            opt.step()
    traj = Trajectory.load(tmp_path / "t")
    names = traj.layout.names
    pos, ew, eb = names.index("pos"), names.index("extra.weight"), names.index("extra.bias")
    # extra has no gradient tensor before its first use (step 1), a zeroed one afterwards; pos
    # never gets one (zero_grad(set_to_none=False) zeroes existing gradients only)
    assert [list(traj.step(s).inactive) for s in range(5)] == \
        [[pos, ew, eb], [pos], [pos], [pos], [pos]]
    verified(traj, model)
    exact(model, traj, X, Y)


def test_gradient_left_over_from_an_earlier_step_refused(tmp_path):
    X, Y = small_data(F64)
    torch.manual_seed(0)
    model = Routed().to(F64)
    opt = torch.optim.AdamW(model.parameters(), lr=0.02)
    rec = TrajectoryRecorder(model, opt, tmp_path / "t", fsync=False)
    routed = _routed_batches(X)
    rec.set_batch(routed[1])
    F.cross_entropy(model(X[routed[1]]), Y[routed[1]]).backward()
    opt.step()                                   # extra had a gradient; no zero_grad follows
    for p in [model.embed.weight, model.embed.bias, model.head.weight, model.head.bias]:
        p.grad = None
    rec.set_batch(routed[0])
    F.cross_entropy(model(X[routed[0]]), Y[routed[0]]).backward()
    with pytest.raises(RuntimeError, match="'extra.weight' was not produced by backward"):
        opt.step()


# ------------------------------------------------------------------------------ accumulation
@pytest.mark.parametrize("declare", ["per-micro-batch", "once"])
def test_accumulation_mean_over_micro_batches(tmp_path, declare):
    """loss / accum per micro-batch mean (the common recipe), torch's clipping after the last."""
    X, Y = small_data(F64)
    model = small_model(F64)
    opt = small_optimizer(model, "adam")
    accum, b = 3, 4
    g = torch.Generator().manual_seed(2)
    with TrajectoryRecorder(model, opt, tmp_path / "t", dataset_size=N_SAMPLES, fsync=False) as rec:
        for step in range(4):
            opt.zero_grad()
            micro = [torch.randperm(N_SAMPLES, generator=g)[:b] for _ in range(accum)]
            if declare == "once":
                rec.set_batch(torch.cat(micro))            # 1/(b·accum) each
            for idx in micro:
                if declare == "per-micro-batch":
                    rec.set_batch(idx, scale=1 / accum)     # weights 1/(b·accum)
                (F.cross_entropy(model(X[idx]), Y[idx]) / accum).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
    traj = Trajectory.load(tmp_path / "t")
    r = traj.step(0)
    assert r.batch_indices.numel() == accum * b
    assert torch.allclose(r.batch_weights, torch.full((accum * b,), 1 / (accum * b), dtype=F64),
                          rtol=1e-15, atol=0)
    verified(traj, model)
    exact(model, traj, X, Y)


def test_skipped_step_after_zero_grad_drops_its_batch(tmp_path):
    """A loop that skips a batch on a non-finite loss: zero_grad, set_batch, backward,
    ``continue`` — the next set_batch (after zero_grad) drops the skipped declaration."""
    X, Y = small_data(F64)
    model = small_model(F64)
    opt = small_optimizer(model, "adamw")
    taken = []
    with TrajectoryRecorder(model, opt, tmp_path / "t", dataset_size=N_SAMPLES, fsync=False) as rec:
        for s, idx in enumerate(batches(5)):
            opt.zero_grad()
            rec.set_batch(idx)
            loss = F.cross_entropy(model(X[idx]), Y[idx])
            loss.backward()
            if s == 2:                               # e.g. `if not loss.isfinite(): continue`
                continue
            opt.step()
            taken.append(idx)
    traj = Trajectory.load(tmp_path / "t")
    assert [traj.step(s).batch_indices.tolist() for s in range(4)] == [t.tolist() for t in taken]
    exact(model, traj, X, Y)


def test_skipped_step_ambiguous_refused_then_discard_batch(tmp_path):
    """set_batch before zero_grad: after a skipped step the recorder cannot tell which
    declarations are stale, and says so; discard_batch() in the loop makes it exact."""
    X, Y = small_data(F64)
    for use_discard in (False, True):
        model = small_model(F64)
        opt = small_optimizer(model, "adamw")
        d = tmp_path / f"t{use_discard}"
        with TrajectoryRecorder(model, opt, d, dataset_size=N_SAMPLES, fsync=False) as rec:
            for s, idx in enumerate(batches(4)):
                rec.set_batch(idx)
                opt.zero_grad()
                F.cross_entropy(model(X[idx]), Y[idx]).backward()
                if s == 1:
                    if use_discard:
                        rec.discard_batch()
                    continue
                if not use_discard and s == 2:
                    with pytest.raises(RuntimeError, match="discard_batch"):
                        opt.step()
                    break
                opt.step()
        if use_discard:
            traj = Trajectory.load(d)
            assert traj.num_steps == 3
            exact(model, traj, X, Y)


def test_parameters_without_gradient_subsampled(tmp_path):
    """checkpoint_every = 2: the skipped tensors are kept per raw step (their counters replay in
    verify), and each stored update stays exactly attributable over parameters (data="all")."""
    X, Y = small_data(F64)
    torch.manual_seed(0)
    model = Routed().to(F64)
    opt = torch.optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.1)
    with TrajectoryRecorder(model, opt, tmp_path / "t", checkpoint_every=2,
                            dataset_size=N_SAMPLES, fsync=False) as rec:
        for idx in _routed_batches(X):
            rec.set_batch(idx)
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), Y[idx]).backward()
            opt.step()
    traj = Trajectory.load(tmp_path / "t")
    assert traj.num_steps == 3
    assert [len(r.inactive) for s in range(3) for r in traj.raw_steps(s)] == [3, 1, 3, 3, 1]
    traj.verify(model)
    a = exact(model, traj, X, Y, data="all", params="tensor", steps="each")
    pi = a.axes["param"].index("pos")
    assert float(a.kernel.select(a.dims.index("param"), pi).abs().max()) == 0.0
