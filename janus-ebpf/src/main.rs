//! Janus BPF LSM programs.
//!
//! For now a single trivial `file_open` hook that denies opening files whose
//! inode number is a key of `DENY_INODES`. It will be replaced by the real
//! policy engine.
//!
//! Rust cannot emit CO-RE relocations, so the layout of `struct file` and
//! `struct inode` is not compiled in: the loader reads the field offsets from
//! the running kernel's BTF and sets the `*_OFFSET` globals below before
//! loading (see `xtask/src/bin/lsm-proof.rs`).

#![no_std]
#![no_main]

use aya_ebpf::{
    cty::c_void,
    helpers::bpf_probe_read_kernel,
    macros::{lsm, map},
    maps::{HashMap, RingBuf},
    programs::LsmContext,
};

/// Inode numbers whose opening is denied (value unused).
#[map(name = "DENY_INODES")]
static DENY_INODES: HashMap<u64, u8> = HashMap::with_max_entries(1024, 0);

/// Denied inode numbers (one `u64` per denial), for audit in user space.
#[map(name = "DENIALS")]
static DENIALS: RingBuf = RingBuf::with_byte_size(16 * 4096, 0);

/// `offsetof(struct file, f_inode)`, set by the loader.
#[no_mangle]
static FILE_F_INODE_OFFSET: u64 = 0;
/// `offsetof(struct inode, i_ino)`, set by the loader.
#[no_mangle]
static INODE_I_INO_OFFSET: u64 = 0;

const EPERM: i32 = 1;

#[lsm(hook = "file_open")]
pub fn file_open(ctx: LsmContext) -> i32 {
    // LSM_HOOK(int, 0, file_open, struct file *file); the extra last argument
    // is the return value of the previous BPF LSM program.
    let retval: i32 = ctx.arg(1);
    if retval != 0 {
        return retval;
    }
    // Fail open (0): a read error must not lock the node out of its files.
    try_file_open(&ctx).unwrap_or_default()
}

fn try_file_open(ctx: &LsmContext) -> Result<i32, i32> {
    // Volatile reads so the compiler does not constant-fold the zeros that
    // the loader overwrites.
    let f_inode_off = unsafe { core::ptr::read_volatile(&FILE_F_INODE_OFFSET) };
    let i_ino_off = unsafe { core::ptr::read_volatile(&INODE_I_INO_OFFSET) };
    if f_inode_off == 0 || i_ino_off == 0 {
        // Not configured by the loader (neither field is at offset 0).
        return Ok(0);
    }
    let file: *const u8 = ctx.arg(0);
    let inode: *const c_void =
        unsafe { bpf_probe_read_kernel(file.add(f_inode_off as usize) as *const *const c_void)? };
    if inode.is_null() {
        return Ok(0);
    }
    let ino: u64 = unsafe {
        bpf_probe_read_kernel((inode as *const u8).add(i_ino_off as usize) as *const u64)?
    };
    if DENY_INODES.get_ptr(ino).is_some() {
        // Best effort: a full ring must not turn a deny into an allow.
        let _ = DENIALS.output(ino, 0);
        return Ok(-EPERM);
    }
    Ok(0)
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach here; never called.
    loop {}
}
