//! The decision rule and the decision line, independent of any backend.

use janus_api::guard::parse_documents;
use janus_api::logformat::{escape_into, LogRecord, Process};
use janus_api::{Event, GuardPolicy, LogTemplate, Mode, RuleSet, Verdict};

fn rules(subjects: &str) -> RuleSet {
    let text = format!(
        "apiVersion: januscontroller.clustergarage.io/v1alpha1\nkind: JanusGuard\n\
         metadata:\n  name: g\nspec:\n  selector: {{}}\n  subjects:\n{subjects}"
    );
    RuleSet::from_policy(&GuardPolicy::from_guard(&parse_documents(&text).unwrap()[0]).unwrap())
}

fn verdict(r: &RuleSet, path: &str, event: Event, owner: bool) -> Option<Verdict> {
    r.decide(path.as_bytes(), event, owner).map(|d| d.verdict)
}

#[test]
fn longest_path_wins_and_deny_wins_ties() {
    let r = rules(
        "  - deny: [/data]\n    allow: [/data/pub]\n  - allow: [/data/x]\n  - deny: [/data/x]\n",
    );
    assert_eq!(
        verdict(&r, "/data/secret", Event::Open, false),
        Some(Verdict::Deny)
    );
    assert_eq!(
        verdict(&r, "/data/pub/file", Event::Open, false),
        Some(Verdict::Allow)
    );
    assert_eq!(
        verdict(&r, "/data/x", Event::Open, false),
        Some(Verdict::Deny)
    );
    assert_eq!(verdict(&r, "/other", Event::Open, false), None);
}

#[test]
fn a_directory_covers_whole_components_only() {
    let r = rules("  - deny: [/data]\n");
    assert_eq!(
        verdict(&r, "/data", Event::Open, false),
        Some(Verdict::Deny)
    );
    assert_eq!(verdict(&r, "/database", Event::Open, false), None);
    let root = rules("  - deny: [/]\n");
    assert_eq!(
        verdict(&root, "/anything/at/all", Event::Access, false),
        Some(Verdict::Deny)
    );
}

#[test]
fn events_filter_rules() {
    let r = rules("  - deny: [/a]\n    events: [exec]\n  - deny: [/a/b]\n    events: [access]\n");
    assert_eq!(
        verdict(&r, "/a/b/c", Event::Exec, false),
        Some(Verdict::Deny)
    );
    assert_eq!(verdict(&r, "/a/b/c", Event::Open, false), None);
    assert_eq!(
        verdict(&r, "/a/b/c", Event::Access, false),
        Some(Verdict::Deny)
    );
}

#[test]
fn owner_is_allowed_only_with_the_flag() {
    let with = rules("  - deny: [/s]\n    autoAllowOwner: true\n");
    let d = with.decide(b"/s", Event::Open, true).unwrap();
    assert_eq!((d.verdict, d.by_owner), (Verdict::Allow, true));
    assert_eq!(
        verdict(&with, "/s", Event::Open, false),
        Some(Verdict::Deny)
    );
    let without = rules("  - deny: [/s]\n");
    assert_eq!(
        verdict(&without, "/s", Event::Open, true),
        Some(Verdict::Deny)
    );
}

#[test]
fn a_monitored_subject_decides_alike_and_refuses_nothing() {
    let text = concat!(
        "apiVersion: januscontroller.clustergarage.io/v1alpha1\nkind: JanusGuard\n",
        "metadata:\n  name: g\nspec:\n  selector: {}\n  mode: monitor\n  subjects:\n  - deny: [/m]\n",
        "  - deny: [/e]\n    mode: enforce\n",
        "  - deny: [/both]\n  - deny: [/both]\n    mode: enforce\n",
    );
    let policy = GuardPolicy::from_guard(&parse_documents(text).unwrap()[0]).unwrap();
    assert_eq!(policy.mode(), None, "the subjects' modes differ");
    assert!(policy.can_refuse() && !policy.monitors_only());
    let r = RuleSet::from_policy(&policy);
    let d = r.decide(b"/m/x", Event::Open, false).unwrap();
    assert_eq!(
        (d.verdict, d.mode, d.refuses()),
        (Verdict::Deny, Mode::Monitor, false)
    );
    let d = r.decide(b"/e/x", Event::Open, false).unwrap();
    assert_eq!(
        (d.verdict, d.mode, d.refuses()),
        (Verdict::Deny, Mode::Enforce, true)
    );
    // Two subjects deny one path: the enforced one decides, whatever the order written.
    let d = r.decide(b"/both", Event::Open, false).unwrap();
    assert_eq!((d.subject, d.refuses()), (3, true));

    // A monitored subject never weakens an enforced one: neither a longer monitored allow
    // nor a longer monitored deny inside an enforced deny lets the access through.
    let nested = concat!(
        "apiVersion: januscontroller.clustergarage.io/v1alpha1\nkind: JanusGuard\n",
        "metadata:\n  name: g\nspec:\n  selector: {}\n  subjects:\n  - deny: [/data]\n",
        "  - {allow: [/data/trial], deny: [/data/trial/x], mode: monitor}\n",
        "  - {allow: [/open], mode: enforce}\n  - {deny: [/open/x], mode: monitor}\n",
    );
    let r = RuleSet::from_policy(
        &GuardPolicy::from_guard(&parse_documents(nested).unwrap()[0]).unwrap(),
    );
    for path in ["/data/trial/f", "/data/trial/x"] {
        let d = r.decide(path.as_bytes(), Event::Open, false).unwrap();
        assert_eq!((d.subject, d.refuses()), (0, true), "{path}");
    }
    // Inside an enforced allow, a monitored deny is reported, and nothing refused.
    let d = r.decide(b"/open/x", Event::Open, false).unwrap();
    assert_eq!(
        (d.verdict, d.mode, d.refuses()),
        (Verdict::Deny, Mode::Monitor, false)
    );
    let d = r.decide(b"/open/y", Event::Open, false).unwrap();
    assert_eq!((d.verdict, d.mode), (Verdict::Allow, Mode::Enforce));

    let monitor_only = text.replace("    mode: enforce\n", "");
    let policy = GuardPolicy::from_guard(&parse_documents(&monitor_only).unwrap()[0]).unwrap();
    assert_eq!(policy.mode(), Some(Mode::Monitor));
    assert!(
        !policy.can_refuse() && policy.monitors_only(),
        "a monitored guard's errors refuse nothing either"
    );
}

fn record<'a>(path: &'a [u8], tags: &'a str) -> LogRecord<'a> {
    LogRecord {
        pod: "foo-1-pod",
        node: "barnode",
        guard: "g",
        verdict: Verdict::Allow,
        event: Event::Access,
        path,
        is_dir: false,
        tags: Box::leak(Box::new(
            tags.split(',')
                .filter_map(|t| t.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
        )),
        process: Box::leak(Box::new(Process {
            pid: 42,
            ppid: Some(7),
            uid: Some(1000),
            gid: Some(1001),
            comm: Some(b"cat".to_vec()),
            exe: Some(b"/usr/bin/cat".to_vec()),
        })),
        container: "containerd://0123abcd",
        name: None,
        mode: Mode::Enforce,
    }
}

#[test]
fn default_format_renders_the_seed_example_exactly() {
    let mut line = String::new();
    LogTemplate::default().render(&record(b"/path/to/file.ext", "foo=bar"), &mut line);
    assert_eq!(
        line,
        "<ALLOW> ACCESS_PERM file '/path/to/file.ext' (foo-1-pod:barnode) foo=bar"
    );
    line.clear();
    LogTemplate::default().render(&record(b"/p", ""), &mut line);
    assert_eq!(line, "<ALLOW> ACCESS_PERM file '/p' (foo-1-pod:barnode)");
}

#[test]
fn names_that_are_not_utf8_are_escaped() {
    let mut line = String::new();
    let t = LogTemplate::parse("{path} {file} {pid} {comm} {guard}").unwrap();
    t.render(&record(b"/d/\xff\xfe\n\\x", ""), &mut line);
    assert_eq!(
        line,
        "/d/\\xff\\xfe\\x0a\\\\x \\xff\\xfe\\x0a\\\\x 42 cat g"
    );
    let mut s = String::new();
    escape_into("é".as_bytes(), &mut s);
    assert_eq!(s, "é");
}

#[test]
fn the_process_and_container_specifiers_render_what_is_known() {
    let t = LogTemplate::parse("{pid} {ppid} {uid} {gid} {comm} {exe} {container}").unwrap();
    let mut line = String::new();
    t.render(&record(b"/p", ""), &mut line);
    assert_eq!(
        line,
        "42 7 1000 1001 cat /usr/bin/cat containerd://0123abcd"
    );
    // A process that ended before it was read: only its PID is known.
    let gone = Process {
        pid: 42,
        ..Process::default()
    };
    let mut r = record(b"/p", "");
    r.process = &gone;
    r.container = "";
    line.clear();
    t.render(&r, &mut line);
    assert_eq!(line, "42 ? ? ? ? ? ?");
    // An executable's name is escaped as a path is.
    let odd = Process {
        exe: Some(b"/tmp/x' \xff\n".to_vec()),
        ..gone.clone()
    };
    r.process = &odd;
    line.clear();
    LogTemplate::parse("{exe}").unwrap().render(&r, &mut line);
    assert_eq!(line, "/tmp/x\\' \\xff\\x0a");
}

#[test]
fn braces_escape_and_unknown_specifiers_fail() {
    let t = LogTemplate::parse("{{literal}} {response}").unwrap();
    let mut line = String::new();
    t.render(&record(b"/p", ""), &mut line);
    assert_eq!(line, "{literal} ALLOW");
    assert!(LogTemplate::parse("{unclosed").is_err());
    assert!(LogTemplate::parse("a } b").is_err());
    assert!(LogTemplate::parse("two\nlines").is_err());
}
