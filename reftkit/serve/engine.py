"""The serving engine: requests that arrive together are generated together, each row with its own adapter.

One worker thread owns the model. It waits for a request, keeps collecting for ``window_ms`` (or until
``max_batch`` requests of one batch class are queued), and runs one batched generation: a prefill of the
left-padded prompts under the mixed-task model (row i edited by adapter ``tasks[i]`` only), then decode steps
on the KV cache (``ReftModel.decoding``: only every-token interventions such as IA3 act there). Tokens go back
to each request as they are made; a row that ends (EOS, ``max_tokens``, a stop string, a client that left)
leaves the batch at once: its rows of the KV cache are dropped and its caller is answered, while the others
go on. Batch classes: every ReFT adapter and the bare model share one (the mixed-task routing); each SVF
expert is its own, because SVF changes the base weights for the whole forward.

Positions follow ``generate``: each row's position ids count its real tokens, so a padded row computes what
it computes alone (greedy outputs equal ``ReftModel.generate`` on the prompt alone, token for token).
"""
from __future__ import annotations

import contextlib
import inspect
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from transformers import DynamicCache

from .adapters import AdapterSet

__all__ = ["Engine", "GenerationRequest", "QueueFull", "ShuttingDown"]


class QueueFull(RuntimeError):
    """More requests wait than ``max_queue``: the caller should answer 429 and the client retry later."""


class ShuttingDown(RuntimeError):
    """The engine drains the requests it has and takes no new ones."""


@dataclass
class GenerationRequest:
    """One row to generate. ``sink(event, payload)`` is called from the engine thread with ``("text", str)``
    pieces as they are decided, then once ``("done", {"finish_reason", "prompt_tokens", "completion_tokens"})``
    or ``("error", message)``. Setting ``cancelled`` (a client that left) drops the row at the next step."""

    prompt_ids: list[int]
    route: str | None
    max_tokens: int
    sink: Callable[[str, Any], None]
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    cancelled: threading.Event = field(default_factory=threading.Event)
    arrived: float = field(default_factory=time.monotonic)


class _Row:
    """A request inside a running batch: its tokens so far, the text already sent, its sampler."""

    def __init__(self, request: GenerationRequest, tokenizer: Any, eos: set[int]) -> None:
        self.request, self.tokenizer, self.eos = request, tokenizer, eos
        self.tokens: list[int] = []
        self.sent = ""
        self.generator = None
        if request.seed is not None and request.temperature > 0:
            self.generator = torch.Generator().manual_seed(request.seed)
        self.hold = max((len(s) for s in request.stop), default=1) - 1  # a stop string may still be forming

    def add(self, token: int) -> str | None:
        """Take the next token; the finish reason when the row is done, else None (text pieces are sent)."""
        if token in self.eos:
            return self.finish("stop")
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        for stop in self.request.stop:
            at = text.find(stop)
            if at >= 0:
                return self.finish("stop", text[:at])
        if len(self.tokens) >= self.request.max_tokens:
            return self.finish("length", text)
        ready = len(text) - self.hold
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next byte
            ready = min(ready, len(text) - 1)
        if ready > len(self.sent) and text.startswith(self.sent):
            self.request.sink("text", text[len(self.sent):ready])
            self.sent = text[:ready]
        return None

    def finish(self, reason: str, text: str | None = None) -> str:
        if text is None:
            text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if len(text) > len(self.sent) and text.startswith(self.sent):
            self.request.sink("text", text[len(self.sent):])
        self.request.sink("done", {"finish_reason": reason, "prompt_tokens": len(self.request.prompt_ids),
                                   "completion_tokens": len(self.tokens), "tokens": list(self.tokens)})
        return reason


class Engine:
    """Batches :class:`GenerationRequest` s across callers on one thread (see the module docstring)."""

    def __init__(self, adapters: AdapterSet, tokenizer: Any, *, max_batch: int = 16, window_ms: float = 10.0,
                 max_queue: int = 256) -> None:
        for name, value, low in (("max_batch", max_batch, 1), ("max_queue", max_queue, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}={value!r} must be an int >= {low}")
        if not (isinstance(window_ms, (int, float)) and 0 <= window_ms <= 10_000):
            raise ValueError(f"window_ms={window_ms!r} must be a number of milliseconds in [0, 10000]")
        self.adapters, self.tokenizer = adapters, tokenizer
        self.model = adapters.model
        self.max_batch, self.window, self.max_queue = max_batch, window_ms / 1000.0, max_queue
        config = self.model.generation_config if hasattr(self.model, "generation_config") else None
        eos = getattr(config, "eos_token_id", None)
        eos = eos if isinstance(eos, (list, tuple)) else [eos]
        self.eos = {int(t) for t in [*eos, tokenizer.eos_token_id] if t is not None}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos, default=0)
        params = inspect.signature(self.model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"  # transformers renamed it in 5.x
        self._last_only = {"logits_to_keep": 1} if "logits_to_keep" in params else {}  # prefill: one row of logits
        self._queue: deque[GenerationRequest] = deque()
        self._admin: deque[tuple[Callable[[], Any], Future]] = deque()
        self._cond = threading.Condition()
        self._accepting = True
        self._stopped = False
        self.running = 0
        self.stats = {"batches": 0, "rows": 0, "mixed_batches": 0, "max_batch_rows": 0, "decode_steps": 0,
                      "row_steps": 0, "cancelled": 0, "errors": 0}
        self._thread = threading.Thread(target=self._loop, name="reftkit-serve-engine", daemon=True)
        self._thread.start()

    # -- the callers' side ------------------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> None:
        with self._cond:
            if not self._accepting:
                raise ShuttingDown("the server is shutting down and takes no new requests")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are waiting (max_queue={self.max_queue}); retry later")
            self._queue.append(request)
            self._cond.notify_all()

    def call_between_batches(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` on the engine thread between two batches (adapter loads change the model); a Future."""
        future: Future = Future()
        with self._cond:
            if self._stopped:
                raise ShuttingDown("the engine has stopped")
            self._admin.append((fn, future))
            self._cond.notify_all()
        return future

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def accepting(self) -> bool:
        return self._accepting

    def stop(self, timeout: float | None = None) -> bool:
        """Take no new requests, finish the queued and running ones, end the thread; False if ``timeout`` ran
        out first."""
        with self._cond:
            self._accepting = False
            self._cond.notify_all()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # -- the engine thread ------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._admin and self._accepting:
                    self._cond.wait()
                admin = list(self._admin)
                self._admin.clear()
                if not self._queue and not admin and not self._accepting:
                    self._stopped = True
                    return
            for fn, future in admin:
                try:
                    future.set_result(fn())
                except BaseException as err:  # reported to the caller; the engine goes on
                    future.set_exception(err)
            batch = self._collect()
            if batch:
                self._run(batch)

    def _batch_class(self, request: GenerationRequest) -> str | None:
        """``None`` for the bare model and ReFT routes (one batch), the route itself for SVF ones."""
        kind = self.adapters.route_kind(request.route)
        return request.route if kind == "svf" else None

    def _collect(self) -> list[GenerationRequest]:
        """The oldest request and those queued with it (same batch class) within the window, up to max_batch."""
        with self._cond:
            if not self._queue:
                return []
            deadline = self._queue[0].arrived + self.window
            key = self._batch_class(self._queue[0])
            while self._accepting and not self._admin:
                same = sum(self._batch_class(r) == key for r in self._queue)
                left = deadline - time.monotonic()
                if same >= self.max_batch or left <= 0:
                    break
                self._cond.wait(left)
            batch, rest = [], deque()
            for request in self._queue:
                if request.cancelled.is_set():
                    self.stats["cancelled"] += 1
                    continue
                if len(batch) < self.max_batch and self._batch_class(request) == key:
                    batch.append(request)
                else:
                    rest.append(request)
            self._queue = rest
            self.running = len(batch)
            return batch

    def _run(self, batch: list[GenerationRequest]) -> None:
        gone = [r for r in batch if self.adapters.route_kind(r.route) == "gone"]
        for request in gone:  # unloaded (or an evicted mixture) while it waited
            request.sink("error", f"adapter {request.route!r} was unloaded before the request ran")
        batch = [r for r in batch if r not in gone]
        if not batch:
            self.running = 0
            return
        try:
            self._generate(batch)
        except Exception as err:  # a failed batch fails its requests, not the server
            self.stats["errors"] += 1
            for request in batch:
                request.sink("error", f"generation failed: {type(err).__name__}: {err}")
        finally:
            self.running = 0

    @torch.no_grad()
    def _generate(self, batch: list[GenerationRequest]) -> None:
        adapters, device = self.adapters, next(self.model.parameters()).device
        rows = [_Row(r, self.tokenizer, self.eos) for r in batch]
        routes = [r.route for r in batch]
        svf_route = self._batch_class(batch[0])
        reft = adapters.reft
        tasks = [r if adapters.route_kind(r) == "reft" else None for r in routes]
        self.stats["batches"] += 1
        self.stats["rows"] += len(batch)
        self.stats["mixed_batches"] += len(set(routes)) > 1
        self.stats["max_batch_rows"] = max(self.stats["max_batch_rows"], len(batch))
        width = max(len(r.prompt_ids) for r in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, request in enumerate(batch):  # left padding: every row's next token is at the same column
            ids[i, width - len(request.prompt_ids):] = torch.tensor(request.prompt_ids)
            mask[i, width - len(request.prompt_ids):] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        cache = DynamicCache()
        with adapters.svf_route(svf_route):
            routed = reft.intervening(ids, mask, tasks=tasks) if reft is not None else contextlib.nullcontext()
            with routed:
                out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                                 **self._last_only, **{self._cache_arg: cache})
            alive = list(range(len(batch)))
            while True:
                chosen = self._choose(out.logits[:, -1].float(), [rows[i] for i in alive])
                keep = []
                for place, i in enumerate(alive):
                    if rows[i].request.cancelled.is_set():
                        self.stats["cancelled"] += 1
                    elif rows[i].add(int(chosen[place])) is None:
                        keep.append(place)
                if not keep:
                    return
                if len(keep) < len(alive):  # finished rows leave: the others stop paying for them
                    index = torch.tensor(keep, device=device)
                    cache.batch_select_indices(index)
                    mask, positions, chosen = mask[index], positions[index], chosen[index]
                    alive = [alive[p] for p in keep]
                mask = torch.cat([mask, mask.new_ones(len(alive), 1)], 1)
                positions = positions[:, -1:] + 1
                stepping = reft.decoding(len(alive), tasks=[tasks[i] for i in alive]) if reft is not None \
                    else contextlib.nullcontext()
                with stepping:
                    out = self.model(input_ids=chosen[:, None], attention_mask=mask, position_ids=positions,
                                     use_cache=True, **{self._cache_arg: cache})
                self.stats["decode_steps"] += 1
                self.stats["row_steps"] += len(alive)

    def _choose(self, logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
        """Per row: the arg-max (temperature 0) or a sample at its temperature within its top-p nucleus."""
        chosen = logits.argmax(-1)
        for place, row in enumerate(rows):
            request = row.request
            if request.temperature <= 0:
                continue
            probs = torch.softmax(logits[place] / request.temperature, -1)
            if request.top_p < 1.0:
                ordered, order = probs.sort(descending=True)
                outside = ordered.cumsum(0) - ordered >= request.top_p  # keep the smallest set reaching top_p
                ordered[outside] = 0
                probs = torch.zeros_like(probs).scatter(0, order, ordered)
            chosen[place] = torch.multinomial(probs.cpu(), 1, generator=row.generator)[0].to(chosen.device)
        return chosen
