"""The micro-batcher: requests that arrive within a short wait are generated together in one batch.

One worker thread owns the model while a batch runs (`model_lock`, which fits of new edits also take),
so the hooks of one batch never see another batch or a fit. A batch starts when `max_batch` requests
wait or `wait_s` has passed since the first of them arrived.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Sequence

from personaedit.models.loading import LoadedModel
from personaedit.serve.decode import Outcome, RowRequest, generate_rows

_STOP = object()


class MicroBatcher:
    def __init__(self, lm: LoadedModel, *, max_batch: int = 16, wait_s: float = 0.01,
                 model_lock: threading.Lock | None = None):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.lm = lm
        self.max_batch = max_batch
        self.wait_s = max(0.0, wait_s)
        self.model_lock = model_lock or threading.Lock()
        self.batch_sizes: list[int] = []  # every batch run so far, for tests and measurements
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="personaedit-batcher", daemon=True)
        self._thread.start()

    def submit(self, request: RowRequest) -> None:
        self._queue.put(request)

    def close(self, timeout: float = 30.0) -> None:
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def _collect(self, first: RowRequest) -> tuple[list[RowRequest], bool]:
        batch, deadline = [first], time.monotonic() + self.wait_s
        while len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                return batch, True
            batch.append(item)
        return batch, False

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                break
            batch, stopping = self._collect(first)
            live = [r for r in batch if not r.cancelled]
            if live:
                self._generate(live)

    def _generate(self, batch: Sequence[RowRequest]) -> None:
        self.batch_sizes.append(len(batch))
        try:
            with self.model_lock:
                generate_rows(self.lm, batch)
        except Exception as exc:  # noqa: BLE001 - a failing batch must answer its requests, not kill the worker
            for request in batch:
                if request.on_done is not None:
                    request.on_done(Outcome("", "stop", len(request.prompt_ids), 0, error=f"{type(exc).__name__}: {exc}"))
