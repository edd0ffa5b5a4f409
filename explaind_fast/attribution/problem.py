"""Problem preparation: every argument of :func:`explaind_fast.attribute` checked and turned into
the objects the credit strategies use (docs/design.md §9).

    prepare(model, trajectory, test_inputs, **options) -> Problem

Nothing here evaluates a step: it parses the granularity specs, builds the functional model and
the test function, evaluates the initial outputs (which also measures the activations the planner
needs) and asks the planner for the contraction order and chunk sizes.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn

from ..model import FunctionalModel, TestFunction
from ..quadrature import QuadratureRule, parse_quadrature
from .contraction import _FALLBACK_LOOP_MAX_GROUPS, op_supports
from .granularity import (DataPartition, OutputSpec, ParamGroups, StepWindows, default_loss,
                          parse_data, parse_output, parse_params, parse_steps)
from .planner import Plan, make_plan
from .train_side import TrainSet


@dataclass
class Problem:
    """A validated attribution problem (shapes: D parameters, M test samples, K outputs, G groups,
    P partitions, S step windows, N stored updates)."""

    model: nn.Module
    traj: object
    dtype: torch.dtype
    device: torch.device
    X: torch.Tensor
    targets: Optional[torch.Tensor]
    out_spec: OutputSpec
    groups: ParamGroups
    part: DataPartition
    windows: StepWindows
    rule: QuadratureRule
    credit: str
    per_sample_data: bool
    train: Optional[TrainSet]
    loss_fn: Callable
    fm: FunctionalModel
    tf: TestFunction
    theta0: torch.Tensor
    initial: torch.Tensor
    plan: Plan

    @property
    def N(self) -> int:
        return self.traj.num_steps

    @property
    def D(self) -> int:
        return self.traj.layout.D

    @property
    def M(self) -> int:
        return self.X.shape[0]

    @property
    def K(self) -> int:
        return self.initial.shape[1]

    @property
    def G(self) -> int:
        return self.groups.G

    @property
    def P(self) -> int:
        return self.part.P

    @property
    def S(self) -> int:
        return len(self.windows.bounds)


def _device_memory(device: torch.device) -> int:
    """Total memory of the device in bytes (physical RAM for the CPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def check_modules(model: nn.Module, per_sample_data: bool) -> None:
    """Refuse modules that make the model non-separable per sample or random."""
    for name, mod in model.named_modules():
        is_bn = isinstance(mod, nn.modules.batchnorm._BatchNorm)
        is_do = isinstance(mod, nn.modules.dropout._DropoutNd) and mod.p > 0
        if is_bn and mod.training:
            raise ValueError(f"module '{name}' is BatchNorm in train mode: its output mixes the "
                             "samples of a batch, so contributions are not separable per sample; "
                             "call model.eval()")
        if is_do and (mod.training or per_sample_data):
            raise ValueError(f"module '{name}' is dropout (p={mod.p}): "
                             + ("its random masks cannot be replayed, so per-sample data attribution "
                                "cannot recompute the training gradients" if per_sample_data else
                                "in train mode the model is random; call model.eval()"))


def activation_count(model, call):
    """Numbers in all module outputs of one forward pass (activation estimate for the planner),
    and the call's result."""
    total = [0]

    def hook(_m, _i, out):
        if isinstance(out, torch.Tensor):
            total[0] += out.numel()
    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            y = call()
    finally:
        for h in handles:
            h.remove()
    return total[0], y


def prepare(model, trajectory, test_inputs, *, test_targets=None, train_data=None, loss_fn=None,
            output="logits", params="all", data="all", steps="all",
            quadrature="auto", mode="auto", memory_budget=None, dtype=None,
            device=None, credit="auto", max_intervals=64) -> Problem:
    """Validate the arguments of :func:`explaind_fast.attribute` (same names) and build a Problem."""
    traj = trajectory
    layout = traj.layout
    layout.check_model(model)
    if memory_budget is not None:
        if isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float)) or \
                not math.isfinite(memory_budget) or memory_budget <= 0:
            raise ValueError(f"memory_budget={memory_budget!r}: expected a positive number of bytes "
                             "(e.g. 2 * 1024**3), or None for the default 2 GiB")
    if dtype is None:
        dtype = next((p.dtype for p in model.parameters() if p.requires_grad), torch.float32)
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    device = torch.device(device)

    if not isinstance(test_inputs, torch.Tensor):
        raise ValueError(f"test_inputs must be a tensor [M, ...], got {type(test_inputs).__name__}")
    if test_inputs.dim() < 1 or test_inputs.shape[0] < 1:
        raise ValueError(f"test_inputs must be a non-empty batch [M, ...], got shape "
                         f"{tuple(test_inputs.shape)}")
    if test_inputs.is_floating_point() and test_inputs.dtype != dtype:
        raise ValueError(f"test_inputs have dtype {test_inputs.dtype}, but the attribution runs in "
                         f"{dtype} (the model's dtype or dtype=); convert them")
    X = test_inputs.to(device)
    M = X.shape[0]
    if test_targets is not None:
        test_targets = torch.as_tensor(test_targets).to(device)
        if test_targets.shape[0] != M:
            raise ValueError(f"test_targets has {test_targets.shape[0]} entries for {M} test inputs")

    out_spec = parse_output(output, loss_fn)
    if out_spec.needs_targets and test_targets is None:
        raise ValueError(f"output={output!r} needs test_targets")
    groups = parse_params(params, layout)

    per_sample_data = not (isinstance(data, str) and data.lower() == "all")
    train = None
    if per_sample_data:
        if train_data is None:
            raise ValueError(f"data={data!r} needs train_data (and the per-sample loss_fn, "
                             "reduction='none'; default cross-entropy)")
        if traj.checkpoint_every != 1:
            raise ValueError(f"data={data!r} is impossible on a subsampled trajectory "
                             f"(checkpoint_every={traj.checkpoint_every}): the first moment cannot be "
                             "split per sample (paper, Remark F.3); use data='all'")
        train = TrainSet(train_data, dtype, device)
        if traj.dataset_size is not None and len(train) != traj.dataset_size:
            raise ValueError(f"train_data has {len(train)} samples but the trajectory was recorded "
                             f"on a dataset of {traj.dataset_size}")
    loss_fn = loss_fn or default_loss
    part = parse_data(data, len(train) if train is not None else None,
                      train.Y if train is not None else None)
    windows = parse_steps(steps, traj.num_steps)
    check_modules(model, per_sample_data)
    rule = parse_quadrature(quadrature, max_intervals=max_intervals)

    if credit == "auto":
        credit = ("gradient" if (per_sample_data and not windows.keep and mode != "forward")
                  else "update")
    if credit not in ("update", "gradient"):
        raise ValueError(f"credit={credit!r}: expected 'update', 'gradient' or 'auto'")
    if credit == "gradient" and not per_sample_data:
        raise ValueError("credit='gradient' applies to data attribution; data='all' always uses "
                         "update-step credit")
    if mode not in ("auto", "forward", "reverse"):
        raise ValueError(f"mode={mode!r}: expected 'auto', 'forward' or 'reverse'")
    if credit == "gradient" and mode == "forward":
        raise ValueError("credit='gradient' (the backward recursion) runs in reverse mode only")

    fm = FunctionalModel(model, layout, dtype, device)
    tf = TestFunction(fm, X, test_targets, out_spec.h)
    theta0 = traj.theta(0, dtype=dtype, device=device)
    try:
        A, raw = activation_count(model, lambda: fm(theta0, X))
    except (RuntimeError, IndexError, TypeError) as e:
        raise ValueError(f"test_inputs of shape {tuple(X.shape)} and dtype {X.dtype} could not be "
                         f"fed to the model: {e}") from None
    try:
        with torch.no_grad():
            initial = out_spec.h(raw, test_targets)
    except (RuntimeError, IndexError, TypeError, ValueError) as e:
        shape = tuple(raw.shape) if isinstance(raw, torch.Tensor) else type(raw).__name__
        raise ValueError(f"output={output!r} could not be applied to the model's outputs "
                         f"({shape}): {e}") from None
    if not isinstance(initial, torch.Tensor) or initial.dim() != 2 or initial.shape[0] != M:
        raise ValueError(f"the output functional must give [M, K] = [{M}, K], got "
                         f"{tuple(initial.shape) if isinstance(initial, torch.Tensor) else initial!r}")
    K = initial.shape[1]
    if K == 0:
        raise ValueError(f"output={output!r} gives no outputs per test sample ([{M}, 0]); it must "
                         "select at least one")
    D, G, P = layout.D, groups.G, part.P
    itemsize = torch.finfo(dtype).bits // 8
    plan = make_plan(D=D, M=M, K=K, G=G, P=P, Q=rule.expected_nodes, A=max(1, A // M),
                     itemsize=itemsize, mode=mode, credit=credit, budget=memory_budget,
                     data_all=not per_sample_data,
                     fallback_product=(not op_supports(dtype) and G > _FALLBACK_LOOP_MAX_GROUPS))
    budget = plan.memory_budget
    S = len(windows.bounds)
    result_bytes = itemsize * (S * G * (P + 1) * M * K + traj.num_steps * M * K)
    available = _device_memory(device)
    if result_bytes > available:
        raise ValueError(f"the result alone needs {result_bytes / 2**30:.3g} GiB (kernel "
                         f"[S={S}, G={G}, P={P}, M={M}, K={K}] plus reg and residuals, {itemsize} B "
                         f"each), more than the {available / 2**30:.3g} GiB of {device}: keep fewer "
                         "axes (steps='all', coarser params or data, fewer outputs) or split the "
                         "test set")
    if per_sample_data and credit == "update" and P * D * itemsize > budget:
        raise ValueError(f"update-step credit keeps one D-vector per data partition: {P}×{D}×"
                         f"{itemsize} B = {P * D * itemsize} B exceeds memory_budget={budget}; "
                         "use credit='gradient' (backward recursion, no per-sample buffer) or a "
                         "larger budget")
    return Problem(model=model, traj=traj, dtype=dtype, device=device, X=X, targets=test_targets,
                   out_spec=out_spec, groups=groups, part=part, windows=windows, rule=rule,
                   credit=credit, per_sample_data=per_sample_data, train=train, loss_fn=loss_fn,
                   fm=fm, tf=tf, theta0=theta0, initial=initial, plan=plan)
