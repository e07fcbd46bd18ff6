#!/usr/bin/env bash
# Make sure the system programs the local stack needs are installed.
# As root, missing Debian packages are installed; otherwise the exact command is printed.
set -euo pipefail

missing=()
command -v python3 >/dev/null || missing+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
command -v java >/dev/null || missing+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || missing+=(maven)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
command -v runuser >/dev/null || missing+=(util-linux)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx)
ls /usr/lib/nginx/modules/ngx_http_js_module.so >/dev/null 2>&1 || missing+=(libnginx-mod-http-js)
command -v wrk >/dev/null || missing+=(wrk)
# The edge's local TLS certificate (FLASHSALE_HTTPS_PORT).
command -v openssl >/dev/null || missing+=(openssl)
# The benchmark's baselines: Redis (redis-server, redis-benchmark); pgbench comes with postgresql.
command -v redis-server >/dev/null || missing+=(redis-server)
# The live sale page's browser test (headless; no browser is downloaded at run time).
command -v chromium >/dev/null || missing+=(chromium)
for pkg in "$@"; do  # optional extras, e.g. nginx
  command -v "$pkg" >/dev/null || missing+=("$pkg")
done

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Debian's postgresql package starts a system cluster on 5432; the project never uses it.
  exit 0
fi
echo "setup: missing system packages: ${missing[*]}" >&2
echo "setup: install them with: sudo apt-get install -y ${missing[*]}" >&2
exit 1
