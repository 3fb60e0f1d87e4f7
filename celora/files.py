"""Writes that a crash or a racing process can never leave half done: a file, or a folder, published by a rename."""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)  # makes the rename itself durable
        finally:
            os.close(fd)
    except OSError:
        pass  # some network file systems cannot fsync a directory; the rename is still atomic


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path` (named by this process), fsync it, rename it over `path`, fsync
    the directory. A crash at any point leaves either the old file or the new one, never a mix; of two
    processes writing the same path, the last rename wins whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_folder(target: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` fills a temporary folder beside `target`, which is then renamed to `target`. If another
    process published `target` first, its folder stays and this one is dropped (same content by contract)."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    write(tmp)
    try:
        tmp.rename(target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    _fsync_dir(target.parent)
