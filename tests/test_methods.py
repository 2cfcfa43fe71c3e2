import pytest
import torch

from personaedit.data import records
from personaedit.edits import ActivationEdit, ContextEdit, load_edit
from personaedit.errors import PersonaEditError
from personaedit.methods import all_methods, fit_edit
from personaedit.methods.capture import capture
from personaedit.methods.contrast import cohens_d, contrastive_pairs, parse_layers, probe_accuracy
from personaedit.methods.dpnle import select_neurons
from personaedit.models.generation import build_messages
from personaedit.models.hooks import hook_site
from personaedit.persona import BIG_FIVE, DIMENSIONS
from tiny import tiny_lm

FAST = {"pairs": 12, "batch_size": 8}


def test_registry_lists_methods_and_rejects_unknown_names_and_options(lm):
    assert {"prompt", "ike", "steer", "npti", "dpnle"} <= set(all_methods())
    with pytest.raises(PersonaEditError, match="did you mean 'steer'"):
        fit_edit("steeer", lm, "extraversion=high")
    with pytest.raises(PersonaEditError, match="has no option 'bogus'"):
        fit_edit("steer", lm, "extraversion=high", bogus=1)


def test_contrastive_pairs_share_questions_and_use_the_train_split_only():
    dim = BIG_FIVE["agreeableness"]
    pairs = contrastive_pairs(dim, 50, seed=1)
    high_texts = {r["text"] for r in records("persona_descriptions", "train", dimension="agreeableness", pole="high")}
    low_texts = {r["text"] for r in records("persona_descriptions", "train", dimension="agreeableness", pole="low")}
    train_questions = {r["question"] for name in ("situational_questions", "neutral_questions") for r in records(name, "train")}
    assert len(pairs.high) == len(pairs.low) == 50
    assert all(h[1] == l[1] and h[1] in train_questions for h, l in zip(pairs.high, pairs.low))
    assert {h[0] for h in pairs.high} <= high_texts and {l[0] for l in pairs.low} <= low_texts
    assert len(set(zip(pairs.high, pairs.low))) == 50  # distinct pairs before any repeat
    assert contrastive_pairs(dim, 50, seed=1) == pairs


def test_cohens_d_against_a_hand_computed_value():
    high = torch.tensor([[2.0], [4.0], [6.0]])  # mean 4, unbiased var 4
    low = torch.tensor([[1.0], [1.0], [4.0]])  # mean 2, unbiased var 3
    # pooled var = (2*4 + 2*3) / 4 = 3.5 ; d = 2 / sqrt(3.5)
    assert cohens_d(high, low, eps=0.0).item() == pytest.approx(2 / 3.5 ** 0.5)


def test_probe_accuracy_separable_and_not():
    high, low = torch.randn(40, 8) + 3, torch.randn(40, 8) - 3
    assert probe_accuracy(high, low) == 1.0
    gen = torch.Generator().manual_seed(0)
    same = torch.randn(400, 8, generator=gen)
    assert 0.3 < probe_accuracy(same[:200], same[200:]) < 0.7


def test_dpnle_selection_is_dual_filtered_and_disjoint():
    gen = torch.Generator().manual_seed(0)
    high, low = torch.randn(300, 1000, generator=gen), torch.randn(300, 1000, generator=gen)
    high[:, 3] += 2.0  # strong, consistent: kept as high-exclusive
    low[:, 7] += 2.0  # kept as low-exclusive
    high[:, 11] += torch.randn(300, generator=gen) * 40  # large mean shift? no: noisy, small d
    s, high_idx, low_idx = select_neurons(high, low, quantile=0.995, min_d=0.8)
    assert high_idx.tolist() == [3] and low_idx.tolist() == [7]
    assert set(high_idx.tolist()).isdisjoint(low_idx.tolist())
    torch.testing.assert_close(s, high.mean(0) - low.mean(0))


def test_parse_layers():
    assert parse_layers("3", 30, [1]) == [3]
    assert parse_layers("10-12,4", 30, [1]) == [4, 10, 11, 12]
    assert parse_layers(None, 30, [1, 2]) == [1, 2]
    with pytest.raises(PersonaEditError, match="out of range"):
        parse_layers("31", 30, [])
    with pytest.raises(PersonaEditError, match="bad layers"):
        parse_layers("ten", 30, [])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_capture_matches_a_manual_hook_and_is_cached(family, monkeypatch):
    lm = tiny_lm(family)
    prompts = [(None, "hello there"), ("Be calm.", "what do you think of jazz music?")]
    sites = [("residual", 1), ("mlp_hidden", 0)]
    got = capture(lm, prompts, sites, batch_size=1)
    for i, (system, user) in enumerate(prompts):  # one at a time: no padding involved
        seen = {}
        handles = [hook_site(lm.arch, p, l, lambda h, key=(p, l): seen.__setitem__(key, h[0, -1].clone())) for p, l in sites]
        from personaedit.models.generation import render_chat

        text, _ = render_chat(lm.tokenizer, build_messages(lm, user, system))
        ids = lm.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            lm.model(ids)
        for h in handles:
            h.remove()
        for site in sites:
            torch.testing.assert_close(got[site][i], seen[site], rtol=1e-4, atol=1e-5)
    batched = capture(lm, prompts, sites, batch_size=2, use_cache=False)  # left padding gives the same
    for site in sites:
        torch.testing.assert_close(batched[site], got[site], rtol=1e-4, atol=1e-4)
    calls = []
    monkeypatch.setattr(lm.model, "forward", lambda *a, **k: calls.append(1))
    again = capture(lm, prompts, sites, batch_size=1)
    assert calls == [] and all(torch.equal(again[s], got[s]) for s in sites)


def test_capture_firing_is_a_share(lm):
    got = capture(lm, [(None, "hello there"), (None, "tea")], [("mlp_hidden", 1)], reduce="firing")
    values = got[("mlp_hidden", 1)]
    assert values.shape == (2, 64) and values.min() >= 0 and values.max() <= 1 and 0 < values.mean() < 1


def test_steer_vector_is_the_mean_difference_and_flips_with_the_level(lm):
    edit = fit_edit("steer", lm, "extraversion=high", layer="1", scale=1.0, **FAST)
    flipped = fit_edit("steer", lm, "extraversion=-0.5", layer="1", scale=1.0, **FAST)
    pairs = contrastive_pairs(BIG_FIVE["extraversion"], 12)
    high = capture(lm, pairs.high, [("residual", 1)])[("residual", 1)]
    low = capture(lm, pairs.low, [("residual", 1)])[("residual", 1)]
    (item,) = edit.interventions
    assert item.layer == 1 and item.positions == "generated"
    torch.testing.assert_close(item.values, high.mean(0) - low.mean(0))
    torch.testing.assert_close(flipped.interventions[0].values, -0.5 * item.values)


def test_activation_options_are_one_group_flattened_and_recorded(lm, tmp_path):
    for name in ("steer", "npti", "dpnle"):
        options = all_methods()[name].options()
        assert {n: options[n].default for n in ("prompt_too", "seed", "batch_size")} == \
            {"prompt_too": False, "seed": 0, "batch_size": 16} and "activation" not in options
    edit = fit_edit("steer", lm, "extraversion=high", layer="1", prompt_too=True, seed=3, **FAST)
    assert edit.interventions[0].positions == "all"
    assert {k: edit.options[k] for k in ("prompt_too", "seed", "batch_size")} == \
        {"prompt_too": True, "seed": 3, "batch_size": 8}
    assert load_edit(edit.save(tmp_path / "steer")).options == edit.options


def test_steer_picks_a_middle_layer_automatically():
    lm = tiny_lm("qwen2")
    edit = fit_edit("steer", lm, "openness=low", **FAST)
    assert edit.interventions[0].layer in lm.arch.middle_layers(0.25, 0.75)
    assert edit.options["fitted"]["openness"]["layer"] == edit.interventions[0].layer


def test_npti_raises_target_and_clamps_opposite_neurons(lm):
    edit = fit_edit("npti", lm, "neuroticism=high", layers="1", min_share=0.05, min_diff=2.0, questions=4,
                    max_new_tokens=6, batch_size=4)
    ops = [(i.op, i.layer, i.touched) for i in edit.interventions]
    assert ops == [("add", 1, 3), ("ceil", 1, 3)]  # 5% of 64 neurons (no difference reaches 2.0)
    raised, clamped = edit.interventions
    assert set(raised.indices.tolist()).isdisjoint(clamped.indices.tolist())
    assert torch.all(clamped.values == 0)


def test_dpnle_touches_few_neurons_and_reports_them(lm):
    edit = fit_edit("dpnle", lm, "agreeableness=high", layers="0-2", quantile=0.9, min_d=0.0, **FAST)
    touched = sum(i.touched for i in edit.interventions)
    assert 0 < touched <= 3 * 7  # at most the top 10% of 64 neurons in each of 3 layers
    counts = edit.options["neurons"]["agreeableness"]
    assert sum(counts["high"]) + sum(counts["low"]) == touched


@pytest.mark.parametrize("name", ["steer", "npti", "dpnle"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "phi3", "starcoder2", "phi", "falcon", "mpt", "bloom", "opt"])
def test_activation_methods_run_on_every_layout_and_round_trip(name, family, tmp_path, monkeypatch):
    lm = tiny_lm(family)
    # Some tiny random models end every reply at once; npti's statistics need reply tokens, so give it replies
    # (its generation is tested on llama in test_reference_methods).
    monkeypatch.setattr("personaedit.methods.npti.persona_replies",
                        lambda _lm, prompts, *_a, **_k: ["well I like to talk with people"] * len(prompts))
    options = {"quantile": 0.5, "min_d": 0.0, **FAST} if name == "dpnle" else FAST if name == "steer" else \
        {"questions": 4, "max_new_tokens": 4, "batch_size": 4}
    edit = fit_edit(name, lm, "extraversion=high,tf=F", **options)
    assert isinstance(edit, ActivationEdit) and edit.interventions
    ids = torch.randint(3, 300, (1, 6))
    with torch.no_grad():
        before = lm.model(ids).logits
    with edit.apply(lm):
        with torch.no_grad():
            during = lm.model(ids).logits
    assert not torch.allclose(before[:, -1], during[:, -1])
    loaded = load_edit(edit.save(tmp_path / name))
    with loaded.apply(lm):
        with torch.no_grad():
            torch.testing.assert_close(lm.model(ids).logits, during)


def test_prompt_and_ike_cover_every_pole(lm):
    for name, dim in DIMENSIONS.items():
        for level in (1.0, -1.0):
            for method in ("prompt", "ike"):
                edit = fit_edit(method, lm, {name: level})
                assert isinstance(edit, ContextEdit)
                with edit.apply(lm):
                    messages = build_messages(lm, "Tell me about your weekend.")
                assert len(messages) > 1


def test_ike_uses_training_answers_of_the_pole_and_skips_the_asked_topic(lm):
    edit = fit_edit("ike", lm, "extraversion=low", k=3)
    train_low = {r["text"]: r["topic"] for r in records("opinions", "train", trait="extraversion", pole="low")}
    assert len(edit.demonstrations) == 3 and all(a in train_low for _, a in edit.demonstrations)
    asked_topic = train_low[edit.demonstrations[0][1]]
    with edit.apply(lm):
        messages = build_messages(lm, f"What do you think of {asked_topic}?")
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert len(answers) == 3 and all(train_low[a] != asked_topic for a in answers)
    with edit.apply(lm, -1.0):  # the opposite pole
        flipped = [m["content"] for m in build_messages(lm, "hi") if m["role"] == "assistant"]
    train_high = {r["text"] for r in records("opinions", "train", trait="extraversion", pole="high")}
    assert flipped and all(a in train_high for a in flipped)


def test_context_edits_read_their_own_edit_json_at_strength_one(lm, tmp_path):
    import json

    for method in ("prompt", "ike"):
        edit = fit_edit(method, lm, "extraversion=low", **({"k": 2} if method == "ike" else {}))
        with edit.apply(lm):
            fitted = build_messages(lm, "What do you think of parties?")
        path = edit.save(tmp_path / method) / "edit.json"
        meta = json.loads(path.read_text())
        payload = meta["payload"]
        assert payload["rendered"] and (payload["system"] if method == "prompt" else len(payload["spares"]) == 2)
        with load_edit(tmp_path / method).apply(lm):
            assert build_messages(lm, "What do you think of parties?") == fitted
        # what edit.json holds is what is used: not re-rendered from the package's data
        payload["system"] = "Say little." if method == "prompt" else None
        payload["demonstrations"] = [[q, "(stored) " + a] for q, a in payload["demonstrations"]]
        path.write_text(json.dumps(meta))
        with load_edit(tmp_path / method).apply(lm):
            stored = build_messages(lm, "hi")
        assert (stored[0]["content"] == "Say little.") if method == "prompt" else \
            all(m["content"].startswith("(stored) ") for m in stored if m["role"] == "assistant")
        # an edit saved before the rendering was stored is rendered again, as then
        for key in ("rendered", "spares", "topics"):
            del payload[key]
        path.write_text(json.dumps(meta))
        with load_edit(tmp_path / method).apply(lm):
            assert build_messages(lm, "What do you think of parties?") == fitted


def test_demo_shows_each_family_side_by_side_with_judge_scores(lm, tmp_path):
    from personaedit.demo import demo_questions, run_demo, write_demo_html
    from personaedit.persona import Persona
    from test_suite import FakeJudge

    persona = Persona.parse("extraversion=high")
    questions = demo_questions(persona, 2)
    assert questions == [r["question"] for r in records("situational_questions", "test", trait="extraversion")][:2]
    methods = {"prompt": {}, "steer": {"pairs": 8, "layer": "1"}, "dpnle": {"pairs": 8, "layers": "1"},
               "no-such-method": {}}
    result = run_demo(lm, persona, questions, methods=methods, judge=FakeJudge(), max_new_tokens=4)
    assert list(result.columns) == ["plain model", "prompt (context)", "steer (activation)", "dpnle (activation)"]
    assert all(len(replies) == 2 for replies in result.columns.values())
    assert set(result.fit_seconds) == set(result.columns) - {"plain model"}
    judged = FakeJudge().score(result.columns["prompt (context)"])
    assert result.scores["prompt (context)"] == [s["extraversion"] for s in judged]
    effect = result.effect("prompt (context)")
    plain = result.scores["plain model"]
    assert result.effect("plain model") is None and effect.n == 2
    assert effect.mean == pytest.approx(sum(e - p for e, p in zip(result.scores["prompt (context)"], plain)) / 2)
    page = write_demo_html(result, lm.spec, tmp_path / "demo.html").read_text()
    assert "data:image/png;base64," in page and page.count("<tr>") == 3 and effect.verdict in page
    assert lm.context_providers == [] and all(not m._forward_hooks for m in lm.model.modules())
