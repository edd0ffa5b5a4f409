"""The optional fields of real runs: inactive tensors, per-tensor step counts, the model's buffers.

Log (per raw step): ``inactive`` (layout indices of the tensors without a gradient, strictly
increasing), ``tensor_step_counts`` (Adam-type, one per tensor, 0..step_count); per stored step:
``buffers_changed`` (names of the buffers stored in that step's file). Manifest: ``model_buffers``
(names, shapes, dtypes), their initial values in θ_0's file as ``model_buffer.<name>``. Each field
is validated at load (CorruptTrajectoryError naming file, line and field) and checked against the
manifest; verify() replays the per-tensor counters. Trajectories without these fields (all tensors
active, one step count, no buffers) load exactly as before.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from explaind_fast.recording import TrajectoryRecorder
from explaind_fast.store import CorruptTrajectoryError, Trajectory
from explaind_fast.testing.models import N_SAMPLES, small_data
from explaind_fast.testing.runs import record_run

from store_tamper import (read_entries, read_manifest, rewrite_tensors, same_value, snapshot,
                          write_entries, write_manifest)

F64 = torch.float64


class Net(nn.Module):
    """An unused table (never a gradient) and a BatchNorm in eval mode (constant buffers)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)
        self.unused = nn.Parameter(torch.zeros(2, 2))

    def forward(self, x):
        return self.fc2(torch.tanh(self.bn(self.fc1(x))))


def _record(d, kind="adam"):
    X, Y = small_data(F64)
    torch.manual_seed(0)
    model = Net().to(F64)
    model.bn.train()                      # running statistics change: buffers_changed
    opt = torch.optim.Adam(model.parameters(), lr=0.02, weight_decay=0.1) if kind == "adam" \
        else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with TrajectoryRecorder(model, opt, d, dataset_size=N_SAMPLES, fsync=False) as rec:
        for s in range(3):
            idx = torch.arange(6 * s, 6 * s + 6)
            rec.set_batch(idx)
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), Y[idx]).backward()
            opt.step()
    return model


@pytest.fixture
def adam_dir(tmp_path):
    d = tmp_path / "t"
    _record(d)
    return d


def test_fields_as_recorded(adam_dir):
    traj = Trajectory.load(adam_dir)
    u = traj.layout.names.index("unused")
    for s in range(3):
        r = traj.step(s)
        assert list(r.inactive) == [u] and r.tensor_step_counts[u] == 0
        assert [c for i, c in enumerate(r.tensor_step_counts) if i != u] == [s + 1] * 6
    assert traj.buffers_changed == ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked")
    assert read_entries(adam_dir)[0]["buffers_changed"] == list(traj.buffers_changed)
    assert read_manifest(adam_dir)["model_buffers"]["dtypes"] == ["float64", "float64", "int64"]
    traj.verify()


LOG_EDITS = [
    (lambda e: e["raw"][0].update(inactive=[99]), r"raw\[0\]\.inactive", "outside the layout"),
    (lambda e: e["raw"][0].update(inactive=[3, 1]), r"raw\[0\]\.inactive\[1\]", "expected an integer"),
    (lambda e: e["raw"][0].update(inactive="x"), r"raw\[0\]\.inactive", "expected a list"),
    (lambda e: e["raw"][0].update(tensor_step_counts=[1, 1]), r"raw\[0\]\.tensor_step_counts",
     "expected 7 entries"),
    (lambda e: e["raw"][0].update(tensor_step_counts=[0, 9, 1, 1, 1, 1, 1]),
     r"raw\[0\]\.tensor_step_counts\[1\]", r"in \[0, 1\]"),
    (lambda e: e.update(buffers_changed=["bn.weight"]), r"buffers_changed\[0\]",
     "not in the manifest's buffers"),
    (lambda e: e.update(buffers_changed=[]), r"buffers_changed", "at least 1"),
    (lambda e: e.update(buffers_changed=["bn.running_var", "bn.running_var"]), r"buffers_changed",
     "not unique"),
]


@pytest.mark.parametrize("edit,field,what", LOG_EDITS)
def test_malformed_fields_name_line_and_field(adam_dir, edit, field, what):
    entries = read_entries(adam_dir)
    edit(entries[0])
    write_entries(adam_dir, entries)
    with pytest.raises(CorruptTrajectoryError, match=rf"line 1 \(stored step 0\): field '{field}'"
                       rf".*{what}"):
        Trajectory.load(adam_dir)


def test_buffers_listed_but_not_stored_or_stored_but_not_listed(adam_dir):
    entries = read_entries(adam_dir)
    entries[1]["buffers_changed"] = ["bn.running_mean"]          # the file holds all three
    write_entries(adam_dir, entries)
    with pytest.raises(CorruptTrajectoryError, match="model_buffer.bn.num_batches_tracked'.*not "
                       "expected"):
        Trajectory.load(adam_dir).check()
    entries[1]["buffers_changed"] = ["bn.running_mean", "bn.running_var",
                                     "bn.num_batches_tracked"]
    write_entries(adam_dir, entries)
    rewrite_tensors(adam_dir, 1, lambda t: t.pop("model_buffer.bn.running_var"))
    with pytest.raises(CorruptTrajectoryError, match="model_buffer.bn.running_var.*missing"):
        Trajectory.load(adam_dir).buffers(2)         # the values after stored step 1
    rewrite_tensors(adam_dir, None, lambda t: t.update(
        {"model_buffer.bn.running_mean": torch.zeros(7, dtype=F64)}))
    with pytest.raises(CorruptTrajectoryError, match=r"model_buffer.bn.running_mean.*shape \[5\]"):
        Trajectory.load(adam_dir).buffers(0)


@pytest.mark.parametrize("edit,field", [
    (lambda b: b.update(dtypes=["float64", "complex64", "int64"]), r"model_buffers\.dtypes\[1\]"),
    (lambda b: b.update(names=["a", "a", "b"]), r"model_buffers\.names"),
    (lambda b: b["shapes"].pop(), r"model_buffers\.shapes"),
])
def test_malformed_manifest_buffers(adam_dir, edit, field):
    m = read_manifest(adam_dir)
    edit(m["model_buffers"])
    write_manifest(adam_dir, m)
    with pytest.raises(CorruptTrajectoryError, match=f"field '{field}'"):
        Trajectory.load(adam_dir)


def test_verify_replays_per_tensor_counts(adam_dir):
    entries = read_entries(adam_dir)
    u = read_manifest(adam_dir)["layout"]["names"].index("unused")
    entries[2]["raw"][0]["tensor_step_counts"][u] = 1      # in range, but it never stepped
    write_entries(adam_dir, entries)
    with pytest.raises(ValueError, match=r"stored step 2: .*step count 1 for tensor 'unused', "
                                         r"expected 0"):
        Trajectory.load(adam_dir).verify()


def test_sgd_has_no_tensor_step_counts(tmp_path):
    d = tmp_path / "t"
    _record(d, "sgd")
    traj = Trajectory.load(d)
    assert traj.step(0).tensor_step_counts is None and len(traj.step(0).inactive) == 1
    traj.verify()
    entries = read_entries(d)
    entries[0]["raw"][0]["tensor_step_counts"] = [1] * 7
    write_entries(d, entries)
    with pytest.raises(CorruptTrajectoryError, match="tensor_step_counts'.*not expected"):
        Trajectory.load(d)


def test_trajectory_without_the_new_fields_loads_as_before(tmp_path):
    """What an earlier recorder wrote: no model_buffers, no inactive / tensor_step_counts /
    buffers_changed. Same numbers, every tensor active, no buffers."""
    d = tmp_path / "t"
    model, _ = record_run(d, "adamw", F64, fsync=False)
    before = snapshot(Trajectory.load(d))
    m = read_manifest(d)
    assert m["model_buffers"] == {"names": [], "shapes": [], "dtypes": []}
    del m["model_buffers"]
    write_manifest(d, m)
    entries = read_entries(d)
    assert all("inactive" not in r and "tensor_step_counts" not in r
               for e in entries for r in e["raw"]) and all("buffers_changed" not in e
                                                          for e in entries)
    traj = Trajectory.load(d)
    assert same_value(snapshot(traj), before)
    assert traj.buffer_names == () and traj.buffers() == {} and traj.buffers_changed == ()
    assert all(traj.step(s).inactive == () and traj.step(s).tensor_step_counts is None
               for s in range(traj.num_steps))
    traj.verify(model)
