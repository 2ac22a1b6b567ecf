"""Bringing a new dataset by YAML alone: headerless tables, held-out validation, unseen characters,
integer label names, a run without validation, files checked at `fit`."""

from __future__ import annotations

import json
import time
import warnings

import pytest
import yaml

from conftest import REPO
from finetune_data import finetune_config, ner_sentences, write_conll, write_sentiment
from gptlab.data import BPE, Char, ClassificationDataModule, DataError, TokenClassificationDataModule
from gptlab.errors import ConfigError
from tiny_runs import run_cli


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    text = " ".join(w for s in ner_sentences(50) for w, _ in s) + " good bad movie plot"
    BPE(vocab_size=300).train([text]).save_pretrained(str(directory))
    return str(directory)


def ready(module):
    module.prepare_data()
    module.setup("fit")
    return module


def test_headerless_tsv_by_column_names_and_by_position(tmp_path, tokenizer_dir):
    rows = "good movie\tpos\nbad plot\tneg\ngood plot\tpos\n"
    (tmp_path / "train.tsv").write_text(rows)
    common = {"train_files": str(tmp_path / "train.tsv"), "tokenizer": tokenizer_dir, "val_fraction": 0.0}
    named = ready(ClassificationDataModule(column_names=["text", "label"], **common))
    by_position = ready(ClassificationDataModule(header=False, text_column=0, label_column=1, **common))
    for dm in (named, by_position):
        assert dm.label_names == ["neg", "pos"]
        assert [item["labels"] for item in dm.train_dataset] == [1, 0, 1]  # the first row is data
        assert dm.tokenizer.decode(dm.train_dataset[0]["input_ids"]) == "good movie"
    # A predict file without the label column: the missing last column is the label.
    (tmp_path / "predict.tsv").write_text("good plot\nawful\n")
    named.role_files["predict"] = str(tmp_path / "predict.tsv")
    named.setup("predict")
    assert [item["text"] for item in named.predict_dataset] == ["good plot", "awful"]


@pytest.mark.parametrize("kind", ["classification", "ner"])
def test_val_fraction_holds_out_a_seeded_share_of_train(kind, tmp_path, tokenizer_dir):
    if kind == "classification":
        files = write_sentiment(tmp_path)  # 84 training rows
        make = ClassificationDataModule
        args = {"train_files": str(files["train"]), "text_column": "sentence", "tokenizer": tokenizer_dir}
    else:
        write_conll(tmp_path / "ner.train", ner_sentences(40))
        make = TokenClassificationDataModule
        args = {"train_files": str(tmp_path / "ner.train"), "tokenizer": tokenizer_dir}

    def split(seed: int, fraction: float = 0.25):
        dm = ready(make(val_fraction=fraction, seed=seed, **args))

        def key(item):
            return (*item["input_ids"], str(item["labels"]))

        return [key(i) for i in dm.train_dataset], [key(i) for i in dm.val_dataset or []]

    train, val = split(1)
    total = len(train) + len(val)
    assert len(val) == round(total * 0.25)
    assert split(1) == (train, val)  # the same split on every call (every rank, fit and test)
    assert split(2) != (train, val)  # and another with another seed
    everything, _ = split(1, fraction=0.0)
    assert sorted(train + val) == sorted(everything)  # a partition of the training data
    with pytest.raises(DataError, match="leaves none to train on"):
        ready(make(val_fraction=0.999, **args))


def test_val_files_win_over_val_fraction(tmp_path, tokenizer_dir):
    files = write_sentiment(tmp_path)
    dm = ready(
        ClassificationDataModule(
            train_files=str(files["train"]),
            val_files=str(files["dev"]),
            text_column="sentence",
            tokenizer=tokenizer_dir,
            val_fraction=0.5,
        )
    )
    assert (len(dm.train_dataset), len(dm.val_dataset)) == (84, 18)


@pytest.mark.parametrize("kind", ["classification", "ner"])
def test_test_files_are_checked_at_fit(kind, tmp_path, tokenizer_dir):
    if kind == "classification":
        files = write_sentiment(tmp_path)
        dm = ClassificationDataModule(
            train_files=str(files["train"]),
            test_files=str(tmp_path / "tset.tsv"),
            text_column="sentence",
            tokenizer=tokenizer_dir,
        )
    else:
        write_conll(tmp_path / "ner.train", ner_sentences(20))
        dm = TokenClassificationDataModule(
            train_files=str(tmp_path / "ner.train"),
            test_files=str(tmp_path / "ner.tset"),
            tokenizer=tokenizer_dir,
        )
    with pytest.raises(DataError, match="test_files: no file matches .*tset"):
        ready(dm)


def test_unseen_characters_become_unk_with_one_counted_warning(tmp_path):
    (tmp_path / "train.tsv").write_text("text\tlabel\ngood movie\tpos\nbad plot\tneg\n")
    (tmp_path / "dev.tsv").write_text(
        "text\tlabel\ngood \U0001f600\tpos\nbad plot\tneg\nbad \u2603 \u2603\tneg\n"
    )
    dm = ClassificationDataModule(
        train_files=str(tmp_path / "train.tsv"),
        val_files=str(tmp_path / "dev.tsv"),
        tokenizer=Char(),
        cache_dir=str(tmp_path / "cache"),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ready(dm)
    messages = [str(w.message) for w in caught if "no token for" in str(w.message)]
    assert len(messages) == 1, messages  # one per split, none for the training split
    assert "val data: 2 of 3 examples" in messages[0]
    assert f"{tmp_path / 'dev.tsv'} line 2: '\U0001f600'" in messages[0] and "line 4: '\u2603'" in messages[0]
    unk = dm.tokenizer.unk_token_id
    assert [unk in item["input_ids"] for item in dm.val_dataset] == [True, False, True]


def test_unencodable_text_in_ner_names_file_line_and_character(tmp_path):
    write_conll(tmp_path / "ner.train", ner_sentences(10))
    bad = tmp_path / "ner.testa"
    bad.write_text("John NNP B-NP B-PER\n\nAnna NNP B-NP B-PER\n\u00e9t\u00e9 NNP B-NP O\n")
    dm = TokenClassificationDataModule(
        train_files=str(tmp_path / "ner.train"),
        val_files=str(bad),
        tokenizer=Char(unk_token=None),
        cache_dir=str(tmp_path / "cache"),
    )
    with pytest.raises(DataError, match=rf"{bad} line 3: the tokenizer cannot encode the character '\u00e9'"):
        ready(dm)


def test_integer_label_names_and_a_run_without_validation(tmp_path, capsys, recwarn):
    # SST-2-like 0 / 1 labels named by integers, no validation at all: fit says so at the start and
    # still leaves best.ckpt, which `test` (the README's next command) reads.
    config = finetune_config(tmp_path, "classification", write_sentiment(tmp_path))
    data = config["data"]["init_args"]
    del data["val_files"]
    data.update(val_fraction=0.0, label_names=[0, 1])
    config["trainer"].update(max_steps=2)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    code, err = run_cli(capsys, "fit", "--config", str(path))
    assert code == 0, err
    assert any("no validation data" in str(w.message) and "best.ckpt" in str(w.message) for w in recwarn)
    best = tmp_path / "logs" / "classification" / "version_0" / "checkpoints" / "best.ckpt"
    assert best.is_file()
    code, err = run_cli(capsys, "test", "--ckpt_path", str(best))
    assert code == 0, err
    report = (best.parent.parent / "reports" / "test_report.txt").read_text()
    assert "\n           0     " in report and "\n           1     " in report  # integer names label the rows


# ----------------------------------------------------------------------------- instruction data
INSTRUCTIONS = [
    {"id": "a", "instruction": "Add the numbers.", "instances": [{"input": "2 3", "output": "5"}]},
    {"id": "b", "instruction": "Say hello.", "instances": [{"input": "", "output": "hello"}]},
]
TEMPLATE = (
    "{{ instruction }}\n{% if instances[0].input %}\nInput: {{ instances[0].input }}\n{% endif %}\nOutput: "
)


def sft(tmp_path, tokenizer_dir, records, stage="fit", **kwargs):
    from gptlab.data import SFTDataModule

    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    args = {"train_files": str(path), "tokenizer": tokenizer_dir, "val_fraction": 0.0, **kwargs}
    if stage == "test":
        args["test_files"] = args.pop("train_files")
    dm = SFTDataModule(**args)
    dm.prepare_data()
    dm.setup(stage)
    return dm, path


def test_nested_fields_and_a_jinja_template_with_an_optional_part(tmp_path, tokenizer_dir):
    dm, _ = sft(
        tmp_path,
        tokenizer_dir,
        INSTRUCTIONS,
        stage="test",
        prompt_template=TEMPLATE,
        completion_field="instances.0.output",
    )
    items = dm.test_dataset.items
    # The empty input leaves no "Input:" line and no blank line behind.
    assert [i["prompt"] for i in items] == ["Add the numbers.\nInput: 2 3\nOutput: ", "Say hello.\nOutput: "]
    assert [i["reference"] for i in items] == ["5", "hello"]
    # A plain field path for the prompt as well (no template).
    dm, _ = sft(
        tmp_path,
        tokenizer_dir,
        INSTRUCTIONS,
        stage="test",
        prompt_field="instances.0.input",
        completion_field="instances.0.output",
    )
    assert [i["prompt"] for i in dm.test_dataset.items] == ["2 3", ""]


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (
            {"prompt_template": TEMPLATE, "completion_field": "instances.1.output"},
            ["line 1: no item 1 in 'instances' (a list of 1)", "completion_field"],
        ),
        (
            {"prompt_template": TEMPLATE, "completion_field": "instances.0.answer"},
            ["line 1: no 'answer' in 'instances.0'", "'input', 'output'"],
        ),
        (
            {"prompt_template": "{{ instructions }}: ", "completion_field": "instances.0.output"},
            ["line 1: prompt_template uses a value the record does not have", "'instructions' is undefined"],
        ),
    ],
)
def test_nested_field_and_template_errors_name_the_record_and_the_path(
    tmp_path, tokenizer_dir, args, needles
):
    with pytest.raises(DataError) as err:
        sft(tmp_path, tokenizer_dir, INSTRUCTIONS, **args)
    for needle in needles:
        assert needle in str(err.value), str(err.value)


def test_a_broken_jinja_template_is_a_config_error(tmp_path, tokenizer_dir):
    from gptlab.errors import ConfigError

    with pytest.raises(ConfigError, match="not a valid Jinja template"):
        sft(tmp_path, tokenizer_dir, INSTRUCTIONS, prompt_template="{% if instruction %}{{ instruction }}")


@pytest.mark.parametrize(
    ("template", "needles"),
    [
        ("{{ 'a' * 10**13 }}", ["'a' * 10000000000000 would make 10000000000000 items"]),
        ("{% for i in range(10**9) %}x{% endfor %}", ["ranges larger than MAX_RANGE"]),
        (
            "{% for i in range(99999) %}{{ instruction * 50 }}{% endfor %}",
            ["renders more than 1000000 characters"],
        ),
        (
            "{% set r = range(99999)|list %}{% for i in r %}{% for j in r %}{% endfor %}{% endfor %}",
            ["took more"],
        ),
    ],
    ids=["string_times_huge", "huge_range", "huge_output", "nested_loops"],
)
def test_a_jinja_template_is_bounded_in_size_and_time(
    tmp_path, tokenizer_dir, monkeypatch, template, needles
):
    """Was a hang, a MemoryError or an OverflowError trace: one line naming the record."""
    from gptlab.data import templates

    monkeypatch.setattr(templates, "RENDER_SECONDS", 0.3)
    start = time.monotonic()
    with pytest.raises(DataError) as err:
        sft(
            tmp_path,
            tokenizer_dir,
            INSTRUCTIONS,
            prompt_template=template,
            completion_field="instances.0.output",
        )
    assert time.monotonic() - start < 30
    assert "records.jsonl line 1: prompt_template" in str(err.value), str(err.value)
    for needle in needles:
        assert needle in str(err.value), str(err.value)


@pytest.mark.parametrize(
    "tag", ["{% include 'other.j2' %}", "{% import 'macros.j2' as m %}", "{% extends 'base.j2' %}"]
)
def test_a_jinja_template_that_reads_other_template_files_is_refused(tag):
    from gptlab.data import SFTDataModule
    from gptlab.errors import ConfigError

    with pytest.raises(ConfigError, match=r"reads another template file, which a prompt template may not"):
        SFTDataModule(train_files="x.jsonl", prompt_template="{{ instruction }}" + tag)


def test_a_jinja_template_with_str_format_fields_warns():
    """`{q}` in a Jinja template is text: every prompt would hold '{q}' instead of the question."""
    from gptlab.data import SFTDataModule

    with pytest.warns(
        UserWarning, match=r"where \{q\} stays as written in every prompt .*: write \{\{ q \}\}"
    ):
        SFTDataModule(train_files="x.jsonl", prompt_template="{{ instruction }}\nQ: {q}\nA: ")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SFTDataModule(train_files="x.jsonl", prompt_template="{{ instruction }}\nQ: {{q}}\nA: ")


def test_the_readme_data_examples_run_as_written(tmp_path, monkeypatch):
    # README "Labelled data and instructions": each `data:` block, on small files of its shape.
    readme = (REPO / "README.md").read_text()
    block = readme.split("### Labelled data and instructions")[1].split("```yaml")[1].split("```")[0]
    chunks = ["data:" + c for c in block.split("data:")[1:]]
    configs = [yaml.safe_load(chunk)["data"] for chunk in chunks]
    assert [c["class_path"].rsplit(".", 1)[1] for c in configs] == [
        "ClassificationDataModule",
        "TokenClassificationDataModule",
        "SFTDataModule",
    ]
    monkeypatch.chdir(tmp_path)
    for folder in ("news", "wnut17"):
        (tmp_path / folder).mkdir()
    rows = [f"{w} news today\t{i % 4 + 1}" for i, w in enumerate(["stocks", "match", "rocket", "vote"] * 5)]
    (tmp_path / "news/train.tsv").write_text("\n".join(rows) + "\n")
    (tmp_path / "news/test.tsv").write_text("\n".join(rows[:4]) + "\n")
    write_conll(tmp_path / "wnut17/train.conll", ner_sentences(20), docstart=False)
    write_conll(tmp_path / "wnut17/dev.conll", ner_sentences(5, seed=1), docstart=False)
    (tmp_path / "instructions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in INSTRUCTIONS * 5))
    import importlib

    for config in configs:
        module, name = config["class_path"].rsplit(".", 1)
        args = dict(config["init_args"], tokenizer=BPE(vocab_size=300), cache_dir=str(tmp_path / "cache"))
        dm = ready(getattr(importlib.import_module(module), name)(**args))
        assert len(dm.train_dataset) > 0 and dm.val_dataset is not None
    assert dm.val_dataset.items[0]["prompt"].endswith("Output: ")


def test_a_10_mb_field_in_a_tsv_or_csv_loads_and_an_unclosed_quote_is_named(tmp_path):
    """The csv module's 128 KiB field limit is no data error: a long text loads as from .jsonl.

    A csv whose quote never closes (what the limit guards against) still fails in one line, at
    the line the quote opens.
    """
    from gptlab.data.sources import read_table

    long = "word " * 2_000_000  # 10 MB
    for suffix, sep in ((".tsv", "\t"), (".csv", ",")):
        path = tmp_path / f"long{suffix}"
        path.write_text(f"text{sep}label\nshort{sep}pos\n{long}{sep}neg\n")
        rows = [record for _, record in read_table(path, ["text", "label"])]
        assert [len(r["text"]) for r in rows] == [5, len(long)] and rows[1]["label"] == "neg"
    broken = tmp_path / "broken.csv"
    broken.write_text('text,label\n"never closed,pos\n' + "more,neg\n" * 50_000)
    with pytest.raises(DataError, match=r"broken.csv line 2: 1 fields, but the header has 2"):
        list(read_table(broken, ["text", "label"]))


def test_column_names_given_twice_or_without_columns_are_refused(tmp_path, tokenizer_dir):
    # [sentence, sentence] would read each row as {sentence: <the label>}: leaked labels as text.
    (tmp_path / "train.tsv").write_text("good movie\tpos\nbad plot\tneg\n")
    common = {"train_files": str(tmp_path / "train.tsv"), "tokenizer": tokenizer_dir, "val_fraction": 0.0}
    with pytest.raises(ConfigError, match=r"column_names=\['sentence', 'sentence'\]: 'sentence' given more"):
        ClassificationDataModule(column_names=["sentence", "sentence"], text_column="sentence", **common)
    with pytest.raises(DataError, match=r"2 fields, but .*column_names names 3 \(no column for 'extra'\)"):
        ready(ClassificationDataModule(column_names=["text", "label", "extra"], **common))
    # A header naming the text column twice.
    (tmp_path / "dup.tsv").write_text("text\ttext\tlabel\ngood\tmovie\tpos\n")
    with pytest.raises(DataError, match="line 1: the header names the column 'text' more than once"):
        ready(ClassificationDataModule(**{**common, "train_files": str(tmp_path / "dup.tsv")}))
