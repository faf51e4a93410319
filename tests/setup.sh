#!/usr/bin/env bash
# tests/setup.sh: installs what building the image, the demo and the tests need on Debian 12
# (bookworm), as root. Idempotent: a second run changes nothing and takes seconds.
#   - bookworm-backports: mkosi 24, QEMU 10, systemd-boot/ukify 254 (bookworm's are too old)
#   - image tools, OVMF, busybox-static (the test container), e2fsprogs, shellcheck,
#     openssh-client (the SSH scenario logs in with ssh and makes its key with ssh-keygen),
#     docker-registry (the image registry the demo and scenario 15 pull from; the tests run
#     their own on a free loopback port, so the package's service is switched off)
#   - Rust (rustup, stable) if cargo is missing or older than the workspace needs
#   - moto from PyPI, in a virtualenv under build/venv (put on PATH by the callers)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
say() { printf 'setup: %s\n' "$*" >&2; }

[[ $(id -u) -eq 0 ]] || { say "run as root (apt, loop devices, mounts)"; exit 1; }
grep -q 'bookworm' /etc/os-release || say "warning: not Debian 12; the packages below are bookworm's"

export DEBIAN_FRONTEND=noninteractive
backports=/etc/apt/sources.list.d/bookworm-backports.sources
if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    say "adding bookworm-backports"
    cat >"$backports" <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    apt-get update -q
fi

need_backports=(mkosi qemu-system-x86 qemu-utils systemd-boot systemd-boot-efi python3-pefile)
need=(ovmf erofs-utils kmod mtools dosfstools zstd cpio busybox-static e2fsprogs util-linux
      shellcheck curl ca-certificates gcc libc6-dev pkg-config python3-venv python3-pip
      debian-archive-keyring iproute2 openssh-client docker-registry)
missing=()
for p in "${need_backports[@]}" "${need[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
    say "installing ${missing[*]}"
    apt-get update -q
    apt-get install -y -q --no-install-recommends -t bookworm-backports "${need_backports[@]}"
    apt-get install -y -q --no-install-recommends "${need[@]}"
    if [[ " ${missing[*]} " == *" docker-registry "* ]] && command -v systemctl >/dev/null &&
        systemctl is-enabled -q docker-registry 2>/dev/null; then
        say "switching off the docker-registry package's own service (an open registry on :5000)"
        systemctl disable --now docker-registry || true
    fi
fi

# Rust: the workspace needs 1.87 or newer (std::io::pipe).
rust_ok() {
    command -v cargo >/dev/null 2>&1 || return 1
    local v
    v=$(rustc --version | awk '{print $2}')
    [[ $(printf '%s\n1.87.0\n' "$v" | sort -V | head -n1) == 1.87.0 ]]
}
if ! rust_ok; then
    [[ -x $HOME/.cargo/bin/cargo ]] && export PATH=$HOME/.cargo/bin:$PATH
fi
if ! rust_ok; then
    say "installing Rust (rustup, stable)"
    curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --component rustfmt,clippy
    export PATH=$HOME/.cargo/bin:$PATH
fi

# moto in its own virtualenv (bookworm's pip refuses system-wide installs).
venv=$repo/build/venv
if ! "$venv/bin/python" -c 'import moto, flask' 2>/dev/null; then
    say "installing moto into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip
    "$venv/bin/pip" install -q -r "$repo/tests/requirements.txt"
fi
say "ready: $(rustc --version), mkosi $(mkosi --version | awk '{print $2}'), $(qemu-system-x86_64 --version | head -n1), moto $("$venv/bin/python" -c 'import moto; print(moto.__version__)')"
