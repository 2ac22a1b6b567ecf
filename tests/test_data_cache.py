"""Cache claims (gptlab.data.cache): one builder at a time per entry, a dead holder's claim taken over."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest

from gptlab.data.cache import claim


def test_claims_exclude_each_other(tmp_path: Path):
    path = tmp_path / "claims" / "x.claim"
    inside: list[int] = []
    overlaps: list[int] = []

    def work(i: int) -> None:
        with claim(path, what="x", heartbeat=0.05, poll=0.01):
            if inside:
                overlaps.append(i)
            inside.append(i)
            time.sleep(0.05)
            inside.remove(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not overlaps and not inside
    assert not path.exists()  # released by the last holder


def test_a_live_holder_is_waited_for_and_a_dead_one_taken_over(tmp_path: Path):
    path = tmp_path / "x.claim"
    released = threading.Event()

    def hold() -> None:
        # Holds three times longer than stale_after, but its heartbeat keeps the claim alive.
        with claim(path, what="x", heartbeat=0.05):
            time.sleep(0.6)
            released.set()

    holder = threading.Thread(target=hold)
    holder.start()
    time.sleep(0.1)
    with claim(path, what="x", stale_after=0.2, poll=0.01):
        assert released.is_set()
    holder.join()

    # A claim left by a killed process (no heartbeat): taken over after stale_after.
    path.write_text("somewhere 12345\n")
    start = time.monotonic()
    with claim(path, what="x", stale_after=0.3, poll=0.01):
        assert path.read_text() != "somewhere 12345\n"
    assert 0.3 <= time.monotonic() - start < 5


def test_a_read_only_cache_needs_no_claim(tmp_path: Path):
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o555)
    try:
        if os.access(cache, os.W_OK):  # root: make the claims folder a file instead
            cache.chmod(0o755)
            (cache / "claims").write_text("")
        with claim(cache / "claims" / "x.claim", what="x"):
            ran = True
        assert ran
    finally:
        cache.chmod(0o755)


def test_a_claim_without_waiting_refuses_a_live_holder_and_takes_over_a_dead_or_copied_one(tmp_path: Path):
    import shutil
    import subprocess
    import sys

    from gptlab.data.cache import ClaimHeld

    path = tmp_path / "x.claim"
    with claim(path, what="x", wait=False):
        with pytest.raises(ClaimHeld, match=f"process {os.getpid()} on "):
            with claim(path, what="x", wait=False):
                pass
        shutil.copy(path, tmp_path / "copy.claim")  # a copied folder: nobody holds the copy
        with claim(tmp_path / "copy.claim", what="x", wait=False):
            pass
    # A holder that died on this host: taken over at once, also by a waiting claim.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for wait in (False, True):
        path.write_text(f"{socket.gethostname()} {dead.pid} {os.path.realpath(path)}\n")
        start = time.monotonic()
        with claim(path, what="x", wait=wait, stale_after=60):
            assert str(os.getpid()) in path.read_text()
        assert time.monotonic() - start < 5


@pytest.mark.parametrize("wait", [True, False])
def test_a_directory_where_a_claim_file_should_be_is_one_line(tmp_path: Path, wait: bool):
    """It was a wait of 120 s then IsADirectoryError (wait=True), or 'held by another process'."""
    from gptlab.errors import ConfigError

    path = tmp_path / "claims" / "x.claim"
    (path / "inside").mkdir(parents=True)
    start = time.monotonic()
    with pytest.raises(
        ConfigError, match=rf"{path} is a directory, where gptlab keeps the claim file .* move it away"
    ):
        with claim(path, what="the data of X", stale_after=0.5, poll=0.01, wait=wait):
            pass
    assert time.monotonic() - start < 0.5  # at once, not after a take-over
    assert (path / "inside").is_dir()  # nothing removed
