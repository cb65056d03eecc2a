"""A crafted ``.pt2`` must never run code (#12): each way torch.export.load executes a payload.

Every archive starts as a valid program; one entry is replaced with a payload that would create a
marker file. Plain ``torch.export.load`` really runs the pickle and sympy payloads (checked in
``test_the_payloads_are_live``), so the refusals below are not vacuous.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import zipfile
from pathlib import Path

import pytest
import torch

import calibrate_teacher as ct
from calibrate_teacher.errors import TeacherError


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _program(path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    torch.export.save(torch.export.export(model, (torch.zeros(2, 4),)), str(path))


def _rewrite(src: Path, dst: Path, edit) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = edit(info.filename, zin.read(info.filename))
            if data is not None:
                zout.writestr(info, data)
    return dst


def _pickled(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save(_Payload(marker), buffer)
    return buffer.getvalue()


def _edit_json(suffix: str, change):
    def edit(name: str, data: bytes):
        if name.endswith(suffix):
            document = json.loads(data)
            change(document)
            return json.dumps(document).encode()
        return data

    return edit


def _crafted(tmp_path: Path, kind: str) -> tuple[Path, Path]:
    marker = tmp_path / "MARKER"
    clean = tmp_path / "clean.pt2"
    _program(clean)
    command = f"__import__('os').system('touch {marker}')"
    if kind == "use_pickle":

        def edit(name: str, data: bytes):
            if name.endswith("model_weights_config.json"):
                config = json.loads(data)
                config["config"]["0.bias"]["use_pickle"] = True
                return json.dumps(config).encode()
            return _pickled(marker) if name.endswith("weights/weight_1") else data

    elif kind == "sample_inputs":

        def edit(name: str, data: bytes):
            return _pickled(marker) if name.endswith("sample_inputs/model.pt") else data

    elif kind in ("legacy_weights", "aotinductor"):
        extra = {
            "legacy_weights": ("clean/data/weights/model.pt", _pickled(marker)),
            "aotinductor": ("clean/data/aotinductor/model/model.so", b"\x7fELF"),
        }[kind]
        with zipfile.ZipFile(clean, "a") as archive:
            archive.writestr(*extra)

        def edit(name: str, data: bytes):
            return data
    elif kind == "custom_object":

        def change(config):
            config["config"]["obj"] = {"path_name": "custom_obj_0", "is_param": False, "use_pickle": False}

        edit = _edit_json("model_constants_config.json", change)
    elif kind == "guards_code":
        edit = _edit_json("models/model.json", lambda p: p.__setitem__("guards_code", [command]))
    elif kind == "range_constraint":
        edit = _edit_json(
            "models/model.json",
            lambda p: p.__setitem__("range_constraints", {command: {"min_val": 2, "max_val": None}}),
        )
    elif kind == "expr_str":

        def change(program):
            values = program["graph_module"]["graph"]["tensor_values"]
            first = next(iter(values.values()))
            first["sizes"][0] = {"as_expr": {"expr_str": command, "hint": {"as_int": 2}}}

        edit = _edit_json("models/model.json", change)
    elif kind == "target":

        def change(program):
            node = program["graph_module"]["graph"]["nodes"][0]
            node["target"] = "torch.os.system"
            node["inputs"] = [{"name": "command", "arg": {"as_string": f"touch {marker}"}, "kind": 1}]

        edit = _edit_json("models/model.json", change)
    elif kind == "file_op":

        def change(program):
            program["graph_module"]["graph"]["nodes"][0]["target"] = "torch.ops.aten.from_file.default"

        edit = _edit_json("models/model.json", change)
    else:  # pragma: no cover
        raise AssertionError(kind)
    return _rewrite(clean, tmp_path / f"{kind}.pt2", edit), marker


KINDS = [
    "use_pickle", "sample_inputs", "legacy_weights", "aotinductor", "custom_object", "guards_code",
    "range_constraint", "expr_str", "target", "file_op",
]


@pytest.mark.parametrize("kind", ["use_pickle", "sample_inputs", "expr_str"])
def test_the_payloads_are_live(tmp_path, kind):
    # Plain torch.export.load runs these payloads: the refusals below guard something real.
    path, marker = _crafted(tmp_path, kind)
    with contextlib.suppress(Exception):
        torch.export.load(str(path))
    assert marker.exists()


@pytest.mark.parametrize("kind", KINDS)
def test_crafted_archive_is_refused_and_runs_nothing(tmp_path, kind):
    path, marker = _crafted(tmp_path, kind)
    with pytest.raises(TeacherError, match=r"refused: .*never runs code from a model file"):
        ct.load_teacher(path, device="cpu")
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["use_pickle", "sample_inputs", "expr_str"])
@pytest.mark.parametrize("command", ["evaluate", "bake", "export-soft-labels"])
def test_every_command_refuses_a_crafted_archive(tmp_path, cli, kind, command):
    path, marker = _crafted(tmp_path, kind)
    data = tmp_path / "data.npz"
    import numpy as np

    np.savez(data, inputs=np.zeros((4, 4), np.float32), labels=np.zeros(4, np.int64))
    before = set(tmp_path.iterdir())
    args = {
        "evaluate": ["evaluate", path, "--data", data],
        "bake": ["bake", path, "-t", "1.5", "--out", tmp_path / "baked.pt2"],
        "export-soft-labels": ["export-soft-labels", path, "--data", data, "--out", tmp_path / "cache", "-t", "1.5"],
    }[command]
    code, _out, err = cli(*args)
    assert code == 1
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and str(path) in err and "refused" in err
    assert not marker.exists()
    assert set(tmp_path.iterdir()) == before


def test_clean_programs_still_load(tmp_path):
    from torch.export import Dim

    path = tmp_path / "dynamic.pt2"
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(5))
    model(torch.zeros(2, 3, 6, 6))
    program = torch.export.export(model.eval(), (torch.zeros(2, 3, 6, 6),), dynamic_shapes=({0: Dim.AUTO},))
    torch.export.save(program, str(path))
    teacher = ct.load_teacher(path, device="cpu")
    x = torch.randn(3, 3, 6, 6)
    torch.testing.assert_close(teacher.logits(x), model(x), rtol=1e-5, atol=1e-6)


def test_an_archive_named_constants_still_loads(tmp_path):
    # The archive's top folder is the file's stem; only data/constants/ inside it holds constants.
    path = tmp_path / "constants.pt2"
    _program(path)
    teacher = ct.load_teacher(path, device="cpu")
    assert teacher.num_classes == 3
