"""Continuous batching: requests join the running batch between decoding steps and leave it when they stop.

One worker thread owns the model while it prefills or steps (`model_lock`, which fits of new edits also
take), so the hooks of one pass never see another pass or a fit. When the worker is idle, the first
request waits for a burst to gather: collection goes on while requests keep arriving within `wait_s` of
the previous one, up to `max_wait_s` and `max_batch`, so a burst is prefilled as one batch instead of being
split by an arbitrary deadline. Requests that arrive while a batch decodes join it at the next step (up to
`max_batch` rows); a finished row leaves at once, so it costs nothing while the others go on.
"""

from __future__ import annotations

import collections
import queue
import threading
import time

from personaedit.models.loading import LoadedModel
from personaedit.serve.decode import RowRequest, RunningBatch, fail_request

_STOP = object()
_HISTORY = 10_000  # admissions and steps remembered for tests and measurements


class ContinuousBatcher:
    def __init__(self, lm: LoadedModel, *, max_batch: int = 16, wait_s: float = 0.01, max_wait_s: float | None = None,
                 model_lock: threading.Lock | None = None):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.lm = lm
        self.max_batch = max_batch
        self.wait_s = max(0.0, wait_s)
        self.max_wait_s = max(self.wait_s, 10 * self.wait_s if max_wait_s is None else max_wait_s)
        self.model_lock = model_lock or threading.Lock()
        self.admissions: collections.deque[int] = collections.deque(maxlen=_HISTORY)  # requests prefilled together
        self.steps: collections.deque[int] = collections.deque(maxlen=_HISTORY)  # rows decoding, per step
        self._queue: queue.Queue = queue.Queue()
        self._waiting: collections.deque[RowRequest] = collections.deque()  # received, not yet admitted
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="personaedit-batcher", daemon=True)
        self._thread.start()

    def submit(self, request: RowRequest) -> None:
        self._queue.put(request)

    def close(self, timeout: float = 30.0) -> None:
        """Finish what was submitted, then stop the worker."""
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def _run(self) -> None:
        batch = RunningBatch(self.lm)
        while True:
            idle = not batch and not self._waiting
            if idle and self._stopping:
                return
            self._receive(wait=idle)
            newcomers = self._next_admission(batch)
            with self.model_lock:
                if newcomers:
                    self._admit(batch, newcomers)
                if batch:
                    self._step(batch)

    def _receive(self, wait: bool) -> None:
        """Move what has arrived into `_waiting`; when `wait` (idle), block for a request and gather its burst."""
        if wait:
            self._hold(self._queue.get())
            deadline = time.monotonic() + self.max_wait_s
            while len(self._waiting) < self.max_batch and not self._stopping:
                timeout = min(self.wait_s, deadline - time.monotonic())
                if timeout <= 0:
                    break
                try:
                    self._hold(self._queue.get(timeout=timeout))
                except queue.Empty:
                    break  # quiet for wait_s: the burst is over
        while True:
            try:
                self._hold(self._queue.get_nowait())
            except queue.Empty:
                return

    def _hold(self, item) -> None:
        if item is _STOP:
            self._stopping = True
        else:
            self._waiting.append(item)

    def _next_admission(self, batch: RunningBatch) -> list[RowRequest]:
        """The waiting requests that join now: as many as fit, unless the batch cannot take rows mid-decode."""
        if not batch.can_admit():
            return []
        newcomers = []
        while self._waiting and len(batch) + len(newcomers) < self.max_batch:
            request = self._waiting.popleft()
            if not request.cancelled:  # its client has gone
                newcomers.append(request)
        return newcomers

    def _admit(self, batch: RunningBatch, requests: list[RowRequest]) -> None:
        self.admissions.append(len(requests))
        try:
            batch.admit(requests)
        except Exception as exc:  # noqa: BLE001 - the newcomers get the error; the running rows are untouched
            for request in requests:
                fail_request(request, f"{type(exc).__name__}: {exc}")

    def _step(self, batch: RunningBatch) -> None:
        self.steps.append(len(batch))
        try:
            batch.step()
        except Exception as exc:  # noqa: BLE001 - a failed pass may have half-updated the cache: end every row
            batch.fail(f"{type(exc).__name__}: {exc}")
