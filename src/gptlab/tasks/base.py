"""TaskModule: what every gptlab task shares.

    batch ─> encode() ─> hidden (B, T, H) ─> head ─> outputs ─> loss()
                                                       └──> metric_inputs() ─> {stage}_metrics (logged)
                                                                           └─> report_metrics (test only)

A task is a small subclass: it builds its head and metrics in `__init__` and overrides `loss()`,
and where needed `forward()`, `metric_inputs()`, `predict_step()` and `report()`. The base class
owns the backbone, hyperparameters, the one `shared_step` behind train/val/test, `"{stage}/{name}"`
log keys, a token-weighted loss metric per evaluation stage, optimizer and scheduler injection
(weight decay on matrices only; `backbone_lr_scale` for a slower backbone, `freeze_backbone`), and
initialising the backbone from a pretrained run (`init_from`).
"""

from __future__ import annotations

import inspect
import os
import sys
import tempfile
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics import MeanMetric, MetricCollection

from gptlab import adapters
from gptlab._lightning import attached_trainer, given_hyperparameters
from gptlab.errors import CheckpointError, ConfigError
from gptlab.loading import (
    is_sharded_checkpoint,
    load_backbone_weights,
    load_checkpoint,
    records_remote_code,
    save_consolidated,
    verify_checkpoint,
)
from gptlab.models import Backbone, HFBackbone
from gptlab.optim import WarmupCosine, apply_lr_scales, canonical_name, no_decay_names, param_groups
from gptlab.reports import Report
from gptlab.strategies import parallelize
from gptlab.tasks.context import (
    MODES,
    Context,
    bidirectional_layers,
    check_bidirectional,
    describe_reading,
    last_copy,
    parse_context,
    repeat_rows,
)


class PeftConfig:
    """Stand-in for peft.PeftConfig in the `peft` arguments' type until `use_peft_types()` runs.

    peft (with the transformers modeling code and accelerate it imports) costs about a second,
    which `main.py --help` should not pay: the real class is put in place when a command parses
    model arguments (the CLI) or loads a checkpoint. Without peft installed (pip install
    'gptlab[peft]') it stays, and the argument accepts only None.
    """


_PEFT_STAND_IN = PeftConfig


def use_peft_types() -> None:
    """Make `PeftConfig` in every imported module that took the stand-in peft's own class."""
    try:
        from peft import PeftConfig as peft_config
    except ImportError:  # pragma: no cover - exercised by the missing-dependency test in a subprocess
        return
    # jsonargparse fills LoraConfig's `loftq_config` (default {}) with LoftQConfig's defaults, and
    # peft then warns on every LoraConfig that it ignores them: it does (init_lora_weights != "loftq").
    warnings.filterwarnings("ignore", message="`loftq_config` specified but will be ignored")
    # Annotations are strings resolved in each module's globals when jsonargparse reads a signature.
    for module in list(sys.modules.values()):
        if getattr(module, "PeftConfig", None) is _PEFT_STAND_IN:
            module.PeftConfig = peft_config


STAGES = ("train", "val", "test")


class TaskModule(L.LightningModule):
    """Base class of gptlab's LightningModules (causal LM, SFT, classification, NER, ...)."""

    #: The contexts (tasks/context.py) this task can be trained with; a language model stays causal.
    contexts: tuple[str, ...] = MODES

    def __init__(
        self,
        backbone: Backbone | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = WarmupCosine,
        init_from: str | None = None,
        freeze_backbone: bool = False,
        backbone_lr_scale: float = 1.0,
        peft: PeftConfig | None = None,
        context: Context | str = "causal",
    ) -> None:
        """
        Args:
            backbone: the Transformer (`gptlab.models.GPT` or `gptlab.models.HFBackbone`). Required,
                except under the CLI with `init_from` (or `--ckpt_path`): the CLI then takes the
                backbone config recorded by that checkpoint's run.
            optimizer: called with the parameter groups (decay / no decay); e.g. `torch.optim.AdamW`
                with lr, betas and weight_decay in YAML. Its weight_decay applies to matrices only.
            scheduler: called with the optimizer and stepped every optimizer step; None for a
                constant learning rate. Default: linear warmup then cosine decay.
            init_from: initialise the backbone weights from a gptlab checkpoint (`.ckpt`) or a
                Hugging Face model directory before training. Only used by `fit`.
            freeze_backbone: train only the task head; the backbone keeps its (pretrained) weights.
            backbone_lr_scale: the backbone's learning rate as a fraction of the optimizer's lr
                (e.g. 0.1: the pretrained body moves slower than the freshly initialised head).
            peft: parameter-efficient fine-tuning with the peft library, e.g. `{class_path:
                peft.LoraConfig, init_args: {r: 16, lora_alpha: 32, lora_dropout: 0.05}}` (LoRA,
                AdaLoRA, IA3; gptlab.adapters): adapters in the backbone, whose own weights stay
                frozen; the task head trains fully. Default target modules: every linear layer of
                the blocks (`target_modules` overrides). Checkpoints then hold adapters and head
                only, with a reference to the base weights (`init_from` or the backbone's
                `name_or_path`). Needs `pip install 'gptlab[peft]'`.
            context: what each position reads (gptlab.tasks.context): `causal`, `bidirectional`
                (no causal mask, padding still masked; checked on the backbone at start) or
                `repeat` (the text twice in one row, the head reading the second copy), or a
                mapping such as `{mode: repeat, repeats: 2}`. Only tasks that label given text
                take other contexts than causal.
        """
        super().__init__()
        if backbone is None:
            raise ConfigError(
                f"{type(self).__name__}: no backbone: set model.init_args.backbone (e.g. class_path "
                f"gptlab.models.GPT), or init_from a gptlab checkpoint whose run recorded one"
            )
        if backbone_lr_scale < 0:
            raise ConfigError(f"backbone_lr_scale={backbone_lr_scale} must be >= 0 (0 freezes in effect)")
        if peft is not None:
            _check_peft_args(backbone, peft, init_from, freeze_backbone)
        self.context = parse_context(context, type(self).__name__, self.contexts)
        # the backbone layers without causal mask (None unless context is bidirectional)
        self.bidirectional = bidirectional_layers(self.context, backbone)
        if self.bidirectional is not None:
            config = getattr(getattr(backbone, "model", None), "config", None)  # an HFBackbone's family
            family = f" ({config.model_type})" if config is not None else ""
            check_bidirectional(backbone, self.bidirectional, type(backbone).__name__ + family)
        given = given_hyperparameters.get()
        if given is not None:
            # LightningCLI records every instantiation link in the hyperparameters, also the data ->
            # model.label_names link for tasks without that argument (jsonargparse drops it for
            # them); a key the class does not take would make load_from_checkpoint fail.
            accepted = inspect.signature(type(self).__init__).parameters
            for key in [k for k in given if not k.startswith("_") and k not in accepted]:
                del given[key]
        # Under LightningCLI the hyperparameters are the parsed config (class paths and plain values),
        # so `load_from_checkpoint(path)` rebuilds backbone and task with no other argument. Built
        # directly in Python, the objects are not pickled into the checkpoint (it must load with
        # weights_only=True): pass them again to `load_from_checkpoint`.
        from_config = given is not None
        self.save_hyperparameters(
            ignore=[] if from_config else ["backbone", "optimizer", "scheduler", "peft"]
        )
        if "context" in self.hparams:  # plain YAML values, whichever form was given (loads weights_only)
            self.hparams["context"] = self.context.as_value()
        self.backbone = backbone
        self.peft_config = peft
        # peft's tuner object, outside the module tree (it would register the backbone twice).
        self.__dict__["peft_tuner"] = adapters.add_adapters(backbone, peft) if peft is not None else None
        # Loaded at construction (a Hugging Face name_or_path) unless init_from brings them later.
        self._base_loaded = init_from is None
        self._base_fingerprint: str | None = None
        if peft is not None:
            # Checkpoints hold the rest only; Lightning's strict loading would miss them, so
            # on_load_checkpoint checks the saved part itself.
            self.strict_loading = False
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        check_optimization(optimizer, scheduler)
        self.init_from = init_from
        self.freeze_backbone = freeze_backbone
        self.backbone_lr_scale = backbone_lr_scale
        if freeze_backbone:
            self.backbone.requires_grad_(False)
        # Decided now, before any strategy wraps (and possibly flattens) the parameters.
        self.no_decay = no_decay_names(self)
        # Set from the datamodule in `setup`; used for decoding samples and reports.
        self.tokenizer = None
        # The data's block_size (texts are truncated to it): an export's tokenizer truncates there too.
        self.data_block_size: int | None = None
        # Persistent so that a resumed run keeps counting from where it stopped.
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.long))
        # Loss averaged over the items it is computed on (tokens, examples), across batches and ranks.
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()
        # Metrics that the test report reads but that are not scalars to log (confusion matrices,
        # per-class counts): updated on test batches like `test_metrics`, never logged.
        self.report_metrics: MetricCollection | None = None

    @classmethod
    def load_from_checkpoint(
        cls,
        checkpoint_path: str | Path,
        map_location=None,
        hparams_file: str | Path | None = None,
        strict: bool | None = None,
        weights_only: bool | None = None,
        **kwargs,
    ):
        """Lightning's `load_from_checkpoint`, which also reads a sharded FSDP checkpoint folder.

        The folder is consolidated into a temporary single file first (weights, hyperparameters):
        a model trained with FSDP on many devices loads in one process for evaluation or export.
        `kwargs` override saved hyperparameters, as in Lightning. The file is loaded with
        `weights_only=True` (unless `weights_only=False` is passed): a checkpoint holding
        arbitrary Python objects is refused with a CheckpointError before anything is unpickled.
        """
        use_peft_types()  # Lightning rebuilds the task from its signature, `peft: PeftConfig` included
        load = super().load_from_checkpoint
        if isinstance(checkpoint_path, str | Path):
            # One clear CheckpointError for a missing, truncated or unsafe file; and weights_only
            # stays True unless the caller asks otherwise (torch's default can be switched off by
            # TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD, Lightning passes None through).
            verify_checkpoint(checkpoint_path)
            weights_only = True if weights_only is None else weights_only
            if "backbone" not in kwargs and not is_sharded_checkpoint(checkpoint_path):
                # The recorded backbone is data, not consent: it never switches on remote code.
                hparams = load_checkpoint(checkpoint_path, mmap=True).get("hyper_parameters") or {}
                if records_remote_code(hparams.get("backbone")):
                    raise CheckpointError(
                        f"{checkpoint_path}: its recorded backbone sets trust_remote_code: true, which "
                        f"would run the model's own code; gptlab does not turn that on because a "
                        f"checkpoint says so: if you trust that code, pass the backbone yourself, "
                        f"load_from_checkpoint(path, backbone=HFBackbone(..., trust_remote_code=True))"
                    )
        if isinstance(checkpoint_path, str | Path) and is_sharded_checkpoint(checkpoint_path):
            with tempfile.TemporaryDirectory(prefix="gptlab-") as tmp:
                single = save_consolidated(checkpoint_path, Path(tmp) / "model.ckpt")
                return load(single, map_location, hparams_file, strict, weights_only, **kwargs)
        return load(checkpoint_path, map_location, hparams_file, strict, weights_only, **kwargs)

    # ----------------------------------------------------------------- what subclasses override
    def encode(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Backbone hidden states (B, T, H) for a batch, in the task's context (tasks/context.py).

        Batches are right-padded (batch contract): with causal attention no real token ever attends
        to padding, so passing no mask keeps the fast `is_causal` attention path, unless the
        backbone is padding-free (it then skips the padding, faster still). Bidirectional attention
        would see the padding: it always gets the mask when a batch is padded. `repeat` runs the
        repeated rows and returns the last copy's states, aligned with the batch's tokens.
        """
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        if self.bidirectional is not None:
            padded = not bool(mask.all())  # (one host sync; no mask at all selects the fused kernels)
            return self.backbone(ids, mask if padded else None, bidirectional=self.bidirectional)
        repeats = self.context.repeats if self.context.mode == "repeat" else 0
        rows, row_mask = repeat_rows(ids, mask, repeats) if repeats else (ids, mask)
        hidden = self.backbone(rows, row_mask) if self.backbone.padding_free else self.backbone(rows)
        return last_copy(hidden, mask, repeats) if repeats else hidden

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Task outputs (usually logits) for a batch."""
        return self.head(self.encode(batch))

    def loss(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean loss over the items that count (labels != -100)."""
        raise NotImplementedError(f"{type(self).__name__} must implement loss(outputs, batch)")

    def loss_weight(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """How many items the mean loss of this batch averages over, to weight it across batches."""
        return (batch["labels"] != -100).sum()

    def metric_inputs(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple:
        """Arguments for `{stage}_metrics.update(...)`: by default (outputs, labels)."""
        return outputs, batch["labels"]

    def report(self) -> Report:
        """The test report; called at the end of the test epoch, before metrics are reset."""
        return Report(
            title=f"{type(self).__name__} test report", metrics={"loss": self.test_loss.compute().item()}
        )

    # ----------------------------------------------------------------- helpers for subclasses
    def set_metrics(self, metrics: MetricCollection, stages: tuple[str, ...] = STAGES) -> None:
        """One independent copy of `metrics` per stage, as attributes `{stage}_metrics`.

        Attributes rather than a ModuleDict: the key "train" would clash with nn.Module.train.
        """
        for stage in stages:
            setattr(self, f"{stage}_metrics", metrics.clone(prefix=f"{stage}/"))

    # ----------------------------------------------------------------- the one step funnel
    def shared_step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        outputs = self(batch)
        loss = self.loss(outputs, batch)
        batch_size = batch["input_ids"].shape[0]
        if stage == "train":
            # Tokens are counted on device (no host sync); each rank counts its own share.
            self.tokens_seen += batch["attention_mask"].sum()
            if self.is_logging_step():
                self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
                self.log(
                    "train/tokens", self.tokens_seen.float() * self.trainer.world_size, batch_size=batch_size
                )
        else:
            stage_loss = getattr(self, f"{stage}_loss")
            stage_loss.update(loss.detach(), weight=self.loss_weight(batch))
            self.log(f"{stage}/loss", stage_loss, prog_bar=True, batch_size=batch_size)
        metrics = getattr(self, f"{stage}_metrics", None)
        report_metrics = self.report_metrics if stage == "test" else None
        if metrics is not None or report_metrics is not None:
            inputs = self.metric_inputs(outputs, batch)
        if metrics is not None:
            metrics.update(*inputs)
            # Epoch-level values computed from summed states, never an average of per-batch values.
            self.log_dict(metrics, on_step=False, on_epoch=True, batch_size=batch_size)
        if report_metrics is not None:
            report_metrics.update(*inputs)
        return loss

    def positions_fed(self, seq_len: int) -> int:
        """How many positions of a `seq_len`-token sequence go through the backbone (throughput)."""
        return seq_len

    def is_logging_step(self) -> bool:
        """True on the training steps whose logged values Lightning writes (every log_every_n_steps).

        Per-step values are only written on those steps, so logging on the others is pure
        overhead: each `self.log` runs Lightning's result bookkeeping in Python (a visible share
        of a small model's step; benchmarks/train_throughput.py --profile), and the progress bar
        shows the loss just as well every N steps.
        """
        trainer = self.trainer
        n = trainer.log_every_n_steps
        # global_step counts the optimizer steps before this one: this is step global_step + 1.
        return (
            bool(trainer.fast_dev_run)
            or trainer.should_stop
            or (n > 0 and (trainer.global_step + 1) % n == 0)
        )

    def on_train_batch_start(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        # Dropout (and any other sampling in the step) draws from the global RNG. Reseeding it
        # from (seed, step, micro-batch, rank) makes the masks of a step the same in a resumed
        # run as in an uninterrupted one: restoring RNG state would not be enough, because
        # validation and sample generation draw from it too, at other times (docs/design.md §6.1).
        trainer = self.trainer
        micro = batch_idx % trainer.accumulate_grad_batches
        seed_step_rng(self.device, step_seed(trainer.global_step, micro, trainer.global_rank))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.shared_step(batch, "train")
        if adapters.is_adalora(self.peft_config):
            loss = loss + adapters.orthogonality_penalty(self.peft_tuner)
        return loss

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if adapters.is_adalora(self.peft_config):
            # After the step, before the gradients are cleared (peft's AdaLoRA recipe); the index
            # of the step just taken.
            self.peft_tuner.update_and_allocate(self.trainer.global_step - 1)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.shared_step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.shared_step(batch, "test")

    def on_test_epoch_start(self) -> None:
        # Lightning resets the metrics it logs; the report-only ones are ours to reset.
        if self.report_metrics is not None:
            self.report_metrics.reset()

    def on_test_epoch_end(self) -> None:
        # Built here because Lightning resets logged metric objects right after this hook.
        self.test_report = self.report()

    def on_validation_epoch_end(self) -> None:
        # A sanity check over the whole validation set (trainer.num_sanity_val_steps: -1) is the
        # validation at step 0. Lightning discards what it logs, so write it to the loggers
        # directly: the curves then start from the untrained model.
        trainer = self.trainer
        if trainer.sanity_checking and trainer.num_sanity_val_batches == trainer.num_val_batches:
            metrics = {k: v.item() for k, v in self.epoch_end_metrics("val").items()}
            for logger in self.loggers:
                logger.log_metrics(metrics, step=0)
            if metrics:
                self.print("validation at step 0: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))

    def epoch_end_metrics(self, stage: str) -> dict[str, torch.Tensor]:
        """Loss and metrics of an evaluation stage computed from this epoch's states."""
        stage_loss = getattr(self, f"{stage}_loss")
        if not stage_loss.update_called:
            return {}
        out = {f"{stage}/loss": stage_loss.compute()}
        metrics = getattr(self, f"{stage}_metrics", None)
        if metrics is not None:
            out.update(metrics.compute())
        return out

    # ----------------------------------------------------------------- setup and checks
    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule if attached_trainer(self) is not None else None
        if datamodule is not None:
            self.tokenizer = getattr(datamodule, "tokenizer", None)
            self.data_block_size = getattr(datamodule, "block_size", None)
            self.check_data(datamodule)
        if self.peft_config is not None:
            # Under peft the checkpoints do not hold the base weights: they come from init_from
            # in every stage, resuming included.
            self.load_base()
        elif stage == "fit" and self.init_from and not self.trainer.ckpt_path:
            load_backbone_weights(self.backbone, self.init_from)
        if stage == "fit":
            trainable, total = adapters.count_parameters(self)
            share = 100 * trainable / max(total, 1)
            method = type(self.peft_config).__name__ if self.peft_config else None
            adapted = f", {method} adapters on a frozen base" if method else ""
            self.print(f"gptlab: {trainable:,} trainable parameters of {total:,} ({share:.2f}%){adapted}")
            if self.context.mode != "causal":
                block = getattr(datamodule, "block_size", None)
                reads = describe_reading(self.context, self.bidirectional, self.backbone.num_layers, block)
                self.print(f"gptlab: context {self.context.describe()}: {reads}")

    # ----------------------------------------------------------------- peft: base weights
    def load_base(self) -> None:
        """Under peft: load the base weights from `init_from` once, and fingerprint them."""
        if not self._base_loaded:
            if not Path(self.init_from).expanduser().exists():
                # The checkpoints hold adapters and head only: without their base they are nothing.
                raise CheckpointError(
                    f"init_from={self.init_from}, the base the peft adapters were trained on, no longer "
                    f"exists (a peft checkpoint holds adapters and head only): restore it there, or "
                    f"point model.init_args.init_from at a copy of it (the same weights)"
                )
            load_backbone_weights(self.backbone, self.init_from)
            # Adapters were injected on the random weights of __init__: inits that read the base
            # (PiSSA, OLoRA) run again on the loaded one.
            adapters.init_from_base(self.backbone, self.peft_config)
            self._base_loaded = True
        if self._base_fingerprint is None:
            self._base_fingerprint = adapters.base_fingerprint(self.backbone)

    def base_source(self) -> str:
        """Where the base weights come from: `init_from`, or the HFBackbone's name_or_path."""
        return str(self.init_from or getattr(self.backbone, "name_or_path", None))

    def saved_keys(self, keys) -> list[str]:
        """The state-dict keys a checkpoint keeps: under peft all but the frozen base weights."""
        if self.peft_config is None:
            return list(keys)
        prefix = adapters.adapter_prefix(self.peft_config)
        trainable = {canonical_name(n) for n, p in self.named_parameters() if p.requires_grad}
        return [
            k for k in keys if not k.startswith("backbone.") or prefix in k or canonical_name(k) in trainable
        ]

    def check_data(self, datamodule: L.LightningDataModule) -> None:
        """Fail before training when the data does not fit the model (one message, what to do)."""
        problems = []
        vocab = getattr(datamodule, "vocab_size", None)
        if vocab is not None and vocab > self.backbone.vocab_size:
            pretrained = getattr(self.backbone, "name_or_path", None)
            if pretrained:  # its embeddings are its vocabulary
                fix = f"use the model's own tokenizer (data.init_args.tokenizer: {pretrained})"
            elif isinstance(self.backbone, HFBackbone):  # HFBackbone takes its sizes in config_overrides
                fix = (
                    f"set model.init_args.backbone.init_args.config_overrides.vocab_size to at least {vocab}"
                )
            else:
                fix = f"set model.init_args.backbone.init_args.vocab_size to at least {vocab}"
            problems.append(
                f"the tokenizer has {vocab} tokens but the model's vocab_size is {self.backbone.vocab_size}: "
                f"{fix} (or use a smaller tokenizer)"
            )
        block = getattr(datamodule, "block_size", None)
        model_block = getattr(self.backbone, "block_size", None)
        if block is not None and model_block is not None and block > model_block:
            problems.append(
                f"data.init_args.block_size={block} exceeds the model's block_size={model_block}: "
                f"lower the data block_size or raise model.init_args.backbone.init_args.block_size"
            )
        elif self.context.mode == "repeat" and block is not None and model_block is not None:
            copies = self.context.repeats + 1
            if copies * block > model_block:
                problems.append(
                    f"model.init_args.context: repeat gives each text {copies} times in one row of up to "
                    f"{copies} x {block} = {copies * block} tokens (data.init_args.block_size={block} per "
                    f"copy), more than the model's block_size={model_block}: set data.init_args.block_size "
                    f"to at most {model_block // copies}, or fewer repeats"
                )
        if problems:
            raise ConfigError("; ".join(problems))

    def configure_model(self) -> None:
        # Sharding is the strategy's business (gptlab.strategies): under FSDP each instance of
        # `backbone.block_class` becomes one unit; under any other strategy this does nothing.
        if attached_trainer(self) is not None:
            parallelize(self, self.trainer.strategy)

    # ----------------------------------------------------------------- optimisation
    def configure_optimizers(self):
        optimizer = self.optimizer_factory(
            param_groups(self, self.no_decay, lr_scales={"backbone.": self.backbone_lr_scale})
        )
        apply_lr_scales(optimizer)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        if isinstance(scheduler, WarmupCosine) and scheduler.max_steps is None:
            scheduler.max_steps = int(self.trainer.estimated_stepping_batches)
        # "name": the logged learning rates are `train/lr/<group>` (gptlab.callbacks.LearningRate).
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "train/lr"},
        }

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        if not gradient_clip_val or not getattr(optimizer, "_step_supports_amp_scaling", False):
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        # A fused optimizer (AdamW(fused=True)) undoes fp16 loss scaling inside its step, so
        # Lightning refuses to clip it under any mixed precision, bf16 (no scaling at all)
        # included. PyTorch's recipe works for it: unscale first, then clip; the scaler then
        # hands the step no scale to undo (torch.amp.GradScaler.step).
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            scaler.unscale_(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Which task wrote this checkpoint, so that loading it into another task fails clearly.
        # FSDP2 swaps the class for a generated `FSDP<Task>` subclass: record the task's own class.
        task = next(c for c in type(self).__mro__ if not c.__module__.startswith("torch."))
        checkpoint["gptlab"] = {"task": f"{task.__module__}.{task.__qualname__}"}
        if self.data_block_size is not None:
            checkpoint["gptlab"]["block_size"] = self.data_block_size
        if self.peft_config is not None:
            # Adapters and head only, plus what identifies the frozen base they were trained on.
            state = checkpoint["state_dict"]
            checkpoint["state_dict"] = {k: state[k] for k in self.saved_keys(state)}
            self.load_base()
            checkpoint["gptlab"]["peft"] = {
                "method": type(self.peft_config).__name__,
                "base": self.base_source(),
                "base_fingerprint": self._base_fingerprint,
            }
            if adapters.is_adalora(self.peft_config):
                checkpoint["gptlab"]["peft"]["adalora"] = adapters.adalora_state(self.peft_tuner)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("hyper_parameters", {}).get("context")
        saved = parse_context(saved, type(self).__name__, MODES)
        if saved != self.context:
            raise CheckpointError(
                f"the checkpoint was trained with context {saved.describe()}, but this model has context "
                f"{self.context.describe()}: its weights were fitted to what each position read then; "
                f"set model.init_args.context: {saved.as_value()} (as in its run's config.yaml)"
            )
        info = checkpoint.get("gptlab", {}).get("peft")
        if self.peft_config is None:
            if info:
                raise CheckpointError(
                    f"the checkpoint holds {info['method']} adapters and a head only (trained on the base "
                    f"{info['base']}), but the model has no peft config: set model.init_args.peft as in "
                    f"its run (evaluate with that run's config.yaml, found beside the checkpoint)"
                )
            return
        if not info:
            raise CheckpointError(
                f"the model has {type(self.peft_config).__name__} adapters but the checkpoint holds a "
                f"full model without them: leave model.init_args.peft out to load it, or use it as "
                f"init_from for a peft fine-tune"
            )
        self.load_base()
        if info["base_fingerprint"] != self._base_fingerprint:
            if Path(info["base"]).expanduser().resolve() == Path(self.base_source()).expanduser().resolve():
                raise CheckpointError(
                    f"the weights at {info['base']} changed since the adapters were trained on them "
                    f"(fingerprint {info['base_fingerprint']} then, {self._base_fingerprint} now): "
                    f"restore the base the adapters were trained on there, or point init_from at a copy "
                    f"of it; adapters trained on other weights do not fit these (fine-tune again on them)"
                )
            raise CheckpointError(
                f"the adapter checkpoint was trained on the base {info['base']} (fingerprint "
                f"{info['base_fingerprint']}), but this model's base is {self.base_source()} (fingerprint "
                f"{self._base_fingerprint}): load it on the base it was trained on (init_from: "
                f"{info['base']})"
            )
        if "adalora" in info and adapters.is_adalora(self.peft_config):
            adapters.load_adalora_state(self.peft_tuner, info["adalora"])
        state = checkpoint.get("state_dict")
        if state is not None:  # (a sharded checkpoint was read by the strategy itself)
            missing = [k for k in self.saved_keys(self.state_dict()) if k not in state]
            if missing:
                raise CheckpointError(
                    f"the checkpoint lacks {len(missing)} adapter / head tensors of this model (e.g. "
                    f"{', '.join(missing[:3])}): it was trained with another peft config or task; use "
                    f"that run's config"
                )
            # The frozen base keeps what it holds (Lightning would list every such key as missing).
            for key, value in self.state_dict().items():
                state.setdefault(key, value)


def _check_peft_args(
    backbone: Backbone, peft: PeftConfig, init_from: str | None, freeze_backbone: bool
) -> None:
    """What a peft fine-tune needs: no freeze_backbone, and a base with weights to come back from."""
    if freeze_backbone:
        raise ConfigError(
            "model.init_args.peft and freeze_backbone: true exclude each other (peft already freezes "
            "the base weights and trains its adapters; freeze_backbone would freeze those too): set "
            "freeze_backbone: false, or drop peft to train the head only"
        )
    pretrained = isinstance(backbone, HFBackbone) and backbone.name_or_path is not None
    if init_from is None and not pretrained:
        raise ConfigError(
            f"model.init_args.peft: the {type(backbone).__name__} backbone has random weights (no init_from, "
            f"no name_or_path); adapters fine-tune a pretrained base, whose weights their checkpoints "
            f"leave out: set model.init_args.init_from (a gptlab checkpoint or a Hugging Face directory)"
        )


def check_optimization(optimizer: OptimizerCallable, scheduler: LRSchedulerCallable | None) -> None:
    """Build optimizer and scheduler once on a stand-in parameter, so that a value they refuse (a
    negative lr or warmup) stops the command now, naming its key, rather than after data setup."""
    probe = torch.nn.Parameter(torch.zeros(1))
    try:
        built = optimizer([probe])
    except ValueError as err:
        raise ConfigError(f"model.init_args.optimizer: {err}; fix the optimizer's init_args") from None
    except Exception:  # anything else is the real call's to report, with the real parameters
        return
    if scheduler is None:
        return
    try:
        scheduler(built)
    except ValueError as err:
        raise ConfigError(f"model.init_args.scheduler: {err}; fix the scheduler's init_args") from None
    except Exception:
        return


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    # Steele et al., "Fast splittable pseudorandom number generators" (2014): a cheap 64-bit mixer.
    z = (x + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def step_seed(step: int, micro_batch: int, rank: int) -> int:
    """The RNG seed of one training micro-batch: a function of (run seed, step, micro-batch, rank).

    The run seed is `seed_everything`'s (Lightning keeps it in $PL_GLOBAL_SEED; 0 when unset).
    The four numbers are chained through splitmix64, so nearby steps and ranks get unrelated
    seeds; plain integer arithmetic, far cheaper than numpy's SeedSequence or torch.manual_seed
    (which also queues a CUDA seeding call on every call).
    """
    h = int(os.environ.get("PL_GLOBAL_SEED", 0)) & _MASK64
    for value in (step, micro_batch, rank):
        h = _splitmix64(h ^ (value & _MASK64))
    return h


def seed_step_rng(device: torch.device, seed: int) -> None:
    """Seed the generators a training step draws from: the CPU's and, on a GPU, that device's."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.default_generators[device.index or 0].manual_seed(seed)
