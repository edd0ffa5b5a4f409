"""Attribution: the result of :func:`explaind_fast.attribute`, with named axes, the paper's derived
quantities and safetensors save/load.

Every number is a contribution to the *change* of the output (docs/design.md §1):
``final = initial + kernel.sum(non-test/output axes) + reg.sum(...)``.
"""
from __future__ import annotations

import json
from typing import Optional, Sequence, Tuple

import torch

AXES = ("step", "param", "data", "test", "output")


class Attribution:
    """Summed ExPLAIND contributions with named axes.

    Attributes:
        kernel: tensor with axes ``dims`` (a subset of ("step","param","data","test","output") in
            that order; summed axes are dropped; "test" is always kept).
        reg: regularisation contributions with axes ``reg_dims`` (= dims without "data").
        axes: labels per kept axis: step windows "a:b", group names, partition labels, test indices,
            output labels.
        initial, final: h(f(θ_0)), h(f(θ_N)) from real forward passes, axes ("test"[, "output"]).
        reconstruction_error: max |initial + kernel.sum + reg.sum − final|.
        step_residual: [N] max over rows of the quadrature residual
            h(f(θ_{s+1})) − h(f(θ_s)) − φ_s·Δ_s; step_residual_relative: divided by the step's
            max |change| (rows with non-finite values are left out of both).
        step_identity: [N] float64, per-sample data only (NaN for data="all", exact by
            construction): max_i |ρ_s| / max_i |Δ_s|, ρ_s the step identity residual of step s
            with the recomputed gradients (docs/design.md §9, explaind_fast.attribution.certificate).
        certificate: what the result's checks found (reconstruction defect and tolerance, steps
            failing the identity or the quadrature tolerance, non-finite rows, likely causes);
            ``certificate["problems"]`` is empty when every check passed.
        evaluations: per-step counters (quadrature nodes, JVP/Jacobian-row evaluations, forward
            passes, adaptive cap hits).
        credit: "update" — a contribution is credited to the step where θ moved (forward
            recursion); "gradient" — to the step whose batch produced the gradient (backward
            recursion, docs/design.md §7). Both agree when the step axis is summed.
        plan: the planner's choice and estimates (:mod:`explaind_fast.attribution.planner`).
    """

    def __init__(self, kernel, reg, dims, axes, initial, final, step_residual,
                 step_residual_relative, evaluations, credit, plan, quadrature,
                 step_identity=None, certificate=None):
        self.kernel, self.reg = kernel, reg
        self.dims = tuple(dims)
        self.axes = dict(axes)
        self.initial, self.final = initial, final
        self.step_residual = step_residual
        self.step_residual_relative = step_residual_relative
        self.evaluations = evaluations
        self.credit = credit
        self.plan = plan
        self.quadrature = quadrature
        n = step_residual.shape[0]
        self.step_identity = (torch.full((n,), float("nan"), dtype=torch.float64)
                              if step_identity is None else step_identity)
        self.certificate = dict(certificate or {})

    @property
    def reg_dims(self) -> Tuple[str, ...]:
        return tuple(d for d in self.dims if d != "data")

    def _sum_except(self, t, dims, keep):
        idx = [i for i, d in enumerate(dims) if d not in keep]
        return t.sum(idx) if idx else t

    @property
    def reconstruction_error(self) -> float:
        k = self._sum_except(self.kernel, self.dims, ("test", "output"))
        r = self._sum_except(self.reg, self.reg_dims, ("test", "output"))
        return float((self.initial + k + r - self.final).abs().max())

    # ------------------------------------------------------------------ paper quantities
    def _kept(self, keep, dims):
        keep = tuple(d for d in dims if d not in ("test", "output")) if keep is None else tuple(keep)
        bad = [d for d in keep if d not in dims]
        if bad:
            raise ValueError(f"axis {bad[0]!r} is not in this result (axes: {dims})")
        return keep

    def importance(self, keep: Optional[Sequence[str]] = None, reg: bool = False) -> torch.Tensor:
        """Ψ̄: signed sums over every axis not in ``keep`` (default: all kept non-test/output axes),
        then |·|, then the sum over test samples and outputs (the paper's accumulated importance).
        ``reg=True`` gives Ψ̄^reg. The sign convention does not matter here."""
        t, dims = (self.reg, self.reg_dims) if reg else (self.kernel, self.dims)
        keep = self._kept(keep, dims)
        signed = self._sum_except(t, dims, keep + ("test", "output"))
        rest = [d for d in dims if d in keep or d in ("test", "output")]
        idx = [i for i, d in enumerate(rest) if d in ("test", "output")]
        return signed.abs().sum(idx)

    def difference(self, keep: Optional[Sequence[str]] = None) -> torch.Tensor:
        """The paper's D(Θ) = Σ_θ∈Θ (Ψ − Ψ^reg), signed sums over data, test samples, outputs and
        every axis not in ``keep`` (default ("step", "param") where present). In the paper's sign
        (ψ = −contribution), so D = Σ reg − Σ kernel of this result."""
        if keep is None:
            keep = tuple(d for d in ("step", "param") if d in self.dims)
        keep = self._kept(keep, self.reg_dims)
        k = self._sum_except(self.kernel, self.dims, keep)
        r = self._sum_except(self.reg, self.reg_dims, keep)
        return r - k

    def similarity(self, group: Optional[str] = None) -> torch.Tensor:
        """Cosine similarity [M, M] of the test samples' influence vectors over parameter group
        ``group`` (a label of the "param" axis; None when params were summed): the kernel entries
        of the kept step/data/output axes, flattened (the paper's Sim over the kept axes)."""
        t, dims = self.kernel, self.dims
        if "param" in dims:
            if group is None:
                raise ValueError("similarity: pass a parameter group name, one of "
                                 f"{self.axes['param'][:5]}...")
            try:
                gi = list(self.axes["param"]).index(group)
            except ValueError:
                raise ValueError(f"similarity: no parameter group {group!r}") from None
            t = t.select(dims.index("param"), gi)
            dims = tuple(d for d in dims if d != "param")
        elif group is not None:
            raise ValueError("similarity: this result has no param axis (params='all')")
        v = t.movedim(dims.index("test"), 0).reshape(t.shape[dims.index("test")], -1)
        v = v / v.norm(dim=1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)
        return v @ v.T

    # ------------------------------------------------------------------ save / load
    def save(self, path: str) -> None:
        """One safetensors file: the tensors, plus JSON metadata (no pickle)."""
        from safetensors.torch import save_file
        tensors = {"kernel": self.kernel, "reg": self.reg, "initial": self.initial,
                   "final": self.final, "step_residual": self.step_residual,
                   "step_residual_relative": self.step_residual_relative,
                   "step_identity": self.step_identity}
        tensors.update({f"evaluations.{k}": v for k, v in self.evaluations.items()})
        meta = {"dims": list(self.dims), "axes": {k: [x if isinstance(x, (int, float, str))
                                                       else str(x) for x in v]
                                                   for k, v in self.axes.items()},
                "credit": self.credit, "plan": self.plan, "quadrature": self.quadrature,
                "certificate": self.certificate,
                "format": "explaind_fast.Attribution/1"}
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, path,
                  metadata={"explaind_fast": json.dumps(meta)})

    @classmethod
    def load(cls, path: str) -> "Attribution":
        from safetensors import safe_open
        with safe_open(path, framework="pt") as f:
            meta_raw = (f.metadata() or {}).get("explaind_fast")
            if meta_raw is None:
                raise ValueError(f"{path}: not an explaind_fast Attribution file")
            t = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(meta_raw)
        ev = {k.split(".", 1)[1]: v for k, v in t.items() if k.startswith("evaluations.")}
        return cls(t["kernel"], t["reg"], meta["dims"], meta["axes"], t["initial"], t["final"],
                   t["step_residual"], t["step_residual_relative"], ev, meta["credit"],
                   meta["plan"], meta["quadrature"], step_identity=t.get("step_identity"),
                   certificate=meta.get("certificate"))

    def __repr__(self):
        shape = dict(zip(self.dims, self.kernel.shape))
        return (f"Attribution({shape}, credit={self.credit!r}, mode={self.plan.get('mode')!r}, "
                f"reconstruction_error={self.reconstruction_error:.3g})")
