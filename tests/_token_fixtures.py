"""Tiny sequence teachers and token batches for the token tests (nothing downloaded)."""

from __future__ import annotations

import torch

VOCAB = 300


def tiny_causal_lm(kind="llama", vocab=VOCAB, hidden=32, seed=0, scale=40.0, **extra):
    """A random-init tiny GPT-2 / Llama / Gemma-2 causal LM with spread-out logits (eval mode)."""
    from transformers import AutoModelForCausalLM, Gemma2Config, GPT2Config, LlamaConfig

    torch.manual_seed(seed)
    if kind == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=2, n_head=2, n_positions=64, bos_token_id=0,
                         eos_token_id=0, **extra)
    elif kind == "gemma2":
        cfg = Gemma2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
                           **extra)
    else:
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                          tie_word_embeddings=False, **extra)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(scale)
    return model


def sampled_batches(model, *, batches=3, rows=4, length=12, true_t=2.0, seed=0, pad_last=True):
    """Token batches sampled from the model itself at ``true_t`` (so the NLL-optimal T is near it).

    Labels are unshifted (== input_ids), -100 on the padding of each batch's first row.
    """
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    out = []
    for _ in range(batches):
        ids = torch.randint(0, vocab, (rows, 1), generator=g)
        with torch.no_grad():
            for _ in range(length - 1):
                z = model(input_ids=ids).logits[:, -1].double() / true_t
                nxt = torch.multinomial(torch.softmax(z, dim=-1), 1, generator=g)
                ids = torch.cat([ids, nxt], dim=1)
        mask = torch.ones_like(ids)
        if pad_last:
            mask[0, length - 3 :] = 0
        labels = ids.clone()
        labels[mask == 0] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def reference_tokens(model, batches):
    """Float64 scored logits ``[N, V]``, targets, sequence ids from ``model(**batch).logits`` (shift by hand)."""
    zs, ys, seqs = [], [], []
    seq0 = 0
    for b in batches:
        with torch.no_grad():
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.double()
        lab, mask = b["labels"], b["attention_mask"]
        for r in range(lab.shape[0]):
            for t in range(lab.shape[1] - 1):
                if mask[r, t] == 1 and lab[r, t + 1] != -100:
                    zs.append(logits[r, t])
                    ys.append(int(lab[r, t + 1]))
                    seqs.append(seq0 + r)
        seq0 += lab.shape[0]
    return torch.stack(zs), torch.tensor(ys), torch.tensor(seqs)


def newton_nll_t(z, y, start=1.0, iters=20):
    """The float64 NLL-optimal T of full logits: plain Newton on beta from ``start`` (test reference)."""
    z = z.double()
    beta = 1.0 / start
    for _ in range(iters):
        p = torch.softmax(beta * z, dim=1)
        m1 = (p * z).sum(1)
        m2 = (p * z * z).sum(1)
        grad = (m1 - z.gather(1, y[:, None]).squeeze(1)).mean()
        curv = (m2 - m1 * m1).mean()
        beta = float(beta - grad / curv)
    return 1.0 / beta
