"""One writer per output directory.

A lock file inside the output, held with flock(2) for the run's whole life: the kernel drops
the lock when its process dies however it dies (kill -9, OOM killer, power loss on a local
disk), so a lock file left behind by a killed run is stale by construction and --resume takes
it over. The file names its owner (pid, host, start time, command) for the message the second
run prints. On network filesystems flock is as good as the server's lock support (NFSv4 maps it
onto byte-range locks).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from ablation.errors import AblationError

LOG = logging.getLogger(__name__)

LOCK = ".ablation.lock"


@contextlib.contextmanager
def hold(out: Path) -> Iterator[None]:
    """Create `out` if needed and hold its lock until the block ends; an output directory
    this created and left empty (a run that stopped at a check) is removed again."""
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AblationError(f"output {out}: cannot create ({exc.strerror})") from exc
    path = out / LOCK
    fd = _acquire(path, out)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # unlinked while still held: no one can lock it in between
        os.close(fd)
        if created and not any(out.iterdir()):
            out.rmdir()


def _acquire(path: Path, out: Path) -> int:
    for _ in range(100):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            raise AblationError(
                f"output {out}: cannot create its lock file ({exc.strerror})"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _describe(_read_owner(fd))
            os.close(fd)
            raise AblationError(
                f"output {out} is being written by another run ({owner}); wait for it to "
                "finish, or choose another output"
            ) from None
        except OSError as exc:
            os.close(fd)
            raise AblationError(f"output {out}: cannot lock ({exc.strerror})") from exc
        # a finishing owner unlinks the file before it lets go: the inode we locked must still
        # be the one at the path, or a third run could lock a new file beside us
        try:
            current = os.stat(path, follow_symlinks=False).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            break
        os.close(fd)
    else:
        raise AblationError(f"output {out}: its lock file keeps changing; is a run looping on it?")
    stale = _read_owner(fd)
    if stale:
        LOG.warning(
            "output %s: taking over the lock of a run that no longer holds it (%s)",
            out,
            _describe(stale),
        )
    owner = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(sys.argv)[:500],
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(owner).encode(), 0)
    return fd


def _read_owner(fd: int) -> dict:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _describe(owner: dict) -> str:
    if not owner:
        return "owner unknown"
    return (
        f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}, "
        f"started {owner.get('started', '?')}"
    )
