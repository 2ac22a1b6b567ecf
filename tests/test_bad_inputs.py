"""The bad-input catalogue (the table is docs/bad_inputs.md): every row is a test here.

Each bad input must stop `main.py` with exit status 2 and ONE line `gptlab: error: ...` that names
what is wrong, where (file, line, key) and what to do; no traceback, no usage wall; before training
where it can; and nothing that existed is lost or overwritten. The config rows run against the
experiment of an existing tiny run (same `logs`, same `experiment`), so "before training" and
"nothing lost" are checked the same way: the run's files are byte-identical afterwards and no new
`version_N` directory appeared.

Commands run in-process (`gptlab.cli.main`, what main.py calls) for speed; the full-disk row runs a
real subprocess (the file-size limit must apply to a whole process), which also checks once that
the real `main.py` prints no traceback.
"""

from __future__ import annotations

import ast
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from tiny_runs import run_cli

DOC = REPO / "docs" / "bad_inputs.md"


# ----------------------------------------------------------------- helpers
def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` (relative path -> bytes), to prove nothing changed."""
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


def one_line_error(code: int, err: str, *needles: str) -> str:
    """Assert exit 2, a single `gptlab: error:` line last on stderr, no traceback / usage; return it."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err[-3000:]
    assert "Traceback" not in err and "usage:" not in err, err[-3000:]
    assert lines and lines[-1].startswith("gptlab: error: "), err[-3000:]
    assert sum(line.startswith("gptlab: error:") for line in lines) == 1, err[-3000:]
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])
    return lines[-1]


def write_config(path: Path, base: Path, **overrides) -> Path:
    """`base` (a YAML file) with dotted-key overrides, written to `path`."""
    config = yaml.safe_load(base.read_text())
    for dotted, value in overrides.items():
        node = config
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def causal(tiny_runs, tmp_path):
    """(config path of the tiny causal LM run, its run directory); asserts the run is untouched after."""
    run = tiny_runs.runs["causal_lm"]
    before = snapshot(run.parent)
    yield tiny_runs.configs["causal_lm"], run
    assert snapshot(run.parent) == before, "a failed command changed or added files of the existing run"


@pytest.fixture
def classifier(tiny_runs):
    run = tiny_runs.runs["classification"]
    before = snapshot(run.parent)
    yield tiny_runs.configs["classification"], run
    assert snapshot(run.parent) == before, "a failed command changed or added files of the existing run"


# ----------------------------------------------------------------- config and command line
def _duplicate_key(path: Path, base: Path) -> Path:
    # `experiment` is already a top-level key of the base config: this is its second value.
    path.write_text(base.read_text() + "experiment: twice\n")
    return path


CONFIG_ROWS = {
    # id: (overrides or a function writing the file, extra argv, needles in the one line)
    "unknown_key": (
        {"model.init_args.backbone.init_args.n_layers": 2},
        [],
        ["model.init_args.backbone", "'n_layers' is not accepted", "line ", "--help"],
    ),
    "wrong_type": (
        {"data.init_args.batch_size": "four"},
        [],
        ["data.init_args.batch_size", "Expected a <class 'int'>", "four", "line "],
    ),
    "negative_batch_size": (
        {"data.init_args.batch_size": -1},
        [],
        ["data.init_args.batch_size=-1", "at least 1"],
    ),
    "unknown_class_path": ({"model.class_path": "gptlab.tasks.Nope"}, [], ["model", "no attribute 'Nope'"]),
    "negative_max_steps": ({"trainer.max_steps": -5}, [], ["trainer:", "max_steps", "-5"]),
    "tokenizer_larger_than_vocab": (
        {"model.init_args.backbone.init_args.vocab_size": 100},
        [],
        [
            "tokenizer has 300 tokens",
            "vocab_size is 100",
            "set model.init_args.backbone.init_args.vocab_size",
        ],
    ),
    "block_size_exceeded": (
        {"data.init_args.block_size": 64},
        [],
        ["data.init_args.block_size=64", "model's block_size=32", "lower the data block_size"],
    ),
    "val_check_interval_above_epoch": (
        {"trainer.val_check_interval": 100_000, "trainer.check_val_every_n_epoch": 1},
        [],
        [
            "trainer.val_check_interval",
            "(100000) must be less than or equal to the number of the training batches",
        ],
    ),
    "bad_precision": (
        {"trainer.precision": "bogus"},
        [],
        ["trainer.precision: 'bogus' is none of", "bf16-mixed"],
    ),
    "unknown_cli_option": ({}, ["--trainer.max_stepz", "3"], ["trainer.max_stepz", "--help"]),
    "duplicate_key": (_duplicate_key, [], ["line ", "given twice", "first on line", "delete one"]),
    "cli_value_read_as_yaml": (
        {},
        ["--data.init_args.batch_size", "a: 1"],
        [
            "(command line: --data.init_args.batch_size)",
            "read as YAML, so 'a: 1' is a mapping",
            """--data.init_args.batch_size '"a: 1"'""",
        ],
    ),
}


@pytest.mark.parametrize("row", list(CONFIG_ROWS))
def test_config_errors(row, causal, tmp_path, capsys):
    base, _ = causal
    overrides, argv, needles = CONFIG_ROWS[row]
    path = tmp_path / f"{row}.yaml"
    path = overrides(path, base) if callable(overrides) else write_config(path, base, **overrides)
    line = one_line_error(*run_cli(capsys, "fit", "--config", str(path), *argv), *needles)
    if row == "duplicate_key":
        assert str(path) in line and "key 'experiment'" in line


def test_yaml_syntax_error_names_file_line_and_column(causal, tmp_path, capsys):
    bad = tmp_path / "broken.yaml"
    bad.write_text("trainer:\n  max_steps: 3\n   accelerator: cpu\n")
    code, err = run_cli(capsys, "fit", "--config", str(causal[0]), "--config", str(bad))
    one_line_error(code, err, f"{bad} line 3 column", "not valid YAML", "fix the syntax")


def test_missing_config_file(causal, tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    one_line_error(*run_cli(capsys, "fit", "--config", str(missing)), f"--config {missing}: no such file")


def test_unwritable_log_directory(causal, tmp_path, capsys):
    # A `logs` below a regular file cannot be created, also for root (chmod does not stop root).
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    config = write_config(tmp_path / "c.yaml", causal[0], logs=str(blocker / "logs"))
    code, err = run_cli(capsys, "fit", "--config", str(config))
    one_line_error(
        code,
        err,
        f"--logs_root {blocker / 'logs'}",
        f"{blocker} is a file",
        "set --logs_root to a directory you can write to",
    )
    # A read-only directory: only meaningful when the permission bits bind this user (not root).
    readonly = tmp_path / "readonly"
    readonly.mkdir(mode=0o555)
    try:
        if os.access(readonly, os.W_OK):
            pytest.skip(
                "running as root: a read-only directory is writable anyway (the case above covers root)"
            )
        config = write_config(tmp_path / "c.yaml", causal[0], logs=str(readonly / "logs"))
        code, err = run_cli(capsys, "fit", "--config", str(config))
        fix = "set --logs_root to a directory you can write to"
        one_line_error(code, err, f"{readonly} is not writable", fix)
    finally:
        readonly.chmod(0o755)


def test_export_unknown_option(tmp_path, capsys):
    code, err = run_cli(
        capsys, "export", "--ckpt_pth", str(tmp_path / "x.ckpt"), "--out", str(tmp_path / "out")
    )
    one_line_error(code, err, "unrecognized arguments: --ckpt_pth", "main.py export --help")
    assert not (tmp_path / "out").exists()


def test_export_of_a_zero_byte_checkpoint(tmp_path, capsys):
    empty = tmp_path / "empty.ckpt"
    empty.touch()
    code, err = run_cli(capsys, "export", "--ckpt_path", str(empty), "--out", str(tmp_path / "out"))
    one_line_error(code, err, f"checkpoint {empty} is an empty file (0 bytes)")
    assert not (tmp_path / "out").exists() and empty.stat().st_size == 0


# ----------------------------------------------------------------- data
def _text_rows(tmp: Path) -> dict[str, tuple[dict, list[str]]]:
    """id -> (overrides of the causal LM config, needles)."""
    empty = tmp / "empty.jsonl"
    empty.write_text("")
    latin1 = tmp / "latin1.txt"
    latin1.write_bytes("caf\xe9 au lait\n".encode("latin-1") * 50)
    not_json = tmp / "broken.jsonl"
    not_json.write_text('{"text": "hello there"}\nthis is not json\n')
    no_field = tmp / "nofield.jsonl"
    no_field.write_text('{"text": "hello there"}\n{"body": "no text key"}\n')
    return {
        "missing_file": (
            {"data.init_args.train_files": str(tmp / "nowhere" / "*.txt")},
            ["nowhere", "check the path"],
        ),
        "empty_file": ({"data.init_args.train_files": str(empty)}, [str(empty), "no text", "0 bytes"]),
        "non_utf8": (
            {"data.init_args.train_files": str(latin1)},
            [str(latin1), "not UTF-8 at byte 3", "iconv"],
        ),
        "jsonl_not_json": (
            {"data.init_args.train_files": str(not_json)},
            [f"{not_json} line 2", "not valid JSON"],
        ),
        "jsonl_missing_field": (
            {"data.init_args.train_files": str(no_field)},
            [f"{no_field} line 2", "no key 'text'", "text_column"],
        ),
    }


TEXT_ROWS = ["missing_file", "empty_file", "non_utf8", "jsonl_not_json", "jsonl_missing_field"]


@pytest.mark.parametrize("row", TEXT_ROWS)
def test_text_data_errors(row, causal, tmp_path, capsys):
    overrides, needles = _text_rows(tmp_path)[row]
    config = write_config(tmp_path / "c.yaml", causal[0], **overrides)
    one_line_error(*run_cli(capsys, "fit", "--config", str(config)), *needles)


def _labelled_rows(tmp: Path, files: dict) -> dict[str, tuple[dict, list[str]]]:
    columns = tmp / "columns.tsv"
    columns.write_text("review\tlabel\ngood movie \t1\n")
    unknown = tmp / "dev.tsv"
    unknown.write_text("sentence\tlabel\ngood movie \t1\nbad plot \tneutral\n")
    header_only = tmp / "empty_dev.tsv"
    header_only.write_text("sentence\tlabel\n")
    empty_csv = tmp / "empty.csv"
    empty_csv.write_text("")
    headerless = tmp / "headerless.tsv"
    headerless.write_text(files["train"].read_text().split("\n", 1)[1])  # the rows, no header
    emoji = tmp / "emoji.tsv"
    emoji.write_text("sentence\tlabel\ngood movie \t1\nbad \U0001f600 plot \t0\n")
    many = tmp / "many.tsv"
    many.write_text("sentence\tlabel\n" + "".join(f"movie {i} \tneutral\n" for i in range(40)))
    return {
        "wrong_csv_columns": (
            {"data.init_args.train_files": str(columns)},
            [str(columns), "no column 'sentence'", "'review'", "set text_column"],
        ),
        "unknown_label": ({"data.init_args.val_files": str(unknown)}, [f"{unknown} line 3", "'neutral'"]),
        "empty_validation_split": (
            {"data.init_args.val_files": str(header_only)},
            [f"val data: no examples in {header_only}", "val_files"],
        ),
        "empty_csv": ({"data.init_args.train_files": str(empty_csv)}, [str(empty_csv), "empty file"]),
        "headerless_tsv": (
            {"data.init_args.train_files": str(headerless)},
            [str(headerless), "first line looks like data", "column_names", "header: false"],
        ),
        "missing_test_files": (
            {"data.init_args.test_files": str(tmp / "tset.tsv")},
            ["test_files", "tset.tsv", "check the path"],
        ),
        "unencodable_character": (
            {
                "data.init_args.tokenizer": {
                    "class_path": "gptlab.data.Char",
                    "init_args": {"unk_token": None},
                },
                "data.init_args.val_files": str(emoji),
            },
            [f"{emoji} line 3", "cannot encode the character '\U0001f600' (U+1F600)", "no unknown token"],
        ),
        "many_problems": (
            {"data.init_args.val_files": str(many)},
            [f"{many} line 2", "40 problem(s)", "... and 35 more", "label_names"],
        ),
    }


LABELLED_ROWS = [
    "wrong_csv_columns",
    "unknown_label",
    "empty_validation_split",
    "empty_csv",
    "headerless_tsv",
    "missing_test_files",
    "unencodable_character",
    "many_problems",
]


@pytest.mark.parametrize("row", LABELLED_ROWS)
def test_labelled_data_errors(row, classifier, tiny_runs, tmp_path, capsys):
    overrides, needles = _labelled_rows(tmp_path, tiny_runs.files["classification"])[row]
    config = write_config(tmp_path / "c.yaml", classifier[0], **overrides)
    one_line_error(*run_cli(capsys, "fit", "--config", str(config)), *needles)


def test_conll_column_count_mismatch(tiny_runs, tmp_path, capsys):
    run = tiny_runs.runs["ner"]
    before = snapshot(run.parent)
    bad = tmp_path / "bad.testa"
    bad.write_text("John NNP B-NP B-PER\nSmith NNP I-PER\n")
    config = write_config(
        tmp_path / "c.yaml", tiny_runs.configs["ner"], **{"data.init_args.val_files": str(bad)}
    )
    one_line_error(
        *run_cli(capsys, "fit", "--config", str(config)), f"{bad} line 2", "3 column(s), expected 4"
    )
    assert snapshot(run.parent) == before


def test_swapped_token_and_tag_columns_are_named(tiny_runs, tmp_path, capsys):
    run = tiny_runs.runs["ner"]
    before = snapshot(run.parent)
    swapped = tmp_path / "swapped.train"
    rows = [line.split() for line in tiny_runs.files["ner"]["train"].read_text().splitlines()]
    swapped.write_text("\n".join(" ".join(reversed(r)) for r in rows if "-DOCSTART-" not in r) + "\n")
    config = write_config(
        tmp_path / "c.yaml",
        tiny_runs.configs["ner"],
        **{"data.init_args.train_files": str(swapped), "data.init_args.label_names": None},
    )
    one_line_error(
        *run_cli(capsys, "fit", "--config", str(config)),
        "the tags look like words",
        "tokens look like tags",
        "tag_column=-1 and token_column=0 are probably swapped",
    )
    assert snapshot(run.parent) == before


def test_batch_larger_than_the_dataset_warns(causal, tmp_path, capsys, recwarn):
    # Decision: not an error. drop_last is off, so each epoch is one batch of every example; the
    # run trains, with a warning that names the setting and what to do.
    config = write_config(
        tmp_path / "c.yaml", causal[0], logs=str(tmp_path / "logs"), **{"data.init_args.batch_size": 10_000}
    )
    code, err = run_cli(capsys, "fit", "--config", str(config), "--trainer.max_steps", "1")
    assert code == 0, err
    messages = [str(w.message) for w in recwarn]
    assert any("batch_size=10000 is larger than the" in m and "lower batch_size" in m for m in messages), (
        messages
    )


# ----------------------------------------------------------------- checkpoints
def test_checkpoint_of_another_task(causal, classifier, capsys):
    # Evaluating a classifier's checkpoint with the causal LM's config, and the reverse.
    code, err = run_cli(
        capsys,
        "test",
        "--config",
        str(causal[0]),
        "--ckpt_path",
        str(classifier[1] / "checkpoints" / "last.ckpt"),
    )
    one_line_error(code, err, "SequenceClassification", "CausalLM")


def test_init_from_a_checkpoint_whose_backbone_differs(causal, classifier, tmp_path, capsys):
    # The classifier's backbone, fine-tuned from scratch with another shape than the config's.
    config = write_config(
        tmp_path / "c.yaml",
        classifier[0],
        logs=str(tmp_path / "logs"),
        **{
            "model.init_args.init_from": str(causal[1] / "checkpoints" / "last.ckpt"),
            "model.init_args.backbone.init_args.n_embd": 64,
        },
    )
    code, err = run_cli(capsys, "fit", "--config", str(config))
    one_line_error(code, err, "init_from=", "does not match", "same backbone config")
    assert not list((tmp_path / "logs").rglob("*.ckpt"))


BACKBONE_ROWS = {
    # id: (HFBackbone init_args, needles in the one line)
    "hub_name_offline": (
        {"name_or_path": "gptlab-tests/no-such-model"},
        ["name_or_path=gptlab-tests/no-such-model", "hub could not be reached", "local directory"],
    ),
    "missing_directory": ({"name_or_path": "{tmp}/no/such/dir"}, ["no such directory", "save_pretrained"]),
    "both_sources": (
        {"name_or_path": "gpt2", "model_type": "gpt2"},
        ["exactly one of name_or_path", "remove one of them"],
    ),
}


@pytest.mark.parametrize("row", list(BACKBONE_ROWS))
def test_backbone_that_cannot_load(row, causal, tmp_path, capsys, monkeypatch):
    # No network, as with HF_HUB_OFFLINE=1 (read by huggingface_hub when it is imported).
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    init_args, needles = BACKBONE_ROWS[row]
    init_args = {k: v.format(tmp=tmp_path) for k, v in init_args.items()}
    backbone = {"class_path": "gptlab.models.HFBackbone", "init_args": init_args}
    config = write_config(
        tmp_path / "c.yaml", causal[0], logs=str(tmp_path / "logs"), **{"model.init_args.backbone": backbone}
    )
    one_line_error(*run_cli(capsys, "fit", "--config", str(config)), *needles)
    assert not (tmp_path / "logs").exists() or not list((tmp_path / "logs").rglob("*"))


def test_decoding_options_that_exclude_each_other(causal, capsys):
    config, run = causal
    ckpt = str(run / "checkpoints" / "last.ckpt")
    beams = ["--model.init_args.num_beams", "2", "--model.init_args.temperature", "0.7"]
    code, err = run_cli(capsys, "predict", "--ckpt_path", ckpt, *beams)
    one_line_error(code, err, "num_beams=2 is beam search", "set temperature 0")
    many = ["--model.init_args.num_return_sequences", "3"]
    code, err = run_cli(capsys, "predict", "--ckpt_path", ckpt, *many)
    one_line_error(code, err, "num_return_sequences=3 needs num_beams >= 3", "temperature > 0")
    more = ["--model.init_args.min_new_tokens", "9", "--model.init_args.max_new_tokens", "4"]
    code, err = run_cli(capsys, "predict", "--ckpt_path", ckpt, *more)
    one_line_error(code, err, "min_new_tokens=9 exceeds max_new_tokens=4")


def test_sampling_options_under_greedy_decoding_warn_once(causal, tmp_path, capsys):
    """top_k / top_p with temperature 0 change nothing: one warning naming them; with sampling none."""
    run = tmp_path / "logs" / "causal_lm" / "version_0"  # predict writes into the run: a copy
    shutil.copytree(causal[1], run)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\n")
    args = ["predict", "--ckpt_path", str(run / "checkpoints" / "last.ckpt")]
    args += ["--data.init_args.predict_files", str(prompts)]
    sampling = ["--model.init_args.top_k", "5", "--model.init_args.top_p", "0.9"]
    with pytest.warns(UserWarning) as record:
        code, err = run_cli(capsys, *args, *sampling)
    assert code == 0, err
    said = [str(w.message) for w in record if "only apply to sampling" in str(w.message)]
    assert len(said) == 1 and "top_k=5, top_p=0.9" in said[0] and "greedily" in said[0], said
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        code, err = run_cli(capsys, *args, *sampling, "--model.init_args.temperature", "0.8")
    assert code == 0, err
    assert not [w for w in record if "only apply to sampling" in str(w.message)]


def test_causal_lm_predict_without_prompts(causal, tmp_path, capsys):
    _, run = causal
    ckpt = str(run / "checkpoints" / "last.ckpt")
    code, err = run_cli(capsys, "predict", "--ckpt_path", ckpt)
    one_line_error(code, err, "no prompts to predict", "data.init_args.predict_files")
    records = tmp_path / "prompts.jsonl"
    records.write_text('{"prompt": "hello"}\n')
    code, err = run_cli(
        capsys, "predict", "--ckpt_path", ckpt, "--data.init_args.predict_files", str(records)
    )
    one_line_error(code, err, f"{records} line 1: no text in 'text'", "text_column")


def _truncated(run: Path, tmp: Path) -> Path:
    """A copy of `run` whose last.ckpt lost its second half (a save killed midway on a non-atomic writer)."""
    copy_ = tmp / "logs" / "cut" / "version_0"
    shutil.copytree(run, copy_)
    last = copy_ / "checkpoints" / "last.ckpt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    return last


def test_truncated_checkpoint_for_evaluation(causal, tmp_path, capsys):
    last = _truncated(causal[1], tmp_path)
    one_line_error(
        *run_cli(capsys, "test", "--ckpt_path", str(last)), str(last), "truncated", "another checkpoint"
    )


def test_truncated_checkpoint_as_init_from(causal, classifier, tmp_path, capsys):
    last = _truncated(causal[1], tmp_path)
    config = write_config(
        tmp_path / "c.yaml",
        classifier[0],
        logs=str(tmp_path / "logs2"),
        **{"model.init_args.init_from": str(last)},
    )
    one_line_error(*run_cli(capsys, "fit", "--config", str(config)), str(last), "truncated")
    assert not (tmp_path / "logs2").exists()


def test_missing_checkpoints(causal, tmp_path, capsys):
    missing = tmp_path / "none.ckpt"
    one_line_error(
        *run_cli(capsys, "fit", "--config", str(causal[0]), "--model.init_args.init_from", str(missing)),
        f"init_from={missing} does not exist",
    )
    one_line_error(
        *run_cli(capsys, "fit", "--config", str(causal[0]), "--ckpt_path", str(missing)),
        f"--ckpt_path {missing} does not exist",
    )


def test_label_set_differs_from_the_checkpoint(classifier, capsys):
    code, err = run_cli(capsys, "test", "--ckpt_path", str(classifier[1] / "checkpoints" / "last.ckpt"),
                        "--data.init_args.label_names", "[negative, neutral, positive]")  # fmt: skip
    one_line_error(code, err, "trained with labels ['negative', 'positive']", "'neutral'")


@pytest.mark.slow
def test_full_disk_while_writing_a_checkpoint(causal, tmp_path):
    # A real process under a file-size limit smaller than a checkpoint: writing one fails with
    # EFBIG exactly as a full disk fails with ENOSPC (both handled alike). Resuming a copy of the
    # run, its first save hits the limit; the last.ckpt it had must stay intact.
    run = tmp_path / "logs" / "disk" / "version_0"
    shutil.copytree(causal[1], run)
    last = run / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    limit = len(before) // 2

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = subprocess.run(
        [sys.executable, str(REPO / "main.py"), "fit", "--config", str(run / "config.yaml"),
         "--ckpt_path", str(last), "--trainer.max_steps", "4"],
        capture_output=True, text=True, timeout=300, preexec_fn=limit_file_size,
        env={**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"},
    )  # fmt: skip
    line = one_line_error(result.returncode, result.stderr, "disk full while writing checkpoint", str(run))
    assert "checkpoints saved before are unchanged" in line
    assert last.read_bytes() == before


def test_remove_traces_keeps_what_existed_and_any_run_that_trained(tmp_path):
    from gptlab.runs import remove_traces

    run = tmp_path / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"old")
    (run / "config.yaml").write_text("old")
    before = set(run.rglob("*"))
    (run / "events.out.tfevents.1").write_bytes(b"new")
    (run / "reports").mkdir()
    (run / "reports" / "test_report.txt").write_text("new")
    remove_traces(run, before)  # a failed `test` on an existing run: only its own files go
    assert set(run.rglob("*")) == before and (run / "checkpoints" / "last.ckpt").read_bytes() == b"old"
    fresh = tmp_path / "version_1"
    (fresh / "checkpoints").mkdir(parents=True)
    (fresh / "config.yaml").write_text("new")
    remove_traces(fresh, None)  # created by the failed command, nothing saved: removed
    assert not fresh.exists()
    trained = tmp_path / "version_2"
    (trained / "checkpoints").mkdir(parents=True)
    (trained / "checkpoints" / "best.ckpt").write_bytes(b"new")
    remove_traces(trained, None)  # a checkpoint was written: the run trained, everything stays
    assert (trained / "checkpoints" / "best.ckpt").is_file()


# ----------------------------------------------------------------- the table cannot rot
def test_gguf_conversion_without_its_packages(tmp_path, capsys, monkeypatch):
    """scripts/get_smollm2.py without gguf / accelerate: one line naming the pip command."""
    import importlib.util

    from gptlab.models import gguf

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "gguf" else find_spec(name))
    with pytest.raises(SystemExit) as exit_info:
        gguf.main(["--cache_dir", str(tmp_path / "cache")])
    one_line_error(exit_info.value.code, capsys.readouterr().err, "needs gguf", "pip install 'gptlab[gguf]'")
    assert not (tmp_path / "cache").exists()


def test_smollm2_config_before_the_conversion(tmp_path, capsys, monkeypatch):
    """The SmolLM2 configs name the converted directory; before get_smollm2.py ran, say how to make it."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(REPO)
    config = REPO / "configs" / "finetune" / "sst2_smollm2.yaml"
    code, err = run_cli(capsys, "fit", "--config", str(config), "--logs", str(tmp_path / "logs"))
    one_line_error(code, err, "SmolLM2-135M-Instruct: no such directory", "python scripts/get_smollm2.py")
    assert not (tmp_path / "logs").exists()


def test_catalogue_table_names_existing_tests():
    """Every row of docs/bad_inputs.md names a test that exists (file, function, parametrize id)."""
    rows = [line for line in DOC.read_text().splitlines() if re.match(r"\|\s*\d+\s*\|", line)]
    assert len(rows) >= 25
    areas = {line.split("|")[2].strip() for line in rows}
    assert {"config", "data", "checkpoint", "CLI"} <= areas, areas
    numbers = [int(line.split("|")[1]) for line in rows]
    assert numbers == list(range(1, len(rows) + 1))
    for line in rows:
        node = re.search(r"`(tests/[^`]+)`", line.split("|")[-2])
        if node is None:
            assert "(6a)" in line or "(6b)" in line, f"row without a test: {line}"
            continue
        file, _, rest = node[1].partition("::")
        function, _, param = rest.partition("[")
        source = (REPO / file).read_text()
        names = {n.name for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef)}
        assert function in names, f"{node[1]}: no test {function} in {file}"
        if param:
            assert f'"{param.rstrip("]")}"' in source, f"{node[1]}: no parametrize id {param}"


# ----------------------------------------------------------------- wrong before training starts
def _early_rows(tmp: Path) -> dict[str, tuple[list[str], dict, list[str], list[str]]]:
    """id -> (subcommand + argv before --config, overrides of the causal LM config, argv, needles)."""
    import torch
    from transformers import GPT2Config

    nul = tmp / "nul.txt"
    nul.write_bytes(b"\0" * 4096)
    state_dict = tmp / "weights.pt"
    torch.save({"transformer.wte.weight": torch.zeros(2, 2)}, state_dict)
    hf = {}
    for kind in ("invalid_json", "no_model_type", "no_weights"):
        hf[kind] = tmp / f"hf_{kind}"
        hf[kind].mkdir()
    (hf["invalid_json"] / "config.json").write_text("{not json")
    (hf["no_model_type"] / "config.json").write_text('{"n_layer": 2}')
    GPT2Config(vocab_size=320, n_positions=32, n_embd=32, n_layer=1, n_head=2).save_pretrained(
        hf["no_weights"]
    )
    blocker = tmp / "a_file"
    blocker.write_text("")
    key = "model.init_args.backbone.init_args"
    init_from = {"model.init_args.backbone": None, "data.init_args.tokenizer": str(tmp)}
    return {
        "negative_lr": (
            ["fit"],
            {"model.init_args.optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": -0.1}}},
            [],
            ["model.init_args.optimizer", "Invalid learning rate: -0.1"],
        ),
        "negative_warmup": (
            ["fit"],
            {
                "model.init_args.scheduler": {
                    "class_path": "gptlab.optim.WarmupCosine",
                    "init_args": {"warmup_steps": -5},
                }
            },
            [],
            ["model.init_args.scheduler", "warmup_steps=-5"],
        ),  # fmt: skip
        "heads_do_not_divide_n_embd": (
            ["fit"],
            {f"{key}.n_embd": 30, f"{key}.n_head": 4},
            [],
            [f"{key}.n_embd=30 is not divisible by n_head=4"],
        ),
        "dropout_out_of_range": (["fit"], {f"{key}.dropout": 1.5}, [], [f"{key}.dropout=1.5", "[0, 1]"]),
        "accumulate_grad_batches_zero": (
            ["fit"],
            {"trainer.accumulate_grad_batches": 0},
            [],
            ["trainer.accumulate_grad_batches=0 must be at least 1"],
        ),
        "val_check_interval_zero": (
            ["fit"],
            {"trainer.val_check_interval": 0},
            [],
            ["trainer.val_check_interval=0 must be positive"],
        ),
        "max_steps_zero": (["fit"], {"trainer.max_steps": 0}, [], ["trainer.max_steps=0 trains nothing"]),
        "uncatchable_preemption_signal": (
            ["fit"],
            {},
            ["--preemption.signals", "[SIGTERM, SIGKILL]"],
            ["preemption.signals: ['SIGKILL'] cannot be caught"],
        ),
        "negative_preemption_interval": (
            ["fit"],
            {},
            ["--preemption.every_n_steps", "-3"],
            ["preemption.every_n_steps=-3 must be >= 0"],
        ),
        "progress_interval_zero": (
            ["fit"],
            {},
            ["--progress.every_n_steps", "0"],
            ["progress.every_n_steps=0 must be >= 1"],
        ),
        "nul_bytes_text": (
            ["fit"],
            {"data.init_args.train_files": str(nul)},
            [],
            [f"{nul}: a NUL byte at byte 0", "binary file"],
        ),
        "state_dict_as_ckpt_path": (
            ["fit"],
            {},
            ["--ckpt_path", str(state_dict)],
            [f"--ckpt_path {state_dict} is not a checkpoint written by Lightning", "torch.save(state_dict)"],
        ),
        "empty_ckpt_path": (["fit"], {}, ["--ckpt_path", ""], ["--ckpt_path is empty"]),
        "validate_best_without_fit": (
            ["validate"],
            {},
            ["--ckpt_path", "best"],
            ["--ckpt_path best: a separate `validate` has no best checkpoint", "best.ckpt"],
        ),
        "hf_init_from_invalid_config": (
            ["fit"],
            {**init_from, "model.init_args.init_from": str(hf["invalid_json"])},
            [],
            [f"{hf['invalid_json'] / 'config.json'} line 1 column 2 is not valid JSON"],
        ),
        "hf_init_from_without_model_type": (
            ["fit"],
            {**init_from, "model.init_args.init_from": str(hf["no_model_type"])},
            [],
            ["config.json names no model_type", "save_pretrained"],
        ),
        "hf_init_from_without_weights": (
            ["fit"],
            {**init_from, "model.init_args.init_from": str(hf["no_weights"])},
            [],
            [f"init_from={hf['no_weights']}: no weights in the directory", "model.safetensors"],
        ),
        "unwritable_cache_dir": (
            ["fit"],
            {"data.init_args.cache_dir": str(blocker / "cache")},
            [],
            [f"data.init_args.cache_dir {blocker / 'cache'}", "set data.init_args.cache_dir"],
        ),
        "experiment_with_a_path": (
            ["fit"],
            {},
            ["--experiment", "../elsewhere"],
            ["--experiment '../elsewhere': give a plain name", "set --logs_root"],
        ),
        "experiment_name_too_long": (
            ["fit"],
            {},
            ["--experiment", "e" * 300],
            ["--experiment is 300 bytes long", "at most 255 bytes"],
        ),
        "monitor_never_logged": (
            ["fit"],
            {},
            ["--checkpoint.monitor", "val/acc"],
            ["checkpoint.monitor='val/acc' is never logged by this run", "val/loss"],
        ),
        "logs_root_and_logs_disagree": (
            ["fit"],
            {},
            ["--logs_root", str(tmp / "a"), "--logs", str(tmp / "b")],
            [f"--logs_root {tmp / 'a'} and --logs {tmp / 'b'} both set the root of all runs", "give one"],
        ),
    }


EARLY_ROWS = [
    "negative_lr",
    "negative_warmup",
    "heads_do_not_divide_n_embd",
    "dropout_out_of_range",
    "accumulate_grad_batches_zero",
    "val_check_interval_zero",
    "max_steps_zero",
    "uncatchable_preemption_signal",
    "negative_preemption_interval",
    "progress_interval_zero",
    "nul_bytes_text",
    "state_dict_as_ckpt_path",
    "empty_ckpt_path",
    "validate_best_without_fit",
    "hf_init_from_invalid_config",
    "hf_init_from_without_model_type",
    "hf_init_from_without_weights",
    "unwritable_cache_dir",
    "experiment_with_a_path",
    "experiment_name_too_long",
    "monitor_never_logged",
    "logs_root_and_logs_disagree",
]


@pytest.mark.parametrize("row", EARLY_ROWS)
def test_wrong_before_training(row, causal, tmp_path, capsys):
    """One line, exit 2, before training, and no run folder left (the experiment's folders are as before)."""
    base, run = causal
    command, overrides, argv, needles = _early_rows(tmp_path)[row]
    config = write_config(tmp_path / "c.yaml", base, **overrides)
    folders = sorted(p.name for p in run.parent.parent.rglob("*") if p.is_dir())
    one_line_error(*run_cli(capsys, *command, "--config", str(config), *argv), *needles)
    assert sorted(p.name for p in run.parent.parent.rglob("*") if p.is_dir()) == folders
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.slow
def test_full_disk_at_start(causal, tmp_path):
    # A real process under a file-size limit that the first files of a run (config.yaml, the
    # tokenizer, the event file) exceed: EFBIG, handled as a full disk (ENOSPC) is. One line, and
    # no run folder left behind.
    config = write_config(tmp_path / "c.yaml", causal[0], logs=str(tmp_path / "logs"))

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))

    result = subprocess.run(
        [sys.executable, str(REPO / "main.py"), "fit", "--config", str(config)],
        capture_output=True, text=True, timeout=300, preexec_fn=limit_file_size,
        env={**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"},
    )  # fmt: skip
    one_line_error(
        result.returncode, result.stderr, "disk full while writing", "nothing of this run was kept"
    )
    assert not (tmp_path / "logs").exists(), list((tmp_path / "logs").rglob("*"))


# ----------------------------------------------------------------- messages that name the real cause
def _message_rows(tmp: Path, run: Path) -> dict[str, tuple[list[str], list[str]]]:
    """id -> (argv after the subcommand's config, needles); `{config}` stands for the causal LM config."""
    import zipfile

    empty = tmp / "empty.yaml"
    empty.write_text("# nothing here yet\n")
    listed = tmp / "listed.yaml"
    listed.write_text("- trainer:\n    max_steps: 3\n")
    folder = tmp / "configs"
    folder.mkdir()
    (folder / "a.yaml").write_text("trainer: {max_steps: 3}\n")
    empty_dir = tmp / "empty_ckpt"
    empty_dir.mkdir()
    garbage = tmp / "garbage.ckpt"
    with zipfile.ZipFile(garbage, "w") as archive:  # a zip like torch.save's, its pickle random bytes
        archive.writestr("garbage/data.pkl", bytes(range(256)) * 4)
        archive.writestr("garbage/version", "3\n")
    missing = run / "checkpoints" / "nope.ckpt"
    return {
        "empty_yaml": (
            ["fit", "--config", "{config}", "--config", str(empty)],
            [f"{empty}: an empty config file"],
        ),
        "yaml_list": (
            ["fit", "--config", "{config}", "--config", str(listed)],
            [f"{listed}: a YAML list at the top level", "mapping of keys"],
        ),
        "directory_as_config": (
            ["fit", "--config", str(folder)],
            [f"--config {folder}: a directory, not a config file", f"--config {folder / 'a.yaml'}"],
        ),
        "empty_folder_as_ckpt_path": (
            ["fit", "--config", "{config}", "--ckpt_path", str(empty_dir)],
            [f"--ckpt_path {empty_dir} is an empty folder, not a checkpoint"],
        ),
        "garbage_zip_as_ckpt_path": (
            ["fit", "--config", "{config}", "--ckpt_path", str(garbage)],
            [f"checkpoint {garbage} could not be read by the weights-only loader", "corrupt"],
        ),
        "missing_checkpoint_of_a_run": (
            ["test", "--ckpt_path", str(missing)],
            [f"--ckpt_path {missing} does not exist"],
        ),
        "unknown_subcommand": (["train", "--config", "{config}"], ["`main.py --help`"]),
        "eval_best_without_config": (
            ["test", "--ckpt_path", "best"],
            ["--ckpt_path best: a separate `test` has no best checkpoint", "checkpoints/best.ckpt"],
        ),
    }


MESSAGE_ROWS = [
    "empty_yaml",
    "yaml_list",
    "directory_as_config",
    "empty_folder_as_ckpt_path",
    "garbage_zip_as_ckpt_path",
    "missing_checkpoint_of_a_run",
    "unknown_subcommand",
    "eval_best_without_config",
]


@pytest.mark.parametrize("row", MESSAGE_ROWS)
def test_messages_name_the_real_cause(row, causal, tmp_path, capsys):
    base, run = causal
    argv, needles = _message_rows(tmp_path, run)[row]
    line = one_line_error(*run_cli(capsys, *[str(base) if a == "{config}" else a for a in argv]), *needles)
    assert "no such file" not in line and "unsafe" not in line and "cut off" not in line
    assert "main.py train --help" not in line and "no run config" not in line
