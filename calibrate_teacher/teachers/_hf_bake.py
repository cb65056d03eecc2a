"""Bake a temperature into a Hugging Face model directory, writing a directory.

The model is loaded with :func:`~calibrate_teacher.teachers._hf.open_pretrained` (the same safety
checks as a teacher), 1/T is folded into its weights, and the result is written with
``save_pretrained`` (safetensors) into a staging folder beside the target:

* **Classifiers** (sequence, image, token classification): 1/T goes into the classifier's
  Linear (weight and bias): ``classifier`` for BERT, DistilBERT and ViT,
  ``classifier.out_proj`` for RoBERTa; for any other architecture (or ``head=``), the last
  Linear whose fold a probe proves exact (the candidates from the last one to the first, a
  weight shared with another parameter skipped). The proof: the folded model's logits on the
  probe batch equal the original's / T within the bake tolerance.
* **Causal LMs**: :func:`_fold_causal_lm`, the one hook, hands the model to
  ``teachers/_lm_head.py``'s ``fold_lm_temperature`` (untied ``lm_head``, or the final norm of
  a tied one), or refuses when that module is absent.

Into the staging folder also go: every other file of the source directory (tokenizer files,
``preprocessor_config.json``, README, remote-code modules...; weights, pickles and hidden
entries are not carried, and a note says which), ``calibration.json`` (T, the head, the check's
numbers, the source) and the ``config.json`` key ``calibrate_teacher_temperature``. Then the
staged directory is loaded back with ``from_pretrained`` and run on the probe batch (the real
validation inputs the bake job passes; random token ids or pixels otherwise, with a note):
only when ``max |baked - original / T|`` is within ``1e-5 * max(1, max |original / T|)``
(float32; 1e-2 float16, 5e-2 bfloat16) is it renamed into place, replacing an existing
directory only with ``overwrite``. On any failure nothing is left behind.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from calibrate_teacher._io import atomic_output, check_output, default_file_mode
from calibrate_teacher.errors import BakeError, InvalidValueError
from calibrate_teacher.teachers._files import PROBE_TOLERANCES
from calibrate_teacher.teachers._hf import (
    auto_class_for,
    check_directory,
    open_pretrained,
    quiet_transformers,
    resolve_inside,
)

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

    from calibrate_teacher.teachers.base import Inputs

__all__ = ["CONFIG_KEY", "RECORD_NAME", "DirectoryBake", "bake_directory"]

#: The JSON record written into a baked directory.
RECORD_NAME = "calibration.json"
#: The ``config.json`` key holding the temperature baked in.
CONFIG_KEY = "calibrate_teacher_temperature"
#: The classifier Linear of architectures whose head is known (others: proven by the probe).
KNOWN_HEADS = {"bert": "classifier", "distilbert": "classifier", "vit": "classifier", "roberta": "classifier.out_proj"}
PROBE_ROWS = 4
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "pixel_values")


@dataclass(frozen=True)
class DirectoryBake:
    """What :func:`bake_directory` wrote and how well the baked model matched ``original / T``.

    Attributes:
        path: The baked directory.
        head: Where T went (a Linear's name, or what the LM fold changed).
        max_abs_error: ``max |baked - original / T|`` over the probe batch.
        tolerance: The bound it had to stay within.
        probe_shape: The shape of the probe batch's main input.
        probe_inputs: The names of the probe's inputs.
        extra_files: Files carried over from the source directory (in the baked directory).
        notes: Remarks for stderr (what was loaded, folded, not carried).
    """

    path: Path
    head: str
    max_abs_error: float
    tolerance: float
    probe_shape: tuple[int, ...]
    probe_inputs: tuple[str, ...]
    extra_files: tuple[Path, ...]
    notes: tuple[str, ...]


def bake_directory(
    source: Path,
    temperature: float,
    target: Path,
    *,
    overwrite: bool = False,
    device: str = "auto",
    head: str | None = None,
    probe: Inputs | None = None,
    preprocess: Mapping[str, object] | None = None,
    classes: Sequence[str] | None = None,
    trust_remote_code: bool = False,
) -> DirectoryBake:
    """Write a copy of the model directory whose logits are divided by ``temperature``, verified.

    Args:
        source: The model directory.
        temperature: T, already validated (finite and > 0).
        target: The baked directory.
        overwrite: Replace an existing ``target``.
        device: Where the probe runs.
        head: The Linear to fold T into (classifiers); default: the known head, else the last
            Linear the probe proves.
        probe: The inputs the check runs on (a mapping of named tensors, or one tensor);
            default: random ids / pixels, with a note.
        preprocess: Preprocessing keys to carry as ``preprocess.json`` in the baked directory.
        classes: Class names to record as ``id2label`` (one per output).
        trust_remote_code: Allow the directory's ``auto_map`` code.

    Returns:
        A :class:`DirectoryBake`.

    Raises:
        InvalidValueError: ``target`` is the source or inside it; ``classes`` of the wrong length.
        OutputExistsError: ``target`` exists and ``overwrite`` is false.
        BakeError: no head folds exactly, a causal LM with no LM fold available, or the
            reloaded directory fails the probe check (nothing is written).
    """
    import torch

    real_source, real_target = source.resolve(), target.resolve()
    if real_target == real_source or real_target.is_relative_to(real_source):
        raise InvalidValueError(f"{target}: is {source} or inside it; write the baked directory elsewhere")
    check_output(target, overwrite=overwrite, directory=True)
    layout = check_directory(source, trust_remote_code=trust_remote_code)
    auto, task = auto_class_for(layout.config, where=source)
    model, notes = open_pretrained(source, auto_class=auto, trust_remote_code=trust_remote_code, device=device)
    batch = _probe_batch(model, probe, source, notes)
    original = _forward(model, batch).double()
    expected = original / temperature
    precision = str(original_dtype(model)).removeprefix("torch.")
    relative = PROBE_TOLERANCES.get(precision, PROBE_TOLERANCES["float16"])
    tolerance = relative * max(1.0, float(expected.abs().max()))
    if task == "causal_lm":
        if head is not None:
            raise InvalidValueError(f"--head {head!r}: a causal LM's fold is chosen for it; drop --head")
        folded = _fold_causal_lm(model, temperature, where=source)
        notes.extend(folded)
        where = "; ".join(folded) or "lm_head"
    else:
        where = _fold_classifier(model, temperature, head, batch, expected, tolerance, source)
        notes.append(f"{source.name}: 1/T folded into {where}")
    _record_in_config(model, temperature, classes, source)
    mode = source.stat().st_mode & 0o777
    with atomic_output(target, overwrite=overwrite, directory=True) as staging:
        with quiet_transformers(), torch.no_grad():
            model.save_pretrained(staging)
        carried, skipped = _carry_files(source, staging, layout.roots)
        if skipped:
            notes.append(f"{source.name}: not carried into the baked directory: {', '.join(skipped)}")
        if preprocess:
            (staging / "preprocess.json").write_text(json.dumps(dict(preprocess), indent=2) + "\n", encoding="utf-8")
            if staging / "preprocess.json" not in carried:
                carried.append(staging / "preprocess.json")
        baked, _ = open_pretrained(staging, auto_class=auto, trust_remote_code=trust_remote_code, device=device)
        got = _forward(baked, batch).double()
        error = float((got.cpu() - expected.cpu()).abs().max()) if got.shape == expected.shape else math.inf
        if not math.isfinite(error) or error > tolerance:
            raise BakeError(
                f"{source}: the baked directory (head {where}) does not give original / T on the probe "
                f"batch: max |baked - original/T| = {error:.3g} > {tolerance:.3g}; nothing was written"
            )
        record = {
            "temperature": temperature,
            "head": where,
            "source": str(source),
            "max_abs_error": error,
            "tolerance": tolerance,
            "probe_shape": list(_shape(batch)),
        }
        (staging / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        os.chmod(staging, (default_file_mode() | 0o111) & 0o777 & (mode | 0o700))
    return DirectoryBake(
        path=target,
        head=where,
        max_abs_error=error,
        tolerance=tolerance,
        probe_shape=_shape(batch),
        probe_inputs=tuple(batch),
        extra_files=tuple(target / p.relative_to(staging) for p in carried),
        notes=tuple(notes),
    )


def _fold_causal_lm(model: PreTrainedModel, temperature: float, *, where: Path) -> list[str]:
    """The one hook for causal LMs: ``teachers/_lm_head.py``'s ``fold_lm_temperature``, if present."""
    try:
        from calibrate_teacher.teachers._lm_head import fold_lm_temperature
    except ImportError as exc:
        raise BakeError(
            f"{where}: baking a causal LM needs the LM head fold (teachers/_lm_head.py), which this "
            "installation lacks; bake a classifier, or upgrade calibrate-teacher"
        ) from exc
    return list(fold_lm_temperature(model, temperature))


def original_dtype(model: torch.nn.Module) -> torch.dtype:
    """The model's floating dtype (its first floating parameter's)."""
    import torch

    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _inputs_of(model: PreTrainedModel) -> tuple[str, ...]:
    params = inspect.signature(model.forward).parameters
    return tuple(n for n in _INPUTS if n in params)


def _probe_batch(
    model: PreTrainedModel, probe: Inputs | None, source: Path, notes: list[str]
) -> dict[str, torch.Tensor]:
    """The probe as keyword inputs of the forward (a tensor feeds its main input)."""
    import torch

    from calibrate_teacher.teachers._hf_teacher import probe_inputs

    names = _inputs_of(model)
    if probe is None:
        notes.append(
            f"{source.name}: no probe batch given: checked on {PROBE_ROWS} random inputs; pass real "
            "validation inputs (probe=) for a check on the data"
        )
        return probe_inputs(model, names, PROBE_ROWS)
    if isinstance(probe, torch.Tensor):
        main = "pixel_values" if "pixel_values" in names else "input_ids"
        return {main: probe}
    batch = {k: v for k, v in probe.items() if k in names}
    if not batch:
        raise InvalidValueError(
            f"{source}: the probe batch holds {', '.join(map(str, probe)) or 'nothing'}, none of the "
            f"model's inputs ({', '.join(names)})"
        )
    return batch


def _forward(model: PreTrainedModel, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    import torch

    device = next(model.parameters()).device
    dtype = original_dtype(model)
    moved = {k: v.to(device=device, dtype=dtype if k == "pixel_values" else torch.long) for k, v in batch.items()}
    with torch.inference_mode():
        logits = model(**moved).logits
    if not isinstance(logits, torch.Tensor):
        raise BakeError(f"{type(model).__name__}: returns no logits tensor")
    return logits


def _shape(batch: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
    main = batch.get("input_ids", batch.get("pixel_values"))
    if main is None:
        main = next(iter(batch.values()))
    return tuple(int(d) for d in main.shape)


def _candidates(model: PreTrainedModel, head: str | None) -> Iterator[tuple[str, torch.nn.Linear]]:
    """Linear layers to try, in order: ``head``; else the known head, then the others last first."""
    import torch

    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    if head is not None:
        if head not in linears:
            raise InvalidValueError(
                f"--head {head!r}: no nn.Linear of that name in {type(model).__name__}; Linears: "
                f"{', '.join(list(linears)[-5:])}..."
            )
        yield head, linears[head]
        return
    known = KNOWN_HEADS.get(str(getattr(model.config, "model_type", "")))
    if known is not None and known in linears:
        yield known, linears[known]
    for name in reversed(list(linears)):
        if name != known:
            yield name, linears[name]


def _fold_classifier(
    model: PreTrainedModel,
    temperature: float,
    head: str | None,
    batch: Mapping[str, torch.Tensor],
    expected: torch.Tensor,
    tolerance: float,
    source: Path,
) -> str:
    """Fold 1/T into the first candidate Linear the probe proves; return its name."""
    import torch

    shared = _shared_weights(model)
    tried: list[str] = []
    for name, linear in _candidates(model, head):
        if linear.weight.data_ptr() in shared:
            tried.append(f"{name} (tied)")
            continue
        saved = [p.detach().clone() for p in (linear.weight, linear.bias) if p is not None]
        with torch.no_grad():
            for p in (linear.weight, linear.bias):
                if p is not None:
                    p.copy_((p.double() / temperature).to(p.dtype))
        got = _forward(model, batch).double()
        if got.shape == expected.shape and float((got - expected).abs().max()) <= tolerance:
            return name
        with torch.no_grad():  # not exact: put the weights back and try the next one
            for p, old in zip((q for q in (linear.weight, linear.bias) if q is not None), saved, strict=True):
                p.copy_(old)
        tried.append(name)
        if len(tried) >= 8:
            break
    raise BakeError(
        f"{source}: no Linear layer folds 1/T exactly (tried {', '.join(tried) or 'none'}); "
        "name the classifier with --head"
    )


def _shared_weights(model: PreTrainedModel) -> set[int]:
    """Data pointers of parameters that appear under more than one name (tied weights)."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[p.data_ptr()] = seen.get(p.data_ptr(), 0) + 1
    return {ptr for ptr, count in seen.items() if count > 1}


def _record_in_config(model: PreTrainedModel, temperature: float, classes: Sequence[str] | None, source: Path) -> None:
    config = model.config
    setattr(config, CONFIG_KEY, temperature)
    if classes is None:
        return
    names = [str(c) for c in classes]
    if len(names) != int(config.num_labels or 0):
        raise InvalidValueError(
            f"classes: {len(names)} names for {source}, whose model has {config.num_labels} outputs"
        )
    config.id2label = dict(enumerate(names))
    config.label2id = {n: i for i, n in enumerate(names)}


def _carry_files(source: Path, staging: Path, roots: tuple[Path, ...]) -> tuple[list[Path], list[str]]:
    """Copy the source's other files into ``staging``: (those copied, those left out)."""
    carried: list[Path] = []
    skipped: list[str] = []
    for entry in sorted(source.iterdir()):
        name = entry.name
        if name.startswith(".") or name == RECORD_NAME:
            if name != RECORD_NAME:
                skipped.append(name)
            continue
        if name in _WEIGHT_INDEXES or (entry.is_file() and name.lower().endswith(_WEIGHT_SUFFIXES)):
            if not _is_source_weights(name):
                skipped.append(name)
            continue
        dest = staging / name
        if dest.exists():
            continue  # written by save_pretrained (config.json, generation_config.json, code)
        resolve_inside(entry, roots, source.resolve())
        if entry.is_dir():
            for sub in entry.rglob("*"):
                resolve_inside(sub, roots, source.resolve())
            shutil.copytree(entry, dest, symlinks=False)
            carried.extend(p for p in dest.rglob("*") if p.is_file())
        elif entry.is_file():
            shutil.copy2(entry, dest)
            carried.append(dest)
    return carried, skipped


def _is_source_weights(name: str) -> bool:
    """The model's own weight files (rewritten by save_pretrained), as opposed to other blobs."""
    stem = name.split(".", 1)[0]
    return name in _WEIGHT_INDEXES or stem == "model" or stem.startswith(("model-", "pytorch_model"))
