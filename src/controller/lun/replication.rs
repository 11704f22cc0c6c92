//! Method `Volume`: a csi-addons `VolumeReplication` (replication.storage.openshift.io/v1alpha1) per
//! replica PVC, so storage that mirrors blocks (Ceph RBD mirroring) replicates each store volume. Every
//! PVC stays `primary` here: a store pod mounts its volume read-write, and a `secondary` image is
//! read-only. The peer site's copy is what the mirroring feeds; site failover flips states there.

use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::{Client, ResourceExt};
use serde_json::{json, Value};

use crate::controller::apply::is_subset;
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

/// One VolumeReplication per replica PVC, named after the PVC.
pub fn build(lun: &StorageLUN) -> Vec<Value> {
    let name = lun.name_any();
    let class = lun
        .spec
        .replication
        .volume_replication_class
        .clone()
        .unwrap_or_default();
    let mut labels = labels(&lun.spec.mail_pod, COMPONENT);
    labels.insert(l::LUN.to_string(), name.clone());
    (0..lun.spec.replicas())
        .map(|ordinal| {
            let pvc = names::lun_pvc(&name, ordinal);
            json!({
                "apiVersion": format!("{GROUP}/v1alpha1"),
                "kind": "VolumeReplication",
                "metadata": {
                    "name": pvc,
                    "namespace": lun.namespace(),
                    "labels": labels,
                    "ownerReferences": [owner_reference(lun)],
                },
                "spec": {
                    "volumeReplicationClass": class,
                    "replicationState": "primary",
                    "dataSource": {"apiGroup": "", "kind": "PersistentVolumeClaim", "name": pvc},
                    "autoResync": true,
                }
            })
        })
        .collect()
}

/// Applies the LUN's VolumeReplications. Returns a problem to report (CRDs not installed, class missing)
/// rather than an error: retrying does not fix either, and the store serves meanwhile.
pub async fn apply(client: &Client, lun: &StorageLUN) -> Result<Option<String>> {
    let ns = lun.namespace().unwrap_or_default();
    let class = lun
        .spec
        .replication
        .volume_replication_class
        .clone()
        .unwrap_or_default();
    let classes: Api<DynamicObject> = Api::all_with(client.clone(), &class_resource());
    match classes.get_opt(&class).await {
        Ok(Some(_)) => {}
        Ok(None) => {
            return Ok(Some(format!(
                "VolumeReplicationClass `{class}` (spec.replication.volumeReplicationClass) not found"
            )))
        }
        Err(kube::Error::Api(s)) if s.code == 404 => {
            return Ok(Some(format!(
                "VolumeReplication ({GROUP}/v1alpha1) is not served by this cluster: install csi-addons"
            )))
        }
        Err(source) => {
            return Err(Error::Read {
                what: format!("VolumeReplicationClass {class}"),
                source,
            })
        }
    }
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &ns, &replication_resource());
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    for body in build(lun) {
        let name = body["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let live = api.get_opt(&name).await.map_err(|source| Error::Read {
            what: format!("VolumeReplication {name}"),
            source,
        })?;
        if let Some(live) = live {
            if is_subset(&body, &serde_json::to_value(&live).unwrap_or_default()) {
                continue;
            }
        }
        api.patch(&name, &pp, &Patch::Apply(&body))
            .await
            .map_err(|source| Error::Apply {
                kind: "VolumeReplication",
                name,
                source,
            })?;
    }
    Ok(None)
}
