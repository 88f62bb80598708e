#!/usr/bin/env python3
"""Benchmark the training step against the usual PIL + DataLoader pipeline, and the feature losses' memory.

    python scripts/benchmark.py --device cpu --batch_size 128 --steps 20 --warmup_steps 5     # CPU, Hybrid-SC
    python scripts/benchmark.py --device cuda --batch_size 512 --json bench.json              # one GPU
    python scripts/benchmark.py --compare_options --no_reference --memory_batch_sizes ""      # amp / channels_last / compile
    python scripts/benchmark.py --profile --no_reference --memory_batch_sizes ""              # where a step's time goes

Three measurements, the last two skippable (--no_reference, --memory_batch_sizes ""):

1. The project's training step, exactly what main.py runs: `main.Trainer.step` on batches from
   `trainer.stream.epoch(...)` (device-resident uint8 images, batched augmentation, one forward of both branches,
   the hybrid loss, SGD). The data comes from the same stream object, so its cost is inside the timed loop.
2. A reference pipeline with the same maths written the usual way (SupContrast / LDAM-DRW / BBN style): a torch
   Dataset of PIL images with torchvision's RandomCrop(32, padding=4), RandomHorizontalFlip,
   RandomGrayscale(--gray_prob), ToTensor, Normalize in DataLoader workers, a two-crop wrapper on the
   feature-branch loader (with --sc_aug supcon, SupContrast's RandomResizedCrop(32, scale 0.2-1),
   RandomHorizontalFlip, RandomApply(ColorJitter(0.4, 0.4, 0.4, 0.1), 0.8), RandomGrayscale there instead), a
   second loader for the classifier branch, each drawing as the project's --sc_sampler / --ce_sampler (a shuffle
   for `instance`, else a WeightedRandomSampler: by default the feature branch instance-sampled and the
   classifier branch class-balanced; `--loss ce` has plain CE's one instance-sampled loader), float32 eager, a fresh model of the same backbone, losses.HybridLoss with the same method and
   temperature, SGD with the same hyper-parameters and learning rates, and `loss.item()` every step for logging (a
   host sync). Like the project, it forwards both branches' images in one module call with the same
   Config.bn_split (per branch by default, one pass with --bn_stats joint), so batch-norm statistics (the
   maths) are the same.
3. Peak memory of the feature loss alone (losses.supcon_loss on [B, 2, 128], losses.psc_loss with 100
   prototypes), forward + backward, at each of --memory_batch_sizes:
   - CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus the memory allocated once the
     inputs exist.
   - CPU: each measurement runs in a fresh process (`benchmark.py --_memory_probe sc 4096`) that runs one
     forward + backward at batch 256 (so the thread pools and their stacks exist), creates the inputs, resets
     its RSS high-water mark ('5' to /proc/self/clear_refs), reads its resident set size (VmRSS in
     /proc/self/status), runs forward + backward and reads the high-water mark (VmHWM; ru_maxrss where /proc is
     missing): peak = high-water mark - RSS after the inputs. The probe runs with MALLOC_MMAP_THRESHOLD_=65536,
     so glibc gives every buffer of 64 KiB or more its own mapping and returns it on free, and it calls glibc's
     malloc_trim(0) before each pass, so that the heap's free pages are not resident: the high-water mark then
     counts what the loss holds at once rather than what the allocator happened to keep. Buffers under 64 KiB
     can still come from memory already resident, so very small batches read as (nearly) zero. Which buffers
     are alive at the peak varies from pass to pass (by about one [2B, C] buffer, half of PSC's peak at small
     batches), so the probe makes three passes on new inputs and keeps the least peak (a process can stay at the
     larger peak in all three: rows of a few MiB carry that much noise).
   SC's similarity matrix is [2B, 2B], so its memory should grow ~4x per doubling of B; PSC's logits are
   [2B, C], ~2x. The table shows the ratio to the previous row and the growth exponent log(ratio)/log(B ratio).

Timing: both pipelines run --warmup_steps untimed steps (the first one carries allocation, worker start-up and,
with --compile, compilation: it is reported apart as first_step_s / compile_s), then --steps timed steps with a
device sync (torch.cuda.synchronize) before each clock read. Between the two, the reference's loaders give up,
untimed, the batches their workers queued ahead during the warm-up (prefetch_factor per worker: drained_batches),
so that its timed steps do not start with data prepared in advance, which a data-bound pipeline never has once it
runs; then as many untimed steps (settle_steps), which give the workers back their running rhythm. One sample is
one feature-branch image (its two views) plus one classifier-branch image: samples/s = steps * batch_size /
seconds. Both rates vary from run to run (on a GPU machine the reference by up to a fifth), so --repeats N
times the first project row and the reference N times each, alternately (the project's step continuing its run,
the reference built afresh each time), and reports each pair's ratio and their median; "ratio" stays the first
pair's. "ratio_equal_numerics" is the ratio of the
first project row at the reference's numerics (amp, channels_last and compile off), if one ran. On CUDA one
further epoch and one step of the project (an epoch start included) run under
torch.cuda.set_sync_debug_mode("error") and "host_sync" records whether anything in them waited for the device
("none", or the first error); the CPU equivalent is tests/test_step_ops.py. With --profile, once everything else
is measured and saved, up to PROFILE_MAX_STEPS more steps of the first project row's step run under
torch.profiler, and each operator's self time per step and share of the total are reported: CPU time on the CPU,
on CUDA the device time of the kernels each operator launched itself (not its children's, so no kernel counts
twice; kernels launched outside any operator, as a CUDA graph's replay launches them under --compile_mode
reduce-overhead, are reported apart); on CUDA also every kernel by name, its device time per step and share, the
CUDA graphs' kernels included.

Every option of main.py that shapes the training step is accepted (the recipe, --model, --loss, --amp,
--channels_last, --compile, --deterministic, ...; those of a run's outputs and course, RUN_ONLY_OPTIONS, are
refused and hidden from --help); the data is synthetic random uint8 images with the long-tailed class sizes of
--dataset / --imb_factor (12,406 images for CIFAR-10-LT at ratio 100) unless --data_root names real data.
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import itertools
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

# The project's modules live one folder up; a script run as `python scripts/benchmark.py` does not see them.
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import dataset_loader as data  # noqa: E402
import losses  # noqa: E402
import main  # noqa: E402
import networks  # noqa: E402
import util  # noqa: E402
from util import UserError  # noqa: E402

DEFAULT_MEMORY_BATCH_SIZES = "512,1024,2048,4096,8192"
MAX_WORKERS = 128
MAX_MEMORY_BATCH_SIZE = 2**18  # SC's peak at 8192 is about 5 GiB and grows 4x per doubling: 2**18 is ~5 TiB
MEMORY_VIEWS, MEMORY_FEAT_DIM, MEMORY_CLASSES, MEMORY_TEMPERATURE = 2, 128, 100, 0.1
PROBE_REPEATS = 3  # passes per CPU memory row; the least peak counts (memory_probe)
MEMORY_METHOD_CPU = ("a fresh process per row: peak RSS (VmHWM, reset once the inputs exist) minus RSS then, "
                     "glibc MALLOC_MMAP_THRESHOLD_=65536 and malloc_trim(0) before each pass, the least of "
                     f"{PROBE_REPEATS} passes (one where VmHWM cannot be reset: a row's peak_reset)")
MEMORY_METHOD_CUDA = "torch.cuda.max_memory_allocated minus memory_allocated once the inputs exist"
MMAP_THRESHOLD_BYTES = 65536
PROBE_WARMUP_BATCH = 256
PROFILE_TOP = 15  # operators (and on CUDA kernels) listed by --profile; the rest are one "other" line
PROFILE_MAX_STEPS = 20  # profiled steps (at most --steps): the profiler's own bookkeeping grows with each step
# Options of main.py that shape a run (outputs, resuming, evaluation) but not the training step.
RUN_ONLY_OPTIONS = ("output_dir", "resume", "overwrite", "eval_only", "checkpoint", "dry_run", "eval_every",
                    "ncm_every", "print_freq", "sync_bn")


@dataclass(frozen=True)
class BenchOptions:
    """The benchmark's own options (the training recipe is a main.Config)."""
    steps: int
    warmup_steps: int
    workers: int
    reference: bool
    memory_batch_sizes: tuple[int, ...]
    compare_options: bool
    json_path: Optional[str]
    data_root: Optional[str]  # None: synthetic images
    profile: bool = False
    repeats: int = 1  # pairs of (first project row, reference) timed alternately


# ----------------------------------------------------------------------------------------------- command line


def get_args_parser() -> argparse.ArgumentParser:
    """main.py's options (the recipe of the timed step) plus the benchmark's own."""
    parser = main.OneLineParser(description=__doc__.splitlines()[0], parents=[main.get_args_parser()], add_help=False,
                            formatter_class=main.DefaultsHelpFormatter)
    parser.set_defaults(data_root=None)  # no folder: synthetic images
    for action in parser._actions:
        if action.dest == "data_root":
            action.help += " (default: none, synthetic uint8 images in the long-tailed class sizes)"
        elif action.dest in RUN_ONLY_OPTIONS:  # refused (parse_args): not offered either
            action.help = argparse.SUPPRESS
    bench = parser.add_argument_group("benchmark")
    bench.add_argument("--steps", type=int, default=50, help="timed steps per pipeline (CPU: 20 is plenty)")
    bench.add_argument("--warmup_steps", type=int, default=10, help="untimed steps first (at least 1)")
    bench.add_argument("--workers", type=int, default=None,
                       help="DataLoader workers per loader of the reference pipeline, which has two (the "
                            "feature and the classifier branch; one with --loss ce) (default: min(4, CPU count))")
    bench.add_argument("--no_reference", action="store_true", help="skip the reference pipeline")
    bench.add_argument("--repeats", type=int, default=1,
                       help="time the first project row and the reference this many times each, alternately, and "
                            "report every ratio and their median (the rates of both vary from run to run)")
    bench.add_argument("--memory_batch_sizes", default=DEFAULT_MEMORY_BATCH_SIZES,
                       help="batch sizes of the feature-loss memory table, comma-separated ('' skips it)")
    bench.add_argument("--compare_options", action="store_true",
                       help="time the project step with amp on/off x channels_last on/off, and compiled")
    bench.add_argument("--profile", action="store_true",
                       help=f"at the end, up to {PROFILE_MAX_STEPS} more steps of the first project row under "
                            "torch.profiler: each operator's self time per step (CPU time; on CUDA its kernels' "
                            "device time) and share; on CUDA also each kernel's, CUDA graphs' included")
    bench.add_argument("--json", metavar="PATH", help="write every number as JSON here")
    bench.add_argument("--_memory_probe", nargs=2, metavar=("LOSS", "BATCH"), help=argparse.SUPPRESS)
    return parser


def parse_memory_batch_sizes(text: str) -> tuple[int, ...]:
    """'512,1024' -> (512, 1024); '' -> (). Sizes must be integers >= 2, increasing."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        sizes = tuple(int(p) for p in parts)
    except ValueError:
        raise UserError(f"--memory_batch_sizes wants comma-separated integers, got '{text}'") from None
    if any(b < 2 for b in sizes):
        raise UserError(f"--memory_batch_sizes must all be at least 2 (got {text})")
    if any(b > MAX_MEMORY_BATCH_SIZE for b in sizes):  # SC's [2B, 2B] matrices: 2**20 would take terabytes
        raise UserError(f"--memory_batch_sizes must all be at most {MAX_MEMORY_BATCH_SIZE} (got {text})")
    if list(sizes) != sorted(set(sizes)):
        raise UserError(f"--memory_batch_sizes must be increasing without repeats (got {text})")
    return sizes


def parse_args(argv: Optional[list[str]]) -> tuple[main.Config, BenchOptions]:
    parser = get_args_parser()
    args = vars(parser.parse_args(argv))
    config_names = {f.name for f in dataclasses.fields(main.Config)}
    for name in RUN_ONLY_OPTIONS:
        if args[name] != parser.get_default(name):
            raise UserError(f"--{name} belongs to training runs; the benchmark times the step alone, drop it")
    if args["compare_options"] and any(args[n] != parser.get_default(n)
                                       for n in ("amp", "channels_last", "compile", "compile_mode")):
        raise UserError("--compare_options sets --amp, --channels_last, --compile and --compile_mode itself; "
                        "drop them")
    data_root = args["data_root"]
    if args["download"] and data_root is None:
        raise UserError("--download fetches the dataset into --data_root: give one (without, the images are "
                        "synthetic)")
    cfg = main.Config(**{k: v for k, v in args.items() if k in config_names and k != "data_root"},
                      data_root=data_root or "")
    main.validate(cfg)
    if args["steps"] < 1:
        raise UserError(f"--steps must be at least 1 (got {args['steps']})")
    if args["warmup_steps"] < 1:
        raise UserError(f"--warmup_steps must be at least 1: the first step carries one-time costs "
                        f"(got {args['warmup_steps']})")
    if args["repeats"] < 1:
        raise UserError(f"--repeats must be at least 1 (got {args['repeats']})")
    if args["repeats"] > 1 and args["no_reference"]:
        raise UserError("--repeats alternates the project with the reference pipeline; drop --no_reference or "
                        "--repeats")
    if args["json"] == "":
        raise UserError("--json is empty: give a file name, or leave it out for no JSON file")
    main.check_path("--json", args["json"])
    if args["json"]:  # the file util.atomic_write replaces: the name itself (a symlink, not what it points to)
        target = Path(os.path.realpath(os.path.dirname(os.path.abspath(args["json"])))) / os.path.basename(args["json"])
        run_file = target.name in (*main.RUN_FILES, main.PROJECTOR_CONFIG) or target.name.startswith(main.EVENTS_PREFIX)
        if run_file and main.holds_run(target.parent):
            raise UserError(f"--json {args['json']} would replace a file of the run in {target.parent}; give "
                            "another file")
    workers = min(4, os.cpu_count() or 1) if args["workers"] is None else args["workers"]
    if workers < 0:
        raise UserError(f"--workers must not be negative (got {workers})")
    if workers > MAX_WORKERS:  # each a process, in two loaders: a mistyped number started them until the cap
        raise UserError(f"--workers must be at most {MAX_WORKERS} per loader (got {workers})")
    opts = BenchOptions(steps=args["steps"], warmup_steps=args["warmup_steps"], workers=workers,
                        reference=not args["no_reference"],
                        memory_batch_sizes=parse_memory_batch_sizes(args["memory_batch_sizes"]),
                        compare_options=args["compare_options"], json_path=args["json"], data_root=data_root,
                        profile=args["profile"], repeats=args["repeats"])
    return cfg, opts


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------- data


def synthetic_split(num_classes: int, imb_factor: float, imb_type: str, seed: int) -> data.ArraySplit:
    """Random uint8 images [N, 32, 32, 3] with the long-tailed class sizes of a 50,000-image training set."""
    class_counts = data.long_tailed_counts(50_000 // num_classes, num_classes, imb_factor, imb_type)
    labels = np.repeat(np.arange(num_classes, dtype=np.int64), class_counts)  # [N]
    rng = np.random.RandomState(seed)
    images = rng.randint(0, 256, size=(len(labels), data.IMAGE_SIZE, data.IMAGE_SIZE, 3), dtype=np.uint8)
    return data.ArraySplit(images, labels)


def training_split(cfg: main.Config, data_root: Optional[str]) -> tuple[data.ArraySplit, str]:
    """(long-tailed training split, a description of where it came from)."""
    num_classes = data.DATASETS[cfg.dataset]
    if data_root is None:
        return synthetic_split(num_classes, cfg.imb_factor, cfg.imb_type, cfg.data_seed), "synthetic"
    train, _ = data.load_cifar(cfg.dataset, data_root, download=cfg.download)
    subset, _ = data.long_tailed_subset(train, num_classes, cfg.imb_factor, cfg.imb_type, cfg.data_seed)
    return subset, data_root


# ----------------------------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class Timing:
    first_step_s: float  # the first warm-up step alone: one-time costs (allocation, workers, compilation)
    warmup_s: float      # all warm-up steps, the first included
    seconds: float       # the timed steps
    steps: int


def time_steps(step: Callable[[], Any], warmup_steps: int, steps: int, device: torch.device,
               settle: Optional[Callable[[], Any]] = None) -> tuple[Timing, Any]:
    """Run `step` warmup_steps times untimed, then `settle` (if given; untimed too, its time counted in
    warmup_s), then `step` `steps` times timed; the device is synced before each clock read, so queued GPU work is
    inside the interval it belongs to. Returns (timing, the last step's result)."""
    sync(device)
    start = time.perf_counter()
    result = step()
    sync(device)
    first = time.perf_counter()
    for _ in range(warmup_steps - 1):
        result = step()
    if settle is not None:
        settle()
    sync(device)
    warm = time.perf_counter()
    for _ in range(steps):
        result = step()
    sync(device)
    end = time.perf_counter()
    return Timing(first - start, warm - start, end - warm, steps), result


def timing_record(timing: Timing, batch_size: int) -> dict[str, Any]:
    return {"steps": timing.steps, "seconds": timing.seconds, "samples_per_s": timing.steps * batch_size /
            timing.seconds, "step_ms": 1000 * timing.seconds / timing.steps, "first_step_s": timing.first_step_s,
            "warmup_s": timing.warmup_s}


def endless(make_iterator: Callable[[int], Iterator]) -> Iterator:
    """Chain make_iterator(0), make_iterator(1), ... (one per epoch)."""
    for epoch in itertools.count():
        yield from make_iterator(epoch)


def lr_schedule(cfg: main.Config, train_size: int) -> Callable[[int], float]:
    """The run's learning rate per global step (warm-up included), shared by both pipelines."""
    steps_per_epoch = train_size // cfg.batch_size
    return lambda step: util.learning_rate(step, base_lr=cfg.learning_rate, steps_per_epoch=steps_per_epoch,
                                           warm_epochs=cfg.warm_epochs, decay_epochs=cfg.lr_decay_epochs,
                                           decay_rate=cfg.lr_decay_rate)


def first_epoch_alpha(cfg: main.Config) -> float:
    return losses.hybrid_alpha(0, cfg.epochs, cfg.alpha_schedule) if cfg.loss != "ce" else 0.0


def time_project(cfg: main.Config, train: data.ArraySplit, num_classes: int, device: torch.device,
                 opts: BenchOptions) -> tuple[dict[str, Any], Callable[[], Any]]:
    """samples/s of main.Trainer.step on batches of trainer.stream, the loop main.py runs (without its logging);
    returns the record and the step, which continues the same run (for profile_steps)."""
    if cfg.compile:
        main.load_compiler()
        torch._dynamo.reset()  # trace again; Inductor's cache on disk (TORCHINDUCTOR_CACHE_DIR) may still hold the
        # compiled code from an earlier process: compile_s is a cold compilation only with an empty cache
        main.cudagraph_skips(clear=True)  # this row's count of graphs Inductor did not record as CUDA graphs
    trainer = main.Trainer(cfg, train, num_classes, device)
    batches = endless(trainer.stream.epoch)
    alpha, global_step = first_epoch_alpha(cfg), itertools.count()

    def step() -> losses.LossTerms:
        nonlocal batches
        i = next(global_step)
        try:
            batch = next(batches)
        except StopIteration:
            # endless never ends, so an error raised inside the stream closed it (a host sync that host_sync_check
            # caught there): a fresh one for the steps that follow (the profile's).
            batches = endless(trainer.stream.epoch)
            batch = next(batches)
        return trainer.step(batch, alpha, trainer.lr_at(i))

    timing, terms = time_steps(step, opts.warmup_steps, opts.steps, device)
    record = {"amp": trainer.amp, "channels_last": trainer.channels_last, "compile": cfg.compile,
              "compile_mode": cfg.compile_mode if cfg.compile else None,
              **timing_record(timing, cfg.batch_size), "final_loss": terms.total.item(),
              # A whole epoch and one step more: the check crosses an epoch start (the stream's new permutations).
              "host_sync": host_sync_check(step, device, trainer.steps_per_epoch + 1)}
    # Compilation happens in the first step; what that step took beyond a steady one is the compile time.
    record["compile_s"] = max(timing.first_step_s - timing.seconds / timing.steps, 0.0) if cfg.compile else None
    if cfg.compile and cfg.compile_mode in main.CUDA_GRAPH_MODES:
        # Inductor skips CUDA graphs silently (say, for a graph that writes an input other than a parameter or
        # buffer), which leaves the step no faster: how many of the step's graphs it skipped (on the CPU, all).
        record["cudagraph_skips"] = main.cudagraph_skips()
    return record, step


def profile_steps(step: Callable[[], Any], steps: int, device: torch.device) -> dict[str, Any]:
    """Run `steps` steps under torch.profiler; per operator, its self time per step, its share of all operators'
    self time and its calls per step, the PROFILE_TOP largest first and the rest as one "other" row. On CUDA
    the time is the device time of the kernels each operator launched itself (the kernels' own rows are left
    out, so nothing counts twice), and the kernels no operator launched (CUDA graph replays) are one figure
    apart, outside_operators_ms_per_step; elsewhere it is CPU time, which on the CPU is where the arithmetic runs.
    On CUDA also "kernels": every kernel by name the same way (device time, share of all kernels' time, launches
    per step), the graphs' kernels included, and kernels_ms_per_step, their total."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(device)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)
    field = "self_device_time_total" if cuda else "self_cpu_time_total"
    averages = prof.key_averages()
    ops = [(event.key, getattr(event, field), event.count) for event in averages
           if not cuda or event.device_type == torch.autograd.DeviceType.CPU]
    ops = sorted((op for op in ops if op[1] > 0), key=lambda op: -op[1])
    total_us = sum(op[1] for op in ops)
    # On CUDA, every kernel's own time, launched by an operator or not (a CUDA graph's replay is no operator). Device-
    # side user annotations (such as Inductor's "## Call CompiledFxGraph ##" range) span kernels already counted.
    kernel_events = [event for event in averages if event.device_type != torch.autograd.DeviceType.CPU
                     and not getattr(event, "is_user_annotation", False)] if cuda else []
    kernels_us = sum(event.self_device_time_total for event in kernel_events)
    if total_us == 0 and kernels_us == 0:  # e.g. CUPTI unavailable: the profiler only warns, every time reads 0
        raise RuntimeError(f"the profiler recorded no {'kernel' if cuda else 'operator'} time")
    result = {"steps": steps, "clock": "device (kernels)" if cuda else "cpu", "ms_per_step": total_us / 1000 / steps,
              "ops": ranked_rows(ops, total_us, steps, "op", "operators")}
    if cuda:  # kernels that no operator launched, e.g. those of torch.compile's CUDA graphs (reduce-overhead)
        result["outside_operators_ms_per_step"] = max(kernels_us - total_us, 0) / 1000 / steps
        # Every kernel by name, the graphs' included: what a step replayed as CUDA graphs is made of (convolutions,
        # Inductor's fused kernels, ...), which the operators' table cannot show.
        kernels = sorted(((event.key, event.self_device_time_total, event.count) for event in kernel_events
                          if event.self_device_time_total > 0), key=lambda kernel: -kernel[1])
        result["kernels_ms_per_step"] = kernels_us / 1000 / steps
        result["kernels"] = ranked_rows(kernels, kernels_us, steps, "kernel", "kernels")
    return result


def ranked_rows(entries: list[tuple[str, float, int]], total_us: float, steps: int, key: str,
                noun: str) -> list[dict[str, Any]]:
    """(name, microseconds, calls) entries, largest first -> the PROFILE_TOP largest as rows (time per step, share
    of total_us, calls per step) and the rest as one "other (N <noun>)" row."""
    row = lambda name, us, calls: {key: name, "ms_per_step": us / 1000 / steps,  # noqa: E731
                                   "share": us / total_us if total_us else 0.0, "calls_per_step": calls / steps}
    rows = [row(name, us, calls) for name, us, calls in entries[:PROFILE_TOP]]
    rest = entries[PROFILE_TOP:]
    if rest:
        rows.append(row(f"other ({len(rest)} {noun})", sum(e[1] for e in rest), sum(e[2] for e in rest)))
    return rows


def host_sync_check(step: Callable[[], Any], device: torch.device, steps: int = 1) -> Optional[str]:
    """On CUDA, `steps` more steps (each the stream's next batch and Trainer.step) under
    torch.cuda.set_sync_debug_mode("error"): "none" when they ran through, else the first error raised.
    None on other devices, where tests/test_step_ops.py checks the operators a step dispatches instead."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(steps):
            step()
        return "none"
    except RuntimeError as e:
        return f"error: {util.one_line(e)}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
        sync(device)


class PilImages(torch.utils.data.Dataset):
    """images uint8 [N, 32, 32, 3] -> (transform(PIL image), label), as torchvision's CIFAR10 dataset does."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        from PIL import Image
        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


class TwoCropTransform:
    """Two independent augmentations of one image (SupContrast's wrapper)."""

    def __init__(self, transform: Callable):
        self.transform = transform

    def __call__(self, image):
        return [self.transform(image), self.transform(image)]


def reference_loaders(cfg: main.Config, train: data.ArraySplit, device: torch.device, workers: int):
    """(feature-branch loader or None, classifier-branch loader), built the way the usual scripts build them."""
    try:
        from torchvision import transforms
    except ImportError as e:
        raise UserError(f"the reference pipeline needs torchvision ({e}); or pass --no_reference") from e
    mean, std = data.dataset_stats(cfg.dataset)
    augment = transforms.Compose([
        transforms.RandomCrop(data.IMAGE_SIZE, padding=data.CROP_PADDING),
        transforms.RandomHorizontalFlip(),
        transforms.RandomGrayscale(p=cfg.gray_prob),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])
    view_augment = augment
    if cfg.sc_aug == "supcon":  # SupContrast's CIFAR transform for its two crops
        view_augment = transforms.Compose([
            transforms.RandomResizedCrop(data.IMAGE_SIZE, scale=data.RESIZED_CROP_SCALE, ratio=data.RESIZED_CROP_RATIO),
            transforms.RandomHorizontalFlip(),
            transforms.RandomApply([transforms.ColorJitter(*data.JITTER_STRENGTHS)], p=data.JITTER_PROB),
            transforms.RandomGrayscale(p=cfg.gray_prob),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ])
    loader_kwargs = dict(batch_size=cfg.batch_size, drop_last=True, num_workers=workers,
                         pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    class_counts = np.bincount(train.labels, minlength=data.DATASETS[cfg.dataset])
    feature_loader = None
    if cfg.loss != "ce":
        feature_loader = torch.utils.data.DataLoader(
            PilImages(train.images, train.labels, TwoCropTransform(view_augment)),
            **reference_sampling(cfg.sc_sampler, train.labels, class_counts), **loader_kwargs)
    ce_loader = torch.utils.data.DataLoader(PilImages(train.images, train.labels, augment),
                                            **reference_sampling(cfg.ce_sampler, train.labels, class_counts),
                                            **loader_kwargs)
    return feature_loader, ce_loader


def reference_sampling(sampler: str, labels: np.ndarray, class_counts: np.ndarray) -> dict[str, Any]:
    """DataLoader arguments that draw as the project's `sampler` does: `instance` a shuffle of the images each
    epoch, the others a WeightedRandomSampler in which an image of class c weighs p_c / n_c (the sampler's class
    probability spread over the class's images: class-balanced for `class`)."""
    probs = data.sampler_class_probs(sampler, class_counts)
    if probs is None:
        return {"shuffle": True}
    weights = torch.as_tensor(probs[labels] / class_counts[labels], dtype=torch.double)
    return {"sampler": torch.utils.data.WeightedRandomSampler(weights, num_samples=len(labels), replacement=True)}


def time_reference(cfg: main.Config, train: data.ArraySplit, num_classes: int, device: torch.device,
                   opts: BenchOptions) -> dict[str, Any]:
    """samples/s of the usual pipeline with the same maths (see the module docstring)."""
    torch.manual_seed(cfg.seed)
    feature_loader, ce_loader = reference_loaders(cfg, train, device, opts.workers)
    net = networks.build_model(cfg.model, num_classes, cfg.feat_dim, use_prototypes=cfg.loss == "psc").to(device)
    if cfg.loss == "ce":
        net.head.requires_grad_(False)  # as the project's CE baseline: the head is unused
    criterion, optimizer = main.build_criterion(cfg), main.build_optimizer(cfg, net)
    lr_at = lr_schedule(cfg, len(train.labels))
    alpha, global_step = first_epoch_alpha(cfg), itertools.count()
    ce_batches = endless(lambda epoch: iter(ce_loader))
    feature_batches = endless(lambda epoch: iter(feature_loader)) if feature_loader is not None else None

    def step() -> float:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(next(global_step))
        ce_images, ce_labels = next(ce_batches)
        ce_labels = ce_labels.to(device, non_blocking=True)
        if feature_batches is None:
            out = net(ce_images.to(device, non_blocking=True))
            terms = criterion(None, None, out.logits, ce_labels, alpha)
        else:
            (view1, view2), sc_labels = next(feature_batches)
            n_views = 2 * len(sc_labels)
            # Concatenated on the host, then copied, as SupContrast does (torch.cat of the two crops, then
            # .cuda(non_blocking=True)): the cat's output is not pinned, so that copy is synchronous, in theirs too.
            out = net(torch.cat([view1, view2, ce_images]).to(device, non_blocking=True),  # [3B, 3, 32, 32]
                      split=cfg.bn_split(n_views))
            terms = criterion(out.projections[:n_views], sc_labels.to(device, non_blocking=True),  # [2B, D]
                              out.logits[n_views:], ce_labels, alpha, prototypes=net.prototypes)  # [B, C]
        optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        optimizer.step()
        return terms.total.item()  # the per-step logging read: a host-device sync, as such scripts do

    queued = prefetched_batches(ce_loader)

    def drain() -> None:
        # During the warm-up, whose first step waits for the model's one-time costs, the workers fill the loaders'
        # queues: up to `queued` batches each (12 with 6 workers), which timed steps would take without waiting. A
        # long run's data-bound pipeline finds its queue empty (its workers cannot keep up), so those batches are
        # taken here, untimed: the timed steps start with every worker busy and nothing waiting. A pipeline whose
        # workers are faster than its step refills its queue within a step or so.
        for batches in (ce_batches, feature_batches):
            for _ in range(queued if batches is not None else 0):
                next(batches)
        # The drain leaves every worker starting its next batches at once, in step, which a running pipeline's
        # workers are not: the first timed steps would wait about one batch's making, a step or more of bias
        # against the reference either way. As many untimed steps as the queue holds bring back its running state:
        # empty where the workers cannot keep up, refilled where they can.
        for _ in range(queued):
            step()

    try:
        timing, last_loss = time_steps(step, opts.warmup_steps, opts.steps, device, settle=drain)
    finally:
        for batches in (ce_batches, feature_batches):
            if batches is not None:
                batches.close()  # lets the DataLoader iterators, and their workers, go
    return {"workers": opts.workers, "pin_memory": device.type == "cuda", "amp": False, "channels_last": False,
            "compile": False, "drained_batches": queued, "settle_steps": queued,
            **timing_record(timing, cfg.batch_size), "final_loss": last_loss}


def prefetched_batches(loader: torch.utils.data.DataLoader) -> int:
    """How many batches `loader` keeps requested ahead of its consumer: prefetch_factor per worker (2 by default),
    none without workers."""
    return loader.num_workers * loader.prefetch_factor if loader.num_workers > 0 else 0


def repeat_pairs(step: Optional[Callable[[], Any]], cfg: main.Config, train: data.ArraySplit, num_classes: int,
                 device: torch.device, opts: BenchOptions, result: dict[str, Any],
                 save: Callable[[dict[str, Any]], None]) -> None:
    """result["repeats"]: the first project row against the reference as timed above, then (--repeats) that row
    again (its step continues the same run: no new compilation or CUDA-graph recording) and the reference again
    (built afresh: its workers start in its untimed first step), alternately, opts.repeats pairs in all; each
    pair's rates and ratio, and result["ratio_median"]. A pipeline that fails ends the repeats with its error.
    step is None only when there is nothing to repeat (opts.repeats 1)."""
    pairs = [{"project_samples_per_s": result["project"][0]["samples_per_s"],
              "reference_samples_per_s": result["reference"]["samples_per_s"], "ratio": result["ratio"]}]
    result["repeats"], result["ratio_median"] = pairs, result["ratio"]
    save(result)
    if step is None:
        return
    for i in range(2, opts.repeats + 1):
        print(f"repeat {i} of {opts.repeats}: project, then reference ...", file=sys.stderr, flush=True)
        project = None
        try:
            timing, _ = time_steps(step, opts.warmup_steps, opts.steps, device)
            project = timing_record(timing, cfg.batch_size)["samples_per_s"]
            reference = time_reference(cfg, train, num_classes, device, opts)["samples_per_s"]
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - as the first reference's failure: recorded, exit status 1
            which = "project" if project is None else "reference"
            pairs.append({"project_samples_per_s": project, "reference_samples_per_s": None, "ratio": None,
                          "error": f"{which}: {error_text(e)}"})
            save(result)
            return
        pairs.append({"project_samples_per_s": project, "reference_samples_per_s": reference,
                      "ratio": project / reference})
        result["ratio_median"] = statistics.median(pair["ratio"] for pair in pairs if pair["ratio"] is not None)
        save(result)


def option_configs(cfg: main.Config, device: torch.device, compare: bool) -> list[tuple[str, main.Config]]:
    """(label, config) of each project configuration to time: the one asked for, or with --compare_options
    amp x channels_last on both settings (the device default first) and compile with the device defaults (on
    CUDA also compile's reduce-overhead mode, which adds CUDA graphs)."""
    if not compare:
        return [("as configured", cfg)]
    default = (main.fast_default(device), main.CHANNELS_LAST_DEFAULT)  # main.Trainer's defaults
    grid = sorted(itertools.product((True, False), repeat=2), key=lambda ac: ac != default)
    configs = []
    for amp, channels_last in grid:
        label = f"amp {'on' if amp else 'off'}, channels_last {'on' if channels_last else 'off'}"
        if (amp, channels_last) == default:
            label += " (device default)"
        configs.append((label, dataclasses.replace(cfg, amp=amp, channels_last=channels_last, compile=False)))
    modes = ("default", "reduce-overhead") if device.type == "cuda" else ("default",)
    for mode in modes:
        label = "compile, device defaults" if mode == "default" else f"compile {mode}, device defaults"
        configs.append((label, dataclasses.replace(cfg, amp=None, channels_last=None, compile=True,
                                                   compile_mode=mode)))
    return configs


# ----------------------------------------------------------------------------------------------- memory


def memory_inputs(loss: str, batch_size: int, device: torch.device):
    """(features [B, 2, 128] L2-normalised leaf, labels [B] in 0..99, prototypes [100, 128] leaf or None)."""
    gen = torch.Generator(device="cpu").manual_seed(batch_size)
    features = F.normalize(torch.randn(batch_size, MEMORY_VIEWS, MEMORY_FEAT_DIM, generator=gen), dim=2)
    labels = torch.randint(0, MEMORY_CLASSES, (batch_size,), generator=gen)
    prototypes = torch.randn(MEMORY_CLASSES, MEMORY_FEAT_DIM, generator=gen) if loss == "psc" else None
    features = features.to(device).requires_grad_()
    prototypes = prototypes.to(device).requires_grad_() if prototypes is not None else None
    return features, labels.to(device), prototypes


def feature_loss_backward(loss: str, features: torch.Tensor, labels: torch.Tensor,
                          prototypes: Optional[torch.Tensor]) -> None:
    if loss == "sc":
        value = losses.supcon_loss(features, labels, MEMORY_TEMPERATURE)
    else:
        value = losses.psc_loss(features, labels, prototypes, MEMORY_TEMPERATURE)
    value.backward()


def _proc_status_bytes(key: str) -> Optional[int]:
    """A 'kB' field of /proc/self/status (VmRSS, VmHWM) in bytes; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _max_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def _reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0: '5' to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _release_free_heap() -> bool:
    """Give the heap's free pages back to the kernel (glibc's malloc_trim(0)), so that memory the loss allocates
    shows as new resident pages rather than reusing pages an earlier pass left resident; False where the C
    library has no malloc_trim (musl, macOS)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    trim(0)
    return True


def memory_probe(loss: str, batch_size: int) -> dict[str, Any]:
    """In a fresh process: peak RSS of one forward + backward of the feature loss over the RSS before it; the
    least of PROBE_REPEATS passes, each on new inputs, where the high-water mark can be reset (one pass
    elsewhere). At small batches the passes differ by up to about one [2B, C] buffer (which buffers happen to be
    alive at the peak; the first pass often reads higher), enough to move PSC's growth exponent by half between two
    rows; the least is the loss's need. Some processes stay high in every pass, so a row can still read up to one
    buffer high. The row's other fields (baseline, time, trim) are those of the pass it keeps."""
    can_reset = _reset_peak_rss()
    # A batch big enough for the ops to go parallel starts the intra-op and autograd threads (their stacks)
    # before the baseline is read. Without a resettable high-water mark its peak would count, so stay tiny then.
    warm_inputs = memory_inputs(loss, PROBE_WARMUP_BATCH if can_reset else 8, torch.device("cpu"))
    feature_loss_backward(loss, *warm_inputs)
    del warm_inputs
    passes = []
    for _ in range(PROBE_REPEATS if can_reset else 1):
        inputs = memory_inputs(loss, batch_size, torch.device("cpu"))
        trimmed = _release_free_heap()
        if can_reset:
            _reset_peak_rss()
        base = _proc_status_bytes("VmRSS") or _max_rss_bytes()
        start = time.perf_counter()
        feature_loss_backward(loss, *inputs)
        seconds = time.perf_counter() - start
        peak = _proc_status_bytes("VmHWM") or _max_rss_bytes()
        passes.append({"peak_bytes": max(peak - base, 0), "baseline_rss_bytes": base, "heap_trimmed": trimmed,
                       "seconds": seconds})
        del inputs
    kept = min(passes, key=lambda one: one["peak_bytes"])
    return {**kept, "peak_bytes_runs": [one["peak_bytes"] for one in passes], "peak_reset": can_reset}


def cpu_memory_row(loss: str, batch_size: int) -> dict[str, Any]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD_BYTES)}
    command = [sys.executable, str(Path(__file__).resolve()), "--_memory_probe", loss, str(batch_size)]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        reason = "killed, likely out of memory" if done.returncode < 0 else (done.stderr.strip().splitlines()
                                                                              or ["no message"])[-1]
        return {"peak_bytes": None, "error": f"probe exited with {done.returncode}: {reason}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def cuda_memory_row(loss: str, batch_size: int, device: torch.device) -> dict[str, Any]:
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    try:
        inputs = memory_inputs(loss, batch_size, device)
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        feature_loss_backward(loss, *inputs)
        torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        return {"peak_bytes": torch.cuda.max_memory_allocated(device) - base, "seconds": seconds}
    except RuntimeError as e:  # the device's OutOfMemoryError, or the host's allocation of the inputs failing
        return {"peak_bytes": None, "error": error_text(e)}
    finally:
        inputs = None
        torch.cuda.empty_cache()


def add_growth(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per loss, each row's peak over the previous row's (ratio_to_previous) and the growth exponent
    log(peak ratio) / log(batch ratio): ~1 for linear growth, ~2 for quadratic. Pure: returns new rows."""
    out, previous = [], {}
    for row in rows:
        prev = previous.get(row["loss"])
        ratio = exponent = None
        if prev is not None and prev["peak_bytes"] and row["peak_bytes"]:
            ratio = row["peak_bytes"] / prev["peak_bytes"]
            exponent = math.log(ratio) / math.log(row["batch_size"] / prev["batch_size"])
        out.append({**row, "ratio_to_previous": ratio, "growth_exponent": exponent})
        previous[row["loss"]] = row
    return out


def memory_table(batch_sizes: tuple[int, ...], device: torch.device,
                 saved: Callable[[dict[str, Any]], None] = lambda table: None) -> dict[str, Any]:
    """Each feature loss's peak memory at each batch size; `saved` gets the table so far after each row."""
    rows: list[dict[str, Any]] = []
    method = MEMORY_METHOD_CUDA if device.type == "cuda" else MEMORY_METHOD_CPU
    for loss in ("sc", "psc"):
        for batch_size in batch_sizes:
            print(f"memory: {loss} at batch {batch_size} ...", file=sys.stderr, flush=True)
            row = cuda_memory_row(loss, batch_size, device) if device.type == "cuda" else cpu_memory_row(loss,
                                                                                                       batch_size)
            rows.append({"loss": loss, "batch_size": batch_size, "views": MEMORY_VIEWS, "feat_dim": MEMORY_FEAT_DIM,
                         "classes": MEMORY_CLASSES, **row})
            saved({"method": method, "rows": list(rows)})
    return {"method": method, "rows": add_growth(rows)}


# ----------------------------------------------------------------------------------------------- report


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def compile_cell(row: dict[str, Any]) -> str:
    """A project row's compile column: off, or the torch.compile mode (on: a JSON from before modes were recorded)."""
    return (row.get("compile_mode") or "on") if row["compile"] else "off"


def format_report(result: dict[str, Any]) -> str:
    """The markdown-ish tables printed at the end (everything in them is also in the JSON)."""
    s = result["settings"]
    lines = [f"device {result['device']}, torch {result['torch_version']}, {s['model']}, loss {s['loss']}, batch "
             f"{s['batch_size']}, {s['steps']} timed steps after {s['warmup_steps']} warm-up, data "
             f"{result['data']['source']} ({result['data']['train_size']} images), load average "
             f"{result['load_average_start']} at the start, {result['load_average_after_timing']} after timing"]
    if result["project"] or result["reference"]:
        lines += ["", "| pipeline | amp | channels_last | compile | samples/s | ms/step | x reference | first step s "
                      "| compile s |", "|---|---|---|---|---|---|---|---|---|"]
        onoff = lambda flag: "on" if flag else "off"  # noqa: E731
        for row in result["project"]:
            if "error" in row:
                lines.append(f"| project: {row['label']} | | | | failed: {row['error']} | | | | |")
                continue
            lines.append(f"| project: {row['label']} | {onoff(row['amp'])} | {onoff(row['channels_last'])} | "
                         f"{compile_cell(row)} | {row['samples_per_s']:.1f} | {row['step_ms']:.1f} | "
                         f"{_fmt(row['ratio_to_reference'], '.2f')} | {row['first_step_s']:.2f} | "
                         f"{_fmt(row['compile_s'], '.1f')} |")
        ref = result["reference"]
        if ref is not None and "error" in ref:
            lines.append(f"| reference: PIL + DataLoader ({ref['workers']} workers per loader) | | | | "
                         f"failed: {ref['error']} | | | | |")
        elif ref is not None:
            lines.append(f"| reference: PIL + DataLoader ({ref['workers']} workers per loader), fp32 eager | off | off "
                         f"| off | {ref['samples_per_s']:.1f} | {ref['step_ms']:.1f} | 1.00 | "
                         f"{ref['first_step_s']:.2f} | - |")
        if result.get("ratio_equal_numerics") is not None:
            lines += ["", "x reference at the reference's numerics (float32, contiguous layout, eager: the first row "
                          f"with amp, channels_last and compile off): {result['ratio_equal_numerics']:.2f}"]
        pairs = result.get("repeats") or []
        if len(pairs) > 1:
            lines += ["", f"x reference over {len(pairs)} alternating timings of the first project row and the "
                          "reference: " + ", ".join("failed: " + pair["error"] if pair["ratio"] is None
                                                    else f"{pair['ratio']:.2f}" for pair in pairs) +
                      f"; median {result['ratio_median']:.2f}"]
        graphs = [row for row in result["project"] if row.get("cudagraph_skips") is not None]
        if graphs:
            lines += ["", "graphs Inductor did not record as CUDA graphs (torch._dynamo's counters['inductor']"
                          "['cudagraph_skips'], a forward and its backward counted once; on the CPU every one): " +
                      "; ".join(f"{row['label']}: {row['cudagraph_skips']}" for row in graphs)]
        checked = [row for row in result["project"] if row.get("host_sync") is not None]
        if checked:
            lines += ["", "host syncs inside a project step (torch.cuda.set_sync_debug_mode('error')): " +
                      "; ".join(f"{row['label']}: {row['host_sync']}" for row in checked)]
        for row in result["project"]:
            prof = row.get("profile")
            if prof is None:
                continue
            if "error" in prof:
                lines += ["", f"profile of project: {row['label']}: failed: {prof['error']}"]
                continue
            lines += ["", f"where a step of project: {row['label']} spends its time (torch.profiler, {prof['steps']} "
                          f"steps, {prof['clock']} self time, {prof['ms_per_step']:.1f} ms/step in all)",
                      "| operator | ms/step | share | calls/step |", "|---|---|---|---|"]
            lines += [f"| {op['op'][:80]} | {op['ms_per_step']:.2f} | {100 * op['share']:.1f} % | "
                      f"{op['calls_per_step']:g} |" for op in prof["ops"]]
            if prof.get("outside_operators_ms_per_step"):
                lines.append(f"plus {prof['outside_operators_ms_per_step']:.2f} ms/step of kernels that no operator "
                             "launched (CUDA graph replays), not in the shares above")
            elif row.get("compile"):  # the profiler may tie a replay's kernels to the compiled region's operators
                lines.append("(a compiled step's kernels, CUDA graph replays included, may count under the compiled "
                             "region's operators, CompiledFunction and '## Call CompiledFxGraph'; the kernel table "
                             "below, on CUDA, is the breakdown to read)")
            if prof.get("kernels"):
                lines += ["", f"the same steps by kernel (device time, CUDA graphs' kernels included, "
                              f"{prof['kernels_ms_per_step']:.1f} ms/step in all)",
                          "| kernel | ms/step | share | launches/step |", "|---|---|---|---|"]
                lines += [f"| {k['kernel'][:80]} | {k['ms_per_step']:.2f} | {100 * k['share']:.1f} % | "
                          f"{k['calls_per_step']:g} |" for k in prof["kernels"]]
    memory = result["memory"]
    if memory is not None:
        lines += ["", f"feature-loss peak memory, forward + backward, [B, {MEMORY_VIEWS}, {MEMORY_FEAT_DIM}] features, "
                      f"{MEMORY_CLASSES} classes; {memory['method']}",
                  "| loss | batch | peak MiB | x previous row | growth exponent (1 linear, 2 quadratic) |",
                  "|---|---|---|---|---|"]
        for row in memory["rows"]:
            peak = "failed: " + row["error"] if row["peak_bytes"] is None else f"{row['peak_bytes'] / 2**20:.1f}"
            lines.append(f"| {row['loss']} | {row['batch_size']} | {peak} | {_fmt(row['ratio_to_previous'], '.2f')} "
                         f"| {_fmt(row['growth_exponent'], '.2f')} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- main


def error_text(e: BaseException) -> str:
    """An exception as the one-line 'error' of a row that failed."""
    return util.exception_text(e)[:300]


def load_average() -> Optional[list[float]]:
    """1, 5 and 15-minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def run(cfg: main.Config, opts: BenchOptions, argv: list[str],
        save: Callable[[dict[str, Any]], None] = lambda result: None) -> dict[str, Any]:
    """Every measurement, as one dict; `save(result)` is called after each row and section with what is there
    so far ("complete": false until the end), so that a run cut off by a time limit leaves what it measured."""
    device = main.resolve_device(cfg.device)
    main.configure_backends(cfg)  # as main.py: cuDNN picks its fastest kernels (the reference gets them too)
    num_classes = data.DATASETS[cfg.dataset]
    train, source = training_split(cfg, opts.data_root)
    if cfg.batch_size > len(train.labels):  # before anything is timed or written (each row would fail alike)
        raise UserError(f"--batch_size {cfg.batch_size} is larger than the training set ({len(train.labels)} images)")
    result: dict[str, Any] = {
        "command": shlex.join(["python", "scripts/benchmark.py", *argv]), "git_commit": main.git_commit(),
        "torch_version": torch.__version__, "device": main.device_name(device), "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        # Other processes on the same cores slow both pipelines unevenly; the load average shows whether they ran.
        "load_average_start": load_average(),
        "settings": {**dataclasses.asdict(cfg), "steps": opts.steps, "warmup_steps": opts.warmup_steps,
                     "workers": opts.workers, "repeats": opts.repeats, "compare_options": opts.compare_options,
                     "profile": opts.profile},
        "data": {"source": source, "train_size": len(train.labels),
                 "class_counts": np.bincount(train.labels, minlength=num_classes).tolist()},
        "project": [], "reference": None, "ratio": None, "ratio_equal_numerics": None, "repeats": None,
        "ratio_median": None, "memory": None,
        "complete": False,
    }
    save(result)  # an unwritable --json path fails here, not after the timing
    first_step = None  # the first project row's step, kept for --repeats and --profile
    for i, (label, config) in enumerate(option_configs(cfg, device, opts.compare_options)):
        print(f"timing project: {label} ...", file=sys.stderr, flush=True)
        try:
            row, step = time_project(config, train, num_classes, device, opts)
            if i == 0 and (opts.repeats > 1 or opts.profile):  # else not kept: its trainer's memory goes
                first_step = step
        except UserError:  # bad input fails every option alike: one line, as without --compare_options
            raise
        except Exception as e:  # noqa: BLE001 - one failing option (say, compile without a compiler) is a row
            if opts.compare_options:
                row = {"error": error_text(e)}
            elif main.one_line_compile_failure(e):  # as main.py says it
                raise UserError(main.compile_failure_text(e)) from e
            else:
                raise
        result["project"].append({"label": label, **row})
        save(result)
    if opts.reference:
        print(f"timing reference: PIL + DataLoader with {opts.workers} workers per loader ...", file=sys.stderr,
              flush=True)
        try:
            result["reference"] = time_reference(cfg, train, num_classes, device, opts)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - say, DataLoader workers killed for lack of shared memory:
            # the project rows and the memory table still count; main_cli exits 1 after writing them
            result["reference"] = {"workers": opts.workers, "error": error_text(e)}
        else:
            for row in result["project"]:
                if "samples_per_s" in row:
                    row["ratio_to_reference"] = row["samples_per_s"] / result["reference"]["samples_per_s"]
            result["ratio"] = result["project"][0].get("ratio_to_reference")
            # The same ratio at the reference's numerics (float32, contiguous, eager): what the data pipeline on
            # the device and the rest of the step give without bf16, channels_last or compilation.
            alike = [row for row in result["project"] if "samples_per_s" in row
                     and not (row["amp"] or row["channels_last"] or row["compile"])]
            if alike:
                result["ratio_equal_numerics"] = alike[0]["ratio_to_reference"]
            if result["ratio"] is not None:
                repeat_pairs(first_step, cfg, train, num_classes, device, opts, result, save)
            elif opts.repeats > 1:
                print("note: no --repeats: the first project row failed", file=sys.stderr, flush=True)
    for row in result["project"]:
        row.setdefault("ratio_to_reference", None)
    result["load_average_after_timing"] = load_average()
    save(result)
    if opts.memory_batch_sizes:
        def memory_so_far(table: dict[str, Any]) -> None:  # a run cut off in the table keeps its rows
            result["memory"] = table
            save(result)

        result["memory"] = memory_table(opts.memory_batch_sizes, device, memory_so_far)
        save(result)
    if opts.profile and first_step is not None:  # last, so that a slow profiler under a time limit costs nothing else
        print("profiling project: " + result["project"][0]["label"] + " ...", file=sys.stderr, flush=True)
        try:
            result["project"][0]["profile"] = profile_steps(first_step, min(opts.steps, PROFILE_MAX_STEPS), device)
        except Exception as e:  # noqa: BLE001 - a profiler that cannot run costs its table, not the timings
            result["project"][0]["profile"] = {"error": error_text(e)}
    result["complete"] = True
    save(result)
    return result


def probe_main(loss: str, batch_text: str) -> int:
    if loss not in ("sc", "psc"):
        raise UserError(f"--_memory_probe loss must be sc or psc (got {loss})")
    try:
        batch_size = int(batch_text)
    except ValueError:
        raise UserError(f"--_memory_probe batch must be an integer (got {batch_text})") from None
    if batch_size < 2:
        raise UserError(f"--_memory_probe batch must be at least 2 (got {batch_size})")
    print(json.dumps(memory_probe(loss, batch_size)), flush=True)
    return 0


def main_cli(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        probe = get_args_parser().parse_known_args(argv)[0]._memory_probe
        if probe is not None:
            return probe_main(*probe)
        cfg, opts = parse_args(argv)
        json_path = opts.json_path
        result = run(cfg, opts, argv, save=(lambda r: util.write_json(r, json_path)) if json_path else lambda r: None)
        print(format_report(result), flush=True)
        if json_path:
            print(f"wrote {json_path}")
        reference = result["reference"]
        if reference is not None and "error" in reference:
            print(f"error: the reference pipeline failed: {reference['error']}", file=sys.stderr, flush=True)
            return 1
        failed = [pair for pair in result["repeats"] or [] if "error" in pair]
        if failed:
            print(f"error: a repeat failed: {failed[0]['error']}", file=sys.stderr, flush=True)
            return 1
        failed = [row for row in result["project"] if "error" in row]  # (--compare_options keeps the others)
        if failed:
            print(f"error: {len(failed)} of {len(result['project'])} project rows failed, the first ("
                  f"{failed[0]['label']}): {failed[0]['error']}", file=sys.stderr, flush=True)
            return 1
        rows = result["memory"]["rows"] if result["memory"] else []
        failed = [row for row in rows if "error" in row]  # (out of memory at the largest batch, say)
        if failed:
            print(f"error: {len(failed)} of {len(rows)} memory rows failed, the first ({failed[0]['loss']} at batch "
                  f"{failed[0]['batch_size']}): {failed[0]['error']}", file=sys.stderr, flush=True)
            return 1
        sys.stdout.flush()
        if getattr(sys.stdout, "failed", False) and not json_path:  # (util.guard_stdout) the table was the result
            print("error: the table could not be printed, and no --json was given", file=sys.stderr, flush=True)
            return 1
        return 0
    except UserError as e:
        print(f"error: {util.printable(e)}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    util.guard_stdout("the benchmark goes on without printing (its numbers go to --json, where given)")
    sys.exit(main_cli())
