"""The synchronous engine core: ``add_request``, ``step() -> list[EngineOutput]``, ``abort``.

One thread drives it (the step loop of ``engine.step_loop``, or a test). Each step: take in
finished adapter loads, start the loads waiting requests need, schedule, write newly
assigned LoRA slots, run the model, sample, and report each touched request's new token ids.

A failure that concerns one request (a bad value, a sampling row that cannot be made) fails
that request alone. A failed forward fails the requests of that batch; only repeated failed
forwards (a broken device) end the step loop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch

from engine.api import AdapterRef, AdapterResidency, EngineOutput, Request, TokenLogprobs
from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.errors import (
    AdapterLoadError,
    EngineError,
    EngineOverloaded,
    InvalidRequest,
    as_engine_error,
)
from engine.inflight import PLACEHOLDER, InFlight, SampledRow, gather_for
from engine.lora.loader import AdapterLoader, local_fetch
from engine.lora.slots import SlotTable
from engine.request_state import Choice, RequestState, check_fits, tokenize_prompt
from engine.runner import Runner, build_runner
from engine.sampler import DeviceSample, Sampler, SampleRow
from engine.scheduler import Scheduler, SchedulerOutput
from engine.sequence import SeqStatus, Sequence
from engine.stats import EngineStats, StepCounters

log = logging.getLogger(__name__)
MAX_FAILED_FORWARDS = 3  # consecutive failed forwards before the step loop gives up


class LLMEngine:
    def __init__(
        self,
        runner: Runner,
        config: EngineConfig,
        *,
        fetch: Callable[[AdapterRef], Path] = local_fetch,
    ) -> None:
        """``fetch``: an adapter reference -> a local PEFT directory (runs in loader
        threads). The default takes local directories only; the engine server passes the
        object-store fetcher built from its settings."""
        config.validate()
        self.runner = runner
        self.config = config
        self.tokenizer = runner.tokenizer
        self.max_model_len = min(runner.max_model_len, config.max_model_len or runner.max_model_len)
        self.blocks = BlockManager(
            runner.num_blocks, runner.block_size, config.enable_prefix_caching
        )
        self.slots = SlotTable(config.max_loras)
        self.scheduler = Scheduler(
            self.blocks,
            self.slots,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            aging_steps=config.aging_steps,
        )
        self.loader = AdapterLoader(
            runner.read_adapter,
            fetch,
            max_host_adapters=config.max_cpu_loras,
            workers=config.adapter_load_workers,
            in_use=lambda key: key in self._adapter_users,
        )
        self.sampler = Sampler(config.seed)
        self._eos = frozenset(int(t) for t in runner.eos_token_ids)
        self._requests: dict[str, RequestState] = {}
        self._owner: dict[int, tuple[RequestState, Choice]] = {}
        self._adapter_refs: dict[str, AdapterRef] = {}  # keys some request in flight uses
        self._adapter_users: dict[str, int] = {}
        self._pending: list[EngineOutput] = []  # aborts and failures, out with the next step
        self._next_seq_id = 0
        self._next_arrival = 0
        self._failed_forwards = 0
        self._inflight: InFlight | None = None  # launched, its tokens not read yet
        self._history_users = 0  # requests in flight whose sampling reads their tokens
        self._counters = StepCounters()
        self.last_step_ran = False  # False: nothing could run (idle, or waiting on loads)

    @classmethod
    def from_model(
        cls,
        model: str | Path | None,
        config: EngineConfig,
        *,
        fetch: Callable[[AdapterRef], Path] = local_fetch,
    ) -> LLMEngine:
        """``model``: an HF directory, a ``.gguf`` file, ``dummy:<preset>`` (see the runner)."""
        return cls(build_runner(model, config), config, fetch=fetch)

    @property
    def kv_tokens(self) -> int:
        return self.blocks.num_blocks * self.blocks.block_size

    # -- requests ----------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a request, or raise a typed error that concerns it alone."""
        taken = time.perf_counter()  # the engine's own time for it starts here
        p = request.sampling
        p.validate()
        if request.request_id in self._requests:
            raise InvalidRequest(
                f"request id {request.request_id!r} is already in use", param="request_id"
            )
        if len(self.scheduler.waiting) >= self.config.max_waiting:
            raise EngineOverloaded("too many queued requests")
        vocab = self.runner.vocab_size
        if any(not 0 <= t < vocab for t in p.stop_token_ids):
            raise InvalidRequest(f"stop_token_ids must be in [0, {vocab})", param="stop_token_ids")
        prompt_ids = tokenize_prompt(self.tokenizer, request.prompt, vocab)
        check_fits(len(prompt_ids), p.max_tokens, self.max_model_len, self.kv_tokens)
        state = RequestState(request, prompt_ids, [], self._eos, arrival_s=taken)
        max_total = min(len(prompt_ids) + p.max_tokens, self.max_model_len)
        arrival = self._next_arrival
        self._next_arrival += 1
        key = state.adapter_key
        for i in range(p.n):
            seq = Sequence(
                self._next_seq_id,
                request.request_id,
                i,
                arrival,
                list(prompt_ids),
                len(prompt_ids),
                key,
                max_total=max_total,
            )
            self._next_seq_id += 1
            choice = Choice(seq)
            state.choices.append(choice)
            self._owner[seq.seq_id] = (state, choice)
        self._requests[request.request_id] = state
        if state.reads_history:
            self._history_users += 1
        if request.adapter is not None:
            self._adapter_refs[request.adapter.key] = request.adapter
            self._adapter_users[request.adapter.key] = (
                self._adapter_users.get(request.adapter.key, 0) + 1
            )
            if self.slots.lookup(request.adapter.key) is not None:
                self._counters.adapter_hits += 1
            else:
                self._counters.adapter_misses += 1
                self.loader.start(request.adapter)
        self.scheduler.add(state.choices[0].seq)  # siblings fork off it after its prefill

    def abort(self, request_id: str) -> bool:
        """Stop a request; its final output (finish_reason "abort") comes with the next step."""
        state = self._requests.get(request_id)
        if state is None:
            return False
        state.finish("abort")
        self._retire(state)
        return True

    def abort_all(self) -> list[EngineOutput]:
        """Abort everything in flight; return the final outputs at once (shutdown)."""
        for request_id in list(self._requests):
            self.abort(request_id)
        self._inflight = None  # what it sampled belongs to aborted requests
        outputs, self._pending = self._pending, []
        return outputs

    def has_unfinished(self) -> bool:
        return bool(self._requests) or bool(self._pending) or self._inflight is not None

    def num_requests(self) -> int:
        return len(self._requests)

    def _retire(self, state: RequestState) -> None:
        """Free every sequence of a finished request and queue its last output."""
        for c in state.choices:
            if c.seq.status is not SeqStatus.FINISHED:
                self.scheduler.finish(c.seq)
            self._owner.pop(c.seq.seq_id, None)
        if self._requests.pop(state.request.request_id, None) is None:
            return  # retired already
        if state.reads_history:
            self._history_users -= 1
        out = state.take_output()
        if out is not None:
            self._pending.append(out)
        key = state.adapter_key
        if key is not None:
            self._adapter_users[key] -= 1
            if self._adapter_users[key] == 0:
                del self._adapter_users[key], self._adapter_refs[key]

    def _fail(self, state: RequestState, exc: BaseException) -> None:
        """This request alone failed while being served: it ends with its error."""
        err = as_engine_error(exc)
        if not isinstance(exc, EngineError):
            log.error("request %s failed", state.request.request_id, exc_info=exc)
        state.finish("error", err)
        self._retire(state)

    def _fail_adapter(self, key: str, err: Exception) -> None:
        message = f"adapter {key!r} could not be loaded: {err}"
        typed = (
            type(err)(message, param="model")
            if isinstance(err, EngineError)
            else AdapterLoadError(message, param="model")
        )
        for state in [s for s in self._requests.values() if s.adapter_key == key]:
            state.finish("error", typed)
            self._retire(state)

    # -- the step ----------------------------------------------------------------------

    def collect_loads(self) -> None:
        """Take finished adapter loads in (each step does; an idle loop calls it too)."""
        for key, err in self.loader.collect():
            self._fail_adapter(key, err)

    def step(self) -> list[EngineOutput]:
        """Schedule and launch a step; read back the step launched before (async: while
        this one runs on the device). Returns the outputs that are ready."""
        self.collect_loads()
        for seq in self.scheduler.waiting:
            key = seq.adapter_key
            if key is not None and self.slots.lookup(key) is None and not self.loader.is_ready(key):
                self.loader.start(self._adapter_refs[key])
        outputs = self._take_pending()
        if not self._async_now():
            outputs += self._finish_inflight()  # its tokens are needed on the host first
        out = self.scheduler.schedule(self.loader.is_ready)
        self._write_slots(out)
        launched = None
        if not out.is_empty:
            c = self._counters
            c.steps += 1
            c.last_batch_seqs, c.last_batch_tokens = len(out.seqs), out.batch.num_tokens
            for seq, chunk in zip(out.seqs, out.batch.chunks, strict=True):
                if chunk.start_pos < seq.prompt_len:
                    end = min(seq.prompt_len, chunk.start_pos + len(chunk.token_ids))
                    c.prompt_tokens += end - chunk.start_pos
            launched = self._launch(out)
        outputs += self._finish_inflight()  # the previous step, while this one runs
        self._inflight = launched
        if launched is not None and not self._async_now():
            outputs += self._finish_inflight()
        self.last_step_ran = launched is not None or bool(outputs)
        return outputs + self._take_pending()

    def _async_now(self) -> bool:
        """Launch the next step before reading this one's tokens, unless a request in
        flight needs its token history on the host (repetition/presence/frequency
        penalties read it when sampling)."""
        return self.config.async_scheduling and not self._history_users

    def _take_pending(self) -> list[EngineOutput]:
        pending, self._pending = self._pending, []
        return pending

    def _launch(self, out: SchedulerOutput) -> InFlight | None:
        """Run the model on ``out`` and queue the sampling; None when the forward failed
        (its requests failed with it)."""
        prev = self._inflight
        out.batch.gather = gather_for(out, prev)
        try:
            logits = self.runner.execute(
                out.batch, None if prev is None or not out.batch.gather else prev.tokens
            )
        except Exception as exc:
            self._forward_failed(out, exc)
            return None
        self._failed_forwards = 0
        self.scheduler.advance(out)
        rows: list[SampledRow] = []
        sample_rows: list[SampleRow] = []
        keep: list[int] = []
        k = 0
        for seq, chunk in zip(out.seqs, out.batch.chunks, strict=True):
            if not chunk.sample:
                continue
            k += 1
            owner = self._owner.get(seq.seq_id)
            if owner is None or owner[1].finish_reason is not None:
                continue  # failed or finished earlier in this step
            try:
                sample_rows.append(self._row(owner[0], owner[1], logits.device))
            except Exception as exc:
                self._fail(owner[0], exc)
                continue
            rows.append(SampledRow(seq, owner[0], owner[1], len(seq.token_ids)))
            keep.append(k - 1)
        if logits.shape[0] != k:
            raise RuntimeError(f"runner returned {logits.shape[0]} logits rows for {k} samples")
        if not rows:
            return InFlight([], None)
        if len(keep) != k:
            logits = logits[keep]
        sample = self._sample_rows(logits, sample_rows, rows)
        for row in rows:  # the next step reads these on the device
            row.seq.token_ids.append(PLACEHOLDER)
            row.seq.num_pending += 1
        return InFlight(rows, sample, {r.seq.seq_id: i for i, r in enumerate(rows)})

    def _sample_rows(
        self, logits: torch.Tensor, sample_rows: list[SampleRow], rows: list[SampledRow]
    ) -> DeviceSample:
        """The batch in one sampler call; if that raises, row by row (waiting for each),
        failing only the requests whose own rows raise (their token reads -1)."""
        try:
            return self.sampler.sample(logits, sample_rows)
        except Exception:
            log.exception("batch sampling failed; sampling row by row")
        tokens: list[int] = []
        for i, (row, r) in enumerate(zip(sample_rows, rows, strict=True)):
            try:
                tokens += self.sampler(logits[i : i + 1], [row]).token_ids
            except Exception as exc:
                self._fail(r.state, exc)
                tokens.append(PLACEHOLDER)
        want = [None] * len(tokens)  # (logprobs of this rare path are dropped)
        return DeviceSample(torch.tensor(tokens, device=logits.device), want)

    def _finish_inflight(self) -> list[EngineOutput]:
        """Read the step in flight's tokens (one sync) and account them."""
        f, self._inflight = self._inflight, None
        if f is None or f.sample is None:
            return []
        res = f.sample.resolve()
        max_len = self.max_model_len
        touched: dict[int, RequestState] = {}
        for i, r in enumerate(f.rows):
            seq, state, choice = r.seq, r.state, r.choice
            token = res.token_ids[i]
            seq.token_ids[r.index] = token
            seq.num_pending -= 1
            if token < 0 or choice.finish_reason is not None:
                continue  # its request failed, or it finished while this step ran
            if state.request.request_id not in self._requests:
                continue  # aborted while this step ran
            touched.setdefault(id(state), state)
            if not state.forked and seq.index == 0:
                state.cached_tokens = seq.num_cached_tokens
                self._counters.prefix_cache_hit_tokens += seq.num_cached_tokens
                self._fork_siblings(state)
            lp = None
            if res.logprobs is not None and state.params.logprobs is not None:
                got = res.logprob_of(i)
                if got is not None:
                    lp = TokenLogprobs(token, *got)
            state.on_token(choice, token, lp, r.index, max_len)
            if choice.finish_reason is not None:
                self.scheduler.finish(seq)
        self._counters.generation_tokens += len(f.rows)
        outputs = []
        for state in touched.values():
            if state.finished:
                self._retire(state)
        outputs += self._take_pending()
        for state in touched.values():
            o = state.take_output()
            if o is not None:
                outputs.append(o)
        return outputs

    def _forward_failed(self, out: SchedulerOutput, exc: Exception) -> None:
        """Fail the batch's requests; give up (re-raise) after repeated failed forwards."""
        self._failed_forwards += 1
        log.error("forward failed (%d in a row)", self._failed_forwards, exc_info=exc)
        for state in self._touched(out):
            self._fail(state, exc)
        if self._failed_forwards >= MAX_FAILED_FORWARDS:
            raise RuntimeError(f"{self._failed_forwards} forwards failed in a row") from exc

    def _touched(self, out: SchedulerOutput) -> list[RequestState]:
        """The requests with a sequence in this step, each once, in batch order."""
        seen: dict[int, RequestState] = {}
        owner = self._owner
        for seq in out.seqs:
            o = owner.get(seq.seq_id)
            if o is not None:
                seen.setdefault(id(o[0]), o[0])
        return list(seen.values())

    def _write_slots(self, out: SchedulerOutput) -> None:
        for slot, key in out.slot_writes:
            try:
                self.runner.write_slot(slot, self.loader.get(key))
            except Exception as err:
                keep = [i for i, s in enumerate(out.seqs) if s.adapter_key != key]
                out.seqs = [out.seqs[i] for i in keep]
                out.batch.chunks = [out.batch.chunks[i] for i in keep]
                self._fail_adapter(key, err)
                self.slots.release(key)

    def _row(self, state: RequestState, choice: Choice, device: torch.device) -> SampleRow:
        row = choice.row
        if row is None:  # first sample: the row lives as long as the choice
            choice.generator = state.generator_for(choice.seq.index, device)
            p = state.params
            stop_ids = tuple(sorted(state._stop_ids)) if p.min_tokens > 0 else ()
            row = choice.row = SampleRow(
                p, choice.seq.token_ids, choice.seq.prompt_len, choice.generator, stop_ids
            )
        return row

    def _fork_siblings(self, state: RequestState) -> None:
        state.forked = True
        parent = state.choices[0].seq
        for c in reversed(state.choices[1:]):
            self.blocks.fork(parent, c.seq)
            self.scheduler.add_front(c.seq)

    # -- adapters ----------------------------------------------------------------------

    def adapter_residency(self) -> AdapterResidency:
        return self.loader.residency(self.slots.resident)

    def load_adapter(self, ref: AdapterRef) -> bool:
        """Start loading ``ref`` into host memory (it takes a GPU slot with its first
        request). False when it is loaded or loading already."""
        return self.loader.start(ref)

    def unload_adapter(self, key: str) -> bool:
        """Free the adapter's GPU slot and host memory. Refused (InvalidRequest) while a
        request in flight uses it; False when it was not loaded."""
        if key in self._adapter_users:
            raise InvalidRequest(f"adapter {key!r} is in use by requests in flight", param="key")
        freed = False
        slot = self.slots.release(key)
        if slot is not None:
            self.runner.clear_slot(slot)
            freed = True
        return self.loader.drop(key) or freed

    # -- stats -------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        return EngineStats(
            num_requests=len(self._requests),
            num_waiting=len(self.scheduler.waiting),
            num_running=len(self.scheduler.running),
            kv_blocks_total=self.blocks.num_blocks,
            kv_blocks_used=self.blocks.num_used,
            preemptions=self.scheduler.num_preemptions,
            adapter_loads=self.loader.loads,
            adapter_load_failures=self.loader.failures,
            adapter_evictions=self.slots.evictions,
            adapters_loading=self.loader.num_loading,
            adapters_resident=len(self.slots.resident),
            adapters_host=self.loader.num_host,
            lora_slots=self.slots.num_slots,
            **vars(self._counters),  # (not asdict: a deep copy, 25 us of each idle turn)
        )

    def shutdown(self) -> None:
        self.loader.shutdown()
