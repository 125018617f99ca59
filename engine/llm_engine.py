"""The synchronous engine core: ``add_request``, ``step() -> list[EngineOutput]``, ``abort``.

One thread drives it (the step loop of ``engine.step_loop``, or a test). Each step: take in
finished adapter loads, start the loads waiting requests need, schedule, write newly
assigned LoRA slots, run the model, sample, and report each touched request's new token ids.

A failure that concerns one request (a bad value, a sampling row that cannot be made) fails
that request alone. A failed forward fails the requests of that batch; only repeated failed
forwards (a broken device) end the step loop.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from loraplex.engine.api import AdapterRef, AdapterResidency, EngineOutput, Request, TokenLogprobs
from loraplex.engine.block_manager import BlockManager, LocalBlocks, WindowedBlocks
from loraplex.engine.config import EngineConfig
from loraplex.engine.errors import (
    AdapterLoadError,
    EngineError,
    EngineOverloaded,
    InvalidRequest,
    RunnerFailed,
    as_engine_error,
)
from loraplex.engine.fairness import NO_KEY
from loraplex.engine.inflight import PLACEHOLDER, DevicePooled, InFlight, SampledRow, gather_for
from loraplex.engine.lora.loader import LOAD_BUCKETS_S, AdapterLoader, Fetch, TierLoads, local_fetch
from loraplex.engine.lora.slots import SlotTable
from loraplex.engine.request_state import (
    Choice,
    RequestState,
    check_embed_fits,
    check_fairness,
    check_fits,
    tokenize_prompt,
)
from loraplex.engine.runner import Runner, build_runner
from loraplex.engine.sampler import DeviceSample, Sampler, SampleRow
from loraplex.engine.scheduler import Scheduler, SchedulerOutput
from loraplex.engine.sequence import SeqStatus, Sequence
from loraplex.engine.stats import AdapterTierLoads, EngineStats, FairKeyStats, StepCounters
from loraplex.engine.structured import GrammarCache, fill_masks
from loraplex.engine.token_mask import MaskBatch, apply_token_masks

log = logging.getLogger(__name__)
MAX_FAILED_FORWARDS = 3  # consecutive failed forwards before the step loop gives up


class LLMEngine:
    def __init__(
        self,
        runner: Runner,
        config: EngineConfig,
        *,
        fetch: Fetch = local_fetch,
    ) -> None:
        """``fetch``: an adapter reference -> a local PEFT directory (runs in loader
        threads). The default takes local directories only; the engine server passes the
        object-store fetcher built from its settings."""
        config.validate()
        self.runner = runner
        self.config = config
        self.tokenizer = runner.tokenizer
        self.max_model_len = min(runner.max_model_len, config.max_model_len or runner.max_model_len)
        n, bs, prefix = runner.num_blocks, runner.block_size, config.enable_prefix_caching
        self.blocks: BlockManager
        if runner.kv_window and runner.kv_local_groups:  # local layers beside global ones
            self.blocks = WindowedBlocks(n, bs, runner.kv_window, runner.kv_local_groups, prefix)
        elif runner.kv_window:  # every layer local
            self.blocks = LocalBlocks(n, bs, runner.kv_window, prefix)
        else:
            self.blocks = BlockManager(n, bs, prefix)
        self.slots = SlotTable(runner.lora_plan)
        self.scheduler = Scheduler(
            self.blocks,
            self.slots,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            aging_steps=config.aging_steps,
            contended_prefill_tokens=config.contended_prefill_tokens,
            adapter_pages=lambda key: runner.adapter_pages(self.loader.get(key)),
        )
        self.loader = AdapterLoader(
            runner.read_adapter,
            fetch,
            max_host_bytes=config.resolved_host_lora_bytes(),
            max_host_adapters=config.max_cpu_loras,
            workers=config.adapter_load_workers,
            in_use=lambda key: key in self._adapter_users,
            init_worker=loader_threads(config.adapter_load_workers),
        )
        self.sampler = Sampler(config.seed)
        self._eos = frozenset(int(t) for t in runner.eos_token_ids)
        self.grammars = GrammarCache(self.tokenizer, runner.vocab_size, self._eos)
        self._grammar_wait: list[RequestState] = []  # their grammar is being compiled
        self._requests: dict[str, RequestState] = {}
        self._owner: dict[int, tuple[RequestState, Choice]] = {}
        self._adapter_refs: dict[str, AdapterRef] = {}  # keys some request in flight uses
        self._adapter_users: dict[str, int] = {}
        self._pending: list[EngineOutput] = []  # aborts and failures, out with the next step
        self._next_seq_id = 0
        self._next_arrival = 0
        self._thinking_rows = False  # the last sampled step had rows in a think block
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
        fetch: Fetch = local_fetch,
    ) -> LLMEngine:
        """``model``: an HF directory, a ``.gguf`` file, ``dummy:<preset>`` (see the runner)."""
        return cls(build_runner(model, config), config, fetch=fetch)

    @property
    def kv_tokens(self) -> int:
        return self.blocks.capacity_tokens(self.config.max_num_batched_tokens)

    # -- requests ----------------------------------------------------------------------

    def add_request(self, request: Request, received: float | None = None) -> None:
        """Queue a request, or raise a typed error that concerns it alone. ``received``:
        the ``time.perf_counter()`` at which the engine got it (the step loop's command
        queue), when that was before this call; its time in the engine starts there."""
        taken = time.perf_counter() if received is None else received
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
        if any(not 0 <= t < vocab for t, _ in p.logit_bias):
            raise InvalidRequest(
                f"logit_bias token ids must be in [0, {vocab})", param="logit_bias"
            )
        prompt_ids = tokenize_prompt(self.tokenizer, request.prompt, vocab)
        embed = request.task == "embed"
        if embed:
            check_embed_fits(len(prompt_ids), p.n, self.max_model_len, self.kv_tokens)
            # one past the prompt: the scheduler prefills it all; it ends with its last chunk
            max_total = len(prompt_ids) + 1
        else:
            check_fits(len(prompt_ids), p.max_tokens, self.max_model_len, self.kv_tokens)
            max_total = min(len(prompt_ids) + p.max_tokens, self.max_model_len)
        if p.grammar is not None and (p.ignore_eos or p.min_tokens):
            raise InvalidRequest(
                "response_format cannot be combined with ignore_eos or min_tokens "
                "(the grammar decides where the output ends)",
                param="response_format",
            )
        check_fairness(request)
        state = RequestState(request, prompt_ids, [], self._eos, arrival_s=taken)
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
                embed=embed,
                fair_key=request.fairness_key or NO_KEY,
                fair_weight=request.fairness_weight,
                priority_tier=request.priority,
                queued_at=taken,
                # its siblings fork off its prompt's blocks: it keeps them all until they
                # have, where it could run alone so (else they recompute the prompt)
                hold_local=i == 0 and p.n > 1 and self.blocks.fits_held(max_total),
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
                self.loader.start(request.adapter, request.fairness_key or NO_KEY)
        if p.grammar is not None:  # scheduled once its grammar is compiled
            state.grammar = self.grammars.get(p.grammar)
            self._grammar_wait.append(state)
        else:
            self.scheduler.add(state.choices[0].seq)  # siblings fork off it after its prefill

    def _admit_grammars(self) -> None:
        """Requests whose grammar is compiled go to the scheduler (each choice with its own
        matcher); a grammar that failed to compile fails its request."""
        waiting, self._grammar_wait = self._grammar_wait, []
        for state in waiting:
            if self._requests.get(state.request.request_id) is not state:
                continue  # aborted meanwhile
            fut = state.grammar
            if fut is None or not fut.done():
                self._grammar_wait.append(state)
                continue
            state.grammar = None
            try:
                template = fut.result()
            except Exception as exc:
                self._fail(state, exc)
                continue
            grammar = state.request.sampling.grammar
            for c in state.choices:
                c.matcher = template.deep_copy()
                c.matcher_grammar = grammar
                if grammar is not None and grammar.think_start >= 0 and grammar.think_end >= 0:
                    c.may_think = grammar.think_start
            self.scheduler.add(state.choices[0].seq)

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
        if self._grammar_wait:
            self._admit_grammars()
        for seq in self.scheduler.waiting:
            key = seq.adapter_key
            if key is not None and self.slots.lookup(key) is None and not self.loader.is_ready(key):
                self.loader.start(self._adapter_refs[key], seq.fair_key)
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
            used = {chunk.adapter_slot for chunk in out.batch.chunks}  # the bytes floor
            used.discard(-1)
            c.lora_step_adapters += len(used)
            c.lora_step_bytes += self.slots.nbytes(used)
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
            result = self.runner.run(
                out.batch, None if prev is None or not out.batch.gather else prev.tokens
            )
        except Exception as exc:
            self._forward_failed(out, exc)
            return None
        self._failed_forwards = 0
        self.scheduler.advance(out)
        logits = result.logits
        pooled = None if result.pooled is None else self._pooled(out, result.pooled)
        if prev is not None and prev.constrained:
            # a constrained row's mask needs its previous token: read the step in flight
            # now (its sampling ran before this forward, which the GPU runs meanwhile)
            early = self._finish_inflight()  # (it takes the pending outputs too)
            self._pending += early
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
            return InFlight([], None, pooled=pooled)
        if len(keep) != k:
            logits = logits[keep]
        masks = self._masks(rows, logits.device)
        sample = self._sample_rows(logits, sample_rows, rows, masks)
        for row in rows:  # the next step reads these on the device
            row.seq.token_ids.append(PLACEHOLDER)
            row.seq.num_pending += 1
        row_of = {r.seq.seq_id: i for i, r in enumerate(rows)}
        # a row with a grammar (also one in a think block: the grammar may start with the
        # next token) needs this step's token before the next mask
        constrained = masks is not None or self._thinking_rows
        return InFlight(rows, sample, row_of, pooled, constrained=constrained)

    def _pooled(self, out: SchedulerOutput, pooled: torch.Tensor) -> DevicePooled | None:
        """The embedding requests whose last chunk ran: their blocks and slot pins are
        freed now (later steps' writes are ordered after this one's reads on the device);
        the requests end when their vectors reach the host (``_finish_inflight``)."""
        keep: list[int] = []
        states: list[RequestState] = []
        k = 0
        for seq, chunk in zip(out.seqs, out.batch.chunks, strict=True):
            if not chunk.pool:
                continue
            k += 1
            owner = self._owner.get(seq.seq_id)
            if owner is None or owner[1].finish_reason is not None:
                continue  # failed or aborted earlier in this step
            owner[0].cached_tokens = seq.num_cached_tokens
            self._counters.prefix_cache_hit_tokens += seq.num_cached_tokens
            self.scheduler.finish(seq)
            keep.append(k - 1)
            states.append(owner[0])
        if pooled.shape[0] != k:
            raise RuntimeError(f"runner returned {pooled.shape[0]} pooled rows for {k} chunks")
        if not states:
            return None
        return DevicePooled(pooled if len(keep) == k else pooled[keep], states)

    def _masks(self, rows: list[SampledRow], device: torch.device) -> MaskBatch | None:
        """The token masks of the constrained rows (structured outputs); None when none."""
        matchers, extra = [], []
        self._thinking_rows = False
        for i, r in enumerate(rows):
            c = r.choice
            if c.matcher is None:
                continue
            if c.thinking_until >= 0:  # a think block is free text
                self._thinking_rows = True
                continue
            if c.may_think >= 0:  # its first token may open a think block
                extra.append((len(matchers), c.may_think))
            matchers.append((i, c.matcher))
        if not matchers:
            return None
        t0 = time.perf_counter()
        masks = fill_masks(self.grammars, matchers, device, extra)
        c = self._counters
        c.grammar_mask_ms += (time.perf_counter() - t0) * 1000
        c.grammar_mask_steps += 1
        c.grammar_mask_rows += len(matchers)
        return masks

    def _sample_rows(
        self,
        logits: torch.Tensor,
        sample_rows: list[SampleRow],
        rows: list[SampledRow],
        masks: MaskBatch | None,
    ) -> DeviceSample:
        """The batch in one sampler call; if that raises, row by row (waiting for each),
        failing only the requests whose own rows raise (their token reads -1)."""
        try:
            return self.sampler.sample(logits, sample_rows, masks)
        except Exception:
            log.exception("batch sampling failed; sampling row by row")
        if masks is not None:
            logits = apply_token_masks(logits, masks)
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
        if f is None:
            return []
        outputs = [] if f.pooled is None else self._finish_pooled(f.pooled)
        if f.sample is None:
            return outputs
        res = f.sample.resolve()
        now = time.perf_counter()  # the step's tokens are on the host
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
                steps = self.scheduler.steps - seq.queued_step  # as the queue steps
                self.scheduler.fair.first_token(seq.fair_key, now - state.arrival_s, steps)
            lp = None
            if res.logprobs is not None and state.params.logprobs is not None:
                got = res.logprob_of(i)
                if got is not None:
                    lp = TokenLogprobs(token, *got)
            state.on_token(choice, token, lp, r.index, max_len)
            if choice.finish_reason is not None:
                self.scheduler.finish(seq)
        self._counters.generation_tokens += len(f.rows)
        for state in touched.values():
            if state.finished:
                self._retire(state)
        outputs += self._take_pending()
        for state in touched.values():
            o = state.take_output()
            if o is not None:
                outputs.append(o)
        return outputs

    def _finish_pooled(self, pooled: DevicePooled) -> list[EngineOutput]:
        """End the embedding requests of a step: each one output, with its vector."""
        for state, vector in zip(pooled.states, pooled.resolve(), strict=True):
            if state.request.request_id not in self._requests:
                continue  # aborted while this step ran
            state.embedding = vector
            state.finish("stop")
            self._retire(state)
        return self._take_pending()

    def _forward_failed(self, out: SchedulerOutput, exc: Exception) -> None:
        """Fail the batch's requests; give up (re-raise) after repeated failed forwards."""
        self._failed_forwards += 1
        log.error("forward failed (%d in a row)", self._failed_forwards, exc_info=exc)
        for state in self._touched(out):
            self._fail(state, exc)
        if isinstance(exc, RunnerFailed):
            raise exc  # the runner cannot step again: the step loop ends the engine
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
        c = self._counters
        for slot, key in out.slot_writes:
            try:
                t0 = time.perf_counter()
                weights = self.loader.get(key)
                self.runner.write_slot(slot, weights, self.slots.pages_of(slot))
                c.adapter_gpu_write_seconds += time.perf_counter() - t0
                c.adapter_gpu_writes += 1
                nbytes = getattr(weights, "nbytes", None)
                c.adapter_gpu_write_bytes += int(nbytes()) if callable(nbytes) else 0
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
        parent.hold_local = False  # (its blocks behind the window go back with its next step)

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
            adapters_host_bytes=self.loader.host_bytes,
            adapters_host_capacity_bytes=self.loader.max_host_bytes or 0,
            adapter_host_evictions=self.loader.stats.host_evictions,
            fairness={
                k: FairKeyStats(
                    prefill_tokens=f.prefill_tokens,
                    decode_tokens=f.decode_tokens,
                    queue_seconds=f.queue_seconds,
                    queue_steps=f.queue_steps,
                    scheduled=f.queued,
                    preemptions=f.preemptions,
                    first_token_seconds=f.first_token_seconds,
                    first_token_steps=f.first_token_steps,
                    first_tokens=f.first_tokens,
                )
                for k, f in self.scheduler.fair.stats.items()
            },
            adapter_loads_by_tier={
                tier: tier_loads(t) for tier, t in self.loader.stats.by_tier.items()
            },
            lora_slots=self.slots.num_slots,
            gpu_adapters=self.slots.resident,
            running_adapters=_adapter_keys(self.scheduler.running),
            waiting_adapters=_adapter_keys(self.scheduler.waiting),
            grammar_compiles=self.grammars.compiles,
            grammar_cache_hits=self.grammars.hits,
            grammars_compiling=len(self._grammar_wait),
            **vars(self._counters),  # (not asdict: a deep copy, 25 us of each idle turn)
        )

    def check_runner(self) -> None:
        """Raise :class:`RunnerFailed` when a part of the runner is gone (idle turns of the
        step loop ask, so that a dead tensor-parallel rank ends an idle engine too)."""
        self.runner.check_alive()

    def shutdown(self) -> None:
        self.loader.shutdown()
        self.grammars.shutdown()
        self.runner.close()


def _adapter_keys(seqs: Iterable[Sequence]) -> list[str]:
    return sorted({s.adapter_key for s in seqs if s.adapter_key is not None})


def tier_loads(t: TierLoads) -> AdapterTierLoads:
    return AdapterTierLoads(
        count=t.count,
        seconds=t.seconds,
        queue_seconds=t.queue_seconds,
        fetch_seconds=t.fetch_seconds,
        read_seconds=t.read_seconds,
        bytes=t.bytes,
        buckets=list(zip(LOAD_BUCKETS_S, itertools.accumulate(t.buckets), strict=True)),
    )


def loader_threads(workers: int) -> Callable[[], None]:
    """Each loader thread gets its share of the intra-op threads (torch's thread count is
    per calling thread): W loads at once use the cores once, not W times."""
    share = max(1, torch.get_num_threads() // workers)
    return lambda: torch.set_num_threads(share)
