"""The models of the paper's validations, sized for the demos, tests and benchmarks.

* :class:`ModularAdditionTransformer` — the one-layer transformer of the grokking case study
  (paper Appendix E.2; Nanda et al. 2023; Varma et al. 2023).
* :class:`DigitsCNN` — a small CNN like the paper's MNIST model (Appendix E.1), for scikit-learn's
  8×8 digits.

Module names are chosen so that parameter groups by name pattern give the paper's layers:
``embed``, ``attn.q``/``attn.k``/``attn.v`` (attention "in", the paper's attention encoder),
``attn.o`` (attention "out", the attention decoder), ``mlp.linear1``, ``mlp.linear2``, ``decoder``.
See :data:`TRANSFORMER_LAYERS` and :data:`CNN_LAYERS`.

The constructor signatures are stable: other modules (benchmarks, tests) import these.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

__all__ = ["ModularAdditionTransformer", "DigitsCNN", "TRANSFORMER_LAYERS", "CNN_LAYERS"]

#: Paper's layer names (Figure 3a legend) → parameter-name patterns of ModularAdditionTransformer.
TRANSFORMER_LAYERS = {
    "embedding": ["embed.*"],
    "attention in": ["attn.q.*", "attn.k.*", "attn.v.*"],
    "attention out": ["attn.o.*"],
    "linear 1": ["mlp.linear1.*"],
    "linear 2": ["mlp.linear2.*"],
    "decoder": ["decoder.*"],
}

#: Layer names → parameter-name patterns of DigitsCNN (the output layer is ``linear2``).
CNN_LAYERS = {
    "conv 1": ["conv1.*"],
    "conv 2": ["conv2.*"],
    "linear 1": ["linear1.*"],
    "linear 2 (output)": ["linear2.*"],
}

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


def _activation(act: str):
    if act not in _ACTIVATIONS:
        raise ValueError(f"act must be one of {sorted(_ACTIVATIONS)}, got {act!r}")
    return _ACTIVATIONS[act]


class _Attention(nn.Module):
    """Multi-head self-attention with separate q/k/v/o projections, no biases (as Nanda et al.;
    this gives the D = 97,331 parameters of docs/design.md §11 at the paper's size). Only the queries of the positions in ``query_positions`` are
    computed, because the one-layer model's output reads the last position only."""

    def __init__(self, d_model: int, n_heads: int, d_head: int):
        super().__init__()
        self.n_heads, self.d_head = n_heads, d_head
        inner = n_heads * d_head
        self.q = nn.Linear(d_model, inner, bias=False)
        self.k = nn.Linear(d_model, inner, bias=False)
        self.v = nn.Linear(d_model, inner, bias=False)
        self.o = nn.Linear(inner, d_model, bias=False)

    def forward(self, x: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        # x: [B, T, d_model] keys/values; query: [B, Tq, d_model]
        B, T, _ = x.shape
        Tq = query.shape[1]
        h, dh = self.n_heads, self.d_head
        q = self.q(query).view(B, Tq, h, dh).transpose(1, 2)      # [B, h, Tq, dh]
        k = self.k(x).view(B, T, h, dh).transpose(1, 2)           # [B, h, T, dh]
        v = self.v(x).view(B, T, h, dh).transpose(1, 2)
        # softmax(q kᵀ / √dh) v as one op: the attribution runs it on the math backend (C++);
        # written out, its scalar division takes a Python decomposition under vmap(jvp);
        # bit-identical when √dh is a power of two (dh = 16)
        z = F.scaled_dot_product_attention(q, k, v)               # [B, h, Tq, dh]
        return self.o(z.transpose(1, 2).reshape(B, Tq, h * dh))


class _MLP(nn.Module):
    def __init__(self, d_model: int, d_mlp: int, act: str):
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_mlp)
        self.linear2 = nn.Linear(d_mlp, d_model)
        self.act = _activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.act(self.linear1(x)))


class ModularAdditionTransformer(nn.Module):
    """One-layer transformer for ``a + b mod p`` on token sequences ``[a][+][b][=]``.

    embedding → residual + attention (W_Q, W_K, W_V, W_O; ``n_heads`` heads of ``d_head``) →
    residual + MLP (linear 1, ``act``, linear 2) → decoder (unembedding to the vocabulary).
    No positional encoding, no layer norm, no dropout (paper Appendix E.2). Tokens ``0..p-1`` are
    numbers, ``p`` is ``+`` and ``p+1`` is ``=``, so the vocabulary has ``p + 2`` tokens.

    Because there is a single layer, the logits at the last (``=``) token depend on the other
    positions only through the keys and values; queries, MLP and decoder are evaluated at the last
    position only, which is exactly the full model's output there at a quarter of the cost.

    Args:
        p: the modulus. d_model, n_heads, d_head, d_mlp: sizes. vocab: defaults to ``p + 2``.
        act: "relu" (the paper's) or "gelu" (smooth: Gauss–Legendre quadrature is then exact).
    Input: int64 ``[B, 4]`` tokens. Output: ``[B, vocab]`` logits at the last position.
    """

    def __init__(self, p: int = 113, d_model: int = 64, n_heads: int = 4, d_head: int = 16,
                 d_mlp: int = 512, vocab: int | None = None, act: str = "relu"):
        super().__init__()
        if p < 2:
            raise ValueError(f"p must be at least 2, got {p}")
        vocab = p + 2 if vocab is None else vocab
        if vocab < p + 2:
            raise ValueError(f"vocab must hold the p numbers plus '+' and '=' (≥ {p + 2}), got {vocab}")
        self.p, self.vocab = p, vocab
        self.embed = nn.Embedding(vocab, d_model)
        self.attn = _Attention(d_model, n_heads, d_head)
        self.mlp = _MLP(d_model, d_mlp, act)
        self.decoder = nn.Linear(d_model, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, seq] int64, got shape {tuple(tokens.shape)}")
        x = self.embed(tokens)                       # [B, T, d_model]
        last = x[:, -1:, :]
        h = last + self.attn(x, last)                # [B, 1, d_model]
        h = h + self.mlp(h)
        return self.decoder(h[:, 0, :])              # [B, vocab]


class DigitsCNN(nn.Module):
    """Small CNN for 1×8×8 images (scikit-learn digits), shaped like the paper's MNIST model.

    Two conv blocks (3×3 conv with padding 1 → 2×2 max-pool → ``act``): 8×8 → 4×4 → 2×2, then
    ``linear1`` (channels2·4 → hidden) → ``act`` → ``linear2`` (hidden → 10 logits, the output layer).

    Input: ``[B, 1, 8, 8]`` floats. Output: ``[B, 10]`` logits.
    """

    def __init__(self, act: str = "relu", channels1: int = 8, channels2: int = 16,
                 hidden: int = 32, num_classes: int = 10):
        super().__init__()
        self.act = _activation(act)
        self.conv1 = nn.Conv2d(1, channels1, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(channels1, channels2, kernel_size=3, padding=1)
        self.linear1 = nn.Linear(channels2 * 4, hidden)
        self.linear2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != (1, 8, 8):
            raise ValueError(f"DigitsCNN expects [batch, 1, 8, 8] images, got {tuple(x.shape)}")
        x = self.act(F.max_pool2d(self.conv1(x), 2))
        x = self.act(F.max_pool2d(self.conv2(x), 2))
        x = self.act(self.linear1(x.flatten(1)))
        return self.linear2(x)
