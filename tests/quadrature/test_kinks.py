"""Kink-aware quadrature (explaind_fast.quadrature.kinks): breakpoints and exactness on piecewise models.

Oracles and tolerances (float64 throughout):
* Closed-form breakpoints: a ReLU unit of the first layer has z(t) = z0 + t·(z1 − z0) exactly, so
  its crossing is t* = z0/(z0 − z1). Both sides carry a few ulps of rounding divided by the slope;
  slopes here are O(1), so 1e-13 absolute in t is a safe bound (the search targets 1e-14).
* Exactness: by the fundamental theorem of calculus ∫_0^1 J(θ(t))·Δ dt = f(θ_1) − f(θ_0), so the
  forward-only residual is an analytic oracle. On each smooth piece these models are polynomials in
  t of known degree, so composite Gauss–Legendre with enough nodes is exact: the residual is
  rounding only, < 1e-12 relative to the step's change. A rule blind to the kinks (GL-8 on [0, 1])
  leaves > 1e-5 here, which shows the tests can fail.
* For a direction v ≠ Δ the two-layer model's ∫ J·v dt is integrated in closed form per unit.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, jvp, vmap

from explaind_fast.model import ParamLayout
from explaind_fast.quadrature.kinks import (find_kinks, kink_nodes, nodes_from_breakpoints,
                                            quadrature_residual)
from explaind_fast.quadrature import NodeSet, gauss_legendre

DT = torch.float64
EXACT = 1e-12      # relative residual of an exact rule (rounding only)


def _rel(model, layout, th, dl, x, nodes):
    r, c = quadrature_residual(model, layout, th, dl, x, nodes)
    return float(r.abs().max() / c.abs().max())


def _setup(model, scale, seed=0):
    g = torch.Generator().manual_seed(seed)
    layout = ParamLayout.from_model(model)
    th = layout.flatten_model(model).clone()
    dl = scale * torch.randn(th.shape, generator=g, dtype=DT)
    return layout, th, dl


class TwoLayer(nn.Module):
    def __init__(self, d_in=3, hidden=40, d_out=2):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _closed_form_roots(layout, th, dl, x):
    p0, p1 = layout.unflatten(th), layout.unflatten(th + dl)
    z0 = x @ p0["fc1.weight"].T + p0["fc1.bias"]
    z1 = x @ p1["fc1.weight"].T + p1["fc1.bias"]
    t = z0 / (z0 - z1)
    return [torch.sort(row[(z0[m] * z1[m] < 0)])[0] for m, row in enumerate(t)]


def test_closed_form_breakpoints_and_exact_integral():
    torch.manual_seed(0)
    model = TwoLayer().to(DT)
    layout, th, dl = _setup(model, 0.5)
    x = torch.randn(6, 3, dtype=DT)
    k = find_kinks(model, layout, th, dl, x)
    roots = _closed_form_roots(layout, th, dl, x)
    assert sum(len(r) for r in roots) > 30              # the step really switches units
    for m in range(6):
        assert len(k.breakpoints[m]) == len(roots[m])
        assert torch.allclose(k.breakpoints[m], roots[m], rtol=0, atol=1e-13)
    assert k.unconverged == 0 and k.unseen == []
    # per piece f is quadratic in t (two layers, each linear in t): GL-1 per piece is exact
    assert _rel(model, layout, th, dl, x, kink_nodes(model, layout, th, dl, x, 1)) < EXACT
    assert _rel(model, layout, th, dl, x, NodeSet(*gauss_legendre(8))) > 1e-5


def _phi_dot(model, layout, th, dl, x, nodes, v):
    """Σ_q w_q J(θ_s + t_q Δ)·v per sample (forward mode, per-sample nodes)."""
    def f(t, xx, dv):
        return functional_call(model, layout.unflatten(th + t * dl + dv), (xx[None],))[0]

    M, Q = nodes.t.shape
    rows = torch.arange(M).repeat_interleave(Q)
    tt = nodes.t.reshape(-1)
    g = vmap(lambda t, xx: jvp(lambda e: f(t, xx, e * v), (torch.zeros((), dtype=DT),),
                               (torch.ones((), dtype=DT),))[1])(tt, x[rows])
    return (nodes.w.reshape(-1, 1) * g).reshape(M, Q, -1).sum(1)


def _phi_dot_closed_form(layout, th, dl, x, v):
    """∫_0^1 J(θ(t))·v dt for TwoLayer, unit by unit: z_u(t) = a + bt, w_u(t) = c + et."""
    p, d, q = layout.unflatten(th), layout.unflatten(dl), layout.unflatten(v)
    a = x @ p["fc1.weight"].T + p["fc1.bias"]                  # [M, H]
    b = x @ d["fc1.weight"].T + d["fc1.bias"]
    vz = x @ q["fc1.weight"].T + q["fc1.bias"]                  # J·v of z (t-independent)
    # interval of t in [0, 1] where z > 0
    root = -a / b
    lo = torch.where(b > 0, root.clamp(0, 1), torch.zeros_like(a))
    hi = torch.where(b > 0, torch.ones_like(a), root.clamp(0, 1))
    on_const = (b == 0) & (a > 0)
    lo = torch.where(b == 0, torch.zeros_like(a), lo)
    hi = torch.where(b == 0, on_const.to(DT), hi)
    L = hi - lo
    int_t = (hi ** 2 - lo ** 2) / 2
    int_relu = a * L + b * int_t                                   # ∫ relu(z) dt
    c, e = p["fc2.weight"], d["fc2.weight"]                       # [O, H]
    # J·v = Σ_u [v_w2 relu(z_u) + w2_u(t) 1[z_u>0] vz_u] + v_b2
    term1 = int_relu @ q["fc2.weight"].T
    term2 = (vz * L) @ c.T + (vz * int_t) @ e.T
    return term1 + term2 + q["fc2.bias"]


def test_feature_map_in_any_direction_matches_closed_form():
    torch.manual_seed(1)
    model = TwoLayer(hidden=25).to(DT)
    layout, th, dl = _setup(model, 0.4, seed=1)
    x = torch.randn(5, 3, dtype=DT)
    v = torch.randn(layout.D, dtype=DT, generator=torch.Generator().manual_seed(7))
    exact = _phi_dot_closed_form(layout, th, dl, x, v)
    got = _phi_dot(model, layout, th, dl, x, kink_nodes(model, layout, th, dl, x, 1), v)
    assert torch.allclose(got, exact, rtol=0, atol=1e-12 * float(exact.abs().max()))
    tq, wq = gauss_legendre(8)
    blind = _phi_dot(model, layout, th, dl, x, NodeSet(tq.expand(5, -1), wq.expand(5, -1)), v)
    assert float((blind - exact).abs().max()) > 1e-6 * float(exact.abs().max())


def test_many_units_switch_in_one_step():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 200), nn.ReLU(), nn.Linear(200, 50), nn.ReLU(),
                          nn.Linear(50, 3)).to(DT)
    layout, th, dl = _setup(model, 1.0, seed=2)
    x = torch.randn(4, 4, dtype=DT)
    k = find_kinks(model, layout, th, dl, x)
    assert int(k.pieces.min()) > 60                      # dozens of units switch per sample
    assert k.unconverged == 0
    # three layers, each linear in t: f cubic per piece, integrand quadratic → GL-2 exact
    assert _rel(model, layout, th, dl, x, nodes_from_breakpoints(k.breakpoints, 2)) < EXACT


def test_no_switch_costs_exactly_n_nodes():
    torch.manual_seed(3)
    model = TwoLayer().to(DT)
    with torch.no_grad():
        model.fc1.bias.fill_(50.0)                     # every unit on, far from zero
    layout, th, dl = _setup(model, 1e-2, seed=3)
    x = torch.randn(5, 3, dtype=DT)
    k = find_kinks(model, layout, th, dl, x)
    assert all(len(b) == 0 for b in k.breakpoints)
    assert k.row_evals == 0                             # no search beyond the shared grid
    ns = kink_nodes(model, layout, th, dl, x, 3)
    t, w = gauss_legendre(3)
    assert ns.t.shape == (5, 3)
    assert torch.equal(ns.t, t.expand(5, -1)) and torch.equal(ns.w, w.expand(5, -1))


class Exact(nn.Module):
    """relu(W x + b) summed, with dyadic weights so pre-activations at t = 0 and 1 are exact."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 4)
        self.out = nn.Linear(4, 1)

    def forward(self, x):
        return self.out(F.relu(self.fc(x)))


def test_breakpoints_at_the_ends_need_no_split():
    model = Exact().to(DT)
    layout = ParamLayout.from_model(model)
    x = torch.tensor([[1.0, 2.0]], dtype=DT)
    with torch.no_grad():
        model.fc.weight.copy_(torch.tensor([[1.0, 0.5], [0.5, -0.25], [1.0, 1.0], [-1.0, 0.5]]))
        model.fc.bias.copy_(torch.tensor([-2.0, 0.25, 0.5, 0.25]))  # unit 0: z(0) = 0 exactly
        model.out.weight.copy_(torch.tensor([[1.0, -2.0, 0.5, 1.5]]))
    th = layout.flatten_model(model).clone()
    p = layout.unflatten(torch.zeros_like(th))
    p["fc.weight"].copy_(torch.tensor([[0.5, 0.0], [-0.25, 0.0], [0.25, 0.0], [0.0, 0.0]]))
    p["fc.bias"].copy_(torch.tensor([0.0, 0.0, 0.0, -0.75]))    # unit 1: z(1) = 0 exactly
    p["out.weight"].copy_(torch.tensor([[0.25, 0.5, -0.5, 0.25]]))
    dl = torch.cat([v.reshape(-1) for v in p.values()])
    z0 = (x @ model.fc.weight.T + model.fc.bias).detach()
    pz = layout.unflatten(th + dl)
    z1 = x @ pz["fc.weight"].T + pz["fc.bias"]
    assert z0[0, 0] == 0 and z1[0, 1] == 0 and z0[0, 3] * z1[0, 3] < 0
    k = find_kinks(model, layout, th, dl, x)
    b = k.breakpoints[0]
    # only unit 3 crosses inside (0, 1): z3(t) = 0.25 − 0.75t, at t = 1/3
    expect = z0[0, 3] / (z0[0, 3] - z1[0, 3])
    assert len(b) == 1 and abs(float(b[0] - expect)) < 1e-14
    ns = kink_nodes(model, layout, th, dl, x, 1)
    assert ns.t.shape == (1, 2)
    assert _rel(model, layout, th, dl, x, ns) < EXACT


class Touch(nn.Module):
    """sum_j w_j relu((a_j x_j)^2 − c_j): z touches 0 where a_j(t) = 0 if c_j = 0, and dips
    through zero twice (both roots inside one grid cell) if c_j > 0 is small."""

    def __init__(self, c):
        super().__init__()
        self.a = nn.Parameter(torch.tensor([-1.0, 0.75], dtype=DT))
        self.c = nn.Parameter(torch.tensor(c, dtype=DT))
        self.w = nn.Parameter(torch.tensor([1.0, -0.5], dtype=DT))

    def forward(self, x):
        return (self.w * F.relu((self.a * x) ** 2 - self.c)).sum(-1, keepdim=True)


def _touch_setup(c):
    model = Touch(c)
    layout = ParamLayout.from_model(model)
    th = layout.flatten_model(model).clone()
    dl = torch.cat([torch.tensor([2.0, 0.5]), torch.zeros(2), torch.tensor([0.25, 0.125])]).to(DT)
    return model, layout, th, dl, torch.tensor([[1.0, 1.0]], dtype=DT)


def test_unit_touching_zero_adds_no_breakpoint():
    model, layout, th, dl, x = _touch_setup([0.0, 0.0])   # a_0(t) = -1 + 2t touches at t = 1/2
    k = find_kinks(model, layout, th, dl, x, grid=3)
    assert len(k.breakpoints[0]) == 0
    # f = w(t)·a(t)² is cubic in t with no kink: GL-2 exact
    assert _rel(model, layout, th, dl, x, kink_nodes(model, layout, th, dl, x, 2, grid=3)) < EXACT


def test_dip_through_zero_inside_one_cell_is_found():
    # a_0(t) = −1.1 + 2t, a_0² = 1e-2 at t = 0.5 and 0.6: both inside the grid cell [1/3, 2/3]
    model, layout, th, dl, x = _touch_setup([1e-2, 0.0])
    with torch.no_grad():
        model.a[0] = -1.1
    th = layout.flatten_model(model).clone()
    k = find_kinks(model, layout, th, dl, x, grid=3)
    b = k.breakpoints[0]
    assert len(b) == 2
    assert torch.allclose(b, torch.tensor([0.5, 0.6], dtype=DT), rtol=0, atol=1e-14)
    ns = nodes_from_breakpoints(k.breakpoints, 2)
    assert _rel(model, layout, th, dl, x, ns) < EXACT
    assert _rel(model, layout, th, dl, x, NodeSet(*gauss_legendre(8))) > 1e-5


class PoolNet(nn.Module):
    """conv → max-pool → relu → linear, plus abs / clamp / hardtanh / maximum / leaky_relu."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.lin = nn.Linear(3 * 3 * 3, 4)

    def forward(self, x):
        h = torch.relu(self.pool(self.conv(x)))
        h = h.flatten(1)
        y = self.lin(h)
        return torch.cat([y[:, :1].abs(), y[:, 1:2].clamp(min=-0.1, max=0.3),
                          F.hardtanh(y[:, 2:3]), torch.maximum(y[:, 3:], y[:, :1]),
                          F.leaky_relu(y[:, 1:2], 0.1)], dim=1)


def test_max_pool_and_functional_ops_are_exact():
    torch.manual_seed(4)
    model = PoolNet().to(DT)
    layout, th, dl = _setup(model, 0.3, seed=4)
    x = torch.randn(4, 1, 6, 6, dtype=DT)
    k = find_kinks(model, layout, th, dl, x)
    assert k.unseen == [] and k.unconverged == 0
    assert int(k.pieces.min()) > 5
    # conv and linear are linear in t: f quadratic per piece → GL-1 exact
    assert _rel(model, layout, th, dl, x, nodes_from_breakpoints(k.breakpoints, 1)) < EXACT
    assert _rel(model, layout, th, dl, x, NodeSet(*gauss_legendre(8))) > 1e-5


def test_max_pool_switch_matches_closed_form():
    # max over two candidates that are linear in t: they swap at t* = (a0 − b0)/((a0 − b0) − (a1 − b1))
    model = nn.Sequential(nn.Linear(1, 2), nn.Unflatten(1, (1, 2)), nn.MaxPool1d(2),
                          nn.Flatten()).to(DT)
    layout = ParamLayout.from_model(model)
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0], [0.0]], dtype=DT))
        model[0].bias.copy_(torch.tensor([0.0, 0.3], dtype=DT))
    th = layout.flatten_model(model).clone()
    dl = torch.tensor([-1.0, 0.5, 0.0, 0.0], dtype=DT)
    x = torch.tensor([[1.0]], dtype=DT)     # a(t) = 1 − t, b(t) = 0.3 + 0.5t: equal at t = 0.7/1.5
    k = find_kinks(model, layout, th, dl, x)
    assert len(k.breakpoints[0]) == 1
    assert abs(float(k.breakpoints[0][0]) - 0.7 / 1.5) < 1e-15


class Aten(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(3, 20)
        self.fc2 = nn.Linear(20, 1)

    def forward(self, x):
        return self.fc2(torch.ops.aten.relu(self.fc1(x)))


def test_user_declared_activation_and_unseen_report():
    torch.manual_seed(5)
    model = Aten().to(DT)
    layout, th, dl = _setup(model, 0.5, seed=5)
    x = torch.randn(3, 3, dtype=DT)
    blind = find_kinks(model, layout, th, dl, x)          # aten.relu is not in the table
    assert all(len(b) == 0 for b in blind.breakpoints)
    assert _rel(model, layout, th, dl, x, nodes_from_breakpoints(blind.breakpoints, 1)) > 1e-5
    k = find_kinks(model, layout, th, dl, x, activations=[torch.ops.aten.relu])
    assert _rel(model, layout, th, dl, x, nodes_from_breakpoints(k.breakpoints, 1)) < EXACT
    # a declared module: kink where its input crosses zero
    seq = nn.Sequential(nn.Linear(3, 20), nn.Softplus(beta=1e6), nn.Linear(20, 1)).to(DT)
    lay2, th2, dl2 = _setup(seq, 0.5, seed=6)
    k2 = find_kinks(seq, lay2, th2, dl2, x, activations=[nn.Softplus])
    assert sum(len(b) for b in k2.breakpoints) > 3

    class Signed(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return torch.sign(self.fc(x)) * self.fc(x)
    signed = Signed().to(DT)
    lay3, th3, dl3 = _setup(signed, 0.5)
    with pytest.warns(UserWarning, match="sign"):
        k3 = find_kinks(signed, lay3, th3, dl3, x)
    assert any("sign" in u for u in k3.unseen)


def test_node_sets_per_sample_common_and_merging():
    breaks = [torch.tensor([0.25, 0.25 + 1e-14, 0.5], dtype=DT), torch.zeros(0, dtype=DT),
              torch.tensor([1e-13, 0.75], dtype=DT)]
    ns = nodes_from_breakpoints(breaks, 2)
    assert ns.t.shape == (3, 6)                           # 3 pieces × 2 after the merge
    assert torch.allclose(ns.w.sum(1), torch.ones(3, dtype=DT), rtol=0, atol=1e-15)
    assert int((ns.w[1] != 0).sum()) == 2 and int((ns.w[2] != 0).sum()) == 4
    # polynomial of degree 3 with a kink at 0.5 (for sample 0): exact per piece
    f = lambda t: torch.where(t < 0.5, t ** 3, 0.125 + 2 * (t - 0.5) ** 3)
    F_ = lambda t: torch.where(t < 0.5, t ** 4 / 4, 0.5 ** 4 / 4 + 0.125 * (t - 0.5) + (t - 0.5) ** 4 / 2)
    got = (ns.w[0] * f(ns.t[0])).sum()
    assert abs(float(got - F_(torch.tensor(1.0, dtype=DT)))) < 1e-15
    common = nodes_from_breakpoints(breaks, 2, common=True)
    assert common.t.shape == (8,)                         # union {0.25, 0.5, 0.75}: 4 pieces
    assert abs(float(common.w.sum()) - 1) < 1e-15
    with pytest.raises(ValueError, match="n ≥ 1"):
        nodes_from_breakpoints(breaks, 0)


def test_bad_input_is_named():
    model = TwoLayer().to(DT)
    layout = ParamLayout.from_model(model)
    th = layout.flatten_model(model)
    x = torch.randn(2, 3, dtype=DT)
    with pytest.raises(ValueError, match="flat"):
        find_kinks(model, layout, th[:-1], th[:-1], x)
    with pytest.raises(ValueError, match="delta_s"):
        find_kinks(model, layout, th, th[:5], x)
    with pytest.raises(ValueError, match="grid"):
        find_kinks(model, layout, th, th, x, grid=0)
    with pytest.raises(TypeError, match="activations"):
        find_kinks(model, layout, th, th, x, activations=[3])


def test_engine_kinks_rule_end_to_end():
    from explaind_fast.attribution import attribute
    from explaind_fast.testing.models import TinyMLP, mlp_data
    from explaind_fast.testing.runs import train_tiny
    torch.manual_seed(0)
    model = TinyMLP("relu").to(DT)
    Xtr, Ytr, Xte, Yte = mlp_data()
    traj = train_tiny(model, Xtr, Ytr, kind="adamw", steps=3, record="memory")
    gl = attribute(model, traj, Xte, train_data=(Xtr, Ytr), quadrature="gauss-legendre:4",
                   params="all", steps="each", progress=False)
    assert float(gl.step_residual_relative.max()) > 1e-6    # the kinks matter in this run
    for mode in ("forward", "reverse"):
        a = attribute(model, traj, Xte, train_data=(Xtr, Ytr), quadrature="kinks:2",
                      params="tensor", data="label", steps="each", mode=mode, progress=False)
        assert float(a.step_residual_relative.max()) < EXACT, mode
        assert a.reconstruction_error < 1e-12, mode


def test_taper_gives_short_pieces_fewer_nodes():
    from explaind_fast.quadrature.kinks import nodes_per_piece
    L = torch.tensor([1.0, 0.5, 0.3, 0.1, 0.01], dtype=DT)
    assert nodes_per_piece(L, 3, None).tolist() == [3] * 5
    m = nodes_per_piece(L, 3, 0.1)
    assert m.tolist() == [3, 3, 2, 2, 1]
    # the model's promise: L^(2m+1) ρ^(2m) ≤ ρ^(2n) for the chosen m, violated for m − 1 ≥ 1
    md = m.to(DT)
    ok = L ** (2 * md + 1) * 0.1 ** (2 * md) <= 0.1 ** 6 * (1 + 1e-12)
    assert bool(ok.all())
    ns = nodes_from_breakpoints([torch.tensor([0.3, 0.4], dtype=DT)], 3, taper=0.1)
    assert int((ns.w != 0).sum()) == 2 + 2 + 3          # pieces 0.3, 0.1, 0.6
    assert abs(float(ns.w.sum()) - 1) < 1e-15
