"""Problem preparation: every argument of :func:`explaind_fast.attribute` checked and turned into
the objects the credit strategies use (docs/design.md §9).

    prepare(model, trajectory, test_inputs, **options) -> Problem

Nothing here evaluates a step: it parses the granularity specs, builds the functional model and
the test function, evaluates the initial outputs (which also measures the activations the planner
needs and sees whether the model calls scaled-dot-product attention), probes whether the model has
a forward-mode derivative (one test sample) and runs under vmap (two), and asks the planner for
the contraction order and chunk sizes. Inputs and outputs follow :mod:`explaind_fast.model.inputs`.
Call it under :func:`explaind_fast.model.attention_backend` (``attribute`` does).
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
from torch.func import jvp

from ..model import FunctionalModel, TestFunction
from ..model import attention as _att
from ..model import inputs as _in
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
    X: object                       # test inputs: a pytree batched on dim 0
    targets: Optional[object]       # test targets: a pytree batched on dim 0, or None
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
        return self.tf.M

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


def recorded_buffers(model: nn.Module, traj):
    """(the trajectory's final buffers to evaluate the model with, or None; the plan's text).

    The model's own buffers (BatchNorm running statistics, masks, counters) are replaced by the
    recorded final values, so that a freshly built module gives the numbers of the trained one;
    buffers the trajectory does not record (a trajectory from before buffers were stored, or a
    buffer of another dtype) are the model's. The text names the model's buffers that differ
    from the recorded ones (they are not used) and the buffers that changed during training
    (every step is evaluated with their final value)."""
    names = tuple(getattr(traj, "buffer_names", ()) or ())
    if not names:
        return None, "the model's own (the trajectory records no buffers)"
    recorded = traj.buffers()
    have = {_in.canonical_name(k): b for k, b in model.named_buffers()}
    differ, missing = [], []
    for n in names:
        b = have.get(n)
        if b is None:
            missing.append(n)
            continue
        r = recorded[n]
        if tuple(b.shape) != tuple(r.shape) or not torch.equal(b.detach().to("cpu", r.dtype), r):
            differ.append(n)
    text = f"recorded final values of {len(names)} buffers"
    if differ:
        text += (f"; the given model's {', '.join(repr(n) for n in differ[:4])}"
                 + (f" (+{len(differ) - 4})" if len(differ) > 4 else "")
                 + " differ from them and are not used (a freshly built or reset module?)")
    if missing:
        text += f"; not in the model: {', '.join(repr(n) for n in missing[:4])}"
    changed = tuple(getattr(traj, "buffers_changed", ()) or ())
    if changed:
        text += (f"; changed during training: {', '.join(repr(n) for n in changed[:4])}"
                 + (f" (+{len(changed) - 4})" if len(changed) > 4 else "")
                 + " (every step is evaluated with the final values)")
    return {n: recorded[n] for n in names if n not in missing}, text


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


#: quadrature rules that evaluate J·Δ with forward-mode JVPs whatever the contraction mode (the
#: default "auto" checks every step's residual with them, as "adaptive" does, and its kink search
#: differentiates the switching functions along the segment)
_JVP_RULES = ("adaptive", "kinks", "auto", "gauss-legendre-checked")


def _test_data(test_inputs, test_targets, dtype, device):
    """(inputs, targets, M): the test set as pytrees on ``device``, checked. A dict with "labels"
    splits into inputs and targets (:func:`explaind_fast.model.inputs.split_labels`)."""
    X = _in.normalize(test_inputs)
    if isinstance(X, Mapping) and _in.LABELS in X:
        if test_targets is not None:
            raise ValueError(f"test_inputs holds '{_in.LABELS}' and test_targets is given too: "
                             "pass the targets one way only")
        X, test_targets = _in.split_labels(X, "test_inputs")
    M = _in.batch_size(X, "test_inputs")
    if M < 1:
        raise ValueError(f"test_inputs must be a non-empty batch [M, ...], got "
                         f"{_in.describe(X)}")
    _in.check_float_dtype(X, dtype, "test_inputs")
    X = _in.to_device(X, device)
    if test_targets is not None:
        test_targets = _in.to_device(_in.as_tensors(test_targets), device)
        Mt = _in.batch_size(test_targets, "test_targets")
        if Mt != M:
            raise ValueError(f"test_targets has {Mt} entries for {M} test inputs")
    return X, test_targets, M


def _call_text(X) -> str:
    X = _in.normalize(X)
    return "model(**x)" if isinstance(X, Mapping) else \
        "model(*x)" if isinstance(X, (tuple, list)) else "model(x)"


def forward_ad_probe(tf: TestFunction, theta: torch.Tensor) -> Optional[str]:
    """The op without a forward-mode derivative that a JVP of the output functional at θ on one
    test sample runs into, or None (it ran, or failed for another reason that the attribution
    itself will report)."""
    x, tg = tf.rows(slice(0, 1))
    try:
        jvp(lambda th: tf.h(tf.fm(th, x), tg), (theta,), (torch.ones_like(theta),))
    except (NotImplementedError, RuntimeError) as e:
        return _att.forward_ad_missing(e)
    return None


def vmap_probe(tf: TestFunction, theta: torch.Tensor) -> str:
    """plan["per_sample"]: "vmap" when the per-sample output functional runs under vmap (on the
    first two test samples), else "loop (vmap's reason)" and the model loops from now on."""
    x, tg = tf.rows(slice(0, 2))
    try:
        with torch.no_grad():
            tf.fm.vmap(lambda xi, ti: tf.single(theta, xi, ti),
                       (0, None if tg is None else 0))(x, tg)
    except RuntimeError:
        pass                                   # any other failure is reported where it happens
    return per_sample_text(tf.fm)


def _first_batch(traj) -> int:
    """The size of the first recorded batch (the planner's train-side hint; 0 when unknown)."""
    if traj.num_steps == 0:
        return 0
    idx = traj.step(0).batch_indices
    return 0 if idx is None else int(idx.numel())


def per_sample_text(fm: FunctionalModel) -> str:
    return "vmap" if fm.vectorize else \
        f"loop over samples (vmap refused the model's data-dependent control flow: {fm.loop_reason})"


def prepare(model, trajectory, test_inputs, *, test_targets=None, train_data=None, loss_fn=None,
            output="logits", model_output="logits", params="all", data="all", steps="all",
            quadrature="auto", mode="auto", memory_budget=None, dtype=None,
            device=None, credit="auto", max_intervals=64) -> Problem:
    """Validate the arguments of :func:`explaind_fast.attribute` (same names) and build a Problem."""
    traj = trajectory
    layout = traj.layout
    model = _in.unwrap_compiled(model)
    layout.check_model(model)
    _in.check_output_key(model_output)
    if memory_budget is not None and not (isinstance(memory_budget, str)
                                          and memory_budget == "minimum"):
        if isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float)) or \
                not math.isfinite(memory_budget) or memory_budget <= 0:
            raise ValueError(f"memory_budget={memory_budget!r}: expected a positive number of bytes "
                             "(e.g. 2 * 1024**3), 'minimum' (the smallest chunks) or None for the "
                             "default 2 GiB")
    if dtype is None:
        dtype = next((p.dtype for p in model.parameters() if p.requires_grad), torch.float32)
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    device = torch.device(device)

    X, test_targets, M = _test_data(test_inputs, test_targets, dtype, device)

    out_spec = parse_output(output, loss_fn)
    if out_spec.needs_targets and test_targets is None:
        raise ValueError(f"output={output!r} needs test_targets (or a 'labels' entry in a dict "
                         "of test_inputs)")
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

    recorded, buffers_text = recorded_buffers(model, traj)
    fm = FunctionalModel(model, layout, dtype, device, output=model_output, buffers=recorded)
    tf = TestFunction(fm, X, test_targets, out_spec.h)
    theta0 = traj.theta(0, dtype=dtype, device=device)
    seen = _att.AttentionProbe()
    try:
        with seen:
            A, raw = activation_count(model, lambda: fm.raw(theta0, X))
    except (RuntimeError, IndexError, TypeError, ValueError, KeyError) as e:
        raise ValueError(f"test_inputs ({_in.describe(X)}) could not be fed to the model, called "
                         f"as {_call_text(X)}: {type(e).__name__}: {e}") from None
    raw = _in.select_output(raw, model_output)
    if not isinstance(raw, torch.Tensor):
        raise ValueError(f"model_output={model_output!r} selects a {type(raw).__name__}, not a "
                         "tensor; select the tensor to attribute (e.g. the logits)")
    try:
        with torch.no_grad():
            initial = out_spec.h(raw, test_targets)
    except (RuntimeError, IndexError, TypeError, ValueError, KeyError) as e:
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

    mode_reason = ""
    missing = forward_ad_probe(tf, theta0)
    if missing is not None:
        if mode == "forward":
            raise ValueError(f"mode='forward' needs forward-mode AD, but the model calls "
                             f"{missing}, which has no forward-mode derivative in torch; use "
                             "mode='reverse' (or 'auto') with a fixed quadrature such as "
                             "quadrature='gauss-legendre:8'")
        if rule.kind in _JVP_RULES:
            how = ("evaluates J·Δ with forward-mode JVPs" if rule.kind in ("adaptive", "kinks")
                   else "checks its residual with forward-mode JVPs of J·Δ, as 'adaptive' does")
            raise ValueError(f"quadrature={rule.text!r} {how}, but the model calls {missing}, "
                             "which has no forward-mode derivative in torch; use a fixed rule "
                             "such as quadrature='gauss-legendre:8' (reverse mode is then planned)")
        mode = "reverse"
        mode_reason = f"reverse: {missing} has no forward-mode derivative in torch"
    per_sample = vmap_probe(tf, theta0)

    D, G, P = layout.D, groups.G, part.P
    itemsize = torch.finfo(dtype).bits // 8
    plan = make_plan(D=D, M=M, K=K, G=G, P=P, Q=rule.expected_nodes, A=max(1, A // M),
                     itemsize=itemsize, mode=mode, credit=credit, budget=memory_budget,
                     data_all=not per_sample_data,
                     fallback_product=(not op_supports(dtype) and G > _FALLBACK_LOOP_MAX_GROUPS),
                     numels=layout.numels, batch=_first_batch(traj) if per_sample_data else 0,
                     grouped=groups.perm is None,
                     coef_vectors=3 if traj.rule.has_second_moment else 0,
                     device_type=torch.device(device).type)
    if rule.kind in ("kinks", "auto"):        # the kink search's capture within the budget
        rule.search_elems = plan.search_elems
    plan.attention = _att.describe(seen.seen)
    plan.mode_reason = mode_reason
    plan.per_sample = per_sample
    plan.buffers = buffers_text
    S = len(windows.bounds)
    result_bytes = itemsize * (S * G * (P + 1) * M * K + traj.num_steps * M * K)
    available = _device_memory(device)
    if result_bytes > available:
        raise ValueError(f"the result alone needs {result_bytes / 2**30:.3g} GiB (kernel "
                         f"[S={S}, G={G}, P={P}, M={M}, K={K}] plus reg and residuals, {itemsize} B "
                         f"each), more than the {available / 2**30:.3g} GiB of {device}: keep fewer "
                         "axes (steps='all', coarser params or data, fewer outputs) or split the "
                         "test set")
    return Problem(model=model, traj=traj, dtype=dtype, device=device, X=X, targets=test_targets,
                   out_spec=out_spec, groups=groups, part=part, windows=windows, rule=rule,
                   credit=credit, per_sample_data=per_sample_data, train=train, loss_fn=loss_fn,
                   fm=fm, tf=tf, initial=initial, plan=plan)
