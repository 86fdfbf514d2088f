//! `cargo xtask build-ebpf`: builds janus-ebpf with nightly for
//! bpfel-unknown-none (as aya's templates do) and copies the object to a
//! stable path.

use std::{
    fs,
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::util;

const TOOLCHAIN: &str = "nightly";
const TARGET: &str = "bpfel-unknown-none";
const SETUP_HINT: &str = "run `bash scripts/setup-bpf-toolchain.sh` to install it";

#[derive(Args, Clone, Debug, Default)]
pub struct BuildOptions {
    /// Use the release profile (the dev profile is optimised too, as the
    /// verifier needs, but keeps its own build cache).
    #[arg(long)]
    pub release: bool,
}

/// Builds the BPF object and returns its stable path
/// (`<target>/bpf/janus-ebpf.o`).
pub fn build(opts: &BuildOptions) -> Result<PathBuf> {
    check_toolchain()?;
    let crate_dir = util::workspace_root().join("janus-ebpf");
    let mut cmd = nightly_cargo();
    cmd.current_dir(&crate_dir)
        .args(["build", "-Z", "build-std=core", "--target", TARGET]);
    if opts.release {
        cmd.arg("--release");
    }
    // BTF (from the debug info) with func_info: the kernel then verifies the exported
    // `janus_record` once, as a global function, instead of inline in every hook's states.
    let flags = [
        "-Cdebuginfo=2",
        "-Clink-arg=--btf",
        "-Clink-arg=--export=janus_record",
    ];
    cmd.env("CARGO_ENCODED_RUSTFLAGS", flags.join("\x1f"));
    eprintln!("xtask: building janus-ebpf ({TOOLCHAIN}, {TARGET})");
    let exes = util::cargo_build_executables(&mut cmd)?;
    let built = exes
        .iter()
        .find(|p| p.file_name().is_some_and(|n| n == "janus-ebpf"))
        .with_context(|| format!("cargo reported no janus-ebpf artifact (got {exes:?})"))?;

    let out_dir = util::target_dir()?.join("bpf");
    fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let dest = out_dir.join("janus-ebpf.o");
    fs::copy(built, &dest)
        .with_context(|| format!("copying {} to {}", built.display(), dest.display()))?;
    Ok(dest)
}

/// `rustup run nightly cargo`: unlike `cargo +nightly` it does not depend on
/// the rustup proxy being first on PATH (cargo run may put the stable
/// toolchain's bin dir there).
fn nightly_cargo() -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", TOOLCHAIN, "cargo"]);
    // Set by the outer (stable) cargo or by clippy; they would pin the wrong
    // compiler. Host RUSTFLAGS make no sense for the BPF target either.
    for var in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// Fails with a pointer to the setup script when a piece is missing.
fn check_toolchain() -> Result<()> {
    let sysroot = Command::new("rustup")
        .args(["run", TOOLCHAIN, "rustc", "--print", "sysroot"])
        .stderr(Stdio::null())
        .output();
    let sysroot = match sysroot {
        Ok(out) if out.status.success() => {
            PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
        }
        Ok(_) => bail!("the {TOOLCHAIN} Rust toolchain is not installed; {SETUP_HINT}"),
        Err(e) => bail!("cannot run rustup ({e}); {SETUP_HINT}"),
    };
    let core_src = sysroot.join("lib/rustlib/src/rust/library/core");
    if !core_src.is_dir() {
        bail!("rust-src is missing from the {TOOLCHAIN} toolchain (needed by -Z build-std); {SETUP_HINT}");
    }
    let linker = Command::new("bpf-linker")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !matches!(linker, Ok(s) if s.success()) {
        bail!("bpf-linker is not on PATH; {SETUP_HINT}");
    }
    Ok(())
}
