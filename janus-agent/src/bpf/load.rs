//! Loading the programs into the kernel and attaching them to their LSM hooks.

use std::time::Instant;

use aya::maps::{Array, Map, MapError};
use aya::programs::Lsm;
use aya::{Btf, Ebpf, EbpfLoader};

use super::maps::Capacity;
use super::probe::{kernel_offsets, lsm_active, raise_memlock_limit};
use super::StartError;

/// Loads the programs with maps of `capacity` and attaches them: what the kernel refuses
/// is the error. Without `path_rename` and `path_link` (which only name what the inode hooks
/// refuse) it goes on, and says so.
pub(super) fn attach(capacity: Capacity) -> Result<Ebpf, StartError> {
    lsm_active()?;
    raise_memlock_limit();
    let t0 = Instant::now();
    let offsets = kernel_offsets()?;
    let kernel_btf = Btf::from_sys_fs().map_err(StartError::AyaBtf)?;
    tracing::debug!(elapsed = ?t0.elapsed(), ?offsets, "read the kernel's BTF");
    let mut ebpf = EbpfLoader::new()
        .btf(Some(&kernel_btf))
        .override_global("OFFSETS", &offsets, true)
        .map_max_entries("RULES", capacity.rules)
        .map_max_entries("SCOPES", capacity.targets)
        .map_max_entries("ROOTS", capacity.targets)
        .map_max_entries("TALLIES", capacity.share_slots())
        .map_max_entries("DRAINED", capacity.share_slots())
        .load(OBJECT)
        .map_err(StartError::Object)?;
    read_bpf_log(&mut ebpf);
    for name in PROGRAMS {
        let program: &mut Lsm = ebpf
            .program_mut(name)
            .ok_or(StartError::Missing(name))?
            .try_into()
            .map_err(|source| StartError::Program { name, source })?;
        let attached = program
            .load(name, &kernel_btf)
            .map_err(|source| StartError::Program { name, source })
            .and_then(|()| {
                program
                    .attach()
                    .map(drop)
                    .map_err(|source| StartError::Attach { name, source })
            });
        match attached {
            Ok(()) => {
                tracing::debug!(program = name, elapsed = ?t0.elapsed(), "attached");
                if let Some(i) = NAMING_ONLY.iter().position(|n| *n == name) {
                    // The inode hooks leave the record of a monitored move to it.
                    let map_error = |source| StartError::Map {
                        name: "NAMED",
                        source,
                    };
                    let mut named: Array<_, u32> = ebpf
                        .map_mut("NAMED")
                        .ok_or(StartError::Missing("NAMED"))?
                        .try_into()
                        .map_err(map_error)?;
                    named.set(i as u32, 1, 0).map_err(map_error)?;
                }
            }
            // The inode hooks refuse the same moves; these only add the name used.
            Err(e) if NAMING_ONLY.contains(&name) => tracing::warn!(
                program = name,
                error = %e,
                "refused moves and links are logged without the name used \
                 (the kernel needs CONFIG_SECURITY_PATH and 5.19 or later)"
            ),
            Err(e) => return Err(e),
        }
    }
    Ok(ebpf)
}

#[cfg(janus_bpf_embedded)]
static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("JANUS_EBPF_OBJ_PATH"));
#[cfg(not(janus_bpf_embedded))]
static OBJECT: &[u8] = &[];

const PROGRAMS: [&str; 8] = [
    "file_open",
    "file_permission",
    "mmap_file",
    "file_mprotect",
    "path_rename",
    "path_link",
    "inode_rename",
    "inode_link",
];

/// Programs whose absence loses only a log line's ` via `, never a refusal; in the order
/// of the programs' `NAMED` map (rename, link).
const NAMING_ONLY: [&str; 2] = ["path_rename", "path_link"];

/// Takes the map `name` out of the loaded object, as the kind `as_kind` makes of it.
pub(super) fn map<T>(
    ebpf: &mut Ebpf,
    name: &'static str,
    as_kind: impl FnOnce(Map) -> Result<T, MapError>,
) -> Result<T, StartError> {
    let map = ebpf.take_map(name).ok_or(StartError::Missing(name))?;
    as_kind(map).map_err(|source| StartError::Map { name, source })
}

/// An error with its causes, one line (aya's load error keeps errno, and the verifier's
/// log, in its source).
pub(super) fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string().trim_end().trim_end_matches(':').to_owned();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(s.to_string().trim_end().trim_end_matches(':'));
        source = s.source();
    }
    out
}

/// The programs' aya-log records (a fail-closed deny, say), through `log` into the agent's
/// own diagnostics on stderr.
fn read_bpf_log(ebpf: &mut Ebpf) {
    let logger = match aya_log::EbpfLogger::init(ebpf) {
        Ok(logger) => logger,
        Err(e) => {
            tracing::warn!(error = %e, "the BPF programs' diagnostics (aya-log) are not read");
            return;
        }
    };
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        tracing::warn!("no async runtime: the BPF programs' diagnostics (aya-log) are not read");
        return;
    };
    runtime.spawn(async move {
        use tokio::io::{unix::AsyncFd, Interest};
        // SAFETY: the AsyncFd owns the logger, which owns the descriptor: it stays open for
        // as long as it is registered.
        let registered = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) };
        let Ok(mut logger) = registered else {
            return;
        };
        while let Ok(mut ready) = logger.readable_mut().await {
            ready.get_inner_mut().flush();
            ready.clear_ready();
        }
    });
}
