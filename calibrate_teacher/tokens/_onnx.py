"""ONNX sequence teachers: ``input_ids`` (+ ``attention_mask``) -> logits ``[B, S, C]``, via onnxruntime.

The CUDA provider is used when onnxruntime offers it and a GPU is present (``teachers/_onnx.py``
chooses the providers); the first float output of rank 3 holds the logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from calibrate_teacher.errors import TeacherError
from calibrate_teacher.tokens._positions import Task
from calibrate_teacher.tokens.teacher import LmHead, TokenFormat, TokenInputs, _check_task

if TYPE_CHECKING:
    import torch


class OnnxTokenTeacher:
    """A :class:`~calibrate_teacher.tokens.teacher.TokenTeacher` over an ONNX file (logits only, no head)."""

    format: TokenFormat = "onnx"
    head: LmHead | None = None
    class_names: tuple[str, ...] | None = None

    def __init__(self, path: Path, *, task: Task, device: str = "auto") -> None:
        """Open an onnxruntime session.

        Raises:
            TeacherError: onnxruntime cannot open it, or it lacks an ``input_ids`` input / a rank-3 output.
        """
        import onnxruntime as ort

        from calibrate_teacher.teachers._onnx import _providers, ort_errors

        _check_task(task)
        self.path, self.task = path, task
        options = ort.SessionOptions()
        options.log_severity_level = 4
        try:
            self.session = ort.InferenceSession(str(path), options, providers=_providers(device, path))
        except ort_errors() as exc:
            raise TeacherError(f"{path}: onnxruntime cannot open it ({exc}); re-export the model") from exc
        names = [i.name for i in self.session.get_inputs()]
        if "input_ids" not in names:
            raise TeacherError(
                f"{path}: the graph has no input named input_ids (it has {', '.join(names)}); re-export it"
            )
        self.input_names = tuple(n for n in names if n in ("input_ids", "attention_mask"))
        outputs = [o for o in self.session.get_outputs() if len(o.shape) == 3]
        if not outputs:
            raise TeacherError(f"{path}: no output of rank 3 [batch, sequence, classes]; re-export it")
        self._output = outputs[0].name
        width = outputs[0].shape[-1]
        self.vocab_size: int | None = width if isinstance(width, int) else None
        provider = self.session.get_providers()[0]
        self.device = "cuda" if provider == "CUDAExecutionProvider" else "cpu"
        self._notes = [f"{path.name}: logits from output {self._output!r} on {provider}"]

    @property
    def notes(self) -> Sequence[str]:
        """One-line remarks for the user."""
        return tuple(self._notes)

    def logits(self, inputs: TokenInputs) -> torch.Tensor:
        """float32 logits ``[B, S, C]`` on the CPU.

        Raises:
            TeacherError: onnxruntime fails on the batch.
        """
        import torch

        from calibrate_teacher.teachers._onnx import ort_errors

        feed = {n: inputs[n].detach().cpu().to(torch.int64).numpy() for n in self.input_names if n in inputs}
        try:
            (out,) = self.session.run([self._output], feed)
        except ort_errors() as exc:
            raise TeacherError(f"{self.path}: onnxruntime failed on a batch ({exc})") from exc
        values = torch.from_numpy(out).float()
        if self.vocab_size is None:
            self.vocab_size = int(values.shape[-1])
        return values

    def final_hidden(self, inputs: TokenInputs) -> torch.Tensor:
        """Not available: an ONNX teacher gives logits only.

        Raises:
            TeacherError: always.
        """
        raise TeacherError(f"{self.path}: an ONNX teacher gives logits only")
