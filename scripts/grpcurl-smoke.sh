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

work=$(mktemp -d)
log=$work/server.log
app="t-smoke-$(cut -c1-8 /proc/sys/kernel/random/uuid)"
pid=

cleanup() {
  local rc=$?
  if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  fi
  local ids
  ids=$(docker ps -aq --filter "label=io.stevedore.app=$app" 2>/dev/null || true)
  # shellcheck disable=SC2086 # one ID per word
  [[ -z $ids ]] || docker rm -f $ids >/dev/null 2>&1 || true
  if ((rc != 0)); then
    echo "--- server log" >&2
    cat "$log" >&2 || true
  fi
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT

fail() {
  echo "grpcurl smoke: $*" >&2
  exit 1
}

NO_COLOR=1 RUST_LOG=info "$bin" serve --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 \
  --data-dir "$work/data" 2>"$log" &
pid=$!

addr=
for _ in $(seq 200); do
  addr=$(sed -n 's/.*stevedore listening.*grpc=\([0-9.]*:[0-9]*\).*/\1/p' "$log" | head -n 1)
  [[ -n $addr ]] && break
  kill -0 "$pid" 2>/dev/null || fail "the server exited before listening"
  sleep 0.1
done
[[ -n $addr ]] || fail "the server did not log its address"
echo "server on $addr (pid $pid), app $app"

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
