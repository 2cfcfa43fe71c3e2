import pytest

from personaedit.errors import PersonaSpecError
from personaedit.persona import BIG_FIVE, MBTI, Persona, describe


def test_parses_levels_names_and_numbers():
    persona = Persona.parse("extraversion=high, agreeableness=-0.5,tf=T")
    assert persona.as_dict() == {"extraversion": 1.0, "agreeableness": -0.5, "tf": 1.0}
    assert Persona.parse("jp=p").as_dict() == {"jp": -1.0}
    assert Persona.parse("Neuroticism=low").as_dict() == {"neuroticism": -1.0}


def test_parses_yaml_text_and_file(tmp_path):
    assert Persona.parse("openness: high\nconscientiousness: -0.25").as_dict() == {
        "openness": 1.0, "conscientiousness": -0.25}
    path = tmp_path / "p.yaml"
    path.write_text("extraversion: low\n")
    assert Persona.parse(str(path)).as_dict() == {"extraversion": -1.0}


def test_spec_round_trips():
    persona = Persona.parse("extraversion=high,agreeableness=-0.5,sn=N")
    assert persona.spec() == "extraversion=high,agreeableness=-0.5,sn=N"
    assert Persona.parse(persona.spec()) == persona


@pytest.mark.parametrize("spec, hint", [
    ("extroversion=high", "did you mean 'extraversion'"),
    ("agreeablenes=low", "did you mean 'agreeableness'"),
    ("extraversion=hihg", "did you mean 'high'"),
    ("extraversion=2", "must be in [-1, 1]"),
    ("tf=X", "bad level"),
    ("extraversion", "must map traits to levels"),
    ("extraversion=high,agreeableness", "expected trait=level"),
    ("extraversion=high,extraversion=low", "given twice"),
    ("", "at least one trait"),
])
def test_rejects_bad_specs_with_a_hint(spec, hint):
    with pytest.raises(PersonaSpecError) as info:
        Persona.parse(spec)
    assert hint in str(info.value)


def test_model_has_all_traits_facets_and_axes():
    assert list(BIG_FIVE) == ["openness", "conscientiousness", "extraversion", "agreeableness", "neuroticism"]
    assert all(len(d.facets) == 6 and d.high.adjectives and d.low.adjectives for d in BIG_FIVE.values())
    assert [d.pole_names for d in MBTI.values()] == [("E", "I"), ("S", "N"), ("T", "F"), ("J", "P")]


def test_describe_uses_pole_adjectives_and_intensity():
    high = describe(Persona.parse("extraversion=high"))
    low = describe(Persona.parse("extraversion=-0.3"))
    assert "very outgoing" in high and "reserved" not in high
    assert "a bit reserved" in low
    assert describe(Persona.parse("extraversion=0")) == ""


def test_towards_signs_each_dimension_by_its_pole():
    from personaedit.persona import Persona

    persona = Persona.parse("extraversion=high,agreeableness=low")
    assert persona.towards({"extraversion": 0.4, "agreeableness": 0.2, "openness": 0.9}) == pytest.approx((0.4 - 0.2) / 2)
