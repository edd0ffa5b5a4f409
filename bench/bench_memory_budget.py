"""memory_budget against measured peak memory: the planner's estimate, the budget and what one
attribute() call really takes on top of its inputs, over attribution paths and budgets.

    python bench/bench_memory_budget.py                 # the issue's MLP (1.86M float32 params)
    python bench/bench_memory_budget.py --quick         # a small MLP (a smoke run)
    python bench/bench_memory_budget.py --json memory_budget_cpu.json
    python bench/bench_memory_budget.py --hidden 512,1024,2048 --budgets 128,512   # shape grid

Each case records a short run (SGD-momentum, 2 mini-batches of 64; 4 test samples, 10 logits) of a
784-h-h-10 ReLU MLP (h = 1024 by default: D = 1.86M),
then measures one attribute() call in a fresh process (peak_memory_subprocess: RSS high-water mark
minus the RSS before the call on the CPU, torch.cuda.max_memory_allocated on CUDA). The estimate is
the plan's ``estimates[mode]["peak_bytes"]`` (attribution/planner.py, docs/design.md §10) plus the
result buffers b·(S·G·(P+1)·M·K + N·M·K). Columns:

    measured / (budget + result)   ≤ 1 when the budget is honoured (plus a constant: torch's
                                   per-call overhead, a few MB, shown by the smallest cases)
    measured / estimate            the planner's accuracy (1.0 = exact)

The rule is gauss-legendre:2 (or the kink search, kinks:3, in the "kinks" rows) so that memory,
not the rule, is what varies.
"""
from __future__ import annotations

import argparse
import tempfile
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from explaind_fast.testing import benchmark as bm

#: (name, attribute keyword arguments); params="module" (3 groups), steps="each"
CASES = [
    ("forward data=all", dict(mode="forward", data="all")),
    ("reverse data=all", dict(mode="reverse", data="all")),
    ("forward data=label update", dict(mode="forward", data="label", credit="update")),
    ("reverse data=label update", dict(mode="reverse", data="label", credit="update")),
    ("reverse data=sample gradient", dict(mode="reverse", data="sample", credit="gradient",
                                          steps="all")),
    ("kinks forward data=all", dict(mode="forward", data="all", quadrature="kinks:3")),
]
BUDGETS_MIB = [64, 256]


def _shapes(quick, hidden=1024):
    return (64, 128, 10) if quick else (784, hidden, 10)


def _model(quick, seed=0, hidden=1024):
    d_in, hidden, d_out = _shapes(quick, hidden)
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, d_out))


def _problem(quick, directory, hidden=1024):
    """Records the run into ``directory``; returns (model, trajectory, test X, train data)."""
    from explaind_fast import Trajectory
    from explaind_fast.testing.runs import train_recorded
    d_in, _, d_out = _shapes(quick, hidden)
    g = torch.Generator().manual_seed(1)
    n, m, steps, batch = 256, 4, 2, 64
    X = torch.randn(n, d_in, generator=g)
    Y = torch.randint(0, d_out, (n,), generator=g)
    Xt = torch.randn(m, d_in, generator=g)
    model = _model(quick, hidden=hidden)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    batches = [torch.randperm(n, generator=g)[:batch] for _ in range(steps)]
    train_recorded(model, opt, directory, X, Y, batches, loss=F.cross_entropy)
    return model, Trajectory.load(directory), Xt, (X, Y)


def _kwargs(name, budget_mib, train):
    kw = dict(dict(CASES)[name])
    kw.setdefault("quadrature", "gauss-legendre:2")
    kw.setdefault("steps", "each")
    kw.update(params="module", memory_budget=budget_mib * 2 ** 20, progress=False)
    if kw["data"] != "all":
        kw["train_data"] = train
    return kw


def _setup(quick, name, budget_mib, hidden=1024):
    """Child process: record, warm up on the small problem (the first call imports and
    initialises torch.func, the op library and the rest once, a few hundred MB that are not the
    call's work; a warm-up at the measured size would instead leave freed memory to reuse and
    under-count), then build the measured call."""
    from explaind_fast import attribute
    warnings.simplefilter("ignore")  # gauss-legendre:2 is not exact on ReLU: its certificate warns
    small = tempfile.mkdtemp(prefix="bench-memory-")
    model, traj, Xt, train = _problem(True, small)
    attribute(model, traj, Xt, **_kwargs(name, budget_mib, train))
    directory = tempfile.mkdtemp(prefix="bench-memory-")
    model, traj, Xt, train = _problem(quick, directory, hidden)
    kw = _kwargs(name, budget_mib, train)
    return lambda: attribute(model, traj, Xt, **kw)


def _estimate(quick, name, budget_mib, hidden=1024):
    """The planner's peak estimate and the result buffers' bytes, from prepare() alone."""
    from explaind_fast.attribution.problem import prepare
    with tempfile.TemporaryDirectory() as directory:
        model, traj, Xt, train = _problem(quick, directory, hidden)
        kw = _kwargs(name, budget_mib, train)
        kw.pop("progress")
        pb = prepare(model, traj, Xt, **kw)
        b = torch.empty(0, dtype=pb.dtype).element_size()
        result = b * (pb.S * pb.G * (pb.P + 1) * pb.M * pb.K + pb.N * pb.M * pb.K)
        return pb.plan.mode, pb.plan.estimates[pb.plan.mode]["peak_bytes"], result


def run(quick=False, budgets=BUDGETS_MIB, cases=None, hiddens=(1024,)):
    rows = []
    for hidden in hiddens:
        h = _shapes(quick, hidden)[1]
        D = sum(p.numel() for p in _model(quick, hidden=hidden).parameters())
        for name, _ in CASES:
            if cases and not any(c in name for c in cases):
                continue
            for budget in budgets:
                row = dict(case=name, hidden=h, D=D, budget_mib=budget)
                try:
                    mode, est, result = _estimate(quick, name, budget, hidden)
                except ValueError as e:   # a budget the path cannot keep is refused up front
                    rows.append(dict(row, refused=str(e)))
                    continue
                peak = bm.peak_memory_subprocess(_setup, quick, name, budget, hidden)
                measured = peak["peak_extra_bytes"]
                rows.append(dict(row, mode=mode, estimate_bytes=int(est),
                                 result_bytes=int(result), measured_bytes=int(measured),
                                 method=peak["method"],
                                 measured_over_budget_plus_result=measured / (budget * 2 ** 20
                                                                              + result),
                                 measured_over_estimate=measured / max(est + result, 1)))
    return rows


def _table(rows):
    mib = 2 ** 20
    lines = ["| case | D | budget MiB | mode | estimate MiB | result MiB | measured MiB | "
             "measured/(budget+result) | measured/estimate |", "|" + "---|" * 9]
    for r in rows:
        if "refused" in r:
            minimum = r["refused"].split("this attribution in ")[-1].split(": every")[0]
            lines.append(f"| {r['case']} | {r['D']:,} | {r['budget_mib']} | refused: minimum "
                         f"{minimum} |" + " |" * 5)
            continue
        lines.append(f"| {r['case']} | {r['D']:,} | {r['budget_mib']} | {r['mode']} | "
                     f"{(r['estimate_bytes'] + r['result_bytes']) / mib:.1f} | "
                     f"{r['result_bytes'] / mib:.2f} | {r['measured_bytes'] / mib:.1f} | "
                     f"{r['measured_over_budget_plus_result']:.2f} | "
                     f"{r['measured_over_estimate']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small MLP instead of 1.86M params")
    ap.add_argument("--json", default=None, help="write the rows to bench/results/<name>")
    ap.add_argument("--budgets", default=",".join(map(str, BUDGETS_MIB)),
                    help="comma-separated budgets in MiB")
    ap.add_argument("--hidden", default="1024",
                    help="comma-separated hidden widths of the MLP (the grid of shapes)")
    ap.add_argument("--cases", default=None,
                    help="comma-separated substrings of the case names to run (default: all)")
    args = ap.parse_args(argv)
    bm.set_threads(1)
    rows = run(args.quick, [int(b) for b in args.budgets.split(",")],
               args.cases.split(",") if args.cases else None,
               [int(h) for h in args.hidden.split(",")])
    print(bm.format_environment(bm.environment()))
    print(_table(rows))
    if args.json:
        print("wrote", bm.write_results(args.json, rows, quick=args.quick))
    return rows


if __name__ == "__main__":
    main()
