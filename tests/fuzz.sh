#!/usr/bin/env bash
# tests/fuzz.sh [--seconds N] [TARGET...]: fuzzes what spotinit parses from outside (the
# targets of fuzz/, see fuzz/src/lib.rs) with AFL++, N seconds each (default 60), one after the
# other, every target unless some are named. Then prints, per target, the executions, their
# rate, the corpus (seeds plus the inputs AFL++ kept for new coverage), crashes and hangs, and
# exits non-zero if any target crashed or hung.
#   - installs what it needs if missing: make and a C compiler (Debian's), cargo-afl from
#     crates.io, whose installation builds AFL++ (its source ships in the crate), and AFL++'s
#     runtime for the rustc in use (rebuilt after a Rust update);
#   - builds the targets with `cargo afl build` into build/fuzz-target (stable Rust; the
#     library without the AWS SDK);
#   - AFL++'s output goes to build/fuzz/TARGET/ (fresh each run), its log to build/fuzz/TARGET.log.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tests/env.sh
. "$here/env.sh"

# The afl crate's version in fuzz/Cargo.toml: both are built against one AFL++ runtime.
afl_version=0.18.2
targets_all=(config cmdline mountinfo uevent record lease imds_identity spot_action daemon_json ntp)
say() { printf 'fuzz: %s\n' "$*" >&2; }
usage() { sed -n '2,6s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2; exit 2; }

seconds=60
targets=()
while (($#)); do
    case $1 in
    --seconds) [[ ${2:-} =~ ^[1-9][0-9]*$ ]] || usage; seconds=$2; shift 2 ;;
    -h | --help) usage ;;
    -*) usage ;;
    *)
        [[ " ${targets_all[*]} " == *" $1 "* ]] || { say "unknown target $1 (targets: ${targets_all[*]})"; exit 2; }
        targets+=("$1"); shift ;;
    esac
done
((${#targets[@]})) || targets=("${targets_all[@]}")

start=$SECONDS
# AFL++ builds with make and cc; Debian 12 (root) installs them if missing.
if ! command -v make >/dev/null || ! command -v cc >/dev/null; then
    say "installing make and gcc"
    DEBIAN_FRONTEND=noninteractive apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends make gcc libc6-dev
fi
if [[ $(cargo afl --version 2>/dev/null) != "cargo-afl $afl_version"* ]]; then
    say "installing cargo-afl $afl_version (and AFL++ with it: a few minutes)"
    # In a temporary target directory of its own, not the workspace's (env.sh sets that one).
    env -u CARGO_TARGET_DIR cargo install --locked --force --version "$afl_version" cargo-afl
fi
# The runtime is built per rustc version: installing cargo-afl built it for the rustc of the
# day; after a Rust update (or if that build failed) this builds it. "Already built" is fine.
if ! out=$(cargo afl config --build 2>&1); then
    grep -q 'already built' <<<"$out" || { printf '%s\n' "$out" >&2; say "cannot build AFL++"; exit 1; }
fi

say "building the targets (build/fuzz-target)"
CARGO_TARGET_DIR=$repo/build/fuzz-target cargo afl build --release --manifest-path "$repo/fuzz/Cargo.toml"
built=$SECONDS

# AFL++ in a container: no UI on a pipe; the CPU frequency governor and core_pattern may be
# the host's and unwritable (a piped core_pattern only delays crash detection: AFL++ still
# sees the abort); no core of its own (another developer's builds share these two cores).
# A hang is an input that still runs after 3 s when AFL++ retries it: far above any parse
# here (microseconds), and above what a loaded machine adds.
export AFL_NO_UI=1 AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_AFFINITY=1
export AFL_HANG_TMOUT=3000 AFL_FAST_CAL=1
mkdir -p "$repo/build/fuzz"
# A value of AFL++'s fuzzer_stats: field KEY of target directory DIR.
stat_of() { awk -v k="$2" '$1 == k { print $3 }' "$1/default/fuzzer_stats"; }
failed=()
rows=()
for t in "${targets[@]}"; do
    out=$repo/build/fuzz/$t
    rm -rf "$out"
    say "$t: ${seconds} s"
    # -V: stop after N seconds of fuzzing; the outer timeout only guards against AFL++ itself.
    if ! timeout --signal=INT $((seconds + 300)) \
        cargo afl fuzz -V "$seconds" -i "$repo/fuzz/seeds/$t" -o "$out" \
        "$repo/build/fuzz-target/release/$t" >"$out.log" 2>&1 ||
        [[ ! -f $out/default/fuzzer_stats ]]; then
        tail -n 20 "$out.log" >&2
        say "$t: afl-fuzz failed (log: build/fuzz/$t.log)"
        failed+=("$t")
        continue
    fi
    run_time=$(stat_of "$out" run_time) execs=$(stat_of "$out" execs_done)
    crashes=$(stat_of "$out" saved_crashes) hangs=$(stat_of "$out" saved_hangs)
    rows+=("$(printf '%-14s %5s %11s %9s %7s %7s %11s %7s %5s' "$t" "$run_time" "$execs" \
        "$(awk -v e="$execs" -v s="$run_time" 'BEGIN { printf "%.0f", s ? e / s : 0 }')" \
        "$(stat_of "$out" corpus_count)" "$(stat_of "$out" corpus_found)" \
        "$(stat_of "$out" edges_found)/$(stat_of "$out" total_edges)" \
        "$crashes" "$hangs")")
    if ((crashes + hangs)); then
        failed+=("$t")
        for f in "$out"/default/crashes/id:* "$out"/default/hangs/id:*; do
            [[ -f $f ]] || continue
            say "$t: ${f#"$repo"/}"
            say "  reproduce: build/fuzz-target/release/$t < '${f#"$repo"/}'"
        done
    fi
done

printf '\n%-14s %5s %11s %9s %7s %7s %11s %7s %5s\n' target secs executions execs/s corpus new edges crashes hangs
printf '%s\n' "${rows[@]}"
say "built in $((built - start)) s, fuzzed in $((SECONDS - built)) s"
if ((${#failed[@]})); then
    say "FAILED: ${failed[*]} (output in build/fuzz/)"
    exit 1
fi
say "no crash, no hang"
