//! A standby that refuses a replication pass for deleting too much: the StorageLUN says so in condition
//! `DeletionRefused` and one Warning Event naming the id to confirm; the person's confirmation on the LUN
//! reaches every store pod as the same annotation (the agent reads it from its downward-API file); once
//! no replica refuses, the condition goes.

mod lun_common;

use std::sync::Arc;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, Patch, PatchParams};
use kube::ResourceExt;
use lun_common::*;
use mailpod_operator::controller::lun::deletion::{self, Refusal};
use mailpod_operator::controller::lun::reports::{ReplicationReport, StaticReports};
use mailpod_operator::controller::{lun, Context, RunConfig};
use mailpod_operator::crd::{StorageLUN, StorageLUNStatus};
use mailpod_operator::testkit::ApiServer;
use serde_json::json;

const LUN: &str = "corp-lun-0";

async fn reconcile(server: &ApiServer, ctx: &Arc<Context>) -> StorageLUNStatus {
    let api = Api::<StorageLUN>::namespaced(server.client(), NS);
    let l = api.get(LUN).await.unwrap();
    lun::reconcile(Arc::new(l), ctx.clone()).await.unwrap();
    api.get(LUN).await.unwrap().status.unwrap_or_default()
}

fn now() -> f64 {
    Timestamp::now().as_millisecond() as f64 / 1000.0
}

fn active() -> ReplicationReport {
    ReplicationReport {
        role: Some("active".into()),
        lag_seconds: Some(0.0),
        last_sync_unix_seconds: Some(now()),
        in_sync: true,
        ..Default::default()
    }
}

fn standby(refusal: Option<Refusal>) -> ReplicationReport {
    ReplicationReport {
        role: Some("standby".into()),
        source: Some(format!("{LUN}:12345")),
        last_sync_unix_seconds: Some(now()),
        lag_seconds: Some(1.0),
        in_sync: refusal.is_none(),
        deletion_refused: refusal,
        ..Default::default()
    }
}

fn refused_events(server: &ApiServer) -> Vec<Event> {
    server
        .list::<Event>(Some(NS))
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(deletion::REASON))
        .collect()
}

#[tokio::test]
async fn a_refused_pass_is_reported_and_the_confirmation_reaches_the_store_pods() {
    let server = ApiServer::new();
    create_lun(&server, &lun(LUN, &["a@corp.example"], 10)).await;
    let reports = Arc::new(StaticReports::default());
    reports.set("corp-lun-0-0", active());
    reports.set("corp-lun-0-1", standby(None));
    let ctx = Arc::new(
        Context::new(server.client(), RunConfig::default())
            .with_replication_source(reports.clone()),
    );
    create_pod(&server, LUN, 0, true, None).await;
    create_pod(&server, LUN, 1, true, None).await;
    for _ in 0..3 {
        reconcile(&server, &ctx).await;
    }
    let st = reconcile(&server, &ctx).await;
    assert!(
        !st.conditions
            .iter()
            .any(|c| c.type_ == deletion::DELETION_REFUSED),
        "{:?}",
        st.conditions
    );

    // The standby refuses: condition and one Warning Event, both with the id to confirm.
    reports.set(
        "corp-lun-0-1",
        standby(Some(Refusal {
            id: "3f2a91c04b7d".into(),
            source: format!("{LUN}:12345"),
            deleted_messages: 480,
            held_messages: 600,
            reasons: vec![
                "the LUN would have lost 480 of its 600 messages within the hour (80%)".into(),
            ],
        })),
    );
    for _ in 0..3 {
        reconcile(&server, &ctx).await;
    }
    let st = reconcile(&server, &ctx).await;
    let c = st
        .conditions
        .iter()
        .find(|c| c.type_ == deletion::DELETION_REFUSED)
        .expect("DeletionRefused condition");
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("True", deletion::REASON)
    );
    assert!(c.message.contains("corp-lun-0-1 refused"), "{}", c.message);
    assert!(c.message.contains("480 of its 600"), "{}", c.message);
    assert!(
        c.message
            .contains("mailpod.io/confirm-replication-deletion=3f2a91c04b7d"),
        "{}",
        c.message
    );
    let events = refused_events(&server);
    assert_eq!(events.len(), 1, "one Event, not one per reconcile");
    assert_eq!(events[0].type_.as_deref(), Some("Warning"));
    assert!(events[0].note.as_deref().unwrap().contains("3f2a91c04b7d"));
    // Nothing reaches the pods before a person confirms.
    for pod in server.list::<Pod>(Some(NS)) {
        assert!(
            !pod.annotations().contains_key(deletion::CONFIRM),
            "{}",
            pod.name_any()
        );
    }

    // The person annotates the LUN; every store pod gets the same annotation.
    Api::<StorageLUN>::namespaced(server.client(), NS)
        .patch(
            LUN,
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"annotations": {deletion::CONFIRM: "3f2a91c04b7d"}}}),
            ),
        )
        .await
        .unwrap();
    reconcile(&server, &ctx).await;
    for pod in server.list::<Pod>(Some(NS)) {
        assert_eq!(
            pod.annotations().get(deletion::CONFIRM).map(String::as_str),
            Some("3f2a91c04b7d"),
            "{}",
            pod.name_any()
        );
    }
    server.clear_requests();
    reconcile(&server, &ctx).await;
    assert!(
        !server
            .mutating_requests()
            .iter()
            .any(|r| r.path.contains("/pods/")),
        "pods already annotated are not patched again"
    );

    // The pass went through: the condition goes, with a Normal Event.
    reports.set("corp-lun-0-1", standby(None));
    let st = reconcile(&server, &ctx).await;
    assert!(!st
        .conditions
        .iter()
        .any(|c| c.type_ == deletion::DELETION_REFUSED));
    let events = refused_events(&server);
    assert_eq!(events.len(), 2);
    assert!(events.iter().any(|e| e.type_.as_deref() == Some("Normal")));

    // Removed from the LUN, the confirmation is removed from the pods too.
    Api::<StorageLUN>::namespaced(server.client(), NS)
        .patch(
            LUN,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {deletion::CONFIRM: null}}})),
        )
        .await
        .unwrap();
    reconcile(&server, &ctx).await;
    for pod in server.list::<Pod>(Some(NS)) {
        assert!(
            !pod.annotations().contains_key(deletion::CONFIRM),
            "{}",
            pod.name_any()
        );
    }
}
