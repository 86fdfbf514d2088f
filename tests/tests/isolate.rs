//! The VM runners' per-case isolation: results come back, and a hung case is killed with
//! everything it started.

use std::time::{Duration, Instant};

use anyhow::bail;
use janus_tests::isolate;

#[test]
fn a_passing_case_passes_and_a_failing_one_says_why() {
    isolate::run(Duration::from_secs(30), || Ok(())).unwrap();
    let err =
        isolate::run(Duration::from_secs(30), || bail!("the secret was readable")).unwrap_err();
    assert_eq!(err.to_string(), "the secret was readable");
}

#[test]
fn a_hung_case_is_killed_with_what_it_started() {
    let mut fds = [0; 2];
    // SAFETY: fds is an array of two.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let started = Instant::now();
    let err = isolate::run(Duration::from_millis(500), || {
        // A grandchild that would outlive the case, and tells us its pid.
        // SAFETY: fork in the isolated child; the grandchild only pauses.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            loop {
                // SAFETY: pause(2) has no arguments.
                unsafe { libc::pause() };
            }
        }
        let bytes = pid.to_ne_bytes();
        // SAFETY: writing four bytes from a local array to our pipe.
        unsafe { libc::write(fds[1], bytes.as_ptr().cast(), bytes.len()) };
        loop {
            std::thread::sleep(Duration::from_secs(60));
        }
    })
    .unwrap_err();
    assert!(
        err.to_string().starts_with("no result within 500ms"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    let mut bytes = [0u8; 4];
    // SAFETY: reading four bytes into a local array from our pipe.
    assert_eq!(
        unsafe { libc::read(fds[0], bytes.as_mut_ptr().cast(), 4) },
        4
    );
    let grandchild = i32::from_ne_bytes(bytes);
    // Killed with its group: gone, or a zombie waiting for its reaper, within a deadline.
    janus_tests::wait::until("the grandchild to die", Duration::from_secs(10), || {
        match std::fs::read_to_string(format!("/proc/{grandchild}/stat")) {
            Err(_) => Some(()),
            Ok(s) => s
                .rsplit(')')
                .next()?
                .trim_start()
                .starts_with('Z')
                .then_some(()),
        }
    })
    .unwrap();
}
