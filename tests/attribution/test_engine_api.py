"""Attribution methods (importance, difference, similarity, save/load) and bad-input errors."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from explaind_fast import Attribution, attribute
from explaind_fast.testing.models import DT, TinyMLP
from explaind_fast.testing.runs import tiny_mlp_run


@pytest.fixture(scope="module")
def run():
    model, traj, train, Xte, Yte, _ = tiny_mlp_run(kind="adamw", steps=4)
    return dict(model=model, traj=traj, train=train, Xte=Xte, Yte=Yte)


def attr(run, **kw):
    kw.setdefault("quadrature", "gauss-legendre:3")
    kw.setdefault("progress", False)
    return attribute(run["model"], run["traj"], run["Xte"], test_targets=run["Yte"],
                     train_data=run["train"], **kw)


@pytest.fixture(scope="module")
def full(run):
    return attr(run, params="module", data="label", steps="each")


def test_axes_and_labels(full, run):
    assert full.dims == ("step", "param", "data", "test", "output")
    assert full.axes["step"] == ["0:1", "1:2", "2:3", "3:4"]
    assert full.axes["param"] == ["fc1", "fc2", "out"]
    assert full.axes["data"] == sorted(set(run["train"][1].tolist()))
    assert full.reg_dims == ("step", "param", "test", "output")
    assert full.credit == "update" and full.plan["mode"] in ("forward", "reverse")
    assert full.initial.shape == full.final.shape == (4, 3)


def test_importance(full):
    k = full.kernel
    want = k.sum(2).abs().sum((2, 3))                         # signed over data, |·|, Σ test/out
    assert torch.allclose(full.importance(keep=("step", "param")), want)
    assert torch.allclose(full.importance(), k.abs().sum((3, 4)))   # default: all kept axes
    assert torch.allclose(full.importance(keep=("param",)), k.sum((0, 2)).abs().sum((1, 2)))
    assert torch.allclose(full.importance(keep=(), reg=True), full.reg.sum((0, 1)).abs().sum())
    with pytest.raises(ValueError, match="not in this result"):
        full.importance(keep=("nope",))
    assert want.shape == (4, 3)


def test_difference_is_paper_sign(full):
    D = full.difference()
    want = full.reg.sum((2, 3)) - full.kernel.sum((2, 3, 4))  # paper ψ = −contribution
    assert D.shape == (4, 3) and torch.allclose(D, want)


def test_similarity(full):
    S = full.similarity("fc2")
    v = full.kernel[:, 1].permute(2, 0, 1, 3).reshape(4, -1)
    want = (v @ v.T) / (v.norm(dim=1)[:, None] * v.norm(dim=1)[None, :])
    assert torch.allclose(S, want) and torch.allclose(S.diagonal(), torch.ones(4, dtype=DT))
    with pytest.raises(ValueError, match="no parameter group"):
        full.similarity("nope")


def test_save_load_roundtrip(full, tmp_path):
    path = str(tmp_path / "a.safetensors")
    full.save(path)
    b = Attribution.load(path)
    assert b.dims == full.dims and b.axes == full.axes and b.credit == full.credit
    assert torch.equal(b.kernel, full.kernel) and torch.equal(b.reg, full.reg)
    assert torch.equal(b.step_residual, full.step_residual)
    assert b.plan == full.plan and b.reconstruction_error == full.reconstruction_error
    assert torch.equal(b.evaluations["quadrature_nodes"], full.evaluations["quadrature_nodes"])


def test_progress_bar(run, capsys):
    attr(run, progress=False)
    assert "explaind steps" not in capsys.readouterr().err
    attr(run, progress=True)
    assert "explaind steps" in capsys.readouterr().err


# ------------------------------------------------------------------------------ bad input
class MLPWithBN(TinyMLP):
    """Same trainable parameters as TinyMLP plus a parameter-free BatchNorm and a dropout."""

    def __init__(self, p=0.0):
        super().__init__("tanh")
        self.bn = nn.BatchNorm1d(12, affine=False)
        self.drop = nn.Dropout(p)

    def forward(self, x):
        return self.out(self.drop(torch.tanh(self.bn(self.fc2(torch.tanh(self.fc1(x)))))))


def test_bad_inputs(run):
    Xte = run["Xte"]
    with pytest.raises(ValueError, match="could not be fed to the model"):
        attribute(run["model"], run["traj"], Xte[:, :3], progress=False)
    with pytest.raises(ValueError, match="dtype"):
        attribute(run["model"], run["traj"], Xte.float(), progress=False)
    with pytest.raises(ValueError, match="test_targets"):
        attribute(run["model"], run["traj"], Xte, test_targets=run["Yte"][:2], progress=False)
    with pytest.raises(ValueError, match="needs test_targets"):
        attribute(run["model"], run["traj"], Xte, output="loss", progress=False)
    other = TinyMLP("tanh", hidden=10).to(DT)
    with pytest.raises(ValueError, match="fc1.weight"):
        attribute(other, run["traj"], Xte, progress=False)


def test_bad_data(run):
    n = run["train"][0].shape[0]
    with pytest.raises(ValueError, match="needs train_data"):
        attribute(run["model"], run["traj"], run["Xte"], data="sample", progress=False)
    with pytest.raises(ValueError, match="out of range"):
        attr(run, data=torch.full((n,), -1))
    with pytest.raises(ValueError, match="out of range"):
        attr(run, data=(torch.arange(n) % 4, ["a", "b", "c"]))
    with pytest.raises(ValueError, match=f"expected \\[{n}\\]"):
        attr(run, data=torch.zeros(n + 1, dtype=torch.int64))
    with pytest.raises(ValueError, match="integer"):
        attr(run, data=torch.zeros(n))
    X, Y = run["train"]
    with pytest.raises(ValueError, match="recorded on a dataset of"):
        attribute(run["model"], run["traj"], run["Xte"], train_data=(X[:-1], Y[:-1]),
                  data="label", progress=False)


def test_bad_specs(run):
    for kw, msg in [(dict(quadrature="simpson:3"), "unknown rule"),
                    (dict(quadrature="gauss-legendre:0"), "bad argument"),
                    (dict(params="rows"), "params="), (dict(data="class"), "data="),
                    (dict(steps="some"), "steps="), (dict(steps=0), "window length"),
                    (dict(mode="fast"), "mode="), (dict(credit="x"), "credit="),
                    (dict(params=torch.zeros(5, dtype=torch.int64)), "shape \\[D\\]"),
                    (dict(output="probs"), "output=")]:
        with pytest.raises(ValueError, match=msg):
            attr(run, **kw)
    with pytest.raises(ValueError, match="reverse mode only"):
        attr(run, data="sample", credit="gradient", mode="forward")


def test_batchnorm_and_dropout(run):
    bn = MLPWithBN().to(DT)
    with pytest.raises(ValueError, match="BatchNorm in train mode"):
        attribute(bn, run["traj"], run["Xte"], train_data=run["train"], data="sample",
                  progress=False)
    do = MLPWithBN(p=0.2).to(DT).eval()
    with pytest.raises(ValueError, match="cannot be replayed"):
        attribute(do, run["traj"], run["Xte"], train_data=run["train"], data="label",
                  progress=False)
    a = attribute(do, run["traj"], run["Xte"], quadrature="gauss-legendre:2", progress=False)
    assert a.kernel.shape == (4, 3)                       # eval mode, data="all": fine


def test_frozen_parameter_and_indexed_loader_run(tmp_path):
    """A run recorded by the recorder tests' loop (indexed_loader epochs, a frozen embedding that
    is not part of θ): per-sample attribution reconstructs and matches the naive reference."""
    from explaind_fast.quadrature import NodeSet, gauss_legendre
    from explaind_fast.store import Trajectory
    from explaind_fast.testing.models import small_data
    from explaind_fast.testing.naive import naive_tensor
    from explaind_fast.testing.runs import record_run
    model, _ = record_run(str(tmp_path / "run"), kind="adamw", frozen_embed=True, epochs=1)
    traj = Trajectory.load(str(tmp_path / "run"))
    assert "embed.weight" not in traj.layout.names
    X, Y = small_data()
    Xte = X[:3] + 0.1
    a = attribute(model, traj, Xte, train_data=(X, Y), data="sample", params="tensor",
                  steps="all", quadrature="gauss-legendre:8", progress=False)
    assert a.reconstruction_error < 1e-9 and a.credit == "gradient"
    nt = naive_tensor(model, traj, Xte, lambda o, t: o, None, X, Y,
                      lambda o, y: F.cross_entropy(o, y, reduction="none"),
                      lambda s: NodeSet(*gauss_legendre(8)))
    from explaind_fast.attribution.granularity import parse_params
    g = parse_params("tensor", traj.layout)
    k, r = nt.reduce([(0, traj.num_steps)], g.ids, g.G, torch.arange(X.shape[0]), X.shape[0])
    assert (a.kernel - k[0]).abs().max() < 1e-10 and (a.reg - r[0]).abs().max() < 1e-10
