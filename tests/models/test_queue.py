import torch

from dscl.models import LabelledQueue


def test_starts_empty_and_wraps_when_size_is_not_a_multiple_of_the_batch():
    queue = LabelledQueue(size=10, dim=2)
    assert queue.num_valid() == 0 and bool((queue.labels == -1).all())
    written = []
    for step in range(4):  # 4 batches of 3 into 10 slots: the last write wraps around
        keys = torch.full((3, 2), float(step)) + torch.arange(3.0)[:, None] / 10
        labels = torch.arange(3) + 10 * step
        queue.enqueue(keys, labels)
        written.extend(zip(keys.tolist(), labels.tolist()))
        assert queue.num_valid() == min(3 * (step + 1), 10)
    # a literal FIFO of the last 10 writes, laid out from slot 0 with wrap-around
    expected = {}
    for n, (k, lab) in enumerate(written):
        expected[n % 10] = (k, lab)
    for slot, (k, lab) in expected.items():
        assert queue.keys[slot].tolist() == k and int(queue.labels[slot]) == lab
    assert int(queue.ptr) == 12 % 10


def test_batch_larger_than_queue_keeps_newest():
    queue = LabelledQueue(size=4, dim=1)
    queue.enqueue(torch.arange(6.0)[:, None], torch.arange(6))
    assert sorted(queue.labels.tolist()) == [2, 3, 4, 5]


def test_state_round_trip():
    queue = LabelledQueue(size=7, dim=3)
    queue.enqueue(torch.randn(5, 3), torch.tensor([1, 2, 3, 4, 5]))
    restored = LabelledQueue(size=7, dim=3)
    restored.load_state_dict(queue.state_dict())
    assert torch.equal(restored.keys, queue.keys) and torch.equal(restored.labels, queue.labels)
    assert int(restored.ptr) == 5
    # both continue identically
    batch = torch.randn(4, 3), torch.tensor([6, 7, 8, 9])
    queue.enqueue(*batch)
    restored.enqueue(*batch)
    assert torch.equal(restored.keys, queue.keys) and torch.equal(restored.labels, queue.labels)
