//! The decision log: one line per decision on stdout, written by its own thread after the
//! kernel has its answer. On a node stdout is a file the kubelet writes, so the answering
//! thread only hands lines over and never waits for them.

use std::io::Write;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use janus_api::logformat::Specifier;
use janus_api::{Event, GuardPolicy, LogRecord, Mode, Verdict};
use prometheus::IntCounter;

use crate::resolve;

/// Lines waiting to be written before new ones are dropped and counted.
const BACKLOG: usize = 64 * 1024;
/// How long the writer lets lines gather after a flush before it waits on the channel
/// again. A sender wakes the writer only while it waits, and that wake (a futex call and a
/// context switch) cost the answering thread more than the decision itself under load.
const GATHER: std::time::Duration = std::time::Duration::from_millis(1);

/// What every line of one guard on one target shares.
pub struct LogContext {
    pub guard: Arc<GuardPolicy>,
    pub pod: String,
    pub node: String,
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
    pub pid: i32,
    /// Whether the kernel was told `verdict`, or to allow.
    pub mode: Mode,
}

enum Message {
    Line(Box<Entry>),
    /// Sent by [`LogWriter::finish`]: what was queued before it is written, then the writer
    /// ends, whoever still holds a sender (an HTTP handler's copy of the agent, say).
    Finish,
}

#[derive(Clone)]
pub struct LogSender {
    tx: SyncSender<Message>,
    dropped: IntCounter,
}

impl LogSender {
    pub fn send(&self, entry: Entry) {
        if self.tx.try_send(Message::Line(Box::new(entry))).is_err() {
            self.dropped.inc();
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

pub fn start(out: Box<dyn Write + Send>, dropped: IntCounter) -> (LogSender, LogWriter) {
    let (tx, rx) = sync_channel(BACKLOG);
    let thread = std::thread::Builder::new()
        .name("decision-log".into())
        .spawn(move || write_loop(rx, out))
        .expect("spawning the log thread");
    let sender = LogSender {
        tx: tx.clone(),
        dropped,
    };
    (sender, LogWriter { tx, thread })
}

fn write_loop(rx: Receiver<Message>, out: Box<dyn Write + Send>) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
    let mut line = String::new();
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(message) = next {
            let Message::Line(e) = message else {
                let _ = out.flush();
                return;
            };
            line.clear();
            render(&e, &mut line);
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

fn render(e: &Entry, out: &mut String) {
    let template = &e.ctx.guard.log_format;
    let comm = if template.uses(Specifier::Comm) {
        resolve::comm(e.pid)
    } else {
        Vec::new()
    };
    let tags = e
        .subject
        .and_then(|i| e.ctx.guard.subjects.get(i))
        .map_or("", |s| s.tags.as_str());
    template.render(
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
            pid: e.pid,
            comm: &comm,
            mode: e.mode,
        },
        out,
    );
}
