"""Parsing of the granularity specs of :func:`explaind_fast.attribute` (docs/design.md §9).

* params  -> :class:`ParamGroups`: a group id per flat coordinate, the permutation that makes every
  group a contiguous segment, and the segment offsets (all the fused op ever sees).
* data    -> :class:`DataPartition`: a partition id per training sample (or None for "all").
* steps   -> :class:`StepWindows`: half-open windows [a, b) of update indices.
* output  -> :class:`OutputSpec`: the functional h(outputs [M, ...], targets) -> [M, K] that is
  differentiated (summed or projected outputs are folded in before differentiating); outputs is
  the model's selected output tensor (``model_output``), targets the test targets (a pytree).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..model import ParamLayout
from ..model.losses import causal_lm_token_losses, cross_entropy, labels_and_mask


# ---------------------------------------------------------------------------------------- params
@dataclass
class ParamGroups:
    """Parameter groups as contiguous segments of a permuted flat vector.

    ids: int64 [D] group of each coordinate (layout order; stored only when the groups are not
    contiguous, else rebuilt from the offsets on each access: 8·D bytes not held for the call);
    names: G labels; perm: int64 [D] with ids[perm] sorted (None when the layout order is already
    grouped); offsets: int64 [G+1] segment starts in permuted order; keep: False for "all" (axis
    dropped).
    """

    names: List[str]
    perm: Optional[torch.Tensor]
    offsets: torch.Tensor
    keep: bool
    spec: str
    stored_ids: Optional[torch.Tensor] = None

    @property
    def G(self) -> int:
        return len(self.names)

    @property
    def ids(self) -> torch.Tensor:
        if self.stored_ids is not None:
            return self.stored_ids
        return torch.repeat_interleave(torch.arange(self.G, dtype=torch.int64),
                                       self.offsets[1:] - self.offsets[:-1])


def _module_of(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else name


def _groups_from_tensor_labels(layout: ParamLayout, labels: Sequence[str]) -> Tuple[torch.Tensor, List[str]]:
    order: Dict[str, int] = {}
    for lab in labels:
        order.setdefault(lab, len(order))
    tid = torch.tensor([order[lab] for lab in labels], dtype=torch.int64)
    ids = torch.repeat_interleave(tid, torch.tensor(layout.numels, dtype=torch.int64))
    return ids, list(order)


def _neuron_ids(layout: ParamLayout) -> Tuple[torch.Tensor, List[str]]:
    """Row i of each ≥2-D weight joins entry i of the same module's bias; 1-D weight/bias pairs
    (LayerNorm) pair entry-wise; any other coordinate is its own group."""
    ids = torch.empty(layout.D, dtype=torch.int64)
    names: List[str] = []
    off = layout.offsets
    taken = set()
    shapes = dict(zip(layout.names, layout.shapes))
    for ti, (name, shape) in enumerate(zip(layout.names, layout.shapes)):
        if name in taken:
            continue
        mod = _module_of(name)
        base = len(names)
        rows = shape[0] if len(shape) >= 1 else 1
        per_row = layout.numels[ti] // max(rows, 1) if len(shape) >= 1 else 1
        ids[off[ti]:off[ti + 1]] = base + torch.arange(rows).repeat_interleave(per_row)
        label = mod if name.endswith(".weight") else name
        names.extend(f"{label}[{i}]" for i in range(rows))
        bias = mod + ".bias"
        if name.endswith(".weight") and bias in shapes and bias != name and \
                tuple(shapes[bias]) == (rows,) and len(shape) >= 1:
            bi = layout.index(bias)
            ids[off[bi]:off[bi + 1]] = base + torch.arange(rows)
            taken.add(bias)
    return ids, names


def parse_params(spec, layout: ParamLayout) -> ParamGroups:
    """"all" | "tensor" | "module"/"layer" | {group: [fnmatch patterns]} | callable(name)->group |
    "neuron" | "parameter" | int64 [D] tensor of group ids (custom map)."""
    D = layout.D
    keep = True
    if isinstance(spec, str):
        s = spec.lower()
        if s == "all":
            ids, names, keep = torch.zeros(D, dtype=torch.int64), ["all"], False
        elif s == "tensor":
            ids, names = _groups_from_tensor_labels(layout, layout.names)
        elif s in ("module", "layer"):
            ids, names = _groups_from_tensor_labels(layout, [_module_of(n) for n in layout.names])
        elif s == "neuron":
            ids, names = _neuron_ids(layout)
        elif s == "parameter":
            ids = torch.arange(D, dtype=torch.int64)
            names = [f"{n}[{i}]" for n, k in zip(layout.names, layout.numels) for i in range(k)]
        else:
            raise ValueError(f"params={spec!r}: expected 'all', 'tensor', 'module', 'layer', "
                             "'neuron', 'parameter', a dict of name patterns, a callable or a [D] "
                             "tensor of group ids")
    elif isinstance(spec, dict):
        patterns = {g: ([pats] if isinstance(pats, str) else list(pats)) for g, pats in spec.items()}
        for g, pats in patterns.items():
            for p in pats:
                if not any(fnmatch.fnmatchcase(n, p) for n in layout.names):
                    raise ValueError(f"params: pattern {p!r} of group {g!r} matches no trainable "
                                     f"parameter (they are named like {layout.names[:3]}); fix "
                                     "the pattern or drop it")
        labels = []
        for n in layout.names:
            hit = [g for g, pats in patterns.items() if any(fnmatch.fnmatchcase(n, p) for p in pats)]
            if len(hit) > 1:
                raise ValueError(f"params: parameter {n!r} matches the patterns of several groups "
                                 f"{hit}; every parameter may belong to one group only")
            labels.append(hit[0] if hit else "other")
        ids, names = _groups_from_tensor_labels(layout, labels)
        spec = "dict"
    elif callable(spec):
        ids, names = _groups_from_tensor_labels(layout, [str(spec(n)) for n in layout.names])
        spec = "callable"
    elif isinstance(spec, torch.Tensor):
        if spec.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise ValueError(f"params: a custom group map must be an integer tensor, got {spec.dtype}")
        if spec.shape != (D,):
            raise ValueError(f"params: a custom group map must have shape [D] = [{D}], got "
                             f"{tuple(spec.shape)}")
        ids = spec.to(torch.int64).cpu()
        if ids.numel() and int(ids.min()) < 0:
            raise ValueError("params: custom group ids must be >= 0")
        names = [str(g) for g in range(int(ids.max()) + 1 if D else 0)]
        spec = "custom"
    else:
        raise ValueError(f"params={spec!r}: unsupported type {type(spec).__name__}")
    G = len(names)
    counts = torch.bincount(ids, minlength=G)
    offsets = torch.zeros(G + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(counts, 0)
    if bool((ids[1:] >= ids[:-1]).all()):
        perm = None
    else:
        perm = torch.argsort(ids, stable=True)
    return ParamGroups(stored_ids=None if perm is None else ids, names=names, perm=perm,
                       offsets=offsets, keep=keep, spec=str(spec))


# ------------------------------------------------------------------------------------------ data
@dataclass
class DataPartition:
    """ids: int64 [n_train] partition of each training sample (None for "all"); labels: P labels."""

    kind: str
    ids: Optional[torch.Tensor]
    labels: List
    keep: bool

    @property
    def P(self) -> int:
        return len(self.labels)


def parse_data(spec, n_train: Optional[int], train_targets) -> DataPartition:
    """"all" | "label" | "sample" | int tensor [n_train] of partition ids >= 0 (optionally a pair
    (ids, labels) where every id must be < len(labels)). "label" reads integer class targets [n]
    (a targets Mapping's "labels")."""
    if isinstance(spec, str) and spec.lower() == "all":
        return DataPartition("all", None, ["all"], False)
    if n_train is None:
        raise ValueError("data attribution needs the training set size (pass train_data)")
    if isinstance(spec, str):
        s = spec.lower()
        if s == "sample":
            return DataPartition("sample", torch.arange(n_train), list(range(n_train)), True)
        if s == "label":
            try:
                train_targets = labels_and_mask(train_targets)[0]
            except ValueError:
                train_targets = None
            if train_targets is None or train_targets.dim() != 1 or train_targets.is_floating_point():
                raise ValueError("data='label' needs integer class targets [n_train] in train_data")
            classes, inv = torch.unique(train_targets.cpu(), return_inverse=True)
            return DataPartition("label", inv.to(torch.int64), [int(c) for c in classes], True)
        raise ValueError(f"data={spec!r}: expected 'all', 'label', 'sample' or a partition tensor")
    labels = None
    if isinstance(spec, (tuple, list)) and len(spec) == 2 and isinstance(spec[0], torch.Tensor):
        spec, labels = spec
        labels = list(labels)
    if not isinstance(spec, torch.Tensor):
        raise ValueError(f"data: unsupported partition of type {type(spec).__name__}")
    if spec.is_floating_point() or spec.is_complex() or spec.dtype == torch.bool:
        raise ValueError(f"data: a partition must be an integer tensor, got {spec.dtype}")
    if spec.shape != (n_train,):
        raise ValueError(f"data: the partition has shape {tuple(spec.shape)}, but the training set "
                         f"has {n_train} samples (expected [{n_train}])")
    ids = spec.to(torch.int64).cpu()
    if int(ids.min()) < 0:
        raise ValueError(f"data: partition label {int(ids.min())} is out of range (must be >= 0)")
    if labels is None and int(ids.max()) >= max(n_train, 1):
        raise ValueError(f"data: partition id {int(ids.max())} for a training set of {n_train} "
                         "samples: ids index the data axis of the result (one slot per id up to "
                         "the largest), so use consecutive ids, e.g. "
                         "torch.unique(ids, return_inverse=True)[1], or pass (ids, labels)")
    if labels is None:
        labels = list(range(int(ids.max()) + 1))
    elif int(ids.max()) >= len(labels):
        raise ValueError(f"data: partition label {int(ids.max())} is out of range for "
                         f"{len(labels)} partition labels")
    return DataPartition("custom", ids, labels, True)


# ----------------------------------------------------------------------------------------- steps
@dataclass
class StepWindows:
    """Half-open windows [a, b) of update indices covering 0..N-1; window_of[s] for each step."""

    bounds: List[Tuple[int, int]]
    keep: bool

    @property
    def labels(self) -> List[str]:
        return [f"{a}:{b}" for a, b in self.bounds]

    def window_of(self, N: int) -> List[int]:
        w = [0] * N
        for i, (a, b) in enumerate(self.bounds):
            for s in range(a, b):
                w[s] = i
        return w


def parse_steps(spec, N: int) -> StepWindows:
    """"each" | "all" | int window length | increasing list of boundaries (0 and N are added)."""
    if N < 1:
        raise ValueError("the trajectory has no recorded updates")
    if isinstance(spec, str):
        if spec.lower() == "each":
            return StepWindows([(s, s + 1) for s in range(N)], True)
        if spec.lower() == "all":
            return StepWindows([(0, N)], False)
        raise ValueError(f"steps={spec!r}: expected 'each', 'all', a window length or boundaries")
    if isinstance(spec, bool):
        raise ValueError("steps: a boolean is not a window length")
    if isinstance(spec, int):
        if spec < 1:
            raise ValueError(f"steps: window length must be >= 1, got {spec}")
        return StepWindows([(a, min(a + spec, N)) for a in range(0, N, spec)], True)
    if isinstance(spec, (list, tuple, torch.Tensor)):
        b = [int(x) for x in spec]
        if any(x < 0 or x > N for x in b):
            raise ValueError(f"steps: boundaries must lie in [0, {N}], got {b}")
        b = sorted(set([0, N] + b))
        return StepWindows([(b[i], b[i + 1]) for i in range(len(b) - 1)], True)
    raise ValueError(f"steps: unsupported spec of type {type(spec).__name__}")


# ---------------------------------------------------------------------------------------- output
@dataclass
class OutputSpec:
    """h(outputs [M, O], targets or None) -> [M, K], row-wise in the test samples."""

    h: Callable
    labels: List
    keep: bool
    needs_targets: bool
    text: str


def _position_spec(spec) -> OutputSpec:
    """("position", p) -> the logits at sequence position p, [M, V]; ("position", p, j) with j an
    int or a list of ints -> those logits at position p."""
    if len(spec) not in (2, 3) or isinstance(spec[1], bool) or not isinstance(spec[1], int):
        raise ValueError(f"output={spec!r}: expected ('position', p) or ('position', p, j) with p "
                         "an int position of the sequence (negative counts from the end) and j a "
                         "class index or a list of them")
    p = spec[1]
    cls = None if len(spec) == 2 else spec[2]
    if cls is not None and not (isinstance(cls, int) and not isinstance(cls, bool)) and not (
            isinstance(cls, (list, tuple)) and cls and
            all(isinstance(c, int) and not isinstance(c, bool) for c in cls)):
        raise ValueError(f"output={spec!r}: the class index must be an int or a list of ints")

    def h_pos(out, tgt):
        if out.dim() < 3:
            raise ValueError(f"output=('position', {p}) needs sequence outputs [M, T, V], the model "
                             f"gives {tuple(out.shape)}")
        if not -out.shape[1] <= p < out.shape[1]:
            raise ValueError(f"position {p} is outside the sequence of length {out.shape[1]}")
        at = out[:, p].reshape(out.shape[0], -1)
        if cls is None:
            return at
        return at[:, [cls] if isinstance(cls, int) else list(cls)]
    if cls is None:
        return OutputSpec(h_pos, None, True, False, f"logits at position {p}")
    if isinstance(cls, int):
        return OutputSpec(h_pos, [cls], False, False, f"logit {cls} at position {p}")
    return OutputSpec(h_pos, list(cls), True, False, f"logits {list(cls)} at position {p}")


def parse_output(spec, loss_fn: Optional[Callable]) -> OutputSpec:
    """"logits" | int class | list of ints | ("margin", i, j) | list of margin triples | "loss" |
    "token_losses" | ("position", p) | ("position", p, j) | [K, O] projection tensor |
    callable h(outputs, targets) -> [M, K] (must be row-wise).

    "loss" is loss_fn per test sample (one output; with
    :func:`explaind_fast.losses.causal_lm_loss` the per-sequence next-token loss);
    "token_losses" the next-token losses of a causal LM per predicted position, [M, T − 1]
    (:func:`explaind_fast.losses.causal_lm_token_losses`, 0 where ignored); ("position", p) the
    logits at sequence position p ([M, T, V] outputs, p < 0 counts from the end), ("position", p, j)
    logit(s) j there."""
    if isinstance(spec, str):
        if spec == "logits":
            return OutputSpec(lambda out, tgt: out.reshape(out.shape[0], -1), None, True, False,
                              "logits")
        if spec == "loss":
            lf = loss_fn or default_loss

            def h_loss(out, tgt):
                return lf(out, tgt).reshape(out.shape[0], 1)
            return OutputSpec(h_loss, ["loss"], False, True, "loss")
        if spec == "token_losses":
            return OutputSpec(causal_lm_token_losses, None, True, True, "token losses")
        raise ValueError(f"output={spec!r}: expected 'logits', 'loss', 'token_losses', "
                         "('position', p), class indices, margins, a projection matrix or a "
                         "callable")
    if isinstance(spec, tuple) and spec and spec[0] == "position":
        return _position_spec(spec)
    if isinstance(spec, bool):
        raise ValueError("output: a boolean is not a class index")
    if isinstance(spec, int):
        i = spec
        return OutputSpec(lambda out, tgt: out[:, [i]], [i], False, False, f"class {i}")
    if isinstance(spec, tuple) and len(spec) == 3 and spec[0] == "margin":
        _, i, j = spec
        return OutputSpec(lambda out, tgt: (out[:, i] - out[:, j])[:, None], [f"{i}-{j}"], False,
                          False, f"margin {i}-{j}")
    if isinstance(spec, (list, tuple)) and spec and all(isinstance(x, int) and not isinstance(x, bool)
                                                        for x in spec):
        idx = list(spec)
        return OutputSpec(lambda out, tgt: out[:, idx], idx, True, False, f"classes {idx}")
    if isinstance(spec, (list, tuple)) and spec and all(
            isinstance(x, tuple) and len(x) == 3 and x[0] == "margin" for x in spec):
        ii = [x[1] for x in spec]
        jj = [x[2] for x in spec]
        return OutputSpec(lambda out, tgt: out[:, ii] - out[:, jj],
                          [f"{i}-{j}" for i, j in zip(ii, jj)], True, False, "margins")
    if isinstance(spec, torch.Tensor):
        if spec.dim() != 2 or not spec.is_floating_point():
            raise ValueError(f"output: a projection must be a float [K, O] matrix, got "
                             f"{tuple(spec.shape)} {spec.dtype}")
        P = spec

        def h_proj(out, tgt):
            if out.shape[-1] != P.shape[1]:
                raise ValueError(f"output projection has {P.shape[1]} columns but the model "
                                 f"has {out.shape[-1]} outputs")
            return out @ P.to(out.dtype).T
        return OutputSpec(h_proj, list(range(P.shape[0])), True, False, "projection")
    if callable(spec):
        return OutputSpec(spec, None, True, False, "callable")
    raise ValueError(f"output: unsupported spec {spec!r}")


def default_loss(out, tgt):
    """Per-sample cross-entropy (reduction='none'), the default training loss (targets: class
    indices, or a Mapping whose "labels" holds them)."""
    return cross_entropy(out, tgt)
