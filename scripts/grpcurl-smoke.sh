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
bin=${1:-target/debug/stevedore}
[[ -x $bin ]] || cargo build --quiet --bin stevedore

# shellcheck source=scripts/lib/serve.sh
source scripts/lib/serve.sh

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
updates=$(grep -c '"sequence"' <<<"$stream" || true)
echo "deploy: ok ($updates updates, ends in PHASE_COMPLETE)"
