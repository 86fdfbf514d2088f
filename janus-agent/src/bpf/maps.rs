//! The kernel maps the agent fills: each target's rules, root and scope, placed all or
//! nothing, and what they can hold.

use std::collections::{HashMap as StdHashMap, HashSet};
use std::os::fd::AsFd;
use std::time::Duration;

use aya::maps::{HashMap, MapData};
use janus_common::{InodeKey, Rule, Scope, MAX_RULES, MAX_SCOPES};

use super::{share, PlaceError};
use crate::resolve::{self, FileId};

/// How long a lifted guard's entry stays for records still in the ring.
pub(super) const RETIRED_FOR: Duration = Duration::from_secs(10);

pub(super) struct Maps {
    pub(super) scopes: HashMap<MapData, u32, Scope>,
    pub(super) roots: HashMap<MapData, InodeKey, u32>,
    pub(super) rules: HashMap<MapData, InodeKey, Rule>,
    pub(super) shares: share::Shares,
    pub(super) capacity: Capacity,
    pub(super) rule_count: u32,
    pub(super) next_target: u32,
}

/// How many entries the kernel maps hold, set when the programs are loaded. The maps are
/// preallocated, so this is kernel memory the node spends whether used or not (about 100
/// bytes an entry, BENCHMARKS.md); a target that does not fit goes to fanotify, counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::Args)]
pub struct Capacity {
    /// Rule map entries for the node: one per guarded path of each target, and per file
    /// with other names below a guarded directory.
    #[arg(long = "bpf-max-rules", default_value_t = MAX_RULES,
          value_parser = clap::value_parser!(u32).range(1..=1 << 20))]
    pub rules: u32,
    /// Targets (a guard on one container) the BPF backend holds at once.
    #[arg(long = "bpf-max-targets", default_value_t = MAX_SCOPES,
          value_parser = clap::value_parser!(u32).range(1..=1 << 16))]
    pub targets: u32,
}

impl Capacity {
    /// Entries of the programs' `TALLIES` and `DRAINED`: a target's share of the decision
    /// ring outlives it while its lifted guard is kept (`RETIRED_FOR`).
    pub(super) fn share_slots(self) -> u32 {
        2 * self.targets
    }
}

impl Default for Capacity {
    fn default() -> Self {
        Capacity {
            rules: MAX_RULES,
            targets: MAX_SCOPES,
        }
    }
}

impl Maps {
    /// Inserts a guard's rules, its root and, last, its scope (until then the kernel ignores
    /// the rules); all or nothing: on an error, the map holds what it held before. `old` are
    /// the keys of the guard it replaces on the same scope: its rules are overwritten in
    /// place, the scope entry then names the new guard, and the keys only it had go last,
    /// so every object either guard covers is decided all along.
    pub(super) fn place(
        &mut self,
        rules: &StdHashMap<InodeKey, Rule>,
        root: InodeKey,
        scope_id: u32,
        scope: Scope,
        old: &HashSet<InodeKey>,
    ) -> Result<(), PlaceError> {
        let mut undo = Vec::with_capacity(rules.len());
        let mut result = Ok(());
        for (key, rule) in rules {
            let before = self.rules.get(key, 0).ok();
            if let Err(e) = self.rules.insert(key, rule, 0) {
                result = Err(map_error("RULES")(e));
                break;
            }
            undo.push((*key, before));
        }
        let root_before = self.roots.get(&root, 0).ok();
        if result.is_ok() {
            result = self
                .roots
                .insert(root, scope_id, 0)
                .map_err(map_error("ROOTS"));
        }
        if result.is_ok() {
            result = self
                .scopes
                .insert(scope_id, scope, 0)
                .map_err(map_error("SCOPES"));
        }
        if result.is_err() {
            for (key, before) in undo {
                let _ = match before {
                    Some(rule) => self.rules.insert(key, rule, 0),
                    None => self.rules.remove(&key),
                };
            }
            let _ = match root_before {
                Some(s) => self.roots.insert(root, s, 0),
                None => self.roots.remove(&root),
            };
            return result;
        }
        // Counted by what the map did: a guard's keys include names that have no rule.
        self.rule_count += undo.iter().filter(|(_, before)| before.is_none()).count() as u32;
        for key in old.iter().filter(|k| !rules.contains_key(k)) {
            if self.rules.remove(key).is_ok() {
                self.rule_count -= 1;
            }
        }
        Ok(())
    }
}

/// The kernel's identity of an inode from what `stat` gives in user space: its `(st_dev,
/// st_ino)`, in the kernel's `dev_t` encoding.
pub(super) fn stat_key(id: FileId, scope: u32) -> InodeKey {
    InodeKey {
        ino: id.ino,
        dev: InodeKey::kernel_dev(libc::major(id.dev), libc::minor(id.dev)),
        scope,
    }
}

/// The files below the guarded directories `dirs` that have more than one name, with the
/// name they have there: a hard link elsewhere, made before the guard, is a name whose walk
/// up never meets the directory.
pub(super) fn linked_files(
    dirs: Vec<(std::os::fd::OwnedFd, janus_api::GuardPath)>,
    scope: u32,
) -> Vec<(InodeKey, janus_api::GuardPath)> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut stack = dirs;
    while let Some((dir, path)) = stack.pop() {
        resolve::for_each_entry(dir.as_fd(), |name, fd| {
            let (Ok(st), Some(p)) = (resolve::statx(fd.as_fd()), path.join(name)) else {
                return;
            };
            // A bind mount onto a descendant must not loop the walk.
            if !seen.insert(FileId::of(&st)) || resolve::on_kernel_fs(fd.as_fd()) {
                return;
            }
            if resolve::is_dir(&st) {
                stack.push((fd, p));
            } else if st.stx_nlink > 1 {
                out.push((stat_key(FileId::of(&st), scope), p));
            }
        });
    }
    out
}

/// How a map update failed, naming the map.
pub(super) fn map_error(map: &'static str) -> impl FnOnce(aya::maps::MapError) -> PlaceError {
    move |source| PlaceError::Map { map, source }
}

#[cfg(test)]
mod tests {
    use aya::maps::Array;
    use janus_common::{EventRule, VERDICT_ALLOW, VERDICT_DENY};

    use super::*;

    /// Real kernel maps (the agent's tests run as root), the scope map holding one target.
    fn maps() -> Maps {
        let capacity = Capacity {
            rules: 8,
            targets: 1,
        };
        let slots = capacity.share_slots();
        Maps {
            scopes: HashMap::create(capacity.targets, 0).expect("a hash map"),
            roots: HashMap::create(4, 0).expect("a hash map"),
            rules: HashMap::create(capacity.rules, 0).expect("a hash map"),
            shares: share::Shares::new(
                Array::create(slots, 0).expect("an array"),
                Array::create(slots, 0).expect("an array"),
            ),
            capacity,
            rule_count: 0,
            next_target: 1,
        }
    }

    fn key(ino: u64) -> InodeKey {
        InodeKey {
            ino,
            dev: 1,
            scope: 0,
        }
    }

    fn rule(verdict: u8) -> Rule {
        let mut r = Rule::default();
        r.events[0] = EventRule {
            verdict,
            ..EventRule::default()
        };
        r
    }

    #[test]
    fn a_late_insert_that_fails_leaves_the_maps_as_they_were() {
        let mut m = maps();
        let first = StdHashMap::from([(key(1), rule(VERDICT_DENY))]);
        m.place(&first, key(100), 1, Scope::default(), &HashSet::new())
            .expect("the first target fits");
        // A second target's rules (one new, one over the first's) and root go in, then its
        // scope does not fit: everything it placed must be taken back.
        let second =
            StdHashMap::from([(key(1), rule(VERDICT_ALLOW)), (key(2), rule(VERDICT_DENY))]);
        let err = m
            .place(&second, key(200), 2, Scope::default(), &HashSet::new())
            .expect_err("the scope map is full");
        assert!(
            matches!(err, PlaceError::Map { map: "SCOPES", .. }),
            "{err}"
        );
        let rules: Vec<_> = m.rules.iter().map(|r| r.expect("an entry")).collect();
        assert_eq!(rules, [(key(1), rule(VERDICT_DENY))]);
        let roots: Vec<_> = m.roots.iter().map(|r| r.expect("an entry")).collect();
        assert_eq!(roots, [(key(100), 1)]);
        assert_eq!(m.rule_count, 1);
        assert!(m.scopes.get(&2, 0).is_err());
    }
}
