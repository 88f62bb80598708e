"""Multi-process training (issue 7) on the CPU: gloo, two processes.

- Two ranks with a global contrastive batch give the single-process loss and gradients: once for an explicit
  DDP step on a fixed batch, once through main.Trainer (its TrainStream slices, DDP wrapping and gather; with
  the default --bn_stats per_branch, whose two backbone passes run inside one DDP forward, and with joint). The
  model has no batch norm, because on the CPU BN statistics are per rank (SyncBatchNorm is GPU-only).
- An evaluation under DDP is rank 0's network (its batch-norm statistics broadcast) on every rank's shard.
- `torchrun --nproc_per_node 2 main.py` trains, writes its files from rank 0 only, resumes (finished and
  interrupted runs), and stops every rank without hanging when one fails.
"""
from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import losses
import main
import networks
from helpers import make_synthetic, snapshot, write_pickled_cifar10

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs torch.distributed with the gloo backend")

ROOT = Path(__file__).resolve().parent.parent
WORLD_SIZE = 2
GLOBAL_BATCH = 8  # B: images per branch per step, over both ranks
NUM_CLASSES = 4
FEAT_DIM = 8
ALPHA = 0.5  # both the feature loss and CE reach the gradients
LOSS_ATOL = 1e-6
GRAD_ATOL = 1e-5
# main.Trainer on a tiny CIFAR-10 split, with the BN-free model patched in for networks.build_model.
TRAINER_ARGS = ["--dataset", "cifar10", "--model", "resnet8", "--batch_size", str(GLOBAL_BATCH),
                "--feat_dim", str(FEAT_DIM), "--learning_rate", "0.1", "--warm_epochs", "0", "--epochs", "2",
                "--lr_decay_epochs", "", "--device", "cpu", "--seed", "3",
                "--no-amp", "--no-channels_last"]  # float32: bf16 rounding would hide a 1e-5 difference
TRAINER_CLASSES = 10
# The Trainer cases: flags after TRAINER_ARGS. The default --bn_stats per_branch splits the model's forward in two
# inside one DDP call; with the BN-free model neither it nor the joint pass may change the step.
TRAINER_CASES = {"sc": ["--loss", "sc"], "psc": ["--loss", "psc"], "ce": ["--loss", "ce"],
                 "sc_joint": ["--loss", "sc", "--bn_stats", "joint"]}


# ----------------------------------------------------------------------------------------------- a BN-free model


class PooledLinear(nn.Module):
    """A backbone without batch norm: [N, 3, 32, 32] -> 4x4 average pool -> Linear(3*8*8 -> 16) -> ReLU -> [N, 16].

    Every output row depends on its own image only, so splitting a batch over ranks changes nothing."""

    out_dim = 16

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, self.out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(F.avg_pool2d(x, 4).flatten(1)))  # [N, 3, 8, 8] -> [N, 192] -> [N, 16]


def build_bn_free_model(name: str, num_classes: int, feat_dim: int = 128,
                        use_prototypes: bool = False) -> networks.HybridNet:
    """Drop-in for networks.build_model (ignores `name`): the real HybridNet head, classifier and prototypes."""
    return networks.HybridNet(PooledLinear(), num_classes, feat_dim=feat_dim, use_prototypes=use_prototypes)


# ----------------------------------------------------------------------------------------------- the explicit step


def global_batch() -> dict[str, torch.Tensor]:
    """A fixed global batch: two SC views [B, 3, 32, 32] each, CE images [B, 3, 32, 32], labels [B] with repeats
    that straddle the ranks (so SC has positives on the other rank)."""
    gen = torch.Generator().manual_seed(0)
    shape = (GLOBAL_BATCH, 3, 32, 32)
    return {"view1": torch.randn(shape, generator=gen), "view2": torch.randn(shape, generator=gen),
            "ce_images": torch.randn(shape, generator=gen),
            "sc_labels": torch.tensor([0, 1, 2, 0, 1, 3, 0, 0]), "ce_labels": torch.tensor([3, 2, 1, 0, 0, 1, 2, 3])}


def rank_slice(batch: dict[str, torch.Tensor], rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """Rank r's rows [r*B/W, (r+1)*B/W) of every branch, SC views view-major as TrainStream lays them out."""
    lo, hi = rank * GLOBAL_BATCH // world_size, (rank + 1) * GLOBAL_BATCH // world_size
    return {"sc_views": torch.cat([batch["view1"][lo:hi], batch["view2"][lo:hi]]),  # [2B/W, 3, 32, 32]
            "sc_labels": batch["sc_labels"][lo:hi], "ce_images": batch["ce_images"][lo:hi],
            "ce_labels": batch["ce_labels"][lo:hi]}


def explicit_step(method: str, batch: dict[str, torch.Tensor], gather=None, ddp: bool = False) -> dict:
    """One forward/backward of HybridLoss on `batch` (this rank's slice), the way Trainer.step does it.

    Returns the loss terms [3] (total, feature, ce) of this rank and the (DDP-averaged) parameter gradients."""
    torch.manual_seed(0)  # the same initial weights on every rank and in the single process
    net = build_bn_free_model("", NUM_CLASSES, FEAT_DIM, use_prototypes=method == "psc")
    if method == "ce":  # as in main: the unused head is frozen, else DDP waits for its gradients forever
        net.head.requires_grad_(False)
    model = torch.nn.parallel.DistributedDataParallel(net) if ddp else net
    criterion = losses.HybridLoss(method, 0.1, gather=gather)
    if method == "ce":
        projections, logits = None, model(batch["ce_images"]).logits
    else:
        n_views = batch["sc_views"].shape[0]  # 2B/W
        out = model(torch.cat([batch["sc_views"], batch["ce_images"]]))
        projections, logits = out.projections[:n_views], out.logits[n_views:]  # [2B/W, D], [B/W, C]
    terms = criterion(projections, batch["sc_labels"], logits, batch["ce_labels"], ALPHA, prototypes=net.prototypes)
    terms.total.backward()
    return {"terms": torch.stack([t.detach() for t in terms]),
            "grads": {name: p.grad.clone() for name, p in net.named_parameters() if p.requires_grad}}


def gather_detached_peers(tensor: torch.Tensor) -> torch.Tensor:
    """The naive all-gather, for the negative check: the peers' slices arrive without a gradient path (own slice
    kept). The forward is identical to main.gather_with_grad's, but each rank's backward then sees only its own
    slice's share, so after DDP's averaging the SC part of the gradient is world_size times too small."""
    parts = [torch.empty_like(tensor) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, tensor.contiguous())
    parts[torch.distributed.get_rank()] = tensor
    return torch.cat(parts)  # [world_size * N, ...]


def trainer_step(case: str, dist: main.Dist) -> dict:
    """One main.Trainer.step (alpha ALPHA) on the first batch of epoch 0, with the BN-free model patched in."""
    cfg = main.parse_config(TRAINER_ARGS + TRAINER_CASES[case])
    train, _ = make_synthetic(TRAINER_CLASSES, 3, 1, seed=5)
    with mock.patch.object(networks, "build_model", build_bn_free_model):
        trainer = main.Trainer(cfg, train, TRAINER_CLASSES, torch.device("cpu"), dist)
    batch = next(trainer.stream.epoch(0))
    terms = trainer.step(batch, ALPHA, cfg.learning_rate)
    named = [(name, p) for name, p in trainer.net.named_parameters() if p.requires_grad]
    return {"terms": torch.stack(list(terms)), "grads": {name: p.grad.clone() for name, p in named},
            "params": {name: p.detach().clone() for name, p in named}}


def ddp_confusion(dist: main.Dist) -> dict:
    """Trainer.confusion on 1,100 test images (two evaluation batches of 1,000: each rank evaluates one) with the
    real resnet8, whose batch-norm running statistics are made to differ on rank 1, as training leaves them."""
    cfg = main.parse_config(["--device", "cpu", "--model", "resnet8", "--batch_size", "8", "--no-amp",
                             "--no-channels_last", "--loss", "ce"])
    train, _ = make_synthetic(NUM_CLASSES, 16, 1, seed=0)
    trainer = main.Trainer(cfg, train, NUM_CLASSES, torch.device("cpu"), dist)
    if dist.rank == 1:
        for module in trainer.net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean += 3.0
                module.running_var *= 9.0
    g = torch.Generator().manual_seed(7)
    images = torch.randint(0, 256, (1100, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, NUM_CLASSES, (1100,), generator=g)
    return {"confusion": trainer.confusion(images, labels), "model": trainer.net.state_dict(), "images": images,
            "labels": labels, "mean": trainer.mean, "std": trainer.std}


def _worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    """One rank of the two-process run (torch.multiprocessing.spawn calls it); writes its results to a file."""
    torch.set_num_threads(1)  # two ranks on two cores, next to other people's tests
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=world_size, timeout=datetime.timedelta(seconds=60))
    try:
        mine = rank_slice(global_batch(), rank, world_size)
        results = {
            "explicit": {
                "sc": explicit_step("sc", mine, gather=main.gather_with_grad, ddp=True),
                "psc": explicit_step("psc", mine, ddp=True),
                "ce": explicit_step("ce", mine, ddp=True),
            },
            "detached_gather": explicit_step("sc", mine, gather=gather_detached_peers, ddp=True),
            "trainer": {case: trainer_step(case, main.Dist(rank, world_size, rank)) for case in TRAINER_CASES},
            "confusion": ddp_confusion(main.Dist(rank, world_size, rank)),
        }
        partial = Path(out_dir) / f"rank{rank}.pt.tmp"
        torch.save(results, partial)
        partial.replace(partial.with_suffix(""))  # complete or absent
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("ddp")
    files = [folder / f"rank{r}.pt" for r in range(WORLD_SIZE)]
    try:
        torch.multiprocessing.spawn(_worker, args=(WORLD_SIZE, str(folder / "rendezvous"), str(folder)),
                                    nprocs=WORLD_SIZE, join=True)
    except torch.multiprocessing.ProcessExitedException:
        # A worker killed by a signal (one that raised is ProcessRaisedException, which fails here). Gloo's teardown
        # at interpreter exit aborted once in about 16 runs of these steps (SIGABRT, 'terminate called without an
        # active exception'), after the results were written; a crash before that leaves a file missing.
        if not all(f.is_file() for f in files):
            raise
    return [torch.load(f, weights_only=False) for f in files]


@pytest.fixture(scope="module")
def one_process() -> dict:
    whole = rank_slice(global_batch(), 0, 1)
    return {"explicit": {method: explicit_step(method, whole) for method in ("sc", "psc", "ce")},
            "trainer": {case: trainer_step(case, main.Dist()) for case in TRAINER_CASES}}


def assert_same_tensors(actual: dict, expected: dict, atol: float, what: str) -> None:
    assert actual.keys() == expected.keys(), what
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=atol, msg=lambda m: f"{what} {name}: {m}")


def test_evaluation_is_rank_0s_network_on_every_shard(two_ranks):
    """Batch-norm running statistics drift apart per process in training: Trainer.confusion evaluates rank 0's
    network (its statistics broadcast) on each rank's shard, so both ranks hold the matrix one process computes
    from the saved (rank 0's) weights, as --eval_only does, and rank 1's own statistics never show."""
    r0, r1 = (rank["confusion"] for rank in two_ranks)
    assert (r0["confusion"] == r1["confusion"]).all()
    net = networks.build_model("resnet8", NUM_CLASSES, 128)
    net.load_state_dict(r0["model"])
    single = main.test_confusion(net.eval(), r0["images"], r0["labels"], mean=r0["mean"], std=r0["std"],
                                 num_classes=NUM_CLASSES, amp=False)
    assert single.sum() == 1100 and (r0["confusion"] == single).all()


def test_sc_loss_and_gradients_equal_one_process(two_ranks, one_process):
    """Each rank computes SC on the gathered global batch: the very value one process gets on the whole batch."""
    single = one_process["explicit"]["sc"]
    for rank, result in enumerate(two_ranks):
        mine = result["explicit"]["sc"]
        torch.testing.assert_close(mine["terms"][1], single["terms"][1], rtol=0, atol=LOSS_ATOL)
        assert_same_tensors(mine["grads"], single["grads"], GRAD_ATOL, f"rank {rank} sc gradient")
    # CE is per rank (mean over B/W images); the two ranks' means average to the global mean.
    ce_mean = (two_ranks[0]["explicit"]["sc"]["terms"][2] + two_ranks[1]["explicit"]["sc"]["terms"][2]) / 2
    torch.testing.assert_close(ce_mean, single["terms"][2], rtol=0, atol=LOSS_ATOL)


@pytest.mark.parametrize("method", ["psc", "ce"])
def test_psc_and_ce_per_rank_losses_average_to_one_process(method, two_ranks, one_process):
    single = one_process["explicit"][method]
    mean_terms = sum(r["explicit"][method]["terms"] for r in two_ranks) / WORLD_SIZE
    torch.testing.assert_close(mean_terms, single["terms"], rtol=0, atol=LOSS_ATOL)
    assert not torch.equal(two_ranks[0]["explicit"][method]["terms"], two_ranks[1]["explicit"][method]["terms"])
    for rank, result in enumerate(two_ranks):
        assert_same_tensors(result["explicit"][method]["grads"], single["grads"], GRAD_ATOL, f"rank {rank} {method}")
    if method == "psc":
        assert "prototypes" in single["grads"] and single["grads"]["prototypes"].abs().sum() > 0


def test_detached_gather_gives_the_same_loss_but_wrong_gradients(two_ranks, one_process):
    """Without the backward all-reduce the loss is right and the gradients are not: this file can fail."""
    single = one_process["explicit"]["sc"]
    for result in two_ranks:
        wrong = result["detached_gather"]
        torch.testing.assert_close(wrong["terms"], result["explicit"]["sc"]["terms"], rtol=0, atol=LOSS_ATOL)
        worst = max((wrong["grads"][n] - single["grads"][n]).abs().max().item() for n in single["grads"])
        assert worst > 100 * GRAD_ATOL


@pytest.mark.parametrize("case", list(TRAINER_CASES))
def test_trainer_step_on_two_ranks_equals_one_process(case, two_ranks, one_process):
    """main.Trainer end to end: TrainStream's rank slices, DDP and the gather give the one-process step."""
    single = one_process["trainer"][case]
    for rank, result in enumerate(two_ranks):
        mine = result["trainer"][case]
        assert_same_tensors(mine["grads"], single["grads"], GRAD_ATOL, f"rank {rank} {case} gradient")
        assert_same_tensors(mine["params"], single["params"], GRAD_ATOL, f"rank {rank} {case} parameter")
        if case.startswith("sc"):  # SC is computed on the gathered global batch: the same value on every rank
            torch.testing.assert_close(mine["terms"][1], single["terms"][1], rtol=0, atol=LOSS_ATOL)
    mean_terms = sum(r["trainer"][case]["terms"] for r in two_ranks) / WORLD_SIZE
    torch.testing.assert_close(mean_terms, single["terms"], rtol=0, atol=LOSS_ATOL)


# ----------------------------------------------------------------------------------------------- torchrun main.py


TINY = ["--model", "resnet8", "--batch_size", "16", "--lr_decay_epochs", "", "--device", "cpu",
        "--imb_factor", "0.1"]
TORCHRUN_TIMEOUT = 120  # a hang fails the test instead of the suite


def torchrun_command(*args: str, script: Path = ROOT / "main.py") -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD_SIZE),
            str(script), *args]


def stand_in(path: Path, template: str, **fields: str) -> Path:
    """A script at `path` that torchrun runs in main.py's place: `template` with the repository's folder as {root}
    (which it puts on sys.path to import main) and `fields`."""
    path.write_text(template.format(root=str(ROOT), **fields))
    return path


def torchrun_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1"}


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_command(*args), capture_output=True, text=True, cwd=cwd, env=torchrun_env(),
                          timeout=TORCHRUN_TIMEOUT)


def sigint_torchrun_when(ready: Callable[[], bool], command: list[str], cwd: Path, stdout: Path,
                         stderr: Path) -> bool:
    """Start torchrun's `command` with its output in files (not pipes: nothing blocks on a full one, and `ready` may
    read them), send it SIGINT once `ready()` holds (or it ended, or TORCHRUN_TIMEOUT passed), and wait for it to
    end (killed if it has not). Whether `ready()` held when the signal was sent."""
    with open(stdout, "w") as out_file, open(stderr, "w") as err_file:
        proc = subprocess.Popen(command, stdout=out_file, stderr=err_file, cwd=cwd, env=torchrun_env())
        try:
            deadline = time.monotonic() + TORCHRUN_TIMEOUT
            while not ready() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            was_ready = ready()
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=TORCHRUN_TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return was_ready


@pytest.fixture(scope="module")
def cifar10_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar10")
    # 20 images per class at imbalance ratio 10: 78 training images, 4 steps of 16 per epoch.
    write_pickled_cifar10(root, *make_synthetic(10, 20, 4, seed=0))
    return root


@pytest.fixture(scope="module")
def torchrun_sc(tmp_path_factory, cifar10_root):
    """A finished one-epoch SC run of `torchrun --nproc_per_node 2 main.py`, in a folder of its own (also the cwd,
    so a stray file from any rank would show)."""
    cwd = tmp_path_factory.mktemp("torchrun_sc")
    proc = torchrun("--data_root", str(cifar10_root), "--loss", "sc", "--output_dir", "run", "--epochs", "1",
                    "--ncm_every", "1", *TINY, cwd=cwd)
    return cwd, proc


def test_torchrun_trains_and_only_rank_0_writes(torchrun_sc):
    cwd, proc = torchrun_sc
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = cwd / "run"
    assert os.listdir(cwd) == ["run"]
    for name in ("config.json", "last.pt", "best.pt", "results.json"):
        assert (out / name).is_file(), name
    assert len(list(cwd.rglob("results.json"))) == 1 and len(list(cwd.rglob("config.json"))) == 1
    assert len(list(cwd.rglob("*.pt"))) == 2  # last.pt, best.pt
    assert len(list(out.glob("events.out.tfevents.*"))) == 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata
    [events] = out.glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events), size_guidance={"tensors": 0})
    acc.Reload()
    start = metadata.parse_session_start_info_plugin_data(
        acc.PluginTagToContent(metadata.PLUGIN_NAME)[metadata.SESSION_START_INFO_TAG])
    assert start.hparams["world_size"].number_value == WORLD_SIZE  # HParams tells it from a one-process run
    config = json.loads((out / "config.json").read_text())
    results = json.loads((out / "results.json").read_text())
    assert config["world_size"] == results["world_size"] == WORLD_SIZE
    assert results["batch_size"] == 16 and results["method"] == "sc"  # the global batch, as given
    assert [h["epoch"] for h in results["history"]] == [1]
    assert 0 <= results["last_top1"] <= 100 and results["history"][0]["feature_loss"] > 0
    assert results["history"][0]["ncm_top1"] == results["ncm"]["top1"]  # --ncm_every 1, on rank 0 alone
    # only rank 0 logs: each line once
    assert proc.stdout.count("done: last top1") == 1 and proc.stdout.count("epoch 1/1 |") == 1
    assert proc.stdout.count("first step ") == 1


def test_torchrun_resume_of_a_finished_run_does_nothing(torchrun_sc, cifar10_root):
    cwd, first = torchrun_sc
    assert first.returncode == 0, first.stderr[-3000:]
    before = snapshot(cwd)
    proc = torchrun("--data_root", str(cifar10_root), "--loss", "sc", "--output_dir", "run", "--epochs", "1",
                    "--resume", *TINY, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("already finished") == 1
    assert snapshot(cwd) == before


def test_failure_on_one_rank_stops_every_rank(torchrun_sc, cifar10_root):
    """Only rank 0 checks the output folder, so only rank 0 fails (after joining the group): torchrun must still
    end the job, with that rank's one-line error, and leave the finished run as it was."""
    cwd, first = torchrun_sc
    assert first.returncode == 0, first.stderr[-3000:]
    before = snapshot(cwd)
    proc = torchrun("--data_root", str(cifar10_root), "--loss", "sc", "--output_dir", "run", "--epochs", "1",
                    *TINY, cwd=cwd)
    assert proc.returncode != 0
    assert "rank 0: error:" in proc.stderr and "already holds a run" in proc.stderr, proc.stderr[-3000:]
    assert snapshot(cwd) == before


def test_a_rank_whose_peer_failed_says_so_in_one_line(tmp_path, cifar10_root):
    """Rank 0 fails alone (here it cannot clear the folder for --overwrite: config.json is a folder) while rank 1 is
    in a collective of its first step: rank 1's gloo error ("Connection closed / reset by peer") is one line
    pointing at the other process, not torch's traceback of the collective."""
    (tmp_path / "run" / "config.json" / "x").mkdir(parents=True)
    proc = torchrun("--data_root", str(cifar10_root), "--loss", "sc", "--output_dir", "run", "--epochs", "1",
                    "--overwrite", *TINY, cwd=tmp_path)
    assert proc.returncode != 0
    assert ("rank 0: error: cannot overwrite the run in run: config.json is a folder, not the file a run leaves "
            "there; move it away") in proc.stderr, proc.stderr[-3000:]
    assert "[rank1]:" not in proc.stderr, proc.stderr[-3000:]  # torch's prefix of a worker's traceback lines
    lines = [line for line in proc.stderr.splitlines() if line.startswith("rank 1:")]
    assert len(lines) <= 1, lines  # none where torchrun's SIGTERM ended it first
    for line in lines:
        assert line.startswith("rank 1: error: another process of this job ended (its message says why), so this "
                               "one stops too (RuntimeError: ") and "by peer" in line, line


def test_peer_gone_knows_a_peers_failure_from_a_processs_own():
    """gloo's and NCCL's words for a peer that is gone; not a process's own fault (NCCL raises DistBackendError for
    a small /dev/shm or a lost GPU too: those keep their traceback, not a line that blames another process)."""
    gloo = RuntimeError("[third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer "
                        "[127.0.0.1]:53162. This is typically caused by a remote worker crashing. Check the logs.")
    assert main.peer_gone(gloo) and main.peer_gone(RuntimeError("Read error: Connection reset by peer"))
    assert main.peer_gone_text(gloo) == "RuntimeError: Connection closed by peer [127.0.0.1]:53162"
    assert main.peer_gone(RuntimeError("NCCL error: remote process exited or there was a network error"))
    own = ["CUDA out of memory", "shape mismatch",
           "NCCL error: unhandled system error, ncclSystemError: Error while creating shared memory segment"]
    assert not any(main.peer_gone(RuntimeError(text)) for text in own)
    if hasattr(torch.distributed, "DistBackendError"):
        assert not main.peer_gone(torch.distributed.DistBackendError(own[2]))


# One SIGTERM reaching both ranks as the step before the last ends, rank 1 a moment behind rank 0 (still inside
# that step, where its verdict is to stop): rank 0 gets it after its step counter moved on, before its poll reads
# the flag ("before_read": its verdict is to finish) or as that poll's all-reduce waits for rank 1
# ("during_reduce": rank 1's stop decides the poll). Steps per epoch: 4 (cifar10_root's 78 images, batch 16).
RANK_SKEW = """
import os, signal, sys
import torch
sys.path.insert(0, {root!r})
import main

STEPS, rank, variant = 4, int(os.environ["RANK"]), {variant!r}
real_poll, real_step, real_reduce, runs, armed = (main.Run.agreed_signal, main.Trainer.step,
                                                  torch.distributed.all_reduce, [], [])
real_init = main.Run.__init__

def init(self, *args, **kwargs):
    real_init(self, *args, **kwargs)
    runs.append(self)

def poll(self):
    if rank == 0 and (self.state.epoch, self.state.step) == (0, STEPS - 1):
        if variant == "before_read":
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            armed.append(True)
    return real_poll(self)

def all_reduce(*args, **kwargs):
    if armed and armed.pop():
        os.kill(os.getpid(), signal.SIGTERM)
    return real_reduce(*args, **kwargs)

def step(self, *args, **kwargs):
    terms = real_step(self, *args, **kwargs)
    if rank == 1 and (runs[0].state.epoch, runs[0].state.step) == (0, STEPS - 2):
        os.kill(os.getpid(), signal.SIGTERM)
    return terms

main.Run.__init__, main.Run.agreed_signal, main.Trainer.step = init, poll, step
torch.distributed.all_reduce = all_reduce
sys.exit(main.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("variant, stops", [("before_read", False), ("during_reduce", True)])
def test_rank_0_says_what_the_run_does_when_another_rank_judged_otherwise(variant, stops, tmp_path, cifar10_root):
    """What rank 0 says at a first signal is what the run does, though rank 1, a moment behind, judged otherwise:
    rank 0 decides where it got the signal before the poll; one that reaches it during the poll's all-reduce is
    said once the poll decided."""
    command = torchrun_command("--data_root", str(cifar10_root), "--output_dir", "run", "--loss", "ce", *TINY,
                               "--epochs", "1", script=stand_in(tmp_path / "skew.py", RANK_SKEW, variant=variant))
    proc = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=torchrun_env(),
                          timeout=TORCHRUN_TIMEOUT)
    said = [line for line in proc.stderr.splitlines() if line.startswith("SIGTERM: ")]
    if stops:
        assert said[0].startswith("SIGTERM: stopping after the current step"), proc.stderr[-3000:]
        assert "SIGTERM: stopped after step 3 of epoch 1" in proc.stderr and proc.returncode != 0
        assert not (tmp_path / "run" / "results.json").exists()
    else:
        assert said == ["SIGTERM: the run is in its last step or past it, and finishes first: its evaluation and "
                        "results.json (a second signal, 2 s on or later, stops at once)"], proc.stderr[-3000:]
        assert proc.returncode == 0 and (tmp_path / "run" / "results.json").is_file()


def test_interrupted_torchrun_resumes_to_the_end_as_if_never_stopped(tmp_path):
    """SIGINT to torchrun once epoch 1 of 2 is saved: it forwards the signal, the ranks agree to stop at the next
    step (on the CPU every step is polled, not only the logging intervals: torchrun kills its workers 30 s after
    a SIGTERM) and rank 0 saves last.pt, with every rank's share of the epoch's loss sums; a second torchrun with
    --resume finishes the run, and its history and weights are bitwise those of a run never stopped (each rank's
    CE sums differ, so rank 0's alone would not add up)."""
    root = tmp_path / "data"
    # 100 images per class at ratio 10: 403 training images, 50 steps of 8 an epoch, a second or more of them.
    write_pickled_cifar10(root, *make_synthetic(10, 100, 2, seed=1))
    args = ["--data_root", str(root), "--loss", "sc", *TINY, "--batch_size", "8", "--epochs", "2",
            "--print_freq", "1000", "--eval_every", "2"]
    stdout, stderr = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    # last.pt appears once epoch 1 is saved; the ranks poll for a signal right after that, then at each step of
    # epoch 2: a signal now lands in epoch 2.
    assert sigint_torchrun_when(lambda: (tmp_path / "run" / "last.pt").exists(),
                                torchrun_command(*args, "--output_dir", "run"), tmp_path, stdout, stderr), \
        stderr.read_text()[-3000:]
    assert "epoch 1/2 |" in stdout.read_text(), stderr.read_text()[-3000:]
    assert "SIGINT: stopped after step" in stderr.read_text(), stderr.read_text()[-3000:]
    saved = torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=False)["run"]
    assert saved["epoch"] == 1 and 0 < saved["step"] < 50  # mid-epoch, far from a logging interval
    assert tuple(saved["epoch_sums"].shape) == (WORLD_SIZE, 4)
    assert saved["epoch_sums"][:, 3].tolist() == [saved["step"]] * WORLD_SIZE  # each rank's steps
    assert not (tmp_path / "run" / "results.json").exists()

    proc = torchrun(*args, "--output_dir", "run", "--resume", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    never_stopped = torchrun(*args, "--output_dir", "whole", cwd=tmp_path)
    assert never_stopped.returncode == 0, never_stopped.stderr[-3000:]
    results, whole = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("run", "whole"))
    assert [h["epoch"] for h in results["history"]] == [1, 2]
    assert results["world_size"] == WORLD_SIZE
    assert [(s["epoch"], s["step"], s["world_size"]) for s in results["sessions"]] == [
        (0, 0, WORLD_SIZE), (1, saved["step"], WORLD_SIZE)]

    def kept(history):  # everything but the timings
        return [{k: v for k, v in h.items() if k != "samples_per_s"} for h in history]

    assert kept(results["history"]) == kept(whole["history"])
    assert results["per_class"] == whole["per_class"] and results["last_top1"] == whole["last_top1"]
    weights, whole_weights = (torch.load(tmp_path / name / "last.pt", map_location="cpu", weights_only=False)["model"]
                              for name in ("run", "whole"))
    for key, tensor in whole_weights.items():
        assert torch.equal(weights[key], tensor), key


PER_RANK = torch.tensor([[1.5, 0.5, 1.0, 3.0], [2.5, 0.5, 2.0, 3.0]])  # two ranks' sums: total, feature, ce, steps


@pytest.mark.parametrize("saved, world_size, expected", [
    (PER_RANK, 2, [PER_RANK[0], PER_RANK[1]]),  # the same processes: each its own row
    (PER_RANK, 1, [PER_RANK.sum(0) / 2]),  # resumed on one process: their total, a step counted once
    (PER_RANK, 4, [PER_RANK.sum(0) * 2, torch.zeros(4), torch.zeros(4), torch.zeros(4)]),
    (PER_RANK[1], 2, [PER_RANK[1] * 2, torch.zeros(4)]),  # one process's [4] (a run on one, or an older checkpoint)
    (PER_RANK[1], 1, [PER_RANK[1]]),
])
def test_mid_epoch_loss_sums_are_shared_out_on_resume(saved, world_size, expected):
    """With the same number of processes each rank gets its own sums back. With another, rank 0 takes the saved
    total with each saved step counted world_size times, as each step after the resume is (once per process):
    the mean of the saved steps is kept, and they weigh as much in the epoch's mean loss as the steps to come."""
    ranks = []
    for rank in range(world_size):
        state = main.RunState()
        state.load_state_dict({"epoch": 1, "step": 3, "epoch_sums": saved.clone()}, torch.device("cpu"), rank,
                              world_size)
        assert torch.equal(state.epoch_sums, expected[rank]), rank
        ranks.append(state.epoch_sums)
    total, saved_total = torch.stack(ranks).sum(0), saved.reshape(-1, 4).sum(0)
    assert total[3] == 3 * world_size  # 3 steps saved, each counted once per process of the resumed run
    assert torch.equal(total[:3] / total[3], saved_total[:3] / saved_total[3])  # their mean losses kept


@pytest.mark.parametrize("world_size", ["2", None])
def test_exit_process_skips_interpreter_teardown_only_under_torchrun(world_size):
    """A torchrun process leaves with os._exit after flushing its output (C++ teardown at interpreter exit aborted
    now and then, failing a finished job); a lone process exits normally, atexit handlers included."""
    code = ("import atexit, sys, main\n"
            "atexit.register(lambda: print('teardown ran', flush=True))\n"
            "print('unflushed out', end='')\n"
            "print('unflushed err', end='', file=sys.stderr)\n"
            "main.exit_process(3)\n")
    env = {k: v for k, v in os.environ.items() if k != "WORLD_SIZE"}
    if world_size is not None:
        env["WORLD_SIZE"] = world_size
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=60)
    assert proc.returncode == 3
    assert proc.stdout.startswith("unflushed out") and proc.stderr == "unflushed err"
    assert ("teardown ran" in proc.stdout) == (world_size is None)


# Each rank marks that it is loading the data (before Run.run installs the signal handlers: Python's KeyboardInterrupt
# ends main() there), then waits there until torchrun relays the test's SIGINT.
SLOW_DATA = """
import os, sys, time
sys.path.insert(0, {root!r})
import main

def load_data(*args, **kwargs):
    open(os.path.join({marks!r}, os.environ["RANK"]), "w").close()
    time.sleep(60)

main.load_data = load_data
main.exit_process(main.main(sys.argv[1:]))
"""


def test_a_ctrl_c_before_the_run_starts_says_interrupted_once(tmp_path, cifar10_root):
    """A Ctrl-C reaches every process of a torchrun job (torchrun relays the SIGINT it gets): one caught before the
    run's signal handlers (Python's KeyboardInterrupt: loading the data, building the model, --dry_run, --eval_only)
    is said by rank 0 alone, as a stop is, not as one 'interrupted' per process."""
    marks = tmp_path / "marks"
    marks.mkdir()
    command = torchrun_command("--data_root", str(cifar10_root), "--output_dir", "run", *TINY, "--epochs", "1",
                               script=stand_in(tmp_path / "slow.py", SLOW_DATA, marks=str(marks)))
    stderr = tmp_path / "stderr.txt"
    assert sigint_torchrun_when(lambda: sorted(os.listdir(marks)) == ["0", "1"], command, tmp_path,
                                tmp_path / "stdout.txt", stderr), stderr.read_text()[-3000:]
    text = stderr.read_text()
    assert [line for line in text.splitlines() if "interrupted" in line] == ["interrupted"], text[-3000:]
    assert "[rank0]:" not in text and "[rank1]:" not in text, text[-3000:]  # (a worker's traceback; torchrun's own
    # SignalException is torchrun's)


def test_a_dry_run_with_stdout_closed_fails_once_from_rank_0(tmp_path, cifar10_root):
    """--dry_run's result is what it prints, so with standard output closed (`torchrun ... >&-`) it fails: on rank 0,
    which prints it, with one line. Another rank prints none of it: it neither says so too nor fails."""
    proc = subprocess.run(torchrun_command("--data_root", str(cifar10_root), "--output_dir", "run", *TINY,
                                           "--epochs", "1", "--dry_run"),
                          stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=torchrun_env(),
                          timeout=TORCHRUN_TIMEOUT, preexec_fn=lambda: os.close(1))
    assert proc.returncode != 0
    said = "error: what this command prints is its result, and standard output was closed (>&-)"
    assert proc.stderr.count(said) == 1, proc.stderr[-3000:]
    assert "rank      : 1" not in proc.stderr, proc.stderr[-3000:]  # torchrun's report of a failed rank 1
    assert not (tmp_path / "run").exists()


# Each _write_cache call (the first read of image folders, after decoding them) leaves a mark named after its rank.
COUNTED_CACHE = """
import os, sys
sys.path.insert(0, {root!r})
import dataset_loader
import main

real = dataset_loader._write_cache

def write_cache(*args, **kwargs):
    open(os.path.join({marks!r}, os.environ["RANK"]), "w").close()
    return real(*args, **kwargs)

dataset_loader._write_cache = write_cache
main.exit_process(main.main(sys.argv[1:]))
"""


def test_image_folders_are_decoded_once_under_torchrun(tmp_path):
    """Image folders are decoded and their cache written by rank 0 alone; the other processes wait, then read the
    cache (each process decoded them and wrote the same cache file at once before)."""
    from PIL import Image

    root = tmp_path / "images"
    for split, part in zip(("train", "test"), make_synthetic(10, 20, 4, seed=0)):
        for i, (image, label) in enumerate(zip(part.images, part.labels)):
            folder = root / split / f"class_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i}.png")
    marks = tmp_path / "marks"
    marks.mkdir()
    command = torchrun_command("--data_root", str(root), "--output_dir", "run", *TINY, "--epochs", "1", "--dry_run",
                               script=stand_in(tmp_path / "counted.py", COUNTED_CACHE, marks=str(marks)))
    env = {**torchrun_env(), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    proc = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=TORCHRUN_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dry run: would start a run in run" in proc.stdout
    assert os.listdir(marks) == ["0"]
    assert len(list(root.glob("hybrid-lt-cache-*.npz"))) == 1


# Rank 1 plays the first process of another machine whose --data_root holds no data (its own disk, not rank 0's).
OTHER_MACHINE_WITHOUT_DATA = """
import os, sys
sys.path.insert(0, {root!r})
import main

argv = sys.argv[1:]
if os.environ["RANK"] == "1":
    os.environ["LOCAL_RANK"] = "0"
    argv[argv.index("--data_root") + 1] = {empty!r}
main.exit_process(main.main(argv))
"""


def test_a_machine_without_the_data_says_so_where_rank_0_holds_the_pickled_layout(tmp_path, cifar10_root):
    """Rank 0's machine holds the pickled layout (no turns needed there), another machine's --data_root holds nothing
    (turns needed): the job agrees to take turns, so that machine's process says what is missing and the job ends at
    once; deciding each on its own disk, rank 0 went on to the model's collectives while the other waited at the
    turns' barrier, and the job hung until the timeout."""
    empty = tmp_path / "empty"
    empty.mkdir()
    command = torchrun_command("--data_root", str(cifar10_root), "--output_dir", "run", *TINY, "--epochs", "1",
                               script=stand_in(tmp_path / "other.py", OTHER_MACHINE_WITHOUT_DATA, empty=str(empty)))
    proc = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=torchrun_env(),
                          timeout=TORCHRUN_TIMEOUT)
    assert proc.returncode != 0
    assert f"rank 1: error: no cifar10 data in {empty}: " in proc.stderr, proc.stderr[-3000:]
