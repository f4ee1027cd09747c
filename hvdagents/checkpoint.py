"""Checkpoint files: written atomically and durably, read without running code, checked
before anything is loaded.

Writing (:func:`write_atomic`): a temporary file beside the target (``.NAME.XXXXXXXX.tmp``),
fsynced, renamed over the target, then the directory fsynced, so after a crash at any point
the target holds the old checkpoint or the new one, whole, and the new one survives a power
loss once the call returned. A temporary file left by a writer that died is removed by the
next write of the same target (one writer per target: only rank 0 writes). Local file I/O
only: no communication.

Reading: a checkpoint is a zip archive (PyTorch's ``torch.save`` format for ``TorchAgent``,
NumPy ``.npy`` arrays plus a JSON manifest for ``KerasAgent``); every member's CRC-32 is
checked (:func:`check_archive`), nothing is unpickled beyond what ``torch.load(...,
weights_only=True)`` allows, and the agent compares what the file holds (framework, format
version, parameter names, shapes and dtypes, optimizer, strategy) with its own model before
any rank changes anything (:func:`header`, :func:`check_header`). Every refusal is a
:class:`CheckpointError` naming the file and what differs.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import zipfile
from pathlib import Path
from typing import IO, Any, Callable, Sequence

import numpy as np

__all__ = [
    "CheckpointError",
    "FORMAT",
    "VERSION",
    "write_atomic",
    "check_archive",
    "header",
    "check_header",
    "write_arrays",
    "read_arrays",
]

#: The ``format`` field of every checkpoint hvdagents writes.
FORMAT = "hvdagents.checkpoint"

#: Version of the checkpoint layout; a file of another version is refused, naming both.
VERSION = 1

#: Human names of the frameworks, as the ``framework`` field holds them.
_FRAMEWORKS = {"torch": "PyTorch (TorchAgent)", "keras": "Keras (KerasAgent)"}

#: Name of the JSON manifest inside an array archive (:func:`write_arrays`).
MANIFEST = "hvdagents.json"

#: Floating dtypes NumPy lacks (``ml_dtypes``, which Keras and TensorFlow use), stored as bytes.
_EXTRA_DTYPES = ("bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3b11fnuz", "float8_e4m3fnuz",
                 "float8_e5m2fnuz", "int4", "uint4")

#: Read size when checking an archive's CRC-32s.
_CHUNK_BYTES = 1 << 22


class CheckpointError(ValueError):
    """A checkpoint was refused: unsafe (it would run code), truncated or corrupted, or made
    for another framework, model, optimizer or strategy. The message names the file and what
    differs; :meth:`hvdagents.Agent.load_checkpoint` raises it on every rank."""


# -- writing --------------------------------------------------------------------------------------
def _temporary_names(target: Path) -> re.Pattern:
    """The names :func:`write_atomic` gives temporary files of ``target`` (tempfile's 8
    random characters), and nothing else's."""
    return re.compile(rf"\.{re.escape(target.name)}\.[a-z0-9_]{{8}}\.tmp")


def _fsync_directory(directory: Path) -> None:
    """Make the directory entries (the rename) durable. Systems that cannot open a directory
    (Windows) have nothing to do here."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(fileobj)`` on a temporary file in ``path``'s directory, fsync it, rename it
    over ``path`` and fsync the directory. On any error the temporary file is removed and
    ``path`` is left as it was; a process killed during the call leaves ``path`` as it was or
    whole and new, and at most its temporary file (``.NAME.XXXXXXXX.tmp``), which the next
    call for the same ``path`` removes. Returns the final path. Local file I/O only: no
    communication."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    leftovers = _temporary_names(target)
    for name in os.listdir(target.parent):  # a writer of this target killed mid-write
        if leftovers.fullmatch(name):
            try:
                os.unlink(target.parent / name)
            except FileNotFoundError:
                pass
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_directory(target.parent)
    return target


# -- reading: what the file is ---------------------------------------------------------------------
def _not_safe(path: str, reason: str) -> CheckpointError:
    return CheckpointError(f"{path!r} is not a safe checkpoint: {reason}; it was not loaded (nothing in it ran)")


def check_archive(path: str) -> zipfile.ZipFile:
    """The checkpoint at ``path`` opened as a zip archive whose every member passed its CRC-32
    check (a truncated or corrupted file is refused here, before anything is unpickled or
    loaded). Raises :class:`CheckpointError` naming the file and the fault; ``FileNotFoundError``
    when there is no file."""
    with open(path, "rb") as handle:
        head = handle.read(4)
        size = os.fstat(handle.fileno()).st_size
    if not zipfile.is_zipfile(path):
        if head[:1] == b"\x80" or head[:1] in (b"(", b"}", b"]"):
            raise _not_safe(path, "it is a bare pickle (as hvdagents before checkpoint format 1 wrote, or "
                                  "anyone's), and unpickling can run any code: hvdagents reads zip archives of "
                                  "tensors and arrays only")
        if head.startswith(b"PK"):
            raise CheckpointError(f"checkpoint {path!r} is truncated or corrupted: a zip archive without its "
                                  f"central directory ({size} bytes); it was not loaded")
        raise CheckpointError(f"{path!r} is not a checkpoint hvdagents wrote (not a zip archive, {size} bytes; "
                              "empty, truncated or another format); it was not loaded")
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(f"checkpoint {path!r} is truncated or corrupted: {err}; it was not loaded") from err
    try:
        for info in archive.infolist():
            with archive.open(info) as member:
                while member.read(_CHUNK_BYTES):
                    pass
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        archive.close()
        raise CheckpointError(f"checkpoint {path!r} is truncated or corrupted: {err}; it was not loaded") from err
    return archive


def framework_of(archive: zipfile.ZipFile) -> str | None:
    """``"keras"`` for an array archive with hvdagents' manifest, ``"torch"`` for a
    ``torch.save`` archive, else ``None``."""
    names = archive.namelist()
    if MANIFEST in names:
        return "keras"
    if any(n.endswith("/data.pkl") for n in names):
        return "torch"
    return None


def wrong_framework(path: str, found: str | None, wanted: str) -> CheckpointError:
    what = _FRAMEWORKS.get(found or "", "not an hvdagents checkpoint")
    return CheckpointError(
        f"checkpoint {path!r} is for another framework: the file is {what}, this agent is "
        f"{_FRAMEWORKS[wanted]}; it was not loaded"
    )


# -- reading: does it fit this agent ---------------------------------------------------------------
def _signature_list(signature: Sequence[Sequence[Any]]) -> list[list[Any]]:
    return [[str(n), [int(d) for d in s], str(t)] for n, s, t in signature]


def header(framework: str, model: Sequence[Sequence[Any]], optimizer: dict, strategy: str) -> dict:
    """The fields that say what a checkpoint is for, in plain types (JSON- and
    ``weights_only``-safe): the adapters store it beside the state, :func:`check_header`
    compares it with the loading agent."""
    return {"format": FORMAT, "version": VERSION, "framework": framework,
            "model": _signature_list(model), "optimizer": optimizer, "strategy": strategy}


def _first_difference(saved: list[list[Any]], current: list[list[Any]], what: str) -> str | None:
    for i, (a, b) in enumerate(zip(saved, current)):
        if a == b:
            continue
        if a[0] != b[0]:
            return f"{what} {i} is '{a[0]}' in the checkpoint but '{b[0]}' in this model"
        return (f"{what} '{a[0]}' has shape {tuple(a[1])} {a[2]} in the checkpoint but shape "
                f"{tuple(b[1])} {b[2]} in this model")
    if len(saved) > len(current):
        return f"the checkpoint has {what} '{saved[len(current)][0]}' that this model lacks"
    if len(current) > len(saved):
        return f"this model has {what} '{current[len(saved)][0]}' that the checkpoint lacks"
    return None


def check_header(path: str, saved: Any, expected: dict) -> None:
    """Raise :class:`CheckpointError` unless the checkpoint's header ``saved`` (as read) fits
    ``expected`` (this agent's :func:`header`): same format version, framework, parameters
    (names, shapes, dtypes, in order), strategy and optimizer. The message names the first
    thing that differs."""
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise CheckpointError(f"{path!r} is not an hvdagents checkpoint (no '{FORMAT}' header: another program's "
                              "file, or one written before checkpoint format 1); it was not loaded")
    if saved.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path!r} has format version {saved.get('version')!r}; this hvdagents "
                              f"reads version {VERSION}; it was not loaded")
    if saved.get("framework") != expected["framework"]:
        raise wrong_framework(path, saved.get("framework"), expected["framework"])
    problem = _first_difference(_signature_list(saved.get("model", [])), expected["model"], "parameter")
    if problem:
        raise CheckpointError(f"checkpoint {path!r} is for another model: {problem}; it was not loaded")
    if saved.get("strategy") != expected["strategy"]:
        raise CheckpointError(
            f"checkpoint {path!r} holds the state of another strategy: {saved.get('strategy')} in the checkpoint, "
            f"{expected['strategy']} in this agent; it was not loaded"
        )
    if saved.get("optimizer") != expected["optimizer"]:
        problem = _optimizer_difference(saved.get("optimizer") or {}, expected["optimizer"])
        raise CheckpointError(f"checkpoint {path!r} is for another optimizer: {problem}; it was not loaded")


def _optimizer_difference(saved: dict, current: dict) -> str:
    for key in current:
        a, b = saved.get(key), current[key]
        if a == b:
            continue
        if key == "variables" and isinstance(a, list):
            return _first_difference(_signature_list(a), _signature_list(b), "optimizer variable") or "variables differ"
        return f"{key} is {a!r} in the checkpoint but {b!r} in this agent"
    return f"{saved!r} in the checkpoint, {current!r} in this agent"


# -- arrays plus JSON, without pickle (KerasAgent) ------------------------------------------------
def _encode(value: Any, arrays: list[np.ndarray], where: str) -> Any:
    """``value`` as a JSON tree in which every node says its type (so tuples, dicts with
    non-string keys and NumPy scalars come back as they were); arrays go to ``arrays``."""
    if value is None or isinstance(value, (bool, str)):
        return {"none": None} if value is None else {type(value).__name__: value}
    if isinstance(value, int) and type(value) is int:
        return {"int": value}
    if type(value) is float:
        return {"float": value}
    if isinstance(value, (np.ndarray, np.generic)):
        array = np.asarray(value)
        kind = "scalar" if isinstance(value, np.generic) else "array"
        if array.dtype.kind == "V" and not array.dtype.fields and array.dtype.name in _EXTRA_DTYPES:
            arrays.append(array.view(np.uint8).reshape(array.shape + (array.dtype.itemsize,)))
            return {kind: len(arrays) - 1, "dtype": array.dtype.name}  # bfloat16 & co. (ml_dtypes)
        if array.dtype.kind not in "biufcUSmM":
            raise CheckpointError(f"{where} is a NumPy array of dtype {array.dtype}, which cannot be stored "
                                  "without pickle; store numbers, strings or arrays of numbers. Nothing was written.")
        arrays.append(array)
        return {kind: len(arrays) - 1}
    if type(value) in (list, tuple):
        return {type(value).__name__: [_encode(v, arrays, f"{where}[{i}]") for i, v in enumerate(value)]}
    if type(value) is dict:
        return {"dict": [[_encode(k, arrays, f"{where} key"), _encode(v, arrays, f"{where}[{k!r}]")]
                         for k, v in value.items()]}
    raise CheckpointError(f"{where} is a {type(value).__module__}.{type(value).__qualname__}, which cannot be "
                          "stored without pickle; store None, bool, int, float, str, lists, tuples, dicts or "
                          "NumPy arrays of numbers. Nothing was written.")


def _decode(node: Any, arrays: list[np.ndarray]) -> Any:
    if "dtype" in node:  # bytes of an ml_dtypes array (bfloat16, float8...)
        import ml_dtypes

        kind = "array" if "array" in node else "scalar"
        raw = arrays[node[kind]]
        array = raw.view(np.dtype(getattr(ml_dtypes, node["dtype"]))).reshape(raw.shape[:-1])
        return array if kind == "array" else array[()]
    (kind, value), = node.items()
    if kind == "none":
        return None
    if kind in ("bool", "int", "float", "str"):
        return value
    if kind == "array":
        return arrays[value]
    if kind == "scalar":
        return arrays[value][()]
    if kind in ("list", "tuple"):
        items = [_decode(v, arrays) for v in value]
        return items if kind == "list" else tuple(items)
    if kind == "dict":
        return {_decode(k, arrays): _decode(v, arrays) for k, v in value}
    raise ValueError(f"unknown node {kind!r}")


def write_arrays(handle: IO[bytes], meta: dict, tree: dict[str, Any]) -> None:
    """Write ``meta`` (plain JSON) and ``tree`` (values as :func:`_encode` takes, e.g. lists
    of arrays) as a zip archive of ``.npy`` files and a JSON manifest: no pickle anywhere.
    Raises :class:`CheckpointError` naming the entry that cannot be stored, before any byte
    of the archive is written."""
    arrays: list[np.ndarray] = []
    encoded = {key: _encode(value, arrays, key) for key, value in tree.items()}
    manifest = json.dumps({**meta, "tree": encoded, "arrays": len(arrays)}, allow_nan=True)
    with zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for i, array in enumerate(arrays):
            with archive.open(f"arrays/{i}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asarray(array), allow_pickle=False)
        archive.writestr(MANIFEST, manifest)


def read_arrays(path: str, archive: zipfile.ZipFile) -> tuple[dict, dict[str, Any]]:
    """Read what :func:`write_arrays` wrote: ``(meta, tree)``, arrays loaded with
    ``allow_pickle=False`` (an array of Python objects is refused as unsafe)."""
    try:
        manifest = json.loads(archive.read(MANIFEST))
        arrays = []
        for i in range(int(manifest.pop("arrays"))):
            with archive.open(f"arrays/{i}.npy") as member:
                arrays.append(np.lib.format.read_array(member, allow_pickle=False))
    except ValueError as err:
        if "allow_pickle" in str(err):
            raise _not_safe(path, f"array {len(arrays)} holds pickled Python objects") from err
        raise CheckpointError(f"checkpoint {path!r} is corrupted: {err}; it was not loaded") from err
    except KeyError as err:
        raise CheckpointError(f"checkpoint {path!r} is incomplete: {err}; it was not loaded") from err
    tree = manifest.pop("tree")
    try:
        decoded = {key: _decode(node, arrays) for key, node in tree.items()}
    except (ValueError, IndexError, AttributeError, TypeError) as err:
        raise CheckpointError(f"checkpoint {path!r} has a corrupted manifest: {err}; it was not loaded") from err
    return manifest, decoded
