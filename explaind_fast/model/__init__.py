"""The model as a function of one flat parameter vector θ ∈ R^D (docs/design.md §2).

Owns: how a module's trainable parameters are flattened (:class:`ParamLayout`) and how the module is
evaluated at any θ with its frozen parameters and buffers (:class:`FunctionalModel`), and the output
functional on a test set (:class:`TestFunction`). Every other stage speaks in this layout.

May import: torch only. Never imports: any other explaind_fast subpackage (this is the bottom layer).
"""
from .functional import FunctionalModel, TestFunction
from .layout import ParamLayout

__all__ = ["ParamLayout", "FunctionalModel", "TestFunction"]
