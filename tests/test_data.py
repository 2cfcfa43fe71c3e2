from collections import Counter

import pytest

from personaedit.data import SPLITS, records
from personaedit.errors import InputFileError
from personaedit.persona import BIG_FIVE, DIMENSIONS, MBTI


def test_opinions_cover_every_pole_of_every_topic_and_split_by_topic():
    rows = records("opinions")
    per_topic = Counter(r["topic"] for r in rows)
    assert len(per_topic) >= 60 and set(per_topic.values()) == {10}
    splits_of_topic = {}
    for r in rows:
        assert r["trait"] in BIG_FIVE and r["pole"] in ("high", "low") and r["facet"] in BIG_FIVE[r["trait"]].facets
        splits_of_topic.setdefault(r["topic"], set()).add(r["split"])
    assert all(len(s) == 1 for s in splits_of_topic.values())  # no topic straddles two splits
    assert {next(iter(s)) for s in splits_of_topic.values()} == set(SPLITS)


def test_question_and_text_sets_have_the_promised_sizes():
    assert all(len(records("mbti_texts", pole=p)) >= 24 for d in MBTI.values() for p in d.pole_names)
    assert all(len(records("situational_questions", trait=t)) >= 20 for t in BIG_FIVE)
    assert len(records("neutral_questions")) >= 60
    assert all(len(records("mbti_items", axis=a)) >= 8 for a in MBTI)
    for dim in DIMENSIONS.values():
        for pole in dim.pole_names:
            assert len(records("persona_descriptions", dimension=dim.name, pole=pole)) >= 4
            queries = records("palette_queries", dimension=dim.name, pole=pole)
            assert len(queries) >= 12
            assert all(q["template"].count("{}") == 1 and q["paraphrase"].count("{}") == 1 for q in queries)
            assert all(q["target"].startswith(" ") and q["subject"] in ("I", "me", "my") for q in queries)


def test_unknown_split_or_resource_is_a_clear_error():
    with pytest.raises(InputFileError, match="unknown split"):
        records("opinions", "dev")
    with pytest.raises(InputFileError, match="missing"):
        records("no_such_resource")


def test_training_only_trait_texts_never_mention_a_held_out_topic():
    held_out = {r["topic"].lower() for split in ("validation", "test") for r in records("opinions", split)}
    rows = records("trait_texts")
    assert rows and all(r["split"] == "train" and r["facet"] in BIG_FIVE[r["trait"]].facets for r in rows)
    assert not [r["text"] for r in rows if any(topic in r["text"].lower() for topic in held_out)]


def _normalised(text):
    return " ".join("".join(c if c.isalnum() else " " for c in text.lower()).split())


def test_held_out_questions_have_the_promised_counts_per_split_and_trait():
    for trait in BIG_FIVE:
        counts = Counter(r["split"] for r in records("situational_questions", trait=trait))
        assert counts == {"train": 16, "validation": 12, "test": 20}, trait
    assert Counter(r["split"] for r in records("neutral_questions")) == {"train": 48, "validation": 24, "test": 60}
    assert len(records("situational_questions", "test")) + len(records("neutral_questions", "test")) >= 100


def test_questions_are_unique_across_every_split_and_file_and_ids_are_unique():
    rows = records("situational_questions") + records("neutral_questions")
    assert all(r["split"] in SPLITS and r["question"].strip() for r in rows)
    ids = Counter(r["id"] for r in rows)
    assert not [i for i, n in ids.items() if n > 1]
    texts = Counter(_normalised(r["question"]) for r in rows)
    assert not [t for t, n in texts.items() if n > 1]
    for r in records("situational_questions"):
        assert r["trait"] in BIG_FIVE and r["id"].startswith(r["trait"] + "-")


def test_capability_items_are_well_formed_and_split_as_documented():
    rows = records("capability_items")
    assert len({r["id"] for r in rows}) == len(rows)
    assert len({_normalised(r["question"]) for r in rows}) == len(rows)
    by_kind = {kind: [r for r in rows if r["kind"] == kind] for kind in ("choice", "arithmetic")}
    assert sum(len(v) for v in by_kind.values()) == len(rows)
    for kind, prefix in (("choice", "mc-"), ("arithmetic", "math-")):
        assert Counter(r["split"] for r in by_kind[kind]) == {"validation": 20, "test": 40}
        assert all(r["id"].startswith(prefix) for r in by_kind[kind])
    for r in by_kind["choice"]:
        options = r["options"]
        assert len(options) == 4 and len({_normalised(o) for o in options}) == 4 and all(o.strip() for o in options)
        assert type(r["answer"]) is int and 0 <= r["answer"] < 4
    positions = Counter(r["answer"] for r in by_kind["choice"])
    assert all(abs(positions[i] - len(by_kind["choice"]) / 4) <= 5 for i in range(4))
    for r in by_kind["arithmetic"]:
        assert type(r["answer"]) is int and r["answer"] >= 0 and r["question"].rstrip().endswith("?")
        assert "options" not in r


def test_capability_items_can_be_read_by_split_and_kind():
    assert len(records("capability_items", "validation", kind="choice")) == 20
    assert len(records("capability_items", "test", kind="arithmetic")) == 40
