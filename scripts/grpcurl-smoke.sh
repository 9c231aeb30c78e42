#!/usr/bin/env bash
# grpcurl smoke test: the built `stevedore` binary answers grpcurl with no proto file
# (server reflection), and a Deploy called from grpcurl streams to PHASE_COMPLETE.
#
#   bash scripts/grpcurl-smoke.sh [path/to/stevedore]
#
# Needs a Docker engine with the test images (scripts/test-env.sh up) and grpcurl.
# Listens on ephemeral ports (127.0.0.1:0; the addresses are read from the server's
# log), and stops the server and removes the app's container on exit.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# shellcheck source=scripts/lib/serve.sh
source scripts/lib/serve.sh
bin=${1:-$(stevedore_binary)}

work=$(mktemp -d)
app="t-smoke-$(cut -c1-8 /proc/sys/kernel/random/uuid)"

cleanup() {
  local rc=$?
  stevedore_cleanup "$rc" "$app"
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT

fail() {
  echo "grpcurl smoke: $*" >&2
  exit 1
}

stevedore_serve "$bin" "$work/data" || fail "the server did not start"
addr=$GRPC_ADDR
echo "server on $addr (pid $SERVER_PID), app $app"

services=$(grpcurl -plaintext -max-time 10 "$addr" list)
grep -qx 'stevedore.v1.Deployer' <<<"$services" || fail "list does not show stevedore.v1.Deployer: $services"
echo "list: ok"

described=$(grpcurl -plaintext -max-time 10 "$addr" describe stevedore.v1.DeployRequest)
grep -q 'message DeployRequest' <<<"$described" || fail "describe stevedore.v1.DeployRequest: $described"
echo "describe: ok"

request=$(printf '{"app":"%s","image":"stevedore-test/web:1","ports":[{"container_port":8080}]}' "$app")
stream=$(grpcurl -plaintext -max-time 120 -d "$request" "$addr" stevedore.v1.Deployer/Deploy) ||
  fail "Deploy failed: $stream"
grep -q '"PHASE_QUEUED"' <<<"$stream" || fail "the stream does not start in PHASE_QUEUED: $stream"
grep -q '"PHASE_COMPLETE"' <<<"$stream" || fail "the stream does not reach PHASE_COMPLETE: $stream"
# The stream as JSON: sequences 1..n without a gap, the last update a success with the
# endpoint of port 8080, which serves v1.
checked=$(python3 -c '
import json, sys
text, dec, pos, updates = sys.stdin.read(), json.JSONDecoder(), 0, []
while True:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    if pos == len(text):
        break
    u, pos = dec.raw_decode(text, pos)
    if not u.get("heartbeat"):
        updates.append(u)
seqs = [int(u.get("sequence", 0)) for u in updates]
assert seqs == list(range(1, len(updates) + 1)), f"sequences {seqs}"
result = updates[-1].get("result") or {}
assert result.get("success") is True, f"last update {updates[-1]}"
assert all("result" not in u for u in updates[:-1]), "a result before the last update"
print(len(updates), result["endpoints"]["8080/tcp"])
' <<<"$stream") || fail "the Deploy stream is not well formed: $stream"
read -r updates endpoint <<<"$checked"
body=$(curl -sf -m 10 "$endpoint/") || fail "GET $endpoint/ failed"
[[ $body == v1 ]] || fail "$endpoint/ answered $body, not v1"
echo "deploy: ok ($updates updates, sequences 1..$updates, success, $endpoint serves v1)"
