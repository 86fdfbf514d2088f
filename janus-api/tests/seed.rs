//! Every JanusGuard example of the original documentation parses and validates unchanged.

use std::collections::BTreeMap;
use std::path::PathBuf;

use janus_api::guard::parse_documents;
use janus_api::logformat::{LogRecord, Process};
use janus_api::{Event, GuardPolicy, Mode, Verdict};

fn fixture(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/seed")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn policy(text: &str) -> GuardPolicy {
    let guards = parse_documents(text).expect("parses");
    assert_eq!(guards.len(), 1);
    GuardPolicy::from_guard(&guards[0]).unwrap_or_else(|e| panic!("validates: {e}"))
}

/// The seed shows some examples as `subjects:` fragments; they go under a spec as written.
fn with_fragment(name: &str) -> GuardPolicy {
    let fragment = fixture(name);
    let indented: String = fragment.lines().map(|l| format!("  {l}\n")).collect();
    policy(&format!(
        "apiVersion: januscontroller.clustergarage.io/v1alpha1\nkind: JanusGuard\n\
         metadata:\n  name: myguard\nspec:\n  selector:\n    matchLabels:\n      app: myapp\n{indented}"
    ))
}

#[test]
fn required_definition() {
    let p = policy(&fixture("required-definition.yaml"));
    assert_eq!(p.name, "myguard");
    assert_eq!(
        p.selector.match_labels.get("app").map(String::as_str),
        Some("myapp")
    );
    let s = &p.subjects[0];
    assert_eq!(s.allow[0].to_string(), "/path/to/allow");
    assert_eq!(s.deny[0].to_string(), "/path/to/deny");
    assert!(s.events.contains(Event::Access));
    assert!(!s.events.contains(Event::Open));
}

#[test]
fn custom_tagging_joins_tags_sorted() {
    let p = policy(&fixture("custom-tagging.yaml"));
    assert_eq!(
        p.subjects[0].tags,
        BTreeMap::from([
            ("foo".into(), "bar".into()),
            ("lorem".into(), "ipsum".into())
        ])
    );
    assert!(p.subjects[0].events.contains(Event::Modify));
}

#[test]
fn custom_logformat_renders_the_seed_specifiers() {
    let p = policy(&fixture("custom-logformat.yaml"));
    let mut line = String::new();
    p.log_format.render(
        &LogRecord {
            pod: "pod",
            node: "node",
            guard: "myguard",
            verdict: Verdict::Allow,
            event: Event::Open,
            path: b"/path/to/allow/file.ext",
            is_dir: false,
            tags: &BTreeMap::new(),
            process: &Process {
                pid: 1,
                comm: Some(b"sh".to_vec()),
                ..Process::default()
            },
            container: "",
            name: None,
            mode: Mode::Enforce,
        },
        &mut line,
    );
    assert_eq!(
        line,
        "event = OPEN_PERM; path = /path/to/allow/file.ext; file = file.ext; response = ALLOW"
    );
}

#[test]
fn only_dir_fragment() {
    let p = with_fragment("fragment-only-dir.yaml");
    assert!(p.subjects[0].only_dir);
    assert_eq!(p.subjects[0].allow.len(), 2);
}

#[test]
fn auto_allow_owner_fragment() {
    let p = with_fragment("fragment-auto-allow-owner.yaml");
    let s = &p.subjects[0];
    assert!(s.auto_allow_owner);
    assert!(s.events.contains(Event::Open) && s.events.contains(Event::Access));
}

#[test]
fn audit_fragment_defaults_to_all_events() {
    let p = with_fragment("fragment-audit.yaml");
    let s = &p.subjects[0];
    assert!(s.audit);
    assert!(s.events.contains(Event::Open) && s.events.contains(Event::Access));
}
