"""Shared inputs, oracles and tolerances for the path_kernel_reduce tests (tests/ops/).

Two kinds of oracle, both from explaind_fast.ops.reference.path_kernel_reduce_naive run in float64:

* Exact: small-integer inputs (|J|, |B| ≤ 3, w ∈ {-2..2}) make every product and partial sum an
  integer below 2^24, so float32/bfloat16/float64 kernels must match the reference *exactly*, in any
  summation order. A dropped, duplicated or misassigned coordinate changes the result by ≥ 1.
* Rounding: Gaussian inputs. Any summation order of n = Q + L + 2 terms (fold over Q, dot over the
  segment length L, alpha, accumulation into out) has |error| ≤ n·u·M (u = eps/2, the unit
  roundoff; Higham, Accuracy and Stability, §3.1), where M = Σ_q |w_q| Σ_i |J[q,r,i]|·|B[p,i]| is
  computed by the same reference on absolute values. The tests allow n·eps·M + tiny: a rigorous
  bound with a factor-2 margin, so it can never be flaky, while any wrong term shows up in the
  exact tests above. With subnormal intermediates (rounding_bound(..., underflow=True)) each
  product may also err by up to η = half the smallest subnormal, and an error in the fold
  A = Σ_q w_q J[q] is multiplied by B afterwards: add 2η·(|alpha|·(Q·Σ_{i∈g}|B[p,i]| + L) + L + 1).
"""
import torch

from ..ops.reference import path_kernel_reduce_naive

EPS = {torch.float32: torch.finfo(torch.float32).eps, torch.bfloat16: torch.finfo(torch.float32).eps,
       torch.float64: torch.finfo(torch.float64).eps}  # bf16 inputs are accumulated in float32


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def acc_alpha(alpha, dtype):
    """alpha as every backend applies it for inputs of `dtype`: rounded to the accumulation dtype
    (±inf beyond its range). Pass this to the float64 reference to get the documented semantics."""
    return torch.tensor(alpha, dtype=acc_dtype(dtype)).item()


def triton_device():
    """Where path_kernel_reduce_triton runs in this process: 'cuda', 'cpu' (Triton interpreter,
    TRITON_INTERPRET=1 before triton is imported) or None. Imports triton."""
    if torch.cuda.is_available():
        return "cuda"
    from ..ops import triton_launcher

    return "cpu" if triton_launcher._is_interpreted() else None


def run_backend(backend, J, w, B, offsets, out=None, alpha=1.0, split=None):
    """One backend on CPU inputs; the result on the CPU (and `out`, if given, accumulated in place).
    'cpp': the op (the C++ kernel on CPU tensors). 'triton': path_kernel_reduce_triton on
    triton_device(), with `split` coordinates per work item (None: its default)."""
    if backend == "cpp":
        from .. import ops

        return ops.path_kernel_reduce(J, w, B, offsets, out=out, alpha=alpha)
    from ..ops.triton_launcher import path_kernel_reduce_triton

    device = triton_device()
    args = [t.to(device) for t in (J, w, B, offsets)]
    out_dev = None if out is None else out.to(device)
    got = path_kernel_reduce_triton(*args, out=out_dev, alpha=alpha, split=split)
    if out is not None and out_dev is not out:
        out.copy_(out_dev)
    return got.cpu() if out is None else out


def make_offsets(D, G, kind, generator):
    """[G+1] int64 offsets from 0 to D: 'even' splits, 'random' cut points (empty groups likely),
    'unit' one coordinate per group (G must equal D)."""
    if kind == "even":
        return torch.linspace(0, D, G + 1).round().long()
    if kind == "unit":
        assert G == D
        return torch.arange(D + 1)
    cuts = torch.randint(0, D + 1, (G - 1,), generator=generator).sort().values
    return torch.cat([torch.tensor([0]), cuts, torch.tensor([D])])


def make_inputs(Q, R, D, P, dtype, generator, integer=False):
    acc = acc_dtype(dtype)
    if integer:
        J = torch.randint(-3, 4, (Q, R, D), generator=generator).to(dtype)
        w = torch.randint(-2, 3, (Q,), generator=generator).to(acc)
        B = torch.randint(-3, 4, (P, D), generator=generator).to(dtype)
    else:
        J = torch.randn(Q, R, D, generator=generator).to(dtype)
        w = torch.rand(Q, generator=generator).to(acc) + 0.1
        B = torch.randn(P, D, generator=generator).to(dtype)
    return J, w, B


def reference64(J, w, B, offsets, out=None, alpha=1.0):
    """The float64 oracle on the (already rounded) inputs."""
    out64 = None if out is None else out.double().clone()
    return path_kernel_reduce_naive(J.double(), w.double(), B.double(), offsets, out=out64, alpha=alpha)


def rounding_bound(J, w, B, offsets, alpha=1.0, out=None, underflow=False, flushed_inputs=False):
    """Per-entry bound n·eps·M (+ the rounding of |out| when accumulating), see the module docstring;
    underflow=True adds the absolute error that subnormal products can make (same docstring);
    flushed_inputs=True allows subnormal J and B entries to be read as zero (the Triton
    interpreter reads bfloat16 subnormals so): |alpha|·t·Σ_q|w_q|·Σ_{i∈g}(|B[p,i]| + |J[q,r,i]| + t)
    with t the smallest normal number of the input dtype."""
    eps = EPS[J.dtype]
    lengths = (offsets[1:] - offsets[:-1]).double().view(-1, 1, 1)
    M = path_kernel_reduce_naive(J.double().abs(), w.double().abs(), B.double().abs(), offsets,
                                 alpha=abs(alpha))
    n = J.shape[0] + lengths + 2
    tiny = torch.finfo(acc_dtype(J.dtype)).tiny
    bound = n * eps * M + 4 * tiny
    if out is not None:
        bound = bound + 2 * eps * out.double().abs()
    if underflow:
        two_eta = tiny * eps  # the smallest subnormal of the accumulation dtype
        sum_B = path_kernel_reduce_naive(torch.ones(1, 1, J.shape[2], dtype=torch.float64),
                                         torch.ones(1, dtype=torch.float64), B.double().abs(), offsets)  # [G, 1, P]
        bound = bound + two_eta * (abs(alpha) * (J.shape[0] * sum_B + lengths) + lengths + 1)
    if flushed_inputs:
        t = torch.finfo(J.dtype).tiny
        w_abs = w.double().abs()
        ones_J = torch.ones(J.shape, dtype=torch.float64)
        ones_B = torch.ones(B.shape, dtype=torch.float64)
        through_B = path_kernel_reduce_naive(ones_J, w_abs, B.double().abs() + t, offsets)
        through_J = path_kernel_reduce_naive(J.double().abs(), w_abs, ones_B, offsets)
        bound = bound + abs(alpha) * t * (through_B + through_J)
    return bound


def assert_within(got, want, bound, what=""):
    """Elementwise |got - want| ≤ bound; NaN/inf must match exactly in position. Prints the worst entry."""
    got = got.double()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    nan_got, nan_want = torch.isnan(got), torch.isnan(want)
    assert torch.equal(nan_got, nan_want), (
        f"{what}: NaN positions differ: kernel {nan_got.nonzero()[:5].tolist()}, "
        f"reference {nan_want.nonzero()[:5].tolist()}")
    finite = torch.isfinite(want)
    assert torch.equal(got[~finite & ~nan_want], want[~finite & ~nan_want]), f"{what}: inf entries differ"
    err = torch.where(finite, (got - want).abs(), torch.zeros_like(got))
    excess = torch.where(finite, err - bound, torch.full_like(got, -1.0))
    if excess.numel() and excess.max() > 0:
        idx = tuple(int(i) for i in torch.unravel_index(excess.argmax(), excess.shape))
        raise AssertionError(f"{what}: |error| {err[idx].item():.3e} > bound {bound[idx].item():.3e} "
                             f"at [g, r, p] = {list(idx)} (kernel {got[idx].item()!r}, "
                             f"reference {want[idx].item()!r}); max error {err.max().item():.3e}")


# Shapes (Q, R, D, P, G, offsets kind): D not a multiple of any block size (256, 64, 16), G = 1,
# G = D, empty groups, Q = 1, P = 1, R = 1, R and P not multiples of the tile sizes.
SHAPES = [
    (3, 5, 37, 4, 5, "random"),
    (1, 9, 1031, 3, 1, "even"),        # one long segment, D prime
    (2, 17, 523, 1, 523, "unit"),      # G = D, P = 1
    (4, 1, 700, 17, 40, "random"),     # R = 1, P not a multiple of 16
    (2, 33, 300, 16, 300, "unit"),     # G = D, P = 16 (rank-1 path on the CPU)
    (2, 6, 2000, 5, 7, "random"),      # long random segments, empty groups likely
    (5, 3, 64, 2, 64, "random"),       # many empty groups
]


def shape_id(shape):
    Q, R, D, P, G, kind = shape
    return f"Q{Q}-R{R}-D{D}-P{P}-G{G}-{kind}"


def case(shape, dtype, seed=0, integer=False):
    Q, R, D, P, G, kind = shape
    gen = torch.Generator().manual_seed(seed)
    J, w, B = make_inputs(Q, R, D, P, dtype, gen, integer=integer)
    offsets = make_offsets(D, G, kind, gen)
    return J, w, B, offsets


# (argument changes, message fragment): each bad input and the words its error must contain.
def bad_inputs(dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    J, w, B = make_inputs(2, 3, 10, 4, dtype, gen)
    good = dict(J=J, w=w, B=B, offsets=torch.tensor([0, 4, 10]))
    acc = acc_dtype(dtype)
    cases = [
        (dict(offsets=torch.tensor([3, 4, 10])), "offsets must start at 0, got 3"),
        (dict(offsets=torch.tensor([0, 4, 9])), "offsets must end at D = J.size(2) = 10, got 9"),
        (dict(offsets=torch.tensor([0, 6, 4, 10])), "offsets must be non-decreasing, but offsets[1] = 6 > offsets[2] = 4"),
        (dict(offsets=torch.tensor([0, 4, 10], dtype=torch.int32)), "offsets must have dtype int64, got Int"),
        (dict(offsets=torch.tensor([[0, 4, 10]])), "offsets must be a 1-D tensor"),
        (dict(B=B[:, :9]), "B.size(1) must equal D = J.size(2) = 10, got 9"),
        (dict(w=w[:1]), "w must have length Q = J.size(0) = 2, got 1"),
        (dict(w=w.to(torch.float16)), "w must have dtype"),
        (dict(J=J[0]), "J must be a 3-D tensor [Q, R, D]"),
        (dict(J=J.to(torch.int64), B=B.to(torch.int64)), "J must have dtype float32, bfloat16 or float64, got Long"),
        (dict(J=J.to(torch.float16), B=B.to(torch.float16)), "J must have dtype float32, bfloat16 or float64, got Half"),
        (dict(B=B.to(torch.int32)), "B must have the dtype of J"),
        (dict(out=torch.zeros(2, 3, 5, dtype=acc)), "out must have shape [G, R, P] = [2, 3, 4], got [2, 3, 5]"),
        (dict(out=torch.zeros(2, 3, 4, dtype=torch.float16)), "out must have dtype"),
        (dict(out=torch.zeros(2, 4, 3, dtype=acc).transpose(1, 2)), "out must be contiguous"),
        (dict(B=B.to("meta")), "B is on meta but J is on cpu; all tensors must be on the same device"),
        (dict(out=torch.zeros(2, 3, 4, dtype=acc, device="meta")), "out is on meta but J is on cpu"),
        (dict(out=torch.zeros(1, 3, 4, dtype=acc).expand(2, 3, 4)), "out has internal overlap"),
    ]
    return good, cases + overlapping_out_cases(J, w, B, good["offsets"])


def overlapping_out_cases(J, w, B, offsets):
    """(argument changes, message) where out shares memory with an input: the very memory, a partial
    overlap, views of one storage in other dtypes. Every backend must refuse them (out is written
    while the inputs are read). J, w, B: contiguous, J [2, 3, 10], B [4, 10], offsets [0, 4, 10]."""
    acc = acc_dtype(J.dtype)
    J_mem = J.reshape(-1).view(acc)            # J's own memory, read as the accumulation dtype
    buf = torch.zeros(64, dtype=acc)           # B (dtype of J) at its start, out overlapping its tail
    B_shared = buf.view(J.dtype)[:B.numel()].view(B.shape).copy_(B)
    b_end = B.numel() * B.element_size() // buf.element_size()  # where B ends, in buf's elements
    w_buf = torch.zeros(32, dtype=acc)         # out at [8, 32), w its last two elements
    offsets_mem = torch.zeros(24, dtype=torch.int64)
    offsets_shared = offsets_mem[:3].copy_(offsets)
    return [
        (dict(out=J_mem[:24].view(2, 3, 4)), "out overlaps J in memory"),
        (dict(out=J_mem[3:27].view(2, 3, 4)), "out overlaps J in memory"),          # partial
        (dict(B=B_shared, out=buf[b_end - 4:b_end + 20].view(2, 3, 4)), "out overlaps B in memory"),
        (dict(w=w_buf[30:32].copy_(w), out=w_buf[8:32].view(2, 3, 4)), "out overlaps w in memory"),
        (dict(offsets=offsets_shared, out=offsets_mem.view(acc)[:24].view(2, 3, 4)),
         "out overlaps offsets in memory"),
    ]
