//! The fanotify backend's threads for the whole agent: one (or `--answer-threads`) answers
//! the permission group, with a settling thread beside it ([`super::answer`]), one places
//! and follows every target's marks. Targets come and go by
//! commands to the marker thread; neither thread is per target, and neither is the kernel
//! state, so a node's thousand containers cost one group and one inotify instance.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};

use super::answer::{Answerer, Registry};
use super::created::{CreateWatch, Created};
use super::group::{AlignedBuf, FanotifyError, PermGroup};
use super::marks::{MarkTable, TargetId};
use super::target::{Marker, StartError, TargetShared, BACKEND};
use crate::decisions::{LogContext, LogSender};
use crate::metrics::Metrics;
use crate::state::TargetState;
use crate::target::TargetSpec;

/// How often missing paths are retried, symlinked paths re-resolved, removed objects
/// forgotten and mounts read again.
const RESOLVE_PERIOD: Duration = Duration::from_secs(1);

enum Command {
    Add(Box<Marker>, SyncSender<()>),
    Remove(TargetId, SyncSender<()>),
}

struct Inner {
    commands: Mutex<Sender<Command>>,
    /// Wakes the marker thread for a command, or to stop.
    wake: EventFd,
    stopping: AtomicBool,
    next_id: AtomicU64,
    metrics: Arc<Metrics>,
    audit: bool,
}

/// The running backend.
pub struct Engine {
    inner: Arc<Inner>,
    threads: Vec<JoinHandle<()>>,
}

/// One target of the engine. Dropping it without [`TargetHandle::stop`] leaves it guarded
/// until the engine stops.
pub struct TargetHandle {
    shared: Arc<TargetShared>,
    inner: Arc<Inner>,
}

impl TargetHandle {
    pub fn state(&self) -> TargetState {
        self.shared.state.lock().expect("state lock").clone()
    }

    pub fn ctx(&self) -> &Arc<LogContext> {
        &self.shared.ctx
    }

    /// Lifts the guard: its marks are gone (or narrowed to what other targets need) when
    /// this returns. Events already queued for it are answered as nobody's.
    pub fn stop(self) {
        let (tx, rx) = sync_channel(1);
        if self.inner.send(Command::Remove(self.shared.id, tx)) {
            let _ = rx.recv();
        }
    }
}

impl Inner {
    fn send(&self, c: Command) -> bool {
        let sent = self.commands.lock().expect("commands lock").send(c).is_ok();
        sent && self.wake.write(1).is_ok()
    }
}

impl Engine {
    /// Makes the agent's one permission group and one inotify instance, and starts the
    /// threads. Fails in one clear line where the kernel refuses permission events.
    pub fn start(
        metrics: Arc<Metrics>,
        log: LogSender,
        answer_threads: usize,
    ) -> Result<Engine, FanotifyError> {
        let perm = Arc::new(PermGroup::new()?);
        let watch = CreateWatch::new()?;
        let eventfd = || {
            EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                .map_err(|e| FanotifyError::Watch(e.into()))
        };
        let (tx, rx) = channel();
        let inner = Arc::new(Inner {
            commands: Mutex::new(tx),
            wake: eventfd()?,
            stopping: AtomicBool::new(false),
            next_id: 1.into(),
            metrics: metrics.clone(),
            audit: perm.audit_enabled(),
        });
        let stop = Arc::new(eventfd()?);
        let registry = Arc::new(RwLock::new(Arc::new(Registry::default())));
        let answerer = Answerer {
            perm: perm.clone(),
            registry: registry.clone(),
            stop: stop.clone(),
            latency: metrics.latency.with_label_values(&[BACKEND]),
            metrics: metrics.clone(),
            log,
        };
        // The answering thread first: marking lists directories, and those opens need
        // answers.
        let answerer = Arc::new(answerer);
        let mut threads: Vec<JoinHandle<()>> = (0..answer_threads.max(1))
            .map(|_| {
                let a = answerer.clone();
                std::thread::Builder::new()
                    .name("fanotify-answer".into())
                    .spawn(move || a.run())
                    .expect("spawning a thread")
            })
            .collect();
        let marker = {
            let inner = inner.clone();
            let stop = stop.clone();
            let table = MarkTable::new(perm, watch);
            std::thread::Builder::new()
                .name("fanotify-mark".into())
                .spawn(move || {
                    MarkerLoop {
                        table,
                        targets: BTreeMap::new(),
                        registry,
                        metrics: inner.metrics.clone(),
                    }
                    .run(&inner, rx);
                    // Every mark is gone: the answering thread answers what is queued and ends.
                    let _ = stop.write(1);
                })
                .expect("spawning a thread")
        };
        threads.push(marker);
        Ok(Engine { inner, threads })
    }

    /// Starts guarding `spec.pid`. Returns once the target is registered; its marks are
    /// placed right after, and its state turns `enforcing` when every path is handled.
    pub fn add(&self, spec: TargetSpec) -> Result<TargetHandle, StartError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::new(TargetShared::new(
            id,
            spec,
            &self.inner.metrics,
            self.inner.audit,
        )?);
        let marker = Marker::new(shared.clone());
        let (tx, rx) = sync_channel(1);
        if !self.inner.send(Command::Add(Box::new(marker), tx)) || rx.recv().is_err() {
            return Err(StartError::Stopped);
        }
        Ok(TargetHandle {
            shared,
            inner: self.inner.clone(),
        })
    }

    /// Removes every mark, answers what is queued and ends the threads. A command still
    /// queued is dropped, and its caller told the engine stopped.
    pub fn shutdown(self) {
        self.inner.stopping.store(true, Ordering::SeqCst);
        let _ = self.inner.wake.write(1);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

struct MarkerLoop {
    table: MarkTable,
    targets: BTreeMap<TargetId, Marker>,
    registry: Arc<RwLock<Arc<Registry>>>,
    metrics: Arc<Metrics>,
}

impl MarkerLoop {
    fn run(&mut self, inner: &Inner, commands: Receiver<Command>) {
        let mut buf = AlignedBuf::boxed();
        let mut refreshed = Instant::now();
        loop {
            let left = RESOLVE_PERIOD.saturating_sub(refreshed.elapsed());
            let pidfds: Vec<(TargetId, BorrowedFd<'_>)> = self
                .targets
                .iter()
                .map(|(id, m)| (*id, m.shared.root.process().pidfd()))
                .collect();
            let ready = wait(
                self.table.watch().as_fd(),
                inner.wake.as_fd(),
                &pidfds,
                PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX),
            );
            let exited: Vec<TargetId> = ready.exited.iter().map(|i| pidfds[*i].0).collect();
            drop(pidfds);
            if ready.wake {
                let _ = inner.wake.read();
                if inner.stopping.load(Ordering::SeqCst) {
                    break;
                }
                let mut changed = false;
                while let Ok(c) = commands.try_recv() {
                    changed |= self.command(c);
                }
                if changed {
                    self.publish_registry();
                }
            }
            if ready.watch {
                self.on_watch(&mut buf);
            }
            if !exited.is_empty() {
                for id in exited {
                    if let Some(mut m) = self.targets.remove(&id) {
                        m.exited(&mut self.table, &self.metrics);
                    }
                }
                self.publish_registry();
            }
            // Every second, even while entries keep being created.
            if refreshed.elapsed() >= RESOLVE_PERIOD {
                let mut changed = false;
                for m in self.targets.values_mut() {
                    changed |= m.refresh(&mut self.table, &self.metrics);
                }
                if changed {
                    self.publish_registry();
                }
                self.metrics.kernel_marks.set(self.table.len() as i64);
                refreshed = Instant::now();
            }
        }
        for (_, mut m) in std::mem::take(&mut self.targets) {
            m.release(&mut self.table, &self.metrics);
        }
        if let Err(e) = self.table.flush() {
            tracing::error!(error = %e, "removing the marks");
        }
        self.metrics.kernel_marks.set(0);
    }

    /// Returns whether the set of targets changed.
    fn command(&mut self, c: Command) -> bool {
        match c {
            Command::Add(mut m, done) => {
                m.refresh(&mut self.table, &self.metrics);
                self.targets.insert(m.id(), *m);
                // Its events are attributed to it before its caller hears it is guarded.
                self.publish_registry();
                let _ = done.send(());
                false
            }
            Command::Remove(id, done) => {
                let removed = self.targets.remove(&id);
                if let Some(mut m) = removed {
                    m.release(&mut self.table, &self.metrics);
                    // The registry must not name it once its caller goes on.
                    self.publish_registry();
                }
                let _ = done.send(());
                false
            }
        }
    }

    fn publish_registry(&self) {
        let registry = Registry::new(self.targets.values().map(|m| &m.shared));
        *self.registry.write().expect("registry lock") = Arc::new(registry);
        self.metrics.kernel_marks.set(self.table.len() as i64);
    }

    /// Entries made in marked directories are marked for every target that holds the
    /// directory; a moved directory's new path is learnt; an entry moved out of the guarded
    /// trees before it was marked is reported.
    fn on_watch(&mut self, buf: &mut AlignedBuf) {
        let Ok(events) = self.table.watch().read(buf) else {
            return;
        };
        // The moves whose other half landed in a marked directory.
        let arrived: std::collections::HashSet<u32> = events
            .iter()
            .filter_map(|e| match e {
                Created::Entry { cookie, .. } if *cookie != 0 => Some(*cookie),
                _ => None,
            })
            .collect();
        let mut moved = Vec::new();
        let mut overflow = false;
        for event in events {
            match event {
                Created::Overflow => overflow = true,
                Created::Entry { parent, name, .. } => {
                    let Some(dir) = self.table.dir_of(parent) else {
                        continue;
                    };
                    for holder in self.table.holders(dir) {
                        if let Some(m) = self.targets.get_mut(&holder) {
                            let dirs = m.on_entry(&mut self.table, dir, &name, &self.metrics);
                            let g = m.shared.guard();
                            self.metrics
                                .new_dirs
                                .with_label_values(&[&g.name, &g.namespace])
                                .inc_by(dirs as u64);
                        }
                    }
                }
                Created::Left {
                    parent,
                    name,
                    cookie,
                } if !arrived.contains(&cookie) => {
                    let Some(dir) = self.table.dir_of(parent) else {
                        continue;
                    };
                    for holder in self.table.holders(dir) {
                        if let Some(m) = self.targets.get_mut(&holder) {
                            m.on_left(dir, &name, &self.metrics);
                        }
                    }
                }
                Created::Left { .. } => {}
                Created::Moved { wd } => {
                    if let Some(dir) = self.table.dir_of(wd) {
                        moved.extend(self.table.holders(dir));
                    }
                }
                Created::Gone { wd } => self.table.watch_gone(wd),
            }
        }
        moved.sort_unstable();
        moved.dedup();
        for id in moved {
            if let Some(m) = self.targets.get_mut(&id) {
                m.on_moved(&self.table);
            }
        }
        if overflow {
            // Some entries went unreported: walk every guarded tree again.
            self.metrics.overflows.with_label_values(&["create"]).inc();
            for m in self.targets.values_mut() {
                m.rewalk();
                m.refresh(&mut self.table, &self.metrics);
            }
        }
    }
}

struct Ready {
    watch: bool,
    wake: bool,
    /// Indices into the pidfds of targets whose process exited.
    exited: Vec<usize>,
}

fn wait(
    watch: BorrowedFd<'_>,
    wake: BorrowedFd<'_>,
    pidfds: &[(TargetId, BorrowedFd<'_>)],
    timeout: PollTimeout,
) -> Ready {
    let mut polls: Vec<PollFd<'_>> = [watch, wake]
        .into_iter()
        .chain(pidfds.iter().map(|(_, fd)| *fd))
        .map(|fd| PollFd::new(fd, PollFlags::POLLIN))
        .collect();
    let hit = |p: &PollFd<'_>| p.revents().is_some_and(|r| !r.is_empty());
    match poll(&mut polls, timeout) {
        Ok(_) => Ready {
            watch: hit(&polls[0]),
            wake: hit(&polls[1]),
            exited: polls[2..]
                .iter()
                .enumerate()
                .filter(|(_, p)| hit(p))
                .map(|(i, _)| i)
                .collect(),
        },
        Err(_) => Ready {
            watch: false,
            wake: false,
            exited: Vec::new(),
        },
    }
}
