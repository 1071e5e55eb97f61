"""Copying folders to and from the object store that pipeline tasks share.

A pipeline task on a cluster is its own pod: what one task writes to its disk, the next never
sees. Tables that outlive a task (the Feast offline feature tables) live in an S3-compatible
object store (`s3://bucket/prefix`, MinIO, or any fsspec URL such as `gs://`) or, in the embedded
single-machine mode, in a local folder.

Endpoint and credentials are the SDK's standard settings, which the pipeline sets from
Kubernetes secrets: `AWS_ENDPOINT_URL` (MinIO or another S3-compatible server),
`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import fsspec

from fraud import atomic
from fraud.errors import UserError


def is_remote(uri: str) -> bool:
    """True for an object-store URL (s3://, gs://, ...), False for a local path or file:// URL."""
    return "://" in uri and not uri.startswith("file://")


def _local(uri: str) -> Path:
    return Path(uri.removeprefix("file://"))


def _filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        return fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as exc:
        raise UserError(f"cannot open {uri}: {exc}") from None


def put_folder(local_dir: Path, uri: str) -> list[str]:
    """Copy the files of `local_dir` (not recursive) to the folder `uri`; return the names copied."""
    names = sorted(p.name for p in Path(local_dir).iterdir() if p.is_file() and not p.name.startswith("."))
    if not names:
        raise UserError(f"nothing to copy: {local_dir} has no files")
    if not is_remote(uri):
        target = _local(uri)
        if target.resolve() == Path(local_dir).resolve():
            return names
        target.mkdir(parents=True, exist_ok=True)
        for name in names:
            with atomic.replacing(target / name) as staged:
                shutil.copy2(Path(local_dir) / name, staged)
        return names
    fs, root = _filesystem(uri)
    try:
        for name in names:
            fs.put_file(str(Path(local_dir) / name), f"{root.rstrip('/')}/{name}")
    except OSError as exc:
        raise UserError(f"cannot write to {uri}: {exc}") from None
    return names


def get_folder(uri: str, local_dir: Path, names: list[str] | tuple[str, ...]) -> Path:
    """Copy the files `names` of the folder `uri` into `local_dir`; a missing file is a UserError."""
    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    if not is_remote(uri):
        source = _local(uri)
        for name in names:
            if not (source / name).is_file():
                raise UserError(f"{source / name} does not exist")
            if (source / name).resolve() != (local_dir / name).resolve():
                shutil.copy2(source / name, local_dir / name)
        return local_dir
    fs, root = _filesystem(uri)
    fs.invalidate_cache(root)  # fsspec keeps listings per process; the folder may have been rewritten
    for name in names:
        remote = f"{root.rstrip('/')}/{name}"
        try:
            if not fs.exists(remote):
                raise UserError(f"{uri.rstrip('/')}/{name} does not exist")
            fs.get_file(remote, str(local_dir / name))
        except OSError as exc:
            raise UserError(f"cannot read {uri.rstrip('/')}/{name}: {exc}") from None
    return local_dir
