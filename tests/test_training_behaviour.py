"""What the training and evaluation code does with its settings, checked in-process on tiny synthetic data: the
optimiser's momentum and weight decay, the samplers and the long-tailed split a run is built with, the best-epoch
bookkeeping, and evaluation over several batches (and processes)."""
from __future__ import annotations

import itertools
import json
import time

import numpy as np
import pytest
import torch

import dataset_loader as data
import main
import networks
from helpers import make_synthetic, tiny_trainer, write_pickled_cifar10

NUM_CLASSES = 10
N_TRAIN, N_TEST = 12, 2  # per class
IMB_FACTOR = 0.5


@pytest.fixture(scope="module")
def cifar10_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar10")
    write_pickled_cifar10(root, *make_synthetic(NUM_CLASSES, N_TRAIN, N_TEST, seed=0))
    return root


def _run(cifar10_root, out, *argv: str) -> main.Run:
    """main.Run as main() builds it for a fresh run (data read and split, trainer built); nothing trained."""
    cfg = main.parse_config(["--data_root", str(cifar10_root), "--output_dir", str(out), "--device", "cpu",
                             "--model", "resnet8", "--batch_size", "16", "--imb_factor", str(IMB_FACTOR),
                             "--lr_decay_epochs", "", "--no-amp", *argv])
    return main.Run(cfg, main.Dist(), torch.device("cpu"), out, None)


# ----------------------------------------------------------------------------------------------- the optimiser


@pytest.mark.parametrize("loss", ["sc", "psc", "ce"])
def test_sgd_steps_use_the_configured_momentum_and_weight_decay(train_split, loss):
    """Two Trainer steps move the weights as torch.optim.SGD with --momentum and --weight_decay (non-default values
    here) moves a copy given the same gradients at the same lr: the second step carries the first one's momentum.
    The CE baseline's frozen projection head is not among the optimiser's parameters; every trainable one is."""
    momentum, weight_decay, lr = 0.8, 0.05, 0.1
    trainer = tiny_trainer(train_split, "--no-amp", "--loss", loss, "--momentum", str(momentum),
                       "--weight_decay", str(weight_decay))  # float32: a tight comparison
    trainable = [p for p in trainer.net.parameters() if p.requires_grad]
    optimised = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in optimised} == {id(p) for p in trainable}
    head = {id(p) for p in trainer.net.head.parameters()}
    assert (head & {id(p) for p in optimised} == set()) == (loss == "ce")
    reference = [p.detach().clone() for p in trainable]
    sgd = torch.optim.SGD(reference, lr=lr, momentum=momentum, weight_decay=weight_decay)
    batches = trainer.stream.epoch(0)
    for _ in range(2):
        before = [p.detach().clone() for p in trainable]
        trainer.step(next(batches), alpha=0.5, lr=lr)
        for ref, p in zip(reference, trainable):
            ref.grad = p.grad.detach().clone()  # the step leaves its gradients in .grad
        sgd.step()
        for ref, p in zip(reference, trainable):
            torch.testing.assert_close(p.detach(), ref, rtol=1e-6, atol=1e-8)
    if loss == "psc":  # the prototypes learn from the loss, not only shrink by the decay
        assert trainer.net.prototypes.grad is not None and trainer.net.prototypes.grad.abs().sum() > 0
    # The check can fail: plain SGD (no momentum, no decay) from the same weights lands elsewhere.
    plain = [b - lr * p.grad for b, p in zip(before, trainable)]
    assert not all(torch.allclose(a, p.detach(), rtol=1e-4, atol=1e-6) for a, p in zip(plain, trainable))


# ----------------------------------------------------------------------------------------------- what a run is built on


def test_sampler_flags_reach_the_trainers_stream(train_split):
    """--sc_sampler / --ce_sampler are the samplers the training stream draws with: the Trainer's batches are
    those of a TrainStream built with them directly, and not those of the defaults."""
    trainer = tiny_trainer(train_split, "--sc_sampler", "sqrt", "--ce_sampler", "reversed")
    assert (trainer.stream.sc_sampler, trainer.stream.ce_sampler) == ("sqrt", "reversed")
    mean, std = data.dataset_stats("cifar10")

    def labels(sc_sampler, ce_sampler):
        stream = data.TrainStream(train_split, 4, 8, mean=mean, std=std, sc_sampler=sc_sampler,
                                  ce_sampler=ce_sampler, seed=trainer.cfg.seed)
        return [(b.sc_labels.tolist(), b.ce_labels.tolist()) for b in itertools.islice(stream.epoch(0), 2)]

    drawn = [(b.sc_labels.tolist(), b.ce_labels.tolist()) for b in itertools.islice(trainer.stream.epoch(0), 2)]
    assert drawn == labels("sqrt", "reversed") != labels("instance", "class")


def test_imb_type_and_data_seed_reach_the_training_split(cifar10_root, tmp_path):
    """--imb_type step --data_seed 3: the run trains on long_tailed_subset(train, ..., "step", 3) (its class sizes
    and its images' digest, as checkpoints record it), not on the default exp split of seed 0."""
    run = _run(cifar10_root, tmp_path / "run", "--imb_type", "step", "--data_seed", "3")
    train, _ = data.load_cifar("cifar10", cifar10_root)
    expected, counts = data.long_tailed_subset(train, NUM_CLASSES, IMB_FACTOR, "step", 3)
    assert counts == data.long_tailed_counts(N_TRAIN, NUM_CLASSES, IMB_FACTOR, "step") == [12] * 5 + [6] * 5
    assert run.trainer.class_counts == counts
    assert run.train_digest == expected.digest()
    assert np.array_equal(run.trainer.stream.labels.numpy(), expected.labels)
    # Each setting alone changes the split, so neither can be dropped unnoticed.
    assert run.train_digest != data.long_tailed_subset(train, NUM_CLASSES, IMB_FACTOR, "step", 0)[0].digest()
    assert counts != data.long_tailed_subset(train, NUM_CLASSES, IMB_FACTOR, "exp", 3)[1]
    assert not (tmp_path / "run").exists()  # building the run writes nothing


# ----------------------------------------------------------------------------------------------- the best epoch


def _confusion_with_top1(correct_classes: int) -> np.ndarray:
    """[C, C] of N_TEST images per class: the first `correct_classes` classes all right, the others all taken for
    the next class, so top-1 is 100 * correct_classes / C."""
    confusion = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    for c in range(NUM_CLASSES):
        confusion[c, c if c < correct_classes else (c + 1) % NUM_CLASSES] = N_TEST
    return confusion


def test_best_epoch_is_the_first_with_the_highest_top1(cifar10_root, tmp_path, monkeypatch, capsys):
    """Test top-1 50, 70, 60, 70 after epochs 1..4 (the evaluation replaced, the training skipped): best_top1 70 at
    epoch 2, best.pt written after epochs 1 and 2 only (a worse epoch, or a later tie, leaves it alone), last.pt
    after every epoch, before best.pt (Run.best_note)."""
    out = tmp_path / "run"
    run = _run(cifar10_root, out, "--epochs", "4")
    out.mkdir()
    run.wall_mark = time.perf_counter()  # as run() sets it before the first epoch
    top1s = iter([5, 7, 6, 7])  # correct classes of 10
    monkeypatch.setattr(run.trainer, "confusion", lambda images, labels: _confusion_with_top1(next(top1s)))
    saves = []
    save = run.save
    monkeypatch.setattr(run, "save", lambda name, **kw: (saves.append((name, run.state.epoch)), save(name, **kw)))
    for _ in range(4):  # what train_epoch leaves for end_epoch, without the training
        run.state.epoch_sums = torch.tensor([2.0, 1.0, 1.0, 1.0])
        run.epoch_alpha, run.epoch_lr, run.epoch_rate = 0.5, 0.1, 1.0
        run.end_epoch()
    state = run.state
    assert [h["top1"] for h in state.history] == pytest.approx([50, 70, 60, 70])
    assert (state.best_top1, state.best_epoch) == (pytest.approx(70), 2)
    assert state.best_metrics["epoch"] == 2 and state.best_metrics["top1"] == pytest.approx(70)
    assert saves == [("last.pt", 1), ("best.pt", 1), ("last.pt", 2), ("best.pt", 2), ("last.pt", 3), ("last.pt", 4)]
    best = torch.load(out / "best.pt", weights_only=False)["run"]
    assert (best["epoch"], best["best_epoch"]) == (2, 2) and best["best_top1"] == pytest.approx(70)
    assert capsys.readouterr().out.splitlines()[-1].endswith("| best 70.00 @ 2")


# ----------------------------------------------------------------------------------------------- evaluation


@pytest.fixture(scope="module")
def eval_setup():
    """An untrained resnet8 in eval mode (seeded), 30 test images of 4 classes, and the CIFAR-10 statistics. The
    classifier's bias is centred on these images' mean feature: untrained, it would give every image one class."""
    _, test = make_synthetic(num_classes=4, n_train_per_class=1, n_test_per_class=8, seed=2)
    images, labels = data.to_device_images(test, "cpu")
    images, labels = images[:30], labels[:30]  # 30: batches of 7 leave a ragged last one
    torch.manual_seed(0)
    net = networks.build_model("resnet8", 4).eval()
    mean, std = (torch.tensor(v) for v in data.dataset_stats("cifar10"))
    with torch.no_grad():
        features = net(data.normalize(images, mean, std)).features
        net.classifier.bias.copy_(-net.classifier.weight @ features.mean(0))
    return net, images, labels, mean, std


def test_confusion_over_several_batches_and_processes_is_the_whole_sets(eval_setup, monkeypatch):
    """test_confusion in batches of 7 counts every image once, as one pass over all 30 does; the three processes of
    a torchrun job (each every third batch, summed by all_reduce_sum) together count the same."""
    net, images, labels, mean, std = eval_setup
    with torch.no_grad():
        preds = net.forward_logits(data.normalize(images, mean, std)).argmax(dim=1)
    assert len(set(preds.tolist())) > 1  # predictions differ between images, so a wrong batch would show
    expected = main.util.confusion_matrix(preds, labels, 4).numpy()
    common = dict(mean=mean, std=std, num_classes=4, amp=False)
    assert np.array_equal(main.test_confusion(net, images, labels, **common), expected)
    assert np.array_equal(main.test_confusion(net, images, labels, **common, batch_size=7), expected)
    monkeypatch.setattr(main, "all_reduce_sum", lambda tensor, dist: tensor)  # each rank's own counts
    parts = [main.test_confusion(net, images, labels, **common, batch_size=7, dist=main.Dist(rank=r, world_size=3))
             for r in range(3)]
    assert all(part.sum() > 0 for part in parts)  # each process had batches of its own
    assert np.array_equal(sum(parts), expected)


def test_embed_over_several_batches_is_the_whole_sets(eval_setup):
    """embed in batches of 7 gives every image's own features and projections, in order."""
    net, images, _, mean, std = eval_setup
    with torch.no_grad():
        out = net(data.normalize(images, mean, std))
    features, projections = main.embed(net, images, mean=mean, std=std, amp=False, batch_size=7)
    assert features.shape == (30, out.features.shape[1]) and projections.shape == (30, out.projections.shape[1])
    torch.testing.assert_close(features, out.features, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(projections, out.projections, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(features[7:14], features[:7])  # images differ, so a re-read batch would show


def test_sync_bn_on_one_process_says_it_changes_nothing(cifar10_root, tmp_path):
    """--sync_bn is refused on the CPU; on one CUDA process it is accepted (a sweep passes one set of flags), and the
    run says before its first step that it is plain batch norm there; under torchrun, or without it, nothing."""
    note = "note: --sync_bn with one process is plain batch norm: it changes nothing in this run (it acts under torchrun)"
    assert note in _run(cifar10_root, tmp_path / "a", "--sync_bn").start_lines()  # on the CPU here: the lines alone
    assert not any(line.startswith("note: --sync_bn") for line in _run(cifar10_root, tmp_path / "b").start_lines())
    cfg = main.parse_config(["--sync_bn"])
    assert main.sync_bn_note(cfg, main.Dist()) == note and main.sync_bn_note(cfg, main.Dist(0, 2, 0)) is None


def test_a_resume_keeps_the_runs_precision_and_layout(cifar10_root, tmp_path):
    """Without --amp / --channels_last a resumed run keeps what its checkpoint says it trained in (its default may
    differ on this device: another CPU type, or a default changed since) and says so; a flag given wins. A resume
    on another device type than the batches were drawn on says that the draws change. A checkpoint whose entries
    are not booleans is refused in one line."""
    device_amp = main.fast_default(torch.device("cpu"))
    out = tmp_path / "run"
    argv = ["--data_root", str(cifar10_root), "--output_dir", str(out), "--device", "cpu", "--model", "resnet8",
            "--batch_size", "16", "--imb_factor", str(IMB_FACTOR), "--epochs", "2", "--lr_decay_epochs", "",
            "--print_freq", "100"]
    assert main.main([*argv, "--amp" if not device_amp else "--no-amp", "--no-channels_last"]) == 0
    saved = torch.load(out / "last.pt", weights_only=False)
    assert (saved["amp"], saved["channels_last"]) == (not device_amp, False)

    def resumed(*flags: str) -> main.Run:
        cfg = main.parse_config([*argv, "--resume", *flags])
        return main.Run(cfg, main.Dist(), torch.device("cpu"), out, saved)

    run = resumed()
    assert (run.trainer.amp, run.trainer.channels_last) == (not device_amp, False)
    note = (f"note: resuming with --{'no-' if device_amp else ''}amp --no-channels_last as the run trained (this "
            f"device's default differs); give the flags to change")
    assert note in run.start_lines()
    run = resumed("--channels_last")
    assert (run.trainer.amp, run.trainer.channels_last) == (not device_amp, True)
    assert f"note: resuming with --{'no-' if device_amp else ''}amp as the run trained (this device's default " \
           f"differs); give the flag to change" in run.start_lines()
    # the other layout from here on: the results come from both, and the run says so
    assert [line for line in run.start_lines() if line.startswith("note: this run trained with")] == [
        'note: this run trained with --no-channels_last so far and goes on with --channels_last: its results.json '
        'will say "channels_last": "mixed"']
    run = resumed("--no-channels_last", "--amp" if device_amp else "--no-amp")
    assert (run.trainer.amp, run.trainer.channels_last) == (device_amp, False)
    assert not any(line.startswith("note: resuming") for line in run.start_lines())
    # the other precision from here on: the results come from both, and the run says so
    assert [s["amp"] for s in run.state.sessions] == [not device_amp]
    assert (f"note: this run trained with --{'no-' if device_amp else ''}amp so far and goes on with "
            f"--{'' if device_amp else 'no-'}amp: its results.json will say \"amp\": \"mixed\"") in run.start_lines()
    # A checkpoint from before sessions were recorded: its precision and layout are the checkpoint's, its number of
    # processes that of the config.json beside it (unknown without one), its device unknown.
    del saved["run"]["sessions"]
    earlier = {"epoch": 0, "step": 0, "amp": not device_amp, "channels_last": False, "world_size": 1, "device": None,
               "git_commit": None, "torch_version": None}
    assert resumed().state.sessions == [earlier]
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "world_size": 2}))  # as a 2-process start wrote it
    run = resumed("--no-channels_last", "--amp" if device_amp else "--no-amp")
    assert run.state.sessions == [{**earlier, "world_size": 2}]
    amp_changed = (f"--{'no-' if device_amp else ''}amp so far and goes on with --{'' if device_amp else 'no-'}amp: "
                   f"its results.json will say \"amp\": \"mixed\"")
    # trained to the end: this session only evaluates, which the number of processes does not change
    assert f"note: this run trained with {amp_changed}" in run.start_lines()
    saved["run"]["epoch"] = 1  # as if stopped after epoch 1 of 2: this session trains on 1 process
    run = resumed("--no-channels_last", "--amp" if device_amp else "--no-amp")
    assert (f"note: this run trained with --{'no-' if device_amp else ''}amp, 2 processes so far and goes on with "
            f"--{'' if device_amp else 'no-'}amp, 1 process: its results.json will say \"amp\": \"mixed\" and "
            f"\"world_size\": \"mixed\"") in run.start_lines()
    saved["run"]["epoch"] = 2
    (out / "config.json").unlink()
    assert resumed().state.sessions == [{**earlier, "world_size": None}]
    assert main.run_numerics(main.parse_config([]), torch.device("cpu")) == (device_amp, True)  # a fresh run

    # The batches were drawn on the CPU; a resume on CUDA would draw others from the same seed and says so.
    assert saved["stream_device"] == "cpu" and main.stream_device_note(torch.device("cpu"), saved) is None
    assert not any("drew its batches" in line for line in run.start_lines())
    assert saved["run"]["step"] == 0  # saved at an epoch's end
    assert main.stream_device_note(torch.device("cuda"), saved) == (
        "note: this run drew its batches on cpu and now draws them on cuda, whose random generator gives other draws "
        "for the same seed: from here on its batches are not those the run would have drawn on cpu")
    saved["run"]["step"] = 3  # as if stopped in the middle of an epoch: that epoch's order changes too
    assert main.stream_device_note(torch.device("cuda"), saved).endswith(
        "drawn on cpu (and the rest of this epoch, resumed in its middle, follows another order, so that with "
        "instance sampling some of its images come twice and others not at all)")
    saved["run"]["step"] = 0
    saved["stream_device"] = "cuda"  # as a checkpoint of a GPU run read here
    assert main.stream_device_note(torch.device("cpu"), saved).startswith("note: this run drew its batches on cuda ")
    assert any(line.startswith("note: this run drew its batches on cuda ") for line in resumed().start_lines())
    del saved["stream_device"]  # a checkpoint from before the entry: nothing known, nothing said
    assert main.stream_device_note(torch.device("cuda"), saved) is None

    saved["amp"] = "yes"
    torch.save(saved, out / "last.pt")
    with pytest.raises(main.UserError, match="does not hold what this program's checkpoints hold .*'amp' entry is a str"):
        main.resume_point(main.parse_config([*argv, "--resume"]), main.Dist())


# ----------------------------------------------------------------------------------------------- the device default


def _cpuinfo(tmp_path, flags: str):
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: test\nflags\t\t: fpu sse2 avx2 {flags}\n\nprocessor\t: 1\n")
    return str(path)


@pytest.mark.parametrize("torch_helper", [True, False])  # torch.cpu._is_avx512_bf16_supported (newer torch) or not
def test_bf16_is_the_cpu_default_only_with_native_bf16(tmp_path, monkeypatch, torch_helper):
    """oneDNN says bf16 is supported on any AVX512 CPU, where it emulates it (a step ran at half the speed of
    float32): --amp's CPU default needs AVX512-BF16 or AMX-BF16 on x86; on an Arm CPU oneDNN's check decides."""
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    cases = {"avx512f avx512bw avx512vl avx512dq avx512_vnni": False, "avx512f avx512_bf16": True,
             "avx512f avx512_bf16 amx_tile amx_bf16": True, "": False}
    for flags, native in cases.items():
        if torch_helper:
            monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda f=flags: "avx512_bf16" in f,
                                raising=False)
        else:
            monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
        for machine in ("x86_64", "AMD64"):
            assert main.native_cpu_bf16(machine, _cpuinfo(tmp_path, flags)) is native, (flags, machine)
    if not torch_helper:  # and no /proc/cpuinfo to read (not Linux): no native bf16 assumed
        assert main.native_cpu_bf16("x86_64", str(tmp_path / "missing")) is False
    assert main.native_cpu_bf16("aarch64") is True  # oneDNN's check: native bf16 on Arm
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False, raising=False)
    assert main.native_cpu_bf16("aarch64") is False
    monkeypatch.setattr(main, "native_cpu_bf16", lambda: False)
    assert main.fast_default(torch.device("cuda")) is True and main.fast_default(torch.device("cpu")) is False
