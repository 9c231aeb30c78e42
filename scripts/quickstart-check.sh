#!/usr/bin/env bash
# CI check of the quickstart: runs `bash scripts/quickstart.sh` exactly as the README
# says, checks that the URL it prints serves the demo's second version, runs it a
# second time (harmless: same server, the app deployed again), then
# `bash scripts/quickstart.sh stop`, and checks that nothing is left: no server, no
# demo container, the URL no longer answers.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

out=$(mktemp)
trap 'rc=$?; ((rc == 0)) || bash scripts/quickstart.sh stop >/dev/null 2>&1 || true; rm -f "$out"; exit $rc' EXIT

serves_v2() {
  local url
  url=$(sed -n 's|^The demo app serves at \(http://[0-9.:]*\)$|\1|p' "$out" | tail -n 1)
  [[ -n $url ]] || { echo "quickstart-check: no URL printed" >&2; return 1; }
  curl -fsS -m 5 "$url" | grep -q 'version 2' || { echo "quickstart-check: $url does not serve version 2" >&2; return 1; }
  echo "quickstart-check: $url serves version 2"
  URL=$url
}

start=$SECONDS
bash scripts/quickstart.sh 2>&1 | tee "$out"
serves_v2
echo "quickstart-check: first run took $((SECONDS - start))s"

start=$SECONDS
bash scripts/quickstart.sh 2>&1 | tee "$out"
serves_v2
echo "quickstart-check: second run took $((SECONDS - start))s"

bash scripts/quickstart.sh stop
if [[ -n $(docker ps -aq --filter label=io.stevedore.app=quickstart-hello) ]]; then
  echo "quickstart-check: the demo app's containers are still there after stop" >&2
  exit 1
fi
if curl -fsS -m 2 -o /dev/null "$URL" 2>/dev/null; then
  echo "quickstart-check: $URL still answers after stop" >&2
  exit 1
fi
if curl -fsS -m 2 -o /dev/null "http://${STEVEDORE_QUICKSTART_HTTP:-127.0.0.1:50052}/healthz" 2>/dev/null; then
  echo "quickstart-check: the server still answers after stop" >&2
  exit 1
fi
echo "quickstart-check: ok"
