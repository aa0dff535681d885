"""File-system helpers over fsspec: every path may be local or a URL (s3://, gs://, ...).

Writes are atomic. On a local file system a file is written under a temporary name in the same folder and then
renamed over the target (``os.replace``), so a killed process never leaves a truncated file at the final name.
On an object store a file is written to a local temporary file first and uploaded only when the block completed
(an upload, single or multipart, becomes visible only when it completes): an exception or a kill mid-write
leaves nothing under the final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

TMP_MARK = ".tmp-"
SCRATCH_PREFIX = "winnow-scratch-"  # local staging files and folders in the temporary folder
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]
_TAG = re.compile(r"([0-9a-f]{6})-(\d+)-")


def _tag() -> str:
    """``<host hash>-<pid>-<random>``: who wrote a temporary file, so a later run can tell a dead writer's
    leftovers from a live one's."""
    return f"{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def temp_path(path: str) -> str:
    """The name a file is written under before it is renamed to ``path`` (:func:`sweep_stale` knows it)."""
    return f"{path}{TMP_MARK}{_tag()}"


def scratch_dir(what: str, base: str | None = None) -> str:
    """A new private local folder for work in progress (in ``base``, else the temporary folder), named so that
    :func:`sweep_stale` removes it once its process is gone. The caller removes it when done."""
    if base is None:
        return tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{_tag()}-{what}-")
    os.makedirs(base, exist_ok=True)
    return tempfile.mkdtemp(prefix=f"{_tag()}-{what}-", dir=base)


def _gone(name: str) -> bool:
    """True when a temporary name's writer tag names a process of this machine that has ended (a name without a
    tag was written by an older version: gone too); False for live processes and other machines'."""
    m = _TAG.match(name)
    if m is None:
        return True
    if m.group(1) != _HOST:
        return False
    pid = int(m.group(2))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def sweep_stale(folder: str | None = None) -> int:
    """Remove what killed processes of this machine left behind: half-written files (``name.tmp-<tag>``) under the
    local ``folder``, and staging files and folders in the temporary folder. Returns how many were removed."""

    removed = 0
    if folder and is_local(folder) and os.path.isdir(get_fs(folder)[1]):
        for root, dirs, files in os.walk(get_fs(folder)[1]):
            for name in files + dirs:
                _, mark, tag = name.partition(TMP_MARK)
                if mark and _gone(tag):
                    shutil.rmtree(os.path.join(root, name), ignore_errors=True) if name in dirs else \
                        _unlink(os.path.join(root, name))
                    removed += 1
    tmp = tempfile.gettempdir()
    for name in os.listdir(tmp):
        if name.startswith(SCRATCH_PREFIX) and _gone(name[len(SCRATCH_PREFIX):]):
            path = os.path.join(tmp, name)
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else _unlink(path)
            removed += 1
    return removed


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def get_fs(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The file system and its path for ``path``. Object-store listings are never taken from a cache: other
    processes (the workers) write while this one reads."""
    fs, p = fsspec.core.url_to_fs(str(path))
    if not isinstance(fs, LocalFileSystem):
        fs.invalidate_cache()
    return fs, p


def absolute(path: str, only_existing: bool = False) -> str:
    """``path`` made absolute when it is a local path (URLs and "" unchanged): workers started in another folder,
    or on another machine, must see the same file. ``only_existing``: for values that may also be a name (an
    open_clip tag, a recipe name), only a path that exists here is changed."""
    path = str(path)
    if not path or "://" in path or os.path.isabs(path):
        return path
    if only_existing and not os.path.exists(os.path.expanduser(path)):
        return path
    return os.path.abspath(os.path.expanduser(path))


def is_local(path: str) -> bool:
    return isinstance(get_fs(path)[0], LocalFileSystem)


def join(base: str, *parts: str) -> str:
    base = str(base).rstrip("/")
    return "/".join([base, *parts])


def exists(path: str) -> bool:
    fs, p = get_fs(path)
    return fs.exists(p)


def makedirs(path: str) -> None:
    fs, p = get_fs(path)
    fs.makedirs(p, exist_ok=True)


def size(path: str) -> int:
    fs, p = get_fs(path)
    return int(fs.size(p))


def listdir(path: str) -> list[str]:
    """Base names of the entries of folder ``path`` (empty if it does not exist)."""
    fs, p = get_fs(path)
    if not fs.exists(p):
        return []
    return sorted(os.path.basename(e.rstrip("/")) for e in fs.ls(p, detail=False))


def glob(pattern: str) -> list[str]:
    """Sorted matches of ``pattern``, as URLs when it is one."""
    fs, p = get_fs(pattern)
    found = sorted(fs.glob(p))
    return found if isinstance(fs, LocalFileSystem) else [fs.unstrip_protocol(f) for f in found]


def isdir(path: str) -> bool:
    fs, p = get_fs(path)
    return fs.isdir(p)


def local_copy(path: str) -> str:
    """A local file with ``path``'s bytes: ``path`` itself when local, else a download cached in the temporary
    folder under the URL's hash and the object's size (for readers that need a file name, such as torch.load)."""
    if is_local(path):
        return path
    fs, p = get_fs(path)
    info = fs.info(p)
    key = hashlib.sha256(f"{path}\n{info.get('size')}\n{info.get('ETag', info.get('mtime', ''))}".encode())
    local = os.path.join(tempfile.gettempdir(), "winnow-cache", key.hexdigest()[:24] + os.path.splitext(p)[1])
    if not os.path.exists(local):
        with atomic_open(local, "wb") as f, fs.open(p, "rb") as src:
            while chunk := src.read(1 << 24):
                f.write(chunk)
    return local


def remove(path: str) -> None:
    fs, p = get_fs(path)
    if fs.exists(p):
        fs.rm(p, recursive=True)


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb", fsync: bool = True) -> Iterator[IO[Any]]:
    """Open ``path`` for writing; the file appears at ``path`` only if the block completes.

    ``fsync=False`` skips flushing to disk before the rename: still safe against a killed process, not against
    a power cut. Use it for many small files that can be regenerated.
    """
    if "w" not in mode:
        raise ValueError("atomic_open is for writing")
    fs, p = get_fs(path)
    if isinstance(fs, LocalFileSystem):
        os.makedirs(os.path.dirname(p) or ".", exist_ok=True)
        tmp = temp_path(p)
        try:
            with open(tmp, mode) as f:
                yield f
                f.flush()
                if fsync:
                    os.fsync(f.fileno())
            os.replace(tmp, p)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    else:
        fd, tmp = tempfile.mkstemp(prefix=f"{SCRATCH_PREFIX}{_tag()}-upload-")
        try:
            with os.fdopen(fd, mode) as f:
                yield f
            fs.put_file(tmp, p)
        finally:
            os.remove(tmp)


def atomic_move(src_local: str, dst: str) -> None:
    """Move a finished local file to ``dst`` (rename when local, upload then delete when remote)."""
    fs, p = get_fs(dst)
    if isinstance(fs, LocalFileSystem):
        os.makedirs(os.path.dirname(p) or ".", exist_ok=True)
        os.replace(src_local, p)
    else:
        fs.put_file(src_local, p)
        os.remove(src_local)


def write_bytes(path: str, data: bytes, fsync: bool = True) -> None:
    with atomic_open(path, "wb", fsync=fsync) as f:
        f.write(data)


def write_json(path: str, obj: Any) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def read_json(path: str) -> Any:
    fs, p = get_fs(path)
    with fs.open(p, "rb") as f:
        return json.load(f)


@contextlib.contextmanager
def open_read(path: str, mode: str = "rb") -> Iterator[IO[Any]]:
    """A file object for reading ``path``, local or remote (for readers such as pyarrow's that take one)."""
    fs, p = get_fs(path)
    with fs.open(p, mode) as f:
        yield f


def read_bytes(path: str) -> bytes:
    fs, p = get_fs(path)
    with fs.open(p, "rb") as f:
        return f.read()


def load_npy(path: str, what: str, mmap: bool = False):
    """A numeric ``.npy`` array, never unpickled: object arrays, other formats and damaged files are one
    UserError line naming ``what``. ``mmap``: memory-mapped read-only (an object store's file is copied to the
    local cache first)."""

    import numpy as np

    from winnow.pipeline.core.errors import UserError

    fs, p = get_fs(path)
    if not fs.exists(p):
        raise UserError(f"{what}: file not found")
    source = local_copy(path).removeprefix("file://") if mmap else None
    with (contextlib.nullcontext(source) if mmap else fs.open(p, "rb")) as f:
        try:
            arr = np.load(f, allow_pickle=False, mmap_mode="r" if mmap else None)
        except ValueError as exc:
            why = "it holds Python objects (pickled), which are never loaded" if "allow_pickle" in str(exc) \
                else " ".join(str(exc).split())[:160]
            raise UserError(f"{what} is not a plain .npy array: {why}") from None
        except (OSError, EOFError) as exc:
            raise UserError(f"{what} is not a readable .npy file ({type(exc).__name__})") from None
    if not isinstance(arr, np.ndarray) or arr.dtype.hasobject:
        raise UserError(f"{what} is not a plain numeric .npy array")
    return arr


def fingerprint(path: str, chunk: int = 1 << 22) -> str:
    """Content fingerprint of a file: ``sha256:<hex>`` of its bytes (streamed)."""
    fs, p = get_fs(path)
    h = hashlib.sha256()
    with fs.open(p, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return f"sha256:{h.hexdigest()}"
