"""Settings: embedded defaults need nothing running; production refuses what is unsafe."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import typer
from harness.cli import SECRET as GOOD_SECRET
from pydantic import ValidationError

from loraplex.gateway.settings import GatewaySettings
from loraplex.tenancy.settings import StoreSettings

PG = "postgresql+asyncpg://u@db:5432/loraplex"


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no stray .env; relative data dir lands here


def refused(setting: str, **kwargs: object) -> str:
    with pytest.raises(ValidationError) as info:
        StoreSettings(**kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert setting in message, message
    return message


def test_embedded_defaults(tmp_path: Path) -> None:
    s = StoreSettings()
    assert s.embedded and s.mode == "auto"
    assert s.data_dir == Path(".loraplex")
    assert s.resolved_database_url() == f"sqlite+aiosqlite:///{tmp_path / '.loraplex/loraplex.db'}"
    assert s.resolved_object_store_url() == (tmp_path / ".loraplex/objects").as_uri()
    assert s.redis_url is None and s.admin_token is None


def test_embedded_secret_key_generated_once(tmp_path: Path) -> None:
    s = StoreSettings(data_dir=tmp_path / "d")
    key = s.resolved_secret_key()
    assert len(key) == 64
    assert StoreSettings(data_dir=tmp_path / "d").resolved_secret_key() == key
    mode = stat.S_IMODE((tmp_path / "d/secret_key").stat().st_mode)
    assert mode == 0o600


def test_environment_and_dotenv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAPLEX_DATA_DIR", str(tmp_path / "env-dir"))
    assert StoreSettings().data_dir == tmp_path / "env-dir"
    (tmp_path / ".env").write_text("LORAPLEX_PORT=9123\nLORAPLEX_MODEL=dummy:tiny\n")
    g = GatewaySettings()
    assert (g.port, g.model) == (9123, "dummy:tiny")
    assert GatewaySettings(port=9000).port == 9000  # explicit values win


def test_gateway_defaults() -> None:
    g = GatewaySettings()
    assert (g.host, g.port, g.model, g.device, g.dtype) == ("127.0.0.1", 8000, "", "auto", "auto")
    assert g.migrate_on_start


def test_production_needs_a_real_secret() -> None:
    refused("LORAPLEX_SECRET_KEY", database_url=PG)
    for bad in ["changeme", "secret", "changeme-please-1234", "short"]:
        refused("LORAPLEX_SECRET_KEY", database_url=PG, secret_key=bad)
    refused("LORAPLEX_SECRET_KEY", mode="production")
    s = StoreSettings(database_url=PG, secret_key=GOOD_SECRET)
    assert not s.embedded and s.resolved_database_url() == PG
    assert s.resolved_secret_key() == GOOD_SECRET


def test_production_refuses_placeholder_admin_token() -> None:
    refused("LORAPLEX_ADMIN_TOKEN", database_url=PG, secret_key=GOOD_SECRET, admin_token="changeme")
    ok = StoreSettings(database_url=PG, secret_key=GOOD_SECRET, admin_token="t" * 32)
    assert ok.admin_token == "t" * 32


def test_embedded_accepts_dev_values() -> None:
    assert StoreSettings(admin_token="dev").admin_token == "dev"


@pytest.mark.parametrize(
    ("setting", "field", "value"),
    [
        ("LORAPLEX_DATABASE_URL", "database_url", "mysql://db/x"),
        ("LORAPLEX_DATABASE_URL", "database_url", "postgresql://db/x"),
        ("LORAPLEX_DATABASE_URL", "database_url", "postgresql+asyncpg://db:port/x"),
        ("LORAPLEX_REDIS_URL", "redis_url", "http://localhost:6379"),
        ("LORAPLEX_OBJECT_STORE_URL", "object_store_url", "ftp://host/dir"),
    ],
)
def test_bad_urls_name_the_setting(setting: str, field: str, value: str) -> None:
    refused(setting, **{field: value, "secret_key": GOOD_SECRET})


def test_good_urls() -> None:
    s = StoreSettings(
        database_url="sqlite+aiosqlite:////tmp/x.db",
        redis_url="redis://127.0.0.1:6379/3",
        object_store_url="s3://bucket/prefix",
        secret_key=GOOD_SECRET,
    )
    assert s.resolved_object_store_url() == "s3://bucket/prefix"


def test_bad_values_are_validation_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAPLEX_PORT", "eighty")
    with pytest.raises(ValidationError):
        GatewaySettings()
    monkeypatch.setenv("LORAPLEX_PORT", "8000")
    monkeypatch.setenv("LORAPLEX_DEVICE", "tpu")
    with pytest.raises(ValidationError):
        GatewaySettings()


def test_every_setting_is_documented() -> None:
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    reference = (root / "docs/configuration.md").read_text()
    for name in GatewaySettings.model_fields:
        var = f"`LORAPLEX_{name.upper()}`"
        assert var in readme, f"{var} missing from README.md's configuration table"
        assert var in reference, f"{var} missing from docs/configuration.md"


@pytest.mark.parametrize(
    ("model", "served", "expected"),
    [
        ("", None, "base"),
        ("dummy:tiny", None, "dummy:tiny"),
        ("/models/Llama-3-8B.Q4_K_M.gguf", None, "Llama-3-8B"),
        ("/models/llama3-8b/", None, "llama3-8b"),
        ("/models/llama3-8b", "prod-base", "prod-base"),
    ],
)
def test_base_model_name_is_short_and_stable(model, served, expected):
    from loraplex.gateway.settings import GatewaySettings

    assert GatewaySettings(model=model, served_model_name=served).base_model_name() == expected


def test_engine_config_takes_quantization_and_kernel_configs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from loraplex.engine_wiring import engine_config

    monkeypatch.setenv("LORAPLEX_QUANTIZATION", "fp8")
    monkeypatch.setenv("LORAPLEX_FP8_W8A8_MIN_TOKENS", "64")
    cfg = engine_config(GatewaySettings())
    assert cfg.quantization == "fp8" and cfg.fp8_w8a8_min_tokens == 64
    assert cfg.kernel_config_dir == Path(".loraplex") / "kernel-configs" and cfg.kernel_tuning
    monkeypatch.setenv("LORAPLEX_KERNEL_CONFIG_DIR", "/var/cache/kc")
    monkeypatch.setenv("LORAPLEX_KERNEL_TUNING", "false")
    cfg = engine_config(GatewaySettings())
    assert cfg.kernel_config_dir == Path("/var/cache/kc") and not cfg.kernel_tuning
    monkeypatch.setenv("LORAPLEX_QUANTIZATION", "int4")
    with pytest.raises(ValidationError):
        GatewaySettings()


def test_kv_cache_dtype_reaches_the_engine(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from loraplex.engine.runner import runner_options
    from loraplex.engine_wiring import engine_config
    from loraplex.serve import load_settings

    assert runner_options(engine_config(GatewaySettings()))["kv_cache_dtype"] == "auto"
    monkeypatch.setenv("LORAPLEX_KV_CACHE_DTYPE", "fp8")
    assert runner_options(engine_config(GatewaySettings()))["kv_cache_dtype"] == "fp8"
    # the command line's option over the environment
    assert load_settings(kv_cache_dtype="auto").kv_cache_dtype == "auto"
    monkeypatch.setenv("LORAPLEX_KV_CACHE_DTYPE", "int8")
    with pytest.raises(typer.Exit):  # one line naming the setting, exit status 2
        load_settings()
    assert "LORAPLEX_KV_CACHE_DTYPE" in capsys.readouterr().err
