"""Recording overhead and bytes on disk per step, on the paper's modular-addition transformer.

Setting (docs/design.md §11): ModularAdditionTransformer (p = 113, d_model 64, 4 heads of 16, MLP 512,
D = 97,331), full-batch AdamW over 4000 samples, lr 1e-3, weight decay 4.0, betas (0.98, 0.99).
Measures, per training step, on the CPU:

* bare:      zero_grad + forward + loss + backward + optimizer.step()
* recorded:  the same with a TrajectoryRecorder attached (set_batch + hooks + writing the step);
             with fsync (default, survives power loss), without (survives a killed process), and
             with fsync on a background thread (write_behind=True)
* hooks:     the time spent inside the recorder's own hooks (pre: checks; post: flatten, hash, write)

Bare and recorded steps are interleaved (ABAB…) so that drift on a shared machine hits both alike.
Reports median and p20/p80 in ms, the overhead relative to the bare step, and bytes on disk per
stored step (tensor file + log line), against the 2·D·itemsize of θ and v alone.

    python bench/bench_recording.py --steps 20 --dtype float32 [--out recording_cpu.json]

Timing: explaind_fast.testing.benchmark.measure (perf_counter wall, process_time CPU, getrusage
system CPU and page faults per step); median and p20/p80: benchmark.summarize.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile

import torch
import torch.nn.functional as F
from safetensors import safe_open

from explaind_fast.demos.data import modular_addition_data
from explaind_fast.demos.models import ModularAdditionTransformer
from explaind_fast.recording import TrajectoryRecorder
from explaind_fast.store import LOG, Trajectory
from explaind_fast.testing import benchmark as bm


def quantiles(seconds):
    """median / p20 / p80 in ms (explaind_fast.testing.benchmark.summarize)."""
    return bm.summarize(seconds, unit="ms")


class Run:
    """One model + optimizer (+ recorder) taking full-batch steps."""

    def __init__(self, data, dtype, directory=None, fsync=True, write_behind=False):
        torch.manual_seed(0)
        self.model = ModularAdditionTransformer().to(dtype)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=4.0,
                                     betas=(0.98, 0.99))
        self.x, self.y = data.train_x, data.train_y
        self.idx = torch.arange(len(self.x))
        self.rec = None
        self.hook_s = []
        if directory is not None:
            self.rec = TrajectoryRecorder(self.model, self.opt, directory,
                                          dataset_size=len(self.x), fsync=fsync,
                                          write_behind=write_behind)
            self._instrument()

    def _instrument(self):
        rec, times = self.rec, self.hook_s
        for name in ("_pre_hook", "_post_hook"):
            inner = getattr(rec, name)

            def timed(*a, _inner=inner):
                m = bm.measure()
                try:
                    with m:
                        return _inner(*a)
                finally:
                    times.append((m.result.wall_s, m.result.cpu_s))
            setattr(rec, name, timed)
        # the step hooks (the first two handles) were registered with the bound methods:
        # re-register the timed ones (the per-parameter gradient-norm hooks stay: their cost shows
        # in the recorded step time, not in 'hooks')
        for h in rec._handles[:2]:
            h.remove()
        rec._handles[:2] = [self.opt.register_step_pre_hook(rec._pre_hook),
                            self.opt.register_step_post_hook(rec._post_hook)]

    def step(self):
        """The bm.Measurement of one training step (wall, CPU of all threads, user / system CPU,
        page faults)."""
        with bm.measure() as m:
            if self.rec is not None:
                self.rec.set_batch(self.idx)
            self.opt.zero_grad()
            F.cross_entropy(self.model(self.x), self.y).backward()
            self.opt.step()
        return m


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--verify", action="store_true", help="also replay the recorded trajectory")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--out", default=None,
                    help="write the JSON result here (a bare file name: bench/results/<name>)")
    args = ap.parse_args(argv)
    bm.set_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    data = modular_addition_data()
    root = tempfile.mkdtemp(prefix="bench_recording_")
    runs = {"bare": Run(data, dtype),
            "recorded_fsync": Run(data, dtype, os.path.join(root, "fsync"), fsync=True),
            "recorded_nofsync": Run(data, dtype, os.path.join(root, "nofsync"), fsync=False),
            "recorded_fsync_behind": Run(data, dtype, os.path.join(root, "behind"), fsync=True,
                                         write_behind=True)}
    times = {k: [] for k in runs}
    for i in range(args.warmup + args.steps):
        for name, run in runs.items():
            t = run.step()
            if i >= args.warmup:
                times[name].append(t)
    recorded = [n for n in runs if n != "bare"]
    for name in recorded:
        runs[name].rec.close()

    D = runs["recorded_fsync"].rec.layout.D
    d = os.path.join(root, "fsync")
    step_files = sorted(n for n in os.listdir(d) if n.startswith("step_"))
    log_bytes = os.path.getsize(os.path.join(d, LOG))
    per_step = (sum(os.path.getsize(os.path.join(d, n)) for n in step_files) + log_bytes) / len(
        step_files)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    env = bm.environment()
    result = {
        "environment": env, "threads": env["torch_threads"], "load_avg_1min": env["load_average"][0],
        "dtype": args.dtype, "D": D, "batch": len(data.train_x), "steps": args.steps,
    }
    for name, run in runs.items():
        ms = times[name]
        result[name] = {"wall": quantiles([m.wall_s for m in ms]), "cpu": quantiles([m.cpu_s for m in ms]),
                        "system_cpu": quantiles([m.system_s for m in ms]),
                        "minor_faults_median": sorted(m.minor_faults for m in ms)[len(ms) // 2]}
        if run.rec is not None:
            pairs = list(zip(run.hook_s[0::2], run.hook_s[1::2]))[args.warmup:]
            result[name]["hooks_wall"] = quantiles([a[0] + b[0] for a, b in pairs])
            result[name]["hooks_cpu"] = quantiles([a[1] + b[1] for a, b in pairs])
    # recording must not perturb training: the recorded runs end where the bare run ends
    bare_params = list(runs["bare"].model.parameters())
    result["recorded_equals_bare"] = all(
        all(torch.equal(a, b) for a, b in zip(bare_params, runs[n].model.parameters()))
        for n in recorded)
    if args.verify:
        report = Trajectory.load(d).verify(runs["recorded_fsync"].model)
        result["verify_max_theta_error"] = report.max_theta_error
        result["verify_max_moment_error"] = report.max_moment_error
    result["bytes_per_step"] = per_step
    result["bytes_theta_and_v"] = 2 * D * itemsize
    with safe_open(os.path.join(d, step_files[-1]), framework="pt") as f:
        result["bytes_batch"] = sum(f.get_tensor(k).nbytes for k in f.keys()
                                    if k.startswith("batch_"))
    shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result, indent=1))
    if args.out:
        print(f"wrote {bm.write_results(args.out, result)}")
    r = result
    bare_w, bare_c = r["bare"]["wall"]["median_ms"], r["bare"]["cpu"]["median_ms"]
    fmt = lambda q: f"{q['median_ms']:.1f} ({q['p20_ms']:.1f}–{q['p80_ms']:.1f})"  # noqa: E731
    print("\n" + bm.format_environment(env))
    print(f"{args.dtype}, D={D}, full batch {r['batch']}, {r['threads']} threads, load "
          f"{r['load_avg_1min']:.1f}; median (p20–p80) ms per step")
    print("| | wall | wall / bare | CPU (all threads) | CPU / bare |")
    print("|---|---|---|---|---|")
    print(f"| bare step | {fmt(r['bare']['wall'])} | 1 | {fmt(r['bare']['cpu'])} | 1 |")
    for name in recorded:
        x = r[name]
        print(f"| {name} step | {fmt(x['wall'])} | {x['wall']['median_ms'] / bare_w:.3f} | "
              f"{fmt(x['cpu'])} | {x['cpu']['median_ms'] / bare_c:.3f} |")
        print(f"| {name}: hooks only | {fmt(x['hooks_wall'])} | "
              f"{x['hooks_wall']['median_ms'] / bare_w:.3f} | {fmt(x['hooks_cpu'])} | "
              f"{x['hooks_cpu']['median_ms'] / bare_c:.3f} |")
    print(f"\nbytes on disk per step: {per_step:,.0f} (θ+v: {2 * D * itemsize:,}; batch: "
          f"{result['bytes_batch']:,}; rest: headers and log line)")
    return result


if __name__ == "__main__":
    main()
