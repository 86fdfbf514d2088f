//! The answering thread: reads the agent's permission group, finds whose access each event
//! is ([`Registry`]), decides it for every target that guards it and answers, all events of
//! one read with one `writev`. It only decides and replies: `statx` (and `readlink` for an
//! object it does not know) on the event's descriptor, no open of any guarded file, no
//! logging, no lock but read locks. What follows an answer (reading names for the log,
//! closing the descriptors, the log lines) is its settling thread's, on the other core
//! while it reads the next events; on a shared core, the settling thread yields to events
//! waiting before each name it reads.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use janus_api::{Event, Verdict};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::EventFd;
use prometheus::Histogram;

use super::group::{event_of, AlignedBuf, PermGroup, RawEvent};
use super::target::{TargetShared, BACKEND};
use super::FastMap;
use crate::decisions::{Entry, LogSender, Stamp};
use crate::metrics::Metrics;
use crate::resolve::{self, FileId};
use janus_api::logformat::Process;

/// Which targets an event's process belongs to, rebuilt by the marker thread whenever a
/// target comes, goes or its mounts change.
#[derive(Default)]
pub struct Registry {
    /// By the mount the file was reached through: a container's own mounts.
    by_mount: FastMap<u64, Vec<Arc<TargetShared>>>,
    /// By root directory: a process of the container in a mount namespace of its own
    /// making reaches files through copies of its mounts, but keeps its root.
    by_root: FastMap<FileId, Vec<Arc<TargetShared>>>,
    /// By PID namespace, for targets that have one: such a process may also have changed its
    /// root, but stays in its container's PID namespace or one nested in it.
    by_pid_ns: FastMap<u64, Vec<Arc<TargetShared>>>,
    /// Whether any target can answer deny: what an event that cannot even be attributed
    /// gets.
    any_deny: bool,
}

impl Registry {
    pub fn new<'a>(targets: impl IntoIterator<Item = &'a Arc<TargetShared>>) -> Registry {
        let mut r = Registry::default();
        for t in targets {
            for m in &t.view.read().expect("view lock").mounts {
                r.by_mount.entry(*m).or_default().push(t.clone());
            }
            r.by_root
                .entry(t.root.root_id())
                .or_default()
                .push(t.clone());
            if let Some(ns) = t.root.pid_ns() {
                r.by_pid_ns.entry(ns).or_default().push(t.clone());
            }
            r.any_deny |= t.on_error == Verdict::Deny;
        }
        r
    }

    /// The targets whose access this is: by mount (the fast path), else by the process's
    /// root or PID namespace (procfs reads, for files reached through other mounts only).
    fn of(&self, mount: u64, pid: i32) -> &[Arc<TargetShared>] {
        if let Some(t) = self.by_mount.get(&mount) {
            return t;
        }
        if self.by_root.is_empty() {
            return &[];
        }
        if let Some(t) = resolve::process_root(pid).and_then(|root| self.by_root.get(&root)) {
            return t;
        }
        if self.by_pid_ns.is_empty() {
            return &[];
        }
        resolve::pid_ns_chain(pid)
            .iter()
            .find_map(|ns| self.by_pid_ns.get(ns))
            .map_or(&[], Vec::as_slice)
    }
}

pub struct Answerer {
    pub perm: Arc<PermGroup>,
    pub registry: Arc<RwLock<Arc<Registry>>>,
    pub stop: Arc<EventFd>,
    pub metrics: Arc<Metrics>,
    pub log: LogSender,
    /// `janus_decision_latency_seconds{backend="fanotify"}`, looked up once.
    pub latency: Histogram,
}

/// The answers to one read's events, written together once every event in it is decided,
/// and what follows them.
#[derive(Default)]
struct Batch {
    responses: Vec<libc::fanotify_response>,
    settle: Settle,
}

/// What follows a batch's answer, for the settling thread.
#[derive(Default)]
struct Settle {
    /// When its events were read: its lines' time, however late they are settled.
    at: Option<Stamp>,
    /// Each event's descriptor, closed once its name is read.
    held: Vec<OwnedFd>,
    logs: Vec<Entry>,
    /// Lines about objects decided by identity that show the name (`{via}`, `{name}`, JSON),
    /// read once the kernel has its answer: (index in `logs`, index in `held`, the target,
    /// whether the object has no name left).
    names: Vec<(usize, usize, Arc<TargetShared>, bool)>,
}

/// Descriptors answered and not yet closed by the settling thread, at most: past it (a
/// settling thread that cannot keep up), the answering thread settles a batch itself, so
/// that they do not pile up (each event holds one, and a process runs out of them); its
/// lines may then come before those of batches still queued.
const MAX_HELD: usize = 1024;
/// Emptied batches kept for reuse, at most: as many as are in flight at a time, mostly.
const SPARES: usize = 8;
/// How long the settling thread lets batches gather after it has settled all it had,
/// before it waits on the queue again: an answering thread wakes it only while it waits,
/// and that wake (a futex call, a context switch) costs about a decision's worth of CPU.
const GATHER: std::time::Duration = std::time::Duration::from_micros(200);

impl Answerer {
    /// Answers until the group is stopped and drained, then waits for its settling thread.
    pub fn run(&self) {
        let held = Arc::new(AtomicUsize::new(0));
        // The CPU this thread last read on: the settling thread makes way only there.
        let cpu = Arc::new(AtomicI32::new(-1));
        let (to_settle, settles) = sync_channel(MAX_HELD);
        // Settled batches come back emptied, their buffers kept: a batch's vectors are
        // then not allocated on this thread and freed on the other at every read.
        let (to_reuse, reuse) = sync_channel(SPARES);
        let spawned = {
            let (log, held) = (self.log.clone(), held.clone());
            let answering = (self.perm.clone(), cpu.clone());
            std::thread::Builder::new()
                .name("fanotify-settle".into())
                .spawn(move || settle(&settles, &to_reuse, &log, &held, &answering))
        };
        let settler = match spawned {
            Ok(settler) => Some(settler),
            Err(e) => {
                tracing::error!(error = %e, "no settling thread: the answering thread settles every batch itself");
                None
            }
        };
        self.answer(&cpu, |mut batch, links, path| {
            let n = batch.held.len();
            // A batch alone is taken whatever its size: at most one read's events.
            let before = held.fetch_add(n, Ordering::Relaxed);
            if settler.is_some() && (before == 0 || before + n <= MAX_HELD) {
                match to_settle.try_send(batch) {
                    Ok(()) => return reuse.try_recv().unwrap_or_default(),
                    Err(TrySendError::Full(b) | TrySendError::Disconnected(b)) => batch = b,
                }
            }
            held.fetch_sub(n, Ordering::Relaxed);
            settle_batch(&mut batch, links, path, &self.log, None);
            batch
        });
        drop(to_settle);
        if let Some(Err(_)) = settler.map(|s| s.join()) {
            tracing::error!(
                "the settling thread failed: the lines of the batches it held are lost"
            );
        }
    }

    /// Answers every read's events; `settle` takes what follows an answer (with this
    /// thread's `/proc/self/fd` and path buffer, should it settle it here) and gives back an
    /// empty `Settle` for the next read.
    fn answer(
        &self,
        cpu: &AtomicI32,
        mut settle: impl FnMut(Settle, &FdLinks, &mut [u8]) -> Settle,
    ) {
        let mut buf = AlignedBuf::boxed();
        let mut path = vec![0u8; libc::PATH_MAX as usize * 2];
        let mut batch = Batch::default();
        let me = std::process::id() as i32;
        let links = FdLinks::open();
        let mut stopping = false;
        loop {
            let ready = wait(&[self.perm.as_fd(), self.stop.as_fd()]);
            if ready[1] && !stopping {
                // The marker thread removed every mark: no new events, and those queued are
                // answered below, since nobody else would answer them while the group lives.
                stopping = true;
            }
            let events = match self.perm.read(&mut buf) {
                Ok(events) => events,
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && stopping => return,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EINTR)) => continue,
                Err(e) => {
                    tracing::error!(error = %e, "reading permission events");
                    self.metrics
                        .internal_errors
                        .with_label_values(&[BACKEND, "read"])
                        .inc();
                    continue;
                }
            };
            let read_at = Instant::now();
            batch.settle.at = Some(Stamp::now());
            // SAFETY: no arguments.
            cpu.store(unsafe { libc::sched_getcpu() }, Ordering::Relaxed);
            let registry = self.registry.read().expect("registry lock").clone();
            for event in events {
                self.decide_event(event, me, &registry, &links, &mut path, &mut batch);
            }
            let failed = self.perm.respond_all(&batch.responses);
            batch.responses.clear();
            if failed > 0 {
                self.metrics
                    .response_errors
                    .with_label_values(&[BACKEND])
                    .inc_by(failed as u64);
            }
            // Each event (each holds a descriptor) waited for those read before it.
            let waited = read_at.elapsed().as_secs_f64();
            for _ in 0..batch.settle.held.len() {
                self.latency.observe(waited);
            }
            batch.settle = settle(std::mem::take(&mut batch.settle), &links, &mut path);
        }
    }

    fn internal_error(&self, kind: &str) {
        self.metrics
            .internal_errors
            .with_label_values(&[BACKEND, kind])
            .inc();
    }

    fn decide_event(
        &self,
        ev: RawEvent,
        me: i32,
        registry: &Registry,
        links: &FdLinks,
        path: &mut [u8],
        batch: &mut Batch,
    ) {
        if ev.is_overflow() {
            self.metrics.overflows.with_label_values(&["perm"]).inc();
            return;
        }
        let Some(fd) = ev.fd else {
            self.internal_error("no_fd");
            return;
        };
        let mut verdict = Verdict::Allow;
        let mut audit = false;
        // The agent's own opens are its marking walks.
        if let (Some(event), false) = (event_of(ev.mask), ev.pid == me) {
            match resolve::statx(fd.as_fd()) {
                Err(_) => {
                    // Whose access it is cannot be told: the strictest answer of all.
                    self.internal_error("statx");
                    if registry.any_deny {
                        verdict = Verdict::Deny;
                    }
                }
                Ok(st) => {
                    let targets = registry.of(st.stx_mnt_id, ev.pid);
                    if !targets.is_empty() {
                        (verdict, audit) = self.decide(
                            targets,
                            &st,
                            fd.as_fd(),
                            event,
                            ev.pid,
                            links,
                            path,
                            batch,
                        );
                    }
                }
            }
        }
        batch.responses.push(
            self.perm
                .response(fd.as_fd(), verdict == Verdict::Allow, audit),
        );
        batch.settle.held.push(fd);
    }

    /// Decides for every target the access belongs to; any deny refuses it.
    #[allow(clippy::too_many_arguments)]
    fn decide(
        &self,
        targets: &[Arc<TargetShared>],
        st: &libc::statx,
        fd: BorrowedFd<'_>,
        event: Event,
        pid: i32,
        links: &FdLinks,
        path: &mut [u8],
        batch: &mut Batch,
    ) -> (Verdict, bool) {
        let id = FileId::of(st);
        let is_dir = resolve::is_dir(st);
        let deleted = st.stx_nlink == 0;
        // The event's path, read only for an object no target knows by identity.
        let mut len: Option<Option<usize>> = None;
        let (mut verdict, mut audit) = (Verdict::Allow, false);
        for t in targets {
            let view = t.view.read().expect("view lock");
            let known = view.objects.contains_key(&id);
            let name = if known {
                None
            } else {
                let n = *len.get_or_insert_with(|| links.path_into(fd, path).ok());
                let Some(n) = n else {
                    // Neither the object nor its name is known.
                    self.internal_error("readlink");
                    if t.on_error == Verdict::Deny {
                        verdict = Verdict::Deny;
                    }
                    continue;
                };
                let r = rendered(&path[..n], deleted);
                t.root.to_container(r).map(|range| &r[range])
            };
            let decided = view.decide(id, name, event, t.owners.contains(&pid));
            drop(view);
            let Some(d) = decided else { continue };
            let (v, mode) = (d.decision.verdict, d.decision.mode);
            t.counters.inc(v, event, mode);
            if d.decision.refuses() {
                verdict = Verdict::Deny;
            }
            audit |= t.guard().subjects[d.decision.subject].audit;
            let path = d.path.into_bytes();
            if known && self.log.shows_name(t.guard()) {
                // Its descriptor is pushed right after this returns.
                let settle = &mut batch.settle;
                let line = (settle.logs.len(), settle.held.len(), t.clone(), deleted);
                settle.names.push(line);
            }
            batch.settle.logs.push(Entry {
                ctx: t.ctx.clone(),
                verdict: v,
                event,
                name: name.filter(|n| *n != path.as_slice()).map(<[u8]>::to_vec),
                path,
                is_dir,
                subject: Some(d.decision.subject),
                process: Process {
                    pid,
                    ..Process::default()
                },
                mode,
            });
        }
        (verdict, audit)
    }
}

/// The settling thread: for each answered batch, reads the names of objects decided by
/// identity whose lines show them (reading a path through procfs costs as much as the rest
/// of a decision, and it is only for the log), closes the descriptors and sends the lines.
fn settle(
    batches: &Receiver<Settle>,
    reuse: &SyncSender<Settle>,
    log: &LogSender,
    held: &AtomicUsize,
    answering: &(Arc<PermGroup>, Arc<AtomicI32>),
) {
    let links = FdLinks::open();
    let mut path = vec![0u8; libc::PATH_MAX as usize * 2];
    while let Ok(first) = batches.recv() {
        let mut next = Some(first);
        while let Some(mut batch) = next {
            let closed = settle_batch(&mut batch, &links, &mut path, log, Some(answering));
            held.fetch_sub(closed, Ordering::Relaxed);
            // Dropped here when enough are waiting already.
            let _ = reuse.try_send(batch);
            next = batches.try_recv().ok();
        }
        std::thread::sleep(GATHER);
    }
}

/// Names one batch's objects decided by identity, closes its descriptors and sends its
/// lines, leaving it empty; how many descriptors it closed. On the settling thread, it
/// makes way for the answering thread (its group, the CPU it last read on) before each name.
fn settle_batch(
    batch: &mut Settle,
    links: &FdLinks,
    path: &mut [u8],
    log: &LogSender,
    answering: Option<&(Arc<PermGroup>, Arc<AtomicI32>)>,
) -> usize {
    // One event's lines (a line per target that decided it) come together: its name is
    // read once.
    let mut read: Option<(usize, usize)> = None;
    for (line, held, t, deleted) in batch.names.drain(..) {
        let n = match read {
            Some((h, n)) if h == held => n,
            _ => {
                if let Some((perm, cpu)) = answering {
                    make_way(perm, cpu);
                }
                let Ok(n) = links.path_into(batch.held[held].as_fd(), path) else {
                    continue;
                };
                read = Some((held, n));
                n
            }
        };
        // Unlinked since it was decided: the kernel's mark of it is not part of the name.
        let deleted = deleted
            || (path[..n].ends_with(DELETED)
                && resolve::statx(batch.held[held].as_fd()).is_ok_and(|st| st.stx_nlink == 0));
        let name = rendered(&path[..n], deleted);
        let entry = &mut batch.logs[line];
        if let Some(r) = t.root.to_container(name) {
            if name[r.clone()] != entry.path[..] {
                entry.name = Some(name[r].to_vec());
            }
        }
    }
    let closed = batch.held.len();
    close_all(&mut batch.held);
    let at = batch.at.take().unwrap_or_else(Stamp::now);
    log.send_all(at, batch.logs.drain(..));
    closed
}

/// Lets events waiting in `perm` be answered first when this thread runs where the
/// answering thread last read (`cpu`): a batch's names would otherwise hold that core while
/// they wait. Elsewhere it would only give its core away.
fn make_way(perm: &PermGroup, cpu: &AtomicI32) {
    // SAFETY: no arguments.
    if unsafe { libc::sched_getcpu() } != cpu.load(Ordering::Relaxed) {
        return;
    }
    let mut fds = [PollFd::new(perm.as_fd(), PollFlags::POLLIN)];
    if poll(&mut fds, PollTimeout::ZERO).is_ok_and(|n| n > 0) {
        // SAFETY: no arguments; it only lets other threads run.
        unsafe { libc::sched_yield() };
    }
}

/// Closes `fds`, each run of consecutive numbers with one `close_range`: the kernel gives
/// events the lowest free numbers, so the descriptors of successive events mostly are.
fn close_all(fds: &mut Vec<OwnedFd>) {
    let mut raw: Vec<i32> = fds.drain(..).map(IntoRawFd::into_raw_fd).collect();
    raw.sort_unstable();
    for run in raw.chunk_by(|a, b| *b == *a + 1) {
        let (first, last) = (run[0], run[run.len() - 1]);
        // SAFETY: every number from `first` to `last` is a descriptor of `run`, ours to
        // close: no other is in that range.
        let ranged =
            run.len() > 1 && unsafe { libc::syscall(libc::SYS_close_range, first, last, 0) } == 0;
        if !ranged {
            for fd in run {
                // SAFETY: ours, closed once.
                drop(unsafe { OwnedFd::from_raw_fd(*fd) });
            }
        }
    }
}

/// What the kernel appends to the path of an open file with no name left.
const DELETED: &[u8] = b" (deleted)";

/// A path as the kernel renders an open file's, without the mark of a file with no name left.
fn rendered(path: &[u8], deleted: bool) -> &[u8] {
    if deleted {
        path.strip_suffix(DELETED).unwrap_or(path)
    } else {
        path
    }
}

/// Waits until one of `fds` is readable; returns which were.
fn wait(fds: &[BorrowedFd<'_>]) -> Vec<bool> {
    let mut polls: Vec<PollFd<'_>> = fds
        .iter()
        .map(|fd| PollFd::new(*fd, PollFlags::POLLIN))
        .collect();
    match poll(&mut polls, PollTimeout::NONE) {
        Ok(_) => polls
            .iter()
            .map(|p| p.revents().is_some_and(|r| !r.is_empty()))
            .collect(),
        Err(_) => vec![false; fds.len()],
    }
}

/// The agent's `/proc/self/fd`, held open: an event descriptor's path is then one
/// readlinkat of its number, not a walk of `/proc/self/fd/N` from `/` on every event.
struct FdLinks(Option<OwnedFd>);

impl FdLinks {
    fn open() -> FdLinks {
        match resolve::open_path(None, b"/proc/self/fd", libc::O_DIRECTORY) {
            Ok(fd) => FdLinks(Some(fd)),
            Err(e) => {
                tracing::warn!(error = %e, "opening /proc/self/fd; reading each event's path from /");
                FdLinks(None)
            }
        }
    }

    /// Like [`resolve::fd_path_into`].
    fn path_into(&self, fd: BorrowedFd<'_>, buf: &mut [u8]) -> std::io::Result<usize> {
        let Some(dir) = &self.0 else {
            return resolve::fd_path_into(fd, buf);
        };
        // The descriptor's number as a C string, without allocating.
        let mut name = [0u8; 12];
        let mut at = name.len() - 1;
        let mut n = fd.as_raw_fd().unsigned_abs();
        loop {
            at -= 1;
            name[at] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        // SAFETY: `name[at..]` is NUL-terminated; `buf` is writable for its length.
        let n = unsafe {
            libc::readlinkat(
                dir.as_raw_fd(),
                name[at..].as_ptr().cast(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let n = n as usize;
        if n == buf.len() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "path too long",
            ));
        }
        Ok(n)
    }
}
