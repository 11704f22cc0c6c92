//! StorageLUN status holds facts that change when something happens: a lag that moves between sync
//! passes, or time passing while the active replica is unready, writes no status; the controller's own
//! status writes bring no further reconcile; the agents are polled on a timer.

mod lun_common;

use std::sync::Arc;
use std::time::Duration;

use jiff::{Timestamp, ToSpan};
use kube::api::Api;
use lun_common::*;
use mailpod_operator::controller::lun::reports::{ReplicationReport, StaticReports};
use mailpod_operator::controller::{lun, Context, RunConfig};
use mailpod_operator::crd::{StorageLUN, StorageLUNStatus};
use mailpod_operator::testkit::ApiServer;

const LUN: &str = "corp-lun-0";

async fn reconcile(server: &ApiServer, ctx: &Arc<Context>) -> StorageLUNStatus {
    let api = Api::<StorageLUN>::namespaced(server.client(), NS);
    let l = api.get(LUN).await.unwrap();
    lun::reconcile(Arc::new(l), ctx.clone()).await.unwrap();
    api.get(LUN).await.unwrap().status.unwrap_or_default()
}

/// What a standby's agent says: lag `lag`, last complete pass `seconds_ago`.
fn report(lag: f64, seconds_ago: i64) -> ReplicationReport {
    ReplicationReport {
        role: Some("standby".into()),
        source: Some(format!("{LUN}:12345")),
        last_sync_unix_seconds: Some(
            (Timestamp::now() - seconds_ago.seconds()).as_millisecond() as f64 / 1000.0,
        ),
        lag_seconds: Some(lag),
        in_sync: true,
        last_error: None,
        deletion_refused: None,
        accepts_writes: false,
    }
}

/// What the active replica's agent says.
fn active_report() -> ReplicationReport {
    ReplicationReport {
        role: Some("active".into()),
        lag_seconds: Some(0.0),
        last_sync_unix_seconds: Some(Timestamp::now().as_millisecond() as f64 / 1000.0),
        ..Default::default()
    }
}

/// A LUN serving from replica 0, replica 1 standing by.
async fn serving(reports: Arc<StaticReports>) -> (ApiServer, Arc<Context>) {
    let server = ApiServer::new();
    create_lun(&server, &lun(LUN, &["a@corp.example"], 10)).await;
    let ctx = Arc::new(
        Context::new(server.client(), RunConfig::default()).with_replication_source(reports),
    );
    create_pod(&server, LUN, 0, true, None).await;
    create_pod(&server, LUN, 1, true, None).await;
    for _ in 0..3 {
        reconcile(&server, &ctx).await;
    }
    (server, ctx)
}

#[tokio::test]
async fn a_lag_moving_between_sync_passes_writes_no_status() {
    let reports = Arc::new(StaticReports::default());
    reports.set("corp-lun-0-0", active_report());
    reports.set("corp-lun-0-1", report(0.7, 0));
    let (server, ctx) = serving(reports.clone()).await;
    let st = reconcile(&server, &ctx).await;
    assert_eq!(st.current_active.as_deref(), Some("corp-lun-0-0"));
    assert_eq!(
        st.replication_lag_seconds,
        Some(15.0),
        "three 5 s intervals"
    );

    server.clear_requests();
    for lag in [1.9, 4.2, 9.5] {
        reports.set("corp-lun-0-1", report(lag, 0));
        reconcile(&server, &ctx).await;
    }
    assert_eq!(
        server.mutating_requests(),
        vec![],
        "a standby keeping up writes no status"
    );

    // Falling behind is a fact worth writing, once.
    reports.set("corp-lun-0-1", report(200.0, 0));
    let st = reconcile(&server, &ctx).await;
    assert_eq!(st.replication_lag_seconds, Some(300.0));
    assert_eq!(st.replicas[1].lag_seconds, Some(300.0));
    server.clear_requests();
    reports.set("corp-lun-0-1", report(230.0, 0));
    reconcile(&server, &ctx).await;
    assert_eq!(server.mutating_requests(), vec![]);
}

#[tokio::test]
async fn waiting_out_the_failover_threshold_writes_status_once() {
    let (server, ctx) = serving(Arc::new(StaticReports::default())).await;
    let since = (Timestamp::now() - 3.seconds()).to_string();
    set_pod_ready(&server, "corp-lun-0-0", false, &since).await;
    let st = reconcile(&server, &ctx).await;
    let degraded = st
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .unwrap();
    assert_eq!(degraded.reason, "ActiveUnready");
    assert!(
        degraded.message.contains("unready since"),
        "{}",
        degraded.message
    );

    tokio::time::sleep(Duration::from_millis(1100)).await;
    ctx.clock.advance(Duration::from_secs(10));
    server.clear_requests();
    reconcile(&server, &ctx).await;
    assert_eq!(
        server.mutating_requests(),
        vec![],
        "the message says since when, not for how long"
    );
}

/// The controller as `run` starts it, on a LUN serving from replica 0 whose standby last passed
/// `standby_pass_ago` seconds ago, once it has converged (elected, promoted, status written). Send on
/// the returned channel to stop it.
async fn running_and_converged(
    standby_pass_ago: i64,
) -> (
    ApiServer,
    Arc<Context>,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let server = ApiServer::new();
    create_lun(&server, &lun(LUN, &["a@corp.example"], 10)).await;
    create_pod(&server, LUN, 0, true, None).await;
    create_pod(&server, LUN, 1, true, None).await;
    let reports = Arc::new(StaticReports::default());
    reports.set("corp-lun-0-0", active_report());
    // The agent's lag is the time since its last complete pass, on its own clock.
    reports.set(
        "corp-lun-0-1",
        report(standby_pass_ago as f64 + 0.5, standby_pass_ago),
    );
    let ctx = Arc::new(
        Context::new(server.client(), RunConfig::default())
            .with_replication_source(reports.clone()),
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(lun::run(ctx.clone(), Some(NS.to_string()), async move {
        let _ = stopped.await;
    }));
    let api = Api::<StorageLUN>::namespaced(server.client(), NS);
    for _ in 0..100 {
        let st = api.get(LUN).await.unwrap().status.unwrap_or_default();
        if st.current_active.is_some() && st.replication_lag_seconds.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    (server, ctx, stop, task)
}

/// The controller as `run` starts it: after converging, neither its status writes nor a standby's
/// lag bring more reconciles; the agents are asked again on a timer.
#[tokio::test]
async fn the_running_controller_goes_quiet() {
    // A standby whose last pass was 100 s ago.
    let (server, ctx, stop, task) = running_and_converged(100).await;
    let api = Api::<StorageLUN>::namespaced(server.client(), NS);
    let before = ctx.stats.reconciles();
    server.clear_requests();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let reconciles = ctx.stats.reconciles() - before;
    let writes: Vec<_> = server
        .mutating_requests()
        .into_iter()
        .filter(|r| !r.path.contains("/events"))
        .collect();
    let _ = stop.send(());
    task.await.unwrap();
    assert_eq!(writes, vec![], "a quiet LUN writes nothing");
    assert!(
        reconciles <= 1,
        "{reconciles} reconciles in 1.5 s of nothing happening"
    );
    let st = api.get(LUN).await.unwrap().status.unwrap();
    assert_eq!(st.replication_lag_seconds, Some(300.0), "100 s, in steps");
}

/// With its children cached, a steady-state reconcile reads one thing from the API server: the LUN's
/// store pods (their readiness is the failover's input). Before the cache it listed six kinds of children
/// and read two Secrets as well.
#[tokio::test]
async fn a_steady_state_reconcile_reads_only_its_pods() {
    let (server, ctx, stop, task) = running_and_converged(1).await;
    let api = Api::<StorageLUN>::namespaced(server.client(), NS);
    // Each touch of a label nobody reads brings one reconcile with nothing to do.
    let before = ctx.stats.reconciles();
    server.clear_requests();
    for i in 0..5 {
        let patch = serde_json::json!({"metadata": {"labels": {"touched": i.to_string()}}});
        api.patch(
            LUN,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(patch),
        )
        .await
        .unwrap();
        for _ in 0..100 {
            if ctx.stats.reconciles() > before + i {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let reconciles = ctx.stats.reconciles() - before;
    let requests = server.requests();
    let reads: Vec<_> = requests
        .iter()
        .filter(|r| !r.is_mutating() && !r.is_watch())
        .collect();
    let writes: Vec<_> = requests
        .iter()
        .filter(|r| {
            r.is_mutating()
                && !r.path.contains("/events")
                && !r.path.ends_with(&format!("/storageluns/{LUN}"))
        })
        .collect();
    let _ = stop.send(());
    task.await.unwrap();
    assert!(reconciles >= 5, "{reconciles} reconciles");
    assert!(
        reads.len() as u64 <= reconciles,
        "{} reads in {reconciles} reconciles: {reads:#?}",
        reads.len()
    );
    assert!(
        reads.iter().all(|r| r.path.ends_with("/pods")),
        "only the store pods are read: {reads:#?}"
    );
    assert_eq!(
        writes,
        Vec::<&mailpod_operator::testkit::RequestRecord>::new()
    );
}

/// Status is applied with the operator's field manager; a field an older version wrote by merge patch, and
/// that this status no longer sets, is cleared once (the apply alone cannot remove what it never owned),
/// and then the controller is quiet again.
#[tokio::test]
async fn status_is_applied_and_fields_left_by_a_merge_patch_are_cleared_once() {
    use kube::api::{Patch, PatchParams};
    let (server, ctx) = serving(Arc::new(StaticReports::default())).await;
    let api = Api::<StorageLUN>::namespaced(server.client(), NS);
    let before = api.get(LUN).await.unwrap().status.unwrap();
    assert_eq!(before.replication_lag_seconds, None);
    api.patch_status(
        LUN,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"status": {"replicationLagSeconds": 42.0, "users": 99}})),
    )
    .await
    .unwrap();
    server.clear_requests();
    let st = reconcile(&server, &ctx).await;
    assert_eq!(st.replication_lag_seconds, None, "{st:?}");
    assert_eq!(st.users, 1);
    let writes: Vec<_> = server
        .mutating_requests()
        .into_iter()
        .filter(|r| r.path.ends_with("/status"))
        .collect();
    assert!(
        writes
            .first()
            .is_some_and(|r| r.query.contains("fieldManager=mailpod-operator")),
        "the status is applied first: {writes:?}"
    );
    assert_eq!(writes.len(), 2, "one apply, one clearing patch: {writes:?}");

    server.clear_requests();
    reconcile(&server, &ctx).await;
    reconcile(&server, &ctx).await;
    assert_eq!(server.mutating_requests(), vec![]);
}
