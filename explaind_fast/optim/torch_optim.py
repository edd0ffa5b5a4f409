"""Which torch optimizers (and which settings of them) the rules of :mod:`.rules` describe exactly.

    optimizer_kind(optimizer) -> "adamw" | "adam" | "sgd"    (ValueError for anything else)
    check_group_settings(kind, group, gi)                    (ValueError naming the setting and why)
    constant_hyper(kind, optimizer) -> [dict per param group] (recorded once, must not change)

The recorder asks these before it records a step; the algebra itself lives in :mod:`.rules`.
"""
from __future__ import annotations

from typing import Dict, List

import torch

from .rules import RULES

def optimizer_kind(optimizer: torch.optim.Optimizer) -> str:
    """'adamw' | 'adam' | 'sgd' for the supported torch optimizers; ValueError otherwise."""
    cls = type(optimizer)
    if cls is torch.optim.AdamW:
        return "adamw"
    if cls is torch.optim.Adam:
        decoupled = {bool(g.get("decoupled_weight_decay", False)) for g in optimizer.param_groups}
        if len(decoupled) > 1:
            raise ValueError("torch.optim.Adam with decoupled_weight_decay set in some param "
                             "groups only is not supported (one rule per run)")
        return "adamw" if decoupled.pop() else "adam"
    if cls is torch.optim.SGD:
        return "sgd"
    raise ValueError(f"optimizer {cls.__module__}.{cls.__name__} is not supported: exact "
                     "recording needs torch.optim.AdamW, torch.optim.Adam or torch.optim.SGD "
                     "(subclasses may change the update rule)")


def check_group_settings(kind: str, group: dict, gi: int) -> None:
    def refuse(what, why):
        raise ValueError(f"param group {gi}: {what} is not supported: {why}")

    if group.get("maximize", False):
        refuse("maximize=True", "it flips the update's sign per optimizer (use a negated loss)")
    if RULES[kind].has_second_moment:
        if group.get("amsgrad", False):
            refuse("amsgrad=True", "the running max of v is not determined by the stored v_(s+1) "
                   "and breaks the linear first-moment recursion the decomposition relies on")
    else:
        if group.get("nesterov", False):
            refuse("nesterov=True", "the Nesterov look-ahead is not the momentum recursion of "
                   "Corollary 3.2")
        if group.get("dampening", 0) != 0:
            refuse(f"dampening={group['dampening']}", "torch's first step ignores dampening, so "
                   "the momentum recursion is not time-invariant; use dampening=0")


def constant_hyper(kind: str, optimizer: torch.optim.Optimizer) -> List[Dict]:
    """The per-group constants that define the update (recorded once; must not change)."""
    out = []
    for g in optimizer.param_groups:
        if RULES[kind].has_second_moment:
            out.append({"betas": [float(g["betas"][0]), float(g["betas"][1])],
                        "eps": float(g["eps"])})
        else:
            out.append({"momentum": float(g.get("momentum", 0.0)),
                        "dampening": float(g.get("dampening", 0.0)), "nesterov": False})
    return out
