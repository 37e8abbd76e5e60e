"""The one path layer: every file msf_jax reads or writes goes through here (`etils.epath`).

Paths are strings: local (`runs/x`, `~/x`) or object-store URLs (`gs://bucket/run`). Local paths are
made absolute; URLs pass through unchanged (never `os.path.abspath`'d), so orbax, TensorBoard and
TFRecord writers receive them as the user wrote them.

Object stores have no atomic rename, so finished outputs are marked by a COMMIT MARKER: the file is
written first, then a small `<name>.committed` file last. Readers that resume work (`is_committed`)
trust only committed files; on an object store a file without its marker (a writer killed midway)
is redone. Locally the file is written to `<name>.tmp` and renamed into place, which is atomic, so
there a file under its final name is complete and needs no marker (none is written: local run
directories hold only their outputs).
"""

from __future__ import annotations

import builtins
import contextlib
import glob as _glob
import json
import os
import tempfile
from typing import Any, Iterator

from etils import epath

MARKER_SUFFIX = ".committed"


def is_remote(path: str | os.PathLike) -> bool:
    """True for URLs such as gs://bucket/x (anything with a scheme)."""
    return "://" in os.fspath(path)


def abspath(path: str | os.PathLike) -> str:
    """Local: absolute, `~` expanded. URLs: unchanged."""
    path = os.fspath(path)
    return path if is_remote(path) else os.path.abspath(os.path.expanduser(path))


def join(base: str | os.PathLike, *parts: str) -> str:
    """os.path.join that keeps `gs://` intact."""
    base = os.fspath(base)
    if not is_remote(base):
        return os.path.join(base, *parts)
    return "/".join([base.rstrip("/")] + [p.strip("/") for p in parts if p])


def dirname(path: str) -> str:
    return os.path.dirname(os.fspath(path).rstrip("/"))


def basename(path: str) -> str:
    return os.path.basename(os.fspath(path).rstrip("/"))


def path(p: str | os.PathLike) -> epath.Path:
    return epath.Path(abspath(p))


def exists(p: str | os.PathLike) -> bool:
    return path(p).exists()


def isdir(p: str | os.PathLike) -> bool:
    return path(p).is_dir()


def makedirs(p: str | os.PathLike) -> str:
    path(p).mkdir(parents=True, exist_ok=True)
    return os.fspath(p)


def glob(pattern: str) -> list[str]:
    """Sorted matches of a pattern (`*` in the last component) in a local or remote directory."""
    if not is_remote(pattern):
        return sorted(_glob.glob(os.path.expanduser(pattern)))
    parent, name = pattern.rsplit("/", 1)
    return sorted(f"{parent}/{p.name}" for p in epath.Path(parent).glob(name))


def listdir(p: str) -> list[str]:
    return sorted(c.name for c in path(p).iterdir()) if isdir(p) else []


def remove(p: str) -> None:
    q = path(p)
    if q.exists():
        q.unlink()


def open(p: str | os.PathLike, mode: str = "r"):  # noqa: A001  (mirrors builtins.open)
    """A file object (seekable for reading, also on gs://)."""
    if "w" in mode or "a" in mode:
        makedirs(dirname(abspath(p)) or ".")
    return path(p).open(mode)


def read_text(p: str) -> str:
    return path(p).read_text()


def read_json(p: str) -> Any:
    return json.loads(read_text(p))


def mtime(p: str) -> float:
    return path(p).stat().mtime


# ----------------------------------------------------------------------------------------------
# Commit markers.


def marker(p: str) -> str:
    return os.fspath(p) + MARKER_SUFFIX


def is_committed(p: str) -> bool:
    """Finished: its commit marker exists (object stores), or it exists under its final local name."""
    if is_remote(p):
        return exists(marker(p)) and exists(p)
    return exists(p)


def uncommit(p: str) -> None:
    """Drops `p`'s commit marker (the file itself stays until it is overwritten), so a rewrite is never
    mistaken for a finished one: remotely `is_committed` needs the marker."""
    remove(marker(p))


@contextlib.contextmanager
def committed(p: str, unique: bool = False) -> Iterator[str]:
    """Yields a LOCAL filename to write `p`'s content to; on success it becomes `p` (then, remotely, the marker).

    Local: `p.tmp` (`p.tmp.<pid>` with `unique`, for files several hosts may write at once) renamed
    onto `p`; a killed or failed writer leaves only the `.tmp`. Remote: a local temporary file
    uploaded to `p`. An old marker is removed first, so a rewrite never counts as done early.
    """
    p = abspath(p)
    uncommit(p)
    remote = is_remote(p)
    if remote:
        fd, tmp = tempfile.mkstemp(prefix="msf_jax_", suffix="_" + basename(p))
        os.close(fd)
    else:
        os.makedirs(os.path.dirname(p) or ".", exist_ok=True)
        tmp = f"{p}.tmp.{os.getpid()}" if unique else p + ".tmp"
    try:
        yield tmp
        if remote:
            makedirs(dirname(p))
            epath.Path(tmp).copy(epath.Path(p), overwrite=True)
            with path(marker(p)).open("w") as f:
                json.dump({"committed": basename(p)}, f)  # deterministic: reruns give identical directories
        else:
            os.replace(tmp, p)  # the commit, locally
    finally:
        if remote and os.path.exists(tmp):
            os.remove(tmp)


def write_committed_bytes(p: str, data: bytes, unique: bool = False) -> str:
    with committed(p, unique) as tmp, builtins.open(tmp, "wb") as f:
        f.write(data)
    return p


def write_committed_text(p: str, text: str, unique: bool = False) -> str:
    return write_committed_bytes(p, text.encode(), unique)


def write_committed_json(p: str, obj: Any, indent: int | None = 1, unique: bool = False, **kwargs) -> str:
    return write_committed_bytes(p, json.dumps(obj, indent=indent, **kwargs).encode(), unique)


def _is_temporary(name: str) -> bool:
    """A local writer's `<name>.tmp` / `<name>.tmp.<pid>` (see `committed`)."""
    stem, _, last = name.rpartition(".")
    return last == "tmp" or (last.isdigit() and stem.endswith(".tmp"))


def committed_names(directory: str, suffix: str = "") -> list[str]:
    """Sorted names of the committed files in `directory` ending in `suffix`, from one listing.

    Remote: those whose commit marker is listed too (a file without one is a killed writer's);
    local: every file except writers' temporaries. A missing directory holds none.
    """
    names = listdir(directory)
    if is_remote(directory):
        listed = set(names)
        names = [n for n in names if not n.endswith(MARKER_SUFFIX) and marker(n) in listed]
    else:
        local = abspath(directory)
        names = [n for n in names if not _is_temporary(n) and os.path.isfile(os.path.join(local, n))]
    return [n for n in names if n.endswith(suffix)]


def copy_to_local(p: str, local_dir: str) -> str:
    """A local copy of a (remote) file, for libraries that only read local names; local: `p` itself."""
    if not is_remote(p):
        return abspath(p)
    dst = os.path.join(local_dir, basename(p))
    epath.Path(p).copy(epath.Path(dst), overwrite=True)
    return dst
