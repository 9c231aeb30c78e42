#!/usr/bin/env bash
# Browser test of the dashboard: Debian's chromium driven by playwright-core (which
# never downloads a browser). Starts the built server with auth on (a read-only and a
# deploy token), deploys from the page, reloads mid-deployment, checks the log, the
# result and its endpoint link, saves a screenshot under target/, checks that Cancel
# and Remove are shown only to the deploy token, cancels, and removes the app from the
# page following the removal to its end.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
# shellcheck source=../../scripts/lib/serve.sh
source "$root/scripts/lib/serve.sh"

if [[ ! -x /usr/bin/chromium ]]; then
  apt-get install -y chromium >/dev/null
fi
(cd "$here" && npm ci --no-audit --no-fund >/dev/null)

bin=$(stevedore_binary)
data=$(mktemp -d)
app="t-browser-$(head -c4 /dev/urandom | od -An -tx1 | tr -d ' \n')"
trap 'stevedore_cleanup $? "$app" "$app-s"; rm -rf "$data"' EXIT
mkdir -p "$data"
# A token: its secret on stdout, its entry appended to the tokens file.
token() {
  local out
  out=$("$bin" token new "$1" --scope "$2")
  sed -n '/^\[\[token\]\]/,$p' <<<"$out" >>"$data/tokens.toml"
  sed -n 2p <<<"$out"
}
viewer=$(token viewer read)
ci=$(token ci deploy)
stevedore_serve "$bin" "$data" --tokens-file "$data/tokens.toml"
mkdir -p "$root/target"
READ_TOKEN=$viewer DEPLOY_TOKEN=$ci node "$here/dashboard.mjs" "http://$HTTP_ADDR" "$app" "stevedore-test/web:1" "$root/target/dashboard.png"
