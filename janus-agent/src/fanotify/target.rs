//! Enforcing one guard on one process: an answering thread that only decides and replies,
//! and a marker thread that places marks, follows new directories and re-resolves paths.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use prometheus::Histogram;

use janus_api::decide::Rule;
use janus_api::{Event, GuardPath, GuardPolicy, RuleSet, Verdict};

use super::created::{CreateWatch, Created};
use super::group::{event_of, perm_mask, AlignedBuf, FanotifyError, PermGroup, RawEvent};
use super::tree::Tree;
use crate::decisions::{Entry, LogContext, LogSender};
use crate::metrics::{DecisionCounters, Metrics};
use crate::resolve::{self, ContainerRoot, ResolveError};
use crate::state::{PathState, PathStatus, Phase, TargetState};

pub const BACKEND: &str = "fanotify";
/// How often missing paths are retried and symlinked paths re-resolved.
const RESOLVE_PERIOD: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error(transparent)]
    Fanotify(#[from] FanotifyError),
    #[error("pid {pid}: pidfd_open: {error}")]
    Pidfd { pid: i32, error: std::io::Error },
    #[error("eventfd: {0}")]
    EventFd(nix::Error),
}

/// What the answering thread needs to decide, swapped whole when paths re-resolve.
struct View {
    rules: RuleSet,
    /// Mount IDs of the target's mount namespace, sorted. A file reached through another
    /// mount is being opened by someone outside the target, in their own coordinates.
    mounts: Vec<u64>,
    /// Guarded files by inode (dev, ino), with their guarded path: a hard link elsewhere in
    /// the container reaches the same inode by another name, and is decided as the file.
    files: Vec<(u64, u64, GuardPath)>,
}

struct Shared {
    perm: PermGroup,
    root: ContainerRoot,
    owners: [i32; 2],
    view: RwLock<Arc<View>>,
    stop: EventFd,
    ctx: Arc<LogContext>,
    counters: DecisionCounters,
    /// `janus_decision_latency_seconds{backend="fanotify"}`, looked up once.
    latency: Histogram,
    metrics: Arc<Metrics>,
    log: LogSender,
    /// The answer for an event the agent could not decide: the strictest the guard can give.
    on_error: Verdict,
    state: Arc<Mutex<TargetState>>,
}

/// A running target. Dropping it without [`TargetHandle::stop`] leaves it running.
pub struct TargetHandle {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl TargetHandle {
    pub fn state(&self) -> TargetState {
        self.shared.state.lock().expect("state lock").clone()
    }

    /// Lifts the guard: threads end and closing the groups removes every mark.
    pub fn stop(self) {
        let _ = self.shared.stop.write(1);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

pub struct TargetSpec {
    pub guard: Arc<GuardPolicy>,
    pub pid: i32,
    pub pod: String,
    pub node: String,
}

/// Guards `spec.pid`. Returns once the threads run; marking continues in the background
/// and the state turns `enforcing` when every path has been handled.
pub fn start(
    spec: TargetSpec,
    metrics: Arc<Metrics>,
    log: LogSender,
) -> Result<TargetHandle, StartError> {
    let pid = spec.pid;
    let root = ContainerRoot::open(pid)?;
    let owners = [pid, resolve::parent_pid(pid)?];
    let pidfd = pidfd_open(pid).map_err(|error| StartError::Pidfd { pid, error })?;
    let perm = PermGroup::new()?;
    let create = CreateWatch::new()?;
    let guard = spec.guard;
    let warnings = unsupported_warnings(&guard);
    for w in &warnings {
        tracing::warn!(guard = %guard.name, namespace = %guard.namespace, pid, "{w}");
    }
    let state = TargetState {
        guard: guard.name.clone(),
        namespace: guard.namespace.clone(),
        pid,
        pod: spec.pod.clone(),
        backend: BACKEND,
        phase: Phase::Pending,
        reason: None,
        warnings,
        marks: 0,
        audit: perm.audit_enabled(),
        paths: Vec::new(),
    };
    let shared = Arc::new(Shared {
        counters: metrics.decision_counters(&guard.name, &guard.namespace, BACKEND),
        latency: metrics.latency.with_label_values(&[BACKEND]),
        on_error: if guard.has_deny() {
            Verdict::Deny
        } else {
            Verdict::Allow
        },
        ctx: Arc::new(LogContext {
            guard,
            pod: spec.pod,
            node: spec.node,
        }),
        perm,
        root,
        owners,
        view: RwLock::new(Arc::new(View {
            rules: RuleSet::default(),
            mounts: Vec::new(),
            files: Vec::new(),
        })),
        stop: EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map_err(StartError::EventFd)?,
        metrics,
        log,
        state: Arc::new(Mutex::new(state)),
    });
    // The answering thread first: marking lists directories, and those opens need answers.
    let answer = {
        let s = shared.clone();
        std::thread::Builder::new()
            .name(format!("answer-{pid}"))
            .spawn(move || answer_loop(&s))
            .expect("spawning a thread")
    };
    let marker = {
        let s = shared.clone();
        std::thread::Builder::new()
            .name(format!("mark-{pid}"))
            .spawn(move || marker_loop(&s, create, pidfd))
            .expect("spawning a thread")
    };
    Ok(TargetHandle {
        shared,
        threads: vec![answer, marker],
    })
}

pub fn unsupported_warnings(guard: &GuardPolicy) -> Vec<String> {
    guard
        .subjects
        .iter()
        .enumerate()
        .filter(|(_, s)| s.events.contains(Event::Modify))
        .map(|(i, _)| {
            format!(
                "spec.subjects[{i}].events: event \"modify\" is not enforced by the fanotify \
                 backend (fanotify cannot tell a write-open from a read-open); it needs the BPF backend"
            )
        })
        .collect()
}

fn pidfd_open(pid: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: plain syscall with integer arguments.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just gave us this descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Waits until one of `fds` is readable or `timeout` passes; returns which were.
fn wait(fds: &[BorrowedFd<'_>], timeout: PollTimeout) -> Vec<bool> {
    let mut polls: Vec<PollFd<'_>> = fds
        .iter()
        .map(|fd| PollFd::new(*fd, PollFlags::POLLIN))
        .collect();
    match poll(&mut polls, timeout) {
        Ok(_) => polls
            .iter()
            .map(|p| p.revents().is_some_and(|r| !r.is_empty()))
            .collect(),
        Err(_) => vec![false; fds.len()],
    }
}

fn answer_loop(s: &Shared) {
    let mut buf = AlignedBuf::boxed();
    let mut path = vec![0u8; libc::PATH_MAX as usize * 2];
    let mut batch = Batch::default();
    let me = std::process::id() as i32;
    let links = FdLinks::open();
    let mut stopping = false;
    loop {
        let ready = wait(&[s.perm.as_fd(), s.stop.as_fd()], PollTimeout::NONE);
        if ready[1] && !stopping {
            // No new events once the marks are gone; those already queued are answered
            // below, since nobody else would answer them while the group stays open.
            stopping = true;
            if let Err(e) = s.perm.flush() {
                tracing::error!(error = %e, "removing the marks of a stopped target");
            }
        }
        let events = match s.perm.read(&mut buf) {
            Ok(events) => events,
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && stopping => return,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EINTR)) => continue,
            Err(e) => {
                tracing::error!(error = %e, "reading permission events");
                s.metrics
                    .internal_errors
                    .with_label_values(&[BACKEND, "read"])
                    .inc();
                continue;
            }
        };
        let view = s.view.read().expect("view lock").clone();
        for event in events {
            s.answer(event, me, &view, &links, &mut path, &mut batch);
        }
        s.answer_batch(&mut batch);
    }
}

/// The answers to one read's events, written together once every event in it is
/// decided, and what follows them.
#[derive(Default)]
struct Batch {
    responses: Vec<libc::fanotify_response>,
    /// Each event's descriptor, closed once answered, and when the event was taken up.
    held: Vec<(OwnedFd, Instant)>,
    logs: Vec<Entry>,
}

impl Shared {
    /// Answers the batch in one system call, then closes, measures and logs.
    fn answer_batch(&self, batch: &mut Batch) {
        let failed = self.perm.respond_all(&batch.responses);
        batch.responses.clear();
        if failed > 0 {
            self.metrics
                .response_errors
                .with_label_values(&[BACKEND])
                .inc_by(failed as u64);
        }
        for (fd, started) in batch.held.drain(..) {
            drop(fd);
            self.latency.observe(started.elapsed().as_secs_f64());
        }
        // Only now, with every event of the batch answered, does anything go to the log.
        for entry in batch.logs.drain(..) {
            self.log.send(entry);
        }
    }
}

/// How an event was classified, before answering.
enum Outcome {
    Guarded {
        verdict: Verdict,
        subject: usize,
        audit: bool,
    },
    /// No rule guards this event on this file (a mark placed for another event or path).
    Unguarded,
    /// Opened through a mount outside the target: not the container's access.
    Foreign,
    Error(&'static str),
}

impl Shared {
    fn answer(
        &self,
        ev: RawEvent,
        me: i32,
        view: &View,
        links: &FdLinks,
        path: &mut [u8],
        batch: &mut Batch,
    ) {
        let started = Instant::now();
        if ev.is_overflow() {
            self.metrics.overflows.with_label_values(&["perm"]).inc();
            return;
        }
        let Some(fd) = ev.fd else {
            self.metrics
                .internal_errors
                .with_label_values(&[BACKEND, "no_fd"])
                .inc();
            return;
        };
        let event = event_of(ev.mask);
        let (outcome, is_dir, len) = match event {
            // The agent's own opens are its marking walks.
            _ if ev.pid == me => (Outcome::Unguarded, false, 0),
            None => (Outcome::Unguarded, false, 0),
            Some(event) => self.classify(fd.as_fd(), event, ev.pid, view, links, path),
        };
        let (verdict, audit) = match outcome {
            Outcome::Guarded { verdict, audit, .. } => (verdict, audit),
            Outcome::Unguarded | Outcome::Foreign => (Verdict::Allow, false),
            Outcome::Error(_) => (self.on_error, false),
        };
        batch.responses.push(
            self.perm
                .response(fd.as_fd(), verdict == Verdict::Allow, audit),
        );
        batch.held.push((fd, started));
        let (Some(event), subject) = (
            event,
            match outcome {
                Outcome::Guarded { subject, .. } => Some(subject),
                Outcome::Error(kind) => {
                    self.metrics
                        .internal_errors
                        .with_label_values(&[BACKEND, kind])
                        .inc();
                    None
                }
                Outcome::Unguarded | Outcome::Foreign => return,
            },
        ) else {
            return;
        };
        self.counters.inc(verdict, event);
        batch.logs.push(Entry {
            ctx: self.ctx.clone(),
            verdict,
            event,
            path: path[..len].to_vec(),
            is_dir,
            subject,
            pid: ev.pid,
        });
    }

    /// Decides without opening anything: statx and readlink on the event's descriptor.
    /// On return `path[..len]` holds the path to log.
    fn classify(
        &self,
        fd: BorrowedFd<'_>,
        event: Event,
        pid: i32,
        view: &View,
        links: &FdLinks,
        path: &mut [u8],
    ) -> (Outcome, bool, usize) {
        let Ok(st) = statx(fd) else {
            return (Outcome::Error("statx"), false, 0);
        };
        let is_dir = u32::from(st.stx_mode) & libc::S_IFMT == libc::S_IFDIR;
        let Ok(n) = links.path_into(fd, path) else {
            return (Outcome::Error("readlink"), is_dir, 0);
        };
        let mut rendered = &path[..n];
        if st.stx_nlink == 0 {
            rendered = rendered.strip_suffix(b" (deleted)").unwrap_or(rendered);
        }
        // The target's own mounts, the fast path; otherwise a process of the container
        // that made a mount namespace of its own, or the host reaching the same inode.
        if view.mounts.binary_search(&st.stx_mnt_id).is_err() && !self.root.holds(pid) {
            return (Outcome::Foreign, is_dir, 0);
        }
        let Some(container) = self.root.to_container(rendered) else {
            return (Outcome::Foreign, is_dir, 0);
        };
        let (start, len) = (container.start, container.len());
        let is_owner = self.owners.contains(&pid);
        let dev = libc::makedev(st.stx_dev_major, st.stx_dev_minor);
        // A guarded file reached by another name (a hard link) is decided, and logged, as
        // the guarded file, as the BPF backend does by keying rules on the inode.
        let (start, len) = match view
            .files
            .iter()
            .find(|(d, i, _)| !is_dir && *d == dev && *i == st.stx_ino)
        {
            Some((_, _, guarded)) if guarded.as_bytes().len() <= path.len() => {
                let g = guarded.as_bytes();
                path[..g.len()].copy_from_slice(g);
                (0, g.len())
            }
            _ => (start, len),
        };
        let outcome = match view
            .rules
            .decide(&path[start..start + len], event, is_owner)
        {
            Some(d) => Outcome::Guarded {
                verdict: d.verdict,
                subject: d.subject,
                audit: self.ctx.guard.subjects[d.subject].audit,
            },
            None => Outcome::Unguarded,
        };
        path.copy_within(start..start + len, 0);
        (outcome, is_dir, len)
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

fn statx(fd: BorrowedFd<'_>) -> std::io::Result<libc::statx> {
    // SAFETY: statx is plain data the kernel fills in.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor, an empty C path with AT_EMPTY_PATH, and a statx buffer.
    let r = unsafe {
        libc::statx(
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_TYPE | libc::STATX_NLINK | libc::STATX_INO | libc::STATX_MNT_ID,
            &mut st,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st)
}

/// The identity of a resolved guarded path, to notice when a symlink starts pointing
/// elsewhere or a missing path appears.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Identity {
    dev: u64,
    ino: u64,
    is_dir: bool,
}

struct PathSlot {
    rule: Rule,
    /// The guard's own spelling of the path.
    written: janus_api::GuardPath,
    identity: Option<Identity>,
    state: PathState,
}

fn marker_loop(s: &Shared, create: CreateWatch, pidfd: OwnedFd) {
    let mut tree = Tree::new(&s.perm, &create);
    let mut slots = path_slots(&s.ctx.guard);
    let mut buf = AlignedBuf::boxed();
    let mut marks = 0usize;
    let refresh = |tree: &mut Tree<'_>, slots: &mut Vec<PathSlot>, marks: &mut usize| {
        tree.prune(|fd| statx(fd).is_ok_and(|st| st.stx_nlink > 0));
        let changed = resolve_all(s, tree, slots);
        let mounts = mount_ids(s.root.pid);
        if changed || mounts != s.view.read().expect("view lock").mounts {
            let enforced = || {
                slots
                    .iter()
                    .filter(|p| p.state.status == PathStatus::Enforced)
            };
            let files = enforced()
                .filter_map(|p| {
                    let id = p.identity.filter(|id| !id.is_dir)?;
                    Some((id.dev, id.ino, p.rule.path.clone()))
                })
                .collect();
            *s.view.write().expect("view lock") = Arc::new(View {
                rules: RuleSet::new(enforced().map(|p| p.rule.clone()).collect()),
                mounts,
                files,
            });
        }
        s.publish(slots, tree.marks(), marks);
    };
    refresh(&mut tree, &mut slots, &mut marks);
    let mut refreshed = Instant::now();
    let exited = loop {
        let left = RESOLVE_PERIOD.saturating_sub(refreshed.elapsed());
        let ready = wait(
            &[create.as_fd(), pidfd.as_fd(), s.stop.as_fd()],
            PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX),
        );
        if ready[2] {
            break false;
        }
        if ready[1] {
            break true;
        }
        if ready[0] {
            on_create_events(s, &create, &mut tree, &mut slots, &mut buf, &mut marks);
        }
        // Every second, even while directories keep being created.
        if refreshed.elapsed() >= RESOLVE_PERIOD {
            refresh(&mut tree, &mut slots, &mut marks);
            refreshed = Instant::now();
        }
    };
    s.metrics
        .marks
        .with_label_values(&[&s.ctx.guard.name, &s.ctx.guard.namespace])
        .sub(marks as i64);
    let mut st = s.state.lock().expect("state lock");
    st.marks = 0;
    if exited {
        st.phase = Phase::Exited;
        st.reason = Some(format!(
            "process {} exited; its marks were removed",
            s.root.pid
        ));
        tracing::info!(pid = s.root.pid, guard = %s.ctx.guard.name, "target exited; guard lifted");
        // The answering thread removes the marks, answers what is queued and ends.
        let _ = s.stop.write(1);
    }
}

fn on_create_events(
    s: &Shared,
    create: &CreateWatch,
    tree: &mut Tree<'_>,
    slots: &mut [PathSlot],
    buf: &mut AlignedBuf,
    marks: &mut usize,
) {
    let Ok(events) = create.read(buf) else {
        return;
    };
    let mut overflow = false;
    let mut new_dirs = 0;
    for ev in events {
        match ev {
            Created::Overflow => overflow = true,
            Created::Dir { parent, name } => new_dirs += u64::from(tree.on_created(parent, name)),
        }
    }
    if overflow {
        // Some creations went unreported: walk every guarded tree again.
        s.metrics.overflows.with_label_values(&["create"]).inc();
        for slot in slots.iter_mut() {
            slot.identity = None;
        }
        resolve_all(s, tree, slots);
    }
    s.metrics
        .new_dirs
        .with_label_values(&[&s.ctx.guard.name, &s.ctx.guard.namespace])
        .inc_by(new_dirs);
    s.publish(slots, tree.marks(), marks);
}

fn path_slots(guard: &GuardPolicy) -> Vec<PathSlot> {
    let rules = RuleSet::from_policy(guard);
    rules
        .rules()
        .iter()
        .map(|r| {
            let mut rule = r.clone();
            rule.events.remove(Event::Modify);
            PathSlot {
                written: r.path.clone(),
                identity: None,
                state: PathState {
                    subject: r.subject,
                    path: r.path.to_string(),
                    resolved: None,
                    verdict: r.verdict.as_lower(),
                    status: PathStatus::Missing("not resolved yet".into()),
                },
                rule,
            }
        })
        .collect()
}

/// Resolves every guarded path and marks what is new. Returns whether any rule changed.
fn resolve_all(s: &Shared, tree: &mut Tree<'_>, slots: &mut [PathSlot]) -> bool {
    let mut changed = false;
    for slot in slots.iter_mut() {
        let subject = &s.ctx.guard.subjects[slot.rule.subject];
        let before = (
            slot.state.status.clone(),
            slot.rule.path.clone(),
            slot.identity,
        );
        match s.root.resolve(&slot.written) {
            Err(e) => {
                slot.identity = None;
                slot.state.resolved = None;
                slot.state.status = match &e {
                    ResolveError::Path { error, .. }
                        if error.kind() == std::io::ErrorKind::NotFound =>
                    {
                        PathStatus::Missing("does not exist".into())
                    }
                    e => PathStatus::Failed(e.to_string()),
                };
            }
            Ok((fd, canonical)) => {
                let Ok(st) = statx(fd.as_fd()) else { continue };
                let is_dir = u32::from(st.stx_mode) & libc::S_IFMT == libc::S_IFDIR;
                let id = Identity {
                    dev: libc::makedev(st.stx_dev_major, st.stx_dev_minor),
                    ino: st.stx_ino,
                    is_dir,
                };
                slot.state.resolved = Some(canonical.to_string());
                if slot.identity == Some(id) && slot.rule.path == canonical {
                    continue;
                }
                slot.identity = Some(id);
                slot.rule.path = canonical;
                let mask = perm_mask(slot.rule.events);
                slot.state.status = if subject.only_dir && !is_dir {
                    PathStatus::Skipped("not a directory (onlyDir)".into())
                } else if mask.is_empty() {
                    PathStatus::Skipped(
                        "no event of this subject is enforceable by fanotify".into(),
                    )
                } else {
                    match tree.mark_root(fd, (id.dev, id.ino), is_dir, mask) {
                        Ok(()) => PathStatus::Enforced,
                        Err(e) => PathStatus::Failed(e.to_string()),
                    }
                };
            }
        }
        changed |= before
            != (
                slot.state.status.clone(),
                slot.rule.path.clone(),
                slot.identity,
            );
    }
    changed
}

impl Shared {
    fn publish(&self, slots: &[PathSlot], now: usize, published: &mut usize) {
        self.metrics
            .marks
            .with_label_values(&[&self.ctx.guard.name, &self.ctx.guard.namespace])
            .add(now as i64 - *published as i64);
        *published = now;
        let failed: Vec<&str> = slots
            .iter()
            .filter(|p| matches!(p.state.status, PathStatus::Failed(_)))
            .map(|p| p.state.path.as_str())
            .collect();
        let mut st = self.state.lock().expect("state lock");
        st.marks = now;
        st.paths = slots.iter().map(|p| p.state.clone()).collect();
        // Every pass has placed what it could: enforcing, unless a path that exists failed.
        (st.phase, st.reason) = if failed.is_empty() {
            (Phase::Enforcing, None)
        } else {
            let reason = format!("not enforced, retried every second: {}", failed.join(", "));
            (Phase::Failed, Some(reason))
        };
    }
}

/// Mount IDs in the target's mount namespace, sorted, from its mountinfo. Read here, off
/// the answering thread, because reading a file there could wait on a mark.
fn mount_ids(pid: i32) -> Vec<u64> {
    let text = std::fs::read(format!("/proc/{pid}/mountinfo")).unwrap_or_default();
    let mut ids: Vec<u64> = text
        .split(|b| *b == b'\n')
        .filter_map(|line| line.split(|b| *b == b' ').next())
        .filter_map(|id| std::str::from_utf8(id).ok()?.parse().ok())
        .collect();
    ids.sort_unstable();
    ids
}
