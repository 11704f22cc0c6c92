//! Method `Volume`: the order in which a LUN's stores and its mirrored images change hands. A secondary
//! image is read-only and a primary one takes writes, so the two must never overlap:
//!
//! - **fencing** (a standby, or an old primary fenced under a higher epoch): the store StatefulSet goes to
//!   0 first; the images are demoted to `secondary` only once no store pod of the LUN exists;
//! - **unfencing** (promotion): the images are set `primary` first; the stores start only once every image
//!   whose claim is bound reports `Primary` for that request.
//!
//! [`plan`] decides this from what was observed (pure, unit-tested); [`prepare`] reads it. Replication lag
//! (the RPO of the other site's copy) is taken from csi-addons' `status.lastSyncTime` by [`lag`].

use std::collections::BTreeMap;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};

use super::failover::REASON_FENCED;
use super::replication::{self, ImageState, LiveReplication, Observed};
use crate::controller::apply::LiveChildren;
use crate::controller::{Error, Result};
use crate::crd::StorageLUN;
use crate::names::{self, labels as l};
use crate::resources::store;

/// Degraded reason while a fenced LUN's store pods are still running.
pub const REASON_STOPPING_STORES: &str = "StoppingStores";
/// Degraded reason while an unfenced LUN waits for its images to be promoted.
pub const REASON_AWAITING_PRIMARY: &str = "AwaitingVolumePrimary";
/// How soon to look again while waiting for pods to go or images to change state.
pub const WAIT: Duration = Duration::from_secs(3);

/// What [`plan`] looks at.
#[derive(Clone, Debug, Default)]
pub struct Observation {
    pub fenced: bool,
    /// Store replicas the LUN's spec asks for.
    pub replicas: i32,
    /// `spec.replicas` of the live store StatefulSet (`None` before it exists).
    pub running: Option<i32>,
    /// Store pods of the LUN that exist, terminating ones included (they may still write).
    pub store_pods: Vec<String>,
    /// Ordinals whose PVC is bound to a volume: an image exists that must be promoted before a store
    /// mounts it. An unbound claim gets a fresh volume, primary from the start.
    pub bound: Vec<i32>,
    pub replications: Observed,
}

/// What the LUN controller does this pass.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// Replicas of the store StatefulSet.
    pub store_replicas: i32,
    /// The state to apply to the VolumeReplications, or `None` to leave them as they are this pass.
    pub images: Option<ImageState>,
    /// Degraded reason and message to report instead of the failover decision's, if any.
    pub condition: Option<(&'static str, String)>,
    /// Something is on its way: look again within [`WAIT`].
    pub waiting: bool,
}

/// The order of fencing and promotion, from what was observed.
pub fn plan(lun: &str, o: &Observation) -> Plan {
    if o.replications.issue.is_some() {
        // Replication does not work here at all (reported as ReplicationUnavailable): fencing still stops
        // the stores; an unfenced LUN serves from whatever its volumes hold, as without replication.
        return Plan {
            store_replicas: if o.fenced { 0 } else { o.replicas },
            images: None,
            condition: None,
            waiting: false,
        };
    }
    let names: Vec<String> = (0..o.replicas).map(|i| replication::name(lun, i)).collect();
    let reported = |name: &str, state: ImageState| {
        o.replications
            .live
            .get(name)
            .is_some_and(|r: &LiveReplication| r.reports(state))
    };
    if o.fenced {
        if !o.store_pods.is_empty() {
            return Plan {
                store_replicas: 0,
                images: None,
                condition: Some((
                    REASON_STOPPING_STORES,
                    format!(
                        "fenced: waiting for store pods {} to stop before demoting VolumeReplications to secondary",
                        o.store_pods.join(", ")
                    ),
                )),
                waiting: true,
            };
        }
        let pending = names.iter().find(|n| !reported(n, ImageState::Secondary));
        return Plan {
            store_replicas: 0,
            images: Some(ImageState::Secondary),
            condition: Some(match pending {
                Some(n) => (
                    REASON_FENCED,
                    format!("fenced: stores stopped; waiting for VolumeReplication {n} to report Secondary"),
                ),
                None => (
                    REASON_FENCED,
                    "fenced: stores stopped, VolumeReplications secondary".to_string(),
                ),
            }),
            waiting: pending.is_some(),
        };
    }
    // A LUN whose stores already run keeps them: the gate is for starting stores, and a missing status
    // on a serving LUN must not stop its mail.
    if o.running.is_some_and(|r| r > 0) {
        return Plan {
            store_replicas: o.replicas,
            images: Some(ImageState::Primary),
            condition: None,
            waiting: false,
        };
    }
    let pending = o
        .bound
        .iter()
        .map(|i| replication::name(lun, *i))
        .find(|n| !reported(n, ImageState::Primary));
    match pending {
        Some(n) => Plan {
            store_replicas: 0,
            images: Some(ImageState::Primary),
            condition: Some((
                REASON_AWAITING_PRIMARY,
                format!("waiting for VolumeReplication {n} to report Primary before starting the stores"),
            )),
            waiting: true,
        },
        None => Plan {
            store_replicas: o.replicas,
            images: Some(ImageState::Primary),
            condition: None,
            waiting: false,
        },
    }
}

/// How much of what was written here the other site's copy lacks, in whole seconds.
///
/// - Unfenced: now − the oldest `lastSyncTime` of the LUN's images (only primary images report it).
/// - Fenced: 0 once every image is secondary and csi-addons reports it demoted and in sync (the other
///   site holds everything written here, so a planned switchover may promote it); `None` until then.
///
/// `None` when nothing is reported yet. Whole seconds, so a status written now reads the same on the
/// reconcile that the write itself triggers.
pub fn lag(fenced: bool, live: &BTreeMap<String, LiveReplication>, now: Timestamp) -> Option<f64> {
    if fenced {
        let all_synced = !live.is_empty()
            && live
                .values()
                .all(|r| r.reports(ImageState::Secondary) && r.demoted_in_sync);
        return all_synced.then_some(0.0);
    }
    let oldest = live.values().filter_map(|r| r.last_sync).min()?;
    Some(((now.as_millisecond() - oldest.as_millisecond()).max(0) / 1000) as f64)
}

/// The plan for a Volume LUN and what it was made from.
pub struct Prepared {
    pub plan: Plan,
    pub replications: Observed,
}

/// Reads what [`plan`] needs: the VolumeReplications, the live StatefulSet's replicas, the LUN's store
/// pods, and (only when stores are about to start) which claims are bound.
pub async fn prepare(client: &Client, lun: &StorageLUN, live: &LiveChildren) -> Result<Prepared> {
    let name = lun.name_any();
    let ns = lun.namespace().unwrap_or_default();
    let replications = replication::observe(client, lun).await?;
    let running = live
        .get("StatefulSet", &name)
        .and_then(|o| o.data["spec"]["replicas"].as_i64())
        .map(|r| r as i32);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let selector = format!("{}={name},{}={}", l::LUN, l::COMPONENT, store::COMPONENT);
    let store_pods: Vec<String> = pods
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(|source| Error::Read {
            what: format!("store pods of StorageLUN {name}"),
            source,
        })?
        .items
        .iter()
        .map(|p| p.name_any())
        .collect();
    let starting = !lun.spec.fenced && running.unwrap_or(0) == 0 && replications.issue.is_none();
    let mut bound = vec![];
    if starting {
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
        for ordinal in 0..lun.spec.replicas() {
            let claim = names::lun_pvc(&name, ordinal);
            let pvc = claims.get_opt(&claim).await.map_err(|source| Error::Read {
                what: format!("PersistentVolumeClaim {claim}"),
                source,
            })?;
            if pvc.as_ref().is_some_and(is_bound) {
                bound.push(ordinal);
            }
        }
    }
    let observation = Observation {
        fenced: lun.spec.fenced,
        replicas: lun.spec.replicas(),
        running,
        store_pods,
        bound,
        replications,
    };
    Ok(Prepared {
        plan: plan(&name, &observation),
        replications: observation.replications,
    })
}

/// A claim bound to a volume (phase `Bound` with a volume name).
pub fn is_bound(pvc: &PersistentVolumeClaim) -> bool {
    pvc.spec
        .as_ref()
        .and_then(|s| s.volume_name.as_deref())
        .is_some_and(|v| !v.is_empty())
        && pvc.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound")
}

#[cfg(test)]
mod tests {
    use super::*;

    const LUN: &str = "corp-lun-0";

    fn vr(requested: &str, state: Option<&str>) -> LiveReplication {
        LiveReplication {
            requested: Some(requested.into()),
            state: state.map(String::from),
            last_sync: None,
            current: true,
            demoted_in_sync: false,
        }
    }

    fn observed(vrs: &[(&str, LiveReplication)]) -> Observed {
        Observed {
            issue: None,
            live: vrs
                .iter()
                .map(|(n, r)| (n.to_string(), r.clone()))
                .collect(),
            ..Default::default()
        }
    }

    fn obs(fenced: bool, running: Option<i32>, pods: &[&str], vrs: Observed) -> Observation {
        Observation {
            fenced,
            replicas: 2,
            running,
            store_pods: pods.iter().map(|p| p.to_string()).collect(),
            bound: vec![0, 1],
            replications: vrs,
        }
    }

    #[test]
    fn fencing_stops_the_stores_before_demoting_the_images() {
        let primary = observed(&[
            ("mail-corp-lun-0-0", vr("primary", Some("Primary"))),
            ("mail-corp-lun-0-1", vr("primary", Some("Primary"))),
        ]);
        // Pods still there (one terminating counts too): stores to 0, images untouched.
        let p = plan(
            LUN,
            &obs(
                true,
                Some(2),
                &["corp-lun-0-0", "corp-lun-0-1"],
                primary.clone(),
            ),
        );
        assert_eq!(p.store_replicas, 0);
        assert_eq!(p.images, None);
        assert!(p.waiting);
        let (reason, message) = p.condition.unwrap();
        assert_eq!(reason, REASON_STOPPING_STORES);
        assert!(message.contains("corp-lun-0-0, corp-lun-0-1"), "{message}");
        let p = plan(LUN, &obs(true, Some(0), &["corp-lun-0-1"], primary.clone()));
        assert_eq!((p.store_replicas, p.images), (0, None));

        // No pod left: demote, and wait until csi-addons reports it.
        let p = plan(LUN, &obs(true, Some(0), &[], primary));
        assert_eq!(p.store_replicas, 0);
        assert_eq!(p.images, Some(ImageState::Secondary));
        assert!(p.waiting);
        assert!(p
            .condition
            .unwrap()
            .1
            .contains("mail-corp-lun-0-0 to report Secondary"));

        let secondary = observed(&[
            ("mail-corp-lun-0-0", vr("secondary", Some("Secondary"))),
            ("mail-corp-lun-0-1", vr("secondary", Some("Secondary"))),
        ]);
        let p = plan(LUN, &obs(true, Some(0), &[], secondary));
        assert_eq!(p.images, Some(ImageState::Secondary));
        assert!(!p.waiting);
        assert_eq!(p.condition.unwrap().0, REASON_FENCED);
    }

    #[test]
    fn promotion_sets_the_images_primary_before_starting_the_stores() {
        // Just unfenced: the images were secondary.
        let secondary = observed(&[
            ("mail-corp-lun-0-0", vr("secondary", Some("Secondary"))),
            ("mail-corp-lun-0-1", vr("secondary", Some("Secondary"))),
        ]);
        let p = plan(LUN, &obs(false, Some(0), &[], secondary));
        assert_eq!(p.store_replicas, 0);
        assert_eq!(p.images, Some(ImageState::Primary));
        assert!(p.waiting);
        let (reason, message) = p.condition.unwrap();
        assert_eq!(reason, REASON_AWAITING_PRIMARY);
        assert_eq!(
            message,
            "waiting for VolumeReplication mail-corp-lun-0-0 to report Primary before starting the stores"
        );

        // Asked, one reported, and one whose status still shows the old state.
        let half = observed(&[
            ("mail-corp-lun-0-0", vr("primary", Some("Primary"))),
            ("mail-corp-lun-0-1", vr("primary", Some("Secondary"))),
        ]);
        let p = plan(LUN, &obs(false, Some(0), &[], half));
        assert_eq!(p.store_replicas, 0);
        assert!(p.condition.unwrap().1.contains("mail-corp-lun-0-1"));

        let both = observed(&[
            ("mail-corp-lun-0-0", vr("primary", Some("Primary"))),
            ("mail-corp-lun-0-1", vr("primary", Some("Primary"))),
        ]);
        let p = plan(LUN, &obs(false, Some(0), &[], both));
        assert_eq!(p.store_replicas, 2);
        assert_eq!(p.images, Some(ImageState::Primary));
        assert_eq!(p.condition, None);
        assert!(!p.waiting);
    }

    #[test]
    fn claims_not_yet_bound_and_serving_stores_are_not_held_back() {
        // A new LUN: no StatefulSet, no claim bound (its volumes are provisioned primary).
        let mut o = obs(false, None, &[], observed(&[]));
        o.bound.clear();
        let p = plan(LUN, &o);
        assert_eq!(p.store_replicas, 2);
        assert_eq!(p.images, Some(ImageState::Primary));
        // Only bound claims are waited for.
        o.bound = vec![1];
        o.replications = observed(&[("mail-corp-lun-0-1", vr("primary", Some("Primary")))]);
        assert_eq!(plan(LUN, &o).store_replicas, 2);
        // Stores already running are never scaled down for want of a status.
        let p = plan(LUN, &obs(false, Some(2), &["corp-lun-0-0"], observed(&[])));
        assert_eq!(p.store_replicas, 2);
        assert!(!p.waiting);
    }

    #[test]
    fn without_csi_addons_fencing_still_stops_the_stores() {
        let broken = Observed {
            issue: Some("VolumeReplicationClass `x` not found".into()),
            ..Default::default()
        };
        let p = plan(LUN, &obs(true, Some(2), &["corp-lun-0-0"], broken.clone()));
        assert_eq!((p.store_replicas, p.images), (0, None));
        let p = plan(LUN, &obs(false, Some(0), &[], broken));
        assert_eq!((p.store_replicas, p.images), (2, None));
    }

    #[test]
    fn lag_is_the_age_of_the_oldest_sync_or_zero_once_demoted_in_sync() {
        let now: Timestamp = "2030-01-01T00:01:00.900Z".parse().unwrap();
        let synced = |t: &str| LiveReplication {
            last_sync: Some(t.parse().unwrap()),
            ..vr("primary", Some("Primary"))
        };
        let live: BTreeMap<String, LiveReplication> = [
            ("a".to_string(), synced("2030-01-01T00:00:50Z")),
            ("b".to_string(), synced("2030-01-01T00:00:30Z")),
            ("c".to_string(), vr("primary", Some("Primary"))),
        ]
        .into();
        assert_eq!(lag(false, &live, now), Some(30.0));
        assert_eq!(lag(true, &live, now), None, "fenced, images still primary");
        // Fenced and demoted: 0 only once every image reports the other site holds all of it.
        let demoted = |in_sync| LiveReplication {
            demoted_in_sync: in_sync,
            ..vr("secondary", Some("Secondary"))
        };
        let one_left: BTreeMap<String, LiveReplication> = [
            ("a".to_string(), demoted(true)),
            ("b".to_string(), demoted(false)),
        ]
        .into();
        assert_eq!(lag(true, &one_left, now), None);
        let both: BTreeMap<String, LiveReplication> = [
            ("a".to_string(), demoted(true)),
            ("b".to_string(), demoted(true)),
        ]
        .into();
        assert_eq!(lag(true, &both, now), Some(0.0));
        assert_eq!(lag(true, &BTreeMap::new(), now), None);
        let unreported: BTreeMap<String, LiveReplication> =
            [("c".to_string(), vr("primary", Some("Primary")))].into();
        assert_eq!(lag(false, &unreported, now), None);
        // A sync time ahead of this clock is no lag, not a negative one.
        let ahead: BTreeMap<String, LiveReplication> =
            [("a".to_string(), synced("2030-01-01T00:02:00Z"))].into();
        assert_eq!(lag(false, &ahead, now), Some(0.0));
    }
}
