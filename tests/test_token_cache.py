"""The token soft-label cache (format version 2) and the sparse KD losses (#13).

References: top-k / log-sum-exp of the logits computed in float64 in the test; old (version 1)
caches from the golden files; dense float64 losses written here (TRL's generalised JSD formula).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from calibrate_teacher.errors import CacheError, InvalidValueError  # noqa: E402
from calibrate_teacher.soft_labels import (  # noqa: E402
    SoftLabelCache,
    TokenSoftLabelCache,
    TokenSoftLabels,
    token_kd_loss,
    verify_cache,
    write_token_soft_labels,
)
from calibrate_teacher.soft_labels._format import CacheManifest  # noqa: E402

GOLDEN = Path(__file__).parent / "golden"
T = 1.7


@dataclass
class Seq:
    key: str
    input_ids: torch.Tensor
    positions: torch.Tensor
    labels: torch.Tensor
    raw: torch.Tensor  # [n, V] raw logits of the scored positions
    chunk: int = 3

    def logits(self):
        for a in range(0, self.raw.shape[0], self.chunk):
            yield self.raw[a : a + self.chunk]


def make_sequences(n=5, vocab=2000, seed=0, completion_only=False):
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for i in range(n):
        length = 4 + (i * 3) % 7
        ids = torch.randint(0, vocab, (length,), generator=g)
        start = length // 2 if completion_only and i % 2 else 0
        positions = torch.arange(start, length - 1)  # causal: position t predicts token t + 1
        raw = torch.randn(len(positions), vocab, generator=g, dtype=torch.float64) * 3.0
        seqs.append(Seq(f"seq-{i}", ids, positions, ids[positions + 1], raw.float()))
    return seqs


def producer(seqs, fail_at=None):
    def produce(rows):
        for r in rows:
            if fail_at is not None and r == fail_at:
                raise KeyboardInterrupt
            yield seqs[r]

    return produce


def write(folder, seqs, **kwargs):
    options = {"num_sequences": len(seqs), "vocab_size": seqs[0].raw.shape[1], "temperature": T, "shard_rows": 2,
               "teacher": {"file": "tiny-llama", "sha256": "0" * 64, "format": "huggingface", "task": "causal-lm"},
               "data": {"kind": "jsonl", "path": "train.jsonl"}}
    options.update(kwargs)
    return write_token_soft_labels(producer(seqs, options.pop("fail_at", None)), folder, **options)


# --- writer and reader ------------------------------------------------------------------------


def test_topk_and_lse_match_float64_reference(tmp_path):
    seqs = make_sequences(completion_only=True)
    manifest = write(tmp_path / "c", seqs)
    assert manifest.format_version == 2 and manifest.layout.unit == "token"
    assert manifest.layout.kind == "topk" and manifest.layout.k == 64 and manifest.layout.index_dtype == "int16"
    assert manifest.num_shards == 3
    assert manifest.data["num_tokens"] == sum(len(s.positions) for s in seqs)
    cache = TokenSoftLabelCache(tmp_path / "c")
    assert len(cache) == 5 and cache.keys == tuple(s.key for s in seqs)
    assert cache.num_tokens == manifest.data["num_tokens"]
    for i, s in enumerate(seqs):
        soft = cache.sequence(i, input_ids=s.input_ids)
        length = len(s.input_ids)
        assert soft.index.shape == (length, 64)
        scaled64 = s.raw.double() / T
        ref_values, ref_index = torch.topk(scaled64, 64, dim=1)
        at = s.positions
        assert torch.equal(soft.index[at], ref_index)
        # values are z / T (computed in float32) rounded to float16
        assert torch.equal(soft.values[at], (s.raw / T).gather(1, ref_index).half().float())
        torch.testing.assert_close(soft.lse[at].double(), torch.logsumexp(scaled64, 1), rtol=0, atol=2e-6)
        unscored = torch.ones(length, dtype=torch.bool)
        unscored[at] = False
        assert soft.mask.tolist() == (~unscored).tolist()
        assert bool((soft.index[unscored] == -1).all()) and bool((soft.labels[unscored] == -100).all())
        assert torch.equal(soft.labels[at], s.input_ids[at + 1])
        # the kept probabilities are exact up to fp16 rounding of v, and so is the tail mass
        p = torch.exp(soft.log_probs[at].double())
        ref_p = torch.exp(ref_values - torch.logsumexp(scaled64, 1, keepdim=True))
        torch.testing.assert_close(p, ref_p, rtol=2e-3, atol=1e-9)
    assert verify_cache(tmp_path / "c").ok


def test_dense_layout_when_vocabulary_is_small(tmp_path):
    seqs = make_sequences(vocab=50)
    manifest = write(tmp_path / "d", seqs)
    assert manifest.layout.kind == "dense" and manifest.layout.k is None
    soft = TokenSoftLabelCache(tmp_path / "d").sequence(1)
    at = seqs[1].positions
    assert torch.equal(soft.index[at], torch.arange(50).expand(len(at), 50))
    assert torch.equal(soft.values[at], (seqs[1].raw / T).half().float())


def test_int32_index_for_large_vocabularies(tmp_path):
    seqs = make_sequences(n=2, vocab=40000)
    manifest = write(tmp_path / "w", seqs, top_k=8)
    assert manifest.layout.index_dtype == "int32"
    soft = TokenSoftLabelCache(tmp_path / "w").sequence(0)
    at = seqs[0].positions
    assert torch.equal(soft.index[at], torch.topk(seqs[0].raw.double() / T, 8, dim=1).indices)


def test_manifest_matches_golden_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    seqs = []
    for i, length in enumerate((4, 3, 5)):
        ids = torch.arange(length) + i
        positions = torch.arange(0, length - 1)
        seqs.append(Seq(f"s{i}", ids, positions, ids[positions + 1], torch.randn(length - 1, 1200, generator=g)))
    write(tmp_path / "g", seqs, top_k=4)
    doc = json.loads((tmp_path / "g" / "manifest.json").read_text())
    assert doc["created_at"].endswith("Z")
    doc["created_at"], doc["tool_version"] = "<created_at>", "<tool_version>"
    assert doc == json.loads((GOLDEN / "token_soft_labels_manifest.json").read_text())
    raw = (tmp_path / "g" / "shard-00000.safetensors").read_bytes()
    header = raw[8 : 8 + int.from_bytes(raw[:8], "little")]
    assert header == (GOLDEN / "token_soft_labels_shard_header.json").read_bytes()


def test_version_1_caches_still_read():
    doc = json.loads((GOLDEN / "soft_labels_manifest.json").read_text())
    manifest = CacheManifest.from_json(doc)
    assert manifest.format_version == 1 and manifest.layout.unit == "sample"
    assert manifest.to_json()["layout"] == doc["layout"]  # no token fields added to old layouts


def test_version_1_classification_cache_round_trip(tmp_path):
    from calibrate_teacher.soft_labels import write_soft_labels

    @dataclass
    class Batch:
        indices: torch.Tensor
        logits: torch.Tensor
        labels: torch.Tensor
        keys: tuple

    logits = torch.randn(5, 4)

    def produce(rows):
        idx = torch.tensor(list(rows))
        yield Batch(idx, logits[idx], torch.zeros(len(idx), dtype=torch.int64), tuple(str(i) for i in rows))

    m = write_soft_labels(produce, tmp_path / "v1", num_samples=5, num_classes=4, temperature=2.0)
    assert m.format_version == 1 and json.loads((tmp_path / "v1" / "manifest.json").read_text())["format_version"] == 1
    torch.testing.assert_close(SoftLabelCache(tmp_path / "v1").logits()[:], (logits / 2).half().float())
    with pytest.raises(CacheError, match="classification soft-label cache"):
        TokenSoftLabelCache(tmp_path / "v1")


def test_token_field_in_a_version_1_manifest_is_refused(tmp_path):
    seqs = make_sequences(n=2)
    write(tmp_path / "c", seqs)
    path = tmp_path / "c" / "manifest.json"
    doc = json.loads(path.read_text())
    doc["format_version"] = 1
    path.write_text(json.dumps(doc))
    with pytest.raises(CacheError, match="needs format_version 2"):
        TokenSoftLabelCache(tmp_path / "c")


def test_classification_reader_refuses_token_cache(tmp_path):
    write(tmp_path / "c", make_sequences(n=2))
    with pytest.raises(CacheError, match="TokenSoftLabelCache"):
        SoftLabelCache(tmp_path / "c")


def test_resume_after_interrupt_gives_identical_bytes(tmp_path):
    seqs = make_sequences()
    write(tmp_path / "whole", seqs)
    with pytest.raises(KeyboardInterrupt):
        write(tmp_path / "part", seqs, fail_at=3)
    assert (tmp_path / "part" / "shard-00000.safetensors").is_file()
    write(tmp_path / "part", seqs)
    for name in ("shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors", "keys.txt"):
        assert (tmp_path / "part" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()


def test_verify_names_a_damaged_shard(tmp_path):
    write(tmp_path / "c", make_sequences())
    shard = tmp_path / "c" / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = verify_cache(tmp_path / "c")
    assert not result.ok and "shard-00001" in result.problems[0]
    with pytest.raises(CacheError, match="checksum"):
        TokenSoftLabelCache(tmp_path / "c").sequence(2)


def test_bad_producer_output_is_refused(tmp_path):
    seqs = make_sequences(n=2)
    seqs[1].raw = seqs[1].raw[:-1]
    with pytest.raises(CacheError, match="logits for 5 positions, but 6 are scored"):
        write(tmp_path / "a", seqs)
    seqs = make_sequences(n=2)
    seqs[0].raw[0, 0] = float("nan")
    with pytest.raises(InvalidValueError, match="NaN"):
        write(tmp_path / "b", seqs)


# --- alignment ------------------------------------------------------------------------------


def test_batch_aligns_right_and_left_padding(tmp_path):
    seqs = make_sequences(completion_only=True)
    write(tmp_path / "c", seqs)
    cache = TokenSoftLabelCache(tmp_path / "c")
    rows = [3, 0]
    width = max(len(seqs[r].input_ids) for r in rows) + 2
    right = torch.zeros(2, width, dtype=torch.int64)
    left = torch.zeros(2, width, dtype=torch.int64)
    left_mask = torch.zeros(2, width, dtype=torch.int64)
    for b, r in enumerate(rows):
        ids = seqs[r].input_ids
        right[b, : len(ids)] = ids
        left[b, width - len(ids) :] = ids
        left_mask[b, width - len(ids) :] = 1
    a = cache.batch(rows, right)
    c = cache.batch(rows, left, attention_mask=left_mask)
    for b, r in enumerate(rows):
        one = cache.sequence(r)
        n = len(seqs[r].input_ids)
        assert torch.equal(a.index[b, :n], one.index) and bool((a.index[b, n:] == -1).all())
        assert torch.equal(c.values[b, width - n :], one.values) and not bool(c.mask[b, : width - n].any())


def test_alignment_mismatch_names_the_sequence(tmp_path):
    seqs = make_sequences()
    write(tmp_path / "c", seqs)
    cache = TokenSoftLabelCache(tmp_path / "c")
    ids = seqs[2].input_ids.clone()
    ids[3] = (ids[3] + 1) % 2000
    with pytest.raises(CacheError, match=r"sequence 2 \('seq-2'\).*position 3"):
        cache.sequence(2, input_ids=ids)
    with pytest.raises(CacheError, match=r"sequence 1 .*6 real tokens.*the teacher saw 7"):
        cache.batch([1], seqs[1].input_ids[:-1].unsqueeze(0), attention_mask=torch.ones(1, len(seqs[1].input_ids) - 1))


# --- sparse KD losses -----------------------------------------------------------------------


def dense_reference(student, teacher, divergence, beta=0.5):
    """float64, full vocabulary, TRL's generalized_jsd_loss definitions; mean over rows."""
    s = torch.log_softmax(student.double(), -1)
    t = torch.log_softmax(teacher.double(), -1)

    def kl(a, b):
        return (a.exp() * (a - b)).sum(-1)

    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0):
        out = kl(t, s)
    elif divergence == "reverse_kl" or beta == 1:
        out = kl(s, t)
    else:
        m = torch.logsumexp(torch.stack([s + math.log(1 - beta), t + math.log(beta)]), 0)
        out = beta * kl(t, m) + (1 - beta) * kl(s, m)
    return out.mean()


def bucket_reference(student, teacher, k, divergence, beta=0.5):
    """float64 loop: k kept teacher tokens + one rest bucket, per row."""
    total = 0.0
    for s_row, t_row in zip(student.double(), teacher.double(), strict=True):
        keep = torch.topk(t_row, k).indices.tolist()
        rest = [j for j in range(len(t_row)) if j not in keep]
        p, q = torch.softmax(t_row, 0), torch.softmax(s_row, 0)
        pb = np.array([float(p[j]) for j in keep] + [float(p[rest].sum())])
        qb = np.array([float(q[j]) for j in keep] + [float(q[rest].sum())])

        def kl(a, b):
            return float(np.sum(a * (np.log(a) - np.log(b))))

        if divergence == "forward_kl":
            total += kl(pb, qb)
        elif divergence == "reverse_kl":
            total += kl(qb, pb)
        else:
            m = (1 - beta) * qb + beta * pb
            total += beta * kl(pb, m) + (1 - beta) * kl(qb, m)
    return total / len(student)


def soft_of(teacher, k):
    """Exact (float32, not fp16-rounded) top-k soft labels of teacher logits [n, V], as one 'sequence'."""
    values, index = torch.topk(teacher, k, dim=-1)
    n = teacher.shape[0]
    return TokenSoftLabels(
        index=index.unsqueeze(0), values=values.unsqueeze(0), lse=torch.logsumexp(teacher, -1).unsqueeze(0),
        mask=torch.ones(1, n, dtype=torch.bool), labels=torch.zeros(1, n, dtype=torch.int64),
        vocab_size=teacher.shape[1],
    )


CASES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.1), ("jsd", 0.9), ("jsd", 0.0), ("jsd", 1.0)]


@pytest.mark.parametrize(("divergence", "beta"), CASES)
def test_sparse_losses_equal_dense_when_k_is_v(divergence, beta):
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(6, 40, generator=g) * 2, torch.randn(6, 40, generator=g) * 2
    got = token_kd_loss(student.unsqueeze(0), soft_of(teacher, 40), divergence=divergence, beta=beta)
    assert float(got) == pytest.approx(float(dense_reference(student, teacher, divergence, beta)), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize(("divergence", "beta"), CASES[:5])
def test_sparse_losses_match_bucket_reference(divergence, beta):
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(5, 60, generator=g) * 2, torch.randn(5, 60, generator=g) * 3
    got = token_kd_loss(student.unsqueeze(0), soft_of(teacher, 7), divergence=divergence, beta=beta)
    assert float(got) == pytest.approx(bucket_reference(student, teacher, 7, divergence, beta), rel=1e-5)


def test_jsd_endpoints_are_the_kls():
    g = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(1, 4, 30, generator=g), soft_of(torch.randn(4, 30, generator=g), 5)
    assert float(token_kd_loss(student, teacher, divergence="jsd", beta=0.0)) == float(token_kd_loss(student, teacher))
    assert float(token_kd_loss(student, teacher, divergence="jsd", beta=1.0)) == float(
        token_kd_loss(student, teacher, divergence="reverse_kl")
    )


def test_loss_is_mean_over_scored_tokens_and_has_gradients(tmp_path):
    seqs = make_sequences(n=2, vocab=300, completion_only=True)
    write(tmp_path / "c", seqs, top_k=16)
    cache = TokenSoftLabelCache(tmp_path / "c")
    ids = torch.zeros(2, 12, dtype=torch.int64)
    for b in range(2):
        ids[b, : len(seqs[b].input_ids)] = seqs[b].input_ids
    soft = cache.batch([0, 1], ids)
    student = torch.randn(2, 12, 300, requires_grad=True)
    loss = token_kd_loss(student, soft, divergence="jsd", beta=0.3)
    loss.backward()
    assert torch.isfinite(student.grad).all()
    assert bool((student.grad[~soft.mask] == 0).all())  # unscored positions get no gradient
    per_seq = [token_kd_loss(student[b : b + 1], _row(soft, b), divergence="jsd", beta=0.3) for b in range(2)]
    n = soft.mask.sum(1)
    expected = (per_seq[0] * n[0] + per_seq[1] * n[1]) / n.sum()
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)


def _row(soft, b):
    return TokenSoftLabels(soft.index[b : b + 1], soft.values[b : b + 1], soft.lse[b : b + 1], soft.mask[b : b + 1],
                           soft.labels[b : b + 1], soft.vocab_size)


def test_loss_refuses_bad_input():
    soft = soft_of(torch.randn(3, 10), 4)
    with pytest.raises(InvalidValueError, match="vocabulary"):
        token_kd_loss(torch.randn(1, 3, 11), soft)
    with pytest.raises(InvalidValueError, match="beta"):
        token_kd_loss(torch.randn(1, 3, 10), soft, divergence="jsd", beta=1.5)
    with pytest.raises(InvalidValueError, match="positions"):
        token_kd_loss(torch.randn(1, 4, 10), soft)


# --- the export job -------------------------------------------------------------------------


@dataclass
class _Batch:
    inputs: dict
    labels: torch.Tensor
    indices: torch.Tensor
    keys: tuple


class ListTokens:
    """Token data readable by row: right-padded batches, labels unshifted (-100 on the prompt and padding)."""

    def __init__(self, seqs, prompt):
        self.seqs, self.prompt = seqs, prompt
        self.description = {"kind": "test-tokens", "n": len(seqs)}

    def __len__(self):
        return len(self.seqs)

    def batches(self, *, batch_size, indices=None):
        rows = list(range(len(self))) if indices is None else list(indices)
        for a in range(0, len(rows), batch_size):
            part = rows[a : a + batch_size]
            width = max(len(self.seqs[r]) for r in part)
            ids = torch.zeros(len(part), width, dtype=torch.int64)
            mask = torch.zeros_like(ids)
            labels = torch.full_like(ids, -100)
            for b, r in enumerate(part):
                n = len(self.seqs[r])
                ids[b, :n], mask[b, :n] = self.seqs[r], 1
                labels[b, self.prompt[r] : n] = self.seqs[r][self.prompt[r] :]
            keys = tuple(f"row{r}" for r in part)
            yield _Batch({"input_ids": ids, "attention_mask": mask}, labels, torch.tensor(part), keys)


@pytest.mark.slow
def test_export_job_matches_the_models_own_logits(tmp_path):
    from _token_fixtures import tiny_causal_lm

    from calibrate_teacher.jobs._export_tokens import export_token_soft_labels

    model = tiny_causal_lm(vocab=300, scale=5.0)
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 300, (int(n),), generator=g) for n in (6, 9, 4, 7, 8)]
    prompt = [0, 3, 0, 2, 0]
    data = ListTokens(seqs, prompt)
    manifest = export_token_soft_labels(
        model, data, tmp_path / "c", temperature=T, top_k=16, shard_rows=2, batch_size=2
    )
    assert manifest.teacher["task"] == "causal-lm" and manifest.layout.k == 16
    cache = TokenSoftLabelCache(tmp_path / "c")
    assert cache.keys == tuple(f"row{i}" for i in range(5))
    for i, ids in enumerate(seqs):
        with torch.no_grad():
            ref = model(input_ids=ids.unsqueeze(0)).logits[0].double() / T
        soft = cache.sequence(i, input_ids=ids)
        # causal shift: position t is scored when token t + 1 is a label (not the prompt, not past the end)
        scored = torch.arange(max(prompt[i] - 1, 0), len(ids) - 1)
        assert soft.mask.nonzero().reshape(-1).tolist() == scored.tolist()
        assert torch.equal(soft.labels[scored], ids[scored + 1])
        assert torch.equal(soft.index[scored], torch.topk(ref[scored], 16, dim=1).indices)
        torch.testing.assert_close(soft.lse[scored].double(), torch.logsumexp(ref[scored], 1), rtol=0, atol=1e-4)
    notes = []
    again = export_token_soft_labels(model, data, tmp_path / "c", temperature=T, top_k=16, shard_rows=2, batch_size=2,
                                     notify=notes.append)
    assert again.run_id == manifest.run_id and any("already complete" in n for n in notes)
    # the same teacher saved as a Hugging Face directory: same soft labels, its files fingerprinted
    model.save_pretrained(tmp_path / "teacher")
    from_dir = export_token_soft_labels(
        tmp_path / "teacher", data, tmp_path / "d", temperature=T, top_k=16, shard_rows=2, batch_size=2, device="cpu"
    )
    assert from_dir.teacher["format"] == "huggingface" and from_dir.teacher["file"] == "teacher"
    other = TokenSoftLabelCache(tmp_path / "d")
    for i in range(len(seqs)):
        assert torch.equal(other.sequence(i).index, cache.sequence(i).index)
        torch.testing.assert_close(other.sequence(i).lse, cache.sequence(i).lse, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_lm_kd_example_runs(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).parent.parent
    done = subprocess.run(
        [sys.executable, "examples/lm_kd.py", "--steps", "3", "--teacher-steps", "2", "--out", str(tmp_path / "cache")],
        cwd=root, capture_output=True, text=True, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "top-64 of V = 1200" in done.stdout and "KD loss (forward_kl)" in done.stdout
    assert TokenSoftLabelCache(tmp_path / "cache").num_tokens > 0
