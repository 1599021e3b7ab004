"""Continuous batching: one thread owns the model; requests join the running batch between decode steps and leave it
the step they finish, so concurrent clients share forward passes instead of queueing behind each other.

    # the batch: B rows (a request with n choices is n rows), each with its own sampling settings and generator
    # every step:
    #   1. admit waiting requests while the batch has room: prefill their prompts together (left-padded), then
    #      join their KV cache to the running one (the shorter side padded on the left, masked)
    #   2. pick each row's next token from its logits: greedy (temperature 0) or temperature + top-p, drawn
    #      with the row's own generator (a seeded request gives the same text whatever else runs beside it,
    #      up to float rounding of batched matmuls)
    #   3. hand each row's new text to its request (stop strings held back until they cannot match)
    #   4. drop rows that ended (EOS, max_tokens, a stop string, a client that went away) from the cache
    #   5. one forward pass for the next token of every remaining row

The KV cache is transformers' DynamicCache of a full-attention model (llama family, the bundled model's):
rows are selected and joined along its batch dimension, columns trimmed on the left when every row left them.
Log-probabilities are those of the model's own distribution (temperature 1, no top-p), as vLLM and OpenAI
report them: what a feedback model's "(A)" / "(B)" probability needs.

>>> engine = Engine(model, tokenizer, max_batch=32); engine.start()             # doctest: +SKIP
>>> job = engine.submit(ids, SamplingParams(max_tokens=16), callback=print)    # doctest: +SKIP
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from hhh.rollout import _cache_argument, context_length, last_positions, left_pad, positions

log = logging.getLogger("hhh.serve")

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch


class RequestError(ValueError):
    """A request the engine refuses before any work (too long, too many choices); str() is one line."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0        # 0: greedy
    top_p: float = 1.0
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    top_logprobs: int = 0           # alternatives reported per token (0: only the chosen token's log-prob)
    adapter: str | None = None      # a PEFT adapter loaded on the model; None: the base model


@dataclass(frozen=True)
class Event:
    """Something new for one choice of a request: a text delta (possibly empty while a stop string might still
    match), and on the last event of that choice, why it ended."""
    index: int                       # choice index in 0..n-1
    text: str
    tokens: tuple[int, ...] = ()     # token ids this delta covers
    logprobs: tuple[float, ...] = ()
    top: tuple[tuple[tuple[int, float], ...], ...] = ()  # per token: (token id, log-prob) best first
    finish_reason: str | None = None  # "stop", "length", "cancelled" or "error"


@dataclass(eq=False)
class Job:
    id: str
    prompt_ids: list[int]
    params: SamplingParams
    callback: Callable[[Event], None]
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    completion_tokens: int = 0
    cancelled: bool = False
    open_choices: int = 0

    def cancel(self) -> None:
        """Stop generating (the client went away); the engine drops its rows before the next step."""
        self.cancelled = True


@dataclass(eq=False)
class _Row:
    job: Job
    index: int
    generator: torch.Generator | None
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[tuple[tuple[int, float], ...]] = field(default_factory=list)
    sent_chars: int = 0   # characters of the decoded text already handed out
    sent_tokens: int = 0
    closed: bool = False  # its final event was handed out


@dataclass
class Stats:
    """Counters for /metrics (read without a lock: each is written by the engine thread only)."""
    requests: int = 0
    finished: int = 0
    cancelled: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0
    rows_stepped: int = 0          # sum over steps of the batch size: rows_stepped / steps is the mean batch
    time_to_first_token: float = 0.0
    first_tokens: int = 0


class Engine:
    """The model's only user. `submit` from any thread; events arrive through each job's callback, called from
    the engine thread (keep it short: hand the event to a queue)."""

    def __init__(self, model, tokenizer, *, max_batch: int = 32, batch_wait: float = 0.005,
                 adapters: Mapping[str, str] | None = None) -> None:
        """`adapters`: a request's adapter name -> the PEFT adapter name loaded on `model`."""
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.batch_wait = max_batch, batch_wait
        self.adapters = dict(adapters or {})
        self.peft = hasattr(model, "peft_config")
        self.context = context_length(model)
        self.cache_arg = _cache_argument(model)  # `cache` in transformers 5.2x, `past_key_values` before
        self.eos = tokenizer.eos_token_id
        self.stats = Stats()
        self._waiting: deque[Job] = deque()
        self._wake = threading.Condition()
        self._rows: list[_Row] = []
        self._cache = None
        self._mask: Tensor | None = None       # (B, L) 1 on real tokens
        self._next_pos: Tensor | None = None   # (B,) position of each row's next token
        self._logits: Tensor | None = None     # (B, V) each row's next-token logits
        self._ids = itertools.count()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # --- from any thread ------------------------------------------------------------------------------------

    def check(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """Raise RequestError for a request that cannot run (before it is queued)."""
        if not prompt_ids:
            raise RequestError("the prompt is empty")
        if len(prompt_ids) + params.max_tokens > self.context:
            raise RequestError(f"the prompt has {len(prompt_ids)} tokens; with max_tokens={params.max_tokens} it "
                               f"exceeds the model's context of {self.context} tokens")
        if params.n > self.max_batch:
            raise RequestError(f"n={params.n} is more than the server's batch of {self.max_batch}")
        if params.adapter is not None and params.adapter not in self.adapters:
            raise RequestError(f"no adapter named {params.adapter!r}")

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, callback: Callable[[Event], None],
               *, job_id: str | None = None) -> Job:
        self.check(prompt_ids, params)
        job = Job(job_id or f"job-{next(self._ids)}", list(prompt_ids), params, callback, open_choices=params.n)
        with self._wake:
            if self._stopping:
                raise RequestError("the server is shutting down")
            self._waiting.append(job)
            self._wake.notify()
        return job

    def waiting(self) -> int:
        return len(self._waiting)

    def running(self) -> int:
        return len(self._rows)

    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._loop, name="hhh-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # --- the engine thread ----------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._waiting and not self._rows and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    break
                idle = not self._rows
            if idle and self.batch_wait > 0:
                time.sleep(self.batch_wait)  # an idle server waits a moment for company before its first prefill
            try:
                with torch.inference_mode():
                    self._admit()
                    if self._rows:
                        self._step()
            except Exception:  # a failing step must not take the server down: its requests end with "error"
                log.exception("engine step failed; its requests end with finish_reason 'error'")
                for row in self._rows:
                    self._finish(row, "error")
                self.stats.errors += 1
                self._reset()
        for row in self._rows:
            self._finish(row, "cancelled")
        for job in self._waiting:
            for i in range(job.params.n):
                self._deliver(job, Event(i, "", finish_reason="cancelled"))

    def _reset(self) -> None:
        self._rows, self._cache, self._mask, self._next_pos, self._logits = [], None, None, None, None

    def _admit(self) -> None:
        new: list[Job] = []
        room = self.max_batch - len(self._rows)
        with self._wake:
            while self._waiting and self._waiting[0].params.n <= room:
                job = self._waiting.popleft()
                if job.cancelled:
                    continue
                new.append(job)
                room -= job.params.n
        if not new:
            return
        rows = [_Row(job, i, _generator(job.params.seed, i)) for job in new for i in range(job.params.n)]
        ids, mask = left_pad([r.job.prompt_ids for r in rows], self.tokenizer.pad_token_id or 0)
        pos = positions(mask)
        try:
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                             logits_to_keep=last_positions(ids.shape[1], 1, ids.device), **self._adapter_args(rows))
        except Exception:
            for row in rows:  # these rows never joined the batch: the loop's error path would not reach them
                self._finish(row, "error")
            raise
        for job in new:
            self.stats.requests += 1
            self.stats.prompt_tokens += len(job.prompt_ids)
        self._join(rows, out[self.cache_arg], mask, mask.sum(-1), out.logits[:, -1].float())

    def _join(self, rows: list[_Row], cache, mask: Tensor, next_pos: Tensor, logits: Tensor) -> None:
        if not self._rows:
            self._rows, self._cache, self._mask, self._next_pos, self._logits = rows, cache, mask, next_pos, logits
            return
        assert self._mask is not None and self._next_pos is not None and self._logits is not None
        width = max(self._mask.shape[1], mask.shape[1])
        for old, add in zip(_layers(self._cache), _layers(cache), strict=True):
            old.keys = torch.cat([_pad_left(old.keys, width), _pad_left(add.keys, width)], 0)
            old.values = torch.cat([_pad_left(old.values, width), _pad_left(add.values, width)], 0)
        self._mask = torch.cat([_pad_left(self._mask, width, dim=1), _pad_left(mask, width, dim=1)], 0)
        self._next_pos = torch.cat([self._next_pos, next_pos])
        self._logits = torch.cat([self._logits, logits])
        self._rows = self._rows + rows

    def _step(self) -> None:
        assert self._logits is not None and self._mask is not None and self._next_pos is not None
        logp = torch.log_softmax(self._logits, dim=-1)                         # (B, V) the model's own
        chosen = [self._pick(row, self._logits[i], logp[i]) for i, row in enumerate(self._rows)]
        now = time.perf_counter()
        keep: list[int] = []
        for i, (row, token) in enumerate(zip(self._rows, chosen, strict=True)):
            job = row.job
            if job.cancelled:
                self._finish(row, "cancelled")
                continue
            if job.first_token is None:
                job.first_token = now
                self.stats.time_to_first_token += now - job.submitted
                self.stats.first_tokens += 1
            row.ids.append(token)
            row.logprobs.append(float(logp[i, token]))
            if job.params.top_logprobs:
                values, indices = logp[i].topk(job.params.top_logprobs)
                row.top.append(tuple((int(t), float(v)) for t, v in zip(indices, values, strict=True)))
            job.completion_tokens += 1
            self.stats.generated_tokens += 1
            if self._emit(row, token):
                keep.append(i)
        self.stats.steps += 1
        self.stats.rows_stepped += len(self._rows)
        if len(keep) < len(self._rows):
            self._select(keep)
        if not self._rows:
            return
        tokens = torch.tensor([row.ids[-1] for row in self._rows])[:, None]
        self._mask = torch.cat([self._mask, torch.ones_like(self._mask[:, :1])], 1)
        out = self.model(input_ids=tokens, attention_mask=self._mask, position_ids=self._next_pos[:, None],
                         use_cache=True, **{self.cache_arg: self._cache}, **self._adapter_args(self._rows))
        self._cache, self._logits = out[self.cache_arg], out.logits[:, -1].float()
        self._next_pos = self._next_pos + 1

    def _pick(self, row: _Row, logits: Tensor, logp: Tensor) -> int:
        params = row.job.params
        if params.temperature == 0:
            return int(logp.argmax())
        probs = torch.softmax(logits / params.temperature, dim=-1)
        if params.top_p < 1.0:  # the smallest set of most likely tokens whose mass reaches top_p
            sorted_p, order = probs.sort(descending=True)
            outside = sorted_p.cumsum(-1) - sorted_p >= params.top_p
            sorted_p = sorted_p.masked_fill(outside, 0.0)
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        cdf = probs.cumsum(-1)
        u = torch.rand(1, generator=row.generator) * cdf[-1]
        return int(torch.searchsorted(cdf, u).clamp(max=cdf.shape[0] - 1))

    def _emit(self, row: _Row, token: int) -> bool:
        """Hand the row's new text to its job; False when the row has ended."""
        params = row.job.params
        ended = token == self.eos
        ids = row.ids[:-1] if ended else row.ids
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        reason = "stop" if ended else ("length" if len(row.ids) >= params.max_tokens else None)
        for stop in params.stop:
            at = text.find(stop, max(0, row.sent_chars - len(stop) + 1))
            if at >= 0:
                text, reason = text[:at], "stop"
        if reason is None:
            hold = max((len(s) - 1 for s in params.stop), default=0)
            ready = len(text) - hold
            if text.endswith("\ufffd"):  # a character cut between tokens: wait for the rest of it
                ready = min(ready, len(text) - 1)
            if ready <= row.sent_chars:
                return True
            text = text[:ready]
        delta = text[row.sent_chars:]
        span = slice(row.sent_tokens, len(row.ids))
        self._deliver(row.job, Event(row.index, delta, tuple(row.ids[span]), tuple(row.logprobs[span]),
                                     tuple(row.top[span]), reason))
        row.sent_chars, row.sent_tokens = len(text), len(row.ids)
        if reason is not None:
            self._close(row)
            return False
        return True

    def _finish(self, row: _Row, reason: str) -> None:
        if row.closed:
            return
        self._deliver(row.job, Event(row.index, "", finish_reason=reason))
        if reason == "cancelled":
            self.stats.cancelled += 1
        self._close(row)

    def _deliver(self, job: Job, event: Event) -> None:
        """Hand an event to its consumer. One that raises (its client is gone) has its request cancelled; the rest
        of the batch goes on."""
        try:
            job.callback(event)
        except Exception:
            log.warning("the consumer of %s failed on an event; its request is cancelled", job.id, exc_info=True)
            job.cancel()

    def _close(self, row: _Row) -> None:
        if row.closed:
            return
        row.closed = True
        row.job.open_choices -= 1
        if row.job.open_choices == 0:
            self.stats.finished += 1

    def _select(self, keep: list[int]) -> None:
        if not keep:
            self._reset()
            return
        index = torch.tensor(keep)
        assert self._mask is not None and self._next_pos is not None and self._logits is not None
        mask = self._mask[index]
        first = int((mask.sum(0) > 0).nonzero()[0])  # columns every remaining row leaves empty go
        for layer in _layers(self._cache):
            layer.keys = layer.keys[index, :, first:]
            layer.values = layer.values[index, :, first:]
        self._mask, self._next_pos, self._logits = mask[:, first:], self._next_pos[index], self._logits[index]
        self._rows = [self._rows[i] for i in keep]

    def _adapter_args(self, rows: Sequence[_Row]) -> dict:
        if not self.peft:
            return {}
        names = [self.adapters[r.job.params.adapter] if r.job.params.adapter else BASE for r in rows]
        return {"adapter_names": names}


def _generator(seed: int | None, index: int) -> torch.Generator:
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed * 1_000_003 + index)  # each choice of a seeded request its own stream
    return g


def _layers(cache):
    return cache.layers


def _pad_left(x: Tensor, width: int, dim: int = -2) -> Tensor:
    missing = width - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)

