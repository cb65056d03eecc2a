"""Token-level text data (#13): causal-LM labels, completion-only and chat scoring, word→sub-token tags."""

from __future__ import annotations

import pytest
import torch

from calibrate_teacher.data.tokens import IGNORE_INDEX, open_token_text
from calibrate_teacher.errors import InputError, InvalidValueError
from tests._tokenizer_fixtures import HAND_VOCAB, hand_tokenizer, write_rows

X = IGNORE_INDEX
ID = {w: i for i, w in enumerate(HAND_VOCAB)}

CHAT_GEN = (
    "{% for m in messages %}{{ m['role'] }} : {% if m['role'] == 'assistant' %}{% generation %}"
    "{{ m['content'] }} [SEP]{% endgeneration %}{% else %}{{ m['content'] }} [SEP]{% endif %} {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)
CHAT_PLAIN = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} [SEP] {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return hand_tokenizer(tmp_path_factory.mktemp("tok"))


def _one(source, **kw):
    (batch,) = list(source.batches(batch_size=8, **kw))
    return batch


def ids(text: str) -> list[int]:
    return [ID[w] for w in text.split()]


def test_causal_text_labels_are_the_tokens_with_padding_ignored(tmp_path, tok):
    path = write_rows(tmp_path / "t.jsonl", [{"text": "the cat sat"}, {"text": "dog ran"}])
    source = open_token_text(path, tokenizer=tok, task="causal-lm")
    batch = _one(source)
    assert batch.inputs["input_ids"].tolist() == [ids("[CLS] the cat sat [SEP]"), ids("[CLS] dog ran [SEP] [PAD]")]
    assert batch.inputs["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert batch.labels.tolist() == [ids("[CLS] the cat sat [SEP]"), [*ids("[CLS] dog ran [SEP]"), X]]
    assert batch.labels.dtype == torch.int64
    assert batch.keys == ("0", "1")
    d = source.description
    assert (d["rows_as"], d["scoring"]) == ("text", "every non-padding token")
    assert d["labels"].startswith("unshifted")
    with pytest.raises(
        InvalidValueError, match=r"completion_only: .* has text rows; it needs prompt/completion or messages"
    ):
        open_token_text(path, tokenizer=tok, task="causal-lm", completion_only=True)


def test_prompt_completion_scores_only_the_completion(tmp_path, tok):
    rows = [
        {"prompt": "the cat", "completion": "sat on a mat", "id": "a"},
        {"prompt": "dog", "completion": "ran fast", "id": "b"},
    ]
    path = write_rows(tmp_path / "pc.jsonl", rows)
    batch = _one(open_token_text(path, tokenizer=tok, task="causal-lm", completion_only=True, id_field="id"))
    assert batch.inputs["input_ids"].tolist() == [
        ids("[CLS] the cat [SEP] sat on a mat"),
        ids("[CLS] dog [SEP] ran fast [PAD] [PAD] [PAD]"),
    ]
    assert batch.labels.tolist() == [[X, X, X, X, *ids("sat on a mat")], [X, X, X, *ids("ran fast"), X, X, X]]
    assert batch.keys == ("a", "b")
    full = _one(open_token_text(path, tokenizer=tok, task="causal-lm"))
    assert full.labels.tolist() == [
        ids("[CLS] the cat [SEP] sat on a mat"),
        [*ids("[CLS] dog [SEP] ran fast"), X, X, X],
    ]
    cut = _one(open_token_text(path, tokenizer=tok, task="causal-lm", completion_only=True, max_length=6))
    assert cut.inputs["input_ids"][0].tolist() == ids("[CLS] the cat [SEP] sat on")
    assert cut.labels[0].tolist() == [X, X, X, X, *ids("sat on")]


@pytest.mark.parametrize("template", [CHAT_GEN, CHAT_PLAIN], ids=["generation-mask", "turn-boundaries"])
def test_chat_rows_score_only_assistant_turns(tmp_path, template):
    tok = hand_tokenizer(tmp_path / "tok", chat_template=template)
    chat = [
        {"role": "user", "content": "the cat"},
        {"role": "assistant", "content": "sat on a mat"},
        {"role": "user", "content": "dog"},
        {"role": "assistant", "content": "ran"},
    ]
    path = write_rows(tmp_path / "c.jsonl", [{"messages": chat}, {"messages": chat[:2]}])
    source = open_token_text(path, tokenizer=tmp_path / "tok", task="causal-lm", completion_only=True)
    batch = _one(source)
    rendered = "user : the cat [SEP] assistant : sat on a mat [SEP] user : dog [SEP] assistant : ran [SEP]"
    assert batch.inputs["input_ids"][0].tolist() == ids(rendered)
    assert batch.labels[0].tolist() == [X] * 7 + ids("sat on a mat [SEP]") + [X] * 6 + ids("ran [SEP]")
    assert batch.labels[1].tolist() == [X] * 7 + ids("sat on a mat [SEP]") + [X] * 8  # padding ignored
    assert batch.inputs["attention_mask"][1].tolist() == [1] * 12 + [0] * 8
    assert source.description["rows_as"] == "messages"
    everything = _one(open_token_text(path, tokenizer=tok, task="causal-lm"))
    assert everything.labels[0].tolist() == ids(rendered)


def test_chat_rows_need_a_chat_template(tmp_path, tok):
    path = write_rows(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "the cat"}]}])
    source = open_token_text(path, tokenizer=tok, task="causal-lm")
    with pytest.raises(InputError, match=r"has no chat template, so the 'messages' rows .* add chat_template"):
        _one(source)


def test_token_classification_labels_first_sub_token_of_each_word(tmp_path, tok):
    rows = [
        {"tokens": ["the", "cats", "playing", "dog"], "ner_tags": ["O", "B", "I", "B"]},
        {"tokens": ["mat"], "ner_tags": [2]},
    ]
    source = open_token_text(
        write_rows(tmp_path / "w.jsonl", rows), tokenizer=tok, task="token-classification", class_names=["O", "B", "I"]
    )
    batch = _one(source)
    assert batch.inputs["input_ids"].tolist() == [
        ids("[CLS] the cat ##s play ##ing dog [SEP]"),
        ids("[CLS] mat [SEP] [PAD] [PAD] [PAD] [PAD] [PAD]"),
    ]
    assert batch.labels.tolist() == [[X, 0, 1, X, 2, X, 1, X], [X, 2, X, X, X, X, X, X]]
    assert source.description["scoring"] == "first sub-token of each word"
    bad = write_rows(tmp_path / "bad.jsonl", [{"tokens": ["the", "cat"], "ner_tags": ["O", "PER"]}])
    with pytest.raises(
        InputError, match=r"line 1, word 1: unknown tag \(ner_tags\) 'PER'; the known names are: O, B, I"
    ):
        _one(open_token_text(bad, tokenizer=tok, task="token-classification", class_names=["O", "B", "I"]))
    short = write_rows(tmp_path / "short.jsonl", [{"tokens": ["the", "cat"], "ner_tags": ["O"]}])
    with pytest.raises(InputError, match=r"line 1: 2 words but 1 tags"):
        _one(open_token_text(short, tokenizer=tok, task="token-classification", class_names=["O", "B", "I"]))


@pytest.mark.parametrize("suffix", [".parquet", ""])
def test_list_fields_read_the_same_from_parquet_and_datasets(tmp_path, tok, suffix):
    rows = [
        {"tokens": ["the", "cats"] * (1 + i % 3), "ner_tags": [0, 1] * (1 + i % 3), "id": f"s{i}"} for i in range(11)
    ]
    a = open_token_text(
        write_rows(tmp_path / "a.jsonl", rows),
        tokenizer=tok,
        task="token-classification",
        class_names=["O", "B"],
        id_field="id",
        sort_by_length=True,
    )
    b = open_token_text(
        write_rows(tmp_path / f"b{suffix}", rows, row_group_size=4),
        tokenizer=tok,
        task="token-classification",
        class_names=["O", "B"],
        id_field="id",
        sort_by_length=True,
    )
    for x, y in zip(a.batches(batch_size=4), b.batches(batch_size=4), strict=True):
        assert x.keys == y.keys
        assert torch.equal(x.labels, y.labels)
        assert torch.equal(x.inputs["input_ids"], y.inputs["input_ids"])
        for i, index in enumerate(x.indices.tolist()):  # sorted, but each row keeps its key and labels
            assert x.keys[i] == rows[index]["id"]
            scored = x.labels[i][x.labels[i] != X].tolist()
            assert scored == rows[index]["ner_tags"]


def test_pre_tokenised_arrays_carry_the_same_token_labels(tmp_path, tok):
    import numpy as np

    from calibrate_teacher.data.arrays import ArraySource

    rows = [{"prompt": "the cat", "completion": "sat on a mat"}, {"prompt": "dog", "completion": "ran fast"}]
    batch = _one(
        open_token_text(write_rows(tmp_path / "pc.jsonl", rows), tokenizer=tok, task="causal-lm", completion_only=True)
    )
    arrays = {name: value.numpy() for name, value in batch.inputs.items()}
    np.savez(tmp_path / "lm.npz", labels=batch.labels.numpy(), **arrays)
    (again,) = list(ArraySource(tmp_path / "lm.npz").batches(batch_size=8))
    assert torch.equal(again.labels, batch.labels)
    for name in ("input_ids", "attention_mask"):
        assert torch.equal(again.inputs[name], batch.inputs[name])
