"""Time (or cProfile) one attribution path in its own process, as bench_grokking_e2e.py calls it.

    python bench/profile_attribution_path.py SIZE {layers,params,decoder} RULE [STEPS]
    env: PROF=file.prof (cProfile), REPEAT=n (timed repeats), OUT_DIR (trajectory/results, default
    ./profile_runs), TAG (result file suffix). Used for bench/results/cpu_e2e.md.
"""
import sys, os, time, cProfile, pstats, torch
from explaind_fast import attribute, Trajectory
from explaind_fast.demos.common import train_recorded
from explaind_fast.demos.data import modular_addition_data
from explaind_fast.demos.grokking import PRESETS
from explaind_fast.demos.models import TRANSFORMER_LAYERS, ModularAdditionTransformer
size, which, rule = sys.argv[1], sys.argv[2], sys.argv[3]
steps = int(sys.argv[4]) if len(sys.argv) > 4 else None
cfg = PRESETS[size].with_overrides(max_steps=steps)
dtype = getattr(torch, cfg.dtype)
data = modular_addition_data(cfg.p, cfg.n_train, cfg.n_test, seed=cfg.seed)
torch.manual_seed(cfg.seed)
model = ModularAdditionTransformer(cfg.p, cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp, act=cfg.act).to(dtype)
out_dir = os.environ.get("OUT_DIR", "profile_runs")
d = os.path.join(out_dir, f"traj_{size}_{steps}")
if not os.path.exists(d):
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    tr = train_recorded(model, opt, data.train_x, data.train_y, data.test_x, data.test_y, d, max_steps=cfg.max_steps, seed=cfg.seed, log=lambda s: None)
traj = Trajectory.load(d)
M = cfg.attr_test
vx = data.test_x
if which == "layers":
    fn = lambda: attribute(model, traj, vx[:M], params=TRANSFORMER_LAYERS, data="all", steps="each", quadrature=rule, output="logits", progress=False, dtype=dtype)
elif which == "params":
    fn = lambda: attribute(model, traj, vx[:8], params="parameter", data="all", steps="all", quadrature=rule, output="logits", progress=False, dtype=dtype)
else:
    N = traj.num_steps
    ones = torch.ones(1, model.vocab, dtype=dtype)
    fn = lambda: attribute(model, traj, vx[:M], train_data=(data.train_x, data.train_y), params={"decoder": ["decoder.*"]}, data="sample", steps=[0, N], quadrature=rule, output=ones, credit="update", progress=False, dtype=dtype)
prof = os.environ.get("PROF")
t0 = time.perf_counter()
if prof:
    pr = cProfile.Profile(); pr.enable(); a = fn(); pr.disable()
    pr.dump_stats(prof)
else:
    a = fn()
    for _ in range(int(os.environ.get("REPEAT", "0"))):
        t1 = time.perf_counter(); a = fn(); print("repeat wall", round(time.perf_counter() - t1, 3), flush=True)
import resource; print(which, rule, "maxrss_MiB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, "wall", round(time.perf_counter() - t0, 2), "recon", float(a.reconstruction_error), "plan", a.plan["mode"], flush=True)
torch.save({"kernel": a.kernel, "reg": a.reg}, os.path.join(out_dir, f"res_{size}_{which}_{rule}_{os.environ.get('TAG','x')}.pt"))
