"""What a training step (the stream's next batch plus Trainer.step) dispatches, checked on the CPU for CUDA.

No host sync. On a GPU a read of a device value (``.item()``, ``if tensor:``, boolean-mask indexing,
``nonzero``, ``.cpu()``, ``.tolist()``) stalls the host until the device has caught up, so the host can no longer
queue the next step's kernels while the device runs this one; so does a tensor made from Python data
(``torch.tensor([...], device="cuda")`` copies from the host and waits). CI has no GPU, and ``torch.cuda.set_sync_debug_mode``
works only there (the benchmark uses it on CUDA), so these tests record every ATen operator a step dispatches on
the CPU and reject the ones that synchronise on CUDA. Reads that never reach the dispatcher on the CPU
(``.tolist()``, ``.numpy()``, ``.cpu()``, ``.to('cpu')``) are made to raise. The same operators run on both
devices (a few CPU kernels read values for checks that CUDA does with device-side asserts; F.one_hot was one of
them, and the code avoids it). The negative controls show that the detector fires.

Deterministic kernels. ``--deterministic`` makes PyTorch raise on any CUDA operator that has no deterministic
implementation; the step must dispatch none of those.
"""
from __future__ import annotations

import contextlib
import copy
import os
import shutil

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import main
import util
from helpers import tiny_trainer

# Operators that wait for the device on CUDA: a scalar read, or an output whose size depends on the data.
SYNCING_OPS = {
    "aten._local_scalar_dense",  # .item(), bool(t), int(t), float(t), `if t:`
    "aten.is_nonzero", "aten.equal", "aten.allclose",
    "aten.nonzero", "aten.argwhere", "aten.masked_select",
    "aten._unique", "aten._unique2", "aten.unique_dim", "aten.unique_consecutive",
    "aten.lift_fresh",  # torch.tensor(python data): on CUDA a synchronous copy from the host
}


class OpTrace(TorchDispatchMode):
    """Records the operators dispatched inside the block (ops), and each of them that would sync on CUDA (syncs)."""

    def __init__(self):
        super().__init__()
        self.ops: set[str] = set()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket._qualified_op_name.replace("::", ".")
        self.ops.add(name)
        if name in SYNCING_OPS:
            self.syncs.append(name)
        elif name == "aten.repeat_interleave" and kwargs.get("output_size") is None and len(args) == 1:
            self.syncs.append("aten.repeat_interleave without output_size")
        elif name in ("aten.index", "aten.index_put", "aten.index_put_"):
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(t is not None and t.dtype in (torch.bool, torch.uint8) for t in indices):
                self.syncs.append(f"{name} with a boolean mask")
        return func(*args, **kwargs)


@contextlib.contextmanager
def python_reads_refused():
    """Host reads that never reach the dispatcher on the CPU (the data is already there) raise in this block."""
    def refuse(name):
        def read(self, *args, **kwargs):
            raise AssertionError(f"Tensor.{name}() in the training step")
        return read
    to = torch.Tensor.to

    def to_device(self, *args, **kwargs):
        targets = [*args, kwargs.get("device")]
        if any(isinstance(t, (str, torch.device)) and torch.device(t).type == "cpu" for t in targets):
            raise AssertionError("Tensor.to('cpu') in the training step")
        return to(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        for name in ("tolist", "numpy", "__array__", "cpu"):
            patch.setattr(torch.Tensor, name, refuse(name))
        patch.setattr(torch.Tensor, "to", to_device)
        yield


@contextlib.contextmanager
def no_host_reads():
    with python_reads_refused(), OpTrace() as reads:
        yield reads


@pytest.mark.parametrize("loss", ["sc", "psc", "ce"])
@pytest.mark.parametrize("amp", [True, False])
@pytest.mark.parametrize("bn_stats", ["joint", "per_branch"])
def test_training_step_has_no_host_sync(train_split, loss, amp, bn_stats):
    trainer = tiny_trainer(train_split, "--loss", loss, "--amp" if amp else "--no-amp", "--bn_stats", bn_stats)
    batches = trainer.stream.epoch(0)
    with no_host_reads() as reads:
        for _ in range(2):
            trainer.step(next(batches), alpha=0.5, lr=0.1)
    assert {"aten.convolution", "aten.convolution_backward", "aten.randint"} <= reads.ops  # it did record a step
    assert reads.syncs == []


@pytest.mark.parametrize("loss", ["sc", "psc"])
def test_supcon_augmentation_has_no_host_sync_and_deterministic_kernels(train_split, loss):
    """--sc_aug supcon (resized crops, colour jitter in a per-image order) draws and augments on the device too."""
    trainer = tiny_trainer(train_split, "--loss", loss, "--sc_aug", "supcon")
    assert trainer.stream.sc_aug == "supcon"
    with no_host_reads() as reads:
        batches = trainer.stream.epoch(0)
        for _ in range(2):
            trainer.step(next(batches), alpha=0.5, lr=0.1)
    assert {"aten.sort", "aten.lerp_", "aten.remainder"} <= reads.ops  # the SupContrast augmentation did run
    assert reads.syncs == []
    assert reads.ops & NONDETERMINISTIC_ON_CUDA == set()


@pytest.mark.parametrize("sampler", ["instance", "class", "sqrt", "reversed"])
def test_every_sampler_draws_without_host_sync(train_split, sampler):
    trainer = tiny_trainer(train_split, "--sc_sampler", sampler, "--ce_sampler", sampler)
    with no_host_reads() as reads:
        batches = trainer.stream.epoch(1)  # the epoch's permutations are drawn here
        for _ in range(2):
            next(batches)
    assert reads.syncs == []


@pytest.mark.parametrize("read, caught", [
    (lambda t: t.sum().item(), "aten._local_scalar_dense"),
    (lambda t: bool(t.max() > 0), "aten._local_scalar_dense"),
    (lambda t: t[t > 0], "aten.index with a boolean mask"),
    (lambda t: torch.nonzero(t), "aten.nonzero"),
    (lambda t: t.repeat_interleave(torch.tensor([1, 2, 1])), "aten.repeat_interleave without output_size"),
    (lambda t: t * torch.tensor([1.0, 2.0, 3.0], device=t.device), "aten.lift_fresh"),
])
def test_detector_catches_host_reads(read, caught):
    with OpTrace() as reads:
        read(torch.tensor([1.0, -2.0, 3.0]))
    assert caught in reads.syncs


@pytest.mark.parametrize("read", [lambda t: t.tolist(), lambda t: t.numpy(), lambda t: t.cpu(),
                                  lambda t: t.to("cpu"), lambda t: t.to(device=torch.device("cpu"))])
def test_detector_catches_python_reads(read):
    t = torch.ones(2)
    with python_reads_refused():
        with pytest.raises(AssertionError, match="in the training step"):
            read(t)
        t.to(torch.float64)  # a dtype conversion stays on the device: allowed
    assert t.tolist() == [1.0, 1.0]  # and everything is restored afterwards


def test_confusion_matrix_counts_without_host_sync():
    preds, targets = torch.tensor([0, 2, 2, 1, 0]), torch.tensor([0, 2, 1, 1, 2])
    with no_host_reads() as reads:
        counts = util.confusion_matrix(preds, targets, 3)
    assert reads.syncs == [] and "aten.bincount" not in reads.ops  # CUDA's bincount reads min and max back
    assert counts.tolist() == [[1, 0, 0], [0, 1, 1], [1, 0, 1]]


# Operators whose CUDA kernels have no deterministic version: torch.use_deterministic_algorithms(True) raises on
# them (PyTorch's documentation of that function; bincount only with weights, but it is refused outright here).
NONDETERMINISTIC_ON_CUDA = {
    "aten._adaptive_avg_pool2d_backward", "aten._adaptive_avg_pool3d_backward", "aten.adaptive_max_pool2d_backward",
    "aten.adaptive_max_pool3d_backward", "aten.avg_pool3d_backward", "aten.max_pool3d_with_indices_backward",
    "aten.fractional_max_pool2d_backward", "aten.fractional_max_pool3d_backward", "aten.max_unpool1d",
    "aten.max_unpool2d", "aten.max_unpool3d", "aten.upsample_linear1d_backward", "aten.upsample_bilinear2d_backward",
    "aten.upsample_bicubic2d_backward", "aten.upsample_trilinear3d_backward", "aten.reflection_pad3d_backward",
    "aten.replication_pad3d_backward", "aten.nll_loss2d_forward", "aten._ctc_loss_backward",
    "aten._embedding_bag_dense_backward", "aten.histc", "aten.bincount", "aten.kthvalue", "aten.median",
    "aten.grid_sampler_2d_backward", "aten.grid_sampler_3d_backward", "aten.put_",
}


@pytest.mark.parametrize("loss", ["sc", "psc", "ce"])
def test_training_step_has_deterministic_cuda_kernels(train_split, loss):
    trainer = tiny_trainer(train_split, "--loss", loss)
    batches = trainer.stream.epoch(0)
    with OpTrace() as reads:
        trainer.step(next(batches), alpha=0.5, lr=0.1)
        trainer.confusion(trainer.stream.images[:8], trainer.stream.labels[:8])
    assert "aten.convolution_backward" in reads.ops
    assert reads.ops & NONDETERMINISTIC_ON_CUDA == set()


def test_deterministic_flag_configures_cublas_and_cudnn(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)  # restored afterwards
    try:
        main.configure_backends(main.parse_config(["--deterministic"]))
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.benchmark is False
        # cuBLAS raises under deterministic algorithms unless its workspace is fixed before its first use.
        assert main.os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(False)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    main.configure_backends(main.parse_config([]))
    assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark is True
    assert "CUBLAS_WORKSPACE_CONFIG" not in main.os.environ


def test_nondeterministic_list_names_dispatched_operators():
    x = torch.randn(1, 2, 6, 6, requires_grad=True)
    with OpTrace() as reads:
        torch.nn.functional.adaptive_avg_pool2d(x, 2).sum().backward()
        torch.bincount(torch.tensor([0, 1, 1]))
    assert {"aten._adaptive_avg_pool2d_backward", "aten.bincount"} <= reads.ops & NONDETERMINISTIC_ON_CUDA


def test_base_temp_flag_reaches_the_training_step(train_split):
    """--base_temp 0.07 scales the step's SC term by 0.1 / 0.07 and leaves the classifier branch alone."""
    terms = {}
    for argv in ((), ("--base_temp", "0.07")):
        trainer = tiny_trainer(train_split, "--no-amp", *argv)  # same seed: same initial weights and first batch
        terms[argv] = trainer.step(next(trainer.stream.epoch(0)), alpha=0.5, lr=0.1)
    plain, scaled = terms[()], terms[("--base_temp", "0.07")]
    assert scaled.feature.item() == pytest.approx(plain.feature.item() * 0.1 / 0.07, rel=1e-5)
    assert scaled.ce.item() == pytest.approx(plain.ce.item(), rel=1e-6)


@pytest.mark.parametrize("loss", ["sc", "psc"])
def test_per_branch_bn_stats_normalise_each_branch_alone(train_split, loss):
    """--bn_stats per_branch: the step's loss is that of the feature-branch views and the classifier-branch images
    each passed through the network alone; the one joint pass gives another loss (so the check can fail)."""
    terms, expected = {}, {}
    for mode in ("joint", "per_branch"):
        trainer = tiny_trainer(train_split, "--no-amp", "--loss", loss, "--bn_stats", mode)
        batch = next(trainer.stream.epoch(0))
        before = copy.deepcopy(trainer.net)  # the weights and BN state the step starts from, in training mode
        with torch.no_grad():
            projections, logits = before(batch.sc_views).projections, before(batch.ce_images).logits
            expected[mode] = trainer.criterion(projections, batch.sc_labels, logits, batch.ce_labels, 0.5,
                                               prototypes=before.prototypes)
        terms[mode] = trainer.step(batch, alpha=0.5, lr=0.1)
    for name in ("feature", "ce"):
        assert getattr(terms["per_branch"], name).item() == pytest.approx(getattr(expected["per_branch"], name).item(),
                                                                          rel=1e-5)
        assert getattr(terms["joint"], name).item() != pytest.approx(getattr(expected["joint"], name).item(), rel=1e-3)


@pytest.mark.parametrize("argv, mode", [((), None), (("--compile",), "default"),
                                        (("--compile", "--compile_mode", "reduce-overhead"), "reduce-overhead")])
def test_compile_mode_reaches_torch_compile(train_split, monkeypatch, argv, mode):
    """--compile on one process compiles the step's forward, the model and the hybrid loss together (not the bare
    network that evaluation uses), in --compile_mode, and the step runs through the compiled function."""
    calls, runs = [], []

    def fake_compile(fn, **kwargs):
        calls.append((fn, kwargs))

        def compiled(*args):
            runs.append(len(args))
            return fn(*args)
        return compiled

    monkeypatch.setattr(torch, "compile", fake_compile)
    trainer = tiny_trainer(train_split, *argv)
    assert [kwargs for _, kwargs in calls] == ([] if mode is None else [{"mode": mode}])
    if mode is not None:
        assert calls[0][0] == trainer._forward_loss and trainer.model is trainer.net
    trainer.step(next(trainer.stream.epoch(0)), alpha=0.5, lr=0.1)
    assert runs == ([] if mode is None else [5])


def test_compile_under_ddp_compiles_the_model_alone(train_split, monkeypatch):
    """Under torchrun the DDP-wrapped model is what --compile compiles (DDP's all-reduce hooks and SC's all-gather
    stay outside the graph); the loss runs eagerly. DDP itself is replaced: it needs a process group."""
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: compiled.append(fn) or fn)
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", lambda net, **kwargs: ("ddp", net))
    cfg = main.parse_config(["--device", "cpu", "--model", "resnet8", "--batch_size", "8", "--compile"])
    trainer = main.Trainer(cfg, train_split, 4, torch.device("cpu"), main.Dist(rank=0, world_size=2))
    assert compiled == [("ddp", trainer.net)] and trainer.forward_loss == trainer._forward_loss


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                    reason="Inductor compiles C++ on the CPU and finds no compiler ($CXX or g++)")
def test_compiled_step_equals_the_eager_step(train_split):
    """The real torch.compile (Inductor, on the CPU here; about 20 s cold): three steps with alpha changing between
    them, as it does between epochs, give the eager steps' loss terms and weights, from one graph (no graph break)
    compiled once (a recompilation for a new alpha would raise)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    results = {}
    torch._dynamo.reset()
    counters.clear()
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            for argv in ((), ("--compile",)):
                trainer = tiny_trainer(train_split, "--no-amp", "--loss", "sc", *argv)  # float32: a close comparison
                terms = [trainer.step(batch, alpha=1.0 - 0.25 * i, lr=0.1)
                         for i, batch in zip(range(3), trainer.stream.epoch(0))]
                results[argv] = terms, [p.detach().clone() for p in trainer.net.parameters()]
        assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    finally:
        torch._dynamo.reset()
    (eager_terms, eager_params), (compiled_terms, compiled_params) = results.values()
    for i, (eager, compiled) in enumerate(zip(eager_terms, compiled_terms)):
        torch.testing.assert_close(torch.stack(list(compiled)), torch.stack(list(eager)), rtol=1e-5, atol=1e-6)
        alpha = 1.0 - 0.25 * i  # this step's, not the first step's: the compiled graph takes alpha as an input
        assert compiled.total.item() == pytest.approx(alpha * compiled.feature.item() + (1 - alpha) * compiled.ce.item(),
                                                      rel=1e-6)
    assert not torch.equal(eager_params[0], next(tiny_trainer(train_split).net.parameters()))  # the steps moved it
    for eager, compiled in zip(eager_params, compiled_params):
        torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-4)  # 3 steps of float32 drift


class MutationTrace(TorchDispatchMode):
    """The storages of the tensors that the operators dispatched inside the block write in place (their schema's
    `Tensor(a!)` arguments), and of those the block made (outputs that alias no argument): written minus made is
    what the block wrote of the tensors that existed before it."""

    def __init__(self):
        super().__init__()
        self.written: set[int] = set()
        self.made: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for i, arg in enumerate(func._schema.arguments):
            if arg.alias_info is not None and arg.alias_info.is_write:
                value = args[i] if i < len(args) else kwargs.get(arg.name)
                for t in value if isinstance(value, (list, tuple)) else (value,):
                    if isinstance(t, torch.Tensor):
                        self.written.add(t.untyped_storage().data_ptr())
        out = func(*args, **kwargs)
        outs = out if isinstance(out, (list, tuple)) else (out,)
        for ret, value in zip(func._schema.returns, outs):
            if ret.alias_info is None:
                for t in value if isinstance(value, (list, tuple)) else (value,):
                    if isinstance(t, torch.Tensor):
                        self.made.add(t.untyped_storage().data_ptr())
        return out


@pytest.mark.parametrize("loss", ["sc", "psc", "ce"])
@pytest.mark.parametrize("bn_stats", ["joint", "per_branch"])
def test_the_compiled_forward_writes_no_input_but_the_models_buffers(train_split, loss, bn_stats):
    """What --compile_mode reduce-overhead needs on a GPU: Inductor's CUDA graphs (cudagraph trees) are recorded only
    where the graph writes no input but static ones (parameters and buffers: batch norm's running statistics). A
    batch tensor or alpha written in place inside Trainer._forward_loss (the function --compile compiles) would make
    it skip them ("skipping cudagraphs due to mutated inputs"), and the step fall back to kernels launched one by
    one: 21 to 28 ms per step on an H200 instead of 14.6. Checked in eager mode, on what the function dispatches."""
    trainer = tiny_trainer(train_split, "--loss", loss, "--bn_stats", bn_stats)
    batch = next(trainer.stream.epoch(0))
    trainer.alpha.fill_(0.5)
    inputs = (batch.sc_views, batch.sc_labels, batch.ce_images, batch.ce_labels, trainer.alpha)
    storage = lambda t: t.untyped_storage().data_ptr()  # noqa: E731
    buffers = {storage(b) for b in trainer.net.buffers()}
    others = {storage(t): name for name, t in zip(("sc_views", "sc_labels", "ce_images", "ce_labels", "alpha"), inputs)
              if t is not None}
    others.update({storage(p): name for name, p in trainer.net.named_parameters()})
    with MutationTrace() as trace, main.bf16_autocast(trainer.device, trainer.amp):
        trainer._forward_loss(*inputs)
    assert trace.written & buffers  # the running statistics: the detector sees in-place writes
    assert sorted(others[s] for s in trace.written if s in others) == []
    assert trace.written - trace.made <= buffers  # nor any other tensor that existed before the call
    with MutationTrace() as trace:  # the negative control: an input written in place is caught
        trainer.alpha.mul_(1.0)
    assert storage(trainer.alpha) in trace.written


class DefaultDeviceTrace(TorchDispatchMode):
    """The operators dispatched inside the block that made a tensor on the "meta" device, which the test makes the
    default: a tensor made without a device= (on a GPU run: on the CPU)."""

    def __init__(self):
        super().__init__()
        self.on_default: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(isinstance(t, torch.Tensor) and t.device.type == "meta" for t in torch.utils._pytree.tree_leaves(out)):
            self.on_default.append(str(func))
        return out


@contextlib.contextmanager
def default_device_trace():
    with DefaultDeviceTrace() as trace:
        torch.set_default_device("meta")
        try:
            yield trace
        finally:
            torch.set_default_device(None)  # no override, as before (an explicit "cpu" would slow every later call)


@pytest.mark.parametrize("loss", ["sc", "psc", "ce"])
@pytest.mark.parametrize("argv", [(), ("--sc_aug", "supcon"), ("--ce_sampler", "sqrt", "--sc_sampler", "class"),
                                  ("--bn_stats", "joint")])
def test_a_step_makes_every_tensor_on_the_training_device(train_split, loss, argv):
    """The stream's next batch and Trainer.step make each tensor on the training device, never on the default one:
    on a GPU such a tensor would sit on the CPU (a copy the device waits for, and in a compiled step a CPU node that
    makes Inductor skip its CUDA graphs, "skipping cudagraphs due to cpu device"). Without a GPU the default device
    is made "meta" for the step, where a factory call without device= lands."""
    trainer = tiny_trainer(train_split, "--loss", loss, *argv)
    batches = trainer.stream.epoch(0)
    with default_device_trace() as trace:
        for _ in range(2):
            trainer.step(next(batches), alpha=0.5, lr=0.1)
    assert trace.on_default == []
    with default_device_trace() as trace:  # the negative control
        torch.zeros(3)
    assert trace.on_default == ["aten.zeros.default"]
