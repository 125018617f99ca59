"""Tensor parallelism: this process is rank 0 and drives one worker process per other rank.

The scheduler, the sampler and the adapter loader stay in the engine process; each rank holds
a :class:`ModelRunner` over its slices (``engine/model/sharding.py``). Every step the driver
sends each worker the step's :class:`ScheduledBatch` (ints only, one pickled message down a
pipe), then runs its own shard; the ranks meet in the forward's collectives
(``engine/parallel.py``): all-reduces after the row-parallel projections, the vocab-parallel
embedding, and the logits gathered on rank 0, which samples once. Tokens the batch reads from
the previous step's samples (async scheduling) are broadcast from rank 0 on the device first.
Adapter writes are sliced here and fanned out, each rank its slice, down the same pipes (so
they stay ordered with the steps; the tensors travel by shared memory); slot tables are the
driver's and the same on every rank.

A rank that dies ends the engine: gloo's collectives fail at once when a peer goes, a watcher
thread sees a worker process exit and makes the next step (or idle check) raise
:class:`RunnerFailed`, and if the step thread stays blocked (an NCCL collective does not
fail), it ends this process after a grace period so that its supervisor restarts it.
Workers exit when the engine process goes (their pipe closes, or their parent changes).
"""

from __future__ import annotations

import logging
import os
import pickle
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from loraplex.engine.batch import ScheduledBatch
from loraplex.engine.config import EngineConfig
from loraplex.engine.errors import RunnerFailed
from loraplex.engine.lora.slots import PageNeed
from loraplex.engine.lora.weights import LoraWeights
from loraplex.engine.model.loader import model_config
from loraplex.engine.model.sharding import Shard, check_tensor_parallel, shard_lora
from loraplex.engine.model_runner import ModelRunner
from loraplex.engine.parallel import TPGroup, free_port, no_multicast_env
from loraplex.engine.runner import StepTensors, runner_options
from loraplex.engine.tp_worker import worker_main

log = logging.getLogger(__name__)

HANG_GRACE_S = 10.0  # after a rank died: how long the step thread has to notice
_POLL_S = 0.5


def _exit_process() -> None:
    log.critical("a tensor-parallel rank died and the engine is blocked; exiting")
    os._exit(70)


def _rank_device(device: torch.device, rank: int) -> torch.device:
    if device.type != "cuda":
        return device
    return torch.device("cuda", (device.index or 0) + rank)


class TPRunner:
    """A :class:`~loraplex.engine.runner.Runner` over ``config.tensor_parallel_size`` ranks.

    ``on_hang``: called from the watcher thread when a rank died and the step thread did not
    end the engine within :data:`HANG_GRACE_S` (default: exit this process)."""

    def __init__(
        self,
        model: str | Path | None,
        config: EngineConfig,
        *,
        on_hang: Callable[[], None] = _exit_process,
    ) -> None:
        size = config.tensor_parallel_size
        full = model_config(model)
        if full is not None:  # before any process starts (GGUF: rank 0's load checks)
            check_tensor_parallel(full, size)
        no_multicast_env()  # this process's NCCL, and inherited by the workers
        opts = runner_options(config)
        device: torch.device = opts.pop("device")
        if device.type == "cuda" and torch.cuda.device_count() < (device.index or 0) + size:
            raise RuntimeError(
                f"tensor_parallel_size {size} needs {size} GPUs, "
                f"{torch.cuda.device_count()} visible"
            )
        self._on_hang = on_hang
        self._failure: str | None = None
        self._closing = threading.Event()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        port = free_port()
        timeout_s = config.tensor_parallel_timeout_s
        # a fork server with torch and the runner imported: each worker starts in a
        # fraction of a second (no CUDA is initialized in it, so forking from it is safe)
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload([worker_main.__module__])
        self._procs: list[Any] = []
        self._conns: list[Connection] = []
        for rank in range(1, size):
            ours, theirs = ctx.Pipe()
            p = ctx.Process(
                target=worker_main,
                args=(rank, size, port, model, opts, _rank_device(device, rank), timeout_s, theirs),
                name=f"loraplex-tp{rank}",
                daemon=True,
            )
            p.start()
            theirs.close()
            self._procs.append(p)
            self._conns.append(ours)
        # the start-up counts as a step: a rank that dies while this thread is blocked in
        # one of its collectives (NCCL) ends the process after the grace period
        self._step_since: float | None = time.monotonic()
        self._watcher = threading.Thread(target=self._watch, name="tp-watch", daemon=True)
        self._watcher.start()
        try:
            self.tp = TPGroup(Shard(0, size), device, port=port, timeout_s=timeout_s)
            self.local = ModelRunner(model, device=device, tp=self.tp, **opts)
            self._await_ready(timeout_s)
        except BaseException as exc:
            self._closing.set()
            why = self._worker_errors()
            self._stop_workers()
            self._closed.set()
            if why and isinstance(exc, RuntimeError) and not isinstance(exc, RunnerFailed):
                # rank 0 saw a failed collective: the worker that failed says why
                raise RunnerFailed(f"tensor-parallel startup failed: {why}") from exc
            raise
        self._step_since = None
        r = self.local
        self.config = r.config
        self.device, self.dtype = r.device, r.dtype
        self.num_blocks, self.block_size = r.num_blocks, r.block_size
        self.kv_window, self.kv_local_groups = r.kv_window, r.kv_local_groups
        self.max_model_len, self.vocab_size = r.max_model_len, r.vocab_size
        self.eos_token_ids, self.tokenizer = r.eos_token_ids, r.tokenizer
        self.lora_plan = r.lora_plan
        self.size = size
        log.info("tensor parallel: %d ranks, %d KV blocks each", size, self.num_blocks)

    # ---- startup -----------------------------------------------------------------------

    def _await_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        waiting = dict(enumerate(self._conns, start=1))
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RunnerFailed(f"tensor-parallel ranks {sorted(waiting)} did not start")
            for conn in wait(list(waiting.values()), timeout=left):
                rank = next(r for r, c in waiting.items() if c is conn)
                try:
                    msg = conn.recv()
                except EOFError:
                    raise RunnerFailed(f"tensor-parallel rank {rank} exited at startup") from None
                if msg[0] != "ready":
                    raise RunnerFailed(f"tensor-parallel rank {rank}: {msg[1]}")
                del waiting[rank]

    def _worker_errors(self) -> str:
        """What the workers that failed to start said (they send one line before exiting)."""
        out = []
        for rank, conn in enumerate(self._conns, start=1):
            try:
                while conn.poll(0.2):
                    msg = conn.recv()
                    if msg[0] == "error":
                        out.append(f"rank {rank}: {msg[1]}")
            except (EOFError, OSError):
                continue
        return "; ".join(out)

    # ---- the Runner protocol --------------------------------------------------------------

    def execute(
        self, batch: ScheduledBatch, prev_tokens: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.run(batch, prev_tokens).logits

    def run(self, batch: ScheduledBatch, prev_tokens: torch.Tensor | None = None) -> StepTensors:
        self.check_alive()
        prev = prev_tokens if batch.gather and prev_tokens is not None else None
        head = None if prev is None else (prev.shape[0], prev.dtype)
        self._step_since = time.monotonic()
        try:
            self._send(pickle.dumps(("run", batch, head), protocol=pickle.HIGHEST_PROTOCOL))
            if prev is not None:
                prev = self.tp.broadcast(prev.contiguous())
            return self.local.run(batch, prev)
        except Exception as exc:  # a failed collective leaves the ranks out of step
            raise self._fatal(exc) from exc
        finally:
            self._step_since = None

    def read_adapter(self, path: Path) -> LoraWeights:
        return self.local.read_adapter(path)

    def adapter_pages(self, weights: LoraWeights) -> PageNeed:
        return self.local.adapter_pages(weights)

    def write_slot(
        self, slot: int, weights: LoraWeights, pages: dict[str, list[int]] | None = None
    ) -> None:
        self.check_alive()
        parts = shard_lora(weights, self.size)
        try:
            for conn, part in zip(self._conns, parts[1:], strict=True):
                # torch's pickler: the tensors go by shared memory (a file descriptor each,
                # the replicated ones moved there once), not through the pipe
                conn.send(("write", slot, part, pages))
            self.local.write_slot(slot, parts[0], pages)
        except OSError as exc:
            raise self._fatal(exc) from exc

    def clear_slot(self, slot: int) -> None:
        self.check_alive()
        try:
            self._send(pickle.dumps(("clear", slot)))
        except OSError as exc:
            raise self._fatal(exc) from exc
        self.local.clear_slot(slot)

    def check_alive(self) -> None:
        if self._failure is not None:
            raise RunnerFailed(self._failure)

    def close(self) -> None:
        """Stop the workers (a stop message, then a kill for any that linger)."""
        if self._closing.is_set():
            return
        self._closing.set()
        self._stop_workers()
        self.tp.close()
        self._closed.set()

    # ---- internals -----------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        for conn in self._conns:
            conn.send_bytes(data)

    def _fatal(self, exc: BaseException) -> RunnerFailed:
        if self._failure is None:
            # a rank's exit explains a failed collective better than the collective does
            deadline = time.monotonic() + 1.0
            while self._failure is None and time.monotonic() < deadline:
                for rank, p in enumerate(self._procs, start=1):
                    if not p.is_alive():
                        self._failure = _exited(rank, p)
                        break
                else:
                    time.sleep(0.05)
        if self._failure is None:
            self._failure = f"a tensor-parallel step failed: {type(exc).__name__}: {exc}"
        return RunnerFailed(self._failure)

    def _stop_workers(self) -> None:
        for conn in self._conns:
            try:
                conn.send_bytes(pickle.dumps(("stop",)))
            except OSError:
                pass
        deadline = time.monotonic() + 5.0
        for p in self._procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(1.0)
        for conn in self._conns:
            conn.close()

    def _watch(self) -> None:
        """Notice a worker process exiting while the engine runs."""
        sentinels = {p.sentinel: (rank, p) for rank, p in enumerate(self._procs, start=1)}
        while not self._closing.is_set():
            gone = wait(list(sentinels), timeout=_POLL_S)
            if self._closing.is_set():
                return
            if not gone:
                continue
            rank, p = sentinels[int(gone[0])]  # type: ignore[call-overload]
            p.join(1.0)
            self._failure = _exited(rank, p)
            log.error("%s: the engine stops", self._failure)
            if not self._closed.wait(HANG_GRACE_S) and self._step_since is not None:
                self._on_hang()
            return


def _exited(rank: int, p: Any) -> str:
    return f"tensor-parallel rank {rank} (pid {p.pid}) exited with status {p.exitcode}"
