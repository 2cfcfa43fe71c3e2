"""`personaedit serve`: the OpenAI-compatible server (needs the `serve` extra: FastAPI and uvicorn).

Kept apart from cli.py because its dependencies are optional; cli.py only registers the command.
"""

from __future__ import annotations

import importlib.util
import ipaddress
from pathlib import Path
from typing import List, Optional

import typer

from personaedit.cli_shared import MODEL_HELP, err, load
from personaedit.errors import EditError, PersonaEditError

INSTALL_HINT = "pip install 'personaedit[serve]'"


def require_serve_extra() -> None:
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise PersonaEditError(f"personaedit serve needs {' and '.join(missing)}: {INSTALL_HINT}")


def parse_named_edit(text: str) -> tuple[str, Path, float]:
    """`NAME=DIR` or `NAME=DIR:STRENGTH` -> (name, folder, strength)."""
    from personaedit.preflight import parse_edit_option

    name, sep, rest = text.partition("=")
    if not sep or not name.strip() or not rest:
        raise EditError(f"--edit wants NAME=DIR[:STRENGTH], got {text!r}")
    folder, strength = parse_edit_option(rest)
    return name.strip(), folder, strength


def load_named_edits(options: List[str]):
    """name -> (edit, strength) for every `--edit NAME=DIR[:STRENGTH]`."""
    from personaedit.edits import load_edit

    named = {}
    for option in options:
        name, folder, strength = parse_named_edit(option)
        if name in named:
            raise EditError(f"two edits are named {name!r}")
        named[name] = (load_edit(folder), strength)
    return named


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    model: str = typer.Option("default", "--model", "-m", help=MODEL_HELP),
    edit: List[str] = typer.Option([], "--edit", "-e", help="NAME=DIR[:STRENGTH]: serve an edit as model NAME (repeatable)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (loopback by default)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535),
    max_batch: int = typer.Option(16, "--max-batch", min=1, help="Most requests decoding together in one batch."),
    batch_wait_ms: float = typer.Option(10.0, "--batch-wait-ms", min=0.0,
                                        help="An idle server gathers requests while each arrives within this "
                                             "of the previous one (at most 10x this); later ones join between steps."),
    max_tokens: int = typer.Option(128, "--max-tokens", min=1, help="New tokens for a request that does not say."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu | cuda | mps (default: best available)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 | bfloat16 | float16 (default: by device)."),
) -> None:
    """Serve the model over an OpenAI-compatible API; each request picks an edit ("model": NAME) or a persona."""

    require_serve_extra()
    named = load_named_edits(edit)
    lm = load(model, device, dtype)

    import uvicorn

    from personaedit.serve.app import create_app

    app = create_app(lm, named, max_batch=max_batch, batch_wait_ms=batch_wait_ms, default_max_tokens=max_tokens)
    if not is_loopback(host):
        err.print(f"warning: binding to {host} exposes the server, which has no authentication, beyond this machine")
    names = ", ".join(app.state.catalog.model_ids())
    err.print(f"serving {lm.spec} (models: {names}) on http://{host}:{port}/v1")
    uvicorn.run(app, host=host, port=port, log_level="warning")
