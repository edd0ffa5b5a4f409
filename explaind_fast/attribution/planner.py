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

    def to_dict(self):
        return asdict(self)


def make_plan(*, D, M, K, G, P, Q, A, itemsize, mode, credit, budget, data_all, fallback_product):
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
    if mode == "auto":
        mode = "reverse" if (credit == "gradient" or rev_cost < fwd_cost) else "forward"
    return Plan(mode=mode, credit=credit, memory_budget=budget, tangent_chunk=int(t_chunk),
                sample_chunk=int(m_chunk), output_chunk=int(k_chunk), pair_chunk=int(pair_chunk),
                estimates=est, eval_chunk=eval_chunk)
