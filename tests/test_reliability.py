"""Runs that survive interruption, resume exactly, and stop cleanly on divergence or disk trouble.

Bad input tried (here and in test_cli.py / test_dataset_loader.py), each giving one line and a non-zero exit:
- every flag: unknown dataset / model / loss / sampler / device / imb_type / PSC denominator (argparse choices);
  non-numeric values; batch size < 2; lr <= 0; epochs < 1; imb_factor outside (0, 1]; lr decay epochs outside
  the run or not increasing or not integers; negative momentum / weight decay / warm-up; decay rate outside
  (0, 1]; temperatures <= 0; feat_dim / eval_every / print_freq < 1; --eval_only without --checkpoint;
  --resume with --overwrite; --device cuda without a GPU; --sync_bn on the CPU; a batch larger than the
  long-tailed training set; a batch not divisible by the number of processes;
- every file: a data root with no known layout; image folders with the wrong number of classes, an empty class
  folder, an unreadable or wrongly sized image; pickled batches that are missing or malformed; a checkpoint that
  is missing, garbage, truncated, from another model or class count, or from other settings (--resume);
- the output folder: one that already holds a run (without --resume / --overwrite), --resume with no checkpoint,
  a read-only folder, a full disk (a file-size limit) while writing a checkpoint.
"""
from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import util
from helpers import call_main, make_synthetic, snapshot, write_pickled_cifar10

ROOT = Path(__file__).resolve().parent.parent
# --ncm_every 2: the history of a resumed run must also hold the same nearest-class-mean entries (epoch 2's).
TINY = ["--model", "resnet8", "--batch_size", "16", "--epochs", "3", "--lr_decay_epochs", "2",
        "--learning_rate", "0.05", "--warm_epochs", "0.5", "--device", "cpu", "--imb_factor", "0.1",
        "--print_freq", "4", "--ncm_every", "2"]
TIMING_KEYS = {"samples_per_s"}  # the only history entries that may differ between two runs


def cli(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "main.py"), *args]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar10")
    write_pickled_cifar10(root, *make_synthetic(10, 40, 10, seed=3))
    return root


@pytest.fixture(scope="module")
def straight_run(data_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight") / "run"
    proc = subprocess.run(cli("--data_root", str(data_root), "--output_dir", str(out), *TINY),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def start_and_signal_after(line_prefix: str, argv: list[str], sig: int) -> tuple[subprocess.Popen, str, str]:
    """Start the CLI, send `sig` as soon as a stdout line starts with `line_prefix`, wait for the exit."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(line_prefix):
            proc.send_signal(sig)
            break
    out, err = proc.communicate(timeout=300)
    return proc, "".join(seen) + out, err


def same_state_dicts(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def without_timing(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in entry.items() if k not in TIMING_KEYS} for entry in history]


# Stands in for numpy on PYTHONPATH: main.py's first import that takes time (torch's comes next) says it started,
# then blocks, so that a signal lands inside the imports.
SLOW_IMPORT = """import os, pathlib, time
pathlib.Path(os.environ["IMPORT_STARTED"]).touch()
time.sleep(60)
"""


@pytest.mark.parametrize("sigint", ["default", "ignored"])
def test_ctrl_c_while_importing_is_one_line_and_130(tmp_path, sigint):
    """Ctrl-C before main() starts (importing torch takes seconds) ends the program as it does later: 'interrupted'
    and exit 130, no traceback. Where SIGINT was ignored at the start ('&' in a script), it stays ignored."""
    (tmp_path / "numpy").mkdir()
    (tmp_path / "numpy" / "__init__.py").write_text(SLOW_IMPORT)
    started = tmp_path / "import_started"
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "IMPORT_STARTED": str(started)}
    disposition = signal.SIG_DFL if sigint == "default" else signal.SIG_IGN
    proc = subprocess.Popen(cli("--device", "cpu"), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, disposition))
    try:
        deadline = time.monotonic() + 60
        while not started.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        if sigint == "ignored":
            time.sleep(1.0)
            assert proc.poll() is None  # still importing
            return
        out, err = proc.communicate(timeout=30)
        assert (proc.returncode, out, err) == (130, "", "interrupted\n")
    finally:
        proc.kill()
        proc.communicate()


@pytest.mark.parametrize("sig, line", [(signal.SIGTERM, "epoch 1/3"), (signal.SIGINT, "first step ")],
                         ids=["SIGTERM after an epoch", "SIGINT mid-epoch"])
def test_stop_and_resume_equals_straight_through(sig, line, data_root, straight_run, tmp_path):
    """Stopped after an epoch, or inside the first one (signalled on the line printed after its first step of
    9), and resumed: the same weights, history and results as the run that was never stopped. Mid-epoch this
    takes the epoch's loss sums, the stream's position and the learning rate from last.pt."""
    out = tmp_path / "run"
    overwrite = sig == signal.SIGTERM  # started with --overwrite, which contradicts --resume: the line says so
    argv = cli("--data_root", str(data_root), "--output_dir", str(out), *TINY, *(["--overwrite"] if overwrite else []))
    proc, stdout, stderr = start_and_signal_after(line, argv, sig)
    assert proc.returncode == 128 + sig, stderr[-3000:]
    how = "with --resume in place of --overwrite" if overwrite else "plus --resume"
    assert f"Resume with the same command {how} (a run of a sweep" in stderr and "Traceback" not in stderr
    assert not (out / "results.json").exists()
    stopped = util.load_checkpoint(out / "last.pt")["run"]
    batch = int(TINY[TINY.index("--batch_size") + 1])
    if line == "first step ":
        assert stopped["epoch"] == 0 and 0 < stopped["step"] < 9, stopped
        assert "of epoch 1; checkpoint" in stderr
        # the steps before the stop count in the training time, but for the first (its one-off costs)
        assert stopped["train_samples"] == (stopped["step"] - 1) * batch and stopped["train_time"] > 0
    else:
        assert (stopped["epoch"], stopped["step"]) >= (1, 0) and stopped["epoch"] < 3

    resumed = subprocess.run([a for a in argv if a != "--overwrite"] + ["--resume"], capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    a = util.load_checkpoint(straight_run / "last.pt")
    b = util.load_checkpoint(out / "last.pt")
    assert same_state_dicts(a["model"], b["model"]), "weights differ from the run that was never stopped"
    ra = json.loads((straight_run / "results.json").read_text())
    rb = json.loads((out / "results.json").read_text())
    assert without_timing(ra["history"]) == without_timing(rb["history"])
    assert "ncm_top1" in ra["history"][1]
    for key in ("best_top1", "best_epoch", "last_top1", "per_class", "best", "last", "ncm"):
        assert ra[key] == rb[key], key
    # every step is timed but each session's first (first_step_s): one step fewer than the straight run
    assert b["run"]["train_samples"] == a["run"]["train_samples"] - batch
    # TensorBoard's HParams: one session per run, its start in one events file (the first start's), its end in
    # the other (the resumed run's). Compared as a set: two files begun in one second would sort by host and pid.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    tags = []
    for events in out.glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events), size_guidance={"tensors": 0})
        acc.Reload()
        tags.append(tuple(sorted(acc.PluginTagToContent(metadata.PLUGIN_NAME))))
    assert sorted(tags) == sorted([(metadata.SESSION_END_INFO_TAG,),
                                   tuple(sorted([metadata.EXPERIMENT_TAG, metadata.SESSION_START_INFO_TAG]))])


def test_signal_in_an_epochs_last_step_resumes(data_root, tmp_path):
    """With one step per epoch every signal lands in an epoch's last step (or its evaluation): the run stops at
    the epoch boundary with a checkpoint that --resume continues from."""
    out = tmp_path / "run"
    argv = cli("--data_root", str(data_root), "--output_dir", str(out), *TINY)
    argv[argv.index("--batch_size") + 1] = "150"  # 159 images: one step per epoch
    argv[argv.index("--epochs") + 1] = "5"
    proc, _, stderr = start_and_signal_after("epoch 1/5", argv, signal.SIGTERM)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "SIGTERM: stopped after epoch" in stderr
    state = util.load_checkpoint(out / "last.pt")["run"]
    assert state["step"] == 0 and 1 <= state["epoch"] <= 4
    resumed = subprocess.run(argv + ["--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [h["epoch"] for h in json.loads((out / "results.json").read_text())["history"]] == [1, 2, 3, 4, 5]


def test_kill_9_during_checkpoint_writes_leaves_a_loadable_checkpoint(data_root, tmp_path):
    """SIGKILL the moment a checkpoint's temporary file appears (i.e. mid-write), several times over one run;
    each time the folder's last.pt, if any, must load, and the next start must resume from it."""
    out = tmp_path / "run"
    base = cli("--data_root", str(data_root), "--output_dir", str(out), *TINY)
    base[base.index("--epochs") + 1] = "6"
    base[base.index("--lr_decay_epochs") + 1] = "4"
    kills = 0
    epochs_seen = []
    for attempt in range(4):  # four kills, one in a first write and three later; the run is finished below
        argv = base + (["--resume"] if (out / "last.pt").exists() else ["--overwrite"])
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        # The first attempt dies in its first checkpoint write (nothing to resume: the next start must begin
        # again); later ones in their second, so that each leaves a newer complete last.pt behind.
        kill_at = 1 if attempt == 0 else 2
        stale = {p.name for p in out.iterdir()} if out.is_dir() else set()  # a killed attempt's temporary file
        writes: set[str] = set()
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if out.is_dir():
                writes.update(p.name for p in os.scandir(out) if p.name.startswith(".last.pt.")
                              and p.name not in stale)
                if len(writes) >= kill_at:
                    proc.kill()
                    break
            time.sleep(0.0005)
        proc.wait(timeout=60)
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-3000:]
        proc.stderr.close()
        kills += 1
        if (out / "last.pt").exists():
            state = util.load_checkpoint(out / "last.pt")
            epochs_seen.append((state["run"]["epoch"], state["run"]["step"]))
    assert kills >= 3, "the run finished before it could be killed three times"
    assert epochs_seen == sorted(epochs_seen) and len(epochs_seen) >= 2
    if not (out / "results.json").exists():  # four tries were not enough to finish: finish it now
        proc = subprocess.run(base + ["--resume"], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert [h["epoch"] for h in res["history"]] == list(range(1, 7))
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")], "stale temporary files were not cleaned"


def test_non_finite_loss_stops_the_run_without_writing(data_root, tmp_path):
    out = tmp_path / "run"
    argv = cli("--data_root", str(data_root), "--output_dir", str(out), *TINY)
    argv[argv.index("--learning_rate") + 1] = "1e30"
    argv[argv.index("--warm_epochs") + 1] = "0"
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "non-finite loss in epoch 1" in proc.stderr and "Traceback" not in proc.stderr
    assert "no checkpoint was written" in proc.stderr
    assert not (out / "last.pt").exists() and not (out / "best.pt").exists()
    # TensorBoard's HParams lists the run as failed (torch's hparams() only ever writes success)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import api_pb2, metadata
    [events] = out.glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events), size_guidance={"tensors": 0})
    acc.Reload()
    contents = acc.PluginTagToContent(metadata.PLUGIN_NAME)
    end = metadata.parse_session_end_info_plugin_data(contents[metadata.SESSION_END_INFO_TAG])
    assert end.status == api_pb2.STATUS_FAILURE and metadata.SESSION_START_INFO_TAG in contents


def test_divergence_keeps_the_last_good_checkpoint(data_root, straight_run, tmp_path):
    """Resume from a checkpoint whose next step is bound to blow up (one weight set to inf): the run stops with
    the epoch and step, exits non-zero, and leaves last.pt and best.pt byte for byte as they were."""
    out = tmp_path / "run"
    argv = cli("--data_root", str(data_root), "--output_dir", str(out), *TINY)
    proc, _, stderr = start_and_signal_after("epoch 1/3", argv, signal.SIGINT)
    assert proc.returncode == 130, stderr
    state = util.load_checkpoint(out / "last.pt")
    state["model"]["classifier.weight"][0, 0] = float("inf")
    torch.save(state, out / "last.pt")
    before = {name: (out / name).read_bytes() for name in ("last.pt", "best.pt")}
    proc = subprocess.run(argv + ["--resume"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert f"non-finite loss in epoch {state['run']['epoch'] + 1}, by step" in proc.stderr
    assert "last good checkpoint" in proc.stderr and "Traceback" not in proc.stderr
    assert {name: (out / name).read_bytes() for name in before} == before
    best = util.load_checkpoint(out / "best.pt")
    assert all(torch.isfinite(v).all() for v in best["model"].values() if v.is_floating_point())


def test_failed_checkpoint_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    util.save_checkpoint({"model": {"w": torch.ones(3)}, "config": {}}, path)

    def disk_full(fd):  # the bytes went to the temporary file; making them durable fails
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(util.os, "fsync", disk_full)
    with pytest.raises(util.UserError, match="could not write checkpoint .*No space left on device.*kept"):
        util.save_checkpoint({"model": {"w": torch.zeros(3)}, "config": {}}, path)
    monkeypatch.undo()
    assert torch.equal(util.load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"], "the temporary file was left behind"


def _limit_file_size():  # runs in the child before exec: files may not grow past 256 KiB
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of being killed
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))


def test_full_disk_while_writing_a_checkpoint(data_root, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(cli("--data_root", str(data_root), "--output_dir", str(out), *TINY),
                          capture_output=True, text=True, timeout=300, preexec_fn=_limit_file_size)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: could not write checkpoint"), proc.stderr
    assert "File too large" in lines[0]
    assert not (out / "last.pt").exists() and not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def _make_read_only(folder: Path) -> bool:
    """Make `folder` unwritable even for root (chattr +i), or by mode bits for other users."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return True
    return shutil.which("chattr") is not None and subprocess.run(["chattr", "+i", str(folder)]).returncode == 0


def _make_writable(folder: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(folder)])
    folder.chmod(0o755)


def test_read_only_output_folder(data_root, straight_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(straight_run, out)
    (out / "results.json").unlink()  # an unfinished run, so --resume has work to do
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    if not _make_read_only(out):
        pytest.skip("cannot make a folder read-only here")
    try:
        proc = subprocess.run(cli("--data_root", str(data_root), "--output_dir", str(out), "--resume", *TINY),
                              capture_output=True, text=True, timeout=300)
    finally:
        _make_writable(out)
    # --resume of a finished-but-for-results run: it has nothing to train and must still write results.json
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stderr.startswith("error: could not write") and len(proc.stderr.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def after_each_step(monkeypatch, action) -> list[int]:
    """main.Trainer.step, then action(trainer, n), n the number of steps this process has taken (also returned,
    as a one-item list that a test may reset)."""
    import main

    real_step, taken = main.Trainer.step, [0]

    def step(self, *args, **kwargs):
        terms = real_step(self, *args, **kwargs)
        taken[0] += 1
        action(self, taken[0])
        return terms

    monkeypatch.setattr(main.Trainer, "step", step)
    return taken


def test_stops_and_resumes_of_the_other_settings_equal_the_run_never_stopped(data_root, tmp_path, monkeypatch):
    """The settings test_stop_and_resume_equals_straight_through leaves at their defaults, all in one run (Hybrid-PSC with the 'all'
    denominator, SupContrast's augmentation of the views, the class sampler for the views and sqrt for the images,
    an lr warm-up that the first stop cuts, an evaluation every 2 epochs, the nearest class mean every epoch): stopped
    by a SIGTERM during the warm-up and again mid-epoch between two evaluations, each time resumed, it ends with the
    same weights, optimiser state and results as the run never stopped. In-process (main.main), a step counted to
    signal this process itself."""
    import main

    steps_per_epoch = 9
    argv = ["--data_root", str(data_root), *TINY, "--epochs", "4", "--lr_decay_epochs", "3", "--warm_epochs", "1.5",
            "--loss", "psc", "--psc_denominator", "all", "--sc_aug", "supcon", "--sc_sampler", "class",
            "--ce_sampler", "sqrt", "--eval_every", "2", "--ncm_every", "1"]
    straight, out = tmp_path / "straight", tmp_path / "run"
    assert main.main([*argv, "--output_dir", str(straight)]) == 0

    stop_at = {11}  # after step 2 of epoch 2 (9 steps an epoch): inside the 1.5-epoch warm-up
    # the run's own handler takes the signal: it stops after this step
    taken = after_each_step(monkeypatch, lambda trainer, n: os.kill(os.getpid(), signal.SIGTERM) if n in stop_at
                            else None)
    assert main.main([*argv, "--output_dir", str(out)]) == 128 + signal.SIGTERM
    assert [util.load_checkpoint(out / "last.pt")["run"][k] for k in ("epoch", "step")] == [1, 2]
    taken[0] = 0  # after step 4 of epoch 3: 7 steps to end epoch 2, then 4
    stop_at = {steps_per_epoch + 2}
    assert main.main([*argv, "--output_dir", str(out), "--resume"]) == 128 + signal.SIGTERM
    assert [util.load_checkpoint(out / "last.pt")["run"][k] for k in ("epoch", "step")] == [2, 4]
    stop_at = set()
    assert main.main([*argv, "--output_dir", str(out), "--resume"]) == 0

    a, b = util.load_checkpoint(straight / "last.pt"), util.load_checkpoint(out / "last.pt")
    assert same_state_dicts(a["model"], b["model"]), "weights differ from the run that was never stopped"
    momenta = [(s["momentum_buffer"], t["momentum_buffer"])
               for s, t in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values())]
    assert len(momenta) == len(a["optimizer"]["state"]) > 0 and all(torch.equal(s, t) for s, t in momenta)
    ra, rb = (json.loads((folder / "results.json").read_text()) for folder in (straight, out))
    assert without_timing(ra["history"]) == without_timing(rb["history"])
    assert [("top1" in e, "ncm_top1" in e) for e in rb["history"]] == [(False, True), (True, True)] * 2
    for key in ("best_top1", "best_epoch", "last_top1", "per_class", "best", "last", "ncm"):
        assert ra[key] == rb[key], key


# In-process runs (main.main) on data_root: 159 images at ratio 10, 9 steps of 16 an epoch; CE keeps them short.
LOOP = ["--model", "resnet8", "--batch_size", "16", "--learning_rate", "0.05", "--warm_epochs", "0",
        "--device", "cpu", "--imb_factor", "0.1", "--print_freq", "3", "--loss", "ce"]
LOOP_BATCH, LOOP_STEPS = 16, 9


def test_warm_up_lr_rises_at_every_step_and_each_epochs_last_interval_is_logged(data_root, tmp_path, capsys):
    """--warm_epochs 1: each step's lr is util.learning_rate of its global step (a linear rise within epoch 1, not
    one lr for the epoch); --print_freq 4 with 9 steps an epoch logs after steps 4 and 8 and the epoch's last, 9."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    code, err = call_main(["--data_root", str(data_root), "--output_dir", str(out), *LOOP, "--epochs", "2",
                           "--lr_decay_epochs", "", "--warm_epochs", "1", "--print_freq", "4"], capsys)
    assert code == 0, err
    [events] = out.glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
    acc.Reload()
    logged = [(e.step, e.value) for e in acc.Scalars("train/lr")]
    assert [step for step, _ in logged] == [4, 8, 9, 13, 17, 18]
    expected = [util.learning_rate(step - 1, base_lr=0.05, steps_per_epoch=LOOP_STEPS, warm_epochs=1,
                                   decay_epochs=(), decay_rate=0.1) for step, _ in logged]
    assert [value for _, value in logged] == pytest.approx(expected, rel=1e-6)
    assert expected[0] < expected[1] < expected[2] == pytest.approx(0.05)
    history = json.loads((out / "results.json").read_text())["history"]
    assert [h["lr"] for h in history] == pytest.approx([expected[2], expected[5]])


def test_a_mid_epoch_stop_counts_its_steps_and_the_rate_is_samples_over_training_time(data_root, tmp_path,
                                                                                      monkeypatch, capsys):
    """Stopped by SIGTERM after step 5 of epoch 1, the checkpoint counts steps 2..5 (the first is not timed) in
    train_samples; resumed to the end, every step but each session's first; results.json's samples_per_s is
    train_samples / train_time, not over the wall time."""
    out = tmp_path / "run"
    argv = ["--data_root", str(data_root), "--output_dir", str(out), *LOOP, "--epochs", "2", "--lr_decay_epochs", "1"]
    with monkeypatch.context() as m:
        after_each_step(m, lambda trainer, n: os.kill(os.getpid(), signal.SIGTERM) if n == 5 else None)
        code, err = call_main(argv, capsys)
    assert code == 128 + signal.SIGTERM and "SIGTERM: stopped after step 5 of epoch 1" in err, err
    stopped = util.load_checkpoint(out / "last.pt")["run"]
    assert (stopped["epoch"], stopped["step"], stopped["train_samples"]) == (0, 5, 4 * LOOP_BATCH)
    assert stopped["train_time"] > 0
    code, err = call_main([*argv, "--resume"], capsys)
    assert code == 0, err
    run = util.load_checkpoint(out / "last.pt")["run"]
    assert run["train_samples"] == (2 * LOOP_STEPS - 2) * LOOP_BATCH  # two sessions, two untimed first steps
    res = json.loads((out / "results.json").read_text())
    assert res["train_time_s"] == run["train_time"] < res["wall_time_s"]
    assert res["samples_per_s"] == pytest.approx(run["train_samples"] / run["train_time"], rel=1e-9)


def test_the_last_epoch_is_evaluated_and_its_ncm_reported_where_the_intervals_do_not_divide_the_run(
        data_root, tmp_path, monkeypatch, capsys):
    """--epochs 3 --eval_every 2 --ncm_every 2: epochs 2 and 3 are evaluated (always after the last), so the last
    epoch's top-1 is in its history entry and competes for best; the run's ncm is the final network's (epoch 3),
    not the last --ncm_every one's (epoch 2), and no evaluate-only session is added for it."""
    import main

    reports = {}
    real = main.Run.nearest_class_mean

    def recording(self, *args, **kwargs):
        reports[self.state.epoch] = report = real(self, *args, **kwargs)
        return report

    monkeypatch.setattr(main.Run, "nearest_class_mean", recording)
    out = tmp_path / "run"
    code, err = call_main(["--data_root", str(data_root), "--output_dir", str(out), *LOOP, "--epochs", "3",
                           "--lr_decay_epochs", "2", "--eval_every", "2", "--ncm_every", "2"], capsys)
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    assert ["top1" in h for h in res["history"]] == [False, True, True]
    assert res["last_top1"] == res["history"][2]["top1"]
    assert res["best_top1"] == max(res["history"][1]["top1"], res["history"][2]["top1"])
    assert len(res["sessions"]) == 1 and "evaluated_only" not in res["sessions"][0]
    assert sorted(reports) == [2, 3] and res["ncm"] == reports[3]


def poison(trainer) -> None:
    with torch.no_grad():
        trainer.net.classifier.weight[0, 0] = float("inf")


def test_weights_made_non_finite_by_an_epochs_last_step_are_never_saved(data_root, tmp_path, monkeypatch, capsys):
    """The epoch's last step returns a finite loss but leaves a weight non-finite: the run stops as diverged (exit
    3) before it evaluates or saves, instead of writing those weights as last.pt."""
    out = tmp_path / "run"
    after_each_step(monkeypatch, lambda trainer, n: poison(trainer) if n == LOOP_STEPS else None)
    code, err = call_main(["--data_root", str(data_root), "--output_dir", str(out), *LOOP, "--epochs", "2",
                           "--lr_decay_epochs", "1"], capsys)
    assert code == 3 and f"non-finite loss in epoch 1, by step {LOOP_STEPS} (of {LOOP_STEPS})" in err, err
    assert "no checkpoint was written" in err
    assert not (out / "last.pt").exists() and not (out / "best.pt").exists()


def test_a_signal_after_the_weights_went_non_finite_does_not_save_them(data_root, tmp_path, monkeypatch, capsys):
    """A SIGTERM after a step that left a weight non-finite (its loss still finite): a divergence (exit 3), and no
    mid-epoch last.pt for a resume to start from."""
    out = tmp_path / "run"

    def action(trainer, n):
        if n == 2:
            poison(trainer)
            os.kill(os.getpid(), signal.SIGTERM)

    after_each_step(monkeypatch, action)
    code, err = call_main(["--data_root", str(data_root), "--output_dir", str(out), *LOOP, "--epochs", "2",
                           "--lr_decay_epochs", "1"], capsys)
    assert code == 3 and "non-finite loss in epoch 1, by step 2" in err, err
    assert not (out / "last.pt").exists()


@pytest.mark.parametrize("later", [False, True], ids=["within 2 s", "later"])
def test_a_second_signal_is_the_same_request_within_2_s_and_stops_at_once_later(later, data_root, tmp_path,
                                                                                monkeypatch, capsys):
    """Ctrl-C reaches every process of the group and torchrun relays it again: a second SIGINT within 2 s of the
    first still stops after the step with a checkpoint (exit 130). One more than 2 s later stops at once, exit 130
    (which sweep.sh reads as INTERRUPTED), no checkpoint, the run's handlers gone, saying what is on disk and how
    to go on. The first signal is said as it arrives, with what the run does now."""
    out = tmp_path / "run"

    def action(trainer, n):
        if n == 3:
            os.kill(os.getpid(), signal.SIGINT)
            if later:
                signal.getsignal(signal.SIGINT).__self__.first_at -= 10.0  # the run's SignalFlag: 10 s ago
            os.kill(os.getpid(), signal.SIGINT)

    after_each_step(monkeypatch, action)
    code, err = call_main(["--data_root", str(data_root), "--output_dir", str(out), *LOOP, "--epochs", "2",
                           "--lr_decay_epochs", "1"], capsys)
    said = ("SIGINT: stopping after the current step, with a checkpoint to --resume from (a second signal, 2 s on or "
            "later, stops at once)\n")
    if later:
        assert (code, err) == (130, said + "SIGINT again: stopped at once; it saved no checkpoint: the same command "
                                           "with --overwrite starts it again\n") and not (out / "last.pt").exists()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    else:
        assert code == 130 and err.startswith(said) and "SIGINT: stopped after step 3 of epoch 1" in err, err
        assert util.load_checkpoint(out / "last.pt")["run"]["step"] == 3


def test_a_signal_in_the_last_epochs_evaluation_says_the_run_finishes_and_a_second_says_how_to_go_on(
        data_root, tmp_path, monkeypatch, capsys):
    """After its last step a run evaluates, and writes its figures, projections and results.json: a first signal
    there (or in the last step, after which nothing looks at it) lets it finish (exit 0), and says so as it arrives
    (it said nothing, and the run went on for seconds). A second one stops it at once; its last.pt holds the
    trained run, which --resume evaluates (a SIGTERM: 143). In the step before the last, it still stops."""
    import main

    out = tmp_path / "run"
    argv = ["--data_root", str(data_root), "--output_dir", str(out), *LOOP, "--epochs", "1", "--lr_decay_epochs", ""]
    finishes = ("SIGTERM: the run is in its last step or past it, and finishes first: its evaluation and "
                "results.json (a second signal, 2 s on or later, stops at once)\n")
    for at, stops in ((LOOP_STEPS, False), (LOOP_STEPS - 1, True)):
        with monkeypatch.context() as m:
            after_each_step(m, lambda trainer, n: os.kill(os.getpid(), signal.SIGTERM) if n == at else None)
            code, err = call_main([*argv, "--overwrite"], capsys)
        if stops:
            assert code == 128 + signal.SIGTERM and err.startswith("SIGTERM: stopping after the current step"), err
        else:
            assert (code, err) == (0, finishes) and (out / "results.json").is_file()
    # In the evaluation that ends the epoch before the last (state.epoch is the last one's by then): run() still
    # looks, after it, so the run stops, as said (with one step per epoch the step count said otherwise).
    real_confusion, calls = main.Trainer.confusion, []

    def signalled_confusion(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_confusion(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(main.Trainer, "confusion", signalled_confusion)
        code, err = call_main([*argv[:-4], "--batch_size", "100", "--epochs", "2", "--lr_decay_epochs", "",
                               "--overwrite"], capsys)
    assert code == 128 + signal.SIGTERM and err.startswith("SIGTERM: stopping after the current step"), err
    assert "SIGTERM: stopped after epoch 1;" in err
    real_finish = main.Run.finish

    def signalled_finish(self, evaluates_again=False):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_finish(self, evaluates_again)

    with monkeypatch.context() as m:
        m.setattr(main.Run, "finish", signalled_finish)
        code, err = call_main([*argv, "--overwrite"], capsys)
    assert (code, err) == (0, finishes) and (out / "results.json").is_file()

    def twice_signalled_finish(self, evaluates_again=False):
        os.kill(os.getpid(), signal.SIGTERM)
        signal.getsignal(signal.SIGTERM).__self__.first_at -= 10.0  # the run's SignalFlag: 10 s ago
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("not stopped at once")

    with monkeypatch.context() as m:
        m.setattr(main.Run, "finish", twice_signalled_finish)
        code, err = call_main([*argv, "--overwrite"], capsys)
    assert code == 128 + signal.SIGTERM and not (out / "results.json").exists()
    assert err.endswith(f"SIGTERM again: stopped at once; {out / 'last.pt'} holds the run as of its last checkpoint; "
                        f"the same command with --resume in place of --overwrite continues it from there\n"), err
    with monkeypatch.context() as m:  # a second signal in a resumed run: its own command goes on
        m.setattr(main.Run, "finish", twice_signalled_finish)
        code, err = call_main([*argv, "--resume"], capsys)
    assert err.endswith(f"the same command continues it from there\n") and code == 128 + signal.SIGTERM, err
    code, err = call_main([*argv, "--resume"], capsys)
    assert code == 0 and (out / "results.json").is_file(), err
    # Ctrl-C before the run's handlers are installed (writing config.json, say): Python's own, said as main() does.
    with monkeypatch.context() as m:
        m.setattr(main.Run, "start_lines", lambda self: (_ for _ in ()).throw(KeyboardInterrupt))
        assert call_main([*argv, "--overwrite"], capsys) == (130, "interrupted\n")


# (epoch, step) of the poll a signal lands just before, the counter already moved on: the step before the last's
# poll (after state.step = step + 1), polled each step or at the logging intervals as under torchrun on CUDA; and
# with one step an epoch, run()'s poll after the epoch before the last (end_epoch moved state.epoch on). None: in
# the last epoch's end_epoch(), before it moves state.epoch on.
SIGNAL_WINDOWS = {"each step": (["--epochs", "1"], False, (0, LOOP_STEPS - 1)),
                  "logging interval": (["--epochs", "1"], True, (0, 6)),  # (--print_freq 3: after 3 and 6)
                  "run's poll, one step an epoch": (["--epochs", "2", "--batch_size", "100"], False, (1, 0)),
                  "last end_epoch": (["--epochs", "1"], False, None)}


@pytest.mark.parametrize("window", SIGNAL_WINDOWS)
def test_a_signal_between_the_step_counter_and_the_poll_after_it_does_as_said(window, data_root, tmp_path,
                                                                             monkeypatch, capsys):
    """The handler runs between two bytecodes of the loop: a first signal after the step counter moved on but
    before the poll after it read the flag, in the step before the last (or in run()'s poll before a last epoch of
    one step), was said to let the run finish (polls_left counted that poll as done), and that poll stopped it
    (exit 143); in the last epoch's end_epoch, before state.epoch moved on, it was said to stop the run, which
    finished. What is said is what it does: here, it finishes, with its results.json."""
    import main

    settings, per_interval, at = SIGNAL_WINDOWS[window]
    out = tmp_path / "run"
    real_poll, real_end_epoch = main.Run.agreed_signal, main.Run.end_epoch

    def signalled_poll(self):
        if (self.state.epoch, self.state.step) == at:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_poll(self)

    def signalled_end_epoch(self):
        if at is None and self.state.epoch == self.cfg.epochs - 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_end_epoch(self)

    monkeypatch.setattr(main.Run, "agreed_signal", signalled_poll)
    monkeypatch.setattr(main.Run, "end_epoch", signalled_end_epoch)
    monkeypatch.setattr(main.Run, "polls_per_interval", lambda self: per_interval)
    code, err = call_main(["--data_root", str(data_root), "--output_dir", str(out), *LOOP, "--lr_decay_epochs", "",
                           *settings], capsys)
    assert (code, err) == (0, "SIGTERM: the run is in its last step or past it, and finishes first: its evaluation "
                              "and results.json (a second signal, 2 s on or later, stops at once)\n")
    assert (out / "results.json").is_file()


def test_a_signal_whose_verdict_fails_still_stops_the_run(data_root, tmp_path, monkeypatch, capsys):
    """Should deciding what a first signal does fail (polls_left raising), the signal stops the run, as it did
    before that verdict existed, rather than be dropped."""
    import main

    real_poll = main.Run.agreed_signal

    def signalled_poll(self):
        if (self.state.epoch, self.state.step) == (0, 3):
            os.kill(os.getpid(), signal.SIGTERM)
        return real_poll(self)

    def broken(self):
        raise RuntimeError("polls_left failed (test)")

    monkeypatch.setattr(main.Run, "agreed_signal", signalled_poll)
    monkeypatch.setattr(main.Run, "polls_left", broken)
    code, err = call_main(["--data_root", str(data_root), "--output_dir", str(tmp_path / "run"), *LOOP,
                           "--lr_decay_epochs", "", "--epochs", "2"], capsys)
    assert code == 143 and "SIGTERM: stopped after step 3 of epoch 1" in err, err


def test_results_rewritten_by_a_session_without_steps_keep_the_latest_first_step(data_root, tmp_path, monkeypatch,
                                                                                 capsys):
    """Stopped once and resumed to the end, then its results.json damaged and written again by a --resume that
    trains no step: first_step_s is the second session's (the last that took a step), not the first's."""
    out = tmp_path / "run"
    argv = ["--data_root", str(data_root), "--output_dir", str(out), *LOOP, "--epochs", "2", "--lr_decay_epochs", "1"]
    with monkeypatch.context() as m:
        after_each_step(m, lambda trainer, n: os.kill(os.getpid(), signal.SIGTERM) if n == 3 else None)
        assert call_main(argv, capsys)[0] == 128 + signal.SIGTERM
    assert call_main([*argv, "--resume"], capsys)[0] == 0
    results = out / "results.json"
    results.write_text(results.read_text()[:40])
    code, err = call_main([*argv, "--resume"], capsys)
    assert code == 0, err
    res = json.loads(results.read_text())
    first, second, evaluation = res["sessions"]
    assert evaluation.get("evaluated_only") and "first_step_s" not in evaluation
    assert first["first_step_s"] != second["first_step_s"] and res["first_step_s"] == second["first_step_s"]


@pytest.mark.parametrize("fails_at", [1, 2])
def test_a_stop_between_the_checkpoint_writes_leaves_best_pt_behind_and_the_resume_mends_it(
        data_root, tmp_path, monkeypatch, capsys, fails_at):
    """Every epoch a new best (the test accuracy made to rise): the disk fills as best.pt of epoch `fails_at` is
    written, after last.pt (the order at an epoch's end), so best.pt is missing (epoch 1) or epoch 1's (epoch 2),
    never ahead of last.pt. The resume writes it from last.pt, says so, and results.json's best is best.pt's."""
    import main

    out = tmp_path / "run"
    argv = ["--data_root", str(data_root), "--output_dir", str(out), *LOOP, "--epochs", "2", "--lr_decay_epochs", "1"]
    real_report, real_save, real_confusion = util.accuracy_report, util.save_checkpoint, main.Trainer.confusion
    written, evaluations = [], []

    def confusion(self, *args, **kwargs):
        evaluations.append(1)
        return real_confusion(self, *args, **kwargs)

    def rising(confusion, shot_groups):  # the n-th evaluation: top1 10 * n
        return {**real_report(confusion, shot_groups), "top1": 10.0 * len(evaluations)}

    def save(state, path):
        if Path(path).name == "best.pt" and state["run"]["epoch"] == fails_at:
            raise main.UserError(f"could not write checkpoint {path}: No space left on device; the previous one is "
                                 f"kept")
        real_save(state, path)
        written.append(Path(path).name)

    monkeypatch.setattr(main.Trainer, "confusion", confusion)
    with monkeypatch.context() as m:
        m.setattr(util, "accuracy_report", rising)
        m.setattr(util, "save_checkpoint", save)
        code, err = call_main(argv, capsys)
    assert code == 2 and "No space left on device" in err
    assert written == ["last.pt", "best.pt"] * (fails_at - 1) + ["last.pt"]
    last = util.load_checkpoint(out / "last.pt")["run"]
    assert (last["epoch"], last["best_epoch"]) == (fails_at, fails_at)
    assert (out / "best.pt").exists() == (fails_at == 2)
    held = "is missing" if fails_at == 1 else "holds epoch 1"
    note = (f"note: {out / 'best.pt'} {held}; the run's best is epoch {fails_at} (top-1 {10 * fails_at}.00), which "
            f"{out / 'last.pt'} holds (the run stopped between writing last.pt and best.pt): {{}} it from "
            f"{out / 'last.pt'}")
    before = snapshot(out)
    for extra, action in ((["--dry_run"], "would write"), ([], "writing")):
        with monkeypatch.context() as m:
            m.setattr(util, "accuracy_report", rising)
            code = main.main([*argv, "--resume", *extra])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        notes = [line for line in captured.out.splitlines() if "best.pt" in line and line.startswith("note:")]
        assert notes == [note.format(action)]
        if extra:
            assert snapshot(out) == before
    best = util.load_checkpoint(out / "best.pt")["run"]
    results = json.loads((out / "results.json").read_text())
    assert (best["epoch"], best["best_top1"]) == (results["best_epoch"], results["best_top1"]) == (2, 20.0)


def test_a_resume_leaves_a_best_pt_that_is_the_runs_best_as_it_is(data_root, straight_run, tmp_path, capsys):
    """A run whose results.json is lost, resumed: best.pt is already the best epoch's, so it is not written again."""
    out = tmp_path / "run"
    shutil.copytree(straight_run, out)
    (out / "results.json").unlink()
    before = (out / "best.pt").stat().st_mtime_ns, (out / "best.pt").read_bytes()
    import main

    code = main.main(["--data_root", str(data_root), "--output_dir", str(out), "--resume", *TINY])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "evaluating it" in captured.out and "note:" not in captured.out
    assert ((out / "best.pt").stat().st_mtime_ns, (out / "best.pt").read_bytes()) == before


@pytest.mark.parametrize("then, now", [(2, 1), (2, 2)])
def test_a_resume_with_another_eval_every_says_so_and_results_json_says_mixed(data_root, tmp_path, monkeypatch,
                                                                              capsys, then, now):
    """--eval_every sets the epochs the best is picked from: a run stopped after epoch 1 of 3 under --eval_every 2
    and resumed with 1 picks it from epochs 2 and 3 of two settings, which its results.json says as the config's
    "eval_every": "mixed" (scripts/summarize.py's row of its own), not the last session's value; each session
    records its own. Resumed with the same value, nothing is said and the value stays."""
    import main

    out = tmp_path / "run"
    argv = ["--data_root", str(data_root), "--output_dir", str(out), *LOOP, "--epochs", "3", "--lr_decay_epochs", "2"]
    with monkeypatch.context() as m:
        after_each_step(m, lambda trainer, n: os.kill(os.getpid(), signal.SIGTERM) if n == LOOP_STEPS else None)
        code, err = call_main([*argv, "--eval_every", str(then)], capsys)
    assert code == 128 + signal.SIGTERM, err
    code = main.main([*argv, "--eval_every", str(now), "--resume"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    notes = [line for line in captured.out.splitlines() if "eval_every" in line and line.startswith("note:")]
    results = json.loads((out / "results.json").read_text())
    assert [s["eval_every"] for s in results["sessions"]] == [then, now]
    assert [h["epoch"] for h in results["history"] if h.get("top1") is not None] == \
        [e for e in (1, 2, 3) if e >= 2 and (e % now == 0 or e == 3)]
    if then == now:
        assert notes == [] and results["config"]["eval_every"] == now
    else:
        assert notes == [f'note: this run trained with --eval_every {then} so far and goes on with --eval_every {now}: '
                         f'its results.json will say "eval_every": "mixed"']
        assert results["config"]["eval_every"] == "mixed"
    assert results["config"]["sync_bn"] is False  # (one process: never synchronised, never mixed)


def test_a_best_pt_left_ahead_by_earlier_code_is_said_and_a_dry_run_says_it_too(data_root, tmp_path, monkeypatch,
                                                                                capsys):
    """Earlier code wrote best.pt before last.pt: stopped between the two at epoch 3, a new best after a worse
    epoch 2, it left best.pt at epoch 3 and last.pt at epoch 2, whose record's best is epoch 1, whose weights are
    gone. The resume (and its dry run) says so and leaves best.pt to the run's next new best."""
    import main

    out = tmp_path / "run"
    argv = ["--data_root", str(data_root), "--output_dir", str(out), *LOOP, "--epochs", "3", "--lr_decay_epochs", "2"]
    real_report, real_save, real_confusion = util.accuracy_report, util.save_checkpoint, main.Trainer.confusion
    top1s = iter([10.0, 5.0, 30.0])
    monkeypatch.setattr(util, "accuracy_report", lambda confusion, groups: {**real_report(confusion, groups),
                                                                             "top1": next(top1s, 1.0)})

    def save(state, path):  # as the earlier code did at epoch 3: best.pt, then last.pt, which the full disk stops
        if Path(path).name == "last.pt" and state["run"]["epoch"] == 3:
            real_save(state, Path(path).with_name("best.pt"))
            raise main.UserError(f"could not write checkpoint {path}: No space left on device")
        if Path(path).name == "last.pt" or state["run"]["epoch"] != 3:
            real_save(state, path)

    with monkeypatch.context() as m:
        m.setattr(util, "save_checkpoint", save)
        code, err = call_main(argv, capsys)
    assert code == 2, err
    assert (util.load_checkpoint(out / "last.pt")["run"]["epoch"],
            util.load_checkpoint(out / "best.pt")["run"]["epoch"]) == (2, 3)
    before = (out / "best.pt").read_bytes()
    note = (f"note: {out / 'best.pt'} holds epoch 3; the run's best is epoch 1 (top-1 10.00), whose weights were not "
            f"kept (a best.pt left by earlier code, which wrote it before last.pt, stopped between the two; or "
            f"replaced): the run's next new best replaces it")
    for extra in (["--dry_run"], []):
        code = main.main([*argv, "--resume", *extra])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        assert [line for line in captured.out.splitlines() if "best.pt" in line and "note:" in line] == [note]
        assert (out / "best.pt").read_bytes() == before  # epoch 3 again, top-1 1.0: no new best
    assert json.loads((out / "results.json").read_text())["best_epoch"] == 1


def test_an_evaluation_only_resume_keeps_the_trainings_eval_every_in_results_json(data_root, tmp_path, capsys):
    """A trained run whose results.json is lost, evaluated again by a --resume without its --eval_every: the
    evaluation does not depend on it, so results.json's config keeps the training's value (summarize.py's row)."""
    import main

    out = tmp_path / "run"
    argv = ["--data_root", str(data_root), "--output_dir", str(out), *LOOP, "--epochs", "2", "--lr_decay_epochs", "1"]
    assert call_main([*argv, "--eval_every", "2"], capsys)[0] == 0
    (out / "results.json").unlink()
    code = main.main([*argv, "--resume"])
    captured = capsys.readouterr()
    assert code == 0 and "evaluating it" in captured.out and "note:" not in captured.out, captured.err
    results = json.loads((out / "results.json").read_text())
    assert [(s["eval_every"], s.get("evaluated_only", False)) for s in results["sessions"]] == [(2, False), (1, True)]
    assert results["config"]["eval_every"] == 2


def test_an_epoch_resumed_before_its_last_step_has_the_rate_of_the_steps_timed_before_the_stop(
        data_root, tmp_path, monkeypatch, capsys):
    """Stopped after step 8 of 9, resumed: the session's only step in epoch 1 is its untimed first one, and the
    epoch's rate is that of steps 2..8, timed before the stop (the checkpoint keeps when the epoch began), not
    None; epoch 2's is its own."""
    out = tmp_path / "run"
    argv = ["--data_root", str(data_root), "--output_dir", str(out), *LOOP, "--epochs", "2", "--lr_decay_epochs", "1"]
    with monkeypatch.context() as m:
        after_each_step(m, lambda trainer, n: os.kill(os.getpid(), signal.SIGTERM) if n == 8 else None)
        code, err = call_main(argv, capsys)
    assert code == 128 + signal.SIGTERM, err
    stopped = util.load_checkpoint(out / "last.pt")["run"]
    assert (stopped["epoch_start_samples"], stopped["epoch_start_time"]) == (0, 0.0)
    assert stopped["train_samples"] == 7 * LOOP_BATCH
    code, err = call_main([*argv, "--resume"], capsys)
    assert code == 0, err
    history = json.loads((out / "results.json").read_text())["history"]
    assert history[0]["samples_per_s"] == pytest.approx(7 * LOOP_BATCH / stopped["train_time"], rel=0.25)
    assert history[1]["samples_per_s"] > 0


@pytest.mark.parametrize("loss, ncm_every", [("sc", "1"), ("ce", "1"), ("sc", "0"), ("ce", "0")])
@pytest.mark.parametrize("results", ["damaged", "never written"])
def test_evaluating_a_trained_run_again_does_not_log_its_last_records_twice(data_root, tmp_path, monkeypatch,
                                                                           capsys, results, loss, ncm_every):
    """A run that trained all its epochs, whose results.json is damaged (an earlier session finished) or was never
    written (the disk filled as it was, or a second Ctrl-C came): the resume evaluates it again and writes
    results.json, but the records already at the last step (the nearest class mean's scalars, the last figures,
    HParams' end) stay one each, whatever the method (CE writes no projector) and with or without --ncm_every."""
    import main
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    argv = ["--data_root", str(data_root), "--output_dir", str(out), *LOOP, "--loss", loss, "--epochs", "2",
            "--lr_decay_epochs", "1", "--ncm_every", ncm_every]
    real_write_json = util.write_json

    def full_disk(obj, path):
        if Path(path).name == "results.json":
            raise main.UserError(f"could not write {path}: No space left on device")
        real_write_json(obj, path)

    with monkeypatch.context() as m:
        if results == "never written":
            m.setattr(util, "write_json", full_disk)
        code, err = call_main(argv, capsys)
    assert code == (0 if results == "damaged" else 2), err
    if results == "damaged":
        (out / "results.json").write_text("{")
    code, err = call_main([*argv, "--resume"], capsys)
    assert code == 0, err
    last_step = 2 * LOOP_STEPS
    scalars, images, ends = {}, {}, 0
    for events in sorted(out.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(e.step for e in acc.Scalars(tag))
        for tag in acc.Tags()["images"]:
            images.setdefault(tag, []).extend(e.step for e in acc.Images(tag))
        ends += sum(1 for tag in acc.summary_metadata if tag.endswith("session_end_info"))
    assert scalars["test/ncm_top1"] == ([LOOP_STEPS, last_step] if ncm_every == "1" else [last_step])
    assert scalars["test/top1"] == [LOOP_STEPS, last_step]
    assert images["last/confusion_matrix"] == images["last/per_class_accuracy_vs_class_size"] == [last_step]
    assert ends == 1
    assert json.loads((out / "results.json").read_text())["ncm"]["top1"] is not None


def test_evaluating_again_writes_the_records_that_a_later_writer_purged(data_root, tmp_path, monkeypatch, capsys):
    """Records at the last step that a later session's writer purged (TensorBoard hides what comes before a
    writer's start from its purge step on) are not there: here another run's, in a folder reused without
    --overwrite once its run files were deleted. The new run, stopped in its last records and evaluated again,
    writes its own, which TensorBoard then shows once."""
    import main
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    argv = ["--data_root", str(data_root), "--output_dir", str(out), *LOOP, "--epochs", "2", "--lr_decay_epochs", "1"]
    code, err = call_main([*argv, "--ncm_every", "1"], capsys)
    assert code == 0, err
    for name in main.RUN_FILES:
        (out / name).unlink()

    def second_ctrl_c(self, evaluates_again=False):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(main.Run, "finish", second_ctrl_c)
        code, err = call_main([*argv, "--seed", "1"], capsys)
    assert code == 130 and not (out / "results.json").exists(), err
    code, err = call_main([*argv, "--seed", "1", "--resume"], capsys)
    assert code == 0, err
    shown = EventAccumulator(str(out), size_guidance={"scalars": 0, "images": 0})
    shown.Reload()
    last_step = 2 * LOOP_STEPS
    assert [e.step for e in shown.Scalars("test/ncm_top1")] == [last_step]
    assert [e.step for e in shown.Images("last/confusion_matrix")] == [last_step]
