"""Where data modules read from, and how what they read is checked (docs/design.md §4.4).

Shared by every data module (text, classification, token classification, SFT):

    expand_files       `*_files` patterns -> files (globs, `{stdlib}`), every bad pattern in one error
    read_records       one record per line / item / row of .txt / .jsonl / .json / .parquet
    read_table         rows of csv / tsv / jsonl / json / parquet with the columns a module needs
    load_dataset_dict  a hub dataset or a `save_to_disk` directory; `splits_by_role` finds its
                       train / val / test splits
    check_text_files   text files are UTF-8 text; JSON / Parquet records hold a string column
    held_out           the seeded share of the training examples held out for validation
    Problems           collects what is wrong with the data, then raises one DataError listing it

Locations ("<file> line N", "<file> row N", "<file> item N") travel with every record, so that an
error names the file and line it is about.
"""

from __future__ import annotations

import codecs
import csv
import json
import os
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from glob import glob
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from lightning.pytorch.utilities import rank_zero_info

from gptlab.errors import DataError

if TYPE_CHECKING:
    import datasets  # imported where a dataset is read (start-up time)


# Names under which Hugging Face datasets usually publish their validation split.
VALIDATION_SPLITS = ("validation", "valid", "val", "dev")
TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")
MAX_PROBLEMS = 5  # listed in one error; the rest are counted (the message stays readable)
MAX_PROBLEM_CHARS = 240  # one problem's text at most

Files = str | list[str] | None  # a `*_files` argument: a path or glob, a list of them, or none


# ----------------------------------------------------------------------------- problems
def shorten_problem(text: str, limit: int = MAX_PROBLEM_CHARS) -> str:
    """`text` cut to `limit` characters, marking the cut."""
    return text if len(text) <= limit else text[: limit - 5] + " ..."


class Problems:
    """Collects what is wrong with the input data, then raises one DataError listing it.

    The message: "<what>: N problem(s)<about>:" and the first MAX_PROBLEMS problems, one per
    line, each shortened, then "... and K <more>"; a `hint` (what to do) may follow.
    """

    def __init__(self, what: str, more: str = "more", about: str = "") -> None:
        self.what = what
        self.more = more
        self.about = about
        self.items: list[str] = []

    def add(self, message: str) -> None:
        self.items.append(message)

    def raise_if_any(self, hint: str = "") -> None:
        if not self.items:
            return
        count = len(self.items) - MAX_PROBLEMS
        listed = [shorten_problem(p) for p in self.items[:MAX_PROBLEMS]]
        listed += [f"... and {count} {self.more}"] if count > 0 else []
        raise DataError(
            f"{self.what}: {len(self.items)} problem(s){self.about}:\n  "
            + "\n  ".join(listed)
            + (f"\n{hint}" if hint else "")
        )


# ----------------------------------------------------------------------------- files and records
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
    yield from json_lines(path, text.splitlines())


def json_lines(path: Path, lines: Iterable[str]) -> Iterator[tuple[str, Any]]:
    """("<path> line N", record) for each non-blank line of a JSON-lines file; a broken line fails."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path} line {number}: not valid JSON ({err.msg} at column {err.colno})"
            ) from None
        yield f"{path} line {number}", record


# ----------------------------------------------------------------------------- text files
def file_kind(path: Path) -> Literal["text", "json", "parquet"]:
    """How a document file is read: .json / .jsonl as JSON records, .parquet as Parquet, else as text."""
    suffix = path.suffix.lower()
    if suffix in (".json", ".jsonl"):
        return "json"
    return "parquet" if suffix == ".parquet" else "text"


def _check_utf8(path: Path) -> tuple[str | None, bool]:
    """(problem or None, whether the file holds any non-whitespace text)."""
    # Incremental decoding in 1 MiB chunks: constant memory, and the byte offset of a bad byte.
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, content = 0, False
    with path.open("rb") as f:
        while True:
            chunk = f.read(1 << 20)
            pending = len(decoder.getstate()[0])  # bytes of a character cut by the last chunk
            try:
                text = decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as err:
                byte = offset - pending + err.start
                return (
                    f"{path}: not UTF-8 at byte {byte} ({err.reason}); re-encode it as UTF-8, "
                    f"e.g. `iconv -f latin1 -t utf-8`",
                    content,
                )
            content = content or bool(text.strip())
            if not chunk:
                return None, content
            offset += len(chunk)


def _check_json_records(
    records: Iterator[tuple[str, Any]], path: Path, column: str
) -> tuple[list[str], bool]:
    problems, content = [], False
    for where, record in records:
        if len(problems) >= 3:  # the first few say what is wrong with the whole file
            problems.append(f"{path}: (further problems in this file not listed)")
            break
        if not isinstance(record, dict):
            problems.append(f"{where}: expected a JSON object, got {type(record).__name__}")
        elif column not in record:
            keys = ", ".join(map(repr, record)) or "none"
            problems.append(f"{where}: no key {column!r} (keys: {keys}); set text_column to the text's key")
        elif not isinstance(record[column], str | None):
            problems.append(f"{where}: {column!r} is a {type(record[column]).__name__}, not a string")
        else:
            content = content or bool((record[column] or "").strip())
    return problems, content


def _check_json(path: Path, column: str) -> tuple[list[str], bool]:
    """Every record of a JSON-lines file (or a JSON array) is an object with a string `column`."""
    if path.suffix.lower() == ".json":
        # A .json file may be one array of records rather than JSON lines; datasets reads both.
        try:
            whole = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            whole = None
        if isinstance(whole, list):
            return _check_json_records(((f"{path} item {i}", r) for i, r in enumerate(whole)), path, column)
        if isinstance(whole, dict) and "\n" in path.read_text(encoding="utf-8").strip():
            # One pretty-printed object: as JSON lines, its first line would be reported as broken.
            return [f"{path}: one JSON object; expected JSON lines or an array of records"], False
    try:
        with path.open(encoding="utf-8") as f:  # streamed: a corpus file may be large
            return _check_json_records(json_lines(path, f), path, column)
    except DataError as err:
        return [str(err)], False


def _check_parquet(path: Path, column: str) -> tuple[list[str], bool]:
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as err:
        return [f"{path}: not a readable Parquet file ({err})"], False
    if column not in schema.names:
        names = ", ".join(map(repr, schema.names))
        return [
            f"{path}: no column {column!r} (columns: {names}); set text_column to the text's column"
        ], False
    if not (
        pa.types.is_string(schema.field(column).type) or pa.types.is_large_string(schema.field(column).type)
    ):
        return [f"{path}: column {column!r} has type {schema.field(column).type}, not string"], False
    values = pq.read_table(path, columns=[column]).column(column)
    lengths = pc.utf8_length(pc.utf8_trim_whitespace(values))
    return [], bool(pc.max(lengths).as_py() or 0)


def _nul_problem(path: Path) -> str | None:
    """A NUL byte is valid UTF-8 but never in text: the file is binary (an archive, weights, ...)."""
    offset = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            if (at := chunk.find(b"\0")) >= 0:
                return f"{path}: a NUL byte at byte {offset + at}: a binary file, not text; give text files"
            offset += len(chunk)
    return None


def check_text_files(files: list[Path], text_column: str, what: str) -> list[Path]:
    """The files of `files` that hold text, after checking all of them; one DataError lists every problem.

    A file with nothing but whitespace is skipped (a corpus of source code has many empty
    `__init__.py`); it is an error only when no file holds text.
    """
    problems = Problems(what, more="more problems", about=" with the input files")
    kept, empty = [], []
    for path in files:
        kind = file_kind(path)
        if kind == "parquet":
            found, content = _check_parquet(path, text_column)
        else:
            problem, content = _check_utf8(path)
            problem = problem or _nul_problem(path)
            found = [problem] if problem else []
            if kind == "json" and not found:
                found, content = _check_json(path, text_column)
        problems.items.extend(found)
        if not found:
            (kept if content else empty).append(path)
    if not problems.items and not kept:
        reasons = [f"{p} ({'0 bytes' if p.stat().st_size == 0 else 'whitespace only'})" for p in empty]
        names = ", ".join(reasons[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        problems.add(f"{what}: no text in {names}; point {what} at files with text")
    problems.raise_if_any()
    if empty:
        rank_zero_info(f"gptlab: {what}: skipped {len(empty)} empty file(s), e.g. {empty[0]}")
    return kept


# ----------------------------------------------------------------------------- tables
def read_table(
    path: Path, columns: Sequence[str], names: Sequence[str] | None = None, optional: Sequence[str] = ()
) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, record) for every row of a csv / tsv / jsonl / json / parquet file.

    `where` is "<path> line N" (text formats) or "<path> row N" (parquet), for error messages.
    A csv / tsv file's first line is its header, which must hold every name in `columns`; with
    `names`, the file has no header and `names` name its columns in order (an empty list: by
    position, "0", "1", ...); a file may lack only those of `names` that are `optional` (a predict
    file's label column). A header that names a column of `columns` twice is refused (a row would
    keep the last field of that name). `.tsv` is read without quoting (GLUE's convention: sentences
    contain quote characters), `.csv` with standard quoting.
    """
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(TABLE_SUFFIXES)}")
    try:
        if suffix == ".parquet":
            yield from _read_parquet(path, columns)
        elif suffix in (".csv", ".tsv"):
            yield from _read_delimited(path, columns, suffix, names, optional)
        else:
            yield from _read_json(path, columns)
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path}: not UTF-8 ({err.reason} at byte {err.start}); re-encode it as UTF-8"
        ) from None


def _missing(path: Path, columns: Sequence[str], present: Sequence[str], header: bool = False) -> DataError:
    missing = [c for c in columns if c not in present]
    shown = ", ".join(shorten_problem(repr(c), 60) for c in present[:20])
    hint = "set text_column / label_column to the file's column names"
    if header and looks_like_data(present):
        # Two columns are almost always text and label: the module's default column names.
        example = (
            "[text, label]" if len(present) == 2 else f"[{', '.join(f'col{i}' for i in range(len(present)))}]"
        )
        hint = (
            f"its first line looks like data, not a header: if the file has no header line, set "
            f"data.init_args.column_names to one name per column (e.g. column_names: {example}) "
            f"or header: false and text_column / label_column by position (0, 1, ...)"
        )
    return DataError(f"{path}: no column {', '.join(map(repr, missing))} (columns: {shown}); {hint}")


def looks_like_data(header: Sequence[str]) -> bool:
    """A header row that is probably the first example: a field with spaces, a number or a long text."""
    return any(
        " " in field.strip() or len(field) > 40 or field.strip().lstrip("-").replace(".", "", 1).isdigit()
        for field in header
    )


def _read_delimited(
    path: Path, columns: Sequence[str], suffix: str, names: Sequence[str] | None, optional: Sequence[str]
) -> Iterator[tuple[str, dict]]:
    options = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if suffix == ".tsv" else {"delimiter": ","}
    # The csv module refuses fields over 128 KiB (`_csv.Error: field larger than field limit`), a
    # guard against an unclosed quote swallowing the rest of a file. Such a file still fails here,
    # at the field-count check of the line the quote opens, so a long text loads as from .jsonl.
    # (The limit is process-wide; 2**31 - 1, the largest a C long holds everywhere.)
    csv.field_size_limit(2**31 - 1)
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, **options)
        line = 0
        if names is None:
            header = next(reader, None)
            if header is None:
                raise DataError(
                    f"{path}: empty file (expected a header row naming the columns, or set "
                    f"data.init_args.column_names for a file without one)"
                )
            header = [h.strip() for h in header]
            line = reader.line_num
            what = "the header has"
            twice = sorted({h for h in header if header.count(h) > 1 and h in columns})
            if twice:
                raise DataError(
                    f"{path} line {line}: the header names the column {twice[0]!r} more than once; "
                    f"rename one of them (a row would keep only the last field of that name)"
                )
        else:
            header, what = None, "data.init_args.column_names names"
        checked = False
        for row in reader:
            start, line = line + 1, reader.line_num  # a quoted field may span lines: report the first
            if not row:
                continue
            if header is None:
                # Without a header, the first row decides how many columns there are; fewer
                # than `names` (a predict file without its label column) drops the last names.
                header = list(names)[: len(row)] if names else [str(i) for i in range(len(row))]
                unused = [n for n in list(names or [])[len(row) :] if n not in optional]
                if unused:
                    raise DataError(
                        f"{path} line {start}: {len(row)} fields, but {what} {len(names)} (no column for "
                        f"{', '.join(map(repr, unused))}): give one name per column"
                    )
                if len(row) > len(header):
                    raise DataError(
                        f"{path} line {start}: {len(row)} fields, but {what} {len(header)}: give one "
                        f"name per column"
                    )
            if not checked:
                if any(c not in header for c in columns):
                    raise _missing(path, columns, header, header=names is None)
                checked = True
            if len(row) != len(header):
                raise DataError(
                    f"{path} line {start}: {len(row)} fields, but {what} {len(header)}"
                    + ("; a tab inside a text field?" if suffix == ".tsv" else "")
                )
            yield f"{path} line {start}", dict(zip(header, row, strict=True))
        if header is not None and any(c not in header for c in columns):
            raise _missing(path, columns, header, header=names is None)


def _read_json(path: Path, columns: Sequence[str]) -> Iterator[tuple[str, dict]]:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
        records = ((f"{path} item {i}", r) for i, r in enumerate(items))
    else:
        records = json_lines(path, text.splitlines())
    for where, record in records:
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        if any(c not in record for c in columns):
            raise DataError(
                f"{where}: missing key(s) {[c for c in columns if c not in record]} (keys: {list(record)})"
            )
        yield where, record


def _read_parquet(path: Path, columns: Sequence[str]) -> Iterator[tuple[str, dict]]:
    try:
        names = pq.read_schema(path).names
        if any(c not in names for c in columns):
            raise _missing(path, columns, names)
        table = pq.read_table(path, columns=list(columns))
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: not a readable Parquet file ({err})") from None
    for i, record in enumerate(table.to_pylist()):
        yield f"{path} row {i}", record


# ----------------------------------------------------------------------------- datasets and splits
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


def held_out(count: int, fraction: float, seed: int, advice: str) -> set[int]:
    """Indices of a seeded `fraction` of `count` training examples (at least one), held out for
    validation; `advice` says what to do when that leaves none to train on."""
    held = max(1, round(count * fraction))
    if held >= count:
        raise DataError(
            f"val_fraction={fraction} of {count} training examples leaves none to train on: {advice}"
        )
    return set(np.random.default_rng(seed).permutation(count)[:held].tolist())
