"""Record a Hugging Face ``Trainer`` run for ExPLAIND: one line before ``trainer.train()``.

    from explaind_fast.integrations.huggingface import record_trainer
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, data_collator=collator)
    rec = record_trainer(trainer, "runs/gpt2")          # an ExplaindCallback, added to the trainer
    trainer.train()
    traj = explaind_fast.Trajectory.load("runs/gpt2")
    explaind_fast.attribute(model.eval(), traj, test_batch, train_data=rec.train_data(),
                            loss_fn=rec.loss_fn, output="loss", data="sample")

What the callback does, so that the Trainer's own loop is recorded as it runs:

* **The recorder** (:class:`explaind_fast.TrajectoryRecorder`) is attached at ``on_train_begin`` to
  the torch optimizer inside the Trainer's (its AdamW with the decay / no-decay param groups),
  with the Trainer's GradScaler if it has one; the scheduler's learning rates are read every
  step, the Trainer's ``max_grad_norm`` clipping is measured as the step's common gradient factor
  (it needs no hook of its own), and steps the scaler skips are not recorded.
* **Indices** (which dataset rows formed each micro-batch): the sampler of the Trainer's train
  data loader is tapped (its batch sampler's ``sampler`` is wrapped, in the main process, so it
  works with loader workers too); each training micro-batch takes the next batch of indices, and
  its size must match the micro-batch's. No index column, no ``remove_unused_columns=False``.
* **Weights** (what each sample's loss weighs in the gradient): ``training_step`` and
  ``compute_loss`` of this trainer are wrapped (on the instance; restored at the end) to see each
  micro-batch's backpropagated loss ℓ (after the Trainer's own division for gradient
  accumulation, if any) and the per-sample losses L_k = ``loss_fn`` of the micro-batch's logits.
  The weight is w = ℓ / Σ_k L_k, snapped to the normalisation it must be — 1/N (the Trainer's
  ``num_items_in_batch``: tokens of the whole accumulated step), 1/(tokens of the micro-batch),
  1/B or 1, each possibly divided by the number of micro-batches — and refused when none fits
  (the loss is then not a uniformly weighted sum of ``loss_fn``'s per-sample losses: pass the
  matching ``loss_fn``, or the Trainer a ``compute_loss_func``). This follows whatever the
  Trainer and the model do (e.g. BERT's built-in losses are per-micro-batch means that the
  Trainer does not divide by the accumulation steps) instead of restating their rules.
* ``loss_fn`` defaults by the labels: causal LM (labels [B, T], a model whose loss shifts them)
  :func:`explaind_fast.losses.causal_lm_loss`, other [B, T] labels
  :func:`explaind_fast.losses.masked_lm_loss`, [B] labels cross-entropy.

Exactness. Hugging Face's causal LM loss upcasts the logits to float32, so a float64 model trained
with it has float32-rounded gradients (recomputed ones match to ~1e-7, data="sample" then warns);
for an exact float64 record pass ``compute_loss_func=causal_lm_trainer_loss`` to the Trainer (the
same loss without the upcast). In float32 or bfloat16 training the upcast changes nothing that
matters. The collator must be deterministic (no random masking at collate time) for per-sample
attribution; dropout must be 0 for it, as in any per-sample attribution.

Not supported (refused at ``on_train_begin``): distributed or DataParallel training (world size
or n_gpu > 1), DeepSpeed / FSDP, iterable datasets (no indices), resuming from a checkpoint,
``dataloader_in_order=False``.
"""
from __future__ import annotations

import collections
import math
from collections.abc import Mapping
from typing import Callable, Optional

import torch

from ..model import inputs as _in
from ..model.losses import (causal_lm_loss, causal_lm_token_count, cross_entropy, masked_lm_loss,
                            masked_lm_token_count)
from ..recording import TrajectoryRecorder

try:
    from transformers import TrainerCallback
except ImportError as e:      # pragma: no cover - the integration needs transformers
    raise ImportError("explaind_fast.integrations.huggingface needs transformers (and accelerate "
                      "for the Trainer): pip install transformers accelerate") from e

__all__ = ["ExplaindCallback", "record_trainer", "causal_lm_trainer_loss"]

#: relative tolerance of the measured weight against its normalisation (float32 losses: ~1e-7)
WEIGHT_RTOL = 1e-5


def causal_lm_trainer_loss(outputs, labels, num_items_in_batch=None):
    """A ``compute_loss_func`` for the Trainer: Hugging Face's causal LM loss (the mean over the
    predicted tokens of the accumulated step, or of the micro-batch when ``num_items_in_batch`` is
    None) computed in the logits' own dtype, i.e. Σ_k causal_lm_loss_k / N without the float32
    upcast: exact in float64. Labels are −100 where nothing is predicted (padding)."""
    logits = _in.select_output(outputs, "logits")
    total = causal_lm_loss(logits, labels).sum()
    if num_items_in_batch is None:
        n = causal_lm_token_count(labels).sum().clamp_min(1).to(total.dtype)
        return total / n
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


class _IndexTap:
    """Wraps the sampler of a BatchSampler: passes every index through and appends each batch of
    indices (grouped as the BatchSampler groups them) to ``queue`` as it is drawn."""

    def __init__(self, sampler, batch_size: int, drop_last: bool, queue: collections.deque):
        self.sampler, self.batch_size, self.drop_last, self.queue = \
            sampler, int(batch_size), bool(drop_last), queue

    def __iter__(self):
        self.queue.clear()      # a new pass: batches of an unfinished earlier one were not trained
        buf = []
        for i in self.sampler:
            buf.append(int(i))
            if len(buf) == self.batch_size:
                self.queue.append(buf)
                buf = []
            yield i
        if buf and not self.drop_last:
            self.queue.append(buf)

    def __len__(self):
        return len(self.sampler)

    def __getattr__(self, name):          # set_epoch, generator, …
        return getattr(self.sampler, name)


def _batch_len(inputs) -> int:
    if isinstance(inputs, Mapping):
        for k in ("input_ids", "inputs_embeds", "pixel_values", "input_values"):
            v = inputs.get(k)
            if torch.is_tensor(v):
                return int(v.shape[0])
    for _, t in _in.tensor_leaves(dict(inputs) if isinstance(inputs, Mapping) else inputs):
        return int(t.shape[0])
    raise ValueError("the micro-batch holds no tensor")


def _is_causal_lm(trainer, model) -> bool:
    """Whether the model's labels are shifted (next-token prediction): the Trainer's own test for
    label smoothing (the model class is a causal LM), or its loss type, or our loss function."""
    if getattr(trainer, "compute_loss_func", None) is causal_lm_trainer_loss:
        return True
    if getattr(trainer, "_loss_shifts_labels", False):
        return True
    model = getattr(trainer.accelerator, "unwrap_model", lambda m: m)(model)
    name = type(model).__name__
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        if name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
            return True
    except ImportError:       # pragma: no cover - layout of other transformers versions
        pass
    return "CausalLM" in name or name.endswith("LMHeadModel")


class ExplaindCallback(TrainerCallback):
    """Records ``trainer``'s run into ``directory`` (module docstring). Create it after the
    Trainer and add it with ``trainer.add_callback`` (or use :func:`record_trainer`).

    Args:
        trainer: the transformers.Trainer whose run is recorded.
        directory: the trajectory directory (:class:`explaind_fast.TrajectoryRecorder`).
        loss_fn: per-sample loss(logits, targets) -> [B] that the attribution will use; default by
            the labels (module docstring). ``targets`` is {"labels", "attention_mask"} (the mask
            when the batch has one), as ``attribute`` builds them from a dict ``train_data``.
        **recorder_kw: passed to TrajectoryRecorder (checkpoint_every, fsync, write_behind, …).
    """

    def __init__(self, trainer, directory: str, *, loss_fn: Optional[Callable] = None,
                 **recorder_kw):
        self.trainer = trainer
        self.directory = str(directory)
        self._loss_fn = loss_fn
        self.recorder_kw = recorder_kw
        self.recorder: Optional[TrajectoryRecorder] = None
        self._queue: collections.deque = collections.deque()
        self._restore = []
        self._mb = None
        self._collate = None
        self.weights_seen = collections.Counter()   # which normalisation each micro-batch had

    # ------------------------------------------------------------------ public
    @property
    def loss_fn(self) -> Callable:
        """The per-sample loss the weights were measured with (pass it to ``attribute``)."""
        return self._loss_fn if self._loss_fn is not None else cross_entropy

    def train_data(self):
        """The whole training set as one dict batch in dataset order (``attribute``'s
        ``train_data``), collated by the Trainer's training collator (padding to the longest
        sequence; unused columns removed as in training)."""
        ds = self.trainer.train_dataset
        collate = self._collate or self.trainer.data_collator
        batch = collate([ds[i] for i in range(len(ds))])
        return {k: v for k, v in dict(batch).items() if torch.is_tensor(v)}

    def close(self) -> None:
        """Close the recorder and undo the wrappers (done at the end of training)."""
        for obj, name, had, old in reversed(self._restore):
            if had:
                setattr(obj, name, old)
            else:
                try:
                    delattr(obj, name)
                except AttributeError:
                    pass
        self._restore = []
        if self.recorder is not None:
            rec, self.recorder = self.recorder, None
            rec.close()

    # ------------------------------------------------------------------ callback events
    def on_train_begin(self, args, state, control, model=None, optimizer=None,
                       train_dataloader=None, **kwargs):
        t = self.trainer
        if getattr(args, "world_size", 1) > 1 or getattr(args, "n_gpu", 1) > 1:
            raise NotImplementedError("ExplaindCallback records single-process, single-device "
                                      "Trainer runs (world_size and n_gpu 1)")
        if getattr(t, "is_deepspeed_enabled", False) or getattr(t, "is_fsdp_enabled", False):
            raise NotImplementedError("ExplaindCallback does not record DeepSpeed or FSDP runs")
        if state.global_step > 0:
            raise NotImplementedError("ExplaindCallback records a run from its start; resuming a "
                                      "Trainer checkpoint is not supported")
        if getattr(args, "dataloader_in_order", True) is False:
            raise NotImplementedError("dataloader_in_order=False: batches would not arrive in the "
                                      "order their indices were drawn")
        torch_opt = getattr(optimizer, "optimizer", optimizer)
        unwrap = getattr(t.accelerator, "unwrap_model", None)
        module = unwrap(t.model) if callable(unwrap) else t.model
        kw = dict(self.recorder_kw)
        kw.setdefault("dataset_size", len(t.train_dataset))
        scaler = getattr(t.accelerator, "scaler", None)
        if scaler is not None:
            kw.setdefault("grad_scaler", scaler)
        try:
            self._tap(train_dataloader)
            self._collate = getattr(train_dataloader, "collate_fn", None)
            self.recorder = TrajectoryRecorder(module, torch_opt, self.directory, **kw)
            self._wrap(t, "compute_loss", self._compute_loss_wrapper(t.compute_loss))
            self._wrap(t, "training_step", self._training_step_wrapper(t.training_step))
        except BaseException:
            self.close()
            raise

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    # ------------------------------------------------------------------ plumbing
    def _tap(self, dl) -> None:
        bs = getattr(dl, "batch_sampler", None)
        bs = getattr(bs, "batch_sampler", bs)           # accelerate's BatchSamplerShard
        if bs is None or not hasattr(bs, "sampler") or not hasattr(bs, "batch_size"):
            raise NotImplementedError(
                "the Trainer's train data loader has no batch sampler with a sampler (an "
                "iterable dataset?): the recorder needs the dataset index of every sample")
        self._wrap(bs, "sampler", _IndexTap(bs.sampler, bs.batch_size, bs.drop_last, self._queue))

    def _wrap(self, obj, name, value):
        """Set ``obj.name = value`` on the instance, remembering how to undo it."""
        had = name in vars(obj)
        old = vars(obj).get(name)
        setattr(obj, name, value)
        self._restore.append((obj, name, had, old))

    def _recording(self, model) -> bool:
        return self.recorder is not None and model.training and torch.is_grad_enabled()

    def _compute_loss_wrapper(self, inner):
        def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None, **kw):
            if not self._recording(model):
                return inner(model, inputs, return_outputs=return_outputs,
                             num_items_in_batch=num_items_in_batch, **kw)
            labels = inputs.get("labels") if isinstance(inputs, Mapping) else None
            mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
            loss, outputs = inner(model, inputs, return_outputs=True,
                                  num_items_in_batch=num_items_in_batch, **kw)
            self._mb = self._measure(model, outputs, labels, mask, num_items_in_batch)
            return (loss, outputs) if return_outputs else loss
        return compute_loss

    def _training_step_wrapper(self, inner):
        def training_step(model, inputs, num_items_in_batch=None, *args, **kw):
            if not self._recording(model):
                return inner(model, inputs, num_items_in_batch, *args, **kw)
            if not self._queue:
                raise RuntimeError("ExplaindCallback: a training micro-batch arrived without its "
                                   "dataset indices (the train data loader's sampler was not "
                                   "tapped, or batches were drawn elsewhere)")
            idx = self._queue.popleft()
            B = _batch_len(inputs)
            if len(idx) != B:
                raise RuntimeError(f"ExplaindCallback: the micro-batch has {B} samples but its "
                                   f"sampler drew {len(idx)} indices: the collator merges, drops "
                                   "or splits samples, so samples cannot be matched to rows")
            self._mb = None
            out = inner(model, inputs, num_items_in_batch, *args, **kw)
            if self._mb is None:
                raise RuntimeError("ExplaindCallback: training_step did not call compute_loss; "
                                   "the sample weights cannot be measured")
            ga = getattr(self.trainer.accelerator, "gradient_accumulation_steps", 1) or 1
            backprop = float(out.detach().double()) / ga
            w = self._weight(backprop, B)
            self.recorder.set_batch(torch.as_tensor(idx), torch.full((B,), w, dtype=torch.float64))
            return out
        return training_step

    def _default_loss(self, model, labels):
        if self._loss_fn is not None:
            return self._loss_fn
        if labels is None:
            raise ValueError("ExplaindCallback: the batch has no 'labels'; pass loss_fn= (the "
                             "per-sample loss of the Trainer's loss)")
        if labels.dim() == 2:
            self._loss_fn = causal_lm_loss if _is_causal_lm(self.trainer, model) else masked_lm_loss
        elif labels.dim() == 1 and not labels.is_floating_point():
            self._loss_fn = cross_entropy
        else:
            raise ValueError(f"ExplaindCallback: labels of shape {tuple(labels.shape)}: pass "
                             "loss_fn= (the per-sample loss of the Trainer's loss)")
        return self._loss_fn

    def _measure(self, model, outputs, labels, mask, num_items):
        loss_fn = self._default_loss(model, labels)
        targets = labels if mask is None or labels is None else \
            {"labels": labels, "attention_mask": mask}
        logits = _in.select_output(outputs, "logits")
        with torch.no_grad():
            per = loss_fn(logits.detach().double(), targets)
        counts = {}
        if labels is not None and labels.dim() == 2:
            if loss_fn is causal_lm_loss:
                counts["tokens"] = int(causal_lm_token_count(targets).sum())
            elif loss_fn is masked_lm_loss:
                counts["tokens"] = int(masked_lm_token_count(targets).sum())
        if num_items is not None:
            counts["num_items"] = float(num_items)
        return {"total": float(per.sum()), "counts": counts}

    def _weight(self, backprop: float, B: int) -> float:
        mb = self._mb
        k = int(getattr(self.trainer, "current_gradient_accumulation_steps", 1) or 1)
        bases = [("1/num_items_in_batch", mb["counts"].get("num_items")),
                 ("1/tokens of the micro-batch", mb["counts"].get("tokens")),
                 ("1/batch size", B), ("1", 1)]
        candidates = []
        for name, n in bases:
            if n is None or n <= 0:
                continue
            candidates.append((name, 1.0 / n))
            if k > 1:
                candidates.append((f"{name} / {k} micro-batches", 1.0 / (n * k)))
        total = mb["total"]
        if total == 0.0 or not math.isfinite(total) or not math.isfinite(backprop):
            name, w = candidates[0]              # nothing to measure with: the Trainer's rule
            self.weights_seen[name] += 1
            return w
        measured = backprop / total
        for name, w in candidates:
            if abs(measured - w) <= WEIGHT_RTOL * w:
                self.weights_seen[name] += 1
                return w
        raise RuntimeError(
            f"ExplaindCallback: the Trainer backpropagated {backprop:.9g} for a micro-batch whose "
            f"per-sample losses ({getattr(self.loss_fn, '__name__', self.loss_fn)}) sum to "
            f"{total:.9g}: weight {measured:.9g}, which is none of the normalisations "
            f"{', '.join(f'{n} = {w:.6g}' for n, w in candidates)}. The loss is not a uniformly "
            "weighted sum of these per-sample losses (label smoothing, an auxiliary loss, "
            "another reduction): pass the matching loss_fn=, or give the Trainer a "
            "compute_loss_func")


def record_trainer(trainer, directory: str, **kw) -> ExplaindCallback:
    """Add an :class:`ExplaindCallback` recording ``trainer``'s next ``train()`` into
    ``directory`` and return it (``**kw``: loss_fn and the recorder's options)."""
    cb = ExplaindCallback(trainer, directory, **kw)
    trainer.add_callback(cb)
    return cb
