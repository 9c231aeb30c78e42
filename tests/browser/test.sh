#!/usr/bin/env bash
# Browser test of the dashboard: Debian's chromium driven by playwright-core (which
# never downloads a browser). Starts the built server, deploys from the page, reloads
# mid-deployment, checks the log, the result and its endpoint link, and saves a
# screenshot under target/.
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
trap 'stevedore_cleanup $? "$app"; rm -rf "$data"' EXIT
stevedore_serve "$bin" "$data"
mkdir -p "$root/target"
node "$here/dashboard.mjs" "http://$HTTP_ADDR" "$app" "stevedore-test/web:1" "$root/target/dashboard.png"
