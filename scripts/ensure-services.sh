#!/usr/bin/env bash
# Install the Prometheus tooling and start the local PostgreSQL and Redis the integration tests use,
# each only when missing. These are the machine's own start commands (see the environment notes in README.md).
set -euo pipefail

# Debian's prometheus package ships the server and promtool: the alert-rule unit tests run promtool,
# the dashboard-query test runs a server on a free loopback port. The package's own service is not
# started (policy-rc.d answers 101 during the install), so nothing binds the default :9090.
install_prometheus() {
  export DEBIAN_FRONTEND=noninteractive
  local apt_opts=(-q -y -o DPkg::Lock::Timeout=600 -o Dpkg::Use-Pty=0)
  apt-get "${apt_opts[@]}" update && apt-get "${apt_opts[@]}" install --no-install-recommends prometheus
}
if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
  echo "installing prometheus (server + promtool) from Debian"
  own_policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    own_policy=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' >"$own_policy"
    chmod +x "$own_policy"
  fi
  log=$(mktemp)
  status=0
  install_prometheus >"$log" 2>&1 || status=$?
  if [ -n "$own_policy" ]; then rm -f "$own_policy"; fi
  if [ "$status" -ne 0 ]; then
    cat "$log" >&2
    echo "installing prometheus failed (apt-get exit $status)" >&2
    exit "$status"
  fi
  rm -f "$log"
fi
promtool --version >/dev/null

# Java for the Spark engine's tests (Debian's default-jre-headless)
bash "$(dirname "$0")/ensure-java.sh"

if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  echo "starting redis on 127.0.0.1:6379"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  for _ in $(seq 50); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 0.1; done
fi
redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null || { echo "redis is not answering on 127.0.0.1:6379" >&2; exit 1; }

if ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
  echo "starting postgresql on 127.0.0.1:5432"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main start
  for _ in $(seq 100); do pg_isready -h 127.0.0.1 -p 5432 -q && break; sleep 0.2; done
fi
pg_isready -h 127.0.0.1 -p 5432 -q || { echo "postgresql is not ready on 127.0.0.1:5432" >&2; exit 1; }
