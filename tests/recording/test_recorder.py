"""TrajectoryRecorder: exact replay, the per-sample step identity, subsampling and refusals.

Tolerances (Δ_s = θ_{s+1} − θ_s; eps of the recording dtype; measured with margin):
* step identity: max|Δ_s + Σ_p Φ_s[p] + r_s| ≤ 4·eps·max|θ_{s+1}| + REL·max|Δ_s|. The first term
  is torch's own rounding of θ_{s+1} (half an ulp per coordinate, whatever the step size: it
  dominates for small learning rates). The second: the recomputed per-sample gradients sum to the
  batch gradient only up to rounding, ≈ eps·Σ_k|w_k g_k| per coordinate, and Adam divides by
  sqrt(v) ≈ |g| in its first steps, so where the batch gradient cancels that rounding appears at
  the scale of the step. REL = 1e-12 in float64 (measured ≤ 1.1e-13 over the runs below and a
  40-configuration sweep of β1, β2, ε, lr, weight decay, momentum and batch size); float32 runs
  (gradients recomputed in float64 at the stored θ) REL = 1e-4 (measured ≤ 1.5e-5: the run's own
  float32 gradient has the same cancellation at eps32 = 1.2e-7).
* verify, float64: θ error ≤ 4·eps64·max|θ|; relative second-moment error ≤ 1e-12 (measured
  ≤ 1.6e-13 in the sweep; it grows like eps·|θ|/|Δ|/(1−β1) when steps are tiny against θ).
* verify, float32: relative second-moment error ≤ 1e-4 (measured ≤ 4e-6): the implied gradient
  carries θ_{s+1}'s float32 rounding, amplified by 1/(1−β1) = 10.
"""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from explaind_fast.recording import IndexedDataset, TrajectoryRecorder, indexed_loader
from explaind_fast.store import LOG, MANIFEST, Trajectory, encode_log_line, manifest_checksum
from explaind_fast.testing.models import N_SAMPLES, small_data as data, small_model as make_model
from explaind_fast.testing.naive import step_identity_errors
from explaind_fast.testing.runs import record_run, small_optimizer as make_optimizer

F64, F32 = torch.float64, torch.float32
IDENTITY_REL = {F64: 1e-12, F32: 1e-4}
MOMENT_TOL = {F64: 1e-12, F32: 1e-4}


def assert_verified(report, traj, dtype):
    """verify()'s θ error per step within 4·eps·max|θ_{s+1}| + REL·max|Δ_s| (the replay redoes
    the step's arithmetic, and its implied gradient carries θ's rounding amplified by
    1/(1−β1)), and the second-moment error within MOMENT_TOL."""
    eps = torch.finfo(dtype).eps
    for s, (e, size) in enumerate(zip(report.theta_error, report.step_size)):
        tol = 4 * eps * float(traj.theta(s + 1).abs().max()) + IDENTITY_REL[dtype] * size
        assert e <= tol, f"step {s}: replay error {e:.3g} > {tol:.3g}"
    if traj.optimizer_kind != "sgd":
        assert report.max_moment_error <= MOMENT_TOL[dtype]


def assert_step_identity(traj, model, X, Y, dtype):
    errors, steps, thetas = step_identity_errors(traj, model, X, Y)
    eps = torch.finfo(dtype).eps
    for s, (e, size, theta) in enumerate(zip(errors, steps, thetas)):
        tol = 4 * eps * theta + IDENTITY_REL[dtype] * size
        assert e <= tol, f"step {s}: identity error {e:.3g} > {tol:.3g} (max|Δ| {size:.3g})"


@pytest.mark.parametrize("kind", ["adamw", "sgd", "adam"])
@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("batch_size", [8, None], ids=["minibatch", "fullbatch"])
def test_replay_and_step_identity(tmp_path, kind, dtype, batch_size):
    model, _ = record_run(tmp_path / "t", kind, dtype, batch_size=batch_size,
                          epochs=2 if batch_size else 4, clip=0.3 if batch_size else 0.15)
    traj = Trajectory.load(tmp_path / "t")
    assert traj.num_steps == (2 * N_SAMPLES // batch_size if batch_size else 4)
    assert traj.dtype == dtype and traj.optimizer_kind == kind
    # the stored final state is the model's
    assert torch.equal(traj.theta(traj.num_steps), traj.layout.flatten_model(model).to(dtype))
    # the scheduler and the clipping were seen
    lrs = [traj.step(s).lr[0] for s in range(traj.num_steps)]
    assert lrs[2] == pytest.approx(0.7 * lrs[0]) and lrs[0] != lrs[1] * 0.7
    clips = [traj.step(s).clip_factor for s in range(traj.num_steps)]
    assert min(clips) < 1.0 and (batch_size is None or max(clips) == 1.0)

    report = traj.verify(model)
    assert report.mode == ["derived-m"] * traj.num_steps
    assert_verified(report, traj, dtype)

    X, Y = data(dtype)
    assert_step_identity(traj, model, X, Y, dtype)


SWEEP = [  # (kind, β1 or momentum, β2, ε, lr, weight decay, batch size): corners of the space
    ("adamw", 0.0, 0.5, 1e-8, 0.03, 0.01, 5),
    ("adamw", 0.99, 0.999, 1e-3, 2e-4, 0.5, 1),
    ("adamw", 0.9, 0.9, 1e-6, 0.2, 0.5, 24),
    ("adam", 0.0, 0.999, 1e-6, 0.02, 0.0, 24),
    ("adam", 0.99, 0.5, 1e-6, 0.25, 0.01, 8),
    ("adam", 0.5, 0.999, 1e-8, 3e-4, 0.5, 1),
    ("sgd", 0.0, None, None, 2e-4, 0.5, 5),
    ("sgd", 0.5, None, None, 0.1, 0.0, 1),
    ("sgd", 0.9, None, None, 3e-4, 0.01, 24),
]


@pytest.mark.parametrize("kind,beta1,beta2,eps,lr,wd,batch_size", SWEEP)
def test_step_identity_across_hyperparameters(tmp_path, kind, beta1, beta2, eps, lr, wd,
                                              batch_size):
    X, Y = data(F64)
    model = make_model(F64)
    if kind == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=beta1, weight_decay=wd)
    else:
        cls = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
        opt = cls(model.parameters(), lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=wd)
    g = torch.Generator().manual_seed(0)
    with TrajectoryRecorder(model, opt, tmp_path / "t", dataset_size=N_SAMPLES,
                            fsync=False) as rec:
        for _ in range(5):
            idx = torch.randperm(N_SAMPLES, generator=g)[:batch_size]
            rec.set_batch(idx)
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), Y[idx]).backward()
            opt.step()
    traj = Trajectory.load(tmp_path / "t")
    report = traj.verify(model)
    assert_verified(report, traj, F64)
    assert_step_identity(traj, model, X, Y, F64)


@pytest.mark.parametrize("kind", ["adamw", "adam", "sgd"])
@pytest.mark.parametrize("impl", [{"foreach": True}, {"fused": True}, {"foreach": False}],
                         ids=["foreach", "fused", "for-loop"])
def test_optimizer_implementations(tmp_path, kind, impl):
    model, _ = record_run(tmp_path / "t", kind, F64, opt_kw=dict(impl))
    traj = Trajectory.load(tmp_path / "t")
    assert_verified(traj.verify(model), traj, F64)
    X, Y = data(F64)
    assert_step_identity(traj, model, X, Y, F64)


def test_adam_with_decoupled_weight_decay_is_adamw(tmp_path):
    model, _ = record_run(tmp_path / "t", "adam", F64, opt_kw={"decoupled_weight_decay": True})
    traj = Trajectory.load(tmp_path / "t")
    assert traj.optimizer_kind == "adamw"
    assert_verified(traj.verify(model), traj, F64)
    X, Y = data(F64)
    assert_step_identity(traj, model, X, Y, F64)


@pytest.mark.parametrize("kind", ["adamw", "adam", "sgd"])
def test_stored_first_moment_replays_honestly(tmp_path, kind):
    # momentum1=0: an SGD group without momentum buffer (the recorder stores torch's d_p = g + λθ)
    model, opt = record_run(tmp_path / "t", kind, F64, store_first_moment=True,
                            opt_kw={"momentum1": 0.0} if kind == "sgd" else None)
    traj = Trajectory.load(tmp_path / "t")
    report = traj.verify(model)
    assert report.mode == ["stored-m"] * traj.num_steps
    assert_verified(report, traj, F64)
    if kind != "sgd":
        key = "exp_avg"
        last = traj.layout.flatten([opt.state[p][key] for p in traj_params(model, traj)])
        assert torch.equal(traj.step(traj.num_steps - 1).exp_avg, last)


def traj_params(model, traj):
    named = dict(model.named_parameters())
    return [named[n] for n in traj.layout.names]


def _rewrite(directory, edit_manifest=None, edit_entry=None):
    """Tamper with the stored scalars but keep the checksums valid (verify must catch it)."""
    if edit_manifest:
        path = os.path.join(directory, MANIFEST)
        m = json.load(open(path))
        edit_manifest(m)
        m["sha256"] = manifest_checksum(m)
        open(path, "w").write(json.dumps(m))
    if edit_entry:
        path = os.path.join(directory, LOG)
        lines = open(path).read().splitlines()
        out = []
        for line in lines:
            entry = json.loads(line.rpartition("\t")[0])
            edit_entry(entry)
            out.append(encode_log_line(entry))
        open(path, "w").write("".join(out))


@pytest.mark.parametrize("tamper", ["beta2", "eps", "lr", "weight_decay"])
def test_verify_detects_wrong_hyperparameters(tmp_path, tamper):
    d = tmp_path / "t"
    model, _ = record_run(d, "adamw", F64)

    def manifest(m):
        h = m["optimizer"]["hyper"][0]
        if tamper == "beta2":
            h["betas"][1] = 0.99
        elif tamper == "eps":
            h["eps"] = 1e-3

    def entry(e):
        r = e["raw"][0]
        if tamper == "lr":
            r["lr"][0] *= 1.01
        elif tamper == "weight_decay":
            r["weight_decay"][0] = 2.0

    _rewrite(d, manifest, entry)
    report = Trajectory.load(d).verify(model)
    assert report.max_moment_error > 1e3 * MOMENT_TOL[F64]


def test_checkpoint_every_matches_full_recording(tmp_path):
    k = 4
    record_run(tmp_path / "full", "adamw", F64, epochs=2)                 # 6 raw steps
    model, opt = record_run(tmp_path / "sub", "adamw", F64, epochs=2, checkpoint_every=k)
    full, sub = Trajectory.load(tmp_path / "full"), Trajectory.load(tmp_path / "sub")
    assert full.num_steps == 6 and sub.num_steps == 2 and sub.checkpoint_every == k
    # θ after raw steps 0, 4, 6 (the last interval is flushed by close())
    for s, raw in enumerate([0, 4, 6]):
        assert torch.equal(sub.theta(s), full.theta(raw))
    assert [len(sub.raw_steps(s)) for s in range(2)] == [4, 2]
    for s, start in enumerate([0, 4]):
        for j, r in enumerate(sub.raw_steps(s)):
            f = full.step(start + j)
            assert r.index == start + j and r.step_count == f.step_count
            assert r.lr == f.lr and r.clip_factor == f.clip_factor
            assert torch.equal(r.batch_indices, f.batch_indices)
            assert torch.equal(r.batch_weights, f.batch_weights)
    rec = sub.step(1)
    assert rec.batch_indices is None and rec.step_count == 6 and rec.lr == full.step(5).lr
    assert torch.equal(rec.exp_avg_sq, full.step(5).exp_avg_sq)
    last_m = full.layout.flatten([opt.state[p]["exp_avg"] for p in traj_params(model, full)])
    assert torch.equal(rec.exp_avg, last_m)
    report = sub.verify(model)
    assert report.mode == ["not-replayable"] * 2 and report.notes


def test_zero_learning_rate_step_stores_first_moment(tmp_path):
    # a warmup from lr = 0: the first update is zero and does not determine m_1
    model, _ = record_run(tmp_path / "t", "adamw", F64, warmup=True)
    traj = Trajectory.load(tmp_path / "t")
    assert traj.step(0).lr[0] == 0.0 and traj.step(0).exp_avg is not None
    assert traj.step(1).exp_avg is None
    report = traj.verify(model)
    assert report.mode[:2] == ["stored-m", "derived-m"]
    assert_verified(report, traj, F64)


def test_frozen_parameters_are_not_in_theta(tmp_path):
    model, _ = record_run(tmp_path / "t", "adamw", F64, frozen_embed=True)
    traj = Trajectory.load(tmp_path / "t")
    assert "embed.weight" not in traj.layout.names and traj.layout.D == 4 * 6 + 6 + 6 * 3 + 3
    assert_verified(traj.verify(model), traj, F64)
    X, Y = data(F64)
    assert_step_identity(traj, model, X, Y, F64)


def test_manifest_contents(tmp_path):
    record_run(tmp_path / "t", "sgd", F32, epochs=1)
    m = json.load(open(tmp_path / "t" / MANIFEST))
    assert m["format_version"] == 1 and m["dtype"] == "float32" and m["dataset_size"] == N_SAMPLES
    assert m["optimizer"]["kind"] == "sgd" and m["optimizer"]["hyper"][0]["momentum"] == 0.9
    assert m["layout"]["names"][0] == "embed.weight" and m["layout"]["group_of_tensor"][-1] == 1
    assert sorted(os.listdir(tmp_path / "t")) == sorted(
        [MANIFEST, LOG, "theta_0.safetensors"] + [f"step_{s:08d}.safetensors" for s in range(3)])


# ------------------------------------------------------------------------------------ refusals
def _setup(tmp_path, kind="adamw", **opt_kw):
    model = make_model(F64)
    opt = make_optimizer(model, kind, **opt_kw)
    return model, opt


def _one_step(model, opt, rec, idx=(0, 1, 2)):
    X, Y = data(F64)
    idx = torch.tensor(idx)
    rec.set_batch(idx)
    opt.zero_grad()
    F.cross_entropy(model(X[idx]), Y[idx]).backward()
    opt.step()


@pytest.mark.parametrize("kind,opt_kw,needle", [
    ("adamw", {"amsgrad": True}, "amsgrad"),
    ("adam", {"maximize": True}, "maximize"),
    ("sgd", {"nesterov": True, "momentum": 0.9}, "nesterov"),
    ("sgd", {"dampening": 0.1}, "dampening"),
])
def test_unsupported_settings_refused(tmp_path, kind, opt_kw, needle):
    model, opt = _setup(tmp_path, kind, **opt_kw)
    with pytest.raises(ValueError, match=needle):
        TrajectoryRecorder(model, opt, tmp_path / "t")
    assert not (tmp_path / "t").exists()


def test_unsupported_optimizer_class(tmp_path):
    model = make_model(F64)
    with pytest.raises(ValueError, match="RMSprop is not supported"):
        TrajectoryRecorder(model, torch.optim.RMSprop(model.parameters()), tmp_path / "t")


def test_optimizer_with_state_refused(tmp_path):
    model, opt = _setup(tmp_path)
    with TrajectoryRecorder(model, opt, tmp_path / "a") as rec:
        _one_step(model, opt, rec)
    with pytest.raises(ValueError, match="already holds state"):
        TrajectoryRecorder(model, opt, tmp_path / "b")


@pytest.mark.parametrize("change,needle", [
    (lambda m, o: o.param_groups[0].update(betas=(0.8, 0.98)), "hyperparameters changed"),
    (lambda m, o: o.param_groups[1].update(amsgrad=True), "amsgrad"),
    (lambda m, o: m.fc1.bias.requires_grad_(False), "trainable parameters changed"),
    (lambda m, o: o.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]}),
     "groups cannot be added"),
    (lambda m, o: m.fc1.weight.data.add_(1.0), "'fc1.weight' changed outside"),
])
def test_mid_run_changes_refused(tmp_path, change, needle):
    model, opt = _setup(tmp_path)
    rec = TrajectoryRecorder(model, opt, tmp_path / "t")
    _one_step(model, opt, rec)
    change(model, opt)
    theta = [p.detach().clone() for p in model.parameters()]
    with pytest.raises((ValueError, RuntimeError), match=needle):
        _one_step(model, opt, rec)
    # the refused step did not move the parameters
    assert all(torch.equal(a, b) for a, b in zip(theta, model.parameters()))
    assert Trajectory.load(tmp_path / "t").num_steps == 1


def test_step_without_batch_refused(tmp_path):
    # (a parameter without a gradient is no longer refused: tests/recording/test_real_runs.py)
    model, opt = _setup(tmp_path)
    TrajectoryRecorder(model, opt, tmp_path / "t")
    with pytest.raises(RuntimeError, match="set_batch"):
        opt.step()


def test_step_with_closure_refused(tmp_path):
    model, opt = _setup(tmp_path)
    rec = TrajectoryRecorder(model, opt, tmp_path / "t")
    X, Y = data(F64)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(X), Y)
        loss.backward()
        return loss
    rec.set_batch(torch.arange(N_SAMPLES))
    with pytest.raises(RuntimeError, match="closure"):
        opt.step(closure)


def test_set_batch_validation(tmp_path):
    model, opt = _setup(tmp_path)
    rec = TrajectoryRecorder(model, opt, tmp_path / "t", dataset_size=N_SAMPLES)
    with pytest.raises(TypeError, match="integers"):
        rec.set_batch(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=f"index {N_SAMPLES} is outside"):
        rec.set_batch([0, N_SAMPLES])
    with pytest.raises(ValueError, match="index -1 is outside"):
        rec.set_batch([-1, 0])
    with pytest.raises(ValueError, match="3 weights for 2 indices"):
        rec.set_batch([0, 1], weights=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="non-empty"):
        rec.set_batch([])
    rec.set_batch([3, 3, 5], weights=[1.0, 1.0, 2.0])  # duplicates (sampling with replacement)
    X, Y = data(F64)
    opt.zero_grad()
    (F.cross_entropy(model(X[[3, 3, 5]]), Y[[3, 3, 5]], reduction="none")
     * torch.tensor([1.0, 1.0, 2.0], dtype=F64)).sum().backward()
    opt.step()
    r = Trajectory.load(tmp_path / "t").step(0)
    assert r.batch_indices.tolist() == [3, 3, 5] and r.batch_weights.tolist() == [1.0, 1.0, 2.0]
    assert_step_identity(Trajectory.load(tmp_path / "t"), model, X, Y, F64)


def test_clip_grad_value(tmp_path):
    model, opt = _setup(tmp_path)
    rec = TrajectoryRecorder(model, opt, tmp_path / "t")
    X, Y = data(F64)
    rec.set_batch([0, 1])
    opt.zero_grad()
    F.cross_entropy(model(X[:2]), Y[:2]).backward()
    before = [p.grad.clone() for p in model.parameters()]
    rec.clip_grad_value_(1e6)                       # clamps nothing: exact, no change
    assert all(torch.equal(a, p.grad) for a, p in zip(before, model.parameters()))
    with pytest.raises(ValueError, match="would clamp"):
        rec.clip_grad_value_(1e-6)
    assert all(torch.equal(a, p.grad) for a, p in zip(before, model.parameters()))
    opt.step()
    assert Trajectory.load(tmp_path / "t").step(0).clip_factor == 1.0


def test_clip_grad_norm_matches_torch(tmp_path):
    model, opt = _setup(tmp_path)
    twin = make_model(F64)
    rec = TrajectoryRecorder(model, opt, tmp_path / "t")
    X, Y = data(F64)
    for m in (model, twin):
        F.cross_entropy(m(X), Y).backward()
    norm = rec.clip_grad_norm_(0.1)
    torch_norm = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.1)
    assert torch.equal(norm, torch_norm)
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(model.parameters(), twin.parameters()))
    rec.set_batch(torch.arange(N_SAMPLES))
    opt.step()
    assert Trajectory.load(tmp_path / "t").step(0).clip_factor == pytest.approx(
        0.1 / (float(norm) + 1e-6), rel=1e-15)


# torch.nn.utils.clip_grad_norm_ is now recorded (a common factor): test_real_runs.py
@pytest.mark.parametrize("edit,needle", [
    (lambda m: torch.nn.utils.clip_grad_value_(m.parameters(), 1e-3), "changed between backward"),
    (lambda m: m.fc1.bias.grad.mul_(0.5), "'fc1.bias' changed between backward"),
    (lambda m: setattr(m.fc2.bias, "grad", torch.ones_like(m.fc2.bias)),
     "'fc2.bias' changed between backward"),
])
def test_gradients_changed_outside_the_recorder_refused(tmp_path, edit, needle):
    model, opt = _setup(tmp_path)
    rec = TrajectoryRecorder(model, opt, tmp_path / "t")
    X, Y = data(F64)
    rec.set_batch([0, 1])
    opt.zero_grad()
    F.cross_entropy(model(X[:2]), Y[:2]).backward()
    edit(model)
    with pytest.raises(RuntimeError, match=needle):
        opt.step()
    assert Trajectory.load(tmp_path / "t").num_steps == 0


def test_gradients_not_from_backward_refused(tmp_path):
    model, opt = _setup(tmp_path)
    rec = TrajectoryRecorder(model, opt, tmp_path / "t")
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    rec.set_batch([0])
    with pytest.raises(RuntimeError, match="'embed.weight' was not produced by backward"):
        opt.step()


def test_gradient_accumulation(tmp_path):
    """Two backward() calls per step (micro-batches), norm clipping after both, a sum loss."""
    model, opt = _setup(tmp_path)
    X, Y = data(F64)
    with TrajectoryRecorder(model, opt, tmp_path / "t", dataset_size=N_SAMPLES) as rec:
        for s in range(3):
            idx = torch.arange(8 * s, 8 * s + 8)
            rec.set_batch(idx, weights=torch.full((8,), 0.5))   # 0.5 × (sum over 2 halves)
            opt.zero_grad()
            for half in (idx[:4], idx[4:]):
                (0.5 * F.cross_entropy(model(X[half]), Y[half], reduction="sum")).backward()
            rec.clip_grad_norm_(0.5)
            opt.step()
    traj = Trajectory.load(tmp_path / "t")
    assert traj.step(0).clip_factor < 1.0
    assert_step_identity(traj, model, X, Y, F64)


def test_indexed_loader_yields_indices():
    X, Y = data(F64)
    ds = IndexedDataset((X, Y))
    i, x, y = ds[5]
    assert i == 5 and torch.equal(x, X[5]) and y == Y[5]
    seen = []
    for idx, x, y in indexed_loader((X, Y), batch_size=5, shuffle=True,
                                    generator=torch.Generator().manual_seed(0)):
        assert torch.equal(x, X[idx]) and torch.equal(y, Y[idx])
        seen += idx.tolist()
    assert sorted(seen) == list(range(N_SAMPLES))
    (idx, _, _), = list(indexed_loader((X, Y)))   # full batch
    assert idx.tolist() == list(range(N_SAMPLES))
    with pytest.raises(ValueError, match="different first dimensions"):
        IndexedDataset((X, Y[:3]))
