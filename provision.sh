#!/usr/bin/env bash
# Installs what hvlab needs on Debian 12 or Ubuntu 24.04: the distribution's packages (as root)
# and the virtualenv in .venv. The one list of packages: `make deps`, the Vagrantfile's
# provisioner and CI all run this script. Idempotent: installs only what is missing, runs
# `apt-get update` at most once, and rebuilds the venv only when pyproject.toml changed.
#
#   provision.sh              packages, then the venv
#   provision.sh --packages   packages only
#   provision.sh --venv       the venv only
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")"

PY=${PY:-python3}
VENV=${VENV:-.venv}

PACKAGES=(
    make python3 python3-venv          # the Makefile; a venv (ensurepip is split out on Debian)
    lvm2 thin-provisioning-tools kmod  # thin pools, thin_delta/thin_dump, modprobe dm-thin-pool
    e2fsprogs xfsprogs util-linux mount  # mkfs, fsfreeze, blockdev; losetup is in `mount`
    iproute2 psmisc procps
    nbdkit python3-libnbd              # off-host mode: the NBD server, and libnbd for the proxy
    gcc libc6-dev                      # the lab VM's ptrace shim (harness/vm/xstate_shim.c)
    git                                # make fresh-check clones; bench records the commit
)
# What only the tests use: `vagrant validate` checks the Vagrantfile offline. Like the lab VM's
# packages, a distribution without it is not an error here (the tests say so, and fail in CI).
TEST_PACKAGES=(vagrant)
# The lab VM, for kernels without device-mapper (as on the build machines). A kernel with
# dm-thin (a Vagrant VM) does not need it, so a distribution without it is not an error.
LAB_VM_PACKAGES=(user-mode-linux uml-utilities)

say() { echo "provision: $*"; }

missing() {
    local p
    for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done
}

updated=0
apt_update() {
    if [ "$updated" = 0 ]; then apt-get update -qq; updated=1; fi
}

apt_install() {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

packages() {
    local need opt p
    need=$(missing "${PACKAGES[@]}")
    opt=$(missing "${LAB_VM_PACKAGES[@]}" "${TEST_PACKAGES[@]}")
    if [ -z "$need$opt" ]; then
        return 0
    fi
    if [ "$(id -u)" != 0 ]; then
        if [ -n "$need" ]; then
            say "missing packages:" $need "(run as root: sudo $0 --packages)"
            return 1
        fi
        say "note: not installed:" $opt "(the lab VM's and the tests' packages; run as root to add them)"
        return 0
    fi
    apt_update
    if [ -n "$need" ]; then
        say "installing:" $need
        apt_install $need
    fi
    for p in $opt; do
        # apt-cache knows a package only after the update above.
        if apt-cache show "$p" >/dev/null 2>&1; then
            say "installing: $p"
            apt_install "$p"
        else
            say "note: $p is not in this distribution (LAB_VM_PACKAGES / TEST_PACKAGES say what it is for)"
        fi
    done
}

# libnbd's Python binding is Debian's (python3-libnbd; PyPI has none): the venv sees only its
# two files, through a folder of links and a .pth, and only when it was built for the venv's
# Python (the same EXT_SUFFIX).
libnbd() {
    local site suffix so dir="$VENV/libnbd"
    site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    suffix=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
    so=/usr/lib/python3/dist-packages/libnbdmod$suffix
    if [ ! -e "$so" ]; then
        say "note: no libnbd binding for the venv's Python ($so): off-host mode unavailable"
        return 0
    fi
    if [ -e "$dir/nbd.py" ] && [ -e "$site/hvlab-libnbd.pth" ]; then
        return 0
    fi
    mkdir -p "$dir"
    ln -sf /usr/lib/python3/dist-packages/nbd.py "$so" "$dir/"
    readlink -f "$dir" > "$site/hvlab-libnbd.pth"
    say "linked libnbd's Python binding into $VENV"
}

# Folder = import path: the venv's sys.path names the two source roots (harness/ holds only
# hvlab, fixtures/ only hvlab_fixtures), which editors and code-map tools follow; the editable
# install alone finds them through an import hook, which they do not.
sources() {
    local site
    site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    printf '%s\n' "$PWD/harness" "$PWD/fixtures" > "$site/hvlab-sources.pth"
}

venv() {
    local stamp="$VENV/.installed"
    if [ -e "$stamp" ] && ! [ pyproject.toml -nt "$stamp" ]; then
        libnbd
        return 0
    fi
    # The venv belongs to whoever owns the checkout (the vagrant user in a Vagrant VM), so a
    # later `make` as that user can update it; root's provisioning must not take it over.
    local owner
    owner=$(stat -c %U .)
    if [ "$(id -u)" = 0 ] && [ "$owner" != root ]; then
        runuser -u "$owner" -- env PY="$PY" VENV="$VENV" bash "$0" --venv
        return
    fi
    say "virtualenv $VENV"
    test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q -e '.[test]'
    sources
    libnbd
    touch "$stamp"
}

case "${1:-all}" in
    all) packages; venv ;;
    --packages) packages ;;
    --venv) venv ;;
    *) echo "usage: $0 [--packages | --venv]" >&2; exit 2 ;;
esac
