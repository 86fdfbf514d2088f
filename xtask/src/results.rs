//! What a VM run's serial console says: the markers `/init` prints around each test, the
//! counts each test prints (`PASS name (S s)`, `FAIL name: why`, `scenarios: N passed, M
//! failed`, as `scripts/test.sh` counts them), and the summary made of them: one line per
//! test with the kernel, the cgroup version and the backend it ran on.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Result};

pub const MARK_RESULT: &str = "JANUS-VM-RESULT ";
pub const MARK_DONE: &str = "JANUS-VM-DONE ";
pub const MARK_START: &str = "JANUS-VM-START ";
pub const MARK_INFO: &str = "JANUS-VM-INFO ";

/// One test to run inside the VM.
pub struct VmTest {
    pub name: String,
    pub argv: Vec<String>,
    /// The backend it guards with, for the summary (`-` when it is not one backend's).
    pub backend: &'static str,
}

/// What the serial console told us.
#[derive(Default)]
pub struct Outcome {
    /// name -> passed
    results: BTreeMap<String, bool>,
    /// name -> (passed, failed) among the cases the test printed.
    counts: BTreeMap<String, (u32, u32)>,
    pub done: bool,
    pub timed_out: bool,
    pub last_started: Option<String>,
    /// `uname -r` and the cgroup version, as the VM reports them.
    kernel: Option<(String, String)>,
}

impl Outcome {
    /// The cgroup version the VM reported.
    pub fn cgroup(&self) -> Option<&str> {
        self.kernel.as_ref().map(|(_, cgroup)| cgroup.as_str())
    }

    /// Takes one console line in.
    pub fn read(&mut self, line: &str) {
        if let Some(rest) = find_marker(line, MARK_START) {
            self.last_started = field(rest, "name").map(str::to_owned);
        } else if let Some(rest) = find_marker(line, MARK_INFO) {
            let get = |key| field(rest, key).unwrap_or("?").to_owned();
            self.kernel = Some((get("kernel"), get("cgroup")));
        } else if let Some(rest) = find_marker(line, MARK_RESULT) {
            if let Some(name) = field(rest, "name") {
                self.results
                    .insert(name.to_owned(), field(rest, "status") == Some("pass"));
            }
        } else if find_marker(line, MARK_DONE).is_some() {
            self.done = true;
        } else if let (Some(test), Some((p, f))) = (&self.last_started, cases(line)) {
            let c = self.counts.entry(test.clone()).or_default();
            *c = (c.0 + p, c.1 + f);
        }
    }
}

/// The cases a test's output line counts, by the rules of `scripts/test.sh`.
fn cases(line: &str) -> Option<(u32, u32)> {
    if let Some(rest) = line.strip_prefix("scenarios: ") {
        let (p, f) = rest.split_once(" passed, ")?;
        return Some((p.parse().ok()?, f.strip_suffix(" failed")?.parse().ok()?));
    }
    if let Some(rest) = line.strip_prefix("PASS ") {
        let (name, took) = rest.split_once(" (")?;
        return (!name.contains(' ') && took.ends_with(" s)")).then_some((1, 0));
    }
    let name = line.strip_prefix("FAIL ")?.split_once(':')?.0;
    (!name.contains(' ')).then_some((0, 1))
}

/// Markers may follow kernel messages on the same console line.
pub fn find_marker<'a>(line: &'a str, marker: &str) -> Option<&'a str> {
    line.find(marker).map(|i| &line[i + marker.len()..])
}

fn field<'a>(rest: &'a str, key: &str) -> Option<&'a str> {
    rest.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

pub fn report(tests: &[VmTest], out: &Outcome, elapsed: Duration, serial: &Path) -> Result<()> {
    let mut passed = 0;
    let mut failed = 0;
    let (kernel, cgroup) = out
        .kernel
        .clone()
        .unwrap_or_else(|| ("(not reported)".into(), "?".into()));
    println!("---- vm-test summary ({:.1?}) ----", elapsed);
    for t in tests {
        let verdict = match out.results.get(&t.name) {
            Some(true) => {
                passed += 1;
                "PASS"
            }
            Some(false) => {
                failed += 1;
                "FAIL"
            }
            None => {
                failed += 1;
                "NO RESULT"
            }
        };
        let counts = match out.counts.get(&t.name) {
            Some((p, f)) => format!("{p} passed, {f} failed"),
            None => "no cases counted".into(),
        };
        println!(
            "{verdict:>9}  kernel {kernel}  cgroup {cgroup}  backend {:<8}  {}: {counts}",
            t.backend, t.name
        );
    }
    println!("vm-test: {passed} passed, {failed} failed");
    if out.timed_out {
        let running = out.last_started.as_deref().unwrap_or("(boot)");
        bail!("deadline exceeded while running {running}");
    }
    if !out.done {
        bail!(
            "the VM stopped before printing its completion marker (see {})",
            serial.display()
        );
    }
    if failed > 0 {
        bail!("{failed} VM test(s) failed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_parse_after_kernel_noise() {
        let line = "[   12.3] foo JANUS-VM-RESULT name=bpf-vm-tests status=pass rc=0";
        let rest = find_marker(line, MARK_RESULT).unwrap();
        assert_eq!(field(rest, "name"), Some("bpf-vm-tests"));
        assert_eq!(field(rest, "status"), Some("pass"));
        assert_eq!(field(rest, "rc"), Some("0"));
    }

    #[test]
    fn each_tests_cases_are_counted() {
        let mut out = Outcome::default();
        for line in [
            "JANUS-VM-INFO kernel=6.12.1 cgroup=v2 lsm=bpf",
            "PASS before-any-test (1.0 s)",
            "JANUS-VM-START name=a",
            "PASS deny (1.2 s)",
            "FAIL load: timed out (3.0 s)",
            "PASS not a case",
            "JANUS-VM-START name=b",
            "scenario x: ok (1.0 s)",
            "scenarios: 27 passed, 1 failed",
        ] {
            out.read(line);
        }
        assert_eq!(out.counts.get("a"), Some(&(1, 1)));
        assert_eq!(out.counts.get("b"), Some(&(27, 1)));
        assert_eq!(out.kernel, Some(("6.12.1".into(), "v2".into())));
    }
}
