"""The cache under hostile conditions (#12): damaged manifests, corrupt shards, two exporters at
once, retries, other spellings of the data path, failed and interrupted exports, full disks."""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from _cache_fixtures import reference_module, save_arrays, save_torchscript

from calibrate_teacher import DataSpec, TeacherSpec, export_soft_labels
from calibrate_teacher.collect import LogitBatch
from calibrate_teacher.errors import CacheError, InputError, OutputError, OutputExistsError
from calibrate_teacher.soft_labels import (
    SoftLabelCache,
    describe_cache,
    read_manifest,
    verify_cache,
    write_soft_labels,
)

REPO = Path(__file__).resolve().parents[1]
N, C, ROWS = 40, 6, 16  # three shards: 16 + 16 + 8 rows
CACHE_FILES = ["keys.txt", "manifest.json", "shard-00000.safetensors", "shard-00001.safetensors",
               "shard-00002.safetensors"]


class Rows:
    """Serves in-memory logits in batches of 4; records the rows asked for; can fail on a row."""

    def __init__(self, n=N, *, fail_at=None, error=RuntimeError):
        g = torch.Generator().manual_seed(3)
        self.logits = torch.randn(n, C, generator=g) * 2
        self.labels = torch.randint(0, C, (n,), generator=g)
        self.fail_at, self.error = fail_at, error
        self.requested: list[int] = []

    def __call__(self, rows):
        rows = list(rows)
        self.requested.extend(rows)
        for start in range(0, len(rows), 4):
            part = rows[start : start + 4]
            if self.fail_at is not None and self.fail_at in part:
                raise self.error("simulated")
            idx = torch.tensor(part)
            yield LogitBatch(idx, self.logits[idx], self.labels[idx], tuple(f"k{i}" for i in part))


def write(out, producer=None, **kw):
    kw.setdefault("data", {"kind": "arrays", "path": "train.npz"})
    return write_soft_labels(producer or Rows(), out, num_samples=N, num_classes=C, temperature=2.0,
                             shard_rows=ROWS, teacher={"file": "t.onnx", "sha256": "ab" * 32}, **kw)


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def one_line_error(code, err, *needles):
    assert code == 1, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, (needle, err)


@pytest.fixture
def cache(tmp_path):
    write(tmp_path / "cache")
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    folder = tmp_path_factory.mktemp("teacher")
    save_arrays(folder / "train.npz", n=45)
    return {"teacher": save_torchscript(reference_module(), folder / "teacher.pt"),
            "data": folder / "train.npz"}


def export_args(teacher, out, *extra):
    return ["export-soft-labels", teacher["teacher"], "--data", teacher["data"], "--out", out, "-t", "1.5",
            "--shard-rows", "16", "--batch-size", "4", "--device", "cpu", *extra]


# --- 1. a hand-edited manifest is refused, naming the file and the field ----------------------


def edit(doc, where, value):
    *path, last = where
    target = doc
    for key in path:
        target = target[key]
    if value is _DELETE:
        del target[last]
    else:
        target[last] = value


_DELETE = object()
EDITS = [
    (("data", "num_samples"), 1e15, "data.num_samples"),
    (("data", "num_samples"), 10**15, "data.num_samples"),
    (("data", "num_samples"), 41, "shards[2].rows"),
    (("data", "num_samples"), 49, "shards"),
    (("data", "num_samples"), _DELETE, "data.num_samples"),
    (("layout", "shard_rows"), 0, "layout.shard_rows"),
    (("layout", "shard_rows"), "16", "layout.shard_rows"),
    (("layout", "shard_rows"), 17, "shards[0].rows"),
    (("layout", "num_classes"), 1, "layout.num_classes"),
    (("layout", "kind"), "sparse", "layout.kind"),
    (("layout", "k"), 3, "layout.k"),
    (("teacher", "num_classes"), 7, "teacher.num_classes"),
    (("calibration", "temperature"), 0, "calibration.temperature"),
    (("calibration", "temperature"), "2", "calibration.temperature"),
    (("shards", 1, "file"), "../shard-00001.safetensors", "shards[1].file"),
    (("shards", 1, "file"), "/etc/passwd", "shards[1].file"),
    (("shards", 2, "first_row"), 33, "shards[2].first_row"),
    (("shards", 0, "rows"), 15, "shards[0].rows"),
    (("shards", 0, "sha256"), "abc", "shards[0].sha256"),
    (("shards", 0, "bytes"), -1, "shards[0].bytes"),
    (("shards",), [], "shards"),
    (("run_id",), 5, "run_id"),
    (("complete",), "yes", "complete"),
    (("data", "order_sha256"), None, "data.order_sha256"),
]


@pytest.mark.parametrize(
    ("where", "value", "field"), EDITS, ids=[f"{'.'.join(map(str, w))}={v!r:.12}" for w, v, _ in EDITS]
)
def test_hand_edited_manifest_is_refused_naming_file_and_field(cache, cli, where, value, field):
    manifest = cache / "manifest.json"
    doc = json.loads(manifest.read_text())
    edit(doc, where, value)
    manifest.write_text(json.dumps(doc))
    pattern = re.escape(f"manifest.json: field {field} ")
    for call in (SoftLabelCache, verify_cache, describe_cache, read_manifest, lambda c: write(c)):
        with pytest.raises(CacheError, match=pattern):
            call(cache)
    for args in (("inspect", cache), ("inspect", cache, "--verify")):
        code, _, err = cli(*args)
        one_line_error(code, err, str(manifest), f"field {field} ")


def test_a_damaged_unfinished_manifest_blocks_resume_until_overwrite(tmp_path):
    out = tmp_path / "c"
    with pytest.raises(RuntimeError, match="simulated"):
        write(out, Rows(fail_at=20))
    doc = json.loads((out / "manifest.json").read_text())
    doc["layout"]["shard_rows"] = 0
    (out / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(CacheError, match=r"field layout\.shard_rows is 0"):
        write(out)
    assert write(out, overwrite=True).complete and verify_cache(out).ok


# --- 2. the reader checks each shard's checksum and header once ---------------------------------


def flip_last_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01
    path.write_bytes(bytes(raw))


def test_reader_checks_each_shards_checksum_on_first_use(cache, monkeypatch):
    flip_last_byte(cache / "shard-00001.safetensors")
    reader = SoftLabelCache(cache)
    reader.logits()[0]  # shard 0 is intact
    with pytest.raises(CacheError, match=r"shard-00001\.safetensors: checksum mismatch"):
        reader.logits()[20]
    with pytest.raises(CacheError, match="shard-00001"):
        _ = SoftLabelCache(cache).labels
    trusted = SoftLabelCache(cache, verify=False)
    assert trusted.logits()[20].shape == (C,)  # no check: the flipped value is simply read

    import hashlib

    calls = []
    real = hashlib.sha256
    monkeypatch.setattr(hashlib, "sha256", lambda *a: calls.append(1) or real(*a))
    reader = SoftLabelCache(cache)
    for row in (0, 1, 15, 3):
        reader[row]
    assert len(calls) == 1  # shard 0, once
    copy = pickle.loads(pickle.dumps(reader))  # a DataLoader worker does not hash it again
    copy[2]
    assert len(calls) == 1
    copy[39]
    assert len(calls) == 2


def test_reader_checks_the_shard_header_against_the_manifest(cache):
    from calibrate_teacher._io import sha256_file

    doc = json.loads((cache / "manifest.json").read_text())
    (cache / "shard-00001.safetensors").write_bytes((cache / "shard-00000.safetensors").read_bytes())
    doc["shards"][1].update(bytes=(cache / "shard-00001.safetensors").stat().st_size,
                            sha256=sha256_file(cache / "shard-00001.safetensors"))
    (cache / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(CacheError, match=r"shard-00001\.safetensors: its header says shard 0.*as shard 1"):
        SoftLabelCache(cache).logits()[16]
    assert any("header says shard 0" in p for p in verify_cache(cache).problems)


def test_reader_checks_tensor_shapes_against_the_layout(cache):
    import numpy as np

    from calibrate_teacher._io import sha256_file
    from calibrate_teacher.soft_labels._safetensors import parse_header, write_shard_bytes

    path = cache / "shard-00002.safetensors"
    _, meta = parse_header(path)
    arrays = {"sample_index": np.arange(32, 40), "label": np.zeros(8, np.int64),
              "lse": np.zeros(8, np.float32), "logits": np.zeros((8, C - 1), np.float16)}
    with open(path, "wb") as fh:
        write_shard_bytes(fh, arrays, meta)
    doc = json.loads((cache / "manifest.json").read_text())
    doc["shards"][2].update(bytes=path.stat().st_size, sha256=sha256_file(path))
    (cache / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(CacheError, match=r"tensor logits is float16 \[8, 5\], expected float16 \[8, 6\]"):
        SoftLabelCache(cache).logits()[35]


# --- 3. two exporters into one folder: one wins, the other fails at once ------------------------

# Exports N rows; the first batch is reported on stdout, then it waits for the gate file.
GATED = textwrap.dedent(
    f"""
    import os, sys, time
    import torch
    from calibrate_teacher.collect import LogitBatch
    from calibrate_teacher.soft_labels import write_soft_labels

    out, gate = sys.argv[1], sys.argv[2]
    g = torch.Generator().manual_seed(3)
    logits = torch.randn({N}, {C}, generator=g) * 2
    labels = torch.randint(0, {C}, ({N},), generator=g)

    def produce(rows):
        for start in range(0, len(rows), 4):
            idx = torch.tensor(list(rows)[start:start + 4])
            yield LogitBatch(idx, logits[idx], labels[idx], tuple(f"k{{i}}" for i in idx.tolist()))
            print("batch", flush=True)
            while not os.path.exists(gate):
                time.sleep(0.01)

    write_soft_labels(produce, out, num_samples={N}, num_classes={C}, temperature=2.0,
                      shard_rows={ROWS}, teacher={{"file": "t.onnx", "sha256": "ab" * 32}},
                      data={{"kind": "arrays", "path": "train.npz"}})
    print("done", flush=True)
    """
)


def start(script: Path, out: Path, gate: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(script), str(out), str(gate)], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})


def test_two_exporters_racing_into_one_folder(tmp_path):
    script, out, gate = tmp_path / "child.py", tmp_path / "cache", tmp_path / "gate"
    script.write_text(GATED)
    racers = [start(script, out, gate), start(script, out, gate)]
    try:
        # The loser fails as soon as it tries the folder; the winner is held at its gate.
        deadline = time.monotonic() + 120
        while all(p.poll() is None for p in racers):
            assert time.monotonic() < deadline, "neither exporter gave up"
            time.sleep(0.05)
        loser = next(p for p in racers if p.poll() is not None)
        winner = next(p for p in racers if p is not loser)
        _, err = loser.communicate(timeout=60)
        assert loser.returncode == 1
        assert "CacheError" in err and "is being written by another export" in err
        assert f"pid {winner.pid}" in err or "pid unknown" in err
        assert "was not written" not in err
        assert winner.poll() is None  # the winner was never disturbed
        gate.touch()
        stdout, err = winner.communicate(timeout=120)
        assert winner.returncode == 0, err
        assert stdout.rstrip().endswith("done")
    finally:
        for p in racers:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert files(out) == CACHE_FILES  # no receipts, lock or temporary files left
    assert verify_cache(out).ok


def test_a_cli_export_into_a_folder_being_written_fails_at_once(tmp_path, teacher, cli):
    script, out, gate = tmp_path / "child.py", tmp_path / "cache", tmp_path / "gate"
    script.write_text(GATED)
    with start(script, out, gate) as first:
        try:
            assert first.stdout is not None and first.stdout.readline() == "batch\n"
            code, _, err = cli(*export_args(teacher, out))
            one_line_error(code, err, f"{out}: is being written by another export (pid {first.pid})")
            gate.touch()
            first.communicate(timeout=120)
        finally:
            if first.poll() is None:
                first.kill()
    assert first.returncode == 0 and files(out) == CACHE_FILES and verify_cache(out).ok


def test_torchrun_into_a_locked_folder_fails_on_every_rank(tmp_path, teacher):
    import fcntl

    out = tmp_path / "cache"
    out.mkdir()
    with open(out / ".export.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("4242 " + os.uname().nodename + "\n")
        held.flush()
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        done = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
             "-m", "calibrate_teacher", *map(str, export_args(teacher, out))],
            capture_output=True, text=True, timeout=180,
            env={**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        )
    assert done.returncode != 0
    assert "is being written by another export (pid 4242)" in done.stderr
    assert "rank 0 could not claim this folder" in done.stderr  # rank 1 was told, not left waiting
    assert files(out) == [".export.lock"]


def test_file_systems_without_locking_still_export(tmp_path, monkeypatch):
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    assert write(tmp_path / "c").complete and files(tmp_path / "c") == CACHE_FILES


# --- 4. the same request over a complete cache succeeds and changes nothing ---------------------


def test_same_request_over_a_complete_cache_is_a_no_op(cache):
    before = contents(cache)
    # what a run SIGKILLed right after its manifest completed leaves behind
    for name in (".shard-00000.receipt.json", ".shard-00002.receipt.json", ".export.lock",
                 ".manifest.json.x1y2.tmp"):
        (cache / name).write_text("{}")
    notes, producer = [], Rows()
    manifest = write(cache, producer, notify=notes.append)
    assert producer.requested == [] and notes == [f"{cache}: already complete; nothing to do"]
    assert manifest == read_manifest(cache)
    assert contents(cache) == before  # receipts gone, every byte (created_at too) unchanged
    with pytest.raises(OutputExistsError, match=r"different temperature.*--overwrite"):
        write_soft_labels(Rows(), cache, num_samples=N, num_classes=C, temperature=3.0,
                          shard_rows=ROWS, teacher={"file": "t.onnx", "sha256": "ab" * 32},
                          data={"kind": "arrays", "path": "train.npz"})
    assert contents(cache) == before


def test_same_request_over_a_cache_missing_a_shard_is_refused(cache):
    (cache / "shard-00001.safetensors").unlink()
    with pytest.raises(CacheError, match=r"shard-00001\.safetensors: missing.*--overwrite"):
        write(cache)


def test_cli_retry_after_complete_exits_0(tmp_path, teacher, cli):
    out = tmp_path / "cache"
    code, _, err = cli(*export_args(teacher, out))
    assert code == 0, err
    before = contents(out)
    (out / ".shard-00001.receipt.json").write_text("{}")
    code, stdout, err = cli(*export_args(teacher, out))
    assert code == 0, err
    assert "already complete; nothing to do" in err and "written to" not in err
    assert "complete" in stdout
    assert contents(out) == before
    code, stdout, err = cli(*export_args(teacher, out, "--json"))
    assert code == 0 and json.loads(stdout)["manifest"] == json.loads(before["manifest.json"])
    code, _, err = cli(*export_args(teacher, out, "--top-k", "2"))
    one_line_error(code, err, "Error (output exists)", "different layout", "--overwrite")
    assert contents(out) == before


# --- 5. data paths compare resolved ----------------------------------------------------------


def test_resume_with_another_spelling_of_the_data_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    write(tmp_path / "reference")
    with pytest.raises(RuntimeError, match="simulated"):
        write(tmp_path / "cache", Rows(fail_at=36))
    for spelling in (str(tmp_path / "train.npz"), "sub/../train.npz"):
        data = {"kind": "arrays", "path": spelling}
        assert read_manifest(tmp_path / "cache").complete is False
        producer = Rows()
        if spelling == "sub/../train.npz":
            manifest = write(tmp_path / "cache", producer, data=data)
            assert producer.requested == list(range(32, 40))  # shards 0 and 1 were kept
            assert manifest.data["source"] == {"kind": "arrays", "path": "train.npz"}
        else:  # a different file is still a different data source
            with pytest.raises(CacheError, match="data source"):
                write(tmp_path / "cache", producer, data={"kind": "arrays", "path": "other.npz"})
    drop = {"manifest.json"}
    assert {k: v for k, v in contents(tmp_path / "cache").items() if k not in drop} == {
        k: v for k, v in contents(tmp_path / "reference").items() if k not in drop
    }
    # and the retry over the complete cache, in yet another spelling
    notes = []
    write(tmp_path / "cache", data={"kind": "arrays", "path": str(tmp_path / "train.npz")}, notify=notes.append)
    assert notes and "already complete" in notes[0]


def test_cli_export_records_the_resolved_data_path(tmp_path, teacher, cli, monkeypatch):
    monkeypatch.chdir(teacher["data"].parent)
    (teacher["data"].parent / "sub").mkdir(exist_ok=True)
    out = tmp_path / "cache"
    base = ["export-soft-labels", teacher["teacher"], "--out", out, "-t", "1.5", "--shard-rows", "16",
            "--batch-size", "4", "--device", "cpu"]
    assert cli(*base, "--data", "train.npz")[0] == 0
    assert read_manifest(out).data["source"]["path"] == str(teacher["data"].resolve())
    for spelling in (teacher["data"].resolve(), "./sub/../train.npz"):
        code, _, err = cli(*base, "--data", spelling)
        assert code == 0 and "already complete" in err, err


def test_export_resumes_with_the_absolute_data_path(tmp_path, teacher, monkeypatch):
    monkeypatch.chdir(teacher["data"].parent)
    kw = dict(temperature=1.5, shard_rows=16)
    model = TeacherSpec(teacher["teacher"], device="cpu")
    export_soft_labels(model, DataSpec("train.npz", batch_size=4), tmp_path / "reference", **kw)
    seen = []

    def stop_in_shard_one(done, total):
        seen.append(done)
        if sum(seen) > 20:
            raise RuntimeError("simulated")

    with pytest.raises(RuntimeError, match="simulated"):
        export_soft_labels(model, DataSpec("train.npz", batch_size=4), tmp_path / "cache",
                           progress=stop_in_shard_one, **kw)
    totals = []
    export_soft_labels(model, DataSpec(teacher["data"].resolve(), batch_size=4), tmp_path / "cache",
                       progress=lambda done, total: totals.append(total), **kw)
    assert totals[0] == 45 - 16  # shard 0 was kept
    drop = {"manifest.json"}
    assert {k: v for k, v in contents(tmp_path / "cache").items() if k not in drop} == {
        k: v for k, v in contents(tmp_path / "reference").items() if k not in drop
    }


# --- 6. a failed export leaves --out as it was ----------------------------------------------


@pytest.mark.parametrize("existing", [False, True], ids=["new-out", "empty-out"])
def test_failed_exports_leave_out_as_it_was(tmp_path, teacher, cli, existing):
    out = tmp_path / "a" / "b" / "cache"
    if existing:
        out.mkdir(parents=True)
    bad_teacher = tmp_path / "bad.pt"
    bad_teacher.write_bytes(b"not a model")
    bad_data = tmp_path / "bad.npz"
    bad_data.write_bytes(b"not arrays")
    nan_data = tmp_path / "nan.npz"
    inputs, labels = save_arrays(nan_data, n=45)
    inputs[3] = float("nan")
    import numpy as np

    np.savez(nan_data, inputs=inputs, labels=labels)
    cases = [
        ["export-soft-labels", bad_teacher, "--data", teacher["data"], "--out", out, "-t", "1.5"],
        ["export-soft-labels", teacher["teacher"], "--data", bad_data, "--out", out, "-t", "1.5"],
        ["export-soft-labels", teacher["teacher"], "--data", teacher["data"], "--out", out, "-t", "1.5",
         "--top-k", "5", "--device", "cpu"],
        ["export-soft-labels", teacher["teacher"], "--data", nan_data, "--out", out, "-t", "1.5",
         "--device", "cpu"],  # fails inside the first shard
    ]
    for args in cases:
        code, _, err = cli(*args)
        one_line_error(code, err)
        if existing:
            assert files(out) == []
        else:
            assert not (tmp_path / "a").exists(), args


def test_failure_in_the_first_shard_removes_what_the_export_made(tmp_path):
    with pytest.raises(RuntimeError, match="simulated"):
        write(tmp_path / "new" / "cache", Rows(fail_at=2))
    assert files(tmp_path) == []
    with pytest.raises(RuntimeError, match="simulated"):
        write(tmp_path / "cache", Rows(fail_at=20))  # after shard 0: kept, resumable
    assert ".shard-00000.receipt.json" in files(tmp_path / "cache")
    assert ".export.lock" not in files(tmp_path / "cache")
    assert write(tmp_path / "cache").complete


# --- 7. file system errors are one line naming the path ----------------------------------------


def test_out_that_is_a_file_or_under_a_file(tmp_path, teacher, cli):
    (tmp_path / "file").write_text("x")
    code, _, err = cli(*export_args(teacher, tmp_path / "file"))
    assert code == 2 and "is a" in err and "file" in err  # Typer's own check of --out (a usage error)
    with pytest.raises(InputError, match="file: exists and is not a folder"):
        write(tmp_path / "file")
    code, _, err = cli(*export_args(teacher, tmp_path / "file" / "cache"))
    one_line_error(code, err, f"{tmp_path / 'file' / 'cache'}: cannot create this folder (Not a directory")
    with pytest.raises(OutputError, match="cannot create this folder"):
        write(tmp_path / "file" / "cache")
    assert (tmp_path / "file").read_text() == "x"


def test_read_only_parent_fails_before_the_teacher_loads(tmp_path, teacher, cli, monkeypatch):
    import calibrate_teacher.teachers as teachers

    real_mkdir = os.mkdir

    def read_only(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path)):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", read_only)
    monkeypatch.setattr(teachers, "load_teacher", lambda *a, **k: pytest.fail("the teacher was loaded"))
    code, _, err = cli(*export_args(teacher, tmp_path / "cache"))
    one_line_error(code, err, "Error (cannot write)", f"{tmp_path / 'cache'}: cannot create this folder",
                   "Read-only file system")
    assert files(tmp_path) == []


def test_permission_denied_in_an_existing_folder(tmp_path, teacher, cli, monkeypatch):
    out = tmp_path / "cache"
    out.mkdir()
    real_open = os.open

    def denied(path, *args, **kwargs):
        if str(path).startswith(str(out)):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", denied)
    code, _, err = cli(*export_args(teacher, out))
    one_line_error(code, err, f"{out}: cannot write in this folder (Permission denied)")
    monkeypatch.undo()
    assert files(out) == []


def full_disk_on_shard(monkeypatch, number):
    from calibrate_teacher.soft_labels import _shards

    real = _shards.write_shard_bytes

    def write_shard_bytes(fh, arrays, metadata):
        if metadata["shard"] == str(number):
            fh.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fh, arrays, metadata)

    monkeypatch.setattr(_shards, "write_shard_bytes", write_shard_bytes)


def test_no_space_left_mid_export_keeps_finished_shards(tmp_path, monkeypatch):
    write(tmp_path / "reference")
    full_disk_on_shard(monkeypatch, 1)
    with pytest.raises(OutputError, match=r"shard-00001\.safetensors: No space left on device.*resume"):
        write(tmp_path / "cache")
    assert files(tmp_path / "cache") == [".shard-00000.receipt.json", "manifest.json", "shard-00000.safetensors"]
    monkeypatch.undo()
    producer = Rows()
    write(tmp_path / "cache", producer)
    assert producer.requested == list(range(16, 40))
    drop = {"manifest.json"}
    assert {k: v for k, v in contents(tmp_path / "cache").items() if k not in drop} == {
        k: v for k, v in contents(tmp_path / "reference").items() if k not in drop
    }


def test_no_space_left_is_one_line_from_the_cli(tmp_path, teacher, cli, monkeypatch):
    full_disk_on_shard(monkeypatch, 0)
    out = tmp_path / "cache"
    code, _, err = cli(*export_args(teacher, out))
    one_line_error(code, err, f"{out / 'shard-00000.safetensors'}: No space left on device", "free disk space")
    assert not out.exists()  # nothing was finished: the folder is gone again


# --- 8. Ctrl-C leaves a resumable cache, promptly ---------------------------------------------


def test_ctrl_c_mid_shard_surfaces_promptly_and_resumes(tmp_path, monkeypatch):
    from calibrate_teacher.soft_labels import _shards

    write(tmp_path / "reference")
    real = _shards.write_shard_bytes

    def slow_write(fh, arrays, metadata):  # shard 1 is still being written when Ctrl-C lands
        if metadata["shard"] == "1":
            time.sleep(0.5)
        return real(fh, arrays, metadata)

    monkeypatch.setattr(_shards, "write_shard_bytes", slow_write)
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        write(tmp_path / "cache", Rows(fail_at=36, error=KeyboardInterrupt))
    assert time.monotonic() - started < 30
    assert files(tmp_path / "cache") == [
        ".shard-00000.receipt.json", ".shard-00001.receipt.json", "manifest.json",
        "shard-00000.safetensors", "shard-00001.safetensors",
    ]  # both finished shards kept their receipts; no lock or temporary file is left
    monkeypatch.undo()
    producer = Rows()
    write(tmp_path / "cache", producer)
    assert producer.requested == list(range(32, 40))
    drop = {"manifest.json"}
    assert {k: v for k, v in contents(tmp_path / "cache").items() if k not in drop} == {
        k: v for k, v in contents(tmp_path / "reference").items() if k not in drop
    }
