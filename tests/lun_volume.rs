//! The StorageLUN controller with block replication (`replication.method: Volume`) against the in-memory
//! API: fencing stops the stores before the images are demoted, unfencing promotes the images before the
//! stores start, the lag comes from csi-addons' lastSyncTime, and a Dovecot LUN is untouched by any of it.
//! The test plays csi-addons, the provisioner and the StatefulSet controller (tests/storage_support).

mod lun_common;
mod storage_support;

use std::sync::Arc;
use std::time::Duration;

use jiff::{Timestamp, ToSpan};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use lun_common::*;
use mailpod_operator::controller::lun::reports::StaticReports;
use mailpod_operator::controller::{lun, Context, RunConfig};
use mailpod_operator::crd::{StorageLUN, StorageLUNStatus};
use mailpod_operator::testkit::ApiServer;
use serde_json::json;
use storage_support::*;

const LUN: &str = "corp-lun-0";
const VR0: &str = "mail-corp-lun-0-0";
const VR1: &str = "mail-corp-lun-0-1";

fn volume_lun(fenced: bool) -> StorageLUN {
    let mut l = lun(LUN, &["a@corp.example"], 10);
    l.spec.replication = serde_json::from_value(
        json!({"method": "Volume", "volumeReplicationClass": storage_support::CLASS}),
    )
    .unwrap();
    l.spec.fenced = fenced;
    l
}

async fn reconcile(server: &ApiServer, ctx: &Arc<Context>) -> (Action, StorageLUNStatus) {
    let l = Api::<StorageLUN>::namespaced(server.client(), NS)
        .get(LUN)
        .await
        .unwrap();
    let action = lun::reconcile(Arc::new(l), ctx.clone()).await.unwrap();
    let status = Api::<StorageLUN>::namespaced(server.client(), NS)
        .get(LUN)
        .await
        .unwrap()
        .status
        .unwrap_or_default();
    (action, status)
}

fn degraded(st: &StorageLUNStatus) -> (String, String) {
    let c = st
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .expect("a Degraded condition");
    assert_eq!(c.status, "True", "{c:?}");
    (c.reason.clone(), c.message.clone())
}

async fn set_fenced(server: &ApiServer, fenced: bool) {
    patch_lun_spec(server, LUN, json!({"fenced": fenced})).await;
}

fn context(server: &ApiServer) -> Arc<Context> {
    Arc::new(
        Context::new(server.client(), RunConfig::default())
            .with_replication_source(Arc::new(StaticReports::default())),
    )
}

/// The storage at work: both store claims bound to CSI volumes.
async fn provision(server: &ApiServer) {
    for (i, claim) in [VR0, VR1].into_iter().enumerate() {
        provision_bound_claim(
            server,
            NS,
            claim,
            &format!("pvc-east-{i}"),
            json!({"mailpod.io/lun": LUN}),
        )
        .await;
    }
}

/// A Volume LUN serving from replica 0: stores running, claims bound, images reported Primary.
async fn serving() -> (ApiServer, Arc<Context>) {
    let server = ApiServer::new();
    create_replication_class(&server).await;
    create_lun(&server, &volume_lun(false)).await;
    let ctx = context(&server);
    // A new LUN: no claim is bound yet, so nothing to wait for; images asked primary from the start.
    reconcile(&server, &ctx).await;
    assert_eq!(store_replicas(&server, NS, LUN), Some(2));
    assert_eq!(
        requested_states(&server, NS).await,
        [
            (VR0.to_string(), "primary".to_string()),
            (VR1.to_string(), "primary".to_string())
        ]
    );
    provision(&server).await;
    for vr in [VR0, VR1] {
        report_state(&server, NS, vr, "Primary", None).await;
    }
    follow_statefulset(&server, NS, LUN).await;
    reconcile(&server, &ctx).await;
    let (_, st) = reconcile(&server, &ctx).await;
    assert_eq!(st.current_active.as_deref(), Some("corp-lun-0-0"));
    (server, ctx)
}

#[tokio::test]
async fn fencing_stops_the_stores_before_the_images_are_demoted() {
    let (server, ctx) = serving().await;
    set_fenced(&server, true).await;
    let (action, st) = reconcile(&server, &ctx).await;
    assert_eq!(store_replicas(&server, NS, LUN), Some(0));
    assert_eq!(
        requested_state(&server, NS, VR0).await.as_deref(),
        Some("primary"),
        "images stay primary while store pods exist"
    );
    let (reason, message) = degraded(&st);
    assert_eq!(reason, "StoppingStores");
    assert!(
        message.contains("corp-lun-0-0, corp-lun-0-1"),
        "names the pods: {message}"
    );
    assert_eq!(action, Action::requeue(Duration::from_secs(3)));

    // One pod gone, the other terminating (a finalizer holds it): it may still write.
    let pods: Api<Pod> = Api::namespaced(server.client(), NS);
    pods.delete("corp-lun-0-0", &DeleteParams::default())
        .await
        .unwrap();
    pods.patch(
        "corp-lun-0-1",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": ["test/hold"]}})),
    )
    .await
    .unwrap();
    pods.delete("corp-lun-0-1", &DeleteParams::default())
        .await
        .unwrap();
    assert!(pods
        .get("corp-lun-0-1")
        .await
        .unwrap()
        .metadata
        .deletion_timestamp
        .is_some());
    let (_, st) = reconcile(&server, &ctx).await;
    assert_eq!(
        requested_states(&server, NS).await,
        [
            (VR0.to_string(), "primary".to_string()),
            (VR1.to_string(), "primary".to_string())
        ],
        "a terminating store pod still holds its volume"
    );
    let (reason, message) = degraded(&st);
    assert_eq!(reason, "StoppingStores");
    assert!(message.contains("corp-lun-0-1") && !message.contains("corp-lun-0-0,"));

    // No store pod left: demoted.
    pods.patch(
        "corp-lun-0-1",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    assert!(pods.get_opt("corp-lun-0-1").await.unwrap().is_none());
    let (action, st) = reconcile(&server, &ctx).await;
    assert_eq!(
        requested_states(&server, NS).await,
        [
            (VR0.to_string(), "secondary".to_string()),
            (VR1.to_string(), "secondary".to_string())
        ]
    );
    let vr = Api::<kube::api::DynamicObject>::namespaced_with(
        server.client(),
        NS,
        &lun::replication::replication_resource(),
    )
    .get(VR0)
    .await
    .unwrap();
    assert_eq!(
        vr.data["spec"]["autoResync"], true,
        "a diverged image resyncs"
    );
    assert_eq!(store_replicas(&server, NS, LUN), Some(0));
    assert_eq!(
        degraded(&st),
        (
            "Fenced".to_string(),
            format!(
                "fenced: stores stopped; waiting for VolumeReplication {VR0} to report Secondary"
            )
        )
    );
    assert_eq!(action, Action::requeue(Duration::from_secs(3)));
    assert_eq!(
        st.replication_lag_seconds, None,
        "a fenced LUN reports no lag"
    );

    // csi-addons reports the demotion; then nothing more to do or write.
    for vr in [VR0, VR1] {
        report_state(&server, NS, vr, "Secondary", None).await;
    }
    let (_, st) = reconcile(&server, &ctx).await;
    assert_eq!(
        degraded(&st).1,
        "fenced: stores stopped, VolumeReplications secondary"
    );
    assert!(st
        .conditions
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "False" && c.reason == "Fenced"));
    server.clear_requests();
    let (action, _) = reconcile(&server, &ctx).await;
    let writes: Vec<_> = server
        .mutating_requests()
        .into_iter()
        .filter(|r| !r.path.contains("/events"))
        .collect();
    assert!(writes.is_empty(), "steady fenced state writes {writes:?}");
    // Looked at again on the poll timer (three sync intervals), not because of a write.
    assert_eq!(action, Action::requeue(Duration::from_secs(15)));
}

#[tokio::test]
async fn unfencing_promotes_the_images_before_the_stores_start() {
    // A standby's LUN: fenced from the start, claims bound to mirrored images, images secondary.
    let server = ApiServer::new();
    create_replication_class(&server).await;
    create_lun(&server, &volume_lun(true)).await;
    let ctx = context(&server);
    provision(&server).await;
    reconcile(&server, &ctx).await;
    assert_eq!(store_replicas(&server, NS, LUN), Some(0));
    assert_eq!(
        requested_state(&server, NS, VR1).await.as_deref(),
        Some("secondary")
    );
    for vr in [VR0, VR1] {
        report_state(&server, NS, vr, "Secondary", None).await;
    }
    reconcile(&server, &ctx).await;

    // Promotion: images asked primary at once; stores held at 0 until csi-addons says Primary.
    set_fenced(&server, false).await;
    let (action, st) = reconcile(&server, &ctx).await;
    assert_eq!(
        requested_states(&server, NS).await,
        [
            (VR0.to_string(), "primary".to_string()),
            (VR1.to_string(), "primary".to_string())
        ]
    );
    assert_eq!(store_replicas(&server, NS, LUN), Some(0));
    assert_eq!(
        degraded(&st),
        (
            "AwaitingVolumePrimary".to_string(),
            format!(
                "waiting for VolumeReplication {VR0} to report Primary before starting the stores"
            )
        )
    );
    assert!(st
        .conditions
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "False" && c.reason == "AwaitingVolumePrimary"));
    assert_eq!(action, Action::requeue(Duration::from_secs(3)));
    // Still waiting while the status describes the secondary it was.
    reconcile(&server, &ctx).await;
    assert_eq!(store_replicas(&server, NS, LUN), Some(0));

    report_state(&server, NS, VR0, "Primary", None).await;
    let (_, st) = reconcile(&server, &ctx).await;
    assert_eq!(store_replicas(&server, NS, LUN), Some(0));
    assert!(degraded(&st).1.contains(VR1), "{:?}", degraded(&st));

    // A Primary reported for an older generation (before this promotion was asked) does not count.
    let vr1 = Api::<kube::api::DynamicObject>::namespaced_with(
        server.client(),
        NS,
        &lun::replication::replication_resource(),
    )
    .get(VR1)
    .await
    .unwrap();
    let generation = vr1.metadata.generation.unwrap();
    report_state_for(&server, NS, VR1, "Primary", generation - 1, None).await;
    reconcile(&server, &ctx).await;
    assert_eq!(store_replicas(&server, NS, LUN), Some(0));

    let now = Timestamp::now();
    report_state(&server, NS, VR0, "Primary", Some(now - 40.seconds())).await;
    report_state(&server, NS, VR1, "Primary", Some(now - 12.seconds())).await;
    let (_, st) = reconcile(&server, &ctx).await;
    assert_eq!(store_replicas(&server, NS, LUN), Some(2), "stores start");
    let lag = st.replication_lag_seconds.expect("lag from lastSyncTime");
    assert_eq!(lag, 60.0, "oldest sync 40 s ago, in status as its step");

    // The stores come up and elect as usual.
    follow_statefulset(&server, NS, LUN).await;
    reconcile(&server, &ctx).await;
    let (_, st) = reconcile(&server, &ctx).await;
    assert_eq!(st.current_active.as_deref(), Some("corp-lun-0-0"));
    assert!(st
        .conditions
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True"));
}

#[tokio::test]
async fn running_stores_are_never_stopped_for_want_of_a_status() {
    let (server, ctx) = serving().await;
    // csi-addons restarted and has not reported again: a serving LUN keeps serving.
    for vr in [VR0, VR1] {
        Api::<kube::api::DynamicObject>::namespaced_with(
            server.client(),
            NS,
            &lun::replication::replication_resource(),
        )
        .patch_status(
            vr,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": null})),
        )
        .await
        .unwrap();
    }
    let (_, st) = reconcile(&server, &ctx).await;
    assert_eq!(store_replicas(&server, NS, LUN), Some(2));
    assert_eq!(st.current_active.as_deref(), Some("corp-lun-0-0"));
    assert_eq!(
        st.replication_lag_seconds, None,
        "no sync reported: unknown"
    );
}

#[tokio::test]
async fn a_dovecot_lun_is_untouched_by_volume_fencing() {
    let server = ApiServer::new();
    create_replication_class(&server).await;
    let mut l = lun(LUN, &["a@corp.example"], 10);
    l.spec.fenced = true;
    create_lun(&server, &l).await;
    create_pod(&server, LUN, 0, true, None).await;
    create_pod(&server, LUN, 1, true, None).await;
    let ctx = context(&server);
    server.clear_requests();
    let (_, st) = reconcile(&server, &ctx).await;
    let touched: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|r| r.path.contains("volumereplication") || r.path.contains("persistentvolume"))
        .collect();
    assert!(touched.is_empty(), "{touched:?}");
    // Fenced Dovecot stores keep running (they pull from the other site) and no image is involved.
    assert_eq!(store_replicas(&server, NS, LUN), Some(2));
    assert!(requested_states(&server, NS).await.is_empty());
    assert_eq!(degraded(&st).0, "Fenced");
    assert_eq!(degraded(&st).1, "fenced: no replica serves as active");
}
