"""Supervised fine-tuning data: prompt -> completion pairs (or chat conversations) as token sequences.

    record       {"question": "2+2?", "answer": "4"}            a .jsonl/.json/.parquet row or a
                                                                 `datasets` row
    segments     "Question: 2+2?\\nAnswer: "  |  "4"             prompt_template / prompt_field,
                 (not trained)                 (trained)          completion_field
    tokens       p0 p1 ... pk                  c0 c1 <eos>      each segment tokenized alone, EOS
    labels       -100 ... -100                 c0 c1 <eos>      appended; aligned, not shifted

A chat record holds `messages` ([{"role": ..., "content": ...}, ...]); it is rendered with the
tokenizer's chat template (or gptlab's plain `DEFAULT_CHAT_TEMPLATE` when the tokenizer has none,
which is then saved with the run's tokenizer), and every assistant turn is trained, everything else
masked.

Length. A sequence longer than `block_size` is truncated from the left (the start of the prompt
goes first; the completion and its EOS are kept), with one warning per split counting them.

Packing (`packing: true`, training only) is plain concatenation: whole examples, in a seeded
order, are appended to a block until the next one would overflow `block_size`; no example is split
across blocks, and blocks are right-padded as usual. Inside a block an example attends to the
examples before it (positions continue, nothing is reset), exactly as documents separated by EOS
do in pretraining; it never sees the examples after it (causal). No loss crosses an example
boundary: the token after each EOS is the next prompt's first token, labelled -100. Validation
and test sequences are never packed, so their loss is the per-example loss.

Evaluation and prediction batches carry, beside the batch contract, what generation needs:
`prompt_length` (B,) int64 (the prompt is `input_ids[i, :prompt_length[i]]`), `prompt` and
`reference` (lists of B strings: the prompt text and the final completion text). Prediction items
hold only the prompt (no labels, no EOS); a `.txt` prediction file holds one prompt per line.

SFT sets are small, so records are read, checked and tokenized in memory at `setup` (seconds for
GSM8K's 7.5k examples); nothing but a trained tokenizer is cached.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerFast

from gptlab.data.base import IGNORE_INDEX, ROLES, DataModule, Examples, encode_texts
from gptlab.data.sources import Problems, files_fingerprint, held_out, read_records, splits_by_role
from gptlab.data.templates import format_fields, is_jinja, jinja_template, render_jinja
from gptlab.data.tokenizers import TokenizerRecipe
from gptlab.errors import ConfigError, DataError

if TYPE_CHECKING:
    import datasets  # imported where a dataset is read (start-up time)

# Used when `format: chat` meets a tokenizer without a chat template (e.g. one gptlab trained).
# Plain text, no special tokens: "user: ...\nassistant: ...\n"; the generation prompt is "assistant: ".
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
PROBLEMS_PER_SOURCE = 3  # the first few say what is wrong with a whole file


@dataclass
class Example:
    """One record turned into text segments; `trained` segments get labels, the others -100."""

    segments: list[tuple[str, bool]]  # (text, trained)
    location: str  # "file line N", for messages

    @property
    def prompt(self) -> str:
        """Everything before the last trained segment (the whole text for a prediction prompt)."""
        last = self._last_trained()
        return "".join(text for text, _ in self.segments[: last if last is not None else None])

    @property
    def reference(self) -> str:
        """The last trained segment: the completion a generation is compared with ("" if none)."""
        last = self._last_trained()
        return self.segments[last][0] if last is not None else ""

    def _last_trained(self) -> int | None:
        return max((i for i, (_, trained) in enumerate(self.segments) if trained), default=None)


class SFTDataModule(DataModule):
    """Prompt -> completion (or chat) fine-tuning data from local files or a Hugging Face dataset."""

    def __init__(
        self,
        tokenizer: TokenizerRecipe | str | None = None,
        train_files: str | list[str] | None = None,
        val_files: str | list[str] | None = None,
        test_files: str | list[str] | None = None,
        predict_files: str | list[str] | None = None,
        dataset: str | None = None,
        dataset_config: str | None = None,
        format: Literal["prompt_completion", "chat"] = "prompt_completion",
        prompt_field: str = "prompt",
        completion_field: str = "completion",
        prompt_template: str = "",
        messages_field: str = "messages",
        block_size: int = 512,
        packing: bool = False,
        val_fraction: float = 0.05,
        max_examples: int | None = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 1337,
        cache_dir: str = "~/.cache/gptlab",
    ) -> None:
        """
        Args:
            tokenizer: The pretrained run's tokenizer directory (`<run>/tokenizer`), an exported
                model directory or a hub name; or a recipe (`BPE`, `Char`) trained on the training
                examples and cached.
            train_files: Training records: paths or globs of .jsonl / .json / .parquet files.
            val_files: Validation records, as `train_files`; then `val_fraction` is not used.
            test_files: Test records, as `train_files`; by default the test set is the validation set.
            predict_files: Prompts to complete with `predict`: records as above (only the prompt
                is needed), or .txt files with one prompt per line.
            dataset: Instead of files: a Hugging Face hub dataset name or a `save_to_disk`
                directory; its train / validation / test splits are used.
            dataset_config: The hub dataset's configuration (subset) name.
            format: "prompt_completion" (a prompt and a completion per record) or "chat" (a list of
                messages per record, rendered with the tokenizer's chat template).
            prompt_field: Key / column of the prompt text (when no `prompt_template` is given); a
                path into nested records, e.g. `instances.0.input` (keys and list positions).
            completion_field: Key / column of the completion (the text trained on); a path as above,
                e.g. `instances.0.output`.
            prompt_template: Builds the prompt from the record's columns. With `{{ }}` or `{% %}` it
                is a Jinja template, as transformers' chat templates (nested values and optional
                parts: "{{ instruction }}\\n{% if input %}Input: {{ input }}\\n{% endif %}Output: ";
                `instances[0].input` reads into nested records; a line holding only a `{% %}` tag
                leaves no blank line). Otherwise Python's str.format with column names, e.g.
                "Question: {question}\\nAnswer: ". Empty: the prompt is `prompt_field`. (A str, not
                str | None: jsonargparse reads an optional string starting with "#" as a YAML
                comment, i.e. None.)
            messages_field: Key / column (or path) of the messages list in the chat format.
            block_size: Longest sequence in tokens (at most the model's block_size); longer ones
                are truncated from the left with a warning. With packing, the block length.
            packing: Concatenate whole training examples into blocks of up to `block_size` tokens
                (fewer, fuller batches). Examples in a block attend to the ones before them; see
                the module docstring for the exact semantics.
            val_fraction: Share of the training examples held out (seeded) for validation when
                there are no validation files or split; 0 disables validation.
            max_examples: Use only the first N examples of each split (quick experiments).
            batch_size: Sequences per training batch (per device).
            eval_batch_size: Sequences per validation / test / predict batch; defaults to `batch_size`.
            num_workers: DataLoader worker processes; 0 loads in the main process.
            seed: Seeds the validation hold-out, the packing order and the training order.
            cache_dir: Root of gptlab's cache (trained tokenizers).
        """
        super().__init__(
            tokenizer,
            batch_size,
            eval_batch_size,
            num_workers,
            seed,
            cache_dir,
            train_files=train_files,
            val_files=val_files,
            test_files=test_files,
            predict_files=predict_files,
            dataset=dataset,
            dataset_config=dataset_config,
            val_fraction=val_fraction,
        )
        problems = []
        if train_files is not None and dataset is not None:
            problems.append("give train_files or dataset, not both")
        if train_files is None and dataset is None and test_files is None and predict_files is None:
            problems.append("give train_files (or dataset), test_files or predict_files")
        if format not in ("prompt_completion", "chat"):
            problems.append(f"format={format!r} must be 'prompt_completion' or 'chat'")
        if block_size < 2:
            problems.append(f"block_size={block_size} must be at least 2 (one input and one target)")
        if not 0 <= val_fraction < 1:
            problems.append(f"val_fraction={val_fraction} must be in [0, 1)")
        if max_examples is not None and max_examples < 1:
            problems.append(f"max_examples={max_examples} must be at least 1")
        self.template_fields: list[str] = []
        if prompt_template and is_jinja(prompt_template):
            try:
                jinja_template(prompt_template)
            except ValueError as err:
                problems.append(f"prompt_template={prompt_template!r}: {err}")
            plain = format_fields(prompt_template)
            if plain:
                fields, jinja = (
                    ", ".join(f"{{{f}}}" for f in plain),
                    ", ".join(f"{{{{ {f} }}}}" for f in plain),
                )
                rank_zero_warn(
                    f"gptlab: SFTDataModule: prompt_template is a Jinja template (it holds {{{{ }}}} or "
                    f"{{% %}}), where {fields} stays as written in every prompt (not a field): write {jinja}"
                )
        elif prompt_template:
            try:
                self.template_fields = template_fields(prompt_template)
            except ValueError as err:
                problems.append(f"prompt_template={prompt_template!r}: {err}")
        if problems:
            raise ConfigError("SFTDataModule: " + "; ".join(problems))
        self.format = format
        self.prompt_field = prompt_field
        self.completion_field = completion_field
        self.prompt_template = prompt_template or None
        self.messages_field = messages_field
        self.block_size = block_size
        self.packing = packing
        self.max_examples = max_examples

    # ----------------------------------------------------------------- sources
    def file_problems(self, role: str, files: list[Path]) -> list[str]:
        allowed = (".jsonl", ".json", ".parquet") + ((".txt",) if role == "predict" else ())
        return [
            f"{role}_files: {p} is not {' / '.join(allowed)}; SFT records are JSON lines, JSON "
            f"arrays or Parquet" + (" (or one prompt per line in .txt)" if role == "predict" else "")
            for p in files
            if p.suffix.lower() not in allowed
        ]

    def check_dataset(self, loaded: datasets.DatasetDict) -> None:
        if not splits_by_role(loaded):
            raise DataError(f"dataset={self.dataset!r} has no train, validation or test split")

    def records(self, role: str) -> Iterator[tuple[str, str, Any]]:
        """(source, location, record) of every record of `role`; files win over a dataset's split."""
        files = self.files()
        if role in files:
            for path in files[role]:
                for location, record in read_records(path):
                    yield str(path), location, record
        elif self.dataset is not None and role in self.dataset_splits():
            source = f"dataset {self.dataset!r} ({role} split)"
            for i, row in enumerate(self.dataset_splits()[role]):
                yield source, f"{source} row {i}", row

    # ----------------------------------------------------------------- DataModule hooks
    def tokenizer_corpus(self) -> Iterator[str]:
        # Every text of the training records; chat turns as "role: content" lines (the template's
        # own markup is not known before a tokenizer exists).
        for example in self.examples("train", render=_plain_chat):
            yield "".join(text for text, _ in example.segments)

    def corpus_fingerprint(self) -> str:
        sources = {
            "files": {
                role: files_fingerprint(files) for role, files in self.files().items() if role == "train"
            },
            "dataset": f"{self.dataset}:{self.dataset_config}",
            "format": [self.format, self.prompt_field, self.completion_field, self.prompt_template],
            "messages_field": self.messages_field,
            "max_examples": self.max_examples,
        }
        return json.dumps(sources, sort_keys=True)

    def setup_datasets(self, stage: str) -> None:
        tokenizer = self.tokenizer
        render = None
        if self.format == "chat":
            if not getattr(tokenizer, "chat_template", None):
                # Set on the tokenizer itself so the run's saved tokenizer (and an export) carry it.
                tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
                rank_zero_info(
                    "gptlab: the tokenizer has no chat template; using gptlab's DEFAULT_CHAT_TEMPLATE"
                )
            render = _template_renderer(tokenizer)
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}
        splits = self._split_examples(wanted.get(stage, ("train", "val", "test")), render)

        self.train_dataset = self.val_dataset = self.test_dataset = self.predict_dataset = None
        for role, examples in splits.items():
            if examples is None:
                continue
            if role == "predict":
                self.predict_dataset = Examples(self._prompt_items(examples, tokenizer))
                continue
            items = self._sequence_items(examples, tokenizer, role, with_text=role != "train")
            if role == "train" and self.packing:
                items = pack(items, self.block_size, self.seed)
            setattr(self, f"{role}_dataset", Examples(items))
        sizes = ", ".join(
            f"{role} {len(ds):,}" for role in ROLES if (ds := getattr(self, f"{role}_dataset")) is not None
        )
        rank_zero_info(f"gptlab: SFT sequences ({self.format}, block_size {self.block_size}): {sizes}")

    def _split_examples(self, wanted: tuple[str, ...], render) -> dict[str, list[Example] | None]:
        """The examples of each wanted role; every problem of every source in one DataError.

        Validation is `val_files` / the dataset's validation split, else a seeded `val_fraction` of
        the training examples; test is `test_files` / the test split, else the validation set.
        """
        problems: list[str] = []

        def load(role: str) -> list[Example] | None:
            try:
                return self.examples(role, render)
            except DataError as err:
                problems.append(str(err))
                return None

        self.files()  # every bad pattern of every role first, in one error
        need_val = "val" in wanted or ("test" in wanted and not self.has_source("test"))
        need_train = "train" in wanted or (need_val and not self.has_source("val"))
        train = load("train") if need_train and self.has_source("train") else None
        val = load("val") if need_val and self.has_source("val") else None
        if need_val and train is not None and self.holds_out():
            train, val = self._hold_out(train)
        test = (load("test") if self.has_source("test") else val) if "test" in wanted else None
        predict = load("predict") if "predict" in wanted and self.has_source("predict") else None
        if "test" in wanted and test is None and not problems:
            problems.append("no test examples: set test_files (or val_files, or a val_fraction > 0 of train)")
        if problems:
            raise DataError("\n".join(problems))
        return {
            "train": train if "train" in wanted else None,
            "val": val if "val" in wanted else None,
            "test": test,
            "predict": predict,
        }

    def _hold_out(self, train: list[Example]) -> tuple[list[Example], list[Example]]:
        """(train, validation): a seeded `val_fraction` of the examples, at least one, held out."""
        advice = "lower val_fraction (0 disables validation) or add examples"
        held = held_out(len(train), self.val_fraction, self.seed, advice)
        # Both keep file order: the held-out set is the same at fit and at test time.
        kept = [ex for i, ex in enumerate(train) if i not in held]
        return kept, [ex for i, ex in enumerate(train) if i in held]

    # ----------------------------------------------------------------- records -> examples
    def examples(self, role: str, render=None) -> list[Example]:
        """Every record of `role` as an Example; one DataError lists every problem found."""
        examples: list[Example] = []
        problems = Problems(f"SFTDataModule ({role})", more="more problems")
        per_source: dict[str, int] = {}
        checked_sources: set[str] = set()
        for source, location, record in self.records(role):
            if per_source.get(source, 0) >= PROBLEMS_PER_SOURCE:
                continue
            # The first record of each source decides whether the template's columns exist at all.
            if (
                source not in checked_sources
                and self.prompt_template is not None
                and isinstance(record, dict)
            ):
                checked_sources.add(source)
                missing = [f for f in self.template_fields if f not in record]
                if missing:
                    problems.add(
                        f"{source}: prompt_template {self.prompt_template!r} names column(s) "
                        f"{', '.join(map(repr, missing))}, which the records do not have (columns: "
                        f"{', '.join(map(repr, record))}); fix the template or the data"
                    )
                    per_source[source] = PROBLEMS_PER_SOURCE
                    continue
            try:
                examples.append(self._example(location, record, role, render))
            except DataError as err:
                problems.add(str(err))
                per_source[source] = per_source.get(source, 0) + 1
                if per_source[source] == PROBLEMS_PER_SOURCE:
                    problems.add(f"{source}: (further problems in this source not listed)")
            if self.max_examples is not None and len(examples) >= self.max_examples and not problems.items:
                break
        if not problems.items and not examples:
            problems.add(f"{role}: no records found; check the {role} files or dataset split")
        problems.raise_if_any()
        return examples

    def _example(self, location: str, record: Any, role: str, render) -> Example:
        need_completion = role != "predict"
        if isinstance(record, str):  # a line of a .txt prompts file
            return Example([(record, False)], location)
        if not isinstance(record, dict):
            raise DataError(f"{location}: expected a JSON object, got {type(record).__name__}")
        if self.format == "chat":
            return self._chat_example(location, record, need_completion, render or _plain_chat)
        if self.prompt_template is not None and is_jinja(self.prompt_template):
            prompt = render_jinja(jinja_template(self.prompt_template), record, location)
        elif self.prompt_template is not None:
            missing = [f for f in self.template_fields if f not in record]
            if missing:
                raise DataError(
                    f"{location}: no column {', '.join(map(repr, missing))} for prompt_template (keys: "
                    f"{', '.join(map(repr, record))})"
                )
            prompt = self.prompt_template.format_map(record)
        else:
            prompt = _text_field(record, self.prompt_field, location, "prompt_field (or set prompt_template)")
        segments = [(prompt, False)]
        if need_completion or has_field(record, self.completion_field):
            completion = _text_field(record, self.completion_field, location, "completion_field")
            segments.append((completion, True))
        return Example(segments, location)

    def _chat_example(self, location: str, record: dict, need_completion: bool, render) -> Example:
        messages = get_field(record, self.messages_field)
        if not isinstance(messages, list) or not messages:
            keys = ", ".join(map(repr, record))
            raise DataError(
                f"{location}: no non-empty list {self.messages_field!r} (keys: {keys}); format: chat needs "
                f"messages [{{role, content}}, ...] (set messages_field)"
            )
        for i, m in enumerate(messages):
            if not (
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            ):
                raise DataError(
                    f"{location}: message {i} is not {{'role': str, 'content': str}}: {m!r}"[:300]
                )
        if need_completion and messages[-1]["role"] != "assistant":
            raise DataError(
                f"{location}: the conversation ends with a {messages[-1]['role']!r} turn; training and "
                f"evaluation need it to end with an 'assistant' turn"
            )
        segments, done = [], ""
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prefix = render(messages[:i], True)
            full = render(messages[: i + 1], False)
            if not (prefix.startswith(done) and full.startswith(prefix)):
                raise DataError(
                    f"{location}: the chat template does not render turn {i} as an extension of the turns "
                    f"before it, so the assistant's text cannot be located; use a prefix-stable template"
                )
            segments += [(prefix[len(done) :], False), (full[len(prefix) :], True)]
            done = full
        if messages[-1]["role"] != "assistant":  # a prompt to complete (predict)
            segments.append((render(messages, True)[len(done) :], False))
        return Example([(t, trained) for t, trained in segments if t], location)

    # ----------------------------------------------------------------- examples -> tokens
    def _tokenize(
        self, texts: list[str], wheres: list[str], tokenizer: PreTrainedTokenizerFast, role: str
    ) -> list[list[int]]:
        if not texts:
            return []
        # Data text is text: a literal "<|endoftext|>" in a completion must not end it. Chat
        # templates, on the other hand, write their special tokens as text on purpose.
        return encode_texts(
            tokenizer,
            texts,
            wheres,
            f"{role} data",
            add_special_tokens=False,
            split_special_tokens=self.format != "chat",
        )["input_ids"]

    def _sequence_items(
        self, examples: list[Example], tokenizer: PreTrainedTokenizerFast, role: str, with_text: bool
    ) -> list[dict[str, Any]]:
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ConfigError("the tokenizer has no EOS token; SFT appends one to every completion")
        flat = [text for ex in examples for text, _ in ex.segments]
        wheres = [ex.location for ex in examples for _ in ex.segments]
        ids_flat = iter(self._tokenize(flat, wheres, tokenizer, role))
        items, truncated, completion_cut = [], 0, []
        for ex in examples:
            ids: list[int] = []
            labels: list[int] = []
            prompt_length = 0
            last = ex._last_trained()
            for i, (_, trained) in enumerate(ex.segments):
                seg = next(ids_flat)
                if i == last:
                    prompt_length = len(ids)
                ids += seg
                labels += seg if trained else [IGNORE_INDEX] * len(seg)
            ids.append(eos)  # the model learns to stop
            labels.append(eos)
            if len(ids) > self.block_size:
                # Left truncation keeps the completion and its EOS (what is trained and scored).
                cut = len(ids) - self.block_size
                if cut > prompt_length:  # the completion alone is longer: its start goes too
                    completion_cut.append(ex.location)
                ids, labels, prompt_length = ids[cut:], labels[cut:], max(prompt_length - cut, 0)
                truncated += 1
            item = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}
            if with_text:
                item.update(prompt_length=prompt_length, prompt=ex.prompt, reference=ex.reference)
            items.append(item)
        if truncated:
            kept = truncated - len(completion_cut)
            what = f"{kept} lost the start of their prompt (completion kept)" if kept else ""
            if completion_cut:
                what += (
                    f"{', ' if kept else ''}{len(completion_cut)} lost their whole prompt and the start "
                    f"of their completion, which alone is longer (e.g. {completion_cut[0]})"
                )
            rank_zero_warn(
                f"SFTDataModule: {truncated} of {len(examples)} {role} examples are longer than "
                f"block_size={self.block_size} tokens and were truncated from the left: {what}; raise "
                f"block_size to keep them whole"
            )
        return items

    def _prompt_items(self, examples: list[Example], tokenizer: PreTrainedTokenizerFast) -> list[dict]:
        prompts = [ex.prompt if ex.reference else "".join(t for t, _ in ex.segments) for ex in examples]
        ids = self._tokenize(prompts, [ex.location for ex in examples], tokenizer, "predict")
        empty = [ex.location for ex, seq in zip(examples, ids, strict=True) if not seq]
        if empty:
            raise DataError(f"predict: empty prompt at {', '.join(empty[:5])}; every prompt needs some text")
        # Generation truncates prompts that do not fit beside max_new_tokens (with a warning).
        return [
            {
                "input_ids": torch.tensor(seq),
                "prompt_length": len(seq),
                "prompt": text,
                "reference": ex.reference,
            }
            for ex, seq, text in zip(examples, ids, prompts, strict=True)
        ]

    # ----------------------------------------------------------------- batches
    def collate(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        """The batch contract, plus `prompt_length`, `prompt` and `reference` on evaluation items."""
        plain = [{k: f[k] for k in ("input_ids", "labels") if k in f} for f in features]
        batch = super().collate(plain)
        if "prompt_length" in features[0]:
            batch["prompt_length"] = torch.tensor([f["prompt_length"] for f in features], dtype=torch.long)
            batch["prompt"] = [f["prompt"] for f in features]
            batch["reference"] = [f["reference"] for f in features]
        return batch

    def predict_dataloader(self) -> DataLoader:
        if self.predict_dataset is None:
            raise DataError(
                "no prompts to predict: set data.init_args.predict_files (records with the prompt, or "
                ".txt with one prompt per line)"
            )
        return super().predict_dataloader()


# ----------------------------------------------------------------------------- packing
def pack(items: list[dict[str, Any]], block_size: int, seed: int) -> list[dict[str, Any]]:
    """Concatenate whole examples into blocks of at most `block_size` tokens (see module docstring).

    The examples are shuffled with `seed` first, so a block mixes examples from all over the data
    and the packing is the same on every rank and every restart.
    """
    order = np.random.default_rng(seed).permutation(len(items))
    blocks: list[dict[str, Any]] = []
    ids: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    length = 0

    def close() -> None:
        if ids:
            blocks.append({"input_ids": torch.cat(ids), "labels": torch.cat(labels)})

    for index in order.tolist():
        item = items[index]
        n = len(item["input_ids"])
        if length + n > block_size:
            close()
            ids, labels, length = [], [], 0
        ids.append(item["input_ids"])
        labels.append(item["labels"])
        length += n
    close()
    return blocks


# ----------------------------------------------------------------------------- helpers
def template_fields(template: str) -> list[str]:
    """The column names a str.format template uses; ValueError for positional or malformed fields."""
    fields = []
    for _, name, _, _ in string.Formatter().parse(template):
        if name is None:
            continue
        if name == "" or name.isdigit():
            raise ValueError("fields must be named after columns, e.g. {question} (not {} or {0})")
        base = name.split(".")[0].split("[")[0]
        if base != name:
            raise ValueError(f"field {{{name}}} must be a plain column name")
        if name not in fields:
            fields.append(name)
    return fields


_MISSING = object()


def get_field(record: Any, path: str, default: Any = None) -> Any:
    """The value at `path` in a nested record: "a" is record["a"], "a.0.b" is record["a"][0]["b"].

    A key that itself contains dots ("meta.source") is found as written before it is split.
    """
    if isinstance(record, dict) and path in record:
        return record[path]
    value = record
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif (
            isinstance(value, list | tuple)
            and part.lstrip("-").isdigit()
            and -len(value) <= int(part) < len(value)
        ):
            value = value[int(part)]
        else:
            return default
    return value


def has_field(record: Any, path: str) -> bool:
    return get_field(record, path, _MISSING) is not _MISSING


def _text_field(record: dict, key: str, location: str, setting: str) -> str:
    value = get_field(record, key, _MISSING)
    if value is _MISSING:
        raise DataError(f"{location}: no {_describe_missing(record, key)}; set {setting}")
    if not isinstance(value, str):
        raise DataError(f"{location}: {key!r} is a {type(value).__name__}, not a string")
    return value


def _describe_missing(record: dict, path: str) -> str:
    """What is missing on the way to `path`: "key 'x' (keys: ...)" or "'b' in instances.0 (keys: ...)"."""
    if "." not in path or path.split(".")[0] not in record:
        keys = ", ".join(map(repr, record)) or "none"
        return f"key {path!r} (keys: {keys})"
    parts = path.split(".")
    value: Any = record
    for depth, part in enumerate(parts):
        found = get_field(value, part, _MISSING)
        if found is _MISSING:
            where = ".".join(parts[:depth])
            if isinstance(value, list | tuple):
                return f"item {part} in {where!r} (a list of {len(value)})"
            keys = ", ".join(map(repr, value)) if isinstance(value, dict) else type(value).__name__
            return f"{part!r} in {where!r} for {path!r} (there: {keys})"
        value = found
    return f"key {path!r}"


def _plain_chat(messages: list[dict], add_generation_prompt: bool) -> str:
    """DEFAULT_CHAT_TEMPLATE in Python, for the tokenizer corpus (before a tokenizer exists)."""
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return text + ("assistant: " if add_generation_prompt else "")


def _template_renderer(tokenizer: PreTrainedTokenizerFast):
    def render(messages: list[dict], add_generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as err:  # jinja2 errors (e.g. a template that requires alternating roles)
            raise DataError(f"the tokenizer's chat template cannot render these messages ({err})") from None

    return render
