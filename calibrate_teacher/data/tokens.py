"""Token-level text data: one sequence per row, labels per position, for LM and token-classifier teachers.

:func:`open_token_text` reads the same files as :func:`~calibrate_teacher.data.text.open_text`
and yields batches with ``inputs = {"input_ids", "attention_mask"}`` (int64, padded to each
batch's longest row) and ``labels`` int64 ``[n, S]`` holding :data:`IGNORE_INDEX` (-100) at
every unscored position, padding included.

``task="causal-lm"``: the labels are *unshifted*, as in Hugging Face: at a scored position
``labels == input_ids``; the shift (position t predicts token t+1) is applied once, later, by the
token metrics. A row is read as, in this order of preference by the fields the file has:

- ``messages`` (a list of ``{"role", "content"}``): rendered with the tokenizer's chat template;
  with ``completion_only`` only assistant turns are scored (the template's
  ``{% generation %}`` assistant mask where it has one, else the token boundaries of each
  assistant turn found by rendering the conversation up to it);
- ``prompt`` + ``completion``: the prompt tokenised as the tokenizer does (special tokens
  included), the completion without special tokens, appended (no EOS added); with
  ``completion_only`` only the completion's tokens are scored;
- ``text``: every token scored.

``task="token-classification"``: rows hold words (``tokens``) and one tag per word
(``ner_tags``: ids, or names mapped through ``class_names``). The first sub-token of each word
carries the word's tag; other sub-tokens and special tokens get -100 (via the fast tokenizer's
``word_ids()``).

Sequences are truncated at ``max_length`` from the right.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from calibrate_teacher.data._records import RecordFile, open_records
from calibrate_teacher.data._sequences import (
    IGNORE_INDEX,
    WindowedBatches,
    check_fields,
    check_unique_keys,
)
from calibrate_teacher.data._token_encode import TokenEncoder
from calibrate_teacher.data._tokenizer import load_tokenizer, resolve_max_length, tokenizer_name
from calibrate_teacher.errors import InputError, InvalidValueError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from calibrate_teacher.data.base import Batch

__all__ = ["IGNORE_INDEX", "RowsAs", "TokenTask", "TokenTextSource", "open_token_text"]

TokenTask = Literal["causal-lm", "token-classification"]
RowsAs = Literal["messages", "prompt-completion", "text", "words"]


def open_token_text(
    path: str | os.PathLike[str],
    *,
    tokenizer: PreTrainedTokenizerBase | str | os.PathLike[str],
    task: TokenTask,
    text_field: str = "text",
    prompt_field: str = "prompt",
    completion_field: str = "completion",
    messages_field: str = "messages",
    completion_only: bool = False,
    tokens_field: str = "tokens",
    tags_field: str = "ner_tags",
    id_field: str | None = None,
    max_length: int | None = None,
    class_names: Sequence[str] | None = None,
    sort_by_length: bool = False,
    trust_remote_code: bool = False,
) -> TokenTextSource:
    """Open a file of rows as token-level sequences with per-position labels.

    Args:
        path: A ``.jsonl`` / ``.csv`` / ``.parquet`` file or a ``save_to_disk`` folder.
        tokenizer: A loaded tokenizer, or the folder to load it from.
        task: ``"causal-lm"`` (labels are the tokens themselves) or ``"token-classification"``
            (labels are per-word tags).
        text_field: Causal LM: the field of plain text rows.
        prompt_field: Causal LM: the prompt field of prompt/completion rows.
        completion_field: Causal LM: the completion field.
        messages_field: Causal LM: the field of chat rows (a list of role/content messages).
        completion_only: Causal LM: score only completion tokens (prompt/completion rows) or
            assistant turns (chat rows).
        tokens_field: Token classification: the field holding the list of words.
        tags_field: Token classification: the field holding one tag per word.
        id_field: The field holding a unique key per row; None keys rows by position.
        max_length: Truncate to this many tokens; None takes the tokenizer's
            ``model_max_length`` (or 512), recorded in ``notes``.
        class_names: Token classification: tag names in label order (the teacher's id2label).
        sort_by_length: Sort rows by token count within windows of 64 batches.
        trust_remote_code: Passed to the tokenizer loader.

    Returns:
        The source.

    Raises:
        InputError: the file is unreadable, a field is missing or malformed, a tag unknown,
            an id repeats, or the tokenizer has no chat template for chat rows.
        InvalidValueError: ``completion_only`` for plain text rows, an unknown task, or
            ``max_length`` below 1.
        MissingDependencyError: transformers, pyarrow or datasets is missing.
    """
    if isinstance(tokenizer, str | os.PathLike):
        tokenizer = load_tokenizer(tokenizer, trust_remote_code=trust_remote_code)
    records = open_records(path)
    fields = {
        "text": text_field,
        "prompt": prompt_field,
        "completion": completion_field,
        "messages": messages_field,
        "tokens": tokens_field,
        "tags": tags_field,
    }
    return TokenTextSource(
        records,
        tokenizer,
        task=task,
        fields=fields,
        completion_only=completion_only,
        id_field=id_field,
        max_length=max_length,
        class_names=class_names,
        sort_by_length=sort_by_length,
    )


def _rows_as(records: RecordFile, task: TokenTask, f: dict[str, str]) -> RowsAs:
    have = set(records.fields)
    if task == "token-classification":
        return "words"
    if f["messages"] in have:
        return "messages"
    if f["prompt"] in have and f["completion"] in have:
        return "prompt-completion"
    if f["text"] in have:
        return "text"
    raise InputError(
        f"{records.path}: no {f['messages']!r}, {f['prompt']!r} + {f['completion']!r}, or {f['text']!r} "
        f"field; the {'first row' if records.format == 'jsonl' else 'file'} has: {', '.join(records.fields)}"
    )


class TokenTextSource:
    """Tokenised sequences with per-position labels (see :func:`open_token_text`).

    Attributes:
        path: The file or folder.
        records: The row reader.
        task: ``"causal-lm"`` or ``"token-classification"``.
        rows_as: How rows were read: ``"messages"``, ``"prompt-completion"``, ``"text"`` or
            ``"words"``.
        num_classes: Token classification: the number of tags (class list); else None.
        class_names: Tag names in label order, or None.
        description: JSON-ready: kind, path, fields, tokenizer, max_length (and where from),
            the scoring rule, padding, sorting.
        notes: One-line remarks on defaults that stood in.
        skipped: Always empty.
    """

    def __init__(
        self,
        records: RecordFile,
        tokenizer: PreTrainedTokenizerBase,
        *,
        task: TokenTask,
        fields: dict[str, str],
        completion_only: bool = False,
        id_field: str | None = None,
        max_length: int | None = None,
        class_names: Sequence[str] | None = None,
        sort_by_length: bool = False,
    ) -> None:
        """Check the file's fields and ids and set up batching; see :func:`open_token_text`."""
        if task not in ("causal-lm", "token-classification"):
            raise InvalidValueError(f"task: expected 'causal-lm' or 'token-classification', got {task!r}")
        self.records = records
        self.path: Path = records.path
        self.task: TokenTask = task
        self.fields = dict(fields)
        self.id_field = id_field
        self.class_names: tuple[str, ...] | None = tuple(str(c) for c in class_names) if class_names else None
        self.num_classes: int | None = len(self.class_names) if self.class_names else None
        self.skipped: list[tuple[str, str]] = []
        self.rows_as: RowsAs = _rows_as(records, task, self.fields)
        if completion_only and self.rows_as not in ("messages", "prompt-completion"):
            raise InvalidValueError(
                f"completion_only: {records.path} has {self.rows_as} rows; it needs prompt/completion or "
                "messages rows (nothing marks a completion in plain text)"
            )
        self.completion_only = completion_only
        notes: list[str] = []
        length, length_from, length_note = resolve_max_length(tokenizer, max_length)
        if length_note:
            notes.append(length_note)
        columns = {
            "words": [self.fields["tokens"], self.fields["tags"]],
            "messages": [self.fields["messages"]],
            "prompt-completion": [self.fields["prompt"], self.fields["completion"]],
            "text": [self.fields["text"]],
        }[self.rows_as] + ([id_field] if id_field else [])
        check_fields(records, columns, what=f"{self.rows_as} rows")
        if id_field:
            check_unique_keys(records, id_field)
        self._encoder = TokenEncoder(
            records,
            tokenizer,
            max_length=length,
            rows_as=self.rows_as,
            fields=self.fields,
            completion_only=completion_only,
            id_field=id_field,
            class_names=self.class_names,
        )
        self._batches = WindowedBatches(records, columns, self._encoder, tokenizer, sort=sort_by_length)
        if self._batches.pad_note:
            notes.append(self._batches.pad_note)
        self.notes: tuple[str, ...] = tuple(notes)
        self.description: dict[str, object] = {
            "kind": "token-text",
            "task": task,
            "path": str(records.path),
            "format": records.format,
            "num_samples": len(records),
            "rows_as": self.rows_as,
            "fields": {k: self.fields[k] for k in _FIELDS_OF[self.rows_as]} | {"id": id_field},
            "scoring": self._scoring(),
            "labels": "unshifted: labels == input_ids at scored positions; -100 elsewhere"
            if task == "causal-lm"
            else "tag id on the first sub-token of each word; -100 elsewhere",
            "keys_from": f"field {id_field!r}" if id_field else "row position",
            "tokenizer": tokenizer_name(tokenizer),
            "max_length": length,
            "max_length_from": length_from,
            "padding": f"longest in each batch, {self._batches.side} side, pad id {self._batches.pads['input_ids']}",
            "sort_by_length": "within windows of 64 batches, longest first" if sort_by_length else False,
            "num_classes": self.num_classes,
            "classes": list(self.class_names) if self.class_names else None,
            "notes": list(notes),
        }

    def _scoring(self) -> str:
        if self.rows_as == "words":
            return "first sub-token of each word"
        if not self.completion_only:
            return "every non-padding token"
        if self.rows_as == "messages":
            return "assistant turns only (chat template assistant mask, else turn boundaries)"
        return "completion tokens only"

    def __len__(self) -> int:
        """Return the number of sequences (rows)."""
        return len(self.records)

    def batches(
        self,
        *,
        batch_size: int,
        workers: int = 0,
        pin_memory: bool = False,
        indices: Sequence[int] | None = None,
    ) -> Iterator[Batch]:
        """Yield padded batches of sequences with ``labels`` ``[n, S]`` (-100 where unscored).

        Args:
            batch_size: Sequences per batch.
            workers: DataLoader worker processes reading and tokenising windows (0: here).
            pin_memory: Put the inputs in page-locked memory (for a CUDA teacher).
            indices: A subset of row positions, in the order wanted.
        """
        return self._batches.batches(batch_size=batch_size, workers=workers, pin_memory=pin_memory, indices=indices)


_FIELDS_OF: dict[str, tuple[str, ...]] = {
    "words": ("tokens", "tags"),
    "messages": ("messages",),
    "prompt-completion": ("prompt", "completion"),
    "text": ("text",),
}
