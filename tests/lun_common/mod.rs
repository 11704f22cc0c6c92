//! Fixtures shared by the StorageLUN tests: a LUN with store pods in the in-memory API, a snapshot class,
//! a stand-in for the CSI snapshot controller, and a store agent that counts pause/resume calls.
#![allow(dead_code)] // each test binary uses a different part

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::ResourceExt;
use mailpod_operator::crd::StorageLUN;
use mailpod_operator::snapshot::{volume, StoreAgent};
use mailpod_operator::testkit::ApiServer;
use serde_json::json;

pub const NS: &str = "mail";

pub fn lun(name: &str, mailboxes: &[&str], max_users: u32) -> StorageLUN {
    serde_json::from_value(json!({
        "apiVersion": "mailpod.io/v1alpha1", "kind": "StorageLUN",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"mailPod": "corp", "index": 0, "capacity": "1Gi", "standbys": 1,
                 "maxUsers": max_users, "mailboxes": mailboxes,
                 "failoverThresholdSeconds": 30,
                 "snapshots": {"retain": 2, "maxPauseSeconds": 5}}
    }))
    .unwrap()
}

pub async fn create_lun(server: &ApiServer, lun: &StorageLUN) -> StorageLUN {
    Api::<StorageLUN>::namespaced(server.client(), NS)
        .create(&PostParams::default(), lun)
        .await
        .unwrap()
}

pub async fn set_lun_status(server: &ApiServer, name: &str, status: serde_json::Value) {
    Api::<StorageLUN>::namespaced(server.client(), NS)
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": status })),
        )
        .await
        .unwrap();
}

/// Merges `spec` into StorageLUN `name`'s spec, as `kubectl patch --type=merge` would.
pub async fn patch_lun_spec(server: &ApiServer, name: &str, spec: serde_json::Value) {
    Api::<StorageLUN>::namespaced(server.client(), NS)
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": spec })),
        )
        .await
        .unwrap();
}

/// A store pod of `lun` as the StatefulSet would make it, with the readiness the test wants.
pub async fn create_pod(
    server: &ApiServer,
    lun: &str,
    ordinal: i32,
    ready: bool,
    role: Option<&str>,
) {
    let mut labels = json!({"mailpod.io/lun": lun, "app.kubernetes.io/component": "store"});
    if let Some(r) = role {
        labels["mailpod.io/role"] = json!(r);
    }
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": format!("{lun}-{ordinal}"), "namespace": NS, "labels": labels},
        "spec": {"containers": [{"name": "store", "image": "x"}]}
    }))
    .unwrap();
    let pods: Api<Pod> = Api::namespaced(server.client(), NS);
    pods.create(&PostParams::default(), &pod).await.unwrap();
    set_pod_ready(
        server,
        &format!("{lun}-{ordinal}"),
        ready,
        "2024-01-01T00:00:00Z",
    )
    .await;
}

pub async fn set_pod_ready(server: &ApiServer, name: &str, ready: bool, since: &str) {
    let status = json!({"status": {"podIP": "10.0.0.1", "conditions": [{
        "type": "Ready", "status": if ready {"True"} else {"False"}, "lastTransitionTime": since}]}});
    Api::<Pod>::namespaced(server.client(), NS)
        .patch_status(name, &PatchParams::default(), &Patch::Merge(status))
        .await
        .unwrap();
}

pub async fn create_default_snapshot_class(server: &ApiServer) {
    let class: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshotClass",
        "metadata": {"name": "csi-snap",
                     "annotations": {"snapshot.storage.kubernetes.io/is-default-class": "true"}},
        "driver": "test.csi", "deletionPolicy": "Delete"
    }))
    .unwrap();
    Api::<DynamicObject>::all_with(server.client(), &volume::class_resource())
        .create(&PostParams::default(), &class)
        .await
        .unwrap();
}

/// A VolumeSnapshot of `lun` made earlier, with its creation time.
pub async fn create_old_snapshot(server: &ApiServer, lun_name: &str, name: &str, created: &str) {
    let l = lun(lun_name, &[], 10);
    let obj = volume::build(&l, name, "pvc", None);
    let api: Api<DynamicObject> =
        Api::namespaced_with(server.client(), NS, &volume::snapshot_resource());
    api.create(&PostParams::default(), &obj).await.unwrap();
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"creationTime": created, "readyToUse": true}})),
    )
    .await
    .unwrap();
}

/// Plays the CSI snapshot controller: cuts every new VolumeSnapshot and, when `ready`, makes it usable.
pub fn snapshot_controller(server: &ApiServer, ready: bool) -> tokio::task::JoinHandle<()> {
    let api: Api<DynamicObject> =
        Api::namespaced_with(server.client(), NS, &volume::snapshot_resource());
    tokio::spawn(async move {
        loop {
            if let Ok(list) = api.list(&Default::default()).await {
                for s in list.items.iter().filter(|s| s.data["status"].is_null()) {
                    let status = json!({"status": {"creationTime": "2030-01-01T00:00:00Z", "readyToUse": ready}});
                    let _ = api
                        .patch_status(
                            &s.name_any(),
                            &PatchParams::default(),
                            &Patch::Merge(status),
                        )
                        .await;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
}

/// A store agent that records what it was asked, and can refuse.
#[derive(Default, Clone)]
pub struct FakeAgent {
    pub pauses: Arc<AtomicUsize>,
    pub resumes: Arc<AtomicUsize>,
    pub fail_pause: bool,
    /// Fail this many resume calls before answering.
    pub fail_resumes: Arc<AtomicUsize>,
    /// Delivery as the store sees it: a failed pause request counts as paused (it may have arrived).
    pub paused: Arc<AtomicBool>,
}

impl FakeAgent {
    pub fn pauses(&self) -> usize {
        self.pauses.load(Ordering::SeqCst)
    }
    pub fn resumes(&self) -> usize {
        self.resumes.load(Ordering::SeqCst)
    }
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }
}

impl StoreAgent for FakeAgent {
    fn pause<'a>(&'a self, _pod: &'a Pod, seconds: u32) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            assert!(seconds > 0, "a pause always carries a deadline");
            self.pauses.fetch_add(1, Ordering::SeqCst);
            self.paused.store(true, Ordering::SeqCst);
            if self.fail_pause {
                Err("connection reset".into())
            } else {
                Ok(())
            }
        })
    }

    fn resume<'a>(&'a self, _pod: &'a Pod) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            self.resumes.fetch_add(1, Ordering::SeqCst);
            let left = self.fail_resumes.load(Ordering::SeqCst);
            if left > 0 {
                self.fail_resumes.store(left - 1, Ordering::SeqCst);
                Err("connection refused".into())
            } else {
                self.paused.store(false, Ordering::SeqCst);
                Ok(())
            }
        })
    }
}
