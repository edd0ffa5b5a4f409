"""Record a training run exactly, for ExPLAIND, with two optimizer hooks.

Usage: the loop changes by one ``set_batch`` line (see also :func:`explaind_fast.indexed_loader`)::

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    with TrajectoryRecorder(model, opt, "runs/mine", dataset_size=len(data)) as rec:
        for indices, x, y in indexed_loader(data, batch_size=64, shuffle=True):
            rec.set_batch(indices)                  # weights default to 1/len: a mean loss
            opt.zero_grad()
            loss_fn(model(x), y).backward()         # reduction="mean"
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)   # optional, seen
            opt.step()
            scheduler.step()                        # any LR scheduler: lr is read every step

What is recorded (docs/design.md §5), per stored update s: θ_{s+1} (θ_0 at the start), the second moment
v_{s+1} (Adam-type), and for every raw optimizer step the learning rate and weight decay of each
param group, torch's step counter (per tensor where they differ), the tensors without a gradient,
the batch indices and loss weights given to ``set_batch``, and the factor by which the gradients
were scaled between backward() and the step; the model's buffers (θ_0's file, and again after
every stored update in which they changed). The first moment is not stored by default: with every
step recorded it follows from the step identity (θ_{s+1} − θ_s = −Φ_s − r_s); it is stored when
``store_first_moment=True``, when checkpoint_every > 1, and for any step where some group has
lr = 0 (the identity then does not determine it).

Supported, exact: torch.optim.AdamW (Theorem 3.1), torch.optim.Adam with coupled (L2) weight decay
(the decay flows through both moments; exact because the first moment is linear and the second
enters only through the stored v), torch.optim.SGD with momentum (or none), coupled weight decay,
dampening 0 (Corollary 3.2); param groups with their own lr and weight decay; any LR scheduler;
full and mini batches; foreach and fused implementations (what the optimizer produced is what is
recorded; tested for all three optimizers on the CPU); capturable / differentiable (same update).

* **Gradient clipping and scaling.** Any *common* rescaling of all gradients between backward()
  and the step — ``torch.nn.utils.clip_grad_norm_`` (also the Hugging Face Trainer's
  ``max_grad_norm``), ``GradScaler.unscale_``, a manual ``g.mul_(c)`` on every gradient, this
  recorder's own ``clip_grad_norm_`` — is measured and recorded as the step's clip factor (it
  folds into the sample weights). How: when backward() produces a gradient (post-accumulate-grad
  hook) the recorder keeps three numbers per parameter (L2 norm, largest |entry|, sum, in
  float64); at the step it computes them again. A common factor c scales all three of every
  tensor by c; value clipping that clamps changes the largest entry by another factor than the
  norm (exactly so: the two factors agree only if clamping was itself a common scale), a
  per-tensor clip or an edit of one gradient gives that tensor another factor, a sign flip
  flips the sum. Those are refused, naming the parameter and why: the step's gradient is then
  Σ_k w_k ∇L_k for no sample weights w, so it does not decompose per sample. Cost: three
  reductions per parameter per backward() and per step, no copy of any gradient; the check
  detects non-uniform changes above ~30·eps of the gradient dtype (relative).
* **torch.amp.GradScaler.** The loss was multiplied by the scale S before backward(), so the
  recorded factor is c·S: pass ``grad_scaler=scaler`` (or let the recorder find it: a step run
  by ``scaler.step(optimizer)`` is recognised from its call frame, and the scaler is adopted).
  Steps the scaler skips (inf/NaN gradients: ``optimizer.step`` is not called, or — fused
  optimizers — is called with ``found_inf`` set) are not recorded, and the batches declared for
  them are dropped.
* **Parameters without a gradient at a step** (an unused table, a head used on some steps, a
  branch): recorded as torch treats them — no update, no weight decay, moments and (Adam) the
  tensor's own step counter untouched (docs/design.md §3); the decomposition stays exact (the
  recomputed gradient is not used there). A gradient left at zero by
  ``zero_grad(set_to_none=False)`` is a zero gradient (torch applies decay and moment updates).
* **Gradient accumulation.** Several backward() calls per step; ``set_batch`` may be called once
  for the step (the union batch and its weights) or once per micro-batch (indices and weights
  accumulate until the step). The weights are those of the loss you backpropagate: for the
  common "mean over micro-batches" (``loss / accum_steps`` per micro-batch mean) pass
  ``scale=1/accum_steps``; for a per-token mean over the whole step (Hugging Face's causal LM
  loss with ``num_items_in_batch``) pass ``causal_lm_batch_weights(targets, num_items=N)``
  (:mod:`explaind_fast.losses`). If the gradients are discarded without a step (``zero_grad``
  after backward() — a skipped batch), the batches declared for them are dropped when this is
  unambiguous (``set_batch`` of the next step after ``zero_grad``); call ``discard_batch()``
  after skipping a step otherwise (a step that follows such a reset with several declarations is
  refused, saying so).
* **Buffers** (BatchNorm running statistics, masks, counters): stored, so that ``attribute()``
  can evaluate a freshly built module with the trained buffers (``Trajectory.buffers()``; buffers
  of other dtypes than float/int/bool are not recorded).
* **DistributedDataParallel** (:mod:`.ddp`). Every rank runs the same loop with its own recorder
  (pass the DDP model or its module; detected when torch.distributed is initialised with more than
  one rank, or pass ``distributed=True`` / ``process_group=``) and declares its *local* batch with
  ``set_batch`` (e.g. the indices its DistributedSampler gave it). Rank 0 writes the trajectory; the
  other ranks never touch the directory (the path they pass is not used). At every step the ranks
  gather their batches (one ``all_gather_object``): the step's batch is their concatenation in rank
  order, every weight divided by the world size W, because DDP averages the gradients over ranks —
  1/(W·local batch) per sample for a mean loss, whatever each rank's local batch size; ``scale`` and
  accumulation (micro-batches under ``no_sync``) work as in one process. A sample a
  DistributedSampler repeats to pad the last batch is a separate entry with its own weight (an index
  may occur twice in one step; the train side sums them). The gradient statistics are taken after
  DDP's allreduce (at the end of backward), so clip factors, GradScaler and the other checks run on
  every rank on the same averaged gradients; the ranks' θ, learning rates, weight decays and clip
  factors must agree. A check failing on one rank raises on every rank at that step (the others name
  the failing rank; an invalid ``set_batch`` is raised by the step too); a failure after the step
  (rank 0's write) is raised on every rank at the next step (after the last step: by that rank's
  ``close()``). Not supported: ranks running different numbers of steps
  (``torch.distributed.algorithms.Join``), gradients averaged by hand instead of by DDP (the
  gradient check sees the local gradients and refuses the step; with ``check_gradients=False`` it is
  recorded), lossy communication hooks.

Refused with an error saying why: other optimizer classes, amsgrad, maximize, nesterov, dampening
≠ 0, Adam with decoupled_weight_decay on a mixed basis, betas / eps / momentum changing mid-run,
param groups added or changing membership, parameters frozen or unfrozen mid-run, a step without
``set_batch``, parameters modified outside ``optimizer.step()`` between steps, an optimizer that
already holds state (the recorded run must start from zero moments), and (``check_gradients=True``,
the default) gradients changed between backward() and optimizer.step() other than by a common
factor, gradients not produced by backward() (assigned by hand, or left over), and non-finite
gradients. ``recorder.clip_grad_value_`` raises (leaving the gradients untouched) when it would
clamp any coordinate.

Subsampled checkpoints (checkpoint_every = k > 1, the LLM setting, paper Remark F.3): θ, v and the
first moment m are stored after every k-th raw step only (and after the last step, at ``close()``);
the scalars and batches of every raw step are kept (``Trajectory.raw_steps``). Then exactly
attributable: each stored update θ_s → θ_{s+1} as a whole, over parameters, test samples and
outputs (the train side is the stored update itself; the path integral runs over the stored
segment). Only approximately attributable: its split into the regularisation part
(Σ_j α_j λ θ_j over the raw steps j needs the unstored θ_j; e.g. interpolated) and the first-moment
part. NOT attributable: the first-moment part to individual training samples or batches (the
moment mixes the gradients of the skipped steps, whose states were not stored; the stored m is the
aggregate, and the paper's geometric β1-rescaling is an approximation), and anything at a finer
time resolution than k steps.

Crash safety and resuming: see :mod:`explaind_fast.store`. A killed run leaves every completed
stored update loadable (its buffers are those stored with the last complete update). One recorder
per directory: a recorder holds the directory's exclusive writer lock (``writer.lock``, an flock)
from construction until ``close()`` (or until a failure stops it); a second recorder on the same
directory, in any process, raises ``TrajectoryLockedError`` at construction. The lock of a killed
process is released by the kernel, so resuming after a crash needs no clean-up. Opening a
directory that already holds a trajectory raises unless ``resume=True``; resuming continues only
if the model and optimizer match the manifest and the model's θ (and, Adam-type, the optimizer's
step counts and v) equal the last stored ones, i.e. after restoring the checkpoint that
corresponds to the last stored update. ``resume=True`` on an empty or missing directory starts a
new trajectory.

Peak extra memory while recording, in elements of the storage dtype: the previous θ (kept to detect
changes between steps) and, while a step is written, θ_{s+1}, v (and m) and their serialised
bytes: about 5·D (7·D with m); with write_behind add 2·D (3·D) per queued step (at most 3); plus
one copy of the model's buffers (on their device) to see which changed.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

from ..model import ParamLayout
from ..model.inputs import canonical_name, unwrap_compiled
from ..optim import RULES, check_group_settings, constant_hyper, optimizer_kind
from ..store import (FORMAT_NAME, FORMAT_VERSION, INIT_FILE, LOCK_FILE, MANIFEST, BackgroundWriter,
                     Trajectory, TrajectoryWriter, read_log)
from ..store.schema import BUFFER_DTYPES, BUFFER_PREFIX
from .ddp import fingerprint, resolve

_F64 = torch.float64


def _grad_stats(g: torch.Tensor) -> torch.Tensor:
    """[3] float64: L2 norm, largest |entry|, sum of a gradient (what a common factor c scales by
    c; see the module docstring). Stays on the gradient's device (no sync)."""
    g = g.detach()
    return torch.stack([torch.linalg.vector_norm(g, dtype=_F64),
                        torch.linalg.vector_norm(g, float("inf"), dtype=_F64),
                        g.sum(dtype=_F64)])


def _stack_cpu(rows: List[torch.Tensor]) -> torch.Tensor:
    """Stack [3] statistics on the CPU with one device-to-host copy per device."""
    if len({r.device for r in rows}) == 1:
        return torch.stack(rows).to("cpu")
    return torch.stack([r.to("cpu") for r in rows])


_SCALER_CODES = None


def _scaler_codes():
    """Code objects of GradScaler's methods that call ``optimizer.step`` (recognised in the call
    stack of a step; subclasses such as torch.cuda.amp.GradScaler inherit them)."""
    global _SCALER_CODES
    if _SCALER_CODES is None:
        codes = set()
        cls = getattr(getattr(torch, "amp", None), "GradScaler", None)
        for name in ("step", "_maybe_opt_step"):
            fn = getattr(cls, name, None)
            if fn is not None and hasattr(fn, "__code__"):
                codes.add(fn.__code__)
        _SCALER_CODES = frozenset(codes)
    return _SCALER_CODES


class TrajectoryRecorder:
    """Records an optimizer's run into a trajectory directory via step pre/post hooks.

    Args:
        model: the trained module; θ = its trainable parameters (frozen ones are not part of θ).
        optimizer: torch.optim.AdamW / Adam / SGD over the model's trainable parameters, fresh
            (no state yet) unless resuming.
        directory: trajectory directory (created; must not hold a trajectory unless resume=True).
        checkpoint_every: k; store tensors after every k-th raw step (k > 1: see module docstring).
        dataset_size: number of training samples M; when given, batch indices are checked to lie
            in [0, M) and stored in the manifest (the engine's per-sample axis).
        store_first_moment: also store the first moment (exp_avg / momentum buffer) at every
            stored update (always on when k > 1).
        resume: continue a trajectory already in ``directory`` (see module docstring).
        fsync: fsync every file and the log (survives power loss, not only a killed process).
        check_gradients: measure how the gradients changed between backward() and the step and
            record the common factor (clipping, unscaling), refusing non-uniform changes (module
            docstring). Costs three reductions per parameter per backward() and per step. With
            False nothing is measured: only ``recorder.clip_grad_norm_`` is recorded, and any
            other change of the gradients must be folded into set_batch's weights by hand.
        write_behind: serialise, hash, write and fsync each stored step on a background thread,
            overlapping the next training step (hides the disk latency). A step is then on disk
            only after up to two further steps or ``close()``; a killed run loses at most the
            queued steps; a write error is raised at the next step or at ``close()``.
        grad_scaler: the torch.amp.GradScaler of the run, if any (module docstring): its scale is
            the loss scale of every backward(), and its skipped steps drop their batches.
        record_buffers: store the model's buffers (default True).
        distributed: None (default): a DistributedDataParallel run is detected (the model is a
            DDP module, or torch.distributed is initialised with more than one rank): every rank
            records, rank 0 writes (module docstring). True: require it. False: record this
            process alone even though torch.distributed is initialised (ranks training separate
            models, each into its own directory; refused for a DDP model).
        process_group: the group the model's gradients are averaged over (default: the DDP
            module's, else the default group).

    Attributes: ``rank`` and ``world_size`` (0 and 1 in one process), ``writes`` (whether this
    recorder writes the directory: rank 0 only).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: str,
                 checkpoint_every: int = 1, *, dataset_size: Optional[int] = None,
                 store_first_moment: bool = False, resume: bool = False, fsync: bool = True,
                 check_gradients: bool = True, write_behind: bool = False,
                 grad_scaler=None, record_buffers: bool = True,
                 distributed: Optional[bool] = None, process_group=None):
        if int(checkpoint_every) != checkpoint_every or checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be a positive integer, got {checkpoint_every}")
        if dataset_size is not None and (int(dataset_size) != dataset_size or dataset_size < 1):
            raise ValueError(f"dataset_size must be a positive integer, got {dataset_size}")
        # a torch.compile'd module: record its plain module (names without "_orig_mod.", also
        # for compiled submodules: ParamLayout canonicalises every name)
        model = unwrap_compiled(model)
        # DistributedDataParallel: record its module; every rank records, rank 0 writes (.ddp)
        model, self._dist = resolve(model, distributed, process_group)
        model = unwrap_compiled(model)
        self.rank = 0 if self._dist is None else self._dist.rank
        self.world_size = 1 if self._dist is None else self._dist.world_size
        self.writes = self.rank == 0      # only rank 0 touches the directory
        self.model, self.optimizer = model, optimizer
        self.directory = str(directory)
        self.checkpoint_every = int(checkpoint_every)
        self.dataset_size = None if dataset_size is None else int(dataset_size)
        self.store_first_moment = bool(store_first_moment) or self.checkpoint_every > 1
        self.kind = optimizer_kind(optimizer)
        self._adam = RULES[self.kind].has_second_moment   # torch keeps exp_avg_sq and a step count
        for gi, g in enumerate(optimizer.param_groups):
            check_group_settings(self.kind, g, gi)
        self.layout = ParamLayout.from_model(model, optimizer)
        if self.layout.D == 0:
            raise ValueError("the model has no trainable parameters")
        self.hyper = constant_hyper(self.kind, optimizer)
        self._names = list(self.layout.names)
        named = {canonical_name(n): p for n, p in model.named_parameters()}
        self._params = [named[n] for n in self._names]
        self._membership = self._group_membership()
        dtype = self._params[0].dtype
        for p in self._params[1:]:
            dtype = torch.promote_types(dtype, p.dtype)
        self.dtype = dtype  # θ and moments are stored exactly in the widest parameter dtype
        self._buffers = self._model_buffers() if record_buffers else []
        self._writer = TrajectoryWriter(self.directory, fsync=fsync) if self.writes else None
        self.write_behind = bool(write_behind)
        self._background: Optional[BackgroundWriter] = None
        self.check_gradients = bool(check_gradients)
        # the window: what was declared and measured since the last recorded step
        self._batches: List[tuple] = []             # (indices, weights) per set_batch call
        self._grad_stats: Dict[int, torch.Tensor] = {}   # stats of each gradient after backward
        self._backward_seen = False                  # any backward() since the last step
        self._window_reset = False                   # gradients discarded after backward()
        self._stats_queued = False                   # DDP: end-of-backward statistics queued
        self._clip = 1.0
        self._pending: List[dict] = []        # raw steps of the current, unfinished interval
        self._step_state: Optional[dict] = None
        self._failed: Optional[str] = None
        self._deferred: Optional[BaseException] = None   # DDP: a post-step error not yet raised
        self._theta_fp = None                 # DDP: fingerprint of the last θ (ddp.fingerprint)
        self._batch_error: Optional[BaseException] = None   # DDP: an invalid set_batch
        self._last_buffers: Dict[str, torch.Tensor] = {}   # the buffers last stored (writer)
        self._closed = False
        self.skipped_steps = 0                # steps the GradScaler skipped (not recorded)
        self._scaler = None
        self._scaler_restore = None

        self._handles = []
        try:
            if self._dist is None:
                # The exclusive writer lock, held until close() (or a failure): taken before
                # looking at the directory, so that two recorders can never both create or resume
                # it. A second recorder gets TrajectoryLockedError here.
                if self._open(resume):
                    self._create()
            else:
                self._open_distributed(resume)
            if self.write_behind and self.writes:   # after create/resume, which write synchronously
                self._background = BackgroundWriter(self._writer)
            self._handles = [optimizer.register_step_pre_hook(self._pre_hook),
                             optimizer.register_step_post_hook(self._post_hook)]
            if self.check_gradients:
                for i, p in enumerate(self._params):
                    self._handles.append(p.register_hook(self._reset_hook(i, p)))
                    self._handles.append(p.register_post_accumulate_grad_hook(self._grad_hook(i)))
            if grad_scaler is not None:
                self._adopt_scaler(grad_scaler)
        except BaseException:
            for h in self._handles:
                h.remove()
            self._closed = True
            self._stop_writing(remove_if_unused=True)
            raise

    def _open(self, resume: bool) -> bool:
        """Take the writer lock and resume, or check that a new trajectory may be created here
        (returns True: call _create)."""
        self._writer.open()
        if self._writer.exists(MANIFEST):
            if not resume:
                raise FileExistsError(
                    f"'{self.directory}' already holds a trajectory; pass resume=True to "
                    "continue it (after restoring the matching model/optimizer checkpoint) or "
                    "choose a new directory. It is never overwritten.")
            self._resume()
            return False
        # what a run killed while creating the trajectory leaves may be overwritten
        debris = {INIT_FILE, INIT_FILE + ".tmp", MANIFEST + ".tmp", LOCK_FILE}
        if set(self._writer.listdir()) - debris:
            raise FileExistsError(f"'{self.directory}' is not empty and holds no "
                                  "trajectory; refusing to write into it")
        self._check_fresh_optimizer()
        return True

    def _create(self) -> None:
        self._last_theta = self._flat_theta()
        # the buffers last stored, to see which changed: only the writer stores them
        self._last_buffers = {n: b.detach().clone() for n, b in self._buffers} if self.writes \
            else {}
        if self.writes:
            self._writer.create(self._manifest(), self._last_theta,
                                {BUFFER_PREFIX + n: b.detach().to("cpu")
                                 for n, b in self._buffers})
        self._num_stored, self._next_raw, self._count = 0, 0, 0

    def _open_distributed(self, resume: bool) -> None:
        """Rank 0 opens (or resumes) the directory, the other ranks never touch it; two gathers
        tell every rank the outcome, so that a failure on any rank raises on all of them."""
        dist = self._dist
        err, new, state = None, None, None
        fresh_error = None
        try:
            theta = self._flat_theta()
            fp = fingerprint(theta)
            try:
                self._check_fresh_optimizer()
            except ValueError as e:
                fresh_error = str(e)
            if self.writes:
                new = self._open(resume)
                if not new:
                    state = {"n": self._num_stored, "next_raw": self._next_raw,
                             "count": self._count, "dataset_size": self.dataset_size}
        except Exception as e:
            err, fp = e, None
        got = dist.gather_checked(err, (new, state, fp, fresh_error),
                                  "opening the trajectory")
        new, state = got[0][0], got[0][1]
        fps = [g[2] for g in got]
        if any(f != fps[0] for f in fps):
            bad = next(r for r, f in enumerate(fps) if f != fps[0])
            raise RuntimeError(
                f"the model's parameters differ between rank 0 and rank {bad}: construct the "
                "recorder after wrapping the model in DistributedDataParallel (which copies rank "
                "0's parameters to every rank), or pass distributed=False if the ranks train "
                "separate models (each recording into its own directory)")
        fresh = [g[3] for g in got]
        if new and any(f is not None for f in fresh):
            bad = next(r for r, f in enumerate(fresh) if f is not None)
            raise ValueError(f"rank {bad}: {fresh[bad]}")
        err = None
        try:
            if new:
                self._create()
            elif not self.writes:
                self._last_theta = self._flat_theta()
                self._num_stored, self._next_raw, self._count = \
                    state["n"], state["next_raw"], state["count"]
                if self.dataset_size is None:
                    self.dataset_size = state["dataset_size"]
                if self.dataset_size != state["dataset_size"]:
                    raise ValueError(f"cannot resume '{self.directory}': dataset_size differs "
                                     f"(trajectory: {state['dataset_size']}, now: "
                                     f"{self.dataset_size})")
        except Exception as e:
            err = e
        dist.gather_checked(err, None, "creating the trajectory")
        self._theta_fp = fingerprint(self._last_theta)

    # ------------------------------------------------------------------ user API
    @property
    def num_steps(self) -> int:
        """Stored updates recorded so far (with write_behind, the last few may still be queued;
        see ``flush``)."""
        return self._num_stored

    def set_batch(self, indices, weights=None, *, scale: float = 1.0) -> None:
        """Declare the samples of the next ``optimizer.step()``: dataset indices [B] (ints) and loss
        weights [B] with gradient Σ_k w_k ∇L_k; default 1/B (a mean-reduced loss; for a sum pass
        ones). Every weight is multiplied by ``scale`` (e.g. 1/accum_steps for a loss divided by
        the number of micro-batches). Must be called before every step; calls before one step
        accumulate (micro-batches: declare each, or the union once).

        Under DDP: this rank's samples (weights as for its own loss; the recorder divides by the
        world size). An invalid declaration is raised by the next ``optimizer.step()``, on every
        rank, instead of here (raising on one rank alone would leave the others waiting in
        DDP's allreduce)."""
        try:
            idx, w = self._checked_batch(indices, weights, scale)
        except (ValueError, TypeError) as e:
            if self._dist is None:
                raise
            if self._batch_error is None:
                self._batch_error = e
            return
        # zero_grad() after backward() without a step since: the gradients those batches were
        # declared for were discarded (a skipped batch), so are the declarations
        if self._backward_seen and all(p.grad is None for p in self._params):
            self._drop_window()
        self._batches.append((idx, w))

    def _checked_batch(self, indices, weights, scale):
        idx = torch.as_tensor(indices)
        if idx.dim() != 1 or idx.numel() == 0:
            raise ValueError(f"set_batch: indices must be a non-empty 1-D sequence, got shape "
                             f"{tuple(idx.shape)}")
        if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
            raise TypeError(f"set_batch: indices must be integers, got {idx.dtype}")
        idx = idx.detach().to("cpu", torch.int64).clone()
        if int(idx.min()) < 0 or (self.dataset_size is not None
                                  and int(idx.max()) >= self.dataset_size):
            bad = int(idx.min()) if int(idx.min()) < 0 else int(idx.max())
            raise ValueError(f"set_batch: index {bad} is outside the dataset "
                             f"[0, {self.dataset_size if self.dataset_size is not None else '∞'})")
        if weights is None:
            w = torch.full((idx.numel(),), 1.0 / idx.numel(), dtype=_F64)
        else:
            w = torch.as_tensor(weights).detach().to("cpu", _F64).clone()
            if w.shape != idx.shape:
                raise ValueError(f"set_batch: {w.numel()} weights for {idx.numel()} indices")
            if not bool(torch.isfinite(w).all()):
                raise ValueError("set_batch: weights must be finite")
        if not math.isfinite(float(scale)):
            raise ValueError(f"set_batch: scale must be finite, got {scale}")
        if float(scale) != 1.0:
            w = w * float(scale)
        return idx, w

    def discard_batch(self) -> None:
        """Forget what was declared and measured since the last recorded step: call it when your
        loop skips a step after set_batch (and backward()), e.g. on a non-finite loss."""
        self._drop_window()

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip the gradients of θ like ``torch.nn.utils.clip_grad_norm_`` (scale by
        min(1, max_norm/(total_norm + 1e-6))) and record the factor. Returns the total norm.
        (torch's own clip_grad_norm_ is recorded as well; this one records the exact factor.)"""
        grads = [g for _, g in self._grads()]
        if not grads:
            return torch.zeros(())
        if hasattr(torch.nn.utils, "get_total_norm"):          # torch >= 2.6
            total = torch.nn.utils.get_total_norm(grads, norm_type)
        else:                                                  # what clip_grad_norm_ computes
            total = torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(g, norm_type) for g in grads]), norm_type)
        factor = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        if not bool(torch.isfinite(factor)):
            raise ValueError(f"clip_grad_norm_: the gradient norm is {float(total)}; the step "
                             "cannot be recorded")
        for g in grads:
            g.mul_(factor.to(g.device))
        self._clip *= float(factor)
        return total

    def clip_grad_value_(self, clip_value: float) -> None:
        """Value clipping, recorded only where exact: if no |gradient| exceeds ``clip_value`` it
        changes nothing; otherwise ValueError (gradients untouched) — clamping coordinates is not
        a per-step scale of the batch gradient, so the step would not decompose exactly."""
        for name, g in self._grads():
            n = int((g.abs() > clip_value).sum())
            if n:
                raise ValueError(
                    f"clip_grad_value_({clip_value}) would clamp {n} coordinates of '{name}'; "
                    "value clipping is exact only when it clamps nothing. Use "
                    "torch.nn.utils.clip_grad_norm_ (a common scale of all gradients) instead")

    def close(self) -> None:
        """Store the last, partial interval (k > 1) and detach from the optimizer. Under DDP no
        collective runs here (a rank may close while another is stopped by an error): rank 0
        writes, the other ranks only detach; an error of the last step not raised yet is raised
        now."""
        if self._closed:
            return
        try:
            if self._pending and self._failed is None:
                self._check_unchanged()
                self._flush()
        finally:
            for h in self._handles:
                h.remove()
            self._release_scaler()
            self._closed = True
            try:
                if self._background is not None:
                    self._background.close()   # waits for the queued steps; re-raises a failure
            finally:
                if self._writer is not None:
                    self._writer.close()       # releases the writer lock
        if self._deferred is not None:
            e, self._deferred = self._deferred, None
            raise e

    def _stop_writing(self, remove_if_unused: bool = False) -> None:
        """After a failure nothing more is written: let queued writes finish (a background error
        is re-raised later by flush()/close()), then release the writer lock, so that the
        directory can be resumed (also from this process)."""
        self._release_scaler()
        try:
            if self._background is not None:
                self._background.close()
        except BaseException:
            pass
        finally:
            if self._writer is not None:
                self._writer.close(remove_if_unused=remove_if_unused)

    def flush(self) -> None:
        """With write_behind: wait until every recorded step is on disk (no-op otherwise)."""
        if self._background is not None:
            self._background.flush()

    def __enter__(self) -> "TrajectoryRecorder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ GradScaler
    def _adopt_scaler(self, scaler) -> None:
        """Use ``scaler``'s scale as the loss scale of every backward(), and wrap its ``step`` (on
        the instance) so that a step it skips drops that step's declarations."""
        if scaler is self._scaler:
            return
        if self._scaler is not None:
            raise ValueError("a second GradScaler drives this optimizer; one run has one scaler")
        if not callable(getattr(scaler, "step", None)) or not callable(getattr(scaler, "get_scale",
                                                                             None)):
            raise TypeError(f"grad_scaler must be a torch.amp.GradScaler, got "
                            f"{type(scaler).__name__}")
        self._scaler = scaler
        had = "step" in vars(scaler)
        previous = vars(scaler).get("step")
        inner = scaler.step

        def step(optimizer, *args, **kwargs):
            before = self._next_raw
            out = inner(optimizer, *args, **kwargs)
            if optimizer is self.optimizer and not self._closed and self._failed is None and \
                    self._next_raw == before:
                self.skipped_steps += 1          # inf/NaN gradients: the scaler skipped it
                self._drop_window()
            return out
        scaler.step = step
        self._scaler_restore = (scaler, had, previous)

    def _release_scaler(self) -> None:
        if self._scaler_restore is None:
            return
        scaler, had, previous = self._scaler_restore
        self._scaler_restore = None
        if had:
            scaler.step = previous
        else:
            try:
                del scaler.step
            except AttributeError:
                pass

    def _scaler_in_stack(self):
        """The GradScaler whose ``step`` is running this optimizer step, if any."""
        codes = _scaler_codes()
        f = sys._getframe(1)
        for _ in range(16):
            if f is None:
                return None
            if f.f_code in codes:
                return f.f_locals.get("self")
            f = f.f_back
        return None

    def _loss_scale(self) -> float:
        scaler = self._scaler
        if scaler is None:
            return 1.0
        enabled = getattr(scaler, "is_enabled", None)
        if callable(enabled) and not enabled():
            return 1.0
        return float(scaler.get_scale())

    # ------------------------------------------------------------------ hooks
    def _pre_hook(self, optimizer, args, kwargs):
        if self._closed:
            return  # detached; the hooks are removed in close()
        if self._dist is None:
            self._pre_step(optimizer, args, kwargs)
            return
        err = None
        try:
            self._pre_step(optimizer, args, kwargs)
        except Exception as e:
            err = e
            self._step_state = None
        self._combine_ranks(err)

    def _combine_ranks(self, err: Optional[BaseException]) -> None:
        """DDP: gather every rank's declared batch, scalars, clip factor and θ fingerprint (and
        the error its checks raised: then every rank raises); check that the ranks agree; make
        the step's batch the union over ranks with every weight divided by the world size (DDP
        averages the gradients over ranks)."""
        st = self._step_state
        payload = None if st is None else {
            "indices": st["indices"].tolist(), "weights": st["weights"].tolist(),
            "clip": st["clip"], "lr": st["lr"], "weight_decay": st["weight_decay"],
            "skip": st["skip"], "theta": self._theta_fp}
        got = self._dist.gather_checked(err, payload, "the recorder's checks before "
                                        "optimizer.step()")
        first = got[0]
        for r, g in enumerate(got[1:], 1):
            what = None
            if g["theta"] != first["theta"]:
                what = ("the parameters differ (they are not synchronised: is the model wrapped "
                        "in DistributedDataParallel?)")
            elif g["lr"] != first["lr"] or g["weight_decay"] != first["weight_decay"]:
                what = (f"the learning rates / weight decays differ ({g['lr']}, "
                        f"{g['weight_decay']} against rank 0's {first['lr']}, "
                        f"{first['weight_decay']})")
            elif g["skip"] != first["skip"]:
                what = "one rank skips the step (found_inf) and another does not"
            elif abs(g["clip"] - first["clip"]) > 1e-12 * abs(first["clip"]):
                what = (f"the gradients were scaled by {g['clip']!r} on rank {r} and by "
                        f"{first['clip']!r} on rank 0 (the gradients differ between ranks, or "
                        "one rank clipped differently): the step has one gradient")
            if what is not None:
                self._step_state = None
                raise RuntimeError(f"DDP recording: rank {r} disagrees with rank 0 at this "
                                   f"optimizer step: {what}; the step cannot be recorded")
        w_size = float(self.world_size)
        st["indices"] = torch.tensor([i for g in got for i in g["indices"]], dtype=torch.int64)
        st["weights"] = torch.tensor([w for g in got for w in g["weights"]], dtype=_F64) / w_size
        st["clip"] = first["clip"]

    def _pre_step(self, optimizer, args, kwargs):
        if self._failed is not None:
            cause, self._deferred = self._deferred, None
            raise RuntimeError(f"the recorder stopped after an error and cannot record further "
                               f"steps: {self._failed}") from cause
        if self._batch_error is not None:     # DDP: an invalid set_batch, raised at the step
            e, self._batch_error = self._batch_error, None
            raise e
        if self._background is not None and self._background.error is not None:
            self._failed = f"a background write failed: {self._background.error!r}"
            self._stop_writing()
            self._background.raise_if_failed()
        closure = args[1] if len(args) > 1 else kwargs.get("closure")  # args[0] is the optimizer
        if closure is not None:
            raise RuntimeError("optimizer.step(closure) is not supported while recording: the "
                               "closure computes gradients inside the step, after the recorder's "
                               "checks; call backward() before optimizer.step()")
        if not self._batches:
            raise RuntimeError("call recorder.set_batch(indices) before every optimizer.step(): "
                               "the trajectory must know which samples formed the batch")
        if self._window_reset and len(self._batches) > 1:
            raise RuntimeError(
                f"the gradients were discarded (zero_grad) after backward() since the last "
                f"recorded step, without an optimizer step, and set_batch was called "
                f"{len(self._batches)} times since: which declarations belong to this step cannot "
                "be told. Call recorder.discard_batch() when your loop skips a step (and pass "
                "grad_scaler=… to the recorder when a torch.amp.GradScaler skips it)")
        self._check_settings_unchanged()
        self._check_unchanged()
        scaler = self._scaler_in_stack()
        if scaler is not None and scaler is not self._scaler:
            self._adopt_scaler(scaler)
        # fused optimizers under a GradScaler: the step unscales by grad_scale itself and does
        # nothing when found_inf is set
        found_inf = getattr(optimizer, "found_inf", None)
        skip = found_inf is not None and float(found_inf) > 0
        active = [i for i, p in enumerate(self._params) if p.grad is not None]
        factor = self._clip
        if not skip:
            if self.check_gradients:
                factor = self._measured_factor(active)
            grad_scale = getattr(optimizer, "grad_scale", None)
            factor = factor * self._loss_scale() / (1.0 if grad_scale is None else float(grad_scale))
        self._step_state = {
            "lr": [float(g["lr"]) for g in optimizer.param_groups],
            "weight_decay": [float(g["weight_decay"]) for g in optimizer.param_groups],
            "active": active, "clip": factor, "skip": skip,
            "indices": torch.cat([b[0] for b in self._batches]),
            "weights": torch.cat([b[1] for b in self._batches])}

    def _post_hook(self, optimizer, args, kwargs):
        if self._closed:
            return
        try:
            if self._step_state is not None and self._step_state["skip"]:
                self._check_unchanged()          # the optimizer did nothing: nothing to record
                self._step_state = None
                return
            self._record_step()
        except Exception as e:
            self._failed = f"{type(e).__name__}: {e}"
            self._stop_writing()
            if self._dist is None:
                raise
            # DDP: raised on every rank at the next step (or by this rank's close()); raising
            # here alone would leave the other ranks waiting in the next step's collectives
            self._deferred = e

    def _reset_hook(self, i, p):
        """Before a gradient accumulates into p.grad: p.grad None although backward() produced
        one for p in this window means zero_grad() ran since without a step."""
        def hook(grad):
            if p.grad is None and i in self._grad_stats:
                self._window_reset = True
            return None
        return hook

    def _grad_hook(self, i):
        if self._dist is not None:
            return self._ddp_grad_hook

        def hook(p):
            self._grad_stats[i] = _grad_stats(p.grad)
            self._backward_seen = True
        return hook

    def _ddp_grad_hook(self, p):
        """DDP: when backward() accumulates a gradient it is this rank's own; DDP averages it
        over the ranks at the end of backward (its reducer's final callback). The statistics are
        taken after that: a callback queued at the end of backward (after DDP's, which is queued
        while the hooks run) queues one more, which runs after every callback queued so far."""
        self._backward_seen = True
        if self._stats_queued:
            return
        self._stats_queued = True
        engine = torch.autograd.Variable._execution_engine
        engine.queue_callback(lambda: engine.queue_callback(self._end_of_backward))

    def _end_of_backward(self):
        self._stats_queued = False
        for i, p in enumerate(self._params):
            if p.grad is not None:
                self._grad_stats[i] = _grad_stats(p.grad)

    def _drop_window(self) -> None:
        self._batches = []
        self._batch_error = None
        self._grad_stats = {}
        self._backward_seen = False
        self._window_reset = False
        self._stats_queued = False
        self._clip = 1.0

    def _record_step(self):
        theta = self._flat_theta()
        st = self._step_state
        idx, w = st["indices"], st["weights"]    # under DDP: of every rank (_combine_ranks)
        self._count += 1
        step_count = self._count
        inactive = [i for i in range(len(self._params)) if i not in set(st["active"])]
        counts = None
        if self._adam:
            state = self.optimizer.state
            tc = [int(float(state[p]["step"])) if p in state and "step" in state[p] else 0
                  for p in self._params]
            if any(c != step_count for c in tc):
                counts = tc
        store_m = self.store_first_moment or self._needs_first_moment(st["lr"])
        j = len(self._pending)
        # compact batches: int32 indices when they fit, one exact float for equal weights
        uniform = bool((w == w[0]).all())
        tensors = {f"batch_indices.{j}": idx.to(torch.int32) if int(idx.max()) < 2**31 else idx}
        if not uniform:
            tensors[f"batch_weights.{j}"] = w
        raw = {"index": self._next_raw, "step_count": step_count, "lr": st["lr"],
               "weight_decay": st["weight_decay"], "clip_factor": st["clip"],
               "batch_size": int(idx.numel()), "uniform_weight": float(w[0]) if uniform else None}
        if inactive:
            raw["inactive"] = inactive
        if counts is not None:
            raw["tensor_step_counts"] = counts
        self._pending.append({
            "raw": raw, "tensors": tensors, "store_m": store_m,
            # momentum-free SGD groups keep no buffer: compute torch's direction g + λθ_s now,
            # while θ_s (self._last_theta) and the gradient are at hand
            "sgd_direction": self._sgd_direction(st)
            if store_m and not self._adam and self.writes else None})
        self._next_raw += 1
        self._last_theta = theta
        if self._dist is not None:
            self._theta_fp = fingerprint(theta)
        self._step_state = None
        self._drop_window()
        if len(self._pending) == self.checkpoint_every:
            self._flush()

    # ------------------------------------------------------------------ writing
    def _flush(self):
        if not self.writes:            # DDP, ranks > 0: the same bookkeeping, nothing written
            self._num_stored += 1
            self._pending = []
            return
        tensors = {"theta": self._last_theta}
        for item in self._pending:
            tensors.update(item["tensors"])
        state = self.optimizer.state

        def moment(p, key):
            t = state[p].get(key) if p in state else None
            return t if t is not None else torch.zeros_like(p)   # never stepped: zero
        if self._adam:
            tensors["exp_avg_sq"] = self._flatten([moment(p, "exp_avg_sq") for p in self._params])
        if self.store_first_moment or any(i["store_m"] for i in self._pending):
            if self._adam:
                tensors["exp_avg"] = self._flatten([moment(p, "exp_avg") for p in self._params])
            else:
                direction = self._pending[-1].get("sgd_direction")
                parts = []
                for i, p in enumerate(self._params):
                    buf = state[p].get("momentum_buffer") if p in state else None
                    if buf is None:
                        buf = direction[i] if direction is not None else None
                    parts.append(buf if buf is not None else torch.zeros_like(p))
                tensors["exp_avg"] = self._flatten(parts)
        changed = self._changed_buffers()
        for name, value in changed.items():
            tensors[BUFFER_PREFIX + name] = value.to("cpu")
        payload = {"raw": [i["raw"] for i in self._pending], "time": time.time()}
        if changed:
            payload["buffers_changed"] = list(changed)
        (self._background or self._writer).append(self._num_stored, tensors, payload)
        for name, value in changed.items():
            self._last_buffers[name] = value
        self._num_stored += 1
        self._pending = []

    def _sgd_direction(self, st) -> List[Optional[torch.Tensor]]:
        """torch SGD's d_p = g + λθ_s for parameters of momentum-free groups (else None; zero for
        a parameter without a gradient, which torch skips)."""
        out = []
        group_of = self.layout.group_of_tensor
        off = self.layout.offsets
        for i, p in enumerate(self._params):
            gi = group_of[i]
            if self.hyper[gi]["momentum"] != 0:
                out.append(None)
                continue
            if p.grad is None:
                out.append(torch.zeros_like(p))
                continue
            theta_s = self._prev_theta_view(i, off)
            wd = st["weight_decay"][gi]
            d = p.grad.detach().clone()
            if wd != 0:
                d = d.add(theta_s.to(d.device, d.dtype), alpha=wd)
            out.append(d)
        return out

    def _prev_theta_view(self, i, off):
        return self._last_theta[off[i]:off[i + 1]].reshape(self.layout.shapes[i])

    def _needs_first_moment(self, lrs) -> bool:
        # With lr = 0 the update is zero and does not determine the first moment.
        return any(float(lr) == 0.0 for lr in lrs)

    # ------------------------------------------------------------------ buffers
    def _model_buffers(self):
        """(canonical name, tensor) of the buffers to record: those of a storable dtype."""
        out, seen = [], set()
        for n, b in self.model.named_buffers():
            name = canonical_name(n)
            if b is None or name in seen or str(b.dtype).replace("torch.", "") not in BUFFER_DTYPES:
                continue
            seen.add(name)
            out.append((name, b))
        return out

    def _changed_buffers(self) -> Dict[str, torch.Tensor]:
        """Copies of the buffers that differ from their last stored value (in order)."""
        changed = {}
        for name, b in self._buffers:
            last = self._last_buffers.get(name)
            if last is None:
                continue
            now = b.detach()
            if now.shape != last.shape or now.dtype != last.dtype:
                raise RuntimeError(
                    f"buffer '{name}' changed its shape or dtype during training ({tuple(last.shape)} "
                    f"{last.dtype} -> {tuple(now.shape)} {now.dtype}); the trajectory records "
                    "buffers of a fixed shape (pass record_buffers=False to leave buffers out)")
            if not torch.equal(now, last):
                changed[name] = now.clone()
        return changed

    # ------------------------------------------------------------------ checks
    def _grads(self):
        """(name, gradient) of the parameters of θ that have a gradient."""
        return [(n, p.grad) for n, p in zip(self._names, self._params) if p.grad is not None]

    def _measured_factor(self, active: List[int]) -> float:
        """The common factor c with gradient_now = c · gradient_after_backward (times the factor
        of recorder.clip_grad_norm_), from the three statistics of every active gradient; raises
        naming the parameter when there is none (module docstring)."""
        names = self._names
        rows, now_rows, which = [], [], []
        for i in active:
            g = self._params[i].grad
            if i not in self._grad_stats:
                # not produced by backward() since the last step: fine only as the zero a
                # zero_grad(set_to_none=False) leaves where this step's backward did not reach
                if not self._backward_seen or bool(g.detach().ne(0).any()):
                    raise RuntimeError(
                        f"the gradient of '{names[i]}' was not produced by backward() since the "
                        "last step (assigned by hand, or left over without zero_grad()); the "
                        "recorded batch would not explain it")
                continue
            rows.append(self._grad_stats[i])
            now_rows.append(_grad_stats(g))
            which.append(i)
        if not which:
            return self._clip
        bwd = _stack_cpu(rows) * self._clip
        now = _stack_cpu(now_rows)
        eps = torch.tensor([torch.finfo(self._params[i].grad.dtype).eps for i in which],
                           dtype=_F64)
        numel = torch.tensor([float(self._params[i].numel()) for i in which], dtype=_F64)
        rtol = 32 * eps + 16 * torch.finfo(_F64).eps
        for k, i in enumerate(which):
            if not bool(torch.isfinite(now[k]).all() and torch.isfinite(bwd[k]).all()):
                raise RuntimeError(f"the gradient of '{names[i]}' is not finite (norm "
                                   f"{float(now[k, 0]):.6g}); the step cannot be recorded")
        b2, binf, bsum = bwd.unbind(1)
        n2, ninf, nsum = now.unbind(1)
        zero = b2 == 0
        for k in torch.nonzero(zero & (n2 != 0)).flatten().tolist():
            raise RuntimeError(
                f"the gradient of '{names[which[k]]}' changed between backward() and "
                f"optimizer.step() from zero to norm {float(n2[k]):.6g}: not a common scale of "
                "the batch gradient, so the step does not decompose per sample")
        r = torch.where(zero, torch.ones_like(b2), n2 / torch.where(zero, torch.ones_like(b2), b2))
        # within a tensor: the largest entry and the sum scale by the norm's factor
        inf_bad = (ninf - r * binf).abs() > 2 * rtol * r * binf
        sum_tol = (2 * eps + 8 * torch.finfo(_F64).eps * torch.log2(numel + 2)) * \
            numel.sqrt() * r * b2 + 2 * rtol * r * bsum.abs()
        sum_bad = (nsum - r * bsum).abs() > sum_tol
        for k in torch.nonzero((inf_bad | sum_bad) & ~zero).flatten().tolist():
            i = which[k]
            raise RuntimeError(
                f"the gradient of '{names[i]}' changed between backward() and optimizer.step() "
                f"other than by a common scale (its norm by a factor {float(r[k]):.6g}, its "
                f"largest entry by {float(ninf[k] / binf[k]):.6g}, its sum by "
                f"{float(nsum[k] / bsum[k]) if float(bsum[k]) != 0 else float('nan'):.6g}): value "
                "clipping that clamps (torch.nn.utils.clip_grad_value_), or an edit of single "
                "entries. The step's gradient is then Σ_k w_k ∇L_k for no sample weights w, so it "
                "does not decompose per sample. Clip by the global norm "
                "(torch.nn.utils.clip_grad_norm_ over all parameters) instead")
        nz = ~zero
        if not bool(nz.any()):
            return self._clip
        c = float(n2[nz].pow(2).sum().sqrt() / b2[nz].pow(2).sum().sqrt())
        dev = (r - c).abs() > 2 * rtol * c
        dev &= nz
        if bool(dev.any()):
            med = float(r[nz].median())
            k = int(torch.argmax(torch.where(nz, (r - med).abs(), torch.zeros_like(r))))
            raise RuntimeError(
                f"the gradient of '{names[which[k]]}' changed between backward() and "
                f"optimizer.step() by a factor {float(r[k]):.6g}, the other parameters' by about "
                f"{med:.6g}: scaling parameters by different factors (per-tensor or per-group "
                "clipping, an edit of some gradients) is not a common scale of the batch "
                "gradient, and one step has one set of sample weights for all parameters, so it "
                "does not decompose per sample. Clip by the global norm over all parameters "
                "(torch.nn.utils.clip_grad_norm_(model.parameters(), …)) instead")
        if abs(c - 1.0) <= float(2 * rtol[nz].max()):
            c = 1.0
        return self._clip * c

    def _group_membership(self):
        pos = {id(p): i for i, p in enumerate(self._params)}
        return tuple(tuple(sorted(pos.get(id(p), -1) for p in g["params"] if p.requires_grad))
                     for g in self.optimizer.param_groups)

    def _check_settings_unchanged(self):
        opt = self.optimizer
        if optimizer_kind(opt) != self.kind:
            raise ValueError("the optimizer's kind changed mid-run")
        if len(opt.param_groups) != len(self.hyper):
            raise ValueError(f"the optimizer now has {len(opt.param_groups)} param groups, the "
                             f"recording started with {len(self.hyper)}: groups cannot be added "
                             "mid-run")
        for gi, g in enumerate(opt.param_groups):
            check_group_settings(self.kind, g, gi)
        now = constant_hyper(self.kind, opt)
        for gi, (a, b) in enumerate(zip(now, self.hyper)):
            if a != b:
                raise ValueError(f"param group {gi}: hyperparameters changed mid-run from {b} to "
                                 f"{a}; only lr and weight_decay may change between steps")
        trainable = [canonical_name(n) for n, p in self.model.named_parameters() if p.requires_grad]
        if trainable != self._names:
            changed = sorted(set(trainable) ^ set(self._names))
            raise ValueError(f"the set of trainable parameters changed mid-run ({changed[:3]}): "
                             "freezing or unfreezing parameters changes θ")
        if self._group_membership() != self._membership:
            raise ValueError("parameters moved between param groups mid-run")

    def _check_unchanged(self):
        off = self.layout.offsets
        for i, (name, p) in enumerate(zip(self._names, self._params)):
            if not torch.equal(p.detach().reshape(-1).to("cpu", self.dtype),
                               self._last_theta[off[i]:off[i + 1]]):
                raise RuntimeError(
                    f"parameter '{name}' changed outside optimizer.step() since the last "
                    "recorded state; the trajectory would not explain it (construct the "
                    "recorder after initialisation, and do not edit parameters during training)")

    def _check_fresh_optimizer(self):
        for p in self._params:
            st = self.optimizer.state.get(p, {})
            if st.get("step") is not None or st.get("exp_avg") is not None \
                    or st.get("momentum_buffer") is not None:
                raise ValueError(
                    "the optimizer already holds state (moments from earlier steps): the recorded "
                    "run must start from a fresh optimizer so that its moments start at zero; "
                    "to continue a recording use resume=True")

    def _resume(self):
        traj = Trajectory.load(self.directory)

        def mismatch(what, stored, now):
            raise ValueError(f"cannot resume '{self.directory}': {what} differs (trajectory: "
                             f"{stored}, now: {now})")

        if traj.layout.to_dict() != self.layout.to_dict():
            traj.layout.check_model(self.model)  # names the first parameter that differs
            mismatch("the parameter layout / param groups", traj.layout.group_of_tensor,
                     self.layout.group_of_tensor)
        if traj.optimizer_kind != self.kind:
            mismatch("the optimizer kind", traj.optimizer_kind, self.kind)
        if traj.hyper != self.hyper:
            mismatch("the optimizer hyperparameters", traj.hyper, self.hyper)
        if traj.checkpoint_every != self.checkpoint_every:
            mismatch("checkpoint_every", traj.checkpoint_every, self.checkpoint_every)
        if self.dataset_size is None:   # not restated on resume: the trajectory's
            self.dataset_size = traj.dataset_size
        if traj.dataset_size != self.dataset_size:
            mismatch("dataset_size", traj.dataset_size, self.dataset_size)
        if traj.dtype != self.dtype:
            mismatch("the storage dtype", traj.dtype, self.dtype)
        if bool(traj.manifest.get("store_first_moment")) != self.store_first_moment:
            mismatch("store_first_moment", traj.manifest.get("store_first_moment"),
                     self.store_first_moment)
        traj.check()
        n = traj.num_steps
        theta = self._flat_theta()
        if not torch.equal(theta, traj.theta(n)):
            raise ValueError(f"cannot resume '{self.directory}': the model's parameters are not "
                             f"the last stored state θ_{n}; restore the checkpoint matching "
                             f"stored update {n - 1} first")
        if n == 0:
            self._check_fresh_optimizer()
            last_count, next_raw = 0, 0
        else:
            rec = traj.step(n - 1)
            last_count = rec.step_count
            next_raw = traj.raw_steps(n - 1)[-1].index + 1
            state = self.optimizer.state
            # tensors never stepped (no gradient yet) have no optimizer state: count 0
            want = list(rec.tensor_step_counts) if rec.tensor_step_counts is not None else \
                [last_count] * len(self._params)
            if self._adam:
                if not state or all(p not in state for p in self._params):
                    raise ValueError(f"cannot resume: the optimizer has no state; restore the "
                                     f"optimizer checkpoint matching stored update {n - 1}")
                have = [int(float(state[p]["step"])) if p in state and "step" in state[p] else 0
                        for p in self._params]
                if have != [int(c) for c in want]:
                    k = next(i for i, (a, b) in enumerate(zip(have, want)) if a != int(b))
                    mismatch(f"the optimizer step count of '{self._names[k]}'", want[k], have[k])

                def flat(key):
                    return self._flatten([state[p][key] if p in state and key in state[p]
                                          else torch.zeros_like(p) for p in self._params])
                if not torch.equal(flat("exp_avg_sq"), rec.exp_avg_sq):
                    raise ValueError("cannot resume: the optimizer's exp_avg_sq is not the last "
                                     "stored one; restore the matching optimizer checkpoint")
                if rec.exp_avg is not None and not torch.equal(flat("exp_avg"), rec.exp_avg):
                    raise ValueError("cannot resume: the optimizer's exp_avg is not the last "
                                     "stored one; restore the matching optimizer checkpoint")
            elif any(h["momentum"] != 0 for h in self.hyper):
                stepped = {id(p) for p in self._params if p in state}
                for gi, g in enumerate(self.optimizer.param_groups):
                    if self.hyper[gi]["momentum"] != 0 and stepped and any(
                            state.get(p, {}).get("momentum_buffer") is None
                            for p in g["params"] if p.requires_grad and id(p) in stepped):
                        raise ValueError("cannot resume: the SGD momentum buffers are missing; "
                                         "restore the optimizer checkpoint matching stored "
                                         f"update {n - 1}")
            if not self._adam and any(h["momentum"] != 0 for h in self.hyper) and not state:
                raise ValueError("cannot resume: the SGD momentum buffers are missing; restore "
                                 f"the optimizer checkpoint matching stored update {n - 1}")
        # buffers: continue with the trajectory's list (none for a trajectory recorded before
        # buffers were stored); the next stored update stores those that differ from the last
        names = set(traj.buffer_names)
        self._buffers = [(nm, b) for nm, b in self._buffers if nm in names]
        last = traj.buffers()
        self._last_buffers = {nm: last[nm].to(b.device) for nm, b in self._buffers}
        _, valid = read_log(self.directory)
        self._writer.prepare_resume(n, valid)
        self._last_theta = theta
        self._num_stored, self._next_raw, self._count = n, next_raw, last_count

    # ------------------------------------------------------------------ helpers
    def _flatten(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        # layout.flatten concatenates into fresh memory: the result never aliases the model
        return self.layout.flatten([t.detach().to("cpu") for t in tensors], dtype=self.dtype)

    def _flat_theta(self) -> torch.Tensor:
        return self._flatten(self._params)

    def _manifest(self) -> dict:
        return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                "layout": self.layout.to_dict(),
                "optimizer": {"kind": self.kind, "class": type(self.optimizer).__name__,
                              "hyper": self.hyper},
                "checkpoint_every": self.checkpoint_every,
                "store_first_moment": self.store_first_moment,
                "dataset_size": self.dataset_size,
                "dtype": str(self.dtype).replace("torch.", ""),
                "model_buffers": {"names": [n for n, _ in self._buffers],
                                  "shapes": [list(b.shape) for _, b in self._buffers],
                                  "dtypes": [str(b.dtype).replace("torch.", "")
                                             for _, b in self._buffers]},
                "torch_version": torch.__version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
