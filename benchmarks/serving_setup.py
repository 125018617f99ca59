"""The benchmark's tenants, API keys and adapters, made through the admin API.

Adapter ``j`` belongs to tenant ``j % tenants``. Its weights are one of a few random PEFT
files written once (``bench_throughput.adapter_refs``: file ``j % weight_files``); its
``adapter_config.json`` names the adapter (``revision``, a field the server ignores), so
every upload has its own bytes. The server keys adapters by the sha256 of their bundle, so
each adapter is a distinct key there (its own object, cache entry, GPU slot and KV
prefixes), as each ``bench-N-j`` key is a distinct adapter in the offline engine.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx


@dataclass(frozen=True)
class Tenancy:
    tenants: list[str]
    keys: list[str]  # an inference key per tenant
    adapters: list[str]  # adapter j's name (in tenant j % len(tenants))
    upload_s: float
    upload_bytes: int


def _check(r: httpx.Response, what: str) -> dict:
    if r.status_code >= 300:
        raise RuntimeError(f"{what}: HTTP {r.status_code}: {r.text[:500]}")
    return r.json()


def make_tenancy(
    url: str,
    admin_token: str,
    prefix: str,
    n_tenants: int,
    weight_dirs: list[Path],
    workers: int = 4,
) -> Tenancy:
    """Tenants ``<prefix>-t<i>`` with an inference key each, and ``len(weight_dirs)``
    adapters ``a<j>`` (weights ``weight_dirs[j]``) uploaded into tenant ``j % n_tenants``."""
    auth = {"Authorization": f"Bearer {admin_token}"}
    with httpx.Client(base_url=url, headers=auth, timeout=600, trust_env=False) as http:
        tenants, keys = [], []
        for i in range(n_tenants):
            name = f"{prefix}-t{i}"
            _check(http.post("/admin/v1/tenants", json={"name": name}), f"tenant {name}")
            key = _check(
                http.post(f"/admin/v1/tenants/{name}/keys", json={"scopes": ["inference"]}),
                f"key of {name}",
            )["key"]
            tenants.append(name)
            keys.append(key)

        def upload(j: int) -> int:
            tenant, name, src = tenants[j % n_tenants], f"a{j}", weight_dirs[j]
            config = json.loads((src / "adapter_config.json").read_text())
            config["revision"] = f"{prefix}-a{j}"
            weights = src / "adapter_model.safetensors"
            with weights.open("rb") as fh:
                files = [
                    ("files", ("adapter_config.json", json.dumps(config).encode())),
                    ("files", ("adapter_model.safetensors", fh)),
                ]
                out = _check(
                    http.post(
                        f"/admin/v1/tenants/{tenant}/adapters", data={"name": name}, files=files
                    ),
                    f"upload of {tenant}/{name}",
                )
            return int(out["bytes"])

        t0 = time.perf_counter()
        with ThreadPoolExecutor(max(1, workers)) as pool:
            sizes = list(pool.map(upload, range(len(weight_dirs))))
        took = time.perf_counter() - t0
    adapters = [f"a{j}" for j in range(len(weight_dirs))]
    return Tenancy(tenants, keys, adapters, took, sum(sizes))
