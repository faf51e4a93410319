# Sourced by the scripts in tests/: the paths setup.sh installs to.
# shellcheck shell=bash
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PATH=$repo/build/venv/bin:$HOME/.cargo/bin:$PATH
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$repo/target}
cd "$repo" || exit 1
