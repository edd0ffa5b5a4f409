"""The least time exact Figures 4/5 (per-training-sample influence of the decoder, and of linear 2
for Figure 5's similarity) can take at the paper's size on this machine, from the operations no
exact method can skip — a lower bound, not a run of the engine.

Both ways of booking a training sample's contribution (docs/design.md §7) are bounded:

* **update credit** (the paper's Figure 4: the influence accumulated over the window's updates):
  the first moment of each update carries every earlier step's gradient of every training sample
  (β₁ = 0.98: 0.98^k ≤ 1e-9 only at k ≈ 1030, so no truncation keeps the 1e-9 reconstruction).
  Every step up to the last window needs (a) a float64 forward pass of the 4000 training samples
  (the least any per-sample gradient costs), (b) the per-sample decoder gradients δ_i ⊗ h_i and
  (c) the per-sample moment update E ← β₁E + (1−β₁)G over [4000, D_layer]; every window step needs
  (d) the test rows' reverse pass (M test samples × 8 shared nodes, the rule the default picks on
  this model) and (e) the contraction [M, D_layer] × [D_layer, 4000].
* **gradient credit** (the window's gradients, through every later update): per-sample gradients
  only in the windows, but the test rows' reverse pass (d) at every step from the first window to
  the end of the run.

Every term is timed on its own, float64, one thread, at the most favourable shape: (d) is one
batched forward and backward of the M·8 rows at a shared θ (per-row gradients at per-sample
nodes cost more), (a) a no-grad forward. The recorded training is timed per step as the demo runs
it (float32, θ stored every 25 steps) and as exact Figures 4/5 need it (every step stored, and
float64: see :func:`training_per_step`); the floors use the latter. The run's length, windows and
the Table 1 / Figure 3a time are those of the default demo (``--demo-steps``, ``--tables-s``; the
defaults are bench/results/demo_grokking_cpu_epyc_malloc), assuming Table 1 and Figure 3a could
still run on its 25-step grid with every step stored.

    python bench/bench_figures45_floor.py      # writes bench/results/figures45_floor_cpu.json
"""
from __future__ import annotations

import argparse
import statistics
import tempfile

import torch

from explaind_fast.demos.common import train_recorded
from explaind_fast.demos.grokking import PRESETS, _windows, build
from explaind_fast.testing import benchmark as bm

NODES_PER_STEP = 8          # kinks:3 → soft activation patterns at 8 shared Gauss–Legendre nodes
BETA1 = PRESETS["cpu"].betas[0]


def _median(fn, repeats):
    return statistics.median(bm.time_call(fn, repeats=repeats, warmup=1))


def layer_terms(model, data, n_train, repeats):
    """Seconds per step of (a) the no-grad float64 forward of the training samples, and per layer
    (b) the per-sample gradients (outer products of δ_i and h_i, plus the bias) and (c) the
    per-sample moment update; {layer: D_layer}."""
    x = data.train_x[:n_train]
    with torch.no_grad():
        fwd = _median(lambda: model(x), repeats)
    out = {"forward_train_s": fwd, "layers": {}}
    for name, (rows, cols) in {"decoder": (model.decoder.weight.shape),
                               "linear 2": (model.mlp.linear2.weight.shape)}.items():
        d_layer = rows * cols + rows
        delta = torch.randn(n_train, rows, dtype=torch.float64)
        h = torch.randn(n_train, cols, dtype=torch.float64)
        G = torch.empty(n_train, d_layer, dtype=torch.float64)
        E = torch.zeros(n_train, d_layer, dtype=torch.float64)

        def grads():
            torch.mul(delta[:, :, None], h[:, None, :], out=G[:, :rows * cols].view(-1, rows, cols))
            G[:, rows * cols:] = delta

        def moment():
            E.mul_(BETA1).add_(G, alpha=1 - BETA1)
        out["layers"][name] = {"D_layer": d_layer, "per_sample_grads_s": _median(grads, repeats),
                               "moment_update_s": _median(moment, repeats)}
    return out


def test_terms(model, data, M, d_layers, n_train, repeats):
    """(d) one batched forward + backward of M·8 test rows (summed logits) and (e) per layer the
    contraction [M, D_layer] × [D_layer, n_train]."""
    rows = data.test_x[:M].repeat(NODES_PER_STEP, 1)

    def reverse():
        model.zero_grad(set_to_none=True)
        model(rows).sum().backward()
    out = {"test_rows_reverse_s": _median(reverse, repeats), "contraction_s": {}}
    for name, d in d_layers.items():
        A = torch.randn(M, d, dtype=torch.float64)
        B = torch.randn(d, n_train, dtype=torch.float64)
        out["contraction_s"][name] = _median(lambda: A @ B, repeats)
    return out


TRAINING_VARIANTS = (("float32", 25), ("float32", 1), ("float64", 1))


def training_per_step(steps, repeats, threads):
    """Seconds per step of the demo's recorded full-batch training (paper size) in each of
    :data:`TRAINING_VARIANTS` (dtype, checkpoint_every), interleaved, at ``threads`` (the demo
    trains with torch's default thread count). The demo trains in float32 with θ stored every
    25 steps; Figures 4/5 need every step stored and, to be exact, float64 (see
    :func:`recording_dtype_check`)."""
    cfg = PRESETS["cpu"]
    got = {v: [] for v in TRAINING_VARIANTS}
    bm.set_threads(threads)
    for _ in range(repeats):
        for dtype, k in TRAINING_VARIANTS:
            data, model, opt = build(cfg, "cpu", getattr(torch, dtype))
            with tempfile.TemporaryDirectory() as d:
                tr = train_recorded(model, opt, data.train_x, data.train_y, data.test_x,
                                    data.test_y, d, max_steps=steps, eval_every=cfg.eval_every,
                                    checkpoint_every=k, log=lambda s: None)
                got[(dtype, k)].append(tr.wall_s / steps)
    return {f"{dtype}_checkpoint_every_{k}_s": statistics.median(v)
            for (dtype, k), v in got.items()}


def recording_dtype_check(steps=15, n_test=4):
    """Why exact per-sample attributions need float64 training: a small grokking run (p = 23,
    200 training pairs) recorded in float32 and in float64, each attributed with data="sample",
    kinks:3, in float64. A float32 step was taken with float32 gradients, which the float64
    recomputation reproduces only to float32 rounding: the step identity (docs/design.md §9) and
    the certificate fail. Returns {dtype: {reconstruction_error, change_scale, certificate_ok}}."""
    import dataclasses
    import warnings

    from explaind_fast import attribute
    cfg = dataclasses.replace(PRESETS["cpu"], p=23, n_train=200, n_test=40, lr=1e-2,
                              stop_at_test_acc=None)
    out = {}
    for dtype in ("float32", "float64"):
        data, model, opt = build(cfg, "cpu", getattr(torch, dtype))
        with tempfile.TemporaryDirectory() as d:
            tr = train_recorded(model, opt, data.train_x, data.train_y, data.test_x,
                                data.test_y, d, max_steps=steps, log=lambda s: None)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                a = attribute(model.double(), tr.trajectory, data.test_x[:n_test],
                              train_data=(data.train_x, data.train_y), data="sample",
                              quadrature="kinks:3", output="logits", dtype=torch.float64,
                              progress=False)
        out[dtype] = {"reconstruction_error": float(a.reconstruction_error),
                      "change_scale": float((a.final - a.initial).abs().max()),
                      "certificate_ok": not a.certificate.get("problems")}
    return out


def floors(terms, M, n_steps, tables_s, train_step_s, layers):
    """Lower bounds (s) of the default demo with Figures 4/5 over ``layers`` for M test samples."""
    wins = _windows(n_steps, 3, None)
    in_windows = sum(b - a for a, b in wins)
    last_end, first_start = wins[-1][1], wins[0][0]
    lay = terms["layers"]
    t = terms["test"][M]
    per_sample_step = terms["forward_train_s"] + sum(
        lay[n]["per_sample_grads_s"] + lay[n]["moment_update_s"] for n in layers)
    contraction = sum(t["contraction_s"][n] for n in layers)
    base = n_steps * train_step_s + tables_s
    update = base + last_end * per_sample_step + in_windows * (t["test_rows_reverse_s"]
                                                               + contraction)
    grad_step = terms["forward_train_s"] + sum(lay[n]["per_sample_grads_s"] for n in layers)
    gradient = base + (n_steps - first_start) * t["test_rows_reverse_s"] + \
        in_windows * (grad_step + contraction)
    return {"test_samples": M, "layers": list(layers), "windows": wins,
            "training_and_tables_s": base, "update_credit_floor_s": update,
            "gradient_credit_floor_s": gradient}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--test", default="32,113", help="test-sample counts M (comma-separated)")
    ap.add_argument("--demo-steps", type=int, default=1040,
                    help="optimizer steps of the default demo's run (to grokking)")
    ap.add_argument("--tables-s", type=float, default=12.4,
                    help="the default demo's Table 1 + Figure 3a seconds (on its 25-step grid)")
    ap.add_argument("--train-steps", type=int, default=30, help="steps timed per training run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="figures45_floor_cpu.json",
                    help="results file (a bare name: bench/results/<name>); '' = none")
    args = ap.parse_args(argv)
    train_threads = torch.get_num_threads()             # torch's default: the demo trains so
    bm.set_threads(args.threads)
    env = bm.environment("cpu")
    print(bm.format_environment(env))
    cfg = PRESETS["cpu"]
    data, model, _ = build(cfg, "cpu", torch.float64)
    Ms = [int(m) for m in args.test.split(",") if m]
    terms = layer_terms(model, data, cfg.n_train, args.repeats)
    d_layers = {n: v["D_layer"] for n, v in terms["layers"].items()}
    terms["test"] = {M: test_terms(model, data, M, d_layers, cfg.n_train, args.repeats)
                     for M in Ms}
    train = training_per_step(args.train_steps, args.repeats, train_threads)
    bm.set_threads(args.threads)
    rec_check = recording_dtype_check()
    rows = [floors(terms, M, args.demo_steps, args.tables_s,
                   train["float64_checkpoint_every_1_s"], lays)
            for M in Ms for lays in (("decoder",), ("decoder", "linear 2"))]
    print(f"per step (float64, {args.threads} thread): forward of the {cfg.n_train} training "
          f"samples {terms['forward_train_s'] * 1e3:.1f} ms; "
          + "; ".join(f"{n}: per-sample gradients {v['per_sample_grads_s'] * 1e3:.1f} ms, moment "
                      f"update {v['moment_update_s'] * 1e3:.1f} ms" for n, v in
                      terms["layers"].items()))
    for M in Ms:
        t = terms["test"][M]
        print(f"M = {M}: test rows ({M}×{NODES_PER_STEP}) forward+backward "
              f"{t['test_rows_reverse_s'] * 1e3:.1f} ms; contraction "
              + ", ".join(f"{n} {v * 1e3:.1f} ms" for n, v in t["contraction_s"].items()))
    print(f"training per step (recorded, {train_threads} threads): "
          + ", ".join(f"{dt}, θ stored every {k}: {train[f'{dt}_checkpoint_every_{k}_s'] * 1e3:.1f} "
                      f"ms" for dt, k in TRAINING_VARIANTS)
          + " (the floors use float64, every step)")
    print("data='sample' attribution (float64, kinks:3) of a small run recorded in: "
          + "; ".join(f"{dt}: reconstruction error {v['reconstruction_error']:.1e} (change "
                      f"{v['change_scale']:.2f}), certificate {'ok' if v['certificate_ok'] else 'FAILED'}"
                      for dt, v in rec_check.items()))
    print("\n| test samples | layers | training + Table 1/Fig 3a s | update credit ≥ s | "
          "gradient credit ≥ s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['test_samples']} | {' + '.join(r['layers'])} | "
              f"{r['training_and_tables_s']:.0f} | {r['update_credit_floor_s']:.0f} | "
              f"{r['gradient_credit_floor_s']:.0f} |")
    if args.out:
        path = bm.write_results(args.out, rows, env=env, terms=terms, training=train,
                                training_threads=train_threads, recording_dtype=rec_check,
                                demo_steps=args.demo_steps, tables_s=args.tables_s,
                                nodes_per_step=NODES_PER_STEP)
        print(f"\nwrote {path}")
    return rows


if __name__ == "__main__":
    main()
