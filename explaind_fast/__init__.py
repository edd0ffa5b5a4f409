"""explaind_fast: the fast, exact implementation of ExPLAIND (arXiv 2505.20076) for PyTorch.

Public API (imported lazily so that ``import explaind_fast`` is cheap and never touches a GPU):

    TrajectoryRecorder, IndexedDataset, indexed_loader   record a training run   (recording/)
    Trajectory                                           read it back            (store/)
    attribute, Attribution                               the exact sums          (attribution/)
    NodeSet                                              custom quadrature nodes (quadrature/)
    ParamLayout                                          the flat parameter layout (model/)
    losses                                               per-sample losses, language models too
    ops                                                  the fused path-kernel reduction op
    keep_freed_memory                                    glibc keeps freed memory (process-wide)

Results are contributions to the *change* of the output; docs/design.md §1 states the sign
convention, §12 the package layers (checked by import-linter, .importlinter).
"""
import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "ParamLayout": "explaind_fast.model",
    "TrajectoryRecorder": "explaind_fast.recording",
    "IndexedDataset": "explaind_fast.recording",
    "indexed_loader": "explaind_fast.recording",
    "Trajectory": "explaind_fast.store",
    "attribute": "explaind_fast.attribution",
    "Attribution": "explaind_fast.attribution",
    "AttributionWarning": "explaind_fast.attribution",
    "CertificateError": "explaind_fast.attribution",
    "DistributedAttributionError": "explaind_fast.attribution",
    "NodeSet": "explaind_fast.quadrature",
    "keep_freed_memory": "explaind_fast.allocator",
}
_SUBPACKAGES = ("model", "optim", "store", "recording", "quadrature", "attribution", "ops",
                "kernels", "testing", "demos", "losses")

__all__ = sorted(_EXPORTS) + ["losses", "ops", "__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _SUBPACKAGES:
        return importlib.import_module(f"explaind_fast.{name}")
    raise AttributeError(f"module 'explaind_fast' has no attribute '{name}'")


def __dir__():
    return __all__
