//! The start gate's wiring through NRI (containerd 1.7+, CRI-O 1.26+): the agent registers
//! with the runtime as an NRI plugin and adds `janus-agent hook` to every container it is
//! told of as its `createRuntime` hook, the hook the base spec or hooks.d would give it. The
//! gate itself is unchanged ([`crate::serve::gate`]): the hook asks the agent and the
//! runtime waits for it.

mod api;
mod wire;

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use prost::Message as _;

use crate::hook::Runtime;
use crate::metrics::Metrics;
use crate::serve::gate::GateArgs;
use api::{Hook, Hooks};
use wire::{Trunk, WireError, PLUGIN_CONN, REQUEST, RESPONSE, RUNTIME_CONN};

#[derive(Debug, Clone, clap::Args)]
pub struct NriArgs {
    /// The runtime's NRI socket (`/var/run/nri/nri.sock`): when set, the agent registers
    /// there as a plugin that adds the start gate's hook to every new container.
    #[arg(long)]
    pub nri_socket: Option<PathBuf>,
    /// The hook's binary, as the runtime finds it on the node.
    #[arg(long, default_value = "/opt/janus/bin/janus-agent")]
    pub nri_hook: PathBuf,
    /// The plugin's index, two digits: the runtime calls plugins in ascending order.
    #[arg(long, default_value = "10", value_parser = plugin_index)]
    pub nri_index: String,
}

fn plugin_index(s: &str) -> Result<String, String> {
    if s.len() == 2 && s.bytes().all(|b| b.is_ascii_digit()) {
        Ok(s.to_owned())
    } else {
        Err(format!("{s:?}: two digits, 00 to 99"))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NriError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("the runtime refused the plugin: {0}")]
    Refused(String),
}

/// gRPC's code for a request that does not decode.
const INVALID_ARGUMENT: i32 = 3;

impl From<prost::DecodeError> for NriError {
    fn from(e: prost::DecodeError) -> NriError {
        NriError::Wire(e.into())
    }
}

impl From<std::io::Error> for NriError {
    fn from(e: std::io::Error) -> NriError {
        NriError::Wire(e.into())
    }
}

/// How long the plugin waits before it connects again to a runtime that went away.
const RETRY: Duration = Duration::from_secs(1);

/// Starts the plugin's thread when `--nri-socket` is set: it registers, answers the
/// runtime, and registers again whenever the runtime restarts.
pub fn spawn(args: &NriArgs, gate: &GateArgs, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let Some(socket) = args.nri_socket.clone() else {
        return Ok(());
    };
    metrics.register_nri();
    // The hook asks this agent, on the node's paths: the agent's own must be the same
    // (hostPath mounts at the same place).
    let hook_args = [
        "janus-agent".into(),
        "hook".into(),
        "--socket".into(),
        gate.gate_socket.to_string_lossy().into_owned(),
        "--ungated-dir".into(),
        gate.ungated_dir.to_string_lossy().into_owned(),
    ];
    let plugin = Plugin {
        hook: args.nri_hook.to_string_lossy().into_owned(),
        hook_args: hook_args.to_vec(),
        index: args.nri_index.clone(),
        runtime: Runtime::Containerd,
        metrics,
    };
    std::thread::Builder::new()
        .name("nri".into())
        .spawn(move || plugin.run(&socket))?;
    Ok(())
}

struct Plugin {
    hook: String,
    hook_args: Vec<String>,
    index: String,
    /// Told by the runtime when it configures the plugin.
    runtime: Runtime,
    metrics: Arc<Metrics>,
}

/// A method's answer, or its error status; and whether the runtime is done with the plugin.
/// An error status fails only that call (for CreateContainer, the runtime does not create
/// the container), where a closed connection would let the runtime go on without the
/// plugin.
type Reply = (Result<Vec<u8>, wire::Status>, bool);

impl Plugin {
    fn run(mut self, socket: &std::path::Path) {
        let mut unreachable_told = false;
        loop {
            match UnixStream::connect(socket) {
                Ok(stream) => {
                    unreachable_told = false;
                    let session = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        self.session(Trunk::new(stream))
                    }));
                    self.metrics.nri_registered.set(0);
                    match session {
                        Ok(Ok(())) => {
                            tracing::warn!(socket = %socket.display(), "NRI: the runtime shut the plugin down; containers created until it registers again are not gated")
                        }
                        Ok(Err(e)) => {
                            tracing::error!(socket = %socket.display(), error = %e, "NRI: the plugin's connection ended; containers created until it registers again are not gated")
                        }
                        Err(_) => {
                            tracing::error!(socket = %socket.display(), "NRI: the plugin failed (a bug); registering again")
                        }
                    }
                }
                Err(e) if !unreachable_told => {
                    tracing::error!(socket = %socket.display(), error = %e, "NRI: cannot reach the runtime; trying again every second, containers are not gated through NRI meanwhile");
                    unreachable_told = true;
                }
                Err(_) => {}
            }
            std::thread::sleep(RETRY);
        }
    }

    /// Registers on a new connection, then answers the runtime until it goes.
    fn session(&mut self, mut trunk: Trunk) -> Result<(), NriError> {
        let register = api::RegisterPluginRequest {
            plugin_name: "janus".into(),
            plugin_idx: self.index.clone(),
        };
        let call = wire::Request {
            service: api::RUNTIME_SERVICE.into(),
            method: "RegisterPlugin".into(),
            payload: register.encode_to_vec(),
        };
        trunk.send(RUNTIME_CONN, 1, REQUEST, &call.encode_to_vec())?;
        loop {
            let (conn, message) = trunk.next()?;
            match (conn, message.kind) {
                (RUNTIME_CONN, RESPONSE) => {
                    let response = wire::Response::decode(message.body.as_slice())?;
                    if let Some(status) = response.status.filter(|s| s.code != 0) {
                        return Err(NriError::Refused(status.message));
                    }
                    tracing::info!(index = %self.index, hook = %self.hook, "NRI: registered");
                }
                (PLUGIN_CONN, REQUEST) => {
                    let call = wire::Request::decode(message.body.as_slice())?;
                    tracing::debug!(service = %call.service, method = %call.method, "NRI: call");
                    let (reply, done) = self.call(&call.service, &call.method, &call.payload);
                    let response = match reply {
                        Ok(payload) => wire::Response {
                            status: None,
                            payload,
                        },
                        Err(status) => wire::Response {
                            status: Some(status),
                            payload: Vec::new(),
                        },
                    };
                    trunk.send(
                        PLUGIN_CONN,
                        message.stream,
                        RESPONSE,
                        &response.encode_to_vec(),
                    )?;
                    if done {
                        return Ok(());
                    }
                }
                _ => {}
            }
        }
    }

    /// Answers one of the runtime's calls.
    fn call(&mut self, service: &str, method: &str, payload: &[u8]) -> Reply {
        let answer = match self.answer(service, method, payload) {
            Ok(answer) => answer,
            Err(e) => {
                tracing::error!(method, error = %e, "NRI: a call that does not decode; refused");
                let status = wire::Status {
                    code: INVALID_ARGUMENT,
                    message: format!("janus: {method}: {e}"),
                };
                return (Err(status), false);
            }
        };
        match answer {
            Some(payload) => (Ok(payload), method == "Shutdown"),
            None => {
                let status = wire::Status {
                    code: wire::UNIMPLEMENTED,
                    message: format!("janus: no method {service}/{method}"),
                };
                (Err(status), false)
            }
        }
    }

    /// The answer to a method of the plugin's service; None for any other.
    fn answer(
        &mut self,
        service: &str,
        method: &str,
        payload: &[u8],
    ) -> Result<Option<Vec<u8>>, prost::DecodeError> {
        if service != api::PLUGIN_SERVICE {
            return Ok(None);
        }
        Ok(Some(match method {
            "Configure" => {
                let req = api::ConfigureRequest::decode(payload)?;
                // CRI-O's annotations for CRI-O; containerd's for containerd, whatever name
                // it gives (2.0.0 to 2.0.3 say "v2").
                self.runtime = match req.runtime_name.as_str() {
                    "cri-o" | "crio" => Runtime::CriO,
                    "containerd" => Runtime::Containerd,
                    other => {
                        tracing::warn!(runtime = other, "NRI: a runtime of another name; its hook reads containerd's annotations");
                        Runtime::Containerd
                    }
                };
                tracing::info!(runtime = %req.runtime_name, version = %req.runtime_version, "NRI: configured");
                let events = 1 << (api::CREATE_CONTAINER - 1);
                api::ConfigureResponse { events }.encode_to_vec()
            }
            "Synchronize" => {
                // Running containers are guarded as they are found; only new ones are gated.
                let req = api::SynchronizeRequest::decode(payload)?;
                if !req.more {
                    self.metrics.nri_registered.set(1);
                    tracing::info!(hook = %self.hook, "NRI: synchronized; every new container gets the start gate's hook");
                }
                api::SynchronizeResponse { more: req.more }.encode_to_vec()
            }
            "CreateContainer" => {
                let req = api::CreateContainerRequest::decode(payload)?;
                self.adjust(req).encode_to_vec()
            }
            "Shutdown" | "StateChange" => api::Empty {}.encode_to_vec(),
            _ => return Ok(None),
        }))
    }

    /// The container with the start gate's hook, unless its spec has it already (the base
    /// spec or hooks.d wiring as well): the gate is asked once per container.
    fn adjust(&self, req: api::CreateContainerRequest) -> api::CreateContainerResponse {
        let container = req.container.unwrap_or_default();
        let pod = req.pod.unwrap_or_default();
        let hooks = container.hooks.unwrap_or_default();
        let present = hooks
            .create_runtime
            .iter()
            .chain(&hooks.prestart)
            .any(|h| h.path == self.hook && h.args.get(1).is_some_and(|a| a == "hook"));
        let outcome = if present {
            "hook_present"
        } else {
            "hook_added"
        };
        self.metrics
            .nri_containers
            .with_label_values(&[outcome])
            .inc();
        tracing::debug!(pod = %pod.uid, namespace = %pod.namespace, container = %container.name, id = %container.id, outcome, "NRI: container created");
        if present {
            return api::CreateContainerResponse { adjust: None };
        }
        let mut args = self.hook_args.clone();
        if self.runtime == Runtime::CriO {
            args.extend(["--runtime".to_owned(), "cri-o".to_owned()]);
        }
        let hook = Hook {
            path: self.hook.clone(),
            args,
            timeout: Some(api::OptionalInt { value: 120 }),
        };
        api::CreateContainerResponse {
            adjust: Some(api::ContainerAdjustment {
                hooks: Some(Hooks {
                    prestart: Vec::new(),
                    create_runtime: vec![hook],
                }),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plugin(runtime: Runtime) -> Plugin {
        Plugin {
            hook: "/opt/janus/bin/janus-agent".into(),
            hook_args: vec!["janus-agent".into(), "hook".into()],
            index: "10".into(),
            runtime,
            metrics: Arc::new(Metrics::new()),
        }
    }

    fn create(hooks: Option<Hooks>) -> api::CreateContainerRequest {
        api::CreateContainerRequest {
            pod: None,
            container: Some(api::Container {
                id: "c1".into(),
                name: "app".into(),
                hooks,
            }),
        }
    }

    fn added(response: &api::CreateContainerResponse) -> Vec<Hook> {
        let hooks = response.adjust.as_ref().and_then(|a| a.hooks.clone());
        hooks.map(|h| h.create_runtime).unwrap_or_default()
    }

    #[test]
    fn a_container_gets_the_hook_once_and_cri_o_s_names_its_runtime() {
        let containerd = plugin(Runtime::Containerd);
        let hooks = added(&containerd.adjust(create(None)));
        assert_eq!(hooks.len(), 1);
        assert_eq!(hooks[0].path, "/opt/janus/bin/janus-agent");
        assert_eq!(hooks[0].args, ["janus-agent", "hook"]);
        // A spec that has the hook already, from the base spec or hooks.d (which uses
        // prestart): the gate is not asked twice.
        let theirs = Hook {
            path: "/opt/janus/bin/janus-agent".into(),
            args: vec!["janus-agent".into(), "hook".into()],
            ..Hook::default()
        };
        for present in [
            Hooks {
                create_runtime: vec![theirs.clone()],
                ..Hooks::default()
            },
            Hooks {
                prestart: vec![theirs],
                ..Hooks::default()
            },
        ] {
            assert_eq!(containerd.adjust(create(Some(present))).adjust, None);
        }
        let counted = |outcome: &str| {
            containerd
                .metrics
                .nri_containers
                .with_label_values(&[outcome])
                .get()
        };
        assert_eq!((counted("hook_added"), counted("hook_present")), (1, 2));
        let hooks = added(&plugin(Runtime::CriO).adjust(create(None)));
        assert_eq!(hooks[0].args, ["janus-agent", "hook", "--runtime", "cri-o"]);
    }

    #[test]
    fn configure_subscribes_to_creations_and_a_bad_call_fails_alone() {
        let mut p = plugin(Runtime::Containerd);
        let configure = |name: &str| {
            api::ConfigureRequest {
                runtime_name: name.into(),
                runtime_version: "1".into(),
            }
            .encode_to_vec()
        };
        let (reply, done) = p.call(api::PLUGIN_SERVICE, "Configure", &configure("cri-o"));
        let events = api::ConfigureResponse::decode(reply.unwrap().as_slice())
            .unwrap()
            .events;
        assert_eq!((events, done), (1 << 3, false));
        assert_eq!(p.runtime, Runtime::CriO);
        // containerd 2.0.0 to 2.0.3 name themselves "v2": containerd's annotations.
        p.call(api::PLUGIN_SERVICE, "Configure", &configure("v2"))
            .0
            .unwrap();
        assert_eq!(p.runtime, Runtime::Containerd);
        // Registered once the runtime has told all it had to.
        let sync = |more| api::SynchronizeRequest { more }.encode_to_vec();
        p.call(api::PLUGIN_SERVICE, "Synchronize", &sync(true))
            .0
            .unwrap();
        assert_eq!(p.metrics.nri_registered.get(), 0);
        p.call(api::PLUGIN_SERVICE, "Synchronize", &sync(false))
            .0
            .unwrap();
        assert_eq!(p.metrics.nri_registered.get(), 1);
        // A creation that does not decode is refused, not let through: an error status,
        // and the connection stays.
        let (reply, done) = p.call(api::PLUGIN_SERVICE, "CreateContainer", &[0xff, 0xff]);
        assert_eq!((reply.unwrap_err().code, done), (INVALID_ARGUMENT, false));
        let (reply, _) = p.call("other.Service", "Configure", &[]);
        assert_eq!(reply.unwrap_err().code, wire::UNIMPLEMENTED);
        assert!(p.call(api::PLUGIN_SERVICE, "Shutdown", &[]).1);
    }
}
