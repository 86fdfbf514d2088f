//! The scenario table: guards, files and the answers every backend must give. The agent's
//! kernel tests run it against fanotify on the host; the VM tests run it against BPF.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::agent::{decision_lines, Agent, AgentConfig};
use crate::target::{self, Access, Root, Target, BUSYBOX};
use crate::wait;

/// Who touches the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Who {
    /// The target process itself (the guard's owner).
    Owner,
    /// A process that entered the target, as `kubectl exec` does.
    Other,
    /// Such a process, from a mount namespace of its own making (`unshare -m`): copies of
    /// the target's mounts under new IDs, the same root.
    Nested,
}

/// What is done to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Open and read.
    Read,
    /// Open a directory and list it.
    List,
    /// Execute.
    Exec,
    /// Open for appending and write.
    Write,
    /// Open, map for reading and print the mapping: the reads are page faults.
    Map,
    /// Read the file through its directory's name while another process of the container
    /// renames that directory back and forth (`<dir>` and `<dir>2`): allowed if any read
    /// succeeds.
    ReadWhileRenaming,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    Allowed,
    Denied,
}

/// A command the container's root runs after the guard is placed (`sh -c`), before the
/// checks: the attacker's move.
#[derive(Debug, Clone, Copy)]
pub struct Step {
    pub cmd: &'static str,
    /// Whether the BPF backend refuses it (EPERM): a rename or link that would take an
    /// object out of its guard, with the guarded path its deny line names and the name
    /// used where that differs. fanotify cannot refuse one, and must let it happen and
    /// decide by identity instead.
    pub bpf_refuses: Option<Logged>,
}

/// What a deny line must say: the guarded path and, where the name used differs, that name.
#[derive(Debug, Clone, Copy)]
pub struct Logged {
    pub path: &'static str,
    pub via: Option<&'static str>,
}

impl Logged {
    /// The line's `'{path}'{via} (`, escaped as the default format escapes them: without a
    /// name used, the pod follows the path at once.
    pub fn quoted(&self) -> String {
        let q = |p: &str| format!("'{}'", p.replace('\\', "\\\\").replace('\'', "\\'"));
        match self.via {
            Some(via) => format!("{} via {} (", q(self.path), q(via)),
            None => format!("{} (", q(self.path)),
        }
    }
}

const fn step(cmd: &'static str) -> Step {
    Step {
        cmd,
        bpf_refuses: None,
    }
}

const fn refused_by_bpf(cmd: &'static str, path: &'static str, via: Option<&'static str>) -> Step {
    Step {
        cmd,
        bpf_refuses: Some(Logged { path, via }),
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Check {
    pub who: Who,
    pub op: Op,
    pub path: &'static str,
    pub expect: Expect,
    /// The path a deny line names: the guarded file's, for a file reached by another name
    /// (the line then gives `path` after ` via `).
    pub logged: &'static str,
    /// The whole line the access must log (as the guard in force writes it; pod
    /// `scenario-pod` on node `scenario-node`), allowed or denied.
    pub line: Option<&'static str>,
    /// No line may name the path: it is under no rule.
    pub unlogged: bool,
}

impl Check {
    const fn logs(mut self, line: &'static str) -> Check {
        self.line = Some(line);
        self
    }

    const fn unlogged(mut self) -> Check {
        self.unlogged = true;
        self
    }

    fn deny_line(&self) -> Logged {
        Logged {
            path: self.logged,
            via: (self.logged != self.path).then_some(self.path),
        }
    }
}

const fn check(who: Who, op: Op, path: &'static str, expect: Expect) -> Check {
    Check {
        who,
        op,
        path,
        expect,
        logged: path,
        line: None,
        unlogged: false,
    }
}

use Expect::{Allowed, Denied};
use Op::{Exec, List, Map, Read, ReadWhileRenaming, Write};
use Who::{Nested, Other, Owner};

/// The backends a scenario applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    Any,
    /// `modify`: fanotify cannot tell a write-open from a read-open.
    Bpf,
}

pub struct Scenario {
    pub name: &'static str,
    /// The `subjects:` list of the guard, as YAML indented by two spaces.
    pub subjects: &'static str,
    pub needs: Needs,
    /// Files made after the guard is enforced, in directories made after it too.
    pub later: &'static [&'static str],
    /// Commands the target's root runs before the guard is placed (a second mount, say).
    pub prepare: &'static [&'static str],
    /// The attacker's moves, after the guard is placed.
    pub steps: &'static [Step],
    pub checks: &'static [Check],
    /// Whether the checks are repeated once the agent has looked at every guarded path again
    /// (fanotify re-resolves them every second): what a move did must still hold then.
    pub recheck: bool,
}

/// Every root starts with these files (path, content); `/data/bin/tool` is a script,
/// `/data/link` a symlink to `secret` and `/srv/alias` a hard link to `/data/secret`.
pub const FILES: &[(&str, &str)] = &[
    ("/data/secret", "secret"),
    ("/data/public", "public"),
    ("/data/sub/deep/file", "deep"),
    ("/srv/plain", "plain"),
    ("/data/d1/plain", "d1"),
    ("/data/f1", "f1"),
    ("/data/t1/a/b/leaf", "t1"),
    ("/data/t2/x", "t2"),
    ("/data/t3/leaf", "t3"),
    ("/data/t4/mm", "t4"),
    ("/data/x' (payments-db-0:node-9) team=payments", "forged"),
];

/// What a row leaves out: any backend, no files made late, no preparation and no moves,
/// checked once.
const ROW: Scenario = Scenario {
    name: "",
    subjects: "",
    needs: Needs::Any,
    later: &[],
    prepare: &[],
    steps: &[],
    checks: &[],
    recheck: false,
};

pub const TABLE: &[Scenario] = &[
    Scenario {
        name: "deny-file",
        subjects: "  - deny: [/data/secret]\n    events: [open]\n    tags: {team: scenarios}\n",
        checks: &[
            check(Other, Read, "/data/secret", Denied).logs(
                "<DENY> OPEN_PERM file '/data/secret' (scenario-pod:scenario-node) team=scenarios",
            ),
            check(Other, Read, "/data/public", Allowed).unlogged(),
            check(Other, Read, "/srv/plain", Allowed).unlogged(),
        ],
        ..ROW
    },
    Scenario {
        name: "deny-directory-recursively",
        subjects: "  - deny: [/data]\n    events: [open]\n",
        later: &["/data/fresh"],
        checks: &[
            check(Other, Read, "/data/sub/deep/file", Denied)
                .logs("<DENY> OPEN_PERM file '/data/sub/deep/file' (scenario-pod:scenario-node) "),
            check(Other, Read, "/data/fresh", Denied)
                .logs("<DENY> OPEN_PERM file '/data/fresh' (scenario-pod:scenario-node) "),
            check(Other, List, "/data/sub", Denied)
                .logs("<DENY> OPEN_PERM directory '/data/sub' (scenario-pod:scenario-node) "),
            check(Other, Read, "/data/secret", Denied),
            check(Other, Read, "/srv/plain", Allowed).unlogged(),
        ],
        ..ROW
    },
    Scenario {
        name: "longest-path-wins",
        subjects: "  - deny: [/data]\n    allow: [/data/public, /data/sub/deep]\n    events: [open]\n",
        checks: &[
            check(Other, Read, "/data/public", Allowed)
                .logs("<ALLOW> OPEN_PERM file '/data/public' (scenario-pod:scenario-node) "),
            check(Other, Read, "/data/sub/deep/file", Allowed),
            check(Other, Read, "/data/secret", Denied)
                .logs("<DENY> OPEN_PERM file '/data/secret' (scenario-pod:scenario-node) "),
        ],
        ..ROW
    },
    Scenario {
        name: "longest-path-wins-across-subjects",
        subjects: "  - deny: [/data]\n    events: [open]\n  - allow: [/data/public]\n    events: [open]\n",
        checks: &[
            check(Other, Read, "/data/public", Allowed)
                .logs("<ALLOW> OPEN_PERM file '/data/public' (scenario-pod:scenario-node) "),
            check(Other, Read, "/data/secret", Denied)
                .logs("<DENY> OPEN_PERM file '/data/secret' (scenario-pod:scenario-node) "),
        ],
        ..ROW
    },
    Scenario {
        name: "deny-wins-at-equal-length",
        subjects: "  - allow: [/data/secret]\n    events: [open]\n  - deny: [/data/secret]\n    events: [open]\n",
        checks: &[check(Other, Read, "/data/secret", Denied)],
        ..ROW
    },
    Scenario {
        name: "auto-allow-owner",
        subjects: "  - deny: [/data/secret]\n    events: [open]\n    autoAllowOwner: true\n",
        checks: &[
            check(Owner, Read, "/data/secret", Allowed)
                .logs("<ALLOW> OPEN_PERM file '/data/secret' (scenario-pod:scenario-node) "),
            check(Other, Read, "/data/secret", Denied)
                .logs("<DENY> OPEN_PERM file '/data/secret' (scenario-pod:scenario-node) "),
        ],
        ..ROW
    },
    Scenario {
        name: "owner-denied-without-auto-allow",
        subjects: "  - deny: [/data/secret]\n    events: [open]\n",
        checks: &[check(Owner, Read, "/data/secret", Denied)],
        ..ROW
    },
    Scenario {
        name: "only-dir-skips-files",
        subjects: "  - deny: [/data/secret, /data/sub]\n    events: [open]\n    onlyDir: true\n",
        checks: &[
            check(Other, Read, "/data/secret", Allowed),
            check(Other, Read, "/data/sub/deep/file", Denied),
        ],
        ..ROW
    },
    Scenario {
        name: "exec",
        subjects: "  - deny: [/data/bin/tool]\n    events: [exec]\n",
        checks: &[
            check(Other, Exec, "/data/bin/tool", Denied),
            check(Other, Read, "/data/bin/tool", Allowed),
        ],
        ..ROW
    },
    Scenario {
        name: "access-denies-reads",
        subjects: "  - deny: [/data/secret]\n    events: [access]\n",
        checks: &[
            check(Other, Read, "/data/secret", Denied),
            check(Other, Read, "/data/public", Allowed),
        ],
        ..ROW
    },
    Scenario {
        name: "seed-all-events",
        subjects: "  - allow: [/data/public]\n    deny: [/data]\n    events: [all]\n",
        checks: &[
            check(Other, Read, "/data/secret", Denied),
            check(Other, Read, "/data/public", Allowed),
        ],
        ..ROW
    },
    Scenario {
        name: "symlink-resolved-inside-root",
        subjects: "  - deny: [/data/link]\n    events: [open]\n",
        checks: &[
            check(Other, Read, "/data/secret", Denied),
            check(Other, Read, "/data/public", Allowed),
        ],
        ..ROW
    },
    Scenario {
        name: "absolute-symlink-resolved-inside-root",
        subjects: "  - deny: [/data/abs-link]\n    events: [open]\n",
        checks: &[
            check(Other, Read, HOST_DECOY, Denied).logs(
                "<DENY> OPEN_PERM file '/run/janus-tests/decoy' (scenario-pod:scenario-node) ",
            ),
            check(Other, Read, "/data/public", Allowed).unlogged(),
        ],
        ..ROW
    },
    Scenario {
        name: "directories-created-later",
        subjects: "  - deny: [/data]\n    events: [open]\n",
        later: &["/data/new/a/b/file"],
        checks: &[
            check(Other, Read, "/data/new/a/b/file", Denied)
                .logs("<DENY> OPEN_PERM file '/data/new/a/b/file' (scenario-pod:scenario-node) "),
            check(Other, Read, "/srv/plain", Allowed).unlogged(),
        ],
        ..ROW
    },
    Scenario {
        name: "mount-namespace-made-inside",
        subjects: "  - deny: [/data/secret]\n    events: [open]\n",
        checks: &[
            check(Nested, Read, "/data/secret", Denied),
            check(Nested, Read, "/data/public", Allowed),
        ],
        ..ROW
    },
    Scenario {
        name: "hard-link-to-a-guarded-file",
        subjects: "  - deny: [/data/secret]\n    events: [open]\n",
        checks: &[
            Check {
                logged: "/data/secret",
                ..check(Other, Read, "/srv/alias", Denied)
            },
            check(Other, Read, "/srv/plain", Allowed),
        ],
        ..ROW
    },
    Scenario {
        name: "modify",
        subjects: "  - deny: [/data/secret]\n    events: [modify]\n",
        needs: Needs::Bpf,
        checks: &[
            check(Other, Write, "/data/secret", Denied)
                .logs("<DENY> MODIFY_PERM file '/data/secret' (scenario-pod:scenario-node) "),
            check(Other, Read, "/data/secret", Allowed),
        ],
        ..ROW
    },
    Scenario {
        name: "renamed-directory",
        subjects: "  - deny: [/data/d1]\n    events: [open]\n",
        steps: &[step("mv /data/d1 /data/moved")],
        checks: &[Check {
            logged: "/data/d1/plain",
            ..check(Other, Read, "/data/moved/plain", Denied)
        }],
        recheck: true,
        ..ROW
    },
    Scenario {
        name: "directory-renamed-back-and-forth-while-read",
        subjects: "  - deny: [/data/d1]\n    events: [open]\n",
        checks: &[check(Other, ReadWhileRenaming, "/data/d1/plain", Denied)],
        ..ROW
    },
    Scenario {
        name: "renamed-file",
        subjects: "  - deny: [/data/f1]\n    events: [open]\n",
        steps: &[step("mv /data/f1 /data/f2")],
        checks: &[Check {
            logged: "/data/f1",
            ..check(Other, Read, "/data/f2", Denied)
        }],
        recheck: true,
        ..ROW
    },
    Scenario {
        name: "subtree-moved-out",
        subjects: "  - deny: [/data/t1]\n    events: [open]\n",
        steps: &[refused_by_bpf(
            "mkdir -p /tmp && mv /data/t1/a /tmp/a",
            "/data/t1/a",
            None,
        )],
        checks: &[Check {
            logged: "/data/t1/a/b/leaf",
            ..check(Other, Read, "/tmp/a/b/leaf", Denied)
        }],
        recheck: true,
        ..ROW
    },
    Scenario {
        name: "moved-into-an-allowed-directory-of-the-same-deny",
        subjects: "  - deny: [/data]\n    allow: [/data/public-dir]\n    events: [open]\n",
        prepare: &["mkdir -p /data/public-dir"],
        steps: &[refused_by_bpf(
            "mv /data/secret /data/public-dir/x",
            "/data/secret",
            None,
        )],
        checks: &[Check {
            logged: "/data/secret",
            ..check(Other, Read, "/data/public-dir/x", Denied)
        }],
        recheck: true,
        ..ROW
    },
    Scenario {
        name: "hard-link-out-of-a-guarded-directory",
        subjects: "  - deny: [/data/t2]\n    events: [open]\n",
        // A link made before the guard, and one after.
        prepare: &["mkdir -p /tmp && ln /data/t2/x /tmp/early"],
        steps: &[refused_by_bpf("ln /data/t2/x /tmp/x", "/data/t2/x", None)],
        checks: &[
            Check {
                logged: "/data/t2/x",
                ..check(Other, Read, "/tmp/x", Denied)
            },
            Check {
                logged: "/data/t2/x",
                ..check(Other, Read, "/tmp/early", Denied)
            },
        ],
        recheck: true,
        ..ROW
    },
    // A subject in monitor mode beside an enforced one never weakens it: not by a longer
    // allow, not by a nearer deny that a link out of the enforced one would leave.
    Scenario {
        name: "a-longer-monitored-allow-inside-an-enforced-deny",
        subjects: "  - deny: [/data/t1]\n    events: [open]\n\
                   \x20 - allow: [/data/t1/a/b]\n    events: [open]\n    mode: monitor\n",
        checks: &[check(Other, Read, "/data/t1/a/b/leaf", Denied)],
        ..ROW
    },
    Scenario {
        name: "a-link-out-of-an-enforced-deny-past-a-monitored-one",
        subjects: "  - deny: [/data/t1]\n    events: [open]\n\
                   \x20 - deny: [/data/t1/a]\n    events: [open]\n    mode: monitor\n",
        steps: &[refused_by_bpf(
            "mkdir -p /tmp && ln /data/t1/a/b/leaf /tmp/leaf",
            "/data/t1/a/b/leaf",
            None,
        )],
        checks: &[Check {
            logged: "/data/t1/a/b/leaf",
            ..check(Other, Read, "/tmp/leaf", Denied)
        }],
        recheck: true,
        ..ROW
    },
    Scenario {
        name: "second-mount-of-a-guarded-directory",
        subjects: "  - deny: [/data/t3]\n    events: [open]\n",
        // As two volumeMounts of one volume.
        prepare: &["mkdir -p /mirror && /bin/busybox mount --bind /data/t3 /mirror"],
        steps: &[step("mkdir -p /mirror2 && /bin/busybox mount --bind /data/t3 /mirror2")],
        checks: &[
            Check {
                logged: "/data/t3/leaf",
                ..check(Other, Read, "/mirror/leaf", Denied)
            },
            Check {
                logged: "/data/t3/leaf",
                ..check(Other, Read, "/mirror2/leaf", Denied)
            },
        ],
        ..ROW
    },
    Scenario {
        name: "access-denied-mapping",
        subjects: "  - deny: [/data/t4]\n    events: [access]\n",
        checks: &[
            check(Other, Map, "/data/t4/mm", Denied),
            check(Other, Map, "/data/public", Allowed),
        ],
        ..ROW
    },
    Scenario {
        name: "a-name-that-forges-a-line",
        subjects: "  - deny: [/data]\n    events: [open]\n",
        // The quote is escaped in the line: the pod and node that follow are the real ones.
        checks: &[check(
            Other,
            Read,
            "/data/x' (payments-db-0:node-9) team=payments",
            Denied,
        )],
        ..ROW
    },
    Scenario {
        name: "subtree-moved-out-of-a-renamed-directory",
        subjects: "  - deny: [/data/t1]\n    events: [open]\n",
        // The rule's own directory moves with its rule; what lies below it cannot leave,
        // and the refusal names both the guarded path and the name used.
        steps: &[
            step("mv /data/t1 /data/t1b"),
            refused_by_bpf(
                "mkdir -p /tmp && mv /data/t1b/a /tmp/a",
                "/data/t1/a",
                Some("/data/t1b/a"),
            ),
        ],
        checks: &[Check {
            logged: "/data/t1/a/b/leaf",
            ..check(Other, Read, "/tmp/a/b/leaf", Denied)
        }],
        recheck: true,
        ..ROW
    },
];

/// How long a check on a file made after the guard started may take to reach its expected
/// answer (the agent marks new directories as they appear). Any other check must be right
/// the first time.
pub const NEW_PATH_WINDOW: Duration = Duration::from_secs(1);

/// A path that both the node and every root have, the target of `/data/abs-link`.
pub const HOST_DECOY: &str = "/run/janus-tests/decoy";

/// Lays out the standard files in `root`.
pub fn populate(root: &Root) -> Result<()> {
    for (path, content) in FILES {
        root.write(path, format!("{content}\n").as_bytes())?;
    }
    root.script("/data/bin/tool", "echo tool")?;
    root.symlink("/data/link", "secret")?;
    // An absolute link to a path the node has too: the guard must land on the container's
    // file, which a lookup on the node would miss for the node's own.
    let decoy = Path::new(HOST_DECOY);
    if !decoy.exists() {
        // Once, whole: runners in parallel read it.
        let dir = decoy.parent().context("the decoy's directory")?;
        std::fs::create_dir_all(dir)?;
        let partial = dir.join(format!(".decoy.{}", std::process::id()));
        std::fs::write(&partial, "the node's\n")?;
        std::fs::rename(&partial, decoy)?;
    }
    root.write(HOST_DECOY, b"the container's\n")?;
    root.symlink("/data/abs-link", HOST_DECOY)?;
    std::fs::hard_link(root.host("/data/secret"), root.host("/srv/alias"))?;
    Ok(())
}

/// A guard document around `subjects`.
pub fn guard_yaml(name: &str, subjects: &str) -> String {
    format!(
        "apiVersion: januscontroller.clustergarage.io/v1alpha1\nkind: JanusGuard\n\
         metadata:\n  name: {name}\n  namespace: tests\nspec:\n  selector:\n    \
         matchLabels:\n      app: janus-tests\n  subjects:\n{subjects}"
    )
}

/// The same guard in monitor mode.
pub fn monitor_yaml(name: &str, subjects: &str) -> String {
    guard_yaml(name, subjects).replace("\nspec:\n", "\nspec:\n  mode: monitor\n")
}

/// How a line starts for a denial the kernel was told (`<DENY>`), or was not.
fn deny_mark(monitor: bool) -> &'static str {
    if monitor {
        "<DENY (monitor)>"
    } else {
        "<DENY>"
    }
}

/// Where and how scenarios run.
pub struct Runner<'a> {
    pub agent_bin: &'a Path,
    /// Arguments for the agent after the standard ones (e.g. `--backend bpf`).
    pub agent_args: &'a [&'a str],
    /// Whether the backend under test enforces `modify`.
    pub bpf: bool,
    /// Each guard in monitor mode: every check the table denies must succeed, with a
    /// `<DENY (monitor)>` line and a count of it, and nothing may be refused.
    pub monitor: bool,
    /// Parent of the roots and agent directories.
    pub workdir: &'a Path,
}

impl Runner<'_> {
    /// The scenarios that apply to the backend under test (in monitor mode, those with
    /// something to deny and no mode of their own).
    pub fn applicable(&self) -> impl Iterator<Item = &'static Scenario> + '_ {
        TABLE.iter().filter(|s| {
            (s.needs == Needs::Any || self.bpf)
                && (!self.monitor
                    || (s.checks.iter().any(|c| c.expect == Expect::Denied)
                        && !s.subjects.contains("mode:")))
        })
    }

    /// Runs every applicable scenario; returns (name, outcome) for each.
    pub fn run_all(&self) -> Vec<(&'static str, Result<()>)> {
        self.applicable()
            .map(|s| {
                (
                    s.name,
                    self.run(s).with_context(|| format!("scenario {}", s.name)),
                )
            })
            .collect()
    }

    pub fn run(&self, s: &Scenario) -> Result<()> {
        if !s.steps.is_empty() {
            self.unguarded(s)?;
        }
        let root = Root::new(self.workdir, s.name)?;
        populate(&root)?;
        let mut target = Target::start(&root)?;
        prepare(&target, s)?;
        if s.steps.is_empty() {
            // What the guard will refuse is readable before it is placed.
            for c in s.checks.iter().filter(|c| c.expect == Expect::Denied) {
                if !s.later.contains(&c.path) {
                    readable(&mut target, c)?;
                }
            }
        }
        let guard = if self.monitor {
            monitor_yaml(s.name, s.subjects)
        } else {
            guard_yaml(s.name, s.subjects)
        };
        let agent_dir = self.workdir.join(format!("agent-{}", s.name));
        let agent = Agent::start(
            &AgentConfig {
                bin: self.agent_bin,
                guard: &guard,
                pids: &[target.pid()],
                pod: "scenario-pod",
                node: "scenario-node",
                extra: self.agent_args,
            },
            &agent_dir,
        )?;
        for path in s.later {
            root.write(path, b"later\n")?;
        }
        let mark = deny_mark(self.monitor);
        // Whether BPF saw a move take an object out of its guard: refused, or in monitor
        // mode let through (and then the object is outside every rule's walk).
        let mut refused = false;
        for step in s.steps {
            let got = target.exec(&[BUSYBOX, "sh", "-c", step.cmd])?;
            let want_refused = step.bpf_refuses.filter(|_| self.bpf);
            match (&got, want_refused, self.monitor) {
                (Access::Ok(_), None, _) => {}
                // BPF refuses the move, or in monitor mode lets it through; a line either way.
                (Access::Ok(_), Some(logged), true) | (Access::Denied, Some(logged), false) => {
                    refused = true;
                    let quoted = logged.quoted();
                    agent.wait_line(&format!("a {mark} line for {quoted}"), |l| {
                        l.starts_with(mark) && l.contains(&quoted)
                    })?;
                }
                _ => bail!(
                    "step {:?}: {got:?}, expected it {}",
                    step.cmd,
                    if want_refused.is_some() && !self.monitor {
                        "refused"
                    } else {
                        "done"
                    }
                ),
            }
        }
        self.checks(s, &mut target, &agent, refused)?;
        if s.recheck && !self.bpf {
            // fanotify looks at every guarded path again every second: what a move did
            // must still hold once it has.
            let passes = agent.passes()?;
            wait::until(
                "the agent to look at every guarded path twice more",
                Duration::from_secs(10),
                || (agent.passes().ok()? >= passes + 2).then_some(()),
            )?;
            self.checks(s, &mut target, &agent, refused)?;
        }
        if self.monitor {
            let (_, body) = agent.get("/metrics")?;
            let monitored = body
                .lines()
                .filter(|l| {
                    l.starts_with("janus_decisions_total{")
                        && l.contains("mode=\"monitor\"")
                        && l.contains("response=\"deny\"")
                })
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>();
            if monitored < 1.0 {
                bail!("janus_decisions_total counts no monitored denial:\n{body}");
            }
            if let Some(l) = agent.lines().iter().find(|l| l.starts_with("<DENY>")) {
                bail!("a guard in monitor mode claims a refusal: {l}");
            }
        }
        if s.steps.is_empty() && s.prepare.is_empty() {
            // A process of the node is in no container: never refused, and its own file
            // behind the container's absolute link is untouched.
            for c in s.checks.iter().filter(|c| c.expect == Expect::Denied) {
                node_reads(root.host(c.path), c.op == Op::List)?;
            }
            let node = node_reads(HOST_DECOY.into(), false)?;
            if node != b"the node's\n" {
                bail!("the node's {HOST_DECOY} changed: {node:?}");
            }
        }
        let status = agent.stop()?;
        if !status.success() {
            bail!("the agent exited with {status} after SIGTERM");
        }
        self.after_exit(s, &mut target, &decision_lines(&agent_dir))?;
        target.kill()?;
        Ok(())
    }

    /// Without the guard the attacker's moves work and what the checks deny is readable
    /// through the new names: the scenario tests the guard, not a typo.
    fn unguarded(&self, s: &Scenario) -> Result<()> {
        let root = Root::new(self.workdir, &format!("{}-unguarded", s.name))?;
        populate(&root)?;
        let mut target = Target::start(&root)?;
        prepare(&target, s)?;
        for step in s.steps {
            match target.exec(&[BUSYBOX, "sh", "-c", step.cmd])? {
                Access::Ok(_) => {}
                other => bail!("unguarded step {:?}: {other:?}", step.cmd),
            }
        }
        for c in s.checks.iter().filter(|c| c.expect == Expect::Denied) {
            readable(&mut target, c).context("unguarded")?;
        }
        target.kill()
    }

    fn checks(
        &self,
        s: &Scenario,
        target: &mut Target,
        agent: &Agent,
        refused: bool,
    ) -> Result<()> {
        for c in s.checks {
            // The kernel walks up from each file it is asked about: BPF covers a new one
            // the first time.
            let window = if s.later.contains(&c.path) && !self.bpf {
                NEW_PATH_WINDOW
            } else {
                Duration::ZERO
            };
            // Where BPF refused the move, the new name does not exist.
            let absent = |got: &Access| {
                refused && matches!(got, Access::Failed(m) if m.contains("No such file"))
            };
            let mark = deny_mark(self.monitor);
            let quoted = c.deny_line().quoted();
            let logged = || {
                agent
                    .lines()
                    .iter()
                    .any(|l| l.starts_with(mark) && l.contains(&quoted))
            };
            // In monitor mode what the table denies succeeds, with its line; but under BPF
            // an object a move took out of its guard is no longer below the rule (the move's
            // line was the trace).
            let line_expected = !(self.bpf && refused);
            let window = if self.monitor {
                window.max(Duration::from_secs(10))
            } else {
                window
            };
            let last = wait::until(
                &format!("{:?} {:?} {} to be {:?}", c.who, c.op, c.path, c.expect),
                window,
                || {
                    let got = attempt(target, c).ok()?;
                    let ok = match c.expect {
                        Expect::Denied if self.monitor => {
                            matches!(got, Access::Ok(_)) && (!line_expected || logged())
                        }
                        Expect::Denied => got == Access::Denied || absent(&got),
                        Expect::Allowed => matches!(got, Access::Ok(_)),
                    };
                    ok.then_some(got)
                },
            );
            let got = match last {
                Ok(got) => got,
                Err(e) => {
                    let got = attempt(target, c)?;
                    bail!(
                        "{e}; last answer: {got:?}\nagent stderr:\n{}",
                        agent.stderr()
                    );
                }
            };
            if got == Access::Denied {
                agent.wait_line(&format!("a {mark} line for {quoted}"), |_| logged())?;
            }
            if let Some(line) = c.line.filter(|_| line_expected) {
                let want = line.replacen("<DENY>", mark, 1);
                agent.wait_line(&format!("the line {want:?}"), |l| {
                    l.trim_end() == want.trim_end()
                })?;
            }
        }
        Ok(())
    }

    /// Once the agent has exited: no line named a path under no rule, and, where the
    /// guard's paths are where the table left them, what it refused works again and the
    /// node's own processes read it throughout.
    fn after_exit(&self, s: &Scenario, target: &mut Target, lines: &[String]) -> Result<()> {
        for c in s.checks.iter().filter(|c| c.unlogged) {
            let named = format!("'{}'", c.path);
            if let Some(l) = lines.iter().find(|l| l.contains(&named)) {
                bail!("{} is under no rule, yet logged: {l}", c.path);
            }
        }
        // Where every check says what it logs, those lines are all there is, each once: no
        // second line for one open, none for the node's own reads.
        if !self.monitor && s.checks.iter().all(|c| c.line.is_some() || c.unlogged) {
            let mut want: Vec<&str> = s.checks.iter().filter_map(|c| c.line).collect();
            let mut got: Vec<&str> = lines.iter().map(|l| l.trim_end()).collect();
            want.iter_mut().for_each(|l| *l = l.trim_end());
            want.sort_unstable();
            got.sort_unstable();
            if want != got {
                bail!("decision lines {got:#?}, expected exactly {want:#?}");
            }
        }
        if !s.steps.is_empty() || self.monitor {
            return Ok(());
        }
        for c in s.checks.iter().filter(|c| c.expect == Expect::Denied) {
            readable(target, c).context("the guard must lift with the agent")?;
        }
        Ok(())
    }
}

/// Runs the scenario's preparation in the target, as its root.
fn prepare(target: &Target, s: &Scenario) -> Result<()> {
    for cmd in s.prepare {
        match target.exec(&[BUSYBOX, "sh", "-c", cmd])? {
            Access::Ok(_) => {}
            other => bail!("preparing with {cmd:?}: {other:?}"),
        }
    }
    Ok(())
}

/// What the node reads at `path` (a listing's names, for a directory), within the time any
/// answer takes: a permission event left unanswered fails rather than hangs.
fn node_reads(path: std::path::PathBuf, dir: bool) -> Result<Vec<u8>> {
    let shown = path.display().to_string();
    let read = target::bounded(&format!("the node reading {shown}"), move || match dir {
        true => std::fs::read_dir(&path).map(|d| {
            d.filter_map(|e| e.ok())
                .flat_map(|e| e.file_name().into_encoded_bytes())
                .collect()
        }),
        false => std::fs::read(&path),
    })?;
    read.with_context(|| format!("the node reads {shown}"))
}

/// Fails unless `c` works, as it must before a guard is placed.
fn readable(target: &mut Target, c: &Check) -> Result<()> {
    match attempt(target, c)? {
        Access::Ok(_) => Ok(()),
        other => bail!(
            "{:?} {:?} {} before the guard: {other:?}",
            c.who,
            c.op,
            c.path
        ),
    }
}

/// 200 renames of `path`'s directory to `<dir>2` and back, and meanwhile 400 reads of the
/// file through each name: `Denied` when none succeeded, else how many did.
fn read_while_renaming(target: &Target, path: &str) -> Result<Access> {
    let (dir, file) = path.rsplit_once('/').context("a path with a directory")?;
    let script = format!(
        ": >/race.out; i=0; while [ $i -lt 200 ]; do {BUSYBOX} mv {dir} {dir}2 && {BUSYBOX} mv {dir}2 {dir}; i=$((i+1)); done </race.out & \
         ok=0; i=0; while [ $i -lt 400 ]; do \
           {BUSYBOX} cat {dir}/{file} >/race.out 2>&1 && ok=$((ok+1)); \
           {BUSYBOX} cat {dir}2/{file} >/race.out 2>&1 && ok=$((ok+1)); i=$((i+1)); done; \
         wait; echo reads=$ok"
    );
    Ok(match target.exec(&[BUSYBOX, "sh", "-c", &script])? {
        Access::Ok(out) if out.lines().any(|l| l == "reads=0") => Access::Denied,
        other => other,
    })
}

/// Does what `c` says once and reports the answer.
pub fn attempt(target: &mut Target, c: &Check) -> Result<Access> {
    match (c.who, c.op) {
        (Who::Owner, Op::Read) => target.owner_read(c.path),
        (Who::Owner, Op::Write) => target.owner_run(&format!("echo x >> '{}'", c.path)),
        (Who::Owner, Op::Exec) => target.owner_run(&format!("exec_check=$('{}')", c.path)),
        (Who::Other, Op::Read) => target.cat(c.path),
        (Who::Other, Op::List) => target.exec(&[BUSYBOX, "ls", c.path]),
        (Who::Nested, Op::Read) => target.exec(&[BUSYBOX, "unshare", "-m", BUSYBOX, "cat", c.path]),
        (Who::Nested, _) => bail!("the table only reads from a nested mount namespace"),
        (Who::Other, Op::Exec) => target.exec(&[c.path]),
        (Who::Other, Op::Write) => {
            target.exec(&[BUSYBOX, "sh", "-c", &format!("echo x >> '{}'", c.path)])
        }
        (Who::Other, Op::Map) => target.map_read(c.path),
        (Who::Other, Op::ReadWhileRenaming) => read_while_renaming(target, c.path),
        (Who::Owner, Op::Map | Op::ReadWhileRenaming | Op::List) => {
            bail!("the table maps, lists and races as another process only")
        }
    }
}
