"""The vision-language model beside the LLM: one generation at a time, a bounded queue before it.

`VLMService` owns a loaded runner (backend/vlm/runner.py) and one worker thread.
`prepare` (on the caller's thread) renders the chat template, runs the processor and fits
`max_new_tokens` into the model's context; `submit` queues a `VLMJob` (with VLM_QUEUE jobs
already waiting it raises `VLMBusy`, the server's 429). The worker streams each job's
output to its sink as engine `StreamDelta`s (incremental detokenization and stop strings
are the engine's own helpers), ending with a delta that carries `finish_reason` (`stop`,
`length` or `abort`) and `usage`; a failed generation ends with an error delta instead.
`VLMJob.cancel` aborts a job, queued or running, within one token.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
from dataclasses import dataclass, field

import jinja2
from PIL import Image

from backend.vlm.runner import Messages, VLMPrompt, VLMRunner, load_runner
from config import Config
from engine.detokenizer import IncrementalDetokenizer, StopChecker
from engine.request import Sink, StreamDelta, Usage
from engine.sampling_params import InvalidRequestError, SamplingParams

logger = logging.getLogger(__name__)


class VLMBusy(Exception):
    """The job queue is full."""


@dataclass(eq=False)
class VLMJob:
    """One request for the worker: its prepared prompt, parameters and where deltas go."""

    rid: str
    prompt: VLMPrompt
    params: SamplingParams
    sink: Sink
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


class _Output:
    """One job's output as it is generated: text deltas, the stop checks, the finish."""

    def __init__(self, job: VLMJob, runner: VLMRunner) -> None:
        self.job = job
        params = job.params
        self.eos = frozenset() if params.ignore_eos else runner.eos_token_ids
        self.stop_ids = params.stop_token_set
        self.detokenizer = IncrementalDetokenizer(
            runner.tokenizer, job.prompt.prompt_ids, params.skip_special_tokens
        )
        self.stop = StopChecker(params.stop)
        self.count = 0
        self.reason: str | None = None

    def on_token(self, token: int) -> bool:
        """Take one sampled token; True ends the generation."""
        if self.job.cancelled.is_set():
            self.reason = "abort"
            return True
        self.count += 1
        if token in self.eos or token in self.stop_ids:
            self.reason = "stop"
            return True
        text, stopped = self.stop.process(self.detokenizer.add(token))
        self.job.sink(StreamDelta(self.job.rid, 0, text, [token]))
        if stopped:
            self.reason = "stop"
        elif self.count >= self.job.params.max_new_tokens:
            self.reason = "length"
        return self.reason is not None

    def final(self) -> StreamDelta:
        """The last delta: held-back text, the finish reason and the usage."""
        tail = ""
        if self.reason != "abort" and not self.stop.stopped:
            tail, _ = self.stop.process(self.detokenizer.flush())
            tail += self.stop.flush()
        reason = self.reason or ("length" if self.count >= self.job.params.max_new_tokens
                                 else "stop")
        usage = Usage(len(self.job.prompt.prompt_ids), self.count, 0)
        return StreamDelta(self.job.rid, 0, tail, [], finish_reason=reason, usage=usage)


class VLMService:
    """A loaded vision-language runner and the worker that runs its jobs one at a time."""

    def __init__(self, config: Config, runner: VLMRunner | None = None) -> None:
        self.config = config
        self.runner = runner if runner is not None else load_runner(config)
        self._jobs: queue.Queue[VLMJob | None] = queue.Queue(maxsize=config.vlm_queue)
        self._thread = threading.Thread(target=self._work, name="vlm", daemon=True)
        self._thread.start()

    @property
    def name(self) -> str:
        return self.runner.name

    @property
    def max_context_len(self) -> int:
        return self.runner.max_context_len

    def prepare(
        self,
        messages: Messages,
        images: list[Image.Image],
        params: SamplingParams,
        max_tokens: int | None,
    ) -> tuple[VLMPrompt, SamplingParams]:
        """The prompt as the model reads it and `params` with max_new_tokens fitted into the
        context (MAX_NEW_TOKENS_DEFAULT when the request names none); raises
        InvalidRequestError for what the model cannot take."""
        self.runner.check(params)
        try:
            prompt = self.runner.prepare(messages, images)
        except jinja2.TemplateError as exc:
            raise InvalidRequestError(
                f"the chat template rejected the messages: {exc}", "messages") from exc
        except ValueError as exc:
            raise InvalidRequestError(
                f"the processor rejected the request: {exc}", "messages") from exc
        room = self.max_context_len - len(prompt.prompt_ids)
        wanted = self.config.max_new_tokens_default if max_tokens is None else max_tokens
        if room < 1 or (max_tokens is not None and max_tokens > room):
            raise InvalidRequestError(
                f"the prompt is {len(prompt.prompt_ids)} tokens (images included) and asks for "
                f"{wanted} more; the model's context length is {self.max_context_len}",
                "messages")
        return prompt, dataclasses.replace(params, max_new_tokens=min(wanted, room))

    def submit(self, job: VLMJob) -> None:
        """Queue `job`; raises VLMBusy when VLM_QUEUE jobs already wait (jobs cancelled while
        waiting give their place up first)."""
        with self._jobs.mutex:  # queue.Queue's own lock: drop what no one waits for
            waiting = self._jobs.queue
            kept = [j for j in waiting if j is None or not j.cancelled.is_set()]
            if len(kept) != len(waiting):
                waiting.clear()
                waiting.extend(kept)
                self._jobs.not_full.notify_all()
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            raise VLMBusy(
                f"the vision-language queue is full ({self.config.vlm_queue} waiting); "
                "retry later") from None

    def shutdown(self) -> None:
        """End the waiting jobs (a 503 to whoever still waits on one) and stop the worker
        once its running job ends: the stop sign needs no room in the queue."""
        with self._jobs.mutex:
            waiting = [job for job in self._jobs.queue if job is not None]
            self._jobs.queue.clear()
            self._jobs.queue.append(None)
            self._jobs.not_empty.notify()
        for job in waiting:
            if not job.cancelled.is_set():
                job.cancel()
                job.sink(StreamDelta(job.rid, 0, "", [], finish_reason="abort",
                                     error="the vision-language service shut down",
                                     error_status=503))
        self._thread.join(timeout=5)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if not job.cancelled.is_set():
                self._run(job)

    def _run(self, job: VLMJob) -> None:
        output = _Output(job, self.runner)
        try:
            self.runner.generate(job.prompt, job.params, output.on_token)
        except Exception as exc:
            logger.exception("vision-language generation %s failed", job.rid)
            job.sink(StreamDelta(job.rid, 0, "", [],
                                 error=f"generation failed: {type(exc).__name__}: {exc}"))
            return
        job.sink(output.final())
