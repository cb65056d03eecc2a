"""The cache under faults: SIGKILLed exports resume byte-identically; damage is found and named."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from calibrate_teacher.errors import CacheError
from calibrate_teacher.soft_labels import SoftLabelCache, verify_cache, write_soft_labels

REPO = Path(__file__).resolve().parents[1]
N_ROWS = 120

# A child process that exports N_ROWS rows slowly (one line on stdout per batch) so that the
# test can SIGKILL it at chosen points: between batches, inside a shard write, while finishing.
CHILD = textwrap.dedent(
    f"""
    import sys, time
    from dataclasses import dataclass
    import torch
    from calibrate_teacher.soft_labels import write_soft_labels

    @dataclass(frozen=True)
    class Batch:
        indices: torch.Tensor
        logits: torch.Tensor
        labels: torch.Tensor
        keys: tuple

    g = torch.Generator().manual_seed(0)
    logits = torch.randn({N_ROWS}, 5, generator=g) * 3
    labels = torch.randint(0, 5, ({N_ROWS},), generator=g)
    delay = float(sys.argv[2])

    def produce(rows):
        rows = list(rows)
        for s in range(0, len(rows), 4):
            idx = torch.tensor(rows[s:s + 4])
            time.sleep(delay)
            yield Batch(idx, logits[idx], labels[idx], tuple(f"s{{i}}" for i in idx.tolist()))
            print(int(idx[-1]) + 1, flush=True)

    write_soft_labels(produce, sys.argv[1], num_samples={N_ROWS}, num_classes=5, temperature=1.3,
                      teacher={{"file": "t", "sha256": "0" * 64, "format": "onnx"}}, shard_rows=16)
    print("done", flush=True)
    """
)


def start_child(script: Path, out: Path, delay: float) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, str(script), str(out), str(delay)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def run_to_end(script: Path, out: Path) -> None:
    with start_child(script, out, 0.0) as child:
        _, err = child.communicate(timeout=120)
    assert child.returncode == 0, err


def kill_after(script: Path, out: Path, rows: int, extra: float) -> int:
    """Start an export, SIGKILL it once it reports ``rows`` rows (+ ``extra`` s); return its code."""
    with start_child(script, out, 0.005) as child:
        assert child.stdout is not None
        for line in child.stdout:
            if line.strip() == "done" or int(line) >= rows:
                break
        time.sleep(extra)
        child.send_signal(signal.SIGKILL)
        child.communicate(timeout=60)
    return child.returncode


def shard_and_key_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "manifest.json"}


def cache_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def manifest_without_time(folder: Path) -> dict[str, object]:
    doc = json.loads((folder / "manifest.json").read_text())
    doc.pop("created_at")
    return doc


def test_sigkilled_export_resumes_byte_identical(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    reference = tmp_path / "reference"
    run_to_end(script, reference)

    cache = tmp_path / "cache"
    rng = np.random.default_rng(0)
    # kill after a random number of rows (N_ROWS: after the last batch, while writing/finishing),
    # then a random extra moment so the kill lands inside writes and renames too
    kill_rows = [*sorted(rng.integers(1, N_ROWS, size=3).tolist()), N_ROWS]
    kills = 0
    for target in kill_rows:
        kills += kill_after(script, cache, target, float(rng.uniform(0.0, 0.02))) == -signal.SIGKILL
        manifest = json.loads((cache / "manifest.json").read_text())
        if manifest["complete"]:
            break
        with pytest.raises(CacheError, match="incomplete"):
            SoftLabelCache(cache)
    assert kills >= 3  # the kills really interrupted the export

    # killed after finishing, the same request is a no-op (#12) that tidies leftover receipts;
    # otherwise it resumes: either way the rerun succeeds
    run_to_end(script, cache)
    assert cache_files(cache) == cache_files(reference)
    assert shard_and_key_bytes(cache) == shard_and_key_bytes(reference)
    assert manifest_without_time(cache) == manifest_without_time(reference)
    assert verify_cache(cache).ok


# --- damage is found and named ------------------------------------------------------------------


class Rows:
    def __init__(self, n=40, c=6):
        import torch

        g = torch.Generator().manual_seed(1)
        self.logits = torch.randn(n, c, generator=g)
        self.labels = torch.randint(0, c, (n,), generator=g)

    def __call__(self, rows):
        import torch

        from calibrate_teacher.collect import LogitBatch

        idx = torch.tensor(list(rows))
        yield LogitBatch(idx, self.logits[idx], self.labels[idx], tuple(f"k{i}" for i in idx.tolist()))


@pytest.fixture
def cache(tmp_path):
    rows = Rows()
    write_soft_labels(rows, tmp_path / "cache", num_samples=40, num_classes=6, temperature=2.0,
                      shard_rows=16, teacher={"file": "t.onnx"})
    return tmp_path / "cache"



def test_corrupt_shard_is_named_by_verify(cache, cli):
    path = cache / "shard-00001.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF  # one flipped byte in the logits
    path.write_bytes(bytes(raw))
    result = verify_cache(cache)
    assert not result.ok and len(result.problems) == 1
    assert result.problems[0].startswith("shard-00001.safetensors: checksum mismatch")
    code, out, err = cli("inspect", str(cache), "--verify")
    assert code == 1
    assert "shard-00001.safetensors" in err and "verification failed" in err
    code, out, err = cli("inspect", str(cache), "--verify", "--json")
    doc = json.loads(out)
    assert code == 1 and doc["verification"]["ok"] is False
    assert "shard-00001.safetensors" in doc["verification"]["problems"][0]


def test_truncated_shard_missing_keys_and_bad_header(cache):
    shard = cache / "shard-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    (cache / "keys.txt").unlink()
    problems = verify_cache(cache).problems
    assert any(p.startswith("shard-00002.safetensors: checksum") for p in problems)
    assert any(p.startswith("keys.txt: missing") for p in problems)
    reader = SoftLabelCache(cache)
    with pytest.raises(CacheError, match="shard-00002"):
        reader.logits()[39]
    reader.logits()[0]  # the intact shards still read
    (cache / "shard-00000.safetensors").write_bytes(b"\xff" * 8 + b"{")
    with pytest.raises(CacheError, match="corrupt shard header"):
        SoftLabelCache(cache).logits()[0]


def test_reader_refuses_incomplete_manifest_and_newer_format(cache):
    doc = json.loads((cache / "manifest.json").read_text())
    (cache / "manifest.json").write_text(json.dumps({**doc, "complete": False}))
    with pytest.raises(CacheError, match=r"incomplete.*rerun"):
        SoftLabelCache(cache)
    assert not verify_cache(cache).ok
    (cache / "manifest.json").write_text(json.dumps({**doc, "format_version": 99}))
    with pytest.raises(CacheError, match="upgrade"):
        SoftLabelCache(cache)


def test_inspect_shows_an_unfinished_export(tmp_path, cli):
    rows = Rows()

    def crash_in_shard_two(r):
        r = list(r)
        if r[0] >= 32:
            raise RuntimeError("killed")
        yield from rows(r)

    with pytest.raises(RuntimeError):
        write_soft_labels(crash_in_shard_two, tmp_path / "c", num_samples=40, num_classes=6,
                          temperature=2.0, shard_rows=16)
    code, out, _ = cli("inspect", str(tmp_path / "c"), "--json")
    doc = json.loads(out)
    assert code == 0 and doc["shards_done"] == 2 and doc["num_shards"] == 3
    assert doc["manifest"]["complete"] is False
    code, out, _ = cli("inspect", str(tmp_path / "c"))
    assert "INCOMPLETE: 2 of 3 shards done" in out
