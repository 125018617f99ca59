"""The shared fixtures work: real services reachable, tiny model and adapters load."""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy import text

from loraplex.tenancy.db import make_engine


async def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        async with engine.connect() as conn:
            if url.startswith("sqlite"):
                rows = await conn.execute(text("SELECT name FROM sqlite_master WHERE type='table'"))
            else:
                rows = await conn.execute(
                    text("SELECT tablename FROM pg_tables WHERE schemaname='public'")
                )
            return {r[0] for r in rows}
    finally:
        await engine.dispose()


async def test_pg_url_is_migrated_and_empty(pg_url: str) -> None:
    assert {"tenants", "api_keys", "usage_records", "alembic_version"} <= await _tables(pg_url)
    engine = make_engine(pg_url)
    async with engine.begin() as conn:
        assert (await conn.execute(text("SELECT count(*) FROM tenants"))).scalar() == 0
        await conn.execute(
            text(
                "INSERT INTO plans (name, prompt_price_micros, "
                "completion_price_micros, limits, created_at) "
                "VALUES ('p', 0, 0, '{}', now())"
            )
        )
    await engine.dispose()


async def test_pg_url_truncated_between_tests(pg_url: str) -> None:
    engine = make_engine(pg_url)
    async with engine.connect() as conn:
        assert (await conn.execute(text("SELECT count(*) FROM plans"))).scalar() == 0
    await engine.dispose()


async def test_sqlite_url_is_migrated(sqlite_url: str) -> None:
    assert {"tenants", "api_keys", "admin_tokens"} <= await _tables(sqlite_url)


async def test_redis_url_own_db(redis_url: str) -> None:
    import redis.asyncio as redis

    assert not redis_url.endswith("/0")
    client = redis.Redis.from_url(redis_url)
    assert await client.dbsize() == 0
    await client.set("k", "v")
    await client.aclose()


def test_s3_bucket_exists(s3) -> None:  # type: ignore[no-untyped-def]
    client = s3.client()
    client.put_object(Bucket=s3.bucket, Key="a/b", Body=b"hello")
    assert client.get_object(Bucket=s3.bucket, Key="a/b")["Body"].read() == b"hello"


def test_tiny_llama_and_adapter_change_outputs(tiny_llama_dir: Path, make_peft_adapter) -> None:  # type: ignore[no-untyped-def]
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Hello!"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt.endswith("<|im_start|>assistant\n")
    ids = torch.tensor([tok.encode(prompt)])
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    with torch.no_grad():
        base_logits = base(ids).logits
    path = make_peft_adapter(tiny_llama_dir, rank=4, targets=["q_proj", "down_proj"], seed=1)
    assert make_peft_adapter(tiny_llama_dir, 4, ["q_proj", "down_proj"], 1) == path
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and set(cfg["target_modules"]) == {"q_proj", "down_proj"}
    assert (path / "adapter_model.safetensors").exists()
    lora = PeftModel.from_pretrained(base, path).eval()
    with torch.no_grad():
        assert not torch.allclose(lora(ids).logits, base_logits, atol=1e-3)
