"""Train a hybrid network (Wang et al., CVPR 2021) on long-tailed CIFAR: the one entry point.

    python main.py                                   # Hybrid-SC, CIFAR-10-LT, imbalance ratio 100, paper recipe
    python main.py --loss psc --imb_factor 0.1       # Hybrid-PSC at ratio 10
    python main.py --loss ce                         # the cross-entropy baseline
    torchrun --nproc_per_node 4 main.py ...          # DistributedDataParallel, --batch_size stays global

Every option lives in `Config`; `get_args_parser()` is built from it so other scripts (the benchmark) reuse it.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import math
import numbers
import os
import platform
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Optional


def launched_rank() -> Optional[int]:
    """This process's RANK where torchrun started it as one of several (WORLD_SIZE > 1, RANK in 0 .. WORLD_SIZE - 1,
    MASTER_ADDR and MASTER_PORT set), read from the environment alone (also before the processes meet, and while
    torch is imported); else None: one process, or torchrun's variables left in a shell, or not integers."""
    try:
        rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return None
    launched = world_size > 1 and 0 <= rank < world_size and all(os.environ.get(k) for k in ("MASTER_ADDR",
                                                                                              "MASTER_PORT"))
    return rank if launched else None


def _interrupted_while_importing(signum, frame) -> None:
    if not launched_rank():  # (torchrun relays a Ctrl-C to every process: rank 0 alone says it)
        print("interrupted", file=sys.stderr, flush=True)
    sys.exit(130)


# Ctrl-C in the seconds that importing torch takes ends the program as it does later (main's "interrupted", exit
# 130), not with a traceback from inside the import; main() puts Python's own handler back. Not where SIGINT was
# ignored at the start (a run started with '&' from a script), which stays so.
if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _interrupted_while_importing)


CLOSED_AT_START: set[int] = set()  # of the descriptors 0, 1 and 2, those the program was started without


def _null_on_closed_std_fds() -> None:
    """/dev/null on file descriptors 0, 1 and 2 where the program was started with them closed (`>&-`): else the
    first files opened would get them, and a library's output to stdout would go into a checkpoint or an events
    file. Before torch is imported, which opens files of its own."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            CLOSED_AT_START.add(fd)
            null = os.open(os.devnull, os.O_RDWR)  # the lowest free descriptor: this one, as those before are open
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


if __name__ == "__main__":
    _null_on_closed_std_fds()

import numpy as np
import torch

try:
    import fcntl
except ImportError:  # Windows has no fcntl: run folders are not locked there
    fcntl = None

import dataset_loader as data
import losses
import networks
import util
from util import UserError

# torch.compile's modes (--compile_mode). reduce-overhead adds CUDA graphs, which only CUDA has.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # those that record CUDA graphs (on CUDA)
# Far above any projection head in use (the paper's is 128 wide), so that a mistyped --feat_dim fails as one line
# instead of as an allocation failure.
MAX_FEAT_DIM = 2**16
MAX_EPOCHS = 2**31 - 1


def _opt(default: Any, help: str, group: str, **argparse_kwargs: Any) -> Any:
    return field(default=default, metadata={"help": help, "group": group, **argparse_kwargs})


def flag_text(value: Any) -> str:
    """A setting's value as its flag takes it, for messages: a list comma-separated ('' when empty); None, a flag
    left to its automatic default, as "(not given)"."""
    if isinstance(value, list):
        return ",".join(map(str, value)) or "''"
    return "(not given)" if value is None else str(value)


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None


# The paper's PSC temperature on each dataset (Section 4.1), --psc_temp's default.
PSC_TEMPERATURES = MappingProxyType({"cifar10": 1.0, "cifar100": 0.1})


@dataclass
class Config:
    # ---- data
    dataset: str = _opt("cifar10", "dataset", "data", choices=tuple(data.DATASETS))
    data_root: str = _opt("./data", "folder with cifar-10-batches-py/, cifar-100-python/ or train/<class>/ + "
                          "test/<class>/ image folders", "data")
    download: bool = _opt(False, "download the dataset with torchvision into --data_root if it is not there", "data")
    imb_type: str = _opt("exp", "long-tail profile (LDAM-DRW): exponential or step", "data", choices=data.IMB_TYPES)
    imb_factor: float = _opt(0.01, "n_min / n_max in (0, 1]: 0.01, 0.02, 0.1 are imbalance ratios 100, 50, 10",
                             "data")
    data_seed: int = _opt(0, "seed of the long-tailed subset (0 gives LDAM-DRW's split)", "data")
    sc_sampler: str = _opt("instance", "sampler of the feature (SC/PSC) branch", "data", choices=data.SAMPLERS)
    ce_sampler: Optional[str] = _opt(None, "sampler of the classifier (CE) branch (default: class for the hybrid "
                                     "losses, instance for --loss ce, which is then plain cross-entropy)", "data",
                                     choices=data.SAMPLERS)
    gray_prob: float = _opt(data.GRAY_PROB, "probability of RandomGrayscale in both branches' augmentation (0 turns "
                            "it off)", "data")
    sc_aug: str = _opt("paper", "augmentation of the feature branch's two views: paper (the classifier branch's: "
                       "random crop with 4-pixel padding, flip, grayscale) or supcon (SupContrast's CIFAR recipe: "
                       "RandomResizedCrop scale 0.2-1, flip, ColorJitter 0.4/0.4/0.4/0.1 with p 0.8, grayscale)",
                       "data", choices=data.SC_AUGS)
    # ---- method
    loss: str = _opt("sc", "feature loss: sc (Hybrid-SC), psc (Hybrid-PSC) or ce (cross-entropy baseline)",
                     "method", choices=losses.METHODS)
    model: str = _opt("resnet32", "backbone", "method", choices=tuple(networks.MODELS))
    feat_dim: int = _opt(128, "projection dimension of the contrastive head", "method")
    temp: float = _opt(0.1, "SC temperature", "method")
    base_temp: Optional[float] = _opt(None, "SC base temperature: multiplies the SC loss by temp / base_temp as "
                                      "SupContrast's code does (its 0.07 gives 1.43 at --temp 0.1); default: --temp, "
                                      "so no factor, the paper's formula", "method")
    psc_temp: Optional[float] = _opt(None, "PSC temperature (default: the paper's 1.0 on CIFAR-10, 0.1 on "
                                     "CIFAR-100)", "method")
    psc_denominator: str = _opt("negatives", "PSC softmax denominator: 'negatives' excludes the positive "
                                "prototype as the paper writes it; 'all' is the usual softmax over all classes",
                                "method", choices=("negatives", "all"))
    bn_stats: str = _opt("per_branch", "batch-norm statistics in training: per_branch passes the feature-branch "
                         "views and the classifier-branch images through the backbone separately, each normalised "
                         "with its own batch statistics (as two forward calls would); joint passes them as one "
                         "batch (the default of every run made before per_branch became the default)", "method",
                         choices=("per_branch", "joint"))
    alpha_schedule: str = _opt("parabolic", "weight alpha of the feature loss over the epochs (T from 0): parabolic "
                               "1 - (T/T_max)^2 (the paper), linear 1 - T/T_max, cosine cos(pi/2 T/T_max), or equal "
                               "0.5 throughout (BBN's ablation)", "method", choices=tuple(losses.ALPHA_SCHEDULES))
    # ---- optimisation
    batch_size: int = _opt(512, "images per branch per step (global over all processes)", "optimisation")
    learning_rate: float = _opt(0.5, "base learning rate (SGD)", "optimisation")
    momentum: float = _opt(0.9, "SGD momentum", "optimisation")
    weight_decay: float = _opt(1e-4, "weight decay", "optimisation")
    epochs: int = _opt(200, "training epochs", "optimisation")
    lr_decay_epochs: list = _opt((120, 160), "multiply the lr by --lr_decay_rate after these many epochs "
                                 "(comma-separated)", "optimisation", type=_int_list)
    lr_decay_rate: float = _opt(0.1, "lr decay factor", "optimisation")
    warm_epochs: float = _opt(5.0, "linear lr warm-up epochs (0 disables); lr 0.5 from the first step of "
                              "a fresh network is risky, LDAM-DRW warms up for 5", "optimisation")
    # ---- run
    seed: int = _opt(0, "seed of the model init and the batch stream", "run")
    output_dir: Optional[str] = _opt(None, "run folder (default: runs/<dataset>_<loss>_r<ratio>_s<seed>, with "
                                            "step_ before r for --imb_type step)", "run")
    resume: bool = _opt(False, "continue the run in --output_dir from its last.pt", "run")
    overwrite: bool = _opt(False, "start again in an --output_dir that already holds a run", "run")
    eval_only: bool = _opt(False, "evaluate --checkpoint on the test set (classifier branch and nearest class "
                                  "mean) and exit; the dataset, model and long-tailed split are the checkpoint's",
                           "run")
    checkpoint: Optional[str] = _opt(None, "checkpoint for --eval_only", "run")
    dry_run: bool = _opt(False, "do all a run does before its first step (check the flags, the device, the output "
                                "folder and with --resume its checkpoint; read the data, draw the long-tailed split, "
                                "build the model), print the run's settings as config.json would hold them and "
                                "what it would do, and exit, creating and changing nothing in the output folder",
                       "run")
    device: str = _opt("auto", "auto (cuda when available; the CPU with a note when CUDA_VISIBLE_DEVICES names GPUs "
                       "but none is available), cpu or cuda", "run", choices=("auto", "cpu", "cuda"))
    amp: Optional[bool] = _opt(None, "bf16 autocast (default: on for cuda and for CPUs with native bf16; "
                               "--resume and --eval_only: as the run)", "run")
    channels_last: Optional[bool] = _opt(None, "channels_last memory format (default: on; --resume and --eval_only: "
                                         "as the run)", "run")
    compile: bool = _opt(False, "torch.compile the training step's forward: the model and the hybrid loss as one "
                         "graph (under torchrun the model alone); the first step then includes the compilation",
                         "run")
    compile_mode: str = _opt("default", "torch.compile mode for --compile: default, reduce-overhead (on CUDA "
                             "also replays the compiled kernels as CUDA graphs; on the CPU as default), "
                             "max-autotune-no-cudagraphs or "
                             "max-autotune (both search kernels: compiling takes much longer)", "run",
                             choices=COMPILE_MODES)
    deterministic: bool = _opt(False, "deterministic kernels (bitwise-repeatable on CUDA; slower)", "run")
    sync_bn: bool = _opt(False, "SyncBatchNorm across processes (torchrun on CUDA; the CPU refuses it; on one CUDA "
                               "process it is plain batch norm, and the run says so)", "run")
    eval_every: int = _opt(1, "evaluate every N epochs (and always after the last)", "run")
    ncm_every: int = _opt(0, "also classify the test set by the nearest class mean of the backbone features every N "
                          "epochs (each time it embeds the long-tailed training set too, about twice the work of an "
                          "evaluation); 0: only after the last epoch", "run")
    print_freq: int = _opt(10, "steps between progress updates (each costs one host-device sync)", "run")

    def __post_init__(self) -> None:
        self.lr_decay_epochs = list(self.lr_decay_epochs)  # the default is a tuple; checkpoints compare lists
        if self.ce_sampler is None:  # the hybrid's classifier branch is class-balanced; the CE baseline is plain CE
            self.ce_sampler = "instance" if self.loss == "ce" else "class"

    @property
    def imbalance_ratio(self) -> float:
        return 1.0 / self.imb_factor

    @property
    def psc_temperature(self) -> float:
        if self.psc_temp is not None:
            return self.psc_temp
        return PSC_TEMPERATURES[self.dataset]

    def bn_split(self, n_views: int) -> Optional[int]:
        """HybridNet.forward's `split` for a step's batch of n_views feature-branch views, then the CE images."""
        return n_views if self.bn_stats == "per_branch" else None

    def default_output_dir(self) -> str:
        ratio = math.floor(self.imbalance_ratio + 0.5)  # halves up, as scripts/sweep.sh names its folders (2.5: r3)
        kind = "" if self.imb_type == "exp" else f"{self.imb_type}_"
        return os.path.join("runs", f"{self.dataset}_{self.loss}_{kind}r{ratio}_s{self.seed}")


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line (plus exit 2), like every other bad input; under torchrun the line names the process
    ('rank N: error: ...'), as main()'s errors before the processes meet do."""

    def error(self, message: str) -> None:  # type: ignore[override]
        # (printable: an unrecognized argument is quoted as given, a line break in it would split the line)
        self.exit(2, f"{launched_rank_prefix()}error: {util.printable(message)} (see --help)\n")


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each flag's default as the flag takes it (a list comma-separated), and none where it says nothing:
    a switch that is off, or None where the help text says itself what the automatic default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (default is None or default is argparse.SUPPRESS or "%(default)" in text or "default:" in text
                or (action.nargs == 0 and default is False)):
            return text
        shown = flag_text(list(default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"  # the text %-formatted as argparse's, not the value


def get_args_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(description=__doc__.splitlines()[0], formatter_class=DefaultsHelpFormatter)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(Config):
        meta = dict(f.metadata)
        name = meta.pop("group")
        if name not in groups:  # (each group made once: its title heads its flags in --help)
            groups[name] = parser.add_argument_group(name)
        group = groups[name]
        kwargs: dict[str, Any] = {"default": f.default, **meta}
        if f.type in ("bool", bool):
            kwargs["action"] = "store_true"
        elif f.type in ("Optional[bool]",):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif "type" not in kwargs:
            kwargs["type"] = {"int": int, "float": float, "Optional[float]": float}.get(str(f.type), str)
        if isinstance(f.default, tuple):
            kwargs["default"] = list(f.default)
        group.add_argument(f"--{f.name}", **kwargs)
    return parser


def parse_config(argv: Optional[list[str]] = None) -> Config:
    args = get_args_parser().parse_args(argv)
    cfg = Config(**vars(args))
    validate(cfg)
    return cfg


def given_flags(argv: Optional[list[str]] = None) -> set[str]:
    """The Config fields that argv sets itself (whatever the value, a default's included), for the checks that must
    tell a flag the user gave from one left at its default. argv must have passed parse_config."""
    parser = get_args_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


FLOAT32_MAX = float(np.finfo(np.float32).max)


def check_path(flag: str, path: Optional[str]) -> None:
    """A path that the file system cannot even look up (a name longer than it allows, a loop of symbolic links,
    a folder on the way that cannot be entered) as one line, where Path.exists would raise; a path that does not
    exist (yet) is for the caller to judge."""
    if not path:
        return
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        # The kernel names a missing folder before a name too long further on: look at the names themselves, against
        # the limit of the nearest folder that exists (255 bytes on the usual file systems).
        existing = next((p for p in Path(os.path.abspath(path)).parents if p.is_dir()), Path("/"))
        try:
            name_max = os.pathconf(existing, "PC_NAME_MAX")
        except (OSError, ValueError):
            name_max = 255
        if any(len(os.fsencode(part)) > name_max for part in Path(path).parts):
            raise UserError(f"{flag} {path}: {os.strerror(errno.ENAMETOOLONG)}") from None
    except OSError as e:
        raise UserError(f"{flag} {path}: {e.strerror or e}") from None


def paper_decay_hint(epochs: int) -> str:
    """For a run shorter than the paper's: where its lr decays (Config's defaults, the paper's: after 120 and 160 of
    200 epochs, 60 and 80 %) fall in a run of `epochs`, as a hint to a refused --lr_decay_epochs; '' where they do
    not fit apart."""
    defaults = {f.name: f.default for f in dataclasses.fields(Config)}
    shares = [e / defaults["epochs"] for e in defaults["lr_decay_epochs"]]
    decays = [round(epochs * share) for share in shares]
    if not 0 < decays[0] < decays[1] < epochs:
        return ""
    return (f"; the paper's decays, after {' and '.join(f'{100 * share:g} %' for share in shares)} of its run, are "
            f"--lr_decay_epochs {flag_text(decays)} here")


def validate(cfg: Config) -> None:
    """Checks that need no data; everything here fails before anything is read or written."""
    if cfg.batch_size < 2:
        raise UserError(f"--batch_size must be at least 2 (got {cfg.batch_size})")
    if not cfg.learning_rate > 0:
        raise UserError(f"--learning_rate must be positive (got {cfg.learning_rate})")
    if cfg.epochs < 1:
        raise UserError(f"--epochs must be positive (got {cfg.epochs})")
    if cfg.epochs > MAX_EPOCHS:  # (alpha's T / T_max and TensorBoard's hparams take it as a float)
        raise UserError(f"--epochs must be at most {MAX_EPOCHS} (got {cfg.epochs})")
    if not 0 <= cfg.gray_prob <= 1:
        raise UserError(f"--gray_prob must be in [0, 1] (got {cfg.gray_prob})")
    if not 0 < cfg.imb_factor <= 1:
        factor = f"{1 / cfg.imb_factor:g}" if cfg.imb_factor > 1 else "1"  # (inf: 0; just above 1: "1")
        hint = f" (imbalance ratio {cfg.imb_factor:g} is --imb_factor {factor})" if 0 < float(factor) < 1 else ""
        raise UserError(f"--imb_factor must be in (0, 1] (n_min / n_max), got {cfg.imb_factor}{hint}")
    if not math.isfinite(cfg.imbalance_ratio):
        raise UserError(f"--imb_factor {cfg.imb_factor} is too small: its imbalance ratio 1 / imb_factor is not a "
                        f"finite number (every tail class would be empty)")
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--{f.name} must be a finite number (got {value})")
    if not 0 <= cfg.data_seed < 2**32:
        raise UserError(f"--data_seed must be in 0 .. 2**32 - 1 (got {cfg.data_seed})")
    if not 0 <= cfg.seed < 2**32:  # numpy's global seed takes no more
        raise UserError(f"--seed must be in 0 .. 2**32 - 1 (got {cfg.seed})")
    bad = [] if cfg.eval_only else [e for e in cfg.lr_decay_epochs if not 0 < e < cfg.epochs]  # (trains nothing)
    if bad:  # the flag as given (120,160), the epochs at fault, and the way out: a schedule inside the run, or none
        within = (f"each must be in 1..{cfg.epochs - 1}, or --lr_decay_epochs '' for no decay" if cfg.epochs > 1
                  else "a 1-epoch run has no decay: pass ''")
        which = f"epoch {bad[0]} is" if len(bad) == 1 else f"epochs {', '.join(map(str, bad))} are"
        raise UserError(f"--lr_decay_epochs {flag_text(cfg.lr_decay_epochs)}: {which} outside the run of "
                        f"{plural(cfg.epochs, 'epoch')} ({within}){paper_decay_hint(cfg.epochs)}")
    if any(a >= b for a, b in zip(cfg.lr_decay_epochs, cfg.lr_decay_epochs[1:])):
        raise UserError(f"--lr_decay_epochs must be strictly increasing (got {flag_text(cfg.lr_decay_epochs)})")
    for name in ("momentum", "weight_decay", "warm_epochs"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name} must not be negative (got {getattr(cfg, name)})")
    if not cfg.momentum < 1:  # SGD's velocity v = momentum * v + g would never decay
        raise UserError(f"--momentum must be below 1 (got {cfg.momentum})")
    for name in ("learning_rate", "weight_decay"):  # SGD scales the float32 parameters and gradients by them
        if getattr(cfg, name) > FLOAT32_MAX:
            raise UserError(f"--{name} must be at most {FLOAT32_MAX:.4g}, float32's largest number "
                            f"(got {getattr(cfg, name)})")
    if not 0 < cfg.lr_decay_rate <= 1:
        raise UserError(f"--lr_decay_rate must be in (0, 1] (got {cfg.lr_decay_rate})")
    for name in ("temp", "base_temp", "psc_temp"):
        value = getattr(cfg, name)
        if value is not None and not value > 0:
            raise UserError(f"--{name} must be positive (got {value})")
        if value is not None and value < 1 / FLOAT32_MAX:  # the loss's logits, similarity / temperature, overflow
            raise UserError(f"--{name} must be at least {1 / FLOAT32_MAX:.4g} (1 / float32's largest number): the loss "
                            f"divides by it in float32 (got {value})")
    for name in ("feat_dim", "eval_every", "print_freq"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name} must be at least 1 (got {getattr(cfg, name)})")
    if cfg.feat_dim > MAX_FEAT_DIM:
        raise UserError(f"--feat_dim must be at most {MAX_FEAT_DIM} (got {cfg.feat_dim})")
    if cfg.output_dir == "":
        raise UserError("--output_dir is empty (leave it out for the default runs/<dataset>_<loss>_r<ratio>_s<seed>)")
    for name in ("output_dir", "data_root", "checkpoint"):
        check_path(f"--{name}", getattr(cfg, name))
    try:
        (cfg.output_dir or "").encode("utf-8")
    except UnicodeEncodeError:  # bytes from the command line that are not UTF-8
        raise UserError("--output_dir is not valid UTF-8, which TensorBoard needs for the names of its event "
                        "files; give the folder another name") from None
    if cfg.ncm_every < 0:
        raise UserError(f"--ncm_every must not be negative (got {cfg.ncm_every}; 0: only after the last epoch)")
    if cfg.compile_mode != "default" and not cfg.compile:
        raise UserError(f"--compile_mode {cfg.compile_mode} needs --compile")
    if cfg.eval_only and not cfg.checkpoint:
        raise UserError("--eval_only needs --checkpoint PATH")
    if cfg.checkpoint and not cfg.eval_only:
        raise UserError("--checkpoint is read by --eval_only only; to continue a run in --output_dir, use --resume")
    if cfg.eval_only and (cfg.resume or cfg.overwrite):
        raise UserError(f"--eval_only writes no run: drop --{'resume' if cfg.resume else 'overwrite'}")
    if cfg.resume and cfg.overwrite:
        raise UserError("--resume and --overwrite contradict each other; choose one")
    if cfg.dry_run and cfg.eval_only:
        raise UserError("--dry_run checks a training run; --eval_only trains nothing: drop one of them")


# ----------------------------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class Dist:
    """Where this process stands in a torchrun job (rank 0 of 1 without torchrun)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def resolve_device(choice: str, local_rank: int = 0, local_processes: int = 0) -> torch.device:
    """--device auto|cpu|cuda -> the device of this process: GPU local_rank (modulo the visible GPUs, for
    launchers that give each process one GPU through CUDA_VISIBLE_DEVICES) when local_processes (torchrun's
    LOCAL_WORLD_SIZE; 0 when unknown) is at most the number of visible GPUs."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is available (use --device cpu or auto)")
    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    gpus = torch.cuda.device_count()
    if local_processes > gpus:  # two processes on one GPU: NCCL would fail later, naming a duplicate GPU
        raise UserError(f"{local_processes} processes on this machine (torchrun --nproc_per_node) but {gpus} "
                        f"visible GPU(s): start at most {gpus} per machine, or use --device cpu")
    torch.cuda.set_device(local_rank % gpus)
    return torch.device("cuda", torch.cuda.current_device())


def load_compiler() -> None:
    """Import torch.compile's machinery (torch._dynamo; the first torch.optim optimiser imports it too, so every
    training run does), which makes its cache folders as it loads: one it cannot make (TORCHINDUCTOR_CACHE_DIR under
    a file, or unwritable) is a UserError, not a traceback."""
    try:
        import torch._dynamo  # noqa: F401
    except OSError as e:
        raise UserError(f"torch cannot make the cache folder of its compiler, {e.filename} ({e.strerror or e}), which "
                        f"it makes as it loads, with --compile or without: set TORCHINDUCTOR_CACHE_DIR to a folder "
                        f"it can write") from e


def one_line_compile_failure(exc: BaseException) -> bool:
    """Whether `exc` is torch.compile's failure to compile (BackendCompilerFailed), to be said in one line
    (compile_failure_text), not with PyTorch's trace: unless TORCHDYNAMO_VERBOSE asks for that trace."""
    return (isinstance(exc, torch._dynamo.exc.BackendCompilerFailed)
            and os.environ.get("TORCHDYNAMO_VERBOSE", "0") in ("", "0"))


def compile_failure_text(exc: BaseException, saved_nothing: bool = False) -> str:
    """One line for a run whose --compile failed in its first step (no working C++ compiler for Inductor on the
    CPU, no Triton on CUDA): the compiler's own error (BackendCompilerFailed.inner_exception: its message is
    "backend='inductor' raised:" and the cause on the next line), first line only, not PyTorch's trace.
    `saved_nothing`: a new run, whose folder holds its config.json but no checkpoint, so that running it again
    without --compile takes --overwrite."""
    cause = getattr(exc, "inner_exception", None) or exc
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    what = f"{type(cause).__name__}: {lines[0]}" if lines else type(cause).__name__
    way = "run without --compile" + (" (and with --overwrite: this run saved nothing)" if saved_nothing else "")
    return (f"--compile could not compile the training step ({what}); {way}, or with TORCHDYNAMO_VERBOSE=1 for "
            f"PyTorch's trace")


def hidden_gpu_note(choice: str, device: torch.device, doing: str = "training") -> Optional[str]:
    """--device auto fell back to the CPU although CUDA_VISIBLE_DEVICES names GPUs (a typo there hides them all,
    as does a broken driver): said at the start of the run (or evaluation, `doing`), which still goes on."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if choice != "auto" or device.type != "cpu" or not visible:
        return None
    return (f"note: CUDA_VISIBLE_DEVICES={visible} but no CUDA device is available: {doing} on the CPU "
            f"(--device cuda would stop instead)")


def sync_bn_note(cfg: Config, dist: Dist) -> Optional[str]:
    """--sync_bn on one process (on CUDA; the CPU refuses it): SyncBatchNorm with nothing to synchronise is batch norm,
    so the flag changes nothing; said at the start of the run, which still trains (a sweep may pass it to every run)."""
    if not cfg.sync_bn or dist.enabled:
        return None
    return "note: --sync_bn with one process is plain batch norm: it changes nothing in this run (it acts under torchrun)"


def _env_int(name: str, default: int) -> int:
    """An integer that torchrun puts in the environment, or the default where it is not set."""
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise UserError(f"{name}={text!r} in the environment is not an integer (torchrun sets it); unset it to run "
                        f"one process") from None


def setup_distributed(cfg: Config) -> tuple[Dist, torch.device]:
    """Read torchrun's environment, pick the device and join the process group (nccl on CUDA, gloo on CPU)."""
    dist = Dist(_env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0))
    if dist.world_size < 1 or not 0 <= dist.rank < dist.world_size or dist.local_rank < 0:
        raise UserError(f"RANK={dist.rank}, LOCAL_RANK={dist.local_rank} and WORLD_SIZE={dist.world_size} in the "
                        f"environment do not describe a process of a job (torchrun sets them); unset them to run "
                        f"one process")
    local_processes = _env_int("LOCAL_WORLD_SIZE", 0) if dist.enabled else 0
    device = resolve_device(cfg.device, dist.local_rank if dist.enabled else 0, local_processes)
    use_cuda = device.type == "cuda"
    if cfg.sync_bn and not use_cuda:
        raise UserError("--sync_bn needs CUDA (PyTorch's SyncBatchNorm does not run on the CPU)")
    if dist.enabled:
        if cfg.batch_size % dist.world_size and not cfg.eval_only:  # (an evaluation reads no batch size)
            raise UserError(f"--batch_size {cfg.batch_size} (the global batch) is not divisible by the "
                            f"{dist.world_size} processes")
        if not (os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")):  # else a traceback from torch
            raise UserError(f"WORLD_SIZE={dist.world_size} in the environment, but no MASTER_ADDR and MASTER_PORT "
                            f"to meet the other processes at: start the job with torchrun, or unset WORLD_SIZE to "
                            f"run one process")
        join_process_group("nccl" if use_cuda else "gloo", dist)
    return dist, device


# Seconds a process waits for the job's others to meet before it says that it waits (torchrun starts them all at
# once: they meet within seconds; a process started by hand with WORLD_SIZE > 1 waits for the others that must be
# started too, and until then would say nothing until the process group's timeout: 30 minutes with gloo, 10 with
# nccl).
JOIN_NOTICE_S = 30.0


def join_process_group(backend: str, dist: Dist) -> None:
    """init_process_group, with one line after JOIN_NOTICE_S while the others have not come, and one line instead
    of a traceback where they never do (its timeout) or where the rendezvous's settings are wrong."""
    where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    notice = threading.Timer(JOIN_NOTICE_S, lambda: print(
        f"rank {dist.rank}: waiting for the job's other processes ({dist.world_size} in all) at {where}; each must "
        f"be started (torchrun starts them), or stop this one with Ctrl-C", file=sys.stderr, flush=True))
    notice.daemon = True
    notice.start()
    # It waits in C++, where Python's SIGINT handler would run only at the timeout: Ctrl-C (or the sweep's SIGINT)
    # ends the process at once instead, as the signal's default does (nothing is written yet).
    interrupt = signal.getsignal(signal.SIGINT)
    waits_for_ctrl_c = interrupt is signal.default_int_handler and threading.current_thread() is threading.main_thread()
    if waits_for_ctrl_c:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        torch.distributed.init_process_group(backend, rank=dist.rank, world_size=dist.world_size)
        if backend == "gloo":
            # Gloo connects each pair of processes in a handshake that one side can finish first: a process that
            # then ends at once (a resume of a finished run, a dry run) cut off a peer still connecting
            # ("Gloo connectFullMesh failed ... Connection closed by peer"). Past this barrier every process has
            # joined. (NCCL's init only meets at the store; its communicators are made at the first collective.)
            torch.distributed.barrier()
    except ValueError as e:  # the rendezvous's settings (MASTER_PORT=abc, ...)
        raise UserError(f"cannot join the job's processes: {util.exception_text(e)}") from None
    except torch.distributed.DistError as e:  # the others never came (DistStoreError) or nobody listens at `where`
        raise UserError(f"rank {dist.rank} of {dist.world_size} did not meet the job's other processes at {where}: "
                        f"{util.exception_text(e)}") from None
    except RuntimeError as e:  # another process ended while they were meeting (its own message says why)
        if not peer_gone(e):
            raise
        raise UserError(f"rank {dist.rank} of {dist.world_size}: another process of this job ended while they were "
                        f"meeting (its message says why), so this one stops too ({peer_gone_text(e)})") from None
    finally:
        notice.cancel()
        if waits_for_ctrl_c:
            signal.signal(signal.SIGINT, interrupt)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward hands each process the summed gradient of its own slice. Every
    process then computes the loss of the whole global batch, so each slice's gradient arrives world_size times
    summed; DDP's averaging of parameter gradients divides by world_size again, which gives exactly the
    single-process gradient."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        world_size = torch.distributed.get_world_size()
        parts = [torch.empty_like(tensor) for _ in range(world_size)]
        torch.distributed.all_gather(parts, tensor.contiguous())
        ctx.rows = tensor.shape[0]
        return torch.cat(parts)  # [world_size * N, ...]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()  # all_reduce works in place: leave autograd's buffer alone
        torch.distributed.all_reduce(grad)  # gloo has no reduce_scatter; the global batch is small
        start = torch.distributed.get_rank() * ctx.rows
        return grad[start:start + ctx.rows]


def fast_default(device: torch.device) -> bool:
    """Default of --amp: on for CUDA, and on CPUs with native bf16 (AVX512-BF16 / AMX), where scripts/benchmark.py
    measured bf16 autocast + channels_last at about 2x float32 (see README, Performance)."""
    return device.type == "cuda" or native_cpu_bf16()


X86_MACHINES = ("x86_64", "amd64", "i386", "i686", "x86")


def native_cpu_bf16(machine: Optional[str] = None, cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes in bf16 natively. On x86 that takes AVX512-BF16 or AMX-BF16: oneDNN's own check
    (torch.ops.mkldnn._is_mkldnn_bf16_supported) also says yes on AVX512 without them, where it emulates bf16 and
    a training step ran at half the speed of float32 (README, Performance, "A CPU without bf16"). Elsewhere (an Arm
    CPU) oneDNN's check is of the native instructions."""
    machine = (machine or platform.machine()).lower()
    if machine not in X86_MACHINES:
        try:
            return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):  # private helper: absent in some builds
            return False
    if not torch.backends.mkldnn.is_available():  # no oneDNN in this build: no fast bf16 convolutions either
        return False
    avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", None)  # newer torch; amx_bf16 CPUs have it too
    if avx512_bf16 is not None:
        return bool(avx512_bf16())
    try:  # older torch (2.4 has no such helper): the kernel's flags (Linux)
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# Default of --channels_last, on every device: in float32 on the CPU, too, it measured faster for the hybrids
# (README, Performance, "A CPU without bf16").
CHANNELS_LAST_DEFAULT = True


def run_numerics(cfg: Config, device: torch.device, saved: Optional[dict[str, Any]] = None) -> tuple[bool, bool]:
    """(amp, channels_last): the flags when given; else, with a checkpoint (a resume, --eval_only), as its run ran,
    so that a resumed run keeps its precision when this device's default differs (another CPU type, or a default
    that changed since); else the device's defaults."""
    if saved is None:
        amp, channels_last = fast_default(device), CHANNELS_LAST_DEFAULT
    else:  # a checkpoint without them is from before channels_last was saved, when it was off
        amp, channels_last = saved.get("amp", fast_default(device)), saved.get("channels_last", False)
    return (amp if cfg.amp is None else cfg.amp, channels_last if cfg.channels_last is None else cfg.channels_last)


def numerics_note(cfg: Config, device: torch.device, saved: Optional[dict[str, Any]]) -> Optional[str]:
    """A resume that keeps a precision or layout other than this device's default (run_numerics) says so."""
    if saved is None:
        return None
    kept, default = run_numerics(cfg, device, saved), run_numerics(cfg, device)
    differ = [f"--{'' if on else 'no-'}{flag}" for flag, on, other in zip(("amp", "channels_last"), kept, default)
              if on != other]
    if not differ:
        return None
    return (f"note: resuming with {' '.join(differ)} as the run trained (this device's default differs); "
            f"give the flag{'s' if len(differ) > 1 else ''} to change")


def cudagraph_skips(clear: bool = False) -> int:
    """How many graphs Inductor has run without CUDA graphs in this process (its counter, which counts a forward
    graph and its backward once: it decides for both together; on the CPU, every graph it compiled in a CUDA-graph
    mode); clear: start the count again at 0."""
    from torch._dynamo.utils import counters
    if clear:
        counters.clear()
    return counters["inductor"].get("cudagraph_skips", 0)


def cudagraph_note(cfg: Config, device: torch.device) -> Optional[str]:
    """After the first step of a run compiled in a mode that records CUDA graphs, on CUDA: a note where Inductor ran
    some of the step's graphs without them (it skips them silently, e.g. for a graph that writes an input other
    than a parameter or buffer), which leaves the run no faster than plain --compile."""
    if not cfg.compile or cfg.compile_mode not in CUDA_GRAPH_MODES or device.type != "cuda":
        return None
    skips = cudagraph_skips()
    if not skips:
        return None
    return (f"note: Inductor ran {plural(skips, 'graph')} of the step without CUDA graphs (--compile_mode "
            f"{cfg.compile_mode}), which leaves it no faster there; torch's logs say why (TORCH_LOGS=cudagraphs, "
            f"or perf_hints in older torch)")


def mixed_note(sessions: list[dict[str, Any]], amp: bool, world_size: int, evaluates_only: bool,
               eval_every: Optional[int] = None, sync_bn: Optional[bool] = None,
               channels_last: Optional[bool] = None, compile_mode: Optional[str | bool] = None) -> Optional[str]:
    """A resume in another precision or memory layout, compiled where it was not (or the reverse, or in another
    mode), with another number of processes, another --eval_every (the epochs a best is picked from) or batch norm
    synchronised where it was not (or the reverse) than the run's `sessions` so far (RunState.sessions, as loaded)
    says that its results will come from both (results.json: "mixed", mixed_setting); one that only evaluates
    (`evaluates_only`) only of the precision and layout (trained_with). compile_mode: the session's entry (False
    where it does not compile); it, eval_every, sync_bn and channels_last None: not compared."""
    changed = []
    for key, now, name in (("amp", amp, lambda on: f"--{'' if on else 'no-'}amp"),
                           ("channels_last", channels_last, lambda on: f"--{'' if on else 'no-'}channels_last"),
                           ("compile", compile_mode, lambda mode: f"--compile --compile_mode {mode}" if mode else
                            "no --compile"),
                           ("world_size", world_size, lambda n: f"{n} process{'' if n == 1 else 'es'}"),
                           ("eval_every", eval_every, lambda n: f"--eval_every {n}"),
                           ("sync_bn", sync_bn, lambda on: "batch norm synchronised across processes" if on else
                            "batch norm per process")):
        if now is None or evaluates_only and key in NOT_IN_AN_EVALUATION:
            continue
        before = trained_with(sessions, key)
        if before - {now}:
            ordered = sorted(before, key=lambda v: (isinstance(v, str), v))  # (compile: False before the modes)
            changed.append((key, " and ".join(name(v) for v in ordered), name(now)))
    if not changed:
        return None
    return (f"note: this run trained with {', '.join(then for _, then, _ in changed)} so far and goes on with "
            f"{', '.join(now for _, _, now in changed)}: its results.json will say "
            + " and ".join(f'"{key}": "mixed"' for key, _, _ in changed))


def code_note(sessions: list[dict[str, Any]], commit: Optional[str], torch_version: str) -> Optional[str]:
    """A resume with other code (a `git pull`, an edit) or another torch than the run's `sessions` so far recorded
    says so: its results come from both, and results.json's sessions say which part ran which. `commit` is None
    where it is unknown (outside a checkout, or on a rank other than 0, which prints nothing)."""
    def same(then: str, now: str, key: str) -> bool:  # a commit's short and full hash (GIT_COMMIT may give either)
        if key != "git_commit" or then.endswith(DIRTY) != now.endswith(DIRTY):
            return then == now
        then, now = then.removesuffix(DIRTY), now.removesuffix(DIRTY)
        return then == now or min(len(then), len(now)) >= 7 and (then.startswith(now) or now.startswith(then))

    changed = []
    for key, now, name in (("git_commit", commit, "commit"), ("torch_version", torch_version, "torch")):
        before = {s[key] for s in sessions if isinstance(s.get(key), str)}
        if now is not None and any(not same(then, now, key) for then in before):
            changed.append((f"{name} {' and '.join(sorted(before))}", f"{name} {now}"))
    if not changed:
        return None
    return (f"note: this run trained with {', '.join(then for then, _ in changed)} so far and goes on with "
            f"{', '.join(now for _, now in changed)}: results.json's sessions will say which part ran which")


def device_note(sessions: list[dict[str, Any]], now: str, evaluates_only: bool) -> Optional[str]:
    """A resume that trains on another device than the run's last session recorded (`sessions`, device_name:
    another GPU model, or on the CPU another number of threads, which OMP_NUM_THREADS, taskset, a cgroup or torchrun
    set) says so: each sums in its own order, so the steps from here on are not bitwise those of a run never
    stopped."""
    then = next((s["device"] for s in reversed(sessions) if isinstance(s.get("device"), str)), None)
    if evaluates_only or then is None or then == now:
        return None
    return (f"note: this run trained on {then} until it stopped and goes on on {now}, which rounds in its own "
            f"order: from here on its steps are not bitwise those of a run never stopped (results.json's sessions "
            f"say which part ran where)")


def stream_device_note(device: torch.device, saved: Optional[dict[str, Any]]) -> Optional[str]:
    """A resume on another device type than the run's batches were drawn on says what that changes: the stream is
    a pure function of (seed, epoch, step) on one type, but the CPU's and CUDA's generators draw differently from
    the same seed. (Checkpoints from before the entry existed say nothing.)"""
    then = None if saved is None else saved.get("stream_device")
    if not isinstance(then, str) or then == device.type:
        return None
    mid_epoch = isinstance(saved.get("run"), dict) and saved["run"].get("step", 0) != 0
    return (f"note: this run drew its batches on {then} and now draws them on {device.type}, whose random generator "
            f"gives other draws for the same seed: from here on its batches are not those the run would have drawn "
            f"on {then}" + (" (and the rest of this epoch, resumed in its middle, follows another order, so that "
                            "with instance sampling some of its images come twice and others not at all)"
                            if mid_epoch else ""))


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def bf16_autocast(device: torch.device, enabled: bool) -> torch.autocast:
    """--amp's context: bf16 autocast on `device`'s type where enabled (the losses and the classifier's logits
    switch it off for themselves)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """[N, ...] on each process -> [world_size * N, ...] in rank order, differentiable."""
    return _GatherWithGrad.apply(tensor)


def all_reduce_sum(tensor: torch.Tensor, dist: Dist) -> torch.Tensor:
    if dist.enabled:
        torch.distributed.all_reduce(tensor)
    return tensor


# ----------------------------------------------------------------------------------------------- training


@torch.no_grad()
def test_confusion(net: networks.HybridNet, images: torch.Tensor, labels: torch.Tensor, *, mean: torch.Tensor,
                   std: torch.Tensor, num_classes: int, amp: bool, channels_last: bool = False,
                   dist: Dist = Dist(), batch_size: int = 1000) -> np.ndarray:
    """Classifier-branch confusion matrix [C, C] (rows = truth) of `net` (in eval mode) on uint8 images
    [N, 3, 32, 32]. Each process takes every world_size-th batch and the counts are summed, so all processes
    get the same matrix; the host waits for the device once, at the end."""
    fmt = memory_format(channels_last)
    counts = torch.zeros(num_classes, num_classes, dtype=torch.long, device=images.device)
    for start in range(dist.rank * batch_size, len(images), batch_size * dist.world_size):
        x = data.normalize(images[start:start + batch_size], mean, std).contiguous(memory_format=fmt)
        with bf16_autocast(images.device, amp):
            preds = net.forward_logits(x).argmax(dim=1)
        counts += util.confusion_matrix(preds, labels[start:start + batch_size], num_classes)
    return all_reduce_sum(counts, dist).cpu().numpy()


@torch.no_grad()
def embed(net: networks.HybridNet, images: torch.Tensor, *, mean: torch.Tensor, std: torch.Tensor, amp: bool,
          channels_last: bool = False, batch_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features [N, 64] and projections [N, feat_dim], float32 on the images' device, of `net` (in eval
    mode) on uint8 images [N, 3, 32, 32], unaugmented."""
    fmt = memory_format(channels_last)
    features, projections = [], []
    for start in range(0, len(images), batch_size):
        x = data.normalize(images[start:start + batch_size], mean, std).contiguous(memory_format=fmt)
        with bf16_autocast(images.device, amp):
            out = net(x)
        features.append(out.features.float())
        projections.append(out.projections)
    return torch.cat(features), torch.cat(projections)


def ncm_report(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
               test_labels: torch.Tensor, num_classes: int, shot_groups: dict[str, list[int]]) -> dict[str, Any]:
    """accuracy_report of the nearest-class-mean classifier (util.nearest_class_mean) on backbone features: class
    means of the long-tailed training images, predictions for the test images. Beside the classifier branch's
    accuracy it tells whether the representation or the linear classifier on it holds a run back."""
    preds = util.nearest_class_mean(train_features, train_labels, test_features, num_classes)  # [M]
    return util.accuracy_report(util.confusion_matrix(preds, test_labels, num_classes).cpu().numpy(), shot_groups)


def build_criterion(cfg: Config, gather: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> losses.HybridLoss:
    """The hybrid loss of cfg's method and temperatures (Trainer's, and the benchmark reference's: the same maths);
    `gather`: SC's all-gather of the projections under torchrun."""
    return losses.HybridLoss(cfg.loss, cfg.psc_temperature if cfg.loss == "psc" else cfg.temp,
                             exclude_positive=cfg.psc_denominator == "negatives", gather=gather,
                             base_temperature=cfg.base_temp)


def build_optimizer(cfg: Config, net: torch.nn.Module) -> torch.optim.SGD:
    """SGD with cfg's momentum and weight decay over the parameters that train (Trainer's, and the benchmark
    reference's); each step sets its learning rate."""
    return torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=cfg.learning_rate,
                           momentum=cfg.momentum, weight_decay=cfg.weight_decay)


class Trainer:
    """Owns the model, the optimiser, the batch stream and the training step (also what the benchmark times).

    The model forwards the feature-branch views and the classifier-branch images in one module call
    (cat([sc_views, ce_images]) -> [3B, 3, 32, 32]); by default (--bn_stats per_branch) the backbone runs on each
    branch's part separately, each with its own batch-norm statistics; --bn_stats joint makes it one pass with
    statistics over both branches' images (Config.bn_split)."""

    def __init__(self, cfg: Config, train: data.ArraySplit, num_classes: int, device: torch.device,
                 dist: Dist = Dist(), saved: Optional[dict[str, Any]] = None):
        """`saved`: the checkpoint a resume continues (its precision and layout are the defaults, run_numerics)."""
        self.cfg, self.device, self.dist, self.num_classes = cfg, device, dist, num_classes
        self.amp, self.channels_last = run_numerics(cfg, device, saved)
        self.memory_format = memory_format(self.channels_last)
        self.feature_branch = cfg.loss != "ce"
        mean, std = data.dataset_stats(cfg.dataset)
        self.stream = data.TrainStream(train, num_classes, cfg.batch_size, mean=mean, std=std,
                                       sc_sampler=cfg.sc_sampler, ce_sampler=cfg.ce_sampler,
                                       feature_branch=self.feature_branch, device=device, seed=cfg.seed,
                                       rank=dist.rank, world_size=dist.world_size, gray_prob=cfg.gray_prob,
                                       sc_aug=cfg.sc_aug)
        self.mean, self.std = self.stream.mean, self.stream.std  # float32 [3] on the device, for evaluation
        self.class_counts = list(self.stream.class_counts)
        self.shot_groups = data.shot_groups(self.class_counts)

        util.seed_everything(cfg.seed)  # the model's initialisation
        net = networks.build_model(cfg.model, num_classes, cfg.feat_dim, use_prototypes=cfg.loss == "psc")
        if not self.feature_branch:  # the CE baseline never uses the head; frozen, DDP and SGD ignore it
            net.head.requires_grad_(False)
        self.sync_bn = cfg.sync_bn and dist.enabled  # with one process there is nothing to synchronise
        if self.sync_bn:
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
        net = net.to(device, memory_format=self.memory_format)
        self.net = net  # the bare HybridNet: evaluation, checkpoints, prototypes
        self.model: torch.nn.Module = net
        if dist.enabled:
            self.model = torch.nn.parallel.DistributedDataParallel(
                net, device_ids=[device.index] if device.type == "cuda" else None)
        # alpha reaches the step as a 0-d tensor on the device, refilled when it changes (once an epoch), so that a
        # compiled step takes each epoch's value as an input instead of compiling again for it.
        self.alpha, self._alpha_value = torch.zeros((), device=device), 0.0
        self.forward_loss = self._forward_loss
        load_compiler()  # (torch.compile and torch.optim.SGD below import it)
        if cfg.compile:
            if dist.enabled:  # DDP's bucketed all-reduce and SC's all-gather stay outside: the model alone
                self.model = torch.compile(self.model, mode=cfg.compile_mode)
            else:  # the model and the loss as one graph (under reduce-overhead, one CUDA graph for both)
                self.forward_loss = torch.compile(self._forward_loss, mode=cfg.compile_mode)
        self.criterion = build_criterion(cfg, gather_with_grad if dist.enabled and cfg.loss == "sc" else None)
        self.optimizer = build_optimizer(cfg, net)
        self.steps_per_epoch = self.stream.steps_per_epoch

    def lr_at(self, global_step: int) -> float:
        cfg = self.cfg
        return util.learning_rate(global_step, base_lr=cfg.learning_rate, steps_per_epoch=self.steps_per_epoch,
                                  warm_epochs=cfg.warm_epochs, decay_epochs=cfg.lr_decay_epochs,
                                  decay_rate=cfg.lr_decay_rate)

    def step(self, batch: data.Batch, alpha: float, lr: float) -> losses.LossTerms:
        """One SGD step on one batch of both branches. Returns the loss terms, detached copies still on the device
        (copies: under --compile_mode reduce-overhead the compiled graph's outputs are overwritten by the next step)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if alpha != self._alpha_value:
            self.alpha.fill_(alpha)  # a kernel with the value as its argument: no copy from the host to wait for
            self._alpha_value = alpha
        with bf16_autocast(self.device, self.amp):
            terms = self.forward_loss(batch.sc_views, batch.sc_labels, batch.ce_images, batch.ce_labels, self.alpha)
        self.optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        self.optimizer.step()
        return losses.LossTerms(*(t.detach().clone() for t in terms))

    def _forward_loss(self, sc_views: Optional[torch.Tensor], sc_labels: Optional[torch.Tensor],
                      ce_images: torch.Tensor, ce_labels: torch.Tensor, alpha: torch.Tensor) -> losses.LossTerms:
        """The step's forward: both branches through the model, then the hybrid loss (compiled whole by --compile
        on one process)."""
        fmt = self.memory_format
        if self.feature_branch:
            n_views = sc_views.shape[0]  # 2B
            out = self.model(torch.cat([sc_views, ce_images]).contiguous(memory_format=fmt),
                             split=self.cfg.bn_split(n_views))
            projections, logits = out.projections[:n_views], out.logits[n_views:]  # [2B, D], [B, C]
        else:
            projections, logits = None, self.model(ce_images.contiguous(memory_format=fmt)).logits
        return self.criterion(projections, sc_labels, logits, ce_labels, alpha, prototypes=self.net.prototypes)

    def confusion(self, images: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
        if self.dist.enabled:  # batch-norm running statistics drift apart per process: evaluate rank 0's
            # (Training is unchanged by it only because DDP's broadcast_buffers, on by default, gives every process
            # rank 0's buffers at each forward anyway: with it off, this would change the other processes' training.)
            for buffer in self.net.buffers():
                torch.distributed.broadcast(buffer, 0)
        with self.eval_mode():
            return test_confusion(self.net, images, labels, mean=self.mean, std=self.std,
                                  num_classes=self.num_classes, amp=self.amp, channels_last=self.channels_last,
                                  dist=self.dist)

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features [N, 64], projections [N, D]) of uint8 images in eval mode, on the device (see embed)."""
        with self.eval_mode():
            return embed(self.net, images, mean=self.mean, std=self.std, amp=self.amp,
                         channels_last=self.channels_last)

    @contextlib.contextmanager
    def eval_mode(self):
        """The network in eval mode (running batch-norm statistics) for the block, in training mode again after it,
        also when the block raises: evaluations happen between training epochs."""
        self.net.eval()
        try:
            yield
        finally:
            self.net.train()

    def params_finite(self) -> bool:
        return bool(torch.stack([p.detach().isfinite().all() for p in self.net.parameters()]).all())


# ----------------------------------------------------------------------------------------------- the run


class Stop(Exception):
    """Ends a run early with a message and an exit code (signals, divergence)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class SignalFlag:
    """SIGINT / SIGTERM ask the loop to stop after the current step; a second one stops at once (KeyboardInterrupt,
    `second` its number), unless it came within 2 s of the first (torchrun relays a Ctrl-C its processes got from
    the terminal too). `announce(signum)`, where given, is called at the first one (Run's decides there what the run
    does now, and says it)."""

    def __init__(self, announce: Optional[Callable[[int], None]] = None):
        self.signum = self.second = 0
        self.first_at = 0.0
        self.previous = {}
        self.announce = announce

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()

    def _handle(self, signum, frame) -> None:
        if not self.signum:
            self.signum, self.first_at = signum, time.monotonic()
            if self.announce is not None:
                try:
                    self.announce(signum)
                except Exception:  # noqa: BLE001 - (a closed stderr, say): the stop itself must not fail
                    pass
        elif time.monotonic() - self.first_at > 2.0:  # a second signal, not torchrun relaying the first one
            self.restore()
            self.second = signum
            raise KeyboardInterrupt


class RunState:
    """Everything about the run's progress that a checkpoint must carry besides the model and optimiser."""

    def __init__(self):
        self.epoch = 0  # epoch of the next step to run (0-based)
        self.step = 0  # step within that epoch
        self.best_top1 = -1.0
        self.best_epoch = 0
        self.best_metrics: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []
        # [4] tensor: this process's total, feature, ce, steps of the current epoch (mid-epoch resume). A checkpoint
        # holds every process's, [world_size, 4] (Run.every_rank_sums; [4] in those written before).
        self.epoch_sums = None
        self.train_time = 0.0
        self.train_samples = 0
        # train_time and train_samples when the current epoch began, so that an epoch's rate counts the steps timed
        # before a stop in it too; -1: not known (a checkpoint written before they were saved).
        self.epoch_start_time = -1.0
        self.epoch_start_samples = -1
        self.wall_time = 0.0
        # One entry per session (Run.session): each that trained (the first start, each resume that ran a step),
        # where it began (epoch, step) and how it ran (amp, channels_last, world_size, device, eval_every, sync_bn,
        # compile, the commit and torch), so that a run resumed another way says so (results.json: "mixed",
        # mixed_setting); and each that only evaluated a trained run again ("evaluated_only": True).
        self.sessions: list[dict[str, Any]] = []

    def state_dict(self) -> dict[str, Any]:
        d = dict(vars(self))
        d["epoch_sums"] = None if self.epoch_sums is None else self.epoch_sums.cpu()
        return d

    def load_state_dict(self, d: dict[str, Any], device: torch.device, rank: int = 0, world_size: int = 1) -> None:
        """Raises TypeError naming the entry when one is not of the kind a run writes (a damaged or foreign
        checkpoint), before anything is set; entries a checkpoint lacks keep their start values. Of the epoch
        sums, this process (`rank` of `world_size`) takes its own row when the checkpoint has one per process;
        saved by another number of processes, rank 0 takes their total scaled by world_size / (the saved number)
        and the others start at zero: every process counts each step it runs, so a saved step then weighs as much
        in the epoch's mean loss as one run after the resume (not bitwise: summed in another order)."""
        fresh = vars(RunState())
        for k, v in d.items():
            start = fresh.get(k)
            if k == "epoch_sums":
                ok = v is None or (isinstance(v, torch.Tensor) and v.dtype.is_floating_point
                                   and (tuple(v.shape) == (4,) or (v.dim() == 2 and v.shape[0] >= 1
                                                                   and v.shape[1] == 4)))
            elif k == "sessions":
                ok = isinstance(v, list) and all(_session_entry_ok(entry) for entry in v)
            elif isinstance(start, (bool, int, float)):  # int counters, float times and accuracies
                ok = _is_number(v, numbers.Integral if isinstance(start, int) else numbers.Real)
                if ok and isinstance(v, float) and not math.isfinite(v):  # a NaN best_top1: never beaten
                    raise TypeError(f"its run entry {k!r} is {v}, not a finite number")
            else:
                ok = start is None or isinstance(v, type(start))
            if not ok:
                raise TypeError(f"its run entry {k!r} is " + ("not a list of sessions" if k == "sessions" and
                                                               isinstance(v, list) else f"a {type(v).__name__}"))
        for k, v in d.items():
            setattr(self, k, v)
        sums = self.epoch_sums
        if sums is not None:
            if sums.dim() == 2 and sums.shape[0] == world_size:
                sums = sums[rank]
            else:
                saved_by = sums.shape[0] if sums.dim() == 2 else 1
                sums = (sums.reshape(-1, 4).sum(0) * (world_size / saved_by) if rank == 0
                        else torch.zeros(4, dtype=sums.dtype))
            self.epoch_sums = sums.to(device)


def _is_number(value: Any, kind: type = numbers.Real) -> bool:
    """A number of `kind` as JSON and checkpoints hold them: True and False are not numbers here."""
    return isinstance(value, kind) and not isinstance(value, bool)


def _is_count(value: Any, least: int) -> bool:
    return _is_number(value, numbers.Integral) and value >= least


def _session_entry_ok(entry: Any) -> bool:
    """An entry of RunState.sessions as Run.session writes it (or Run.earlier_session, with what is unknown None)."""
    return (isinstance(entry, dict) and _is_count(entry.get("epoch"), 0) and _is_count(entry.get("step"), 0)
            and all(entry.get(k) is None or type(entry.get(k)) is bool for k in ("amp", "channels_last", "sync_bn"))
            and (entry.get("eval_every") is None or _is_count(entry["eval_every"], 1))
            and (entry.get("compile") is None or entry.get("compile") is False or entry.get("compile") in COMPILE_MODES)
            and type(entry.get("evaluated_only", False)) is bool  # (only a session that trained no step has one)
            and (entry.get("first_step_s") is None or _is_number(entry["first_step_s"]) and entry["first_step_s"] >= 0)
            and (entry.get("world_size") is None or _is_count(entry.get("world_size"), 1))
            and all(entry.get(k) is None or isinstance(entry.get(k), str) for k in ("device", "git_commit",
                                                                                   "torch_version")))


# Settings of a session (Run.session) that its evaluation of a trained run does not depend on: the number of
# processes and whether batch norm was synchronised across them (batch norm in eval mode, the test set's counts
# summed), --eval_every (the last epoch is always evaluated) and --compile (evaluation runs the bare network).
NOT_IN_AN_EVALUATION = ("world_size", "sync_bn", "eval_every", "compile")


def trained_with(sessions: list[Any], key: str) -> set[Any]:
    """The values of `key` (amp, channels_last, compile, world_size, sync_bn, eval_every) that the sessions of a run
    (RunState.sessions) recorded. A session that only evaluated counts for the precision and layout, which its
    results came from, not for the settings of NOT_IN_AN_EVALUATION."""
    return {s[key] for s in sessions
            if s.get(key) is not None and not (key in NOT_IN_AN_EVALUATION and s.get("evaluated_only"))}


def mixed_setting(state: RunState, key: str, now: Any) -> Any:
    """The value of `key` the run's sessions ran with, or "mixed" where they ran with several (a run resumed with
    --no-amp, or under torchrun with another number of processes): its results came from both. `now`, this
    session's, where none recorded one."""
    values = trained_with(state.sessions, key)
    return "mixed" if len(values) > 1 else next(iter(values), now)


def after_the_second_of_an_earlier_file(out: Path) -> None:
    """Returns once the clock has left the second that an events file in `out` is named after. TensorBoard reads a
    folder's event files in name order, events.out.tfevents.<second>.<host>.<pid>.<n>, and that order is the
    sessions' only where the seconds differ: the pid and n are not zero-padded (.10 sorts before .9), so a writer
    started in the same second as an earlier one (a session cut off at once and resumed, runs in one process) could
    come first and its purge of the earlier records would not apply to them."""
    now = int(time.time())
    try:
        same_second = any(name.startswith(f"{EVENTS_PREFIX}{now:010d}.") for name in os.listdir(out))
    except OSError:  # (no folder to list: the writer makes it, and says what fails)
        return
    if same_second:
        time.sleep(max(now + 1 - time.time(), 0.0) + 0.01)


class EventWriter:
    """The run's TensorBoard SummaryWriter, whose failed writes (a full disk, the folder removed) stop the run with
    one line naming the folder, as a failed checkpoint write does, instead of TensorBoard's tracebacks (one from
    its writer thread, one from the next write); the checkpoints written so far are kept."""

    def __init__(self, out: Path, purge_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.out = out
        after_the_second_of_an_earlier_file(out)
        self.previous_hook = threading.excepthook  # until close(); from before the writer thread starts
        threading.excepthook = self.writer_thread_failed
        try:
            self.writer = self.guarded(SummaryWriter, str(out), purge_step=purge_step)
        except BaseException:
            threading.excepthook = self.previous_hook
            raise

    def writer_thread_failed(self, args: Any) -> None:
        """The writer thread's OSError is raised again by the next write or close, which says it in one line."""
        if not (isinstance(args.exc_value, OSError) and "tensorboard" in type(args.thread).__module__):
            self.previous_hook(args)

    def failure(self, e: OSError) -> str:
        return f"could not write TensorBoard events in {self.out}: {e.strerror or e}"

    def guarded(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return call(*args, **kwargs)
        except OSError as e:
            raise UserError(f"{self.failure(e)}; the checkpoints written so far are kept (--resume continues the "
                            f"run)") from e

    def __getattr__(self, name: str) -> Any:  # add_scalar, add_image, add_embedding, ...
        if name in ("writer", "out", "previous_hook"):  # not set yet (a copy, say): no recursion through here
            raise AttributeError(name)
        method = getattr(self.writer, name)
        return (lambda *args, **kwargs: self.guarded(method, *args, **kwargs)) if callable(method) else method

    def add_summary(self, summary: Any) -> None:
        """A summary protobuf as it is (SummaryWriter.add_hparams's records, without its subfolder)."""
        self.guarded(lambda: self.writer._get_file_writer().add_summary(summary))

    def close(self) -> Optional[str]:
        """Flush and close: None, or why that failed (to be said only where nothing else ended the run)."""
        try:
            self.writer.close()
            return None
        except OSError as e:
            return self.failure(e)
        finally:
            if threading.excepthook == self.writer_thread_failed:
                threading.excepthook = self.previous_hook


def resolve_output_dir(cfg: Config) -> Path:
    return Path(cfg.output_dir or cfg.default_output_dir())


RUN_FILES = ("config.json", "last.pt", "best.pt", "results.json")
EVENTS_PREFIX = "events.out.tfevents."  # TensorBoard's event files
# TensorBoard's projector files of a finished run: the config, and <global step, 5+ digits>/<tag>/*.tsv.
PROJECTOR_CONFIG, PROJECTIONS_TAG = "projector_config.pbtxt", "test_projections"


def holds_run(out: Path) -> bool:
    return out.is_dir() and any((out / f).exists() for f in RUN_FILES)


def tags_logged_at(out: Path, step: int) -> set[str]:
    """The TensorBoard tags (scalars, images) that the event files in `out` hold a record of at `step`, as
    TensorBoard shows them (files in name order, a record purged by a later writer's start gone): those an earlier
    session wrote there before it stopped. A file or record that cannot be read holds none."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    tags = set()
    for path in sorted(out.glob(f"{EVENTS_PREFIX}*")):
        if not path.is_file():  # a pipe would wait for a writer
            continue
        try:
            for event in EventFileLoader(str(path)).Load():  # (stops at a record cut off, as by a kill)
                if event.session_log.status == event.session_log.START and event.step <= step:
                    tags.clear()  # a writer's purge_step: TensorBoard hides the earlier records from there on
                elif event.step == step:
                    tags.update(value.tag for value in event.summary.value)
        except Exception:  # noqa: BLE001 - damaged or unreadable (the loader's errors vary by version): not there
            continue
    return tags


def read_run_config(out: Path) -> tuple[Optional[dict[str, Any]], str]:
    """(the settings in `out`/config.json as main.py writes them: a JSON object with the run's loss, imb_factor and
    epochs, '') or (None, why not, in a few words): missing, not a regular file (a pipe would block the read),
    unreadable, or another tool's config.json."""
    path = out / "config.json"
    try:
        if not path.is_file():
            return None, "it is not a regular file"
        config = util.read_json(path)
    except OSError as e:
        return None, f"it cannot be read: {e.strerror or e}"
    except util.FileTooLarge as e:
        return None, str(e)
    except (ValueError, RecursionError):  # RecursionError: arrays or objects nested too deep for json.loads
        return None, "it is not JSON"
    if not isinstance(config, dict):
        return None, "it is not a JSON object"
    if not {"loss", "imb_factor", "epochs"} <= config.keys():
        return None, "it lacks the loss, imb_factor and epochs main.py writes there"
    return config, ""


def run_config(out: Path) -> Optional[dict[str, Any]]:
    """read_run_config's settings, or None."""
    return read_run_config(out)[0]


def holds_saved_state(folder: Path) -> bool:
    """Whether `folder` holds a file of a run's besides its config.json: a checkpoint or results."""
    return any((folder / f).exists() for f in RUN_FILES if f != "config.json")


def run_folders_in(out: Path) -> list[str]:
    """The names of the folders directly in `out` that hold a run of main.py's (a checkpoint, results or its
    config.json: not another tool's folder with a config.json of its own), sorted; [] where `out` cannot be listed
    (it does not exist yet, say)."""
    def is_run(folder: Path) -> bool:
        return holds_saved_state(folder) or run_config(folder) is not None

    try:
        with os.scandir(out) as entries:
            return sorted(e.name for e in entries if e.is_dir() and is_run(Path(e.path)))
    except OSError:
        return []


def config_text(config: dict[str, Any]) -> str:
    """A run's settings as it prints them at its start: JSON, one setting a line (a list, such as CIFAR-100's 100
    class sizes, on its line rather than one line a number as indent=2 would have it)."""
    items = [f"  {json.dumps(key)}: {json.dumps(value)}" for key, value in config.items()]
    return "{\n" + ",\n".join(items) + "\n}" if items else "{}"


def folder_recipe_differences(out: Path, cfg: Config) -> list[str]:
    """recipe_differences between the run in `out`, as its config.json says, and cfg; [] where config.json cannot
    be read (the checkpoint, read on --resume, judges then)."""
    config = run_config(out)
    try:
        return [] if config is None else recipe_differences(config, cfg)
    except (TypeError, ValueError):
        return []


def folder_for_differences(out: Path, differences: list[str]) -> Path:
    """A folder beside the default folder `out` for a run that differs from the one in it by recipe_differences'
    `differences` ('--temp 0.1 -> 0.2'): out's name with each flag and its new value (runs/..._s0_temp0.2)."""
    parts = []
    for difference in differences[:3]:
        flag, _, now = difference.partition(" ")
        value = now.rpartition(" -> ")[2]
        value = "none" if value in ("''", "(not given)") else re.sub(r"[^A-Za-z0-9.+-]+", "-", value).strip("-")
        parts.append(flag.removeprefix("--") + value)
    return out.parent / "_".join([out.name, *parts])


def unwritable(folder: Path, what: str) -> str:
    """Why `folder` cannot be written in (os.access said so): a read-only file system, or no permission."""
    try:
        read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):  # (no statvfs on Windows)
        read_only = False
    return f"{folder} is on a read-only file system" if read_only else f"no permission to {what} in {folder}"


def check_output_dir(cfg: Config, out: Path) -> None:
    """Refuse to mix two runs in one folder, or a run and the data; fail before anything is written."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out} exists and is not a folder")
    where = Path(os.path.realpath(out))
    image_splits = data.IMAGE_FOLDER_SPLITS if data.image_folders_read(cfg.dataset, cfg.data_root) else ()
    for split in image_splits:  # the run's folders (its projections) would be read as classes or images
        images = Path(os.path.realpath(Path(cfg.data_root).expanduser() / split))
        if where == images or images in where.parents:
            raise UserError(f"--output_dir {out} is inside {Path(cfg.data_root) / split}, image folders of --data_root: "
                            f"the run's own folders and files would then be read as data; put it elsewhere")
    if not out.exists() and not cfg.resume:  # a new folder: where it would be made (a dry run makes none)
        parent = Path(os.path.abspath(out))
        while not os.path.lexists(parent) and parent != parent.parent:
            parent = parent.parent
        if os.path.islink(parent) and not parent.exists():  # a link to an unmounted disk, say
            raise UserError(f"cannot prepare output folder {out}: {parent} is a broken symbolic link")
        if not parent.is_dir():
            raise UserError(f"cannot prepare output folder {out}: {parent} is not a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise UserError(f"cannot prepare output folder {out}: {unwritable(parent, 'create folders')}")
    elif out.is_dir() and not cfg.resume and not os.access(out, os.W_OK | os.X_OK):  # else the run fails at its first
        # file, config.json (a resume may find a finished run, read-only in an archive, which it only checks)
        raise UserError(f"cannot write in output folder {out}: {unwritable(out, 'write')}")
    has_run = holds_run(out)
    if has_run and not cfg.resume and (out / "config.json").is_file() and not holds_saved_state(out):
        config, why_not = read_run_config(out)  # a config.json alone: another program's, where not main.py's
        if config is None:
            raise UserError(f"{out / 'config.json'} is not a run's ({why_not}; another program's?), and a run would "
                            f"replace it: give this run its own --output_dir, or move that file away")
    if not has_run and not cfg.resume:
        inside = run_folders_in(out)
        if inside:  # a sweep's --runs_dir given as a run's folder: this run's files would sit among its runs
            shown = ", ".join(inside[:3]) + (f" and {len(inside) - 3} more" if len(inside) > 3 else "")
            raise UserError(f"--output_dir {out} holds run folders ({shown}), so it is not a run's own folder: give "
                            f"this run a folder of its own (e.g. {out / 'my_run'})")
    if cfg.resume and (out / "last.pt").is_file() or not cfg.resume and (not has_run or cfg.overwrite):
        return
    # No last.pt to resume from: say what the folder holds instead, and the way out.
    if cfg.resume and (out / "last.pt").exists():
        raise UserError(f"--resume: {out / 'last.pt'} is not a file (a folder or a pipe, say), so not a "
                        f"checkpoint to resume from: move it away")
    if not has_run:
        raise UserError(f"--resume: no checkpoint {out / 'last.pt'} to resume from")
    instead = "pass --overwrite instead of --resume" if cfg.resume else "pass --overwrite"
    if (out / "last.pt").exists():  # a plain rerun of a run that can be continued, or another run's folder
        other = folder_recipe_differences(out, cfg)
        if other:  # (a test run with --epochs 2 in the default folder of the paper's run, say)
            offered = None if cfg.output_dir else folder_for_differences(out, other)
            named = f" (e.g. --output_dir {offered})" if offered and not offered.exists() else ""
            raise UserError(f"{out} already holds another run, made with other settings ({', '.join(other)}): give "
                            f"this run its own --output_dir{named}, or --overwrite to replace that one")
        raise UserError(f"{out} already holds a run; pass --resume to continue it or --overwrite to start again")
    if (out / "results.json").exists():  # a finished run whose last.pt was deleted
        raise UserError(f"{out} holds a finished run (results.json) whose last.pt was deleted, so it can be neither "
                        f"continued nor checked: use another --output_dir (--overwrite would delete its results)")
    if (out / "best.pt").exists():  # (a run writes last.pt before best.pt: this one's last.pt was removed)
        raise UserError(f"{out} holds a run's best.pt but no last.pt (deleted, or lost), so it cannot be resumed: "
                        f"move the folder away to keep best.pt, or {instead} to start again (which deletes it)")
    # A run that left no checkpoint and no results (it failed, diverged or was killed before its first checkpoint).
    prefix = "--resume: " if cfg.resume else ""
    raise UserError(f"{prefix}{out} {'holds' if cfg.resume else 'already holds'} a run that saved no checkpoint "
                    f"(last.pt) to resume from; {instead} to start {'it ' if cfg.resume else ''}again")


# sysexits.h's EX_TEMPFAIL: the run folder is in use by another process; the same command may succeed later.
# scripts/sweep.sh lists such a run as BUSY, not FAILED.
EXIT_IN_USE = 75
# The lock file of a file system where a folder cannot be locked (FolderLock).
LOCK_FILE = ".lock"


class FolderInUse(UserError):
    """Another process holds the run folder's lock (FolderLock)."""

    exit_code = EXIT_IN_USE


class FolderLock:
    """An exclusive lock on the run folder, which rank 0 takes from before it reads the folder's state (main(): an
    existing folder) or as it creates the folder (prepare_output_dir), until main() returns: a second main.py on the
    same folder (say from a second sweep over the same --runs_dir, which would start a run still going with
    --overwrite, or resume it beside itself) stops with one line and EXIT_IN_USE before it deletes or writes
    anything.

    flock on the folder itself: no file left behind, released by the kernel however the process ends. Linux's NFS
    client turns flock into a lock of the server's (so it holds across machines), which an exclusive lock asks of a
    file open for writing, and a folder cannot be opened so (EBADF): where the folder's flock fails other than by
    being held, the lock is that of a file in it, LOCK_FILE, opened read-write (and left there: removing it would let
    a process that opened it just before lock a file no longer in the folder). A file system with no flock at all
    gets no lock."""

    def __init__(self) -> None:
        self.fd: Optional[int] = None

    def acquire(self, out: Path, create: bool = True) -> None:
        """create=False (a dry run): no lock file is made; where none exists, nobody holds one."""
        if self.fd is not None or fcntl is None:
            return
        try:
            folder = os.open(out, os.O_RDONLY | os.O_DIRECTORY)  # (a pipe's open would wait for a writer)
        except OSError:  # no folder yet (prepare_output_dir locks it once made), or not a folder: said later
            return
        try:
            try:
                self.fd = _flock(folder)
            except BlockingIOError:
                raise
            except OSError:  # the folder cannot be locked so (NFS)
                self.fd = _flock(self._open_lock_file(out / LOCK_FILE, create))
        except BlockingIOError:
            raise FolderInUse(f"{out} is in use by another process training this run (a second main.py on the same "
                              "folder, say from a second sweep over the same --runs_dir); wait for it to end, or use "
                              "another --output_dir") from None
        except OSError:  # no flock here at all, or a folder that cannot be written: unlocked, as before
            pass

    @staticmethod
    def _open_lock_file(path: Path, create: bool) -> int:
        """LOCK_FILE opened read-write (made where `create`); where it is there but not a file (a folder, a socket,
        a pipe), one line: passed over, as a file system without flock is, it would leave the run unlocked without
        a word on a file system that locks."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | (os.O_CREAT if create else 0), 0o644)
        except OSError as e:  # (a folder: EISDIR; a socket: ENXIO on Linux, EOPNOTSUPP on BSDs; a link loop: ELOOP)
            if e.errno == errno.ENOENT or not os.path.lexists(path) or os.path.isfile(path):
                raise
            fd = None
        if fd is None or not stat.S_ISREG(os.fstat(fd).st_mode):
            if fd is not None:
                os.close(fd)
            raise UserError(f"cannot lock the run folder {path.parent}: {path.name} there is not a file (a folder, a "
                            f"pipe or a socket), and this file system locks a run through that file: move it away")
        return fd

    def release(self) -> None:
        """At the process's end the kernel would; but main() may be called again in one process (the tests do),
        and a second lock on the folder would find this one."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _flock(fd: int) -> int:
    """`fd`, now holding an exclusive flock; else closed, and the OSError raised (BlockingIOError: another open file
    holds one)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise
    return fd


def prepare_output_dir(out: Path, overwrite: bool, lock: Optional[FolderLock] = None,
                       cfg: Optional[Config] = None) -> None:
    """Create the run folder, lock it (unless the lock holds it already) and remove what a new run or a resume
    must not find there. A lock taken only now (the folder did not exist when main() looked) comes after
    check_output_dir passed on a missing folder: another process may have run there meanwhile and ended, so with
    `cfg` the check is made again, now that nobody else can change the folder."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot prepare output folder {out}: {e.strerror or e}") from e
    if lock is not None and lock.fd is None:
        lock.acquire(out)
        if cfg is not None and lock.fd is not None:
            check_output_dir(cfg, out)
    try:
        stale = [p.name for p in out.glob(".*.tmp")]  # left by a process killed while writing a checkpoint
        if overwrite:  # only this project's files: anything else the user keeps there stays
            stale += list(RUN_FILES) + [PROJECTOR_CONFIG] + [p.name for p in out.glob(EVENTS_PREFIX + "*")]
            folders = [name for name in stale if (out / name).is_dir() and not (out / name).is_symlink()]
            if folders:  # checked before any is removed: the unlink of a folder fails halfway through the others
                raise UserError(f"cannot overwrite the run in {out}: {', '.join(folders)} "
                                f"{'is a folder' if len(folders) == 1 else 'are folders'}, not the file a run "
                                f"leaves there; move {'it' if len(folders) == 1 else 'them'} away")
            for projections in out.glob(f"[0-9][0-9][0-9][0-9][0-9]*/{PROJECTIONS_TAG}"):
                shutil.rmtree(projections)
                if not any(projections.parent.iterdir()):
                    projections.parent.rmdir()
        for name in stale:
            (out / name).unlink(missing_ok=True)
    except OSError as e:
        raise UserError(f"cannot prepare output folder {out}: {e.strerror or e}") from e


# Training settings added after runs had been saved, with what the code did before each existed: a
# checkpoint or run without one was made with that value (scripts/summarize.py keeps the same table).
FLAGS_ADDED_LATER = MappingProxyType({"gray_prob": data.GRAY_PROB, "base_temp": None, "bn_stats": "joint",
                                      "sc_aug": "paper", "alpha_schedule": "parabolic"})
COMPARED_ON_RESUME = ("dataset", "imb_type", "imb_factor", "data_seed", "sc_sampler", "ce_sampler", "gray_prob",
                      "sc_aug", "loss", "model", "feat_dim", "temp", "base_temp", "psc_temp", "psc_denominator",
                      "bn_stats", "alpha_schedule", "batch_size", "learning_rate", "momentum", "weight_decay",
                      "epochs", "lr_decay_epochs", "lr_decay_rate", "warm_epochs", "seed")
# Settings that only some losses read (scripts/summarize.py keeps the same table): a run of another loss is
# the same run whatever they say, so they neither block its resume nor split its row in a summary.
USED_BY = MappingProxyType({"sc_sampler": ("sc", "psc"), "temp": ("sc",), "base_temp": ("sc",),
                            "psc_temp": ("psc",), "psc_denominator": ("psc",), "bn_stats": ("sc", "psc"),
                            "sc_aug": ("sc", "psc"), "alpha_schedule": ("sc", "psc")})


def unread_settings(cfg: Config) -> list[str]:
    """The flags given a value other than their default that the run's loss does not read (USED_BY)."""
    defaults = {f.name: f.default for f in dataclasses.fields(Config)}
    return [name for name, losses_ in USED_BY.items()
            if cfg.loss not in losses_ and getattr(cfg, name) != defaults[name]]


def as_compared(settings: dict[str, Any]) -> dict[str, Any]:
    """`settings` as a resume compares them, where two values are one recipe (scripts/summarize.py counts them so
    too): a --base_temp equal to its --temp as not given (the SC loss's factor temp / base_temp is 1 either way),
    and --psc_temp not given as the dataset's default it resolves to."""
    settings = dict(settings)
    if settings.get("base_temp") is not None and settings.get("base_temp") == settings.get("temp"):
        settings["base_temp"] = None
    if "psc_temp" in settings and settings["psc_temp"] is None:
        dataset = settings.get("dataset")  # a damaged checkpoint's may be anything: no default, so it differs
        settings["psc_temp"] = PSC_TEMPERATURES.get(dataset) if isinstance(dataset, str) else None
    return settings


def recipe_differences(config: dict[str, Any], cfg: Config, keys=COMPARED_ON_RESUME) -> list[str]:
    """'--flag then -> now' for each of `keys` (those cfg's loss reads) where a run's saved `config` (a checkpoint's
    or config.json's) and cfg differ as a resume compares them (as_compared)."""
    now = dataclasses.asdict(cfg)
    keys = [k for k in keys if cfg.loss in USED_BY.get(k, (cfg.loss,))]  # --loss itself is among them
    then = {k: config.get(k, FLAGS_ADDED_LATER.get(k)) for k in keys}
    same_then, same_now = as_compared(then), as_compared(now)  # compared so; said as given

    def said(k: str) -> tuple[str, str]:  # as flags take them; as Python values where those read alike
        then_text, now_text = flag_text(then[k]), flag_text(now[k])
        return (repr(then[k]), repr(now[k])) if then_text == now_text else (then_text, now_text)

    return [f"--{k} {' -> '.join(said(k))}" for k in keys
            if same_then[k] != same_now[k] and then[k] != now[k]]  # (the same --base_temp at another --temp: --temp)


def check_compatible(saved: dict[str, Any], cfg: Config, path: Path, num_classes: int, keys=COMPARED_ON_RESUME):
    """A checkpoint must come from the same model and class count (and, to resume, the same recipe). Every recipe
    flag that differs is named in one message (--model and --dataset among them), before the model check, which
    then catches only a class count that its config's dataset does not explain (a checkpoint of other code)."""
    diff = recipe_differences(saved["config"], cfg, keys)
    if diff:
        raise UserError(f"checkpoint {path} was made with other settings: {', '.join(diff)} "
                        f"(give these flags the checkpoint's values to use it)")
    model = saved["config"].get("model")  # none recorded (other code): loading the weights judges the model
    count = saved.get("num_classes")
    if count != num_classes or model not in (None, cfg.model):
        count_text = count if _is_number(count, numbers.Integral) else repr(count)  # '10' in a damaged one
        raise UserError(f"checkpoint {path} is a {model or 'network of no recorded model'} with "
                        f"{count_text} classes; this run is a {cfg.model} with {num_classes} (set "
                        f"--model / --dataset)")


def check_same_data(saved: dict[str, Any], class_counts: list[int], path: Path, digest: Optional[str] = None) -> None:
    """A checkpoint continues or is evaluated only on the long-tailed training set it was trained on, as far as
    its class sizes tell, and with `digest` (to resume) as far as its images' digest tells (ArraySplit.digest;
    a checkpoint without them, from before they were saved, is taken at its word)."""
    if list(saved.get("class_counts", class_counts)) != list(class_counts):
        then, now = list(saved["class_counts"]), list(class_counts)
        if max(len(then), len(now)) <= 10:  # CIFAR-10's sizes read well in full
            then_text, now_text = f"{then} images per class", str(now)
        else:  # CIFAR-100's would be two lines of 100 numbers
            def sizes(counts: list[int]) -> str:
                return f"{sum(counts):,} images in {len(counts)} classes ({counts[0]} down to {counts[-1]})"
            then_text, now_text = sizes(then), sizes(now)
        raise UserError(f"{path} was trained on {then_text}, but the data under --data_root gives {now_text} at "
                        f"its imbalance settings: not the data it was trained on")
    if digest is not None and saved.get("train_digest", digest) != digest:
        raise UserError(f"{path} was trained on other images than those --data_root gives (the same class sizes, "
                        f"other pixels or labels: another copy of the dataset, or JPEG files decoded by another "
                        f"libjpeg?): not the data it was trained on")


# What a checkpoint that passed load_checkpoint and check_compatible raises on use when it is damaged or was
# written by other code (a missing entry, an entry of another type, a tensor of another shape).
FOREIGN_CHECKPOINT_ERRORS = (KeyError, TypeError, ValueError, AttributeError, RuntimeError)


# Below this, a feature-loss temperature is named in a divergence's advice: its logits, similarity / temperature, reach
# a thousand and more (SupContrast and the paper use 0.07 to 1).
SMALL_TEMPERATURE = 1e-3
# The longest cause a foreign checkpoint's one-line error quotes: load_state_dict lists every missing and unexpected
# key (a ResNet-110's config beside a ResNet-8's weights made a line of 17,889 characters).
CAUSE_LIMIT = 300


def foreign_checkpoint(path: Path, e: Exception) -> UserError:
    cause = util.exception_text(e)
    if len(cause) > CAUSE_LIMIT:
        cause = f"{cause[:CAUSE_LIMIT].rstrip()} ... ({len(cause) - CAUSE_LIMIT:,} more characters)"
    return UserError(f"{path} does not hold what this program's checkpoints hold (damaged, or written by other "
                     f"code): {cause}")


def check_numerics_entries(saved: dict[str, Any]) -> None:
    """A checkpoint's `amp` and `channels_last` (how its run ran, which a resume and an evaluation follow:
    run_numerics) are booleans where present; TypeError otherwise."""
    for key in ("amp", "channels_last"):
        if not isinstance(saved.get(key, False), bool):
            raise TypeError(f"its {key!r} entry is a {type(saved[key]).__name__}")


def _finite(value: numbers.Real) -> bool:
    """math.isfinite, False for an int past float's range (which SGD could not multiply by) instead of raising."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def check_sgd_state(optimizer: torch.optim.Optimizer) -> None:
    """SGD's state as load_state_dict left it from a checkpoint, which that takes unchecked (a damaged one then
    fails in the first step, after the resume was announced): ValueError unless each group's hyper-parameters are
    numbers and each parameter's momentum buffer is absent or a floating-point tensor of its shape."""
    for group in optimizer.param_groups:
        for key in ("lr", "momentum", "dampening", "weight_decay"):
            if not (_is_number(group.get(key)) and _finite(group[key])):
                raise ValueError(f"its optimizer's {key} is {group.get(key)!r}, not a finite number")
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            buffer = state.get("momentum_buffer") if isinstance(state, dict) else state
            if buffer is not None and not (isinstance(buffer, torch.Tensor) and buffer.is_floating_point()
                                           and buffer.shape == param.shape):
                what = (f"not a tensor ({type(buffer).__name__})" if not isinstance(buffer, torch.Tensor)
                        else f"a {buffer.dtype} tensor" if not buffer.is_floating_point()
                        else f"of shape {list(buffer.shape)}")
                raise ValueError(f"its optimizer's momentum buffer for a parameter of shape {list(param.shape)} is "
                                 f"{what}")


DIRTY = "-dirty"  # after git_commit's hash where the checkout has uncommitted changes to tracked files


def git_commit() -> Optional[str]:
    """$GIT_COMMIT when the caller sets it (a copy of the tree on another machine may carry no .git, or a stale
    one: a lent GPU machine's copy once recorded the commit before the one it ran); else the checkout's commit
    (with "-dirty" for uncommitted changes to tracked files); else None."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        here = Path(__file__).resolve().parent
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if sha.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            return sha.stdout.strip() + (DIRTY if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    threads = torch.get_num_threads()
    return f"cpu ({plural(threads, 'thread')})"


SHOT_KEYS = ("top1", "many", "medium", "few")  # the accuracies a history entry, a summary and TensorBoard report


# TensorBoard's HParams tab: each run's recipe beside the last value of each of these scalars. Its table shows the
# first five settings at first, those marked as differing between runs first: the ones a sweep varies.
HPARAM_METRICS = ("test/top1", "test/best_top1", "test/many", "test/medium", "test/few", "test/ncm_top1")
HPARAMS_SWEPT = ("dataset", "imbalance_ratio", "imb_type", "loss", "seed")


def hparams_record(cfg: Config, world_size: int = 1) -> tuple[dict[str, Any], dict[str, Any]]:
    """(every recipe setting, those of them the run's loss reads) as TensorBoard hparams: the settings a resume
    compares (COMPARED_ON_RESUME) with the imbalance ratio first, defaults resolved (the PSC temperature, the SC
    base temperature), lists as text, and last the number of processes the run started with (batch norm's
    statistics are per process: summarize.py splits rows on it too). The HParams tab takes its columns from one
    run's experiment, so each run's lists every setting and runs of every loss share one table; a run's own values
    leave out what its loss does not read (USED_BY), as summarize.py does."""
    values = {**dataclasses.asdict(cfg), "imbalance_ratio": cfg.imbalance_ratio, "psc_temp": cfg.psc_temperature,
              "base_temp": cfg.temp if cfg.base_temp is None else cfg.base_temp, "world_size": world_size}
    every = {k: ",".join(map(str, values[k])) if isinstance(values[k], list) else values[k]
             for k in ("imbalance_ratio", *COMPARED_ON_RESUME, "world_size")}
    return every, {k: v for k, v in every.items() if cfg.loss in USED_BY.get(k, (cfg.loss,))}


def format_metrics(m: dict[str, Any]) -> str:
    groups = " / ".join("-" if m[k] is None else f"{m[k]:.2f}" for k in ("many", "medium", "few"))
    return f"top1 {m['top1']:.2f} (many / medium / few {groups})"


def ncm_line(ncm: dict[str, Any]) -> str:
    return f"nearest class mean on the backbone features (no classifier): {format_metrics(ncm)}"


def resume_point(cfg: Config, dist: Dist) -> tuple[Path, Optional[dict[str, Any]], bool]:
    """The run's folder, the checked last.pt to continue from (None unless --resume) and whether that run has
    finished already (trained cfg.epochs and wrote results.json). Read before any data, so that checking a
    finished run's settings takes a moment (a sweep checks every finished run this way)."""
    out = resolve_output_dir(cfg)
    if dist.main or cfg.resume:  # every process reads last.pt to resume: each says why it cannot, in one voice
        check_output_dir(cfg, out)
    if not cfg.resume:
        return out, None, False
    saved = util.load_checkpoint(out / "last.pt")
    check_compatible(saved, cfg, out / "last.pt", data.DATASETS[cfg.dataset])
    if not isinstance(saved.get("run"), dict) or type(saved["run"].get("epoch")) is not int:
        raise UserError(f"{out / 'last.pt'} holds no training state ('run'): it cannot be resumed")
    try:
        check_numerics_entries(saved)
    except TypeError as e:
        raise foreign_checkpoint(out / "last.pt", e) from e
    results = out / "results.json"
    if saved["run"]["epoch"] < cfg.epochs or not results.exists():
        return out, saved, False
    if not results.is_file():  # a folder, or a pipe that reading would wait on
        raise UserError(f"{results} is not a file, so not the run's results: move it away")
    problem = results_problem(results)
    if problem is None:
        return out, saved, True
    if dist.main:  # cut off, say, by a full disk before atomic writes: the run itself is whole in last.pt
        again = "the run would write it again" if cfg.dry_run else "it is written again"
        print(f"note: {results} cannot be read ({problem}); {again} from {out / 'last.pt'}", flush=True)
    return out, saved, False


# The accuracies every results.json main.py has written holds as numbers (with the run's identity besides, and
# more in later ones), which scripts/summarize.py reads.
RESULTS_CORE = ("best_top1", "last_top1", "many", "medium", "few")


def results_problem(path: Path) -> Optional[str]:
    """None where `path` holds a results.json as main.py writes them (a JSON object with the dataset and method, and
    RESULTS_CORE's accuracies as numbers: many, medium and few may be null where a run has no such class); else
    what is wrong with its content. A file that cannot be read at all is a UserError: writing it again would
    replace a file that may be whole."""
    try:
        record = util.read_json(path)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from e
    except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, or nested too deep for json.loads
        return util.exception_text(e)
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    def usable(key: str) -> bool:
        value = record.get(key)
        if key in ("dataset", "method"):
            return isinstance(value, str)
        if value is None:  # many / medium / few: null where the run has no class of that size
            return key in record and not key.endswith("top1")
        return _is_number(value)

    bad = [key for key in ("dataset", "method", *RESULTS_CORE) if not usable(key)]
    return f"no usable {', '.join(bad)}" if bad else None


def decays_within_warmup(cfg: Config, steps_per_epoch: int) -> list[int]:
    """The --lr_decay_epochs that begin at or before the warm-up's last step (util.learning_rate's)."""
    warm_steps = util.warmup_steps(cfg.warm_epochs, steps_per_epoch)
    return [e for e in cfg.lr_decay_epochs if e * steps_per_epoch < warm_steps]


def warmup_outlasts_run(cfg: Config, steps_per_epoch: int) -> bool:
    """Whether the lr warm-up is still below --learning_rate at the run's last step."""
    return util.learning_rate(cfg.epochs * steps_per_epoch - 1, base_lr=1.0, steps_per_epoch=steps_per_epoch,
                              warm_epochs=cfg.warm_epochs, decay_epochs=(), decay_rate=1.0) < 1.0


class Run:
    """One training run: data, trainer, logging, evaluation, checkpoints and results."""

    def __init__(self, cfg: Config, dist: Dist, device: torch.device, out: Path, saved: Optional[dict[str, Any]],
                 folder_lock: Optional[FolderLock] = None):
        """`out` and `saved` (the checked last.pt when resuming, else None) come from resume_point()."""
        self.cfg, self.dist, self.device, self.out = cfg, dist, device, out
        self.git_commit = git_commit() if dist.main else None  # the code this process runs, read once at start
        self.num_classes = data.DATASETS[cfg.dataset]
        # (resumed: the checkpoint fixed the dataset, as --eval_only's)
        train, test = load_data(cfg, saved, dist, device, dataset_of=None if saved is None else f"the run in {out}")
        train_lt, _ = data.long_tailed_subset(train, self.num_classes, cfg.imb_factor, cfg.imb_type, cfg.data_seed)
        self.train_digest = train_lt.digest()
        self.trainer = Trainer(cfg, train_lt, self.num_classes, device, dist, saved)
        self.test_images, self.test_labels = data.to_device_images(test, device)
        self.state = RunState()
        if saved is not None:
            self.load(saved)
        self.resume_notes = [numerics_note(cfg, device, saved), stream_device_note(device, saved),
                             device_note(self.state.sessions, device_name(device),
                                         evaluates_only=self.state.epoch >= cfg.epochs),
                             mixed_note(self.state.sessions, self.trainer.amp, dist.world_size,
                                        evaluates_only=self.state.epoch >= cfg.epochs, eval_every=cfg.eval_every,
                                        sync_bn=self.trainer.sync_bn, channels_last=self.trainer.channels_last,
                                        compile_mode=self.compile_entry()),
                             code_note(self.state.sessions, self.git_commit, torch.__version__)]
        self.writer = None
        self.folder_lock = folder_lock or FolderLock()  # rank 0's, released by main()
        self.signals = SignalFlag(self.announce_signal)
        self.signal_stops = False  # the first signal's verdict (announce_signal): agreed_signal() passes it on
        self.polling = False  # inside agreed_signal's all-reduce (torchrun): a first signal now is said after it
        self.poll_stops = 0  # what the last poll decided (announce_signal says a stop already decided as such)
        self.unsaid = 0  # a first signal that arrived while a poll was reducing: said once that poll decided
        self.ending_epoch = False  # inside end_epoch() of an epoch but the last (polls_left)
        self.first_step_s: Optional[float] = None
        self.last_metrics: Optional[dict[str, Any]] = None
        self.last_confusion: Optional[np.ndarray] = None
        self.last_ncm: Optional[tuple[int, dict[str, Any]]] = None  # (epoch, ncm_report) of the latest --ncm_every

    # -- checkpoints
    def checkpoint(self, epoch_sums: Optional[torch.Tensor] = None) -> dict[str, Any]:
        run = self.state.state_dict()
        if epoch_sums is not None:
            run["epoch_sums"] = epoch_sums.cpu()
        return {"model": self.trainer.net.state_dict(), "optimizer": self.trainer.optimizer.state_dict(),
                "run": run, "config": dataclasses.asdict(self.cfg),
                "num_classes": self.num_classes, "class_counts": self.trainer.class_counts,
                "train_digest": self.train_digest, "amp": self.trainer.amp, "channels_last": self.trainer.channels_last,
                "stream_device": self.device.type, "rng": util.rng_states(), "torch_version": str(torch.__version__)}

    def load(self, saved: dict[str, Any]) -> None:
        try:
            check_same_data(saved, self.trainer.class_counts, self.out / "last.pt", self.train_digest)
            self.trainer.net.load_state_dict(saved["model"])
            self.trainer.optimizer.load_state_dict(saved["optimizer"])
            check_sgd_state(self.trainer.optimizer)
            self.state.load_state_dict(saved["run"], self.device, self.dist.rank, self.dist.world_size)
            if not self.state.sessions and (self.state.epoch, self.state.step) != (0, 0):
                self.state.sessions = [self.earlier_session(saved)]
            steps = self.trainer.steps_per_epoch
            if not 0 <= self.state.epoch <= self.cfg.epochs or not 0 <= self.state.step <= steps:
                raise ValueError(f"its run entry is at epoch {self.state.epoch}, step {self.state.step}, outside "
                                 f"epochs 0..{self.cfg.epochs} and steps 0..{steps} of this run")
            util.set_rng_states(saved["rng"])
        except torch.cuda.OutOfMemoryError:  # a RuntimeError too, but the device's fault, not the checkpoint's
            raise
        except FOREIGN_CHECKPOINT_ERRORS as e:
            raise foreign_checkpoint(self.out / "last.pt", e) from e

    def earlier_session(self, saved: dict[str, Any]) -> dict[str, Any]:
        """What a checkpoint from before RunState.sessions tells of the sessions that made it: their precision and
        layout (the checkpoint's, that of the last), and the number of processes of the last one to start as far as
        the config.json it left beside the checkpoint says (None where unreadable)."""
        world_size = (run_config(self.out) or {}).get("world_size")
        return {"epoch": 0, "step": 0, "amp": saved.get("amp"), "channels_last": saved.get("channels_last"),
                "world_size": world_size if _is_count(world_size, 1) else None, "device": None, "git_commit": None,
                "torch_version": None}

    def session(self, epoch: int, step: int) -> dict[str, Any]:
        """This session's entry of RunState.sessions, from (`epoch`, `step`) on, with the code and torch it ran (a
        run resumed after a `git pull` or an upgrade was trained by more than one)."""
        return {"epoch": epoch, "step": step, "amp": self.trainer.amp, "channels_last": self.trainer.channels_last,
                "world_size": self.dist.world_size, "device": device_name(self.device), "git_commit": self.git_commit,
                "torch_version": str(torch.__version__), "eval_every": self.cfg.eval_every,
                "sync_bn": self.trainer.sync_bn, "compile": self.compile_entry()}

    def compile_entry(self) -> str | bool:
        """How this session's steps were compiled, as its session entry records it: the --compile_mode, or False."""
        return self.cfg.compile_mode if self.cfg.compile else False

    def tick_wall_time(self) -> None:
        now = time.perf_counter()
        self.state.wall_time += now - self.wall_mark
        self.wall_mark = now

    def save(self, name: str, epoch_sums: Optional[torch.Tensor] = None) -> None:
        """Rank 0 writes the checkpoint; `epoch_sums` (every_rank_sums()) replaces this process's own."""
        self.tick_wall_time()
        if self.dist.main:
            util.save_checkpoint(self.checkpoint(epoch_sums), self.out / name)

    def every_rank_sums(self) -> torch.Tensor:
        """The current epoch's loss sums of every process, [world_size, 4] (a collective under torchrun): each
        process sums its own part of the batch, and a mid-epoch checkpoint must give each its own back."""
        mine = self.state.epoch_sums
        if not self.dist.enabled:
            return mine[None]
        every = [torch.empty_like(mine) for _ in range(self.dist.world_size)]
        torch.distributed.all_gather(every, mine)
        return torch.stack(every)

    # -- the loop
    def config_record(self) -> dict[str, Any]:
        """config.json: the flags with what the run resolved from them (device, data, numerics)."""
        cfg, trainer = self.cfg, self.trainer
        return {**dataclasses.asdict(cfg), "output_dir": str(self.out), "git_commit": self.git_commit,
                "torch_version": str(torch.__version__), "device": device_name(self.device),
                "world_size": self.dist.world_size, "num_classes": self.num_classes, "class_counts": trainer.class_counts,
                "train_size": sum(trainer.class_counts), "amp": trainer.amp,
                "channels_last": trainer.channels_last, "psc_temperature": cfg.psc_temperature}

    def start_lines(self) -> list[str]:
        """What the run says before its first step: notes on flags that are legal but rarely meant, then the data,
        the device and the folder."""
        cfg, trainer = self.cfg, self.trainer
        lines = []
        hidden = hidden_gpu_note(cfg.device, self.device)
        if hidden:
            lines.append(hidden)
        unread = unread_settings(cfg)
        if unread:  # not an error: a sweep passes one set of flags to every method
            hint = "; PSC's temperature is --psc_temp" if cfg.loss == "psc" and "temp" in unread else ""
            lines.append(f"note: --loss {cfg.loss} does not read {', '.join('--' + name for name in unread)}; "
                         f"{'they change' if len(unread) > 1 else 'it changes'} nothing in this run{hint}")
        for note in (sync_bn_note(cfg, self.dist), *self.resume_notes):
            if note:
                lines.append(note)
        if warmup_outlasts_run(cfg, trainer.steps_per_epoch):  # legal (a short test run), but rarely meant
            lines.append(f"note: --warm_epochs {cfg.warm_epochs:g} is longer than the run of "
                         f"{plural(cfg.epochs, 'epoch')}: the lr never reaches --learning_rate {cfg.learning_rate:g}")
        if trainer.feature_branch and all(losses.hybrid_alpha(epoch, cfg.epochs, cfg.alpha_schedule) >= 1.0
                                          for epoch in range(cfg.epochs)):  # (--epochs 1, a smoke test)
            lines.append(f"note: under --alpha_schedule {cfg.alpha_schedule} alpha is 1 in every epoch of a run of "
                         f"{plural(cfg.epochs, 'epoch')}, which gives the classifier branch's loss no weight: its "
                         f"accuracy stays at chance (alpha falls from the second of two or more epochs)")
        early = decays_within_warmup(cfg, trainer.steps_per_epoch)
        if early:  # legal too: the warm-up then ramps to the decayed lr
            lines.append(f"note: --lr_decay_epochs {flag_text(early)} decay{'s' if len(early) == 1 else ''} the lr "
                         f"within the --warm_epochs {cfg.warm_epochs:g} warm-up, which then ramps up to "
                         f"{cfg.learning_rate * cfg.lr_decay_rate ** len(early):g}, never to --learning_rate "
                         f"{cfg.learning_rate:g}")
        lines.append(f"training {sum(trainer.class_counts)} images in {self.num_classes} classes "
                     f"(counts {trainer.class_counts[0]} .. {trainer.class_counts[-1]}), {trainer.steps_per_epoch} "
                     f"steps/epoch, device {device_name(self.device)}, output {self.out}")
        return lines

    def resumes_at(self) -> str:
        """Where a resume of the loaded checkpoint goes on: 'after step S of epoch E of T (N steps per epoch)' or
        'after epoch E of T'."""
        state, epochs = self.state, self.cfg.epochs
        if state.step:
            return (f"after step {state.step} of epoch {state.epoch + 1} of {epochs} "
                    f"({self.trainer.steps_per_epoch} steps per epoch)")
        return f"after epoch {state.epoch} of {epochs}"

    def best_note(self, dry_run: bool = False) -> tuple[Optional[str], bool]:
        """(note, mend) for a resumed run whose best.pt is not the checkpoint of its best epoch as last.pt's record
        has it (that epoch, best top-1 and history; (None, False) where it is, or where nothing was evaluated yet).
        mend: last.pt holds that epoch, so best.pt is written from it (a copy of the file): the run stopped between
        the two writes at that epoch's end (last.pt, then best.pt: Run.end_epoch). Otherwise the best epoch's
        weights were not kept (best.pt left by earlier code, which wrote it first, stopped between the two writes;
        or replaced), which the note says: the run's next new best replaces it."""
        state, last, best = self.state, self.out / "last.pt", self.out / "best.pt"
        if not state.best_epoch:
            return None, False
        if not best.exists():
            held = "is missing"
        else:
            try:
                run = util.load_checkpoint(best)["run"]
                found = (run["epoch"], run["best_top1"], run["history"])
            except UserError as e:  # a folder, damaged, or not a checkpoint
                held = f"cannot be used ({str(e).removeprefix(f'checkpoint {best} ').removeprefix(f'{best} ')})"
            except (KeyError, TypeError):
                held = "holds no run's state"
            else:
                if found == (state.best_epoch, state.best_top1, state.history[:state.best_epoch]):
                    return None, False
                held = f"holds epoch {found[0]}" if found[0] != state.best_epoch else \
                    f"holds epoch {found[0]} of another course of training (another top-1 or history)"
        best_is = f"the run's best is epoch {state.best_epoch} (top-1 {state.best_top1:.2f})"
        if not state.step and state.best_epoch == state.epoch:
            action = "would write" if dry_run else "writing"
            return (f"note: {best} {held}; {best_is}, which {last} holds (the run stopped between writing "
                    f"{last.name} and {best.name}): {action} it from {last}"), True
        return (f"note: {best} {held}; {best_is}, whose weights were not kept (a {best.name} left by earlier code, "
                f"which wrote it before {last.name}, stopped between the two; or replaced): the run's next new best "
                f"replaces it"), False

    def mend_best(self) -> None:
        """Says best_note's note, and writes best.pt from last.pt where that mends it."""
        note, mend = self.best_note()
        if note is None:
            return
        print(note, flush=True)
        if mend:
            util.write_checkpoint_bytes((self.out / "last.pt").read_bytes(), self.out / "best.pt")

    def dry_run(self) -> int:
        """--dry_run: everything up to the first step has passed; say what the run would do, and write nothing."""
        state, out = self.state, self.out
        if self.dist.main:
            print(config_text(self.config_record()), flush=True)
        for line in self.start_lines():
            self.log(line)
        if self.cfg.resume and state.epoch >= self.cfg.epochs:  # stopped after its last step, before results.json
            what = f"evaluate the trained run in {out} and write its results.json"
        elif self.cfg.resume:
            what = f"resume {out} {self.resumes_at()}"
        elif holds_run(out):  # with --overwrite, else check_output_dir refused it
            what = f"start again in {out}, deleting the run there"
        else:
            what = f"start a run in {out}"
        if self.cfg.resume and self.dist.main:
            note = self.best_note(dry_run=True)[0]
            if note:
                print(note, flush=True)
        self.log(f"dry run: would {what}; nothing written")
        return 0

    def run(self) -> int:
        cfg, dist = self.cfg, self.dist
        state, trainer = self.state, self.trainer
        try:
            if dist.main:
                prepare_output_dir(self.out, cfg.overwrite, self.folder_lock, cfg)
                config = self.config_record()
                print(config_text(config), flush=True)
                util.write_json(config, self.out / "config.json")
                self.writer = EventWriter(self.out, purge_step=state.epoch * trainer.steps_per_epoch + state.step + 1)
                if state.epoch == 0 and state.step == 0:  # a resume keeps the first start's (one session per run)
                    self.write_hparams("start")
            for line in self.start_lines():
                self.log(line)
            if dist.main and cfg.resume:
                self.mend_best()
            if (state.epoch, state.step) != (0, 0):  # a resume: where it goes on (the epoch lines start there)
                self.log(f"resuming {self.resumes_at()}" if state.epoch < cfg.epochs else
                         f"resuming a run that trained all its {plural(cfg.epochs, 'epoch')}: evaluating it and "
                         f"writing its results.json")
            self.signals.install()
            self.wall_mark = time.perf_counter()
            while state.epoch < cfg.epochs:
                self.train_epoch()
                # (polls_left: run() polls after end_epoch(), which moves state.epoch on, unless it ended the last)
                self.ending_epoch = state.epoch < cfg.epochs - 1
                self.end_epoch()
                self.ending_epoch = False
                signum = self.agreed_signal() if state.epoch < cfg.epochs else 0
                if signum:
                    self.stop(signum, state.epoch - 1)
            if self.last_metrics is None:  # trained to the end earlier, stopped before results.json was written
                state.sessions.append({**self.session(state.epoch, state.step), "evaluated_only": True})
                self.last_confusion = trainer.confusion(self.test_images, self.test_labels)
                self.last_metrics = util.accuracy_report(self.last_confusion, trainer.shot_groups)
                self.finish(evaluates_again=True)
            else:
                self.finish()
        except KeyboardInterrupt:  # a second signal (SignalFlag): what is on disk, and the way on
            if not self.signals.second:  # Python's own, before the handlers were installed: main() says it
                raise
            raise self.interrupted() from None
        finally:
            self.signals.restore()
            problem = None if self.writer is None else self.writer.close()
        if problem is not None:  # (only where the run finished: an error from the try goes on, and this is not said)
            print(f"warning: {problem}; the run finished and its results.json is complete, but its TensorBoard "
                  f"events may lack their last records", file=sys.stderr, flush=True)
        return 0

    def train_epoch(self) -> None:
        cfg, state, trainer, dist = self.cfg, self.state, self.trainer, self.dist
        from tqdm import tqdm
        epoch, steps = state.epoch, trainer.steps_per_epoch
        alpha = losses.hybrid_alpha(epoch, cfg.epochs, cfg.alpha_schedule) if trainer.feature_branch else 0.0
        if state.epoch_sums is None or state.step == 0:
            state.epoch_sums = torch.zeros(4, device=self.device)
        if state.step == 0:
            state.epoch_start_time, state.epoch_start_samples = state.train_time, state.train_samples
        since_log = torch.zeros(4, device=self.device)
        lr = trainer.lr_at(epoch * steps + max(state.step, 1) - 1)  # defined even when no step is left
        bar = tqdm(total=steps, initial=state.step, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=None if dist.main else True, dynamic_ncols=True)
        self.sync()
        t_log = t_epoch = time.perf_counter()
        steps_since_log = steps_in_epoch = 0
        for step, batch in zip(range(state.step, steps), trainer.stream.epoch(epoch, state.step)):
            global_step = epoch * steps + step
            lr = trainer.lr_at(global_step)
            timed = self.first_step_s is not None
            try:
                terms = trainer.step(batch, alpha, lr)
            except Exception as exc:  # torch.compile compiles in the first step: a missing compiler shows there
                if timed or not cfg.compile or not one_line_compile_failure(exc):
                    raise
                raise UserError(compile_failure_text(exc, saved_nothing=not (self.out / "last.pt").exists())) from exc
            if not timed:  # this process's first step: its one-off costs (torch.compile, allocator, cuDNN
                self.sync()  # autotuning) go to first_step_s, and the clocks restart after it
                self.first_step_s = time.perf_counter() - t_epoch
                state.sessions.append({**self.session(epoch, step), "first_step_s": self.first_step_s})
                t_log = t_epoch = time.perf_counter()
                if dist.main:  # now, not only in results.json: a run cut off later still shows it
                    bar.write(f"first step {self.first_step_s:.1f} s (one-off costs: "
                              f"{'torch.compile, ' if cfg.compile else ''}allocator, kernel selection)")
                    note = cudagraph_note(cfg, self.device)
                    if note:
                        bar.write(note)
                    sys.stdout.flush()
            step_sums = torch.stack([terms.total, terms.feature, terms.ce, torch.ones_like(terms.total)])
            state.epoch_sums += step_sums  # summed per step, so a resumed epoch adds up exactly as an unbroken one
            since_log += step_sums
            steps_since_log += timed
            steps_in_epoch += timed
            state.step = step + 1
            bar.update(1)
            at_log = state.step % cfg.print_freq == 0 or state.step == steps
            # A signal is acted on at the next step where it is polled: every step on one process and on CPUs
            # (under torchrun an all-reduce of one number, which costs a CPU nothing, while torchrun allows its
            # workers only 30 s after a SIGTERM before it kills them), at the logging intervals on CUDA with
            # several processes (reading the agreed flag waits for the device). The epoch's last step is not
            # polled: end_epoch() saves that one, then run() polls.
            polled = state.step < steps and (at_log or not self.polls_per_interval())
            signum = self.agreed_signal() if polled else 0
            if not at_log and not signum:
                continue
            # ---- the logging interval: the only host-device sync of the loop
            sums = all_reduce_sum(since_log.clone(), dist) / dist.world_size
            since_log.zero_()
            total, feat, ce, n = sums.tolist()
            now = time.perf_counter()
            # None for an interval of only this session's first step, which is not timed (its one-off costs)
            rate = steps_since_log * cfg.batch_size / max(now - t_log, 1e-9) if steps_since_log else None
            t_log, steps_since_log = now, 0
            if not math.isfinite(total):
                self.diverged(epoch, step)
            shown = {"alpha": f"{alpha:.3f}"} if trainer.feature_branch else {}  # (CE: no alpha, as below)
            bar.set_postfix(loss=f"{total / n:.3f}", **shown, lr=f"{lr:.4f}",
                            samples_s="-" if rate is None else f"{rate:.0f}")
            if self.writer is not None:
                scalars = [("loss/total", total / n), ("loss/ce", ce / n), ("train/lr", lr)]
                if trainer.feature_branch:  # a CE run has no feature loss and no alpha: no flat zero lines of them
                    scalars += [("loss/feature", feat / n), ("train/alpha", alpha)]
                if rate is not None:
                    scalars.append(("train/samples_per_s", rate))
                for tag, value in scalars:
                    self.writer.add_scalar(tag, value, global_step + 1)
            if signum:  # the epoch's steps so far count in the run's training time and samples (results.json)
                state.train_time += now - t_epoch
                state.train_samples += steps_in_epoch * cfg.batch_size
                self.stop(signum, epoch, step)
        bar.close()
        self.sync()
        elapsed = time.perf_counter() - t_epoch
        state.train_time += elapsed
        state.train_samples += steps_in_epoch * cfg.batch_size
        # Over the epoch's timed steps, those before a stop in it included; None where there are none (an epoch of
        # one step, or a resume before an epoch's last step whose checkpoint did not save when the epoch began).
        if state.epoch_start_samples >= 0:
            samples = state.train_samples - state.epoch_start_samples
            seconds = state.train_time - state.epoch_start_time
        else:
            samples, seconds = steps_in_epoch * cfg.batch_size, elapsed
        self.epoch_rate = samples / max(seconds, 1e-9) if samples else None
        self.epoch_alpha, self.epoch_lr = alpha, lr

    def agreed_signal(self) -> int:
        """The SIGINT / SIGTERM this process got, or under torchrun the one any process got (0: none): every
        process must take the same decision at the same step. Under torchrun rank 0, which said what the run does
        (announce_signal), decides where it got the signal; else any process whose verdict was to stop."""
        if not self.dist.enabled:
            return self.signals.signum if self.signal_stops else 0
        self.polling = True
        try:
            got = self.signals.signum
            mine = got if self.signal_stops else 0
            main_only = (got, mine) if self.dist.main else (0, 0)
            flag = torch.tensor([mine, *main_only], device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            any_stop, main_got, main_stop = flag.tolist()
            self.poll_stops = int(main_stop if main_got else any_stop)
        finally:
            self.polling = False
        if self.unsaid:  # rank 0's first signal arrived during the all-reduce: said now that the poll decided
            signum, self.unsaid = self.unsaid, 0
            self.say_signal(signum, bool(self.poll_stops) or self.signal_stops)
        return self.poll_stops

    def announce_signal(self, signum: int) -> None:
        """As the first SIGINT / SIGTERM arrives: what the run does now, decided here once and said on stderr (rank
        0). Where nothing polls the signal any more (polls_left: the last step, the last evaluation and the results
        after it), the run finishes: a stop there would leave a trained run without its results.json. The handler
        runs between two bytecodes of the loop, so polls_left cannot know whether a poll it counts as done (the step
        counter moved on) has read the flag yet: it may say no poll is left where one is, never the reverse, and
        agreed_signal() then passes the signal on only where the verdict was to stop, as said."""
        self.signal_stops = True  # should polls_left fail, the signal stops the run rather than be dropped
        self.signal_stops = self.polls_left()
        if not self.dist.main:
            return
        if self.polling:  # another rank's signal may decide this poll: said once it has (agreed_signal)
            self.unsaid = signum
            return
        self.say_signal(signum, self.signal_stops or bool(self.poll_stops))

    def say_signal(self, signum: int, stops: bool) -> None:
        """The first signal's line on stderr: a stop after the current step or interval, or the run finishing."""
        if stops:
            what = (f"stopping after the current {'logging interval' if self.polls_per_interval() else 'step'}, with a "
                    f"checkpoint to --resume from")
        else:
            what = "the run is in its last step or past it, and finishes first: its evaluation and results.json"
        from tqdm import tqdm
        tqdm.write(f"{signal.Signals(signum).name}: {what} (a second signal, 2 s on or later, stops at once)",
                   file=sys.stderr)

    def polls_per_interval(self) -> bool:
        """Whether train_epoch polls a signal at the logging intervals only (under torchrun on CUDA, where reading
        the agreed flag waits for the device), not after every step."""
        return self.dist.enabled and self.device.type == "cuda"

    def polls_left(self) -> bool:
        """Whether the run still looks at a signal before it finishes (train_epoch polls after each step but an
        epoch's last, under torchrun on CUDA at the logging intervals only; run() after each epoch but the last)."""
        cfg, state, steps = self.cfg, self.state, self.trainer.steps_per_epoch
        if state.epoch < cfg.epochs - 1 or self.ending_epoch:
            return True
        if state.epoch >= cfg.epochs:
            return False
        if self.polls_per_interval():
            return (state.step // cfg.print_freq + 1) * cfg.print_freq < steps
        return state.step + 1 < steps

    def interrupted(self) -> Stop:
        """The Stop of a second signal, which ended the run wherever it was (SignalFlag)."""
        last = self.out / "last.pt"
        if last.is_file():
            way = (f"{last} holds the run as of its last checkpoint; the same command{self.resume_words()} continues "
                   f"it from there")
        else:
            way = "it saved no checkpoint: the same command with --overwrite starts it again"
        signum = self.signals.second or signal.SIGINT
        return Stop(f"{signal.Signals(signum).name} again: stopped at once; {way}", 128 + signum)

    def stop(self, signum: int, epoch: int, step: Optional[int] = None) -> None:
        """Stop (checkpoint, message, exit 128 + signal) on `signum` from agreed_signal(). Mid-epoch (`step`
        given) the checkpoint is written here; at an epoch's end end_epoch() has just written it."""
        if step is None:
            where = f"after epoch {epoch + 1}"
        else:
            if not self.trainer.params_finite():
                self.diverged(epoch, step)
            self.save("last.pt", epoch_sums=self.every_rank_sums())
            where = f"after step {step + 1} of epoch {epoch + 1}"
        raise Stop(f"{signal.Signals(signum).name}: stopped {where}; checkpoint {self.out / 'last.pt'}. "
                   f"Resume with the same command{self.resume_words()} (a run of a sweep: the sweep's command again)",
                   128 + signum)

    def resume_words(self) -> str:
        """How this run's command becomes the one that resumes it: '' where it has --resume already."""
        return "" if self.cfg.resume else (" with --resume in place of --overwrite" if self.cfg.overwrite else
                                           " plus --resume")

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def diverged(self, epoch: int, step: int) -> None:
        if self.writer is not None:  # HParams lists it as failed, not as a run still going
            try:
                self.write_hparams("failed")
            except UserError:  # a writer that failed already: the divergence is what to say
                pass
        last = self.out / "last.pt"
        kept = f"the last good checkpoint {last} is kept" if last.exists() else "no checkpoint was written"
        cfg = self.cfg
        flag, temperature = {"sc": ("--temp", cfg.temp), "psc": ("--psc_temp", cfg.psc_temperature)}.get(
            cfg.loss, ("", None))
        if cfg.loss == "sc" and cfg.base_temp is not None and cfg.base_temp < cfg.temp:
            flag, temperature = "--base_temp", cfg.base_temp  # the factor temp / base_temp on the loss
        way = "Lower --learning_rate or raise --warm_epochs"
        if temperature is not None and temperature < SMALL_TEMPERATURE:  # logits of 1 / temperature
            way += f", or raise {flag} {temperature:g} (the usual ones are 0.05 to 1)"
        raise Stop(f"non-finite loss in epoch {epoch + 1}, by step {step + 1} (of {self.trainer.steps_per_epoch}); "
                   f"{kept}. {way}.", 3)

    def end_epoch(self) -> None:
        cfg, state, trainer = self.cfg, self.state, self.trainer
        epoch = state.epoch
        sums = all_reduce_sum(state.epoch_sums.clone(), self.dist)
        total, feat, ce = (sums[:3] / sums[3].clamp(min=1)).tolist()
        state.epoch, state.step, state.epoch_sums = epoch + 1, 0, None
        if not trainer.params_finite():
            self.diverged(epoch, trainer.steps_per_epoch - 1)
        entry = {"epoch": epoch + 1, "train_loss": total, "feature_loss": feat, "ce_loss": ce,
                 "alpha": self.epoch_alpha, "lr": self.epoch_lr, "samples_per_s": self.epoch_rate}
        # A CE run has no feature loss and no alpha (its history records 0 for both, the objective's weight and a
        # term it never computes): the line leaves them out, as TensorBoard does.
        terms = f"loss {total:.4f} (feature {feat:.4f}, ce {ce:.4f}) | alpha {self.epoch_alpha:.3f}" \
            if trainer.feature_branch else f"loss {total:.4f}"
        line = f"epoch {epoch + 1}/{cfg.epochs} | {terms} | lr {self.epoch_lr:.4f} | " \
               f"{'-' if self.epoch_rate is None else f'{self.epoch_rate:.0f}'} samples/s"
        is_best = False
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            confusion = trainer.confusion(self.test_images, self.test_labels)
            metrics = util.accuracy_report(confusion, trainer.shot_groups)
            entry.update({k: metrics[k] for k in SHOT_KEYS})
            # (A margin far below one test image's 100 / N: a run resumed from a checkpoint written before util's
            # percentages were rounded once holds a best of 29.959999999999997 that an equal 29.96 must not beat.)
            is_best = metrics["top1"] > state.best_top1 + 1e-9
            if is_best:
                state.best_top1, state.best_epoch = metrics["top1"], epoch + 1
                state.best_metrics = {**{k: metrics[k] for k in SHOT_KEYS}, "epoch": epoch + 1}
            self.last_metrics, self.last_confusion = metrics, confusion
            line += f" | {format_metrics(metrics)} | best {state.best_top1:.2f} @ {state.best_epoch}"
            self.log_eval(epoch + 1, metrics, confusion, is_best)
        if cfg.ncm_every and (epoch + 1) % cfg.ncm_every == 0 and self.dist.main:
            ncm = self.nearest_class_mean()
            self.last_ncm = (epoch + 1, ncm)
            entry.update({f"ncm_{k}": ncm[k] for k in SHOT_KEYS})
            line += f" | ncm top1 {ncm['top1']:.2f}"
            self.log_shots(epoch + 1, ncm, "ncm_")
        state.history.append(entry)
        self.log(line)
        # last.pt first: a run stopped between the two writes (killed, or the disk full) then leaves best.pt behind
        # last.pt, which the resume mends exactly (mend_best), never ahead of it, from an epoch the resume trains again
        # (on CUDA not bitwise alike), which the run's own record of its best would then not describe.
        self.save("last.pt")
        if is_best:
            self.save("best.pt")

    def write_hparams(self, when: str) -> None:
        """TensorBoard's HParams records (hparams_record): at a run's start ("start") the experiment (the columns)
        and the session's settings; at its end the session's end, status success ("end") or, for a run that
        diverged, failure ("failed"; a run stopped by a signal, to be resumed, has no end yet)."""
        from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2
        from torch.utils.tensorboard.summary import hparams

        every, read = hparams_record(self.cfg, self.dist.world_size)
        metrics = dict.fromkeys(HPARAM_METRICS, 0.0)  # hparams() reads the tags only
        _, session_start, session_end = hparams(read, metrics)
        writer = self.writer  # add_summary: as SummaryWriter.add_hparams writes them, without its subfolder
        if when in ("end", "failed"):
            if when == "failed":  # torch's hparams() always says success
                plugin = session_end.value[0].metadata.plugin_data
                content = plugin_data_pb2.HParamsPluginData.FromString(plugin.content)
                content.session_end_info.status = api_pb2.STATUS_FAILURE
                plugin.content = content.SerializeToString()
            writer.add_summary(session_end)
            return
        choices = {f.name: list(f.metadata["choices"]) for f in dataclasses.fields(Config)
                   if f.name in every and "choices" in f.metadata}  # the tab's filters offer each value
        experiment, _, _ = hparams(every, metrics, hparam_domain_discrete=choices)
        plugin = experiment.value[0].metadata.plugin_data  # torch's hparams() sets no `differs` (HPARAMS_SWEPT)
        content = plugin_data_pb2.HParamsPluginData.FromString(plugin.content)
        for info in content.experiment.hparam_infos:
            info.differs = info.name in HPARAMS_SWEPT
        plugin.content = content.SerializeToString()
        writer.add_summary(experiment)
        writer.add_summary(session_start)

    def log_eval(self, epoch: int, metrics: dict[str, Any], confusion: np.ndarray, is_best: bool) -> None:
        if self.writer is None:
            return
        step = epoch * self.trainer.steps_per_epoch
        self.log_shots(epoch, metrics)
        self.writer.add_scalar("test/best_top1", self.state.best_top1, step)
        for c, acc in enumerate(metrics["per_class"]):
            self.writer.add_scalar(f"test_per_class/{c:03d}", acc, step)
        if is_best:  # the last epoch's figures are written by finish()
            self.write_figures(metrics, confusion, step, "best")

    def nearest_class_mean(self, test_features: Optional[torch.Tensor] = None) -> dict[str, Any]:
        """ncm_report of the current network: class means of the long-tailed training images' backbone features,
        the test images classified by them (`test_features` when the caller already has them)."""
        trainer = self.trainer
        if test_features is None:
            test_features, _ = trainer.embed(self.test_images)
        train_features, _ = trainer.embed(trainer.stream.images)
        return ncm_report(train_features, trainer.stream.labels, test_features, self.test_labels, self.num_classes,
                          trainer.shot_groups)

    def log_shots(self, epoch: int, metrics: dict[str, Any], prefix: str = "", logged: frozenset = frozenset()) -> None:
        """TensorBoard scalars test/<prefix><top1|many|medium|few> at the end of `epoch` (a group with no class,
        None, is left out), but for the tags in `logged` (there already)."""
        if self.writer is None:
            return
        for k in SHOT_KEYS:
            if metrics[k] is not None and f"test/{prefix}{k}" not in logged:
                self.writer.add_scalar(f"test/{prefix}{k}", metrics[k], epoch * self.trainer.steps_per_epoch)

    def write_figures(self, metrics: dict[str, Any], confusion: np.ndarray, step: int, tag: str,
                      logged: frozenset = frozenset()) -> None:
        """The per-class accuracy and confusion matrix images at `step`, but for the tags in `logged`."""
        figures = {f"{tag}/per_class_accuracy_vs_class_size":
                   lambda: util.per_class_image(metrics["per_class"], self.trainer.class_counts),
                   f"{tag}/confusion_matrix": lambda: util.confusion_image(confusion)}
        for name, image in figures.items():
            if name not in logged:
                self.writer.add_image(name, image(), step, dataformats="HWC")

    def finish(self, evaluates_again: bool = False) -> None:
        """The run's last records (figures, projector, nearest class mean, results.json, HParams' end).
        evaluates_again: a resume of a run that trained all its epochs, whose results.json is missing or cannot be
        read. Its TensorBoard records at the last step stay (the events purged from there on would take the last
        training interval's points, which cannot be written again), so it does not write again what is there: with
        a results.json, all of them (an earlier session finished); without one, those the event files hold at the
        last step (an earlier session stopped or failed between them and results.json: a second Ctrl-C, a full
        disk)."""
        cfg, state, trainer = self.cfg, self.state, self.trainer
        if not self.dist.main:
            return
        step = cfg.epochs * trainer.steps_per_epoch
        finished_before = evaluates_again and (self.out / "results.json").exists()
        logged = frozenset(tags_logged_at(self.out, step) if evaluates_again and not finished_before else ())
        earlier = self.out / f"{step:05d}" / PROJECTIONS_TAG  # a session's before results.json was written again
        if not finished_before:
            self.write_figures(self.last_metrics, self.last_confusion, step, "last", logged)
        reuse_ncm = self.last_ncm is not None and self.last_ncm[0] == cfg.epochs  # --ncm_every took it already
        class_names = data.class_names(cfg.dataset, cfg.data_root)  # (the projector's and results.json's)
        test_features = None
        if trainer.feature_branch:  # what the contrastive branch learned, in TensorBoard's projector
            test_features, test_projections = trainer.embed(self.test_images)
            if earlier.is_dir():
                self.writer.guarded(shutil.rmtree, earlier)
            projector = self.out / PROJECTOR_CONFIG
            if os.path.lexists(projector) and not projector.is_file():  # TensorBoard's write would wait on a pipe
                self.log(f"note: {projector} is not a file (a folder, a pipe or a broken link): the test projections "
                         f"for TensorBoard's projector are not written")
            else:
                labels = self.test_labels.cpu().tolist()
                if class_names is None:
                    metadata, header = labels, None
                else:  # the projector colours and searches by either column ("3", "cat")
                    # (a tab or newline would break the TSV; a class folder's name that is not UTF-8 would fail
                    # its write, at the end of the run: one_line shows such characters as escapes)
                    names = [util.one_line(name) for name in class_names]
                    metadata, header = [[label, names[label]] for label in labels], ["label", "class"]
                self.writer.add_embedding(test_projections.cpu(), metadata=metadata, metadata_header=header,
                                          global_step=step, tag=PROJECTIONS_TAG)
        if reuse_ncm:
            ncm = self.last_ncm[1]
        else:
            ncm = self.nearest_class_mean(test_features)
            if not finished_before:
                self.log_shots(cfg.epochs, ncm, "ncm_", logged)
        self.tick_wall_time()
        last = {**{k: self.last_metrics[k] for k in SHOT_KEYS}, "epoch": cfg.epochs}
        results = {
            "dataset": cfg.dataset, "method": cfg.loss, "model": cfg.model, "imb_type": cfg.imb_type,
            "imb_factor": cfg.imb_factor, "imbalance_ratio": cfg.imbalance_ratio, "seed": cfg.seed,
            "epochs": cfg.epochs, "lr_decay_epochs": list(cfg.lr_decay_epochs), "batch_size": cfg.batch_size,
            "best_top1": state.best_top1, "best_epoch": state.best_epoch, "last_top1": last["top1"],
            "many": last["many"], "medium": last["medium"], "few": last["few"],
            "best": state.best_metrics, "last": last, "per_class": self.last_metrics["per_class"],
            "class_names": class_names, "class_counts": trainer.class_counts,
            "train_digest": self.train_digest, "shot_groups": trainer.shot_groups,
            "history": state.history,
            "samples_per_s": state.train_samples / max(state.train_time, 1e-9), "train_time_s": state.train_time,
            "first_step_s": self.first_step_s if self.first_step_s is not None else next(
                (s["first_step_s"] for s in reversed(state.sessions) if s.get("first_step_s") is not None), None),
            "wall_time_s": state.wall_time, "torch_version": str(torch.__version__), "git_commit": self.git_commit,
            "device": device_name(self.device), "world_size": mixed_setting(state, "world_size", self.dist.world_size),
            "amp": mixed_setting(state, "amp", trainer.amp),
            "channels_last": mixed_setting(state, "channels_last", trainer.channels_last),
            "psc_temperature": cfg.psc_temperature,
            "config": {**dataclasses.asdict(cfg), **self.trained_settings()},
            "ncm": ncm, "sessions": state.sessions,
        }
        util.write_json(results, self.out / "results.json")
        if not finished_before:
            self.write_hparams("end")
        self.log(ncm_line(ncm))
        self.log(f"done: last {format_metrics(last)}; best top1 {state.best_top1:.2f} at epoch {state.best_epoch}; "
                 f"results in {self.out / 'results.json'}")

    def trained_settings(self) -> dict[str, Any]:
        """results.json's config entries for --eval_every, --sync_bn and --compile where the sessions that trained
        the run say otherwise than this session's flags: "mixed" where they differ among themselves, their value
        where this session only evaluated with another (its flags did not train the run; for --compile, the
        training's --compile and --compile_mode)."""
        settings = {}
        for key, now in (("eval_every", self.cfg.eval_every), ("sync_bn", self.trainer.sync_bn),
                         ("compile", self.compile_entry())):
            values = trained_with(self.state.sessions, key)
            if len(values) > 1:
                settings[key] = "mixed"
            elif values and values != {now}:
                value = next(iter(values))
                settings.update({"compile": bool(value), "compile_mode": value or "default"} if key == "compile"
                                else {key: value})
        return settings

    def log(self, message: str) -> None:
        if self.dist.main:
            print(message, flush=True)


# What --eval_only takes from the checkpoint's config: the data and the network it was trained as.
EVALUATED_AS_TRAINED = ("dataset", "model", "imb_type", "imb_factor", "data_seed", "loss", "feat_dim")


def as_trained(saved: dict[str, Any], cfg: Config, path: Path, given: set[str]) -> Config:
    """cfg with the checkpoint's EVALUATED_AS_TRAINED settings, so that --eval_only --checkpoint needs no recipe
    flags. One of them given (`given`, see given_flags) with another value than the checkpoint's is refused: it
    cannot apply to these weights, and leaving it unsaid would look as if it had. (A config without one of these,
    from other code, keeps the flag's value; check_compatible and the loading then judge it.)"""
    then = {k: saved["config"][k] for k in EVALUATED_AS_TRAINED if k in saved["config"]}
    for key, known in (("dataset", data.DATASETS), ("model", networks.MODELS)):
        if key in then and not (isinstance(then[key], str) and then[key] in known):
            raise UserError(f"{path} names {key} {then[key]!r}, not one of {', '.join(known)}: not a checkpoint "
                            f"of this program")
    clash = [f"--{k} {getattr(cfg, k)} (the checkpoint's: {v})" for k, v in then.items()
             if k in given and getattr(cfg, k) != v]
    if clash:
        raise UserError(f"--eval_only evaluates {path} as it was trained, and these flags disagree with it: "
                        f"{', '.join(clash)}; drop them")
    return dataclasses.replace(cfg, **then)


def barrier(device: torch.device) -> None:
    """torch.distributed.barrier, on this process's GPU under NCCL (told, not guessed: PyTorch warns where it
    guesses)."""
    if device.type == "cuda":
        torch.distributed.barrier(device_ids=[device.index])
    else:
        torch.distributed.barrier()


def load_data(cfg: Config, saved: Optional[dict[str, Any]], dist: Dist, device: torch.device,
              **kwargs: Any) -> tuple[data.ArraySplit, data.ArraySplit]:
    """data.load_cifar of cfg's dataset and --data_root. Under torchrun the job's processes take turns, as reading may
    write into --data_root (--download; image folders, whose decoded cache the first read leaves): rank 0 reads first
    (downloading, decoding), then the first process of each other machine (local rank 0: on a disk of its own it
    downloads or decodes; on a --data_root the machines share it finds what rank 0 left), then every other process
    reads what is there, without downloading. One download and one decoding per folder, not one per process writing
    the same files at once. Always, whatever the layout: a process's own look at its --data_root cannot decide it,
    as machines may see theirs differently (one the pickled layout, another nothing), and processes that decided
    otherwise would wait at different collectives until the timeout. For a run resumed or evaluated from `saved` (a
    checkpoint), load_cifar is told the --data_root the run was trained with, which its errors name where it is
    another folder."""
    config = saved.get("config") if isinstance(saved, dict) else None
    then = config.get("data_root") if isinstance(config, dict) else None
    then = then if isinstance(then, str) and then else None
    if not dist.enabled:
        return data.load_cifar(cfg.dataset, cfg.data_root, download=cfg.download, trained_with=then, **kwargs)
    loaded = None
    for turn in (dist.rank == 0, dist.local_rank == 0 and dist.rank != 0):
        if turn:
            loaded = data.load_cifar(cfg.dataset, cfg.data_root, download=cfg.download, trained_with=then, **kwargs)
        barrier(device)
    return loaded if loaded is not None else data.load_cifar(cfg.dataset, cfg.data_root, download=False,
                                                             trained_with=then, **kwargs)


def evaluate_checkpoint(cfg: Config, dist: Dist, device: torch.device, given: set[str]) -> int:
    """--eval_only: the classifier branch of --checkpoint on the balanced test set, and the nearest class mean of
    its backbone features over the long-tailed training set it was trained on (dataset, model and long-tailed
    split from the checkpoint's config)."""
    path = Path(cfg.checkpoint)
    if dist.main:
        for note in (hidden_gpu_note(cfg.device, device, "evaluating"),
                     "note: --eval_only runs the network as it is, without torch.compile: --compile is not read"
                     if cfg.compile else None):
            if note:
                print(note, flush=True)
    saved = util.load_checkpoint(path)
    cfg = as_trained(saved, cfg, path, given)
    num_classes = data.DATASETS[cfg.dataset]
    check_compatible(saved, cfg, path, num_classes, keys=())
    train, test = load_data(cfg, saved, dist, device, dataset_of=str(path))
    try:
        train_lt, class_counts = data.long_tailed_subset(train, num_classes, cfg.imb_factor, cfg.imb_type,
                                                         cfg.data_seed)
        check_same_data(saved, class_counts, path)
        other_images = saved.get("train_digest") not in (None, train_lt.digest())
        net = networks.build_model(cfg.model, num_classes, cfg.feat_dim, use_prototypes=cfg.loss == "psc")
        net.load_state_dict(saved["model"])
        check_numerics_entries(saved)
    except FOREIGN_CHECKPOINT_ERRORS as e:
        raise foreign_checkpoint(path, e) from e
    images, labels = data.to_device_images(test, device)
    mean, std = (torch.tensor(v, device=device) for v in data.dataset_stats(cfg.dataset))
    # Evaluate as the run did (its numerics), unless the flags say otherwise.
    amp, channels_last = run_numerics(cfg, device, saved)
    net = net.to(device, memory_format=memory_format(channels_last)).eval()
    confusion = test_confusion(net, images, labels, mean=mean, std=std, num_classes=num_classes, amp=amp,
                               channels_last=channels_last, dist=dist)
    if not dist.main:
        return 0
    groups = data.shot_groups(class_counts)
    metrics = util.accuracy_report(confusion, groups)
    train_images, train_labels = data.to_device_images(train_lt, device)
    numerics = dict(mean=mean, std=std, amp=amp, channels_last=channels_last)
    ncm = ncm_report(embed(net, train_images, **numerics)[0], train_labels, embed(net, images, **numerics)[0], labels,
                     num_classes, groups)
    keys = (*SHOT_KEYS, "per_class")
    if not all(torch.isfinite(t).all() for t in net.state_dict().values() if t.is_floating_point()):
        print(f"note: {path} holds weights or batch-norm statistics that are not finite numbers (NaN or inf; a run of "
              f"this program keeps those out of its checkpoints): the accuracy below is that of a broken network")
    if other_images:  # check_same_data compared the class sizes only: a resume refuses this, an evaluation need not
        print(f"note: these training images are not those {path} was trained on (the same class sizes, other pixels "
              f"or labels: another copy of the data, or JPEG files decoded by another libjpeg); the test accuracy does "
              f"not depend on them, the nearest class mean below is built from them")
    print(f"{path}: {format_metrics(metrics)}")
    names = data.class_names(cfg.dataset, cfg.data_root)  # each value named where the data names its classes
    print("per-class top1: " + (" ".join(f"{a:.1f}" for a in metrics["per_class"]) if names is None else
                                ", ".join(f"{c} {util.one_line(name)}: {a:.1f}" for c, (name, a) in
                                          enumerate(zip(names, metrics["per_class"])))))
    print(ncm_line(ncm))
    print(json.dumps({**{k: metrics[k] for k in keys}, "ncm": {k: ncm[k] for k in keys}}))
    return 0


def peer_gone(e: BaseException) -> bool:
    """Whether a collective failed because another process of the job is gone, as its message says: gloo's plain
    RuntimeError ("Connection closed by peer", "reset by peer", "caused by a remote worker"), NCCL's "remote process
    exited". (Not any c10d DistError: NCCL raises those for its own faults too, a small /dev/shm, a lost GPU.)"""
    text = str(e)
    return any(sign in text for sign in ("by peer", "caused by a remote worker", "remote process exited"))


def peer_gone_text(e: BaseException) -> str:
    """What a peer_gone error says, short: gloo's source locations in brackets ("[.../pair.cc:561] ") and its
    advice left out."""
    text = re.sub(r"\[[^\]\s]+\.(?:cc|cpp|h):\d+\] ", "", util.one_line(e))
    return f"{type(e).__name__}: {text.split('. This is typically')[0]}"


def configure_backends(cfg: Config) -> None:
    """Kernel choice. By default cuDNN times its convolution algorithms once per input shape and keeps the
    fastest (every step here has the same shapes). --deterministic asks for deterministic kernels everywhere
    instead; cuBLAS needs a fixed workspace for that, which must be set before its first use."""
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = not cfg.deterministic


def main(argv: Optional[list[str]] = None) -> int:
    dist, folder_lock = Dist(), FolderLock()
    try:
        if signal.getsignal(signal.SIGINT) is _interrupted_while_importing:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        cfg = parse_config(argv)
        dist, device = setup_distributed(cfg)
        configure_backends(cfg)
        if cfg.eval_only:
            return printed(evaluate_checkpoint(cfg, dist, device, given_flags(argv)), dist.main)
        if dist.main:  # an existing folder, before its state is read: what resume_point sees stays so
            folder_lock.acquire(resolve_output_dir(cfg), create=not cfg.dry_run)
        out, saved, finished = resume_point(cfg, dist)
        if finished:
            if dist.main:
                print(f"{out} already finished {plural(cfg.epochs, 'epoch')}; nothing to do", flush=True)
            return printed(0, dist.main) if cfg.dry_run else 0
        run = Run(cfg, dist, device, out, saved, folder_lock)
        return printed(run.dry_run(), dist.main) if cfg.dry_run else run.run()
    except (UserError, Stop) as e:
        if isinstance(e, Stop) and not dist.main:  # every process stops for the same reason: say it once
            return e.code
        prefix = f"rank {dist.rank}: " if dist.enabled else launched_rank_prefix()
        if prefix and str(e).startswith(prefix[:-2] + " "):  # it names the process already ("rank 1 of 2 ...")
            prefix = ""
        text = util.printable(e)  # (a path given with a line break in it stays on the line)
        print(f"{prefix}error: {text}" if isinstance(e, UserError) else f"{prefix}{text}", file=sys.stderr, flush=True)
        return e.code if isinstance(e, Stop) else e.exit_code
    except KeyboardInterrupt:
        if not launched_rank():  # (each process of a torchrun job gets the Ctrl-C: rank 0 alone says it)
            print("interrupted", file=sys.stderr)
        return 130
    except RuntimeError as e:  # a collective whose peer process ended (its own message says why): not a traceback
        if not (dist.enabled and peer_gone(e)):
            raise
        print(f"rank {dist.rank}: error: another process of this job ended (its message says why), so this one "
              f"stops too ({peer_gone_text(e)})", file=sys.stderr, flush=True)
        return 1
    finally:
        folder_lock.release()
        if dist.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def printed(code: int, prints: bool) -> int:
    """The exit status of a program whose result is what it prints (--eval_only, --dry_run): 1 where standard output
    failed (util.GuardedOutput said so on stderr), so that a script reading the output does not take it as done.
    `prints`: False for a process of a torchrun job other than rank 0, which prints none of the result (rank 0 judges
    its own output, and says so once)."""
    sys.stdout.flush()
    if not prints:
        return code
    if code == 0 and getattr(sys.stdout, "failed", False):
        print("error: what this command prints is its result, and printing it failed", file=sys.stderr, flush=True)
        return 1
    if code == 0 and 1 in CLOSED_AT_START:  # (printed into /dev/null: nothing failed, and nothing was seen)
        print("error: what this command prints is its result, and standard output was closed (>&-)", file=sys.stderr,
              flush=True)
        return 1
    return code


def launched_rank_prefix() -> str:
    """'rank N: ' for a process that torchrun started as one of several but that stopped before it joined them
    (a bad flag, say: each process says so), else '' (also for torchrun's variables left in a shell without
    MASTER_ADDR and MASTER_PORT, whose error is about them)."""
    rank = launched_rank()
    return "" if rank is None else f"rank {rank}: "


def exit_process(code: int) -> None:
    """End the program with `code`. A process of a torchrun job ends with os._exit once its output is flushed: about
    one such process in 30 aborted after main() had returned and the process group was destroyed ('terminate
    called without an active exception', SIGABRT with no Python frame left, so in C++ teardown at interpreter
    exit), and torchrun then fails the whole job although the run had finished. Everything main() wrote is closed
    by then; interpreter teardown only frees memory. (A WORLD_SIZE that is not an integer was main()'s one-line
    error already: it ends as one process.)"""
    try:
        world_size = _env_int("WORLD_SIZE", 1)
    except UserError:
        world_size = 1
    if world_size > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    util.guard_stdout("main.py goes on without printing (a training run's record is its folder and TensorBoard)")
    exit_process(main())
