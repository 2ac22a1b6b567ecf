"""CausalLM: self-supervised next-token prediction, the pretraining half of the GPT recipe.

fit / validate / test   next-token cross entropy (perplexity, bits per byte in the report)
predict                 prompts (data.init_args.predict_files) -> generate_batch with the
                        decoding settings below -> <run>/predictions/predictions.jsonl {prompt, completion}
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from gptlab.decoding import decode_completion, decoding_problems, generate_batch, unused_sampling_options
from gptlab.errors import ConfigError
from gptlab.models import Backbone
from gptlab.optim import WarmupCosine
from gptlab.reports import Report, write_text
from gptlab.runs import predictions_path
from gptlab.tasks.base import PeftConfig, TaskModule
from gptlab.tasks.context import Context


class CausalLM(TaskModule):
    """Next-token cross entropy on every labelled position; `predict` continues prompts.

    Labels arrive aligned with `input_ids` (batch contract); the shift happens here, as in
    Hugging Face: position t predicts token t+1, and the last token is fed only as a target.
    Positions labelled -100 (padding, or prompt tokens in SFT) are ignored. Logs train/loss,
    val/loss, val/ppl and train/tokens. `predict` reads prompts (TextDataModule's or
    SFTDataModule's `predict_files`) and writes `<run>/predictions/predictions.jsonl`; the decoding settings
    are those of `gptlab.decoding.generate_batch`.
    """

    contexts = ("causal",)  # next-token prediction reads only the tokens before each position

    def __init__(
        self,
        backbone: Backbone | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = WarmupCosine,
        init_from: str | None = None,
        freeze_backbone: bool = False,
        backbone_lr_scale: float = 1.0,
        peft: PeftConfig | None = None,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float = 1.0,
        stop: list[str] | None = None,
        seed: int = 0,
        num_return_sequences: int = 1,
        min_new_tokens: int = 0,
        no_repeat_ngram_size: int = 0,
        num_beams: int = 1,
        length_penalty: float = 1.0,
        context: Context | str = "causal",
    ) -> None:
        """
        Args:
            backbone: the Transformer (`gptlab.models.GPT` or `gptlab.models.HFBackbone`). Required,
                except under the CLI with `init_from` (or `--ckpt_path`): the CLI then takes the
                backbone config recorded by that checkpoint's run.
            optimizer: called with the parameter groups (decay / no decay), e.g. `torch.optim.AdamW`.
            scheduler: called with the optimizer, stepped every optimizer step; None: constant lr.
            init_from: initialise the backbone weights from a gptlab checkpoint (`.ckpt`) or a
                Hugging Face model directory before training. Only used by `fit`.
            freeze_backbone: train only the task head; the backbone keeps its (pretrained) weights.
            backbone_lr_scale: the backbone's learning rate as a fraction of the optimizer's lr.
            peft: a peft config (e.g. peft.LoraConfig): adapters on a frozen backbone (see TaskModule).
            max_new_tokens: tokens generated per prompt at most (predict; test for Generation).
            temperature: 0 decodes greedily (reproducible); > 0 samples.
            top_k: sample among the k most likely tokens only (None: all).
            top_p: nucleus sampling threshold in (0, 1] (None: no nucleus filtering).
            repetition_penalty: > 1 discourages repeating tokens already in the sequence.
            stop: strings that end a completion (it is cut before them), beside the EOS token.
            seed: seed of sampling, so that sampled generations repeat exactly.
            num_return_sequences: completions per prompt: the best beams, or independent samples
                (predictions.jsonl then also lists them all under "completions").
            min_new_tokens: no EOS before this many new tokens.
            no_repeat_ngram_size: > 0 forbids repeating any n-gram of this size (prompt included).
            num_beams: > 1 decodes by beam search (transformers' algorithm; temperature 0).
            length_penalty: beam search ranks finished beams by log-probability / length **
                length_penalty (> 0 favours longer completions).
            context: `causal` only: a language model predicts each token from the ones before it
                (other contexts are for classifiers; see TaskModule).
        """
        super().__init__(
            backbone=backbone,
            optimizer=optimizer,
            scheduler=scheduler,
            init_from=init_from,
            freeze_backbone=freeze_backbone,
            backbone_lr_scale=backbone_lr_scale,
            peft=peft,
            context=context,
        )
        self.set_decoding(
            max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop, seed,
            num_return_sequences, min_new_tokens, no_repeat_ngram_size, num_beams, length_penalty,
        )  # fmt: skip

    def set_decoding(
        self,
        max_new_tokens: int,
        temperature: float,
        top_k: int | None,
        top_p: float | None,
        repetition_penalty: float,
        stop: list[str] | None,
        seed: int,
        num_return_sequences: int,
        min_new_tokens: int,
        no_repeat_ngram_size: int,
        num_beams: int,
        length_penalty: float,
    ) -> None:
        """Check and keep the decoding settings (arguments as in `__init__`)."""
        problems = decoding_problems(
            max_new_tokens, temperature, top_k, top_p, repetition_penalty,
            num_return_sequences, min_new_tokens, no_repeat_ngram_size, num_beams,
        )  # fmt: skip
        if problems:
            raise ConfigError(f"{type(self).__name__}: " + "; ".join(problems))
        unused = unused_sampling_options(temperature, top_k, top_p)
        if unused:
            how = "by beam search" if num_beams > 1 else "greedily"
            rank_zero_warn(
                f"gptlab: {type(self).__name__}: {', '.join(unused)} only apply to sampling, but "
                f"temperature=0 decodes {how}: they are ignored; set model.init_args.temperature > 0 "
                f"to sample, or leave them out"
            )
        self.decoding = dict(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            stop=list(stop) if stop else None,
            num_return_sequences=num_return_sequences,
            min_new_tokens=min_new_tokens,
            no_repeat_ngram_size=no_repeat_ngram_size,
            num_beams=num_beams,
            length_penalty=length_penalty,
        )
        self.seed = seed
        self.predictions: list[dict[str, Any]] = []
        self._generator: torch.Generator | None = None

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # The last token is only ever a target: it is not fed (its logits would be thrown away).
        # So a window of block_size + 1 tokens trains every one of the model's block_size
        # positions, as in nanoGPT (x = data[i:i+T], y = data[i+1:i+T+1]) and litgpt.
        inputs = {key: batch[key][:, :-1] for key in ("input_ids", "attention_mask") if key in batch}
        return self.backbone.logits(self.encode(inputs))  # (B, T-1, V)

    def positions_fed(self, seq_len: int) -> int:
        return seq_len - 1  # the last token is only a target

    def loss(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = outputs.float()  # (B, T-1, V); fp32 softmax under mixed precision
        targets = batch["labels"][:, 1:]  # (B, T-1)
        # reduction="sum" / count instead of "mean": a batch with no labelled token gives 0, not NaN.
        total = F.cross_entropy(
            logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100, reduction="sum"
        )
        return total / self.loss_weight(batch).clamp(min=1)

    def loss_weight(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return (batch["labels"][:, 1:] != -100).sum()

    def epoch_end_metrics(self, stage: str) -> dict[str, torch.Tensor]:
        metrics = super().epoch_end_metrics(stage)
        if f"{stage}/loss" in metrics:
            metrics[f"{stage}/ppl"] = torch.exp(metrics[f"{stage}/loss"])
        return metrics

    def on_validation_epoch_end(self) -> None:
        if self.val_loss.update_called and not self.trainer.sanity_checking:
            self.log("val/ppl", torch.exp(self.val_loss.compute()), prog_bar=True)
        super().on_validation_epoch_end()

    def on_test_epoch_end(self) -> None:
        if self.test_loss.update_called:
            self.log("test/ppl", torch.exp(self.test_loss.compute()))
        super().on_test_epoch_end()

    # ----------------------------------------------------------------- bits per byte
    # Perplexity is per token, so it depends on the tokenizer: a character vocabulary and a BPE
    # of 50k tokens give incomparable numbers on the same text. Bits per byte divide the same
    # total loss by the UTF-8 bytes of the scored text instead (the unit of The Pile and
    # lm-evaluation-harness' `bits_per_byte`), which any two tokenizers share.
    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        self.test_bytes = torch.zeros((), dtype=torch.float64, device=self.device)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = super().test_step(batch, batch_idx)
        tokenizer = self._tokenizer()
        if tokenizer is not None:
            # The scored tokens are the labelled targets (shifted, as in `loss`).
            targets = batch["labels"][:, 1:].cpu()
            texts = tokenizer.batch_decode(
                [row[row != -100].tolist() for row in targets], skip_special_tokens=True
            )
            self.test_bytes += sum(len(text.encode("utf-8")) for text in texts)
        return loss

    def _tokenizer(self):
        """The data module's tokenizer (read for decoding only), or None without one."""
        try:
            return getattr(self.trainer.datamodule, "tokenizer", None)
        except (RuntimeError, AttributeError):  # not set up, or no data module
            return None

    def report(self) -> Report:
        loss = self.test_loss.compute().item()
        # MeanMetric's weight state counts this rank's predicted tokens; sum over ranks.
        tokens = int(self.trainer.strategy.reduce(self.test_loss.weight, reduce_op="sum").item())
        metrics = {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else float("inf")}
        meta = {}
        tokenizer = self._tokenizer()
        size = float(self.trainer.strategy.reduce(self.test_bytes, reduce_op="sum").item())
        if tokenizer is not None and size > 0:
            metrics["bits_per_byte"] = loss * tokens / math.log(2) / size
            metrics["bytes_evaluated"] = int(size)
        metrics["tokens_evaluated"] = tokens
        if tokenizer is not None:
            name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
            meta["perplexity"] = (
                f"exp(loss), per token of the tokenizer {name} ({len(tokenizer)} tokens): comparable only "
                f"between runs with this tokenizer; bits_per_byte (loss x tokens / ln 2 / UTF-8 bytes of "
                f"the scored text) compares any two"
            )
        return Report(title="Causal language model: test report", metrics=metrics, meta=meta)

    # ----------------------------------------------------------------- generating
    def generate_completions(self, batch: dict[str, Any]) -> list[str]:
        """Completions of the prompts of a batch that carries them (`prompt_length`, `prompt`):
        `num_return_sequences` per prompt, prompt by prompt."""
        if "prompt_length" not in batch:
            raise ConfigError(
                f"{type(self).__name__} generates from prompt batches: give data.init_args.predict_files "
                f"(gptlab.data.TextDataModule or gptlab.data.SFTDataModule)"
            )
        if self.tokenizer is None:
            raise ConfigError(f"{type(self).__name__} needs the datamodule's tokenizer to decode generations")
        ids, lengths = batch["input_ids"], batch["prompt_length"].tolist()
        # A prompt truncated away entirely (its completion alone filled block_size) starts from EOS.
        prompts = [ids[i, :n].tolist() or [self.tokenizer.eos_token_id] for i, n in enumerate(lengths)]
        if self._generator is None or self._generator.device != self.device:
            self._generator = torch.Generator(device=self.device).manual_seed(self.seed)
        rows = generate_batch(
            self.backbone,
            prompts,
            eos_token_id=self.tokenizer.eos_token_id,
            tokenizer=self.tokenizer,
            generator=self._generator,
            pad_token_id=self.tokenizer.pad_token_id or 0,
            **self.decoding,
        )
        return [decode_completion(self.tokenizer, row, self.decoding["stop"]) for row in rows]

    def on_predict_epoch_start(self) -> None:
        self.predictions = []
        self._generator = None  # every predict run samples the same way

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        completions = self.generate_completions(batch)
        n = self.decoding["num_return_sequences"]
        records = []
        for i, prompt in enumerate(batch["prompt"]):
            mine = completions[i * n : (i + 1) * n]  # (n,): the best beam or first sample first
            records.append(
                {"prompt": prompt, "completion": mine[0], **({"completions": mine} if n > 1 else {})}
            )
        self.predictions.extend(records)
        return records

    def on_predict_epoch_end(self) -> None:
        # One file per process under several devices (each holds its share of the prompts).
        path = predictions_path(self.trainer, "predictions.jsonl")
        # Whole or not at all, with the mode a plain write gives (umask), like the reports.
        write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.predictions))
        rank_zero_info(f"gptlab: {len(self.predictions)} completions written to {path}")
