#!/usr/bin/env bash
# Formatting, lints, and every crate's unit and integration tests on stable.
set -euo pipefail
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
