"""Optimizer rules: the only place that knows an optimizer's algebra (docs/design.md §3).

Owns: the per-step coefficient vectors of AdamW, Adam (L2) and SGD-momentum (:mod:`.rules`), the
recursions that turn them into train features and regularisation terms, forward and backward in
time (:mod:`.recursion`), and which torch optimizer settings they describe exactly
(:mod:`.torch_optim`). Adding an optimizer is one subclass in :mod:`.rules` and one line in
:mod:`.torch_optim`.

May import: :mod:`explaind_fast.model`. Never imports: store, recording, quadrature, attribution,
ops (nothing that reads files, evaluates models or contracts tensors).
"""
from .recursion import (BackwardRecursion, MomentRecursion, RegRecursion, gradient_from_moments,
                        identity_defect_parts, implied_gradient, implied_moment, moment_from_update,
                        phi_all_from_update)
from .rules import RULES, OptimizerRule, StepCoefficients, StepRecord, make_rule
from .torch_optim import check_group_settings, constant_hyper, optimizer_kind

__all__ = ["StepRecord", "StepCoefficients", "OptimizerRule", "RULES", "make_rule",
           "RegRecursion", "MomentRecursion", "BackwardRecursion", "phi_all_from_update",
           "moment_from_update", "gradient_from_moments", "implied_moment", "implied_gradient",
           "identity_defect_parts",
           "optimizer_kind",
           "check_group_settings", "constant_hyper"]
