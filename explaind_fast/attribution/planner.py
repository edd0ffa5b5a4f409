"""Forward vs reverse mode: cost and peak-memory estimates (docs/design.md §10) and chunk sizes.

Notation: D parameters, M test samples, K outputs per sample (after folding into h), G parameter
groups, P data partitions, Q quadrature nodes per step, A activation numbers per test sample
(measured with forward hooks), b bytes per number, T = G·(P+1) + 1 tangents (the +1 is Δ_s, for
the residual).

    forward  cost ≈ Q·T·M·6D            peak ≈ b·(T_c·(D + 2·M·A) + E + (P+5)·D)
    reverse  cost ≈ Q·M·K·6D + M·K·(P+1)·2D
             peak ≈ b·(m_c·K·(2D + A + G·(P+1) + X·(P+1)·D + H·2D) + E + (P+5)·D)

with T_c tangents per chunk, m_c test samples per row chunk (when one sample's K rows exceed the
budget, m_c = 1 and its outputs are split into chunks of K_c rows: K → K_c in the formula), E = P·D when the update-credit
forward recursion keeps a per-partition state (else 0), (P+1)·D the contraction input
B = [Φ_s[1..P]; r_s], G·(P+1) per row the contraction's output chunk, X = 1 when the contraction falls back to an
[R, P, D] product (more than 64 groups and no fused op), H = 1 with the backward recursion.
Costs are FLOP-ish (a dense model's forward is ≈ 2D flops per sample); they only rank the modes.

The train side (per-sample data) holds the per-sample gradients of one batch of B samples one
*slab* at a time (consecutive parameter tensors, :func:`gradient_slabs`): ≈ b·B·(3·S + A) with S
the largest slab's numbers (S = D when the whole θ fits: no streaming), within 1/TRAIN_SHARE of the
budget unless a single tensor is larger; each extra slab costs one more forward and partial
backward pass of the batch. Partitions of several samples hold U_c ≤ U gradient rows of D.

Across W ranks (:mod:`.distributed`, docs/design.md §13) every rank gets this same plan and takes
a share: "steps" (data="all", step-local rule) N/W updates each at the peak above; "rows" (reverse
mode) the row chunks i ≡ r (mod W), same peak; "partitions" (gradient credit, gradients
dominating) every row, the partitions p ≡ r (mod W), same peak; "tangents" (forward mode) ⌈G/W⌉·2 tangents
(data="all") or the partitions p ≡ r (mod W), E → ⌈P/W⌉·D. Every rank also holds the full
result buffers b·(S·G·(P+1)·M·K + N·M·K).
"""
from __future__ import annotations

from dataclasses import dataclass, asdict, field

DEFAULT_BUDGET = 2 * 1024 ** 3
MAX_PAIRS = 1024
#: activations one forward-mode call may hold when it batches quadrature nodes (many small calls
#: cost more than the work on a small test set; tensors past ~32 MB are mmap-ed and zeroed by
#: the kernel on every call)
NODE_BATCH_BYTES = 16 * 1024 ** 2
#: the share of the memory budget the per-sample gradients of one batch may hold (train side)
TRAIN_SHARE = 4
#: numbers held per per-sample gradient entry of a slab: vmap's output and its flat assembly, and
#: the consumer's temporary (train_side.BatchGradients)
SLAB_COPIES = 3


@dataclass
class Plan:
    """The contraction order and chunk sizes, plus how the model is evaluated:

    attention: how scaled-dot-product attention runs ("math SDPA backend (forward-mode AD)", or
        "no scaled-dot-product attention seen"; :mod:`explaind_fast.model.attention`);
    mode_reason: why the mode was forced ("" when chosen by cost or by the caller), e.g. reverse
        mode because an op of the model has no forward-mode derivative;
    per_sample: how per-sample functions run: "vmap", or "loop (…)" with vmap's reason when the
        model has data-dependent control flow (a Hugging Face attention-mask check);
    buffers: which buffers the model is evaluated with (the trajectory's recorded ones, and
        which of the given model's differ; problem.py).
    """

    mode: str
    credit: str
    memory_budget: int
    tangent_chunk: int
    sample_chunk: int
    output_chunk: int
    pair_chunk: int
    estimates: dict = field(default_factory=dict)
    attention: str = ""
    mode_reason: str = ""
    per_sample: str = "vmap"
    buffers: str = ""
    #: forward mode: tangent × node JVP evaluations (over all test samples) per call
    eval_chunk: int = 0
    #: train side (per-sample data): bytes the per-sample gradients of one batch may hold; the
    #: slabs are chosen per batch from it (:func:`gradient_slabs`); 0 = no limit (one slab)
    train_budget: int = 0
    #: train side at the batch size ``train_batch`` (the first recorded batch): slabs of
    #: per-sample gradients per batch (1: the whole θ at once, no streaming)
    train_batch: int = 0
    train_slabs: int = 1

    def to_dict(self):
        return asdict(self)


def gradient_slabs(numels, batch: int, itemsize: int, budget: int):
    """Coordinate ranges [(a, b), …] of consecutive parameter tensors (sizes ``numels``, layout
    order) whose per-sample gradients for ``batch`` samples, SLAB_COPIES·itemsize·batch·(b − a)
    bytes, fit in ``budget``. When the largest tensor alone does not fit, slabs hold up to
    17/16 of it (the peak is then B × the largest tensor whatever the budget; the slack keeps a
    bias with its weight: one pass fewer). One range (0, D) when the whole θ fits or budget ≤ 0."""
    D = sum(numels)
    cap = budget // max(SLAB_COPIES * itemsize * max(batch, 1), 1) if budget > 0 else D
    if D <= cap:
        return [(0, D)]
    big = max(numels) if numels else 0
    if cap < big:
        cap = big + big // 16
    out, a, b = [], 0, 0
    for n in numels:
        if b > a and b - a + n > cap:
            out.append((a, b))
            a = b
        b += n
    if b > a or not out:
        out.append((a, b))
    return out


def partition_rows(D: int, itemsize: int, budget: int) -> int:
    """Gradient rows of D numbers (partitions of several samples) held at once within budget."""
    return max(1, budget // max(2 * itemsize * D, 1)) if budget > 0 else 1 << 62


def make_plan(*, D, M, K, G, P, Q, A, itemsize, mode, credit, budget, data_all, fallback_product,
              numels=None, batch=0):
    budget = int(budget) if budget is not None else DEFAULT_BUDGET
    T = G * (P + 1) + 1
    E = P * D if (not data_all and credit == "update") else 0
    base = itemsize * (E + (P + 1) * D + 4 * D)
    fwd_cost = Q * T * M * 6 * D
    rev_cost = Q * M * K * 6 * D + M * K * (P + 1) * 2 * D
    per_tangent = itemsize * (D + 2 * M * A)
    per_sample = itemsize * K * (2 * D + A + G * (P + 1) + (P + 1) * D * int(fallback_product)
                                 + 2 * D * int(credit == "gradient"))
    t_chunk = max(1, min(T, (budget - base) // max(per_tangent, 1)))
    m_chunk = max(1, min(M, (budget - base) // max(per_sample, 1)))
    # when one sample's K rows do not fit, split its outputs too (rows = (sample, output))
    k_chunk = K if per_sample <= budget - base else \
        max(1, min(K, (budget - base) // max(per_sample // K, 1)))
    # (test sample, quadrature node) pairs per vmap(jacrev) call: ≈ K_c·(D + A) numbers each
    pair_chunk = max(1, min(MAX_PAIRS, (budget - base) // max(itemsize * k_chunk * (D + A), 1)))
    est = {"forward": {"cost": fwd_cost, "peak_bytes": base + per_tangent * min(T, t_chunk)},
           "reverse": {"cost": rev_cost, "peak_bytes": base + per_sample * m_chunk * k_chunk // K},
           "tangents": T, "activations_per_sample": A}
    # tangent × node evaluations per call: as many as the budget and NODE_BATCH_BYTES of
    # activations (2·M·A numbers per evaluation) allow, at least one node of t_chunk tangents
    # (forward_step also calls with at most contraction.TANGENTS_PER_CALL tangents)
    per_eval = itemsize * 2 * M * A
    evals = min((budget - base) // max(per_tangent, 1), NODE_BATCH_BYTES // max(per_eval, 1),
                t_chunk * max(Q, 1) * 8)
    eval_chunk = max(int(t_chunk), int(evals))
    train_budget = budget // TRAIN_SHARE
    slabs = [(0, D)]
    if not data_all and batch:
        slabs = gradient_slabs(numels if numels is not None else (D,), batch, itemsize,
                               train_budget)
        S = max(b - a for a, b in slabs)
        est["train_side"] = {"batch": int(batch), "slabs": len(slabs), "largest_slab": int(S),
                             "peak_bytes": itemsize * batch * (SLAB_COPIES * S + A),
                             "unstreamed_peak_bytes": itemsize * batch * (SLAB_COPIES * D + A)}
    if mode == "auto":
        mode = "reverse" if (credit == "gradient" or rev_cost < fwd_cost) else "forward"
    return Plan(mode=mode, credit=credit, memory_budget=budget, tangent_chunk=int(t_chunk),
                sample_chunk=int(m_chunk), output_chunk=int(k_chunk), pair_chunk=int(pair_chunk),
                estimates=est, eval_chunk=eval_chunk, train_budget=int(train_budget),
                train_batch=int(batch), train_slabs=len(slabs))
