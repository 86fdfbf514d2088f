//! Embeds the BPF object when `cargo xtask build-ebpf` has produced it (or `JANUS_EBPF_OBJ`
//! names one): sets `cfg(janus_bpf_embedded)` and `JANUS_EBPF_OBJ_PATH` for include_bytes!.
//! Without it the agent still builds and runs with the fanotify backend only.

use std::path::PathBuf;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(janus_bpf_embedded)");
    println!("cargo::rerun-if-env-changed=JANUS_EBPF_OBJ");
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let default = manifest.join("../target/bpf/janus-ebpf.o");
    let candidate = std::env::var_os("JANUS_EBPF_OBJ")
        .map(PathBuf::from)
        .unwrap_or(default);
    println!("cargo::rerun-if-changed={}", candidate.display());
    if candidate.is_file() {
        let path = candidate
            .canonicalize()
            .expect("an existing file canonicalizes");
        println!("cargo::rustc-cfg=janus_bpf_embedded");
        println!("cargo::rustc-env=JANUS_EBPF_OBJ_PATH={}", path.display());
    }
}
