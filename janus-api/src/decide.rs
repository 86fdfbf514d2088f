//! The decision rule every backend implements: among the guarded paths that contain the
//! file and guard the event, the longest wins; at equal length deny wins; `autoAllowOwner`
//! turns the owner's deny into an allow. Subjects in `monitor` mode never change what the
//! kernel is told: the answer is the enforced subjects' alone, and a monitored deny that
//! would have refused what they let through is reported as such.

use crate::policy::{Event, EventSet, GuardPath, GuardPolicy, Mode};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    Allow,
    Deny,
}

impl Verdict {
    /// As `{response}` prints it.
    pub fn as_upper(self) -> &'static str {
        match self {
            Verdict::Allow => "ALLOW",
            Verdict::Deny => "DENY",
        }
    }
    /// As the `response` metric label carries it.
    pub fn as_lower(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
        }
    }
}

/// One guarded path of one subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub path: GuardPath,
    pub verdict: Verdict,
    /// Index into [`GuardPolicy::subjects`].
    pub subject: usize,
    pub events: EventSet,
    pub auto_allow_owner: bool,
    pub mode: Mode,
}

/// The outcome for one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    pub subject: usize,
    /// The rule said deny but the owner asked, and the subject has `autoAllowOwner`.
    pub by_owner: bool,
    pub mode: Mode,
}

impl Decision {
    /// Whether the kernel is told to refuse.
    pub fn refuses(&self) -> bool {
        self.verdict == Verdict::Deny && self.mode == Mode::Enforce
    }

    /// Which of two decisions on one object (by two of its names) to report: a refusal,
    /// else a would-be refusal, else the first.
    pub fn rank(&self) -> u8 {
        match (self.verdict, self.mode) {
            (Verdict::Deny, Mode::Enforce) => 2,
            (Verdict::Deny, Mode::Monitor) => 1,
            (Verdict::Allow, _) => 0,
        }
    }
}

/// The rules of one guard in match order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuleSet {
    rules: Vec<Rule>,
    /// Whether any rule is in monitor mode (else one pass decides).
    monitored: bool,
}

impl RuleSet {
    pub fn new(mut rules: Vec<Rule>) -> RuleSet {
        // Longest first, deny before allow: the first covering rule of a mode is then that
        // mode's winner.
        rules.sort_by_key(|r| {
            (
                std::cmp::Reverse(r.path.as_bytes().len()),
                r.verdict != Verdict::Deny,
            )
        });
        let monitored = rules.iter().any(|r| r.mode == Mode::Monitor);
        RuleSet { rules, monitored }
    }

    /// The rules as written, before any backend resolved them inside a container.
    pub fn from_policy(policy: &GuardPolicy) -> RuleSet {
        let mut rules = Vec::new();
        for (i, s) in policy.subjects.iter().enumerate() {
            for (paths, verdict) in [(&s.allow, Verdict::Allow), (&s.deny, Verdict::Deny)] {
                rules.extend(paths.iter().map(|p| Rule {
                    path: p.clone(),
                    verdict,
                    subject: i,
                    events: s.events,
                    auto_allow_owner: s.auto_allow_owner,
                    mode: s.mode,
                }));
            }
        }
        RuleSet::new(rules)
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The decision for `event` on the file at `path` (as the container sees it), or `None`
    /// when no rule guards it: the enforced rules' (longest path first), unless it lets the
    /// access through and the monitored rules' would refuse it.
    pub fn decide(&self, path: &[u8], event: Event, is_owner: bool) -> Option<Decision> {
        let covering = self
            .rules
            .iter()
            .filter(|r| r.events.contains(event) && r.path.covers(path));
        let by_mode = |mode| covering.clone().find(|r| r.mode == mode);
        let outcome = |rule: &Rule| {
            let by_owner = rule.verdict == Verdict::Deny && is_owner && rule.auto_allow_owner;
            Decision {
                verdict: if by_owner {
                    Verdict::Allow
                } else {
                    rule.verdict
                },
                subject: rule.subject,
                by_owner,
                mode: rule.mode,
            }
        };
        if !self.monitored {
            return covering.clone().next().map(outcome);
        }
        let enforced = by_mode(Mode::Enforce).map(outcome);
        let monitored = by_mode(Mode::Monitor).map(outcome);
        match (enforced, monitored) {
            (Some(e), _) if e.refuses() => Some(e),
            (_, Some(m)) if m.verdict == Verdict::Deny => Some(m),
            (e, m) => e.or(m),
        }
    }
}
