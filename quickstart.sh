#!/usr/bin/env bash
# Installs remotellm into .venv and starts, on this machine, a broker, a connector and
# the DEMO model (a fake LLM that streams a canned sentence; it is not a real model).
# Point --llm-url at Ollama, vLLM or llama.cpp instead to serve a real one.
set -euo pipefail
cd "$(dirname "$0")"
PORT="${PORT:-8443}"
DEMO_PORT="${DEMO_PORT:-11500}"
USER_KEY="${USER_KEY:-sk-demo-user}"

python3 -m venv .venv
# The demo's own clients come too, so every command printed below works as printed.
.venv/bin/python -m pip install -q --disable-pip-version-check . openai

RUN_DIR="$(mktemp -d)"
TOKEN="$(.venv/bin/python -c 'import secrets; print(secrets.token_urlsafe(24))')"
umask 077
cat > "$RUN_DIR/connectors.yaml" <<YAML
connectors:
  - name: demo-box
    token: $TOKEN
    models: [demo]
YAML

pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$RUN_DIR"; }
trap cleanup EXIT INT TERM

.venv/bin/python -m fakellm --demo --port "$DEMO_PORT" --model demo > "$RUN_DIR/demo.log" 2>&1 &
pids+=($!)
.venv/bin/python -m broker --port "$PORT" --user-api-key "$USER_KEY" \
    --connector-config "$RUN_DIR/connectors.yaml" &
pids+=($!)
REMOTELLM_CONNECTOR_TOKEN="$TOKEN" .venv/bin/python -m connector \
    --broker-url "http://127.0.0.1:$PORT" --llm-url "http://127.0.0.1:$DEMO_PORT" --model demo &
pids+=($!)

for _ in $(seq 100); do
    if curl -sf "http://127.0.0.1:$PORT/health" | grep -q '"demo"'; then break; fi
    sleep 0.1
done
cat <<TEXT

remotellm is up: broker on http://127.0.0.1:$PORT, serving the DEMO model "demo" (a fake LLM).
Try (each works as printed):

  # OpenAI chat, streamed
  curl -N http://127.0.0.1:$PORT/v1/chat/completions -H "Authorization: Bearer $USER_KEY" \\
       -d '{"model": "demo", "stream": true, "messages": [{"role": "user", "content": "hi"}]}'
  # OpenAI Responses
  curl http://127.0.0.1:$PORT/v1/responses -H "Authorization: Bearer $USER_KEY" \\
       -d '{"model": "demo", "input": "hi"}'
  # Anthropic Messages (the key as x-api-key, as Anthropic clients send it)
  curl http://127.0.0.1:$PORT/v1/messages -H "x-api-key: $USER_KEY" -H "anthropic-version: 2023-06-01" \\
       -d '{"model": "demo", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}'
  # Ollama's native API (NDJSON, line by line)
  curl -N http://127.0.0.1:$PORT/api/chat -H "Authorization: Bearer $USER_KEY" \\
       -d '{"model": "demo", "messages": [{"role": "user", "content": "hi"}]}'
  # the openai SDK, installed in .venv
  .venv/bin/python -c 'import openai; c = openai.OpenAI(base_url="http://127.0.0.1:$PORT/v1", api_key="$USER_KEY")
for e in c.chat.completions.create(model="demo", messages=[], stream=True): print(e.choices[0].delta.content or "", end="", flush=True)
print()'
Ctrl-C stops everything.
TEXT
wait
