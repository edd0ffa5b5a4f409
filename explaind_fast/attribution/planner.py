"""Forward vs reverse mode: cost and peak-memory estimates (docs/design.md §10) and chunk sizes.

Notation: D parameters, M test samples, K outputs per sample (after folding into h), G parameter
groups, P data partitions, Q quadrature nodes per step, A activations per test sample
(measured with forward hooks), b bytes per number, T = G·(P+1) + 1 tangents.

    floor    b·D·F   (F = :func:`floor_vectors`: θ_s, θ_{s+1}, Δ_s, [Φ_s; r_s], recursion state,
                      Adam's coefficients, temporaries)
    forward  cost ≈ Q·T·M·6D            peak ≈ floor + b·T_c·(D + 2·M·A)
    reverse  cost ≈ Q·M·K·6D + M·K·(P+1)·2D
             peak ≈ floor + b·m_c·K_c·(D + H·2D + A + G·(P+1) + X·(P+1)·D)
                          + b·c·K_c·(D + A)

with T_c tangents per chunk, m_c test samples and K_c outputs per row chunk, c (sample, node)
pairs per vmap(jacrev) call (pair_chunk), X = 1 when the contraction falls back to an [R, P, D]
product (more than 64 groups and no fused op), H = 1 with the backward recursion. A budget below
floor + one chunk raises :class:`BudgetError` naming the minimum (docs/design.md §10).
Costs are FLOP-ish (a dense model's forward is ≈ 2D flops per sample); they only rank the modes.

The train side (per-sample data) holds the per-sample gradients of one batch of B samples one
*slab* at a time (consecutive parameter tensors, :func:`gradient_slabs`): ≈ b·n·(3·S + A) with S
the largest slab's numbers (S = D when the whole θ fits: no streaming) and n = B samples per pass
unless a single tensor's gradients of the batch exceed the train budget (then n < B), within
1/TRAIN_SHARE of the budget; each extra slab or pass costs one more forward and partial backward
pass. Partitions of several samples hold U_c ≤ U gradient rows of D.

Across W ranks (:mod:`.distributed`, docs/design.md §13) every rank gets this same plan and takes
a share: "steps" (data="all", step-local rule) N/W updates each at the peak above; "rows" (reverse
mode) the row chunks i ≡ r (mod W), same peak; "partitions" (gradient credit, gradients
dominating) every row, the partitions p ≡ r (mod W), same peak; "tangents" (forward mode) ⌈G/W⌉·2 tangents
(data="all") or the partitions p ≡ r (mod W), E → ⌈P/W⌉·D. Every rank also holds the full
result buffers b·(S·G·(P+1)·M·K + N·M·K).
"""
from __future__ import annotations

from dataclasses import dataclass, asdict, field

from .contraction import TANGENTS_PER_CALL

DEFAULT_BUDGET = 2 * 1024 ** 3
MAX_PAIRS = 1024
#: activation bytes one forward-mode call may hold when it batches quadrature nodes: many small
#: calls cost more than the work on a small test set, and larger working sets make glibc hand
#: freed memory back to the kernel, which zeroes it again page by page on the next call. Bytes,
#: not numbers: 32 MiB in float64 made the paper case's midpoint:100 1.13x faster (no faults) but
#: gave the grokking layer x step run (8 samples, 13 tangents) 16-18 % system time against
#: 0.2-2.1 % at 16 MiB, and 24 MiB 11-14 % against 3-5 %, for no wall time gained
#: (bench/results/node_batch_ab_*.json, node_batch_kinks_grokking_ab*.json: bench_paper_case.py /
#: bench_kinks_speed.py --node-batch)
NODE_BATCH_BYTES = 16 * 1024 ** 2
#: the share of the memory budget the per-sample gradients of one batch may hold (train side)
TRAIN_SHARE = 4
#: CPU: bytes one train-side pass may hold at most, whatever the budget. A larger block goes
#: beyond glibc's mmap threshold (32 MiB by default, 64 MiB after keep_freed_memory()) and is
#: mapped fresh, zeroed page by page, on every pass: the --full demo's Figures 4/5 call (4000
#: per-sample gradients of the paper's transformer, float64, budget 18 GiB, 12 steps) took 78.2 s
#: in 4.6 GiB passes, system time 69 % of user, and 61.1 s in 48 MiB passes, 15 % (the one-time
#: first touch of E and B; bench/results/sample_data_paper_cpu_12steps.json:
#: bench_sample_data_paper.py). GPUs keep the budget's share.
CPU_TRAIN_PASS_BYTES = 48 * 1024 ** 2
#: numbers held per per-sample gradient entry of a slab: vmap's output, the backward's buffers
#: and the consumer's temporary (train_side.BatchGradients)
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
    #: kink search (kink-aware rules): numbers one vmapped call of the switching-value capture may
    #: hold (rows × 8·K; :class:`explaind_fast.quadrature.kinks.capture._Path`), the budget left
    #: beside the floor, at most SEARCH_MAX_ELEMS
    search_elems: int = 0

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


#: D-vectors of short-lived temporaries and allocator slack counted into every floor: one
#: D-sized temporary of the step's recursions, and one freed D-vector the allocator keeps
TRANSIENT_VECTORS = 2


def floor_vectors(*, P, itemsize, credit, data_all, grouped=True, coef_vectors=0,
                  mode="reverse"):
    """D-vectors (of ``itemsize`` bytes) one step holds whatever the chunks: θ_s, θ_{s+1}, Δ_s,
    with update credit B = [Φ_s[1..P]; r_s] (P+1) and the regularisation state R, the per-partition
    moment state E (P, update credit with per-sample data), the optimizer's per-coordinate
    coefficients (``coef_vectors``: Adam's v and scale), the group map and permutation when the
    groups are not contiguous in the layout (int64), the step-identity check's two vectors
    (per-partition data), and TRANSIENT_VECTORS. Forward mode with
    data="all" holds [r_s] only (it never pushes −Δ_s − r_s)."""
    n = 3 + TRANSIENT_VECTORS + coef_vectors
    if credit == "update":                   # B, R and E (gradient credit streams its B)
        n += 1 + (1 if (data_all and mode == "forward") else P + 1) + (0 if data_all else P)
    if not data_all:                         # the step-identity check's state (certificate.py)
        n += 2
    if not grouped:
        n += 2 * 8 / itemsize
    return n


#: numbers one call of the kink search's capture holds at most (rows × 8·K; 128 MiB in float64)
SEARCH_MAX_ELEMS = 1 << 24


class BudgetError(ValueError):
    """memory_budget below what the attribution needs at its smallest chunks."""


def make_plan(*, D, M, K, G, P, Q, A, itemsize, mode, credit, budget, data_all, fallback_product,
              numels=None, batch=0, grouped=True, coef_vectors=0, device_type="cpu"):
    """The plan for one attribution; ``budget`` bytes (None: DEFAULT_BUDGET, "minimum": the
    smallest chunks, the budget is then the floor). Raises :class:`BudgetError` naming the
    minimum when the budget is below it (docs/design.md §10). ``device_type`` "cpu" caps the
    train side's passes at :data:`CPU_TRAIN_PASS_BYTES`."""
    minimum_requested = isinstance(budget, str) and budget == "minimum"
    budget = DEFAULT_BUDGET if budget is None else (0 if minimum_requested else int(budget))
    T = G * (P + 1) + 1
    E = P * D if (not data_all and credit == "update") else 0
    fwd_cost = Q * T * M * 6 * D
    rev_cost = Q * M * K * 6 * D + M * K * (P + 1) * 2 * D
    if mode == "auto":
        mode = "reverse" if (credit == "gradient" or rev_cost < fwd_cost) else "forward"
    n_floor = floor_vectors(P=P, itemsize=itemsize, credit=credit, data_all=data_all,
                            grouped=grouped, coef_vectors=coef_vectors, mode=mode)
    base = int(itemsize * D * n_floor)
    # forward: one tangent (D numbers) and its activations (2·M·A) per tangent of a call
    per_tangent = itemsize * (D + 2 * M * A)
    # reverse: one row of φ (D), the backward recursion's H and Hreg (gradient credit), the
    # contraction's output and fallback product, a permuted copy of φ when the groups are not
    # contiguous; one (sample, node) pair of the vmap(jacrev) call holds K_c Jacobian rows (D)
    # and their activations (A)
    per_row = itemsize * (D + 2 * D * int(credit == "gradient") + A + G * (P + 1)
                          + (P + 1) * D * int(fallback_product) + D * int(not grouped))
    per_pair_row = itemsize * (D + A)
    minimum = base + (per_tangent if mode == "forward" else per_row + per_pair_row)
    if minimum_requested:
        budget = minimum
    if budget < minimum:
        raise BudgetError(
            f"memory_budget={budget} B ({budget / 2**20:.1f} MiB) is below the minimum of this "
            f"attribution in {mode} mode, {minimum} B ({minimum / 2**20:.1f} MiB): every step holds "
            f"{n_floor:g} vectors of D={D} numbers at {itemsize} B (θ_s, θ_(s+1), Δ_s, "
            f"[Φ_s; r_s] for P={P} partitions, the optimizer's recursion state, temporaries) plus "
            + ("one JVP tangent" if mode == "forward" else "one row of φ_s and one pair Jacobian")
            + "; pass memory_budget >= that, or memory_budget='minimum' (docs/design.md §10)"
            + ("" if not E else f". Update-step credit keeps one D-vector per data partition "
               f"({P}×{D}×{itemsize} B of it): credit='gradient' (the backward recursion) needs "
               "none"))
    avail = budget - base
    # the train side runs beside the floor; with gradient credit also beside the row chunk's φ, H
    # and Hreg (it contracts with H), so it takes its share of the budget first
    train_budget = max(1, min(budget // TRAIN_SHARE, avail))
    if device_type == "cpu":
        train_budget = min(train_budget, CPU_TRAIN_PASS_BYTES)
    overlap = credit == "gradient" and not data_all
    if overlap and avail - train_budget >= per_row + per_pair_row:
        avail -= train_budget
    t_chunk = max(1, min(T, avail // max(per_tangent, 1)))
    # reverse: outputs per row chunk (K_c) so that one sample's rows and one pair fit, then half
    # of what is left to the rows of φ (m_c samples), the rest to the pairs of one jacrev call
    if K * (per_row + per_pair_row) <= avail:
        k_chunk = K
    else:
        k_chunk = max(1, min(K, avail // (per_row + per_pair_row)))
    m_chunk = max(1, min(M, (avail // 2) // max(k_chunk * per_row, 1)))
    rows_bytes = m_chunk * k_chunk * per_row
    pair_chunk = max(1, min(MAX_PAIRS, (avail - rows_bytes) // max(k_chunk * per_pair_row, 1)))
    pairs_used = min(pair_chunk, m_chunk * max(Q, 1))   # a call never has more pairs than its rows
    est = {"forward": {"cost": fwd_cost},
           "reverse": {"cost": rev_cost,
                       "peak_bytes": base + rows_bytes + pairs_used * k_chunk * per_pair_row},
           "tangents": T, "activations_per_sample": A, "floor_bytes": base,
           "floor_vectors": n_floor, "minimum_budget": minimum}
    # tangent × node evaluations per call: as many as the budget and NODE_BATCH_BYTES of
    # activations (2·M·A numbers per evaluation) allow, at least one node of t_chunk tangents
    # (forward_step also calls with at most contraction.TANGENTS_PER_CALL tangents)
    per_eval = itemsize * 2 * M * A
    evals = min(avail // max(per_tangent, 1), NODE_BATCH_BYTES // max(per_eval, 1),
                t_chunk * max(Q, 1) * 8)
    eval_chunk = max(int(t_chunk), int(evals))
    # the tangents forward_step really pushes per call (shared nodes: all Q nodes per call, so
    # at most eval_chunk // 2Q tangents, at least TANGENTS_PER_CALL)
    pushed = min(T, t_chunk, max(TANGENTS_PER_CALL, eval_chunk // max(2 * Q, 1)))
    est["forward"]["peak_bytes"] = base + per_tangent * pushed
    slabs = [(0, D)]
    if not data_all and batch:
        slabs = gradient_slabs(numels if numels is not None else (D,), batch, itemsize,
                               train_budget)
        S = max(b - a for a, b in slabs)
        # samples per pass when even the largest slab's gradients of the batch do not fit
        n = max(1, min(batch, train_budget // max(SLAB_COPIES * itemsize * S, 1)))
        est["train_side"] = {"batch": int(batch), "slabs": len(slabs), "largest_slab": int(S),
                             "samples_per_pass": int(n),
                             "peak_bytes": itemsize * n * (SLAB_COPIES * S + A),
                             "unstreamed_peak_bytes": itemsize * batch * (SLAB_COPIES * D + A)}
        # the train side runs beside the floor, between the steps' contractions
        train_peak = base + min(train_budget, est["train_side"]["peak_bytes"]) + \
            (rows_bytes if overlap else 0)
        est[mode]["peak_bytes"] = max(est[mode]["peak_bytes"], train_peak)
    return Plan(mode=mode, credit=credit, memory_budget=budget, tangent_chunk=int(t_chunk),
                sample_chunk=int(m_chunk), output_chunk=int(k_chunk), pair_chunk=int(pair_chunk),
                estimates=est, eval_chunk=eval_chunk, train_budget=int(train_budget),
                train_batch=int(batch), train_slabs=len(slabs),
                search_elems=int(max(1, min(SEARCH_MAX_ELEMS, avail // itemsize))))
