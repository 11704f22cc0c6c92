//! Which mounted configuration the agent has applied, and retrying one it could not apply.
//!
//! A configuration counts as applied only once every file is rendered, every map compiled and every
//! reload done. One that fails (a `postmap` or a reload that fails, a full disk) is tried again with
//! exponential backoff, from [`FIRST_RETRY`] up to [`MAX_RETRY`], until it applies or the mounted
//! configuration changes again (which is tried at once). While it fails, the pod reports it: the
//! `mailpod_config_apply_failures_total` counter, `mailpod_config_pending` at 1, and `/readyz` answers 503
//! naming the error, since a pod serving stale access tables may refuse mail for a new mailbox for good,
//! where an unready pod only makes senders retry.

use std::time::{Duration, Instant};

/// Delay before the first retry of a configuration that failed to apply.
pub const FIRST_RETRY: Duration = Duration::from_secs(1);
/// Longest delay between two retries.
pub const MAX_RETRY: Duration = Duration::from_secs(60);

/// A mounted configuration not applied yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pending {
    pub hash: String,
    /// Failed attempts so far.
    pub attempts: u32,
    pub next_try: Instant,
    pub last_error: Option<String>,
}

#[derive(Clone, Debug)]
pub struct ApplyState {
    applied: String,
    pending: Option<Pending>,
}

impl ApplyState {
    /// `applied`: hash of the configuration applied at start-up.
    pub fn new(applied: String) -> Self {
        Self {
            applied,
            pending: None,
        }
    }

    /// Whether to try applying the configuration with hash `mounted` now: a new one at once, a failed one
    /// when its retry is due, the applied one never.
    pub fn due(&mut self, mounted: &str, now: Instant) -> bool {
        if mounted == self.applied {
            self.pending = None;
            return false;
        }
        match &self.pending {
            Some(p) if p.hash == mounted => now >= p.next_try,
            _ => {
                self.pending = Some(Pending {
                    hash: mounted.to_string(),
                    attempts: 0,
                    next_try: now,
                    last_error: None,
                });
                true
            }
        }
    }

    pub fn succeeded(&mut self, hash: &str) {
        self.applied = hash.to_string();
        self.pending = None;
    }

    /// Records a failed attempt at `hash`; returns the delay before the next one.
    pub fn failed(&mut self, hash: &str, error: String, now: Instant) -> Duration {
        let p = self.pending.get_or_insert_with(|| Pending {
            hash: hash.to_string(),
            attempts: 0,
            next_try: now,
            last_error: None,
        });
        p.attempts += 1;
        let delay = backoff(p.attempts);
        p.next_try = now + delay;
        p.last_error = Some(error);
        delay
    }

    /// The failure to report while a configuration has failed to apply at least once.
    pub fn failure(&self) -> Option<String> {
        let p = self.pending.as_ref()?;
        let e = p.last_error.as_ref()?;
        Some(format!(
            "configuration {} not applied after {} attempt{}: {e}",
            p.hash,
            p.attempts,
            if p.attempts == 1 { "" } else { "s" }
        ))
    }

    /// Whether an attempt at the pending configuration has failed: what that attempt wrote may have
    /// needed a reload it never got, so a retry reloads every daemon.
    pub fn retrying(&self) -> bool {
        self.pending.as_ref().is_some_and(|p| p.attempts > 0)
    }

    /// Whether the mounted configuration differs from the applied one.
    pub fn is_pending(&self) -> bool {
        self.pending.is_some()
    }
}

/// [`FIRST_RETRY`] doubled per further attempt, at most [`MAX_RETRY`].
pub fn backoff(attempts: u32) -> Duration {
    FIRST_RETRY
        .saturating_mul(1u32 << attempts.saturating_sub(1).min(16))
        .min(MAX_RETRY)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_configuration_is_retried_with_backoff_until_it_applies() {
        let t0 = Instant::now();
        let mut s = ApplyState::new("a".into());
        assert!(
            !s.due("a", t0),
            "the applied configuration is not applied again"
        );
        assert!(s.due("b", t0));
        assert_eq!(s.failed("b", "postmap failed".into(), t0), FIRST_RETRY);
        assert!(s.is_pending());
        assert_eq!(
            s.failure().unwrap(),
            "configuration b not applied after 1 attempt: postmap failed"
        );
        assert!(!s.due("b", t0), "not before the retry is due");
        assert!(s.retrying());
        assert!(s.due("b", t0 + FIRST_RETRY));
        assert_eq!(s.failed("b", "again".into(), t0), Duration::from_secs(2));
        // A newer configuration is tried at once, with a fresh backoff.
        assert!(s.due("c", t0));
        assert!(s.failure().is_none() && !s.retrying());
        s.succeeded("c");
        assert!(!s.is_pending() && s.failure().is_none());
        assert!(!s.due("c", t0));
        // Back to what was applied before a failure clears it.
        assert!(s.due("d", t0));
        s.failed("d", "x".into(), t0);
        assert!(!s.due("c", t0) && !s.is_pending());
    }

    #[test]
    fn backoff_doubles_up_to_a_minute() {
        let secs: Vec<u64> = (1..=9).map(|a| backoff(a).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(backoff(1000), MAX_RETRY);
    }
}
