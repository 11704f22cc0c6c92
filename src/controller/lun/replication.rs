//! Method `Volume`: a csi-addons `VolumeReplication` (replication.storage.openshift.io/v1alpha1) per
//! replica PVC, so storage that mirrors blocks (Ceph RBD mirroring) replicates each store volume to the
//! other site. The state follows fencing: an unfenced LUN's images are `primary` (its stores mount them
//! read-write), a fenced LUN's are `secondary` (read-only, fed by the other site; `autoResync` lets a
//! returned old primary's diverged image resync from the new primary). When to switch is
//! [`super::volume`]'s decision: never while a store pod could still write, never before the images report
//! `Primary`.

use std::collections::BTreeMap;

use jiff::Timestamp;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::{Client, ResourceExt};
use serde_json::{json, Value};

use crate::controller::apply::{applied_with, with_applied_hash};
use crate::controller::{Error, Result};
use crate::crd::StorageLUN;
use crate::names::{self, labels as l, FIELD_MANAGER};
use crate::resources::{labels, owner_reference};

pub const GROUP: &str = "replication.storage.openshift.io";
pub const COMPONENT: &str = "replication";

pub fn replication_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(GROUP, "v1alpha1", "VolumeReplication"),
        "volumereplications",
    )
}

pub fn class_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(GROUP, "v1alpha1", "VolumeReplicationClass"),
        "volumereplicationclasses",
    )
}

/// `spec.replicationState` of a VolumeReplication.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageState {
    /// Writable here; mirrored to the other site.
    Primary,
    /// Read-only here; fed from the other site.
    Secondary,
}

impl ImageState {
    /// The state a LUN's images have once it settles: secondary while fenced.
    pub fn settled(lun: &StorageLUN) -> Self {
        if lun.spec.fenced {
            ImageState::Secondary
        } else {
            ImageState::Primary
        }
    }

    /// As `spec.replicationState` spells it.
    pub fn spec_value(self) -> &'static str {
        match self {
            ImageState::Primary => "primary",
            ImageState::Secondary => "secondary",
        }
    }

    /// As csi-addons reports it in `status.state`.
    pub fn status_value(self) -> &'static str {
        match self {
            ImageState::Primary => "Primary",
            ImageState::Secondary => "Secondary",
        }
    }
}

/// Name of the VolumeReplication of replica `ordinal`: the PVC's own name.
pub fn name(lun: &str, ordinal: i32) -> String {
    names::lun_pvc(lun, ordinal)
}

/// One VolumeReplication per replica PVC, named after the PVC, in the state the LUN settles in.
pub fn build(lun: &StorageLUN) -> Vec<Value> {
    build_in(lun, ImageState::settled(lun))
}

/// One VolumeReplication per replica PVC, in `state`.
pub fn build_in(lun: &StorageLUN, state: ImageState) -> Vec<Value> {
    let lun_name = lun.name_any();
    let class = lun
        .spec
        .replication
        .volume_replication_class
        .clone()
        .unwrap_or_default();
    let mut labels = labels(&lun.spec.mail_pod, COMPONENT);
    labels.insert(l::LUN.to_string(), lun_name.clone());
    (0..lun.spec.replicas())
        .map(|ordinal| {
            let pvc = names::lun_pvc(&lun_name, ordinal);
            json!({
                "apiVersion": format!("{GROUP}/v1alpha1"),
                "kind": "VolumeReplication",
                "metadata": {
                    "name": name(&lun_name, ordinal),
                    "namespace": lun.namespace(),
                    "labels": labels,
                    "ownerReferences": [owner_reference(lun)],
                },
                "spec": {
                    "volumeReplicationClass": class,
                    "replicationState": state.spec_value(),
                    "dataSource": {"apiGroup": "", "kind": "PersistentVolumeClaim", "name": pvc},
                    "autoResync": true,
                }
            })
        })
        .collect()
}

/// A VolumeReplication as read back: what it was asked and what csi-addons reports.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LiveReplication {
    /// `spec.replicationState` (`primary`, `secondary`).
    pub requested: Option<String>,
    /// `status.state` (`Primary`, `Secondary`, `Unknown`).
    pub state: Option<String>,
    /// `status.lastSyncTime`: the newest point in time the other site's copy holds (primary only).
    pub last_sync: Option<Timestamp>,
    /// The status describes the current spec: csi-addons' `status.observedGeneration` equals
    /// `metadata.generation` (or either is not reported).
    pub current: bool,
    /// csi-addons' conditions for the current generation say the image was demoted and the other site
    /// holds all of it: `Completed` True, `Degraded` False, `Resyncing` False. After a demotion csi-addons
    /// reports `Degraded` True until the storage has shipped the image's last writes (the demotion
    /// snapshot, for RBD) to the other site; it then sets `Degraded` False (reason `Healthy`).
    pub demoted_in_sync: bool,
}

impl LiveReplication {
    pub fn from_object(obj: &DynamicObject) -> Self {
        let status = obj.data.get("status");
        let observed = status
            .and_then(|s| s.get("observedGeneration"))
            .and_then(Value::as_i64);
        let current = match (observed, obj.metadata.generation) {
            (Some(o), Some(g)) => o == g,
            _ => true,
        };
        Self {
            requested: obj.data["spec"]["replicationState"]
                .as_str()
                .map(String::from),
            state: status
                .and_then(|s| s.get("state"))
                .and_then(Value::as_str)
                .map(String::from),
            last_sync: status
                .and_then(|s| s.get("lastSyncTime"))
                .and_then(Value::as_str)
                .and_then(|t| t.parse().ok()),
            current,
            demoted_in_sync: demoted_in_sync(status, obj.metadata.generation),
        }
    }

    /// The image is in `state`, as asked and as reported for the current request: a status left over from
    /// before a state change does not count.
    pub fn reports(&self, state: ImageState) -> bool {
        self.requested.as_deref() == Some(state.spec_value())
            && self.state.as_deref() == Some(state.status_value())
            && self.current
    }
}

/// `Completed` True, `Degraded` False and `Resyncing` False, each for `generation` when it says which.
fn demoted_in_sync(status: Option<&Value>, generation: Option<i64>) -> bool {
    let conditions = status
        .and_then(|s| s.get("conditions"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let is = |type_: &str, want: &str| {
        conditions.iter().any(|c| {
            c["type"] == type_
                && c["status"] == want
                && match (c["observedGeneration"].as_i64(), generation) {
                    (Some(o), Some(g)) => o == g,
                    _ => true,
                }
        })
    };
    is("Completed", "True") && is("Degraded", "False") && is("Resyncing", "False")
}

/// What the cluster holds for a LUN's VolumeReplications.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observed {
    /// A problem that keeps replication from working at all (CRDs not installed, class missing): reported
    /// rather than retried, since retrying fixes neither.
    pub issue: Option<String>,
    /// Existing VolumeReplications by name.
    pub live: BTreeMap<String, LiveReplication>,
    /// The same objects as read, so [`apply`] compares against them without reading again.
    pub objects: BTreeMap<String, Value>,
}

/// Reads the class and every VolumeReplication of the LUN.
pub async fn observe(client: &Client, lun: &StorageLUN) -> Result<Observed> {
    let ns = lun.namespace().unwrap_or_default();
    let class = lun
        .spec
        .replication
        .volume_replication_class
        .clone()
        .unwrap_or_default();
    let classes: Api<DynamicObject> = Api::all_with(client.clone(), &class_resource());
    let issue = match classes.get_opt(&class).await {
        Ok(Some(_)) => None,
        Ok(None) => Some(format!(
            "VolumeReplicationClass `{class}` (spec.replication.volumeReplicationClass) not found"
        )),
        Err(kube::Error::Api(s)) if s.code == 404 => Some(format!(
            "VolumeReplication ({GROUP}/v1alpha1) is not served by this cluster: install csi-addons"
        )),
        Err(source) => {
            return Err(Error::Read {
                what: format!("VolumeReplicationClass {class}"),
                source,
            })
        }
    };
    if issue.is_some() {
        return Ok(Observed {
            issue,
            ..Default::default()
        });
    }
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &ns, &replication_resource());
    let mut live = BTreeMap::new();
    let mut objects = BTreeMap::new();
    for ordinal in 0..lun.spec.replicas() {
        let vr = name(&lun.name_any(), ordinal);
        let got = api.get_opt(&vr).await.map_err(|source| Error::Read {
            what: format!("VolumeReplication {vr}"),
            source,
        })?;
        if let Some(obj) = got {
            live.insert(vr.clone(), LiveReplication::from_object(&obj));
            objects.insert(vr, serde_json::to_value(&obj).unwrap_or_default());
        }
    }
    Ok(Observed {
        issue: None,
        live,
        objects,
    })
}

/// Applies the LUN's VolumeReplications in `state`, skipping those already as desired in `observed` (read
/// this pass by [`observe`]). Returns the names written.
pub async fn apply(
    client: &Client,
    lun: &StorageLUN,
    state: ImageState,
    observed: &Observed,
) -> Result<Vec<String>> {
    let ns = lun.namespace().unwrap_or_default();
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &ns, &replication_resource());
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    let mut written = vec![];
    for body in build_in(lun, state) {
        let (body, hash) = with_applied_hash(body);
        let name = body["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if observed
            .objects
            .get(&name)
            .is_some_and(|live| applied_with(live, &hash))
        {
            continue;
        }
        api.patch(&name, &pp, &Patch::Apply(&body))
            .await
            .map_err(|source| Error::Apply {
                kind: "VolumeReplication",
                name: name.clone(),
                source,
            })?;
        written.push(name);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lun(fenced: bool) -> StorageLUN {
        serde_json::from_value(json!({
            "apiVersion": "mailpod.io/v1alpha1", "kind": "StorageLUN",
            "metadata": {"name": "corp-lun-0", "namespace": "mail", "uid": "u-1"},
            "spec": {"mailPod": "corp", "index": 0, "capacity": "1Gi", "standbys": 1,
                     "replication": {"method": "Volume", "volumeReplicationClass": "rbd-mirror"},
                     "fenced": fenced}
        }))
        .unwrap()
    }

    #[test]
    fn one_replication_per_replica_pvc_whose_state_follows_fencing() {
        let unfenced = build(&lun(false));
        assert_eq!(unfenced.len(), 2);
        for (i, vr) in unfenced.iter().enumerate() {
            let pvc = format!("mail-corp-lun-0-{i}");
            assert_eq!(vr["metadata"]["name"], pvc.as_str());
            assert_eq!(vr["spec"]["dataSource"]["name"], pvc.as_str());
            assert_eq!(vr["spec"]["dataSource"]["kind"], "PersistentVolumeClaim");
            assert_eq!(vr["spec"]["replicationState"], "primary");
            assert_eq!(vr["spec"]["volumeReplicationClass"], "rbd-mirror");
            assert_eq!(vr["spec"]["autoResync"], true);
            assert_eq!(vr["metadata"]["labels"]["mailpod.io/lun"], "corp-lun-0");
            assert_eq!(vr["metadata"]["ownerReferences"][0]["uid"], "u-1");
        }
        let fenced = build(&lun(true));
        assert!(fenced
            .iter()
            .all(|vr| vr["spec"]["replicationState"] == "secondary"
                && vr["spec"]["autoResync"] == true));
        // Only the state differs.
        let mut a = unfenced[0].clone();
        let mut b = fenced[0].clone();
        a["spec"]["replicationState"] = Value::Null;
        b["spec"]["replicationState"] = Value::Null;
        assert_eq!(a, b);
    }

    fn live(spec: &str, status: Value, generation: Option<i64>) -> LiveReplication {
        let mut obj: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "replication.storage.openshift.io/v1alpha1", "kind": "VolumeReplication",
            "metadata": {"name": "mail-corp-lun-0-0"},
            "spec": {"replicationState": spec},
            "status": status,
        }))
        .unwrap();
        obj.metadata.generation = generation;
        LiveReplication::from_object(&obj)
    }

    #[test]
    fn a_state_counts_only_when_asked_for_and_reported_for_the_current_generation() {
        let ok = live(
            "primary",
            json!({"state": "Primary", "observedGeneration": 3, "lastSyncTime": "2030-01-01T00:00:00Z"}),
            Some(3),
        );
        assert!(ok.reports(ImageState::Primary));
        assert!(!ok.reports(ImageState::Secondary));
        assert_eq!(ok.last_sync, Some("2030-01-01T00:00:00Z".parse().unwrap()));
        // Asked to become primary, but the status still describes the secondary it was.
        let stale = live(
            "primary",
            json!({"state": "Primary", "observedGeneration": 2}),
            Some(3),
        );
        assert!(!stale.reports(ImageState::Primary));
        // Demotion asked for, status not yet updated.
        let demoting = live("secondary", json!({"state": "Primary"}), Some(4));
        assert!(!demoting.reports(ImageState::Primary));
        assert!(!demoting.reports(ImageState::Secondary));
        // No status yet.
        assert!(!live("primary", json!({}), Some(1)).reports(ImageState::Primary));
        // No generation bookkeeping at all: the state alone decides.
        assert!(
            live("secondary", json!({"state": "Secondary"}), None).reports(ImageState::Secondary)
        );
    }

    #[test]
    fn demoted_in_sync_needs_all_three_conditions_for_the_current_generation() {
        let cond = |t: &str, st: &str, g: i64| json!({"type": t, "status": st, "observedGeneration": g, "reason": "x", "message": "", "lastTransitionTime": "2030-01-01T00:00:00Z"});
        let synced = json!({"state": "Secondary", "observedGeneration": 3, "conditions": [
            cond("Completed", "True", 3), cond("Degraded", "False", 3), cond("Resyncing", "False", 3)]});
        assert!(live("secondary", synced, Some(3)).demoted_in_sync);
        // Just demoted: csi-addons reports Degraded until the last writes reached the other site.
        let shipping = json!({"state": "Secondary", "observedGeneration": 3, "conditions": [
            cond("Completed", "True", 3), cond("Degraded", "True", 3), cond("Resyncing", "False", 3)]});
        assert!(!live("secondary", shipping, Some(3)).demoted_in_sync);
        // Conditions from an earlier request (the promotion before) do not count.
        let stale = json!({"state": "Secondary", "conditions": [
            cond("Completed", "True", 2), cond("Degraded", "False", 2), cond("Resyncing", "False", 2)]});
        assert!(!live("secondary", stale, Some(3)).demoted_in_sync);
        assert!(!live("secondary", json!({"state": "Secondary"}), Some(3)).demoted_in_sync);
    }
}
