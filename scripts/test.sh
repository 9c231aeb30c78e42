#!/usr/bin/env bash
# The project's one test command: bash scripts/test.sh [extra cargo test args]
#
# Brings up the test environment (scripts/test-env.sh up: Docker engine, registries on
# 127.0.0.1:5000 and, with htpasswd auth, 127.0.0.1:5001, test images; left running for
# the next run) and the three-node swarm the swarm tests use (scripts/swarm-env.sh up:
# dockerd nodes in network namespaces stv-n1..3 at 10.77.0.11-13, also left running),
# then runs cargo fmt --check, cargo clippy --all-targets -D warnings,
# cargo test "$@", and the script and client checks, each timed. Docker tests fail,
# never skip, without an engine.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# elapsed time since $1 (an ${EPOCHREALTIME/./} value), as seconds with 1 decimal
_now_us() { echo "${EPOCHREALTIME/./}"; }
_since() {
  local d=$(($(_now_us) - $1))
  printf '%d.%01ds' $((d / 1000000)) $((d % 1000000 / 100000))
}

_t_total_start=$(_now_us)
_step() {
  local name=$1 start rc=0
  shift
  printf '\n=== %s\n' "$name"
  start=$(_now_us)
  "$@" || rc=$?
  printf '=== %s: %s in %s\n' "$name" "$([[ $rc == 0 ]] && echo ok || echo "FAILED (exit $rc)")" "$(_since "$start")"
  return "$rc"
}

_on_exit() {
  local rc=$?
  printf '=== total: %s (exit %s)\n' "$(_since "$_t_total_start")" "$rc"
  exit "$rc"
}
trap _on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

_rust_components() {
  local installed missing=() c
  installed=$(rustup component list --installed 2>/dev/null || true)
  for c in rustfmt clippy; do
    grep -q "^$c" <<<"$installed" || missing+=("$c")
  done
  if ((${#missing[@]})); then
    rustup component add "${missing[@]}"
  fi
  cargo fmt --version
  cargo clippy --version
}

# Runs the proptest fuzz tests; fails when the filter matches no test (after a rename),
# which cargo itself reports as success.
_fuzz() {
  local out passed
  out=$(PROPTEST_CASES=5000 cargo test --lib api::convert::tests::fuzz 2>&1) || {
    echo "$out"
    return 1
  }
  echo "$out" | grep -E '^test |^test result'
  passed=$(sed -n 's/^test result: ok\. \([0-9]*\) passed.*/\1/p' <<<"$out" | head -n1)
  if ((${passed:-0} < 2)); then
    echo "the fuzz filter ran ${passed:-0} tests, expected the 2 in api::convert::tests::fuzz" >&2
    return 1
  fi
}

_env_up() {
  local exports
  exports=$(bash scripts/test-env.sh up) || return 1
  eval "$exports"
}
_step "test environment up" _env_up

_swarm_env_up() {
  local exports
  exports=$(bash scripts/swarm-env.sh up) || return 1
  eval "$exports"
}
_step "swarm environment up" _swarm_env_up

_step "rust components" _rust_components
_step "cargo fmt --check" cargo fmt --check
_step "cargo clippy" cargo clippy --all-targets -- -D warnings
_step "cargo test" cargo test "$@"

# extra checks
_step "grpcurl smoke" bash scripts/grpcurl-smoke.sh
_step "promtool check metrics" bash scripts/metrics-check.sh
_step "dashboard browser test" bash tests/browser/test.sh
# The benches, once each with small counts in the debug build (figures printed, no
# target asserted), so they never rot.
_step "bench smoke" bash scripts/bench.sh smoke
# Fuzzing of request validation (proptest, bounded: 5000 arbitrary DeployRequests).
_step "fuzz request validation" _fuzz
_step "python client end-to-end" bash clients/python/test.sh
_step "typescript client end-to-end" bash clients/typescript/test.sh
# The README's quickstart, exactly as written (release build), its URL checked, then stopped.
_step "quickstart" bash scripts/quickstart-check.sh
