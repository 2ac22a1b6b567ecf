"""Where data modules read from: files named by globs, records in files, Hugging Face datasets.

Shared by every data module (text, classification, token classification, SFT): expanding
`*_files` patterns (`expand_files`), reading one record per line / item / row (`read_records`),
loading a hub dataset or a `save_to_disk` directory and finding its splits by role
(`load_dataset_dict`, `splits_by_role`, `load_dataset_splits`).
"""

from __future__ import annotations

import json
import os
import sysconfig
from collections.abc import Iterator
from glob import glob
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from gptlab.data.base import DataError

if TYPE_CHECKING:
    import datasets  # imported where a dataset is read (start-up time)


# Names under which Hugging Face datasets usually publish their validation split.
VALIDATION_SPLITS = ("validation", "valid", "val", "dev")


def expand_files(patterns: str | list[str], what: str) -> list[Path]:
    """Files named by `patterns`: paths or globs (`**` recurses), each sorted, duplicates dropped.

    A pattern may start with `{stdlib}`, the directory of the Python standard library's source
    (`sysconfig.get_paths()["stdlib"]`), which every Python installation ships: a corpus found on
    any machine with no download. `what` names the argument in error messages.
    """
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    stdlib = sysconfig.get_paths()["stdlib"]
    files: dict[Path, None] = {}  # an ordered set
    problems = []
    for pattern in patterns:
        expanded = os.path.expanduser(
            pattern.replace("{stdlib}", stdlib, 1) if pattern.startswith("{stdlib}") else pattern
        )
        if not any(c in expanded for c in "*?[") and Path(expanded).is_dir():
            problems.append(f"{what}: {pattern!r} is a directory; name its files, e.g. '{pattern}/**/*.txt'")
            continue
        matches = [Path(p) for p in sorted(glob(expanded, recursive=True)) if Path(p).is_file()]
        if not matches:
            where = "" if Path(expanded).is_absolute() else f" (relative to {os.getcwd()})"
            problems.append(f"{what}: no file matches {pattern!r}{where}; check the path or glob")
        files.update(dict.fromkeys(p.resolve() for p in matches))
    if problems:
        raise DataError("\n".join(problems))
    return list(files)


def files_fingerprint(files: list[Path]) -> list[tuple[str, int, int]]:
    # Size and mtime stand in for the contents: cheap on every rank and for large corpora.
    return [(str(p), (s := p.stat()).st_size, s.st_mtime_ns) for p in files]


def is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def read_records(path: Path) -> Iterator[tuple[str, Any]]:
    """(location, record) for each record of a .jsonl / .json / .parquet file, or each line of a .txt."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    yield f"{path} line {number}", line.rstrip("\r\n")
        return
    if suffix == ".parquet":
        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as err:
            raise DataError(f"{path}: not a readable Parquet file ({err})") from None
        for i, row in enumerate(table.to_pylist()):
            yield f"{path} row {i}", row
        return
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 ({err.reason} at byte {err.start})") from None
    if suffix == ".json":
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None  # not one document: read it as JSON lines below
        if isinstance(whole, list):
            for i, record in enumerate(whole):
                yield f"{path} item {i}", record
            return
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path} line {number}: not valid JSON ({err.msg} at column {err.colno})"
            ) from None
        yield f"{path} line {number}", record


def load_dataset_dict(dataset: str, dataset_config: str | None) -> datasets.DatasetDict:
    """`dataset` (a hub name, or a `save_to_disk` directory) loaded as a DatasetDict (one split: train)."""
    import datasets

    path = Path(dataset).expanduser()
    # A path-like name that does not exist is a typo, not a hub name (spares the hub's retries).
    if dataset.startswith(("/", ".", "~")) and not path.exists():
        raise DataError(
            f"dataset={dataset!r}: no such directory; give a save_to_disk directory or a hub name"
        )
    try:
        if is_saved_dataset(path):
            loaded = datasets.load_from_disk(str(path))
        else:
            loaded = datasets.load_dataset(dataset, dataset_config)
    except (OSError, ValueError) as err:
        raise DataError(f"dataset={dataset!r}: cannot load it ({err})") from None
    if not isinstance(loaded, datasets.DatasetDict):
        loaded = datasets.DatasetDict({"train": loaded})
    return loaded


def splits_by_role(loaded: datasets.DatasetDict) -> dict[str, datasets.Dataset]:
    """The splits of `loaded` by role: train, val (the first of VALIDATION_SPLITS), test."""
    splits = {}
    for role, names in (("train", ("train",)), ("val", VALIDATION_SPLITS), ("test", ("test",))):
        name = next((n for n in names if n in loaded), None)
        if name is not None:
            splits[role] = loaded[name]
    return splits


def load_dataset_splits(dataset: str, dataset_config: str | None) -> dict[str, datasets.Dataset]:
    """A `datasets` dataset's splits by role: train, and val / test when it has them."""
    return splits_by_role(load_dataset_dict(dataset, dataset_config))
