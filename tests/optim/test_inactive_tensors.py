"""The optimizer rules against torch.optim itself, in float64, with tensors that get no gradient.

torch's AdamW, Adam (L2) and SGD-momentum skip a parameter whose ``.grad`` is None: no update, no
weight decay, moments untouched, and (Adam) no increment of that tensor's own step counter, so
per-tensor counts drift apart. The rules describe this with ``StepRecord.inactive`` and
``tensor_step_counts`` (decay 1, gain 0, scale 0 on inactive coordinates). Oracle: torch's own
update and state, replayed through the rules' recursions; float64, so the only differences are the
rounding of the two evaluation orders (≤ 1e-15 relative to |θ| here, bound 1e-13).
"""
import pytest
import torch

from explaind_fast.model import ParamLayout
from explaind_fast.optim import (MomentRecursion, RegRecursion, StepRecord, gradient_from_moments,
                                 identity_defect_parts, implied_gradient, implied_moment, make_rule,
                                 moment_from_update)

F64 = torch.float64
SHAPES = [(3, 4), (4,), (2, 3), (5,), (3,)]
# which tensors have no gradient at each step: tensor 3 never gets one (an unused table), tensor
# 1 misses the first step (its counter starts late), tensor 2 is a head used on some steps only
INACTIVE = [(1, 3), (3,), (2, 3), (2, 3), (3,), (0, 2, 3), (3,)]


def _setup(kind, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=F64)) for s in SHAPES]
    groups = [{"params": params[:3], "lr": 0.05, "weight_decay": 0.1},
              {"params": params[3:], "lr": 0.02, "weight_decay": 0.3}]
    if kind == "sgd":
        opt = torch.optim.SGD(groups, momentum=0.9, **kw)
        hyper = [{"momentum": 0.9, "dampening": 0.0}] * 2
    else:
        cls = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
        opt = cls(groups, betas=(0.9, 0.99), eps=1e-8, **kw)
        hyper = [{"betas": (0.9, 0.99), "eps": 1e-8}] * 2
    layout = ParamLayout(names=tuple(f"p{i}" for i in range(len(SHAPES))), shapes=tuple(SHAPES),
                         dtypes=("float64",) * len(SHAPES), group_of_tensor=(0, 0, 0, 1, 1))
    return params, opt, layout, make_rule(kind, layout, hyper), g


def _flat(layout, params, state_key=None, opt=None):
    parts = []
    for p in params:
        if state_key is None:
            parts.append(p.detach())
        else:
            st = opt.state.get(p, {})
            parts.append(st[state_key] if state_key in st and st[state_key] is not None
                         else torch.zeros_like(p))
    return layout.flatten(parts)


@pytest.mark.parametrize("kind,kw", [("adamw", {}), ("adam", {}), ("sgd", {}),
                                     ("adamw", {"foreach": True}), ("adam", {"fused": True}),
                                     ("sgd", {"foreach": True})],
                         ids=["adamw", "adam", "sgd", "adamw-foreach", "adam-fused", "sgd-foreach"])
def test_rules_replay_torch_with_inactive_tensors(kind, kw):
    params, opt, layout, rule, g = _setup(kind, **kw)
    D = layout.D
    moments, reg = MomentRecursion(1, D), RegRecursion(D)
    m_prev = torch.zeros(D, dtype=F64)
    E_prev = torch.zeros(D, dtype=F64)
    for s, inactive in enumerate(INACTIVE):
        for i, p in enumerate(params):
            p.grad = None if i in inactive else torch.randn(p.shape, generator=g, dtype=F64)
        G = layout.flatten([p.grad if p.grad is not None else torch.zeros_like(p) for p in params])
        theta = _flat(layout, params)
        lr = [gr["lr"] for gr in opt.param_groups]
        wd = [gr["weight_decay"] for gr in opt.param_groups]
        opt.step()
        for gr in opt.param_groups:       # a scheduler: lr changes between steps
            gr["lr"] *= 0.8
        counts = None
        if kind != "sgd":
            counts = [int(opt.state[p]["step"]) if p in opt.state and "step" in opt.state[p]
                      else 0 for p in params]
            assert counts[3] == 0 and counts[1] == s       # the skipped tensors' own counters
        rec = StepRecord(index=s, step_count=s + 1, lr=lr, weight_decay=wd, inactive=inactive,
                         tensor_step_counts=counts,
                         exp_avg_sq=_flat(layout, params, "exp_avg_sq", opt) if kind != "sgd"
                         else None)
        c = rule.coefficients(rec)
        assert c.active is not None and int((~c.active).sum()) == sum(
            layout.numels[i] for i in inactive)
        assert bool(torch.isfinite(c.scale).all() and torch.isfinite(c.reg_scale).all())
        moments.step(c, G[None])
        r = reg.step_with(c, theta)
        phi = moments.phi(c)[0]
        theta_next = _flat(layout, params)
        delta = theta_next - theta
        scale = float(theta_next.abs().max())
        assert float((delta + phi + r).abs().max()) <= 1e-13 * scale, s
        # torch's first moment is the recursion's E (+ R where the decay flows through it)
        key = "momentum_buffer" if kind == "sgd" else "exp_avg"
        m_torch = _flat(layout, params, key, opt)
        m_rule = moments.E[0] + (reg.R if rule.moment_includes_reg else 0)
        assert torch.allclose(m_rule, m_torch, rtol=0, atol=1e-13 * float(m_torch.abs().max()))
        # inactive coordinates did not move, and neither did their moments
        off = layout.offsets
        for i in inactive:
            assert bool((delta[off[i]:off[i + 1]] == 0).all())
        # the helpers the replay and the certificate use: no 0/0, exact round trips
        m = implied_moment(rule, c, delta, theta, m_prev=m_prev)
        assert torch.allclose(m, m_torch, rtol=0, atol=1e-10 * float(m_torch.abs().max()))
        G_impl = implied_gradient(rule, c, m, m_prev, theta)
        want = torch.where(c.active, G, torch.zeros_like(G))
        assert torch.allclose(G_impl, want, rtol=0, atol=1e-8 * float(G.abs().max()))
        base, coef = identity_defect_parts(rule, c, G, m, theta)
        assert float((base + coef * m_prev).abs().max()) <= 1e-13 * scale
        E = moment_from_update(c, delta, reg.R, E_prev)
        assert torch.allclose(E, moments.E[0], rtol=0, atol=1e-10 * float(m_torch.abs().max()))
        G2 = gradient_from_moments(c, E, E_prev)
        assert torch.allclose(G2, want, rtol=0, atol=1e-8 * float(G.abs().max()))
        m_prev, E_prev = m, E


def test_all_active_records_are_unchanged():
    """A record without inactive tensors gives the coefficients of before (no mask, scalar t)."""
    _, _, layout, rule, _ = _setup("adamw")
    v = torch.rand(layout.D, dtype=F64)
    a = rule.coefficients(StepRecord(index=0, step_count=3, lr=[0.1, 0.2], weight_decay=[0.1, 0.0],
                                     exp_avg_sq=v))
    b = rule.coefficients(StepRecord(index=0, step_count=3, lr=[0.1, 0.2], weight_decay=[0.1, 0.0],
                                     exp_avg_sq=v, tensor_step_counts=[3] * 5))
    assert a.active is None
    for k in ("decay", "gain", "scale", "reg_decay", "reg_gain", "reg_scale"):
        assert torch.equal(getattr(a, k), getattr(b, k)), k
