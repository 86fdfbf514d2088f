#!/usr/bin/env bash
# Formatting, lints, and every crate's unit and integration tests on stable. The
# integration tests need root, the real kernel, a running containerd, and containerd 1.7
# with NRI beside it.
set -euo pipefail
bash scripts/setup-containerd.sh
bash scripts/setup-containerd-nri.sh # containerd 1.7, for the start gate through NRI
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked --no-fail-fast
