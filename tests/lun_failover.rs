//! The StorageLUN controller against the in-memory API: children, election, promotion after the
//! threshold in two steps, no re-promotion without resync, fencing, invalid specs, quiet steady state.

mod lun_common;

use std::sync::Arc;

use jiff::{Timestamp, ToSpan};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};
use kube::ResourceExt;
use lun_common::*;
use mailpod_operator::controller::lun::reports::{ReplicationReport, StaticReports};
use mailpod_operator::controller::{lun, Context, RunConfig};
use mailpod_operator::crd::{StorageLUN, StorageLUNStatus};
use mailpod_operator::testkit::ApiServer;
use serde_json::json;

const LUN: &str = "corp-lun-0";

async fn reconcile(server: &ApiServer, ctx: &Arc<Context>) -> StorageLUNStatus {
    let l = Api::<StorageLUN>::namespaced(server.client(), NS)
        .get(LUN)
        .await
        .unwrap();
    lun::reconcile(Arc::new(l), ctx.clone()).await.unwrap();
    Api::<StorageLUN>::namespaced(server.client(), NS)
        .get(LUN)
        .await
        .unwrap()
        .status
        .unwrap_or_default()
}

async fn role(server: &ApiServer, pod: &str) -> Option<String> {
    Api::<Pod>::namespaced(server.client(), NS)
        .get(pod)
        .await
        .unwrap()
        .labels()
        .get("mailpod.io/role")
        .cloned()
}

fn ago(seconds: i64) -> String {
    (Timestamp::now() - seconds.seconds()).to_string()
}

/// A LUN serving from replica 0 with replica 1 standing by, elected through the controller.
async fn serving() -> (ApiServer, Arc<Context>, Arc<StaticReports>) {
    let server = ApiServer::new();
    create_lun(&server, &lun(LUN, &["a@corp.example"], 10)).await;
    let reports = Arc::new(StaticReports::default());
    let ctx = Arc::new(
        Context::new(server.client(), RunConfig::default())
            .with_replication_source(reports.clone()),
    );
    let st = reconcile(&server, &ctx).await;
    assert!(st.current_active.is_none(), "no pods yet: nobody serves");
    create_pod(&server, LUN, 0, true, None).await;
    create_pod(&server, LUN, 1, true, None).await;
    let st = reconcile(&server, &ctx).await;
    assert_eq!(
        (st.target_active.as_deref(), st.current_active.as_deref()),
        (Some("corp-lun-0-0"), None)
    );
    let st = reconcile(&server, &ctx).await;
    assert_eq!(st.current_active.as_deref(), Some("corp-lun-0-0"));
    assert_eq!(
        role(&server, "corp-lun-0-0").await.as_deref(),
        Some("active")
    );
    assert_eq!(
        role(&server, "corp-lun-0-1").await.as_deref(),
        Some("standby")
    );
    (server, ctx, reports)
}

/// The kubelet marks `pod` unready; the controller sees it once, then `seconds` pass on its clock. The
/// kubelet's transition time is years old on purpose: the threshold counts from what the controller
/// saw, on its own clock, never from a time another machine wrote.
async fn lose_for(server: &ApiServer, ctx: &Arc<Context>, pod: &str, seconds: u64) {
    set_pod_ready(server, pod, false, "2020-01-01T00:00:00Z").await;
    reconcile(server, ctx).await;
    ctx.clock.advance(std::time::Duration::from_secs(seconds));
}

/// What a standby's agent says after a complete pass `seconds_ago`.
fn standby_report(lag: f64, seconds_ago: i64, in_sync: bool) -> ReplicationReport {
    ReplicationReport {
        role: Some("standby".into()),
        source: Some(format!("{LUN}:12345")),
        last_sync_unix_seconds: Some(
            (Timestamp::now() - seconds_ago.seconds()).as_millisecond() as f64 / 1000.0,
        ),
        lag_seconds: Some(lag),
        in_sync,
        last_error: None,
        deletion_refused: None,
        accepts_writes: false,
    }
}

#[tokio::test]
async fn builds_the_store_and_is_quiet_in_steady_state() {
    let (server, ctx, _) = serving().await;
    let sts: StatefulSet = server.get(NS, LUN).unwrap();
    assert_eq!(sts.spec.unwrap().replicas, Some(2));
    // The replicas' shared doveadm password: created once, random, owned by the LUN.
    let secret: k8s_openapi::api::core::v1::Secret =
        server.get(NS, "corp-lun-0-replication").unwrap();
    assert_eq!(secret.owner_references()[0].name, LUN);
    let password = secret
        .data
        .as_ref()
        .and_then(|d| d.get("doveadm-password"))
        .map(|b| String::from_utf8(b.0.clone()).unwrap())
        .or_else(|| {
            secret
                .string_data
                .as_ref()
                .and_then(|d| d.get("doveadm-password").cloned())
        })
        .unwrap();
    assert_eq!(password.len(), 48);
    assert!(password.bytes().all(|b| b.is_ascii_hexdigit()));
    server.clear_requests();
    let st = reconcile(&server, &ctx).await;
    assert_eq!(
        server.mutating_requests(),
        vec![],
        "steady state writes nothing"
    );
    assert!(st
        .conditions
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True"));
}

#[tokio::test]
async fn promotes_only_after_the_threshold_in_two_steps_and_never_back_without_resync() {
    let (server, ctx, reports) = serving().await;
    reports.set("corp-lun-0-1", standby_report(0.4, 1, true));

    lose_for(&server, &ctx, "corp-lun-0-0", 10).await;
    let st = reconcile(&server, &ctx).await;
    assert_eq!(
        st.target_active.as_deref(),
        Some("corp-lun-0-0"),
        "10s < 30s threshold, however old the kubelet's transition time"
    );
    assert_eq!(
        role(&server, "corp-lun-0-1").await.as_deref(),
        Some("standby")
    );
    assert!(st
        .conditions
        .iter()
        .any(|c| c.type_ == "Degraded" && c.reason == "ActiveUnready"));

    ctx.clock.advance(std::time::Duration::from_secs(35));
    let st = reconcile(&server, &ctx).await;
    assert_eq!(st.target_active.as_deref(), Some("corp-lun-0-1"));
    assert_eq!(
        st.current_active.as_deref(),
        Some("corp-lun-0-0"),
        "second step waits for the label"
    );
    assert_eq!(st.needs_resync, ["corp-lun-0-0"]);
    assert_eq!(
        role(&server, "corp-lun-0-1").await.as_deref(),
        Some("active")
    );
    assert_eq!(
        role(&server, "corp-lun-0-0").await.as_deref(),
        Some("standby")
    );

    let st = reconcile(&server, &ctx).await;
    assert_eq!(st.current_active.as_deref(), Some("corp-lun-0-1"));
    let p = st.last_promotion.unwrap();
    assert_eq!(
        (p.from.as_str(), p.to.as_str()),
        ("corp-lun-0-0", "corp-lun-0-1")
    );
    assert!(
        (45.0..50.0).contains(&p.seconds),
        "loss to promoted: {}",
        p.seconds
    );

    // The old active comes back; then the new one is lost. The old one has not resynchronised.
    set_pod_ready(&server, "corp-lun-0-0", true, &ago(1)).await;
    lose_for(&server, &ctx, "corp-lun-0-1", 31).await;
    let st = reconcile(&server, &ctx).await;
    assert_eq!(st.current_active.as_deref(), Some("corp-lun-0-1"));
    assert_eq!(
        role(&server, "corp-lun-0-0").await.as_deref(),
        Some("standby")
    );
    assert!(st
        .conditions
        .iter()
        .any(|c| c.type_ == "Degraded" && c.reason == "NoStandbyAvailable"));

    // Its agent reports a complete pass as standby after the promotion: it is cleared and takes over.
    reports.set("corp-lun-0-0", standby_report(0.2, 0, true));
    let st = reconcile(&server, &ctx).await;
    assert!(
        st.needs_resync.iter().all(|n| n != "corp-lun-0-0"),
        "{:?}",
        st.needs_resync
    );
    assert_eq!(st.target_active.as_deref(), Some("corp-lun-0-0"));
}

#[tokio::test]
async fn fenced_lun_serves_from_no_replica() {
    let (server, ctx, _) = serving().await;
    patch_lun_spec(&server, LUN, json!({"fenced": true})).await;
    let st = reconcile(&server, &ctx).await;
    assert_eq!((st.current_active, st.target_active), (None, None));
    assert_eq!(
        role(&server, "corp-lun-0-0").await.as_deref(),
        Some("standby")
    );
    assert!(st
        .conditions
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "False" && c.reason == "Fenced"));
}

async fn source_of(server: &ApiServer, pod: &str) -> Option<String> {
    Api::<Pod>::namespaced(server.client(), NS)
        .get(pod)
        .await
        .unwrap()
        .annotations()
        .get("mailpod.io/replication-source")
        .cloned()
}

/// A live standby site: its LUN is fenced and names the other site's doveadm endpoint; every replica is told
/// to pull from there, and told no longer once the LUN serves again.
#[tokio::test]
async fn replicas_of_a_fenced_lun_pull_from_the_replication_source() {
    let (server, ctx, _) = serving().await;
    let luns = Api::<StorageLUN>::namespaced(server.client(), NS);
    // A source alone does nothing while the LUN serves here.
    luns.patch(
        LUN,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicationSource": "203.0.113.7:12345"}})),
    )
    .await
    .unwrap();
    reconcile(&server, &ctx).await;
    assert_eq!(source_of(&server, "corp-lun-0-1").await, None);

    luns.patch(
        LUN,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"fenced": true}})),
    )
    .await
    .unwrap();
    reconcile(&server, &ctx).await;
    for pod in ["corp-lun-0-0", "corp-lun-0-1"] {
        assert_eq!(
            source_of(&server, pod).await.as_deref(),
            Some("203.0.113.7:12345"),
            "{pod}"
        );
    }
    server.clear_requests();
    reconcile(&server, &ctx).await;
    assert_eq!(
        server.mutating_requests(),
        vec![],
        "pointing replicas is quiet once done"
    );

    // Promoted (unfenced): replicas go back to their own LUN's active.
    luns.patch(
        LUN,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"fenced": false}})),
    )
    .await
    .unwrap();
    reconcile(&server, &ctx).await;
    for pod in ["corp-lun-0-0", "corp-lun-0-1"] {
        assert_eq!(source_of(&server, pod).await, None, "{pod}");
    }

    // A malformed source is refused naming the field.
    let mut bad = luns.get(LUN).await.unwrap();
    bad.spec.replication_source = Some("no-port".into());
    let err = bad.validate().unwrap_err().to_string();
    assert!(
        err.contains("spec.replicationSource: `no-port` must be host:port"),
        "{err}"
    );
}

#[tokio::test]
async fn more_mailboxes_than_max_users_is_reported_and_deletes_nothing() {
    let (server, ctx, _) = serving().await;
    patch_lun_spec(
        &server,
        LUN,
        json!({"maxUsers": 1,
            "mailboxes": ["a@corp.example", "b@corp.example"]}),
    )
    .await;
    server.clear_requests();
    let st = reconcile(&server, &ctx).await;
    let ready = st.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "InvalidSpec")
    );
    assert!(
        ready.message.contains("spec.mailboxes"),
        "{}",
        ready.message
    );
    assert!(server
        .mutating_requests()
        .iter()
        .all(|r| r.method != http::Method::DELETE));
    assert!(
        server
            .mutating_requests()
            .iter()
            .all(|r| !r.path.contains("/pods/")),
        "roles untouched"
    );
    assert!(server.get::<StatefulSet>(NS, LUN).is_some());
    assert_eq!(st.current_active.as_deref(), Some("corp-lun-0-0"));
    // No hot loop: a second pass writes nothing.
    server.clear_requests();
    reconcile(&server, &ctx).await;
    assert!(server
        .mutating_requests()
        .iter()
        .all(|r| r.path.contains("/events")));
}

/// The store StatefulSet as a real API server keeps it (`readOnly: false` dropped, `1000m` read back as
/// `1`, defaults added) is still the one last applied: a steady state sends no request that writes.
#[tokio::test]
async fn the_store_is_not_applied_again_when_the_server_normalises_it() {
    let server = ApiServer::new();
    server.normalise_like_kube_apiserver();
    let mut l = lun(LUN, &["a@corp.example"], 10);
    l.spec.resources = Some(
        serde_json::from_value(json!({"requests": {"cpu": "1000m", "memory": "1024Mi"}})).unwrap(),
    );
    create_lun(&server, &l).await;
    let ctx = Arc::new(
        Context::new(server.client(), RunConfig::default())
            .with_replication_source(Arc::new(StaticReports::default())),
    );
    reconcile(&server, &ctx).await;
    create_pod(&server, LUN, 0, true, None).await;
    create_pod(&server, LUN, 1, true, None).await;
    for _ in 0..3 {
        reconcile(&server, &ctx).await;
    }
    let sts: StatefulSet = server.get(NS, LUN).unwrap();
    let spec = sts.spec.clone().unwrap().template.spec.unwrap();
    assert_eq!(
        spec.containers[0]
            .resources
            .as_ref()
            .unwrap()
            .requests
            .as_ref()
            .unwrap()["cpu"]
            .0,
        "1",
        "the server normalised the quantity"
    );
    assert!(
        spec.containers
            .iter()
            .flat_map(|c| c.volume_mounts.iter().flatten())
            .all(|m| m.read_only != Some(false)),
        "no mount says readOnly: false"
    );
    assert!(sts
        .annotations()
        .contains_key(mailpod_operator::controller::apply::APPLIED_HASH));
    server.clear_requests();
    let st = reconcile(&server, &ctx).await;
    reconcile(&server, &ctx).await;
    assert_eq!(
        server.mutating_requests(),
        vec![],
        "steady state writes nothing"
    );
    assert!(st
        .conditions
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True"));
}

/// A store StatefulSet the API server refuses (here every PATCH answers 422, as a change to an immutable
/// field does) must not keep the LUN from failing over: the promotion happens, the failure is reported
/// in an `ApplyFailed` condition, and the LUN is looked at again no later than the failover wants.
#[tokio::test]
async fn a_store_that_cannot_be_applied_still_fails_over() {
    use mailpod_operator::testkit::{Fault, FaultKind};
    let (server, ctx, reports) = serving().await;
    reports.set("corp-lun-0-1", standby_report(0.4, 1, true));
    lose_for(&server, &ctx, "corp-lun-0-0", 45).await;
    // A spec change the StatefulSet cannot take.
    patch_lun_spec(&server, LUN, json!({"capacity": "2Gi"})).await;
    server.inject(Fault::new(
        Some(http::Method::PATCH),
        "/statefulsets/",
        FaultKind::Status(422),
        1000,
    ));
    let l = Api::<StorageLUN>::namespaced(server.client(), NS)
        .get(LUN)
        .await
        .unwrap();
    let action = lun::reconcile(Arc::new(l), ctx.clone())
        .await
        .expect("the failover runs although the StatefulSet cannot be applied");
    // The first failure's backoff (0.5 s) is sooner than the promotion's follow-up.
    assert_eq!(
        action,
        kube::runtime::controller::Action::requeue(std::time::Duration::from_millis(500))
    );
    let st = Api::<StorageLUN>::namespaced(server.client(), NS)
        .get(LUN)
        .await
        .unwrap()
        .status
        .unwrap();
    assert_eq!(st.target_active.as_deref(), Some("corp-lun-0-1"));
    assert_eq!(
        role(&server, "corp-lun-0-1").await.as_deref(),
        Some("active")
    );
    let failed = st
        .conditions
        .iter()
        .find(|c| c.type_ == "ApplyFailed")
        .expect("ApplyFailed condition");
    assert_eq!(failed.status, "True");
    assert!(failed.message.contains("StatefulSet"), "{}", failed.message);
}

/// Two leaders (or one acting on a stale cache) must never promote different replicas: the decision is
/// recorded by compare-and-swap, and a conflict makes the controller read what was recorded and decide
/// again from it instead of overwriting it.
#[tokio::test]
async fn a_conflicting_promotion_is_decided_again_not_overwritten() {
    let (server, ctx, reports) = serving().await;
    create_pod(&server, LUN, 2, true, Some("standby")).await;
    // Replica 1 is the most up to date as this controller sees it.
    reports.set("corp-lun-0-1", standby_report(0.4, 1, true));
    reports.set("corp-lun-0-2", standby_report(5.0, 1, true));
    lose_for(&server, &ctx, "corp-lun-0-0", 45).await;
    let luns = Api::<StorageLUN>::namespaced(server.client(), NS);
    let stale = luns.get(LUN).await.unwrap();
    // Meanwhile another leader promoted replica 2 and recorded it.
    set_lun_status(
        &server,
        LUN,
        json!({"targetActive": "corp-lun-0-2", "needsResync": ["corp-lun-0-0"]}),
    )
    .await;
    for (pod, role) in [("corp-lun-0-2", "active"), ("corp-lun-0-0", "standby")] {
        Api::<Pod>::namespaced(server.client(), NS)
            .patch(
                pod,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"mailpod.io/role": role}}})),
            )
            .await
            .unwrap();
    }
    lun::reconcile(Arc::new(stale), ctx.clone()).await.unwrap();
    let st = luns.get(LUN).await.unwrap().status.unwrap();
    assert_eq!(
        st.target_active.as_deref(),
        Some("corp-lun-0-2"),
        "the recorded decision stands"
    );
    assert_eq!(
        role(&server, "corp-lun-0-1").await.as_deref(),
        Some("standby"),
        "a second replica is never promoted"
    );
    assert_eq!(
        role(&server, "corp-lun-0-2").await.as_deref(),
        Some("active")
    );
}

/// A LUN with `standbys` standbys (ordinals 0..standbys) serving from the last ordinal, as recorded in its
/// status; no agent reports yet.
async fn serving_from_the_last(standbys: i32) -> (ApiServer, Arc<Context>, Arc<StaticReports>) {
    let server = ApiServer::new();
    let mut l = lun(LUN, &["a@corp.example"], 10);
    l.spec.standbys = standbys as u32;
    create_lun(&server, &l).await;
    let reports = Arc::new(StaticReports::default());
    let ctx = Arc::new(
        Context::new(server.client(), RunConfig::default())
            .with_replication_source(reports.clone()),
    );
    for o in 0..standbys {
        create_pod(&server, LUN, o, true, Some("standby")).await;
    }
    create_pod(&server, LUN, standbys, true, Some("active")).await;
    let active = format!("{LUN}-{standbys}");
    set_lun_status(
        &server,
        LUN,
        json!({"targetActive": active, "currentActive": active}),
    )
    .await;
    (server, ctx, reports)
}

/// Lowering `standbys` removes the highest ordinals: when the active is one of them the LUN switches
/// over first, keeps the demoted replica until it has handed its mail over, and only then scales down.
#[tokio::test]
async fn lowering_standbys_switches_over_first_and_never_removes_the_active() {
    let (server, ctx, reports) = serving_from_the_last(2).await;
    reports.set("corp-lun-0-0", standby_report(0.3, 1, true));
    reports.set("corp-lun-0-1", standby_report(0.2, 1, true));
    let replicas = |server: &ApiServer| {
        let sts: StatefulSet = server.get(NS, LUN).unwrap();
        sts.spec.unwrap().replicas
    };
    let st = reconcile(&server, &ctx).await;
    assert_eq!(st.current_active.as_deref(), Some("corp-lun-0-2"));
    assert_eq!(replicas(&server), Some(3));

    patch_lun_spec(&server, LUN, json!({"standbys": 0})).await;
    let st = reconcile(&server, &ctx).await;
    assert_eq!(replicas(&server), Some(3), "the active is never removed");
    assert_eq!(st.target_active.as_deref(), Some("corp-lun-0-0"));
    assert_eq!(st.needs_resync, ["corp-lun-0-2"]);
    assert_eq!(
        role(&server, "corp-lun-0-0").await.as_deref(),
        Some("active")
    );
    assert_eq!(
        role(&server, "corp-lun-0-2").await.as_deref(),
        Some("standby")
    );
    let st = reconcile(&server, &ctx).await;
    assert_eq!(st.current_active.as_deref(), Some("corp-lun-0-0"));
    assert_eq!(
        replicas(&server),
        Some(3),
        "the demoted replica is kept until it has handed over"
    );

    // The demoted replica reports a complete pass as standby after the switchover.
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    reports.set("corp-lun-0-2", standby_report(0.1, 0, true));
    let st = reconcile(&server, &ctx).await;
    assert!(st.needs_resync.is_empty(), "{:?}", st.needs_resync);
    reconcile(&server, &ctx).await;
    assert_eq!(replicas(&server), Some(1));
    assert_eq!(
        role(&server, "corp-lun-0-0").await.as_deref(),
        Some("active")
    );
}

/// The loss counts from the controller's first sight of it, and survives the lost pod being deleted (the
/// StatefulSet recreating it under the same name); a replica that comes back within the threshold
/// serves again, and a later loss counts afresh.
#[tokio::test]
async fn the_threshold_counts_on_the_controllers_clock_across_a_deleted_pod() {
    let (server, ctx, reports) = serving().await;
    reports.set("corp-lun-0-1", standby_report(0.4, 1, true));
    lose_for(&server, &ctx, "corp-lun-0-0", 20).await;
    Api::<Pod>::namespaced(server.client(), NS)
        .delete("corp-lun-0-0", &Default::default())
        .await
        .unwrap();
    let st = reconcile(&server, &ctx).await;
    assert_eq!(
        st.target_active.as_deref(),
        Some("corp-lun-0-0"),
        "20 s < 30 s"
    );
    ctx.clock.advance(std::time::Duration::from_secs(11));
    let st = reconcile(&server, &ctx).await;
    assert_eq!(
        st.target_active.as_deref(),
        Some("corp-lun-0-1"),
        "31 s since the controller saw the loss, the pod gone meanwhile"
    );
}

#[tokio::test]
async fn a_replica_back_within_the_threshold_serves_and_a_later_loss_counts_afresh() {
    let (server, ctx, reports) = serving().await;
    reports.set("corp-lun-0-1", standby_report(0.4, 1, true));
    lose_for(&server, &ctx, "corp-lun-0-0", 25).await;
    set_pod_ready(&server, "corp-lun-0-0", true, &ago(0)).await;
    let st = reconcile(&server, &ctx).await;
    assert_eq!(st.current_active.as_deref(), Some("corp-lun-0-0"));
    lose_for(&server, &ctx, "corp-lun-0-0", 25).await;
    let st = reconcile(&server, &ctx).await;
    assert_eq!(
        st.target_active.as_deref(),
        Some("corp-lun-0-0"),
        "25 s of the second loss, not 50 s"
    );
}

/// A switchover pushes each agent its new role on the control port, ahead of the kubelet's copy of the
/// label: the demotion first, the promotion only once the old active answered that it takes no writes.
/// An old active that cannot be asked leaves the promotion to the label alone; a steady state pushes nothing.
#[tokio::test]
async fn a_switchover_pushes_the_demotion_before_the_promotion_and_only_then() {
    for old_answers in [true, false] {
        let (server, ctx, reports) = serving_from_the_last(1).await;
        reports.set("corp-lun-0-0", standby_report(0.3, 1, true));
        if old_answers {
            reports.set(
                "corp-lun-0-1",
                ReplicationReport {
                    role: Some("active".into()),
                    accepts_writes: true,
                    ..Default::default()
                },
            );
        }
        reconcile(&server, &ctx).await;
        assert_eq!(reports.take_pushes(), vec![], "steady state");

        patch_lun_spec(&server, LUN, json!({"standbys": 0})).await;
        let st = reconcile(&server, &ctx).await;
        assert_eq!(st.target_active.as_deref(), Some("corp-lun-0-0"));
        assert_eq!(
            role(&server, "corp-lun-0-0").await.as_deref(),
            Some("active")
        );
        assert_eq!(
            role(&server, "corp-lun-0-1").await.as_deref(),
            Some("standby")
        );
        let pushes = reports.take_pushes();
        if old_answers {
            assert_eq!(
                pushes,
                vec![
                    ("corp-lun-0-1".to_string(), "standby".to_string()),
                    ("corp-lun-0-0".to_string(), "active".to_string()),
                ]
            );
        } else {
            assert_eq!(
                pushes,
                vec![],
                "nobody may write alongside an old active that cannot be asked"
            );
        }
        reconcile(&server, &ctx).await;
        assert_eq!(
            reports.take_pushes(),
            vec![],
            "pushed roles are not pushed again"
        );
    }
}
