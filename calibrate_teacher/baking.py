"""Bake a temperature into a teacher: same format in and out, outputs become logits / T.

Per format (details in each backend's docstring):

* ONNX: a ``Div`` by T on the logits tensor, before any final softmax; input/output names, opset,
  IR version and dynamic axes are unchanged; external weights are never loaded, but copied (one
  ``<out>.data`` file) since onnx's checker refuses links; fp16 models divide in fp16.
* TorchScript: a scripted ``TemperatureScaled`` wrapper around the original module.
* safetensors / ``.pt`` state dict + ``--arch``: 1/T folded into the final ``nn.Linear`` (weight
  and bias), keys, shapes and dtypes unchanged; safetensors metadata records T and the head.
* Hugging Face model directory: a directory (``<name>-calibrated``), 1/T folded into the
  classifier (or, for causal LMs, the LM head / final norm), written with ``save_pretrained``,
  the other files carried, T in ``calibration.json`` and ``config.json``; reloaded with
  ``from_pretrained`` for the probe check (see ``teachers/_hf_bake.py``).
* torch.export: ``aten.div`` inserted after the logits node, re-exported with the same batch
  dimension (a dynamic batch stays dynamic, a static one static).

Every bake is written into a staging folder beside the output, loaded back, and run on a probe
batch next to the original (a multi-input teacher's probe is named inputs, ideally the real
validation batch: ``probe=``; the baked ONNX keeps every input name, the baked TorchScript and
``.pt2`` every parameter name): ``max |baked - original / T|`` must stay within the tolerance
(``1e-5 * max(1, max |original / T|)`` for float32/float64 models, ``1e-2 *`` that for
float16 and ``5e-2 *`` for bfloat16), and for a softmax-terminated model so must the
probabilities. Only then are the files renamed into place (companion files first, the model
last); on any failure nothing is left behind.

The baked teacher carries what the original was measured with, so evaluating it needs nothing
the original did not: the preprocessing the original's files give (its sidecar, timm
``config.json``, Hugging Face ``preprocessor_config.json`` or ONNX metadata, merged) is written
beside it as ``<baked stem>.preprocess.json``, and its class list (``<stem>.classes.txt`` or
``classes=``) as ``<baked stem>.classes.txt``; an ONNX bake also records both in the model's
``metadata_props`` (``calibrate_teacher.preprocess``, ``calibrate_teacher.classes``). Both are
companion files: staged, checked against ``overwrite`` up front, renamed into place with the
model. A teacher whose files give no preprocessing gets none (evaluating the baked one then warns
about defaults as the original's evaluation does), and with ``overwrite`` a stale
``<baked stem>.preprocess.json`` / ``.classes.txt`` from an earlier bake is removed.

In memory, :func:`apply_temperature` does the same for an ``nn.Module`` a KD script holds: 1/T
folded into its last ``nn.Linear`` when a probe batch proves that exact, else a thin wrapper.

Downstream KD trainers usually divide the teacher's outputs by their own distillation τ as well:
the baked teacher then sits at τ·T, which is what you want to keep (T calibrates, τ distils).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from calibrate_teacher._io import atomic_output, check_output, sha256_file
from calibrate_teacher._validate import validate_temperature
from calibrate_teacher.errors import BakeError, InvalidValueError
from calibrate_teacher.teachers import backend, open_teacher
from calibrate_teacher.teachers._files import PROBE_TOLERANCES, BackendTeacher, detect_format
from calibrate_teacher.teachers._preprocessing import (
    classes_sidecar,
    find_model_classes,
    find_model_preprocessing,
    set_onnx_metadata,
)
from calibrate_teacher.teachers.base import TeacherFormat

if TYPE_CHECKING:
    import torch

    from calibrate_teacher.data.preprocess import PreprocessConfig
    from calibrate_teacher.teachers.base import Inputs

__all__ = ["BakeResult", "apply_temperature", "bake_temperature", "default_baked_path"]

#: Relative tolerance of the probe check, by the precision of the model's output.
TOLERANCES = PROBE_TOLERANCES
PROBE_ROWS = 4
_HEAD_FORMATS = ("safetensors", "state_dict")


@dataclass(frozen=True)
class BakeResult:
    """What a bake wrote and how well the baked teacher matched ``original / T``.

    Attributes:
        path: The baked model file.
        format: Its format (the same as the input's).
        temperature: The temperature T baked in.
        max_abs_error: ``max |baked - original / T|`` over the probe batch's logits.
        head: Where T went: the Linear layer folded (safetensors, state dict) or the ONNX tensor
            divided; None for TorchScript and torch.export.
        source: The teacher file baked.
        tolerance: The bound ``max_abs_error`` had to stay within.
        checked_probabilities: The model ends in a softmax and its probabilities were checked.
        probe_shape: The shape of the probe batch (a multi-input teacher: of its first input).
        probe_inputs: The names of the probe's inputs, for a teacher fed by name; else empty.
        extra_files: Companion files written beside ``path`` (ONNX external data, the
            preprocessing sidecar, the class list).
        notes: Remarks from loading the teacher (provider fallback...), for stderr.
        sha256: The SHA-256 of the baked file (a fit report records it, so that exporting
            soft labels from the baked teacher with the same T again can be refused).
    """

    path: Path
    format: TeacherFormat
    temperature: float
    max_abs_error: float
    head: str | None
    source: Path
    tolerance: float
    checked_probabilities: bool = False
    probe_shape: tuple[int, ...] = ()
    probe_inputs: tuple[str, ...] = ()
    extra_files: tuple[Path, ...] = ()
    notes: tuple[str, ...] = ()
    sha256: str | None = None

    def to_json(self) -> dict[str, object]:
        """A JSON-ready dict (paths as strings)."""
        return {
            "path": str(self.path),
            "format": self.format,
            "temperature": self.temperature,
            "max_abs_error": self.max_abs_error,
            "tolerance": self.tolerance,
            "head": self.head,
            "source": str(self.source),
            "checked_probabilities": self.checked_probabilities,
            "probe_shape": list(self.probe_shape),
            "probe_inputs": list(self.probe_inputs),
            "extra_files": [str(p) for p in self.extra_files],
            "notes": list(self.notes),
            "sha256": self.sha256,
        }


def default_baked_path(teacher_path: str | os.PathLike[str]) -> Path:
    """``<stem>.calibrated<suffix>`` next to the teacher (``<name>-calibrated`` without a suffix).

    A directory (a Hugging Face model) is always ``<name>-calibrated``, dots in its name or not.

    >>> default_baked_path("models/resnet.onnx").as_posix()
    'models/resnet.calibrated.onnx'
    >>> default_baked_path("models/program").as_posix()
    'models/program-calibrated'
    """
    path = Path(teacher_path)
    if not path.suffix or path.is_dir():  # "program.calibrated" would read as a ".calibrated" file
        return path.with_name(f"{path.name}-calibrated")
    return path.with_name(f"{path.stem}.calibrated{path.suffix}")


def bake_temperature(
    teacher_path: str | os.PathLike[str],
    temperature: float,
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    device: str = "auto",
    output: str | None = None,
    arch: str | None = None,
    arch_kwargs: Mapping[str, object] | str | None = None,
    head: str | None = None,
    probe: Inputs | None = None,
    preprocess: PreprocessConfig | None = None,
    classes: Sequence[str] | None = None,
    input_map: Mapping[str, str] | None = None,
    trust_remote_code: bool = False,
) -> BakeResult:
    """Write a copy of the teacher whose logits are divided by ``temperature``, verified.

    Args:
        teacher_path: The teacher file (any format :func:`~calibrate_teacher.load_teacher` reads).
        temperature: T, finite and > 0.
        out: The baked file; it must keep the teacher's suffix (same format in and out).
        overwrite: Replace ``out`` (and its companion files) if they exist.
        device: Where the probe check runs: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        output: Which output holds the logits (see ``load_teacher``).
        arch: The architecture for safetensors / state-dict teachers.
        arch_kwargs: Keyword arguments for ``arch`` (mapping or JSON object string).
        head: The ``nn.Linear`` to fold T into (safetensors / state dict only); default: the
            Linear the probe proves (the last one first, then the others from last to first).
        probe: The input batch for the check: a tensor, or named inputs (a mapping, as the
            data's batches give them) for a multi-input teacher; pass the real validation
            inputs. Default: 4 deterministic random inputs shaped as the teacher expects
            (masks all ones).
        preprocess: The preprocessing the teacher was measured with, for the baked teacher to
            carry; default: what the teacher's own files give (nothing when they give none).
        classes: The class names the teacher was measured with, in output order; default:
            the class list the teacher carries (``<stem>.classes.txt``, ONNX metadata), if any.
        input_map: ``{model_input: probe_field}`` for probe fields named otherwise (as given
            to ``collect_logits``).
        trust_remote_code: Hugging Face directories: allow the ``auto_map`` code in it.

    Returns:
        A :class:`BakeResult`.

    Raises:
        InvalidValueError: T is not finite and > 0, ``out`` changes the suffix or is the
            teacher itself, or ``head`` is given for a format without one.
        OutputExistsError: ``out`` (or a companion file) exists and ``overwrite`` is false.
        InputError, TeacherError: the teacher cannot be read (see ``load_teacher``), or the
            preprocessing beside it is invalid.
        BakeError: the head cannot be found or is tied, or the baked teacher failed the check.
    """
    value = validate_temperature(temperature)
    source, target = Path(teacher_path), Path(out)
    fmt = detect_format(source, arch=arch)
    if fmt == "hf":  # a directory baked into a directory: see teachers/_hf_bake.py
        return _bake_directory(
            source, value, Path(out), overwrite=overwrite, device=device, head=head, probe=probe,
            preprocess=preprocess, classes=classes, input_map=input_map, trust_remote_code=trust_remote_code,
        )
    if head is not None and fmt not in _HEAD_FORMATS:
        raise InvalidValueError(
            f"--head {head!r}: only safetensors / state-dict teachers have a "
            f"head to fold into; {source.name} is {fmt}"
        )
    if target.suffix.lower() != source.suffix.lower():
        raise InvalidValueError(
            f"{target}: the baked teacher keeps the format of {source.name}; "
            f"give --out a {source.suffix} path"
        )
    if target.exists() and target.resolve() == source.resolve():
        raise InvalidValueError(f"{target}: is the teacher itself; write the baked one elsewhere")
    check_output(target, overwrite=overwrite)
    carried, class_names = _carried(source, preprocess, classes)
    original = open_teacher(
        source, device=device, output=output, arch=arch, arch_kwargs=arch_kwargs
    )
    batch = _probe_batch(original, probe, input_map)
    with contextlib.ExitStack() as stack:
        # A copy of a private teacher stays private: no more permission bits than the input.
        mode = source.stat().st_mode & 0o777
        final = stack.enter_context(atomic_output(target, overwrite=overwrite, max_mode=mode))
        staging = Path(
            tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".staging", dir=target.parent)
        )
        stack.callback(shutil.rmtree, staging, ignore_errors=True)
        # What the baked teacher carries, staged and checked before the (long) bake.
        carriers = _stage_carriers(staging, target, carried, class_names)
        stale, carriers = _stale_carriers(target, carriers, overwrite=overwrite)
        files = backend(fmt).bake(original, value, staging / target.name, head=head)
        if fmt == "onnx" and (carried or class_names is not None):
            _record_in_onnx(files.model, carried, class_names)
        extra = (*files.extra, *carriers)
        companions = [
            stack.enter_context(
                atomic_output(target.parent / f.name, overwrite=overwrite, max_mode=mode)
            )
            for f in extra
        ]
        baked = open_teacher(
            files.model, device=device, output=output, arch=arch, arch_kwargs=arch_kwargs
        )
        error, tolerance, probabilities = _verify(original, baked, batch, value, files.head)
        # On leaving the stack: companions are renamed into place first, the model last.
        for staged, temporary in zip(extra, companions, strict=True):
            os.replace(staged, temporary)
        os.replace(files.model, final)
    for path in stale:  # after the new model is in place: a crash before leaves the old set
        path.unlink(missing_ok=True)
    return BakeResult(
        path=target,
        format=fmt,
        temperature=value,
        max_abs_error=error,
        head=files.head,
        source=source,
        tolerance=tolerance,
        checked_probabilities=probabilities,
        probe_shape=_first_shape(batch),
        probe_inputs=tuple(map(str, batch)) if isinstance(batch, Mapping) else (),
        extra_files=tuple(target.parent / f.name for f in extra),
        notes=tuple(original.notes),
        sha256=sha256_file(target),
    )


def _carried(
    source: Path, preprocess: PreprocessConfig | None, classes: Sequence[str] | None
) -> tuple[dict[str, object], tuple[str, ...] | None]:
    """The preprocessing keys and class names the baked teacher is to carry."""
    from calibrate_teacher.data.preprocess import merge_model_layers

    layers = find_model_preprocessing(source) if preprocess is None else ()
    carried = preprocess.to_json() if preprocess is not None else merge_model_layers(layers)
    if classes is not None:
        return carried, tuple(str(c) for c in classes)
    found = find_model_classes(source)
    return carried, found[0] if found is not None else None


def _stage_carriers(
    staging: Path, target: Path, carried: Mapping[str, object], classes: Sequence[str] | None
) -> list[Path]:
    """Write the preprocessing sidecar and the class list into the staging folder."""
    written = []
    if carried:
        sidecar = staging / f"{target.stem}.preprocess.json"
        sidecar.write_text(json.dumps(dict(carried), indent=2) + "\n", encoding="utf-8")
        written.append(sidecar)
    if classes is not None:
        names = staging / classes_sidecar(target).name
        names.write_text("".join(f"{c}\n" for c in classes), encoding="utf-8")
        written.append(names)
    return written


def _stale_carriers(
    target: Path, staged: Sequence[Path], *, overwrite: bool
) -> tuple[list[Path], list[Path]]:
    """Check the sidecar slots beside ``target``: (those this bake leaves stale, those to write).

    An existing sidecar that already holds exactly what this bake would write is kept as it is
    (two baked formats of one teacher, ``t.calibrated.onnx`` and ``t.calibrated.pt``, share
    it). Any other existing one is refused without ``overwrite``, even when this bake writes
    none: the baked teacher would read it.
    """
    slots = (target.with_name(f"{target.stem}.preprocess.json"), classes_sidecar(target))
    by_name = {p.name: p for p in staged}
    keep: set[str] = set()
    for path in slots:
        new = by_name.get(path.name)
        if new is not None and path.is_file() and not path.is_symlink() and path.read_bytes() == new.read_bytes():
            keep.add(path.name)
            continue
        check_output(path, overwrite=overwrite)
    stale = [p for p in slots if p.name not in by_name and (p.exists() or p.is_symlink())]
    return stale, [p for p in staged if p.name not in keep]


def _record_in_onnx(model_path: Path, carried: Mapping[str, object], classes: Sequence[str] | None) -> None:
    """Add the carried keys to the staged ONNX model's metadata_props (weights untouched)."""
    import onnx

    # Without external data: the header is rewritten, external tensors keep their locations.
    model = onnx.load(str(model_path), load_external_data=False)
    set_onnx_metadata(model, preprocess=carried or None, classes=classes)
    onnx.save(model, str(model_path))


def _probe_batch(
    teacher: BackendTeacher, probe: Inputs | None, input_map: Mapping[str, str] | None
) -> Inputs:
    """The probe both teachers run on, as the original is fed; its own probe when none is given.

    Fields are renamed per ``input_map``; a single-input teacher gets its one tensor, a
    multi-input one its named inputs in its order (other fields dropped).
    """
    from calibrate_teacher.collect import feed_teacher

    if probe is None:
        return teacher._probe(PROBE_ROWS)
    fed = feed_teacher(teacher, probe, input_map)
    names = teacher.input_names
    if isinstance(fed, Mapping) and names:  # the model's inputs, in its order; extras dropped
        return {n: fed[n] for n in names if n in fed}
    return fed


def _first_shape(batch: Inputs) -> tuple[int, ...]:
    first = next(iter(batch.values()), None) if isinstance(batch, Mapping) else batch
    return tuple(first.shape) if first is not None else ()


def _verify(
    original: BackendTeacher,
    baked: BackendTeacher,
    batch: Inputs,
    temperature: float,
    head: str | None,
) -> tuple[float, float, bool]:
    """Return (max error, tolerance, probabilities checked); raise BakeError past tolerance."""
    import torch

    expected = original.logits(batch).double().cpu() / temperature
    got = baked.logits(batch).double().cpu()
    if got.shape != expected.shape:
        raise BakeError(
            f"{original.path}: the baked teacher returns shape {tuple(got.shape)}, "
            f"the original {tuple(expected.shape)}; nothing was written"
        )
    relative = TOLERANCES.get(original.precision, TOLERANCES["float16"])
    tolerance = relative * max(1.0, float(expected.abs().max()))
    error = float((got - expected).abs().max())
    where = f" (head {head})" if head else ""
    if not math.isfinite(error) or error > tolerance:
        raise BakeError(
            f"{original.path}: the baked teacher{where} does not give original / T on the probe "
            f"batch: max |baked - original/T| = {error:.3g} > {tolerance:.3g}; nothing was "
            "written" + ("; is --head the last layer before the output?" if head else "")
        )
    probabilities = original._probabilities(batch)
    if probabilities is None:
        return error, tolerance, False
    baked_probabilities = baked._probabilities(batch)
    reference = torch.softmax(expected, dim=1)
    if baked_probabilities is None:
        raise BakeError(
            f"{original.path}: the baked teacher lost its final softmax; nothing was written"
        )
    gap = float((baked_probabilities.double().cpu() - reference).abs().max())
    if not math.isfinite(gap) or gap > relative:
        raise BakeError(
            f"{original.path}: the baked teacher's probabilities differ from "
            f"softmax(original / T) by {gap:.3g} > {relative:.3g}; nothing was written"
        )
    return error, tolerance, True


def apply_temperature(
    module: torch.nn.Module,
    temperature: float,
    *,
    inplace: bool = False,
    probe: Inputs | None = None,
    output: str | int | None = None,
) -> torch.nn.Module:
    """Return a module whose logits are ``module``'s divided by ``temperature``.

    With a ``probe`` batch, 1/T is folded into the last ``nn.Linear`` the forward calls
    (``W/T``, ``b/T``), and kept only when the folded module gives ``original / T`` on the probe
    within ``1e-5 * max(1, max |original / T|)`` (float32; ``1e-2`` float16, ``5e-2``
    bfloat16): the module keeps its type, its attributes and its ``state_dict`` keys. Anything
    after the head that is linear in it (``head(x) * 3``, a mean over tokens) folds exactly;
    anything else (a softmax or ``tanh`` after it, a tied head, no Linear) fails the proof
    and the module is wrapped instead. Without a probe it is always wrapped: a
    ``TemperatureScaled`` module (``.module``, ``.temperature``) whose forward divides the
    logits entry of the output (a tensor, a tuple's item, a mapping's or ``ModelOutput``'s
    ``logits``) and keeps the rest. The probe only proves the fold on its own rows, so use
    real inputs: :attr:`~calibrate_teacher.pipeline.CalibrationRun.probe` holds the first rows
    of the calibration data.

    The module is never moved to another device, and the result has its train/eval flags.
    The probe runs in ``eval()`` mode without autograd. Unless ``inplace``, the caller's
    module is left as it is: a fold edits a copy of the module tree that shares every
    parameter and buffer but the head's weight and bias (a teacher is not duplicated in GPU
    memory; ``copy.deepcopy`` it first to train the two apart), and a wrapper holds the module
    itself. With ``inplace=True`` the head is folded in the module itself (and restored
    exactly when the proof fails).

    Args:
        module: The teacher.
        temperature: T, finite and > 0.
        inplace: Fold into ``module`` itself instead of a copy.
        probe: Inputs to prove a fold on: a tensor or a mapping of named tensors, as the
            forward takes them; None wraps without folding.
        output: Which entry of the output holds the logits: a key, an attribute or an
            index; default ``logits`` (a tuple's first item).

    Returns:
        The folded module (its own type) or a ``TemperatureScaled`` wrapper.

    Raises:
        InvalidValueError: ``module`` is not an ``nn.Module``, or T is not finite and > 0.
        TeacherError: ``output`` names no tensor in the probe's output.
    """
    import torch

    from calibrate_teacher.teachers._memory import fold_into_head, temperature_scaled

    value = validate_temperature(temperature)
    if not isinstance(module, torch.nn.Module):
        raise InvalidValueError(
            f"module: got {type(module).__name__}; apply_temperature takes an nn.Module (divide "
            "a plain function's logits by T yourself)"
        )
    if probe is not None:
        fold = fold_into_head(module, value, probe, output=output, inplace=inplace, tolerances=TOLERANCES)
        if fold is not None:
            return fold.module
    return temperature_scaled(module, value, output)


def _bake_directory(
    source: Path,
    temperature: float,
    target: Path,
    *,
    overwrite: bool,
    device: str,
    head: str | None,
    probe: Inputs | None,
    preprocess: PreprocessConfig | None,
    classes: Sequence[str] | None,
    input_map: Mapping[str, str] | None,
    trust_remote_code: bool,
) -> BakeResult:
    """A Hugging Face model directory baked into a directory, as a :class:`BakeResult`."""
    from calibrate_teacher.teachers._hf_bake import bake_directory
    from calibrate_teacher.teachers._inputs import rename_fields

    if probe is not None and input_map:
        probe = rename_fields(probe, input_map, where=source)
    baked = bake_directory(
        source, temperature, target, overwrite=overwrite, device=device, head=head, probe=probe,
        preprocess=preprocess.to_json() if preprocess is not None else None, classes=classes,
        trust_remote_code=trust_remote_code,
    )
    return BakeResult(
        path=baked.path,
        format="hf",
        temperature=temperature,
        max_abs_error=baked.max_abs_error,
        head=baked.head,
        source=source,
        tolerance=baked.tolerance,
        probe_shape=baked.probe_shape,
        probe_inputs=baked.probe_inputs,
        extra_files=baked.extra_files,
        notes=baked.notes,
        sha256=None,  # a directory: its record is calibration.json inside it
    )
