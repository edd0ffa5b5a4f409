"""Hugging Face models end to end: dict inputs, ModelOutput, SDPA attention, language-model losses.

Tiny GPT-2 (causal LM, attn_implementation="sdpa") and BERT (sequence classification) built from
configs in float64 (no download), trained a few AdamW steps in a plain loop recorded by
TrajectoryRecorder, then attributed: every result must pass its certificate (no
AttributionWarning) and reconstruct the output change to 1e-9 relative. Dropout is 0 in the configs
(per-sample data needs a deterministic model); no parameter needed freezing (every trainable
parameter of these two models gets a gradient at every step).
"""
import tempfile
import warnings

import pytest
import torch

import explaind_fast as ef
from explaind_fast.losses import (causal_lm_batch_weights, causal_lm_loss, causal_lm_token_count,
                                  causal_lm_token_losses)
from explaind_fast.model import attention as att

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

DT = torch.float64
N_TRAIN, N_TEST, T, VOCAB = 8, 3, 8, 50


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models are all overhead: one thread avoids OpenMP hand-offs (10-40x on a busy box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tokens(seed=0):
    """ids and attention masks [N_TRAIN + N_TEST, T]; some train and test rows right-padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (N_TRAIN + N_TEST, T), generator=g)
    mask = torch.ones_like(ids)
    for row, length in ((1, 6), (4, 5), (N_TRAIN + 1, 6)):
        mask[row, length:] = 0
    return ids, mask


def _gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=VOCAB, n_positions=16,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                  eos_token_id=0, attn_implementation="sdpa")
    model = transformers.GPT2LMHeadModel(cfg).to(DT)
    assert model.config._attn_implementation == "sdpa"
    return model


def _bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=32,
                                  max_position_embeddings=16, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, num_labels=3,
                                  attn_implementation="sdpa")
    model = transformers.BertForSequenceClassification(cfg).to(DT)
    assert model.config._attn_implementation == "sdpa"
    return model


def _batches(steps=3, size=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(N_TRAIN, generator=g)[:size] for _ in range(steps)]


@pytest.fixture(scope="module")
def gpt2_run():
    """GPT-2 trained with Hugging Face's batch loss (mean over the batch's tokens), computed as
    Σ_k w_k causal_lm_loss_k with w = causal_lm_batch_weights (exact in float64)."""
    model = _gpt2()
    ids, mask = _tokens()
    labels = ids.masked_fill(mask == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    d = tempfile.mkdtemp(prefix="explaind_gpt2_")
    with ef.TrajectoryRecorder(model, opt, d, dataset_size=N_TRAIN, fsync=False) as rec:
        for idx in _batches():
            tg = {"labels": labels[idx], "attention_mask": mask[idx]}
            w = causal_lm_batch_weights(tg)
            rec.set_batch(idx, w)
            opt.zero_grad()
            out = model(input_ids=ids[idx], attention_mask=mask[idx])
            (causal_lm_loss(out.logits, tg) * w.to(DT)).sum().backward()
            opt.step()
    train = {"input_ids": ids[:N_TRAIN], "attention_mask": mask[:N_TRAIN],
             "labels": labels[:N_TRAIN]}
    test = {"input_ids": ids[N_TRAIN:], "attention_mask": mask[N_TRAIN:],
            "labels": labels[N_TRAIN:]}
    return model, ef.Trajectory.load(d), train, test


@pytest.fixture(scope="module")
def bert_run():
    model = _bert()
    ids, mask = _tokens(seed=2)
    labels = torch.randint(0, 3, (N_TRAIN + N_TEST,), generator=torch.Generator().manual_seed(3))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    d = tempfile.mkdtemp(prefix="explaind_bert_")
    with ef.TrajectoryRecorder(model, opt, d, dataset_size=N_TRAIN, fsync=False) as rec:
        for idx in _batches(seed=4):
            rec.set_batch(idx)
            opt.zero_grad()
            out = model(input_ids=ids[idx], attention_mask=mask[idx])
            torch.nn.functional.cross_entropy(out.logits, labels[idx]).backward()
            opt.step()
    train = {"input_ids": ids[:N_TRAIN], "attention_mask": mask[:N_TRAIN],
             "labels": labels[:N_TRAIN]}
    test = {"input_ids": ids[N_TRAIN:], "attention_mask": mask[N_TRAIN:]}
    return model, ef.Trajectory.load(d), train, test, labels[N_TRAIN:]


def _exact(model, traj, test, **kw):
    """attribute(...) that must pass its certificate and reconstruct to 1e-9 of the change."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", ef.AttributionWarning)
        a = ef.attribute(model, traj, test, progress=False, **kw)
    assert a.certificate["problems"] == []
    change = float((a.final - a.initial).abs().max())
    assert change > 1e-4
    assert a.reconstruction_error <= 1e-9 * change, (a.reconstruction_error, change)
    return a


def _sum_data(a):
    return a.kernel.sum(a.dims.index("data"))


# ------------------------------------------------------------------------------------ the loss
def test_causal_lm_loss_matches_hugging_face():
    model = _gpt2()
    ids, mask = _tokens()
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    tg = {"labels": labels, "attention_mask": mask}
    ours = (causal_lm_loss(out.logits, tg) * causal_lm_batch_weights(tg)).sum()
    # Hugging Face upcasts the logits to float32 (logits.float()) before its loss
    assert abs(float(ours) - float(out.loss)) <= 1e-6 * float(out.loss)
    shift = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB),
                                              labels[:, 1:].reshape(-1), ignore_index=-100)
    assert abs(float(ours) - float(shift)) <= 1e-13 * float(shift)       # the same recipe
    tok = causal_lm_token_losses(out.logits, tg)
    assert tok.shape == (N_TRAIN + N_TEST, T - 1)
    assert torch.equal(tok == 0, mask[:, 1:] == 0)
    assert torch.equal(causal_lm_token_count(tg), mask[:, 1:].sum(1))
    # labels alone (-100 at the pads) and labels with the mask agree
    assert torch.allclose(causal_lm_loss(out.logits, labels), causal_lm_loss(out.logits, tg))
    mean = causal_lm_loss(out.logits, tg, reduction="mean")
    assert torch.allclose(mean, tok.sum(1) / mask[:, 1:].sum(1))
    with pytest.raises(ValueError, match="reduction"):
        causal_lm_loss(out.logits, tg, reduction="max")
    with pytest.raises(ValueError, match=r"logits \[B, T, V\]"):
        causal_lm_loss(out.logits[:, 0], tg)


# ------------------------------------------------------------------------------------ GPT-2
@pytest.mark.parametrize("data", ["all", "sample"])
def test_gpt2_lm_loss_and_position_logits_exact(gpt2_run, data):
    model, traj, train, test = gpt2_run
    kw = dict(data=data, train_data=train if data == "sample" else None,
              loss_fn=causal_lm_loss, quadrature="gauss-legendre:8")
    loss = _exact(model, traj, test, output="loss", **kw)
    last = _exact(model, traj, test, output=("position", -1, [3, 7]), **kw)
    assert loss.kernel.shape[-1] == N_TEST and last.kernel.shape[-2:] == (N_TEST, 2)
    for a in (loss, last):
        assert a.plan["attention"] == att.MATH_SDPA
        assert a.plan["per_sample"].startswith("loop over samples")   # HF's mask check
    with torch.no_grad():
        logits = model(input_ids=test["input_ids"], attention_mask=test["attention_mask"]).logits
    assert torch.allclose(last.final, logits[:, -1, [3, 7]], rtol=0, atol=1e-12)
    if data == "sample":          # the data axis sums to the data="all" result
        for a, o in ((loss, "loss"), (last, ("position", -1, [3, 7]))):
            ref = ef.attribute(model, traj, test, output=o, loss_fn=causal_lm_loss,
                               quadrature="gauss-legendre:8", progress=False)
            assert a.kernel.shape[a.dims.index("data")] == N_TRAIN
            scale = float(ref.kernel.abs().max())
            assert float((_sum_data(a) - ref.kernel).abs().max()) <= 1e-9 * scale


def test_gpt2_forward_mode_default_quadrature(gpt2_run):
    """SDPA under forward-mode AD: mode="forward" with the default quadrature ("auto": on GPT-2,
    Gauss–Legendre with an error estimate)."""
    model, traj, _train, test = gpt2_run
    with warnings.catch_warnings():
        warnings.simplefilter("error", ef.AttributionWarning)
        a = ef.attribute(model, traj, test, output="loss", loss_fn=causal_lm_loss, mode="forward",
                         progress=False)
    assert a.plan["mode"] == "forward" and a.plan["attention"] == att.MATH_SDPA
    tok = _exact(model, traj, test, output="token_losses", mode="forward",
                 quadrature="gauss-legendre:8")
    assert tok.kernel.shape == (N_TEST, T - 1)
    assert torch.allclose(tok.final.sum(1), _exact(model, traj, test, output="loss",
                                                   loss_fn=causal_lm_loss, mode="forward",
                                                   quadrature="gauss-legendre:8").final)


def test_gpt2_without_math_backend_plans_reverse_mode(gpt2_run, monkeypatch):
    """Where the math backend cannot be chosen, the fused CPU kernel has no forward-mode
    derivative: auto replans reverse mode (and says why); what needs forward mode is refused
    with a message naming the op, never torch's raw NotImplementedError."""
    model, traj, train, test = gpt2_run
    monkeypatch.setattr(att, "sdpa_kernel", None)
    a = _exact(model, traj, test, output="loss", loss_fn=causal_lm_loss,
               quadrature="gauss-legendre:8", data="sample", train_data=train)
    assert a.plan["mode"] == "reverse"
    assert "scaled_dot_product" in a.plan["mode_reason"]
    assert a.plan["attention"] == att.DEFAULT_SDPA
    with pytest.raises(ValueError, match=r"mode='forward'.*scaled_dot_product.*mode='reverse'"):
        ef.attribute(model, traj, test, output="loss", loss_fn=causal_lm_loss, mode="forward",
                     quadrature="gauss-legendre:8", progress=False)
    with pytest.raises(ValueError, match=r"adaptive.*scaled_dot_product.*gauss-legendre"):
        ef.attribute(model, traj, test, output="loss", loss_fn=causal_lm_loss, progress=False)


# ------------------------------------------------------------------------------------ BERT
@pytest.mark.parametrize("data", ["all", "sample"])
def test_bert_classification_exact(bert_run, data):
    model, traj, train, test, test_labels = bert_run
    kw = dict(data=data, train_data=train if data == "sample" else None,
              quadrature="gauss-legendre:8")
    logits = _exact(model, traj, test, **kw)
    loss = _exact(model, traj, test, output="loss", test_targets=test_labels, **kw)
    assert logits.kernel.shape[-2:] == (N_TEST, 3) and loss.kernel.shape[-1] == N_TEST
    assert logits.plan["attention"] == att.MATH_SDPA
    if data == "sample":
        ref = ef.attribute(model, traj, test, quadrature="gauss-legendre:8", progress=False)
        scale = float(ref.kernel.abs().max())
        assert float((_sum_data(logits) - ref.kernel).abs().max()) <= 1e-9 * scale
        # the same run through a tuple output (return_dict=False: a non-tensor input leaf) and
        # test targets given as a "labels" entry of the test dict
        tup = ef.attribute(model, traj, {**test, "return_dict": False, "labels": test_labels},
                           output="loss", data="sample", train_data=train,
                           quadrature="gauss-legendre:8", progress=False)
        assert torch.allclose(tup.kernel, loss.kernel, rtol=0, atol=1e-13)
