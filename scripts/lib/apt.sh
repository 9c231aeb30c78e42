# shellcheck shell=bash
# Sourced by the environment scripts (test-env.sh, swarm-env.sh), which define `log`
# and `die` first.
#
#   apt_ensure PKG…
#       installs the Debian packages among PKG… that are not installed, without
#       letting their maintainer scripts start services (the scripts start what they
#       need themselves); dies naming the packages when apt-get fails.

apt_ensure() {
  local missing=() pkg made_policy=0 rc=0
  for pkg in "$@"; do
    [[ $(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null) == "install ok installed" ]] || missing+=("$pkg")
  done
  ((${#missing[@]})) || return 0
  log "installing apt packages: ${missing[*]}"
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && made_policy=1
  fi
  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"; } >&2 || rc=$?
  ((made_policy)) && rm -f /usr/sbin/policy-rc.d
  ((rc == 0)) || die "apt-get install ${missing[*]} failed (rc=$rc)"
}
