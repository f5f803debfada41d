#!/usr/bin/env bash
# Installs the Debian packages pgsage's tests and benchmarks drive (idempotent; skips what is there).
set -euo pipefail

PACKAGES=(
  postgresql-15 postgresql-client-15 postgresql-15-hypopg  # server binaries for initdb'd test clusters
  pgbouncer                                               # the benchmark's baseline proxy
  libpostgresql-jdbc-java default-jdk-headless            # JDBC client tests
  nodejs npm                                              # node-postgres client tests
  prometheus                                              # promtool checks of /metrics and rules
  openssl                                                 # self-signed certificates for TLS tests
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# node and java may come from elsewhere than Debian: accept the commands being present
if command -v node >/dev/null && command -v npm >/dev/null; then
  missing=("${missing[@]/nodejs}"); missing=("${missing[@]/npm}")
fi
if command -v javac >/dev/null; then missing=("${missing[@]/default-jdk-headless}"); fi
read -r -a missing <<< "${missing[*]}"

if [ ${#missing[@]} -eq 0 ]; then
  echo "system-deps: all present"
  exit 0
fi
echo "system-deps: installing ${missing[*]}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q "${missing[@]}"
