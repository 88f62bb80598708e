"""What the model sees: CIFAR from disk, the long-tailed subset, samplers, and the augmented batch stream.

Data flow: source files -> uint8 arrays ``[N, 32, 32, 3]`` (HWC, as CIFAR stores them) -> long-tailed
subset (LDAM-DRW's generator) -> uint8 tensors ``[N, 3, 32, 32]`` kept once on the run's device ->
per step, indices drawn by each branch's sampler and batched augmentation on the device.

The batch stream is a pure function of ``(seed, epoch, step)``: each step reseeds one device generator
from a seed derived on the host, so resuming mid-epoch needs no generator state, and every rank of a
multi-process run draws the global batch's random choices and keeps its own slice.
"""
from __future__ import annotations

import codecs
import concurrent.futures
import hashlib
import math
import os
import pickle
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from util import UserError, atomic_write, exception_text, one_line


class DataError(UserError):
    """A problem with the data or the data options, reported as one line."""


DATASETS: dict[str, int] = {"cifar10": 10, "cifar100": 100}
SAMPLERS = ("instance", "class", "reversed", "sqrt")
IMB_TYPES = ("exp", "step")

IMAGE_SIZE = 32
CROP_PADDING = 4
FLIP_PROB = 0.5
GRAY_PROB = 0.2
GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma: PIL's convert("L") weights, kept in float (PIL rounds)
# Augmentations of the feature branch's two views: "paper" is the classifier branch's (crop from the
# 4-pixel padded image, flip, grayscale), "supcon" SupContrast's CIFAR recipe (see apply_supcon_augment).
SC_AUGS = ("paper", "supcon")
RESIZED_CROP_SCALE = (0.2, 1.0)     # SupContrast's CIFAR setting (torchvision's default is 0.08)
RESIZED_CROP_RATIO = (3 / 4, 4 / 3)  # torchvision's default
RESIZED_CROP_ATTEMPTS = 10           # torchvision's, before it falls back to the whole image
JITTER_STRENGTHS = (0.4, 0.4, 0.4, 0.1)  # ColorJitter(brightness, contrast, saturation, hue)
JITTER_PROB = 0.8

# Torchvision's pickled folder for each dataset, and the files inside it.
_PICKLED_DIRS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
_PICKLED_FILES = {
    "cifar10": ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]),
    "cifar100": (["train"], ["test"]),
}
_LABEL_KEYS = {"cifar10": "labels", "cifar100": "fine_labels"}
_CACHE_VERSION = "1"  # bump when the cache's content or layout changes
_CACHE_PREFIX = "hybrid-lt-cache-"
_DECODE_CHUNK = 500  # images per task of the decoding threads
_STALE_TMP_S = 3600.0  # a cache's temporary file this much older than now was left by a process that died


def dataset_stats(dataset: str) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel (mean, std) of the training set, RGB on the 0..1 scale."""
    _check_dataset(dataset)
    if dataset == "cifar10":
        return (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    return (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


@dataclass(frozen=True)
class ArraySplit:
    """One split of a dataset in host memory.

    images: uint8 [N, 32, 32, 3] (HWC, as on disk); labels: int64 [N].
    """

    images: np.ndarray
    labels: np.ndarray

    def digest(self) -> str:
        """SHA-256 of the shapes, labels and pixels in order (about 20 ms for CIFAR-10-LT): which images a run
        trained on, to tell another copy of the data with the same class sizes apart."""
        h = hashlib.sha256(repr((self.images.shape, self.labels.shape)).encode())
        h.update(np.ascontiguousarray(self.labels, dtype=np.int64).data)
        h.update(np.ascontiguousarray(self.images, dtype=np.uint8).data)
        return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def load_cifar(dataset: str, data_root: str | os.PathLike, download: bool = False,
               dataset_of: Optional[str] = None, trained_with: Optional[str] = None) -> tuple[ArraySplit, ArraySplit]:
    """(train, test) of ``dataset`` from ``data_root``, whichever layout is there. ``dataset_of``: what fixed the
    dataset (a checkpoint, for --eval_only or --resume), so that a folder of the other dataset is not answered with
    --dataset; ``trained_with``: the --data_root that checkpoint's run was trained with. Where that is another
    folder, every DataError names it: a missing data's hint points to it where it holds the data (before any folder
    one level down), and any other error ends with it in parentheses (the flag is a path, given again on --resume,
    not read from the checkpoint). A value that is not printable text is not named.

    Detection order: torchvision's pickled folder (``cifar-10-batches-py/`` or ``cifar-100-python/``),
    then image folders (``train/<class>/*`` and ``test/<class>/*``), then torchvision's download when
    ``download`` is set. Labels of CIFAR-100 are its fine labels.
    """
    _check_dataset(dataset)
    if trained_with is not None and (not trained_with.isprintable() or same_folder(trained_with, data_root)):
        trained_with = None  # (the same folder; or a damaged checkpoint's: a NUL, a line break, a terminal escape)
    try:
        return _load_cifar(dataset, Path(data_root).expanduser(), download, dataset_of, trained_with)
    except DataError as e:
        if trained_with is None or isinstance(e, _HintNamedTrainedWith):
            raise
        raise DataError(f"{e} (the run was trained with --data_root {trained_with})") from None


class _HintNamedTrainedWith(DataError):
    """No data under --data_root, with a hint that names the --data_root the run was trained with (which holds it)."""


def same_folder(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two --data_root values name one folder (written with ~, a trailing slash or a symbolic link)."""
    return os.path.realpath(os.path.expanduser(a)) == os.path.realpath(os.path.expanduser(b))


def _load_cifar(dataset: str, root: Path, download: bool, dataset_of: Optional[str],
                trained_with: Optional[str]) -> tuple[ArraySplit, ArraySplit]:
    """load_cifar's reading, without naming the --data_root the run was trained with on errors other than the
    missing data's hint."""
    pickled_dir = root / _PICKLED_DIRS[dataset]
    try:  # is_dir raises where a folder on the way may not be searched (a colleague's private folder)
        pickled = pickled_dir.is_dir()
        folders = not pickled and (root / "train").is_dir() and (root / "test").is_dir()
    except OSError as e:
        raise DataError(f"cannot read {e.filename or root}: {e.strerror or e}") from e
    if pickled:
        return _read_pickled(dataset, pickled_dir)
    if folders:
        return _read_image_folders(dataset, root)
    if download:
        _download(dataset, root)
        return _read_pickled(dataset, pickled_dir)
    hint, elsewhere, named = _data_root_hint(dataset, root, dataset_of, trained_with)
    way = "" if elsewhere else (f"pass --download to fetch it there, or put the images in that image-folder "
                                f"layout")  # (not where the hint found the data: no download is wanted)
    raise (_HintNamedTrainedWith if named else DataError)(
        f"no {dataset} data in {root}: looked for {pickled_dir}/ (torchvision's pickled layout) and "
        f"{root}/train/<class>/* + {root}/test/<class>/* (image folders); {'; '.join(filter(None, (hint, way)))}"
    )


# The pickled layout's file of class names, and its entry: CIFAR-100's fine ones, as its labels.
_META = {"cifar10": ("batches.meta", "label_names"), "cifar100": ("meta", "fine_label_names")}


def class_names(dataset: str, data_root: str | os.PathLike) -> Optional[list[str]]:
    """The names of ``dataset``'s classes in label order, as the data that load_cifar reads there gives them: the
    pickled layout's meta file (``label_names``; CIFAR-100's ``fine_label_names``), or the image folders' class
    folders; None where they cannot be read (a pickled copy without a usable meta file). For reports only: no
    run depends on them."""
    root = Path(data_root).expanduser()
    folder = root / _PICKLED_DIRS[dataset]
    try:
        if _is_dir(folder):
            path, key = folder / _META[dataset][0], _META[dataset][1]
            if not path.is_file():
                return None
            names = _str_keys(_unpickle(path))[key]
            if not isinstance(names, list) or len(names) != DATASETS[dataset]:
                return None
            names = [name.decode("utf-8", "replace") if isinstance(name, bytes) else name for name in names]
        else:
            names = [os.path.basename(path) for path in _class_dirs(root / "train")]
    except Exception:  # noqa: BLE001 - a damaged or odd meta file: the reports show class numbers instead
        return None
    if len(names) != DATASETS[dataset] or not all(isinstance(name, str) for name in names):
        return None
    return names


def _data_root_hint(dataset: str, root: Path, dataset_of: Optional[str] = None,
                    trained_with: Optional[str] = None) -> tuple[str, bool, bool]:
    """What a --data_root without ``dataset``'s data holds instead, when that says what was meant: the pickled
    folder itself, an image-layout split folder itself, the other dataset, or a folder one level down that holds
    the data; whether that is ``dataset``'s data elsewhere (the --data_root to give); and whether the hint names
    the --data_root the run was trained with (``trained_with``), which it does where that holds the data: after
    the other dataset's note and before the folder one level down, which may hold another copy, or a subset."""
    if root.name == _PICKLED_DIRS[dataset] and _is_dir(root):
        return f"{root} is the pickled folder itself: pass its parent, --data_root {root.parent}", True, False
    if root.name in IMAGE_FOLDER_SPLITS and _image_folders_of(dataset, root.parent):
        return (f"{root} is the image layout's {root.name}/ folder itself: pass its parent, --data_root "
                f"{root.parent}"), True, False
    trained, there = "", Path(trained_with).expanduser() if trained_with else None
    if there is not None and _holds(dataset, there):  # (a relative path is relative to where that run started)
        relative = "" if there.is_absolute() else f" (a relative path; from here, {there.absolute()})"
        trained = f"the run was trained with --data_root {trained_with}, which holds it{relative}"
    others = [name for name in DATASETS if name != dataset and _is_dir(root / _PICKLED_DIRS[name])]
    if others:
        held = f"it holds {_PICKLED_DIRS[others[0]]}/, {others[0]}'s data"
        held = f"{held}, but {dataset_of} is {dataset}'s" if dataset_of else f"{held}: --dataset {others[0]}?"
        return "; ".join(filter(None, (held, trained))), bool(trained), bool(trained)
    if trained:
        return trained, True, True
    try:
        below = sorted(p for p in root.iterdir() if _is_dir(p))
    except OSError:  # not a folder, or unreadable: the message above says enough
        return "", False, False
    for sub in below:  # (one that may not be searched, such as a mount point's lost+found, holds nothing here)
        if _holds(dataset, sub):
            return f"{sub} holds it: --data_root {sub}", True, False
    return "", False, False


def _holds(dataset: str, root: Path) -> bool:
    """Whether ``root`` holds ``dataset``'s data in either layout (as far as its folders say)."""
    return _is_dir(root / _PICKLED_DIRS[dataset]) or _image_folders_of(dataset, root)


# The image-folder layout's split folders under a --data_root (train/<class>/*, test/<class>/*).
IMAGE_FOLDER_SPLITS = ("train", "test")


def image_folders_read(dataset: str, data_root: str | os.PathLike) -> bool:
    """Whether load_cifar reads ``data_root``'s image folders for ``dataset`` (no pickled folder takes precedence),
    as far as the pickled folder decides it: main.py keeps a run's folder out of them."""
    return not _is_dir(Path(data_root).expanduser() / _PICKLED_DIRS[dataset])


def _is_dir(path: Path) -> bool:
    """path.is_dir(), False where a folder on the way may not be searched (is_dir raises PermissionError there)."""
    try:
        return path.is_dir()
    except OSError:
        return False


def _image_folders_of(dataset: str, root: Path) -> bool:
    """Whether ``root`` holds train/ and test/ image folders with ``dataset``'s number of classes (so that a
    CIFAR-10 folder is not offered for CIFAR-100)."""
    try:
        return (root / "test").is_dir() and len(_class_dirs(root / "train")) == DATASETS[dataset]
    except OSError:
        return False


def _check_dataset(dataset: str) -> None:
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")


def _download(dataset: str, root: Path) -> None:
    """Torchvision's own download into ``root``; it leaves the pickled folder that we then read."""
    try:
        from torchvision import datasets
    except ImportError as exc:
        raise DataError(f"--download needs torchvision, which failed to import: {one_line(exc)}") from exc
    dataset_class = datasets.CIFAR10 if dataset == "cifar10" else datasets.CIFAR100
    try:
        root.mkdir(parents=True, exist_ok=True)
        for train in (True, False):
            dataset_class(root=str(root), train=train, download=True)
    except Exception as exc:  # network, disk or archive problems all mean the same to the user
        raise DataError(f"downloading {dataset} into {root} failed: {one_line(exc)}") from exc


# --- torchvision's pickled layout -----------------------------------------------------------


def _read_pickled(dataset: str, folder: Path) -> tuple[ArraySplit, ArraySplit]:
    train_files, test_files = _PICKLED_FILES[dataset]
    label_key = _LABEL_KEYS[dataset]
    num_classes = DATASETS[dataset]
    splits = []
    for split_name, names in (("training", train_files), ("test", test_files)):
        parts = [_read_pickled_batch(folder / name, label_key, num_classes) for name in names]
        split = ArraySplit(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]))
        if not len(split.labels):
            # Caught here rather than at the end of training, where evaluating an empty test set fails.
            raise DataError(f"the {split_name} split in {folder} ({', '.join(names)}) holds no images")
        missing = np.flatnonzero(np.bincount(split.labels, minlength=num_classes) == 0)
        if split_name == "test" and len(missing):  # (a class without training images: long_tailed_subset says so)
            shown = ", ".join(str(c) for c in missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10
                                                                else "")
            raise DataError(f"the test split in {folder} ({', '.join(names)}) has no image of class {shown}: its "
                            f"accuracy, and the mean over classes, would be undefined")
        splits.append(split)
    return splits[0], splits[1]


def _refuse(what: str) -> pickle.UnpicklingError:
    return pickle.UnpicklingError(f"it holds {what}, which no CIFAR batch holds (refused)")


def _plain_dtype(dtype: Any) -> np.dtype:
    """`dtype`, where it is a plain one (bool, number or string: no fields, subarray or objects) whose internals
    (flags, size, alignment, which a pickle can set) are those numpy gives its type; else refused. A dtype whose
    flags a file chose could make numpy read the array's bytes as object pointers. (Pixels and labels of other
    plain dtypes load, and are then named as what they are.)"""
    if not isinstance(dtype, np.dtype):
        raise _refuse(f"an array or number whose dtype is a {type(dtype).__name__}")
    if dtype.kind not in "biufcSU" or dtype.names is not None or dtype.subdtype or not dtype.itemsize:
        raise _refuse(f"an array or number of dtype {dtype!r}")  # (itemsize 0: any count of elements over no bytes)
    usual = np.dtype(dtype.str)
    if (dtype.flags, dtype.itemsize, dtype.alignment) != (usual.flags, usual.itemsize, usual.alignment):
        raise _refuse(f"a dtype {dtype.str} whose flags, size or alignment are not numpy's")
    return dtype


class _ArrayType:
    """What the batch's name numpy.ndarray stands for: only the first argument of _reconstruct, not a class the
    file could call with arguments of its own (an array over a buffer with strides, say)."""

    __name__ = "numpy.ndarray"  # (what Python's unpickler names in the error of a call of it)


_ARRAY_TYPE = _ArrayType()
_RECONSTRUCT = np.zeros(0).__reduce__()[0]
_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]
_SCALAR = np.int64(0).__reduce__()[0]


def _dtype(spec: Any, align: Any = False, copy: Any = True) -> np.dtype:
    """numpy.dtype as a pickle calls it: from a type string only, and always a copy (never numpy's own dtype of the
    type, which a BUILD would change for the whole process)."""
    if not isinstance(spec, str):
        raise _refuse(f"a dtype made from a {type(spec).__name__}")
    return _plain_dtype(np.dtype(spec, bool(align), True))


def _reconstruct(subtype: Any, shape: Any, typecode: Any) -> np.ndarray:
    """An empty array, as numpy pickles one (_reconstruct(ndarray, (0,), b'b')), whose BUILD then gives it its
    shape, dtype and bytes: every byte of it from the file (an array of another shape would be memory that nothing
    wrote: the heap's, or gigabytes asked of a file of a few bytes)."""
    if subtype is not _ARRAY_TYPE:
        raise _refuse(f"an array of type {type(subtype).__name__}")
    if shape != (0,):
        raise _refuse(f"an array made with shape {one_line(shape)[:40]}, not as numpy pickles one, (0,)")
    array = _RECONSTRUCT(np.ndarray, (0,), typecode)
    _plain_dtype(array.dtype)
    return array


def _frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    """An array over the file's own bytes (protocol 5 passes them as bytes or bytearray): not over another
    array's memory, which a later BUILD of that array would free under it."""
    if type(buffer) not in (bytes, bytearray):
        raise _refuse(f"an array over a {type(buffer).__name__}")
    return _FROMBUFFER(buffer, _plain_dtype(dtype), shape, order)


def _scalar(dtype: Any, content: Any) -> Any:
    """A numpy number as numpy pickles one: its dtype and its bytes (text in latin1 from Python 2), all of them
    (without them numpy would make one of any size the dtype says, from a file of a few bytes)."""
    dtype = _plain_dtype(dtype)
    if not isinstance(content, (bytes, str)) or len(content) != dtype.itemsize:
        raise _refuse(f"a number of dtype {dtype.str} made from other than its {dtype.itemsize} bytes")
    return _SCALAR(dtype, content)


def _empty_bytes() -> bytes:
    """bytes as Python 3 pickles an empty one in protocol 2 (a call of bytes with no argument): bytes(n) would make
    n zero bytes that the file does not hold."""
    return b""


def _latin1(text: Any, encoding: Any = "utf-8") -> bytes:
    """codecs.encode as Python 3 pickles bytes in protocol 2: text in latin1."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _refuse(f"a call of codecs.encode with {type(text).__name__} in {encoding!r}")
    return codecs.encode(text, "latin1")


class _BatchUnpickler(pickle._Unpickler):
    """A CIFAR batch holds a dict of bytes, lists, numbers and numpy arrays: the only globals it names are numpy's
    array and dtype types, the functions that rebuild an array or a numpy scalar (a label saved again as np.int64)
    (under numpy 1's and numpy 2's module names; with protocol 5, from a buffer) and those that make bytes. Any
    other is code that unpickling would call, refused before it runs: a --data_root from a mirror or a colleague
    cannot run code when it is read (pickle.load, as torchvision's reader, would). The allowed ones are narrowed
    to what numpy's own pickles do with them, so that no file can have numpy read object pointers, freed memory or
    memory it never wrote: plain dtypes only (_plain_dtype); an array made empty, then given one state (BUILD:
    Python's own unpickler, whose opcodes can be overridden, as C's cannot), or over the file's own bytes; a
    number from all its bytes; a dtype's state checked on a copy and never set; numpy.ndarray not callable."""

    _SAFE = {("numpy", "ndarray"): _ARRAY_TYPE, ("numpy", "dtype"): _dtype,
             **{(f"numpy.{core}.multiarray", "_reconstruct"): _reconstruct for core in ("core", "_core")},
             **{(f"numpy.{core}.numeric", "_frombuffer"): _frombuffer for core in ("core", "_core")},
             **{(f"numpy.{core}.multiarray", "scalar"): _scalar for core in ("core", "_core")},
             # How Python 3 pickles bytes in protocol 2 (an empty one as a call of bytes, Python 2's name for it)
             ("_codecs", "encode"): _latin1,
             ("__builtin__", "bytes"): _empty_bytes, ("builtins", "bytes"): _empty_bytes}

    def find_class(self, module: str, name: str) -> Any:
        found = self._SAFE.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"it holds {module}.{name}, which no CIFAR batch holds and which unpickling "
                                         f"would call (refused)")
        return found

    def load_build(self) -> None:
        """BUILD: an array's state (version, shape, dtype, is_fortran, bytes) with a plain dtype; a dtype's state
        only where it leaves the dtype as it is (plain, as made: checked on a copy, and not set)."""
        state, target = self.stack.pop(), self.stack[-1]
        if isinstance(target, np.dtype):
            copy = np.dtype(target, copy=True)
            copy.__setstate__(state)
            if _plain_dtype(copy).str != target.str:
                raise _refuse(f"a dtype {target.str} given the state of a {copy.str}")
        elif type(target) is np.ndarray and isinstance(state, tuple) and len(state) in (4, 5):
            if target.size or target.shape != (0,):  # once, on the empty array _reconstruct made
                raise _refuse("a second state for an array")
            _plain_dtype(state[-3])
            target.__setstate__(state)
        else:
            raise _refuse(f"state for a {type(target).__name__}")

    dispatch = {**pickle._Unpickler.dispatch, pickle.BUILD[0]: load_build}


def _unpickle(path: Path) -> Any:
    """The pickled layout's file `path` (a batch, or the meta file), read by _BatchUnpickler as Python 2 wrote it:
    latin1 keeps its numpy arrays intact."""
    with open(path, "rb") as f, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a damaged file's numpy warnings would add lines before the one error
        return _BatchUnpickler(f, encoding="latin1").load()


def _str_keys(entry: dict) -> dict:
    """A pickled dict's keys as str: bytes or str, depending on who wrote the file."""
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}


def _read_pickled_batch(path: Path, label_key: str, num_classes: int) -> ArraySplit:
    """One pickled batch: ``data`` uint8 [N, 3072] (R plane, G plane, B plane, each row-major) + labels.

    The originals were pickled by Python 2: latin1 keeps their numpy arrays intact, and keys may be
    bytes or str depending on who wrote the file, so they are normalised to str.
    """
    if not path.is_file():
        if path.exists():  # (a folder, or a named pipe, whose open would wait for a writer)
            raise DataError(f"{path} is not a file, so not the batch of the pickled layout it is named after: "
                            f"delete the folder and use --download, or restore it")
        raise DataError(f"missing {path} in the pickled layout; delete the folder and use --download, or restore it")
    try:
        raw = _unpickle(path)
    except Exception as exc:  # a damaged pickle raises nearly anything: ImportError, LookupError, MemoryError, ...
        raise DataError(f"cannot read {path}: {exception_text(exc)}") from exc
    if not isinstance(raw, dict):
        raise DataError(f"{path} is not a CIFAR batch: expected a pickled dict, got {type(raw).__name__}")
    entry = _str_keys(raw)
    arrays = []
    for key in ("data", label_key):
        if key not in entry:
            raise DataError(f"{path} has no {key!r} entry; is it a CIFAR batch of this dataset?")
        try:
            arrays.append(np.asarray(entry[key]))
        except Exception as exc:  # the value is whatever object the file held, e.g. a ragged list
            raise DataError(f"cannot read {path}: its {key!r} entry is not an array ({one_line(exc)})") from exc
    data, labels = arrays
    if labels.size == 0:
        labels = labels.astype(np.int64)  # np.asarray([]) is float64; an empty batch is refused per split
    if data.ndim != 2 or data.shape[1] != 3 * IMAGE_SIZE * IMAGE_SIZE or labels.ndim != 1 or len(labels) != len(data):
        raise DataError(f"{path}: expected data [N, 3072] and N labels, got data {data.shape} and labels "
                        f"{labels.shape}")
    # Checked before any arithmetic: min() of an object or string array raises, and casting floats to
    # uint8 or int64 would silently truncate them (NaN included).
    if not np.issubdtype(data.dtype, np.integer):
        raise DataError(f"{path}: pixel data must be integers in 0..255, got {data.dtype} values")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: {label_key} must be integers in 0..{num_classes - 1}, got {labels.dtype} values")
    if data.dtype != np.uint8:
        if data.size and (data.min() < 0 or data.max() > 255):
            raise DataError(f"{path}: pixel values outside 0..255")
        data = data.astype(np.uint8)
    _check_labels(labels, num_classes, path)
    images = data.reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 2, 3, 1)  # [N, 32, 32, 3]
    return ArraySplit(np.ascontiguousarray(images), labels.astype(np.int64))


def _check_labels(labels: np.ndarray, num_classes: int, source: object) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{source}: labels outside 0..{num_classes - 1}")


# --- image folders ----------------------------------------------------------------------------


def _read_image_folders(dataset: str, root: Path) -> tuple[ArraySplit, ArraySplit]:
    """``root/{train,test}/<class>/*`` decoded once, then served from an .npz cache keyed on the files."""
    num_classes = DATASETS[dataset]
    listing = {split: _list_class_folders(root / split, num_classes, dataset) for split in IMAGE_FOLDER_SPLITS}
    train_names, test_names = ([name for name, _ in listing[split]] for split in ("train", "test"))
    if train_names != test_names:
        only = [f"only in {split}: {', '.join(sorted(set(names) - set(other)))}"
                for split, names, other in (("train", train_names, test_names), ("test", test_names, train_names))
                if set(names) - set(other)]
        raise DataError(f"the class folders of {root}/train and {root}/test differ ({'; '.join(only)})")
    key = _listing_key(listing)
    labels = {split: _folder_labels(listing[split]) for split in ("train", "test")}
    cached = _read_cache(root, key, labels)
    if cached is not None:
        return cached
    splits = tuple(_decode_split(listing[split], labels[split]) for split in ("train", "test"))
    _write_cache(root, key, splits)
    return splits


# One image file: (path, size in bytes, modification and status-change times in ns); size and times feed the cache
# key. The change time (which no program can set back, unlike the modification time that archives restore) tells
# apart files of the same names, sizes and dates, such as another archive's BMP files unpacked over these.
_FileEntry = tuple[str, int, int, int]


def _by_name(items: list, path_of: Callable[[Any], str] = lambda item: item) -> list:
    """`items` sorted by the base names of their paths, as whole numbers when every name's stem is one (class
    folders 0 .. 99, files 1.png .. 5000.png keep their numeric order, where text order would put 10 before 2);
    else as text."""
    names = [os.path.basename(path_of(item)) for item in items]
    stems = [os.path.splitext(name)[0] for name in names]
    numeric = bool(stems) and all(stem.isdigit() and stem.isascii() for stem in stems)
    keys = [(int(stem) if numeric else 0, name) for stem, name in zip(stems, names)]
    return [item for _, item in sorted(zip(keys, items), key=lambda pair: pair[0])]


# What file systems and file managers leave in folders beside the data: Synology's thumbnail folders, Windows'
# thumbnail cache and folder settings, the resource forks of a zip made on macOS. Skipped like hidden entries.
SYSTEM_ENTRIES = frozenset({"@eaDir", "Thumbs.db", "desktop.ini", "__MACOSX"})


def _skipped(name: str) -> bool:
    """An entry of a data folder that is no class or image: hidden (.DS_Store, .ipynb_checkpoints) or one of
    SYSTEM_ENTRIES."""
    return name.startswith(".") or name in SYSTEM_ENTRIES


def _class_dirs(split_dir: Path) -> list[str]:
    """The class folders of a split folder, sorted by name (_by_name); hidden and system entries are skipped
    (_skipped). OSError when it cannot be read."""
    with os.scandir(split_dir) as entries:
        entries = [e for e in entries if not _skipped(e.name)]
    for e in entries:
        _refuse_broken_link(e)  # a class folder's link to nothing: not "9 class folders"
    return _by_name([e.path for e in entries if e.is_dir()])


def _refuse_broken_link(entry: os.DirEntry) -> None:
    """A symbolic link to nothing is a DataError naming it, where is_dir / is_file would skip it silently (leaving
    out a class or an image); a link loop raises its own OSError, which the caller names by its path."""
    if entry.is_symlink():
        try:
            os.stat(entry.path)
        except FileNotFoundError:
            raise DataError(f"{entry.path} is a broken symbolic link") from None


def _list_class_folders(split_dir: Path, num_classes: int, dataset: str) -> list[tuple[str, list[_FileEntry]]]:
    """[(class name, files sorted by name)] with classes sorted by name (_by_name); hidden and system entries are
    skipped (_skipped).

    os.scandir rather than pathlib: one stat per file keeps listing 60,000 files well under a second.
    """
    # is_dir / is_file follow symbolic links: a link loop or an unreadable folder raises OSError, named
    # here by its path; a dangling link would otherwise be skipped silently, leaving an image out.
    try:
        class_dirs = _class_dirs(split_dir)
        if len(class_dirs) != num_classes:
            raise DataError(f"{split_dir} has {len(class_dirs)} class folders; {dataset} needs {num_classes}")
        listing = []
        for class_dir in class_dirs:
            files = []
            with os.scandir(class_dir) as entries:
                for e in entries:
                    if _skipped(e.name):
                        continue
                    _refuse_broken_link(e)
                    if e.is_file():
                        stat = e.stat()
                        files.append((e.path, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns))
                    elif e.is_dir():  # its images would be left out silently, changing every class's size
                        raise DataError(f"{e.path} is a folder inside class folder {class_dir}: put the class's "
                                        f"images directly in its folder (train/<class>/<image>)")
                    else:
                        raise DataError(f"{e.path} is not a regular file (a pipe, socket or device)")
            if not files:
                raise DataError(f"class folder {class_dir} has no images")
            listing.append((os.path.basename(class_dir), _by_name(files, lambda entry: entry[0])))
    except OSError as exc:
        raise DataError(f"cannot read {exc.filename or split_dir}: {exc.strerror or one_line(exc)}") from exc
    return listing


def _listing_key(listing: dict[str, list[tuple[str, list[_FileEntry]]]]) -> str:
    """Hash of split/class/file names, sizes, modification and change times: it changes whenever a file does (and
    when the folder is copied, which costs one more decoding)."""
    digest = hashlib.sha256(_CACHE_VERSION.encode())
    for split, classes in listing.items():
        for class_name, files in classes:
            for path, size, mtime_ns, ctime_ns in files:
                digest.update(f"{split}/{class_name}/{os.path.basename(path)}\0{size}\0{mtime_ns}\0{ctime_ns}\n"
                              .encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:24]


def _folder_labels(classes: list[tuple[str, list[_FileEntry]]]) -> np.ndarray:
    """int64 [N]: the label of each listed file, in listing order (class c is the c-th sorted folder)."""
    return np.concatenate([np.full(len(files), c, dtype=np.int64) for c, (_, files) in enumerate(classes)])


def _decode_split(classes: list[tuple[str, list[_FileEntry]]], labels: np.ndarray) -> ArraySplit:
    """The listed files decoded, with `labels` (_folder_labels of the same listing)."""
    paths = [Path(path) for _, files in classes for path, *_ in files]
    images = np.empty((len(paths), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)

    def decode_range(start: int, stop: int) -> None:
        for i in range(start, stop):
            images[i] = _decode_image(paths[i])

    # Pillow releases the GIL while decoding, so threads share some of the work without pickling
    # arrays or starting interpreters; the result is cached, so this runs once per data folder. Chunks of at most
    # _DECODE_CHUNK images, so that a bad image or Ctrl-C stops the decoding within a chunk's time, not the split's.
    workers = max(1, min(8, os.cpu_count() or 1))
    bounds = np.linspace(0, len(paths), max(4 * workers, -(-len(paths) // _DECODE_CHUNK)) + 1).astype(int)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = []
        try:
            for a, b in zip(bounds[:-1], bounds[1:]):  # appended one by one: an interrupt here cancels those too
                futures.append(pool.submit(decode_range, a, b))
            for future in futures:
                future.result()  # re-raises the first DataError
        except BaseException:  # that error, or KeyboardInterrupt: the chunks not begun are not decoded
            for future in futures:
                future.cancel()
            raise
    return ArraySplit(images, labels)


def _decode_image(path: Path) -> np.ndarray:
    """uint8 [32, 32, 3] RGB from any format Pillow reads. 16-bit grey (Pillow's "I;16" modes; a PNG in mode "I",
    as Pillow before 10.3 opened 16-bit grey PNGs) is scaled to 8 bits (Pillow's convert("RGB") would clip every
    value above 255 to white); other 32-bit integer or float grey ("I", "F"), whose range is unknown, is refused."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            width, height, mode = *image.size, image.mode
            # PNG: at most 16 bits; a PGM / PPM with a maxval above 255 opens as mode I, scaled to 0..65535
            sixteen_bits = mode.startswith("I;16") or (mode == "I" and image.format in ("PNG", "PPM"))
            if (width, height) == (IMAGE_SIZE, IMAGE_SIZE):  # checked before decoding: a header may claim any size
                if sixteen_bits:
                    grey = np.asarray(image).astype(np.int64).clip(0, 65535)  # whatever the byte order on disk
                    rgb = np.repeat(((grey * 255 + 32767) // 65535).astype(np.uint8)[..., None], 3, axis=2)
                elif mode not in ("I", "F"):
                    rgb = np.asarray(image.convert("RGB"))
    except Exception as exc:  # a damaged file makes Pillow raise nearly anything: DecompressionBombError, struct.error
        raise DataError(f"cannot read image {path}: {exception_text(exc)}") from exc
    if (width, height) != (IMAGE_SIZE, IMAGE_SIZE):
        raise DataError(f"image {path} is {width}x{height}; CIFAR images are 32x32")
    if mode in ("I", "F") and not sixteen_bits:
        raise DataError(f"image {path} has {'32-bit integer' if mode == 'I' else 'floating-point'} pixels (Pillow's "
                        f"mode {mode}), whose range is unknown; save the images with 8 or 16 bits per channel")
    return rgb


def _cache_candidates(root: Path, key: str) -> list[Path]:
    """Where the cache may live: beside the images, else in the user's cache folder."""
    beside = root / f"{_CACHE_PREFIX}{key}.npz"
    try:
        user_dir = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hybrid-lt"
    except (RuntimeError, KeyError):  # no HOME and no passwd entry (some containers): no second place
        return [beside]
    return [beside, user_dir / f"{_root_tag(root)}-{key}.npz"]


def _root_tag(root: Path) -> str:
    return hashlib.sha256(os.fsencode(root.resolve())).hexdigest()[:12]


def _read_cache(root: Path, key: str, labels: dict[str, np.ndarray]) -> tuple[ArraySplit, ArraySplit] | None:
    """The cached (train, test), or None when there is none or it does not hold what the folders list.

    ``labels``: each split's labels from the listing, which the cache must match exactly; a damaged or
    foreign cache is rebuilt, not fatal and not trusted (a wrong shape would only fail later, in training).
    """
    for path in _cache_candidates(root, key):
        if not path.is_file():
            continue
        try:
            with np.load(path, allow_pickle=False) as arrays:
                splits = tuple(ArraySplit(arrays[f"{split}_images"], arrays[f"{split}_labels"])
                               for split in ("train", "test"))
        except Exception:  # a damaged zip or .npy header raises anything from zipfile, numpy or the disk
            continue
        if all(_cache_split_ok(split, labels[name]) for split, name in zip(splits, ("train", "test"))):
            return splits
    return None


def _cache_split_ok(split: ArraySplit, labels: np.ndarray) -> bool:
    """Whether a cached split is the uint8 [N, 32, 32, 3] images + int64 [N] labels of the listed files."""
    return (split.images.dtype == np.uint8 and split.images.shape == (len(labels), IMAGE_SIZE, IMAGE_SIZE, 3)
            and split.labels.dtype == np.int64 and np.array_equal(split.labels, labels))


def _write_cache(root: Path, key: str, splits: tuple[ArraySplit, ArraySplit]) -> None:
    arrays = {"train_images": splits[0].images, "train_labels": splits[0].labels,
              "test_images": splits[1].images, "test_labels": splits[1].labels}
    for path in _cache_candidates(root, key):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda f: np.savez(f, **arrays))  # uncompressed: loading is bounded by the disk
        except OSError:
            continue  # read-only data root: try the user's cache folder
        stale_pattern = f"{_CACHE_PREFIX}*.npz" if path.parent == root else f"{_root_tag(root)}-*.npz"
        for stale in path.parent.glob(stale_pattern):
            if stale != path:
                try:
                    stale.unlink(missing_ok=True)
                except OSError:  # another user's, in a shared folder with the sticky bit (mode 1777): theirs to keep
                    pass
        # The temporary file of a process killed while writing its cache (atomic_write's ".<name>.<random>.tmp";
        # SIGKILL, or SIGTERM before a run installs its handler): as large as the cache. Only old ones, so as not to
        # pull one from under another process writing it now (two runs of a sweep decoding at once).
        for stale in path.parent.glob(f".{stale_pattern}.*.tmp"):
            try:
                if time.time() - stale.stat().st_mtime > _STALE_TMP_S:
                    stale.unlink()
            except OSError:
                pass
        return
    # No writable place: the next run decodes again, which is slow but correct.


# ----------------------------------------------------------------------------------------------
# Long-tailed subset and shot groups
# ----------------------------------------------------------------------------------------------


def long_tailed_counts(n_max: int, num_classes: int, imb_factor: float, imb_type: str = "exp") -> list[int]:
    """Images kept per class, LDAM-DRW's generator; ``imb_factor`` = n_min / n_max in (0, 1].

    exp:  n_c = int(n_max * imb_factor ** (c / (C - 1)))
    step: the first C // 2 classes keep n_max, the rest int(n_max * imb_factor). (CIFAR's C is even; for an odd C,
    LDAM-DRW's code would drop the last class, which here gets the tail size.)
    """
    try:
        in_range = 0 < float(imb_factor) <= 1  # NaN fails the comparison too
    except (TypeError, ValueError):
        in_range = False
    if not in_range:
        raise DataError(f"imb_factor must be in (0, 1] (n_min / n_max), got {imb_factor}")
    if imb_type not in IMB_TYPES:
        raise DataError(f"unknown imb_type {imb_type!r}; choose one of {', '.join(IMB_TYPES)}")
    if num_classes < 1 or n_max < 0:
        raise DataError(f"need at least one class and n_max >= 0, got {num_classes} classes, n_max {n_max}")
    if imb_type == "exp":
        if num_classes == 1:
            return [int(n_max)]
        return [int(n_max * imb_factor ** (c / (num_classes - 1.0))) for c in range(num_classes)]
    n_head = num_classes // 2
    return [int(n_max)] * n_head + [int(n_max * imb_factor)] * (num_classes - n_head)


def long_tailed_subset(split: ArraySplit, num_classes: int, imb_factor: float, imb_type: str = "exp",
                       seed: int = 0) -> tuple[ArraySplit, list[int]]:
    """(subset, class_counts): the first n_c of each class's shuffled indices, grouped by class.

    As LDAM-DRW: one numpy RandomState(seed) shuffles class 0's indices, then class 1's, and so on,
    so ``seed=0`` gives the literature's splits. n_max is the smallest class of ``split`` (all
    classes are equal in CIFAR), so every class has enough images.
    """
    labels = np.asarray(split.labels)
    _check_labels(labels, num_classes, "training labels")
    source_counts = np.bincount(labels, minlength=num_classes)
    n_max = int(source_counts.min())
    if n_max == 0:  # no imb_factor helps here: say which class is missing, not which factor is too small
        raise DataError(f"the training set has no images of class {int(source_counts.argmin())}")
    class_counts = long_tailed_counts(n_max, num_classes, imb_factor, imb_type)
    if min(class_counts) < 1:
        empty = class_counts.index(0)
        raise DataError(f"imb_factor {imb_factor} leaves class {empty} with no images (n_max is {n_max})")
    rng = np.random.RandomState(seed)
    kept = []
    for c, n_c in enumerate(class_counts):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        kept.append(idx[:n_c])
    kept = np.concatenate(kept)
    return ArraySplit(split.images[kept], labels[kept].astype(np.int64)), class_counts


def shot_groups(class_counts: Sequence[int]) -> dict[str, list[int]]:
    """Class ids by training-set size: many (>100), medium (20..100), few (<20)."""
    groups: dict[str, list[int]] = {"many": [], "medium": [], "few": []}
    for c, n in enumerate(class_counts):
        groups["many" if n > 100 else "few" if n < 20 else "medium"].append(c)
    return groups


# ----------------------------------------------------------------------------------------------
# Samplers
# ----------------------------------------------------------------------------------------------


def sampler_class_probs(sampler: str, class_counts: Sequence[int]) -> np.ndarray | None:
    """Class probabilities of a sampler: float64 [C] summing to 1; None for ``instance``.

    class: uniform; reversed: proportional to n_max / n_c (BBN); sqrt: proportional to sqrt(n_c).
    Within a class the image is then drawn uniformly.
    """
    _check_sampler(sampler)
    if sampler == "instance":
        return None
    counts = np.asarray(class_counts, dtype=np.float64)
    if counts.size == 0 or (counts <= 0).any():
        raise DataError(f"the {sampler!r} sampler needs at least one image in every class, got counts {list(class_counts)}")
    if sampler == "class":
        weights = np.ones_like(counts)
    elif sampler == "reversed":
        weights = counts.max() / counts
    else:
        weights = np.sqrt(counts)
    return weights / weights.sum()


def _check_sampler(sampler: str) -> None:
    if sampler not in SAMPLERS:
        raise DataError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")


# ----------------------------------------------------------------------------------------------
# Augmentation on the device
# ----------------------------------------------------------------------------------------------


class AugmentParams(NamedTuple):
    """Random choices for a batch of B images, one per image."""

    offsets: Tensor  # int64 [B, 2]: (top, left) of the crop in the padded image, each in 0..8
    flips: Tensor    # bool [B]: mirror left-right
    grays: Tensor    # bool [B]: convert to grayscale

    def slice(self, start: int, stop: int) -> "AugmentParams":
        return AugmentParams(self.offsets[start:stop], self.flips[start:stop], self.grays[start:stop])


def draw_augment_params(n: int, generator: torch.Generator, device: torch.device | str,
                        gray_prob: float = GRAY_PROB) -> AugmentParams:
    """Crop offsets, flips and grayscale choices for n images, drawn on ``device`` with ``generator``.
    The same random numbers whatever ``gray_prob`` is: only the grayscale threshold moves."""
    offsets = torch.randint(0, 2 * CROP_PADDING + 1, (n, 2), generator=generator, device=device)
    coins = torch.rand(n, 2, generator=generator, device=device)
    return AugmentParams(offsets, coins[:, 0] < FLIP_PROB, coins[:, 1] < gray_prob)


def apply_augment(images: Tensor, params: AugmentParams, mean: Tensor, std: Tensor) -> Tensor:
    """Crop from the zero-padded image, flip, grayscale, normalise; as torchvision's
    RandomCrop(32, padding=4) -> RandomHorizontalFlip -> RandomGrayscale(p) -> ToTensor -> Normalize
    (p, 0.2 by default, is already in ``params``). The grey level stays a float, where PIL's convert("L") rounds it
    to uint8: a grey image differs from torchvision's by at most 0.5 / 255 before normalisation.

    images: uint8 [B, 3, 32, 32]; mean, std: float [3] (0..1 scale) on the images' device.
    Returns float32 [B, 3, 32, 32].
    """
    b, size, pad = images.shape[0], IMAGE_SIZE, CROP_PADDING
    padded_size = size + 2 * pad
    padded = F.pad(images, (pad, pad, pad, pad))  # [B, 3, 40, 40], zeros in uint8 space as torchvision pads
    steps = torch.arange(size, device=images.device)
    rows = params.offsets[:, :1] + steps  # [B, 32]
    # A flip reads the crop's columns right to left, so crop and flip are one gather.
    cols = params.offsets[:, 1:] + torch.where(params.flips[:, None], size - 1 - steps, steps)  # [B, 32]
    flat_index = (rows[:, :, None] * padded_size + cols[:, None, :]).reshape(b, 1, size * size)  # [B, 1, 1024]
    crops = padded.reshape(b, 3, padded_size * padded_size).gather(2, flat_index.expand(b, 3, size * size))
    x = crops.float()  # [B, 3, 1024], 0..255
    # In-place arithmetic on [B, 3, 1024] with per-image / per-channel factors: several times faster
    # on CPU than torch.where and broadcast temporaries of the full batch.
    w_r, w_g, w_b = GRAY_WEIGHTS
    luma = (x[:, 0] * w_r).add_(x[:, 1], alpha=w_g).add_(x[:, 2], alpha=w_b)  # [B, 1024]
    gray = params.grays[:, None].to(x.dtype)  # [B, 1], 1.0 where the image turns gray
    x.mul_((1 - gray)[:, :, None]).add_((luma * gray)[:, None, :])  # exact: multiplies by 0 or 1
    scale, shift = _normalisation(mean, std)
    x.mul_(scale).sub_(shift)  # (x / 255 - mean) / std
    return x.reshape(b, 3, size, size)


def augment(images: Tensor, mean: Tensor, std: Tensor, generator: torch.Generator) -> Tensor:
    """One random augmentation of each image (independent choices per image).

    images: uint8 [B, 3, 32, 32] on any device; mean, std: float [3] on that device; generator on that
    device. Returns float32 [B, 3, 32, 32], normalised.
    """
    params = draw_augment_params(images.shape[0], generator, images.device)
    return apply_augment(images, params, mean, std)


class SupConParams(NamedTuple):
    """Random choices of SupContrast's CIFAR augmentation for B images, one per image."""

    boxes: Tensor    # int64 [B, 4]: top, left, height, width of the crop that is resized to 32 x 32
    flips: Tensor    # bool [B]: mirror left-right
    jitters: Tensor  # bool [B]: apply the colour jitter
    factors: Tensor  # float32 [B, 4]: brightness, contrast and saturation factors, hue shift
    order: Tensor    # int64 [B, 4]: the jitter operations (indices into factors) in the order they apply
    grays: Tensor    # bool [B]: convert to grayscale

    def slice(self, start: int, stop: int) -> "SupConParams":
        return SupConParams(*(field[start:stop] for field in self))


def draw_supcon_params(n: int, generator: torch.Generator, device: torch.device | str,
                       gray_prob: float = GRAY_PROB) -> SupConParams:
    """The choices of torchvision's RandomResizedCrop(32, scale=(0.2, 1)), RandomHorizontalFlip,
    RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8) and RandomGrayscale(gray_prob) for n images,
    drawn on ``device`` with ``generator`` and without reading anything back to the host.

    The crop follows RandomResizedCrop.get_params: up to 10 attempts of an area fraction uniform in the
    scale range and a log-uniform aspect ratio, rounded to whole pixels; the first attempt that fits is
    kept (all 10 are drawn at once); if none fits, the whole image (its own fallback for a square image).
    """
    size, attempts = IMAGE_SIZE, RESIZED_CROP_ATTEMPTS
    # float64, as get_params does its arithmetic in Python floats: the same roundings to whole pixels.
    u = torch.rand(n, attempts, 2, dtype=torch.float64, generator=generator, device=device)
    scale_lo, scale_hi = RESIZED_CROP_SCALE
    log_lo, log_hi = math.log(RESIZED_CROP_RATIO[0]), math.log(RESIZED_CROP_RATIO[1])
    area = size * size * (scale_lo + (scale_hi - scale_lo) * u[..., 0])  # [n, attempts]
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])  # width / height
    widths, heights = torch.sqrt(area * aspect).round(), torch.sqrt(area / aspect).round()
    fits = (widths >= 1) & (widths <= size) & (heights >= 1) & (heights <= size)  # [n, attempts]
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # the first attempt that fits (0 if none does)
    any_fits = fits.any(dim=1)
    height = torch.where(any_fits, heights.gather(1, first).squeeze(1), size).long()  # [n]
    width = torch.where(any_fits, widths.gather(1, first).squeeze(1), size).long()
    corner = torch.rand(n, 2, dtype=torch.float64, generator=generator, device=device)
    top = (corner[:, 0] * (size - height + 1)).long()  # uniform in 0 .. size - height
    left = (corner[:, 1] * (size - width + 1)).long()
    coins = torch.rand(n, 3, generator=generator, device=device)
    # Factors uniform in [1 - s, 1 + s] (brightness, contrast, saturation) and [-s, s] (hue). Python scalars, not a
    # tensor of the strengths: torch.tensor(..., device="cuda") would be a synchronous copy from the host.
    u = 2 * torch.rand(n, 4, generator=generator, device=device) - 1  # [n, 4] in [-1, 1)
    factors = torch.stack([centre + strength * u[:, k] for k, (centre, strength)
                           in enumerate(zip((1.0, 1.0, 1.0, 0.0), JITTER_STRENGTHS))], dim=1)  # [n, 4]
    order = torch.rand(n, 4, generator=generator, device=device).argsort(dim=1)  # a uniform permutation each
    return SupConParams(torch.stack([top, left, height, width], dim=1), coins[:, 0] < FLIP_PROB,
                        coins[:, 1] < JITTER_PROB, factors, order, coins[:, 2] < gray_prob)


def _bilinear_taps(out_index: Tensor, start: Tensor, length: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Resizing a crop [start, start + length) of one axis to IMAGE_SIZE pixels, bilinearly, as
    F.interpolate(mode="bilinear", align_corners=False) does on the crop alone (so edges repeat the
    crop's own border pixels): output pixel u reads (1 - frac) * x[lo] + frac * x[hi].

    out_index: float [S] or [B, S]; start, length: int64 [B]. Returns lo, hi int64 [B, S], frac float [B, S].
    """
    scale = length.to(torch.float32)[:, None] / IMAGE_SIZE  # [B, 1]
    source = ((out_index + 0.5) * scale - 0.5).clamp_(min=0)  # [B, S], in crop coordinates
    lo = source.floor()
    frac = source - lo
    lo = lo.long()
    hi = torch.minimum(lo + 1, length[:, None] - 1)
    return start[:, None] + lo, start[:, None] + hi, frac


def _resized_crop(x: Tensor, boxes: Tensor, flips: Tensor) -> Tensor:
    """float [B, C, S, S] -> each image's box resized to [S, S] (bilinear), then mirrored where flips."""
    b, c, s, _ = x.shape
    top, left, height, width = boxes.unbind(1)
    steps = torch.arange(s, device=x.device, dtype=torch.float32)
    row_lo, row_hi, row_frac = _bilinear_taps(steps, top, height)
    # A flip reads the resized columns right to left, so it is part of the column taps.
    out_cols = torch.where(flips[:, None], s - 1 - steps, steps)  # [B, S]
    col_lo, col_hi, col_frac = _bilinear_taps(out_cols, left, width)

    def rows(index: Tensor) -> Tensor:
        return x.gather(2, index[:, None, :, None].expand(b, c, s, s))

    x = rows(row_lo).lerp_(rows(row_hi), row_frac[:, None, :, None])  # [B, C, S, S]: rows resized

    def cols(index: Tensor) -> Tensor:
        return x.gather(3, index[:, None, None, :].expand(b, c, s, s))

    return cols(col_lo).lerp_(cols(col_hi), col_frac[:, None, None, :])


def _luma(x: Tensor) -> Tensor:
    """float [B, 3, H, W] -> [B, 1, H, W], ITU-R 601-2 weights."""
    w_r, w_g, w_b = GRAY_WEIGHTS
    return (x[:, 0:1] * w_r).add_(x[:, 1:2], alpha=w_g).add_(x[:, 2:3], alpha=w_b)


def _blend(x: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    """factor * x + (1 - factor) * other, clamped to [0, 1] (torchvision's blend); factor [B] per image.
    A factor of 1 returns x exactly."""
    f = factor[:, None, None, None]
    return (f * x + (1 - f) * other).clamp_(0, 1)


def _shift_hue(x: Tensor, shift: Tensor) -> Tensor:
    """float [B, 3, H, W] in [0, 1] -> the same images with their HSV hue turned by shift [B] (in turns)."""
    r, g, b = x.unbind(1)
    value, minimum = x.amax(dim=1), x.amin(dim=1)  # [B, H, W]
    chroma = value - minimum
    saturation = chroma / torch.where(value > 0, value, 1)
    safe_chroma = torch.where(chroma > 0, chroma, 1)  # grey pixels: hue 0 (every difference is 0)
    sector = torch.where(value == r, (g - b) / safe_chroma,
                         torch.where(value == g, (b - r) / safe_chroma + 2, (r - g) / safe_chroma + 4))
    hue = torch.remainder(sector / 6 + shift[:, None, None], 1.0)  # [B, H, W] in [0, 1)
    # HSV -> RGB in closed form: channel n (5: red, 3: green, 1: blue) is v - v s clamp(min(k, 4 - k), 0, 1),
    # k = (n + 6 h) mod 6.
    channels = []
    for n in (5, 3, 1):
        k = torch.remainder(n + 6 * hue, 6.0)
        channels.append(value - value * saturation * torch.minimum(k, 4 - k).clamp_(0, 1))
    return torch.stack(channels, dim=1)


def _color_jitter(x: Tensor, params: SupConParams) -> Tensor:
    """ColorJitter on float [B, 3, H, W] in [0, 1], each image with its own factors and its own order of the
    four operations (torchvision's brightness, contrast, saturation and hue on tensors). An image without
    jitter, or an operation not at this position of its order, gets the identity factor (exact), and the
    hue turn is applied only where chosen, so each image sees each operation once."""
    chosen = params.jitters[:, None, None] & (params.order[:, :, None] == torch.arange(4, device=x.device))  # [B, 4 pos, 4 op]
    identity = torch.ones_like(params.factors[:, 0])
    for position in range(4):
        picks = chosen[:, position]  # [B, 4]: which operation each image applies here
        x = _blend(x, x.new_zeros(()), torch.where(picks[:, 0], params.factors[:, 0], identity))  # brightness
        gray_mean = _luma(x).mean(dim=(1, 2, 3), keepdim=True)  # [B, 1, 1, 1]
        x = _blend(x, gray_mean, torch.where(picks[:, 1], params.factors[:, 1], identity))  # contrast
        x = _blend(x, _luma(x), torch.where(picks[:, 2], params.factors[:, 2], identity))  # saturation
        x = torch.where(picks[:, 3, None, None, None], _shift_hue(x, params.factors[:, 3]), x)  # hue
    return x


def apply_supcon_augment(images: Tensor, params: SupConParams, mean: Tensor, std: Tensor) -> Tensor:
    """SupContrast's CIFAR augmentation of the contrastive views: RandomResizedCrop(32, scale=(0.2, 1)) ->
    RandomHorizontalFlip -> RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8) -> RandomGrayscale(p) ->
    ToTensor -> Normalize, with torchvision's tensor arithmetic (bilinear resize, float colour operations, no
    rounding to uint8 between steps as its PIL path does).

    images: uint8 [B, 3, 32, 32]; mean, std: float [3] (0..1 scale) on the images' device.
    Returns float32 [B, 3, 32, 32].
    """
    x = images.float().div_(255)  # [B, 3, 32, 32] on 0..1, as ToTensor
    x = _resized_crop(x, params.boxes, params.flips)
    x = _color_jitter(x, params)
    x = torch.where(params.grays[:, None, None, None], _luma(x).expand_as(x), x)
    return x.sub_(mean.reshape(1, 3, 1, 1)).div_(std.reshape(1, 3, 1, 1))


def to_device_images(split: ArraySplit, device: torch.device | str) -> tuple[Tensor, Tensor]:
    """(uint8 [N, 3, 32, 32] channels-first, int64 [N]) on ``device``; the copy to CHW happens on the host."""
    images = torch.from_numpy(np.ascontiguousarray(split.images.transpose(0, 3, 1, 2)))  # [N, 3, 32, 32]
    labels = torch.from_numpy(np.asarray(split.labels, dtype=np.int64))
    return images.to(device), labels.to(device)


def normalize(images: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """uint8 [N, 3, 32, 32] -> float32 [N, 3, 32, 32], (x / 255 - mean) / std; for evaluation."""
    n = images.shape[0]
    x = images.reshape(n, 3, -1).to(torch.float32, copy=True)  # [N, 3, 1024]; never the caller's tensor
    scale, shift = _normalisation(mean, std)
    x.mul_(scale).sub_(shift)  # the same arithmetic as augment, so identical choices give identical inputs
    return x.reshape(images.shape)


def _normalisation(mean: Tensor, std: Tensor) -> tuple[Tensor, Tensor]:
    """(scale, shift), each [1, 3, 1], with x * scale - shift == (x / 255 - mean) / std for x in 0..255.
    mean, std: 3 values, as [3] or [1, 3, 1, 1]."""
    mean, std = mean.reshape(1, 3, 1), std.reshape(1, 3, 1)
    return 1.0 / (255.0 * std), mean / std


# ----------------------------------------------------------------------------------------------
# The per-step batch stream
# ----------------------------------------------------------------------------------------------


class Batch(NamedTuple):
    """One training step's inputs for this rank (B = local batch size), all on the stream's device.

    sc_views is view-major: ``torch.cat([view1, view2])``, so row i and row B + i are two views of
    the same image. Both are None when the feature branch is off.
    """

    sc_views: Tensor | None   # float32 [2B, 3, 32, 32], normalised
    sc_labels: Tensor | None  # int64 [B]
    ce_images: Tensor         # float32 [B, 3, 32, 32], normalised
    ce_labels: Tensor         # int64 [B]


def _derived_seed(*words: int) -> int:
    """A 63-bit seed from non-negative integers, well mixed (nearby inputs give unrelated seeds)."""
    state = np.random.SeedSequence(list(words)).generate_state(1, dtype=np.uint64)[0]
    return int(state >> np.uint64(1))  # torch seeds must fit a signed 64-bit int


# Last word of the seed derivations: keeps step seeds and per-epoch permutation seeds apart.
_STEP_TAG, _PERMUTATION_TAG = 0, 1
_SC_BRANCH, _CE_BRANCH = 0, 1


class TrainStream:
    """Per-step batches for both branches, a pure function of (seed, epoch, step).

    The training set lives on ``device`` as uint8 [N, 3, 32, 32]. Each step reseeds one device
    generator from (seed, epoch, step), draws the GLOBAL batch's indices and augmentation choices
    exactly as a single process would, then keeps this rank's slice [rank * B/W, (rank + 1) * B/W).
    Nothing in a step reads a device value back to the host.
    """

    def __init__(self, train: ArraySplit, num_classes: int, batch_size: int, *, mean, std,
                 sc_sampler: str = "instance", ce_sampler: str = "class", feature_branch: bool = True,
                 device: torch.device | str = "cpu", seed: int = 0, rank: int = 0, world_size: int = 1,
                 gray_prob: float = GRAY_PROB, sc_aug: str = "paper"):
        if not 0 <= gray_prob <= 1:
            raise DataError(f"gray_prob must be in [0, 1], got {gray_prob}")
        if sc_aug not in SC_AUGS:
            raise DataError(f"unknown feature-branch augmentation {sc_aug!r}; choose one of {', '.join(SC_AUGS)}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not in a world of {world_size} processes")
        if batch_size < 1 or batch_size % world_size:
            raise DataError(f"batch_size {batch_size} must be positive and divisible by the {world_size} processes")
        if seed < 0:
            raise DataError(f"seed must be non-negative, got {seed}")
        labels = np.asarray(train.labels)
        _check_labels(labels, num_classes, "training labels")
        self.class_counts: list[int] = np.bincount(labels, minlength=num_classes).tolist()
        self.num_images = len(labels)
        self.steps_per_epoch = self.num_images // batch_size  # the ragged last batch is dropped
        if self.steps_per_epoch == 0:
            raise DataError(f"batch_size {batch_size} is larger than the training set ({self.num_images} images)")
        self.batch_size = batch_size
        self.local_batch_size = batch_size // world_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.feature_branch, self.gray_prob, self.sc_aug = feature_branch, gray_prob, sc_aug
        self.sc_sampler, self.ce_sampler = sc_sampler, ce_sampler
        self.device = torch.device(device)
        self.mean = torch.as_tensor(mean, dtype=torch.float32, device=self.device)
        self.std = torch.as_tensor(std, dtype=torch.float32, device=self.device)
        self.images, self.labels = to_device_images(train, self.device)  # [N, 3, 32, 32] uint8, [N] int64
        # Class samplers: image = by_class[class_start[c] + floor(u * class_count[c])], no per-class loop.
        self._by_class = torch.argsort(self.labels, stable=True)  # [N], indices grouped by class
        counts = torch.tensor(self.class_counts, dtype=torch.int64)
        self._class_start = (torch.cumsum(counts, 0) - counts).to(self.device)  # [C]
        self._class_count = counts.to(self.device)  # [C]
        for sampler in (sc_sampler, ce_sampler):
            _check_sampler(sampler)  # a bad name is an error even for a branch that is off
        used = {ce_sampler} | ({sc_sampler} if feature_branch else set())
        self._class_cdf: dict[str, Tensor] = {}
        for sampler in sorted(used - {"instance"}):
            # Inverse-CDF draws (searchsorted) rather than torch.multinomial, which may sync on CUDA.
            probs = sampler_class_probs(sampler, self.class_counts)
            self._class_cdf[sampler] = torch.from_numpy(np.cumsum(probs)).to(self.device)  # [C] float64
        self._generator = torch.Generator(device=self.device)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """Batches of steps start_step .. steps_per_epoch - 1 of ``epoch``; the same batches whatever
        ``start_step`` is, so a run interrupted mid-epoch resumes exactly."""
        if epoch < 0 or not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"epoch {epoch} / start_step {start_step} out of range (0..{self.steps_per_epoch})")
        permutations = {
            branch: self._permutation(epoch, branch)
            for branch, sampler in ((_SC_BRANCH, self.sc_sampler if self.feature_branch else None),
                                    (_CE_BRANCH, self.ce_sampler))
            if sampler == "instance"
        }
        for step in range(start_step, self.steps_per_epoch):
            yield self._step(epoch, step, permutations)

    def _permutation(self, epoch: int, branch: int) -> Tensor:
        """int64 [N]: this epoch's order of the instance sampler for one branch."""
        self._generator.manual_seed(_derived_seed(self.seed, epoch, branch, _PERMUTATION_TAG))
        return torch.randperm(self.num_images, generator=self._generator, device=self.device)

    def _indices(self, sampler: str, step: int, permutation: Tensor | None) -> Tensor:
        """int64 [B]: the global batch's image indices for one branch."""
        b = self.batch_size
        if sampler == "instance":
            return permutation[step * b:(step + 1) * b]
        u_class = torch.rand(b, dtype=torch.float64, generator=self._generator, device=self.device)
        u_image = torch.rand(b, dtype=torch.float64, generator=self._generator, device=self.device)
        cdf = self._class_cdf[sampler]
        classes = torch.searchsorted(cdf, u_class, right=True).clamp_(max=len(cdf) - 1)  # [B]
        count = self._class_count[classes]
        within = torch.minimum((u_image * count).long(), count - 1)  # rounding can never leave the class
        return self._by_class[self._class_start[classes] + within]

    def _step(self, epoch: int, step: int, permutations: dict[int, Tensor]) -> Batch:
        gen, b = self._generator, self.batch_size
        gen.manual_seed(_derived_seed(self.seed, epoch, step, _STEP_TAG))
        # Global draws, in a fixed order, identical on every rank.
        ce_idx = self._indices(self.ce_sampler, step, permutations.get(_CE_BRANCH))
        lo, hi = self.rank * self.local_batch_size, (self.rank + 1) * self.local_batch_size
        ce_local = ce_idx[lo:hi]
        if not self.feature_branch:
            params = draw_augment_params(b, gen, self.device, self.gray_prob)
            ce_images = apply_augment(self.images[ce_local], params.slice(lo, hi), self.mean, self.std)
            return Batch(None, None, ce_images, self.labels[ce_local])
        sc_idx = self._indices(self.sc_sampler, step, permutations.get(_SC_BRANCH))
        sc_local = sc_idx[lo:hi]
        n = hi - lo
        if self.sc_aug == "supcon":
            ce_params = draw_augment_params(b, gen, self.device, self.gray_prob)
            view_params = draw_supcon_params(2 * b, gen, self.device, self.gray_prob)  # [view1 | view2] global
            ce_images = apply_augment(self.images[ce_local], ce_params.slice(lo, hi), self.mean, self.std)
            local = [view_params.slice(part * b + lo, part * b + hi) for part in range(2)]
            joined_views = SupConParams(*(torch.cat(fields) for fields in zip(*local)))
            sc_views = apply_supcon_augment(self.images[sc_local].repeat(2, 1, 1, 1), joined_views, self.mean,
                                            self.std)  # [2B, 3, 32, 32]
            return Batch(sc_views, self.labels[sc_local], ce_images, self.labels[ce_local])
        # [ce | view1 | view2] of the global batch
        params = draw_augment_params(3 * b, gen, self.device, self.gray_prob)
        local_params = [params.slice(part * b + lo, part * b + hi) for part in range(3)]
        # One augmentation call over [ce; view1; view2] keeps kernel launches down on GPU.
        images = torch.cat([self.images[ce_local], self.images[sc_local], self.images[sc_local]])  # [3B, 3, 32, 32]
        joined = AugmentParams(*(torch.cat(fields) for fields in zip(*local_params)))
        out = apply_augment(images, joined, self.mean, self.std)  # [3B, 3, 32, 32]
        return Batch(out[n:], self.labels[sc_local], out[:n], self.labels[ce_local])
