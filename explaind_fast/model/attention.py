"""Attention that forward-mode AD can differentiate, and recognising ops that it cannot.

``torch.nn.functional.scaled_dot_product_attention`` (what Hugging Face models call with
``attn_implementation="sdpa"``, and nn.MultiheadAttention) dispatches to fused flash /
memory-efficient kernels that have no forward-mode derivative ("Trying to use forward AD with
_scaled_dot_product_flash_attention_for_cpu …"). The math backend computes the same attention from
differentiable ops, so :func:`explaind_fast.attribute` evaluates everything — initial and final
outputs, JVPs, Jacobians, the kink capture — under :func:`attention_backend`
(``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``, torch ≥ 2.3; a no-op where it does not
exist). :class:`AttentionProbe` tells whether a forward pass called SDPA at all, and
:func:`forward_ad_missing` recognises torch's error for an op without a forward-mode derivative.
"""
from __future__ import annotations

import contextlib
import re
from typing import Optional

import torch
from torch.overrides import TorchFunctionMode

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:          # torch < 2.3
    SDPBackend = sdpa_kernel = None

#: plan["attention"] when the model calls SDPA and it runs on the math backend
MATH_SDPA = "math SDPA backend (forward-mode AD)"
NO_SDPA = "no scaled-dot-product attention seen"
DEFAULT_SDPA = ("default SDPA backends (torch.nn.attention.sdpa_kernel is not available in this "
                "torch; fused kernels may lack forward-mode AD)")


def attention_backend():
    """Context manager: scaled-dot-product attention on the math backend (forward-mode AD)."""
    if sdpa_kernel is None:
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


def describe(sdpa_seen: bool) -> str:
    """The text of plan["attention"]."""
    if not sdpa_seen:
        return NO_SDPA
    return MATH_SDPA if sdpa_kernel is not None else DEFAULT_SDPA


#: calls that run scaled-dot-product attention (a mode does not see the calls nested in another)
_SDPA_CALLS = (torch.nn.functional.scaled_dot_product_attention,
               torch.nn.functional.multi_head_attention_forward)


class AttentionProbe(TorchFunctionMode):
    """Records whether ``scaled_dot_product_attention`` is called under it."""

    def __init__(self):
        super().__init__()
        self.seen = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _SDPA_CALLS:
            self.seen = True
        return func(*args, **(kwargs or {}))


_NO_FORWARD_AD = ("forward AD", "forward mode AD", "forward-mode AD")


def forward_ad_missing(err: BaseException) -> Optional[str]:
    """The op named by torch's "no forward-mode derivative" error (or a description of it), else
    None for any other error."""
    if not isinstance(err, (NotImplementedError, RuntimeError)):
        return None
    msg = str(err)
    if not any(s in msg for s in _NO_FORWARD_AD):
        return None
    m = re.search(r"forward AD with (\S+)", msg)
    if m:
        return m.group(1)
    if "autograd.Function" in msg:
        return "a custom autograd.Function without a jvp"
    return msg.split("\n")[0][:120]
