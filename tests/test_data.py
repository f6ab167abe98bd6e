"""Tests for trainers.data: batch sizes, resumable sharded order, eval shards, loaders, augmentation."""

from __future__ import annotations

import pytest
import torch

from launcher.config import ConfigError
from trainers.core.data import (
    Augment,
    TensorSplit,
    EvalShard,
    Normalize,
    ResumableDistributedSampler,
    shifted_crops,
    make_loader,
    micro_batch_size,
)

CPU = torch.device("cpu")


class TinySplit(TensorSplit):
    """A split held as tensors, (N, 3, 8, 8) uint8 images and (N,) labels: what both loaders accept."""

    @property
    def images(self) -> torch.Tensor:
        return self.tensors[0]

    @property
    def labels(self) -> torch.Tensor:
        return self.tensors[1]


def augmenter(n: int, seed: int = 0, **kwargs):
    """An Augment with its seed bound, called as (images, index, epoch)."""
    aug = Augment(n, **kwargs)
    return lambda x, idx, epoch: aug(x, idx, epoch, seed)


def tiny_split(n: int, seed: int = 0, size: int = 8) -> TinySplit:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,), generator=g)
    return TinySplit(images, labels)


def sampler(n: int, world: int, rank: int, seed: int, batch: int) -> ResumableDistributedSampler:
    return ResumableDistributedSampler(tiny_split(n), num_replicas=world, rank=rank, seed=seed,
                                       rank_batch_size=batch)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The full order of an epoch: what the single rank of a world of one sees."""
    s = sampler(n, 1, 0, seed, 1)
    s.set_epoch(epoch)
    return list(s)


# --------------------------------------------------------------------------- micro_batch_size


@pytest.mark.parametrize("global_batch, world, accum, expected",
                         [(512, 1, 1, 512), (512, 4, 1, 128), (512, 4, 2, 64), (12, 3, 1, 4), (6, 3, 2, 1)])
def test_per_rank_batch_divides(global_batch, world, accum, expected):
    assert micro_batch_size(global_batch, world, accum) == expected


@pytest.mark.parametrize("global_batch, world, accum, parts, lower, upper",
                         [(100, 3, 1, 3, 99, 102), (100, 4, 2, 8, 96, 104), (130, 4, 1, 4, 128, 132)])
def test_per_rank_batch_error_names_key_and_suggests_multiples(global_batch, world, accum, parts, lower, upper):
    with pytest.raises(ConfigError) as info:
        micro_batch_size(global_batch, world, accum)
    msg = str(info.value)
    assert f"train.batch_size={global_batch}" in msg
    assert f"multiple of {parts}" in msg
    assert f"e.g. {lower} or {upper}" in msg
    assert lower % parts == 0 and upper % parts == 0 and lower < global_batch < upper


def test_per_rank_batch_smaller_than_parts_suggests_positive_multiple():
    with pytest.raises(ConfigError) as info:
        micro_batch_size(3, 4, 1)
    msg = str(info.value)
    assert "multiple of 4" in msg
    assert "e.g. 0" not in msg  # never suggests an empty batch


# --------------------------------------------------------------------------- ResumableDistributedSampler


def test_epoch_order_is_a_permutation():
    order = epoch_order(23, seed=5, epoch=0)
    assert sorted(order) == list(range(23))
    assert order != list(range(23))  # shuffled


@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_disjoint_and_union_is_truncated_permutation(world):
    n, seed, epoch = 23, 7, 2
    shards = []
    for rank in range(world):
        s = sampler(n, world, rank, seed, 1)
        s.set_epoch(epoch)
        shards.append(list(s))
    kept = n // world * world
    assert all(len(sh) == n // world for sh in shards)
    flat = [i for sh in shards for i in sh]
    assert len(flat) == len(set(flat)) == kept  # disjoint, no padding
    assert set(flat) == set(epoch_order(n, seed, epoch)[:kept])


@pytest.mark.parametrize("world", [1, 2, 3])
def test_order_is_pure_function_of_seed_and_epoch(world):
    n = 23
    orders = {}
    for epoch in (0, 1):
        a, b = sampler(n, world, world - 1, seed=3, batch=2), sampler(n, world, world - 1, seed=3, batch=2)
        b.set_epoch(5)  # visiting another epoch first must not matter
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        assert list(a) == list(b) == list(a)  # repeatable, also on a second pass
        orders[epoch] = list(a)
    assert orders[0] != orders[1]
    other_seed = sampler(n, world, world - 1, seed=4, batch=2)
    other_seed.set_epoch(0)
    assert list(other_seed) != orders[0]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n, global_batch", [(50, 12), (23, 12), (100, 24)])
def test_steps_per_epoch_is_whole_global_batches(world, n, global_batch):
    b = micro_batch_size(global_batch, world)
    for rank in range(world):
        assert sampler(n, world, rank, 0, b).steps_per_epoch == n // global_batch


def global_batches(n: int, world: int, seed: int, epoch: int, global_batch: int, start_step: int = 0) -> list[set]:
    """The sample sets of each global batch: the union over ranks of their k-th per-rank batch."""
    b = micro_batch_size(global_batch, world)
    per_rank = []
    for rank in range(world):
        s = sampler(n, world, rank, seed, b)
        s.set_epoch(epoch, start_step=start_step)
        per_rank.append(list(s))
    steps = sampler(n, world, 0, seed, b).steps_per_epoch - start_step
    return [set().union(*(order[k * b:(k + 1) * b] for order in per_rank)) for k in range(steps)]


@pytest.mark.parametrize("n", [50, 53])
def test_global_batches_are_world_size_invariant(n):
    seed, epoch, gb = 11, 1, 12
    reference = global_batches(n, 1, seed, epoch, gb)
    assert len(reference) == n // gb
    order = epoch_order(n, seed, epoch)
    assert reference == [set(order[k * gb:(k + 1) * gb]) for k in range(n // gb)]
    for world in (2, 3, 4):
        assert global_batches(n, world, seed, epoch, gb) == reference, world


@pytest.mark.parametrize("world", [1, 2, 3])
def test_resume_yields_tail_of_epoch(world):
    n, seed, epoch, b = 47, 2, 3, 4
    for rank in range(world):
        full_s = sampler(n, world, rank, seed, b)
        full_s.set_epoch(epoch)
        full = list(full_s)
        steps = full_s.steps_per_epoch
        for k in (0, 1, 2, steps, steps + 1):
            s = sampler(n, world, rank, seed, b)
            s.set_epoch(epoch, start_step=k)
            tail = list(s)
            assert tail == full[k * b:]
            assert len(s) == len(tail)
        # a later plain set_epoch starts the next epoch from its beginning
        s.set_epoch(epoch + 1)
        assert len(list(s)) == len(s) == full_s.num_samples


def test_resume_after_world_size_change_continues_with_unseen_global_batches():
    n, seed, epoch, gb, k = 50, 9, 0, 12, 2
    before = global_batches(n, 1, seed, epoch, gb)
    after = global_batches(n, 2, seed, epoch, gb, start_step=k)
    assert after == before[k:]


# --------------------------------------------------------------------------- EvalShard


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_eval_shard_covers_every_index_once(world):
    n = 10
    shards = [list(EvalShard(n, world, rank)) for rank in range(world)]
    flat = [i for sh in shards for i in sh]
    assert sorted(flat) == list(range(n))
    assert [len(EvalShard(n, world, r)) for r in range(world)] == [len(sh) for sh in shards]
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


# --------------------------------------------------------------------------- loaders


def collect(loader) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    return [(images.clone(), labels.clone(), index.clone()) for (images, labels), index in loader.epoch(0, 0)]


@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("which", ["train", "eval"])
def test_device_and_dataloader_loaders_yield_identical_batches(drop_last, which):
    split = tiny_split(23, seed=1)
    b = 4
    if which == "train":
        make_sampler = lambda: ResumableDistributedSampler(split, num_replicas=2, rank=1, seed=4, rank_batch_size=b)
    else:
        make_sampler = lambda: EvalShard(len(split), 2, 1)
    s_dev, s_host = make_sampler(), make_sampler()
    if which == "train":
        s_dev.set_epoch(1)
        s_host.set_epoch(1)
    dev = make_loader("device", split, s_dev, b, drop_last, CPU)
    host = make_loader("dataloader", split, s_host, b, drop_last, CPU, num_workers=0)
    a, c = collect(dev), collect(host)
    assert len(a) == len(c) == len(dev) == len(host)
    order = list(s_dev)
    expected_batches = len(order) // b if drop_last else -(-len(order) // b)
    assert len(a) == expected_batches
    assert len(order) % b != 0  # the partial last batch is exercised
    for (im1, y1, i1), (im2, y2, i2) in zip(a, c):
        assert im1.dtype == im2.dtype == torch.uint8
        assert y1.dtype == y2.dtype and i1.dtype == i2.dtype
        assert torch.equal(im1, im2) and torch.equal(y1, y2) and torch.equal(i1, i2)
        assert torch.equal(im1, split.images[i1]) and torch.equal(y1, split.labels[i1])
    seen = torch.cat([i for _, _, i in a]).tolist()
    assert seen == (order[:expected_batches * b] if drop_last else order)


# --------------------------------------------------------------------------- Augment


def distinct_images(n: int, size: int = 8) -> torch.Tensor:
    """Float images whose every pixel value is unique and positive (zero only ever comes from padding)."""
    return (torch.arange(n * 3 * size * size, dtype=torch.float32) + 1).view(n, 3, size, size)


def candidate_crops(image: torch.Tensor, pad: int) -> torch.Tensor:
    """Every crop (shifted by -pad..pad each way, zero fill) and its mirror: (2*(2p+1)^2, C, H, W)."""
    c, h, w = image.shape
    padded = torch.nn.functional.pad(image, (pad,) * 4)
    crops = [padded[:, dy:dy + h, dx:dx + w] for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)]
    crops += [crop.flip(2) for crop in crops]
    return torch.stack(crops)


def test_augment_output_is_exactly_one_padded_crop_or_its_mirror():
    n, pad = 64, 4
    x = distinct_images(n)
    out = augmenter(n, seed=1, pad=pad)(x, torch.arange(n), epoch=0)
    assert out.shape == x.shape and out.dtype == x.dtype
    used = set()
    for j in range(n):
        matches = (candidate_crops(x[j], pad) == out[j]).flatten(1).all(1)
        assert int(matches.sum()) == 1, j
        used.add(int(matches.nonzero()))
    assert len(used) > 10  # the parameters really vary between samples


def test_augment_constant_image_zeros_only_in_border_band():
    n, pad, size = 200, 4, 32
    ones = torch.ones(n, 3, size, size)
    out = augmenter(n, seed=0, pad=pad)(ones, torch.arange(n), epoch=0)
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    for img in out:
        mask = img[0] == 1
        assert torch.equal(img, mask.float().expand(3, -1, -1))  # same crop for every channel
        rows, cols = mask.any(1), mask.any(0)
        # the kept region is a rectangle: every kept row has the same kept columns
        assert torch.equal(mask, rows[:, None] & cols[None, :])
        for line in (rows, cols):
            kept = line.nonzero().flatten()
            assert len(kept) >= size - pad
            assert int(kept[-1] - kept[0]) + 1 == len(kept)  # contiguous
            assert int(kept[0]) == 0 or int(kept[-1]) == size - 1  # zeros only on one border side
        assert int(mask.sum()) >= (size - pad) ** 2


def test_augment_independent_of_batch_composition_and_order():
    n, seed, epoch = 40, 3, 2
    x = distinct_images(n)
    idx = torch.arange(n)
    full = augmenter(n, seed)(x, idx, epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    permuted = augmenter(n, seed)(x[perm], idx[perm], epoch)
    assert torch.equal(permuted, full[perm])
    # split into uneven sub-batches through one (caching) instance
    aug = augmenter(n, seed)
    pieces = [aug(x[perm[a:z]], perm[a:z], epoch) for a, z in ((0, 7), (7, 8), (8, 40))]
    assert torch.equal(torch.cat(pieces), full[perm])


def test_augment_depends_on_epoch_and_seed_but_is_repeatable():
    n = 32
    x = distinct_images(n)
    idx = torch.arange(n)
    aug = augmenter(n, seed=0)
    e0, e1 = aug(x, idx, 0), aug(x, idx, 1)
    assert not torch.equal(e0, e1)
    assert torch.equal(aug(x, idx, 0), e0)  # returning to an epoch redraws the same parameters
    assert not torch.equal(augmenter(n, seed=1)(x, idx, 0), e0)


def test_flip_applied_to_about_half_and_only_flip_when_pad_zero():
    n = 2000
    x = torch.rand(n, 3, 4, 6, generator=torch.Generator().manual_seed(0))
    out = augmenter(n, seed=0, pad=0, flip=True)(x, torch.arange(n), epoch=0)
    same = (out == x).flatten(1).all(1)
    mirrored = (out == x.flip(3)).flatten(1).all(1)
    assert bool((same ^ mirrored).all())  # each sample is exactly one of the two
    assert 0.4 * n <= int(mirrored.sum()) <= 0.6 * n


def test_no_flip_and_no_pad_is_identity():
    n = 16
    x = distinct_images(n)
    assert torch.equal(augmenter(n, seed=0, pad=0, flip=False)(x, torch.arange(n), epoch=0), x)


def test_no_flip_never_mirrors():
    n, pad = 32, 2
    x = distinct_images(n)
    out = augmenter(n, seed=5, pad=pad, flip=False)(x, torch.arange(n), epoch=0)
    n_plain = (2 * pad + 1) ** 2
    for j in range(n):
        matches = (candidate_crops(x[j], pad) == out[j]).flatten(1).all(1)
        assert bool(matches[:n_plain].any()) and not bool(matches[n_plain:].any())


# --------------------------------------------------------------------------- Normalize


def test_normalize_matches_formula():
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    x = torch.randint(0, 256, (5, 3, 4, 4), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    x[0, :, 0, 0] = 0
    x[0, :, 0, 1] = 255
    out = Normalize(mean, std, CPU)(x)
    assert out.dtype == torch.float32 and out.shape == x.shape
    m = torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
    expected = (x.double() / 255 - m) / s
    assert float((out.double() - expected).abs().max()) <= 1e-5  # float32 rounding only (|values| < 5)
    assert out[0, 0, 0, 0].item() == pytest.approx(-mean[0] / std[0], rel=1e-6)
    assert out[0, 2, 0, 1].item() == pytest.approx((1 - mean[2]) / std[2], rel=1e-6)


def test_shifted_crops_take_one_window_per_image() -> None:
    padded = torch.randn(3, 2, 8, 8)
    shifts = torch.tensor([[0, 1], [2, 2], [4, 0]])
    out = shifted_crops(padded, shifts, (4, 4))
    for i, (dy, dx) in enumerate(shifts.tolist()):
        assert torch.equal(out[i], padded[i, :, dy:dy + 4, dx:dx + 4])
