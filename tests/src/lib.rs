//! Janus on a real kernel: what the agent's integration tests, the VM tests of the BPF
//! backend and the benchmark share.
//!
//! - [`target`]: a process in its own mount namespace, chrooted into a root of our making,
//!   and ways to act inside it as its owner or as someone who entered it (`kubectl exec`).
//! - [`agent`]: `janus-agent guard` as a real process, its decision lines and metrics;
//!   [`api`]: requests to `janus-agent serve`'s gRPC API, as the controller makes them.
//! - [`cgroups`]: pods laid out in cgroup v2 as the kubelet lays them out (the VM).
//! - [`containerd`]: containers run by containerd 1.6 from a spec as its CRI plugin would
//!   complete it; [`cri`]: pods run through containerd 1.7's CRI, as the kubelet runs them.
//! - [`scenarios`]: the table of guards, files and expected answers every backend passes.
//! - [`bench`] and [`floor`]: the benchmark, and the minimal fanotify listener it compares
//!   the agent with; [`scale`]: the node-scale benchmark (1,000 containers);
//!   [`start_window`]: how long a new container runs before its guard is in place.
//! - [`wait`]: waiting on a condition with a deadline, never a bare sleep.
//! - [`isolate`]: one test case in a process group of its own, under a deadline (the VM
//!   runners).

pub mod agent;
pub mod api;
pub mod bench;
pub mod cgroups;
pub mod containerd;
pub mod cri;
pub mod floor;
pub mod isolate;
pub mod scale;
pub mod scenarios;
pub mod start_window;
pub mod target;
pub mod wait;
pub mod who;
