#!/usr/bin/env bash
# Stevedore quickstart: from a fresh Debian 12 machine (as root) to a deployed app.
#
#   bash scripts/quickstart.sh        install what is missing, build the release binary,
#                                     start the server in the background, build a demo
#                                     image, deploy it (v1, then v2) with live progress,
#                                     and print the URL that serves it
#   bash scripts/quickstart.sh stop   stop what it started and remove the demo app
#
# Running it twice is harmless: the server it started is reused and the demo app is
# deployed again. Packages, the Docker engine and the busybox base image come from
# `scripts/test-env.sh docker` (the test setup and this share one way of doing it).
#
# Settings (environment):
#   STEVEDORE_QUICKSTART_DIR   state: data dir, server log, pid file
#                              (default /var/tmp/stevedore-quickstart)
#   STEVEDORE_QUICKSTART_ADDR  gRPC address of the server (default 127.0.0.1:50051)
#   STEVEDORE_QUICKSTART_HTTP  its HTTP address (/healthz, /metrics; default 127.0.0.1:50052)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

BASE_IMAGE=stevedore-test/base:1

QS_DIR=${STEVEDORE_QUICKSTART_DIR:-/var/tmp/stevedore-quickstart}
QS_ADDR=${STEVEDORE_QUICKSTART_ADDR:-127.0.0.1:50051}
QS_HTTP=${STEVEDORE_QUICKSTART_HTTP:-127.0.0.1:50052}
QS_APP=quickstart-hello
QS_IMAGE=stevedore-quickstart/hello
QS_BIN=$PWD/target/release/stevedore
QS_PIDFILE=$QS_DIR/server.pid
QS_LOG=$QS_DIR/server.log
QS_DATA=$QS_DIR/data
export STEVEDORE_ADDR=http://$QS_ADDR
unset STEVEDORE_TOKEN STEVEDORE_OUTPUT

if [[ -t 1 && -z ${NO_COLOR:-} ]]; then
  say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
else
  say() { printf '\n==> %s\n' "$*"; }
fi
die() {
  printf 'quickstart: %s\n' "$*" >&2
  exit 1
}

server_answers() { curl -fsS -m 2 -o /dev/null "http://$QS_HTTP/healthz" 2>/dev/null; }
docker_ok() { timeout 10 docker info >/dev/null 2>&1; }

# pid_alive PIDFILE: prints the pid if that process is alive and is a stevedore server.
pid_alive() {
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ && $(cat "/proc/$pid/comm" 2>/dev/null) == stevedore* ]] || return 1
  echo "$pid"
}

# stop_server: SIGTERM to the server this script started (it finishes or rolls back
# running deployments), SIGKILL after 60 s.
stop_server() {
  local pid i
  pid=$(pid_alive "$QS_PIDFILE") || return 0
  echo "stopping the stevedore server (pid $pid)"
  kill -TERM "$pid"
  for ((i = 0; i < 120; i++)); do
    [[ -d /proc/$pid ]] || return 0
    sleep 0.5
  done
  kill -KILL "$pid"
}

qs_stop() {
  local ids
  stop_server
  if command -v docker >/dev/null 2>&1 && docker_ok; then
    ids=$(docker ps -aq --filter "label=io.stevedore.app=$QS_APP")
    if [[ -n $ids ]]; then
      echo "removing the demo app's containers"
      # shellcheck disable=SC2086 # one ID per word
      docker rm -f $ids >/dev/null
    fi
    docker rmi "$QS_IMAGE:1" "$QS_IMAGE:2" >/dev/null 2>&1 || true
  fi
  # A Docker engine the quickstart started itself is stopped too.
  if [[ -f $QS_DIR/engine-started ]]; then
    bash scripts/test-env.sh down
  fi
  rm -rf "$QS_DIR"
  echo "quickstart stopped: server, demo app and $QS_DIR removed"
}

if [[ ${1:-} == stop ]]; then
  qs_stop
  exit 0
elif [[ -n ${1:-} ]]; then
  echo "usage: bash scripts/quickstart.sh [stop]" >&2
  exit 2
fi

# --- 1. what is missing: packages, the Docker engine, the busybox base image
say "installing what is missing and starting the Docker engine (scripts/test-env.sh)"
mkdir -p "$QS_DIR"
# Remember a Docker engine started here, for `stop`.
if ! command -v docker >/dev/null 2>&1 || ! docker_ok; then
  touch "$QS_DIR/engine-started"
fi
bash scripts/test-env.sh docker || die "could not start the Docker engine or build the base image"

# --- 2. the release binary
say "building the release binary (cargo build --release)"
if ! command -v cargo >/dev/null 2>&1; then
  [[ -x $HOME/.cargo/bin/cargo ]] && export PATH=$HOME/.cargo/bin:$PATH
fi
command -v cargo >/dev/null 2>&1 ||
  die "cargo not found: install a Rust toolchain (1.94 or newer, e.g. with rustup) and run this again"
cargo build --release --bin stevedore

# --- 3. the server, in the background
if pid=$(pid_alive "$QS_PIDFILE") && server_answers; then
  say "the server started earlier is running (pid $pid)"
elif server_answers; then
  say "a Stevedore server already answers on $QS_HTTP; using it (not stopped by 'stop')"
else
  say "starting the server: gRPC on $QS_ADDR, HTTP on $QS_HTTP"
  mkdir -p "$QS_DATA"
  NO_COLOR=1 setsid "$QS_BIN" serve --listen "$QS_ADDR" --http-listen "$QS_HTTP" \
    --data-dir "$QS_DATA" </dev/null >>"$QS_LOG" 2>&1 &
  pid=$!
  echo "$pid" >"$QS_PIDFILE"
  for _ in $(seq 100); do
    server_answers && break
    [[ -d /proc/$pid ]] || { tail -n 20 "$QS_LOG" >&2; die "the server exited (log: $QS_LOG)"; }
    sleep 0.1
  done
  server_answers || { tail -n 20 "$QS_LOG" >&2; die "the server does not answer (log: $QS_LOG)"; }
fi
echo "server pid $(cat "$QS_PIDFILE" 2>/dev/null || echo '?')"
echo "  data dir: $QS_DATA"
echo "  log file: $QS_LOG"

# --- 4. a demo image, built locally FROM the busybox base image
say "building the demo image $QS_IMAGE:1 and :2 (FROM $BASE_IMAGE)"
mkdir -p "$QS_DIR/image"
cat >"$QS_DIR/image/Dockerfile" <<'EOF'
FROM stevedore-test/base:1
ARG VERSION=1
RUN mkdir -p /var/www && printf '<h1>Hello from Stevedore</h1>\n<p>version %s</p>\n' "$VERSION" >/var/www/index.html
EXPOSE 8080
# Prints a few start-up steps (the deploy follows them as milestones), then serves
# /var/www with busybox httpd; the shell stops at once on SIGTERM.
CMD ["sh", "-c", "for i in 1 2 3; do echo \"warming up caches $i/3\"; sleep 0.4; done; echo ready; trap 'kill $p; wait $p 2>/dev/null; exit 0' TERM INT; httpd -f -p 8080 -h /var/www & p=$!; wait $p"]
EOF
for v in 1 2; do
  DOCKER_BUILDKIT=0 docker build -q --build-arg "VERSION=$v" -t "$QS_IMAGE:$v" "$QS_DIR/image" >/dev/null
done

# --- 5. deploy it, then a second version
deploy() {
  "$QS_BIN" deploy "$QS_APP" "$QS_IMAGE:$1" --port 8080 --health http:8080/ \
    --milestone 'caches 1/3=0.3:warming up caches' \
    --milestone 'caches 3/3=0.8:caches warm' \
    --milestone '^ready$=1.0:ready'
}
say "stevedore deploy $QS_APP $QS_IMAGE:1"
deploy 1 || die "the deployment of v1 failed (exit $?); server log: $QS_LOG"
say "stevedore deploy $QS_APP $QS_IMAGE:2 (the new version goes live once healthy; v1 serves until then)"
deploy 2 || die "the deployment of v2 failed (exit $?); server log: $QS_LOG"

url=$("$QS_BIN" list --app "$QS_APP" --state succeeded --limit 1 --output json |
  sed -n 's|.*"8080/tcp":"\(http://[^"]*\)".*|\1|p')
[[ -n $url ]] || die "no endpoint found for $QS_APP"

say "done"
echo "The demo app serves at $url"
echo "  curl $url"
echo
echo "Try the client (export PATH=\"$PWD/target/release:\$PATH\"):"
echo "  stevedore list --app $QS_APP"
echo "  stevedore deploy $QS_APP $QS_IMAGE:1     # roll back to v1"
echo "  stevedore deploy --help"
echo
echo "Stop everything (server, demo app): bash scripts/quickstart.sh stop"
