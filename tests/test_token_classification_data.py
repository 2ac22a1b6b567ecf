"""TokenClassificationDataModule: CoNLL / jsonl / dataset reading, sub-word alignment, truncation, errors;
and the task's word-level predictions from first sub-tokens."""

from __future__ import annotations

import warnings

import datasets
import pytest
import torch

from finetune_data import ner_sentences, write_conll
from gptlab.data import BPE, DataError, TokenClassificationDataModule
from gptlab.models import GPT
from gptlab.tasks import TokenClassification
from gptlab.tasks.token_classification import word_predictions

TAGS = ["O", "B-LOC", "B-PER", "I-PER"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    text = " ".join(w for s in ner_sentences(50) for w, _ in s) + " Smithsonian Londoners"
    BPE(vocab_size=300).train([text]).save_pretrained(str(directory))
    return str(directory)


def module(tmp_path, tokenizer_dir, **kwargs) -> TokenClassificationDataModule:
    kwargs.setdefault("val_fraction", 0.0)  # no held-out validation unless a test asks
    return TokenClassificationDataModule(tokenizer=tokenizer_dir, cache_dir=str(tmp_path / "cache"), **kwargs)


def test_conll_files_docstart_and_blank_lines(tmp_path, tokenizer_dir):
    train = tmp_path / "eng.train"
    train.write_text(
        "-DOCSTART- -X- -X- O\n\nJohn NNP B-NP B-PER\nSmith NNP I-NP I-PER\n\n\n"
        "-DOCSTART- -X- -X- O\nwent VBD B-VP O\nto TO B-PP O\nParis NNP B-NP B-LOC\n"
    )
    dm = module(tmp_path, tokenizer_dir, train_files=str(train))
    assert dm.label_names == TAGS  # O first, then by type: LOC, PER (B before I)
    sentences = list(dm.sentences("train"))
    assert [s[1] for s in sentences] == [["John", "Smith"], ["went", "to", "Paris"]]
    assert sentences[1][3][2] == f"{train} line 10"  # "Paris"
    # Another tag column (the chunk tags) and a tab separator.
    chunks = module(tmp_path, tokenizer_dir, train_files=str(train), tag_column=2)
    assert chunks.label_names == ["B-NP", "I-NP", "B-PP", "B-VP"]
    tabbed = tmp_path / "tabbed.train"
    tabbed.write_text("New York\tB-LOC\nis\tO\n")
    dm = module(tmp_path, tokenizer_dir, train_files=str(tabbed), column_separator="\t")
    assert next(dm.sentences("train"))[1] == ["New York", "is"]


def test_wrong_number_of_columns_names_file_and_line(tmp_path, tokenizer_dir):
    train = tmp_path / "eng.train"
    train.write_text("John NNP B-NP B-PER\nSmith NNP I-NP I-PER\n\nwent VBD O\n")
    with pytest.raises(DataError, match=f"{train} line 4: 3 column\\(s\\), expected 4 as on line 1"):
        _ = module(tmp_path, tokenizer_dir, train_files=str(train)).label_names
    train.write_text("John\nSmith\n")
    with pytest.raises(DataError, match="line 1: 1 column"):
        _ = module(tmp_path, tokenizer_dir, train_files=str(train)).label_names


def test_first_sub_token_carries_the_tag(tmp_path, tokenizer_dir):
    train = write_conll(
        tmp_path / "eng.train", [[("Smithsonian", "B-PER"), ("went", "O"), ("Londoners", "B-LOC")]]
    )
    dm = module(tmp_path, tokenizer_dir, train_files=str(train))
    dm.setup("fit")
    item = dm.train_dataset[0]
    tokenizer = dm.tokenizer
    pieces = [tokenizer.decode([i]) for i in item["input_ids"]]
    assert "".join(pieces) == "Smithsonian went Londoners"
    assert len(pieces) > 3, "the test needs words split into several sub-tokens"
    words = ["Smithsonian", " went", " Londoners"]
    for w, word in enumerate(words):  # each word's tokens are contiguous and spell it
        assert "".join(p for p, i in zip(pieces, item["word_ids"], strict=True) if i == w) == word
    first = [k for k, w in enumerate(item["word_ids"]) if w >= 0 and (k == 0 or item["word_ids"][k - 1] != w)]
    labels = dm.label_names
    assert [item["labels"][k] for k in first] == [
        labels.index("B-PER"),
        labels.index("O"),
        labels.index("B-LOC"),
    ]
    assert all(item["labels"][k] == -100 for k in range(len(pieces)) if k not in first)
    # label_all_subtokens: the later pieces of a B- word train on its I- tag (when it exists).
    dm = module(tmp_path, tokenizer_dir, train_files=str(train), label_all_subtokens=True, label_names=TAGS)
    dm.setup("fit")
    item = dm.train_dataset[0]
    person = [item["labels"][k] for k, w in enumerate(item["word_ids"]) if w == 0]
    assert person == [TAGS.index("B-PER")] + [TAGS.index("I-PER")] * (len(person) - 1)
    location = [item["labels"][k] for k, w in enumerate(item["word_ids"]) if w == 2]
    assert set(location) == {TAGS.index("B-LOC")}  # no I-LOC in this tag set


def test_truncation_keeps_every_gold_word_and_predicts_the_rest_as_o(tmp_path, tokenizer_dir):
    sentence = [("John", "B-PER"), ("Smith", "I-PER")] + [("went", "O")] * 10 + [("Paris", "B-LOC")]
    train = write_conll(tmp_path / "eng.train", [sentence, sentence[:3]])
    dm = module(tmp_path, tokenizer_dir, train_files=str(train), block_size=6, label_names=TAGS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup("fit")
    assert any("1 of 2 examples are longer than block_size=6" in str(w.message) for w in caught)
    batch = dm.collate([dm.train_dataset[0], dm.train_dataset[1]])
    assert batch["input_ids"].shape[1] == 6
    assert batch["word_labels"].shape == (2, 13)  # every word keeps its gold tag
    assert batch["word_labels"][1, 3:].tolist() == [-100] * 10
    # A perfect model on the kept tokens still misses the cut-off Paris: predicted O.
    perfect = torch.where(batch["labels"] >= 0, batch["labels"], 0)
    preds = word_predictions(perfect, batch["word_ids"], 13, fill=0)
    assert preds[0, -1].item() == TAGS.index("O") and batch["word_labels"][0, -1].item() == TAGS.index(
        "B-LOC"
    )
    assert preds[0, :2].tolist() == [TAGS.index("B-PER"), TAGS.index("I-PER")]


def test_word_predictions_read_the_first_sub_token():
    token_preds = torch.tensor([[5, 1, 2, 3, 4, 9]])
    word_ids = torch.tensor([[-1, 0, 0, 1, 1, -1]])  # a special token, two words of two pieces, padding
    assert word_predictions(token_preds, word_ids, 3, fill=7).tolist() == [[1, 3, 7]]


def test_jsonl_and_dataset_sources(tmp_path, tokenizer_dir):
    (tmp_path / "train.jsonl").write_text(
        '{"tokens": ["John", "went"], "tags": ["B-PER", "O"]}\n{"tokens": ["Paris"], "tags": ["B-LOC"]}\n'
    )
    dm = module(tmp_path, tokenizer_dir, train_files=str(tmp_path / "train.jsonl"))
    assert dm.label_names == ["O", "B-LOC", "B-PER"]
    (tmp_path / "bad.jsonl").write_text('{"tokens": ["John", "went"], "tags": ["B-PER"]}\n')
    with pytest.raises(DataError, match="line 1: 2 tokens but 1 tags"):
        _ = module(tmp_path, tokenizer_dir, train_files=str(tmp_path / "bad.jsonl")).label_names
    (tmp_path / "empty.jsonl").write_text('{"tokens": ["John", ""], "tags": ["B-PER", "O"]}\n')
    dm = module(tmp_path, tokenizer_dir, train_files=str(tmp_path / "empty.jsonl"), label_names=TAGS)
    with pytest.raises(DataError, match="line 1 token 1: empty token"):
        dm.setup("fit")
    features = datasets.Features(
        {
            "tokens": datasets.Sequence(datasets.Value("string")),
            "tags": datasets.Sequence(datasets.ClassLabel(names=TAGS)),
        }
    )
    rows = [{"tokens": ["Mary", "Smith"], "tags": [2, 3]}]
    saved = tmp_path / "dataset"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(rows, features=features),
            "test": datasets.Dataset.from_list(rows, features=features),
        }
    ).save_to_disk(str(saved))
    dm = module(tmp_path, tokenizer_dir, dataset=str(saved))
    assert dm.label_names == TAGS  # the ClassLabel names
    dm.setup("test")
    assert dm.test_dataset[0]["word_labels"] == [2, 3]


def test_unknown_tag_in_test_data_names_the_line(tmp_path, tokenizer_dir):
    train = write_conll(tmp_path / "eng.train", ner_sentences(3))
    test = tmp_path / "eng.testb"
    test.write_text("John NNP B-NP B-PER\nBerlin NNP I-NP B-CITY\n")
    dm = module(tmp_path, tokenizer_dir, train_files=str(train), test_files=str(test))
    with pytest.raises(
        DataError, match=f"{test} line 2: unknown tag 'B-CITY' \\(tags: O, B-LOC, B-PER, I-PER\\)"
    ):
        dm.setup("test")


def test_predict_file_with_words_only(tmp_path, tokenizer_dir):
    train = write_conll(tmp_path / "eng.train", ner_sentences(3))
    words = tmp_path / "words.txt"
    words.write_text("Mary\nwent\n\nto\nRome\nand\nParis\n")  # sentences of different lengths
    dm = module(tmp_path, tokenizer_dir, train_files=str(train), predict_files=str(words))
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    assert batch["words"] == [["Mary", "went"], ["to", "Rome", "and", "Paris"]]
    assert (batch["word_labels"] == -100).all()
    model = TokenClassification(GPT(vocab_size=320, block_size=32, n_layer=1, n_head=2, n_embd=16), TAGS)
    lines = model.predict_step(batch, 0)[0].splitlines()
    assert [line.split()[0] for line in lines] == ["Mary", "went"] and all(
        len(line.split()) == 2 for line in lines
    )


def test_tag_names_the_training_data_never_uses_warn(tmp_path, tokenizer_dir):
    train = tmp_path / "eng.train"
    train.write_text("John NNP B-NP B-PER\nSmith NNP I-NP I-PER\n\nwent VBD B-VP O\nto TO B-PP O\n")
    dm = module(tmp_path, tokenizer_dir, train_files=str(train), label_names=[*TAGS, "B-ORG"])
    with pytest.warns(UserWarning, match=r"label_names: 'B-LOC', 'B-ORG' never occur in the training data"):
        dm.setup("fit")
