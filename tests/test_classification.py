"""Sequence classification: the report table against scikit-learn, the task, and ClassificationDataModule."""

from __future__ import annotations

import json
import warnings

import datasets
import numpy as np
import pytest
import torch
from sklearn.metrics import classification_report, confusion_matrix
from torchmetrics.classification import MultilabelStatScores

from gptlab.data import BPE, ClassificationDataModule, DataError
from gptlab.errors import ConfigError
from gptlab.metrics import confusion_scores_table, confusion_table, scores_table
from gptlab.models import GPT
from gptlab.reports import Report
from gptlab.tasks import SequenceClassification
from gptlab.tasks.sequence_classification import pool

NAMES = ["ant", "bee", "cat", "dog", "eel"]


def tiny_gpt() -> GPT:
    return GPT(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16)


# ----------------------------------------------------------------------------- report tables
def test_table_equals_sklearn_classification_report_with_zero_division():
    # "dog" is never predicted (precision 0/0), "eel" never occurs nor is predicted (support 0),
    # "ant" is over-predicted: every zero-division branch of sklearn's definitions.
    y_true = [0, 0, 1, 1, 2, 2, 2, 3, 0, 1]
    y_pred = [0, 1, 1, 1, 2, 0, 0, 0, 0, 2]
    table, summary = confusion_scores_table(
        NAMES, torch.tensor(confusion_matrix(y_true, y_pred, labels=range(5)))
    )
    expected = classification_report(
        y_true, y_pred, labels=range(5), target_names=NAMES, output_dict=True, zero_division=0
    )
    rows = {row[0]: row[1:] for row in table.rows}
    assert list(rows) == [*NAMES, "accuracy", "macro avg", "weighted avg"]
    for name in [*NAMES, "macro avg", "weighted avg"]:
        precision, recall, f1, support = rows[name]
        ref = expected[name]
        assert (precision, recall, f1) == pytest.approx(
            (ref["precision"], ref["recall"], ref["f1-score"]), abs=1e-12
        )
        assert support == ref["support"]
    assert rows["accuracy"][:2] == [None, None]
    assert rows["accuracy"][2] == pytest.approx(expected["accuracy"]) and rows["accuracy"][3] == len(y_true)
    assert summary["macro_f1"] == pytest.approx(expected["macro avg"]["f1-score"])
    # The printed layout is sklearn's: label column, then the four right-aligned columns.
    lines = Report("r", tables=[table]).to_text().splitlines()
    header = next(line for line in lines if "precision" in line)
    assert header.split() == ["precision", "recall", "f1-score", "support"]
    assert lines[lines.index(header) + 1].split() == ["ant", "0.4000", "0.6667", "0.5000", "3"]


def test_table_with_no_examples_at_all_is_zero_not_nan():
    table, summary = confusion_scores_table(["a", "b"], torch.zeros(2, 2, dtype=torch.long))
    assert all(v == 0 for row in table.rows for v in row[1:] if v is not None)
    assert summary["weighted_f1"] == 0.0


def test_confusion_table_rows_are_true_columns_predicted():
    table = confusion_table(["a", "b"], torch.tensor([[3, 1], [0, 2]]))
    assert table.columns == ["a", "b"] and table.rows == [["a", 3, 1], ["b", 0, 2]]


def test_multilabel_table_equals_sklearn():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 2, size=(30, 4))
    y_true[:, 3] = 0  # a label that never occurs
    y_pred = rng.integers(0, 2, size=(30, 4))
    stats = MultilabelStatScores(4, average=None)(torch.tensor(y_pred).float(), torch.tensor(y_true))
    table, _ = scores_table(NAMES[:4], stats[:, 0], stats[:, 1], stats[:, 3])
    expected = classification_report(
        y_true, y_pred, target_names=NAMES[:4], output_dict=True, zero_division=0
    )
    for row in table.rows:
        ref = expected[row[0]]
        assert row[1:4] == pytest.approx([ref["precision"], ref["recall"], ref["f1-score"]], abs=1e-12), row[
            0
        ]
        assert row[4] == ref["support"]


# ----------------------------------------------------------------------------- the task
def test_last_token_pooling_ignores_right_padding():
    torch.manual_seed(0)
    model = SequenceClassification(tiny_gpt(), label_names=["no", "yes"]).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    alone = model({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    padded = torch.tensor([[5, 6, 7, 8, 0, 0], [9, 9, 9, 9, 9, 9]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6])
    torch.testing.assert_close(model({"input_ids": padded, "attention_mask": mask})[:1], alone)
    hidden = torch.arange(12.0).reshape(1, 4, 3)
    assert pool(hidden, torch.tensor([[1, 1, 0, 0]]), "mean").tolist() == [[1.5, 2.5, 3.5]]
    assert pool(hidden, torch.tensor([[1, 1, 0, 0]]), "last").tolist() == [[3.0, 4.0, 5.0]]


def test_losses_single_and_multi_label():
    torch.manual_seed(0)
    single = SequenceClassification(tiny_gpt(), label_names=["a", "b", "c"])
    batch = {"input_ids": torch.randint(0, 64, (4, 5)), "attention_mask": torch.ones(4, 5, dtype=torch.long)}
    batch["labels"] = torch.tensor([0, 2, -100, 1])
    logits = single(batch)
    expected = torch.nn.functional.cross_entropy(logits[[0, 1, 3]], batch["labels"][[0, 1, 3]])
    torch.testing.assert_close(single.loss(logits, batch), expected)
    multi = SequenceClassification(tiny_gpt(), label_names=["a", "b", "c"], multi_label=True)
    batch["labels"] = torch.tensor([[1, 0, 1], [0, 0, 0], [-100, -100, -100], [0, 1, 1]])
    logits = multi(batch)
    keep = [0, 1, 3]
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        logits[keep], batch["labels"][keep].float()
    )
    torch.testing.assert_close(multi.loss(logits, batch), expected)


def test_freeze_backbone_and_backbone_learning_rate_scale():
    frozen = SequenceClassification(tiny_gpt(), label_names=["a", "b"], freeze_backbone=True, scheduler=None)
    optimizer = frozen.configure_optimizers()
    trainable = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert trainable == {id(p) for p in frozen.head.parameters()}
    slow = SequenceClassification(tiny_gpt(), label_names=["a", "b"], backbone_lr_scale=0.1, scheduler=None)
    slow.optimizer_factory = lambda groups: torch.optim.AdamW(groups, lr=1e-3)
    optimizer = slow.configure_optimizers()
    backbone = {id(p) for p in slow.backbone.parameters()}
    for group in optimizer.param_groups:
        in_backbone = {id(p) in backbone for p in group["params"]}
        assert len(in_backbone) == 1  # a group is all backbone or all head
        assert group["lr"] == pytest.approx(1e-4 if in_backbone.pop() else 1e-3)
    with pytest.raises(ConfigError, match="backbone_lr_scale"):
        SequenceClassification(tiny_gpt(), label_names=["a", "b"], backbone_lr_scale=-1)


def test_task_refuses_missing_or_single_labels():
    with pytest.raises(ConfigError, match="needs label_names"):
        SequenceClassification(tiny_gpt())
    with pytest.raises(ConfigError, match="at least 2 labels"):
        SequenceClassification(tiny_gpt(), label_names=["only"])
    with pytest.raises(ConfigError, match="no backbone"):
        SequenceClassification(label_names=["a", "b"])


# ----------------------------------------------------------------------------- the data module
@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    BPE(vocab_size=300).train(
        ["the movie was good and great, the plot was bad or dull. " * 20]
    ).save_pretrained(str(directory))
    return str(directory)


def data(tmp_path, tokenizer_dir, **kwargs) -> ClassificationDataModule:
    # No held-out validation unless a test asks: these tests count the training examples.
    kwargs.setdefault("val_fraction", 0.0)
    return ClassificationDataModule(tokenizer=tokenizer_dir, cache_dir=str(tmp_path / "cache"), **kwargs)


def test_label_names_inferred_or_given(tmp_path, tokenizer_dir):
    train = tmp_path / "train.tsv"
    train.write_text('sentence\tlabel\nthe movie\t10\ngood plot\t2\nbad "plot"\t2\n')
    assert data(tmp_path, tokenizer_dir, train_files=str(train), text_column="sentence").label_names == [
        "2",
        "10",
    ]
    named = data(
        tmp_path, tokenizer_dir, train_files=str(train), text_column="sentence", label_names=["x"] * 11
    )
    with pytest.raises(ConfigError, match="duplicates"):
        named.setup("fit")
    # Integer labels index names that are not integers (SST-2's 0 / 1 -> negative / positive).
    train.write_text("sentence\tlabel\nthe movie\t0\ngood plot\t1\n")
    dm = data(
        tmp_path, tokenizer_dir, train_files=str(train), text_column="sentence", label_names=["neg", "pos"]
    )
    dm.setup("fit")
    assert [item["labels"] for item in dm.train_dataset] == [0, 1]


def test_every_file_format_and_a_dataset(tmp_path, tokenizer_dir):
    records = [{"text": "good movie", "label": "pos"}, {"text": "bad, dull plot", "label": "neg"}]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "a.json").write_text(json.dumps(records))
    (tmp_path / "a.csv").write_text('text,label\n"good, great movie",pos\nbad plot,neg\n')
    datasets.Dataset.from_list(records).to_parquet(str(tmp_path / "a.parquet"))
    for name in ("a.jsonl", "a.json", "a.csv", "a.parquet"):
        dm = data(tmp_path, tokenizer_dir, train_files=str(tmp_path / name))
        dm.setup("fit")
        assert dm.label_names == ["neg", "pos"], name
        assert [item["labels"] for item in dm.train_dataset] == [1, 0], name
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])}
    )
    saved = tmp_path / "dataset"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(
                [{"text": "good", "label": 1}, {"text": "bad", "label": 0}], features=features
            ),
            "test": datasets.Dataset.from_list([{"text": "great", "label": 1}], features=features),
        }
    ).save_to_disk(str(saved))
    dm = data(tmp_path, tokenizer_dir, dataset=str(saved))
    assert dm.label_names == ["neg", "pos"]  # from the ClassLabel feature
    dm.setup("test")
    assert [item["labels"] for item in dm.test_dataset] == [1]


def test_multi_label_lists_and_separated_strings(tmp_path, tokenizer_dir):
    (tmp_path / "m.jsonl").write_text('{"text": "a b", "label": ["x", "z"]}\n{"text": "c", "label": []}\n')
    (tmp_path / "m.tsv").write_text("text\tlabel\nthe good movie was great\tx|z\nc\ty\n")
    dm = data(tmp_path, tokenizer_dir, train_files=str(tmp_path / "m.jsonl"), multi_label=True)
    dm.setup("fit")
    assert dm.label_names == ["x", "z"]
    assert [item["labels"] for item in dm.train_dataset] == [[1, 1], [0, 0]]
    dm = data(
        tmp_path, tokenizer_dir, train_files=str(tmp_path / "m.tsv"), multi_label=True, label_separator="|"
    )
    dm.setup("fit")
    assert dm.label_names == ["x", "y", "z"]
    batch = dm.collate([dm.train_dataset[0], dm.train_dataset[1]])
    assert batch["labels"].tolist() == [[1, 0, 1], [0, 1, 0]]


def test_bad_rows_are_reported_with_file_and_line(tmp_path, tokenizer_dir):
    train = tmp_path / "train.tsv"
    train.write_text("sentence\tlabel\ngood movie\tpos\nbad plot\tneg\n")
    val = tmp_path / "dev.tsv"
    val.write_text("sentence\tlabel\ngood\tpos\n   \tneg\nfine\tneutral\n")
    dm = data(tmp_path, tokenizer_dir, train_files=str(train), val_files=str(val), text_column="sentence")
    with pytest.raises(DataError) as err:
        dm.setup("fit")
    message = str(err.value)
    assert f"{val} line 3: empty text" in message
    assert f"{val} line 4: unknown label 'neutral' (labels: neg, pos)" in message
    assert "2 problem(s)" in message
    val.write_text("sentence\tlabel\ngood\tpos\textra\n")
    with pytest.raises(DataError, match=f"{val} line 2: 3 fields, but the header has 2"):
        dm.setup("fit")
    val.write_text("text\tlabel\ngood\tpos\n")
    with pytest.raises(DataError, match="no column 'sentence'"):
        dm.setup("fit")


def test_long_texts_are_truncated_with_a_counted_warning(tmp_path, tokenizer_dir):
    train = tmp_path / "train.tsv"
    train.write_text("text\tlabel\n" + "the movie was good " * 10 + "\tpos\nbad\tneg\n")
    dm = data(tmp_path, tokenizer_dir, train_files=str(train), block_size=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup("fit")
    message = " ".join(str(w.message) for w in caught)
    assert "1 of 2 examples are longer than block_size=8" in message
    assert [len(item["input_ids"]) for item in dm.train_dataset] == [8, 1]


def test_model_and_data_label_names_must_agree(tmp_path, tokenizer_dir):
    train = tmp_path / "train.tsv"
    train.write_text("text\tlabel\ngood\tpos\nbad\tneg\n")
    dm = data(tmp_path, tokenizer_dir, train_files=str(train), block_size=16)
    dm.setup("fit")
    model = SequenceClassification(
        GPT(vocab_size=320, block_size=16, n_layer=1, n_head=2, n_embd=16), ["pos", "neg"]
    )
    with pytest.raises(ConfigError, match=r"\['neg', 'pos'\] differ from the model's \['pos', 'neg'\]"):
        model.check_data(dm)


def test_multi_label_fit_test_report_and_predict(tmp_path, tokenizer_dir):
    import lightning as L

    train = tmp_path / "train.jsonl"
    rows = [
        ("good great movie", ["good"]),
        ("bad plot", ["bad"]),
        ("good and bad", ["good", "bad"]),
        ("the", []),
    ]
    train.write_text("".join(json.dumps({"text": t, "label": labels}) + "\n" for t, labels in rows * 4))
    dm = data(
        tmp_path,
        tokenizer_dir,
        train_files=str(train),
        test_files=str(train),
        multi_label=True,
        block_size=16,
    )
    model = SequenceClassification(
        GPT(vocab_size=320, block_size=16, n_layer=1, n_head=2, n_embd=16), dm.label_names, multi_label=True
    )
    trainer = L.Trainer(
        max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(model, dm)
    trainer.test(model, dm, verbose=False)
    report = model.test_report
    scores, confusion = report.tables
    assert [row[0] for row in scores.rows] == ["bad", "good", "micro avg", "macro avg", "weighted avg"]
    assert scores.rows[-1][-1] == 16  # 4 x (1 + 1 + 2 + 0) labels
    assert confusion.columns == ["tn", "fp", "fn", "tp"]
    assert all(sum(row[1:]) == 16 for row in confusion.rows)  # every label of every example counted
    assert 0.0 <= report.metrics["exact_match"] <= 1.0
    trainer.predict(model, dm)
    lines = (tmp_path / "predictions" / "predictions.tsv").read_text().splitlines()
    assert len(lines) == 17 and lines[1].split("\t")[:2] == ["good great movie", "good"]


def test_label_names_the_training_data_never_uses_warn(tmp_path, tokenizer_dir):
    train = tmp_path / "train.tsv"
    train.write_text("sentence\tlabel\n" + "the movie was good\tpositive\nthe plot was bad\tnegative\n" * 4)
    dm = data(
        tmp_path, tokenizer_dir, train_files=str(train), text_column="sentence",
        label_names=["negative", "positive", "neutral", "mixed"],
    )  # fmt: skip
    with pytest.warns(UserWarning, match=r"label_names: 'neutral', 'mixed' never occur in the training data"):
        dm.setup("fit")
    assert dm.label_names == ["negative", "positive", "neutral", "mixed"]  # still a warning, not an error


def test_labels_that_differ_only_by_whitespace_are_merged_with_a_warning(tmp_path):
    """'pos' and 'pos ' (a stray space in a csv) become one class, as before, but no longer silently."""

    train = tmp_path / "train.csv"
    train.write_text('text,label\ngood,pos\nfine,"pos "\nbad,neg\n')
    dm = ClassificationDataModule(train_files=str(train), text_column="text", tokenizer=None)
    with pytest.warns(
        UserWarning, match=r"differ only by surrounding whitespace are one label: 'pos' and 'pos ' as 'pos'"
    ):
        assert dm.label_names == ["neg", "pos"]
