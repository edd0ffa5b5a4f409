"""The Triton backend (explaind_fast.ops.triton_launcher.path_kernel_reduce_triton) against the naive float64
reference: on CUDA when present, else on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1,
as .ci/run sets it). The interpreter is slow, so shapes stay small (D ≤ 2000). Oracles and
tolerances: see explaind_fast/testing/op_cases.py."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from explaind_fast.testing.op_cases import assert_within, bad_inputs, case, reference64, rounding_bound, shape_id
from explaind_fast.ops import triton_launcher as triton_module
from explaind_fast.ops.triton_launcher import path_kernel_reduce_triton

if torch.cuda.is_available():
    DEVICE = "cuda"
elif triton_module._is_interpreted():
    DEVICE = "cpu"
else:
    DEVICE = None
needs_triton_device = pytest.mark.skipif(
    DEVICE is None, reason="needs a CUDA GPU or TRITON_INTERPRET=1 (set before triton is imported)")

DTYPES = [torch.float32, torch.bfloat16, torch.float64]
SHAPES = [
    (3, 5, 37, 4, 5, "random"),
    (1, 9, 1031, 3, 1, "even"),       # G = 1, one long segment, D prime
    (2, 7, 97, 1, 97, "unit"),        # G = D, P = 1 (broadcast path)
    (4, 1, 700, 17, 40, "random"),    # R = 1, P = 17: two P tiles
    (2, 20, 64, 16, 64, "unit"),      # G = D, P = 16 (tl.dot path), two R tiles
    (2, 6, 2000, 5, 7, "random"),     # long random segments, empty groups likely
    (5, 3, 64, 2, 64, "random"),      # many empty groups
]
# None: the default work split; 48: forces split-K of long groups and many packs of short ones.
SPLITS = [None, 48]


def on_device(*tensors):
    return [t.to(DEVICE) for t in tensors]


@needs_triton_device
@pytest.mark.parametrize("split", SPLITS, ids=lambda s: f"split{s}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_exact_on_integer_inputs(shape, dtype, split):
    J, w, B, offsets = case(shape, dtype, seed=11, integer=True)
    got = path_kernel_reduce_triton(*on_device(J, w, B, offsets), split=split)
    assert got.device.type == DEVICE
    assert torch.equal(got.cpu().double(), reference64(J, w, B, offsets))


@needs_triton_device
@settings(max_examples=12, deadline=None)
@given(Q=st.integers(1, 3), R=st.integers(1, 20), D=st.integers(1, 300), P=st.integers(1, 20),
       G=st.integers(1, 12), kind=st.sampled_from(["even", "random"]), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from(DTYPES), split=st.sampled_from([None, 7, 32]))
def test_random_shapes_exact(Q, R, D, P, G, kind, seed, dtype, split):
    J, w, B, offsets = case((Q, R, D, P, G, kind), dtype, seed=seed, integer=True)
    got = path_kernel_reduce_triton(*on_device(J, w, B, offsets), split=split)
    assert torch.equal(got.cpu().double(), reference64(J, w, B, offsets))


@needs_triton_device
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_matches_reference_within_rounding(shape, dtype):
    J, w, B, offsets = case(shape, dtype, seed=3)
    got = path_kernel_reduce_triton(*on_device(J, w, B, offsets), alpha=-0.7, split=48)
    want = reference64(J, w, B, offsets, alpha=-0.7)
    assert_within(got.cpu(), want, rounding_bound(J, w, B, offsets, alpha=-0.7), f"{shape} {dtype}")


@needs_triton_device
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_accumulates_into_given_out(dtype):
    J, w, B, offsets = case((3, 7, 300, 5, 9, "random"), dtype, seed=5)
    out = torch.randn(9, 7, 5, dtype=dtype)
    out_before = out.clone()
    (out_dev,) = on_device(out)
    result = path_kernel_reduce_triton(*on_device(J, w, B, offsets), out=out_dev, alpha=2.5, split=64)
    assert result.data_ptr() == out_dev.data_ptr()
    want = reference64(J, w, B, offsets, out=out_before, alpha=2.5)
    assert_within(out_dev.cpu(), want, rounding_bound(J, w, B, offsets, alpha=2.5, out=out_before), "accumulate")


@needs_triton_device
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_and_inf_propagate(dtype):
    J, w, B, offsets = case((2, 4, 50, 3, 5, "even"), dtype, seed=8)
    J[1, 2, 13] = float("nan")
    B[0, 41] = float("inf")
    got = path_kernel_reduce_triton(*on_device(J, w, B, offsets), split=16).cpu()
    assert torch.isnan(got[1, 2]).all()
    assert not torch.isfinite(got[4, :, 0]).any()
    assert_within(got, reference64(J, w, B, offsets), rounding_bound(J, w, B, offsets), "nan/inf")


@needs_triton_device
def test_zero_sized_dimensions():
    B = torch.full((3, 5), float("nan"))
    out = path_kernel_reduce_triton(*on_device(torch.zeros(0, 4, 5), torch.ones(0), B, torch.tensor([0, 2, 5])))
    assert torch.equal(out.cpu(), torch.zeros(2, 4, 3))  # Q = 0: empty sum
    out = path_kernel_reduce_triton(*on_device(torch.zeros(2, 0, 5), torch.ones(2), B, torch.tensor([0, 5])))
    assert out.shape == (1, 0, 3)


@needs_triton_device
def test_bad_inputs_raise_the_shared_check_errors():
    good, cases = bad_inputs(torch.float32)
    for change, message in cases:
        kw = {**good, **change}
        with pytest.raises(RuntimeError) as info:
            path_kernel_reduce_triton(kw["J"], kw["w"], kw["B"], kw["offsets"], out=kw.get("out"))
        assert message in str(info.value), f"{change}: expected {message!r} in {str(info.value)!r}"
    with pytest.raises(ValueError, match="split must be >= 1"):
        path_kernel_reduce_triton(good["J"], good["w"], good["B"], good["offsets"], split=0)


@settings(max_examples=300, deadline=None)
@given(lengths=st.lists(st.integers(0, 40), min_size=1, max_size=60), split=st.integers(1, 50))
def test_work_items_cover_every_coordinate_once(lengths, split):
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    work = triton_module.build_work_items(offsets, split)
    coverage = np.zeros(offsets[-1], dtype=np.int64)
    for g_begin, g_end, lo, hi in work:
        assert 0 <= g_begin < g_end <= len(lengths)
        if g_end - g_begin > 1 or lengths[g_begin] <= split:
            # a pack of whole short groups, starting in one split-aligned window
            assert (lo, hi) == (offsets[g_begin], offsets[g_end])
            assert all(lengths[g] <= split for g in range(g_begin, g_end))
            assert len({offsets[g] // split for g in range(g_begin, g_end)}) == 1
        else:
            assert 0 < hi - lo <= split  # one chunk of a long group
        for g in range(g_begin, g_end):
            a, b = max(offsets[g], lo), min(offsets[g + 1], hi)
            coverage[a:b] += 1
    assert (coverage == 1).all()
    groups = {g for g_begin, g_end, _, _ in work for g in range(g_begin, g_end)}
    assert groups == set(range(len(lengths)))


_COMPILE_SCRIPT = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from explaind_fast.kernels import path_kernel_reduce_kernel

results = {}
for in_type, acc_type, block_p, allow_dot in json.loads(sys.argv[1]):
    signature = {"J_ptr": f"*{in_type}", "w_ptr": f"*{acc_type}", "B_ptr": f"*{in_type}",
                 "offsets_ptr": "*i64", "out_ptr": f"*{acc_type}", "work_ptr": "*i64",
                 "alpha_ptr": f"*{acc_type}", "Q": "i32", "R": "i32", "P": "i32", "stride_jq": "i64",
                 "stride_jr": "i32", "stride_bp": "i32", "R_BUCKET": "i32", "P_BUCKET": "i32",
                 "LEN_BUCKET": "i32", "BLOCK_R": "constexpr", "BLOCK_P": "constexpr",
                 "BLOCK_K": "constexpr", "ALLOW_DOT": "constexpr"}
    constexprs = {"BLOCK_R": 32, "BLOCK_P": block_p, "BLOCK_K": 16, "ALLOW_DOT": allow_dot}
    compiled = triton.compile(ASTSource(path_kernel_reduce_kernel, signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 2})
    results[in_type] = {"uses_dot": "tt.dot" in compiled.asm["ttgir"], "cubin_bytes": len(compiled.asm["cubin"])}
print(json.dumps(results))
"""


def test_kernel_compiles_for_sm90_without_a_gpu(tmp_path):
    """The interpreter runs the kernel as Python; this checks that the real compiler accepts it
    (tl.dot path, broadcast path, float64) down to a cubin for an H100, with no GPU needed. In a
    subprocess without TRITON_INTERPRET, which would otherwise change how triton.language behaves."""
    variants = [["bf16", "fp32", 16, True], ["fp32", "fp32", 2, True], ["fp64", "fp64", 16, False]]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, json.dumps(variants)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results["bf16"]["uses_dot"] and not results["fp32"]["uses_dot"] and not results["fp64"]["uses_dot"]
    assert all(r["cubin_bytes"] > 0 for r in results.values())


@pytest.mark.parametrize("P,allow_dot", [(1, True), (3, True), (8, True), (16, True), (17, True),
                                         (100, True), (1, False), (16, False), (64, False)])
def test_gpu_autotune_configs_fit_the_shape(P, allow_dot):
    """The GPU configs kept for a P: P blocks no wider than needed, and small 3-D tiles wherever
    the broadcast-multiply-sum path (no tl.dot) is taken."""
    import triton

    configs = [triton.Config({"BLOCK_R": r, "BLOCK_P": p, "BLOCK_K": k}, num_warps=nw, num_stages=ns)
               for r, p, k, nw, ns in triton_module._GPU_CONFIGS]
    kept = triton_module._prune_configs(configs, {"P": P}, ALLOW_DOT=allow_dot)
    assert kept
    for c in kept:
        br, bp, bk = c.kwargs["BLOCK_R"], c.kwargs["BLOCK_P"], c.kwargs["BLOCK_K"]
        assert bp <= max(2, triton_module._next_pow2(P)) or bp == 16
        if not (allow_dot and min(br, bp, bk) >= 16):
            assert br * bp * bk <= 8192
