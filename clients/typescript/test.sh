#!/usr/bin/env bash
# Builds the TypeScript client, starts the stevedore binary on free ports, and runs the
# client's end-to-end test against it. Needs Node.js 20 with npm, a Docker engine and
# the test images (scripts/test-env.sh up); it builds the binary if needed
# (CARGO_TARGET_DIR is honoured). The types in src/generated/ come from the proto.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$here/../.."
cd "$here"
[[ -d node_modules ]] || npm ci --no-audit --no-fund
npm run build
# shellcheck source=scripts/lib/serve.sh
source "$root/scripts/lib/serve.sh"
data="$(mktemp -d)"
trap 'rc=$?; stevedore_cleanup "$rc"; rm -rf "$data"; exit "$rc"' EXIT
stevedore_serve "$(stevedore_binary)" "$data"
STEVEDORE_ADDR="$GRPC_ADDR" node --test dist/
