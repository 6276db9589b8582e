"""Never lose a run (issue 14): the training command killed at every change it makes to the disk and at random
moments, a full disk, two runs in one folder, and every bad input of the issue as one table.

The property each test checks is the user's: whatever happens, the folder holds a checkpoint that loads and
resumes to exactly the weights of an uninterrupted run (or, before the first checkpoint, nothing that stops a new
run), metrics.jsonl describes that one run, and a refused command changes nothing on disk.
"""

import contextlib
import errno
import hashlib
import json
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import tinytf.sample as sample_module
import tinytf.train as train_module
from tinytf import checkpoint as checkpoint_module
from tinytf.checkpoint import LOCK_NAME, FolderLock, has_checkpoint, load_checkpoint
from tinytf.data import TokenDataset
from training_runs import TINY, StopAfter, metrics, run_tiny, write_corpus

CRASH_AT = Path(__file__).with_name("crash_at.py")
PROCESSES = 2  # trials run side by side, each in a folder of its own


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpora")
    return write_corpus(folder / "a.txt"), write_corpus(folder / "b.txt", "VERSE")  # two vocabularies


def _sha256(path):
    return hashlib.sha256(Path(path).read_text(encoding="utf-8").encode("utf-8")).hexdigest()


def _assert_same_run(folder, reference):
    """`folder` holds the run `reference` holds: the same metrics, line for line, and the same final weights."""
    assert [(r["iter"], r["train_loss"], r["val_loss"]) for r in metrics(folder)] == \
        [(r["iter"], r["train_loss"], r["val_loss"]) for r in metrics(reference)]
    expected = load_checkpoint(reference).weights
    actual = load_checkpoint(folder).weights
    assert actual.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)


def _assert_no_leftovers(folder):
    """Nothing of a killed process remains once a run has finished in `folder`: no temporary files, no staging
    folders, no lock."""
    names = {path.name for path in folder.iterdir()} | {path.name for path in folder.parent.iterdir()}
    assert not [name for name in names if name.endswith((".tmp", ".partial")) or name == LOCK_NAME], names


def _take_over_the_lock(folder):
    """A killed run's lock is stale: the next owner takes it (and removes the file when it is done)."""
    with FolderLock(folder) as lock:
        assert lock.locked


def _assert_metrics_consistent(folder):
    """The complete lines of metrics.jsonl are the iterations 1, 2, ... once each (an evaluation every step), and
    none is older than the checkpoint's iteration; lines past it are allowed (dropped on resume)."""
    lines = (folder / "metrics.jsonl").read_text().splitlines() if (folder / "metrics.jsonl").exists() else []
    iterations = []
    for index, line in enumerate(lines):
        try:
            iterations.append(json.loads(line)["iter"])
        except json.JSONDecodeError:
            assert index == len(lines) - 1, "only the last line can be cut short by a kill"
    assert iterations == list(range(1, len(iterations) + 1))
    if has_checkpoint(folder):
        assert len(iterations) >= load_checkpoint(folder).meta["iteration"] + 1


def _kill_at_every_change(command, trial_folder, set_up):
    """Run `command` (crash_at's arguments after COUNT_FILE, with {out} for the trial's folder) once to count its
    changes to the disk, then once killed before each of them, every trial in a folder made by `set_up(folder)`.
    Returns the killed trials' folders."""
    def run(kill_at):
        folder = trial_folder(kill_at)
        set_up(folder)
        count_file = folder.parent / f"{folder.name}.count"
        arguments = [argument.format(out=folder) for argument in command]
        result = subprocess.run([sys.executable, str(CRASH_AT), str(kill_at), str(count_file), *arguments],
                                capture_output=True, text=True, timeout=120)
        return result, int(count_file.read_text()) if count_file.exists() else None

    complete, changes = run(0)
    assert complete.returncode == 0, complete.stderr
    with ThreadPoolExecutor(PROCESSES) as pool:
        results = list(pool.map(run, range(1, changes + 1)))
    for kill_at, (result, _) in enumerate(results, start=1):
        assert result.returncode == -signal.SIGKILL, (kill_at, result.stderr)
    return [trial_folder(kill_at) for kill_at in range(1, changes + 1)]


# --- kill -9 before every change to the disk --------------------------------------------------------------------------
def test_a_fresh_run_killed_at_any_change_leaves_a_run_that_resumes_exactly(tmp_path, corpora):
    corpus, _ = corpora
    reference = tmp_path / "reference"
    assert run_tiny("--data", corpus, "--out", reference, "--iters", 2, "--eval-interval", 1) == 0
    command = ["-m", "tinytf.train", *TINY, "--data", str(corpus), "--out", "{out}", "--iters", "2",
               "--eval-interval", "1"]
    killed = _kill_at_every_change(command, lambda k: tmp_path / f"trial{k}" / "run", lambda folder: None)
    resumed = 0
    for folder in killed:
        if has_checkpoint(folder):  # it loads; without one (killed before the first save) a new run must start
            _assert_metrics_consistent(folder)
            if load_checkpoint(folder).meta["iteration"] < 1:
                assert run_tiny("--out", folder, "--resume") == 0, folder
                resumed += 1
            else:
                _take_over_the_lock(folder)
        else:
            assert run_tiny("--data", corpus, "--out", folder, "--iters", 2, "--eval-interval", 1) == 0, folder
        _assert_same_run(folder, reference)
        _assert_no_leftovers(folder)
    assert len(killed) >= 40 and resumed >= 5, (len(killed), resumed)


def test_a_resumed_run_killed_at_any_change_resumes_exactly(tmp_path, corpora, monkeypatch):
    corpus, _ = corpora
    reference = tmp_path / "reference"
    assert run_tiny("--data", corpus, "--out", reference, "--iters", 4, "--eval-interval", 1) == 0
    template = tmp_path / "template"
    monkeypatch.setattr(train_module, "StopRequest", StopAfter(2))
    assert run_tiny("--data", corpus, "--out", template, "--iters", 4, "--eval-interval", 1) == 130
    monkeypatch.undo()

    command = ["-m", "tinytf.train", "--out", "{out}", "--resume"]
    killed = _kill_at_every_change(command, lambda k: tmp_path / f"trial{k}" / "run",
                                   lambda folder: shutil.copytree(template, folder))
    for folder in killed:
        _assert_metrics_consistent(folder)
        if load_checkpoint(folder).meta["iteration"] < 3:
            assert train_module.main(["--out", str(folder), "--resume"]) == 0, folder
        else:
            _take_over_the_lock(folder)
        _assert_same_run(folder, reference)
        _assert_no_leftovers(folder)
    assert len(killed) >= 40


def test_overwrite_killed_at_any_change_leaves_the_old_run_or_the_new_one_whole(tmp_path, corpora):
    """--overwrite with another corpus: a kill leaves the old run with its own data (never the new data under the
    old checkpoint, the case that trained the old model on the wrong text), or the new run."""
    old_corpus, new_corpus = corpora
    template, reference = tmp_path / "template", tmp_path / "reference"
    assert run_tiny("--data", old_corpus, "--out", template, "--iters", 2, "--eval-interval", 2) == 0
    assert run_tiny("--data", new_corpus, "--out", reference, "--iters", 2, "--eval-interval", 1) == 0
    command = ["-m", "tinytf.train", *TINY, "--data", str(new_corpus), "--out", "{out}", "--iters", "2",
               "--eval-interval", "1", "--overwrite"]
    killed = _kill_at_every_change(command, lambda k: tmp_path / f"trial{k}" / "run",
                                   lambda folder: shutil.copytree(template, folder))
    outcomes = {"old run kept": 0, "new run resumed": 0, "started again": 0}
    for folder in killed:
        if has_checkpoint(folder):
            saved = load_checkpoint(folder)
            assert TokenDataset.open(folder / "data").tokenizer.to_dict() == saved.meta["tokenizer"], folder
            if saved.meta["data_sha256"] == _sha256(old_corpus):
                _assert_same_run(folder, template)
                outcomes["old run kept"] += 1
                continue
            _assert_metrics_consistent(folder)
            if saved.meta["iteration"] < 1:
                assert run_tiny("--out", folder, "--resume") == 0, folder
            else:
                _take_over_the_lock(folder)
            outcomes["new run resumed"] += 1
        else:
            assert run_tiny("--data", new_corpus, "--out", folder, "--iters", 2, "--eval-interval", 1) == 0, folder
            outcomes["started again"] += 1
        _assert_same_run(folder, reference)
        _assert_no_leftovers(folder)
    assert all(count > 0 for count in outcomes.values()), outcomes


@pytest.mark.parametrize("folder_before", ["a saved model", "none"])
def test_save_pretrained_killed_at_any_change_leaves_the_old_model_or_the_new_one(tmp_path, folder_before):
    from tinytf import manual_seed
    from tinytf.checkpoint import save_arrays
    from tinytf.interop import from_pretrained, save_pretrained
    from tinytf.models import GPT, GPTConfig

    def model(seed, n_layer):
        manual_seed(seed)
        return GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=n_layer, n_head=2, n_embd=8))

    old, new = model(1, n_layer=1), model(2, n_layer=2)
    template = tmp_path / "template"
    save_pretrained(old, template)
    (template / "tokenizer.json").write_text("the user's")
    save_arrays(tmp_path / "new.safetensors", new.state_dict())
    code = ("import sys; from tinytf.checkpoint import load_arrays; from tinytf.interop import save_pretrained\n"
            "from tinytf.models import GPT, GPTConfig\n"
            "model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8))\n"
            f"model.load_state_dict(load_arrays({str(tmp_path / 'new.safetensors')!r})); "
            "save_pretrained(model, sys.argv[1])")

    def set_up(folder):
        if folder_before == "a saved model":
            shutil.copytree(template, folder)

    killed = _kill_at_every_change(["-c", code, "{out}"], lambda k: tmp_path / f"trial{k}" / "model", set_up)
    found = {"old": 0, "new": 0}
    for folder in killed:
        if folder_before == "none" and not folder.exists():
            found["old"] += 1  # as before the save: no folder
            continue
        loaded = from_pretrained(folder).state_dict()
        which = "new" if len(loaded) == len(new.state_dict()) else "old"
        for name, array in (new if which == "new" else old).state_dict().items():
            np.testing.assert_array_equal(loaded[name], array, err_msg=f"{folder}: {name}")
        assert folder_before == "none" or (folder / "tokenizer.json").read_text() == "the user's"
        found[which] += 1
    assert found["old"] > 0 and found["new"] > 0, found


# --- kill -9 at random moments ----------------------------------------------------------------------------------------
def test_twenty_kills_at_random_moments_each_leave_a_run_that_resumes(tmp_path, corpora):
    """Each trial resumes the run the last one left, waits until it has evaluated a step more, and kills it at a
    random moment of the next 0.3 s: in a step, in an evaluation, or in a checkpoint's save."""
    corpus, _ = corpora
    out = tmp_path / "run"
    random_moments = random.Random(14)
    # A short warmup: the final resume shortens --iters to what the trials reached, which a loaded machine keeps
    # below the default warmup of 100 steps.
    command = [sys.executable, "-m", "tinytf.train", *TINY, "--data", str(corpus), "--out", str(out),
               "--iters", "100000", "--eval-interval", "1", "--warmup-iters", "10"]
    iterations = []
    for trial in range(20):
        evaluated = len(_complete_lines(out / "metrics.jsonl"))
        with open(tmp_path / "stderr.txt", "w") as stderr:
            process = subprocess.Popen(command + (["--resume"] if trial else []), stdout=subprocess.DEVNULL,
                                       stderr=stderr)
        try:
            deadline = time.monotonic() + 60
            # The first trial also waits for the first checkpoint: on a loaded machine a kill in the first save would
            # leave nothing to resume (the fresh-run tests above cover kills before it).
            while len(_complete_lines(out / "metrics.jsonl")) <= evaluated or not has_checkpoint(out):
                assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "stderr.txt").read_text()
                time.sleep(0.005)
            time.sleep(random_moments.uniform(0.0, 0.3))
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=60)
        finally:
            process.kill()
        assert process.returncode == -signal.SIGKILL
        _assert_metrics_consistent(out)
        iterations.append(load_checkpoint(out).meta["iteration"] + 1)
    final = iterations[-1] + 2
    assert train_module.main(["--out", str(out), "--resume", "--iters", str(final)]) == 0
    assert [r["iter"] for r in metrics(out)] == list(range(1, final + 1))
    _assert_no_leftovers(out)
    assert iterations == sorted(iterations) and len(set(iterations)) >= 10, iterations


def _complete_lines(path):
    """The lines of `path` that end in a newline (not one being written)."""
    lines = path.read_text().splitlines(keepends=True) if path.exists() else []
    return [line for line in lines if line.endswith("\n")]


# --- a full disk ------------------------------------------------------------------------------------------------------
class DiskFullAfter:
    """Stands in for open() in tinytf.checkpoint: what is written to files opened there fails with ENOSPC once
    `limit` bytes have been written in all."""

    def __init__(self, limit):
        self.limit, self.written = limit, 0

    def __call__(self, path, mode="r", *args, **kwargs):
        file = open(path, mode, *args, **kwargs)
        if "w" in mode:
            file.write = self._failing_write(file.write, path)
        return file

    def _failing_write(self, write, path):
        def write_until_full(payload):
            self.written += len(payload)
            if self.written > self.limit:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            return write(payload)

        return write_until_full


@pytest.fixture(scope="module")
def saved_run_template(tmp_path_factory, corpora):
    """A finished run of 2 iterations with a checkpoint at iteration 2, on the first corpus."""
    out = tmp_path_factory.mktemp("saved") / "run"
    assert run_tiny("--data", corpora[0], "--out", out, "--iters", 2, "--eval-interval", 2) == 0
    return out


@pytest.fixture
def saved_run(tmp_path, saved_run_template):
    return shutil.copytree(saved_run_template, tmp_path / "run")


def _files(folder):
    """The bytes of every file in `folder`, but a lock file, which comes and goes with the runs."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(Path(folder).rglob("*"))
            if path.is_file() and path.name != LOCK_NAME}


def _assert_run_intact(folder, before):
    """Every file of the saved run as it was, except lines that metrics.jsonl gained past the checkpoint."""
    after = _files(folder)
    assert after.keys() == before.keys() and all(after[name] == before[name] for name in before
                                                 if name != "metrics.jsonl"), sorted(after)
    assert after.get("metrics.jsonl", b"").startswith(before.get("metrics.jsonl", b""))


def _loads(folder):
    try:
        load_checkpoint(folder)
    except checkpoint_module.CheckpointError:
        return False
    return True


def _messages(stderr):
    """The lines a user reads on stderr: without the progress bar's redrawn fragments."""
    lines = [part.strip() for line in stderr.splitlines() for part in line.split("\r")]
    return [line for line in lines if line and not re.search(r"\d+%\||step/s", line)]


@pytest.mark.parametrize("limit", [0, 30_000], ids=["first-byte", "mid-save"])
def test_a_full_disk_while_saving_keeps_the_previous_checkpoint_and_says_so(saved_run, monkeypatch, capsys, limit):
    before = _files(saved_run)
    monkeypatch.setattr(checkpoint_module, "open", DiskFullAfter(limit), raising=False)
    assert train_module.main(["--out", str(saved_run), "--resume", "--iters", "4", "--eval-interval", "2"]) == 2
    monkeypatch.undo()
    messages = _messages(capsys.readouterr().err)
    assert len(messages) == 1 and re.fullmatch(
        r"tinytf\.train: error: cannot save the checkpoint at iteration 4: No space left on device \(.*\.tmp\); "
        r"the last good checkpoint \(iteration 2\) in .* is kept", messages[0]), messages
    _assert_run_intact(saved_run, before)
    assert _loads(saved_run)
    assert train_module.main(["--out", str(saved_run), "--resume", "--iters", "4", "--eval-interval", "2"]) == 0
    assert [r["iter"] for r in metrics(saved_run)] == [2, 4]


def test_the_kernel_refusing_a_write_while_saving_keeps_the_previous_checkpoint(saved_run):
    """Not a stand-in: RLIMIT_FSIZE makes the kernel fail writes past a file size (EFBIG), as a full disk does."""
    before = _files(saved_run)
    limit = min(len(payload) for name, payload in before.items() if name.endswith(".safetensors")) // 2
    code = ("import resource, signal, sys\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write instead of killing the process\n"
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
            "from tinytf.train import main\nsys.exit(main(sys.argv[1:]))")
    result = subprocess.run([sys.executable, "-c", code, "--out", str(saved_run), "--resume", "--iters", "4",
                             "--eval-interval", "2"], capture_output=True, text=True, timeout=120)
    messages = _messages(result.stderr)
    assert result.returncode == 2 and len(messages) == 1, result.stderr
    assert "cannot save the checkpoint at iteration 4: File too large" in messages[0], messages
    assert "the last good checkpoint (iteration 2)" in messages[0], messages
    _assert_run_intact(saved_run, before)
    assert _loads(saved_run)


def test_a_diverging_run_says_so_in_one_line_without_numpys_warnings(tmp_path, corpora):
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "tinytf.train", *TINY, "--data", str(corpora[0]), "--out", str(out),
                             "--iters", "6", "--eval-interval", "2", "--lr", "1e30", "--grad-clip", "0"],
                            capture_output=True, text=True, timeout=120)
    messages = _messages(result.stderr)
    assert result.returncode == 1 and len(messages) == 1, result.stderr
    assert re.fullmatch(rf"stopping: the loss became nan at iteration \d; no checkpoint was written to "
                        rf"{re.escape(str(out))}", messages[0]), messages


# --- two runs in one folder -------------------------------------------------------------------------------------------
def test_a_second_run_is_refused_while_the_first_runs_and_a_killed_runs_lock_is_taken_over(saved_run):
    command = [sys.executable, "-m", "tinytf.train", "--out", str(saved_run), "--resume"]
    first = subprocess.Popen([*command, "--iters", "100000", "--eval-interval", "1"], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    try:
        while not first.stdout.readline().startswith("resumed from"):
            assert first.poll() is None
        second = subprocess.run([*command, "--iters", "100001"], capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        assert re.fullmatch(rf"tinytf\.train: error: {re.escape(str(saved_run))} is in use by another process "
                            rf"\(pid {first.pid} on .*, since .*\): another run is using this --out; wait for it to "
                            r"end or choose another --out", second.stderr.strip()), second.stderr
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    finally:
        first.kill()
        first.stdout.close()
    assert (saved_run / LOCK_NAME).exists()
    done = load_checkpoint(saved_run).meta["iteration"] + 1
    assert train_module.main(["--out", str(saved_run), "--resume", "--iters", str(done + 1)]) == 0
    assert [r["iter"] for r in metrics(saved_run)] == [2, *range(3, done + 2)]
    assert not (saved_run / LOCK_NAME).exists()


# --- every case of the issue, as a table ------------------------------------------------------------------------------
def _edit_manifest(edit):
    def set_up(run, stack, monkeypatch):
        path = run / "checkpoint.json"
        manifest = json.loads(path.read_text())
        edit(manifest["meta"])
        path.write_text(json.dumps(manifest))
    return set_up


def _hold_lock(folder_name):
    def set_up(run, stack, monkeypatch):
        stack.enter_context(FolderLock(run.parent / folder_name))
    return set_up


def _prepare_other_text(run, stack, monkeypatch):
    shutil.rmtree(run / "data")
    train_module.prepare_dataset((run.parent / "b.txt").read_text(), run / "data")


def _leave_a_stale_lock(run, stack, monkeypatch):
    (run / LOCK_NAME).write_text(json.dumps({"pid": 2 ** 22 + 1, "host": "gone", "since": "earlier"}))


def _leave_metrics_past_the_checkpoint(run, stack, monkeypatch):
    with open(run / "metrics.jsonl", "a") as file:
        file.write(json.dumps({"iter": 4, "train_loss": 1.0, "val_loss": 1.0}) + "\n" + '{"iter": 6, "tra')


def _leave_a_killed_preparation(run, stack, monkeypatch):
    (run / ".data-0123abcd.partial").mkdir()
    (run / ".data-0123abcd.partial" / "train.bin").write_bytes(b"half")


def _interrupt_the_preparation(run, stack, monkeypatch):
    def prepare_then_interrupt(text, directory, **kwargs):
        (Path(directory) / "train.bin").write_bytes(b"partial")
        raise KeyboardInterrupt
    monkeypatch.setattr(train_module, "prepare_dataset", prepare_then_interrupt)


def _interrupt_the_sampling(run, stack, monkeypatch):
    from tinytf.models import GPT

    def stream_then_interrupt(self, *args, **kwargs):
        yield from [np.array([0])] * 3  # (batch,) ids, as GPT.stream yields them
        raise KeyboardInterrupt
    monkeypatch.setattr(GPT, "stream", stream_then_interrupt)


def _fill_the_disk(run, stack, monkeypatch):
    monkeypatch.setattr(checkpoint_module, "open", DiskFullAfter(0), raising=False)


def _damage(relative_path, damage):
    def set_up(run, stack, monkeypatch):
        path = run / relative_path
        damage(path)
    return set_up


def _remove(path):
    shutil.rmtree(path) if path.is_dir() else path.unlink()


def _truncate(path):
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _remove_the_optimizer_state(run, stack, monkeypatch):
    next(run.glob("optimizer-*.safetensors")).unlink()


# (case, command line with {run} the saved run, {new} a folder that does not exist, {a}/{b} corpora, {file} a file,
#  {empty}/{binary}/{folder} bad data; expected exit status; a regex the message must match; set-up, or None)
RESUME = ["--out", "{run}", "--resume"]
FRESH = ["--out", "{new}", "--data", "{a}", "--iters", "2"]
CASES = [
    # the six ways a run was lost (data loss)
    ("1 divergence on --resume", [*RESUME, "--iters", "6", "--eval-interval", "2", "--lr", "1e30", "--grad-clip",
     "0"], 1, r"^stopping: .*the last good checkpoint \(iteration 2\) in .* is kept$", None),
    ("1 divergence of a new run", [*FRESH, "--iters", "4", "--eval-interval", "2", "--lr", "1e30", "--grad-clip",
     "0"], 1, r"^stopping: .*; no checkpoint was written to .*new$", None),
    ("2 a new run into a saved run's folder", ["--out", "{run}", "--data", "{a}"], 2,
     r"holds a run already: continue it with --resume, start it again with --overwrite .* or choose another --out",
     None),
    ("3 a new run on another text into a saved run's folder", ["--out", "{run}", "--data", "{b}"], 2,
     "holds a run already", None),
    ("3 --resume with prepared data of another text", [*RESUME, "--iters", "4"], 2,
     r"the prepared data in .* \(a vocabulary of \d+\) is not the data the checkpoint was trained on",
     _prepare_other_text),
    ("3 --resume with --data of another text", [*RESUME, "--iters", "4", "--data", "{b}"], 2,
     r"--data .*b\.txt is not the text the run in .* was trained on", None),
    ("4 --resume with another --n-layer", [*RESUME, "--n-layer", "2"], 2, r"--n-layer 2 \(the checkpoint has 1\)",
     None),
    ("4 --resume with another --preset", [*RESUME, "--preset", "llama"], 2,
     r"--preset llama \(the checkpoint has gpt2\)", None),
    ("4 --resume with two model flags", [*RESUME, "--n-embd", "32", "--block-size", "8"], 2,
     r"--n-embd 32 \(the checkpoint has 16\), --block-size 8 \(the checkpoint has 16\)", None),
    ("5 a second run while one holds the folder", [*RESUME, "--iters", "4"], 2,
     r"run is in use by another process \(pid \d+ on .*\): another run is using this --out", _hold_lock("run")),
    ("5 a new run into a folder another run holds", FRESH, 2, r"new is in use by another process",
     _hold_lock("new")),
    ("5 a lock left by a killed run", [*RESUME, "--iters", "4"], 0,
     rf"^note: the run before this one in .* \(pid {2 ** 22 + 1}\) did not end cleanly; its lock is taken over$",
     _leave_a_stale_lock),
    ("6 metrics past the checkpoint", [*RESUME, "--iters", "4", "--eval-interval", "2"], 0,
     r"^resumed from .* at iteration 2$", _leave_metrics_past_the_checkpoint),
    # one-line errors instead of tracebacks
    ("--n-embd not divisible by --n-head", [*FRESH, "--n-embd", "10", "--n-head", "4"], 2,
     r"--n-embd \(10\) must be divisible by --n-head \(4\)", None),
    ("--n-head not a multiple of --n-kv-head", [*FRESH, "--n-head", "4", "--n-kv-head", "3"], 2,
     r"--n-head \(4\) must be a multiple of --n-kv-head \(3\)", None),
    ("--mlp-hidden 0", [*FRESH, "--mlp-hidden", "0"], 2, "--mlp-hidden must be at least 1, got 0", None),
    ("data shorter than --block-size + 1", [*FRESH, "--block-size", "5000"], 2,
     r"val split would hold \d+, fewer than --block-size \+ 1 = 5001", None),
    ("--out names a file", ["--out", "{file}", "--data", "{a}"], 2, r"--out .*file is a file; pass a folder", None),
    ("--resume without a checkpoint", ["--out", "{new}", "--resume"], 2, r"new holds no checkpoint to continue",
     None),
    ("manifest: rng of the wrong type", RESUME + ["--iters", "4"], 2, r"its state is damaged \(TypeError",
     _edit_manifest(lambda meta: meta.update(rng=[1, 2]))),
    ("manifest: a sampler state edited", RESUME + ["--iters", "4"], 2, r"its state is damaged",
     _edit_manifest(lambda meta: meta["rng"].update(sampler_train={"x": 1}))),
    ("manifest: iteration of the wrong type", RESUME + ["--iters", "4"], 2, r"its state is damaged .*'two'",
     _edit_manifest(lambda meta: meta.update(iteration="two"))),
    ("manifest: best_val_loss of the wrong type", RESUME + ["--iters", "4"], 2, r"its state is damaged",
     _edit_manifest(lambda meta: meta.update(best_val_loss="low"))),
    ("manifest: config of the wrong type", RESUME, 2, r"its checkpoint has no training arguments or config",
     _edit_manifest(lambda meta: meta.update(config=5))),
    ("manifest: training arguments missing", RESUME, 2, r"its checkpoint has no training arguments or config",
     _edit_manifest(lambda meta: meta.pop("train_args"))),
    ("manifest: tokenizer damaged", RESUME + ["--iters", "4"], 2, r"cannot load the checkpoint in .*",
     _edit_manifest(lambda meta: meta.update(tokenizer={"chars": 5}))),
    ("--resume with --iters at the checkpoint's", [*RESUME, "--iters", "2"], 2,
     r"has done 2 iterations; pass --iters above that to continue it", None),
    ("--resume with --overwrite", [*RESUME, "--overwrite"], 2, "pass one of them", None),
    ("Ctrl-C while preparing the data (--overwrite)", ["--out", "{run}", "--data", "{b}", "--overwrite"], 130,
     r"^tinytf\.train: interrupted$", _interrupt_the_preparation),
    ("Ctrl-C during tinytf.sample", ["sample", "--ckpt", "{run}", "--prompt", "line"], 130,
     r"^tinytf\.sample: interrupted$", _interrupt_the_sampling),
    ("--help", ["--help"], 0, r"--data DATA", None),
    # more faults and bad inputs
    ("a full disk while saving", [*RESUME, "--iters", "4", "--eval-interval", "2"], 2,
     r"cannot save the checkpoint at iteration 4: No space left on device .*last good checkpoint \(iteration 2\)",
     _fill_the_disk),
    ("--resume with the prepared data deleted", [*RESUME, "--iters", "4"], 2, r"cannot open the data in .*data",
     _damage("data", _remove)),
    ("--resume with data/meta.json damaged", [*RESUME, "--iters", "4"], 2, r"cannot open the data .*malformed",
     _damage("data/meta.json", _truncate)),
    ("--resume with data/train.bin cut short", [*RESUME, "--iters", "4"], 2, r"train\.bin is missing or incomplete",
     _damage("data/train.bin", _truncate)),
    ("--resume with checkpoint.json cut short", [*RESUME, "--iters", "4"], 2, r"malformed JSON at line",
     _damage("checkpoint.json", _truncate)),
    ("--resume with the optimizer state deleted", [*RESUME, "--iters", "4"], 2, r"optimizer-.* file is missing",
     _remove_the_optimizer_state),
    ("staging folders of a killed preparation", ["--out", "{run}", "--data", "{a}", "--overwrite", "--iters", "2"],
     0, r"^data: .*a\.txt: 16,390 characters", _leave_a_killed_preparation),
    ("--data missing", ["--out", "{new}", "--data", "{new}.txt"], 2, "data file not found", None),
    ("--data empty", ["--out", "{new}", "--data", "{empty}"], 2, "data file is empty", None),
    ("--data not UTF-8", ["--out", "{new}", "--data", "{binary}"], 2, r"is not UTF-8 text: .*byte 0xff", None),
    ("--data an empty folder", ["--out", "{new}", "--data", "{folder}"], 2, r"the data folder .* holds no files", None),
    ("--device the machine lacks", [*FRESH, "--device", "cuda:3"], 2, "cuda:3", None),
    ("--dropout 1", [*FRESH, "--dropout", "1"], 2, r"--dropout must be in \[0, 1\), got 1\.0", None),
    ("--lr negative", [*FRESH, "--lr", "-1"], 2, "--lr must be non-negative, got -1.0", None),
    ("--warmup-iters above --iters", [*FRESH, "--warmup-iters", "5"], 2, r"--warmup-iters must be between 0", None),
    ("--n-layer 0", [*FRESH, "--n-layer", "0"], 2, "--n-layer must be at least 1, got 0", None),
    ("--batch-size 0", [*FRESH, "--batch-size", "0"], 2, "--batch-size must be at least 1, got 0", None),
    ("--eval-iters 0", [*FRESH, "--eval-iters", "0"], 2, "--eval-iters must be at least 1, got 0", None),
    ("an option misspelled", [*FRESH, "--n-layers", "2"], 2, r"error: unrecognized arguments: --n-layers 2$", None),
    ("a number that is not one", [*FRESH, "--n-layer", "many"], 2, r"error: argument --n-layer: invalid int value",
     None),
    ("tinytf.sample of a folder without a checkpoint", ["sample", "--ckpt", "{new}"], 2,
     r"^tinytf\.sample: error: cannot load the checkpoint in .*new", None),
]
ARGPARSE = ("--help", "an option misspelled", "a number that is not one")  # argparse prints its usage first


@pytest.fixture(scope="module")
def case_files(tmp_path_factory, corpora):
    folder = tmp_path_factory.mktemp("inputs")
    (folder / "file").write_text("mine")
    (folder / "empty.txt").write_bytes(b"")
    (folder / "binary.txt").write_bytes(b"\xff\xfe\x00bad")
    (folder / "folder").mkdir()
    return {"a": corpora[0], "b": corpora[1], "file": folder / "file", "empty": folder / "empty.txt",
            "binary": folder / "binary.txt", "folder": folder / "folder"}


@pytest.mark.parametrize("case, argv, status, message, set_up", CASES, ids=[case[0] for case in CASES])
def test_every_case_ends_with_its_status_and_one_clear_line_and_the_saved_run_intact(
        tmp_path, saved_run_template, case_files, monkeypatch, capsys, case, argv, status, message, set_up):
    run = shutil.copytree(saved_run_template, tmp_path / "run")
    shutil.copy(case_files["b"], tmp_path / "b.txt")
    names = {**case_files, "run": run, "new": tmp_path / "new"}
    argv = [argument.format(**names) for argument in argv]
    with contextlib.ExitStack() as stack:
        if set_up is not None:
            set_up(run, stack, monkeypatch)
        before = _files(run)
        loadable = _loads(run)
        capsys.readouterr()
        command = sample_module.main if argv[0] == "sample" else train_module.main
        arguments = argv[1:] if argv[0] == "sample" else (argv if "--resume" in argv else [*TINY, *argv])
        try:
            exit_status = command(arguments)
        except SystemExit as exit:  # argparse's own errors and --help
            exit_status = exit.code
    output = capsys.readouterr()
    messages = _messages(output.err) if status else _messages(output.out + output.err)
    assert exit_status == status, (exit_status, output.err)
    assert "Traceback" not in output.err
    if status and case not in ARGPARSE:
        assert len(messages) == 1, messages
    assert any(re.search(message, line) for line in (messages if status == 0 or case in ARGPARSE else messages[:1])), \
        messages
    if status:
        _assert_run_intact(run, before)  # a refused or failed command changed nothing of the saved run
        assert _loads(run) == loadable
        assert not (tmp_path / "new").exists() or case.startswith(("1 ", "5 "))
    assert not [path for path in tmp_path.rglob("*") if path.name.endswith((".tmp", ".partial", LOCK_NAME))]
