"""The flat parameter layout: which coordinates of θ ∈ R^D belong to which tensor and param group.

θ is the concatenation of the model's *trainable* parameters (``requires_grad=True``) in
``named_parameters()`` order, each flattened row-major (``tensor.reshape(-1)``). Frozen parameters
are not part of θ. Every other module (recorder, store, optimizer rules, engine) speaks in this
layout; nothing else in the library knows how a model is flattened.

Param groups of the optimizer map to sets of tensors; ``group_of_tensor[t]`` gives the optimizer
param-group index of tensor ``t``. Per-coordinate hyperparameter vectors (learning rate, weight
decay) are expanded with :meth:`ParamLayout.expand`.

Names are canonical: torch.compile's ``_orig_mod.`` segments are removed (a compiled module's
``named_parameters()`` carries them), so a trajectory recorded through ``torch.compile(model)``
(or an older one that stored the prefixed names) matches the plain module and vice versa.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .inputs import COMPILE_PREFIX, canonical_name


@dataclass(frozen=True)
class ParamLayout:
    """Layout of the flat parameter vector.

    Attributes:
        names: parameter names in flat order (``named_parameters()`` order, trainable only).
        shapes: their shapes.
        dtypes: their dtypes as strings (``"float32"``…).
        group_of_tensor: optimizer param-group index of each tensor (0 when unknown).
    """

    names: Tuple[str, ...]
    shapes: Tuple[Tuple[int, ...], ...]
    dtypes: Tuple[str, ...]
    group_of_tensor: Tuple[int, ...] = field(default=())

    def __post_init__(self):
        names = tuple(canonical_name(nm) for nm in self.names)
        if len(set(names)) != len(names):
            dup = next(nm for nm in names if names.count(nm) > 1)
            raise ValueError(f"ParamLayout: parameter name '{dup}' occurs twice (after removing "
                             f"torch.compile's '{COMPILE_PREFIX}' segments)")
        object.__setattr__(self, "names", names)
        n = len(self.names)
        if len(self.shapes) != n or len(self.dtypes) != n:
            raise ValueError("ParamLayout: names, shapes and dtypes must have the same length")
        if not self.group_of_tensor:
            object.__setattr__(self, "group_of_tensor", (0,) * n)
        elif len(self.group_of_tensor) != n:
            raise ValueError("ParamLayout: group_of_tensor must have one entry per tensor")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_model(cls, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None
                   ) -> "ParamLayout":
        """Layout of ``model``'s trainable parameters; groups taken from ``optimizer`` if given.

        Raises ValueError when the optimizer holds a parameter the model does not have, or when a
        trainable parameter of the model is in no param group (it would move without being
        explained, or not move while being counted).
        """
        named = _trainable(model)
        groups = [0] * len(named)
        if optimizer is not None:
            where: Dict[int, int] = {}
            for gi, group in enumerate(optimizer.param_groups):
                for p in group["params"]:
                    where[id(p)] = gi
            model_ids = {id(p) for _, p in named}
            for gi, group in enumerate(optimizer.param_groups):
                for p in group["params"]:
                    if id(p) not in model_ids and p.requires_grad:
                        raise ValueError(
                            f"optimizer param group {gi} holds a trainable parameter of shape "
                            f"{tuple(p.shape)} that is not a trainable parameter of the model")
            for i, (n, p) in enumerate(named):
                if id(p) not in where:
                    raise ValueError(f"trainable parameter '{n}' is in no optimizer param group; "
                                     "freeze it (requires_grad=False) or add it to the optimizer")
                groups[i] = where[id(p)]
        return cls(
            names=tuple(n for n, _ in named),
            shapes=tuple(tuple(p.shape) for _, p in named),
            dtypes=tuple(str(p.dtype).replace("torch.", "") for _, p in named),
            group_of_tensor=tuple(groups),
        )

    @classmethod
    def from_dict(cls, d: dict) -> "ParamLayout":
        return cls(names=tuple(d["names"]), shapes=tuple(tuple(s) for s in d["shapes"]),
                   dtypes=tuple(d["dtypes"]), group_of_tensor=tuple(d.get("group_of_tensor", ())))

    def to_dict(self) -> dict:
        return {"names": list(self.names), "shapes": [list(s) for s in self.shapes],
                "dtypes": list(self.dtypes), "group_of_tensor": list(self.group_of_tensor)}

    # ------------------------------------------------------------------ sizes and offsets
    @property
    def numels(self) -> Tuple[int, ...]:
        out = []
        for s in self.shapes:
            n = 1
            for d in s:
                n *= d
            out.append(n)
        return tuple(out)

    @property
    def offsets(self) -> Tuple[int, ...]:
        """Start of each tensor in θ, plus D at the end (length len(names)+1)."""
        off = [0]
        for n in self.numels:
            off.append(off[-1] + n)
        return tuple(off)

    @property
    def D(self) -> int:
        return self.offsets[-1]

    @property
    def num_groups(self) -> int:
        return max(self.group_of_tensor) + 1 if self.group_of_tensor else 0

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"no trainable parameter named '{name}' in the layout") from None

    def slice(self, name: str) -> slice:
        i = self.index(name)
        off = self.offsets
        return slice(off[i], off[i + 1])

    # ------------------------------------------------------------------ conversions
    def flatten(self, tensors: Sequence[torch.Tensor], dtype: Optional[torch.dtype] = None
                ) -> torch.Tensor:
        """Concatenate per-tensor values (in layout order) into one flat [D] vector."""
        if len(tensors) != len(self.names):
            raise ValueError(f"expected {len(self.names)} tensors, got {len(tensors)}")
        parts = []
        for name, shape, t in zip(self.names, self.shapes, tensors):
            if tuple(t.shape) != tuple(shape):
                raise ValueError(f"parameter '{name}': expected shape {tuple(shape)}, "
                                 f"got {tuple(t.shape)}")
            parts.append(t.detach().reshape(-1) if dtype is None else
                         t.detach().reshape(-1).to(dtype))
        if not parts:
            return torch.zeros(0, dtype=dtype or torch.float32)
        return torch.cat(parts)

    def flatten_model(self, model: torch.nn.Module, dtype: Optional[torch.dtype] = None
                      ) -> torch.Tensor:
        """θ of ``model`` as a flat [D] vector (checks that the model matches the layout)."""
        self.check_model(model)
        params = dict(_trainable(model))
        return self.flatten([params[n] for n in self.names], dtype=dtype)

    def unflatten(self, flat: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Split a flat [..., D] tensor into {name: [..., *shape]} views (leading dims kept)."""
        if flat.shape[-1] != self.D:
            raise ValueError(f"flat vector has length {flat.shape[-1]}, layout has D={self.D}")
        lead = tuple(flat.shape[:-1])
        out = {}
        off = self.offsets
        for i, (name, shape) in enumerate(zip(self.names, self.shapes)):
            out[name] = flat[..., off[i]:off[i + 1]].reshape(lead + tuple(shape))
        return out

    def expand(self, per_group: Sequence[float], dtype: torch.dtype = torch.float64,
               device=None) -> torch.Tensor:
        """Per-coordinate [D] vector from one value per optimizer param group."""
        values = torch.tensor([float(per_group[g]) for g in self.group_of_tensor], dtype=dtype,
                              device=device)
        return torch.repeat_interleave(values, torch.tensor(self.numels, device=device))

    def check_model(self, model: torch.nn.Module) -> None:
        """Raise ValueError naming the first parameter where ``model`` and the layout disagree.
        Names are compared without torch.compile's ``_orig_mod.`` segments."""
        named = _trainable(model)
        have = {n: tuple(p.shape) for n, p in named}
        note = (f" (names are compared without torch.compile's '{COMPILE_PREFIX}' segments; the "
                f"model's names look like {[n for n, _ in named[:2]]}, the trajectory's like "
                f"{list(self.names[:2])})")
        for name, shape in zip(self.names, self.shapes):
            if name not in have:
                raise ValueError(f"the trajectory has parameter '{name}' {shape} that the model "
                                 "does not have (or has frozen)" + note)
            if have[name] != tuple(shape):
                raise ValueError(f"parameter '{name}': trajectory shape {tuple(shape)}, model "
                                 f"shape {have[name]}")
        extra = [n for n, _ in named if n not in set(self.names)]
        if extra:
            raise ValueError(f"the model has trainable parameter '{extra[0]}' that the trajectory "
                             "does not record" + note)
        order = [n for n, _ in named]
        if tuple(order) != self.names:
            raise ValueError("the model's trainable parameters are in a different order than the "
                             "trajectory's")


def own_storage(x: torch.Tensor) -> torch.Tensor:
    """x itself when it is contiguous and owns its whole storage, else a contiguous copy that
    does. A flat θ that views a larger buffer (the store's memory-mapped step file) would keep
    that buffer alive as long as θ, and forward AD gives every tangent of such a primal the
    layout of its whole storage."""
    whole = x.storage_offset() == 0 and \
        x.untyped_storage().nbytes() == x.numel() * x.element_size()
    return x if (whole and x.is_contiguous()) else x.clone(memory_format=torch.contiguous_format)


def _trainable(model: torch.nn.Module) -> List[Tuple[str, torch.nn.Parameter]]:
    """(canonical name, parameter) of the model's trainable parameters, in order."""
    return [(canonical_name(n), p) for n, p in model.named_parameters() if p.requires_grad]
