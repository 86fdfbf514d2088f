//! Validation names the field at fault, and reports every problem at once.

use janus_api::guard::{parse_documents, ParseError};
use janus_api::GuardPolicy;

fn guard(subjects: &str) -> String {
    format!(
        "apiVersion: januscontroller.clustergarage.io/v1alpha1\nkind: JanusGuard\n\
         metadata:\n  name: g\nspec:\n  selector:\n    matchLabels:\n      app: a\n{subjects}"
    )
}

fn errors(text: &str) -> String {
    let guards = parse_documents(text).expect("parses");
    GuardPolicy::from_guard(&guards[0])
        .expect_err("must not validate")
        .to_string()
}

#[test]
fn a_selector_is_required_and_empty_selects_every_pod() {
    let bare = "apiVersion: januscontroller.clustergarage.io/v1alpha1\nkind: JanusGuard\n\
                metadata:\n  name: g\nspec:\n  subjects:\n  - deny: [/x]\n";
    assert_eq!(
        errors(bare),
        "spec.selector: is required (`{}` selects every pod of the namespace)"
    );
    let empty = bare.replace("spec:\n", "spec:\n  selector: {}\n");
    let policy = GuardPolicy::from_guard(&parse_documents(&empty).unwrap()[0]).unwrap();
    assert!(policy
        .selector
        .matches(&[("app".into(), "x".into())].into()));
}

#[test]
fn relative_path_names_the_field() {
    assert_eq!(
        errors(&guard("  subjects:\n  - deny: [data/secret]\n")),
        r#"spec.subjects[0].deny[0]: path must be absolute: "data/secret""#
    );
}

#[test]
fn dot_dot_and_nul_are_refused() {
    let e = errors(&guard(
        "  subjects:\n  - allow: [/a/../etc]\n    deny: [\"/a\\0b\"]\n",
    ));
    assert!(
        e.contains("spec.subjects[0].allow[0]: path must not contain '..'"),
        "{e}"
    );
    assert!(
        e.contains("spec.subjects[0].deny[0]: path must not contain NUL"),
        "{e}"
    );
}

#[test]
fn unknown_event_is_named_with_its_index() {
    let e = errors(&guard(
        "  subjects:\n  - deny: [/a]\n    events: [open, delete]\n",
    ));
    assert!(
        e.starts_with("spec.subjects[0].events[1]: unknown event \"delete\""),
        "{e}"
    );
}

#[test]
fn unknown_modes_are_named_with_their_field() {
    let e = errors(&guard(
        "  mode: audit\n  subjects:\n  - deny: [/a]\n  - deny: [/b]\n    mode: Monitor\n",
    ));
    assert_eq!(
        e,
        "spec.mode: unknown mode \"audit\"; expected enforce or monitor\n\
         spec.subjects[1].mode: unknown mode \"Monitor\"; expected enforce or monitor"
    );
}

#[test]
fn unknown_log_specifier() {
    let e = errors(&guard(
        "  logFormat: \"{path} {user}\"\n  subjects:\n  - deny: [/a]\n",
    ));
    assert!(
        e.starts_with("spec.logFormat: unknown specifier {user}"),
        "{e}"
    );
}

#[test]
fn subjects_and_paths_are_required() {
    assert_eq!(
        errors(&guard("  subjects: []\n")),
        "spec.subjects: at least one subject is required"
    );
    assert_eq!(
        errors(&guard("  subjects:\n  - events: [open]\n")),
        "spec.subjects[0]: at least one allow or deny path is required"
    );
}

#[test]
fn every_problem_is_reported() {
    let e = errors(&guard(
        "  logFormat: \"{nope}\"\n  subjects:\n  - deny: [rel]\n    events: [bogus]\n",
    ));
    assert_eq!(e.lines().count(), 3, "{e}");
}

#[test]
fn a_misspelt_flag_is_an_error_not_a_silent_default() {
    let err = parse_documents(&guard(
        "  subjects:\n  - deny: [/a]\n    autoAllowOwnr: true\n",
    ))
    .expect_err("unknown field");
    assert!(matches!(err, ParseError::Yaml { .. }));
    assert!(err.to_string().contains("autoAllowOwnr"), "{err}");
}

#[test]
fn wrong_kind_or_version() {
    let text = guard("  subjects:\n  - deny: [/a]\n").replace("kind: JanusGuard", "kind: Guard");
    assert!(matches!(
        parse_documents(&text),
        Err(ParseError::Kind { .. })
    ));
    let text = guard("  subjects:\n  - deny: [/a]\n").replace("v1alpha1", "v1");
    assert!(matches!(
        parse_documents(&text),
        Err(ParseError::ApiVersion { .. })
    ));
}

#[test]
fn paths_are_normalised() {
    let guards = parse_documents(&guard("  subjects:\n  - deny: [//a/./b/]\n")).unwrap();
    let p = GuardPolicy::from_guard(&guards[0]).unwrap();
    assert_eq!(p.subjects[0].deny[0].to_string(), "/a/b");
}

#[test]
fn tags_cannot_forge_log_lines() {
    let e = errors(&guard(
        "  subjects:\n  - deny: [/a]\n    tags:\n      k: \"v\\n<ALLOW>\"\n",
    ));
    assert!(e.starts_with("spec.subjects[0].tags.k:"), "{e}");
}

#[test]
fn the_gate_failure_mode_is_read_and_named_when_unknown() {
    let policy = |extra: &str| {
        let text = guard(&format!("{extra}  subjects:\n  - deny: [/a]\n"));
        GuardPolicy::from_guard(&parse_documents(&text).unwrap()[0])
    };
    let mode = |extra: &str| policy(extra).unwrap().start_on_gate_failure;
    assert_eq!(mode(""), None, "unset: the namespace's, else closed");
    assert_eq!(mode("  onGateFailure: failClosed\n"), Some(false));
    assert_eq!(mode("  onGateFailure: failOpen\n"), Some(true));
    assert_eq!(
        policy("  onGateFailure: open\n").unwrap_err().to_string(),
        r#"spec.onGateFailure: "open": must be failClosed or failOpen"#
    );
}
