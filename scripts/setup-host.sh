#!/usr/bin/env bash
# Install what vmferry needs on this host, only what is missing (idempotent).
#   - QEMU >= 10 (on Debian 12 from bookworm-backports), qemu-utils
#   - busybox-static, gcc + static libc (the lab guest image), iproute2
#   - mmdebstrap, e2fsprogs, grub-pc-bin, Debian's archive keyring (the Debian guest image)
#   - qemu-guest-agent (its qemu-ga binary serves tests of the guest-agent client; its service
#     starts only inside a VM, bound to the virtio port org.qemu.guest_agent.0)
#   - ovmf (UEFI firmware for guests of your own that boot with --firmware uefi)
#   - chromium (the web dashboard's test drives it headless with Playwright)
#   - postgresql (its server binaries: tests run a PostgreSQL store of their own)
#   - uv, then the project's locked Python environment
#   - (as root) the system user vmferry-qemu that agents run QEMU as, and access for its group
#     to /dev/userfaultfd (post-copy needs it once QEMU has dropped root)
set -euo pipefail

need_root() {
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null; then sudo "$@"; else
            echo "setup: need root to run: $*" >&2; exit 1
        fi
    else
        "$@"
    fi
}

qemu_ok() {
    command -v qemu-system-x86_64 >/dev/null || return 1
    local v
    v=$(qemu-system-x86_64 --version | sed -n 's/.*version \([0-9]*\)\..*/\1/p' | head -n1)
    [ -n "$v" ] && [ "$v" -ge 10 ]
}

missing=()
dpkg -s busybox-static >/dev/null 2>&1 || missing+=(busybox-static)
command -v gcc >/dev/null || missing+=(gcc)
[ -e /usr/lib/x86_64-linux-gnu/libc.a ] || missing+=(libc6-dev)
command -v qemu-img >/dev/null || missing+=(qemu-utils)
command -v ip >/dev/null || missing+=(iproute2)
# The Debian guest image (vmferry.guest.debian); /usr/sbin tools may be off a user's PATH.
command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
dpkg -s e2fsprogs >/dev/null 2>&1 || missing+=(e2fsprogs)
[ -e /usr/lib/grub/i386-pc/boot.img ] || missing+=(grub-pc-bin)
[ -e /usr/share/keyrings/debian-archive-keyring.gpg ] || missing+=(debian-archive-keyring)
[ -x /usr/sbin/qemu-ga ] || missing+=(qemu-guest-agent)
[ -e /usr/share/ovmf/OVMF.fd ] || missing+=(ovmf)
# The dashboard's browser test (Playwright drives Debian's Chromium; no browser download).
[ -x /usr/bin/chromium ] || missing+=(chromium)
# PostgreSQL (`vmferry serve --store postgresql://…`): the failover test starts its own server
# from these binaries in a temporary directory (the package's own cluster is not used).
compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null || missing+=(postgresql)

backports=()
if ! qemu_ok; then
    codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
    if [ "$codename" = bookworm ]; then
        if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
            echo "setup: adding bookworm-backports (for QEMU >= 10)"
            echo "deb http://deb.debian.org/debian bookworm-backports main" |
                need_root tee /etc/apt/sources.list.d/bookworm-backports.list >/dev/null
        fi
        backports=(qemu-system-x86 qemu-utils)
    else
        missing+=(qemu-system-x86)
    fi
fi

if [ ${#missing[@]} -gt 0 ] || [ ${#backports[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]-} ${backports[*]-}"
    need_root apt-get update -q
    export DEBIAN_FRONTEND=noninteractive
    if [ ${#missing[@]} -gt 0 ]; then
        need_root apt-get install -y -q --no-install-recommends "${missing[@]}"
    fi
    if [ ${#backports[@]} -gt 0 ]; then
        need_root apt-get install -y -q --no-install-recommends -t bookworm-backports "${backports[@]}"
    fi
fi
qemu_ok || { echo "setup: QEMU >= 10 is required and could not be installed" >&2; exit 1; }

# QEMU without root: agents started as root run QEMU as this user (`vmferry agent --qemu-user`).
if [ "$(id -u)" -eq 0 ]; then
    if ! getent passwd vmferry-qemu >/dev/null; then
        echo "setup: adding system user vmferry-qemu"
        useradd --system --no-create-home --shell /usr/sbin/nologin vmferry-qemu
    fi
    # Post-copy's userfaultfd: with vm.unprivileged_userfaultfd=0 an unprivileged QEMU needs
    # /dev/userfaultfd. Grant it to QEMU's group only (not the whole host via the sysctl).
    if [ -e /dev/userfaultfd ]; then
        chgrp vmferry-qemu /dev/userfaultfd
        chmod 0660 /dev/userfaultfd
        if [ -d /etc/udev/rules.d ]; then
            rule='KERNEL=="userfaultfd", GROUP="vmferry-qemu", MODE="0660"'
            echo "$rule" >/etc/udev/rules.d/90-vmferry-userfaultfd.rules
        fi
    fi
fi

if ! command -v uv >/dev/null; then
    echo "setup: installing uv"
    python3 -m pip install --quiet uv || python3 -m pip install --quiet --break-system-packages uv
fi
# Bytecode compiled once here: every `vmferry` command starts ~50 ms sooner (a shell with
# PYTHONDONTWRITEBYTECODE set would otherwise recompile Rich and vmferry at each start).
uv sync --locked --quiet --compile-bytecode
uv run --locked python -m compileall -q src >/dev/null
echo "setup: ok ($(qemu-system-x86_64 --version | head -n1))"
