#!/usr/bin/env bash
# image/test-check-versions.sh: tests image/check-versions.sh against image/minimum-versions.txt
# with fake manifests (no build, no root, a fraction of a second). Run by tests/all.sh.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
check=$here/check-versions.sh
floors=$here/minimum-versions.txt
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
failed=0

# manifest FILE NAME VERSION...: a manifest as image/mkosi.postinst writes it (sorted, tab-separated).
manifest() {
    local file=$1
    shift
    while (($#)); do printf '%s\t%s\n' "$1" "$2"; shift 2; done | LC_ALL=C sort >"$file"
}

# expect CASE WANT-EXIT [STDERR-REGEX...] -- FLOORS MANIFEST
expect() {
    local case=$1 want=$2 got=0 re
    shift 2
    local res=()
    while [[ $1 != -- ]]; do res+=("$1"); shift; done
    shift
    "$check" "$@" >"$tmp/out" 2>"$tmp/err" || got=$?
    if [[ $got != "$want" ]]; then
        echo "test-check-versions: FAIL: $case: exit $got, wanted $want; stderr:" >&2
        sed 's/^/    /' "$tmp/err" >&2
        failed=1
        return
    fi
    for re in "${res[@]}"; do
        if ! grep -qE -- "$re" "$tmp/err"; then
            echo "test-check-versions: FAIL: $case: stderr lacks /$re/; stderr:" >&2
            sed 's/^/    /' "$tmp/err" >&2
            failed=1
            return
        fi
    done
    echo "test-check-versions: ok: $case"
}

trixie=(docker.io 26.1.5+dfsg1-9+deb13u1+b1 docker-cli 26.1.5+dfsg1-9+deb13u1+b1
    containerd 1.7.24~ds1-6+deb13u1 runc 1.1.15+ds1-2+deb13u1
    linux-image-cloud-amd64 6.12.118-1 busybox-static 1:1.37.0-6+b9)
manifest "$tmp/trixie" "${trixie[@]}"
expect "trixie image passes" 0 -- "$floors" "$tmp/trixie"

# The bookworm image this replaces (its manifest, less docker-cli: bookworm's docker.io had the CLI).
manifest "$tmp/bookworm" docker.io 20.10.24+dfsg1-1+deb12u1+b6 containerd 1.6.20~ds1-1+deb12u3 \
    runc 1.1.5+ds1-1+deb12u1 linux-image-cloud-amd64 6.1.158-1
expect "bookworm image fails, every package named with version and floor" 1 \
    'docker\.io 20\.10\.24\+dfsg1-1\+deb12u1\+b6 is older than the floor 26 ' \
    'containerd 1\.6\.20~ds1-1\+deb12u3 is older than the floor 1\.7 ' \
    'runc 1\.1\.5\+ds1-1\+deb12u1 is older than the floor 1\.1\.12 ' \
    'linux-image-cloud-amd64 6\.1\.158-1 is older than the floor 6\.12 ' \
    'docker-cli is not in the image \(floor 26,' -- "$floors" "$tmp/bookworm"

# Debian version order, not string order: 26~rc1 is before 26, 1.10 after 1.7, an epoch wins.
printf 'a 26\nb 1.7\nc 2.0\n' >"$tmp/floors"
manifest "$tmp/m1" a 26~rc1-1 b 1.10.0-1 c 1:1.0-1
expect "pre-release below the floor fails" 1 'a 26~rc1-1 is older than the floor 26 ' -- "$tmp/floors" "$tmp/m1"
manifest "$tmp/m2" a 26.0.0-1 b 1.10.0-1 c 1:1.0-1
expect "1.10 is not older than 1.7, 1:1.0 not older than 2.0" 0 -- "$tmp/floors" "$tmp/m2"
manifest "$tmp/m4" a 26 b 1.7 c 2.0
expect "exactly the floor passes" 0 -- "$tmp/floors" "$tmp/m4"
# A package whose name is a prefix of another's must not match it.
manifest "$tmp/m3" a-extra 30 b 1.7 c 2.0
expect "exact package names only" 1 'a is not in the image' -- "$tmp/floors" "$tmp/m3"

# Usage errors are not silent passes.
printf '# nothing\n' >"$tmp/empty-floors"
expect "a floors file without floors is an error" 2 'no floors' -- "$tmp/empty-floors" "$tmp/trixie"
printf 'docker.io\n' >"$tmp/bad-floors"
expect "a floor line without a version is an error" 2 "expected 'NAME MINIMUM-VERSION'" -- "$tmp/bad-floors" "$tmp/trixie"
expect "a missing manifest is an error" 2 'cannot read the manifest' -- "$floors" "$tmp/none"

exit "$failed"
