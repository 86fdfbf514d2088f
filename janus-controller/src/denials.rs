//! Denials on the guard: the agents count them per container, the controller sums them per
//! pod into the guard's status and turns what is new into at most one Event per guard and
//! pod per window, however many denials there were.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use janus_api::agent_v1::GuardStatus;

use crate::crd::LastDenial;

/// One pod's denials under one guard, summed over its containers; or a guard's, summed
/// over its pods.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PodDenials {
    pub count: u64,
    pub last: Option<LastDenial>,
}

impl PodDenials {
    /// What an agent reports of pod `pod` (named by the controller, not by the agent),
    /// bounded: a compromised node's agent can claim anything of its own pods, but not a
    /// status the API server refuses, nor an overflow, nor as the last denial one at a
    /// time that is not RFC 3339 or is ahead of `now` (which would keep it last).
    pub fn of(status: &GuardStatus, pod: &str, now: DateTime<Utc>) -> PodDenials {
        let mut d = PodDenials::default();
        for c in &status.containers {
            d.add(PodDenials {
                count: c.denials,
                last: denial_time(&c.last_denied_at, now).map(|at| LastDenial {
                    pod: pod.to_owned(),
                    by: cut(&c.last_denied_by, MAX_BY),
                    pid: c.last_denied_pid,
                    at,
                }),
            });
        }
        d
    }

    /// Adds `other`'s denials to these: the counts sum (saturating), the later last
    /// denial stays.
    pub fn add(&mut self, other: PodDenials) {
        self.count = self.count.saturating_add(other.count);
        if other
            .last
            .as_ref()
            .is_some_and(|o| self.last.as_ref().is_none_or(|l| l.at < o.at))
        {
            self.last = other.last;
        }
    }
}

/// How far ahead of the controller's clock a node's may be.
const CLOCK_SKEW: chrono::TimeDelta = chrono::TimeDelta::minutes(5);

/// `at` as the status writes it (RFC 3339 in UTC to the millisecond, whose text orders as
/// the time does), if it is a time and not ahead of `now`.
fn denial_time(at: &str, now: DateTime<Utc>) -> Option<String> {
    let at = DateTime::parse_from_rfc3339(at).ok()?.with_timezone(&Utc);
    (at <= now + CLOCK_SKEW).then(|| at.to_rfc3339_opts(SecondsFormat::Millis, true))
}

/// The longest executable name kept, in bytes (a path may be 4,096; an Event note 1,024).
const MAX_BY: usize = 512;

/// `s` in at most `max` bytes (the API server counts bytes), cut on a character boundary
/// and marked with `…` where it was cut.
pub(crate) fn cut(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// What the last Event of one guard and pod reported.
#[derive(Debug, Clone, Copy)]
struct Reported {
    /// The pod's count when it was sent.
    count: u64,
    at: Instant,
}

/// At most this many denial Events per window for the whole cluster: a thousand pods
/// denying at once wait their turn rather than become a thousand API writes.
pub const EVENTS_PER_WINDOW: u32 = 30;

/// An Event due: its note, and what to undo if it cannot be recorded.
#[derive(Debug)]
pub struct Due {
    pub note: String,
    key: (String, String),
    before: Option<Reported>,
}

/// Decides which Events are due; the caller records them.
pub struct DenialEvents {
    window: Duration,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// By (guard UID, pod name): a guard's pods are in its namespace.
    reported: BTreeMap<(String, String), Reported>,
    /// Events sent in the current window, and when it began.
    sent: u32,
    since: Option<Instant>,
}

impl DenialEvents {
    pub fn new(window: Duration) -> DenialEvents {
        DenialEvents {
            window,
            state: Mutex::new(State::default()),
        }
    }

    /// The Event due for this guard and pod now, if any: the denials counted since the last
    /// one, once a window has passed since it. A count that went down (the agent restarted,
    /// or the guard was placed again) starts again from 0. It counts as reported unless
    /// given back with [`DenialEvents::unsent`].
    pub fn due(&self, guard_uid: &str, pod: &str, d: &PodDenials, now: Instant) -> Option<Due> {
        let mut state = self.state.lock().expect("denials lock");
        let State {
            reported,
            sent,
            since: began,
        } = &mut *state;
        if began.is_none_or(|b| now.duration_since(b) >= self.window) {
            (*sent, *began) = (0, Some(now));
        }
        let key = (guard_uid.to_owned(), pod.to_owned());
        let (since, before) = match reported.get(&key) {
            Some(r) if now.duration_since(r.at) < self.window => return None,
            Some(r) if d.count < r.count => (Some(now.duration_since(r.at)), 0),
            Some(r) => (Some(now.duration_since(r.at)), r.count),
            None => (None, 0),
        };
        let new = d.count - before;
        if new == 0 {
            // Nothing new: the last report stays where it was.
            if let Some(r) = reported.get_mut(&key) {
                r.count = d.count;
            }
            return None;
        }
        if *sent >= EVENTS_PER_WINDOW {
            // Still new at the next pass after the cluster's window.
            return None;
        }
        *sent += 1;
        let before = reported.insert(
            key.clone(),
            Reported {
                count: d.count,
                at: now,
            },
        );
        let plural = if new == 1 { "" } else { "s" };
        let mut note = match since {
            Some(s) => format!(
                "{new} denial{plural} in pod {pod} in the last {}s",
                s.as_secs()
            ),
            None => format!("{new} denial{plural} in pod {pod}"),
        };
        if let Some(l) = &d.last {
            note.push_str(&format!(", last by {} pid {} at {}", l.by, l.pid, l.at));
        }
        Some(Due { note, key, before })
    }

    /// An Event that could not be recorded: what it reported is still new, and due again
    /// at the next pass.
    pub fn unsent(&self, due: Due) {
        let mut state = self.state.lock().expect("denials lock");
        match due.before {
            Some(r) => state.reported.insert(due.key, r),
            None => state.reported.remove(&due.key),
        };
    }

    /// Forgets the guards and pods not in `live`.
    pub fn retain(&self, live: impl Fn(&str, &str) -> bool) {
        self.state
            .lock()
            .expect("denials lock")
            .reported
            .retain(|(g, p), _| live(g, p));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(count: u64) -> PodDenials {
        PodDenials {
            count,
            last: Some(LastDenial {
                pod: "web-1".into(),
                by: "/usr/bin/cat".into(),
                pid: 4242,
                at: "2026-12-04T11:00:00Z".into(),
            }),
        }
    }

    #[test]
    fn one_event_per_window_with_what_is_new() {
        let e = DenialEvents::new(Duration::from_secs(60));
        let t0 = Instant::now();
        assert_eq!(
            note(e.due("g", "web-1", &pod(3), t0)).as_deref(),
            Some("3 denials in pod web-1, last by /usr/bin/cat pid 4242 at 2026-12-04T11:00:00Z")
        );
        // Within the window: held back, and counted in the next one.
        assert_eq!(
            note(e.due("g", "web-1", &pod(500), t0 + Duration::from_secs(30))),
            None
        );
        let later = note(e.due("g", "web-1", &pod(10_003), t0 + Duration::from_secs(61)));
        assert!(
            later
                .as_deref()
                .is_some_and(|n| n.starts_with("10000 denials in pod web-1 in the last 61s")),
            "{later:?}"
        );
        // Nothing new: nothing to say.
        assert_eq!(
            note(e.due("g", "web-1", &pod(10_003), t0 + Duration::from_secs(200))),
            None
        );
        // Another pod has its own window.
        assert!(e
            .due("g", "q", &pod(1), t0 + Duration::from_secs(30))
            .is_some());
    }

    #[test]
    fn the_cluster_gets_a_bounded_number_per_window() {
        let e = DenialEvents::new(Duration::from_secs(60));
        let t0 = Instant::now();
        let sent = (0..1000)
            .filter(|i| e.due("g", &i.to_string(), &pod(1), t0).is_some())
            .count();
        assert_eq!(sent, EVENTS_PER_WINDOW as usize);
        // The pods held back are reported in the next window.
        let t1 = t0 + Duration::from_secs(60);
        assert!(e.due("g", "999", &pod(1), t1).is_some());
    }

    #[test]
    fn what_an_agent_claims_is_bounded() {
        use janus_api::agent_v1::ContainerStatus;
        let huge = ContainerStatus {
            denials: u64::MAX,
            last_denied_by: "é".repeat(1 << 20),
            last_denied_pid: 1,
            last_denied_at: "2026-12-04T10:00:00.5+01:00".into(),
            ..Default::default()
        };
        let status = GuardStatus {
            // What the agent says its pod is does not matter.
            pod_name: "another-pod".into(),
            containers: vec![huge.clone(), huge],
            ..Default::default()
        };
        let now = "2026-12-04T09:01:00Z".parse().unwrap();
        let d = PodDenials::of(&status, "web-1", now);
        assert_eq!(d.count, u64::MAX);
        let last = d.last.unwrap();
        assert_eq!(
            (last.pod.as_str(), last.at.as_str()),
            ("web-1", "2026-12-04T09:00:00.500Z")
        );
        assert!(last.by.len() <= MAX_BY);
        assert!(
            last.by.ends_with("é…"),
            "cut on a character boundary: {}",
            last.by
        );
    }

    #[test]
    fn a_last_denial_at_no_time_or_ahead_of_the_clock_is_not_the_last() {
        use janus_api::agent_v1::ContainerStatus;
        let at = |at: &str| ContainerStatus {
            denials: 1,
            last_denied_by: "/bin/cat".into(),
            last_denied_at: at.into(),
            ..Default::default()
        };
        let status = GuardStatus {
            containers: vec![
                at("9".repeat(1 << 20).as_str()),
                at("2026-12-04 09:00"),
                at("2126-01-01T00:00:00Z"),
                at(""),
            ],
            ..Default::default()
        };
        let now = "2026-12-04T09:01:00Z".parse().unwrap();
        let d = PodDenials::of(&status, "web-1", now);
        assert_eq!((d.count, d.last), (4, None));
    }

    #[test]
    fn a_count_that_starts_again_is_new() {
        let e = DenialEvents::new(Duration::from_secs(60));
        let t0 = Instant::now();
        assert!(e.due("g", "web-1", &pod(100), t0).is_some());
        let seven = note(e.due("g", "web-1", &pod(7), t0 + Duration::from_secs(61)));
        assert!(seven.is_some_and(|n| n.starts_with("7 denials")));
    }

    #[test]
    fn an_event_not_recorded_is_due_again_with_its_denials() {
        let e = DenialEvents::new(Duration::from_secs(60));
        let t0 = Instant::now();
        let first = e.due("g", "web-1", &pod(5), t0).expect("due");
        e.unsent(first);
        let again = note(e.due("g", "web-1", &pod(8), t0 + Duration::from_secs(1)));
        assert!(again.is_some_and(|n| n.starts_with("8 denials in pod web-1,")));
        // Recorded this time: the next window reports only what is new.
        let next = note(e.due("g", "web-1", &pod(9), t0 + Duration::from_secs(62)));
        assert!(next.is_some_and(|n| n.starts_with("1 denial in pod web-1 in the last 61s")));
    }

    fn note(due: Option<Due>) -> Option<String> {
        due.map(|d| d.note)
    }
}
