import json
import os

import ml_dtypes
import numpy as np
import pytest

from tinytf import backend, checkpoint
from tinytf.checkpoint import (
    MANIFEST_NAME,
    CheckpointError,
    load_arrays,
    load_checkpoint,
    load_json,
    save_arrays,
    save_checkpoint,
    save_json,
    write_atomic,
)


def _weights(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "wte.weight": rng.standard_normal((7, 4)).astype(np.float32),
        "blocks.0.ln.bias": rng.standard_normal(4).astype(np.float32),
        "lm_head.weight.T": rng.standard_normal((4, 7)).T,  # a strided view must be saved as its values
        "step": np.array(seed, dtype=np.int64),
        "empty": np.zeros((0, 3), dtype=np.float16),
    }


def _meta(iteration=10):
    rng_state = np.random.default_rng(1).bit_generator.state  # 128-bit integers, JSON keeps them exact
    return {"iteration": iteration, "config": {"n_layer": 2, "name": "tïny"}, "rng": rng_state,
            "loss": np.float32(1.5)}


def _optimizer_state(scale=1.0):
    return {
        "state": [{"step": 3, "exp_avg": np.full((2, 2), scale), "exp_avg_sq": np.ones((2, 2))}, {}],
        "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.95), "params": [0, 1]}],
    }


def _assert_arrays_equal(actual: dict, expected: dict):
    assert actual.keys() == expected.keys()
    for name, array in expected.items():
        assert actual[name].dtype == array.dtype and actual[name].shape == array.shape, name
        np.testing.assert_array_equal(actual[name], array)


def _own_files(directory):
    return sorted(path.name for path in directory.iterdir() if path.name != MANIFEST_NAME)


def test_checkpoint_round_trips_weights_meta_and_optimizer_state(tmp_path):
    save_checkpoint(tmp_path / "ckpt", _weights(), _meta(), _optimizer_state())
    loaded = load_checkpoint(tmp_path / "ckpt")
    _assert_arrays_equal(loaded.weights, _weights())
    assert loaded.meta == {**_meta(), "loss": 1.5}
    restored = np.random.default_rng()
    restored.bit_generator.state = loaded.meta["rng"]
    assert restored.random() == np.random.default_rng(1).random()
    state = loaded.optimizer_state
    assert state["param_groups"] == [{"lr": 1e-3, "betas": [0.9, 0.95], "params": [0, 1]}]
    assert state["state"][0]["step"] == 3 and state["state"][1] == {}
    np.testing.assert_array_equal(state["state"][0]["exp_avg"], np.full((2, 2), 1.0))


def test_arrays_on_a_device_are_saved_as_their_values(tmp_path, device):
    """Weights and optimizer state held on a GPU (strided views too) reach the files as on the CPU."""
    on_device = {name: backend.to_device(array, device) for name, array in _weights().items()}
    on_device["lm_head.weight.T"] = backend.to_device(_weights()["lm_head.weight.T"].T, device).T
    state = _optimizer_state()
    state["state"][0] = {key: backend.to_device(value, device) if hasattr(value, "shape") else value
                         for key, value in state["state"][0].items()}
    save_checkpoint(tmp_path / "ckpt", on_device, _meta(), state)
    loaded = load_checkpoint(tmp_path / "ckpt")
    _assert_arrays_equal(loaded.weights, _weights())
    np.testing.assert_array_equal(loaded.optimizer_state["state"][0]["exp_avg_sq"], np.ones((2, 2)))


def test_checkpoint_without_optimizer_state_loads_none(tmp_path):
    save_checkpoint(tmp_path, _weights(), _meta())
    assert load_checkpoint(tmp_path).optimizer_state is None


def test_saving_again_replaces_the_checkpoint_and_removes_only_its_old_files(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    save_checkpoint(tmp_path, _weights(0), _meta(10), _optimizer_state(1.0))
    first_files = _own_files(tmp_path)
    save_checkpoint(tmp_path, _weights(1), _meta(20), _optimizer_state(2.0))
    loaded = load_checkpoint(tmp_path)
    _assert_arrays_equal(loaded.weights, _weights(1))
    assert loaded.meta["iteration"] == 20
    assert len(_own_files(tmp_path)) == len(first_files) and "metrics.jsonl" in _own_files(tmp_path)
    assert not set(first_files) - {"metrics.jsonl"} & set(_own_files(tmp_path))


def _failing_replace_for(target_name, calls):
    real_replace = os.replace

    def replace(source, destination):
        calls.append(os.path.basename(destination))
        if os.path.basename(destination).startswith(target_name):
            raise OSError("simulated crash during os.replace")
        real_replace(source, destination)

    return replace


@pytest.mark.parametrize("failing_file", ["weights-", "optimizer-", MANIFEST_NAME])
def test_a_crash_during_save_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch, failing_file):
    save_checkpoint(tmp_path, _weights(0), _meta(10), _optimizer_state(1.0))
    calls = []
    monkeypatch.setattr(checkpoint.os, "replace", _failing_replace_for(failing_file, calls))
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(tmp_path, _weights(1), _meta(20), _optimizer_state(2.0))
    assert calls[-1].startswith(failing_file)
    monkeypatch.undo()

    loaded = load_checkpoint(tmp_path)
    _assert_arrays_equal(loaded.weights, _weights(0))
    assert loaded.meta["iteration"] == 10
    np.testing.assert_array_equal(loaded.optimizer_state["state"][0]["exp_avg"], np.full((2, 2), 1.0))
    assert len(_own_files(tmp_path)) == 3  # the failed save removed its files: only the old generation's remain


def test_a_crash_mid_write_leaves_no_partial_file(tmp_path, monkeypatch):
    save_json(tmp_path / "config.json", {"version": 1})

    def crash(file_descriptor):
        raise OSError("simulated power loss before fsync")

    monkeypatch.setattr(checkpoint.os, "fsync", crash)
    with pytest.raises(OSError, match="power loss"):
        save_json(tmp_path / "config.json", {"version": 2})
    monkeypatch.undo()
    assert load_json(tmp_path / "config.json") == {"version": 1}
    assert os.listdir(tmp_path) == ["config.json"]


def test_the_next_save_cleans_up_files_of_a_killed_save(tmp_path):
    save_checkpoint(tmp_path, _weights(0), _meta(10))
    # what a save killed before its manifest leaves: a complete file of its generation and a partial one
    (tmp_path / "weights-0123abcd.safetensors").write_bytes(checkpoint.arrays_to_bytes(_weights(1)))
    (tmp_path / ".optimizer-0123abcd.safetensors.89abcdef.tmp").write_bytes(b"half a file")
    assert len(_own_files(tmp_path)) == 3
    save_checkpoint(tmp_path, _weights(2), _meta(30))
    assert len(_own_files(tmp_path)) == 1


def test_meta_that_is_not_json_fails_before_anything_is_written(tmp_path):
    save_checkpoint(tmp_path, _weights(0), _meta(10))
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(TypeError, match="a set cannot be stored in a checkpoint's JSON"):
        save_checkpoint(tmp_path, _weights(1), {"tags": {"a"}})
    assert sorted(os.listdir(tmp_path)) == before


def test_non_arrays_are_refused_by_name(tmp_path):
    with pytest.raises(TypeError, match="'w' is a list, expected a NumPy or CuPy array"):
        save_arrays(tmp_path / "w.safetensors", {"w": [1.0, 2.0]})


def test_save_and_load_arrays_round_trip(tmp_path):
    save_arrays(tmp_path / "model.safetensors", _weights())
    _assert_arrays_equal(load_arrays(tmp_path / "model.safetensors"), _weights())


def test_write_atomic_replaces_content(tmp_path):
    write_atomic(tmp_path / "file", b"old")
    write_atomic(tmp_path / "file", b"new")
    assert (tmp_path / "file").read_bytes() == b"new"


# --- errors on loading ------------------------------------------------------------------------------------------------
def test_checkpoint_error_is_a_value_error():
    assert issubclass(CheckpointError, ValueError)


def test_loading_a_missing_folder_or_manifest_names_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint folder not found: .*nowhere"):
        load_checkpoint(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="holds no checkpoint: checkpoint.json is missing"):
        load_checkpoint(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        load_checkpoint(tmp_path / "file")


def _saved(tmp_path):
    save_checkpoint(tmp_path, _weights(), _meta(), _optimizer_state())
    return json.loads((tmp_path / MANIFEST_NAME).read_text())


def test_malformed_manifest_json_is_reported_with_its_position(tmp_path):
    _saved(tmp_path)
    manifest_path = tmp_path / MANIFEST_NAME
    manifest_path.write_text(manifest_path.read_text()[:40])
    with pytest.raises(CheckpointError, match=r"checkpoint.json: malformed JSON at line \d+, column \d+"):
        load_checkpoint(tmp_path)
    manifest_path.write_bytes(b"\xff\xfe")
    with pytest.raises(CheckpointError, match="not UTF-8 JSON"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: m.update(format="something else"), "not a tinytf checkpoint manifest"),
        (lambda m: m.update(version=99), "format version 99"),
        (lambda m: m.pop("meta"), "malformed entries: meta"),
        (lambda m: m.update(weights="../../etc/passwd"), "malformed entries: file names"),
    ],
)
def test_a_manifest_with_wrong_entries_is_refused(tmp_path, edit, match):
    manifest = _saved(tmp_path)
    edit(manifest)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(tmp_path)


def test_truncated_or_damaged_array_files_are_reported(tmp_path):
    manifest = _saved(tmp_path)
    weights_path = tmp_path / manifest["weights"]
    payload = weights_path.read_bytes()
    weights_path.write_bytes(payload[:-5])
    with pytest.raises(CheckpointError, match=f"{manifest['weights']}: file is truncated or corrupt"):
        load_checkpoint(tmp_path)
    weights_path.write_bytes(payload[:-1] + bytes([payload[-1] ^ 1]))  # one flipped bit in the data
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tmp_path)
    weights_path.unlink()
    with pytest.raises(CheckpointError, match=f"{manifest['weights']}: file is missing"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("damage", [lambda b: b[:-3], lambda b: b[:5], lambda b: b"", lambda b: b"\xff" * 64])
def test_load_arrays_reports_a_truncated_or_corrupt_safetensors_file(tmp_path, damage):
    path = tmp_path / "model.safetensors"
    save_arrays(path, _weights())
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointError, match="model.safetensors: not a valid safetensors file"):
        load_arrays(path)


def test_load_json_reports_missing_and_malformed_files(tmp_path):
    with pytest.raises(CheckpointError, match="state.json: file is missing"):
        load_json(tmp_path / "state.json")
    (tmp_path / "state.json").write_text('{"a": [1, 2')
    with pytest.raises(CheckpointError, match="state.json: malformed JSON at line 1"):
        load_json(tmp_path / "state.json")


def test_load_arrays_reports_a_dtype_numpy_cannot_hold(tmp_path):
    header = json.dumps({"w": {"dtype": "F8_E5M2", "shape": [4], "data_offsets": [0, 4]}}).encode()
    path = tmp_path / "fp8.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(4))
    with pytest.raises(CheckpointError, match="fp8.safetensors: holds arrays of dtype 'F8_E5M2'"):
        load_arrays(path)


def test_bfloat16_and_float16_arrays_round_trip_bit_for_bit(tmp_path):
    bits = np.arange(2**16, dtype=np.uint16)  # every 16-bit pattern, NaNs and infinities included
    arrays = {"bf16": bits.view(ml_dtypes.bfloat16).reshape(256, 256), "fp16": bits.view(np.float16)}
    save_arrays(tmp_path / "half.safetensors", arrays)
    payload = (tmp_path / "half.safetensors").read_bytes()
    header = json.loads(payload[8 : 8 + int.from_bytes(payload[:8], "little")])
    assert {header[name]["dtype"] for name in arrays} == {"BF16", "F16"}  # the standard names, for other readers
    loaded = load_arrays(tmp_path / "half.safetensors")
    for name, array in arrays.items():
        assert loaded[name].dtype == array.dtype and loaded[name].shape == array.shape
        np.testing.assert_array_equal(loaded[name].view(np.uint16), array.view(np.uint16))


# --- whole folders: staged replacement and the folder lock ------------------------------------------------------------
def _tree(folder):
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def _staged(target, files):
    staging = checkpoint.staging_folder(target)
    for name, payload in files.items():
        (staging / name).write_bytes(payload)
    return staging


def test_replacing_a_missing_folder_moves_the_staging_folder_in(tmp_path):
    staging = _staged(tmp_path / "model", {"config.json": b"{}", "model.safetensors": b"new"})
    assert staging.parent == tmp_path and staging.name.startswith(".model-")
    checkpoint.replace_folder_contents(staging, tmp_path / "model")
    assert _tree(tmp_path / "model") == {"config.json": b"{}", "model.safetensors": b"new"}
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model"]


@pytest.mark.parametrize("exchange", ["renameat2", "unavailable"])
def test_replacing_a_folder_keeps_its_other_entries(tmp_path, monkeypatch, exchange):
    target = tmp_path / "model"
    (target / "docs").mkdir(parents=True)
    (target / "docs" / "README.md").write_bytes(b"mine")
    (target / "tokenizer.json").write_bytes(b"tok")
    (target / "model.safetensors").write_bytes(b"old")
    if exchange == "unavailable":
        monkeypatch.setattr(checkpoint, "_exchange_paths", lambda first, second: False)
    checkpoint.replace_folder_contents(_staged(target, {"model.safetensors": b"new", "config.json": b"{}"}), target)
    assert _tree(target) == {"config.json": b"{}", "docs/README.md": b"mine", "model.safetensors": b"new",
                             "tokenizer.json": b"tok"}
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model"]


def test_the_exchange_swaps_two_folders_in_one_step(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x").write_bytes(b"a")
    assert checkpoint._exchange_paths(tmp_path / "a", tmp_path / "b")
    assert _tree(tmp_path / "b") == {"x": b"a"} and _tree(tmp_path / "a") == {}


def test_a_folder_holding_the_current_directory_is_replaced_file_by_file(tmp_path, monkeypatch):
    target = tmp_path / "model"
    (target / "inner").mkdir(parents=True)
    (target / "model.safetensors").write_bytes(b"old")
    monkeypatch.chdir(target / "inner")
    checkpoint.replace_folder_contents(_staged(target, {"model.safetensors": b"new"}), target)
    assert os.path.samefile(os.getcwd(), target / "inner")  # the working directory did not move away
    assert _tree(target) == {"model.safetensors": b"new"}


def test_leftover_staging_folders_of_one_target_are_removed(tmp_path):
    leftover = checkpoint.staging_folder(tmp_path / "data")
    other = checkpoint.staging_folder(tmp_path / "data2")
    (tmp_path / ".data-notours.partial").mkdir()
    checkpoint.remove_staging_folders(tmp_path / "data")
    assert not leftover.exists() and other.exists() and (tmp_path / ".data-notours.partial").exists()


def test_a_locked_folder_refuses_a_second_owner_naming_the_first(tmp_path):
    with checkpoint.FolderLock(tmp_path / "run") as lock:
        assert lock.locked and (tmp_path / "run" / checkpoint.LOCK_NAME).exists()
        with pytest.raises(checkpoint.FolderInUse, match=rf"in use by another process \(pid {os.getpid()} "):
            checkpoint.FolderLock(tmp_path / "run").__enter__()
    assert not (tmp_path / "run").exists()  # created for the lock, empty: removed again
    with checkpoint.FolderLock(tmp_path / "a" / "b" / "run"):
        pass
    assert sorted(tmp_path.iterdir()) == []
    with checkpoint.FolderLock(tmp_path / "run") as lock:
        (tmp_path / "run" / "kept").write_text("x")
    assert sorted(path.name for path in (tmp_path / "run").iterdir()) == ["kept"]


def test_a_lock_held_by_another_process_is_refused_and_a_killed_holders_lock_is_taken_over(tmp_path):
    import signal
    import subprocess
    import sys

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from tinytf.checkpoint import FolderLock\n"
         f"lock = FolderLock({str(tmp_path)!r}).__enter__(); print('locked', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(checkpoint.FolderInUse, match=rf"pid {holder.pid} "):
            checkpoint.FolderLock(tmp_path).__enter__()
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        holder.kill()
    assert (tmp_path / checkpoint.LOCK_NAME).exists()  # left behind by the killed holder: stale
    (tmp_path / ".loss.png.0123abcd.tmp").write_bytes(b"half a picture")  # a write the kill interrupted
    (tmp_path / "notes.0123abcd.tmp").write_bytes(b"not write_atomic's name")
    with checkpoint.FolderLock(tmp_path) as lock:
        assert lock.locked and lock.stale_holder["pid"] == holder.pid
        assert sorted(path.name for path in tmp_path.iterdir()) == sorted([checkpoint.LOCK_NAME, "notes.0123abcd.tmp"])
    assert not (tmp_path / checkpoint.LOCK_NAME).exists()
    (tmp_path / ".loss.png.0123abcd.tmp").write_bytes(b"")
    with checkpoint.FolderLock(tmp_path) as lock:  # not stale: a temporary file may be another writer's
        assert lock.stale_holder is None and (tmp_path / ".loss.png.0123abcd.tmp").exists()
