"""Hugging Face runs recorded as a researcher runs them: with the Trainer (a callback, nothing else)
and with a plain loop (torch's clipping, accumulation, Hugging Face's per-token loss weights).

Tiny GPT-2 (causal LM) and BERT (masked LM) built from configs in float64 (no download), dropout 0.
Each run is attributed by layer × step (data="all") and by training sample (data="sample"), the
language-model loss of test sequences; every result must pass its certificate (no
AttributionWarning: the recomputed gradients reproduce every recorded update to < 1e-9 relative)
and reconstruct the output change to 1e-9 relative.

Trainer settings exercised: AdamW with the decay / no-decay param groups (weight_decay=0.1), a
linear schedule with one warmup step (lr 0 at the first step: the first moment is stored), the
Trainer's own max_grad_norm clipping (small enough to clip), gradient accumulation over 2
micro-batches with dynamic padding (the micro-batch is padded to its longest sequence, the
attribution's train_data to the longest of all), the last step of an epoch with fewer micro-batches.
GPT-2 trains with ``compute_loss_func=causal_lm_trainer_loss`` (Hugging Face's loss without its
float32 upcast), BERT with its own built-in loss (a per-micro-batch mean over the masked tokens that
the Trainer does not divide by the accumulation steps: the callback measures this weight).
"""
import tempfile
import warnings

import pytest
import torch

import explaind_fast as ef
from explaind_fast.losses import causal_lm_batch_weights, causal_lm_loss, masked_lm_loss

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
transformers.logging.set_verbosity_error()
hf = pytest.importorskip("explaind_fast.integrations.huggingface")

DT = torch.float64
N_TRAIN, N_TEST, T, VOCAB, MASK_ID = 10, 3, 8, 40, 1
LENGTHS = [8, 6, 7, 5, 8, 4, 6, 8, 7, 5, 8, 6, 7]         # train then test


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=VOCAB, n_positions=16,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                  eos_token_id=0, attn_implementation="sdpa")
    return transformers.GPT2LMHeadModel(cfg).to(DT)


def _bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=32,
                                  max_position_embeddings=16, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, attn_implementation="sdpa")
    return transformers.BertForMaskedLM(cfg).to(DT)


def _items(kind):
    """Variable-length sequences as dataset items (lists, like a tokenized dataset). Causal LM:
    labels = input_ids. Masked LM: a fixed masking (the collator stays deterministic): every
    third position from 1 is masked, labels −100 elsewhere."""
    g = torch.Generator().manual_seed(7)
    items = []
    for n in LENGTHS:
        ids = torch.randint(2, VOCAB, (n,), generator=g)
        if kind == "causal":
            items.append({"input_ids": ids.tolist(), "labels": ids.tolist()})
        else:
            masked = torch.zeros(n, dtype=torch.bool)
            masked[1::3] = True
            items.append({"input_ids": ids.masked_fill(masked, MASK_ID).tolist(),
                          "labels": ids.masked_fill(~masked, -100).tolist()})
    return items


def collate(features):
    """Dynamic right padding to the longest sequence: pad id 0, attention mask 0, labels −100."""
    L = max(len(f["input_ids"]) for f in features)
    out = {"input_ids": [], "attention_mask": [], "labels": []}
    for f in features:
        pad = L - len(f["input_ids"])
        out["input_ids"].append(f["input_ids"] + [0] * pad)
        out["attention_mask"].append([1] * len(f["input_ids"]) + [0] * pad)
        out["labels"].append(f["labels"] + [-100] * pad)
    return {k: torch.tensor(v) for k, v in out.items()}


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _args(**kw):
    kw = {**dict(output_dir=tempfile.mkdtemp(prefix="explaind_hf_out_"),
                 per_device_train_batch_size=2, gradient_accumulation_steps=2,
                 num_train_epochs=2, learning_rate=3e-3, weight_decay=0.1, warmup_steps=1,
                 max_grad_norm=0.5, report_to=[], use_cpu=True, logging_strategy="no",
                 save_strategy="no", seed=0, disable_tqdm=True), **kw}
    return transformers.TrainingArguments(**kw)


def _trainer_run(kind):
    model = _gpt2() if kind == "causal" else _bert()
    items = _items(kind)
    extra = {"compute_loss_func": hf.causal_lm_trainer_loss} if kind == "causal" else {}
    trainer = transformers.Trainer(model=model, args=_args(), data_collator=collate,
                                   train_dataset=ListDataset(items[:N_TRAIN]), **extra)
    d = tempfile.mkdtemp(prefix=f"explaind_hf_{kind}_")
    rec = hf.record_trainer(trainer, d, fsync=False)
    trainer.train()
    model.eval()
    return model, ef.Trajectory.load(d), rec.train_data(), collate(items[N_TRAIN:]), rec


@pytest.fixture(scope="module")
def gpt2_trainer():
    return _trainer_run("causal")


@pytest.fixture(scope="module")
def bert_trainer():
    return _trainer_run("masked")


def _plain_run(kind):
    """The plain-loop recipe: micro-batches of 2, accumulation over 2, the loss Hugging Face's
    (per-token mean over the accumulated step: weights 1/N from causal_lm_batch_weights with
    num_items=N) or BERT's per-micro-batch mean divided by the accumulation steps (scale=1/2),
    torch's clip_grad_norm_, a linear schedule, AdamW with two param groups."""
    model = _gpt2() if kind == "causal" else _bert()
    items = _items(kind)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}], lr=3e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 - t / 8)
    loss_fn = causal_lm_loss if kind == "causal" else masked_lm_loss
    d = tempfile.mkdtemp(prefix=f"explaind_plain_{kind}_")
    g = torch.Generator().manual_seed(5)
    with ef.TrajectoryRecorder(model, opt, d, dataset_size=N_TRAIN, fsync=False) as rec:
        for _ in range(4):
            micro = torch.randperm(N_TRAIN, generator=g)[:4].split(2)
            batches = [collate([items[i] for i in idx.tolist()]) for idx in micro]
            n_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
            opt.zero_grad()
            for idx, b in zip(micro, batches):
                targets = {"labels": b["labels"], "attention_mask": b["attention_mask"]}
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                if kind == "causal":      # Hugging Face's loss over the accumulated step
                    rec.set_batch(idx, causal_lm_batch_weights(targets, num_items=n_tokens))
                    loss = loss_fn(logits, targets).sum() / n_tokens
                else:                     # mean over the micro-batch's masked tokens, / 2
                    w = torch.full((len(idx),), 1.0 / int((b["labels"] != -100).sum()))
                    rec.set_batch(idx, w, scale=1 / 2)
                    loss = loss_fn(logits, targets).sum() * w[0].item() / 2
                loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
            sched.step()
    model.eval()
    return model, ef.Trajectory.load(d), collate(items[:N_TRAIN]), collate(items[N_TRAIN:])


@pytest.fixture(scope="module")
def gpt2_plain():
    return _plain_run("causal")


@pytest.fixture(scope="module")
def bert_plain():
    return _plain_run("masked")


def _layers(model):
    """Parameter groups by layer: embeddings, each transformer block, the rest (head, final norm)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    groups = {"embeddings": [n for n in names if "embeddings" in n or ".wte." in n or ".wpe." in n]}
    for i in range(2):
        groups[f"block{i}"] = [n for n in names if f".h.{i}." in n or f".layer.{i}." in n]
    used = {n for v in groups.values() for n in v}
    groups["head"] = [n for n in names if n not in used]
    return groups


def _exact(model, traj, test, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ef.AttributionWarning)
        a = ef.attribute(model, traj, test, output="loss", progress=False,
                         quadrature="gauss-legendre:12", **kw)
    assert a.certificate["problems"] == []
    change = float((a.final - a.initial).abs().max())
    assert change > 1e-4
    assert a.reconstruction_error <= 1e-9 * change, (a.reconstruction_error, change)
    return a


def _check(model, traj, train, test, loss_fn):
    groups = _layers(model)
    by_layer = _exact(model, traj, test, loss_fn=loss_fn, params=groups, steps="each")
    assert by_layer.dims == ("step", "param", "test") and \
        by_layer.kernel.shape == (traj.num_steps, len(groups), N_TEST)
    by_sample = _exact(model, traj, test, loss_fn=loss_fn, data="sample", train_data=train)
    assert by_sample.dims == ("data", "test") and by_sample.kernel.shape == (N_TRAIN, N_TEST)
    # the two decompositions split the same change
    assert torch.allclose(by_layer.kernel.sum((0, 1)) + by_layer.reg.sum((0, 1)),
                          by_sample.kernel.sum(0) + by_sample.reg, rtol=0, atol=1e-12)
    assert float(by_sample.step_identity.max()) < 1e-9


# ------------------------------------------------------------------------------------ Trainer
def test_gpt2_trainer(gpt2_trainer):
    model, traj, train, test, rec = gpt2_trainer
    # 10 samples, micro-batches of 2, accumulation 2: per epoch 2 steps of 2 micro-batches and a
    # last step of 1; two epochs
    assert traj.num_steps == 6
    sizes = [int(traj.step(s).batch_indices.numel()) for s in range(6)]
    assert sizes == [4, 4, 2, 4, 4, 2]
    assert sorted(torch.cat([traj.step(s).batch_indices for s in range(3)]).tolist()) == \
        list(range(N_TRAIN))                       # one epoch = every sample once
    assert traj.step(0).lr == [0.0, 0.0] and traj.step(0).exp_avg is not None   # warmup
    assert len(traj.step(1).lr) == 2 and traj.step(1).weight_decay == [0.1, 0.0]
    clips = [traj.step(s).clip_factor for s in range(6)]
    assert min(clips) < 1.0                        # the Trainer's max_grad_norm clipped
    assert set(rec.weights_seen) == {"1/num_items_in_batch"}
    assert rec.recorder is None                    # closed at the end of training
    _check(model, traj, train, test, causal_lm_loss)


def test_bert_trainer(bert_trainer):
    model, traj, train, test, rec = bert_trainer
    assert traj.num_steps == 6
    # BERT's own loss: the mean over the micro-batch's masked tokens, not divided by the
    # accumulation steps (the model accepts loss kwargs, so the Trainer takes it as scaled)
    # (a step of one micro-batch: num_items_in_batch equals its tokens, the first name is kept)
    assert "1/tokens of the micro-batch" in rec.weights_seen and \
        set(rec.weights_seen) <= {"1/tokens of the micro-batch", "1/num_items_in_batch"}
    assert min(traj.step(s).clip_factor for s in range(6)) < 1.0
    _check(model, traj, train, test, masked_lm_loss)


def test_trainer_with_hugging_faces_own_causal_loss(tmp_path):
    """Without compute_loss_func GPT-2 trains with Hugging Face's loss, logits upcast to float32:
    the weights are still measured exactly (1/N), data="all" is exact as for any run, and
    per-sample data is exact up to that float32 rounding of the training gradients (the
    certificate's float64 tolerance flags it: measured 1e-8..1e-6 relative)."""
    model = _gpt2()
    items = _items("causal")
    trainer = transformers.Trainer(model=model, args=_args(num_train_epochs=1),
                                   data_collator=collate, train_dataset=ListDataset(items[:N_TRAIN]))
    rec = hf.record_trainer(trainer, tmp_path / "t", fsync=False)
    trainer.train()
    model.eval()
    traj = ef.Trajectory.load(tmp_path / "t")
    assert set(rec.weights_seen) == {"1/num_items_in_batch"}
    test = collate(items[N_TRAIN:])
    _exact(model, traj, test, loss_fn=causal_lm_loss, params=_layers(model), steps="each")
    with pytest.warns(ef.AttributionWarning, match="step identity"):
        a = ef.attribute(model, traj, test, output="loss", loss_fn=causal_lm_loss, data="sample",
                         train_data=rec.train_data(), quadrature="gauss-legendre:8",
                         progress=False)
    assert 1e-10 < float(a.step_identity.max()) < 1e-5, a.step_identity


def test_trainer_loss_that_is_not_a_weighted_sum_refused(tmp_path):
    """Label smoothing: the Trainer's loss is not Σ_k w_k·causal_lm_loss_k for any weights."""
    model = _gpt2()
    items = _items("causal")
    trainer = transformers.Trainer(model=model, args=_args(label_smoothing_factor=0.1),
                                   data_collator=collate, train_dataset=ListDataset(items[:N_TRAIN]))
    hf.record_trainer(trainer, tmp_path / "t", fsync=False)
    with pytest.raises(RuntimeError, match="not a uniformly weighted sum"):
        trainer.train()


# ------------------------------------------------------------------------------------ plain loops
def test_gpt2_plain_loop(gpt2_plain):
    model, traj, train, test = gpt2_plain
    assert traj.num_steps == 4 and min(traj.step(s).clip_factor for s in range(4)) < 1.0
    _check(model, traj, train, test, causal_lm_loss)


def test_bert_plain_loop(bert_plain):
    model, traj, train, test = bert_plain
    _check(model, traj, train, test, masked_lm_loss)


def test_trainer_run_attributed_with_a_fresh_model(gpt2_trainer):
    """The Trainer's run attributed with a freshly built model (its buffers and weights unused)."""
    model, traj, train, test, _ = gpt2_trainer
    fresh = _gpt2().eval()
    a = _exact(fresh, traj, test, loss_fn=causal_lm_loss)
    b = _exact(model, traj, test, loss_fn=causal_lm_loss)
    assert torch.equal(a.kernel, b.kernel) and torch.equal(a.final, b.final)
