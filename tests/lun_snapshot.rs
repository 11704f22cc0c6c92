//! `mailpod-operator snapshot` against the in-memory API: the snapshot, pruning, status, and above all
//! that delivery is resumed whatever fails.

mod lun_common;

use std::time::Duration;

use http::Method;
use kube::api::{Api, DynamicObject};
use kube::ResourceExt;
use lun_common::*;
use mailpod_operator::crd::StorageLUN;
use mailpod_operator::snapshot::{self, volume, Error, Options};
use mailpod_operator::testkit::{ApiServer, Fault, FaultKind};
use serde_json::json;

const LUN: &str = "corp-lun-0";

/// A LUN serving from replica 0, a default snapshot class, and a snapshot controller.
async fn cluster() -> ApiServer {
    let server = ApiServer::new();
    create_lun(&server, &lun(LUN, &["a@corp.example"], 10)).await;
    set_lun_status(
        &server,
        LUN,
        json!({"currentActive": "corp-lun-0-0", "targetActive": "corp-lun-0-0"}),
    )
    .await;
    create_pod(&server, LUN, 0, true, Some("active")).await;
    create_pod(&server, LUN, 1, true, Some("standby")).await;
    create_default_snapshot_class(&server).await;
    server
}

fn opts() -> Options {
    let mut o = Options::new(NS, LUN);
    o.poll = Duration::from_millis(10);
    o.timeout = Duration::from_secs(5);
    o.cut_timeout = Some(Duration::from_millis(500));
    o
}

async fn snapshots(server: &ApiServer) -> Vec<DynamicObject> {
    let api: Api<DynamicObject> =
        Api::namespaced_with(server.client(), NS, &volume::snapshot_resource());
    api.list(&Default::default()).await.unwrap().items
}

async fn status(server: &ApiServer) -> mailpod_operator::crd::StorageLUNStatus {
    Api::<StorageLUN>::namespaced(server.client(), NS)
        .get(LUN)
        .await
        .unwrap()
        .status
        .unwrap()
}

#[tokio::test]
async fn snapshots_the_active_pvc_prunes_to_retain_and_records_status() {
    let server = cluster().await;
    // retain is 2: of these, the two oldest of this LUN go; the other LUN's are never touched.
    create_old_snapshot(
        &server,
        LUN,
        "corp-lun-0-20200101-000000",
        "2020-01-01T00:00:00Z",
    )
    .await;
    create_old_snapshot(
        &server,
        LUN,
        "corp-lun-0-20200102-000000",
        "2020-01-02T00:00:00Z",
    )
    .await;
    create_old_snapshot(
        &server,
        LUN,
        "corp-lun-0-20200103-000000",
        "2020-01-03T00:00:00Z",
    )
    .await;
    create_old_snapshot(
        &server,
        "corp-lun-1",
        "corp-lun-1-20190101-000000",
        "2019-01-01T00:00:00Z",
    )
    .await;
    let csi = snapshot_controller(&server, true);
    let agent = FakeAgent::default();

    let out = snapshot::run(&server.client(), &agent, &opts())
        .await
        .unwrap();
    csi.abort();

    assert_eq!(
        (agent.pauses(), agent.resumes(), agent.is_paused()),
        (1, 1, false)
    );
    assert_eq!(
        out.pruned,
        ["corp-lun-0-20200102-000000", "corp-lun-0-20200101-000000"]
    );
    let mut left: Vec<_> = snapshots(&server)
        .await
        .iter()
        .map(|s| s.name_any())
        .collect();
    left.sort();
    assert_eq!(
        left,
        [
            "corp-lun-0-20200103-000000".to_string(),
            out.name.clone(),
            "corp-lun-1-20190101-000000".into()
        ]
    );
    let new = snapshots(&server)
        .await
        .into_iter()
        .find(|s| s.name_any() == out.name)
        .unwrap();
    assert_eq!(
        new.data["spec"]["source"]["persistentVolumeClaimName"],
        "mail-corp-lun-0-0"
    );
    assert_eq!(new.labels()["mailpod.io/lun"], LUN);
    assert!(
        new.owner_references().is_empty(),
        "a snapshot has no owner to be garbage-collected with"
    );

    let st = status(&server).await;
    let names: Vec<_> = st.snapshots.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        [out.name.as_str(), "corp-lun-0-20200103-000000"],
        "newest first, this LUN only"
    );
    let last = st.last_snapshot.unwrap();
    assert_eq!(
        (last.result.as_str(), last.name.as_deref()),
        ("Succeeded", Some(out.name.as_str()))
    );
    assert!(last.pause_millis.is_some());
    assert!(out.pause < Duration::from_secs(2), "pause {:?}", out.pause);
    let events = server
        .requests()
        .into_iter()
        .filter(|r| r.path.contains("/events"))
        .count();
    assert!(events > 0, "an Event is published");
}

#[tokio::test]
async fn failed_volumesnapshot_create_still_resumes_and_prunes_nothing() {
    let server = cluster().await;
    create_old_snapshot(
        &server,
        LUN,
        "corp-lun-0-20200101-000000",
        "2020-01-01T00:00:00Z",
    )
    .await;
    create_old_snapshot(
        &server,
        LUN,
        "corp-lun-0-20200102-000000",
        "2020-01-02T00:00:00Z",
    )
    .await;
    create_old_snapshot(
        &server,
        LUN,
        "corp-lun-0-20200103-000000",
        "2020-01-03T00:00:00Z",
    )
    .await;
    server.inject(Fault::new(
        Some(Method::POST),
        "/volumesnapshots",
        FaultKind::Status(500),
        1,
    ));
    let agent = FakeAgent::default();

    let err = snapshot::run(&server.client(), &agent, &opts())
        .await
        .unwrap_err();

    assert!(
        err.to_string()
            .contains("creating VolumeSnapshot corp-lun-0-"),
        "{err}"
    );
    assert_eq!(
        (agent.pauses(), agent.resumes(), agent.is_paused()),
        (1, 1, false)
    );
    assert_eq!(
        snapshots(&server).await.len(),
        3,
        "a failed run deletes nothing"
    );
    let last = status(&server).await.last_snapshot.unwrap();
    assert_eq!(last.result, "Failed");
    assert!(last.message.unwrap().contains("creating VolumeSnapshot"));
}

#[tokio::test]
async fn snapshot_never_cut_times_out_while_paused_and_resumes() {
    let server = cluster().await; // no snapshot controller: never cut
    let agent = FakeAgent::default();
    let err = snapshot::run(&server.client(), &agent, &opts())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::CutTimeout { .. }), "{err}");
    assert_eq!(
        (agent.pauses(), agent.resumes(), agent.is_paused()),
        (1, 1, false)
    );
}

#[tokio::test]
async fn timeout_waiting_for_ready_to_use_happens_after_resume() {
    let server = cluster().await;
    let csi = snapshot_controller(&server, false); // cut, never ready
    let agent = FakeAgent::default();
    let mut o = opts();
    o.timeout = Duration::from_millis(300);
    let err = snapshot::run(&server.client(), &agent, &o)
        .await
        .unwrap_err();
    csi.abort();
    assert!(matches!(err, Error::ReadyTimeout { .. }), "{err}");
    assert_eq!(
        (agent.pauses(), agent.resumes(), agent.is_paused()),
        (1, 1, false)
    );
    let last = status(&server).await.last_snapshot.unwrap();
    assert!(
        last.pause_millis.unwrap() < 300,
        "the wait for readyToUse is not part of the pause"
    );
}

#[tokio::test]
async fn a_failed_pause_request_is_still_followed_by_resume() {
    let server = cluster().await;
    let agent = FakeAgent {
        fail_pause: true,
        ..Default::default()
    };
    let err = snapshot::run(&server.client(), &agent, &opts())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Pause { .. }), "{err}");
    assert_eq!((agent.resumes(), agent.is_paused()), (1, false));
    assert!(snapshots(&server).await.is_empty());
}

#[tokio::test]
async fn resume_is_retried_until_the_agent_answers() {
    let server = cluster().await;
    let csi = snapshot_controller(&server, true);
    let agent = FakeAgent::default();
    agent
        .fail_resumes
        .store(2, std::sync::atomic::Ordering::SeqCst);
    snapshot::run(&server.client(), &agent, &opts())
        .await
        .unwrap();
    csi.abort();
    assert_eq!((agent.resumes(), agent.is_paused()), (3, false));
}

#[tokio::test]
async fn missing_snapshot_crd_fails_before_pausing() {
    let server = cluster().await;
    server.inject(Fault::new(
        Some(Method::GET),
        "/volumesnapshots",
        FaultKind::Status(404),
        1,
    ));
    let agent = FakeAgent::default();
    let err = snapshot::run(&server.client(), &agent, &opts())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::SnapshotCrdMissing), "{err}");
    assert!(err.to_string().contains("snapshot.storage.k8s.io/v1"));
    assert_eq!(
        agent.pauses(),
        0,
        "delivery is never paused for a snapshot that cannot be taken"
    );
}

#[tokio::test]
async fn unknown_snapshot_class_and_no_active_replica_are_named() {
    let server = cluster().await;
    let agent = FakeAgent::default();
    let mut o = opts();
    o.volume_snapshot_class = Some("gold".into());
    let err = snapshot::run(&server.client(), &agent, &o)
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "VolumeSnapshotClass `gold` not found");

    set_pod_ready(&server, "corp-lun-0-0", false, "2024-01-01T00:00:00Z").await;
    let err = snapshot::run(&server.client(), &agent, &opts())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NoActive { .. }), "{err}");
    assert!(err.to_string().contains("corp-lun-0-0"), "{err}");
    assert_eq!(agent.pauses(), 0);

    let mut o = opts();
    o.lun = "nope".into();
    let err = snapshot::run(&server.client(), &agent, &o)
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "StorageLUN mail/nope not found");
}

/// The snapshot job's namespaced Role cannot read cluster-scoped VolumeSnapshotClasses: the check is skipped
/// and the snapshot is still taken (a bad class would show on the VolumeSnapshot itself).
#[tokio::test]
async fn class_check_is_skipped_where_classes_may_not_be_read() {
    let server = cluster().await;
    server.inject(Fault::new(
        Some(Method::GET),
        "/volumesnapshotclasses",
        FaultKind::Status(403),
        1,
    ));
    let csi = snapshot_controller(&server, true);
    let agent = FakeAgent::default();
    let out = snapshot::run(&server.client(), &agent, &opts()).await;
    csi.abort();
    let out = out.unwrap();
    assert!(out.name.starts_with("corp-lun-0-"), "{}", out.name);
    assert_eq!(
        (agent.pauses(), agent.resumes(), agent.is_paused()),
        (1, 1, false)
    );
    assert_eq!(
        server.pending_faults(),
        0,
        "the class lookup was made and refused"
    );
}

/// Backups outlive what they back up: deleting the LUN (as deleting its MailPod or draining it would)
/// leaves its VolumeSnapshots in place.
#[tokio::test]
async fn deleting_the_lun_leaves_its_snapshots() {
    let server = cluster().await;
    let csi = snapshot_controller(&server, true);
    let out = snapshot::run(&server.client(), &FakeAgent::default(), &opts())
        .await
        .unwrap();
    csi.abort();
    Api::<StorageLUN>::namespaced(server.client(), NS)
        .delete(LUN, &Default::default())
        .await
        .unwrap();
    let left: Vec<_> = snapshots(&server)
        .await
        .iter()
        .map(|s| s.name_any())
        .collect();
    assert_eq!(left, [out.name]);
}
