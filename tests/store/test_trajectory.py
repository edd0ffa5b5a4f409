"""The trajectory store: crash safety (killed writer, partial writes), checksums, resume/refuse,
model checks and the read API."""
import copy
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import explaind_fast.store.writer as writer_module
from explaind_fast.recording import TrajectoryRecorder
from explaind_fast.store import LOG, MANIFEST, CorruptTrajectoryError, Trajectory, step_file_name
from explaind_fast.testing.models import N_SAMPLES, SmallMLP, small_data as data, \
    small_model as make_model
from explaind_fast.testing.runs import record_run, small_optimizer as make_optimizer

F64 = torch.float64
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TESTS = os.path.dirname(os.path.abspath(__file__))
MOMENT_TOL = 1e-12  # float64 verify tolerance, see test_recorder.py


def batch_of(s):
    """Deterministic batch of raw step s (so an interrupted and an uninterrupted run agree)."""
    start = (s % 3) * 8
    return torch.arange(start, start + 8)


def train_steps(model, opt, rec, first, last, snapshots=None):
    X, Y = data(F64)
    for s in range(first, last):
        idx = batch_of(s)
        rec.set_batch(idx)
        opt.zero_grad()
        F.cross_entropy(model(X[idx]), Y[idx]).backward()
        opt.step()
        if snapshots is not None:
            snapshots[s + 1] = ({k: v.clone() for k, v in model.state_dict().items()},
                                _clone_opt_state(opt))


def _clone_opt_state(opt):
    sd = opt.state_dict()
    return {"state": {k: {n: v.clone() if torch.is_tensor(v) else v for n, v in st.items()}
                      for k, st in sd["state"].items()},
            "param_groups": [dict(g) for g in sd["param_groups"]]}


def restored(snapshot, kind="adamw"):
    model = make_model(F64)
    model.load_state_dict(snapshot[0])
    opt = make_optimizer(model, kind)
    opt.load_state_dict(copy.deepcopy(snapshot[1]))   # load_state_dict may alias the tensors
    return model, opt


def uninterrupted(tmp_path, steps, kind="adamw"):
    os.makedirs(tmp_path, exist_ok=True)
    model = make_model(F64)
    opt = make_optimizer(model, kind)
    with TrajectoryRecorder(model, opt, tmp_path / "ref", dataset_size=N_SAMPLES) as rec:
        train_steps(model, opt, rec, 0, steps)
    return Trajectory.load(tmp_path / "ref")


def assert_same_trajectory(a, b, steps):
    assert a.num_steps == b.num_steps == steps
    for s in range(steps + 1):
        assert torch.equal(a.theta(s), b.theta(s)), f"θ_{s} differs"
    for s in range(steps):
        ra, rb = a.step(s), b.step(s)
        assert ra.step_count == rb.step_count and ra.lr == rb.lr
        assert torch.equal(ra.exp_avg_sq, rb.exp_avg_sq)
        assert torch.equal(ra.batch_indices, rb.batch_indices)


# ------------------------------------------------------------------------------ killed writer
CRASH_SCRIPT = """
import sys, torch, torch.nn.functional as F
from explaind_fast.testing.models import small_data as data, small_model as make_model
from explaind_fast.testing.runs import small_optimizer as make_optimizer
from explaind_fast.recording import TrajectoryRecorder
from test_trajectory import batch_of
X, Y = data(torch.float64)
model = make_model(torch.float64)
opt = make_optimizer(model, "adamw")
rec = TrajectoryRecorder(model, opt, sys.argv[1], dataset_size=len(X))
s = 0
while True:
    idx = batch_of(s)
    rec.set_batch(idx)
    opt.zero_grad()
    F.cross_entropy(model(X[idx]), Y[idx]).backward()
    opt.step()
    s += 1
    print(s, flush=True)
"""


def test_killed_writer_leaves_every_completed_step(tmp_path):
    d = tmp_path / "t"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, TESTS, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", CRASH_SCRIPT, str(d)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, text=True)
    try:
        reported = 0
        deadline = time.time() + 120
        while reported < 25 and time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            reported = int(line)
        assert reported >= 25, f"the recording subprocess failed: {proc.stderr.read()[-2000:]}"
    finally:
        proc.send_signal(signal.SIGKILL)   # mid-run: most likely inside a later step's write
        proc.wait()
    traj = Trajectory.load(d)
    n = traj.num_steps
    assert n >= reported                    # every step reported complete is there
    traj.check()
    report = traj.verify(make_model(F64))
    assert report.max_moment_error <= MOMENT_TOL
    # the stored states are those of the same run replayed here, step for step
    assert_same_trajectory(traj, uninterrupted(tmp_path, n), n)
    # resuming needs the optimizer state too ...
    model = make_model(F64)
    model.load_state_dict(traj.layout.unflatten(traj.theta(n)))
    with pytest.raises(ValueError, match="optimizer has no state"):
        TrajectoryRecorder(model, make_optimizer(model, "adamw"), d, dataset_size=N_SAMPLES,
                           resume=True)
    # ... and with the checkpoint of step n (rebuilt here by replaying the run) it continues into
    # the uninterrupted trajectory, whatever debris the kill left
    model = make_model(F64)
    opt = make_optimizer(model, "adamw")
    with TrajectoryRecorder(model, opt, tmp_path / "replay") as rec:
        train_steps(model, opt, rec, 0, n)
    with TrajectoryRecorder(model, opt, d, dataset_size=N_SAMPLES, resume=True) as rec:
        train_steps(model, opt, rec, n, n + 3)
    assert_same_trajectory(Trajectory.load(d), uninterrupted(tmp_path / "long", n + 3), n + 3)


class _Crash(Exception):
    pass


@pytest.mark.parametrize("point", ["before-rename", "before-log", "half-log-line"])
def test_crash_points_then_resume(tmp_path, monkeypatch, point):
    """A crash at each point of a step's write leaves the completed steps; resuming from the
    matching checkpoint cleans the debris and continues into the same trajectory."""
    d = tmp_path / "t"
    model = make_model(F64)
    opt = make_optimizer(model, "adamw")
    snaps = {}
    rec = TrajectoryRecorder(model, opt, d, dataset_size=N_SAMPLES)
    train_steps(model, opt, rec, 0, 3, snaps)

    real_append = writer_module.TrajectoryWriter.append
    if point == "before-rename":
        def replace(src, dst, **dir_fds):   # the writer renames relative to the directory fd
            raise _Crash()
        monkeypatch.setattr(writer_module.os, "replace", replace)
    elif point == "before-log":
        def encode(payload):
            raise _Crash()
        monkeypatch.setattr(writer_module, "encode_log_line", encode)
    else:
        def append(self, s, tensors, payload):
            real_append(self, s, tensors, payload)
            with open(os.path.join(self.directory, LOG), "r+b") as f:
                f.truncate(os.path.getsize(f.name) - 30)   # the process died mid-line
            raise _Crash()
        monkeypatch.setattr(writer_module.TrajectoryWriter, "append", append)
    with pytest.raises(_Crash):
        train_steps(model, opt, rec, 3, 4)
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="stopped after an error"):
        train_steps(model, opt, rec, 4, 5)
    debris = {"before-rename": step_file_name(3) + ".tmp", "before-log": step_file_name(3),
              "half-log-line": step_file_name(3)}[point]
    assert debris in os.listdir(d)

    traj = Trajectory.load(d)
    assert traj.num_steps == 3
    traj.check()
    assert traj.verify().max_moment_error <= MOMENT_TOL

    model2, opt2 = restored(snaps[3])
    with TrajectoryRecorder(model2, opt2, d, dataset_size=N_SAMPLES, resume=True) as rec2:
        assert rec2.num_steps == 3
        assert not any(n.endswith(".tmp") for n in os.listdir(d))
        train_steps(model2, opt2, rec2, 3, 6)
    assert_same_trajectory(Trajectory.load(d), uninterrupted(tmp_path, 6), 6)
    assert [r.index for s in range(6) for r in Trajectory.load(d).raw_steps(s)] == list(range(6))


def test_write_behind_gives_the_same_trajectory(tmp_path):
    model = make_model(F64)
    opt = make_optimizer(model, "adamw")
    with TrajectoryRecorder(model, opt, tmp_path / "t", dataset_size=N_SAMPLES,
                            write_behind=True) as rec:
        train_steps(model, opt, rec, 0, 6)
        rec.flush()
        assert Trajectory.load(tmp_path / "t").num_steps == 6
    assert_same_trajectory(Trajectory.load(tmp_path / "t"), uninterrupted(tmp_path, 6), 6)


def test_write_behind_failure_surfaces(tmp_path, monkeypatch):
    model = make_model(F64)
    opt = make_optimizer(model, "adamw")
    rec = TrajectoryRecorder(model, opt, tmp_path / "t", write_behind=True)
    train_steps(model, opt, rec, 0, 2)
    rec.flush()

    def failing(self, s, tensors, payload):
        raise OSError("disk full")
    monkeypatch.setattr(writer_module.TrajectoryWriter, "append", failing)
    train_steps(model, opt, rec, 2, 3)       # queued; fails on the worker
    with pytest.raises(RuntimeError, match="disk full"):
        rec.flush()
    with pytest.raises(RuntimeError, match="disk full"):
        train_steps(model, opt, rec, 3, 4)
    with pytest.raises(RuntimeError, match="disk full"):
        rec.close()
    assert Trajectory.load(tmp_path / "t").num_steps == 2


# ------------------------------------------------------------------------------ checksums
def _flip_byte(path, offset_from_end=20):
    with open(path, "r+b") as f:
        f.seek(-offset_from_end, os.SEEK_END)
        b = f.read(1)
        f.seek(-offset_from_end, os.SEEK_END)
        f.write(bytes([b[0] ^ 0x40]))


@pytest.fixture
def recorded(tmp_path):
    d = tmp_path / "t"
    model, _ = record_run(d, "adamw", F64)   # 6 stored steps
    return d, model


def test_truncated_tensor_file(recorded):
    d, _ = recorded
    path = d / step_file_name(2)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    traj = Trajectory.load(d)             # lazy: opening works
    assert torch.isfinite(traj.theta(2)).all()   # θ_2 lives in step file 1
    for access in (lambda: traj.theta(3), lambda: traj.step(2), lambda: traj.raw_steps(2),
                   traj.check, traj.verify):
        with pytest.raises(CorruptTrajectoryError, match=r"step_00000002\.safetensors.*stored step 2"):
            access()


def test_unchecked_access_reads_lazily_but_check_still_catches(recorded):
    d, _ = recorded
    _flip_byte(d / step_file_name(4), offset_from_end=1)   # last byte of θ_5's data region
    traj = Trajectory.load(d, check_on_access=False)
    traj.step(4)                                    # no checksum on access
    with pytest.raises(CorruptTrajectoryError, match=r"step_00000004.*stored step 4"):
        traj.check()


@pytest.mark.parametrize("target", ["step", "init"])
def test_flipped_byte_in_tensor_file(recorded, target):
    d, _ = recorded
    name = step_file_name(4) if target == "step" else "theta_0.safetensors"
    _flip_byte(d / name)
    traj = Trajectory.load(d)
    with pytest.raises(CorruptTrajectoryError,
                       match=(r"step_00000004.*stored step 4" if target == "step" else "θ_0")):
        traj.check()
    with pytest.raises(CorruptTrajectoryError, match="sha256"):
        traj.theta(5 if target == "step" else 0)


def test_missing_tensor_file(recorded):
    d, _ = recorded
    os.remove(d / step_file_name(1))
    with pytest.raises(CorruptTrajectoryError, match=r"step_00000001.*stored step 1\) is missing"):
        Trajectory.load(d).step(1)


def test_corrupted_log_line(recorded):
    d, _ = recorded
    path = d / LOG
    lines = open(path, "rb").read().split(b"\n")
    lines[1] = lines[1].replace(b'"step_count":2', b'"step_count":7')
    open(path, "wb").write(b"\n".join(lines))
    with pytest.raises(CorruptTrajectoryError, match="log line 2 .stored step 1. is corrupted"):
        Trajectory.load(d)


def test_damaged_last_log_line_is_an_incomplete_step(recorded):
    d, _ = recorded
    path = d / LOG
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[:-40] + b"\0" * 39 + b"\n")   # a power loss mid-append
    assert Trajectory.load(d).num_steps == 5


def test_truncated_last_log_line_is_an_incomplete_step(recorded):
    d, model = recorded
    path = d / LOG
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 30)
    traj = Trajectory.load(d)
    assert traj.num_steps == 5
    assert traj.verify(model).max_moment_error <= MOMENT_TOL


def test_every_truncation_of_the_log_loads_its_complete_steps(recorded):
    """A write cut short at any byte of the log leaves exactly the steps whose lines are whole."""
    d, _ = recorded
    path = d / LOG
    full = open(path, "rb").read()
    line_ends = [i + 1 for i, b in enumerate(full) if b == ord("\n")]
    # every 5th byte, and every byte next to a line end (where off-by-one errors would show)
    cuts = set(range(0, len(full) + 1, 5)) | {e + k for e in line_ends for k in (-2, -1, 0, 1)}
    for cut in sorted(c for c in cuts if 0 <= c <= len(full)):
        open(path, "wb").write(full[:cut])
        assert Trajectory.load(d).num_steps == sum(end <= cut for end in line_ends), cut


def test_tampered_manifest(recorded):
    d, _ = recorded
    m = json.load(open(d / MANIFEST))
    m["optimizer"]["hyper"][0]["betas"][1] = 0.99
    open(d / MANIFEST, "w").write(json.dumps(m))
    with pytest.raises(CorruptTrajectoryError, match="manifest does not match its checksum"):
        Trajectory.load(d)
    m["format_version"] = 99
    open(d / MANIFEST, "w").write(json.dumps(m))
    with pytest.raises(ValueError, match="format version 99"):
        Trajectory.load(d)
    open(d / MANIFEST, "w").write("{not json")
    with pytest.raises(CorruptTrajectoryError, match="not valid JSON"):
        Trajectory.load(d)
    os.remove(d / MANIFEST)
    with pytest.raises(FileNotFoundError, match="manifest.json is missing"):
        Trajectory.load(d)


# ------------------------------------------------------------------------------ wrong model
class WiderMLP(SmallMLP):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(4, 7)
        self.fc2 = torch.nn.Linear(7, 3)


def test_verify_with_wrong_model(recorded):
    d, model = recorded
    traj = Trajectory.load(d)
    with pytest.raises(ValueError, match=r"'fc1.weight': trajectory shape \(6, 4\), model shape \(7, 4\)"):
        traj.verify(WiderMLP().double())
    other = torch.nn.Sequential(torch.nn.Linear(4, 6))
    with pytest.raises(ValueError, match="'embed.weight'"):
        traj.verify(other)
    frozen = make_model(F64, frozen_embed=True)
    with pytest.raises(ValueError, match="'embed.weight'"):
        traj.verify(frozen)
    assert traj.verify(model).max_moment_error <= MOMENT_TOL


# ------------------------------------------------------------------------------ re-opening
def _snapshot_dir(d):
    return {n: open(os.path.join(d, n), "rb").read() for n in sorted(os.listdir(d))}


def test_reopen_refuses_without_resume(recorded, tmp_path):
    d, model = recorded
    before = _snapshot_dir(d)
    m2 = make_model(F64)
    with pytest.raises(FileExistsError, match="already holds a trajectory; pass resume=True"):
        TrajectoryRecorder(m2, make_optimizer(m2, "adamw"), d)
    assert _snapshot_dir(d) == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty and holds no trajectory"):
        TrajectoryRecorder(m2, make_optimizer(m2, "adamw"), other)


def test_resume_refuses_mismatches(recorded):
    d, model = recorded
    before = _snapshot_dir(d)
    fresh = make_model(F64)
    with pytest.raises(ValueError, match="not the last stored state"):
        TrajectoryRecorder(fresh, make_optimizer(fresh, "adamw"), d, dataset_size=N_SAMPLES,
                           resume=True)
    with pytest.raises(ValueError, match="optimizer kind differs"):
        TrajectoryRecorder(model, make_optimizer(model, "sgd"), d, dataset_size=N_SAMPLES,
                           resume=True)
    with pytest.raises(ValueError, match="checkpoint_every differs"):
        TrajectoryRecorder(model, make_optimizer(model, "adamw"), d, 2, dataset_size=N_SAMPLES,
                           resume=True)
    wider = WiderMLP().double()
    with pytest.raises(ValueError, match="'fc1.weight'"):
        TrajectoryRecorder(wider, make_optimizer(wider, "adamw"), d, dataset_size=N_SAMPLES,
                           resume=True)
    assert _snapshot_dir(d) == before


def test_resume_with_optimizer_state_mismatch(tmp_path):
    d = tmp_path / "t"
    model = make_model(F64)
    opt = make_optimizer(model, "adamw")
    snaps = {}
    with TrajectoryRecorder(model, opt, d, dataset_size=N_SAMPLES) as rec:
        train_steps(model, opt, rec, 0, 3, snaps)
    m, o = restored(snaps[3])
    o.state[m.fc1.weight]["exp_avg_sq"].mul_(1.5)
    with pytest.raises(ValueError, match="exp_avg_sq is not the last stored one"):
        TrajectoryRecorder(m, o, d, dataset_size=N_SAMPLES, resume=True)
    m, o = restored(snaps[2])
    with pytest.raises(ValueError, match="not the last stored state"):
        TrajectoryRecorder(m, o, d, dataset_size=N_SAMPLES, resume=True)
    m, o = restored(snaps[3])
    with pytest.raises(ValueError, match="dataset_size differs"):
        TrajectoryRecorder(m, o, d, dataset_size=N_SAMPLES + 1, resume=True)
    with TrajectoryRecorder(m, o, d, resume=True) as rec:   # dataset_size taken from the manifest
        assert rec.dataset_size == N_SAMPLES


def test_debris_of_an_interrupted_creation_is_overwritten(tmp_path):
    d = tmp_path / "t"
    d.mkdir()
    (d / "theta_0.safetensors").write_bytes(b"half")
    (d / "manifest.json.tmp").write_bytes(b"{")
    model = make_model(F64)
    opt = make_optimizer(model, "adamw")
    with TrajectoryRecorder(model, opt, d) as rec:
        train_steps(model, opt, rec, 0, 1)
    Trajectory.load(d).check()


def test_resume_on_empty_directory_starts_new(tmp_path):
    model = make_model(F64)
    opt = make_optimizer(model, "adamw")
    with TrajectoryRecorder(model, opt, tmp_path / "new", dataset_size=N_SAMPLES,
                            resume=True) as rec:
        train_steps(model, opt, rec, 0, 2)
    assert Trajectory.load(tmp_path / "new").num_steps == 2


# ------------------------------------------------------------------------------ read API
def test_read_api(recorded):
    d, model = recorded
    traj = Trajectory.load(d)
    n = traj.num_steps
    assert n == 6 and len(traj) == 6 and traj.checkpoint_every == 1
    assert traj.dataset_size == N_SAMPLES and traj.optimizer_kind == "adamw"
    assert traj.rule.kind == "adamw" and traj.hyper[1]["betas"] == [0.9, 0.98]
    assert traj.theta(0).dtype == F64 and traj.theta(0).shape == (traj.layout.D,)
    assert traj.theta(1, dtype=torch.float32).dtype == torch.float32
    assert torch.equal(traj.theta(-1), traj.theta(n))
    with pytest.raises(IndexError, match="state index 7 out of range"):
        traj.theta(n + 1)
    with pytest.raises(IndexError, match="step index 6 out of range"):
        traj.step(n)
    rec = traj.step(0)
    assert rec.index == 0 and rec.step_count == 1 and len(rec.lr) == 2
    assert rec.exp_avg_sq.shape == (traj.layout.D,) and rec.exp_avg is None
    assert rec.batch_weights.dtype == F64 and rec.batch_indices.dtype == torch.int64
    assert torch.allclose(rec.weights, rec.batch_weights * rec.clip_factor)
    (raw,) = traj.raw_steps(3)
    assert raw.index == 3 and raw.exp_avg_sq is None and torch.equal(raw.batch_indices,
                                                                     traj.step(3).batch_indices)
    assert "num_steps=6" in repr(traj)
    # every file is JSON or safetensors (no pickle): a safetensors file opens with its JSON header
    for name in os.listdir(d):
        raw_bytes = open(d / name, "rb").read()
        if name.endswith(".safetensors"):
            header_len = int.from_bytes(raw_bytes[:8], "little")
            json.loads(raw_bytes[8:8 + header_len])
        else:
            assert name in (MANIFEST, LOG)
