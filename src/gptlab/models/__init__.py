"""Architectures only (no loss, no optimizer, no logging): the Backbone interface and its implementations.

Re-exported so YAML can use short class paths, e.g. ``class_path: gptlab.models.GPT``.
"""

from gptlab.models.backbone import Backbone
from gptlab.models.gpt import GPT, KVCache
from gptlab.models.hf import HFBackbone

__all__ = ["Backbone", "GPT", "HFBackbone", "KVCache"]
