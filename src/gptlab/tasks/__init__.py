"""LightningModules: one file per task on top of `TaskModule`."""

from gptlab.tasks.base import TaskModule
from gptlab.tasks.causal_lm import CausalLM
from gptlab.tasks.generation import Generation
from gptlab.tasks.sequence_classification import SequenceClassification
from gptlab.tasks.token_classification import TokenClassification

__all__ = ["CausalLM", "Generation", "SequenceClassification", "TaskModule", "TokenClassification"]
