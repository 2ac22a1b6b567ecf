"""Checkpoints that survive a kill: atomic writes, stale-file cleanup, and choosing what to resume.

    save (rank 0)        checkpoints/.last.ckpt.tmp-<pid>-<hex>  --torch.save, fsync-->
                         os.replace(tmp, last.ckpt), fsync(checkpoints/)
    sharded save (FSDP)  checkpoints/last.ckpt.step-<N>-<hex>/   every rank writes its shards, rank 0
                         meta.pt; barrier; rank 0 writes COMPLETE, then swaps the symlink
                         last.ckpt -> last.ckpt.step-<N>-<hex> (os.replace of a new link)
    fit start            orphans of a killed save (.*.tmp-<pid>-<hex>, step folders without
                         COMPLETE) are removed from the run's checkpoint folders, with a warning
    fit --ckpt_path last newest run of the experiment that saved anything; its last.ckpt when
                         complete, else its newest complete checkpoint by global_step (warning),
                         else a CheckpointError. Never another run's file.

Why not Lightning's own writer: `TorchCheckpointIO.save_checkpoint` calls
`lightning.fabric.utilities.cloud_io._atomic_save`, which writes through an fsspec transaction.
For local paths fsspec's `LocalFileOpener` stages the bytes in `tempfile.mkstemp()` (i.e. $TMPDIR)
and commits with `shutil.move` (fsspec/implementations/local.py). When $TMPDIR is another
filesystem than the run directory (tmpfs, node-local disk on a cluster), that move is a *copy*
into the final name: a kill during the copy leaves a truncated `last.ckpt` in place of the good
one, and a kill before the commit leaves an orphan in $TMPDIR. Nothing is fsynced either, so a
power loss after the rename can expose a zero-filled file. Staging next to the target makes the
final `os.replace` a rename within one directory, which POSIX makes atomic.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import secrets
import shutil
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn

from gptlab._lightning import (
    METADATA_FILENAME,
    WrappingCheckpointIO,
    configured_checkpoint_io,
    set_wrapped_checkpoint_io,
)
from gptlab.errors import CheckpointError

__all__ = [
    "AtomicCheckpointIO",
    "StaleCheckpointCleanup",
    "atomic_write",
    "checkpoint_problem",
    "install_atomic_checkpoints",
    "remove_stale",
    "repoint_checkpoint_state",
    "require_complete",
    "resume_checkpoint",
]

# `.last.ckpt.tmp-<pid>-<8 hex>`: hidden, never ends in `.ckpt`, so no glob for checkpoints sees it.
_TEMP = re.compile(r"\..+\.tmp-\d+-[0-9a-f]{8}")
# `last.ckpt.step-<N>-<8 hex>`: one folder per sharded save (the hex tells two saves at one step apart).
_STEP_FOLDER = re.compile(r"(?P<name>.+)\.step-(?P<step>\d+)-[0-9a-f]{8}")
# Written by rank 0 into a sharded folder after every rank finished: the folder is complete.
COMPLETE = "COMPLETE"


# --------------------------------------------------------------------------------- atomic writes
def temp_name(path: Path) -> Path:
    """A hidden name next to `path` for staging it, unique to this process and call."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (the directory entry is data of the directory)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def staged(path: Path) -> Iterator[Path]:
    """Yield a temp name beside `path` to build the new entry at; then rename it onto `path`.

    On any exception, KeyboardInterrupt and SystemExit included, the temp entry is removed and
    the exception goes on; after the rename the folder is fsynced.
    """
    tmp = temp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write `path` through `write(file)` so that readers see the old content or the new, never a part.

    The bytes go to a hidden temp file in the same folder, are fsynced, and replace `path` with one
    rename; the folder is fsynced after it. On any exception, KeyboardInterrupt and SystemExit
    included, the temp file is removed and the exception goes on. (SIGKILL runs no handler: its
    temp file stays and is removed at the next fit start, see `remove_stale`.)
    """
    path = Path(path)
    with staged(path) as tmp, open(tmp, "xb") as file:
        write(file)
        file.flush()
        os.fsync(file.fileno())


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's `TorchCheckpointIO`, saving atomically inside the checkpoint folder (see module doc).

    Installed by gptlab's CLI for every strategy that writes through a CheckpointIO (single device,
    DDP, full-state FSDP); a CheckpointIO given in `trainer.plugins` or to the strategy is kept.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options (local files only)")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Serialised in memory first (as Lightning's own writer does): torch's zip writer turns a
        # failed file write into "RuntimeError: unexpected pos", while a plain write of the bytes
        # raises the OSError (ENOSPC, EDQUOT, EFBIG) that says the disk is full.
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write(path, lambda file: file.write(buffer.getbuffer()))

    def remove_checkpoint(self, path: str | Path) -> None:
        # A sharded checkpoint is a link to its step folder: remove both (fsspec's recursive rm
        # would refuse to rmtree a link).
        if Path(path).is_symlink():
            remove_sharded(Path(path))
        else:
            super().remove_checkpoint(path)


# ------------------------------------------------------------------------- sharded checkpoints
def step_folders(path: Path) -> list[Path]:
    """The per-step folders written for checkpoint `path` (`<name>.step-<N>-<hex>`), complete or not."""
    if not path.parent.is_dir():
        return []
    return [
        p
        for p in path.parent.iterdir()
        if p.is_dir() and (m := _STEP_FOLDER.fullmatch(p.name)) and m["name"] == path.name
    ]


def new_step_folder(path: Path, step: int, token: str) -> Path:
    """Where a sharded save of `path` at `step` writes (`token` is shared by all ranks)."""
    return path.with_name(f"{path.name}.step-{step}-{token}")


def mark_complete(folder: Path, global_step: int, world_size: int) -> None:
    """Rank 0, after every rank wrote its shards: the folder now counts as a checkpoint."""
    record = json.dumps({"global_step": global_step, "world_size": world_size}).encode()
    atomic_write(folder / COMPLETE, lambda file: file.write(record))


def point_to(path: Path, folder: Path) -> None:
    """Make `path` a link to `folder` in one rename, then remove the older step folders of `path`."""
    with staged(path) as tmp:
        os.symlink(folder.name, tmp)  # relative: the run directory can be moved
        if path.is_dir() and not path.is_symlink():
            # A folder written in place by an older gptlab (or plain Lightning): replaced once.
            shutil.rmtree(path)
    for old in step_folders(path):
        if old != folder:
            shutil.rmtree(old, ignore_errors=True)


def remove_sharded(path: Path) -> None:
    """Remove a sharded checkpoint link and every step folder of its name."""
    path.unlink()
    for folder in step_folders(path):
        shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------------------- stale temp files
def remove_stale(folder: str | Path) -> list[Path]:
    """Remove what killed saves left in `folder`; return what was removed.

    Only gptlab's own leftovers, recognised by their names: hidden temp files and links
    `.<name>.tmp-<pid>-<hex>`, and step folders `<name>.step-<N>-<hex>` with no COMPLETE marker
    that no link points to. Nothing else in the folder is touched.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    linked = {(folder / os.readlink(p)).resolve() for p in folder.iterdir() if p.is_symlink()}
    removed = []
    for entry in sorted(folder.iterdir()):
        if _TEMP.fullmatch(entry.name) and (entry.is_symlink() or entry.is_file()):
            entry.unlink()
        elif (
            _STEP_FOLDER.fullmatch(entry.name)
            and entry.is_dir()
            and not entry.is_symlink()
            and not (entry / COMPLETE).is_file()
            and entry.resolve() not in linked
        ):
            shutil.rmtree(entry)
        else:
            continue
        removed.append(entry)
    return removed


class StaleCheckpointCleanup(Callback):
    """At fit start, removes the leftovers of killed saves from the checkpoint folders (rank 0)."""

    def on_fit_start(self, trainer: Trainer, pl_module: Any) -> None:
        if not trainer.is_global_zero:
            return
        # ModelCheckpoint resolves its dirpath in its own `setup` (<run>/checkpoints by default).
        folders = {cb.dirpath for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)}
        for folder in sorted(folders):
            removed = remove_stale(folder)
            if removed:
                rank_zero_warn(
                    f"gptlab: removed {len(removed)} unfinished checkpoint file(s) left by an interrupted "
                    f"save in {folder}: {', '.join(p.name for p in removed)}"
                )


def install_atomic_checkpoints(trainer: Trainer) -> None:
    """Give `trainer` the atomic CheckpointIO (unless one was configured) and the stale-file cleanup."""
    strategy = trainer.strategy
    # `Strategy.checkpoint_io` creates a TorchCheckpointIO on first access when none was given
    # (lightning/pytorch/strategies/strategy.py), so the private slot tells "configured" apart.
    # A plain TorchCheckpointIO is Lightning's default and is replaced too.
    io = configured_checkpoint_io(strategy)
    if isinstance(io, WrappingCheckpointIO):  # e.g. AsyncCheckpointIO: ours underneath
        if io.checkpoint_io is None or type(io.checkpoint_io) is TorchCheckpointIO:
            set_wrapped_checkpoint_io(io, AtomicCheckpointIO())
    elif io is None or type(io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
    if not any(isinstance(cb, StaleCheckpointCleanup) for cb in trainer.callbacks):
        trainer.callbacks.append(StaleCheckpointCleanup())


# ------------------------------------------------------------------- ModelCheckpoint's state
def repoint_checkpoint_state(state: dict[str, Any], dirpath: str | Path) -> dict[str, Any]:
    """ModelCheckpoint's saved state, its file names moved from the recorded folder to `dirpath`.

    ModelCheckpoint records its folder as a string and keeps its state (best score, best /
    last file names) only when that string equals today's (lightning's
    `ModelCheckpoint.load_state_dict`): a run resumed through a relative instead of an absolute
    path, or moved or copied, counts as a new folder, and the version counter then writes
    `last-v1.ckpt` / `best-v1.ckpt` beside the run's own, stale, files (docs/design.md 6.4).
    A recorded file that exists under its name in `dirpath` is the run's own file there: the
    state is re-pointed to it. When none of them is there (a new folder), the state is returned
    as it is, and Lightning starts its ranking afresh.
    """
    recorded = state.get("dirpath")
    if recorded is None or str(recorded) == str(dirpath):
        return state
    folder = Path(dirpath)

    def moved(path: str | None) -> str:
        if not path or Path(path).parent != Path(recorded):
            return ""
        here = folder / Path(path).name
        return str(here) if here.exists() or here.is_symlink() else ""

    best_k = {moved(p): score for p, score in (state.get("best_k_models") or {}).items()}
    best_k.pop("", None)
    paths = {k: moved(state.get(k)) for k in ("best_model_path", "kth_best_model_path", "last_model_path")}
    if not best_k and not any(paths.values()):
        return state
    return {**state, **paths, "best_k_models": best_k, "dirpath": str(dirpath)}


# --------------------------------------------------------------------------- complete or not
def _is_legacy_sharded(path: Path) -> bool:
    # A folder written in place (gptlab before step folders, or Lightning itself): meta.pt is its
    # last file. Accepted so that older runs stay loadable; there is no way to check it further.
    return (
        path.is_dir()
        and not path.is_symlink()
        and not _STEP_FOLDER.fullmatch(path.name)
        and ((path / METADATA_FILENAME).is_file())
    )


def checkpoint_problem(path: str | Path) -> str | None:
    """Why `path` is not a complete checkpoint (a short phrase), or None when it is complete.

    A file must be a whole zip archive (torch.save's format writes the central directory last, so
    a cut-off file has none) holding a `data.pkl`; a sharded folder must carry the COMPLETE marker.
    Cheap: reads the zip directory, never the tensors. Saves are fsynced before their rename, so a
    file that is whole in length is whole in content.
    """
    path = Path(path)
    if path.is_symlink() and not path.exists():
        return f"a link to {os.readlink(path)}, which does not exist"
    if path.is_dir():
        if (path / COMPLETE).is_file() or _is_legacy_sharded(path):
            return None
        if not any(path.iterdir()):
            return "an empty folder, not a checkpoint (a .ckpt file, or a sharded checkpoint folder)"
        if not any(
            p.name in (".metadata", METADATA_FILENAME) or p.suffix == ".distcp" for p in path.iterdir()
        ):
            return "a folder without checkpoint files (a .ckpt file, or a sharded folder with .metadata)"
        return f"a sharded checkpoint folder without its {COMPLETE} marker (its save was cut off)"
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size == 0:
        return "empty (0 bytes)"
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return f"truncated or not a torch checkpoint ({size} bytes, no zip directory at its end)"
    if not any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
        return f"not a torch checkpoint ({size} bytes, no data.pkl inside)"
    return None


def require_complete(path: str | Path) -> None:
    """Raise a CheckpointError naming `path` when it exists but is incomplete (for `--ckpt_path`)."""
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return  # a missing file is reported where it is opened
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(
            f"--ckpt_path {path} is {problem}: it cannot be loaded and was left as it is; use another "
            f"checkpoint in {path.parent}, or `--ckpt_path last` for the newest complete one of that run"
        )


def global_step(path: Path) -> int:
    """The training step a complete checkpoint was saved at (read cheaply: mmap, weights_only)."""
    target = path.resolve() if path.is_symlink() else path
    if (target / COMPLETE).is_file():
        return int(json.loads((target / COMPLETE).read_text())["global_step"])
    meta = target / METADATA_FILENAME if target.is_dir() else target
    checkpoint = torch.load(meta, map_location="cpu", weights_only=True, mmap=True)
    return int(checkpoint.get("global_step", -1))


# ------------------------------------------------------------------------------- what to resume
def _candidates(folder: Path) -> list[Path]:
    """Every checkpoint-like entry of a checkpoint folder: `*.ckpt` files, links, folders, step folders."""
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.iterdir()
        if not _TEMP.fullmatch(p.name) and (p.name.endswith(".ckpt") or _STEP_FOLDER.fullmatch(p.name))
    )


def _version(run: Path) -> int:
    suffix = run.name.split("_")[-1]
    return int(suffix) if suffix.isdigit() else -1


def resume_checkpoint(logs: str | Path, experiment: str, name: str = "last.ckpt") -> Path | None:
    """The checkpoint `fit --ckpt_path last` resumes: the newest complete one of the experiment's latest run.

    The run is the newest `logs/<experiment>/version_*` whose `checkpoints/` holds any checkpoint
    (complete or not); a run that never saved one is passed over, as there is nothing of it to
    resume. In that run: `name` when complete; otherwise the complete checkpoint with the highest
    global_step (a warning names what was skipped and why); if none is complete, a CheckpointError.
    Older runs are never used once a newer one has saved something. None when no run saved anything.
    """
    runs = sorted((Path(logs) / experiment).glob("version_*"), key=_version, reverse=True)
    for run in runs:
        folder = run / "checkpoints"
        candidates = _candidates(folder)
        if not candidates:
            continue
        preferred = folder / name
        problem = checkpoint_problem(preferred)
        if problem is None:
            return preferred
        problems = {p.name: checkpoint_problem(p) for p in candidates}
        steps = {}
        for p in candidates:
            if problems[p.name] is None:
                try:
                    steps[p.name] = global_step(p)
                except Exception as err:  # complete in length but unreadable: say why, skip it
                    problems[p.name] = f"unreadable ({type(err).__name__}: {str(err).splitlines()[0][:120]})"
        complete = [p for p in candidates if problems[p.name] is None]
        if not complete:
            listing = "; ".join(f"{n}: {why}" for n, why in problems.items())
            raise CheckpointError(
                f"--ckpt_path last: {folder} holds no complete checkpoint ({listing}); resume from a "
                f"checkpoint you trust with --ckpt_path <file>, or move {run} away to start a new run"
            )
        # Highest step wins; on a tie the newer file (e.g. last over best at the same step).
        chosen = max(complete, key=lambda p: (steps[p.name], p.lstat().st_mtime))
        rank_zero_warn(
            f"gptlab: skipped {preferred} ({problem}); resuming from {chosen.name} "
            f"(global step {steps[chosen.name]}), the newest complete checkpoint of {run.name}"
        )
        return chosen
    return None
