"""Steer read at the start of a reply (as repeng reads its dataset) instead of at the last prompt token."""

import pytest
import torch

from personaedit.data import records
from personaedit.errors import PersonaEditError
from personaedit.methods import fit_edit
from personaedit.methods.capture import capture, render_prompts
from personaedit.methods.contrast import contrastive_pairs, reply_openings
from personaedit.persona import BIG_FIVE

FAST = {"pairs": 12, "batch_size": 8, "layer": "1", "scale": 2.0}


def test_openings_are_word_prefixes_of_neutral_training_text_in_a_seeded_order():
    texts = [r["text"] for r in records("neutral_text", "train")]
    openings = reply_openings(40, seed=3)
    assert len(openings) == 40 and openings == reply_openings(40, seed=3) and openings != reply_openings(40, seed=4)
    assert all(any(t == o or t.startswith(o + " ") for t in texts) for o in openings)
    assert all(1 <= len(o.split()) <= 8 for o in openings)


def test_capture_reads_the_last_token_of_the_opening_after_the_rendered_prompt(lm):
    prompts = [("You are talkative.", "How was your day?"), ("You are quiet.", "What do you think of rain?")]
    openings = ["Well, it", "The sky"]
    read = capture(lm, prompts, [("residual", 1)], openings=openings, use_cache=False)[("residual", 1)]
    texts, templated = render_prompts(lm, prompts)
    for row, (text, opening) in enumerate(zip(texts, openings)):
        ids = lm.tokenizer(text + ("" if templated else " ") + opening, add_special_tokens=not templated,
                           return_tensors="pt")["input_ids"]
        with torch.no_grad():
            hidden = lm.model(ids, output_hidden_states=True).hidden_states[2][0, -1]  # layer 1's output
        torch.testing.assert_close(read[row], hidden.float(), atol=1e-4, rtol=1e-4)


def test_read_at_reply_is_the_mean_difference_at_the_same_openings_after_both_poles(lm):
    edit = fit_edit("steer", lm, "extraversion=high", read_at="reply", **FAST)
    pairs = contrastive_pairs(BIG_FIVE["extraversion"], 12)
    openings = reply_openings(12)
    high = capture(lm, pairs.high, [("residual", 1)], openings=openings)[("residual", 1)]
    low = capture(lm, pairs.low, [("residual", 1)], openings=openings)[("residual", 1)]
    torch.testing.assert_close(edit.interventions[0].values, (high.mean(0) - low.mean(0)) * 2.0)
    at_prompt = fit_edit("steer", lm, "extraversion=high", **FAST)
    assert not torch.allclose(at_prompt.interventions[0].values, edit.interventions[0].values)
    assert edit.options["read_at"] == "reply"


def test_an_unknown_reading_place_is_refused(lm):
    with pytest.raises(PersonaEditError, match="read_at must be one of prompt, reply"):
        fit_edit("steer", lm, "extraversion=high", read_at="middle", **FAST)


def test_pca_direction_is_the_mean_difference_along_the_top_principal_axis_of_the_differences(lm):
    options = {**FAST, "read_at": "reply"}
    edit = fit_edit("steer", lm, "extraversion=high", direction="pca", **options)
    mean = fit_edit("steer", lm, "extraversion=high", **options).interventions[0].values / 2.0
    pairs = contrastive_pairs(BIG_FIVE["extraversion"], 12)
    openings = reply_openings(12)
    high = capture(lm, pairs.high, [("residual", 1)], openings=openings)[("residual", 1)]
    low = capture(lm, pairs.low, [("residual", 1)], openings=openings)[("residual", 1)]
    differences = (high - low).double()
    centred = differences - differences.mean(0)
    covariance = centred.T @ centred
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    axis = eigenvectors[:, -1]  # largest eigenvalue: the top principal axis, found another way
    expected = axis * (mean.double() @ axis)
    torch.testing.assert_close(edit.interventions[0].values.double(), expected * 2.0, atol=1e-4, rtol=1e-3)
    assert float(edit.interventions[0].values @ mean) > 0  # points the mean difference's way


def test_without_a_question_the_description_alone_is_the_user_turn_read_at_the_openings(lm):
    from personaedit.methods.contrast import instruction_pairs, pole_descriptions

    pairs = instruction_pairs(BIG_FIVE["extraversion"], 12)
    high_texts, low_texts = pole_descriptions(BIG_FIVE["extraversion"])
    assert all(system is None and user in high_texts for system, user in pairs.high)
    assert all(system is None and user in low_texts for system, user in pairs.low)
    edit = fit_edit("steer", lm, "extraversion=high", read_at="reply", instruction_only=True, **FAST)
    openings = reply_openings(12)
    high = capture(lm, pairs.high, [("residual", 1)], openings=openings)[("residual", 1)]
    low = capture(lm, pairs.low, [("residual", 1)], openings=openings)[("residual", 1)]
    torch.testing.assert_close(edit.interventions[0].values, (high.mean(0) - low.mean(0)) * 2.0)
    with pytest.raises(PersonaEditError, match="instruction_only needs read_at=reply"):
        fit_edit("steer", lm, "extraversion=high", instruction_only=True, **FAST)
