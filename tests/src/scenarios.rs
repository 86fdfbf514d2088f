//! The scenario table: guards, files and the answers every backend must give. The agent's
//! kernel tests run it against fanotify on the host; the VM tests run it against BPF.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::agent::{Agent, AgentConfig};
use crate::target::{Access, Root, Target, BUSYBOX};
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
    /// Execute.
    Exec,
    /// Open for appending and write.
    Write,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    Allowed,
    Denied,
}

#[derive(Debug, Clone, Copy)]
pub struct Check {
    pub who: Who,
    pub op: Op,
    pub path: &'static str,
    pub expect: Expect,
    /// The path a deny line names: the guarded file's, for a file reached by another name.
    pub logged: &'static str,
}

const fn check(who: Who, op: Op, path: &'static str, expect: Expect) -> Check {
    Check {
        who,
        op,
        path,
        expect,
        logged: path,
    }
}

use Expect::{Allowed, Denied};
use Op::{Exec, Read, Write};
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
    pub checks: &'static [Check],
}

/// Every root starts with these files (path, content); `/data/bin/tool` is a script,
/// `/data/link` a symlink to `secret` and `/srv/alias` a hard link to `/data/secret`.
pub const FILES: &[(&str, &str)] = &[
    ("/data/secret", "secret"),
    ("/data/public", "public"),
    ("/data/sub/deep/file", "deep"),
    ("/srv/plain", "plain"),
];

pub const TABLE: &[Scenario] = &[
    Scenario {
        name: "deny-file",
        subjects: "  - deny: [/data/secret]\n    events: [open]\n",
        needs: Needs::Any,
        later: &[],
        checks: &[
            check(Other, Read, "/data/secret", Denied),
            check(Other, Read, "/data/public", Allowed),
            check(Other, Read, "/srv/plain", Allowed),
        ],
    },
    Scenario {
        name: "deny-directory-recursively",
        subjects: "  - deny: [/data]\n    events: [open]\n",
        needs: Needs::Any,
        later: &["/data/fresh"],
        checks: &[
            check(Other, Read, "/data/sub/deep/file", Denied),
            check(Other, Read, "/data/fresh", Denied),
            check(Other, Read, "/data/secret", Denied),
            check(Other, Read, "/srv/plain", Allowed),
        ],
    },
    Scenario {
        name: "longest-path-wins",
        subjects: "  - deny: [/data]\n    allow: [/data/public, /data/sub/deep]\n    events: [open]\n",
        needs: Needs::Any,
        later: &[],
        checks: &[
            check(Other, Read, "/data/public", Allowed),
            check(Other, Read, "/data/sub/deep/file", Allowed),
            check(Other, Read, "/data/secret", Denied),
        ],
    },
    Scenario {
        name: "deny-wins-at-equal-length",
        subjects: "  - allow: [/data/secret]\n    events: [open]\n  - deny: [/data/secret]\n    events: [open]\n",
        needs: Needs::Any,
        later: &[],
        checks: &[check(Other, Read, "/data/secret", Denied)],
    },
    Scenario {
        name: "auto-allow-owner",
        subjects: "  - deny: [/data/secret]\n    events: [open]\n    autoAllowOwner: true\n",
        needs: Needs::Any,
        later: &[],
        checks: &[
            check(Owner, Read, "/data/secret", Allowed),
            check(Other, Read, "/data/secret", Denied),
        ],
    },
    Scenario {
        name: "owner-denied-without-auto-allow",
        subjects: "  - deny: [/data/secret]\n    events: [open]\n",
        needs: Needs::Any,
        later: &[],
        checks: &[check(Owner, Read, "/data/secret", Denied)],
    },
    Scenario {
        name: "only-dir-skips-files",
        subjects: "  - deny: [/data/secret, /data/sub]\n    events: [open]\n    onlyDir: true\n",
        needs: Needs::Any,
        later: &[],
        checks: &[
            check(Other, Read, "/data/secret", Allowed),
            check(Other, Read, "/data/sub/deep/file", Denied),
        ],
    },
    Scenario {
        name: "exec",
        subjects: "  - deny: [/data/bin/tool]\n    events: [exec]\n",
        needs: Needs::Any,
        later: &[],
        checks: &[
            check(Other, Exec, "/data/bin/tool", Denied),
            check(Other, Read, "/data/bin/tool", Allowed),
        ],
    },
    Scenario {
        name: "access-denies-reads",
        subjects: "  - deny: [/data/secret]\n    events: [access]\n",
        needs: Needs::Any,
        later: &[],
        checks: &[
            check(Other, Read, "/data/secret", Denied),
            check(Other, Read, "/data/public", Allowed),
        ],
    },
    Scenario {
        name: "seed-all-events",
        subjects: "  - allow: [/data/public]\n    deny: [/data]\n    events: [all]\n",
        needs: Needs::Any,
        later: &[],
        checks: &[
            check(Other, Read, "/data/secret", Denied),
            check(Other, Read, "/data/public", Allowed),
        ],
    },
    Scenario {
        name: "symlink-resolved-inside-root",
        subjects: "  - deny: [/data/link]\n    events: [open]\n",
        needs: Needs::Any,
        later: &[],
        checks: &[
            check(Other, Read, "/data/secret", Denied),
            check(Other, Read, "/data/public", Allowed),
        ],
    },
    Scenario {
        name: "directories-created-later",
        subjects: "  - deny: [/data]\n    events: [open]\n",
        needs: Needs::Any,
        later: &["/data/new/a/b/file"],
        checks: &[
            check(Other, Read, "/data/new/a/b/file", Denied),
            check(Other, Read, "/srv/plain", Allowed),
        ],
    },
    Scenario {
        name: "mount-namespace-made-inside",
        subjects: "  - deny: [/data/secret]\n    events: [open]\n",
        needs: Needs::Any,
        later: &[],
        checks: &[
            check(Nested, Read, "/data/secret", Denied),
            check(Nested, Read, "/data/public", Allowed),
        ],
    },
    Scenario {
        name: "hard-link-to-a-guarded-file",
        subjects: "  - deny: [/data/secret]\n    events: [open]\n",
        needs: Needs::Any,
        later: &[],
        checks: &[
            Check {
                logged: "/data/secret",
                ..check(Other, Read, "/srv/alias", Denied)
            },
            check(Other, Read, "/srv/plain", Allowed),
        ],
    },
    Scenario {
        name: "modify",
        subjects: "  - deny: [/data/secret]\n    events: [modify]\n",
        needs: Needs::Bpf,
        later: &[],
        checks: &[
            check(Other, Write, "/data/secret", Denied),
            check(Other, Read, "/data/secret", Allowed),
        ],
    },
];

/// How long a check on a file made after the guard started may take to reach its expected
/// answer (the agent marks new directories as they appear). Any other check must be right
/// the first time.
pub const NEW_PATH_WINDOW: Duration = Duration::from_secs(1);

/// Lays out the standard files in `root`.
pub fn populate(root: &Root) -> Result<()> {
    for (path, content) in FILES {
        root.write(path, format!("{content}\n").as_bytes())?;
    }
    root.script("/data/bin/tool", "echo tool")?;
    root.symlink("/data/link", "secret")?;
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

/// Where and how scenarios run.
pub struct Runner<'a> {
    pub agent_bin: &'a Path,
    /// Arguments for the agent after the standard ones (e.g. `--backend bpf`).
    pub agent_args: &'a [&'a str],
    /// Whether the backend under test enforces `modify`.
    pub bpf: bool,
    /// Parent of the roots and agent directories.
    pub workdir: &'a Path,
}

impl Runner<'_> {
    /// The scenarios that apply to the backend under test.
    pub fn applicable(&self) -> impl Iterator<Item = &'static Scenario> + '_ {
        TABLE.iter().filter(|s| s.needs == Needs::Any || self.bpf)
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
        let root = Root::new(self.workdir, s.name)?;
        populate(&root)?;
        let mut target = Target::start(&root)?;
        let agent = Agent::start(
            &AgentConfig {
                bin: self.agent_bin,
                guard: &guard_yaml(s.name, s.subjects),
                pids: &[target.pid()],
                pod: "scenario-pod",
                node: "scenario-node",
                extra: self.agent_args,
            },
            &self.workdir.join(format!("agent-{}", s.name)),
        )?;
        for path in s.later {
            root.write(path, b"later\n")?;
        }
        for c in s.checks {
            let window = if s.later.contains(&c.path) {
                NEW_PATH_WINDOW
            } else {
                Duration::ZERO
            };
            let last = wait::until(
                &format!("{:?} {:?} {} to be {:?}", c.who, c.op, c.path, c.expect),
                window,
                || {
                    let got = attempt(&mut target, c).ok()?;
                    let ok = match c.expect {
                        Expect::Denied => got == Access::Denied,
                        Expect::Allowed => matches!(got, Access::Ok(_)),
                    };
                    ok.then_some(got)
                },
            );
            if let Err(e) = last {
                let got = attempt(&mut target, c)?;
                bail!(
                    "{e}; last answer: {got:?}\nagent stderr:\n{}",
                    agent.stderr()
                );
            }
            if c.expect == Expect::Denied {
                let quoted = format!("'{}'", c.logged);
                agent.wait_line(&format!("a DENY line for {}", c.logged), |l| {
                    l.starts_with("<DENY>") && l.contains(&quoted)
                })?;
            }
        }
        let status = agent.stop()?;
        if !status.success() {
            bail!("the agent exited with {status} after SIGTERM");
        }
        target.kill()?;
        Ok(())
    }
}

/// Does what `c` says once and reports the answer.
pub fn attempt(target: &mut Target, c: &Check) -> Result<Access> {
    match (c.who, c.op) {
        (Who::Owner, Op::Read) => target.owner_read(c.path),
        (Who::Owner, Op::Write) => target.owner_run(&format!("echo x >> '{}'", c.path)),
        (Who::Owner, Op::Exec) => target.owner_run(&format!("exec_check=$('{}')", c.path)),
        (Who::Other, Op::Read) => target.cat(c.path),
        (Who::Nested, Op::Read) => target.exec(&[BUSYBOX, "unshare", "-m", BUSYBOX, "cat", c.path]),
        (Who::Nested, _) => bail!("the table only reads from a nested mount namespace"),
        (Who::Other, Op::Exec) => target.exec(&[c.path]),
        (Who::Other, Op::Write) => {
            target.exec(&[BUSYBOX, "sh", "-c", &format!("echo x >> '{}'", c.path)])
        }
    }
}
