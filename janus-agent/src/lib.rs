//! The Janus node agent: resolves a target's file system and enforces JanusGuards on it.

pub mod agent;
pub mod bpf;
pub mod cgroup_watch;
pub mod decisions;
pub mod fanotify;
pub mod hook;
pub mod http;
pub mod metrics;
pub mod nri;
pub mod pin;
pub mod pods;
pub mod process;
pub mod resolve;
pub mod serve;
pub mod standalone;
pub mod state;
pub mod target;
pub mod tls;
