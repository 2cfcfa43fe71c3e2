"""The calibrations the package ships are the default model's and are found without measuring anything."""

import pytest

from personaedit.calibration import CALIBRATED, stored
from personaedit.data import records
from personaedit.models import load_model
from personaedit.persona import Persona

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def lm():
    return load_model("default")


def test_every_shipped_calibration_belongs_to_the_default_model_and_is_looked_up(lm):
    shipped = records("calibrations")
    assert shipped, "the package ships the default model's calibrations"
    for row in shipped:
        assert row["fingerprint"] == lm.fingerprint and row["method"] in CALIBRATED and row["split"] == "validation"
        assert stored(lm, row["method"], Persona.parse(row["persona"])) == row
        if row["chosen"] is not None:
            assert row["chosen"] in row["trials"]
            coherent = min(row["budget"]["coherent_share"], row["base_coherent_share"])
            best = max((t for t in row["trials"] if t["coherent_share"] >= coherent
                        and t["perplexity_ratio"] <= row["budget"]["perplexity_ratio"]), key=lambda t: t["effect"]["mean"])
            assert row["chosen"] == best
