#!/usr/bin/env bash
# Metrics and audit smoke test on the built binary: deploys once successfully and
# once into a failure (stevedore-test/crash:1) with grpcurl, then
#   - pipes GET /metrics to `promtool check metrics` (format and naming lints),
#   - checks the counters the two deployments must have moved,
#   - runs `stevedore audit verify` on the server's audit log.
#
#   bash scripts/metrics-check.sh [path/to/stevedore]
#
# Needs a Docker engine with the test images (scripts/test-env.sh up), grpcurl, curl
# and promtool (Debian package `prometheus`). Listens on ephemeral ports, and stops
# the server and removes the apps' containers on exit.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
bin=${1:-target/debug/stevedore}
[[ -x $bin ]] || cargo build --quiet --bin stevedore

work=$(mktemp -d)
log=$work/server.log
suffix=$(cut -c1-8 /proc/sys/kernel/random/uuid)
apps=("t-metrics-ok-$suffix" "t-metrics-bad-$suffix")
pid=

cleanup() {
  local rc=$?
  if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  fi
  local app ids
  for app in "${apps[@]}"; do
    ids=$(docker ps -aq --filter "label=io.stevedore.app=$app" 2>/dev/null || true)
    # shellcheck disable=SC2086 # one ID per word
    [[ -z $ids ]] || docker rm -f $ids >/dev/null 2>&1 || true
  done
  if ((rc != 0)); then
    echo "--- server log" >&2
    cat "$log" >&2 || true
  fi
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT

fail() {
  echo "metrics check: $*" >&2
  exit 1
}

NO_COLOR=1 RUST_LOG=info "$bin" serve --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 \
  --data-dir "$work/data" 2>"$log" &
pid=$!

grpc= http=
for _ in $(seq 200); do
  grpc=$(sed -n 's/.*stevedore listening.*grpc=\([0-9.]*:[0-9]*\).*/\1/p' "$log" | head -n 1)
  http=$(sed -n 's/.*stevedore listening.*http=\([0-9.]*:[0-9]*\).*/\1/p' "$log" | head -n 1)
  [[ -n $grpc && -n $http ]] && break
  kill -0 "$pid" 2>/dev/null || fail "the server exited before listening"
  sleep 0.1
done
[[ -n $grpc && -n $http ]] || fail "the server did not log its addresses"

deploy() {
  grpcurl -plaintext -max-time 120 -d "$1" "$grpc" stevedore.v1.Deployer/Deploy
}
ok=$(deploy "$(printf '{"app":"%s","image":"stevedore-test/web:1","ports":[{"container_port":8080}]}' "${apps[0]}")") ||
  fail "Deploy failed: $ok"
grep -q '"PHASE_COMPLETE"' <<<"$ok" || fail "the first deployment did not complete: $ok"
bad=$(deploy "$(printf '{"app":"%s","image":"stevedore-test/crash:1"}' "${apps[1]}")") ||
  fail "Deploy failed: $bad"
grep -q '"PHASE_FAILED"' <<<"$bad" || fail "the crash deployment did not fail: $bad"

metrics=$work/metrics.txt
curl -sf "http://$http/metrics" >"$metrics" || fail "GET /metrics failed"
promtool check metrics <"$metrics" || fail "promtool check metrics rejects /metrics"
echo "promtool check metrics: ok ($(grep -vc '^#' "$metrics") samples)"

expect() {
  grep -qx "$1 $2" "$metrics" || fail "expected '$1 $2' in /metrics: $(grep "^${1%%\{*}" "$metrics" || true)"
}
expect stevedore_deployments_started_total 2
expect 'stevedore_deployments_finished_total{outcome="succeeded"}' 1
expect 'stevedore_deployments_finished_total{outcome="failed"}' 1
echo "counters: ok"

kill -TERM "$pid"
wait "$pid" || fail "the server did not stop cleanly"
pid=
"$bin" audit verify --data-dir "$work/data" || fail "audit verify failed"
