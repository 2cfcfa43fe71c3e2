"""Training dialogue in one persona: context distillation, or a Big5-Chat CSV when the user has one.

Context distillation: the model answers the project's training-split questions under the persona system
prompt; the vector is then trained on (question without the prompt -> that answer), so the prompt's
effect moves into the weights.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from personaedit.data import records
from personaedit.data.external import load_big5_chat
from personaedit.errors import InputFileError, PersonaSpecError
from personaedit.faults import fault_point
from personaedit.fileio import append_line_durably, write_text_atomic
from personaedit.models import LoadedModel, generate
from personaedit.persona import Persona, describe
from personaedit.progress import Progress


@dataclass(frozen=True)
class Example:
    """One training turn: a user message and the reply to learn; `ended` when the reply is whole (a reply
    cut at the token limit must not teach the model to end its turn mid-sentence)."""

    prompt: str
    response: str
    ended: bool = True


def training_questions() -> list[str]:
    """Training-split situational questions (every trait) and neutral questions; never the test split."""
    rows = records("situational_questions", "train") + records("neutral_questions", "train")
    return [r["question"] for r in rows]


def distill(
    lm: LoadedModel,
    persona: Persona,
    *,
    questions: int | None = None,
    samples_per_question: int = 1,
    max_new_tokens: int = 64,
    prompt_strength: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    on_progress: Progress | None = None,
    partial: Path | None = None,
    shard: tuple[int, int] = (0, 1),
    reuse: Sequence[Path] = (),
) -> list[Example]:
    """Answers of `lm` under the persona prompt (at `prompt_strength`) to all training questions, or to a
    seeded random `questions` of them, sampled with seeds; empty replies dropped.

    Questions are answered in batches of `batch_size`, each sampled with its own seed, so a batch's answers do
    not depend on the batches before it. With `partial`, each finished batch is appended to that file (flushed
    to disk) and batches already there, made with the same model and settings, are reused: a killed run
    resumes where it stopped and ends with the examples an uninterrupted run makes.

    `shard=(index, count)` makes and returns only every count-th batch from the index-th (one process's share
    when several split the work); batches found in the `reuse` files (other processes' `partial` files, only
    read) are taken from there, so the union of all shares equals one process's run."""
    system = describe(persona.scaled(prompt_strength))
    asked = training_questions()
    if questions is not None and questions < len(asked):
        asked = sorted(random.Random(seed).sample(asked, questions), key=asked.index)
    index, count = shard
    batches = [(round_, start) for round_ in range(samples_per_question) for start in range(0, len(asked), batch_size)]
    mine = [key for number, key in enumerate(batches) if number % count == index]
    total = sum(len(asked[start:start + batch_size]) for _, start in mine)
    header = {"partial_examples": 1, "model": lm.fingerprint, "system": system, "max_new_tokens": max_new_tokens,
              "seed": seed, "batch_size": batch_size}
    finished: dict[tuple[int, int], dict] = {}
    for other in reuse:
        finished.update(_read_partial(other, header))
    if partial is not None:
        finished.update(_resume_partial(partial, header))
    examples: list[Example] = []
    done = 0
    for round_, start in mine:
        chunk = asked[start:start + batch_size]
        record = finished.get((round_, start))
        if record is not None and record.get("questions") == chunk:
            made = [Example(**e) for e in record["examples"]]
        else:
            replies = generate(lm, chunk, system=system, max_new_tokens=max_new_tokens, sample=True,
                               seed=seed + 1000 * round_ + start, batch_size=len(chunk))
            made = [Example(q, r, ended=reply_ended(lm.tokenizer, r, max_new_tokens))
                    for q, r in zip(chunk, replies) if r.strip()]
            if partial is not None:
                append_line_durably(partial, json.dumps({"round": round_, "start": start, "questions": chunk,
                                                         "examples": [asdict(e) for e in made]}, ensure_ascii=False))
                fault_point("distill.batch")
        examples += made
        done += len(chunk)
        if on_progress:
            on_progress(done, total)
    return examples


def _read_partial(path: Path, header: dict) -> dict[tuple[int, int], dict]:
    """The whole batches in `path` made with `header`'s settings (none if it is another run's file or absent);
    a line cut short by a crash is skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return {}
    try:
        if not lines or json.loads(lines[0]) != header:
            return {}
    except ValueError:
        return {}
    records: dict[tuple[int, int], dict] = {}
    for line in lines[1:]:
        try:
            record = json.loads(line)
            key = (int(record["round"]), int(record["start"]))
            [Example(**e) for e in record["examples"]]
        except (ValueError, TypeError, KeyError):
            continue  # a line cut short by a crash
        records[key] = record
    return records


def _resume_partial(path: Path, header: dict) -> dict[tuple[int, int], dict]:
    """`_read_partial`, and the file rewritten (atomically) to hold just those batches, so later appends follow
    a whole line."""
    records = _read_partial(path, header)
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in [header, *records.values()]))
    return records


def reply_ended(tokenizer, reply: str, max_new_tokens: int) -> bool:
    """Whether generation stopped on its own before the token limit (the decoded reply re-encodes to about
    the tokens generated; the margin covers a merge at the edges)."""
    return len(tokenizer(reply, add_special_tokens=False)["input_ids"]) < max_new_tokens - 2


def big5_chat_examples(path: str | Path, persona: Persona, limit: int | None = None) -> list[Example]:
    """Big5-Chat examples of the persona's one trait and pole."""
    if len(persona.levels) != 1 or persona.dimensions()[0].kind != "big5":
        raise PersonaSpecError("training on Big5-Chat needs a persona of exactly one Big Five trait, e.g. extraversion=high")
    trait, level = persona.levels[0]
    rows = load_big5_chat(path, trait=trait, pole="high" if level >= 0 else "low", limit=limit)
    if not rows:
        raise InputFileError(f"{path} has no Big5-Chat examples of {persona.spec()}")
    return [Example(r.prompt, r.response) for r in rows]


def save_examples(path: Path, examples: list[Example]) -> None:
    write_text_atomic(path, "".join(json.dumps(asdict(e), ensure_ascii=False) + "\n" for e in examples))


def load_examples(path: Path) -> list[Example]:
    try:
        return [Example(**json.loads(line)) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, ValueError, TypeError) as exc:
        raise InputFileError(f"cannot read cached training examples {path}: {exc}; delete it to regenerate") from None
