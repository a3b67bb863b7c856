"""One model behind the server: loaded in the background, generating one request at a time.

The HTTP side never touches the model. It renders and tokenizes a request's prompt,
then submits a Job; a single worker thread takes jobs in arrival order (a bounded
queue: a full one is refused at once) and streams each job's text back to the
request's event loop. A job whose client went away is cancelled: it is skipped if it
has not started and stops before its next token if it has.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tandem.engine.sampling import SamplingParams
from tandem.server.metrics import Metrics


class QueueFull(Exception):
    """The bounded queue of waiting requests is full."""


@dataclass
class Job:
    """One generation request and the channel its events go back on."""

    ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop_strings: list[str]
    endpoint: str
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)

    def emit(self, kind: str, value) -> None:
        """From the worker thread: ("text", str), ("done", GenerationResult) or ("error", str)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the request's event loop is gone (server shutting down): stop
            self.cancel.set()


class ModelHost:
    """Loads the model on a background thread, then serves jobs from a bounded FIFO queue."""

    def __init__(self, load: Callable[[], object], max_queue: int, metrics: Metrics | None = None):
        self._load = load
        self.max_queue = max_queue
        self.metrics = metrics or Metrics()
        self.loaded = None  # tandem.inject.model.LoadedModel once ready
        self.state = "loading"  # then "ready" or "failed"
        self.error: str | None = None
        self.load_seconds = 0.0
        self._jobs: queue.Queue[Job] = queue.Queue()
        self._waiting = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="tandem-model", daemon=True)
        self._thread.start()

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def waiting(self) -> int:
        with self._lock:
            return self._waiting

    def submit(self, job: Job) -> None:
        """Queue a job, or raise QueueFull when max_queue jobs already wait."""
        with self._lock:
            if self._waiting >= self.max_queue:
                raise QueueFull
            self._waiting += 1
            self.metrics.queue_depth.set(self._waiting)
        self._jobs.put(job)

    def _main(self) -> None:
        t0 = time.perf_counter()
        try:
            self.loaded = self._load()
        except Exception as error:  # reported by /health and every request: the server stays up
            self.state, self.error = "failed", f"{type(error).__name__}: {error}"
            return
        self.load_seconds = time.perf_counter() - t0
        self.state = "ready"
        while True:
            job = self._jobs.get()
            with self._lock:
                self._waiting -= 1
                self.metrics.queue_depth.set(self._waiting)
            if job.cancel.is_set():  # its client left while it waited
                continue
            try:
                self._run(job)
            except Exception as error:  # the worker outlives any one request
                job.emit("error", f"internal error: {type(error).__name__}: {error}")

    def _run(self, job: Job) -> None:
        from tandem.engine.generate import prefill_and_generate

        loaded = self.loaded
        first = [True]

        def on_text(piece: str) -> None:
            if first[0]:
                first[0] = False
                self.metrics.time_to_first_token.observe(time.perf_counter() - job.submitted)
            job.emit("text", piece)

        try:
            result = prefill_and_generate(
                loaded.model,
                loaded.tokenizer,
                job.ids,
                job.max_tokens,
                sampling=job.sampling,
                stop_token_ids=loaded.stop_token_ids,
                stop_strings=job.stop_strings,
                on_text=on_text,
                cancel=job.cancel,
            )
        except Exception as error:  # one request's failure is its own, never the server's
            job.emit("error", f"generation failed: {type(error).__name__}: {error}")
            return
        self.metrics.record_generation(result)
        job.emit("done", result)
