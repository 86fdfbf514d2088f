//! The fanotify backend: permission events answered in user space.
//!
//! Each guarded target gets a permission group whose marks cover the guarded inodes
//! (directories with FAN_EVENT_ON_CHILD), and an inotify watch that reports directories
//! created or moved under guarded ones, which are then marked in turn.

mod created;
pub mod group;
pub mod target;
mod tree;

pub use group::{FanotifyError, PermGroup};
pub use target::{start, TargetHandle};
