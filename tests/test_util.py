"""util.py: metrics, the lr schedule, atomic files and the TensorBoard figures."""
from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
import torch

import util
from helpers import RunsCode


def test_confusion_matrix_matches_a_loop():
    rng = np.random.default_rng(0)
    preds, targets = rng.integers(0, 7, 500), rng.integers(0, 7, 500)
    expected = np.zeros((7, 7), dtype=np.int64)
    for p, t in zip(preds, targets):
        expected[t, p] += 1
    got = util.confusion_matrix(torch.from_numpy(preds), torch.from_numpy(targets), 7)
    assert np.array_equal(got.numpy(), expected)


def test_accuracy_report_by_hand():
    # class 0: 8/10 right, class 1: 5/10, class 2: 1/10
    confusion = np.array([[8, 2, 0], [5, 5, 0], [3, 6, 1]])
    report = util.accuracy_report(confusion, {"many": [0], "medium": [1, 2], "few": []})
    assert report["top1"] == pytest.approx(100 * 14 / 30)
    assert report["per_class"] == pytest.approx([80, 50, 10])
    assert report["many"] == pytest.approx(80) and report["medium"] == pytest.approx(30)
    assert report["few"] is None
    # Unequal class totals (a test set that is not balanced): a group pools its images, 5 of 12 right, rather than
    # averaging its classes' accuracies (50 and 0: 25).
    unequal = util.accuracy_report(np.array([[8, 2, 0], [5, 5, 0], [1, 1, 0]]), {"medium": [1, 2]})
    assert unequal["medium"] == pytest.approx(100 * 5 / 12) and unequal["per_class"][1:] == pytest.approx([50, 0])
    # The float nearest each exact percentage, as results.json shows it: 827 / 1000 * 100 is 82.69999999999999.
    tenths = util.accuracy_report(np.array([[827, 173], [297, 703]]), {"many": [0, 1]})
    assert tenths["per_class"] == [82.7, 70.3] and tenths["top1"] == 76.5 and tenths["many"] == 76.5
    assert repr(util.accuracy_report(np.array([[2996, 7004], [0, 0]]), {})["top1"]) == "29.96"
    # top-1 counts images: on a test set that is not balanced it is not the mean of the classes' accuracies
    pooled = util.accuracy_report(np.array([[90, 10], [5, 5]]), {"many": [0], "few": [1]})
    assert pooled["top1"] == pytest.approx(100 * 95 / 110)  # not (90 + 50) / 2


def _ncm_by_loop(train, labels, test, num_classes):
    """Nearest class mean in float64, one class and one test feature at a time."""
    means = {}
    for c in range(num_classes):
        rows = [train[i] / np.linalg.norm(train[i]) for i in range(len(labels)) if labels[i] == c]
        if rows:
            mean = np.sum(rows, axis=0)
            means[c] = mean / np.linalg.norm(mean)
    preds = []
    for x in test:
        x = x / np.linalg.norm(x)
        preds.append(max(means, key=lambda c: float(x @ means[c])))
    return preds


def test_nearest_class_mean_matches_a_loop():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(6, 16))
    labels = rng.integers(0, 5, 300)  # class 5 has no training feature: it is never predicted
    train = centres[labels] + 1.5 * rng.normal(size=(300, 16))
    test = centres[rng.integers(0, 6, 200)] * rng.uniform(0.1, 10, (200, 1)) + 1.5 * rng.normal(size=(200, 16))
    expected = _ncm_by_loop(train, labels, test, 6)
    got = util.nearest_class_mean(torch.tensor(train, dtype=torch.float32), torch.from_numpy(labels),
                                  torch.tensor(test, dtype=torch.float32), 6)
    assert got.dtype == torch.int64 and got.tolist() == expected
    assert 5 not in got.tolist() and len(set(expected)) == 5


def test_nearest_class_mean_weighs_classes_alike_whatever_their_size():
    # Class 0 has 1,000 training features, class 1 one: the class means, not the counts, decide.
    train = torch.cat([torch.tensor([[1.0, 0.0]]).repeat(1000, 1), torch.tensor([[0.0, 1.0]])])
    labels = torch.cat([torch.zeros(1000, dtype=torch.int64), torch.ones(1, dtype=torch.int64)])
    test = torch.tensor([[1.0, 0.9], [0.9, 1.0], [5.0, 0.1]])  # the norm of a feature does not matter either
    assert util.nearest_class_mean(train, labels, test, 2).tolist() == [0, 1, 0]
    # A third class without training features loses even to negative similarities.
    assert util.nearest_class_mean(train, labels, torch.tensor([[-1.0, -0.5]]), 3).tolist() == [1]


def test_learning_rate_warm_up_and_decay():
    kw = dict(base_lr=0.5, steps_per_epoch=10, warm_epochs=2, decay_epochs=[5, 8], decay_rate=0.1)
    lrs = [util.learning_rate(s, **kw) for s in range(100)]
    assert lrs[0] == pytest.approx(0.5 / 20) and lrs[19] == pytest.approx(0.5)
    assert np.all(np.diff(lrs[:20]) > 0)  # linear warm-up over the first 2 epochs (20 steps)
    assert lrs[49] == 0.5 and lrs[50] == pytest.approx(0.05) and lrs[79] == pytest.approx(0.05)
    assert lrs[80] == pytest.approx(0.005) and lrs[99] == pytest.approx(0.005)
    assert util.learning_rate(3, **{**kw, "warm_epochs": 0}) == 0.5
    # A warm-up too long for its step count to be a float (validate() admits any finite --warm_epochs) keeps the
    # learning rate at (nearly) zero instead of failing mid-run; a long but representable one is unchanged.
    assert util.learning_rate(3, **{**kw, "warm_epochs": 1e308}) == 0.0
    assert util.learning_rate(3, **{**kw, "warm_epochs": 1e6}) == pytest.approx(0.5 * 4 / 1e7)


def test_checkpoint_round_trip_and_foreign_files(tmp_path):
    util.save_checkpoint({"model": {"w": torch.arange(3.0)}, "config": {"model": "resnet32"}}, tmp_path / "c.pt")
    assert torch.equal(util.load_checkpoint(tmp_path / "c.pt")["model"]["w"], torch.arange(3.0))
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(util.UserError, match="not a checkpoint of this project"):
        util.load_checkpoint(tmp_path / "other.pt")


def test_colormap_ends_and_monotone_brightness():
    rgb = util.colormap(np.linspace(0, 1, 11))
    assert rgb.shape == (11, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[0]) == (68, 1, 84) and tuple(rgb[-1]) == (253, 231, 37)
    brightness = rgb.astype(float) @ [0.299, 0.587, 0.114]
    assert np.all(np.diff(brightness) > 0)


def test_confusion_image_cells():
    confusion = np.array([[10, 0], [5, 5]])
    img = util.confusion_image(confusion, size=20)
    assert img.shape == (20, 20, 3) and img.dtype == np.uint8
    assert tuple(img[0, 0]) == tuple(util.colormap(1.0))  # row 0 all on the diagonal
    assert tuple(img[0, 19]) == tuple(util.colormap(0.0))
    assert tuple(img[19, 0]) == tuple(img[19, 19]) == tuple(util.colormap(0.5))


def test_per_class_image_bars():
    img = util.per_class_image([100.0, 50.0, 0.0], [10, 1000, 100], bar_width=10, height=101)
    assert img.shape == (2 * 101 + 8, 30, 3)
    blue = np.all(img[:101] == (31, 119, 180), axis=2)
    grey = np.all(img[109:] == (127, 127, 127), axis=2)
    # classes are drawn largest first: 1000 images (50 %), 100 (0 %), 10 (100 %)
    assert blue[:, 0].sum() == 50 and blue[:, 10].sum() == 0 and blue[:, 20].sum() == 100
    assert grey[:, 0].sum() == 100 and grey[:, 10].sum() == round(100 * 2 / 3) and grey[:, 20].sum() == 33


def test_a_checkpoint_that_cannot_be_written_says_whether_an_earlier_one_is_kept(tmp_path, monkeypatch):
    """A full disk at the first checkpoint has no previous one to keep; at a later one the old file stays."""
    import errno

    path = tmp_path / "last.pt"

    def full_disk(target, write):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(util, "atomic_write", full_disk)
    with pytest.raises(util.UserError, match=r"could not write checkpoint .*last\.pt: No space left on device; "
                                              r"there was none before it$"):
        util.save_checkpoint({"w": torch.zeros(2)}, path)
    assert not path.exists()
    path.write_bytes(b"epoch 1")
    with pytest.raises(util.UserError, match=r"No space left on device; the previous one is kept$"):
        util.save_checkpoint({"w": torch.zeros(2)}, path)
    assert path.read_bytes() == b"epoch 1"


def test_lr_warm_up_ends_at_the_base_lr_and_never_passes_it():
    """The warm-up reaches the base lr at its last step; the steps after it stay there, never above it."""
    kw = dict(base_lr=0.5, steps_per_epoch=10, warm_epochs=2, decay_epochs=[5, 8], decay_rate=0.1)
    lrs = [util.learning_rate(s, **kw) for s in range(100)]
    assert lrs[20] == lrs[21] == 0.5 and max(lrs) == 0.5
    # A warm-up of 7.5 steps (--warm_epochs 0.75 at 10 steps an epoch) is rounded to 8, not cut to 7
    assert util.learning_rate(6, **{**kw, "warm_epochs": 0.75}) == pytest.approx(0.5 * 7 / 8)


def test_write_json_is_atomic_and_leaves_no_temporary_file(tmp_path):
    """A rename, not a rewrite in place: a reader that opened the old file reads it whole, the path then holds a
    new file (inode) with the new content, no temporary file is left, and the file is readable by others as a plain
    write's would be (mkstemp makes it private)."""
    path = tmp_path / "results.json"
    util.write_json({"old": "x" * 1000}, path)
    inode = path.stat().st_ino
    with open(path, "rb") as reader:
        util.write_json({"new": 1}, path)
        assert json.loads(reader.read()) == {"old": "x" * 1000}
    assert path.stat().st_ino != inode and json.loads(path.read_text()) == {"new": 1}
    util.save_checkpoint({"model": {}, "config": {}}, tmp_path / "c.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt", "results.json"]
    for name in ("c.pt", "results.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~util._umask()


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_writes_leave_the_mode_a_plain_write_would(tmp_path, umask):
    """mkstemp makes its file private: a new file gets what open() would give it under the umask (not 0o644 under
    umask 077, which keeps a user's runs to themselves), and a file written again keeps its own mode (a results.json
    or checkpoint made private with chmod 600 stays so)."""
    import os

    before = os.umask(umask)
    try:
        assert util._umask() == umask
        util.write_json({"a": 1}, tmp_path / "new.json")
        util.save_checkpoint({"model": {}, "config": {}}, tmp_path / "new.pt")
        (tmp_path / "kept.json").write_text("{}")
        os.chmod(tmp_path / "kept.json", 0o640)
        util.write_json({"a": 2}, tmp_path / "kept.json")
    finally:
        os.umask(before)
    for name in ("new.json", "new.pt"):
        assert (tmp_path / name).stat().st_mode & 0o7777 == 0o666 & ~umask, name
    assert (tmp_path / "kept.json").stat().st_mode & 0o7777 == 0o640
    assert json.loads((tmp_path / "kept.json").read_text()) == {"a": 2}


def test_set_rng_states_restores_python_numpy_and_torch():
    util.seed_everything(123)
    states = util.rng_states()
    expected = (random.random(), np.random.rand(), torch.rand(()).item())
    util.seed_everything(999)
    util.set_rng_states(states)
    assert (random.random(), np.random.rand(), torch.rand(()).item()) == expected


def test_a_checkpoints_rng_states_hold_no_numpy_object(tmp_path):
    """numpy 2 pickles an array as numpy._core's, which numpy before 1.26 (inside requirements.txt's range) cannot
    import: a checkpoint written on one machine could be neither resumed nor evaluated on another. The states hold
    plain Python values; those of checkpoints written before (an array) still load."""
    import pickletools
    import zipfile

    util.seed_everything(7)
    np.random.randn()  # a cached Gaussian in the state too
    util.save_checkpoint({"model": {}, "config": {}, "rng": util.rng_states()}, tmp_path / "c.pt")
    with zipfile.ZipFile(tmp_path / "c.pt") as archive:
        (pickled,) = [archive.read(n) for n in archive.namelist() if n.endswith("/data.pkl")]
    modules = {arg.split()[0] for op, arg, _ in pickletools.genops(pickled) if op.name == "GLOBAL"}
    assert modules and not any(m.split(".")[0] == "numpy" for m in modules), modules
    expected = np.random.rand(3)
    for states in (util.load_checkpoint(tmp_path / "c.pt")["rng"], {**util.rng_states(), "numpy": None}):
        if states["numpy"] is None:  # as written before: numpy's own state, with its array
            util.seed_everything(7)
            np.random.randn()
            states["numpy"] = np.random.get_state()
        np.random.seed(0)
        util.set_rng_states(states)
        assert (np.random.rand(3) == expected).all()


@pytest.mark.parametrize("keys", [[-1] + [0] * 623, [2**40] + [0] * 623, [0] * 623, [0.5] * 624])
def test_a_damaged_numpy_random_state_is_a_value_error(keys):
    """Kept as plain integers, numpy's state can be damaged into values its uint32 words cannot hold (an
    OverflowError) or a list of another length (an IndexError): a ValueError, which a resume reports as a damaged
    checkpoint in one line."""
    states = util.rng_states()
    with pytest.raises(ValueError, match="numpy's random state is not 624 32-bit words"):
        util.set_rng_states({**states, "numpy": (states["numpy"][0], keys, *states["numpy"][2:])})


@pytest.mark.parametrize("error, message", [
    (PermissionError(13, "Permission denied"), ": Permission denied"),
    (OSError(22, "Invalid argument"), "(damaged, or not a file torch.save wrote): "),  # torch's reader, a file cut off
    (ModuleNotFoundError("No module named 'mylib'", name="mylib"), "(damaged, or not a file torch.save wrote): "),
])
def test_a_checkpoint_that_cannot_be_read_says_why(tmp_path, monkeypatch, error, message):
    util.save_checkpoint({"model": {}, "config": {}}, tmp_path / "c.pt")

    def failing_load(*args, **kwargs):
        raise error

    monkeypatch.setattr(torch, "load", failing_load)
    with pytest.raises(util.UserError) as caught:
        util.load_checkpoint(tmp_path / "c.pt")
    assert str(caught.value).startswith(f"cannot read checkpoint {tmp_path / 'c.pt'}") and message in str(caught.value)


@pytest.mark.parametrize("numpy_name", ["this numpy's", "the other major version's"])
def test_checkpoints_written_before_a392b74_still_load(tmp_path, numpy_name):
    """Those hold numpy's random state as an array and the torch version as torch's own str type, which
    weights_only=True refuses by default: load_checkpoint allows those few types, under the module name numpy 1
    (numpy.core) or numpy 2 (numpy._core) pickled them with, and leaves torch's list of allowed globals as it was."""
    import re

    util.seed_everything(3)
    old = {"model": {"w": torch.arange(3.0)}, "config": {"loss": "sc"}, "torch_version": torch.__version__,
           "rng": {**util.rng_states(), "numpy": np.random.get_state()}}
    assert type(old["torch_version"]) is not str
    buffer = io.BytesIO()
    torch.save(old, buffer, _use_new_zipfile_serialization=False)  # one pickle stream: its names can be edited
    content = buffer.getvalue()
    (module,) = set(re.findall(rb"c(numpy\.(?:_core|core)\.multiarray)\n_reconstruct\n", content))  # (GLOBAL)
    if numpy_name != "this numpy's":
        other = b"numpy.core.multiarray" if module == b"numpy._core.multiarray" else b"numpy._core.multiarray"
        content = content.replace(b"c" + module + b"\n_reconstruct\n", b"c" + other + b"\n_reconstruct\n")
        assert set(re.findall(rb"c(numpy\.(?:_core|core)\.multiarray)\n_reconstruct\n", content)) == {other}
    (tmp_path / "old.pt").write_bytes(content)
    state = util.load_checkpoint(tmp_path / "old.pt")
    assert state["torch_version"] == torch.__version__ and torch.equal(state["model"]["w"], torch.arange(3.0))
    expected = np.random.rand(3)
    np.random.seed(0)
    util.set_rng_states(state["rng"])
    assert (np.random.rand(3) == expected).all()


def test_loading_leaves_the_allowlist_of_torch_as_it_was(tmp_path):
    """torch's list of globals weights_only allows is one for the process: what a user's code allowed before stays
    allowed (torch.serialization.safe_globals would drop those of its entries that were there), what load_checkpoint
    allows goes again, and loads in several threads at once do not take each other's entries away."""
    import threading

    util.seed_everything(5)
    old = {"model": {}, "config": {}, "torch_version": torch.__version__,
           "rng": {**util.rng_states(), "numpy": np.random.get_state()}}
    util.save_checkpoint(old, tmp_path / "old.pt")
    before = list(torch.serialization.get_safe_globals())
    try:
        torch.serialization.add_safe_globals([np.ndarray, np.dtype])  # a user's own, from before
        allowed = {repr(g) for g in torch.serialization.get_safe_globals()}
        failures = []

        def load() -> None:
            try:
                for _ in range(5):
                    util.load_checkpoint(tmp_path / "old.pt")
            except Exception as e:  # (collected: a thread's exception would not fail the test)
                failures.append(e)

        threads = [threading.Thread(target=load) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert failures == []
        assert {repr(g) for g in torch.serialization.get_safe_globals()} == allowed
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)


def test_refusals_are_one_plain_line(tmp_path):
    """A global's name is the file's to choose: one with a terminal's escape sequence shows it escaped, not in red
    on the next lines. A checkpoint saved again in pickle protocol 4 (torch.save(..., pickle_protocol=4)), which
    weights_only does not read, says so rather than "damaged"."""
    import pickle

    crafted = pickle.UnpicklingError("Weights only load failed. Unsupported global: GLOBAL \x1b[31mred.x was not an "
                                     "allowed global by default.\n\nCheck the documentation")
    assert str(util._refused(tmp_path / "c.pt", crafted)).startswith(
        f"cannot read checkpoint {tmp_path / 'c.pt'}: it holds \\x1b[31mred.x, which no checkpoint")
    assert util.one_line("a\x1b[31mb\n\tc \udcff é") == "a\\x1b[31mb c \\udcff é"
    assert util.printable("a\x1b[31mb\n\tc  \udcff é") == "a\\x1b[31mb\\n\\tc  \\udcff é"  # spaces kept
    torch.save({"model": {}, "config": {}}, tmp_path / "p4.pt", pickle_protocol=4)
    with pytest.raises(util.UserError, match=r": it was pickled in a protocol above 2, torch.save's, which "
                                             r"torch.load's weights_only=True does not read \(Unsupported operand"):
        util.load_checkpoint(tmp_path / "p4.pt")


def test_a_checkpoint_that_would_run_code_is_refused_unrun(tmp_path):
    import os

    util.save_checkpoint({"model": {}, "config": {}, "note": RunsCode(tmp_path / "ran")}, tmp_path / "c.pt")
    with pytest.raises(util.UserError) as caught:
        util.load_checkpoint(tmp_path / "c.pt")
    assert str(caught.value) == (
        f"cannot read checkpoint {tmp_path / 'c.pt'}: it holds {os.mkdir.__module__}.mkdir, which no checkpoint of "
        f"this project holds and which unpickling would call, so torch.load's weights_only=True refuses it; if you "
        f"trust the file, torch.load(..., weights_only=False) reads it")
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("kind", ["pipe", "device"])
def test_an_atomic_write_does_not_replace_a_device_or_a_pipe(tmp_path, kind):
    """The rename would put a file where /dev/null (say, as `--json /dev/null`) or a named pipe was: for root, the
    machine's /dev/null. Refused as an OSError, which write_json turns into one line; the path is left as it was."""
    import os
    import stat

    if kind == "pipe":
        path = tmp_path / "fifo"
        os.mkfifo(path)
    else:
        path = tmp_path / "null"
        os.symlink(os.devnull, path)  # a device, reached as the flag would name it
    with pytest.raises(util.UserError, match=rf"could not write {path}: not a regular file \(a device, a pipe or a "
                                             r"socket\), which this write would replace: give a file name"):
        util.write_json({"a": 1}, path)
    mode = os.stat(path).st_mode
    assert stat.S_ISFIFO(mode) if kind == "pipe" else stat.S_ISCHR(mode)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left either


class _FailingStream:
    """A text stream whose writes and flushes fail as a pipe whose reader left, or a full disk, does."""

    def __init__(self, error):
        self.error, self.calls = error, 0

    def write(self, text):
        self.calls += 1
        raise self.error

    def flush(self):
        raise self.error

    def fileno(self):
        import io
        raise io.UnsupportedOperation("fileno")

    def isatty(self):
        return True


@pytest.mark.parametrize("error, reason", [(BrokenPipeError(32, "Broken pipe"), "Broken pipe"),
                                           (OSError(28, "No space left on device"), "No space left on device"),
                                           (ValueError("I/O operation on closed file."), "I/O operation on closed file.")])
def test_guarded_output_says_once_that_it_failed_and_drops_the_rest(capsys, error, reason):
    stream = _FailingStream(error)
    out = util.GuardedOutput(stream, "the program goes on")
    assert out.isatty() and out.write("first line\n") == len("first line\n")
    assert out.failed and not out.isatty()
    print("more", file=out, flush=True)
    out.flush()
    assert stream.calls == 1  # nothing more reaches the failed stream
    assert capsys.readouterr().err == f"warning: standard output failed ({reason}); the program goes on\n"


def test_guarded_output_passes_on_what_else_a_text_stream_has():
    import io
    stream = io.TextIOWrapper(io.BytesIO(), encoding="latin-1", line_buffering=True)
    out = util.GuardedOutput(stream, "goes on")
    assert out.encoding == "latin-1" and out.line_buffering is True and out.buffer is stream.buffer
    out.write("é ✓\n")  # what latin-1 lacks prints as '?'
    out.flush()
    assert stream.buffer.getvalue() == "é ?\n".encode("latin-1")
