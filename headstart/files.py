"""Files that appear whole or not at all: written under a temporary name, then renamed into place."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_UMASK = os.umask(0o022)
os.umask(_UMASK)


def atomic_path(final: Path) -> Path:
    """A temporary path beside `final`, renamed over it only when complete."""
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".partial")
    os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp's 0600 would outlive the rename: files get the usual mode
    os.close(fd)
    return Path(tmp)


@contextmanager
def atomic_write(final: Path) -> Iterator[Path]:
    """Yield a temporary path to write; it replaces `final` only when the block completes."""
    tmp = atomic_path(final)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
