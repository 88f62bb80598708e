"""Shared helpers: user-facing errors, metrics, the lr schedule, seeding, atomic checkpoint and result files,
and the TensorBoard figures (rendered with numpy, so no plotting dependency)."""
from __future__ import annotations

import contextlib
import errno
import functools
import io
import json
import math
import numbers
import os
import random
import re
import stat
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F


class UserError(Exception):
    """A problem with the user's input, reported as one line and a non-zero exit (no traceback): exit_code."""

    exit_code = 2


# ----------------------------------------------------------------------------------------------- seeding


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (all devices). The data stream seeds itself per step (see dataset_loader)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_states() -> dict[str, Any]:
    """Every global RNG state, for checkpoints. Training itself draws from none of them after model init
    (the batch stream reseeds its own generator from (seed, epoch, step)), but a checkpoint that carries them
    lets anything that does draw later resume exactly too."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    states: dict[str, Any] = {
        "python": random.getstate(),
        # Without numpy objects: numpy 2 pickles an array as numpy._core's, which numpy before 1.26 cannot import.
        "numpy": (name, keys.tolist(), int(pos), int(has_gauss), float(cached_gaussian)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    name, keys, *rest = states["numpy"]  # keys: a list (rng_states), or an array in checkpoints written before
    if len(keys) != 624 or not all(isinstance(k, numbers.Integral) and 0 <= k < 2**32 for k in keys):
        raise ValueError("numpy's random state is not 624 32-bit words")
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


# ----------------------------------------------------------------------------------------------- lr schedule


def warmup_steps(warm_epochs: float, steps_per_epoch: int) -> float:
    """The steps of learning_rate's warm-up: `warm_epochs` of them rounded to whole steps (inf for an absurd one)."""
    steps = warm_epochs * steps_per_epoch
    return round(steps) if math.isfinite(steps) else steps


def learning_rate(step: int, *, base_lr: float, steps_per_epoch: int, warm_epochs: float,
                  decay_epochs: Sequence[int], decay_rate: float) -> float:
    """Learning rate at global optimiser step `step` (0-based), a pure function of the step so that the
    schedule needs no state of its own to resume: x decay_rate from the start of each epoch in `decay_epochs`
    (0-based epoch indices, as in LDAM-DRW: `--lr_decay_epochs 120,160` means epochs 121 and 161 counted from 1),
    times a linear warm-up from 1 / warm_steps to 1 over the first `warm_epochs` epochs (a decay within them, which
    main.py notes, lowers the rate the warm-up ramps up to)."""
    epoch = step // steps_per_epoch
    lr = base_lr * decay_rate ** sum(epoch >= e for e in decay_epochs)
    warm_steps = warmup_steps(warm_epochs, steps_per_epoch)
    if step < warm_steps:
        lr *= (step + 1) / warm_steps
    return lr


# ----------------------------------------------------------------------------------------------- metrics


def confusion_matrix(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts on the tensors' device, no host sync. preds, targets: [N] int64 -> [C, C] int64, rows = true class.
    scatter_add_, not bincount: CUDA's bincount reads the input's min and max back to the host."""
    flat = targets * num_classes + preds  # [N]
    counts = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=flat.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat)).view(num_classes, num_classes)


def nearest_class_mean(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                       num_classes: int) -> torch.Tensor:
    """Nearest-class-mean predictions on L2-normalised features: for each test feature, the class whose mean
    training direction is closest by cosine.

    train_features: [N, D], train_labels: [N] int64, test_features: [M, D] -> [M] int64 on the features' device,
    no host sync. Features are normalised before the class means are taken and the means again after, so every
    class weighs alike whatever its size: unlike a trained linear layer, this classifier has no bias towards the
    head classes, and it shows what the representation alone separates. A class without training features is
    never predicted."""
    train = F.normalize(train_features.float(), dim=1)  # [N, D]
    sums = torch.zeros(num_classes, train.shape[1], device=train.device).index_add_(0, train_labels, train)  # [C, D]
    counts = torch.zeros(num_classes, device=train.device).index_add_(0, train_labels, torch.ones_like(train[:, 0]))
    similarity = F.normalize(test_features.float(), dim=1) @ F.normalize(sums, dim=1).T  # [M, C]
    return similarity.masked_fill(counts == 0, float("-inf")).argmax(dim=1)


def accuracy_report(confusion: np.ndarray, shot_groups: dict[str, Sequence[int]]) -> dict[str, Any]:
    """Top-1, shot-group and per-class accuracy in percent from a [C, C] confusion matrix (rows = truth).

    A shot group's accuracy is the fraction of its test images classified correctly (with the balanced test set
    this equals the mean of its classes' accuracies). A group with no class is reported as None. Each percentage
    is 100 * correct / total in that order, one rounding of exact integers: the float nearest the exact value (827
    of 1,000 is 82.7 in results.json, where correct / total * 100 gave 82.69999999999999)."""
    confusion = np.asarray(confusion, dtype=np.float64)
    correct = np.diag(confusion)
    per_class_total = confusion.sum(axis=1)
    per_class = np.where(per_class_total > 0, correct * 100 / np.maximum(per_class_total, 1), 0.0)
    report: dict[str, Any] = {"top1": float(correct.sum() * 100 / max(confusion.sum(), 1))}
    for name, classes in shot_groups.items():
        classes = list(classes)
        total = per_class_total[classes].sum()
        report[name] = float(correct[classes].sum() * 100 / total) if classes and total > 0 else None
    report["per_class"] = [float(a) for a in per_class]
    return report


# ----------------------------------------------------------------------------------------------- files


def one_line(text: object) -> str:
    """An exception or message as one line (error messages must not span several), other control characters (a
    terminal's escape sequences, from a damaged or crafted file's content) shown as escapes."""
    return printable(" ".join(str(text).split()))


def printable(text: object) -> str:
    """`text` with every character that is not printable (a line break, a tab, a terminal's escape sequence, a
    file name's undecodable byte) shown as its escape, spaces kept as they are: the last step of a one-line
    message whose parts (a path given on the command line) may hold any character."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in str(text))


def exception_text(exc: BaseException) -> str:
    """``Type: message`` on one line (the type alone when the message is empty, as MemoryError's often is):
    the type says what went wrong where a damaged file's message alone does not."""
    text = one_line(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class GuardedOutput(io.TextIOBase):
    """A program's sys.stdout (or sys.stderr) that its own failure does not stop: the first failed write or flush
    (the reader gone, as with `| head`; a full disk under `> log`; an I/O error) is one `warning:` line on stderr
    (for stdout, `said` names what goes on; stderr itself fails silently: nowhere is left to say it), and later
    output is dropped while the program goes on. For programs whose record is their files (a training run, a
    benchmark with --json), not their printed lines. Characters the stream's encoding lacks print as '?'."""

    def __init__(self, stream: Any, said: Optional[str]):
        super().__init__()
        self.stream, self.said, self.failed = stream, said, False
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="replace")

    def _failure(self, error: BaseException) -> None:
        self.failed = True
        try:  # Python flushes the real stream at exit: let what its buffer holds go somewhere that takes it
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self.stream.fileno())
            os.close(null)
        except (OSError, ValueError):
            pass
        if self.said is not None:
            reason = error.strerror if isinstance(error, OSError) and error.strerror else one_line(error)
            try:  # stderr may be failing too (`> log 2>&1` on a full disk), wrapped or not
                print(f"warning: standard output failed ({reason}); {self.said}", file=sys.stderr, flush=True)
            except (OSError, ValueError):
                pass

    def write(self, text: str) -> int:
        if not self.failed:
            try:
                return self.stream.write(text)
            except (OSError, ValueError) as error:  # ValueError: the stream was closed
                self._failure(error)
        return len(text)

    def flush(self) -> None:
        if not self.failed:
            try:
                self.stream.flush()
            except (OSError, ValueError) as error:
                self._failure(error)

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return not self.failed and self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self.stream.encoding

    def __getattr__(self, name: str) -> Any:  # what else a caller may ask of a text stream (buffer, line_buffering)
        if name == "stream":  # not set yet (a copy being made): no endless lookup through this method
            raise AttributeError(name)
        return getattr(self.stream, name)


def guard_stdout(goes_on: str) -> None:
    """sys.stdout and sys.stderr as GuardedOutput (see there), each on /dev/null where the program was started with
    it closed (`>&-`, when Python leaves it None, which print() takes but a flush() does not). `goes_on`: what the
    warning about a failed stdout says happens next."""
    for name, said in (("stderr", None), ("stdout", goes_on)):
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, "w"))
        if not isinstance(getattr(sys, name), GuardedOutput):
            setattr(sys, name, GuardedOutput(getattr(sys, name), said))


def _umask() -> int:
    """The process's umask, from /proc where Linux shows it: os.umask can only read it by setting it, for a moment in
    which a file another thread creates (TensorBoard's writer) would get the mode set."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def atomic_write(path: str | os.PathLike, write) -> None:
    """Write through `write(file_object)` to a temporary file beside `path`, fsync it, then rename it over
    `path`: a reader (or a resume after `kill -9`) sees the old complete file or the new complete one, never
    half of one. A failed write (disk full, read-only folder) leaves the old file as it was. A path that holds
    something other than a regular file (a device such as /dev/null, a pipe, a socket) is an OSError instead:
    the rename would put a file in its place."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except OSError:  # nothing there yet, or what mkstemp or the rename will meet and say too
        mode = None
    if mode is not None and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):  # a folder: the rename says so
        raise OSError(errno.EEXIST, "not a regular file (a device, a pipe or a socket), which this write would "
                                    "replace: give a file name")
    # The mode a plain write would leave (mkstemp makes the file private): an existing file's own, else what open()
    # creates under the umask (0o644 under the usual 022; 0o600 under 077).
    mode = mode & 0o7777 if mode is not None and stat.S_ISREG(mode) else 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """torch.save `state` atomically. Raises UserError (keeping any previous file) when the write fails."""
    buffer = io.BytesIO()  # serialise first: a failing disk then shows up as an OSError, not as a torch error
    torch.save(state, buffer)
    write_checkpoint_bytes(buffer.getbuffer(), path)


def write_checkpoint_bytes(content: bytes | memoryview, path: str | os.PathLike) -> None:
    """A serialised checkpoint (save_checkpoint's, or another checkpoint file's bytes) written atomically to `path`;
    UserError (keeping any previous file) when the write fails."""
    try:
        atomic_write(path, lambda f: f.write(content))
    except OSError as e:
        kept = "the previous one is kept" if Path(path).is_file() else "there was none before it"
        raise UserError(f"could not write checkpoint {path}: {e.strerror or e}; {kept}") from e


# What checkpoints written before commit a392b74 hold beyond tensors and plain data: torch's version string type and
# numpy's random state as an array, pickled under numpy 1 (numpy.core) or numpy 2 (numpy._core). weights_only=True
# refuses every other global: a checkpoint from elsewhere cannot run code when it is read. Made once: the same
# objects each time, which _allowed_globals finds already allowed where they are.
@functools.lru_cache(maxsize=None)
def _earlier_checkpoint_globals() -> tuple[Any, ...]:
    import _codecs  # (how protocol 2 pickles an array's bytes; torch 2.4 does not allow it by default)
    from torch.torch_version import TorchVersion

    reconstruct = np.zeros(0).__reduce__()[0]  # numpy's _reconstruct, wherever this numpy keeps it
    entries: list[Any] = [TorchVersion, np.ndarray, np.dtype, type(np.dtype(np.uint32)), _codecs.encode]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):  # under either name, whichever numpy wrote it
        def named(*args: Any, _reconstruct: Any = reconstruct) -> Any:
            return _reconstruct(*args)

        named.__module__, named.__name__, named.__qualname__ = module, "_reconstruct", "_reconstruct"
        entries.append(named)
    return tuple(entries)


_SAFE_GLOBALS_LOCK = threading.Lock()


@contextlib.contextmanager
def _allowed_globals(entries: Sequence[Any]) -> Iterator[None]:
    """torch's allowlist (one for the process) with `entries` added while the block runs, and then exactly as it was
    before: what others allowed stays allowed (torch.serialization.safe_globals removes those of its entries that
    were there before it), and two threads loading at once do not take each other's entries away."""
    serialization = torch.serialization
    with _SAFE_GLOBALS_LOCK:
        before = list(serialization.get_safe_globals())  # (a copy: torch 2.4 hands out its own list)
        serialization.add_safe_globals([entry for entry in entries if entry not in before])
        try:
            yield
        finally:
            serialization.clear_safe_globals()
            serialization.add_safe_globals(before)


def _refused(path: Path, e: Exception) -> Optional[UserError]:
    """weights_only's refusal of a file as one line: a global beyond the allowed ones (code a pickle would run), an
    instruction of a pickle protocol above torch.save's 2, or another it does not take (a file other than
    torch.save's). None: not a refusal."""
    text = str(e)
    if "Weights only load failed" not in text:
        return None
    trust = "if you trust the file, torch.load(..., weights_only=False) reads it"
    found = re.search(r"GLOBAL (\S+)", text)
    if found:
        return UserError(f"cannot read checkpoint {path}: it holds {one_line(found[1])}, which no checkpoint of this "
                         f"project holds and which unpickling would call, so torch.load's weights_only=True refuses "
                         f"it; {trust}")
    detail = re.search(r"WeightsUnpickler error:(.*?)(?:Check the documentation|$)", text, re.S)
    detail = one_line(detail[1]) if detail and detail[1].strip() else "UnpicklingError"
    if detail.startswith("Unsupported operand"):  # FRAME (149) and the like: pickle protocol 4 or 5
        return UserError(f"cannot read checkpoint {path}: it was pickled in a protocol above 2, torch.save's, which "
                         f"torch.load's weights_only=True does not read ({detail}); {trust}, and torch.save of what "
                         f"it reads writes it in protocol 2")
    return UserError(f"cannot read checkpoint {path} (damaged, or not a file torch.save wrote): {detail}")


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint written by save_checkpoint onto the CPU, as a UserError when it is missing or unreadable.
    Read with weights_only=True (tensors, plain Python values and _earlier_checkpoint_globals' few types): a file
    that would run code when unpickled is refused, not run."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"checkpoint {path} is a folder: name the file in it (a run leaves last.pt and best.pt)")
    if path.exists() and not path.is_file():
        raise UserError(f"checkpoint {path} is not a regular file (a device or a pipe): name a .pt file")
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        with _allowed_globals(_earlier_checkpoint_globals()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # (a plain pickle: refused below)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError as e:  # (other OSErrors come from torch's reader of a file cut off, too: damaged)
        raise UserError(f"cannot read checkpoint {path}: {e.strerror or exception_text(e)}") from e
    except Exception as e:  # a truncated or foreign file raises anything from pickle, zipfile or torch
        raise (_refused(path, e) or UserError(f"cannot read checkpoint {path} (damaged, or not a file torch.save "
                                              f"wrote): {exception_text(e)}")) from e
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise UserError(f"{path} is not a checkpoint of this project (no 'model' and 'config' entries)")
    if not isinstance(state["model"], dict) or not isinstance(state["config"], dict):
        raise UserError(f"{path} is not a checkpoint of this project ('model' and 'config' are not dicts)")
    return state


# The most of a run's JSON file (config.json, results.json: some 50 KB for 200 epochs) read_json reads: a larger
# file is no run's, and reading it whole (a sparse file of many GB, say) could take all the memory.
JSON_MAX_BYTES = 64 << 20


class FileTooLarge(ValueError):
    """read_json's file is larger than JSON_MAX_BYTES."""


def read_json(path: str | os.PathLike) -> Any:
    """json.loads of the UTF-8 file `path`; a ValueError where it is not JSON, not UTF-8 or larger than
    JSON_MAX_BYTES (FileTooLarge: read up to that, whatever its size says), a RecursionError where it nests too
    deep."""
    with open(path, "rb") as f:
        content = f.read(JSON_MAX_BYTES + 1)
    if len(content) > JSON_MAX_BYTES:
        raise FileTooLarge(f"it is larger than {JSON_MAX_BYTES >> 20} MiB, far more than a run writes there")
    return json.loads(content.decode("utf-8"))


def write_json(obj: Any, path: str | os.PathLike) -> None:
    """Write JSON atomically (same guarantees as checkpoints)."""
    text = json.dumps(obj, indent=2, sort_keys=False) + "\n"
    try:
        atomic_write(path, lambda f: f.write(text.encode()))
    except OSError as e:
        raise UserError(f"could not write {path}: {e.strerror or e}") from e


# ----------------------------------------------------------------------------------------------- figures
# TensorBoard shows images; rendering them with numpy keeps matplotlib out of the dependencies.

# A few stops of the viridis colour map, linearly interpolated: dark = 0, yellow = 1.
_VIRIDIS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)


def colormap(values: np.ndarray) -> np.ndarray:
    """values in [0, 1], any shape -> uint8 RGB of shape values.shape + (3,)."""
    x = np.clip(np.asarray(values, dtype=np.float64), 0, 1) * (len(_VIRIDIS) - 1)
    lo = np.floor(x).astype(int).clip(0, len(_VIRIDIS) - 2)
    frac = (x - lo)[..., None]
    return (_VIRIDIS[lo] * (1 - frac) + _VIRIDIS[lo + 1] * frac).round().astype(np.uint8)


def confusion_image(confusion: np.ndarray, size: int = 400) -> np.ndarray:
    """Row-normalised confusion matrix (rows = true class, columns = prediction) as an RGB image, HWC uint8.
    Each cell is a square of ceil(size / C) pixels; colour = fraction of the true class given that prediction."""
    confusion = np.asarray(confusion, dtype=np.float64)
    rates = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    cell = max(1, math.ceil(size / len(confusion)))
    return np.kron(colormap(rates), np.ones((cell, cell, 1), dtype=np.uint8))


def per_class_image(per_class_acc: Sequence[float], class_counts: Sequence[int],
                    bar_width: int = 0, height: int = 160) -> np.ndarray:
    """Per-class test accuracy beside training-set size, classes ordered by size (largest first): the top panel's
    blue bars are accuracy (0..100 %, grid lines every 25 %), the bottom panel's grey bars are the class's
    training count on a log scale (1 .. largest class). Returns an RGB image, HWC uint8."""
    acc = np.asarray(per_class_acc, dtype=np.float64) / 100
    counts = np.asarray(class_counts, dtype=np.float64)
    order = np.argsort(-counts, kind="stable")
    acc, counts = acc[order], counts[order]
    bar_width = bar_width or max(2, 600 // len(acc))
    gap = 1 if bar_width > 3 else 0
    width = bar_width * len(acc)
    img = np.full((2 * height + 8, width, 3), 255, dtype=np.uint8)
    for frac in (0.25, 0.5, 0.75, 1.0):  # grid of the accuracy panel
        img[height - int(frac * (height - 1)) - 1, :] = 200
    size_frac = np.log(np.maximum(counts, 1)) / max(np.log(counts.max()), 1e-12)
    for i, (a, s) in enumerate(zip(acc, size_frac)):
        x0, x1 = i * bar_width, (i + 1) * bar_width - gap
        top = int(round(a * (height - 1)))
        if top:
            img[height - top:height, x0:x1] = (31, 119, 180)
        bottom = int(round(s * (height - 1)))
        if bottom:
            img[height + 8:height + 8 + bottom, x0:x1] = (127, 127, 127)
    img[height:height + 8] = 0  # the separator between the panels
    return img
