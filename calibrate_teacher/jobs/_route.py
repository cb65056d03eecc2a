"""Which kind of job a teacher and its data call for: classification, token-level, or detection.

The commands (``evaluate``, ``fit``, ``bake``, ``export-soft-labels``) are the same for every
kind of teacher; what differs is the shape of the teacher's output and what a sample is. This
module decides once, from the files alone (nothing is loaded or imported from them):

- **detection**: the data is COCO annotations (a ``.json`` holding ``images`` and
  ``annotations``, or a folder holding one), or the teacher is a detection ONNX export
  (ultralytics ``task: detect`` metadata, or one rank-3 output behind a ``Sigmoid``);
- **tokens**: the teacher is a Hugging Face directory whose architecture is a causal LM or a
  token classifier;
- **classification** otherwise (image classifiers, text classifiers, in-memory modules).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

__all__ = ["Task", "is_coco_data", "task_of"]

Task = Literal["classification", "tokens", "detection"]
_TOKEN_ENDINGS = ("ForCausalLM", "LMHeadModel", "ForTokenClassification")


def task_of(teacher: object | None, data: object | None = None) -> Task:
    """The kind of job for ``teacher`` (a path, a spec or a model) and ``data`` (a path, a spec, ...).

    >>> task_of("teacher.onnx", "val/")
    'classification'
    """
    teacher_path = _path_of(teacher)
    data_path = _path_of(data)
    if data_path is not None and is_coco_data(data_path):
        return "detection"
    if teacher_path is None:
        return "classification"
    if teacher_path.is_dir() and _token_architecture(teacher_path):
        return "tokens"
    if teacher_path.suffix.lower() == ".onnx" and teacher_path.is_file():
        from calibrate_teacher.detection.load import is_detection_onnx

        if is_detection_onnx(teacher_path):
            return "detection"
    return "classification"


def is_coco_data(path: str | os.PathLike[str]) -> bool:
    """True for a COCO annotation ``.json`` (``images`` + ``annotations``), or a folder holding one.

    A folder counts when it holds (or its ``annotations/`` holds) a ``.json`` file whose top
    level has both keys; image folders and text data never do.
    """
    p = Path(path)
    if p.is_file():
        return p.suffix.lower() == ".json" and _is_coco_json(p)
    if not p.is_dir():
        return False
    candidates = [*p.glob("*.json"), *(p / "annotations").glob("*.json")]
    return any(_is_coco_json(c) for c in candidates if c.is_file())


def _is_coco_json(path: Path) -> bool:
    # The keys sit near the top of a COCO file, but a json object's keys can come in any order:
    # parse it (annotation files are read whole by the COCO source anyway).
    try:
        with path.open(encoding="utf-8") as fh:
            head = fh.read(1)
            if head != "{":
                return False
            document = json.loads(head + fh.read())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(document, dict) and "images" in document and "annotations" in document


def _token_architecture(folder: Path) -> bool:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    architectures = config.get("architectures") if isinstance(config, dict) else None
    if not isinstance(architectures, list) or not architectures:
        return False
    name = str(architectures[0])
    return name.endswith(_TOKEN_ENDINGS)


def _path_of(value: object | None) -> Path | None:
    if value is None:
        return None
    if isinstance(value, str | os.PathLike):
        return Path(value)
    source = getattr(value, "path", None)  # a TeacherSpec / DataSpec: its file, or None in memory
    return source if isinstance(source, Path) else None
