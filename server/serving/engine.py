"""The serving scheduler: one thread owns the model and runs continuous batching.

Every model operation (prefill, decode step, scoring, loading or evicting an adapter)
happens on the engine thread, between decode steps, so nothing needs a lock around
the model. gRPC handler threads only validate a request, resolve "latest" to a concrete
version, queue the request and read its events.

- Continuous batching: queued requests are prefilled and join the running batch
  between decode steps; finished rows leave it (`kv_batch`).
- Mixed adapters: each row names a LoRA slot; `BatchedLoraModel` applies each row's own
  adapter in the same forward.
- Adapter LRU: loaded versions are reference-counted by the requests using them;
  when loading one would exceed the memory cap, the least recently used unreferenced,
  unpinned versions are evicted. A request whose adapter cannot fit waits only while
  running requests hold memory that will come free (other requests go ahead of it);
  if pinned adapters alone leave no room it gets RESOURCE_EXHAUSTED at once.
- Faults stay with their request: a corrupt adapter, a failing sampler or a failing
  load fails that request only; every request always gets a final event (done,
  cancelled or an error), also when the engine stops.
- Hot-load: a watcher polls the registry's CURRENT pointers; a moved pointer preloads
  the new version, and requests resolve "latest" when queued, so in-flight requests
  finish on the version they started with and nothing is dropped.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from fedpeft.common.protocol.serving_api import (
    AdapterStatus,
    EngineLimits,
    GenerateParams,
    Sampling,
    ScoreResult,
    TokenEvent,
)
from fedpeft.server.serving.batched_lora import BASE_SLOT, BatchedLoraModel
from fedpeft.server.serving.errors import (
    AdapterIncompatibleError,
    DeadlineError,
    InvalidRequestError,
    OverloadedError,
    ServingError,
    ShuttingDownError,
)
from fedpeft.server.serving.kv_batch import BatchState, decode_step, join, keep, prefill
from fedpeft.server.serving.registry import AdapterRegistry

log = logging.getLogger("fedpeft.serving")
T = TypeVar("T")


class GenerationJob:
    """One queued or running generation; its events are read by the RPC thread."""

    def __init__(self, params: GenerateParams, prompt_ids: list[int], version: int, max_new_tokens: int) -> None:
        self.params = params
        self.prompt_ids = prompt_ids
        self.version = version
        self.max_new_tokens = max_new_tokens
        self.events: queue.Queue[TokenEvent | BaseException] = queue.Queue()
        self.generated: list[int] = []
        self.emitted_text = ""
        self.slot = BASE_SLOT
        self.holds_ref = False
        self.generator: torch.Generator | None = None
        self.cancelled = threading.Event()
        self.submitted_at = time.perf_counter()
        self.finished_at: float | None = None

    @property
    def key(self) -> tuple[str, int] | None:
        return (self.params.adapter_id, self.version) if self.params.adapter_id else None

    def stream(self, timeout: float | None = None) -> Iterator[TokenEvent]:
        """Events until the job is done; raises the job's error, if any."""
        while True:
            try:
                item = self.events.get(timeout=timeout)
            except queue.Empty:
                self.cancelled.set()
                raise DeadlineError(f"no token within {timeout} s; request cancelled") from None
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.done:
                return


@dataclass
class _Loaded:
    slot: int
    num_bytes: int
    refs: int = 0
    pinned: bool = False


class ServingEngine:
    """Owns the base model (wrapped for batched LoRA) and serves registry adapters."""

    def __init__(self, model: nn.Module, tokenizer: Any, registry: AdapterRegistry, limits: EngineLimits | None = None,
                 poll_seconds: float = 1.0, base_name: str = "", base_fingerprint: str | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.registry = registry
        self.limits = limits or EngineLimits()
        self.poll_seconds = poll_seconds
        self.base_name = base_name
        self.base_fingerprint = base_fingerprint
        """`model_fingerprint` of the served base; adapters published for another base are refused."""
        self.lora = BatchedLoraModel(model)
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        self.eos_ids = self._eos_ids()
        self._pending: deque[GenerationJob] = deque()
        self._control: deque[tuple[Callable[[], Any], Future]] = deque()
        self._wake = threading.Condition()
        self._running: list[GenerationJob] = []
        self._state: BatchState | None = None
        self._loaded: OrderedDict[tuple[str, int], _Loaded] = OrderedDict()
        self._sizes: dict[tuple[str, int], int] = {}
        self._slot_ids = itertools.count()
        self._current_seen: dict[str, int] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.steps = 0
        self.max_adapters_in_batch = 0
        """Most distinct adapters (the base counts as one) decoded in one batch so far."""
        self.joins_while_running = 0
        """Prefills that joined a batch which was already decoding (continuous batching)."""

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> ServingEngine:
        for target, name in ((self._loop, "fedpeft-engine"), (self._watch, "fedpeft-registry-watch")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        """Stop the threads; every queued, running or control request gets an UNAVAILABLE error."""
        self._stop.set()
        with self._wake:
            self._wake.notify_all()
        for thread in self._threads:
            thread.join(timeout=30)
        error = ShuttingDownError("the server is shutting down")
        with self._wake:
            pending, self._pending = list(self._pending), deque()
            control, self._control = list(self._control), deque()
        for job in pending + self._running:
            job.events.put(error)
        self._running, self._state = [], None
        for _, future in control:
            if future.set_running_or_notify_cancel():
                future.set_exception(error)

    def __enter__(self) -> ServingEngine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- API (any thread) ------------------------------------------------------------

    def submit(self, params: GenerateParams) -> GenerationJob:
        """Validate and queue a generation; errors are raised here, before queueing."""
        if self._stop.is_set():
            raise ShuttingDownError("the server is shutting down")
        if not params.prompt:
            raise InvalidRequestError("prompt is empty")
        problems = params.sampling.problems(self.vocab_size)
        max_new = params.max_new_tokens or min(self.limits.default_max_new_tokens, self.limits.max_new_tokens)
        if max_new > self.limits.max_new_tokens:
            problems.append(f"max_new_tokens {max_new} exceeds the limit {self.limits.max_new_tokens}")
        if problems:
            raise InvalidRequestError("invalid request: " + "; ".join(problems))
        prompt_ids = self._encode(params.prompt)
        version = self.registry.resolve(params.adapter_id, params.version) if params.adapter_id else 0
        job = GenerationJob(params, prompt_ids, version, max_new)
        if params.sampling.temperature > 0:
            job.generator = torch.Generator().manual_seed(params.sampling.seed)
        with self._wake:
            if len(self._pending) >= self.limits.max_queue:
                raise OverloadedError(f"{len(self._pending)} requests are queued (limit {self.limits.max_queue}); retry later")
            self._pending.append(job)
            self._wake.notify_all()
        return job

    def generate(self, params: GenerateParams, timeout: float | None = None) -> tuple[list[int], str, str, int]:
        """Blocking generation: (token ids, text, finish reason, version)."""
        job = self.submit(params)
        ids: list[int] = []
        reason = ""
        for event in job.stream(timeout):
            ids += event.token_ids
            reason = event.finish_reason or reason
        return ids, self.tokenizer.decode(ids, skip_special_tokens=True), reason, job.version

    def score(self, adapter_id: str, version: int, prompt: str, continuations: list[str]) -> ScoreResult:
        if not prompt:
            raise InvalidRequestError("prompt is empty")
        if not continuations or len(continuations) > self.limits.max_continuations:
            raise InvalidRequestError(f"give 1 to {self.limits.max_continuations} continuations, got {len(continuations)}")
        prompt_ids = self._encode(prompt)
        conts = [self.tokenizer(c, add_special_tokens=False)["input_ids"] for c in continuations]
        for i, ids in enumerate(conts):
            if not ids:
                raise InvalidRequestError(f"continuation {i} is empty")
            if len(prompt_ids) + len(ids) > self.limits.max_prompt_tokens:
                raise InvalidRequestError(f"prompt + continuation {i} has {len(prompt_ids) + len(ids)} tokens, "
                                          f"limit {self.limits.max_prompt_tokens}")
        work = len(conts) * (len(prompt_ids) + max(len(c) for c in conts))
        if work > self.limits.max_score_tokens:
            raise InvalidRequestError(f"{len(conts)} continuations x {work // len(conts)} tokens exceed the limit of "
                                      f"{self.limits.max_score_tokens} scored tokens per call")
        resolved = self.registry.resolve(adapter_id, version) if adapter_id else 0
        return self._call(lambda: self._score(adapter_id, resolved, prompt_ids, conts))

    def load(self, adapter_id: str, version: int) -> AdapterStatus:
        resolved = self.registry.resolve(adapter_id, version)

        def run() -> None:
            entry = self._acquire((adapter_id, resolved), wait_ok=False)
            assert entry is not None
            entry.pinned = True
            entry.refs -= 1

        self._call(run)
        return self.status(adapter_id)

    def unload(self, adapter_id: str, version: int) -> bool:
        """Unpin; free now if no request uses it (True), else it becomes evictable when they finish (False)."""
        resolved = self.registry.resolve(adapter_id, version)

        def run() -> bool:
            entry = self._loaded.get((adapter_id, resolved))
            if entry is None:
                return True
            entry.pinned = False
            if entry.refs > 0:
                return False
            self._evict((adapter_id, resolved))
            return True

        return self._call(run)

    def rollback(self, adapter_id: str, version: int) -> AdapterStatus:
        if version == 0:
            raise InvalidRequestError("rollback needs a version number")
        self.registry.rollback(adapter_id, version)
        self._notice_current(adapter_id)
        return self.status(adapter_id)

    def status(self, adapter_id: str) -> AdapterStatus:
        current = self.registry.current(adapter_id)
        meta = self.registry.meta(adapter_id, current)
        loaded = sorted(v for (a, v) in list(self._loaded) if a == adapter_id)
        return AdapterStatus(adapter_id, self.registry.versions(adapter_id), current, loaded,
                             str(meta.get("peft_type") or meta.get("method") or ""), int(meta.get("rank") or 0),
                             bool(meta.get("encrypted")))

    def adapters(self) -> list[AdapterStatus]:
        """Every readable adapter (a corrupt registry entry is logged and left out, not fatal)."""
        found = []
        for adapter_id in self.registry.adapter_ids():
            try:
                found.append(self.status(adapter_id))
            except (ServingError, ValueError, TypeError) as exc:
                log.warning("adapter %s is unreadable and not listed: %s", adapter_id, exc)
        return found

    @property
    def adapter_memory(self) -> int:
        return sum(e.num_bytes for e in list(self._loaded.values()))

    def _call(self, fn: Callable[[], T], timeout: float = 300.0) -> T:
        if self._stop.is_set():
            raise ShuttingDownError("the server is shutting down")
        if threading.current_thread() in self._threads[:1]:
            return fn()  # already on the engine thread
        future: Future = Future()
        with self._wake:
            self._control.append((fn, future))
            self._wake.notify_all()
        return future.result(timeout=timeout)

    def _encode(self, text: str) -> list[int]:
        ids = self.tokenizer(text)["input_ids"]
        if len(ids) > self.limits.max_prompt_tokens:
            raise InvalidRequestError(f"prompt has {len(ids)} tokens, limit {self.limits.max_prompt_tokens}")
        return list(ids)

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        config = getattr(self.model, "generation_config", None)
        eos = getattr(config, "eos_token_id", None)
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return ids

    # --- engine thread ---------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._run_control()
                admitted = self._admit()
                if admitted:
                    self._prefill(admitted)
                if self._running:
                    self._decode()
                elif not admitted:
                    with self._wake:  # idle, or every queued request waits for memory: sleep until woken
                        if not self._control and not self._stop.is_set():
                            self._wake.wait(timeout=0.5)
            except Exception as exc:  # noqa: BLE001 - a failed step fails the running requests, not the server
                log.exception("serving step failed")
                for job in self._running:
                    self._fail(job, exc)
                self._running, self._state = [], None

    def _run_control(self) -> None:
        while True:
            with self._wake:
                if not self._control:
                    return
                fn, future = self._control.popleft()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:  # noqa: BLE001 - delivered to the caller
                    future.set_exception(exc)

    def _admit(self) -> list[GenerationJob]:
        """Queued jobs that can start now, in arrival order; jobs waiting for memory are skipped."""
        admitted: list[GenerationJob] = []
        with self._wake:
            candidates = list(self._pending)
        for job in candidates:
            if len(self._running) + len(admitted) >= self.limits.max_batch:
                break
            if job.cancelled.is_set():
                self._dequeue(job)
                job.events.put(TokenEvent([], "", done=True, finish_reason="cancelled"))
                continue
            try:
                entry = self._acquire(job.key, wait_ok=True) if job.key else None
            except Exception as exc:  # noqa: BLE001 - e.g. a corrupt adapter: only this request fails
                self._dequeue(job)
                job.events.put(_as_serving_error(exc))
                continue
            if job.key and entry is None:
                continue  # waits until running requests release memory; later jobs may go ahead
            self._dequeue(job)
            job.slot, job.holds_ref = (entry.slot, True) if entry else (BASE_SLOT, False)
            admitted.append(job)
        return admitted

    def _dequeue(self, job: GenerationJob) -> None:
        with self._wake:
            self._pending.remove(job)

    def _prefill(self, jobs: list[GenerationJob]) -> None:
        try:
            with self.lora.rows(tuple(j.slot for j in jobs)):
                state, logits = prefill(self.model, [j.prompt_ids for j in jobs], self.pad_id)
            joined = join(self._state, state)
        except Exception as exc:  # noqa: BLE001 - the new requests fail; the running batch is untouched
            log.exception("prefill failed")
            for job in jobs:
                self._fail(job, exc)
            return
        if self._running:
            self.joins_while_running += 1
        self._state = joined
        self._running += jobs
        self.max_adapters_in_batch = max(self.max_adapters_in_batch, len({j.slot for j in self._running}))
        self._emit(jobs, logits, offset=len(self._running) - len(jobs))

    def _decode(self) -> None:
        assert self._state is not None
        tokens = torch.tensor([j.generated[-1] for j in self._running], dtype=torch.long)
        with self.lora.rows(tuple(j.slot for j in self._running)):
            logits = decode_step(self.model, self._state, tokens)
        self.steps += 1
        self._emit(self._running, logits, offset=0)

    def _emit(self, jobs: list[GenerationJob], logits: torch.Tensor, offset: int) -> None:
        """Pick each job's next token, send it, and drop finished (or failed) rows from the batch."""
        finished = []
        for i, job in enumerate(jobs):
            try:
                token = choose_token(logits[i], job.params.sampling, job.generator)
                job.generated.append(token)
                reason = ""
                if token in self.eos_ids and not job.params.ignore_eos:
                    reason = "eos"
                elif len(job.generated) >= job.max_new_tokens:
                    reason = "length"
                elif job.cancelled.is_set():
                    reason = "cancelled"
                text = self.tokenizer.decode(job.generated, skip_special_tokens=True)
                delta = ""
                if reason or not text.endswith("\ufffd"):  # hold back a half-decoded character
                    delta, job.emitted_text = text[len(job.emitted_text):], text
                if reason:
                    job.finished_at = time.perf_counter()
                    self._release(job)
                job.events.put(TokenEvent([token], delta, done=bool(reason), finish_reason=reason))
            except Exception as exc:  # noqa: BLE001 - this row fails, the others go on
                self._fail(job, exc)
                reason = "error"
            if reason:
                finished.append(offset + i)
        if finished:
            done = set(finished)
            keep_rows = [i for i in range(len(self._running)) if i not in done]
            self._running = [self._running[i] for i in keep_rows]
            self._state = keep(self._state, keep_rows) if self._state is not None else None

    def _fail(self, job: GenerationJob, exc: BaseException) -> None:
        self._release(job)
        job.events.put(_as_serving_error(exc))

    def _release(self, job: GenerationJob) -> None:
        if job.holds_ref and job.key in self._loaded:
            self._loaded[job.key].refs -= 1  # type: ignore[index]
        job.holds_ref = False

    @torch.no_grad()
    def _score(self, adapter_id: str, version: int, prompt_ids: list[int], conts: list[list[int]]) -> ScoreResult:
        entry = self._acquire((adapter_id, version), wait_ok=False) if adapter_id else None
        try:
            # Left-padded so every continuation ends at the last column: only the last
            # max(len)+1 positions' logits are computed (not [n, width, vocab]).
            rows = [prompt_ids + c for c in conts]
            width = max(len(r) for r in rows)
            keep_n = max(len(c) for c in conts) + 1
            device = next(self.model.parameters()).device
            ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, r in enumerate(rows):
                ids[i, width - len(r):] = torch.tensor(r)
                mask[i, width - len(r):] = 1
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            slot = entry.slot if entry else BASE_SLOT
            with self.lora.rows((slot,) * len(rows)):
                logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                                    position_ids=positions.to(device), logits_to_keep=keep_n).logits
            totals = []
            for i, c in enumerate(conts):
                # the logits predicting the continuation: columns width-len(c)-1 .. width-2
                picked = logits[i, keep_n - len(c) - 1:keep_n - 1].float().log_softmax(-1)
                targets = torch.tensor(c, device=picked.device).view(-1, 1)
                totals.append(float(picked.gather(-1, targets).sum()))
            return ScoreResult(totals, [len(c) for c in conts], version)
        finally:
            if entry is not None:
                entry.refs -= 1

    def _acquire(self, key: tuple[str, int], wait_ok: bool) -> _Loaded | None:
        """Load `key` if needed (evicting idle LRU versions) and take a reference to it.

        Returns None (wait_ok) when the adapter fits only after running requests release
        theirs; raises OverloadedError when it cannot fit at all.
        """
        entry = self._loaded.get(key)
        if entry is None:
            known = self._sizes.get(key)
            if known is not None and not self._room_for(key, known, wait_ok):
                return None
            stored = self.registry.read(*key)
            produced_for = stored.meta.get("base_model_fingerprint")
            if self.base_fingerprint and produced_for and produced_for != self.base_fingerprint:
                raise AdapterIncompatibleError(f"adapter {key[0]!r} version {key[1]} was trained on base model "
                                               f"{produced_for}, this server serves {self.base_fingerprint}")
            need = self._sizes[key] = self.lora.bytes_needed(stored.tensors)
            if not self._room_for(key, need, wait_ok):
                return None
            idle = [k for k, e in self._loaded.items() if e.refs == 0 and not e.pinned]
            while self.adapter_memory + need > self.limits.adapter_memory_bytes and idle:
                self._evict(idle.pop(0))
            slot = next(self._slot_ids)
            size = self.lora.add(slot, stored.config, stored.tensors)
            entry = _Loaded(slot, size)
            self._loaded[key] = entry
            log.info("loaded adapter %s version %d into slot %d (%.1f MB)", key[0], key[1], slot, size / 1e6)
        self._loaded.move_to_end(key)
        entry.refs += 1
        return entry

    def _room_for(self, key: tuple[str, int], need: int, wait_ok: bool) -> bool:
        cap = self.limits.adapter_memory_bytes
        who = f"adapter {key[0]!r} version {key[1]} ({need} bytes)"
        if need > cap:
            raise OverloadedError(f"{who} is larger than the adapter memory cap of {cap} bytes")
        idle = sum(e.num_bytes for e in self._loaded.values() if e.refs == 0 and not e.pinned)
        if self.adapter_memory - idle + need <= cap:
            return True
        pinned = sum(e.num_bytes for e in self._loaded.values() if e.pinned)
        if pinned + need > cap or not wait_ok:
            raise OverloadedError(f"no room for {who}: pinned adapters hold {pinned} and adapters in use "
                                  f"{self.adapter_memory - idle - pinned} of the {cap}-byte cap (UnloadAdapter frees pins)")
        return False

    def _evict(self, key: tuple[str, int]) -> None:
        entry = self._loaded.pop(key)
        self.lora.remove(entry.slot)
        log.info("evicted adapter %s version %d (slot %d)", key[0], key[1], entry.slot)

    # --- registry watcher ------------------------------------------------------------

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            for adapter_id in {a for (a, _) in list(self._loaded)} | set(self._current_seen):
                try:
                    self._notice_current(adapter_id)
                except Exception:  # noqa: BLE001 - a broken entry must not stop the watcher
                    log.exception("registry watch failed for %s", adapter_id)

    def _notice_current(self, adapter_id: str) -> None:
        """Preload the version CURRENT points at, if it moved (hot-load)."""
        try:
            current = self.registry.current(adapter_id)
        except ServingError:
            return
        if self._current_seen.get(adapter_id) == current:
            return
        self._current_seen[adapter_id] = current

        def preload() -> bool:
            if (adapter_id, current) in self._loaded:
                return True
            entry = self._acquire((adapter_id, current), wait_ok=True)
            if entry is not None:
                entry.refs -= 1
            return entry is not None

        try:
            if self._call(preload):
                log.info("hot-loaded adapter %s version %d", adapter_id, current)
            else:
                log.info("adapter %s version %d is current; it loads when memory frees up", adapter_id, current)
        except ServingError as exc:
            log.warning("could not preload adapter %s version %d: %s", adapter_id, current, exc)


def _as_serving_error(exc: BaseException) -> ServingError:
    return exc if isinstance(exc, ServingError) else ServingError(f"request failed: {type(exc).__name__}: {exc}")


def choose_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """Greedy for temperature 0, else temperature / top-k / top-p sampling with the request's generator."""
    if sampling.temperature == 0:
        return int(torch.argmax(logits))
    scores = logits.double() / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(scores, sampling.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if sampling.top_p and sampling.top_p < 1.0:
        ordered, order = torch.sort(probs, descending=True)
        keep_mask = ordered.cumsum(-1) - ordered < sampling.top_p
        probs = torch.zeros_like(probs).scatter(0, order, ordered * keep_mask)
    if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
        return int(torch.argmax(logits))  # degenerate distribution: fall back to greedy
    return int(torch.multinomial(probs.float().cpu(), 1, generator=generator))


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll `predicate` until true or `timeout` seconds pass (tests and CLI readiness)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
