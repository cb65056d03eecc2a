"""The DistillKit parquet export: its log-probs are the cache's, exactly (#13). Read back with pyarrow."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pq = pytest.importorskip("pyarrow.parquet")

from test_token_cache import make_sequences, write  # noqa: E402

from calibrate_teacher.errors import CacheError, OutputExistsError  # noqa: E402
from calibrate_teacher.soft_labels import TokenSoftLabelCache  # noqa: E402
from calibrate_teacher.soft_labels.distillkit import export_distillkit  # noqa: E402


def read_rows(folder):
    rows = []
    for name in sorted(p.name for p in folder.glob("data_*.parquet")):
        rows.extend(pq.read_table(folder / name).to_pylist())
    return rows


def test_log_probs_equal_the_cache(tmp_path):
    seqs = make_sequences(n=7, vocab=300, completion_only=True)
    write(tmp_path / "c", seqs, top_k=16)
    result = export_distillkit(tmp_path / "c", tmp_path / "dk", rows_per_file=3)
    assert result.files == ("data_00000.parquet", "data_00001.parquet", "data_00002.parquet")
    table = pq.read_table(tmp_path / "dk" / "data_00000.parquet")
    assert str(table.schema.field("input_ids").type.value_type) == "uint64"
    assert str(table.schema.field("token_ids").type.value_type.value_type) == "int64"
    assert str(table.schema.field("top_values").type.value_type.value_type) == "float"
    rows = read_rows(tmp_path / "dk")
    cache = TokenSoftLabelCache(tmp_path / "c")
    assert len(rows) == len(seqs) == result.sequences
    for i, (row, s) in enumerate(zip(rows, seqs, strict=True)):
        raw = cache.rows(i)
        at = raw["position"]
        length = int(at[-1]) + 1
        assert row["input_ids"] == s.input_ids[:length].tolist()
        assert len(row["token_ids"]) == len(row["top_values"]) == len(row["labels"]) == length
        ids, values = np.array(row["token_ids"]), np.array(row["top_values"], dtype=np.float32)
        assert np.array_equal(ids[at], raw["index"])
        assert np.array_equal(values[at], raw["values"].astype(np.float32) - raw["lse"][:, None])  # bit for bit
        # and they are the teacher's log-probabilities of z / T (float64 reference; fp16 rounding of v)
        ref = torch.log_softmax(s.raw.double() / T_of(cache), dim=1).gather(1, torch.from_numpy(raw["index"]))
        np.testing.assert_allclose(values[at], ref.numpy(), atol=5e-3)
        labels = np.array(row["labels"])
        assert (labels[at] >= 0).all() and (np.delete(labels, at) == -100).all()
    assert json.loads((tmp_path / "dk" / "distillkit-teacher.json").read_text())["logprob_compressor"]["k"] == 16
    assert any("placeholder" in n for n in result.notes)


def T_of(cache):
    return cache.temperature


def test_dense_cache_exports_sorted_rows(tmp_path):
    seqs = make_sequences(n=2, vocab=40)
    write(tmp_path / "c", seqs)
    export_distillkit(tmp_path / "c", tmp_path / "dk")
    row = read_rows(tmp_path / "dk")[0]
    values = np.array(row["top_values"])
    assert values.shape == (len(seqs[0].positions), 40)
    assert (np.diff(values, axis=1) <= 0).all()
    probs = np.exp(values.astype(np.float64)).sum(1)
    np.testing.assert_allclose(probs, 1.0, atol=2e-3)


def test_refusals(tmp_path):
    write(tmp_path / "c", make_sequences(n=2, vocab=100))
    export_distillkit(tmp_path / "c", tmp_path / "dk")
    with pytest.raises(OutputExistsError):
        export_distillkit(tmp_path / "c", tmp_path / "dk")
    export_distillkit(tmp_path / "c", tmp_path / "dk", overwrite=True)
    teacher = {"file": "x", "sha256": "0" * 64, "format": "onnx", "task": "token-classification"}
    write(tmp_path / "tc", make_sequences(n=2, vocab=100), teacher=teacher)
    with pytest.raises(CacheError, match="token-classification"):
        export_distillkit(tmp_path / "tc", tmp_path / "dk2")
    assert not (tmp_path / "dk2").exists()


@pytest.mark.slow
def test_datasets_loads_the_folder_as_distillkit_does(tmp_path):
    """DistillKit opens a dataset path with ``datasets.load_dataset(path)``; rows decode as its raw top-k format."""
    datasets = pytest.importorskip("datasets")
    seqs = make_sequences(n=4, vocab=300, completion_only=True)
    write(tmp_path / "c", seqs, top_k=8)
    export_distillkit(tmp_path / "c", tmp_path / "dk", rows_per_file=2)
    ds = datasets.load_dataset(str(tmp_path / "dk"), split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert set(ds.column_names) == {"input_ids", "token_ids", "top_values", "labels", "attention_mask"}
    ds = ds.with_format("torch")
    cache = TokenSoftLabelCache(tmp_path / "c")
    for i in range(len(ds)):
        row = ds[i]
        # LogprobCompressor.decompress_to_sparse: `if "top_values" in row and "token_ids" in row: return ...`
        ids, values = row["token_ids"], row["top_values"]
        assert ids.shape == values.shape == (len(row["input_ids"]), 8)
        raw = cache.rows(i)
        expected = torch.from_numpy(raw["values"].astype(np.float32) - raw["lse"][:, None])
        assert torch.equal(values[torch.from_numpy(raw["position"].copy())], expected)
