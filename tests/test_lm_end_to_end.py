"""Issue #13, end to end: a Hugging Face causal LM on text rows, through the CLI.

The reference is computed here without the package: the directory's own tokenizer on the same
texts, transformers' own forward, the causal shift written out, and a float64 Newton fit.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from _token_fixtures import tiny_causal_lm
from _tokenizer_fixtures import WORDS, trained_tokenizer

pytestmark = pytest.mark.slow


def _nll_temperature(z: torch.Tensor, y: torch.Tensor) -> float:
    """argmin_T mean NLL of softmax(z / T) in float64: scipy's bounded search, polished by Newton on 1/T."""
    from scipy.optimize import minimize_scalar

    z = z.double()

    def nll(t: float) -> float:
        return float((torch.logsumexp(z / t, 1) - z.gather(1, y[:, None])[:, 0] / t).mean())

    beta = 1.0 / minimize_scalar(nll, bounds=(0.05, 20.0), method="bounded", options={"xatol": 1e-8}).x
    for _ in range(5):
        p = torch.softmax(beta * z, dim=1)
        mean = (p * z).sum(1)
        grad = float((mean - z.gather(1, y[:, None])[:, 0]).mean())
        beta -= grad / float(((p * z * z).sum(1) - mean**2).mean())
    return 1.0 / beta


def _texts(n: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (int(k),), generator=g))
            for k in torch.randint(3, 10, (n,), generator=g)]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm-e2e")
    folder = root / "tiny-llama"
    tokenizer = trained_tokenizer(folder, model_max_length=16)
    model = tiny_causal_lm("llama", vocab=len(tokenizer), scale=1.0)
    # A few steps on text written here: a real (if tiny) LM, then sharpened so it is overconfident.
    train = tokenizer(_texts(128, seed=0), padding=True, truncation=True, max_length=16, return_tensors="pt")
    labels = train["input_ids"].masked_fill(train["attention_mask"] == 0, -100)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(40):
        loss = model(input_ids=train["input_ids"], attention_mask=train["attention_mask"], labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(3.0)
    model.save_pretrained(folder)
    texts = _texts(24, seed=3)
    data = root / "val.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    enc = tokenizer(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.double()
    # Position t is scored against token t + 1, where both are real tokens.
    mask = enc["attention_mask"]
    keep = (mask[:, :-1] == 1) & (mask[:, 1:] == 1)
    z = logits[:, :-1][keep]
    y = enc["input_ids"][:, 1:][keep]
    return {"folder": folder, "data": data, "enc": enc, "logits": logits, "z": z, "y": y}


def test_fit_causal_lm_nll_equals_float64_reference_and_bakes(lm, cli, tmp_path):
    out = tmp_path / "baked"
    code, stdout, stderr = cli(
        "fit", lm["folder"], "--data", lm["data"], "--objective", "nll", "--out", out, "--json",
    )
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["task"] == "causal-lm" and report["unit"] == "token"
    expected = _nll_temperature(lm["z"], lm["y"])
    assert report["temperature"] == pytest.approx(expected, abs=1e-4)
    acc = float((lm["z"].argmax(1) == lm["y"]).double().mean())
    assert report["before"]["accuracy"] == pytest.approx(acc, abs=1e-12)
    assert report["baked"]["path"] == str(out)
    from transformers import AutoModelForCausalLM

    baked = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    with torch.no_grad():
        got = baked(input_ids=lm["enc"]["input_ids"], attention_mask=lm["enc"]["attention_mask"]).logits.double()
    assert torch.allclose(got, lm["logits"] / report["temperature"], atol=1e-5, rtol=0)


def test_evaluate_causal_lm_reports_token_metrics(lm, cli):
    code, stdout, stderr = cli("evaluate", lm["folder"], "--data", lm["data"], "--json")
    assert code == 0, stderr
    report = json.loads(stdout)
    p = torch.softmax(lm["z"], dim=1)
    nll = float(-torch.log(p.gather(1, lm["y"][:, None])).mean())
    assert report["metrics"]["nll"] == pytest.approx(nll, abs=1e-6)
    assert report["source"]["data"]["tokens"] == int(lm["y"].numel())
    assert report["source"]["data"]["sequences"] == 24


def test_export_token_soft_labels_through_the_cli(lm, cli, tmp_path):
    out = tmp_path / "cache"
    code, _, stderr = cli("export-soft-labels", lm["folder"], "--data", lm["data"], "--id-field", "id",
                          "--temperature", "2.0", "--out", out)
    assert code == 0, stderr
    from calibrate_teacher.soft_labels import TokenSoftLabelCache

    cache = TokenSoftLabelCache(out)
    assert cache.keys[:2] == ("q0", "q1")
    assert cache.num_tokens == int(lm["y"].numel())
    mask0 = lm["enc"]["attention_mask"][0] == 1
    first = cache.sequence(0, input_ids=lm["enc"]["input_ids"][0][mask0])
    n = int(mask0.sum()) - 1  # positions 0..n-1 predict tokens 1..n
    assert bool(first.mask[:n].all()) and not bool(first.mask[n:].any())
    # Dense (V <= 1000): the stored values are z / T in fp16, the lse the full row's, in float32.
    z = lm["logits"][0, :n] / 2.0
    got = torch.zeros_like(z).scatter_(1, first.index[:n], first.values[:n].double())
    assert torch.allclose(got, z.to(torch.float16).double(), atol=1e-3, rtol=0)
    assert torch.allclose(first.lse[:n].double(), torch.logsumexp(z, 1), atol=1e-4, rtol=0)
