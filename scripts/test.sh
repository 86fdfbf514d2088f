#!/usr/bin/env bash
# Runs every Janus test on this machine, installing what each stage needs first.
# Must run as root: the tests guard real files with the real kernel, start real
# containers with containerd and boot a kernel with the BPF LSM in QEMU.
#
#   bash scripts/test.sh            # every stage
#   bash scripts/test.sh 20 40      # only the stages whose file names start so
#
# Stages are scripts/test.d/NN-name.sh, run in order; each installs what it needs
# idempotently and exits non-zero when a test fails. The last line sums the
# cargo test results of every stage.
set -uo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
if [ "$(id -u)" -ne 0 ]; then
    echo "test.sh: run as root (the tests use fanotify, containerd and mount namespaces)" >&2
    exit 1
fi
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
log=$(mktemp /tmp/janus-test.XXXXXX.log)
failed_stages=()
for stage in scripts/test.d/*.sh; do
    name=$(basename "$stage" .sh)
    if [ "$#" -gt 0 ]; then
        wanted=no
        for prefix in "$@"; do [[ $name == "$prefix"* ]] && wanted=yes; done
        [ "$wanted" = yes ] || continue
    fi
    echo "=== stage $name"
    start=$SECONDS
    if bash "$stage" 2>&1 | tee -a "$log"; then
        echo "=== stage $name: ok ($((SECONDS - start)) s)"
    else
        echo "=== stage $name: FAILED ($((SECONDS - start)) s)"
        failed_stages+=("$name")
    fi
done
# cargo prints one "test result: ok. N passed; M failed; ..." line per test binary; in the
# VM, the scenario table prints "scenarios: N passed, M failed" and the BPF tests one
# "PASS name (S s)" or "FAIL name: why (S s)" line each.
read -r passed failed < <(awk '
    /^test result:/ {
        for (i = 1; i <= NF; i++) {
            if ($(i) ~ /^passed;?$/) p += $(i - 1)
            if ($(i) ~ /^failed;?$/) f += $(i - 1)
        }
    }
    /^scenarios: [0-9]+ passed, [0-9]+ failed$/ { p += $2; f += $4 }
    /^PASS [^ ]+ \([0-9.]+ s\)$/ { p++ }
    /^FAIL [^ ]+:/ { f++ }
    END { print p + 0, f + 0 }' "$log")
rm -f "$log"
if [ "${#failed_stages[@]}" -gt 0 ]; then
    echo "failed stages: ${failed_stages[*]}"
    # A stage can fail before cargo counts anything (a build or an install step).
    [ "$failed" -gt 0 ] || failed=1
fi
echo "janus: $passed passed, $failed failed"
[ "${#failed_stages[@]}" -eq 0 ]
