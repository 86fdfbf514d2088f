//! The control plane's identities, with real TLS handshakes against a real `janus-agent
//! serve`: the controller's first start makes the material (kube's mock API), the agent takes
//! calls from the controller's identity only, and `/state` stays off the pod network.

mod support;

use std::time::Duration;

use janus_controller::agents::{AgentPool, Listing};
use janus_controller::pki::{self, Pem, AGENT_SECRET, CA_SECRET};
use rcgen::ExtendedKeyUsagePurpose;
use support::{agent_bin, free_port, secret_field, start_agent, MockApi};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};
use x509_parser::extensions::GeneralName;

/// (DNS names, extended key usages: (serverAuth, clientAuth)) of a PEM certificate.
fn identity_of(pem: &str) -> (Vec<String>, (bool, bool)) {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
    let cert = pem.parse_x509().unwrap();
    let names = cert
        .subject_alternative_name()
        .unwrap()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::DNSName(d) => Some(d.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    (names, (eku.server_auth, eku.client_auth))
}

#[tokio::test]
async fn the_first_start_makes_the_secrets_and_later_starts_reuse_them() {
    let (client, api) = MockApi::start();
    let first = pki::bootstrap(client.clone(), "janus").await.unwrap();
    let created: Vec<String> = api
        .secret_calls("POST")
        .iter()
        .map(|s| s.body["metadata"]["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(created, [CA_SECRET, AGENT_SECRET]);
    // The agents' Secret holds what they mount; the CA's key stays in the controller's.
    assert_eq!(
        secret_field(&api, AGENT_SECRET, "cert.pem"),
        first.agent.cert
    );
    assert_eq!(secret_field(&api, AGENT_SECRET, "ca.pem"), first.ca);
    assert!(secret_field(&api, CA_SECRET, "ca-key.pem").contains("PRIVATE KEY"));
    // Distinct identities, each with only its own usage.
    assert_eq!(
        identity_of(&first.agent.cert),
        (vec!["janus-agent.janus.svc".to_owned()], (true, false))
    );
    assert_eq!(
        identity_of(&first.controller.cert),
        (vec!["janus-controller.janus.svc".to_owned()], (false, true))
    );

    // A restart (or a second replica) reads them back: nothing is created again, and the
    // controller issues itself a new client certificate from the same CA.
    let second = pki::bootstrap(client, "janus").await.unwrap();
    assert_eq!(api.secret_calls("POST").len(), 2);
    assert_eq!(
        (&second.ca, &second.agent.cert),
        (&first.ca, &first.agent.cert)
    );
    assert_ne!(second.controller.cert, first.controller.cert);
}

#[tokio::test]
async fn an_agent_secret_from_another_ca_is_issued_again() {
    let (client, api) = MockApi::start();
    let first = pki::bootstrap(client.clone(), "janus").await.unwrap();
    // Someone deleted the CA only: the next start makes a new one, and the agents'
    // certificate must follow it or no handshake would succeed.
    api.forget_secret(CA_SECRET);
    let second = pki::bootstrap(client, "janus").await.unwrap();
    assert_ne!(second.ca, first.ca);
    assert_eq!(api.secret_calls("PUT").len(), 1);
    assert_eq!(secret_field(&api, AGENT_SECRET, "ca.pem"), second.ca);
}

fn client(ca: &str, who: &Pem, server_name: &str) -> AgentPool {
    AgentPool::new(
        Some(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca))
                .identity(Identity::from_pem(&who.cert, &who.key))
                .domain_name(server_name),
        ),
        Duration::from_secs(5),
    )
}

/// GET `path` from `host:port`: the status code.
fn http_status(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, out)
}

/// This machine's first address that is not loopback, as a pod's would be.
fn pod_network_ip() -> std::net::IpAddr {
    let out = std::process::Command::new("hostname")
        .arg("-I")
        .output()
        .unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .filter_map(|a| a.parse::<std::net::IpAddr>().ok())
        .find(|a| a.is_ipv4() && !a.is_loopback())
        .expect("a non-loopback IPv4 address on this machine")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_controllers_identity_commands_an_agent() {
    assert_eq!(unsafe { libc::geteuid() }, 0, "this test needs root");
    let dir = std::env::temp_dir().join(format!("janus-mtls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (kube, api) = MockApi::start();
    let m = pki::bootstrap(kube, "janus").await.unwrap();
    let (addr, metrics) = (free_port(), free_port());
    let metrics_any = format!("0.0.0.0:{}", metrics.port());
    let _agent = start_agent(
        &agent_bin(),
        &dir,
        &m,
        addr,
        0,
        &["--backend", "fanotify", "--metrics-addr", &metrics_any],
    );
    let agent = addr.to_string();

    // The controller, with the certificate it issued itself.
    let ours = AgentPool::new(Some(m.client_config()), Duration::from_secs(5));
    let Listing::Full { guards, digest } = ours.list(&agent, None).await.unwrap() else {
        panic!("no digest was named: the whole listing is due");
    };
    assert!(guards.is_empty());
    // The agent answers with the listing's digest; named back, it says only "unchanged".
    let digest = digest.expect("the agent names its listing's digest");
    assert!(matches!(
        ours.list(&agent, Some(&digest)).await.unwrap(),
        Listing::Unchanged
    ));
    assert!(matches!(
        ours.list(&agent, Some("sha256:00")).await.unwrap(),
        Listing::Full { .. }
    ));

    // Plaintext never reaches the API.
    assert!(AgentPool::new(None, Duration::from_secs(5))
        .list(&agent, None)
        .await
        .is_err());
    // A certificate of the same CA with another identity: the handshake succeeds, the call
    // does not.
    let ca = Pem {
        cert: m.ca.clone(),
        key: secret_field(&api, CA_SECRET, "ca-key.pem"),
    };
    let other = pki::issue(
        &ca,
        "janus-agent.janus.svc",
        ExtendedKeyUsagePurpose::ClientAuth,
    )
    .unwrap();
    let err = client(&m.ca, &other, &m.names.agent)
        .list(&agent, None)
        .await
        .expect_err("another identity of the same CA is refused");
    assert!(
        err.to_string()
            .contains("not \"janus-controller.janus.svc\""),
        "{err}"
    );
    // An agent's own certificate (a compromised node's) is no client at all.
    assert!(client(&m.ca, &m.agent, &m.names.agent)
        .list(&agent, None)
        .await
        .is_err());
    // The controller's name, signed by another CA.
    let (rogue_kube, _) = MockApi::start();
    let rogue = pki::bootstrap(rogue_kube, "janus").await.unwrap();
    assert!(client(&m.ca, &rogue.controller, &m.names.agent)
        .list(&agent, None)
        .await
        .is_err());
    // The controller checks the agent's name: an agent presenting another name is refused.
    let wrong_server = client(&m.ca, &m.controller, "janus-controller.janus.svc");
    assert!(wrong_server.list(&agent, None).await.is_err());

    // Refusals are counted.
    let (_, body) = http_status(metrics, "/metrics");
    let refused = body
        .lines()
        .find(|l| l.starts_with("janus_api_refused_total{reason=\"wrong_identity\"}"))
        .unwrap_or_else(|| panic!("no janus_api_refused_total:\n{body}"));
    assert!(!refused.ends_with(" 0"), "{refused}");

    // /state answers loopback only; /metrics and /readyz everyone.
    assert_eq!(http_status(metrics, "/state").0, 200);
    let outside = std::net::SocketAddr::new(pod_network_ip(), metrics.port());
    assert_eq!(http_status(outside, "/state").0, 403);
    assert_eq!(http_status(outside, "/metrics").0, 200);
    assert_eq!(http_status(outside, "/readyz").0, 200);
    let _ = std::fs::remove_dir_all(&dir);
}
