#!/usr/bin/env bash
# The BPF LSM backend on a real kernel with the BPF LSM on: installs the toolchain
# (nightly + rust-src, bpf-linker, QEMU, busybox; idempotent), then boots Debian's 6.1
# cloud kernel in QEMU (TCG) and runs the BPF integration tests inside it
# (`cargo xtask vm-test`, see scripts/vm/README.md). About 10 minutes on a fresh machine
# (bpf-linker ~5 min, builds, ~2 min in the VM); it fails if any VM test fails.
set -euo pipefail
bash scripts/setup-bpf-toolchain.sh
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
cargo xtask vm-test --timeout 900
