//! The platform matrix: which kernel, cgroup version and container layouts each backend's
//! tests run on. `docs/limitations.md` shows it as a table; this module's tests keep that
//! table equal to the rows here and the CI script's VM runs equal to the VM rows, and a VM
//! run checks that the kernel it booted reports the row's cgroup version.

use anyhow::{ensure, Result};

use crate::vm::KernelSeries;

pub struct Platform {
    pub kernel: &'static str,
    /// The VM's kernel series; None for the host.
    pub series: Option<KernelSeries>,
    pub cgroup: &'static str,
    pub layouts: &'static str,
    pub fanotify: &'static str,
    pub bpf: &'static str,
    /// Whether CI runs the scenario table on this kernel (VM rows).
    pub table_in_ci: bool,
}

/// The kubelet's layouts the VM lays pods out in (`janus-cgroups`).
const KUBELET_LAYOUTS: &str = "kubelet's systemd and cgroupfs drivers × containerd and CRI-O \
     (with conmon), processes moved into the cgroups";

pub const MATRIX: &[Platform] = &[
    Platform {
        kernel: "the host's",
        series: None,
        cgroup: "v1",
        layouts: "containerd 1.6 and runc (`ctr run --cgroup`, and `ctr run --config` from the \
                  start gate's base spec; the cgroupfs driver's paths), and beside it containerd \
                  1.7 with NRI, pods run through its CRI",
        fanotify: "kernel tests, scenario table, `serve`, the start gate (base spec and NRI), \
                   benchmarks",
        bpf: "refused by the kernel (EPERM): the fallback to fanotify",
        table_in_ci: true,
    },
    Platform {
        kernel: "Debian 12's 6.12 cloud",
        series: Some(KernelSeries::V6_12),
        cgroup: "v2",
        layouts: KUBELET_LAYOUTS,
        fanotify: "scenario table (enforce, monitor), `serve` on each layout, the start gate",
        bpf: "BPF tests, scenario table (enforce, monitor), `serve` on each layout, the start \
              gate",
        table_in_ci: true,
    },
    Platform {
        kernel: "Debian 12's 6.1 cloud",
        series: Some(KernelSeries::V6_1),
        cgroup: "v2",
        layouts: KUBELET_LAYOUTS,
        fanotify: "`serve` on each layout, the start gate; the table on demand",
        bpf: "BPF tests, `serve` on each layout, the start gate; the table on demand",
        table_in_ci: false,
    },
];

/// The table as `docs/limitations.md` shows it (`cargo xtask platform-table`).
pub fn table() -> String {
    let mut t = String::from(
        "| Kernel | cgroup | Containers | fanotify | BPF LSM | Run by |\n\
         |---|---|---|---|---|---|\n",
    );
    for p in MATRIX {
        let run_by = match p.series {
            None => "`scripts/test.sh 10`".to_owned(),
            Some(_) if p.table_in_ci => "`scripts/test.sh 40`".to_owned(),
            Some(s) => format!(
                "`scripts/test.sh 40`; the table: `cargo xtask vm-test --kernel-series {}`",
                s.name()
            ),
        };
        t.push_str(&format!(
            "| {} | {} | {} | {} | {} | {run_by} |\n",
            p.kernel, p.cgroup, p.layouts, p.fanotify, p.bpf
        ));
    }
    t
}

/// Fails when a VM of `series` reported another cgroup version than its row says.
pub fn check_reported(series: KernelSeries, cgroup: Option<&str>) -> Result<()> {
    let row = MATRIX.iter().find(|p| p.series == Some(series));
    if let Some(row) = row {
        ensure!(
            cgroup == Some(row.cgroup),
            "the VM reported cgroup {cgroup:?}; docs/limitations.md says {} for {}",
            row.cgroup,
            row.kernel
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(path: &str) -> String {
        let top = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        std::fs::read_to_string(top.join(path)).unwrap()
    }

    #[test]
    fn the_docs_show_the_matrix() {
        let docs = read("docs/limitations.md");
        assert!(
            docs.contains(&table()),
            "docs/limitations.md lacks the platform table; it must read:\n{}",
            table()
        );
    }

    #[test]
    fn ci_boots_each_vm_row() {
        let script = read("scripts/test.d/40-bpf-vm.sh");
        for p in MATRIX {
            let Some(series) = p.series else { continue };
            let flag = format!("--kernel-series {} ", series.name());
            let run = script
                .lines()
                .find(|l| l.contains("cargo xtask vm-test") && l.contains(&flag))
                .unwrap_or_else(|| panic!("the CI stage boots no {}", p.kernel));
            assert_eq!(
                !run.contains("--no-table"),
                p.table_in_ci,
                "the CI's run of {}: {run}",
                p.kernel
            );
        }
    }

    #[test]
    fn a_vm_reporting_another_cgroup_version_fails() {
        assert!(check_reported(KernelSeries::V6_12, Some("v2")).is_ok());
        assert!(check_reported(KernelSeries::V6_12, Some("v1")).is_err());
        assert!(check_reported(KernelSeries::V6_1, None).is_err());
    }
}
