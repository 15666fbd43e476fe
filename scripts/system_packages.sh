#!/usr/bin/env bash
# Debian packages the tests use, installed when missing. One list for setup.sh and .ci/run.
#   bash scripts/system_packages.sh           # install what is missing (needs root + apt-get)
#   bash scripts/system_packages.sh --check   # only print what is missing
# Tests that need a package which is absent skip with a printed reason naming it.
set -euo pipefail
need=()
have() { command -v "$1" >/dev/null 2>&1; }
have mosquitto || need+=(mosquitto)                    # fleet tests: a private broker per session
have qemu-aarch64-static || need+=(qemu-user-static)   # aarch64 proof: run arm64 artifacts under emulation
have debootstrap || need+=(debootstrap)                # aarch64 proof: an arm64 root filesystem
have aarch64-linux-gnu-gcc || need+=(gcc-aarch64-linux-gnu)   # TVM cross-compiled artifacts
# the cross gcc alone cannot link: crti.o etc. come from the arm64 libc dev package
[ -e /usr/aarch64-linux-gnu/lib/crti.o ] || need+=(libc6-dev-arm64-cross)
have podman || need+=(podman)                          # container image tests (deploy/)
have runc || need+=(runc)                              # podman's runtime that works without CAP_SYS_RESOURCE
have systemd-analyze || need+=(systemd)                # `systemd-analyze verify` of the shipped units
have nats-server || need+=(nats-server)                # NATS cluster (MQTT gateway + JetStream) fail-over tests
have promtool || need+=(prometheus)                    # promtool rule tests + a real Prometheus scrape
for extra in ${EDGEML_EXTRA_DEBIAN_PACKAGES:-}; do
  dpkg -s "$extra" >/dev/null 2>&1 || need+=("$extra")
done
if [ ${#need[@]} -eq 0 ]; then
  echo "system packages: all present"
  exit 0
fi
if [ "${1:-}" = "--check" ]; then
  echo "system packages missing: ${need[*]}"
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! have apt-get; then
  echo "system packages missing: ${need[*]} (not root or no apt-get: install them yourself;" \
       "the tests that need them skip with the reason)"
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
echo "system packages installed: ${need[*]}"
