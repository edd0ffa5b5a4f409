"""Small float64 models and data for the tests and benchmarks (docs/design.md §12, testing).

    TinyMLP (D = 267), TinyTransformer (one attention block over 2 tokens) with mlp_data /
    token_data: the engine tests; SmallMLP (D = 51, optional frozen embedding) with small_data /
    small_model: the recorder and store tests.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

DT = torch.float64
N_SAMPLES, N_CLASSES = 24, 3          # SmallMLP's dataset


class TinyMLP(nn.Module):
    """5 -> 12 -> 12 -> 3 MLP (D = 267)."""

    def __init__(self, act: str = "tanh", d_in: int = 5, hidden: int = 12, d_out: int = 3):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, d_out)
        self.act = {"tanh": torch.tanh, "gelu": F.gelu, "relu": F.relu}[act]

    def forward(self, x):
        return self.out(self.act(self.fc2(self.act(self.fc1(x)))))


class TinyTransformer(nn.Module):
    """One attention block over 2 tokens from a vocabulary of 5, GELU MLP, predicting 5 classes."""

    def __init__(self, vocab: int = 5, d: int = 6, mlp: int = 8, act: str = "gelu"):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, d, bias=False)
        self.v = nn.Linear(d, d, bias=False)
        self.ln = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, mlp)
        self.fc2 = nn.Linear(mlp, d)
        self.unembed = nn.Linear(d, vocab)
        self.act = {"gelu": F.gelu, "relu": F.relu, "tanh": torch.tanh}[act]

    def forward(self, tokens):
        x = self.embed(tokens)                                   # [B, T, d]
        att = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2) / math.sqrt(x.shape[-1]), -1)
        x = x + att @ self.v(x)
        x = x + self.fc2(self.act(self.fc1(self.ln(x))))
        return self.unembed(x[:, -1])


def mlp_data(n: int = 16, m: int = 4, d_in: int = 5, classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n + m, d_in, generator=g, dtype=DT)
    Y = torch.randint(0, classes, (n + m,), generator=g)
    return X[:n], Y[:n], X[n:], Y[n:]


def token_data(n: int = 16, m: int = 4, vocab: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randint(0, vocab, (n + m, 2), generator=g)
    Y = (X[:, 0] + X[:, 1]) % vocab
    return X[:n], Y[:n], X[n:], Y[n:]


class SmallMLP(nn.Module):
    """4 -> 6 -> 3 tanh MLP (D = 51), optionally with a frozen input embedding."""

    def __init__(self, frozen_embed: bool = False):
        super().__init__()
        self.embed = nn.Linear(4, 4, bias=False)
        self.embed.weight.requires_grad_(not frozen_embed)
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, N_CLASSES)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(self.embed(x))))


def small_data(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N_SAMPLES, 4, generator=g).to(dtype)
    Y = torch.randint(0, N_CLASSES, (N_SAMPLES,), generator=g)
    return X, Y


def small_model(dtype=torch.float64, seed=0, frozen_embed=False):
    torch.manual_seed(seed)
    return SmallMLP(frozen_embed).to(dtype)
