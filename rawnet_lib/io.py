"""Atomic file writes: a reader (or a resumed run) never sees a half-written file; and the
fingerprint that tells results of a rewritten file (a checkpoint, a trial list) from its own.

Each writer goes to a temporary file in the target's folder (`.<name>.<random>.tmp`, which no
`*.wav` glob picks up), flushes it to disk, then `os.replace`s it over the target, which is
atomic on POSIX file systems. :func:`atomic_path` does the same for files an external program
(ffmpeg, sox) writes.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import threading
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

from rawnet_lib.errors import WorkbookError

__all__ = ["atomic_open", "atomic_path", "atomic_write_text", "atomic_write_bytes", "atomic_torch_save",
           "check_output", "OutputExistsError"]


class OutputExistsError(WorkbookError, FileExistsError):
    """A command's output would replace an existing file (never one of its inputs)."""


def check_output(path: str | Path, overwrite: bool, inputs: Iterable[str | Path] = (),
                 flag: str = "--overwrite") -> Path:
    """Before the work: refuse to write `path` over one of the command's inputs, ever, or over an
    existing file unless `overwrite` (the command's `flag`) says so."""
    path = Path(path)
    for given in inputs:
        if Path(given).exists() and path.exists() and path.resolve() == Path(given).resolve():
            raise OutputExistsError(f"{path} is also an input of this command; write the output elsewhere")
    if path.is_dir():  # a file cannot replace a folder, and --overwrite must never delete one
        raise OutputExistsError(f"{path} is a folder; give the output a file name (e.g. {path / 'out'}.<ext>)")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} exists; give another output path, or {flag} to replace it")
    return path


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary sibling of `path` for writing; it replaces `path` only on success."""
    with atomic_path(path) as tmp, open(tmp, mode, encoding=None if "b" in mode else "utf-8") as handle:
        yield handle


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary sibling of `path` for a program to write; it is flushed to disk and replaces
    `path` when the block ends without an exception, and is deleted when the block raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results should read like any new file
    try:
        yield tmp
        _fsync(tmp)  # else a crash soon after the rename can leave `path` empty on some file systems
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process umask; reading it means setting it, so threads (convert's pool) take turns."""
    with _UMASK_LOCK:
        mask = os.umask(0)
        os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_open(path, "w") as handle:
        handle.write(text)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path, "wb") as handle:
        handle.write(data)


_fingerprints: dict[tuple[str, int, int], str] = {}


def file_sha1(path: str | Path) -> str:
    """Full SHA-1 of the file's bytes (memoised per size and mtime): a rewritten file always
    invalidates, a copied or touched one does not."""
    path = Path(path)
    stat = path.stat()
    memo = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if memo not in _fingerprints:
        digest = hashlib.sha1()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
        _fingerprints[memo] = digest.hexdigest()
    return _fingerprints[memo]


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    import torch
    with atomic_open(path, "wb") as handle:
        torch.save(obj, handle)
