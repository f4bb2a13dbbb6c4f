#!/usr/bin/env bash
# Installs the Debian packages SPEAR builds against. Idempotent; run as root (or with sudo).
set -euo pipefail
PKGS=(
  build-essential cmake pkg-config
  nlohmann-json3-dev libcli11-dev libpcre2-dev libutf8proc-dev libopenblas-dev libeigen3-dev libfmt-dev libgd-dev
  libgtest-dev libbenchmark-dev libcpp-httplib-dev
)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  echo "installing: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
