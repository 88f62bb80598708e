"""End-to-end runs of the real CLI (`python main.py`, in a subprocess) on a tiny synthetic CIFAR in the pickled
torchvision layout, and every bad input of the CLI issue (one line, non-zero exit, nothing written)."""
from __future__ import annotations

import argparse
import dataclasses
import errno
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import main
import util
from dataset_loader import ArraySplit
from helpers import (RunsCode, ascii_locale_env, call_main, make_synthetic, snapshot, write_image_folder,
                     write_pickled_cifar10, write_pickled_cifar100)

ROOT = Path(__file__).resolve().parent.parent
N_TRAIN, N_TEST = 40, 10  # per class
CPU = torch.device("cpu")
IMB_FACTOR = 0.1
# LDAM-DRW counts for n_max 40 at imbalance ratio 10: int(40 * 0.1 ** (c / 9)).
EXPECTED_COUNTS = [40, 30, 23, 18, 14, 11, 8, 6, 5, 4]
TINY = ["--model", "resnet8", "--batch_size", "16", "--epochs", "2", "--lr_decay_epochs", "1",
        "--learning_rate", "0.05", "--warm_epochs", "0", "--device", "cpu", "--imb_factor", str(IMB_FACTOR),
        "--print_freq", "3"]


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 240,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def cifar10_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar10")
    write_pickled_cifar10(root, *make_synthetic(10, N_TRAIN, N_TEST, seed=0))
    return root


@pytest.fixture(scope="module", params=["sc", "psc", "ce"])
def finished_run(request, cifar10_root, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"run_{request.param}") / "run"
    proc = run_cli("--data_root", str(cifar10_root), "--loss", request.param, "--output_dir", str(out), *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return request.param, out, proc


def test_checkpoints_open_with_weights_only(finished_run):
    """Tensors and plain Python values only (no numpy array, no torch version object): torch.load's safe default
    since torch 2.6, weights_only=True, opens them."""
    _, out, _ = finished_run
    for name in ("last.pt", "best.pt"):
        state = torch.load(out / name, map_location="cpu", weights_only=True)
        assert state["config"]["loss"] in ("sc", "psc", "ce") and "numpy" in state["rng"]


def test_the_epoch_line_shows_the_terms_its_method_has(finished_run):
    """Hybrid runs: the total, its two terms and alpha; a CE run has no feature loss and no alpha to show."""
    loss, _, proc = finished_run
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("epoch 1/2 |")]
    if loss == "ce":
        assert re.match(r"epoch 1/2 \| loss \d+\.\d{4} \| lr \d\.\d{4} \| \d+ samples/s \| top1 ", line), line
    else:
        assert re.match(r"epoch 1/2 \| loss -?\d+\.\d{4} \(feature -?\d+\.\d{4}, ce \d+\.\d{4}\) \| alpha 1\.000 \| "
                        r"lr \d\.\d{4} \| \d+ samples/s \| top1 ", line), line


def test_run_leaves_its_files(finished_run):
    _, out, _ = finished_run
    for name in ("config.json", "last.pt", "best.pt", "results.json"):
        assert (out / name).is_file(), name
    assert list(out.glob("events.out.tfevents.*")), "no TensorBoard events"
    assert not list(out.glob("*.tmp")), "a temporary checkpoint file was left behind"


def test_results_are_sane(finished_run):
    loss, out, proc = finished_run
    res = json.loads((out / "results.json").read_text())
    assert res["method"] == loss and res["dataset"] == "cifar10" and res["epochs"] == 2
    assert res["class_counts"] == EXPECTED_COUNTS
    assert res["class_names"] == [f"class_{c}" for c in range(10)]  # batches.meta's, for the reports
    # Which images trained it: the digest of the long-tailed training split, as last.pt holds it.
    assert len(res["train_digest"]) == 64 and set(res["train_digest"]) <= set("0123456789abcdef")
    assert res["train_digest"] == torch.load(out / "last.pt", weights_only=False)["train_digest"]
    assert res["imbalance_ratio"] == pytest.approx(10)
    assert len(res["history"]) == 2 and [h["epoch"] for h in res["history"]] == [1, 2]
    for key in ("best_top1", "last_top1", "many", "medium", "few"):
        assert res[key] is None or 0 <= res[key] <= 100, key
    # 40 / 30 / 23 images are 'medium' (20..100) and the rest 'few' (< 20): no many-shot class here.
    assert res["shot_groups"] == {"many": [], "medium": [0, 1, 2], "few": [3, 4, 5, 6, 7, 8, 9]}
    assert res["many"] is None and res["medium"] is not None and res["few"] is not None
    # The test set is balanced (N_TEST per class), so a group's accuracy is its classes' mean.
    assert res["medium"] == pytest.approx(np.mean(res["per_class"][:3]))
    assert res["few"] == pytest.approx(np.mean(res["per_class"][3:]))
    assert res["best_top1"] >= res["last_top1"] == res["history"][-1]["top1"] == res["last"]["top1"]
    assert res["best_epoch"] in (1, 2) and res["best"]["epoch"] == res["best_epoch"]
    assert len(res["per_class"]) == 10 and all(0 <= a <= 100 for a in res["per_class"])
    # top-1 is the mean of the per-class accuracies on the balanced test set
    assert res["last_top1"] == pytest.approx(sum(res["per_class"]) / 10)
    assert res["samples_per_s"] > 0 and res["wall_time_s"] > 0
    assert res["torch_version"] == torch.__version__ and res["device"].startswith("cpu")
    assert res["git_commit"] == main.git_commit()  # the checkout the run started from (None outside git)
    # Defaults as resolved for this run, beside the unresolved flags of the saved config.
    assert res["config"]["amp"] is None and res["amp"] == main.fast_default(torch.device("cpu"))
    saved = json.loads((out / "config.json").read_text())  # resolved there, beside the run's other settings
    assert res["config"]["channels_last"] is None and saved["channels_last"] is True
    assert res["config"]["psc_temp"] is None and res["psc_temperature"] == 1.0
    assert res["sessions"] == [{"epoch": 0, "step": 0, "amp": res["amp"], "channels_last": True, "world_size": 1,
                                "device": res["device"], "git_commit": res["git_commit"],
                                "torch_version": torch.__version__, "eval_every": 1, "sync_bn": False,
                                "compile": False, "first_step_s": res["first_step_s"]}]
    assert res["first_step_s"] > 0
    h = res["history"][0]
    assert h["alpha"] == (1.0 if loss != "ce" else 0.0)
    assert res["history"][1]["alpha"] == (0.75 if loss != "ce" else 0.0)  # 1 - (1/2)^2
    for e in res["history"]:  # the logged alpha is the one the loss used (epoch 1: the feature term alone)
        assert e["train_loss"] == pytest.approx(e["alpha"] * e["feature_loss"] + (1 - e["alpha"]) * e["ce_loss"],
                                                rel=1e-5)
    if loss == "ce":
        assert all(e["feature_loss"] == 0 for e in res["history"])
    else:
        assert all(e["feature_loss"] != 0 for e in res["history"])
    assert "done: last top1" in proc.stdout
    # The nearest class mean of the final backbone features, a classifier without the linear layer.
    ncm = res["ncm"]
    assert set(ncm) == {"top1", "many", "medium", "few", "per_class"} and len(ncm["per_class"]) == 10
    assert ncm["many"] is None and ncm["top1"] == pytest.approx(sum(ncm["per_class"]) / 10)
    assert f"nearest class mean on the backbone features (no classifier): {main.format_metrics(ncm)}" in proc.stdout
    # The first step's one-off costs are printed when measured (a run cut off later still shows them).
    [first] = [line for line in proc.stdout.splitlines() if line.startswith("first step ")]
    assert float(first.split()[2]) == pytest.approx(res["first_step_s"], abs=0.051)


def test_config_and_checkpoint_contents(finished_run):
    loss, out, proc = finished_run
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["loss"] == loss and cfg["model"] == "resnet8" and cfg["batch_size"] == 16
    assert cfg["train_size"] == sum(EXPECTED_COUNTS) and "git_commit" in cfg
    assert cfg["psc_temperature"] == 1.0  # the paper's PSC temperature on CIFAR-10
    assert (cfg["sc_sampler"], cfg["ce_sampler"]) == ("instance", "instance" if loss == "ce" else "class")
    assert '"git_commit"' in proc.stdout  # the full config is printed at the start
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    for key in ("model", "optimizer", "run", "config", "num_classes", "class_counts", "rng"):
        assert key in ckpt, key
    assert ckpt["run"]["epoch"] == 2 and ckpt["run"]["step"] == 0
    assert ("prototypes" in ckpt["model"]) == (loss == "psc")
    best = torch.load(out / "best.pt", map_location="cpu", weights_only=False)
    assert best["run"]["best_top1"] == json.loads((out / "results.json").read_text())["best_top1"]


def test_eval_only_reproduces_last_epoch(finished_run, cifar10_root):
    """The checkpoint alone says what to evaluate: no --model resnet8, --loss or imbalance flags are needed."""
    loss, out, _ = finished_run
    proc = run_cli("--eval_only", "--checkpoint", str(out / "last.pt"), "--data_root", str(cifar10_root),
                   "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    res = json.loads((out / "results.json").read_text())
    assert printed["top1"] == res["last_top1"]
    assert printed["per_class"] == res["per_class"]
    assert ("per-class top1: " + ", ".join(f"{c} class_{c}: {a:.1f}" for c, a in enumerate(res["per_class"]))
            in proc.stdout.splitlines())  # named as batches.meta names them
    # The long-tailed training set is rebuilt from the checkpoint's settings, so the nearest class mean agrees too.
    assert printed["ncm"] == res["ncm"]
    assert not any(line.startswith("note:") for line in proc.stdout.splitlines())
    # Training flags are not checked against each other: this trains nothing (120,160 lie outside 5 epochs).
    proc = run_cli("--eval_only", "--checkpoint", str(out / "last.pt"), "--data_root", str(cifar10_root),
                   "--device", "cpu", "--epochs", "5", "--lr_decay_epochs", "120,160")
    assert proc.returncode == 0 and json.loads(proc.stdout.strip().splitlines()[-1])["top1"] == res["last_top1"]


@pytest.mark.parametrize("finished_run", ["sc"], indirect=True)
def test_eval_only_on_the_other_datasets_folder_points_at_the_checkpoint(finished_run, tmp_path, capsys):
    """A CIFAR-10 checkpoint, a --data_root of CIFAR-100: the line says whose the dataset is (--dataset, which
    --eval_only takes from the checkpoint, would be no way out)."""
    _, out, _ = finished_run
    write_pickled_cifar100(tmp_path / "c100", *make_synthetic(100, 2, 1, seed=0))
    code, err = call_main(["--eval_only", "--checkpoint", str(out / "last.pt"), "--data_root", str(tmp_path / "c100"),
                           "--device", "cpu"], capsys)
    assert_one_line_error(code, err, f"it holds cifar-100-python/, cifar100's data, but {out / 'last.pt'} is "
                                     f"cifar10's; the run was trained with --data_root ")  # (which holds it)
    assert "--dataset" not in err


@pytest.mark.parametrize("finished_run", ["sc"], indirect=True)
def test_eval_only_on_other_images_of_the_same_class_sizes_says_so(finished_run, tmp_path, capsys):
    """The same class sizes, other pixels: evaluated (the test accuracy does not depend on the training images),
    with a note that the nearest class mean is built from images the checkpoint was not trained on."""
    _, out, _ = finished_run
    write_pickled_cifar10(tmp_path / "other", *make_synthetic(10, N_TRAIN, N_TEST, seed=1))
    code = main.main(["--eval_only", "--checkpoint", str(out / "last.pt"), "--data_root", str(tmp_path / "other"),
                      "--device", "cpu"])
    printed = capsys.readouterr().out
    assert code == 0
    assert printed.startswith(f"note: these training images are not those {out / 'last.pt'} was trained on (the same "
                              f"class sizes, other pixels or labels")


@pytest.mark.parametrize("finished_run", ["sc"], indirect=True)
def test_eval_only_notes_a_hidden_gpu_and_a_compile_it_does_not_read(finished_run, cifar10_root, monkeypatch, capsys):
    """As a training run does: --device auto on the CPU where CUDA_VISIBLE_DEVICES names a GPU (a typo there hides
    them all) says so; --compile, which an evaluation does not read, too. The numbers are those without them."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine where no CUDA device is seen")
    _, out, _ = finished_run
    argv = ["--eval_only", "--checkpoint", str(out / "last.pt"), "--data_root", str(cifar10_root)]
    assert main.main(argv) == 0
    plain = capsys.readouterr().out
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert main.main([*argv, "--compile"]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[:2] == [
        "note: CUDA_VISIBLE_DEVICES=0 but no CUDA device is available: evaluating on the CPU (--device cuda would "
        "stop instead)",
        "note: --eval_only runs the network as it is, without torch.compile: --compile is not read"]
    assert printed.splitlines()[2:] == plain.splitlines()


@pytest.mark.parametrize("finished_run", ["sc"], indirect=True)  # nothing checked depends on the loss
def test_finished_run_with_resume_does_nothing(finished_run, cifar10_root):
    loss, out, _ = finished_run
    before = snapshot(out)
    # The check reads the checkpoint before any data (a sweep checks each finished run in a moment: here the data
    # folder does not exist), and a finished run of another recipe is refused in one line, not taken for this one.
    proc = run_cli("--data_root", str(out / "no_data_here"), "--loss", loss, "--output_dir", str(out), "--resume",
                   *TINY)
    assert proc.returncode == 0 and "already finished 2 epochs; nothing to do" in proc.stdout, proc.stderr
    assert snapshot(out) == before
    proc = run_cli("--data_root", str(cifar10_root), "--loss", loss, "--output_dir", str(out), "--resume", *TINY,
                   "--epochs", "3")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == (f"error: checkpoint {out / 'last.pt'} was made with other settings: --epochs 2 -> 3 "
                                   "(give these flags the checkpoint's values to use it)")
    assert snapshot(out) == before


def test_compile_without_a_working_compiler_is_one_line(cifar10_root, tmp_path, monkeypatch):
    """--compile compiles in the first step; with no working C++ compiler for Inductor (CXX names none) the run
    stops there with one line naming the cause and the way out, exit 2, not PyTorch's trace (the real Inductor,
    in a process of its own: 18 s here; TORCHDYNAMO_VERBOSE=1 is the next test's)."""
    monkeypatch.setenv("CXX", str(tmp_path / "no_such_compiler"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setenv("TORCHDYNAMO_VERBOSE", "")
    proc = run_cli("--data_root", str(cifar10_root), "--output_dir", str(tmp_path / "run"), *TINY, "--compile")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.startswith("error: --compile could not compile the training step (") and \
        proc.stderr.count("\n") == 1 and "no_such_compiler" in proc.stderr, proc.stderr[-3000:]
    assert "run without --compile (and with --overwrite: this run saved nothing)" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("verbose", ["", "0", "1"])
def test_compile_failure_in_the_first_step_with_and_without_torchdynamo_verbose(cifar10_root, tmp_path, monkeypatch,
                                                                                 capsys, verbose):
    """The first step's BackendCompilerFailed (as the test above gets from the real Inductor) is one line, or with
    TORCHDYNAMO_VERBOSE=1, as that line suggests, PyTorch's own exception with its trace; in a run without
    --compile it is not the compiler's failure and is never turned into that line."""
    failed = torch._dynamo.exc.BackendCompilerFailed
    exc = failed.__new__(failed)  # its constructor's arguments differ between torch releases
    Exception.__init__(exc, "backend='inductor' raised:\nRuntimeError: Failed to find C compiler.")
    exc.inner_exception = RuntimeError("Failed to find C compiler.")

    def step(self, *args, **kwargs):
        raise exc

    monkeypatch.setattr(main.Trainer, "step", step)
    monkeypatch.setenv("TORCHDYNAMO_VERBOSE", verbose)
    argv = ["--data_root", str(cifar10_root), "--output_dir", str(tmp_path / "run"), *TINY, "--compile"]
    if verbose == "1":
        with pytest.raises(failed):
            main.main(argv)
        return
    code, err = call_main(argv, capsys)
    assert_one_line_error(code, err, "--compile could not compile the training step (RuntimeError: Failed to find "
                                     "C compiler.); run without --compile (and with --overwrite: this run saved "
                                     "nothing), or with TORCHDYNAMO_VERBOSE=1")
    with pytest.raises(failed):  # not compiling: not the compiler's failure, the trace stays
        main.main([*argv[:-1], "--overwrite"])


def test_compile_failure_names_the_compilers_own_error():
    """Before torch 2.7 Inductor's failure is a plain BackendCompilerFailed whose message starts "backend='inductor'
    raised:" with the cause on the next line: the line names the cause it holds (inner_exception)."""
    class BackendCompilerFailed(Exception):  # torch._dynamo.exc's, as torch 2.4 to 2.6 raise it
        def __init__(self, inner: Exception):
            super().__init__(f"backend='inductor' raised:\n{type(inner).__name__}: {inner}")
            self.inner_exception = inner

    text = main.compile_failure_text(BackendCompilerFailed(RuntimeError("Failed to find C compiler.\nMore.")))
    assert text.startswith("--compile could not compile the training step (RuntimeError: Failed to find C "
                           "compiler.); run without --compile")
    assert "(ValueError: x)" in main.compile_failure_text(ValueError("x\ny"))  # no inner exception: its own


def test_cifar100_psc_uses_the_paper_temperature(tmp_path):
    """--temp is SC's: PSC keeps its own (0.1 on CIFAR-100), and the run says --temp changes nothing."""
    write_pickled_cifar100(tmp_path / "data", *make_synthetic(100, 6, 2, seed=1))
    out = tmp_path / "run"
    proc = run_cli("--dataset", "cifar100", "--data_root", str(tmp_path / "data"), "--loss", "psc",
                   "--output_dir", str(out), "--model", "resnet8", "--batch_size", "32", "--epochs", "1",
                   "--lr_decay_epochs", "", "--imb_factor", "0.5", "--device", "cpu", "--temp", "0.5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("note: --loss psc does not read --temp; it changes nothing in this run; PSC's temperature is "
            "--psc_temp\n") in proc.stdout
    # --warm_epochs keeps its default, 5: longer than this 1-epoch run.
    assert "note: --warm_epochs 5 is longer than the run of 1 epoch: the lr never reaches --learning_rate 0.5\n" in \
        proc.stdout
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["psc_temperature"] == 0.1 and cfg["num_classes"] == 100
    res = json.loads((out / "results.json").read_text())
    assert len(res["per_class"]) == 100 and sum(res["class_counts"]) == cfg["train_size"]
    assert res["psc_temperature"] == 0.1


def test_help_groups_the_flags_under_their_headings():
    """Each Config field's group heads its flags in --help, once: data, method, optimisation, run (a field's group
    was dropped before its heading was made, which left four dozen untitled blocks)."""
    parser = main.get_args_parser()
    titled = [group for group in parser._action_groups if group._group_actions and group.title not in
              ("options", "optional arguments", "positional arguments")]
    assert [group.title for group in titled] == ["data", "method", "optimisation", "run"]
    for group in titled:
        assert {a.dest for a in group._group_actions} == {f.name for f in dataclasses.fields(main.Config)
                                                           if f.metadata["group"] == group.title}
    assert all(group._group_actions or group.title in ("positional arguments",) for group in parser._action_groups)
    assert re.search(r"^data:\n  --dataset ", parser.format_help(), re.M)


def test_help_lists_every_flag_with_its_default():
    text = main.get_args_parser().format_help()
    for flag in ("--dataset", "--data_root", "--download", "--imb_type", "--imb_factor", "--data_seed",
                 "--sc_sampler", "--ce_sampler", "--loss", "--model", "--feat_dim", "--temp", "--psc_temp",
                 "--psc_denominator", "--alpha_schedule", "--batch_size", "--learning_rate", "--momentum",
                 "--weight_decay", "--epochs", "--lr_decay_epochs", "--lr_decay_rate", "--warm_epochs", "--seed",
                 "--output_dir", "--resume", "--overwrite", "--eval_only", "--checkpoint", "--device", "--amp", "--channels_last", "--compile",
                 "--eval_every"):
        assert flag in text, flag
    formatter = main.DefaultsHelpFormatter("main.py")
    for action in main.get_args_parser()._actions:
        if action.dest == "help":
            continue
        said = formatter._expand_help(action)
        switch = action.nargs == 0 and action.default is False  # a store_true flag: off unless given
        # None: a default the help text itself describes, or none at all (--checkpoint)
        expected = {0} if switch else {0, 1} if action.default is None else {1}
        assert said.count("default:") in expected, (action.dest, said)
    # Shown as the flag takes it, not as Python prints it; no "None" (which no flag takes) anywhere.
    assert "(default: 120,160)" in text and "[120, 160]" not in text
    assert main.parse_config(["--lr_decay_epochs", "120,160"]) == main.parse_config([])
    assert "default: None" not in text and "default: False" not in text
    # Help text is %-formatted as argparse's own formatters do it (50%% for 50%), with or without a default shown;
    # a default is shown as it is.
    parser = argparse.ArgumentParser(formatter_class=main.DefaultsHelpFormatter)
    parser.add_argument("--a", default=0.5, help="keep 50%% of %(prog)s's batch")
    parser.add_argument("--b", default=None, help="keep 50%% of it")
    parser.add_argument("--c", default="5%", help="rate")
    text = " ".join(parser.format_help().split())
    assert "keep 50% of" in text and "'s batch (default: 0.5)" in text and "keep 50% of it --c" in text
    assert "rate (default: 5%)" in text


def test_defaults_are_the_paper_recipe():
    cfg = main.parse_config([])
    assert (cfg.dataset, cfg.loss, cfg.model, cfg.imb_factor, cfg.batch_size, cfg.learning_rate, cfg.momentum,
            cfg.weight_decay, cfg.epochs, list(cfg.lr_decay_epochs), cfg.lr_decay_rate, cfg.temp) == \
        ("cifar10", "sc", "resnet32", 0.01, 512, 0.5, 0.9, 1e-4, 200, [120, 160], 0.1, 0.1)
    assert cfg.alpha_schedule == "parabolic"  # alpha = 1 - (T / T_max)^2
    assert cfg.default_output_dir() == os.path.join("runs", "cifar10_sc_r100_s0")
    # The ratio in the name rounds halves up, as scripts/sweep.sh names its folders (1/0.4 = 2.5: r3, not round's r2)
    for factor, ratio in ((0.4, 3), (0.015, 67), (0.02, 50), (1 / 3.5, 4)):
        assert main.parse_config(["--imb_factor", str(factor)]).default_output_dir().endswith(f"_r{ratio}_s0")
    assert cfg.bn_stats == "per_branch"  # not stated in the paper: each branch's own batch statistics (README)
    assert cfg.sc_aug == "paper"  # the paper's augmentation for both branches; SupContrast's is an option
    assert main.Config() == cfg  # built in code (the benchmark, a notebook), the same values and types


@pytest.mark.parametrize("argv, expected", [
    ([], "class"), (["--loss", "psc"], "class"),  # the hybrid's classifier branch is class-balanced
    (["--loss", "ce"], "instance"),  # the CE baseline is plain cross-entropy
    (["--loss", "ce", "--ce_sampler", "class"], "class"), (["--ce_sampler", "sqrt"], "sqrt")])
def test_classifier_sampler_default_follows_the_method(argv, expected):
    assert main.parse_config(argv).ce_sampler == expected


# ----------------------------------------------------------------------------------------------- bad input


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert code != 0, err
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, err)


@pytest.fixture()
def existing_run(finished_run, tmp_path):
    """A copy of a finished sc run, to check that bad input leaves it as it was."""
    import shutil
    loss, out, _ = finished_run
    copy = tmp_path / "existing"
    shutil.copytree(out, copy)
    return copy


@pytest.mark.parametrize("finished_run", ["sc"], indirect=True)
def test_data_missing_on_resume_or_eval_names_the_runs_data_root(existing_run, cifar10_root, tmp_path, capsys):
    """--data_root is a path given again, not read from the checkpoint: where the data is not found under another
    one, the error says which the run was trained with (here it holds the data, so the hint points to it)."""
    nothing = str(tmp_path / "nothing")
    hint = f"; the run was trained with --data_root {cifar10_root}, which holds it"
    code, err = call_main(["--eval_only", "--checkpoint", str(existing_run / "best.pt"), "--data_root", nothing], capsys)
    assert_one_line_error(code, err, f"no cifar10 data in {nothing}", hint)
    (existing_run / "results.json").unlink()  # trained to the end, not yet evaluated: a resume reads the data
    before = snapshot(existing_run)
    code, err = call_main(["--data_root", nothing, "--output_dir", str(existing_run), "--resume", *TINY], capsys)
    assert_one_line_error(code, err, f"no cifar10 data in {nothing}", hint)
    assert snapshot(existing_run) == before


def test_a_folder_of_many_runs_is_named_by_its_first_three(tmp_path):
    """Run folders are those with a checkpoint, results or main.py's config.json (a run that failed before its first
    checkpoint leaves only that); another tool's folder with a config.json of its own is none."""
    for name, file, text in (("r5", "last.pt", ""), ("r1", "results.json", "{}"), ("r3", "best.pt", ""),
                             ("r2", "config.json", '{"loss": "sc", "imb_factor": 0.01, "epochs": 2}'),
                             ("r4", "config.json", '{"loss": "ce", "imb_factor": 0.1, "epochs": 200, "seed": 1}'),
                             ("hf_model", "config.json", '{"model_type": "bert"}'), ("logs", "run.log", "")):
        (tmp_path / name).mkdir()
        (tmp_path / name / file).write_text(text)
    with pytest.raises(main.UserError, match=r"holds run folders \(r1, r2, r3 and 2 more\), so it is not"):
        main.check_output_dir(main.parse_config(["--output_dir", str(tmp_path)]), tmp_path)
    main.check_output_dir(main.parse_config(["--output_dir", str(tmp_path / "r6")]), tmp_path / "r6")  # a new one
    other = tmp_path / "other"
    other.mkdir()
    shutil.move(tmp_path / "hf_model", other / "hf_model")
    main.check_output_dir(main.parse_config(["--output_dir", str(other)]), other)  # no run inside


def test_a_config_json_that_is_a_pipe_is_not_read(tmp_path):
    """A read of a FIFO would block (with the folder lock held); run_config only reads regular files."""
    os.mkfifo(tmp_path / "config.json")
    assert main.run_config(tmp_path) is None
    (tmp_path / "last.pt").write_text("")
    with pytest.raises(main.UserError, match="already holds a run; pass --resume"):
        main.check_output_dir(main.parse_config(["--output_dir", str(tmp_path)]), tmp_path)


@pytest.mark.parametrize("saved, then", [
    ({"config": {"data_root": "data/cifar10-jpeg"}}, "data/cifar10-jpeg"),
    ({"config": {"data_root": None}}, None), ({"config": {"data_root": ""}}, None),
    ({"config": {"data_root": 3}}, None),
    ({"config": "damaged"}, None), ({}, None), (None, None),  # a fresh run: None
])
def test_load_data_tells_load_cifar_the_data_root_the_run_was_trained_with(saved, then, monkeypatch):
    """Which errors name it, and how, is load_cifar's (tests/test_dataset_loader.py); a checkpoint's config that
    names no folder names nothing."""
    given = []
    monkeypatch.setattr(main.data, "load_cifar", lambda dataset, root, download, **kwargs: given.append(
        (dataset, root, download, kwargs)) or ("train", "test"))
    cfg = main.parse_config(["--data_root", "data/x"])
    assert main.load_data(cfg, saved, main.Dist(), CPU, dataset_of="run/best.pt") == ("train", "test")
    assert given == [("cifar10", "data/x", False, {"trained_with": then, "dataset_of": "run/best.pt"})]


@pytest.mark.parametrize("layout", ["--download", "pickled", "image folders", "nothing"])
def test_under_torchrun_rank_0_reads_first_then_one_process_per_other_machine_then_the_rest(layout, tmp_path,
                                                                                          monkeypatch):
    """Under torchrun, a training run or --eval_only alike, whatever the layout: rank 0 reads (downloads, decodes the
    image folders into their cache) while every other process waits at a barrier; then the first process of each
    other machine (on a --data_root of its own it downloads or decodes, on a shared one it finds rank 0's) while the
    rest wait; then every other process reads, without downloading. Two machines never download into one shared
    folder at once, and no process decides from its own disk: machines that see --data_root differently (rank 0's
    the pickled layout, another's nothing) took different collectives before, and the job hung until the timeout."""
    calls = []
    monkeypatch.setattr(main.data, "load_cifar", lambda dataset, root, download, **kw: calls.append(download) or
                        ("train", "test"))
    monkeypatch.setattr(torch.distributed, "barrier", lambda: calls.append("barrier"))
    if layout == "pickled":
        (tmp_path / "cifar-10-batches-py").mkdir()
    elif layout == "image folders":
        for split in ("train", "test"):
            (tmp_path / split / "class_0").mkdir(parents=True)
    download = layout == "--download"
    cfg = main.parse_config(["--data_root", str(tmp_path), *(["--download"] if download else [])])
    for (rank, local_rank), expected in {(0, 0): [download, "barrier", "barrier"],
                                         (1, 1): ["barrier", "barrier", False],
                                         (2, 0): ["barrier", download, "barrier"],  # another machine's first
                                         (3, 1): ["barrier", "barrier", False]}.items():
        calls.clear()
        assert main.load_data(cfg, None, main.Dist(rank=rank, world_size=4, local_rank=local_rank), CPU) == (
            "train", "test")
        assert calls == expected, (rank, local_rank)
    calls.clear()
    main.load_data(cfg, None, main.Dist(), CPU)  # one process: no turns
    assert calls == [download]
    # Under NCCL the barrier is told this process's GPU (PyTorch warns where it guesses).
    monkeypatch.setattr(torch.distributed, "barrier", lambda **kwargs: calls.append(kwargs))
    main.barrier(torch.device("cuda", 3))
    main.barrier(CPU)
    assert calls[1:] == [{"device_ids": [3]}, {}]


BAD_INPUTS = [
    (["--dataset", "cifar1000"], "invalid choice"),
    (["--model", "resnet33"], "invalid choice"),
    (["--loss", "triplet"], "invalid choice"),
    (["--sc_sampler", "balanced"], "invalid choice"),
    (["--ce_sampler", "x"], "invalid choice"),
    (["--sc_aug", "simclr"], "invalid choice"),
    (["--device", "tpu"], "invalid choice"),
    (["--batch_size", "1"], "--batch_size"),
    (["--learning_rate", "0"], "--learning_rate"),
    (["--learning_rate", "-0.1"], "--learning_rate"),
    (["--epochs", "0"], "--epochs"),
    (["--epochs", "100", "--lr_decay_epochs", "120,160"],  # the flag as given, the epochs at fault, the ways out
     "--lr_decay_epochs 120,160: epochs 120, 160 are outside the run of 100 epochs (each must be in 1..99, or "
     "--lr_decay_epochs '' for no decay)"),
    (["--epochs", "100", "--lr_decay_epochs", "50,120"], "--lr_decay_epochs 50,120: epoch 120 is outside the run"),
    (["--epochs", "20"], "outside the run of 20 epochs (each must be in 1..19, or --lr_decay_epochs '' for no decay); "
                         "the paper's decays, after 60 % and 80 % of its run, are --lr_decay_epochs 12,16 here"),
    (["--epochs", "1", "--lr_decay_epochs", "300"], "(a 1-epoch run has no decay: pass '')"),
    (["--output_dir", ""], "--output_dir is empty"),
    (["--lr_decay_epochs", "160,120"], "strictly increasing (got 160,120)"),
    (["--lr_decay_epochs", "a,b"], "comma-separated"),
    (["--imb_factor", "0"], "--imb_factor"),
    (["--imb_factor", "1.5"], "--imb_factor"),
    (["--imb_factor", "100"], "got 100.0 (imbalance ratio 100 is --imb_factor 0.01)"),  # a ratio for the factor
    (["--imb_factor", "1e-310"], "--imb_factor 1e-310 is too small: its imbalance ratio 1 / imb_factor is not"),
    (["--gray_prob", "1.5"], "--gray_prob must be in [0, 1]"),
    (["--gray_prob", "-0.1"], "--gray_prob must be in [0, 1]"),
    (["--temp", "0"], "--temp"),
    (["--base_temp", "0"], "--base_temp must be positive"),
    (["--warm_epochs", "nan"], "finite"),
    (["--weight_decay", "inf"], "finite"),
    (["--momentum", "-0.9"], "--momentum"),
    (["--momentum", "1"], "--momentum must be below 1"),
    # Past float32's range SGD cannot scale the parameters by them (a traceback at the first step, once).
    (["--learning_rate", "1e39"], "--learning_rate must be at most 3.403e+38, float32's largest number"),
    (["--weight_decay", "1e300"], "--weight_decay must be at most 3.403e+38"),
    # Paths the file system cannot look up (Path.exists raised on them): one line, before anything is written.
    (["--output_dir", "o" * 300], f"--output_dir {'o' * 300}: File name too long"),
    (["--output_dir", "missing/" + "o" * 300], "File name too long"),  # the kernel says "no such folder" first
    (["--data_root", "d" * 300 + "/cifar"], "--data_root " + "d" * 300 + "/cifar: File name too long"),
    (["--eval_only", "--checkpoint", "c" * 300 + ".pt"], "--checkpoint " + "c" * 300 + ".pt: File name too long"),
    (["--lr_decay_rate", "2"], "--lr_decay_rate"),
    (["--lr_decay_epochs", "120,120"], "strictly increasing"),
    (["--data_seed", "-1"], "--data_seed"),
    (["--seed", str(2**64)], "--seed"),
    (["--seed", str(2**32)], "--seed must be in 0 .. 2**32 - 1"),  # numpy's limit
    (["--feat_dim", "0"], "--feat_dim"),
    (["--feat_dim", str(main.MAX_FEAT_DIM + 1)], "--feat_dim must be at most"),
    # (10**400 epochs failed in the TensorBoard hparams, a float, after an --overwrite had removed the old run)
    (["--epochs", str(main.MAX_EPOCHS + 1)], f"--epochs must be at most {main.MAX_EPOCHS}"),
    (["--epochs", "1" + "0" * 400], "--epochs must be at most"),
    (["--ncm_every", "-1"], "--ncm_every must not be negative"),
    (["--compile_mode", "reduce-overhead"], "--compile_mode reduce-overhead needs --compile"),
    (["--compile", "--compile_mode", "fast"], "invalid choice"),
    (["--batch_size", "x"], "invalid int"),
    (["--sync_bn", "--device", "cpu"], "--sync_bn needs CUDA"),
    (["--eval_only"], "--checkpoint"),
    (["--checkpoint", "best.pt"], "--checkpoint is read by --eval_only only"),  # not silently a fresh run
    (["--eval_only", "--checkpoint", "best.pt", "--resume"], "drop --resume"),
    (["--eval_only", "--checkpoint", "best.pt", "--overwrite"], "drop --overwrite"),
    (["--resume", "--overwrite"], "contradict"),
    (["--dry_run", "--eval_only", "--checkpoint", "best.pt"], "--dry_run checks a training run"),
    # just outside a range: each would fail later (a division by zero after epoch 1, NaN losses, an lr of 0)
    (["--eval_every", "0"], "--eval_every must be at least 1"),
    (["--print_freq", "0"], "--print_freq must be at least 1"),
    (["--loss", "psc", "--psc_temp", "0"], "--psc_temp must be positive"),
    (["--psc_temp", "-1"], "--psc_temp must be positive"),
    # rounds to 0 in float32, or its reciprocal overflows: the loss's logits would be inf and the run "diverge"
    (["--temp", "1e-300"], "--temp must be at least 2.939e-39 (1 / float32's largest number): the loss divides by it "
                           "in float32 (got 1e-300)"),
    (["--loss", "psc", "--psc_temp", "1e-45"], "--psc_temp must be at least 2.939e-39"),
    (["--weight_decay", "-0.0001"], "--weight_decay must not be negative"),
    (["--warm_epochs", "-1"], "--warm_epochs must not be negative"),
    (["--lr_decay_rate", "0"], "--lr_decay_rate must be in (0, 1]"),
    (["--epochs", "2", "--lr_decay_epochs", "2"], "--lr_decay_epochs 2: epoch 2 is outside the run of 2 epochs"),
]


@pytest.mark.parametrize("argv,needle", BAD_INPUTS, ids=[" ".join(a)[:60] for a, _ in BAD_INPUTS])
def test_bad_flags(argv, needle, tmp_path, capsys, cifar10_root):
    out = tmp_path / "out"
    code, err = call_main(["--data_root", str(cifar10_root), "--output_dir", str(out), *argv], capsys)
    assert_one_line_error(code, err, needle)
    assert not out.exists()


@pytest.mark.parametrize("argv", [["--imb_factor", "1"], ["--lr_decay_rate", "1"],
                                  ["--epochs", "2", "--lr_decay_epochs", "1"], ["--momentum", "0"],
                                  ["--warm_epochs", "0", "--weight_decay", "0"]])
def test_values_at_the_closed_end_of_a_flags_range_are_taken(argv):
    """imb_factor 1 (a balanced set), lr_decay_rate 1 (no decay), a decay after epoch 1 of 2, no momentum, no
    warm-up or weight decay."""
    main.parse_config(argv)  # no UserError


# Every training setting with a value other than its default (and the loss that reads it): a resume under any of
# them would continue another recipe. Written out, not read from main.COMPARED_ON_RESUME, so that a setting dropped
# from that tuple fails here.
RECIPE_CHANGES = {
    "dataset": ("sc", "cifar100"), "imb_type": ("sc", "step"), "imb_factor": ("sc", "0.02"),
    "data_seed": ("sc", "1"), "sc_sampler": ("sc", "class"), "ce_sampler": ("sc", "sqrt"),
    "gray_prob": ("sc", "0.0"), "sc_aug": ("sc", "supcon"), "loss": ("sc", "psc"), "model": ("sc", "resnet8"),
    "feat_dim": ("sc", "64"), "temp": ("sc", "0.2"), "base_temp": ("sc", "0.07"), "psc_temp": ("psc", "0.5"),
    "psc_denominator": ("psc", "all"), "bn_stats": ("sc", "joint"), "alpha_schedule": ("sc", "linear"),
    "batch_size": ("sc", "256"), "learning_rate": ("sc", "0.1"), "momentum": ("sc", "0.8"),
    "weight_decay": ("sc", "0.0005"), "epochs": ("sc", "300"), "lr_decay_epochs": ("sc", "100,150"),
    "lr_decay_rate": ("sc", "0.2"), "warm_epochs": ("sc", "1.0"), "seed": ("sc", "1"),
}
# How and where a run runs, not what it trains.
RUN_OPTIONS = {"data_root", "download", "output_dir", "resume", "overwrite", "eval_only", "checkpoint", "dry_run",
               "device", "amp", "channels_last", "compile", "compile_mode", "deterministic", "sync_bn", "eval_every",
               "ncm_every", "print_freq"}


def test_every_setting_is_either_the_recipe_or_how_a_run_runs():
    """A new flag must be put on one side: a recipe setting that --resume does not compare lets a run continue
    silently under another recipe."""
    assert {f.name for f in dataclasses.fields(main.Config)} == set(RECIPE_CHANGES) | RUN_OPTIONS
    assert not set(RECIPE_CHANGES) & RUN_OPTIONS


@pytest.mark.parametrize("name", sorted(RECIPE_CHANGES))
def test_a_resume_under_any_other_recipe_setting_is_refused_naming_it(name):
    """Some of these would be refused later anyway (another split's data digest, another head's shapes), with a
    worse message; --seed, --momentum, --warm_epochs, --lr_decay_rate or --sc_sampler would not be."""
    loss, value = RECIPE_CHANGES[name]
    saved = {"num_classes": 10, "config": dataclasses.asdict(main.parse_config(["--loss", loss]))}
    now = main.parse_config(["--loss", loss, f"--{name}", value])
    with pytest.raises(main.UserError, match=rf"other settings: (.*, )?--{name} "):
        main.check_compatible(saved, now, Path("last.pt"), main.data.DATASETS[now.dataset])
    main.check_compatible(saved, main.parse_config(["--loss", loss]), Path("last.pt"), 10)  # the same recipe resumes


@pytest.mark.parametrize("dry_run", [True, False])
def test_an_output_dir_under_a_file_is_refused_by_a_dry_run_too(dry_run, tmp_path, capsys, cifar10_root):
    """A dry run makes no folder, but it must say what the run would meet (it checks the output folder)."""
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "sub" / "run"
    code, err = call_main(["--data_root", str(cifar10_root), "--output_dir", str(out), *TINY,
                           *(["--dry_run"] if dry_run else [])], capsys)
    assert_one_line_error(code, err, f"cannot prepare output folder {out}: {tmp_path / 'file'} is not a folder")
    assert (tmp_path / "file").read_text() == "x"


def returns_before_a_writer(fifo: Path, call, seconds: float = 60):
    """call()'s value, or a failure where it waits on `fifo` (an open or read of a named pipe waits for a writer):
    after `seconds`, a writer is let in so that the waiting thread ends."""
    import threading

    result = {}
    thread = threading.Thread(target=lambda: result.update(value=call()), daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(10)
        pytest.fail(f"waited on the named pipe {fifo}")
    return result.get("value")


@pytest.mark.parametrize("dry_run", [True, False])
def test_an_output_dir_that_is_a_named_pipe_is_one_line(dry_run, tmp_path, capsys, cifar10_root):
    """The folder lock opened it before the folder was checked, and an open of a pipe waits for a writer: the
    run hung, a dry run too, where a file gets one line."""
    os.mkfifo(tmp_path / "fifo")
    argv = ["--data_root", str(cifar10_root), "--output_dir", str(tmp_path / "fifo"), *TINY,
            *(["--dry_run"] if dry_run else [])]
    code, err = returns_before_a_writer(tmp_path / "fifo", lambda: call_main(argv, capsys))
    assert_one_line_error(code, err, f"--output_dir {tmp_path / 'fifo'} exists and is not a folder")


@pytest.mark.parametrize("finished_run", ["sc"], indirect=True)
def test_named_pipes_among_a_runs_tensorboard_files(existing_run, capsys, cifar10_root):
    """An event file that is a pipe holds no records (tags_logged_at opened it and waited for a writer); where
    projector_config.pbtxt is one, the run ends without its projections and says so (TensorBoard's write of it
    waited, after all the training)."""
    logged = main.tags_logged_at(existing_run, 0)
    pipe = existing_run / f"{main.EVENTS_PREFIX}0.pipe"
    os.mkfifo(pipe)
    assert returns_before_a_writer(pipe, lambda: main.tags_logged_at(existing_run, 0)) == logged
    pipe.unlink()
    (existing_run / main.PROJECTOR_CONFIG).unlink()
    os.mkfifo(existing_run / main.PROJECTOR_CONFIG)
    (existing_run / "results.json").unlink()  # evaluated again at the end, which writes the projections
    argv = ["--data_root", str(cifar10_root), "--output_dir", str(existing_run), "--resume", *TINY]
    import threading
    import time

    fifo = existing_run / main.PROJECTOR_CONFIG  # main.main here (signal handlers need the main thread)

    def reader_comes():  # ends a write's wait on the pipe, so that the test fails rather than hangs
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        time.sleep(5)
        os.close(reader)

    watchdog = threading.Timer(60, reader_comes)
    watchdog.start()
    try:
        code = main.main(argv)
    finally:
        watchdog.cancel()
    out = capsys.readouterr().out
    assert code == 0 and (existing_run / "results.json").is_file()
    assert (f"note: {existing_run / main.PROJECTOR_CONFIG} is not a file (a folder, a pipe or a broken link): the "
            f"test projections for TensorBoard's projector are not written\n") in out


@pytest.mark.parametrize("finished_run", ["sc"], indirect=True)
def test_overwrite_of_a_run_with_a_folder_among_its_files_removes_nothing(existing_run, capsys, cifar10_root):
    """Its files were unlinked one by one, and the folder's unlink failed halfway: the checkpoints and results gone,
    no run started, and an error naming no file ("Is a directory"). Now refused before anything is removed."""
    (existing_run / main.PROJECTOR_CONFIG).unlink()
    (existing_run / main.PROJECTOR_CONFIG).mkdir()
    before = snapshot(existing_run)
    code, err = call_main(["--data_root", str(cifar10_root), "--output_dir", str(existing_run), "--overwrite", *TINY],
                          capsys)
    assert_one_line_error(code, err, f"cannot overwrite the run in {existing_run}: {main.PROJECTOR_CONFIG} is a "
                                     f"folder, not the file a run leaves there; move it away")
    assert snapshot(existing_run) == before


def test_an_earlier_session_beside_a_config_that_is_a_named_pipe(tmp_path):
    """A checkpoint from before RunState.sessions takes the number of processes from the config.json beside it:
    one that is a pipe is unknown (None), not a read that waits for a writer."""
    os.mkfifo(tmp_path / "config.json")
    run = argparse.Namespace(out=tmp_path)
    entry = returns_before_a_writer(tmp_path / "config.json",
                                    lambda: main.Run.earlier_session(run, {"amp": False, "channels_last": True}))
    assert entry["world_size"] is None and entry["amp"] is False and entry["channels_last"] is True
    (tmp_path / "config.json").unlink()
    util.write_json(dataclasses.asdict(main.parse_config([])) | {"world_size": 2}, tmp_path / "config.json")
    assert main.Run.earlier_session(run, {})["world_size"] == 2


def test_an_output_dir_through_a_broken_link_is_refused_by_a_dry_run_too(tmp_path, capsys, cifar10_root):
    """runs/ a link to an unmounted disk: the dry run passed, and the run failed with "File exists"."""
    os.symlink(tmp_path / "unmounted", tmp_path / "runs")
    for out in (tmp_path / "runs" / "run", tmp_path / "runs"):
        code, err = call_main(["--data_root", str(cifar10_root), "--output_dir", str(out), *TINY, "--dry_run"], capsys)
        assert_one_line_error(code, err, f"cannot prepare output folder {out}: {tmp_path / 'runs'} is a broken "
                                         f"symbolic link")


def test_resume_of_a_missing_folder_says_no_checkpoint_whatever_its_parent(tmp_path, capsys, cifar10_root,
                                                                           monkeypatch):
    """A resume makes no folder: a mistyped one is "no checkpoint", not where a new folder could not be made; a
    last.pt that is not a file (a folder, a named pipe) is said so (not "pass --resume", which it was given, and
    not "no checkpoint", which the user can see there), and nothing waits on the pipe."""
    real_access = os.access
    monkeypatch.setattr(main.os, "access", lambda path, mode, **kw: False if Path(path) == tmp_path else
                        real_access(path, mode, **kw))
    typo = tmp_path / "typo"
    code, err = call_main(["--data_root", str(cifar10_root), "--output_dir", str(typo), *TINY, "--resume"], capsys)
    assert_one_line_error(code, err, f"--resume: no checkpoint {typo / 'last.pt'} to resume from")
    code, err = call_main(["--data_root", str(cifar10_root), "--output_dir", str(typo), *TINY], capsys)
    assert_one_line_error(code, err, f"cannot prepare output folder {typo}: no permission to create folders in "
                                     f"{tmp_path}")
    monkeypatch.undo()
    (tmp_path / "run" / "last.pt").mkdir(parents=True)
    (tmp_path / "run" / "config.json").write_text("{}")
    argv = ["--data_root", str(cifar10_root), "--output_dir", str(tmp_path / "run"), *TINY, "--resume"]
    code, err = call_main(argv, capsys)
    not_a_file = f"--resume: {tmp_path / 'run' / 'last.pt'} is not a file (a folder or a pipe, say), so not a "
    assert_one_line_error(code, err, not_a_file)
    (tmp_path / "run" / "last.pt").rmdir()
    os.mkfifo(tmp_path / "run" / "last.pt")
    code, err = returns_before_a_writer(tmp_path / "run" / "last.pt", lambda: call_main(argv, capsys))
    assert_one_line_error(code, err, not_a_file)


def test_a_divergence_is_said_also_when_tensorboard_cannot_record_it(tmp_path, capsys, cifar10_root, monkeypatch):
    """The HParams failure record is written as the run stops; a writer that fails then must not replace the
    divergence (exit 3, lower the lr) with its own error (exit 2, --resume), which would only diverge again."""
    def broken(self, when):
        if when == "failed":
            raise main.UserError("could not write TensorBoard events in x: No space left on device")

    monkeypatch.setattr(main.Run, "write_hparams", broken)
    argv = ["--data_root", str(cifar10_root), "--output_dir", str(tmp_path / "run"), *TINY]
    argv[argv.index("--learning_rate") + 1], argv[argv.index("--warm_epochs") + 1] = "1e30", "0"
    code, err = call_main(argv, capsys)
    assert code == 3 and err.count("\n") == 1 and "non-finite loss in epoch 1" in err, err


def test_an_imb_factor_too_small_for_a_ratio_is_one_line_also_without_output_dir(tmp_path, capsys, cifar10_root,
                                                                                  monkeypatch):
    """The default run folder is named by the ratio (runs/..._r<ratio>_s0): 1 / 1e-310 overflowed there."""
    monkeypatch.chdir(tmp_path)
    code, err = call_main(["--data_root", str(cifar10_root), "--imb_factor", "1e-310", "--dry_run"], capsys)
    assert_one_line_error(code, err, "--imb_factor 1e-310 is too small")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu(tmp_path, capsys, cifar10_root):
    code, err = call_main(["--data_root", str(cifar10_root), "--device", "cuda",
                           "--output_dir", str(tmp_path / "o")], capsys)
    assert_one_line_error(code, err, "no CUDA device")
    assert not (tmp_path / "o").exists()


def test_more_processes_than_gpus_is_one_line(tmp_path, capsys, cifar10_root, monkeypatch):
    """torchrun --nproc_per_node 2 on a one-GPU machine: each rank says why, before NCCL would fail obscurely.
    A launcher that gives each process its own GPU (srun --gpus-per-task=1: one visible GPU, LOCAL_RANK 0..N-1,
    no LOCAL_WORLD_SIZE) still works, and so does a single process with a stray LOCAL_RANK."""
    set_device = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", set_device.append)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: set_device[-1])
    for name, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1"), ("LOCAL_WORLD_SIZE", "2")):
        monkeypatch.setenv(name, value)
    code, err = call_main(["--data_root", str(cifar10_root), "--output_dir", str(tmp_path / "o")], capsys)
    assert_one_line_error(code, err, "2 processes on this machine (torchrun --nproc_per_node) but 1 visible GPU(s)")
    assert set_device == [] and not (tmp_path / "o").exists()
    assert main.resolve_device("auto", local_rank=1) == torch.device("cuda", 0)  # one GPU per process
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.delenv("RANK")
    dist, device = main.setup_distributed(main.Config())
    assert not dist.enabled and device == torch.device("cuda", 0)
    assert set_device == [0, 0]


@pytest.mark.parametrize("env, needle", [
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 in the environment, but no MASTER_ADDR and MASTER_PORT"),
    ({"RANK": "abc"}, "RANK='abc' in the environment is not an integer"),
    ({"LOCAL_RANK": ""}, "LOCAL_RANK='' in the environment is not an integer"),
    # init_process_group would wait for 2 processes that never come (rank 5 is not one of them)
    ({"WORLD_SIZE": "2", "RANK": "5", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533"},
     "RANK=5, LOCAL_RANK=0 and WORLD_SIZE=2 in the environment do not describe a process of a job"),
    ({"RANK": "1"}, "RANK=1, LOCAL_RANK=0 and WORLD_SIZE=1"),  # rank 1 of 1 would write nothing
])
def test_stray_torchrun_environment_is_one_line(env, needle, tmp_path, capsys, cifar10_root, monkeypatch):
    """torchrun's variables left in a shell (or set by hand) without torchrun: one line, not torch's traceback
    or a wait for processes that never come."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "o"
    code, err = call_main(["--data_root", str(cifar10_root), "--output_dir", str(out), "--device", "cpu"], capsys)
    assert_one_line_error(code, err, needle)
    assert not out.exists()


def test_a_process_of_a_job_names_its_rank_in_an_error_before_it_joins_the_others(tmp_path, capsys, cifar10_root,
                                                                                   monkeypatch):
    """A bad flag stops each of torchrun's processes before they meet: each line says which process it is."""
    for name, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1"), ("MASTER_ADDR", "127.0.0.1"),
                        ("MASTER_PORT", "29534")):
        monkeypatch.setenv(name, value)
    out = tmp_path / "o"
    code, err = call_main(["--data_root", str(cifar10_root), "--output_dir", str(out), "--epochs", "0"], capsys)
    assert code == 2 and err.strip() == "rank 1: error: --epochs must be positive (got 0)"
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: no rank named
    monkeypatch.setenv("RANK", "0")
    code, err = call_main(["--data_root", str(cifar10_root), "--output_dir", str(out), "--epochs", "0"], capsys)
    assert code == 2 and err.strip() == "error: --epochs must be positive (got 0)"
    assert not out.exists()


@pytest.mark.parametrize("flags, message", [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--epochs", "x"], "argument --epochs: invalid int value: 'x'"),
    (["--loss", "nope"], "argument --loss: invalid choice: 'nope'"),
])
def test_a_process_of_a_job_names_its_rank_in_a_usage_error_too(flags, message, tmp_path, capsys, cifar10_root,
                                                                monkeypatch):
    """argparse's own errors (an unknown flag, a value of the wrong type or not among the choices) stop each of
    torchrun's processes before they meet as well: each line names its process, as validate()'s errors do (the README:
    'each with its own `rank N: error: ...` line'), and only under torchrun."""
    for name, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1"), ("MASTER_ADDR", "127.0.0.1"),
                        ("MASTER_PORT", "29534")):
        monkeypatch.setenv(name, value)
    out = tmp_path / "o"
    code, err = call_main(["--data_root", str(cifar10_root), "--output_dir", str(out), *flags], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"rank 1: error: {message}") and err.strip().endswith("(see --help)"), err
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: no rank named
    monkeypatch.setenv("RANK", "0")
    code, err = call_main(["--data_root", str(cifar10_root), "--output_dir", str(out), *flags], capsys)
    assert code == 2 and err.startswith(f"error: {message}"), err
    assert not out.exists()


def test_a_usage_error_naming_an_argument_with_a_line_break_is_one_line(tmp_path, capsys):
    """argparse quotes an unrecognized argument as given: a line break or a terminal escape in it is shown as an
    escape, as in every other error (OneLineParser: usage errors as one line)."""
    code, err = call_main([f"--bo\ngus", "a\x1b[2Jb"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err == "error: unrecognized arguments: --bo\\ngus a\\x1b[2Jb (see --help)\n", err


@pytest.mark.parametrize("world_size", ["abc", "", "2.0"])
def test_a_world_size_that_is_not_an_integer_is_one_line_from_the_real_entry_point(world_size, tmp_path,
                                                                                    cifar10_root):
    """The process's exit (exit_process, which looks at WORLD_SIZE again after main() has returned) must not turn
    main()'s one line into a traceback."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env["WORLD_SIZE"] = world_size
    out = tmp_path / "o"
    proc = subprocess.run([sys.executable, str(ROOT / "main.py"), "--data_root", str(cifar10_root), "--output_dir",
                           str(out), "--device", "cpu", "--dry_run"], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=240)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (f"error: WORLD_SIZE={world_size!r} in the environment is not an integer "
                                   f"(torchrun sets it); unset it to run one process")
    assert not out.exists()


def test_a_global_batch_the_processes_cannot_share_is_refused_but_not_for_an_evaluation(monkeypatch):
    """--batch_size is the global batch, split evenly over the processes; --eval_only reads none (its default 512
    refused evaluation on 3, 5, 6, 7 processes)."""
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "3"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    for name in ("LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(main.UserError, match=r"--batch_size 16 \(the global batch\) is not divisible by the 3 "
                                             r"processes$"):
        main.setup_distributed(main.parse_config(["--batch_size", "16", "--device", "cpu"]))
    # an evaluation goes on to the next check (no MASTER_ADDR here), past the batch size
    with pytest.raises(main.UserError, match="but no MASTER_ADDR and MASTER_PORT"):
        main.setup_distributed(main.parse_config(["--eval_only", "--checkpoint", "c.pt", "--device", "cpu"]))


@pytest.mark.parametrize("rank, error", [("0", "DistStoreError: Timed out after"),  # the others never come
                                         ("1", "DistNetworkError: ")])  # nobody listens at MASTER_ADDR:MASTER_PORT
def test_a_process_whose_job_never_meets_says_it_waits_then_stops(rank, error, tmp_path, capsys, cifar10_root,
                                                                  monkeypatch):
    """WORLD_SIZE=2 set by hand and one process started: it says that it waits (after JOIN_NOTICE_S), and where
    the process group's timeout (30 minutes; 2 s here) runs out, one line instead of torch's traceback."""
    import datetime
    import functools
    import socket

    with socket.socket() as probe:  # a port nobody listens at
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    for name in ("LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {"WORLD_SIZE": "2", "RANK": rank, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(main, "JOIN_NOTICE_S", 0.2)
    monkeypatch.setattr(torch.distributed, "init_process_group", functools.partial(
        torch.distributed.init_process_group, timeout=datetime.timedelta(seconds=2)))
    out = tmp_path / "o"
    code, err = call_main(["--data_root", str(cifar10_root), "--output_dir", str(out), "--device", "cpu"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and "Traceback" not in err and len(lines) == 2, err
    assert lines[0] == (f"rank {rank}: waiting for the job's other processes (2 in all) at 127.0.0.1:{port}; each "
                        f"must be started (torchrun starts them), or stop this one with Ctrl-C")
    assert lines[1].startswith(f"error: rank {rank} of 2 did not meet the job's other processes at "
                               f"127.0.0.1:{port}: {error}"), err
    assert not out.exists()


def test_while_joining_ctrl_c_ends_the_process_and_a_joined_one_says_nothing_more(monkeypatch, capsys):
    """init_process_group waits in C++, where Python's SIGINT handler would run only at its timeout: while it
    waits, SIGINT has its default action (the process ends at once); after it, Python's handler is back. Once
    joined, the waiting notice never comes."""
    import signal
    import time

    seen = []

    def joined_at_once(backend, rank, world_size):
        seen.append(signal.getsignal(signal.SIGINT))

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29533")
    monkeypatch.setattr(main, "JOIN_NOTICE_S", 0.2)
    monkeypatch.setattr(torch.distributed, "init_process_group", joined_at_once)
    monkeypatch.setattr(torch.distributed, "barrier", lambda: seen.append(("barrier", signal.getsignal(signal.SIGINT))))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    main.join_process_group("gloo", main.Dist(0, 2, 0))
    time.sleep(0.5)
    assert seen == [signal.SIG_DFL, ("barrier", signal.SIG_DFL)]  # (the barrier is part of the meeting)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert capsys.readouterr() == ("", "")
    # Where SIGINT is ignored ('&' in a script), it stays ignored.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        main.join_process_group("gloo", main.Dist(0, 2, 0))
        assert seen[2] is signal.SIG_IGN and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.mark.parametrize("fails_in", ["init_process_group", "barrier"])
def test_joining_waits_until_every_process_has_joined_and_a_peer_gone_meanwhile_is_one_line(fails_in, monkeypatch):
    """Gloo connects each pair of processes in a handshake that one side can finish first: a process ending at once
    after that (a resume of a finished run) cut off a peer still connecting, which failed with a traceback
    ("Gloo connectFullMesh failed ... Connection closed by peer"). With gloo, a barrier follows the join (NCCL's
    join makes no connection to cut); a peer that ends while they meet is one line, another error is not hidden."""
    calls = []
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29533")
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, **kw: calls.append(backend))
    monkeypatch.setattr(torch.distributed, "barrier", lambda: calls.append("barrier"))
    main.join_process_group("gloo", main.Dist(1, 2, 1))
    main.join_process_group("nccl", main.Dist(1, 2, 1))
    assert calls == ["gloo", "barrier", "nccl"]

    def peer_gone(*args, **kwargs):
        raise RuntimeError("Gloo connectFullMesh failed with [/__w/pytorch/pytorch/third_party/gloo/gloo/transport/"
                           "tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:23779. This is typically caused by "
                           "a remote worker crashing. Check the logs of the remote worker before reporting an error.")

    monkeypatch.setattr(torch.distributed, fails_in, peer_gone)
    with pytest.raises(main.UserError) as caught:
        main.join_process_group("gloo", main.Dist(1, 2, 1))
    assert str(caught.value) == ("rank 1 of 2: another process of this job ended while they were meeting (its "
                                 "message says why), so this one stops too (RuntimeError: Gloo connectFullMesh "
                                 "failed with Connection closed by peer [127.0.0.1]:23779)")
    monkeypatch.setattr(torch.distributed, fails_in, lambda *a, **k: (_ for _ in ()).throw(RuntimeError("other")))
    with pytest.raises(RuntimeError, match="^other$"):
        main.join_process_group("gloo", main.Dist(1, 2, 1))


def test_data_root_without_data(tmp_path, capsys):
    code, err = call_main(["--data_root", str(tmp_path / "nothing"), "--output_dir", str(tmp_path / "o")], capsys)
    assert_one_line_error(code, err, "cifar-10-batches-py", "--download")
    assert not (tmp_path / "o").exists()
    # A path given with a line break or a terminal escape in it: still one line, the characters shown as escapes.
    code, err = call_main(["--data_root", str(tmp_path / "a\nb\x1b[2J  c"), "--output_dir", str(tmp_path / "o")],
                          capsys)
    assert_one_line_error(code, err, f"no cifar10 data in {tmp_path}/a\\nb\\x1b[2J  c: looked for")


def test_batch_larger_than_the_training_set(tmp_path, capsys, cifar10_root):
    code, err = call_main(["--data_root", str(cifar10_root), "--batch_size", "4096", "--device", "cpu", "--imb_factor", "0.1",
                           "--output_dir", str(tmp_path / "o")], capsys)
    assert_one_line_error(code, err, "4096")
    assert not (tmp_path / "o").exists()


def test_existing_run_is_not_overwritten(finished_run, existing_run, capsys, cifar10_root):
    """The same command again: --resume or --overwrite; another method's run there: its own --output_dir."""
    loss = finished_run[0]
    before = snapshot(existing_run)
    argv = ["--data_root", str(cifar10_root), "--output_dir", str(existing_run), *TINY]
    code, err = call_main([*argv, "--loss", loss], capsys)
    assert_one_line_error(code, err, "already holds a run", "--resume", "--overwrite")
    other = "psc" if loss == "sc" else "sc"
    code, err = call_main([*argv, "--loss", other], capsys)
    assert_one_line_error(code, err, "already holds another run, made with other settings (", f"--loss {loss} -> {other}",
                          "give this run its own --output_dir, or --overwrite to replace that one")
    assert snapshot(existing_run) == before


@pytest.mark.parametrize("finished_run", ["sc"], indirect=True)
def test_another_recipe_in_the_default_folder_is_offered_a_folder_of_its_own(finished_run, tmp_path, capsys,
                                                                              cifar10_root, monkeypatch):
    """The default folder names the dataset, loss, ratio and seed only: an ablation of another setting finds the
    first run there, and is offered a folder named after what differs (which then takes it), not only --overwrite,
    which would delete that run."""
    monkeypatch.chdir(tmp_path)
    argv = ["--data_root", str(cifar10_root), "--loss", "sc", *TINY]
    default = Path(main.parse_config(argv).default_output_dir())
    shutil.copytree(finished_run[1], default)
    before = snapshot(default)
    code, err = call_main([*argv, "--temp", "0.2", "--lr_decay_epochs", "1,2", "--epochs", "3", "--dry_run"], capsys)
    offered = Path(f"{default}_temp0.2_epochs3_lr_decay_epochs1-2")
    assert_one_line_error(code, err, f"{default} already holds another run, made with other settings "
                                     f"(--temp 0.1 -> 0.2, --epochs 2 -> 3, --lr_decay_epochs 1 -> 1,2): give this run "
                                     f"its own --output_dir (e.g. --output_dir {offered}), or --overwrite to replace "
                                     f"that one")
    assert snapshot(default) == before
    code, err = call_main([*argv, "--temp", "0.2", "--lr_decay_epochs", "1,2", "--epochs", "3", "--dry_run",
                           "--output_dir", str(offered)], capsys)
    assert code == 0, err
    assert main.folder_for_differences(default, ["--base_temp 0.07 -> (not given)", "--lr_decay_epochs 1 -> ''"]) == \
        Path(f"{default}_base_tempnone_lr_decay_epochsnone")
    offered.mkdir()  # a folder there already: none offered
    code, err = call_main([*argv, "--temp", "0.2", "--lr_decay_epochs", "1,2", "--epochs", "3", "--dry_run"], capsys)
    assert "(e.g." not in err and "give this run its own --output_dir, or --overwrite" in err, err


def test_a_finished_run_without_last_pt_is_not_sent_to_overwrite(existing_run, capsys, cifar10_root):
    """results.json and best.pt still there (a sweep's finished run whose last.pt was deleted): neither a --resume
    that cannot work nor an --overwrite that would delete its results, with or without --resume."""
    (existing_run / "last.pt").unlink()
    before = snapshot(existing_run)
    argv = ["--data_root", str(cifar10_root), "--output_dir", str(existing_run), *TINY]
    for extra in ([], ["--resume"]):
        code, err = call_main([*argv, *extra], capsys)
        assert_one_line_error(code, err, f"{existing_run} holds a finished run (results.json) whose last.pt was "
                                         f"deleted, so it can be neither continued nor checked: use another "
                                         f"--output_dir (--overwrite would delete its results)")
    assert snapshot(existing_run) == before


def test_a_run_with_best_pt_but_no_last_pt_says_why_it_cannot_be_resumed(existing_run, capsys, cifar10_root):
    """best.pt without last.pt (deleted; or left by earlier code, which wrote best.pt first, killed between the two
    writes). Both messages say that, not "pass --resume" (plain) and "no checkpoint" (--resume) in a circle."""
    for name in ("last.pt", "results.json"):
        (existing_run / name).unlink()
    before = snapshot(existing_run)
    argv = ["--data_root", str(cifar10_root), "--output_dir", str(existing_run), *TINY]
    for extra, way in (([], "pass --overwrite"), (["--resume"], "pass --overwrite instead of --resume")):
        code, err = call_main([*argv, *extra], capsys)
        assert_one_line_error(code, err, f"{existing_run} holds a run's best.pt but no last.pt", "cannot be resumed: "
                              f"move the folder away to keep best.pt, or {way} to start again (which deletes it)")
    assert snapshot(existing_run) == before


def test_a_run_without_checkpoint_is_started_again_with_overwrite(existing_run, capsys, cifar10_root):
    """A run that stopped before its first checkpoint (say, it diverged in epoch 1) left config.json and its
    TensorBoard files: both messages name --overwrite, not a --resume that cannot work."""
    for name in ("last.pt", "best.pt", "results.json"):
        (existing_run / name).unlink()
    before = snapshot(existing_run)
    argv = ["--data_root", str(cifar10_root), "--output_dir", str(existing_run), *TINY]
    code, err = call_main(argv, capsys)
    assert_one_line_error(code, err, "already holds a run that saved no checkpoint (last.pt) to resume from; pass "
                                     "--overwrite to start again")
    code, err = call_main([*argv, "--resume"], capsys)
    assert_one_line_error(code, err, "holds a run that saved no checkpoint (last.pt) to resume from; pass "
                                     "--overwrite instead of --resume to start it again")
    assert snapshot(existing_run) == before


@pytest.mark.parametrize("epochs, warm_epochs, outlasts", [(1, 5, True), (1, 1, False), (2, 1.5, False),
                                                          (3, 2.99, False), (3, 3.2, True), (4, 0, False)])
def test_warmup_outlasts_run(epochs, warm_epochs, outlasts):
    """The note's test: the warm-up ends at the run's last step or before (lr = --learning_rate there), or not."""
    cfg = main.parse_config(["--epochs", str(epochs), "--warm_epochs", str(warm_epochs), "--lr_decay_epochs", ""])
    assert main.warmup_outlasts_run(cfg, steps_per_epoch=10) == outlasts


def test_given_flags_tells_a_given_default_from_an_unset_flag():
    assert main.given_flags(["--model", "resnet32", "--imb_f", "0.01", "--no-amp"]) == {"model", "imb_factor", "amp"}
    assert main.given_flags([]) == set()


@pytest.mark.parametrize("finished_run", ["sc"], indirect=True)
@pytest.mark.parametrize("key, value", [("dataset", ["cifar10"]), ("dataset", "imagenet"), ("model", 8)])
def test_eval_only_of_a_config_naming_no_known_dataset_or_model(key, value, existing_run, capsys, cifar10_root):
    ckpt = existing_run / "last.pt"
    saved = torch.load(ckpt, weights_only=False)
    saved["config"][key] = value
    torch.save(saved, ckpt)
    before = snapshot(existing_run)
    code, err = call_main(["--eval_only", "--checkpoint", str(ckpt), "--data_root", str(cifar10_root)], capsys)
    assert_one_line_error(code, err, f"names {key} {value!r}, not one of", "not a checkpoint of this program")
    assert snapshot(existing_run) == before


@pytest.mark.parametrize("finished_run", ["sc"], indirect=True)
def test_eval_only_of_a_config_that_names_no_model_takes_the_flags(existing_run, capsys, cifar10_root):
    """A checkpoint whose config records no model (other code): --model says which, and loading its weights judges
    it; a model they do not fit is one line."""
    ckpt = existing_run / "last.pt"
    saved = torch.load(ckpt, weights_only=False)
    del saved["config"]["model"]
    torch.save(saved, ckpt)
    argv = ["--eval_only", "--checkpoint", str(ckpt), "--data_root", str(cifar10_root), "--device", "cpu"]
    assert main.main([*argv, "--model", "resnet8"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["top1"] == \
        json.loads((existing_run / "results.json").read_text())["last_top1"]
    code, err = call_main(argv, capsys)  # --model's default, resnet32: not these weights
    assert_one_line_error(code, err, f"{ckpt}", "does not hold what this program's checkpoints hold",
                          "RuntimeError: Error(s) in loading state_dict for HybridNet: Missing key(s)")
    # load_state_dict names every missing key (thousands of characters): the line quotes the start of it
    assert re.search(r" \.\.\. \([\d,]+ more characters\)$", err.strip()) and len(err) < len(str(ckpt)) + 500


def test_device_name_counts_threads(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert main.device_name(torch.device("cpu")) == "cpu (1 thread)"
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert main.device_name(torch.device("cpu")) == "cpu (2 threads)"


@pytest.mark.parametrize("warm, decays, noted", [
    ("1.5", "1", True), ("1.5", "", False), ("1.5", "2", False),  # within the warm-up; none; after it, as meant
    # The warm-up's steps are rounded (util.learning_rate): 1.05 epochs of 9 steps are 9, the last one at full lr
    # before epoch 1's decay; 1.06 are 10, whose last is within epoch 1.
    ("1.05", "1", False), ("1.06", "1", True),
])
def test_an_lr_decay_within_the_warm_up_is_noted(warm, decays, noted, tmp_path, capsys, cifar10_root):
    """Legal, but the warm-up then ramps to the decayed rate: the run says so before its first step, where the
    schedule itself (util.learning_rate) never reaches --learning_rate."""
    argv = ["--data_root", str(cifar10_root), "--output_dir", str(tmp_path / "run"), *TINY, "--dry_run",
            "--epochs", "3", "--warm_epochs", warm, "--lr_decay_epochs", decays]
    assert main.main(argv) == 0
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if "--lr_decay_epochs" in line]
    steps = int(re.search(r"(\d+) steps/epoch", out)[1])
    assert steps == 9  # (the rounding cases above assume it)
    cfg = main.parse_config(argv)
    peak = max(util.learning_rate(step, base_lr=cfg.learning_rate, steps_per_epoch=steps,
                                  warm_epochs=cfg.warm_epochs, decay_epochs=cfg.lr_decay_epochs,
                                  decay_rate=cfg.lr_decay_rate) for step in range(3 * steps))
    assert (peak < cfg.learning_rate) == noted
    assert notes == ([f"note: --lr_decay_epochs 1 decays the lr within the --warm_epochs {warm} warm-up, which then "
                      f"ramps up to 0.005, never to --learning_rate 0.05"] if noted else [])


@pytest.mark.parametrize("loss, epochs, schedule, noted", [
    ("sc", "1", "parabolic", True), ("psc", "1", "cosine", True), ("sc", "2", "parabolic", False),
    ("sc", "1", "equal", False), ("ce", "1", "parabolic", False)])
def test_a_hybrid_whose_alpha_is_1_in_every_epoch_is_noted(loss, epochs, schedule, noted, tmp_path, capsys,
                                                            cifar10_root):
    """alpha = 1 - (epoch / epochs)^2 is 1 in the first epoch, so a 1-epoch hybrid (a smoke test) never weighs its
    classifier's loss: chance accuracy, which looked like a bug without a word."""
    argv = ["--data_root", str(cifar10_root), "--output_dir", str(tmp_path / "run"), *TINY, "--dry_run", "--loss",
            loss, "--epochs", epochs, "--lr_decay_epochs", "", "--alpha_schedule", schedule]
    assert main.main(argv) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if "alpha is 1" in line]
    assert notes == ([f"note: under --alpha_schedule {schedule} alpha is 1 in every epoch of a run of 1 epoch, which "
                      f"gives the classifier branch's loss no weight: its accuracy stays at chance (alpha falls from "
                      f"the second of two or more epochs)"] if noted else [])


def test_config_json_records_the_folder_the_run_used(tmp_path, capsys, cifar10_root, monkeypatch):
    """config.json (and --dry_run's print of it) holds the run folder as resolved: the default one where
    --output_dir was left out, not null."""
    monkeypatch.chdir(tmp_path)
    argv = ["--data_root", str(cifar10_root), *TINY]
    expected = main.parse_config(argv).default_output_dir()
    assert main.main([*argv, "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[:out.index("\n}\n") + 2])["output_dir"] == expected
    assert main.main([*argv, "--output_dir", "given"]) == 0
    assert json.loads((tmp_path / "given" / "config.json").read_text())["output_dir"] == "given"


def test_dry_run_does_all_a_run_does_before_its_first_step_and_writes_nothing(finished_run, tmp_path, capsys,
                                                                               cifar10_root):
    """--dry_run passes or fails as the run would up to its first step, says what it would do, and leaves every
    folder as it was: a fresh one uncreated, an existing run unchanged, whatever --resume / --overwrite say."""
    loss, finished, _ = finished_run
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    argv = ["--data_root", str(cifar10_root), "--loss", loss, *TINY, "--dry_run"]

    def dry_run(*extra: str) -> tuple[int, str, str]:
        before = snapshot(run)
        try:
            code = main.main([*argv, *extra])
        except SystemExit as e:
            code = e.code
        captured = capsys.readouterr()
        assert snapshot(run) == before
        return code, captured.out, captured.err

    fresh = tmp_path / "fresh"
    code, out, err = dry_run("--output_dir", str(fresh), "--alpha_schedule", "linear")
    assert code == 0 and err == "" and not fresh.exists()
    config = json.loads(out[:out.index("\n}\n") + 2])  # the settings, as config.json would hold them
    assert f'  "class_counts": {json.dumps(EXPECTED_COUNTS)},' in out.splitlines()  # a list on one line
    assert len(out[:out.index("\n}\n") + 2].splitlines()) == len(config) + 2  # a line a setting, and the braces
    saved = json.loads((finished / "config.json").read_text())
    assert config["class_counts"] == EXPECTED_COUNTS and config["dry_run"] is True
    assert {k: v for k, v in config.items() if k not in ("dry_run", "output_dir", "alpha_schedule")} == \
        {k: v for k, v in saved.items() if k not in ("dry_run", "output_dir", "alpha_schedule")}
    lines = out[out.index("\n}\n") + 3:].splitlines()
    if loss == "ce":  # the notes a run prints come too
        assert lines.pop(0).startswith("note: --loss ce does not read --alpha_schedule")
    assert lines == [f"training {sum(EXPECTED_COUNTS)} images in 10 classes (counts 40 .. 4), 9 steps/epoch, device "
                     f"{main.device_name(torch.device('cpu'))}, output {fresh}",
                     f"dry run: would start a run in {fresh}; nothing written"]

    code, out, err = dry_run("--output_dir", str(run))
    assert_one_line_error(code, err, "already holds a run; pass --resume to continue it or --overwrite")
    # Another recipe in that folder (a test run in the paper run's default folder, say): --resume would be refused,
    # so the way out is another folder, and the settings that differ are named, from its config.json.
    code, out, err = dry_run("--output_dir", str(run), "--batch_size", "8", "--alpha_schedule", "linear")
    differ = "--alpha_schedule parabolic -> linear, --batch_size 16 -> 8" if loss != "ce" else "--batch_size 16 -> 8"
    assert_one_line_error(code, err, f"{run} already holds another run, made with other settings ({differ}): give "
                                     f"this run its own --output_dir, or --overwrite to replace that one")
    # The folder that holds the runs (a sweep's --runs_dir) is not a run's folder, --overwrite or not.
    for extra in ((), ("--overwrite",)):
        code, out, err = dry_run("--output_dir", str(tmp_path), *extra)
        assert_one_line_error(code, err, f"--output_dir {tmp_path} holds run folders (run), so it is not a run's own "
                                         f"folder: give this run a folder of its own (e.g. {tmp_path / 'my_run'})")
    config_json = (run / "config.json").read_bytes()
    (run / "config.json").write_text("{cut off")  # unreadable: the plain message, the checkpoint judges on --resume
    code, out, err = dry_run("--output_dir", str(run), "--batch_size", "8")
    assert_one_line_error(code, err, "already holds a run; pass --resume to continue it or --overwrite")
    (run / "config.json").write_bytes(config_json)
    code, out, _ = dry_run("--output_dir", str(run), "--overwrite")
    assert code == 0 and out.endswith(f"dry run: would start again in {run}, deleting the run there; nothing written\n")
    code, out, _ = dry_run("--output_dir", str(run), "--resume")
    assert code == 0 and out == f"{run} already finished 2 epochs; nothing to do\n"
    code, out, err = dry_run("--output_dir", str(run), "--resume", "--batch_size", "8")
    assert_one_line_error(code, err, "--batch_size 16 -> 8")
    (run / "results.json").unlink()  # trained to the end, stopped before its results were written
    code, out, _ = dry_run("--output_dir", str(run), "--resume")
    assert code == 0 and out.endswith(f"dry run: would evaluate the trained run in {run} and write its results.json; "
                                      f"nothing written\n")
    ckpt = torch.load(run / "last.pt", weights_only=False)
    for (epoch, step), where in (((1, 0), "after epoch 1 of 2"),
                                 ((1, 3), "after step 3 of epoch 2 of 2 (9 steps per epoch)")):
        ckpt["run"].update(epoch=epoch, step=step)
        torch.save(ckpt, run / "last.pt")
        code, out, _ = dry_run("--output_dir", str(run), "--resume")
        assert code == 0 and out.endswith(f"dry run: would resume {run} {where}; nothing written\n")
    # The data is read and split as the run would: no data, or too few images for the batch, fail alike.
    code, _, err = dry_run("--output_dir", str(fresh), "--data_root", str(tmp_path / "nothing"))
    assert_one_line_error(code, err, "cifar-10-batches-py")
    code, _, err = dry_run("--output_dir", str(fresh), "--batch_size", "4096")
    assert_one_line_error(code, err, "4096")
    assert not fresh.exists()


def test_resume_without_checkpoint(tmp_path, capsys, cifar10_root):
    code, err = call_main(["--data_root", str(cifar10_root), "--output_dir", str(tmp_path / "o"), "--resume"],
                          capsys)
    assert_one_line_error(code, err, "no checkpoint")
    assert not (tmp_path / "o").exists()


def test_resume_with_other_settings(existing_run, capsys, cifar10_root):
    before = snapshot(existing_run)
    argv = ["--data_root", str(cifar10_root), "--output_dir", str(existing_run), "--resume", *TINY]
    argv[argv.index("--batch_size") + 1] = "8"
    code, err = call_main(argv, capsys)
    assert_one_line_error(code, err, "--batch_size 16 -> 8")
    # Another model too (the command without its --model): every difference in one message, not one per try.
    argv[argv.index("--model") + 1] = "resnet32"
    code, err = call_main(argv, capsys)
    assert_one_line_error(code, err, "--model resnet8 -> resnet32, --batch_size 16 -> 8 (give")
    assert snapshot(existing_run) == before


@pytest.mark.parametrize("problem", ["missing", "folder", "device", "garbage", "truncated", "other_model",
                                     "other_classes", "other_imbalance", "foreign_classes", "classes_as_text",
                                     "other_data"])
def test_bad_checkpoints(problem, existing_run, tmp_path, capsys, cifar10_root):
    ckpt = existing_run / "last.pt"
    argv = ["--eval_only", "--data_root", str(cifar10_root), "--device", "cpu", "--model", "resnet8"]
    if problem == "missing":
        argv += ["--checkpoint", str(tmp_path / "nope.pt")]
        needle = "not found"
    elif problem == "folder":  # the run's folder instead of a file in it
        argv += ["--checkpoint", str(existing_run)]
        needle = "is a folder: name the file in it (a run leaves last.pt and best.pt)"
    elif problem == "device":  # there, but not a file that could hold one
        argv += ["--checkpoint", os.devnull]
        needle = f"checkpoint {os.devnull} is not a regular file (a device or a pipe): name a .pt file"
    elif problem == "garbage":
        (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
        argv += ["--checkpoint", str(tmp_path / "garbage.pt")]
        needle = "cannot read"
    elif problem == "truncated":
        (tmp_path / "half.pt").write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
        argv += ["--checkpoint", str(tmp_path / "half.pt")]
        needle = "cannot read checkpoint " + str(tmp_path / "half.pt") + " (damaged, or not a file torch.save wrote)"
    elif problem == "other_model":  # the checkpoint's model is evaluated; a flag asking for another is refused,
        argv[argv.index("resnet8")] = "resnet32"  # also when it is the flag's default
        argv += ["--checkpoint", str(ckpt)]
        needle = "these flags disagree with it: --model resnet32 (the checkpoint's: resnet8); drop them"
    elif problem == "other_classes":
        argv += ["--checkpoint", str(ckpt), "--dataset", "cifar100"]
        needle = "--dataset cifar100 (the checkpoint's: cifar10)"
    elif problem == "other_imbalance":  # not silently evaluated (and its NCM built) at the checkpoint's ratio
        argv += ["--checkpoint", str(ckpt), "--imb_factor", "0.01", "--feat_dim", "64"]  # 0.01: the default
        needle = f"--imb_factor 0.01 (the checkpoint's: {IMB_FACTOR}), --feat_dim 64 (the checkpoint's: 128)"
    elif problem == "foreign_classes":  # written by other code: its config's dataset and its class count disagree
        saved = torch.load(ckpt, weights_only=False)
        saved["num_classes"] = 100
        torch.save(saved, tmp_path / "foreign.pt")
        argv += ["--checkpoint", str(tmp_path / "foreign.pt")]
        needle = "is a resnet8 with 100 classes; this run is a resnet8 with 10"
    elif problem == "classes_as_text":  # (it read "with 10 classes; this run is a resnet8 with 10")
        saved = torch.load(ckpt, weights_only=False)
        saved["num_classes"] = "10"
        torch.save(saved, tmp_path / "foreign.pt")
        argv += ["--checkpoint", str(tmp_path / "foreign.pt")]
        needle = "is a resnet8 with '10' classes; this run is a resnet8 with 10"
    else:  # 30 training images per class where the run had 40: another long-tailed set at the same ratio
        write_pickled_cifar10(tmp_path / "other", *make_synthetic(10, 30, N_TEST, seed=0))
        argv[argv.index(str(cifar10_root))] = str(tmp_path / "other")
        argv += ["--checkpoint", str(ckpt)]
        needle = f"trained on {EXPECTED_COUNTS} images per class"
    before = snapshot(existing_run)
    code, err = call_main(argv, capsys)
    assert_one_line_error(code, err, needle)
    assert snapshot(existing_run) == before


DAMAGED = {  # a last.pt that load_checkpoint and check_compatible accept, damaged after that
    "no_optimizer": lambda s: s.pop("optimizer"),
    "no_rng": lambda s: s.pop("rng"),
    "epoch_as_text": lambda s: s["run"].update(epoch="2"),
    "config_as_text": lambda s: s.update(config="resnet8"),
    "model_tensor_reshaped": lambda s: s["model"].update(
        {k: torch.zeros(3, *v.shape) for k, v in list(s["model"].items())[:1]}),
    "other_class_counts": lambda s: s.update(class_counts=[5] * 10),
    "best_top1_as_text": lambda s: s["run"].update(best_top1="x"),
    "history_as_none": lambda s: s["run"].update(history=None),
    "epoch_sums_of_another_shape": lambda s: s["run"].update(epoch_sums=torch.zeros(2)),
    "amp_as_text": lambda s: s.update(amp="yes"),
    "epoch_negative": lambda s: s["run"].update(epoch=-3),
    "epoch_past_the_run": lambda s: s["run"].update(epoch=10**30),  # the run's --epochs are compared: 2
    "step_past_the_epoch": lambda s: s["run"].update(step=10**6),
    "sessions_as_a_number": lambda s: s["run"].update(sessions=5),
    "session_amp_as_text": lambda s: s["run"].update(sessions=[{**s["run"]["sessions"][0], "amp": "x"}]),
    "session_amp_as_a_list": lambda s: s["run"].update(sessions=[{**s["run"]["sessions"][0], "amp": [1]}]),
    "session_world_size_as_a_bool": lambda s: s["run"].update(sessions=[{**s["run"]["sessions"][0],
                                                                        "world_size": True}]),
    "session_without_its_start": lambda s: s["run"].update(sessions=[{"amp": True}]),
    "session_first_step_as_text": lambda s: s["run"].update(sessions=[{**s["run"]["sessions"][0],
                                                                      "first_step_s": "1.5"}]),
    "session_commit_as_a_number": lambda s: s["run"].update(sessions=[{**s["run"]["sessions"][0],
                                                                      "git_commit": 1234}]),
    "session_eval_every_zero": lambda s: s["run"].update(sessions=[{**s["run"]["sessions"][0], "eval_every": 0}]),
    "session_sync_bn_as_text": lambda s: s["run"].update(sessions=[{**s["run"]["sessions"][0], "sync_bn": "no"}]),
    "session_compile_unknown": lambda s: s["run"].update(sessions=[{**s["run"]["sessions"][0], "compile": "fast"}]),
    "numpy_state_out_of_range": lambda s: s["rng"].update(numpy=(s["rng"]["numpy"][0], [-1] * 624,
                                                                 *s["rng"]["numpy"][2:])),
    # A NaN best would never be beaten (no later best kept), a NaN time gives NaN samples/s in results.json.
    "best_top1_nan": lambda s: s["run"].update(best_top1=float("nan")),
    "train_time_inf": lambda s: s["run"].update(train_time=float("inf")),
    "epoch_past_a_float": lambda s: s["run"].update(epoch=10**400),  # (math.isfinite would raise OverflowError)
    # optimizer.load_state_dict takes these; the first step then failed with a traceback.
    "momentum_buffer_of_another_shape": lambda s: next(iter(s["optimizer"]["state"].values())).update(
        momentum_buffer=torch.zeros(1)),
    "optimizer_state_a_number": lambda s: s["optimizer"]["state"].update({0: 5}),
    "optimizer_momentum_as_text": lambda s: s["optimizer"]["param_groups"][0].update(momentum="x"),
    "optimizer_momentum_past_a_float": lambda s: s["optimizer"]["param_groups"][0].update(momentum=10**400),
    "optimizer_momentum_nan": lambda s: s["optimizer"]["param_groups"][0].update(momentum=float("nan")),
}


# --eval_only reads neither the optimizer, the RNG states nor the training state; --resume does not read "amp"
# (the flags and the device decide how a resumed run runs).
RUN_ONLY_DAMAGE = ("no_optimizer", "no_rng", "epoch_as_text", "best_top1_as_text", "history_as_none",
                   "epoch_sums_of_another_shape", "epoch_negative", "epoch_past_the_run", "step_past_the_epoch",
                   "sessions_as_a_number", "session_amp_as_text", "session_amp_as_a_list",
                   "session_world_size_as_a_bool",
                   "session_without_its_start", "session_first_step_as_text", "session_commit_as_a_number",
                   "session_eval_every_zero", "session_sync_bn_as_text", "session_compile_unknown",
                   "numpy_state_out_of_range", "best_top1_nan", "train_time_inf",
                   "epoch_past_a_float",
                   "momentum_buffer_of_another_shape", "optimizer_state_a_number", "optimizer_momentum_as_text",
                   "optimizer_momentum_past_a_float", "optimizer_momentum_nan")
DAMAGE_CASES = ([(d, "resume") for d in DAMAGED if d != "amp_as_text"]
                + [(d, "eval_only") for d in DAMAGED if d not in RUN_ONLY_DAMAGE])


@pytest.mark.parametrize("finished_run", ["sc"], indirect=True)  # the checks do not depend on the loss
@pytest.mark.parametrize("damage, mode", DAMAGE_CASES, ids=[f"{d}-{m}" for d, m in DAMAGE_CASES])
def test_damaged_checkpoints_are_one_line(damage, mode, existing_run, capsys, cifar10_root):
    """--resume and --eval_only of a checkpoint damaged (or written by other code) past the checks of its form:
    one line and nothing on disk changed, never a traceback halfway through."""
    ckpt = existing_run / "last.pt"
    saved = torch.load(ckpt, weights_only=False)
    DAMAGED[damage](saved)
    torch.save(saved, ckpt)
    (existing_run / "results.json").unlink()  # unfinished: --resume reads the whole checkpoint
    if mode == "resume":
        argv = ["--data_root", str(cifar10_root), "--output_dir", str(existing_run), "--resume", *TINY]
    else:
        argv = ["--eval_only", "--checkpoint", str(ckpt), "--data_root", str(cifar10_root), "--device", "cpu",
                "--model", "resnet8"]
    needle = {"config_as_text": "is not a checkpoint of this project", "other_class_counts": "not the data it was",
              "epoch_as_text": "holds no training state",
              "best_top1_nan": "TypeError: its run entry 'best_top1' is nan, not a finite number",
              "momentum_buffer_of_another_shape": "ValueError: its optimizer's momentum buffer for a parameter of",
              "optimizer_state_a_number": "momentum buffer for a parameter of shape [16, 3, 3, 3] is not a tensor",
              "optimizer_momentum_as_text": "ValueError: its optimizer's momentum is 'x', not a finite number",
              }.get(damage, "does not hold what this program's checkpoints")
    before = snapshot(existing_run)
    code, err = call_main(argv, capsys)
    assert_one_line_error(code, err, needle)
    assert snapshot(existing_run) == before


@pytest.mark.parametrize("finished_run", ["sc"], indirect=True)
@pytest.mark.parametrize("mode", ["resume", "eval_only"])
def test_a_checkpoint_that_would_run_code_is_one_line_and_not_run(mode, existing_run, capsys, cifar10_root):
    """A checkpoint from elsewhere (a download to evaluate, a run folder copied in) that holds a call: refused as
    weights_only=True refuses it, in one line, and the call never made."""
    ckpt = existing_run / "last.pt"
    saved = torch.load(ckpt, weights_only=False)
    saved["run"]["note"] = RunsCode(existing_run.parent / "ran")
    torch.save(saved, ckpt)
    (existing_run / "results.json").unlink()
    if mode == "resume":
        argv = ["--data_root", str(cifar10_root), "--output_dir", str(existing_run), "--resume", *TINY]
    else:
        argv = ["--eval_only", "--checkpoint", str(ckpt), "--data_root", str(cifar10_root), "--device", "cpu"]
    before = snapshot(existing_run)
    code, err = call_main(argv, capsys)
    assert_one_line_error(code, err, f"cannot read checkpoint {ckpt}: it holds {os.mkdir.__module__}.mkdir, which no "
                                     f"checkpoint of this project holds")
    assert snapshot(existing_run) == before and not (existing_run.parent / "ran").exists()


@pytest.mark.parametrize("finished_run", ["psc"], indirect=True)  # PSC's temperature default is the dataset's
def test_a_checkpoint_whose_dataset_is_not_a_name_is_one_line(existing_run, capsys, cifar10_root):
    """A config whose dataset is not a string (damaged, or other code's) is a difference named in one line, not a
    TypeError from looking up the PSC temperature that dataset stands for."""
    ckpt = existing_run / "last.pt"
    saved = torch.load(ckpt, weights_only=False)
    saved["config"]["dataset"] = ["cifar10"]
    torch.save(saved, ckpt)
    (existing_run / "results.json").unlink()
    before = snapshot(existing_run)
    code, err = call_main(["--data_root", str(cifar10_root), "--output_dir", str(existing_run), "--resume",
                           "--loss", "psc", *TINY], capsys)
    assert_one_line_error(code, err, "was made with other settings: --dataset ['cifar10'] -> 'cifar10' (give")
    assert snapshot(existing_run) == before


@pytest.mark.parametrize("finished_run", ["sc"], indirect=True)
def test_a_run_folder_in_use_by_another_process_is_left_alone(existing_run, capsys, cifar10_root, monkeypatch):
    """A run holds a lock on its folder while it lives: a second main.py there (a second sweep over the same
    --runs_dir would pass --overwrite, or --resume) stops with one line before it deletes or writes anything."""
    import fcntl

    (existing_run / "results.json").unlink()  # unfinished: --resume would go on to train
    argv = ["--data_root", str(cifar10_root), "--output_dir", str(existing_run), *TINY]
    before = snapshot(existing_run)
    other = os.open(existing_run, os.O_RDONLY)  # another process's lock (another open file: the same conflict)
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        for flag in ("--overwrite", "--resume"):
            code, err = call_main([*argv, flag], capsys)
            assert_one_line_error(code, err, f"{existing_run} is in use by another process training this run")
            assert code == main.EXIT_IN_USE == 75  # EX_TEMPFAIL: scripts/sweep.sh lists the run as BUSY
            assert snapshot(existing_run) == before
    finally:
        os.close(other)

    def lock_state(folder) -> str:
        probe = os.open(folder, os.O_RDONLY)
        try:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return "free"
        except BlockingIOError:
            return "locked"
        finally:
            os.close(probe)

    seen, train_epoch, resume_point = [], main.Run.train_epoch, main.resume_point

    def probing_resume_point(cfg, dist):  # locked before the folder's state is read: what it decides stays so
        seen.append(lock_state(existing_run))
        return resume_point(cfg, dist)

    def probing_train_epoch(self):  # and while the run trains
        seen.append(lock_state(self.out))
        return train_epoch(self)

    monkeypatch.setattr(main, "resume_point", probing_resume_point)
    monkeypatch.setattr(main.Run, "train_epoch", probing_train_epoch)
    code, err = call_main([*argv, "--overwrite", "--epochs", "1", "--lr_decay_epochs", ""], capsys)
    assert code == 0, err
    assert seen == ["locked", "locked"] and lock_state(existing_run) == "free"  # free once main() returned
    # A run that fails after taking the lock leaves it free too (the next main() in this process is not refused).
    (existing_run / "last.pt").unlink()
    (existing_run / "last.pt").mkdir()
    code, err = call_main([*argv, "--overwrite"], capsys)
    assert_one_line_error(code, err, f"cannot overwrite the run in {existing_run}: last.pt is a folder")
    assert lock_state(existing_run) == "free"


def locks_as_nfs(monkeypatch):
    """fcntl.flock made to refuse, as Linux's NFS client does, an exclusive lock of a descriptor not open for
    writing (a folder's: EBADF); returns the real flock."""
    import fcntl

    real_flock = fcntl.flock

    def nfs_flock(fd, operation):
        if operation & fcntl.LOCK_EX and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        return real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", nfs_flock)
    return real_flock


@pytest.mark.parametrize("finished_run", ["sc"], indirect=True)
@pytest.mark.parametrize("kind", ["folder", "socket", "named pipe", "link to itself"])
def test_a_lock_file_that_is_not_a_file_is_one_line(kind, existing_run, capsys, cifar10_root, monkeypatch):
    """Where the folder cannot be locked (NFS), the run locks its .lock file; one that is not a file could not be
    opened read-write (a folder, a socket, a link loop) and the run went on unlocked without a word, as on a file
    system without flock, beside a second main.py on the same folder. Now one line, and nothing on disk
    changed (a pipe, which Linux opens read-write without waiting, included)."""
    import socket

    locks_as_nfs(monkeypatch)
    (existing_run / "results.json").unlink()
    lock_file = existing_run / main.LOCK_FILE
    held = socket.socket(socket.AF_UNIX)
    try:
        if kind == "folder":
            lock_file.mkdir()
        elif kind == "socket":
            monkeypatch.chdir(existing_run)  # (a socket's path has at most 107 bytes)
            held.bind(main.LOCK_FILE)
            monkeypatch.undo()
            locks_as_nfs(monkeypatch)
        elif kind == "named pipe":
            os.mkfifo(lock_file)
        else:
            lock_file.symlink_to(main.LOCK_FILE)
        before = snapshot(existing_run)
        argv = ["--data_root", str(cifar10_root), "--output_dir", str(existing_run), *TINY]
        for extra in (["--resume"], ["--resume", "--dry_run"], ["--overwrite"]):
            code, err = returns_before_a_writer(lock_file, lambda: call_main([*argv, *extra], capsys))
            assert_one_line_error(code, err, f"cannot lock the run folder {existing_run}: .lock there is not a file")
            assert snapshot(existing_run) == before
    finally:
        held.close()


@pytest.mark.parametrize("finished_run", ["sc"], indirect=True)
def test_where_a_folder_cannot_be_locked_a_lock_file_in_it_is(existing_run, capsys, cifar10_root, monkeypatch):
    """On NFS, flock is the server's lock, which for exclusive use asks for a file open for writing: a folder's
    descriptor gets EBADF. The run then locks a .lock file in its folder, opened read-write, and keeps it there;
    a dry run makes none. Where flock fails on the file too, the run goes on unlocked."""
    import fcntl

    real_flock = locks_as_nfs(monkeypatch)
    (existing_run / "results.json").unlink()
    argv = ["--data_root", str(cifar10_root), "--output_dir", str(existing_run), *TINY]
    lock_file = existing_run / main.LOCK_FILE
    code, err = call_main([*argv, "--resume", "--dry_run"], capsys)
    assert code == 0 and not lock_file.exists(), err
    seen, train_epoch = [], main.Run.train_epoch

    def probing_train_epoch(self):
        probe = os.open(lock_file, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                real_flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            seen.append("locked")
        finally:
            os.close(probe)
        return train_epoch(self)

    monkeypatch.setattr(main.Run, "train_epoch", probing_train_epoch)
    code, err = call_main([*argv, "--overwrite", "--epochs", "1", "--lr_decay_epochs", ""], capsys)
    assert code == 0 and seen == ["locked"], err
    assert lock_file.is_file() and lock_file.stat().st_size == 0  # left there, and free
    other = os.open(lock_file, os.O_RDWR)  # another machine's process holding it
    real_flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        before = snapshot(existing_run)
        for extra in (["--overwrite"], ["--resume", "--dry_run"]):
            code, err = call_main([*argv, *extra], capsys)
            assert_one_line_error(code, err, f"{existing_run} is in use by another process training this run")
            assert code == main.EXIT_IN_USE and snapshot(existing_run) == before
    finally:
        os.close(other)

    def no_flock(fd, operation):  # a file system without flock: ENOLCK for the folder and the file alike
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_flock)
    seen.clear()
    monkeypatch.setattr(main.Run, "train_epoch", train_epoch)
    code, err = call_main([*argv, "--overwrite", "--epochs", "1", "--lr_decay_epochs", ""], capsys)
    assert code == 0, err


def test_a_folder_made_and_locked_by_another_process_meanwhile_is_in_use(tmp_path, monkeypatch):
    """Two runs starting on one fresh folder: where the folder did not exist yet when this one looked, it does not
    take a lock file instead (the other made and locked the folder meanwhile); its prepare_output_dir then finds
    the other's lock."""
    import fcntl

    out, lock = tmp_path / "run", main.FolderLock()
    real_open, held = os.open, []

    def other_process_meanwhile(path, flags, *mode):
        if Path(path) == out and not held:  # this process looked and found no folder; the other then made it
            out.mkdir()
            held.append(real_open(out, os.O_RDONLY))
            fcntl.flock(held[0], fcntl.LOCK_EX | fcntl.LOCK_NB)
            raise FileNotFoundError(path)
        return real_open(path, flags, *mode)

    monkeypatch.setattr(os, "open", other_process_meanwhile)
    try:
        lock.acquire(out)
        assert lock.fd is None and not (out / main.LOCK_FILE).exists()
        with pytest.raises(main.FolderInUse, match="is in use by another process"):
            main.prepare_output_dir(out, overwrite=False, lock=lock)
    finally:
        for fd in held:
            os.close(fd)


def test_a_run_left_in_a_new_folder_while_this_one_started_is_kept(tmp_path, cifar10_root, monkeypatch, capsys):
    """The folder did not exist when this run checked it (so nothing locked it then); another process then ran
    there and ended before this one made the folder. Once locked, the folder is checked again: the other's run is
    not written over without --overwrite."""
    out, real_resume_point = tmp_path / "run", main.resume_point

    def another_run_meanwhile(cfg, dist):
        point = real_resume_point(cfg, dist)
        out.mkdir()
        (out / "results.json").write_text('{"other": 1}')
        (out / "last.pt").write_bytes(b"the other run's")
        return point

    monkeypatch.setattr(main, "resume_point", another_run_meanwhile)
    code, err = call_main(["--data_root", str(cifar10_root), "--output_dir", str(out), *TINY], capsys)
    assert_one_line_error(code, err, f"{out} already holds a run", "--resume", "--overwrite")
    assert code == 2 and sorted(p.name for p in out.iterdir()) == ["last.pt", "results.json"]
    assert (out / "last.pt").read_bytes() == b"the other run's"


@pytest.mark.parametrize("finished_run", ["sc"], indirect=True)
def test_out_of_memory_while_resuming_is_not_blamed_on_the_checkpoint(existing_run, cifar10_root, monkeypatch):
    """A RuntimeError, as a damaged checkpoint's tensors raise, but the device's: it keeps its own traceback."""
    def out_of_memory(self, state_dict):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")

    monkeypatch.setattr(torch.optim.SGD, "load_state_dict", out_of_memory)
    (existing_run / "results.json").unlink()
    with pytest.raises(torch.cuda.OutOfMemoryError):
        main.main(["--data_root", str(cifar10_root), "--output_dir", str(existing_run), "--resume", *TINY])


@pytest.mark.parametrize("finished_run", ["sc"], indirect=True)
def test_resume_on_other_data_is_refused(existing_run, tmp_path, capsys):
    """The same flags, another --data_root (30 images per class where the run had 40): not the run to continue."""
    write_pickled_cifar10(tmp_path / "other", *make_synthetic(10, 30, N_TEST, seed=0))
    (existing_run / "results.json").unlink()
    before = snapshot(existing_run)
    code, err = call_main(["--data_root", str(tmp_path / "other"), "--output_dir", str(existing_run), "--resume",
                           *TINY], capsys)
    assert_one_line_error(code, err, f"trained on {EXPECTED_COUNTS} images per class", "not the data it was")
    assert snapshot(existing_run) == before


def sigterm_after_epoch_1(run: main.Run) -> int:
    """Run.agreed_signal standing in for a SIGTERM that comes as epoch 1 ends: the run saves and stops there."""
    import signal
    return signal.SIGTERM if (run.state.epoch, run.state.step) == (1, 0) else 0


def test_a_run_resumed_in_another_precision_is_labelled_mixed(tmp_path, cifar10_root, monkeypatch, capsys):
    """Stopped after epoch 1 of 2 in bf16 and resumed with --no-amp: results.json's amp is "mixed" (its weights
    come from both), and its sessions say which part ran how; summarize.py puts it in a row of its own."""
    import signal

    out = tmp_path / "run"
    argv = ["--data_root", str(cifar10_root), "--output_dir", str(out), *TINY]

    with monkeypatch.context() as m:
        m.setattr(main.Run, "agreed_signal", sigterm_after_epoch_1)
        m.setenv("GIT_COMMIT", "1111111")  # the code of the first session ...
        code, err = call_main(argv + ["--amp"], capsys)
    assert code == 128 + signal.SIGTERM and "stopped after epoch 1" in err, err
    monkeypatch.setenv("GIT_COMMIT", "2222222")  # ... and of the resume (a `git pull` between them)
    code = main.main(argv + ["--resume", "--no-amp"])
    out_text, err = capsys.readouterr()
    assert code == 0, err
    assert ('note: this run trained with --amp so far and goes on with --no-amp: its results.json will say '
            '"amp": "mixed"') in out_text.splitlines()
    assert ("note: this run trained with commit 1111111 so far and goes on with commit 2222222: results.json's "
            "sessions will say which part ran which") in out_text.splitlines()
    assert "resuming after epoch 1 of 2" in out_text.splitlines()  # where it goes on, before the epoch lines
    res = json.loads((out / "results.json").read_text())
    assert res["amp"] == "mixed" and res["world_size"] == 1
    assert [(s["epoch"], s["step"], s["amp"], s["world_size"]) for s in res["sessions"]] == [(0, 0, True, 1),
                                                                                           (1, 0, False, 1)]
    assert [s["git_commit"] for s in res["sessions"]] == ["1111111", "2222222"] and res["git_commit"] == "2222222"
    assert [s["torch_version"] for s in res["sessions"]] == [torch.__version__] * 2
    assert json.loads((out / "config.json").read_text())["amp"] is False  # the session's own, as it started


@pytest.mark.parametrize("finished_run", ["sc"], indirect=True)
def test_a_session_that_only_evaluates_is_recorded_too(existing_run, cifar10_root, capsys):
    """Trained to the end, stopped before results.json, resumed in the other precision: that session trains nothing
    but evaluates the results, so it is a session of its own, and the run's precision is "mixed"."""
    trained = json.loads((existing_run / "results.json").read_text())
    (existing_run / "results.json").unlink()
    other = "--no-amp" if trained["amp"] else "--amp"
    code = main.main(["--data_root", str(cifar10_root), "--output_dir", str(existing_run), "--resume", other, *TINY])
    out_text, err = capsys.readouterr()
    assert code == 0, err
    assert ("resuming a run that trained all its 2 epochs: evaluating it and writing its results.json"
            in out_text.splitlines())
    res = json.loads((existing_run / "results.json").read_text())
    evaluated = {k: v for k, v in trained["sessions"][0].items() if k != "first_step_s"}  # (it took no step)
    assert res["amp"] == "mixed" and res["sessions"] == [
        *trained["sessions"], {**evaluated, "epoch": 2, "step": 0, "amp": not trained["amp"], "evaluated_only": True}]
    assert res["first_step_s"] == trained["first_step_s"]  # the last session that took a step: its first step


@pytest.mark.parametrize("finished_run", ["sc"], indirect=True)
@pytest.mark.parametrize("damage", ["cut off", "a list", "not utf-8", "nested too deep", "no last_top1",
                                    "many as text", "sparse, 16 GiB"])
def test_a_finished_runs_damaged_results_are_written_again(damage, existing_run, cifar10_root, capsys):
    """A results.json that cannot be read (cut off by a full disk, say) is not a finished run's: --resume (and so a
    sweep) writes it again from last.pt, which holds the whole run, with the same results."""
    results = existing_run / "results.json"
    whole = json.loads(results.read_text())
    results.write_bytes({"cut off": results.read_bytes()[:300], "a list": b"[1, 2]", "not utf-8": b"\xff\xfe{",
                         "nested too deep": b"[" * 200_000 + b"]" * 200_000,  # json.loads: RecursionError
                         "no last_top1": json.dumps({k: v for k, v in whole.items() if k != "last_top1"}).encode(),
                         "many as text": json.dumps({**whole, "many": "90"}).encode(),
                         "sparse, 16 GiB": b"{"}[damage])
    if damage == "sparse, 16 GiB":  # read whole, it would take all the memory: read up to 64 MiB
        os.truncate(results, 1 << 34)
    argv = ["--data_root", str(cifar10_root), "--output_dir", str(existing_run), "--resume", *TINY]
    assert main.main([*argv, "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"note: {results} cannot be read (") and "the run would write it again from" in out
    assert out.endswith(f"dry run: would evaluate the trained run in {existing_run} and write its results.json; "
                        f"nothing written\n")
    code = main.main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.startswith(f"note: {results} cannot be read (") and f"it is written again from {existing_run}" in out
    assert {"no last_top1": "(no usable last_top1)", "many as text": "(no usable many)",
            "sparse, 16 GiB": "(FileTooLarge: it is larger than 64 MiB, far more than a run writes there)"}.get(
        damage, "") in out.splitlines()[0]
    assert "Embedding dir exists" not in out  # the earlier projections are replaced, not written beside
    again = json.loads(results.read_text())
    for key in ("best_top1", "last_top1", "per_class", "history", "best", "last", "ncm", "train_digest"):
        assert again[key] == whole[key], key
    code = main.main(argv)
    assert (code, capsys.readouterr().out) == (0, f"{existing_run} already finished 2 epochs; nothing to do\n")
    # A run with no class of a shot group records null there: whole, not damaged.
    results.write_text(json.dumps({**again, "few": None}))
    code = main.main(argv)
    assert (code, capsys.readouterr().out) == (0, f"{existing_run} already finished 2 epochs; nothing to do\n")
    # Not a file (a folder; a pipe, which reading would wait on): one line, nothing replaced.
    results.unlink()
    results.mkdir()
    code, err = call_main(argv, capsys)
    assert_one_line_error(code, err, f"{results} is not a file, so not the run's results: move it away")
    results.rmdir()
    os.mkfifo(results)
    code, err = call_main(argv, capsys)
    assert_one_line_error(code, err, f"{results} is not a file")


@pytest.mark.parametrize("finished_run", ["sc"], indirect=True)
def test_run_files_are_read_as_utf8_whatever_the_locale(existing_run, cifar10_root):
    """JSON is UTF-8 (RFC 8259). A results.json holding UTF-8 text (a note added by hand) is a finished run's under
    an ASCII locale too, not a damaged file to write again over the note; and its config.json is read the same."""
    results = existing_run / "results.json"
    record = json.loads(results.read_text(encoding="utf-8"))
    results.write_text(json.dumps({**record, "note": "d\u00e9j\u00e0 vu"}, ensure_ascii=False), encoding="utf-8")
    before = snapshot(existing_run)
    proc = run_cli("--data_root", str(cifar10_root), "--output_dir", str(existing_run), "--resume", *TINY,
                   env=ascii_locale_env())
    assert (proc.returncode, proc.stdout) == (0, f"{existing_run} already finished 2 epochs; nothing to do\n"), \
        proc.stderr
    assert snapshot(existing_run) == before


def test_a_full_disk_under_the_tensorboard_events_is_one_line(tmp_path, cifar10_root, monkeypatch, capsys):
    """The events file's writes fail once epoch 1 is saved (the disk filled up): one line naming the folder, exit 2,
    no traceback from TensorBoard's writer thread or from the next write, and epoch 1's checkpoint kept."""
    import errno
    import threading

    from tensorboard.summary.writer import record_writer

    out = tmp_path / "run"
    real_write = record_writer.RecordWriter.write

    def disk_full_after_epoch_1(self, data):
        if (out / "last.pt").exists():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(self, data)

    monkeypatch.setattr(record_writer.RecordWriter, "write", disk_full_after_epoch_1)
    thread_errors = []  # what would be a thread's traceback on stderr
    monkeypatch.setattr(threading, "excepthook", thread_errors.append)
    code, err = call_main(["--data_root", str(cifar10_root), "--output_dir", str(out), *TINY], capsys)
    assert_one_line_error(code, err, f"could not write TensorBoard events in {out}: No space left on device",
                          "--resume continues the run")
    assert code == 2 and thread_errors == [] and threading.excepthook == thread_errors.append
    assert util.load_checkpoint(out / "last.pt")["run"]["epoch"] >= 1


@pytest.mark.parametrize("when", ["at the start", "a checkpoint fails first", "after the run finished"])
def test_tensorboard_failures_beside_other_ends_of_a_run(when, tmp_path, cifar10_root, monkeypatch, capsys):
    """The events file fails at the start (the writer's first flush): one line, the hook put back. A checkpoint
    write that fails first is what the run says, not the events file's failing close. Failing only in the last
    close, after results.json: the run finished (exit 0), with a warning that its events may lack their end."""
    import errno
    import threading

    from tensorboard.summary.writer import record_writer

    out = tmp_path / "run"
    real_write, real_flush = record_writer.RecordWriter.write, record_writer.RecordWriter.flush
    real_atomic_write = util.atomic_write

    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if when == "at the start":
        monkeypatch.setattr(record_writer.RecordWriter, "write", full)
    elif when == "a checkpoint fails first":  # then the events file: its writes, its close
        failed = []
        monkeypatch.setattr(util, "atomic_write", lambda path, write: (failed.append(path), full()) if
                            str(path).endswith(".pt") else real_atomic_write(path, write))
        monkeypatch.setattr(record_writer.RecordWriter, "flush", lambda self: full() if failed else real_flush(self))
    else:
        monkeypatch.setattr(record_writer.RecordWriter, "flush", lambda self: full() if (out / "results.json").exists()
                            else real_flush(self))
    thread_errors = []
    monkeypatch.setattr(threading, "excepthook", thread_errors.append)
    code, err = call_main(["--data_root", str(cifar10_root), "--output_dir", str(out), *TINY], capsys)
    assert threading.excepthook == thread_errors.append and thread_errors == []
    if when == "at the start":
        assert_one_line_error(code, err, f"could not write TensorBoard events in {out}: No space left on device")
    elif when == "a checkpoint fails first":
        assert_one_line_error(code, err, f"could not write checkpoint {out}", "No space left on device")
    else:
        assert code == 0 and (out / "results.json").is_file()
        assert err.strip().splitlines() == [
            f"warning: could not write TensorBoard events in {out}: No space left on device; the run finished and its "
            f"results.json is complete, but its TensorBoard events may lack their last records"]


def test_results_that_cannot_be_read_at_all_are_not_written_over(tmp_path, monkeypatch):
    """Permission denied, say: the file may be whole, so it is an error, not damage to write over."""
    results = tmp_path / "results.json"
    results.write_text("{}")

    def denied(path, *args, **kwargs):  # (the tests run as root, whom a file's mode does not stop)
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(util, "read_json", denied)
    with pytest.raises(main.UserError, match=f"cannot read {results}: Permission denied"):
        main.results_problem(results)


def test_a_new_events_file_never_shares_its_second_with_an_earlier_one(tmp_path):
    """TensorBoard orders a folder's event files by name, whose parts after the second are not zero-padded (.10
    before .9): a writer starts only once the second of an earlier file there has passed, so that its purge of
    the earlier records applies (two sessions within a second: a test's runs in one process, say)."""
    now = int(time.time())
    (tmp_path / f"{main.EVENTS_PREFIX}{now:010d}.host.99.9").write_bytes(b"")
    main.after_the_second_of_an_earlier_file(tmp_path)
    assert int(time.time()) > now
    main.after_the_second_of_an_earlier_file(tmp_path / "missing")  # (the writer makes the folder)


def test_a_failure_before_the_first_step_closes_the_events_writer(tmp_path, cifar10_root, monkeypatch, capsys):
    """An error between the events writer's start and the training loop (its HParams records, say) closes it and
    puts the threads' hook back, as an error in the loop does."""
    import threading

    closed = []
    real_close = main.EventWriter.close
    monkeypatch.setattr(main.EventWriter, "close", lambda self: closed.append(1) or real_close(self))
    monkeypatch.setattr(main.Run, "write_hparams", lambda self, when: (_ for _ in ()).throw(main.UserError("no")))
    hook = threading.excepthook
    code, err = call_main(["--data_root", str(cifar10_root), "--output_dir", str(tmp_path / "run"), *TINY], capsys)
    assert_one_line_error(code, err, "error: no")
    assert closed == [1] and threading.excepthook is hook


def test_the_writer_threads_hook_passes_on_what_is_not_its_own():
    """Only an OSError of TensorBoard's writer thread is left to the next write; anything else reaches the hook
    that was there before."""
    import threading
    from types import SimpleNamespace

    from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread

    writer, seen = main.EventWriter.__new__(main.EventWriter), []
    writer.previous_hook = seen.append
    plain = threading.Thread(target=lambda: None)
    tensorboard_thread = _AsyncWriterThread.__new__(_AsyncWriterThread)
    for thread, error in ((plain, OSError(28, "full")), (tensorboard_thread, ValueError("x")),
                          (tensorboard_thread, OSError(28, "full"))):
        writer.writer_thread_failed(SimpleNamespace(thread=thread, exc_value=error))
    assert [(type(a.thread).__name__, type(a.exc_value).__name__) for a in seen] == [
        ("Thread", "OSError"), ("_AsyncWriterThread", "ValueError")]


@pytest.mark.parametrize("sessions, amp, world_size, note", [
    ([{"amp": True, "world_size": 2}], True, 2, None),
    ([{"amp": True, "world_size": 2}], True, 1,
     'note: this run trained with 2 processes so far and goes on with 1 process: its results.json will say '
     '"world_size": "mixed"'),
    ([{"amp": False, "world_size": 1}, {"amp": True, "world_size": 4}], True, 4,
     'note: this run trained with --no-amp and --amp, 1 process and 4 processes so far and goes on with --amp, '
     '4 processes: its results.json will say "amp": "mixed" and "world_size": "mixed"'),
    ([{"amp": True, "world_size": None}], False, 8,  # from before sessions were recorded, processes unknown
     'note: this run trained with --amp so far and goes on with --no-amp: its results.json will say "amp": "mixed"'),
    ([], False, 1, None),  # nothing trained yet
])
@pytest.mark.parametrize("evaluates_only", [False, True])
def test_a_resume_that_mixes_precisions_or_processes_says_so(sessions, amp, world_size, note, evaluates_only):
    """The note before the resume and results.json's values after it agree (mixed_setting, once this session's
    entry is in). A session that only evaluates (trained to the end before) mixes the precision, which its results
    come from, but not the number of processes: results.json then keeps the training's."""
    if evaluates_only and note and '"world_size"' in note:  # that part of the note goes
        note = None if '"amp"' not in note else (
            'note: this run trained with --no-amp and --amp so far and goes on with --amp: its results.json will say '
            '"amp": "mixed"')
    assert main.mixed_note(sessions, amp, world_size, evaluates_only) == note
    state = main.RunState()
    state.sessions = [*sessions, {"amp": amp, "world_size": world_size, **({"evaluated_only": True}
                                                                            if evaluates_only else {})}]
    recorded = {key: main.mixed_setting(state, key, now) for key, now in (("amp", amp), ("world_size", world_size))}
    trained_on = {s["world_size"] for s in sessions if s["world_size"] is not None}
    if evaluates_only:  # the training's number of processes, or "mixed" where the training had several
        expected = "mixed" if len(trained_on) > 1 else next(iter(trained_on), world_size)
    else:
        expected = "mixed" if note and '"world_size"' in note else world_size
    assert recorded == {"amp": "mixed" if note and '"amp"' in note else amp, "world_size": expected}


def test_a_resume_with_another_layout_or_cpu_thread_count_says_so(tmp_path, cifar10_root, monkeypatch, capsys):
    """Stopped after epoch 1 of 2 and resumed with --no-channels_last and one CPU thread instead of two (OMP_NUM_THREADS,
    taskset or a cgroup change it without a word): each changes the last bits of every step, so the resume says so;
    results.json's channels_last is "mixed", as amp is for a change of precision."""
    import signal

    out = tmp_path / "run"
    argv = ["--data_root", str(cifar10_root), "--output_dir", str(out), *TINY]

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with monkeypatch.context() as m:
            m.setattr(main.Run, "agreed_signal", sigterm_after_epoch_1)
            code, err = call_main(argv + ["--channels_last"], capsys)
        assert code == 128 + signal.SIGTERM, err
        torch.set_num_threads(1)
        code = main.main(argv + ["--resume", "--no-channels_last"])
    finally:
        torch.set_num_threads(threads)
    out_text, err = capsys.readouterr()
    assert code == 0, err
    lines = out_text.splitlines()
    assert ("note: this run trained on cpu (2 threads) until it stopped and goes on on cpu (1 thread), which rounds in "
            "its own order: from here on its steps are not bitwise those of a run never stopped (results.json's "
            "sessions say which part ran where)") in lines
    assert ('note: this run trained with --channels_last so far and goes on with --no-channels_last: its '
            'results.json will say "channels_last": "mixed"') in lines
    res = json.loads((out / "results.json").read_text())
    assert res["channels_last"] == "mixed" and res["amp"] in (True, False)
    assert [(s["channels_last"], s["device"]) for s in res["sessions"]] == [(True, "cpu (2 threads)"),
                                                                            (False, "cpu (1 thread)")]


def test_a_resume_that_compiles_where_the_run_did_not_says_so(tmp_path, cifar10_root, monkeypatch, capsys):
    """Compiled and eager steps round differently: a run stopped after epoch 1 of 2 under --compile and resumed
    without it (or in another --compile_mode) says so, and results.json's config says "compile": "mixed"; each
    session records how it compiled. (torch.compile is stood in for: what is recorded does not depend on it.)"""
    import signal

    monkeypatch.setattr(torch, "compile", lambda fn, mode=None: fn)
    out = tmp_path / "run"
    argv = ["--data_root", str(cifar10_root), "--output_dir", str(out), *TINY]

    with monkeypatch.context() as m:
        m.setattr(main.Run, "agreed_signal", sigterm_after_epoch_1)
        code, err = call_main(argv + ["--compile"], capsys)
    assert code == 128 + signal.SIGTERM, err
    code = main.main(argv + ["--resume"])
    out_text, err = capsys.readouterr()
    assert code == 0, err
    assert ('note: this run trained with --compile --compile_mode default so far and goes on with no --compile: its '
            'results.json will say "compile": "mixed"') in out_text.splitlines()
    res = json.loads((out / "results.json").read_text())
    assert [s["compile"] for s in res["sessions"]] == ["default", False]
    assert res["config"]["compile"] == "mixed"
    # Trained compiled to the end, evaluated again without --compile: the config says how it was trained.
    (out / "results.json").unlink()
    state = torch.load(out / "last.pt", weights_only=False)
    state["run"]["sessions"] = [{**s, "compile": "default"} for s in state["run"]["sessions"]]
    torch.save(state, out / "last.pt")
    code = main.main(argv + ["--resume"])
    out_text, err = capsys.readouterr()
    assert code == 0 and not any("compile" in line for line in out_text.splitlines() if line.startswith("note:"))
    res = json.loads((out / "results.json").read_text())
    assert (res["config"]["compile"], res["config"]["compile_mode"]) == (True, "default")


def test_mixed_note_names_how_each_session_compiled():
    sessions = [{"compile": False}, {"compile": "max-autotune-no-cudagraphs"}]
    assert main.mixed_note(sessions, True, 1, False, compile_mode="default") == (
        "note: this run trained with no --compile and --compile --compile_mode max-autotune-no-cudagraphs so far and "
        "goes on with --compile --compile_mode default: its results.json will say \"compile\": \"mixed\"")
    assert main.mixed_note(sessions[1:], True, 1, False, compile_mode="max-autotune-no-cudagraphs") is None
    assert main.mixed_note(sessions, True, 1, True, compile_mode=False) is None  # an evaluation compiles nothing


def test_device_note():
    """Said where a resume trains on another device than the run's last session recorded; not where it goes on on
    the device of the last (which changed earlier, and was said then), not for an evaluation of a trained run, nor
    for sessions from before devices were recorded (None)."""
    sessions = [{"device": "cuda (NVIDIA H100 80GB HBM3)"}, {"device": None}]
    assert main.device_note(sessions, "cuda (NVIDIA H100 80GB HBM3)", evaluates_only=False) is None
    assert main.device_note(sessions, "cuda (NVIDIA H200)", evaluates_only=True) is None
    assert main.device_note([{"device": None}], "cpu (2 threads)", evaluates_only=False) is None
    assert main.device_note(sessions, "cuda (NVIDIA H200)", evaluates_only=False).startswith(
        "note: this run trained on cuda (NVIDIA H100 80GB HBM3) until it stopped and goes on on cuda (NVIDIA H200), ")
    changed = [{"device": "cpu (2 threads)"}, {"device": "cpu (1 thread)"}]
    assert main.device_note(changed, "cpu (1 thread)", evaluates_only=False) is None
    assert "trained on cpu (1 thread) until it stopped and goes on on cpu (2 threads)" in main.device_note(
        changed, "cpu (2 threads)", evaluates_only=False)


def test_a_resume_that_mixes_eval_every_or_synchronised_batch_norm_says_so():
    """--eval_every (the epochs a best is picked from) and batch norm synchronised across processes or not are noted
    like the precision, but an evaluation of a trained run depends on neither; a session from before they were
    recorded (None) mixes nothing."""
    sessions = [{"amp": True, "world_size": 2, "eval_every": 5, "sync_bn": True},
                {"amp": True, "world_size": 2, "eval_every": None, "sync_bn": None}]
    note = main.mixed_note(sessions, True, 2, False, eval_every=1, sync_bn=False)
    assert note == ('note: this run trained with --eval_every 5, batch norm synchronised across processes so far and '
                    'goes on with --eval_every 1, batch norm per process: its results.json will say "eval_every": '
                    '"mixed" and "sync_bn": "mixed"')
    assert main.mixed_note(sessions, True, 2, True, eval_every=1, sync_bn=False) is None
    assert main.mixed_note(sessions, True, 2, False, eval_every=5, sync_bn=True) is None
    state = main.RunState()
    state.sessions = [*sessions, {"amp": True, "world_size": 1, "eval_every": 1, "sync_bn": False,
                                  "evaluated_only": True}]
    assert {key: main.mixed_setting(state, key, None) for key in ("eval_every", "sync_bn", "world_size")} == \
        {"eval_every": 5, "sync_bn": True, "world_size": 2}
    state.sessions[1] = {**state.sessions[1], "eval_every": 1, "sync_bn": False}
    assert {key: main.mixed_setting(state, key, None) for key in ("eval_every", "sync_bn")} == \
        {"eval_every": "mixed", "sync_bn": "mixed"}


@pytest.mark.parametrize("sessions, commit, torch_version, note", [
    ([{"git_commit": "a1", "torch_version": "2.4.1"}], "a1", "2.4.1", None),
    ([{"git_commit": "a1", "torch_version": "2.4.1"}], "a1", "2.14.1",
     "note: this run trained with torch 2.4.1 so far and goes on with torch 2.14.1: results.json's sessions will "
     "say which part ran which"),
    ([{"git_commit": "b2", "torch_version": "2.4.1"}, {"git_commit": "a1", "torch_version": "2.4.1"}], "a1-dirty",
     "2.4.1", "note: this run trained with commit a1 and b2 so far and goes on with commit a1-dirty: results.json's "
     "sessions will say which part ran which"),
    ([{"git_commit": "a1", "torch_version": "2.4.1"}], None, "2.4.1", None),  # this code's commit unknown
    ([{"git_commit": "65c6cb7", "torch_version": "2.4.1"}], "65c6cb7" + "0" * 33, "2.4.1", None),  # short and full
    ([{"git_commit": "65c6cb7", "torch_version": "2.4.1"}], "65c6cb7" + "0" * 33 + "-dirty", "2.4.1",
     f"note: this run trained with commit 65c6cb7 so far and goes on with commit 65c6cb7{'0' * 33}-dirty: "
     "results.json's sessions will say which part ran which"),
    ([{"git_commit": None, "torch_version": None}], "a1", "2.4.1", None),  # unknown before (earlier_session)
    ([{"amp": True}], "a1", "2.4.1", None),  # an entry written before sessions recorded either
    ([], "a1", "2.4.1", None),  # nothing trained yet
])
def test_a_resume_with_other_code_or_torch_says_so(sessions, commit, torch_version, note):
    assert main.code_note(sessions, commit, torch_version) == note


def test_other_class_sizes_of_a_hundred_classes_are_summed_up():
    """CIFAR-100's 100 class sizes, twice, would make a line of some 900 characters: totals and ends instead."""
    then, now = [120 - c for c in range(100)], [20 - c // 10 for c in range(100)]
    with pytest.raises(main.UserError) as caught:
        main.check_same_data({"class_counts": then}, now, Path("run/last.pt"))
    assert str(caught.value) == ("run/last.pt was trained on 7,050 images in 100 classes (120 down to 21), but the "
                                 "data under --data_root gives 1,550 images in 100 classes (20 down to 11) at its "
                                 "imbalance settings: not the data it was trained on")
    main.check_same_data({"class_counts": then}, then, Path("run/last.pt"))  # the same sizes pass


@pytest.mark.parametrize("finished_run", ["sc"], indirect=True)
def test_resume_on_another_copy_with_the_same_class_sizes_is_refused(existing_run, cifar10_root, tmp_path, capsys):
    """Other pixels, the same class sizes (as the JPEG copy of CIFAR-10 against the original): the images' digest
    in last.pt tells them apart. A last.pt from before the digest was saved is taken at its word."""
    write_pickled_cifar10(tmp_path / "other", *make_synthetic(10, N_TRAIN, N_TEST, seed=1))
    (existing_run / "results.json").unlink()
    before = snapshot(existing_run)
    code, err = call_main(["--data_root", str(tmp_path / "other"), "--output_dir", str(existing_run), "--resume",
                           *TINY], capsys)
    assert_one_line_error(code, err, "last.pt was trained on other images than those --data_root gives",
                          "the same class sizes")
    assert snapshot(existing_run) == before
    saved = torch.load(existing_run / "last.pt", weights_only=False)
    assert len(saved["train_digest"]) == 64
    del saved["train_digest"]
    torch.save(saved, existing_run / "last.pt")
    code, err = call_main(["--data_root", str(tmp_path / "other"), "--output_dir", str(existing_run), "--resume",
                           *TINY], capsys)
    assert code == 0, err
    assert (existing_run / "results.json").is_file()
    # The digest itself: order, pixels and labels all count.
    train, _ = make_synthetic(3, 4, 1, seed=0)
    flipped = train.images.copy()
    flipped[0, 0, 0, 0] ^= 1
    relabelled = train.labels.copy()
    relabelled[[0, -1]] = relabelled[[-1, 0]]
    digests = {train.digest(), ArraySplit(flipped, train.labels).digest(), ArraySplit(train.images, relabelled).digest(),
               ArraySplit(train.images[::-1], train.labels[::-1]).digest()}
    assert len(digests) == 4 and train.digest() == ArraySplit(train.images.copy(), train.labels.copy()).digest()


def test_auto_device_on_the_cpu_despite_cuda_visible_devices_says_so(cifar10_root, tmp_path, capsys, monkeypatch):
    """A CUDA_VISIBLE_DEVICES that names GPUs while none is available (a typo hides them all): --device auto trains
    on the CPU, and says so at the start; not when the variable is empty or unset, nor for --device cpu."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "O")
    # The last --device wins (argparse), over TINY's cpu.
    args = ["--data_root", str(cifar10_root), *TINY, "--device", "auto", "--output_dir", str(tmp_path / "a")]
    assert main.main(args) == 0
    out = capsys.readouterr().out
    assert "note: CUDA_VISIBLE_DEVICES=O but no CUDA device is available: training on the CPU" in out
    assert main.hidden_gpu_note("cpu", torch.device("cpu")) is None
    assert main.hidden_gpu_note("auto", torch.device("cuda", 0)) is None
    for value in ("", " "):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
        assert main.hidden_gpu_note("auto", torch.device("cpu")) is None
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert main.hidden_gpu_note("auto", torch.device("cpu")) is None


def test_output_dir_that_is_not_utf8_is_refused_before_anything_is_written(tmp_path, capsys, cifar10_root):
    """A byte that is not UTF-8 in the folder's name (Python hands it on as a lone surrogate) made TensorBoard's
    writer fail after config.json was written."""
    out = tmp_path / "run\udcff"
    code, err = call_main(["--data_root", str(cifar10_root), "--output_dir", str(out), *TINY], capsys)
    assert_one_line_error(code, err, "--output_dir is not valid UTF-8")
    assert list(tmp_path.iterdir()) == []


def test_real_cli_bad_input_has_no_traceback(tmp_path, cifar10_root):
    proc = run_cli("--data_root", str(cifar10_root), "--imb_factor", "2", "--output_dir", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr and not (tmp_path / "o").exists()


def test_tensorboard_has_scalars_figures_and_projections(finished_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    loss, out, _ = finished_run
    scalars, images = set(), set()
    for events in out.glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events), size_guidance={"images": 0, "scalars": 0})
        acc.Reload()
        scalars |= set(acc.Tags()["scalars"])
        images |= set(acc.Tags()["images"])
    for tag in ("loss/total", "loss/ce", "train/lr", "train/samples_per_s",
                "test/top1", "test/medium", "test/few", "test_per_class/000", "test_per_class/009", "test/ncm_top1"):
        assert tag in scalars, tag
    for tag in ("loss/feature", "train/alpha"):  # no flat zero lines for a CE run, which has no feature branch
        assert (tag in scalars) == (loss != "ce"), tag
    assert "test/many" not in scalars  # no many-shot class in this tiny set: nothing to log
    for tag in ("last/confusion_matrix", "last/per_class_accuracy_vs_class_size", "best/confusion_matrix",
                "best/per_class_accuracy_vs_class_size"):
        assert tag in images, tag
    projector = out / "projector_config.pbtxt"
    assert projector.exists() == (loss != "ce")  # the CE baseline has no trained projection head
    if loss != "ce":
        header, *rows = next(out.rglob("metadata.tsv")).read_text().splitlines()
        assert header == "label\tclass" and len(rows) == 10 * N_TEST  # labels and names (batches.meta's)
        assert sorted(set(rows)) == [f"{c}\tclass_{c}" for c in range(10)]


@pytest.mark.parametrize("meta", ["a tab in a name", "no batches.meta", "a class folder's name not UTF-8"])
def test_the_projectors_metadata_names_the_classes_where_the_data_does(meta, tmp_path, capsys):
    """metadata.tsv: a column of labels and one of class names, a name's tab or newline made a space (they would
    break the TSV) and a class folder's undecodable byte shown as an escape (TensorBoard's UTF-8 write of it failed
    the run at its end); one column of labels where the data names no classes."""
    import pickle
    root = tmp_path / "data"
    split = make_synthetic(10, N_TRAIN, N_TEST, seed=0)
    names = [f"class_{c}" for c in range(10)]
    if meta == "a class folder's name not UTF-8":
        names[9] = "class_9\udcff"  # the byte 0xff, as os.listdir gives it back (surrogateescape)
        write_image_folder(root, *split, class_names=names)
    else:
        write_pickled_cifar10(root, *split)
        meta_file = root / "cifar-10-batches-py" / "batches.meta"
        if meta == "no batches.meta":
            meta_file.unlink()
        else:
            names[0] = "air plane"
            meta_file.write_bytes(pickle.dumps({b"label_names": [b"air\tplane", *(n.encode() for n in names[1:])]}))
    out = tmp_path / "run"
    assert call_main(["--data_root", str(root), "--output_dir", str(out), *TINY, "--epochs", "1",
                      "--lr_decay_epochs", ""], capsys)[0] == 0
    lines = next(out.rglob("metadata.tsv")).read_text().splitlines()
    if meta == "no batches.meta":
        assert sorted(set(lines)) == [str(c) for c in range(10)] and len(lines) == 10 * N_TEST
    else:
        assert lines[0] == "label\tclass" and len(lines) == 1 + 10 * N_TEST
        shown = [*names[:9], "class_9\\udcff"] if meta != "a tab in a name" else names
        assert sorted(set(lines[1:])) == [f"{c}\t{name}" for c, name in enumerate(shown)]


def test_an_interval_of_only_the_untimed_first_step_logs_no_rate(tmp_path, cifar10_root):
    """--print_freq 1: the first interval is the session's first step alone, which is not timed (its one-off
    costs): no train/samples_per_s point there (it was a false 0.0), one at every later step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "run"
    proc = run_cli("--data_root", str(cifar10_root), "--output_dir", str(out), *TINY, "--print_freq", "1",
                   "--epochs", "1", "--lr_decay_epochs", "")
    assert proc.returncode == 0, proc.stderr[-3000:]
    [events] = out.glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
    acc.Reload()
    rates = acc.Scalars("train/samples_per_s")
    assert [e.step for e in rates] == list(range(2, 10)) and all(e.value > 0 for e in rates)
    assert [e.step for e in acc.Scalars("loss/total")] == list(range(1, 10))


def test_an_epoch_of_only_the_untimed_first_step_has_no_rate(tmp_path, cifar10_root):
    """An epoch of one step: the first epoch's only step is the session's untimed first step, so its history entry
    and its epoch line have no rate (they showed a false 0); the second epoch's step is timed."""
    out = tmp_path / "run"
    proc = run_cli("--data_root", str(cifar10_root), "--output_dir", str(out), *TINY, "--batch_size", "128",
                   "--lr_decay_epochs", "")
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = json.loads((out / "results.json").read_text())["history"]
    assert [e["samples_per_s"] is None for e in history] == [True, False] and history[1]["samples_per_s"] > 0
    epoch_lines = [line for line in proc.stdout.splitlines() if line.startswith("epoch ")]
    assert ["| - samples/s |" in line for line in epoch_lines] == [True, False], epoch_lines


def test_tensorboard_hparams_hold_the_recipe_and_the_results(finished_run):
    """TensorBoard's HParams tab: the experiment lists every recipe setting (so runs of every loss share its
    columns) and metrics that are scalars of the run; the run's session holds the settings its loss reads, with
    defaults resolved, and ends as a success; the metrics' last values are results.json's last and best top-1."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import api_pb2, metadata

    loss, out, _ = finished_run
    res = json.loads((out / "results.json").read_text())
    [events] = out.glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    content = acc.PluginTagToContent(metadata.PLUGIN_NAME)
    assert sorted(content) == sorted([metadata.EXPERIMENT_TAG, metadata.SESSION_START_INFO_TAG,
                                      metadata.SESSION_END_INFO_TAG])
    experiment = metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG])
    assert [h.name for h in experiment.hparam_infos] == ["imbalance_ratio", *main.COMPARED_ON_RESUME, "world_size"]
    # The settings a sweep varies are marked as differing, so the tab shows them first; choices offer a filter.
    infos = {h.name: h for h in experiment.hparam_infos}
    assert {name for name, h in infos.items() if h.differs} == set(main.HPARAMS_SWEPT)
    assert [v.string_value for v in infos["loss"].domain_discrete.values] == ["sc", "psc", "ce"]
    assert not infos["learning_rate"].HasField("domain_discrete")
    metrics = [m.name.tag for m in experiment.metric_infos]
    assert metrics == list(main.HPARAM_METRICS)
    assert set(metrics) - set(acc.Tags()["scalars"]) == {"test/many"}  # no many-shot class in this tiny set

    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    values = {k: v.number_value if v.HasField("number_value") else v.string_value for k, v in start.hparams.items()}
    unread = {k for k, losses_ in main.USED_BY.items() if loss not in losses_}
    assert set(values) == {"imbalance_ratio", *main.COMPARED_ON_RESUME, "world_size"} - unread
    cfg = res["config"]
    expected = {"imbalance_ratio": 10.0, "loss": loss, "dataset": "cifar10", "model": "resnet8", "batch_size": 16,
                "learning_rate": 0.05, "lr_decay_epochs": "1", "epochs": 2, "seed": 0, "world_size": 1,
                "ce_sampler": "instance" if loss == "ce" else "class"}
    expected.update({"sc": {"temp": 0.1, "base_temp": 0.1}, "psc": {"psc_temp": 1.0, "psc_denominator": "negatives"},
                     "ce": {}}[loss])
    assert {k: values[k] for k in expected} == pytest.approx(expected)
    assert values["weight_decay"] == pytest.approx(cfg["weight_decay"]) and values["imb_type"] == cfg["imb_type"]
    end = metadata.parse_session_end_info_plugin_data(content[metadata.SESSION_END_INFO_TAG])
    assert end.status == api_pb2.STATUS_SUCCESS
    assert acc.Scalars("test/top1")[-1].value == pytest.approx(res["last_top1"])
    best = [e.value for e in acc.Scalars("test/best_top1")]
    assert best[-1] == pytest.approx(res["best_top1"]) and best == sorted(best)


def test_history_lr_loss_and_best_epoch_are_those_of_the_steps(finished_run):
    """Each epoch's history entry holds the lr of util.learning_rate's schedule at its last step (--lr_decay_epochs 1:
    0.05, then 0.005), as the logged per-interval lr does at every logged step; its train, feature and CE losses
    are the means over its steps, which are the means of its three logged intervals (--print_freq 3, 9 equal
    steps); best_top1 is the highest top-1 of the evaluated epochs, best_epoch the first to reach it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    _, out, _ = finished_run
    res = json.loads((out / "results.json").read_text())
    cfg = res["config"]
    steps = json.loads((out / "config.json").read_text())["train_size"] // 16  # per epoch, at --batch_size 16
    assert steps == 9

    def lr(step: int) -> float:
        return util.learning_rate(step, base_lr=cfg["learning_rate"], steps_per_epoch=steps,
                                  warm_epochs=cfg["warm_epochs"], decay_epochs=cfg["lr_decay_epochs"],
                                  decay_rate=cfg["lr_decay_rate"])

    history = res["history"]
    assert [h["lr"] for h in history] == [lr(e * steps - 1) for e in (1, 2)] == pytest.approx([0.05, 0.005])
    [events] = out.glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
    acc.Reload()
    logged_lr = acc.Scalars("train/lr")
    assert [e.step for e in logged_lr] == [3, 6, 9, 12, 15, 18]  # after steps 3, 6, 9 of each epoch
    assert [e.value for e in logged_lr] == pytest.approx([lr(e.step - 1) for e in logged_lr], rel=1e-6)
    for key, tag in (("train_loss", "loss/total"), ("feature_loss", "loss/feature"), ("ce_loss", "loss/ce")):
        if res["method"] == "ce" and key == "feature_loss":
            assert all(h[key] == 0.0 for h in history)  # (results.json keeps the column, TensorBoard no zero line)
            continue
        logged = [e.value for e in acc.Scalars(tag)]
        means = [sum(logged[3 * i:3 * i + 3]) / 3 for i in range(2)]
        assert [h[key] for h in history] == pytest.approx(means, rel=1e-5, abs=1e-6), key
    top1s = [h["top1"] for h in history if "top1" in h]
    assert len(top1s) == 2 and res["best_top1"] == max(top1s)
    assert res["best_epoch"] == next(h["epoch"] for h in history if h.get("top1") == max(top1s))


def test_overwrite_removes_every_file_of_the_run_and_nothing_else(finished_run, tmp_path):
    """--overwrite clears a finished run's files (TensorBoard's projector folders included, so a new run with
    another step count leaves no orphans) and keeps what the user put in the folder."""
    _, out, _ = finished_run
    folder = tmp_path / "run"
    shutil.copytree(out, folder)
    (folder / "notes.txt").write_text("mine")
    (folder / "plots").mkdir()
    (folder / "12345").mkdir()  # a folder with a step-like name but no projections of ours
    (folder / "12345" / "mine.tsv").write_text("mine")
    main.prepare_output_dir(folder, overwrite=True)
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) == [
        "12345", "12345/mine.tsv", "notes.txt", "plots"]


def test_git_commit_is_the_callers_then_the_checkouts(tmp_path, monkeypatch):
    """A copy of the tree without .git records $GIT_COMMIT, or None; inside a checkout $GIT_COMMIT, when set, wins
    over the checkout's own commit (a copy's .git can be stale), and the checkout's commit is the fallback."""
    for name in ("main.py", "losses.py", "dataset_loader.py", "util.py"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "networks", tmp_path / "networks", ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env["GIT_CEILING_DIRECTORIES"] = str(tmp_path.parent)  # no checkout above tmp_path is found either
    # One process (importing torch is most of its time) reads the variable set, unset and empty in turn.
    code = ("import os, main\n"
            "for value in ('0123abc', None, ''):\n"
            "    os.environ.pop('GIT_COMMIT', None) if value is None else os.environ.update(GIT_COMMIT=value)\n"
            "    print(main.git_commit())\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout.split() == ["0123abc", "None", "None"], proc.stderr[-2000:]
    monkeypatch.delenv("GIT_COMMIT", raising=False)  # the caller's own, if any
    inside = main.git_commit()
    if inside is None:
        pytest.skip("the tests do not run from a git checkout")
    monkeypatch.setenv("GIT_COMMIT", "0123abc")
    assert main.git_commit() == "0123abc" != inside
    monkeypatch.setenv("GIT_COMMIT", "")
    assert main.git_commit() == inside


def test_readme_documents_every_flag():
    readme = (ROOT / "README.md").read_text()
    for action in main.get_args_parser()._actions:
        for flag in action.option_strings:
            if flag.startswith("--") and flag != "--help" and not flag.startswith("--no-"):
                assert f"`{flag}`" in readme, flag


@pytest.mark.parametrize("factor", ["inf", "1.0000001"])
def test_an_imb_factor_above_1_gets_no_hint_that_would_be_refused_too(factor):
    with pytest.raises(main.UserError) as caught:
        main.parse_config(["--imb_factor", factor])
    assert str(caught.value).endswith(f"got {float(factor)}")  # no "--imb_factor 0" or "--imb_factor 1" to try


@pytest.mark.parametrize("epochs, decays", [(200, "120,160"), (20, "12,16"), (4, "2,3"), (3, None), (2, None),
                                            (1, None)])
def test_a_short_run_is_told_where_the_papers_lr_decays_fall(epochs, decays):
    hint = main.paper_decay_hint(epochs)
    assert hint == ("" if decays is None else f"; the paper's decays, after 60 % and 80 % of its run, are "
                                              f"--lr_decay_epochs {decays} here")
    if decays is not None:  # a schedule the run takes
        main.parse_config(["--epochs", str(epochs), "--lr_decay_epochs", decays])


def test_readme_flag_table_gives_each_default_and_choice():
    """The README's table of flags lists every Config field once, in Config's order, with its default as the flag
    takes it (off for a switch, auto or - where main.py decides, a list comma-separated) and all its choices."""
    rows = re.findall(r"^\| `--(\w+)` \| `([^`]*)` \| (.*) \|$", (ROOT / "README.md").read_text(), re.M)
    fields = dataclasses.fields(main.Config)
    assert [name for name, _, _ in rows] == [f.name for f in fields]
    for f, (name, shown, meaning) in zip(fields, rows):
        if f.default is None:
            assert shown in ("auto", "-"), name
        elif isinstance(f.default, bool):
            assert shown == ("on" if f.default else "off"), name
        else:
            assert shown == main.flag_text(list(f.default) if isinstance(f.default, tuple) else f.default), name
        if "choices" in f.metadata:
            assert f"({' / '.join(f.metadata['choices'])})" in meaning, name


@pytest.mark.parametrize("loss, unused", [
    ("ce", ["--sc_sampler", "class", "--sc_aug", "supcon", "--bn_stats", "joint", "--temp", "0.5",
            "--base_temp", "0.07", "--psc_temp", "0.3", "--psc_denominator", "all", "--alpha_schedule", "equal"]),
    ("sc", ["--psc_temp", "0.3", "--psc_denominator", "all"]),
    ("psc", ["--temp", "0.5", "--base_temp", "0.07"]),
])
def test_settings_a_loss_does_not_read_leave_its_run_alone(loss, unused):
    """Flags main.USED_BY lists for other losses change nothing in a run of this one (the same steps, bit for bit),
    so its checkpoint resumes whatever they say; a flag it reads still has to match."""
    import dataclasses

    assert {flag[2:] for flag in unused[::2]} == {k for k, losses_ in main.USED_BY.items() if loss not in losses_}
    assert sorted(main.unread_settings(main.parse_config(["--loss", loss, *unused]))) == sorted(f[2:] for f in unused[::2])
    assert main.unread_settings(main.parse_config(["--loss", loss])) == []
    train, _ = make_synthetic(num_classes=4, n_train_per_class=16, n_test_per_class=2)
    common = ["--device", "cpu", "--model", "resnet8", "--batch_size", "8", "--loss", loss, "--no-amp"]
    cfg, other = main.parse_config(common), main.parse_config(common + unused)
    runs = []
    for c in (cfg, other):
        trainer = main.Trainer(c, train, 4, torch.device("cpu"))
        batches = trainer.stream.epoch(0)
        totals = [trainer.step(next(batches), alpha=0.5, lr=0.1).total.item() for _ in range(2)]
        runs.append((totals, [p.detach().clone() for p in trainer.model.parameters()]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    saved = {"num_classes": 4, "config": dataclasses.asdict(cfg)}
    main.check_compatible(saved, other, Path("last.pt"), 4)  # no error
    read = {"ce": ["--ce_sampler", "sqrt"], "sc": ["--temp", "0.5"], "psc": ["--psc_temp", "0.3"]}[loss]
    with pytest.raises(main.UserError, match=f"{read[0]} .* -> {read[1]}"):
        main.check_compatible(saved, main.parse_config(common + read), Path("last.pt"), 4)


@pytest.mark.parametrize("argv, method, temperature, exclude_positive, base_temperature", [
    (["--loss", "sc"], "sc", 0.1, True, None),
    (["--loss", "sc", "--temp", "0.5", "--base_temp", "0.07"], "sc", 0.5, True, 0.07),
    (["--loss", "psc"], "psc", 1.0, True, None),
    (["--loss", "psc", "--dataset", "cifar100"], "psc", 0.1, True, None),
    (["--loss", "psc", "--psc_temp", "0.3", "--psc_denominator", "all", "--temp", "0.5"], "psc", 0.3, False, None),
    (["--loss", "ce"], "ce", 0.1, True, None),
])
def test_loss_flags_reach_the_criterion(argv, method, temperature, exclude_positive, base_temperature):
    """The temperature, PSC denominator and base temperature the loss is built with (losses.HybridLoss, whose maths
    test_losses.py pins per setting), not only what config.json records."""
    train, _ = make_synthetic(num_classes=4, n_train_per_class=8, n_test_per_class=1)
    cfg = main.parse_config(["--device", "cpu", "--model", "resnet8", "--batch_size", "8", *argv])
    criterion = main.Trainer(cfg, train, 4, torch.device("cpu")).criterion
    assert (criterion.method, criterion.temperature) == (method, temperature)
    assert (criterion.exclude_positive, criterion.base_temperature) == (exclude_positive, base_temperature)


def test_alpha_schedule_and_ncm_every_set_each_epochs_entry(cifar10_root, tmp_path):
    """--alpha_schedule linear: alpha = 1 - T / T_max per epoch (T from 0), recorded in the history and the
    config; a resume under another schedule is refused. In the same run (one process start less), --ncm_every 2
    adds the nearest-class-mean accuracies to epochs 2 and 4, evaluated or not, and epoch 4's is the run's "ncm",
    logged once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "run"
    at = TINY.index("--epochs")
    tiny = TINY[:at] + TINY[at + 2:] + ["--epochs", "4", "--eval_every", "4"]
    proc = run_cli("--data_root", str(cifar10_root), "--output_dir", str(out), "--alpha_schedule", "linear",
                   "--ncm_every", "2", *tiny)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert [h["alpha"] for h in res["history"]] == [1.0, 0.75, 0.5, 0.25]
    assert res["config"]["alpha_schedule"] == "linear"
    ncm_keys = {"ncm_top1", "ncm_many", "ncm_medium", "ncm_few"}
    assert [sorted(ncm_keys & set(h)) for h in res["history"]] == [[], sorted(ncm_keys), [], sorted(ncm_keys)]
    assert "top1" not in res["history"][1] and "top1" in res["history"][3]  # NCM without the evaluation
    assert {k: res["history"][3][f"ncm_{k}"] for k in main.SHOT_KEYS} == {k: res["ncm"][k] for k in main.SHOT_KEYS}
    assert [line.count("| ncm top1 ") for line in proc.stdout.splitlines() if line.startswith("epoch ")] == [0, 1, 0, 1]
    [events] = out.glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
    acc.Reload()
    steps = json.loads((out / "config.json").read_text())["train_size"] // 16  # per epoch, at --batch_size 16
    scalars = acc.Scalars("test/ncm_top1")
    assert [e.step for e in scalars] == [2 * steps, 4 * steps]
    assert [e.value for e in scalars] == pytest.approx([res["history"][1]["ncm_top1"], res["ncm"]["top1"]])
    saved = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    linear = main.parse_config(["--data_root", str(cifar10_root), "--alpha_schedule", "linear", *tiny])
    main.check_compatible(saved, linear, out / "last.pt", 10)  # no error: --ncm_every is not part of the recipe
    with pytest.raises(main.UserError, match=r"--alpha_schedule linear -> parabolic"):
        main.check_compatible(saved, main.parse_config(["--data_root", str(cifar10_root), *tiny]), out / "last.pt", 10)


@pytest.mark.parametrize("loss, test_passes", [("ce", 1), ("sc", 2)])
def test_finish_embeds_the_test_set_only_when_it_needs_it(cifar10_root, tmp_path, capsys, monkeypatch, loss,
                                                           test_passes):
    """With --ncm_every dividing --epochs, the run's NCM is the last epoch's: finish() embeds the test set again only
    for the projector of a hybrid run, never for a CE run."""
    passes = []
    embed = main.Trainer.embed

    def counting_embed(self, images):
        passes.append(len(images))
        return embed(self, images)

    monkeypatch.setattr(main.Trainer, "embed", counting_embed)
    at = TINY.index("--epochs")
    argv = TINY[:at] + TINY[at + 2:] + ["--epochs", "1", "--lr_decay_epochs", ""]
    code = main.main(["--data_root", str(cifar10_root), "--output_dir", str(tmp_path / "run"), "--loss", loss,
                      "--ncm_every", "1", *argv])
    assert code == 0, capsys.readouterr().err
    n_train = json.loads((tmp_path / "run" / "config.json").read_text())["train_size"]
    assert passes.count(n_train) == 1 and len(passes) == test_passes + 1  # the test set's passes + the training set


def test_resume_of_a_checkpoint_without_training_state_is_one_line(tmp_path, capsys):
    """A last.pt with a model and config but no run state (not written by a run) is refused before any data."""
    import dataclasses

    argv = ["--output_dir", str(tmp_path), "--resume", "--data_root", str(tmp_path / "no_data"), "--device", "cpu"]
    cfg = main.parse_config(argv)
    torch.save({"model": {}, "config": dataclasses.asdict(cfg), "num_classes": 10}, tmp_path / "last.pt")
    assert main.main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path / 'last.pt'} holds no training state ('run'): it cannot be resumed\n"


def test_resume_mismatch_names_list_settings_as_their_flag_takes_them():
    """A schedule that differs from the checkpoint's is named as it would be typed (120,160; '' for none), so that
    the message's values can be given back as they stand; an automatic default as not given."""
    import dataclasses

    saved = {"num_classes": 10, "config": dataclasses.asdict(main.parse_config([]))}
    with pytest.raises(main.UserError, match=r"--lr_decay_epochs 120,160 -> 100 \("):
        main.check_compatible(saved, main.parse_config(["--lr_decay_epochs", "100"]), Path("last.pt"), 10)
    with pytest.raises(main.UserError, match=r"--lr_decay_epochs 120,160 -> '' \("):
        main.check_compatible(saved, main.parse_config(["--lr_decay_epochs", ""]), Path("last.pt"), 10)
    # A flag left to its automatic default (None in the checkpoint) cannot be typed back: said as not given.
    with pytest.raises(main.UserError, match=r"--base_temp \(not given\) -> 0.07 \("):
        main.check_compatible(saved, main.parse_config(["--base_temp", "0.07"]), Path("last.pt"), 10)


def test_a_base_temp_equal_to_the_temp_resumes_a_run_without_one_and_back():
    """The SC loss's factor temp / base_temp is 1 both ways: the same recipe, so either resumes the other."""
    import dataclasses

    plain = {"num_classes": 10, "config": dataclasses.asdict(main.parse_config(["--temp", "0.2"]))}
    same = main.parse_config(["--temp", "0.2", "--base_temp", "0.2"])
    main.check_compatible(plain, same, Path("last.pt"), 10)  # no error
    main.check_compatible({"num_classes": 10, "config": dataclasses.asdict(same)},
                          main.parse_config(["--temp", "0.2"]), Path("last.pt"), 10)
    with pytest.raises(main.UserError, match=r"--base_temp \(not given\) -> 0.1 \("):  # a factor of 2
        main.check_compatible(plain, main.parse_config(["--temp", "0.2", "--base_temp", "0.1"]), Path("last.pt"), 10)
    with pytest.raises(main.UserError, match=r"--temp 0.2 -> 0.1, --base_temp \(not given\) -> 0.2 \("):
        main.check_compatible(plain, main.parse_config(["--temp", "0.1", "--base_temp", "0.2"]), Path("last.pt"), 10)
    # Said as the flags were given: the same --base_temp at another --temp is the --temp's difference alone.
    same_saved = {"num_classes": 10, "config": dataclasses.asdict(same)}
    with pytest.raises(main.UserError, match=r"other settings: --temp 0.2 -> 0.1 \(give"):
        main.check_compatible(same_saved, main.parse_config(["--temp", "0.1", "--base_temp", "0.2"]), Path("x"), 10)


@pytest.mark.parametrize("dataset, default", [("cifar10", 1.0), ("cifar100", 0.1)])
def test_psc_temp_given_its_default_resumes_a_run_that_left_it_out_and_back(dataset, default):
    """--psc_temp not given stands for the paper's value on the dataset: the same recipe as that value given."""
    import dataclasses

    classes, other = {"cifar10": 10, "cifar100": 100}[dataset], {1.0: "0.1", 0.1: "1.0"}[default]
    argv = ["--loss", "psc", "--dataset", dataset]
    left_out = {"num_classes": classes, "config": dataclasses.asdict(main.parse_config(argv))}
    given = main.parse_config([*argv, "--psc_temp", str(default)])
    main.check_compatible(left_out, given, Path("last.pt"), classes)  # no error
    main.check_compatible({"num_classes": classes, "config": dataclasses.asdict(given)}, main.parse_config(argv),
                          Path("last.pt"), classes)
    with pytest.raises(main.UserError, match=rf"--psc_temp \(not given\) -> {other} \("):
        main.check_compatible(left_out, main.parse_config([*argv, "--psc_temp", other]), Path("last.pt"), classes)


def test_resume_takes_a_flag_an_older_checkpoint_lacks_as_its_default():
    """A checkpoint from before --gray_prob existed was made with its default (0.2) and resumes under it."""
    import dataclasses

    cfg = main.parse_config([])
    before_the_flag = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "gray_prob"}
    saved = {"num_classes": 10, "config": before_the_flag}
    main.check_compatible(saved, cfg, Path("last.pt"), 10)  # no error
    with pytest.raises(main.UserError, match=r"--gray_prob 0.2 -> 0.0"):
        main.check_compatible(saved, main.parse_config(["--gray_prob", "0"]), Path("last.pt"), 10)
    # Before --base_temp existed there was no SupContrast factor: such a run resumes only without one.
    before_base_temp = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "base_temp"}
    main.check_compatible({"num_classes": 10, "config": before_base_temp}, cfg, Path("last.pt"), 10)
    with pytest.raises(main.UserError, match=r"--base_temp \(not given\) -> 0.07"):
        main.check_compatible({"num_classes": 10, "config": before_base_temp},
                              main.parse_config(["--base_temp", "0.07"]), Path("last.pt"), 10)
    # Before --bn_stats existed both branches went through the backbone as one batch: such a run resumes only with
    # --bn_stats joint, not under today's default.
    before_bn_stats = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "bn_stats"}
    main.check_compatible({"num_classes": 10, "config": before_bn_stats}, main.parse_config(["--bn_stats", "joint"]),
                          Path("last.pt"), 10)
    with pytest.raises(main.UserError, match=r"--bn_stats joint -> per_branch .*checkpoint's values"):
        main.check_compatible({"num_classes": 10, "config": before_bn_stats}, cfg, Path("last.pt"), 10)
    # Before --sc_aug existed the views had the paper's augmentation: such a run resumes only without supcon.
    before_sc_aug = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "sc_aug"}
    main.check_compatible({"num_classes": 10, "config": before_sc_aug}, cfg, Path("last.pt"), 10)
    with pytest.raises(main.UserError, match=r"--sc_aug paper -> supcon"):
        main.check_compatible({"num_classes": 10, "config": before_sc_aug}, main.parse_config(["--sc_aug", "supcon"]),
                              Path("last.pt"), 10)
    # Before --alpha_schedule existed alpha decayed parabolically: such a run resumes only under that schedule.
    before_alpha_schedule = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "alpha_schedule"}
    main.check_compatible({"num_classes": 10, "config": before_alpha_schedule}, cfg, Path("last.pt"), 10)
    with pytest.raises(main.UserError, match=r"--alpha_schedule parabolic -> cosine"):
        main.check_compatible({"num_classes": 10, "config": before_alpha_schedule},
                              main.parse_config(["--alpha_schedule", "cosine"]), Path("last.pt"), 10)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full (every write: no space left)")
def test_a_run_whose_stdout_fails_or_is_closed_goes_on_and_a_dry_run_says_it_failed(cifar10_root, tmp_path):
    """A run printing into a full disk (or into `| head` once head has left) used to die with a traceback in the
    middle of training. It now says so once on stderr and trains on: its record is its folder (also where stderr
    fails too, `> log 2>&1` on a full disk, and the warning has nowhere to go). A dry run's output
    is its result: it exits 1, also where it was started with stdout closed (`>&-`). A run started so trains with
    stdout on /dev/null (else the first file it opened, a checkpoint, would have taken descriptor 1)."""
    args = [sys.executable, str(ROOT / "main.py"), "--data_root", str(cifar10_root), *TINY, "--epochs", "1",
            "--lr_decay_epochs", ""]
    full = f"{shlex.join(args)} --output_dir {shlex.quote(str(tmp_path / 'full'))} > /dev/full"
    closed = f"{shlex.join(args)} --output_dir {shlex.quote(str(tmp_path / 'closed'))} >&-"
    dry = f"{shlex.join(args)} --output_dir {shlex.quote(str(tmp_path / 'dry'))} --dry_run > /dev/full"
    dry_closed = f"{shlex.join(args)} --output_dir {shlex.quote(str(tmp_path / 'dry'))} --dry_run >&-"
    both = f"{shlex.join(args)} --output_dir {shlex.quote(str(tmp_path / 'both'))} > /dev/full 2>&1"  # nowhere to say it
    warning = ("warning: standard output failed (No space left on device); main.py goes on without printing (a "
               "training run's record is its folder and TensorBoard)")
    for command, code, err in ((full, 0, [warning]), (closed, 0, []), (both, 0, []),
                               (dry, 1, [warning, "error: what this command prints is its result, and printing it "
                                                  "failed"]),
                               (dry_closed, 1, ["error: what this command prints is its result, and standard output "
                                                "was closed (>&-)"])):
        proc = subprocess.run(["bash", "-c", command], capture_output=True, text=True, cwd=ROOT, timeout=240)
        assert proc.returncode == code, proc.stderr[-3000:]
        assert [line for line in proc.stderr.splitlines() if not line.startswith("note:")] == err, proc.stderr
    for run in ("full", "closed", "both"):
        assert json.loads((tmp_path / run / "results.json").read_text())["epochs"] == 1
        assert util.load_checkpoint(tmp_path / run / "last.pt")["run"]["epoch"] == 1
    assert not (tmp_path / "dry").exists()


@pytest.mark.parametrize("extra", [[], ["--overwrite"], ["--dry_run"]])
def test_another_programs_config_json_is_not_taken_for_a_run(tmp_path, capsys, cifar10_root, extra):
    """A folder whose only file of a run's names is a config.json that main.py did not write (no loss, imb_factor
    and epochs in it): before, it was "a run that saved no checkpoint ... pass --overwrite", which then replaced
    that file. Refused whatever the flags; nothing changes."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.json").write_text('{"model_type": "bert"}')
    before = snapshot(tmp_path / "out")
    code, err = call_main(["--data_root", str(cifar10_root), "--output_dir", str(tmp_path / "out"), *TINY, *extra],
                          capsys)
    assert_one_line_error(code, err, f"{tmp_path / 'out' / 'config.json'} is not a run's (it lacks the loss, "
                                     "imb_factor and epochs main.py writes there; another program's?), and a run "
                                     "would replace it: give this run its own --output_dir, or move that file away")
    assert snapshot(tmp_path / "out") == before
    for text, reason in (("model_type: bert", "it is not JSON"), ("[1, 2]", "it is not a JSON object"),
                         ("[" * 200_000 + "]" * 200_000, "it is not JSON"),  # json.loads: RecursionError
                         (None, "it is larger than 64 MiB, far more than a run writes there")):
        (tmp_path / "out" / "config.json").write_text(text or "{")
        if text is None:  # a sparse file of 16 GiB, which read whole would take all the memory
            os.truncate(tmp_path / "out" / "config.json", 1 << 34)
        code, err = call_main(["--data_root", str(cifar10_root), "--output_dir", str(tmp_path / "out"), *TINY, *extra],
                              capsys)
        assert_one_line_error(code, err, f"is not a run's ({reason}; another program's?)")


@pytest.mark.parametrize("inside", ["train", "test/class_003/run"])
def test_an_output_folder_inside_the_image_folders_is_refused(tmp_path, capsys, inside):
    """Its projector folder (<step>/) would have become an 11th class of train/, or a folder inside a class folder:
    every later load of the data would fail. Refused before anything is written; beside a pickled folder, which is
    read instead, train/ and test/ are not the data and the same folder is taken."""
    data_root = tmp_path / "data"
    write_image_folder(data_root, *make_synthetic(10, N_TRAIN, N_TEST, seed=0))
    before = snapshot(data_root)
    argv = ["--data_root", str(data_root), "--output_dir", str(data_root / inside), *TINY, "--dry_run"]
    code, err = call_main(argv, capsys)
    split = inside.split("/")[0]
    assert_one_line_error(code, err, f"--output_dir {data_root / inside} is inside {data_root / split}, image folders "
                                     "of --data_root: the run's own folders and files would then be read as data; "
                                     "put it elsewhere")
    assert snapshot(data_root) == before
    write_pickled_cifar10(data_root, *make_synthetic(10, N_TRAIN, N_TEST, seed=0))
    assert main.main(argv) == 0 and "dry run: would start" in capsys.readouterr().out


@pytest.mark.parametrize("finished_run", ["sc"], indirect=True)
def test_eval_only_of_weights_that_are_not_finite_says_so(existing_run, capsys, cifar10_root):
    """Other code's checkpoint with a NaN weight evaluated as a plain 10 % (every image one class) without a word."""
    ckpt = existing_run / "last.pt"
    saved = torch.load(ckpt, weights_only=False)
    saved["model"]["backbone.bn1.running_var"][3] = float("nan")
    torch.save(saved, ckpt)
    argv = ["--eval_only", "--checkpoint", str(ckpt), "--data_root", str(cifar10_root), "--device", "cpu"]
    assert main.main(argv) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert notes == [f"note: {ckpt} holds weights or batch-norm statistics that are not finite numbers (NaN or inf; a "
                     "run of this program keeps those out of its checkpoints): the accuracy below is that of a broken "
                     "network"]


def test_a_divergence_under_a_tiny_temperature_names_it(tmp_path, capsys, cifar10_root):
    """--temp 1e-30 makes logits of 1e30: the run diverges, and lowering the lr (all the message said) cannot help."""
    code, err = call_main(["--data_root", str(cifar10_root), "--output_dir", str(tmp_path / "run"), *TINY, "--temp",
                           "1e-30"], capsys)
    assert code == 3 and err.strip().splitlines()[-1].endswith(
        "Lower --learning_rate or raise --warm_epochs, or raise --temp 1e-30 (the usual ones are 0.05 to 1).")


@pytest.mark.parametrize("finished_run", ["sc"], indirect=True)
def test_a_dry_run_of_a_finished_run_whose_output_fails_exits_1(finished_run, cifar10_root, monkeypatch, capsys):
    """Its one line ("... nothing to do") is its result, as every dry run's: a stdout that failed (util.GuardedOutput,
    which main.py's __main__ installs) makes it exit 1, as it does the others."""
    _, out, _ = finished_run

    class Full(io.StringIO):
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    argv = ["--data_root", str(cifar10_root), "--output_dir", str(out), *TINY, "--loss", "sc", "--resume", "--dry_run"]
    assert main.main(argv) == 0
    monkeypatch.setattr(sys, "stdout", util.GuardedOutput(Full(), "main.py goes on"))
    assert main.main(argv) == 1
    assert capsys.readouterr().err.splitlines()[-2:] == [
        "warning: standard output failed (No space left on device); main.py goes on",
        "error: what this command prints is its result, and printing it failed"]


@pytest.mark.parametrize("read_only", [False, True], ids=["no permission", "read-only file system"])
def test_an_output_folder_that_cannot_be_written_is_found_before_the_run(tmp_path, capsys, cifar10_root, monkeypatch,
                                                                         read_only):
    """An existing folder that cannot be written in passed the dry run, and the run then failed at config.json; a
    read-only mount (os.access says no to root there too) was reported as a missing permission."""
    (tmp_path / "out").mkdir()
    real_access, real_statvfs = os.access, os.statvfs
    blocked = {tmp_path, tmp_path / "out"}
    monkeypatch.setattr(main.os, "access", lambda path, mode, **kw: False if Path(path) in blocked else
                        real_access(path, mode, **kw))

    class Stat:
        f_flag = os.ST_RDONLY if read_only else 0

    monkeypatch.setattr(main.os, "statvfs", lambda path: Stat() if Path(path) in blocked else real_statvfs(path))
    for out, message in ((tmp_path / "out", f"cannot write in output folder {tmp_path / 'out'}: "),
                         (tmp_path / "new", f"cannot prepare output folder {tmp_path / 'new'}: ")):
        folder = out if out.exists() else tmp_path
        why = f"{folder} is on a read-only file system" if read_only else \
            f"no permission to {'write' if out.exists() else 'create folders'} in {folder}"
        code, err = call_main(["--data_root", str(cifar10_root), "--output_dir", str(out), *TINY, "--dry_run"], capsys)
        assert_one_line_error(code, err, message + why)


def test_a_cuda_graph_mode_that_inductor_skipped_says_so_after_the_first_step(monkeypatch):
    """Inductor skips CUDA graphs silently (counters['inductor']['cudagraph_skips']): on CUDA under reduce-overhead
    or max-autotune the run says so after its first step; elsewhere (the CPU, where it skips every graph, or plain
    --compile) nothing."""
    from torch._dynamo.utils import counters

    monkeypatch.setitem(counters, "inductor", __import__("collections").Counter(cudagraph_skips=2))
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    for argv, device, said in ((["--compile", "--compile_mode", "reduce-overhead"], cuda, True),
                               (["--compile", "--compile_mode", "max-autotune"], cuda, True),
                               (["--compile", "--compile_mode", "reduce-overhead"], cpu, False),
                               (["--compile"], cuda, False), ([], cuda, False)):
        note = main.cudagraph_note(main.parse_config(argv), device)
        assert (note is not None) == said, argv
    assert main.cudagraph_note(main.parse_config(["--compile", "--compile_mode", "reduce-overhead"]), cuda) == (
        "note: Inductor ran 2 graphs of the step without CUDA graphs (--compile_mode reduce-overhead), which leaves it "
        "no faster there; torch's logs say why (TORCH_LOGS=cudagraphs, or perf_hints in older torch)")
    counters["inductor"]["cudagraph_skips"] = 0
    assert main.cudagraph_note(main.parse_config(["--compile", "--compile_mode", "reduce-overhead"]), cuda) is None


def test_a_compile_cache_folder_that_cannot_be_made_is_one_line(tmp_path, cifar10_root):
    """torch.compile's machinery makes its cache folders as it is imported, which torch.optim's SGD does too:
    TORCHINDUCTOR_CACHE_DIR under a file stopped main.py (with --compile or without) and the benchmark with a
    NotADirectoryError traceback, then an AssertionError of torch's."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(blocker / "cache")}
    out = tmp_path / "run"
    # Older torch (2.4) makes the folder only as it compiles: there a run without --compile trains, and a compiled
    # one says so in the one line of a failed compilation.
    at_import = subprocess.run([sys.executable, "-c", "import torch._dynamo"], env=env, capture_output=True,
                               timeout=240).returncode != 0
    main_args = ["--data_root", str(cifar10_root), "--output_dir", str(out), *TINY]
    for script, args in (("main.py", main_args), ("main.py", [*main_args, "--compile", "--overwrite"]),
                         ("scripts/benchmark.py", ["--device", "cpu", "--model", "resnet8", "--batch_size", "16",
                                                   "--steps", "1", "--warmup_steps", "1", "--no_reference",
                                                   "--memory_batch_sizes", "", "--compile"])):
        proc = subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True,
                              text=True, cwd=ROOT, timeout=240, env=env)
        err = "\n".join(line for line in proc.stderr.splitlines() if not line.startswith("timing "))
        if at_import:
            assert_one_line_error(proc.returncode, err, f"torch cannot make the cache folder of its compiler, "
                                  f"{blocker / 'cache'} (Not a directory), which it makes as it loads, with --compile "
                                  f"or without: set TORCHINDUCTOR_CACHE_DIR to a folder it can write")
        elif "--compile" in args:
            assert_one_line_error(proc.returncode, err, "--compile could not compile the training step "
                                                        "(NotADirectoryError: ")
        else:
            assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.returncode in (0, 2)
    assert not out.exists() or not at_import
