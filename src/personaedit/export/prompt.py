"""Context edits as JSON for any chat API: the system prompt and the demonstration turns, and the same as a
`messages` list to put before the user's message.

```json
{"format": "personaedit-prompt", "version": 1, "method": "prompt", "persona": "extraversion=high", "strength": 1.0,
 "system": "...", "demonstrations": [{"user": "...", "assistant": "..."}],
 "messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."}, ...], "notes": []}
```
Several context edits compose as personaedit composes them (system prompts joined by a blank line, the
demonstrations of each in turn). The prompt method re-renders its system prompt at the strength; IKE's
demonstrations are those used for a message that mentions none of their topics (personaedit swaps a
demonstration whose topic the message mentions for a spare; a static prompt cannot). Routed edits (SERAC)
choose a context per message with a classifier, so no static prompt reproduces them: refused.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from personaedit.edits import ContextEdit, Edit
from personaedit.export.base import ExportError, ExportResult, describe_edit, kind_phrase, leaves
from personaedit.fileio import write_text_atomic

FORMAT = "personaedit-prompt"


def prompt_refusal(edit: Edit) -> str | None:
    for leaf, _ in leaves(edit):
        if leaf.kind == "routed":
            return (f"a routed edit ({leaf.method}) picks a context per message with its scope classifier; "
                    "no static prompt reproduces that")
        if not isinstance(leaf, ContextEdit):
            return f"a prompt holds context edits; {kind_phrase(edit, leaf)}"
    return None


def prompt_payload(edit: Edit, strength: float = 1.0) -> dict:
    """The JSON document for `edit` at `strength` (no file written)."""
    from personaedit.export import formats_for

    reason = prompt_refusal(edit)
    if reason:
        raise ExportError(f"this {describe_edit(edit)} cannot be a prompt: {reason}", formats_for(edit, annotated=True))
    systems: list[str] = []
    demonstrations: list[dict[str, str]] = []
    notes: list[str] = []
    for leaf, factor in leaves(edit, strength):
        context = leaf.context_at(factor)
        if context is None:
            continue
        if context.topics:
            notes.append(f"{leaf.method}: the demonstrations used when a message mentions none of their topics "
                         "(personaedit swaps one whose topic the message mentions for a spare)")
        context = context.for_message("")
        if context.system:
            systems.append(context.system)
        demonstrations += [{"user": q, "assistant": a} for q, a in context.demonstrations]
    system = "\n\n".join(systems) or None
    messages = ([{"role": "system", "content": system}] if system else [])
    for turn in demonstrations:
        messages += [{"role": "user", "content": turn["user"]}, {"role": "assistant", "content": turn["assistant"]}]
    return {"format": FORMAT, "version": 1, "method": edit.method,
            "persona": edit.persona.spec() if edit.persona else None, "strength": strength, "system": system,
            "demonstrations": demonstrations, "messages": messages, "notes": notes}


def export_prompt(edit: Edit, out: str | Path, *, strength: float = 1.0) -> ExportResult:
    start = time.perf_counter()
    out = Path(out)
    if out.is_dir():
        raise ExportError(f"{out} is a folder; the prompt export writes one JSON file", ("prompt",))
    payload = prompt_payload(edit, strength)
    text = json.dumps(payload, indent=2, ensure_ascii=False) + "\n"
    write_text_atomic(out, text)
    what = (f"system prompt of {len(payload['system'] or '')} characters, "
            f"{len(payload['demonstrations'])} demonstration{'s' if len(payload['demonstrations']) != 1 else ''}")
    return ExportResult("prompt", out, out.stat().st_size, time.perf_counter() - start, what, [],
                        {"messages": len(payload["messages"])})
