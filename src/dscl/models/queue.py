"""The labelled FIFO memory queue of keys."""

import torch
from torch import Tensor, nn


class LabelledQueue(nn.Module):
    """K keys with their labels, overwritten oldest first.

    Slots never written hold label -1 and take part in no loss. Keys, labels and the write
    pointer are buffers, so they travel with the model's state dict (and so with checkpoints).
    K need not be a multiple of the batch size: a write wraps around the end.
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        if size < 1:
            raise ValueError(f"queue size must be >= 1, got {size}")
        self.register_buffer("keys", torch.zeros(size, dim))  # (K, D)
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.long))  # (K,)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    @torch.no_grad()
    def enqueue(self, keys: Tensor, labels: Tensor) -> None:
        """Write (N, D) keys and their (N,) labels over the oldest slots."""
        if keys.shape[0] > self.size:  # only the newest K survive anyway
            keys, labels = keys[-self.size :], labels[-self.size :]
        n, start = keys.shape[0], int(self.ptr)
        slots = (torch.arange(n, device=keys.device) + start) % self.size
        self.keys[slots] = keys.to(self.keys.dtype)
        self.labels[slots] = labels.to(self.labels.dtype)
        self.ptr.fill_((start + n) % self.size)

    def num_valid(self) -> int:
        return int((self.labels >= 0).sum())
