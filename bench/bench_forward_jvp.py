"""One forward pass vs JVP batching variants of the CPU-size grokking transformer (8 test samples).

    OMP_WAIT_POLICY=passive python bench/bench_forward_jvp.py   # cf. bench/results/cpu_e2e.md §1
    python bench/bench_forward_jvp.py --threads 1 --repeats 5 --out forward_jvp_cpu.json

Each variant: one warm-up call, then the median (p20–p80) of --repeats calls
(explaind_fast.testing.benchmark.time_call / summarize); the first line is the environment row.
"""
import argparse

import torch
from torch.func import functional_call, jvp, vmap

from explaind_fast.demos.data import modular_addition_data
from explaind_fast.demos.grokking import PRESETS
from explaind_fast.demos.models import ModularAdditionTransformer
from explaind_fast.model import ParamLayout
from explaind_fast.testing import benchmark as bm

T = 13  # tangents of the layers×steps forward-mode run (bench/results/cpu_e2e.md §2)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--out", default=None,
                    help="write the rows as JSON here (a bare file name: bench/results/<name>)")
    args = ap.parse_args(argv)
    bm.set_threads(args.threads)
    env = bm.environment()
    print(bm.format_environment(env))

    cfg = PRESETS["cpu"]
    torch.manual_seed(0)
    model = ModularAdditionTransformer(cfg.p, cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp,
                                       act=cfg.act).double()
    data = modular_addition_data(cfg.p, cfg.n_train, cfg.n_test, seed=0)
    X = data.test_x[:8]
    lay = ParamLayout.from_model(model, torch.optim.AdamW(model.parameters()))
    th = lay.flatten_model(model).double()
    D = th.numel()
    print("D", D, "threads", torch.get_num_threads())

    def f(t):
        return functional_call(model, lay.unflatten(t), (X,))

    V = torch.randn(T, D, dtype=torch.float64)
    ths = th[None] + torch.rand(4, 1, dtype=torch.float64) * V[:1]
    variants = {
        "forward": lambda: f(th),
        "jvp 1 tangent": lambda: jvp(f, (th,), (V[0],)),
        f"vmap jvp {T} tangents": lambda: vmap(lambda v: jvp(f, (th,), (v,))[1])(V),
        f"vmap nodes(4) x vmap tangents({T})":
            lambda: vmap(lambda t: vmap(lambda v: jvp(f, (t,), (v,))[1])(V))(ths),
        f"vmap tangents({T}) x vmap nodes(4)":
            lambda: vmap(lambda v: vmap(lambda t: jvp(f, (t,), (v,))[1])(ths))(V),
        f"loop {T} jvp": lambda: [jvp(f, (th,), (V[i],)) for i in range(T)],
    }
    rows = []
    for name, fn in variants.items():
        stats = bm.summarize(bm.time_call(fn, repeats=args.repeats, warmup=1), unit="ms")
        rows.append({"variant": name, **stats})
        print(f"{name:40s} {stats['median_ms']:8.2f} ms  ({stats['p20_ms']:.2f}–{stats['p80_ms']:.2f})",
              flush=True)
    if args.out:
        print(f"wrote {bm.write_results(args.out, rows, env=env, D=D)}")
    return rows


if __name__ == "__main__":
    main()
