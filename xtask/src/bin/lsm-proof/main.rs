//! End-to-end proof that the BPF LSM pipeline works on a real kernel: loads
//! `janus-ebpf.o` with aya, attaches its `file_open` program, and checks that
//! a file whose inode is in `DENY_INODES` cannot be opened (EPERM) while
//! another one can. Meant to run as root inside `cargo xtask vm-test`.
//!
//! Prints `PASS lsm-proof` or `FAIL lsm-proof: <why>` and exits accordingly.

mod btf;

use std::{
    fs,
    io::Read,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{bail, ensure, Context, Result};
use aya::{
    maps::{HashMap, MapData, RingBuf},
    programs::Lsm,
    Btf, EbpfLoader,
};

const DEFAULT_OBJ: &str = "/bpf/janus-ebpf.o";

fn main() -> ExitCode {
    let obj = std::env::args()
        .nth(1)
        .or_else(|| std::env::var("JANUS_EBPF_OBJ").ok())
        .unwrap_or_else(|| DEFAULT_OBJ.to_owned());
    match run(Path::new(&obj)) {
        Ok(()) => {
            println!("PASS lsm-proof");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("FAIL lsm-proof: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(obj: &Path) -> Result<()> {
    let lsms = fs::read_to_string("/sys/kernel/security/lsm")
        .context("reading /sys/kernel/security/lsm (is securityfs mounted?)")?;
    println!("lsm-proof: active LSMs: {lsms}");
    ensure!(
        lsms.split(',').any(|l| l == "bpf"),
        "the BPF LSM is not active (boot with lsm=...,bpf)"
    );

    let vmlinux = fs::read("/sys/kernel/btf/vmlinux").context("reading kernel BTF")?;
    let layout = btf::Btf::parse(&vmlinux).context("parsing kernel BTF")?;
    let f_inode: u64 = layout
        .member_offset("file", "f_inode", btf::Expect::Pointer)?
        .into();
    let i_ino: u64 = layout
        .member_offset("inode", "i_ino", btf::Expect::Int(8))?
        .into();
    println!("lsm-proof: offsetof(file, f_inode)={f_inode} offsetof(inode, i_ino)={i_ino}");

    let kernel_btf = Btf::from_sys_fs().context("Btf::from_sys_fs")?;
    let mut ebpf = EbpfLoader::new()
        .btf(Some(&kernel_btf))
        .set_global("FILE_F_INODE_OFFSET", &f_inode, true)
        .set_global("INODE_I_INO_OFFSET", &i_ino, true)
        .load_file(obj)
        .with_context(|| format!("loading {}", obj.display()))?;
    let program: &mut Lsm = ebpf
        .program_mut("file_open")
        .context("no file_open program in the object")?
        .try_into()?;
    program
        .load("file_open", &kernel_btf)
        .context("loading file_open (verifier)")?;
    let link = program.attach().context("attaching file_open")?;
    println!("lsm-proof: file_open attached");

    let mut deny: HashMap<MapData, u64, u8> = ebpf
        .take_map("DENY_INODES")
        .context("no DENY_INODES map")?
        .try_into()?;
    let mut denials: RingBuf<MapData> = ebpf
        .take_map("DENIALS")
        .context("no DENIALS map")?
        .try_into()?;

    let dir = PathBuf::from(format!("/tmp/lsm-proof.{}", std::process::id()));
    fs::create_dir_all(&dir)?;
    let denied = dir.join("denied");
    let allowed = dir.join("allowed");
    fs::write(&denied, b"secret")?;
    fs::write(&allowed, b"public")?;
    let ino = fs::metadata(&denied)?.ino();

    // Before any rule both open.
    expect_open(&denied, "secret")?;

    deny.insert(ino, 1, 0)
        .context("inserting into DENY_INODES")?;
    expect_eperm(&denied)?;
    expect_open(&allowed, "public")?;
    println!("lsm-proof: inode {ino} denied with EPERM, other file allowed");

    // The program reported the denial before open(2) returned, so the event
    // is already in the ring: no waiting needed.
    let event = denials
        .next()
        .context("no denial event in the DENIALS ring")?;
    let got = u64::from_ne_bytes(
        event
            .get(..8)
            .context("short denial event")?
            .try_into()
            .expect("8 bytes"),
    );
    ensure!(got == ino, "denial event has inode {got}, expected {ino}");
    drop(event);
    println!("lsm-proof: ring buffer event received for inode {got}");

    deny.remove(&ino).context("removing from DENY_INODES")?;
    expect_open(&denied, "secret")?;

    // Detaching must lift the policy even with the rule present.
    deny.insert(ino, 1, 0)?;
    expect_eperm(&denied)?;
    let program: &mut Lsm = ebpf
        .program_mut("file_open")
        .context("file_open vanished")?
        .try_into()?;
    program.detach(link).context("detaching file_open")?;
    expect_open(&denied, "secret")?;
    println!("lsm-proof: detach lifts the denial");

    fs::remove_dir_all(&dir).ok();
    Ok(())
}

fn expect_open(path: &Path, content: &str) -> Result<()> {
    let mut s = String::new();
    fs::File::open(path)
        .and_then(|mut f| f.read_to_string(&mut s))
        .with_context(|| format!("opening {} should succeed", path.display()))?;
    ensure!(
        s == content,
        "{} has unexpected content {s:?}",
        path.display()
    );
    Ok(())
}

fn expect_eperm(path: &Path) -> Result<()> {
    match fs::File::open(path) {
        Ok(_) => bail!("opening {} succeeded, expected EPERM", path.display()),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => Ok(()),
        Err(e) => bail!("opening {} failed with {e}, expected EPERM", path.display()),
    }
}
