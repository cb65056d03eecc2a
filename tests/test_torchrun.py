"""`torchrun --nproc-per-node 2 ... export-soft-labels` on CPU (gloo) gives one process's rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _cache_fixtures import reference_module, save_arrays, save_torchscript

from calibrate_teacher._distributed import DistributedContext, distributed_context, rank_device
from calibrate_teacher.errors import InvalidValueError
from calibrate_teacher.soft_labels import SoftLabelCache, verify_cache

REPO = Path(__file__).resolve().parents[1]


def export(args, *, torchrun: bool, cwd: Path) -> subprocess.CompletedProcess[str]:
    # one thread per process in both runs, so the teacher's arithmetic is the same
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    # --standalone: a local rendezvous on a free port (tests may run side by side)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    if not torchrun:
        launcher = [sys.executable]
    return subprocess.run([*launcher, "-m", "calibrate_teacher", "export-soft-labels", *args],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_two_ranks_write_the_same_cache_as_one_process(tmp_path):
    save_arrays(tmp_path / "train.npz", n=45)
    save_torchscript(reference_module(), tmp_path / "teacher.pt")
    common = ["teacher.pt", "--data", "train.npz", "-t", "1.5", "--shard-rows", "8",
              "--batch-size", "4", "--device", "cpu"]
    single = export([*common, "--out", "single"], torchrun=False, cwd=tmp_path)
    assert single.returncode == 0, single.stderr
    ranks = export([*common, "--out", "ranks", "--json"], torchrun=True, cwd=tmp_path)
    assert ranks.returncode == 0, ranks.stderr
    doc = json.loads(ranks.stdout)  # only rank 0 prints: one JSON document
    assert doc["manifest"]["complete"] and len(doc["manifest"]["shards"]) == 6

    one, two = tmp_path / "single", tmp_path / "ranks"
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in two.iterdir())
    for name in names:
        if name != "manifest.json":
            assert (one / name).read_bytes() == (two / name).read_bytes(), name
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (one, two))
    a.pop("created_at"), b.pop("created_at")
    assert a == b
    assert verify_cache(two).ok and len(SoftLabelCache(two)) == 45


def test_distributed_context_from_environment(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed_context() == DistributedContext(0, 1, 0)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    ctx = distributed_context()
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.is_main) == (3, 4, 1, False)
    assert rank_device("cpu", ctx) == "cpu" and rank_device("cuda:0", ctx) == "cuda:0"
    assert rank_device("auto", DistributedContext()) == "auto"
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(InvalidValueError, match="RANK"):
        distributed_context()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(InvalidValueError, match="integer"):
        distributed_context()
