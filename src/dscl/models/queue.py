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
        n = keys.shape[0]  # the pointer stays on the device: a GPU step never waits to read it
        slots = (torch.arange(n, device=keys.device) + self.ptr) % self.size
        self.keys[slots] = keys.to(self.keys.dtype)
        self.labels[slots] = labels.to(self.labels.dtype)
        self.ptr.add_(n).remainder_(self.size)

    def num_valid(self) -> int:
        return int((self.labels >= 0).sum())


class ClassBalancedQueue(LabelledQueue):
    """``size // num_classes`` slots per class, each class's slots a FIFO of its newest keys.

    The ablation of the supplement's Table 3: every class keeps the same number of keys in the
    queue whatever its share of the data, so tail anchors meet as many same-class keys as head
    ones once their slots have filled. Slot ``c * per_class + j`` belongs to class ``c``; slots
    not yet written hold label -1. Keys, labels and the per-class write pointers are buffers.
    """

    def __init__(self, size: int, dim: int, num_classes: int):
        if num_classes < 1 or size < num_classes:
            raise ValueError(f"a class-balanced queue needs at least one slot per class: size {size}, "
                             f"{num_classes} classes")
        self.per_class = size // num_classes
        super().__init__(self.per_class * num_classes, dim)
        self.register_buffer("class_ptr", torch.zeros(num_classes, dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys: Tensor, labels: Tensor) -> None:
        labels = labels.to(self.labels.device).long()
        for c in torch.unique(labels).tolist():
            mine = keys[labels == c][-self.per_class :]  # in batch order; only the newest fit
            n, start = mine.shape[0], int(self.class_ptr[c])
            slots = c * self.per_class + (torch.arange(n, device=keys.device) + start) % self.per_class
            self.keys[slots] = mine.to(self.keys.dtype)
            self.labels[slots] = c
            self.class_ptr[c] = (start + n) % self.per_class
