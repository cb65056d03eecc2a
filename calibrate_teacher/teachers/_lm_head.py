"""Fold a calibration temperature into a loaded Hugging Face causal LM, so its logits are z / T.

Where 1/T goes depends on how the model makes its logits (checked in this order):

- ``final_logit_softcapping`` (Gemma-2/3): refused. The logits are ``c · tanh(z / c)``; no weight
  edit turns that into ``c · tanh(z / c) / T`` exactly, so a baked model would not be the
  calibrated teacher.
- A ``logit_scale`` multiplier (Cohere: ``logits = (h Wᵀ) · logit_scale``): the scale becomes
  ``logit_scale / T``, in the model and its config. Granite's ``logits_scaling`` divisor becomes
  ``logits_scaling · T``. No weight changes, so a tie survives.
- An **untied** ``lm_head``: its weight (and bias) are divided by T.
- A **tied** ``lm_head`` (it shares the input embedding's weight, or the config says
  ``tie_word_embeddings``): dividing the shared weight would also scale the input embeddings, and
  a reload would re-tie it anyway. 1/T goes into the final norm instead, whose output feeds the
  head linearly: LayerNorm weight and bias / T (GPT-2 ``ln_f``), RMSNorm weight / T (Llama
  ``norm``), Gemma's ``(1 + γ)`` RMSNorm ``γ' = (1 + γ) / T − 1``. The final norm is looked up by
  name on the base model (``norm``, ``ln_f``, ``final_layer_norm``, ``final_layernorm``); a model
  without one is refused rather than guessed at. Which edit a norm needs is not guessed from its
  class name: each candidate is applied and the norm run on a probe, and the edit is kept only if
  its output is the original's / T (float64 compare), else the weights are restored and the bake
  refused.

Edits happen in place, in float32 arithmetic cast back to the parameter's dtype (a bf16 model
rounds once). The whole-model probe (baked logits = original / T on real tokens) is the bake's
job (``_hf_bake.py``), after ``save_pretrained`` and a reload.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from calibrate_teacher.errors import BakeError, InvalidValueError

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["FINAL_NORM_NAMES", "fold_lm_temperature"]

#: Attribute names of a decoder's final norm on the base model, in the order they are tried.
FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm")
#: A norm edit is kept when the probe agrees with original / T to this relative tolerance.
_NORM_RTOL = 1e-5


def fold_lm_temperature(model: nn.Module, temperature: float) -> list[str]:
    """Make a causal LM output ``logits / temperature`` by editing its weights in place.

    Args:
        model: A loaded ``transformers`` causal LM (``AutoModelForCausalLM``), float weights.
        temperature: T > 0.

    Returns:
        Notes, one line each, saying what was changed (for the bake's ``notes``).

    Raises:
        InvalidValueError: T is not finite and > 0.
        BakeError: the model soft-caps its logits, has no output embedding, or has a tied head
            whose final norm cannot be found or does not scale exactly (the message says why).
    """
    import torch

    t = float(temperature)
    if not (math.isfinite(t) and t > 0):
        raise InvalidValueError(f"temperature {temperature!r}: must be a finite number > 0")
    config = getattr(model, "config", None)
    if config is None:
        raise BakeError(f"{type(model).__name__}: not a transformers model (no .config); cannot bake it as an LM")
    if t == 1.0:  # exact for every head, soft-capped ones included
        return ["T = 1: nothing to fold; weights unchanged"]
    text_config = _text_config(config)
    name = type(model).__name__
    cap = getattr(text_config, "final_logit_softcapping", None)
    if cap is not None:
        raise BakeError(
            f"{name}: final_logit_softcapping={cap} caps the logits as c·tanh(z/c), which does not "
            "commute with 1/T, so no weight edit gives logits / T exactly; distil from a soft-label "
            "cache (export-soft-labels) instead of a baked model"
        )
    with torch.no_grad():
        scale = _fold_into_scale(model, config, text_config, t)
        if scale is not None:
            return [scale]
        head = model.get_output_embeddings()  # type: ignore[operator]
        weight = getattr(head, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise BakeError(f"{name}: has no output embedding (lm_head) with a weight; cannot fold 1/T")
        embeddings = model.get_input_embeddings()  # type: ignore[operator]
        shares = embeddings is not None and getattr(embeddings, "weight", None) is weight
        tied = shares or bool(getattr(text_config, "tie_word_embeddings", False))
        if not tied:
            _divide_(weight, t)
            notes = [f"untied lm_head: weight / T (T = {t:g})"]
            bias = getattr(head, "bias", None)
            if isinstance(bias, torch.Tensor):
                _divide_(bias, t)
                notes[0] = f"untied lm_head: weight and bias / T (T = {t:g})"
            return notes
        if getattr(head, "bias", None) is not None:
            raise BakeError(
                f"{name}: the tied lm_head has a bias, which a final-norm fold would not scale; "
                "cannot bake it exactly"
            )
        where, norm = _final_norm(model)
        how = _fold_into_norm(norm, t, name=f"{name}.{where}")
        return [f"tied lm_head (shares the input embeddings): 1/T folded into the final norm {where} ({how}), "
                f"T = {t:g}"]


def _text_config(config: object) -> object:
    get = getattr(config, "get_text_config", None)
    if callable(get):
        try:
            return get(decoder=True)
        except (TypeError, ValueError):
            return get()
    return config


def _fold_into_scale(model: nn.Module, config: object, text_config: object, t: float) -> str | None:
    """Scale a logit multiplier (Cohere ``logit_scale``) or divisor (Granite ``logits_scaling``)."""
    scale = getattr(text_config, "logit_scale", None)
    if isinstance(scale, int | float) and not isinstance(scale, bool) and hasattr(model, "logit_scale"):
        new = float(scale) / t
        _set_config(config, text_config, "logit_scale", new)
        setattr(model, "logit_scale", new)  # noqa: B010 (nn.Module's typed __setattr__)
        return f"logit_scale {scale:g} -> {new:g} (logit_scale / T, T = {t:g}); weights unchanged"
    divisor = getattr(text_config, "logits_scaling", None)
    if isinstance(divisor, int | float) and not isinstance(divisor, bool):
        new = float(divisor) * t
        _set_config(config, text_config, "logits_scaling", new)
        return f"logits_scaling {divisor:g} -> {new:g} (logits_scaling · T, T = {t:g}); weights unchanged"
    return None


def _set_config(config: object, text_config: object, key: str, value: float) -> None:
    setattr(text_config, key, value)
    if text_config is not config and hasattr(config, key):
        setattr(config, key, value)


def _divide_(param: torch.Tensor, t: float) -> None:
    import torch

    param.copy_((param.detach().to(torch.float32) / t).to(param.dtype))


def _final_norm(model: nn.Module) -> tuple[str, nn.Module]:
    import torch
    from torch import nn

    base = getattr(model, "base_model", None)
    bases: list[tuple[str, object]] = []
    prefix = getattr(model, "base_model_prefix", "") or "base_model"
    if isinstance(base, nn.Module) and base is not model:
        bases.append((prefix, base))
        decoder = getattr(base, "decoder", None)  # OPT: model.decoder.final_layer_norm
        if isinstance(decoder, nn.Module):
            bases.append((f"{prefix}.decoder", decoder))
    for where, owner in bases:
        for attr in FINAL_NORM_NAMES:
            norm = getattr(owner, attr, None)
            if isinstance(norm, nn.Module) and isinstance(getattr(norm, "weight", None), torch.Tensor):
                return f"{where}.{attr}", norm
    raise BakeError(
        f"{type(model).__name__}: its lm_head is tied to the input embeddings, and no final norm "
        f"({', '.join(FINAL_NORM_NAMES)}) with a weight was found on the base model to fold 1/T into; "
        "cannot bake it without breaking the tie"
    )


def _fold_into_norm(norm: nn.Module, t: float, *, name: str) -> str:
    """Apply the first candidate edit under which the norm's output becomes output / T."""
    import torch

    weight: torch.Tensor = norm.weight  # type: ignore[assignment]
    bias = getattr(norm, "bias", None)
    bias = bias if isinstance(bias, torch.Tensor) else None
    saved_w = weight.detach().clone()
    saved_b = bias.detach().clone() if bias is not None else None
    width = int(weight.shape[-1])
    gen = torch.Generator().manual_seed(0)
    probe = torch.randn(4, width, generator=gen, dtype=torch.float32).to(weight.device) * 3.0 + 0.5
    probe = probe.to(weight.dtype)
    before = norm(probe).detach().to(torch.float64)

    def scale() -> None:
        _divide_(weight, t)
        if bias is not None:
            _divide_(bias, t)

    def one_plus() -> None:  # Gemma: y = n(x) · (1 + γ)  ->  γ' = (1 + γ) / T - 1
        weight.copy_(((1.0 + weight.detach().to(torch.float32)) / t - 1.0).to(weight.dtype))
        if bias is not None:
            _divide_(bias, t)

    kind = "bias" if bias is not None else ""
    candidates = (
        ("weight and bias / T" if kind else "weight / T", scale),
        ("(1 + weight) / T - 1" + (", bias / T" if kind else ""), one_plus),
    )
    tol = _NORM_RTOL if weight.dtype == torch.float32 or weight.dtype == torch.float64 else 1e-2
    for label, edit in candidates:
        edit()
        after = norm(probe).detach().to(torch.float64)
        if torch.allclose(after, before / t, rtol=tol, atol=tol * float(before.abs().max()) / t):
            return f"{type(norm).__name__}: {label}"
        weight.copy_(saved_w)
        if bias is not None and saved_b is not None:
            bias.copy_(saved_b)
    raise BakeError(
        f"{name} ({type(norm).__name__}): neither weight / T nor (1 + weight) / T - 1 makes its "
        "output the original / T, so 1/T cannot be folded into it exactly; weights left unchanged"
    )
