"""The model as a function of one flat parameter vector θ ∈ R^D (docs/design.md §2).

Owns: how a module's trainable parameters are flattened (:class:`ParamLayout`), the calling
convention for inputs and outputs (:mod:`.inputs`: any pytree of tensors batched on dim 0; tensor,
tuple or ModelOutput outputs; torch.compile's wrapper), how the module is evaluated at any θ with
its frozen parameters and buffers (:class:`FunctionalModel`), the output functional on a test set
(:class:`TestFunction`), the math SDPA backend that keeps attention forward-differentiable
(:mod:`.attention`) and the per-sample losses of language models (:mod:`.losses`, public as
``explaind_fast.losses``). Every other stage speaks in this layout.

May import: torch only. Never imports: any other explaind_fast subpackage (this is the bottom layer),
transformers (model outputs are recognised by duck typing).
"""
from . import inputs, losses
from .attention import attention_backend
from .functional import FunctionalModel, TestFunction
from .layout import ParamLayout

__all__ = ["ParamLayout", "FunctionalModel", "TestFunction", "attention_backend", "inputs",
           "losses"]
