//! `audit: true` under the BPF backend: the kernel decided without fanotify's FAN_AUDIT, so
//! the agent writes one `AUDIT_USER_AVC` record per audited decision to the kernel audit
//! log over NETLINK_AUDIT (needs CAP_AUDIT_WRITE). With no audit daemon the kernel prints
//! the records to its log (`dmesg`); with one, they land in its log as user AVCs.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const AUDIT_USER_AVC: u16 = 1107;

pub struct AuditLog {
    fd: OwnedFd,
    seq: u32,
}

impl AuditLog {
    pub fn open() -> io::Result<AuditLog> {
        // SAFETY: plain socket(2); the result is checked before use.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_AUDIT,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor we own.
        Ok(AuditLog {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            seq: 0,
        })
    }

    /// Sends one record; the kernel adds pid, uid and the rest of the header.
    pub fn send(&mut self, text: &[u8]) -> io::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let hdr = std::mem::size_of::<libc::nlmsghdr>();
        let len = hdr + text.len() + 1;
        let mut buf = vec![0u8; (len + 3) & !3];
        let nlh = libc::nlmsghdr {
            nlmsg_len: len as u32,
            nlmsg_type: AUDIT_USER_AVC,
            nlmsg_flags: libc::NLM_F_REQUEST as u16,
            nlmsg_seq: self.seq,
            nlmsg_pid: 0,
        };
        // SAFETY: nlmsghdr is plain data and `buf` is at least `hdr` bytes long.
        unsafe { std::ptr::write_unaligned(buf.as_mut_ptr().cast::<libc::nlmsghdr>(), nlh) };
        buf[hdr..hdr + text.len()].copy_from_slice(text);
        // SAFETY: sockaddr_nl is plain data; zero is the kernel's address.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: buf and addr are valid for the lengths given.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                0,
                std::ptr::addr_of!(addr).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}
