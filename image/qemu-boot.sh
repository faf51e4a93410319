#!/usr/bin/env bash
# image/qemu-boot.sh [direct|uefi] [KERNEL ARGS...]: boots build/image/ under QEMU (TCG: /dev/kvm
# cannot run a guest here) with the serial console on this terminal. Ctrl-C ends QEMU.
#   direct  -kernel vmlinuz -initrd initrd.img -append "$(cat cmdline) KERNEL ARGS" (a few seconds)
#   uefi    OVMF -> systemd-boot -> UKI from the disk's ESP, the way EC2 boots the AMI (~30 s under
#           TCG); the command line is the one sealed in the UKI, KERNEL ARGS are refused.
# In both modes spotinit.raw is attached read-only as an NVMe disk (serial spotinit-root), and a
# user-mode network (DHCP from QEMU, virtio-net) is attached.
# Environment: IMAGE_DIR (default build/image), QEMU_EXTRA (more QEMU arguments, word-split),
# QEMU_MEM (MiB, default 2048), QEMU_SMP (default 2).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
img=${IMAGE_DIR:-$repo/build/image}
mode=${1:-direct}
[[ $# -gt 0 ]] && shift

[[ -f $img/spotinit.raw ]] || { echo "qemu-boot.sh: no $img/spotinit.raw: run image/build.sh first" >&2; exit 1; }

args=(
    -machine "q35,accel=tcg" -cpu max -m "${QEMU_MEM:-2048}" -smp "${QEMU_SMP:-2}"
    -display none -serial stdio -no-reboot
    -drive "if=none,id=root,file=$img/spotinit.raw,format=raw,readonly=on"
    -device "nvme,serial=spotinit-root,drive=root"
    -nic "user,model=virtio-net-pci"
)

case $mode in
direct)
    args+=(-kernel "$img/vmlinuz" -initrd "$img/initrd.img" -append "$(cat "$img/cmdline")${*:+ $*}")
    ;;
uefi)
    [[ $# -eq 0 ]] || { echo "qemu-boot.sh: uefi boots the command line sealed in the UKI; no kernel arguments" >&2; exit 2; }
    # snapshot=on: QEMU writes the UEFI variables to a throwaway overlay, never to the system file.
    args+=(
        -drive "if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd"
        -drive "if=pflash,format=raw,snapshot=on,file=/usr/share/OVMF/OVMF_VARS_4M.fd"
    )
    ;;
*)
    echo "usage: $0 [direct|uefi] [KERNEL ARGS...]" >&2
    exit 2
    ;;
esac

# shellcheck disable=SC2086 # QEMU_EXTRA is a list of arguments on purpose
exec qemu-system-x86_64 "${args[@]}" ${QEMU_EXTRA:-}
