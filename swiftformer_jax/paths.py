"""Paths: a local path or a `gs://` URL, through one API (`etils.epath`) for every file the package
reads or writes; orbax (tensorstore) does the same for checkpoint arrays.

Cloud Storage goes through gcsfs (`EPATH_USE_TF=false`, set here unless the user set it): the
client that the tests run against a GCS API (`gcp-storage-emulator`, see tests/gcs.py), where
TensorFlow's own GCS client cannot be pointed at an emulator. An object upload is atomic on GCS
(readers see the old object or the new one), so `publish` renames locally and uploads remotely;
directories are implicit there, so `mkdir` is a no-op and nothing checks a parent exists.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator

os.environ.setdefault("EPATH_USE_TF", "false")

from etils import epath  # noqa: E402

REMOTE_SCHEMES = ("gs://",)


def is_remote(path: str | os.PathLike) -> bool:
    return str(path).startswith(REMOTE_SCHEMES)


def path(value: str | os.PathLike) -> epath.Path:
    """An epath.Path: `gs://...` as given; a local path with `~` expanded, made absolute."""
    text = os.fspath(value)
    if is_remote(text):
        return epath.Path(text)
    return epath.Path(os.path.abspath(os.path.expanduser(text)))


def exists(value: str | os.PathLike) -> bool:
    return path(value).exists()


def parent_exists(value: str | os.PathLike) -> bool:
    """Whether a new file or directory can be made at `value` without making parents (always on
    GCS, where directories are implicit)."""
    return is_remote(value) or path(value).parent.is_dir()


def mkdir(value: str | os.PathLike) -> None:
    """Make a directory and its parents (nothing to make on GCS)."""
    if not is_remote(value):
        path(value).mkdir(parents=True, exist_ok=True)


def publish(local_file: str | os.PathLike, destination: str | os.PathLike) -> None:
    """Put a finished local file at `destination` all at once: a rename (same filesystem), or one
    upload to GCS. The local file is gone afterwards either way."""
    if is_remote(destination):
        try:
            with open(local_file, "rb") as source, path(destination).open("wb") as target:
                shutil.copyfileobj(source, target, 1 << 24)
        finally:
            os.remove(local_file)
    else:
        os.replace(local_file, destination)


def scratch_file(destination: str | os.PathLike) -> str:
    """A new empty local file to write `destination`'s content into before `publish`: a hidden
    sibling for a local destination (so the rename is atomic), a system temp file for GCS."""
    name = path(destination).name
    directory = None if is_remote(destination) else os.fspath(path(destination).parent)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    os.close(descriptor)
    set_default_mode(temporary, 0o666)  # the mode a plain open() would give the final file
    return temporary


def write_bytes_atomically(destination: str | os.PathLike, data: bytes) -> None:
    """Write `destination` in one piece: readers (and a kill) see the old content or the new."""
    if is_remote(destination):
        path(destination).write_bytes(data)  # one object upload
        return
    temporary = scratch_file(destination)
    try:
        with open(temporary, "wb") as out:
            out.write(data)
        os.replace(temporary, destination)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


@contextlib.contextmanager
def local_copy(value: str | os.PathLike) -> Iterator[str]:
    """A local filename holding `value`'s bytes, for readers that need one (torch.load,
    safetensors): the file itself when local, else a temporary download removed afterwards."""
    if not is_remote(value):
        yield os.fspath(path(value))
        return
    source = path(value)
    descriptor, temporary = tempfile.mkstemp(prefix=".download.", suffix=source.suffix)
    try:
        with os.fdopen(descriptor, "wb") as out, source.open("rb") as handle:
            shutil.copyfileobj(handle, out, 1 << 24)
        yield temporary
    finally:
        os.remove(temporary)


def set_default_mode(value: str | os.PathLike, mode: int) -> None:
    """Give a tempfile-made local path (created 0700 / 0600) the mode a plain open/mkdir would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(value, mode & ~umask)


def rename_dir(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move a directory: an atomic rename locally; on GCS a copy of every object, then a delete
    (not atomic: callers on GCS rename only what no reader takes for a checkpoint mid-move)."""
    if is_remote(source) != is_remote(target):
        raise ValueError(f"cannot move {source} to {target}: one is local, the other remote")
    if not is_remote(source):
        os.rename(source, target)
        return
    import fsspec

    fs = fsspec.filesystem("gs")
    # Copy and delete, as every bucket allows (gcsfs's `mv` first tries the objects.moveTo API).
    fs.copy(os.fspath(source), os.fspath(target), recursive=True)
    fs.rm(os.fspath(source), recursive=True)
