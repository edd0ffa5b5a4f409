"""The one calling convention for a model's inputs and outputs (docs/design.md §2).

**Inputs** are any pytree of tensors batched along dim 0 (``torch.utils._pytree``: tensors,
tuples, lists, dicts, namedtuples), called as

    Tensor x           ->  model(x)
    tuple / list x     ->  model(*x)
    dict / Mapping x   ->  model(**x)        (a tokenizer's BatchEncoding is a Mapping)

Every tensor leaf holds one row per sample on dim 0 (all leaves agree); other leaves (None, ints,
bools, strings, e.g. ``{"use_cache": False}``) are passed unchanged to every call.

**Outputs**: the model may return a tensor, a tuple / list, or a Mapping such as a Hugging Face
``ModelOutput`` (recognised by duck typing, never by importing transformers). ``select_output``
picks the tensor that the output functional sees: ``"logits"`` (the default) means the tensor
itself, a Mapping's ``"logits"`` entry, or a tuple's first element; another string names a
Mapping key, an int indexes a tuple (or ``to_tuple()`` of a ModelOutput), a callable maps the raw
output to the tensor, and None returns the raw output unchanged.

**Data** given as a map-style dataset is collated into one such pytree with
``torch.utils.data.default_collate`` (:func:`collate`). A Mapping batch with a ``"labels"`` entry
(the Hugging Face layout) splits into model inputs and loss targets by :func:`split_labels`.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, List, Optional, Tuple, Union

import torch
import torch.utils._pytree as pytree

#: the key of a Mapping batch that holds the loss targets (Hugging Face's convention)
LABELS = "labels"
#: the key of the attention (padding) mask, kept with the targets of a Mapping batch
ATTENTION_MASK = "attention_mask"


# ------------------------------------------------------------------------------------- inputs
def normalize(inputs):
    """Top-level Mappings that are not dicts (BatchEncoding, UserDict) become plain dicts, so the
    pytree utilities see their tensors; everything else is returned as it is."""
    if isinstance(inputs, Mapping) and not isinstance(inputs, dict):
        return dict(inputs)
    return inputs


def call_args(inputs) -> Tuple[tuple, dict]:
    """(args, kwargs) of the call for ``inputs`` by the convention above."""
    inputs = normalize(inputs)
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}


def call(fn: Callable, inputs):
    """fn(x) / fn(*x) / fn(**x) by the convention above."""
    args, kwargs = call_args(inputs)
    return fn(*args, **kwargs)


def _describe_leaf(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{tuple(x.shape)} {str(x.dtype).replace('torch.', '')}"
    return type(x).__name__


def describe(inputs) -> str:
    """A short text of the pytree: each tensor leaf's key path, shape and dtype."""
    inputs = normalize(inputs)
    if isinstance(inputs, torch.Tensor):
        return f"tensor {_describe_leaf(inputs)}"
    flat, _ = pytree.tree_flatten_with_path(inputs)
    parts = [f"{pytree.keystr(path) or '<root>'}: {_describe_leaf(x)}" for path, x in flat]
    return f"{type(inputs).__name__} {{" + ", ".join(parts) + "}"


def tensor_leaves(inputs) -> List[Tuple[str, torch.Tensor]]:
    """(key path, tensor) of every tensor leaf."""
    inputs = normalize(inputs)
    if isinstance(inputs, torch.Tensor):
        return [("", inputs)]
    flat, _ = pytree.tree_flatten_with_path(inputs)
    return [(pytree.keystr(path), x) for path, x in flat if isinstance(x, torch.Tensor)]


def batch_size(inputs, what: str = "test_inputs") -> int:
    """The common size of dim 0 of every tensor leaf; ValueError naming the keys otherwise."""
    leaves = tensor_leaves(inputs)
    if not leaves:
        raise ValueError(f"{what} holds no tensor (got {type(inputs).__name__}); expected a tensor "
                         "or a tuple / dict of tensors batched along dim 0")
    for key, t in leaves:
        if t.dim() < 1:
            raise ValueError(f"{what}{key} is a 0-dim tensor: every tensor of {what} must be "
                             "batched along dim 0 (one row per sample)")
    sizes = {key: int(t.shape[0]) for key, t in leaves}
    if len(set(sizes.values())) != 1:
        shown = ", ".join(f"{what}{k}: {n}" for k, n in sizes.items())
        raise ValueError(f"the tensors of {what} disagree on the batch size (dim 0): {shown}; "
                         "every tensor must hold one row per sample")
    return next(iter(sizes.values()))


def take(inputs, idx):
    """Rows ``idx`` (an int index tensor, slice or int) of every tensor leaf; other leaves kept.
    An index tensor is moved to each leaf's device."""
    inputs = normalize(inputs)

    def one(x):
        if not isinstance(x, torch.Tensor):
            return x
        if isinstance(idx, torch.Tensor):
            return x[idx.to(x.device)]
        return x[idx]
    return pytree.tree_map(one, inputs)


def unsqueeze(inputs):
    """A batch of one: x[None] for every tensor leaf (the per-sample functions under vmap)."""
    return pytree.tree_map(lambda x: x[None] if isinstance(x, torch.Tensor) else x,
                           normalize(inputs))


def in_dims(inputs):
    """The vmap in_dims of a batched pytree: 0 for tensor leaves, None for the others."""
    inputs = normalize(inputs)
    if isinstance(inputs, torch.Tensor):
        return 0
    return pytree.tree_map(lambda x: 0 if isinstance(x, torch.Tensor) else None, inputs)


def to_device(inputs, device):
    return pytree.tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x,
                           normalize(inputs))


def as_tensors(data):
    """Leaves that are numbers, lists or arrays become tensors (``torch.as_tensor``) when the data
    is not a pytree of tensors already (test_targets given as a list, say)."""
    data = normalize(data)
    if isinstance(data, torch.Tensor) or tensor_leaves(data):
        return data
    return torch.as_tensor(data)


def check_float_dtype(inputs, dtype: torch.dtype, what: str, hint: str = "convert them") -> None:
    """Every floating tensor leaf must have the attribution dtype (a silent cast would hide a
    training/attribution mismatch)."""
    for key, t in tensor_leaves(inputs):
        if t.is_floating_point() and t.dtype != dtype:
            raise ValueError(f"{what}{key} has dtype {t.dtype}, but the attribution runs in "
                             f"{dtype} (the model's dtype or dtype=); {hint}")


# ------------------------------------------------------------------------------------- data
def split_labels(batch, what: str = "train_data"):
    """A Mapping batch in the Hugging Face layout -> (inputs, targets).

    inputs: every entry except ``"labels"`` (the model is not given the labels, so it never
    computes a loss of its own); targets: ``{"labels": ..., "attention_mask": ...}`` (the mask only
    when the batch has one). Loss functions take targets as given here (a Mapping); the library's
    losses (:mod:`explaind_fast.losses`) accept both such a Mapping and a plain labels tensor.
    """
    batch = normalize(batch)
    if LABELS not in batch:
        raise ValueError(f"{what} is a dict without a '{LABELS}' entry (keys {sorted(batch)}): a "
                         f"dict batch needs '{LABELS}' (the targets of the loss), or pass a pair "
                         "(inputs, targets)")
    inputs = {k: v for k, v in batch.items() if k != LABELS}
    targets = {LABELS: batch[LABELS]}
    if ATTENTION_MASK in batch:
        targets[ATTENTION_MASK] = batch[ATTENTION_MASK]
    return inputs, targets


def collate(items: list, what: str = "train_data"):
    """One batched pytree from per-sample items (torch.utils.data.default_collate)."""
    from torch.utils.data import default_collate
    try:
        return normalize(default_collate(items))
    except (RuntimeError, TypeError, ValueError) as e:
        raise ValueError(f"the items of {what} could not be stacked into one batch "
                         f"(torch.utils.data.default_collate: {e}); items must be tensors / "
                         "numbers of equal shapes (pad sequences to one length, as the training "
                         "collator did)") from None


# ------------------------------------------------------------------------------------- outputs
def is_model_output(out) -> bool:
    """A Mapping-like model output (Hugging Face ModelOutput, dict), by duck typing."""
    return isinstance(out, Mapping) or (hasattr(out, "to_tuple") and hasattr(out, "keys"))


OutputKey = Union[None, str, int, Callable[[Any], torch.Tensor]]


def select_output(out, key: OutputKey = "logits") -> torch.Tensor:
    """The tensor of a model's raw output that the output functional sees (module docstring)."""
    if key is None:
        return out
    if callable(key):
        return key(out)
    if isinstance(out, torch.Tensor):
        if key == "logits" or key == 0:
            return out
        raise ValueError(f"model_output={key!r}: the model returned a tensor "
                         f"{tuple(out.shape)}, which has no entry {key!r}; use "
                         "model_output='logits' (the tensor itself)")
    if is_model_output(out):
        if isinstance(key, int) and not isinstance(key, bool):
            tup = out.to_tuple() if hasattr(out, "to_tuple") else tuple(out.values())
            if not -len(tup) <= key < len(tup):
                raise ValueError(f"model_output={key}: the model's {type(out).__name__} has "
                                 f"{len(tup)} entries")
            return tup[key]
        keys = list(out.keys())
        if key not in keys or out[key] is None:
            raise ValueError(f"model_output={key!r}: the model returned a {type(out).__name__} "
                             f"with entries {keys} and no {key!r}; pass model_output=<one of "
                             "them>, an index, or a callable(output) -> tensor")
        return out[key]
    if isinstance(out, (tuple, list)):
        if key == "logits":
            key = 0
        if not isinstance(key, int) or isinstance(key, bool):
            raise ValueError(f"model_output={key!r}: the model returned a {type(out).__name__} "
                             f"of {len(out)} entries; select one by index (model_output=0 is the "
                             "default)")
        if not -len(out) <= key < len(out):
            raise ValueError(f"model_output={key}: the model returned {len(out)} outputs")
        return out[key]
    raise ValueError(f"the model returned a {type(out).__name__}; expected a tensor, a tuple or "
                     "a Mapping / ModelOutput (or pass model_output=callable(output) -> tensor)")


def check_output_key(key) -> None:
    if key is None or callable(key) or isinstance(key, str) or \
            (isinstance(key, int) and not isinstance(key, bool)):
        return
    raise ValueError(f"model_output={key!r}: expected a key (default 'logits'), an index or a "
                     "callable(output) -> tensor")


# ------------------------------------------------------------------------------------- compile
COMPILE_PREFIX = "_orig_mod."


def unwrap_compiled(model):
    """The plain module of a torch.compile'd one (torch._dynamo's OptimizedModule keeps it as
    ``_orig_mod``); any other module is returned as it is."""
    while isinstance(getattr(model, "_orig_mod", None), torch.nn.Module) and \
            type(model).__name__ == "OptimizedModule":
        model = model._orig_mod
    return model


def canonical_name(name: str) -> str:
    """A parameter name without torch.compile's ``_orig_mod.`` segments."""
    if COMPILE_PREFIX not in name:
        return name
    return ".".join(p for p in name.split(".") if p != "_orig_mod")


# ------------------------------------------------------------------------------------- vmap
_VMAP_DATA_DEPENDENT = ("data-dependent control flow", "calling .item() on a Tensor",
                        ".item() on a Tensor")


def is_vmap_data_dependent(err: BaseException) -> bool:
    """Whether ``err`` is torch.func.vmap refusing data-dependent Python control flow (a Hugging
    Face attention-mask check, an ``.item()``) — which a loop over the samples evaluates fine."""
    msg = str(err)
    return isinstance(err, RuntimeError) and "vmap" in msg and \
        any(s in msg for s in _VMAP_DATA_DEPENDENT)


def map_samples(fn: Callable, in_dims_: tuple, *, loop: bool = False,
                on_fallback: Optional[Callable[[BaseException], None]] = None) -> Callable:
    """``torch.func.vmap(fn, in_dims)`` over dim 0 (in_dims per argument: 0 for a batched pytree,
    None for a shared one), or a Python loop over the samples with the same result (stacked
    outputs) when ``loop`` is set or vmap refuses data-dependent control flow (then
    ``on_fallback(error)`` is called once, so the caller can remember to loop next time)."""
    from torch.func import vmap

    def looped(*args):
        n = None
        for a, d in zip(args, in_dims_):
            if d is not None:
                n = batch_size(a, "a vmapped argument")
                break
        if n is None:
            raise ValueError("map_samples: no argument is batched")
        outs = [fn(*[take(a, i) if d is not None else a for a, d in zip(args, in_dims_)])
                for i in range(n)]
        return pytree.tree_map(lambda *xs: torch.stack(xs), *outs)

    def run(*args):
        if loop:
            return looped(*args)
        dims = tuple(None if d is None else in_dims(a) for a, d in zip(args, in_dims_))
        try:
            return vmap(fn, in_dims=dims)(*args)
        except RuntimeError as e:
            if not is_vmap_data_dependent(e):
                raise
            if on_fallback is not None:
                on_fallback(e)
            return looped(*args)
    return run
