//! `logFormat` templates: parsed once at validation, rendered per decision.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::decide::Verdict;
use crate::policy::{Event, Mode};

/// The seed's default format, with `{via}` after the path: empty unless the object was
/// reached by another name than the guarded one, so an ordinary line is the seed's own.
pub const DEFAULT_LOG_FORMAT: &str =
    "<{response}> {event} {ftype} '{path}'{via} ({pod}:{node}) {tags}";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Specifier {
    Pod,
    Node,
    /// `ALLOW` or `DENY`; a denial of a subject in monitor mode, which the kernel was told
    /// to allow, is `DENY (monitor)`, so no line claims a refusal that did not happen.
    Response,
    /// The seed's own logFormat example prints the response as `{allow}`: an alias.
    Allow,
    Event,
    Path,
    /// The last component of the path.
    File,
    Ftype,
    Tags,
    Pid,
    Comm,
    Guard,
    /// The name the object was reached by (a rename, a hard link, a second mount), or the
    /// guarded path when it is the same.
    Name,
    /// ` via '<name>'` when the name differs from the guarded path, else nothing.
    Via,
    /// `enforce` or `monitor`: the deciding subject's mode.
    Mode,
    /// The process's parent, its real uid and gid, and its executable's path.
    Ppid,
    Uid,
    Gid,
    Exe,
    /// The container's ID, with its runtime's prefix (`containerd://…`).
    Container,
}

const SPECIFIERS: [(&str, Specifier); 20] = [
    ("pod", Specifier::Pod),
    ("node", Specifier::Node),
    ("response", Specifier::Response),
    ("allow", Specifier::Allow),
    ("event", Specifier::Event),
    ("path", Specifier::Path),
    ("file", Specifier::File),
    ("ftype", Specifier::Ftype),
    ("tags", Specifier::Tags),
    ("pid", Specifier::Pid),
    ("comm", Specifier::Comm),
    ("guard", Specifier::Guard),
    ("name", Specifier::Name),
    ("via", Specifier::Via),
    ("mode", Specifier::Mode),
    ("ppid", Specifier::Ppid),
    ("uid", Specifier::Uid),
    ("gid", Specifier::Gid),
    ("exe", Specifier::Exe),
    ("container", Specifier::Container),
];

/// What [`LogTemplate::parse`] accepts, as a regular expression (RE2, for the CRD's schema
/// to refuse a bad `logFormat` at admission): single-line text, `{{`, `}}` and the known
/// specifiers. A unit test keeps it in step with [`SPECIFIERS`].
pub const LOG_FORMAT_PATTERN: &str = r"^([^{}\r\n]|\{\{|\}\}|\{(pod|node|response|allow|event|path|file|ftype|tags|pid|comm|guard|name|via|mode|ppid|uid|gid|exe|container)\})*$";

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Literal(String),
    Spec(Specifier),
}

/// A parsed `logFormat`. `{{` and `}}` stand for literal braces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogTemplate {
    pieces: Vec<Piece>,
    /// The specifiers among `pieces`, a bit each: asked of every decision.
    used: u32,
}

/// `spec`'s bit in [`LogTemplate`]'s `used`.
const fn bit(spec: Specifier) -> u32 {
    1 << spec as u32
}

// Every specifier a template can hold (only those in SPECIFIERS parse) has a bit.
const _: () = {
    let mut i = 0;
    while i < SPECIFIERS.len() {
        assert!((SPECIFIERS[i].1 as u32) < u32::BITS);
        i += 1;
    }
};

impl Default for LogTemplate {
    fn default() -> Self {
        LogTemplate::parse(DEFAULT_LOG_FORMAT).expect("the default format parses")
    }
}

/// The process a decision was made for. What could not be learnt (a process that ended
/// before the agent read it) is `None`, and prints as `?`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Process {
    pub pid: i32,
    pub ppid: Option<i32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub comm: Option<Vec<u8>>,
    pub exe: Option<Vec<u8>>,
}

/// What a decision line is made of.
#[derive(Debug, Clone, Copy)]
pub struct LogRecord<'a> {
    pub pod: &'a str,
    pub node: &'a str,
    pub guard: &'a str,
    pub verdict: Verdict,
    pub event: Event,
    /// The guarded path of the object decided, as the container sees it; not necessarily
    /// UTF-8.
    pub path: &'a [u8],
    /// The name it was reached by, when that is not `path`.
    pub name: Option<&'a [u8]>,
    pub is_dir: bool,
    pub tags: &'a BTreeMap<String, String>,
    pub process: &'a Process,
    /// The container's ID; empty when not known (a PID guarded by `janus-agent guard`).
    pub container: &'a str,
    pub mode: Mode,
}

impl LogTemplate {
    pub fn parse(format: &str) -> Result<LogTemplate, String> {
        if format.chars().any(|c| c == '\n' || c == '\r') {
            return Err("must be a single line".into());
        }
        let mut pieces = Vec::new();
        let mut literal = String::new();
        let mut rest = format;
        while let Some(c) = rest.chars().next() {
            if rest.starts_with("{{") || rest.starts_with("}}") {
                literal.push(c);
                rest = &rest[2..];
            } else if c == '{' {
                let end = rest
                    .find('}')
                    .ok_or_else(|| format!("unclosed '{{' in {format:?}"))?;
                let name = &rest[1..end];
                let spec = SPECIFIERS
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, s)| *s)
                    .ok_or_else(|| {
                        let known: Vec<&str> = SPECIFIERS.iter().map(|(n, _)| *n).collect();
                        format!(
                            "unknown specifier {{{name}}}; known specifiers: {}",
                            known.join(", ")
                        )
                    })?;
                if !literal.is_empty() {
                    pieces.push(Piece::Literal(std::mem::take(&mut literal)));
                }
                pieces.push(Piece::Spec(spec));
                rest = &rest[end + 1..];
            } else if c == '}' {
                return Err(format!(
                    "unmatched '}}' in {format:?}; write '}}}}' for a brace"
                ));
            } else {
                literal.push(c);
                rest = &rest[c.len_utf8()..];
            }
        }
        if !literal.is_empty() {
            pieces.push(Piece::Literal(literal));
        }
        let used = pieces.iter().fold(0, |used, p| match p {
            Piece::Spec(s) => used | bit(*s),
            Piece::Literal(_) => used,
        });
        Ok(LogTemplate { pieces, used })
    }

    pub fn uses(&self, spec: Specifier) -> bool {
        self.used & bit(spec) != 0
    }

    /// Appends the line for `r` to `out`, without a newline or trailing blanks (the
    /// default format ends in `{tags}`, which is often empty).
    pub fn render(&self, r: &LogRecord<'_>, out: &mut String) {
        let start = out.len();
        for piece in &self.pieces {
            match piece {
                Piece::Literal(s) => out.push_str(s),
                Piece::Spec(spec) => match spec {
                    Specifier::Pod => escape_into(r.pod.as_bytes(), out),
                    Specifier::Node => escape_into(r.node.as_bytes(), out),
                    Specifier::Response | Specifier::Allow => {
                        out.push_str(r.verdict.as_upper());
                        if r.verdict == Verdict::Deny && r.mode == Mode::Monitor {
                            out.push_str(" (monitor)");
                        }
                    }
                    Specifier::Mode => out.push_str(r.mode.name()),
                    Specifier::Event => out.push_str(r.event.kernel_name()),
                    Specifier::Path => escape_into(r.path, out),
                    Specifier::File => {
                        let name = r.path.rsplit(|b| *b == b'/').next().unwrap_or(r.path);
                        escape_into(if name.is_empty() { r.path } else { name }, out)
                    }
                    Specifier::Ftype => out.push_str(if r.is_dir { "directory" } else { "file" }),
                    Specifier::Tags => {
                        for (i, (k, v)) in r.tags.iter().enumerate() {
                            if i > 0 {
                                out.push(',');
                            }
                            let _ = write!(out, "{k}={v}");
                        }
                    }
                    Specifier::Pid => {
                        let _ = write!(out, "{}", r.process.pid);
                    }
                    Specifier::Ppid => number(r.process.ppid, out),
                    Specifier::Uid => number(r.process.uid, out),
                    Specifier::Gid => number(r.process.gid, out),
                    Specifier::Comm => known(r.process.comm.as_deref(), out),
                    Specifier::Exe => known(r.process.exe.as_deref(), out),
                    Specifier::Container => {
                        known(Some(r.container.as_bytes()).filter(|c| !c.is_empty()), out)
                    }
                    Specifier::Guard => escape_into(r.guard.as_bytes(), out),
                    Specifier::Name => escape_into(r.name.unwrap_or(r.path), out),
                    Specifier::Via => {
                        if let Some(name) = r.name {
                            out.push_str(" via '");
                            escape_into(name, out);
                            out.push('\'');
                        }
                    }
                },
            }
        }
        let kept = out[start..].trim_end_matches(' ').len();
        out.truncate(start + kept);
    }
}

fn number(n: Option<impl std::fmt::Display>, out: &mut String) {
    match n {
        Some(n) => {
            let _ = write!(out, "{n}");
        }
        None => out.push('?'),
    }
}

fn known(bytes: Option<&[u8]>, out: &mut String) {
    match bytes {
        Some(b) => escape_into(b, out),
        None => out.push('?'),
    }
}

/// Writes `bytes` so that any byte string yields one printable line that cannot end the
/// quoted field it stands in, nor read other than it is: invalid UTF-8, control characters,
/// line and paragraph separators and bidi or zero-width format characters become `\xNN`, a
/// backslash `\\` and a quote `\'`.
pub fn escape_into(bytes: &[u8], out: &mut String) {
    // Most names are printable ASCII with neither of the escaped two: copied whole.
    if bytes
        .iter()
        .all(|b| (0x20..0x7f).contains(b) && *b != b'\\' && *b != b'\'')
    {
        if let Ok(plain) = std::str::from_utf8(bytes) {
            out.push_str(plain);
            return;
        }
    }
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\'' => out.push_str("\\'"),
                // Line and paragraph separators, and the format characters that reorder or
                // hide text in a viewer (bidi overrides and isolates, zero widths).
                c if c.is_control()
                    || matches!(c, '\u{2028}' | '\u{2029}' | '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}') =>
                {
                    let mut buf = [0u8; 4];
                    for b in c.encode_utf8(&mut buf).bytes() {
                        let _ = write!(out, "\\x{b:02x}");
                    }
                }
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A parser of the default line: the fields, with `\x`, `\\` and `\'` undone.
    fn parse_default(line: &str) -> (String, Vec<u8>, Option<Vec<u8>>, String) {
        let quoted = |s: &str| -> (Vec<u8>, usize) {
            let b = s.as_bytes();
            assert_eq!(b[0], b'\'');
            let (mut out, mut i) = (Vec::new(), 1);
            loop {
                match b[i] {
                    b'\'' => return (out, i + 1),
                    b'\\' if b[i + 1] == b'x' => {
                        out.push(u8::from_str_radix(&s[i + 2..i + 4], 16).unwrap());
                        i += 4;
                    }
                    b'\\' => {
                        out.push(b[i + 1]);
                        i += 2;
                    }
                    c => {
                        out.push(c);
                        i += 1;
                    }
                }
            }
        };
        let start = line.find('\'').unwrap();
        let head = line[..start].to_owned();
        let (path, n) = quoted(&line[start..]);
        let mut rest = &line[start + n..];
        let name = rest.strip_prefix(" via ").map(|r| {
            let (name, n) = quoted(r);
            rest = &r[n..];
            name
        });
        (head, path, name, rest.to_owned())
    }

    #[test]
    fn a_hostile_name_cannot_forge_a_field_or_a_line() {
        let t = LogTemplate::default();
        let forged: &[u8] =
            b"/data/x' (payments-db-0:node-9) team=payments\n<ALLOW> \xff\\'\xe2\x80\xa8";
        for (path, name) in [(forged, None), (b"/data/secret".as_slice(), Some(forged))] {
            let mut line = String::new();
            t.render(
                &LogRecord {
                    pod: "web-1",
                    node: "node-a",
                    guard: "g",
                    verdict: Verdict::Deny,
                    event: Event::Open,
                    path,
                    name,
                    is_dir: false,
                    tags: &BTreeMap::from([("team".into(), "a".into())]),
                    process: &Process::default(),
                    container: "",
                    mode: Mode::Enforce,
                },
                &mut line,
            );
            assert!(!line.contains('\n') && !line.contains('\u{2028}'), "{line}");
            let (head, p, n, rest) = parse_default(&line);
            assert_eq!(head, "<DENY> OPEN_PERM file ");
            assert_eq!(p, path);
            assert_eq!(n.as_deref(), name);
            assert_eq!(rest, " (web-1:node-a) team=a");
        }
    }

    #[test]
    fn only_printable_ascii_passes_unescaped() {
        for b in 0..=u8::MAX {
            let mut out = String::new();
            escape_into(&[b'a', b, b'z'], &mut out);
            let plain = (0x20..0x7f).contains(&b) && b != b'\\' && b != b'\'';
            if plain {
                assert_eq!(out.as_bytes(), [b'a', b, b'z'], "byte {b:#04x}");
            } else {
                assert!(
                    out.starts_with("a\\") && out.ends_with('z'),
                    "byte {b:#04x}: {out}"
                );
            }
        }
    }

    #[test]
    fn a_monitored_denial_says_nothing_was_refused() {
        let line = |verdict, mode, format: &str| {
            let mut line = String::new();
            LogTemplate::parse(format).unwrap().render(
                &LogRecord {
                    pod: "web-1",
                    node: "node-a",
                    guard: "g",
                    verdict,
                    event: Event::Open,
                    path: b"/data/secret",
                    name: None,
                    is_dir: false,
                    tags: &BTreeMap::new(),
                    process: &Process::default(),
                    container: "",
                    mode,
                },
                &mut line,
            );
            line
        };
        assert_eq!(
            line(Verdict::Deny, Mode::Monitor, DEFAULT_LOG_FORMAT),
            "<DENY (monitor)> OPEN_PERM file '/data/secret' (web-1:node-a)"
        );
        assert_eq!(
            line(Verdict::Deny, Mode::Enforce, DEFAULT_LOG_FORMAT),
            "<DENY> OPEN_PERM file '/data/secret' (web-1:node-a)"
        );
        // An allow is an allow in either mode; the seed's `{allow}` alias says the same.
        assert_eq!(
            line(Verdict::Allow, Mode::Monitor, "{allow} {mode}"),
            "ALLOW monitor"
        );
        assert_eq!(
            line(Verdict::Deny, Mode::Monitor, "{allow} {mode}"),
            "DENY (monitor) monitor"
        );
    }

    #[test]
    fn the_schema_pattern_names_exactly_the_specifiers() {
        let names: Vec<&str> = SPECIFIERS.iter().map(|(n, _)| *n).collect();
        let listed = LOG_FORMAT_PATTERN
            .split_once(r"\{(")
            .and_then(|(_, rest)| rest.split_once(r")\}"))
            .map(|(list, _)| list.split('|').collect::<Vec<_>>())
            .expect("the pattern lists the specifiers");
        assert_eq!(listed, names);
    }

    #[test]
    fn a_template_uses_exactly_the_specifiers_it_names() {
        for (name, spec) in SPECIFIERS {
            let t = LogTemplate::parse(&format!("{{{{x}}}} {{{name}}}")).unwrap();
            for (_, other) in SPECIFIERS {
                assert_eq!(t.uses(other), other == spec, "{{{name}}} uses {other:?}");
            }
        }
        assert!(!LogTemplate::parse("{{via}}").unwrap().uses(Specifier::Via));
    }
}
