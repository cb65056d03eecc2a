"""A baked teacher carries the class order it was measured with (#10 item 2).

The example's class folders are renamed so that their sorted order is not the teacher's output
order; a ``classes.txt`` gives the right one. After ``fit`` bakes the teacher, the baked teacher
evaluated on the same images *without* the ``classes.txt`` must measure exactly what the
original measured with it; the folder names alone would scramble the labels.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.mark.slow
def test_baked_teacher_measures_with_the_class_order_it_carries(tmp_path, cli):
    shutil.copy(ROOT / "examples/digits/teacher.onnx", tmp_path / "teacher.onnx")
    shutil.copy(ROOT / "examples/digits/teacher.preprocess.json", tmp_path / "teacher.preprocess.json")
    listed, bare = tmp_path / "listed", tmp_path / "bare"
    for folder in (listed, bare):
        for digit, name in enumerate(NAMES):
            shutil.copytree(ROOT / "examples/digits/val" / str(digit), folder / name)
    (listed / "classes.txt").write_text("\n".join(NAMES) + "\n")

    code, out, err = cli("fit", tmp_path / "teacher.onnx", "--data", listed, "--objective", "nll", "--json",
                         "--bootstrap", "0")
    assert code == 0, err
    fitted = json.loads(out)
    baked = Path(fitted["baked"]["path"])
    assert (tmp_path / "teacher.calibrated.classes.txt").read_text().split() == NAMES

    code, out, err = cli("evaluate", baked, "--data", bare, "--json", "--bootstrap", "0")
    assert code == 0, err
    measured = json.loads(out)
    assert measured["source"]["data"]["classes"] == NAMES
    assert measured["metrics"]["accuracy"] == pytest.approx(fitted["after"]["accuracy"], abs=1e-12)
    assert measured["metrics"]["ece"] == pytest.approx(fitted["after"]["ece"], abs=1e-6)
    assert measured["metrics"]["accuracy"] > 0.9

    # Without the carried list the folder names decide, and the labels are scrambled.
    code, out, err = cli("evaluate", tmp_path / "teacher.onnx", "--data", bare, "--json", "--bootstrap", "0")
    assert code == 0, err
    assert json.loads(out)["metrics"]["accuracy"] < 0.5
