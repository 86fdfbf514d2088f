//! The manifests as `kubectl` renders them, and the queries of the alerts and dashboard.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::Value;

/// Every variant, with the file `scripts/render-deploy.sh` writes for it.
pub const VARIANTS: [(&str, &str); 4] = [
    ("kubernetes", "janus-k8s.yaml"),
    ("secure", "janus-k8s-secure.yaml"),
    ("openshift", "janus-openshift.yaml"),
    ("openshift-secure", "janus-openshift-secure.yaml"),
];

/// `deploy/`.
pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

/// The checked-in rendering of a variant (`deploy/rendered/`), as users apply it.
pub fn rendered(file: &str) -> Result<String> {
    let path = deploy_dir().join("rendered").join(file);
    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

/// `kubectl kustomize deploy/<dir>`, as text.
pub fn kustomize(dir: &str) -> Result<String> {
    let path = deploy_dir().join(dir);
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(&path)
        .output()
        .context(
            "running kubectl kustomize (kubectl 1.27 or later, whose Kustomize has Components; \
             Debian's kubernetes-client is older)",
        )?;
    if !out.status.success() {
        bail!(
            "kubectl kustomize {} failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8(out.stdout).context("kubectl output is UTF-8")
}

/// The objects of a multi-document YAML stream, as JSON values (empty documents skipped).
pub fn documents(yaml: &str) -> Result<Vec<Value>> {
    let mut docs = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(yaml).enumerate() {
        let v = Value::deserialize(doc).with_context(|| format!("YAML document {i}"))?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    Ok(docs)
}

/// The one object of `kind` named `name`.
pub fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> Result<&'a Value> {
    let mut found = objects
        .iter()
        .filter(|o| o["kind"] == kind && o["metadata"]["name"] == name);
    match (found.next(), found.next()) {
        (Some(o), None) => Ok(o),
        (None, _) => bail!("no {kind} {name}"),
        (Some(_), Some(_)) => bail!("more than one {kind} {name}"),
    }
}

/// Every PromQL expression of the alerts (`deploy/monitoring/prometheusrule.yaml`) and the
/// dashboard (`deploy/monitoring/janus-dashboard.json`: panel targets and template
/// variables), each with where it comes from.
pub fn monitoring_queries() -> Result<Vec<(String, String)>> {
    let dir = deploy_dir().join("monitoring");
    let mut queries = Vec::new();

    let rules_path = dir.join("prometheusrule.yaml");
    let rules = documents(&std::fs::read_to_string(&rules_path)?)?;
    for rule in rules
        .iter()
        .flat_map(|r| r["spec"]["groups"].as_array().into_iter().flatten())
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
    {
        let name = rule["alert"].as_str().or(rule["record"].as_str());
        let expr = rule["expr"].as_str();
        match (name, expr) {
            (Some(n), Some(e)) => queries.push((format!("alert {n}"), e.to_owned())),
            _ => bail!("{}: a rule without a name or expr", rules_path.display()),
        }
    }

    let dash_path = dir.join("janus-dashboard.json");
    let dash: Value = serde_json::from_str(&std::fs::read_to_string(&dash_path)?)
        .with_context(|| dash_path.display().to_string())?;
    for panel in dash["panels"].as_array().into_iter().flatten() {
        for t in panel["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().with_context(|| {
                format!(
                    "{}: panel {} target without expr",
                    dash_path.display(),
                    panel["title"]
                )
            })?;
            queries.push((format!("panel {}", panel["title"]), expr.to_owned()));
        }
    }
    for var in dash["templating"]["list"].as_array().into_iter().flatten() {
        if var["type"] == "query" {
            let q = var["query"]["query"]
                .as_str()
                .or(var["query"].as_str())
                .context("template variable without a query")?;
            queries.push((format!("variable {}", var["name"]), q.to_owned()));
        }
    }
    Ok(queries)
}
