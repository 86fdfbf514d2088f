//! Developer tasks for Janus: `cargo xtask <command>`.
//!
//! - `build-ebpf`: builds the BPF LSM object (nightly, bpfel-unknown-none).
//! - `vm-test`: boots a Debian kernel with the BPF LSM enabled in QEMU and
//!   runs test binaries inside it (the host kernel refuses BPF LSM programs).
//! - `image`: static binaries and a container image of each (buildah).
//! - `platform-table`: the table of what is tested where, for docs/limitations.md.

mod cpio;
mod ebpf;
mod image;
mod matrix;
mod results;
mod util;
mod vm;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "Janus developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build janus-ebpf and copy the object to target/bpf/janus-ebpf.o.
    BuildEbpf(ebpf::BuildOptions),
    /// Run test binaries inside a QEMU VM whose kernel has the BPF LSM on.
    VmTest(vm::VmTestOptions),
    /// Build static binaries and a FROM-scratch container image of each with buildah.
    Image(image::ImageOptions),
    /// Print the platform table docs/limitations.md shows (what is tested where).
    PlatformTable,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::BuildEbpf(opts) => ebpf::build(&opts).map(|obj| println!("{}", obj.display())),
        Command::VmTest(opts) => vm::run(opts),
        Command::Image(opts) => image::build(&opts),
        Command::PlatformTable => {
            print!("{}", matrix::table());
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
