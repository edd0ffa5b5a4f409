"""Time (or cProfile) one attribution path in its own process, as bench_grokking_e2e.py calls it.

    python bench/profile_attribution_path.py SIZE {layers,params,decoder} RULE [STEPS]
    env: PROF=file.prof (cProfile), REPEAT=n (timed repeats), OUT_DIR (trajectory/results, default
    ./profile_runs), TAG (result file suffix). Used for bench/results/cpu_e2e.md.

Prints the environment row, each repeat's wall time, then one summary line: the process's max RSS
(getrusage, the whole process: inputs, trajectory and all runs), the wall time of the first call
plus the repeats (as before), the repeats' median (explaind_fast.testing.benchmark.summarize), and
the first call's CPU / system time and minor page faults (benchmark.measure).
"""
import cProfile
import os
import sys

import torch

from explaind_fast import Trajectory, attribute
from explaind_fast.demos.common import train_recorded
from explaind_fast.demos.data import modular_addition_data
from explaind_fast.demos.grokking import PRESETS
from explaind_fast.demos.models import TRANSFORMER_LAYERS, ModularAdditionTransformer
from explaind_fast.testing import benchmark as bm


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    size, which, rule = argv[0], argv[1], argv[2]
    steps = int(argv[3]) if len(argv) > 3 else None
    print(bm.format_environment(bm.environment()), flush=True)
    cfg = PRESETS[size].with_overrides(max_steps=steps)
    dtype = getattr(torch, cfg.dtype)
    data = modular_addition_data(cfg.p, cfg.n_train, cfg.n_test, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    model = ModularAdditionTransformer(cfg.p, cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp,
                                       act=cfg.act).to(dtype)
    out_dir = os.environ.get("OUT_DIR", "profile_runs")
    d = os.path.join(out_dir, f"traj_{size}_{steps}")
    if not os.path.exists(d):
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas,
                                weight_decay=cfg.weight_decay)
        train_recorded(model, opt, data.train_x, data.train_y, data.test_x, data.test_y, d,
                       max_steps=cfg.max_steps, seed=cfg.seed, log=lambda s: None)
    traj = Trajectory.load(d)
    M = cfg.attr_test
    vx = data.test_x
    common = dict(quadrature=rule, output="logits", progress=False, dtype=dtype)
    if which == "layers":
        def fn():
            return attribute(model, traj, vx[:M], params=TRANSFORMER_LAYERS, data="all",
                             steps="each", **common)
    elif which == "params":
        def fn():
            return attribute(model, traj, vx[:8], params="parameter", data="all", steps="all",
                             **common)
    else:
        N = traj.num_steps
        common["output"] = torch.ones(1, model.vocab, dtype=dtype)

        def fn():
            return attribute(model, traj, vx[:M], train_data=(data.train_x, data.train_y),
                             params={"decoder": ["decoder.*"]}, data="sample",
                             steps=[0, N], credit="update", **common)
    prof = os.environ.get("PROF")
    with bm.measure() as first:
        if prof:
            pr = cProfile.Profile()
            pr.enable()
            a = fn()
            pr.disable()
            pr.dump_stats(prof)
        else:
            a = fn()
    repeats = []
    if not prof:
        for _ in range(int(os.environ.get("REPEAT", "0"))):
            with bm.measure() as m:
                a = fn()
            repeats.append(m.wall_s)
            print("repeat wall", round(m.wall_s, 3), flush=True)
    total = first.wall_s + sum(repeats)
    median = f" repeat_median {bm.summarize(repeats)['median_s']:.3f}" if repeats else ""
    last = m if repeats else first  # max RSS at the end of the last call: the process's peak
    print(which, rule, "maxrss_MiB", last.max_rss_bytes // 2**20, "wall", round(total, 2), "recon", float(a.reconstruction_error),
          "plan", a.plan["mode"], f"first_cpu_s {first.cpu_s:.2f} first_system_s {first.system_s:.2f}"
          f" first_minor_faults {first.minor_faults}" + median, flush=True)
    torch.save({"kernel": a.kernel, "reg": a.reg},
               os.path.join(out_dir, f"res_{size}_{which}_{rule}_{os.environ.get('TAG', 'x')}.pt"))


if __name__ == "__main__":
    main()
