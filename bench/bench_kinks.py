"""Kink-aware quadrature vs fixed and adaptive rules on ReLU models (measurement, not a test).

For the grokking transformer (ReLU MLP) and DigitsCNN (ReLU + max-pool), trained a few recorded
float64 steps, every rule runs the engine (attribute, params/data "all", steps "each", logits)
and reports: per-step relative quadrature residual (max over test rows, then max / median over
steps), the reconstruction error relative to the total change, gradient evaluations per test
sample and step (quadrature nodes; per-sample kink rules: the mean count of non-padding nodes,
and the padded width Q the engine evaluates), and wall time (kink search shown separately).

    python bench/bench_kinks.py                      # CPU sizes, both models
    python bench/bench_kinks.py --model transformer --full --out kinks_full.json

Kink rules run as engine callables so their statistics can be recorded: "kinks:n" is the same
function (explaind_fast.quadrature.kinks.kink_nodes); "kinks:n/common" uses one shared rule on the union of
the batch's breakpoints (the alternative the issue asks to compare); "kinks:n/taper" gives short
pieces fewer nodes (kinks.nodes_per_piece with TAPER_RHO). The adaptive rule is capped at 32
intervals (128 nodes) per step to bound the run time. Timing: explaind_fast.testing.benchmark.measure;
the JSON (--out) carries the environment row.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile

import torch

from explaind_fast import attribute
from explaind_fast.quadrature.kinks import TAPER_RHO, find_kinks, nodes_from_breakpoints
from explaind_fast.testing import benchmark as bm

DEFAULT_RULES = ("midpoint:10,midpoint:100,gauss-legendre:4,adaptive:1e-10,kinks:2,kinks:3,"
                 "kinks:3/taper,kinks:3/common")


def build(name, full, steps, n_test, seed=0):
    from explaind_fast.demos.common import train_recorded
    from explaind_fast.demos.data import digits_data, modular_addition_data
    from explaind_fast.demos.models import DigitsCNN, ModularAdditionTransformer
    torch.manual_seed(seed)
    if name == "transformer":
        if full:
            data = modular_addition_data(113, n_train=4000, n_test=max(n_test, 1))
            model = ModularAdditionTransformer(p=113)
        else:
            data = modular_addition_data(31, n_train=300, n_test=n_test)
            model = ModularAdditionTransformer(p=31, d_model=32, n_heads=4, d_head=8, d_mlp=128)
        opt_kw = dict(lr=1e-3, weight_decay=1.0, betas=(0.98, 0.99))
        batch = None
    else:
        data = digits_data(n_train=512, n_test=n_test, dtype=torch.float64)
        model = DigitsCNN()
        opt_kw = dict(lr=1e-2, weight_decay=0.1, betas=(0.7, 0.9))   # paper's MNIST CNN
        batch = 256
    model = model.double()
    opt = torch.optim.AdamW(model.parameters(), **opt_kw)
    directory = tempfile.mkdtemp(prefix=f"bench_kinks_{name}_")
    tr = train_recorded(model, opt, data.train_x, data.train_y, data.test_x, data.test_y,
                        directory, max_steps=steps, batch_size=batch, log=lambda s: None)
    return model, tr.trajectory, data.test_x[:n_test]


class KinkRule:
    """Engine quadrature callable wrapping the kink search, recording its statistics."""

    def __init__(self, model, layout, X, n, common, taper):
        self.model, self.layout, self.X, self.n, self.common = model, layout, X, n, common
        self.taper = taper
        self.nodes, self.width, self.pieces, self.search_s, self.row_evals = [], [], [], 0.0, 0
        self.unseen = set()

    def __call__(self, s, theta_s, delta_s):
        with bm.measure() as m:
            k = find_kinks(self.model, self.layout, theta_s, delta_s, self.X, warn=False)
            ns = nodes_from_breakpoints(k.breakpoints, self.n, common=self.common, taper=self.taper)
        self.search_s += m.wall_s
        self.row_evals += k.row_evals
        self.unseen |= set(k.unseen)
        self.pieces.append(float(k.pieces.double().mean()))
        self.nodes.append(float((ns.w != 0).sum(-1).double().mean()) if not self.common
                          else float(ns.t.numel()))
        self.width.append(int(ns.t.shape[-1]))
        return ns


def run_rule(model, traj, X, rule, mode):
    spec, stats = rule, None
    if rule.startswith("kinks:"):
        n = int(rule.split(":")[1].split("/")[0])
        stats = KinkRule(model, traj.layout, X, n, common=rule.endswith("/common"),
                         taper=TAPER_RHO if rule.endswith("/taper") else None)
        spec = stats
    with bm.measure() as m:
        a = attribute(model, traj, X, params="all", data="all", steps="each", output="logits",
                      quadrature=spec, mode=mode, progress=False, max_intervals=32)
    wall = m.wall_s
    rel = a.step_residual_relative.double()
    change = float((a.final - a.initial).abs().max())
    row = {"rule": rule, "step_rel_max": float(rel.max()), "step_rel_median": float(rel.median()),
           "recon_rel": a.reconstruction_error / change, "wall_s": wall, "cpu_s": m.cpu_s}
    nodes = a.evaluations["quadrature_nodes"].double()
    if stats is None:
        row["grad_evals"] = float(nodes.mean())
        row["padded_Q"] = float(nodes.mean())
    else:
        row["grad_evals"] = statistics.mean(stats.nodes)
        row["padded_Q"] = statistics.mean(stats.width)
        row["pieces"] = statistics.mean(stats.pieces)
        row["search_s"] = stats.search_s
        row["search_row_evals_per_sample_step"] = stats.row_evals / (len(stats.nodes) * len(X))
        row["unseen"] = sorted(stats.unseen)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="both", choices=["transformer", "cnn", "both"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--test", type=int, default=64)
    ap.add_argument("--rules", default=DEFAULT_RULES)
    ap.add_argument("--mode", default="forward", choices=["forward", "reverse", "auto"])
    ap.add_argument("--full", action="store_true", help="paper-size transformer (p=113, MLP 512)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--out", default=None,
                    help="write the rows as JSON here (a bare file name: bench/results/<name>)")
    args = ap.parse_args(argv)
    bm.set_threads(args.threads)
    env = bm.environment()
    print(bm.format_environment(env))
    results = {}
    names = ["transformer", "cnn"] if args.model == "both" else [args.model]
    for name in names:
        model, traj, X = build(name, args.full, args.steps, args.test)
        print(f"\n## {name}{' (full size)' if args.full and name == 'transformer' else ''}: "
              f"D={traj.layout.D}, {traj.num_steps} steps, {len(X)} test samples, float64, "
              f"mode={args.mode}")
        print("| rule | max step rel. residual | median | reconstruction rel. error | grad evals "
              "/ sample·step | padded Q | pieces | wall s (kink search) |")
        print("|---|---|---|---|---|---|---|---|")
        rows = []
        for rule in [r for r in args.rules.split(",") if r]:
            row = run_rule(model, traj, X, rule, args.mode)
            rows.append(row)
            print(f"| {rule} | {row['step_rel_max']:.1e} | {row['step_rel_median']:.1e} | "
                  f"{row['recon_rel']:.1e} | {row['grad_evals']:.1f} | {row['padded_Q']:.1f} | "
                  f"{row.get('pieces', float('nan')):.2f} | {row['wall_s']:.1f}"
                  + (f" ({row['search_s']:.1f})" if "search_s" in row else "") + " |", flush=True)
        results[name] = rows
    if args.out:
        print(f"wrote {bm.write_results(args.out, results, env=env)}")
    return results


if __name__ == "__main__":
    main()
