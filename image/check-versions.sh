#!/usr/bin/env bash
# image/check-versions.sh FLOORS MANIFEST: fails (exit 1) unless every package named in FLOORS
# (image/minimum-versions.txt: `NAME MINIMUM-VERSION` a line, # comments) is in MANIFEST (the
# image's package list, `NAME<TAB>VERSION` a line) at that version or later, in Debian version
# order (`dpkg --compare-versions`). It names every offending package, the version found and the
# floor. image/build.sh runs it after mkosi; image/test-check-versions.sh tests it.
set -euo pipefail

[[ $# -eq 2 ]] || { echo "usage: $0 FLOORS MANIFEST" >&2; exit 2; }
floors=$1 manifest=$2
[[ -r $floors ]] || { echo "check-versions: cannot read the floors file $floors" >&2; exit 2; }
[[ -r $manifest ]] || { echo "check-versions: cannot read the manifest $manifest" >&2; exit 2; }

bad=0 checked=0
while read -r name floor extra; do
    [[ -z $name || $name == \#* ]] && continue
    if [[ -z $floor || -n $extra ]]; then
        echo "check-versions: $floors: expected 'NAME MINIMUM-VERSION', got: $name $floor $extra" >&2
        exit 2
    fi
    checked=$((checked + 1))
    found=$(awk -F'\t' -v p="$name" '$1 == p { print $2; exit }' "$manifest")
    if [[ -z $found ]]; then
        echo "check-versions: $name is not in the image (floor $floor, $floors)" >&2
        bad=1
    elif dpkg --compare-versions "$found" lt "$floor"; then
        echo "check-versions: $name $found is older than the floor $floor ($floors)" >&2
        bad=1
    fi
done <"$floors"
((checked > 0)) || { echo "check-versions: no floors in $floors" >&2; exit 2; }
exit "$bad"
