#!/usr/bin/env bash
# Benchmarks: bash scripts/bench.sh [all|durability|vs_docker|smoke] [ARGS...]
#
# Runs the bench targets in the release profile (cargo bench) against a real
# `stevedore serve`, the local Docker engine and registry (scripts/test-env.sh up).
# Figures depend on the machine; docs/PERFORMANCE.md has a run and how to read it.
#
# vs_docker (benches/vs_docker.rs): every line prints the figure, its anchor measured
# in the same run (runs alternate; medians), the ratio, the target and met / NOT met:
#   - deploy of a present image with a TCP check, first and redeploy, against a
#     docker-CLI script; the engine's own create+start and the app's start (the
#     floor), and Stevedore's time outside it;
#   - pull of a ~100 MB image from the local registry against `docker pull`;
#   - 100 concurrent deploys of distinct apps: all succeed, server CPU per deploy,
#     wall time against 100 docker-CLI scripts in parallel;
#   - 30 redeploys of an app with 10 past deployments, alternating with first
#     deploys of new apps: server CPU per deploy of each (figures only);
#   - 1,000 and 10,000 gRPC watchers of one deployment: lost/duplicated, p50/p99
#     emit→receive, deliveries/s, server RSS per open stream, each next to a bare
#     tonic server sending the same messages (benches/floor), and replay throughput
#     against it.
#   ARGS: [deploy] [pull] [concurrent] [redeploys] [watchers] --runs N
#         --concurrent N --redeploys N --watchers N,N --pull-mb N --smoke
# durability (benches/durability.rs): fan-out to 1,000 watchers, a stalled watcher,
#   real deployments with a stalled watcher, restart with 10,000 finished deployments
#   (time to ready, RSS). ARGS: --smoke
# smoke: both with --smoke in the dev profile (reuses the debug build of
#   `cargo test`; the figures are a debug build's): what scripts/test.sh runs so the
#   benches never rot. No target is asserted anywhere.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
what=${1:-all}
(($#)) && shift
case $what in
  durability | vs_docker) cargo bench --bench "$what" -- "$@" ;;
  all)
    cargo bench --bench durability -- "$@"
    cargo bench --bench vs_docker -- "$@"
    ;;
  smoke)
    cargo bench --profile dev --bench durability -- --smoke
    cargo bench --profile dev --bench vs_docker -- --smoke
    ;;
  *)
    echo "usage: bash scripts/bench.sh [all|durability|vs_docker|smoke] [ARGS...]" >&2
    exit 2
    ;;
esac
