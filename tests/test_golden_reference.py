"""The peer-library reference set is vendored in tests/golden/calibration and never skipped (#9).

``calibration-golden.json`` holds values computed by netcal, uncertainty-calibration, torchmetrics
and scipy on the seeded logits beside it; none of those libraries is a dependency, so the files
cannot be regenerated here. They are pinned by hash: a changed fixture fails loudly instead of
silently moving the goldens that ``test_metrics.py`` and ``test_temperature.py`` compare against.
"""

import hashlib
import json
import re
from pathlib import Path

import pytest
from safetensors.torch import load_file

TESTS = Path(__file__).parent
REFERENCE = TESTS / "golden" / "calibration"
SHA256 = {
    "calibration-golden.json": "bbf7d8e421dd5bb6ae7d22d3867433a4afee65b63507e5c00e2c1713cad00107",
    "c10_overconfident.safetensors": "022731cdde9ed81b21429e88f05fd06d8c1863cd079ab85e3b354b71247fbdb1",
    "c10_underconfident.safetensors": "53efda4d39fdf3c24cd070105f67f433df984ae37dd8b3bc2b011bdb297f384c",
    "c100_overconfident.safetensors": "c04bd2a4d8758dae938627790e3a607a9cb6780c2af239d100310e56a32a4c73",
}


@pytest.mark.parametrize("name", sorted(SHA256))
def test_vendored_reference_files_are_unchanged(name):
    assert hashlib.sha256((REFERENCE / name).read_bytes()).hexdigest() == SHA256[name]


def test_every_golden_set_has_its_logits_in_the_checkout():
    golden = json.loads((REFERENCE / "calibration-golden.json").read_text())
    sets = {k: v for k, v in golden.items() if not k.startswith("_")}
    assert set(sets) == {"c10_overconfident", "c10_underconfident", "c100_overconfident"}
    for g in sets.values():
        data = load_file(str(REFERENCE / g["file"]))
        assert tuple(data["logits"].shape) == (g["n"], g["classes"])
        assert tuple(data["labels"].shape) == (g["n"],)


def test_no_test_reads_data_from_outside_the_checkout():
    # ../shared/reference exists only on some machines; a test reading it skipped for every newcomer
    outside = re.compile(r"parents\[[2-9]\]|[\"']shared[\"']\s*/|/work/")
    offenders = [
        f"{path.name}:{i}"
        for path in sorted(TESTS.glob("*.py"))
        if path.name != Path(__file__).name
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if outside.search(line)
    ]
    assert offenders == []
