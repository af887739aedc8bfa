"""Stands in for ``python -m vllm.entrypoints.openai.api_server`` in tests of ``serve = true``.

A test points ``backend.options.python`` at a shim script that runs this file with the arguments
the backend passes to vLLM; it serves :class:`fakes.fake_vllm.FakeVllm` on ``--port`` until
SIGTERM. ``FAKE_VLLM_FAIL`` makes it print that text and exit 1 (a server that never comes up);
``FAKE_VLLM_DELAY_S`` delays the start (a slow model load).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fakes.fake_vllm import FakeVllm


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("-m", dest="module")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--served-model-name", required=True)
    parser.add_argument("--max-lora-rank", type=int, default=8)
    args, _ = parser.parse_known_args()
    print(f"fake vLLM: {' '.join(sys.argv[1:])}", flush=True)
    if os.environ.get("FAKE_VLLM_FAIL"):
        print(os.environ["FAKE_VLLM_FAIL"], flush=True)
        return 1
    time.sleep(float(os.environ.get("FAKE_VLLM_DELAY_S", "0")))
    server = FakeVllm(base_model=args.served_model_name, max_lora_rank=args.max_lora_rank)
    server.stop()
    server._port = args.port
    server.start()
    print(f"fake vLLM: serving {args.served_model_name} on port {args.port}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main())
