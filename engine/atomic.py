"""Atomic file writes and the temporary files they leave: the one writer every engine file goes through.

Owns: :func:`atomic_write` (temporary file next to the target, ``fsync``,
``os.replace``, folder ``fsync``), :func:`atomic_write_text`, :func:`fsync_dir`,
the temporary-file name ``.<name>.<pid>.<8 hex digits>.tmp`` (:func:`temp_target`
reads it back, with the names older versions used) and
:func:`remove_stale_temp_files`, which deletes what killed writes left behind.

Checkpoints, denoiser weights, exports, configs and ``metrics.jsonl`` are all
written here; their callers turn an ``OSError`` into their own one-line error.
Imports no torch (``engine.config`` uses it).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import time
from pathlib import Path
from typing import BinaryIO, Iterator, Optional

__all__ = ["atomic_write", "atomic_write_text", "fsync_dir", "temp_target", "remove_stale_temp_files"]

#: The temporary file of :func:`atomic_write`: ``.<name>.<pid>.<8 hex>.tmp``.
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")
#: Temporary files of older versions: denoiser weight saves (``.<name>.pt.<pid>.tmp``) and the
#: trainer's ``last.<ext>`` copies (``last.pt.tmp``, no process id).
_OLD_WEIGHTS_TEMP = re.compile(r"^\.(?P<name>.+\.(?:pt|pth|safetensors))\.(?P<pid>\d+)\.tmp$")
_OLD_LATEST_TEMP = re.compile(r"^(?P<name>last\.(?:pt|safetensors))\.tmp$")

#: When this module was imported: no temporary file of this process is older.
_PROCESS_STARTED = time.time()


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open a temporary file next to ``path`` for binary writing; on success it replaces ``path``.

    Usage::

        with atomic_write(target) as fh:
            fh.write(data)

    On leaving the block the file is flushed and ``fsync``-ed, then moved onto
    ``path`` with ``os.replace`` (atomic on POSIX and Windows), and the folder
    is ``fsync``-ed where that is possible. If the block raises, the temporary
    file is removed and ``path`` is untouched. A process killed inside the
    block leaves ``path`` as it was (and its temporary file, which
    :func:`remove_stale_temp_files` deletes later). The new file gets the usual
    permissions (``0o666`` minus the umask). The folder must exist.
    """
    path = Path(path)
    tmp = _temp_path(path)
    try:
        with open(tmp, "xb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` through :func:`atomic_write`; raises ``OSError`` on failure."""
    with atomic_write(path) as fh:
        fh.write(text.encode(encoding))


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename in ``folder`` durable (POSIX); a no-op where folders cannot be opened."""
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _parse_temp_name(name: str) -> Optional[tuple[str, Optional[int]]]:
    match = _TEMP.match(name) or _OLD_WEIGHTS_TEMP.match(name)
    if match is not None:
        return match.group("name"), int(match.group("pid"))
    match = _OLD_LATEST_TEMP.match(name)
    return (match.group("name"), None) if match is not None else None


def temp_target(name: str) -> Optional[str]:
    """The name of the file a temporary file named ``name`` was written for, or None.

    Recognises this module's names (``.checkpoint_000200.pt.4242.0123abcd.tmp``
    -> ``checkpoint_000200.pt``) and those older versions wrote
    (``.weights.pt.4242.tmp`` -> ``weights.pt``, ``last.pt.tmp`` -> ``last.pt``);
    any other name gives None.
    """
    parsed = _parse_temp_name(name)
    return parsed[0] if parsed is not None else None


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` (other than this one) may still be running; True when unknown."""
    if os.name != "posix":
        return False  # no safe probe (os.kill(pid, 0) would interrupt it on Windows): rely on the age
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete temporary files that killed saves left in ``folder``; returns the paths removed.

    Only files named as this project's writers name them are considered
    (``.<name>.<pid>.<8 hex digits>.tmp`` from :func:`atomic_write`, and from
    older versions ``.<name>.pt.<pid>.tmp`` of denoiser weight saves and
    ``last.pt.tmp`` / ``last.safetensors.tmp`` of ``last.<ext>`` copies), only
    plain files (not links or folders), and only those last modified before this
    process started whose writer, where the name records it, is no longer
    running: a save in progress in this or another process is never touched,
    nor is any other file of the user's. Files that cannot be removed are skipped.
    """
    folder = Path(folder)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        parsed = _parse_temp_name(entry.name)
        if parsed is None:
            continue
        try:
            if entry.is_symlink() or not entry.is_file(follow_symlinks=False):
                continue
            if entry.stat(follow_symlinks=False).st_mtime >= _PROCESS_STARTED:
                continue  # written since this process started: possibly a save in progress
            pid = parsed[1]
            if pid is not None and pid != os.getpid() and _pid_alive(pid):
                continue  # its writer may still be running
            os.unlink(entry.path)
            removed.append(Path(entry.path))
        except (OSError, ValueError):
            continue
    return removed
