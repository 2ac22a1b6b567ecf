"""One builder per cache entry across processes and nodes that share a cache directory.

    node 0: claim(key) ──won──> build (temp name + rename) ──> release
    node 1: claim(key) ──taken──> wait while the claim's heartbeat moves ──> released: claim again,
                                                                          find the entry built

Lightning runs `prepare_data` on local rank 0 of every node. When the nodes share `cache_dir` (a
cluster filesystem), both would train the same tokenizer and tokenize the same corpus at once.
A claim is a file created with O_CREAT | O_EXCL (atomic on local filesystems, NFSv3+, Lustre,
GPFS): its creator builds while the others wait, then find the entry complete. The holder
touches the file every `heartbeat` seconds; a claim whose modification time has not moved for
`stale_after` seconds of the waiter's own clock (no comparison across clocks) is the leftover of
a killed process and is taken over. Entries are still written under temporary names and renamed
into place, so a filesystem without atomic exclusive create falls back to "built twice, one
atomic winner", never to a half-written entry.

The claim file says who holds it (`<host> <pid> <its own path>`): on the holder's host a dead pid
is taken over at once, and a claim file whose recorded path is not its own is a copy (a copied
run folder) that nobody holds. `claim(..., wait=False)` does not wait: a live holder raises
`ClaimHeld` (how a second `fit` of the same run folder is refused, gptlab.runs.hold_run).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_info

from gptlab.errors import ConfigError

__all__ = ["ClaimHeld", "claim"]

HEARTBEAT = 5.0  # seconds between the holder's touches of its claim
# Seconds without a touch after which a claim is taken over: above NFS's longest default
# attribute caching (acregmax, 60 s), during which a waiter may see an old modification time.
STALE_AFTER = 120.0


class ClaimHeld(Exception):
    """A claim asked for without waiting is held by a live process (`holder`: its host and pid)."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(f"{path} is held by {holder}")
        self.path, self.holder = path, holder


def _try_create(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as file:
        # Who holds it, and where: a copy of the file (a copied folder) is nobody's claim.
        file.write(f"{socket.gethostname()} {os.getpid()} {os.path.realpath(path)}\n")
    return True


def _holder(path: Path) -> tuple[str, int, str] | None:
    """(host, pid, recorded path) of a claim file; None when it is gone or not in that format."""
    try:
        fields = path.read_text().split(maxsplit=2)
    except (FileNotFoundError, IsADirectoryError, UnicodeDecodeError):
        return None
    if len(fields) < 2 or not fields[1].isdigit():
        return None
    return fields[0], int(fields[1]), fields[2].strip() if len(fields) > 2 else ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _holder_gone(path: Path) -> bool:
    """Known to be held by nobody: a copy of a claim file, or its holder's pid is dead on this host."""
    holder = _holder(path)
    if holder is None:
        return False
    host, pid, recorded = holder
    if recorded and recorded != os.path.realpath(path):
        return True
    return host == socket.gethostname() and not _pid_alive(pid)


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return None


def _take_over(path: Path, seen: float) -> None:
    """Remove a stale claim, unless it changed since it was judged stale (then it is alive)."""
    # Renamed to a unique name first: of several waiters judging the same claim stale, only one
    # rename succeeds, and a fresh claim created meanwhile is not the file that gets removed.
    doomed = path.with_name(f"{path.name}.stale-{socket.gethostname()}-{os.getpid()}")
    try:
        os.rename(path, doomed)
    except FileNotFoundError:
        return
    if _mtime(doomed) != seen:  # a new holder's claim: give it back
        try:
            os.link(doomed, path)
        except FileExistsError:
            pass
    doomed.unlink(missing_ok=True)


@contextmanager
def claim(
    path: str | Path,
    what: str,
    heartbeat: float = HEARTBEAT,
    stale_after: float = STALE_AFTER,
    poll: float = 0.2,
    wait: bool = True,
) -> Iterator[None]:
    """Hold the claim file `path` while the body runs; wait while another process holds it.

    The body runs in every process, one at a time: the first builds the entry, the next ones find
    it built (their own cache check) and return at once. `what` names the entry in the message a
    waiting process prints. With `wait=False` a claim held by a live process raises `ClaimHeld`
    at once; on another host "live" means touched within `stale_after` seconds by this host's clock.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        writable = os.access(path.parent, os.W_OK)  # False on a read-only mount, also for root
    except OSError:
        writable = False
    if not writable:
        # A read-only cache (prepared beforehand) needs no turns; a build into it fails on its own.
        yield
        return
    if path.is_dir() or (path.exists() and not path.is_file()):
        # No claim file could ever be made there: waiting would last forever (or until a take-over
        # that cannot remove a directory).
        raise ConfigError(
            f"{path} is a {'directory' if path.is_dir() else 'special file'}, where gptlab keeps the claim "
            f"file that lets one process at a time prepare {what}; nothing of gptlab's is in it: move it away"
        )
    announced = False
    seen, since = None, time.monotonic()
    while not _try_create(path):
        mtime = _mtime(path)
        if mtime is not None and _holder_gone(path):
            _take_over(path, mtime)
            continue
        if not wait:
            if mtime is not None and time.time() - mtime <= stale_after:
                holder = _holder(path)
                raise ClaimHeld(path, f"process {holder[1]} on {holder[0]}" if holder else "another process")
            if mtime is not None:
                _take_over(path, mtime)
            continue
        if mtime != seen:  # released, or the holder's heartbeat: it is alive
            seen, since = mtime, time.monotonic()
        elif mtime is not None and time.monotonic() - since > stale_after:
            rank_zero_info(f"gptlab: taking over {path}: its holder stopped {stale_after:.0f}s ago")
            _take_over(path, mtime)
        if not announced:
            rank_zero_info(f"gptlab: waiting for another process to prepare {what} ({path})")
            announced = True
        time.sleep(poll)
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(heartbeat):
            try:
                os.utime(path)
            except FileNotFoundError:  # taken over by a waiter that judged us dead
                return

    thread = threading.Thread(target=beat, name="gptlab-cache-claim", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        path.unlink(missing_ok=True)
