"""Record a training run exactly, for ExPLAIND, with two optimizer hooks.

Usage (the loop changes by one ``set_batch`` line; see also :func:`explaind_fast.indexed_loader`)::

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    with TrajectoryRecorder(model, opt, "runs/mine", dataset_size=len(data)) as rec:
        for indices, x, y in indexed_loader(data, batch_size=64, shuffle=True):
            rec.set_batch(indices)                  # weights default to 1/len: a mean loss
            opt.zero_grad()
            loss_fn(model(x), y).backward()         # reduction="mean"
            rec.clip_grad_norm_(1.0)                # optional; NOT torch.nn.utils.clip_grad_norm_
            opt.step()
            scheduler.step()                        # any LR scheduler: lr is read every step

What is recorded (docs/design.md §5), per stored update s: θ_{s+1} (θ_0 at the start), the second moment
v_{s+1} (Adam-type), and for every raw optimizer step the learning rate and weight decay of each
param group, torch's step counter, the batch indices and loss weights given to ``set_batch``, and the
gradient-clipping factor. The first moment is not stored by default: with every step recorded it
follows from the step identity (θ_{s+1} − θ_s = −Φ_s − r_s); it is stored when
``store_first_moment=True``, when checkpoint_every > 1, and for any step where some group has
lr = 0 (the identity then does not determine it).

Supported, exact: torch.optim.AdamW (Theorem 3.1), torch.optim.Adam with coupled (L2) weight decay
(the decay flows through both moments; exact because the first moment is linear and the second
enters only through the stored v), torch.optim.SGD with momentum (or none), coupled weight decay,
dampening 0 (Corollary 3.2); param groups with their own lr and weight decay; any LR scheduler;
full and mini batches; foreach and fused implementations (what the optimizer produced is what is
recorded; tested for all three optimizers on the CPU); capturable / differentiable (same update); ``clip_grad_norm_`` of this recorder (a per-step factor that folds into the sample
weights); ``clip_grad_value_`` of this recorder when it clamps nothing.

Refused with an error saying why: other optimizer classes, amsgrad, maximize, nesterov, dampening
≠ 0, Adam with decoupled_weight_decay on a mixed basis, betas / eps / momentum changing mid-run,
param groups added or changing membership, parameters frozen or unfrozen mid-run, a trainable
parameter with no gradient at a step (torch would skip it), a step without ``set_batch``, parameters
modified outside ``optimizer.step()`` between steps, an optimizer that already holds state (the
recorded run must start from zero moments), and (``check_gradients=True``, the default) gradients
changed between backward() and optimizer.step() outside the recorder. So clipping with
``torch.nn.utils.clip_grad_norm_`` directly — which the recorder cannot see, and which would make
the stored sample weights wrong — is caught: use ``recorder.clip_grad_norm_``.
``recorder.clip_grad_value_`` raises (leaving the gradients untouched) when it would clamp any
coordinate: clamping is not a per-step scale, so the step would not decompose exactly.
Gradient accumulation over several backward() calls is fine (declare the union batch and its
weights in ``set_batch``). Not supported: torch.amp.GradScaler (its unscale_ edits gradients).

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
stored update loadable. One recorder per directory: a recorder holds the directory's exclusive
writer lock (``writer.lock``, an flock) from construction until ``close()`` (or until a failure
stops it); a second recorder on the same directory, in any process, raises
``TrajectoryLockedError`` at construction. The lock of a killed process is released by the kernel,
so resuming after a crash needs no clean-up. Opening a directory that already holds a trajectory
raises unless ``resume=True``; resuming continues only if the model and optimizer match the
manifest and the model's θ (and, Adam-type, the optimizer's step count and v) equal the last stored
ones, i.e. after restoring the checkpoint that corresponds to the last stored update.
``resume=True`` on an empty or missing directory starts a new trajectory.

Peak extra memory while recording, in elements of the storage dtype: the previous θ (kept to detect
changes between steps) and, while a step is written, θ_{s+1}, v (and m) and their serialised
bytes: about 5·D (7·D with m); with write_behind add 2·D (3·D) per queued step (at most 3).
"""
from __future__ import annotations

import time
from typing import Dict, List, Optional, Sequence

import torch

from ..model import ParamLayout
from ..model.inputs import canonical_name, unwrap_compiled
from ..optim import RULES, check_group_settings, constant_hyper, optimizer_kind
from ..store import (FORMAT_NAME, FORMAT_VERSION, INIT_FILE, LOCK_FILE, MANIFEST, BackgroundWriter,
                     Trajectory, TrajectoryWriter, read_log)

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
        check_gradients: at every step, compare each parameter's gradient norm with its norm
            when backward() produced it (times the recorded clip factor) and refuse the step if
            they differ: catches torch.nn.utils.clip_grad_norm_ / clip_grad_value_ called
            directly, gradients edited or assigned by hand, and GradScaler.unscale_ (not
            supported). Costs one norm per parameter per backward.
        write_behind: serialise, hash, write and fsync each stored step on a background thread,
            overlapping the next training step (hides the disk latency). A step is then on disk
            only after up to two further steps or ``close()``; a killed run loses at most the
            queued steps; a write error is raised at the next step or at ``close()``.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: str,
                 checkpoint_every: int = 1, *, dataset_size: Optional[int] = None,
                 store_first_moment: bool = False, resume: bool = False, fsync: bool = True,
                 check_gradients: bool = True, write_behind: bool = False):
        if int(checkpoint_every) != checkpoint_every or checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be a positive integer, got {checkpoint_every}")
        if dataset_size is not None and (int(dataset_size) != dataset_size or dataset_size < 1):
            raise ValueError(f"dataset_size must be a positive integer, got {dataset_size}")
        # a torch.compile'd module: record its plain module (names without "_orig_mod.", also
        # for compiled submodules: ParamLayout canonicalises every name)
        model = unwrap_compiled(model)
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
        self._writer = TrajectoryWriter(self.directory, fsync=fsync)
        self.write_behind = bool(write_behind)
        self._background: Optional[BackgroundWriter] = None
        self._batch = None
        self._clip = 1.0
        self._pending: List[dict] = []        # raw steps of the current, unfinished interval
        self._step_state: Optional[dict] = None
        self._failed: Optional[str] = None
        self._closed = False

        self._handles = []
        # The exclusive writer lock, held until close() (or a failure): taken before looking at
        # the directory, so that two recorders can never both create or resume it. A second
        # recorder gets TrajectoryLockedError here.
        self._writer.open()
        try:
            if self._writer.exists(MANIFEST):
                if not resume:
                    raise FileExistsError(
                        f"'{self.directory}' already holds a trajectory; pass resume=True to "
                        "continue it (after restoring the matching model/optimizer checkpoint) or "
                        "choose a new directory. It is never overwritten.")
                self._resume()
            else:
                # what a run killed while creating the trajectory leaves may be overwritten
                debris = {INIT_FILE, INIT_FILE + ".tmp", MANIFEST + ".tmp", LOCK_FILE}
                if set(self._writer.listdir()) - debris:
                    raise FileExistsError(f"'{self.directory}' is not empty and holds no "
                                          "trajectory; refusing to write into it")
                self._check_fresh_optimizer()
                self._last_theta = self._flat_theta()
                self._writer.create(self._manifest(), self._last_theta)
                self._num_stored, self._next_raw, self._sgd_count = 0, 0, 0
            if self.write_behind:   # after create/resume, which write synchronously
                self._background = BackgroundWriter(self._writer)
            self._handles = [optimizer.register_step_pre_hook(self._pre_hook),
                             optimizer.register_step_post_hook(self._post_hook)]
            self.check_gradients = bool(check_gradients)
            self._grad_norms: Dict[int, torch.Tensor] = {}   # norm of each grad after backward
            if self.check_gradients:
                self._handles += [p.register_post_accumulate_grad_hook(self._grad_hook(i))
                                  for i, p in enumerate(self._params)]
        except BaseException:
            for h in self._handles:
                h.remove()
            self._closed = True
            self._stop_writing(remove_if_unused=True)
            raise

    # ------------------------------------------------------------------ user API
    @property
    def num_steps(self) -> int:
        """Stored updates recorded so far (with write_behind, the last few may still be queued;
        see ``flush``)."""
        return self._num_stored

    def set_batch(self, indices, weights=None) -> None:
        """Declare the batch of the next ``optimizer.step()``: dataset indices [B] (ints) and loss
        weights [B] with g = Σ_k w_k ∇L_k; default 1/B (a mean-reduced loss). For a sum-reduced
        loss pass ones. Must be called before every step."""
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
            w = torch.full((idx.numel(),), 1.0 / idx.numel(), dtype=torch.float64)
        else:
            w = torch.as_tensor(weights).detach().to("cpu", torch.float64).clone()
            if w.shape != idx.shape:
                raise ValueError(f"set_batch: {w.numel()} weights for {idx.numel()} indices")
            if not bool(torch.isfinite(w).all()):
                raise ValueError("set_batch: weights must be finite")
        self._batch = (idx, w)

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip the gradients of θ like ``torch.nn.utils.clip_grad_norm_`` (scale by
        min(1, max_norm/(total_norm + 1e-6))) and record the factor. Returns the total norm."""
        grads = self._grads("clip_grad_norm_")
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
        for name, g in zip(self._names, self._grads("clip_grad_value_")):
            n = int((g.abs() > clip_value).sum())
            if n:
                raise ValueError(
                    f"clip_grad_value_({clip_value}) would clamp {n} coordinates of '{name}'; "
                    "value clipping is exact only when it clamps nothing. Use "
                    "recorder.clip_grad_norm_ (a per-step scale) instead")

    def close(self) -> None:
        """Store the last, partial interval (k > 1) and detach from the optimizer."""
        if self._closed:
            return
        try:
            if self._pending and self._failed is None:
                self._check_unchanged()
                self._flush()
        finally:
            for h in self._handles:
                h.remove()
            self._closed = True
            try:
                if self._background is not None:
                    self._background.close()   # waits for the queued steps; re-raises a failure
            finally:
                self._writer.close()           # releases the writer lock

    def _stop_writing(self, remove_if_unused: bool = False) -> None:
        """After a failure nothing more is written: let queued writes finish (a background error
        is re-raised later by flush()/close()), then release the writer lock, so that the
        directory can be resumed (also from this process)."""
        try:
            if self._background is not None:
                self._background.close()
        except BaseException:
            pass
        finally:
            self._writer.close(remove_if_unused=remove_if_unused)

    def flush(self) -> None:
        """With write_behind: wait until every recorded step is on disk (no-op otherwise)."""
        if self._background is not None:
            self._background.flush()

    def __enter__(self) -> "TrajectoryRecorder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ hooks
    def _pre_hook(self, optimizer, args, kwargs):
        if self._closed:
            return  # detached; the hooks are removed in close()
        if self._failed is not None:
            raise RuntimeError(f"the recorder stopped after an error and cannot record further "
                               f"steps: {self._failed}")
        if self._background is not None and self._background.error is not None:
            self._failed = f"a background write failed: {self._background.error!r}"
            self._stop_writing()
            self._background.raise_if_failed()
        closure = args[1] if len(args) > 1 else kwargs.get("closure")  # args[0] is the optimizer
        if closure is not None:
            raise RuntimeError("optimizer.step(closure) is not supported while recording: the "
                               "closure computes gradients inside the step, after the recorder's "
                               "checks; call backward() before optimizer.step()")
        if self._batch is None:
            raise RuntimeError("call recorder.set_batch(indices) before every optimizer.step(): "
                               "the trajectory must know which samples formed the batch")
        self._check_settings_unchanged()
        self._check_unchanged()
        grads = self._grads("optimizer.step()")
        if self.check_gradients:
            self._check_gradients_untouched(grads)
        self._step_state = {
            "lr": [float(g["lr"]) for g in optimizer.param_groups],
            "weight_decay": [float(g["weight_decay"]) for g in optimizer.param_groups]}

    def _post_hook(self, optimizer, args, kwargs):
        if self._closed:
            return
        try:
            self._record_step()
        except Exception as e:
            self._failed = f"{type(e).__name__}: {e}"
            self._stop_writing()
            raise

    def _record_step(self):
        theta = self._flat_theta()
        idx, w = self._batch
        if self._adam:
            counts = {float(self.optimizer.state[p]["step"]) for p in self._params}
            if len(counts) != 1:
                raise RuntimeError(f"parameters have different optimizer step counts {counts}")
            step_count = int(counts.pop())
        else:
            self._sgd_count += 1
            step_count = self._sgd_count
        st = self._step_state
        store_m = self.store_first_moment or self._needs_first_moment(st["lr"])
        j = len(self._pending)
        # compact batches: int32 indices when they fit, one exact float for equal weights
        uniform = bool((w == w[0]).all())
        tensors = {f"batch_indices.{j}": idx.to(torch.int32) if int(idx.max()) < 2**31 else idx}
        if not uniform:
            tensors[f"batch_weights.{j}"] = w
        self._pending.append({
            "raw": {"index": self._next_raw, "step_count": step_count, "lr": st["lr"],
                    "weight_decay": st["weight_decay"], "clip_factor": self._clip,
                    "batch_size": int(idx.numel()),
                    "uniform_weight": float(w[0]) if uniform else None},
            "tensors": tensors,
            "store_m": store_m,
            # momentum-free SGD groups keep no buffer: compute torch's direction g + λθ_s now,
            # while θ_s (self._last_theta) and the gradient are at hand
            "sgd_direction": self._sgd_direction(st) if store_m and not self._adam else None})
        self._next_raw += 1
        self._last_theta = theta
        self._batch, self._clip, self._step_state = None, 1.0, None
        self._grad_norms = {}
        if len(self._pending) == self.checkpoint_every:
            self._flush()

    # ------------------------------------------------------------------ writing
    def _flush(self):
        tensors = {"theta": self._last_theta}
        for item in self._pending:
            tensors.update(item["tensors"])
        state = self.optimizer.state
        if self._adam:
            tensors["exp_avg_sq"] = self._flatten([state[p]["exp_avg_sq"] for p in self._params])
        if self.store_first_moment or any(i["store_m"] for i in self._pending):
            if self._adam:
                tensors["exp_avg"] = self._flatten([state[p]["exp_avg"] for p in self._params])
            else:
                direction = self._pending[-1].get("sgd_direction")
                parts = []
                for i, p in enumerate(self._params):
                    buf = state[p].get("momentum_buffer") if p in state else None
                    parts.append(buf if buf is not None else direction[i])
                tensors["exp_avg"] = self._flatten(parts)
        payload = {"raw": [i["raw"] for i in self._pending], "time": time.time()}
        (self._background or self._writer).append(self._num_stored, tensors, payload)
        self._num_stored += 1
        self._pending = []

    def _sgd_direction(self, st) -> List[Optional[torch.Tensor]]:
        """torch SGD's d_p = g + λθ_s for parameters of momentum-free groups (else None)."""
        out = []
        group_of = self.layout.group_of_tensor
        off = self.layout.offsets
        for i, p in enumerate(self._params):
            gi = group_of[i]
            if self.hyper[gi]["momentum"] != 0:
                out.append(None)
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

    # ------------------------------------------------------------------ checks
    def _grads(self, where) -> List[torch.Tensor]:
        grads = []
        for name, p in zip(self._names, self._params):
            if p.grad is None:
                raise RuntimeError(
                    f"{where}: trainable parameter '{name}' has no gradient; torch would skip it "
                    "(no update, no weight decay) and the step would not decompose exactly. Use "
                    "zero_grad(set_to_none=False), or freeze it for the whole run")
            grads.append(p.grad)
        return grads

    def _grad_hook(self, i):
        def hook(p):
            self._grad_norms[i] = torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float64)
        return hook

    def _check_gradients_untouched(self, grads):
        for i, (name, g) in enumerate(zip(self._names, grads)):
            if i not in self._grad_norms:
                raise RuntimeError(
                    f"the gradient of '{name}' was not produced by backward() since the last step "
                    "(assigned by hand, or left over); the recorded batch would not explain it")
        now = torch.stack([torch.linalg.vector_norm(g.detach(), dtype=torch.float64)
                           for g in grads]).cpu()
        expected = torch.stack([self._grad_norms[i] for i in range(len(grads))]).cpu() * self._clip
        # scaling every element by the clip factor changes a norm by at most ~eps relatively
        rtol = torch.tensor([16 * torch.finfo(g.dtype).eps for g in grads], dtype=torch.float64)
        bad = ((now - expected).abs() > rtol * expected) | ~torch.isfinite(now)
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise RuntimeError(
                f"the gradient of '{self._names[i]}' changed between backward() and "
                f"optimizer.step() outside the recorder (norm {float(expected[i]):.6g} -> "
                f"{float(now[i]):.6g}): torch.nn.utils.clip_grad_norm_ / clip_grad_value_ called "
                "directly, or gradients edited, are not seen by the recorder and would make the "
                "stored sample weights wrong. Use recorder.clip_grad_norm_, or pass "
                "check_gradients=False if the change is accounted for in set_batch's weights")

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
            if self._adam:
                if any(p not in state or "step" not in state[p] for p in self._params):
                    raise ValueError(f"cannot resume: the optimizer has no state; restore the "
                                     f"optimizer checkpoint matching stored update {n - 1}")
                count = float(state[self._params[0]]["step"])
                if count != last_count:
                    mismatch("the optimizer step count", last_count, count)
                v = self._flatten([state[p]["exp_avg_sq"] for p in self._params])
                if not torch.equal(v, rec.exp_avg_sq):
                    raise ValueError("cannot resume: the optimizer's exp_avg_sq is not the last "
                                     "stored one; restore the matching optimizer checkpoint")
                if rec.exp_avg is not None and not torch.equal(
                        self._flatten([state[p]["exp_avg"] for p in self._params]), rec.exp_avg):
                    raise ValueError("cannot resume: the optimizer's exp_avg is not the last "
                                     "stored one; restore the matching optimizer checkpoint")
            elif any(h["momentum"] != 0 for h in self.hyper):
                for gi, g in enumerate(self.optimizer.param_groups):
                    if self.hyper[gi]["momentum"] != 0 and any(
                            state.get(p, {}).get("momentum_buffer") is None
                            for p in g["params"] if p.requires_grad):
                        raise ValueError("cannot resume: the SGD momentum buffers are missing; "
                                         "restore the optimizer checkpoint matching stored "
                                         f"update {n - 1}")
        _, valid = read_log(self.directory)
        self._writer.prepare_resume(n, valid)
        self._last_theta = theta
        self._num_stored, self._next_raw, self._sgd_count = n, next_raw, last_count

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
                "torch_version": torch.__version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
