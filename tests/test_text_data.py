"""Text classification data (#11): row readers, tokenised batches, labels, keys, sorting, memory."""

from __future__ import annotations

import json
import time
import tracemalloc

import pytest
import torch

from calibrate_teacher.data._records import open_records
from calibrate_teacher.data._tokenizer import load_tokenizer
from calibrate_teacher.data.base import DataSource
from calibrate_teacher.data.text import open_text
from calibrate_teacher.errors import InputError, InvalidValueError
from tests._tokenizer_fixtures import WORDS, trained_tokenizer, write_rows

CLASSES = ["neg", "pos", "mixed"]


def _rows(n: int = 29) -> list[dict]:
    rows = []
    for i in range(n):
        words = [WORDS[(i * 7 + j) % len(WORDS)] for j in range(1 + (i * 5) % 17)]
        text = " ".join(words)
        if i == 3:
            text = 'the "cat", sat\non a mat'  # quotes, a comma and a newline (CSV quoting)
        rows.append({"id": f"r{i:03d}", "text": text, "pair": WORDS[i % len(WORDS)], "label": CLASSES[i % 3]})
    return rows


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    trained_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def tokenizer(tok_dir):
    return load_tokenizer(tok_dir)


def _all(source, **kw):
    return list(source.batches(batch_size=kw.pop("batch_size", 8), **kw))


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ""])
def test_formats_give_identical_batches(tmp_path, tokenizer, suffix):
    rows = _rows()
    ref = open_text(write_rows(tmp_path / "a.jsonl", rows), tokenizer=tokenizer, class_names=CLASSES, id_field="id")
    other = open_text(
        write_rows(tmp_path / f"b{suffix}", rows), tokenizer=tokenizer, class_names=CLASSES, id_field="id"
    )
    assert len(other) == len(ref) == len(rows)
    for a, b in zip(_all(ref), _all(other), strict=True):
        assert a.keys == b.keys
        assert torch.equal(a.labels, b.labels)
        assert torch.equal(a.indices, b.indices)
        assert a.inputs.keys() == b.inputs.keys()
        for name in a.inputs:
            assert torch.equal(a.inputs[name], b.inputs[name])
    # Random access by position reads the same rows (parquet across row groups of 7).
    picked = [27, 3, 4, 5, 14, 0]
    (batch,) = _all(other, indices=picked)
    assert batch.keys == tuple(rows[i]["id"] for i in picked)


@pytest.mark.parametrize(("side", "types", "pair"), [("right", False, False), ("left", True, True)])
def test_batches_equal_the_tokenizers_own_padding(tmp_path, side, types, pair):
    tok = trained_tokenizer(tmp_path / "tok", padding_side=side, types=types)
    rows = _rows()
    source = open_text(
        write_rows(tmp_path / "a.jsonl", rows),
        tokenizer=tok,
        class_names=CLASSES,
        text_pair_field="pair" if pair else None,
        max_length=10,
    )
    batches = _all(source, batch_size=8)
    for k, batch in enumerate(batches):
        chunk = rows[k * 8 : k * 8 + 8]
        texts = [r["text"] for r in chunk]
        pairs = [r["pair"] for r in chunk] if pair else None
        want = tok(texts, pairs, padding="longest", truncation=True, max_length=10, return_tensors="pt")
        assert set(batch.inputs) == set(want.keys())
        for name, value in want.items():
            assert batch.inputs[name].dtype == torch.int64
            assert torch.equal(batch.inputs[name], value), name
        assert batch.labels.tolist() == [CLASSES.index(r["label"]) for r in chunk]
        assert batch.keys == tuple(str(k * 8 + i) for i in range(len(chunk)))
    assert isinstance(source, DataSource)
    assert source.description["max_length"] == 10
    assert source.description["max_length_from"] == "max_length (given)"
    assert source.notes == ()


def test_defaults_are_recorded(tmp_path, tokenizer, tok_dir):
    source = open_text(write_rows(tmp_path / "a.jsonl", _rows()), tokenizer=tok_dir, class_names=CLASSES)
    d = source.description
    assert (d["kind"], d["format"], d["max_length"], d["tokenizer"]) == ("text", "jsonl", 12, str(tok_dir))
    assert d["max_length_from"] == "tokenizer model_max_length"
    assert any("model_max_length" in n for n in source.notes)
    json.dumps(d)
    # A tokenizer with no real model_max_length: 512, said so.
    tokenizer.model_max_length = int(1e30)
    try:
        source = open_text(tmp_path / "a.jsonl", tokenizer=tokenizer, class_names=CLASSES)
    finally:
        tokenizer.model_max_length = 12
    assert source.description["max_length"] == 512
    assert any("default" in n and "--max-length" in n for n in source.notes)


def test_labels_ids_names_and_errors(tmp_path, tokenizer):
    ids = write_rows(tmp_path / "ids.csv", [{"text": "the cat", "label": i % 3} for i in range(5)])
    (batch,) = _all(open_text(ids, tokenizer=tokenizer))
    assert batch.labels.tolist() == [0, 1, 2, 0, 1]  # CSV digits are ids
    bad = write_rows(tmp_path / "bad.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "meh"}])
    with pytest.raises(
        InputError, match=r"bad\.jsonl: line 2: unknown label \(label\) 'meh'; the known names are: neg, pos, mixed"
    ):
        open_text(bad, tokenizer=tokenizer, class_names=CLASSES)
    with pytest.raises(InputError, match=r"line 1: .*'pos' is a name but no class list is known; give the class names"):
        open_text(bad, tokenizer=tokenizer)
    big = write_rows(tmp_path / "big.jsonl", [{"text": "a", "label": 3}])
    with pytest.raises(InputError, match=r"label \(label\) 3 is out of range \(0\.\.2"):
        open_text(big, tokenizer=tokenizer, class_names=CLASSES)
    nolabel = write_rows(tmp_path / "nolabel.parquet", [{"text": "a"}, {"text": "b"}])
    with pytest.raises(InputError, match=r"no label field 'label'; the file has: text; pass --label-field"):
        open_text(nolabel, tokenizer=tokenizer)
    source = open_text(nolabel, tokenizer=tokenizer, allow_missing_labels=True)
    assert _all(source)[0].labels.tolist() == [-1, -1]
    assert "every label is -1" in source.notes[-1]


def test_row_errors_name_file_line_and_field(tmp_path, tokenizer):
    p = tmp_path / "x.jsonl"
    p.write_text('{"text": "a", "label": 0}\n\n{"text": "b", "label": 1\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"x\.jsonl: line 3: not valid JSON .*each line must be one JSON object"):
        open_text(p, tokenizer=tokenizer)
    p.write_text('{"text": "a", "label": 0}\n\n{"sentence": "b", "label": 1}\n', encoding="utf-8")
    with pytest.raises(
        InputError, match=r"x\.jsonl: line 3: no value for field 'text' \(the text\); the row has: sentence, label"
    ):
        open_text(p, tokenizer=tokenizer)
    c = write_rows(tmp_path / "x.csv", [{"sentence": "a", "label": 0}])
    with pytest.raises(InputError, match=r"x\.csv: no field 'text' .*the file has: sentence, label"):
        open_text(c, tokenizer=tokenizer)
    c.write_text("text,label\na,0\nb,1,2\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"x\.csv: line 3: 3 values but the header names 2 fields"):
        open_text(c, tokenizer=tokenizer)


def test_keys_from_id_field_and_duplicates(tmp_path, tokenizer):
    rows = _rows(10)
    source = open_text(
        write_rows(tmp_path / "a.parquet", rows, row_group_size=3),
        tokenizer=tokenizer,
        class_names=CLASSES,
        id_field="id",
    )
    assert [k for b in _all(source, batch_size=4) for k in b.keys] == [r["id"] for r in rows]
    assert source.description["keys_from"] == "field 'id'"
    rows[7]["id"] = rows[2]["id"]
    rows[9]["id"] = rows[1]["id"]
    with pytest.raises(InputError, match=r"a\.jsonl: line 8: id 'r002' \(id\) repeats line 3; keys must be unique"):
        open_text(write_rows(tmp_path / "a.jsonl", rows), tokenizer=tokenizer, class_names=CLASSES, id_field="id")


def test_sort_by_length_keeps_original_positions_and_keys(tmp_path, tokenizer):
    rows = _rows(40)
    path = write_rows(tmp_path / "a.jsonl", rows)
    plain = open_text(path, tokenizer=tokenizer, class_names=CLASSES, id_field="id", max_length=12)
    ranked = open_text(
        path, tokenizer=tokenizer, class_names=CLASSES, id_field="id", max_length=12, sort_by_length=True
    )
    got = _all(ranked, batch_size=4)
    seen = []
    for batch in got:
        lengths = batch.inputs["attention_mask"].sum(1)
        for i, index in enumerate(batch.indices.tolist()):
            row = rows[index]
            assert batch.keys[i] == row["id"]
            assert batch.labels[i] == CLASSES.index(row["label"])
            want = tokenizer(row["text"], truncation=True, max_length=12)["input_ids"]
            assert batch.inputs["input_ids"][i, : len(want)].tolist() == want
            assert lengths[i] == len(want)
        seen.extend(batch.indices.tolist())
    assert sorted(seen) == list(range(40))
    all_lengths = [int(b.inputs["attention_mask"].sum(1)[i]) for b in got for i in range(len(b.keys))]
    assert all_lengths == sorted(all_lengths, reverse=True)  # one window: longest first
    padded = sum(b.inputs["input_ids"].numel() for b in got)
    assert padded < sum(b.inputs["input_ids"].numel() for b in _all(plain, batch_size=4))
    assert ranked.description["sort_by_length"].startswith("within windows")


@pytest.mark.slow
def test_workers_give_the_same_batches(tmp_path, tokenizer):
    path = write_rows(tmp_path / "a.parquet", _rows(), row_group_size=5)
    source = open_text(path, tokenizer=tokenizer, class_names=CLASSES, id_field="id")
    for a, b in zip(_all(source), _all(source, workers=2), strict=True):
        assert a.keys == b.keys
        assert torch.equal(a.inputs["input_ids"], b.inputs["input_ids"])


def test_dataset_folder_pointing_outside_is_refused(tmp_path, tokenizer):
    folder = write_rows(tmp_path / "ds", _rows(5))
    state = json.loads((folder / "state.json").read_text())
    outside = tmp_path / "elsewhere.arrow"
    (folder / state["_data_files"][0]["filename"]).rename(outside)
    state["_data_files"][0]["filename"] = "../elsewhere.arrow"
    (folder / "state.json").write_text(json.dumps(state))
    with pytest.raises(
        InputError, match=r"data file '\.\./elsewhere\.arrow' lies outside .*may only read its own files"
    ):
        open_text(folder, tokenizer=tokenizer, class_names=CLASSES)


def test_tokenizer_loading_is_offline_and_safe(tmp_path, tok_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match=r"empty: holds no tokenizer files .*pass --tokenizer DIR"):
        load_tokenizer(empty)
    remote = tmp_path / "remote"
    remote.mkdir()
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    (remote / "tokenizer_config.json").write_text(json.dumps(config))
    (remote / "evil.py").write_text("raise SystemExit('imported remote code')\n")
    with pytest.raises(InvalidValueError, match=r"needs custom code .*--trust-remote-code"):
        load_tokenizer(remote)


def _traced_peak(path, tokenizer) -> tuple[int, int, float]:
    tracemalloc.start()
    try:
        start = time.perf_counter()
        source = open_text(path, tokenizer=tokenizer, class_names=CLASSES)
        count = sum(len(batch.keys) for batch in source.batches(batch_size=64))
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, count, elapsed


@pytest.mark.slow
def test_memory_is_flat_in_the_number_of_rows(tmp_path, tokenizer):
    sizes = {}
    for n in (300, 10_000, 80_000):
        path = tmp_path / f"big{n}.jsonl"
        with path.open("w", encoding="utf-8") as fh:
            for i in range(n):
                fh.write(json.dumps({"text": f"{WORDS[i % 18]} {WORDS[(i * 7) % 18]} cat sat", "label": i % 3}) + "\n")
        # The first run warms up: first-time imports are not the data's memory.
        sizes[n] = (*_traced_peak(path, tokenizer), path.stat().st_size)
    small, big = sizes[10_000], sizes[80_000]
    assert big[1] == 80_000
    print(
        f"\n10k rows: peak {small[0] / 1e6:.2f} MB traced; 80k rows ({big[3] / 1e6:.1f} MB file): "
        f"peak {big[0] / 1e6:.2f} MB traced, {big[1] / big[2]:.0f} rows/s under tracemalloc"
    )
    assert big[0] < big[3] / 3  # well below the file size (0.71 MB traced for a 3.3 MB file, measured)
    assert big[0] < 1.2 * small[0] + 100_000  # and flat: 8x the rows, about the same peak


def test_records_scan_and_take_agree(tmp_path):
    rows = _rows(200)
    for suffix in (".jsonl", ".csv", ".parquet", ""):
        rec = open_records(write_rows(tmp_path / f"r{suffix}", rows, row_group_size=13))
        chunks = list(rec.scan(["text"], chunk_rows=17))
        assert [start for start, _ in chunks] == list(range(0, 200, 17)), suffix  # whatever the row groups
        assert [t for _, cols in chunks for t in cols["text"]] == [r["text"] for r in rows], suffix
        picked = [199, 64, 65, 66, 0, 130, 129, 63]
        assert rec.take(picked, ["id"])["id"] == [rows[i]["id"] for i in picked], suffix


def test_model_config_naming_tokenizer_code_is_refused(tmp_path, tok_dir):
    folder = tmp_path / "model"
    folder.mkdir()
    for f in tok_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["evil.Tok", None]}}))
    with pytest.raises(InvalidValueError, match=r"config\.json: the tokenizer needs custom code"):
        load_tokenizer(folder)
    # A model's own custom code (no AutoTokenizer entry) does not concern the tokenizer.
    (folder / "config.json").write_text(json.dumps({"auto_map": {"AutoModel": "evil.Model"}}))
    assert load_tokenizer(folder).name_or_path == str(folder)


def test_option_and_layout_errors(tmp_path, tokenizer):
    path = write_rows(tmp_path / "a.jsonl", _rows(4))
    with pytest.raises(InvalidValueError, match=r"max_length: expected a positive integer, got 0"):
        open_text(path, tokenizer=tokenizer, class_names=CLASSES, max_length=0)
    empty = tmp_path / "e.csv"
    empty.write_text("text,label\nthe cat,\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"e\.csv: line 2: no label \(label\) value; every row needs one"):
        open_text(empty, tokenizer=tokenizer)
    (tmp_path / "dd").mkdir()
    (tmp_path / "dd" / "dataset_dict.json").write_text('{"splits": ["train"]}')
    write_rows(tmp_path / "dd" / "train", _rows(3))
    with pytest.raises(InputError, match=r"a DatasetDict with splits train; pass one split's folder"):
        open_text(tmp_path / "dd", tokenizer=tokenizer)
    partial = write_rows(tmp_path / "p.jsonl", [{"text": "the cat"}, {"text": "a dog", "label": "pos"}])
    source = open_text(partial, tokenizer=tokenizer, class_names=CLASSES, allow_missing_labels=True)
    assert _all(source)[0].labels.tolist() == [-1, 1]
    assert any("rows without one get label -1" in n for n in source.notes)


@pytest.mark.slow
def test_a_bert_teacher_sees_what_its_own_tokenizer_call_gives(tmp_path):
    # Dynamic padding per batch (sorted by length) must not change the logits: compared per key
    # with the model's own forward on `tokenizer(texts, padding=True)`.
    from transformers import BertConfig, BertForSequenceClassification

    from calibrate_teacher.collect import collect_logits

    tok = trained_tokenizer(tmp_path / "tok", model_max_length=16)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=37, num_labels=3, max_position_embeddings=32,
    )
    model = BertForSequenceClassification(config).eval()
    rows = _rows(23)
    source = open_text(write_rows(tmp_path / "a.jsonl", rows), tokenizer=tok, class_names=CLASSES, id_field="id",
                       sort_by_length=True)
    logits = collect_logits(model, source, batch_size=4)
    with torch.no_grad():
        enc = tok([r["text"] for r in rows], padding=True, truncation=True, max_length=16, return_tensors="pt")
        want = model(**enc).logits
    got = dict(zip(logits.keys, logits.logits, strict=True))
    assert sorted(got) == sorted(r["id"] for r in rows)
    for i, row in enumerate(rows):
        torch.testing.assert_close(got[row["id"]], want[i], rtol=0, atol=1e-5)
