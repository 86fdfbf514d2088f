#!/usr/bin/env bash
# The BPF LSM backend on real kernels with the BPF LSM on: installs the toolchain
# (nightly + rust-src, bpf-linker, QEMU, busybox, xz; idempotent), then boots Debian 12's
# 6.1 and 6.12 cloud kernels in QEMU (TCG), one VM per kernel side by side (one vCPU
# each), and runs the BPF integration tests and the scenario table under both backends
# inside each, in monitor mode too on 6.12 (`cargo xtask vm-test`, see
# scripts/vm/README.md). About 40 minutes here; it fails if any VM test fails on either
# kernel. The deadline leaves room
# for hosts where TCG runs many times slower.
set -euo pipefail
bash scripts/setup-bpf-toolchain.sh
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
# The first VM's console streams here; the second's is printed when both are done.
echo "=== vm-test on Debian's 6.1 kernel"
# On 6.1 the verifier takes about 40 s per agent start under TCG (6.12: a few), so the
# table's monitor-mode run is left to 6.12 there.
(cargo xtask vm-test --timeout 3600 --kernel-series 6.1 --table-modes enforce 2>&1 | tee "$logs/6.1"; exit "${PIPESTATUS[0]}") &
first=$!
# The second starts once the first has built everything and booted, so the two never
# build at once.
until grep -q '^xtask: booting' "$logs/6.1" || ! kill -0 "$first" 2>/dev/null; do
    sleep 2
done
cargo xtask vm-test --timeout 3600 --kernel-series 6.12 >"$logs/6.12" 2>&1 &
second=$!
status=0
wait "$first" || status=1
wait "$second" || status=1
echo "=== vm-test on Debian's 6.12 kernel"
cat "$logs/6.12"
exit "$status"
