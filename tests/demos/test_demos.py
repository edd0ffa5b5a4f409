"""Tests of the demos: datasets, models, report helpers (pruning masks, KL, windows) and an end-to-end
smoke run of each demo at its tiny size through the command line.

Tolerances: float64 throughout. The smoke runs use the kink-splitting rule, which is exact on the
piecewise-smooth ReLU / max-pool models up to rounding: its reconstruction error is a sum of ~10^2
float64 terms of size ≤ 10 per step, so 1e-10 is a loose bound that a quadrature error (≥ 1e-6 for
any fixed rule on these models) could not meet.
"""
from __future__ import annotations

import csv
import math
import platform
import re

import pytest
import torch
import torch.nn.functional as F

from explaind_fast.demos.data import digits_data, modular_addition_data
from explaind_fast.demos.models import (CNN_LAYERS, TRANSFORMER_LAYERS, DigitsCNN,
                                        ModularAdditionTransformer)
from explaind_fast.demos.report import (kl_divergence, markdown_table, pruning_mask,
                                        reconstruction_metrics)


# ---------------------------------------------------------------------------------------- data
def test_modular_addition_data_pairs_labels_and_split():
    d = modular_addition_data(p=11, n_train=40, n_test=20, seed=3)
    for x, y in ((d.train_x, d.train_y), (d.test_x, d.test_y)):
        assert x.dtype == torch.int64 and x.shape[1] == 4
        assert bool((x[:, 0] >= x[:, 2]).all())                     # a ≥ b
        assert bool((x[:, 1] == 11).all()) and bool((x[:, 3] == 12).all())   # [+], [=]
        assert torch.equal(y, (x[:, 0] + x[:, 2]) % 11)
    pairs = lambda x: {(int(a), int(b)) for a, _, b, _ in x}          # noqa: E731
    assert len(pairs(d.train_x)) == 40 and len(pairs(d.test_x)) == 20
    assert not pairs(d.train_x) & pairs(d.test_x)                   # disjoint
    again = modular_addition_data(p=11, n_train=40, n_test=20, seed=3)
    assert torch.equal(again.train_x, d.train_x)                    # seeded
    other = modular_addition_data(p=11, n_train=40, n_test=20, seed=4)
    assert not torch.equal(other.train_x, d.train_x)


def test_modular_addition_data_paper_size_and_errors():
    d = modular_addition_data()                                     # p=113, 4000 / 2000
    assert d.train_x.shape == (4000, 4) and d.test_x.shape == (2000, 4)
    with pytest.raises(ValueError, match="at most the 66 pairs"):
        modular_addition_data(p=11, n_train=60, n_test=10)


def test_digits_data_scaled_and_disjoint():
    d = digits_data(n_train=100, n_test=50, seed=1, dtype=torch.float64)
    assert d.train_x.shape == (100, 1, 8, 8) and d.test_x.dtype == torch.float64
    assert float(d.train_x.min()) >= 0.0 and float(d.train_x.max()) == 1.0
    tr = {tuple(r.flatten().tolist()) for r in d.train_x}
    te = [tuple(r.flatten().tolist()) for r in d.test_x]
    # the split is by index; duplicate images in the dataset are possible but rare
    assert sum(t in tr for t in te) <= 2
    with pytest.raises(ValueError, match="1797"):
        digits_data(n_train=1700, n_test=200)


# -------------------------------------------------------------------------------------- models
def _full_sequence_reference(m: ModularAdditionTransformer, tokens):
    """Textbook one-layer transformer over all positions (no mask), logits at the last token."""
    x = m.embed(tokens)
    B, T, _ = x.shape
    h, dh = m.attn.n_heads, m.attn.d_head
    q = m.attn.q(x).view(B, T, h, dh).transpose(1, 2)
    k = m.attn.k(x).view(B, T, h, dh).transpose(1, 2)
    v = m.attn.v(x).view(B, T, h, dh).transpose(1, 2)
    z = F.scaled_dot_product_attention(q, k, v)
    x = x + m.attn.o(z.transpose(1, 2).reshape(B, T, h * dh))
    x = x + m.mlp.linear2(F.relu(m.mlp.linear1(x)))
    return m.decoder(x)[:, -1]


def test_transformer_paper_size_and_last_token_equivalence():
    torch.manual_seed(0)
    m = ModularAdditionTransformer().double()
    assert sum(p.numel() for p in m.parameters()) == 97331          # DESIGN.md §6
    d = modular_addition_data(p=113, n_train=16, n_test=0)
    out = m(d.train_x)
    assert out.shape == (16, 115)
    torch.testing.assert_close(out, _full_sequence_reference(m, d.train_x), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="act must be one of"):
        ModularAdditionTransformer(act="tanh")


def test_layer_patterns_cover_every_parameter_once():
    import fnmatch
    for model, layers in ((ModularAdditionTransformer(p=7, d_mlp=8), TRANSFORMER_LAYERS),
                          (DigitsCNN(), CNN_LAYERS)):
        for name, _ in model.named_parameters():
            hits = [g for g, pats in layers.items() if any(fnmatch.fnmatchcase(name, p)
                                                           for p in pats)]
            assert len(hits) == 1, (name, hits)


def test_digits_cnn_shapes_and_bad_input():
    m = DigitsCNN()
    assert m(torch.zeros(3, 1, 8, 8)).shape == (3, 10)
    with pytest.raises(ValueError, match=r"\[batch, 1, 8, 8\]"):
        m(torch.zeros(3, 8, 8))


# ------------------------------------------------------------------------------ report helpers
def test_pruning_mask_keeps_top_scores_and_output_layer():
    scores = torch.tensor([5.0, 1.0, 3.0, 3.0, 0.5, 9.0, 0.0, 2.0])
    prunable = torch.tensor([True] * 6 + [False] * 2)               # last two: "output layer"
    keep = pruning_mask(scores, prunable, 0.5)                      # keep 3 of 6 prunable
    assert keep.tolist() == [True, False, True, False, False, True, True, True]
    # tie between indices 2 and 3 at the cut goes to the lower index (deterministic)
    assert pruning_mask(scores, prunable, 0.0).all()
    k99 = pruning_mask(torch.arange(1000.0), torch.ones(1000, dtype=torch.bool), 0.99)
    assert int(k99.sum()) == 10 and bool(k99[-10:].all())
    with pytest.raises(ValueError, match="sparsity"):
        pruning_mask(scores, prunable, 1.0)
    with pytest.raises(ValueError, match="bool"):
        pruning_mask(scores, prunable.int(), 0.5)


def test_kl_and_reconstruction_metrics():
    a = torch.tensor([[0.0, 0.0], [1.0, -1.0]], dtype=torch.float64)
    assert kl_divergence(a, a) == 0.0
    b = torch.tensor([[math.log(3.0), 0.0], [1.0, -1.0]], dtype=torch.float64)
    # row 0: KL(½,½ ‖ ¾,¼) = ½ ln(2/3) + ½ ln 2 ; row 1: 0
    expect = 0.5 * (0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25))
    assert kl_divergence(a, b) == pytest.approx(expect, rel=1e-12)
    final = torch.tensor([[0.0, 0.1], [1.0, -1.0]], dtype=torch.float64)
    m = reconstruction_metrics(b, final)              # row 0 argmax differs, row 1 agrees
    assert m["accuracy"] == 0.5 and m["max_abs_error"] == pytest.approx(math.log(3.0))
    assert m["kl"] > 0
    with pytest.raises(ValueError, match="shapes differ"):
        kl_divergence(a, a[:1])
    assert "| 1.5 |" in markdown_table([{"x": 1.5}], ["x"])


def test_grokking_windows_and_order():
    from explaind_fast.demos.grokking import _order_by_sum_mod, _windows
    assert _windows(1939, 3, 50) == [(169, 219), (1041, 1091), (1817, 1867)]
    w = _windows(10, 3, 4)
    assert all(0 <= a < b <= 10 and b - a == 4 for a, b in w)
    assert all(w[i][1] <= w[i + 1][0] for i in range(len(w) - 1))   # disjoint, ordered
    x = torch.tensor([[3, 5, 2, 6], [4, 5, 0, 6], [1, 5, 1, 6], [4, 5, 4, 6]])
    order = _order_by_sum_mod(x, 5)                                 # sums 5,4,2,8 → mod 0,4,2,3
    assert order.tolist() == [0, 2, 3, 1]


# --------------------------------------------------------------------------------- smoke runs
def _runs(path):
    with open(path) as f:
        return {r["run"]: r for r in csv.DictReader(f)}


@pytest.mark.parametrize("demo,files", [
    ("grokking", ["report.md", "table1.csv", "table1.png", "figure3a.csv", "figure3a.png",
                  "influence_windows.png", "similarity_decoder.png", "similarity_linear2.png",
                  "training.csv", "runs.csv"]),
    ("digits-cnn", ["report.md", "table1_sgd.csv", "table1_adamw.csv", "pruning_sgd.csv",
                    "pruning_adamw.csv", "pruning_sgd.png", "pruning_adamw.png", "runs.csv"]),
])
def test_demo_smoke_tiny(tmp_path, capsys, demo, files):
    from explaind_fast.cli import main
    out = tmp_path / demo
    assert main(["demo", demo, "--tiny", "--out", str(out)]) == 0
    for f in files:
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    printed = capsys.readouterr().out
    assert f"report: {out / 'report.md'}" in printed and "reconstruction error" in printed
    runs = _runs(out / "runs.csv")
    exact = [r for name, r in runs.items() if "kinks" in name and "table1" in name]
    assert exact, runs.keys()
    for r in exact:                       # the kink-splitting rule reconstructs exactly
        assert float(r["reconstruction_error"]) < 1e-10, r
    report = (out / "report.md").read_text()
    lines = report.splitlines()
    assert lines[2].startswith("**Size: tiny")
    assert "Reconstruction error" in report
    if demo == "grokking":
        # first lines: the size, the wall time per phase, the exactness of the kink-aware runs,
        # then the reconstruction-error table of every run
        head = "\n".join(lines[:8])
        assert "wall time" in head and "per phase: training + recording" in head, head
        assert "Table 1" in head and "Figure 3a" in head and "Figures 4/5" in head, head
        assert re.search(r"exactness: max reconstruction error of the \d+ kink-aware runs "
                         r"[0-9.e+-]+ \(≤ 1e-09\)", head), head
        table = lines.index("| run | reconstruction error | max residual | max residual (rel.) "
                            "| wall s | note |")
        assert table < lines.index("## Table 1 analogue: reconstruction of the final model")
        for png in ("table1.png", "figure3a.png", "influence_windows.png",
                    "similarity_decoder.png"):
            assert f"]({png})" in report and (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        table1 = {r["rule"]: r for r in csv.DictReader(open(out / "table1.csv"))}
        assert float(table1["kinks:4"]["max_abs_error"]) < 1e-9
        assert float(table1["midpoint:10"]["max_abs_error"]) > 1e-6     # a fixed rule on ReLU
        fig3 = list(csv.DictReader(open(out / "figure3a.csv")))
        assert len(fig3) == 6 and fig3[0]["steps"] == "0:1"


def test_grokking_tiny_subsampled_checkpoints(tmp_path):
    """The default preset's path at tiny size: θ stored every k steps, data="all" views on the
    stored segments (exact with the kink-aware rule, float32 training attributed in float64),
    Figures 4/5 reported as not computed."""
    from explaind_fast.demos import grokking
    cfg = grokking.PRESETS["tiny"].with_overrides(checkpoint_every=2, eval_every=2,
                                                  rules=("midpoint:10", "kinks:4"),
                                                  train_dtype="float32")
    out = tmp_path / "sub"
    lines = []
    before = torch.get_num_threads()
    summary = grokking.run(str(out), cfg, log=lines.append)
    assert torch.get_num_threads() == before              # restored after the 1-thread attribution
    assert f"[grokking] attribution with 1 thread(s) (training used {before}; --threads sets " \
        "both)" in lines
    assert (summary["num_steps"], summary["num_raw_steps"]) == (3, 6)
    assert set(summary["phases"]) == {"training + recording", "Table 1", "Figure 3a",
                                      "plots, report, other"}
    runs = {r["run"]: r for r in summary["attribution_runs"]}
    assert runs["table1 kinks:4"]["reconstruction_error"] < 1e-9
    assert runs["figure3a layers×windows kinks:2"]["reconstruction_error"] < 1e-9
    fig3 = list(csv.DictReader(open(out / "figure3a.csv")))
    assert [r["steps"] for r in fig3] == ["0:2", "2:4", "4:6"]
    report = (out / "report.md").read_text()
    assert "θ stored every 2 steps" in report and "Figures 4/5 analogue: not in this run" in report
    assert "recorded in float32" in report and "attribution dtype float64" in report
    assert not (out / "influence_windows.png").exists()


def test_default_preset_is_the_papers_size():
    from explaind_fast.demos import grokking
    c = grokking.PRESETS["cpu"]
    assert (c.p, c.n_train, c.n_test, c.d_model, c.n_heads, c.d_head, c.d_mlp, c.act) == \
        (113, 4000, 2000, 64, 4, 16, 512, "relu")
    assert (c.lr, c.betas, c.weight_decay, c.stop_at_test_acc) == (1e-3, (0.98, 0.99), 4.0, 1.0)
    assert {"midpoint:10", "midpoint:100", "kinks:3"} <= set(c.rules)


def test_full_presets_are_the_papers_settings():
    from explaind_fast.demos import grokking
    c = grokking.PRESETS["full"]
    assert (c.p, c.n_train, c.n_test, c.d_model, c.n_heads, c.d_head, c.d_mlp, c.act) == \
        (113, 4000, 2000, 64, 4, 16, 512, "relu")
    assert (c.lr, c.betas, c.weight_decay, c.attr_test, c.stop_at_test_acc) == \
        (1e-3, (0.98, 0.99), 4.0, 2000, 1.0)


def test_full_figures45_budget_is_the_planners_minimum_and_checked_before_training(
        tmp_path, monkeypatch):
    """--full's Figures 4/5 (4000 per-sample moments of D = 97,331 in float64) need about 6 GB:
    the engine's 2 GiB default refused them after the whole run (BudgetError). influence_budget
    sizes the budget from the planner's own floor (at least its minimum, within 1%), takes it from
    the device's free memory, and a device without it stops the run before training."""
    from explaind_fast.attribution.planner import DEFAULT_BUDGET, make_plan
    from explaind_fast.demos import common, grokking
    full, D = grokking.PRESETS["full"], 97331
    minimum = make_plan(D=D, M=full.attr_test, K=1, G=3, P=full.n_train, Q=8, A=1000, itemsize=8,
                        mode="auto", credit="update", budget="minimum", data_all=False,
                        fallback_product=False, grouped=False, coef_vectors=3).memory_budget
    monkeypatch.setattr(grokking, "device_memory_budget", lambda device: 64 * 2**30)
    budget = grokking.influence_budget(full, D, 8, "cpu")
    assert budget == 64 * 2**30 and minimum > DEFAULT_BUDGET
    monkeypatch.setattr(grokking, "device_memory_budget", lambda device: int(1.01 * minimum))
    grokking.influence_budget(full, D, 8, "cpu")          # the minimum + 1% fits
    with pytest.raises(ValueError, match=r"Figures 4/5 .* 4000 training samples: about 5\.[89] GiB"):
        monkeypatch.setattr(grokking, "device_memory_budget", lambda device: minimum - 2**20)
        grokking.influence_budget(full, D, 8, "cpu")
    assert grokking.influence_budget(grokking.PRESETS["tiny"], 500, 8, "cpu") is None
    given = full.with_overrides(memory_budget=100 * 2**30)
    assert grokking.influence_budget(given, D, 8, "cpu") == 100 * 2**30
    # a run whose Figures 4/5 cannot fit stops before training: no trajectory written
    cfg = grokking.PRESETS["tiny"].with_overrides(memory_budget=2**10)
    with pytest.raises(ValueError, match="Figures 4/5"):
        grokking.run(str(tmp_path / "r"), cfg, log=lambda s: None)
    assert not (tmp_path / "r" / "trajectory").exists()
    free = common.device_memory_budget("cpu")
    assert free is None or free > 0


def test_cli_rules_shorthand_and_bad_demo():
    from explaind_fast.cli import _rules, build_parser
    assert _rules("midpoint:10, gauss-legendre:2,4,8,kinks:8") == (
        "midpoint:10", "gauss-legendre:2", "gauss-legendre:4", "gauss-legendre:8", "kinks:8")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "mnist"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "grokking", "--full", "--tiny"])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_cli_keeps_freed_memory_unless_the_user_tuned_malloc(load_bench):
    """python -m explaind_fast makes glibc reuse freed blocks: the same alloc/free loop faults
    (nearly) no fresh pages, where the default thresholds mmap and zero every 48 MB block again;
    a MALLOC_* setting of the user's is left alone (bench/bench_malloc_faults.py's loop, each run
    in a fresh process)."""
    run = load_bench("bench_malloc_faults").run
    applied_default, faults_default = run(False)
    applied, faults = run(True)
    assert applied and not applied_default
    # 20 steps × 3 blocks of 48 MB: ~700k fresh pages by default; kept, at most a block or two
    # (glibc now and then still grows its heap for one: 12k pages each)
    assert faults_default > 300_000 and faults < faults_default / 10
    assert not run(True, {"MALLOC_TRIM_THRESHOLD_": str(1 << 30)})[0]
    from explaind_fast.allocator import malloc_trim
    assert malloc_trim() is True
