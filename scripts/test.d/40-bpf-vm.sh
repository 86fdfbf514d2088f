#!/usr/bin/env bash
# The BPF LSM backend on a real kernel with the BPF LSM on: installs the toolchain
# (nightly + rust-src, bpf-linker, QEMU, busybox; idempotent), then boots Debian's 6.1
# cloud kernel in QEMU (TCG) and runs the BPF integration tests inside it
# (`cargo xtask vm-test`, see scripts/vm/README.md). About 10 minutes on a fresh machine
# (bpf-linker ~1 min, release builds, ~2 min in the VM here); it fails if any VM test
# fails. The deadline leaves room for hosts where TCG runs many times slower.
set -euo pipefail
bash scripts/setup-bpf-toolchain.sh
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
cargo xtask vm-test --timeout 1800
