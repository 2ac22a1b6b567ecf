"""`context`: causal, bidirectional and repeated context for classifiers (gptlab.tasks.context).

What must hold on both backbones and every padding mode: bidirectional attention lets a later
token change an earlier output and causal does not; padding (right, left, packed) never changes a
real token's output; `repeat` reads the last copy, aligned with the words; what a backbone cannot
do is refused at start, in one line.
"""

from __future__ import annotations

import pytest
import torch

from gptlab.errors import CheckpointError, ConfigError
from gptlab.models import GPT, HFBackbone
from gptlab.tasks import CausalLM, SequenceClassification, TokenClassification
from gptlab.tasks.context import Context, check_bidirectional, last_copy, parse_context, repeat_rows

TAGS = ["O", "B-PER", "I-PER"]
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=96)
# HF families of the default suite (the slow family test covers every family of tests/test_models.py)
HF = {
    "llama": dict(SMALL, num_key_value_heads=2),
    "mistral": dict(SMALL, num_key_value_heads=2, sliding_window=3),
    "qwen2": dict(SMALL, num_key_value_heads=2),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, vocab_size=96),
}
BACKBONES = ["gpt", "llama", "llama-padded", "mistral", "qwen2", "gpt2"]


def backbone(kind: str):
    torch.manual_seed(0)
    if kind == "gpt":
        return GPT(vocab_size=96, block_size=64, n_layer=2, n_head=2, n_embd=32)
    family = kind.removesuffix("-padded")
    return HFBackbone(
        model_type=family, config_overrides=HF[family], padding_free=not kind.endswith("-padded")
    )


def tagger(kind: str, context) -> TokenClassification:
    task = TokenClassification(backbone(kind), TAGS, dropout=0.0, context=context).eval()
    with torch.no_grad():
        task.head[1].weight.normal_()  # outputs that differ visibly between tokens
    return task


def batch(rows: list[list[int]]) -> dict[str, torch.Tensor]:
    """Right-padded, as the data modules build batches (pad id 0)."""
    length = max(map(len, rows))
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
    return {"input_ids": ids, "attention_mask": mask}


SENTENCE = [11, 12, 13, 14, 15, 16]
CHANGED_LAST = [11, 12, 13, 14, 15, 17]


@pytest.mark.parametrize("kind", BACKBONES)
@pytest.mark.parametrize("context", ["causal", "bidirectional", "repeat"])
def test_a_later_token_changes_an_earlier_output_only_with_whole_text_context(kind, context):
    task = tagger(kind, context)
    with torch.no_grad():
        for padded in (False, True):  # alone, and in a batch with a longer padded-out row
            extra = [[1] * 8] if padded else []
            first = task(batch([SENTENCE, *extra]))[0, 0]
            changed = task(batch([CHANGED_LAST, *extra]))[0, 0]
            moved = (first - changed).abs().max().item()
            if context == "causal":
                assert moved == 0.0, (kind, padded)
            else:
                assert moved > 1e-4, (kind, padded, moved)


@pytest.mark.parametrize("kind", BACKBONES)
@pytest.mark.parametrize("context", ["causal", "bidirectional", "repeat", {"mode": "repeat", "repeats": 2}])
def test_padding_never_changes_a_real_tokens_output(kind, context):
    """A row's outputs are the same alone and beside longer rows (right padding; packed rows)."""
    task = tagger(kind, context)
    rows = [[21, 22, 23], SENTENCE, [31, 32, 33, 34, 35, 36, 37, 38, 39]]
    with torch.no_grad():
        together = task(batch(rows))
        for i, row in enumerate(rows):
            alone = task(batch([row]))[0]
            torch.testing.assert_close(together[i, : len(row)], alone, atol=2e-5, rtol=0)


@pytest.mark.parametrize("kind", BACKBONES)
def test_left_padding_leaves_bidirectional_outputs_unchanged(kind):
    """At the backbone: left-padded rows (and their packed form) give real tokens their own outputs."""
    model = backbone(kind).eval()
    layers = range(model.num_layers)
    ids = torch.tensor([[0, 0, 0, 21, 22, 23], SENTENCE])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1] * 6])
    with torch.no_grad():
        both = model(ids, mask, bidirectional=layers)
        alone = model(ids[:1, 3:], mask[:1, 3:], bidirectional=layers)[0]
        torch.testing.assert_close(both[0, 3:], alone, atol=2e-5, rtol=0)
        torch.testing.assert_close(
            both[1], model(ids[1:], mask[1:], bidirectional=layers)[0], atol=2e-5, rtol=0
        )


def test_sequence_classifier_reads_the_whole_text_in_every_mode():
    """Pooling on the last token: causal sees it all already; the other modes must agree on padding."""
    for context in ("causal", "bidirectional", "repeat"):
        task = SequenceClassification(backbone("llama"), ["neg", "pos"], dropout=0.0, context=context).eval()
        rows = [[21, 22, 23], SENTENCE]
        with torch.no_grad():
            together = task(batch(rows))
            for i, row in enumerate(rows):
                torch.testing.assert_close(together[i], task(batch([row]))[0], atol=2e-5, rtol=0)


def test_gpt_bidirectional_layer_range_leaves_the_other_layers_causal():
    """Only the last layer unmasked: the first token still sees a later one, through that layer only."""
    model = backbone("gpt").eval()
    ids, changed = torch.tensor([SENTENCE]), torch.tensor([CHANGED_LAST])
    with torch.no_grad():
        last = model(ids, bidirectional=range(1, 2))
        assert (last[0, 0] - model(changed, bidirectional=range(1, 2))[0, 0]).abs().max() > 1e-4
        # the unmasked layer differs from an all-bidirectional model's, and from the causal one
        assert not torch.allclose(last, model(ids, bidirectional=range(2)), atol=1e-5)
        assert not torch.allclose(last, model(ids), atol=1e-5)
    task = tagger("gpt", {"mode": "bidirectional", "layers": [-1, None]})
    assert task.bidirectional == range(1, 2)


# ----------------------------------------------------------------------------- repeat


def test_repeat_rows_and_last_copy_are_inverse_on_real_tokens():
    ids = torch.tensor([[5, 6, 7, 0], [1, 2, 3, 4]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    rows, row_mask = repeat_rows(ids, mask, 2)
    assert rows.tolist() == [[5, 6, 7] * 3 + [0, 0, 0], [1, 2, 3, 4] * 3]
    assert row_mask.tolist() == [[1] * 9 + [0] * 3, [1] * 12]
    # position p of a repeated row holds ... the token at p; the last copy, read back, is the row
    hidden = rows[..., None].float()  # (B, W, 1)
    assert last_copy(hidden, mask, 2)[..., 0].tolist() == [[5, 6, 7, 0], [1, 2, 3, 4]]


def test_repeat_labels_align_with_the_words_of_the_last_copy(tmp_path):
    """On sentences with multi-token words: each word's first sub-token is read in the last copy.

    The head's input at token t is the backbone's hidden state at r L + t of the repeated row, and
    that position holds the same token as t: the labels (aligned with the original tokens) and
    `word_ids` stay right.
    """
    from finetune_data import ner_sentences, write_conll
    from gptlab.data import BPE, TokenClassificationDataModule

    sentences = [[("Smithsonian", "B-PER"), ("went", "O"), ("Londoners", "B-PER")], [("Bo", "B-PER")]]
    text = " ".join(w for s in ner_sentences(50) for w, _ in s) + " Smithsonian Londoners"
    BPE(vocab_size=300).train([text]).save_pretrained(str(tmp_path / "tok"))
    dm = TokenClassificationDataModule(
        tokenizer=str(tmp_path / "tok"),
        train_files=str(write_conll(tmp_path / "train.conll", sentences)),
        val_fraction=0.0,
        batch_size=2,
        cache_dir=str(tmp_path / "cache"),
    )
    dm.setup("fit")
    b = next(iter(dm.train_dataloader()))
    assert (b["word_ids"] >= 0).sum(1).max() > 4, "the test needs words of several sub-tokens"
    gpt = GPT(vocab_size=320, block_size=128, n_layer=2, n_head=2, n_embd=32)
    task = TokenClassification(gpt, dm.label_names, dropout=0.0, context="repeat").eval()
    seen = {}
    task.backbone.register_forward_hook(lambda m, args, out: seen.update(ids=args[0], hidden=out))
    with torch.no_grad():
        hidden = task.encode(b)
    lengths = b["attention_mask"].sum(1)
    for row in range(2):
        n = int(lengths[row])
        assert seen["ids"][row, n : 2 * n].tolist() == b["input_ids"][row, :n].tolist()
        torch.testing.assert_close(hidden[row, :n], seen["hidden"][row, n : 2 * n])
        assert not hidden[row, n:].any()  # padding


def test_repeat_is_one_row_of_copies_with_positions_continuing():
    """The repeated row computes what the backbone computes on the hand-made doubled sentence."""
    task = tagger("llama", "repeat")
    with torch.no_grad():
        by_hand = task.backbone(torch.tensor([SENTENCE * 2]))[0, 6:]
        torch.testing.assert_close(task.encode(batch([SENTENCE]))[0], by_hand, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "value, message",
    [
        ("bidi", "unknown context 'bidi'; use one of causal, bidirectional, repeat"),
        ({"mode": "repeat", "repeats": 0}, "repeats=0 must be a whole number >= 1"),
        pytest.param(
            {"mode": "repeat", "repeats": -2}, "repeats=-2 must be a whole number >= 1", id="repeats_negative"
        ),
        ({"mode": "causal", "repeats": 2}, "repeats=2 is for mode: repeat, not causal"),
        ({"mode": "repeat", "layers": [0, 1]}, "layers=[0, 1] is for mode: bidirectional"),
        ({"mode": "bidirectional", "layers": [0]}, "must be [start, stop]"),
        ({"mode": "repeat", "count": 2}, "unknown field(s) ['count']"),
    ],
)
def test_bad_context_values_are_refused_naming_the_key(value, message):
    with pytest.raises(ConfigError, match="model.init_args.context") as err:
        parse_context(value, "TokenClassification")
    assert message in str(err.value)


@pytest.mark.parametrize("layers", [[0, 5], [3, None], [1, 1], [-7, None]])
def test_a_layer_range_outside_the_model_is_refused(layers):
    with pytest.raises(ConfigError, match=r"context.layers=.*the model has 2 layers \(0..1\)"):
        tagger("gpt", {"mode": "bidirectional", "layers": layers})


def test_a_layer_range_on_a_hugging_face_backbone_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="applies to all 2 layers, not to layers 1..1: leave layers out"):
        tagger("llama", {"mode": "bidirectional", "layers": [1, 2]})


def test_a_language_model_stays_causal():
    for context in ("bidirectional", "repeat"):
        with pytest.raises(ConfigError, match=f"CausalLM takes context: causal, not {context}"):
            CausalLM(backbone("gpt"), context=context)


def test_a_backbone_that_stays_causal_is_refused_at_start(monkeypatch):
    """The probe catches a family whose attention ignores the switch (transformers' pitfall)."""
    model = backbone("llama")
    real_forward = HFBackbone.forward
    monkeypatch.setattr(
        HFBackbone,
        "forward",
        lambda self, ids, mask=None, *, bidirectional=None: real_forward(self, ids, mask),
    )
    with pytest.raises(ConfigError, match="does not change when the last token does .still causal."):
        check_bidirectional(model, range(2), "HFBackbone llama")


def test_a_backbone_whose_padding_leaks_is_refused_at_start(monkeypatch):
    """... and one that drops the padding mask with the causal one (research code's usual bug)."""
    model = backbone("gpt")
    real_forward = GPT.forward
    monkeypatch.setattr(
        GPT,
        "forward",
        lambda self, ids, mask=None, cache=None, *, bidirectional=None: real_forward(
            self, ids, None, bidirectional=bidirectional
        ),
    )
    with pytest.raises(ConfigError, match="right padding changes the outputs of real tokens"):
        check_bidirectional(model, range(2), "GPT")


def test_a_checkpoint_keeps_its_context(tmp_path):
    """Loading weights trained in one context into a model of another: one error naming both."""
    import lightning as L

    task = tagger("gpt", "bidirectional")
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(task)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    checkpoint = torch.load(tmp_path / "m.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["context"] == "bidirectional"
    other = TokenClassification(backbone("gpt"), TAGS, context={"mode": "repeat", "repeats": 2})
    with pytest.raises(
        CheckpointError,
        match=r"trained with context bidirectional, but this model has "
        r"context repeat \(repeats 2\).*set model.init_args.context: bidirectional",
    ):
        other.on_load_checkpoint(checkpoint)
    loaded = TokenClassification.load_from_checkpoint(tmp_path / "m.ckpt", backbone=backbone("gpt"))
    assert loaded.context == Context("bidirectional")


# ----------------------------------------------------------------------------- through the CLI


@pytest.fixture(scope="module")
def context_runs(tmp_path_factory):
    """Tiny NER fits through the CLI: {context: run directory} for bidirectional and repeat."""
    import sys
    from unittest import mock

    import yaml

    from finetune_data import finetune_config, write_ner
    from gptlab.cli import GPTLabCLI

    tmp = tmp_path_factory.mktemp("context_runs")
    files = write_ner(tmp)
    runs, configs = {}, {}
    for name, context in (("bidirectional", "bidirectional"), ("repeat", {"mode": "repeat", "repeats": 1})):
        config = finetune_config(tmp, "ner", files, context=context)
        config["experiment"] = name
        config["data"]["init_args"]["block_size"] = 16  # two copies fit the GPT's 32 positions
        config["trainer"].update(max_steps=2, val_check_interval=1)
        configs[name] = tmp / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump(config))
        with mock.patch.object(sys, "argv", sys.argv[:1]):
            GPTLabCLI(args=["fit", "--config", str(configs[name])])
        runs[name] = tmp / "logs" / name / "version_0"
    return runs, configs


def test_a_fit_records_its_context_and_test_uses_it(context_runs, capsys):
    from tiny_runs import run_cli

    runs, _ = context_runs
    for name, run in runs.items():
        recorded = parse_context(yaml_context(run / "config.yaml"), "TokenClassification")
        assert recorded == (Context("bidirectional") if name == "bidirectional" else Context("repeat", 1))
        code, err = run_cli(capsys, "test", "--ckpt_path", str(run / "checkpoints" / "last.ckpt"))
        assert code == 0, err
        assert (run / "reports" / "test_report.json").exists()


def yaml_context(path):
    import yaml

    return yaml.safe_load(path.read_text())["model"]["init_args"]["context"]


def test_testing_or_resuming_with_another_context_than_trained_is_one_line(context_runs, tmp_path, capsys):
    import shutil

    from test_bad_inputs import one_line_error
    from tiny_runs import run_cli

    runs, _ = context_runs
    ckpt = runs["bidirectional"] / "checkpoints" / "last.ckpt"
    code, err = run_cli(capsys, "test", "--ckpt_path", str(ckpt), "--model.init_args.context", "causal")
    one_line_error(
        code,
        err,
        "trained with context bidirectional, but this model has context causal",
        "set model.init_args.context: bidirectional",
    )
    # resuming it in another context: the same refusal (the "differing model settings" check names both)
    run = tmp_path / "run"
    shutil.copytree(runs["bidirectional"], run)
    code, err = run_cli(
        capsys,
        "fit",
        "--config",
        str(run / "config.yaml"),
        "--ckpt_path",
        str(run / "checkpoints" / "last.ckpt"),
        "--model.init_args.context",
        "repeat",
        "--trainer.max_steps",
        "3",
    )
    line = one_line_error(code, err, "context")
    assert "bidirectional" in line and "repeat" in line, line


@pytest.mark.parametrize(
    "override, needles",
    [
        pytest.param(
            ["--model.init_args.context", "sideways"], ["unknown context 'sideways'"], id="unknown_value"
        ),
        pytest.param(
            ["--model.init_args.context", "{mode: repeat, repeats: 0}"],
            ["repeats=0 must be a whole number"],
            id="repeats_zero",
        ),
        pytest.param(
            ["--model.init_args.context", "{mode: repeat, repeats: 1}", "--data.init_args.block_size", "32"],
            [
                "one row of up to 2 x 32 = 64 tokens",
                "more than the model's block_size=32",
                "set data.init_args.block_size to at most 16",
            ],
            id="rows_do_not_fit",
        ),
        pytest.param(
            ["--model.init_args.context", "{mode: bidirectional, layers: [0, 4]}"],
            ["the model has 1 layers"],
            id="layers_outside",
        ),
    ],
)
def test_bad_contexts_stop_fit_in_one_line(context_runs, tmp_path, capsys, override, needles):
    from test_bad_inputs import one_line_error
    from tiny_runs import run_cli

    _, configs = context_runs
    code, err = run_cli(
        capsys, "fit", "--config", str(configs["bidirectional"]), "--logs", str(tmp_path), *override
    )
    one_line_error(code, err, *needles)
    assert not any(tmp_path.iterdir())  # no run folder


def test_a_language_model_in_bidirectional_context_is_one_line(tiny_runs, tmp_path, capsys):
    from test_bad_inputs import one_line_error
    from tiny_runs import run_cli

    for task in ("causal_lm", "generation"):
        code, err = run_cli(
            capsys,
            "fit",
            "--config",
            str(tiny_runs.configs[task]),
            "--logs",
            str(tmp_path),
            "--model.init_args.context",
            "bidirectional",
        )
        one_line_error(code, err, "takes context: causal, not bidirectional")


def test_a_bidirectional_classifier_exports_and_transformers_reads_it_whole(context_runs, tmp_path, capsys):
    """is_causal: false in the exported config; transformers' logits are gptlab's, padded or not."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from tiny_runs import run_cli

    runs, _ = context_runs
    ckpt = runs["bidirectional"] / "checkpoints" / "last.ckpt"
    code, err = run_cli(capsys, "export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "out"))
    assert code == 0, err
    hf = AutoModelForTokenClassification.from_pretrained(tmp_path / "out").eval()
    assert hf.config.is_causal is False
    task = TokenClassification.load_from_checkpoint(ckpt).eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    ids = torch.tensor([tok("John Smith went to Paris")["input_ids"]])
    with torch.no_grad():
        ours = task({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        torch.testing.assert_close(hf(input_ids=ids).logits, ours, atol=1e-5, rtol=0)  # one text, no mask
        changed = ids.clone()
        changed[0, -1] = (ids[0, -1] + 1) % 300
        assert (hf(input_ids=changed).logits[0, 0] - ours[0, 0]).abs().max() > 1e-5  # it reads the whole text


def test_a_repeat_classifier_export_is_refused_in_one_line(context_runs, tmp_path, capsys):
    from test_bad_inputs import one_line_error
    from tiny_runs import run_cli

    runs, _ = context_runs
    ckpt = runs["repeat"] / "checkpoints" / "last.ckpt"
    code, err = run_cli(capsys, "export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "out"))
    one_line_error(code, err, "context repeat (repeats 1)", "no exact transformers equivalent")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("family", list(__import__("test_models").FAMILIES))
def test_every_family_is_bidirectional_or_refused_in_one_line(family):
    """Each family of the slow family test: the mode works (checked here again, outside the probe),
    or building the task says why in one line."""
    from test_models import _TINY, FAMILIES

    torch.manual_seed(0)
    model = HFBackbone(model_type=family, config_overrides={**_TINY, **FAMILIES[family]})
    try:
        task = TokenClassification(model, TAGS, dropout=0.0, context="bidirectional").eval()
    except ConfigError as err:
        assert "\n" not in str(err) and str(err).startswith("model.init_args.context: bidirectional: "), err
        return
    rows = [[21, 22, 23], SENTENCE]
    with torch.no_grad():
        together = task(batch(rows))
        for i, row in enumerate(rows):
            torch.testing.assert_close(together[i, : len(row)], task(batch([row]))[0], atol=2e-5, rtol=0)
        moved = task(batch([SENTENCE]))[0, 0] - task(batch([CHANGED_LAST]))[0, 0]
    assert moved.abs().max() > 1e-5
