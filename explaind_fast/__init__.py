"""explaind_fast: the fast, exact implementation of ExPLAIND (arXiv 2505.20076) for PyTorch.

Public API (imported lazily so that ``import explaind_fast`` is cheap and never touches a GPU):

    TrajectoryRecorder, Trajectory     record a training run to disk and read it back
    IndexedDataset, indexed_loader     dataset helpers that yield the batch indices
    attribute, Attribution             the attribution engine and its result
    ParamLayout                        the flat parameter layout
    ops                                the fused path-kernel reduction op

Sign convention: every contribution is a contribution to the *change* of the output, so
``final = initial + kernel.sum() + reg.sum()``; the paper's ψ is minus this.
"""
import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "ParamLayout": "explaind_fast.layout",
    "TrajectoryRecorder": "explaind_fast.recorder",
    "Trajectory": "explaind_fast.trajectory",
    "IndexedDataset": "explaind_fast.data",
    "indexed_loader": "explaind_fast.data",
    "attribute": "explaind_fast.engine",
    "Attribution": "explaind_fast.result",
}

__all__ = sorted(_EXPORTS) + ["ops", "__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in ("ops", "kernels", "reference"):
        return importlib.import_module(f"explaind_fast.{name}")
    raise AttributeError(f"module 'explaind_fast' has no attribute '{name}'")


def __dir__():
    return __all__
