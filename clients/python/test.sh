#!/usr/bin/env bash
# Generates the Python client, starts the stevedore binary on free ports, and runs the
# client's end-to-end test against it. Needs a Docker engine and the test images
# (scripts/test-env.sh up); it builds the binary if needed (CARGO_TARGET_DIR is honoured).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$here/../.."
python3 -c 'import grpc_tools' 2>/dev/null ||
  PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1 python3 -m pip install -q -r "$here/requirements.txt"
bash "$here/generate.sh"
# shellcheck source=scripts/lib/serve.sh
source "$root/scripts/lib/serve.sh"
data="$(mktemp -d)"
trap 'rc=$?; stevedore_cleanup "$rc"; rm -rf "$data"; exit "$rc"' EXIT
stevedore_serve "$(stevedore_binary)" "$data"
# unittest exits 0 when it finds no test: require that some ran.
out=$(cd "$here" && STEVEDORE_ADDR="$GRPC_ADDR" python3 -m unittest -v test_client 2>&1) || {
  echo "$out"
  exit 1
}
echo "$out"
grep -Eq '^Ran [1-9][0-9]* tests?' <<<"$out" || {
  echo "no Python client test ran" >&2
  exit 1
}
