"""The synchronous engine: ``add_request``, ``step() -> list[RequestOutput]``, ``abort``.

One thread drives it (the async front's step thread, or a test). Each step: take in
finished adapter loads, start the loads waiting requests need, schedule, write newly
assigned LoRA slots, run the model, sample, and turn tokens into outputs.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from engine.api import AdapterRef, Request, RequestOutput
from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.detokenizer import IncrementalDetokenizer, StopChecker, TokenPieces, fast_decoder
from engine.errors import (
    AdapterLoadError,
    EngineError,
    EngineOverloaded,
    InvalidRequest,
)
from engine.lora.loader import AdapterLoader
from engine.lora.slots import SlotTable
from engine.request_state import Choice, RequestState, check_fits, make_logprob, tokenize_prompt
from engine.runner import Runner, build_runner
from engine.sampler import Sampler, SampleRow
from engine.scheduler import Scheduler, SchedulerOutput
from engine.sequence import SeqStatus, Sequence
from engine.stats import EngineStats, StepCounters


class LLMEngine:
    def __init__(self, runner: Runner, config: EngineConfig) -> None:
        config.validate()
        self.runner = runner
        self.config = config
        self.tokenizer = runner.tokenizer
        self._decoder = fast_decoder(runner.tokenizer)
        self._pieces = TokenPieces(self._decoder)  # each token's text, decoded once
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
        self._pending: list[RequestOutput] = []  # aborts and failures, out with the next step
        self._next_seq_id = 0
        self._next_arrival = 0
        self._counters = StepCounters()
        self.last_step_ran = False  # False: nothing could run (idle, or waiting on loads)

    @classmethod
    def from_model(cls, model: str | Path | None, config: EngineConfig) -> LLMEngine:
        """``model``: an HF directory, a ``.gguf`` file, ``dummy:<preset>`` (see the runner)."""
        return cls(build_runner(model, config), config)

    # -- requests ----------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a request, or raise a typed error that concerns it alone."""
        p = request.sampling
        p.validate()
        if request.request_id in self._requests:
            raise InvalidRequest(
                f"request id {request.request_id!r} is already in use", param="request_id"
            )
        if len(self.scheduler.waiting) >= self.config.max_waiting:
            raise EngineOverloaded("too many queued requests")
        prompt_ids = tokenize_prompt(self.tokenizer, request.prompt, self.runner.vocab_size)
        check_fits(
            len(prompt_ids),
            p.max_tokens,
            self.max_model_len,
            self.blocks.num_blocks * self.blocks.block_size,
        )
        state = RequestState(request, prompt_ids, [], self._eos)
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
            )
            self._next_seq_id += 1
            choice = Choice(
                seq,
                IncrementalDetokenizer(self._decoder, prompt_ids, pieces=self._pieces),
                StopChecker(p.stop),
            )
            state.choices.append(choice)
            self._owner[seq.seq_id] = (state, choice)
        self._requests[request.request_id] = state
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

    def abort_all(self) -> list[RequestOutput]:
        """Abort everything in flight; return the final outputs at once (shutdown)."""
        for request_id in list(self._requests):
            self.abort(request_id)
        outputs, self._pending = self._pending, []
        return outputs

    def has_unfinished(self) -> bool:
        return bool(self._requests) or bool(self._pending)

    def num_requests(self) -> int:
        return len(self._requests)

    def _retire(self, state: RequestState) -> None:
        """Free every sequence of a finished request and queue its last output."""
        for c in state.choices:
            if c.seq.status is not SeqStatus.FINISHED:
                self.scheduler.finish(c.seq)
            self._owner.pop(c.seq.seq_id, None)
        self._requests.pop(state.request.request_id, None)
        out = state.take_output()
        if out is not None:
            self._pending.append(out)
        key = state.adapter_key
        if key is not None:
            self._adapter_users[key] -= 1
            if self._adapter_users[key] == 0:
                del self._adapter_users[key], self._adapter_refs[key]

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

    def step(self) -> list[RequestOutput]:
        for key, err in self.loader.collect():
            self._fail_adapter(key, err)
        for seq in self.scheduler.waiting:
            key = seq.adapter_key
            if key is not None and self.slots.lookup(key) is None and not self.loader.is_ready(key):
                self.loader.start(self._adapter_refs[key])
        out = self.scheduler.schedule(self.loader.is_ready)
        self._write_slots(out)
        outputs, self._pending = self._pending, []
        self.last_step_ran = not out.is_empty
        if out.is_empty:
            return outputs
        c = self._counters
        c.steps += 1
        c.last_batch_seqs, c.last_batch_tokens = len(out.seqs), out.batch.num_tokens
        for seq, chunk in zip(out.seqs, out.batch.chunks, strict=True):
            if chunk.start_pos < seq.prompt_len:
                end = min(seq.prompt_len, chunk.start_pos + len(chunk.token_ids))
                c.prompt_tokens += end - chunk.start_pos
        logits = self.runner.execute(out.batch)
        self.scheduler.advance(out)
        self._sample(out, logits)
        touched = self._touched(out)
        for state in touched:
            if state.finished:
                self._retire(state)
        outputs += self._pending
        self._pending = []
        for state in touched:
            o = state.take_output()
            if o is not None:
                outputs.append(o)
        return outputs

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

    def _sample(self, out: SchedulerOutput, logits: torch.Tensor) -> None:
        sampled = [(s, c) for s, c in zip(out.seqs, out.batch.chunks, strict=True) if c.sample]
        if logits.shape[0] != len(sampled):
            raise RuntimeError(
                f"runner returned {logits.shape[0]} logits rows for {len(sampled)} samples"
            )
        if not sampled:
            return
        owners = [self._owner[seq.seq_id] for seq, _ in sampled]
        rows = []
        for (seq, _), (state, choice) in zip(sampled, owners, strict=True):
            row = choice.row
            if row is None:  # first sample: the row lives as long as the choice
                seed = state.params.seed
                if seed is not None:  # choice i draws from seed + i
                    choice.generator = torch.Generator(device=logits.device).manual_seed(
                        seed + seq.index
                    )
                row = choice.row = SampleRow(
                    state.params, seq.token_ids, seq.prompt_len, choice.generator
                )
            rows.append(row)
        res = self.sampler(logits, rows)
        want_logprobs = res.logprobs is not None
        max_len = self.max_model_len
        for i, ((seq, _), (state, choice)) in enumerate(zip(sampled, owners, strict=True)):
            if not state.forked and seq.index == 0:
                state.cached_tokens = seq.num_cached_tokens
                self._counters.prefix_cache_hit_tokens += seq.num_cached_tokens
                self._fork_siblings(state)
            token = res.token_ids[i]
            seq.token_ids.append(token)
            lp = None
            if want_logprobs and state.params.logprobs is not None:
                lp = make_logprob(self._pieces, token, *res.logprob_of(i))  # type: ignore[misc]
            state.on_token(choice, token, lp, max_len)
            if choice.finish_reason is not None:
                self.scheduler.finish(seq)
        self._counters.generation_tokens += len(sampled)

    def _fork_siblings(self, state: RequestState) -> None:
        state.forked = True
        parent = state.choices[0].seq
        for c in reversed(state.choices[1:]):
            self.blocks.fork(parent, c.seq)
            self.scheduler.add_front(c.seq)

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
            lora_slots=self.slots.num_slots,
            **asdict(self._counters),
        )

    def shutdown(self) -> None:
        self.loader.shutdown()
