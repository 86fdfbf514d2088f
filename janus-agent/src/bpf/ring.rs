//! The decision ring's reader: each record the programs wrote becomes a log line, a count
//! and, where the guard asks, an audit record.

use std::collections::HashMap as StdHashMap;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use aya::maps::{MapData, PerCpuArray, RingBuf};
use janus_api::logformat::Process;
use janus_api::{Event, Mode, Verdict};
use janus_common::{
    Decision, DECISION_AUDIT, DECISION_IS_DIR, DECISION_MONITOR, DECISION_TOO_DEEP,
    DECISION_VIA_CUT, DECISION_VIA_DETACHED, MAX_NAMES, NAME_LEN, VERDICT_DENY,
};

use super::maps::Maps;
use super::{audit, TargetEntry, BACKEND};
use crate::decisions::{Entry, LogContext, LogSender};
use crate::metrics::Metrics;

/// Records the reader takes from the ring before it tells the programs what it has read:
/// a flood that keeps the ring from emptying must not leave the shares unaccounted.
const READ_BATCH: usize = 1024;

/// How often at most the reader looks at every target's tally while records are dropped,
/// and how long after the last drop it looks once more (a tally's add may be seen after
/// the `DROPPED` that follows it).
const RECOUNT_EVERY: Duration = Duration::from_millis(100);

pub(super) fn read_loop(
    mut ring: RingBuf<MapData>,
    dropped: PerCpuArray<MapData, u64>,
    (maps, targets): (&Mutex<Maps>, &Mutex<StdHashMap<u32, TargetEntry>>),
    stop: &AtomicBool,
    metrics: &Metrics,
    log: &LogSender,
) {
    let mut reader = Reader {
        audit: None,
        read: vec![0; maps.lock().expect("maps lock").shares.slots()],
    };
    let mut dropped_seen = 0u64;
    // When the tallies are to be read next, while drops are news; and `DROPPED` then.
    let mut recount: Option<Instant> = None;
    let mut recounted_at = 0u64;
    loop {
        // The programs are detached before `stop` is set: what is in the ring then is all
        // there will be, and it is read to the end.
        let stopping = stop.load(Ordering::Relaxed);
        // SAFETY: the ring's descriptor lives as long as `ring`.
        let fd = unsafe { BorrowedFd::borrow_raw(ring.as_raw_fd()) };
        let mut pfd = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
        let _ = nix::poll::poll(&mut pfd, nix::poll::PollTimeout::from(200u16));
        let mut n = reader.batch(&mut ring, targets, metrics, log);
        while stopping && n == READ_BATCH {
            n = reader.batch(&mut ring, targets, metrics, log);
        }
        let total: u64 = dropped.get(&0, 0).map_or(0, |c| c.iter().sum());
        let now = Instant::now();
        if total > dropped_seen {
            metrics.bpf_events_dropped.inc_by(total - dropped_seen);
            dropped_seen = total;
            recount.get_or_insert(now);
        }
        let mut maps = maps.lock().expect("maps lock");
        let mut targets = targets.lock().expect("targets lock");
        maps.shares.tell(&reader.read);
        if stopping || recount.is_some_and(|at| now >= at) {
            for g in targets.values_mut() {
                g.count_lost(&maps.shares);
            }
            // Again while drops come, and once more after the last; then not until the next.
            recount = (dropped_seen != recounted_at).then_some(now + RECOUNT_EVERY);
            recounted_at = dropped_seen;
        }
        drop((maps, targets));
        if stopping {
            return;
        }
        std::thread::sleep(Duration::from_millis(0));
    }
}

/// The reader's own state: the audit socket, and the records it has read of each slot.
struct Reader {
    audit: Option<audit::AuditLog>,
    read: Vec<u64>,
}

impl Reader {
    /// Reads up to `READ_BATCH` records; how many it read.
    fn batch(
        &mut self,
        ring: &mut RingBuf<MapData>,
        targets: &Mutex<StdHashMap<u32, TargetEntry>>,
        metrics: &Metrics,
        log: &LogSender,
    ) -> usize {
        for n in 0..READ_BATCH {
            let Some(item) = ring.next() else {
                return n;
            };
            if item.len() < std::mem::size_of::<Decision>() {
                metrics
                    .internal_errors
                    .with_label_values(&[BACKEND, "short_record"])
                    .inc();
                continue;
            }
            // SAFETY: Decision is plain data and the record is at least that long.
            let d: Decision = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            drop(item);
            // Read, whatever it holds: it was charged to its slot.
            let Some(read) = self.read.get_mut(d.slot as usize) else {
                metrics
                    .internal_errors
                    .with_label_values(&[BACKEND, "corrupt_record"])
                    .inc();
                continue;
            };
            *read += 1;
            handle(&d, targets, metrics, log, &mut self.audit);
        }
        READ_BATCH
    }
}

fn handle(
    d: &Decision,
    targets: &Mutex<StdHashMap<u32, TargetEntry>>,
    metrics: &Metrics,
    log: &LogSender,
    audit: &mut Option<audit::AuditLog>,
) {
    let targets = targets.lock().expect("targets lock");
    let Some(g) = targets.get(&d.target_id) else {
        metrics
            .internal_errors
            .with_label_values(&[BACKEND, "unknown_guard"])
            .inc();
        return;
    };
    let Ok(event) = Event::try_from(d.event) else {
        metrics
            .internal_errors
            .with_label_values(&[BACKEND, "corrupt_record"])
            .inc();
        return;
    };
    let verdict = if d.verdict == VERDICT_DENY {
        Verdict::Deny
    } else {
        Verdict::Allow
    };
    let mode = if d.flags & DECISION_MONITOR != 0 {
        Mode::Monitor
    } else {
        Mode::Enforce
    };
    let path = decision_path(d, g.paths.get(&d.rule).map(Vec::as_slice));
    let name = via_path(d, &path);
    g.counters.inc(verdict, event, mode);
    let audited = (d.flags & DECISION_AUDIT != 0)
        .then(|| audit_text(&g.ctx, d, (verdict, event, mode), &path, name.as_deref()));
    let entry = Entry {
        ctx: g.ctx.clone(),
        verdict,
        event,
        path,
        name,
        is_dir: d.flags & DECISION_IS_DIR != 0,
        subject: (d.flags & DECISION_TOO_DEEP == 0).then_some(usize::from(d.subject)),
        process: Process {
            pid: d.tgid as i32,
            ppid: (d.ppid != 0).then_some(d.ppid as i32),
            uid: Some(d.uid),
            gid: Some(d.gid),
            comm: Some(d.comm.iter().take_while(|b| **b != 0).copied().collect()),
            exe: None,
        },
        mode,
    };
    // The kernel may hold a send while its audit backlog is full: never with the targets
    // locked, which placing and lifting targets wait on.
    drop(targets);
    if let Some(text) = audited {
        if audit.is_none() {
            *audit = audit::AuditLog::open().ok();
        }
        let sent = audit.as_mut().map(|a| a.send(&text));
        if !matches!(sent, Some(Ok(()))) {
            metrics
                .internal_errors
                .with_label_values(&[BACKEND, "audit"])
                .inc();
        }
    }
    log.send(entry);
}

/// The text of a decision's audit record.
fn audit_text(
    ctx: &LogContext,
    d: &Decision,
    (verdict, event, mode): (Verdict, Event, Mode),
    path: &[u8],
    via: Option<&[u8]>,
) -> Vec<u8> {
    let mut text = format!(
        "janus: response={} mode={} event={} guard={}/{} pod={} pid={} path=",
        verdict.as_lower(),
        mode,
        event.kernel_name(),
        ctx.guard.namespace,
        ctx.guard.name,
        ctx.pod,
        d.tgid
    )
    .into_bytes();
    // Hex like the kernel's own audit fields, so any byte is safe in the record.
    let hex = |bytes: &[u8]| -> Vec<u8> {
        bytes
            .iter()
            .flat_map(|b| format!("{b:02X}").into_bytes())
            .collect()
    };
    text.extend(hex(path));
    if let Some(via) = via {
        text.extend_from_slice(b" via=");
        text.extend(hex(via));
    }
    text
}

/// Appends `/` and a name as the programs copy it (NUL-terminated), marked `…` where the
/// program found it longer than the field (bit `i` of `cut`).
fn push_walked(path: &mut Vec<u8>, n: &[u8; NAME_LEN], cut: u8, i: usize) {
    let len = n.iter().position(|&b| b == 0).unwrap_or(NAME_LEN);
    if path.last() != Some(&b'/') {
        path.push(b'/');
    }
    path.extend_from_slice(&n[..len]);
    if cut & (1 << i) != 0 {
        path.extend_from_slice("…".as_bytes());
    }
}

/// The container path of the decided file: the deciding rule's path, then the names met
/// on the walk up below it.
fn decision_path(d: &Decision, rule_path: Option<&[u8]>) -> Vec<u8> {
    let depth = usize::from(d.depth);
    let mut path = match rule_path {
        Some(p) if d.flags & DECISION_TOO_DEEP == 0 => p.to_vec(),
        _ => b"/...".to_vec(),
    };
    if depth > MAX_NAMES || d.flags & DECISION_TOO_DEEP != 0 {
        path.extend_from_slice(b"/...");
    }
    for i in (0..depth.min(MAX_NAMES)).rev() {
        push_walked(&mut path, &d.names[i], d.names_cut, i);
    }
    path
}

/// The path the task used (`{via}`), where the kernel gave it and it is not `path`. A path
/// longer than the names kept starts with `/...`, and is taken as `path` when it reached the
/// root and is `path`'s ending; one that did not lead to the process's root starts with
/// `(detached)` and is always given.
fn via_path(d: &Decision, path: &[u8]) -> Option<Vec<u8>> {
    let n = usize::from(d.via_len).min(MAX_NAMES);
    if n == 0 {
        return None;
    }
    let mut via = Vec::new();
    for i in (0..n).rev() {
        push_walked(&mut via, &d.via[i], d.via_cut, i);
    }
    let (cut, detached) = (
        d.flags & DECISION_VIA_CUT != 0,
        d.flags & DECISION_VIA_DETACHED != 0,
    );
    if !detached && (via == path || cut && path.ends_with(&via)) {
        return None;
    }
    if cut {
        via.splice(0..0, b"/...".iter().copied());
    }
    if detached {
        via.splice(0..0, b"(detached)".iter().copied());
    }
    Some(via)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(depth: u8, names: &[&str]) -> Decision {
        let mut d: Decision = unsafe { std::mem::zeroed() };
        d.depth = depth;
        for (i, n) in names.iter().enumerate() {
            d.names[i][..n.len()].copy_from_slice(n.as_bytes());
        }
        d
    }

    #[test]
    fn paths_join_rule_and_walked_names() {
        let d = record(2, &["f", "sub", "data"]);
        assert_eq!(decision_path(&d, Some(b"/data")), b"/data/sub/f");
        assert_eq!(decision_path(&record(0, &["x"]), Some(b"/x")), b"/x");
        assert_eq!(decision_path(&record(1, &["a"]), Some(b"/")), b"/a");
    }

    fn with_via(mut d: Decision, via: &[&str], cut: bool) -> Decision {
        d.via_len = via.len() as u8;
        for (i, n) in via.iter().enumerate() {
            d.via[i][..n.len()].copy_from_slice(n.as_bytes());
        }
        if cut {
            d.flags |= DECISION_VIA_CUT;
        }
        d
    }

    #[test]
    fn the_name_used_is_given_where_it_differs() {
        let d = record(1, &["plain"]);
        let path = decision_path(&d, Some(b"/data/d1"));
        let same = with_via(d, &["plain", "d1", "data"], false);
        assert_eq!(via_path(&same, &path), None);
        let moved = with_via(d, &["plain", "moved", "data"], false);
        assert_eq!(
            via_path(&moved, &path).as_deref(),
            Some(&b"/data/moved/plain"[..])
        );
        // Cut short: the same ending is the same name, another is given with its cut.
        assert_eq!(via_path(&with_via(d, &["plain", "d1"], true), &path), None);
        assert_eq!(
            via_path(&with_via(d, &["plain", "m"], true), &path).as_deref(),
            Some(&b"/.../m/plain"[..])
        );
        // Not known (a hook without a mount).
        assert_eq!(via_path(&with_via(d, &[], false), &path), None);
        // Not leading to the root: always given, marked, even where it looks the same.
        let mut detached = with_via(d, &["plain", "d1", "data"], false);
        detached.flags |= DECISION_VIA_DETACHED;
        assert_eq!(
            via_path(&detached, &path).as_deref(),
            Some(&b"(detached)/data/d1/plain"[..])
        );
    }

    #[test]
    fn names_longer_than_the_field_are_marked_cut() {
        let long = "n".repeat(NAME_LEN - 1);
        let mut d = record(1, &[long.as_str()]);
        // 63 bytes fit: no mark.
        assert_eq!(
            decision_path(&d, Some(b"/data")),
            format!("/data/{long}").into_bytes()
        );
        d.names_cut = 1;
        assert_eq!(
            decision_path(&d, Some(b"/data")),
            format!("/data/{long}…").into_bytes()
        );
        // A link named by the long name and more is not taken for the guarded name, and
        // the guarded name itself is.
        let guarded = format!("/data/{long}").into_bytes();
        let same = with_via(record(0, &[]), &[long.as_str(), "data"], false);
        assert_eq!(via_path(&same, &guarded), None);
        let mut linked = same;
        linked.via_cut = 1;
        assert_eq!(
            via_path(&linked, &guarded),
            Some(format!("/data/{long}…").into_bytes())
        );
    }

    #[test]
    fn a_cut_path_that_did_not_reach_the_root_is_given() {
        let d = record(1, &["plain"]);
        let path = decision_path(&d, Some(b"/data/d1"));
        let mut v = with_via(d, &["plain", "d1"], true);
        v.flags |= DECISION_VIA_DETACHED;
        assert_eq!(
            via_path(&v, &path).as_deref(),
            Some(&b"(detached)/.../d1/plain"[..])
        );
    }
}
