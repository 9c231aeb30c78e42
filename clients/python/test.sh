#!/usr/bin/env bash
# Generates the Python client, starts the stevedore binary on free ports, and runs the
# client's end-to-end test against it. Needs a Docker engine and the test images
# (scripts/test-env.sh up) and a built binary (cargo build).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$here/../.."
python3 -c 'import grpc_tools' 2>/dev/null || pip install -q -r "$here/requirements.txt"
bash "$here/generate.sh"
data="$(mktemp -d)"
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$data"' EXIT
"$root/target/debug/stevedore" serve --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 \
  --data-dir "$data" 2>"$data/server.log" &
pid=$!
for _ in $(seq 100); do
  addr=$(grep -so 'grpc=[0-9.:]*' "$data/server.log" | head -1 | cut -d= -f2 || true)
  [[ -n "$addr" ]] && break
  sleep 0.1
done
[[ -n "${addr:-}" ]] || { cat "$data/server.log"; echo "server did not start" >&2; exit 1; }
cd "$here" && STEVEDORE_ADDR="$addr" python3 -m unittest -v test_client
