"""Recording a DistributedDataParallel run: every rank records, rank 0 writes (docs/design.md §5).

Every rank runs the same loop with its own :class:`~explaind_fast.recording.TrajectoryRecorder`
and declares its *local* batch with ``set_batch``. At every optimizer step the recorders gather
(one ``all_gather_object`` per step, over the DDP module's process group) each rank's declared
indices and weights, its learning rates, weight decays, measured clip factor and a fingerprint of
θ, and the error its checks raised, if any. The step's batch is the concatenation over ranks (in
rank order) with every weight divided by the world size W: DDP averages the gradients over ranks,
so the step's gradient is (1/W) Σ_r Σ_{k∈B_r} w_k ∇L_k — for a mean loss, 1/(W·|B_r|) per sample,
whatever each rank's local batch size. Samples a DistributedSampler repeats to pad the last batch
are separate entries with their own weights (duplicate indices in one step are summed by the
train side, as any repeated sample is).

Who checks what: the gradients after DDP's allreduce are identical on all ranks, so every rank runs
the recorder's checks on its own copy (the clip factor, the settings, θ unchanged); the gathered
values must agree across ranks (θ fingerprints and lr/weight decay exactly, clip factors to
rounding), otherwise the step is refused. A check that fails on one rank is raised on every rank at
the same step (the failing rank raises its own error, the others a RuntimeError naming it), so no
rank is left waiting in a collective. Failures after the step (rank 0's write) are raised on every
rank at the next step (after the last step: by the failing rank's ``close()``, which runs no
collective), like write-behind errors.
"""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch

_F64 = torch.float64


def _dist():
    import torch.distributed as dist
    return dist


def _ddp_class():
    try:
        from torch.nn.parallel import DistributedDataParallel
    except ImportError:      # torch built without distributed support
        return None
    return DistributedDataParallel


def unwrap_ddp(model) -> Tuple[torch.nn.Module, Optional[Any], bool]:
    """(the module inside a DistributedDataParallel wrapper, its process group, whether it was
    one); any other module is returned as it is (group None)."""
    cls = _ddp_class()
    if cls is not None and isinstance(model, cls):
        return model.module, getattr(model, "process_group", None), True
    return model, None, False


class RankGroup:
    """The process group a recording runs over: this rank, the world size, and the one collective
    the recorder uses (all_gather_object), with errors raised on every rank."""

    def __init__(self, group=None):
        dist = _dist()
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def gather(self, payload):
        """Every rank's ``payload`` (picklable), in rank order."""
        out: List[Any] = [None] * self.world_size
        _dist().all_gather_object(out, payload, group=self.group)
        return out

    def gather_checked(self, error: Optional[BaseException], payload, what: str) -> List[Any]:
        """Gather ``payload`` from every rank together with the error this rank's checks raised
        (None if none); if any rank failed, raise on every rank: the local error where it
        happened, a RuntimeError naming the first failing rank elsewhere."""
        sent = (None if error is None else f"{type(error).__name__}: {error}", payload)
        got = self.gather(sent)
        if error is not None:
            raise error
        for r, (err, _) in enumerate(got):
            if err is not None:
                raise RuntimeError(f"{what} failed on rank {r} of {self.world_size} (this is rank "
                                   f"{self.rank}; every rank raises): {err}")
        return [p for _, p in got]


def resolve(model, distributed: Optional[bool], process_group) -> Tuple[torch.nn.Module,
                                                                        Optional[RankGroup]]:
    """The module to record and the RankGroup (None: a single-process recording).

    distributed=None detects it: a DistributedDataParallel model, or an initialised default
    process group, with a world size above 1. distributed=False records this process alone (not
    allowed for a DDP model: its gradients are averaged over ranks). distributed=True requires
    torch.distributed to be initialised."""
    module, ddp_group, is_ddp = unwrap_ddp(model)
    if distributed is not None and not isinstance(distributed, bool):
        raise TypeError(f"distributed must be None, True or False, got {distributed!r}")
    if distributed is False:
        if is_ddp:
            raise ValueError(
                "distributed=False with a DistributedDataParallel model: its gradients are the "
                "average over all ranks, so one rank's batches do not explain its steps; record "
                "with distributed=None (every rank runs a recorder, rank 0 writes)")
        return module, None
    dist = _dist()
    initialised = dist.is_available() and dist.is_initialized()
    if not initialised:
        if distributed:
            raise RuntimeError("distributed=True, but torch.distributed is not initialised: call "
                               "torch.distributed.init_process_group first (torchrun does not "
                               "do it for you)")
        return module, None
    group = process_group if process_group is not None else ddp_group
    rg = RankGroup(group)
    if rg.world_size == 1 and not distributed:
        return module, None
    return module, rg


def fingerprint(theta: torch.Tensor) -> Tuple[float, float]:
    """Two float64 reductions of a flat θ (sum, L2 norm): equal θ on every rank give equal
    numbers (same data, same arithmetic); ranks whose parameters differ are told apart."""
    return (float(theta.sum(dtype=_F64)), float(torch.linalg.vector_norm(theta, dtype=_F64)))
