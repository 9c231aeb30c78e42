#!/usr/bin/env bash
# Builds the TypeScript client, starts the stevedore binary on free ports, and runs the
# client's end-to-end test against it. Needs Node.js 20 with npm, a Docker engine and
# the test images (scripts/test-env.sh up), and a built binary (cargo build).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$here/../.."
cd "$here"
[[ -d node_modules ]] || npm ci --no-audit --no-fund
npx tsc -p .
# shellcheck source=scripts/lib/serve.sh
source "$root/scripts/lib/serve.sh"
data="$(mktemp -d)"
trap 'rc=$?; stevedore_cleanup "$rc"; rm -rf "$data"; exit "$rc"' EXIT
stevedore_serve "$root/target/debug/stevedore" "$data"
STEVEDORE_ADDR="$GRPC_ADDR" node --test dist/
