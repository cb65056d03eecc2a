"""Token-level metrics (issue #13) against float64 reference loops (tests/reference_impl.py)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import reference_impl as ref
import torch
from _token_fixtures import reference_tokens, sampled_batches, tiny_causal_lm

from calibrate_teacher.jobs._tokens import evaluate_tokens
from calibrate_teacher.tokens.metrics import TokenMetricsAccumulator, sequence_ece


def sequence_ece_reference(conf, correct, seqs, n_bins=15):
    """Plain loop: the top-label ECE of each sequence alone, averaged with equal weight."""
    per = {}
    for c, a, s in zip(conf, correct, seqs, strict=True):
        per.setdefault(int(s), []).append((c, a))
    eces = []
    for members in per.values():
        n = len(members)
        bins = {}
        for c, a in members:
            bins.setdefault(ref._equal_width_bin(c, n_bins), []).append((c, a))
        eces.append(sum(len(b) / n * abs(sum(c for c, _ in b) / len(b) - sum(a for _, a in b) / len(b))
                        for b in bins.values()))
    return sum(eces) / len(eces)


def _check_against_reference(metrics, z, y, seqs, temperature=1.0, tol=1e-9):
    probs = ref.softmax64(z.numpy(), temperature)
    labels = y.tolist()
    ece, over, under, mce = ref.ece_parts(probs, labels)
    conf, correct = ref.top_label(probs, labels)
    assert metrics.num_tokens == len(labels)
    assert metrics.accuracy == pytest.approx(float(np.mean(correct)), abs=tol)
    assert metrics.nll == pytest.approx(ref.nll(probs, labels), abs=tol)
    assert metrics.perplexity == pytest.approx(math.exp(ref.nll(probs, labels)), rel=tol * 10)
    assert metrics.brier == pytest.approx(ref.brier(probs, labels), abs=tol)
    assert metrics.ece == pytest.approx(ece, abs=tol)
    assert metrics.ece_over == pytest.approx(over, abs=tol)
    assert metrics.ece_under == pytest.approx(under, abs=tol)
    assert metrics.mce == pytest.approx(mce, abs=tol)
    assert metrics.adaece == pytest.approx(ref.adaece(probs, labels), abs=tol)
    assert metrics.sequence_ece == pytest.approx(sequence_ece_reference(conf, correct, seqs.tolist()), abs=tol)
    return probs, labels


class FixedLogits(torch.nn.Module):
    """An in-memory token model returning stored logits for the batch it is given (by its first id)."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, input_ids, attention_mask=None):
        return self.table[int(input_ids[0, 0])]


def _fixed_case(vocab, seed=0, batches=3, rows=3, length=9):
    g = torch.Generator().manual_seed(seed)
    table, data = {}, []
    for i in range(batches):
        z = torch.randn(rows, length, vocab, generator=g) * 3
        ids = torch.randint(0, vocab, (rows, length), generator=g)
        ids[0, 0] = i  # the key FixedLogits looks up
        mask = torch.ones_like(ids)
        mask[1, -2:] = 0
        labels = ids.clone()
        labels[mask == 0] = -100
        labels[2, 3] = -100
        table[i] = z
        data.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return FixedLogits(table), data


def _scored(model, data, task):
    zs, ys, seqs = [], [], []
    for s0, b in enumerate(data):
        z = model(b["input_ids"]).double()
        for r in range(z.shape[0]):
            for t in range(z.shape[1]):
                j = t + 1 if task == "causal-lm" else t
                if j < z.shape[1] and b["attention_mask"][r, t] == 1 and b["labels"][r, j] != -100:
                    zs.append(z[r, t])
                    ys.append(int(b["labels"][r, j]))
                    seqs.append(s0 * z.shape[0] + r)
    return torch.stack(zs), torch.tensor(ys), torch.tensor(seqs)


@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_module_causal_metrics_equal_float64_loops(temperature):
    model, data = _fixed_case(1200)
    run = evaluate_tokens(model, data, task="causal-lm", temperature=temperature)
    z, y, seqs = _scored(model, data, "causal-lm")
    _check_against_reference(run.metrics, z, y, seqs, temperature)
    m = run.metrics
    assert m.classwise_ece is None and m.ace is None and m.tace is None
    assert "1,200 > 1000" in m.not_computed["classwise_ece"]
    doc = json.loads(json.dumps(run.to_json(), allow_nan=False))
    assert doc["unit"] == "token" and doc["task"] == "causal-lm"
    assert doc["metrics"]["classwise_ece"] is None and "classwise_ece" in doc["metrics"]["not_computed"]


def test_token_classifier_module_gets_classwise_metrics():
    model, data = _fixed_case(7, seed=3)
    run = evaluate_tokens(model, data, task="token-classification")
    z, y, seqs = _scored(model, data, "token-classification")
    probs, labels = _check_against_reference(run.metrics, z, y, seqs)
    m = run.metrics
    assert m.classwise_ece == pytest.approx(ref.classwise_ece(probs, labels), abs=1e-9)
    assert m.ace == pytest.approx(ref.ace(probs, labels), abs=1e-9)
    assert m.tace == pytest.approx(ref.ace(probs, labels, threshold=0.01), abs=1e-9)
    assert m.not_computed == {}


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_hf_causal_lm_metrics_equal_float64_loops_on_model_logits(kind):
    model = tiny_causal_lm(kind, vocab=1100, seed=4)
    data = sampled_batches(model, batches=2, true_t=1.3, seed=4)
    run = evaluate_tokens(model, data)
    z, y, seqs = reference_tokens(model, data)
    # the head recomputes the logits in float32 (not bit-identical to the model's matmul): 1e-6
    _check_against_reference(run.metrics, z, y, seqs, tol=1e-6)
    assert run.metrics.num_sequences == 8
    assert run.metrics.ace is None and "1,100 > 1000" in run.metrics.not_computed["ace"]


def test_brier_large_vocabulary_exact_chunkwise():
    g = torch.Generator().manual_seed(5)
    z = torch.randn(40, 5000, generator=g) * 4
    y = torch.randint(0, 5000, (40,), generator=g)
    acc = TokenMetricsAccumulator(vocab_size=5000)
    for i in range(0, 40, 7):
        acc.add(z[i : i + 7], y[i : i + 7], torch.arange(i, min(i + 7, 40)) // 10)
    m = acc.result(num_sequences=4)
    p = torch.softmax(z.double(), dim=1)
    onehot = torch.nn.functional.one_hot(y, 5000).double()
    assert m.brier == pytest.approx(float(((p - onehot) ** 2).sum(1).mean()), abs=1e-12)
    assert m.num_sequences == 4


def test_sequence_ece_weighs_sequences_equally():
    # one long perfectly calibrated sequence and one short overconfident one
    conf = torch.tensor([0.5] * 8 + [0.9, 0.9], dtype=torch.float64)
    correct = torch.tensor([1.0, 0.0] * 4 + [0.0, 0.0], dtype=torch.float64)
    seqs = torch.tensor([0] * 8 + [7, 7])
    assert sequence_ece(conf, correct, seqs, 15) == pytest.approx((0.0 + 0.9) / 2)
    assert sequence_ece(conf, correct, seqs, 15) == pytest.approx(
        sequence_ece_reference(conf.tolist(), correct.tolist(), seqs.tolist()))
