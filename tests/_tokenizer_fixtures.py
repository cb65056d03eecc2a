"""Tiny tokenizers built in the test with `tokenizers` (nothing downloaded), and row-file writers."""

from __future__ import annotations

import csv
import json
from pathlib import Path

WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "dog",
    "ran",
    "fast",
    "slow",
    "good",
    "bad",
    "movie",
    "film",
    "great",
    "awful",
    "playing",
    "played",
]

# A fixed WordPiece vocabulary, so tokenisations can be worked out by hand.
HAND_VOCAB = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "dog",
    "ran",
    "##s",
    "##ing",
    "play",
    "user",
    "assistant",
    ":",
    "fast",
]


def _wrap(tok, folder: Path, **kwargs):
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", **kwargs
    )
    fast.save_pretrained(folder)
    return fast


def trained_tokenizer(folder: Path, *, padding_side: str = "right", model_max_length: int = 12, types: bool = False):
    """A WordPiece tokenizer trained on text written here, saved with save_pretrained."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordPieceTrainer(vocab_size=120, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"])
    corpus = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 5
    tok.train_from_iterator(corpus, trainer)
    kwargs = {"model_input_names": ["input_ids", "token_type_ids", "attention_mask"]} if types else {}
    return _wrap(tok, folder, padding_side=padding_side, model_max_length=model_max_length, **kwargs)


def hand_tokenizer(folder: Path, *, chat_template: str | None = None, model_max_length: int = 64):
    """A WordPiece tokenizer with the fixed vocabulary HAND_VOCAB (ids are list positions)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(HAND_VOCAB)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = _wrap(tok, folder, model_max_length=model_max_length)
    if chat_template is not None:
        fast.chat_template = chat_template
        fast.save_pretrained(folder)
    return fast


def write_rows(path: Path, rows: list[dict], *, row_group_size: int = 7) -> Path:
    """Write rows as .jsonl / .csv / .parquet (by suffix) or a save_to_disk folder (no suffix)."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif path.suffix == ".csv":
        with path.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    else:
        import datasets

        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path
