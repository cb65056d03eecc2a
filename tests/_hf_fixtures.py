"""Tiny Hugging Face model directories built in the test session: nothing is downloaded.

Each directory is what ``save_pretrained`` writes for a real (if tiny) teacher: a randomly
initialised BERT, DistilBERT or RoBERTa sequence classifier (hidden 32, 2 layers) with a
tokenizer trained here with ``tokenizers`` (WordPiece for BERT/DistilBERT, byte-level BPE for
RoBERTa) and saved as a ``PreTrainedTokenizerFast``, or a ViT image classifier with a
``preprocessor_config.json``; each is trained for a few hundred steps on data written here, so
it is accurate on its data and overconfident, as teachers are.

Use from a test file::

    from _hf_fixtures import hf_dirs, text_batch  # hf_dirs is a session-scoped pytest fixture

    def test_x(hf_dirs):
        bert = hf_dirs["bert"]          # a Path
        batch, labels = text_batch(bert, TEXTS[:8])

or call :func:`build_hf_directory` for a variant (placeholder labels, bf16, other classes).
Imports nothing from the package under test.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

KINDS = ("bert", "distilbert", "roberta", "vit")
TEXT_KINDS = ("bert", "distilbert", "roberta")
LABELS = ("negative", "neutral", "positive")
HIDDEN, LAYERS, HEADS, INTERMEDIATE, MAX_LEN = 32, 2, 2, 64, 32
IMAGE_SIZE, PATCH = 16, 4
_POSITIVE = ["good", "great", "fine", "happy", "love", "nice", "superb", "lovely", "bright", "calm"]
_NEGATIVE = ["bad", "awful", "poor", "sad", "hate", "nasty", "grim", "dull", "broken", "angry"]
_NEUTRAL = [
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
_STEPS = {"bert": 300, "distilbert": 200, "roberta": 200, "vit": 200}
_LR = {"bert": 2e-3, "distilbert": 5e-3, "roberta": 5e-3, "vit": 5e-3}
PREPROCESSOR = {
    "image_processor_type": "ViTImageProcessor",
    "do_resize": True,
    "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    "resample": 2,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
}


def make_texts(n: int, seed: int = 0, noise: float = 0.1) -> tuple[list[str], list[int]]:
    """Sentences of sentiment words and filler; label = which sentiment dominates (0, 1, 2).

    A fraction ``noise`` of the labels is replaced by a random one, so a teacher trained to fit
    its data is overconfident on held-out texts.
    """
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for _ in range(n):
        label = int(rng.integers(0, 3))
        pos, neg = {0: (0, 2), 1: (1, 1), 2: (2, 0)}[label]
        words = list(rng.choice(_POSITIVE, pos)) + list(rng.choice(_NEGATIVE, neg))
        words += list(rng.choice(_NEUTRAL, int(rng.integers(2, 8))))
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(int(rng.integers(0, 3)) if rng.random() < noise else label)
    return texts, labels


#: Validation-style texts a test can tokenise (a different seed from the training texts).
TEXTS, TEXT_LABELS = make_texts(64, seed=1)


def make_images(n: int, seed: int = 0, noise: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """``pixel_values`` [n, 3, 16, 16] (already normalised) whose brightest channel is the label.

    A fraction ``noise`` of the labels is replaced by a random one (see :func:`make_texts`).
    """
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=gen)
    x = torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen) * 0.5
    x[torch.arange(n), labels] += 0.6
    flip = torch.rand(n, generator=gen) < noise
    labels = torch.where(flip, torch.randint(0, 3, (n,), generator=gen), labels)
    return x, labels


def train_tokenizer(kind: str, texts: list[str]) -> object:
    """A ``PreTrainedTokenizerFast`` trained on ``texts``: WordPiece (BERT-style) or byte-level BPE."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "roberta":
        special = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=special))
        tok.post_processor = processors.RobertaProcessing(
            ("</s>", tok.token_to_id("</s>")), ("<s>", tok.token_to_id("<s>"))
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token="<s>",
            eos_token="</s>",
            sep_token="</s>",
            cls_token="<s>",
            unk_token="<unk>",
            pad_token="<pad>",
            mask_token="<mask>",
            model_input_names=["input_ids", "attention_mask"],
            model_max_length=MAX_LEN,
        )
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=200, special_tokens=special))
    tok.post_processor = processors.BertProcessing(
        ("[SEP]", tok.token_to_id("[SEP]")), ("[CLS]", tok.token_to_id("[CLS]"))
    )
    names = (
        ["input_ids", "attention_mask"] if kind == "distilbert" else ["input_ids", "token_type_ids", "attention_mask"]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=MAX_LEN,
        model_input_names=names,
    )


def make_config(kind: str, *, vocab_size: int = 0, pad_token_id: int = 0, id2label: dict[int, str] | None = None):
    """A tiny transformers config for ``kind`` (hidden 32, 2 layers, 2 heads)."""
    from transformers import BertConfig, DistilBertConfig, RobertaConfig, ViTConfig

    labels = {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}} if id2label else {"num_labels": 3}
    common = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    if kind == "bert":
        return BertConfig(
            vocab_size=vocab_size,
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            intermediate_size=INTERMEDIATE,
            max_position_embeddings=MAX_LEN,
            pad_token_id=pad_token_id,
            **common,
            **labels,
        )
    if kind == "distilbert":
        return DistilBertConfig(
            vocab_size=vocab_size,
            dim=HIDDEN,
            n_layers=LAYERS,
            n_heads=HEADS,
            hidden_dim=INTERMEDIATE,
            max_position_embeddings=MAX_LEN,
            pad_token_id=pad_token_id,
            dropout=0.0,
            attention_dropout=0.0,
            seq_classif_dropout=0.0,
            **labels,
        )
    if kind == "roberta":
        return RobertaConfig(
            vocab_size=vocab_size,
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            intermediate_size=INTERMEDIATE,
            max_position_embeddings=MAX_LEN + 2,
            pad_token_id=pad_token_id,
            bos_token_id=0,
            eos_token_id=2,
            type_vocab_size=1,
            **common,
            **labels,
        )
    if kind == "vit":
        return ViTConfig(
            image_size=IMAGE_SIZE,
            patch_size=PATCH,
            num_channels=3,
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            intermediate_size=INTERMEDIATE,
            **common,
            **labels,
        )
    raise ValueError(kind)


@dataclass(frozen=True)
class Trained:
    """A built directory and what it was trained on."""

    path: Path
    kind: str
    final_loss: float


def build_hf_directory(
    kind: str,
    out: Path,
    *,
    steps: int | None = None,
    id2label: dict[int, str] | None = None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    lr: float | None = None,
) -> Trained:
    """Train a tiny ``kind`` classifier and ``save_pretrained`` it (with tokenizer / processor) into ``out``.

    ``id2label`` None gives transformers' placeholders (``LABEL_0``...); pass
    ``dict(enumerate(LABELS))`` for real names. ``dtype`` casts the saved weights (config dtype too).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster on a shared machine
    try:
        return _build(kind, out, steps=steps, id2label=id2label, dtype=dtype, seed=seed, lr=lr)
    finally:
        torch.set_num_threads(threads)


def _build(kind: str, out: Path, *, steps: int | None, id2label, dtype, seed: int, lr: float | None) -> Trained:
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    tokenizer = None
    if kind == "vit":
        config = make_config(kind, id2label=id2label)
        model = AutoModelForImageClassification.from_config(config)
        x, y = make_images(128, seed=seed)

        def batches(step: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
            idx = torch.arange(step * 32, step * 32 + 32) % x.shape[0]
            return {"pixel_values": x[idx]}, y[idx]
    else:
        texts, labels = make_texts(128, seed=seed)
        tokenizer = train_tokenizer(kind, texts)
        config = make_config(kind, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, id2label=id2label)
        model = AutoModelForSequenceClassification.from_config(config)
        enc = tokenizer(texts, padding=True, truncation=True, max_length=MAX_LEN, return_tensors="pt")
        y_all = torch.tensor(labels)

        def batches(step: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
            idx = torch.arange(step * 32, step * 32 + 32) % len(texts)
            return {k: v[idx] for k, v in enc.items() if k in model_inputs}, y_all[idx]

        import inspect

        model_inputs = set(inspect.signature(model.forward).parameters)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr if lr is not None else _LR[kind])
    model.train()
    loss = torch.tensor(0.0)
    for step in range(steps if steps is not None else _STEPS[kind]):
        inputs, target = batches(step)
        loss = torch.nn.functional.cross_entropy(model(**inputs).logits, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    if dtype is not None:
        model = model.to(dtype)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    else:
        (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2) + "\n")
    return Trained(out, kind, float(loss.detach()))


def text_batch(directory: Path, texts: list[str], *, pair: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The directory's own tokenizer on ``texts`` (padded, as tensors): what the model takes."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    return dict(tokenizer(texts, pair, padding=True, truncation=True, max_length=MAX_LEN, return_tensors="pt"))


def reference_model(directory: Path, *, image: bool = False) -> torch.nn.Module:
    """The directory loaded by transformers directly (the test's own reference), in eval mode."""
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

    cls = AutoModelForImageClassification if image else AutoModelForSequenceClassification
    return cls.from_pretrained(str(directory), local_files_only=True).eval()


#: Directories built in this process, shared by every test module that imports ``hf_dirs``
#: (pytest makes one session fixture per importing module; this keeps it one build per run).
_BUILT: dict[str, Path] = {}


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``{"bert", "distilbert", "roberta", "vit"}`` -> a trained tiny directory with real label names.

    Built once per test run; treat them as read-only (copy one before changing it).
    """
    if not _BUILT:
        root = tmp_path_factory.mktemp("hf")
        for kind in KINDS:
            _BUILT[kind] = build_hf_directory(kind, root / kind, id2label=dict(enumerate(LABELS))).path
    return dict(_BUILT)
