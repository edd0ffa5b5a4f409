"""One recorder per trajectory directory: the writer lock (explaind_fast.store.writer).

A second recorder, in this process or another, refuses at construction with
TrajectoryLockedError and leaves the directory untouched; the lock is released by close(), by a
failure that stops the recorder, by a failed construction, and by the kernel when the holder is
killed (then resume=True continues the trajectory); recorders racing to create one directory end
with exactly one trajectory, written by exactly one of them (before the lock, two racing
recorders could both report success and leave a corrupt directory)."""
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
from explaind_fast.store import LOCK_FILE, Trajectory, TrajectoryLockedError
from explaind_fast.testing.models import N_SAMPLES, small_data as data, small_model as make_model
from explaind_fast.testing.runs import small_optimizer as make_optimizer

F64 = torch.float64
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def fresh():
    model = make_model(F64)
    return model, make_optimizer(model, "adamw")


def steps(model, opt, rec, n):
    X, Y = data(F64)
    for s in range(n):
        idx = torch.arange(8 * (s % 3), 8 * (s % 3) + 8)
        rec.set_batch(idx)
        opt.zero_grad()
        F.cross_entropy(model(X[idx]), Y[idx]).backward()
        opt.step()


def contents(d):
    return {n: open(os.path.join(d, n), "rb").read() for n in sorted(os.listdir(d))}


def test_second_recorder_in_this_process_is_refused(tmp_path):
    d = tmp_path / "t"
    model, opt = fresh()
    rec = TrajectoryRecorder(model, opt, d, dataset_size=N_SAMPLES, fsync=False)
    steps(model, opt, rec, 2)
    before = contents(d)
    for resume in (False, True):
        m2, o2 = fresh()
        with pytest.raises(TrajectoryLockedError,
                           match=rf"being written by another recorder \(process {os.getpid()} "
                                 rf"holds writer\.lock\)"):
            TrajectoryRecorder(m2, o2, d, resume=resume)
    assert contents(d) == before
    rec.close()
    assert LOCK_FILE not in os.listdir(d)
    with TrajectoryRecorder(model, opt, d, resume=True, fsync=False) as rec:   # free again
        steps(model, opt, rec, 1)
    Trajectory.load(d).verify(model)


def test_write_behind_holds_the_lock_until_its_queue_is_written(tmp_path):
    d = tmp_path / "t"
    model, opt = fresh()
    rec = TrajectoryRecorder(model, opt, d, fsync=False, write_behind=True)
    steps(model, opt, rec, 3)
    with pytest.raises(TrajectoryLockedError):
        TrajectoryRecorder(*fresh(), d, resume=True)
    rec.close()
    assert Trajectory.load(d).num_steps == 3
    with TrajectoryRecorder(model, opt, d, resume=True, fsync=False) as rec:
        steps(model, opt, rec, 1)


def test_failed_construction_and_failed_step_release_the_lock(tmp_path, monkeypatch):
    d = tmp_path / "t"
    model, opt = fresh()
    with TrajectoryRecorder(model, opt, d, fsync=False) as rec:
        steps(model, opt, rec, 2)
    m2, o2 = fresh()
    with pytest.raises(ValueError, match="not the last stored state"):
        TrajectoryRecorder(m2, o2, d, resume=True)
    assert LOCK_FILE not in os.listdir(d)
    rec = TrajectoryRecorder(model, opt, d, resume=True, fsync=False)

    def failing(self, s, tensors, payload):
        raise OSError("disk full")
    monkeypatch.setattr(writer_module.TrajectoryWriter, "append", failing)
    with pytest.raises(OSError, match="disk full"):
        steps(model, opt, rec, 1)
    monkeypatch.undo()
    assert LOCK_FILE not in os.listdir(d)          # the stopped recorder let go: a new one gets
    with pytest.raises(ValueError, match="not the last stored state"):   # past the lock
        TrajectoryRecorder(model, opt, d, resume=True)
    # a directory created by a refused recorder is not left behind
    empty = tmp_path / "never"
    with pytest.raises(ValueError, match="already holds state"):
        TrajectoryRecorder(model, opt, empty)
    assert not empty.exists()


HOLDER = r"""
import os, sys, time, torch
import torch.nn.functional as F
from explaind_fast.recording import TrajectoryRecorder
from explaind_fast.store import TrajectoryLockedError
from explaind_fast.testing.models import N_SAMPLES, small_data, small_model
from explaind_fast.testing.runs import small_optimizer
mode, d = sys.argv[1], sys.argv[2]
model = small_model(torch.float64)
opt = small_optimizer(model, "adamw")
X, Y = small_data(torch.float64)
if mode == "race":
    print("waiting", flush=True)
    while not os.path.exists(sys.argv[3]):
        time.sleep(0.001)
try:
    rec = TrajectoryRecorder(model, opt, d, dataset_size=N_SAMPLES)
except (TrajectoryLockedError, FileExistsError) as e:
    print(type(e).__name__, flush=True)
    sys.exit(0)
for s in range(4):
    idx = torch.arange(8 * (s % 3), 8 * (s % 3) + 8)
    rec.set_batch(idx)
    opt.zero_grad()
    F.cross_entropy(model(X[idx]), Y[idx]).backward()
    opt.step()
if mode == "hold":
    print("ready", flush=True)
    time.sleep(600)
rec.close()
print("OK", flush=True)
"""


def _spawn(*args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, "-c", HOLDER, *map(str, args)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _line(proc, timeout=120):
    deadline = time.time() + timeout
    line = proc.stdout.readline()
    assert line and time.time() < deadline, proc.stderr.read()[-2000:]
    return line.strip()


def test_another_process_is_refused_and_a_killed_holder_is_recovered(tmp_path):
    d = tmp_path / "t"
    holder = _spawn("hold", d)
    try:
        assert _line(holder) == "ready"            # 4 steps recorded, the lock held
        before = contents(d)
        model, opt = fresh()
        with pytest.raises(TrajectoryLockedError, match=rf"process {holder.pid} holds"):
            TrajectoryRecorder(model, opt, d, dataset_size=N_SAMPLES, resume=True)
        assert contents(d) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert LOCK_FILE in os.listdir(d)              # left behind by the killed holder ...
    traj = Trajectory.load(d)
    assert traj.num_steps == 4
    # ... and recovered: resume from the checkpoint of the last stored update (replayed here)
    model, opt = fresh()
    with TrajectoryRecorder(model, opt, tmp_path / "replay", fsync=False) as rec:
        steps(model, opt, rec, 4)
    with TrajectoryRecorder(model, opt, d, dataset_size=N_SAMPLES, resume=True) as rec:
        steps(model, opt, rec, 2)
    traj = Trajectory.load(d)
    assert traj.num_steps == 6 and LOCK_FILE not in os.listdir(d)
    traj.verify(model)


def test_racing_recorders_leave_one_trajectory(tmp_path):
    d, go = tmp_path / "t", tmp_path / "go"
    procs = [_spawn("race", d, go) for _ in range(2)]
    try:
        for p in procs:
            assert _line(p) == "waiting"
        go.touch()
        results = sorted(_line(p) for p in procs)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert results.count("OK") == 1, results
    assert set(results) <= {"OK", "TrajectoryLockedError", "FileExistsError"}, results
    traj = Trajectory.load(d)
    traj.check()
    assert traj.num_steps == 4 and [r.index for s in range(4) for r in traj.raw_steps(s)] == \
        [0, 1, 2, 3]
    traj.verify(make_model(F64))
