"""Progress off a terminal: silent for short work, a plain line at least every interval for long work."""

import io
import time

from personaedit.cli_progress import LineProgress, LineStatus


def test_short_tasks_print_nothing():
    stream = io.StringIO()
    with LineProgress(stream, interval=30) as progress:
        task = progress.add_task("fitting", total=3)
        for done in range(1, 4):
            progress.update(task, completed=done)
    assert stream.getvalue() == ""


def test_long_tasks_print_lines_with_counts_eta_and_a_last_line():
    stream = io.StringIO()
    with LineProgress(stream, interval=0.2) as progress:
        task = progress.add_task("bench", total=4)
        progress.update(task, completed=1)
        time.sleep(0.7)  # a step that takes long: the timer writes while nothing else happens
        progress.update(task, completed=4)
    lines = stream.getvalue().splitlines()
    assert len(lines) >= 3
    assert lines[0].startswith("bench: 1/4 (25%)") and "eta" in lines[0]
    assert lines[-1].startswith("bench: 4/4 (100%)") and lines[-1].endswith(", done")


def test_tasks_without_a_total_say_how_long_they_have_run():
    stream = io.StringIO()
    with LineProgress(stream, interval=0.1) as progress:
        progress.add_task("steer: fitting", total=None)
        time.sleep(0.35)
    lines = stream.getvalue().splitlines()
    assert lines and all(line.startswith("steer: fitting: ") and "elapsed" in line for line in lines)


def test_status_shows_only_when_the_block_takes_long():
    quick, slow = io.StringIO(), io.StringIO()
    with LineStatus(quick, "loading", delay=0.5):
        pass
    with LineStatus(slow, "loading", delay=0.1) as status:
        time.sleep(0.3)
        status.update("demo: steer")
    assert quick.getvalue() == "" and slow.getvalue() == "loading\ndemo: steer\n"
