#!/usr/bin/env bash
# Installs what `cargo xtask build-ebpf` and `cargo xtask vm-test` need:
#   - nightly Rust with rust-src (janus-ebpf is built with -Z build-std=core),
#   - bpf-linker built against Debian's LLVM 22,
#   - QEMU and a static busybox for the test VM, xz to decompress kernel modules.
# Idempotent: each step is skipped when already done, so a second run takes
# about a second.
set -euo pipefail

LLVM_MAJOR=22
BPF_LINKER_VERSION=0.13.0
APT_PACKAGES=("llvm-${LLVM_MAJOR}-dev" qemu-system-x86 busybox-static xz-utils)
# What vm-test boots (it downloads the newest one itself with apt-get download).
KERNEL_PATTERN='^linux-image-6\.1\.0-[0-9]+-cloud-amd64-unsigned$'

log() { printf 'setup-bpf-toolchain: %s\n' "$*" >&2; }

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    SUDO=(sudo)
fi
apt_install() {
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y --no-install-recommends "$@"
}

# --- Debian packages -------------------------------------------------------
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$pkg")
    fi
done
# apt-cache needs the package lists both to install and for vm-test to find
# the kernel; refresh them once when something is missing.
if [ "${#missing[@]}" -gt 0 ] || [ -z "$(apt-cache search --names-only "$KERNEL_PATTERN" 2>/dev/null)" ]; then
    log "apt-get update"
    "${SUDO[@]}" apt-get update -q
fi
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]}"
    apt_install "${missing[@]}"
    # qemu-system-x86 (bookworm, 7.2) can displace a newer backported
    # qemu-utils; put bookworm's back so qemu-img stays available.
    if ! command -v qemu-img >/dev/null; then
        apt_install qemu-utils || log "warning: could not reinstall qemu-utils (qemu-img)"
    fi
fi

# --- Rust nightly + rust-src -----------------------------------------------
if ! command -v rustup >/dev/null; then
    log "rustup is required (https://rustup.rs); it is not installed"
    exit 1
fi
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    log "installing the nightly toolchain"
    rustup toolchain install nightly --profile minimal
fi
if ! rustup component list --toolchain nightly --installed | grep -q '^rust-src'; then
    log "adding rust-src to nightly"
    rustup component add rust-src --toolchain nightly
fi

# --- bpf-linker --------------------------------------------------------------
cargo_bin="${CARGO_HOME:-$HOME/.cargo}/bin"
have_linker="$("$cargo_bin/bpf-linker" --version 2>/dev/null || true)"
if [ "$have_linker" != "bpf-linker $BPF_LINKER_VERSION" ]; then
    log "building bpf-linker $BPF_LINKER_VERSION against LLVM $LLVM_MAJOR (about a minute)"
    # --locked: its own lockfile, so newer dependencies cannot break the build.
    LLVM_PREFIX="/usr/lib/llvm-${LLVM_MAJOR}" cargo install --locked --force \
        bpf-linker --version "$BPF_LINKER_VERSION" \
        --no-default-features --features "llvm-${LLVM_MAJOR}"
fi
if ! command -v bpf-linker >/dev/null; then
    log "warning: $cargo_bin is not on PATH; add it so cargo can find bpf-linker"
fi

log "ok: $(rustup run nightly rustc --version), $("$cargo_bin/bpf-linker" --version), $(qemu-system-x86_64 --version | head -n1)"
