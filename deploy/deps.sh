#!/usr/bin/env bash
# Install the Debian packages vmgate needs, only those missing. apt-get update runs once, and only
# when something is missing. Uses sudo when not root.
set -euo pipefail
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"

PACKAGES=(
    qemu-system-x86 qemu-utils              # the local driver's VMs
    iproute2 nftables dnsmasq-base          # their networks (drivers/local/network.py)
    containernetworking-plugins iptables    # a fleet node's CNI network (tests/test_fleet_network.py, with nomad)
    postgresql redis-server nginx           # the servers make run starts
    prometheus                              # make run's monitoring; promtool checks its rules in make test
    busybox-static e2fsprogs cpio zstd xz-utils   # images/build-tiny.sh
    mmdebstrap                              # images/build-debian.sh
    grub-common grub-pc-bin                 # images/lib.sh: the boot loader every image boots through
    python3 python3-venv                    # .venv and the deploy/ helpers
    nodejs npm                              # noVNC from npm
    chromium chromium-driver                # browser tests
    ca-certificates curl procps util-linux  # registries over TLS; ps, runuser
    openssl                                 # deploy/tls.sh: the local CA and the server certificate
)

installed() { [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = installed ]; }

missing=()
for pkg in "${PACKAGES[@]}"; do
    installed "$pkg" && continue
    # NodeSource's nodejs bundles npm and conflicts with Debian's npm package.
    [ "$pkg" = npm ] && command -v npm >/dev/null && continue
    missing+=("$pkg")
done

# images/build-tiny.sh fetches the guest kernel with apt-get download, which needs package lists.
need_lists=0
apt-cache show --no-all-versions linux-image-cloud-amd64 >/dev/null 2>&1 || need_lists=1

if [ ${#missing[@]} -eq 0 ] && [ $need_lists = 0 ]; then
    say "deps: all Debian packages present"
    exit 0
fi

if [ "$(id -u)" = 0 ]; then
    sudo=()
else
    command -v sudo >/dev/null \
        || die "apt-get must run (missing: ${missing[*]:-package lists}), but this is not root and there is no sudo"
    sudo=(sudo)
fi
if [ ${#missing[@]} -eq 0 ]; then
    say "deps: all packages present; fetching package lists for the image build"
    "${sudo[@]}" apt-get update -q
    exit 0
fi
say "deps: installing ${missing[*]}"
# Keep the packages' own daemons (postgres :5432, redis :6379, nginx :80, prometheus :9090) from starting
# on install: vmgate runs its own servers on loopback, under DATA_DIR. policy-rc.d is Debian's switch
# for that.
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee /usr/sbin/policy-rc.d >/dev/null
    "${sudo[@]}" chmod 755 /usr/sbin/policy-rc.d
    trap '"${sudo[@]}" rm -f /usr/sbin/policy-rc.d' EXIT
fi
"${sudo[@]}" apt-get update -q
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
