"""reftkit's on-disk cache: where it lives, and how a folder is written into it once.

A conversion is written to a temporary sibling and renamed into place under an advisory lock, so
an interrupted run never leaves a half-written folder and concurrent processes convert once.
Standard library only: importing this touches nothing on disk.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Iterator


def embedded_cache_dir() -> Path:
    """Root of reftkit's on-disk cache.

    ``$REFTKIT_CACHE`` if set, else ``$XDG_CACHE_HOME/reftkit``, else
    ``~/.cache/reftkit``.  The directory is *not* created here; it is created
    lazily when a conversion is written.
    """
    explicit = os.environ.get("REFTKIT_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "reftkit"


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Advisory inter-process lock (no-op where ``fcntl`` is unavailable)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            log(f"waiting for another process to finish converting ({path}) ...")
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def remove_stale_tmp(parent: Path, max_age_seconds: float) -> None:
    """Delete leftovers of interrupted conversions older than a few hours."""
    now = time.time()
    for entry in parent.glob(".tmp-*"):
        try:
            if now - entry.stat().st_mtime > max_age_seconds:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            pass


def make_readable(folder: Path) -> None:
    """``mkdtemp`` and some writers create private (0700/0600) entries; a cache is shared."""
    for path in [folder, *folder.rglob("*")]:
        try:
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        except OSError:  # pragma: no cover - e.g. not the owner
            pass


def log(message: str) -> None:
    print(f"[reftkit] {message}", file=sys.stderr, flush=True)
