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
.venv/bin/python -m pip install -q --disable-pip-version-check .

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
Try:
  curl -N http://127.0.0.1:$PORT/v1/chat/completions -H "Authorization: Bearer $USER_KEY" \\
       -d '{"model": "demo", "stream": true, "messages": [{"role": "user", "content": "hi"}]}'
  python3 -c 'import openai; c = openai.OpenAI(base_url="http://127.0.0.1:$PORT/v1", api_key="$USER_KEY")
for e in c.chat.completions.create(model="demo", messages=[], stream=True): print(e.choices[0].delta.content or "", end="", flush=True)'
Ctrl-C stops everything.
TEXT
wait
