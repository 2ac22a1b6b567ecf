"""gptlab: a Lightning research template for pretraining and fine-tuning GPT-style language models."""

__version__ = "0.1.0"
