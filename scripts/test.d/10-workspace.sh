#!/usr/bin/env bash
# Formatting, lints, and every crate's unit and integration tests on stable. The
# integration tests need root, the real kernel and a running containerd.
set -euo pipefail
bash scripts/setup-containerd.sh
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked --no-fail-fast
