"""An engine server over the toy runner, in a process of its own (the engine client tests).

``python toy_server.py ADDRESS TOKENIZER_DIR OPTIONS_JSON``; options: ``num_blocks``,
``slots``, ``step_delay_s`` (each forward sleeps that long), ``fail_execute`` (every forward
raises), ``token``, ``client_timeout_s``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> int:
    address, tok_dir, raw = sys.argv[1], sys.argv[2], sys.argv[3]
    opts = json.loads(raw)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    from toy_runner import ToyRunner
    from transformers import AutoTokenizer

    from loraplex.engine.config import EngineConfig
    from loraplex.engine.llm_engine import LLMEngine
    from loraplex.engine.server import EngineServer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    slots = opts.get("slots", 2)
    runner = ToyRunner(tok, num_blocks=opts.get("num_blocks", 64), block_size=4, num_slots=slots)
    run = runner.run
    delay = opts.get("step_delay_s", 0.0)

    def slow_or_failing(batch, prev_tokens=None):  # type: ignore[no-untyped-def]
        if opts.get("fail_execute"):
            raise RuntimeError("device lost")
        if delay:
            time.sleep(delay)
        return run(batch, prev_tokens)

    runner.run = slow_or_failing  # type: ignore[method-assign]
    config = EngineConfig(block_size=4, max_loras=slots, max_cpu_loras=max(slots, 4))
    server = EngineServer(
        lambda: LLMEngine(runner, config),
        address,
        name="toy",
        model="toy",
        token=opts.get("token", ""),
        client_timeout_s=opts.get("client_timeout_s", 10.0),
        parent_pid=os.getppid(),  # a test process that dies takes its engine along
    )
    return server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
