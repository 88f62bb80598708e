"""Tests for scripts/: the Table 1 summary (pure functions and CLI) and the sweep scripts.

The sweep scripts are run against a FAKE main.py (PYTHON points at a generated script) that logs
its arguments and follows main.py's run-folder contract: config.json at the start, last.pt and
results.json at the end, --resume needs last.pt, a folder that holds a run needs --overwrite.
"""
from __future__ import annotations

import csv
import dataclasses
import errno
import importlib.util
import io
import json
import math
import os
import re
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pytest

import dataset_loader as dl
import main

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = REPO_ROOT / "scripts"


def load_script(name: str):
    """scripts/<name>.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    # dataclasses resolve string annotations through sys.modules, so register it while loading.
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
    return module


@pytest.fixture(scope="module")
def summarize():
    return load_script("summarize")


# ---- summarize.py ----------------------------------------------------------------------------

CIFAR10_R100_COUNTS = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


def result_dict(dataset="cifar10", method="sc", ratio=100, seed=0, best=82.0, last=81.0,
                many=90.0, medium=80.0, few=70.0, epochs=200, decay=(120, 160), batch_size=512,
                wall_time_s=3600.0, imb_type="exp", config=None, per_class=None, class_counts=None,
                ncm=None, train_digest=None, **given):
    """A results.json in the schema main.py writes (only what matters here varies); "ncm" and "train_digest" only
    when given, as in runs made before main.py recorded them, and so is any other key `given` (class_names, say).
    class_counts: by default the full dataset's long-tailed split at this ratio, as dataset_loader draws it."""
    if class_counts is None:
        classes, n_max = {"cifar10": (10, 5000), "cifar100": (100, 500)}[dataset]
        class_counts = dl.long_tailed_counts(n_max, classes, 1.0 / ratio, imb_type)
    shots = {"top1": last, "many": many, "medium": medium, "few": few}
    extra = {} if ncm is None else {"ncm": {"top1": ncm, "many": None, "medium": None, "few": None, "per_class": []}}
    if train_digest is not None:
        extra["train_digest"] = train_digest
    extra.update(given)
    return {**extra,
        "dataset": dataset, "method": method, "model": "resnet32", "imb_type": imb_type,
        "imb_factor": 1.0 / ratio, "imbalance_ratio": float(ratio), "seed": seed,
        "epochs": epochs, "lr_decay_epochs": list(decay), "batch_size": batch_size,
        "best_top1": best, "best_epoch": epochs - 1, "last_top1": last,
        "many": many, "medium": medium, "few": few,
        "best": {**shots, "top1": best, "epoch": epochs - 1}, "last": {**shots, "epoch": epochs},
        "per_class": [last] * len(class_counts) if per_class is None else per_class, "class_counts": class_counts, "history": [],
        "samples_per_s": 1000.0, "wall_time_s": wall_time_s, "torch_version": "2.14.1",
        "device": "cpu", "config": {"epochs": epochs, **(config or {})},
    }


def write_result(root: Path, name: str, **fields) -> Path:
    path = root / name / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result_dict(**fields)))
    return path


def run_summarize(summarize, capsys, *argv):
    code = summarize.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def table_rows(markdown: str) -> list[list[str]]:
    """The body rows of the markdown table, as lists of stripped cells."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def test_mean_and_sample_std_over_seeds(summarize, tmp_path, capsys):
    lasts, bests = [80.0, 81.0, 82.5], [81.0, 82.0, 83.9]
    for seed, (best, last) in enumerate(zip(bests, lasts)):
        write_result(tmp_path, f"sc_s{seed}", seed=seed, best=best, last=last,
                     many=90.0 + seed, medium=None if seed else 80.0, few=float("nan"),
                     wall_time_s=3600.0 + 60 * seed)
    code, out, err = run_summarize(summarize, capsys, tmp_path)
    assert code == 0 and err == ""
    [row] = table_rows(out)
    last_mean, last_std = statistics.mean(lasts), statistics.stdev(lasts)  # stdev: ddof=1
    best_mean, best_std = statistics.mean(bests), statistics.stdev(bests)
    assert row[:4] == ["CIFAR-10-LT", "Hybrid-SC", "100", "3 (0, 1, 2)"]
    assert row[4] == f"{best_mean:.2f} ± {best_std:.2f}"
    assert row[5] == f"{last_mean:.2f} ± {last_std:.2f}"
    # many: mean of all; medium: only the seed that has it; few: NaN everywhere -> no group.
    assert row[6:9] == ["91.00", "80.00", "—"]
    assert row[9] == "200"
    assert row[10] == "1h 01m"
    assert row[11] == "81.40"
    assert row[12] == f"{last_mean - 81.40:+.2f}" == "-0.23"
    assert "ddof=1" in out and "last top-1 mean − paper top-1" in out


def test_ratios_are_read_exactly_and_compared_with_the_paper_only_at_its_own(summarize, tmp_path, capsys):
    """A ratio with float noise (1 / (1 / 49)) joins its row; a ratio known only from imb_factor is not rounded
    (0.4: 2.5, not 2); ratio 100.4 is not the paper's 100, so it gets no paper value beside it."""
    write_result(tmp_path, "r49_s0", ratio=49)
    write_result(tmp_path, "r49_s1", ratio=1 / (1 / 49), seed=1)
    record = result_dict(ratio=2.5)
    del record["imbalance_ratio"]
    record["imb_factor"] = 0.4
    (tmp_path / "r2.5").mkdir()
    (tmp_path / "r2.5" / "results.json").write_text(json.dumps(record))
    write_result(tmp_path, "r100.4", ratio=100.4)
    write_result(tmp_path, "r100", ratio=100)
    code, out, err = run_summarize(summarize, capsys, tmp_path)
    assert code == 0, err
    rows = {row[2]: row for row in table_rows(out)}
    assert sorted(rows) == ["100", "100.4", "2.5", "49"] and rows["49"][3] == "2 (0, 1)"
    assert rows["100"][11] == "81.40" and rows["100.4"][11:] == ["—", "—"]


def test_a_schedule_longer_than_the_papers_is_not_compared_with_it(summarize, tmp_path, capsys):
    write_result(tmp_path, "sc_300", epochs=300)
    code, out, err = run_summarize(summarize, capsys, tmp_path)
    assert code == 0, err
    [row] = table_rows(out)
    assert row[9] == "other schedule: 300 epochs, lr decay at 120,160, batch 512" and row[11:] == ["n/c", "n/c"]


def test_nearest_class_mean_column_holds_the_mean_over_seeds_of_runs_that_record_it(summarize, tmp_path, capsys):
    for seed, ncm in enumerate([60.0, 63.0]):
        write_result(tmp_path, f"sc_s{seed}", seed=seed, ncm=ncm)
    write_result(tmp_path, "psc_s0", method="psc", ncm=55.5)
    write_result(tmp_path, "psc_s1", method="psc", seed=1)  # made before runs recorded it: no mean of one seed
    write_result(tmp_path, "ce", method="ce")
    code, out, err = run_summarize(summarize, capsys, tmp_path)
    assert code == 0 and err == ""
    header = [cell.strip() for cell in out.splitlines()[0].strip("|").split("|")]
    assert header[8:11] == ["few", "NCM top-1", "epochs"]
    sc, psc, ce = table_rows(out)
    assert (sc[1], sc[9], sc[10]) == ("Hybrid-SC", "61.50", "200")
    assert (psc[1], psc[9]) == ("Hybrid-PSC", "—") and (ce[1], ce[9]) == ("CE", "—")
    assert "NCM top-1: the test set classified by the nearest class mean" in out
    code, out, _ = run_summarize(summarize, capsys, tmp_path, "--csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [row["ncm_top1_mean"] for row in rows] == ["61.5", "", ""]
    for name in ("sc_s0", "sc_s1", "psc_s0"):
        shutil.rmtree(tmp_path / name)
    code, out, _ = run_summarize(summarize, capsys, tmp_path)
    assert "NCM" not in out and len(table_rows(out)[0]) == 13  # no run records it: the table as before


def test_seeds_trained_on_different_images_are_named_under_the_table(summarize, tmp_path, capsys):
    """Seeds whose results.json hold different train_digest values (other copies of the data, same class sizes) are
    still one row, and a note under the table names it; seeds that agree, or do not record it, give no note."""
    for seed, digest in enumerate(["a" * 64, "a" * 64, "b" * 64]):
        write_result(tmp_path, f"sc_s{seed}", seed=seed, train_digest=digest)
    for seed, digest in enumerate(["c" * 64, None]):
        write_result(tmp_path, f"psc_s{seed}", method="psc", seed=seed, train_digest=digest)
    code, out, err = run_summarize(summarize, capsys, tmp_path)
    assert code == 0 and err == ""
    assert [row[:4] for row in table_rows(out)] == [["CIFAR-10-LT", "Hybrid-SC", "100", "3 (0, 1, 2)"],
                                                   ["CIFAR-10-LT", "Hybrid-PSC", "100", "2 (0, 1)"]]
    notes = [line for line in out.splitlines() if line.startswith("- Seeds trained on different images")]
    assert notes == ["- Seeds trained on different images, averaged together: CIFAR-10-LT Hybrid-SC at ratio 100, "
                     "seeds 0, 1, 2 (2 sets). Their results.json hold different train_digest values (the training "
                     "images and labels): other copies of the data (such as a JPEG copy and the original)."]
    shutil.rmtree(tmp_path / "sc_s2")
    code, out, err = run_summarize(summarize, capsys, tmp_path)
    assert code == 0 and "different images" not in out
    write_result(tmp_path, "sc_s2", seed=2, train_digest=7)
    code, out, err = run_summarize(summarize, capsys, tmp_path)
    assert code != 0 and "'train_digest' must be a non-empty string" in err


def test_single_seed_std_is_na_and_groups_split_by_config(summarize, tmp_path, capsys):
    write_result(tmp_path, "a", dataset="cifar100", method="psc", ratio=50, last=48.0)
    write_result(tmp_path, "b", dataset="cifar100", method="psc", ratio=10, last=60.0)
    write_result(tmp_path, "c", dataset="cifar10", method="psc", ratio=10, last=90.0)
    write_result(tmp_path, "d", dataset="cifar100", method="sc", ratio=50, last=51.0, imb_type="step")
    code, out, _ = run_summarize(summarize, capsys, tmp_path)
    assert code == 0
    rows = table_rows(out)
    # Order: dataset, imb_type, method (SC, PSC, CE), ratio high to low.
    assert [r[:3] for r in rows] == [
        ["CIFAR-10-LT", "Hybrid-PSC", "10"],
        ["CIFAR-100-LT", "Hybrid-PSC", "50"],
        ["CIFAR-100-LT", "Hybrid-PSC", "10"],
        ["CIFAR-100-LT", "Hybrid-SC", "50 (step)"],
    ]
    assert rows[1][5] == "48.00 ± n/a"
    assert rows[1][11:] == ["48.93", "-0.93"]
    assert rows[2][11:] == ["62.37", "-2.37"]
    assert rows[3][11:] == ["—", "—"]  # the paper has no step-imbalance numbers


def test_short_schedule_is_marked_and_not_compared(summarize, tmp_path, capsys):
    write_result(tmp_path, "short", last=60.0, epochs=20, decay=(12, 16))
    write_result(tmp_path, "batch", last=79.0, batch_size=256)
    write_result(tmp_path, "paper", last=81.0)
    code, out, _ = run_summarize(summarize, capsys, tmp_path)
    assert code == 0
    rows = table_rows(out)
    assert len(rows) == 3
    paper_row, other_row, short_row = rows  # paper schedule first, then longer before shorter
    assert paper_row[9:] == ["200", "1h 00m", "81.40", "-0.40"]
    assert short_row[9] == "short schedule: 20 epochs"
    assert other_row[9] == "other schedule: 200 epochs, lr decay at 120,160, batch 256"
    for row in (short_row, other_row):
        assert row[11:] == ["n/c", "n/c"]
        assert "81.40" not in " ".join(row)


def test_ce_literature_reference_is_marked(summarize, tmp_path, capsys):
    write_result(tmp_path, "ce", method="ce", last=71.0)
    write_result(tmp_path, "ce50", method="ce", ratio=50, last=75.0)
    code, out, _ = run_summarize(summarize, capsys, tmp_path)
    assert code == 0
    rows = table_rows(out)
    assert rows[0][1] == "CE" and rows[0][11:] == ["70.36 (lit.)", "—"]
    assert rows[1][11:] == ["—", "—"]
    assert "(lit.)" in out.split("\n\n", 1)[1]  # explained in the footnotes


def test_a_reference_value_needs_resnet32_and_the_full_datasets_split(summarize, tmp_path, capsys):
    """The paper's and the literature's numbers are ResNet-32's on the long-tailed split of the full dataset: a run
    with another model (labelled with it, even alone) or trained on a smaller set (a subset, synthetic data; its
    largest class is not 5,000 images) gets none, and the footnote names the row."""
    write_result(tmp_path, "r8", config={"model": "resnet8"})
    write_result(tmp_path, "ce_r8", method="ce", config={"model": "resnet8"})
    small = [int(120 * 0.01 ** (c / 9)) for c in range(10)]
    write_result(tmp_path, "psc_small", method="psc", class_counts=small, config={"model": "resnet32"})
    write_result(tmp_path, "psc_full", method="psc", ratio=50, config={"model": "resnet32"},
                 class_counts=[int(5000 * 0.02 ** (c / 9)) for c in range(10)])
    code, out, err = run_summarize(summarize, capsys, tmp_path)
    assert code == 0 and err == ""
    rows = {(row[1], row[2]): row for row in table_rows(out)}
    assert rows[("Hybrid-SC [model=resnet8]", "100")][11:] == ["—", "—"]
    assert rows[("CE [model=resnet8]", "100")][11:] == ["—", "—"]
    assert rows[("Hybrid-PSC", "100")][11:] == ["—", "—"]
    assert rows[("Hybrid-PSC", "50")][11:] == ["83.86", f"{81.0 - 83.86:+.2f}"]
    assert "- Trained on another split than the full dataset's long-tailed one (the largest class not 5,000 / 500 " \
           "images: a subset, or synthetic data), so no reference value ('—'): CIFAR-10-LT Hybrid-PSC at ratio 100." \
           in out
    assert "a row with another model than resnet32" in out
    code, out, _ = run_summarize(summarize, capsys, tmp_path / "psc_small")  # alone, too
    assert code == 0 and table_rows(out)[0][11:] == ["—", "—"]


def test_a_row_on_another_split_is_named_at_a_short_schedule_too(summarize, tmp_path, capsys):
    """A smoke run on a subset at a short schedule shows n/c, as every short row does; the footnote still says that
    it was trained on another split, so that it is not read as a CIFAR-10-LT row."""
    small = [int(100 * 0.01 ** (c / 9)) for c in range(10)]
    write_result(tmp_path, "tiny", class_counts=small, epochs=2, decay=(1,))
    code, out, err = run_summarize(summarize, capsys, tmp_path)  # alone: no split label in the row
    assert code == 0 and err == "" and table_rows(out)[0][1:3] == ["Hybrid-SC", "100"]
    assert table_rows(out)[0][11:] == ["n/c", "n/c"]
    assert out.splitlines()[-1] == ("- Trained on another split than the full dataset's long-tailed one (the largest "
                                    "class not 5,000 / 500 images: a subset, or synthetic data): CIFAR-10-LT "
                                    "Hybrid-SC at ratio 100, short schedule: 2 epochs.")  # (no '—' to explain)
    write_result(tmp_path, "full", seed=1, epochs=2, decay=(1,))  # beside a run on the full split: labelled
    code, out, err = run_summarize(summarize, capsys, tmp_path)
    assert code == 0 and err == "" and len(table_rows(out)) == 2
    assert out.splitlines()[-1].endswith("data): CIFAR-10-LT Hybrid-SC [split=242 images, 100..1 per class] at "
                                         "ratio 100, short schedule: 2 epochs.")


def test_run_folders_without_results_are_named_on_stderr(summarize, tmp_path, capsys):
    """A sweep's stopped or failed runs (config.json, no results.json) are left out of the rows; the summary says
    which, on stderr, so that neither the markdown nor the CSV changes."""
    write_result(tmp_path, "sc_s0")
    for i in range(7):
        (tmp_path / f"sc_s{i + 1}").mkdir()
        (tmp_path / f"sc_s{i + 1}" / "config.json").write_text("{}")
    (tmp_path / "notes").mkdir()  # a folder that is not a run: not named
    code, out, err = run_summarize(summarize, capsys, tmp_path)
    assert code == 0 and len(table_rows(out)) == 1
    named = ", ".join(str(tmp_path / f"sc_s{i}") for i in range(1, 6))
    assert err == (f"summarize.py: note: left out 7 run folders without results.json (running, stopped or failed): "
                   f"{named} and 2 more\n")
    code, out, err = run_summarize(summarize, capsys, tmp_path / "sc_s0", tmp_path / "sc_s1", "--csv")
    assert code == 0 and out.count("\n") == 2
    assert err == f"summarize.py: note: left out 1 run folder without results.json (running, stopped or failed): " \
                  f"{tmp_path / 'sc_s1'}\n"


def test_class_balanced_ce_is_labelled_and_not_set_beside_plain_ce(summarize, tmp_path, capsys):
    # The literature's 70.36 is plain (instance-sampled) CE; class-balanced CE is another method,
    # labelled as such even when no other run tells it apart.
    write_result(tmp_path, "cb", method="ce", last=61.0, config={"ce_sampler": "class"})
    code, out, _ = run_summarize(summarize, capsys, tmp_path / "cb")
    assert code == 0
    [row] = table_rows(out)
    assert row[1] == "CE [ce_sampler=class]" and row[11:] == ["—", "—"]
    write_result(tmp_path, "plain", method="ce", seed=1, last=65.0, config={"ce_sampler": "instance"})
    code, out, _ = run_summarize(summarize, capsys, tmp_path)
    assert code == 0
    rows = {row[1]: row for row in table_rows(out)}
    assert rows["CE [ce_sampler=class]"][11:] == ["—", "—"]
    assert rows["CE [ce_sampler=instance]"][11:] == ["70.36 (lit.)", "—"]
    code, out, _ = run_summarize(summarize, capsys, tmp_path / "plain")  # alone: plain CE, no label
    [row] = table_rows(out)
    assert row[1] == "CE" and row[11:] == ["70.36 (lit.)", "—"]


def test_csv_output_parses_with_unformatted_numbers(summarize, tmp_path, capsys):
    for seed, last in enumerate([80.0, 81.0]):
        write_result(tmp_path, f"s{seed}", seed=seed, last=last, medium=None)
    write_result(tmp_path, "short", method="psc", last=50.123456, epochs=5, decay=())
    out_file = tmp_path / "table.csv"
    code, out, err = run_summarize(summarize, capsys, tmp_path, "--csv", "--out", out_file)
    assert code == 0 and out == "" and str(out_file) in err
    rows = list(csv.DictReader(io.StringIO(out_file.read_text())))
    assert list(rows[0]) == list(summarize.CSV_COLUMNS)
    sc, psc = rows
    assert (sc["method"], sc["n_seeds"], sc["seeds"]) == ("Hybrid-SC", "2", "0 1")
    assert float(sc["last_top1_mean"]) == 80.5
    assert math.isclose(float(sc["last_top1_std"]), statistics.stdev([80.0, 81.0]))
    assert sc["medium_mean"] == "" and float(sc["many_mean"]) == 90.0
    assert float(sc["reference_top1"]) == 81.40 and sc["reference_source"] == "paper"
    assert math.isclose(float(sc["diff_last_minus_reference"]), 80.5 - 81.40)
    assert sc["paper_schedule"] == "True" and sc["lr_decay_epochs"] == "120 160"
    assert float(psc["last_top1_mean"]) == 50.123456 and psc["last_top1_std"] == ""
    assert psc["paper_schedule"] == "False" and psc["epochs"] == "5"
    assert psc["reference_top1"] == "" and psc["diff_last_minus_reference"] == ""


def test_per_class_tables_hold_each_rows_mean_over_seeds(summarize, tmp_path, capsys):
    """--per_class: one table per dataset and ratio, a column per row, a line per class with its training images;
    with --csv the same numbers, one line per row and class, with the std over seeds."""
    sc_seeds = [[50.0 + seed + c for c in range(10)] for seed in range(3)]
    for seed, per_class in enumerate(sc_seeds):
        write_result(tmp_path, f"sc{seed}", seed=seed, per_class=per_class)
    write_result(tmp_path, "psc0", method="psc", per_class=[10.0 * c for c in range(10)])
    r10_counts = [5000, 3871, 2997, 2320, 1796, 1391, 1077, 834, 645, 500]
    write_result(tmp_path, "sc_r10", ratio=10, per_class=[90.0] * 10, class_counts=r10_counts)
    older = result_dict(method="ce")
    del older["per_class"]  # a run that does not record it
    (tmp_path / "ce0").mkdir()
    (tmp_path / "ce0" / "results.json").write_text(json.dumps(older))
    code, out, err = run_summarize(summarize, capsys, tmp_path, "--per_class")
    assert code == 0 and err == ""
    blocks = out.split("Per-class top-1 at the last epoch, ")[1:]
    assert [b.splitlines()[0] for b in blocks] == [
        "CIFAR-10-LT, imbalance ratio 100, 5000 .. 50 training images per class (mean over seeds):",
        "CIFAR-10-LT, imbalance ratio 10, 5000 .. 500 training images per class (mean over seeds):"]
    r100 = table_rows(blocks[0])
    assert len(r100) == 10
    assert [r[:2] for r in r100] == [[str(c), str(n)] for c, n in enumerate(CIFAR10_R100_COUNTS)]
    assert [r[2] for r in r100] == [f"{statistics.mean(s[c] for s in sc_seeds):.2f}" for c in range(10)]
    assert [r[3] for r in r100] == [f"{10.0 * c:.2f}" for c in range(10)]
    header = [line for line in blocks[0].splitlines() if line.startswith("| class")][0]
    assert header == "| class | train images | Hybrid-SC (3 seeds) | Hybrid-PSC (1 seed) |"
    assert [r[:3] for r in table_rows(blocks[1].split("\n\n")[1])] == \
        [[str(c), str(n), "90.00"] for c, n in enumerate(r10_counts)]
    assert out.rstrip().endswith("No per-class values (a run that does not record them, or seeds trained on "
                                 "different class sizes): CIFAR-10-LT ratio 100 CE (1 seed)")
    assert len(table_rows(out.split("\n\n")[0])) == 4  # the main table is unchanged
    code, out, _ = run_summarize(summarize, capsys, tmp_path, "--per_class", "--csv")
    lines = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and len(lines) == 3 * 10
    sc = [line for line in lines if line["method"] == "Hybrid-SC" and line["imbalance_ratio"] == "100.0"]
    assert [int(line["train_images"]) for line in sc] == CIFAR10_R100_COUNTS
    assert sc[3]["seeds"] == "0 1 2" and float(sc[3]["top1_mean"]) == statistics.mean(s[3] for s in sc_seeds)
    assert math.isclose(float(sc[3]["top1_std"]), statistics.stdev(s[3] for s in sc_seeds), rel_tol=1e-12)
    assert [line["top1_std"] for line in lines if line["method"] == "Hybrid-PSC"] == [""] * 10


def test_per_class_tables_name_the_classes_their_runs_record(summarize, tmp_path, capsys):
    """results.json's class_names (the data's: batches.meta, or the class folders) beside each class number, in
    markdown and in --csv's class_name, where every run of the table records the same; numbers alone otherwise.
    A name is one table cell whatever it holds."""
    names = ["airplane", "auto|mobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck\n"]
    for seed in (0, 1):
        write_result(tmp_path, f"sc{seed}", seed=seed, per_class=[50.0] * 10, class_names=names)
    code, out, err = run_summarize(summarize, capsys, tmp_path, "--per_class")
    assert code == 0 and err == ""
    [table] = out.split("Per-class top-1 at the last epoch, ")[1:]
    rows = [re.split(r"(?<!\\)\|", line.strip("|")) for line in table.splitlines() if line.startswith("| ")][1:]
    assert all(len(row) == 3 for row in rows) and len(rows) == 10  # class, images, the row's column
    cells = [row[0].strip() for row in rows]
    assert cells[:3] == ["0 airplane", "1 auto\\|mobile", "2 bird"] and cells[9] == "9 truck\\n"
    code, out, _ = run_summarize(summarize, capsys, tmp_path, "--per_class", "--csv")
    assert [line["class_name"] for line in csv.DictReader(io.StringIO(out))] == names
    write_result(tmp_path, "psc0", method="psc", per_class=[40.0] * 10, class_names=None)  # not recorded: numbers
    code, out, _ = run_summarize(summarize, capsys, tmp_path, "--per_class")
    assert [row[0] for row in table_rows(out.split("Per-class top-1 at the last epoch, ")[1])] == [
        str(c) for c in range(10)]
    write_result(tmp_path, "psc0", method="psc", per_class=[40.0] * 10, class_names=names[:9])
    code, _, err = run_summarize(summarize, capsys, tmp_path)
    assert code == 1 and "'class_names' must be null or a list of one name (text) per class" in err


def test_per_run_lists_each_run_under_its_row_with_its_folder(summarize, tmp_path, capsys):
    """--per_run: one line per run, in the table's row order and by seed, with what results.json holds of it that
    the rows average away (the best epoch, the rate, the times) and its folder; with --csv the same, unformatted.
    A run without a value (older, or bookkeeping that is unusable) gets '—' or an empty cell."""
    write_result(tmp_path, "a_s1", seed=1, best=83.0, last=82.0, ncm=70.0)  # by seed, not by folder name
    write_result(tmp_path, "sc`s0", seed=0, best=81.0, last=80.0, ncm=69.0, wall_time_s=100.0)
    older = result_dict(method="psc", epochs=20, decay=(12, 16), best=75.5)
    for key in ("best_epoch", "samples_per_s"):
        del older[key]
    older["train_time_s"] = -1.0  # unusable: bookkeeping, so left out rather than an error
    (tmp_path / "psc|a\nb").mkdir()  # a cell of its own in markdown, a quoted field in CSV
    (tmp_path / "psc|a\nb" / "results.json").write_text(json.dumps(older))
    data = json.loads((tmp_path / "sc`s0" / "results.json").read_text())
    data["train_time_s"] = 61.5
    (tmp_path / "sc`s0" / "results.json").write_text(json.dumps(data))
    code, out, err = run_summarize(summarize, capsys, tmp_path, "--per_run")
    assert code == 0 and err == ""
    main_table, runs = out.split("Runs, one line each:\n")
    assert len(table_rows(main_table.split("\n\n")[0])) == 2  # the table itself is unchanged
    header = [line for line in runs.splitlines() if line.startswith("| dataset")][0]
    assert header == ("| dataset | method | imb. ratio | epochs | seed | best top-1 (epoch) | last top-1 | many | medium "
                      "| few | NCM top-1 | samples/s | train time | wall time | folder |")
    lines = [line for line in runs.splitlines() if line.startswith("| CIFAR")]
    assert lines == [
        f"| CIFAR-10-LT | Hybrid-SC | 100 | 200 | 0 | 81.00 (199) | 80.00 | 90.00 | 80.00 | 70.00 | 69.00 | 1,000 | 1m "
        f"02s | 1m 40s | `` {tmp_path / 'sc`s0'} `` |",
        f"| CIFAR-10-LT | Hybrid-SC | 100 | 200 | 1 | 83.00 (199) | 82.00 | 90.00 | 80.00 | 70.00 | 70.00 | 1,000 | — | "
        f"1h 00m | `{tmp_path / 'a_s1'}` |",
        f"| CIFAR-10-LT | Hybrid-PSC | 100 | short schedule: 20 epochs | 0 | 75.50 | 81.00 | 90.00 | 80.00 | 70.00 | — "
        f"| — | — | 1h 00m | `{tmp_path}/psc\\|a\\nb` |"]
    code, out, err = run_summarize(summarize, capsys, tmp_path, "--per_run", "--csv")
    assert code == 0 and err == ""
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [(r["method"], r["seed"], r["folder"]) for r in rows] == [
        ("Hybrid-SC", "0", str(tmp_path / "sc`s0")), ("Hybrid-SC", "1", str(tmp_path / "a_s1")),
        ("Hybrid-PSC", "0", str(tmp_path / "psc|a\nb"))]
    assert rows[0]["best_epoch"] == "199" and float(rows[0]["train_time_s"]) == 61.5
    assert float(rows[0]["samples_per_s"]) == 1000.0 and float(rows[0]["wall_time_s"]) == 100.0
    assert (rows[2]["best_epoch"], rows[2]["samples_per_s"], rows[2]["train_time_s"], rows[2]["ncm_top1"]) == \
        ("", "", "", "")
    assert rows[2]["epochs"] == "20" and rows[2]["paper_schedule"] == "False" and float(rows[2]["best_top1"]) == 75.5
    out_file = tmp_path / "runs.csv"
    code, out, err = run_summarize(summarize, capsys, tmp_path, "--per_run", "--csv", "--out", out_file)
    assert code == 0 and out == "" and err == f"summarize.py: wrote 3 run lines from 3 runs to {out_file}\n"
    code, out, err = run_summarize(summarize, capsys, tmp_path, "--per_run", "--per_class", "--csv")
    assert (code, out) == (1, "") and err == ("summarize.py: error: --csv prints one table: give --per_class or "
                                              "--per_run, not both (markdown takes both)\n")
    code, out, _ = run_summarize(summarize, capsys, tmp_path, "--per_run", "--per_class")
    assert code == 0 and out.index("Per-class top-1") < out.index("Runs, one line each:")


@pytest.mark.parametrize("value, shown", [("0", None), ("1.5", None), ("true", None), ('"3"', None), ("-2", None),
                                          ("7.0", 7), ("7", 7)])
def test_a_best_epoch_that_is_not_an_epoch_is_not_recorded(summarize, tmp_path, capsys, value, shown):
    """best_epoch is bookkeeping beside best_top1 (it moves no mean): a file not written by main.py with an unusable
    one (0-based, text) still summarises, without it; a whole float (199.0, from pandas) is that epoch."""
    path = write_result(tmp_path, "a")
    path.write_text(path.read_text().replace('"best_epoch": 199', f'"best_epoch": {value}'))
    code, out, err = run_summarize(summarize, capsys, tmp_path, "--per_run")
    assert (code, err) == (0, "")
    [line] = [line for line in out.splitlines() if line.startswith("| CIFAR") and line.endswith(f"`{tmp_path / 'a'}` |")]
    assert f"| 82.00{'' if shown is None else f' ({shown})'} | 81.00 |" in line
    code, out, _ = run_summarize(summarize, capsys, tmp_path, "--per_run", "--csv")
    [row] = csv.DictReader(io.StringIO(out))
    assert row["best_epoch"] == ("" if shown is None else str(shown))


def test_summarize_leaves_devices_and_pipes_alone_and_says_when_its_output_fails(summarize, tmp_path, capsys,
                                                                                 monkeypatch):
    """--out on a pipe or a device (/dev/null) would have been replaced by a file (for root, the machine's /dev/null);
    a pipe named results.json would have been read forever; a table that cannot be written to stdout (a full
    disk) was a traceback. Each is one line and exit 1; a reader that left (`| head`) stays quiet."""
    write_result(tmp_path, "runs/a")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    code, out, err = run_summarize(summarize, capsys, tmp_path / "runs", "--out", fifo)
    assert (code, out) == (1, "") and err == (f"summarize.py: error: --out {fifo} is not a regular file (a device, a "
                                              "pipe or a socket), which writing the table would replace; give a file "
                                              "name, or leave --out out to print the table\n")
    code, _, err = run_summarize(summarize, capsys, tmp_path / "runs", "--out", os.devnull)
    assert code == 1 and "is not a regular file" in err and not Path(os.devnull).is_file()
    (tmp_path / "runs" / "b").mkdir()
    os.mkfifo(tmp_path / "runs" / "b" / "results.json")
    code, out, err = run_summarize(summarize, capsys, tmp_path / "runs")
    assert (code, out) == (1, "") and err == (f"summarize.py: error: {tmp_path / 'runs' / 'b' / 'results.json'} is not "
                                              "a file, so not a run's results: move it away\n")
    os.unlink(tmp_path / "runs" / "b" / "results.json")

    class Failing(io.StringIO):
        def __init__(self, error):
            super().__init__()
            self.error = error

        def write(self, text):
            raise self.error

    for error, said in ((OSError(errno.ENOSPC, "No space left on device"),
                         "summarize.py: error: cannot write the table to standard output: No space left on device\n"),
                        (BrokenPipeError(errno.EPIPE, "Broken pipe"), "")):
        monkeypatch.setattr(sys, "stdout", Failing(error))
        assert summarize.main([str(tmp_path / "runs")]) == 1
        assert capsys.readouterr().err == said
    monkeypatch.setattr(sys, "stdout", None)  # started with stdout closed (`>&-`)
    assert summarize.main([str(tmp_path / "runs")]) == 1
    assert capsys.readouterr().err == "summarize.py: error: standard output is closed; give --out FILE\n"


def test_rows_that_differ_only_in_lr_decay_or_batch_say_so(summarize, tmp_path, capsys):
    """Two 20-epoch rows with other lr decay epochs, and a step-profile run: no two columns or rows look alike."""
    write_result(tmp_path, "a", epochs=20, decay=(12, 16), batch_size=128)
    write_result(tmp_path, "b", epochs=20, decay=(10, 15), batch_size=128)
    write_result(tmp_path, "c", epochs=20, decay=(12, 16), batch_size=128, method="psc")
    write_result(tmp_path, "d", imb_type="step", per_class=[60.0] * 10,
                 class_counts=[5000] * 5 + [50] * 5)
    code, out, _ = run_summarize(summarize, capsys, tmp_path, "--per_class")
    assert code == 0
    main_rows = table_rows(out.split("\n\n")[0])
    assert sorted(r[9] for r in main_rows if r[1] == "Hybrid-SC" and r[2] == "100") == [
        "short schedule: 20 epochs, lr decay at 10,15, batch 128", "short schedule: 20 epochs, lr decay at 12,16, batch 128"]
    assert [r[9] for r in main_rows if r[1] == "Hybrid-PSC"] == ["short schedule: 20 epochs"]  # alone: short
    headers = [line for line in out.splitlines() if line.startswith("| class")]
    assert headers[0] == ("| class | train images | Hybrid-SC, short schedule: 20 epochs, lr decay at 10,15, batch 128 "
                          "(1 seed) | Hybrid-SC, short schedule: 20 epochs, lr decay at 12,16, batch 128 (1 seed) | "
                          "Hybrid-PSC, short schedule: 20 epochs (1 seed) |")
    assert "Per-class top-1 at the last epoch, CIFAR-10-LT, imbalance ratio 100 (step), 5000 .. 50 training" in out
    code, out, err = run_summarize(summarize, capsys, tmp_path, "--per_class", "--csv")
    lines = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and err == "" and len(lines) == 4 * 10
    assert sorted({(line["method"], line["lr_decay_epochs"], line["batch_size"], line["paper_schedule"])
                   for line in lines if line["imb_type"] == "exp"}) == [
        ("Hybrid-PSC", "12 16", "128", "False"), ("Hybrid-SC", "10 15", "128", "False"),
        ("Hybrid-SC", "12 16", "128", "False")]


def test_per_class_of_seeds_with_other_class_sizes_is_not_averaged(summarize, tmp_path, capsys):
    """A row's per-class values are averaged only where every seed records the same class sizes: a seed that does
    not record them (as in runs made before main.py recorded them) joins the row (its split unknown, which splits
    nothing), and the row has none."""
    write_result(tmp_path, "a", seed=0)
    path = write_result(tmp_path, "b", seed=1)
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "class_counts"}))
    without_counts = result_dict(method="psc")
    del without_counts["class_counts"]  # per-class values without the class sizes: not recorded either
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "results.json").write_text(json.dumps(without_counts))
    code, out, _ = run_summarize(summarize, capsys, tmp_path, "--per_class")
    assert code == 0 and "| class |" not in out
    assert out.rstrip().endswith("No per-class values (a run that does not record them, or seeds trained on "
                                 "different class sizes): CIFAR-10-LT ratio 100 Hybrid-SC (2 seeds); "
                                 "CIFAR-10-LT ratio 100 Hybrid-PSC (1 seed)")
    out_file = tmp_path / "per_class.csv"
    code, out, err = run_summarize(summarize, capsys, tmp_path, "--per_class", "--csv", "--out", out_file)
    assert code == 0 and out == "" and out_file.read_text().count("\n") == 1  # the header alone
    assert err.splitlines() == ["summarize.py: 2 rows without per-class values left out (a run that does not record "
                                "them, or seeds trained on different class sizes)",
                                f"summarize.py: wrote 0 per-class lines from 3 runs to {out_file}"]


def test_runs_on_another_split_are_a_row_of_their_own(summarize, tmp_path, capsys):
    """A smoke run on synthetic data (or a subset) beside the real runs of one recipe: its own row, labelled with its
    split, never averaged with them (nor a 'duplicate seed' with theirs), and named in the other-split note."""
    for seed in (0, 1):
        write_result(tmp_path, f"real{seed}", seed=seed, last=81.0 + seed)
        write_result(tmp_path, f"smoke{seed}", seed=seed, last=12.0,
                     class_counts=[50, 30, 17, 10, 6, 3, 2, 1, 1, 0][:9] + [1])
    code, out, err = run_summarize(summarize, capsys, tmp_path)
    assert code == 0 and err == "", err
    rows = {r[1]: r for r in table_rows(out)}
    assert sorted(rows) == ["Hybrid-SC [split=12,406 images, 5000..50 per class]",
                            "Hybrid-SC [split=121 images, 50..1 per class]"]
    real = rows["Hybrid-SC [split=12,406 images, 5000..50 per class]"]
    assert (real[3], real[5], real[-2]) == ("2 (0, 1)", "81.50 ± 0.71", "81.40")
    assert rows["Hybrid-SC [split=121 images, 50..1 per class]"][-2] == "—"
    assert "- Trained on another split than the full dataset's long-tailed one" in out


def test_sync_bn_on_one_process_is_plain_batch_norm_and_splits_nothing(summarize, tmp_path, capsys):
    """--sync_bn on one process changes nothing (main.py says so): the same row as without it; under torchrun it is
    a setting of its own."""
    write_result(tmp_path, "a", seed=0, config={"sync_bn": True})
    write_result(tmp_path, "b", seed=1, config={"sync_bn": False})
    for name in ("a", "b"):
        path = tmp_path / name / "results.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "world_size": 1}))
    code, out, _ = run_summarize(summarize, capsys, tmp_path)
    assert code == 0 and [(r[1], r[3]) for r in table_rows(out)] == [("Hybrid-SC", "2 (0, 1)")]
    for name in ("a", "b"):
        path = tmp_path / name / "results.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "world_size": 2}))
    code, out, _ = run_summarize(summarize, capsys, tmp_path)
    assert code == 0 and sorted(r[1] for r in table_rows(out)) == ["Hybrid-SC [sync_bn=False]",
                                                                   "Hybrid-SC [sync_bn=True]"]


def test_the_difference_is_that_of_the_values_shown(summarize, tmp_path, capsys):
    """last top-1 80.87 and 80.88 (mean 80.875, shown 80.88) against the paper's 81.40: -0.52, as the cells read
    (rounding 80.875 - 81.40 on its own gives -0.53); the CSV keeps the unrounded numbers."""
    write_result(tmp_path, "a", seed=0, last=80.87)
    write_result(tmp_path, "b", seed=1, last=80.88)
    code, out, _ = run_summarize(summarize, capsys, tmp_path)
    [row] = table_rows(out)
    assert code == 0 and (row[5].split(" ")[0], row[-2], row[-1]) == ("80.88", "81.40", "-0.52")


def test_a_folder_name_with_a_carriage_return_keeps_its_line_in_the_csv_and_its_cell(summarize, tmp_path, capsys):
    write_result(tmp_path, "odd\rname", seed=0)
    code, out, _ = run_summarize(summarize, capsys, tmp_path, "--per_run", "--csv")
    lines = list(csv.DictReader(io.StringIO(out, newline="")))
    assert code == 0 and len(lines) == 1 and lines[0]["folder"] == str(tmp_path / "odd\rname")
    code, out, _ = run_summarize(summarize, capsys, tmp_path, "--per_run")
    assert code == 0 and "`" + str(tmp_path / "odd") + "\\rname`" in out


def test_no_results_is_one_line_error(summarize, tmp_path, capsys):
    (tmp_path / "empty" / "run").mkdir(parents=True)
    code, out, err = run_summarize(summarize, capsys, tmp_path / "empty")
    assert code == 1 and out == ""
    assert err == f"summarize.py: error: no results.json found under {tmp_path / 'empty'}\n"
    code, _, err = run_summarize(summarize, capsys, tmp_path / "missing")
    assert code == 1 and "no such file or folder" in err
    # A path or an argument with a line break in it: still one line, the break shown as an escape.
    code, _, err = run_summarize(summarize, capsys, tmp_path / "a\nb")
    assert (code, err) == (1, f"summarize.py: error: no such file or folder: {tmp_path}/a\\nb\n")
    with pytest.raises(SystemExit) as caught:
        run_summarize(summarize, capsys, tmp_path, "--x\ny")
    assert caught.value.code == 2 and capsys.readouterr().err.endswith(
        "error: unrecognized arguments: --x\\ny (see --help)\n")
    # Only a run that has not finished: said so, not as if the folder held nothing.
    (tmp_path / "empty" / "run" / "config.json").write_text("{}")
    code, _, err = run_summarize(summarize, capsys, tmp_path / "empty")
    assert (code, err) == (1, f"summarize.py: error: no results.json found under {tmp_path / 'empty'} (only 1 run "
                              f"folder without one, running, stopped or failed: {tmp_path / 'empty' / 'run'})\n")


@pytest.mark.parametrize("content, reason", [
    ("{not json", "Expecting property name"),
    (json.dumps({k: v for k, v in result_dict().items() if k != "last_top1"}), "missing key 'last_top1'"),
    (json.dumps({**result_dict(), "best_top1": "81"}), "'best_top1' must be a number"),
    (json.dumps({**result_dict(), "last_top1": 0.81 * 1000}), "percentage in 0..100"),
    (json.dumps([1, 2]), "not a JSON object"),
    (json.dumps({**result_dict(), "per_class": [80.0] * 9}), "one value per class"),
    (json.dumps({**result_dict(), "per_class": [0.8] * 9 + [800.0]}), "percentages in 0..100, got 800.0 for class 9"),
    (json.dumps({**result_dict(), "class_counts": [5000] * 9 + [0.5]}), "non-negative integers, got 0.5 for class 9"),
    (json.dumps({**result_dict(), "ncm": {"top1": "61"}}), "'ncm' must be an object whose 'top1' is a percentage"),
    (json.dumps({**result_dict(), "ncm": 61.0}), "'ncm' must be an object whose 'top1' is a percentage"),
    pytest.param("[" * 100000 + "]" * 100000, "maximum recursion depth exceeded", id="nested-too-deep"),
    (json.dumps({**result_dict(), "many": float("inf")}), "'many' must be a percentage in 0..100, got inf"),
    (json.dumps({**result_dict(), "few": -1.0}), "'few' must be a percentage in 0..100, got -1.0"),
    (json.dumps({**result_dict(), "best_top1": 10 ** 400}), "'best_top1' must be a percentage in 0..100, got inf"),
    # a sparse file of 16 GiB, which read whole would take all the memory: read up to 64 MiB
    pytest.param(None, "it is larger than 64 MiB, far more than a run writes there", id="sparse-16-GiB"),
])
def test_malformed_results_name_the_file(summarize, tmp_path, capsys, content, reason):
    write_result(tmp_path, "good")
    bad = tmp_path / "bad" / "results.json"
    bad.parent.mkdir()
    bad.write_text(content or "{")
    if content is None:
        os.truncate(bad, 1 << 34)
    code, out, err = run_summarize(summarize, capsys, tmp_path)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and str(bad) in err and reason in err


def test_duplicate_seed_is_an_error_but_overlapping_dirs_count_once(summarize, tmp_path, capsys):
    write_result(tmp_path / "sweep", "a", seed=0, last=80.0)
    code, out, _ = run_summarize(summarize, capsys, tmp_path, tmp_path / "sweep")
    assert code == 0 and table_rows(out)[0][3] == "1 (0)"
    write_result(tmp_path / "copy", "a", seed=0, last=70.0)
    code, _, err = run_summarize(summarize, capsys, tmp_path)
    assert code == 1 and "1 seed of a row is in more than one run" in err and "seed 0 in " in err
    # Every doubled seed in one line (before, one pair per run of the summary), and the way out: --exclude.
    write_result(tmp_path / "sweep", "b", seed=1, last=80.0)
    write_result(tmp_path / "copy", "b", seed=1, last=70.0)
    write_result(tmp_path / "third", "b", seed=1, last=60.0)  # one seed in three folders: all named, keep one
    code, _, err = run_summarize(summarize, capsys, tmp_path)
    assert (code, err) == (1, f"summarize.py: error: 2 seeds of a row are in more than one run, which would weigh "
                              f"double in the row's mean: seed 0 in {tmp_path / 'copy' / 'a'}, {tmp_path / 'sweep' / 'a'}; "
                              f"seed 1 in {tmp_path / 'copy' / 'b'}, {tmp_path / 'sweep' / 'b'}, "
                              f"{tmp_path / 'third' / 'b'}; keep one run of each (leave the others out with --exclude "
                              f"GLOB, or summarise the folders without them)\n")
    (tmp_path / "third" / "b" / "results.json").unlink()
    (tmp_path / "copy" / "c").mkdir()
    (tmp_path / "copy" / "c" / "config.json").write_text("{}")  # unfinished: left out of the note too
    for exclude in ([f"{tmp_path}/copy/*"], ["a", "b"]):  # the folder's path, or its name alone
        code, out, err = run_summarize(summarize, capsys, tmp_path, *[f"--exclude={glob}" for glob in exclude])
        kept = ["2 (0, 1)"] if exclude[0] != "a" else []
        assert code == (0 if kept else 1) and [row[3] for row in table_rows(out)] == kept, err
        if not kept:
            assert err.startswith(f"summarize.py: error: no results.json found under {tmp_path} but those --exclude "
                                  f"names (only 1 run folder without one")
        else:
            assert err == ""


def test_runs_differing_in_a_training_setting_are_separate_labelled_rows(summarize, tmp_path, capsys):
    common = {"temp": 0.1, "amp": True, "output_dir": "x", "device": "auto"}
    for seed in (0, 1):
        write_result(tmp_path / "class", f"s{seed}", seed=seed, last=80.0 + seed,
                     config={**common, "ce_sampler": "class", "output_dir": f"class/s{seed}"})
    # Same seed 0, another sampler and device: a separate row, not a duplicate seed.
    write_result(tmp_path / "sqrt", "s0", seed=0, last=70.0,
                 config={**common, "ce_sampler": "sqrt", "device": "cuda"})
    write_result(tmp_path / "fp32", "s0", seed=0, last=60.0,
                 config={**common, "ce_sampler": "sqrt", "amp": False})
    code, out, err = run_summarize(summarize, capsys, tmp_path)
    assert code == 0 and err == ""
    rows = table_rows(out)
    assert [(r[1], r[3], r[5]) for r in rows] == [
        ("Hybrid-SC [amp=False, ce_sampler=sqrt]", "1 (0)", "60.00 ± n/a"),
        ("Hybrid-SC [amp=True, ce_sampler=class]", "2 (0, 1)", "80.50 ± 0.71"),
        ("Hybrid-SC [amp=True, ce_sampler=sqrt]", "1 (0)", "70.00 ± n/a"),
    ]
    # The paper's schedule: compared where the classifier branch is class-balanced, as the paper's was (a setting
    # that only tells the runs apart, amp here, does not stop it).
    assert [r[11] for r in rows] == ["—", "81.40", "—"]
    assert "[name=value]" in out
    code, out, _ = run_summarize(summarize, capsys, tmp_path, "--csv")
    assert [row["variant"] for row in csv.DictReader(io.StringIO(out))] == [
        "amp=False, ce_sampler=sqrt", "amp=True, ce_sampler=class", "amp=True, ce_sampler=sqrt"]


def test_settings_only_some_runs_record_or_bookkeeping_do_not_split_a_group(summarize, tmp_path, capsys):
    # A run from before a flag existed groups with later ones; paths, devices and logging never split.
    write_result(tmp_path, "old", seed=0, config={"temp": 0.1, "print_freq": 10, "lr_decay_epochs": [120, 160],
                                                  "ncm_every": 0, "compile_mode": "default"})
    write_result(tmp_path, "new", seed=1, config={"temp": 0.1, "new_flag": [1, 2], "print_freq": 50,
                                                  "data_root": "/elsewhere", "compile": True, "ncm_every": 5,
                                                  "compile_mode": "reduce-overhead"})
    code, out, _ = run_summarize(summarize, capsys, tmp_path)
    assert code == 0
    [row] = table_rows(out)
    assert row[1] == "Hybrid-SC" and row[3] == "2 (0, 1)" and "[name=value]" not in out
    # The same recipe twice for one seed is still a doubled seed.
    write_result(tmp_path, "copy", seed=1, config={"temp": 0.1, "output_dir": "copy"})
    code, _, err = run_summarize(summarize, capsys, tmp_path)
    assert code == 1 and "seed 1 in " in err and "is in more than one run" in err


def test_a_setting_that_splits_puts_runs_without_it_apart(summarize, tmp_path, capsys):
    # Runs that record ce_sampler disagree, so the run that does not record it cannot join either.
    write_result(tmp_path, "class", seed=0, config={"ce_sampler": "class", "sync_bn": False, "decay": [1, 2]})
    write_result(tmp_path, "sqrt", seed=1, config={"ce_sampler": "sqrt", "sync_bn": True, "decay": [1, 2]})
    write_result(tmp_path, "old", seed=2, config={"decay": [1, 2]})
    code, out, _ = run_summarize(summarize, capsys, tmp_path)
    assert code == 0
    assert [(r[1], r[3]) for r in table_rows(out)] == [
        ("Hybrid-SC [ce_sampler=?, sync_bn=?]", "1 (2)"),
        ("Hybrid-SC [ce_sampler=class, sync_bn=False]", "1 (0)"),
        ("Hybrid-SC [ce_sampler=sqrt, sync_bn=True]", "1 (1)"),
    ]
    assert "'?': the run does not record the setting" in out


def test_runs_without_a_setting_stay_apart_from_others_that_agree_on_a_value_other_than_the_papers(
        summarize, tmp_path, capsys):
    """A setting that labels every row (another model than the paper's): a run that does not record it may have used
    the paper's value, so it is not taken into the labelled row ('?'); one that agrees with the paper joins."""
    write_result(tmp_path, "s0", seed=0, config={"model": "resnet8", "warm_epochs": 5})
    write_result(tmp_path, "s1", seed=1, config={"model": "resnet8"})
    write_result(tmp_path, "s2", seed=2, config={"warm_epochs": 5})
    code, out, _ = run_summarize(summarize, capsys, tmp_path)
    assert code == 0
    assert [(r[1], r[3], r[-2]) for r in table_rows(out)] == [("Hybrid-SC [model=?]", "1 (2)", "—"),
                                                               ("Hybrid-SC [model=resnet8]", "2 (0, 1)", "—")]
    for name in ("s0", "s1"):
        (tmp_path / name / "results.json").unlink()
    write_result(tmp_path, "s0", seed=0, config={"model": "resnet32"})
    code, out, _ = run_summarize(summarize, capsys, tmp_path)
    assert [(r[1], r[3]) for r in table_rows(out)] == [("Hybrid-SC", "2 (0, 2)")]


def test_a_batch_size_missing_from_results_json_is_the_configs_or_said(summarize, tmp_path, capsys):
    """results.json without "batch_size" (not written by main.py, which always has): the config's; with neither,
    its row says 'batch ?' beside the row that records 512 rather than looking like it."""
    for name, seed, config in (("a", 0, {}), ("b", 1, {"batch_size": 512}), ("c", 2, {"batch_size": 512})):
        path = write_result(tmp_path, name, seed=seed, config=config)
        record = json.loads(path.read_text())
        del record["batch_size"]
        path.write_text(json.dumps(record))
    write_result(tmp_path, "d", seed=3)
    code, out, _ = run_summarize(summarize, capsys, tmp_path)
    assert code == 0
    assert sorted((r[3], r[9]) for r in table_rows(out)) == [("1 (0)", "200, batch ?"),
                                                               ("3 (1, 2, 3)", "200, batch 512")]


def test_a_default_and_the_same_value_given_explicitly_are_one_row(summarize, tmp_path, capsys):
    # results.json records what --amp / --psc_temp resolved to; the saved config keeps None for a default.
    def write(name, seed, config, method="psc", **resolved):
        path = write_result(tmp_path, name, seed=seed, method=method, config=config)
        path.write_text(json.dumps({**json.loads(path.read_text()), **resolved}))
        return path

    write("auto", 0, {"amp": None, "psc_temp": None}, amp=True, psc_temperature=1.0)
    write("explicit", 1, {"amp": True, "psc_temp": 1.0}, amp=True, psc_temperature=1.0)
    # Made before results.json recorded them: read from the config.json beside it, as main.py writes it.
    old = write("old", 2, {"amp": None, "psc_temp": None})
    (old.parent / "config.json").write_text(json.dumps({"seed": 2, "psc_temp": None, "amp": True,
                                                        "psc_temperature": 1.0}))
    code, out, _ = run_summarize(summarize, capsys, tmp_path)
    assert code == 0
    assert [(r[1], r[3]) for r in table_rows(out)] == [("Hybrid-PSC", "3 (0, 1, 2)")]
    # A default that resolved to another value is another recipe; one recorded nowhere is '?'.
    write("fp32", 3, {"amp": None, "psc_temp": None}, amp=False, psc_temperature=1.0)
    lost = write("lost", 4, {"amp": None, "psc_temp": 1.0})
    (lost.parent / "config.json").write_text("{cut off")  # unreadable: ignored, not an error
    code, out, _ = run_summarize(summarize, capsys, tmp_path)
    assert code == 0
    assert [(r[1], r[3]) for r in table_rows(out)] == [
        ("Hybrid-PSC [amp=?]", "1 (4)"), ("Hybrid-PSC [amp=False]", "1 (3)"), ("Hybrid-PSC [amp=True]", "3 (0, 1, 2)")]
    # Resumed in the other precision (main.py's results.json says "mixed"): trained in both, a row of its own.
    write("resumed", 5, {"amp": False, "psc_temp": None}, amp="mixed", psc_temperature=1.0)
    code, out, _ = run_summarize(summarize, capsys, tmp_path)
    assert code == 0
    assert sorted((r[1], r[3]) for r in table_rows(out)) == [
        ("Hybrid-PSC [amp=?]", "1 (4)"), ("Hybrid-PSC [amp=False]", "1 (3)"), ("Hybrid-PSC [amp=True]", "3 (0, 1, 2)"),
        ("Hybrid-PSC [amp=mixed]", "1 (5)")]


def test_a_run_from_before_a_flag_counts_as_what_the_code_did_then(summarize, tmp_path, capsys):
    # The CE calibration without grayscale beside the same recipe run before --gray_prob existed (0.2 then).
    write_result(tmp_path, "before_the_flag", method="ce", seed=0, last=65.0, config={"ce_sampler": "instance"})
    write_result(tmp_path, "no_gray", method="ce", seed=0, last=66.0,
                 config={"ce_sampler": "instance", "gray_prob": 0.0})
    code, out, err = run_summarize(summarize, capsys, tmp_path)
    assert code == 0, err
    assert [(r[1], r[5]) for r in table_rows(out)] == [
        ("CE [gray_prob=0.0]", "66.00 ± n/a"), ("CE [gray_prob=0.2]", "65.00 ± n/a")]
    write_result(tmp_path, "explicit", method="ce", seed=1, last=67.0,
                 config={"ce_sampler": "instance", "gray_prob": 0.2})
    code, out, _ = run_summarize(summarize, capsys, tmp_path)
    assert [(r[1], r[3]) for r in table_rows(out)] == [
        ("CE [gray_prob=0.0]", "1 (0)"), ("CE [gray_prob=0.2]", "2 (0, 1)")]


def test_summarize_knows_the_same_added_flags_as_main(summarize):
    import main  # torch is only needed here, not by summarize.py

    assert dict(summarize.FLAGS_ADDED_LATER) == dict(main.FLAGS_ADDED_LATER)
    assert dict(summarize.USED_BY) == dict(main.USED_BY)  # and the same settings that only some losses read
    assert dict(summarize.PAPER_TEMPERATURES["psc"][1]) == dict(main.PSC_TEMPERATURES)  # --psc_temp's defaults
    assert all(name in main.COMPARED_ON_RESUME for name in main.USED_BY)
    assert all(name in main.COMPARED_ON_RESUME for name in main.FLAGS_ADDED_LATER)
    defaults = {f.name: f.default for f in dataclasses.fields(main.Config)}
    # Each flag's default kept what the code did before it existed, except --bn_stats: its default became per_branch
    # after runs had been saved with joint, which they record (and older ones count as, by this table).
    assert {name: value for name, value in main.FLAGS_ADDED_LATER.items() if defaults[name] != value} == \
        {"bn_stats": "joint"}
    for name, value in main.FLAGS_ADDED_LATER.items():  # and each is a value the flag still takes
        if value is not None:
            assert getattr(main.parse_config([f"--{name}", str(value)]), name) == value


def test_settings_a_loss_does_not_read_do_not_split_its_rows(summarize, tmp_path, capsys):
    for method, seed, config in (("sc", 0, {"temp": 0.1, "psc_temp": 0.5, "psc_denominator": "all"}),
                                 ("sc", 1, {"temp": 0.1, "psc_temp": 1.0, "psc_denominator": "negatives"}),
                                 ("ce", 0, {"temp": 0.1}), ("ce", 1, {"temp": 0.07}),
                                 ("psc", 0, {"temp": 0.1, "psc_denominator": "all"}),
                                 ("psc", 1, {"temp": 0.07, "psc_denominator": "negatives"}),
                                 ("psc", 2, {"base_temp": 0.07, "psc_denominator": "negatives"}),
                                 ("sc", 2, {"temp": 0.1}), ("sc", 3, {"temp": 0.1, "base_temp": 0.07}),
                                 ("sc", 4, {"temp": 0.1, "base_temp": 0.1}),  # a factor of 1: no --base_temp
                                 ("ce", 2, {"bn_stats": "per_branch"}), ("ce", 3, {"sc_sampler": "class"}),
                                 ("psc", 3, {"bn_stats": "joint", "psc_denominator": "negatives"}),
                                 ("psc", 4, {"bn_stats": "per_branch", "psc_denominator": "negatives"})):
        write_result(tmp_path, f"{method}{seed}", method=method, seed=seed, config=config)
    code, out, _ = run_summarize(summarize, capsys, tmp_path)
    assert code == 0
    assert [(r[1], r[3]) for r in table_rows(out)] == [
        ("Hybrid-SC [base_temp=0.07]", "1 (3)"), ("Hybrid-SC [base_temp=auto]", "4 (0, 1, 2, 4)"),
        ("Hybrid-PSC [bn_stats=joint, psc_denominator=all]", "1 (0)"),
        ("Hybrid-PSC [bn_stats=joint, psc_denominator=negatives]", "3 (1, 2, 3)"),
        ("Hybrid-PSC [bn_stats=per_branch, psc_denominator=negatives]", "1 (4)"),
        ("CE", "4 (0, 1, 2, 3)")]


@pytest.mark.parametrize("flag, before, other", [("sc_aug", "paper", "supcon"),
                                                 ("alpha_schedule", "parabolic", "linear")])
def test_feature_branch_settings_split_only_the_hybrids_rows(summarize, tmp_path, capsys, flag, before, other):
    """A run from before the flag had the paper's form; CE has no feature branch (and no alpha), so it never
    splits."""
    for method, seed, config in (("sc", 0, {}), ("sc", 1, {flag: before}), ("sc", 2, {flag: other}),
                                 ("ce", 0, {}), ("ce", 1, {flag: other})):
        write_result(tmp_path, f"{method}{seed}", method=method, seed=seed, config=config)
    code, out, _ = run_summarize(summarize, capsys, tmp_path)
    assert code == 0
    hybrids = sorted([(f"Hybrid-SC [{flag}={before}]", "2 (0, 1)"), (f"Hybrid-SC [{flag}={other}]", "1 (2)")])
    assert [(r[1], r[3]) for r in table_rows(out)] == [*hybrids, ("CE", "2 (0, 1)")]


@pytest.mark.parametrize("method, flag, value", [
    ("sc", "alpha_schedule", "linear"), ("psc", "alpha_schedule", "equal"), ("sc", "sc_aug", "supcon"),
    ("psc", "psc_denominator", "all"), ("sc", "base_temp", 0.07),  # SupContrast's factor temp / base_temp on the loss
    # the paper's stated hyper-parameters (Section 4.1), PSC's temperature by dataset (CIFAR-10: 1.0)
    ("sc", "learning_rate", 0.05), ("psc", "momentum", 0.0), ("sc", "weight_decay", 5e-4), ("psc", "gray_prob", 0.0),
    ("sc", "temp", 0.07), ("psc", "psc_temp", 0.1), ("psc", "lr_decay_rate", 0.5),
    # the samplers the paper states for the two branches, and its projection width
    ("sc", "ce_sampler", "instance"), ("psc", "sc_sampler", "class"), ("sc", "feat_dim", 64),
])
def test_a_hybrid_in_another_form_than_the_papers_is_never_set_beside_it(summarize, tmp_path, capsys, method, flag,
                                                                         value):
    """Alone in the summary, at the paper's schedule, a run in another form of the method or with other
    hyper-parameters than the paper states is labelled with it and gets no paper value; the paper's form (given
    explicitly or not) gets it."""
    write_result(tmp_path, "other", method=method, seed=0, last=70.0, config={flag: value})
    code, out, _ = run_summarize(summarize, capsys, tmp_path)
    assert code == 0
    [row] = table_rows(out)
    label = {"sc": "Hybrid-SC", "psc": "Hybrid-PSC"}[method]
    assert row[1] == f"{label} [{flag}={value}]" and row[-2:] == ["—", "—"]
    assert "has no reference value" in out
    code, csv_out, _ = run_summarize(summarize, capsys, tmp_path, "--csv")
    [line] = list(csv.DictReader(io.StringIO(csv_out)))
    assert line["variant"] == f"{flag}={value}" and line["reference_top1"] == "" and line["reference_source"] == ""
    default = {"alpha_schedule": "parabolic", "sc_aug": "paper", "psc_denominator": "negatives", "learning_rate": 0.5,
               "momentum": 0.9, "weight_decay": 1e-4, "gray_prob": 0.2, "temp": 0.1, "psc_temp": 1.0,
               "lr_decay_rate": 0.1, "ce_sampler": "class", "sc_sampler": "instance", "feat_dim": 128,
               "base_temp": None}[flag]
    (tmp_path / "other" / "results.json").unlink()
    write_result(tmp_path, "paper_form", method=method, seed=0, last=70.0, config={flag: default})
    code, out, _ = run_summarize(summarize, capsys, tmp_path)
    [row] = table_rows(out)
    paper = {"sc": 81.40, "psc": 78.82}[method]
    assert row[1] == label and row[-2:] == [f"{paper:.2f}", f"{70.0 - paper:+.2f}"]
    if flag in ("alpha_schedule", "sc_aug", "psc_denominator", "ce_sampler", "sc_sampler", "feat_dim", "base_temp"):
        return
    # On a shorter schedule (a CPU run scales the lr with its batch) such a setting neither labels nor splits.
    (tmp_path / "paper_form" / "results.json").unlink()
    write_result(tmp_path, "short", method=method, seed=0, epochs=40, decay=(24, 32), batch_size=128,
                 config={flag: value})
    code, out, _ = run_summarize(summarize, capsys, tmp_path)
    [row] = table_rows(out)
    assert row[1] == label and row[-2:] == ["n/c", "n/c"]


def test_psc_temperature_the_paper_states_depends_on_the_dataset(summarize, tmp_path, capsys):
    """PSC's temperature in the paper: 1.0 on CIFAR-10, 0.1 on CIFAR-100, as recorded (resolved) by the run."""
    for dataset, temperature in (("cifar10", 1.0), ("cifar100", 0.1)):
        path = write_result(tmp_path, f"psc_{dataset}", dataset=dataset, method="psc", seed=0, last=60.0)
        path.write_text(json.dumps({**json.loads(path.read_text()), "psc_temperature": temperature}))
    code, out, _ = run_summarize(summarize, capsys, tmp_path)
    rows = table_rows(out)
    assert [(r[0], r[1], r[-2]) for r in rows] == [("CIFAR-10-LT", "Hybrid-PSC", "78.82"),
                                                 ("CIFAR-100-LT", "Hybrid-PSC", "44.97")]
    # A dataset the paper has no temperature (nor value) for is summarised, without one.
    write_result(tmp_path, "psc_other", dataset="svhn", method="psc", seed=0, last=60.0, class_counts=[50, 5])
    code, out, _ = run_summarize(summarize, capsys, tmp_path)
    assert code == 0 and [r[-2] for r in table_rows(out) if r[0] == "svhn"] == ["—"]


@pytest.mark.parametrize("field, values, labels", [
    ("world_size", (1, 4), ("world_size=1", "world_size=4")),  # top level of results.json, not in config
    ("world_size", (1, "mixed"), ("world_size=1", "world_size=mixed")),  # resumed with another number
    ("eval_every", (1, 5), ("eval_every=1", "eval_every=5")),  # changes which epochs 'best' picks from
    ("eval_every", (1, "mixed"), ("eval_every=1", "eval_every=mixed")),  # resumed with another (main.py's config)
    ("sync_bn", (True, "mixed"), ("sync_bn=True", "sync_bn=mixed")),  # resumed with(out) synchronised batch norm
    ("lr_decay_epochs", ([120, 160], [100]), None),  # part of the schedule: split by the key, no label
])
def test_processes_and_evaluation_interval_split_a_group(summarize, tmp_path, capsys, field, values, labels):
    for name, value in zip("ab", values):
        if field == "world_size":
            path = write_result(tmp_path, name, seed=0)
            result = json.loads(path.read_text())
            path.write_text(json.dumps({**result, "world_size": value}))
        elif field == "lr_decay_epochs":
            write_result(tmp_path, name, seed=0, decay=tuple(value), config={"lr_decay_epochs": value})
        else:
            write_result(tmp_path, name, seed=0, config={field: value})
    code, out, _ = run_summarize(summarize, capsys, tmp_path)
    assert code == 0
    methods = sorted(r[1] for r in table_rows(out))
    assert methods == (["Hybrid-SC", "Hybrid-SC"] if labels is None else [f"Hybrid-SC [{label}]" for label in labels])


def test_format_duration(summarize):
    assert [summarize.format_duration(s) for s in (None, 4.6, 65, 3600 * 2 + 7 * 60 + 59)] == [
        "—", "5s", "1m 05s", "2h 07m"]
    # Unusable durations show as unknown rather than crash (int(round(nan)) is a ValueError, of inf an OverflowError).
    assert [summarize.format_duration(s) for s in (math.nan, math.inf, -math.inf, -5.0)] == ["—"] * 4


def test_summarize_counts_an_unusable_wall_time_as_not_recorded(summarize, tmp_path, capsys):
    """NaN, Infinity, a negative or an integer too large for a float: '—' (an empty CSV cell), and the row's mean
    wall time is over the runs with a usable one; the accuracies are still reported."""
    write_result(tmp_path, "nan", seed=0, wall_time_s=float("nan"))
    code, out, err = run_summarize(summarize, capsys, tmp_path)
    assert code == 0 and err == "" and table_rows(out)[0][10] == "—"
    for seed, wall_time in ((1, float("inf")), (2, -60.0), (3, 10 ** 400), (4, 65.0)):
        write_result(tmp_path, f"s{seed}", seed=seed, wall_time_s=wall_time)
    code, out, err = run_summarize(summarize, capsys, tmp_path)
    assert code == 0 and err == ""
    [row] = table_rows(out)
    assert row[3] == "5 (0, 1, 2, 3, 4)" and row[10] == "1m 05s"
    (tmp_path / "s4" / "results.json").unlink()
    code, out, _ = run_summarize(summarize, capsys, tmp_path, "--csv")
    [line] = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and line["wall_time_s_mean"] == "" and line["n_seeds"] == "4"


def test_summarize_ignores_a_config_json_nested_too_deep_like_an_unreadable_one(summarize, tmp_path, capsys):
    path = write_result(tmp_path, "old", seed=0)  # records neither amp nor psc_temperature: reads config.json
    (path.parent / "config.json").write_text("[" * 100000 + "]" * 100000)
    code, out, err = run_summarize(summarize, capsys, tmp_path)
    assert code == 0 and err == "" and table_rows(out)[0][3] == "1 (0)"


def test_summarize_cli_runs_as_a_script(tmp_path):
    write_result(tmp_path, "a")
    result = subprocess.run([sys.executable, str(SCRIPTS / "summarize.py"), str(tmp_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "| CIFAR-10-LT | Hybrid-SC | 100 |" in result.stdout


def summarize_script(*args, **kwargs) -> subprocess.CompletedProcess:
    """scripts/summarize.py run as a script (what a user sees: exit status, stdout, stderr)."""
    return subprocess.run([sys.executable, str(SCRIPTS / "summarize.py"), *[str(a) for a in args]],
                          capture_output=True, text=True, timeout=60, **kwargs)


def assert_one_line_error(result: subprocess.CompletedProcess, message: str, code: int = 1) -> None:
    assert result.returncode == code and result.stdout == "", result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("summarize.py: error: ")
    assert message in result.stderr, result.stderr


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under root with its bytes (None for a folder): what a failed command must leave as it was."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("args, message", [
    ([], "the following arguments are required: DIR (see --help)"),
    (["runs", "--bogus"], "unrecognized arguments: --bogus (see --help)"),
    (["runs", "--out"], "argument --out: expected one argument (see --help)"),
])
def test_summarize_usage_errors_are_one_line_and_exit_2(tmp_path, args, message):
    write_result(tmp_path / "runs", "a")
    assert_one_line_error(summarize_script(*args, cwd=tmp_path), message, code=2)


def test_summarize_empty_names_are_one_line(tmp_path):
    """An empty variable in a script: neither the current folder summarised nor the table printed instead."""
    write_result(tmp_path / "runs", "a")
    before = tree(tmp_path)
    assert_one_line_error(summarize_script("", cwd=tmp_path), "an empty folder name; give run folders or their parents")
    assert_one_line_error(summarize_script("runs", "--out", "", cwd=tmp_path),
                          "--out is empty: give a file name, or drop --out to print the table")
    assert tree(tmp_path) == before


def test_summarize_paths_it_cannot_look_at_are_one_line(tmp_path):
    """A name too long for the file system (as a folder that cannot be entered would) makes Path.is_file raise."""
    write_result(tmp_path / "runs", "a")
    long_name = "x" * 300
    assert_one_line_error(summarize_script(long_name, cwd=tmp_path), f"cannot look at {long_name}: File name too long")
    before = tree(tmp_path)
    assert_one_line_error(summarize_script("runs", "--out", long_name, cwd=tmp_path), "File name too long")
    assert tree(tmp_path) == before


def test_summarize_to_a_terminal_without_unicode_writes_the_table(tmp_path):
    """A stdout whose encoding has no '—' (PYTHONIOENCODING=latin-1 here; LANG=C on older Pythons) gets '?' for
    it, not a traceback."""
    write_result(tmp_path / "runs", "a")
    result = summarize_script("runs", cwd=tmp_path, env={**os.environ, "PYTHONIOENCODING": "latin-1"},
                              encoding="latin-1")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert "| CIFAR-10-LT | Hybrid-SC | 100 |" in result.stdout and "?" in result.stdout


def test_summarize_into_a_closed_pipe_is_quiet(tmp_path):
    """`summarize.py runs | head`: a reader that stops early costs no traceback (exit 1, as for any EPIPE)."""
    write_result(tmp_path / "runs", "a")
    proc = subprocess.Popen([sys.executable, str(SCRIPTS / "summarize.py"), str(tmp_path / "runs")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # before the script (still importing numpy) writes its table
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and err == "", err


@pytest.mark.parametrize("out, message", [
    ("folder", "--out folder is a folder"),
    ("nofolder/table.md", "cannot write nofolder/table.md: No such file or directory"),
    ("afile/table.md", "cannot write afile/table.md: Not a directory"),
])
def test_summarize_out_that_cannot_be_written_is_one_line(tmp_path, out, message):
    write_result(tmp_path / "runs", "a")
    (tmp_path / "folder").mkdir()
    (tmp_path / "afile").write_text("kept\n")
    before = tree(tmp_path)
    assert_one_line_error(summarize_script("runs", "--out", out, cwd=tmp_path), message)
    assert tree(tmp_path) == before  # nothing written, no temporary file left


def test_summarize_out_on_a_read_only_filesystem_is_one_line(summarize, tmp_path, capsys, monkeypatch):
    """Root ignores permissions and a test cannot mount a read-only filesystem: creating the file fails as there."""
    write_result(tmp_path, "a")
    table = tmp_path / "table.md"
    table.write_text("the old table\n")

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    monkeypatch.setattr(Path, "write_text", read_only)  # the same failure for a plain write
    code, out, err = run_summarize(summarize, capsys, tmp_path, "--out", table)
    assert code == 1 and out == "" and err == f"summarize.py: error: cannot write {table}: Read-only file system\n"
    assert table.read_text() == "the old table\n"


def test_summarize_out_is_replaced_atomically_and_kept_when_the_disk_fills(tmp_path):
    """A file size limit makes the write fail with EFBIG part-way, as a full disk does with ENOSPC: the old
    table stays byte-identical and no temporary file is left; a write that succeeds keeps the file's mode."""
    write_result(tmp_path / "runs", "a")
    table = tmp_path / "table.md"
    table.write_bytes(b"the old table\n" * 8)
    table.chmod(0o640)
    before = tree(tmp_path)

    def limit_file_size():  # Python ignores SIGXFSZ, so the write returns EFBIG instead of killing it
        resource.setrlimit(resource.RLIMIT_FSIZE, (256, 256))
    result = summarize_script("runs", "--out", table, cwd=tmp_path, preexec_fn=limit_file_size)
    assert_one_line_error(result, f"cannot write {table}: File too large")
    assert tree(tmp_path) == before
    result = summarize_script("runs", "--out", table, cwd=tmp_path)
    assert result.returncode == 0 and table.read_text().startswith("| dataset |")
    assert table.stat().st_mode & 0o777 == 0o640 and sorted(os.listdir(tmp_path)) == ["runs", "table.md"]


@pytest.mark.parametrize("args, out", [
    (["runs"], "runs/a/results.json"),
    (["runs"], "runs/b/../a/results.json"),  # the same file by another name
    (["runs/a/results.json"], "runs/a/results.json"),  # given as a file
    (["runs"], "link.json"),  # a symlink to it
    (["runs"], "runs/a/config.json"),  # read too, for runs that do not record amp / psc_temperature
])
def test_summarize_out_may_not_replace_a_file_it_reads(summarize, tmp_path, capsys, monkeypatch, args, out):
    write_result(tmp_path / "runs", "a")
    write_result(tmp_path / "runs", "b", seed=1)
    (tmp_path / "runs" / "a" / "config.json").write_text('{"seed": 0}')
    (tmp_path / "link.json").symlink_to(tmp_path / "runs" / "a" / "results.json")
    before = tree(tmp_path)
    monkeypatch.chdir(tmp_path)
    code, stdout, err = run_summarize(summarize, capsys, *args, "--out", out)
    assert code == 1 and stdout == "" and err.count("\n") == 1
    assert err.startswith(f"summarize.py: error: --out {out} would replace ") and "which this summary reads" in err
    assert tree(tmp_path) == before


@pytest.mark.parametrize("out", ["runs/a/last.pt", "runs/a/best.pt", "runs/a/events.out.tfevents.1.host.1",
                                 "runs/a/projector_config.pbtxt"])
def test_summarize_out_may_not_replace_a_file_of_a_run(summarize, tmp_path, capsys, monkeypatch, out):
    """A checkpoint or TensorBoard file in a run folder the summary reads is the run's, not a place for a table;
    the same name elsewhere is a file like any other."""
    write_result(tmp_path / "runs", "a")
    (tmp_path / out).write_bytes(b"checkpoint")
    before = tree(tmp_path)
    monkeypatch.chdir(tmp_path)
    code, stdout, err = run_summarize(summarize, capsys, "runs", "--out", out)
    assert code == 1 and stdout == ""
    assert err == f"summarize.py: error: --out {out} would replace a file of the run in {tmp_path / 'runs' / 'a'}; " \
                  "give another file\n"
    assert tree(tmp_path) == before
    elsewhere = Path(out).name
    code, _, _ = run_summarize(summarize, capsys, "runs", "--out", elsewhere)
    assert code == 0 and "Hybrid-SC" in (tmp_path / elsewhere).read_text()


@pytest.mark.parametrize("folder", ["runs/stopped", "other/run"])
@pytest.mark.parametrize("name", ["last.pt", "results.json"])
def test_summarize_out_may_not_replace_a_file_of_a_run_it_does_not_read(summarize, tmp_path, capsys, monkeypatch,
                                                                       folder, name):
    """A run folder left out as unfinished (config.json and last.pt, no results.json: its checkpoint is all that
    run has), or another run's outside the folders summarised: --out there replaced its last.pt with the table."""
    write_result(tmp_path / "runs", "a")
    (tmp_path / folder).mkdir(parents=True)
    (tmp_path / folder / "config.json").write_text('{"loss": "sc", "imb_factor": 0.01, "epochs": 200}')
    (tmp_path / folder / "last.pt").write_bytes(b"checkpoint")
    before = tree(tmp_path)
    monkeypatch.chdir(tmp_path)
    out = f"{folder}/{name}"
    code, stdout, err = run_summarize(summarize, capsys, "runs", "--out", out)
    assert code == 1 and stdout == ""
    assert err.endswith(f"summarize.py: error: --out {out} would replace a file of the run in {tmp_path / folder}; "
                        "give another file\n")
    assert tree(tmp_path) == before


def test_a_folder_name_that_is_not_utf8_is_written_to_out(summarize, tmp_path, capsys):
    """A run folder named with bytes that are not UTF-8 reaches the table as Python's surrogate escapes, which
    --out could not encode (a traceback): written as a backslash escape, the file stays UTF-8."""
    name = os.fsdecode(b"odd\xffname")
    write_result(tmp_path / "runs", name)
    for extra in ([], ["--csv"]):
        table = tmp_path / ("t.csv" if extra else "t.md")
        code, _, err = run_summarize(summarize, capsys, tmp_path / "runs", "--per_run", *extra, "--out", table)
        assert code == 0, err
        assert "odd\\udcffname" in table.read_bytes().decode("utf-8")


@pytest.mark.parametrize("encoding", ["utf-8", "ascii"])
def test_a_folder_name_that_is_not_utf8_prints_as_out_writes_it(tmp_path, encoding):
    """On standard output too the name's undecodable byte is the escape --out writes (it was '?', which names no
    folder); a character the terminal lacks ('±' in ASCII) is still '?'."""
    name = os.fsdecode(b"odd\xffname")
    write_result(tmp_path / "runs", name)
    write_result(tmp_path / "runs", "b", seed=1)
    result = summarize_script(tmp_path / "runs", "--per_run", env={**os.environ, "PYTHONIOENCODING": encoding})
    assert result.returncode == 0, result.stderr
    assert "odd\\udcffname" in result.stdout and "odd?name" not in result.stdout
    assert ("±" in result.stdout) == (encoding == "utf-8") and (" ? " in result.stdout) == (encoding == "ascii")


def test_a_config_json_that_is_a_pipe_is_not_read(tmp_path):
    """A results.json without the settings that older runs lack takes them from the config.json beside it,
    unless that is not a regular file: a pipe there made the summary wait forever."""
    path = write_result(tmp_path / "runs", "a")
    record = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in record.items() if k != "amp"}))
    os.mkfifo(path.parent / "config.json")
    result = summarize_script(tmp_path / "runs")  # (in a process of its own: a regression waits, then times out)
    assert result.returncode == 0 and "Hybrid-SC" in result.stdout, result.stderr


def test_summarize_reads_utf8_whatever_the_locale(tmp_path):
    """JSON is UTF-8: a results.json and the config.json beside it holding UTF-8 text (a note added by hand, a
    path) are read under an ASCII locale too, where the one was 'malformed' and the other's settings ignored."""
    from helpers import ascii_locale_env

    for seed, amp in ((0, True), (1, False)):  # runs that record amp in their config.json only (made before
        path = write_result(tmp_path / "runs", f"s{seed}", seed=seed)  # results.json recorded it)
        path.write_text(json.dumps({**json.loads(path.read_text()), "note": "d\u00e9j\u00e0 vu"}, ensure_ascii=False),
                        encoding="utf-8")
        (path.parent / "config.json").write_text(json.dumps({"amp": amp, "data_root": "/donn\u00e9es"},
                                                            ensure_ascii=False), encoding="utf-8")
    result = summarize_script(tmp_path / "runs", env=ascii_locale_env())
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if "| Hybrid-SC" in line]
    assert len(rows) == 2 and "amp=True" in rows[0] + rows[1] and "amp=False" in rows[0] + rows[1], result.stdout


def test_summarize_knows_the_files_main_writes_in_a_run_folder(summarize):
    import main
    assert set(main.RUN_FILES) | {main.PROJECTOR_CONFIG} == set(summarize.RUN_FOLDER_FILES)


# ---- sweep.sh / table1.sh with a fake main.py ------------------------------------------------

FAKE_MAIN = r'''#!{python}
"""Fake main.py: logs its call and follows the run-folder contract of the real one."""
import json, os, signal, sys, time

main_path, args = sys.argv[1], sys.argv[2:]
value = lambda flag: args[args.index(flag) + 1]
out = value("--output_dir")
name = os.path.basename(out)


def log(event, **extra):
    record = {{"event": event, "name": name, "main": main_path, "args": args, "pid": os.getpid(),
              "gpu": os.environ.get("CUDA_VISIBLE_DEVICES"), "time": time.time(), **extra}}
    with open(os.environ["FAKE_LOG"], "a") as f:
        f.write(json.dumps(record) + "\n")


def finish():
    open(os.path.join(out, "last.pt"), "w").close()
    with open(os.path.join(out, ".results.json.tmp"), "w") as f:  # atomically, as util.atomic_write: a new inode
        json.dump({{"dataset": value("--dataset"), "method": value("--loss"), "imb_type": "exp",
                   "imb_factor": float(value("--imb_factor")), "imbalance_ratio": 1.0 / float(value("--imb_factor")),
                   "seed": int(value("--seed")), "epochs": 200, "lr_decay_epochs": [120, 160],
                   "batch_size": 512, "best_top1": 80.0, "last_top1": 79.0, "many": 90.0,
                   "medium": 80.0, "few": 70.0, "wall_time_s": 12.0}}, f)
    os.replace(os.path.join(out, ".results.json.tmp"), os.path.join(out, "results.json"))
    log("end")


if "--dry_run" in args:  # like main.py's: checks the flags and the data, writes nothing, has no signal handler
    log("dry_run")
    time.sleep(float(os.environ.get("FAKE_DRY_RUN_SLEEP", "0")))
    if os.environ.get("FAKE_DRY_RUN_FAIL") and os.environ.get("FAKE_DRY_RUN_FAIL_FACTOR",
                                                              value("--imb_factor")) in ("", value("--imb_factor")):
        sys.exit("error: " + os.environ["FAKE_DRY_RUN_FAIL"])
    if os.environ.get("FAKE_DRY_RUN_COMMON_NOTE"):  # like main.py's note on a CUDA_VISIBLE_DEVICES hiding every GPU
        print("note:", os.environ["FAKE_DRY_RUN_COMMON_NOTE"])
    if os.environ.get("CUDA_VISIBLE_DEVICES") in os.environ.get("FAKE_NO_GPU", "").split():  # an id no GPU has
        print(os.environ["FAKE_NO_GPU_NOTE"].replace("GPU_ID", os.environ["CUDA_VISIBLE_DEVICES"]))
    if os.environ.get("FAKE_DRY_RUN_NOTE") and os.environ.get("FAKE_DRY_RUN_NOTE_LOSS", value("--loss")) == value("--loss"):
        # like main.py's notes on flags that are legal but rarely meant (for one loss, when FAKE_DRY_RUN_NOTE_LOSS)
        print("note:", os.environ["FAKE_DRY_RUN_NOTE"], "(imb_factor", value("--imb_factor") + ")")
    print("dry run: would start a run in", out)
    sys.exit(0)


# Like main.py: a signal asks the run to stop after the current step (a second one would mean
# "stop now"); the signals received are logged so a test can see that exactly one arrived. The
# handlers go in before "start" is logged, so a test that signals on seeing "start" never meets
# the default handlers, however slowly this interpreter starts on a loaded machine.
signals = []
for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, lambda signum, frame: signals.append(signum))
log("start")
if name in os.environ.get("FAKE_BUSY", "").split():  # like main.py on a folder another process has locked
    print("error:", out, "is in use by another process training this run", file=sys.stderr)
    sys.exit(75)
holds_run = os.path.exists(os.path.join(out, "config.json")) or os.path.exists(os.path.join(out, "last.pt"))
if "--resume" in args and not os.path.exists(os.path.join(out, "last.pt")):
    sys.exit("error: --resume but no last.pt")
if holds_run and "--resume" not in args and "--overwrite" not in args:
    sys.exit("error: folder holds a run; --resume or --overwrite")
if "--resume" in args and os.path.exists(os.path.join(out, "results.json")):  # finished: check, do nothing
    # (main.py compares only the recipe settings; here any other argument counts, which the tests avoid)
    deadline = time.time() + float(os.environ.get("FAKE_CHECK_SLEEP", "0"))
    while time.time() < deadline and not signals:
        time.sleep(0.01)
    if signals:  # main.py has no handler yet while it checks: the signal ends it
        log("killed", signals=signals)
        if os.environ.get("FAKE_CHECK_INTERRUPTED_EXIT"):  # as torchrun exits (1) whatever its worker did
            sys.exit(int(os.environ["FAKE_CHECK_INTERRUPTED_EXIT"]))
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
    recipe = lambda a: [x for x in a if x not in ("--resume", "--overwrite")]
    with open(os.path.join(out, "config.json")) as f:
        if recipe(json.load(f)["args"]) != recipe(args):
            sys.exit("error: checkpoint was made with other settings")
    try:
        with open(os.path.join(out, "results.json")) as f:
            json.load(f)
    except ValueError:  # like main.py: a results.json that cannot be read is written again from last.pt
        print("note: results.json cannot be read; it is written again", flush=True)
        finish()
        sys.exit(0)
    print(out, "already finished; nothing to do", flush=True)
    log("checked")
    sys.exit(0)
os.makedirs(out, exist_ok=True)
with open(os.path.join(out, "config.json"), "w") as f:
    json.dump({{"args": args}}, f)
print("training", name, flush=True)
if os.environ.get("FAKE_FINISH_FIRST") == name:  # the run finishes, and a signal then meets it on its way out
    finish()
deadline = time.time() + float(os.environ.get("FAKE_SLEEP", "0"))
while time.time() < deadline and not signals:
    time.sleep(0.01)
if signals:
    time.sleep(0.5)  # the "current step": time for a second signal to arrive, if one is sent
    open(os.path.join(out, "last.pt"), "w").close()
    log("stopped", signals=signals)
    sys.exit(130)
if os.environ.get("FAKE_FAIL") == name:
    sys.exit(3)
finish()
'''


@pytest.fixture
def fake(tmp_path):
    """(env, read_log): env runs the sweep scripts against the fake main.py."""
    script = tmp_path / "fake_main.py"
    script.write_text(FAKE_MAIN.format(python=sys.executable))
    script.chmod(0o755)
    log_file = tmp_path / "calls.jsonl"
    env = {k: v for k, v in os.environ.items()
           if k not in ("CUDA_VISIBLE_DEVICES", "FAKE_FAIL", "FAKE_SLEEP", "FAKE_FINISH_FIRST", "FAKE_CHECK_SLEEP",
                        "FAKE_CHECK_INTERRUPTED_EXIT",
                        "FAKE_DRY_RUN_FAIL", "FAKE_DRY_RUN_FAIL_FACTOR", "FAKE_DRY_RUN_SLEEP", "FAKE_BUSY")}
    env.update(PYTHON=str(script), FAKE_LOG=str(log_file))

    def read_log(event="start"):
        if not log_file.exists():
            return []
        records = [json.loads(line) for line in log_file.read_text().splitlines()]
        return [r for r in records if r["event"] == event]

    return env, read_log


def run_script(name, args, env):
    """Runs scripts/<name>; in the test's tmp folder, so a default --runs_dir lands there."""
    return subprocess.run(["bash", str(SCRIPTS / name), *args], env=env, capture_output=True,
                          text=True, timeout=60, cwd=Path(env["FAKE_LOG"]).parent)


def summary_statuses(stdout: str) -> dict[str, str]:
    """Folder name -> status, from the summary the sweep prints at the end."""
    lines = stdout.split("summary (", 1)[1].splitlines()[1:]
    return {Path(line.split()[0]).name: line.split(None, 1)[1] for line in lines}


def test_sweep_runs_each_config_in_its_folder_then_skips(fake, tmp_path, summarize, capsys):
    env, read_log = fake
    runs = tmp_path / "runs"
    args = ["--dataset", "cifar10", "--imb_factors", "0.01 0.005", "--methods", "sc ce",
            "--seeds", "0 1", "--runs_dir", str(runs), "--", "--epochs", "3", "--batch_size", "8"]
    result = run_script("sweep.sh", args, env)
    assert result.returncode == 0, result.stderr
    expected = {f"cifar10_{m}_r{r}_s{s}" for m in ("sc", "ce") for r in (100, 200) for s in (0, 1)}
    assert {p.name for p in runs.iterdir()} == expected
    assert all((runs / name / "results.json").exists() for name in expected)
    calls = read_log()
    assert [c["name"] for c in calls][:4] == [  # seeds outermost, then imb_factor, then method
        "cifar10_sc_r100_s0", "cifar10_ce_r100_s0", "cifar10_sc_r200_s0", "cifar10_ce_r200_s0"]
    for call in calls:
        name, a = call["name"], call["args"]
        method, ratio, seed = name.split("_")[1:]
        assert call["main"] == str(REPO_ROOT / "main.py") and call["gpu"] is None
        assert a == ["--dataset", "cifar10", "--imb_type", "exp", "--imb_factor", {"r100": "0.01", "r200": "0.005"}[ratio],
                     "--loss", method, "--seed", seed[1:], "--output_dir", str(runs / name),
                     "--epochs", "3", "--batch_size", "8"]
        assert f"[{name}] " in result.stdout and "--output_dir" in result.stdout  # command printed
    assert summary_statuses(result.stdout) == {name: "done" for name in expected}
    # Before any run, a dry run as each run whose imb_factor or method no earlier run had, in a scratch folder
    # that is never created: cifar10_sc_r100_s0, cifar10_ce_r100_s0 (a new method), cifar10_sc_r200_s0 (a new
    # factor); not cifar10_ce_r200_s0 or the seed-1 runs.
    dry_runs = read_log("dry_run")
    assert [d["name"] for d in dry_runs] == ["dry_run"] * 3 and dry_runs[-1]["time"] < calls[0]["time"]
    for dry, call in zip(dry_runs, calls[:3]):
        scratch = dry["args"][dry["args"].index("--output_dir") + 1]
        assert not Path(scratch).parent.exists() and runs not in Path(scratch).parents
        assert dry["args"] == [*call["args"][:11], scratch, *call["args"][12:], "--dry_run"]
        assert f"checking the flags, the device and the data: main.py --dry_run as {call['name']}\n" in result.stdout

    again = run_script("sweep.sh", args, env)
    assert again.returncode == 0
    assert len(read_log("end")) == len(expected)  # nothing ran a second time: each finished run was only checked
    assert sorted(c["name"] for c in read_log("checked")) == sorted(expected)
    assert all("--resume" in c["args"] for c in read_log()[len(expected):])
    assert summary_statuses(again.stdout) == {name: "skipped" for name in expected}
    assert again.stdout.count("finished already: checking its settings") == len(expected)

    # The same folders under other settings: each finished run is a failure that says why, none is taken for
    # this sweep's, and nothing in them changes.
    before = {name: (runs / name / "results.json").read_text() for name in expected}
    other = run_script("sweep.sh", [*args, "--alpha_schedule", "linear"], env)
    assert other.returncode == 1
    assert set(summary_statuses(other.stdout).values()) == {
        "FAILED (finished already, but main.py --resume refused it: exit 1; other settings (use another "
        "--runs_dir), an unreadable checkpoint or a bad flag)"}
    assert other.stderr.count("error: checkpoint was made with other settings") == len(expected)
    assert len(read_log("end")) == len(expected)
    assert {name: (runs / name / "results.json").read_text() for name in expected} == before
    # A finished run whose last.pt was deleted cannot be checked: it is skipped, as before.
    name = sorted(expected)[0]
    (runs / name / "last.pt").unlink()
    pruned = run_script("sweep.sh", args, env)
    assert pruned.returncode == 0 and summary_statuses(pruned.stdout)[name] == "skipped"
    assert f"[{name}] finished already (no last.pt to check its settings against): skipped" in pruned.stdout
    assert name not in [c["name"] for c in read_log("checked")[len(expected):]]
    assert len(read_log("dry_run")) == 3  # every run had finished in the later calls: checking them reads no data

    code, out, _ = run_summarize(summarize, capsys, runs)
    assert code == 0 and [r[3] for r in table_rows(out)] == ["2 (0, 1)"] * 4


def test_sweep_resumes_unfinished_and_overwrites_crashed_runs(fake, tmp_path):
    env, read_log = fake
    runs = tmp_path / "runs"
    (runs / "cifar100_sc_r100_s0").mkdir(parents=True)
    (runs / "cifar100_sc_r100_s0" / "config.json").write_text("{}")
    (runs / "cifar100_sc_r100_s0" / "last.pt").write_text("")
    (runs / "cifar100_psc_r100_s0").mkdir()
    (runs / "cifar100_psc_r100_s0" / "config.json").write_text("{}")
    result = run_script("sweep.sh", ["--dataset", "cifar100", "--imb_factors", "0.01",
                                     "--methods", "sc psc ce", "--runs_dir", str(runs)], env)
    assert result.returncode == 0, result.stdout + result.stderr
    flags = {c["name"]: [a for a in c["args"] if a in ("--resume", "--overwrite")] for c in read_log()}
    assert flags == {"cifar100_sc_r100_s0": ["--resume"], "cifar100_psc_r100_s0": ["--overwrite"],
                     "cifar100_ce_r100_s0": []}
    assert set(summary_statuses(result.stdout).values()) == {"done"}
    # A folder with best.pt but no last.pt (deleted by hand) saved a model: --overwrite would delete it, and main.py
    # itself refuses to start over it. The sweep leaves it alone and reports it.
    kept = runs / "cifar100_sc_r50_s0"
    kept.mkdir()
    (kept / "config.json").write_text("{}")
    (kept / "best.pt").write_text("the only copy")
    calls = len(read_log())
    result = run_script("sweep.sh", ["--dataset", "cifar100", "--imb_factors", "0.02", "--methods", "sc",
                                     "--runs_dir", str(runs)], env)
    assert result.returncode == 1 and "1 of 1 run FAILED" in result.stderr
    assert summary_statuses(result.stdout) == {"cifar100_sc_r50_s0": "FAILED (best.pt without last.pt)"}
    assert "it holds best.pt but no last.pt to resume from; move the folder away" in result.stdout
    assert all(c["name"] != "cifar100_sc_r50_s0" for c in read_log()[calls:])  # never started
    assert (kept / "best.pt").read_text() == "the only copy"


def test_table1_keeps_going_after_a_failure(fake, tmp_path):
    env, read_log = fake
    runs = tmp_path / "t1"
    env["FAKE_FAIL"] = "cifar10_psc_r50_s0"
    result = run_script("table1.sh", ["--dataset", "cifar10", "--ce", "--runs_dir", str(runs),
                                      "--", "--epochs", "2"], env)
    assert result.returncode != 0
    expected = {f"cifar10_{m}_r{r}_s0" for m in ("sc", "psc", "ce") for r in (100, 50, 10)}
    assert {c["name"] for c in read_log()} == expected
    assert all(c["args"][-2:] == ["--epochs", "2"] for c in read_log())
    statuses = summary_statuses(result.stdout)
    assert statuses.pop("cifar10_psc_r50_s0").startswith("FAILED (exit 3")
    assert statuses == {name: "done" for name in expected - {"cifar10_psc_r50_s0"}}
    assert "1 of 9 runs FAILED" in result.stderr
    # The failed run left only config.json: the next call starts it again with --overwrite.
    env.pop("FAKE_FAIL")
    again = run_script("table1.sh", ["--dataset", "cifar10", "--ce", "--runs_dir", str(runs), "--", "--epochs", "2"],
                       env)
    assert again.returncode == 0, again.stdout + again.stderr
    [retry] = [c for c in read_log()[len(expected):] if "--resume" not in c["args"]]  # the others: checked
    assert retry["name"] == "cifar10_psc_r50_s0" and "--overwrite" in retry["args"]
    # The dry run goes as the first run with training left (without --overwrite: its folder is a scratch one).
    dry = read_log("dry_run")[-1]["args"]
    assert dry[dry.index("--imb_factor") + 1] == "0.02" and dry[dry.index("--loss") + 1] == "psc"
    assert "--overwrite" not in dry and "--resume" not in dry
    assert sorted(c["name"] for c in read_log("checked")) == sorted(expected - {"cifar10_psc_r50_s0"})


def test_sweep_lists_runs_another_process_is_training_as_busy(fake, tmp_path):
    """main.py exits 75 (EX_TEMPFAIL) on a run folder another process has locked: the sweep lists that run as
    BUSY, not FAILED, goes on with the next, and exits 75 when busy runs are all it left undone, 1 when a run
    also failed. A finished run that is busy (its process still on its way out) is BUSY too."""
    env, read_log = fake
    runs = tmp_path / "runs"
    args = ["--dataset", "cifar10", "--imb_factors", "0.01 0.1", "--methods", "sc psc", "--runs_dir", str(runs)]
    env["FAKE_BUSY"] = "cifar10_psc_r100_s0"
    result = run_script("sweep.sh", args, env)
    assert result.returncode == 75, result.stdout + result.stderr
    busy = "BUSY (another process is training or checking it; rerun the sweep once it has ended)"
    assert summary_statuses(result.stdout) == {"cifar10_sc_r100_s0": "done", "cifar10_psc_r100_s0": busy,
                                               "cifar10_sc_r10_s0": "done", "cifar10_psc_r10_s0": "done"}
    assert result.stderr.splitlines()[-1] == "sweep.sh: 1 of 4 runs BUSY in another process"
    assert not (runs / "cifar10_psc_r100_s0").exists()  # the fake, like main.py, left the folder alone
    env["FAKE_BUSY"] = "cifar10_sc_r100_s0 cifar10_psc_r100_s0"  # the first finished, the second new
    env["FAKE_FAIL"] = "cifar10_psc_r100_s0"
    again = run_script("sweep.sh", args, env)
    assert again.returncode == 75 and summary_statuses(again.stdout) == {
        "cifar10_sc_r100_s0": busy, "cifar10_psc_r100_s0": busy, "cifar10_sc_r10_s0": "skipped",
        "cifar10_psc_r10_s0": "skipped"}, again.stdout + again.stderr
    env["FAKE_BUSY"] = "cifar10_sc_r100_s0"
    failed = run_script("sweep.sh", args, env)
    assert failed.returncode == 1 and summary_statuses(failed.stdout)["cifar10_psc_r100_s0"].startswith(
        "FAILED (exit 3"), failed.stdout + failed.stderr
    assert failed.stderr.splitlines()[-1] == "sweep.sh: 1 of 4 runs FAILED, 1 BUSY in another process"


def test_sweep_says_which_finished_run_had_its_damaged_results_written_again(fake, tmp_path):
    """A finished run whose results.json main.py cannot read (cut off by a full disk) is evaluated and written
    again by main.py --resume: the sweep lists it as done, saying so, not as skipped."""
    env, read_log = fake
    runs = tmp_path / "runs"
    args = ["--dataset", "cifar10", "--imb_factors", "0.01", "--methods", "sc psc", "--runs_dir", str(runs)]
    assert run_script("sweep.sh", args, env).returncode == 0
    damaged = runs / "cifar10_psc_r100_s0" / "results.json"
    damaged.write_text(damaged.read_text()[:40])
    again = run_script("sweep.sh", args, env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert summary_statuses(again.stdout) == {
        "cifar10_sc_r100_s0": "skipped",
        "cifar10_psc_r100_s0": "done (results.json written again: main.py could not read it)"}
    assert json.loads(damaged.read_text())["method"] == "psc"


def test_sweep_gpu_queue_one_run_per_gpu_at_a_time(fake, tmp_path):
    env, read_log = fake
    env["FAKE_SLEEP"] = "0.3"
    runs = tmp_path / "runs"
    result = run_script("sweep.sh", ["--dataset", "cifar10", "--imb_factors", "0.01 0.1",
                                     "--methods", "sc psc", "--runs_dir", str(runs),
                                     "--gpus", "0 1"], env)
    assert result.returncode == 0, result.stdout + result.stderr
    starts, ends = read_log("start"), read_log("end")
    assert len(starts) == len(ends) == 4
    assert {c["gpu"] for c in starts} == {"0", "1"}
    intervals = {}
    for start in starts:
        [end] = [e for e in ends if e["name"] == start["name"]]
        intervals.setdefault(start["gpu"], []).append((start["time"], end["time"]))
    for gpu_intervals in intervals.values():
        gpu_intervals.sort()
        assert all(a[1] <= b[0] for a, b in zip(gpu_intervals, gpu_intervals[1:]))
    for start in starts:  # output goes to a log per run; the command line names the GPU
        assert "training" in (runs / "logs" / f"{start['name']}.log").read_text()
        assert f"[{start['name']}] CUDA_VISIBLE_DEVICES={start['gpu']} " in result.stdout
    assert set(summary_statuses(result.stdout).values()) == {"done"}


def test_sweep_takes_every_form_of_cuda_visible_devices(fake, tmp_path):
    """--gpus entries may be comma lists (a torchrun job over several GPUs) and GPU-/MIG- UUIDs, as CUDA reads them."""
    env, read_log = fake
    env["FAKE_SLEEP"] = "0.3"
    entries = ["2,3", "GPU-5e3b2a10-1234-4c1d-9a7e-1234567890ab", "MIG-GPU-5e3b2a10-1234-4c1d-9a7e-1234567890ab/1/0"]
    result = run_script("sweep.sh", ["--dataset", "cifar10", "--imb_factors", "0.01", "--methods", "sc psc ce",
                                     "--runs_dir", str(tmp_path / "runs"), "--gpus", " ".join(entries)], env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(c["gpu"] for c in read_log("start")) == sorted(entries)


def session_cpu_ticks(session: int, exclude: int) -> int:
    """User + system CPU time, in clock ticks, of the live processes in `session` other than `exclude`."""
    ticks = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state is fields[0]
        except (OSError, IndexError):  # the process ended meanwhile
            continue
        if int(fields[3]) == session and int(stat.parent.name) != exclude:  # field 6, session id
            ticks += int(fields[11]) + int(fields[12])  # fields 14 and 15, utime and stime
    return ticks


@pytest.mark.parametrize("gpus", ["", "0"])
def test_sweep_waits_idle_while_a_run_is_stopped(fake, tmp_path, gpus):
    """A run held stopped (kill -STOP, to lend the cores to something else) ends bash's wait at once and again at
    every call under job control; the sweep must not spin a core meanwhile, and goes on when the run continues."""
    env, read_log = fake
    env["FAKE_SLEEP"] = "3"
    args = ["--dataset", "cifar10", "--imb_factors", "0.01", "--methods", "sc", "--runs_dir", str(tmp_path / "runs"),
            "--gpus", gpus]
    process = subprocess.Popen(["bash", str(SCRIPTS / "sweep.sh"), *args], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 20
        while not read_log() and time.monotonic() < deadline:
            time.sleep(0.05)
        [start] = read_log()
        os.kill(start["pid"], signal.SIGSTOP)
        time.sleep(0.5)  # let the sweep see the stop
        before = session_cpu_ticks(process.pid, exclude=start["pid"])
        time.sleep(2)
        spent = (session_cpu_ticks(process.pid, exclude=start["pid"]) - before) / os.sysconf("SC_CLK_TCK")
        os.kill(start["pid"], signal.SIGCONT)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    assert spent < 0.2, f"the sweep used {spent:.2f} s of CPU in 2 s while its run was stopped"
    assert process.returncode == 0, stdout + stderr
    assert summary_statuses(stdout) == {"cifar10_sc_r100_s0": "done"}


# Runs a command with SIGINT at its default disposition, as a terminal's Ctrl-C finds it. A process
# started with `&` by a shell without job control (e.g. `nohup pytest ... &` from a script) has
# SIGINT ignored and passes that on, and bash cannot trap a signal that was ignored when it started.
WITH_DEFAULT_SIGINT = [sys.executable, "-c", "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                       "os.execvp(sys.argv[1], sys.argv[1:])"]


def interrupt_sweep(wrapper, args, env, read_log, cwd, send):
    """Start sweep.sh through `wrapper` (sets its SIGINT disposition) in a session of its own, call send(process)
    once its first run has started, and return (process, stdout, stderr) after it exits; fail if it does not
    stop within 20 s, with its signal masks."""
    process = subprocess.Popen([*wrapper, "bash", str(SCRIPTS / "sweep.sh"), *args], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True, cwd=cwd)
    deadline = time.monotonic() + 20
    while not read_log() and time.monotonic() < deadline:
        time.sleep(0.05)
    send(process)
    try:
        stdout, stderr = process.communicate(timeout=20)
    except subprocess.TimeoutExpired:  # say what state the sweep was in, then clean up
        status = Path(f"/proc/{process.pid}/status")
        lines = status.read_text().splitlines() if status.exists() else []
        masks = [line for line in lines if line.startswith("Sig")]
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"the sweep did not stop within 20 s of the signal; its {masks}\n{stdout}{stderr}")
    return process, stdout, stderr


@pytest.mark.parametrize("gpus", ["", "0"])
def test_sweep_interrupt_stops_runs_and_exits_130(fake, tmp_path, gpus):
    """SIGINT to the process group (Ctrl-C) serially, SIGTERM to the sweep with a GPU queue."""
    env, read_log = fake
    env["FAKE_SLEEP"] = "30"
    runs = tmp_path / "runs"
    args = ["--dataset", "cifar10", "--imb_factors", "0.01", "--runs_dir", str(runs)]
    send = ((lambda process: process.send_signal(signal.SIGTERM)) if gpus else  # kill PID
            (lambda process: os.killpg(process.pid, signal.SIGINT)))  # Ctrl-C: the whole process group
    process, stdout, stderr = interrupt_sweep(WITH_DEFAULT_SIGINT, [*args, "--gpus", gpus], env, read_log,
                                              tmp_path, send)
    assert process.returncode == 130, stdout + stderr
    assert len(read_log()) == 1 and read_log("end") == []
    # Exactly one SIGTERM, although Ctrl-C signals the whole process group: a second signal
    # would make main.py stop without saving.
    [stopped] = read_log("stopped")
    assert stopped["signals"] == [signal.SIGTERM]
    statuses = summary_statuses(stdout)
    assert statuses["cifar10_sc_r100_s0"] == "INTERRUPTED (exit 130)"
    assert statuses["cifar10_psc_r100_s0"] == "not started"
    # Rerunning the same command resumes the interrupted run from its last.pt.
    env.pop("FAKE_SLEEP")
    again = run_script("sweep.sh", [*args, "--gpus", gpus], env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert [("--resume" in c["args"]) for c in read_log()[1:]] == [True, False]


@pytest.mark.parametrize("exit_status", ["signal", "1"])  # main.py killed by it; torchrun's 1 whatever happened
def test_sweep_interrupted_while_checking_a_finished_run_counts_it_as_skipped(fake, tmp_path, exit_status):
    """The check of a finished run, cut short by the interrupt, leaves it a finished run: skipped, not FAILED."""
    env, read_log = fake
    if exit_status != "signal":
        env["FAKE_CHECK_INTERRUPTED_EXIT"] = exit_status
    runs = tmp_path / "runs"
    args = ["--dataset", "cifar10", "--imb_factors", "0.01", "--runs_dir", str(runs)]
    first = run_script("sweep.sh", [*args, "--methods", "sc"], env)
    assert first.returncode == 0, first.stdout + first.stderr
    env["FAKE_CHECK_SLEEP"] = "30"
    n_before = len(read_log())
    process = subprocess.Popen([*WITH_DEFAULT_SIGINT, "bash", str(SCRIPTS / "sweep.sh"), *args], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                               cwd=tmp_path)
    deadline = time.monotonic() + 20
    while len(read_log()) == n_before and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=30)
    assert process.returncode == 130, stdout + stderr
    [killed] = read_log("killed")
    assert killed["name"] == "cifar10_sc_r100_s0" and killed["signals"] == [signal.SIGTERM]
    assert summary_statuses(stdout) == {"cifar10_sc_r100_s0": "skipped", "cifar10_psc_r100_s0": "not started"}


def test_sweep_started_with_sigint_ignored_says_so_and_stops_on_sigterm(fake, tmp_path):
    """'cmd &' from a script starts the sweep with SIGINT ignored: Ctrl-C cannot reach it, the note says what can."""
    env, read_log = fake
    env["FAKE_SLEEP"] = "30"
    args = ["--dataset", "cifar10", "--imb_factors", "0.01", "--runs_dir", str(tmp_path / "runs")]
    with_sigint_ignored = [WITH_DEFAULT_SIGINT[0], "-c", WITH_DEFAULT_SIGINT[2].replace("SIG_DFL", "SIG_IGN")]
    process, stdout, stderr = interrupt_sweep(with_sigint_ignored, args, env, read_log, tmp_path,
                                              lambda process: process.send_signal(signal.SIGTERM))
    assert process.returncode == 130, stdout + stderr
    note = f"sweep.sh: note: SIGINT was ignored when this sweep started, so Ctrl-C cannot stop it; 'kill {process.pid}'"
    assert note in stderr
    [stopped] = read_log("stopped")
    assert stopped["signals"] == [signal.SIGTERM]
    # With SIGINT at its default disposition there is no note.
    env.pop("FAKE_SLEEP")
    again = subprocess.run([*WITH_DEFAULT_SIGINT, "bash", str(SCRIPTS / "sweep.sh"), *args], env=env,
                           capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "note: SIGINT" not in again.stderr


def test_sweep_interrupted_as_a_run_finishes_lists_it_done(fake, tmp_path):
    """A signal that reaches a run after it wrote results.json (main.py exits non-zero then) does not make the
    finished run a failure: it is 'done', and the sweep still exits 130 and starts nothing else."""
    env, read_log = fake
    env.update(FAKE_SLEEP="30", FAKE_FINISH_FIRST="cifar10_sc_r100_s0")
    args = ["--dataset", "cifar10", "--imb_factors", "0.01", "--runs_dir", str(tmp_path / "runs")]
    process, stdout, stderr = interrupt_sweep(WITH_DEFAULT_SIGINT, args, env, lambda: read_log("end"), tmp_path,
                                              lambda process: process.send_signal(signal.SIGTERM))
    assert process.returncode == 130, stdout + stderr
    [stopped] = read_log("stopped")  # the fake exits 130 after the signal, results.json already written
    assert stopped["name"] == "cifar10_sc_r100_s0"
    statuses = summary_statuses(stdout)
    assert statuses == {"cifar10_sc_r100_s0": "done", "cifar10_psc_r100_s0": "not started"}, stdout


def test_table1_leaves_out_the_main_py_flags_sweep_sh_leaves_out():
    """table1.sh runs before it execs sweep.sh, so it has its own main_flag, with sweep.sh's two lists (the flags the
    sweep sets for each run, and those that make main.py train nothing) written out: they must stay the same."""
    sweep = (SCRIPTS / "sweep.sh").read_text()
    arrays = [re.search(rf"^{name}=\(([^)]*)\)$", sweep, re.M).group(1).split() for name in ("sweep_flags", "not_training")]
    config = {field.name for field in dataclasses.fields(main.Config)}
    left_out = {flag.removeprefix("--") for flag in arrays[0] + arrays[1]} & config  # --help is argparse's
    [listed] = re.findall(r"! \$name =~ \^\(([a-z_|]+)\)\$", (SCRIPTS / "table1.sh").read_text())
    assert set(listed.split("|")) == left_out and len(left_out) == len(arrays[0]) + len(arrays[1]) - 1


@pytest.mark.parametrize("script, args, message", [
    ("sweep.sh", ["--dataset", "cifar10", "--imb_factors", "0.01", "--bogus"], "unknown argument '--bogus' (see --help)"),
    ("sweep.sh", ["--dataset", "cifar10", "--imb_factors", "0.01", "--epochs", "2"],
     "unknown argument '--epochs' (a main.py flag: pass it after --)"),
    ("sweep.sh", ["--dataset", "cifar10", "--imb_factor", "0.01"],
     "unknown argument '--imb_factor' (the sweep sets it for each run: give --imb_factors) (see --help)"),
    ("sweep.sh", ["--dataset", "cifar10", "--imb_factors", "0.01", "--seed=1"],
     "unknown argument '--seed=1' (the sweep sets it for each run: give --seeds)"),
    ("sweep.sh", ["--dataset", "cifar10", "--imb_factors", "0.01", "--loss", "sc"], "(the sweep sets it for each run: "
                                                                                   "give --methods)"),
    # lists written as main.py's --lr_decay_epochs takes one
    ("sweep.sh", ["--dataset", "cifar10", "--imb_factors", "0.01,0.1"],
     "--imb_factors: '0.01,0.1' is not a number (the list is space-separated: \"0.01 0.1\")"),
    ("sweep.sh", ["--dataset", "cifar10", "--imb_factors", "0.01", "--methods", "sc,ce"], "(the list is space-separated: "
                                                                                         "\"sc ce\")"),
    ("sweep.sh", ["--dataset", "cifar10", "--imb_factors", "0.01", "--seeds", "0,1,2"], "(the list is space-separated: "
                                                                                       "\"0 1 2\")"),
    ("sweep.sh", ["--dataset", "cifar10", "--imb_factors", "0.01", "--seeds", "0, 1"], "--seeds: '0,' is not an integer "
     "in 0 .. 4294967295 (without leading zeros) (the list is space-separated: \"0 1\")"),  # the whole list shown
    ("sweep.sh", ["--dataset", "cifar10", "--imb_factors", "0,01"], "(a decimal point, not a comma: \"0.01\"?)"),
    ("sweep.sh", ["--dataset", "cifar10", "--imb_factors", "0.01 0,1"], "(a decimal point, not a comma: \"0.01 0.1\"?)"),
    ("sweep.sh", ["--dataset", "cifar10", "--imb_factors", "0.01", "--seeds", "0\n1,2"],
     "(the list is space-separated: \"0 1 2\")"),  # (a newline separates values too)
    ("sweep.sh", ["--imb_factors", "0.01"], "--dataset is required"),
    ("sweep.sh", ["--dataset", "cifar10"], "--imb_factors is required"),
    ("sweep.sh", ["--dataset", "imagenet", "--imb_factors", "0.01"], "cifar10 or cifar100"),
    ("sweep.sh", ["--dataset", "cifar10", "--imb_factors", "100"], "not in (0, 1]"),
    ("sweep.sh", ["--dataset", "cifar10", "--imb_factors", "1e-2x"], "not a number"),
    ("sweep.sh", ["--dataset", "cifar10", "--imb_factors", "0.01 0.00999"], "share the folder"),
    ("sweep.sh", ["--dataset", "cifar10", "--imb_factors", "0.01", "--methods", "sc ldam"], "'ldam'"),
    ("sweep.sh", ["--dataset", "cifar10", "--imb_factors", "0.01", "--seeds", "a"], "'a'"),
    # "00" is seed 0 to main.py but a folder of its own; main.py refuses seeds from 2**32 on, each run on its own.
    ("sweep.sh", ["--dataset", "cifar10", "--imb_factors", "0.01", "--seeds", "0 00"], "--seeds: '00'"),
    ("sweep.sh", ["--dataset", "cifar10", "--imb_factors", "0.01", "--seeds", "4294967296"], "'4294967296'"),
    # A --gpus entry CUDA cannot read would hide every GPU, and --device auto would quietly train on the CPU.
    ("sweep.sh", ["--dataset", "cifar10", "--imb_factors", "0.01", "--gpus", "0 O"], "--gpus: 'O' is not a device"),
    ("sweep.sh", ["--dataset", "cifar10", "--imb_factors", "0.01", "--gpus", "0,,1"], "--gpus: '0,,1'"),
    ("sweep.sh", ["--dataset", "cifar10", "--imb_factors", "0.01", "--gpus", "cuda:0"], "--gpus: 'cuda:0'"),
    ("sweep.sh", ["--dataset", "cifar10", "--imb_factors", "0.01", "--", "--seed", "3"], "'--seed' is set by"),
    ("sweep.sh", ["--dataset", "cifar10", "--imb_factors", "0.01", "--", "--resume"], "'--resume' is set by"),
    ("sweep.sh", ["--dataset", "cifar10", "--imb_factors", "0.01", "--", "--imb_type=step"], "'--imb_type' is set"),
    ("sweep.sh", ["--dataset", "cifar10", "--imb_factors", "0.01", "--imb_type", "linear"], "exp or step"),
    # main.py's argparse takes an unambiguous start of a flag for the flag.
    ("sweep.sh", ["--dataset", "cifar10", "--imb_factors", "0.01", "--", "--see", "3"], "'--see' is the start of '--seed'"),
    ("sweep.sh", ["--dataset", "cifar10", "--imb_factors", "0.01", "--", "--output=elsewhere"],
     "'--output' is the start of '--output_dir'"),
    ("sweep.sh", ["--dataset", "cifar10", "--imb_factors", "0.01", "--", "--overw"], "'--overw' is the start of"),
    ("table1.sh", ["--dataset", "cifar10", "--", "--los", "ce"], "'--los' is the start of '--loss'"),
    # Flags that make main.py train nothing would leave every run a failure without results.json.
    ("sweep.sh", ["--dataset", "cifar10", "--imb_factors", "0.01", "--", "--dry_run"],
     "'--dry_run' makes main.py train nothing, and a sweep trains its runs"),
    ("table1.sh", ["--dataset", "cifar10", "--", "--eval_only", "--checkpoint", "x.pt"], "'--eval_only' makes main.py"),
    ("sweep.sh", ["--dataset", "cifar10", "--imb_factors", "0.01", "--", "--checkp=x.pt"],
     "'--checkp' is the start of '--checkpoint', which makes main.py train nothing"),
    ("sweep.sh", ["--dataset", "cifar10", "--imb_factors", "0.01", "--", "--help"], "'--help' makes main.py train"),
    ("table1.sh", ["--dataset", "cifar10", "--", "--amp", "-h"], "'-h' makes main.py train nothing"),
    ("sweep.sh", ["--dataset", "cifar10", "--imb_factors", "0.01", "--", "--he"], "'--he' is the start of '--help'"),
    ("sweep.sh", ["--dataset"], "--dataset needs a value"),
    ("table1.sh", ["--dataset", "cifar10", "--imb_factors", "0.01"], "unknown argument '--imb_factors' (see --help)"),
    ("table1.sh", ["--dataset", "cifar10", "--warm_epochs=0"], "unknown argument '--warm_epochs=0' (a main.py flag: "
                                                               "pass it after --)"),
    ("table1.sh", ["--ce"], "--dataset is required"),
])
def test_bad_arguments_give_one_line_and_nonzero_exit(fake, script, args, message):
    env, read_log = fake
    result = run_script(script, args, env)
    assert result.returncode != 0 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and message in result.stderr
    assert read_log() == []


def test_sweep_refuses_a_runs_dir_that_is_a_file_or_a_python_that_is_not_a_command(fake, tmp_path):
    """Else every run fails on its own, each with its own lines, instead of one line before any run."""
    env, read_log = fake
    (tmp_path / "a file").write_text("kept")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "logs").write_text("kept")  # with --gpus: each run's output goes into runs/logs/<run>.log
    args = ["--dataset", "cifar10", "--imb_factors", "0.01"]
    for script, extra, environ, message in (
        ("sweep.sh", ["--runs_dir", str(tmp_path / "a file")], env, "exists and is not a folder"),
        ("table1.sh", ["--runs_dir", str(tmp_path / "a file")], env, "exists and is not a folder"),
        ("sweep.sh", ["--runs_dir", str(tmp_path / "a file" / "runs" / "x")], env,
         f"'{tmp_path / 'a file'}' exists and is not a folder"),
        ("sweep.sh", [], {**env, "PYTHON": str(tmp_path / "no_python")}, "is not a command"),
        ("sweep.sh", ["--runs_dir", str(tmp_path / "runs"), "--gpus", "0"], env,
         f"--gpus writes each run's output into '{tmp_path / 'runs' / 'logs'}/', which exists and is not a folder: "
         "move it away"),
    ):
        result = run_script(script, [*(args if script == "sweep.sh" else args[:2]), *extra], environ)
        assert result.returncode == 2 and result.stdout == "", (extra, result.stdout + result.stderr)
        assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert read_log() == [] and (tmp_path / "a file").read_text() == (tmp_path / "runs" / "logs").read_text() == "kept"


@pytest.mark.parametrize("gpus, fail_factor", [("", ""), ("1 0", ""), ("", "0.1")])
def test_sweep_stops_before_any_run_when_a_dry_run_fails(fake, tmp_path, gpus, fail_factor):
    """Flags every run gets that main.py refuses (a bad value after --, a --data_root without data), or an
    imb_factor whose split main.py refuses: one error line from a dry run, and no run is started, rather than the
    same failure once per run (with --gpus, in each run's log)."""
    env, read_log = fake
    env.update(FAKE_DRY_RUN_FAIL="--learning_rate must be positive (got -1.0)", FAKE_DRY_RUN_FAIL_FACTOR=fail_factor)
    runs = tmp_path / "runs"
    result = run_script("sweep.sh", ["--dataset", "cifar10", "--imb_factors", "0.01 0.1", "--methods", "sc psc",
                                     "--runs_dir", str(runs), "--gpus", gpus, "--", "--learning_rate", "-1"], env)
    assert result.returncode == 2
    failed = "cifar10_sc_r10_s0" if fail_factor else "cifar10_sc_r100_s0"
    checked = ["cifar10_sc_r100_s0", "cifar10_psc_r100_s0", "cifar10_sc_r10_s0"] if fail_factor else [
        "cifar10_sc_r100_s0"]  # with factor 0.1 failing: psc's first run is checked too, then the new factor
    on_gpu = f" on --gpus entry {gpus.split()[0]}" if gpus else ""  # (the first dry run fails: only the first entry)
    assert result.stdout.splitlines() == [
        f"sweep.sh: checking the flags, the device and the data: main.py --dry_run as {name}{on_gpu}"
        for name in checked]
    assert result.stderr.splitlines() == [
        "error: --learning_rate must be positive (got -1.0)",
        f"sweep.sh: error: main.py --dry_run as {failed} failed (exit 1; its message, if it printed one, is above): "
        "no run started"]
    dry_runs = read_log("dry_run")
    assert len(dry_runs) == len(checked)
    assert {d["gpu"] for d in dry_runs} == {gpus.split()[0] if gpus else None}  # the first run's GPU
    assert read_log() == [] and not runs.exists()


@pytest.mark.parametrize("gpus", ["", "0"])
def test_sweep_prints_the_dry_runs_notes_before_the_runs(fake, tmp_path, gpus):
    """main.py's notes (a flag the loss does not read, a CUDA_VISIBLE_DEVICES hiding every GPU) reach the terminal
    from the dry run, once per imb_factor and before any run starts: with --gpus the runs' own copies go to their
    logs only. The dry run's other output (its settings, what it would do) stays out."""
    env, read_log = fake
    env["FAKE_DRY_RUN_NOTE"] = "--loss ce does not read --alpha_schedule"
    result = run_script("sweep.sh", ["--dataset", "cifar10", "--imb_factors", "0.01 0.1", "--methods", "ce",
                                     "--runs_dir", str(tmp_path / "runs"), "--gpus", gpus], env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    notes = [line for line in lines if "note:" in line]
    assert notes == [f"sweep.sh: main.py --dry_run as cifar10_ce_r{r}_s0: note: --loss ce does not read "
                     f"--alpha_schedule (imb_factor {f})" for r, f in ((100, "0.01"), (10, "0.1"))]
    first_run = next(i for i, line in enumerate(lines) if " runs in " in line)
    assert lines.index(notes[-1]) < first_run and "dry run: would" not in result.stdout
    assert len(read_log("end")) == 2


def test_sweep_dry_runs_each_method_and_says_each_note_once(fake, tmp_path):
    """A note only one method's flags raise (--loss ce does not read --temp) reaches the terminal from that method's
    first run with training left, even when another method comes first for every imb_factor; a note that every dry
    run prints is said once."""
    env, read_log = fake
    env.update(FAKE_DRY_RUN_NOTE="--loss ce does not read --temp", FAKE_DRY_RUN_NOTE_LOSS="ce",
               FAKE_DRY_RUN_COMMON_NOTE="CUDA_VISIBLE_DEVICES hides every GPU")
    result = run_script("sweep.sh", ["--dataset", "cifar10", "--imb_factors", "0.01 0.1", "--methods", "sc ce",
                                     "--runs_dir", str(tmp_path / "runs"), "--", "--temp", "0.2"], env)
    assert result.returncode == 0, result.stderr
    checked = [line.rsplit(" ", 1)[1] for line in result.stdout.splitlines() if "checking the flags" in line]
    assert checked == ["cifar10_sc_r100_s0", "cifar10_ce_r100_s0", "cifar10_sc_r10_s0"]  # not cifar10_ce_r10_s0
    assert len(read_log("dry_run")) == 3
    assert [line for line in result.stdout.splitlines() if "note:" in line] == [
        "sweep.sh: main.py --dry_run as cifar10_sc_r100_s0: note: CUDA_VISIBLE_DEVICES hides every GPU",
        "sweep.sh: main.py --dry_run as cifar10_ce_r100_s0: note: --loss ce does not read --temp (imb_factor 0.01)"]
    assert len(read_log("end")) == 4


@pytest.mark.parametrize("flag", ["--imb_factors", "--methods", "--seeds", "--gpus"])
def test_sweep_takes_lists_separated_by_newlines(fake, tmp_path, flag):
    """bash's read takes one line: the values after a newline were silently dropped (--seeds "$(seq 0 1)" ran seed 0
    alone). Newlines separate values as spaces do."""
    env, read_log = fake
    value = {"--imb_factors": "0.1\n0.02", "--methods": "sc\npsc", "--seeds": "0\n1\n", "--gpus": "0\n1"}[flag]
    args = {"--dataset": "cifar10", "--imb_factors": "0.1", "--methods": "sc", "--runs_dir": str(tmp_path / "runs"),
            flag: value}
    result = run_script("sweep.sh", [part for item in args.items() for part in item], env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(read_log("start")) == (1 if flag == "--gpus" else 2)
    if flag == "--gpus":
        assert "queue over GPUs: 0 1" in result.stdout
    # --help shows the example as typed (its text is an unquoted here-document: not the output of seq)
    assert '(--seeds "$(seq 0 2)")' in run_script("sweep.sh", ["--help"], env).stdout


def test_a_flag_after_a_device_without_its_value_is_still_checked(fake, tmp_path):
    """'--device --seed 5' after --: --seed is not taken for the device's value and let through."""
    env, read_log = fake
    result = run_script("sweep.sh", ["--dataset", "cifar10", "--imb_factors", "0.1", "--runs_dir", str(tmp_path / "r"),
                                     "--gpus", "0", "--", "--device", "--seed", "5"], env)
    assert result.returncode == 2 and "'--seed' is set by the sweep for each run" in result.stderr, result.stderr


@pytest.mark.parametrize("device, refused", [
    (["--device", "cpu"], True), (["--device=cpu"], True),
    (["--dev", "cpu"], True), (["--devi=cpu"], True),  # main.py takes an unambiguous start of a flag
    (["--device", "cuda", "--device", "cpu"], True), (["--device", "cpu", "--device", "cuda"], False),  # the last
    (["--device", "cuda"], False), (["--print_freq", "5", "cpu"], False),  # (a stray word is main.py's to refuse)
])
def test_sweep_refuses_gpus_with_device_cpu(fake, tmp_path, device, refused):
    env, read_log = fake
    result = run_script("sweep.sh", ["--dataset", "cifar10", "--imb_factors", "0.1", "--methods", "sc", "--runs_dir",
                                     str(tmp_path / "r"), "--gpus", "0 1", "--", *device], env)
    if not refused:
        assert result.returncode == 0 and len(read_log("start")) == 1, result.stdout + result.stderr
        return
    assert result.returncode == 2 and read_log("dry_run") == [], result.stdout + result.stderr
    assert result.stderr == ("sweep.sh: error: --gpus runs each run on a GPU, and --device cpu after -- runs them on "
                             "the CPU: drop one of the two (see --help)\n")


@pytest.mark.parametrize("log_is", ["folder", "named pipe", "link to /dev/null"])
def test_sweep_with_gpus_fails_a_run_whose_log_cannot_be_written_and_goes_on(log_is, fake, tmp_path):
    """A folder where a run's log goes (or a read-only --runs_dir): that run is FAILED, saying why, and not started;
    the queue goes on (before, bash's own error line, and the status blamed the run). A named pipe there: the
    same (the sweep waited for ever on its open, for a reader). A link to /dev/null is a log that can be written."""
    env, read_log = fake
    runs = tmp_path / "runs"
    log = runs / "logs" / "cifar10_sc_r10_s0.log"
    log.parent.mkdir(parents=True)
    {"folder": os.mkdir, "named pipe": os.mkfifo, "link to /dev/null": lambda p: p.symlink_to("/dev/null")}[log_is](log)
    result = run_script("sweep.sh", ["--dataset", "cifar10", "--imb_factors", "0.1", "--methods", "sc psc",
                                     "--runs_dir", str(runs), "--gpus", "0"], env)
    if log_is == "link to /dev/null":
        assert result.returncode == 0, result.stdout + result.stderr
        assert summary_statuses(result.stdout) == {"cifar10_sc_r10_s0": "done", "cifar10_psc_r10_s0": "done"}
        return
    assert result.returncode == 1, result.stdout + result.stderr
    assert summary_statuses(result.stdout) == {"cifar10_sc_r10_s0": f"FAILED (cannot write its log {log})",
                                               "cifar10_psc_r10_s0": "done"}
    assert [start["name"] for start in read_log("start")] == ["cifar10_psc_r10_s0"] and "line " not in result.stderr


def test_sweep_takes_a_results_json_that_is_not_a_file_for_no_finished_run(fake, tmp_path):
    """A folder named results.json made the run count as finished ("skipped", exit 0), which summarize.py then
    refuses: main.py is run there instead, and says what is wrong."""
    env, read_log = fake
    runs = tmp_path / "runs"
    (runs / "cifar10_sc_r10_s0" / "results.json").mkdir(parents=True)
    result = run_script("sweep.sh", ["--dataset", "cifar10", "--imb_factors", "0.1", "--methods", "sc",
                                     "--runs_dir", str(runs)], env)
    assert summary_statuses(result.stdout)["cifar10_sc_r10_s0"] != "skipped", result.stdout
    assert len(read_log("dry_run")) == 1 and len(read_log("start")) == 1


def test_sweep_with_gpus_stops_where_main_py_finds_no_gpu(fake, tmp_path, monkeypatch):
    """--gpus on a machine where main.py finds no CUDA device (none there, or a driver that is broken) would start
    one CPU run per listed GPU at once: main.py's note in the dry run stops the sweep before any run; without --gpus
    the same note is only said."""
    import main
    import torch
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    note = main.hidden_gpu_note("auto", torch.device("cpu"))
    env, read_log = fake
    env["FAKE_DRY_RUN_COMMON_NOTE"] = note.removeprefix("note: ")
    runs = tmp_path / "runs"
    args = ["--dataset", "cifar10", "--imb_factors", "0.01", "--methods", "sc psc", "--runs_dir", str(runs)]
    result = run_script("sweep.sh", [*args, "--gpus", "0 1"], env)
    assert result.returncode == 2 and read_log("start") == [], result.stdout + result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"sweep.sh: error: --gpus, but main.py --dry_run as cifar10_sc_r100_s0 on --gpus entry 0 found no CUDA device "
        f"({note}): no run started; check the --gpus ids (nvidia-smi -L), or on a machine without GPUs leave --gpus out")
    result = run_script("sweep.sh", args, env)
    assert result.returncode == 0 and f"sweep.sh: main.py --dry_run as cifar10_sc_r100_s0: {note}" in result.stdout


@pytest.mark.parametrize("gpus, factors, dry_run_gpus", [
    ("0 1 7", "0.01", ["0", "1", "7"]),  # one dry run, then one for each entry left over
    ("0 7", "0.01 0.1", ["0", "7", "0"]),  # three dry runs (r100 sc and psc, r10 sc) take the entries in turn
    ("0 0 7 7 0", "0.01", ["0", "7"]),  # an entry listed twice (two runs at once there) is checked once
])
def test_sweep_with_gpus_checks_every_entry(fake, tmp_path, monkeypatch, gpus, factors, dry_run_gpus):
    """Each --gpus entry is some dry run's CUDA_VISIBLE_DEVICES: a wrong id later in the list (7 on a machine with
    two GPUs) stops the sweep before any run, where it used to start that entry's runs on the CPU."""
    import main
    import torch
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU_ID")
    env, read_log = fake
    env.update(FAKE_NO_GPU="7", FAKE_NO_GPU_NOTE=main.hidden_gpu_note("auto", torch.device("cpu")))
    runs = tmp_path / "runs"
    args = ["--dataset", "cifar10", "--imb_factors", factors, "--methods", "sc psc", "--runs_dir", str(runs)]
    result = run_script("sweep.sh", [*args, "--gpus", gpus], env)
    assert result.returncode == 2 and read_log("start") == [], result.stdout + result.stderr
    stopped_at = dry_run_gpus[:dry_run_gpus.index("7") + 1]  # (the first dry run on 7 stops the sweep)
    assert [d["gpu"] for d in read_log("dry_run")] == stopped_at
    assert f"on --gpus entry 7 found no CUDA device (note: CUDA_VISIBLE_DEVICES=7 but no CUDA device" in \
        result.stderr.splitlines()[-1]
    env["FAKE_NO_GPU"] = ""  # every entry a GPU: the same sweep runs
    result = run_script("sweep.sh", [*args, "--gpus", gpus], env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert [d["gpu"] for d in read_log("dry_run")] == stopped_at + dry_run_gpus
    assert len(read_log("start")) == 2 * len(factors.split())


@pytest.mark.parametrize("script", ["sweep.sh", "gpu_checks.sh"])
def test_a_running_script_is_not_changed_by_an_edit_of_its_file(fake, tmp_path, script):
    """bash reads a script as it runs it, so an edit saved in place while a sweep runs for hours would have the
    rest read from the old offset in the new text (a syntax error at the end of a real sweep). Both long-running
    scripts are one compound command, read in full first: the sweep edited in place during its run still
    finishes and prints its summary; gpu_checks.sh has the same guard."""
    text = (SCRIPTS / script).read_text()
    assert text.count("\n{ # The whole script is one compound command") == 1 and text.endswith("\n}\n")
    if script == "gpu_checks.sh":
        assert re.search(r'\nexit "\$any_failed"\n}\n$', text)
        return
    env, read_log = fake
    env["FAKE_SLEEP"] = "1.5"
    copy = tmp_path / "repo" / "scripts" / "sweep.sh"
    copy.parent.mkdir(parents=True)
    copy.write_text(text)
    process = subprocess.Popen(["bash", str(copy), "--dataset", "cifar10", "--imb_factors", "0.01", "--methods",
                                "sc ce", "--runs_dir", str(tmp_path / "runs")], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    deadline = time.time() + 30
    while not read_log() and time.time() < deadline:
        time.sleep(0.05)
    assert read_log(), "the first run did not start"
    with open(copy, "r+") as f:  # saved in place, as some editors do: same file, text shifted by a new header
        f.write("#!/usr/bin/env bash\n" + "# an edit made while the sweep runs\n" * 20 + text.split("\n", 1)[1])
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stdout + stderr
    assert summary_statuses(stdout) == {"cifar10_sc_r100_s0": "done", "cifar10_ce_r100_s0": "done"}
    assert stderr == ""


@pytest.mark.parametrize("send", ["SIGINT to the group", "SIGTERM to the sweep"])
def test_sweep_interrupted_during_a_dry_run_starts_no_run_and_exits_130(fake, tmp_path, send):
    """The dry run, like a run, gets one SIGTERM from the sweep (Ctrl-C reaches the sweep alone) and then nothing
    is started; without a handler main.py --dry_run ends at once."""
    env, read_log = fake
    env["FAKE_DRY_RUN_SLEEP"] = "30"
    runs = tmp_path / "runs"
    signals = {"SIGINT to the group": lambda process: os.killpg(process.pid, signal.SIGINT),
               "SIGTERM to the sweep": lambda process: process.send_signal(signal.SIGTERM)}
    process, stdout, stderr = interrupt_sweep(
        WITH_DEFAULT_SIGINT, ["--dataset", "cifar10", "--imb_factors", "0.01", "--runs_dir", str(runs)], env,
        lambda: read_log("dry_run"), tmp_path, signals[send])
    assert process.returncode == 130, stdout + stderr
    assert stderr.splitlines()[-1] == "sweep.sh: interrupted" and "summary" not in stdout
    assert len(read_log("dry_run")) == 1 and read_log() == [] and not runs.exists()


@pytest.mark.parametrize("gpus", ["", "0"])
def test_sweep_runs_dir_that_starts_with_a_dash(fake, tmp_path, gpus):
    """A relative --runs_dir such as '-x' is a path, not an option: to mkdir (--gpus logs) nor to main.py's argparse,
    which refuses '--output_dir -x/...' as a missing value."""
    env, read_log = fake
    result = run_script("sweep.sh", ["--dataset", "cifar10", "--imb_factors", "0.01", "--methods", "sc",
                                     "--runs_dir", "-x", "--gpus", gpus], env)
    assert result.returncode == 0, result.stdout + result.stderr
    [call] = read_log()
    assert call["args"][call["args"].index("--output_dir") + 1] == "./-x/cifar10_sc_r100_s0"
    assert (tmp_path / "-x" / "cifar10_sc_r100_s0" / "results.json").is_file()


def test_help_equals_form_and_ratio_rounding(fake, tmp_path):
    env, read_log = fake
    for script in ("sweep.sh", "table1.sh"):
        result = run_script(script, ["--help"], env)
        assert result.returncode == 0 and result.stdout.startswith("Usage: ")
    result = run_script("sweep.sh", ["--dataset=cifar10", "--imb_factors=0.02 0.015 0.4", "--methods=psc",
                                     f"--runs_dir={tmp_path / 'runs'}"], env)
    assert result.returncode == 0, result.stderr
    # round(1/0.015) = round(66.67) = 67, halves up (1/0.4 = 2.5: 3) as main.py's default folder names them; the
    # factor itself reaches main.py unchanged.
    assert [c["name"] for c in read_log()] == ["cifar10_psc_r50_s0", "cifar10_psc_r67_s0", "cifar10_psc_r3_s0"]
    assert read_log()[1]["args"][4:6] == ["--imb_factor", "0.015"]
    # step imbalance: its own folders (named as main.py names them), never mixed with exp ones
    result = run_script("sweep.sh", ["--dataset", "cifar10", "--imb_type", "step", "--imb_factors", "0.02",
                                     "--methods", "psc", "--runs_dir", str(tmp_path / "runs")], env)
    assert result.returncode == 0, result.stderr
    assert read_log()[3]["name"] == "cifar10_psc_step_r50_s0"
    assert read_log()[3]["args"][2:4] == ["--imb_type", "step"]


def test_sweep_real_cli(tmp_path, summarize):
    """The Table 1 sweep against the real main.py on a tiny synthetic set (two ratios, one epoch), a second call
    that skips every finished run, and the summary of what it left."""
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from helpers import make_synthetic, write_pickled_cifar10

    write_pickled_cifar10(tmp_path / "data", *make_synthetic(10, 24, 4, seed=2))
    runs = tmp_path / "runs"
    args = ["--dataset", "cifar10", "--imb_factors", "0.1 0.5", "--methods", "ce", "--runs_dir", str(runs), "--",
            "--data_root", str(tmp_path / "data"), "--model", "resnet8", "--batch_size", "16", "--epochs", "1",
            "--lr_decay_epochs", "", "--device", "cpu"]
    env = {**os.environ, "PYTHON": sys.executable}
    # The real main.py's dry run: a --data_root without data stops the sweep before its first run, in one line.
    missing = [a if a != str(tmp_path / "data") else str(tmp_path / "no_data") for a in args]
    refused = subprocess.run(["bash", str(SCRIPTS / "sweep.sh"), *missing], env=env, capture_output=True, text=True,
                             timeout=300, cwd=tmp_path)
    assert refused.returncode == 2 and not runs.exists()
    [error, sweep_error] = refused.stderr.splitlines()
    assert error.startswith(f"error: no cifar10 data in {tmp_path / 'no_data'}: looked for"), error
    assert sweep_error == ("sweep.sh: error: main.py --dry_run as cifar10_ce_r10_s0 failed (exit 2; its message, if "
                           "it printed one, is above): no run started")
    first = subprocess.run(["bash", str(SCRIPTS / "sweep.sh"), *args], env=env, capture_output=True, text=True,
                           timeout=300, cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert summary_statuses(first.stdout) == {"cifar10_ce_r10_s0": "done", "cifar10_ce_r2_s0": "done"}
    for name in ("cifar10_ce_r10_s0", "cifar10_ce_r2_s0"):
        assert (runs / name / "results.json").is_file()
    # main.py checks each finished run: how it runs (--print_freq) and what CE does not read (--alpha_schedule)
    # do not matter, so both are skipped; another recipe is refused, saying which setting differs.
    # A run folder another process has locked (main.py's exit 75) is BUSY, and the sweep exits 75.
    import fcntl

    other = os.open(runs / "cifar10_ce_r2_s0", os.O_RDONLY)
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        again = subprocess.run(["bash", str(SCRIPTS / "sweep.sh"), *args, "--print_freq", "7", "--alpha_schedule",
                                "linear"], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    finally:
        os.close(other)
    assert again.returncode == 75, again.stderr
    assert summary_statuses(again.stdout) == {
        "cifar10_ce_r10_s0": "skipped",
        "cifar10_ce_r2_s0": "BUSY (another process is training or checking it; rerun the sweep once it has ended)"}
    assert f"error: {runs / 'cifar10_ce_r2_s0'} is in use by another process training this run" in again.stderr
    other = subprocess.run(["bash", str(SCRIPTS / "sweep.sh"), *args, "--weight_decay", "0.001"], env=env,
                           capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert other.returncode == 1
    assert set(summary_statuses(other.stdout).values()) == {
        "FAILED (finished already, but main.py --resume refused it: exit 2; other settings (use another "
        "--runs_dir), an unreadable checkpoint or a bad flag)"}
    assert other.stderr.count("was made with other settings: --weight_decay 0.0001 -> 0.001") == 2
    # Every run finished, so no dry run checks the flags first: a typo fails each check, and its status does not
    # blame the settings alone.
    typo = subprocess.run(["bash", str(SCRIPTS / "sweep.sh"), *args, "--lerning_rate", "0.1"], env=env,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert typo.returncode == 1 and "--dry_run" not in typo.stdout
    assert "a bad flag)" in typo.stdout and typo.stderr.count("unrecognized arguments: --lerning_rate") == 2
    table = subprocess.run([sys.executable, str(SCRIPTS / "summarize.py"), str(runs)], capture_output=True,
                           text=True, timeout=60)
    assert table.returncode == 0, table.stderr
    assert "short schedule: 1 epoch |" in table.stdout and table.stdout.count("| CIFAR-10-LT | CE [model=resnet8] |") == 2
    # Each run's nearest-class-mean top-1 (main.py's "ncm") is its row's NCM column.
    header, _, *rows = [[cell.strip() for cell in line.strip("|").split("|")]
                        for line in table.stdout.splitlines() if line.startswith("|")]
    column = header.index("NCM top-1")
    ncm = {json.loads((runs / name / "results.json").read_text())["ncm"]["top1"]
           for name in ("cifar10_ce_r10_s0", "cifar10_ce_r2_s0")}
    assert {row[column] for row in rows} == {f"{value:.2f}" for value in ncm}
    # The per-class tables from main.py's own results.json: one per ratio, a line per class.
    per_class = subprocess.run([sys.executable, str(SCRIPTS / "summarize.py"), str(runs), "--per_class", "--csv"],
                               capture_output=True, text=True, timeout=60)
    assert per_class.returncode == 0, per_class.stderr
    lines = list(csv.DictReader(io.StringIO(per_class.stdout)))
    assert sorted({line["imbalance_ratio"] for line in lines}) == ["10.0", "2.0"] and len(lines) == 2 * 10
    assert all(0.0 <= float(line["top1_mean"]) <= 100.0 for line in lines)


# ---- gpu_checks.sh ---------------------------------------------------------------------------

def gpu_checks_smoke(tmp_path, *args):
    """gpu_checks.sh --smoke on the CPU, on a .tar.gz of a small JPEG image folder (as the lent machine gets
    CIFAR-10), given with relative paths, as typed in the repository root on the lent machine."""
    import tarfile

    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from helpers import make_synthetic, write_image_folder

    write_image_folder(tmp_path / "src" / "cifar10-jpeg", *make_synthetic(10, 24, 4, seed=3), fmt="jpg")
    archive = tmp_path / "cifar10-jpeg.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar10-jpeg", arcname="cifar10-jpeg")
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(SCRIPTS / "gpu_checks.sh"), "--data", archive.name, "--out", "out",
                           "--device", "cpu", "--workers", "0", "--smoke", *args],
                          env=env, capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_gpu_checks_smoke_on_cpu_from_an_archive(tmp_path):
    """The one-command GPU check, with --smoke on the CPU: unpacks a .tar.gz of an image folder (as the lent
    machine gets CIFAR-10), runs a training run and the benchmark, and leaves its few files flat in --out."""
    proc = gpu_checks_smoke(tmp_path)
    out = tmp_path / "out"
    for step in ("bench_graphs", "bench_options", "train_compile"):  # compiled: not in --smoke unless named
        assert f"{step}: not in --smoke unless --only names it" in proc.stdout
    files = sorted(p.name for p in out.iterdir())
    assert files == ["bench.json", "bench_supcon.json", "log.txt", "results_eager.json", "summary.md"]
    for step in ("decode", "train_eager", "benchmark", "bench_supcon"):
        assert f"{step}: ok" in proc.stdout, step
    assert "train_eager_resumed" not in proc.stdout  # a run that finished is not resumed
    log = (out / "log.txt").read_text()
    assert "torch " in log and "commit: " in log and "== train_eager" in log and "epoch 1/1" in log
    # each step's command as it can be run again: quoted where it must be ('' for an empty value)
    assert "--memory_batch_sizes '' " in log
    assert re.search(r"^numpy \S+ pillow \S+ tqdm \S+ tensorboard \S+$", log, re.M)  # main.py's other imports
    assert re.search(r"^/dev/shm: \S+ total, \S+ free$", log, re.M) and "first step " in log
    bench = json.loads((out / "bench.json").read_text())
    assert bench["complete"] is True and bench["reference"]["samples_per_s"] > 0
    assert "aten::convolution_backward" in {row["op"] for row in bench["project"][0]["profile"]["ops"]}
    supcon = json.loads((out / "bench_supcon.json").read_text())
    assert supcon["complete"] is True and supcon["settings"]["sc_aug"] == "supcon"
    assert supcon["project"][0]["samples_per_s"] > 0 and supcon["reference"] is None
    res = json.loads((out / "results_eager.json").read_text())
    assert res["epochs"] == 1 and res["method"] == "sc" and res["config"]["imb_factor"] == 0.1
    assert res["config"]["ncm_every"] == 10  # the nearest class mean's course in the 200-epoch runs' history
    summary = (out / "summary.md").read_text()
    assert summary.startswith("## eager") and "| CIFAR-10-LT | Hybrid-SC [model=resnet8] |" in summary
    assert "Per-class top-1 at the last epoch, CIFAR-10-LT, imbalance ratio 10, " in summary
    # --per_run: the run's own line, with its training rate and time (the rows hold neither)
    assert "Runs, one line each:" in summary and "| samples/s | train time |" in summary
    assert not list(Path(os.environ.get("TMPDIR", "/tmp")).glob(f"gpu_checks.{'?' * 6}/runs"))  # scratch removed


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                    reason="Inductor compiles C++ on the CPU and finds no compiler ($CXX or g++)")
def test_gpu_checks_smoke_runs_the_compiled_steps_that_only_names(tmp_path):
    """--smoke --only bench_graphs,train_compile: the real benchmark and main.py compile the step with --compile
    --compile_mode reduce-overhead on the CPU (Inductor, about 30 s cold; no CUDA graphs there), as the GPU
    session's call does on the GPU, and bring back their files: what that call needs, checked before a lent GPU's
    minutes are spent on it. (bench_joint, the same step with --bn_stats joint, would take another cold
    compilation; its command is checked by test_gpu_checks_only_runs_the_steps_named.)"""
    proc = gpu_checks_smoke(tmp_path, "--only", "train_compile,bench_graphs")
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["bench_graphs.json", "log.txt", "results_compile.json",
                                                      "summary.md"]
    assert proc.stdout.index("bench_graphs: ok") < proc.stdout.index("train_compile: ok")  # the script's order
    bench = json.loads((out / "bench_graphs.json").read_text())
    row = bench["project"][0]
    assert bench["complete"] is True and row["compile"] is True and row["compile_mode"] == "reduce-overhead"
    assert row["compile_s"] > 0 and row["samples_per_s"] > 0 and row["cudagraph_skips"] >= 1  # (the CPU: no graphs)
    assert len(bench["repeats"]) == 3 and bench["ratio_median"] > 0 and row["profile"]["ops"]
    res = json.loads((out / "results_compile.json").read_text())
    assert res["config"]["compile"] is True and res["config"]["compile_mode"] == "reduce-overhead"
    assert res["epochs"] == 1 and res["first_step_s"] > 0 and res["train_time_s"] > 0
    assert (out / "summary.md").read_text().startswith("## compile")


FAKE_PYTHON = r"""#!/usr/bin/env bash
# Stands in for python in gpu_checks.sh: main.py is "cut off" (exit 124, as timeout reports it, after writing
# config.json and, when FAKE_CHECKPOINT is 1, last.pt) unless given --resume, which finishes it, or --dry_run,
# which writes nothing; the benchmark writes its JSON; the environment's version probes answer at once (importing
# torch for real took 12 to 18 s on a loaded 2-core machine, which a test's --budget_s counts); the rest is real
# python.
printf '%q ' "$@" >>"$FAKE_LOG"
echo >>"$FAKE_LOG"
echo "${TORCHINDUCTOR_CACHE_DIR##*/} $*" >>"$FAKE_LOG.inductor"
case $1 in
  main.py | */main.py)  # gpu_checks.sh calls main.py, sweep.sh (its table1 step) the repository's path to it
    out="" resume=0 dry_run=0
    while (($#)); do
      case $1 in --output_dir) out=$2; shift 2 ;; --resume) resume=1; shift ;; --dry_run) dry_run=1; shift ;; *) shift ;; esac
    done
    if ((dry_run)); then exit 0; fi  # writes nothing
    mkdir -p "$out"
    if ((resume)); then cp "$FAKE_RESULTS" "$out/results.json"; exit 0; fi
    echo '{}' >"$out/config.json"
    if ((${FAKE_RUN_UNTIL_TERM:-0})); then  # trains until a SIGTERM, then takes FAKE_STEP_S to finish its step
      # The trap first: a test signals once it reads the pid, which must not find the default SIGTERM (exit 143).
      trap 'sleep "$FAKE_STEP_S"; echo checkpoint >"$out/last.pt"; exit 130' TERM
      echo $$ >>"$FAKE_LOG.pids"
      while :; do sleep 0.1; done
    fi
    if ((FAKE_CHECKPOINT)); then echo checkpoint >"$out/last.pt"; fi
    exit "${FAKE_MAIN_EXIT:-124}" ;;  # 137 at once: killed by something else (the out-of-memory killer)
  scripts/benchmark.py)
    # ... and leaves the temporary file of a write it was killed in (util.atomic_write's name for it).
    while (($#)); do [[ $1 == --json ]] && echo '{"complete": true}' >"$2" && : >"${2%/*}/.${2##*/}.k1ll3d.tmp"; shift; done
    exit 0 ;;
  -c) [[ $2 == *load_cifar* ]] && exit 0  # the decode step (the data folder here is empty)
    [[ $2 == "import sys, torch, torchvision;"* ]] && echo "torch (fake python)" && exit 0  # log.txt's versions
    [[ $2 == "import numpy, PIL, tqdm, tensorboard;"* ]] && echo "numpy (fake python)" && exit 0
    exec "$REAL_PYTHON" "$@" ;;
  *) exec "$REAL_PYTHON" "$@" ;;
esac
"""


def fake_python_env(tmp_path: Path, **fake: str) -> dict[str, str]:
    """The environment that makes gpu_checks.sh use FAKE_PYTHON (its calls logged to tmp_path/calls.log), with
    tmp_path/data for --data (the image-folder layout's train/ and test/, empty) and the FAKE_* settings given."""
    python = tmp_path / "fake_python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    for split in ("train", "test"):
        (tmp_path / "data" / split).mkdir(parents=True)
    return {**os.environ, "PYTHON": str(python), "REAL_PYTHON": sys.executable, "FAKE_LOG": str(tmp_path / "calls.log"),
            **{f"FAKE_{name.upper()}": value for name, value in fake.items()}}


def test_gpu_checks_an_early_sigkill_is_a_failure_not_its_cap(tmp_path):
    """A run SIGKILLed long before its cap (the kernel's out-of-memory killer) exits 137 as a run the cap killed
    does: it is reported FAILED, and its last.pt is not resumed as a cut-off run's would be."""
    env = fake_python_env(tmp_path, checkpoint="1", main_exit="137")
    proc = subprocess.run(["bash", str(SCRIPTS / "gpu_checks.sh"), "--data", str(tmp_path / "data"), "--out",
                           str(tmp_path / "out"), "--device", "cpu", "--only", "train_eager,benchmark"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert re.search(r"train_eager: FAILED, exit 137 after \d+s", proc.stdout), proc.stdout
    assert "CUT OFF" not in proc.stdout and "train_eager_resumed" not in proc.stdout
    assert "benchmark: ok" in proc.stdout


@pytest.mark.parametrize("checkpoint", [True, False], ids=["last.pt saved", "no checkpoint"])
def test_gpu_checks_resumes_a_cut_off_eager_run_before_the_rest(tmp_path, checkpoint):
    """A 200-epoch run that its cap cut off is continued with --resume after the benchmarks, in the same folder,
    and its results.json still comes back; the compiled twin is not started then. Without a last.pt to resume
    from, the steps run as usual."""
    results = tmp_path / "template.json"
    results.write_text(json.dumps(result_dict(epochs=200)))
    env = fake_python_env(tmp_path, results=str(results), checkpoint="1" if checkpoint else "0")
    data, calls = tmp_path / "data", tmp_path / "calls.log"
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(SCRIPTS / "gpu_checks.sh"), "--data", str(data), "--out", str(out),
                           "--device", "cpu"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # a step was cut off
    lines = calls.read_text().splitlines()
    decode = [i for i, line in enumerate(lines) if "load_cifar" in line]
    assert len(decode) == 1 and decode[0] < min(i for i, line in enumerate(lines) if line.startswith("main.py"))
    assert "decode: ok" in proc.stdout
    assert (out / "bench.json").exists() and not list(out.glob(".*.tmp"))  # no stray temporary files come back
    calls_made = [line.split() for line in lines if line.split()[0] != "-c"]
    mains = [args for args in calls_made if args[0] == "main.py"]
    assert "train_eager: CUT OFF" in proc.stdout
    # Every step has an Inductor cache of its own, except that the compiled run shares bench_graphs' (the same
    # step, compiled there from an empty cache).
    caches = {}
    for line in (tmp_path / "calls.log.inductor").read_text().splitlines():
        cache, args = line.split(" ", 1)
        caches.setdefault(cache, []).append(args)
    if not checkpoint:
        # Every step's flags are ones the real programs take (a misspelt flag would fail only on the GPU).
        bench = load_script("benchmark")
        for args in (shlex.split(line) for line in lines):
            if args[0] == "scripts/benchmark.py":
                bench.parse_args(args[1:])
            elif args[0] == "main.py":
                bench.main.parse_config(args[1:])
        assert "--repeats 3" in caches["inductor_compile"][0]  # the compiled step's ratio, three times in turn
        assert "train_eager_resumed" not in proc.stdout and "train_compile: CUT OFF" in proc.stdout
        assert len(mains) == 2 and "--compile" in mains[1] and "--resume" not in mains[1]
        shared = caches["inductor_compile"]
        assert len(shared) == 2 and shared[0].startswith("scripts/benchmark.py") and shared[1].startswith("main.py")
        assert all("--compile --compile_mode reduce-overhead" in args for args in shared)
        assert "--profile" in shared[0] and "--no_reference" not in shared[0]  # against the reference
        assert [len(caches[f"inductor_{step}"]) for step in ("train_eager", "benchmark", "bench_options")] == [1, 1, 1]
        assert "--compare_options" in caches["inductor_bench_options"][0]
        return
    assert "train_eager_resumed: ok" in proc.stdout
    assert len(mains) == 2 and "--resume" not in mains[0] and mains[1] == mains[0] + ["--resume"]
    assert [args[0] for args in calls_made] == ["main.py", "scripts/benchmark.py", "scripts/benchmark.py", "main.py",
                                                "scripts/benchmark.py", "scripts/benchmark.py", "scripts/summarize.py"]
    assert "reduce-overhead" in calls_made[4] and "--compare_options" in calls_made[5]  # after the resumed run
    assert "train_compile: not run (the cut-off eager run was resumed instead)" in proc.stdout
    assert json.loads((out / "results_eager.json").read_text())["epochs"] == 200
    assert "| CIFAR-10-LT | Hybrid-SC | 100 |" in (out / "summary.md").read_text()
    assert not (out / "results_compile.json").exists()


def test_gpu_checks_only_runs_the_steps_named(tmp_path):
    """--only bench_graphs,train_compile,bench_joint: the data is decoded, then those steps run in the script's
    order (whatever the order named), the first two sharing one Inductor cache, bench_joint (another graph) with its
    own; the others are reported as not chosen, which is not a failure."""
    results = tmp_path / "template.json"
    results.write_text(json.dumps(result_dict(epochs=200)))
    env = fake_python_env(tmp_path, results=str(results), checkpoint="0")
    calls = tmp_path / "calls.log"
    proc = subprocess.run(["bash", str(SCRIPTS / "gpu_checks.sh"), "--data", str(tmp_path / "data"), "--out",
                           str(tmp_path / "out"), "--device", "cpu", "--only=bench_joint,train_compile,bench_graphs"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # the fake main.py is always cut off
    lines = calls.read_text().splitlines()
    steps = [line.split() for line in lines if not line.startswith("-c") or "load_cifar" in line]  # not the environment's
    assert [args[0] for args in steps] == ["-c", "scripts/benchmark.py", "main.py", "scripts/benchmark.py"]  # decode first
    assert "reduce-overhead" in steps[1] and "--compile" in steps[2] and "--bn_stats" not in steps[1]
    joint = steps[3]
    assert joint[joint.index("--bn_stats") + 1] == "joint" and joint[joint.index("--compile_mode") + 1] == "reduce-overhead"
    assert {"--compile", "--no_reference", "--profile"} <= set(joint)
    caches = [line.split(" ", 2)[:2] for line in (tmp_path / "calls.log.inductor").read_text().splitlines()]
    assert [cache for cache, program in caches if program != "-c"] == ["inductor_compile", "inductor_compile",
                                                                       "inductor_bench_joint"]
    for step in ("train_eager", "benchmark", "bench_supcon", "bench_options", "table1"):
        assert f"{step}: not chosen (--only)" in proc.stdout
    assert "decode: ok" in proc.stdout and "bench_graphs: ok" in proc.stdout and "train_compile: CUT OFF" in proc.stdout
    assert "bench_joint: ok" in proc.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["bench_graphs.json", "bench_joint.json", "log.txt",
                                                                     "summary.md"]
    # All chosen steps that run and pass: exit 0.
    (tmp_path / "out").rename(tmp_path / "out_1")
    proc = subprocess.run(["bash", str(SCRIPTS / "gpu_checks.sh"), "--data", str(tmp_path / "data"), "--out",
                           str(tmp_path / "out"), "--device", "cpu", "--only", "bench_options"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "bench_options: ok" in proc.stdout, proc.stdout + proc.stderr


def test_gpu_checks_table1_runs_the_missing_ratios_through_sweep_on_cpu(tmp_path):
    """--only table1 --smoke: the real sweep.sh and main.py train Hybrid-SC and Hybrid-PSC at ratios 50 and 10, one
    after another, and each run's config.json and results.json come back in one archive, with their summary."""
    import tarfile

    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from helpers import make_synthetic, write_image_folder

    # 60 images in the largest class: ratio 50 leaves the smallest one image.
    write_image_folder(tmp_path / "data", *make_synthetic(10, 60, 4, seed=3), fmt="png")
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(SCRIPTS / "gpu_checks.sh"), "--data", str(tmp_path / "data"), "--out",
                           str(tmp_path / "out"), "--device", "cpu", "--only", "table1", "--smoke"],
                          env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "table1: ok" in proc.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["log.txt", "summary.md", "table1_runs.tar.gz"]
    log = (tmp_path / "out" / "log.txt").read_text()
    order = [m.group(1) for m in re.finditer(r"^\[(cifar10_\w+)\] \S+ \S+/main\.py ", log, re.M)]
    assert order == ["cifar10_sc_r50_s0", "cifar10_psc_r50_s0", "cifar10_sc_r10_s0", "cifar10_psc_r10_s0"]
    with tarfile.open(tmp_path / "out" / "table1_runs.tar.gz") as tar:
        assert sorted(tar.getnames()) == sorted(f"{run}/{f}" for run in order for f in ("config.json", "results.json"))
        # The "data" filter where Python has it (3.10.12+; Python 3.12 and 3.13 warn without a filter).
        tar.extractall(tmp_path / "table1", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    for run in order:
        res = json.loads((tmp_path / "table1" / run / "results.json").read_text())
        method, ratio = run.split("_")[1], int(run.split("_")[2][1:])
        assert (res["method"], res["imbalance_ratio"], res["epochs"]) == (method, ratio, 1)
        assert res["config"]["eval_every"] == 5 and res["config"]["compile"] is False  # no compilation in --smoke
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert summary.startswith("## table1")
    for method in ("Hybrid-SC", "Hybrid-PSC"):
        for ratio in (50, 10):
            assert f"| CIFAR-10-LT | {method} [model=resnet8] | {ratio} |" in summary, (method, ratio)


def test_gpu_checks_table1_compiles_and_brings_back_a_cut_off_run_to_resume(tmp_path):
    """On the GPU (here a fake python) table1's runs are compiled with CUDA graphs from bench_graphs' Inductor cache;
    a run cut off comes back as its config.json and last.pt. table1 runs only when --only names it."""
    import tarfile

    env = fake_python_env(tmp_path, checkpoint="1")
    proc = subprocess.run(["bash", str(SCRIPTS / "gpu_checks.sh"), "--data", str(tmp_path / "data"), "--out",
                           str(tmp_path / "out"), "--device", "cpu", "--only", "table1,bench_graphs"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # the fake main.py is always cut off: the sweep fails
    assert "bench_graphs: ok" in proc.stdout and "table1: FAILED, exit 1" in proc.stdout
    caches = [line.split(" ", 2) for line in (tmp_path / "calls.log.inductor").read_text().splitlines()]
    steps = [(cache, program, args) for cache, program, args in caches if program != "-c"]
    assert [program for _, program, _ in steps] == ["scripts/benchmark.py"] + [str(REPO_ROOT / "main.py")] * 7
    assert {cache for cache, _, _ in steps} == {"inductor_compile"}  # bench_graphs' cache, shared
    bench = load_script("benchmark")
    mains = [shlex.split(args) for _, program, args in steps[1:]]
    assert ["--dry_run" in args for args in mains] == [True] * 3 + [False] * 4  # sc and psc at 50, sc at 10, first
    for args in mains:
        cfg = bench.main.parse_config(args)  # flags the real main.py takes
        assert (cfg.compile, cfg.compile_mode, cfg.eval_every, cfg.device) == (True, "reduce-overhead", 5, "cpu")
    assert [(cfg.loss, cfg.imb_factor) for cfg in map(bench.main.parse_config, mains) if not cfg.dry_run] == [
        ("sc", 0.02), ("psc", 0.02), ("sc", 0.1), ("psc", 0.1)]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "bench_graphs.json", "log.txt", "summary.md", "table1_runs.tar.gz"]
    with tarfile.open(tmp_path / "out" / "table1_runs.tar.gz") as tar:
        assert sorted(tar.getnames()) == sorted(f"cifar10_{m}_r{r}_s0/{f}" for m in ("sc", "psc") for r in (50, 10)
                                                for f in ("config.json", "last.pt"))
    assert (tmp_path / "out" / "summary.md").read_text() == "no run finished: see log.txt\n"
    # Without --only it is left out, not skipped: the default budget leaves it no time.
    proc = subprocess.run(["bash", str(SCRIPTS / "gpu_checks.sh"), "--data", str(tmp_path / "data"), "--out",
                           str(tmp_path / "out_2"), "--device", "cpu", "--budget_s", "0"],
                          env=env, capture_output=True, text=True, timeout=120)
    for step in ("bench_joint", "table1"):
        assert f"{step}: not run (only when --only names it)" in proc.stdout and f"{step}: skipped" not in proc.stdout


def test_gpu_checks_table1_kills_a_run_still_in_its_step_when_the_cap_comes(tmp_path):
    """The cap's SIGTERM reaches the running main.py through the sweep, the KILL GPU_CHECKS_GRACE_S (10 s; 4 here, to
    keep the test short) later only the sweep (each run has a process group of its own): a run still in its step then
    (a first step compiling takes about 50 s) is killed before its folder is packed and the scratch folder removed,
    not left running on the GPU."""
    import tarfile

    env = {**fake_python_env(tmp_path, checkpoint="0", run_until_term="1", step_s="120"), "GPU_CHECKS_GRACE_S": "4"}
    calls = tmp_path / "calls.log"
    proc = subprocess.run(["bash", str(SCRIPTS / "gpu_checks.sh"), "--data", str(tmp_path / "data"), "--out",
                           str(tmp_path / "out"), "--device", "cpu", "--only", "table1", "--budget_s", "36"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "table1: CUT OFF" in proc.stdout, proc.stdout + proc.stderr
    (pid,) = map(int, Path(f"{calls}.pids").read_text().split())  # the first run, stopped in its step
    assert "table1: killed a run that was still in a step 4 s after its SIGTERM" in proc.stdout
    # 36 - 15 for the summary - the start and decode (no real python: a second or two, on a loaded machine up to 9,
    # and the 12 s that three graces take must be left)
    assert re.search(r"== table1 \(at most (1[2-9]|2[01])s\)", proc.stdout), proc.stdout
    stat = Path(f"/proc/{pid}/stat")
    assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"  # gone, or a zombie
    with tarfile.open(tmp_path / "out" / "table1_runs.tar.gz") as tar:
        assert tar.getnames() == ["cifar10_sc_r50_s0/config.json"]  # no last.pt: killed before it wrote one


@pytest.mark.parametrize("grace", ["0", "abc", "1.5", "10000"])
def test_gpu_checks_refuses_a_bad_grace(tmp_path, grace):
    (tmp_path / "data" / "train").mkdir(parents=True)
    proc = subprocess.run(["bash", str(SCRIPTS / "gpu_checks.sh"), "--data", str(tmp_path / "data"), "--out",
                           str(tmp_path / "out")], env={**os.environ, "GPU_CHECKS_GRACE_S": grace},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"GPU_CHECKS_GRACE_S must be a whole number of seconds from 1 to 9999, got '{grace}'" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_gpu_checks_refuses_bad_input_and_reports_skipped_steps(tmp_path):
    script = ["bash", str(SCRIPTS / "gpu_checks.sh")]
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("earlier results")
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    (data / "test").mkdir()
    for args, message in (
        (["--out", str(tmp_path / "o")], "--data is required"),
        (["--data", str(occupied), "--out", str(tmp_path / "o")], "holds no CIFAR-10 layout"),  # a folder of other files
        (["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")], "does not exist"),
        (["--data", str(data), "--out", str(occupied)], "is not empty"),
        (["--data", str(data), "--out", str(tmp_path / "o"), "--budget_s", "1.5"], "whole number"),
        (["--data", str(data), "--out", str(tmp_path / "o"), "--budget_s", "99999999999999999999"], "below 10**9"),
        (["--data", str(data), "--out", str(tmp_path / "o"), "--device", "tpu"], "cuda or cpu"),
        (["--data", str(data), "--out", str(occupied / "keep.txt")], "exists and is not a folder"),
        (["--data", str(data), "--out", str(occupied / "keep.txt" / "o")], "cannot be created (Not a directory)"),
        (["--data", str(occupied / "keep.txt"), "--out", str(tmp_path / "o")], "cannot unpack"),  # not a .tar.gz
        (["--data", str(data), "--out", str(tmp_path / "o"), "--only", "bench"], "--only: no step 'bench'"),
        (["--data", str(data), "--out", str(tmp_path / "o"), "--only", "benchmark,,train_compile"], "no step ''"),
        (["--data", str(data), "--out", str(tmp_path / "o"), "--only", "benchmark,"], "no step ''"),
        (["--data", str(data), "--out", str(tmp_path / "o"), "--only", ""], "no step ''"),
        (["--data", str(data), "--out", str(tmp_path / "o"), "--only"], "--only needs a value"),
        (["--data", str(data), "--out", str(tmp_path / "o"), "--only", "benchmark bench_supcon"], "without spaces"),
        (["--data", str(data), "--out", str(tmp_path / "o"), "--only", "benchmark\nbench_supcon"], "without spaces"),
        (["--data", str(data), "--out", str(tmp_path / "o"), "--only", "bench*"], "no step 'bench*'"),
        # (benchmark.py's MAX_WORKERS: a mistyped number started DataLoader workers until the step's cap)
        (["--data", str(data), "--out", str(tmp_path / "o"), "--workers", "129"], "from 0 to 128, got '129'"),
        (["--data", str(data), "--out", str(tmp_path / "o"), "--workers", "9" * 30], "from 0 to 128"),
        (["--data", str(data), "--out", str(tmp_path / "o"), "--workers", "128", "--only", "bench"], "no step 'bench'"),
        (["--data", str(data), "--out", str(tmp_path / "o"), "--only",
          "train_eager,benchmark,bench_supcon,bench_graphs,bench_options,train_compile,table1"], "leave 1 out"),
        (["--data", str(data), "--out", str(tmp_path / "o"), "--only",
          "train_eager,benchmark,bench_supcon,bench_graphs,bench_options,train_compile,bench_joint,table1"],
         "8 steps would leave 10 files in --out, more than a lent machine returns (8); name at most 6 (leave 2 out)"),
    ):
        proc = subprocess.run([*script, *args], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert [p.name for p in occupied.iterdir()] == ["keep.txt"]
    assert (occupied / "keep.txt").read_text() == "earlier results"
    assert not (tmp_path / "o").exists()  # nothing made for bad input, bad data included
    # No time left: every step is skipped, said so, and the exit status says the checks did not run.
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run([*script, "--data", str(data), "--out", str(tmp_path / "o"), "--device", "cpu",
                           "--budget_s", "0"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    for step in ("decode", "train_eager", "benchmark", "bench_supcon", "bench_graphs", "bench_options", "train_compile"):
        assert f"{step}: skipped" in proc.stdout
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["log.txt", "summary.md"]
    assert "nvidia-smi" in (tmp_path / "o" / "log.txt").read_text()
    assert (tmp_path / "o" / "summary.md").read_text() == "no run finished: see log.txt\n"


def test_gpu_checks_takes_a_relative_tmpdir_and_removes_its_scratch_folder(tmp_path):
    """A relative TMPDIR made the scratch folder relative: every step (run from the repository) missed the unpacked
    data, and the removal at the end missed the folder, which stayed behind."""
    env = {**fake_python_env(tmp_path), "TMPDIR": "reltmp"}  # (which makes data/train/ and data/test/)
    archive = tmp_path / "data.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "data", arcname="cifar10-jpeg")
    (tmp_path / "reltmp").mkdir()
    proc = subprocess.run(["bash", str(SCRIPTS / "gpu_checks.sh"), "--data", str(archive), "--out", "out",
                           "--device", "cpu", "--only", "bench_options"], env=env, capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 0 and "bench_options: ok" in proc.stdout, proc.stdout + proc.stderr
    assert "decode: ok" in proc.stdout and list((tmp_path / "reltmp").iterdir()) == []


@pytest.mark.parametrize("script", ["sweep.sh", "gpu_checks.sh"])
def test_a_tmpdir_where_no_scratch_folder_can_be_made_is_one_line(tmp_path, script):
    """mktemp's own lines (two for a TMPDIR that reads as an option), without the script's name, were all it said."""
    (tmp_path / "data" / "train").mkdir(parents=True)
    args = {"sweep.sh": ["--dataset", "cifar10", "--imb_factors", "0.1", "--runs_dir", str(tmp_path / "runs")],
            "gpu_checks.sh": ["--data", str(tmp_path / "data"), "--out", str(tmp_path / "out")]}[script]
    for tmpdir in (str(tmp_path / "missing"), "-x"):
        proc = subprocess.run(["bash", str(SCRIPTS / script), *args], env={**os.environ, "TMPDIR": tmpdir,
                                                                          "PYTHON": sys.executable},
                              capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert proc.returncode == 2 and proc.stderr == (f"{script}: error: cannot make a scratch folder in TMPDIR "
                                                        f"'{tmpdir}' (missing or not writable?)\n"), proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_gpu_checks_takes_relative_paths_that_start_with_a_dash(tmp_path):
    """'--data -d --out -o' are folders, not options to dirname, mkdir or cd."""
    for split in ("train", "test"):
        (tmp_path / "-data" / split).mkdir(parents=True)
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(SCRIPTS / "gpu_checks.sh"), "--data", "-data", "--out", "-out", "--device", "cpu",
                           "--budget_s", "0"], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 1 and proc.stderr == "", proc.stderr  # 1: no time for any step
    assert sorted(p.name for p in (tmp_path / "-out").iterdir()) == ["log.txt", "summary.md"]
    assert f"data: {tmp_path / '-data'}\n" in (tmp_path / "-out" / "log.txt").read_text()


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_gpu_checks_interrupted_stops_its_step_skips_the_rest_and_still_writes_the_summary(tmp_path, sig, code):
    """Ctrl-C did nothing (timeout runs each step in a process group of its own, so only the script got it, and it
    waited the step out and ran every later one); a SIGTERM ended the script at once and left the step running on,
    the GPU held and the scratch folder written again. Now the step gets one SIGTERM (main.py saves last.pt), the
    later steps are not run, and the summary is written; exit 130 / 143."""
    env = fake_python_env(tmp_path, checkpoint="0", run_until_term="1", step_s="1")
    calls = tmp_path / "calls.log"
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    process = subprocess.Popen([*WITH_DEFAULT_SIGINT, "bash", str(SCRIPTS / "gpu_checks.sh"), "--data",
                                str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--device", "cpu", "--only",
                                "train_eager,benchmark"], env={**env, "TMPDIR": str(scratch)}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    pids = Path(f"{calls}.pids")
    deadline = time.monotonic() + 30
    # (the file is there from the moment the fake's echo opened it, before it wrote the pid: wait for the line)
    while not (pids.exists() and pids.read_text().endswith("\n")) and time.monotonic() < deadline:
        time.sleep(0.05)
    (pid,) = map(int, pids.read_text().split())  # the fake main.py, training
    process.send_signal(sig)  # the script alone, as a terminal's Ctrl-C reaches it
    try:
        stdout, stderr = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail("gpu_checks.sh did not stop within 30 s of the signal")
    assert process.returncode == code, stdout + stderr
    name = signal.Signals(sig).name.removeprefix("SIG")
    assert stderr.splitlines()[-1] == f"gpu_checks.sh: interrupted ({name}): stopping the running step; the summary " \
                                      "follows", stderr
    assert re.search(r"train_eager: INTERRUPTED after \d+s \(exit 130\)", stdout), stdout
    assert "benchmark: not run (interrupted)" in stdout and "train_eager_resumed" not in stdout
    assert (tmp_path / "out" / "summary.md").read_text() == "no run finished: see log.txt\n"
    assert [line.split()[0] for line in calls.read_text().splitlines() if not line.startswith("-c ")] == ["main.py"]
    stat = Path(f"/proc/{pid}/stat")
    assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"  # gone, or a zombie
    assert not list(scratch.glob("gpu_checks.*"))  # its scratch removed, and not written again by a step left running
