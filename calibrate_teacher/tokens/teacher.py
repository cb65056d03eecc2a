"""Sequence teachers: models that give logits ``[B, S, V]`` for batches of token ids.

One protocol, :class:`TokenTeacher`, and three loaders: Hugging Face ``AutoModelForCausalLM`` /
``AutoModelForTokenClassification`` directories (or such a model in memory), ONNX token models
(``input_ids`` + ``attention_mask`` -> ``[B, S, C]``) and any in-memory module returning
``[B, S, V]`` logits (or a ModelOutput with ``.logits``).

A Hugging Face causal LM also exposes its **head** (:class:`LmHead`: the ``lm_head`` weight and
bias, a Cohere-style ``logit_scale``, Granite's ``logits_scaling``, Gemma-2/3's final-logit
soft-capping) and its final hidden states (after the final norm), so the fit can recompute the
logits chunk by chunk from stored hidden states instead of ever holding ``[tokens, V]``. The job
checks on the first batch that the head reproduces ``model(**batch).logits`` and falls back to
the model's own logits, with a note, when it does not.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

from calibrate_teacher._device import check_device, resolve_device
from calibrate_teacher.errors import InputError, InvalidValueError, TeacherError
from calibrate_teacher.tokens._positions import TASKS, Task

if TYPE_CHECKING:
    import torch

TokenFormat = Literal["huggingface", "onnx", "module"]
TokenInputs = Mapping[str, "torch.Tensor"]
_INPUT_NAMES = ("input_ids", "attention_mask")


@dataclass(frozen=True)
class LmHead:
    """A causal LM's output layer: ``z = cap * tanh(scale * (h @ W.T + b) / cap)`` as the model computes it.

    Attributes:
        weight: ``[V, H]`` (the model's dtype and device; tied embeddings stay shared).
        bias: ``[V]`` or None.
        scale: Multiplies the logits (Cohere's ``logit_scale``, 1 / Granite's ``logits_scaling``); None: 1.
        softcap: Gemma-2/3's ``final_logit_softcapping``; None: none.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    scale: float | None = None
    softcap: float | None = None

    @property
    def vocab_size(self) -> int:
        """``V``, the number of rows of the weight."""
        return int(self.weight.shape[0])

    def logits(self, hidden: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 logits ``[n, V]`` of final hidden states ``[n, H]`` (computed in the head's dtype).

        ``out`` (float32 ``[n, V]``, used only for a float32 head) receives them in place, so a
        pass reuses one buffer instead of allocating a chunk per step.
        """
        import torch

        h = hidden.to(device=self.weight.device, dtype=self.weight.dtype)
        if out is not None and self.weight.dtype == torch.float32:
            z = torch.matmul(h, self.weight.T, out=out)
            if self.bias is not None:
                z.add_(self.bias)
        else:
            z = torch.nn.functional.linear(h, self.weight, self.bias)
        if self.scale is not None:
            z.mul_(self.scale)
        if self.softcap is not None:
            z.div_(self.softcap).tanh_().mul_(self.softcap)
        return z.float()


@runtime_checkable
class TokenTeacher(Protocol):
    """A loaded sequence teacher.

    Attributes:
        path: Where it was loaded from (in memory: a label such as ``<LlamaForCausalLM>``).
        format: ``huggingface``, ``onnx`` or ``module``.
        task: ``causal-lm`` (position t predicts token t + 1) or ``token-classification``.
        vocab_size: ``V`` (or ``C`` classes); None until a module has run once.
        class_names: Label names in order (``id2label``), where known.
        device: Where it runs.
        input_names: The batch entries it is given (``input_ids``, ``attention_mask``).
        head: The LM head for recomputing logits from hidden states; None where not available.
    """

    path: Path
    format: TokenFormat
    task: Task
    vocab_size: int | None
    class_names: tuple[str, ...] | None
    device: str
    input_names: tuple[str, ...]
    head: LmHead | None

    @property
    def notes(self) -> Sequence[str]:
        """One-line remarks for the user."""
        ...

    def logits(self, inputs: TokenInputs) -> torch.Tensor:
        """Float logits ``[B, S, V]`` for a batch (no autograd)."""
        ...

    def final_hidden(self, inputs: TokenInputs) -> torch.Tensor:
        """The final hidden states ``[B, S, H]`` (after the final norm) that :attr:`head` maps to logits."""
        ...


def _pick(out: object, where: Path) -> torch.Tensor:
    import torch

    if isinstance(out, torch.Tensor):
        values = out
    elif isinstance(out, Mapping) and "logits" in out:
        values = out["logits"]
    elif isinstance(getattr(out, "logits", None), torch.Tensor):
        values = out.logits  # type: ignore[attr-defined]
    elif isinstance(out, tuple | list) and out and isinstance(out[0], torch.Tensor):
        values = out[0]
    else:
        raise TeacherError(f"{where}: returned {type(out).__name__}; return [B, S, V] logits or an output with .logits")
    if values.ndim != 3 or not values.is_floating_point():
        raise TeacherError(
            f"{where}: returned {values.dtype} of shape {tuple(values.shape)}; a sequence teacher returns "
            "float logits [batch, sequence, vocabulary]"
        )
    return values.float()


class ModuleTokenTeacher:
    """A :class:`TokenTeacher` over an in-memory module or callable (never moved, left in its mode)."""

    format: TokenFormat = "module"
    head: LmHead | None = None
    class_names: tuple[str, ...] | None = None

    def __init__(self, model: Callable[..., object], *, task: Task, name: str | None = None) -> None:
        """Adapt ``model``, called as ``model(input_ids=..., attention_mask=...)``.

        Raises:
            InvalidValueError: ``model`` is not callable or ``task`` is unknown.
        """
        from calibrate_teacher.teachers._memory import label_of, module_of, placement

        if not callable(model):
            raise InvalidValueError(f"teacher: {type(model).__name__} is not callable; pass an nn.Module")
        _check_task(task)
        self.model = model
        self.module = module_of(model)
        self.task: Task = task
        self.path = Path(name) if name else label_of(self.module or model)
        self.device, _ = placement(self.module)
        self.input_names: tuple[str, ...] = _INPUT_NAMES
        self.vocab_size: int | None = None
        self._notes: list[str] = []

    @property
    def notes(self) -> Sequence[str]:
        """One-line remarks for the user."""
        return tuple(self._notes)

    def _call(self, fn: Callable[..., object], inputs: TokenInputs) -> object:
        import torch

        from calibrate_teacher.teachers._memory import eval_mode

        moved = {k: v.to(self.device) for k, v in inputs.items() if k in self.input_names}
        with eval_mode(self.module), torch.no_grad():
            return fn(**moved)

    def logits(self, inputs: TokenInputs) -> torch.Tensor:
        """Float logits ``[B, S, V]``; the first batch fixes :attr:`vocab_size`."""
        values = _pick(self._call(self.model, inputs), self.path)
        if self.vocab_size is None:
            self.vocab_size = int(values.shape[-1])
        return values

    def final_hidden(self, inputs: TokenInputs) -> torch.Tensor:
        """Not available for a plain module (its :attr:`head` is None).

        Raises:
            TeacherError: always.
        """
        raise TeacherError(f"{self.path}: no LM head known; its logits are used as they are")


class HfTokenTeacher(ModuleTokenTeacher):
    """A Hugging Face ``...ForCausalLM`` / ``...ForTokenClassification`` model (a directory or in memory)."""

    format: TokenFormat = "huggingface"

    def __init__(
        self, model: torch.nn.Module, *, task: Task, path: Path | None = None, notes: Sequence[str] = ()
    ) -> None:
        """Adapt a loaded transformers model; read its head for a causal LM."""
        super().__init__(model, task=task, name=str(path) if path is not None else None)
        config = getattr(model, "config", None)
        self._notes.extend(notes)
        if task == "token-classification":
            labels = getattr(config, "id2label", None) or {}
            self.vocab_size = int(getattr(config, "num_labels", 0) or len(labels)) or None
            if labels and self.vocab_size == len(labels):
                self.class_names = tuple(str(labels[i]) for i in sorted(labels))
        else:
            self.head = _read_head(model)
            self.vocab_size = self.head.vocab_size if self.head is not None else None

    def final_hidden(self, inputs: TokenInputs) -> torch.Tensor:
        """The base model's ``last_hidden_state`` ``[B, S, H]`` (after the final norm).

        Raises:
            TeacherError: the model has no separate base model.
        """
        base = getattr(self.model, "base_model", None)
        if base is None or base is self.model:
            raise TeacherError(f"{self.path}: no base model to take hidden states from")
        out = self._call(base, {**inputs})
        hidden = getattr(out, "last_hidden_state", None)
        if hidden is None and isinstance(out, tuple):
            hidden = out[0]
        if hidden is None:
            raise TeacherError(f"{self.path}: its base model returned no last_hidden_state")
        return hidden  # type: ignore[no-any-return]


def _read_head(model: torch.nn.Module) -> LmHead | None:
    """The LM head of a transformers causal LM, or None where it is not a plain Linear."""
    import torch

    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if not isinstance(head, torch.nn.Linear):
        return None
    config = getattr(model, "config", None)
    scale = getattr(config, "logit_scale", None)  # Cohere: logits * logit_scale
    divide = getattr(config, "logits_scaling", None)  # Granite: logits / logits_scaling
    if isinstance(divide, int | float) and divide != 1:
        scale = (float(scale) if isinstance(scale, int | float) else 1.0) / float(divide)
    cap = getattr(config, "final_logit_softcapping", None)
    return LmHead(
        weight=head.weight.detach(),
        bias=None if head.bias is None else head.bias.detach(),
        scale=float(scale) if isinstance(scale, int | float) and scale != 1 else None,
        softcap=float(cap) if isinstance(cap, int | float) and cap else None,
    )


def _check_task(task: object) -> None:
    if task not in TASKS:
        raise InvalidValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")


def _task_of(config: Mapping[str, object], path: Path, task: Task | None) -> Task:
    """The task a Hugging Face config's ``architectures`` names (or the one asked for)."""
    if task is not None:
        _check_task(task)
        return task
    names = config.get("architectures") or []
    arch = " ".join(map(str, names)) if isinstance(names, list) else str(names)
    if "ForCausalLM" in arch or "LMHeadModel" in arch:
        return "causal-lm"
    if "ForTokenClassification" in arch:
        return "token-classification"
    raise InputError(
        f"{path}: config.json architectures {arch or 'none'} name neither a causal LM nor a token "
        "classifier; pass task='causal-lm' or task='token-classification'"
    )


def open_hf_model(
    path: Path, *, auto_class: str, trust_remote_code: bool, device: str
) -> tuple[torch.nn.Module, list[str]]:
    """Load a local Hugging Face directory through ``teachers._hf.open_pretrained`` when present.

    Until that loader exists, this is transformers' own ``from_pretrained`` with
    ``local_files_only=True``, in eval mode, on ``device``.
    """
    import importlib

    _hf: ModuleType | None
    try:  # H-hf's loader (safety checks + from_pretrained), once it exists
        _hf = importlib.import_module("calibrate_teacher.teachers._hf")
    except ImportError:
        _hf = None
    if _hf is not None and hasattr(_hf, "open_pretrained"):
        model, notes = _hf.open_pretrained(
            path, auto_class=auto_class, trust_remote_code=trust_remote_code, device=device
        )
        return model, list(notes)
    import transformers

    loader = getattr(transformers, auto_class)
    try:
        model = loader.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise TeacherError(f"{path}: transformers could not load it ({exc}); is it a saved model directory?") from exc
    model.eval()
    model.to(resolve_device(device))
    return model, []


def load_token_teacher(
    teacher: TokenTeacher | str | Path | object,
    *,
    task: Task | None = None,
    device: str = "auto",
    trust_remote_code: bool = False,
) -> TokenTeacher:
    """Open a sequence teacher: a Hugging Face directory, an ``.onnx`` file, or an in-memory model.

    Args:
        teacher: A :class:`TokenTeacher` (returned as is), a directory with ``config.json``, an
            ``.onnx`` file, a transformers model, or an ``nn.Module`` returning ``[B, S, V]``.
        task: ``causal-lm`` or ``token-classification``; read from ``config.json`` where not
            given, and required for ONNX files and plain modules.
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N`` (files only; a
            module stays where it is).
        trust_remote_code: Allow a directory's own modelling code (off by default).

    Returns:
        The teacher.

    Raises:
        InputError: a path that is neither a model directory nor an ONNX file, or no task.
        TeacherError: the model cannot be loaded.
    """
    check_device(device)
    if isinstance(teacher, TokenTeacher):
        return teacher
    if isinstance(teacher, str | Path):
        path = Path(teacher)
        if path.is_dir() and (path / "config.json").is_file():
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
            chosen = _task_of(config, path, task)
            auto = "AutoModelForCausalLM" if chosen == "causal-lm" else "AutoModelForTokenClassification"
            model, notes = open_hf_model(path, auto_class=auto, trust_remote_code=trust_remote_code, device=device)
            return HfTokenTeacher(model, task=chosen, path=path, notes=notes)
        if path.suffix == ".onnx" and path.is_file():
            from calibrate_teacher.tokens._onnx import OnnxTokenTeacher

            if task is None:
                raise InputError(
                    f"{path}: an ONNX file does not say its task; pass task='causal-lm' or 'token-classification'"
                )
            return OnnxTokenTeacher(path, task=task, device=device)
        raise InputError(
            f"{path}: not a Hugging Face model directory (with config.json) or an .onnx file; pass one of those"
        )
    config = getattr(teacher, "config", None)
    if config is not None and hasattr(teacher, "base_model") and hasattr(config, "to_dict"):
        described = {**config.to_dict(), "architectures": [type(teacher).__name__]}
        chosen = _task_of(described, Path(f"<{type(teacher).__name__}>"), task)
        return HfTokenTeacher(teacher, task=chosen)  # type: ignore[arg-type]
    if task is None:
        raise InputError(
            f"teacher: {type(teacher).__name__} does not say its task; pass task='causal-lm' or "
            "'token-classification'"
        )
    return ModuleTokenTeacher(teacher, task=task)  # type: ignore[arg-type]
