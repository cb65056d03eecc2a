"""Sequence teachers (issue #13): loaders, the causal shift, the LM-head check, ONNX and re-run passes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _token_fixtures import reference_tokens, sampled_batches, tiny_causal_lm

from calibrate_teacher.errors import InputError, InvalidValueError
from calibrate_teacher.jobs._tokens import calibrate_tokens, evaluate_tokens
from calibrate_teacher.tokens import LmHead, load_token_teacher, scored_positions, shifted_targets
from calibrate_teacher.tokens._collect import collect_tokens


def test_causal_shift_hand_built():
    labels = torch.tensor([[10, 11, 12, 13], [20, 21, -100, -100], [30, -100, 32, 33]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]])
    s = scored_positions(mask, labels, task="causal-lm")
    # position t is scored against token t + 1; the last position and -100 targets are not
    assert s.mask.tolist() == [[True, True, True, False], [True, False, False, False], [False, True, True, False]]
    assert s.scored_targets().tolist() == [11, 12, 13, 21, 32, 33]
    assert s.rows.tolist() == [0, 0, 0, 1, 2, 2]
    tc = scored_positions(mask, labels, task="token-classification")
    assert tc.scored_targets().tolist() == [10, 11, 12, 13, 20, 21, 30, 32, 33]
    assert shifted_targets(labels, task="causal-lm")[:, -1].tolist() == [-100, -100, -100]


def test_scored_positions_refuse_bad_labels():
    with pytest.raises(InputError, match="outside"):
        scored_positions(None, torch.tensor([[1, 5]]), task="token-classification", vocab_size=3)
    with pytest.raises(InputError, match="batch, sequence"):
        scored_positions(None, torch.tensor([1, 2]), task="causal-lm")


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_hf_directories_load_with_their_head(tmp_path, kind):
    model = tiny_causal_lm(kind)
    model.save_pretrained(tmp_path / "m")
    teacher = load_token_teacher(tmp_path / "m", device="cpu")
    assert teacher.task == "causal-lm" and teacher.format == "huggingface" and teacher.vocab_size == 300
    assert teacher.head is not None
    batch = sampled_batches(model, batches=1)[0]
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    mine = teacher.head.logits(teacher.final_hidden(inputs))
    torch.testing.assert_close(mine, model(**inputs).logits, rtol=1e-5, atol=1e-5)


def test_softcapped_head_reproduces_gemma2_logits():
    model = tiny_causal_lm("gemma2", final_logit_softcapping=5.0, scale=1.0)
    teacher = load_token_teacher(model)
    assert teacher.head is not None and teacher.head.softcap == 5.0
    data = sampled_batches(model, batches=1, true_t=1.0)
    collected, _ = collect_tokens(teacher, data, batch_size=4, keep=False, accumulator=None)
    assert any("recomputed from final hidden states" in n for n in collected.notes)


def test_wrong_head_falls_back_to_model_logits_with_a_note():
    model = tiny_causal_lm("llama", seed=3)
    teacher = load_token_teacher(model)
    teacher.head = LmHead(weight=teacher.head.weight * 2, bias=None)
    data = sampled_batches(model, batches=2, seed=3)
    run = calibrate_tokens(teacher, data, objective="nll")
    assert any("did not reproduce" in n for n in run.notes)
    z, y, _ = reference_tokens(model, data)
    assert run.fit.before.nll == pytest.approx(
        float(-torch.log_softmax(z, 1).gather(1, y[:, None]).mean()), abs=1e-9)


@pytest.mark.slow
def test_bert_token_classifier_directory_gets_classwise_metrics(tmp_path):
    from transformers import BertConfig, BertForTokenClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32, num_labels=5,
                     id2label={i: f"TAG{i}" for i in range(5)}, label2id={f"TAG{i}": i for i in range(5)})
    BertForTokenClassification(cfg).save_pretrained(tmp_path / "bert")
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(2):
        ids = torch.randint(0, 100, (4, 10), generator=g)
        labels = torch.randint(0, 5, (4, 10), generator=g)
        labels[:, 0] = -100  # [CLS]
        data.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    run = evaluate_tokens(tmp_path / "bert", data, device="cpu")
    assert run.task == "token-classification" and run.metrics.num_tokens == 2 * 4 * 9
    assert run.teacher["class_names"] == [f"TAG{i}" for i in range(5)]
    m = run.metrics
    assert m.classwise_ece is not None and m.ace is not None and m.tace is not None and not m.not_computed
    fit = calibrate_tokens(tmp_path / "bert", data, objective="ace", device="cpu")
    assert fit.fit.after.ace <= fit.fit.before.ace + 1e-12


def _onnx_token_model(path, vocab, hidden=8, seed=0):
    """A hand-built ONNX graph: logits = Gather(E, input_ids) @ W + b; attention_mask is an (unused) input."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(vocab, hidden)).astype(np.float32)
    w = (rng.normal(size=(hidden, vocab)) * 1.5).astype(np.float32)
    b = rng.normal(size=(vocab,)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["E", "input_ids"], ["h"], axis=0),
         helper.make_node("MatMul", ["h", "W"], ["hw"]),
         helper.make_node("Add", ["hw", "b"], ["logits"])],
        "tok",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "S"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "S"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", "S", vocab])],
        [numpy_helper.from_array(emb, "E"), numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return lambda ids: emb[ids] @ w + b


def _id_batches(vocab, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (3, 7), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def test_onnx_token_classifier_logits_and_metrics(tmp_path):
    forward = _onnx_token_model(tmp_path / "tok.onnx", vocab=6)
    teacher = load_token_teacher(tmp_path / "tok.onnx", task="token-classification", device="cpu")
    assert teacher.format == "onnx" and teacher.vocab_size == 6 and teacher.head is None
    data = [{**b, "labels": b["input_ids"] % 6} for b in _id_batches(6)]
    got = teacher.logits({k: data[0][k] for k in ("input_ids", "attention_mask")})
    np.testing.assert_allclose(got.numpy(), forward(data[0]["input_ids"].numpy()), rtol=1e-5, atol=1e-5)
    run = evaluate_tokens(teacher, data)
    assert run.metrics.num_tokens == 3 * 3 * 7 and run.metrics.ace is not None
    with pytest.raises(InputError, match="task"):
        load_token_teacher(tmp_path / "tok.onnx")


def test_onnx_large_vocabulary_reruns_the_teacher_per_pass(tmp_path):
    forward = _onnx_token_model(tmp_path / "lm.onnx", vocab=1500, seed=1)
    teacher = load_token_teacher(tmp_path / "lm.onnx", task="causal-lm", device="cpu")
    rng = np.random.default_rng(1)
    data = []
    for _ in range(3):  # sequences sampled from the (Markov) model at T = 2: the NLL-optimal T is near 2
        ids = [rng.integers(0, 1500, size=3)]
        for _ in range(6):
            z = forward(ids[-1]) / 2.0
            p = np.exp(z - z.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            ids.append(np.array([rng.choice(1500, p=row) for row in p]))
        t = torch.tensor(np.stack(ids, axis=1))
        data.append({"input_ids": t, "attention_mask": torch.ones_like(t), "labels": t.clone()})
    run = calibrate_tokens(teacher, data, objective="nll")
    assert any("re-runs the teacher" in n for n in run.notes)
    z = torch.cat([teacher.logits(b)[:, :-1].reshape(-1, 1500) for b in data]).double()
    y = torch.cat([b["labels"][:, 1:].reshape(-1) for b in data])
    from _token_fixtures import newton_nll_t
    from scipy.optimize import minimize_scalar

    start = minimize_scalar(lambda t: float(-torch.log_softmax(z / t, 1).gather(1, y[:, None]).mean()),
                            bounds=(0.05, 20), method="bounded").x
    t_ref = newton_nll_t(z, y, start=start)
    assert 1.0 < t_ref < 5.0
    assert run.temperature == pytest.approx(t_ref, rel=1e-4)
    with pytest.raises(InvalidValueError, match="one-shot"):
        calibrate_tokens(teacher, iter(data), objective="nll")


def test_module_without_task_is_refused():
    with pytest.raises(InputError, match="task"):
        load_token_teacher(torch.nn.Linear(2, 2))
