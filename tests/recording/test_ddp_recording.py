"""Recording a DistributedDataParallel run (explaind_fast.recording.ddp): 2 ranks, gloo, CPU.

One spawn of two processes runs every case (starting them costs most of the test's time):

* SGD-momentum and AdamW, clip_grad_norm_ after backward(), a float64 dataset of 13 samples:
  a DistributedSampler (drop_last=False: it pads 13 to 14 by repeating the first shuffled
  sample) with 4 per rank (two steps, the last uneven: 4 + 3 per rank), then with 7 per rank
  (one step holding the repeated sample twice), then local batches of different sizes (3 and
  2), then gradient accumulation (two micro-batches per rank under no_sync, ``scale=1/2``);
* the directory: rank 1 passes its own path in the SGD run (nothing may appear there) and rank
  0's in the AdamW run (rank 0 holds the lock; rank 1 must not touch it);
* resuming: the last step is recorded by a second recorder with resume=True;
* find_unused_parameters=True with a head some samples use (on one rank, on none), a
  torch.amp.GradScaler, write_behind;
* failures raised on every rank, none left waiting: rank 1 forgets set_batch; rank 1 declares
  an index outside the dataset (raised by the step); rank 0's write fails (raised at the next
  step); rank 0's directory already holds a trajectory.

Oracles, float64: the DDP trajectory equals a single-process recording over the same global
batches with weights 1/(world size × local batch) (the loss Σ_k w_k L_k over the global batch):
θ, the second moment, the clip factors to 1e-12 relative, indices and weights exactly; and it
decomposes exactly with per-sample data (``attribute(..., data="sample")``): the certificate
passes, the step identity to 1e-12 relative, the reconstruction to 1e-9 of the change.
"""
import contextlib
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

import explaind_fast as ef
from explaind_fast.recording import IndexedDataset, TrajectoryRecorder
from explaind_fast.store import Trajectory
from explaind_fast.testing.models import small_data, small_model
from explaind_fast.testing.ranks import run_ranks

F64 = torch.float64
WORLD = 2
N = 13
CLIP = 0.4


def dataset():
    X, Y = small_data()
    return X[:N], Y[:N]


def optimizer(kind, params):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.2, momentum=0.9, weight_decay=0.01)
    return torch.optim.AdamW(params, lr=0.05, weight_decay=0.1)


def local_steps(rank):
    """This rank's steps: each a list of micro-batches (index tensors) and the set_batch scale."""
    from torch.utils.data import DataLoader, DistributedSampler
    X, Y = dataset()
    data = IndexedDataset((X, Y))
    sampler = DistributedSampler(data, num_replicas=WORLD, rank=rank, shuffle=True, seed=3,
                                 drop_last=False)
    steps = []
    for epoch, bs in ((0, 4), (1, 7)):
        sampler.set_epoch(epoch)
        for idx, _, _ in DataLoader(data, batch_size=bs, sampler=sampler):
            steps.append(([idx], 1.0))
    steps.append(([torch.tensor([[0, 1, 2], [3, 4]][rank])], 1.0))               # uneven sizes
    steps.append(([torch.tensor(m) for m in [[[5, 6], [7]], [[8], [9, 10]]][rank]], 0.5))
    steps.append(steps[0])                       # recorded after resuming (the last step)
    return steps


def global_steps():
    """(indices, weights) of every step over all ranks: what DDP averages."""
    per_rank = [local_steps(r) for r in range(WORLD)]
    out = []
    for s in range(len(per_rank[0])):
        idx, w = [], []
        for r in range(WORLD):
            micro, scale = per_rank[r][s]
            for m in micro:
                idx.append(m)
                w.append(torch.full((len(m),), 1.0 / len(m), dtype=F64) * scale / WORLD)
        out.append((torch.cat(idx), torch.cat(w)))
    return out


class Gated(torch.nn.Module):
    """A head ``c`` that only samples with x[0] > 1 use (index 7 here): a batch without one
    leaves it out of the graph (under DDP with find_unused_parameters, a rank without one gets the
    average from the others; no rank with one: no gradient, the tensor is inactive)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.a = torch.nn.Linear(4, 6)
        self.b = torch.nn.Linear(6, 3)
        self.c = torch.nn.Linear(6, 3)
        self.double()

    def forward(self, x):
        h = torch.tanh(self.a(x))
        out = self.b(h)
        on = x[:, 0] > 1.0
        if bool(on.any()):
            out = out + self.c(h) * on[:, None].to(h.dtype)
        return out


GATED_STEPS = [([7, 0, 1], [2, 3]), ([4, 5], [6, 8]), ([9, 10], [7, 11, 12])]


# ---------------------------------------------------------------------------- the ranks
def _worker(rank, world, base):
    """One rank's cases (run_ranks has joined the gloo group); returns what the tests check."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    assert world == WORLD
    result = {}
    X, Y = dataset()
    for kind in ("sgd", "adamw"):
        model = small_model(seed=1 + rank)          # DDP copies rank 0's parameters
        ddp = DDP(model)
        opt = optimizer(kind, ddp.parameters())
        directory = os.path.join(base, kind)
        if kind == "sgd" and rank == 1:
            directory = os.path.join(base, "rank1_sgd")   # must stay untouched
        steps = local_steps(rank)

        def train(rec, micro, scale):
            opt.zero_grad()
            for j, idx in enumerate(micro):
                rec.set_batch(idx, scale=scale)       # this rank's samples, mean loss
                last = j == len(micro) - 1
                with (contextlib.nullcontext() if last else ddp.no_sync()):
                    (F.cross_entropy(ddp(X[idx]), Y[idx]) * scale).backward()
            torch.nn.utils.clip_grad_norm_(ddp.parameters(), CLIP)
            opt.step()

        with TrajectoryRecorder(ddp, opt, directory, dataset_size=N) as rec:
            result[kind] = {"rank": rec.rank, "world_size": rec.world_size,
                            "writes": rec.writes}
            for micro, scale in steps[:-1]:
                train(rec, micro, scale)
        # resuming (the model and optimizer are those of the last stored update)
        with TrajectoryRecorder(ddp, opt, directory, resume=True) as rec:
            train(rec, *steps[-1])
            result[kind]["num_steps"] = rec.num_steps

    # a rank that forgets set_batch: every rank raises at that step
    model = small_model()
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    rec = TrajectoryRecorder(ddp, opt, os.path.join(base, "fail"), dataset_size=N)
    try:
        if rank == 0:
            rec.set_batch([0])
        opt.zero_grad()
        F.cross_entropy(ddp(X[[rank]]), Y[[rank]]).backward()
        opt.step()
        result["missing_set_batch"] = None
    except RuntimeError as e:
        result["missing_set_batch"] = str(e)
    finally:
        rec.close()
    # find_unused_parameters, torch.amp.GradScaler, write_behind
    ddp = DDP(Gated(), find_unused_parameters=True)
    opt = torch.optim.AdamW(ddp.parameters(), lr=0.05, weight_decay=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    with TrajectoryRecorder(ddp, opt, os.path.join(base, "gated"), dataset_size=N,
                            write_behind=True) as rec:
        for step in GATED_STEPS:
            idx = step[rank]
            rec.set_batch(idx)
            opt.zero_grad()
            scaler.scale(F.cross_entropy(ddp(X[idx]), Y[idx])).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(ddp.parameters(), CLIP)
            scaler.step(opt)
            scaler.update()
    # rank 1 declares an index outside the dataset: raised by the step, on every rank
    ddp = DDP(small_model())
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    with TrajectoryRecorder(ddp, opt, os.path.join(base, "bad_index"), dataset_size=N) as rec:
        rec.set_batch([0, N + 4] if rank == 1 else [1])
        opt.zero_grad()
        F.cross_entropy(ddp(X[[rank]]), Y[[rank]]).backward()
        try:
            opt.step()
            result["bad_index"] = None
        except (RuntimeError, ValueError) as e:
            result["bad_index"] = f"{type(e).__name__}: {e}"
    # rank 0's write fails at step 0: every rank raises at the next step
    ddp = DDP(small_model())
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    rec = TrajectoryRecorder(ddp, opt, os.path.join(base, "write_fails"), dataset_size=N)
    if rank == 0:
        def broken(*args, **kwargs):
            raise OSError("disk full (test)")
        rec._writer.append = broken
    log = result["write_fails"] = []
    try:
        for s in range(3):
            rec.set_batch([rank])
            opt.zero_grad()
            F.cross_entropy(ddp(X[[rank]]), Y[[rank]]).backward()
            opt.step()
            log.append(f"step {s}")
    except RuntimeError as e:
        log.append(str(e))
    finally:
        rec.close()
    # rank 0's directory already holds a trajectory: every rank raises at construction
    try:
        ddp = DDP(small_model())
        TrajectoryRecorder(ddp, torch.optim.SGD(ddp.parameters(), lr=0.1),
                           os.path.join(base, "adamw"))
        result["exists"] = None
    except (RuntimeError, FileExistsError) as e:
        result["exists"] = f"{type(e).__name__}: {e}"
    return result


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """Both ranks' results. run_ranks reads each rank's return value from a file written before
    the process exits, so a rank that aborts while Python shuts down does not fail the run: a gloo
    worker thread can still be releasing the last all_gather's tensors then, and taking the GIL
    during interpreter finalisation aborts the process (pytorch/pytorch#190489; this test's ranks
    hit it intermittently, failing CI, when they exited by themselves under mp.spawn)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available")
    base = tmp_path_factory.mktemp("ddp")
    out = run_ranks(f"{__name__}:_worker", WORLD, (str(base),), timeout=240)
    for r, res in enumerate(out):
        assert "error" not in res, f"rank {r}: {res['error']}"
    return base, [res["value"] for res in out]


def reference(kind, directory):
    """The same run in one process: the global batch of every step, loss Σ_k w_k L_k."""
    X, Y = dataset()
    model = small_model(seed=1)
    opt = optimizer(kind, model.parameters())
    with TrajectoryRecorder(model, opt, directory, dataset_size=N) as rec:
        for idx, w in global_steps():
            rec.set_batch(idx, w)
            opt.zero_grad()
            (F.cross_entropy(model(X[idx]), Y[idx], reduction="none") * w).sum().backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            opt.step()
    return Trajectory.load(directory)


def rel(a, b):
    return float((a - b).abs().max()) / max(float(b.abs().max()), 1e-300)


def test_ranks_and_directories(ddp_runs):
    base, results = ddp_runs
    steps = len(global_steps())
    for r, res in enumerate(results):
        for kind in ("sgd", "adamw"):
            assert res[kind] == {"rank": r, "world_size": WORLD, "writes": r == 0,
                                 "num_steps": steps}
    assert not (base / "rank1_sgd").exists()          # rank 1 wrote nothing
    names = set(os.listdir(base / "adamw"))
    assert "writer.lock" not in names                 # released by rank 0's close()
    assert {n for n in names if n.startswith("step_")} == \
        {f"step_{s:08d}.safetensors" for s in range(steps)}


def test_failures_raise_on_every_rank(ddp_runs):
    _, (r0, r1) = ddp_runs
    assert "set_batch" in r1["missing_set_batch"]               # its own error
    assert "failed on rank 1" in r0["missing_set_batch"] and "set_batch" in r0["missing_set_batch"]
    assert r0["exists"].startswith("FileExistsError") and "already holds" in r0["exists"]
    assert "failed on rank 0" in r1["exists"] and "already holds" in r1["exists"]
    assert r1["bad_index"].startswith("ValueError")
    assert f"index {N + 4} is outside" in r1["bad_index"]
    assert "failed on rank 1" in r0["bad_index"] and f"index {N + 4}" in r0["bad_index"]
    # a write failing after step 0 on rank 0: raised on both ranks at step 1
    (a0, b0), (a1, b1) = r0["write_fails"], r1["write_fails"]
    assert a0 == a1 == "step 0"
    assert "stopped after an error" in b0 and "disk full" in b0
    assert "failed on rank 0" in b1 and "disk full" in b1
    assert "failed on rank 0" in r1["exists"] and "already holds" in r1["exists"]


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_equals_single_process_recording(ddp_runs, tmp_path, kind):
    base, _ = ddp_runs
    traj = Trajectory.load(base / kind)
    ref = reference(kind, tmp_path / "ref")
    assert traj.num_steps == ref.num_steps == len(global_steps())
    assert traj.optimizer_kind == ref.optimizer_kind and traj.hyper == ref.hyper
    assert torch.equal(traj.theta(0), ref.theta(0))
    clips = []
    for s in range(traj.num_steps):
        a, b = traj.step(s), ref.step(s)
        assert torch.equal(a.batch_indices, b.batch_indices)
        torch.testing.assert_close(a.batch_weights, b.batch_weights, rtol=1e-15, atol=0)
        assert a.lr == b.lr and a.weight_decay == b.weight_decay
        assert a.clip_factor == pytest.approx(b.clip_factor, rel=1e-12, abs=0)
        clips.append(a.clip_factor)
        assert rel(traj.theta(s + 1), ref.theta(s + 1)) <= 1e-12
        if kind == "adamw":
            assert rel(a.exp_avg_sq, b.exp_avg_sq) <= 1e-12
    assert min(clips) < 1.0                               # clipping happened and was recorded
    assert traj.dataset_size == N
    # the padded repeat, inside one step, with two entries and their own weights
    idx = traj.step(2).batch_indices
    assert len(idx) == 14 and len(torch.unique(idx)) == 13
    # uneven local batches: 1/(2·3) and 1/(2·2)
    torch.testing.assert_close(traj.step(3).batch_weights,
                               torch.tensor([1 / 6] * 3 + [1 / 4] * 2, dtype=F64))
    report = traj.verify(small_model())
    assert max(report.theta_error) <= 1e-12 * float(traj.theta(traj.num_steps).abs().max())


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_decomposes_exactly_per_sample(ddp_runs, kind):
    base, _ = ddp_runs
    traj = Trajectory.load(base / kind)
    X, Y = dataset()
    Xt, Yt = small_data(seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ef.AttributionWarning)
        a = ef.attribute(small_model(), traj, Xt[:4], test_targets=Yt[:4], output="loss",
                         data="sample", train_data=(X, Y), quadrature="gauss-legendre:8",
                         progress=False)
    assert a.certificate["problems"] == []
    assert float(a.step_identity.max()) < 1e-12, a.step_identity
    change = float((a.final - a.initial).abs().max())
    assert change > 1e-4
    assert a.reconstruction_error <= 1e-9 * change


def test_detection_without_a_process_group():
    from explaind_fast.recording.ddp import resolve
    model = small_model()
    assert resolve(model, None, None) == (model, None)        # one process: as before
    with pytest.raises(RuntimeError, match="not initialised"):
        resolve(model, True, None)
    with pytest.raises(TypeError):
        resolve(model, "yes", None)


def test_unused_parameters_and_grad_scaler(ddp_runs):
    """A head used on one rank only (DDP writes the average into the other rank's gradient), on
    no rank (inactive: no update, no decay), scaled by a GradScaler and clipped: recorded
    exactly."""
    base, _ = ddp_runs
    traj = Trajectory.load(base / "gated")
    c = [i for i, n in enumerate(traj.layout.names) if n.startswith("c.")]
    assert [list(traj.step(s).inactive) for s in range(3)] == [[], c, []]
    assert all(0 < traj.step(s).clip_factor < 1 for s in range(3))
    X, Y = dataset()
    Xt, Yt = X[[7, 1, 2]], Y[[7, 1, 2]]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ef.AttributionWarning)
        a = ef.attribute(Gated(), traj, Xt, test_targets=Yt, output="loss", data="sample",
                         train_data=(X, Y), quadrature="gauss-legendre:8", progress=False)
    assert a.certificate["problems"] == []
    assert float(a.step_identity.max()) < 1e-12, a.step_identity
    change = float((a.final - a.initial).abs().max())
    assert a.reconstruction_error <= 1e-9 * change
