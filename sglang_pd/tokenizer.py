"""Tokenizer loading (transformers' AutoTokenizer, local files only)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "tiktoken.model")


def load_tokenizer(path: str) -> Any | None:
    """The tokenizer in ``path``; None (token ids only) when the directory has no tokenizer files."""
    if Path(path).is_dir() and not any((Path(path) / f).exists() for f in TOKENIZER_FILES):
        logger.warning("no tokenizer files in %s: serving token ids only (text prompts are refused)", path)
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load a tokenizer from {path!r}: {e}") from e
