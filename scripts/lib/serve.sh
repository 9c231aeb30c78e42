# shellcheck shell=bash
# Sourced by the check scripts that run the built binary (grpcurl smoke, metrics
# check, Python client): start `stevedore serve` on ephemeral ports, and clean up.
#
#   stevedore_serve BIN DATA_DIR [serve args…]
#       starts the server with its log in DATA_DIR/server.log and waits until it logs
#       its addresses; sets SERVER_PID, SERVER_LOG, GRPC_ADDR and HTTP_ADDR.
#   stevedore_cleanup RC [APP…]
#       stops the server (SIGTERM, SIGKILL after 10s), removes the apps' containers,
#       and prints the server's log when RC is not 0.

#   stevedore_binary
#       prints the path of the debug binary (under $CARGO_TARGET_DIR when set), building
#       it first when it is missing.

stevedore_binary() {
  local root target
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
  target=${CARGO_TARGET_DIR:-$root/target}
  [[ $target == /* ]] || target=$root/$target
  if [[ ! -x $target/debug/stevedore ]]; then
    (cd "$root" && cargo build -q --bin stevedore) >&2 || return 1
  fi
  echo "$target/debug/stevedore"
}

SERVER_PID=
SERVER_LOG=
GRPC_ADDR=
HTTP_ADDR=

stevedore_serve() {
  local bin=$1 data=$2
  shift 2
  mkdir -p "$data"
  SERVER_LOG=$data/server.log
  NO_COLOR=1 RUST_LOG=${RUST_LOG:-info} "$bin" serve --listen 127.0.0.1:0 \
    --http-listen 127.0.0.1:0 --data-dir "$data" "$@" 2>"$SERVER_LOG" &
  SERVER_PID=$!
  local _
  # The text form of the listening line (`server::Listening` in src/server.rs):
  # `… stevedore listening grpc=ADDR http=ADDR …`, each value up to the next space.
  for _ in $(seq 200); do
    GRPC_ADDR=$(sed -n 's/.*stevedore listening.* grpc=\([^ ]*\).*/\1/p' "$SERVER_LOG" | head -n 1)
    HTTP_ADDR=$(sed -n 's/.*stevedore listening.* http=\([^ ]*\).*/\1/p' "$SERVER_LOG" | head -n 1)
    [[ -n $GRPC_ADDR && -n $HTTP_ADDR ]] && return 0
    kill -0 "$SERVER_PID" 2>/dev/null || { echo "the server exited before listening" >&2; return 1; }
    sleep 0.1
  done
  echo "the server did not log its addresses" >&2
  return 1
}

stevedore_cleanup() {
  local rc=$1 app ids _
  shift
  if [[ -n $SERVER_PID ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  for app in "$@"; do
    ids=$(docker ps -aq --filter "label=io.stevedore.app=$app" 2>/dev/null || true)
    # shellcheck disable=SC2086 # one ID per word
    [[ -z $ids ]] || docker rm -f $ids >/dev/null 2>&1 || true
  done
  if ((rc != 0)) && [[ -n $SERVER_LOG && -f $SERVER_LOG ]]; then
    echo "--- server log" >&2
    cat "$SERVER_LOG" >&2 || true
  fi
}
