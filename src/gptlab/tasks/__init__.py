"""LightningModules: one file per task on top of `TaskModule`."""

from gptlab.tasks.base import TaskModule
from gptlab.tasks.causal_lm import CausalLM
from gptlab.tasks.generation import Generation

__all__ = ["CausalLM", "Generation", "TaskModule"]
