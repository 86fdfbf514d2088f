//! The fanotify backend: permission events answered in user space.
//!
//! Each guarded target gets two groups: a permission group whose marks cover the guarded
//! inodes (directories with FAN_EVENT_ON_CHILD), and a notification group that reports
//! directories created or moved under guarded ones, which are then marked in turn.

pub mod group;
pub mod target;
mod tree;

pub use group::{FanotifyError, PermGroup};
pub use target::{start, TargetHandle};
