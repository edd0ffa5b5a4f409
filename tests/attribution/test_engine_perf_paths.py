"""The batched forward-mode contraction equals the plain node-by-node, sample-by-sample sum.

forward_contract batches (node, tangent) pairs in one vmap (shared nodes, chunked by max_evals)
and skips zero-weight slots (per-sample nodes). The oracle here is the definition,
Σ_q w_q J(θ_s + t_q Δ_s)·v, evaluated one node, one sample and one tangent at a time with
torch.func.jvp. float64, tiny models: agreement to 1e-12 relative (only the summation order
differs, ~Q·eps).
"""
import pytest
import torch
from torch.func import jvp

from explaind_fast import attribute
from explaind_fast.attribution.contraction import forward_contract
from explaind_fast.model import FunctionalModel, TestFunction as _TestFn
from explaind_fast.quadrature import NodeSet, gauss_legendre
from explaind_fast.testing.models import DT
from explaind_fast.testing.runs import tiny_mlp_run, tiny_transformer_run

TOL = 1e-12


def _oracle(tf, th, delta, t, w, V):
    """[T, m, K]: per (tangent, sample): Σ_q w[m, q] J(θ_s + t[m, q]Δ)·v, one JVP at a time."""
    M = tf.X.shape[0]
    rows = []
    for v in V:
        per_sample = []
        for i in range(M):
            acc = 0
            for q in range(t.shape[1]):
                if w[i, q] == 0:
                    continue
                f = lambda x: tf.values(x, slice(i, i + 1))[0]        # noqa: E731
                acc = acc + float(w[i, q]) * jvp(f, (th + float(t[i, q]) * delta,), (v,))[1]
            per_sample.append(acc if torch.is_tensor(acc) else
                              torch.zeros_like(tf.values(th, slice(i, i + 1))[0]))
        rows.append(torch.stack(per_sample))
    return torch.stack(rows)


def _setup(run):
    model, traj, _train, Xte, Yte, _ = run
    fm = FunctionalModel(model, traj.layout, DT, torch.device("cpu"))
    tf = _TestFn(fm, Xte, Yte, lambda out, tgt: out)
    th, th1 = traj.theta(1, dtype=DT), traj.theta(2, dtype=DT)
    g = torch.Generator().manual_seed(3)
    V = torch.randn(5, traj.layout.D, generator=g, dtype=DT)
    return tf, th, th1 - th, V


def _close(a, b):
    scale = b.abs().max().clamp_min(1e-300)
    assert (a - b).abs().max() / scale < TOL, float((a - b).abs().max() / scale)


@pytest.fixture(scope="module", params=["mlp-relu", "transformer"])
def case(request):
    if request.param == "mlp-relu":
        return _setup(tiny_mlp_run(act="relu", steps=3))
    return _setup(tiny_transformer_run(steps=3))


@pytest.mark.parametrize("max_evals", [None, 1, 5, 7, 11])
def test_shared_nodes_batched_equals_node_loop(case, max_evals):
    tf, th, delta, V = case
    t, w = gauss_legendre(3)
    M = tf.X.shape[0]
    got = forward_contract(tf, th, delta, NodeSet(t, w), V, max_evals=max_evals)
    want = _oracle(tf, th, delta, t[None].expand(M, -1), w[None].expand(M, -1), V)
    assert got.shape == want.shape
    _close(got, want)


def test_shared_nodes_zero_weights_are_skipped_and_all_zero_gives_zeros(case):
    tf, th, delta, V = case
    t, w = gauss_legendre(2)
    nodes = NodeSet(torch.cat([t, torch.tensor([0.3])]), torch.cat([w, torch.tensor([0.0])]))
    _close(forward_contract(tf, th, delta, nodes, V),
           forward_contract(tf, th, delta, NodeSet(t, w), V))
    zero = forward_contract(tf, th, delta, NodeSet(t, torch.zeros_like(w)), V)
    assert zero.shape == (V.shape[0], tf.X.shape[0], tf.values(th).shape[1])
    assert zero.abs().max() == 0


def test_per_sample_nodes_with_padding_equal_oracle(case):
    tf, th, delta, V = case
    M = tf.X.shape[0]
    g = torch.Generator().manual_seed(5)
    Q = 4
    t = torch.rand(M, Q, generator=g, dtype=torch.float64)
    w = torch.rand(M, Q, generator=g, dtype=torch.float64)
    w[0, 2:] = 0            # padding: sample 0 uses two slots, sample 1 one, the last slot is
    w[1, 1:] = 0            # used by the later samples only
    w[2:, 0] = 0
    got = forward_contract(tf, th, delta, NodeSet(t, w), V)
    _close(got, _oracle(tf, th, delta, t, w, V))


def test_engine_forward_equals_reverse_with_tiny_tangent_chunks():
    """Forward mode with a memory budget that forces one tangent (and one node) per call equals
    reverse mode on a ReLU MLP with per-sample (kink-like) nodes."""
    model, traj, _train, Xte, Yte, _ = tiny_mlp_run(act="relu", steps=3)
    M = Xte.shape[0]

    def rule(s, th, delta):
        g = torch.Generator().manual_seed(s)
        t = torch.rand(M, 3, generator=g, dtype=torch.float64)
        w = torch.full((M, 3), 1 / 3, dtype=torch.float64)
        w[0, 2] = 0
        w[0, :2] = 0.5
        return NodeSet(t, w)
    kw = dict(params="tensor", steps="each", quadrature=rule, progress=False)
    fwd = attribute(model, traj, Xte, mode="forward", memory_budget="minimum", **kw)
    assert fwd.plan["tangent_chunk"] == 1
    rev = attribute(model, traj, Xte, mode="reverse", **kw)
    _close(fwd.kernel, rev.kernel)
    _close(fwd.reg, rev.reg)
    g = fwd.step_residual_relative
    assert g.shape == (traj.num_steps,) and g.dtype == torch.float64
