"""The serving engine: requests that arrive together are generated together, each row with its own adapter.

One worker thread owns the model. It waits for a request, keeps collecting for ``window_ms`` (or until
``max_batch`` requests of one batch class are queued), and runs one batched generation: a prefill of the
left-padded prompts under the mixed-task model (row i edited by adapter ``tasks[i]`` only), then decode steps
on the KV cache (``ReftModel.decoding``: only every-token interventions such as IA3 act there). Tokens go back
to each request as they are made; a row that ends (EOS, ``max_tokens``, a stop string, a client that left)
leaves the batch at once: its rows of the KV cache are dropped and its caller is answered, while the others
go on. Requests that arrive meanwhile join between two steps: they are prefilled apart and their keys/values
merged into the batch's cache (the shorter side left-padded and masked). Batch classes: every ReFT adapter and
the bare model share one (the mixed-task routing); each SVF expert is its own, because SVF changes the base
weights for the whole forward.

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
        self.task: str | None = None  # its task in the mixed-task model (None: the bare model or an SVF route)
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
                      "row_steps": 0, "joined": 0, "cancelled": 0, "errors": 0}
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
        """Prefill, then decode steps until every row has ended; rows that end leave, queued requests of the same
        batch class join between steps (prefilled apart, then merged into the batch's KV cache)."""
        key, reft = self._batch_class(batch[0]), self.adapters.reft
        self.stats["batches"] += 1
        routes: set[str | None] = set()
        with self.adapters.svf_route(key):
            rows, cache, mask, positions, logits = self._prefill(batch, reft)
            self._count(routes, batch, len(rows))
            while True:
                keep, chosen = self._take(rows, logits)
                if len(keep) < len(rows):  # finished rows leave: the others stop paying for them
                    index = torch.tensor(keep, dtype=torch.long, device=mask.device)
                    cache.batch_select_indices(index)
                    rows = [rows[p] for p in keep]
                    mask, positions, chosen = mask[index], positions[index], chosen[index]
                joiners = self._joiners(key, self.max_batch - len(rows)) if _mergeable(cache) else []
                if joiners:
                    new_rows, new_cache, new_mask, new_positions, new_logits = self._prefill(joiners, reft)
                    new_keep, new_chosen = self._take(new_rows, new_logits)
                    if new_keep:
                        index = torch.tensor(new_keep, dtype=torch.long, device=mask.device)
                        new_cache.batch_select_indices(index)
                        cache, mask = _merged(cache, mask, new_cache, new_mask[index])
                        rows += [new_rows[p] for p in new_keep]
                        positions = torch.cat([positions, new_positions[index]])
                        chosen = torch.cat([chosen, new_chosen[index]])
                    self._count(routes, joiners, len(rows))
                self.running = len(rows)
                if not rows:
                    return
                mask = torch.cat([mask, mask.new_ones(len(rows), 1)], 1)
                positions = positions + 1
                stepping = reft.decoding(len(rows), tasks=[row.task for row in rows]) if reft is not None \
                    else contextlib.nullcontext()
                with stepping:
                    out = self.model(input_ids=chosen[:, None], attention_mask=mask, position_ids=positions,
                                     use_cache=True, **{self._cache_arg: cache})
                logits = out.logits[:, -1].float()
                self.stats["decode_steps"] += 1
                self.stats["row_steps"] += len(rows)

    def _count(self, routes: set[str | None], batch: list[GenerationRequest], rows: int) -> None:
        """Counters, as soon as they change (a caller answered at once may read them)."""
        mixed = len(routes) > 1
        routes |= {r.route for r in batch}
        self.stats["mixed_batches"] += len(routes) > 1 and not mixed
        self.stats["max_batch_rows"] = max(self.stats["max_batch_rows"], rows)

    def _prefill(self, batch: list[GenerationRequest], reft: Any) -> tuple[list[_Row], Any, torch.Tensor,
                                                                             torch.Tensor, torch.Tensor]:
        """The left-padded prompts through the model, row i under its adapter: rows, KV cache, mask, each row's
        last position id ``[n, 1]``, and the next-token logits ``[n, vocab]``."""
        rows = [_Row(r, self.tokenizer, self.eos) for r in batch]
        for row in rows:
            row.task = row.request.route if self.adapters.route_kind(row.request.route) == "reft" else None
        self.stats["rows"] += len(rows)
        device = next(self.model.parameters()).device
        width = max(len(r.prompt_ids) for r in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, request in enumerate(batch):  # left padding: every row's next token is at the same column
            ids[i, width - len(request.prompt_ids):] = torch.tensor(request.prompt_ids)
            mask[i, width - len(request.prompt_ids):] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        cache = DynamicCache()
        routed = reft.intervening(ids, mask, tasks=[row.task for row in rows]) if reft is not None \
            else contextlib.nullcontext()
        with routed:
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             **self._last_only, **{self._cache_arg: cache})
        return rows, cache, mask, positions[:, -1:], out.logits[:, -1].float()

    def _take(self, rows: list[_Row], logits: torch.Tensor) -> tuple[list[int], torch.Tensor]:
        """Each row's next token, handed to the row: the places of the rows that go on, and the tokens."""
        chosen = self._choose(logits, rows)
        keep = []
        for place, row in enumerate(rows):
            if row.request.cancelled.is_set():
                self.stats["cancelled"] += 1
            elif row.add(int(chosen[place])) is None:
                keep.append(place)
        return keep, chosen

    def _joiners(self, key: str | None, room: int) -> list[GenerationRequest]:
        """Queued requests of batch class ``key`` that can join the running batch now (none while an adapter
        load waits: it runs between batches, so the batch must be let to end)."""
        if room <= 0:
            return []
        with self._cond:
            # first come, first served across classes: once an older request of another class waits, the batch
            # takes no one more and ends, so a stream of ReFT requests cannot keep an SVF one waiting for ever
            if self._admin or not self._queue or self._batch_class(self._queue[0]) != key:
                return []
            taken, rest = [], deque()
            for request in self._queue:
                if len(taken) < room and not request.cancelled.is_set() and self._batch_class(request) == key \
                        and self.adapters.route_kind(request.route) != "gone":
                    taken.append(request)
                else:
                    rest.append(request)
            self._queue = rest
        self.stats["joined"] += len(taken)
        return taken

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


def _mergeable(cache: Any) -> bool:
    """Rows can join a batch whose cache is plain per-layer keys/values (not sliding-window or quantized layers)."""
    return all(type(layer).__name__ == "DynamicLayer" and getattr(layer, "keys", None) is not None
               for layer in getattr(cache, "layers", [None]))


def _merged(cache: Any, mask: torch.Tensor, other: Any, other_mask: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """Two batches' caches and masks as one: the shorter left-padded (masked out), rows of ``other`` last."""
    width = max(mask.shape[1], other_mask.shape[1])

    def pad(t: torch.Tensor, have: int) -> torch.Tensor:  # [B, H, T, D] or [B, T], padded on the left
        return torch.nn.functional.pad(t, (0, 0, width - have, 0) if t.dim() == 4 else (width - have, 0))
    pairs = [(torch.cat([pad(a.keys, mask.shape[1]), pad(b.keys, other_mask.shape[1])]),
              torch.cat([pad(a.values, mask.shape[1]), pad(b.values, other_mask.shape[1])]))
             for a, b in zip(cache.layers, other.layers)]
    return DynamicCache(ddp_cache_data=pairs), torch.cat([pad(mask, mask.shape[1]),
                                                          pad(other_mask, other_mask.shape[1])])
