"""Batch iterators: seeded order, exact resume points, rank shards that add up to one process."""

import torch
import torch.nn.functional as F

from engine.data import generator, random_crop_flip
from helpers import synthetic_batches as batches


def test_rank_shards_reassemble_the_single_process_batches():
    single = list(batches(batch_size=8).batches(epoch=2))
    shards = [list(batches(2, r, batch_size=4).batches(epoch=2)) for r in range(2)]
    assert len(single) == len(shards[0]) == len(shards[1]) == 50 // 8
    for whole, a, b in zip(single, *shards, strict=True):
        assert torch.equal(torch.cat([a[0], b[0]]), whole[0]) and torch.equal(torch.cat([a[1], b[1]]), whole[1])


def test_evaluation_sees_every_image_once_across_ranks():
    labels = [torch.cat([y for _, y in batches(3, r, train=False, batch_size=2).batches()]) for r in range(3)]
    single = torch.cat([y for _, y in batches(train=False, batch_size=6).batches()])
    assert sum(len(lbl) for lbl in labels) == len(single) == 50
    assert sorted(torch.cat(labels).tolist()) == sorted(single.tolist())


def test_order_depends_on_seed_and_epoch_and_resumes_at_any_batch():
    it = batches()
    e0, e1 = list(it.batches(0)), list(it.batches(1))
    assert not torch.equal(e0[0][1], e1[0][1])
    assert all(torch.equal(a[0], b[0]) for a, b in zip(e0, list(it.batches(0)), strict=True))  # repeatable
    resumed = list(it.batches(0, start=3))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(e0[3:], resumed, strict=True))


def test_random_crop_flip_against_a_per_image_loop():
    x = torch.randn(6, 2, 5, 7)
    out = random_crop_flip(x, 2, generator(1, 2, 3))
    gen = generator(1, 2, 3)  # the same draws, in the same order: flips, then row and column offsets
    flip = torch.rand(6, generator=gen) < 0.5
    dy, dx = torch.randint(0, 5, (6,), generator=gen), torch.randint(0, 5, (6,), generator=gen)
    for i in range(6):
        crop = F.pad(x[i], (2, 2, 2, 2))[:, dy[i] : dy[i] + 5, dx[i] : dx[i] + 7]
        torch.testing.assert_close(out[i], crop.flip(-1) if flip[i] else crop)
