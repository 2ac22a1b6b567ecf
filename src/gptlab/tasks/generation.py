"""Generation: supervised fine-tuning on completions, and evaluation by what the model generates.

    fit      SFT batches (prompt labelled -100) -> CausalLM's shifted cross entropy on completions
    test     the same loss and perplexity on completions, then for every example:
               prompt -> generate_batch -> completion text -> exact match of the final answer,
                                                              BLEU, ROUGE-L against the reference
             -> reports/test_report.{txt,md,json} with metrics and sample generations
    predict  prompts -> generated completions -> <run>/predictions/predictions.jsonl  {prompt, completion}

Test and predict batches come from `gptlab.data.SFTDataModule`, which adds `prompt_length`,
`prompt` and `reference` to the batch contract.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics import Metric, MetricCollection
from torchmetrics.text import BLEUScore, ROUGEScore

from gptlab.errors import ConfigError
from gptlab.models import Backbone
from gptlab.optim import WarmupCosine
from gptlab.reports import Report
from gptlab.tasks.base import PeftConfig
from gptlab.tasks.causal_lm import CausalLM
from gptlab.tasks.context import Context

# lm-evaluation-harness's GSM8K "strict-match" filter: the number after "#### ".
GSM8K_ANSWER = r"#### (\-?[0-9\.\,]+)"


class AnswerExactMatch(Metric):
    """Share of generations that equal the reference: whole completions, or their final answers.

    Without a pattern (the default), the whole completion is compared with the whole reference,
    whitespace normalised (stripped, runs of spaces and newlines as one space). With a pattern,
    the answer is the first group (or the whole match) of its first match, compared after
    stripping whitespace, removing thousands separators and a trailing period ("1,000." ==
    "1000"), as for GSM8K's "#### N"; a reference the pattern does not match is compared whole,
    and a generation it does not match counts as wrong.
    """

    full_state_update = False

    def __init__(self, pattern: str | None = None) -> None:
        super().__init__()
        self.pattern = re.compile(pattern) if pattern is not None else None
        self.add_state("correct", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("found", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0), dist_reduce_fx="sum")

    def extract(self, text: str) -> str | None:
        """The normalised final answer in `text`, or None when the pattern finds none."""
        if self.pattern is None:
            return " ".join(text.split())
        else:
            match = self.pattern.search(text)
            if match is None:
                return None
            answer = match.group(1) if match.groups() else match.group(0)
        return answer.strip().replace(",", "").rstrip(".")

    def update(self, preds: list[str], target: list[str]) -> None:
        for pred, ref in zip(preds, target, strict=True):
            answer = self.extract(pred)
            expected = self.extract(ref)
            expected = expected if expected is not None else ref.strip()
            self.found += int(answer is not None)
            self.correct += int(answer is not None and answer == expected)
            self.total += 1

    def compute(self) -> torch.Tensor:
        return self.correct.float() / self.total.clamp(min=1)


class BLEU(BLEUScore):
    """Corpus BLEU-4 (torchmetrics) with one reference string per prediction."""

    def update(self, preds: list[str], target: list[str]) -> None:
        # BLEUScore reads each target as a list of references; a bare string would be read as a
        # list of one-character references and score 0.
        super().update(preds, [[ref] for ref in target])


class RougeL(ROUGEScore):
    """ROUGE-L F-measure (torchmetrics), averaged over examples, as one number."""

    def __init__(self) -> None:
        super().__init__(rouge_keys="rougeL")

    def compute(self) -> torch.Tensor:
        return super().compute()["rougeL_fmeasure"]


class Generation(CausalLM):
    """Prompt -> completion fine-tuning (SFT) with generation-based evaluation and prediction.

    Training is CausalLM's loss on the labelled (completion) tokens. `test` also generates a
    completion for every test prompt and reports exact match of the final answer, BLEU and
    ROUGE-L against the references, with sample generations; `predict` writes
    `<run>/predictions/predictions.jsonl`. Decoding settings apply to both.
    """

    def __init__(
        self,
        backbone: Backbone | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = WarmupCosine,
        init_from: str | None = None,
        freeze_backbone: bool = False,
        backbone_lr_scale: float = 1.0,
        peft: PeftConfig | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float = 1.0,
        stop: list[str] | None = None,
        seed: int = 0,
        answer_pattern: str = "",
        num_samples: int = 5,
        num_return_sequences: int = 1,
        min_new_tokens: int = 0,
        no_repeat_ngram_size: int = 0,
        num_beams: int = 1,
        length_penalty: float = 1.0,
        context: Context | str = "causal",
    ) -> None:
        """
        Args:
            backbone: the Transformer (`gptlab.models.GPT` or `gptlab.models.HFBackbone`). Under the
                CLI with `init_from` (or `--ckpt_path`) it may be left out: the CLI then takes the
                backbone config recorded by that checkpoint's run (or Hugging Face directory).
            optimizer: called with the parameter groups (decay / no decay), e.g. `torch.optim.AdamW`.
            scheduler: called with the optimizer, stepped every optimizer step; None: constant lr.
            init_from: start from a pretrained gptlab checkpoint (`.ckpt`) or a Hugging Face model
                directory (e.g. one written by `main.py export`). Only used by `fit`.
            freeze_backbone: train only the task head; the backbone keeps its (pretrained) weights.
            backbone_lr_scale: the backbone's learning rate as a fraction of the optimizer's lr.
            peft: a peft config (e.g. peft.LoraConfig): adapters on a frozen backbone (see TaskModule).
            max_new_tokens: tokens generated per prompt at most (test and predict).
            temperature: 0 decodes greedily (reproducible evaluation); > 0 samples.
            top_k: sample among the k most likely tokens only (None: all).
            top_p: nucleus sampling threshold in (0, 1] (None: no nucleus filtering).
            repetition_penalty: > 1 discourages repeating tokens already in the sequence.
            stop: strings that end a completion (it is cut before them), beside the EOS token.
            seed: seed of sampling, so that sampled evaluations repeat exactly.
            answer_pattern: regex of the final answer for exact match; its first group (or the
                whole match) is compared, e.g. GSM8K's "#### (\\-?[0-9\\.\\,]+)" (its config sets
                it). Empty (default): whole completions are compared, whitespace normalised. The
                report states which was used. (A str, not str | None: jsonargparse reads an
                optional string starting with "#" as a YAML comment, i.e. None.)
            num_samples: test generations shown in the report.
            num_return_sequences: completions per prompt (best beams, or samples); the test metrics
                score the first, predictions.jsonl lists them all.
            min_new_tokens: no EOS before this many new tokens.
            no_repeat_ngram_size: > 0 forbids repeating any n-gram of this size (prompt included).
            num_beams: > 1 decodes by beam search (transformers' algorithm; temperature 0).
            length_penalty: beam search ranks finished beams by log-probability / length **
                length_penalty.
            context: `causal` only (see CausalLM).
        """
        super().__init__(
            backbone=backbone,
            optimizer=optimizer,
            scheduler=scheduler,
            init_from=init_from,
            freeze_backbone=freeze_backbone,
            backbone_lr_scale=backbone_lr_scale,
            peft=peft,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            stop=stop,
            seed=seed,
            num_return_sequences=num_return_sequences,
            min_new_tokens=min_new_tokens,
            no_repeat_ngram_size=no_repeat_ngram_size,
            num_beams=num_beams,
            length_penalty=length_penalty,
            context=context,
        )
        problems = []
        if num_samples < 0:
            problems.append(f"num_samples={num_samples} must be >= 0")
        if answer_pattern:
            try:
                re.compile(answer_pattern)
            except re.error as err:
                problems.append(f"answer_pattern={answer_pattern!r} is not a valid regex ({err})")
        if problems:
            raise ConfigError("Generation: " + "; ".join(problems))
        self.num_samples = num_samples
        self.answer_pattern = answer_pattern
        # Generation-based metrics are computed in `test` only: generating is far slower than a
        # forward pass, so validation reports the loss alone.
        self.set_metrics(
            MetricCollection(
                {"exact_match": AnswerExactMatch(answer_pattern or None), "bleu": BLEU(), "rougeL": RougeL()}
            ),
            stages=("test",),
        )
        self.samples: list[dict[str, str]] = []

    def metric_inputs(self, outputs: torch.Tensor, batch: dict[str, Any]) -> tuple[list[str], list[str]]:
        # Called by shared_step for the stages that have metrics, i.e. test only.
        # The first of each prompt's num_return_sequences completions (the best beam) is scored.
        completions = self.generate_completions(batch)[:: self.decoding["num_return_sequences"]]
        for prompt, completion, reference in zip(
            batch["prompt"], completions, batch["reference"], strict=True
        ):
            if len(self.samples) < self.num_samples:
                self.samples.append({"prompt": prompt, "completion": completion, "reference": reference})
        return completions, batch["reference"]

    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        self.samples = []
        self._generator = None  # every test run samples the same way

    # ----------------------------------------------------------------- the report
    def report(self) -> Report:
        base = super().report()
        values = {name: float(m.compute().item()) for name, m in self.test_metrics.items(keep_base=True)}
        exact = self.test_metrics["exact_match"]
        # The metric's own states count this rank's examples; sum them over ranks.
        total, found = (
            int(self.trainer.strategy.reduce(state, reduce_op="sum").item())
            for state in (exact.total, exact.found)
        )
        loss = base.metrics["loss"]
        return Report(
            title="Generation: test report",
            metrics={
                "loss": loss,
                "perplexity": math.exp(loss) if loss < 700 else float("inf"),
                **{k: base.metrics[k] for k in ("bits_per_byte", "bytes_evaluated") if k in base.metrics},
                "tokens_evaluated": base.metrics["tokens_evaluated"],
                "examples_generated": total,
                "exact_match": values["exact_match"],
                # Without a pattern every completion "has" an answer: nothing to report.
                **({"answer_found": found / max(total, 1)} if self.answer_pattern else {}),
                "bleu": values["bleu"],
                "rougeL_f": values["rougeL"],
            },
            samples=self.samples,
            # How the completions were produced, next to the checkpoint and config the CLI adds.
            meta={
                **base.meta,
                "decoding": ", ".join(f"{k}={v!r}" for k, v in {**self.decoding, "seed": self.seed}.items()),
                "exact_match": (
                    f"answer_pattern {self.answer_pattern!r} (its first group, else the whole match) in "
                    f"completion and reference"
                    if self.answer_pattern
                    else "whole completion against whole reference, whitespace normalised (no answer_pattern)"
                ),
            },
        )
