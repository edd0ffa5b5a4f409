"""Datasets of the demos: modular addition pairs (grokking) and scikit-learn's 8×8 digits.

Both are built in memory, deterministically from a seed, with no download at run time.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ModAddData", "modular_addition_data", "DigitsData", "digits_data"]


@dataclass
class ModAddData:
    """Token sequences ``[a, p, b, p+1]`` (``[a][+][b][=]``) with labels ``(a + b) mod p``.

    Attributes: p; train_x ``[n_train, 4]`` int64; train_y ``[n_train]`` int64; test_x, test_y.
    """

    p: int
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    def sums(self, split: str = "test") -> torch.Tensor:
        """a + b (not reduced) of each sample, for ordering plots by (a+b) and (a+b) mod p."""
        x = self.test_x if split == "test" else self.train_x
        return x[:, 0] + x[:, 2]


def modular_addition_data(p: int = 113, n_train: int = 4000, n_test: int = 2000,
                          seed: int = 0) -> ModAddData:
    """All pairs (a, b) with 0 ≤ b ≤ a < p, shuffled with ``seed``, split into disjoint train/test.

    The paper (Appendix E.2) enforces a ≥ b and draws 4000 train and 2000 test pairs at p = 113
    (it counts 113·112/2 = 6328 pairs, i.e. a > b; we keep the a = b pairs its text allows, 6441).
    Raises ValueError when n_train + n_test exceeds the p(p+1)/2 available pairs.
    """
    if p < 2:
        raise ValueError(f"p must be at least 2, got {p}")
    total = p * (p + 1) // 2
    if n_train < 1 or n_test < 0 or n_train + n_test > total:
        raise ValueError(f"n_train={n_train} + n_test={n_test} must be positive and at most the "
                         f"{total} pairs with a ≥ b at p={p}")
    a, b = torch.tril_indices(p, p)                       # a ≥ b, row-major
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    a, b = a[order], b[order]
    x = torch.stack([a, torch.full_like(a, p), b, torch.full_like(a, p + 1)], dim=1)
    y = (a + b) % p
    return ModAddData(p, x[:n_train], y[:n_train],
                      x[n_train:n_train + n_test], y[n_train:n_train + n_test])


@dataclass
class DigitsData:
    """scikit-learn's 8×8 digits, pixel values scaled from 0..16 to [0, 1].

    Attributes: train_x ``[n_train, 1, 8, 8]``, train_y ``[n_train]`` int64, test_x, test_y.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def digits_data(n_train: int = 1200, n_test: int = 597, seed: int = 0,
                dtype: torch.dtype = torch.float32) -> DigitsData:
    """Seeded disjoint train/test split of the 1797 digits (default: 1200 / the other 597).

    Raises ValueError when n_train + n_test exceeds 1797.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=dtype).unsqueeze(1) / 16.0
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    total = labels.numel()
    if n_train < 1 or n_test < 0 or n_train + n_test > total:
        raise ValueError(f"n_train={n_train} + n_test={n_test} must be positive and at most the "
                         f"{total} digit images")
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    tr, te = order[:n_train], order[n_train:n_train + n_test]
    return DigitsData(images[tr], labels[tr], images[te], labels[te])
