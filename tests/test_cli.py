"""The real CLI in a subprocess: fit -> run directory -> test from the checkpoint alone -> reports."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoTokenizer

from conftest import run_main, tiny_config
from gptlab.tasks import CausalLM
from tiny_runs import run_cli


@pytest.fixture(scope="module")
def fitted_run(tmp_path_factory) -> Path:
    """One tiny `main.py fit` shared by the tests of this module; returns its run directory."""
    from conftest import TINY_CORPUS

    tmp = tmp_path_factory.mktemp("fit")
    corpus = tmp / "corpus"
    corpus.mkdir()
    for i, text in enumerate(TINY_CORPUS):
        (corpus / f"doc{i}.txt").write_text(text)
    # As in a batch job: no terminal (pipes), the progress bar on, a progress line every 2 steps.
    progress = ["--trainer.enable_progress_bar", "true", "--progress.every_n_steps", "2"]
    result = run_main(
        "fit", "--config", str(tiny_config(tmp, corpus)), *progress, "--progress.every_n_seconds", "0"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (tmp / "fit.log").write_text(result.stdout + result.stderr)
    runs = sorted((tmp / "logs" / "tiny").glob("version_*"))
    assert [r.name for r in runs] == ["version_0"]
    return runs[0]


def test_fit_writes_the_run_directory(fitted_run: Path):
    assert (fitted_run / "config.yaml").is_file()
    assert (fitted_run / "checkpoints" / "last.ckpt").is_file()
    assert (fitted_run / "checkpoints" / "best.ckpt").is_file()
    assert list(fitted_run.glob("events.out.tfevents.*")), "no TensorBoard events"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(fitted_run))
    events.Reload()
    val_steps = [e.step for e in events.Scalars("val/loss")]
    # Step 0 is the full sanity check (the untrained model), then every val_check_interval=3 steps.
    assert val_steps == [0, 2, 5], val_steps
    assert {"train/loss", "train/tokens", "val/ppl"} <= set(events.Tags()["scalars"])
    # The learning rate of every parameter group (decay, no decay), at every logging step.
    lrs = {tag: [e.value for e in events.Scalars(tag)] for tag in ("train/lr/decay", "train/lr/no_decay")}
    assert lrs["train/lr/decay"] == lrs["train/lr/no_decay"] and len(lrs["train/lr/decay"]) == 6
    assert lrs["train/lr/decay"][0] == pytest.approx(3e-3 / 3)  # WarmupCosine: warmup step 1 of 2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(fitted_run / "tokenizer")
    assert tokenizer.decode(tokenizer("def add(a, b):")["input_ids"]) == "def add(a, b):"
    # The best checkpoint is chosen by val/loss and the last one is at max_steps.
    last = torch.load(fitted_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 6
    assert last["gptlab"]["task"] == "gptlab.tasks.causal_lm.CausalLM"


def test_a_fit_without_a_terminal_logs_plain_progress_lines(fitted_run: Path):
    """Every 2 steps a line with step / max_steps, loss, tokens/s, elapsed and ETA; one per validation."""
    log = (fitted_run.parents[2] / "fit.log").read_text()
    assert "\r" not in log, "carriage returns: a terminal progress bar in a log file"
    lines = re.findall(
        r"^step (\d+)/6 \(\d+%\) \| loss (\S+) \| ([\d,]+) tok/s \| elapsed \S+ \| ETA \S+$", log, re.M
    )
    assert [int(step) for step, *_ in lines] == [2, 4, 6], log[-3000:]
    assert all(math.isfinite(float(loss)) and int(rate.replace(",", "")) > 0 for _, loss, rate in lines)
    validations = re.findall(r"^validation at step (\d+): val/loss=\S+, val/ppl=\S+$", log, re.M)
    assert validations == ["0", "3", "6"], log[-3000:]  # the sanity check (step 0), then each validation


def test_load_from_checkpoint_needs_no_arguments(fitted_run: Path):
    model = CausalLM.load_from_checkpoint(fitted_run / "checkpoints" / "last.ckpt")
    assert model.backbone.config.n_layer == 1 and model.backbone.vocab_size == 320
    state = torch.load(fitted_run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    loaded = model.state_dict()
    assert set(state) == set(loaded)
    assert all(torch.equal(state[k], loaded[k]) for k in state)


def test_test_from_checkpoint_alone_writes_reports(fitted_run: Path):
    before = (fitted_run / "config.yaml").read_text()
    result = run_main("test", "--ckpt_path", str(fitted_run / "checkpoints" / "last.ckpt"))
    assert result.returncode == 0, result.stderr[-3000:]
    reports = fitted_run / "reports"
    report = json.loads((reports / "test_report.json").read_text())
    assert {"loss", "perplexity", "tokens_evaluated"} <= set(report["metrics"])
    assert report["metrics"]["perplexity"] == pytest.approx(
        torch.tensor(report["metrics"]["loss"]).exp().item(), rel=1e-5
    )
    assert report["metrics"]["tokens_evaluated"] > 0
    # Perplexity's unit is named; bits per byte divide the same total loss by the scored text's bytes.
    metrics = report["metrics"]
    assert metrics["bits_per_byte"] == pytest.approx(
        metrics["loss"] * metrics["tokens_evaluated"] / math.log(2) / metrics["bytes_evaluated"], rel=1e-6
    )
    # A byte-level BPE token holds at least one byte (eos, none); merges make it several on average.
    assert metrics["tokens_evaluated"] < metrics["bytes_evaluated"] < 8 * metrics["tokens_evaluated"]
    assert (
        "per token of the tokenizer" in report["meta"]["perplexity"]
        and "(300 tokens)" in report["meta"]["perplexity"]
    )
    assert report["meta"]["checkpoint"].endswith("last.ckpt")
    assert "perplexity" in (reports / "test_report.md").read_text()
    assert "perplexity" in result.stdout and "perplexity" in (reports / "test_report.txt").read_text()
    # Evaluation writes into the same run and leaves its config alone; no new version appears.
    assert (fitted_run / "config.yaml").read_text() == before
    assert sorted(p.name for p in fitted_run.parent.iterdir()) == ["version_0"]


def test_test_with_explicit_config(fitted_run: Path):
    result = run_main(
        "test",
        "--config",
        str(fitted_run / "config.yaml"),
        "--ckpt_path",
        str(fitted_run / "checkpoints" / "best.ckpt"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((fitted_run / "reports" / "test_report.json").read_text())
    assert report["meta"]["checkpoint"].endswith("best.ckpt")


def _assert_clean_failure(result, *needles: str):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr[-3000:])


def test_unknown_yaml_key_is_named(tmp_path, tiny_corpus):
    config = tiny_config(tmp_path, tiny_corpus, **{"model.init_args.backbone.init_args.n_layers": 2})
    _assert_clean_failure(run_main("fit", "--config", str(config)), "n_layers")
    assert not (tmp_path / "logs").exists()


def test_missing_corpus_is_named(tmp_path, tiny_corpus):
    missing = str(tmp_path / "nowhere" / "*.txt")
    config = tiny_config(tmp_path, tiny_corpus, **{"data.init_args.train_files": missing})
    _assert_clean_failure(run_main("fit", "--config", str(config)), "nowhere")


def test_block_size_above_the_model_is_refused(tmp_path, tiny_corpus):
    config = tiny_config(tmp_path, tiny_corpus, **{"data.init_args.block_size": 64})
    _assert_clean_failure(run_main("fit", "--config", str(config)), "block_size=64", "block_size=32")


def test_tokenizer_larger_than_vocab_is_refused(tmp_path, tiny_corpus):
    config = tiny_config(tmp_path, tiny_corpus, **{"model.init_args.backbone.init_args.vocab_size": 100})
    _assert_clean_failure(run_main("fit", "--config", str(config)), "vocab_size", "100")


def test_bad_input_leaves_existing_runs_intact(fitted_run: Path):
    ckpt = fitted_run / "checkpoints" / "last.ckpt"
    before = ckpt.read_bytes()
    config = fitted_run / "config.yaml"
    bad = run_main("fit", "--config", str(config), "--data.init_args.block_size", "999")
    assert bad.returncode != 0
    assert ckpt.read_bytes() == before
    assert (fitted_run / "config.yaml").is_file()


def test_eval_without_run_config_says_what_to_do(tmp_path):
    stray = tmp_path / "model.ckpt"
    stray.write_bytes(b"")
    _assert_clean_failure(run_main("test", "--ckpt_path", str(stray)), "--config")


# ----------------------------------------------------------------- in-process, on the shared tiny runs
def _copy_run(run: Path, tmp: Path) -> Path:
    copy_ = tmp / "logs" / run.parent.name / run.name
    shutil.copytree(run, copy_)
    return copy_


def test_evaluation_keeps_the_users_logger(tiny_runs, tmp_path, capsys):
    run = _copy_run(tiny_runs.runs["causal_lm"], tmp_path)
    # The run was fitted with a CSVLogger writing elsewhere (its config.yaml records it).
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["trainer"]["logger"] = {
        "class_path": "lightning.pytorch.loggers.CSVLogger",
        "init_args": {"save_dir": str(tmp_path / "elsewhere"), "name": "x"},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    events = sorted(run.glob("events.out.tfevents.*"))
    for command in ("test", "validate"):
        code, err = run_cli(capsys, command, "--ckpt_path", str(run / "checkpoints" / "last.ckpt"))
        assert code == 0, err[-3000:]
        # CSV, not TensorBoard, and into the run directory (CSVLogger starts its file anew)
        assert {"test": "test/loss", "validate": "val/loss"}[command] in (run / "metrics.csv").read_text()
    assert sorted(run.glob("events.out.tfevents.*")) == events
    assert (run / "reports" / "test_report.json").is_file() and not (tmp_path / "elsewhere").exists()


def test_resumed_run_records_the_config_it_used(tiny_runs, tmp_path, capsys):
    # A run of its own (a copy would resume under another checkpoint folder than it recorded).
    config = yaml.safe_load(tiny_runs.configs["causal_lm"].read_text())
    config["logs"] = str(tmp_path / "logs")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    code, err = run_cli(capsys, "fit", "--config", str(tmp_path / "c.yaml"))
    assert code == 0, err[-3000:]
    run = tmp_path / "logs" / "causal_lm" / "version_0"
    first = (run / "config.yaml").read_text()
    last = str(run / "checkpoints" / "last.ckpt")
    # A resume with the same settings keeps the record as it is.
    code, err = run_cli(capsys, "fit", "--config", str(run / "config.yaml"), "--ckpt_path", last)
    assert code == 0, err[-3000:]
    assert (run / "config.yaml").read_text() == first and not (run / "config.1.yaml").exists()
    code, err = run_cli(
        capsys, "fit", "--config", str(run / "config.yaml"), "--ckpt_path", last, "--trainer.max_steps", "3"
    )
    assert code == 0, err[-3000:]
    assert torch.load(last, weights_only=True)["global_step"] == 3
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["max_steps"] == 3
    assert (run / "config.1.yaml").read_text() == first  # the first command's, kept
    # Resuming again with the same settings (only ckpt_path differs) records nothing new.
    second = (run / "config.yaml").read_text()
    code, err = run_cli(
        capsys, "fit", "--config", str(run / "config.yaml"), "--ckpt_path", last, "--trainer.max_steps", "3"
    )
    assert code == 0, err[-3000:]
    assert (run / "config.yaml").read_text() == second and not (run / "config.2.yaml").exists()


def test_causal_lm_predict_continues_a_prompts_file(tiny_runs, tmp_path, capsys):
    from gptlab.decoding import generate_text

    run = _copy_run(tiny_runs.runs["causal_lm"], tmp_path)
    prompts = ["def add(a, b):", "The quick brown", "x"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n\n")  # a blank line is no prompt
    ckpt = str(run / "checkpoints" / "last.ckpt")
    predict = [
        "predict",
        "--ckpt_path",
        ckpt,
        "--data.init_args.predict_files",
        str(tmp_path / "prompts.txt"),
    ]
    code, err = run_cli(capsys, *predict, "--model.init_args.max_new_tokens", "6")
    assert code == 0, err[-3000:]
    records = [
        json.loads(line) for line in (run / "predictions" / "predictions.jsonl").read_text().splitlines()
    ]
    assert [r["prompt"] for r in records] == prompts
    # the same greedy continuations as gptlab.decoding on the checkpoint's model
    model = CausalLM.load_from_checkpoint(ckpt).eval()
    tokenizer = AutoTokenizer.from_pretrained(run / "tokenizer")
    expected = generate_text(model.backbone, tokenizer, prompts, max_new_tokens=6, temperature=0)
    assert [r["completion"] for r in records] == expected
    # beam search, two completions per prompt: the best first
    beams = ["--model.init_args.num_beams", "3", "--model.init_args.num_return_sequences", "2"]
    code, err = run_cli(capsys, *predict, "--model.init_args.max_new_tokens", "6", *beams)
    assert code == 0, err[-3000:]
    records = [
        json.loads(line) for line in (run / "predictions" / "predictions.jsonl").read_text().splitlines()
    ]
    assert all(len(r["completions"]) == 2 and r["completion"] == r["completions"][0] for r in records)
