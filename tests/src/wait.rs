//! Waiting on conditions with deadlines.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};

/// Polls `check` until it returns `Some`, or fails naming `what` once `within` has passed.
pub fn until<T>(what: &str, within: Duration, mut check: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + within;
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(v) = check() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {within:?} waiting for {what}");
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}
