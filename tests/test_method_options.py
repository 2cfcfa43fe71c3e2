"""`edit METHOD`'s options come from method_options.json so that its --help need not import torch; the file must
say what the registry says."""

import inspect
import json
from pathlib import Path

from personaedit import method_options


def test_the_file_says_what_the_registry_derives():
    derived = method_options.derive()
    stored = json.loads(Path(method_options.__file__).with_name("method_options.json").read_text(encoding="utf-8"))
    assert stored == derived, "method_options.json is stale: run `python -m personaedit.method_options`"


def test_loaded_specs_round_trip_types_and_defaults():
    specs = method_options.load()
    steer = {o.name: o for o in specs["steer"].options}
    assert steer["scale"].annotation is float and steer["scale"].default == 8.0
    assert steer["prompt_too"].annotation is bool and steer["prompt_too"].default is False
    assert specs["steer"].calibrated and not specs["rome"].calibrated
    mend_topic = {o.name: o for o in specs["mend"].options}["topic"]
    assert mend_topic.required and mend_topic.default_or_empty is inspect.Parameter.empty

