//! Leader election on a `coordination.k8s.io/v1` Lease, so only one operator replica reconciles at a time.
//!
//! The holder renews the Lease every `renew_every`. Expiry is decided as client-go's leaderelection does:
//! from when this process last saw the Lease's record change, by its own monotonic clock, never by
//! comparing the holder's `renewTime` (another machine's clock) with the local one; a replica that first
//! sees a held Lease therefore waits a whole `lease_duration` before it may take it over. Every write is a
//! PUT with the resourceVersion just read, so two replicas racing for an expired Lease cannot both win.
//! Every call is bounded by a timeout: a leader whose renewal has not succeeded by `lease_duration -
//! renew_every` after the last good one (a hung call included) steps down (its controllers stop) before
//! anyone else may take over; on a clean shutdown it releases the Lease so a successor starts at once.

use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::Client;
use tokio::time::Instant;
use tracing::{info, warn};

/// Where the Lease is and who this replica is.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// Unique per replica: the pod name.
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_every: Duration,
}

impl LeaseConfig {
    pub fn new(
        namespace: impl Into<String>,
        name: impl Into<String>,
        identity: impl Into<String>,
    ) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
        }
    }

    /// How long after its last good renewal a leader still leads: one renewal period short of the
    /// lease, so it has stopped before any other replica can see the Lease expire.
    pub fn renew_deadline(&self) -> Duration {
        self.lease_duration
            .saturating_sub(self.renew_every)
            .max(self.renew_every / 2)
    }
}

/// The Lease record as last seen, and when (by this process's monotonic clock) it last changed.
#[derive(Debug)]
struct Observed {
    record: String,
    at: Instant,
}

/// One replica's side of the election.
pub struct LeaderElector {
    api: Api<Lease>,
    config: LeaseConfig,
    observed: Mutex<Option<Observed>>,
    /// When the last attempt that left this replica holding the Lease was sent.
    held_since: Mutex<Option<Instant>>,
}

fn now() -> MicroTime {
    MicroTime(jiff::Timestamp::now())
}

/// What identifies one write of the Lease by its holder (client-go compares the whole record).
fn record_of(spec: &LeaseSpec) -> String {
    format!(
        "{:?}|{:?}|{:?}|{:?}|{:?}",
        spec.holder_identity,
        spec.acquire_time.as_ref().map(|t| t.0),
        spec.renew_time.as_ref().map(|t| t.0),
        spec.lease_transitions,
        spec.lease_duration_seconds,
    )
}

/// Why an attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error(transparent)]
    Api(#[from] kube::Error),
    #[error("the API server did not answer within {0:?}")]
    TimedOut(Duration),
}

impl LeaderElector {
    pub fn new(client: Client, config: LeaseConfig) -> Self {
        Self {
            api: Api::namespaced(client, &config.namespace),
            config,
            observed: Mutex::new(None),
            held_since: Mutex::new(None),
        }
    }

    pub fn identity(&self) -> &str {
        &self.config.identity
    }

    /// Notes the record just read; returns how long ago (locally) it last changed.
    fn observe(&self, spec: &LeaseSpec) -> Duration {
        let record = record_of(spec);
        let mut observed = self.observed.lock().expect("lease observation lock");
        match observed.as_ref() {
            Some(o) if o.record == record => o.at.elapsed(),
            _ => {
                *observed = Some(Observed {
                    record,
                    at: Instant::now(),
                });
                Duration::ZERO
            }
        }
    }

    /// One attempt to acquire or renew, bounded by `lease_duration`. `Ok(true)`: this replica holds the
    /// Lease now.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, LeaseError> {
        self.try_within(self.config.lease_duration).await
    }

    async fn try_within(&self, limit: Duration) -> Result<bool, LeaseError> {
        let sent = Instant::now();
        let held = match tokio::time::timeout(limit, self.attempt()).await {
            Ok(r) => r.map_err(LeaseError::from)?,
            Err(_) => return Err(LeaseError::TimedOut(limit)),
        };
        if held {
            *self.held_since.lock().expect("lease lock") = Some(sent);
        }
        Ok(held)
    }

    async fn attempt(&self) -> Result<bool, kube::Error> {
        let me = self.config.identity.clone();
        let duration = self.config.lease_duration.as_secs().max(1) as i32;
        let Some(mut lease) = self.api.get_opt(&self.config.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.name.clone()),
                    namespace: Some(self.config.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me),
                    lease_duration_seconds: Some(duration),
                    acquire_time: Some(now()),
                    renew_time: Some(now()),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        let unchanged_for = self.observe(spec);
        let holder = spec.holder_identity.clone().unwrap_or_default();
        if holder != me {
            let held_for =
                Duration::from_secs(spec.lease_duration_seconds.unwrap_or(duration).max(1) as u64);
            if !holder.is_empty() && unchanged_for < held_for {
                return Ok(false);
            }
            spec.holder_identity = Some(me);
            spec.acquire_time = Some(now());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.renew_time = Some(now());
        spec.lease_duration_seconds = Some(duration);
        // The resourceVersion read above makes this a compare-and-swap.
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Waits until this replica leads. Returns `false` if `shutdown` comes first.
    pub async fn acquire(&self, shutdown: impl std::future::Future<Output = ()>) -> bool {
        tokio::pin!(shutdown);
        let mut logged = false;
        loop {
            let attempt = tokio::select! {
                _ = &mut shutdown => return false,
                r = self.try_acquire_or_renew() => r,
            };
            match attempt {
                Ok(true) => {
                    info!(identity = %self.config.identity, lease = %self.config.name, "leading");
                    return true;
                }
                Ok(false) if !logged => {
                    info!(identity = %self.config.identity, "another replica leads; waiting for the lease");
                    logged = true;
                }
                Ok(false) => {}
                Err(e) => warn!(error = %e, "cannot read or write the leader lease"),
            }
            tokio::select! {
                _ = &mut shutdown => return false,
                _ = tokio::time::sleep(self.config.renew_every) => {}
            }
        }
    }

    /// Renews until a renewal has not succeeded by [`LeaseConfig::renew_deadline`] after the last good one
    /// (or another replica holds the Lease), then returns: the caller must stop reconciling. A renewal
    /// that hangs is abandoned at that deadline. Never returns while leadership holds.
    pub async fn hold(&self) {
        // Counted from when the last good renewal (or the acquisition) was sent: the renewTime others saw
        // change is not earlier than that.
        let mut last_ok = self
            .held_since
            .lock()
            .expect("lease lock")
            .unwrap_or_else(Instant::now);
        loop {
            let step_down_at = last_ok + self.config.renew_deadline();
            tokio::time::sleep_until((Instant::now() + self.config.renew_every).min(step_down_at))
                .await;
            let sent = Instant::now();
            let left = step_down_at.saturating_duration_since(sent);
            if left.is_zero() {
                warn!(identity = %self.config.identity, "lease not renewed in time; stepping down");
                return;
            }
            match self.try_within(left).await {
                Ok(true) => last_ok = sent.max(last_ok),
                Ok(false) => {
                    warn!(identity = %self.config.identity, "another replica took the lease; stepping down");
                    return;
                }
                Err(LeaseError::TimedOut(_)) => {
                    warn!(identity = %self.config.identity, "lease renewal did not answer in time; stepping down");
                    return;
                }
                Err(e) => warn!(error = %e, "cannot renew the leader lease"),
            }
        }
    }

    /// Gives the Lease up (clean shutdown), so a successor need not wait for it to expire.
    pub async fn release(&self) {
        let limit = self.config.renew_every;
        let Ok(Ok(Some(mut lease))) =
            tokio::time::timeout(limit, self.api.get_opt(&self.config.name)).await
        else {
            return;
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        match tokio::time::timeout(
            limit,
            self.api
                .replace(&self.config.name, &PostParams::default(), &lease),
        )
        .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                warn!(error = %e, "cannot release the leader lease; the next leader waits for it to expire")
            }
            Err(_) => warn!(
                "releasing the leader lease did not answer in time; the next leader waits for it to expire"
            ),
        }
    }
}

#[cfg(all(test, feature = "testkit"))]
mod tests {
    use super::*;
    use crate::testkit::{ApiServer, Fault, FaultKind};

    fn config(identity: &str) -> LeaseConfig {
        LeaseConfig {
            lease_duration: Duration::from_secs(2),
            renew_every: Duration::from_millis(200),
            ..LeaseConfig::new("ops", "mailpod-operator", identity)
        }
    }

    #[tokio::test]
    async fn one_leader_at_a_time_and_release_hands_over() {
        let server = ApiServer::new();
        let a = LeaderElector::new(server.client(), config("a"));
        let b = LeaderElector::new(server.client(), config("b"));
        assert!(a.try_acquire_or_renew().await.unwrap());
        assert!(
            !b.try_acquire_or_renew().await.unwrap(),
            "b must not take a held lease"
        );
        assert!(a.try_acquire_or_renew().await.unwrap(), "a renews");
        a.release().await;
        assert!(
            b.try_acquire_or_renew().await.unwrap(),
            "a released lease is free"
        );
        assert!(!a.try_acquire_or_renew().await.unwrap());
        let lease: Lease = server.get("ops", "mailpod-operator").unwrap();
        let spec = lease.spec.unwrap();
        assert_eq!(spec.holder_identity.as_deref(), Some("b"));
        assert_eq!(spec.lease_transitions, Some(1));
    }

    #[tokio::test]
    async fn an_expired_lease_is_taken_over_and_the_old_leader_steps_down() {
        let server = ApiServer::new();
        let a = LeaderElector::new(server.client(), config("a"));
        let b = LeaderElector::new(server.client(), config("b"));
        assert!(a.try_acquire_or_renew().await.unwrap());
        assert!(!b.try_acquire_or_renew().await.unwrap(), "b sees a's lease");
        // a stops renewing (say it hangs); once b has seen no change for the lease duration it takes over.
        tokio::time::sleep(Duration::from_millis(2100)).await;
        assert!(b.try_acquire_or_renew().await.unwrap());
        // a, resuming, sees it has lost the lease and returns from hold().
        tokio::time::timeout(Duration::from_secs(2), a.hold())
            .await
            .expect("a steps down");
    }

    #[tokio::test]
    async fn a_renewal_that_hangs_steps_down_before_the_lease_expires() {
        let server = ApiServer::new();
        let a = LeaderElector::new(server.client(), config("a"));
        assert!(a.try_acquire_or_renew().await.unwrap());
        let started = Instant::now();
        // From now on the API server takes every Lease request and never answers.
        server.inject(Fault::new(None, "/leases/", FaultKind::Hang, usize::MAX));
        tokio::time::timeout(Duration::from_secs(2), a.hold())
            .await
            .expect("a hung renewal steps down within the lease duration");
        let held = started.elapsed();
        assert!(
            held <= config("a").renew_deadline() + Duration::from_millis(100),
            "stepped down after {held:?}, later than the renew deadline"
        );
    }

    #[tokio::test]
    async fn the_renew_deadline_counts_from_the_acquisition_not_from_when_holding_starts() {
        let server = ApiServer::new();
        let a = LeaderElector::new(server.client(), config("a"));
        let acquired = Instant::now();
        assert!(a.try_acquire_or_renew().await.unwrap());
        // Controllers take a while to start before hold() runs; meanwhile the API server hangs.
        server.inject(Fault::new(None, "/leases/", FaultKind::Hang, usize::MAX));
        tokio::time::sleep(Duration::from_secs(1)).await;
        a.hold().await;
        let held = acquired.elapsed();
        assert!(
            held <= config("a").renew_deadline() + Duration::from_millis(100),
            "led for {held:?} after the last good renewal"
        );
    }

    /// Writes a Lease held by `holder` whose renewTime is `skew` away from this machine's clock, as a
    /// holder with a wrong clock writes it.
    async fn skewed_lease(server: &ApiServer, holder: &str, skew_seconds: i64) {
        let at = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(skew_seconds);
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some("mailpod-operator".into()),
                namespace: Some("ops".into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.into()),
                lease_duration_seconds: Some(2),
                acquire_time: Some(MicroTime(at)),
                renew_time: Some(MicroTime(at)),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        let leases: Api<Lease> = Api::namespaced(server.client(), "ops");
        match leases.get_opt("mailpod-operator").await.unwrap() {
            Some(old) => {
                let mut lease = lease;
                lease.metadata.resource_version = old.metadata.resource_version;
                leases
                    .replace("mailpod-operator", &PostParams::default(), &lease)
                    .await
                    .unwrap()
            }
            None => leases.create(&PostParams::default(), &lease).await.unwrap(),
        };
    }

    #[tokio::test]
    async fn a_live_holder_whose_clock_is_behind_keeps_the_lease() {
        let server = ApiServer::new();
        let b = LeaderElector::new(server.client(), config("b"));
        // The holder's clock is an hour behind: its renewTime looks long expired here, yet it renews.
        skewed_lease(&server, "a", -3600).await;
        assert!(!b.try_acquire_or_renew().await.unwrap());
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(800)).await;
            skewed_lease(&server, "a", -3600 + 1).await;
            skewed_lease(&server, "a", -3600).await;
            assert!(
                !b.try_acquire_or_renew().await.unwrap(),
                "a renewing holder keeps its lease whatever its clock says"
            );
        }
    }

    #[tokio::test]
    async fn a_dead_holder_whose_clock_is_ahead_loses_the_lease_after_the_duration() {
        let server = ApiServer::new();
        let b = LeaderElector::new(server.client(), config("b"));
        // The holder's clock is an hour ahead, and it has stopped renewing.
        skewed_lease(&server, "a", 3600).await;
        assert!(!b.try_acquire_or_renew().await.unwrap());
        tokio::time::sleep(Duration::from_millis(2100)).await;
        assert!(
            b.try_acquire_or_renew().await.unwrap(),
            "unchanged for the lease duration as seen here: expired"
        );
    }

    #[tokio::test]
    async fn racing_for_a_free_lease_has_one_winner() {
        let server = ApiServer::new();
        let electors: Vec<LeaderElector> = (0..5)
            .map(|i| LeaderElector::new(server.client(), config(&format!("r{i}"))))
            .collect();
        let results =
            futures::future::join_all(electors.iter().map(|e| e.try_acquire_or_renew())).await;
        assert_eq!(
            results.iter().filter(|r| matches!(r, Ok(true))).count(),
            1,
            "{results:?}"
        );
    }
}
