"""What the exact (kink-aware) rule costs against fixed rules, in wall time, CPU time, system time
and page faults (measurement, not a test).

Cases (float64, recorded once per run, then every rule attributes the same trajectory):

* ``grokking``: the grokking demo's former CPU size (explaind_fast.demos.grokking PRESETS["cpu"]
  with p, data, lr and steps pinned: the paper's architecture — d_model 64, 4 heads of 16, MLP
  512, ReLU — at p = 23, 230 training pairs, lr 1e-2, 24 full-batch AdamW steps, 8 test
  samples, all 25 logits), in two settings: ``table1``
  (the demo's Table 1 analogue: params, data and steps summed) and ``layers`` (bench_grokking_e2e's
  layers x steps run: the paper's six layers, steps="each"). Baseline: midpoint:10.
* ``cnn``: a ReLU + max-pool CNN with BatchNorm (DigitsCNN's layout with a BatchNorm2d after each
  convolution, eval mode while training and attributing), scikit-learn digits, 512 training
  images, batch 128, AdamW with the digits demo's settings (lr 0.02, betas (0.7, 0.9), weight
  decay 0.1), 16 steps, 8 test images, params/data summed, steps="each", logits. Baseline:
  gauss-legendre:8. ``--cnn-lr`` changes the learning rate (more kinks per step).

Each rule runs ``--repeats`` times, interleaved (A B A B ...), after one warm-up attribution;
medians are reported, with the ratio to the case's baseline (wall and user + system CPU), system
time over user time, minor page faults (explaind_fast.testing.benchmark.measure), the worst
per-step relative quadrature residual and the mean nodes per step (per-sample rules: the widest
sample), the seconds spent choosing nodes (:func:`node_search_timer`: the kink search) and the
time outside that search over the baseline's whole wall time — what the rule would cost with a
free search. ``kinks:3`` and ``auto`` (the default of attribute()) are the exact rules.

    python bench/bench_kinks_speed.py                        # both cases, 3 repeats
    python bench/bench_kinks_speed.py --case grokking --repeats 5 --threads 2
    python bench/bench_kinks_speed.py --case grokking --threads 1 --node-batch 16,32   # A/B
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from explaind_fast.testing import benchmark as bm


class BNDigitsCNN(nn.Module):
    """DigitsCNN (explaind_fast.demos.models) with a BatchNorm2d after each convolution."""

    def __init__(self, channels1: int = 8, channels2: int = 16, hidden: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels1, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels1)
        self.conv2 = nn.Conv2d(channels1, channels2, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(channels2)
        self.linear1 = nn.Linear(channels2 * 4, hidden)
        self.linear2 = nn.Linear(hidden, 10)

    def forward(self, x):
        x = F.relu(F.max_pool2d(self.bn1(self.conv1(x)), 2))
        x = F.relu(F.max_pool2d(self.bn2(self.conv2(x)), 2))
        return self.linear2(F.relu(self.linear1(x.flatten(1))))


def build_grokking(directory):
    import dataclasses

    from explaind_fast.demos.common import train_recorded
    from explaind_fast.demos.grokking import PRESETS, build
    # the size this bench documents (the demo's "cpu" preset has since become the paper's size,
    # trained to grokking: minutes of training before any rule runs)
    cfg = dataclasses.replace(PRESETS["cpu"], p=23, n_train=230, n_test=46, lr=1e-2, max_steps=24,
                              stop_at_test_acc=None, attr_test=8)
    data, model, opt = build(cfg, torch.device("cpu"), torch.float64)
    tr = train_recorded(model, opt, data.train_x, data.train_y, data.test_x, data.test_y,
                        directory, max_steps=cfg.max_steps, seed=cfg.seed, log=lambda s: None)
    return model, tr.trajectory, data.test_x[:cfg.attr_test], cfg


def build_cnn(directory, lr=0.02, steps=16, n_test=8, seed=0):
    from explaind_fast.demos.common import train_recorded
    from explaind_fast.demos.data import digits_data
    torch.manual_seed(seed)
    data = digits_data(n_train=512, n_test=n_test, dtype=torch.float64)
    model = BNDigitsCNN().double().eval()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.7, 0.9), weight_decay=0.1)
    tr = train_recorded(model, opt, data.train_x, data.train_y, data.test_x, data.test_y,
                        directory, max_steps=steps, batch_size=128, seed=seed,
                        log=lambda s: None)
    return model, tr.trajectory, data.test_x[:n_test]


def _run(model, traj, X, rule, kw):
    from explaind_fast import attribute
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # fixed rules fail their certificate here
        return attribute(model, traj, X, output="logits", progress=False,
                         **({} if rule == "default" else {"quadrature": rule}), **kw)


@contextlib.contextmanager
def node_search_timer():
    """Seconds spent choosing each step's quadrature nodes (Accumulator.nodes / .refine: the kink
    search of kinks:n, the refinement of adaptive rules; nothing for fixed rules) while the block
    runs: yields a one-element list holding the running total. The rest of an attribution is the
    evaluations at the chosen nodes and the contraction."""
    from explaind_fast.attribution.accumulator import Accumulator
    total = [0.0]
    originals = {name: getattr(Accumulator, name) for name in ("nodes", "refine")}

    def timed(fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                total[0] += time.perf_counter() - t0
        return wrapper
    for name, fn in originals.items():
        setattr(Accumulator, name, timed(fn))
    try:
        yield total
    finally:
        for name, fn in originals.items():
            setattr(Accumulator, name, fn)


def measure_rules(model, traj, X, rules, kw, repeats, node_batches=()):
    """Each rule ``repeats`` times, interleaved; with ``node_batches`` (MiB) each rule at each value
    of the planner's NODE_BATCH_BYTES, rows named "rule @ 16MiB"."""
    variants = bm.node_batch_variants(rules, node_batches)
    _run(model, traj, X, rules[0], kw)                                 # warm-up
    got = {name: [] for name, _, _ in variants}
    last = {}
    for _ in range(repeats):
        for name, r, mib in variants:
            with bm.node_batch_cap(mib), node_search_timer() as search, bm.measure() as m:
                last[name] = _run(model, traj, X, r, kw)
            got[name].append((m, search[0]))
    rows = []
    for r in got:
        ms, a = [m for m, _ in got[r]], last[r]
        med = lambda f: statistics.median(f(m) for m in ms)            # noqa: E731
        search = statistics.median(t for _, t in got[r])
        user, sys_ = med(lambda m: m.user_s), med(lambda m: m.system_s)
        rows.append({"rule": r, "chosen": a.quadrature,
                     "wall_s": med(lambda m: m.wall_s), "user_s": user, "system_s": sys_,
                     "cpu_s": med(lambda m: m.user_s + m.system_s),
                     "system_over_user": sys_ / max(user, 1e-9),
                     "minor_faults": med(lambda m: m.minor_faults),
                     "wall_all_s": [m.wall_s for m in ms],
                     "node_search_s": search,
                     "outside_search_s": med(lambda m: m.wall_s) - search,
                     "max_step_residual_rel": float(a.step_residual_relative.max()),
                     "reconstruction_error": float(a.reconstruction_error),
                     "nodes_per_step": float(a.evaluations["quadrature_nodes"].double().mean())})
    return rows


def _print(title, rows, baseline):
    base = next(r for r in rows if r["rule"] == baseline)
    print(f"\n## {title} (baseline {baseline})")
    print("| rule | wall s | x base (wall) | CPU s | x base (CPU) | sys/user | minor faults | "
          "max step rel. residual | nodes/step | node search s | outside search: x base wall |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        r["wall_over_baseline"] = r["wall_s"] / base["wall_s"]
        r["cpu_over_baseline"] = r["cpu_s"] / base["cpu_s"]
        r["outside_search_over_baseline_wall"] = r["outside_search_s"] / base["wall_s"]
        print(f"| {r['rule']} | {r['wall_s']:.2f} | {r['wall_over_baseline']:.2f} | "
              f"{r['cpu_s']:.2f} | {r['cpu_over_baseline']:.2f} | {r['system_over_user']:.1%} | "
              f"{r['minor_faults']:.0f} | {r['max_step_residual_rel']:.1e} | "
              f"{r['nodes_per_step']:.1f} | {r['node_search_s']:.2f} | "
              f"{r['outside_search_over_baseline_wall']:.2f} |", flush=True)
    for r in rows:
        if r["rule"] in ("auto", "default"):
            print(f"# {r['rule']} chose: {r['chosen']}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", default="both", choices=["grokking", "cnn", "both"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--cnn-lr", type=float, default=0.02)
    ap.add_argument("--grokking-rules", default="midpoint:10,kinks:3,auto")
    ap.add_argument("--cnn-rules", default="gauss-legendre:8,kinks:3,auto")
    ap.add_argument("--node-batch", default="",
                    help="comma-separated values of the planner's NODE_BATCH_BYTES in MiB: every "
                         "rule at each, interleaved (A/B); '' = the planner's")
    ap.add_argument("--out", default="kinks_speed_cpu.json",
                    help="results file (a bare name: bench/results/<name>); '' = none")
    args = ap.parse_args(argv)
    bm.set_threads(args.threads)
    env = bm.environment()
    print(bm.format_environment(env))
    result = {"repeats": args.repeats}
    batches = [int(b) for b in args.node_batch.split(",") if b]
    with tempfile.TemporaryDirectory() as tmp:
        if args.case in ("grokking", "both"):
            from explaind_fast.demos.models import TRANSFORMER_LAYERS
            model, traj, X, cfg = build_grokking(f"{tmp}/grokking")
            rules = [r for r in args.grokking_rules.split(",") if r]
            head = (f"grokking CPU preset: p={cfg.p}, D={traj.layout.D}, {traj.num_steps} steps, "
                    f"{len(X)} test samples x {model.vocab} logits, float64")
            for name, kw in (("table1", dict(params="all", data="all", steps="all")),
                             ("layers", dict(params=TRANSFORMER_LAYERS, data="all",
                                             steps="each"))):
                rows = measure_rules(model, traj, X, rules, kw, args.repeats, batches)
                _print(f"{head}, {name} setting", rows, rows[0]["rule"])
                result[f"grokking_{name}"] = rows
        if args.case in ("cnn", "both"):
            model, traj, X = build_cnn(f"{tmp}/cnn", lr=args.cnn_lr)
            rules = [r for r in args.cnn_rules.split(",") if r]
            rows = measure_rules(model, traj, X, rules, dict(params="all", data="all",
                                                             steps="each"), args.repeats, batches)
            from explaind_fast.quadrature.kinks import find_kinks
            pieces = []
            for s in range(traj.num_steps):
                th = traj.theta(s, dtype=torch.float64)
                k = find_kinks(model, traj.layout, th, traj.theta(s + 1, dtype=torch.float64) - th,
                               X, warn=False)
                pieces.append(float(k.pieces.double().mean()))
            _print(f"ReLU + max-pool + BatchNorm(eval) CNN: D={traj.layout.D}, "
                   f"{traj.num_steps} steps, {len(X)} test images, AdamW lr {args.cnn_lr}, "
                   f"{statistics.mean(pieces):.1f} smooth pieces per sample-step "
                   f"(max {max(pieces):.1f})", rows, rows[0]["rule"])
            result["cnn"] = rows
            result["cnn_pieces_per_sample_step"] = pieces
    if args.out:
        print(f"wrote {bm.write_results(args.out, result, env=env)}")
    return result


if __name__ == "__main__":
    main()
