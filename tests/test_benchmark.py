"""scripts/benchmark.py: the real script end to end on tiny settings, its options, its bad flags.

Speed is never asserted (it depends on the machine and on whoever else uses it); memory growth is, because the
probe counts the loss's own buffers.
"""
from __future__ import annotations

import importlib.util
import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import main
from helpers import make_synthetic

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "benchmark.py"
TINY = ["--device", "cpu", "--model", "resnet8", "--batch_size", "8", "--steps", "2", "--warmup_steps", "1"]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def cuda_report(bench, project: list[dict]) -> str:
    """bench.format_report of a made-up CUDA result holding only these project rows."""
    return bench.format_report({
        "device": "cuda:0 (test)", "torch_version": "x", "load_average_start": 0, "load_average_after_timing": 0,
        "settings": {"model": "resnet32", "loss": "sc", "batch_size": 8, "steps": 1, "warmup_steps": 1},
        "data": {"source": "synthetic", "train_size": 8}, "reference": None, "memory": None, "project": project})


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_script_writes_json_with_every_measurement(tmp_path):
    out = tmp_path / "bench.json"
    # 1024 and 2048 rather than smaller sizes: below ~256 the loss's buffers fit in memory already resident, and PSC's
    # ~2 MiB at 512 varied by a third from one probe to the next (its growth exponent to 1024 read 1.64 once).
    argv = [*TINY, "--workers", "1", "--memory_batch_sizes", "1024,2048", "--json", str(out)]
    done = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "| project: as configured |" in done.stdout and "| reference:" in done.stdout
    result = json.loads(out.read_text())
    for key in ("command", "torch_version", "device", "cpu_count", "torch_threads", "settings", "data", "project",
                "reference", "ratio", "memory", "load_average_start", "load_average_after_timing"):
        assert key in result, key
    assert result["command"].startswith("python scripts/benchmark.py") and "--memory_batch_sizes" in result["command"]
    assert result["torch_version"] == torch.__version__ and result["device"].startswith("cpu")
    assert result["data"] == {"source": "synthetic", "train_size": 12406,
                              "class_counts": [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]}
    assert result["settings"]["model"] == "resnet8" and result["settings"]["batch_size"] == 8
    [project] = result["project"]
    reference = result["reference"]
    for row in (project, reference):
        assert row["steps"] == 2
        for key in ("samples_per_s", "seconds", "step_ms", "first_step_s", "warmup_s", "final_loss"):
            assert _positive(row[key]), (key, row[key])
        assert row["samples_per_s"] == pytest.approx(2 * 8 / row["seconds"])
    assert project["host_sync"] is None  # checked on CUDA only; on the CPU tests/test_step_ops.py does it
    fast = main.fast_default(torch.device("cpu"))  # bf16 on CPUs with native bf16; channels_last everywhere
    assert (project["amp"], project["channels_last"], project["compile"], project["compile_mode"]) == \
        (fast, True, False, None)
    assert reference["workers"] == 1 and reference["drained_batches"] == 2  # one worker, prefetch_factor 2
    assert result["ratio"] == pytest.approx(project["samples_per_s"] / reference["samples_per_s"])
    assert result["repeats"] == [{"project_samples_per_s": project["samples_per_s"],
                                  "reference_samples_per_s": reference["samples_per_s"], "ratio": result["ratio"]}]
    assert result["ratio_median"] == result["ratio"] and "alternating" not in done.stdout  # one pair: no line
    rows = result["memory"]["rows"]
    assert [(r["loss"], r["batch_size"]) for r in rows] == [("sc", 1024), ("sc", 2048), ("psc", 1024), ("psc", 2048)]
    assert all(_positive(r["peak_bytes"]) for r in rows)
    assert "VmHWM" in result["memory"]["method"]
    sc, psc = rows[1], rows[3]
    # SC holds [2B, 2B] matrices (exponent ~2), PSC [2B, C] ones (~1).
    assert sc["growth_exponent"] > psc["growth_exponent"] + 0.5
    assert sc["peak_bytes"] > 4 * psc["peak_bytes"]


@pytest.mark.parametrize("loss", ["psc", "ce"])
def test_psc_and_ce_time_both_pipelines(bench, loss):
    argv = [*TINY, "--batch_size", "4", "--steps", "1", "--loss", loss, "--workers", "0", "--memory_batch_sizes", ""]
    cfg, opts = bench.parse_args(argv)
    result = bench.run(cfg, opts, argv)
    assert result["memory"] is None
    for row in (result["project"][0], result["reference"]):
        assert _positive(row["samples_per_s"]) and math.isfinite(row["final_loss"])
    assert "| project: as configured |" in bench.format_report(result)


@pytest.mark.parametrize("bn_stats, split", [("joint", None), ("per_branch", 8)])
def test_both_pipelines_pass_the_bn_stats_choice_to_the_network(bench, monkeypatch, bn_stats, split):
    """The reference has the project's maths: with --bn_stats per_branch both split the 2B views from the B images."""
    import networks

    seen, forward = [], networks.HybridNet.forward

    def recording_forward(self, x, split=None):
        seen.append((len(x), split))
        return forward(self, x, split=split)

    monkeypatch.setattr(networks.HybridNet, "forward", recording_forward)
    argv = [*TINY, "--batch_size", "4", "--steps", "1", "--workers", "0", "--memory_batch_sizes", "",
            "--bn_stats", bn_stats]
    bench.run(*bench.parse_args(argv), argv)
    assert seen and set(seen) == {(12, split)}  # both pipelines, every step: 2B views + B images, B = 4


def test_supcon_views_in_both_pipelines(bench):
    """--sc_aug supcon: the project's stream and the reference's two-crop loader both use SupContrast's transforms
    for the views; the reference's classifier-branch loader keeps the paper's."""
    from torchvision import transforms

    argv = [*TINY, "--batch_size", "4", "--steps", "1", "--workers", "0", "--memory_batch_sizes", "", "--sc_aug",
            "supcon"]
    cfg, opts = bench.parse_args(argv)
    assert cfg.sc_aug == "supcon"
    train = bench.data.ArraySplit(np.zeros((10, 32, 32, 3), np.uint8), np.arange(10))
    feature_loader, ce_loader = bench.reference_loaders(cfg, train, torch.device("cpu"), 0)
    view_steps = [type(t) for t in feature_loader.dataset.transform.transform.transforms]
    assert view_steps[:3] == [transforms.RandomResizedCrop, transforms.RandomHorizontalFlip, transforms.RandomApply]
    assert type(ce_loader.dataset.transform.transforms[0]) is transforms.RandomCrop
    result = bench.run(cfg, opts, argv)
    for row in (result["project"][0], result["reference"]):
        assert _positive(row["samples_per_s"]) and math.isfinite(row["final_loss"])


@pytest.mark.parametrize("argv, feature, ce", [
    ([], "instance", "class"),  # the hybrid's defaults
    (["--loss", "ce"], None, "instance"),  # plain CE: one instance-sampled loader
    (["--sc_sampler", "sqrt", "--ce_sampler", "reversed"], "sqrt", "reversed"),
])
def test_reference_loaders_draw_as_the_projects_samplers(bench, argv, feature, ce):
    """Each reference loader draws images as the project's sampler of its branch does: a shuffle for `instance`,
    else each image weighing its class's probability spread over the class's images."""
    cfg, _ = bench.parse_args([*TINY, *argv])
    labels = np.repeat(np.arange(10), [40, 20, 10, 8, 5, 4, 3, 2, 2, 1])
    train = bench.data.ArraySplit(np.zeros((len(labels), 32, 32, 3), np.uint8), labels)
    loaders = bench.reference_loaders(cfg, train, torch.device("cpu"), 0)
    counts = np.bincount(labels).astype(np.float64)
    for loader, sampler in zip(loaders, (feature, ce)):
        if sampler is None:
            assert loader is None
        elif sampler == "instance":
            assert isinstance(loader.sampler, torch.utils.data.RandomSampler) and loader.drop_last
        else:
            assert isinstance(loader.sampler, torch.utils.data.WeightedRandomSampler) and loader.drop_last
            per_class = {"class": np.ones(10), "sqrt": np.sqrt(counts), "reversed": counts.max() / counts}[sampler]
            class_share = np.bincount(labels, weights=loader.sampler.weights.numpy())  # each class's total weight
            np.testing.assert_allclose(class_share / class_share.sum(), per_class / per_class.sum(), rtol=1e-12)
            assert len(set(loader.sampler.weights[labels == 0].tolist())) == 1  # uniform within a class


def test_help_says_what_no_data_root_and_the_default_workers_mean(bench):
    text = " ".join(bench.get_args_parser().format_help().split())
    assert "(default: none, synthetic uint8 images in the long-tailed class sizes)" in text
    assert "(default: min(4, CPU count))" in text and "(default: 512,1024,2048,4096,8192)" in text
    assert "default: None" not in text and "default: False" not in text
    assert bench.parse_args(["--device", "cpu"])[1].data_root is None


def test_no_reference_and_no_memory(bench):
    argv = [*TINY, "--no_reference", "--memory_batch_sizes", ""]
    result = bench.run(*bench.parse_args(argv), argv)
    assert result["reference"] is None and result["ratio"] is None and result["memory"] is None
    assert result["project"][0]["ratio_to_reference"] is None
    assert "reference:" not in bench.format_report(result)


def test_profile_breaks_the_first_project_row_down_by_operator(bench):
    argv = [*TINY, "--no_reference", "--memory_batch_sizes", "", "--profile"]
    saved = []
    result = bench.run(*bench.parse_args(argv), argv, save=lambda r: saved.append(json.loads(json.dumps(r))))
    # The row's timing is saved before the profiler runs, last, so a time limit that stops it costs nothing else.
    assert "profile" not in saved[-2]["project"][0] and saved[-2]["complete"] is False
    assert saved[-1] == json.loads(json.dumps(result)) and result["settings"]["profile"] is True
    prof = result["project"][0]["profile"]
    assert prof["steps"] == 2 and prof["clock"] == "cpu" and _positive(prof["ms_per_step"])
    ops = {row["op"]: row for row in prof["ops"]}
    assert "kernels" not in prof and "outside_operators_ms_per_step" not in prof  # CUDA only
    assert len(prof["ops"]) == bench.PROFILE_TOP + 1 and prof["ops"][-1]["op"].startswith("other (")
    assert math.isclose(sum(row["share"] for row in prof["ops"]), 1.0, rel_tol=1e-9)
    assert math.isclose(sum(row["ms_per_step"] for row in prof["ops"]), prof["ms_per_step"], rel_tol=1e-9)
    shares = [row["share"] for row in prof["ops"][:-1]]
    assert shares == sorted(shares, reverse=True)
    # resnet8 has 7 convolutions, and per-branch batch norm passes each branch through them apart.
    assert ops["aten::convolution_backward"]["calls_per_step"] == 2 * 7
    assert "| aten::convolution_backward |" in bench.format_report(result)
    assert "spends its time (torch.profiler, 2 steps, cpu self time" in bench.format_report(result)
    plain = bench.run(*bench.parse_args(argv[:-1]), argv[:-1])
    assert "profile" not in plain["project"][0] and "spends its time" not in bench.format_report(plain)


def test_a_host_sync_raised_in_the_stream_leaves_the_profile_its_steps(bench, monkeypatch):
    """On CUDA, host_sync_check's error can come from inside the batch stream's generator, which closes it; the
    profile that runs next on the same step still gets batches (a fresh stream) rather than StopIteration."""
    import dataset_loader

    original, armed = dataset_loader.TrainStream.epoch, []

    def epoch(self, *args, **kwargs):
        for batch in original(self, *args, **kwargs):
            if armed:
                armed.clear()
                raise RuntimeError("called a synchronizing CUDA operation")
            yield batch

    def check(step, device, steps=1):  # stands in for the CUDA debug mode: the stream's next batch syncs
        armed.append(True)
        try:
            step()
        except RuntimeError as e:
            return f"error: {e}"
        return "none"

    monkeypatch.setattr(dataset_loader.TrainStream, "epoch", epoch)
    monkeypatch.setattr(bench, "host_sync_check", check)
    argv = [*TINY, "--no_reference", "--memory_batch_sizes", "", "--profile"]
    row = bench.run(*bench.parse_args(argv), argv)["project"][0]
    assert row["host_sync"] == "error: called a synchronizing CUDA operation"
    assert "error" not in row["profile"] and row["profile"]["steps"] == 2 and _positive(row["profile"]["ms_per_step"])


def test_profile_on_cuda_counts_each_kernel_once_and_a_failure_keeps_the_timings(bench, monkeypatch):
    """On CUDA the operators' self device time is their own kernels'; the kernels' rows would count them twice."""
    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    event = lambda key, us, count, kind: type("Avg", (), {  # noqa: E731
        "key": key, "self_device_time_total": us, "self_cpu_time_total": 1, "count": count, "device_type": kind})
    events = [event("aten::mm", 300, 4, cpu), event("sm90_gemm_kernel", 300, 4, cuda),
              event("aten::add_", 100, 8, cpu), event("elementwise_kernel", 100, 8, cuda),
              event("aten::empty", 0, 9, cpu), event("aten::relu", 50, 2, cpu), event("relu_kernel", 50, 2, cuda)]

    class FakeProfile:
        def __init__(self, activities):
            assert torch.profiler.ProfilerActivity.CUDA in activities
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            return False
        def key_averages(self):
            return events

    monkeypatch.setattr(torch.profiler, "profile", FakeProfile)
    monkeypatch.setattr(bench, "sync", lambda device: None)
    monkeypatch.setattr(bench, "PROFILE_TOP", 1)
    steps = []
    prof = bench.profile_steps(lambda: steps.append(1), 2, torch.device("cuda", 0))
    assert len(steps) == 2 and prof["clock"] == "device (kernels)" and prof["ms_per_step"] == 0.225
    assert prof["ops"] == [
        {"op": "aten::mm", "ms_per_step": 0.15, "share": 300 / 450, "calls_per_step": 2.0},
        {"op": "other (2 operators)", "ms_per_step": 0.075, "share": 150 / 450, "calls_per_step": 5.0}]
    assert prof["outside_operators_ms_per_step"] == 0
    assert prof["kernels_ms_per_step"] == 0.225 and prof["kernels"] == [  # each kernel by name, by its own time
        {"kernel": "sm90_gemm_kernel", "ms_per_step": 0.15, "share": 300 / 450, "calls_per_step": 2.0},
        {"kernel": "other (2 kernels)", "ms_per_step": 0.075, "share": 150 / 450, "calls_per_step": 5.0}]
    # Kernels that no operator launched (a CUDA graph's replay) are reported apart, not in the shares; the kernels'
    # table has them by name.
    events.append(event("triton_poi_fused_relu_0", 200, 6, cuda))
    monkeypatch.setattr(bench, "PROFILE_TOP", 2)
    # A device-side user annotation (Inductor's range around a compiled graph's call) spans kernels counted already.
    annotation = event("## Call CompiledFxGraph fx0 ##", 200, 2, cuda)
    annotation.is_user_annotation = True
    events.append(annotation)
    prof = bench.profile_steps(lambda: None, 2, torch.device("cuda", 0))
    assert prof["ms_per_step"] == 0.225 and prof["outside_operators_ms_per_step"] == 0.1
    assert prof["kernels_ms_per_step"] == 0.325 and [k["kernel"] for k in prof["kernels"]] == \
        ["sm90_gemm_kernel", "triton_poi_fused_relu_0", "other (2 kernels)"]
    assert prof["kernels"][1] == {"kernel": "triton_poi_fused_relu_0", "ms_per_step": 0.1, "share": 200 / 650,
                                  "calls_per_step": 3.0}
    report = cuda_report(bench, [{"label": "graphs", "amp": True, "channels_last": True, "compile": True,
                                    "compile_mode": "reduce-overhead", "samples_per_s": 1.0, "step_ms": 1.0,
                                    "ratio_to_reference": None, "first_step_s": 1.0, "compile_s": 1.0,
                                    "profile": prof}])
    assert "plus 0.10 ms/step of kernels that no operator launched (CUDA graph replays)" in report
    report = cuda_report(bench, [{"label": "graphs", "amp": True, "channels_last": True, "compile": True,
                                    "compile_mode": "reduce-overhead", "samples_per_s": 1.0, "step_ms": 1.0,
                                    "ratio_to_reference": None, "first_step_s": 1.0, "compile_s": 1.0,
                                    "cudagraph_skips": 0, "profile": {**prof, "outside_operators_ms_per_step": 0.0}}])
    assert "graphs Inductor did not record as CUDA graphs (torch._dynamo's counters['inductor']" \
           "['cudagraph_skips'], a forward and its backward counted once; on the CPU every one): graphs: 0" in report
    assert "no operator launched" not in report and "the kernel table below, on CUDA, is the breakdown" in report
    assert "the same steps by kernel (device time, CUDA graphs' kernels included, 0.3 ms/step in all)" in report
    assert "| triton_poi_fused_relu_0 | 0.10 | 30.8 % | 3 |" in report
    events[:] = [event("aten::empty", 0, 9, cpu), event("triton_poi_fused_relu_0", 200, 6, cuda)]
    prof = bench.profile_steps(lambda: None, 2, torch.device("cuda", 0))  # all in graphs: no operator time
    assert prof["ops"] == [] and prof["outside_operators_ms_per_step"] == 0.1
    # Without CUPTI the profiler only warns and every kernel time reads 0: an error, not an empty table.
    events[:] = [event("aten::mm", 0, 4, cpu), event("aten::add_", 0, 8, cpu)]
    with pytest.raises(RuntimeError, match="recorded no kernel time"):
        bench.profile_steps(lambda: None, 2, torch.device("cuda", 0))

    def broken(*args):
        raise RuntimeError("CUPTI_ERROR_NOT_INITIALIZED\nmore")
    monkeypatch.setattr(bench, "profile_steps", broken)
    argv = [*TINY, "--no_reference", "--memory_batch_sizes", "", "--profile"]
    result = bench.run(*bench.parse_args(argv), argv)
    row = result["project"][0]
    assert _positive(row["samples_per_s"]) and row["profile"] == {"error": "RuntimeError: CUPTI_ERROR_NOT_INITIALIZED more"}
    assert "profile of project: as configured: failed: RuntimeError: CUPTI_ERROR_NOT_INITIALIZED more" in \
        bench.format_report(result)


def test_json_is_saved_after_each_row_and_a_failed_reference_keeps_the_rest(bench, tmp_path, monkeypatch, capsys):
    """A benchmark cut off by a time limit leaves what it measured; a reference that fails (say, its workers
    killed for lack of shared memory) is a row with the error, the JSON is still written, and the exit is 1."""
    out = tmp_path / "bench.json"
    seen = []
    real_write = bench.util.write_json

    def write_json(obj, path):
        seen.append(json.loads(json.dumps(obj)))  # a copy of what was on disk at this point
        real_write(obj, path)

    def time_reference(*args):
        assert json.loads(out.read_text())["project"][0]["samples_per_s"] > 0  # saved before the reference ran
        raise RuntimeError("DataLoader worker (pid 123) is killed by signal: Bus error.\nIt is possible that ...")

    monkeypatch.setattr(bench.util, "write_json", write_json)
    monkeypatch.setattr(bench, "time_reference", time_reference)
    assert bench.main_cli([*TINY, "--workers", "1", "--memory_batch_sizes", "", "--json", str(out)]) == 1
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines()[-1] == ("error: the reference pipeline failed: RuntimeError: DataLoader worker (pid 123) "
                                    "is killed by signal: Bus error. It is possible that ...")
    assert "| reference: PIL + DataLoader (1 workers per loader) | | | | failed: RuntimeError: DataLoader" in captured.out
    assert [(len(r["project"]), r["complete"]) for r in seen] == [(0, False), (1, False), (1, False), (1, True)]
    result = json.loads(out.read_text())
    assert result == seen[-1] and result["ratio"] is None and result["project"][0]["ratio_to_reference"] is None
    assert result["reference"]["error"].startswith("RuntimeError: DataLoader worker (pid 123) is killed")


def fake_reference_record(samples_per_s: float) -> dict:
    return {"workers": 0, "pin_memory": False, "amp": False, "channels_last": False, "compile": False, "steps": 2,
            "seconds": 1.0, "samples_per_s": samples_per_s, "step_ms": 1.0, "first_step_s": 1.0, "warmup_s": 1.0,
            "final_loss": 1.0}


def test_repeats_alternate_the_first_row_with_the_reference(bench, monkeypatch, tmp_path, capsys):
    """--repeats 3: the first project row (its step continuing the same run, the trainer built once) and the
    reference three times each, in turn; every pair's ratio and their median; "ratio" stays the first pair's."""
    calls, trainers = [], []
    real_time_steps, real_trainer = bench.time_steps, bench.main.Trainer

    def time_steps(step, warmup_steps, steps, device):  # the project's timings: 2 steps of batch 4 in 1 s, 8/s
        calls.append("project")
        timing, result = real_time_steps(step, warmup_steps, steps, device)
        return bench.Timing(timing.first_step_s, timing.warmup_s, 1.0, steps), result

    rates = iter([4.0, 2.0, 16.0])

    def time_reference(*args):
        calls.append("reference")
        return fake_reference_record(next(rates))

    def trainer(*args, **kwargs):
        trainers.append(real_trainer(*args, **kwargs))
        return trainers[-1]

    monkeypatch.setattr(bench, "time_steps", time_steps)
    monkeypatch.setattr(bench, "time_reference", time_reference)
    monkeypatch.setattr(bench.main, "Trainer", trainer)
    out = tmp_path / "bench.json"
    argv = [*TINY, "--batch_size", "4", "--memory_batch_sizes", "", "--repeats", "3", "--json", str(out)]
    assert bench.main_cli(argv) == 0
    assert calls == ["project", "reference"] * 3 and len(trainers) == 1
    result = json.loads(out.read_text())
    assert [(p["project_samples_per_s"], p["reference_samples_per_s"], p["ratio"]) for p in result["repeats"]] == \
        [(8.0, 4.0, 2.0), (8.0, 2.0, 4.0), (8.0, 16.0, 0.5)]
    assert result["ratio"] == 2.0 and result["ratio_median"] == 2.0 and result["settings"]["repeats"] == 3
    assert ("x reference over 3 alternating timings of the first project row and the reference: 2.00, 4.00, 0.50; "
            "median 2.00") in capsys.readouterr().out


@pytest.mark.parametrize("compare", [True, False])
def test_the_ratio_at_the_references_numerics_is_that_of_the_first_row_without_bf16_layout_or_compile(
        bench, monkeypatch, tmp_path, capsys, compare):
    """--compare_options: the row with amp, channels_last and compile off gives ratio_equal_numerics (not the
    first row, the device default); a single row at other numerics gives none, and the report says nothing."""
    def time_project(cfg, *args):  # each row's rate from its settings: 8 for amp + channels_last, 3 for neither
        amp = bool(cfg.amp) if cfg.amp is not None else True
        channels_last = cfg.channels_last is not False
        rate = 1.0 + 4 * amp + 2 * channels_last + 10 * cfg.compile
        row = {"amp": amp, "channels_last": channels_last, "compile": cfg.compile, "compile_mode": None,
               "samples_per_s": rate, "step_ms": 1.0, "first_step_s": 1.0, "compile_s": None}
        return row, None

    monkeypatch.setattr(bench, "time_project", time_project)
    monkeypatch.setattr(bench, "time_reference", lambda *args: fake_reference_record(2.0))
    out = tmp_path / "bench.json"
    argv = [*TINY, "--memory_batch_sizes", "", "--json", str(out), *(["--compare_options"] if compare else [])]
    assert bench.main_cli(argv) == 0
    result, report = json.loads(out.read_text()), capsys.readouterr().out
    if compare:
        assert result["ratio"] == result["project"][0]["samples_per_s"] / 2.0 != 0.5
        assert result["ratio_equal_numerics"] == 0.5  # the amp off, channels_last off row: 1 sample/s against 2
        assert ("x reference at the reference's numerics (float32, contiguous layout, eager: the first row with amp, "
                "channels_last and compile off): 0.50") in report
    else:
        assert result["ratio"] == 3.5 and result["ratio_equal_numerics"] is None  # bf16 + channels_last by default
        assert "reference's numerics" not in report


def test_a_reference_failing_in_a_repeat_ends_the_repeats_and_exits_1(bench, monkeypatch, tmp_path, capsys):
    outcomes = iter([fake_reference_record(4.0), RuntimeError("DataLoader worker (pid 7) is killed by signal")])

    def time_reference(*args):
        outcome = next(outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    monkeypatch.setattr(bench, "time_reference", time_reference)
    out = tmp_path / "bench.json"
    argv = [*TINY, "--batch_size", "4", "--memory_batch_sizes", "", "--repeats", "5", "--json", str(out)]
    assert bench.main_cli(argv) == 1
    result = json.loads(out.read_text())
    assert result["complete"] and [pair["ratio"] is None for pair in result["repeats"]] == [False, True]
    assert result["repeats"][1]["error"] == "reference: RuntimeError: DataLoader worker (pid 7) is killed by signal"
    assert result["ratio_median"] == result["ratio"]  # of the pairs that have one
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines()[-1] == \
        "error: a repeat failed: reference: RuntimeError: DataLoader worker (pid 7) is killed by signal"
    assert "; median " in captured.out and "failed: reference: RuntimeError: DataLoader worker" in captured.out


def test_a_project_step_failing_in_a_repeat_keeps_the_rest(bench, monkeypatch, tmp_path, capsys):
    """The project's step failing in a repeat (say, out of memory) is recorded as the reference's would be; the JSON
    is complete and the profile still runs."""
    calls = itertools.count()
    real_time_steps = bench.time_steps

    def time_steps(step, warmup_steps, steps, device, **settle):
        if next(calls) == 2:  # project, reference, then the first repeat's project
            raise RuntimeError("CUDA out of memory (test)")
        return real_time_steps(step, warmup_steps, steps, device, **settle)

    monkeypatch.setattr(bench, "time_steps", time_steps)
    out = tmp_path / "bench.json"
    argv = [*TINY, "--batch_size", "4", "--workers", "0", "--memory_batch_sizes", "", "--repeats", "3", "--profile",
            "--json", str(out)]
    assert bench.main_cli(argv) == 1
    result = json.loads(out.read_text())
    assert result["complete"] and result["repeats"][1] == {
        "project_samples_per_s": None, "reference_samples_per_s": None, "ratio": None,
        "error": "project: RuntimeError: CUDA out of memory (test)"}
    assert len(result["repeats"]) == 2 and "ops" in result["project"][0]["profile"]
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "error: a repeat failed: project: RuntimeError: CUDA out of memory (test)"


def test_compare_options_covers_amp_channels_last_and_compile(bench):
    cfg, _ = bench.parse_args(["--compare_options"])
    configs = bench.option_configs(cfg, torch.device("cpu"), compare=True)
    settings = [(c.amp, c.channels_last, c.compile) for _, c in configs]
    # The device default comes first; every amp x channels_last pair once; compile on its own.
    fast = main.fast_default(torch.device("cpu"))
    assert settings[0] == (fast, True, False) and "device default" in configs[0][0]
    assert sorted(settings[:4]) == sorted((a, c, False) for a in (True, False) for c in (True, False))
    assert settings[4] == (None, None, True)
    assert len({label for label, _ in configs}) == 5
    assert bench.option_configs(cfg, torch.device("cpu"), compare=False) == [("as configured", cfg)]
    assert {c.compile_mode for _, c in configs} == {"default"}
    # On CUDA also compile's reduce-overhead mode (CUDA graphs), after the default one.
    cuda = bench.option_configs(cfg, torch.device("cuda"), compare=True)
    assert [(c.amp, c.channels_last, c.compile, c.compile_mode) for _, c in cuda[4:]] == \
        [(None, None, True, "default"), (None, None, True, "reduce-overhead")]
    assert (cuda[0][1].amp, cuda[0][1].channels_last) == (True, True)  # bf16 + channels_last: CUDA's default
    assert sorted((c.amp, c.channels_last) for _, c in cuda[:4]) == sorted(itertools.product((True, False), repeat=2))
    assert len({label for label, _ in cuda}) == 6
    # Every explicit setting of the four is refused, an "off" one too (it would be silently overridden).
    for argv in (["--compile", "--compile_mode", "reduce-overhead"], ["--compile_mode", "max-autotune"],
                 ["--no-amp"], ["--no-channels_last"], ["--channels_last"], ["--compile"]):
        with pytest.raises(bench.UserError, match="--compare_options sets .* and --compile_mode itself"):
            bench.parse_args(["--compare_options", *argv])


def test_time_project_records_the_compile_mode(bench, monkeypatch):
    """A compiled row records its torch.compile mode (torch.compile is replaced: compiling on 2 CPU cores takes
    minutes)."""
    modes = []

    from torch._dynamo.utils import counters

    def fake_compile(model, mode):
        modes.append(mode)
        counters["inductor"]["cudagraph_skips"] += 2  # as Inductor counts the graphs it does not record
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    counters["inductor"]["cudagraph_skips"] = 5  # an earlier compilation's: cleared before this row's
    cfg, opts = bench.parse_args([*TINY, "--compile", "--compile_mode", "reduce-overhead"])
    train, _ = make_synthetic(num_classes=10, n_train_per_class=8, n_test_per_class=1)
    record, _ = bench.time_project(cfg, train, 10, torch.device("cpu"), opts)
    assert modes == ["reduce-overhead"] and (record["compile"], record["compile_mode"]) == (True, "reduce-overhead")
    assert record["cudagraph_skips"] == 2  # a CUDA-graph mode's row says how many graphs went without them
    cfg, opts = bench.parse_args([*TINY, "--compile"])
    assert "cudagraph_skips" not in bench.time_project(cfg, train, 10, torch.device("cpu"), opts)[0]


def test_time_steps_runs_warmup_then_timed_steps(bench):
    calls = []
    timing, last = bench.time_steps(lambda: calls.append(None) or len(calls), 3, 4, torch.device("cpu"))
    assert len(calls) == 7 and last == 7 and timing.steps == 4
    assert 0 <= timing.first_step_s <= timing.warmup_s and timing.seconds >= 0


def test_time_steps_settles_after_the_warmup_and_before_the_clock(bench, monkeypatch):
    """settle runs once, after the warm-up steps and before the timed interval's first clock read."""
    events = []
    real_clock = bench.time.perf_counter
    monkeypatch.setattr(bench.time, "perf_counter", lambda: events.append("clock") or real_clock())
    timing, _ = bench.time_steps(lambda: events.append("step"), 2, 3, torch.device("cpu"),
                                 settle=lambda: events.append("settle"))
    assert events == ["clock", "step", "clock", "step", "settle", "clock", "step", "step", "step", "clock"]
    assert timing.steps == 3


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")  # (on a 2-core machine)
@pytest.mark.parametrize("loss", ["sc", "ce"])
def test_the_reference_starts_its_timed_steps_with_nothing_queued(bench, monkeypatch, loss):
    """What the reference's workers prepared ahead during the warm-up (prefetch_factor batches per worker) is taken
    from each loader before the clock starts: the timed steps get no data made in advance."""
    drawn, timed = [], []
    real_endless, real_time_steps = bench.endless, bench.time_steps

    def counting_endless(make_iterator):
        count = len(drawn)
        drawn.append(0)
        for batch in real_endless(make_iterator):
            drawn[count] += 1
            yield batch

    def time_steps(step, warmup_steps, steps, device, settle=None):
        def settle_and_count():
            settle()
            timed.append(list(drawn))  # what each loader gave before the timed steps
        return real_time_steps(step, warmup_steps, steps, device, settle=settle_and_count)

    monkeypatch.setattr(bench, "endless", counting_endless)
    monkeypatch.setattr(bench, "time_steps", time_steps)
    cfg, opts = bench.parse_args([*TINY, "--loss", loss, "--batch_size", "4", "--warmup_steps", "2", "--steps", "3",
                                  "--workers", "3"])
    train, _ = make_synthetic(num_classes=10, n_train_per_class=8, n_test_per_class=1)
    record = bench.time_reference(cfg, train, 10, torch.device("cpu"), opts)
    queued = 3 * 2  # three workers, prefetch_factor 2 (not 2 and 2, which num_workers ** 2 would give too)
    loaders = 1 if loss == "ce" else 2
    assert record["drained_batches"] == record["settle_steps"] == queued
    assert timed == [[2 + 2 * queued] * loaders] and drawn == [2 + 2 * queued + 3] * loaders
    assert bench.prefetched_batches(torch.utils.data.DataLoader(list(range(4)))) == 0  # no workers: no queue


def test_host_sync_check_arms_cuda_debug_mode_around_its_steps(bench, monkeypatch):
    modes, syncs, steps = [], [], []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    monkeypatch.setattr(bench, "sync", syncs.append)
    cuda = torch.device("cuda", 0)  # nothing touches a GPU: both CUDA calls are replaced

    def step_in_debug_mode():
        assert modes[-1] == "error"
        steps.append(None)
    assert bench.host_sync_check(step_in_debug_mode, cuda) == "none"
    assert modes == ["error", "default"] and syncs == [cuda, cuda] and len(steps) == 1
    assert bench.host_sync_check(step_in_debug_mode, cuda, 25) == "none"  # time_project checks an epoch and a step
    assert modes[-2:] == ["error", "default"] and len(steps) == 26

    def syncing_step():
        raise RuntimeError("called a synchronizing CUDA operation\n(Triggered internally)")
    assert bench.host_sync_check(syncing_step, cuda) == \
        "error: called a synchronizing CUDA operation (Triggered internally)"
    assert modes[-1] == "default"  # restored after the error too
    assert bench.host_sync_check(step_in_debug_mode, torch.device("cpu")) is None
    report = cuda_report(bench, [{"label": "as configured", "amp": True, "channels_last": True, "compile": False,
                                    "samples_per_s": 1.0, "step_ms": 1.0, "ratio_to_reference": None,
                                    "first_step_s": 1.0, "compile_s": None, "host_sync": "none"}])
    assert "host syncs inside a project step (torch.cuda.set_sync_debug_mode('error')): as configured: none" in report


def test_report_names_the_compile_mode(bench):
    """The compile column reads off, the torch.compile mode, or on for a row of an older JSON without a mode."""
    row = {"amp": True, "channels_last": True, "samples_per_s": 1.0, "step_ms": 1.0, "ratio_to_reference": None,
           "first_step_s": 1.0, "compile_s": None}
    project = [{**row, "label": "eager", "compile": False, "compile_mode": None},
               {**row, "label": "graphs", "compile": True, "compile_mode": "reduce-overhead"},
               {**row, "label": "old", "compile": True}]
    report = cuda_report(bench, project)
    assert "| project: eager | on | on | off |" in report
    assert "| project: graphs | on | on | reduce-overhead |" in report
    assert "| project: old | on | on | on |" in report


def test_add_growth(bench):
    rows = [{"loss": "sc", "batch_size": 512, "peak_bytes": 100}, {"loss": "sc", "batch_size": 1024, "peak_bytes": 400},
            {"loss": "psc", "batch_size": 512, "peak_bytes": 10}, {"loss": "psc", "batch_size": 2048, "peak_bytes": 40},
            {"loss": "psc", "batch_size": 4096, "peak_bytes": None}]
    grown = bench.add_growth(rows)
    assert [r["ratio_to_previous"] for r in grown] == [None, 4.0, None, 4.0, None]
    assert [r["growth_exponent"] for r in grown] == [None, pytest.approx(2.0), None, pytest.approx(1.0), None]
    assert "growth_exponent" not in rows[0]  # pure: the input rows are left as they were


def test_the_largest_workers_count_and_memory_batch_are_taken(bench):
    _, opts = bench.parse_args(["--workers", str(bench.MAX_WORKERS), "--memory_batch_sizes",
                                f"512,{bench.MAX_MEMORY_BATCH_SIZE}"])
    assert opts.workers == 128 and opts.memory_batch_sizes == (512, 2**18)


def test_memory_batch_sizes_parse(bench):
    assert bench.parse_memory_batch_sizes("512, 1024,") == (512, 1024)
    assert bench.parse_memory_batch_sizes("") == ()


BAD_FLAGS = [
    ["--steps", "0"],
    ["--warmup_steps", "0"],
    ["--workers", "-1"],
    ["--workers", "129"],  # each a process: a mistyped number started them until a time limit (128 is taken:
    # test_the_largest_workers_count_is_taken)
    ["--memory_batch_sizes", "512,abc"],
    ["--memory_batch_sizes", "1024,512"],
    ["--memory_batch_sizes", "1"],
    ["--memory_batch_sizes", "512,1000000000000000000000"],  # exited 0, every row failed (a seed past int64)
    ["--resume"],
    ["--output_dir", "runs/x"],
    ["--ncm_every", "1"],
    ["--compare_options", "--amp"],
    ["--batch_size", "1"],
    ["--_memory_probe", "ce", "64"],
    ["--_memory_probe", "sc", "many"],
    ["--repeats", "0"],
    ["--repeats", "2", "--no_reference"],
    ["--json", ""],  # wrote nothing and said nothing
    ["--json", "j" * 300],
    ["--learning_rate", "1e300"],  # past float32: a traceback at the first step, after --json was rewritten
    ["--download"],  # no --data_root to fetch into: the images are synthetic
]


@pytest.mark.parametrize("argv", BAD_FLAGS, ids=lambda a: " ".join(a)[:60])
def test_bad_flags_give_one_line_and_exit_2(bench, argv, capsys):
    assert bench.main_cli(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_options_of_a_run_not_of_its_step_are_neither_offered_nor_taken(bench, capsys):
    """--help lists no option the benchmark refuses; --deterministic, which changes the step's kernels, is taken."""
    with pytest.raises(SystemExit):
        bench.get_args_parser().parse_args(["--help"])
    offered = capsys.readouterr().out
    assert "--deterministic" in offered
    listed = {line.split()[0].rstrip(",") for line in offered.splitlines() if line.strip().startswith("--")}
    assert "--steps" in listed and not listed & {f"--{name}" for name in bench.RUN_ONLY_OPTIONS}
    cfg, _ = bench.parse_args(["--deterministic"])
    assert cfg.deterministic


def test_a_failed_option_row_fails_the_benchmark(bench, monkeypatch, capsys):
    """--compare_options keeps the rows that ran beside one that failed (say, compile without a compiler), and
    exits 1 naming it, so that a script running it (gpu_checks.sh) does not report it as measured."""
    real_configs, real_time, calls, labels = bench.option_configs, bench.time_project, [], []

    def two_rows(*args):
        rows = real_configs(*args)[:2]
        labels.extend(label for label, _ in rows)
        return rows

    def second_fails(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("no compiler here")
        return real_time(*args)

    monkeypatch.setattr(bench, "option_configs", two_rows)
    monkeypatch.setattr(bench, "time_project", second_fails)
    code = bench.main_cli([*TINY, "--compare_options", "--no_reference", "--memory_batch_sizes", ""])
    captured = capsys.readouterr()
    assert code == 1
    assert captured.err.strip().splitlines()[-1] == (f"error: 1 of 2 project rows failed, the first ({labels[1]}): "
                                                     f"RuntimeError: no compiler here")
    assert f"| project: {labels[0]} |" in captured.out and f"| project: {labels[1]} |" in captured.out


@pytest.mark.parametrize("verbose", ["", "1"])
def test_compile_failure_is_one_line_as_in_main(bench, monkeypatch, capsys, verbose):
    """--compile with no working compiler: main.py's one line and exit 2 (TORCHDYNAMO_VERBOSE=1: PyTorch's own
    exception, as that line suggests), not a trace of some 90 lines."""
    failed = torch._dynamo.exc.BackendCompilerFailed
    exc = failed.__new__(failed)  # its constructor's arguments differ between torch releases
    Exception.__init__(exc, "backend='inductor' raised:\nInvalidCxxCompiler: No working C++ compiler found")
    exc.inner_exception = RuntimeError("No working C++ compiler found")

    def no_compiler(*args):
        raise exc

    monkeypatch.setattr(bench, "time_project", no_compiler)
    monkeypatch.setenv("TORCHDYNAMO_VERBOSE", verbose)
    argv = [*TINY, "--compile", "--no_reference", "--memory_batch_sizes", ""]
    if verbose:
        with pytest.raises(failed):
            bench.main_cli(argv)
        return
    assert bench.main_cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("error: --compile could not compile the training step (RuntimeError: No working C++ compiler "
                       "found); run without --compile, or with TORCHDYNAMO_VERBOSE=1 for PyTorch's trace")


def test_a_failed_memory_row_fails_the_benchmark(bench, monkeypatch, tmp_path, capsys):
    """A memory row that could not be measured (the probe killed for lack of memory, the device out of memory)
    keeps the others and the JSON, and the exit is 1, as for a failed project row or reference."""
    def row(loss, batch_size):
        return {"peak_bytes": None, "error": "probe exited with -9: killed, likely out of memory"} \
            if batch_size == 1024 else {"peak_bytes": batch_size * 1000}

    monkeypatch.setattr(bench, "cpu_memory_row", row)
    out = tmp_path / "bench.json"
    argv = [*TINY, "--no_reference", "--memory_batch_sizes", "512,1024", "--json", str(out)]
    assert bench.main_cli(argv) == 1
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines()[-1] == ("error: 2 of 4 memory rows failed, the first (sc at batch "
                                                     "1024): probe exited with -9: killed, likely out of memory")
    result = json.loads(out.read_text())
    assert result["complete"] and [r["peak_bytes"] for r in result["memory"]["rows"]] == [512000, None, 512000, None]


def test_a_failed_allocation_on_cuda_is_a_memory_row(bench, monkeypatch):
    """On CUDA the inputs are made on the host first: a host allocation that fails is a RuntimeError, not the
    device's OutOfMemoryError, and was a traceback."""
    def no_memory(*args):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    for name in ("synchronize", "empty_cache"):
        monkeypatch.setattr(bench.torch.cuda, name, lambda *args: None)
    monkeypatch.setattr(bench, "memory_inputs", no_memory)
    row = bench.cuda_memory_row("sc", 512, torch.device("cuda"))
    assert row == {"peak_bytes": None, "error": "RuntimeError: [enforce fail at alloc_cpu.cpp:117] "
                                                "DefaultCPUAllocator: can't allocate memory"}


@pytest.mark.parametrize("name", ["results.json", "last.pt", "config.json", "events.out.tfevents.1.host.1"])
def test_json_may_not_replace_a_file_of_a_run(bench, tmp_path, capsys, name):
    """--json naming a file of a main.py run folder (its results or checkpoint) is refused before anything is
    timed; the same name in any other folder is a file like any other."""
    run = tmp_path / "run"
    run.mkdir()
    for file in ("config.json", "last.pt", "results.json"):
        (run / file).write_text(file)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert bench.main_cli([*TINY, "--no_reference", "--memory_batch_sizes", "", "--json", str(run / name)]) == 2
    assert capsys.readouterr().err == f"error: --json {run / name} would replace a file of the run in {run}; " \
                                      "give another file\n"
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    bench.parse_args([*TINY, "--json", str(tmp_path / name)])  # not a run folder: taken
    # The name is what the write replaces: a link elsewhere to a run's file is replaced itself (taken); a run's file
    # that is a link to another folder is the run's (refused).
    (tmp_path / "link.json").symlink_to(run / "results.json")
    bench.parse_args([*TINY, "--json", str(tmp_path / "link.json")])
    (tmp_path / "elsewhere.json").write_text("{}")
    (run / "results.json").unlink()
    (run / "results.json").symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(bench.UserError, match="would replace a file of the run in"):
        bench.parse_args([*TINY, "--json", str(run / "results.json")])


def test_memory_rows_are_saved_as_they_come(bench, monkeypatch):
    """A run cut off inside the memory table keeps the rows measured before (--json is rewritten after each)."""
    saved = []
    monkeypatch.setattr(bench, "cpu_memory_row", lambda loss, batch_size: {"peak_bytes": batch_size * 1000})
    table = bench.memory_table((512, 1024), torch.device("cpu"), lambda t: saved.append(len(t["rows"])))
    assert saved == [1, 2, 3, 4] and len(table["rows"]) == 4


def test_missing_data_root_is_one_line(bench, tmp_path, capsys):
    argv = [*TINY, "--data_root", str(tmp_path / "nothing"), "--no_reference", "--memory_batch_sizes", ""]
    assert bench.main_cli(argv) == 2
    err = capsys.readouterr().err
    assert "no cifar10 data" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("compare", [[], ["--compare_options"]])
def test_batch_larger_than_the_data_is_one_line(bench, compare, capsys):
    """Before any row is timed: under --compare_options each row failed alone, then the reference divided by 0."""
    argv = [*TINY, "--batch_size", "20000", "--workers", "0", "--memory_batch_sizes", "", *compare]
    assert bench.main_cli(argv) == 2
    err = capsys.readouterr().err
    assert err == "error: --batch_size 20000 is larger than the training set (12406 images)\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error for a machine without CUDA")
def test_cuda_without_cuda_is_one_line(bench, capsys):
    assert bench.main_cli(["--device", "cuda", "--no_reference", "--memory_batch_sizes", ""]) == 2
    assert capsys.readouterr().err.startswith("error: --device cuda")


@pytest.mark.parametrize("argv", [["--steps", "x"], ["--loss", "nope"]])
def test_usage_errors_are_one_line(bench, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main_cli(argv)
    assert exit_info.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_the_cpu_memory_probe_keeps_the_least_of_its_passes_each_on_new_inputs(bench, monkeypatch):
    """Which buffers are alive at the loss's peak varies between passes (PSC's growth exponent once read 1.6 at
    batches 1024 -> 2048): the probe keeps the least of three passes, each on inputs without a gradient yet (a
    gradient already there would be accumulated into, not allocated, and the peak would read low)."""
    if not bench._reset_peak_rss():
        pytest.skip("needs a resettable RSS high-water mark (Linux's /proc/self/clear_refs, writable)")
    mib = 2 ** 20
    sizes = iter([3 * mib, 24 * mib, 8 * mib, 16 * mib])  # the warm-up pass, then the three measured ones
    fresh = []

    def allocate(loss, features, labels, prototypes):
        fresh.append(features.grad is None)
        np.ones(next(sizes), dtype=np.uint8)  # touched, so resident; above the mmap threshold, so returned on free
        features.grad = torch.zeros_like(features)

    monkeypatch.setattr(bench, "feature_loss_backward", allocate)
    row = bench.memory_probe("psc", 16)
    assert fresh == [True] * 4
    assert len(row["peak_bytes_runs"]) == bench.PROBE_REPEATS == 3 and row["peak_reset"]
    assert row["peak_bytes"] == min(row["peak_bytes_runs"]) == row["peak_bytes_runs"][1]
    assert {"baseline_rss_bytes", "seconds"} <= row.keys() and row["heap_trimmed"] == bench._release_free_heap()
    for measured, allocated in zip(row["peak_bytes_runs"], (24, 8, 16)):
        assert (allocated - 2) * mib < measured < (allocated + 2) * mib
