"""Loading a Hugging Face tokenizer from a local folder, offline and without remote code.

:func:`load_tokenizer` reads ``tokenizer_config.json`` first: one that asks for custom code
(``auto_map``) is refused unless ``trust_remote_code=True``, before transformers imports any of
it. :func:`resolve_max_length` settles the truncation length and says where it came from.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from calibrate_teacher.errors import InputError, InvalidValueError, MissingDependencyError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["DEFAULT_MAX_LENGTH", "load_tokenizer", "resolve_max_length", "tokenizer_name"]

#: The truncation length used when neither the user nor the tokenizer gives one.
DEFAULT_MAX_LENGTH = 512

# Files any one of which makes a folder a tokenizer folder.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model")

# transformers' stand-in for "no limit" (int(1e30)); anything this large is not a real length.
_NO_LIMIT = 10**12


def load_tokenizer(path: str | os.PathLike[str], *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load the tokenizer saved in a folder (a model directory or ``--tokenizer DIR``).

    Args:
        path: The folder holding ``tokenizer.json`` / ``tokenizer_config.json`` (and friends).
        trust_remote_code: Allow a tokenizer whose config names custom code (``auto_map``).

    Returns:
        The tokenizer, loaded with ``local_files_only=True`` (nothing is downloaded).

    Raises:
        InputError: the folder is missing, holds no tokenizer files, or cannot be loaded.
        InvalidValueError: the config asks for remote code and ``trust_remote_code`` is False.
        MissingDependencyError: transformers is not installed.
    """
    p = Path(path)
    if not p.is_dir():
        raise InputError(f"{p}: no such tokenizer folder; pass --tokenizer DIR (a folder with tokenizer.json)")
    if not any((p / name).is_file() for name in _TOKENIZER_FILES):
        raise InputError(
            f"{p}: holds no tokenizer files ({', '.join(_TOKENIZER_FILES)}); "
            "pass --tokenizer DIR naming the folder the tokenizer was saved to"
        )
    if not trust_remote_code:
        _refuse_remote_code(p)
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise MissingDependencyError(
            f"{p}: loading a tokenizer needs transformers: pip install 'calibrate-teacher[hf]'"
        ) from exc
    try:
        tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(
            str(p), local_files_only=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"{p}: cannot load the tokenizer ({type(exc).__name__}: {exc})") from exc
    return tokenizer


def _refuse_remote_code(folder: Path) -> None:
    # Before transformers imports anything: the tokenizer's own config, and a model config's
    # AutoTokenizer entry (which AutoTokenizer falls back to), may name code shipped in the folder.
    for name, key in (("tokenizer_config.json", None), ("config.json", "AutoTokenizer")):
        config = folder / name
        if not config.is_file():
            continue
        try:
            data = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(f"{config}: not valid JSON ({exc})") from exc
        auto_map = data.get("auto_map") if isinstance(data, dict) else None
        if auto_map and (key is None or (isinstance(auto_map, dict) and key in auto_map)):
            raise InvalidValueError(
                f"{config}: the tokenizer needs custom code (auto_map: {auto_map}); "
                "it runs only with --trust-remote-code (trust_remote_code=True), after you have read it"
            )


def tokenizer_name(tokenizer: PreTrainedTokenizerBase) -> str:
    """The folder (or name) a tokenizer was loaded from, for descriptions."""
    return str(getattr(tokenizer, "name_or_path", "") or f"<{type(tokenizer).__name__}>")


def resolve_max_length(tokenizer: PreTrainedTokenizerBase, max_length: int | None) -> tuple[int, str, str | None]:
    """The truncation length, where it came from, and a note when a default stood in.

    Raises:
        InvalidValueError: ``max_length`` is below 1.
    """
    if max_length is not None:
        if max_length < 1:
            raise InvalidValueError(f"max_length: expected a positive integer, got {max_length}")
        return int(max_length), "max_length (given)", None
    limit = getattr(tokenizer, "model_max_length", None)
    name = tokenizer_name(tokenizer)
    if isinstance(limit, int | float) and 0 < limit < _NO_LIMIT:
        n = int(limit)
        return n, "tokenizer model_max_length", f"max_length {n}: the tokenizer's model_max_length ({name})"
    return (
        DEFAULT_MAX_LENGTH,
        f"default {DEFAULT_MAX_LENGTH}",
        f"max_length {DEFAULT_MAX_LENGTH}: a default; the tokenizer ({name}) gives no model_max_length "
        "(pass --max-length)",
    )
