//! `--decision-format json`: one object per decision, every field, for log pipelines. The
//! schema is in docs/decisions.md.

use std::time::SystemTime;

use base64::Engine as _;
use janus_api::Verdict;
use serde_json::{Map, Value};

use super::Entry;

pub fn render(e: &Entry, at: SystemTime, out: &mut String) {
    let ctx = &e.ctx;
    let guard = &ctx.guard;
    let mut r = Map::new();
    let time = jiff::Timestamp::try_from(at).map_or(Value::Null, |t| t.to_string().into());
    r.insert("time".into(), time);
    r.insert("guard".into(), guard.name.clone().into());
    r.insert("namespace".into(), guard.namespace.clone().into());
    r.insert("pod".into(), ctx.pod.clone().into());
    r.insert("node".into(), ctx.node.clone().into());
    let container = Some(ctx.container.clone()).filter(|c| !c.is_empty());
    r.insert("container".into(), container.into());
    r.insert("verdict".into(), e.verdict.as_lower().into());
    // Whether the kernel was told the verdict: a monitored denial was allowed.
    let refused = e.verdict == Verdict::Deny && e.mode == janus_api::Mode::Enforce;
    r.insert("refused".into(), refused.into());
    r.insert("mode".into(), e.mode.name().into());
    r.insert("event".into(), e.event.name().into());
    r.insert("kernel_event".into(), e.event.kernel_name().into());
    let ftype = if e.is_dir { "directory" } else { "file" };
    r.insert("ftype".into(), ftype.into());
    bytes(&mut r, "path", Some(&e.path));
    bytes(&mut r, "name", e.name.as_deref());
    r.insert("subject".into(), e.subject.into());
    let tags = e
        .subject
        .and_then(|i| guard.subjects.get(i))
        .map(|s| {
            s.tags
                .iter()
                .map(|(k, v)| (k.clone(), Value::from(v.clone())))
                .collect::<Map<_, _>>()
        })
        .unwrap_or_default();
    r.insert("tags".into(), tags.into());
    let p = &e.process;
    let mut process = Map::new();
    process.insert("pid".into(), p.pid.into());
    process.insert("ppid".into(), p.ppid.into());
    process.insert("uid".into(), p.uid.into());
    process.insert("gid".into(), p.gid.into());
    bytes(&mut process, "comm", p.comm.as_deref());
    bytes(&mut process, "exe", p.exe.as_deref());
    r.insert("process".into(), process.into());
    out.push_str(&Value::Object(r).to_string());
}

/// A name as a string (null when unknown), and, when it is not UTF-8, its bytes exactly as
/// `<key>_base64` beside the string, which then has U+FFFD for what is not: a pipeline
/// gets a string field of one type, and nothing is lost.
fn bytes(r: &mut Map<String, Value>, key: &str, b: Option<&[u8]>) {
    let Some(b) = b else {
        r.insert(key.into(), Value::Null);
        return;
    };
    r.insert(key.into(), String::from_utf8_lossy(b).into_owned().into());
    if std::str::from_utf8(b).is_err() {
        let encoded = base64::engine::general_purpose::STANDARD.encode(b);
        r.insert(format!("{key}_base64"), encoded.into());
    }
}
