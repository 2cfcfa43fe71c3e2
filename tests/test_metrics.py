import math
import warnings

import numpy as np
import pytest
import torch

from personaedit.edits import ActivationEdit, BaseModelInfo, Intervention
from personaedit.eval import metrics as M
from personaedit.models import scoring
from tiny import tiny_lm

COHERENT = "the quick brown fox jumps over a lazy dog while seven small birds sing in tall green trees today"


def steering(lm, strength_vector=3.0):
    vector = strength_vector * torch.linspace(-1, 1, lm.arch.hidden_size)
    return ActivationEdit(method="test", base=BaseModelInfo.of(lm),
                          interventions=(Intervention("residual", 1, vector, positions="generated"),))


def manual_answer_logprobs(lm, prompt, answer):
    """One unpadded forward pass with the shift written out."""
    p = scoring.prompt_ids(lm, prompt)
    a = lm.tokenizer(answer, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = lm.model(torch.tensor([p + a])).logits[0].float().log_softmax(-1)
    return torch.stack([logp[len(p) - 1 + k, tok] for k, tok in enumerate(a)])


# --- coherence -------------------------------------------------------------------------------------

def test_ngram_entropy_hand_computed():
    # "a b a b": bigrams ab×2, ba×1 -> H2 = -(2/3 log2 2/3 + 1/3 log2 1/3) = 0.918296; trigrams aba, bab -> H3 = 1.
    # mean(2/3 · 0.918296, 4/3 · 1) = (0.612197 + 1.333333) / 2 = 0.972765
    assert M.ngram_entropy("A b a B") == pytest.approx(0.972765, abs=1e-6)
    # "the cat sat on the mat ." -> 7 tokens, 6 distinct bigrams, 5 distinct trigrams:
    # (2/3 log2 6 + 4/3 log2 5) / 2 = (1.723308 + 3.095903) / 2 = 2.409606
    assert M.ngram_entropy("The cat sat on the mat.") == pytest.approx(2.409606, abs=1e-6)
    assert M.ngram_entropy("") == 0.0 and M.ngram_entropy("word") == 0.0
    # 19 distinct words: (2/3 log2 18 + 4/3 log2 17) / 2 = 4.115 -> coherent; repetition is not
    assert M.is_coherent(COHERENT) and not M.is_coherent("yes " * 40)
    assert M.coherent_pairs([COHERENT, COHERENT, "no no no"], [COHERENT, "ok ok", COHERENT]) == [0]
    assert M.first_line("\n  Hello there \nsecond") == "Hello there"


# --- log-probabilities -----------------------------------------------------------------------------

def test_answer_logprobs_match_manual_shift_with_left_padding(lm):
    prompts = ["Hi", "What do you think of jazz music and parties at night?", "Plans?"]
    answers = ["I love it.", "It is relaxing", " quiet evening at home with a book"]
    batched = scoring.answer_logprobs(lm, prompts, answers, batch_size=3)  # one left-padded batch of unequal lengths
    for prompt, answer, got in zip(prompts, answers, batched):
        want = manual_answer_logprobs(lm, prompt, answer)
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5)
    means = scoring.mean_answer_logprob(lm, prompts, answers, batch_size=2)
    assert means == pytest.approx([float(t.mean()) for t in batched], abs=1e-5)
    rows = scoring.answer_next_token_logprobs(lm, prompts, answers, batch_size=3)
    ids = lm.tokenizer(answers[1], add_special_tokens=False)["input_ids"]
    assert rows[1].shape == (len(ids), 384)
    assert torch.allclose(rows[1][torch.arange(len(ids)), ids], batched[1], atol=1e-6)
    assert scoring.answer_logprobs(lm, ["Hi"], [""])[0].numel() == 0 and math.isnan(scoring.mean_answer_logprob(lm, ["Hi"], [""])[0])


def test_gpt2_absolute_positions_survive_left_padding():
    lm = tiny_lm("gpt2")
    prompts, answers = ["Hi", "What do you think of jazz music at parties?"], ["Yes.", "It is lively"]
    for got, p, a in zip(scoring.answer_logprobs(lm, prompts, answers), prompts, answers):
        assert torch.allclose(got, manual_answer_logprobs(lm, p, a), atol=1e-5)


def test_next_token_logprobs_is_last_prompt_position(lm):
    prompts = ["Hi", "What do you think of jazz music?"]
    got = scoring.next_token_logprobs(lm, prompts)
    for row, prompt in zip(got, prompts):
        with torch.no_grad():
            want = lm.model(torch.tensor([scoring.prompt_ids(lm, prompt)])).logits[0, -1].log_softmax(-1)
        assert torch.allclose(row, want, atol=1e-5)


def test_activation_edit_at_generated_positions_acts_on_answer_only(lm):
    seen = []
    handle = lm.model.register_forward_hook(lambda _m, _a, out: seen.append(out.logits.detach().clone()))
    prompt, answer = "What do you think of jazz music?", "It is relaxing and lively."
    n_prompt = len(scoring.prompt_ids(lm, prompt))
    try:
        before = scoring.answer_logprobs(lm, [prompt], [answer])[0]
        with steering(lm).apply(lm):
            after = scoring.answer_logprobs(lm, [prompt], [answer])[0]
    finally:
        handle.remove()
    base_logits, edited_logits = seen
    # positions before the last prompt token are untouched; from it onwards (it predicts answer token 1) all move
    assert torch.equal(base_logits[0, :n_prompt - 1], edited_logits[0, :n_prompt - 1])
    assert (edited_logits[0, n_prompt - 1:] - base_logits[0, n_prompt - 1:]).abs().amax(-1).min() > 1e-4
    assert (after - before).abs().min() > 0


# --- capability ------------------------------------------------------------------------------------

def test_perplexity_is_exp_token_weighted_nll(lm):
    texts = ["I love meeting new people.", "The weather today is calm and the sea is blue.", "x"]
    nll, count = 0.0, 0
    for text in texts:
        ids = lm.tokenizer(text)["input_ids"]
        if len(ids) < 2:
            continue
        with torch.no_grad():
            logits = lm.model(torch.tensor([ids])).logits[0]
        nll += float(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum"))
        count += len(ids) - 1
    assert M.perplexity(lm, texts, batch_size=3) == pytest.approx(math.exp(nll / count), rel=1e-5)
    with pytest.raises(ValueError):
        M.perplexity(lm, ["x"])


def test_kl_and_drawdown_hand_computed():
    half = torch.log(torch.tensor([[0.5, 0.5]]))
    skew = torch.log(torch.tensor([[0.25, 0.75]]))
    # KL(half ‖ skew) = 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75) = 0.5 ln(4/3) = 0.143841
    assert M.kl_to_base(half, skew) == pytest.approx(0.5 * math.log(4 / 3), abs=1e-6)
    assert M.kl_to_base(half, half) == 0.0
    one_hot = torch.log(torch.tensor([[1.0, 0.0]]))  # zero-probability terms contribute 0, not NaN
    assert M.kl_to_base(one_hot, half) == pytest.approx(math.log(2), abs=1e-6)
    base = [half, torch.cat([half, half])]
    edited = [skew, torch.cat([half, half])]
    # DD: per-text means 0.143841 and 0 -> 0.071921; token-weighted KL: 0.143841 / 3 = 0.047947
    assert M.drawdown(base, edited) == pytest.approx(0.25 * math.log(4 / 3), abs=1e-6)
    assert M.kl_to_base(base, edited) == pytest.approx(0.5 * math.log(4 / 3) / 3, abs=1e-6)


def test_kl_zero_for_identical_model_runs(lm):
    rows = scoring.answer_next_token_logprobs(lm, ["Hi"], ["I love it."])
    assert M.kl_to_base(rows, scoring.answer_next_token_logprobs(lm, ["Hi"], ["I love it."])) == 0.0
    assert M.kl_to_base(scoring.next_token_logprobs(lm, ["Hi"]), scoring.next_token_logprobs(lm, ["Hi"])) == 0.0


# --- PersonalityEdit -------------------------------------------------------------------------------

def test_edit_success_hand_computed():
    # sigmoid(-2 - -3) · min(1, exp(-2 - -2.5)) = sigmoid(1) · 1 = 0.731059
    assert M.edit_success(-2.0, -3.0, -2.5) == pytest.approx(0.731059, abs=1e-6)
    # sigmoid(-1) · exp(-1) = 0.268941 · 0.367879 = 0.098938
    assert M.edit_success(-3.0, -2.0, -2.0) == pytest.approx(0.098938, abs=1e-6)
    # token-weighted: (-1 - 2 - 3) / 3 = -2
    assert M.token_mean([torch.tensor([-1.0]), torch.tensor([-2.0, -3.0])]) == pytest.approx(-2.0)


def test_measure_es_and_dd_on_tiny_model(lm):
    target = [("What do you think of parties?", "I love meeting new people at parties.")]
    other = [("What do you think of parties?", "I prefer a quiet evening at home.")]
    lp = lambda pairs: M.token_mean(scoring.answer_logprobs(lm, [q for q, _ in pairs], [a for _, a in pairs]))  # noqa: E731
    edit = steering(lm)
    # strength 0: edited == base, so ES = sigmoid(lp(target) - lp(other))
    assert M.measure_es(lm, edit, target, other, strength=0.0) == pytest.approx(
        M.edit_success(lp(target), lp(other), lp(target)), abs=1e-6)
    with edit.apply(lm):
        te, oe = lp(target), lp(other)
    assert M.measure_es(lm, edit, target, other) == pytest.approx(M.edit_success(te, oe, lp(target)), abs=1e-6)
    outer = other + [("Plans?", "Lists keep my week in order.")]
    assert M.measure_dd(lm, edit, outer, strength=0.0) == pytest.approx(0.0, abs=1e-7)
    assert M.measure_dd(lm, edit, outer, batch_size=1) > 1e-4


def test_classifier_and_rating_metrics_hand_computed():
    probs = [[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.4, 0.4, 0.2]]
    assert M.accuracy(probs, 0) == pytest.approx(2 / 3)  # ties go to the first column (argmax)
    assert M.accuracy(probs, [0, 1, 2]) == pytest.approx(2 / 3)
    # CE(0.2) - CE(0.8) = ln 0.8 - ln 0.2 = ln 4
    assert M.tpei([[0.2, 0.5, 0.3]], [[0.8, 0.1, 0.1]], 0) == pytest.approx(math.log(4))
    assert M.pae([1, 2, 3], [3, 3, 3]) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        M.pae([0], [3])

    def classify(texts):
        return np.array([[0.9, 0.1] if "fox" in t else [0.3, 0.7] for t in texts])

    base = ["seven small birds sing " + COHERENT, COHERENT.replace("fox", "cat"), "no no no"]
    edited = [COHERENT, COHERENT, COHERENT]
    out = M.text_metrics([b.replace("fox", "cat") for b in base], edited, 0, classify,
                         rate=lambda ts: [4.0] * len(ts))
    assert out["coherent"] == 2 and out["acc"] == 1.0
    assert out["tpei"] == pytest.approx(math.log(0.9 / 0.3)) and out["pae"] == 0.0
    assert math.isnan(M.text_metrics(["no"], ["no"], 0, classify)["acc"])


def test_answer_pairs_generates_base_then_edited(lm):
    base, edited = M.answer_pairs(lm, steering(lm, 20.0), ["Hi", "Plans?"], max_new_tokens=5)
    assert len(base) == len(edited) == 2 and base != edited and all("\n" not in t for t in base + edited)


# --- controllability and PALETTE -------------------------------------------------------------------

def test_correlations():
    assert M.pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(0.993399, abs=1e-6)  # r = 5 / sqrt(2 · 12.6667)
    assert M.spearman([1, 2, 3], [2, 4, 7]) == pytest.approx(1.0)
    assert M.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert M.pearson([1, 1, 1], [1, 2, 3]) == 0.0 and M.spearman([1, 2, 3], [5, 5, 5]) == 0.0
        assert M.pearson([1, float("nan"), 3], [1, 2, 3]) == pytest.approx(1.0) and M.pearson([1], [2]) == 0.0


def test_palette_rates():
    assert M.expression_rate([0.9, 0.5, 0.2, 0.51]) == pytest.approx(0.5)  # 0.5 itself does not count
    assert M.win_rate([1, 1, -1, 0]) == pytest.approx(2.5 / 4)
    with pytest.raises(ValueError):
        M.win_rate([2])
