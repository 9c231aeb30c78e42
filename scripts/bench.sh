#!/usr/bin/env bash
# Durability benchmarks: bash scripts/bench.sh
#
# Runs benches/durability.rs in the release profile (cargo bench) and prints:
#   - updates/second one deployment's log sustains to 1,000 watchers (each fed like a
#     gRPC stream: own producer task, bounded buffer, proto conversion; every update
#     also queued to the SQLite store);
#   - the deployment's own append time and the other watchers' delivery time with
#     and without one stalled watcher;
#   - RSS of a real `stevedore serve` with 10,000 finished deployments in history.
#   - durations of real deployments (stevedore-test/web:1) with and without a
#     stalled watcher (skipped without a Docker engine and the test images).
# Figures depend on the machine.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo bench --bench durability "$@"
