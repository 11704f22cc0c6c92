//! The witness: a `coordination.k8s.io/v1` Lease in a third cluster (`spec.witness`) that breaks the tie when
//! the two sites cannot see each other.
//!
//! - The **active** site renews the Lease at every tick. It stays in quorum while it renewed within the
//!   renew deadline (`leaseDurationSeconds - 2 × probeIntervalSeconds`) or sees the standby agree that it is
//!   active; out of quorum, it fences its own stores ([`super::machine`]).
//! - The **standby** takes the Lease only when a promotion is due, its probes have been failing for the whole
//!   lease duration, and the Lease (whoever holds it, or its absence) has not changed for the whole lease
//!   duration *as measured on its own clock* since it read it (the rule of Kubernetes leader election: no
//!   comparison of two sites' clocks). It writes the epoch it is about to claim into the Lease, then
//!   promotes. A standby holding the Lease with no promotion under way (its probes answer again) releases
//!   it.
//!
//! Waiting out its own failed probes matters as much as the Lease: the active site may be in quorum through
//! the standby's agreement, which ends only when it reads the standby's recorded failures. Both windows
//! are at least the lease duration, while the active site fences itself within the renew deadline (two
//! probe intervals shorter) of its last renewal or agreement; the fence guard (a timer the controller
//! re-arms at each tick, `arm_guard`) makes that deadline hold even when a tick is slow. So a partition
//! never leaves two sites writing.
//!
//! The Lease carries the pairing it belongs to (`mailpod.io/pairing`); a Lease of another pairing is never
//! renewed, taken or released.

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
/// Annotation on the Lease: the pairing it belongs to ([`pairing`]).
pub const PAIRING_ANNOTATION: &str = "mailpod.io/pairing";

/// The identity of a pairing, the same on both sites: the SiteFailover's name and both sites with their
/// namespaces, in name order (`corp-geo:east=mail,west=mail`).
pub fn pairing(sf: &SiteFailover) -> String {
    let ns = sf.namespace().unwrap_or_default();
    let peer_ns = sf.spec.peer.namespace.clone().unwrap_or_else(|| ns.clone());
    let mut sites = [
        format!("{}={ns}", sf.spec.local_site),
        format!("{}={peer_ns}", sf.spec.peer.name),
    ];
    sites.sort();
    format!("{}:{}", sf.name_any(), sites.join(","))
}

/// The witness Lease as one tick sees it, for the pure machine.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WitnessView {
    /// The witness's API answered.
    pub reachable: bool,
    pub holder: Option<String>,
    /// Epoch recorded in the Lease.
    pub epoch: i64,
    /// When this process last renewed or took the Lease (the time the write was sent; never read back from
    /// the Lease, whose times another node's clock may have written).
    pub renewed_at: Option<Timestamp>,
    /// The Lease (or its absence) has not changed for the whole lease duration since this site first read
    /// it so: whoever held it has stopped renewing.
    pub lapsed: bool,
    /// The Lease belongs to another pairing (`mailpod.io/pairing`): never renewed, taken or released.
    pub foreign: Option<String>,
    /// The Lease exists (`false`: readable and missing, or not readable).
    pub exists: bool,
}

impl WitnessView {
    pub fn held_by(&self, site: &str) -> bool {
        self.holder.as_deref() == Some(site)
    }
}

/// What a site remembers of the Lease between ticks: the version it last saw (empty: no Lease) and since
/// when (its own clock, read after the read), and its own last renewal.
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
    /// [`pairing`] of the SiteFailover, written into the Lease.
    pub pairing: String,
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
            pairing: pairing(sf),
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
        let pairing = self.pairing.clone();
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
        lease
            .annotations_mut()
            .insert(PAIRING_ANNOTATION.to_string(), pairing);
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

/// The view of a Lease read this tick (`None`: not readable), updating what this site remembers of it.
/// `read_at` is taken after the read returned, so the time a version is first seen is never earlier than
/// the read that saw it.
pub fn view(
    pairing: &str,
    lease: Option<Option<&Lease>>,
    memory: &mut WitnessMemory,
    duration: u32,
    read_at: Timestamp,
) -> WitnessView {
    let Some(lease) = lease else {
        return WitnessView {
            renewed_at: memory.renewed_at,
            ..Default::default()
        };
    };
    let version = lease.and_then(|l| l.resource_version()).unwrap_or_default();
    let since = match &memory.seen {
        Some((v, t)) if *v == version => *t,
        _ => read_at,
    };
    memory.seen = Some((version, since));
    let lapsed = read_at.duration_since(since).as_secs_f64() >= f64::from(duration);
    let Some(lease) = lease else {
        return WitnessView {
            reachable: true,
            renewed_at: memory.renewed_at,
            lapsed,
            ..Default::default()
        };
    };
    let holder = lease
        .spec
        .as_ref()
        .and_then(|s| s.holder_identity.clone())
        .filter(|h| !h.is_empty());
    let foreign = lease
        .annotations()
        .get(PAIRING_ANNOTATION)
        .filter(|p| p.as_str() != pairing)
        .cloned();
    WitnessView {
        reachable: true,
        lapsed,
        holder,
        epoch: lease_epoch(lease),
        renewed_at: memory.renewed_at,
        foreign,
        exists: true,
    }
}

/// Whether the active site `me` at `epoch` may renew (or take) the Lease it sees:
/// - its own, at any epoch (one left from an earlier incarnation of this pairing is brought to this epoch);
/// - a free one at its own epoch (the other site gave it back, as the site that hands over in a failback
///   does once it follows the new epoch);
/// - a missing one on a new pairing's first tick (`new_pairing`: no epoch recorded yet);
/// - any other (missing, free at another epoch, another site's at any epoch) only once it has lapsed: its
///   holder has stopped renewing for the whole duration and so has fenced itself (or is gone). Taking one
///   earlier could let a stale old primary that recreated a deleted Lease be overtaken while it still
///   counts on its renewal, with two sites serving.
///
/// Never another pairing's. Until it may renew, the active site counts on the standby's agreement.
pub fn active_may_renew(view: &WitnessView, me: &str, epoch: i64, new_pairing: bool) -> bool {
    if !view.reachable || view.foreign.is_some() {
        return false;
    }
    match view.holder.as_deref() {
        Some(h) if h == me => true,
        None if !view.exists => new_pairing || view.lapsed,
        None => view.epoch == epoch || view.lapsed,
        Some(_) => view.lapsed,
    }
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

    const PAIRING: &str = "corp-geo:east=mail,west=mail";

    #[test]
    fn a_lease_lapses_only_after_a_whole_unchanged_duration_whoever_holds_it() {
        let mut mem = WitnessMemory::default();
        let l = lease(Some("east"), "7", 1);
        let v = view(PAIRING, Some(Some(&l)), &mut mem, 20, at(0));
        assert!(!v.lapsed);
        assert_eq!((v.holder.as_deref(), v.epoch), (Some("east"), 1));
        assert!(!view(PAIRING, Some(Some(&l)), &mut mem, 20, at(19)).lapsed);
        assert!(view(PAIRING, Some(Some(&l)), &mut mem, 20, at(20)).lapsed);
        // A renewal (new version) restarts the wait.
        let renewed = lease(Some("east"), "8", 1);
        assert!(!view(PAIRING, Some(Some(&renewed)), &mut mem, 20, at(25)).lapsed);
        assert!(view(PAIRING, Some(Some(&renewed)), &mut mem, 20, at(45)).lapsed);
        // Free or own: the same wait (a free Lease may have just been released; an own one left over).
        let mut mem = WitnessMemory::default();
        let free = lease(None, "9", 1);
        assert!(!view(PAIRING, Some(Some(&free)), &mut mem, 20, at(0)).lapsed);
        assert!(view(PAIRING, Some(Some(&free)), &mut mem, 20, at(20)).lapsed);
    }

    #[test]
    fn a_missing_lease_lapses_like_any_other_and_times_are_never_read_back() {
        let mut mem = WitnessMemory::default();
        let missing = view(PAIRING, Some(None), &mut mem, 20, at(0));
        assert!(missing.reachable && !missing.lapsed && missing.holder.is_none());
        assert!(!view(PAIRING, Some(None), &mut mem, 20, at(10)).lapsed);
        assert!(view(PAIRING, Some(None), &mut mem, 20, at(20)).lapsed);
        // Created meanwhile: the wait starts again.
        let created = lease(Some("east"), "1", 1);
        assert!(!view(PAIRING, Some(Some(&created)), &mut mem, 20, at(21)).lapsed);
        // This site's own renewal time is not taken from the Lease (another node's clock wrote it).
        let own = view(
            PAIRING,
            Some(Some(&lease(Some("west"), "2", 3))),
            &mut WitnessMemory::default(),
            20,
            at(0),
        );
        assert!(own.held_by("west") && own.renewed_at.is_none());
        let down = view(PAIRING, None, &mut WitnessMemory::default(), 20, at(0));
        assert!(!down.reachable && !down.lapsed);
    }

    #[test]
    fn the_active_site_never_renews_over_a_higher_epoch_nor_another_pairings_lease() {
        let mut mem = WitnessMemory::default();
        let claimed = view(
            PAIRING,
            Some(Some(&lease(Some("west"), "5", 2))),
            &mut mem,
            20,
            at(0),
        );
        assert!(!active_may_renew(&claimed, "east", 1, false));
        // Another holder's, even from an older epoch: only once it has lapsed.
        let stale = view(
            PAIRING,
            Some(Some(&lease(Some("west"), "6", 2))),
            &mut mem,
            20,
            at(1),
        );
        assert!(!active_may_renew(&stale, "east", 3, false));
        let stale = view(
            PAIRING,
            Some(Some(&lease(Some("west"), "6", 2))),
            &mut mem,
            20,
            at(21),
        );
        assert!(active_may_renew(&stale, "east", 3, false));
        // Its own, even at a higher epoch (left from an earlier incarnation of the pairing).
        let own = view(
            PAIRING,
            Some(Some(&lease(Some("east"), "7", 5))),
            &mut mem,
            20,
            at(2),
        );
        assert!(active_may_renew(&own, "east", 1, false));
        // Free: taken.
        let free = view(
            PAIRING,
            Some(Some(&lease(None, "8", 1))),
            &mut mem,
            20,
            at(3),
        );
        assert!(active_may_renew(&free, "east", 1, false));
        // Missing: recreated at once only on a new pairing's first tick, else once it has lapsed (a stale
        // old primary must not recreate a deleted Lease).
        let mut m = WitnessMemory::default();
        let missing = view(PAIRING, Some(None), &mut m, 20, at(0));
        assert!(active_may_renew(&missing, "east", 1, true));
        assert!(!active_may_renew(&missing, "east", 1, false));
        let missing = view(PAIRING, Some(None), &mut m, 20, at(20));
        assert!(active_may_renew(&missing, "east", 1, false));
        // Free at another epoch: once lapsed.
        let free_old = view(
            PAIRING,
            Some(Some(&lease(None, "10", 0))),
            &mut WitnessMemory::default(),
            20,
            at(0),
        );
        assert!(!active_may_renew(&free_old, "east", 1, false));
        // Another pairing's Lease: never.
        let mut other = lease(Some("east"), "9", 1);
        other.annotations_mut().insert(
            PAIRING_ANNOTATION.into(),
            "corp-geo:east=other,west=other".into(),
        );
        let v = view(PAIRING, Some(Some(&other)), &mut mem, 20, at(4));
        assert_eq!(v.foreign.as_deref(), Some("corp-geo:east=other,west=other"));
        assert!(!active_may_renew(&v, "east", 1, false));
    }

    #[test]
    fn the_pairing_is_the_same_on_both_sites() {
        let sf = |local: &str, peer: &str, peer_ns: Option<&str>, ns: &str| -> SiteFailover {
            let mut v = serde_json::json!({
                "apiVersion": "mailpod.io/v1alpha1", "kind": "SiteFailover",
                "metadata": {"name": "corp-geo", "namespace": ns},
                "spec": {"mailPods": ["corp"], "localSite": local, "primarySite": "east",
                         "peer": {"name": peer, "kubeconfigSecret": {"name": "p", "key": "k"}}}
            });
            if let Some(p) = peer_ns {
                v["spec"]["peer"]["namespace"] = serde_json::json!(p);
            }
            serde_json::from_value(v).unwrap()
        };
        let east = pairing(&sf("east", "west", Some("mail-w"), "mail-e"));
        let west = pairing(&sf("west", "east", Some("mail-e"), "mail-w"));
        assert_eq!(east, west);
        assert_eq!(east, "corp-geo:east=mail-e,west=mail-w");
        assert_ne!(east, pairing(&sf("east", "west", None, "mail-e")));
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
