"""Run a function on W local ranks of a torch.distributed gloo group (the tests and the scaling
bench of :mod:`explaind_fast.attribution.distributed`), and compare two Attributions.

    run_ranks("pkg.module:function", world, args, timeout=...) -> [rank 0's value, rank 1's, …]

Each rank is a fresh process (torch.multiprocessing, spawn) that joins a gloo process group on a
FileStore in a temporary folder (no port to pick), sets its thread count (``threads``), calls
``function(rank, world, *args)`` and sends back its return value (torch.save) or its error text
({"error": "Type: message"}). The whole run is killed after ``timeout`` seconds: a hang fails the
caller instead of the CI job. ``pg_timeout`` is the process group's own timeout (how long a
collective waits for a rank that died).
"""
from __future__ import annotations

import datetime
import importlib
import os
import tempfile
import time
from typing import Optional

import torch


def _entry(rank, target, world, store_path, out_dir, args, pg_timeout, threads):
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
    import torch.distributed as dist
    out = {}
    try:
        store = dist.FileStore(store_path, world)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=pg_timeout))
        module, name = target.split(":")
        fn = getattr(importlib.import_module(module), name)
        out = {"value": fn(rank, world, *args)}
    except BaseException as e:                     # noqa: BLE001 — reported to the parent
        out = {"error": f"{type(e).__name__}: {e}"}
    finally:
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        try:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.barrier()                     # nobody tears the group down under another
                dist.destroy_process_group()
        except Exception:                          # noqa: BLE001
            pass


def run_ranks(target: str, world: int, args=(), *, timeout: float = 300, pg_timeout: float = 60,
              threads: Optional[int] = 1) -> list:
    """[what each rank returned, or {"error": text}] (module docstring)."""
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory(prefix="explaind_ranks_") as tmp:
        store = os.path.join(tmp, "store")
        ctx = mp.start_processes(_entry, args=(target, world, store, tmp, tuple(args), pg_timeout,
                                               threads),
                                 nprocs=world, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        try:            # poll (ctx.join would kill the other ranks when one exits with an error)
            while any(p.is_alive() for p in ctx.processes):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"run_ranks({target!r}, {world}): no result after "
                                       f"{timeout} s")
                time.sleep(0.05)
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
        out = []
        for r in range(world):
            path = os.path.join(tmp, f"rank{r}.pt")
            out.append(torch.load(path, weights_only=False) if os.path.exists(path)
                       else {"error": "no result (the process died)"})
        return out


def differences(a, b) -> dict:
    """How far Attribution ``a`` is from ``b``: max |difference| of each tensor over b's max |·|
    (relative to the tensor's scale; step_identity and the residuals are rounding-level numbers,
    compared absolutely against the output scale), and whether the rest is equal."""
    def rel(x, y, scale=None):
        x, y = x.double(), y.double()
        if x.shape != y.shape:
            return float("inf")
        if x.numel() == 0:
            return 0.0
        both_nan = torch.isnan(x) & torch.isnan(y)
        d = torch.where(both_nan, torch.zeros_like(x), (x - y).abs())
        s = scale if scale is not None else float(y.abs().nan_to_num().max())
        return float(d.nan_to_num(float("inf")).max()) / max(s, 1e-300)
    out_scale = max(float(b.initial.abs().max()), float(b.final.abs().max()))
    d = {"kernel": rel(a.kernel, b.kernel), "reg": rel(a.reg, b.reg),
         "initial": rel(a.initial, b.initial), "final": rel(a.final, b.final),
         "step_residual": rel(a.step_residual, b.step_residual, out_scale),
         "step_identity": rel(a.step_identity, b.step_identity, 1.0)}
    d["evaluations_equal"] = all(torch.equal(a.evaluations[k], b.evaluations[k])
                                 for k in b.evaluations)
    d["plan_equal"] = a.plan == b.plan
    d["dims_equal"] = a.dims == b.dims and a.axes == b.axes
    d["quadrature_equal"] = a.quadrature == b.quadrature
    d["credit_equal"] = a.credit == b.credit
    ca, cb = dict(a.certificate), dict(b.certificate)
    d["certificate_problems_equal"] = ca.get("problems") == cb.get("problems")
    d["certificate_scale"] = abs(ca.get("reconstruction_scale", 0.0) -
                                 cb.get("reconstruction_scale", 0.0)) / max(
        abs(cb.get("reconstruction_scale", 0.0)), 1e-300)
    return d


# ------------------------------------------------------------------------------ test scenarios
_RUNS = {}


def tiny_run(act: str = "tanh", steps: int = 4):
    """The engine tests' TinyMLP run (float64, AdamW, two param groups, clipping), replayed into a
    MemoryTrajectory: the same numbers in every rank."""
    key = (act, steps)
    if key not in _RUNS:
        from .runs import tiny_mlp_run
        _RUNS[key] = tiny_mlp_run(act=act, steps=steps, record="memory")
    return _RUNS[key]


class _FailingTrajectory:
    """A trajectory whose θ read raises at step ``at`` (an I/O error on one rank), or whose
    process dies there (``die``)."""

    def __init__(self, traj, at: int, die: bool = False):
        self._traj, self._at, self._die = traj, at, die

    def __getattr__(self, name):
        return getattr(self._traj, name)

    def theta(self, s, *a, **kw):
        if s == self._at:
            if self._die:
                os._exit(3)
            raise OSError(f"injected read failure of theta {s}")
        return self._traj.theta(s, *a, **kw)


def compare_cases(rank: int, world: int, cases) -> dict:
    """For each case {"name", "act", "kw", "gather_to" (default 0), "fail_rank" (None)}: every rank
    calls attribute(**kw) under the process group; the receiving rank(s) also run it with
    distributed=False and return :func:`differences` (others: whether they got None). A case with
    "fail_rank" makes that rank's trajectory fail and returns the error every rank raised; one
    with "bad" expects a ValueError (an argument error) and returns its text; "die" makes the
    failing rank's process exit there instead; "env" sets environment variables for the call."""
    import torch.nn.functional as F

    from ..attribution import DistributedAttributionError, attribute
    out = {}
    for case in cases:
        model, traj, (Xtr, Ytr), Xte, Yte, _ = tiny_run(case.get("act", "tanh"),
                                                       case.get("steps", 4))
        kw = dict(test_targets=Yte, train_data=(Xtr, Ytr), progress=False,
                  loss_fn=lambda o, y: F.cross_entropy(o, y, reduction="none"))
        kw.update(case.get("kw", {}))
        gather_to = case.get("gather_to", 0)
        fail = case.get("fail_rank")
        t = _FailingTrajectory(traj, at=2, die=case.get("die", False)) if fail == rank else traj
        t0 = time.monotonic()
        saved = {k: os.environ.get(k) for k in case.get("env", {})}
        os.environ.update(case.get("env", {}))
        try:
            got = attribute(model, t, Xte, gather_to=gather_to, **kw)
        except ValueError as e:
            if not case.get("bad"):
                raise
            out[case["name"]] = {"plain_error": f"{type(e).__name__}: {e}"}
            continue
        except DistributedAttributionError as e:
            out[case["name"]] = {"error": str(e), "failed": sorted(e.failed),
                                 "seconds": time.monotonic() - t0}
            continue
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        if fail is not None:
            out[case["name"]] = {"error": None}
            continue
        if got is None:
            out[case["name"]] = {"none": True}
            continue
        want = attribute(model, traj, Xte, distributed=False, **kw)
        d = differences(got, want)
        d["split"] = got.distributed["split"]
        out[case["name"]] = d
    return out


# ------------------------------------------------------------------------------ the scaling bench
def timed_attribute(rank: int, world: int, job: dict) -> dict:
    """One timed attribute() call on every rank (bench/bench_distributed.py).

    job: {"model": ("module:Class", kwargs), "dtype": "float64", "trajectory": directory,
    "data": path of a torch.save'd {"test_inputs", "test_targets", "train_data"}, "kw": attribute
    keyword arguments}. The model is rebuilt (its weights are not used), the trajectory loaded,
    one warm-up call on the first test sample (lazy imports, first-call costs), the ranks meet at
    a barrier, then the call is measured (wall, CPU, peak RSS above the RSS
    before it: :class:`explaind_fast.testing.benchmark.track_peak`). Returns the measurement and,
    on the receiving rank, the reconstruction error and split."""
    import torch.distributed as dist

    from ..attribution import attribute
    from ..store import Trajectory
    from . import benchmark as bm
    module, name = job["model"][0].split(":")
    dtype = getattr(torch, job.get("dtype", "float64"))
    model = getattr(importlib.import_module(module), name)(**job["model"][1]).to(dtype)
    traj = Trajectory.load(job["trajectory"])
    data = torch.load(job["data"], weights_only=False)
    kw = dict(job.get("kw", {}))
    tt = data.get("test_targets")
    attribute(model, traj, data["test_inputs"][:1], test_targets=None if tt is None else tt[:1],
              train_data=data.get("train_data"), progress=False, **kw)     # warm-up (lazy imports)
    dist.barrier()
    with bm.track_peak("cpu") as peak, bm.measure("cpu") as m:
        out = attribute(model, traj, data["test_inputs"], test_targets=data.get("test_targets"),
                        train_data=data.get("train_data"), progress=False, **kw)
    res = {"rank": rank, "world": world, "wall_s": m.wall_s, "cpu_s": m.cpu_s,
           "peak_extra_bytes": peak["peak_extra_bytes"], "peak_bytes": peak["peak_bytes"],
           "peak_method": peak["method"], "threads": torch.get_num_threads()}
    if out is not None:
        res.update(reconstruction_error=out.reconstruction_error,
                   split=getattr(out, "distributed", {}).get("split", "one process"),
                   mode=out.plan["mode"], credit=out.credit, kernel_shape=list(out.kernel.shape),
                   kernel_sum=float(out.kernel.double().sum()))
    return res
