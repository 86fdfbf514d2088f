//! Mutual TLS with no certificate work for the operator (`--tls-auto`). On its first start
//! the controller makes a CA and the agents' server certificate and keeps them in two Secrets
//! of its namespace; on every start it issues itself a fresh client certificate from that CA.
//! Each side gets only the usage it needs: the agents' certificate is for serving
//! (serverAuth), the controller's for calling (clientAuth), and an agent accepts only a
//! client that carries the controller's name, so a node's key commands no agent.
//!
//! Rotation: delete both Secrets, restart the controller (it makes new ones), then the agents
//! (`kubectl -n janus rollout restart ds/janus-agent`); docs/operations.md.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::{ObjectMeta, PostParams};
use kube::Api;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// The CA's certificate and key: read by the controller only.
pub const CA_SECRET: &str = "janus-ca";
/// The agents' CA, certificate and key (`ca.pem`, `cert.pem`, `key.pem`), mounted by the
/// agent DaemonSet.
pub const AGENT_SECRET: &str = "janus-agent-tls";

/// The identities in a namespace: the agents' server name and the controller's client name,
/// as the in-cluster DNS names of their Services.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    pub agent: String,
    pub controller: String,
}

impl Names {
    pub fn in_namespace(ns: &str) -> Names {
        Names {
            agent: format!("janus-agent.{ns}.svc"),
            controller: format!("janus-controller.{ns}.svc"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("reading Secret {namespace}/{name}: {source}")]
    Read {
        namespace: String,
        name: &'static str,
        #[source]
        source: kube::Error,
    },
    #[error("writing Secret {namespace}/{name}: {source}")]
    Write {
        namespace: String,
        name: &'static str,
        #[source]
        source: kube::Error,
    },
    #[error("Secret {namespace}/{name}: key {key} is missing or not UTF-8 PEM")]
    Missing {
        namespace: String,
        name: &'static str,
        key: &'static str,
    },
    #[error("Secret {namespace}/{name}: {source}")]
    Certificate {
        namespace: String,
        name: &'static str,
        #[source]
        source: rcgen::Error,
    },
}

/// A certificate and its key, as PEM.
#[derive(Debug, Clone)]
pub struct Pem {
    pub cert: String,
    pub key: String,
}

/// What the controller needs to call the agents, and what it left for them.
#[derive(Debug, Clone)]
pub struct Material {
    pub ca: String,
    pub agent: Pem,
    pub controller: Pem,
    pub names: Names,
}

impl Material {
    /// The controller's client configuration: trusts the CA, presents its own certificate,
    /// and checks that the agent is one (by the agents' server name).
    pub fn client_config(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca))
            .identity(Identity::from_pem(
                &self.controller.cert,
                &self.controller.key,
            ))
            .domain_name(self.names.agent.clone())
    }
}

/// Ten years from the start of this one: rotation is by hand (see the module docs).
fn params(names: Vec<String>) -> Result<CertificateParams, rcgen::Error> {
    use chrono::Datelike;
    let year = chrono::Utc::now().year();
    let mut p = CertificateParams::new(names)?;
    p.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    p.not_after = rcgen::date_time_ymd(year + 10, 1, 1);
    Ok(p)
}

fn new_ca() -> Result<Pem, rcgen::Error> {
    let mut p = params(Vec::new())?;
    p.distinguished_name.push(DnType::CommonName, "janus CA");
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let key = KeyPair::generate()?;
    let cert = p.self_signed(&key)?;
    Ok(Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// A leaf certificate for `name` with exactly one extended key usage.
pub fn issue(ca: &Pem, name: &str, usage: ExtendedKeyUsagePurpose) -> Result<Pem, rcgen::Error> {
    let issuer = Issuer::from_ca_cert_pem(&ca.cert, KeyPair::from_pem(&ca.key)?)?;
    let mut p = params(vec![name.to_owned()])?;
    p.distinguished_name.push(DnType::CommonName, name);
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![usage];
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, &issuer)?;
    Ok(Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

fn secret(name: &str, data: &[(&str, &str)]) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/part-of".to_owned(),
                "janus".to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        data: Some(
            data.iter()
                .map(|(k, v)| ((*k).to_owned(), ByteString(v.as_bytes().to_vec())))
                .collect(),
        ),
        ..Secret::default()
    }
}

struct Secrets<'a> {
    api: Api<Secret>,
    namespace: &'a str,
}

impl Secrets<'_> {
    async fn get(&self, name: &'static str) -> Result<Option<Secret>, PkiError> {
        self.api
            .get_opt(name)
            .await
            .map_err(|source| PkiError::Read {
                namespace: self.namespace.to_owned(),
                name,
                source,
            })
    }

    /// Creates the Secret; false when another replica created it first.
    async fn create(&self, name: &'static str, s: &Secret) -> Result<bool, PkiError> {
        let result = self.api.create(&PostParams::default(), s).await;
        self.written(name, result)
    }

    /// Replaces the Secret at the version `s` names; false when it changed meanwhile.
    async fn replace(&self, name: &'static str, s: &Secret) -> Result<bool, PkiError> {
        let result = self.api.replace(name, &PostParams::default(), s).await;
        self.written(name, result)
    }

    /// Whether a write went through; a conflict (409) means someone else's did.
    fn written(
        &self,
        name: &'static str,
        result: Result<Secret, kube::Error>,
    ) -> Result<bool, PkiError> {
        match result {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(source) => Err(PkiError::Write {
                namespace: self.namespace.to_owned(),
                name,
                source,
            }),
        }
    }

    fn field(&self, s: &Secret, name: &'static str, key: &'static str) -> Result<String, PkiError> {
        s.data
            .as_ref()
            .and_then(|d| d.get(key))
            .and_then(|b| String::from_utf8(b.0.clone()).ok())
            .filter(|v| v.contains("-----BEGIN"))
            .ok_or_else(|| PkiError::Missing {
                namespace: self.namespace.to_owned(),
                name,
                key,
            })
    }

    fn cert_error(&self, name: &'static str) -> impl Fn(rcgen::Error) -> PkiError + '_ {
        move |source| PkiError::Certificate {
            namespace: self.namespace.to_owned(),
            name,
            source,
        }
    }
}

/// Makes whatever of the CA and the agents' Secret is missing (or signed by another CA), and
/// issues the controller's client certificate. Safe to run from several replicas at once:
/// the first to create a Secret wins and the others read it.
pub async fn bootstrap(client: kube::Client, namespace: &str) -> Result<Material, PkiError> {
    let secrets = Secrets {
        api: Api::namespaced(client, namespace),
        namespace,
    };
    let names = Names::in_namespace(namespace);
    let ca = loop {
        if let Some(s) = secrets.get(CA_SECRET).await? {
            break Pem {
                cert: secrets.field(&s, CA_SECRET, "ca.pem")?,
                key: secrets.field(&s, CA_SECRET, "ca-key.pem")?,
            };
        }
        let ca = new_ca().map_err(secrets.cert_error(CA_SECRET))?;
        let s = secret(CA_SECRET, &[("ca.pem", &ca.cert), ("ca-key.pem", &ca.key)]);
        if secrets.create(CA_SECRET, &s).await? {
            tracing::info!(namespace, secret = CA_SECRET, "created the agents' CA");
            break ca;
        }
    };
    let issue_agent = || {
        issue(&ca, &names.agent, ExtendedKeyUsagePurpose::ServerAuth)
            .map_err(secrets.cert_error(AGENT_SECRET))
    };
    let agent_secret = |a: &Pem| {
        secret(
            AGENT_SECRET,
            &[
                ("ca.pem", &ca.cert),
                ("cert.pem", &a.cert),
                ("key.pem", &a.key),
            ],
        )
    };
    let agent = loop {
        match secrets.get(AGENT_SECRET).await? {
            Some(s) if secrets.field(&s, AGENT_SECRET, "ca.pem")? == ca.cert => {
                break Pem {
                    cert: secrets.field(&s, AGENT_SECRET, "cert.pem")?,
                    key: secrets.field(&s, AGENT_SECRET, "key.pem")?,
                };
            }
            Some(old) => {
                // The CA was made again: the agents' certificate must come from it. Only over
                // the version read, so that of two replicas racing here one wins and the
                // other reads its result instead of overwriting it.
                let a = issue_agent()?;
                let mut s = agent_secret(&a);
                s.metadata.resource_version = old.metadata.resource_version;
                if secrets.replace(AGENT_SECRET, &s).await? {
                    tracing::warn!(namespace, secret = AGENT_SECRET, "the agents' certificate was signed by another CA; issued a new one (restart the agents)");
                    break a;
                }
            }
            None => {
                let a = issue_agent()?;
                if secrets.create(AGENT_SECRET, &agent_secret(&a)).await? {
                    tracing::info!(
                        namespace,
                        secret = AGENT_SECRET,
                        "created the agents' certificate"
                    );
                    break a;
                }
            }
        }
    };
    let controller = issue(&ca, &names.controller, ExtendedKeyUsagePurpose::ClientAuth)
        .map_err(secrets.cert_error(CA_SECRET))?;
    Ok(Material {
        ca: ca.cert,
        agent,
        controller,
        names,
    })
}
