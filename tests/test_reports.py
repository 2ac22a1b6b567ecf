"""gptlab.reports: the files a report is written to."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gptlab.reports import Report, write_report, write_text


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_reports_get_the_mode_of_a_plain_write(tmp_path: Path, umask: int):
    # Written through a staged temp file, yet with the umask's mode (not a temp file's 0600),
    # so that others in a shared lab can read the reports.
    old = os.umask(umask)
    try:
        paths = write_report(Report(title="t", metrics={"loss": 1.0}), tmp_path / "reports")
        paths.append(write_text(tmp_path / "predictions" / "p.tsv", "a\tb\n"))
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
    finally:
        os.umask(old)
    assert len(paths) == 4
    for path in paths:
        assert path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777 == 0o666 & ~umask, path
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == [
        "test_report.json",
        "test_report.md",
        "test_report.txt",
    ]
