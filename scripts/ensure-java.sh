#!/usr/bin/env bash
# The Spark feature engine (`fraud features build --engine spark`, the Feast Spark profile) runs on a
# Java 17+ runtime from Debian's packages: install default-jre-headless when no `java` is on the PATH.
set -euo pipefail
if command -v java >/dev/null 2>&1; then
  exit 0
fi
echo "installing a Java runtime (default-jre-headless) from Debian for the Spark engine"
export DEBIAN_FRONTEND=noninteractive
apt_opts=(-q -y -o DPkg::Lock::Timeout=600 -o Dpkg::Use-Pty=0)
log=$(mktemp)
status=0
{ apt-get "${apt_opts[@]}" update && apt-get "${apt_opts[@]}" install --no-install-recommends default-jre-headless; } \
  >"$log" 2>&1 || status=$?
if [ "$status" -ne 0 ]; then
  cat "$log" >&2
  echo "installing default-jre-headless failed (apt-get exit $status)" >&2
  exit "$status"
fi
rm -f "$log"
java -version >/dev/null 2>&1 || { echo "java does not run after installing default-jre-headless" >&2; exit 1; }
