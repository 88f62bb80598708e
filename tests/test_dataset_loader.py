"""Tests of dataset_loader: sources on disk, the long-tailed subset, samplers, augmentation, the stream."""
from __future__ import annotations

import math
import os
import time
import pickle
import struct
import sys
import types
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

import dataset_loader as dl
from dataset_loader import ArraySplit, DataError
from helpers import (RunsCode, make_synthetic, snapshot, write_image_folder, write_pickled_cifar10,
                     write_pickled_cifar100)
from util import UserError

CIFAR10_MEAN, CIFAR10_STD = dl.dataset_stats("cifar10")


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """These ops are small: one thread is as fast, and intra-op threads stall badly when other
    processes share the cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# Upper-tail 1e-4 critical values of the chi-square distribution, from scipy.stats.chi2.isf(1e-4, df):
# a correct sampler exceeds them once in 10,000 seeds, and the seeds here are fixed, so tests are
# deterministic.
CHI2_CRITICAL_1E4 = {4: 23.513, 8: 31.828, 23: 57.075}


def chi2_critical(df: int) -> float:
    return CHI2_CRITICAL_1E4[df]


def chi2_stat(observed: np.ndarray, probs: np.ndarray) -> float:
    expected = observed.sum() * probs
    return float(((observed - expected) ** 2 / expected).sum())


def chi2_two_sample(a: np.ndarray, b: np.ndarray) -> float:
    """Chi-square statistic that two equal-sized samples' bin counts a and b come from one distribution
    (len(a) - 1 degrees of freedom)."""
    assert a.sum() == b.sum() and (a + b).min() > 0
    return float(((a - b) ** 2 / (a + b)).sum())


def long_tailed_split(class_counts: list[int], seed: int = 0) -> ArraySplit:
    """Random uint8 images, labels grouped by class with the given counts."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(class_counts)), class_counts).astype(np.int64)
    return ArraySplit(rng.integers(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8), labels)


def make_stream(train: ArraySplit, num_classes: int, batch_size: int, **kwargs) -> dl.TrainStream:
    return dl.TrainStream(train, num_classes, batch_size, mean=CIFAR10_MEAN, std=CIFAR10_STD, **kwargs)


def assert_batches_equal(a: dl.Batch, b: dl.Batch) -> None:
    for x, y in zip(a, b):
        assert (x is None and y is None) or torch.equal(x, y)


# ----------------------------------------------------------------------------------------------
# Long-tailed counts, subset, shot groups
# ----------------------------------------------------------------------------------------------


def test_counts_match_published_splits():
    assert dl.long_tailed_counts(5000, 10, 0.01) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert [sum(dl.long_tailed_counts(5000, 10, f)) for f in (0.01, 0.02, 0.1)] == [12406, 13996, 20431]
    assert [sum(dl.long_tailed_counts(500, 100, f)) for f in (0.01, 0.02, 0.1)] == [10847, 12608, 19573]
    cifar100 = dl.long_tailed_counts(500, 100, 0.01)
    assert cifar100[0] == 500 and cifar100[-1] == 5 and cifar100 == sorted(cifar100, reverse=True)
    assert dl.long_tailed_counts(5000, 10, 1.0) == [5000] * 10


def test_step_counts():
    assert dl.long_tailed_counts(5000, 10, 0.01, "step") == [5000] * 5 + [50] * 5
    assert dl.long_tailed_counts(5000, 10, 0.1, "step") == [5000] * 5 + [500] * 5
    assert dl.long_tailed_counts(500, 100, 0.02, "step") == [500] * 50 + [10] * 50
    assert sum(dl.long_tailed_counts(500, 100, 0.01, "step")) == 25250
    assert dl.long_tailed_counts(100, 5, 0.5, "step") == [100, 100, 50, 50, 50]


@pytest.mark.parametrize("imb_factor", [0, -0.5, 1.5, float("nan"), "x"])
def test_counts_reject_imb_factor_outside_unit_interval(imb_factor):
    with pytest.raises(DataError, match="imb_factor"):
        dl.long_tailed_counts(5000, 10, imb_factor)


def test_counts_reject_unknown_imb_type():
    with pytest.raises(DataError, match="imb_type"):
        dl.long_tailed_counts(5000, 10, 0.1, "linear")


def ldam_reference_subset(split: ArraySplit, class_counts: list[int], seed: int) -> np.ndarray:
    """LDAM-DRW's IMBALANCECIFAR10.gen_imbalanced_data, transcribed: global numpy seed, shuffle per class."""
    np.random.seed(seed)
    targets_np = np.array(split.labels, dtype=np.int64)
    new_data = []
    for the_class, the_img_num in zip(np.unique(targets_np), class_counts):
        idx = np.where(targets_np == the_class)[0]
        np.random.shuffle(idx)
        new_data.append(split.images[idx[:the_img_num], ...])
    return np.vstack(new_data)


def test_subset_exact_counts_deterministic_and_as_ldam():
    train, _ = make_synthetic(10, 40, 1, seed=3)
    subset, counts = dl.long_tailed_subset(train, 10, 0.1, "exp", seed=0)
    assert counts == dl.long_tailed_counts(40, 10, 0.1) and len(subset.labels) == sum(counts)
    assert np.bincount(subset.labels, minlength=10).tolist() == counts
    assert subset.images.dtype == np.uint8 and subset.labels.dtype == np.int64
    # Each kept image is a distinct source image of its own class.
    source_label = {img.tobytes(): int(y) for img, y in zip(train.images, train.labels)}
    assert len(source_label) == len(train.labels)
    assert [source_label[img.tobytes()] for img in subset.images] == subset.labels.tolist()
    assert len({img.tobytes() for img in subset.images}) == len(subset.labels)
    again, _ = dl.long_tailed_subset(train, 10, 0.1, "exp", seed=0)
    other, _ = dl.long_tailed_subset(train, 10, 0.1, "exp", seed=1)
    assert np.array_equal(again.images, subset.images)
    assert np.array_equal(other.labels, subset.labels) and not np.array_equal(other.images, subset.images)
    np.testing.assert_array_equal(subset.images, ldam_reference_subset(train, counts, seed=0))


def test_subset_step_and_shuffled_source():
    train, _ = make_synthetic(4, 30, 1, seed=5)
    order = np.random.default_rng(0).permutation(len(train.labels))
    shuffled = ArraySplit(train.images[order], train.labels[order])
    subset, counts = dl.long_tailed_subset(shuffled, 4, 0.2, "step", seed=7)
    assert counts == [30, 30, 6, 6]
    assert np.bincount(subset.labels).tolist() == counts
    np.testing.assert_array_equal(subset.images, ldam_reference_subset(shuffled, counts, seed=7))


def test_subset_depends_only_on_the_order_within_each_class():
    """LDAM-DRW's generator draws positions within each class, so a copy of CIFAR that keeps each class's image
    order but not the global one (the JPEG archive's image folders) gives the same long-tailed images as LDAM-DRW's
    code on the original files, where the classes are interleaved."""
    grouped, _ = make_synthetic(10, 40, 1, seed=3)  # as read from image folders: class 0's images, then class 1's
    rng = np.random.default_rng(1)
    labels = rng.permutation(grouped.labels)  # the original files' interleaving of the classes
    images = np.empty_like(grouped.images)
    for c in range(10):
        images[labels == c] = grouped.images[grouped.labels == c]  # each class's images in their own order
    original = ArraySplit(images, labels)
    assert not np.array_equal(original.labels, grouped.labels)
    subset, counts = dl.long_tailed_subset(grouped, 10, 0.1, "exp", seed=0)
    np.testing.assert_array_equal(subset.images, ldam_reference_subset(original, counts, seed=0))


def test_subset_rejects_empty_class():
    train, _ = make_synthetic(10, 20, 1)
    with pytest.raises(DataError, match="no images"):
        dl.long_tailed_subset(train, 10, 0.01)  # int(20 * 0.01) == 0


def test_subset_names_a_class_missing_from_the_training_set():
    train = long_tailed_split([5, 5, 0, 5])
    with pytest.raises(DataError, match="the training set has no images of class 2"):
        dl.long_tailed_subset(train, 4, 1.0)  # no imb_factor helps: the message must not blame it


def test_shot_groups_boundaries():
    assert dl.shot_groups([5000, 101, 100, 20, 19, 1]) == {"many": [0, 1], "medium": [2, 3], "few": [4, 5]}
    groups = dl.shot_groups(dl.long_tailed_counts(500, 100, 0.01))
    assert sum(len(g) for g in groups.values()) == 100 and all(groups.values())


# ----------------------------------------------------------------------------------------------
# Samplers
# ----------------------------------------------------------------------------------------------


def test_sampler_class_probs_definitions():
    counts = [400, 100, 25]
    assert dl.sampler_class_probs("instance", counts) is None
    np.testing.assert_allclose(dl.sampler_class_probs("class", counts), [1 / 3] * 3)
    np.testing.assert_allclose(dl.sampler_class_probs("reversed", counts), np.array([1, 4, 16]) / 21)
    np.testing.assert_allclose(dl.sampler_class_probs("sqrt", counts), np.array([20, 10, 5]) / 35)
    assert dl.sampler_class_probs("sqrt", counts).dtype == np.float64


def test_unknown_sampler_is_an_error():
    with pytest.raises(DataError, match="sampler"):
        dl.sampler_class_probs("balanced", [10, 5])
    train = long_tailed_split([8, 8])
    with pytest.raises(DataError, match="sampler"):
        make_stream(train, 2, 4, ce_sampler="balanced")
    with pytest.raises(DataError, match="sampler"):
        make_stream(train, 2, 4, sc_sampler="balanced", feature_branch=False)


SAMPLER_COUNTS = [200, 100, 50, 20, 8]


@pytest.fixture(scope="module")
def sampler_draws() -> dict[str, dict[str, np.ndarray]]:
    """Per sampler, per branch: the drawn labels over 16 epochs x 5 steps x 64 = 5,120 draws,
    and for the ce branch the drawn image ids (image content identifies the image)."""
    train = long_tailed_split(SAMPLER_COUNTS, seed=1)
    draws = {}
    for sampler in dl.SAMPLERS:
        stream = make_stream(train, 5, 64, sc_sampler=sampler, ce_sampler=sampler, seed=11)
        sc, ce = [], []
        for epoch in range(16):
            for batch in stream.epoch(epoch):
                sc.append(batch.sc_labels)
                ce.append(batch.ce_labels)
        draws[sampler] = {"sc": torch.cat(sc).numpy(), "ce": torch.cat(ce).numpy()}
    return draws


def expected_probs(sampler: str) -> np.ndarray:
    probs = dl.sampler_class_probs(sampler, SAMPLER_COUNTS)
    return np.asarray(SAMPLER_COUNTS) / sum(SAMPLER_COUNTS) if probs is None else probs


@pytest.mark.parametrize("branch", ["sc", "ce"])
@pytest.mark.parametrize("sampler", dl.SAMPLERS)
def test_sampler_frequencies_match_definition(sampler_draws, sampler, branch):
    observed = np.bincount(sampler_draws[sampler][branch], minlength=5)
    critical = chi2_critical(df=4)
    assert chi2_stat(observed, expected_probs(sampler)) < critical
    # The test has the power to tell the samplers apart: every other definition is rejected.
    for other in dl.SAMPLERS:
        if other != sampler:
            assert chi2_stat(observed, expected_probs(other)) > critical, other


def id_split(class_counts: list[int]) -> ArraySplit:
    """Image i is the flat colour i (i < 256), labels grouped by class with the given counts."""
    ids = np.arange(sum(class_counts), dtype=np.uint8)
    images = np.broadcast_to(ids[:, None, None, None], (len(ids), 32, 32, 3)).copy()
    return ArraySplit(images, np.repeat(np.arange(len(class_counts)), class_counts).astype(np.int64))


def id_stream(train: ArraySplit, batch_size: int, **kwargs) -> dl.TrainStream:
    """A stream whose normalisation is x * 255 / 255: outputs keep the 0..255 pixel values."""
    return dl.TrainStream(train, int(train.labels.max()) + 1, batch_size, mean=(0.0,) * 3, std=(1 / 255,) * 3,
                          **kwargs)


def image_ids(images: Tensor) -> np.ndarray:
    """Ids of flat-colour images from their centre pixel, which every crop keeps (offsets reach 4 px
    past the image edge only), and which grayscale keeps (the luma weights sum to 1)."""
    return images[:, 0, 16, 16].round().long().numpy()


def test_class_sampler_is_uniform_within_a_class():
    counts = [40, 9]
    stream = id_stream(id_split(counts), 49, ce_sampler="reversed", feature_branch=False, seed=5)
    ids = np.concatenate([image_ids(batch.ce_images) for epoch in range(60) for batch in stream.epoch(epoch)])
    in_small = ids[ids >= counts[0]] - counts[0]
    assert len(in_small) > 1500  # reversed: class 1 has probability 40 / 49 / (1 + 40 / 9) ~ 0.82
    observed = np.bincount(in_small, minlength=counts[1])
    assert chi2_stat(observed, np.full(counts[1], 1 / counts[1])) < chi2_critical(df=counts[1] - 1)


def test_instance_sampler_visits_every_image_once_per_epoch():
    train = id_split([30, 20, 14])  # 64 images
    stream = id_stream(train, 16, sc_sampler="instance", ce_sampler="instance")
    orders = []
    for epoch in range(2):
        batches = list(stream.epoch(epoch))
        ce_ids = np.concatenate([image_ids(b.ce_images) for b in batches])
        sc_ids = np.concatenate([image_ids(b.sc_views[:16]) for b in batches])
        assert sorted(ce_ids) == sorted(sc_ids) == list(range(64))
        assert np.array_equal(np.concatenate([b.ce_labels.numpy() for b in batches]), train.labels[ce_ids])
        assert np.array_equal(np.concatenate([image_ids(b.sc_views[16:]) for b in batches]), sc_ids)
        orders.append((ce_ids, sc_ids))
    assert not np.array_equal(orders[0][0], orders[1][0])  # reshuffled each epoch
    assert not np.array_equal(orders[0][0], orders[0][1])  # the branches draw their own batches


# ----------------------------------------------------------------------------------------------
# Augmentation
# ----------------------------------------------------------------------------------------------


ITU_R_601_LUMA = (0.299, 0.587, 0.114)


def reference_augment(images: np.ndarray, params: dl.AugmentParams, mean, std) -> np.ndarray:
    """Per-image float64 loop of torchvision's pipeline: pad, crop, flip, gray, normalise."""
    out = []
    for image, (top, left), flip, gray in zip(images, params.offsets.tolist(), params.flips.tolist(),
                                               params.grays.tolist()):
        padded = np.pad(image.astype(np.float64), ((0, 0), (4, 4), (4, 4)))  # [3, 40, 40], zero padding
        crop = padded[:, top:top + 32, left:left + 32]
        if flip:
            crop = crop[:, :, ::-1]
        if gray:
            crop = np.repeat(np.tensordot(ITU_R_601_LUMA, crop, axes=1)[None], 3, axis=0)
        out.append((crop / 255 - np.array(mean)[:, None, None]) / np.array(std)[:, None, None])
    return np.stack(out)


def test_apply_augment_matches_reference():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (300, 3, 32, 32), dtype=torch.uint8, generator=gen)
    params = dl.draw_augment_params(300, gen, "cpu")
    mean, std = torch.tensor(CIFAR10_MEAN), torch.tensor(CIFAR10_STD)
    out = dl.apply_augment(images, params, mean, std)
    assert out.shape == (300, 3, 32, 32) and out.dtype == torch.float32
    ref = reference_augment(images.numpy(), params, CIFAR10_MEAN, CIFAR10_STD)
    np.testing.assert_allclose(out.numpy(), ref, atol=2e-5)
    # The draws cover the corner cases the reference exercises.
    assert params.offsets.min() == 0 and params.offsets.max() == 8 and params.flips.any() and params.grays.any()


def test_augment_output_is_a_window_of_the_padded_image():
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=gen)
    zero, one = torch.zeros(3), torch.ones(3) / 255  # normalisation x / 255 / (1 / 255) keeps 0..255
    out = dl.augment(images, zero, one, gen)
    assert out.shape == (64, 3, 32, 32) and out.dtype == torch.float32
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4)).double()  # [B, 3, 40, 40]
    windows = padded.unfold(2, 32, 1).unfold(3, 32, 1)  # [B, 3, 9, 9, 32, 32]
    windows = windows.permute(0, 2, 3, 1, 4, 5).reshape(64, 81, 3, 32, 32)
    candidates = torch.cat([windows, windows.flip(-1)], 1)  # [B, 162, 3, 32, 32]
    weights = torch.tensor(ITU_R_601_LUMA, dtype=torch.float64).view(1, 1, 3, 1, 1)
    gray_candidates = (candidates * weights).sum(2, keepdim=True).expand_as(candidates)
    for i in range(64):
        is_gray = bool((out[i, 0] == out[i, 1]).all() and (out[i, 1] == out[i, 2]).all())
        pool = gray_candidates[i] if is_gray else candidates[i]
        error = (pool - out[i].double()).abs().flatten(1).max(1).values  # [162]
        assert error.min() < 1e-3, i


def test_augment_rates_and_offsets():
    gen = torch.Generator().manual_seed(2)
    n = 20000
    params = dl.draw_augment_params(n, gen, "cpu")
    assert params.offsets.dtype == torch.int64 and params.flips.dtype == torch.bool
    # 4.5 binomial standard deviations: a wrong rate (say 0.25 gray) is far outside.
    assert abs(params.flips.float().mean().item() - 0.5) < 4.5 * math.sqrt(0.25 / n)
    assert abs(params.grays.float().mean().item() - 0.2) < 4.5 * math.sqrt(0.16 / n)
    # Independent choices: a gray image is flipped half the time (the same coin for both would flip every one).
    flipped_grays = params.flips[params.grays].float()
    assert abs(flipped_grays.mean().item() - 0.5) < 4.5 * math.sqrt(0.25 / len(flipped_grays))
    for axis in range(2):
        observed = np.bincount(params.offsets[:, axis].numpy(), minlength=9)
        assert len(observed) == 9 and chi2_stat(observed, np.full(9, 1 / 9)) < chi2_critical(8)
    # Per image, not per batch: on real outputs of a large batch, a fifth turn gray.
    images = torch.randint(0, 256, (1000, 3, 32, 32), dtype=torch.uint8, generator=gen)
    out = dl.augment(images, torch.tensor(CIFAR10_MEAN), torch.tensor(CIFAR10_STD), gen)
    unnormalised = out * torch.tensor(CIFAR10_STD).view(1, 3, 1, 1) + torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    gray_rate = ((unnormalised[:, 0] - unnormalised[:, 1]).abs().amax((1, 2)) < 1e-5).float().mean().item()
    assert abs(gray_rate - 0.2) < 4.5 * math.sqrt(0.16 / 1000)


# SupContrast's augmentation of the contrastive views (--sc_aug supcon), against torchvision's own functions.
TORCHVISION_TENSOR_LUMA = (0.2989, 0.587, 0.114)  # what torchvision's tensor rgb_to_grayscale uses


def torchvision_supcon(images: Tensor, params: dl.SupConParams, mean, std) -> Tensor:
    """Per-image float64 loop of the same choices through torchvision.transforms.v2.functional."""
    from torchvision.transforms.v2 import functional as TF
    jitter_ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    out = []
    for i, image in enumerate(images):
        top, left, height, width = params.boxes[i].tolist()
        x = TF.resized_crop(image.double() / 255, top, left, height, width, [32, 32], antialias=True)
        if params.flips[i]:
            x = TF.horizontal_flip(x)
        if params.jitters[i]:
            for op in params.order[i].tolist():
                x = jitter_ops[op](x, params.factors[i, op].item())
        if params.grays[i]:
            x = TF.rgb_to_grayscale(x, num_output_channels=3)
        out.append(TF.normalize(x, list(mean), list(std)))
    return torch.stack(out)


@pytest.fixture(scope="module")
def supcon_case():
    gen = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (300, 3, 32, 32), dtype=torch.uint8, generator=gen)
    return images, dl.draw_supcon_params(300, gen, "cpu")


def test_supcon_augment_matches_torchvision(supcon_case, monkeypatch):
    images, params = supcon_case
    mean, std = torch.tensor(CIFAR10_MEAN), torch.tensor(CIFAR10_STD)
    ref = torchvision_supcon(images, params, CIFAR10_MEAN, CIFAR10_STD)
    with monkeypatch.context() as patch:  # torchvision's tensor luma: then every operation must agree to rounding
        patch.setattr(dl, "GRAY_WEIGHTS", TORCHVISION_TENSOR_LUMA)
        out = dl.apply_supcon_augment(images, params, mean, std)
    assert out.shape == (300, 3, 32, 32) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=3e-5, rtol=0)
    # With the project's (PIL's) luma weights, the contrast, saturation and grayscale steps move by about 1e-4.
    torch.testing.assert_close(dl.apply_supcon_augment(images, params, mean, std).double(), ref, atol=3e-3, rtol=0)
    # The draws cover what the reference exercises: every operation at every position, both kinds of crop.
    assert params.flips.any() and params.grays.any() and params.jitters.any() and not params.jitters.all()
    assert {(p, op) for row in params.order[params.jitters].tolist() for p, op in enumerate(row)} == \
        {(p, op) for p in range(4) for op in range(4)}
    heights, widths = params.boxes[:, 2], params.boxes[:, 3]
    assert heights.min() < 16 and widths.min() < 16 and ((heights == 32) | (widths == 32)).any()


def test_supcon_identity_choices_equal_evaluation_input(supcon_case):
    images = supcon_case[0][:12]
    n = len(images)
    no = torch.zeros(n, dtype=torch.bool)
    identity = dl.SupConParams(torch.tensor([[0, 0, 32, 32]]).repeat(n, 1), no, no, torch.tensor([[1.0, 1, 1, 0]]).repeat(n, 1),
                               torch.arange(4).repeat(n, 1), no)
    mean, std = torch.tensor(CIFAR10_MEAN), torch.tensor(CIFAR10_STD)
    torch.testing.assert_close(dl.apply_supcon_augment(images, identity, mean, std), dl.normalize(images, mean, std))
    # Without jitter the colours stay exactly as they were; jitter with identity factors changes them only by the
    # rounding of the HSV round trip of a hue turn of 0.
    x = images.float() / 255
    assert torch.equal(dl._color_jitter(x, identity), x)
    jittered = dl._color_jitter(x, identity._replace(jitters=~no, order=torch.randperm(4).repeat(n, 1)))
    torch.testing.assert_close(jittered, x, atol=1e-6, rtol=0)


def test_supcon_crop_boxes_follow_torchvision():
    """RandomResizedCrop(32, scale=(0.2, 1)).get_params, 20,000 draws each: the same distribution of crop heights,
    widths and areas (two-sample chi-square, 9 bins), every box inside the image."""
    from torchvision.transforms import RandomResizedCrop
    n = 20000
    torch.manual_seed(0)
    ref = np.array([RandomResizedCrop.get_params(torch.zeros(3, 32, 32), scale=dl.RESIZED_CROP_SCALE,
                                                 ratio=dl.RESIZED_CROP_RATIO) for _ in range(n)])
    ours = dl.draw_supcon_params(n, torch.Generator().manual_seed(1), "cpu").boxes.numpy()
    assert ours.dtype == np.int64
    top, left, height, width = ours.T
    assert (top >= 0).all() and (left >= 0).all() and (top + height <= 32).all() and (left + width <= 32).all()
    assert height.min() >= 1 and width.min() >= 1
    side_edges = [0, 15, 17, 19, 21, 23, 25, 27, 29, 33]
    area_edges = [0, 300, 400, 500, 600, 700, 800, 900, 1000, 1025]
    for values, edges in ((lambda a: a[:, 2], side_edges), (lambda a: a[:, 3], side_edges),
                          (lambda a: a[:, 2] * a[:, 3], area_edges)):
        a, b = np.histogram(values(ours), edges)[0], np.histogram(values(ref), edges)[0]
        assert chi2_two_sample(a, b) < chi2_critical(8)
    for axis, size in ((0, 2), (1, 3)):  # the corner is uniform over the positions the crop fits
        positions = (ours[:, axis] + 0.5) / (32 - ours[:, size] + 1)  # mean 0.5 when uniform over 0 .. 32 - size
        assert abs(positions.mean() - 0.5) < 0.01


def test_supcon_rates_factors_and_orders():
    n = 24000
    params = dl.draw_supcon_params(n, torch.Generator().manual_seed(2), "cpu", gray_prob=0.3)
    for coins, rate in ((params.flips, 0.5), (params.jitters, 0.8), (params.grays, 0.3)):
        assert coins.dtype == torch.bool and abs(coins.float().mean().item() - rate) < 4.5 * math.sqrt(rate * (1 - rate) / n)
    low, high = params.factors.amin(0), params.factors.amax(0)
    torch.testing.assert_close(low, torch.tensor([0.6, 0.6, 0.6, -0.1]), atol=1e-3, rtol=0)
    torch.testing.assert_close(high, torch.tensor([1.4, 1.4, 1.4, 0.1]), atol=1e-3, rtol=0)
    assert abs(params.factors[:, 3].mean().item()) < 4.5 * 0.2 / math.sqrt(12 * n)  # uniform: sd = width / sqrt(12)
    assert torch.equal(params.order.sort(dim=1).values, torch.arange(4).expand(n, 4))  # each row a permutation
    codes = (params.order * torch.tensor([64, 16, 4, 1])).sum(1).numpy()
    observed = np.unique(codes, return_counts=True)[1]
    assert len(observed) == 24 and chi2_stat(observed, np.full(24, 1 / 24)) < chi2_critical(23)
    none = dl.draw_supcon_params(100, torch.Generator().manual_seed(2), "cpu", gray_prob=0.0)
    assert not none.grays.any()


def test_supcon_views_are_not_crops_of_the_padded_image(supcon_case):
    """Resized crops and colour changes: unlike the paper's augmentation, almost no view is a window of the image."""
    images, params = supcon_case
    zero, one = torch.zeros(3), torch.ones(3) / 255
    out = dl.apply_supcon_augment(images[:40], params.slice(0, 40), zero, one)  # 0..255 scale
    padded = torch.nn.functional.pad(images[:40], (4, 4, 4, 4)).double()
    windows = padded.unfold(2, 32, 1).unfold(3, 32, 1).permute(0, 2, 3, 1, 4, 5).reshape(40, 81, 3, 32, 32)
    error = (windows - out.double()[:, None]).abs().flatten(2).amax(2).amin(1)  # [40]: nearest window
    assert (error > 1).float().mean() > 0.9


def test_normalize_and_device_images():
    train, _ = make_synthetic(3, 4, 1)
    images, labels = dl.to_device_images(train, "cpu")
    assert images.shape == (12, 3, 32, 32) and images.dtype == torch.uint8 and labels.dtype == torch.int64
    assert torch.equal(images, torch.from_numpy(train.images).permute(0, 3, 1, 2))
    mean, std = torch.tensor(CIFAR10_MEAN), torch.tensor(CIFAR10_STD)
    normalised = dl.normalize(images, mean, std)
    expected = (images.double() / 255 - mean.double().view(1, 3, 1, 1)) / std.double().view(1, 3, 1, 1)
    torch.testing.assert_close(normalised, expected.float())
    assert torch.equal(dl.normalize(images, mean.view(1, 3, 1, 1), std.view(1, 3, 1, 1)), normalised)
    # Augmentation with the identity choices (centre crop, no flip, colour) equals evaluation input.
    identity = dl.AugmentParams(torch.full((12, 2), 4), torch.zeros(12, dtype=torch.bool), torch.zeros(12, dtype=torch.bool))
    assert torch.equal(dl.apply_augment(images, identity, mean, std), normalised)


def test_class_names_come_from_the_data_as_it_is_read(tmp_path):
    """For the reports: the pickled layout's meta file (CIFAR-100: its fine names, as its labels), the image
    folders' class folders in label order; None where a pickled copy has no usable meta file."""
    write_pickled_cifar10(tmp_path / "c10", *make_synthetic(10, 2, 1))
    write_pickled_cifar100(tmp_path / "c100", *make_synthetic(100, 1, 1))
    write_image_folder(tmp_path / "images", *make_synthetic(10, 2, 1))
    assert dl.class_names("cifar10", tmp_path / "c10") == [f"class_{c}" for c in range(10)]
    assert dl.class_names("cifar100", tmp_path / "c100") == [f"fine_{c}" for c in range(100)]
    folders = sorted(p.name for p in (tmp_path / "images" / "train").iterdir())
    assert dl.class_names("cifar10", tmp_path / "images") == folders and len(folders) == 10
    meta = tmp_path / "c10" / "cifar-10-batches-py" / "batches.meta"
    meta.write_bytes(b"garbage")
    assert dl.class_names("cifar10", tmp_path / "c10") is None
    meta.unlink()
    assert dl.class_names("cifar10", tmp_path / "c10") is None


def test_a_data_root_without_the_data_says_what_it_holds(tmp_path):
    """The usual slips: the pickled folder itself, an image layout's train/ or test/ itself, the other dataset's
    data, the data one folder down. Where the hint finds the data, it ends the line: no --download advice."""
    write_pickled_cifar10(tmp_path / "c10", *make_synthetic(10, 2, 1))
    write_pickled_cifar100(tmp_path / "nested" / "c100", *make_synthetic(100, 1, 1))
    write_image_folder(tmp_path / "images", *make_synthetic(10, 2, 1))
    cases = {
        ("cifar10", tmp_path / "c10" / "cifar-10-batches-py"):
            f"{tmp_path / 'c10' / 'cifar-10-batches-py'} is the pickled folder itself: pass its parent, "
            f"--data_root {tmp_path / 'c10'}",
        ("cifar10", tmp_path / "images" / "test"):
            f"{tmp_path / 'images' / 'test'} is the image layout's test/ folder itself: pass its parent, "
            f"--data_root {tmp_path / 'images'}",
        ("cifar100", tmp_path / "c10"): "it holds cifar-10-batches-py/, cifar10's data: --dataset cifar10?; pass "
                                        "--download to fetch it there, or put the images in that image-folder layout",
        ("cifar100", tmp_path / "nested"): f"{tmp_path / 'nested' / 'c100'} holds it: --data_root "
                                           f"{tmp_path / 'nested' / 'c100'}",
    }
    for (dataset, root), hint in cases.items():
        with pytest.raises(DataError) as caught:
            dl.load_cifar(dataset, root)
        assert str(caught.value).endswith(hint) and "\n" not in str(caught.value), (dataset, root)
    # Where a checkpoint fixed the dataset (--eval_only), --dataset is not the way out.
    with pytest.raises(DataError) as caught:
        dl.load_cifar("cifar100", tmp_path / "c10", dataset_of="run/best.pt")
    assert "it holds cifar-10-batches-py/, cifar10's data, but run/best.pt is cifar100's; pass" in str(caught.value)
    # An image-folder copy one level down is offered only for the dataset whose number of classes it has.
    for name in ("airplane", "automobile"):
        for split in ("train", "test"):
            (tmp_path / "jpeg" / "cifar10-jpeg" / split / name).mkdir(parents=True)
    with pytest.raises(DataError) as caught:
        dl.load_cifar("cifar100", tmp_path / "jpeg")
    assert "holds it" not in str(caught.value)
    with pytest.raises(DataError) as caught:
        dl.load_cifar("cifar10", tmp_path / "jpeg")
    assert "holds it" not in str(caught.value)  # 2 class folders, not 10
    for name in ("bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"):
        (tmp_path / "jpeg" / "cifar10-jpeg" / "train" / name).mkdir()
    with pytest.raises(DataError) as caught:
        dl.load_cifar("cifar10", tmp_path / "jpeg")
    assert f"{tmp_path / 'jpeg' / 'cifar10-jpeg'} holds it: --data_root {tmp_path / 'jpeg' / 'cifar10-jpeg'}" in \
        str(caught.value)
    for root in (tmp_path / "missing", tmp_path / "c10" / "cifar-10-batches-py" / "test_batch", tmp_path / "nested"):
        with pytest.raises(DataError) as caught:  # nothing to point at (a file, no folder): the plain message
            dl.load_cifar("cifar10", root)
        assert f"no cifar10 data in {root}: looked for" in str(caught.value)
        assert "(image folders); pass --download" in str(caught.value)


def test_dataset_stats():
    assert dl.dataset_stats("cifar100") == ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
    assert CIFAR10_MEAN == (0.4914, 0.4822, 0.4465)
    with pytest.raises(DataError):
        dl.dataset_stats("svhn")


# ----------------------------------------------------------------------------------------------
# The stream
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_train() -> ArraySplit:
    return long_tailed_split([40, 20, 12, 8], seed=6)  # 80 images


def test_stream_shapes_and_views(small_train):
    stream = make_stream(small_train, 4, 32)
    assert stream.steps_per_epoch == 2 and stream.local_batch_size == 32 and stream.class_counts == [40, 20, 12, 8]
    batches = list(stream.epoch(0))
    assert len(batches) == 2
    batch = batches[0]
    assert batch.sc_views.shape == (64, 3, 32, 32) and batch.sc_views.dtype == torch.float32
    assert batch.ce_images.shape == (32, 3, 32, 32) and batch.ce_images.dtype == torch.float32
    assert batch.sc_labels.shape == batch.ce_labels.shape == (32,) and batch.ce_labels.dtype == torch.int64
    view1, view2 = batch.sc_views[:32], batch.sc_views[32:]
    same = (view1 == view2).flatten(1).all(1)
    assert same.float().mean() < 0.2  # independent views coincide with probability ~1/240


@pytest.mark.parametrize("sc_aug", dl.SC_AUGS)
def test_stream_is_repeatable_and_resumes_mid_epoch(small_train, sc_aug):
    for sampler in ("instance", "class"):
        stream = make_stream(small_train, 4, 16, sc_sampler=sampler, ce_sampler="sqrt", seed=3, sc_aug=sc_aug)
        full = list(stream.epoch(2))
        assert len(full) == 5
        restarted = make_stream(small_train, 4, 16, sc_sampler=sampler, ce_sampler="sqrt", seed=3, sc_aug=sc_aug)
        resumed = list(restarted.epoch(2, start_step=3))
        assert len(resumed) == 2
        for a, b in zip(full[3:], resumed):
            assert_batches_equal(a, b)
        assert not torch.equal(full[0].ce_images, next(stream.epoch(3)).ce_images)
        other_seed = make_stream(small_train, 4, 16, sc_sampler=sampler, ce_sampler="sqrt", seed=4, sc_aug=sc_aug)
        assert not torch.equal(full[0].sc_views, next(other_seed.epoch(2)).sc_views)
    with pytest.raises(ValueError):
        next(stream.epoch(0, start_step=6))


def test_paper_stream_draws_in_a_fixed_order(small_train):
    """A default step's batch is made from draws in this order after seeding with (seed, epoch, step): the
    classifier branch's indices, the feature branch's, then the augmentation choices of [ce | view1 | view2] in one
    draw. Every run saved so far (and a resume of one) depends on that order not changing."""
    stream = make_stream(small_train, 4, 16, sc_sampler="class", ce_sampler="sqrt", seed=3)
    batch = next(stream.epoch(2, start_step=1))
    gen = stream._generator
    gen.manual_seed(dl._derived_seed(3, 2, 1, dl._STEP_TAG))
    ce_idx, sc_idx = stream._indices("sqrt", 1, None), stream._indices("class", 1, None)
    params = dl.draw_augment_params(48, gen, "cpu")
    images = torch.cat([stream.images[ce_idx], stream.images[sc_idx], stream.images[sc_idx]])
    out = dl.apply_augment(images, params, stream.mean, stream.std)
    assert_batches_equal(batch, dl.Batch(out[16:], stream.labels[sc_idx], out[:16], stream.labels[ce_idx]))


def test_stream_supcon_augments_only_the_views(small_train, monkeypatch):
    """--sc_aug supcon: the 2B views of each step go through apply_supcon_augment in one call with their own
    draws, the B classifier-branch images through the paper's augmentation; --sc_aug paper never calls it."""
    calls = {"supcon": [], "paper": []}
    for name, key in (("apply_supcon_augment", "supcon"), ("apply_augment", "paper")):
        def recording(images, params, *args, _f=getattr(dl, name), _key=key):
            calls[_key].append(len(images))
            assert len(params.flips) == len(images)
            return _f(images, params, *args)
        monkeypatch.setattr(dl, name, recording)
    batch = next(make_stream(small_train, 4, 16, sc_aug="supcon").epoch(0))
    assert calls == {"supcon": [32], "paper": [16]}
    assert batch.sc_views.shape == (32, 3, 32, 32) and batch.ce_images.shape == (16, 3, 32, 32)
    view1, view2 = batch.sc_views[:16], batch.sc_views[16:]
    assert not (view1 == view2).flatten(1).all(1).any()  # the two views of an image differ
    calls.update(supcon=[], paper=[])
    next(make_stream(small_train, 4, 16).epoch(0))
    assert calls == {"supcon": [], "paper": [48]}
    with pytest.raises(DataError, match="unknown feature-branch augmentation 'simclr'"):
        make_stream(small_train, 4, 16, sc_aug="simclr")


def test_stream_supcon_views_are_two_views_of_the_labelled_image(monkeypatch):
    """--sc_aug supcon: rows i and B + i of the views are augmented from the same training image, the one
    sc_labels[i] labels; over an epoch of the instance sampler every image is a view pair once."""
    train = id_split([30, 20, 14])  # 64 images
    inputs = []

    def recording(images, params, *args, _f=dl.apply_supcon_augment):
        inputs.append(images[:, 0, 16, 16].long().numpy())  # uint8 images: the id is the pixel value
        return _f(images, params, *args)
    monkeypatch.setattr(dl, "apply_supcon_augment", recording)
    stream = id_stream(train, 16, sc_aug="supcon", sc_sampler="instance", ce_sampler="class", seed=4)
    seen = []
    for batch in stream.epoch(0):
        ids = inputs[-1]
        assert len(ids) == 32 and np.array_equal(ids[:16], ids[16:])
        assert np.array_equal(train.labels[ids[:16]], batch.sc_labels.numpy())
        seen.extend(ids[:16])
    assert len(inputs) == 4 and sorted(seen) == list(range(64))


@pytest.mark.parametrize("sc_aug", dl.SC_AUGS)
def test_ranks_slice_the_global_batch(small_train, sc_aug):
    for sc_sampler in ("instance", "reversed"):
        kwargs = dict(sc_sampler=sc_sampler, ce_sampler="class", seed=9, sc_aug=sc_aug)
        single = list(make_stream(small_train, 4, 16, **kwargs).epoch(1))
        ranks = [list(make_stream(small_train, 4, 16, rank=r, world_size=2, **kwargs).epoch(1)) for r in range(2)]
        for step, whole in enumerate(single):
            parts = [ranks[r][step] for r in range(2)]
            assert parts[0].ce_images.shape == (8, 3, 32, 32) and parts[0].sc_views.shape == (16, 3, 32, 32)
            assert torch.equal(torch.cat([p.ce_images for p in parts]), whole.ce_images)
            assert torch.equal(torch.cat([p.ce_labels for p in parts]), whole.ce_labels)
            assert torch.equal(torch.cat([p.sc_labels for p in parts]), whole.sc_labels)
            assert torch.equal(torch.cat([p.sc_views[:8] for p in parts]), whole.sc_views[:16])
            assert torch.equal(torch.cat([p.sc_views[8:] for p in parts]), whole.sc_views[16:])


def test_cross_entropy_baseline_draws_no_feature_batch(small_train):
    batch = next(make_stream(small_train, 4, 16, feature_branch=False).epoch(0))
    assert batch.sc_views is None and batch.sc_labels is None
    assert batch.ce_images.shape == (16, 3, 32, 32)


def test_gray_prob_moves_only_the_grayscale_threshold():
    default = dl.draw_augment_params(5000, torch.Generator().manual_seed(3), "cpu")
    draws = {p: dl.draw_augment_params(5000, torch.Generator().manual_seed(3), "cpu", gray_prob=p)
             for p in (0.0, 0.2, 0.5, 1.0)}
    for params in draws.values():  # crops and flips do not depend on it, so --gray_prob changes nothing else
        assert torch.equal(params.offsets, default.offsets) and torch.equal(params.flips, default.flips)
    assert torch.equal(draws[0.2].grays, default.grays)  # 0.2 is the default: the same stream as before the flag
    assert not draws[0.0].grays.any() and draws[1.0].grays.all()
    assert abs(draws[0.5].grays.float().mean().item() - 0.5) < 4.5 * math.sqrt(0.25 / 5000)
    assert bool((draws[0.2].grays <= draws[0.5].grays).all())  # one coin per image, a moving threshold


def test_stream_gray_prob(small_train):
    def is_gray(images: Tensor) -> Tensor:
        """[B]: all three channels equal, after undoing the per-channel normalisation."""
        raw = images * torch.tensor(CIFAR10_STD).view(1, 3, 1, 1) + torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
        return ((raw[:, 0] - raw[:, 1]).abs().amax((1, 2)) < 1e-4) & ((raw[:, 1] - raw[:, 2]).abs().amax((1, 2)) < 1e-4)

    for prob, expected in ((0.0, False), (1.0, True)):
        batch = next(make_stream(small_train, 4, 32, gray_prob=prob).epoch(0))
        for images in (batch.sc_views, batch.ce_images):
            assert bool((is_gray(images) == expected).all()), prob
    default, explicit = (next(make_stream(small_train, 4, 32, **kw).epoch(0)) for kw in ({}, {"gray_prob": 0.2}))
    assert_batches_equal(default, explicit)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(DataError, match="gray_prob must be in"):
            make_stream(small_train, 4, 32, gray_prob=bad)


def test_stream_bad_batch_sizes(small_train):
    with pytest.raises(DataError, match="larger than the training set"):
        make_stream(small_train, 4, 81)
    with pytest.raises(DataError, match="divisible"):
        make_stream(small_train, 4, 15, world_size=2)


def test_stream_class_sampler_needs_every_class():
    train = long_tailed_split([10, 0, 6])
    with pytest.raises(DataError, match="every class"):
        make_stream(train, 3, 4, ce_sampler="class")


# ----------------------------------------------------------------------------------------------
# Sources on disk
# ----------------------------------------------------------------------------------------------


def assert_splits_equal(a: tuple[ArraySplit, ArraySplit], b: tuple[ArraySplit, ArraySplit]) -> None:
    for x, y in zip(a, b):
        assert x.images.dtype == np.uint8 and x.images.shape[1:] == (32, 32, 3) and x.labels.dtype == np.int64
        np.testing.assert_array_equal(x.images, y.images)
        np.testing.assert_array_equal(x.labels, y.labels)


@pytest.fixture(scope="module")
def cifar10_like() -> tuple[ArraySplit, ArraySplit]:
    return make_synthetic(10, 6, 2, seed=8)


def test_pickled_cifar10_loads(tmp_path, cifar10_like):
    write_pickled_cifar10(tmp_path, *cifar10_like)
    assert_splits_equal(dl.load_cifar("cifar10", tmp_path), cifar10_like)


def test_pickled_with_str_keys_loads(tmp_path, cifar10_like):
    folder = write_pickled_cifar10(tmp_path, *cifar10_like)
    for name in ["test_batch"] + [f"data_batch_{i}" for i in range(1, 6)]:
        with open(folder / name, "rb") as f:
            entry = pickle.load(f)
        with open(folder / name, "wb") as f:
            pickle.dump({k.decode(): v for k, v in entry.items()}, f)
    assert_splits_equal(dl.load_cifar("cifar10", tmp_path), cifar10_like)


@pytest.mark.parametrize("protocol", [0, 3, 4, 5])
def test_batches_pickled_again_by_python_3_load(tmp_path, cifar10_like, protocol):
    """A copy converted by a Python 3 tool: other protocols name other globals for the same arrays (protocol 5
    rebuilds them from a buffer, protocol 0 stores bytes as a call of codecs.encode), which the reader allows; and
    labels made numpy scalars on the way (list(np.array(labels)) gives those), which numpy pickles as calls of its
    multiarray.scalar."""
    folder = write_pickled_cifar10(tmp_path, *cifar10_like)
    for name in ["test_batch"] + [f"data_batch_{i}" for i in range(1, 6)]:
        with open(folder / name, "rb") as f:
            entry = pickle.load(f)
        entry[b"data"] = np.ascontiguousarray(entry[b"data"])
        entry[b"labels"] = list(np.asarray(entry[b"labels"], dtype=np.int64))
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=protocol)
    assert_splits_equal(dl.load_cifar("cifar10", tmp_path), cifar10_like)


def python2_pickle(entry: dict) -> bytes:
    """`entry` (bytes keys; values bytes, lists of ints or bytes, 2-d uint8 arrays) as Python 2's cPickle wrote
    CIFAR's batches in protocol 2: every bytes a Python 2 str (SHORT_BINSTRING / BINSTRING, which encoding="latin1"
    reads as a str: numpy's array state then holds its pixels as text), arrays by numpy 1's names."""
    def text(b: bytes) -> bytes:
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b

    def integer(n: int) -> bytes:
        return b"K" + bytes([n]) if n < 256 else b"M" + struct.pack("<H", n)

    def value(v) -> bytes:
        if isinstance(v, bytes):
            return text(v)
        if isinstance(v, list):
            return b"](" + b"".join(value(x) if isinstance(x, bytes) else integer(x) for x in v) + b"e"
        assert v.dtype == np.uint8 and v.ndim == 2
        return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + integer(0) + b"\x85" + text(b"b")
                + b"\x87R(" + integer(1) + b"(" + integer(v.shape[0]) + integer(v.shape[1]) + b"tcnumpy\ndtype\n"
                + text(b"u1") + integer(0) + integer(1) + b"\x87R(" + integer(3) + text(b"|")
                + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xff" + integer(0) + b"tb\x89"
                + text(np.ascontiguousarray(v).tobytes()) + b"tb")

    return b"\x80\x02}(" + b"".join(text(k) + value(v) for k, v in entry.items()) + b"u."


def test_batches_as_python_2_pickled_them_load(tmp_path, cifar10_like):
    """CIFAR's own files came from Python 2 (none is on this machine): read by Python's own unpickler, whose BUILD
    the reader checks, they give the same arrays, under numpy 1 and 2 alike."""
    folder = write_pickled_cifar10(tmp_path, *cifar10_like)
    for name in ["test_batch"] + [f"data_batch_{i}" for i in range(1, 6)]:
        with open(folder / name, "rb") as f:
            entry = pickle.load(f)
        (folder / name).write_bytes(python2_pickle(entry))
    assert b"cnumpy.core.multiarray\n_reconstruct" in (folder / "test_batch").read_bytes()
    assert_splits_equal(dl.load_cifar("cifar10", tmp_path), cifar10_like)


# Batches made only of the names the reader allows, each of which made numpy read bytes of the file as object
# pointers or read freed memory (a crash, or worse), or read memory no byte of the file wrote (gigabytes of it for a
# file of a few bytes), before the reader checked what it builds with them. Run in a child process, so that a
# crash fails the test rather than ending the test run.
CRAFTED_BATCHES = r"""
import pickle, sys
import numpy as np
import dataset_loader as dl

SCALAR, RECONSTRUCT = np.int64(0).__reduce__()[0], np.zeros(0).__reduce__()[0]
FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]


class Dtype:  # numpy.dtype(spec) and a BUILD with the file's flags (0 for an object dtype: "not references")
    def __init__(self, spec, flags):
        self.spec, self.flags = spec, flags

    def __reduce__(self):
        return np.dtype, (self.spec, False, True), (3, "|" if self.spec == "O8" else "<", None, None, None, -1, -1,
                                                    self.flags)


class Call:
    def __init__(self, *reduced):
        self.reduced = reduced

    def __reduce__(self):
        return self.reduced


def array(dtype, raw):  # numpy's own pickling of an array: _reconstruct, then a BUILD with its state
    return Call(RECONSTRUCT, (np.ndarray, (0,), b"b"), (1, (1,), dtype, False, raw))


pixels = np.zeros((1, 3072), np.uint8)
cases = {
    "object scalar": [Call(SCALAR, (Dtype("O8", 0), b"A" * 8))],
    "int64 dtype flagged as references": [array(Dtype("i8", 1), b"A" * 8)],
    "object array of raw bytes": [array(Dtype("O8", 0), b"A" * 8)],
    "numpy.ndarray called": [Call(np.ndarray, ((1,), np.dtype("u1"), b"A"))],
    "state for bytes": [Call(bytes, (), {"a": 1})],
    # an array over another array's memory, which a second BUILD of that one frees
    "array over an array": [Call(FROMBUFFER, (np.zeros(8, np.uint8), np.dtype("u1"), (8,), "C"))],
    "array of a shape of its own": [Call(RECONSTRUCT, (np.ndarray, (300000, 3072), b"b"))],  # 900 MB, no BUILD
    "bytes of a size": [Call(bytes, (1 << 30,))],  # a GiB of zeros from a few bytes
    "number without its bytes": [Call(SCALAR, (np.dtype("S1000000000"),))],  # a GB of zeros
    "strings of no width": [Call(RECONSTRUCT, (np.ndarray, (0,), b"b"), (1, (10 ** 15,), np.dtype("S0"), False, b""))],
}
# An array, memoised, given a state, then given another from the memo (which frees the first one's bytes).
ARRAY = b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R"
STATE = (b"(K\x01K\x01\x85cnumpy\ndtype\nU\x02u1K\x00K\x01\x87R(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xff"
         b"K\x00tb\x89U\x01Atb")
raw = {"array given a second state": b"\x80\x02" + ARRAY + b"q\x00" + STATE + b"0h\x00" + STATE + b"."}
for name, labels in [*cases.items(), *raw.items()]:
    path = f"{sys.argv[1]}/{name}"
    with open(path, "wb") as f:
        if name in raw:
            f.write(labels)
        else:
            pickle.dump({b"data": pixels, b"labels": labels}, f, protocol=2)
    try:
        dl._read_pickled_batch(dl.Path(path), "labels", 10)
        print(f"{name}: LOADED", flush=True)
    except dl.DataError as e:
        print(f"{name}: {str(e).split(': ', 1)[1]}", flush=True)
"""


def test_batches_crafted_to_have_numpy_read_pointers_are_refused(tmp_path):
    import subprocess

    proc = subprocess.run([sys.executable, "-c", CRAFTED_BATCHES, str(tmp_path)], capture_output=True, text=True,
                          timeout=120, cwd=Path(dl.__file__).parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    said = dict(line.split(": ", 1) for line in proc.stdout.splitlines())
    refused = ", which no CIFAR batch holds (refused)"
    assert said == {
        "object scalar": f"UnpicklingError: it holds an array or number of dtype dtype('O'){refused}",
        "int64 dtype flagged as references": f"UnpicklingError: it holds a dtype <i8 whose flags, size or alignment "
                                             f"are not numpy's{refused}",
        "object array of raw bytes": f"UnpicklingError: it holds an array or number of dtype dtype('O'){refused}",
        "numpy.ndarray called": "TypeError: '_ArrayType' object is not callable",
        "state for bytes": f"UnpicklingError: it holds state for a bytes{refused}",
        "array over an array": f"UnpicklingError: it holds an array over a ndarray{refused}",
        "array of a shape of its own": f"UnpicklingError: it holds an array made with shape (300000, 3072), not as "
                                       f"numpy pickles one, (0,){refused}",
        "bytes of a size": "TypeError: _empty_bytes() takes 0 positional arguments but 1 was given",
        "array given a second state": f"UnpicklingError: it holds a second state for an array{refused}",
        "number without its bytes": "TypeError: _scalar() missing 1 required positional argument: 'content'",
        "strings of no width": f"UnpicklingError: it holds an array or number of dtype dtype('S'){refused}",
    }


def test_a_batch_that_would_run_code_is_refused_unrun(tmp_path, cifar10_like):
    """pickle.load (torchvision's reader) calls whatever a file names: a batch from a mirror or a colleague could
    run any code. Only numpy's arrays and bytes are rebuilt; anything else is one line, and nothing ran."""
    folder = write_pickled_cifar10(tmp_path, *cifar10_like)
    rewrite_batch(folder, "data_batch_3", lambda entry: entry.update({b"note": RunsCode(tmp_path / "ran")}))
    before = snapshot(tmp_path)
    with pytest.raises(DataError) as info:
        dl.load_cifar("cifar10", tmp_path)
    assert str(info.value) == (f"cannot read {folder / 'data_batch_3'}: UnpicklingError: it holds "
                               f"{os.mkdir.__module__}.mkdir, which no CIFAR batch holds and which unpickling would "
                               f"call (refused)")
    assert snapshot(tmp_path) == before and not (tmp_path / "ran").exists()


def test_pickled_cifar100_uses_fine_labels(tmp_path):
    data = make_synthetic(100, 3, 1, seed=9)
    write_pickled_cifar100(tmp_path, *data)
    loaded = dl.load_cifar("cifar100", tmp_path)
    assert_splits_equal(loaded, data)
    assert loaded[0].labels.max() == 99


def test_image_folder_loads_and_caches(tmp_path, monkeypatch, cifar10_like):
    write_image_folder(tmp_path, *cifar10_like)
    first = dl.load_cifar("cifar10", tmp_path)
    assert_splits_equal(first, cifar10_like)
    assert len(list(tmp_path.glob("hybrid-lt-cache-*.npz"))) == 1

    def no_decoding(path):
        raise AssertionError(f"decoded {path} although the cache is valid")

    monkeypatch.setattr(dl, "_decode_image", no_decoding)
    assert_splits_equal(dl.load_cifar("cifar10", tmp_path), cifar10_like)
    monkeypatch.undo()
    # A changed file changes the cache key: the new pixels are read and the stale cache goes.
    from PIL import Image
    changed = np.full((32, 32, 3), 7, dtype=np.uint8)
    target = tmp_path / "train" / "class_003" / "000020.png"
    Image.fromarray(changed).save(target)
    os.utime(target, ns=(1, 1))
    train, _ = dl.load_cifar("cifar10", tmp_path)
    np.testing.assert_array_equal(train.images[20], changed)
    assert len(list(tmp_path.glob("hybrid-lt-cache-*.npz"))) == 1


@pytest.mark.skipif(sys.platform == "darwin", reason="macOS file systems refuse names that are not UTF-8")
def test_names_that_are_not_utf8_load_and_cache(tmp_path, monkeypatch, cifar10_like):
    """Folders and files named in Latin-1 (a zip made on Windows, say): the cache key hashed the names as UTF-8 text
    and stopped on them with a UnicodeEncodeError. Python hands such names over with surrogates, and they hash as the
    bytes they are."""
    root = Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9"))
    write_image_folder(root, *cifar10_like)
    for split in ("train", "test"):  # class_000 keeps its place: 'a\xe9' sorts first too
        (root / split / "class_000").rename(root / split / os.fsdecode(b"a\xe9"))
    image = max((root / "train" / os.fsdecode(b"a\xe9")).iterdir())
    image.rename(image.with_name(os.fsdecode(b"\xe9") + image.name))  # still last in its class
    assert_splits_equal(dl.load_cifar("cifar10", root), cifar10_like)
    monkeypatch.setattr(dl, "_decode_image", lambda path: pytest.fail(f"decoded {path} although the cache is valid"))
    assert_splits_equal(dl.load_cifar("cifar10", root), cifar10_like)


def test_a_cache_write_removes_old_temporary_files_of_killed_processes_only(tmp_path, cifar10_like):
    """A process killed while writing the cache leaves atomic_write's temporary file (as large as the cache): the
    next cache write removes it once it is old, and leaves one that another process may be writing now."""
    write_image_folder(tmp_path, *cifar10_like)
    old = tmp_path / ".hybrid-lt-cache-0123abcd.npz.x1y2z3.tmp"
    fresh = tmp_path / ".hybrid-lt-cache-4567ef01.npz.a1b2c3.tmp"
    mine = tmp_path / ".other.npz.q1w2e3.tmp"  # not the cache's: never touched
    for path in (old, fresh, mine):
        path.write_bytes(b"half a cache")
    hours_ago = time.time() - 2 * 3600
    for path in (old, mine):
        os.utime(path, (hours_ago, hours_ago))
    dl.load_cifar("cifar10", tmp_path)
    assert len(list(tmp_path.glob("hybrid-lt-cache-*.npz"))) == 1
    assert not old.exists() and fresh.exists() and mine.exists()


def test_an_old_cache_that_may_not_be_removed_is_left_and_the_load_goes_on(tmp_path, monkeypatch, cifar10_like):
    """A shared data folder with the sticky bit (mode 1777): another user's old cache may not be removed. The new
    cache is written, the old one is theirs to keep, and the load goes on (it stopped with a PermissionError)."""
    write_image_folder(tmp_path, *cifar10_like)
    dl.load_cifar("cifar10", tmp_path)
    [old] = tmp_path.glob("hybrid-lt-cache-*.npz")
    target = tmp_path / "train" / "class_003" / "000020.png"
    os.utime(target, ns=(1, 1))  # a changed file: a new cache key
    real_unlink = Path.unlink

    def not_yours(self, *args, **kwargs):
        if self == old:
            raise PermissionError(1, "Operation not permitted", str(self))
        return real_unlink(self, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", not_yours)
    assert_splits_equal(dl.load_cifar("cifar10", tmp_path), cifar10_like)
    assert old.exists() and len(list(tmp_path.glob("hybrid-lt-cache-*.npz"))) == 2


def test_a_data_root_on_a_path_that_may_not_be_searched_is_one_error_and_its_hint_skips_such_folders(
        tmp_path, monkeypatch, tiny_cifar10):
    """Path.is_dir raises PermissionError where a folder on the way may not be searched (root ignores the mode bits,
    so the test makes is_dir raise): a private --data_root is a DataError naming it; a mount point's lost+found
    beside the data folder is passed over by the hint; image_folders_read answers."""
    write_pickled_cifar10(tmp_path / "mnt" / "cifar", *tiny_cifar10)
    private = [tmp_path / "private", tmp_path / "mnt" / "lost+found"]
    for folder in private:
        folder.mkdir(parents=True)
    real_is_dir = Path.is_dir

    def is_dir(self, *args, **kwargs):
        if any(folder in self.parents for folder in private):
            raise PermissionError(13, "Permission denied", str(self))
        return real_is_dir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "is_dir", is_dir)
    with pytest.raises(DataError, match=f"^cannot read {tmp_path / 'private'}/.*: Permission denied$"):
        dl.load_cifar("cifar10", tmp_path / "private")
    holder = tmp_path / "mnt" / "cifar"
    with pytest.raises(DataError, match=f"{holder} holds it: --data_root {holder}"):
        dl.load_cifar("cifar10", tmp_path / "mnt")
    assert dl.image_folders_read("cifar10", tmp_path / "private")


def test_missing_data_is_pointed_first_to_the_data_root_the_run_was_trained_with(tmp_path, tiny_cifar10):
    """A --data_root without the data, one folder of which holds another copy (a subset, say): where the run was
    trained with a --data_root that holds the data, the hint names that one, without --download advice; where that
    holds nothing, the folder below as before."""
    write_image_folder(tmp_path / "data" / "a_subset", *tiny_cifar10)
    trained = tmp_path / "elsewhere" / "cifar10-jpeg"
    write_pickled_cifar10(trained, *tiny_cifar10)
    with pytest.raises(DataError) as caught:
        dl.load_cifar("cifar10", tmp_path / "data", trained_with=str(trained))
    assert str(caught.value).endswith(f"; the run was trained with --data_root {trained}, which holds it")
    with pytest.raises(DataError, match=f"{tmp_path / 'data' / 'a_subset'} holds it: --data_root .*a_subset "
                                        f"\\(the run was trained with --data_root .*gone\\)$"):
        dl.load_cifar("cifar10", tmp_path / "data", trained_with=str(tmp_path / "gone"))


def test_every_data_error_names_another_data_root_the_run_was_trained_with(tmp_path, tiny_cifar10, monkeypatch):
    """Where the run's --data_root is another folder, an error whose hint does not already point to it ends with it
    in parentheses: missing data where that folder holds nothing either, a hint to another folder beginning alike
    (data2/sub is not data), a damaged copy. The same folder written otherwise (a symbolic link, ~, a trailing
    slash) is not named, nor a value that is not printable text (a damaged checkpoint's)."""
    empty, gone = tmp_path / "empty", tmp_path / "data"
    empty.mkdir()
    with pytest.raises(DataError) as caught:
        dl.load_cifar("cifar10", empty, trained_with=str(gone))
    assert str(caught.value).endswith(f"image-folder layout (the run was trained with --data_root {gone})")
    write_image_folder(tmp_path / "data2" / "sub", *tiny_cifar10)
    with pytest.raises(DataError) as caught:
        dl.load_cifar("cifar10", tmp_path / "data2", trained_with=str(gone))
    assert str(caught.value).endswith(f"--data_root {tmp_path / 'data2' / 'sub'} (the run was trained with "
                                      f"--data_root {gone})")
    damaged = write_pickled_cifar10(tmp_path / "damaged", *tiny_cifar10)
    (damaged / "test_batch").unlink()
    with pytest.raises(DataError) as caught:
        dl.load_cifar("cifar10", tmp_path / "damaged", trained_with=str(gone))
    assert "test_batch" in str(caught.value) and str(caught.value).endswith(f" (the run was trained with "
                                                                           f"--data_root {gone})")
    (tmp_path / "link").symlink_to(empty)
    monkeypatch.setenv("HOME", str(tmp_path))
    for then in (str(tmp_path / "link"), "~/empty", f"{empty}/",
                 "a\x00b", "a\nb", "\x1b[2J"):  # (a damaged checkpoint's: not named, nor a ValueError)
        with pytest.raises(DataError) as caught:
            dl.load_cifar("cifar10", empty, trained_with=then)
        assert "trained with" not in str(caught.value), then


def test_images_replaced_by_others_of_the_same_names_sizes_and_dates_are_decoded_again(tmp_path, tiny_cifar10):
    """Another archive's fixed-size files (BMP) unpacked over these with the same dates: the cache key sees the
    files' change times, which no archive restores, so the new pixels are read instead of the old cache's."""
    train, test = tiny_cifar10
    write_image_folder(tmp_path, train, test, fmt="bmp")
    target = next((tmp_path / "train" / "class_001").iterdir())
    stat = target.stat()
    first = dl.load_cifar("cifar10", tmp_path)[0]
    from PIL import Image
    other = 255 - np.asarray(Image.open(target))
    time.sleep(0.01)  # a later change time than the file's first one on any file system clock
    Image.fromarray(other).save(target, format="BMP")
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert target.stat().st_size == stat.st_size and target.stat().st_mtime_ns == stat.st_mtime_ns
    index = [i for i, path in enumerate(sorted((tmp_path / "train").rglob("*.bmp"))) if path == target][0]
    second = dl.load_cifar("cifar10", tmp_path)[0]
    np.testing.assert_array_equal(second.images[index], other)
    assert not np.array_equal(first.images[index], other)
    assert len(list(tmp_path.glob("hybrid-lt-cache-*.npz"))) == 1


def test_no_home_folder_leaves_the_cache_beside_the_images(tmp_path, monkeypatch, tiny_cifar10):
    """No HOME and no passwd entry (some containers): Path.home() raises; the data folder's cache still works."""
    write_image_folder(tmp_path, *tiny_cifar10)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(dl.Path, "home", staticmethod(no_home))
    dl.load_cifar("cifar10", tmp_path)
    assert len(list(tmp_path.glob("hybrid-lt-cache-*.npz"))) == 1


def test_image_folder_cache_falls_back_to_user_dir(tmp_path, monkeypatch, cifar10_like):
    root, cache_home = tmp_path / "data", tmp_path / "cache"
    write_image_folder(root, *cifar10_like)
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_home))
    real_write = dl.atomic_write

    def read_only_root(path, write):
        if path.parent == root:
            raise PermissionError(f"read-only: {path}")
        real_write(path, write)

    monkeypatch.setattr(dl, "atomic_write", read_only_root)
    assert_splits_equal(dl.load_cifar("cifar10", root), cifar10_like)
    assert not list(root.glob("*.npz")) and len(list((cache_home / "hybrid-lt").glob("*.npz"))) == 1
    monkeypatch.setattr(dl, "_decode_image", lambda path: pytest.fail(f"decoded {path}"))
    assert_splits_equal(dl.load_cifar("cifar10", root), cifar10_like)


def test_jpeg_folder_with_named_classes_sorts_labels(tmp_path):
    train, test = make_synthetic(10, 2, 1, seed=10)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    write_image_folder(tmp_path, train, test, fmt="jpg", class_names=names)
    loaded_train, loaded_test = dl.load_cifar("cifar10", tmp_path)
    np.testing.assert_array_equal(loaded_train.labels, train.labels)
    assert loaded_train.images.shape == (20, 32, 32, 3) and len(loaded_test.labels) == 10
    # Lossy, but close to the source pixels.
    assert np.abs(loaded_train.images.astype(int) - train.images.astype(int)).mean() < 20


def test_image_folders_named_by_unpadded_numbers_keep_numeric_order(tmp_path):
    """Class folders 0 .. 99 are labels 0 .. 99 and files 0.png, 1.png, .., 10.png keep that order (as text, 10
    would come before 2: labels and the long-tailed subset drawn per class would silently differ)."""
    train, test = make_synthetic(100, 11, 1, seed=12)
    write_image_folder(tmp_path, train, test, class_names=[str(c) for c in range(100)], digits=0)
    assert (tmp_path / "train" / "0" / "10.png").is_file() and (tmp_path / "train" / "99" / "1099.png").is_file()
    assert_splits_equal(dl.load_cifar("cifar100", tmp_path), (train, test))


def test_pickled_layout_wins_over_image_folders(tmp_path, cifar10_like):
    write_pickled_cifar10(tmp_path, *cifar10_like)
    write_image_folder(tmp_path, *make_synthetic(10, 1, 1, seed=11))
    assert_splits_equal(dl.load_cifar("cifar10", tmp_path), cifar10_like)


def fake_torchvision(monkeypatch, writer):
    """A stand-in torchvision whose CIFAR classes call ``writer(root)`` instead of downloading."""
    calls = []

    def dataset_class(root, train, download):
        calls.append((root, train, download))
        writer(root)

    datasets = types.SimpleNamespace(CIFAR10=dataset_class, CIFAR100=dataset_class)
    monkeypatch.setitem(sys.modules, "torchvision", types.SimpleNamespace(datasets=datasets))
    return calls


def test_download_reads_what_torchvision_wrote(tmp_path, monkeypatch, cifar10_like):
    calls = fake_torchvision(monkeypatch, lambda root: write_pickled_cifar10(root, *cifar10_like))
    assert_splits_equal(dl.load_cifar("cifar10", tmp_path / "new", download=True), cifar10_like)
    assert calls == [(str(tmp_path / "new"), True, True), (str(tmp_path / "new"), False, True)]


def test_download_failure_is_one_line(tmp_path, monkeypatch):
    def offline(root):
        raise RuntimeError("Error downloading cifar-10-python.tar.gz:\nno network")

    fake_torchvision(monkeypatch, offline)
    with pytest.raises(DataError, match="downloading cifar10") as info:
        dl.load_cifar("cifar10", tmp_path, download=True)
    assert "\n" not in str(info.value)


# --- bad input -------------------------------------------------------------------------------


def test_data_error_is_a_user_error():
    assert issubclass(DataError, UserError)


def test_empty_root_says_what_was_looked_for(tmp_path):
    with pytest.raises(DataError) as info:
        dl.load_cifar("cifar100", tmp_path)
    message = str(info.value)
    assert "cifar-100-python" in message and "train/<class>" in message and "--download" in message
    assert "\n" not in message


def test_unknown_dataset(tmp_path):
    with pytest.raises(DataError, match="unknown dataset"):
        dl.load_cifar("imagenet", tmp_path)


def test_wrong_number_of_class_folders(tmp_path):
    train, test = make_synthetic(9, 1, 1)
    write_image_folder(tmp_path, train, test)
    with pytest.raises(DataError, match="9 class folders; cifar10 needs 10"):
        dl.load_cifar("cifar10", tmp_path)


def test_empty_class_folder(tmp_path):
    train, test = make_synthetic(10, 1, 1)
    write_image_folder(tmp_path, train, test)
    for image in (tmp_path / "test" / "class_004").iterdir():
        image.unlink()
    with pytest.raises(DataError, match="class_004 has no images"):
        dl.load_cifar("cifar10", tmp_path)


def test_mismatched_class_names(tmp_path):
    train, test = make_synthetic(10, 1, 1)
    write_image_folder(tmp_path, train, test)
    (tmp_path / "test" / "class_004").rename(tmp_path / "test" / "class_x")
    with pytest.raises(DataError, match=r"differ \(only in train: class_004; only in test: class_x\)$"):
        dl.load_cifar("cifar10", tmp_path)


def test_a_folder_inside_a_class_folder_is_named_not_skipped(tmp_path):
    """Its images would have been left out silently (and the smallest class sets n_max: every class's size
    changes); a hidden one (.ipynb_checkpoints) is skipped like any hidden entry."""
    train, test = make_synthetic(10, 2, 1)
    write_image_folder(tmp_path, train, test)
    (tmp_path / "train" / "class_000" / ".ipynb_checkpoints").mkdir()
    assert len(dl.load_cifar("cifar10", tmp_path)[0].labels) == 20
    nested = tmp_path / "train" / "class_004" / "more"
    nested.mkdir()
    first = next(p for p in sorted((tmp_path / "train" / "class_004").iterdir()) if p.is_file())
    first.rename(nested / first.name)
    with pytest.raises(DataError, match=f"{nested} is a folder inside class folder .*class_004: put the class's "
                                        r"images directly in its folder \(train/<class>/<image>\)$"):
        dl.load_cifar("cifar10", tmp_path)
    nested.rename(tmp_path / "more")
    os.mkfifo(tmp_path / "train" / "class_004" / "pipe")
    with pytest.raises(DataError, match=r"pipe is not a regular file \(a pipe, socket or device\)$"):
        dl.load_cifar("cifar10", tmp_path)


def test_what_file_managers_leave_in_data_folders_is_skipped(tmp_path):
    """Synology's @eaDir thumbnail folders (in the split folder and in each class folder), Windows' Thumbs.db and
    desktop.ini, macOS's __MACOSX: neither a class, nor an image, nor "a folder inside a class folder"."""
    train, test = make_synthetic(10, 2, 1)
    write_image_folder(tmp_path, train, test)
    clean = dl.load_cifar("cifar10", tmp_path)
    for split in ("train", "test"):
        (tmp_path / split / "@eaDir" / "class_000").mkdir(parents=True)
        (tmp_path / split / "__MACOSX").mkdir()
        for class_dir in (tmp_path / split).glob("class_*"):
            (class_dir / "@eaDir").mkdir()
            (class_dir / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0 not an image")
            (class_dir / "desktop.ini").write_text("[.ShellClassInfo]\n")
    for loaded, expected in zip(dl.load_cifar("cifar10", tmp_path), clean):
        assert np.array_equal(loaded.images, expected.images) and np.array_equal(loaded.labels, expected.labels)
    (tmp_path / "train" / "class_000" / "eaDir").mkdir()  # any other folder still is an error
    with pytest.raises(DataError, match="eaDir is a folder inside class folder"):
        dl.load_cifar("cifar10", tmp_path)


def test_a_bad_image_stops_the_decoding_without_decoding_the_rest(tmp_path, monkeypatch):
    """The first error ends the decoding: the chunks not yet begun are cancelled (the pool used to decode the whole
    split first, which on the real data meant tens of seconds before the message, or before Ctrl-C took effect)."""
    train, test = make_synthetic(10, 4, 1)
    write_image_folder(tmp_path, train, test)
    monkeypatch.setattr(dl, "_DECODE_CHUNK", 1)
    decoded = []

    def decode(path):
        decoded.append(path)
        time.sleep(0.01)
        if path.name == "000000.png":
            raise DataError(f"cannot read image {path}: broken")
        return np.zeros((32, 32, 3), np.uint8)

    monkeypatch.setattr(dl, "_decode_image", decode)
    with pytest.raises(DataError, match="000000.png: broken"):
        dl.load_cifar("cifar10", tmp_path)
    assert len(decoded) < 20  # of 40 training images, one task each


def test_a_broken_link_for_a_class_folder_is_named(tmp_path):
    """Not "9 class folders; cifar10 needs 10" when the tenth is there but leads nowhere."""
    train, test = make_synthetic(10, 1, 1)
    write_image_folder(tmp_path, train, test)
    (tmp_path / "train" / "class_004").rename(tmp_path / "moved")
    os.symlink(tmp_path / "gone", tmp_path / "train" / "class_004")
    with pytest.raises(DataError, match=r"class_004 is a broken symbolic link$"):
        dl.load_cifar("cifar10", tmp_path)


def test_16_bit_grey_images_are_scaled_and_32_bit_ones_refused(tmp_path):
    """Pillow's convert("RGB") clips 16-bit grey (mode I;16) to 255: white images, silently. Scaled to 8 bits they
    hold the grey they show; 32-bit integer or float pixels (modes I, F) have no known range: refused."""
    from PIL import Image

    train, test = make_synthetic(10, 1, 1)
    write_image_folder(tmp_path, train, test)
    grey16 = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 64)  # 0 .. 65472
    target = tmp_path / "train" / "class_002" / "000002.png"
    Image.fromarray(grey16).save(target)
    assert Image.open(target).mode == "I;16"
    loaded = dl.load_cifar("cifar10", tmp_path)[0].images[2]
    expected = np.repeat(np.round(grey16.astype(np.float64) * 255 / 65535).astype(np.uint8)[..., None], 3, axis=2)
    np.testing.assert_array_equal(loaded, expected)
    # Pillow before 10.3 opened 16-bit grey PNGs as mode I (32-bit integers holding 0..65535): the same grey
    real_open = Image.open

    def old_pillow_open(path, *args, **kwargs):
        image = real_open(path, *args, **kwargs)
        if image.mode != "I;16":
            return image
        converted = image.convert("I")
        converted.format = image.format
        return converted

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Image, "open", old_pillow_open)
        np.testing.assert_array_equal(dl._decode_image(target), expected)
    for mode, array, what in (("I", grey16.astype(np.int32), "32-bit integer"),
                              ("F", grey16.astype(np.float32), "floating-point")):
        target.unlink()
        tiff = target.with_suffix(".tiff")
        Image.fromarray(array).save(tiff)
        assert Image.open(tiff).mode == mode
        with pytest.raises(DataError, match=f"000002.tiff has {what} pixels \\(Pillow's mode {mode}\\)"):
            dl.load_cifar("cifar10", tmp_path)
        tiff.unlink()
        Image.fromarray(train.images[2]).save(target)


def test_16_bit_grey_pgm_images_are_scaled(tmp_path):
    """Pillow opens a PGM with a maxval above 255 as mode I (format PPM), scaled to 0..65535: 16-bit grey as a PNG
    is, not 32-bit integers of unknown range (which it was refused as)."""
    grey16 = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 64)  # 0 .. 65472
    target = tmp_path / "grey16.pgm"
    target.write_bytes(b"P5\n32 32\n65535\n" + grey16.astype(">u2").tobytes())
    expected = np.repeat(np.round(grey16.astype(np.float64) * 255 / 65535).astype(np.uint8)[..., None], 3, axis=2)
    np.testing.assert_array_equal(dl._decode_image(target), expected)


def test_unreadable_image_is_named(tmp_path):
    train, test = make_synthetic(10, 2, 1)
    write_image_folder(tmp_path, train, test)
    broken = tmp_path / "train" / "class_002" / "000005.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(DataError, match="000005.png") as info:
        dl.load_cifar("cifar10", tmp_path)
    assert "\n" not in str(info.value)


def test_image_of_wrong_size_is_named(tmp_path):
    from PIL import Image
    train, test = make_synthetic(10, 1, 1)
    write_image_folder(tmp_path, train, test)
    Image.new("RGB", (64, 48)).save(tmp_path / "test" / "class_001" / "000001.png")
    with pytest.raises(DataError, match=r"000001.png is 64x48"):
        dl.load_cifar("cifar10", tmp_path)


def test_missing_or_broken_pickled_batch(tmp_path, cifar10_like):
    folder = write_pickled_cifar10(tmp_path, *cifar10_like)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match="^missing .*data_batch_3 in the pickled layout"):
        dl.load_cifar("cifar10", tmp_path)
    for not_a_file in (os.mkfifo, os.mkdir):  # not "missing", which the user can see it is not
        not_a_file(folder / "data_batch_3")
        with pytest.raises(DataError, match="data_batch_3 is not a file, so not the batch of the pickled layout"):
            dl.load_cifar("cifar10", tmp_path)
        os.rmdir(folder / "data_batch_3") if not_a_file is os.mkdir else os.unlink(folder / "data_batch_3")
    (folder / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot read .*data_batch_3"):
        dl.load_cifar("cifar10", tmp_path)


def rewrite_batch(folder, name: str, edit) -> None:
    """Load the pickled batch ``folder/name``, let ``edit(entry)`` change it in place, and write it back."""
    with open(folder / name, "rb") as f:
        entry = pickle.load(f)
    edit(entry)
    with open(folder / name, "wb") as f:
        pickle.dump(entry, f, protocol=2)


def empty_batch(entry: dict) -> None:
    entry[b"data"], entry[b"labels"] = entry[b"data"][:0], []


@pytest.mark.parametrize("split, names", [("test", ["test_batch"]),
                                          ("training", [f"data_batch_{i}" for i in range(1, 6)])])
def test_empty_pickled_split_is_refused(tmp_path, cifar10_like, split, names):
    """A valid pickle with 0 rows used to load, and the run crashed only when it evaluated at its end."""
    folder = write_pickled_cifar10(tmp_path, *cifar10_like)
    rewrite_batch(folder, "data_batch_2", empty_batch)
    train, _ = dl.load_cifar("cifar10", tmp_path)  # one empty batch of five is odd but harmless
    assert len(train.labels) == len(cifar10_like[0].labels) - 12
    for name in names:
        rewrite_batch(folder, name, empty_batch)
    with pytest.raises(DataError, match=f"the {split} split in .*{names[-1]}.* holds no images") as info:
        dl.load_cifar("cifar10", tmp_path)
    assert "\n" not in str(info.value)


def test_a_pickled_test_set_without_some_class_is_refused(tmp_path, cifar10_like):
    """Those classes' test accuracy is 0 / 0: it was reported as 0.0 and pulled the means down. (The image-folder
    layout refuses an empty test class folder; a class without training images, long_tailed_subset refuses.)"""
    folder = write_pickled_cifar10(tmp_path, *cifar10_like)

    def only_classes_0_to_2(entry: dict) -> None:
        entry[b"labels"] = [label % 3 for label in entry[b"labels"]]

    rewrite_batch(folder, "test_batch", only_classes_0_to_2)
    with pytest.raises(DataError, match=r"^the test split in .*cifar-10-batches-py \(test_batch\) has no image of "
                                        r"class 3, 4, 5, 6, 7, 8, 9: its accuracy, and the mean over classes, would "
                                        r"be undefined$"):
        dl.load_cifar("cifar10", tmp_path)


@pytest.mark.parametrize("damage, error", [
    (lambda raw: raw.replace(b"multiarray", b"mulXiarray"),
     r"UnpicklingError: it holds numpy\.(_)?core\.mulXiarray\._reconstruct, which no CIFAR batch holds"),
    (lambda raw: raw.replace(b"latin1", b"latNn1"),  # protocol 2 stores bytes via codecs.encode, in latin1 only
     r"UnpicklingError: it holds a call of codecs.encode with str in 'latNn1', which no CIFAR batch holds"),
    (lambda raw: b"\x80\x04\x95" + (2 ** 63 + 1).to_bytes(8, "little"), "ValueError: frame size"),  # FRAME: 8 EiB
    (lambda raw: b"\x80\x04\x8e" + (2 ** 62).to_bytes(8, "little"), "MemoryError"),  # BINBYTES8 of 4 EiB
], ids=["module", "encoding", "frame", "length"])
def test_damaged_pickled_batch_is_named(tmp_path, cifar10_like, damage, error):
    folder = write_pickled_cifar10(tmp_path, *cifar10_like)
    batch = folder / "data_batch_1"
    batch.write_bytes(damage(batch.read_bytes()))
    before = snapshot(tmp_path)
    with pytest.raises(DataError, match=f"cannot read .*data_batch_1: {error}") as info:
        dl.load_cifar("cifar10", tmp_path)
    assert "\n" not in str(info.value) and snapshot(tmp_path) == before


def object_pixels_with_none(entry: dict) -> None:
    entry[b"data"] = entry[b"data"].astype(object)
    entry[b"data"][0, 0] = None


def nan_pixel(entry: dict) -> None:
    entry[b"data"] = entry[b"data"].astype(np.float64)
    entry[b"data"][0, 0] = np.nan


PIXELS_NOT_INTEGERS = "pixel data must be integers in 0..255, got"
BAD_ARRAYS = {  # case: (edit of the batch's entry, expected message after the file name)
    # (an array of objects is refused as it is read: numpy would take its bytes for pointers, see below)
    "object pixels": (object_pixels_with_none, r"UnpicklingError: it holds an array or number of dtype dtype\('O'\)"),
    "string pixels": (lambda e: e.update({b"data": e[b"data"].astype(str)}), f"{PIXELS_NOT_INTEGERS} <U3"),
    "float pixels": (lambda e: e.update({b"data": e[b"data"].astype(np.float64)}), f"{PIXELS_NOT_INTEGERS} float64"),
    "nan pixel": (nan_pixel, f"{PIXELS_NOT_INTEGERS} float64"),
    "bool pixels": (lambda e: e.update({b"data": e[b"data"] > 127}), f"{PIXELS_NOT_INTEGERS} bool"),
    "huge label": (lambda e: e[b"labels"].__setitem__(0, 2 ** 70), "labels must be integers in 0..9, got object"),
    "float labels": (lambda e: e.update({b"labels": [y + 0.5 for y in e[b"labels"]]}),
                     "labels must be integers in 0..9, got float64"),
    "2-d labels": (lambda e: e.update({b"labels": [[y] for y in e[b"labels"]]}),
                   r"expected data \[N, 3072\] and N labels, got .* labels \(12, 1\)"),
}


@pytest.mark.parametrize("case", BAD_ARRAYS)
def test_bad_arrays_in_a_valid_pickle_are_named(tmp_path, cifar10_like, case):
    """Checked before any arithmetic on them: no TypeError from min(), no silent float -> int truncation."""
    edit, message = BAD_ARRAYS[case]
    folder = write_pickled_cifar10(tmp_path, *cifar10_like)
    rewrite_batch(folder, "data_batch_4", edit)
    with pytest.raises(DataError, match=f"data_batch_4: {message}") as info:
        dl.load_cifar("cifar10", tmp_path)
    assert "\n" not in str(info.value)


def png_claiming_size(path, width: int, height: int) -> None:
    """A PNG whose header claims width x height, with a few bytes of pixel data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def tiny_cifar10() -> tuple[ArraySplit, ArraySplit]:
    return make_synthetic(10, 2, 1, seed=12)


def test_decompression_bomb_header_is_named(tmp_path, tiny_cifar10):
    write_image_folder(tmp_path, *tiny_cifar10)
    png_claiming_size(tmp_path / "train" / "class_006" / "000013.png", 100000, 100000)
    with pytest.raises(DataError, match=r"cannot read image .*000013\.png: DecompressionBombError") as info:
        dl.load_cifar("cifar10", tmp_path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("where", ["train/class_000/loop", "test/loop"])
def test_symlink_loop_is_named(tmp_path, tiny_cifar10, where):
    write_image_folder(tmp_path, *tiny_cifar10)
    os.symlink("loop", tmp_path / where)
    with pytest.raises(DataError, match=f"cannot read {tmp_path / where}: ") as info:
        dl.load_cifar("cifar10", tmp_path)
    assert "\n" not in str(info.value)


def test_broken_symlink_is_named_not_skipped(tmp_path, tiny_cifar10):
    """A dangling link is no file, so it was left out silently: that class lost an image."""
    write_image_folder(tmp_path, *tiny_cifar10)
    os.symlink(tmp_path / "elsewhere.png", tmp_path / "train" / "class_003" / "000099.png")
    with pytest.raises(DataError, match=r"000099\.png is a broken symbolic link"):
        dl.load_cifar("cifar10", tmp_path)


CACHE_DAMAGE = {
    "8x8 train images": lambda a: {"train_images": np.zeros((8, 8), np.uint8)},
    "truncated train labels": lambda a: {"train_labels": a["train_labels"][:5]},
    "empty splits": lambda a: {name: array[:0] for name, array in a.items()},
    "channels-first test images": lambda a: {"test_images": a["test_images"].transpose(0, 3, 1, 2).copy()},
    "float train images": lambda a: {"train_images": a["train_images"].astype(np.float32)},
    "test labels out of range": lambda a: {"test_labels": a["test_labels"] + 10},
}


@pytest.mark.parametrize("damage", CACHE_DAMAGE)
def test_cache_that_does_not_match_the_folders_is_rebuilt(tmp_path, monkeypatch, tiny_cifar10, damage):
    """A cache under the right key but with the wrong content was used, and training failed later."""
    write_image_folder(tmp_path, *tiny_cifar10)
    dl.load_cifar("cifar10", tmp_path)
    (cache,) = tmp_path.glob("hybrid-lt-cache-*.npz")
    with np.load(cache) as stored:
        arrays = dict(stored)
    arrays.update(CACHE_DAMAGE[damage](arrays))
    with open(cache, "wb") as f:
        np.savez(f, **arrays)
    assert_splits_equal(dl.load_cifar("cifar10", tmp_path), tiny_cifar10)
    # Rebuilt in place: the next load reads it without decoding.
    assert list(tmp_path.glob("hybrid-lt-cache-*.npz")) == [cache]
    monkeypatch.setattr(dl, "_decode_image", lambda path: pytest.fail(f"decoded {path}"))
    assert_splits_equal(dl.load_cifar("cifar10", tmp_path), tiny_cifar10)
