"""The attribution engine: exact ExPLAIND sums at any granularity, never the full tensor.

    attribute(model, trajectory, test_inputs, ...) -> Attribution

For each recorded update s (θ_s → θ_{s+1}, Δ_s = θ_{s+1} − θ_s) the contribution of parameter group
g, data partition p, test row (x, j) is   −φ_s(x)_j · (Φ_s[p] restricted to g)   and the
regularisation contribution is   −φ_s(x)_j · (r_s restricted to g),   with φ_s(x) = ∫_0^1 J(θ_s + tΔ_s)dt
by quadrature (docs/design.md §1–4). The pipeline (docs/design.md §9):

    prepare (problem.py) → Accumulator (accumulator.py) → update_credit | gradient_credit
    (credit.py, which call contraction.py per step) → Accumulator.result() → Attribution

Inputs, outputs and models follow :mod:`explaind_fast.model.inputs`: test and training inputs are
any pytree of tensors batched on dim 0 (a tensor, a tuple, a dict such as {"input_ids",
"attention_mask"}), the model may return a tensor, a tuple or a ModelOutput, a torch.compile'd
module is attributed through its plain module. Everything runs with scaled-dot-product attention
on its math backend (forward-mode AD; :mod:`explaind_fast.model.attention`), and a model op without
a forward-mode derivative makes mode="auto" plan reverse mode (recorded in ``plan``).

Limits: the model must be row-wise in the batch (no BatchNorm in train mode); reverse mode splits
rows down to single (sample, output) rows but never below one row of D numbers. Peak memory:
docs/design.md §10 (symbols in planner.py).
"""
from __future__ import annotations

from ..model import attention_backend
from ..model.attention import forward_ad_missing
from .accumulator import Accumulator
from .credit import gradient_credit, update_credit
from .distributed import attribute_across_ranks, context
from .problem import per_sample_text, prepare
from .result import Attribution


def attribute(model, trajectory, test_inputs, *, test_targets=None, train_data=None, loss_fn=None,
              output="logits", model_output="logits", params="all", data="all", steps="all",
              quadrature="auto", mode="auto", memory_budget=None, dtype=None,
              device=None, progress=True, credit="auto", max_intervals=64,
              strict=False, distributed="auto", gather_to=0, group=None) -> Attribution:
    """ExPLAIND contributions of a recorded training run, summed to the requested granularity.

    Args:
        model: the nn.Module (architecture; its trainable parameters must match the trajectory's
            layout; its current weights are not used, frozen params and buffers are); a
            torch.compile'd module is unwrapped (names match without "_orig_mod.").
        trajectory: a Trajectory (the read API of :class:`explaind_fast.store.Trajectory`).
        test_inputs: the M test inputs: a tensor [M, ...] (model(x)), a tuple (model(*x)) or a
            dict (model(**x)) of tensors batched on dim 0 (floating ones must have the attribution
            dtype). A dict with "labels" gives the test targets too ({"labels",
            "attention_mask"}, :func:`explaind_fast.model.inputs.split_labels`).
        test_targets: targets batched on dim 0 (a tensor or a pytree), needed for output="loss"
            and "token_losses" (and passed to a callable h).
        train_data: indexed like the recorded batches, needed when data != "all": a tuple
            (inputs, targets) of pytrees batched on dim 0, a dict batch with "labels" (targets
            {"labels", "attention_mask"}, inputs the rest), or a map-style dataset of (x, y)
            pairs or such dicts (an IndexedDataset too), collated with default_collate.
            loss_fn: per-sample loss(outputs, targets) -> [B] (reduction='none'), default
            cross-entropy; must match the training loss (the recorded weights w_{s,k} are
            applied); language models: :func:`explaind_fast.losses.causal_lm_loss`.
        output: "logits" | class index | list of indices | ("margin", i, j) | list of margins |
            "loss" | "token_losses" (causal LM, [M, T−1]) | ("position", p) (logits at sequence
            position p) | ("position", p, j) | [K, O] projection | callable h(outputs [M, ...],
            targets) -> [M, K] (row-wise).
        model_output: which tensor of the model's output h sees: "logits" (default: a tensor
            itself, a ModelOutput's / dict's "logits", a tuple's first entry), another key, an
            index, or a callable(output) -> tensor.
        params: "all" | "tensor" | "module"/"layer" | {group: [name patterns]} | callable(name) |
            "neuron" | "parameter" | int64 [D] group map.
        data: "all" (no gradient recomputation) | "label" | "sample" | int [n_train] partition.
        steps: "each" | window length | list of boundaries | "all".
        quadrature: "auto" (default: the kink-aware rule "kinks:3" when the model has piecewise
            ops the kink search sees — ReLU, max-pool, abs, clamp … —, Gauss–Legendre with an
            error estimate otherwise; ``Attribution.quadrature`` says what it chose) |
            "midpoint:n" | "gauss-legendre:n" | "adaptive:tol" | "kinks:n" |
            callable(s, theta_s, delta_s) -> NodeSet ([Q] or per-sample [M, Q]).
        mode: "forward" | "reverse" | "auto" (planner).
        memory_budget: bytes the call may hold beyond its inputs and result (default 2 GiB):
            chunks shrink to fit; a budget below the attribution's minimum (its per-step
            D-vectors plus one chunk) raises a ValueError naming that minimum; "minimum"
            runs at the smallest chunks (docs/design.md §10).
        credit: "update" (step where θ moved; forward recursion, P·D state), "gradient" (step
            whose batch produced the gradient; backward recursion, reverse mode, 2·M·K·D state),
            "auto" ("gradient" when data != "all" and steps="all", where both agree, else
            "update").
        max_intervals: cap on the adaptive rule's intervals per step.
        strict: raise :class:`CertificateError` instead of warning (:class:`AttributionWarning`)
            when the result fails its certificate: the step identity of the recomputed gradients,
            the reconstruction, the quadrature tolerance, non-finite rows (see
            :mod:`explaind_fast.attribution.certificate` for the tolerances).
        distributed: "auto" (default: when torch.distributed is initialized with more than one
            rank in ``group``, every rank must call attribute with the same arguments and the
            work is split across them, :mod:`explaind_fast.attribution.distributed`), True
            (the same, but an uninitialized process group is an error) or False (this process
            alone, even under torchrun).
        gather_to: the rank (in ``group``) that receives the full Attribution, or "all"; the
            other ranks get None. The gathered result equals a single-process run's (float64:
            ≤ 1e-12 relative). A rank that raises makes every rank raise
            :class:`DistributedAttributionError` naming it.
        group: the torch.distributed process group (None: the default group).

    Returns an :class:`Attribution` with kernel axes (step, param, data, test, output) minus the
    summed ones (step if "all", param if "all", data if "all", output if a single output).
    Contributions are to the *change* of the output (docs/design.md §1).
    """
    with attention_backend():
        def make_problem():
            return prepare(model, trajectory, test_inputs, test_targets=test_targets,
                           train_data=train_data, loss_fn=loss_fn, output=output,
                           model_output=model_output, params=params, data=data, steps=steps,
                           quadrature=quadrature, mode=mode, memory_budget=memory_budget,
                           dtype=dtype, device=device, credit=credit,
                           max_intervals=max_intervals)
        ctx = context(distributed, gather_to, group)
        if ctx is not None:
            return attribute_across_ranks(
                ctx, make_problem, progress=lambda N, on: _progress(N, progress and on),
                strict=strict, translate=_forward_ad_error, finish_plan=_finish_plan)
        pb = make_problem()
        acc = Accumulator(pb)
        bar = _progress(pb.N, progress)
        try:
            (update_credit if pb.credit == "update" else gradient_credit)(pb, acc, bar)
        except (NotImplementedError, RuntimeError) as e:
            err = _forward_ad_error(pb, e)
            if err is e:
                raise
            raise err from e
        finally:
            bar.close()
        _finish_plan(pb)
        return acc.result(strict=strict)


def _finish_plan(pb) -> None:
    pb.plan.per_sample = per_sample_text(pb.fm)


def _forward_ad_error(pb, e: BaseException) -> BaseException:
    """The ValueError naming the op without a forward-mode derivative that ``e`` reports, or e."""
    if not isinstance(e, (NotImplementedError, RuntimeError)):
        return e
    op = forward_ad_missing(e)
    if op is None:
        return e
    err = ValueError(f"forward-mode AD is not implemented for {op} (a JVP of mode="
                     f"{pb.plan.mode!r} or of quadrature={pb.rule.text!r} ran into it): use "
                     "mode='reverse' with a fixed quadrature such as "
                     "quadrature='gauss-legendre:8'")
    err.__cause__ = e
    return err


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress(N, progress):
    if not progress:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=N, desc="explaind steps", leave=False)
