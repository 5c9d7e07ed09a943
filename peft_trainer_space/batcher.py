"""Continuous batching: concurrent requests, each with its own adapter, decode together in one forward per step.

A request is prefilled alone (its prompt, its adapter) and then joins the running batch: every step feeds each row
its last token, with the rows' KV caches left-padded to one length and masked. Rows leave when they finish, are
cancelled or their reader goes away; new ones join between steps. A batch whose rows all use one adapter runs it as
the model's adapter choice (the same arithmetic as a request alone); a mixed batch passes ``adapter_names`` per row.
An adapter with ``target_parameters`` (which cannot run per row, as in peft) decodes only beside its own requests.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache, LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
from transformers.modeling_outputs import CausalLMOutputWithPast

log = logging.getLogger("peft_trainer_space")
_DONE = object()
# transformers 5.x renamed the KV cache argument and output field past_key_values -> cache (the old name warns).
CACHE = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


@dataclass
class Request:
    """One generation: ``input_ids`` (1, L) of the prompt; text updates (the whole text so far) go to ``out``."""

    adapter: str
    input_ids: torch.Tensor
    max_new_tokens: int
    processors: LogitsProcessorList | None  # None: greedy
    stops: tuple[threading.Event, ...]  # any set: the row leaves at the next step
    out: queue.Queue = field(default_factory=queue.Queue)
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    left: bool = False  # the batcher has let go of it (finished, stopped or failed)

    def cancelled(self) -> bool:
        return any(e.is_set() for e in self.stops)

    def texts(self) -> Iterator[str]:
        """The text so far after each new piece; raises what the batcher raised for this request."""
        while True:
            item = self.out.get()
            self.left = item is _DONE or isinstance(item, BaseException)
            if item is _DONE:
                return
            if self.left:
                raise item
            yield item

    def wait_until_left(self) -> None:
        """Block until the batcher has let go of this request (after a stop, at its next step)."""
        while not self.left:
            item = self.out.get()
            self.left = item is _DONE or isinstance(item, BaseException)


def sampling_processors(temperature: float, top_k: int, top_p: float) -> LogitsProcessorList:
    """What ``generate(do_sample=True, ...)`` applies before drawing: temperature, then top-k, then top-p."""
    chain = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k:
        chain.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        chain.append(TopPLogitsWarper(top_p))
    return chain


class Batcher:
    """One scheduler thread over ``engine``'s model. Callers hold the engine's read lock for as long as their request
    runs, so adapters never change under a running batch; the scheduler itself takes no lock."""

    def __init__(self, engine: Any, tokenizer: Any, max_batch: int = 32) -> None:
        self.engine, self.tokenizer, self.max_batch = engine, tokenizer, max_batch
        ids = getattr(engine.base.generation_config, "eos_token_id", None)
        ids = ids if ids is not None else getattr(tokenizer, "eos_token_id", None)
        self.eos = set(ids if isinstance(ids, list) else [ids]) - {None}  # what ends a row, as in generate()
        self._pending: queue.Queue[Request | None] = queue.Queue()  # None: close
        self._waiting: collections.deque[Request] = collections.deque()  # taken from _pending, not yet admitted
        self._rows: list[Request] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # (B, T): 1 where a row's cache holds a real token
        self._positions: list[int] = []
        self._thread: threading.Thread | None = None
        self._start = threading.Lock()
        self.steps = 0
        self.peak_batch = 0

    def submit(self, request: Request) -> Request:
        with self._start:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="batcher", daemon=True)
                self._thread.start()
        self._pending.put(request)
        return request

    def close(self) -> None:
        """Stop the scheduler once it is idle (requests still running finish first)."""
        self._pending.put(None)

    # ---- the scheduler ------------------------------------------------------------------------------------------

    def _run(self) -> None:
        closing = False
        while True:
            if not self._rows and not self._waiting:
                if closing or (request := self._pending.get()) is None:  # idle: wait for work
                    return
                self._waiting.append(request)
            while not closing:
                try:
                    request = self._pending.get_nowait()
                except queue.Empty:
                    break
                if request is None:  # closing: finish the running and waiting rows first
                    closing = True
                else:
                    self._waiting.append(request)
            # First come, first served: a request that cannot join the batch holds back the ones behind it.
            while self._waiting and len(self._rows) < self.max_batch and self._fits(self._waiting[0].adapter):
                self._admit(self._waiting.popleft())
            if self._rows:
                try:
                    self._step()
                except BaseException as e:  # a broken step fails its rows, never the scheduler
                    log.exception("batched decoding step failed")
                    for row in self._rows:
                        row.out.put(e)
                    self._rows, self._cache, self._mask, self._positions = [], None, None, []

    def _fits(self, adapter: str) -> bool:
        """Whether a request for ``adapter`` can join the running rows: an adapter whose layers refuse an adapter
        per row (``target_parameters``) decodes only beside requests for itself."""
        adapters = {r.adapter for r in self._rows} | {adapter}
        return len(adapters) == 1 or not any(self.engine.runs_alone(a) for a in adapters)

    def _model(self, adapters: list[str]) -> tuple[torch.nn.Module, dict[str, Any], Any]:
        """The model, extra forward kwargs and a context for one forward over rows with ``adapters``."""
        peft = self.engine.peft
        if peft is None:
            return self.engine.base, {}, contextlib.nullcontext()
        if len(set(adapters)) == 1:
            return peft, {}, peft.use_adapter(adapters[0])
        return peft, {"adapter_names": adapters}, contextlib.nullcontext()

    def _admit(self, request: Request) -> None:
        """Prefill ``request`` alone, emit its first token, and add its cache to the batch."""
        if request.cancelled():
            request.out.put(_DONE)
            return
        try:
            model, kwargs, choice = self._model([request.adapter])
            ids = request.input_ids
            with choice, torch.inference_mode():
                out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, **kwargs)
            token = self._pick(request, out.logits[:, -1])
        except BaseException as e:
            request.out.put(e)
            return
        if self._emit(request, token):
            return
        layers = [(layer.keys, layer.values) for layer in getattr(out, CACHE).layers]
        self._join(request, layers, ids.shape[1])

    def _join(self, request: Request, layers: list[tuple[torch.Tensor, torch.Tensor]], length: int) -> None:
        """Add one row (its per-layer K/V ``(1, heads, length, dim)``) to the batch, left-padding the shorter side."""
        mask = torch.ones(1, length, dtype=torch.long, device=request.input_ids.device)
        if self._cache is None:
            self._cache, self._mask = DynamicCache(ddp_cache_data=layers), mask
        else:
            width = max(self._mask.shape[1], length)
            merged = []
            for (k, v), layer in zip(layers, self._cache.layers, strict=True):
                merged.append((torch.cat([_left_pad(layer.keys, width), _left_pad(k, width)]),
                               torch.cat([_left_pad(layer.values, width), _left_pad(v, width)])))  # fmt: skip
            self._cache = DynamicCache(ddp_cache_data=merged)
            self._mask = torch.cat([_left_pad(self._mask, width, dim=1), _left_pad(mask, width, dim=1)])
        self._rows.append(request)
        self._positions.append(length)
        self.peak_batch = max(self.peak_batch, len(self._rows))

    def _step(self) -> None:
        """One decoding step for every row: feed each its last token, pick the next, drop the finished rows."""
        rows = self._rows
        device = self._mask.device
        ids = torch.tensor([[r.tokens[-1]] for r in rows], device=device)
        mask = torch.cat([self._mask, torch.ones(len(rows), 1, dtype=self._mask.dtype, device=device)], dim=1)
        positions = torch.tensor([[p] for p in self._positions], device=device)
        model, kwargs, choice = self._model([r.adapter for r in rows])
        with choice, torch.inference_mode():
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                        **{CACHE: self._cache}, **kwargs)  # fmt: skip
        self.steps += 1
        self._cache, self._mask = getattr(out, CACHE), mask
        self._positions = [p + 1 for p in self._positions]
        keep = []
        for i, row in enumerate(rows):
            if row.cancelled():
                row.out.put(_DONE)
            elif not self._emit(row, self._pick(row, out.logits[i : i + 1, -1])):
                keep.append(i)
        if len(keep) < len(rows):
            self._drop(keep)

    def _drop(self, keep: list[int]) -> None:
        """Keep only rows ``keep``; cut the cache columns that are now padding in every row."""
        self._rows = [self._rows[i] for i in keep]
        self._positions = [self._positions[i] for i in keep]
        if not keep:
            self._cache, self._mask = None, None
            return
        index = torch.tensor(keep, device=self._mask.device)
        self._mask = self._mask.index_select(0, index)
        first = int(self._mask.any(dim=0).nonzero()[0])  # leading columns that no row uses any more
        layers = [(layer.keys.index_select(0, index)[:, :, first:], layer.values.index_select(0, index)[:, :, first:])
                  for layer in self._cache.layers]  # fmt: skip
        self._cache, self._mask = DynamicCache(ddp_cache_data=layers), self._mask[:, first:]

    def _pick(self, row: Request, logits: torch.Tensor) -> int:
        """Greedy (argmax, as ``generate``) or a draw after the request's temperature/top-k/top-p."""
        scores = logits.float()
        if row.processors is None:
            return int(scores.argmax(dim=-1))
        context = torch.tensor([[*row.input_ids[0].tolist(), *row.tokens]], device=scores.device)
        probs = torch.softmax(row.processors(context, scores), dim=-1)
        return int(torch.multinomial(probs, 1))

    def _emit(self, row: Request, token: int) -> bool:
        """Record ``token`` for ``row`` and send its text; True when the row is finished (and told so)."""
        row.tokens.append(token)
        text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        if text != row.text:
            row.text = text
            row.out.put(text)
        if token in self.eos or len(row.tokens) >= row.max_new_tokens:
            row.out.put(_DONE)
            return True
        return False


def _left_pad(t: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    """``t`` zero-padded at the front of ``dim`` to ``width`` (K/V: the sequence axis; masks: dim 1)."""
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)
