"""Exactness of explaind_fast.attribute against the full-tensor naive reference (float64, tiny).

Tolerance 1e-10 absolute: the contributions are O(1e-2..1) and both sides sum at most
N·D·n ≈ 2e4 float64 products with the same quadrature nodes, so rounding is ≤ 1e-13; 1e-10 leaves
room without hiding any algebraic error (a wrong coefficient, sign or credit is O(1e-3) or larger).
"""
import pytest
import torch
import torch.nn.functional as F

from explaind_fast.attribution import attribute
from explaind_fast.attribution.granularity import parse_data, parse_output, parse_params, parse_steps
from explaind_fast.testing.naive import naive_tensor
from explaind_fast.testing.runs import tiny_mlp_run, tiny_transformer_run
from explaind_fast.quadrature import NodeSet, gauss_legendre

TOL = 1e-10
AXES = ("step", "param", "data", "test", "output")
RULE = "gauss-legendre:3"


def ce(o, y):
    return F.cross_entropy(o, y, reduction="none")


@pytest.fixture(scope="module")
def mlp():
    model, traj, (Xtr, Ytr), Xte, Yte, _ = tiny_mlp_run(kind="adamw")
    cache = {}

    def naive(output):
        key = repr(output)
        if key not in cache:
            spec = parse_output(output, ce)
            cache[key] = naive_tensor(model, traj, Xte, spec.h, Yte, Xtr, Ytr, ce,
                                      lambda s: NodeSet(*gauss_legendre(3)))
        return cache[key]
    return dict(model=model, traj=traj, train=(Xtr, Ytr), Xte=Xte, Yte=Yte, naive=naive)


def expected(run, output, params, data, steps, credit, dims):
    nt = run["naive"](output)
    traj = run["traj"]
    g = parse_params(params, traj.layout)
    w = parse_steps(steps, traj.num_steps)
    p = parse_data(data, run["train"][0].shape[0], run["train"][1])
    k, r = nt.reduce(w.bounds, g.ids, g.G, p.ids, p.P, credit=credit)
    for i, d in reversed(list(enumerate(AXES))):
        if d not in dims:
            k = k.sum(i)
    for i, d in reversed(list(enumerate(("step", "param", "test", "output")))):
        if d not in dims:
            r = r.sum(i)
    return k, r


def run_attr(run, **kw):
    return attribute(run["model"], run["traj"], run["Xte"], test_targets=run["Yte"],
                     train_data=run["train"], quadrature=RULE, progress=False, **kw)


def check(run, a, output, params, data, steps):
    k, r = expected(run, output, params, data, steps, a.credit, a.dims)
    assert a.kernel.shape == k.shape, (a.dims, a.kernel.shape, k.shape)
    err_k = (a.kernel - k).abs().max().item()
    err_r = (a.reg - r).abs().max().item()
    assert err_k < TOL and err_r < TOL, (err_k, err_r)


@pytest.mark.parametrize("mode", ["forward", "reverse"])
@pytest.mark.parametrize("data", ["all", "label", "sample"])
@pytest.mark.parametrize("params", ["all", "tensor", "neuron", "parameter"])
@pytest.mark.parametrize("steps", ["each", 2, "all"])
def test_granularity_matches_naive(mlp, mode, data, params, steps):
    a = run_attr(mlp, output="logits", params=params, data=data, steps=steps, mode=mode)
    assert a.dims == tuple(d for d, keep in zip(AXES, (steps != "all", params != "all",
                                                          data != "all", True, True)) if keep)
    check(mlp, a, "logits", params, data, steps)


@pytest.mark.parametrize("mode", ["forward", "reverse"])
@pytest.mark.parametrize("data", ["all", "label", "sample"])
@pytest.mark.parametrize("output", [1, -1, "loss", ("margin", 0, 2), [2, 0]])
def test_outputs_match_naive(mlp, mode, data, output):
    a = run_attr(mlp, output=output, params="tensor", data=data, steps=2, mode=mode)
    assert ("output" in a.dims) == isinstance(output, list)
    check(mlp, a, output, "tensor", data, 2)


def test_projection_output(mlp):
    Pm = torch.tensor([[1.0, -1.0, 0.5], [0.0, 2.0, 1.0]], dtype=torch.float64)
    a = run_attr(mlp, output=Pm, params="module", data="label", steps="each", mode="reverse")
    b = run_attr(mlp, output="logits", params="module", data="label", steps="each", mode="reverse")
    assert (a.kernel - b.kernel @ Pm.T).abs().max() < TOL


@pytest.mark.parametrize("data", ["label", "sample"])
@pytest.mark.parametrize("steps", ["each", 2, [1, 4]])
def test_gradient_credit_per_window(mlp, data, steps):
    """The backward recursion credits to the step whose batch produced the gradient."""
    a = run_attr(mlp, params="tensor", data=data, steps=steps, credit="gradient")
    assert a.credit == "gradient" and a.plan["mode"] == "reverse"
    check(mlp, a, "logits", "tensor", data, steps)


def test_credits_agree_when_steps_summed(mlp):
    a = run_attr(mlp, params="tensor", data="sample", steps="all", credit="gradient")
    b = run_attr(mlp, params="tensor", data="sample", steps="all", credit="update")
    assert (a.kernel - b.kernel).abs().max() < TOL and (a.reg - b.reg).abs().max() < TOL
    c = run_attr(mlp, params="tensor", data="sample", steps="each", credit="gradient")
    d = run_attr(mlp, params="tensor", data="sample", steps="each", credit="update")
    assert (c.kernel - d.kernel).abs().max() > 1e-6   # the credits really differ per step


def test_auto_credit_and_mode(mlp):
    a = run_attr(mlp, data="sample", steps="all")
    assert a.credit == "gradient"
    assert run_attr(mlp, data="sample", steps="each").credit == "update"
    few = run_attr(mlp, data="all", params="all", output=0)
    assert few.plan["mode"] in ("forward", "reverse")
    many = run_attr(mlp, data="all", params="parameter", output=0)
    assert many.plan["mode"] == "reverse"      # D tangents per node vs one row per sample


def test_custom_groups_and_partition(mlp):
    traj = mlp["traj"]
    D, n = traj.layout.D, mlp["train"][0].shape[0]
    gmap = torch.arange(D) % 5
    part = torch.arange(n) % 3
    a = run_attr(mlp, params=gmap, data=part, steps=2, mode="reverse")
    check(mlp, a, "logits", gmap, part, 2)
    b = run_attr(mlp, params={"hidden": ["fc1.*", "fc2.*"]}, data="label", mode="forward")
    assert b.axes["param"] == ["hidden", "other"]
    ids = torch.tensor([0] * 4 + [1] * 2, dtype=torch.int64).repeat_interleave(
        torch.tensor(traj.layout.numels))
    check(mlp, b, "logits", ids, "label", "all")


@pytest.mark.parametrize("mode,output", [("forward", "logits"), ("reverse", "logits"),
                                         ("forward", "loss")])
def test_per_sample_nodes(mlp, mode, output):
    """[M, Q] NodeSets: each test sample split at its own breakpoint, GL-3 per piece."""
    M = mlp["Xte"].shape[0]

    def rule(s, theta_s, delta_s):
        g = torch.Generator().manual_seed(100 + s)
        cut = 0.2 + 0.6 * torch.rand(M, generator=g, dtype=torch.float64)
        x, w = gauss_legendre(3)
        t = torch.cat([cut[:, None] * x, cut[:, None] + (1 - cut[:, None]) * x], 1)
        ww = torch.cat([cut[:, None] * w, (1 - cut[:, None]) * w], 1)
        return NodeSet(t, ww)

    model, traj, (Xtr, Ytr), Xte, Yte = mlp["model"], mlp["traj"], mlp["train"], mlp["Xte"], \
        mlp["Yte"]
    spec = parse_output(output, ce)
    nt = naive_tensor(model, traj, Xte, spec.h, Yte, Xtr, Ytr, ce, lambda s: rule(s, None, None))
    a = attribute(model, traj, Xte, test_targets=Yte, train_data=(Xtr, Ytr), params="tensor",
                  data="label", steps="each", quadrature=rule, mode=mode, output=output,
                  progress=False)
    g = parse_params("tensor", traj.layout)
    p = parse_data("label", Xtr.shape[0], Ytr)
    k, r = nt.reduce(parse_steps("each", traj.num_steps).bounds, g.ids, g.G, p.ids, p.P)
    if output == "loss":
        k, r = k[..., 0], r[..., 0]
    assert (a.kernel - k).abs().max() < TOL and (a.reg - r).abs().max() < TOL
    assert a.evaluations["quadrature_nodes"].tolist() == [6] * traj.num_steps


def test_transformer_matches_naive():
    model, traj, (Xtr, Ytr), Xte, Yte, _ = tiny_transformer_run(steps=3)
    nt = naive_tensor(model, traj, Xte, lambda o, t: o, None, Xtr, Ytr, ce,
                      lambda s: NodeSet(*gauss_legendre(3)))
    g = parse_params("neuron", traj.layout)
    p = parse_data("sample", Xtr.shape[0], Ytr)
    k, r = nt.reduce(parse_steps("each", traj.num_steps).bounds, g.ids, g.G, p.ids, p.P)
    for mode in ("forward", "reverse"):
        a = attribute(model, traj, Xte, train_data=(Xtr, Ytr), params="neuron", data="sample",
                      steps="each", quadrature=RULE, mode=mode, progress=False)
        assert (a.kernel - k).abs().max() < TOL and (a.reg - r).abs().max() < TOL


def test_small_memory_budget_chunks_identically(mlp):
    kw = dict(params="neuron", data="label", steps=2, output="logits")
    for mode in ("forward", "reverse"):
        big = run_attr(mlp, mode=mode, **kw)
        small = run_attr(mlp, mode=mode, memory_budget="minimum", **kw)
        assert small.plan["tangent_chunk"] < big.plan["tangent_chunk"] or mode == "reverse"
        assert small.plan["sample_chunk"] == 1 and big.plan["sample_chunk"] > 1
        assert small.plan["output_chunk"] < 3 == big.plan["output_chunk"]   # rows split too
        assert (big.kernel - small.kernel).abs().max() < 1e-13
    g = run_attr(mlp, data="sample", steps="all", credit="gradient", memory_budget="minimum")
    assert g.plan["sample_chunk"] == 1 and g.plan["output_chunk"] < 3
    check(mlp, g, "logits", "all", "sample", "all")


def test_update_credit_refused_over_budget(mlp):
    with pytest.raises(ValueError, match="credit='gradient'"):
        run_attr(mlp, data="sample", steps="each", memory_budget=1000)


def test_contraction_fallback_equals_op(mlp, monkeypatch):
    import explaind_fast.attribution.contraction as C
    kw = dict(params="parameter", data="label", steps="each", mode="reverse")
    a = run_attr(mlp, **kw)
    monkeypatch.setattr(C, "op_supports", lambda dtype: False)
    for G in ("parameter", "tensor"):          # index_add path (many groups) and matmul loop
        b = run_attr(mlp, **{**kw, "params": G})
        check(mlp, b, "logits", G, "label", "each")
    b = run_attr(mlp, **kw)
    assert (a.kernel - b.kernel).abs().max() < 1e-13


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_gradient_credit_other_optimizers(kind):
    """Backward recursion with momentum/L2 reg recursions (reg_decay != 0) vs the naive
    gradient-step credit, and update credit per step."""
    model, traj, (Xtr, Ytr), Xte, Yte, _ = tiny_mlp_run(kind=kind, steps=3)
    nt = naive_tensor(model, traj, Xte, lambda o, t: o, None, Xtr, Ytr, ce,
                      lambda s: NodeSet(*gauss_legendre(3)))
    g = parse_params("tensor", traj.layout)
    p = parse_data("label", Xtr.shape[0], Ytr)
    bounds = parse_steps("each", traj.num_steps).bounds
    for credit in ("gradient", "update"):
        a = attribute(model, traj, Xte, train_data=(Xtr, Ytr), params="tensor", data="label",
                      steps="each", quadrature=RULE, credit=credit, progress=False)
        k, r = nt.reduce(bounds, g.ids, g.G, p.ids, p.P, credit=credit)
        assert (a.kernel - k).abs().max() < TOL and (a.reg - r).abs().max() < TOL, credit
