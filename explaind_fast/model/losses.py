"""Per-sample losses for :func:`explaind_fast.attribute` (public as :mod:`explaind_fast.losses`).

A loss function is ``loss_fn(outputs, targets) -> [B]``: one loss per sample of the batch, where
``outputs`` is the model's selected output tensor (logits, see ``model_output``) and ``targets``
the batch's targets (a tensor, or for a dict batch in the Hugging Face layout
``{"labels": [B, T], "attention_mask": [B, T]}``, :func:`explaind_fast.model.inputs.split_labels`).
The recorded training step must have minimised Σ_k w_k L_k with the weights w given to
``TrajectoryRecorder.set_batch``.

**Causal language models** (next-token prediction; logits [B, T, V], labels [B, T]). The logits
at position t predict the label at t + 1 (the Hugging Face shift: ``logits[:, :-1]`` against
``labels[:, 1:]``); a predicted position is ignored where its label is ``ignore_index`` (-100) or
where the attention mask is 0.

Recipe for a Hugging Face training loop. Its loss is the mean over all predicted tokens of the
batch, L = (1/N) Σ_k Σ_t ℓ_{k,t} with N the tokens of the batch, i.e. Σ_k w_k L_k with per-sequence
sums L_k = Σ_t ℓ_{k,t} (``causal_lm_loss``, reduction "sum") and w_k = 1/N for every sequence
(:func:`causal_lm_batch_weights`)::

    rec.set_batch(indices, causal_lm_batch_weights(labels))
    out = model(input_ids=ids, attention_mask=mask)
    loss = (causal_lm_loss(out.logits, labels) * weights).sum()    # = HF's loss (labels=...)
    ...
    attribute(model, traj, test_batch, train_data=train_batch, loss_fn=causal_lm_loss,
              output="loss", data="sample")

(Hugging Face's own loss upcasts the logits to float32, ``logits.float()``, so a float64 run that
trains with ``model(..., labels=labels).loss`` records float32-rounded gradients, which recomputed
gradients match only to ~1e-7; compute the same loss with :func:`causal_lm_loss` for an exact
float64 record — with the Trainer, ``compute_loss_func=explaind_fast.integrations.huggingface.
causal_lm_trainer_loss``. A float32 run loses nothing: the upcast is then the identity.) Reduction
"mean" (per-sequence mean over its tokens, weights 1/B) is the other common objective, the mean of
per-sequence means.

**Gradient accumulation.** The weights are those of the loss that is backpropagated, summed over
the micro-batches of the step (``set_batch`` once per micro-batch accumulates them):

* Hugging Face's per-token mean over the *whole step* (the Trainer's ``num_items_in_batch``): every
  sequence of every micro-batch weighs 1/N, N the predicted tokens of all micro-batches —
  ``causal_lm_batch_weights(micro_targets, num_items=N)``;
* a per-token mean per micro-batch divided by the number of micro-batches k —
  ``causal_lm_batch_weights(micro_targets)`` with ``set_batch(..., scale=1/k)``.

**Masked language models** (BERT's MLM head; logits [B, T, V], labels [B, T] with −100 except at
the masked positions): :func:`masked_lm_loss`, the per-sequence sum over its masked positions (no
shift); ``torch.nn.CrossEntropyLoss()`` over a batch (BertForMaskedLM's own loss) is Σ_k w_k·L_k
with w_k = 1/(masked tokens of the batch), :func:`masked_lm_batch_weights`.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from .inputs import ATTENTION_MASK, LABELS

IGNORE_INDEX = -100


def labels_and_mask(targets):
    """(labels, attention mask or None) of a labels tensor or a ``{"labels", "attention_mask"}``
    Mapping."""
    if isinstance(targets, Mapping):
        if LABELS not in targets:
            raise ValueError(f"targets is a Mapping without '{LABELS}' (keys {sorted(targets)})")
        return targets[LABELS], targets.get(ATTENTION_MASK)
    if not isinstance(targets, torch.Tensor):
        raise ValueError(f"targets must be a labels tensor or a Mapping with '{LABELS}', got "
                         f"{type(targets).__name__}")
    return targets, None


def cross_entropy(outputs, targets):
    """Per-sample cross-entropy (reduction='none'): the default ``loss_fn``. ``targets``: class
    indices [B] (or probabilities), or a Mapping whose ``"labels"`` holds them."""
    labels, _ = labels_and_mask(targets)
    return F.cross_entropy(outputs, labels, reduction="none")


def _causal_valid(labels, mask, ignore_index):
    lab = labels[:, 1:]
    valid = lab != ignore_index
    if mask is not None:
        valid = valid & (mask[:, 1:] != 0)
    return lab, valid


def causal_lm_token_losses(outputs, targets, ignore_index: int = IGNORE_INDEX):
    """Next-token cross-entropy per predicted position: logits [B, T, V] -> [B, T − 1], entry t
    the loss of predicting token t + 1 from the prefix up to t; 0 where ignored (label
    ``ignore_index`` or attention mask 0)."""
    labels, mask = labels_and_mask(targets)
    if outputs.dim() != 3 or labels.dim() != 2 or outputs.shape[:2] != labels.shape:
        raise ValueError(f"causal LM losses need logits [B, T, V] and labels [B, T]; got logits "
                         f"{tuple(outputs.shape)} and labels {tuple(labels.shape)}")
    B, T, V = outputs.shape
    lab, valid = _causal_valid(labels, mask, ignore_index)
    safe = torch.where(valid, lab, torch.zeros_like(lab))
    ce = F.cross_entropy(outputs[:, :-1].reshape(B * (T - 1), V), safe.reshape(-1),
                         reduction="none").reshape(B, T - 1)
    return torch.where(valid, ce, torch.zeros_like(ce))


def causal_lm_loss(outputs, targets, reduction: str = "sum", ignore_index: int = IGNORE_INDEX):
    """Next-token loss per sequence: logits [B, T, V], labels [B, T] (or a ``{"labels",
    "attention_mask"}`` Mapping) -> [B]. ``reduction``: "sum" over the sequence's predicted tokens
    (with weights 1/tokens-in-the-batch this is Hugging Face's batch loss; module docstring) or
    "mean" (over the sequence's own tokens; 0 for a sequence without any). For "mean" pass
    ``functools.partial(causal_lm_loss, reduction="mean")`` as loss_fn."""
    tok = causal_lm_token_losses(outputs, targets, ignore_index)
    if reduction == "sum":
        return tok.sum(1)
    if reduction == "mean":
        labels, mask = labels_and_mask(targets)
        _, valid = _causal_valid(labels, mask, ignore_index)
        return tok.sum(1) / valid.sum(1).clamp_min(1).to(tok.dtype)
    raise ValueError(f"causal_lm_loss: reduction={reduction!r}, expected 'sum' or 'mean'")


def causal_lm_token_count(targets, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Predicted (not ignored) tokens per sequence, int64 [B]."""
    labels, mask = labels_and_mask(targets)
    return _causal_valid(labels, mask, ignore_index)[1].sum(1)


def causal_lm_batch_weights(targets, ignore_index: int = IGNORE_INDEX,
                            num_items=None) -> torch.Tensor:
    """The ``set_batch`` weights that make Σ_k w_k·causal_lm_loss_k (reduction "sum") the mean over
    all predicted tokens of the batch, as Hugging Face computes it: 1/N for every sequence, N the
    batch's predicted tokens — or ``num_items`` when given (the tokens of all micro-batches of an
    accumulated step, the Trainer's ``num_items_in_batch``). float64 [B]."""
    labels, _ = labels_and_mask(targets)
    return _uniform(labels.shape[0], causal_lm_token_count(targets, ignore_index), num_items,
                    "causal_lm_batch_weights")


def _uniform(B: int, counts: torch.Tensor, num_items, who: str) -> torch.Tensor:
    n = int(counts.sum()) if num_items is None else float(num_items)
    if n <= 0:
        raise ValueError(f"{who}: the batch has no predicted token (every label is ignored or "
                         "masked)" if num_items is None else f"{who}: num_items must be > 0")
    return torch.full((B,), 1.0 / n, dtype=torch.float64)


def _masked_valid(labels, mask, ignore_index):
    valid = labels != ignore_index
    if mask is not None:
        valid = valid & (mask != 0)
    return valid


def masked_lm_loss(outputs, targets, reduction: str = "sum", ignore_index: int = IGNORE_INDEX):
    """Masked-LM loss per sequence (no shift): logits [B, T, V], labels [B, T] (−100 except at the
    predicted positions; or a ``{"labels", "attention_mask"}`` Mapping) -> [B], the sum (or
    "mean") of the cross-entropy over the sequence's predicted positions."""
    labels, mask = labels_and_mask(targets)
    if outputs.dim() != 3 or labels.dim() != 2 or outputs.shape[:2] != labels.shape:
        raise ValueError(f"masked LM losses need logits [B, T, V] and labels [B, T]; got logits "
                         f"{tuple(outputs.shape)} and labels {tuple(labels.shape)}")
    B, T, V = outputs.shape
    valid = _masked_valid(labels, mask, ignore_index)
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    ce = F.cross_entropy(outputs.reshape(B * T, V), safe.reshape(-1),
                         reduction="none").reshape(B, T)
    tok = torch.where(valid, ce, torch.zeros_like(ce))
    if reduction == "sum":
        return tok.sum(1)
    if reduction == "mean":
        return tok.sum(1) / valid.sum(1).clamp_min(1).to(tok.dtype)
    raise ValueError(f"masked_lm_loss: reduction={reduction!r}, expected 'sum' or 'mean'")


def masked_lm_token_count(targets, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Predicted (masked, not ignored) tokens per sequence, int64 [B]."""
    labels, mask = labels_and_mask(targets)
    return _masked_valid(labels, mask, ignore_index).sum(1)


def masked_lm_batch_weights(targets, ignore_index: int = IGNORE_INDEX,
                            num_items=None) -> torch.Tensor:
    """1/N per sequence, N the batch's predicted tokens (or ``num_items``): Σ_k w_k·masked_lm_loss_k
    is then the mean over the batch's predicted tokens (``torch.nn.CrossEntropyLoss()``)."""
    labels, _ = labels_and_mask(targets)
    return _uniform(labels.shape[0], masked_lm_token_count(targets, ignore_index), num_items,
                    "masked_lm_batch_weights")
