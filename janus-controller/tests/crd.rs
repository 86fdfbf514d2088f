//! The CRD: deploy/base/crd.yaml is what `janus-controller crd` prints, its schema refuses
//! what the agent refuses, and every manifest of the original Janus still fits it.

use std::path::PathBuf;

use janus_controller::crd::{crd_yaml, JanusGuard, JanusGuardSpec, PATH_PATTERN};
use kube::CustomResourceExt;

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

#[test]
fn deploy_copy_is_generated_from_the_types() {
    let path = repo("deploy/base/crd.yaml");
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        on_disk == crd_yaml(),
        "{} is stale: run `cargo run -p janus-controller -- crd > deploy/base/crd.yaml`",
        path.display()
    );
}

#[test]
fn crd_is_namespaced_with_status_and_printer_columns() {
    let crd = serde_json::to_value(JanusGuard::crd()).unwrap();
    assert_eq!(crd["spec"]["scope"], "Namespaced");
    assert_eq!(crd["spec"]["group"], "januscontroller.clustergarage.io");
    let version = &crd["spec"]["versions"][0];
    assert_eq!(version["name"], "v1alpha1");
    assert!(version["subresources"]["status"].is_object());
    let columns: Vec<&str> = version["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(columns, ["Mode", "Pods", "Ready", "Degraded", "Age"]);
    let spec = &version["schema"]["openAPIV3Schema"]["properties"]["spec"];
    assert_eq!(spec["properties"]["subjects"]["minItems"], 1);
    // A guard without a selector is refused at admission (`spec.selector: Required value`);
    // `{}` is accepted and keeps its Kubernetes meaning.
    assert_eq!(
        spec["required"],
        serde_json::json!(["selector", "subjects"])
    );
    assert!(spec["properties"]["selector"].get("nullable").is_none());
    let subject = &spec["properties"]["subjects"]["items"]["properties"];
    for field in ["allow", "deny"] {
        assert_eq!(subject[field]["items"]["pattern"], PATH_PATTERN, "{field}");
    }
    let events: Vec<&str> = subject["events"]["items"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    assert_eq!(events, ["all", "open", "access", "exec", "modify"]);
    // The API server refuses an unknown mode at `spec.mode` or `spec.subjects[i].mode`
    // (`Unsupported value`), as the agent does.
    let modes: Vec<&str> = janus_api::Mode::ALL.iter().map(|m| m.name()).collect();
    for at in [&spec["properties"]["mode"], &subject["mode"]] {
        assert_eq!(at["type"], "string");
        assert_eq!(at["enum"], serde_json::json!(modes));
    }
}

#[test]
fn path_pattern_refuses_what_the_agent_refuses() {
    let re = regex::Regex::new(PATH_PATTERN).unwrap();
    for ok in [
        "/",
        "/a",
        "/a/b/",
        "/a/.hidden",
        "/a/..b",
        "/a/b..",
        "/./a",
        "/a//b",
    ] {
        assert!(re.is_match(ok), "{ok} should be accepted");
        assert!(janus_api::GuardPath::parse(ok).is_ok(), "{ok}");
    }
    for bad in ["", "a", "data/secret", "/a/../b", "/..", "/a/..", "../a"] {
        assert!(!re.is_match(bad), "{bad} should be refused");
        assert!(janus_api::GuardPath::parse(bad).is_err(), "{bad}");
    }
}

/// Every seed manifest deserializes into the CRD's types unchanged, and what the controller
/// sends the agent is the same spec the agent would read from the manifest itself.
#[test]
fn seed_manifests_fit_unchanged() {
    let dir = repo("tests/fixtures/seed");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let (ours, theirs): (JanusGuardSpec, janus_api::JanusGuardSpec) = if text
            .contains("kind: JanusGuard")
        {
            let g: JanusGuard =
                serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let api = janus_api::guard::parse_documents(&text).unwrap().remove(0);
            (g.spec, api.spec)
        } else {
            // A `subjects:` fragment, as the seed shows some examples.
            (
                serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
                serde_yaml::from_str(&text).unwrap(),
            )
        };
        let sent: janus_api::JanusGuardSpec = serde_json::from_str(&ours.to_json()).unwrap();
        assert_eq!(sent, theirs, "{}", path.display());
        seen += 1;
    }
    assert!(seen >= 6, "only {seen} fixtures in {}", dir.display());
}

/// The CRD's CEL rules, read back from the generated CRD and evaluated on objects as a user
/// writes them, give the agent's verdict on the same guard.
#[test]
fn cel_rules_refuse_what_the_agent_refuses() {
    let crd = serde_json::to_value(JanusGuard::crd()).unwrap();
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    let rule = |schema: &serde_json::Value| {
        let rule = schema["x-kubernetes-validations"][0]["rule"]
            .as_str()
            .unwrap_or_else(|| panic!("no CEL rule in {schema}"));
        cel_interpreter::Program::compile(rule).unwrap_or_else(|e| panic!("{rule}: {e}"))
    };
    let admits = |program: &cel_interpreter::Program, object: &serde_json::Value| {
        let mut ctx = cel_interpreter::Context::default();
        ctx.add_variable("self", object).unwrap();
        match program.execute(&ctx).unwrap() {
            cel_interpreter::Value::Bool(b) => b,
            other => panic!("a rule must give a bool, not {other:?}"),
        }
    };
    let agent_admits = |selector: &str, subject: &str| {
        let text = format!(
            "apiVersion: januscontroller.clustergarage.io/v1alpha1\nkind: JanusGuard\n\
             metadata: {{name: g, namespace: ns}}\n\
             spec: {{selector: {selector}, subjects: [{subject}]}}\n"
        );
        let guard = janus_api::guard::parse_documents(&text).unwrap().remove(0);
        janus_api::GuardPolicy::from_spec("g", "ns", &guard.spec).is_ok()
    };
    let yaml = |text: &str| serde_yaml::from_str::<serde_json::Value>(text).unwrap();

    let subject_rule = rule(&spec["properties"]["subjects"]["items"]);
    for subject in [
        "{allow: [/a]}",
        "{deny: [/a], events: [open]}",
        "{allow: [/a], deny: []}",
        "{events: [open]}",
        "{allow: [], deny: []}",
        "{onlyDir: true}",
    ] {
        assert_eq!(
            admits(&subject_rule, &yaml(subject)),
            agent_admits("{}", subject),
            "subject {subject}"
        );
    }

    let requirement_rule =
        rule(&spec["properties"]["selector"]["properties"]["matchExpressions"]["items"]);
    for requirement in [
        "{key: app, operator: In, values: [web]}",
        "{key: app, operator: NotIn, values: [web, db]}",
        "{key: app, operator: In}",
        "{key: app, operator: NotIn, values: []}",
        "{key: app, operator: Exists}",
        "{key: app, operator: DoesNotExist, values: []}",
        "{key: app, operator: Exists, values: [web]}",
    ] {
        assert_eq!(
            admits(&requirement_rule, &yaml(requirement)),
            agent_admits(
                &format!("{{matchExpressions: [{requirement}]}}"),
                "{deny: [/a]}"
            ),
            "requirement {requirement}"
        );
    }
}

#[test]
fn log_format_pattern_refuses_what_the_agent_refuses() {
    let crd = serde_json::to_value(JanusGuard::crd()).unwrap();
    let pattern = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        ["properties"]["logFormat"]["pattern"]
        .as_str()
        .expect("logFormat has a pattern");
    let re = regex::Regex::new(pattern).unwrap();
    for format in [
        janus_api::logformat::DEFAULT_LOG_FORMAT,
        "",
        "{allow} {file} {pid} {comm} {guard}",
        "{{\"path\": \"{path}\"}}",
        "{nope}",
        "{pod",
        "pod}",
        "{}",
        "two\nlines",
        "{Pod}",
    ] {
        assert_eq!(
            re.is_match(format),
            janus_api::LogTemplate::parse(format).is_ok(),
            "logFormat {format:?}"
        );
    }
}
