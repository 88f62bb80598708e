"""Synthetic CIFAR-like data, writers for the real on-disk layouts, a tiny Trainer and an in-process main(), shared by
the tests."""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Sequence

import numpy as np

from dataset_loader import ArraySplit


def ascii_locale_env() -> dict[str, str]:
    """This process's environment under the C locale with Python's UTF-8 mode and locale coercion off: a child's
    locale encoding is then ASCII (what a program that reads files without encoding= would decode with)."""
    return {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}


def make_synthetic(num_classes: int, n_train_per_class: int, n_test_per_class: int,
                   seed: int = 0) -> tuple[ArraySplit, ArraySplit]:
    """(train, test): uint8 [N, 32, 32, 3] images, int64 labels grouped by class (0, 0, ..., 1, 1, ...).

    Each class has its own colour and a horizontal or vertical stripe pattern under uniform noise,
    so a small network can learn something; the noise makes every image distinct.
    """
    rng = np.random.default_rng(seed)
    colours = rng.integers(48, 208, size=(num_classes, 3))  # [C, 3]
    stripes = np.where(np.arange(32) % 4 < 2, 24, -24)  # [32]

    def split(n_per_class: int) -> ArraySplit:
        labels = np.repeat(np.arange(num_classes, dtype=np.int64), n_per_class)  # [N]
        pattern = np.where((labels % 2 == 0)[:, None, None], stripes[None, :, None], stripes[None, None, :])  # [N, 32, 32]
        noise = rng.integers(-40, 41, size=(len(labels), 32, 32, 3))
        images = colours[labels][:, None, None, :] + pattern[..., None] + noise  # [N, 32, 32, 3]
        return ArraySplit(np.clip(images, 0, 255).astype(np.uint8), labels)

    return split(n_train_per_class), split(n_test_per_class)


def _cifar_rows(images: np.ndarray) -> np.ndarray:
    """uint8 [N, 32, 32, 3] -> [N, 3072]: R plane, G plane, B plane, each row-major, as CIFAR stores it."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2)).reshape(len(images), 3072)


def _dump(path: Path, entry: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)  # the originals are protocol-2 pickles from Python 2


def write_pickled_cifar10(root: str | os.PathLike, train: ArraySplit, test: ArraySplit) -> Path:
    """Write root/cifar-10-batches-py/ (data_batch_1..5, test_batch, batches.meta), keys as bytes."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    batches = np.array_split(np.arange(len(train.labels)), 5)
    for i, idx in enumerate(batches, start=1):
        _dump(folder / f"data_batch_{i}", {
            b"batch_label": f"training batch {i} of 5".encode(),
            b"labels": [int(y) for y in train.labels[idx]],
            b"data": _cifar_rows(train.images[idx]),
            b"filenames": [f"img_{j}.png".encode() for j in idx],
        })
    _dump(folder / "test_batch", {
        b"batch_label": b"testing batch 1 of 1",
        b"labels": [int(y) for y in test.labels],
        b"data": _cifar_rows(test.images),
        b"filenames": [f"test_{j}.png".encode() for j in range(len(test.labels))],
    })
    _dump(folder / "batches.meta", {
        b"label_names": [f"class_{c}".encode() for c in range(10)],
        b"num_cases_per_batch": len(batches[0]),
        b"num_vis": 3072,
    })
    return folder


def write_pickled_cifar100(root: str | os.PathLike, train: ArraySplit, test: ArraySplit) -> Path:
    """Write root/cifar-100-python/ (train, test, meta) with fine_labels and coarse_labels = fine // 5."""
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for name, split in (("train", train), ("test", test)):
        _dump(folder / name, {
            b"batch_label": f"{name}ing batch 1 of 1".encode(),
            b"fine_labels": [int(y) for y in split.labels],
            b"coarse_labels": [int(y) // 5 for y in split.labels],
            b"data": _cifar_rows(split.images),
            b"filenames": [f"{name}_{j}.png".encode() for j in range(len(split.labels))],
        })
    _dump(folder / "meta", {
        b"fine_label_names": [f"fine_{c}".encode() for c in range(100)],
        b"coarse_label_names": [f"coarse_{c}".encode() for c in range(20)],
    })
    return folder


def write_image_folder(root: str | os.PathLike, train: ArraySplit, test: ArraySplit, fmt: str = "png",
                       class_names: Sequence[str] | None = None, digits: int = 6) -> Path:
    """Write root/train/<class>/NNNNNN.<fmt> and root/test/<class>/NNNNNN.<fmt>.

    Files are numbered by their index in the split (zero-padded to `digits`; 0: not padded), so a
    class-grouped split reads back in the same order. Default class names (class_000, class_001, ...)
    sort in label order; PNG is lossless, so the arrays round-trip exactly.
    """
    from PIL import Image

    num_classes = int(max(train.labels.max(), test.labels.max())) + 1
    names = list(class_names) if class_names is not None else [f"class_{c:03d}" for c in range(num_classes)]
    for split_name, split in (("train", train), ("test", test)):
        for name in names:
            (Path(root) / split_name / name).mkdir(parents=True, exist_ok=True)
        for i, (image, label) in enumerate(zip(split.images, split.labels)):
            Image.fromarray(image).save(Path(root) / split_name / names[label] / f"{i:0{digits}d}.{fmt}")
    return Path(root)


def snapshot(folder: str | os.PathLike) -> dict[str, str]:
    """Every file under `folder` with a hash of its bytes (empty when the folder does not exist): equal
    snapshots before and after a command mean it wrote, changed and deleted nothing there."""
    import hashlib

    folder = Path(folder)
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def tiny_trainer(train: ArraySplit, *argv: str):
    """main.Trainer for a 4-class split on the CPU: resnet8, batch 8, and the flags in argv."""
    import torch

    import main

    cfg = main.parse_config(["--device", "cpu", "--model", "resnet8", "--batch_size", "8", *argv])
    return main.Trainer(cfg, train, 4, torch.device("cpu"))


def call_main(argv: list[str], capsys) -> tuple[int, str]:
    """main.main(argv) in this process: (exit code, what it wrote to stderr)."""
    import main

    try:
        code = main.main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    return code, capsys.readouterr().err


class RunsCode:
    """Unpickled, it would make a folder: what a checkpoint from elsewhere could do with any call."""

    def __init__(self, folder):
        self.folder = str(folder)

    def __reduce__(self):
        import os

        return os.mkdir, (self.folder,)
