"""Checkpoints: arrays as safetensors, everything else as JSON, every file written atomically.

A checkpoint is a folder:

    checkpoint.json                  the manifest: format version, the caller's `meta`, and the files below
    weights-<token>.safetensors      the weights (a flat dict of arrays)
    optimizer-<token>.safetensors    the optimizer state's arrays      } only when an optimizer state is saved;
    optimizer-<token>.json           the rest of the optimizer state   } its arrays are replaced by {"$array": key}

Each save writes its array files under a fresh token and replaces the manifest last. The manifest is the commit
point: a crash at any moment leaves the previous manifest naming the previous files, which are untouched, so the
old checkpoint loads whole; files of the superseded generation are deleted only after the new manifest is in place.
The manifest also records each file's SHA-256, so a file damaged later is reported instead of loaded.

Two helpers keep a folder whole when several files must change together or several processes might write it:
`replace_folder_contents` moves a staged folder's files in at once (one atomic exchange on Linux), and `FolderLock`
lets one process at a time own a folder (a kernel lock that a killed holder cannot leave behind).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

from .backend import to_device

try:
    import fcntl  # POSIX; without it (Windows) FolderLock cannot lock and says so
except ImportError:
    fcntl = None

MANIFEST_NAME = "checkpoint.json"
FORMAT_NAME = "tinytf-checkpoint"
FORMAT_VERSION = 1
ARRAY_MARKER = "$array"

# Files a save may leave behind: its generations' array files and the temporary files of interrupted writes.
_OWN_NAME = r"(weights|optimizer)-[0-9a-f]{8}\.(safetensors|json)"
_OWN_FILE = re.compile(rf"^{_OWN_NAME}$")
_TEMPORARY_FILE = re.compile(rf"^\.({_OWN_NAME}|checkpoint\.json)\.[0-9a-f]{{8}}\.tmp$")
_INTERRUPTED_WRITE = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")  # write_atomic's temporary name of any file
LOCK_NAME = "run.lock"
# safetensors' dtype names -> NumPy's; safetensors.numpy's own table lacks BF16, which ml_dtypes gives NumPy.
SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "U64": np.dtype(np.uint64),
    "I32": np.dtype(np.int32), "U32": np.dtype(np.uint32), "I16": np.dtype(np.int16), "U16": np.dtype(np.uint16),
    "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}


class CheckpointError(ValueError):
    """A checkpoint on disk is missing, incomplete or corrupt; the message names the path and the problem."""


@dataclass
class Checkpoint:
    weights: dict[str, np.ndarray]
    meta: dict
    optimizer_state: Any = None


# --- single files -----------------------------------------------------------------------------------------------------
def write_atomic(path, payload: bytes) -> None:
    """Write `payload` to `path` so that `path` holds either its old content or all of the new one, never a part."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")  # same folder: os.replace cannot cross
    try:
        with open(temporary, "wb") as file:
            file.write(payload)
            file.flush()
            os.fsync(file.fileno())  # the data is on disk before the rename can be
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def remove_interrupted_writes(folder) -> None:
    """Delete the temporary files that write_atomic leaves in `folder` when its process is killed mid-write (kill -9
    skips its cleanup). Only the folder's new owner may call it, after a killed one (FolderLock does, taking over a
    stale lock): another process's write in progress would lose its file."""
    for entry in Path(folder).iterdir():
        if _INTERRUPTED_WRITE.match(entry.name) and entry.is_file():
            entry.unlink(missing_ok=True)


def _fsync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable (POSIX: the rename lives in the folder's entry table)."""
    if os.name != "posix":
        return
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def arrays_to_bytes(arrays: Mapping[str, Any]) -> bytes:
    """Safetensors bytes of a dict of NumPy or CuPy arrays (copied to the host first)."""
    host_arrays = {}
    for name, array in arrays.items():
        if not isinstance(name, str):
            raise TypeError(f"array names must be strings, got {name!r}")
        if not hasattr(array, "shape") or not hasattr(array, "dtype") or isinstance(array, np.generic):
            raise TypeError(f"{name!r} is a {type(array).__name__}, expected a NumPy or CuPy array")
        host_array = to_device(array, "cpu")
        # safetensors reads the raw buffer, so a strided view (a transpose) would be saved scrambled. (Not
        # np.ascontiguousarray: it turns 0-d arrays into 1-d ones.)
        host_arrays[name] = host_array if host_array.flags.c_contiguous else host_array.copy(order="C")
    return safetensors.numpy.save(host_arrays)


def save_arrays(path, arrays: Mapping[str, Any]) -> None:
    write_atomic(path, arrays_to_bytes(arrays))


def load_arrays(path) -> dict[str, np.ndarray]:
    return _arrays_from_bytes(Path(path), _read_bytes(Path(path)))


def save_json(path, value) -> None:
    write_atomic(path, _json_bytes(value))


def load_json(path):
    return _json_from_bytes(Path(path), _read_bytes(Path(path)))


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file is missing") from None
    except OSError as error:
        raise CheckpointError(f"{path}: cannot be read ({error.strerror or error})") from None


def _arrays_from_bytes(path: Path, payload: bytes) -> dict[str, np.ndarray]:
    try:
        views = safetensors.deserialize(payload)
    except safetensors.SafetensorError as error:
        raise CheckpointError(f"{path}: not a valid safetensors file, truncated or corrupt ({error})") from None
    arrays = {}
    for name, view in views:
        dtype = SAFETENSORS_DTYPES.get(view["dtype"])
        if dtype is None:
            raise CheckpointError(f"{path}: holds arrays of dtype {view['dtype']!r} that NumPy cannot represent")
        arrays[name] = np.frombuffer(view["data"], dtype=dtype).reshape(view["shape"])
    return arrays


def _json_bytes(value) -> bytes:
    return json.dumps(value, indent=1, default=_json_scalar).encode("utf-8")


def _json_scalar(value):
    """json.dumps hook: NumPy scalars (np.float32(0.1), np.int64(3)) become Python numbers."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"a {type(value).__name__} cannot be stored in a checkpoint's JSON: {value!r:.80}")


def _json_from_bytes(path: Path, payload: bytes):
    try:
        return json.loads(payload.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise CheckpointError(f"{path}: not UTF-8 JSON (invalid byte at offset {error.start})") from None
    except json.JSONDecodeError as error:
        raise CheckpointError(
            f"{path}: malformed JSON at line {error.lineno}, column {error.colno}: {error.msg}"
        ) from None


# --- whole folders: staged replacement, and one owner at a time -------------------------------------------------------
def staging_folder(target) -> Path:
    """A new, empty folder beside `target` (same filesystem, so its files can be renamed into `target`)."""
    target = Path(target).absolute()
    staging = target.with_name(f".{target.name}-{secrets.token_hex(4)}.partial")
    staging.mkdir(parents=True)
    return staging


def remove_staging_folders(target) -> None:
    """Delete the staging folders that processes killed while filling them left beside `target`. Only for a
    folder that this process owns (through FolderLock): another writer's staging folder would go too."""
    target = Path(target).absolute()
    pattern = re.compile(rf"^\.{re.escape(target.name)}-[0-9a-f]{{8}}\.partial$")
    if target.parent.is_dir():
        for path in target.parent.iterdir():
            if pattern.match(path.name):
                shutil.rmtree(path, ignore_errors=True)


def replace_folder_contents(staging, target) -> None:
    """Move every file of the folder `staging` into the folder `target` together, and remove `staging`.

    A crash at any moment leaves `target` with all of its old files or all of the new ones, never a mix: a missing
    `target` is created by one rename; an existing one is exchanged with `staging` by one atomic renameat2
    (RENAME_EXCHANGE) once `staging` also holds `target`'s other entries (as hard links where the filesystem allows).
    Where the exchange is unavailable (not Linux, a filesystem without it) or `target` holds the current directory
    (which must not move), the files are replaced one by one, each atomically.
    """
    staging, target = Path(staging).absolute(), Path(target).absolute()
    if not target.exists():
        os.rename(staging, target)
        _fsync_directory(target.parent)
        return
    cwd = Path.cwd()
    carried = set()
    if cwd != target and target not in cwd.parents:
        carried = _carry_over_entries(target, staging)
        _fsync_directory(staging)  # its entries are on disk before the exchange makes them the target's
        if _exchange_paths(staging, target):
            _fsync_directory(target.parent)
            shutil.rmtree(staging)  # it holds the old entries now
            return
    for path in staging.iterdir():
        if path.name not in carried:
            os.replace(path, target / path.name)
    _fsync_directory(target)
    shutil.rmtree(staging)


def _carry_over_entries(source: Path, destination: Path) -> set[str]:
    """Give `destination` the entries of `source` it lacks (hard links, or copies across filesystems); returns
    their names."""
    carried = set()
    for path in source.iterdir():
        copy = destination / path.name
        if copy.exists() or copy.is_symlink():
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.copytree(path, copy, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(path, copy)
        carried.add(path.name)
    return carried


def _link_or_copy(source, destination) -> None:
    try:
        os.link(source, destination, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, destination, follow_symlinks=False)


def _exchange_paths(first: Path, second: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 with RENAME_EXCHANGE); False where that is unavailable."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) if os.name == "posix" else None
    if renameat2 is None:
        return False
    current_directory, rename_exchange = -100, 2  # AT_FDCWD and RENAME_EXCHANGE from <fcntl.h>, <linux/fs.h>
    if renameat2(current_directory, os.fsencode(first), current_directory, os.fsencode(second), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # the kernel or the filesystem cannot exchange
        return False
    raise OSError(code, os.strerror(code), str(second))


class FolderInUse(RuntimeError):
    """Another running process holds the folder's lock: the message names it (pid, host, since when)."""


class FolderLock:
    """Exclusive ownership of a folder by one process at a time: `with FolderLock(folder) as lock: ...`.

    The lock is the kernel's advisory flock on `folder/run.lock`, which the kernel releases when its holder ends in
    any way, kill -9 included: a lock file left behind by a killed process is stale by construction and the next
    owner takes it over (`stale_holder` then says whose it was) and removes the temporary files of the writes the
    killed holder left unfinished (remove_interrupted_writes). The file records the holder, for the message that a
    second process gets. The folder is created if missing, and on release the folders created for it are removed
    again if they are still empty. Where the platform or the filesystem has no such locks, `locked` is False and
    nothing is locked.
    """

    def __init__(self, folder):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.locked = False
        self.stale_holder: dict | None = None
        self._descriptor: int | None = None
        self._created_folders: list[Path] = []

    def __enter__(self) -> FolderLock:
        folder = self.folder.absolute()
        self._created_folders = [path for path in (folder, *folder.parents) if not path.exists()]
        self.folder.mkdir(parents=True, exist_ok=True)
        if fcntl is None:
            return self
        try:
            self._descriptor = self._open_locked()
        except BaseException:
            self._remove_created_folders()
            raise
        if self._descriptor is not None:
            self.locked = True
            self.stale_holder = _read_holder(self._descriptor)
            if self.stale_holder is not None:  # its holder was killed: its interrupted writes are garbage
                remove_interrupted_writes(self.folder)
            holder = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode("utf-8")
            os.ftruncate(self._descriptor, 0)
            os.pwrite(self._descriptor, holder, 0)
        return self

    def _open_locked(self) -> int | None:
        """A descriptor of the lock file, locked; None where the filesystem has no locks; FolderInUse if held."""
        while True:
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(descriptor) or {}
                os.close(descriptor)
                raise FolderInUse(f"{self.folder} is in use by another process (pid {holder.get('pid', '?')} on "
                                  f"{holder.get('host', '?')}, since {holder.get('since', '?')})") from None
            except OSError as error:
                os.close(descriptor)
                if error.errno in (errno.ENOLCK, errno.ENOTSUP, errno.EOPNOTSUPP):
                    return None
                raise
            try:
                same_file = os.fstat(descriptor).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same_file = False
            if same_file:
                return descriptor
            os.close(descriptor)  # its last holder removed the file after we opened it: lock the new one

    def __exit__(self, *exc_info) -> None:
        if self._descriptor is not None:
            self.path.unlink(missing_ok=True)  # still locked: a process that opens the file meanwhile retries
            os.close(self._descriptor)
            self._descriptor, self.locked = None, False
        self._remove_created_folders()

    def _remove_created_folders(self) -> None:
        for folder in self._created_folders:  # innermost first
            if not folder.is_dir() or any(folder.iterdir()):
                return
            folder.rmdir()


def _read_holder(descriptor: int) -> dict | None:
    try:
        holder = json.loads(os.pread(descriptor, 4096, 0).decode("utf-8"))
    except (ValueError, OSError):
        return None
    return holder if isinstance(holder, dict) else None


# --- nested states: arrays out, JSON skeleton in ----------------------------------------------------------------------
def split_arrays(tree) -> tuple[Any, dict[str, Any]]:
    """Replace every array in a nest of dicts, lists and tuples by {"$array": dotted.path}.

    Returns (skeleton, arrays): the skeleton is JSON-able (in JSON, tuples become lists and dict keys strings),
    arrays maps the paths to the arrays.
    """
    arrays: dict[str, Any] = {}

    def visit(node, path: str):
        if isinstance(node, Mapping):
            if ARRAY_MARKER in node:
                raise ValueError(f"the key {ARRAY_MARKER!r} is reserved for array references (at {path or 'the top'})")
            return {key: visit(value, f"{path}.{key}" if path else str(key)) for key, value in node.items()}
        if isinstance(node, (list, tuple)):
            return [visit(value, f"{path}.{index}" if path else str(index)) for index, value in enumerate(node)]
        if hasattr(node, "shape") and hasattr(node, "dtype") and not isinstance(node, np.generic):
            if path in arrays:
                raise ValueError(f"two arrays of the state map to the same key {path!r}")
            arrays[path] = node
            return {ARRAY_MARKER: path}
        return node

    return visit(tree, ""), arrays


def join_arrays(skeleton, arrays: Mapping[str, np.ndarray]):
    """Inverse of `split_arrays`: put the arrays back where the skeleton has {"$array": key}."""

    def visit(node):
        if isinstance(node, dict):
            if set(node) == {ARRAY_MARKER}:
                return arrays[node[ARRAY_MARKER]]
            return {key: visit(value) for key, value in node.items()}
        if isinstance(node, list):
            return [visit(value) for value in node]
        return node

    return visit(skeleton)


# --- checkpoint folders -----------------------------------------------------------------------------------------------
def save_checkpoint(directory, weights: Mapping[str, Any], meta: Mapping, optimizer_state=None) -> Path:
    """Write a checkpoint into `directory` (created if needed), replacing the one there atomically.

    weights: name -> array (NumPy or CuPy). meta: JSON-able dict (config, tokenizer, iteration, RNG states, ...).
    optimizer_state: an optimizer's `state_dict()` or None. Returns the manifest's path.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(4)
    while (directory / f"weights-{token}.safetensors").exists():  # never overwrite the live generation's files
        token = secrets.token_hex(4)
    manifest: dict[str, Any] = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "meta": meta,
        "weights": f"weights-{token}.safetensors",
        "optimizer": None,
    }
    files: dict[str, bytes] = {manifest["weights"]: arrays_to_bytes(weights)}
    if optimizer_state is not None:
        skeleton, optimizer_arrays = split_arrays(optimizer_state)
        manifest["optimizer"] = {"arrays": f"optimizer-{token}.safetensors", "state": f"optimizer-{token}.json"}
        files[manifest["optimizer"]["arrays"]] = arrays_to_bytes(optimizer_arrays)
        files[manifest["optimizer"]["state"]] = _json_bytes(skeleton)
    manifest["sha256"] = {name: hashlib.sha256(payload).hexdigest() for name, payload in files.items()}
    manifest_bytes = _json_bytes(manifest)  # fails on a non-JSON-able meta before anything is written

    try:
        for name, payload in files.items():
            write_atomic(directory / name, payload)
        write_atomic(directory / MANIFEST_NAME, manifest_bytes)
    except BaseException:  # a full disk, say: unless the new manifest is in place, the old checkpoint stays
        if not _manifest_names(directory, manifest["weights"]):
            for name in files:
                (directory / name).unlink(missing_ok=True)
        raise
    _delete_superseded_files(directory, keep=set(files))
    return directory / MANIFEST_NAME


def _manifest_names(directory: Path, weights_name: str) -> bool:
    """Whether the manifest in `directory` is the one whose weights file is `weights_name`."""
    try:
        manifest = load_json(directory / MANIFEST_NAME)
    except CheckpointError:
        return False
    return isinstance(manifest, dict) and manifest.get("weights") == weights_name


def has_checkpoint(directory) -> bool:
    return (Path(directory) / MANIFEST_NAME).is_file()


def remove_checkpoint(directory) -> None:
    """Delete the checkpoint in `directory`: the manifest first (the commit point), then its files; the folder's
    other files stay."""
    directory = Path(directory)
    (directory / MANIFEST_NAME).unlink(missing_ok=True)
    _fsync_directory(directory)
    _delete_superseded_files(directory, keep=set())


def _delete_superseded_files(directory: Path, keep: set[str]) -> None:
    for path in directory.iterdir():
        if path.name not in keep and (_OWN_FILE.match(path.name) or _TEMPORARY_FILE.match(path.name)):
            path.unlink(missing_ok=True)


def load_checkpoint(directory) -> Checkpoint:
    """Read a checkpoint folder written by `save_checkpoint`; a CheckpointError says what is missing or corrupt."""
    directory = Path(directory)
    if not directory.exists():
        raise CheckpointError(f"checkpoint folder not found: {directory}")
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is a file; a checkpoint is a folder holding {MANIFEST_NAME}")
    manifest_path = directory / MANIFEST_NAME
    if not manifest_path.exists():
        raise CheckpointError(f"{directory} holds no checkpoint: {MANIFEST_NAME} is missing")
    manifest = load_json(manifest_path)
    _check_manifest(manifest_path, manifest)

    def read_verified(name: str) -> tuple[Path, bytes]:
        path = directory / name
        payload = _read_bytes(path)
        if hashlib.sha256(payload).hexdigest() != manifest["sha256"].get(name):
            raise CheckpointError(f"{path}: file is truncated or corrupt (its SHA-256 differs from {MANIFEST_NAME}'s)")
        return path, payload

    weights = _arrays_from_bytes(*read_verified(manifest["weights"]))
    optimizer_state = None
    if manifest["optimizer"] is not None:
        arrays = _arrays_from_bytes(*read_verified(manifest["optimizer"]["arrays"]))
        state_path, state_bytes = read_verified(manifest["optimizer"]["state"])
        try:
            optimizer_state = join_arrays(_json_from_bytes(state_path, state_bytes), arrays)
        except KeyError as error:
            raise CheckpointError(f"{state_path}: refers to array {error} that its safetensors file lacks") from None
    return Checkpoint(weights=weights, meta=manifest["meta"], optimizer_state=optimizer_state)


def _check_manifest(path: Path, manifest) -> None:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path}: not a tinytf checkpoint manifest (no \"format\": \"{FORMAT_NAME}\")")
    if manifest.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {manifest.get('version')!r}, this tinytf reads version {FORMAT_VERSION}"
        )
    optimizer = manifest.get("optimizer", "absent")
    file_names = [manifest.get("weights")]
    if isinstance(optimizer, dict):
        file_names += [optimizer.get("arrays"), optimizer.get("state")]
    entries_valid = {
        "meta": isinstance(manifest.get("meta"), dict),
        "optimizer": optimizer is None or isinstance(optimizer, dict),
        "sha256": isinstance(manifest.get("sha256"), dict),
        # Only names this module writes: a manifest must not send the loader to other paths.
        "file names": all(isinstance(name, str) and _OWN_FILE.match(name) for name in file_names),
    }
    problems = [entry for entry, valid in entries_valid.items() if not valid]
    if problems:
        raise CheckpointError(f"{path}: missing or malformed entries: {', '.join(problems)}")
