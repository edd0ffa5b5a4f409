"""Fuzz suite (hypothesis) of path_kernel_reduce: both backends (C++; Triton on CUDA or under
TRITON_INTERPRET=1, with a random work split) against the naive float64 reference under the
documented semantics (explaind_fast.ops.path_kernel_reduce): random shapes (zero-sized dimensions,
empty groups), layouts (transposed, sliced, expanded inputs), dtypes, alpha, and

* test_fuzz_special_values: ±inf, NaN, ±0 at random positions of J, w, B and out, and special alpha;
  NaN positions must be identical, inf entries identical (signs included), finite entries within
  the rigorous rounding bound of explaind_fast.testing.op_cases. The other values are small integers
  (exact in every order) or Gaussian (no exact cancellation), so that no outcome hinges on rounding,
  the one thing the documentation leaves backend-dependent;
* test_fuzz_magnitudes: huge and subnormal finite values at random positions (no overflow possible by
  construction): every entry finite, within the rounding bound;
* test_fuzz_out_overlapping_inputs: out placed at random in one buffer shared with J, w, B, offsets:
  refused (RuntimeError naming out and the input) exactly when it overlaps, correct otherwise.

Bounded for CI: small shapes and example counts (the interpreter is slow), about 20 s in all on 2 cores.
"""
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from explaind_fast.ops.reference import path_kernel_reduce_naive
from explaind_fast.testing.op_cases import (acc_alpha, acc_dtype, assert_within, rounding_bound, run_backend,
                                            triton_device)

inf, nan = float("inf"), float("nan")
DTYPES = [torch.float32, torch.bfloat16, torch.float64]
BACKENDS = ["cpp"] + (["triton"] if triton_device() is not None else [])
# Deterministic in CI (derandomize, no example database); EXPLAIND_FUZZ_RANDOM=1 explores anew.
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
                derandomize=os.environ.get("EXPLAIND_FUZZ_RANDOM") != "1", database=None)
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),  # numpy (interpreter)
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")]


@st.composite
def problems(draw, max_D=40):
    """Shapes, offsets (empty groups likely), dtype and layouts, without values."""
    dtype = draw(st.sampled_from(DTYPES))
    sizes = dict(Q=draw(st.integers(1, 3)), R=draw(st.integers(1, 5)), P=draw(st.integers(1, 5)),
                 D=draw(st.integers(1, max_D)))
    zero = draw(st.sampled_from([None] * 8 + list(sizes)))  # a zero-sized dimension one time in three
    if zero is not None:
        sizes[zero] = 0
    Q, R, P, D = sizes["Q"], sizes["R"], sizes["P"], sizes["D"]
    G = draw(st.integers(0 if D == 0 else 1, 7))
    cuts = sorted(draw(st.lists(st.integers(0, D), min_size=max(G - 1, 0), max_size=max(G - 1, 0))))
    offsets = torch.tensor([0] + cuts + [D] if G > 0 else [0], dtype=torch.int64)
    layouts = dict(J=draw(st.sampled_from(["contiguous", "transposed", "sliced", "expanded"])),
                   B=draw(st.sampled_from(["contiguous", "transposed", "sliced", "expanded"])),
                   w=draw(st.sampled_from(["contiguous", "sliced"])))
    return dtype, (Q, R, D, P), offsets, layouts


def laid_out(values, layout):
    """The same values in another memory layout (the op must read any strides)."""
    if layout == "transposed":
        order = list(range(values.dim()))[::-1]
        return values.permute(order).contiguous().permute(order)
    if layout == "sliced":  # every other element of a larger tensor, plus a dropped last index
        big = torch.zeros([2 * n + 1 for n in values.shape], dtype=values.dtype)
        view = big[tuple(slice(0, 2 * n, 2) for n in values.shape)]
        view.copy_(values)
        return view
    if layout == "expanded" and values.shape[0] > 1:  # stride 0 along the first dimension
        return values[:1].expand_as(values)
    return values


def sprinkle(t, positions, values):
    """Set t's flat entries at `positions` (taken modulo numel) to `values` (in place, contiguous t)."""
    flat = t.view(-1)
    for pos, v in zip(positions, values):
        if flat.numel():
            flat[pos % flat.numel()] = v


def regular(shape, dtype, gen, integer):
    if integer:
        return torch.randint(-3, 4, shape, generator=gen).to(dtype)
    return torch.randn(shape, generator=gen).to(dtype)


def compare_backends(dtype, J, w, B, offsets, out, alpha, split):
    """Every backend against the float64 reference; returns the results (float64, by backend)."""
    a = acc_alpha(alpha, dtype)
    want = path_kernel_reduce_naive(J.double(), w.double(), B.double(), offsets,
                                    out=None if out is None else out.double().clone(), alpha=a)
    # bfloat16 subnormal inputs may be read as zero (the op's docstring; the Triton interpreter does)
    bound = rounding_bound(J, w, B, offsets, alpha=a if math.isfinite(a) else 1.0, out=out, underflow=True,
                           flushed_inputs=dtype == torch.bfloat16)
    event("out has entries" if want.numel() else "out empty")
    event(f"non-finite entries: {'some' if want.numel() and not torch.isfinite(want).all() else 'none'}")
    results = {}
    for backend in BACKENDS:
        out_b = None if out is None else out.clone()
        got = run_backend(backend, J, w, B, offsets, out=out_b, alpha=alpha, split=split)
        what = (f"{backend} {dtype} {tuple(J.shape)} P={B.shape[0]} offsets={offsets.tolist()} alpha={alpha} "
                f"split={split}")
        assert got.dtype == acc_dtype(dtype) and got.shape == want.shape, what
        assert_within(got, want, bound, what)
        results[backend] = got.double()
    return want, results


SPECIALS = [inf, -inf, nan, 0.0, -0.0]
special_spots = st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(SPECIALS)), max_size=3)


@settings(FUZZ, max_examples=150)
@given(problem=problems(), integer=st.booleans(), seed=st.integers(0, 2**32 - 1),
       spots=st.fixed_dictionaries({k: special_spots for k in "JwBo"}),
       alpha=st.sampled_from([1.0, -0.5, 2.0, -0.7, 0.0, -0.0, inf, -inf, nan, 1e300, 3e-39]),
       accumulate=st.booleans(), split=st.sampled_from([None, 1, 4, 16]))
def test_fuzz_special_values(problem, integer, seed, spots, alpha, accumulate, split):
    dtype, (Q, R, D, P), offsets, layouts = problem
    gen = torch.Generator().manual_seed(seed)
    acc = acc_dtype(dtype)
    J = regular((Q, R, D), dtype, gen, integer)
    w = regular((Q,), acc, gen, integer)
    B = regular((P, D), dtype, gen, integer)
    out = regular((offsets.numel() - 1, R, P), acc, gen, integer) if accumulate else None
    for name, t in (("J", J), ("w", w), ("B", B), ("o", out)):
        if t is not None and spots[name]:
            sprinkle(t, *zip(*spots[name]))
    J, w, B = laid_out(J, layouts["J"]), laid_out(w, layouts["w"]), laid_out(B, layouts["B"])
    compare_backends(dtype, J, w, B, offsets, out, alpha, split)


# Powers of two whose products stay far from overflow at these sizes (3 factors, ≤ 120 terms,
# |alpha| ≤ 2: below 2^117 in float32, 2^913 in float64), and subnormals of the accumulation dtype.
HUGE = {torch.float32: 2.0 ** 36, torch.bfloat16: 2.0 ** 36, torch.float64: 2.0 ** 300}
SUBNORMAL = {torch.float32: 2.0 ** -130, torch.bfloat16: 2.0 ** -130, torch.float64: 2.0 ** -1060}
magnitude_spots = st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(["huge", "-huge", "sub", "-sub", "0"])),
                           max_size=4)


@settings(FUZZ, max_examples=80)
@given(problem=problems(), integer=st.booleans(), seed=st.integers(0, 2**32 - 1),
       spots=st.fixed_dictionaries({k: magnitude_spots for k in "JwBo"}),
       alpha=st.sampled_from([1.0, -0.7, 2.0, 0.0, 2.0 ** -140, -(2.0 ** -20)]),
       accumulate=st.booleans(), split=st.sampled_from([None, 1, 4, 16]))
def test_fuzz_magnitudes(problem, integer, seed, spots, alpha, accumulate, split):
    dtype, (Q, R, D, P), offsets, layouts = problem
    gen = torch.Generator().manual_seed(seed)
    acc = acc_dtype(dtype)
    value = {"huge": HUGE[dtype], "-huge": -HUGE[dtype], "sub": SUBNORMAL[dtype], "-sub": -SUBNORMAL[dtype], "0": 0.0}
    J = regular((Q, R, D), dtype, gen, integer)
    w = regular((Q,), acc, gen, integer)
    B = regular((P, D), dtype, gen, integer)
    out = regular((offsets.numel() - 1, R, P), acc, gen, integer) if accumulate else None
    for name, t in (("J", J), ("w", w), ("B", B), ("o", out)):
        if t is not None and spots[name]:
            positions, kinds = zip(*spots[name])
            sprinkle(t, positions, [value[k] for k in kinds])
    assert torch.isfinite(J).all() and torch.isfinite(B).all()  # the subnormals are representable
    J, w, B = laid_out(J, layouts["J"]), laid_out(w, layouts["w"]), laid_out(B, layouts["B"])
    want, results = compare_backends(dtype, J, w, B, offsets, out, alpha, split)
    # No overflow anywhere (by construction), so every entry is finite on every backend.
    assert torch.isfinite(want).all(), (dtype, J, w, B, offsets, out, alpha)
    assert (want.numel() == 0 or want.abs().max() < torch.finfo(acc).max / 2**8)
    for backend, got in results.items():
        assert torch.isfinite(got).all(), backend


def byte_span(t):
    """[first byte, one past the last byte] of t's elements, (0, 0) when t has none."""
    if t.numel() == 0:
        return 0, 0
    lo = sum(min(0, (n - 1) * s) for n, s in zip(t.shape, t.stride()))
    hi = sum(max(0, (n - 1) * s) for n, s in zip(t.shape, t.stride()))
    return t.data_ptr() + lo * t.element_size(), t.data_ptr() + (hi + 1) * t.element_size()


@settings(FUZZ, max_examples=80)
@given(problem=problems(max_D=24), seed=st.integers(0, 2**32 - 1),
       shared=st.fixed_dictionaries({k: st.booleans() for k in ("J", "w", "B", "offsets")}),
       gaps=st.lists(st.integers(0, 6), min_size=4, max_size=4), out_at=st.integers(0, 10**6),
       backend=st.sampled_from(BACKENDS), split=st.sampled_from([None, 4]))
def test_fuzz_out_overlapping_inputs(problem, seed, shared, gaps, out_at, backend, split):
    """out and some of the inputs live in one buffer (inputs disjoint from each other, out anywhere,
    in whole 8-byte words). Refused iff out's bytes meet an input's span; else the right result."""
    dtype, (Q, R, D, P), offsets, layouts = problem
    gen = torch.Generator().manual_seed(seed)
    acc = acc_dtype(dtype)
    G = offsets.numel() - 1
    values = dict(J=regular((Q, R, D), dtype, gen, False), w=regular((Q,), acc, gen, False),
                  B=regular((P, D), dtype, gen, False), offsets=offsets)
    values["J"], values["w"], values["B"] = (laid_out(values[k], layouts[k]) for k in ("J", "w", "B"))
    def words(t):  # 8-byte words of t's whole storage (a sliced view's too)
        return -(-t.untyped_storage().nbytes() // 8)

    out_words = -(-G * R * P * torch.finfo(acc).bits // 64)
    buf = torch.zeros(sum(words(t) + g for t, g in zip(values.values(), gaps)) + out_words + 8, dtype=torch.float64)
    tensors, at = {}, 0
    for (name, t), gap in zip(values.items(), gaps):
        if not shared[name] or t.numel() == 0:
            tensors[name] = t
            continue
        at += gap
        # t's storage (bytes) copied to word `at` of the shared buffer, viewed with t's strides
        n = words(t)
        region = buf[at:at + n].view(torch.uint8)
        t_bytes = torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage())
        region[:t_bytes.numel()].copy_(t_bytes)
        typed = region.view(t.dtype)
        tensors[name] = typed.as_strided(t.shape, t.stride(), typed.storage_offset() + t.storage_offset())
        at += n
    out_start = out_at % (buf.numel() - out_words + 1)
    out = buf[out_start:out_start + out_words].view(acc)[:G * R * P].view(G, R, P).zero_()
    o_lo, o_hi = byte_span(out)
    overlapping = [name for name in ("J", "w", "B", "offsets")
                   if out.numel() and tensors[name].numel()
                   and byte_span(tensors[name])[0] < o_hi and o_lo < byte_span(tensors[name])[1]]
    J, w, B, offs = (tensors[k] for k in ("J", "w", "B", "offsets"))
    in_buf = [k for k, t in tensors.items() if t.numel() and t.untyped_storage().data_ptr() == buf.data_ptr()]
    event(f"overlaps {overlapping[0]}" if overlapping else
          "disjoint, sharing out's storage" if in_buf and out.numel() else "disjoint")
    if overlapping:
        with pytest.raises(RuntimeError, match=f"out overlaps {overlapping[0]} in memory"):
            run_backend(backend, J, w, B, offs, out=out, split=split)
        return
    want = path_kernel_reduce_naive(J.double(), w.double(), B.double(), offs)
    got = run_backend(backend, J, w, B, offs, out=out, split=split)
    assert got.data_ptr() == out.data_ptr()  # accumulated in place
    assert_within(out, want, rounding_bound(J, w, B, offs), f"{backend} disjoint views of one buffer")
