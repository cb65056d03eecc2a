"""Options for text data (classification and language models) and for Hugging Face teachers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

_TEXT = "Text data"

TextFieldOpt = Annotated[
    str,
    typer.Option("--text-field", rich_help_panel=_TEXT, help="The field holding the text (jsonl/csv/parquet/dataset)."),
]
TextPairFieldOpt = Annotated[
    str | None,
    typer.Option(
        "--text-pair-field",
        rich_help_panel=_TEXT,
        help="The field holding the second text of a pair (NLI, QA).",
    ),
]
LabelFieldOpt = Annotated[
    str,
    typer.Option(
        "--label-field",
        rich_help_panel=_TEXT,
        help="The field holding the label: an integer id, or a name mapped through the "
        "teacher's label2id (or --classes).",
    ),
]
IdFieldOpt = Annotated[
    str | None,
    typer.Option(
        "--id-field",
        rich_help_panel=_TEXT,
        help="A field of unique sample ids, used as keys (default: the row index).",
    ),
]
TokenizerOpt = Annotated[
    Path | None,
    typer.Option(
        "--tokenizer",
        rich_help_panel=_TEXT,
        help="The tokenizer directory (default: the teacher's own, for a Hugging Face directory).",
        file_okay=False,
    ),
]
MaxLengthOpt = Annotated[
    int | None,
    typer.Option(
        "--max-length",
        rich_help_panel=_TEXT,
        min=1,
        help="Truncate to this many tokens (default: the tokenizer's model_max_length, said on stderr).",
    ),
]
SortByLengthOpt = Annotated[
    bool,
    typer.Option(
        "--sort-by-length",
        rich_help_panel=_TEXT,
        help="Batch texts of similar length together (less padding; keys and order of results unchanged).",
    ),
]
CompletionOnlyOpt = Annotated[
    bool,
    typer.Option(
        "--completion-only",
        rich_help_panel=_TEXT,
        help="Language models: score only completion tokens (prompt/completion rows) or assistant turns (chat).",
    ),
]
TrustRemoteCodeOpt = Annotated[
    bool,
    typer.Option(
        "--trust-remote-code",
        help="Hugging Face directories: allow the Python code the directory ships (auto_map) to run. Off by default.",
    ),
]
InputMapOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--input",
        metavar="NAME=FIELD",
        help="Feed the model input NAME from the data field FIELD (repeatable), when their names differ.",
    ),
]
