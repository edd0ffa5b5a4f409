"""Recording a training run (docs/design.md §5): optimizer hooks that write the store.

Owns: :class:`TrajectoryRecorder` (what is recorded at each optimizer step, what is refused and
why) and the loader helpers that hand the training loop its batch indices (:mod:`.data`).

May import: :mod:`explaind_fast.model`, :mod:`explaind_fast.optim`, :mod:`explaind_fast.store`.
Never imports: quadrature, attribution, ops.
"""
from .data import IndexedDataset, indexed_loader
from .recorder import TrajectoryRecorder

__all__ = ["TrajectoryRecorder", "IndexedDataset", "indexed_loader"]
