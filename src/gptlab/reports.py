"""Evaluation reports: one `Report` rendered as text (printed), Markdown and JSON.

A task builds a `Report` at the end of `test` (headline metrics, tables, sample generations); the
CLI adds where it came from (checkpoint, config) and writes `reports/test_report.{txt,md,json}`
into the run directory. Tables use the familiar scikit-learn `classification_report` layout:
a label column, then right-aligned numeric columns.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gptlab.checkpointing import atomic_write

Value = float | int | str | None


@dataclass
class Table:
    """A titled table: `rows[i][0]` is the row label, the rest line up with `columns`."""

    title: str
    columns: list[str]
    rows: list[list[Value]]
    digits: int = 4


@dataclass
class Report:
    """Everything one evaluation produced, independent of the output format."""

    title: str
    metrics: dict[str, Value] = field(default_factory=dict)
    tables: list[Table] = field(default_factory=list)
    # Free-form records such as {"prompt": ..., "completion": ..., "reference": ...}.
    samples: list[dict[str, str]] = field(default_factory=list)
    # Provenance: checkpoint, config, data files; filled in by the CLI.
    meta: dict[str, Value] = field(default_factory=dict)

    def to_dict(self) -> dict:
        # NaN/inf are not JSON: store them as strings so the file always parses.
        return _json_safe(asdict(self))

    def to_text(self) -> str:
        lines = [self.title, "=" * len(self.title), ""]
        lines += _kv_text(self.metrics)
        for table in self.tables:
            lines += ["", table.title, ""] + _table_text(table)
        if self.samples:
            lines += ["", "Samples", ""]
            for i, sample in enumerate(self.samples):
                lines.append(f"--- sample {i}")
                lines += [f"[{k}]\n{v}" for k, v in sample.items()]
        if self.meta:
            lines += [""] + _kv_text(self.meta)
        return "\n".join(lines) + "\n"

    def to_markdown(self) -> str:
        lines = [f"# {self.title}", ""]
        if self.metrics:
            lines += ["| metric | value |", "|---|---:|"]
            lines += [f"| {k} | {_fmt(v, 4)} |" for k, v in self.metrics.items()]
        for table in self.tables:
            lines += ["", f"## {table.title}", ""]
            lines.append("| " + " | ".join([""] + table.columns) + " |")
            lines.append("|---" + "|---:" * len(table.columns) + "|")
            for row in table.rows:
                lines.append("| " + " | ".join(_fmt(v, table.digits) for v in row) + " |")
        if self.samples:
            lines += ["", "## Samples", ""]
            for i, sample in enumerate(self.samples):
                lines.append(f"### Sample {i}")
                for key, text in sample.items():
                    lines += [f"**{key}**", "", "```", text, "```", ""]
        if self.meta:
            lines += ["", "## Provenance", ""]
            lines += [f"- {k}: `{v}`" for k, v in self.meta.items()]
        return "\n".join(lines) + "\n"


def write_report(report: Report, directory: str | os.PathLike, stem: str = "test_report") -> list[Path]:
    """Write `<stem>.txt`, `.md` and `.json` into `directory`; each file appears whole or not at all."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    outputs = {
        ".txt": report.to_text(),
        ".md": report.to_markdown(),
        ".json": json.dumps(report.to_dict(), indent=2) + "\n",
    }
    paths = []
    for suffix, text in outputs.items():
        path = directory / f"{stem}{suffix}"
        _atomic_write(path, text)
        paths.append(path)
    return paths


def publish_report(report: Report, run: Path, checkpoint: str | None, configs: list[str]) -> None:
    """Record where `report` came from (checkpoint, config files, run), write it into
    `run/reports` and print it: what `main.py test` ends with."""
    report.meta.update(
        checkpoint=str(checkpoint) if checkpoint else "(weights as initialised)",
        config=" + ".join(configs) if configs else "(command line)",
        run_dir=str(run),
    )
    paths = write_report(report, run / "reports")
    print(report.to_text())
    print("report written to " + ", ".join(str(p) for p in paths))


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` (parents created) atomically: the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, text)
    return path


def _atomic_write(path: Path, text: str) -> None:
    # Staged beside the target and renamed, created with open() so the umask gives the file the
    # mode any other write would (readable by the group in a shared lab), not mkstemp's 0600.
    atomic_write(path, lambda file: file.write(text.encode("utf-8")))


def _fmt(value: Value, digits: int) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
    return "" if value is None else str(value)


def _kv_text(items: dict[str, Value]) -> list[str]:
    width = max((len(k) for k in items), default=0)
    return [f"{k:<{width}}  {_fmt(v, 4)}" for k, v in items.items()]


def _table_text(table: Table) -> list[str]:
    # Same shape as sklearn's classification_report: label column left, numbers right-aligned.
    cells = [[_fmt(v, table.digits) for v in row] for row in table.rows]
    label_width = max([len(r[0]) for r in cells] + [0])
    widths = [
        max([len(c)] + [len(r[i + 1]) for r in cells if len(r) > i + 1]) for i, c in enumerate(table.columns)
    ]
    widths = [max(w, table.digits + 3) for w in widths]
    header = " " * label_width + "".join(f"  {c:>{w}}" for c, w in zip(table.columns, widths, strict=True))
    lines = [header]
    for row in cells:
        lines.append(
            f"{row[0]:>{label_width}}" + "".join(f"  {c:>{w}}" for c, w in zip(row[1:], widths, strict=False))
        )
    return lines


def _json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj
