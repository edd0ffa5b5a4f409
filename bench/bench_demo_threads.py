"""Threads and OMP_WAIT_POLICY for the grokking demo's training step (paper size, float64).

    OMP_WAIT_POLICY=PASSIVE python bench/bench_demo_threads.py THREADS MODE STEPS
    python bench/bench_demo_threads.py 2 none 12          # torch's default policy

MODE: "none" (no recorder) or k (a TrajectoryRecorder storing θ every k steps). Prints ms per
full-batch step (4000 pairs) split into the test evaluation, forward, backward and AdamW step.
Results and the machine state: bench/results/demo_grokking_cpu.md.
"""
import os
import shutil
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from explaind_fast.demos.grokking import PRESETS, build
from explaind_fast import TrajectoryRecorder
th = int(sys.argv[1]); torch.set_num_threads(th)
mode = sys.argv[2]; steps = int(sys.argv[3])
cfg = PRESETS["full"]
data, model, opt = build(cfg, torch.device("cpu"), torch.float64)
tx, ty, vx, vy = data.train_x, data.train_y, data.test_x, data.test_y
d = os.path.join(tempfile.gettempdir(), "bench_demo_threads_" + mode)
shutil.rmtree(d, ignore_errors=True)
rec = None
if mode != "none":
    k = int(mode)
    rec = TrajectoryRecorder(model, opt, d, checkpoint_every=k, dataset_size=len(tx), fsync=False)
idx = torch.arange(len(tx))
t = time.perf_counter(); tf = tb = ts = te = 0
for s in range(steps):
    a = time.perf_counter()
    with torch.no_grad(): model(vx)
    b = time.perf_counter(); te += b - a
    if rec: rec.set_batch(idx)
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(tx), ty)
    c = time.perf_counter(); tf += c - b
    loss.backward()
    d_ = time.perf_counter(); tb += d_ - c
    opt.step()
    ts += time.perf_counter() - d_
if rec: rec.close()
w = time.perf_counter() - t
print(f"threads {th} mode {mode}: {steps} steps {w:.2f}s = {1000*w/steps:.1f} ms/step; eval {1000*te/steps:.1f} fwd {1000*tf/steps:.1f} bwd {1000*tb/steps:.1f} step {1000*ts/steps:.1f}")
