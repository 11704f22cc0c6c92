//! Leader election on a `coordination.k8s.io/v1` Lease, so only one operator replica reconciles at a time.
//!
//! The holder renews the Lease every `renew_every`; another replica takes it over only once it has not been
//! renewed for `lease_duration`. Every write is a PUT with the resourceVersion just read, so two replicas
//! racing for an expired Lease cannot both win. A leader that cannot renew within `lease_duration` steps
//! down (its controllers stop) before anyone else may take over; on a clean shutdown it releases the Lease
//! so a successor starts at once.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::Client;
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
}

/// One replica's side of the election.
pub struct LeaderElector {
    api: Api<Lease>,
    config: LeaseConfig,
}

fn now() -> MicroTime {
    MicroTime(jiff::Timestamp::now())
}

impl LeaderElector {
    pub fn new(client: Client, config: LeaseConfig) -> Self {
        Self {
            api: Api::namespaced(client, &config.namespace),
            config,
        }
    }

    pub fn identity(&self) -> &str {
        &self.config.identity
    }

    /// One attempt to acquire or renew. `Ok(true)`: this replica holds the Lease now.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
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
        let holder = spec.holder_identity.clone().unwrap_or_default();
        if holder != me {
            let held_for = spec.lease_duration_seconds.unwrap_or(duration).max(1) as i64;
            let expired = match &spec.renew_time {
                Some(t) => jiff::Timestamp::now().as_second() - t.0.as_second() > held_for,
                None => true,
            };
            if !holder.is_empty() && !expired {
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
            match self.try_acquire_or_renew().await {
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

    /// Renews until a renewal has not succeeded for `lease_duration` (or another replica holds the Lease),
    /// then returns: the caller must stop reconciling. Never returns while leadership holds.
    pub async fn hold(&self) {
        let mut last_ok = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.config.renew_every).await;
            match self.try_acquire_or_renew().await {
                Ok(true) => last_ok = tokio::time::Instant::now(),
                Ok(false) => {
                    warn!(identity = %self.config.identity, "another replica took the lease; stepping down");
                    return;
                }
                Err(e) => warn!(error = %e, "cannot renew the leader lease"),
            }
            // Step down before the lease can expire in anyone else's eyes.
            if last_ok.elapsed() + self.config.renew_every >= self.config.lease_duration {
                warn!(identity = %self.config.identity, "lease not renewed in time; stepping down");
                return;
            }
        }
    }

    /// Gives the Lease up (clean shutdown), so a successor need not wait for it to expire.
    pub async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.config.name).await else {
            return;
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        if let Err(e) = self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            warn!(error = %e, "cannot release the leader lease; the next leader waits for it to expire");
        }
    }
}

#[cfg(all(test, feature = "testkit"))]
mod tests {
    use super::*;
    use crate::testkit::ApiServer;

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
        // a stops renewing (say it hangs); after the lease duration b takes over.
        tokio::time::sleep(Duration::from_millis(3100)).await;
        assert!(b.try_acquire_or_renew().await.unwrap());
        // a, resuming, sees it has lost the lease and returns from hold().
        tokio::time::timeout(Duration::from_secs(2), a.hold())
            .await
            .expect("a steps down");
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
