//! `kubectl mailpod` against the in-memory API: what it shows and what it changes.

use k8s_openapi::api::batch::v1::{CronJob, Job};
use kube::api::{Api, PostParams};
use kube::ResourceExt;
use mailpod_operator::crd::{
    FailoverPhase, MailPod, ServiceStatus, SiteFailover, SiteFailoverStatus, SnapshotResult,
    StorageLUN, StorageLUNStatus,
};
use mailpod_operator::plugin::{self, PluginError, FAILBACK_ANNOTATION, FAILOVER_ANNOTATION};
use mailpod_operator::resources::{self, Child};
use mailpod_operator::testkit::ApiServer;

const NS: &str = "mail";

async fn setup() -> (ApiServer, kube::Client) {
    let server = ApiServer::new();
    let client = server.client();
    let mut mp: MailPod = serde_yaml::from_str(
        "apiVersion: mailpod.io/v1alpha1\nkind: MailPod\nmetadata: {name: corp, namespace: mail}\nspec:\n  domains: [example.com]\n  postmaster: a@example.com\n  mailboxes:\n    inline: [a@example.com, b@example.com, c@example.com]\n  backend: {maxUsersPerLun: 2}\n  tls: {secretName: corp-tls}\n",
    )
    .unwrap();
    let mailboxes = resources::mailboxes::resolve(&mp.spec, &|_: &_| None).unwrap();
    let desired =
        resources::mailpod::build(&mp, &mailboxes, &[], &resources::Defaults::image("img"))
            .unwrap();
    let mps: Api<MailPod> = Api::namespaced(client.clone(), NS);
    mp = mps.create(&PostParams::default(), &mp).await.unwrap();
    let mut status = mp.status.clone().unwrap_or_default();
    status.mailboxes = 3;
    status.lun_count = 2;
    status.services = vec![ServiceStatus {
        name: "mx".into(),
        ready: 2,
        desired: 2,
    }];
    status.access_tables_hash = Some(desired.tables_hash.clone());
    mps.patch_status(
        "corp",
        &Default::default(),
        &kube::api::Patch::Merge(serde_json::json!({ "status": status })),
    )
    .await
    .unwrap();
    let luns: Api<StorageLUN> = Api::namespaced(client.clone(), NS);
    let cronjobs: Api<CronJob> = Api::namespaced(client.clone(), NS);
    for child in desired.children {
        if let Child::StorageLUN(lun) = child {
            for c in resources::store::build(&lun, &resources::Defaults::image("img")) {
                if let Child::CronJob(cj) = c {
                    cronjobs.create(&PostParams::default(), &cj).await.unwrap();
                }
            }
            let created = luns.create(&PostParams::default(), &lun).await.unwrap();
            let st = StorageLUNStatus {
                current_active: Some(format!("{}-0", created.name_any())),
                replication_lag_seconds: Some(1.5),
                last_snapshot: Some(SnapshotResult {
                    name: Some("snap".into()),
                    time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                        "2026-11-23T08:00:00Z".parse().unwrap(),
                    ),
                    result: "Succeeded".into(),
                    message: None,
                    pause_millis: Some(120),
                }),
                ..Default::default()
            };
            luns.patch_status(
                &created.name_any(),
                &Default::default(),
                &kube::api::Patch::Merge(serde_json::json!({ "status": st })),
            )
            .await
            .unwrap();
        }
    }
    let sf: SiteFailover = serde_yaml::from_str(
        "apiVersion: mailpod.io/v1alpha1\nkind: SiteFailover\nmetadata: {name: geo, namespace: mail}\nspec:\n  mailPods: [corp]\n  localSite: fra\n  primarySite: fra\n  peer: {name: ams, kubeconfigSecret: {name: k, key: kubeconfig}}\n",
    )
    .unwrap();
    let sfs: Api<SiteFailover> = Api::namespaced(client.clone(), NS);
    sfs.create(&PostParams::default(), &sf).await.unwrap();
    let st = SiteFailoverStatus {
        phase: FailoverPhase::Healthy,
        active_site: Some("fra".into()),
        epoch: 3,
        access_tables_in_sync: Some(true),
        witness: Some(mailpod_operator::crd::WitnessStatus {
            reachable: true,
            holder: Some("fra".into()),
            quorum: true,
        }),
        ..Default::default()
    };
    sfs.patch_status(
        "geo",
        &Default::default(),
        &kube::api::Patch::Merge(serde_json::json!({ "status": st })),
    )
    .await
    .unwrap();
    (server, client)
}

#[tokio::test]
async fn status_shows_services_luns_and_sites() {
    let (_server, client) = setup().await;
    let out = plugin::status(&client, NS, "corp").await.unwrap();
    assert!(out.contains("Mailboxes:    3 on 2 LUN(s)"), "{out}");
    assert!(out.contains("mx            2/2"), "{out}");
    // Two LUNs of at most 2 users: 2 and 1, each with its active replica and last snapshot.
    let lun0 = out.lines().find(|l| l.starts_with("corp-lun-0")).unwrap();
    assert!(
        lun0.contains(" 2 ") && lun0.contains("corp-lun-0-0") && lun0.contains("1.5"),
        "{lun0}"
    );
    assert!(lun0.contains("2026-11-23T08:00:00Z Succeeded"), "{lun0}");
    let lun1 = out.lines().find(|l| l.starts_with("corp-lun-1")).unwrap();
    assert!(lun1.contains(" 1 "), "{lun1}");
    assert!(out.contains("SiteFailover geo: fra (here) <-> ams, phase Healthy, active fra, epoch 3, tables in sync true"), "{out}");
    assert!(
        out.contains("  witness: reachable, Lease held by fra, in quorum"),
        "{out}"
    );

    let err = plugin::status(&client, NS, "nope").await.unwrap_err();
    assert!(matches!(err, PluginError::NotFound { .. }));
    assert_eq!(err.to_string(), "MailPod mail/nope not found");
}

#[tokio::test]
async fn snapshot_now_runs_the_cronjobs_template() {
    let (_server, client) = setup().await;
    let msg = plugin::snapshot_now(&client, NS, "corp-lun-1")
        .await
        .unwrap();
    let jobs: Api<Job> = Api::namespaced(client.clone(), NS);
    let list = jobs.list(&Default::default()).await.unwrap().items;
    assert_eq!(list.len(), 1);
    let job = &list[0];
    assert_eq!(msg, format!("job/{} created", job.name_any()));
    assert!(job.name_any().starts_with("corp-lun-1-snapshot-manual-"));
    let cj: CronJob = Api::namespaced(client.clone(), NS)
        .get("corp-lun-1-snapshot")
        .await
        .unwrap();
    assert_eq!(job.owner_references()[0].name, "corp-lun-1-snapshot");
    let args = |spec: &k8s_openapi::api::batch::v1::JobSpec| {
        spec.template.spec.as_ref().unwrap().containers[0]
            .args
            .clone()
    };
    assert_eq!(
        args(job.spec.as_ref().unwrap()),
        args(cj.spec.unwrap().job_template.spec.as_ref().unwrap())
    );
    let missing = plugin::snapshot_now(&client, NS, "corp-lun-7")
        .await
        .unwrap_err();
    assert_eq!(missing.to_string(), "StorageLUN mail/corp-lun-7 not found");
}

#[tokio::test]
async fn fence_and_unfence() {
    let (_server, client) = setup().await;
    let luns: Api<StorageLUN> = Api::namespaced(client.clone(), NS);
    assert_eq!(
        plugin::set_fenced(&client, NS, "corp-lun-0", true)
            .await
            .unwrap(),
        "storagelun/corp-lun-0 fenced"
    );
    assert!(luns.get("corp-lun-0").await.unwrap().spec.fenced);
    assert!(
        !luns.get("corp-lun-1").await.unwrap().spec.fenced,
        "only the named LUN"
    );
    assert_eq!(
        plugin::set_fenced(&client, NS, "corp-lun-0", true)
            .await
            .unwrap(),
        "storagelun/corp-lun-0 already fenced"
    );
    plugin::set_fenced(&client, NS, "corp-lun-0", false)
        .await
        .unwrap();
    assert!(!luns.get("corp-lun-0").await.unwrap().spec.fenced);
}

#[tokio::test]
async fn promote_and_failback_are_requests_checked_against_the_active_site() {
    let (_server, client) = setup().await;
    let sfs: Api<SiteFailover> = Api::namespaced(client.clone(), NS);
    // Here is fra, which is active: promoting it makes no sense, failing back neither.
    let e = plugin::request_switch(&client, NS, "geo", FAILOVER_ANNOTATION)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("site fra is already active"), "{e}");
    let e = plugin::request_switch(&client, NS, "geo", FAILBACK_ANNOTATION)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("nothing to fail back"), "{e}");
    assert!(sfs
        .get("geo")
        .await
        .unwrap()
        .annotations()
        .get(FAILOVER_ANNOTATION)
        .is_none());
    // After a failover to ams, failback is a request the controller acts on.
    sfs.patch_status(
        "geo",
        &Default::default(),
        &kube::api::Patch::Merge(
            serde_json::json!({"status": {"activeSite": "ams", "phase": "FailedOver", "epoch": 4}}),
        ),
    )
    .await
    .unwrap();
    plugin::request_switch(&client, NS, "geo", FAILBACK_ANNOTATION)
        .await
        .unwrap();
    assert_eq!(
        sfs.get("geo")
            .await
            .unwrap()
            .annotations()
            .get(FAILBACK_ANNOTATION)
            .map(String::as_str),
        Some("requested")
    );
}

#[tokio::test]
async fn restore_validates_and_creates_the_clone_and_job() {
    use mailpod_operator::restore::Request;
    use mailpod_operator::snapshot::volume;
    let (server, client) = setup().await;
    let luns: Api<StorageLUN> = Api::namespaced(client.clone(), NS);
    let lun = luns.get("corp-lun-0").await.unwrap();
    let snapshots: Api<kube::api::DynamicObject> =
        Api::namespaced_with(client.clone(), NS, &volume::snapshot_resource());
    snapshots
        .create(
            &PostParams::default(),
            &volume::build(&lun, "corp-lun-0-snap", "mail-corp-lun-0-0", None),
        )
        .await
        .unwrap();
    snapshots
        .patch_status(
            "corp-lun-0-snap",
            &Default::default(),
            &kube::api::Patch::Merge(serde_json::json!({"status": {"readyToUse": true}})),
        )
        .await
        .unwrap();
    let mailbox = lun.spec.mailboxes[0].clone();
    let other = ["a@example.com", "b@example.com", "c@example.com"]
        .into_iter()
        .find(|m| !lun.spec.mailboxes.iter().any(|x| x == m))
        .unwrap();

    let mut req = Request::new(NS, "corp-lun-0", "corp-lun-0-snap");
    req.mailbox = Some(other.into());
    server.clear_requests();
    let err = plugin::restore(&client, &req).await.unwrap_err();
    assert!(matches!(err, PluginError::Restore(_)), "{err}");
    assert!(
        err.to_string().contains("is not on StorageLUN corp-lun-0"),
        "{err}"
    );
    assert!(server.mutating_requests().is_empty());

    req.mailbox = Some(mailbox);
    req.message_id = Some("<m1@example.com>".into());
    let out = plugin::restore(&client, &req).await.unwrap();
    assert!(out.starts_with("job/corp-lun-0-restore-"), "{out}");
    assert!(
        out.contains("persistentvolumeclaim/corp-lun-0-restore-"),
        "{out}"
    );
    let jobs: Api<Job> = Api::namespaced(client.clone(), NS);
    let restore_jobs: Vec<_> = jobs
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|j| {
            j.labels()
                .get("app.kubernetes.io/component")
                .map(String::as_str)
                == Some("restore")
        })
        .collect();
    assert_eq!(restore_jobs.len(), 1);
}
