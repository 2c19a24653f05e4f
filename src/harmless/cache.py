"""Where ``harmless`` keeps fetched data and trained models, and how it writes files.

Files are always written atomically: to a temporary file in the destination folder, then
``os.replace``d into place, so a reader never sees half a file and an interrupted run
leaves the old file (or none) behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

CACHE_ENV = "HARMLESS_CACHE"


def cache_dir(*parts: str) -> Path:
    """The cache folder (``$HARMLESS_CACHE``, else ``~/.cache/harmless``), created on demand."""
    root = os.environ.get(CACHE_ENV)
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "harmless"
    path = base.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    With ``overwrite=False`` an existing ``path`` raises :class:`FileExistsError` before
    anything is written.
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise FileExistsError(f"refusing to overwrite existing file {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates 0600 files; give the result the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def require_file_path(path: str | os.PathLike[str], *, what: str = "output file") -> Path:
    """``path`` as a :class:`Path`, refused with an :class:`InputError` when it is an existing
    folder: writing a file there would otherwise fail deep inside an atomic write with a
    message about something else (``FileExistsError``, ``IsADirectoryError``)."""
    from harmless.errors import InputError

    path = Path(path)
    if path.is_dir():
        raise InputError(f"{what} {path} is a directory; give a file path (e.g. {path / 'name'})")
    return path


def require_folder_path(path: str | os.PathLike[str], *, what: str = "output folder") -> Path:
    """``path`` as a :class:`Path`, refused with an :class:`InputError` when it exists and is
    not a folder (files are written into it)."""
    from harmless.errors import InputError

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{what} {path} is an existing file, not a folder; give a folder path")
    return path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically and return the path."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
