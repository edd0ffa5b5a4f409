"""Autograd of path_kernel_reduce: the functional op's backward formula (gradcheck and gradgradcheck
in float64, float32/bfloat16 against autograd through the naive reference, opcheck, torch.compile),
and the accumulating op (out=...) refusing inputs that require grad."""
import pytest
import torch

from explaind_fast import ops
from explaind_fast.ops.reference import path_kernel_reduce_naive
from explaind_fast.testing.op_cases import case

GRAD_SHAPES = [
    (3, 2, 8, 3, [0, 3, 3, 5, 8]),     # empty group in the middle
    (1, 1, 7, 1, [0, 7]),              # Q = R = P = 1, one group
    (2, 2, 5, 2, [0, 1, 2, 3, 4, 5]),  # one coordinate per group
    (2, 2, 5, 3, [0, 0, 5, 5]),        # empty first and last groups
    (0, 2, 4, 2, [0, 4]),              # Q = 0: out does not depend on B
    (2, 2, 0, 2, [0, 0, 0]),           # D = 0
]


def _inputs(Q, R, D, P, offsets, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    J = torch.randn(Q, R, D, generator=gen).to(dtype).requires_grad_()
    w = torch.randn(Q, generator=gen).to(acc).requires_grad_()
    B = torch.randn(P, D, generator=gen).to(dtype).requires_grad_()
    return J, w, B, torch.tensor(offsets)


@pytest.mark.parametrize("shape", GRAD_SHAPES, ids=lambda s: f"Q{s[0]}-R{s[1]}-D{s[2]}-P{s[3]}-G{len(s[4]) - 1}")
def test_gradcheck_and_gradgradcheck_float64(shape):
    J, w, B, offsets = _inputs(*shape)

    def f(J, w, B):
        return ops.path_kernel_reduce(J, w, B, offsets, alpha=-1.7)

    assert torch.autograd.gradcheck(f, (J, w, B))
    assert torch.autograd.gradgradcheck(f, (J, w, B))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_gradients_match_autograd_through_the_reference(dtype):
    J, w, B, offsets = _inputs(3, 5, 40, 4, [0, 7, 7, 30, 40], dtype=dtype, seed=1)
    grad_out = torch.randn(4, 5, 4, generator=torch.Generator().manual_seed(2), dtype=w.dtype)
    got = torch.autograd.grad(ops.path_kernel_reduce(J, w, B, offsets, alpha=0.5), (J, w, B), grad_out)
    # The oracle: plain autograd through the naive reference, in float64.
    J64, w64, B64 = (t.detach().double().requires_grad_() for t in (J, w, B))
    want = torch.autograd.grad(path_kernel_reduce_naive(J64, w64, B64, offsets, alpha=0.5), (J64, w64, B64),
                               grad_out.double())
    for name, g, t, ref in zip("JwB", got, (J, w, B), want):
        assert g.dtype == t.dtype and g.shape == t.shape, name
        tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
        torch.testing.assert_close(g.double(), ref, rtol=tol, atol=tol * ref.abs().max().item(), msg=name)


def test_only_requested_gradients_and_chunked_backward(monkeypatch):
    # Chunks of 3 coordinates (R·P = 6 > 4) exercise the chunk loop of the backward.
    monkeypatch.setattr(ops, "_BACKWARD_CHUNK_ELEMENTS", 4)
    J, w, B, offsets = _inputs(2, 2, 11, 3, [0, 4, 4, 11], seed=3)
    assert torch.autograd.gradcheck(lambda J, B: ops.path_kernel_reduce(J, w.detach(), B, offsets), (J, B))
    w2 = w.detach().requires_grad_()
    (gw,) = torch.autograd.grad(ops.path_kernel_reduce(J.detach(), w2, B.detach(), offsets).sum(), (w2,))
    (gw_ref,) = torch.autograd.grad(path_kernel_reduce_naive(J.detach(), w2, B.detach(), offsets).sum(), (w2,))
    torch.testing.assert_close(gw, gw_ref)


def test_opcheck_with_inputs_that_require_grad():
    J, w, B, offsets = _inputs(2, 3, 20, 2, [0, 5, 20], dtype=torch.float32, seed=4)
    torch.library.opcheck(torch.ops.explaind_fast.path_kernel_reduce.default, (J, w, B, offsets, 0.5))


def test_backward_under_torch_compile():
    J, w, B, offsets = _inputs(2, 3, 20, 2, [0, 5, 20], seed=5)

    def loss(J, w, B):
        return (ops.path_kernel_reduce(J, w, B, offsets, alpha=2.0) ** 2).sum()

    want = torch.autograd.grad(loss(J, w, B), (J, w, B))
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(J, w, B), (J, w, B))
    for g, ref in zip(got, want):
        torch.testing.assert_close(g, ref)


@pytest.mark.parametrize("name", ["J", "w", "B", "out"])
def test_accumulating_form_refuses_inputs_that_require_grad(name):
    J, w, B, offsets = case((2, 3, 10, 4, 2, "even"), torch.float32, seed=6)
    args = dict(J=J, w=w, B=B, out=torch.zeros(2, 3, 4))
    args[name] = args[name].clone().requires_grad_() if name != "out" else torch.zeros(2, 3, 4).requires_grad_().clone()
    message = rf"not differentiable: it adds into out in place, but {name} requires grad"
    with pytest.raises(RuntimeError, match=message):
        ops.path_kernel_reduce(args["J"], args["w"], args["B"], offsets, out=args["out"])
    with pytest.raises(RuntimeError, match="not differentiable"):
        torch.ops.explaind_fast.path_kernel_reduce_accumulate(args["J"], args["w"], args["B"], offsets, args["out"],
                                                              1.0)
    with torch.no_grad():  # no graph is built: allowed
        ops.path_kernel_reduce(args["J"], args["w"], args["B"], offsets, out=args["out"])


def test_accumulating_form_bumps_the_version_of_out():
    """As in-place ops do, so autograd notices when a tensor saved for backward was overwritten."""
    J, w, B, offsets = case((2, 3, 10, 4, 2, "even"), torch.float32, seed=7)
    x = torch.randn(2, 3, 4, requires_grad=True)
    out = torch.zeros(2, 3, 4)
    y = x * out  # saves out for backward
    version = out._version
    ops.path_kernel_reduce(J, w, B, offsets, out=out)
    assert out._version == version + 1
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    with torch.inference_mode():  # inference tensors have no version counter: still allowed
        out_inf = torch.zeros(2, 3, 4)
        ops.path_kernel_reduce(J, w, B, offsets, out=out_inf)
    ops.path_kernel_reduce(J, w, B, offsets, out=out_inf)  # an inference tensor outside inference mode
