"""Callbacks that any task can use: sample generation during training."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from gptlab.generate import generate


class SampleGeneration(L.Callback):
    """After each validation, continue a few prompts and log them (TensorBoard text + console).

    A cheap qualitative check that pretraining learns language, next to the loss curve.
    """

    def __init__(
        self,
        prompts: list[str] | None = None,
        max_new_tokens: int = 64,
        temperature: float = 0.8,
        top_k: int | None = 50,
        seed: int = 0,
    ) -> None:
        """
        Args:
            prompts: texts to continue; default one prompt, the end-of-text token (unconditional).
            max_new_tokens: tokens generated per prompt.
            temperature: sampling temperature (0 = greedy).
            top_k: sample among the k most likely tokens (None = all).
            seed: sampling seed, so samples from successive validations are comparable.
        """
        self.prompts = prompts
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_k = top_k
        self.seed = seed
        self.samples: list[tuple[str, str]] = []

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        tokenizer = getattr(pl_module, "tokenizer", None)
        if trainer.sanity_checking or tokenizer is None or not trainer.is_global_zero:
            return
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        self.samples = []
        for prompt in self.prompts or [tokenizer.eos_token]:
            ids = tokenizer(prompt)["input_ids"] or [tokenizer.eos_token_id]
            new = generate(
                pl_module.backbone,
                ids,
                self.max_new_tokens,
                self.temperature,
                self.top_k,
                eos_token_id=None,
                generator=generator,
            )
            self.samples.append((prompt, tokenizer.decode(new)))
        text = "\n\n".join(f"[{p!r}] {c}" for p, c in self.samples)
        rank_zero_info(f"\nSamples at step {trainer.global_step}:\n{text}\n")
        for logger in trainer.loggers:
            if hasattr(logger.experiment, "add_text"):
                # Markdown code block keeps the newlines and indentation of the samples.
                logger.experiment.add_text("samples", f"```\n{text}\n```", trainer.global_step)
