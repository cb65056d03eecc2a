"""Token temperature fits (issue #13): exact NLL fit vs a float64 full-logits reference, memory bound."""

from __future__ import annotations

import math

import pytest
import torch
from _token_fixtures import newton_nll_t, reference_tokens, sampled_batches, tiny_causal_lm
from scipy.optimize import minimize_scalar

from calibrate_teacher.errors import InvalidValueError
from calibrate_teacher.jobs._tokens import calibrate_tokens
from calibrate_teacher.temperature import fit_temperature


def _nll64(z, y, t):
    return float(-(torch.log_softmax(z / t, dim=1).gather(1, y[:, None])).mean())


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_nll_temperature_equals_float64_full_logits_fit(tmp_path, kind):
    model = tiny_causal_lm(kind)
    model.save_pretrained(tmp_path / kind)
    batches = sampled_batches(model, true_t=2.0)
    z, y, _ = reference_tokens(model, batches)
    scipy_t = minimize_scalar(lambda t: _nll64(z, y, t), bounds=(0.05, 20), method="bounded",
                              options={"xatol": 1e-10}).x
    t_ref = newton_nll_t(z, y, start=scipy_t)  # polished to the float64 optimum
    assert abs(t_ref - scipy_t) / t_ref < 1e-5
    run = calibrate_tokens(tmp_path / kind, batches, objective="nll", device="cpu")
    assert 1.0 < t_ref < 5.0
    assert abs(run.temperature - t_ref) / t_ref < 1e-4
    assert run.fit.before.num_tokens == y.shape[0]
    assert math.isclose(run.fit.after.nll, _nll64(z, y, run.temperature), rel_tol=1e-6)
    assert run.fit.after.nll <= run.fit.before.nll
    doc = run.to_json()
    assert doc["task"] == "causal-lm" and doc["unit"] == "token" and doc["kind"] == "fit"
    assert any(p["temperature"] == 1.0 for p in doc["sweep"]) and any(p["temperature"] == 1.5 for p in doc["sweep"])
    assert any("recomputed from final hidden states" in n for n in run.notes)


def test_ece_search_matches_the_classification_search_on_the_same_logits():
    model = tiny_causal_lm("llama", seed=1)
    batches = sampled_batches(model, true_t=1.5, seed=1)
    z, y, _ = reference_tokens(model, batches)
    ours = calibrate_tokens(model, batches, objective="ece", grid=64)
    theirs = fit_temperature(z.float(), y, objective="ece")
    assert ours.fit.objective_value == pytest.approx(theirs.objective_value, abs=1e-6)
    assert ours.fit.after.ece == pytest.approx(theirs.after.ece, abs=1e-6)
    assert ours.fit.after.ece <= ours.fit.before.ece


def test_paper_fixed_and_adaece_objectives():
    model = tiny_causal_lm("gpt2", seed=2)
    batches = sampled_batches(model, batches=2, true_t=2.5, seed=2)
    paper = calibrate_tokens(model, batches, objective="paper")
    assert 1.5 <= paper.temperature <= 3.0
    fixed = calibrate_tokens(model, batches, objective="fixed")
    assert fixed.temperature == 1.5 and fixed.fit.after.temperature == 1.5
    ada = calibrate_tokens(model, batches, objective="adaece")
    assert ada.fit.after.adaece <= ada.fit.before.adaece + 1e-12
    with pytest.raises(InvalidValueError, match="ace"):
        calibrate_tokens(tiny_causal_lm("llama", vocab=1200), batches, objective="ace")


def _hwm_reset() -> int | None:
    """Reset this process's peak RSS (Linux clear_refs 5); return the current RSS in bytes."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return _status("VmRSS")


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(key)


@pytest.mark.slow
def test_fit_never_allocates_tokens_by_vocabulary(monkeypatch):
    """4k tokens x 32k vocabulary (512 MiB of float32 logits): the fit's chunks and peak memory stay small."""
    from calibrate_teacher.tokens import _store

    monkeypatch.setattr(_store, "CPU_CHUNK_BYTES", 1 << 22)  # 4 MiB chunks
    model = tiny_causal_lm("llama", vocab=32000, hidden=32, scale=10.0)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(16):
        ids = torch.randint(0, 32000, (4, 65), generator=g)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    largest = 0
    chunks = _store.TokenStore.chunks

    def recording(self, *, stride=1):
        nonlocal largest
        for z, y in chunks(self, stride=stride):
            largest = max(largest, z.numel())
            yield z, y

    monkeypatch.setattr(_store.TokenStore, "chunks", recording)
    base = _hwm_reset()
    calibrate_tokens(model, batches[:1], objective="nll", grid=2)  # 256 tokens; also loads lazy kernels
    small = None if base is None else _status("VmHWM") - base
    base = _hwm_reset()
    run = calibrate_tokens(model, batches, objective="nll", grid=2)
    assert run.fit.before.num_tokens == 16 * 4 * 64
    full = run.fit.before.num_tokens * 32000 * 4
    assert largest * 4 <= 1 << 22
    if base is not None and small is not None:
        grown = _status("VmHWM") - base
        # the peak is the first batch's head check ([batch, S, V] logits), not the tokens: flat in N
        msg = (f"peak grew by {grown / 2**20:.0f} MiB (1 batch: {small / 2**20:.0f}); "
               f"[tokens, V] is {full / 2**20:.0f} MiB")
        assert grown < small + full / 8, msg
        assert grown < full / 2, msg


@pytest.mark.gpu
def test_cuda_fit_equals_cpu_fit():
    model = tiny_causal_lm("llama", seed=6)
    batches = sampled_batches(model, true_t=2.0, seed=6)
    cpu = calibrate_tokens(model, batches, objective="nll")
    gpu = calibrate_tokens(model.to("cuda"), batches, objective="nll")
    assert gpu.teacher["device"].startswith("cuda")
    assert gpu.temperature == pytest.approx(cpu.temperature, rel=1e-4)
    assert gpu.fit.after.ece == pytest.approx(cpu.fit.after.ece, abs=1e-5)
