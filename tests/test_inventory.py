"""Inventory self-report: items from ffm, prompt text, the pure scoring steps, batched letter probabilities."""

import importlib.util
import json
import sys

import pytest
import torch

from personaedit.edits import ActivationEdit, ContextEdit, Intervention
from personaedit.errors import InputFileError, PersonaEditError
from personaedit.eval import inventory as inv
from personaedit.eval import ipip
from personaedit.models import scoring
from personaedit.persona import BIG_FIVE, MBTI

needs_ffm = pytest.mark.skipif(importlib.util.find_spec("FFM") is None, reason="ffm is not installed (pip install ffm)")


# ---------------------------------------------------------------------------------------------- items

@needs_ffm
def test_ipip_neo_120_items_and_keys_come_from_ffm():
    items = inv.ipip_neo_120()
    assert len(items) == 120 and [i.number for i in items] == list(range(1, 121))
    for trait, dim in BIG_FIVE.items():
        of_trait = [i for i in items if i.trait == trait]
        assert len(of_trait) == 24
        assert {f: sum(i.facet == f for i in of_trait) for f in dim.facets} == {f: 4 for f in dim.facets}
    reverse = {t: sum(i.reverse_keyed for i in items if i.trait == t) for t in BIG_FIVE}
    assert reverse == {"openness": 12, "conscientiousness": 13, "extraversion": 6, "agreeableness": 17,
                       "neuroticism": 7}
    by_number = {i.number: i for i in items}
    assert by_number[1] == inv.Item(1, "I worry about things.", "neuroticism", "anxiety", False)
    assert by_number[19] == inv.Item(19, "I love a good fight.", "agreeableness", "cooperation", True)
    assert by_number[30] == inv.Item(30, "I jump into things without thinking.", "conscientiousness",
                                     "cautiousness", True)
    assert by_number[62] == inv.Item(62, "I avoid contacts with others.", "extraversion", "friendliness", True)


@pytest.fixture
def without_ffm(monkeypatch):
    ipip._ipip_items.cache_clear()
    monkeypatch.setitem(sys.modules, "FFM", None)
    monkeypatch.setitem(sys.modules, "FFM.core", None)
    yield
    ipip._ipip_items.cache_clear()


def test_missing_ffm_is_a_clear_error(without_ffm):
    with pytest.raises(InputFileError, match="pip install ffm"):
        inv.ipip_neo_120()


def test_malformed_tables_are_refused():
    statements = [f"I do thing {i}." for i in range(120)]
    traits = {t.capitalize(): list(range(k, 120, 5)) for k, t in enumerate(BIG_FIVE)}
    ipip._check_tables(statements, traits, {t: set() for t in traits})  # well formed
    with pytest.raises(InputFileError, match="119 statements"):
        ipip._check_tables(statements[:-1], traits, {})
    with pytest.raises(InputFileError, match="outside their trait"):
        ipip._check_tables(statements, traits, {"Openness": {1}})


def test_second_person():
    assert ipip.second_person("I worry about things.") == "You worry about things."
    assert ipip.second_person("I feel that I'm unable to deal with things.") == (
        "You feel that you're unable to deal with things.")
    assert ipip.second_person("I am afraid to draw attention to myself.") == "You are afraid to draw attention to yourself."
    assert ipip.second_person("I do more than what's expected of me.") == "You do more than what's expected of you."
    assert ipip.second_person("Leave my belongings around") == "You leave your belongings around."  # IPIP verb phrase


# --------------------------------------------------------------------------------------------- prompts

ITEM = inv.Item(1, "I worry about things.", "neuroticism", "anxiety", False)


def test_likert_prompt_exact_text():
    assert inv.likert_prompt(ITEM) == (
        "Read the statement and choose the option that shows how accurately it describes you. "
        "Reply with the letter of one option.\n"
        "Statement: You worry about things.\n"
        "Options:\n"
        "(A) Very Accurate\n(B) Moderately Accurate\n(C) Neither Accurate Nor Inaccurate\n"
        "(D) Moderately Inaccurate\n(E) Very Inaccurate"
    )
    assert inv.likert_prompt(ITEM, reversed_order=True).endswith(
        "(A) Very Inaccurate\n(B) Moderately Inaccurate\n(C) Neither Accurate Nor Inaccurate\n"
        "(D) Moderately Accurate\n(E) Very Accurate"
    )


def test_mbti_prompt_swaps_options():
    row = {"question": "Q?", "option_a": "Out", "option_b": "In"}
    assert inv.mbti_prompt(row) == f"{inv.MBTI_INSTRUCTION}\nQuestion: Q?\n(A) Out\n(B) In"
    assert inv.mbti_prompt(row, swapped=True).endswith("(A) In\n(B) Out")


def test_scoring_text_uses_chat_template_and_context_edits(lm):
    text, uses_template = inv.scoring_text(lm, inv.likert_prompt(ITEM))
    assert uses_template
    assert text == f"<|im_start|>user\n{inv.likert_prompt(ITEM)}<|im_end|>\n<|im_start|>assistant\nAnswer: ("
    with ContextEdit(method="test", system="You are very outgoing.").apply(lm):
        edited, _ = inv.scoring_text(lm, inv.likert_prompt(ITEM))
    assert edited == "<|im_start|>system\nYou are very outgoing.<|im_end|>\n" + text


def test_option_token_ids_follow_the_prompt(lm):
    text, _ = inv.scoring_text(lm, inv.likert_prompt(ITEM))
    ids = inv.option_token_ids(lm.tokenizer, text, inv.LIKERT_LETTERS, add_special_tokens=False)
    assert [lm.tokenizer.decode([i]) for i in ids] == list("ABCDE")
    with pytest.raises(PersonaEditError, match="one token"):
        inv.option_token_ids(lm.tokenizer, "I lo", ["ve"], add_special_tokens=False)  # 'love' merges


# ----------------------------------------------------------------------------------- pure scoring steps

def test_likert_score_hand_computed():
    normal = [0.5, 0.3, 0.1, 0.05, 0.05]   # (A)=5 ... (E)=1: expected 4.15, argmax 5
    reversed_ = [0.1, 0.1, 0.2, 0.25, 0.35]  # (A)=1 ... (E)=5: expected 3.65, argmax 5
    expected, argmax = inv.likert_score(normal, reversed_, reverse_keyed=False)
    assert expected == pytest.approx(3.9) and argmax == 5
    expected, argmax = inv.likert_score(normal, reversed_, reverse_keyed=True)
    assert expected == pytest.approx(2.1) and argmax == 1
    # only the letters' relative probabilities count
    assert inv.likert_score([0.2 * p for p in normal], reversed_, False)[0] == pytest.approx(3.9)


def test_order_averaging_cancels_a_pure_position_bias():
    always_a = [1.0, 0, 0, 0, 0]
    assert inv.likert_score(always_a, always_a, False) == (3.0, 3.0)
    assert inv.likert_score(always_a, always_a, True) == (3.0, 3.0)
    # content-consistent answers survive: 'Very Accurate' is (A) in one order and (E) in the other
    assert inv.likert_score(always_a, [0, 0, 0, 0, 1.0], False) == (5.0, 5.0)


def test_forced_choice_sign_convention():
    normal, swapped = [0.8, 0.2], [0.3, 0.7]  # prefers option_a in both orders
    assert inv.forced_choice_score(normal, swapped, a_is_first_pole=True) == pytest.approx((0.5, 1.0))
    assert inv.forced_choice_score(normal, swapped, a_is_first_pole=False) == pytest.approx((-0.5, -1.0))
    assert inv.forced_choice_score([0.9, 0.1], [0.9, 0.1], True) == pytest.approx((0.0, 0.0))  # letter bias only


def test_trait_score_and_result_json():
    rows = [{"facet": "trust", "expected": 4.0, "argmax": 4.0}, {"facet": "trust", "expected": 2.0, "argmax": 2.5},
            {"facet": "morality", "expected": 3.0, "argmax": 3.0}]
    score = inv.trait_score(rows)
    assert score.mean == pytest.approx(3.0) and score.std == pytest.approx((2 / 3) ** 0.5)
    assert score.facets == {"trust": 3.0, "morality": 3.0} and score.argmax_mean == pytest.approx(9.5 / 3)
    high = inv.TraitScore(mean=4.5, std=0.1, argmax_mean=5.0, facets={}, n_items=24)
    assert high.signed == pytest.approx(0.75)
    result = inv.InventoryResult(traits={"agreeableness": score, "extraversion": high},
                                 mbti={"ei": inv.AxisScore(-0.2, -0.5, 12), "tf": inv.AxisScore(0.3, 0.5, 12)})
    assert result.mbti_type == "IT"
    assert result.scores() == pytest.approx({"agreeableness": 0.0, "extraversion": 0.75, "ei": -0.2, "tf": 0.3})
    data = json.loads(json.dumps(result.to_dict()))
    assert data["traits"]["extraversion"]["signed"] == pytest.approx(0.75) and data["mbti"]["ei"]["score"] == -0.2


# ------------------------------------------------------------------------------ batched probabilities

def _texts(lm):
    items = [ITEM, inv.Item(2, "I make friends easily.", "extraversion", "friendliness", False),
             inv.Item(3, "I feel sympathy for those who are worse off than myself.", "agreeableness", "sympathy", False)]
    return [inv.scoring_text(lm, inv.likert_prompt(i, r))[0] for i in items for r in (False, True)]


def _plain_probs(lm, text, ids):
    batch = lm.tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        logits = lm.model(**batch).logits[0, -1]
    return logits.softmax(-1)[ids]


def test_shared_prefix_batches_match_one_plain_forward_per_prompt(lm):
    texts = _texts(lm)
    ids = inv.option_token_ids(lm.tokenizer, texts[0], inv.LIKERT_LETTERS, False)
    assert len(scoring._shared_prefix([lm.tokenizer(t)["input_ids"] for t in texts])) > 50
    shared = inv.option_probabilities(lm, texts, ids, add_special_tokens=False, batch_size=4)
    plain = inv.option_probabilities(lm, texts, ids, add_special_tokens=False, batch_size=4, share_prefix=False)
    single = torch.stack([_plain_probs(lm, t, ids) for t in texts])
    torch.testing.assert_close(shared, single, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(plain, single, atol=1e-6, rtol=1e-4)


def test_generated_position_edits_act_where_the_letter_is_predicted(lm):
    texts = _texts(lm)
    ids = inv.option_token_ids(lm.tokenizer, texts[0], inv.LIKERT_LETTERS, False)
    vector = torch.linspace(-4, 4, lm.arch.hidden_size)
    edit = ActivationEdit(method="test", interventions=(Intervention("residual", 1, vector, positions="generated"),))
    base = inv.option_probabilities(lm, texts, ids, add_special_tokens=False, batch_size=4)
    with edit.apply(lm):
        shared = inv.option_probabilities(lm, texts, ids, add_special_tokens=False, batch_size=4)
        single = torch.stack([_plain_probs(lm, t, ids) for t in texts])  # plain forward: last position only
    torch.testing.assert_close(shared, single, atol=1e-6, rtol=1e-4)
    assert (shared - base).abs().max() > 1e-4


# ----------------------------------------------------------------------------------------------- run

@needs_ffm
def test_run_inventory_on_a_tiny_model(lm):
    seen = []
    result = inv.run_inventory(lm, batch_size=64, on_progress=lambda done, total: seen.append((done, total)))
    assert len(result.items) == 120 and set(result.traits) == set(BIG_FIVE)
    for trait, score in result.traits.items():
        assert score.n_items == 24 and len(score.facets) == 6
        assert 1 <= score.mean <= 5 and score.std >= 0 and -1 <= score.signed <= 1
    assert set(result.mbti) == set(MBTI) and all(a.n_items == 12 and -1 <= a.score <= 1 for a in result.mbti.values())
    assert seen[-1] == (216, 216) and [d for d, _ in seen] == sorted(d for d, _ in seen)  # 120 items, 96 MBTI prompts
    assert 0 < result.letter_mass["agreement"] < 1
    record = result.items[0]
    expected, _ = inv.agreement_score(*record["probs_yes_no"], record["reverse_keyed"])
    assert record["expected"] == pytest.approx(expected)
    json.dumps(result.to_dict())


@needs_ffm
def test_run_inventory_with_letters_asks_both_orders(lm):
    seen = []
    result = inv.run_inventory(lm, batch_size=64, scoring="letters", on_progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (336, 336) and 0 < result.letter_mass["likert"] < 1
    record = result.items[0]
    expected, _ = inv.likert_score(record["probs_normal"], record["probs_reversed"], record["reverse_keyed"])
    assert record["expected"] == pytest.approx(expected)
    with pytest.raises(PersonaEditError, match="unknown inventory scoring"):
        inv.run_inventory(lm, scoring="vibes")


def test_agreement_score_hand_computed():
    assert inv.agreement_score(0.3, 0.1, reverse_keyed=False) == (pytest.approx(4.0), 5.0)  # 1 + 4 * 0.75
    assert inv.agreement_score(0.3, 0.1, reverse_keyed=True) == (pytest.approx(2.0), 1.0)
    assert inv.agreement_score(0.2, 0.2, reverse_keyed=False) == (pytest.approx(3.0), 3.0)
    assert inv.agreement_score(0.0, 0.0, reverse_keyed=False) == (pytest.approx(3.0), 3.0)


@needs_ffm
def test_run_inventory_sees_context_edits_and_checks_traits(lm):
    base = inv.run_inventory(lm, traits=["extraversion"], items_per_facet=1, mbti=False)
    assert list(base.traits) == ["extraversion"] and base.mbti == {}
    assert [r["number"] for r in base.items] == [2, 7, 12, 17, 22, 27]  # one item per facet
    assert set(base.traits["extraversion"].facets) == set(BIG_FIVE["extraversion"].facets)
    with ContextEdit(method="test", system="You are very outgoing.").apply(lm):
        edited = inv.run_inventory(lm, traits=["extraversion"], items_per_facet=1, mbti=False)
    assert edited.traits["extraversion"].mean != base.traits["extraversion"].mean
    with pytest.raises(PersonaEditError, match="unknown trait"):
        inv.run_inventory(lm, traits=["charisma"])
    with pytest.raises(PersonaEditError, match="items_per_facet"):
        inv.run_inventory(lm, items_per_facet=5)
