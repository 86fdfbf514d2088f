//! A minimal client of the Kubernetes CRI v1 (`runtime.v1.RuntimeService`), to drive
//! containerd over its unix socket as the kubelet does. The messages are written by hand, so
//! no protoc: only the fields the tests use, with the proto's tags; prost skips the others.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::Status;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum NamespaceMode {
    Pod = 0,
    Container = 1,
    Node = 2,
    Target = 3,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum ContainerState {
    ContainerCreated = 0,
    ContainerRunning = 1,
    ContainerExited = 2,
    ContainerUnknown = 3,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PodSandboxMetadata {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub uid: String,
    #[prost(string, tag = "3")]
    pub namespace: String,
    #[prost(uint32, tag = "4")]
    pub attempt: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct NamespaceOption {
    #[prost(enumeration = "NamespaceMode", tag = "1")]
    pub network: i32,
    #[prost(enumeration = "NamespaceMode", tag = "2")]
    pub pid: i32,
    #[prost(enumeration = "NamespaceMode", tag = "3")]
    pub ipc: i32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LinuxSandboxSecurityContext {
    #[prost(message, optional, tag = "1")]
    pub namespace_options: Option<NamespaceOption>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LinuxPodSandboxConfig {
    #[prost(string, tag = "1")]
    pub cgroup_parent: String,
    #[prost(message, optional, tag = "2")]
    pub security_context: Option<LinuxSandboxSecurityContext>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PodSandboxConfig {
    #[prost(message, optional, tag = "1")]
    pub metadata: Option<PodSandboxMetadata>,
    #[prost(string, tag = "2")]
    pub hostname: String,
    #[prost(string, tag = "3")]
    pub log_directory: String,
    #[prost(map = "string, string", tag = "6")]
    pub labels: HashMap<String, String>,
    #[prost(map = "string, string", tag = "7")]
    pub annotations: HashMap<String, String>,
    #[prost(message, optional, tag = "8")]
    pub linux: Option<LinuxPodSandboxConfig>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RunPodSandboxRequest {
    #[prost(message, optional, tag = "1")]
    pub config: Option<PodSandboxConfig>,
    #[prost(string, tag = "2")]
    pub runtime_handler: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RunPodSandboxResponse {
    #[prost(string, tag = "1")]
    pub pod_sandbox_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct StopPodSandboxRequest {
    #[prost(string, tag = "1")]
    pub pod_sandbox_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct StopPodSandboxResponse {}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RemovePodSandboxRequest {
    #[prost(string, tag = "1")]
    pub pod_sandbox_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RemovePodSandboxResponse {}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ContainerMetadata {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(uint32, tag = "2")]
    pub attempt: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ImageSpec {
    #[prost(string, tag = "1")]
    pub image: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct KeyValue {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Mount {
    #[prost(string, tag = "1")]
    pub container_path: String,
    #[prost(string, tag = "2")]
    pub host_path: String,
    #[prost(bool, tag = "3")]
    pub readonly: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ContainerConfig {
    #[prost(message, optional, tag = "1")]
    pub metadata: Option<ContainerMetadata>,
    #[prost(message, optional, tag = "2")]
    pub image: Option<ImageSpec>,
    #[prost(string, repeated, tag = "3")]
    pub command: Vec<String>,
    #[prost(string, repeated, tag = "4")]
    pub args: Vec<String>,
    #[prost(string, tag = "5")]
    pub working_dir: String,
    #[prost(message, repeated, tag = "6")]
    pub envs: Vec<KeyValue>,
    #[prost(message, repeated, tag = "7")]
    pub mounts: Vec<Mount>,
    #[prost(map = "string, string", tag = "9")]
    pub labels: HashMap<String, String>,
    #[prost(map = "string, string", tag = "10")]
    pub annotations: HashMap<String, String>,
    #[prost(string, tag = "11")]
    pub log_path: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct CreateContainerRequest {
    #[prost(string, tag = "1")]
    pub pod_sandbox_id: String,
    #[prost(message, optional, tag = "2")]
    pub config: Option<ContainerConfig>,
    #[prost(message, optional, tag = "3")]
    pub sandbox_config: Option<PodSandboxConfig>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct CreateContainerResponse {
    #[prost(string, tag = "1")]
    pub container_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct StartContainerRequest {
    #[prost(string, tag = "1")]
    pub container_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct StartContainerResponse {}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RemoveContainerRequest {
    #[prost(string, tag = "1")]
    pub container_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RemoveContainerResponse {}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ContainerStatusRequest {
    #[prost(string, tag = "1")]
    pub container_id: String,
    #[prost(bool, tag = "2")]
    pub verbose: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ContainerStatusResponse {
    #[prost(message, optional, tag = "1")]
    pub status: Option<ContainerStatus>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ContainerStatus {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(enumeration = "ContainerState", tag = "3")]
    pub state: i32,
    /// Nanoseconds since the epoch, as are `started_at` and `finished_at`.
    #[prost(int64, tag = "4")]
    pub created_at: i64,
    #[prost(int64, tag = "5")]
    pub started_at: i64,
    #[prost(int64, tag = "6")]
    pub finished_at: i64,
    #[prost(int32, tag = "7")]
    pub exit_code: i32,
    #[prost(string, tag = "10")]
    pub reason: String,
    #[prost(string, tag = "11")]
    pub message: String,
    #[prost(string, tag = "15")]
    pub log_path: String,
}

/// A client of `runtime.v1.RuntimeService`.
#[derive(Debug, Clone)]
pub struct RuntimeClient {
    inner: tonic::client::Grpc<Channel>,
}

/// A client of the CRI runtime service listening on the unix socket `socket`.
pub async fn connect(socket: &Path) -> Result<RuntimeClient> {
    let path = socket.to_path_buf();
    // The URI only names the :authority; the connector ignores it and dials the socket.
    let channel = Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .with_context(|| format!("connecting to the CRI socket {}", socket.display()))?;
    Ok(RuntimeClient {
        inner: tonic::client::Grpc::new(channel),
    })
}

impl RuntimeClient {
    pub async fn run_pod_sandbox(
        &mut self,
        req: RunPodSandboxRequest,
    ) -> Result<RunPodSandboxResponse, Status> {
        self.unary("/runtime.v1.RuntimeService/RunPodSandbox", req)
            .await
    }

    pub async fn stop_pod_sandbox(
        &mut self,
        req: StopPodSandboxRequest,
    ) -> Result<StopPodSandboxResponse, Status> {
        self.unary("/runtime.v1.RuntimeService/StopPodSandbox", req)
            .await
    }

    pub async fn remove_pod_sandbox(
        &mut self,
        req: RemovePodSandboxRequest,
    ) -> Result<RemovePodSandboxResponse, Status> {
        self.unary("/runtime.v1.RuntimeService/RemovePodSandbox", req)
            .await
    }

    pub async fn create_container(
        &mut self,
        req: CreateContainerRequest,
    ) -> Result<CreateContainerResponse, Status> {
        self.unary("/runtime.v1.RuntimeService/CreateContainer", req)
            .await
    }

    pub async fn start_container(
        &mut self,
        req: StartContainerRequest,
    ) -> Result<StartContainerResponse, Status> {
        self.unary("/runtime.v1.RuntimeService/StartContainer", req)
            .await
    }

    pub async fn remove_container(
        &mut self,
        req: RemoveContainerRequest,
    ) -> Result<RemoveContainerResponse, Status> {
        self.unary("/runtime.v1.RuntimeService/RemoveContainer", req)
            .await
    }

    pub async fn container_status(
        &mut self,
        req: ContainerStatusRequest,
    ) -> Result<ContainerStatusResponse, Status> {
        self.unary("/runtime.v1.RuntimeService/ContainerStatus", req)
            .await
    }

    /// One unary call to `path` (`/runtime.v1.RuntimeService/<Method>`), as tonic's generated
    /// clients make it.
    async fn unary<Req, Resp>(&mut self, path: &'static str, req: Req) -> Result<Resp, Status>
    where
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        self.inner
            .ready()
            .await
            .map_err(|e| Status::unknown(format!("CRI channel not ready: {e}")))?;
        let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
        let reply = self
            .inner
            .unary(
                tonic::Request::new(req),
                PathAndQuery::from_static(path),
                codec,
            )
            .await?;
        Ok(reply.into_inner())
    }
}

/// The containerd 1.7 with NRI that `scripts/setup-containerd-nri.sh` starts: its CRI
/// socket, its NRI socket, and the image it imported.
pub const NRI_CONTAINERD: &str = "/run/janus-test/containerd-nri/containerd.sock";
pub const NRI_SOCKET: &str = "/run/janus-test/containerd-nri/nri.sock";
pub const IMAGE: &str = "janus.test/busybox:1";
/// Its PID, and the script that (re)starts it.
pub const NRI_CONTAINERD_PID: &str = "/run/janus-test/containerd-nri/containerd.pid";
pub const NRI_SETUP: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../scripts/setup-containerd-nri.sh"
);

/// How long a container may take from its creation to its end.
const RUN_WITHIN: std::time::Duration = std::time::Duration::from_secs(60);

/// A pod run through the CRI as the kubelet runs one: its sandbox in the pod's cgroup as
/// the kubelet's cgroupfs driver names it, on the host's network (no CNI here).
pub struct Pod {
    client: RuntimeClient,
    id: String,
    config: PodSandboxConfig,
}

impl Pod {
    pub async fn run(socket: &Path, uid: &str, name: &str, logs: &Path) -> Result<Pod> {
        let mut client = connect(socket).await?;
        std::fs::create_dir_all(logs)?;
        let config = PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.into(),
                uid: uid.into(),
                namespace: "default".into(),
                attempt: 0,
            }),
            log_directory: logs.to_string_lossy().into_owned(),
            linux: Some(LinuxPodSandboxConfig {
                cgroup_parent: format!("/kubepods/besteffort/pod{uid}"),
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(NamespaceOption {
                        network: NamespaceMode::Node as i32,
                        pid: NamespaceMode::Container as i32,
                        ipc: NamespaceMode::Pod as i32,
                    }),
                }),
            }),
            ..PodSandboxConfig::default()
        };
        let id = client
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: String::new(),
            })
            .await
            .context("RunPodSandbox")?
            .pod_sandbox_id;
        Ok(Pod { client, id, config })
    }

    /// Creates and starts container `name` (its `attempt`th start) running `command`, with
    /// each (host path, container path) of `mounts` bound in, and waits for its end: its exit
    /// code and what it wrote. An error when the runtime refuses to start it.
    pub async fn run_to_exit(
        &mut self,
        name: &str,
        attempt: u32,
        command: &[&str],
        mounts: &[(&Path, &str)],
    ) -> Result<(i32, String)> {
        let log_path = format!("{name}-{attempt}.log");
        let config = ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: name.into(),
                attempt,
            }),
            image: Some(ImageSpec {
                image: IMAGE.into(),
            }),
            command: command.iter().map(|s| s.to_string()).collect(),
            mounts: mounts
                .iter()
                .map(|(host, container)| Mount {
                    container_path: container.to_string(),
                    host_path: host.to_string_lossy().into_owned(),
                    readonly: false,
                })
                .collect(),
            log_path: log_path.clone(),
            ..ContainerConfig::default()
        };
        let id = self
            .client
            .create_container(CreateContainerRequest {
                pod_sandbox_id: self.id.clone(),
                config: Some(config),
                sandbox_config: Some(self.config.clone()),
            })
            .await
            .context("CreateContainer")?
            .container_id;
        let started = self
            .client
            .start_container(StartContainerRequest {
                container_id: id.clone(),
            })
            .await;
        let result = match started {
            Ok(_) => self.exit_of(&id).await,
            Err(status) => Err(anyhow::anyhow!("StartContainer: {}", status.message())),
        };
        self.client
            .remove_container(RemoveContainerRequest { container_id: id })
            .await
            .context("RemoveContainer")?;
        let code = result?;
        let log = Path::new(&self.config.log_directory).join(log_path);
        Ok((code, std::fs::read_to_string(log).unwrap_or_default()))
    }

    /// Container `id`'s exit code, once it has exited.
    async fn exit_of(&mut self, id: &str) -> Result<i32> {
        let deadline = std::time::Instant::now() + RUN_WITHIN;
        loop {
            let status = self
                .client
                .container_status(ContainerStatusRequest {
                    container_id: id.into(),
                    verbose: false,
                })
                .await
                .context("ContainerStatus")?
                .status
                .context("ContainerStatus: no status")?;
            if status.state == ContainerState::ContainerExited as i32 {
                return Ok(status.exit_code);
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "container {id} still running after {RUN_WITHIN:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// A pod of one container, run to its end ([`Pod::run_to_exit`]) and removed.
    pub async fn once(
        socket: &Path,
        uid: &str,
        name: &str,
        logs: &Path,
        command: &[&str],
        mounts: &[(&Path, &str)],
    ) -> Result<(i32, String)> {
        let mut pod = Pod::run(socket, uid, name, logs).await?;
        let ran = pod.run_to_exit("app", 0, command, mounts).await;
        pod.remove().await?;
        ran
    }

    /// Stops and removes the pod's sandbox.
    pub async fn remove(mut self) -> Result<()> {
        let pod_sandbox_id = self.id.clone();
        self.client
            .stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: pod_sandbox_id.clone(),
            })
            .await
            .context("StopPodSandbox")?;
        self.client
            .remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id })
            .await
            .context("RemovePodSandbox")?;
        Ok(())
    }
}
