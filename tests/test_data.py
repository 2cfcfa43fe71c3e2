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
