"""fold_lm_temperature: a causal LM's logits become z / T, and survive save_pretrained + reload (#13).

Reference: transformers' own forward of the original model, divided by T, compared with the
forward of the folded model reloaded by ``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from calibrate_teacher.errors import BakeError, InvalidValueError  # noqa: E402
from calibrate_teacher.teachers._lm_head import fold_lm_temperature  # noqa: E402

T = 1.7
SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
         "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 64}


def _config(kind: str, **extra: object) -> object:
    c = transformers
    if kind == "gpt2":
        return c.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=256, n_positions=64, **extra)
    if kind == "llama":
        return c.LlamaConfig(**SMALL, **extra)
    if kind == "gemma":
        return c.GemmaConfig(**SMALL, head_dim=16, **extra)
    if kind == "gemma2":
        return c.Gemma2Config(**SMALL, head_dim=16, **extra)
    if kind == "cohere":
        return c.CohereConfig(**SMALL, logit_scale=0.25, **extra)
    if kind == "granite":
        return c.GraniteConfig(**SMALL, logits_scaling=3.0, **extra)
    raise AssertionError(kind)


def _model(kind: str, **extra: object) -> torch.nn.Module:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config(kind, **extra))
    with torch.no_grad():  # random norms, so a wrong norm edit cannot pass by luck (Gemma's γ starts at 0)
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.3)
        model.get_output_embeddings().weight.mul_(20.0)  # logits of order 10, not 0.1
    return model.eval()


def _tied(model: torch.nn.Module) -> bool:
    return model.get_output_embeddings().weight is model.get_input_embeddings().weight


def _check_roundtrip(model: torch.nn.Module, tmp_path: object, *, expect_tied: bool | None) -> list[str]:
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(input_ids=ids).logits.to(torch.float64)
    was_tied = _tied(model)
    notes = fold_lm_temperature(model, T)
    model.save_pretrained(tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    with torch.no_grad():
        got = back(input_ids=ids).logits.to(torch.float64)
    torch.testing.assert_close(got, ref / T, rtol=1e-5, atol=1e-5)
    assert _tied(back) == was_tied
    if expect_tied is not None:
        assert was_tied is expect_tied
    return notes


def test_gpt2_tied_layernorm(tmp_path):
    notes = _check_roundtrip(_model("gpt2"), tmp_path, expect_tied=True)
    assert "ln_f" in notes[0] and "LayerNorm: weight and bias / T" in notes[0]


def test_llama_tied_rmsnorm(tmp_path):
    notes = _check_roundtrip(_model("llama", tie_word_embeddings=True), tmp_path, expect_tied=True)
    assert "model.norm" in notes[0] and "weight / T" in notes[0]


def test_llama_untied_head(tmp_path):
    model = _model("llama", tie_word_embeddings=False)
    norm_before = model.model.norm.weight.detach().clone()
    notes = _check_roundtrip(model, tmp_path, expect_tied=False)
    assert notes[0].startswith("untied lm_head: weight / T")
    assert torch.equal(model.model.norm.weight, norm_before)  # only the head changed


def test_llama_untied_head_with_bias(tmp_path):
    model = _model("llama", tie_word_embeddings=False)
    model.lm_head.bias = torch.nn.Parameter(torch.randn(256))
    ids = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        notes = fold_lm_temperature(model, T)
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, ref / T, rtol=1e-5, atol=1e-5)
    assert "weight and bias" in notes[0]


def test_gemma_one_plus_gamma_norm(tmp_path):
    model = _model("gemma")
    gamma = model.model.norm.weight.detach().clone()
    notes = _check_roundtrip(model, tmp_path, expect_tied=True)
    assert "(1 + weight) / T - 1" in notes[0]
    torch.testing.assert_close(model.model.norm.weight.detach(), (1 + gamma) / T - 1)


def test_cohere_logit_scale(tmp_path):
    model = _model("cohere")
    emb = model.get_input_embeddings().weight.detach().clone()
    notes = _check_roundtrip(model, tmp_path, expect_tied=None)
    assert "logit_scale 0.25 ->" in notes[0]
    assert model.config.logit_scale == pytest.approx(0.25 / T)
    assert torch.equal(model.get_input_embeddings().weight, emb)


def test_granite_logits_scaling(tmp_path):
    notes = _check_roundtrip(_model("granite"), tmp_path, expect_tied=None)
    assert "logits_scaling 3 ->" in notes[0]


def test_gemma2_softcapping_refused():
    model = _model("gemma2", final_logit_softcapping=30.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(BakeError, match=r"final_logit_softcapping=30\.0.*does not commute"):
        fold_lm_temperature(model, T)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_tied_without_final_norm_refused():
    model = _model("llama", tie_word_embeddings=True)
    model.model.norm = torch.nn.Identity()
    with pytest.raises(BakeError, match="no final norm"):
        fold_lm_temperature(model, T)


def test_norm_that_does_not_scale_refused():
    class OffsetNorm(torch.nn.Module):  # y = x·w + 1: no weight edit makes it y / T
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(32))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.weight + 1.0

    model = _model("llama", tie_word_embeddings=True)
    model.model.norm = OffsetNorm()
    with pytest.raises(BakeError, match="cannot be folded"):
        fold_lm_temperature(model, T)
    assert torch.equal(model.model.norm.weight, torch.ones(32))  # restored


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature(bad):
    with pytest.raises(InvalidValueError):
        fold_lm_temperature(_model("gpt2"), bad)


def test_temperature_one_is_a_no_op():
    model = _model("gpt2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert "nothing to fold" in fold_lm_temperature(model, 1.0)[0]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
