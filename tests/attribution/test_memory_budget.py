"""memory_budget: the planner's floor and chunks (docs/design.md §10), the refusal of a budget
below the minimum, the "minimum" budget, and the memory-saving representations it relies on
(broadcast per-group optimizer coefficients, groups without a stored coordinate map). Every
chunking must give the same numbers as the default plan; the measured peaks are in
bench/bench_memory_budget.py."""
import pytest
import torch

from explaind_fast.attribution import attribute
from explaind_fast.attribution.granularity import parse_params
from explaind_fast.attribution.planner import BudgetError, floor_vectors, make_plan
from explaind_fast.optim.rules import make_rule
from explaind_fast.testing.runs import tiny_mlp_run

RULE = "gauss-legendre:4"
#: float64, same operations in a different chunking: only the summation order differs
TOL = 1e-12


@pytest.fixture(scope="module")
def mlp():
    model, traj, train, Xte, Yte, _ = tiny_mlp_run(act="tanh", steps=3)
    return dict(model=model, traj=traj, train=train, Xte=Xte, Yte=Yte)


def _attr(run, **kw):
    return attribute(run["model"], run["traj"], run["Xte"], test_targets=run["Yte"],
                     train_data=run["train"], quadrature=RULE, progress=False, **kw)


def _close(a, b):
    scale = max(1.0, float(b.abs().max()))
    assert float((a - b).abs().max()) <= TOL * scale


@pytest.mark.parametrize("mode,data,credit", [("forward", "all", "update"),
                                              ("reverse", "all", "update"),
                                              ("forward", "label", "update"),
                                              ("reverse", "sample", "gradient")])
def test_below_minimum_refused_minimum_runs_and_agrees(mlp, mode, data, credit):
    kw = dict(mode=mode, data=data, credit=credit, params="tensor", steps="each")
    if credit == "gradient":
        kw["steps"] = "all"
    ref = _attr(mlp, **kw)
    with pytest.raises(BudgetError, match=r"below the minimum .* \d+ B") as err:
        _attr(mlp, memory_budget=1000, **kw)
    assert isinstance(err.value, ValueError) and "memory_budget='minimum'" in str(err.value)
    minimum = int(str(err.value).split("minimum of this attribution in ")[1].split(", ")[1]
                  .split(" B")[0])
    assert minimum == ref.plan["estimates"]["minimum_budget"]
    for budget in ("minimum", minimum):
        small = _attr(mlp, memory_budget=budget, **kw)
        assert small.plan["memory_budget"] == minimum
        if mode == "forward":
            assert small.plan["tangent_chunk"] == 1
        else:
            assert small.plan["sample_chunk"] == 1 and small.plan["output_chunk"] == 1
            assert small.plan["pair_chunk"] == 1
        _close(small.kernel, ref.kernel)
        _close(small.reg, ref.reg)
    with pytest.raises(BudgetError):
        _attr(mlp, memory_budget=minimum - 1, **kw)


def test_plan_estimates_add_up():
    """The estimate is the floor plus the chunks the plan chose, and stays within the budget."""
    D, M, K, A, b = 1_000_000, 8, 10, 500, 4
    numels = (600_000, 400_000)
    for mode in ("forward", "reverse"):
        for budget in (2 ** 26, 2 ** 28, 2 ** 31):
            p = make_plan(D=D, M=M, K=K, G=2, P=1, Q=3, A=A, itemsize=b, mode=mode,
                          credit="update", budget=budget, data_all=True, fallback_product=False,
                          numels=numels)
            est = p.estimates
            assert est["floor_bytes"] == int(b * D * floor_vectors(
                P=1, itemsize=b, credit="update", data_all=True, mode=mode))
            assert est["floor_bytes"] < est[mode]["peak_bytes"] <= budget
            if mode == "forward":      # the tangents pushed per call: ≤ tangent_chunk
                pushed, rem = divmod(est["forward"]["peak_bytes"] - est["floor_bytes"],
                                     b * (D + 2 * M * A))
                assert rem == 0 and 1 <= pushed <= p.tangent_chunk
            else:
                rows = p.sample_chunk * p.output_chunk
                assert p.output_chunk == K or p.sample_chunk == 1
                pairs = min(p.pair_chunk, p.sample_chunk * 3)
                per_row = b * (D + A + 2 * 2)
                assert est["reverse"]["peak_bytes"] == est["floor_bytes"] + rows * per_row + \
                    pairs * p.output_chunk * b * (D + A)
    with pytest.raises(BudgetError, match="Update-step credit keeps one D-vector per data"):
        make_plan(D=D, M=M, K=K, G=2, P=50, Q=3, A=A, itemsize=b, mode="forward",
                  credit="update", budget=2 ** 27, data_all=False, fallback_product=False,
                  numels=numels)


@pytest.mark.parametrize("kind,per_group", [
    ("sgd", ("decay", "gain", "reg_decay")),
    ("adamw", ("decay", "gain", "reg_decay", "reg_gain")),
    ("adam", ("decay", "gain", "reg_decay"))])
def test_uniform_coefficients_are_broadcast_views(kind, per_group):
    """The tiny runs have two optimizer groups with the same betas/momentum but different lr and
    weight decay: coefficients equal across groups are stride-0 views (no D-vector), the others
    (and Adam's scale, which depends on v) real vectors equal to the layout's expansion."""
    _, traj, *_ = tiny_mlp_run(kind=kind, steps=1)
    lay = traj.layout
    hyper = traj.hyper[0]
    rec = traj.step(0)
    c = traj.rule.coefficients(rec)
    for name in per_group:
        v = getattr(c, name)
        assert v.shape == (lay.D,) and v.stride() == (0,), name
    if kind != "sgd":
        assert c.scale.stride() == (1,)
        b1 = hyper["betas"][0]
        assert torch.equal(c.gain, lay.expand([1 - b1] * lay.num_groups))
    else:
        assert c.scale.stride() == (1,) and torch.equal(c.scale, lay.expand(rec.lr))
        assert torch.equal(c.reg_gain, lay.expand(rec.weight_decay))
    # several optimizer groups with different values: a real [D] vector, the layout's expansion
    from explaind_fast.model.layout import ParamLayout
    two = ParamLayout(names=("a", "b", "c"), shapes=((2, 3), (4,), (5,)),
                      dtypes=("float64",) * 3, group_of_tensor=(0, 1, 0))
    sgd = make_rule("sgd", two, [dict(momentum=0.9), dict(momentum=0.5)])
    mixed = sgd._vec([0.1, 0.2], torch.float64, None)
    assert mixed.stride() == (1,) and torch.equal(mixed, two.expand([0.1, 0.2]))
    same = sgd._vec([0.3, 0.3], torch.float64, None)
    assert same.stride() == (0,) and torch.equal(same, two.expand([0.3, 0.3]))


def test_contiguous_groups_store_no_coordinate_map(mlp):
    lay = mlp["traj"].layout
    g = parse_params("tensor", lay)
    assert g.perm is None and g.stored_ids is None
    expect = torch.repeat_interleave(torch.arange(len(lay.names)), torch.tensor(lay.numels))
    assert torch.equal(g.ids, expect)
    n = parse_params("neuron", lay)                        # interleaved groups: stored
    assert n.perm is not None and n.stored_ids is not None


@pytest.mark.parametrize("rule", ["kinks:3", "auto"])
def test_kink_search_capture_follows_the_budget(rule):
    """The kink search's switching-value capture holds at most plan.search_elems numbers per
    call (what the budget leaves beside the floor): at the minimum budget a few rows per call
    instead of up to 4096, and the result equals the default plan's."""
    from explaind_fast.attribution.planner import SEARCH_MAX_ELEMS
    from explaind_fast.quadrature import parse_quadrature
    model, traj, train, Xte, Yte, _ = tiny_mlp_run(act="relu", steps=2)
    kw = dict(test_targets=Yte, train_data=train, params="tensor", steps="each", progress=False)
    ref = attribute(model, traj, Xte, quadrature=rule, **kw)
    assert ref.plan["search_elems"] == SEARCH_MAX_ELEMS          # 2 GiB default: the cap
    q = parse_quadrature(rule)
    small = attribute(model, traj, Xte, quadrature=q, memory_budget="minimum", **kw)
    elems = small.plan["search_elems"]
    assert 1 <= elems < SEARCH_MAX_ELEMS
    kink_rule = q.chosen if rule == "auto" else q
    assert kink_rule.search_elems == elems and kink_rule._path.chunk_elems == elems
    assert kink_rule._path._row_chunk() == max(1, min(4096, elems // (8 * kink_rule._path.K)))
    _close(small.kernel, ref.kernel)
    _close(small.reg, ref.reg)


def test_theta_from_the_store_owns_its_memory(mlp):
    """θ_s read from the store is not a view into the step file's mapping (which it would keep
    alive, and whose size forward AD would give every tangent); own_storage copies only views."""
    from explaind_fast.model.layout import own_storage
    traj = mlp["traj"]
    for s in (0, 1):
        for dtype in (None, torch.float64):
            t = traj.theta(s, dtype=dtype)
            assert t.storage_offset() == 0 and t.is_contiguous()
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
    buf = torch.arange(10.0)
    assert own_storage(buf) is buf
    for view in (buf[2:7], buf[::2], buf[:5]):
        got = own_storage(view)
        assert got is not view and torch.equal(got, view)
        assert got.untyped_storage().nbytes() == got.numel() * got.element_size()
