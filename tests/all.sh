#!/usr/bin/env bash
# tests/all.sh: every test. Installs what it needs, builds, checks formatting and scripts,
# builds the image, then runs the unit tests, the tests against moto, the privileged tests
# (loop devices, namespaces: run as root) and the end-to-end tests that boot the image in QEMU.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
"$here/setup.sh"
# shellcheck source=tests/env.sh
. "$here/env.sh"
start=$SECONDS
step() { printf '\n== [%4ds] %s\n' $((SECONDS - start)) "$*" >&2; }

step "format and scripts"
cargo fmt --all -- --check
shellcheck image/*.sh image/mkosi.postinst image/mkosi.finalize image/initrd/init tests/*.sh .ci/run
image/test-check-versions.sh
step "build (release profile: one build of the AWS SDK serves the image and the tests)"
cargo build --release --workspace --all-targets
step "the production binary carries no test code (testkit and sys::fake live in the library for the tests; the linker must leave them out)"
if strings "$CARGO_TARGET_DIR/release/spotinit" | grep -qE 'ami-03cf127a|ip-10-0-2-15\.ec2\.internal|kill-all '; then
    echo "all.sh: target/release/spotinit contains strings of init/src/testkit.rs or init/src/sys/fake.rs: production code reaches test code" >&2
    exit 1
fi
step "image"
image/build.sh
step "tests"
# One test binary at a time: several end-to-end tests boot VMs, and two cores are all we have.
# setup.sh made sure this runs as root: a privileged test that cannot run is a failure here,
# unless all it lacks is a capability this root's bounding set does not have (a sandbox):
# named here, and the tests needing it say SKIPPED.
without=()
capbnd=$(awk '/^CapBnd/ {print $2}' /proc/self/status)
if (((16#$capbnd >> 24) & 1)); then :; else without+=(CAP_SYS_RESOURCE); fi
if ((${#without[@]})); then
    echo "all.sh: this root lacks ${without[*]} (capability bounding set $capbnd): the online filesystem-grow test cannot run here and is skipped" >&2
fi
SPOTINIT_PRIVILEGED=1 SPOTINIT_PRIVILEGED_WITHOUT=$(IFS=,; echo "${without[*]}") \
    cargo test --release --workspace --no-fail-fast -- --test-threads=1
step "a short campaign: three hard kills (before attach, while attaching, in the first mkfs) and a race under throttling; the full one is a benchmark (README)"
cargo run --release -p spotworld --bin campaign -- --kills 3 --graceful 0 --races 1 --moves 0
step "a short fuzzing run: every target 5 s from its seeds (AFL++ fails on any seed that crashes)"
"$here/fuzz.sh" --seconds 5
step "publish script against moto"
image/test-publish.sh
step "CloudFormation template (cfn-lint, safety properties, its user data)"
image/test-cfn.sh
step "all done in $((SECONDS - start)) s"
