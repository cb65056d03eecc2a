"""The ``export_token_soft_labels`` job: run a sequence teacher over token data, write a token cache.

The token counterpart of ``_export.py``: ``out`` is claimed (checked, created, locked) before the
teacher loads; the teacher (a :class:`~calibrate_teacher.tokens.TokenTeacher`, a Hugging Face
directory, an ONNX token model or a module) runs over the data's batches in row order; each batch
row becomes one :class:`~calibrate_teacher.soft_labels.TokenSequence` (its real tokens, its scored
positions from :func:`~calibrate_teacher.tokens.scored_positions`, which owns the causal shift)
whose logits are recomputed from the final hidden states through the LM head chunk by chunk when
the teacher has a head that reproduces its logits (checked on the first batch), else taken from
the model's own ``[B, S, V]`` logits. The writer (``soft_labels/token_writer.py``) divides by T,
keeps the top k + the full-row log-sum-exp, and shards, resumes and refuses as the classification
cache does. Under torchrun every rank writes its own shards.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

from calibrate_teacher.errors import InputError, InvalidValueError
from calibrate_teacher.soft_labels._calibration import Calibration
from calibrate_teacher.soft_labels._format import CacheManifest
from calibrate_teacher.soft_labels._output import claim_output
from calibrate_teacher.soft_labels._state import normalise_source
from calibrate_teacher.soft_labels.token_writer import (
    DEFAULT_TOKEN_SHARD_ROWS,
    TokenSequence,
    compute_token_shard,
    plan_token_manifest,
)
from calibrate_teacher.soft_labels.writer import write_claimed

if TYPE_CHECKING:
    import torch

    from calibrate_teacher.tokens.teacher import TokenTeacher

__all__ = ["export_token_soft_labels", "token_sequences"]

PathLike = str | os.PathLike[str]
#: Logit rows recomputed from hidden states per chunk (bounds memory to chunk × V floats).
CHUNK_ROWS = 1024


def export_token_soft_labels(
    teacher: TokenTeacher | PathLike | object,
    data: object,
    out: PathLike,
    *,
    temperature: float | Calibration,
    top_k: int | None = None,
    shard_rows: int = DEFAULT_TOKEN_SHARD_ROWS,
    batch_size: int = 8,
    device: str = "auto",
    overwrite: bool = False,
    resume: bool = True,
    progress: Callable[[int, int], None] | None = None,
    notify: Callable[[str], None] | None = None,
) -> CacheManifest:
    """Run a sequence teacher over token data and write its calibrated token soft labels to ``out``.

    Args:
        teacher: A :class:`~calibrate_teacher.tokens.TokenTeacher`, a Hugging Face model
            directory, an ONNX token model, or an in-memory model (see ``load_token_teacher``).
        data: Token data that reads a subset of rows in order: a
            :class:`~calibrate_teacher.data.tokens.TokenTextSource` (``open_token_text``) or any
            object with ``len()`` and ``batches(batch_size=, indices=)`` yielding batches with
            ``inputs`` (``input_ids``, ``attention_mask``), unshifted ``labels`` (-100 where not
            scored), ``indices`` and ``keys``.
        out: The cache folder.
        temperature: T, or a :class:`Calibration` (e.g. from a token ``fit`` report).
        top_k: None: dense when V <= 1000, else the top 64; 0: dense; K: the top K.
        shard_rows: Sequences per shard.
        batch_size: Sequences per teacher batch (keep it fixed across resumes for identical bytes).
        device: For a teacher loaded from a path: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
        overwrite: Replace a complete cache at ``out``.
        resume: Continue an unfinished export into ``out`` (False: start over).
        progress: Called with (sequences just written, sequences this rank has to do).
        notify: Called with one line for the user (notes, "already complete").

    Returns:
        The complete manifest.

    Raises:
        OutputExistsError, CacheError, OutputError: as :func:`~calibrate_teacher.export_soft_labels`.
        InputError: data that cannot be read by row, or batches out of row order.
        TeacherError: the teacher fails to load or run.
        InvalidValueError: bad options.
    """
    from calibrate_teacher._device import resolve_device
    from calibrate_teacher._distributed import distributed_context, process_group, rank_device
    from calibrate_teacher.specs import DataSpec, TeacherSpec
    from calibrate_teacher.tokens.teacher import load_token_teacher

    if batch_size < 1:
        raise InvalidValueError(f"batch_size {batch_size}: must be at least 1")
    spec = teacher if isinstance(teacher, TeacherSpec) else None
    if spec is not None:  # the CLI's specs: the device and remote-code consent ride on them
        teacher, device = (spec.path if spec.path is not None else spec.source), spec.device
    data_spec = data if isinstance(data, DataSpec) else None
    if data_spec is None:
        _check_rows(data)
    calibration = temperature if isinstance(temperature, Calibration) else Calibration(temperature)
    dev = resolve_device(rank_device(device, distributed_context()))
    with process_group(dev) as context, claim_output(out, context=context) as claim:
        model = load_token_teacher(teacher, device=dev, trust_remote_code=spec.trust_remote_code if spec else False)
        if data_spec is not None:
            data = data_spec.open_tokens(model, trust_remote_code=spec.trust_remote_code if spec else False)
            _check_rows(data)
        batches = data.batches  # type: ignore[attr-defined]
        notes: list[str] = list(model.notes)
        use_head = model.head is not None and model.task == "causal-lm"
        vocab = model.head.vocab_size if model.head is not None else model.vocab_size
        if vocab is None:  # an in-memory module: run it once on the first batch to learn V
            first = next(iter(batches(batch_size=1, indices=[0])))
            vocab = int(model.logits(first.inputs).shape[-1])
        description = getattr(data, "description", None)
        described = dict(description) if isinstance(description, dict) else {"kind": type(data).__name__}
        manifest = plan_token_manifest(
            num_sequences=len(data),  # type: ignore[arg-type]  # _check_rows: it has a length
            vocab_size=int(vocab),
            temperature=calibration,
            teacher=_teacher_block(model, teacher),
            data=cast("dict[str, object]", normalise_source(described)),
            top_k=top_k,
            shard_rows=shard_rows,
        )
        checked: list[bool] = []

        def produce(rows: Sequence[int]) -> Iterator[TokenSequence]:
            nonlocal use_head
            sequences = token_sequences(model, data, rows, batch_size=batch_size, use_head=use_head, checked=checked)
            for sequence, head_ok in sequences:
                if head_ok is False and use_head:
                    use_head = False
                    notes.append("the LM head did not reproduce the model's logits; used the model's own logits")
                yield sequence

        for line in notes:
            if notify is not None and context.is_main:
                notify(line)
        return write_claimed(
            produce, claim, manifest, overwrite=overwrite, resume=resume, progress=progress, notify=notify,
            shard_computer=compute_token_shard,
        )


@dataclass(frozen=True)
class _Sequence:
    """One batch row as a :class:`~calibrate_teacher.soft_labels.TokenSequence`."""

    key: str
    input_ids: torch.Tensor
    positions: torch.Tensor
    labels: torch.Tensor
    features: torch.Tensor  # [n, H] hidden states (with a head) or [n, V] logits
    head: Callable[[torch.Tensor], torch.Tensor] | None

    def logits(self) -> Iterator[torch.Tensor]:
        if self.head is None:
            yield self.features
            return
        for a in range(0, int(self.features.shape[0]), CHUNK_ROWS):
            yield self.head(self.features[a : a + CHUNK_ROWS])


def token_sequences(
    teacher: TokenTeacher,
    data: object,
    rows: Sequence[int],
    *,
    batch_size: int,
    use_head: bool,
    checked: list[bool] | None = None,
) -> Iterator[tuple[TokenSequence, bool | None]]:
    """The adapter from a :class:`TokenTeacher` and token batches to the writer's sequences.

    Yields each requested row, in order, with whether the LM head was checked good on this call's
    first batch (None when not checked). Each row's real tokens are its ``attention_mask = 1``
    run (right or left padding); positions are relative to it.

    Raises:
        InputError: a batch's rows are not the requested rows in order.
    """
    import torch

    from calibrate_teacher.tokens._collect import _head_matches, batch_parts
    from calibrate_teacher.tokens._positions import scored_positions

    wanted = list(rows)
    done = 0
    batches = data.batches(batch_size=batch_size, indices=wanted)  # type: ignore[attr-defined]
    for batch in batches:
        inputs, labels = batch_parts(batch)
        indices = [int(i) for i in getattr(batch, "indices", torch.arange(done, done + labels.shape[0])).tolist()]
        if indices != wanted[done : done + len(indices)]:
            raise InputError(
                f"token data: the batches came in another order ({indices[:3]}... for rows "
                f"{wanted[done:done + 3]}...); "
                "open the data without sort_by_length for an export"
            )
        mask = inputs.get("attention_mask")
        scored = scored_positions(mask, labels, task=teacher.task)
        head_ok: bool | None = None
        head = teacher.head if use_head else None
        if head is not None:
            hidden = teacher.final_hidden(inputs)
            if checked is not None and not checked:
                ok, _err = _head_matches(teacher, inputs, hidden)
                checked.append(ok)
                head_ok = ok
                if not ok:
                    head = None
            elif checked and not checked[0]:
                head = None
        features = hidden if head is not None else teacher.logits(inputs)
        keys = tuple(getattr(batch, "keys", ())) or tuple(str(i) for i in indices)
        ids_all = inputs["input_ids"].cpu()
        for b in range(int(labels.shape[0])):
            attend = mask[b].cpu() != 0 if mask is not None else torch.ones(ids_all.shape[1], dtype=torch.bool)
            real = torch.nonzero(attend).reshape(-1)
            start = int(real[0]) if real.numel() else 0
            if real.numel() and int(real[-1]) - start + 1 != real.numel():
                raise InputError(f"token data: row {indices[b]} has gaps in its attention_mask; pad on one side only")
            row_mask = scored.mask[b].cpu()
            positions = torch.nonzero(row_mask).reshape(-1)
            feats = features[b][row_mask.to(features.device)]
            yield (
                _Sequence(
                    key=keys[b],
                    input_ids=ids_all[b, start : start + real.numel()],
                    positions=positions - start,
                    labels=scored.targets[b].cpu()[row_mask],
                    features=feats,
                    head=head.logits if head is not None else None,
                ),
                head_ok if b == 0 else None,
            )
        done += len(indices)


def _teacher_block(model: TokenTeacher, source: object) -> dict[str, object]:
    """What the manifest records: the teacher's name, fingerprint, format and task."""
    path = Path(model.path)
    return {"file": path.name, "sha256": _fingerprint(model, source), "format": model.format, "task": model.task}


def _fingerprint(model: TokenTeacher, source: object) -> str:
    """SHA-256 of the model file, of a directory's config and weight files, or of a module's state dict."""
    from calibrate_teacher._io import sha256_file

    path = Path(model.path)
    if isinstance(source, str | os.PathLike) and path.is_file():
        return sha256_file(path)
    if isinstance(source, str | os.PathLike) and path.is_dir():
        digest = hashlib.sha256()
        for file in sorted(path.iterdir()):
            if file.is_file() and (file.suffix in (".safetensors", ".bin", ".onnx") or file.name == "config.json"):
                digest.update(f"{file.name}:{sha256_file(file)};".encode())
        return digest.hexdigest()
    import torch

    module = getattr(model, "module", None) or getattr(model, "model", None) or source
    state = getattr(module, "state_dict", None)
    if not callable(state):
        raise InvalidValueError(
            f"teacher {type(source).__name__}: a token cache records its teacher's fingerprint; pass a model "
            "directory, an ONNX file or a torch.nn.Module"
        )
    digest = hashlib.sha256()
    for key, tensor in sorted(state().items()):
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{key}:{value.dtype}:{tuple(value.shape)};".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _check_rows(data: object) -> None:
    """Refuse data that cannot be re-read by row position (a resumable export needs that)."""
    if not callable(getattr(data, "batches", None)) or not hasattr(data, "__len__"):
        raise InputError(
            f"data: {type(data).__name__} cannot be read by row; open the file with "
            "calibrate_teacher.data.tokens.open_token_text (a resumable export re-reads rows by position)"
        )
