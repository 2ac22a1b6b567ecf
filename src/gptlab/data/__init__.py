"""LightningDataModules (one file per data shape) and the tokenizers they train or load."""

from gptlab.data.base import DataModule, SeededShuffleSampler
from gptlab.data.classification import ClassificationDataModule
from gptlab.data.sft import DEFAULT_CHAT_TEMPLATE, SFTDataModule
from gptlab.data.sources import expand_files
from gptlab.data.text import TextDataModule, TokenBlocks
from gptlab.data.token_classification import TokenClassificationDataModule
from gptlab.data.tokenizers import (
    BPE,
    EOS_TOKEN,
    Char,
    TokenizerRecipe,
    load_tokenizer,
    prepare_tokenizer,
    tokenizer_cache_path,
    tokenizer_fingerprint,
)
from gptlab.errors import DataError

__all__ = [
    "BPE",
    "EOS_TOKEN",
    "Char",
    "ClassificationDataModule",
    "DEFAULT_CHAT_TEMPLATE",
    "DataError",
    "DataModule",
    "SFTDataModule",
    "SeededShuffleSampler",
    "TextDataModule",
    "TokenClassificationDataModule",
    "TokenBlocks",
    "TokenizerRecipe",
    "expand_files",
    "load_tokenizer",
    "prepare_tokenizer",
    "tokenizer_cache_path",
    "tokenizer_fingerprint",
]
