"""One worker thread that owns the model: jobs queue up, compatible ones decode together as one batch.

Requests never touch torch: each one is a `Job` whose events ("start", "delta", "done", "error") are handed
back through a callback, so the asyncio side streams them without blocking the event loop.
"""

from __future__ import annotations

import collections
import itertools
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from vpgtrans_adapters.llm import stop_token_ids

from ..conversation import conversation_sample
from ..interfaces import GenerationConfig
from .schema import ApiError, Conversation


@dataclass
class Job:
    """One chat completion: the conversation, decoding settings, and where its events go."""

    conversation: Conversation
    emit: Callable[[tuple], None]
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    id: int = field(default_factory=itertools.count().__next__)

    def batch_key(self) -> tuple:
        """Jobs with equal keys may decode in one batch (a seeded job runs alone, so its seed means something)."""
        if self.seed is not None:
            return ("seeded", self.id)
        return ("greedy",) if self.temperature == 0 else ("sample", self.temperature, self.top_p)


def context_limit(model: Any, cap: int | None = None) -> int:
    """Positions the LLM can attend over (its config's max_position_embeddings; `cap` or 2048 when it has none)."""
    cfg = model.llm.model.config
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if limit is None:
        return cap or 2048
    return min(int(limit), cap) if cap else int(limit)


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters might still turn into a stop string (or are whitespace a final strip drops)."""
    hold = len(text) - len(text.rstrip())
    if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
        hold = max(hold, len(text) - len(text.rstrip("\ufffd")))
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                hold = max(hold, k)
                break
    return hold


class _Row:
    def __init__(self, job: Job, stops: list[str], max_tokens: int):
        self.job, self.stops, self.max_tokens = job, stops, max_tokens
        self.text, self.sent, self.tokens, self.reason = "", "", 0, None

    def finish(self, text: str, reason: str) -> None:
        self.text, self.reason = text, reason


class _Decoder:
    """A stopping criterion that also streams: each step, decode every live row, cut at stops, emit new text."""

    def __init__(self, rows: list[_Row], tokenizer: Any, eos: set[int]):
        self.rows, self.tokenizer, self.eos, self.offset = rows, tokenizer, eos, None

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kwargs: Any) -> torch.Tensor:
        if self.offset is None:  # encoder-decoder models start from a decoder-start token, decoder-only from nothing
            self.offset = input_ids.shape[1] - 1
        generated = input_ids[:, self.offset:].tolist()
        for row, ids in zip(self.rows, generated):
            if row.reason is None:
                self._step(row, ids)
        return torch.tensor([row.reason is not None for row in self.rows], device=input_ids.device)

    def _step(self, row: _Row, ids: list[int]) -> None:
        if ids[-1] in self.eos:
            row.tokens = len(ids) - 1
            row.finish(self.tokenizer.decode(ids[:-1], skip_special_tokens=True), "stop")
        else:
            row.tokens = len(ids)
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            cuts = [i for i in (text.find(s) for s in row.stops) if i >= 0]
            if cuts:
                row.finish(text[:min(cuts)], "stop")
            elif row.tokens >= row.max_tokens:
                row.finish(text, "length")
            elif row.job.cancelled.is_set():
                row.finish(text, "cancelled")
            else:
                row.text = text
        self._stream(row)

    def _stream(self, row: _Row) -> None:
        text = row.text.lstrip()
        if row.reason is not None:
            ready = text.rstrip()
        else:
            ready = text[:len(text) - _held_back(text, row.stops)]
        # Decoding more tokens can (rarely) rewrite earlier characters; then wait rather than send a wrong delta.
        if len(ready) > len(row.sent) and ready.startswith(row.sent):
            row.job.emit(("delta", ready[len(row.sent):]))
            row.sent = ready


class Engine:
    """Owns the model on one worker thread; `submit` queues a job, the worker batches compatible ones."""

    def __init__(self, model: Any, *, max_batch: int = 8, max_queue: int = 64, default_max_tokens: int = 256,
                 context: int | None = None, cache_size: int = 64):
        self.model = model
        self.max_batch, self.max_queue, self.default_max_tokens = max_batch, max_queue, default_max_tokens
        self.context = context_limit(model, context)
        self.eos = set(stop_token_ids(model.llm))
        self._features: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()
        self._cache_size = cache_size
        self._pending: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._running = False
        self._thread: threading.Thread | None = None
        self.batches: list[int] = []  # size of every batch decoded, for the load test and the logs
        from PIL import Image

        # One blank image tells how many soft prompts this VPG makes (counted against the context).
        blank = self._encode(Image.new("RGB", (8, 8)), None)
        with torch.no_grad():
            self.soft_prompts = int(model.prompts(blank, [""] if model.vpg.uses_instruction else None).shape[1])

    # --- the asyncio side ---------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker thread."""
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="vpgtrans-serve-worker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the worker after the batch it is decoding; queued jobs get an error."""
        with self._cond:
            self._running = False
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        for job in self._pending:
            try:
                job.emit(("error", ApiError(503, "the server is shutting down", type="server_error")))
            except RuntimeError:  # its event loop is already closed: nobody is waiting
                pass

    def submit(self, job: Job) -> None:
        """Queue a job; a full queue is refused (429) rather than letting latency grow without bound."""
        with self._cond:
            if len(self._pending) >= self.max_queue:
                raise ApiError(429, f"server busy: {len(self._pending)} requests already queued (--max-queue); "
                                    "retry shortly", type="server_busy", code="queue_full")
            self._pending.append(job)
            self._cond.notify()

    def stats(self) -> dict[str, Any]:
        """Queue length now, and how many batches of what mean size were decoded so far."""
        done = list(self.batches)
        return {"queued": len(self._pending), "batches": len(done), "requests_decoded": sum(done),
                "mean_batch_size": round(sum(done) / len(done), 2) if done else None}

    # --- the worker ---------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._running and not self._pending:
                    self._cond.wait()
                if not self._running:
                    return
                first = self._pending.popleft()
                batch, key = [first], first.batch_key()
                for job in list(self._pending):
                    if len(batch) >= self.max_batch:
                        break
                    if job.batch_key() == key:
                        self._pending.remove(job)
                        batch.append(job)
            try:
                self._run([job for job in batch if not job.cancelled.is_set()])
            except Exception as exc:  # noqa: BLE001 - a failed batch must not take the server down
                error = ApiError(500, f"generation failed: {type(exc).__name__}: {exc}", type="server_error")
                for job in batch:
                    job.emit(("error", error))

    def _encode(self, image: Any, key: str | None) -> torch.Tensor:
        if key is not None and key in self._features:
            self._features.move_to_end(key)
            return self._features[key]
        model = self.model
        features = model.encode_images(model.vision.preprocess([image]).to(model.projector.weight.device))
        if key is not None:
            self._features[key] = features
            if len(self._features) > self._cache_size:
                self._features.popitem(last=False)
        return features

    def _prepare(self, job: Job) -> tuple[Any, int, int]:
        """(text sample, prompt tokens, max new tokens) of a job, or ApiError when the prompt cannot fit."""
        from ..errors import ConfigError

        conv = job.conversation
        try:
            sample = conversation_sample(self.model.template, conv.history, conv.question)
        except ConfigError as exc:  # a template without {instruction} has no place for a second question
            raise ApiError(400, f"this model takes one question per conversation: {exc.what}",
                           param="messages") from None
        tokenize = self.model.llm._ids
        prompt = len(tokenize(sample.before)) + len(tokenize(sample.after)) + self.soft_prompts + 1  # + BOS/EOS
        room = self.context if self.model.llm.is_encoder_decoder else self.context - prompt
        if prompt > self.context or room < 1:
            raise ApiError(400, f"This model's maximum context length is {self.context} tokens. However, your "
                                f"messages resulted in {prompt} tokens ({self.soft_prompts} of them image soft "
                                "prompts). Please reduce the length of the messages.", param="messages",
                           code="context_length_exceeded")
        # A max_tokens past the room left is clamped, not refused: harnesses ask for 1024 by default.
        return sample, prompt, min(job.max_tokens or self.default_max_tokens, room)

    def _run(self, jobs: list[Job]) -> None:
        rows, samples, features, prompt_tokens = [], [], [], []
        for job in jobs:
            try:
                sample, n_prompt, max_tokens = self._prepare(job)
            except ApiError as exc:
                job.emit(("error", exc))
                continue
            stops = job.stop + ([self.model.template.end] if self.model.template.end else [])
            rows.append(_Row(job, stops, max_tokens))
            samples.append(sample)
            prompt_tokens.append(n_prompt)
            features.append(self._encode(job.conversation.image, job.conversation.image_key))
            job.emit(("start", n_prompt))
        if not rows:
            return
        self.batches.append(len(rows))
        model, first = self.model, rows[0].job
        instructions = [r.job.conversation.question for r in rows] if model.vpg.uses_instruction else None
        extra: dict[str, Any] = {}
        if first.temperature > 0:
            # top_k=0: OpenAI's API has no top-k, so the checkpoint's default (often 50) must not apply.
            extra.update(do_sample=True, temperature=first.temperature, top_p=first.top_p, top_k=0)
            if first.seed is not None:
                torch.manual_seed(first.seed)
        from transformers import StoppingCriteriaList

        decoder = _Decoder(rows, model.llm.tokenizer, self.eos)
        extra["stopping_criteria"] = StoppingCriteriaList([decoder])
        config = GenerationConfig(max_new_tokens=max(r.max_tokens for r in rows), extra=extra)
        with torch.no_grad():
            model.llm.generate(model.prompts(torch.cat(features), instructions), samples, config)
        for row, n_prompt in zip(rows, prompt_tokens):
            if row.reason is None:  # max_new_tokens of the batch reached on this row's last step
                row.finish(row.text, "length")
            text = row.text.strip()
            row.job.emit(("done", text, "length" if row.reason == "length" else "stop", n_prompt, row.tokens))
