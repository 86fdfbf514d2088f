//! Checks PromQL queries against the metrics a binary exposes: every metric a query names
//! must exist, with every label the query matches on or groups by, and every value a query
//! matches a label to exactly (`state="failed"`) must occur.
//!
//! The queries are simple (selectors, functions, aggregations with `by`), so a small
//! tokenizer is enough; it errs on the side of reporting.

use std::collections::{BTreeMap, BTreeSet};

/// Labels Prometheus adds to every series of a target: `job` and `instance`, and `node`,
/// which the ServiceMonitor sets from the pod's node.
pub const TARGET_LABELS: [&str; 3] = ["job", "instance", "node"];

/// A family's labels, each with the values seen on its samples.
pub type Labels = BTreeMap<String, BTreeSet<String>>;

/// Metric families of a Prometheus text exposition: name -> labels seen on its samples.
/// A histogram's `_bucket`, `_sum` and `_count` series are listed under their own names
/// (`_bucket` with `le`), as queries name them.
pub fn families(text: &str) -> BTreeMap<String, Labels> {
    let mut out: BTreeMap<String, Labels> = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            // A family with no series yet still exists; its labels are unknown.
            if let Some(name) = rest.split_whitespace().next() {
                out.entry(name.to_owned()).or_default();
            }
            continue;
        }
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = &line[..name_end];
        let labels = out.entry(name.to_owned()).or_default();
        if line[name_end..].starts_with('{') {
            let body = &line[name_end + 1..line.rfind('}').unwrap_or(line.len())];
            for (label, value) in label_pairs(body) {
                labels.entry(label).or_default().insert(value);
            }
        }
    }
    out
}

/// `a="x",b="y"` (values may contain escaped quotes and commas).
fn label_pairs(body: &str) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    let mut rest = body;
    while let Some(eq) = rest.find(['=', '!']) {
        let label = rest[..eq].trim().trim_start_matches(',').trim().to_owned();
        let after = &rest[eq..];
        let Some(open) = after.find('"') else { break };
        let value_start = &after[open + 1..];
        let mut end = None;
        let mut escaped = false;
        for (i, c) in value_start.char_indices() {
            match c {
                '\\' if !escaped => escaped = true,
                '"' if !escaped => {
                    end = Some(i);
                    break;
                }
                _ => escaped = false,
            }
        }
        let Some(end) = end else { break };
        pairs.push((label, value_start[..end].to_owned()));
        rest = &value_start[end + 1..];
    }
    pairs
}

/// What a query refers to.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Refs {
    /// Metric name -> labels its selectors match on.
    pub metrics: BTreeMap<String, BTreeSet<String>>,
    /// Labels of `by (...)` clauses (and of `label_values`).
    pub grouping: BTreeSet<String>,
    /// (metric, label, value) of exact matchers (`label="value"`).
    pub equals: BTreeSet<(String, String, String)>,
}

const KEYWORDS: [&str; 11] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
];

/// Aggregation operators, which may be followed by `by (...)` before their `(`.
const AGGREGATIONS: [&str; 12] = [
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
];

/// The metrics and labels a PromQL expression (or a Grafana `label_values(expr, label)`)
/// refers to.
pub fn refs(query: &str) -> Refs {
    let mut r = Refs::default();
    let query = match query.trim().strip_prefix("label_values(") {
        Some(inner) => {
            let inner = inner.trim_end().trim_end_matches(')');
            match inner.rfind(',') {
                Some(comma) if !inner[comma..].contains('}') => {
                    r.grouping.insert(inner[comma + 1..].trim().to_owned());
                    inner[..comma].to_owned()
                }
                _ => inner.to_owned(),
            }
        }
        None => query.to_owned(),
    };
    let chars: Vec<char> = query.chars().collect();
    let mut i = 0;
    let mut last_keyword: Option<String> = None;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' {
            i = skip_string(&chars, i);
        } else if c == '[' {
            while i < chars.len() && chars[i] != ']' {
                i += 1;
            }
            i += 1;
        } else if c.is_ascii_digit() || c == '.' {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut j = i;
            while j < chars.len() && chars[j].is_whitespace() {
                j += 1;
            }
            let next = chars.get(j).copied();
            if KEYWORDS.contains(&word.as_str()) {
                last_keyword = Some(word);
            } else if next == Some('(') || AGGREGATIONS.contains(&word.as_str()) {
                last_keyword = None; // a function or aggregation
            } else {
                let labels = r.metrics.entry(word.clone()).or_default();
                if next == Some('{') {
                    let (matched, equals, end) = selector_labels(&chars, j);
                    labels.extend(matched);
                    r.equals
                        .extend(equals.into_iter().map(|(l, v)| (word.clone(), l, v)));
                    i = end;
                }
                last_keyword = None;
            }
        } else if c == '(' && matches!(last_keyword.as_deref(), Some("by" | "without")) {
            let end = chars[i..]
                .iter()
                .position(|&c| c == ')')
                .map_or(chars.len(), |p| i + p);
            let list: String = chars[i + 1..end].iter().collect();
            r.grouping.extend(
                list.split(',')
                    .map(|l| l.trim().to_owned())
                    .filter(|l| !l.is_empty()),
            );
            i = end + 1;
            last_keyword = None;
        } else if c == '{' {
            // A selector without a metric name: {__name__="..."} is not used here.
            let (_, _, end) = selector_labels(&chars, i);
            i = end;
        } else {
            i += 1;
        }
    }
    r
}

fn skip_string(chars: &[char], start: usize) -> usize {
    let quote = chars[start];
    let mut i = start + 1;
    while i < chars.len() && chars[i] != quote {
        if chars[i] == '\\' {
            i += 1;
        }
        i += 1;
    }
    i + 1
}

/// The label names of the selector `{...}` opening at `open`, its exact matchers (label,
/// value), and the index after it.
fn selector_labels(chars: &[char], open: usize) -> (Vec<String>, Vec<(String, String)>, usize) {
    let mut labels = Vec::new();
    let mut equals = Vec::new();
    let mut i = open + 1;
    let mut name = String::new();
    while i < chars.len() && chars[i] != '}' {
        let c = chars[i];
        if c == '"' || c == '\'' {
            i = skip_string(chars, i);
            continue;
        }
        if c == '=' || c == '!' {
            let label = name.trim().to_owned();
            name.clear();
            // The operator; the value string follows.
            let op = i;
            while i < chars.len() && matches!(chars[i], '=' | '!' | '~') {
                i += 1;
            }
            let exact = i - op == 1 && c == '=';
            while i < chars.len() && chars[i].is_whitespace() {
                i += 1;
            }
            if !label.is_empty() {
                if exact && matches!(chars.get(i), Some('"' | '\'')) {
                    let end = skip_string(chars, i);
                    let value = chars[i + 1..end.saturating_sub(1).max(i + 1)]
                        .iter()
                        .collect();
                    equals.push((label.clone(), value));
                }
                labels.push(label);
            }
            continue;
        }
        if c == ',' {
            name.clear();
        } else {
            name.push(c);
        }
        i += 1;
    }
    (labels, equals, i + 1)
}

/// Problems with `query` against `exposed` (see [`families`]), one sentence each. `up` is
/// Prometheus's own and has only the target labels.
pub fn check_query(query: &str, exposed: &BTreeMap<String, Labels>) -> Vec<String> {
    let r = refs(query);
    let mut problems = Vec::new();
    if r.metrics.is_empty() {
        problems.push(format!("names no metric: {query}"));
    }
    let target: BTreeSet<String> = TARGET_LABELS.iter().map(|l| l.to_string()).collect();
    let mut query_labels: Option<BTreeSet<String>> = None;
    for (metric, used) in &r.metrics {
        let labels = if metric == "up" {
            target.clone()
        } else {
            match exposed.get(metric) {
                Some(l) => l
                    .keys()
                    .cloned()
                    .collect::<BTreeSet<_>>()
                    .union(&target)
                    .cloned()
                    .collect(),
                None => {
                    problems.push(format!("metric {metric} is not exposed"));
                    continue;
                }
            }
        };
        for l in used.difference(&labels) {
            problems.push(format!("metric {metric} has no label {l:?}"));
        }
        // Grouping labels must exist on every metric of the query.
        query_labels = Some(match query_labels {
            None => labels,
            Some(q) => q.intersection(&labels).cloned().collect(),
        });
    }
    if let Some(q) = query_labels {
        for l in r.grouping.difference(&q) {
            problems.push(format!(
                "groups by {l:?}, which not every metric of the query has"
            ));
        }
    }
    // An exact value must occur (template variables such as "$node" stand for any).
    for (metric, label, value) in &r.equals {
        let seen = exposed.get(metric).and_then(|l| l.get(label));
        if let Some(values) = seen.filter(|_| !value.contains('$')) {
            if !values.contains(value) {
                problems.push(format!(
                    "metric {metric} has no series with {label}={value:?}"
                ));
            }
        }
    }
    problems
}

/// Checks every `(origin, query)` against the union of the expositions in `texts` (e.g. the
/// agent's `/metrics` and the controller's registry). Returns `origin: problem` lines.
pub fn check_queries(texts: &[&str], queries: &[(String, String)]) -> Vec<String> {
    let mut exposed: BTreeMap<String, Labels> = BTreeMap::new();
    for t in texts {
        for (name, labels) in families(t) {
            let family = exposed.entry(name).or_default();
            for (label, values) in labels {
                family.entry(label).or_default().extend(values);
            }
        }
    }
    queries
        .iter()
        .flat_map(|(origin, q)| {
            check_query(q, &exposed)
                .into_iter()
                .map(move |p| format!("{origin}: {p}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
# HELP janus_decisions_total Decisions.
# TYPE janus_decisions_total counter
janus_decisions_total{backend=\"fanotify\",event=\"OPEN_PERM\",guard=\"g\",namespace=\"n\",response=\"deny\"} 3
# TYPE janus_decision_latency_seconds histogram
janus_decision_latency_seconds_bucket{backend=\"fanotify\",le=\"0.001\"} 3
janus_decision_latency_seconds_sum{backend=\"fanotify\"} 0.0001
janus_decision_latency_seconds_count{backend=\"fanotify\"} 3
# TYPE janus_log_lines_dropped_total counter
janus_log_lines_dropped_total{guard=\"g\",namespace=\"n\"} 0
";

    fn check(q: &str) -> Vec<String> {
        check_query(q, &families(TEXT))
    }

    #[test]
    fn families_and_labels() {
        let f = families(TEXT);
        assert_eq!(
            f["janus_decisions_total"].keys().collect::<Vec<_>>(),
            ["backend", "event", "guard", "namespace", "response"]
        );
        assert_eq!(
            f["janus_decisions_total"]["response"],
            ["deny".to_owned()].into()
        );
        assert!(f["janus_decision_latency_seconds_bucket"].contains_key("le"));
        assert_eq!(
            f["janus_log_lines_dropped_total"]
                .keys()
                .collect::<Vec<_>>(),
            ["guard", "namespace"]
        );
    }

    #[test]
    fn good_queries_pass() {
        for q in [
            "sum by (response, event) (rate(janus_decisions_total{node=~\"$node\", namespace=~\"$namespace\"}[$__rate_interval]))",
            "histogram_quantile(0.99, sum by (le, node, backend) (rate(janus_decision_latency_seconds_bucket[5m]))) > 0.001",
            "increase(janus_log_lines_dropped_total[10m]) > 0",
            "absent(up{job=\"janus-agent\"} == 1)",
            "label_values(up{job=\"janus-agent\"}, node)",
            "label_values(janus_decisions_total, namespace)",
        ] {
            assert_eq!(check(q), Vec::<String>::new(), "{q}");
        }
    }

    #[test]
    fn bad_queries_are_reported() {
        assert_eq!(
            check("rate(janus_decision_total[5m])"),
            ["metric janus_decision_total is not exposed"]
        );
        assert_eq!(
            check("janus_decisions_total{verdict=\"deny\"}"),
            ["metric janus_decisions_total has no label \"verdict\""]
        );
        assert_eq!(
            check("sum by (kind) (janus_decisions_total)"),
            ["groups by \"kind\", which not every metric of the query has"]
        );
        assert_eq!(
            check("label_values(janus_log_lines_dropped_total, pod)").len(),
            1
        );
        assert_eq!(check("up{pod=\"x\"}"), ["metric up has no label \"pod\""]);
        assert_eq!(
            check("janus_decisions_total{response=\"allow\"}"),
            ["metric janus_decisions_total has no series with response=\"allow\""]
        );
        // Regular expressions and template variables are not values to look for.
        assert!(check("janus_decisions_total{response=~\"allow\",guard=\"$guard\"}").is_empty());
    }

    #[test]
    fn strings_and_durations_are_not_metrics() {
        let r = refs("sum(rate(janus_decisions_total{response=\"deny\",guard=~\"a|b\"}[5m] offset 1h)) by (guard)");
        assert_eq!(
            r.metrics.keys().collect::<Vec<_>>(),
            ["janus_decisions_total"]
        );
        assert_eq!(
            r.metrics["janus_decisions_total"],
            ["guard", "response"].map(String::from).into()
        );
        assert_eq!(r.grouping, ["guard".to_owned()].into());
        let exact = (
            "janus_decisions_total".to_owned(),
            "response".to_owned(),
            "deny".to_owned(),
        );
        assert_eq!(r.equals, [exact].into());
    }
}
