//! The deployment as users apply it: every variant's checked-in rendering parsed into
//! Kubernetes types and checked for what the agent and controller need, and no more.

use std::collections::BTreeSet;

use anyhow::{Context, Result};
use clap::Parser;
use janus_deploy::render::{self, documents, find, VARIANTS};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{Container, PodSpec, Probe, Service, Volume, VolumeMount};
use k8s_openapi::api::rbac::v1::{ClusterRole, PolicyRule, Role};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// Parses `v` into `T` and fails if anything in `v` is lost on the way: a misspelt or
/// misplaced field would be silently dropped by the API server too.
fn typed<T: DeserializeOwned + serde::Serialize>(v: &Value) -> T {
    let t: T = serde_json::from_value(v.clone())
        .unwrap_or_else(|e| panic!("{} {}: {e}", v["kind"], v["metadata"]["name"]));
    let back = serde_json::to_value(&t).unwrap();
    assert_eq!(
        &back, v,
        "{} {}: fields lost when parsed into its type",
        v["kind"], v["metadata"]["name"]
    );
    t
}

fn objects(file: &str) -> Vec<Value> {
    documents(&render::rendered(file).unwrap()).unwrap()
}

fn all_variants() -> impl Iterator<Item = (&'static str, Vec<Value>)> {
    VARIANTS.iter().map(|(v, file)| (*v, objects(file)))
}

/// Every object of every variant parses into its Kubernetes type without loss.
#[test]
fn every_object_parses_into_its_type() {
    use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
    use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, RoleBinding};
    for (variant, objs) in all_variants() {
        let mut kinds = BTreeSet::new();
        for o in &objs {
            let kind = o["kind"].as_str().unwrap();
            kinds.insert(kind.to_owned());
            match kind {
                "Namespace" => drop(typed::<Namespace>(o)),
                "ServiceAccount" => drop(typed::<ServiceAccount>(o)),
                "ClusterRole" => drop(typed::<ClusterRole>(o)),
                "ClusterRoleBinding" => drop(typed::<ClusterRoleBinding>(o)),
                "Role" => drop(typed::<Role>(o)),
                "RoleBinding" => drop(typed::<RoleBinding>(o)),
                "Service" => drop(typed::<Service>(o)),
                "Deployment" => drop(typed::<Deployment>(o)),
                "DaemonSet" => drop(typed::<DaemonSet>(o)),
                "CustomResourceDefinition" => drop(typed::<CustomResourceDefinition>(o)),
                "NetworkPolicy" => {
                    drop(typed::<k8s_openapi::api::networking::v1::NetworkPolicy>(o))
                }
                // OpenShift's own type; checked field by field below.
                "SecurityContextConstraints" => assert!(variant.starts_with("openshift")),
                other => panic!("{variant}: unexpected kind {other}"),
            }
        }
        for k in [
            "Namespace",
            "ServiceAccount",
            "ClusterRole",
            "Service",
            "Deployment",
            "DaemonSet",
            "CustomResourceDefinition",
            "NetworkPolicy",
        ] {
            assert!(kinds.contains(k), "{variant}: no {k}");
        }
        for o in &objs {
            let ns = o["metadata"]["namespace"].as_str();
            let cluster_scoped = [
                "Namespace",
                "ClusterRole",
                "ClusterRoleBinding",
                "CustomResourceDefinition",
                "SecurityContextConstraints",
            ]
            .contains(&o["kind"].as_str().unwrap());
            assert_eq!(
                ns.is_none(),
                cluster_scoped,
                "{variant}: {} {} namespace {ns:?}",
                o["kind"],
                o["metadata"]["name"]
            );
            if let Some(ns) = ns {
                assert_eq!(
                    ns, "janus",
                    "{variant}: {} {}",
                    o["kind"], o["metadata"]["name"]
                );
            }
        }
    }
}

fn agent(objs: &[Value]) -> (DaemonSet, Container) {
    let ds: DaemonSet = typed(find(objs, "DaemonSet", "janus-agent").unwrap());
    let c = ds
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0]
        .clone();
    (ds, c)
}

fn controller(objs: &[Value]) -> (Deployment, Container) {
    let d: Deployment = typed(find(objs, "Deployment", "janus-controller").unwrap());
    let c = d
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0]
        .clone();
    (d, c)
}

/// The volume of `pod` that `mount` mounts.
fn volume_of<'a>(pod: &'a PodSpec, mount: &VolumeMount) -> &'a Volume {
    pod.volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .unwrap_or_else(|| {
            panic!(
                "no volume {} for the mount at {}",
                mount.name, mount.mount_path
            )
        })
}

fn args(c: &Container) -> Vec<String> {
    c.args.clone().unwrap_or_default()
}

fn http_probe(p: &Option<Probe>) -> (String, String) {
    let g = p
        .as_ref()
        .and_then(|p| p.http_get.as_ref())
        .expect("an httpGet probe");
    let port = match &g.port {
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(s) => s.clone(),
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(i) => i.to_string(),
    };
    (g.path.clone().unwrap(), port)
}

fn port(c: &Container, name: &str) -> i32 {
    c.ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("container {} has no port {name}", c.name))
        .container_port
}

/// The capabilities the agent needs (see deploy/base/agent.yaml for why each), no more.
const AGENT_CAPABILITIES: [&str; 7] = [
    "SYS_ADMIN",
    "SYS_PTRACE",
    "DAC_READ_SEARCH",
    "AUDIT_WRITE",
    "BPF",
    "PERFMON",
    "SYS_RESOURCE",
];

#[test]
fn agent_daemonset_has_what_the_agent_needs_and_no_more() {
    for (variant, objs) in all_variants() {
        let (ds, c) = agent(&objs);
        let pod = ds.spec.as_ref().unwrap().template.spec.clone().unwrap();
        assert_eq!(pod.host_pid, Some(true), "{variant}: hostPID");
        assert_ne!(pod.host_network, Some(true), "{variant}: hostNetwork");
        assert_eq!(
            pod.automount_service_account_token,
            Some(false),
            "{variant}: the agent needs no API token"
        );
        // Not the controller's account: a node can get a token for any account of a pod bound
        // to it, and the controller's reads the CA's key.
        assert_eq!(
            pod.service_account_name.as_deref(),
            Some("janus-agent"),
            "{variant}"
        );
        assert!(
            pod.tolerations.is_none(),
            "{variant}: tolerations are the operator's choice"
        );

        let sc = c.security_context.clone().unwrap();
        assert_ne!(sc.privileged, Some(true), "{variant}: privileged");
        assert_eq!(sc.read_only_root_filesystem, Some(true), "{variant}");
        let caps = sc.capabilities.unwrap();
        assert_eq!(
            caps.drop,
            Some(vec!["ALL".to_owned()]),
            "{variant}: drop ALL"
        );
        let added: BTreeSet<&str> = caps.add.iter().flatten().map(String::as_str).collect();
        assert_eq!(added, AGENT_CAPABILITIES.into(), "{variant}: capabilities");

        let mounts: Vec<(String, bool)> = c
            .volume_mounts
            .iter()
            .flatten()
            .map(|m| (m.mount_path.clone(), m.read_only == Some(true)))
            .collect();
        for (path, read_only) in [
            ("/sys/fs/bpf", true),
            ("/sys/kernel/security", true),
            ("/sys/fs/cgroup", true),
        ] {
            let m = c
                .volume_mounts
                .iter()
                .flatten()
                .find(|m| m.mount_path == path);
            let m = m.unwrap_or_else(|| panic!("{variant}: no mount at {path}: {mounts:?}"));
            assert_eq!(
                m.read_only == Some(true),
                read_only,
                "{variant}: {path} read-only"
            );
            assert_eq!(
                volume_of(&pod, m)
                    .host_path
                    .as_ref()
                    .map(|h| h.path.as_str()),
                Some(path),
                "{variant}: {path} is the host's"
            );
        }
        // The start gate: its socket where the agent serves it by default, and the hook's
        // binary where deploy/runtime's configurations name it, put there by the init
        // container.
        let host_of = |mount: &str| {
            let m = c
                .volume_mounts
                .iter()
                .flatten()
                .chain(
                    pod.init_containers
                        .iter()
                        .flatten()
                        .flat_map(|i| i.volume_mounts.iter().flatten()),
                )
                .find(|m| mount.starts_with(&m.mount_path))
                .unwrap_or_else(|| panic!("{variant}: nothing mounted at {mount}"));
            volume_of(&pod, m)
                .host_path
                .as_ref()
                .map(|h| h.path.clone())
        };
        let argv = std::iter::once("janus-agent".to_owned()).chain(args(&c));
        let Ok(Agent::Serve(serve)) = Agent::try_parse_from(argv) else {
            panic!("{variant}: the agent's args do not parse")
        };
        let socket = serve.gate.gate_socket.to_str().unwrap().to_owned();
        assert_eq!(host_of(&socket).as_deref(), Some("/run/janus"), "{variant}");
        let init = pod.init_containers.as_ref().expect("an init container");
        let argv = std::iter::once("janus-agent".to_owned()).chain(args(&init[0]));
        let Ok(Agent::InstallHook(install)) = Agent::try_parse_from(argv) else {
            panic!("{variant}: the init container does not install the hook")
        };
        let to = install.to.to_str().unwrap().to_owned();
        assert_eq!(host_of(&to).as_deref(), Some(HOOK_DIR), "{variant}");
        // No host path beyond those.
        let host_paths = pod
            .volumes
            .iter()
            .flatten()
            .filter(|v| v.host_path.is_some())
            .count();
        assert_eq!(host_paths, 5, "{variant}: host paths");

        assert_eq!(port(&c, "grpc"), 9700);
        assert_eq!(port(&c, "metrics"), 9701);
        let a = args(&c);
        assert_eq!(a[0], "serve", "{variant}");
        assert!(
            a.contains(&"--metrics-addr=0.0.0.0:9701".to_owned()),
            "{variant}: {a:?}"
        );
        assert!(
            a.contains(&"--listen=0.0.0.0:9700".to_owned()),
            "{variant}: {a:?}"
        );
        assert_eq!(
            http_probe(&c.liveness_probe),
            ("/healthz".into(), "metrics".into()),
            "{variant}"
        );
        assert_eq!(
            http_probe(&c.readiness_probe),
            ("/readyz".into(), "metrics".into()),
            "{variant}"
        );
    }
}

#[test]
fn controller_deployment() {
    for (variant, objs) in all_variants() {
        let (d, c) = controller(&objs);
        assert_eq!(d.spec.as_ref().unwrap().replicas, Some(1), "{variant}");
        let pod = d.spec.as_ref().unwrap().template.spec.clone().unwrap();
        assert_eq!(pod.service_account_name.as_deref(), Some("janus"));
        let sc = c.security_context.clone().unwrap();
        assert_eq!(sc.allow_privilege_escalation, Some(false), "{variant}");
        assert_eq!(
            sc.capabilities.unwrap().drop,
            Some(vec!["ALL".to_owned()]),
            "{variant}"
        );
        assert_eq!(
            pod.security_context.unwrap().run_as_non_root,
            Some(true),
            "{variant}"
        );
        assert_eq!(port(&c, "metrics"), 9702);
        assert_eq!(args(&c)[0], "run");
        // The controller serves /metrics and /healthz on 9702.
        assert_eq!(
            http_probe(&c.liveness_probe),
            ("/healthz".into(), "metrics".into()),
            "{variant}"
        );
        assert_eq!(
            http_probe(&c.readiness_probe),
            ("/healthz".into(), "metrics".into()),
            "{variant}"
        );
        let res = c.resources.unwrap();
        assert!(
            res.requests.is_some() && res.limits.is_some(),
            "{variant}: resources"
        );
    }
}

#[test]
fn agent_service_is_headless_and_selects_the_agents() {
    for (variant, objs) in all_variants() {
        let svc: Service = typed(find(&objs, "Service", "janus-agent").unwrap());
        let spec = svc.spec.unwrap();
        assert_eq!(
            spec.cluster_ip.as_deref(),
            Some("None"),
            "{variant}: headless"
        );
        let grpc = spec
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some("grpc"))
            .unwrap();
        assert_eq!(grpc.port, 9700, "{variant}");
        let (ds, _) = agent(&objs);
        let labels = ds.spec.unwrap().template.metadata.unwrap().labels.unwrap();
        for (k, v) in spec.selector.unwrap() {
            assert_eq!(labels.get(&k), Some(&v), "{variant}: selector {k}={v}");
        }
    }
}

/// The Secrets (or ConfigMaps) a pod's TLS volume projects, by kind and name, with whether
/// each may be absent.
fn tls_sources(c: &Container, pod: &PodSpec) -> Vec<(&'static str, String, bool)> {
    let m = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == "/etc/janus/tls")
        .unwrap_or_else(|| panic!("{}: no TLS mount", c.name));
    let vol = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == m.name)
        .unwrap();
    let sources = vol.projected.as_ref().unwrap().sources.clone().unwrap();
    sources
        .iter()
        .map(|s| match (&s.secret, &s.config_map) {
            (Some(x), None) => ("Secret", x.name.clone(), x.optional == Some(true)),
            (None, Some(x)) => ("ConfigMap", x.name.clone(), x.optional == Some(true)),
            other => panic!("unexpected source {other:?}"),
        })
        .collect()
}

/// Every variant speaks mutual TLS, with distinct material for the agents and the
/// controller. The plain variants need no certificate work: the controller makes the
/// material (`--tls-auto`) into the Secret the agents mount, and nothing else. The secure
/// ones take the operator's files as the original Janus did (Secret janus-tls or ConfigMap
/// janus-config for the agents) and the controller's own identity (janus-controller-tls).
#[test]
fn mutual_tls_in_every_variant_with_distinct_identities() {
    for (variant, objs) in all_variants() {
        let secure = variant.ends_with("secure");
        let (ds, a) = agent(&objs);
        let (d, c) = controller(&objs);
        let (agent_pod, controller_pod) = (
            ds.spec.unwrap().template.spec.unwrap(),
            d.spec.unwrap().template.spec.unwrap(),
        );
        let (a_args, c_args) = (args(&a), args(&c));
        for arg in a_args.iter().chain(&c_args) {
            assert!(!arg.contains("insecure"), "{variant}: {arg}");
            // The agents accept the controller's default identity, the one it is issued.
            assert!(!arg.starts_with("--tls-client-name"), "{variant}: {arg}");
        }
        for (flag, file) in [
            ("--tls-ca", "ca.pem"),
            ("--tls-cert", "cert.pem"),
            ("--tls-key", "key.pem"),
        ] {
            let f = format!("{flag}=/etc/janus/tls/{file}");
            assert!(a_args.contains(&f), "{variant} agent: {a_args:?}");
            assert_eq!(
                c_args.contains(&f),
                secure,
                "{variant} controller: {c_args:?}"
            );
        }
        let agent_sources = tls_sources(&a, &agent_pod);
        if secure {
            assert!(
                c_args.contains(&"--tls-server-name=janus-agent.janus.svc".to_owned()),
                "{variant}: {c_args:?}"
            );
            // The Secret last: where both exist it wins every key, so a ConfigMap cannot
            // replace the CA the agents trust.
            assert_eq!(
                agent_sources,
                [
                    ("ConfigMap", "janus-config".to_owned(), true),
                    ("Secret", "janus-tls".to_owned(), true)
                ],
                "{variant}"
            );
            assert_eq!(
                tls_sources(&c, &controller_pod),
                [("Secret", "janus-controller-tls".to_owned(), false)],
                "{variant}"
            );
        } else {
            assert!(
                c_args.contains(&"--tls-auto".to_owned()),
                "{variant}: {c_args:?}"
            );
            assert_eq!(
                agent_sources,
                [("Secret", "janus-agent-tls".to_owned(), false)],
                "{variant}"
            );
            // The controller reads the CA through the API, not a mount.
            assert!(c.volume_mounts.is_none(), "{variant}");
        }
    }
}

/// The agents' API port admits the controller's pods only; metrics stay scrapeable.
#[test]
fn network_policy_admits_only_the_controller_to_the_agent_api() {
    use k8s_openapi::api::networking::v1::NetworkPolicy;
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    for (variant, objs) in all_variants() {
        let np: NetworkPolicy = typed(find(&objs, "NetworkPolicy", "janus-agent").unwrap());
        let spec = np.spec.unwrap();
        let (ds, a) = agent(&objs);
        let labels = ds.spec.unwrap().template.metadata.unwrap().labels.unwrap();
        for (k, v) in spec
            .pod_selector
            .as_ref()
            .unwrap()
            .match_labels
            .clone()
            .unwrap()
        {
            assert_eq!(labels.get(&k), Some(&v), "{variant}: selects the agents");
        }
        assert_eq!(spec.policy_types, Some(vec!["Ingress".to_owned()]));
        let (_, c) = controller(&objs);
        let rules = spec.ingress.unwrap();
        let port_of = |r: &k8s_openapi::api::networking::v1::NetworkPolicyIngressRule| {
            let ports = r.ports.clone().unwrap();
            assert_eq!(ports.len(), 1, "{variant}");
            match ports[0].port.clone().unwrap() {
                IntOrString::String(name) => port(&a, &name),
                IntOrString::Int(n) => n,
            }
        };
        let mut grpc = 0;
        for r in &rules {
            match port_of(r) {
                9700 => {
                    grpc += 1;
                    let from = r.from.clone().unwrap();
                    assert_eq!(from.len(), 1, "{variant}: only the controller");
                    assert!(from[0].namespace_selector.is_none() && from[0].ip_block.is_none());
                    let want = from[0].pod_selector.clone().unwrap().match_labels.unwrap();
                    let controller_labels = controller(&objs)
                        .0
                        .spec
                        .unwrap()
                        .template
                        .metadata
                        .unwrap()
                        .labels
                        .unwrap();
                    for (k, v) in want {
                        assert_eq!(controller_labels.get(&k), Some(&v), "{variant}");
                    }
                }
                9701 => assert!(r.from.is_none(), "{variant}: metrics from anywhere"),
                other => panic!("{variant}: unexpected port {other}"),
            }
        }
        assert_eq!(grpc, 1, "{variant}: one rule for the API port");
        assert_eq!(port(&c, "metrics"), 9702);
        find(&objs, "NetworkPolicy", "janus-controller").unwrap();
    }
}

/// (API group, resource, verb) of every call janus-controller makes: its reflectors list and
/// watch guards, pods and the agents' EndpointSlices; it patches guard status and records
/// Events. Namespaced ones are granted in `janus` only.
const CONTROLLER_CLUSTER_CALLS: [(&str, &str, &str); 9] = [
    ("januscontroller.clustergarage.io", "janusguards", "list"),
    ("januscontroller.clustergarage.io", "janusguards", "watch"),
    (
        "januscontroller.clustergarage.io",
        "janusguards/status",
        "patch",
    ),
    ("", "pods", "list"),
    ("", "pods", "watch"),
    ("", "namespaces", "list"),
    ("", "namespaces", "watch"),
    ("events.k8s.io", "events", "create"),
    ("events.k8s.io", "events", "patch"),
];
const CONTROLLER_NAMESPACE_CALLS: [(&str, &str, &str); 2] = [
    ("discovery.k8s.io", "endpointslices", "list"),
    ("discovery.k8s.io", "endpointslices", "watch"),
];
/// With `--tls-auto`: the two Secrets it reads and may write again, and creating them.
const CONTROLLER_AUTO_TLS_CALLS: [(&str, &str, &str, &str); 4] = [
    ("", "secrets", "get", "janus-ca"),
    ("", "secrets", "get", "janus-agent-tls"),
    ("", "secrets", "update", "janus-agent-tls"),
    ("", "secrets", "create", ""),
];

/// (group, resource, verb, resource name or "" for any) of every grant.
fn grants(rules: &[PolicyRule]) -> BTreeSet<(String, String, String, String)> {
    let mut out = BTreeSet::new();
    for r in rules {
        assert!(r.non_resource_urls.is_none(), "{r:?}");
        let names = r
            .resource_names
            .clone()
            .unwrap_or_else(|| vec![String::new()]);
        for g in r.api_groups.iter().flatten() {
            for res in r.resources.iter().flatten() {
                for v in &r.verbs {
                    for s in [g, res, v] {
                        assert!(!s.contains('*'), "wildcard in {r:?}");
                    }
                    for n in &names {
                        out.insert((g.clone(), res.clone(), v.clone(), n.clone()));
                    }
                }
            }
        }
    }
    out
}

#[test]
fn rbac_grants_exactly_what_the_controller_calls() {
    let want = |calls: &[(&str, &str, &str)]| -> BTreeSet<(String, String, String, String)> {
        calls
            .iter()
            .map(|(g, r, v)| (g.to_string(), r.to_string(), v.to_string(), String::new()))
            .collect()
    };
    for (variant, objs) in all_variants() {
        let cr: ClusterRole = typed(find(&objs, "ClusterRole", "janus-controller").unwrap());
        assert_eq!(
            grants(&cr.rules.unwrap()),
            want(&CONTROLLER_CLUSTER_CALLS),
            "{variant}: ClusterRole"
        );
        let role: Role = typed(find(&objs, "Role", "janus-controller").unwrap());
        let mut in_namespace = want(&CONTROLLER_NAMESPACE_CALLS);
        if !variant.ends_with("secure") {
            in_namespace.extend(
                CONTROLLER_AUTO_TLS_CALLS.iter().map(|(g, r, v, n)| {
                    (g.to_string(), r.to_string(), v.to_string(), n.to_string())
                }),
            );
        }
        assert_eq!(
            grants(&role.rules.unwrap()),
            in_namespace,
            "{variant}: Role"
        );
        // Bound to the janus ServiceAccount and nothing else.
        for kind in ["ClusterRoleBinding", "RoleBinding"] {
            let b = find(&objs, kind, "janus-controller").unwrap();
            assert_eq!(
                b["subjects"],
                serde_json::json!([{"kind": "ServiceAccount", "name": "janus", "namespace": "janus"}])
            );
        }
        // No other role in the plain variants; OpenShift adds only the SCC's `use`.
        let roles: Vec<&Value> = objs
            .iter()
            .filter(|o| o["kind"] == "ClusterRole" || o["kind"] == "Role")
            .collect();
        for r in roles {
            if r["metadata"]["name"] == "janus-agent-scc" {
                assert!(variant.starts_with("openshift"));
                let cr: ClusterRole = typed(r);
                assert_eq!(
                    cr.rules.unwrap(),
                    vec![PolicyRule {
                        api_groups: Some(vec!["security.openshift.io".into()]),
                        resources: Some(vec!["securitycontextconstraints".into()]),
                        resource_names: Some(vec!["janus-agent".into()]),
                        verbs: vec!["use".into()],
                        non_resource_urls: None,
                    }]
                );
            } else {
                assert_eq!(
                    r["metadata"]["name"], "janus-controller",
                    "{variant}: unexpected role"
                );
            }
        }
    }
}

#[test]
fn openshift_scc_admits_the_agent() {
    for (variant, objs) in all_variants().filter(|(v, _)| v.starts_with("openshift")) {
        let scc = find(&objs, "SecurityContextConstraints", "janus-agent").unwrap();
        assert_eq!(scc["apiVersion"], "security.openshift.io/v1");
        assert_eq!(scc["allowHostPID"], true, "{variant}");
        assert_eq!(scc["allowHostDirVolumePlugin"], true, "{variant}");
        assert_eq!(scc["allowPrivilegedContainer"], false, "{variant}");
        assert_eq!(scc["allowHostNetwork"], false, "{variant}");
        let allowed: BTreeSet<&str> = scc["allowedCapabilities"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect();
        assert_eq!(allowed, AGENT_CAPABILITIES.into(), "{variant}");
        let volumes: BTreeSet<&str> = scc["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect();
        let (ds, c) = agent(&objs);
        for v in ds.spec.unwrap().template.spec.unwrap().volumes.unwrap() {
            let kind = if v.host_path.is_some() {
                "hostPath"
            } else if v.projected.is_some() {
                "projected"
            } else {
                "other"
            };
            assert!(
                volumes.contains(kind),
                "{variant}: volume {} ({kind}) not allowed by the SCC",
                v.name
            );
        }
        assert_eq!(
            c.security_context
                .unwrap()
                .se_linux_options
                .unwrap()
                .type_
                .as_deref(),
            Some("spc_t"),
            "{variant}"
        );
        let ns = find(&objs, "Namespace", "janus").unwrap();
        assert_eq!(
            ns["metadata"]["annotations"]["openshift.io/node-selector"], "",
            "{variant}"
        );
        let binding = find(&objs, "RoleBinding", "janus-agent-scc").unwrap();
        assert_eq!(binding["roleRef"]["name"], "janus-agent-scc");
        assert_eq!(binding["subjects"][0]["name"], "janus-agent");
    }
}

/// deploy/base/crd.yaml is what every variant installs. (Its equality with
/// `janus-controller crd` is the controller's own test.)
#[test]
fn crd_is_the_one_in_base() -> Result<()> {
    let path = render::deploy_dir().join("base/crd.yaml");
    let base = documents(&std::fs::read_to_string(&path)?)?;
    assert_eq!(base.len(), 1, "{}", path.display());
    let crd: CustomResourceDefinition = typed(&base[0]);
    assert_eq!(
        crd.metadata.name.as_deref(),
        Some("janusguards.januscontroller.clustergarage.io")
    );
    assert_eq!(crd.spec.group, "januscontroller.clustergarage.io");
    assert_eq!(crd.spec.names.kind, "JanusGuard");
    assert_eq!(crd.spec.scope, "Namespaced");
    let v = crd
        .spec
        .versions
        .iter()
        .find(|v| v.name == "v1alpha1")
        .context("v1alpha1")?;
    assert!(v.served && v.storage);
    assert!(
        v.subresources
            .as_ref()
            .and_then(|s| s.status.as_ref())
            .is_some(),
        "status subresource"
    );
    for (variant, objs) in all_variants() {
        let installed = objs
            .iter()
            .find(|o| o["kind"] == "CustomResourceDefinition")
            .unwrap();
        assert_eq!(
            installed, &base[0],
            "{variant}: CRD differs from deploy/base/crd.yaml"
        );
    }
    Ok(())
}

/// The checked-in renderings and the chart's copies are what Kustomize makes of deploy/
/// today (`scripts/render-deploy.sh` refreshes them).
#[test]
fn renderings_are_current() {
    let header = |v: &str| {
        format!("# Generated by scripts/render-deploy.sh from deploy/{v}; do not edit.\n")
    };
    for (variant, file) in VARIANTS {
        let checked_in = render::rendered(file).unwrap();
        if matches!(variant, "kubernetes" | "secure") {
            let chart =
                std::fs::read_to_string(render::deploy_dir().join("helm/janus/files").join(file))
                    .unwrap();
            assert_eq!(
                chart, checked_in,
                "helm/janus/files/{file} is stale: run scripts/render-deploy.sh"
            );
        }
        let fresh = format!("{}{}", header(variant), render::kustomize(variant).unwrap());
        assert_eq!(
            checked_in, fresh,
            "deploy/rendered/{file} is stale: run scripts/render-deploy.sh"
        );
    }
}

/// The example guards are valid JanusGuards, the seed's unchanged.
#[test]
fn examples_validate() {
    let dir = render::deploy_dir().join("examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(dir.join("seed"))
        .unwrap()
        .chain(std::fs::read_dir(&dir).unwrap())
    {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") || path.ends_with("janus-config.yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for g in janus_api::guard::parse_documents(&text).unwrap() {
            if let Err(e) = janus_api::GuardPolicy::from_guard(&g) {
                panic!("{}: {e:?}", path.display());
            }
            seen += 1;
        }
        if path.parent().unwrap().ends_with("seed") {
            let fixture = render::deploy_dir()
                .join("../tests/fixtures/seed")
                .join(path.file_name().unwrap());
            assert_eq!(
                text,
                std::fs::read_to_string(fixture).unwrap(),
                "{} differs from the seed",
                path.display()
            );
        }
    }
    assert_eq!(
        seen, 5,
        "three seed examples and the service-account token guard, enforced and monitored"
    );
}

/// Helm itself is not installable here (no Debian package), so the chart is checked as far
/// as it can be without it: what its templates read exists, and the image references its
/// `replace` calls rewrite occur in every rendering it includes.
#[test]
fn helm_chart_includes_the_renderings() {
    let chart = render::deploy_dir().join("helm/janus");
    let template = std::fs::read_to_string(chart.join("templates/janus.yaml")).unwrap();
    let quoted_after = |text: &str, marker: &str| -> Vec<String> {
        text.match_indices(marker)
            .map(|(i, _)| {
                let rest = &text[i + marker.len()..];
                let start = rest.find('"').unwrap() + 1;
                let end = start + rest[start..].find('"').unwrap();
                rest[start..end].to_owned()
            })
            .collect()
    };
    let mut included = Vec::new();
    for f in ["files/janus-k8s-secure.yaml", "files/janus-k8s.yaml"] {
        assert!(
            template.contains(&format!("\"{f}\"")),
            "the template no longer includes {f}"
        );
        included.push(std::fs::read_to_string(chart.join(f)).unwrap());
    }
    let images = quoted_after(&template, "replace ");
    assert_eq!(images.len(), 2, "{images:?}");
    for image in &images {
        for text in &included {
            assert!(
                text.contains(&format!("image: {image}\n")),
                "{image} is not in the rendering"
            );
        }
    }
    let values: Value =
        serde_yaml::from_str(&std::fs::read_to_string(chart.join("values.yaml")).unwrap()).unwrap();
    // The default is the plain rendering, whose mutual TLS needs no certificates; tls=true
    // makes both identities' Secrets from the chart's certs/.
    assert_eq!(values["tls"], false);
    let secrets = std::fs::read_to_string(chart.join("templates/tls-secret.yaml")).unwrap();
    for name in ["janus-tls", "janus-controller-tls"] {
        assert!(secrets.contains(&format!("name: {name}\n")), "{name}");
    }
    for file in [
        "controller-cert.pem",
        "controller-key.pem",
        "cert.pem",
        "key.pem",
    ] {
        assert!(secrets.contains(&format!("\"certs/{file}\"")), "{file}");
    }
    let meta: Value =
        serde_yaml::from_str(&std::fs::read_to_string(chart.join("Chart.yaml")).unwrap()).unwrap();
    assert_eq!(meta["name"], "janus");
    for image in &images {
        let tag = image.rsplit(':').next().unwrap();
        assert_eq!(
            meta["appVersion"], tag,
            "the chart's appVersion is the image tag it replaces"
        );
    }
}

/// The agent's and the controller's arguments, as each variant passes them.
#[derive(clap::Parser)]
enum Agent {
    Serve(Box<janus_agent::serve::ServeArgs>),
    InstallHook(janus_agent::hook::InstallArgs),
}

/// Where the runtimes' hook configurations in deploy/runtime name the hook's binary.
const HOOK_DIR: &str = "/opt/janus/bin";

#[derive(clap::Parser)]
enum Controller {
    Run(janus_controller::RunArgs),
}

/// Every variant starts both binaries with flags they have: parsed by their own definitions,
/// so a renamed flag fails here rather than in a crash-looping pod.
#[test]
fn container_args_parse_with_the_binaries_own_flags() {
    for (variant, objs) in all_variants() {
        let (_, a) = agent(&objs);
        let argv = std::iter::once("janus-agent".to_owned()).chain(args(&a));
        let Ok(Agent::Serve(serve)) = Agent::try_parse_from(argv) else {
            panic!("{variant}: agent args {:?}", args(&a))
        };
        assert_eq!(serve.listen.port(), port(&a, "grpc") as u16, "{variant}");
        let (_, c) = controller(&objs);
        let argv = std::iter::once("janus-controller".to_owned()).chain(args(&c));
        Controller::try_parse_from(argv)
            .unwrap_or_else(|e| panic!("{variant}: controller args {:?}: {e}", args(&c)));
    }
}

#[test]
fn the_runtimes_hook_configurations_name_the_binary_the_daemonset_installs() {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("runtime");
    let binary = format!("{HOOK_DIR}/janus-agent");
    let crio: Value =
        serde_json::from_slice(&std::fs::read(repo.join("cri-o/janus-gate.json")).unwrap())
            .unwrap();
    assert_eq!(crio["hook"]["path"], binary.as_str());
    assert_eq!(
        crio["hook"]["args"],
        serde_json::json!(["janus-agent", "hook", "--runtime", "cri-o"])
    );
    // Run by the runtime right before createRuntime, in its namespaces: CRI-O's hooks.d
    // takes the stages of runtime-spec 1.0.0.
    assert_eq!(crio["stages"], serde_json::json!(["prestart"]));
    assert_eq!(crio["when"]["always"], true);
    let script = std::fs::read_to_string(repo.join("containerd/make-base-spec.sh")).unwrap();
    assert!(
        script.contains(&format!("hook=${{2:-{binary}}}")),
        "{script}"
    );
    assert!(script.contains("out=${1:-/etc/containerd/janus-base-spec.json}"));
    let config = std::fs::read_to_string(repo.join("containerd/config.toml")).unwrap();
    assert!(config.contains(r#"base_runtime_spec = "/etc/containerd/janus-base-spec.json""#));
}

/// The NRI component: the agent registers at the runtime's NRI socket, mounted from the
/// node at the same path, and the hook it adds is the binary the init container installs.
#[test]
fn the_nri_component_wires_the_gate_through_the_runtime() {
    let objs = documents(&render::kustomize("examples/nri").unwrap()).unwrap();
    let (ds, a) = agent(&objs);
    let argv = std::iter::once("janus-agent".to_owned()).chain(args(&a));
    let Ok(Agent::Serve(serve)) = Agent::try_parse_from(argv) else {
        panic!("the agent's args do not parse: {:?}", args(&a))
    };
    let socket = serve.nri.nri_socket.expect("--nri-socket");
    assert_eq!(socket, std::path::Path::new("/var/run/nri/nri.sock"));
    assert_eq!(
        serve.nri.nri_hook,
        std::path::Path::new(HOOK_DIR).join("janus-agent")
    );
    let pod = ds.spec.unwrap().template.spec.unwrap();
    let mount = a
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| socket.starts_with(&m.mount_path))
        .expect("the NRI socket's directory mounted");
    let host = volume_of(&pod, mount)
        .host_path
        .as_ref()
        .expect("a hostPath");
    assert_eq!(host.path, mount.mount_path);
    assert_eq!(host.type_.as_deref(), Some("DirectoryOrCreate"));
}
