import pytest

from personaedit.bench import expand_grid, parse_method_options, parse_personas, parse_strengths, run_bench, select_methods
from personaedit.bench.grid import needs_no_extra_input
from personaedit.bench.measure import BENCH_SUITES, BenchSuite, held_out_prompts
from personaedit.bench.report import summarise, write_report
from personaedit.bench.store import ResultStore
from personaedit.errors import PersonaEditError

from test_suite import FakeJudge

OPTIONS = {"steer": {"layer": "1", "pairs": 8}, "dpnle": {"pairs": 8, "layers": "1"}}


class Interrupt(Exception):
    pass


@pytest.fixture(autouse=True)
def _short_suite(monkeypatch):
    """The quick suite's mechanics with 4-token replies, so a grid runs in seconds on a tiny model."""
    monkeypatch.setitem(BENCH_SUITES, "quick", BenchSuite(max_new_tokens=4, perplexity_texts=2, robustness_questions=2,
                                                               questions_per_trait=1, neutral_questions=2))


def test_grid_parsing_and_method_selection():
    assert parse_personas(["all-poles"])[:2] == ["openness=high", "openness=low"]
    assert len(parse_personas(["all-poles", "openness=high"])) == 10
    assert parse_strengths("0, 0.5,1,1") == [0.0, 0.5, 1.0]
    assert all(needs_no_extra_input(m) for m in select_methods("all"))
    assert not {"rome", "mend", "serac"} & set(select_methods("all"))  # they need a query or a topic
    assert {"prompt", "steer", "dpnle"} <= set(select_methods("all"))
    cells = expand_grid(["prompt", "steer"], ["extraversion=high"], [0.5, 1.0])
    assert [c.key for c in cells][:2] == ["prompt|extraversion=high|0.5", "prompt|extraversion=high|1"]
    assert parse_method_options(["dpnle.pairs=500", "steer.prompt_too=true"], ["dpnle", "steer"]) == {
        "dpnle": {"pairs": 500}, "steer": {"prompt_too": True}}
    for bad in (["dpnle.pairs=many"], ["dpnle.nope=1"], ["steer.pairs=3"], ["dpnle"]):
        with pytest.raises(PersonaEditError):
            parse_method_options(bad, ["dpnle"])
    for call in (lambda: select_methods("stear"), lambda: parse_strengths("a"), lambda: parse_personas(["warmth=high"])):
        with pytest.raises(PersonaEditError):
            call()


def test_bench_runs_a_grid_resumes_after_an_interruption_and_reports(lm, tmp_path, monkeypatch):
    import personaedit.bench.cell as runner  # where the cells of a (method, persona) are measured

    methods, personas, strengths = ["prompt", "steer"], ["extraversion=high", "agreeableness=low"], [0.0, 1.0, 2.0]
    measured = []
    real_measure = runner.measure_condition

    def counting(lm_, judge, suite, persona, base_next, stage=lambda _: None):
        measured.append(persona.spec() if persona else "base")
        return real_measure(lm_, judge, suite, persona, base_next, stage)

    monkeypatch.setattr(runner, "measure_condition", counting)
    stored = []

    def stop_after_five(done, total, label):
        stored.append(label)
        if len(measured) >= 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_bench(lm, methods, personas, strengths, tmp_path, method_options=OPTIONS, judge=FakeJudge(),
                  on_progress=stop_after_five)
    with ResultStore(tmp_path / "results.sqlite") as store:
        first = store.done()
    # every stored row is whole JSON; the interrupted cell left nothing behind
    assert len(first) >= 4 and all(ResultStore(tmp_path / "results.sqlite").get(k) is not None for k in first)
    before = len(measured)
    progress = []
    run_bench(lm, methods, personas, strengths, tmp_path, method_options=OPTIONS, judge=FakeJudge(),
              on_progress=lambda d, t, label: progress.append((d, t)))
    cells = expand_grid(methods, personas, strengths)
    with ResultStore(tmp_path / "results.sqlite") as store:
        done = store.done()
    assert {c.key for c in cells} <= done and len(done) == len(cells) + 1 + len(personas)
    missing_measured = [c for c in cells if c.key not in first and c.strength != 0]
    assert len(measured) - before == len(missing_measured)  # only the missing cells ran again
    assert progress[-1] == (len(done), len(done))
    # steer's edit was saved by the first run and reused, not refitted
    assert len(list((tmp_path / "edits").iterdir())) == len(methods) * len(personas)

    # a third run has nothing left to do
    again = len(measured)
    run_bench(lm, methods, personas, strengths, tmp_path, method_options=OPTIONS, judge=FakeJudge())
    assert len(measured) == again

    summary = summarise(list(ResultStore(tmp_path / "results.sqlite").rows()))
    assert set(summary["methods"]) == set(methods)
    assert summary["methods"]["steer"]["strength"] == 1.0 and summary["methods"]["steer"]["personas"] == 2
    assert len(summary["dose_response"]) == 4
    zero = [c for c in summary["cells"] if c["strength"] == 0]
    assert all(c["shift"] == 0 and c["kl_to_base"] == 0 for c in zero)
    # strength 0 replies equal the base replies: a zero effect with a point interval, no measurable effect
    assert all(c["effect"]["mean"] == 0 and c["effect"]["verdict"] == "no measurable effect" for c in zero)
    assert all(c["effect"]["n"] == len(held_out_prompts(BENCH_SUITES["quick"])[0]) for c in summary["cells"])
    steer = summary["methods"]["steer"]
    assert steer["measured"] == 2 and steer["moved_right_way"] == sum(
        c["effect"]["verdict"] == "moved" for c in summary["cells"] if c["method"] == "steer" and c["strength"] == 1)
    written = write_report(tmp_path)
    assert "| steer | 1 |" in written["markdown"].read_text()
    assert {p.name for p in (tmp_path / "plots").iterdir()} >= {"shift.png", "dose_response.png", "tradeoff.png"}
    assert "plots/shift.png" in written["html"].read_text()
    assert lm.context_providers == [] and all(not m._forward_hooks for m in lm.model.modules())


def test_bench_folder_refuses_another_suite_or_options(lm, tmp_path):
    run_bench(lm, ["prompt"], ["extraversion=high"], [1.0], tmp_path, judge=FakeJudge())
    with pytest.raises(PersonaEditError, match="another --out"):
        run_bench(lm, ["prompt"], ["extraversion=high"], [1.0], tmp_path, suite="full", judge=FakeJudge())
    with pytest.raises(PersonaEditError, match="another --out"):
        run_bench(lm, ["prompt"], ["extraversion=high"], [1.0], tmp_path, method_options={"prompt": {"adjectives": 2}},
                  judge=FakeJudge())


class OtherJudge(FakeJudge):
    """Another judge (say, a retrained head): results scored by it are not comparable."""


def test_bench_folder_refuses_another_judge_and_keeps_every_reply(lm, tmp_path):
    run_bench(lm, ["prompt"], ["extraversion=high"], [1.0], tmp_path, judge=FakeJudge())
    with ResultStore(tmp_path / "results.sqlite") as store:
        cell = next(r for r in store.rows() if r["method"] == "prompt")
    assert len(cell["replies"]) == 5 + 2 and len(cell["robust_replies"]) == 2  # the short suite above
    with pytest.raises(PersonaEditError, match="judge"):
        run_bench(lm, ["prompt"], ["extraversion=high"], [1.0], tmp_path, judge=OtherJudge())


def test_a_damaged_store_is_a_clear_error(tmp_path):
    (tmp_path / "results.sqlite").write_text("not a database" * 100)
    with pytest.raises(PersonaEditError, match="not a personaedit results store"):
        ResultStore(tmp_path / "results.sqlite").done()


def test_ray_backend_runs_a_small_grid_on_a_local_ray_instance(tmp_path):
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'personaedit[ray]')")
    from tiny import tiny_hf_model, tiny_tokenizer

    from personaedit.models import load_model

    folder = tmp_path / "model"
    tiny_hf_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    lm = load_model(str(folder))
    # the Ray workers use the real offline judge (it cannot be handed a fake); the driver measures the base
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        run_bench(lm, ["prompt", "steer"], ["extraversion=high"], [1.0], tmp_path / "bench", backend="ray",
                  method_options=OPTIONS)
    finally:
        ray.shutdown()
    with ResultStore(tmp_path / "bench" / "results.sqlite") as store:
        rows = {r["method"]: r for r in store.rows()}
    assert {"prompt", "steer"} <= set(rows) and rows["steer"]["fit"]["seconds"] >= 0
    assert (tmp_path / "bench" / "edits").is_dir()


def test_a_folder_takes_added_or_dropped_methods_personas_and_strengths(lm, tmp_path):
    from personaedit.bench import check_resumable

    run_bench(lm, ["prompt"], ["extraversion=high"], [1.0], tmp_path, judge=FakeJudge())
    # another method (with options), another persona, another strength: cells are independent
    check_resumable(tmp_path, ["prompt", "steer"], method_options={"steer": OPTIONS["steer"]}, judge=FakeJudge())
    run_bench(lm, ["prompt", "steer"], ["extraversion=high", "agreeableness=low"], [1.0, 2.0], tmp_path,
              method_options={"steer": OPTIONS["steer"]}, judge=FakeJudge())
    # prompt dropped: fine; steer's options are now pinned
    run_bench(lm, ["steer"], ["extraversion=high"], [0.5], tmp_path, method_options={"steer": OPTIONS["steer"]}, judge=FakeJudge())
    with ResultStore(tmp_path / "results.sqlite") as store:
        assert store.methods() == {"base", "prompt", "steer"}
        assert "steer|extraversion=high|0.5" in store.done() and "prompt|agreeableness=low|2" in store.done()
    for methods, options in ((["steer"], {}), (["prompt", "steer"], {"steer": {"layer": "2", "pairs": 8}}),
                             (["prompt"], {"prompt": {"adjectives": 2}})):
        with pytest.raises(PersonaEditError, match=f"method {methods[-1]} with options.*another --out"):
            check_resumable(tmp_path, methods, method_options=options, judge=FakeJudge())
        with pytest.raises(PersonaEditError, match="another --out"):
            run_bench(lm, methods, ["extraversion=high"], [1.0], tmp_path, method_options=options, judge=FakeJudge())


def test_check_resumable_refuses_before_any_model_and_writes_nothing(lm, tmp_path):
    from personaedit.bench import check_resumable

    check_resumable(tmp_path / "new", ["prompt"], judge=FakeJudge())  # nothing there: fine, and nothing made
    assert not (tmp_path / "new").exists()
    run_bench(lm, ["prompt"], ["extraversion=high"], [1.0], tmp_path, judge=FakeJudge())
    before = (tmp_path / "results.sqlite").read_bytes()
    check_resumable(tmp_path, ["prompt"], judge=FakeJudge(), model_fingerprint=lm.fingerprint)
    with pytest.raises(PersonaEditError, match="suite"):
        check_resumable(tmp_path, ["prompt"], suite="full", judge=FakeJudge())
    with pytest.raises(PersonaEditError, match="judge"):
        check_resumable(tmp_path, ["prompt"], judge=OtherJudge())
    with pytest.raises(PersonaEditError, match="model_fingerprint"):
        check_resumable(tmp_path, ["prompt"], judge=FakeJudge(), model_fingerprint="0" * 16)
    with pytest.raises(PersonaEditError, match="unknown suite"):
        check_resumable(tmp_path, ["prompt"], suite="huge", judge=FakeJudge())
    assert (tmp_path / "results.sqlite").read_bytes() == before


def test_a_folder_from_before_per_method_pins_resumes(lm, tmp_path):
    """Old folders pinned `method_options` as {} (defaults) or the options of every method of their run."""
    import json
    import sqlite3

    from personaedit.bench import check_resumable

    run_bench(lm, ["prompt"], ["extraversion=high"], [1.0], tmp_path, judge=FakeJudge())
    with sqlite3.connect(tmp_path / "results.sqlite") as db:
        db.execute("UPDATE runs SET value = ? WHERE key = 'method_options'", (json.dumps({}),))
    check_resumable(tmp_path, ["prompt", "steer"], method_options={"steer": OPTIONS["steer"]}, judge=FakeJudge())
    with pytest.raises(PersonaEditError, match="method prompt"):
        check_resumable(tmp_path, ["prompt"], method_options={"prompt": {"adjectives": 2}}, judge=FakeJudge())


def test_the_cli_refuses_a_folder_it_cannot_resume_before_loading_the_model(tmp_path, monkeypatch, capsys):
    import personaedit.cli as cli
    from clirun import run_cli

    folder = tmp_path / "b"
    with ResultStore(folder / "results.sqlite") as store:  # a folder pinned to the full suite
        store.check_run({"suite": "full"}, {})

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the folder was checked")

    monkeypatch.setattr(cli, "load", no_load)
    code, out, err = run_cli(["bench", "--methods", "prompt", "--personas", "extraversion=high", "--out", str(folder)], capsys)
    assert code == 2 and "suite 'full'" in err and "another --out" in err


def test_a_report_over_a_store_with_no_finished_cells_says_so(tmp_path):
    from personaedit.bench.report import write_report
    from personaedit.bench.store import ResultStore

    with ResultStore(tmp_path / "results.sqlite"):
        pass
    written = write_report(tmp_path)
    assert "No finished cells yet" in written["markdown"].read_text()
    page = written["html"].read_text()
    assert "No finished cells yet" in page and "<table>" not in page and "jp = judging (J, +)" in page


def test_eval_page_writes_the_persona_as_a_spec():
    from personaedit.eval.report import render_html

    condition = {"expression": {"mean_scores": {"extraversion": 0.1}, "replies": [{"question": "q", "reply": "r"}]},
                 "inventory": {"traits": {"extraversion": {"signed": 0.0}}}, "perplexity": 10.0,
                 "coherence": {"coherent_share": 1.0, "mean_ngram_entropy": 3.0}}
    report = {"model": {"spec": "tiny", "model_type": "llama", "fingerprint": "f"}, "suite": "quick", "seconds": 1,
              "data": {"questions": 1}, "edit": {"method": "steer"}, "persona": {"extraversion": 1.0, "tf": -1.0},
              "conditions": {"base": condition, "edited": condition}}
    page = render_html(report)
    assert "persona extraversion=high,tf=F" in page and "{" not in page.split("<body>")[1].split("<img")[0]
