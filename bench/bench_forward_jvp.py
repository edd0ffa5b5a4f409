"""One forward pass vs JVP batching variants of the CPU-size grokking transformer (8 test samples).

    OMP_WAIT_POLICY=passive python bench/bench_forward_jvp.py   # cf. bench/results/cpu_e2e.md §1
"""
import sys, time, torch
from torch.func import jvp, vmap, functional_call
from explaind_fast.demos.grokking import PRESETS
from explaind_fast.demos.models import ModularAdditionTransformer
from explaind_fast.demos.data import modular_addition_data
from explaind_fast.model import ParamLayout
cfg = PRESETS["cpu"]
torch.manual_seed(0)
model = ModularAdditionTransformer(cfg.p, cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp, act=cfg.act).double()
data = modular_addition_data(cfg.p, cfg.n_train, cfg.n_test, seed=0)
X = data.test_x[:8]
lay = ParamLayout.from_model(model, torch.optim.AdamW(model.parameters()))
th = lay.flatten_model(model).double()
D = th.numel(); print("D", D, "threads", torch.get_num_threads())
f = lambda t: functional_call(model, lay.unflatten(t), (X,))
def tm(name, fn, n=3):
    fn(); t0 = time.perf_counter()
    for _ in range(n): fn()
    print(f"{name:40s} {(time.perf_counter()-t0)/n*1e3:8.2f} ms", flush=True)
T = 13
V = torch.randn(T, D, dtype=torch.float64)
tm("forward", lambda: f(th))
tm("jvp 1 tangent", lambda: jvp(f, (th,), (V[0],)))
tm("vmap jvp 13 tangents", lambda: vmap(lambda v: jvp(f, (th,), (v,))[1])(V))
ths = th[None] + torch.rand(4, 1, dtype=torch.float64) * V[:1]
tm("vmap nodes(4) x vmap tangents(13)", lambda: vmap(lambda t: vmap(lambda v: jvp(f, (t,), (v,))[1])(V))(ths))
tm("vmap tangents(13) x vmap nodes(4)", lambda: vmap(lambda v: vmap(lambda t: jvp(f, (t,), (v,))[1])(ths))(V))
tm("loop 13 jvp", lambda: [jvp(f, (th,), (V[i],)) for i in range(T)])
