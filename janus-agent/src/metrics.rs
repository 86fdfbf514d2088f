//! Prometheus metrics of the agent. Handles for hot paths are resolved once per target so
//! that counting a decision is an atomic add, not a label lookup.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use janus_api::{Event, Mode, Verdict};

use crate::state::Phase;

/// The `kind`s of `janus_internal_errors_total`, by backend.
const INTERNAL_ERROR_KINDS: [(&str, &str); 8] = [
    ("fanotify", "read"),
    ("fanotify", "no_fd"),
    ("fanotify", "statx"),
    ("fanotify", "readlink"),
    ("bpf", "short_record"),
    ("bpf", "unknown_guard"),
    ("bpf", "audit"),
    ("bpf", "corrupt_record"),
];

/// The `outcome`s of `janus_gate_total`.
pub const GATE_OUTCOMES: [&str; 4] = ["guarded", "no_guard", "started_unguarded", "refused"];

pub struct Metrics {
    registry: Registry,
    pub decisions: IntCounterVec,
    pub internal_errors: IntCounterVec,
    pub overflows: IntCounterVec,
    pub response_errors: IntCounterVec,
    pub marks: IntGaugeVec,
    pub targets: IntGaugeVec,
    pub latency: HistogramVec,
    pub log_dropped: IntCounterVec,
    pub new_dirs: IntCounterVec,
    pub denials: IntCounterVec,
    pub guards: IntGaugeVec,
    pub bpf_events_dropped: IntCounter,
    pub pin_failures: IntCounter,
    pub scans_incomplete: IntCounter,
    pub backend_info: IntGaugeVec,
    pub api_refused: IntCounterVec,
    pub kernel_marks: IntGauge,
    pub placement_failures: IntCounterVec,
    pub bpf_fallbacks: IntCounterVec,
    pub cgroup_watch_failed: IntGauge,
    pub gate: IntCounterVec,
    pub nri_registered: IntGauge,
    pub nri_containers: IntCounterVec,
}

fn register<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
    r.register(Box::new(c.clone()))
        .expect("metric names are unique");
    c
}

impl Metrics {
    pub fn new() -> Metrics {
        let r = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            register(
                &r,
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            register(
                &r,
                IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let decisions = counter(
            "janus_decisions_total",
            "Guard decisions, by guard, namespace, response (allow|deny), event, backend and mode (enforce, or monitor: a deny the kernel was told to allow).",
            &["guard", "namespace", "response", "event", "backend", "mode"],
        );
        let internal_errors = counter(
            "janus_internal_errors_total",
            "Events answered without a full decision because of an internal error (answered deny if the guard has enforced deny paths, else allow).",
            &["backend", "kind"],
        );
        let overflows = counter(
            "janus_queue_overflows_total",
            "Event queue overflows reported by the kernel (group: perm|create).",
            &["group"],
        );
        let response_errors = counter(
            "janus_response_errors_total",
            "Permission events whose answer the kernel refused: the event stays unanswered until its group closes.",
            &["backend"],
        );
        let marks = gauge(
            "janus_marks",
            "Objects a guard holds marked, by guard and namespace: every directory and file below its paths (fanotify).",
            &["guard", "namespace"],
        );
        let targets = gauge(
            "janus_targets",
            "Processes the agent holds a guard for, by state (pending|enforcing|exited|failed).",
            &["state"],
        );
        for phase in Phase::ALL {
            targets.with_label_values(&[phase.as_str()]).set(0);
        }
        let latency = register(
            &r,
            HistogramVec::new(
                HistogramOpts::new(
                    "janus_decision_latency_seconds",
                    "Time from reading a permission event to answering it.",
                )
                .buckets(vec![
                    1e-7, 2.5e-7, 5e-7, 1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 1e-3, 1e-2,
                ]),
                &["backend"],
            )
            .expect("valid metric"),
        );
        let log_dropped = register(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "janus_log_lines_dropped_total",
                    "Decision records dropped because stdout could not keep up, or because the target had its share of the queue waiting (answers never wait for logging).",
                ),
                &["guard", "namespace"],
            )
            .expect("valid metric"),
        );
        let denials = counter(
            "janus_denials_total",
            "Accesses refused (or, in monitor mode, that would have been), by guard, namespace and pod: the dashboard's denials by pod. Who tried is in the decision records, not in a label.",
            &["guard", "namespace", "pod"],
        );
        let new_dirs = counter(
            "janus_new_directories_total",
            "Directories created or moved under a guarded directory and marked after the guard started.",
            &["guard", "namespace"],
        );
        let guards = gauge(
            "janus_guards",
            "Guards held by `serve` (one per guard and pod), by state (enforced|pending|failed).",
            &["state"],
        );
        for state in ["enforced", "pending", "failed"] {
            guards.with_label_values(&[state]).set(0);
        }
        let bpf_events_dropped = register(
            &r,
            IntCounter::new(
                "janus_bpf_events_dropped_total",
                "BPF decision records dropped because the ring buffer was full, or half full with the target's share of it waiting (the decision itself stood, and is counted in janus_decisions_total).",
            )
            .expect("valid metric"),
        );
        let pin_failures = register(
            &r,
            IntCounter::new(
                "janus_init_pin_failures_total",
                "Container inits that ended before they could be held (pidfd); the container is failed until its next init is found.",
            )
            .expect("valid metric"),
        );
        let scans_incomplete = register(
            &r,
            IntCounter::new(
                "janus_proc_scans_incomplete_total",
                "Readings of /proc that could not open every process (EMFILE, ENFILE): nothing is guarded or lifted from such a reading.",
            )
            .expect("valid metric"),
        );
        let backend_info = gauge(
            "janus_backend_info",
            "1 for the enforcement backend in use (bpf|fanotify).",
            &["backend"],
        );
        let api_refused = counter(
            "janus_api_refused_total",
            "Calls to the agent API refused because the caller is not the controller, by reason (no_certificate|unreadable_certificate|wrong_identity).",
            &["reason"],
        );
        for reason in ["no_certificate", "unreadable_certificate", "wrong_identity"] {
            api_refused.with_label_values(&[reason]);
        }
        let kernel_marks = register(
            &r,
            IntGauge::new(
                "janus_kernel_marks",
                "Inodes marked in the agent's one fanotify group, whatever guards and containers hold them (an inode two targets guard is one mark).",
            )
            .expect("valid metric"),
        );
        let cgroup_watch_failed = register(
            &r,
            IntGauge::new(
                "janus_cgroup_watch_failed",
                "1 when the watch on the node's cgroup tree failed: a held pod's new container is then found by the periodic rescan only.",
            )
            .expect("valid metric"),
        );
        let placement_failures = counter(
            "janus_placement_failures_total",
            "Marks, watches or map entries a guard needed that could not be placed (kind: mark|watch|stat|limit|escaped|map), e.g. at a kernel quota; the target is failed until they are.",
            &["backend", "kind"],
        );
        let bpf_fallbacks = counter(
            "janus_bpf_fallbacks_total",
            "Targets the BPF backend left to fanotify, by reason (no_mount_namespace|path_missing|scope_taken|maps_full|shares_taken): the guard is enforced, by fanotify.",
            &["reason"],
        );
        for reason in crate::bpf::FALLBACK_REASONS {
            bpf_fallbacks.with_label_values(&[reason]);
        }
        let gate = counter(
            "janus_gate_total",
            "Containers the start gate answered, by outcome: guarded (every guard of its pod enforced before it ran), no_guard (its pod has none), started_unguarded (the gate failed and the pod's guards fail open, or the agent could not be reached), refused (it failed closed).",
            &["outcome"],
        );
        for outcome in GATE_OUTCOMES {
            gate.with_label_values(&[outcome]);
        }
        // Registered by `register_nri`, on an agent wired through NRI only: a gauge at 0
        // means a plugin not registered, not one never asked for.
        let nri_registered = IntGauge::new(
            "janus_nri_registered",
            "1 while the agent is registered with the runtime as an NRI plugin (--nri-socket): containers created while it is 0 get no start gate's hook from it.",
        )
        .expect("valid metric");
        let nri_containers = IntCounterVec::new(
            Opts::new(
                "janus_nri_containers_total",
                "Containers the runtime told the NRI plugin of, by outcome: hook_added (the start gate's hook added to its spec), hook_present (its spec had it already).",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        for outcome in ["hook_added", "hook_present"] {
            nri_containers.with_label_values(&[outcome]);
        }
        for (backend, kind) in [
            ("fanotify", "mark"),
            ("fanotify", "watch"),
            ("fanotify", "stat"),
            ("fanotify", "limit"),
            ("fanotify", "escaped"),
            ("bpf", "map"),
        ] {
            placement_failures.with_label_values(&[backend, kind]);
        }
        // Every series the backends count exists from the start, so alerts and dashboards
        // see 0 rather than nothing.
        for backend in ["fanotify", "bpf"] {
            response_errors.with_label_values(&[backend]);
        }
        for (backend, kind) in INTERNAL_ERROR_KINDS {
            internal_errors.with_label_values(&[backend, kind]);
        }
        for group in ["perm", "create"] {
            overflows.with_label_values(&[group]);
        }
        Metrics {
            registry: r,
            bpf_events_dropped,
            pin_failures,
            scans_incomplete,
            backend_info,
            api_refused,
            kernel_marks,
            placement_failures,
            bpf_fallbacks,
            cgroup_watch_failed,
            gate,
            nri_registered,
            nri_containers,
            decisions,
            internal_errors,
            overflows,
            response_errors,
            marks,
            targets,
            latency,
            log_dropped,
            new_dirs,
            denials,
            guards,
        }
    }

    /// Exposes the NRI plugin's metrics: on an agent started with `--nri-socket`.
    pub fn register_nri(&self) {
        register(&self.registry, self.nri_registered.clone());
        register(&self.registry, self.nri_containers.clone());
    }

    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding does not fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }

    /// Drops every series labelled with this guard.
    pub fn forget_guard(&self, guard: &str, namespace: &str) {
        for backend in ["fanotify", "bpf"] {
            for event in Event::ALL {
                for verdict in [Verdict::Allow, Verdict::Deny] {
                    for mode in Mode::ALL {
                        let _ = self.decisions.remove_label_values(&[
                            guard,
                            namespace,
                            verdict.as_lower(),
                            event.kernel_name(),
                            backend,
                            mode.name(),
                        ]);
                    }
                }
            }
        }
        let _ = self.marks.remove_label_values(&[guard, namespace]);
        let _ = self.new_dirs.remove_label_values(&[guard, namespace]);
        let _ = self.log_dropped.remove_label_values(&[guard, namespace]);
    }

    /// Drops the guard's denial series of one pod, once no target of it is left.
    pub fn forget_pod(&self, guard: &str, namespace: &str, pod: &str) {
        let _ = self.denials.remove_label_values(&[guard, namespace, pod]);
    }

    /// The decision counters of one guard, one per (response, event, mode).
    pub fn decision_counters(
        &self,
        guard: &str,
        namespace: &str,
        backend: &str,
    ) -> DecisionCounters {
        let c = |v: Verdict, e: Event, m: Mode| {
            self.decisions.with_label_values(&[
                guard,
                namespace,
                v.as_lower(),
                e.kernel_name(),
                backend,
                m.name(),
            ])
        };
        DecisionCounters {
            by: Event::ALL
                .map(|e| Mode::ALL.map(|m| [c(Verdict::Allow, e, m), c(Verdict::Deny, e, m)])),
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

pub struct DecisionCounters {
    by: [[[IntCounter; 2]; Mode::ALL.len()]; Event::ALL.len()],
}

impl DecisionCounters {
    pub fn inc(&self, verdict: Verdict, event: Event, mode: Mode) {
        self.inc_by(verdict, event, mode, 1);
    }

    pub fn inc_by(&self, verdict: Verdict, event: Event, mode: Mode, n: u64) {
        self.by[event as usize][mode as usize][(verdict == Verdict::Deny) as usize].inc_by(n);
    }
}
