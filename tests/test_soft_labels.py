"""The soft-label cache: writer, reader, layouts, resume and refusals, kd_loss, SoftLabelDataset."""

from __future__ import annotations

import json
import pickle
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.numpy import load_file

from calibrate_teacher.errors import CacheError, InputError, InvalidValueError, OutputExistsError
from calibrate_teacher.soft_labels import (
    Calibration,
    SoftLabelCache,
    SoftLabelDataset,
    choose_layout,
    kd_loss,
    read_manifest,
    write_soft_labels,
)

GOLDEN = Path(__file__).parent / "golden"


@dataclass(frozen=True)
class Batch:
    indices: torch.Tensor
    logits: torch.Tensor
    labels: torch.Tensor
    keys: tuple[str, ...]


class Producer:
    """Serves rows of in-memory logits in batches, counting the rows it was asked for."""

    def __init__(self, logits, labels, keys, batch_size=8, fail_at_row=None):
        self.logits, self.labels, self.keys = logits, labels, keys
        self.batch_size, self.fail_at_row = batch_size, fail_at_row
        self.requested: list[int] = []

    def __call__(self, rows):
        rows = list(rows)
        self.requested.extend(rows)
        for start in range(0, len(rows), self.batch_size):
            part = rows[start : start + self.batch_size]
            if self.fail_at_row is not None and self.fail_at_row in part:
                raise RuntimeError("simulated crash")
            idx = torch.tensor(part, dtype=torch.int64)
            yield Batch(idx, self.logits[idx], self.labels[idx], tuple(self.keys[i] for i in part))


def make_data(n=50, c=7, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g) * scale
    labels = torch.randint(0, c, (n,), generator=g)
    keys = [f"class_{int(y)}/img_{i:04d}.png" for i, y in enumerate(labels)]
    return logits, labels, keys


def write(tmp, logits, labels, keys, *, name="cache", t=1.7, **kw):
    producer = kw.pop("producer", None) or Producer(logits, labels, keys)
    kw.setdefault("shard_rows", 16)
    manifest = write_soft_labels(
        producer, tmp / name, num_samples=len(keys), num_classes=logits.shape[1],
        temperature=t, teacher={"file": "t.onnx", "sha256": "ab" * 32, "format": "onnx"},
        data={"kind": "arrays", "path": "train.npz"}, **kw,
    )
    return manifest, producer


def dir_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "manifest.json"}


# --- round trip -----------------------------------------------------------------------------


def test_dense_round_trip_matches_logits_over_t(tmp_path):
    logits, labels, keys = make_data()
    manifest, producer = write(tmp_path, logits, labels, keys)
    assert producer.requested == list(range(50))  # each row computed once, in order
    assert manifest.complete and manifest.num_shards == 4
    assert [(s.first_row, s.rows) for s in manifest.shards] == [(0, 16), (16, 16), (32, 16), (48, 2)]
    cache = SoftLabelCache(tmp_path / "cache")
    assert len(cache) == 50 and cache.num_classes == 7 and cache.temperature == 1.7
    ref = logits / 1.7
    got = cache.logits()[:]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=2e-3)  # float16 storage
    # bit-exact against float16 rounding of the same float32 division
    assert torch.equal(got, ref.to(torch.float16).to(torch.float32))
    torch.testing.assert_close(cache.probs()[:], torch.softmax(ref, 1), atol=2e-3, rtol=0)
    torch.testing.assert_close(cache[3], torch.softmax(ref[3], 0), atol=2e-3, rtol=0)
    assert torch.equal(cache.labels, labels)
    assert cache.keys == tuple(keys)
    assert cache.label(49) == int(labels[49]) and cache.label(-1) == int(labels[-1])
    torch.testing.assert_close(cache.by_key(keys[20]), cache[20])
    assert cache.index_of(keys[33]) == 33
    # views: lists, tensors, negative rows, across shard boundaries, extra temperature
    rows = [49, 0, 17, 16, 15, -2]
    torch.testing.assert_close(cache.logits()[rows], got[[49, 0, 17, 16, 15, 48]])
    torch.testing.assert_close(cache.logits()[torch.tensor([5, 40])], got[[5, 40]])
    torch.testing.assert_close(
        cache.probs(temperature=2.5)[:], torch.softmax(got / 2.5, 1), rtol=1e-6, atol=1e-7
    )
    with pytest.raises(IndexError):
        cache.logits()[50]
    with pytest.raises(IndexError):
        cache.logits()[[0, 50]]
    with pytest.raises(KeyError):
        cache.by_key("nope")


def test_shards_are_plain_safetensors_with_exact_values(tmp_path):
    logits, labels, keys = make_data(n=20, c=5)
    write(tmp_path, logits, labels, keys, t=2.0, shard_rows=8)
    scaled = (logits / 2.0).numpy()
    for s, (first, rows) in enumerate([(0, 8), (8, 8), (16, 4)]):
        path = tmp_path / "cache" / f"shard-{s:05d}.safetensors"
        tensors = load_file(path)  # the safetensors library reads our bytes
        assert sorted(tensors) == ["label", "logits", "lse", "sample_index"]
        assert tensors["sample_index"].dtype == np.int64 and tensors["label"].dtype == np.int64
        np.testing.assert_array_equal(tensors["sample_index"], np.arange(first, first + rows))
        np.testing.assert_array_equal(tensors["label"], labels[first : first + rows].numpy())
        np.testing.assert_array_equal(
            tensors["logits"], scaled[first : first + rows].astype(np.float16)
        )
        lse = np.log(np.exp(scaled[first : first + rows].astype(np.float64)).sum(1))
        assert tensors["lse"].dtype == np.float32
        np.testing.assert_allclose(tensors["lse"], lse, rtol=1e-6)
        with safe_open(str(path), framework="np") as fh:
            meta = fh.metadata()
        assert meta["shard"] == str(s) and meta["first_row"] == str(first)
        assert meta["temperature"] == "2.0" and meta["layout"] == "dense"
    text = (tmp_path / "cache" / "keys.txt").read_text(encoding="utf-8")
    assert text == "".join(k + "\n" for k in keys)


def test_topk_probabilities_match_dense_on_kept_classes(tmp_path):
    logits, labels, keys = make_data(n=40, c=12, scale=2.0)
    write(tmp_path, logits, labels, keys, name="dense", top_k=0)
    write(tmp_path, logits, labels, keys, name="top3", top_k=3)
    dense, top = SoftLabelCache(tmp_path / "dense"), SoftLabelCache(tmp_path / "top3")
    assert top.manifest.layout.kind == "topk" and top.manifest.layout.k == 3
    shard = load_file(tmp_path / "top3" / "shard-00000.safetensors")
    assert shard["topk_index"].dtype == np.int16 and shard["topk_logits"].shape == (16, 3)
    exact = torch.softmax((logits / 1.7).double(), 1)
    p_top, p_dense = top.probs()[:].double(), dense.probs()[:].double()
    kept = torch.topk(logits, 3, dim=1).indices
    np.testing.assert_array_equal(shard["topk_index"], kept[:16].numpy())
    # kept classes: exact probabilities up to float16 rounding of the stored logits
    torch.testing.assert_close(p_top.gather(1, kept), exact.gather(1, kept), atol=2e-3, rtol=0)
    torch.testing.assert_close(p_top.gather(1, kept), p_dense.gather(1, kept), atol=2e-3, rtol=0)
    # the tail mass survives, spread evenly over the 9 other classes
    tail = 1 - exact.gather(1, kept).sum(1)
    torch.testing.assert_close(1 - p_top.gather(1, kept).sum(1), tail, atol=3e-3, rtol=0)
    mask = torch.ones_like(p_top, dtype=torch.bool).scatter(1, kept, False)
    others = p_top[mask].view(40, 9)
    torch.testing.assert_close(others, others[:, :1].expand(-1, 9))
    torch.testing.assert_close(p_top.sum(1), torch.ones(40, dtype=torch.float64), atol=1e-6, rtol=0)
    # one row at a time (the Dataset path) gives the same bits as batched access
    view = top.logits()
    assert torch.equal(torch.stack([view[i] for i in range(40)]), view[:])
    assert torch.equal(torch.stack([top[i] for i in range(40)]), top.probs()[:])


def test_topk_index_is_int32_beyond_int16(tmp_path):
    logits, labels, keys = make_data(n=3, c=40000, scale=1.0)
    logits[0, 39999] = 50.0  # a top class whose index needs int32
    manifest, _ = write(tmp_path, logits, labels, keys)
    assert manifest.layout.kind == "topk" and manifest.layout.k == 10  # default for C > 1000
    shard = load_file(tmp_path / "cache" / "shard-00000.safetensors")
    assert shard["topk_index"].dtype == np.int32 and shard["topk_index"][0, 0] == 39999
    assert int(SoftLabelCache(tmp_path / "cache").logits()[0].argmax()) == 39999


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 30),
    c=st.integers(2, 9),
    shard_rows=st.integers(1, 12),
    t=st.floats(0.1, 10.0),
    seed=st.integers(0, 2**16),
    # no lone surrogates: UTF-8 cannot store them (refused up front, see test_bad_logits_are_refused...)
    keys=st.lists(
        st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r"), max_size=8),
        min_size=30, max_size=30,
    ),
)
def test_write_read_round_trip_is_bit_exact(n, c, shard_rows, t, seed, keys):
    logits, labels, _ = make_data(n=n, c=c, seed=seed, scale=5.0)
    keys = keys[:n]
    with tempfile.TemporaryDirectory() as tmp:
        write(Path(tmp), logits, labels, keys, t=t, shard_rows=shard_rows, top_k=0)
        cache = SoftLabelCache(Path(tmp) / "cache")
        assert torch.equal(cache.logits()[:], (logits / t).to(torch.float16).float())
        assert cache.keys == tuple(keys) and torch.equal(cache.labels, labels)
        assert cache.manifest.temperature == t


def test_choose_layout_defaults_and_refusals():
    assert choose_layout(1000, None, 10).kind == "dense"
    top = choose_layout(1001, None, 10)
    assert (top.kind, top.k, top.index_dtype) == ("topk", 10, "int16")
    assert choose_layout(40000, 5, 10).index_dtype == "int32"
    assert choose_layout(5000, 0, 10).kind == "dense"
    for bad in (-1, 7, 8):
        with pytest.raises(InvalidValueError, match="--top-k"):
            choose_layout(7, bad, 10)
    with pytest.raises(InvalidValueError, match="--shard-rows"):
        choose_layout(7, None, 0)


# --- refusals, resume ----------------------------------------------------------------------


def test_refuses_complete_cache_without_overwrite(tmp_path):
    logits, labels, keys = make_data(n=10)
    write(tmp_path, logits, labels, keys)
    before = dir_bytes(tmp_path / "cache")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        write(tmp_path, logits, labels, keys, t=3.0)
    assert dir_bytes(tmp_path / "cache") == before
    manifest, _ = write(tmp_path, logits * 2, labels, keys, t=3.0, overwrite=True, shard_rows=4)
    assert manifest.temperature == 3.0 and manifest.num_shards == 3
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [
        "keys.txt", "manifest.json", *(f"shard-{s:05d}.safetensors" for s in range(3))
    ]
    torch.testing.assert_close(SoftLabelCache(tmp_path / "cache").logits()[:], logits * 2 / 3.0, atol=4e-3, rtol=1e-3)


def test_refuses_non_cache_folder_and_file(tmp_path):
    logits, labels, keys = make_data(n=4)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty"):
        write(tmp_path, logits, labels, keys)
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        write(tmp_path, logits, labels, keys, name="file")
    assert (tmp_path / "cache" / "notes.txt").read_text() == "mine"


def interrupted(tmp_path, logits, labels, keys, *, fail_at_row, **kw):
    crashing = Producer(logits, labels, keys, fail_at_row=fail_at_row)
    with pytest.raises(RuntimeError, match="simulated crash"):
        write(tmp_path, logits, labels, keys, producer=crashing, **kw)
    return crashing


def test_resume_computes_only_missing_shards_and_matches_uninterrupted(tmp_path):
    logits, labels, keys = make_data()
    write(tmp_path, logits, labels, keys, name="reference")
    interrupted(tmp_path, logits, labels, keys, fail_at_row=37)  # dies inside shard 2
    assert not read_manifest(tmp_path / "cache").complete
    with pytest.raises(CacheError, match="incomplete"):
        SoftLabelCache(tmp_path / "cache")
    manifest, producer = write(tmp_path, logits, labels, keys)
    assert producer.requested == list(range(32, 50))  # shards 0 and 1 were kept
    assert manifest.complete
    assert dir_bytes(tmp_path / "cache") == dir_bytes(tmp_path / "reference")
    ref, got = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("reference", "cache"))
    ref.pop("created_at"), got.pop("created_at")
    assert got == ref


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"t": 2.5}, "temperature"),
        ({"top_k": 2}, "layout"),
        ({"shard_rows": 8}, "layout"),
        ({"teacher_sha": "cd" * 32}, "teacher"),
    ],
)
def test_never_extends_an_unfinished_cache_of_another_run(tmp_path, change, message):
    logits, labels, keys = make_data(n=40)
    interrupted(tmp_path, logits, labels, keys, fail_at_row=20)
    before = dir_bytes(tmp_path / "cache")
    kw = dict(change)
    sha = kw.pop("teacher_sha", "ab" * 32)
    producer = Producer(logits, labels, keys)
    with pytest.raises(CacheError, match=message):
        write_soft_labels(
            producer, tmp_path / "cache", num_samples=40, num_classes=7,
            temperature=kw.pop("t", 1.7), teacher={"file": "t.onnx", "sha256": sha, "format": "onnx"},
            data={"kind": "arrays", "path": "train.npz"}, shard_rows=kw.pop("shard_rows", 16), **kw,
        )
    assert producer.requested == [] and dir_bytes(tmp_path / "cache") == before
    # --no-resume starts over instead
    manifest, producer = write(tmp_path, logits, labels, keys, t=2.5, resume=False)
    assert producer.requested == list(range(40)) and manifest.temperature == 2.5


def test_refuses_data_of_another_size_and_source(tmp_path):
    logits, labels, keys = make_data(n=40)
    interrupted(tmp_path, logits, labels, keys, fail_at_row=20)
    with pytest.raises(CacheError, match="N = 40 vs 39"):
        write(tmp_path, logits[:39], labels[:39], keys[:39])
    with pytest.raises(CacheError, match=r"data source \(path"):
        write_soft_labels(
            Producer(logits, labels, keys), tmp_path / "cache", num_samples=40, num_classes=7,
            temperature=1.7, teacher={"file": "t.onnx", "sha256": "ab" * 32, "format": "onnx"},
            data={"kind": "arrays", "path": "other.npz"}, shard_rows=16,
        )


def test_bad_logits_are_refused_with_the_sample_key(tmp_path):
    logits, labels, keys = make_data(n=10)
    logits[6, 2] = float("nan")
    with pytest.raises(InvalidValueError, match="img_0006"):
        write(tmp_path, logits, labels, keys)
    logits, labels, keys = make_data(n=10)
    logits[3, 0] = 70000.0
    with pytest.raises(InvalidValueError, match="float16"):
        write(tmp_path, logits, labels, keys, name="big", t=1.0)
    with pytest.raises(InvalidValueError, match="line break"):
        write(tmp_path, *make_data(n=3)[:2], ["a", "b\nc", "d"], name="keys")
    keys = [f"k{i}" for i in range(40)]
    keys[20] = "\ud800"  # not a surrogateescape byte: refused in its shard, not after the last one
    producer = Producer(*make_data(n=40)[:2], keys)
    with pytest.raises(InvalidValueError, match=r"'\\ud800' \(row 20\) holds a lone surrogate"):
        write(tmp_path, *make_data(n=40)[:2], keys, name="surrogate", producer=producer)
    assert producer.requested == list(range(32))
    with pytest.raises(InvalidValueError, match="temperature"):
        write(tmp_path, *make_data(n=3), name="t0", t=0.0)


def test_producer_returning_wrong_rows_is_an_error(tmp_path):
    logits, labels, keys = make_data(n=10)

    def shuffled(rows):
        rows = list(rows)[::-1]
        idx = torch.tensor(rows)
        yield Batch(idx, logits[idx], labels[idx], tuple(keys[i] for i in rows))

    with pytest.raises(CacheError, match="expected"):
        write(tmp_path, logits, labels, keys, producer=shuffled)

    def short(rows):
        idx = torch.tensor(list(rows)[:-1])
        yield Batch(idx, logits[idx], labels[idx], tuple(keys[i] for i in idx.tolist()))

    with pytest.raises(CacheError, match="yielded 9"):
        write(tmp_path, logits, labels, keys, name="short", producer=short)


# --- golden format --------------------------------------------------------------------------


def golden_cache(tmp_path):
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0], [1.0, 1.0, 1.0]])
    labels = torch.tensor([0, 1, -1])
    cal = Calibration(1.5, method="fit", objective="ece", metrics={"ece": 0.0123}, report="fit.json")
    write_soft_labels(
        Producer(logits, labels, ["a.png", "b.png", "c.png"]), tmp_path / "golden",
        num_samples=3, num_classes=3, temperature=cal,
        teacher={"file": "teacher.onnx", "sha256": "0" * 64, "format": "onnx"},
        data={"kind": "arrays", "path": "train.npz"}, shard_rows=2,
    )
    return tmp_path / "golden"


def test_manifest_and_shard_header_match_golden_files(tmp_path):
    folder = golden_cache(tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["created_at"].endswith("Z")
    manifest["created_at"] = "<created_at>"
    manifest["tool_version"] = "<tool_version>"
    assert manifest == json.loads((GOLDEN / "soft_labels_manifest.json").read_text())
    raw = (folder / "shard-00000.safetensors").read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = raw[8 : 8 + length]
    assert header == (GOLDEN / "soft_labels_shard_header.json").read_bytes()
    assert length % 8 == 0


# --- kd_loss ---------------------------------------------------------------------------------


def reference_kd(student, teacher, tau, alpha, labels):
    loss = 0.0
    for s_row, t_row, y in zip(student.double().tolist(), teacher.double().tolist(), labels, strict=True):
        t = np.exp(np.array(t_row) / tau - np.logaddexp.reduce(np.array(t_row) / tau))
        log_s = np.array(s_row) / tau - np.logaddexp.reduce(np.array(s_row) / tau)
        kl = float(np.sum(t * (np.log(t) - log_s)))
        ce = -(np.array(s_row)[y] - np.logaddexp.reduce(np.array(s_row)))
        loss += alpha * tau**2 * kl + (1 - alpha) * ce
    return loss / len(labels)


@pytest.mark.parametrize(("tau", "alpha"), [(1.0, 1.0), (4.0, 1.0), (2.0, 0.3), (0.5, 0.0)])
def test_kd_loss_matches_a_plain_loop(tau, alpha):
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5) * 2
    labels = torch.randint(0, 5, (6,))
    got = kd_loss(student, teacher, tau=tau, alpha=alpha, labels=labels)
    assert got.dtype == torch.float64
    assert float(got) == pytest.approx(reference_kd(student, teacher, tau, alpha, labels.tolist()), rel=1e-6)


def test_kd_loss_gradients_and_refusals():
    student = torch.zeros(2, 3, requires_grad=True)
    teacher = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    kd_loss(student, teacher, tau=2.0).backward()
    assert student.grad is not None and float(student.grad[0, 0]) < 0 < float(student.grad[0, 1])
    with pytest.raises(InvalidValueError, match="labels"):
        kd_loss(student, teacher, alpha=0.5)
    with pytest.raises(InvalidValueError, match="tau"):
        kd_loss(student, teacher, tau=0.0)
    with pytest.raises(InvalidValueError, match="alpha"):
        kd_loss(student, teacher, alpha=1.5)
    with pytest.raises(InvalidValueError, match="both be"):
        kd_loss(student, teacher[:, :2])


# --- SoftLabelDataset --------------------------------------------------------------------------


def test_soft_label_dataset_adds_teacher_logits_and_checks_order(tmp_path):
    logits, labels, keys = make_data(n=20)
    write(tmp_path, logits, labels, keys, top_k=3)
    inputs = torch.randn(20, 4)
    base = [(inputs[i], int(labels[i])) for i in range(20)]
    ds = SoftLabelDataset(base, tmp_path / "cache", keys=keys)
    x, y, t = ds[7]
    assert torch.equal(x, inputs[7]) and y == int(labels[7]) and t.shape == (7,)
    torch.testing.assert_close(t, ds.cache.logits()[7])
    dict_ds = SoftLabelDataset([{"x": i} for i in range(20)], ds.cache, check_labels=False)
    assert set(dict_ds[0]) == {"x", "teacher_logits"}
    assert SoftLabelDataset(list(range(20)), ds.cache)[5][0] == 5
    # a copy for DataLoader workers maps the shards again and reads the same rows
    clone = pickle.loads(pickle.dumps(ds))
    torch.testing.assert_close(clone[7][2], t)
    loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=0)
    _, yb, tb = next(iter(loader))
    assert tb.shape == (8, 7) and torch.equal(yb, labels[:8])
    with pytest.raises(CacheError, match="19 samples"):
        SoftLabelDataset(base[:19], ds.cache)
    with pytest.raises(CacheError, match="row 2"):
        SoftLabelDataset(base, ds.cache, keys=[*keys[:2], "other", *keys[3:]])
    j = next(i for i in range(20) if int(labels[i]) != int(labels[0]))
    swapped = list(base)
    swapped[0], swapped[j] = base[j], base[0]
    with pytest.raises(CacheError, match="order differs"):
        SoftLabelDataset(swapped, ds.cache)[0]


def test_calibration_from_fit_report(tmp_path):
    report = tmp_path / "fit.json"
    report.write_text(json.dumps({
        "temperature": 2.25, "objective": "ece",
        "after": {"ece": 0.01, "nll": 0.4, "bins": [1, 2], "verdict": "overconfident", "flag": True},
    }))
    cal = Calibration.from_report(report)
    assert cal == Calibration(2.25, "fit", "ece", {"ece": 0.01, "nll": 0.4}, "fit.json")
    report.write_text(json.dumps({"objective": "ece"}))
    with pytest.raises(InputError, match="temperature"):
        Calibration.from_report(report)
    report.write_text("{not json")
    with pytest.raises(InputError, match="JSON"):
        Calibration.from_report(report)
    with pytest.raises(InputError, match="no such fit report"):
        Calibration.from_report(tmp_path / "missing.json")
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(InvalidValueError):
            Calibration(bad)


def test_tuples_in_descriptions_and_undecodable_keys_survive_resume(tmp_path):
    logits, labels, keys = make_data(n=20)
    keys[3] = "bad-\udcff-name.png"  # a file name that was not valid UTF-8 (surrogateescape)
    data = {"kind": "arrays", "input_shape": (3, 8, 8)}

    def run(producer, t=1.7):
        return write_soft_labels(producer, tmp_path / "c", num_samples=20, num_classes=7,
                                 temperature=t, data=data, shard_rows=8)

    with pytest.raises(RuntimeError):
        run(Producer(logits, labels, keys, fail_at_row=12))
    with pytest.raises(CacheError, match="temperature"):  # not a false "data source" difference
        run(Producer(logits, labels, keys), t=2.0)
    producer = Producer(logits, labels, keys)
    manifest = run(producer)
    assert producer.requested == list(range(8, 20))
    assert manifest.data["source"] == {"kind": "arrays", "input_shape": [3, 8, 8]}
    cache = SoftLabelCache(tmp_path / "c")
    assert cache.keys == tuple(keys) and cache.index_of(keys[3]) == 3
