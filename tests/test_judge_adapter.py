"""Unit tests of the text judge's encoder adapter on a tiny random BERT (the real MiniLM is integration-only)."""

import json

import numpy as np
import pytest
import torch
import transformers as T
from tiny import tiny_tokenizer

from personaedit.errors import InputFileError
from personaedit.eval import judge_fit as jf
from personaedit.eval import text_judge as tj
from personaedit.eval.judge_adapter import AdapterTrainer, Example, pooled_features, save_adapter
from personaedit.models import encoders as enc
from personaedit.models.encoders import AdapterConfig, merge_adapter

LAYERS = enc.FEATURE_LAYERS
WORDS = {1: ["kind", "warm", "gentle", "patient"], 0: ["cold", "harsh", "rude", "curt"]}


def tiny_encoder(seed: int = 0) -> enc.SentenceEncoder:
    """A SentenceEncoder around a tiny random BERT (6 layers, hidden 16) and the tests' tiny tokenizer."""
    torch.manual_seed(seed)
    config = T.BertConfig(vocab_size=len(tiny_tokenizer()), hidden_size=16, num_hidden_layers=6, num_attention_heads=2,
                          intermediate_size=32, max_position_embeddings=64)
    encoder = object.__new__(enc.SentenceEncoder)
    encoder.model, encoder.tokenizer = T.BertModel(config).eval(), tiny_tokenizer()
    encoder.batch_size, encoder.max_length, encoder.device = 4, 32, "cpu"
    return encoder


def rows(n: int, seed: int) -> list[Example]:
    """Texts for two dimensions (0: a trait, 1: an axis) whose pole shows in the word choice."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        label, dim = i % 2, (i // 2) % 2
        words = rng.choice(WORDS[label], 3).tolist() + ["the", "day"]
        out.append(Example(" ".join(rng.permutation(words)), dim, label, 0 if dim == 0 else -1))
    return out


def trainer_for(seed: int = 0, epochs: int = 3) -> AdapterTrainer:
    cfg = AdapterConfig(rank=2, alpha=4.0, epochs=epochs, lr=1e-2, head_lr=3e-2, batch_size=8, seed=seed)
    return AdapterTrainer(tiny_encoder(), cfg, LAYERS, n_dims=2, n_traits=1)


def test_pooled_features_match_the_judge_features():
    encoder = tiny_encoder()
    texts = ["a kind day", "the harsh cold wind of the day", "ok"]
    batch = encoder.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        states = encoder.model(**batch, output_hidden_states=True).hidden_states
        ours = pooled_features(states, batch["attention_mask"], enc.FEATURE_LAYERS).numpy()
    assert ours.shape == (3, 6 * 2 * 16)  # six layers × (mean, max) × hidden
    np.testing.assert_allclose(ours, encoder.features(texts), atol=1e-6)


def test_training_learns_the_poles_is_seeded_and_keeps_the_best_epoch():
    train, held = rows(48, 0), rows(16, 1)
    scores = []

    def score(t):
        logits, _ = t.predict([r.text for r in held])
        acc = float(np.mean((logits[np.arange(len(held)), [r.dimension for r in held]] >= 0) == [r.label for r in held]))
        scores.append(acc)
        return acc

    trainer = trainer_for()
    trace = trainer.train(train, score)
    assert len(trace["epoch_loss"]) == 3 and trace["epoch_loss"][-1] < trace["epoch_loss"][0]
    assert scores[0] == 0.5  # zero heads before training: every logit 0, every text "high"
    assert trace["best_epoch"] == int(np.argmax(scores)) and max(scores) >= 0.9
    assert score(trainer) == max(scores)  # the kept state is the best epoch's
    again = trainer_for()
    again.train(train, score)
    for (name, a), (_, b) in zip(sorted(trainer._snapshot()["lora"].items()), sorted(again._snapshot()["lora"].items())):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_saved_adapter_merges_into_an_encoder_that_gives_the_trained_features(tmp_path):
    trainer = trainer_for(epochs=2)
    epochs = iter(range(10))
    trainer.train(rows(32, 0), lambda t: float(next(epochs)))  # always improving: the last epoch is kept
    path = tmp_path / "a.adapter.safetensors"
    save_adapter(trainer.model, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.adapter.safetensors"]
    texts = [r.text for r in rows(6, 3)]
    merged = tiny_encoder()
    merged.model = merge_adapter(merged.model, path, trainer.config)
    np.testing.assert_allclose(merged.features(texts), trainer.features(texts), atol=1e-5)
    plain = tiny_encoder().features(texts)
    assert np.abs(plain - trainer.features(texts)).max() > 1e-4  # the adapter changed something


def test_a_head_whose_adapter_is_missing_or_foreign_is_an_input_error(tmp_path):
    head = tj.JudgeHead(np.zeros((9, 4)), np.zeros(9), np.zeros((5, 4)), np.zeros(5))
    head.metadata["adapter"] = {"file": "h.adapter.safetensors", "config": AdapterConfig().to_json()}
    head.save(tmp_path / "h.safetensors")
    with pytest.raises(InputFileError, match="adapter"):
        tj.TextJudge.load(tmp_path / "h.safetensors")
    (tmp_path / "h.adapter.safetensors").write_bytes(b"not safetensors")
    judge = tj.TextJudge.load(tmp_path / "h.safetensors")
    assert judge.adapter == tmp_path / "h.adapter.safetensors"
    with pytest.raises(InputFileError, match="adapter"):
        merge_adapter(tiny_encoder().model, judge.adapter, AdapterConfig())


def test_adapter_config_round_trips_through_json():
    cfg = AdapterConfig(rank=3, targets=("query",), lr=5e-4)
    assert AdapterConfig.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg
    assert jf.adapter_path_for("/x/text_judge_head.safetensors").name == "text_judge_head.adapter.safetensors"
