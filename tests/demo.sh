#!/usr/bin/env bash
# tests/demo.sh: the main job. Installs what it needs, builds spotinit and the image, then runs
# the spot-persistence demo in QEMU against the local EC2 world (moto + fidelity layer + IMDS).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
"$here/setup.sh"
# shellcheck source=tests/env.sh
. "$here/env.sh"
step() { printf '\n== %s\n' "$*" >&2; }
step "building spotinit and the simulator (release; the first build takes ~10 min)"
cargo build --release --workspace --bins
step "building the image"
image/build.sh
step "the demo"
exec "$CARGO_TARGET_DIR/release/demo" "$@"
