"""Build the example language-model teacher in examples/lm/: a tiny, overconfident Llama.

Nothing is downloaded: the sentences come from a small grammar written here, the byte-level BPE
tokenizer is trained here with ``tokenizers``, and the model is a randomly initialised
``LlamaForCausalLM`` (hidden 32, 2 layers, untied head) trained with Adam on the sentences, then
sharpened (its head scaled by 3), as teachers trained past their best validation loss are. Writes:

- ``tiny-llama/``: what ``save_pretrained`` writes (``config.json``, ``model.safetensors``,
  ``generation_config.json``, the tokenizer files);
- ``val.jsonl`` and ``train.jsonl``: ``{"id", "text"}`` rows.

Seeded; about 30 s on two CPU cores.

    python examples/make_lm_teacher.py --overwrite
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch

SUBJECTS = ["the cat", "a dog", "my friend", "the teacher", "a student", "the model"]
VERBS = ["sees", "likes", "reads", "finds", "writes", "knows"]
OBJECTS = ["a book", "the paper", "an answer", "the result", "a story", "the code"]
ENDINGS = ["today", "again", "quickly", "at night", "in the morning", "with care"]


def make_rows(n: int, seed: int) -> list[dict[str, str]]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        parts = [rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS)]
        if rng.random() < 0.7:
            parts.append(rng.choice(ENDINGS))
        rows.append({"id": f"s{seed}-{i:04d}", "text": " ".join(str(p) for p in parts) + "."})
    return rows


def train_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=160, special_tokens=["<pad>", "<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        model_max_length=64,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "lm")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    if args.out.exists():
        if not args.overwrite:
            parser.exit(2, f"{args.out}: already exists; pass --overwrite to rebuild it\n")
        shutil.rmtree(args.out)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    train, val = make_rows(400, seed=0), make_rows(120, seed=1)
    tokenizer = train_tokenizer([r["text"] for r in train])
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    enc = tokenizer([r["text"] for r in train], padding=True, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    loss = torch.tensor(0.0)
    for step in range(args.steps):
        idx = torch.arange(step * 32, step * 32 + 32) % len(train)
        loss = model(input_ids=enc["input_ids"][idx], attention_mask=enc["attention_mask"][idx],
                     labels=labels[idx]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)
    folder = args.out / "tiny-llama"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    for name, rows in (("train.jsonl", train), ("val.jsonl", val)):
        with (args.out / name).open("w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"wrote {folder} (final training loss {float(loss.detach()):.3f}), {args.out / 'val.jsonl'}, "
          f"{args.out / 'train.jsonl'}")


if __name__ == "__main__":
    main()
