#!/usr/bin/env python3
"""Summarise finished runs as the paper's Table 1 (markdown, or CSV with --csv).

    python scripts/summarize.py runs/table1 [more dirs or results.json files] [--csv] [--out FILE]
    python scripts/summarize.py runs/table1 --per_class    # and each row's top-1 per class
    python scripts/summarize.py runs/table1 --per_run      # and each run behind the rows, with its folder

With --per_class, the markdown adds a table per dataset and ratio (one column per row above, one line per
class with its training images, and its name where the runs record the same class_names) of each class's
top-1 at the last epoch, mean over the row's seeds; with
--csv it prints those numbers instead of the rows, one line per row and class (with the std over seeds).
With --per_run, it adds a second table, one line per run in the main table's order of rows, each naming its row
(seed, best top-1 with its epoch, last top-1, many / medium / few, NCM top-1, training samples/s, training and
wall time, folder); with --csv it prints those instead (one of --per_class and --per_run with --csv).

Reads every results.json under the given folders (recursively), groups the runs by
(dataset, method, imb_type, imbalance ratio, schedule, recipe) and reports per group: the seeds, best and
last top-1 as mean ± std over seeds, many / medium / few-shot accuracy (last epoch, mean), the
nearest-class-mean top-1 on the backbone features (results.json's "ncm", mean; a column only when some
run records it), the schedule, the mean wall time, the paper's top-1 and our difference to it.

Choices, documented here and in the table's footnotes:
- std is the sample std (ddof=1) over seeds; with one seed it is "n/a" (empty in CSV), since a
  spread cannot be estimated from one run.
- The paper gives one top-1 per cell; "diff" compares our LAST-epoch top-1 mean with it (the best
  epoch is chosen on the test set, so it is optimistic).
- The paper schedule is 200 epochs, lr x0.1 at 120 and 160, batch 512. Any other schedule is
  marked in the epochs column ("short schedule: 20 epochs", with the lr decay epochs and batch size
  where two rows would otherwise read alike) and shows "n/c" (not comparable)
  instead of the paper value and difference.
- CE has no value in the paper; on CIFAR-10-LT ratio 100 the literature value 70.36 is shown,
  marked "(lit.)", without a difference (a different recipe). It is plain, instance-sampled
  cross-entropy: a CE run with another --ce_sampler is always labelled with it
  ("CE [ce_sampler=class]", the hybrid's classifier branch alone) and gets no literature value.
  Likewise a hybrid run in another form than the paper's (--alpha_schedule other than parabolic,
  --sc_aug supcon, --sc_sampler other than instance, --ce_sampler other than class, --feat_dim other
  than 128, for SC a --base_temp other than --temp, for PSC --psc_denominator all), and any run
  with another --model than resnet32 (the backbone of every reference value), is always labelled
  with it and gets no paper value. So does a
  row trained on another split than the full dataset's long-tailed one (recorded class sizes whose
  largest class is not 5,000 / 500 images: a subset, synthetic data), named in a footnote (on a
  shorter schedule too, where every row shows "n/c"). Runs on
  different splits (recorded class sizes) are separate rows, labelled "split=N images, max..min per
  class" where rows differ in it; a run that records no class sizes splits nothing.
- Runs that share dataset, method, imb_type, ratio and schedule but differ in another training
  setting of their saved config (e.g. --ce_sampler, --temp, --amp, --model, --eval_every) or in
  the number of processes are separate rows, each labelled with the settings that tell them apart
  ("Hybrid-SC [ce_sampler=sqrt]"). Bookkeeping flags (paths, device, logging, resume, compile,
  channels_last, deterministic, ncm_every) never split a group. A setting that some runs do not record
  (made before the flag existed) splits nothing when the runs that record it agree (on the reference
  value, for a setting the reference values assume); otherwise the runs without it are a part of
  their own, labelled "name=?" (a flag whose earlier
  behaviour is known, like --gray_prob, counts as that value instead). --amp and --psc_temp
  count as the value the run used (results.json's "amp" and "psc_temperature", or those of the
  config.json beside it), so a default and the same value given explicitly are one recipe; a run
  that records neither counts as not recording the setting (a run resumed with another --amp or
  number of processes records "mixed", a value of its own); a --base_temp equal to the run's
  --temp counts as no --base_temp (the loss's factor is 1 either way), and --sync_bn on one process
  as no --sync_bn (nothing to synchronise). --temp and --base_temp split only
  Hybrid-SC rows, --psc_temp and --psc_denominator only Hybrid-PSC rows, --bn_stats, --sc_aug,
  --sc_sampler and --alpha_schedule only the hybrids' rows: the other losses do not read them.
- A malformed results.json, or two runs of one group with the same seed, stops the summary with
  one line naming the file(s) (every folder of each doubled seed) and exit status 1: a silently
  dropped or doubled seed would change the means; --exclude GLOB leaves out the run folders whose
  path as found (or name alone) matches GLOB. No results at all is an error too. Run folders
  with a config.json but no results.json (running, stopped or failed) are left out and named in
  one note on stderr. A wall time (or --per_run's training time and samples/s) that is not a
  finite number >= 0, and a best_epoch that is not a whole number >= 1, count as not recorded
  ('—'): they are bookkeeping, not results.
- --out is written atomically (a temporary file beside it, then renamed over it): a failed write
  (disk full, read-only folder) leaves an existing table as it was. It may not name a file the
  summary reads (a results.json, or the config.json beside one), nor a file main.py writes in a run
  folder (last.pt, best.pt, TensorBoard events), whether the summary reads that run or not. Bad
  arguments and files that cannot be written are one line on stderr and a non-zero exit.

Only the standard library and numpy: it runs anywhere the run folders are copied to.
"""
from __future__ import annotations

import argparse
import codecs
import csv
import fnmatch
import io
import json
import math
import os
import re
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable

import numpy as np

PAPER_EPOCHS = 200
PAPER_LR_DECAY_EPOCHS = (120, 160)
PAPER_BATCH_SIZE = 512

# Wang et al., CVPR 2021, Table 1: top-1 % on the long-tailed ('exp') splits, keyed by
# (dataset, method, imbalance ratio).
PAPER_TOP1 = MappingProxyType({
    ("cifar10", "sc", 100): 81.40, ("cifar10", "sc", 50): 85.36, ("cifar10", "sc", 10): 91.12,
    ("cifar10", "psc", 100): 78.82, ("cifar10", "psc", 50): 83.86, ("cifar10", "psc", 10): 90.06,
    ("cifar100", "sc", 100): 46.72, ("cifar100", "sc", 50): 51.87, ("cifar100", "sc", 10): 63.05,
    ("cifar100", "psc", 100): 44.97, ("cifar100", "psc", 50): 48.93, ("cifar100", "psc", 10): 62.37,
})
# Saved-config entries that do not define the training recipe (paths, devices, logging, layout
# and compile choices with the same maths), or that the group key already holds.
NOT_RECIPE = frozenset({
    "seed", "output_dir", "data_root", "download", "resume", "overwrite", "eval_only", "checkpoint", "dry_run",
    "device", "compile", "compile_mode", "channels_last", "deterministic", "print_freq", "ncm_every",
    "dataset", "imb_type", "imb_factor", "loss", "epochs", "lr_decay_epochs", "batch_size",
})
# Flags whose default main.py resolves at run time (by device, by dataset), and the top-level field
# of results.json (and, in older runs, of the config.json beside it) that records the value a run
# used: a default and the same value given explicitly are one recipe.
RESOLVED = MappingProxyType({"amp": "amp", "psc_temp": "psc_temperature"})
# Training settings added after runs had been saved, with what the code did before each existed
# (main.FLAGS_ADDED_LATER, repeated here so that summarising needs no torch): a run without one
# was made with that value.
FLAGS_ADDED_LATER = MappingProxyType({"gray_prob": 0.2, "base_temp": None, "bn_stats": "joint", "sc_aug": "paper",
                                      "alpha_schedule": "parabolic"})
# Settings that only some losses read (main.USED_BY, repeated here too): the others' runs do not split on them.
USED_BY = MappingProxyType({"sc_sampler": ("sc", "psc"), "temp": ("sc",), "base_temp": ("sc",),
                            "psc_temp": ("psc",), "psc_denominator": ("psc",), "bn_stats": ("sc", "psc"),
                            "sc_aug": ("sc", "psc"), "alpha_schedule": ("sc", "psc")})
# Plain cross-entropy on the same split, as reported in the literature (Cao et al. 2019, LDAM-DRW).
LITERATURE_TOP1 = MappingProxyType({("cifar10", "ce", 100): 70.36})
# The recipe each reference value assumes, where a flag can leave it: the paper's form of the method (its
# alpha curriculum, its augmentation, its PSC denominator) for the hybrids, and "plain" (instance sampling)
# for the literature's CE. A run with another value is another method (class-balanced CE is the hybrid's
# classifier branch alone): its label always says so, also with no other run to tell it from, and it gets
# no reference value.
# All of them were measured with ResNet-32.
# The hybrids' samplers (Section 4.1: the feature branch instance-balanced, the classifier branch class-balanced)
# and projection width (128) are part of that form too.
_PAPER_FORM = {"model": "resnet32", "alpha_schedule": "parabolic", "sc_aug": "paper", "sc_sampler": "instance",
               "ce_sampler": "class", "feat_dim": 128}
REFERENCE_RECIPE = MappingProxyType({
    "sc": MappingProxyType({**_PAPER_FORM, "base_temp": None}),  # the paper's SC formula: no factor temp / base_temp
    "psc": MappingProxyType({**_PAPER_FORM, "psc_denominator": "negatives"}),
    "ce": MappingProxyType({"model": "resnet32", "ce_sampler": "instance"}),
})
# The paper's stated optimisation and temperatures (Section 4.1), which its values assume at its schedule: there a
# hybrid run with another value is labelled with it and gets no paper value. At other schedules (a short CPU run
# scales the lr with its batch) a row is not compared with them (runs that differ among themselves still split, as
# in any setting). Each method's temperature flag, with its value by dataset.
PAPER_HYPERPARAMETERS = MappingProxyType({"learning_rate": 0.5, "momentum": 0.9, "weight_decay": 1e-4,
                                          "lr_decay_rate": 0.1, "gray_prob": 0.2})
PAPER_TEMPERATURES = MappingProxyType({"sc": ("temp", MappingProxyType({"cifar10": 0.1, "cifar100": 0.1})),
                                       "psc": ("psc_temp", MappingProxyType({"cifar10": 1.0, "cifar100": 0.1}))})
# The reference values' training sets: the full datasets' classes, each of this many images before the long-tailed
# cut (whose largest class keeps them all). A run whose recorded class sizes start elsewhere (a subset, synthetic
# data) was trained on another split and gets no reference value.
FULL_SPLIT = MappingProxyType({"cifar10": (10, 5000), "cifar100": (100, 500)})  # classes, images per class

DATASET_LABELS = MappingProxyType({"cifar10": "CIFAR-10-LT", "cifar100": "CIFAR-100-LT"})
METHOD_LABELS = MappingProxyType({"sc": "Hybrid-SC", "psc": "Hybrid-PSC", "ce": "CE"})
DATASET_ORDER = ("cifar10", "cifar100")
METHOD_ORDER = ("sc", "psc", "ce")

CSV_COLUMNS = (
    "dataset", "method", "variant", "imb_type", "imbalance_ratio", "n_seeds", "seeds",
    "best_top1_mean", "best_top1_std", "last_top1_mean", "last_top1_std",
    "many_mean", "medium_mean", "few_mean", "ncm_top1_mean", "epochs", "lr_decay_epochs", "batch_size",
    "paper_schedule", "wall_time_s_mean", "reference_top1", "reference_source", "diff_last_minus_reference",
)


FOLDERS_NAMED = 5  # run folders (or doubled seeds) a line names at most; the rest are counted


class SummaryError(Exception):
    """A problem with the input folders or files, reported as one line and exit status 1."""


@dataclass(frozen=True)
class RunResult:
    """The fields of one results.json that the summary uses (accuracies in percent)."""

    path: str
    dataset: str
    method: str
    imb_type: str
    imbalance_ratio: float
    seed: int
    epochs: int
    lr_decay_epochs: tuple[int, ...]
    batch_size: int | None
    best_top1: float
    last_top1: float
    many: float | None  # None: no class in this shot group (e.g. 'few' on CIFAR-10 at ratio 10)
    medium: float | None
    few: float | None
    wall_time_s: float | None
    recipe: tuple[tuple[str, str], ...] = ()  # the other training settings of its config, as JSON
    per_class: tuple[float, ...] | None = None  # last-epoch top-1 per class; None when not recorded
    class_counts: tuple[int, ...] | None = None  # training images per class, recorded with per_class
    class_names: tuple[str, ...] | None = None  # the data's names of the classes; None when not recorded
    ncm_top1: float | None = None  # the nearest-class-mean top-1 at the end; None when not recorded
    train_digest: str | None = None  # SHA-256 of the training images and labels; None when not recorded
    best_epoch: int | None = None  # the epoch of best_top1 (from 1); None when not recorded
    samples_per_s: float | None = None  # training rate; None when not recorded or unusable (bookkeeping)
    train_time_s: float | None = None  # training time without evaluations; likewise

    @property
    def folder(self) -> str:
        """The run's folder, as found (the results.json's parent)."""
        return str(Path(self.path).parent)

    @property
    def full_split(self) -> bool:
        """Whether the run was trained on the long-tailed split of the full dataset, as the reference values were
        (True when its class sizes are not recorded, or the dataset is not one of the paper's)."""
        if self.class_counts is None or self.dataset not in FULL_SPLIT:
            return True
        classes, n_max = FULL_SPLIT[self.dataset]
        return len(self.class_counts) == classes and self.class_counts[0] == n_max


@dataclass(frozen=True)
class GroupKey:
    """What makes runs comparable: they differ only in the seed."""

    dataset: str
    method: str
    imb_type: str
    imbalance_ratio: float
    epochs: int
    lr_decay_epochs: tuple[int, ...]
    batch_size: int | None
    # The recipe settings that tell this group from others with the same fields above ((name, JSON
    # value) pairs); empty when there is no such group.
    variant: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class GroupSummary:
    """One table row. Stds are None for a single seed; means of shot groups None when empty."""

    key: GroupKey
    seeds: tuple[int, ...]
    best_top1_mean: float
    best_top1_std: float | None
    last_top1_mean: float
    last_top1_std: float | None
    many: float | None
    medium: float | None
    few: float | None
    wall_time_s: float | None
    paper_schedule: bool
    reference_top1: float | None  # None when not comparable or unknown
    reference_source: str | None  # "paper" or "literature"
    diff: float | None  # last_top1_mean - paper value; only against the paper's own numbers
    # Last-epoch top-1 per class, mean and std over seeds (std None for one seed); None when a run of the
    # group does not record it or its runs were trained on different class sizes.
    per_class_mean: tuple[float, ...] | None = None
    per_class_std: tuple[float | None, ...] | None = None
    class_counts: tuple[int, ...] | None = None
    class_names: tuple[str, ...] | None = None  # where every run of the group records the same ones
    # Nearest-class-mean top-1, mean over seeds; None unless every run of the group records it (a mean over some
    # of the seeds would not compare with the other columns).
    ncm_top1: float | None = None
    # How many different training sets (train_digest) the seeds that record one were trained on: more than one
    # means seeds run on different copies of the data, whose mean mixes them.
    train_sets: int = 1
    # False when a run of the row was trained on another split than the full dataset's (RunResult.full_split).
    full_split: bool = True
    runs: tuple[RunResult, ...] = ()  # the row's runs, by seed (--per_run lists them)


# ---- parsing ---------------------------------------------------------------------------------

def _number(data: dict, key: str, *, optional: bool = False) -> float | None:
    """data[key] as a float; None only when optional and the key is missing or null."""
    value = data.get(key)
    if value is None:
        if optional:
            return None
        raise ValueError(f"missing key '{key}'" if key not in data else f"'{key}' is null")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"'{key}' must be a number, got {value!r}")
    try:
        return float(value)
    except OverflowError:  # an integer too large for a float: as unusable as 1e400, which parses as inf
        return math.inf if value > 0 else -math.inf


def _shot_accuracy(data: dict, key: str) -> float | None:
    """A many/medium/few value; null or NaN means the group has no class."""
    if key not in data:
        raise ValueError(f"missing key '{key}'")
    value = _number(data, key, optional=True)
    if value is None or math.isnan(value):
        return None
    if not 0.0 <= value <= 100.0:  # infinity too: it would print as 'inf' and make the mean inf
        raise ValueError(f"'{key}' must be a percentage in 0..100, got {value!r}")
    return value


def _duration(data: dict, key: str) -> float | None:
    """A time in seconds (or a rate); None when missing, null or unusable (NaN, infinite, negative), since it is
    bookkeeping and the run's accuracies are still good."""
    value = _number(data, key, optional=True)
    return value if value is not None and math.isfinite(value) and value >= 0.0 else None


def _class_names(data: dict, per_class: tuple[float, ...] | None) -> tuple[str, ...] | None:
    """results.json's class_names (main.py writes them since they were added; null where the data has none), one
    name per class of per_class; None where not recorded."""
    names = data.get("class_names")
    if names is None or per_class is None:
        return None
    if not isinstance(names, list) or len(names) != len(per_class) or not all(isinstance(n, str) for n in names):
        raise ValueError("'class_names' must be null or a list of one name (text) per class")
    return tuple(names)


def _per_class(data: dict) -> tuple[tuple[float, ...] | None, tuple[int, ...] | None]:
    """(per-class top-1, class sizes), both None unless the file records both; checked for shape."""
    per_class, counts = data.get("per_class"), data.get("class_counts")
    if per_class is None or counts is None:
        return None, None
    if not isinstance(per_class, list) or not isinstance(counts, list) or len(per_class) != len(counts) \
            or not per_class:
        raise ValueError("'per_class' and 'class_counts' must be lists of one value per class")
    for c, v in enumerate(per_class):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 100.0:
            raise ValueError(f"'per_class' must hold percentages in 0..100, got {v!r} for class {c}")
    for c, n in enumerate(counts):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"'class_counts' must hold non-negative integers, got {n!r} for class {c}")
    return tuple(float(v) for v in per_class), tuple(counts)


def _ncm_top1(data: dict) -> float | None:
    """The "ncm" entry's top-1 (None when the run does not record one), checked."""
    ncm = data.get("ncm")
    if ncm is None:
        return None
    top1 = ncm.get("top1") if isinstance(ncm, dict) else None
    if isinstance(top1, bool) or not isinstance(top1, (int, float)) or not 0.0 <= top1 <= 100.0:
        raise ValueError(f"'ncm' must be an object whose 'top1' is a percentage in 0..100, got {ncm!r:.80}")
    return float(top1)


def _best_epoch(data: dict) -> int | None:
    """The "best_epoch" entry, an epoch counted from 1 (a whole float such as 199.0 counts as that epoch); None when
    missing or unusable (0, a fraction, text), since it is bookkeeping beside best_top1 and moves no mean."""
    epoch = data.get("best_epoch")
    if isinstance(epoch, float) and epoch.is_integer():
        epoch = int(epoch)
    return epoch if isinstance(epoch, int) and not isinstance(epoch, bool) and epoch >= 1 else None


def _train_digest(data: dict) -> str | None:
    """The "train_digest" entry (None when the run does not record one), checked."""
    digest = data.get("train_digest")
    if digest is not None and not (isinstance(digest, str) and digest):
        raise ValueError(f"'train_digest' must be a non-empty string, got {digest!r:.80}")
    return digest


def parse_result(data: object, path: str) -> RunResult:
    """Check and extract one parsed results.json; raise ValueError saying what is wrong."""
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    for key in ("dataset", "method", "seed", "epochs", "best_top1", "last_top1"):
        if key not in data:
            raise ValueError(f"missing key '{key}'")
    for key in ("dataset", "method"):
        if not isinstance(data[key], str):
            raise ValueError(f"'{key}' must be a string, got {data[key]!r}")
    if "imbalance_ratio" in data:
        ratio = _number(data, "imbalance_ratio")
    elif "imb_factor" in data:
        imb_factor = _number(data, "imb_factor")
        if not 0.0 < imb_factor <= 1.0:
            raise ValueError(f"'imb_factor' must be in (0, 1], got {imb_factor!r}")
        ratio = 1.0 / imb_factor
    else:
        raise ValueError("missing key 'imbalance_ratio' (and 'imb_factor')")
    if not (math.isfinite(ratio) and ratio >= 1.0):
        raise ValueError(f"'imbalance_ratio' must be a finite number >= 1, got {ratio!r}")
    integers = {}
    for key in ("seed", "epochs"):
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"'{key}' must be an integer, got {value!r}")
        integers[key] = value
    decay = data.get("lr_decay_epochs", [])
    if not isinstance(decay, list) or not all(isinstance(e, int) and not isinstance(e, bool) for e in decay):
        raise ValueError(f"'lr_decay_epochs' must be a list of integers, got {decay!r}")
    config = data.get("config", {})
    if not isinstance(config, dict):
        raise ValueError(f"'config' must be an object, got {config!r}")
    batch_size = data.get("batch_size", config.get("batch_size"))
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)):
        raise ValueError(f"'batch_size' must be an integer, got {batch_size!r}")
    best_top1, last_top1 = _number(data, "best_top1"), _number(data, "last_top1")
    for key, value in (("best_top1", best_top1), ("last_top1", last_top1)):
        if not 0.0 <= value <= 100.0:
            raise ValueError(f"'{key}' must be a percentage in 0..100, got {value!r}")
    imb_type = data.get("imb_type", "exp")
    if not isinstance(imb_type, str):
        raise ValueError(f"'imb_type' must be a string, got {imb_type!r}")
    settings = {**FLAGS_ADDED_LATER, **{name: value for name, value in config.items() if name not in NOT_RECIPE}}
    if "world_size" in data:  # processes under torchrun: per-process BatchNorm statistics
        settings["world_size"] = data["world_size"]
        if data["world_size"] == 1 and settings.get("sync_bn") is True:  # nothing to synchronise: plain batch norm
            settings["sync_bn"] = False
    for flag, field in RESOLVED.items():
        if data.get(field) is not None:
            settings[flag] = data[field]
        elif settings.get(flag) is None:
            settings.pop(flag, None)  # left at its default, and what that resolved to is not recorded: '?'
    if settings.get("base_temp") is not None and settings.get("base_temp") == settings.get("temp"):
        settings["base_temp"] = None  # the SC loss's factor temp / base_temp is 1, as with no --base_temp
    for flag, methods in USED_BY.items():
        if data["method"] not in methods:
            settings.pop(flag, None)
    per_class, class_counts = _per_class(data)
    if class_counts is not None:  # the training split: a subset or synthetic data is another experiment
        settings["split"] = f"{sum(class_counts):,} images, {class_counts[0]}..{class_counts[-1]} per class"
    recipe = tuple(sorted((name, json.dumps(value, sort_keys=True)) for name, value in settings.items()))
    return RunResult(
        path=path, dataset=data["dataset"], method=data["method"], imb_type=imb_type,
        imbalance_ratio=ratio, seed=integers["seed"], epochs=integers["epochs"],
        lr_decay_epochs=tuple(decay), batch_size=batch_size,
        best_top1=best_top1, last_top1=last_top1,
        many=_shot_accuracy(data, "many"), medium=_shot_accuracy(data, "medium"),
        few=_shot_accuracy(data, "few"),
        wall_time_s=_duration(data, "wall_time_s"),
        recipe=recipe, per_class=per_class, class_counts=class_counts, ncm_top1=_ncm_top1(data),
        class_names=_class_names(data, per_class),
        train_digest=_train_digest(data), best_epoch=_best_epoch(data),
        samples_per_s=_duration(data, "samples_per_s"), train_time_s=_duration(data, "train_time_s"),
    )


# ---- grouping and statistics (pure) ----------------------------------------------------------

def group_key(run: RunResult) -> GroupKey:
    """The key without the recipe variant (see split_by_recipe)."""
    # Rounded so that 1/0.02 computed two ways still lands in one group.
    return GroupKey(run.dataset, run.method, run.imb_type, round(run.imbalance_ratio, 3),
                    run.epochs, run.lr_decay_epochs, run.batch_size)


UNRECORDED = "?"  # a run without a setting that splits its group (made before the flag existed)


def reference_recipe(key: GroupKey) -> dict[str, str]:
    """The settings (name -> JSON value) that the paper's or the literature's value of this group's method
    assumes: its form, and for the hybrids at the paper's schedule also the paper's hyper-parameters."""
    recipe = dict(REFERENCE_RECIPE.get(key.method, {}))
    if key.method in PAPER_TEMPERATURES and is_paper_schedule(key):
        recipe.update(PAPER_HYPERPARAMETERS)
        name, by_dataset = PAPER_TEMPERATURES[key.method]
        if key.dataset in by_dataset:  # a dataset the paper has no value for has no reference row either
            recipe[name] = by_dataset[key.dataset]
    return {name: json.dumps(value) for name, value in recipe.items()}


def split_by_recipe(key: GroupKey, runs: list[RunResult]) -> dict[GroupKey, list[RunResult]]:
    """The runs of one group split by the recipe settings they differ in, each part keyed with those
    settings as its variant. A setting splits the group when the runs that record it hold more than one value, or
    one value other than the reference value's (a label that runs of the paper's form never get); runs that do not
    record such a setting form their own part ("name=?"): whether they used that value is not known."""
    recipes = [dict(run.recipe) for run in runs]
    values: dict[str, set[str]] = {}
    for recipe in recipes:
        for name, encoded in recipe.items():
            values.setdefault(name, set()).add(encoded)
    reference = reference_recipe(key)
    differing = sorted(name for name, seen in values.items()
                       if len(seen) > 1 or (name in reference and seen != {reference[name]}))
    if not differing:
        return {key: runs}
    parts: dict[tuple[tuple[str, str], ...], list[RunResult]] = {}
    for run, recipe in zip(runs, recipes):
        variant = tuple((name, recipe.get(name, UNRECORDED)) for name in differing)
        parts.setdefault(variant, []).append(run)
    return {replace(key, variant=variant): members for variant, members in parts.items()}


def group_runs(runs: list[RunResult]) -> dict[GroupKey, list[RunResult]]:
    """Runs by group, each group sorted by seed; a seed twice in one group is a SummaryError."""
    by_key: dict[GroupKey, list[RunResult]] = {}
    for run in runs:
        by_key.setdefault(group_key(run), []).append(run)
    groups: dict[GroupKey, list[RunResult]] = {}
    for key, members in by_key.items():
        groups.update(split_by_recipe(key, members))
    doubled = []  # (seed, its runs' folders) for each seed that a group holds more than once
    for members in groups.values():
        members.sort(key=lambda run: run.seed)
        by_seed: dict[int, list[RunResult]] = {}
        for run in members:
            by_seed.setdefault(run.seed, []).append(run)
        doubled += [(seed, [Path(run.path).parent for run in runs]) for seed, runs in by_seed.items() if len(runs) > 1]
    if doubled:  # all of them at once: one rerun of the summary, not one per pair
        shown = "; ".join(f"seed {seed} in {', '.join(map(str, folders))}" for seed, folders in doubled[:FOLDERS_NAMED])
        more = f"; and {len(doubled) - FOLDERS_NAMED} more" if len(doubled) > FOLDERS_NAMED else ""
        raise SummaryError(f"{_plural(len(doubled), 'seed')} of a row {'is' if len(doubled) == 1 else 'are'} in more "
                           f"than one run, which would weigh double in the row's mean: {shown}{more}; keep one run "
                           f"of each (leave the others out with --exclude GLOB, or summarise the folders without them)")
    return groups


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample std (ddof=1) of values; std None for a single value."""
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), (float(array.std(ddof=1)) if array.size > 1 else None)


def _mean_present(values: list[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return float(np.mean(present)) if present else None


def is_paper_schedule(key: GroupKey) -> bool:
    """200 epochs, lr x0.1 at 120 and 160, batch 512 (batch unknown counts as not checked)."""
    return (key.epochs == PAPER_EPOCHS and key.lr_decay_epochs == PAPER_LR_DECAY_EPOCHS
            and key.batch_size in (None, PAPER_BATCH_SIZE))


def reference_top1(key: GroupKey) -> tuple[float, str] | None:
    """(top-1 %, "paper" | "literature") for this configuration, or None when there is none."""
    ratio = round(key.imbalance_ratio)
    if key.imb_type != "exp" or abs(key.imbalance_ratio - ratio) > 1e-6:
        return None
    table_key = (key.dataset, key.method, ratio)
    recipe = reference_recipe(key)
    if any(recipe.get(name, encoded) != encoded for name, encoded in key.variant):
        return None  # another form of the method than the one the value was measured with
    if table_key in PAPER_TOP1:
        return PAPER_TOP1[table_key], "paper"
    if table_key in LITERATURE_TOP1:
        return LITERATURE_TOP1[table_key], "literature"
    return None


def summarize_group(key: GroupKey, runs: list[RunResult]) -> GroupSummary:
    """One row from the runs of one group (all seeds)."""
    best_mean, best_std = mean_std([run.best_top1 for run in runs])
    last_mean, last_std = mean_std([run.last_top1 for run in runs])
    paper_schedule = is_paper_schedule(key)
    full_split = all(run.full_split for run in runs)
    reference = reference_top1(key) if paper_schedule and full_split else None
    diff = None
    if reference is not None and reference[1] == "paper":
        diff = last_mean - reference[0]
    per_class_mean = per_class_std = counts = None
    if all(run.per_class is not None for run in runs) and len({run.class_counts for run in runs}) == 1:
        counts = runs[0].class_counts
        stats = [mean_std([run.per_class[c] for run in runs]) for c in range(len(counts))]
        per_class_mean, per_class_std = tuple(m for m, _ in stats), tuple(sd for _, sd in stats)
    return GroupSummary(
        key=key, seeds=tuple(run.seed for run in runs),
        best_top1_mean=best_mean, best_top1_std=best_std,
        last_top1_mean=last_mean, last_top1_std=last_std,
        many=_mean_present([run.many for run in runs]),
        medium=_mean_present([run.medium for run in runs]),
        few=_mean_present([run.few for run in runs]),
        wall_time_s=_mean_present([run.wall_time_s for run in runs]),
        paper_schedule=paper_schedule,
        reference_top1=None if reference is None else reference[0],
        reference_source=None if reference is None else reference[1],
        diff=diff, per_class_mean=per_class_mean, per_class_std=per_class_std, class_counts=counts,
        class_names=runs[0].class_names if len({run.class_names for run in runs}) == 1 else None,
        ncm_top1=(None if any(run.ncm_top1 is None for run in runs)
                  else float(np.mean([run.ncm_top1 for run in runs]))),
        train_sets=max(len({run.train_digest for run in runs if run.train_digest is not None}), 1),
        full_split=full_split, runs=tuple(runs),
    )


def _row_order(summary: GroupSummary) -> tuple:
    key = summary.key
    rank = lambda order, value: order.index(value) if value in order else len(order)  # noqa: E731
    return (rank(DATASET_ORDER, key.dataset), key.dataset, key.imb_type,
            rank(METHOD_ORDER, key.method), key.method, -key.imbalance_ratio,
            not summary.paper_schedule, -key.epochs, key.lr_decay_epochs, key.batch_size or 0,
            variant_text(key))


def summarize(runs: list[RunResult]) -> list[GroupSummary]:
    """Table rows: dataset, then method (SC, PSC, CE), then ratio high to low, paper schedule first."""
    rows = [summarize_group(key, members) for key, members in group_runs(runs).items()]
    return sorted(rows, key=_row_order)


# ---- formatting (pure) -----------------------------------------------------------------------

def format_duration(seconds: float | None) -> str:
    """Human-readable: '45s', '12m 05s', '3h 07m'; '—' when unknown or unusable (NaN, infinite, negative)."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "—"
    total = int(round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def _ratio_text(key: GroupKey) -> str:
    ratio = f"{key.imbalance_ratio:g}"
    return ratio if key.imb_type == "exp" else f"{ratio} ({key.imb_type})"


def schedule_text(key: GroupKey, paper_schedule: bool, detailed: bool = False) -> str:
    """'200' on the paper schedule; otherwise says which schedule, e.g. 'short schedule: 20 epochs', with the
    lr decay epochs and the batch size when longer than the paper's or `detailed` (to tell two rows apart)."""
    batch = "?" if key.batch_size is None else str(key.batch_size)
    if paper_schedule:  # detailed: a run that does not record its batch size beside one that does
        return f"{key.epochs}, batch {batch}" if detailed else str(key.epochs)
    decay = ",".join(str(e) for e in key.lr_decay_epochs) or "none"
    if key.epochs < PAPER_EPOCHS:
        short = f"short schedule: {_plural(key.epochs, 'epoch')}"
        return f"{short}, lr decay at {decay}, batch {batch}" if detailed else short
    return f"other schedule: {key.epochs} epochs, lr decay at {decay}, batch {batch}"


def distinct_schedules(rows: list[GroupSummary], label: Callable[[GroupSummary], tuple]) -> list[str]:
    """Each row's schedule_text, in full for rows that would otherwise look alike: same `label` and the same
    short text (e.g. two 20-epoch runs with other lr decay epochs)."""
    looks = [(label(row), schedule_text(row.key, row.paper_schedule)) for row in rows]
    alike = Counter(looks)
    return [schedule_text(row.key, row.paper_schedule, detailed=alike[look] > 1) for row, look in zip(rows, looks)]


def variant_text(key: GroupKey) -> str:
    """'ce_sampler=sqrt, temp=0.07' (JSON null shows as 'auto', lists comma-joined); '' for none."""
    def value_text(encoded: str) -> str:
        if encoded == UNRECORDED:
            return UNRECORDED
        value = json.loads(encoded)
        if value is None:
            return "auto"
        if isinstance(value, list):
            return ",".join(str(v) for v in value)
        return str(value)
    return ", ".join(f"{name}={value_text(encoded)}" for name, encoded in key.variant)


def _method_text(key: GroupKey) -> str:
    label = METHOD_LABELS.get(key.method, key.method)
    return f"{label} [{variant_text(key)}]" if key.variant else label


def _pm(mean: float, std: float | None) -> str:
    return f"{mean:.2f} ± {'n/a' if std is None else f'{std:.2f}'}"


def _opt(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _row_place(row: GroupSummary) -> str:
    """A row named in a footnote: "CIFAR-10-LT Hybrid-SC at ratio 100"."""
    key = row.key
    return f"{DATASET_LABELS.get(key.dataset, key.dataset)} {_method_text(key)} at ratio {_ratio_text(key)}"


def _table_place(row: GroupSummary) -> tuple:
    """What tells a row of the main table (and its runs under --per_run) from the others but for its schedule."""
    return row.key.dataset, _method_text(row.key), _ratio_text(row.key)


def format_markdown(rows: list[GroupSummary]) -> str:
    """The markdown table with its footnotes; the NCM column only where some row has the value (runs made before
    results.json recorded it keep the table they had)."""
    with_ncm = any(row.ncm_top1 is not None for row in rows)
    header = ("dataset", "method", "imb. ratio", "seeds", "best top-1", "last top-1",
              "many", "medium", "few", *(("NCM top-1",) if with_ncm else ()), "epochs", "wall time", "paper top-1",
              "diff")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    schedules = distinct_schedules(rows, _table_place)
    for row, schedule in zip(rows, schedules):
        key = row.key
        if not row.paper_schedule:
            reference, diff = "n/c", "n/c"
        elif row.reference_top1 is None:
            reference, diff = "—", "—"
        elif row.reference_source == "literature":
            reference, diff = f"{row.reference_top1:.2f} (lit.)", "—"
        else:
            # From the two values as shown, so that the three cells add up (rounding each on its own may not).
            shown = float(f"{row.last_top1_mean:.2f}") - float(f"{row.reference_top1:.2f}")
            reference, diff = f"{row.reference_top1:.2f}", f"{shown:+.2f}"
        cells = (
            DATASET_LABELS.get(key.dataset, key.dataset), _method_text(key),
            _ratio_text(key), f"{len(row.seeds)} ({', '.join(str(s) for s in row.seeds)})",
            _pm(row.best_top1_mean, row.best_top1_std), _pm(row.last_top1_mean, row.last_top1_std),
            _opt(row.many), _opt(row.medium), _opt(row.few), *((_opt(row.ncm_top1),) if with_ncm else ()),
            schedule, format_duration(row.wall_time_s), reference, diff,
        )
        lines.append("| " + " | ".join(cells) + " |")
    notes = [
        "- Top-1 in %, mean ± sample std (ddof=1) over seeds; 'n/a' with a single seed. 'best' is the "
        "best epoch on the test set (optimistic), 'last' the final epoch. many / medium / few: last "
        "epoch, mean over seeds, classes with >100 / 20..100 / <20 training images; '—': no class "
        "in that group at this ratio. Wall time: mean per run.",
        *(["- NCM top-1: the test set classified by the nearest class mean of the backbone features (no "
            "classifier) at the end of each run, mean over seeds; '—' where a run of the row does not record it."]
          if with_ncm else []),
        "- The paper (Wang et al., CVPR 2021, Table 1) reports a single top-1 per cell, without seeds "
        "or spread and without saying which epoch; 'diff' = our last top-1 mean − paper top-1.",
        f"- Paper schedule: {PAPER_EPOCHS} epochs, lr x0.1 at epochs "
        f"{' and '.join(str(e) for e in PAPER_LR_DECAY_EPOCHS)}, batch {PAPER_BATCH_SIZE}. Rows on "
        "any other schedule are marked in 'epochs' and show 'n/c' (not comparable) instead of the "
        "paper value and difference.",
        "- (lit.): the paper has no CE number; 70.36 is plain cross-entropy as reported in the "
        "literature (Cao et al. 2019), a different recipe from ours, so no difference is shown.",
    ]
    if any(row.key.variant for row in rows):
        notes.append("- [name=value]: runs with the same method, ratio and schedule that differ in these "
                     "training settings of their saved config (or in world_size, the number of "
                     "processes) are reported apart; '?': the run does not record the setting. At the paper's "
                     "schedule, a row with another model than resnet32 or in another form of the method than the "
                     "paper's (alpha_schedule other than parabolic, sc_aug other than paper, sc_sampler other than "
                     "instance, ce_sampler other than class, feat_dim other than 128, for Hybrid-SC a base_temp "
                     "other than its temp, for Hybrid-PSC psc_denominator other than negatives), for a hybrid "
                     "with other hyper-parameters than the paper states (learning_rate 0.5, momentum 0.9, "
                     "weight_decay 1e-4, lr_decay_rate 0.1, "
                     "gray_prob 0.2, temp 0.1, "
                     "psc_temp 1.0 on CIFAR-10 and 0.1 on CIFAR-100) or, for CE, with a ce_sampler other than "
                     "instance has no reference value ('—').")
    other_split = [row for row in rows if not row.full_split]  # (on a short schedule too: n/c says nothing of it)
    if other_split:
        labels = "; ".join(_row_place(row) + ("" if row.paper_schedule else f", {text}")  # as the epochs column
                           for row, text in zip(other_split, distinct_schedules(other_split, _table_place)))
        so = ", so no reference value ('—')" if any(row.paper_schedule for row in other_split) else ""
        notes.append(f"- Trained on another split than the full dataset's long-tailed one (the largest class not "
                     f"{' / '.join(f'{n:,}' for _, n in FULL_SPLIT.values())} images: a subset, or synthetic "
                     f"data){so}: {labels}.")
    mixed = [row for row in rows if row.train_sets > 1]
    if mixed:
        labels = "; ".join(f"{_row_place(row)}, seeds {', '.join(str(s) for s in row.seeds)} ({row.train_sets} "
                           f"sets)" for row in mixed)
        notes.append(f"- Seeds trained on different images, averaged together: {labels}. Their results.json hold "
                     "different train_digest values (the training images and labels): other copies of the data "
                     "(such as a JPEG copy and the original).")
    return "\n".join(lines + [""] + notes) + "\n"


def _row_labels(rows: list[GroupSummary]) -> list[str]:
    """Per-class column headings: each row's method and variant, its schedule unless the paper's (in full where
    two rows would otherwise look alike), and its seeds."""
    schedules = distinct_schedules(rows, lambda row: (_method_text(row.key),))
    seeds = [_plural(len(row.seeds), "seed") for row in rows]
    return [f"{_method_text(row.key)}{'' if row.paper_schedule else ', ' + schedule} ({n})"
            for row, schedule, n in zip(rows, schedules, seeds)]


def per_class_tables(rows: list[GroupSummary]) -> list[tuple[str, list[GroupSummary]]]:
    """(heading, rows) per dataset, imb_type and ratio, in table order; rows without per-class values are
    left out (per_class_notes says which)."""
    tables: dict[tuple, list[GroupSummary]] = {}
    for row in rows:
        if row.per_class_mean is not None:
            key = row.key
            tables.setdefault((key.dataset, key.imb_type, key.imbalance_ratio, row.class_counts), []).append(row)
    headings = [f"{DATASET_LABELS.get(dataset, dataset)}, imbalance ratio {_ratio_text(members[0].key)}, "
                f"{counts[0]} .. {counts[-1]} training images per class"
                for (dataset, _, _, counts), members in tables.items()]
    return list(zip(headings, tables.values()))


def format_per_class_markdown(rows: list[GroupSummary]) -> str:
    """Each row's last-epoch top-1 per class (mean over seeds), one table per dataset and ratio."""
    blocks = []
    for heading, members in per_class_tables(rows):
        counts = members[0].class_counts
        names = members[0].class_names if len({row.class_names for row in members}) == 1 else None
        header = ["class", "train images"] + _row_labels(members)
        lines = [f"Per-class top-1 at the last epoch, {heading} (mean over seeds):", "",
                 "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for c, count in enumerate(counts):
            named = str(c) if names is None else f"{c} {_text_cell(names[c])}"
            lines.append("| " + " | ".join([named, str(count)] + [f"{row.per_class_mean[c]:.2f}" for row in members])
                         + " |")
        blocks.append("\n".join(lines))
    missing = [row for row in rows if row.per_class_mean is None]
    if missing:
        blocks.append("No per-class values (a run that does not record them, or seeds trained on different "
                      "class sizes): " + "; ".join(f"{DATASET_LABELS.get(r.key.dataset, r.key.dataset)} ratio "
                                                   f"{_ratio_text(r.key)} {label}"
                                                   for r, label in zip(missing, _row_labels(missing))))
    return "\n\n".join(blocks) + "\n" if blocks else ""


def _printable(text: object) -> str:
    """text with its characters that are not printable (a line break, a terminal's escape sequence) shown as
    escapes: one line (this script's twin of util.printable; it imports nothing from the project)."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in str(text))


def _text_cell(text: str) -> str:
    """text in one markdown table cell: control characters shown as escapes, '|' escaped (GFM ends a cell at it)."""
    return _printable(text).replace("|", "\\|")


def _code_cell(text: str) -> str:
    """text as inline code in one markdown table cell: a newline shown as \\n, '|' escaped (GFM ends a cell at
    it, in code too), and a fence of more backticks than any run of them inside (with spaces, as CommonMark
    strips one from each end)."""
    text = text.replace("\n", "\\n").replace("\r", "\\r").replace("|", "\\|")
    longest = max((len(run) for run in re.findall("`+", text)), default=0)
    return f"`{text}`" if not longest else f"{'`' * (longest + 1)} {text} {'`' * (longest + 1)}"


def format_per_run_markdown(rows: list[GroupSummary]) -> str:
    """A table of one line per run, in the main table's order of rows (each line naming its row), by seed: its
    seed, accuracies, rate, times and folder, so that a row's mean can be traced to the runs behind it."""
    with_ncm = any(run.ncm_top1 is not None for row in rows for run in row.runs)
    header = ("dataset", "method", "imb. ratio", "epochs", "seed", "best top-1 (epoch)", "last top-1", "many",
              "medium", "few", *(("NCM top-1",) if with_ncm else ()), "samples/s", "train time", "wall time",
              "folder")
    lines = ["Runs, one line each:", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    schedules = distinct_schedules(rows, _table_place)
    for row, schedule in zip(rows, schedules):
        key = row.key
        for run in row.runs:
            best = f"{run.best_top1:.2f}" + ("" if run.best_epoch is None else f" ({run.best_epoch})")
            rate = "—" if run.samples_per_s is None else f"{run.samples_per_s:,.0f}"
            cells = (DATASET_LABELS.get(key.dataset, key.dataset), _method_text(key), _ratio_text(key), schedule,
                     str(run.seed), best, f"{run.last_top1:.2f}", _opt(run.many), _opt(run.medium), _opt(run.few),
                     *((_opt(run.ncm_top1),) if with_ncm else ()), rate, format_duration(run.train_time_s),
                     format_duration(run.wall_time_s), _code_cell(run.folder))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


PER_RUN_CSV_COLUMNS = ("dataset", "method", "variant", "imb_type", "imbalance_ratio", "epochs", "lr_decay_epochs",
                       "batch_size", "paper_schedule", "seed", "best_top1", "best_epoch", "last_top1", "many",
                       "medium", "few", "ncm_top1", "samples_per_s", "train_time_s", "wall_time_s", "folder")


def format_per_run_csv(rows: list[GroupSummary]) -> str:
    """One line per run (format_per_run_markdown's), unformatted; empty cells where a value is not recorded."""
    lines = []
    for row in rows:
        cells = {name: value for name, value in _key_cells(row).items() if name not in ("n_seeds", "seeds")}
        for run in row.runs:
            lines.append({**cells, "seed": run.seed, "best_top1": repr(run.best_top1),
                          "best_epoch": "" if run.best_epoch is None else run.best_epoch,
                          "last_top1": repr(run.last_top1), "many": _csv_number(run.many),
                          "medium": _csv_number(run.medium), "few": _csv_number(run.few),
                          "ncm_top1": _csv_number(run.ncm_top1), "samples_per_s": _csv_number(run.samples_per_s),
                          "train_time_s": _csv_number(run.train_time_s),
                          "wall_time_s": _csv_number(run.wall_time_s), "folder": run.folder})
    return _write_csv(PER_RUN_CSV_COLUMNS, lines)


PER_CLASS_CSV_COLUMNS = ("dataset", "method", "variant", "imb_type", "imbalance_ratio", "epochs", "lr_decay_epochs",
                         "batch_size", "paper_schedule", "n_seeds", "seeds", "class", "class_name", "train_images",
                         "top1_mean", "top1_std")


def _key_cells(row: GroupSummary) -> dict[str, object]:
    """The CSV cells that say which row this is (its group key, seeds and schedule), by column name."""
    key = row.key
    return {"dataset": DATASET_LABELS.get(key.dataset, key.dataset),
            "method": METHOD_LABELS.get(key.method, key.method), "variant": variant_text(key),
            "imb_type": key.imb_type, "imbalance_ratio": repr(key.imbalance_ratio),
            "n_seeds": len(row.seeds), "seeds": " ".join(str(s) for s in row.seeds), "epochs": key.epochs,
            "lr_decay_epochs": " ".join(str(e) for e in key.lr_decay_epochs),
            "batch_size": "" if key.batch_size is None else key.batch_size, "paper_schedule": row.paper_schedule}


def _write_csv(columns: tuple[str, ...], lines) -> str:
    """CSV text of these columns, from one dict (column -> cell) per line."""
    rows = [[line[name] for name in columns] for line in lines]
    # Python before 3.13 leaves a cell with a carriage return (a folder's name) unquoted under "\n" line ends,
    # which splits its line for a reader: then every cell is quoted.
    carriage_return = any(isinstance(cell, str) and "\r" in cell for row in rows for cell in row)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n", quoting=csv.QUOTE_ALL if carriage_return else csv.QUOTE_MINIMAL)
    writer.writerow(columns)
    writer.writerows(rows)
    return buffer.getvalue()


def format_per_class_csv(rows: list[GroupSummary]) -> str:
    """One line per row and class: the last-epoch top-1 mean and std over seeds (empty std for one seed)."""
    return _write_csv(PER_CLASS_CSV_COLUMNS, (
        {**_key_cells(row), "class": c, "class_name": "" if row.class_names is None else row.class_names[c],
         "train_images": count, "top1_mean": _csv_number(row.per_class_mean[c]),
         "top1_std": _csv_number(row.per_class_std[c])}
        for row in rows if row.per_class_mean is not None for c, count in enumerate(row.class_counts)))


def _csv_number(value: float | None) -> str:
    return "" if value is None else repr(value)


def format_csv(rows: list[GroupSummary]) -> str:
    """The same rows as CSV with unformatted numbers; empty cells where markdown shows n/a, — or n/c."""
    return _write_csv(CSV_COLUMNS, (
        {**_key_cells(row),
         "best_top1_mean": _csv_number(row.best_top1_mean), "best_top1_std": _csv_number(row.best_top1_std),
         "last_top1_mean": _csv_number(row.last_top1_mean), "last_top1_std": _csv_number(row.last_top1_std),
         "many_mean": _csv_number(row.many), "medium_mean": _csv_number(row.medium), "few_mean": _csv_number(row.few),
         "ncm_top1_mean": _csv_number(row.ncm_top1),
         "wall_time_s_mean": _csv_number(row.wall_time_s), "reference_top1": _csv_number(row.reference_top1),
         "reference_source": row.reference_source or "", "diff_last_minus_reference": _csv_number(row.diff)}
        for row in rows))


# ---- I/O -------------------------------------------------------------------------------------

def _kind(path: Path) -> str | None:
    """"file", "dir" or None (nothing there); a path that cannot be looked at (a name too long, a folder on the
    way that cannot be entered) is a SummaryError, where Path.is_file would raise."""
    try:
        return "file" if path.is_file() else "dir" if path.is_dir() else None
    except OSError as error:
        raise SummaryError(f"cannot look at {path}: {error.strerror or error}") from None


def excluded(folder: Path, patterns: list[str]) -> bool:
    """Whether the run folder (as found under the given folders) matches one of --exclude's patterns (fnmatch: its
    path, or its name alone)."""
    return any(fnmatch.fnmatch(str(folder), pattern) or fnmatch.fnmatch(folder.name, pattern)
               for pattern in patterns)


def find_result_files(paths: list[str], exclude: list[str] = ()) -> list[Path]:
    """Every results.json under the given folders (or the given files themselves), each once, but those of run
    folders that `exclude` names."""
    found: dict[Path, Path] = {}
    for name in paths:
        path = Path(name)
        kind = _kind(path)
        if kind == "file":
            candidates = [path]
        elif kind == "dir":
            candidates = sorted(path.rglob("results.json"))
        else:
            raise SummaryError(f"no such file or folder: {name}")
        for candidate in candidates:
            if excluded(candidate.parent, exclude):
                continue
            if _kind(candidate) != "file":  # a folder, or a pipe that reading would wait on forever
                raise SummaryError(f"{candidate} is not a file, so not a run's results: move it away")
            found.setdefault(candidate.resolve(), candidate)  # overlapping folders count once
    return list(found.values())


def find_unfinished(paths: list[str], exclude: list[str] = ()) -> list[Path]:
    """Run folders under the given folders that main.py started (config.json) but that hold no results.json: runs
    still going, stopped or failed, which the summary leaves out (but those `exclude` names)."""
    found: dict[Path, Path] = {}
    for name in paths:
        path = Path(name)
        if _kind(path) == "dir":  # find_result_files looked at each path already
            for config in sorted(path.rglob("config.json")):
                if not (config.parent / "results.json").exists() and not excluded(config.parent, exclude):
                    found.setdefault(_resolved(config.parent), config.parent)
    return list(found.values())


def with_resolved_defaults(data: object, config_file: Path) -> object:
    """results.json made before it recorded RESOLVED's fields: those fields from the config.json that
    main.py writes beside it (which has always held them), where that file is there and readable."""
    if not isinstance(data, dict) or all(field in data for field in RESOLVED.values()):
        return data
    try:
        if not config_file.is_file():  # reading a pipe there would wait forever
            return data
        config = read_json(config_file)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: nested too deep
        return data  # no usable config.json: those settings stay unrecorded
    if not isinstance(config, dict):
        return data
    return {**{field: config.get(field) for field in RESOLVED.values()}, **data}


# The most of a JSON file read_json reads: a run's config.json or results.json is some 50 KB, and a larger file
# (a sparse one of many GB, say) read whole could take all the memory. (util.read_json does the same; this script
# stays standalone.)
JSON_MAX_BYTES = 64 << 20


def read_json(path: Path) -> Any:
    """json.loads of the UTF-8 file `path`; a ValueError where it is larger than JSON_MAX_BYTES."""
    with open(path, "rb") as f:
        content = f.read(JSON_MAX_BYTES + 1)
    if len(content) > JSON_MAX_BYTES:
        raise ValueError(f"it is larger than {JSON_MAX_BYTES >> 20} MiB, far more than a run writes there")
    return json.loads(content.decode("utf-8"))


def load_runs(files: list[Path]) -> list[RunResult]:
    runs = []
    for file in files:
        try:
            data = with_resolved_defaults(read_json(file), file.parent / "config.json")
            runs.append(parse_result(data, str(file)))
        # JSONDecodeError is a ValueError; json.loads raises RecursionError on arrays or objects nested too deep.
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise SummaryError(f"malformed results file {file}: {message}") from error
    return runs


def _resolved(path: Path) -> Path:
    """path.resolve(), or path itself where that fails (a symlink loop): such a path names no file we read."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return path


# What main.py writes into a run folder (main.RUN_FILES, its TensorBoard events and projector config; repeated here
# so that summarising needs no torch): an --out there would replace a run's checkpoint or record with a table.
RUN_FOLDER_FILES = ("config.json", "last.pt", "best.pt", "results.json", "projector_config.pbtxt")
EVENTS_PREFIX = "events.out.tfevents."


def check_out(out: str, files: list[Path]) -> None:
    """Refuse an --out that names a folder or a file the summary reads (a results.json, or the config.json
    beside one), or a file main.py writes in a run folder, one the summary reads or any other (a checkpoint,
    TensorBoard events): replacing a run's record with the table would lose it."""
    target = _resolved(Path(out))
    kind = _kind(target)
    if kind == "dir":
        raise SummaryError(f"--out {out} is a folder; give a file name")
    if kind is None and os.path.lexists(target):  # a device (/dev/null, /dev/stdout), a pipe, a socket
        raise SummaryError(f"--out {out} is not a regular file (a device, a pipe or a socket), which writing the "
                           "table would replace; give a file name, or leave --out out to print the table")
    for file in files:
        for read in (file, file.parent / "config.json"):
            if target == _resolved(read):
                raise SummaryError(f"--out {out} would replace {read}, which this summary reads; "
                                   "give another file")
    run_folders = {_resolved(file.parent) for file in files}
    # A run folder the summary does not read counts too: one left out as unfinished (its last.pt is all that run
    # has), or any other run's (a config.json, checkpoint or results.json of main.py's there).
    in_a_run = target.parent in run_folders or any(os.path.lexists(target.parent / name)
                                                   for name in RUN_FOLDER_FILES[:4])
    if in_a_run and (target.name in RUN_FOLDER_FILES or target.name.startswith(EVENTS_PREFIX)):
        raise SummaryError(f"--out {out} would replace a file of the run in {target.parent}; give another file")


def write_atomic(path: Path, text: str) -> None:
    """Write text to a temporary file beside path, fsync it, then rename it over path: a reader sees the old
    table or the new one, and a failed write (disk full) leaves the old one as it was. (util.atomic_write does
    the same; this script stays standalone.)"""
    try:
        mode = path.stat().st_mode & 0o7777  # an existing table keeps its permissions, as with write_text
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask  # what open() would create; mkstemp makes the file private
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # errors: a folder name that is not UTF-8 (Python's surrogate escapes) as \udcff, not a UnicodeEncodeError
        with os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace") as f:
            f.write(text)
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


def _stdout_errors(error: UnicodeError) -> tuple[str, int]:
    """The characters standard output cannot encode: a folder name's undecodable bytes (Python's surrogate escapes)
    as a backslash escape, as write_atomic writes them to --out; others (a '±' on an ASCII terminal) as '?'."""
    if not isinstance(error, UnicodeEncodeError):
        raise error
    bad = error.object[error.start:error.end]
    return "".join(f"\\u{ord(c):04x}" if 0xDC80 <= ord(c) <= 0xDCFF else "?" for c in bad), error.end


STDOUT_ERRORS = "summarize.stdout"
codecs.register_error(STDOUT_ERRORS, _stdout_errors)


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line (plus exit 2), like every other bad input (as main.py's parser)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {_printable(message)} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="summarize.py",  # the name every other error line uses, also when main() is called in-process
        description="Summarise finished runs (every results.json under the given folders) as Table 1.")
    parser.add_argument("paths", nargs="+", metavar="DIR", help="run folders or their parents (searched recursively)")
    parser.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                        help="leave out the run folders whose path as found (or name alone) matches GLOB, e.g. "
                             "'runs/old/*' or '*_s3' (repeatable)")
    parser.add_argument("--csv", action="store_true", help="print CSV instead of markdown")
    parser.add_argument("--out", metavar="FILE", help="write the table to FILE instead of stdout")
    parser.add_argument("--per_class", action="store_true",
                        help="add each row's last-epoch top-1 per class (with --csv: print those instead)")
    parser.add_argument("--per_run", action="store_true",
                        help="add a table of one line per run, each naming its row: seed, best top-1 and its epoch, "
                             "last top-1, shot groups, NCM top-1, samples/s, times and folder (with --csv: print those "
                             "instead)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if "" in args.paths:  # Path("") is the current folder: never what an empty variable in a script meant
            raise SummaryError("an empty folder name; give run folders or their parents")
        if args.out == "":
            raise SummaryError("--out is empty: give a file name, or drop --out to print the table")
        if args.csv and args.per_class and args.per_run:
            raise SummaryError("--csv prints one table: give --per_class or --per_run, not both (markdown takes both)")
        files = find_result_files(args.paths, args.exclude)
        unfinished = find_unfinished(args.paths, args.exclude)
        named = ", ".join(str(folder) for folder in unfinished[:FOLDERS_NAMED])
        more = f" and {len(unfinished) - FOLDERS_NAMED} more" if len(unfinished) > FOLDERS_NAMED else ""
        if not files:
            there = (f" (only {_plural(len(unfinished), 'run folder')} without one, running, stopped or failed: "
                     f"{named}{more})" if unfinished else "")
            raise SummaryError(f"no results.json found under {' '.join(args.paths)}"
                               f"{' but those --exclude names' if args.exclude else ''}{there}")
        if args.out:
            check_out(args.out, files)
        rows = summarize(load_runs(files))
    except SummaryError as error:
        print(f"summarize.py: error: {_printable(error)}", file=sys.stderr)
        return 1
    if unfinished:  # a seed missing from a row changes its mean: say so, on stderr beside any table
        print(f"summarize.py: note: left out {_plural(len(unfinished), 'run folder')} without results.json "
              f"(running, stopped or failed): {named}{more}", file=sys.stderr)
    if args.csv:
        text = (format_per_class_csv(rows) if args.per_class else format_per_run_csv(rows) if args.per_run
                else format_csv(rows))
        left_out = sum(row.per_class_mean is None for row in rows) if args.per_class else 0
        if left_out:
            print(f"summarize.py: {left_out} rows without per-class values left out (a run that does not record "
                  "them, or seeds trained on different class sizes)", file=sys.stderr)
    else:
        text = format_markdown(rows)
        if args.per_class:
            text += "\n" + format_per_class_markdown(rows)
        if args.per_run:
            text += "\n" + format_per_run_markdown(rows)
    if args.out:
        try:
            write_atomic(_resolved(Path(args.out)), text)  # through a symlink, as write_text did, not over it
        except OSError as error:  # no folder, not a folder, read-only, disk full: the old file is kept
            reason = error.strerror or str(error) or type(error).__name__
            print(f"summarize.py: error: cannot write {args.out}: {reason}", file=sys.stderr)
            return 1
        what = (f"{text.count(chr(10)) - 1} per-class lines" if args.csv and args.per_class
                else f"{sum(len(row.runs) for row in rows)} run lines" if args.csv and args.per_run
                else f"{len(rows)} rows")
        print(f"summarize.py: wrote {what} from {len(files)} runs to {args.out}", file=sys.stderr)
    elif sys.stdout is None:  # started with standard output closed (`>&-`)
        print("summarize.py: error: standard output is closed; give --out FILE", file=sys.stderr)
        return 1
    else:
        try:
            # A terminal whose encoding lacks '±' or '—' (LANG=C on an old Python, PYTHONIOENCODING=latin-1)
            # gets '?' for them rather than a traceback; a folder name's bytes that are not UTF-8 show as --out
            # (which always writes UTF-8) writes them, \udcff.
            reconfigure = getattr(sys.stdout, "reconfigure", None)  # not on a StringIO standing in for stdout
            if reconfigure is not None:
                reconfigure(errors=STDOUT_ERRORS)
            sys.stdout.write(text)
            sys.stdout.flush()
        except OSError as error:
            try:  # else Python's flush of stdout at exit fails again
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            except (OSError, ValueError):  # a stream with no file behind it
                pass
            if isinstance(error, BrokenPipeError):  # `summarize.py runs | head`: the reader stopped reading
                return 1  # quietly, as Python's own documentation of SIGPIPE advises
            print(f"summarize.py: error: cannot write the table to standard output: {error.strerror or error}",
                  file=sys.stderr)  # a full disk under `> table.md`, say
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
