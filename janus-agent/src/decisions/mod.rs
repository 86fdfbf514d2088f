//! The decision log: one record per decision on stdout, written by its own thread after the
//! kernel has its answer. On a node stdout is a file the kubelet writes, so the answering
//! thread only hands records over and never waits for them.

use std::io::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use janus_api::logformat::{Process, Specifier};
use janus_api::{Event, GuardPolicy, LogRecord, Mode, Verdict};
use prometheus::IntCounter;

use crate::process;

mod json;

/// Records waiting to be written before new ones are dropped and counted.
const BACKLOG: usize = 64 * 1024;
/// The most records one target may have waiting: a container that floods denials fills its
/// own share, and every other target's records still find room.
const SHARE: usize = 1024;
/// How long the writer lets lines gather after a flush before it waits on the channel
/// again. A sender wakes the writer only while it waits, and that wake (a futex call and a
/// context switch) cost the answering thread more than the decision itself under load.
const GATHER: std::time::Duration = std::time::Duration::from_millis(1);

/// `--decision-format`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum DecisionFormat {
    /// One line per decision in the guard's `logFormat`.
    #[default]
    Text,
    /// One JSON object per decision with every field (docs/decisions.md).
    Json,
}

/// What every record of one guard on one target shares.
pub struct LogContext {
    pub guard: Arc<GuardPolicy>,
    pub pod: String,
    pub node: String,
    /// The container's ID as the controller named it; empty when not known.
    pub container: String,
    /// The guard's `janus_log_lines_dropped_total` and the pod's `janus_denials_total`.
    pub dropped: IntCounter,
    pub denied: IntCounter,
    /// Records of this target waiting to be written.
    queued: AtomicUsize,
    /// Shared with the target this one replaces, if any.
    pub denials: Arc<Denials>,
}

impl LogContext {
    pub fn new(
        guard: Arc<GuardPolicy>,
        pod: String,
        node: String,
        container: String,
        (dropped, denied): (IntCounter, IntCounter),
    ) -> LogContext {
        LogContext {
            guard,
            pod,
            node,
            container,
            dropped,
            denied,
            queued: AtomicUsize::new(0),
            denials: Arc::default(),
        }
    }

    /// `n` decisions whose records never reached the writer (the kernel dropped them):
    /// counted as denials where they were, and as dropped lines.
    pub fn lost(&self, verdict: Verdict, n: u64) {
        if verdict == Verdict::Deny {
            self.count_denials(n);
        }
        self.dropped.inc_by(n);
    }

    /// `n` denials made: counted whatever becomes of their records.
    fn count_denials(&self, n: u64) {
        self.denials.count.fetch_add(n, Ordering::Relaxed);
        self.denied.inc_by(n);
    }
}

/// The denials of one target, for the controller's Events: how many (every one, logged or
/// dropped), and who made the last one that was logged.
#[derive(Default)]
pub struct Denials {
    count: AtomicU64,
    last: Mutex<Option<LastDenial>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastDenial {
    pub process: Process,
    pub at: SystemTime,
}

impl Denials {
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub fn last(&self) -> Option<LastDenial> {
        self.last.lock().expect("denials lock").clone()
    }
}

pub struct Entry {
    pub ctx: Arc<LogContext>,
    pub verdict: Verdict,
    pub event: Event,
    /// The guarded path of the object decided.
    pub path: Vec<u8>,
    /// The name it was reached by, where that is not `path` (a rename, a hard link).
    pub name: Option<Vec<u8>>,
    pub is_dir: bool,
    /// Index of the deciding subject, for its tags; `None` for internal errors.
    pub subject: Option<usize>,
    /// Who made the access: its PID, and what the kernel's record held of the rest.
    pub process: Process,
    /// Whether the kernel was told `verdict`, or to allow.
    pub mode: Mode,
}

/// When a record's access was seen: the writer tells a reused PID from its process by it.
#[derive(Clone, Copy)]
pub struct Stamp {
    wall: SystemTime,
    boot: Duration,
}

impl Stamp {
    pub fn now() -> Stamp {
        Stamp {
            wall: SystemTime::now(),
            boot: process::since_boot(),
        }
    }
}

struct Stamped {
    entry: Box<Entry>,
    at: Stamp,
}

enum Message {
    Line(Stamped),
    /// Sent by [`LogWriter::finish`]: what was queued before it is written, then the writer
    /// ends, whoever still holds a sender (an HTTP handler's copy of the agent, say).
    Finish,
}

#[derive(Clone)]
pub struct LogSender {
    tx: SyncSender<Message>,
    format: DecisionFormat,
}

impl LogSender {
    /// Whether `guard`'s records show the name an object was reached by (`{via}`,
    /// `{name}`; JSON's `name` always): a backend that must read that name for each
    /// decision (through procfs, as much CPU as the rest of the decision) reads it only then.
    pub fn shows_name(&self, guard: &GuardPolicy) -> bool {
        let template = &guard.log_format;
        self.format == DecisionFormat::Json
            || template.uses(Specifier::Via)
            || template.uses(Specifier::Name)
    }

    /// Hands over a record stamped now: after the answer, so the answer never waits for a
    /// clock.
    pub fn send(&self, entry: Entry) {
        self.send_stamped(entry, Stamp::now());
    }

    /// Hands over records whose accesses were seen together, at `at`.
    pub fn send_all(&self, at: Stamp, entries: impl IntoIterator<Item = Entry>) {
        for entry in entries {
            self.send_stamped(entry, at);
        }
    }

    fn send_stamped(&self, entry: Entry, at: Stamp) {
        let ctx = &entry.ctx;
        if entry.verdict == Verdict::Deny {
            ctx.count_denials(1);
        }
        if ctx.queued.fetch_add(1, Ordering::Relaxed) >= SHARE {
            ctx.queued.fetch_sub(1, Ordering::Relaxed);
            ctx.dropped.inc();
            return;
        }
        let line = Message::Line(Stamped {
            entry: Box::new(entry),
            at,
        });
        if let Err(TrySendError::Full(m) | TrySendError::Disconnected(m)) = self.tx.try_send(line) {
            if let Message::Line(Stamped { entry, .. }) = m {
                entry.ctx.queued.fetch_sub(1, Ordering::Relaxed);
                entry.ctx.dropped.inc();
            }
        }
    }
}

/// The writer thread.
pub struct LogWriter {
    tx: SyncSender<Message>,
    thread: JoinHandle<()>,
}

impl LogWriter {
    /// Writes every line sent so far, flushes, and stops the writer.
    pub fn finish(self) {
        // Blocking: the backlog drains ahead of this message, so it always gets through.
        if self.tx.send(Message::Finish).is_ok() {
            let _ = self.thread.join();
        }
    }
}

pub fn start(out: Box<dyn Write + Send>, format: DecisionFormat) -> (LogSender, LogWriter) {
    let (tx, rx) = sync_channel(BACKLOG);
    let thread = std::thread::Builder::new()
        .name("decision-log".into())
        .spawn(move || write_loop(rx, out, format))
        .expect("spawning the log thread");
    let sender = LogSender {
        tx: tx.clone(),
        format,
    };
    (sender, LogWriter { tx, thread })
}

fn write_loop(rx: Receiver<Message>, out: Box<dyn Write + Send>, format: DecisionFormat) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
    let mut line = String::new();
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(message) = next {
            let Message::Line(Stamped { mut entry, at }) = message else {
                let _ = out.flush();
                return;
            };
            entry.ctx.queued.fetch_sub(1, Ordering::Relaxed);
            let template = &entry.ctx.guard.log_format;
            if format == DecisionFormat::Json
                || entry.verdict == Verdict::Deny
                || PROCESS_SPECIFIERS.iter().any(|s| template.uses(*s))
            {
                process::complete(&mut entry.process, at.boot);
            }
            if entry.verdict == Verdict::Deny {
                *entry.ctx.denials.last.lock().expect("denials lock") = Some(LastDenial {
                    process: entry.process.clone(),
                    at: at.wall,
                });
            }
            line.clear();
            match format {
                DecisionFormat::Text => render(&entry, &mut line),
                DecisionFormat::Json => json::render(&entry, at.wall, &mut line),
            }
            line.push('\n');
            if out.write_all(line.as_bytes()).is_err() {
                return;
            }
            next = rx.try_recv().ok();
        }
        // Flushed whenever the backlog is empty: lines appear promptly, written in batches.
        if out.flush().is_err() {
            return;
        }
        std::thread::sleep(GATHER);
    }
}

/// The specifiers read from `/proc` when the kernel's record does not hold them.
const PROCESS_SPECIFIERS: [Specifier; 5] = [
    Specifier::Ppid,
    Specifier::Uid,
    Specifier::Gid,
    Specifier::Comm,
    Specifier::Exe,
];

fn render(e: &Entry, out: &mut String) {
    let empty = Default::default();
    let tags = e
        .subject
        .and_then(|i| e.ctx.guard.subjects.get(i))
        .map_or(&empty, |s| &s.tags);
    e.ctx.guard.log_format.render(
        &LogRecord {
            pod: &e.ctx.pod,
            node: &e.ctx.node,
            guard: &e.ctx.guard.name,
            verdict: e.verdict,
            event: e.event,
            path: &e.path,
            name: e.name.as_deref(),
            is_dir: e.is_dir,
            tags,
            process: &e.process,
            container: &e.ctx.container,
            mode: e.mode,
        },
        out,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;

    /// Stdout that takes nothing until the test lets it: the writer stalls, and every
    /// record sent meanwhile waits in the queue.
    struct Stalled {
        /// Told once the writer is blocked in its first write.
        entered: std::sync::mpsc::Sender<()>,
        go: Receiver<()>,
        out: Arc<Mutex<Vec<u8>>>,
        open: bool,
    }

    impl Write for Stalled {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if !self.open {
                let _ = self.entered.send(());
                let _ = self.go.recv();
                self.open = true;
            }
            self.out.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn target(pod: &str) -> Arc<LogContext> {
        let yaml = "apiVersion: januscontroller.clustergarage.io/v1alpha1\nkind: JanusGuard\n\
                    metadata: {name: g, namespace: n}\nspec:\n  selector: {matchLabels: {a: b}}\n  \
                    subjects:\n  - deny: [/data]\n    events: [open]\n";
        let guard = janus_api::guard::parse_documents(yaml).unwrap().remove(0);
        let guard = Arc::new(GuardPolicy::from_guard(&guard).unwrap());
        let counter = |name: &str| IntCounter::new(format!("{name}_{pod}"), "test").unwrap();
        Arc::new(LogContext::new(
            guard,
            pod.into(),
            "node".into(),
            String::new(),
            (counter("dropped"), counter("denied")),
        ))
    }

    fn deny(ctx: &Arc<LogContext>) -> Entry {
        Entry {
            ctx: ctx.clone(),
            verdict: Verdict::Deny,
            event: Event::Open,
            path: b"/data/secret".to_vec(),
            name: None,
            is_dir: false,
            subject: Some(0),
            process: Process {
                pid: i32::MAX,
                ..Process::default()
            },
            mode: Mode::Enforce,
        }
    }

    #[test]
    fn a_flooding_target_cannot_take_another_targets_records() {
        let (go, stalled) = channel();
        let (entered, blocked) = channel();
        let out = Arc::new(Mutex::new(Vec::new()));
        let sink = Stalled {
            entered,
            go: stalled,
            out: out.clone(),
            open: false,
        };
        let (log, writer) = start(Box::new(sink), DecisionFormat::Text);
        let (first, flood, quiet) = (target("first"), target("flood"), target("quiet"));
        // The writer takes one record and blocks writing it out, holding nothing else.
        log.send(deny(&first));
        blocked.recv_timeout(Duration::from_secs(10)).unwrap();
        // More than the whole queue holds.
        for _ in 0..BACKLOG + 10_000 {
            log.send(deny(&flood));
        }
        for _ in 0..10 {
            log.send(deny(&quiet));
        }
        go.send(()).unwrap();
        writer.finish();
        let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
        let lines = |pod: &str| {
            text.lines()
                .filter(|l| l.contains(&format!("({pod}:")))
                .count()
        };
        assert_eq!(lines("quiet"), 10);
        assert_eq!(quiet.dropped.get(), 0);
        assert_eq!(lines("first"), 1);
        // The flood kept its share, no more, and every record it lost is counted; every
        // denial is counted either way.
        let flooded = lines("flood") as u64;
        assert_eq!(flooded, SHARE as u64);
        assert_eq!(flooded + flood.dropped.get(), (BACKLOG + 10_000) as u64);
        assert_eq!(flood.denials.count(), (BACKLOG + 10_000) as u64);
        assert_eq!(flood.denied.get(), (BACKLOG + 10_000) as u64);
    }
}
