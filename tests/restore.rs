//! `mailpod-operator restore` against the in-memory API: every refusal names its cause and creates
//! nothing; a valid request creates exactly the clone PVC and the import Job; `--dry-run` creates nothing.

mod lun_common;

use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::ResourceExt;
use lun_common::*;
use mailpod_operator::crd::StorageLUN;
use mailpod_operator::restore::{self, Error, Outcome, Request};
use mailpod_operator::snapshot::volume;
use mailpod_operator::testkit::ApiServer;
use serde_json::json;

const LUN: &str = "corp-lun-0";
const SNAP: &str = "corp-lun-0-20240101-000000";

async fn cluster() -> ApiServer {
    let server = ApiServer::new();
    create_lun(
        &server,
        &lun(LUN, &["a@corp.example", "b@corp.example"], 10),
    )
    .await;
    create_lun(&server, &lun("corp-lun-1", &["c@corp.example"], 10)).await;
    create_old_snapshot(&server, LUN, SNAP, "2024-01-01T00:00:00Z").await;
    create_old_snapshot(
        &server,
        "corp-lun-1",
        "corp-lun-1-20240101-000000",
        "2024-01-01T00:00:00Z",
    )
    .await;
    server
}

fn request(mailbox: Option<&str>) -> Request {
    let mut r = Request::new(NS, LUN, SNAP);
    r.mailbox = mailbox.map(str::to_string);
    r.image = "mail:test".into();
    r.poll = Duration::from_millis(10);
    r
}

/// Runs a request that must fail; asserts that it made no mutating request.
async fn refused(server: &ApiServer, req: &Request) -> Error {
    server.clear_requests();
    let err = restore::run(&server.client(), req).await.unwrap_err();
    assert_eq!(
        server.mutating_requests(),
        vec![],
        "nothing is created when `{err}`"
    );
    err
}

#[tokio::test]
async fn refusals_name_their_cause_and_create_nothing() {
    let server = cluster().await;

    let mut r = request(None);
    r.message_id = Some("<x@y>".into());
    let err = refused(&server, &r).await;
    assert!(
        err.to_string().contains("--message-id needs --mailbox"),
        "{err}"
    );

    let mut r = request(None);
    r.all = true;
    r.folder = Some("INBOX".into());
    let err = refused(&server, &r).await;
    assert!(
        err.to_string().contains("--folder needs --mailbox"),
        "{err}"
    );

    let err = refused(&server, &request(None)).await;
    assert!(
        err.to_string().contains("--mailbox ADDR, or --all"),
        "{err}"
    );

    let mut r = request(Some("a@corp.example"));
    r.all = true;
    let err = refused(&server, &r).await;
    assert!(err.to_string().contains("--mailbox and --all"), "{err}");

    let mut r = request(Some("a@corp.example"));
    r.lun = "nope".into();
    let err = refused(&server, &r).await;
    assert_eq!(err.to_string(), "StorageLUN mail/nope not found");

    let mut r = request(Some("a@corp.example"));
    r.snapshot = "corp-lun-0-19990101-000000".into();
    let err = refused(&server, &r).await;
    assert!(matches!(err, Error::SnapshotNotFound { .. }), "{err}");
    assert!(
        err.to_string()
            .starts_with("VolumeSnapshot mail/corp-lun-0-19990101-000000 not found"),
        "{err}"
    );

    let mut r = request(Some("a@corp.example"));
    r.snapshot = "corp-lun-1-20240101-000000".into();
    let err = refused(&server, &r).await;
    assert_eq!(
        err.to_string(),
        "VolumeSnapshot corp-lun-1-20240101-000000 is not a snapshot of StorageLUN corp-lun-0: its label mailpod.io/lun is \"corp-lun-1\""
    );

    let err = refused(&server, &request(Some("c@corp.example"))).await;
    assert_eq!(
        err.to_string(),
        "mailbox c@corp.example is not on StorageLUN corp-lun-0 (not in its spec.mailboxes)"
    );

    // A snapshot still being uploaded, or failed, cannot be cloned.
    let snapshots: Api<DynamicObject> =
        Api::namespaced_with(server.client(), NS, &volume::snapshot_resource());
    snapshots
        .patch_status(
            SNAP,
            &PatchParams::default(),
            &Patch::Merge(
                json!({"status": {"readyToUse": false, "error": {"message": "upload failed"}}}),
            ),
        )
        .await
        .unwrap();
    let err = refused(&server, &request(Some("a@corp.example"))).await;
    assert_eq!(
        err.to_string(),
        format!("VolumeSnapshot {SNAP} is not readyToUse: upload failed")
    );
}

#[tokio::test]
async fn creates_exactly_the_clone_and_the_job() {
    let server = cluster().await;
    let lun_uid = Api::<StorageLUN>::namespaced(server.client(), NS)
        .get(LUN)
        .await
        .unwrap()
        .uid()
        .unwrap();
    let mut r = request(Some("A@corp.example"));
    r.folder = Some("Projects".into());
    server.clear_requests();
    let out = restore::run(&server.client(), &r).await.unwrap();
    let Outcome::Created { job, pvc, report } = &out else {
        panic!("{out:?}")
    };
    assert!(report.is_none());
    assert_eq!(job, pvc);
    assert!(job.starts_with("corp-lun-0-restore-"), "{job}");
    let created: Vec<_> = server
        .mutating_requests()
        .iter()
        .map(|q| (q.method.to_string(), q.path.clone()))
        .collect();
    assert_eq!(
        created,
        [
            (
                "POST".to_string(),
                "/apis/batch/v1/namespaces/mail/jobs".to_string()
            ),
            (
                "POST".to_string(),
                "/api/v1/namespaces/mail/persistentvolumeclaims".to_string()
            )
        ]
    );

    let job_obj = Api::<Job>::namespaced(server.client(), NS)
        .get(job)
        .await
        .unwrap();
    let owner = &job_obj.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str()),
        ("StorageLUN", lun_uid.as_str())
    );
    let labels = job_obj.labels();
    assert_eq!(labels["app.kubernetes.io/component"], "restore");
    assert_eq!(labels["mailpod.io/mailpod"], "corp");
    let spec = job_obj.spec.as_ref().unwrap();
    assert_eq!(spec.ttl_seconds_after_finished, Some(600));
    let pod = spec.template.spec.as_ref().unwrap();
    let pod_labels = spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .as_ref()
        .unwrap();
    assert_eq!(pod_labels["app.kubernetes.io/component"], "restore");
    assert_eq!(pod_labels["mailpod.io/mailpod"], "corp");
    let c = &pod.containers[0];
    assert_eq!(c.image.as_deref(), Some("mail:test"));
    assert_eq!(
        c.args.as_ref().unwrap(),
        &[
            "restore-import",
            "--target",
            "corp-lun-0.mail.svc.cluster.local:12345",
            "--mail-root",
            "/var/mail/store",
            "--work-dir",
            "/var/lib/mailpod/restore",
            "--tables-dir",
            "/etc/mailpod/tables",
            "--lun-index",
            "0",
            "--mailbox",
            "a@corp.example",
            "--folder",
            "Projects"
        ]
    );
    let mail = c
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| m.mount_path == "/var/mail/store")
        .unwrap();
    // Read-write: the clone is the Job's own copy, and Dovecot writes uidlists while it reads.
    assert_eq!(mail.read_only, None);
    let volume = pod
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == mail.name)
        .unwrap();
    let claim = volume.persistent_volume_claim.as_ref().unwrap();
    assert_eq!(
        (claim.claim_name.as_str(), claim.read_only),
        (pvc.as_str(), None)
    );

    let pvc_obj = Api::<PersistentVolumeClaim>::namespaced(server.client(), NS)
        .get(pvc)
        .await
        .unwrap();
    let owner = &pvc_obj.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str(), owner.uid.as_str()),
        ("Job", job.as_str(), job_obj.uid().unwrap().as_str())
    );
    let s = pvc_obj.spec.as_ref().unwrap();
    let source = s.data_source.as_ref().unwrap();
    assert_eq!(
        (
            source.api_group.as_deref(),
            source.kind.as_str(),
            source.name.as_str()
        ),
        (Some("snapshot.storage.k8s.io"), "VolumeSnapshot", SNAP)
    );
    assert_eq!(
        s.resources.as_ref().unwrap().requests.as_ref().unwrap()["storage"].0,
        "1Gi",
        "the LUN's capacity"
    );
}

#[tokio::test]
async fn dry_run_prints_both_objects_and_creates_nothing() {
    let server = cluster().await;
    let mut r = request(None);
    r.all = true;
    r.dry_run = true;
    server.clear_requests();
    let out = restore::run(&server.client(), &r).await.unwrap();
    assert_eq!(server.mutating_requests(), vec![]);
    let Outcome::DryRun(yaml) = out else {
        panic!("{out:?}")
    };
    let docs: Vec<serde_json::Value> = yaml
        .split("---\n")
        .filter(|d| !d.trim().is_empty())
        .map(|d| serde_yaml::from_str(d).unwrap())
        .collect();
    let kinds: Vec<_> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["Job", "PersistentVolumeClaim"]);
    let args = docs[0]["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap();
    assert!(args.contains(&json!("--all")));
    // Only the mailboxes the LUN holds now are restored: read from the mounted tables when it runs.
    let at = args.iter().position(|a| a == "--tables-dir").unwrap();
    assert_eq!(args[at + 1], "/etc/mailpod/tables", "{args:?}");
    let at = args.iter().position(|a| a == "--lun-index").unwrap();
    assert_eq!(args[at + 1], "0", "{args:?}");
    let volumes = docs[0]["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap();
    assert!(
        volumes
            .iter()
            .any(|v| v["configMap"]["name"] == "corp-access-tables"),
        "{volumes:?}"
    );
    assert_eq!(docs[1]["spec"]["dataSource"]["name"], SNAP);
}

/// `--wait` reports the Job's result; a failed Job is an error naming it.
#[tokio::test]
async fn wait_reports_a_failed_job() {
    let server = cluster().await;
    let mut r = request(Some("a@corp.example"));
    r.wait = true;
    r.timeout = Duration::from_secs(5);
    let client = server.client();
    // Plays the Job controller: the first restore Job fails.
    let jobs: Api<Job> = Api::namespaced(client.clone(), NS);
    let fail = tokio::spawn(async move {
        loop {
            if let Ok(list) = jobs.list(&Default::default()).await {
                if let Some(j) = list.items.first() {
                    let status = json!({"status": {"conditions": [{"type": "Failed", "status": "True",
                        "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"}]}});
                    jobs.patch_status(
                        &j.name_any(),
                        &PatchParams::default(),
                        &Patch::Merge(status),
                    )
                    .await
                    .unwrap();
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    let err = restore::run(&client, &r).await.unwrap_err();
    fail.await.unwrap();
    assert!(matches!(err, Error::JobFailed { .. }), "{err}");
    assert!(err.to_string().contains("backoff limit"), "{err}");
}

/// A snapshot larger than the LUN's (since reduced) capacity is cloned at its own size.
#[tokio::test]
async fn the_clone_takes_the_snapshots_restore_size_when_larger() {
    let server = cluster().await;
    Api::<DynamicObject>::namespaced_with(server.client(), NS, &volume::snapshot_resource())
        .patch_status(
            SNAP,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"restoreSize": "5Gi"}})),
        )
        .await
        .unwrap();
    let mut r = request(Some("a@corp.example"));
    r.dry_run = true;
    let out = restore::run(&server.client(), &r).await.unwrap();
    let yaml = match out {
        restore::Outcome::DryRun(y) => y,
        other => panic!("{other:?}"),
    };
    let pvc = yaml
        .split("\n---")
        .find(|d| d.contains("kind: PersistentVolumeClaim"))
        .unwrap();
    assert!(pvc.contains("storage: 5Gi"), "{pvc}");
}
