"""One tiny fitted run of every shipped task, shared by the safe-loading and bad-input tests.

`tiny_runs` (session scope) fits CausalLM, Generation (SFT), SequenceClassification and
TokenClassification for a few steps each through gptlab's CLI, in-process, and returns their
run directories and configs. Tests that need a run must not modify it: they copy what they break.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import yaml

from finetune_data import (
    GPT,
    TRAINER,
    finetune_config,
    pretrain_config,
    write_corpus,
    write_ner,
    write_sentiment,
)

TASKS = ("causal_lm", "generation", "classification", "ner")


def run_cli(capsys, *args: str) -> tuple[int, str]:
    """(exit code, stderr) of `main.py <args>`, in-process (pytest's own argv hidden from the CLI)."""
    from gptlab.cli import main

    capsys.readouterr()
    try:
        with mock.patch.object(sys, "argv", sys.argv[:1]):
            main(list(args))
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def sft_config(tmp: Path) -> dict:
    records = [{"prompt": f"What is {a} plus {a}? ", "completion": f"{a + a}"} for a in range(30)]
    (tmp / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return {
        "experiment": "generation",
        "logs": str(tmp / "logs"),
        "model": {
            "class_path": "gptlab.tasks.Generation",
            "init_args": {
                "backbone": {"class_path": "gptlab.models.GPT", "init_args": GPT},
                "max_new_tokens": 4,
                "num_samples": 2,
            },
        },
        "data": {
            "class_path": "gptlab.data.SFTDataModule",
            "init_args": {
                "train_files": str(tmp / "sft.jsonl"),
                "tokenizer": {"class_path": "gptlab.data.BPE", "init_args": {"vocab_size": 300}},
                "block_size": 32,
                "val_fraction": 0.2,
                "batch_size": 4,
                "cache_dir": str(tmp / "cache"),
            },
        },
        "trainer": dict(TRAINER),
    }


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory) -> SimpleNamespace:
    """{task: run directory} of one tiny `fit` per shipped task (2 steps, validation at each)."""
    from gptlab.cli import GPTLabCLI

    tmp = tmp_path_factory.mktemp("tiny_runs")
    (tmp / "sentiment").mkdir()
    (tmp / "ner").mkdir()
    files = {"classification": write_sentiment(tmp / "sentiment"), "ner": write_ner(tmp / "ner")}
    configs = {
        "causal_lm": pretrain_config(tmp, write_corpus(tmp)),
        "generation": sft_config(tmp),
        "classification": finetune_config(tmp, "classification", files["classification"]),
        "ner": finetune_config(tmp, "ner", files["ner"]),
    }
    runs, paths = {}, {}
    for task, config in configs.items():
        config["experiment"] = task
        config["trainer"].update(max_steps=2, val_check_interval=1)
        paths[task] = tmp / f"{task}.yaml"
        paths[task].write_text(yaml.safe_dump(config))
        with mock.patch.object(sys, "argv", sys.argv[:1]):
            GPTLabCLI(args=["fit", "--config", str(paths[task])])
        runs[task] = tmp / "logs" / task / "version_0"
    return SimpleNamespace(tmp=tmp, runs=runs, configs=paths, files=files)
