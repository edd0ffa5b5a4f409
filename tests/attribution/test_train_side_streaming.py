"""The streamed train side (attribution/train_side.BatchGradients, issue 14) against the unstreamed
one (:func:`partition_gradients`, the [U, D] per-batch path it replaced, kept as the reference).

Per-sample gradients are computed one slab of consecutive parameter tensors at a time and handed
to the consumer (the update-credit moment state, the gradient-credit contraction) slab by slab.
Only the summation order differs from the reference: ≤ 1e-12 relative in float64. A dispatch-mode
probe checks that no tensor of batch × D numbers is ever produced while streaming.
"""
import dataclasses

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import explaind_fast as ef
from explaind_fast.attribution import planner
from explaind_fast.attribution.contraction import restrict_groups, segment_contract
from explaind_fast.attribution.granularity import parse_data, parse_params
from explaind_fast.attribution.train_side import BatchGradients, TrainSet, partition_gradients
from explaind_fast.model import FunctionalModel
from explaind_fast.testing.models import DT, mlp_data
from explaind_fast.testing.runs import per_sample_cross_entropy as ce, train_tiny

TOL = 1e-12
GL = "gauss-legendre:3"


class Uneven(nn.Module):
    """Several tensors of different sizes (D = 5·16+16 + 16·7+7 + 7·3 + 3 + a 1-element scale)."""

    def __init__(self, d_in=5, classes=3):
        super().__init__()
        self.fc1 = nn.Linear(d_in, 16)
        self.fc2 = nn.Linear(16, 7)
        self.out = nn.Linear(7, classes, bias=False)
        self.bias = nn.Parameter(torch.zeros(classes))
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.scale * self.out(torch.tanh(self.fc2(torch.tanh(self.fc1(x))))) + self.bias


class DictUneven(Uneven):
    """Keyword (dict) inputs (trained with a plain tensor: shift 0.1)."""

    def forward(self, features, shift=None):
        return super().forward(features + (0.1 if shift is None else shift))


class Branchy(Uneven):
    """Data-dependent control flow: vmap refuses it, per-sample functions loop over the samples."""

    def forward(self, x):
        y = super().forward(x)
        if bool(x.abs().max() > 1e6):          # never taken, but vmap cannot know
            y = y * 1.5
        return y


def _run(cls=Uneven, steps=3, batch_size=6):
    torch.manual_seed(0)
    model = cls().to(DT)
    Xtr, Ytr, Xte, Yte = mlp_data(seed=0)
    if cls is DictUneven:
        train = ({"features": Xtr, "shift": 0.1 * torch.ones_like(Xtr)}, Ytr)
        test = {"features": Xte, "shift": 0.1 * torch.ones_like(Xte)}
        traj = train_tiny(model, Xtr, Ytr, steps=steps, batch_size=batch_size, two_groups=False)
        return model, traj, train, test, Yte
    traj = train_tiny(model, Xtr, Ytr, steps=steps, batch_size=batch_size, two_groups=False)
    return model, traj, (Xtr, Ytr), Xte, Yte


@pytest.fixture(scope="module", params=["tensor", "dict", "loop"])
def run(request):
    return _run({"tensor": Uneven, "dict": DictUneven, "loop": Branchy}[request.param])


def _per_tensor(layout):
    off = layout.offsets
    return [(off[i], off[i + 1]) for i in range(len(layout.names))]


def _collect(bg, **kw):
    """Stream into a dense [U, D] (the consumer that rebuilds the reference's output)."""
    D = bg.theta.shape[0]
    out = torch.full((len(bg.present), D), float("nan"), dtype=DT)
    seen = []

    def consume(rows, cols, block):
        out[rows, cols] = block
        seen.append((cols.start, cols.stop, tuple(block.shape)))
    total = bg.stream(consume, **kw)
    return out, total, seen


def _close(a, b, tol=TOL):
    scale = float(b.abs().max())
    assert float((a - b).abs().max()) <= tol * max(scale, 1e-300), \
        float((a - b).abs().max()) / max(scale, 1e-300)


def _setup(run):
    model, traj, train, _, _ = run
    fm = FunctionalModel(model, traj.layout, DT, torch.device("cpu"))
    ts = TrainSet(train, DT, torch.device("cpu"))
    return fm, ts, traj


@pytest.mark.parametrize("data", ["sample", "label"])
def test_stream_equals_unstreamed_gradients(run, data):
    fm, ts, traj = _setup(run)
    part = parse_data(data, ts.n, ts.Y)
    lay = traj.layout
    for s in range(traj.num_steps):
        th, rec = traj.theta(s, dtype=DT), traj.step(s)
        present, Gp = partition_gradients(fm, th, ts, ce, rec, part.ids)
        for kw in (dict(), dict(slabs=_per_tensor(lay)), dict(slabs=[(0, lay.offsets[3]), (lay.offsets[3], lay.D)]),
                   dict(budget=1)):
            bg = BatchGradients(fm, th, ts, ce, rec, part.ids)
            out, total, seen = _collect(bg, **kw)
            assert torch.equal(bg.present, present)
            assert not torch.isnan(out).any()             # every entry handed over
            _close(out, Gp)
            _close(total, Gp.sum(0))
            if data == "sample" and "slabs" in kw:
                # one block per parameter tensor, in layout order, slab after slab
                assert [(a, b) for a, b, _ in seen] == _per_tensor(lay)
                starts = {a for a, _, _ in seen}
                assert all(a in starts for a, _ in kw["slabs"]) and bg.slabs == kw["slabs"]
            if kw.get("budget") == 1:        # one partition row / one sample per pass at a time
                assert all(shape[0] == 1 for _, _, shape in seen)
    if isinstance(run[0], Branchy) and data == "sample":
        assert not fm.vectorize and fm.loop_reason          # the loop fallback did run


class Spare(Uneven):
    """A parameter the loss never reaches (no gradient: the recorder marks it inactive)."""

    def __init__(self):
        super().__init__()
        self.spare = nn.Parameter(torch.ones(4))


def test_partition_rows_are_zero_on_tensors_the_loss_does_not_reach():
    """Partitions of several samples differentiate with respect to each tensor (not the flat θ,
    whose every view's backward allocates a D-length gradient); a tensor without a gradient gets
    zeros, as the flat reference gives."""
    model, traj, train, _, _ = _run(Spare)
    fm, ts, traj = _setup((model, traj, train, None, None))
    part = parse_data("label", ts.n, ts.Y)
    lay = traj.layout
    k = lay.names.index("spare")
    for s in range(traj.num_steps):
        th, rec = traj.theta(s, dtype=DT), traj.step(s)
        present, Gp = partition_gradients(fm, th, ts, ce, rec, part.ids)
        out, total, _ = _collect(BatchGradients(fm, th, ts, ce, rec, part.ids))
        _close(out, Gp)
        _close(total, Gp.sum(0))
        assert torch.equal(out[:, lay.offsets[k]:lay.offsets[k + 1]],
                           torch.zeros(len(present), 4, dtype=DT))


@pytest.mark.parametrize("data", ["sample", "label"])
def test_empty_batch_hands_over_nothing(run, data):
    """A batch restricted to partitions a rank does not hold (the distributed splits) may be
    empty: nothing is handed over and the batch gradient is zero."""
    fm, ts, traj = _setup(run)
    part = parse_data(data, ts.n, ts.Y)
    rec = traj.step(0)
    empty = dataclasses.replace(rec, batch_indices=rec.batch_indices[:0],
                                batch_weights=rec.batch_weights[:0])
    bg = BatchGradients(fm, traj.theta(0, dtype=DT), ts, ce, empty, part.ids)
    out, total, seen = _collect(bg, budget=1)
    assert seen == [] and out.shape == (0, traj.layout.D)
    assert torch.equal(total, torch.zeros(traj.layout.D, dtype=DT))


def test_budget_chooses_slabs():
    numels = (80, 16, 112, 7, 21, 3, 1)
    assert planner.gradient_slabs(numels, 6, 8, 0) == [(0, 240)]
    assert planner.gradient_slabs(numels, 6, 8, 3 * 8 * 6 * 240) == [(0, 240)]
    slabs = planner.gradient_slabs(numels, 6, 8, 3 * 8 * 6 * 150)     # ≤ 150 numbers a slab
    assert slabs == [(0, 96), (96, 240)]
    # the largest tensor (112) does not fit: slabs of up to 112 + 112 // 16 = 119
    assert planner.gradient_slabs(numels, 6, 8, 3 * 8 * 6 * 100) == [(0, 96), (96, 215),
                                                                    (215, 240)]
    assert planner.gradient_slabs(numels, 6, 8, 1) == [(0, 96), (96, 215), (215, 240)]
    assert planner.gradient_slabs((5, 200, 3), 6, 8, 1) == [(0, 208)]     # ≤ 17/16 of 200


def test_restricted_groups_sum_to_whole(run):
    fm, ts, traj = _setup(run)
    lay = traj.layout
    g = torch.Generator().manual_seed(0)
    H = torch.randn(4, lay.D, generator=g, dtype=DT)
    Bm = torch.randn(5, lay.D, generator=g, dtype=DT)
    for spec in ("all", "tensor", "neuron", "parameter"):
        groups = parse_params(spec, lay)
        whole = segment_contract(H, Bm, groups)
        parts = sum(segment_contract(H[:, a:b], Bm[:, a:b], restrict_groups(groups, a, b))
                    for a, b in _per_tensor(lay))
        _close(parts, whole)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces (physical shapes, below vmap)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_streaming_never_holds_batch_times_D(run):
    """Per-tensor slabs: no op produces B·D numbers (the unstreamed path does, so the probe can
    fail); every block is at most B × the largest tensor."""
    fm, ts, traj = _setup(run)
    part = parse_data("sample", ts.n, ts.Y)
    lay = traj.layout
    th, rec = traj.theta(1, dtype=DT), traj.step(1)
    Bsz = len(rec.batch_indices)
    largest = max(lay.numels)
    assert Bsz * largest < Bsz * lay.D
    with _LargestTensor() as probe:
        partition_gradients(fm, th, ts, ce, rec, part.ids)
    assert probe.largest >= Bsz * lay.D                 # the reference does hold [B, D]
    bg = BatchGradients(fm, th, ts, ce, rec, part.ids)
    blocks = []
    with _LargestTensor() as probe:
        bg.stream(lambda rows, cols, block: blocks.append(block.numel()),
                  budget=planner.SLAB_COPIES * 8 * Bsz * largest)
    assert len(bg.slabs) > 1
    assert max(blocks) <= Bsz * largest
    assert probe.largest < Bsz * lay.D, (probe.largest, Bsz, lay.D)


# ------------------------------------------------------------------------- end to end: attribute
def _attr(run, stream, monkeypatch, **kw):
    model, traj, train, Xte, Yte = run
    # TRAIN_SHARE huge: a train budget of 2 bytes -> one tensor per slab / one row at a time;
    # TRAIN_SHARE 1: the whole budget, every batch in one slab (the unstreamed computation)
    if stream:
        monkeypatch.setattr(planner, "TRAIN_SHARE", 1 << 29)
    else:
        monkeypatch.setattr(planner, "TRAIN_SHARE", 1)
    a = ef.attribute(model, traj, Xte, test_targets=Yte, train_data=train, quadrature=GL,
                     progress=False, memory_budget=1 << 30, **kw)
    monkeypatch.undo()
    return a


@pytest.mark.parametrize("data", ["sample", "label"])
@pytest.mark.parametrize("credit,mode", [("update", "forward"), ("update", "reverse"),
                                         ("gradient", "reverse")])
def test_attribute_streamed_equals_unstreamed(run, monkeypatch, data, credit, mode):
    kw = dict(data=data, credit=credit, mode=mode, params="tensor", output="logits")
    ref = _attr(run, False, monkeypatch, **kw)
    got = _attr(run, True, monkeypatch, **kw)
    assert ref.plan["train_slabs"] == 1
    if data == "sample":
        lay = run[1].layout
        slabs = planner.gradient_slabs(lay.numels, 6, 8, 2)
        assert len(slabs) > 1 and got.plan["train_slabs"] == len(slabs)
        assert got.plan["estimates"]["train_side"]["largest_slab"] == max(b - a for a, b in slabs)
    _close(got.kernel, ref.kernel)
    _close(got.reg, ref.reg)
