#!/usr/bin/env bash
# Install settle and its test tooling: Debian packages (Prometheus/promtool, FUSE, systemd-analyze, iptables, iproute2) and
# Python packages.
# Idempotent; skips apt-get when the packages are already there.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
command -v fusermount3 >/dev/null 2>&1 || need_apt+=(fuse3)
command -v systemd-analyze >/dev/null 2>&1 || need_apt+=(systemd)  # verifies ops/systemd/ units in the tests
command -v iptables >/dev/null 2>&1 || need_apt+=(iptables)  # engine/verify/netns.py: partitions, loss, delay between hosts
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)  # engine/verify/netns.py: namespaces, links
if [ "${#need_apt[@]}" -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "install.sh: need root to apt-get install ${need_apt[*]}" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
# The Prometheus package starts a server on :9090 as a service; tests start their own on free ports.
if command -v systemctl >/dev/null 2>&1; then systemctl stop prometheus >/dev/null 2>&1 || true; fi

python3 -m pip install -q --disable-pip-version-check -e ".[test]"
