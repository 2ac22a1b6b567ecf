"""SFTDataModule: label masking, templates, chat, packing semantics, truncation and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from gptlab.data import BPE, DEFAULT_CHAT_TEMPLATE, DataError, SFTDataModule
from gptlab.data.sft import pack
from gptlab.errors import ConfigError
from gptlab.models import GPT

IGNORE = -100
RECORDS = [
    {"question": f"What is {a} plus {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}", "id": a}
    for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16)]
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    """A small byte-level BPE trained on the records, saved like a run's `<run>/tokenizer`."""
    path = tmp_path_factory.mktemp("tok") / "tokenizer"
    texts = [r["question"] + "\n" + r["answer"] for r in RECORDS] * 5
    BPE(vocab_size=300).train(texts).save_pretrained(str(path))
    return str(path)


def write_jsonl(path: Path, records: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def setup_dm(stage: str = "fit", **kwargs) -> SFTDataModule:
    dm = SFTDataModule(**{"val_fraction": 0.0, "batch_size": 2, **kwargs})
    dm.prepare_data()
    dm.setup(stage)
    return dm


def encode(dm: SFTDataModule, text: str) -> list[int]:
    return dm.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_labels_mask_the_prompt_and_padding_and_end_with_eos(tmp_path, tokenizer_dir):
    records = [
        {"prompt": "Q: 1+2?\nA: ", "completion": "3"},
        {"prompt": "Q: 10+20?\nA: ", "completion": "30 ok"},
    ]
    dm = setup_dm(tokenizer=tokenizer_dir, train_files=write_jsonl(tmp_path / "t.jsonl", records))
    eos = dm.tokenizer.eos_token_id
    for record, item in zip(records, dm.train_dataset.items, strict=True):
        prompt, completion = encode(dm, record["prompt"]), encode(dm, record["completion"])
        assert item["input_ids"].tolist() == prompt + completion + [eos]
        assert item["labels"].tolist() == [IGNORE] * len(prompt) + completion + [eos]
    batch = dm.collate(dm.train_dataset.items)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}  # training batches: the contract
    short = int(batch["attention_mask"][0].sum())
    assert (batch["labels"][0, short:] == IGNORE).all() and (batch["attention_mask"][0, short:] == 0).all()
    assert batch["input_ids"].shape[1] == len(dm.train_dataset.items[1]["input_ids"])


def test_prompt_template_over_columns(tmp_path, tokenizer_dir):
    dm = setup_dm(
        tokenizer=tokenizer_dir,
        train_files=write_jsonl(tmp_path / "t.jsonl", RECORDS[:2]),
        prompt_template="#{id} Question: {question}\nAnswer: ",  # "#" first: still a template
        completion_field="answer",
    )
    item = dm.train_dataset.items[0]
    prompt = encode(dm, "#1 Question: What is 1 plus 2?\nAnswer: ")
    assert item["input_ids"].tolist()[: len(prompt)] == prompt
    labelled = [t for t in item["labels"].tolist() if t != IGNORE]
    assert dm.tokenizer.decode(labelled) == "1 + 2 = 3\n#### 3<|endoftext|>"


def test_evaluation_batches_carry_prompt_and_reference(tmp_path, tokenizer_dir):
    dm = setup_dm(
        "test",
        tokenizer=tokenizer_dir,
        test_files=write_jsonl(tmp_path / "t.jsonl", RECORDS[:3]),
        prompt_template="Question: {question}\nAnswer: ",
        completion_field="answer",
    )
    batch = dm.collate([dm.test_dataset[0], dm.test_dataset[1]])
    n = int(batch["prompt_length"][0])
    assert (
        dm.tokenizer.decode(batch["input_ids"][0, :n])
        == batch["prompt"][0]
        == ("Question: What is 1 plus 2?\nAnswer: ")
    )
    assert batch["reference"][0] == RECORDS[0]["answer"]
    assert (batch["labels"][0, :n] == IGNORE).all() and batch["labels"][0, n] != IGNORE


def trained_spans(dm: SFTDataModule, item: dict) -> list[str]:
    """The decoded runs of consecutive labelled tokens."""
    spans, run = [], []
    for token, label in zip(item["input_ids"].tolist(), item["labels"].tolist(), strict=True):
        if label != IGNORE:
            run.append(token)
        elif run:
            spans, run = spans + [dm.tokenizer.decode(run)], []
    return spans + ([dm.tokenizer.decode(run)] if run else [])


def test_chat_trains_assistant_turns_only(tmp_path, tokenizer_dir):
    conversation = {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
        ]
    }
    files = write_jsonl(tmp_path / "chat.jsonl", [conversation])
    # A tokenizer without a chat template gets gptlab's plain one (saved with the run's tokenizer).
    dm = setup_dm(tokenizer=tokenizer_dir, train_files=files, format="chat")
    assert dm.tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    item = dm.train_dataset.items[0]
    text = dm.tokenizer.decode(item["input_ids"])
    assert text == "user: Hi\nassistant: Hello\nuser: 2+2?\nassistant: 4\n<|endoftext|>"
    assert trained_spans(dm, item) == ["Hello\n", "4\n<|endoftext|>"]

    # The tokenizer's own template is used when it has one (ChatML here).
    chatml = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with_template = AutoTokenizer.from_pretrained(tokenizer_dir)
    with_template.chat_template = chatml
    with_template.save_pretrained(str(tmp_path / "chatml"))
    dm = setup_dm(tokenizer=str(tmp_path / "chatml"), train_files=files, format="chat")
    item = dm.train_dataset.items[0]
    assert trained_spans(dm, item) == ["Hello<|im_end|>\n", "4<|im_end|>\n<|endoftext|>"]


def test_packing_concatenates_whole_examples_in_a_seeded_order(tmp_path, tokenizer_dir):
    kwargs = dict(
        tokenizer=tokenizer_dir,
        train_files=write_jsonl(tmp_path / "t.jsonl", RECORDS),
        prompt_template="Question: {question}\nAnswer: ",
        completion_field="answer",
        block_size=100,
    )
    items = setup_dm(**kwargs).train_dataset.items
    blocks = setup_dm(packing=True, **kwargs).train_dataset.items
    assert len(blocks) < len(items) and all(len(b["input_ids"]) <= 100 for b in blocks)
    # Every block is a concatenation of whole examples; together they hold every example once.
    rows = {tuple(i["input_ids"].tolist()): i["labels"].tolist() for i in items}
    used = []
    for block in blocks:
        ids, labels = block["input_ids"].tolist(), block["labels"].tolist()
        while ids:
            match = next(r for r in rows if tuple(ids[: len(r)]) == r)
            assert labels[: len(match)] == rows[match]  # prompts stay masked inside blocks
            used.append(match)
            ids, labels = ids[len(match) :], labels[len(match) :]
    assert sorted(used) == sorted(rows)
    # The packing order is a function of the seed only.
    again = pack(items, 100, seed=1337)
    assert [b["input_ids"].tolist() for b in again] == [b["input_ids"].tolist() for b in blocks]
    assert [b["input_ids"].tolist() for b in pack(items, 100, seed=1)] != [
        b["input_ids"].tolist() for b in blocks
    ]


def test_packed_examples_see_the_earlier_ones_in_their_block(tmp_path, tokenizer_dir):
    """Plain concatenation: the first example of a block is scored as if alone, the next is not."""
    dm = setup_dm(
        tokenizer=tokenizer_dir,
        train_files=write_jsonl(tmp_path / "t.jsonl", RECORDS[:2]),
        prompt_template="Question: {question}\nAnswer: ",
        completion_field="answer",
    )
    first, second = dm.train_dataset.items
    (block,) = pack([first, second], block_size=128, seed=0)
    order = (
        (first, second)
        if block["input_ids"][: len(first["input_ids"])].equal(first["input_ids"])
        else (second, first)
    )
    torch.manual_seed(0)
    gpt = GPT(vocab_size=320, block_size=128, n_layer=2, n_head=2, n_embd=32).eval()

    def token_losses(ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            logits = gpt.logits(gpt(ids[None]))[0, :-1]
        losses = F.cross_entropy(logits, labels[1:], ignore_index=IGNORE, reduction="none")
        return losses[labels[1:] != IGNORE]

    packed = token_losses(block["input_ids"], block["labels"])
    alone = [token_losses(item["input_ids"], item["labels"]) for item in order]
    n0 = len(alone[0])
    assert len(packed) == n0 + len(alone[1])  # no loss on the boundary: next prompt starts at -100
    torch.testing.assert_close(packed[:n0], alone[0], atol=1e-5, rtol=0)
    assert not torch.allclose(packed[n0:], alone[1], atol=1e-3)  # it attends to the first example


def test_too_long_examples_are_truncated_from_the_left_with_a_warning(tmp_path, tokenizer_dir):
    records = [{"prompt": "word " * 60, "completion": "the end"}, {"prompt": "short ", "completion": "ok"}]
    with pytest.warns(UserWarning, match=r"1 of 2 train examples are longer than block_size=16"):
        dm = setup_dm(
            tokenizer=tokenizer_dir, train_files=write_jsonl(tmp_path / "t.jsonl", records), block_size=16
        )
    long = dm.train_dataset.items[0]
    assert len(long["input_ids"]) == 16
    completion = encode(dm, "the end") + [dm.tokenizer.eos_token_id]
    assert long["input_ids"].tolist()[-len(completion) :] == completion  # completion and EOS kept
    assert long["labels"].tolist()[-len(completion) :] == completion
    assert long["labels"].tolist()[0] == IGNORE


def test_truncation_warning_says_when_the_completion_itself_was_cut(tmp_path, tokenizer_dir):
    # A completion longer than block_size loses the whole prompt and its own start: the warning
    # must not say "completion kept" for it.
    records = [
        {"prompt": "word " * 60, "completion": "the end"},
        {"prompt": "short ", "completion": "word " * 60},
    ]
    path = write_jsonl(tmp_path / "t.jsonl", records)
    with pytest.warns(UserWarning) as caught:
        dm = setup_dm(tokenizer=tokenizer_dir, train_files=path, block_size=16)
    message = next(str(w.message) for w in caught if "truncated from the left" in str(w.message))
    assert "1 lost the start of their prompt (completion kept)" in message, message
    assert (
        f"1 lost their whole prompt and the start of their completion, which alone is longer (e.g. {path}"
        in message
    )
    cut = dm.train_dataset.items[1]
    assert IGNORE not in cut["labels"].tolist()  # nothing of the prompt is left


def test_validation_hold_out_is_seeded_and_test_falls_back_to_it(tmp_path, tokenizer_dir):
    kwargs = dict(
        tokenizer=tokenizer_dir,
        train_files=write_jsonl(tmp_path / "t.jsonl", RECORDS),
        prompt_template="{question}",
        completion_field="answer",
        val_fraction=0.25,
    )
    fit = setup_dm(**kwargs)
    assert (len(fit.train_dataset), len(fit.val_dataset)) == (6, 2)
    train_ids = {tuple(i["input_ids"].tolist()) for i in fit.train_dataset.items}
    val_ids = [tuple(i["input_ids"].tolist()) for i in fit.val_dataset.items]
    assert not train_ids & set(val_ids)
    test = setup_dm("test", **kwargs)
    assert [tuple(i["input_ids"].tolist()) for i in test.test_dataset.items] == val_ids


def test_parquet_json_array_and_saved_dataset_read_like_jsonl(tmp_path, tokenizer_dir):
    kwargs = dict(tokenizer=tokenizer_dir, prompt_field="question", completion_field="answer")
    reference = setup_dm(train_files=write_jsonl(tmp_path / "a.jsonl", RECORDS), **kwargs)
    ds = datasets.Dataset.from_list(RECORDS)
    ds.to_parquet(str(tmp_path / "a.parquet"))
    (tmp_path / "a.json").write_text(json.dumps(RECORDS))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "saved"))
    for source in (
        {"train_files": str(tmp_path / "a.parquet")},
        {"train_files": str(tmp_path / "a.json")},
        {"dataset": str(tmp_path / "saved")},
    ):
        dm = setup_dm(**source, **kwargs)
        assert [i["input_ids"].tolist() for i in dm.train_dataset.items] == [
            i["input_ids"].tolist() for i in reference.train_dataset.items
        ], source


def test_predict_prompts_from_a_text_file(tmp_path, tokenizer_dir):
    (tmp_path / "prompts.txt").write_text("What is 1 plus 2?\n\nWhat is 3 plus 4?\n")
    dm = setup_dm("predict", tokenizer=tokenizer_dir, predict_files=str(tmp_path / "prompts.txt"))
    batch = dm.collate(dm.predict_dataset.items)
    assert batch["prompt"] == ["What is 1 plus 2?", "What is 3 plus 4?"]
    assert batch["prompt_length"].tolist() == batch["attention_mask"].sum(1).tolist()
    assert dm.predict_dataset.items[0]["input_ids"].tolist() == encode(dm, "What is 1 plus 2?")  # no EOS


# -- bad input --------------------------------------------------------------------------------------


def test_missing_fields_are_named_with_file_and_line(tmp_path, tokenizer_dir):
    path = tmp_path / "train.jsonl"
    path.write_text(
        json.dumps({"prompt": "a", "completion": "b"})
        + "\n\n"
        + json.dumps({"prompt": "c"})
        + "\n"
        + json.dumps({"prompt": "d", "completion": 5})
        + "\n"
    )
    with pytest.raises(DataError) as err:
        setup_dm(tokenizer=tokenizer_dir, train_files=str(path))
    message = str(err.value)
    assert f"{path} line 3: no key 'completion' (keys: 'prompt'); set completion_field" in message
    assert f"{path} line 4: 'completion' is a int, not a string" in message
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", \n')
    with pytest.raises(DataError, match=r"train.jsonl line 2: not valid JSON"):
        setup_dm(tokenizer=tokenizer_dir, train_files=str(path))


def test_template_naming_a_missing_column_is_refused(tmp_path, tokenizer_dir):
    files = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    with pytest.raises(DataError) as err:
        setup_dm(
            tokenizer=tokenizer_dir,
            train_files=files,
            prompt_template="Q: {questio}",
            completion_field="answer",
        )
    message = str(err.value)
    assert "names column(s) 'questio'" in message and "'question', 'answer', 'id'" in message
    assert files in message and message.count("questio'") == 1  # one line for the file, not one per record
    with pytest.raises(ConfigError, match="must be named after columns"):
        SFTDataModule(train_files=files, prompt_template="Q: {}")


def test_other_bad_configurations(tmp_path, tokenizer_dir):
    (tmp_path / "notes.txt").write_text("x\n")
    with pytest.raises(DataError, match=r"train_files: .*notes.txt is not .jsonl / .json / .parquet"):
        setup_dm(tokenizer=tokenizer_dir, train_files=str(tmp_path / "notes.txt"))
    with pytest.raises(ConfigError, match=r"block_size=1 must be at least 2.*val_fraction=1"):
        SFTDataModule(train_files="x.jsonl", block_size=1, val_fraction=1)
    chat = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match=r"c.jsonl line 1: the conversation ends with a 'user' turn"):
        setup_dm(tokenizer=tokenizer_dir, train_files=chat, format="chat")
    dm = setup_dm(
        tokenizer=tokenizer_dir,
        train_files=write_jsonl(tmp_path / "t.jsonl", RECORDS[:1] * 2),
        prompt_field="question",
        completion_field="answer",
    )
    with pytest.raises(DataError, match="set data.init_args.predict_files"):
        dm.predict_dataloader()
