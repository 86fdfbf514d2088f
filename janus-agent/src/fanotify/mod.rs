//! The fanotify backend: permission events answered in user space.
//!
//! The agent has one permission group and one inotify instance, whatever the number of
//! guards and containers (`fs.fanotify.max_user_groups` and `fs.inotify.max_user_instances`
//! are 128 per uid, and uid 0 is shared with every container that runs as root without a
//! user namespace). Every object below a guarded path carries a mark of its own, recorded
//! with the guarded path it was marked under: an event is decided by the object's identity,
//! not its current name, and for the container whose access it is.

/// The answering thread's maps, asked on every decision and keyed by numbers the kernel
/// assigns (mount IDs, inodes): a fast hash, seeded per process, rather than SipHash.
type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
type FastSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

mod answer;
pub(crate) mod created;
mod engine;
pub mod group;
mod marks;
pub mod target;
mod tree;

pub use engine::{Engine, TargetHandle};
pub use group::{FanotifyError, PermGroup};
