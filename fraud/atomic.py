"""Writing files and folders so that readers see the old version or the new one, never half of one.

A file is written to a temporary name in the target's folder, flushed to disk and renamed over the
target (`os.replace`, atomic on POSIX within one file system); a folder is built under a temporary
name and swapped in. A failure on the way removes the temporary and leaves the target untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def replacing(target: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A fresh temporary path next to `target` to write to; renamed over `target` when the block ends
    without an exception, removed when it raises."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
    os.close(fd)
    temp = Path(name)
    try:
        yield temp
        with open(temp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def write_text(target: Path, text: str) -> None:
    """Replace `target` with `text` atomically."""
    with replacing(target) as temp:
        temp.write_text(text)


def write_json(target: Path, payload: Any, **dumps: Any) -> None:
    """Replace `target` with `payload` as JSON (`dumps` go to `json.dumps`, e.g. indent) atomically."""
    write_text(target, json.dumps(payload, **dumps))


def replace_dir(staging: Path, target: Path) -> Path:
    """Move the completely written folder `staging` to `target`, replacing what was there; if the move
    fails, the previous `target` is put back."""
    staging, target = Path(staging), Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        os.replace(staging, target)  # also replaces an empty directory
        return target
    trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, trash / target.name)
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(trash / target.name, target)
        shutil.rmtree(trash, ignore_errors=True)
        raise
    shutil.rmtree(trash, ignore_errors=True)
    return target
