"""The calling convention of real models (explaind_fast.model.inputs): pytree inputs (tuples, dicts,
non-tensor leaves), tuple / Mapping outputs and model_output, every accepted train_data form, LM
output specs, torch.compile'd modules both ways, models without a forward-mode derivative, and the
refusals. The reference everywhere is the same run attributed through a plain tensor input."""
import json
import os
import tempfile

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import explaind_fast as ef
from explaind_fast.attribution.granularity import parse_output
from explaind_fast.model import ParamLayout
from explaind_fast.model import inputs as I
from explaind_fast.quadrature.kinks import kink_nodes, quadrature_residual
from explaind_fast.recording import IndexedDataset
from explaind_fast.store.format import manifest_checksum
from explaind_fast.testing.models import DT, TinyMLP, mlp_data
from explaind_fast.testing.runs import tiny_mlp_run, train_tiny

GL = "gauss-legendre:6"


class DictMLP(TinyMLP):
    """TinyMLP's parameters; keyword inputs, a dict output with the logits and a hidden layer."""

    def forward(self, features, scale=1.0):
        h = self.act(self.fc1(features))
        return {"hidden": h, "logits": self.out(self.act(self.fc2(h))) * scale}


class TupleMLP(TinyMLP):
    """TinyMLP's parameters; two positional inputs (the second unused), a tuple output."""

    def forward(self, x, extra):
        return super().forward(x), x.sum(1, keepdim=True)


def _run(act, **kw):
    model, traj, (Xtr, Ytr), Xte, Yte, _ = tiny_mlp_run(act=act, steps=3, **kw)
    return dict(model=model, traj=traj, Xtr=Xtr, Ytr=Ytr, Xte=Xte, Yte=Yte, act=act)


@pytest.fixture(scope="module")
def run():
    return _run("tanh")


@pytest.fixture(scope="module")
def relu_run():
    return _run("relu")


def _as(cls, run):
    other = cls(run["act"]).to(DT)
    other.load_state_dict(run["model"].state_dict())
    return other


def _close(a, b, tol=1e-12):
    assert a.kernel.shape == b.kernel.shape
    scale = float(b.kernel.abs().max())
    assert float((a.kernel - b.kernel).abs().max()) <= tol * scale


def attr(model, traj, X, **kw):
    kw.setdefault("quadrature", GL)
    return ef.attribute(model, traj, X, progress=False, **kw)


# ------------------------------------------------------------------------------ inputs / outputs
def test_dict_and_tuple_inputs_with_mapping_and_tuple_outputs(run):
    ref = attr(run["model"], run["traj"], run["Xte"], params="tensor")
    dm, tm = _as(DictMLP, run), _as(TupleMLP, run)
    _close(attr(dm, run["traj"], {"features": run["Xte"]}, params="tensor"), ref)
    # a non-tensor leaf is passed unchanged to every call
    _close(attr(dm, run["traj"], {"features": run["Xte"], "scale": 1.0}, params="tensor"), ref)
    _close(attr(tm, run["traj"], (run["Xte"], run["Xte"]), params="tensor"), ref)
    # model_output: another key, an index, a callable
    hid = attr(dm, run["traj"], {"features": run["Xte"]}, model_output="hidden")
    assert hid.kernel.shape == (run["Xte"].shape[0], 12)
    aux = attr(tm, run["traj"], (run["Xte"], run["Xte"]), model_output=1)
    assert aux.kernel.shape == (run["Xte"].shape[0], 1) and float(aux.kernel.abs().max()) == 0
    _close(attr(dm, run["traj"], {"features": run["Xte"]}, model_output=lambda o: o["logits"]),
           attr(run["model"], run["traj"], run["Xte"]))


def test_kinks_rule_and_residual_with_dict_inputs(relu_run):
    run = relu_run
    dm = _as(DictMLP, run)
    ref = attr(run["model"], run["traj"], run["Xte"], quadrature="kinks:2", data="sample",
               train_data=(run["Xtr"], run["Ytr"]))
    got = attr(dm, run["traj"], {"features": run["Xte"]}, quadrature="kinks:2", data="sample",
               train_data=({"features": run["Xtr"]}, run["Ytr"]))
    _close(got, ref)
    assert got.certificate["problems"] == []
    layout, traj = run["traj"].layout, run["traj"]
    th, th1 = traj.theta(0), traj.theta(1)
    n_t = kink_nodes(run["model"], layout, th, th1 - th, run["Xte"], 2)
    n_d = kink_nodes(dm, layout, th, th1 - th, {"features": run["Xte"]}, 2)
    assert torch.equal(n_t.t, n_d.t) and torch.equal(n_t.w, n_d.w)
    r_t, c_t = quadrature_residual(run["model"], layout, th, th1 - th, run["Xte"], n_t)
    r_d, c_d = quadrature_residual(dm, layout, th, th1 - th, {"features": run["Xte"]}, n_t)
    assert torch.equal(c_t, c_d) and torch.allclose(r_t, r_d, rtol=0, atol=1e-15)


def test_every_train_data_form(run):
    X, Y, traj = run["Xtr"], run["Ytr"], run["traj"]
    ref = attr(run["model"], traj, run["Xte"], data="sample", train_data=(X, Y))
    dm = _as(DictMLP, run)
    items = [{"features": X[i], "labels": Y[i]} for i in range(len(X))]
    forms = {
        "tensor dataset": (run["model"], TensorDataset(X, Y)),
        "list of pairs": (run["model"], [(X[i], Y[i]) for i in range(len(X))]),
        "indexed dataset": (run["model"], IndexedDataset((X, Y))),
        "dict pair": (dm, ({"features": X}, Y)),
        "dict batch": (dm, {"features": X, "labels": Y}),
        "dict items": (dm, items),
        "indexed dict items": (dm, IndexedDataset(items)),
    }
    for name, (model, data) in forms.items():
        X_te = run["Xte"] if model is run["model"] else {"features": run["Xte"]}
        _close(attr(model, traj, X_te, data="sample", train_data=data), ref)
    # data="label" reads the "labels" of dict targets
    _close(attr(dm, traj, {"features": run["Xte"]}, data="label", train_data=forms["dict batch"][1]),
           attr(run["model"], traj, run["Xte"], data="label", train_data=(X, Y)))


def test_refusals_name_what_is_wrong(run):
    model, traj, Xte = run["model"], run["traj"], run["Xte"]
    dm = _as(DictMLP, run)
    with pytest.raises(ValueError, match=r"disagree on the batch size.*\['features'\]: 4.*\['b'\]: 3"):
        attr(dm, traj, {"features": Xte, "b": Xte[:3]})
    with pytest.raises(ValueError, match=r"test_inputs\['features'\] has dtype torch.float32"):
        attr(dm, traj, {"features": Xte.float()})
    with pytest.raises(ValueError, match=r"could not be fed to the model, called as model\(\*\*x\)"
                                         r".*'feature'"):
        attr(dm, traj, {"feature": Xte})
    with pytest.raises(ValueError, match=r"\['hidden', 'logits'\] and no 'logitz'"):
        attr(dm, traj, {"features": Xte}, model_output="logitz")
    with pytest.raises(ValueError, match="select one by index"):
        attr(_as(TupleMLP, run), traj, (Xte, Xte), model_output="hidden")
    with pytest.raises(ValueError, match="holds 'labels' and test_targets is given too"):
        attr(dm, traj, {"features": Xte, "labels": run["Yte"]}, test_targets=run["Yte"])
    with pytest.raises(ValueError, match="dict without a 'labels' entry"):
        attr(dm, traj, {"features": Xte}, data="sample", train_data={"features": run["Xtr"]})
    with pytest.raises(ValueError, match="train_data: 16 inputs but 15 targets"):
        attr(model, traj, Xte, data="sample", train_data=(run["Xtr"], run["Ytr"][:-1]))
    with pytest.raises(ValueError, match="could not be stacked"):
        attr(model, traj, Xte, data="sample",
             train_data=[(run["Xtr"][i, :4 + i % 2], run["Ytr"][i]) for i in range(16)])
    with pytest.raises(ValueError, match="a 0-dim tensor"):
        attr(dm, traj, {"features": Xte, "scale": torch.tensor(1.0, dtype=DT)})


# ------------------------------------------------------------------------------ LM output specs
def test_position_and_token_loss_output_specs():
    g = torch.Generator().manual_seed(0)
    out = torch.randn(3, 5, 7, generator=g, dtype=DT)
    labels = torch.randint(0, 7, (3, 5), generator=g)
    assert torch.equal(parse_output(("position", -1), None).h(out, None), out[:, -1])
    assert torch.equal(parse_output(("position", 2, 4), None).h(out, None), out[:, 2, [4]])
    spec = parse_output(("position", 0, [1, 6]), None)
    assert torch.equal(spec.h(out, None), out[:, 0, [1, 6]]) and spec.labels == [1, 6]
    tok = parse_output("token_losses", None)
    assert tok.needs_targets
    assert torch.equal(tok.h(out, labels), ef.losses.causal_lm_token_losses(out, labels))
    for bad in [("position",), ("position", 1.5), ("position", 1, "a"), ("position", True)]:
        with pytest.raises(ValueError, match="position"):
            parse_output(bad, None)
    with pytest.raises(ValueError, match="outside the sequence"):
        parse_output(("position", 5), None).h(out, None)
    with pytest.raises(ValueError, match=r"sequence outputs \[M, T, V\]"):
        parse_output(("position", 0), None).h(out[:, 0], None)


# ------------------------------------------------------------------------------ the helpers
def test_input_helpers():
    x = {"a": torch.arange(6).reshape(3, 2), "b": (torch.ones(3),), "c": None, "d": True}
    assert I.batch_size(x) == 3
    assert I.take(x, torch.tensor([2]))["a"].tolist() == [[4, 5]]
    assert I.take(x, 1)["b"][0].shape == () and I.take(x, 1)["d"] is True
    assert I.in_dims(x) == {"a": 0, "b": (0,), "c": None, "d": None}
    assert I.unsqueeze(I.take(x, 0))["a"].shape == (1, 2)
    assert I.call_args(x) == ((), x) and I.call_args((1, 2)) == ((1, 2), {})
    assert I.canonical_name("enc._orig_mod.layer.weight") == "enc.layer.weight"
    assert I.select_output((torch.ones(1), 2)) is not None
    with pytest.raises(ValueError, match="no tensor"):
        I.batch_size({"a": 1})
    # vmap refuses data-dependent control flow: map_samples loops instead, with the same result
    calls = []

    def f(v):
        return v * 2 if bool(v.sum() > 0) else -v
    v = torch.tensor([[1.0, 2.0], [-3.0, 1.0], [0.5, -2.0]])
    out = I.map_samples(f, (0,), on_fallback=calls.append)(v)
    assert torch.equal(out, torch.stack([f(r) for r in v])) and len(calls) == 1
    assert I.is_vmap_data_dependent(calls[0])


# ------------------------------------------------------------------------------ torch.compile
def _record(model_to_train, X, Y, steps=3):
    opt = torch.optim.AdamW(model_to_train.parameters(), lr=1e-2, weight_decay=0.1)
    d = tempfile.mkdtemp(prefix="explaind_compile_")
    with ef.TrajectoryRecorder(model_to_train, opt, d, dataset_size=len(X), fsync=False) as rec:
        for s in range(steps):
            idx = torch.arange(4 * s, 4 * s + 6) % len(X)
            rec.set_batch(idx)
            opt.zero_grad()
            F.cross_entropy(model_to_train(X[idx]), Y[idx]).backward()
            opt.step()
    return d


def test_torch_compile_both_ways(run):
    X, Y, Xte = run["Xtr"], run["Ytr"], run["Xte"]
    torch.manual_seed(5)
    plain = TinyMLP("tanh").to(DT)
    compiled = torch.compile(plain, backend="eager")
    assert next(iter(dict(compiled.named_parameters()))).startswith("_orig_mod.")
    d = _record(compiled, X, Y)                 # recorded through the compiled module
    traj = ef.Trajectory.load(d)
    assert traj.layout.names[0] == "fc1.weight"
    kw = dict(data="sample", train_data=(X, Y), quadrature=GL)
    a = attr(plain, traj, Xte, **kw)
    assert a.certificate["problems"] == []
    _close(attr(compiled, traj, Xte, **kw), a, tol=0)   # attributed through the compiled one

    # a trajectory stored with the prefixed names (recorded before names were canonical)
    path = os.path.join(d, "manifest.json")
    with open(path) as f:
        man = json.load(f)
    man["layout"]["names"] = ["_orig_mod." + n for n in man["layout"]["names"]]
    man["sha256"] = manifest_checksum(man)
    with open(path, "w") as f:
        json.dump(man, f)
    old = ef.Trajectory.load(d)
    assert old.layout.names == traj.layout.names
    _close(attr(plain, old, Xte, **kw), a, tol=0)

    # a real mismatch says that names are compared without the prefix
    with pytest.raises(ValueError, match=r"without torch.compile's '_orig_mod\.' segments"):
        attr(TupleMLP("tanh").to(DT).fc1, traj, Xte)
    with pytest.raises(ValueError, match="occurs twice"):
        ParamLayout(names=("a.w", "_orig_mod.a.w"), shapes=((1,), (1,)),
                    dtypes=("float64", "float64"))


def test_compiled_submodule_records_and_attributes(run):
    """Only a submodule compiled: its parameters carry '_orig_mod.' inside their names."""
    X, Y, Xte = run["Xtr"], run["Ytr"], run["Xte"]
    torch.manual_seed(6)
    model = TinyMLP("tanh").to(DT)
    model.fc1 = torch.compile(model.fc1, backend="eager")
    assert "fc1._orig_mod.weight" in dict(model.named_parameters())
    traj = ef.Trajectory.load(_record(model, X, Y))
    assert traj.layout.names[0] == "fc1.weight"
    a = attr(model, traj, Xte, data="sample", train_data=(X, Y), quadrature=GL)
    assert a.certificate["problems"] == []


# ------------------------------------------------------------------------------ no forward AD
class _Square(torch.autograd.Function):
    """x² with a backward but no jvp: forward-mode AD is not implemented for it."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        return 2 * ctx.saved_tensors[0] * g


class SquareMLP(TinyMLP):
    def forward(self, x):
        return self.out(_Square.apply(torch.tanh(self.fc2(torch.tanh(self.fc1(x))))))


def test_op_without_forward_ad_plans_reverse_mode():
    torch.manual_seed(0)
    model = SquareMLP("tanh").to(DT)
    Xtr, Ytr, Xte, Yte = mlp_data()
    run = dict(traj=train_tiny(model, Xtr, Ytr, steps=3), Xtr=Xtr, Ytr=Ytr, Xte=Xte)
    a = attr(model, run["traj"], run["Xte"], data="sample", train_data=(run["Xtr"], run["Ytr"]),
             credit="update", steps="each")
    assert a.plan["mode"] == "reverse" and "jvp" in a.plan["mode_reason"]
    assert a.plan["attention"] == "no scaled-dot-product attention seen"
    assert a.reconstruction_error <= 1e-9 * float((a.final - a.initial).abs().max())
    with pytest.raises(ValueError, match=r"mode='forward' needs forward-mode AD.*custom autograd"):
        attr(model, run["traj"], run["Xte"], mode="forward")
    with pytest.raises(ValueError, match="quadrature='kinks:2' evaluates J·Δ"):
        attr(model, run["traj"], run["Xte"], quadrature="kinks:2")
