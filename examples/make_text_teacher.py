"""Build the example text teacher in examples/text/: a tiny, overconfident BERT sentiment classifier.

Nothing is downloaded: the texts are made here (sentences of sentiment words and filler; the
label is which sentiment dominates, with 15 % of the labels replaced by a random one), the
WordPiece tokenizer is trained here with ``tokenizers``, and the model is a randomly initialised
``BertForSequenceClassification`` (hidden 32, 2 layers) trained with Adam until it fits its
training texts, so it is overconfident on held-out ones. Writes:

- ``bert-teacher/``: what ``save_pretrained`` writes for a real teacher (``config.json`` with
  ``id2label``, ``model.safetensors``, the tokenizer files);
- ``val.jsonl`` and ``train.jsonl``: ``{"id", "text", "label"}`` rows, labels as names.

Seeded; about 30 s on two CPU cores.

    python examples/make_text_teacher.py --overwrite
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch

LABELS = ("negative", "neutral", "positive")
POSITIVE = "good great fine happy love nice superb lovely bright calm".split()  # noqa: SIM905
NEGATIVE = "bad awful poor sad hate nasty grim dull broken angry".split()  # noqa: SIM905
FILLER = "the a film movie plot actor scene story it was is and very quite somewhat".split()  # noqa: SIM905


def make_rows(n: int, seed: int, noise: float = 0.15) -> list[dict[str, object]]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = int(rng.integers(0, 3))
        pos, neg = {0: (0, 2), 1: (1, 1), 2: (2, 0)}[label]
        words = list(rng.choice(POSITIVE, pos)) + list(rng.choice(NEGATIVE, neg))
        words += list(rng.choice(FILLER, int(rng.integers(2, 10))))
        rng.shuffle(words)
        if rng.random() < noise:
            label = int(rng.integers(0, 3))
        rows.append({"id": f"s{seed}-{i:05d}", "text": " ".join(words), "label": LABELS[label]})
    return rows


def train_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=200, special_tokens=special))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=64,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "text")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    if args.out.exists():
        if not args.overwrite:
            parser.exit(2, f"{args.out}: already exists; pass --overwrite to rebuild it\n")
        shutil.rmtree(args.out)
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    train, val = make_rows(300, seed=0), make_rows(400, seed=1)
    tokenizer = train_tokenizer([r["text"] for r in train])
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
        num_labels=3, id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)},
    )
    model = BertForSequenceClassification(config)
    enc = tokenizer([r["text"] for r in train], padding=True, return_tensors="pt")
    y = torch.tensor([LABELS.index(r["label"]) for r in train])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(args.steps):
        idx = torch.arange(step * 32, step * 32 + 32) % len(train)
        loss = torch.nn.functional.cross_entropy(model(**{k: v[idx] for k, v in enc.items()}).logits, y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    folder = args.out / "bert-teacher"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    for name, rows in (("train.jsonl", train), ("val.jsonl", val)):
        with (args.out / name).open("w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"wrote {folder} (final training loss {float(loss):.3f}), {args.out / 'val.jsonl'}, "
          f"{args.out / 'train.jsonl'}")


if __name__ == "__main__":
    main()
