#!/usr/bin/env bash
# image/test-boot.sh [--no-build]: builds the image with image/placeholder-init as spotinit, boots it
# under QEMU by direct kernel boot (with the placeholder's smoke checks: modules, DHCP, dockerd,
# a container) and through UEFI (OVMF, systemd-boot, UKI), and checks the console of each.
# Console logs: build/test-boot-direct.log, build/test-boot-uefi.log.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
failed=0

if [[ ${1:-} != --no-build ]]; then
    SPOTINIT_BIN=image/placeholder-init image/build.sh
fi

# boot MODE TIMEOUT EXPECTED-LINE-REGEX... [-- KERNEL ARGS]
boot() {
    local mode=$1 limit=$2 log=build/test-boot-$1.log re start
    shift 2
    local expect=()
    while (($#)) && [[ $1 != -- ]]; do expect+=("$1"); shift; done
    [[ ${1:-} == -- ]] && shift
    start=$SECONDS
    timeout "$limit" image/qemu-boot.sh "$mode" "$@" </dev/null >"$log" 2>&1 || true
    for re in "${expect[@]}"; do
        if ! tr -d '\r' <"$log" | grep -qE "$re"; then
            echo "test-boot.sh: FAIL: $mode boot: no console line matching /$re/ within ${limit}s (see $log)"
            failed=1
            return
        fi
    done
    echo "test-boot.sh: ok: $mode boot ($((SECONDS - start)) s):"
    tr -d '\r' <"$log" | grep -E '^(initrd|spotinit|smoke):' | sed 's/^/    /'
}

initrd='^initrd: root /dev/nvme0n1p2 \(erofs\) mounted at [0-9.]+ s uptime'
init='^spotinit: placeholder init at '
boot direct 300 "$initrd" "$init" '^smoke: 0 failures' -- placeholder.smoke
boot uefi 300 "$initrd" "$init"
exit "$failed"
