"""Text collection: a Hugging Face teacher on text rows, against the loop you would write yourself.

Part 1 (teacher overhead): the same tokenised batches through
``collect_logits(load_teacher(dir), batches)`` and through a bare
``model(**batch).logits`` loop (torch.inference_mode, logits gathered on the CPU).
Target: the pipeline reaches >= 0.95x the bare loop's throughput.

Part 2 (tokenisation, reported separately): the whole text path, ``collect_logits`` over
``open_text(rows.jsonl)`` (read + tokenise + pad per batch + teacher), against the tokeniser
alone on the same rows (``open_text`` batches with no teacher) and the bare loop.

    python benchmarks/bench_text.py                  # CPU defaults (about a minute)
    python benchmarks/bench_text.py --device cuda --n 20000 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from calibrate_teacher.collect import collect_logits
from calibrate_teacher.data.text import open_text
from calibrate_teacher.teachers import load_teacher

WORDS = [
    "good",
    "great",
    "fine",
    "happy",
    "love",
    "nice",
    "bad",
    "awful",
    "poor",
    "sad",
    "hate",
    "nasty",
    "the",
    "a",
    "film",
    "movie",
    "plot",
    "actor",
    "scene",
    "story",
    "it",
    "was",
    "is",
    "and",
    "very",
    "quite",
    "somewhat",
]


def build_teacher(folder: Path, *, hidden: int, layers: int) -> Path:
    """A randomly initialised BERT classifier with a WordPiece tokenizer trained here."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator([" ".join(WORDS)] * 4, trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials))
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=128,
    )
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=4 * hidden,
        max_position_embeddings=128,
        num_labels=3,
        pad_token_id=tokenizer.pad_token_id,
    )
    BertForSequenceClassification(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_rows(path: Path, n: int) -> list[str]:
    gen = torch.Generator().manual_seed(0)
    texts = []
    with path.open("w") as fh:
        for i in range(n):
            length = int(torch.randint(4, 48, (1,), generator=gen))
            words = torch.randint(0, len(WORDS), (length,), generator=gen).tolist()
            text = " ".join(WORDS[w] for w in words)
            texts.append(text)
            fh.write(json.dumps({"text": text, "label": i % 3}) + "\n")
    return texts


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n", type=int, default=2048, help="text rows")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.exit(2, f"bench_text.py: --device {args.device}: torch sees no CUDA device here\n")
    from transformers import AutoModelForSequenceClassification

    tmp = Path(tempfile.mkdtemp(prefix="bench_text_"))
    folder = build_teacher(tmp / "bert", hidden=args.hidden, layers=args.layers)
    rows = tmp / "rows.jsonl"
    write_rows(rows, args.n)
    source = open_text(rows, tokenizer=folder, max_length=128)
    # The same tokenised batches for both sides of part 1, made once.
    batches = [(dict(b.inputs), b.labels) for b in source.batches(batch_size=args.batch_size)]
    teacher = load_teacher(folder, device=args.device)
    model = AutoModelForSequenceClassification.from_pretrained(str(folder), local_files_only=True)
    model = model.to(args.device).eval()

    def bare() -> torch.Tensor:
        outs = []
        with torch.inference_mode():
            for inputs, _ in batches:
                feed = {k: v.to(args.device) for k, v in inputs.items()}
                outs.append(model(**feed).logits.float().cpu())
        return torch.cat(outs)

    def pipeline() -> torch.Tensor:
        return collect_logits(teacher, batches).logits

    def full_text() -> torch.Tensor:
        return collect_logits(teacher, source, batch_size=args.batch_size).logits

    def tokenise_only() -> None:
        for _ in source.batches(batch_size=args.batch_size):
            pass

    assert torch.allclose(bare(), pipeline(), atol=1e-5), "the pipeline must give the bare loop's logits"
    results: dict[str, object] = {
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "device": args.device,
            "cuda": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        },
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "tokens_per_row": float(sum(int(i["attention_mask"].sum()) for i, _ in batches)) / args.n,
    }
    # Interleaved, so load on this shared machine slows every side alike.
    samples: dict[str, list[float]] = {"bare": [], "pipeline": [], "full_text": [], "tokenise_only": []}
    for _ in range(args.repeats):
        for name, fn in (
            ("bare", bare),
            ("pipeline", pipeline),
            ("full_text", full_text),
            ("tokenise_only", tokenise_only),
        ):
            samples[name] += timed(fn, 1)
    medians = {name: statistics.median(times) for name, times in samples.items()}
    results["seconds"] = medians
    results["rows_per_s"] = {name: args.n / t for name, t in medians.items()}
    results["pipeline_vs_bare"] = medians["bare"] / medians["pipeline"]
    results["full_text_vs_bare"] = medians["bare"] / medians["full_text"]
    results["tokenise_share_of_full"] = medians["tokenise_only"] / medians["full_text"]
    print(json.dumps(results, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
