"""The OpenAI-compatible HTTP app: /v1/models, /v1/chat/completions, /v1/completions (streaming or not).

Handlers turn a request into rows (token ids + edit + sampling settings) for the batcher and turn
what the rows produce into OpenAI-shaped JSON or server-sent events. Every refusal is an OpenAI-style
JSON error (`{"error": {"message", "type", "param", "code"}}`) and never stops the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from typing import Any, AsyncIterator, Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from personaedit.edits import Edit
from personaedit.models.generation import TRANSCRIPT_TURN, render_chat
from personaedit.models.loading import LoadedModel
from personaedit.serve.batcher import ContinuousBatcher
from personaedit.serve.catalog import EditCatalog, RequestError
from personaedit.serve.decode import Outcome, RowRequest
from personaedit.serve.rowwise import conversation
from personaedit.serve.schemas import ChatCompletionRequest, CompletionRequest

MAX_PROMPTS = 64  # prompts in one /v1/completions request


def _error(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
           code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}}, status_code=status)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = (exc.errors() or [{}])[0]
    where = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    message = first.get("msg", "invalid request")
    return (f"{'.'.join(where)}: {message}" if where else message), (where[0] if where else None)


class _Rows:
    """The rows of one HTTP request and a queue of what they produce, fed from the batcher's thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.requests: list[RowRequest] = []

    def _put(self, event: tuple) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed: the client and server are gone
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def add(self, request: RowRequest) -> RowRequest:
        index = len(self.requests)
        request.on_delta = lambda text: self._put(("delta", index, text))
        request.on_done = lambda outcome: self._put(("done", index, outcome))
        self.requests.append(request)
        return request

    def cancel(self) -> None:
        for request in self.requests:
            request.cancelled = True

    async def stream(self) -> AsyncIterator[tuple[str, int, Any]]:
        """Events until every row is done; a failed row raises RequestError."""
        remaining = len(self.requests)
        while remaining:
            kind, index, payload = await self.events.get()
            if kind == "done":
                remaining -= 1
                if payload.error:
                    raise RequestError(f"generation failed: {payload.error}", status=500, type="server_error")
            yield kind, index, payload


def _usage(outcomes: list[Outcome]) -> dict[str, int]:
    prompt = sum(o.prompt_tokens for o in outcomes)
    completion = sum(o.completion_tokens for o in outcomes)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(payload: Mapping[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


def create_app(lm: LoadedModel, edits: Mapping[str, tuple[Edit, float]] | None = None, *, max_batch: int = 16,
               batch_wait_ms: float = 10.0, default_max_tokens: int = 128,
               fit_options: Mapping[str, Mapping[str, Any]] | None = None) -> FastAPI:
    """An app serving `lm` with `edits` (name -> (edit, default strength)) and personas fitted on request."""
    model_lock = threading.Lock()
    catalog = EditCatalog(lm, edits or {}, model_lock=model_lock, fit_options=fit_options)
    batcher = ContinuousBatcher(lm, max_batch=max_batch, wait_s=batch_wait_ms / 1000.0, model_lock=model_lock)
    position_limit = getattr(lm.model.config, "n_positions", None)  # learned absolute positions (GPT-2)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        batcher.close()

    app = FastAPI(title="personaedit", lifespan=lifespan)
    app.state.catalog, app.state.batcher = catalog, batcher

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return _error(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), code=str(exc.status_code))

    @app.exception_handler(RequestError)
    async def _refused(_request: Request, exc: RequestError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(Exception)
    async def _failed(_request: Request, exc: Exception) -> JSONResponse:
        return _error(500, f"{type(exc).__name__}: {exc}", "server_error")

    def row(ids: list[int], body, edit, turn_end: tuple[str, ...] = ()) -> RowRequest:
        limit = body.token_limit() or default_max_tokens
        if not ids:
            raise RequestError("the prompt is empty", param="prompt")
        if position_limit and len(ids) + limit > position_limit:
            raise RequestError(f"{len(ids)} prompt tokens plus max_tokens {limit} exceed this model's "
                               f"{position_limit} positions", param="max_tokens", code="context_length_exceeded")
        return RowRequest(ids, limit, edit=edit, temperature=body.temperature,
                          top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed, stop=body.stops() + turn_end)

    async def resolve(body):
        return await asyncio.to_thread(catalog.resolve, body.model, body.persona, body.strength, body.method)

    def chat_ids(body: ChatCompletionRequest, edit) -> tuple[list[int], tuple[str, ...]]:
        """The prompt's token ids, and the stop that ends the reply: a model without a chat template answers a
        plain transcript and would go on to write the user's next turn (as `generate` stops it)."""
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        providers = edit[0].context_entries(edit[1]) if edit else []
        try:
            text, uses_template = render_chat(lm.tokenizer, conversation(messages, providers))
        except Exception as exc:  # noqa: BLE001 - chat templates raise their own errors for bad role orders
            raise RequestError(f"the messages do not fit the model's chat template: {exc}", param="messages") from None
        turn_end = () if uses_template else (TRANSCRIPT_TURN,)
        return lm.tokenizer(text, add_special_tokens=not uses_template)["input_ids"], turn_end

    async def run(rows: _Rows, body, kind: str, model: str):
        """A JSON response, or an SSE stream, for the rows of one request."""
        for request in rows.requests:
            batcher.submit(request)
        ident, created = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        obj = "chat.completion" if kind == "chat" else "text_completion"
        if not body.stream:
            outcomes: dict[int, Outcome] = {}
            try:
                async for event, index, payload in rows.stream():
                    if event == "done":
                        outcomes[index] = payload
            except asyncio.CancelledError:
                rows.cancel()
                raise
            done = [outcomes[i] for i in range(len(rows.requests))]
            choices = [({"index": i, "message": {"role": "assistant", "content": o.text}} if kind == "chat"
                        else {"index": i, "text": o.text}) | {"finish_reason": o.finish_reason, "logprobs": None}
                       for i, o in enumerate(done)]
            return {"id": ident, "object": obj, "created": created, "model": model, "choices": choices,
                    "usage": _usage(done)}

        chunk_obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(index: int, text: str | None, finish: str | None, first: bool = False) -> dict[str, Any]:
            if kind == "chat":
                delta = ({"role": "assistant", "content": ""} if first else {} if text is None else {"content": text})
                choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}
            return {"id": ident, "object": chunk_obj, "created": created, "model": model, "choices": [choice]}

        async def events() -> AsyncIterator[str]:
            outcomes: list[Outcome] = []
            try:
                if kind == "chat":
                    yield _sse(chunk(0, None, None, first=True))
                async for event, index, payload in rows.stream():
                    if event == "delta":
                        yield _sse(chunk(index, payload, None))
                    else:
                        outcomes.append(payload)
                        yield _sse(chunk(index, None, payload.finish_reason))
                if body.include_usage():
                    yield _sse({"id": ident, "object": chunk_obj, "created": created, "model": model, "choices": [],
                                "usage": _usage(outcomes)})
            except RequestError as exc:
                yield _sse({"error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}})
            finally:
                rows.cancel()  # the client left early (or all rows are done, when this changes nothing)
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "personaedit"}
                                           for name in catalog.model_ids()]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        edit = await resolve(body)
        rows = _Rows(asyncio.get_running_loop())
        ids, turn_end = chat_ids(body, edit)
        rows.add(row(ids, body, edit, turn_end))
        return await run(rows, body, "chat", body.model)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        prompts = body.prompts()
        if not 1 <= len(prompts) <= MAX_PROMPTS:
            raise RequestError(f"give 1 to {MAX_PROMPTS} prompts", param="prompt")
        edit = await resolve(body)
        if edit is not None and edit[0].context_entries(edit[1]):
            raise RequestError("this edit changes the conversation (a context edit); use /v1/chat/completions",
                               param="model")
        rows = _Rows(asyncio.get_running_loop())
        for prompt in prompts:
            rows.add(row(lm.tokenizer(prompt)["input_ids"], body, edit))
        return await run(rows, body, "completion", body.model)

    return app
