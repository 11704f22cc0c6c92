//! `VolumeSnapshot` objects (snapshot.storage.k8s.io/v1) of a LUN: names, the object, its state, and which
//! ones pruning removes. Pure; the snapshot command does the I/O.

use jiff::Timestamp;
use kube::api::{ApiResource, DynamicObject};
use kube::core::GroupVersionKind;
use kube::ResourceExt;
use serde_json::json;

use crate::crd::StorageLUN;
use crate::names::labels as l;
use crate::resources::labels;

pub const GROUP: &str = "snapshot.storage.k8s.io";
/// Component label of VolumeSnapshots this operator makes.
pub const COMPONENT: &str = "snapshot";
/// Marks the default VolumeSnapshotClass of a cluster.
pub const DEFAULT_CLASS_ANNOTATION: &str = "snapshot.storage.kubernetes.io/is-default-class";

pub fn snapshot_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(GROUP, "v1", "VolumeSnapshot"),
        "volumesnapshots",
    )
}

pub fn class_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(GROUP, "v1", "VolumeSnapshotClass"),
        "volumesnapshotclasses",
    )
}

/// `corp-lun-0-20240101-080000`: sorts by time, and says which LUN it belongs to.
pub fn snapshot_name(lun: &str, at: Timestamp) -> String {
    format!("{lun}-{}", at.strftime("%Y%m%d-%H%M%S"))
}

/// Label selector of the VolumeSnapshots a LUN made (the only ones pruning may touch).
pub fn selector(lun: &str) -> String {
    format!("{}={lun},{}={}", l::LUN, l::MANAGED_BY, l::MANAGER)
}

/// A VolumeSnapshot of `pvc`, labelled with its LUN (and MailPod) but not owned by it: a backup must outlive
/// what it backs up, so deleting the LUN or its MailPod never garbage-collects a snapshot (nor, with a
/// `deletionPolicy: Delete` class, its data). Retention prunes them by label; past that they are
/// deleted by hand.
pub fn build(lun: &StorageLUN, name: &str, pvc: &str, class: Option<&str>) -> DynamicObject {
    let mut labels = labels(&lun.spec.mail_pod, COMPONENT);
    labels.insert(l::LUN.to_string(), lun.name_any());
    let mut spec = json!({ "source": { "persistentVolumeClaimName": pvc } });
    if let Some(class) = class {
        spec["volumeSnapshotClassName"] = json!(class);
    }
    let mut obj = DynamicObject::new(name, &snapshot_resource()).data(json!({ "spec": spec }));
    obj.metadata.namespace = lun.namespace();
    obj.metadata.labels = Some(labels);
    obj
}

/// What the snapshot controller reports on a VolumeSnapshot.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SnapshotState {
    /// The point in time the snapshot was cut (`status.creationTime`): writes after it are not in it.
    pub cut: bool,
    pub ready_to_use: bool,
    pub error: Option<String>,
}

pub fn state(obj: &DynamicObject) -> SnapshotState {
    let status = &obj.data["status"];
    SnapshotState {
        cut: status["creationTime"].is_string(),
        ready_to_use: status["readyToUse"].as_bool().unwrap_or(false),
        error: status["error"]["message"].as_str().map(str::to_string),
    }
}

/// When a VolumeSnapshot was made: `status.creationTime`, else the object's creation.
pub fn created_at(obj: &DynamicObject) -> Option<Timestamp> {
    obj.data["status"]["creationTime"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .or(obj.metadata.creation_timestamp.as_ref().map(|t| t.0))
}

/// The LUN's snapshots newest first: by creation time, then by name (which embeds the time).
pub fn newest_first(mut snaps: Vec<DynamicObject>) -> Vec<DynamicObject> {
    snaps.sort_by(|a, b| {
        created_at(b)
            .cmp(&created_at(a))
            .then_with(|| b.name_any().cmp(&a.name_any()))
    });
    snaps
}

/// Which of `snaps` (this LUN's, already selected by label) to delete to keep the newest `retain`.
/// Objects labelled for another LUN are never returned, whatever the caller passed.
pub fn to_prune(lun: &str, snaps: Vec<DynamicObject>, retain: usize) -> Vec<DynamicObject> {
    let own: Vec<_> = snaps
        .into_iter()
        .filter(|s| s.labels().get(l::LUN).map(String::as_str) == Some(lun))
        .filter(|s| s.metadata.deletion_timestamp.is_none())
        .collect();
    newest_first(own).into_iter().skip(retain).collect()
}

/// Whether `classes` has one marked default.
pub fn has_default_class(classes: &[DynamicObject]) -> bool {
    classes.iter().any(|c| {
        c.annotations()
            .get(DEFAULT_CLASS_ANNOTATION)
            .map(String::as_str)
            == Some("true")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(name: &str, lun: &str, created: &str) -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
            "metadata": {"name": name, "labels": {"mailpod.io/lun": lun}},
            "status": {"creationTime": created}
        }))
        .unwrap()
    }

    #[test]
    fn prunes_the_oldest_beyond_retain_and_only_this_luns() {
        let snaps = vec![
            snap("a-1", "a", "2024-01-01T00:00:00Z"),
            snap("a-3", "a", "2024-01-03T00:00:00Z"),
            snap("b-0", "b", "2023-01-01T00:00:00Z"),
            snap("a-2", "a", "2024-01-02T00:00:00Z"),
        ];
        let gone: Vec<_> = to_prune("a", snaps, 2)
            .iter()
            .map(|s| s.name_any())
            .collect();
        assert_eq!(gone, ["a-1"]);
    }

    #[test]
    fn names_sort_by_time() {
        let t: Timestamp = "2024-03-05T08:00:09Z".parse().unwrap();
        assert_eq!(snapshot_name("corp-lun-0", t), "corp-lun-0-20240305-080009");
    }
}
