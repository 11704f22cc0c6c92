//! One clock for every wait the controllers make: this process's monotonic clock.
//!
//! A failover threshold, a probe deadline or a witness lapse is a duration, and a duration is measured
//! here between two readings of the same monotonic clock, never between a time another machine wrote (a
//! kubelet's `lastTransitionTime`, a status field another operator replica wrote) and this machine's wall
//! clock, and never across a step of the wall clock (NTP, a clock set back). Readings are expressed as
//! [`Timestamp`]s anchored at the wall clock when the process started, so the pure decision code keeps
//! working with timestamps and status still shows recognisable times.
//!
//! [`FirstSeen`] remembers, per thing watched, when this process first saw it in a state (the active
//! replica of a LUN lost, for example). What it remembers is in memory only: after a restart, or on a new
//! leader, a wait starts again from the first observation, which can delay a failover by one threshold but
//! never bring it forward.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use jiff::{SignedDuration, Timestamp};

/// This process's monotonic clock, read as timestamps.
#[derive(Debug)]
pub struct Monotonic {
    wall_at_start: Timestamp,
    start: Instant,
    /// Added to every reading: tests move the clock forward instead of sleeping.
    advanced_ms: AtomicU64,
}

impl Default for Monotonic {
    fn default() -> Self {
        Self {
            wall_at_start: Timestamp::now(),
            start: Instant::now(),
            advanced_ms: AtomicU64::new(0),
        }
    }
}

impl Monotonic {
    /// Now: the wall clock at start plus the monotonic time elapsed since. Two readings differ by the
    /// time that really passed between them.
    pub fn now(&self) -> Timestamp {
        let elapsed =
            self.start.elapsed() + Duration::from_millis(self.advanced_ms.load(Ordering::Relaxed));
        self.wall_at_start + SignedDuration::try_from(elapsed).unwrap_or(SignedDuration::MAX)
    }

    /// Moves the clock forward by `d` (tests: a threshold waited out without sleeping).
    pub fn advance(&self, d: Duration) {
        self.advanced_ms
            .fetch_add(d.as_millis() as u64, Ordering::Relaxed);
    }
}

/// When this process first saw each key in its current state, on the [`Monotonic`] clock.
#[derive(Debug, Default)]
pub struct FirstSeen {
    /// key -> (state, first seen).
    seen: Mutex<HashMap<String, (String, Timestamp)>>,
}

impl FirstSeen {
    /// `key` is in `state` at `now`: returns since when this process has seen it so, without a break.
    /// Another state (the lost replica is another one) starts again at `now`.
    pub fn since(&self, key: &str, state: &str, now: Timestamp) -> Timestamp {
        let mut seen = self.seen.lock().expect("first-seen lock");
        match seen.get(key) {
            Some((s, at)) if s == state => *at,
            _ => {
                seen.insert(key.to_string(), (state.to_string(), now));
                now
            }
        }
    }

    /// `key` is no longer in any watched state.
    pub fn clear(&self, key: &str) {
        self.seen.lock().expect("first-seen lock").remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_move_with_elapsed_time_and_with_advance() {
        let c = Monotonic::default();
        let a = c.now();
        c.advance(Duration::from_secs(30));
        let b = c.now();
        let d = b.duration_since(a).as_secs_f64();
        assert!((30.0..31.0).contains(&d), "{d}");
        assert!((a.as_second() - Timestamp::now().as_second()).abs() <= 1);
    }

    #[test]
    fn first_seen_keeps_the_first_time_until_the_state_changes_or_clears() {
        let f = FirstSeen::default();
        let t = |s: i64| Timestamp::from_second(1_700_000_000 + s).unwrap();
        assert_eq!(f.since("lun", "pod-0", t(0)), t(0));
        assert_eq!(f.since("lun", "pod-0", t(10)), t(0));
        assert_eq!(
            f.since("lun", "pod-1", t(20)),
            t(20),
            "another replica lost"
        );
        f.clear("lun");
        assert_eq!(f.since("lun", "pod-1", t(30)), t(30));
    }
}
