"""Conformance check for any TaskModule subclass: fit, test and reload a tiny experiment.

    from gptlab.testing import check_task

    def test_my_task_conforms(tmp_path):
        check_task(tiny_config, tmp_path)   # a dict (or YAML path): model + data + trainer, tiny

It drives gptlab's CLI in-process, the way users run a task, and checks what the rest of gptlab
relies on (docs/design.md §4):

1. `fit` trains a few steps with a finite loss, logs only "{stage}/{name}" keys, and writes the
   run directory: config.yaml, tokenizer/, checkpoints/best.ckpt and last.ckpt, the checkpoint
   naming the task class;
2. `test --ckpt_path <run>/checkpoints/last.ckpt`, with no config (the run's own is found),
   writes reports/test_report.{txt,md,json} whose numbers are finite;
3. `TaskClass.load_from_checkpoint(last.ckpt)` with no other argument rebuilds the model: the
   same weights as the checkpoint and the same outputs on a test batch as the evaluated model.

The config needs validation data (best.ckpt is chosen on a validation metric) and test data.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import yaml

__all__ = ["check_task"]

_LOG_KEY = re.compile(r"^(train|val|test)/[\w./-]+$")


def _fail(message: str) -> None:
    raise AssertionError(f"task conformance: {message}")


def check_task(
    config: dict[str, Any] | str | Path, tmp_path: str | Path, max_steps: int = 4
) -> dict[str, Any]:
    """Run fit -> test -> load_from_checkpoint on `config`; raise AssertionError on the first violation.

    Args:
        config: a complete tiny experiment (model, data, trainer with validation), as a dict or a
            YAML file. `logs`, `experiment` and `trainer.max_steps` are set here.
        tmp_path: a scratch directory for the run.
        max_steps: optimizer steps of the fit.

    Returns:
        {"run_dir": Path, "report": the test report as a dict, "model": the reloaded task}.
    """
    from gptlab.cli import GPTLabCLI

    tmp_path = Path(tmp_path)
    if isinstance(config, dict):
        path = tmp_path / "conformance.yaml"
        path.write_text(yaml.safe_dump(config))
        config = path
    logs = tmp_path / "conformance-logs"
    with mock.patch.object(sys, "argv", sys.argv[:1]):  # the CLI reads args only, not pytest's argv
        return _check(GPTLabCLI, Path(config), logs, max_steps)


def _check(GPTLabCLI: type, config: Path, logs: Path, max_steps: int) -> dict[str, Any]:
    fit = GPTLabCLI(
        args=[
            "fit",
            "--config",
            str(config),
            "--logs",
            str(logs),
            "--experiment",
            "conformance",
            "--trainer.max_steps",
            str(max_steps),
        ]
    )
    task_class = type(fit.model)
    loss = fit.trainer.callback_metrics.get("train/loss")
    if loss is None or not math.isfinite(float(loss)):
        _fail(f"{task_class.__name__}: train/loss is {loss} after fit")
    bad_keys = [k for k in fit.trainer.callback_metrics if not _LOG_KEY.match(k)]
    if bad_keys:
        _fail(f"{task_class.__name__} logs keys outside the '{{stage}}/{{name}}' scheme: {bad_keys}")

    runs = sorted((logs / "conformance").glob("version_*"))
    if len(runs) != 1:
        _fail(f"expected one run directory under {logs / 'conformance'}, found {[r.name for r in runs]}")
    run = runs[0]
    for name in ("config.yaml", "tokenizer", "checkpoints/best.ckpt", "checkpoints/last.ckpt"):
        if not (run / name).exists():
            _fail(f"the run directory {run} has no {name}")
    last = run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    expected_task = f"{task_class.__module__}.{task_class.__qualname__}"
    if checkpoint.get("gptlab", {}).get("task") != expected_task:
        _fail(f"{last} records task {checkpoint.get('gptlab')}, expected {expected_task}")

    test = GPTLabCLI(args=["test", "--ckpt_path", str(last)])
    report_file = run / "reports" / "test_report.json"
    for suffix in ("txt", "md", "json"):
        if not (run / "reports" / f"test_report.{suffix}").is_file():
            _fail(f"`test` wrote no reports/test_report.{suffix} in {run}")
    report = json.loads(report_file.read_text())
    numbers = {k: v for k, v in report["metrics"].items() if isinstance(v, int | float)}
    if not numbers or not all(math.isfinite(v) for v in numbers.values()):
        _fail(f"the test report's metrics are missing or not finite: {report['metrics']}")

    reloaded = task_class.load_from_checkpoint(last)
    state = reloaded.state_dict()
    if set(state) != set(checkpoint["state_dict"]) or not all(
        torch.equal(state[k], checkpoint["state_dict"][k]) for k in state
    ):
        _fail(f"{task_class.__name__}.load_from_checkpoint({last.name}) does not restore its weights")
    batch = next(iter(test.datamodule.test_dataloader()))
    evaluated = test.model.eval()
    reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(batch), evaluated(batch), msg="reloaded model gives other outputs"
        )
    return {"run_dir": run, "report": report, "model": reloaded}
