"""CLI: ``python -m fakellm [--host H] [--port P] [--model M]... [--api-key K] [--name N] [--demo] [--ollama]``.

Prints exactly one line, ``fakellm listening on http://HOST:PORT``, once
listening (tests parse the port from it) and exits cleanly on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from fakellm.server import serve


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fakellm", description="Fake OpenAI-compatible LLM server.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--model", action="append", help="model id to list (repeatable; default: demo)")
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' or 'x-api-key: KEY' on /v1/ paths")
    parser.add_argument("--name", default="fake", help="value of the X-Fake-LLM response header")
    parser.add_argument("--demo", action="store_true", help="answer with the demo sentence, streamed slowly")
    parser.add_argument("--ollama", action="store_true", help="like an Ollama-only server: no GET /v1/models")
    return parser.parse_args(argv)


async def _run(args: argparse.Namespace) -> None:
    _, llm = await serve(
        args.host,
        args.port,
        models=args.model or ["demo"],
        api_key=args.api_key,
        name=args.name,
        demo=args.demo,
        ollama=args.ollama,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"fakellm listening on {llm.url}", flush=True)  # only now is a SIGTERM handled cleanly
    await stop.wait()
    await llm.close()


def main(argv: list[str] | None = None) -> None:
    asyncio.run(_run(_parse(argv)))


if __name__ == "__main__":
    main()
