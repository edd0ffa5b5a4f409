"""The model's buffers are recorded, and attribute() evaluates with them.

Oracle: the trained module itself. A freshly built module (other initial weights, default
BatchNorm statistics) given to attribute() must give the same numbers as the trained one (its
current weights and buffers are not used: bit-identical here, both evaluate the same function of
the same stored θ), and the decomposition of that function must be exact (reconstruction ≤ 1e-9
of the change; per-sample data also passes the step identity).
"""
import os
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import explaind_fast as ef
from explaind_fast.recording import TrajectoryRecorder
from explaind_fast.store import LOG, Trajectory
from explaind_fast.testing.models import N_SAMPLES, small_data

F64 = torch.float64


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)
        self.register_buffer("mask", torch.tensor([1.0, 1.0, 0.5]))   # a constant buffer

    def forward(self, x):
        return self.fc2(torch.tanh(self.bn(self.fc1(x)))) * self.mask


def _batches(n=5):
    g = torch.Generator().manual_seed(3)
    return [torch.randperm(N_SAMPLES, generator=g)[:8] for _ in range(n)]


def _record(d, train_mode_bn: bool, seed=0):
    X, Y = small_data(F64)
    torch.manual_seed(seed)
    model = BNNet().to(F64)
    if not train_mode_bn:        # trained statistics loaded, the layer frozen in eval mode
        with torch.no_grad():
            model.bn.running_mean.uniform_(-0.5, 0.5)
            model.bn.running_var.uniform_(0.5, 2.0)
    opt = torch.optim.AdamW(model.parameters(), lr=0.03, weight_decay=0.1)
    with TrajectoryRecorder(model, opt, d, dataset_size=N_SAMPLES, fsync=False) as rec:
        for idx in _batches():
            model.train()
            if not train_mode_bn:
                model.bn.eval()
            rec.set_batch(idx)
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), Y[idx]).backward()
            opt.step()
    return model.eval(), Trajectory.load(d)


def _attr(model, traj, **kw):
    X, Y = small_data(F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ef.AttributionWarning)
        return ef.attribute(model, traj, X[:6], test_targets=Y[:6], output="loss", progress=False,
                            quadrature="gauss-legendre:8", train_data=(X, Y), **kw)


def _fresh():
    torch.manual_seed(123)
    return BNNet().to(F64).eval()


@pytest.mark.parametrize("train_mode_bn", [True, False], ids=["bn-train", "bn-eval"])
def test_fresh_module_gives_the_trained_numbers(tmp_path, train_mode_bn):
    model, traj = _record(tmp_path / "t", train_mode_bn)
    assert traj.buffer_names == ("mask", "bn.running_mean", "bn.running_var",
                                 "bn.num_batches_tracked")
    final = traj.buffers()
    for name, b in model.named_buffers():
        assert torch.equal(final[name], b), name
    if train_mode_bn:
        assert traj.buffers_changed == ("bn.running_mean", "bn.running_var",
                                        "bn.num_batches_tracked")
        assert not torch.equal(traj.buffers(0)["bn.running_mean"], final["bn.running_mean"])
    else:
        assert traj.buffers_changed == ()
    # data="all" is exact for any fixed function; per-sample data needs the training forward
    # (BatchNorm in train mode used batch statistics: only "all" then)
    datas = ["all"] if train_mode_bn else ["all", "sample"]
    for data in datas:
        trained = _attr(model, traj, data=data, steps="each", params="module")
        fresh = _attr(_fresh(), traj, data=data, steps="each", params="module")
        for a in (trained, fresh):
            change = float((a.final - a.initial).abs().max())
            assert a.reconstruction_error <= 1e-9 * change
        assert torch.equal(trained.kernel, fresh.kernel) and torch.equal(trained.final, fresh.final)
        assert torch.equal(trained.initial, fresh.initial)
        with torch.no_grad():
            X, Y = small_data(F64)
            want = F.cross_entropy(model(X[:6]), Y[:6], reduction="none")
        assert torch.allclose(fresh.final, want, rtol=0, atol=1e-13)
        assert "differ" not in trained.plan["buffers"]
        assert "'bn.running_mean'" in fresh.plan["buffers"] and "differ" in fresh.plan["buffers"]
        if train_mode_bn:
            assert "changed during training" in fresh.plan["buffers"]


def test_without_recorded_buffers_the_model_is_used(tmp_path):
    """A trajectory recorded without buffers (record_buffers=False, or written before buffers
    were stored) evaluates the given model's own buffers: a fresh module then decomposes another
    function, which is why buffers are recorded."""
    X, Y = small_data(F64)
    torch.manual_seed(0)
    model = BNNet().to(F64)
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
    model.eval()
    opt = torch.optim.AdamW(model.parameters(), lr=0.03)
    with TrajectoryRecorder(model, opt, tmp_path / "t", fsync=False, record_buffers=False) as rec:
        for idx in _batches(3):
            rec.set_batch(idx)
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), Y[idx]).backward()
            opt.step()
    traj = Trajectory.load(tmp_path / "t")
    assert traj.buffer_names == () and traj.buffers() == {}
    a = _attr(_fresh(), traj, data="all")
    assert a.plan["buffers"].startswith("the model's own")
    b = _attr(model, traj, data="all")
    assert not torch.allclose(a.final, b.final)


def test_killed_run_keeps_the_buffers_of_its_last_stored_step(tmp_path):
    """Buffers are stored with every stored update after which they changed, so a run killed
    after update k has the buffers that go with θ_{k+1}."""
    d = tmp_path / "t"
    X, Y = small_data(F64)
    torch.manual_seed(0)
    model = BNNet().to(F64)
    opt = torch.optim.AdamW(model.parameters(), lr=0.03)
    seen = []
    with TrajectoryRecorder(model, opt, d, dataset_size=N_SAMPLES, fsync=False) as rec:
        for idx in _batches(4):
            rec.set_batch(idx)
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), Y[idx]).backward()
            opt.step()
            seen.append({k: v.clone() for k, v in model.named_buffers()})
    lines = open(os.path.join(d, LOG)).read().splitlines(keepends=True)
    open(os.path.join(d, LOG), "w").write("".join(lines[:2]) + lines[2][:10])   # killed mid-line
    traj = Trajectory.load(d)
    assert traj.num_steps == 2
    for s in (1, 2):
        got = traj.buffers(s)
        assert all(torch.equal(got[k], seen[s - 1][k]) for k in got)
    assert all(torch.equal(traj.buffers()[k], seen[1][k]) for k in seen[1])
