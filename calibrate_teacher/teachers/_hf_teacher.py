"""A Hugging Face classification model directory as a :class:`~calibrate_teacher.teachers.base.Teacher`.

:func:`load` opens the directory with :func:`~calibrate_teacher.teachers._hf.open_pretrained`
and wraps the model in :class:`HFTeacher` (format ``"hf"``):

* ``input_names`` are the forward's parameters a tokenizer or image processor provides:
  ``input_ids``, ``attention_mask``, ``token_type_ids`` (only where the model takes it and the
  directory's tokenizer, when it lists its ``model_input_names``, provides it), or
  ``pixel_values``. ``input_ids`` and ``attention_mask`` are required: a batch without the mask
  is an error, never silently run as if nothing were padding; ``token_type_ids`` may be left
  out (the model then uses zeros, what a tokenizer gives for single texts). Ids and masks are
  cast to int64, ``pixel_values`` to the model's dtype.
* ``num_classes`` is ``config.num_labels``; logits are ``model(**inputs).logits``, widened to
  float32, on ``device``.
* Token-level heads (causal LMs, token classifiers) are refused here: their logits are
  ``[B, S, V]`` and go through the language-model path.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from calibrate_teacher.errors import InvalidValueError, TeacherError
from calibrate_teacher.teachers._hf import HFTask, auto_class_for, check_directory, model_dtype, open_pretrained
from calibrate_teacher.teachers._inputs import InputPlan, feed_inputs
from calibrate_teacher.teachers.base import Inputs, InputSpec, TeacherFormat

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

__all__ = ["HFTeacher", "load"]

#: The inputs a tokenizer or image processor provides, in the order they are listed.
PROVIDED = ("input_ids", "attention_mask", "token_type_ids", "pixel_values")
_OPTIONAL = frozenset({"token_type_ids"})
_INTEGER = frozenset({"input_ids", "attention_mask", "token_type_ids"})
_PROBE_TOKENS = 16
_PROBE_SEED = 0


def load(
    path: Path,
    *,
    device: str = "auto",
    output: str | None = None,
    trust_remote_code: bool = False,
) -> HFTeacher:
    """Load a sequence or image classification directory as a teacher.

    Raises:
        InvalidValueError: ``output`` other than ``logits``.
        TeacherError: a token-level head (causal LM, token classifier), or see
            :func:`~calibrate_teacher.teachers._hf.open_pretrained`.
    """
    if output not in (None, "logits"):
        raise InvalidValueError(
            f"--output {output!r}: a Hugging Face model's logits are its output's 'logits'; drop --output"
        )
    layout = check_directory(path, trust_remote_code=trust_remote_code)
    auto, task = auto_class_for(layout.config, where=path)
    if task in ("causal_lm", "token"):
        kind = "a causal LM" if task == "causal_lm" else "a token classifier"
        raise TeacherError(
            f"{path}: {kind} ({auto}) predicts one distribution per token, not one per sample; "
            "token-level teachers are calibrated through the language-model path, not as classifiers"
        )
    model, notes = open_pretrained(path, auto_class=auto, trust_remote_code=trust_remote_code, device=device)
    return HFTeacher(path, model, task=task, auto_class=auto, config=layout.config, notes=notes)


class HFTeacher:
    """A loaded Hugging Face classifier: ``logits(batch)`` is ``model(**inputs).logits`` in float32."""

    format: TeacherFormat = "hf"
    #: Any batch size.
    batch_rows: tuple[int, int | None] | None = None

    def __init__(
        self,
        path: Path,
        model: PreTrainedModel,
        *,
        task: HFTask,
        auto_class: str,
        config: Mapping[str, object],
        notes: list[str],
    ) -> None:
        self.path = path
        self.model = model
        self.task = task
        self.auto_class = auto_class
        self.notes = notes
        self.device = str(next(model.parameters()).device)
        self.dtype = model_dtype(model)
        self.precision = str(self.dtype).removeprefix("torch.")
        self.num_classes = int(model.config.num_labels or 0)
        names = _input_names(model, path)
        self.input_names: tuple[str, ...] | None = names
        self._plan = InputPlan.of(
            names,
            required=[n for n in names if n not in _OPTIONAL],
            dtypes={n: ("int64" if n in _INTEGER else self.precision) for n in names},
        )
        self.input_spec: InputSpec | None = _input_spec(config, names, self.precision)
        self._vocab = int(getattr(model.config, "vocab_size", 0) or 0)

    def logits(self, batch: Inputs) -> torch.Tensor:
        """Return the pre-softmax logits ``[n, num_classes]`` (float32) on :attr:`device`."""
        import torch

        named = feed_inputs(batch, self._plan, where=self.path, notes=self.notes)
        moved = {k: v.to(self.device) for k, v in named.items()}
        with torch.inference_mode():
            out = self.model(**moved)
        values = getattr(out, "logits", None)
        if not isinstance(values, torch.Tensor) or values.ndim != 2:
            shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
            raise TeacherError(f"{self.path}: expected logits [n, C] from {type(self.model).__name__}, got {shape}")
        return values.float() if values.dtype != torch.float64 else values

    def _probe(self, batch_size: int) -> Inputs:
        """Deterministic random inputs (token ids and a full mask, or pixels) of ``batch_size`` rows."""
        return probe_inputs(self.model, self.input_names or (), batch_size)

    def _probabilities(self, batch: Inputs) -> torch.Tensor | None:
        return None  # transformers heads return logits


def probe_inputs(model: PreTrainedModel, names: tuple[str, ...], rows: int) -> dict[str, torch.Tensor]:
    """Random inputs a model takes: ids below the vocabulary with a full mask, or pixel values."""
    import torch

    gen = torch.Generator().manual_seed(_PROBE_SEED)
    config = model.config
    out: dict[str, torch.Tensor] = {}
    if "pixel_values" in names:
        size = getattr(config, "image_size", 224)
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        channels = int(getattr(config, "num_channels", 3))
        out["pixel_values"] = torch.randn((rows, channels, h, w), generator=gen).to(model_dtype(model))
    if "input_ids" in names:
        vocab = int(getattr(config, "vocab_size", 2) or 2)
        out["input_ids"] = torch.randint(0, vocab, (rows, _PROBE_TOKENS), generator=gen)
        if "attention_mask" in names:
            out["attention_mask"] = torch.ones((rows, _PROBE_TOKENS), dtype=torch.long)
    return out


def _input_names(model: PreTrainedModel, path: Path) -> tuple[str, ...]:
    """The forward's parameters among those a tokenizer / image processor provides."""
    params = inspect.signature(model.forward).parameters
    taken = [n for n in PROVIDED if n in params]
    provided = _tokenizer_inputs(path)
    if provided is not None:  # the tokenizer says what it returns: token_type_ids only if listed
        taken = [n for n in taken if n not in _OPTIONAL or n in provided]
    if "input_ids" not in taken and "pixel_values" not in taken:
        raise TeacherError(
            f"{path}: {type(model).__name__}.forward takes neither input_ids nor pixel_values; "
            "only text and image classifiers load as teachers"
        )
    if "pixel_values" in taken:
        return ("pixel_values",)
    return tuple(taken)


def _tokenizer_inputs(path: Path) -> tuple[str, ...] | None:
    """``model_input_names`` from the directory's ``tokenizer_config.json``, when it lists them."""
    import json

    file = path / "tokenizer_config.json"
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    names = data.get("model_input_names") if isinstance(data, dict) else None
    if isinstance(names, list) and all(isinstance(n, str) for n in names):
        return tuple(names)
    return None


def _input_spec(config: Mapping[str, object], names: tuple[str, ...], precision: str) -> InputSpec:
    if names == ("pixel_values",):
        size = config.get("image_size", 224)
        h, w = (size, size) if isinstance(size, int) else tuple(size)  # type: ignore[arg-type]
        channels = config.get("num_channels", 3)
        return InputSpec("pixel_values", (None, int(channels), int(h), int(w)), precision)  # type: ignore[call-overload]
    return InputSpec("input_ids", (None, None), "int64")
