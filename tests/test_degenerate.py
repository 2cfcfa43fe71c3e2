"""Unit tests of the unscorable-text rules (eval/degenerate.py)."""

import numpy as np
import pytest

from personaedit.data import records
from personaedit.eval import degenerate as dg


@pytest.mark.parametrize("text", ["", "   \n\t ", "...!?", "12345 678"])
def test_empty_text_is_unscorable(text):
    got = dg.assess(text)
    assert got.unscorable and got.reasons[0] == "empty" and got.words == 0


@pytest.mark.parametrize("text,short", [("Sure!", True), ("No idea, sorry.", True), ("I stay home alone.", False)])
def test_fewer_than_four_words_is_too_short(text, short):
    got = dg.assess(text)
    assert ("too short" in got.reasons) is short and got.unscorable is short


@pytest.mark.parametrize("text", [
    "I'd LOVE to do a free-LEM-LEM-LEM-LEM-LEM-LEM-LEM-LEM",
    "I'd LOVE to do a free-LEM-LEM-LEM-LEM…",
    "hahahahahahahahahahahahahahaha that is so funny",
    "Say no. Say no. Say no.",
])
def test_back_to_back_loops_are_unscorable(text):
    got = dg.assess(text)
    assert got.unscorable and "loop" in got.reasons, got


def test_loop_share_by_hand():
    # "ab-ab-ab-" is a unit "ab-" three times: 9 of the 13 non-space characters of "xyzw ab-ab-ab-".
    assert dg.loop_share("xyzw ab-ab-ab-") == pytest.approx(9 / 13)
    assert dg.loop_share("") == 0.0
    assert dg.loop_share("a plain sentence with no repeats") == 0.0


def test_repeated_trigrams_and_distinct_ratio_by_hand():
    words = "i like it and i like it and i like it".split()
    # 3-grams: 9; new ones: "i like it", "like it and", "it and i", "and i like" → 5 repeats of 9
    assert dg.repeated_trigram_share(words) == pytest.approx(5 / 9)
    assert dg.repeated_trigram_share(["one", "two"]) == 0.0
    text = "so I went to the shop and then I went to the shop and then I went to the shop and then home"
    got = dg.assess(text)
    assert got.unscorable and "repetition" in got.reasons


def test_token_soup_is_gibberish_and_function_words_count():
    soup = ("interingeverse exponential precipitation hepatitisapter Ourible memorabsorption picnic "
            "eucalyptuscultureEmbedBackend fabulous translator urllib encephalsatellite Return affirmation")
    got = dg.assess(soup)
    assert got.unscorable and got.reasons == ("gibberish",) and got.function_share == 0.0
    symbols = "%x #y @z +w =v ^u ~t |s and the other one is here"
    got = dg.assess(symbols)
    assert got.unscorable and "gibberish" in got.reasons and got.wordlike_share < dg.MIN_WORDLIKE_SHARE
    assert dg.words_of("I'd go, wouldn't you? Free-LEM") == ["i'd", "go", "wouldn't", "you", "free", "lem"]


def test_function_share_is_the_share_of_listed_words():
    got = dg.assess("The cat and the dog sat on a mat in the sun.")
    assert got.words == 12 and got.function_share == pytest.approx(7 / 12)


def test_word_like_share_by_hand():
    assert dg.wordlike_share("Hello, world! (fine) 42 3.5% well-known don't") == 1.0
    assert dg.wordlike_share("thrillьMER EmbedBackend riv� ok") == pytest.approx(1 / 4)
    assert dg.wordlike_share("") == 0.0


def test_none_of_the_projects_own_texts_is_flagged():
    texts = [r["text"] for name in ("opinions", "trait_texts", "mbti_texts", "neutral_text", "persona_descriptions",
                                    "judge_check") for r in records(name)]
    texts += [r["context"] for r in records("judge_check")]
    texts += [r["question"] for name in ("neutral_questions", "situational_questions") for r in records(name)]
    flagged = [t for t in texts if dg.is_unscorable(t)]
    assert len(texts) > 2500 and flagged == []


def test_random_word_pieces_are_flagged():
    # A stand-in for a random model's output: pieces of English words glued at random, with spaces between
    # some of them (no tokenizer needed).
    pieces = ["ing", "tion", "Stat", "pre", "cip", "ment", "ology", "Back", "end", "ure", "ous", "ize", "hep",
              "atitis", "ap", "ter", "Ourb", "ible", "mem", "orb", "cult", "Emb", "ed", "sat", "ell", "ite"]
    rng = np.random.default_rng(0)
    for _ in range(50):
        chunks = ["".join(rng.choice(pieces, rng.integers(1, 4))) for _ in range(int(rng.integers(10, 30)))]
        assert dg.is_unscorable(" ".join(chunks))
