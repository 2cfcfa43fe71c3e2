"""Per-model calibration on a tiny model with a stand-in judge: the choice rule, the budget, the cache, the edit."""

import pytest
import torch

from personaedit import calibration
from personaedit.calibration import Budget, calibrate, calibrated_edit, search_space, validation_questions, within_budget
from personaedit.data import records
from personaedit.errors import PersonaEditError
from personaedit.methods import fit_edit
from personaedit.persona import Persona
from test_suite import FakeJudge
from tiny import tiny_lm

FAST = {"questions": 6, "max_new_tokens": 4}
STEER = {"pairs": 8, "batch_size": 8, "layer": "1"}


@pytest.fixture
def steer_options(monkeypatch):
    """Keep the fits tiny: calibration fits with the search space's options; these are added to them."""
    real = calibration.fit_edit
    monkeypatch.setattr(calibration, "fit_edit", lambda name, lm, persona, **o: real(name, lm, persona, **{**STEER, **o}))


def test_validation_questions_start_with_the_persona_traits_and_never_touch_the_test_split():
    persona = Persona.parse("extraversion=high")
    asked = validation_questions(persona, 30)
    own = [r["question"] for r in records("situational_questions", "validation", trait="extraversion")]
    assert asked[: len(own)] == own and len(asked) == 30
    test = {r["question"] for name in ("situational_questions", "neutral_questions") for r in records(name, "test")}
    assert not set(asked) & test


def test_calibration_picks_the_largest_effect_within_the_budget(lm, steer_options):
    persona = Persona.parse("extraversion=high")
    result = calibrate(lm, "steer", persona, FakeJudge(), budget=Budget(50.0, 0.0), **FAST)
    options, strengths = search_space("steer", lm)
    # the probe's layer, with the prompt steered too, and a band of repeng's layers scaled to 3, read at the
    # prompt and at the start of a reply
    assert options == [{}, {"prompt_too": True}, {"layer": "1-2", "prompt_too": True},
                       {"layer": "1-2", "prompt_too": True, "read_at": "reply", "scale": 32.0},
                       {"layer": "1-2", "prompt_too": True, "read_at": "reply", "instruction_only": True, "scale": 8.0}]
    assert [(t["options"], t["strength"]) for t in result["trials"]] == [(o, s) for o in options for s in strengths]
    best = max(result["trials"], key=lambda t: t["effect"]["mean"])
    assert result["chosen"] == best and result["split"] == "validation"
    for trial in result["trials"]:
        effect = trial["effect"]
        assert effect["low"] <= effect["mean"] <= effect["high"] and effect["n"] == FAST["questions"]


def test_nothing_within_budget_means_no_choice_and_no_edit(lm, steer_options):
    persona = Persona.parse("extraversion=high")
    result = calibrate(lm, "steer", persona, FakeJudge(), budget=Budget(0.0, 1.01), **FAST)
    assert result["chosen"] is None and result["trials"]
    with pytest.raises(PersonaEditError, match="within the budget"):
        calibrated_edit(lm, "steer", persona, result)


def test_calibration_is_cached_per_model_method_persona_and_budget(lm, steer_options, monkeypatch):
    persona = Persona.parse("extraversion=low")
    first = calibrate(lm, "steer", persona, FakeJudge(), **FAST)

    def no_generation(*_a, **_k):
        raise AssertionError("a cached calibration should not generate")

    monkeypatch.setattr(calibration, "generate", no_generation)
    assert calibrate(lm, "steer", persona, FakeJudge(), **FAST) == first
    with pytest.raises(AssertionError, match="should not generate"):  # another budget is another calibration
        calibrate(lm, "steer", persona, FakeJudge(), budget=Budget(2.0, 0.5), **FAST)


def test_a_calibrated_edit_carries_its_choice_and_means_it_at_strength_one(lm, steer_options):
    persona = Persona.parse("extraversion=high")
    result = calibrate(lm, "steer", persona, FakeJudge(), budget=Budget(50.0, 0.0), **FAST)
    edit = calibrated_edit(lm, "steer", persona, result, **STEER)
    chosen = result["chosen"]
    assert edit.scale == chosen["strength"] and edit.options["calibration"]["validation"] == chosen
    plain = fit_edit("steer", lm, persona, **{**STEER, **chosen["options"]})
    ids = torch.randint(3, 300, (1, 6))
    with edit.apply(lm), torch.no_grad():
        calibrated_logits = lm.model(ids).logits
    with plain.apply(lm, chosen["strength"]), torch.no_grad():
        torch.testing.assert_close(lm.model(ids).logits, calibrated_logits)


def test_coherence_budget_gives_way_to_a_less_coherent_unedited_model():
    budget = Budget(1.5, 0.9)
    assert within_budget(0.5, 1.2, budget, base_coherent=0.45) and not within_budget(0.4, 1.2, budget, base_coherent=0.45)
    assert not within_budget(0.85, 1.2, budget, base_coherent=1.0) and within_budget(0.9, 1.5, budget, base_coherent=1.0)
    assert not within_budget(1.0, 1.6, budget, base_coherent=1.0) and not within_budget(1.0, float("nan"), budget, 1.0)


def test_dpnle_searches_layer_ranges_that_end_at_the_last_layer_or_sit_in_the_middle(lm):
    options, strengths = search_space("dpnle", lm)
    assert options == [{"layers": "0-1"}, {"layers": "1-2"}] and strengths == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]
    with pytest.raises(PersonaEditError, match="steer, npti, dpnle, palette"):
        search_space("rome", lm)


@pytest.mark.parametrize("family, normed", [("llama", False), ("gemma2", True), ("gemma3_text", True)])
def test_palette_tries_a_tighter_clamp_where_the_mlp_output_is_normalised(family, normed):
    """Gemma 2/3 normalise the MLP's output (post_feedforward_layernorm): there most δ sit at the clamp, so the
    search also tries clamp 2; elsewhere the space (and the key of a shipped calibration) is unchanged."""
    small = tiny_lm(family)
    assert small.arch.mlp_output_normed is normed
    options, strengths = search_space("palette", small)
    expected = [{}, {"covariance": True}] + ([{"covariance": True, "clamp": 2.0}] if normed else [])
    assert options == expected and strengths == [0.25, 0.5, 0.75, 1.0]


def test_a_weight_edit_is_calibrated_by_strength_and_its_update_scales_with_it(lm, monkeypatch):
    """palette: a fit per key statistic (C = I, whitened), its summed update tried at fractions; the calibrated
    edit is the chosen fit at the chosen fraction."""
    tiny = {"queries": 2, "steps": 2, "prefixes": 0, "samples": 64}
    real = calibration.fit_edit
    monkeypatch.setattr(calibration, "fit_edit", lambda name, lm, persona, **o: real(name, lm, persona, **{**tiny, **o}))
    persona = Persona.parse("extraversion=low")
    result = calibrate(lm, "palette", persona, FakeJudge(), budget=Budget(50.0, 0.0), use_cache=False, **FAST)
    assert [t["strength"] for t in result["trials"]] == [0.25, 0.5, 0.75, 1.0] * 2
    assert [t["options"].get("covariance", False) for t in result["trials"]] == [False] * 4 + [True] * 4
    edit = calibrated_edit(lm, "palette", persona, result, **tiny)
    plain = fit_edit("palette", lm, persona, **{**tiny, **result["chosen"]["options"]})
    ids = torch.randint(3, 300, (1, 6))
    with edit.apply(lm), torch.no_grad():
        calibrated_logits = lm.model(ids).logits
    with plain.apply(lm, result["chosen"]["strength"]), torch.no_grad():
        torch.testing.assert_close(lm.model(ids).logits, calibrated_logits)


def test_info_shows_the_calibration(lm, steer_options, tmp_path, capsys):
    from clirun import run_cli

    persona = Persona.parse("extraversion=high")
    result = calibrate(lm, "steer", persona, FakeJudge(), budget=Budget(50.0, 0.0), **FAST)
    folder = calibrated_edit(lm, "steer", persona, result, **STEER).save(tmp_path / "calibrated")
    code, out, _ = run_cli(["info", str(folder)], capsys)
    strength = result["chosen"]["strength"]
    assert code == 0 and f"calibrated for this model: strength {strength:g}" in out
    assert f"on {FAST['questions']} validation questions effect" in out


def test_calibrate_says_when_no_setting_moved_the_trait(capsys):
    from personaedit.cli_calibrate import _print_calibration

    def trial(strength, low):
        effect = {"mean": low + 0.05, "low": low, "high": low + 0.1, "n": 6, "confidence": 0.95,
                  "verdict": "moved" if low > 0 else "no measurable effect"}
        return {"options": {}, "strength": strength, "effect": effect, "coherent_share": 1.0, "perplexity_ratio": 1.0}

    result = {"method": "npti", "persona": "extraversion=high", "model": "tiny", "questions": 6,
              "budget": {"perplexity_ratio": 1.5, "coherent_share": 0.9}, "base_coherent_share": 1.0}
    noise = [trial(1.0, -0.04), trial(2.0, -0.02)]
    _print_calibration({**result, "trials": noise, "chosen": noise[1]})
    assert "no setting moved extraversion=high measurably" in " ".join(capsys.readouterr().out.split())
    moved = [trial(1.0, -0.04), trial(2.0, 0.01)]
    _print_calibration({**result, "trials": moved, "chosen": moved[1]})
    assert "no setting moved" not in capsys.readouterr().out
