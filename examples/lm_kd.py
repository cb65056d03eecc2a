"""Distil a small causal LM from a token soft-label cache, in a plain PyTorch training loop.

The teacher runs once (``export_token_soft_labels``, or ``calibrate-teacher export-soft-labels``
on an LM directory); training reads the calibrated top-k soft labels from the cache and never
loads the teacher. The lines that matter in an existing LM KD script are marked ``# <- cache``:

    cache = TokenSoftLabelCache("cache/")                                   # <- cache
    soft = cache.batch(rows, input_ids, attention_mask=attention_mask)      # <- cache: aligned, checked
    logits = student(input_ids=input_ids, attention_mask=attention_mask).logits
    loss = token_kd_loss(logits, soft, divergence="forward_kl")             # <- cache

With nothing prepared, ``python examples/lm_kd.py`` builds everything in a temporary folder in a
few seconds on a CPU: a toy corpus, a tiny Llama teacher trained on it for a few steps, its
token cache at T = 1.5 (top 64 of a 1,200-token vocabulary + the full-row log-sum-exp), and a
smaller student distilled from the cache. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from calibrate_teacher.jobs._export_tokens import export_token_soft_labels
from calibrate_teacher.soft_labels import TokenSoftLabelCache, token_kd_loss

VOCAB = 1200


def make_corpus(n: int, length: int, seed: int) -> list[torch.Tensor]:
    """Toy "language": each sequence counts up from a random start by a step of 1, 2 or 3 (mod V), with noise."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        start = int(torch.randint(0, VOCAB, (1,), generator=g))
        step = int(torch.randint(1, 4, (1,), generator=g))
        size = int(torch.randint(length // 2, length + 1, (1,), generator=g))
        seq = (start + step * torch.arange(size)) % VOCAB
        noise = torch.rand(size, generator=g) < 0.1
        seq[noise] = torch.randint(0, VOCAB, (int(noise.sum()),), generator=g)
        out.append(seq)
    return out


def tiny_llama(hidden: int, layers: int, seed: int) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(config)


def pad(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest: input_ids and attention_mask ``[B, S]``."""
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for b, s in enumerate(seqs):
        ids[b, : len(s)], mask[b, : len(s)] = s, 1
    return ids, mask


@dataclass
class Batch:
    """A batch as the export job reads it: named inputs, unshifted labels, row indices, keys."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor
    indices: torch.Tensor
    keys: tuple[str, ...]


class Corpus:
    """Token data the export can read by row (any ``open_token_text`` source works the same way)."""

    def __init__(self, seqs: list[torch.Tensor]) -> None:
        self.seqs = seqs
        self.description = {"kind": "toy-counting-corpus", "sequences": len(seqs)}

    def __len__(self) -> int:
        return len(self.seqs)

    def batches(self, *, batch_size: int, indices: list[int] | None = None) -> object:
        rows = list(range(len(self))) if indices is None else list(indices)
        for a in range(0, len(rows), batch_size):
            part = rows[a : a + batch_size]
            ids, mask = pad([self.seqs[r] for r in part])
            labels = ids.masked_fill(mask == 0, -100)  # unshifted; the export shifts for the causal LM
            keys = tuple(f"seq{r}" for r in part)
            yield Batch({"input_ids": ids, "attention_mask": mask}, labels, torch.tensor(part), keys)


def train_teacher(seqs: list[torch.Tensor], steps: int) -> torch.nn.Module:
    teacher = tiny_llama(hidden=48, layers=2, seed=0)
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        rows = torch.randint(0, len(seqs), (8,), generator=g).tolist()
        ids, mask = pad([seqs[r] for r in rows])
        loss = teacher(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return teacher.eval()


def held_out_nll(model: torch.nn.Module, seqs: list[torch.Tensor]) -> float:
    ids, mask = pad(seqs)
    with torch.no_grad():
        return float(model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="student training steps")
    parser.add_argument("--teacher-steps", type=int, default=30, help="teacher training steps")
    parser.add_argument("--temperature", type=float, default=1.5, help="the calibration temperature T")
    parser.add_argument("--divergence", choices=["forward_kl", "reverse_kl", "jsd"], default="forward_kl")
    parser.add_argument("--beta", type=float, default=0.5, help="JSD interpolation (TRL's beta)")
    parser.add_argument("--out", type=Path, default=None, help="keep the cache here (default: a temporary folder)")
    args = parser.parse_args()

    train, held_out = make_corpus(64, 24, seed=0), make_corpus(16, 24, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.out or Path(tmp) / "cache"
        teacher = train_teacher(train, args.teacher_steps)
        manifest = export_token_soft_labels(teacher, Corpus(train), folder, temperature=args.temperature,
                                            shard_rows=32, batch_size=16, overwrite=True)
        print(f"cache: {manifest.data['num_tokens']} scored tokens of {manifest.num_samples} sequences, "
              f"top-{manifest.layout.k} of V = {manifest.num_classes}, T = {manifest.temperature:g}")
        del teacher  # training below never touches the teacher

        cache = TokenSoftLabelCache(folder)                                              # <- cache
        student = tiny_llama(hidden=32, layers=1, seed=2)
        optimizer = torch.optim.AdamW(student.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(3)
        first = last = float("nan")
        print(f"student held-out NLL before: {held_out_nll(student, held_out):.3f}")
        for step in range(args.steps):
            rows = torch.randint(0, len(train), (8,), generator=g).tolist()
            ids, mask = pad([train[r] for r in rows])
            soft = cache.batch(rows, ids, attention_mask=mask)                           # <- cache
            logits = student(input_ids=ids, attention_mask=mask).logits
            loss = token_kd_loss(logits, soft, divergence=args.divergence, beta=args.beta)  # <- cache
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            last = loss.item()
            first = last if step == 0 else first
        print(f"KD loss ({args.divergence}): first step {first:.3f}, last step {last:.3f}")
        print(f"student held-out NLL after:  {held_out_nll(student, held_out):.3f}")


if __name__ == "__main__":
    main()
