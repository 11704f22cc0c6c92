//! Playing the parts of a cluster that the in-memory API does not run, for block replication
//! (`replication.method: Volume`): csi-addons (VolumeReplicationClass, VolumeReplication status), the
//! provisioner and PV controller (bound claims and their CSI volumes), and the StatefulSet controller
//! (store pods that follow the StatefulSet's replicas).
#![allow(dead_code)] // each test binary uses a different part

use jiff::Timestamp;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::ResourceExt;
use mailpod_operator::controller::lun::replication;
use mailpod_operator::testkit::ApiServer;
use serde_json::json;

pub const CLASS: &str = "rbd-mirror";
pub const DRIVER: &str = "rbd.csi.ceph.com";

pub async fn create_replication_class(server: &ApiServer) {
    let class: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "replication.storage.openshift.io/v1alpha1", "kind": "VolumeReplicationClass",
        "metadata": {"name": CLASS},
        "spec": {"provisioner": DRIVER, "parameters": {"mirroringMode": "snapshot", "schedulingInterval": "1m"}}
    }))
    .unwrap();
    Api::<DynamicObject>::all_with(server.client(), &replication::class_resource())
        .create(&PostParams::default(), &class)
        .await
        .unwrap();
}

fn replications(server: &ApiServer, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(server.client(), ns, &replication::replication_resource())
}

/// `spec.replicationState` of a VolumeReplication, if it exists.
pub async fn requested_state(server: &ApiServer, ns: &str, name: &str) -> Option<String> {
    replications(server, ns)
        .get_opt(name)
        .await
        .unwrap()
        .and_then(|o| {
            o.data["spec"]["replicationState"]
                .as_str()
                .map(String::from)
        })
}

/// Every VolumeReplication of the namespace: name -> requested state.
pub async fn requested_states(server: &ApiServer, ns: &str) -> Vec<(String, String)> {
    replications(server, ns)
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|o| {
            (
                o.name_any(),
                o.data["spec"]["replicationState"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect()
}

/// csi-addons reporting `state` (`Primary`, `Secondary`) for the VolumeReplication's current generation,
/// with `lastSyncTime` when given.
pub async fn report_state(
    server: &ApiServer,
    ns: &str,
    name: &str,
    state: &str,
    last_sync: Option<Timestamp>,
) {
    let api = replications(server, ns);
    let vr = api.get(name).await.unwrap();
    let generation = vr.metadata.generation.unwrap_or(1);
    report_state_for(server, ns, name, state, generation, last_sync).await;
}

/// As [`report_state`], for a chosen `observedGeneration` (an older one is a stale status).
pub async fn report_state_for(
    server: &ApiServer,
    ns: &str,
    name: &str,
    state: &str,
    generation: i64,
    last_sync: Option<Timestamp>,
) {
    let status = json!({"status": {
        "state": state,
        "observedGeneration": generation,
        "lastSyncTime": last_sync.map(|t| t.to_string()),
    }});
    replications(server, ns)
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
}

/// csi-addons reporting a demoted image whose last writes the other site now holds: state `Secondary`,
/// `Completed` True, `Degraded` False (reason `Healthy`), `Resyncing` False, for the current generation.
pub async fn report_demoted_in_sync(server: &ApiServer, ns: &str, name: &str) {
    let api = replications(server, ns);
    let generation = api
        .get(name)
        .await
        .unwrap()
        .metadata
        .generation
        .unwrap_or(1);
    let cond = |t: &str, status: &str, reason: &str| {
        json!({"type": t, "status": status, "reason": reason, "message": "", "observedGeneration": generation,
               "lastTransitionTime": "2030-01-01T00:00:00Z"})
    };
    let status = json!({"status": {
        "state": "Secondary",
        "observedGeneration": generation,
        "lastSyncTime": null,
        "conditions": [
            cond("Completed", "True", "Demoted"),
            cond("Degraded", "False", "Healthy"),
            cond("Resyncing", "False", "NotResyncing"),
        ],
    }});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
}

/// The RBD image handle of a volume (what Ceph-CSI puts in `volumeHandle`).
pub fn handle(pv: &str) -> String {
    format!("0001-0009-rook-ceph-0000000000000002-{pv}")
}

/// What the provisioner and PV controller do for a store claim: a CSI PersistentVolume `pv` (Delete, as
/// dynamically provisioned), and the claim Bound to it. The claim is created if missing, with `labels`.
pub async fn provision_bound_claim(
    server: &ApiServer,
    ns: &str,
    claim: &str,
    pv: &str,
    labels: serde_json::Value,
) {
    let volume: PersistentVolume = serde_json::from_value(json!({
        "metadata": {"name": pv, "annotations": {"pv.kubernetes.io/provisioned-by": DRIVER}},
        "spec": {
            "capacity": {"storage": "1Gi"},
            "accessModes": ["ReadWriteOnce"],
            "volumeMode": "Filesystem",
            "storageClassName": "ceph-rbd",
            "persistentVolumeReclaimPolicy": "Delete",
            "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "namespace": ns, "name": claim},
            "csi": {"driver": DRIVER, "fsType": "ext4", "volumeHandle": handle(pv),
                    "volumeAttributes": {"clusterID": "rook-ceph", "pool": "mail", "imageName": format!("csi-vol-{pv}")},
                    "nodeStageSecretRef": {"name": "rook-csi-rbd-node", "namespace": "rook-ceph"}}
        }
    }))
    .unwrap();
    Api::<PersistentVolume>::all(server.client())
        .create(&PostParams::default(), &volume)
        .await
        .unwrap();
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(server.client(), ns);
    if claims.get_opt(claim).await.unwrap().is_none() {
        let pvc: PersistentVolumeClaim = serde_json::from_value(json!({
            "metadata": {"name": claim, "namespace": ns, "labels": labels},
            "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "ceph-rbd",
                     "resources": {"requests": {"storage": "1Gi"}}}
        }))
        .unwrap();
        claims.create(&PostParams::default(), &pvc).await.unwrap();
    }
    claims
        .patch(
            claim,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"volumeName": pv}})),
        )
        .await
        .unwrap();
    bind(server, ns, claim).await;
}

/// The PV controller binding a claim that names its volume (`status.phase: Bound`).
pub async fn bind(server: &ApiServer, ns: &str, claim: &str) {
    Api::<PersistentVolumeClaim>::namespaced(server.client(), ns)
        .patch_status(
            claim,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Bound"}})),
        )
        .await
        .unwrap();
}

/// The StatefulSet controller for a LUN's store StatefulSet: ready store pods for ordinals below its
/// replicas, the others deleted. Returns the replicas it followed.
pub async fn follow_statefulset(server: &ApiServer, ns: &str, lun: &str) -> i32 {
    let Some(sts) = Api::<StatefulSet>::namespaced(server.client(), ns)
        .get_opt(lun)
        .await
        .unwrap()
    else {
        return 0;
    };
    let replicas = sts.spec.and_then(|s| s.replicas).unwrap_or(0);
    let pods: Api<Pod> = Api::namespaced(server.client(), ns);
    for ordinal in 0..5 {
        let name = format!("{lun}-{ordinal}");
        let exists = pods.get_opt(&name).await.unwrap().is_some();
        if ordinal < replicas && !exists {
            let pod: Pod = serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": ns,
                             "labels": {"mailpod.io/lun": lun, "app.kubernetes.io/component": "store"}},
                "spec": {"containers": [{"name": "store", "image": "x"}]}
            }))
            .unwrap();
            pods.create(&PostParams::default(), &pod).await.unwrap();
            let status = json!({"status": {"podIP": "10.0.0.1", "conditions": [{
                "type": "Ready", "status": "True", "lastTransitionTime": "2024-01-01T00:00:00Z"}]}});
            pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(status))
                .await
                .unwrap();
        } else if ordinal >= replicas && exists {
            pods.delete(&name, &DeleteParams::default()).await.unwrap();
        }
    }
    replicas
}

/// `spec.replicas` of a LUN's store StatefulSet.
pub fn store_replicas(server: &ApiServer, ns: &str, lun: &str) -> Option<i32> {
    server
        .get::<StatefulSet>(ns, lun)
        .and_then(|s| s.spec)
        .and_then(|s| s.replicas)
}
