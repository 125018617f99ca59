"""Engine replicas as real processes: N ``loraplex engine`` servers (``dummy:tiny`` on the
CPU), each on a loopback address of its own and one shared TCP port (as the pods behind a
Kubernetes headless Service are: one port, one IP each), plus LoRA adapters that fit them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from harness.cli import clean_env
from harness.services import free_port

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

ENGINE_ENV = {
    "LORAPLEX_MODEL": "dummy:tiny",
    "LORAPLEX_DEVICE": "cpu",
    "LORAPLEX_LORA_MEMORY_BYTES": str(32 << 20),  # room for every test adapter on each
    "LORAPLEX_KV_CACHE_BYTES": str(16 << 20),
    "LORAPLEX_MAX_NUM_SEQS": "32",
}


@dataclass
class EngineReplica:
    ip: str
    port: int
    proc: subprocess.Popen[bytes]
    http_port: int = 0

    @property
    def url(self) -> str:
        return f"tcp://{self.ip}:{self.port}"

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a stopped one must run to exit
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


@contextmanager
def engine_replicas(
    n: int, logs: Path, env: dict[str, str] | None = None, *, http: bool = False
) -> Iterator[list[EngineReplica]]:
    """``n`` engines on 127.0.0.1, 127.0.0.2... at one port (ready or not: the clients
    wait); ``http``: each also serves its HTTP surface (metrics, adapters) on a port."""
    logs.mkdir(parents=True, exist_ok=True)
    port = free_port()
    full = clean_env({**ENGINE_ENV, **(env or {})})
    # the engines' data dir (their local object store's scratch) out of the checkout, where
    # their cwd is; shared by this call's engines, as the default one was
    full.setdefault("LORAPLEX_DATA_DIR", str(logs / "data"))
    full["PYTHONPATH"] = f"{ROOT}{os.pathsep}{full.get('PYTHONPATH', '')}"
    replicas: list[EngineReplica] = []
    try:
        for i in range(n):
            ip = f"127.0.0.{i + 1}"
            argv = [sys.executable, "-m", "loraplex.main", "engine", "--listen",
                    f"tcp://{ip}:{port}", "--parent-pid", str(os.getpid())]  # fmt: skip
            http_port = free_port() if http else 0
            if http:
                argv += ["--http", f"127.0.0.1:{http_port}"]
            own = {**full, "LORAPLEX_ADAPTER_CACHE_DIR": str(logs / f"engine{i}-cache")}
            with (logs / f"engine{i}.log").open("w") as sink:
                proc = subprocess.Popen(argv, env=own, cwd=ROOT, stdout=sink,
                                        stderr=subprocess.STDOUT)  # fmt: skip
            replicas.append(EngineReplica(ip, port, proc, http_port))
        yield replicas
    finally:
        for r in replicas:
            r.stop()


def tiny_adapters(root: Path, n: int, rank: int = 4) -> list[Path]:
    """``n`` distinct PEFT adapters (q/v projections) for ``dummy:tiny``."""
    from common import write_peft_adapter

    from loraplex.engine.model.presets import PRESETS

    cfg = PRESETS["tiny"]
    return [
        write_peft_adapter(root / f"lora{i}", cfg, rank, seed=i, targets=["q_proj", "v_proj"])
        for i in range(n)
    ]
