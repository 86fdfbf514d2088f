//! `cargo xtask vm-test`: runs test binaries inside QEMU on a Debian kernel
//! booted with the BPF LSM enabled.
//!
//! The host's kernel refuses to load BPF LSM programs, so tests that need one
//! run in a throwaway VM: a Debian cloud kernel (from apt, cached under
//! `target/vm/`), an initramfs holding busybox, the BPF object and the test
//! binaries, and an init script that runs them and prints one result line
//! each on the serial console, which this side parses.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::{BufRead, BufReader, BufWriter, Write},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc::{self, RecvTimeoutError},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use clap::Args;

use crate::results::{report, Outcome, VmTest};
use crate::{cpio, ebpf, matrix, util};

/// Kernel command line: `lsm=...,bpf` is what turns the BPF LSM on (Debian's
/// default list leaves it out).
const KERNEL_CMDLINE: &str =
    "console=ttyS0 panic=-1 lsm=lockdown,capability,landlock,yama,bpf quiet";
/// `janus-scenarios --mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TableMode {
    Enforce,
    Monitor,
}

/// A series of Debian 12's cloud kernels: its packages are `<prefix><number><suffix>`, the
/// newest the highest number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KernelSeries {
    /// linux-image-6.1.0-<abi>-cloud-amd64-unsigned (Debian 12's own).
    #[value(name = "6.1")]
    V6_1,
    /// linux-image-6.12.<n>+deb12-cloud-amd64-unsigned (bookworm's newer series).
    #[value(name = "6.12")]
    V6_12,
}

impl KernelSeries {
    /// As `--kernel-series` takes it.
    pub fn name(self) -> &'static str {
        match self {
            KernelSeries::V6_1 => "6.1",
            KernelSeries::V6_12 => "6.12",
        }
    }

    fn affixes(self) -> (&'static str, &'static str) {
        match self {
            KernelSeries::V6_1 => ("linux-image-6.1.0-", "-cloud-amd64-unsigned"),
            KernelSeries::V6_12 => ("linux-image-6.12.", "+deb12-cloud-amd64-unsigned"),
        }
    }
}
/// Where the object lands inside the VM (also exported as JANUS_EBPF_OBJ).
const VM_EBPF_OBJ: &str = "/bpf/janus-ebpf.o";
const BUSYBOX: &str = "/bin/busybox";
/// overlayfs is a module in Debian's kernel; kept next to vmlinuz, loaded by /init.
const OVERLAY_MODULE: &str = "overlay.ko";
/// The BPF backend's integration tests live in this crate; they drive the agent, which
/// goes to AGENT_VM_PATH. The VM runs x86_64 either way.
const BPF_TESTS_BIN: &str = "bpf-vm-tests";
const AGENT_VM_PATH: &str = "/bin/janus-agent";
const TEST_TARGET: &str = "x86_64-unknown-linux-gnu";
/// After the completion marker, how long qemu gets to power off.
const POWEROFF_GRACE: Duration = Duration::from_secs(30);

#[derive(Args, Debug)]
pub struct VmTestOptions {
    /// Host binary to copy into the VM and run without arguments
    /// (repeatable). Static binaries are best; for dynamic ones the
    /// libraries `ldd` lists are copied along.
    #[arg(long = "bin", value_name = "PATH")]
    bins: Vec<PathBuf>,
    /// Extra file for the tests, as HOST_PATH[:VM_PATH] (repeatable;
    /// default VM path /data/<file name>).
    #[arg(long = "file", value_name = "HOST[:VM]")]
    files: Vec<String>,
    /// Also run the BPF backend's integration tests, the shared scenario table and
    /// janus-cgroups under both backends (the default when no test is given).
    #[arg(long)]
    bpf_tests: bool,
    /// Also run the benchmark (janus-bench) with no agent, fanotify and bpf in this boot.
    #[arg(long)]
    bench: bool,
    /// Also run the node-scale benchmark (janus-scale-bench) with the BPF backend: 1,000
    /// containers in the BPF maps, each checked.
    #[arg(long)]
    scale_bench: bool,
    /// Deadline in seconds for the VM run (boot, tests and power-off).
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// Boot this kernel image instead of the Debian package's.
    #[arg(long, value_name = "VMLINUZ")]
    kernel: Option<PathBuf>,
    /// Debian kernel package to boot [default: the newest of --kernel-series that apt
    /// knows].
    #[arg(long, value_name = "NAME")]
    kernel_package: Option<String>,
    /// Which series of Debian's cloud kernels to boot the newest of.
    #[arg(long, value_enum, default_value = "6.1")]
    kernel_series: KernelSeries,
    /// The modes the scenario table runs its guards in, each under both backends.
    #[arg(long, value_delimiter = ',', default_value = "enforce,monitor")]
    table_modes: Vec<TableMode>,
    /// Leave the scenario table out (the BPF tests and janus-cgroups only).
    #[arg(long)]
    no_table: bool,
    /// Extra kernel command-line arguments.
    #[arg(long, value_name = "ARGS")]
    append: Option<String>,
    /// Build the BPF object with the release profile.
    #[arg(long)]
    release: bool,
    /// Number of virtual CPUs. One by default: with two, a boot in a few (here about one in
    /// ten) hung for good in a kernel soft lockup of the test process, as a cross-CPU wait
    /// that TCG's vCPU threads never completed would; with one there is no such wait.
    #[arg(long, default_value_t = 1)]
    smp: u32,
    /// One more test: a host executable (copied in) or a command that exists
    /// inside the VM (busybox applets), with its arguments.
    #[arg(last = true, value_name = "CMD")]
    command: Vec<String>,
}

pub fn run(opts: VmTestOptions) -> Result<()> {
    let started = Instant::now();
    let target_dir = util::target_dir()?;
    let vm_dir = target_dir.join("vm");
    fs::create_dir_all(&vm_dir).with_context(|| format!("creating {}", vm_dir.display()))?;
    require_tool("qemu-system-x86_64", "qemu-system-x86")?;

    let obj = ebpf::build(&ebpf::BuildOptions {
        release: opts.release,
    })?;
    let kernel = kernel_image(&opts, &vm_dir)?;

    let mut image = Image::default();
    image.add_host_file(BUSYBOX, Path::new(BUSYBOX), 0o755)?;
    image.add_host_file(VM_EBPF_OBJ, &obj, 0o644)?;
    let overlay = kernel.with_file_name(OVERLAY_MODULE);
    if overlay.is_file() {
        image.add_host_file("/lib/overlay.ko", &overlay, 0o644)?;
    }

    for spec in &opts.files {
        let (host, vm_path) = match spec.split_once(':') {
            Some((host, vm)) => (Path::new(host), vm.to_owned()),
            None => {
                let host = Path::new(spec);
                let name = host.file_name().context("--file needs a file name")?;
                (host, format!("/data/{}", name.to_string_lossy()))
            }
        };
        ensure!(
            vm_path.starts_with('/'),
            "--file: VM path {vm_path} must be absolute"
        );
        image.add_host_file(&vm_path, host, 0o644)?;
    }

    let mut tests = Vec::new();
    // The agent embeds the object just built (its build script looks for it).
    let agent = build_static_bin("janus-agent", "janus-agent")?;
    image.add_host_file(AGENT_VM_PATH, &agent, 0o755)?;
    let default_tests =
        opts.bins.is_empty() && opts.command.is_empty() && !opts.bench && !opts.scale_bench;
    if opts.bpf_tests || default_tests {
        let bin = build_static_bin("janus-tests", BPF_TESTS_BIN)?;
        tests.push(image.add_test(&bin, Vec::new(), "bpf")?);
        // The same table under both backends on the same kernel: the same answers; and
        // its deny cases again with the guards in monitor mode.
        let table = build_static_bin("janus-tests", "janus-scenarios")?;
        let modes = if opts.no_table {
            &[][..]
        } else {
            &opts.table_modes[..]
        };
        for mode in modes {
            let mode = match mode {
                TableMode::Enforce => "enforce",
                TableMode::Monitor => "monitor",
            };
            for backend in ["bpf", "fanotify"] {
                let args = [
                    "--agent",
                    AGENT_VM_PATH,
                    "--backend",
                    backend,
                    "--mode",
                    mode,
                    "--workdir",
                    "/tmp",
                ];
                tests.push(image.add_test(&table, args.map(str::to_owned).to_vec(), backend)?);
            }
        }
        // Pods laid out in cgroup v2 as the kubelet lays them out, found by `serve`.
        let cgroups = build_static_bin("janus-tests", "janus-cgroups")?;
        for backend in ["bpf", "fanotify"] {
            let args = [
                "--agent",
                AGENT_VM_PATH,
                "--backend",
                backend,
                "--workdir",
                "/tmp",
            ];
            tests.push(image.add_test(&cgroups, args.map(str::to_owned).to_vec(), backend)?);
        }
    }
    if opts.bench {
        let bench = build_static_bin("janus-tests", "janus-bench")?;
        // Fewer iterations than on the host: TCG is slow. Each run has its own no-agent
        // baseline; both run in one boot.
        // The new-directory window is a fanotify notion (BPF decides at open).
        for (backend, window_runs) in [("fanotify", "4"), ("bpf", "0")] {
            let args = [
                "--agent",
                AGENT_VM_PATH,
                "--backend",
                backend,
                "--iterations",
                "2000",
                "--rounds",
                "3",
                "--threads",
                "2",
                "--window-runs",
                window_runs,
                "--workdir",
                "/tmp",
            ];
            tests.push(image.add_test(&bench, args.map(str::to_owned).to_vec(), backend)?);
        }
    }
    if opts.scale_bench {
        let bench = build_static_bin("janus-tests", "janus-scale-bench")?;
        // One round under TCG; the floor setups are its fanotify baseline in the same boot.
        let args = [
            "--agent",
            AGENT_VM_PATH,
            "--backend",
            "bpf",
            "--containers",
            "1000",
            "--rounds",
            "1",
            "--iterations",
            "1000",
            "--workdir",
            "/tmp",
        ];
        tests.push(image.add_test(&bench, args.map(str::to_owned).to_vec(), "bpf")?);
    }
    for bin in &opts.bins {
        tests.push(image.add_test(bin, Vec::new(), "-")?);
    }
    if let Some((cmd, args)) = opts.command.split_first() {
        let host = Path::new(cmd);
        if host.is_file() {
            tests.push(image.add_test(host, args.to_vec(), "-")?);
        } else {
            eprintln!("xtask: {cmd} is not a host file; running it as a command inside the VM");
            tests.push(VmTest {
                name: unique_name(&image, cmd.rsplit('/').next().unwrap_or(cmd)),
                argv: opts.command.clone(),
                backend: "-",
            });
        }
    }
    image.add_bytes("/init", init_script(&tests).into_bytes(), 0o755);
    // Named by the kernel's package, so runs on two kernels can go on at once.
    let tag = kernel
        .parent()
        .and_then(Path::file_name)
        .map_or_else(|| "custom".into(), |n| n.to_string_lossy().into_owned());
    let initramfs = vm_dir.join(format!("initramfs-{tag}.cpio"));
    image.write(&initramfs)?;

    let mut cmdline = KERNEL_CMDLINE.to_owned();
    if let Some(extra) = &opts.append {
        cmdline.push(' ');
        cmdline.push_str(extra);
    }
    eprintln!(
        "xtask: booting {} with {} test(s) (prepared in {:.1?}, deadline {} s)",
        kernel.display(),
        tests.len(),
        started.elapsed(),
        opts.timeout
    );
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-accel", "tcg", "-cpu", "max", "-m", "1024"])
        .args(["-smp", &opts.smp.to_string()])
        // No NIC: nothing needs one, and it skips iPXE's option ROM.
        .args(["-nographic", "-no-reboot", "-nic", "none"])
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initramfs)
        .args(["-append", &cmdline])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    // The deadline covers the VM only: the builds before it end on their own.
    let deadline = Instant::now() + Duration::from_secs(opts.timeout);
    let serial = vm_dir.join(format!("serial-{tag}.log"));
    let outcome = supervise(qemu, deadline, &serial)?;
    fs::remove_file(&initramfs).ok();
    report(&tests, &outcome, started.elapsed(), &serial)?;
    if opts.kernel.is_none() && opts.kernel_package.is_none() {
        matrix::check_reported(opts.kernel_series, outcome.cgroup())?;
    }
    Ok(())
}

/// Boots qemu, streams its serial output to stdout (and a log file) and
/// parses the markers, killing it at the deadline.
fn supervise(mut qemu: Command, deadline: Instant, log_path: &Path) -> Result<Outcome> {
    let mut child = qemu.spawn().context("starting qemu-system-x86_64")?;
    let stdout = child.stdout.take().context("qemu stdout")?;
    let (tx, rx) = mpsc::channel::<String>();
    // A reader thread turns the blocking pipe into a channel so the main
    // thread can wait on it with a deadline. It ends at EOF (qemu exit).
    let reader = thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    // Drop the firmware's terminal escapes and other control
                    // bytes so the log stays plain text.
                    let line = plain_text(&String::from_utf8_lossy(&buf));
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            }
        }
    });
    let mut log = BufWriter::new(
        fs::File::create(log_path).with_context(|| format!("creating {}", log_path.display()))?,
    );
    let mut out = Outcome::default();
    let mut wait_until = deadline;
    loop {
        let now = Instant::now();
        let line = match rx.recv_timeout(wait_until.saturating_duration_since(now)) {
            Ok(line) => line,
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {
                if !out.done {
                    out.timed_out = true;
                    eprintln!("xtask: deadline reached, killing qemu");
                } else {
                    eprintln!("xtask: qemu did not power off, killing it");
                }
                kill(&mut child);
                break;
            }
        };
        println!("{line}");
        writeln!(log, "{line}").ok();
        let was_done = out.done;
        out.read(&line);
        if out.done && !was_done {
            wait_until = deadline.min(Instant::now() + POWEROFF_GRACE);
        }
    }
    log.flush().ok();
    let status = child.wait().context("waiting for qemu")?;
    reader.join().ok();
    if !status.success() && !out.timed_out {
        eprintln!("xtask: qemu exited with {status}");
    }
    Ok(out)
}

/// Removes ANSI escape sequences (`ESC [ ... final`, `ESC x`) and control
/// characters other than tab.
fn plain_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.next_if_eq(&'[').is_some() {
                // Parameters and intermediates, then one final byte @..~.
                while chars.next().is_some_and(|c| !('@'..='~').contains(&c)) {}
            } else {
                chars.next();
            }
        } else if !c.is_control() || c == '\t' {
            out.push(c);
        }
    }
    out
}

fn kill(child: &mut Child) {
    // Already exited is fine; wait() below reaps it either way.
    child.kill().ok();
}

/// Shell script run as PID 1: mounts what BPF LSM tests need, runs each test
/// and prints machine-readable markers, then powers off.
fn init_script(tests: &[VmTest]) -> String {
    let mut s = String::from(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root RUST_BACKTRACE=1
export JANUS_EBPF_OBJ=/bpf/janus-ebpf.o
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mount -t bpf bpf /sys/fs/bpf
mount -t securityfs securityfs /sys/kernel/security
mount -t debugfs debugfs /sys/kernel/debug
mount -t tracefs tracefs /sys/kernel/tracing
mount -t cgroup2 cgroup2 /sys/fs/cgroup
ip link set lo up
[ -f /lib/overlay.ko ] && insmod /lib/overlay.ko
hostname janus-vm
echo "JANUS-VM-INFO kernel=$(uname -r) cgroup=$([ -f /sys/fs/cgroup/cgroup.controllers ] && echo v2 || echo v1) lsm=$(cat /sys/kernel/security/lsm)"
passed=0
failed=0
run_test() {
    name=$1
    shift
    echo "JANUS-VM-START name=$name"
    (cd /tmp && "$@")
    rc=$?
    if [ "$rc" -eq 0 ]; then
        status=pass
        passed=$((passed + 1))
    else
        status=fail
        failed=$((failed + 1))
    fi
    echo "JANUS-VM-RESULT name=$name status=$status rc=$rc"
}
"#,
    );
    for t in tests {
        s.push_str("run_test ");
        s.push_str(&shell_quote(&t.name));
        for arg in &t.argv {
            s.push(' ');
            s.push_str(&shell_quote(arg));
        }
        s.push('\n');
    }
    s.push_str(
        r#"echo "JANUS-VM-DONE passed=$passed failed=$failed"
poweroff -f
"#,
    );
    s
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Files of the initramfs, keyed by their path inside the VM.
#[derive(Default)]
struct Image {
    files: BTreeMap<String, (Vec<u8>, u32)>,
    symlinks: BTreeMap<String, String>,
    test_names: BTreeSet<String>,
}

impl Image {
    fn add_bytes(&mut self, vm_path: &str, data: Vec<u8>, mode: u32) {
        self.files.insert(vm_path.to_owned(), (data, mode));
    }

    fn add_host_file(&mut self, vm_path: &str, host: &Path, mode: u32) -> Result<()> {
        let data = fs::read(host).with_context(|| format!("reading {}", host.display()))?;
        self.add_bytes(vm_path, data, mode);
        Ok(())
    }

    /// Copies an executable to /tests/<name>, with its shared libraries when
    /// it is dynamically linked.
    fn add_test(
        &mut self,
        host: &Path,
        args: Vec<String>,
        backend: &'static str,
    ) -> Result<VmTest> {
        let base = host
            .file_name()
            .and_then(|n| n.to_str())
            .with_context(|| format!("bad test path {}", host.display()))?;
        let name = unique_name(self, base);
        let vm_path = format!("/tests/{name}");
        self.add_host_file(&vm_path, host, 0o755)?;
        self.add_shared_libs(host)?;
        self.test_names.insert(name.clone());
        let mut argv = vec![vm_path];
        argv.extend(args);
        Ok(VmTest {
            name,
            argv,
            backend,
        })
    }

    /// Static binaries are preferred (see `build_static_bin`), but copying
    /// what `ldd` resolves keeps prebuilt dynamic binaries usable too.
    fn add_shared_libs(&mut self, exe: &Path) -> Result<()> {
        let out = Command::new("ldd")
            .arg(exe)
            .stderr(Stdio::null())
            .output()
            .context("running ldd")?;
        // ldd exits non-zero for static executables.
        if !out.status.success() {
            return Ok(());
        }
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if line.contains("not found") {
                bail!("{}: missing shared library: {}", exe.display(), line.trim());
            }
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or the
            // loader "/lib64/ld-linux-x86-64.so.2 (0x...)"; vdso has no path.
            let path = match line.split_once("=>") {
                Some((_, rhs)) => rhs.split_whitespace().next(),
                None => line.split_whitespace().next(),
            };
            if let Some(path) = path.filter(|p| p.starts_with('/')) {
                if !self.files.contains_key(path) {
                    self.add_host_file(path, Path::new(path), 0o755)?;
                }
            }
        }
        Ok(())
    }

    fn write(&mut self, dest: &Path) -> Result<()> {
        for (path, data) in [
            ("/etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
            ("/etc/group", "root:x:0:\n"),
            (
                "/etc/hosts",
                "127.0.0.1 localhost janus-vm\n::1 localhost\n",
            ),
            (
                "/etc/nsswitch.conf",
                "passwd: files\ngroup: files\nhosts: files dns\n",
            ),
        ] {
            self.add_bytes(path, data.as_bytes().to_vec(), 0o644);
        }
        self.symlinks.insert("/sbin".to_owned(), "bin".to_owned());
        let mut dirs: BTreeSet<String> = [
            "/bin",
            "/dev",
            "/proc",
            "/sys",
            "/tmp",
            "/run",
            "/root",
            "/usr/bin",
            "/usr/sbin",
        ]
        .into_iter()
        .map(str::to_owned)
        .collect();
        for path in self.files.keys().chain(self.symlinks.keys()) {
            let mut p = Path::new(path).parent();
            while let Some(dir) = p.filter(|d| *d != Path::new("/")) {
                dirs.insert(dir.to_string_lossy().into_owned());
                p = dir.parent();
            }
        }
        let file =
            fs::File::create(dest).with_context(|| format!("creating {}", dest.display()))?;
        let mut w = cpio::Writer::new(BufWriter::new(file));
        // BTreeSet order puts every directory before its children.
        for dir in &dirs {
            let mode = if dir == "/tmp" { 0o1777 } else { 0o755 };
            w.dir(dir, mode)?;
        }
        // The kernel opens /dev/console for init's stdio before devtmpfs is
        // mounted; without it init has no output.
        w.char_dev("/dev/console", 0o600, 5, 1)?;
        for (path, target) in &self.symlinks {
            w.symlink(path, target)?;
        }
        for (path, (data, mode)) in &self.files {
            w.file(path, *mode, data)?;
        }
        w.finish()?;
        Ok(())
    }
}

fn unique_name(image: &Image, base: &str) -> String {
    // Result lines are `key=value` words: keep names to one plain word.
    let base: String = base
        .chars()
        .map(|c| {
            if c.is_whitespace() || c == '=' || c == '\'' {
                '_'
            } else {
                c
            }
        })
        .collect();
    let mut name = base.clone();
    let mut n = 2;
    while image.test_names.contains(&name) {
        name = format!("{base}-{n}");
        n += 1;
    }
    name
}

/// Builds a binary of a workspace package statically linked (glibc's
/// crt-static), so it runs in the initramfs without any shared library.
fn build_static_bin(package: &str, bin: &str) -> Result<PathBuf> {
    // With an explicit --target, RUSTFLAGS reach only the target artifacts,
    // not build scripts or proc macros, which stay dynamic host binaries.
    let mut flags = std::env::var("RUSTFLAGS").unwrap_or_default();
    // No debug info: the binaries go into an initramfs held in the VM's memory.
    flags.push_str(" -C target-feature=+crt-static -C debuginfo=0");
    // Release: under TCG every instruction is emulated, so the agent's start (reading
    // the kernel's BTF, loading the programs) costs the VM many times what it costs here.
    let mut cmd = Command::new(util::cargo());
    cmd.current_dir(util::workspace_root())
        .args([
            "build",
            "--release",
            "--package",
            package,
            "--bin",
            bin,
            "--target",
            TEST_TARGET,
        ])
        .env("RUSTFLAGS", flags.trim())
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    eprintln!("xtask: building {bin} (static, {TEST_TARGET})");
    let exes = util::cargo_build_executables(&mut cmd)?;
    exes.into_iter()
        .find(|p| p.file_name().is_some_and(|n| n == bin))
        .with_context(|| format!("cargo reported no {bin} executable"))
}

fn require_tool(tool: &str, package: &str) -> Result<()> {
    let found = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        bail!("{tool} not found (Debian package {package}); run `bash scripts/setup-bpf-toolchain.sh`");
    }
    Ok(())
}

/// Returns the vmlinuz to boot, downloading and caching the Debian package
/// under `target/vm/kernels/<package>_<version>/` on first use.
fn kernel_image(opts: &VmTestOptions, vm_dir: &Path) -> Result<PathBuf> {
    if let Some(kernel) = &opts.kernel {
        return Ok(kernel.clone());
    }
    let cache = vm_dir.join("kernels");
    let package = match &opts.kernel_package {
        Some(p) => p.clone(),
        None => match newest_cloud_kernel(opts.kernel_series) {
            Ok(p) => p,
            Err(e) => {
                // Offline or no apt lists: any kernel cached before will do.
                let cached = newest_cached_kernel(&cache, opts.kernel_series);
                match cached {
                    Some(k) => {
                        eprintln!("xtask: {e:#}; using cached {}", k.display());
                        return Ok(k);
                    }
                    None => return Err(e),
                }
            }
        },
    };
    let version =
        util::output(Command::new("apt-cache").args(["show", "--no-all-versions", &package]))?
            .lines()
            .find_map(|l| l.strip_prefix("Version: "))
            .map(str::to_owned)
            .with_context(|| format!("apt-cache show {package} printed no version"))?;
    let dir = cache.join(format!("{package}_{version}"));
    let vmlinuz = dir.join("vmlinuz");
    if vmlinuz.is_file() && dir.join(OVERLAY_MODULE).is_file() {
        return Ok(vmlinuz);
    }

    eprintln!("xtask: downloading {package} {version}");
    let tmp = vm_dir.join(format!("download.{}", std::process::id()));
    fs::create_dir_all(&tmp)?;
    let result = download_kernel(&package, &version, &tmp, &dir);
    fs::remove_dir_all(&tmp).ok();
    result?;
    Ok(vmlinuz)
}

fn download_kernel(package: &str, version: &str, tmp: &Path, dest: &Path) -> Result<()> {
    // Root's apt drops to the _apt user, which cannot write into target/:
    // stay root rather than warn.
    util::run(
        Command::new("apt-get")
            .args(["download", "-q", "-o", "APT::Sandbox::User=root"])
            .arg(format!("{package}={version}"))
            .current_dir(tmp),
    )?;
    let deb = fs::read_dir(tmp)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .context("apt-get download produced no .deb")?;
    let root = tmp.join("root");
    fs::create_dir_all(&root)?;
    // Only ./boot and overlayfs (a module in this kernel; `.ko.xz` from 6.12) are needed.
    let mut dpkg = Command::new("dpkg-deb")
        .arg("--fsys-tarfile")
        .arg(&deb)
        .stdout(Stdio::piped())
        .spawn()
        .context("running dpkg-deb")?;
    let tar_status = Command::new("tar")
        .args(["-x", "--wildcards", "-C"])
        .arg(&root)
        .arg("./boot/*")
        .arg("*/overlayfs/overlay.ko*")
        .stdin(dpkg.stdout.take().context("dpkg-deb stdout")?)
        .status()
        .context("running tar")?;
    let dpkg_status = dpkg.wait()?;
    if !dpkg_status.success() || !tar_status.success() {
        bail!(
            "extracting {} failed (dpkg-deb {dpkg_status}, tar {tar_status})",
            deb.display()
        );
    }
    let boot = root.join("boot");
    let mut found = false;
    fs::create_dir_all(dest)?;
    for entry in fs::read_dir(&boot)? {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        // config-* is kept to check CONFIG_BPF_LSM and friends.
        for (prefix, keep_as) in [("vmlinuz-", "vmlinuz"), ("config-", "config")] {
            if name.starts_with(prefix) {
                fs::copy(&path, dest.join(keep_as))?;
                found |= keep_as == "vmlinuz";
            }
        }
    }
    let dir = fs::read_dir(root.join("lib/modules"))?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("kernel/fs/overlayfs"))
        .find(|p| p.is_dir());
    if let Some(dir) = dir {
        let (plain, xz) = (dir.join("overlay.ko"), dir.join("overlay.ko.xz"));
        if plain.is_file() {
            fs::copy(plain, dest.join(OVERLAY_MODULE))?;
        } else if xz.is_file() {
            // busybox's insmod hands the file to init_module as it is: decompress here.
            let out = fs::File::create(dest.join(OVERLAY_MODULE))?;
            util::run(Command::new("xz").arg("-dc").arg(&xz).stdout(out))
                .context("decompressing overlay.ko.xz (Debian package xz-utils)")?;
        }
    }
    if !found {
        fs::remove_dir_all(dest).ok();
        bail!("{} has no boot/vmlinuz-*", deb.display());
    }
    Ok(())
}

/// The package of `series` with the highest number apt knows about.
fn newest_cloud_kernel(series: KernelSeries) -> Result<String> {
    let (prefix, suffix) = series.affixes();
    let pattern = format!(
        "^{}[0-9]+{}$",
        prefix.replace('.', r"\."),
        suffix.replace('+', r"\+")
    );
    let listing =
        util::output(Command::new("apt-cache").args(["search", "--names-only", &pattern]))?;
    listing
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|name| {
            let n = name
                .strip_prefix(prefix)?
                .strip_suffix(suffix)?
                .parse::<u32>()
                .ok()?;
            Some((n, name.to_owned()))
        })
        .max()
        .map(|(_, name)| name)
        .with_context(|| format!("apt-cache knows no {prefix}*{suffix} (run `apt-get update`)"))
}

fn newest_cached_kernel(cache: &Path, series: KernelSeries) -> Option<PathBuf> {
    let (prefix, suffix) = series.affixes();
    fs::read_dir(cache)
        .ok()?
        .filter_map(|e| e.ok())
        // Only the series asked for; other --kernel-package downloads stay opt-in.
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with(prefix) && name.contains(&format!("{suffix}_"))
        })
        .map(|e| e.path().join("vmlinuz"))
        .filter(|p| p.is_file())
        .max_by_key(|p| fs::metadata(p).and_then(|m| m.modified()).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_are_stripped() {
        assert_eq!(
            plain_text("\u{1b}c\u{1b}[?7l\u{1b}[2JSeaBIOS\r\n"),
            "SeaBIOS"
        );
        assert_eq!(plain_text("a\tb\u{1b}[0m c"), "a\tb c");
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("a'b c"), r"'a'\''b c'");
    }

    #[test]
    fn init_script_lists_tests() {
        let s = init_script(&[VmTest {
            name: "t".into(),
            argv: vec!["/tests/t".into(), "x y".into()],
            backend: "-",
        }]);
        assert!(s.contains("run_test 't' '/tests/t' 'x y'\n"));
        assert!(s.ends_with("poweroff -f\n"));
    }
}
