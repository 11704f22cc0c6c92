//! The witness: a `coordination.k8s.io/v1` Lease in a third cluster (`spec.witness`) that breaks the tie when
//! the two sites cannot see each other.
//!
//! - The **active** site renews the Lease at every tick. It stays in quorum while it renewed within the
//!   renew deadline (`leaseDurationSeconds - 2 × probeIntervalSeconds`) or sees the standby agree that it is
//!   active; out of quorum, it fences its own stores ([`super::machine`]).
//! - The **standby** takes the Lease only when a promotion is due and the Lease is free, already its own, or
//!   has not changed for the whole lease duration *as measured on its own clock* (the same rule as
//!   Kubernetes leader election: no comparison of two sites' clocks). It writes the epoch it is about to
//!   claim into the Lease, then promotes. A standby holding the Lease with no promotion under way (its
//!   probes answer again) releases it.
//!
//! So an active site cut off from both the witness and the standby has fenced itself at least one probe
//! interval before the standby can hold the Lease: a partition never leaves two sites writing.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};

use super::observe::timed;
use super::Error;
use crate::crd::SiteFailover;

/// Annotation on the Lease: the epoch its holder serves (or is about to claim).
pub const EPOCH_ANNOTATION: &str = "mailpod.io/epoch";

/// The witness Lease as one tick sees it, for the pure machine.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WitnessView {
    /// The witness's API answered.
    pub reachable: bool,
    pub holder: Option<String>,
    /// Epoch recorded in the Lease.
    pub epoch: i64,
    /// Last time this site renewed or took the Lease (this tick or an earlier one).
    pub renewed_at: Option<Timestamp>,
    /// This site may take the Lease now: free, its own, or unchanged for the whole lease duration.
    pub acquirable: bool,
}

impl WitnessView {
    pub fn held_by(&self, site: &str) -> bool {
        self.holder.as_deref() == Some(site)
    }
}

/// What a site remembers of the Lease between ticks: the version it last saw and since when (its own
/// clock), and its own last renewal.
#[derive(Clone, Debug, Default)]
pub struct WitnessMemory {
    pub seen: Option<(String, Timestamp)>,
    pub renewed_at: Option<Timestamp>,
}

/// Where the Lease is: its client, namespace and name.
pub struct LeaseRef {
    pub client: Client,
    pub namespace: String,
    pub name: String,
    pub duration: u32,
}

impl LeaseRef {
    pub fn new(client: Client, sf: &SiteFailover, duration: u32) -> Option<Self> {
        let w = sf.spec.witness.as_ref()?;
        Some(Self {
            client,
            namespace: w
                .namespace
                .clone()
                .or_else(|| sf.namespace())
                .unwrap_or_default(),
            name: w.lease_name(&sf.name_any()),
            duration,
        })
    }

    fn api(&self) -> Api<Lease> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    fn what(&self) -> String {
        format!("witness Lease {}/{}", self.namespace, self.name)
    }

    pub async fn read(&self, timeout: Duration) -> Result<Option<Lease>, Error> {
        timed(self.what(), timeout, self.api().get_opt(&self.name)).await
    }

    /// Makes `holder` (or nobody) the holder at `epoch`, renewed `now`: creates the Lease when missing, else
    /// replaces the version read (`current`), so two sites racing for it cannot both win. Returns the Lease
    /// as written.
    pub async fn write(
        &self,
        current: Option<&Lease>,
        holder: Option<&str>,
        epoch: i64,
        now: Timestamp,
        timeout: Duration,
    ) -> Result<Lease, Error> {
        let old = current.and_then(|l| l.spec.clone()).unwrap_or_default();
        let changed_hands = old.holder_identity.as_deref() != holder;
        let spec = LeaseSpec {
            holder_identity: holder.map(str::to_string),
            lease_duration_seconds: Some(self.duration as i32),
            acquire_time: if changed_hands {
                holder.map(|_| MicroTime(now))
            } else {
                old.acquire_time.clone()
            },
            renew_time: holder.map(|_| MicroTime(now)),
            lease_transitions: Some(
                old.lease_transitions.unwrap_or(0) + i32::from(changed_hands && holder.is_some()),
            ),
            ..Default::default()
        };
        let mut lease = current.cloned().unwrap_or_else(|| Lease {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                namespace: Some(self.namespace.clone()),
                ..Default::default()
            },
            spec: None,
        });
        lease
            .annotations_mut()
            .insert(EPOCH_ANNOTATION.to_string(), epoch.to_string());
        lease.spec = Some(spec);
        let api = self.api();
        let pp = PostParams::default();
        if current.is_some() {
            timed(self.what(), timeout, api.replace(&self.name, &pp, &lease)).await
        } else {
            timed(self.what(), timeout, api.create(&pp, &lease)).await
        }
    }
}

/// Why the two sites' witness settings cannot work together, if they cannot: both must name the same
/// Lease (namespace, name, duration), or neither a witness. A site with one and a peer without would let the
/// peer promote without the Lease while this site still trusts it.
pub fn mismatch(ours: &SiteFailover, theirs: &SiteFailover) -> Option<String> {
    let lease = |sf: &SiteFailover| {
        sf.spec.witness.as_ref().map(|w| {
            (
                w.namespace
                    .clone()
                    .or_else(|| sf.namespace())
                    .unwrap_or_default(),
                w.lease_name(&sf.name_any()),
                w.lease_duration_seconds,
            )
        })
    };
    let (a, b) = (lease(ours), lease(theirs));
    if a == b {
        return None;
    }
    let show = |l: &Option<(String, String, u32)>| match l {
        Some((ns, name, d)) => format!("Lease {ns}/{name} ({d} s)"),
        None => "no witness".to_string(),
    };
    Some(format!(
        "spec.witness differs between the sites: {} here, {} at site {}; both must name the same Lease (or neither a witness), or a partition may leave two sites writing",
        show(&a),
        show(&b),
        ours.spec.peer.name
    ))
}

/// The epoch recorded in a Lease (0 when none).
pub fn lease_epoch(lease: &Lease) -> i64 {
    lease
        .annotations()
        .get(EPOCH_ANNOTATION)
        .and_then(|e| e.parse().ok())
        .unwrap_or(0)
}

/// The view of a Lease read this tick (`None`: not readable), updating what `me` remembers of it.
pub fn view(
    me: &str,
    lease: Option<Option<&Lease>>,
    memory: &mut WitnessMemory,
    duration: u32,
    now: Timestamp,
) -> WitnessView {
    let Some(lease) = lease else {
        return WitnessView {
            renewed_at: memory.renewed_at,
            ..Default::default()
        };
    };
    let Some(lease) = lease else {
        memory.seen = None;
        return WitnessView {
            reachable: true,
            renewed_at: memory.renewed_at,
            acquirable: true,
            ..Default::default()
        };
    };
    let version = lease.resource_version().unwrap_or_default();
    let since = match &memory.seen {
        Some((v, t)) if *v == version => *t,
        _ => now,
    };
    memory.seen = Some((version, since));
    let holder = lease
        .spec
        .as_ref()
        .and_then(|s| s.holder_identity.clone())
        .filter(|h| !h.is_empty());
    // Our own renewal survives a restart in the Lease itself (written with this site's clock).
    if holder.as_deref() == Some(me) && memory.renewed_at.is_none() {
        memory.renewed_at = lease
            .spec
            .as_ref()
            .and_then(|s| s.renew_time.as_ref())
            .map(|t| t.0);
    }
    let unchanged_for = now.duration_since(since).as_secs_f64();
    WitnessView {
        reachable: true,
        acquirable: holder.is_none()
            || holder.as_deref() == Some(me)
            || unchanged_for >= f64::from(duration),
        holder,
        epoch: lease_epoch(lease),
        renewed_at: memory.renewed_at,
    }
}

/// Whether the active site at `epoch` may renew (or take) the Lease it sees: never over a higher epoch,
/// and over another holder only once that holder is from an older epoch or has let it lapse.
pub fn active_may_renew(view: &WitnessView, epoch: i64) -> bool {
    view.reachable && view.epoch <= epoch && (view.acquirable || view.epoch < epoch)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: Option<&str>, rv: &str, epoch: i64) -> Lease {
        let mut l = Lease {
            metadata: ObjectMeta {
                name: Some("sitefailover-corp".into()),
                resource_version: Some(rv.into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: holder.map(str::to_string),
                renew_time: Some(MicroTime(Timestamp::from_second(1_000).unwrap())),
                ..Default::default()
            }),
        };
        l.annotations_mut()
            .insert(EPOCH_ANNOTATION.into(), epoch.to_string());
        l
    }

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + s).unwrap()
    }

    #[test]
    fn another_holders_lease_is_taken_only_after_a_whole_unchanged_duration() {
        let mut mem = WitnessMemory::default();
        let l = lease(Some("east"), "7", 1);
        let v = view("west", Some(Some(&l)), &mut mem, 20, at(0));
        assert!(!v.acquirable);
        assert_eq!(v.holder.as_deref(), Some("east"));
        assert_eq!(v.epoch, 1);
        assert!(!view("west", Some(Some(&l)), &mut mem, 20, at(19)).acquirable);
        assert!(view("west", Some(Some(&l)), &mut mem, 20, at(20)).acquirable);
        // A renewal (new version) restarts the wait.
        let renewed = lease(Some("east"), "8", 1);
        assert!(!view("west", Some(Some(&renewed)), &mut mem, 20, at(25)).acquirable);
        assert!(view("west", Some(Some(&renewed)), &mut mem, 20, at(45)).acquirable);
    }

    #[test]
    fn free_own_missing_and_unreadable_leases() {
        let mut mem = WitnessMemory::default();
        assert!(
            view(
                "west",
                Some(Some(&lease(None, "1", 3))),
                &mut mem,
                20,
                at(0)
            )
            .acquirable
        );
        let own = view(
            "west",
            Some(Some(&lease(Some("west"), "2", 3))),
            &mut mem,
            20,
            at(0),
        );
        assert!(own.acquirable && own.held_by("west"));
        // The renewal time written by this site is remembered after a restart.
        assert_eq!(own.renewed_at, Some(Timestamp::from_second(1_000).unwrap()));
        let missing = view("west", Some(None), &mut WitnessMemory::default(), 20, at(0));
        assert!(missing.reachable && missing.acquirable && missing.holder.is_none());
        let down = view("west", None, &mut WitnessMemory::default(), 20, at(0));
        assert!(!down.reachable && !down.acquirable);
    }

    #[test]
    fn the_active_site_never_renews_over_a_higher_epoch() {
        let mut mem = WitnessMemory::default();
        let claimed = view(
            "east",
            Some(Some(&lease(Some("west"), "5", 2))),
            &mut mem,
            20,
            at(0),
        );
        assert!(!active_may_renew(&claimed, 1));
        // A holder from an older epoch (the site that handed over in a failback) is replaced at once.
        let stale = view(
            "east",
            Some(Some(&lease(Some("west"), "6", 2))),
            &mut mem,
            20,
            at(1),
        );
        assert!(active_may_renew(&stale, 3));
        let own = view(
            "east",
            Some(Some(&lease(Some("east"), "7", 3))),
            &mut mem,
            20,
            at(2),
        );
        assert!(active_may_renew(&own, 3));
    }

    #[test]
    fn both_sites_must_name_the_same_lease() {
        let sf = |local: &str, peer: &str, witness: Option<serde_json::Value>| -> SiteFailover {
            let mut v = serde_json::json!({
                "apiVersion": "mailpod.io/v1alpha1", "kind": "SiteFailover",
                "metadata": {"name": "corp-geo", "namespace": "mail"},
                "spec": {"mailPods": ["corp"], "localSite": local, "primarySite": "east",
                         "peer": {"name": peer, "kubeconfigSecret": {"name": "p", "key": "k"}}}
            });
            if let Some(w) = witness {
                v["spec"]["witness"] = w;
            }
            serde_json::from_value(v).unwrap()
        };
        let w = |secret: &str, duration: u32| {
            Some(
                serde_json::json!({"kubeconfigSecret": {"name": secret, "key": "k"},
                                    "namespace": "w", "leaseDurationSeconds": duration}),
            )
        };
        // The Secret holding the kubeconfig is each site's own business.
        assert_eq!(
            mismatch(
                &sf("east", "west", w("a", 20)),
                &sf("west", "east", w("b", 20))
            ),
            None
        );
        assert_eq!(
            mismatch(&sf("east", "west", None), &sf("west", "east", None)),
            None
        );
        let m = mismatch(&sf("east", "west", w("a", 20)), &sf("west", "east", None)).unwrap();
        assert!(
            m.contains("Lease w/sitefailover-corp-geo (20 s) here, no witness at site west"),
            "{m}"
        );
        assert!(mismatch(
            &sf("east", "west", w("a", 20)),
            &sf("west", "east", w("a", 40))
        )
        .is_some());
    }
}
