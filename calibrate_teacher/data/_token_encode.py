"""Tokenising rows into sequences with per-position labels, for :mod:`calibrate_teacher.data.tokens`.

One :class:`TokenEncoder` call handles one window of rows (in a DataLoader worker too). The
rules (what is scored, how prompts, chats and words become tokens) are described in
:mod:`calibrate_teacher.data.tokens`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from calibrate_teacher.data._records import MISSING, Columns, RecordFile
from calibrate_teacher.data._sequences import IGNORE_INDEX, Encoded, label_id, missing_field
from calibrate_teacher.data._tokenizer import tokenizer_name
from calibrate_teacher.errors import InputError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["TokenEncoder"]

# A chat template that marks assistant tokens itself ({% generation %} ... {% endgeneration %}).
_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")


class TokenEncoder:
    """Tokenises one window of rows into input_ids / attention_mask / labels (picklable)."""

    def __init__(
        self,
        records: RecordFile,
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_length: int,
        rows_as: str,
        fields: dict[str, str],
        completion_only: bool,
        id_field: str | None,
        class_names: tuple[str, ...] | None,
    ) -> None:
        self.records = records
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.rows_as = rows_as
        self.fields = fields
        self.completion_only = completion_only
        self.id_field = id_field
        self.names = {n: i for i, n in enumerate(class_names)} if class_names else None
        self.num_classes = len(class_names) if class_names else None

    def _values(self, cols: Columns, name: str, positions: Sequence[int], kind: type) -> list[Any]:
        field = self.fields[name]
        out = cols[field]
        for i, v in enumerate(out):
            if v is MISSING or v is None:
                raise missing_field(self.records, positions[i], field, what=name)
            if not isinstance(v, kind):
                where = self.records.where(positions[i])
                raise InputError(
                    f"{self.records.path}: {where}: field {field!r} is a {type(v).__name__}, expected a {kind.__name__}"
                )
        return out

    def __call__(self, cols: Columns, positions: list[int]) -> Encoded:
        if self.rows_as == "words":
            ids, labels = self._words(cols, positions)
        elif self.rows_as == "messages":
            ids, labels = self._messages(cols, positions)
        elif self.rows_as == "prompt-completion":
            ids, labels = self._prompt_completion(cols, positions)
        else:
            texts = self._values(cols, "text", positions, str)
            enc = self.tokenizer(texts, truncation=True, max_length=self.max_length, padding=False)
            ids = [list(x) for x in enc["input_ids"]]
            labels = [list(x) for x in ids]
        keys = [str(p) for p in positions] if self.id_field is None else [str(v) for v in cols[self.id_field]]
        return Encoded(
            features={"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids], "labels": labels},
            positions=positions,
            keys=keys,
        )

    def _prompt_completion(self, cols: Columns, positions: list[int]) -> tuple[list[list[int]], list[list[int]]]:
        prompts = self._values(cols, "prompt", positions, str)
        completions = self._values(cols, "completion", positions, str)
        # Each part alone is cut at max_length too (the joined sequence is cut there anyway).
        cut = {"truncation": True, "max_length": self.max_length, "padding": False}
        p_ids = self.tokenizer(prompts, **cut)["input_ids"]
        c_ids = self.tokenizer(completions, add_special_tokens=False, **cut)["input_ids"]
        ids, labels = [], []
        for p, c in zip(p_ids, c_ids, strict=True):
            seq = (list(p) + list(c))[: self.max_length]
            scored = [IGNORE_INDEX] * len(p) + list(c) if self.completion_only else list(seq)
            ids.append(seq)
            labels.append(scored[: len(seq)])
        return ids, labels

    def _messages(self, cols: Columns, positions: list[int]) -> tuple[list[list[int]], list[list[int]]]:
        chats = self._values(cols, "messages", positions, list)
        tok = self.tokenizer
        if not getattr(tok, "chat_template", None):
            raise InputError(
                f"{tokenizer_name(tok)}: has no chat template, so the {self.fields['messages']!r} rows of "
                f"{self.records.path} cannot be rendered; add chat_template to its tokenizer_config.json"
            )
        ids: list[list[int]] = []
        labels: list[list[int]] = []
        if not self.completion_only:
            enc: Any = tok.apply_chat_template(chats, tokenize=True, return_dict=True)
            for seq in enc["input_ids"]:
                seq = list(seq)[: self.max_length]
                ids.append(seq)
                labels.append(list(seq))
            return ids, labels
        has_mask = _GENERATION.search(str(tok.chat_template)) is not None
        enc = tok.apply_chat_template(chats, tokenize=True, return_dict=True, return_assistant_tokens_mask=has_mask)
        masks = enc["assistant_masks"] if has_mask else None
        for r, seq in enumerate(enc["input_ids"]):
            seq = list(seq)
            mask = list(masks[r]) if masks is not None else self._assistant_spans(chats[r], seq, positions[r])
            seq = seq[: self.max_length]
            ids.append(seq)
            labels.append([t if m else IGNORE_INDEX for t, m in zip(seq, mask, strict=False)])
        return ids, labels

    def _where_word(self, position: int, word: int) -> str:
        return f"{self.records.path}: {self.records.where(position)}, word {word}"

    def _assistant_spans(self, chat: list[Any], seq: list[int], position: int) -> list[int]:
        # No {% generation %} mask: an assistant turn k covers the tokens between the rendering of
        # turns [:k] with the generation prompt and the rendering of turns [:k+1].
        tok = self.tokenizer
        mask = [0] * len(seq)
        for k, message in enumerate(chat):
            if not isinstance(message, dict) or message.get("role") != "assistant":
                continue
            start: Any = tok.apply_chat_template(chat[:k], tokenize=True, add_generation_prompt=True, return_dict=True)
            end: Any = tok.apply_chat_template(chat[: k + 1], tokenize=True, return_dict=True)
            a, b = list(start["input_ids"]), list(end["input_ids"])
            if seq[: len(a)] != a or seq[: len(b)] != b:
                raise InputError(
                    f"{self.records.path}: {self.records.where(position)}: the chat template does not render "
                    "earlier turns as a prefix of the conversation, so assistant tokens cannot be found; "
                    "add {% generation %} blocks to the template or drop --completion-only"
                )
            for i in range(len(a), len(b)):
                mask[i] = 1
        return mask

    def _words(self, cols: Columns, positions: list[int]) -> tuple[list[list[int]], list[list[int]]]:
        words = self._values(cols, "tokens", positions, list)
        tags = self._values(cols, "tags", positions, list)
        if not getattr(self.tokenizer, "is_fast", False):
            raise InputError(
                f"{tokenizer_name(self.tokenizer)}: word-to-token alignment needs a fast tokenizer (tokenizer.json)"
            )
        for r, (w, t) in enumerate(zip(words, tags, strict=True)):
            if len(w) != len(t):
                where = self.records.where(positions[r])
                raise InputError(
                    f"{self.records.path}: {where}: {len(w)} words but {len(t)} tags; give one tag per word"
                )
        try:
            enc = self.tokenizer(words, is_split_into_words=True, truncation=True, max_length=self.max_length)
        except (ValueError, TypeError) as exc:
            raise InputError(f"{self.records.path}: cannot tokenise the words ({exc})") from exc
        ids, labels = [], []
        tag_name = f"tag ({self.fields['tags']})"
        for r in range(len(words)):
            seq = list(enc["input_ids"][r])
            row: list[int] = []
            previous = None
            for word in enc.word_ids(r):
                if word is None or word == previous:
                    row.append(IGNORE_INDEX)
                else:
                    row.append(
                        label_id(
                            tags[r][word],
                            names=self.names,
                            num_classes=self.num_classes,
                            where=functools.partial(self._where_word, positions[r], word),
                            field_name=tag_name,
                            allow_missing=False,
                        )
                    )
                previous = word
            ids.append(seq)
            labels.append(row)
        return ids, labels
