#!/usr/bin/env bash
# Stevedore swarm test environment: a three-node Docker Swarm on this one machine.
#
#   bash scripts/swarm-env.sh up      start what is missing (idempotent); prints `export`
#                                     lines on stdout, logs go to stderr:
#                                       eval "$(bash scripts/swarm-env.sh up)"
#   bash scripts/swarm-env.sh env     the same `export` lines, without starting anything
#   bash scripts/swarm-env.sh status  what is up (exit 0 only with every node Ready)
#   bash scripts/swarm-env.sh down    stop what `up` started (down --purge also deletes
#                                     the nodes' data roots /var/lib/stv-n1..3)
#
# `up` first installs what is missing (apt: socat iproute2 util-linux curl) and runs
# `scripts/test-env.sh up` (docker.io, the registries, the test images).
# What `up` creates (root; all names start with `stv-`, see docs/SWARM.md):
#   * network namespaces stv-fab (bridge br0) and stv-n1, stv-n2, stv-n3; each node has
#     eth0 = 10.77.0.11/12/13 on the bridge. The host gets a veth `stv-host` into the
#     bridge with 10.77.0.1/24, so the host (tests, Stevedore) reaches ports the nodes
#     publish at 10.77.0.1X directly.
#   * one dockerd per node, started with `nsenter --net=/run/netns/stv-nX` (not
#     `ip netns exec`, which remounts /sys and hides the cgroup v1 hierarchy) and its own
#     UTS namespace (hostname stv-nX = the swarm node name); own data root
#     /var/lib/stv-nX, exec root /run/stv-nX, pid file /run/stv-nX.pid, socket
#     /run/stv-nX.sock, containerd namespace stv-nX, cgroup parent /stv-nX, config file
#     and log in $STV_STATE (/run/stv-swarm) and $STV_LOGS (/var/log/stv-swarm).
#   * a swarm: stv-n1 manager (10.77.0.11:2377), stv-n2 and stv-n3 workers.
#   * registry relays (socat): the host relays the unix sockets /run/stv-reg-5000.sock
#     and /run/stv-reg-5001.sock to the registries on 127.0.0.1:5000 / :5001, and each node
#     listens on its own 127.0.0.1:5000 / :5001 and forwards to those sockets, so an image
#     reference 127.0.0.1:5000/... means the same image on the host and on every node.
#   * the swarm test images, pushed from the host engine to 127.0.0.1:5000 (see
#     SWARM_IMAGES below; built by scripts/test-env.sh from tests/images).
#
# This kernel has no IPVS, so the routing mesh (ingress, VIP) cannot work here: services
# publish ports in host mode with endpoint mode dnsrr.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE=${STV_STATE:-/run/stv-swarm}
LOGS=${STV_LOGS:-/var/log/stv-swarm}
NODES=(1 2 3)
SUBNET_PREFIX=10.77.0
HOST_ADDR=$SUBNET_PREFIX.1
MANAGER_ADDR=$SUBNET_PREFIX.11
FABRIC=stv-fab
HOST_LINK=stv-host
# Overlay networks the swarm allocates stay clear of the fabric's 10.77.0.0/24.
ADDR_POOL=10.200.0.0/16
REGISTRY_PORTS=(5000 5001)
REGISTRY=127.0.0.1:5000

# Images the swarm tests use: "<env var suffix>|<host image>|<registry name>".
SWARM_IMAGES=(
  "WEB_V1|stevedore-test/web:1|$REGISTRY/stevedore-test/web:1"
  "WEB_V2|stevedore-test/web:2|$REGISTRY/stevedore-test/web:2"
  "CRASH|stevedore-test/crash:1|$REGISTRY/stevedore-test/crash:1"
  "UNHEALTHY|stevedore-test/unhealthy:1|$REGISTRY/stevedore-test/unhealthy:1"
  "SLOWHEALTH|stevedore-test/slowhealth:1|$REGISTRY/stevedore-test/slowhealth:1"
  "PLAIN|stevedore-test/plain:1|$REGISTRY/stevedore-test/plain:1"
)

T0=${EPOCHREALTIME/./}
# Log lines carry the seconds since the script started.
log() {
  local d=$((${EPOCHREALTIME/./} - T0))
  printf '[swarm-env %d.%01ds] %s\n' $((d / 1000000)) $((d % 1000000 / 100000)) "$*" >&2
}
die() {
  printf '[swarm-env] ERROR: %s\n' "$*" >&2
  exit 1
}
# shellcheck source=scripts/lib/apt.sh
source "$ROOT/scripts/lib/apt.sh"

node_ns() { echo "stv-n$1"; }
node_addr() { echo "$SUBNET_PREFIX.1$1"; }
node_sock() { echo "/run/stv-n$1.sock"; }
# ndocker N ARGS...: the docker CLI against node N, bounded.
ndocker() {
  local n=$1
  shift
  timeout 30 docker -H "unix://$(node_sock "$n")" "$@"
}
node_ok() { ndocker "$1" version --format '{{.Server.Version}}' >/dev/null 2>&1; }
# proc_alive PID: the process runs (a zombie counts as gone: the daemons are reparented
# to PID 1 once `up` returns, and it may be slow to reap them).
proc_alive() {
  local stat
  [[ -n $1 ]] && stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [[ ${stat%% *} != Z ]]
}
# Every pid file here names a socat relay or a dockerd (nsenter, unshare and sh exec
# them). A pid file left by an earlier boot or session may name a PID reused since by
# some other process: that one is neither alive for us nor ours to kill.
proc_ours() {
  proc_alive "$1" && tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null | grep -qE '(^|/)(socat|dockerd) '
}
pid_alive() { [[ -f $1 ]] && proc_ours "$(cat "$1")"; }

# ---------------------------------------------------------------------------- provision
provision() {
  # socat: the registry relays; iproute2: ip netns/link; util-linux: nsenter, unshare.
  apt_ensure socat iproute2 util-linux curl
  local c
  for c in socat ip nsenter unshare curl; do
    command -v "$c" >/dev/null || die "$c not found after provisioning"
  done
}

# ---------------------------------------------------------------------------- network
ns_exists() { [[ -e /run/netns/$1 ]]; }
in_ns() {
  local ns=$1
  shift
  nsenter --net="/run/netns/$ns" "$@"
}

ensure_ns() {
  if ! ns_exists "$1"; then
    ip netns add "$1"
  fi
  in_ns "$1" ip link set lo up
}

# ensure_fabric_port NS INNER LINK: a veth with one end named INNER in namespace NS
# ("host" for the host's) and the other named LINK in the fabric, on br0. A pair with
# one end missing (say, the fabric was deleted) is made again.
ensure_fabric_port() {
  local ns=$1 inner=$2 link=$3 in_inner=(in_ns "$1")
  [[ $ns == host ]] && in_inner=()
  if "${in_inner[@]}" ip link show "$inner" >/dev/null 2>&1 &&
    in_ns "$FABRIC" ip link show "$link" >/dev/null 2>&1; then
    :
  else
    "${in_inner[@]}" ip link del "$inner" 2>/dev/null || true
    in_ns "$FABRIC" ip link del "$link" 2>/dev/null || true
    ip link del "$link-x" 2>/dev/null || true
    ip link add "$link-x" type veth peer name "$link"
    ip link set "$link" netns "$FABRIC"
    if [[ $ns != host ]]; then ip link set "$link-x" netns "$ns"; fi
    "${in_inner[@]}" ip link set "$link-x" name "$inner"
  fi
  in_ns "$FABRIC" ip link set "$link" master br0
  in_ns "$FABRIC" ip link set "$link" up
}

net_up() {
  local n ns
  ensure_ns "$FABRIC"
  in_ns "$FABRIC" ip link show br0 >/dev/null 2>&1 || in_ns "$FABRIC" ip link add br0 type bridge
  in_ns "$FABRIC" ip link set br0 up
  ensure_fabric_port host "$HOST_LINK" h-b
  ip addr replace "$HOST_ADDR/24" dev "$HOST_LINK"
  ip link set "$HOST_LINK" up
  for n in "${NODES[@]}"; do
    ns=$(node_ns "$n")
    ensure_ns "$ns"
    ensure_fabric_port "$ns" eth0 "n$n-b"
    in_ns "$ns" ip addr replace "$(node_addr "$n")/24" dev eth0
    in_ns "$ns" ip link set eth0 up
    in_ns "$ns" ip route replace default via "$HOST_ADDR" dev eth0
  done
}

# ---------------------------------------------------------------------------- processes
# start_bg NAME CMD...: runs CMD in its own session, pid in $STATE/NAME.pid, output in
# $LOGS/NAME.log, unless that pid is alive already. Never inherits the lock (fd 8).
start_bg() {
  local name=$1 pidfile=$STATE/$1.pid i
  shift
  if pid_alive "$pidfile"; then return 0; fi
  rm -f "$pidfile"
  # shellcheck disable=SC2016  # expanded by the inner bash
  setsid bash -c 'echo $$ >"$0" && exec "$@"' "$pidfile" "$@" </dev/null >>"$LOGS/$name.log" 2>&1 8>&- &
  for ((i = 0; i < 100; i++)); do
    [[ -s $pidfile ]] && return 0
    sleep 0.05
  done
  die "could not start $name"
}

relays_up() {
  local port n sock
  for port in "${REGISTRY_PORTS[@]}"; do
    sock=/run/stv-reg-$port.sock
    if ! pid_alive "$STATE/relay-host-$port.pid"; then
      rm -f "$sock"
      start_bg "relay-host-$port" socat "UNIX-LISTEN:$sock,fork,mode=600" "TCP:127.0.0.1:$port"
    fi
    for n in "${NODES[@]}"; do
      start_bg "relay-n$n-$port" nsenter --net="/run/netns/$(node_ns "$n")" \
        socat "TCP-LISTEN:$port,bind=127.0.0.1,fork,reuseaddr" "UNIX-CONNECT:$sock"
    done
  done
}

node_config() {
  local n=$1
  cat >"$STATE/n$n.json" <<EOF
{
  "data-root": "/var/lib/stv-n$n",
  "exec-root": "/run/stv-n$n",
  "pidfile": "/run/stv-n$n.pid",
  "hosts": ["unix:///run/stv-n$n.sock"],
  "containerd-namespace": "stv-n$n",
  "containerd-plugins-namespace": "stv-n${n}p",
  "cgroup-parent": "/stv-n$n",
  "storage-driver": "overlay2",
  "log-level": "info",
  "log-opts": {"max-size": "5m", "max-file": "2"}
}
EOF
}

# One dockerd per node, in the node's network namespace and its own UTS namespace
# (hostname stv-nN, which the swarm shows as the node name).
dockerd_up() {
  local n ns i pending=()
  for n in "${NODES[@]}"; do
    node_ok "$n" && continue
    ns=$(node_ns "$n")
    # A dockerd from an earlier run that still owns the pid file: let it finish starting.
    if ! pid_alive "/run/stv-n$n.pid" && ! pid_alive "$STATE/dockerd-n$n.pid"; then
      node_config "$n"
      mkdir -p "/var/lib/stv-n$n"
      rm -f "/run/stv-n$n.sock" "/run/stv-n$n.pid"
      [[ -f $LOGS/dockerd-n$n.log ]] && mv -f "$LOGS/dockerd-n$n.log" "$LOGS/dockerd-n$n.log.1"
      log "starting dockerd stv-n$n (log: $LOGS/dockerd-n$n.log)"
      # shellcheck disable=SC2016  # expanded by the inner sh
      start_bg "dockerd-n$n" nsenter --net="/run/netns/$ns" unshare --uts \
        sh -c 'hostname "$0" && exec dockerd --config-file "$1"' "$ns" "$STATE/n$n.json"
    fi
    pending+=("$n")
  done
  for n in "${pending[@]}"; do
    for ((i = 0; i < 120; i++)); do
      node_ok "$n" && break
      pid_alive "$STATE/dockerd-n$n.pid" || pid_alive "/run/stv-n$n.pid" ||
        { tail -n 30 "$LOGS/dockerd-n$n.log" >&2; die "dockerd stv-n$n exited"; }
      sleep 0.5
    done
    node_ok "$n" || { tail -n 30 "$LOGS/dockerd-n$n.log" >&2; die "dockerd stv-n$n did not answer within 60s"; }
    log "dockerd stv-n$n answers"
  done
}

# ---------------------------------------------------------------------------- swarm
swarm_state() { ndocker "$1" info --format '{{.Swarm.LocalNodeState}}' 2>/dev/null || echo unknown; }
node_id() { ndocker "$1" info --format '{{.Swarm.NodeID}}' 2>/dev/null; }
# ready_nodes: the number of nodes stv-n1 lists as Ready.
ready_nodes() { ndocker 1 node ls --format '{{.Status}}' 2>/dev/null | grep -c '^Ready$' || true; }

swarm_up() {
  local n id token ids i
  if [[ $(swarm_state 1) != active ]] ||
    [[ $(ndocker 1 info --format '{{.Swarm.ControlAvailable}}' 2>/dev/null) != true ]]; then
    [[ $(swarm_state 1) == inactive ]] || ndocker 1 swarm leave --force >/dev/null 2>&1 || true
    log "swarm init on stv-n1 ($MANAGER_ADDR)"
    ndocker 1 swarm init --advertise-addr "$MANAGER_ADDR" --listen-addr "$MANAGER_ADDR:2377" \
      --default-addr-pool "$ADDR_POOL" >/dev/null || die "swarm init failed"
  fi
  token=$(ndocker 1 swarm join-token -q worker) || die "no worker join token"
  ids=$(ndocker 1 node ls -q)
  for n in "${NODES[@]:1}"; do
    id=$(node_id "$n")
    if [[ $(swarm_state "$n") == active && -n $id ]] && grep -qx "$id" <<<"$ids"; then
      continue
    fi
    [[ $(swarm_state "$n") == inactive ]] || ndocker "$n" swarm leave --force >/dev/null 2>&1 || true
    log "stv-n$n joins the swarm"
    ndocker "$n" swarm join --token "$token" --advertise-addr "$(node_addr "$n")" \
      --listen-addr "$(node_addr "$n"):2377" "$MANAGER_ADDR:2377" >/dev/null || die "stv-n$n: swarm join failed"
  done
  # Entries left by earlier joins of the same daemons (now down) would count as nodes.
  for id in $(ndocker 1 node ls --format '{{.ID}} {{.Status}}' | awk '$2 == "Down" {print $1}'); do
    log "removing stale node $id"
    ndocker 1 node rm --force "$id" >/dev/null || true
  done
  for ((i = 0; i < 120; i++)); do
    [[ $(ready_nodes) == "${#NODES[@]}" ]] && break
    sleep 0.5
  done
  [[ $(ready_nodes) == "${#NODES[@]}" ]] || { ndocker 1 node ls >&2 || true; die "the swarm has not 3 Ready nodes after 60s"; }
  log "swarm: ${#NODES[@]} nodes Ready"
}

# ---------------------------------------------------------------------------- images
# Pushes each swarm test image to the registry unless the registry already holds the
# same image (its manifest names the local image ID as config).
push_images() {
  local spec var local_ref ref id repo tag have
  for spec in "${SWARM_IMAGES[@]}"; do
    IFS='|' read -r var local_ref ref <<<"$spec"
    id=$(docker image inspect -f '{{.Id}}' "$local_ref" 2>/dev/null) || die "$local_ref missing on the host engine (scripts/test-env.sh up builds it)"
    repo=${ref#*/}
    tag=${repo##*:}
    repo=${repo%:*}
    have=$(curl -fs -m 5 -H 'Accept: application/vnd.docker.distribution.manifest.v2+json' \
      "http://$REGISTRY/v2/$repo/manifests/$tag" 2>/dev/null | tr -d ' \n' | grep -o '"config":{[^}]*}' | grep -o 'sha256:[0-9a-f]*' || true)
    if [[ $have == "$id" ]]; then continue; fi
    log "pushing $ref"
    docker tag "$local_ref" "$ref"
    docker push -q "$ref" >/dev/null || die "push of $ref failed"
  done
}

# Every node pulls the web image through its relay: proves the registry path.
check_pulls() {
  local n ref=$REGISTRY/stevedore-test/web:1
  for n in "${NODES[@]}"; do
    ndocker "$n" pull -q "$ref" >/dev/null 2>"$STATE/pull.err" ||
      { cat "$STATE/pull.err" >&2; die "stv-n$n cannot pull $ref through its registry relay"; }
  done
  log "every node pulls $ref"
}

# ---------------------------------------------------------------------------- commands
print_env() {
  local spec var local_ref ref n nodes=() socks=()
  for n in "${NODES[@]}"; do
    nodes+=("$(node_addr "$n")")
    socks+=("unix://$(node_sock "$n")")
  done
  printf 'export STEVEDORE_TEST_SWARM_MANAGER=unix://%s\n' "$(node_sock 1)"
  printf 'export STEVEDORE_TEST_SWARM_NODES=%s\n' "$(
    IFS=,
    echo "${nodes[*]}"
  )"
  printf 'export STEVEDORE_TEST_SWARM_SOCKETS=%s\n' "$(
    IFS=,
    echo "${socks[*]}"
  )"
  for spec in "${SWARM_IMAGES[@]}"; do
    IFS='|' read -r var local_ref ref <<<"$spec"
    printf 'export STEVEDORE_TEST_SWARM_IMAGE_%s=%s\n' "$var" "$ref"
  done
}

up() {
  provision
  log "host test environment (scripts/test-env.sh up)"
  # It installs docker.io (dockerd, the docker CLI) on a fresh machine.
  bash "$ROOT/scripts/test-env.sh" up >/dev/null 8>&- || die "scripts/test-env.sh up failed"
  net_up
  relays_up
  dockerd_up
  swarm_up
  push_images
  check_pulls
  print_env
}

status() {
  local n name pid
  for name in "$FABRIC" stv-n1 stv-n2 stv-n3; do
    ns_exists "$name" && echo "netns $name: present" || echo "netns $name: absent"
  done
  if ip -br addr show "$HOST_LINK" 2>/dev/null | grep -q "$HOST_ADDR/"; then
    echo "host link $HOST_LINK: $HOST_ADDR/24"
  else echo "host link $HOST_LINK: absent"; fi
  for name in "$STATE"/relay-*.pid; do
    [[ -e $name ]] || continue
    pid=$(cat "$name")
    proc_alive "$pid" && echo "$(basename "$name" .pid): pid $pid" || echo "$(basename "$name" .pid): dead"
  done
  for n in "${NODES[@]}"; do
    if node_ok "$n"; then
      echo "dockerd stv-n$n: up on $(node_sock "$n") (pid $(cat "/run/stv-n$n.pid" 2>/dev/null)), swarm $(swarm_state "$n")"
    else echo "dockerd stv-n$n: down"; fi
  done
  if node_ok 1; then ndocker 1 node ls 2>/dev/null || true; fi
  # Exit status: 0 only when the swarm is whole.
  [[ $(ready_nodes) == "${#NODES[@]}" ]]
}

# kill_pidfile FILE: TERM the pid in FILE, KILL after 30s; removes FILE.
kill_pidfile() {
  local pid i
  [[ -f $1 ]] || return 0
  pid=$(cat "$1")
  rm -f "$1"
  proc_ours "$pid" || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < 300; i++)); do
    proc_alive "$pid" || return 0
    sleep 0.1
  done
  log "pid $pid ignored SIGTERM for 30s, killing it"
  kill -KILL "$pid" 2>/dev/null || true
}

# node_leftovers N: pids in node N's cgroup parent (v1 or v2) and its containerd shims.
node_leftovers() {
  local n=$1 p cmd
  find /sys/fs/cgroup/*/"stv-n$n" /sys/fs/cgroup/"stv-n$n" -name cgroup.procs -exec cat {} + 2>/dev/null | sort -u
  for p in /proc/[0-9]*; do
    cmd=$({ tr '\0' ' ' <"$p/cmdline"; } 2>/dev/null) || continue
    if [[ $cmd == *containerd-shim*" -namespace stv-n$n "* ]]; then echo "${p#/proc/}"; fi
  done
}

down() {
  local purge=${1:-} n f left i killed=()
  # Services first (their tasks stop with them), then each node leaves, workers first.
  if node_ok 1 && [[ $(swarm_state 1) == active ]]; then
    ndocker 1 service ls -q | xargs -r timeout 30 docker -H "unix://$(node_sock 1)" service rm >/dev/null 2>&1 || true
  fi
  for n in 3 2 1; do
    if node_ok "$n" && [[ $(swarm_state "$n") != inactive ]]; then
      log "stv-n$n leaves the swarm"
      ndocker "$n" swarm leave --force >/dev/null 2>&1 || true
    fi
  done
  for n in "${NODES[@]}"; do
    if pid_alive "/run/stv-n$n.pid" || pid_alive "$STATE/dockerd-n$n.pid"; then log "stopping dockerd stv-n$n"; fi
    # The dockerd pid file and the wrapper's name the same process (nsenter, unshare and
    # sh all exec); stop them in parallel, then wait.
    kill_pidfile "/run/stv-n$n.pid" &
  done
  wait
  for n in "${NODES[@]}"; do kill_pidfile "$STATE/dockerd-n$n.pid"; done
  for f in "$STATE"/relay-*.pid; do [[ -e $f ]] && kill_pidfile "$f"; done
  rm -f /run/stv-reg-*.sock
  # A dockerd that was killed (kill -9) leaves its containers running, with their shims:
  # kill what sits in the node's cgroup parent and the shims of its containerd namespace.
  for n in "${NODES[@]}"; do
    left=$(node_leftovers "$n")
    [[ -n $left ]] || continue
    killed+=("$n")
    log "killing what the killed dockerd stv-n$n left: pids ${left//$'\n'/ }"
    # shellcheck disable=SC2086  # one pid a word
    kill -KILL $left 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
      [[ -z $(node_leftovers "$n") ]] && break
      sleep 0.1
    done
  done
  # Mounts a killed dockerd may leave (netns bind mounts, overlay layers).
  for n in "${NODES[@]}"; do
    # (dockerd also bind-mounts its data root onto itself, for mount propagation.)
    awk -v a="/run/stv-n$n" -v b="/var/lib/stv-n$n" \
      '$2 == a || $2 == b || index($2, a "/") == 1 || index($2, b "/") == 1 {print $2}' /proc/self/mounts |
      sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
    rm -f "/run/stv-n$n.sock"
    # Empty cgroup directories under each node's cgroup parent (v1 and v2).
    find /sys/fs/cgroup/*/"stv-n$n" /sys/fs/cgroup/"stv-n$n" -depth -type d -exec rmdir {} + 2>/dev/null || true
    # The swarm is gone: a node must not start in it again (a node that never left would
    # wait ~20 s at start for a manager that is not there).
    rm -rf "/var/lib/stv-n$n/swarm"
  done
  # A killed node's data root holds the dead containers of its tasks: start it afresh.
  for n in "${killed[@]}"; do
    log "removing the data root of stv-n$n (its dockerd was killed)"
    rm -rf "/var/lib/stv-n$n"
  done
  ip link del "$HOST_LINK" 2>/dev/null || true
  for n in "${NODES[@]}"; do
    if ns_exists "stv-n$n"; then ip netns del "stv-n$n"; fi
  done
  if ns_exists "$FABRIC"; then ip netns del "$FABRIC"; fi
  if [[ $purge == --purge ]]; then
    for n in "${NODES[@]}"; do rm -rf "/var/lib/stv-n$n" "/run/stv-n$n"; done
    log "data roots removed"
  fi
  log "down"
}

[[ $(id -u) == 0 ]] || die "run as root (network namespaces, dockerd)"
mkdir -p "$STATE" "$LOGS"
exec 8>"$STATE/lock"
flock -w 600 8 || die "could not lock $STATE/lock within 600s"
case "${1:-}" in
up) up ;;
env) print_env ;;
status) status ;;
down) down "${2:-}" ;;
*) die "usage: $0 up|env|status|down [--purge]" ;;
esac
