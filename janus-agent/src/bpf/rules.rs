//! Turns a guard's rules, resolved inside a container, into entries of the `RULES` map.

use std::collections::HashMap;

use janus_api::decide::{Rule as ApiRule, RuleSet, Verdict};
use janus_api::{Event, GuardPolicy, Mode};
use janus_common::{
    EventRule, InodeKey, Rule, EVENTS, RULE_AUDIT, RULE_AUTO_ALLOW_OWNER, RULE_IS_DIR,
    RULE_MONITOR, RULE_ONLY_DIR, VERDICT_ALLOW, VERDICT_DENY, VERDICT_NONE,
};

/// One guarded path after resolution: what the kernel will find on its walk up.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub key: InodeKey,
    pub is_dir: bool,
    /// The canonical path inside the container, to render log lines.
    pub path: Vec<u8>,
}

/// The map entries of one guard and the paths to print for each key.
#[derive(Debug, Default)]
pub struct Table {
    pub rules: HashMap<InodeKey, Rule>,
    pub paths: HashMap<InodeKey, Vec<u8>>,
}

impl Table {
    /// Adds `rule` at `at`, among the enforced or the monitored rules by its mode. Two
    /// rules on one inode have the same path length (they are the same path), so deny wins
    /// there; longer paths win in the kernel by being met first on the walk up. A subject
    /// with onlyDir guards directories only, as under fanotify.
    pub fn add(&mut self, guard: &GuardPolicy, rule: &ApiRule, at: &Resolved) {
        if guard.subjects[rule.subject].only_dir && !at.is_dir {
            return;
        }
        self.add_events(guard, rule, at, rule.events.iter());
    }

    /// Keys a file that has names outside the guarded directory it lies in (a hard link
    /// made before the guard): the walk up from such a name never meets the directory, so
    /// the file gets a rule of its own, per event and mode what `rules` (resolved paths)
    /// decide for it where it lies (onlyDir or not: the directory covers it).
    pub fn add_linked(&mut self, guard: &GuardPolicy, rules: &RuleSet, at: &Resolved) {
        for event in Event::ALL.into_iter().take(EVENTS) {
            for mode in Mode::ALL {
                let winner = rules.rules().iter().find(|r| {
                    r.mode == mode && r.events.contains(event) && r.path.covers(&at.path)
                });
                if let Some(r) = winner {
                    self.add_events(guard, r, at, std::iter::once(event));
                }
            }
        }
    }

    fn add_events(
        &mut self,
        guard: &GuardPolicy,
        rule: &ApiRule,
        at: &Resolved,
        events: impl Iterator<Item = Event>,
    ) {
        let subject = &guard.subjects[rule.subject];
        let mut flags = 0;
        if subject.auto_allow_owner {
            flags |= RULE_AUTO_ALLOW_OWNER;
        }
        if subject.audit {
            flags |= RULE_AUDIT;
        }
        if subject.only_dir {
            flags |= RULE_ONLY_DIR;
        }
        if at.is_dir {
            flags |= RULE_IS_DIR;
        }
        if subject.mode == Mode::Monitor {
            flags |= RULE_MONITOR;
        }
        let verdict = match rule.verdict {
            Verdict::Allow => VERDICT_ALLOW,
            Verdict::Deny => VERDICT_DENY,
        };
        let entry = self.rules.entry(at.key).or_default();
        let slots = match subject.mode {
            Mode::Enforce => &mut entry.events,
            Mode::Monitor => &mut entry.monitor,
        };
        for event in events {
            let slot = &mut slots[event_index(event)];
            if slot.verdict == VERDICT_NONE
                || (verdict == VERDICT_DENY && slot.verdict != VERDICT_DENY)
            {
                *slot = EventRule {
                    verdict,
                    flags,
                    subject: rule.subject as u16,
                };
            }
        }
        self.paths.entry(at.key).or_insert_with(|| at.path.clone());
    }
}

/// The slot of `event` in [`Rule::events`] (`janus_common::EV_*`).
pub fn event_index(event: Event) -> usize {
    event as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use janus_api::decide::RuleSet;
    use janus_api::guard::parse_documents;
    use janus_common::{EV_ACCESS, EV_MODIFY, EV_OPEN};

    fn policy(yaml: &str) -> GuardPolicy {
        GuardPolicy::from_guard(&parse_documents(yaml).unwrap()[0]).unwrap()
    }

    /// Inode `ino` of scope 1, at `path`.
    fn resolved(ino: u64, is_dir: bool, path: &str) -> Resolved {
        Resolved {
            key: InodeKey {
                ino,
                dev: 9,
                scope: 1,
            },
            is_dir,
            path: path.as_bytes().to_vec(),
        }
    }

    const GUARD: &str = r#"
apiVersion: januscontroller.clustergarage.io/v1alpha1
kind: JanusGuard
metadata: {name: g}
spec:
  selector: {matchLabels: {app: x}}
  subjects:
  - allow: [/data]
    events: [open]
  - deny: [/data]
    events: [open, modify]
    autoAllowOwner: true
  - deny: [/only]
    events: [open]
    onlyDir: true
"#;

    #[test]
    fn deny_wins_on_one_inode_and_only_dir_skips_files() {
        let p = policy(GUARD);
        let mut t = Table::default();
        let (dir, file) = (resolved(5, true, "/data"), resolved(6, false, "/only"));
        for r in RuleSet::from_policy(&p).rules() {
            let at = if r.path.as_bytes() == b"/data" {
                &dir
            } else {
                &file
            };
            t.add(&p, r, at);
        }
        let rule = t.rules[&dir.key];
        assert_eq!(rule.events[EV_OPEN].verdict, VERDICT_DENY);
        assert_eq!(rule.events[EV_OPEN].subject, 1);
        assert_ne!(rule.events[EV_OPEN].flags & RULE_AUTO_ALLOW_OWNER, 0);
        assert_eq!(rule.events[EV_MODIFY].verdict, VERDICT_DENY);
        assert_eq!(rule.events[EV_ACCESS].verdict, VERDICT_NONE);
        assert!(!t.rules.contains_key(&file.key), "onlyDir must skip a file");
        assert_eq!(t.paths[&dir.key], b"/data");
    }

    #[test]
    fn enforced_and_monitored_rules_of_one_inode_are_kept_apart() {
        let p = policy(
            "apiVersion: januscontroller.clustergarage.io/v1alpha1\nkind: JanusGuard\n\
             metadata: {name: g}\nspec:\n  selector: {}\n  subjects:\n\
             \x20 - {deny: [/data], mode: monitor}\n\
             \x20 - {deny: [/data], mode: enforce}\n",
        );
        let at = resolved(5, true, "/data");
        let rules = RuleSet::from_policy(&p);
        // Added in either order, the map holds both.
        for reversed in [false, true] {
            let mut t = Table::default();
            let mut order: Vec<_> = rules.rules().iter().collect();
            if reversed {
                order.reverse();
            }
            for r in order {
                t.add(&p, r, &at);
            }
            let rule = t.rules[&at.key];
            let (enforced, monitored) = (rule.events[EV_OPEN], rule.monitor[EV_OPEN]);
            assert_eq!(
                (enforced.verdict, monitored.verdict),
                (VERDICT_DENY, VERDICT_DENY)
            );
            assert_eq!((enforced.flags & RULE_MONITOR, enforced.subject), (0, 1));
            assert_eq!(
                (monitored.flags & RULE_MONITOR, monitored.subject),
                (RULE_MONITOR, 0)
            );
        }
    }

    #[test]
    fn a_linked_file_below_an_only_dir_directory_is_keyed() {
        let p = policy(GUARD);
        let rules = RuleSet::from_policy(&p);
        let mut t = Table::default();
        let linked = resolved(7, false, "/only/f");
        t.add_linked(&p, &rules, &linked);
        assert_eq!(t.rules[&linked.key].events[EV_OPEN].verdict, VERDICT_DENY);
    }
}
