"""The official ExPLAIND code on the paper's transformer case, per test sample, on one CPU thread,
at midpoint:100 — the same-machine reference for bench_paper_case.py's speed-ups.

Optional: needs the official package (PyPI ``explaind`` 0.1.0, github.com/mainlp/explaind), kept
out of the main site-packages. It declares python>=3.12 but imports and runs on 3.11 unchanged:

    pip download --no-deps explaind==0.1.0 -d /tmp/explaind_pkg
    pip install --no-deps --ignore-requires-python --target /tmp/official_explaind \\
        /tmp/explaind_pkg/explaind-0.1.0-py3-none-any.whl

    python bench/bench_official_code.py                    # 1 test sample, writes the JSON
    python bench/bench_official_code.py --test 2 --official-path /somewhere/else

The case is bench_paper_case.py's: the grokking model of explaind_fast.demos.grokking (preset
"full": p = 113, d_model 64, 4 heads of 16, MLP 512, ReLU), its seeded initialisation and data
(modular_addition_data: 4000 train pairs), 20 full-batch AdamW steps (lr 1e-3, weight decay 4.0,
betas (0.98, 0.99)), attribution of every step and all 115 outputs of ``--test`` test samples.
It is built with the official API, as its experiments do (experiments/train_models/modulo_model.py
and experiments/validate_epk/modulo_epk_prediction.py of the official repository):

* ``ModelPath`` / ``AdamWOptimizerPath`` / ``DataPath`` record θ, AdamW's second moments and the
  batch of every step while training (the optimizer is the official wrapper's torch AdamW, with
  the hyperparameters above).
* The official code takes the training loss as NLL of the model's output (its train features are
  ∇ output[y]), so the model is wrapped in a log_softmax, as its own modulo model ends: training
  is unchanged (NLL of log_softmax = cross-entropy of the logits), and the 115 attributed outputs
  are log-probabilities instead of logits (the same cost; one softmax more per gradient).
* ``ExactPathKernelModel(integral_eps=0.01, early_integral_eps=0.01)``: the midpoint rule with
  1/0.01 = 100 nodes on every step (the early steps too); ``keep_param_wise_kernel=True`` and
  ``predict(keep_kernel_matrices=True)`` as the official validation script (the code needs
  keep_param_wise_kernel=True to run: otherwise it indexes a None at step 0).
* float32: the official code differentiates only the float32 entries of the state dict
  (``v.dtype == torch.float``), so it cannot run in float64.

Timed: one ``predict`` call on the ``--test`` samples (recording excluded, as in
bench_paper_case.py), with ``torch.set_num_threads(1)`` and OMP_NUM_THREADS=1; seconds per test
sample = its wall time / ``--test``. The per-step train-side work (4000 per-sample gradients and
the AdamW feature map) is shared by the test samples of one call, so it is charged to them.
Writes bench/results/official_code_cpu.json (``--out``) with the environment row, and the
official code's own check: the largest |Δoutput − predicted Δoutput| over steps, and the final
reconstruction error against the trained model.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import contextlib
import io
import sys
import warnings

import torch
import torch.nn.functional as F

from explaind_fast.testing import benchmark as bm


class LogProbs(torch.nn.Module):
    """The demo model with a log_softmax on top (the official code's loss is NLL of the output)."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.net(tokens), dim=-1)


class PairsDataset(torch.utils.data.Dataset):
    """Train pairs with a ``targets`` list, which the official DataPath rewrites to (y, index)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.data, self.targets = x, list(y)

    def __getitem__(self, i):
        return self.data[i], self.targets[i]

    def __len__(self):
        return len(self.data)


def build_case(steps: int, official_path: str, log=print):
    """Train the paper's case for ``steps`` full-batch steps while the official wrappers record.
    Returns (data, model_path, optimizer_path, data_path, cfg)."""
    sys.path.insert(0, official_path)
    from explaind.data_paths import DataPath
    from explaind.model_paths import ModelPath
    from explaind.optimizer_paths import AdamWOptimizerPath
    from explaind_fast.demos.grokking import PRESETS, build

    cfg = PRESETS["full"]
    data, net, _ = build(cfg, torch.device("cpu"), torch.float32)   # our seeded model and data
    n = len(data.train_x)
    loader = torch.utils.data.DataLoader(PairsDataset(data.train_x, data.train_y), batch_size=n,
                                         shuffle=False)
    data_path = DataPath(loader, full_batch=True, overwrite=True)
    model = ModelPath(LogProbs(net), device="cpu", output_dim=net.vocab)
    opt = AdamWOptimizerPath(model, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                             checkpoints=[], overwrite=True, device="cpu")
    for s in range(steps):
        for batch in loader:                                         # one full batch
            x, y = data_path.get_batch(batch)                        # records the batch
            opt.zero_grad()
            loss = F.nll_loss(model.forward(x), y)
            loss.backward()
            opt.step()
            model.log_checkpoint()
            opt.log_checkpoint()
        if s % 10 == 0 or s == steps - 1:
            log(f"  step {s:3d}  train loss {loss.item():.4f}")
    return data, model, opt, data_path, cfg


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--test", type=int, default=1, help="test samples attributed (one call)")
    ap.add_argument("--steps", type=int, default=20, help="recorded full-batch steps")
    ap.add_argument("--nodes", type=int, default=100, help="midpoint nodes per step")
    ap.add_argument("--official-path", default="/tmp/official_explaind",
                    help="folder holding the official 'explaind' package (pip --target)")
    ap.add_argument("--out", default="official_code_cpu.json",
                    help="results file (a bare name: bench/results/<name>); '' = none")
    ap.add_argument("--verbose", action="store_true", help="show the official code's prints")
    args = ap.parse_args(argv)

    bm.set_threads(1)
    with bm.measure() as rec:
        data, model, opt, data_path, cfg = build_case(args.steps, args.official_path)
    from explaind.epk_model import ExactPathKernelModel

    eps = 1.0 / args.nodes
    epk = ExactPathKernelModel(model=model, optimizer=opt, loss_fn=torch.nn.CrossEntropyLoss(),
                               data_path=data_path, integral_eps=eps, early_integral_eps=eps,
                               device="cpu", keep_param_wise_kernel=True,
                               param_wise_kernel_keep_out_dims=True)
    plan = epk.get_integral_steps(eps, early_eps=eps, early_steps=epk.early_steps)
    assert len(plan) == args.steps and all(len(nodes) == args.nodes for _, nodes in plan), plan
    env = bm.environment()
    print(bm.format_environment(env))
    X = data.test_x[:args.test]
    print(f"# official code, paper case: p={cfg.p}, {len(data.train_x)} train pairs, {args.steps} "
          f"full-batch AdamW steps, {len(X)} test sample(s) x {model.output_dim} outputs, "
          f"midpoint:{args.nodes}, float32, 1 thread (recording took {rec.wall_s:.1f} s)")

    quiet = contextlib.nullcontext() if args.verbose else contextlib.redirect_stdout(io.StringIO())
    with warnings.catch_warnings(), quiet:
        warnings.simplefilter("ignore")
        with bm.measure() as m:
            pred, initial, _, _, evals = epk.predict(X, y_test=data.test_y[:args.test],
                                                     keep_kernel_matrices=True)
    with torch.no_grad():
        final = model.forward(X, step=len(model.checkpoints) - 1)
    per = m.wall_s / len(X)
    row = {"code": "official explaind 0.1.0", "rule": f"midpoint:{args.nodes}",
           "dtype": "float32", "threads": 1, "test_samples": len(X), "steps": args.steps,
           "outputs": model.output_dim, "wall_s": m.wall_s, "user_s": m.user_s,
           "system_s": m.system_s, "seconds_per_test_sample": per,
           "cpu_seconds_per_test_sample": (m.user_s + m.system_s) / len(X),
           "max_rss_bytes": m.max_rss_bytes, "recording_wall_s": rec.wall_s,
           "max_step_abs_error": max(evals["step_max_delta"]),
           "reconstruction_max_abs_error": float((pred - final).detach().abs().max()),
           "output_change_max_abs": float((final - initial).detach().abs().max())}
    print(f"| official code | midpoint:{args.nodes} | float32 | {len(X)} sample(s) | "
          f"{m.wall_s:.1f} s | {per:.1f} s / test sample | CPU {row['cpu_seconds_per_test_sample']:.1f} s"
          f" / sample | max RSS {m.max_rss_bytes / 2**30:.2f} GiB |")
    print(f"# official check: max step |error| {row['max_step_abs_error']:.2e}, final "
          f"reconstruction |error| {row['reconstruction_max_abs_error']:.2e} (output change "
          f"{row['output_change_max_abs']:.2e})")
    result = {"case": {"p": cfg.p, "n_train": len(data.train_x), "steps": args.steps,
                       "test_samples": len(X), "outputs": model.output_dim,
                       "outputs_kind": "log-probabilities (log_softmax of the demo model's logits)",
                       "dtype": "float32", "threads": 1, "rule": f"midpoint:{args.nodes}"},
              "method": "wall time of one ExactPathKernelModel.predict call on the test samples "
                        "(recording excluded) / number of test samples; integral_eps = "
                        "early_integral_eps = 1/nodes; keep_param_wise_kernel=True, "
                        "keep_kernel_matrices=True as the official validation script",
              "rows": [row]}
    if args.out:
        print(f"wrote {bm.write_results(args.out, result, env=env)}")
    return result


if __name__ == "__main__":
    main()
