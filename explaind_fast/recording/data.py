"""Dataset helpers that hand the training loop the dataset indices of every batch.

ExPLAIND attributes to training samples, so the recorder must know which samples formed each batch
(``TrajectoryRecorder.set_batch(indices)``). These helpers save writing a dataset wrapper::

    loader = indexed_loader((X, Y), batch_size=64, shuffle=True, generator=g)
    for indices, inputs, targets in loader:
        recorder.set_batch(indices)            # weights default to 1/len(indices): a mean loss
        loss = loss_fn(model(inputs), targets)  # reduction="mean"
        ...
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset


class IndexedDataset(Dataset):
    """Wraps a map-style dataset whose items are ``(input, target)``; items become
    ``(index, input, target)`` so that the default collate yields ``(indices [B] int64, inputs,
    targets)``.

    ``dataset`` may also be a tuple of tensors with equal first dimension (a TensorDataset is built).
    """

    def __init__(self, dataset: Union[Dataset, Sequence[torch.Tensor]]):
        if isinstance(dataset, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in dataset):
            sizes = {int(t.shape[0]) for t in dataset}
            if len(sizes) != 1:
                raise ValueError(f"IndexedDataset: tensors have different first dimensions {sizes}")
            dataset = TensorDataset(*dataset)
        if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise TypeError("IndexedDataset needs a map-style dataset (with __len__ and "
                            "__getitem__) or a tuple of tensors; iterable datasets have no indices")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Tuple[Any, ...]:
        item = self.dataset[index]
        if not isinstance(item, (tuple, list)):
            item = (item,)
        return (index, *item)


def indexed_loader(dataset: Union[Dataset, Sequence[torch.Tensor]], batch_size: Optional[int] = None,
                   shuffle: bool = False, generator: Optional[torch.Generator] = None,
                   **kwargs) -> DataLoader:
    """A DataLoader over ``IndexedDataset(dataset)`` yielding ``(indices, inputs, targets)``.

    Args:
        dataset: map-style dataset of ``(input, target)`` items, or a tuple of tensors.
        batch_size: samples per batch; ``None`` means full batch (the whole dataset each step).
        shuffle, generator, **kwargs: passed to ``torch.utils.data.DataLoader`` (pass a seeded
            generator for a reproducible order).
    """
    indexed = IndexedDataset(dataset)
    if batch_size is None:
        batch_size = len(indexed)
    if batch_size < 1:
        raise ValueError(f"indexed_loader: batch_size must be >= 1, got {batch_size}")
    return DataLoader(indexed, batch_size=batch_size, shuffle=shuffle, generator=generator, **kwargs)
