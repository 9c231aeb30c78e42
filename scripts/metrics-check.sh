#!/usr/bin/env bash
# Metrics and audit smoke test on the built binary: deploys once successfully and
# once into a failure (stevedore-test/crash:1) with grpcurl, removes the first app
# (RemoveApp), then
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

# shellcheck source=scripts/lib/serve.sh
source scripts/lib/serve.sh
bin=${1:-$(stevedore_binary)}

work=$(mktemp -d)
suffix=$(cut -c1-8 /proc/sys/kernel/random/uuid)
apps=("t-metrics-ok-$suffix" "t-metrics-bad-$suffix")

cleanup() {
  local rc=$?
  stevedore_cleanup "$rc" "${apps[@]}"
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT

fail() {
  echo "metrics check: $*" >&2
  exit 1
}

stevedore_serve "$bin" "$work/data" || fail "the server did not start"
grpc=$GRPC_ADDR
http=$HTTP_ADDR

deploy() {
  grpcurl -plaintext -max-time 120 -d "$1" "$grpc" stevedore.v1.Deployer/Deploy
}
ok=$(deploy "$(printf '{"app":"%s","image":"stevedore-test/web:1","ports":[{"container_port":8080}]}' "${apps[0]}")") ||
  fail "Deploy failed: $ok"
grep -q '"PHASE_COMPLETE"' <<<"$ok" || fail "the first deployment did not complete: $ok"
bad=$(deploy "$(printf '{"app":"%s","image":"stevedore-test/crash:1"}' "${apps[1]}")") ||
  fail "Deploy failed: $bad"
grep -q '"PHASE_FAILED"' <<<"$bad" || fail "the crash deployment did not fail: $bad"
removed=$(grpcurl -plaintext -max-time 120 -d "$(printf '{"app":"%s"}' "${apps[0]}")" "$grpc" \
  stevedore.v1.Deployer/RemoveApp) || fail "RemoveApp failed: $removed"
grep -q '"containersRemoved": 1' <<<"$removed" || fail "RemoveApp removed nothing: $removed"

# The metrics observer runs behind the stream: poll (up to 60 s) until both deployments
# are counted before checking the counters.
metrics=$work/metrics.txt
for ((i = 0; i < 600; i++)); do
  curl -sf "http://$http/metrics" >"$metrics" || fail "GET /metrics failed"
  grep -qx 'stevedore_deployments_finished_total{outcome="failed"} 1' "$metrics" &&
    grep -qx 'stevedore_deployments_finished_total{outcome="succeeded"} 1' "$metrics" &&
    grep -qx 'stevedore_app_removals_total{outcome="succeeded"} 1' "$metrics" && break
  sleep 0.1
done
promtool check metrics <"$metrics" || fail "promtool check metrics rejects /metrics"
echo "promtool check metrics: ok ($(grep -vc '^#' "$metrics") samples)"

expect() {
  grep -qx "$1 $2" "$metrics" || fail "expected '$1 $2' in /metrics: $(grep "^${1%%\{*}" "$metrics" || true)"
}
expect stevedore_deployments_started_total 2
expect 'stevedore_deployments_finished_total{outcome="succeeded"}' 1
expect 'stevedore_deployments_finished_total{outcome="failed"}' 1
# The removal counts apart, never as a deployment.
expect 'stevedore_app_removals_total{outcome="succeeded"}' 1
echo "counters: ok"

kill -TERM "$SERVER_PID"
wait "$SERVER_PID" || fail "the server did not stop cleanly"
SERVER_PID=
"$bin" audit verify --data-dir "$work/data" || fail "audit verify failed"
