"""The attribution engine: exact ExPLAIND sums at any granularity, never the full tensor.

    attribute(model, trajectory, test_inputs, ...) -> Attribution

For each recorded update s (θ_s → θ_{s+1}, Δ_s = θ_{s+1} − θ_s) the contribution of parameter group
g, data partition p, test row (x, j) is   −φ_s(x)_j · (Φ_s[p] restricted to g)   and the
regularisation contribution is   −φ_s(x)_j · (r_s restricted to g),   with φ_s(x) = ∫_0^1 J(θ_s + tΔ_s)dt
by quadrature (DESIGN.md §2). Results are contributions to the change:
final = initial + kernel.sum() + reg.sum() (the paper's ψ is minus this).

Credit (Attribution.credit): with update-step credit a training sample's contribution is booked
at the update s where θ moved (forward recursion over E_s, one D-vector per data partition); with
gradient-step credit it is booked at the step i whose batch produced the gradient (backward
recursion H_i = scale_i⊙φ_i + decay_{i+1}⊙H_{i+1}, one D-vector per test row, per-sample gradients
of one batch at a time). The two agree when the step axis is summed. data="all" is always
update-credited and recomputes no gradient (Φ_s = −Δ_s − r_s).

Limits: test_inputs is one tensor (single-input models); the model must be row-wise in the batch
(no BatchNorm in train mode); reverse mode splits rows down to single (sample, output) rows but
never below one row of D numbers.

Peak memory (b bytes per number; see explaind_fast.planner for the symbols):
    forward mode   b·(T_c·(D + 2·M·A) + E + 4D)
    reverse mode   b·(m_c·K·(2D + A + X·(P+1)·D + H·2D) + E + 4D)
    plus the result b·S·G·(P+1)·M·K, where E = P·D for per-partition data with update credit.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as Fn
from torch.func import jvp, vmap

from .contraction import TestFunction, forward_contract, reverse_phi, segment_contract, \
    op_supports, _FALLBACK_LOOP_MAX_GROUPS
from .features import FunctionalModel, TrainSet, partition_gradients, subsampled_reg
from .granularity import parse_data, parse_output, parse_params, parse_steps
from .planner import make_plan
from .quadrature import NodeSet, adaptive_nodes, fixed_nodes, kink_nodeset, parse_quadrature
from .result import Attribution


def _default_loss(out, y):
    return Fn.cross_entropy(out, y, reduction="none")


def _check_modules(model: nn.Module, per_sample_data: bool):
    for name, mod in model.named_modules():
        is_bn = isinstance(mod, nn.modules.batchnorm._BatchNorm)
        is_do = isinstance(mod, nn.modules.dropout._DropoutNd) and mod.p > 0
        if is_bn and mod.training:
            raise ValueError(f"module '{name}' is BatchNorm in train mode: its output mixes the "
                             "samples of a batch, so contributions are not separable per sample; "
                             "call model.eval()")
        if is_do and (mod.training or per_sample_data):
            raise ValueError(f"module '{name}' is dropout (p={mod.p}): "
                             + ("its random masks cannot be replayed, so per-sample data attribution "
                                "cannot recompute the training gradients" if per_sample_data else
                                "in train mode the model is random; call model.eval()"))


def _activation_count(model, call):
    """Numbers in all module outputs of one forward pass (activation estimate for the planner)."""
    total = [0]

    def hook(_m, _i, out):
        if isinstance(out, torch.Tensor):
            total[0] += out.numel()
    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            y = call()
    finally:
        for h in handles:
            h.remove()
    return total[0], y


def attribute(model, trajectory, test_inputs, *, test_targets=None, train_data=None, loss_fn=None,
              output="logits", params="all", data="all", steps="all",
              quadrature="adaptive:1e-6", mode="auto", memory_budget=None, dtype=None,
              device=None, progress=True, credit="auto", max_intervals=64) -> Attribution:
    """ExPLAIND contributions of a recorded training run, summed to the requested granularity.

    Args:
        model: the nn.Module (architecture; its trainable parameters must match the trajectory's
            layout; its current weights are not used, frozen params and buffers are).
        trajectory: a Trajectory (read API of explaind_fast.trajectory).
        test_inputs: [M, ...] inputs (floating inputs must have the attribution dtype).
        test_targets: [M] targets, needed for output="loss" (and passed to a callable h).
        train_data: (X, Y) tensors or a dataset of (x, y), indexed like the recorded batches;
            needed when data != "all". loss_fn: per-sample loss (reduction='none'), default
            cross-entropy; must match the training loss (the recorded weights w_{s,k} are applied).
        output: "logits" | class index | list of indices | ("margin", i, j) | list of margins |
            "loss" | [K, O] projection | callable h(outputs [M, O], targets) -> [M, K] (row-wise).
        params: "all" | "tensor" | "module"/"layer" | {group: [name patterns]} | callable(name) |
            "neuron" | "parameter" | int64 [D] group map.
        data: "all" (no gradient recomputation) | "label" | "sample" | int [n_train] partition.
        steps: "each" | window length | list of boundaries | "all".
        quadrature: "midpoint:n" | "gauss-legendre:n" | "adaptive:tol" | "kinks:n" |
            callable(s, theta_s, delta_s) -> NodeSet ([Q] or per-sample [M, Q]).
        mode: "forward" | "reverse" | "auto" (planner).
        memory_budget: bytes for the chunked work buffers (default 2 GiB); chunks shrink to fit.
        credit: "update" (step where θ moved; forward recursion, P·D state), "gradient" (step
            whose batch produced the gradient; backward recursion, reverse mode, 2·M·K·D state),
            "auto" ("gradient" when data != "all" and steps="all", where both agree, else
            "update").
        max_intervals: cap on the adaptive rule's intervals per step.

    Returns an :class:`Attribution` with kernel axes (step, param, data, test, output) minus the
    summed ones (step if "all", param if "all", data if "all", output if a single output).
    """
    traj = trajectory
    layout = traj.layout
    layout.check_model(model)
    N = traj.num_steps
    if dtype is None:
        dtype = next((p.dtype for p in model.parameters() if p.requires_grad), torch.float32)
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    device = torch.device(device)

    if not isinstance(test_inputs, torch.Tensor):
        raise ValueError(f"test_inputs must be a tensor [M, ...], got {type(test_inputs).__name__}")
    if test_inputs.dim() < 1 or test_inputs.shape[0] < 1:
        raise ValueError(f"test_inputs must be a non-empty batch [M, ...], got shape "
                         f"{tuple(test_inputs.shape)}")
    if test_inputs.is_floating_point() and test_inputs.dtype != dtype:
        raise ValueError(f"test_inputs have dtype {test_inputs.dtype}, but the attribution runs in "
                         f"{dtype} (the model's dtype or dtype=); convert them")
    X = test_inputs.to(device)
    M = X.shape[0]
    if test_targets is not None:
        test_targets = torch.as_tensor(test_targets).to(device)
        if test_targets.shape[0] != M:
            raise ValueError(f"test_targets has {test_targets.shape[0]} entries for {M} test inputs")

    out_spec = parse_output(output, loss_fn)
    if out_spec.needs_targets and test_targets is None:
        raise ValueError(f"output={output!r} needs test_targets")
    groups = parse_params(params, layout)

    per_sample_data = not (isinstance(data, str) and data.lower() == "all")
    train = None
    if per_sample_data:
        if train_data is None:
            raise ValueError(f"data={data!r} needs train_data (and the per-sample loss_fn, "
                             "reduction='none'; default cross-entropy)")
        if traj.checkpoint_every != 1:
            raise ValueError(f"data={data!r} is impossible on a subsampled trajectory "
                             f"(checkpoint_every={traj.checkpoint_every}): the first moment cannot be "
                             "split per sample (paper, Remark F.3); use data='all'")
        train = TrainSet(train_data, dtype, device)
        if traj.dataset_size is not None and len(train) != traj.dataset_size:
            raise ValueError(f"train_data has {len(train)} samples but the trajectory was recorded "
                             f"on a dataset of {traj.dataset_size}")
    loss_fn = loss_fn or _default_loss
    part = parse_data(data, len(train) if train is not None else None,
                      train.Y if train is not None else None)
    windows = parse_steps(steps, N)
    _check_modules(model, per_sample_data)
    qspec = parse_quadrature(quadrature)

    if credit == "auto":
        credit = ("gradient" if (per_sample_data and not windows.keep and mode != "forward")
                  else "update")
    if credit not in ("update", "gradient"):
        raise ValueError(f"credit={credit!r}: expected 'update', 'gradient' or 'auto'")
    if credit == "gradient" and not per_sample_data:
        raise ValueError("credit='gradient' applies to data attribution; data='all' always uses "
                         "update-step credit")
    if mode not in ("auto", "forward", "reverse"):
        raise ValueError(f"mode={mode!r}: expected 'auto', 'forward' or 'reverse'")
    if credit == "gradient" and mode == "forward":
        raise ValueError("credit='gradient' (the backward recursion) runs in reverse mode only")

    fm = FunctionalModel(model, layout, dtype, device)
    tf = TestFunction(fm, X, test_targets, out_spec.h)
    theta0 = traj.theta(0, dtype=dtype, device=device)
    try:
        A, initial = _activation_count(model, lambda: tf.values(theta0))
    except (RuntimeError, IndexError, TypeError) as e:
        raise ValueError(f"test_inputs of shape {tuple(X.shape)} and dtype {X.dtype} could not be "
                         f"fed to the model: {e}") from None
    if initial.dim() != 2 or initial.shape[0] != M:
        raise ValueError(f"the output functional must give [M, K] = [{M}, K], got "
                         f"{tuple(initial.shape)}")
    K = initial.shape[1]
    D, G, P, S = layout.D, groups.G, part.P, len(windows.bounds)
    Q = qspec.n if qspec.kind in ("midpoint", "gauss-legendre", "kinks") else 8
    itemsize = torch.finfo(dtype).bits // 8
    plan = make_plan(D=D, M=M, K=K, G=G, P=P, Q=Q, A=max(1, A // M), itemsize=itemsize,
                     mode=mode, credit=credit, budget=memory_budget, data_all=not per_sample_data,
                     fallback_product=(not op_supports(dtype) and G > _FALLBACK_LOOP_MAX_GROUPS))
    budget = plan.memory_budget
    if per_sample_data and credit == "update" and P * D * itemsize > budget:
        raise ValueError(f"update-step credit keeps one D-vector per data partition: {P}×{D}×"
                         f"{itemsize} B = {P * D * itemsize} B exceeds memory_budget={budget}; "
                         "use credit='gradient' (backward recursion, no per-sample buffer) or a "
                         "larger budget")

    kernel = torch.zeros(S, G, P, M, K, dtype=dtype, device=device)
    reg = torch.zeros(S, G, M, K, dtype=dtype, device=device)
    residual = torch.zeros(N, M, K, dtype=dtype, device=device)
    change = torch.zeros(N, dtype=dtype, device=device)    # on device: no per-step host sync
    ev_nodes = torch.zeros(N, dtype=torch.int64)
    ev_jvp = torch.zeros(N, dtype=torch.int64)
    ev_fwd = torch.zeros(N, dtype=torch.int64)
    ev_cap = torch.zeros(N, dtype=torch.bool)
    win_of = windows.window_of(N)
    ctx = dict(traj=traj, tf=tf, fm=fm, train=train, loss_fn=loss_fn, part=part, groups=groups,
               qspec=qspec, dtype=dtype, device=device, model=model, X=X, K=K, M=M,
               max_intervals=max_intervals, ev=(ev_nodes, ev_jvp, ev_fwd, ev_cap))

    Fvals = [None] * (N + 1)
    Fvals[0] = initial

    def F_at(s):
        if Fvals[s] is None:
            with torch.no_grad():
                Fvals[s] = tf.values(traj.theta(s, dtype=dtype, device=device))
            ev_fwd[min(s, N - 1)] += 1
        return Fvals[s]

    bar = _progress(N, progress)
    if credit == "update":
        E = torch.zeros(P, D, dtype=dtype, device=device) if per_sample_data else None
        R = torch.zeros(D, dtype=dtype, device=device)
        th_next = theta0
        for s in range(N):
            th = th_next                                       # each θ is read from the store once
            th_next = traj.theta(s + 1, dtype=dtype, device=device)
            delta = th_next - th
            if traj.checkpoint_every != 1:
                r, R = subsampled_reg(traj, s, R, dtype, device)
            else:
                rec = traj.step(s)
                c = traj.rule.coefficients(rec, dtype=dtype, device=device)
                R = c.reg_decay * R + c.reg_gain * th
                r = c.reg_scale * R
            B = torch.empty(P + 1, D, dtype=dtype, device=device)    # [Φ_s[1..P]; r_s]
            if per_sample_data:
                present, Gp = partition_gradients(fm, th, train, loss_fn, rec, part.ids)
                E.mul_(c.decay[None])                                  # in place: E is P×D
                if len(present) == P:        # every partition in the batch: present = 0..P-1
                    E.addcmul_(c.gain[None], Gp)
                else:
                    E[present] += c.gain[None] * Gp
                torch.mul(c.scale[None], E, out=B[:P])
            else:
                torch.sub(-delta, r, out=B[0])
            B[P] = r
            nodes = _nodes_for(ctx, s, th, delta, F_at)
            ev_nodes[s] = nodes.num_nodes
            if plan.mode == "forward":
                out, jd = _forward_step(ctx, th, delta, nodes, B, plan.tangent_chunk)
                ev_jvp[s] += nodes.num_nodes * (G * (P + 1) + 1)
            else:
                out, jd = _reverse_step(ctx, th, delta, nodes, B, plan)
                ev_jvp[s] += nodes.num_nodes * M * K
            kernel[win_of[s]] -= out[:, :P]
            reg[win_of[s]] -= out[:, P]
            F0, F1 = F_at(s), F_at(s + 1)
            residual[s] = F1 - F0 - jd
            change[s] = (F1 - F0).abs().max()
            bar.update(1)
    else:
        _backward_recursion(ctx, kernel, reg, residual, change, win_of, plan, F_at, bar)
    bar.close()

    final = F_at(N)
    keep = {"step": windows.keep, "param": groups.keep, "data": part.keep, "test": True,
            "output": out_spec.keep}
    kern_dims = [d for d in ("step", "param", "data", "test", "output")]
    drop_k = [i for i, d in enumerate(kern_dims) if not keep[d]]
    kernel_out = kernel
    for i in reversed(drop_k):
        kernel_out = kernel_out.squeeze(i) if kernel_out.shape[i] == 1 else kernel_out.sum(i)
    reg_dims = ["step", "param", "test", "output"]
    reg_out = reg
    for i in reversed([i for i, d in enumerate(reg_dims) if not keep[d]]):
        reg_out = reg_out.squeeze(i) if reg_out.shape[i] == 1 else reg_out.sum(i)
    dims = tuple(d for d in kern_dims if keep[d])
    if not out_spec.keep:
        initial, final = initial[:, 0], final[:, 0]
    out_labels = out_spec.labels if out_spec.labels is not None else list(range(K))
    axes = {"step": windows.labels, "param": groups.names, "data": part.labels,
            "test": list(range(M)), "output": out_labels}
    axes = {k: v for k, v in axes.items() if keep[k]}
    res_max = residual.abs().flatten(1).amax(1).to(torch.float64)
    tiny = torch.finfo(torch.float64).tiny
    evaluations = {"quadrature_nodes": ev_nodes, "jvp_or_rows": ev_jvp, "forward_passes": ev_fwd,
                   "adaptive_cap_hit": ev_cap}
    plan_d = plan.to_dict()
    res_rel = res_max / change.to(torch.float64).clamp_min(tiny)
    return Attribution(kernel_out, reg_out, dims, axes, initial, final, res_max, res_rel,
                       evaluations, credit, plan_d, qspec.text)


# ------------------------------------------------------------------------------------ helpers
class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress(N, progress):
    if not progress:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=N, desc="explaind steps", leave=False)


def _nodes_for(ctx, s, th, delta, F_at) -> NodeSet:
    q = ctx["qspec"]
    if q.kind in ("midpoint", "gauss-legendre"):
        return fixed_nodes(q)
    if q.kind == "kinks":
        return kink_nodeset(q, ctx["model"], ctx["traj"].layout, th, delta, ctx["X"])
    if q.kind == "callable":
        ns = q.fn(s, th, delta)
        if not isinstance(ns, NodeSet):
            raise ValueError("a quadrature callable must return a NodeSet")
        if ns.per_sample and ns.t.shape[0] != ctx["M"]:
            raise ValueError(f"per-sample NodeSet has {ns.t.shape[0]} rows for {ctx['M']} test inputs")
        return ns
    tf = ctx["tf"]
    ev_nodes, ev_jvp, ev_fwd, ev_cap = ctx["ev"]

    def F(t):
        with torch.no_grad():
            return tf.values(th + t * delta)

    def Gd(ts):
        F1 = lambda tt: tf.values(tt)                                  # noqa: E731
        ths = th[None] + ts.to(th)[:, None] * delta[None]
        return vmap(lambda x: jvp(F1, (x,), (delta,))[1])(ths)         # [Q, M, K]
    ns, info = adaptive_nodes(F, Gd, q.tol, n=q.n, max_intervals=ctx["max_intervals"],
                              F0=F_at(s), F1=F_at(s + 1))
    ev_jvp[s] += info.jvp_nodes
    ev_fwd[s] += info.forward_passes
    ev_cap[s] = info.cap_hit
    return ns


def _forward_step(ctx, th, delta, nodes, B, chunk):
    """[G, P+1, M, K] contributions J·B_p|g (before the minus sign) and J·Δ [M, K]."""
    groups, tf = ctx["groups"], ctx["tf"]
    G, P1, D = groups.G, B.shape[0], B.shape[1]
    T = G * P1 + 1
    ids = groups.ids.to(th.device)
    outs = []
    for a in range(0, T, chunk):
        t = torch.arange(a, min(T, a + chunk), device=th.device)
        g, p = t // P1, t % P1
        V = B[p.clamp_max(P1 - 1)] * (ids[None, :] == g[:, None]).to(B.dtype)
        V[t == T - 1] = delta                                          # the last tangent is Δ_s
        outs.append(forward_contract(tf, th, delta, nodes, V, max_evals=chunk))
    out = torch.cat(outs)                                              # [T, M, K]
    return out[:-1].reshape(G, P1, *out.shape[1:]), out[-1]


def _row_chunks(M, K, plan):
    """(test samples, outputs) slices of the reverse-mode row chunks."""
    for a in range(0, M, plan.sample_chunk):
        for k in range(0, K, plan.output_chunk):
            yield slice(a, min(M, a + plan.sample_chunk)), slice(k, min(K, k + plan.output_chunk))


def _reverse_step(ctx, th, delta, nodes, B, plan):
    groups, tf, M, K = ctx["groups"], ctx["tf"], ctx["M"], ctx["K"]
    G, P1 = groups.G, B.shape[0]
    out = torch.zeros(G, P1, M, K, dtype=th.dtype, device=th.device)
    jd = torch.zeros(M, K, dtype=th.dtype, device=th.device)
    for idx, ks in _row_chunks(M, K, plan):
        phi = reverse_phi(tf, th, delta, nodes, idx, plan.pair_chunk, ks)   # [m, Kc, D]
        m, kc = phi.shape[:2]
        rows = phi.reshape(m * kc, -1)
        o = segment_contract(rows, B, groups)                          # [G, m*Kc, P1]
        out[:, :, idx, ks] = o.reshape(G, m, kc, P1).permute(0, 3, 1, 2)
        jd[idx, ks] = (rows @ delta).reshape(m, kc)
    return out, jd


def _backward_recursion(ctx, kernel, reg, residual, change, win_of, plan, F_at, bar):
    """Gradient-step credit: H_i = scale_i⊙φ_i + decay_{i+1}⊙H_{i+1} per test row; the
    contribution of partition p at gradient step i is −gain_i⊙G_i[p]·H_i (and the reg term
    −reg_gain_i⊙θ_i·Hreg_i). State: 2 [m_c·K, D] per row chunk; the train-side gradients are
    recomputed once per row chunk."""
    traj, tf, groups, part = ctx["traj"], ctx["tf"], ctx["groups"], ctx["part"]
    dtype, device, M, K = ctx["dtype"], ctx["device"], ctx["M"], ctx["K"]
    N, G = traj.num_steps, groups.G
    ev_nodes, ev_jvp = ctx["ev"][0], ctx["ev"][1]
    first = True
    for idx, ks in _row_chunks(M, K, plan):
        H = Hreg = None
        next_decay = next_reg_decay = None
        th_next = traj.theta(N, dtype=dtype, device=device)
        for s in reversed(range(N)):
            th = traj.theta(s, dtype=dtype, device=device)      # each θ is read once per chunk
            delta = th_next - th
            th_next = th
            rec = traj.step(s)
            c = traj.rule.coefficients(rec, dtype=dtype, device=device)
            nodes = _nodes_for(ctx, s, th, delta, F_at) if first else ctx["_nodes"][s]
            ctx.setdefault("_nodes", {})[s] = nodes
            ev_nodes[s] = nodes.num_nodes
            phi = reverse_phi(tf, th, delta, nodes, idx, plan.pair_chunk, ks)
            m, kc = phi.shape[:2]
            ev_jvp[s] += nodes.num_nodes * m * kc
            rows = phi.reshape(m * kc, -1)
            H = c.scale * rows if H is None else c.scale * rows + next_decay * H
            Hreg = c.reg_scale * rows if Hreg is None else c.reg_scale * rows + next_reg_decay * Hreg
            next_decay, next_reg_decay = c.decay, c.reg_decay
            present, Gp = partition_gradients(ctx["fm"], th, ctx["train"], ctx["loss_fn"], rec,
                                              part.ids)
            o = segment_contract(H, c.gain[None] * Gp, groups)          # [G, m*K, U]
            o = o.reshape(G, m, kc, -1).permute(0, 3, 1, 2)             # [G, U, m, Kc]
            kw = kernel[win_of[s]]
            kw[:, present.to(kw.device), idx, ks] -= o
            ro = segment_contract(Hreg, (c.reg_gain * th)[None], groups)
            reg[win_of[s], :, idx, ks] -= ro.reshape(G, m, kc)
            F0, F1 = F_at(s), F_at(s + 1)
            residual[s, idx, ks] = (F1 - F0)[idx, ks] - (rows @ delta).reshape(m, kc)
            change[s] = (F1 - F0).abs().max()
            if first:
                bar.update(1)
        first = False
