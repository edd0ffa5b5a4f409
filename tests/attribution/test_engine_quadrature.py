"""Reconstruction (initial + kernel + reg = final) and quadrature oracles of the engine.

Tolerances: smooth tiny models, float64, Gauss–Legendre-8 on steps whose outputs change by O(0.1):
the rule's error is far below 1e-12, so reconstruction is at rounding level; 1e-9 is the issue's bar.
Polynomial oracles: an exact rule leaves only rounding (< 1e-12 relative to the step's change); an
inexact one leaves a truncation error of the size of the next Taylor term (> 1e-8 here).
"""
import pytest
import torch
import torch.nn as nn

from explaind_fast.attribution import attribute
from explaind_fast.testing.models import DT, TinyMLP, mlp_data
from explaind_fast.testing.runs import tiny_mlp_run, tiny_transformer_run, train_tiny


def _attr(run, **kw):
    model, traj, train, Xte, Yte, _ = run
    kw.setdefault("progress", False)
    return attribute(model, traj, Xte, test_targets=Yte, train_data=train, **kw)


@pytest.mark.parametrize("kind", ["adamw", "sgd", "adam"])
@pytest.mark.parametrize("act", ["tanh", "gelu"])
def test_mlp_reconstruction_gl8(kind, act):
    run = tiny_mlp_run(act=act, kind=kind)
    a = _attr(run, quadrature="gauss-legendre:8", params="tensor", data="label", steps="each")
    assert a.reconstruction_error < 1e-9
    assert float(a.step_residual.max()) < 1e-9
    assert a.step_residual.shape == (run[1].num_steps,)
    change = (a.final - a.initial).abs().max()
    assert change > 1e-2                      # the run really moved the outputs


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_transformer_reconstruction_gl8(kind):
    run = tiny_transformer_run(kind=kind)
    for mode in ("forward", "reverse"):
        a = _attr(run, quadrature="gauss-legendre:8", params="module", steps="each", mode=mode)
        assert a.reconstruction_error < 1e-9, mode
    a = _attr(run, quadrature="gauss-legendre:8", output="loss", data="sample", steps="all")
    assert a.reconstruction_error < 1e-9


def test_relu_adaptive_meets_tolerance():
    run = tiny_mlp_run(act="relu", kind="adamw", steps=3)
    gl = _attr(run, quadrature="gauss-legendre:4", params="all", data="all", steps="each")
    tol = 1e-6
    a = _attr(run, quadrature=f"adaptive:{tol}", params="tensor", steps="each", max_intervals=200)
    assert float(gl.step_residual_relative.max()) > 10 * tol      # ReLU kinks defeat fixed GL
    ok = ~a.evaluations["adaptive_cap_hit"]
    assert ok.any()
    # the residual of the final rule is the sum of the accepted intervals' errors: <= tol
    assert bool((a.step_residual_relative[ok] <= tol * (1 + 1e-6)).all())
    assert bool((a.evaluations["jvp_or_rows"] > 0).all())
    assert bool((a.evaluations["quadrature_nodes"][ok] > 4).any())  # it did subdivide


def test_relu_kinks_rule_is_exact():
    pytest.importorskip("explaind_fast.quadrature.kinks")
    run = tiny_mlp_run(act="relu", kind="adamw", steps=3)
    for mode in ("forward", "reverse"):
        a = _attr(run, quadrature="kinks:4", params="tensor", steps="each", mode=mode)
        assert a.reconstruction_error < 1e-9, mode


class PowerModel(nn.Module):
    """out = (x W^T + b)^p: along θ_s + tΔ_s the Jacobian is a polynomial of degree p − 1 in t."""

    def __init__(self, p, d_in=5, d_out=3):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)
        self.p = p

    def forward(self, x):
        return self.lin(x) ** self.p


def _power_run(p):
    torch.manual_seed(0)
    model = PowerModel(p).to(DT)
    Xtr, Ytr, Xte, Yte = mlp_data()
    Xtr, Xte = 0.5 * Xtr, 0.5 * Xte
    traj = train_tiny(model, Xtr, Ytr, kind="sgd", steps=3, clip=None)
    return model, traj, (Xtr, Ytr), Xte, Yte, None


@pytest.mark.parametrize("p,n,exact", [(6, 3, True), (6, 2, False), (4, 2, True), (3, 1, False),
                                       (2, 1, True)])
def test_gauss_legendre_polynomial_oracle(p, n, exact):
    """GL-n integrates degree 2n−1 exactly; the integrand has degree p − 1."""
    run = _power_run(p)
    a = _attr(run, quadrature=f"gauss-legendre:{n}", params="tensor", steps="each")
    ref = _attr(run, quadrature="gauss-legendre:12", params="tensor", steps="each")
    rel = float(a.step_residual_relative.max())
    diff = float((a.kernel - ref.kernel).abs().max())
    print(p, n, rel, diff)
    if exact:
        assert rel < 1e-12 and diff < 1e-13
    else:
        assert rel > 1e-8 and diff > 1e-11


@pytest.mark.parametrize("p,exact", [(2, True), (3, False)])
def test_midpoint_polynomial_oracle(p, exact):
    """The midpoint rule is exact only for integrands of degree <= 1."""
    run = _power_run(p)
    a = _attr(run, quadrature="midpoint:3", params="tensor", steps="each", mode="reverse")
    rel = float(a.step_residual_relative.max())
    assert (rel < 1e-12) if exact else (rel > 1e-8)


def test_adaptive_on_polynomial_reaches_tolerance():
    run = _power_run(12)       # degree 11: GL-4 (exact to degree 7) must subdivide
    a = _attr(run, quadrature="adaptive:1e-12", steps="each")
    assert float(a.step_residual_relative.max()) <= 1e-12 * (1 + 1e-6)
    assert not bool(a.evaluations["adaptive_cap_hit"].any())
    assert a.reconstruction_error < 1e-9


def test_subsampled_trajectory_all_data_only():
    torch.manual_seed(0)
    model = TinyMLP("tanh").to(DT)
    Xtr, Ytr, Xte, Yte = mlp_data()
    traj = train_tiny(model, Xtr, Ytr, kind="adamw", steps=6, checkpoint_every=2)
    assert traj.checkpoint_every == 2 and traj.num_steps == 3
    a = attribute(model, traj, Xte, quadrature="gauss-legendre:8", params="tensor",
                  steps="each", progress=False)
    assert a.reconstruction_error < 1e-9
    assert a.reg.abs().max() > 0
    with pytest.raises(ValueError, match="Remark F.3"):
        attribute(model, traj, Xte, train_data=(Xtr, Ytr), data="sample", progress=False)


def test_float32_runs_and_reconstructs():
    """float32 end to end (the fused op accumulates in float32): rounding-level reconstruction,
    here ~1e-7 on outputs of size ~1, so 1e-5 is a safe bar."""
    torch.manual_seed(0)
    model = TinyMLP("tanh").float()
    Xtr, Ytr, Xte, Yte = mlp_data()
    traj = train_tiny(model, Xtr.float(), Ytr, kind="adamw", steps=3)
    for mode in ("forward", "reverse"):
        a = attribute(model, traj, Xte.float(), train_data=(Xtr.float(), Ytr), params="tensor",
                      data="label", steps="each", quadrature="gauss-legendre:4", mode=mode,
                      progress=False)
        assert a.kernel.dtype == torch.float32 and a.reconstruction_error < 1e-5
