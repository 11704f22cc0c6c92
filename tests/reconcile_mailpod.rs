//! The MailPod reconciler against the in-memory Kubernetes API: run to a fixed point and check what the
//! cluster holds, what was written, and what was not.

#![cfg(feature = "testkit")]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use http::Method;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use mailpod_operator::controller::{mailpod, Context, RunConfig};
use mailpod_operator::crd::{condition, MailPod, StorageLUN};
use mailpod_operator::names::{self, labels};
use mailpod_operator::testkit::fixtures::{
    self, mark_ready, reconcile_once, reconcile_to_fixed_point,
};
use mailpod_operator::testkit::{ApiServer, Fault, FaultKind};
use serde_json::json;

const NS: &str = "mail";

fn ctx(server: &ApiServer) -> Arc<Context> {
    Arc::new(Context::new(server.client(), RunConfig::default()))
}

fn condition<'a>(
    mp: &'a MailPod,
    type_: &str,
) -> &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    mp.status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
        .unwrap_or_else(|| panic!("no {type_} condition in {:?}", mp.status))
}

/// (kind, name) -> resourceVersion of every object labelled as belonging to `mailpod`.
fn children_versions(server: &ApiServer, mailpod: &str) -> BTreeMap<(String, String), String> {
    fn add<K: Resource<DynamicType = ()> + serde::de::DeserializeOwned>(
        server: &ApiServer,
        mailpod: &str,
        out: &mut BTreeMap<(String, String), String>,
    ) {
        for o in server.list::<K>(Some(NS)) {
            if o.meta()
                .labels
                .as_ref()
                .and_then(|l| l.get(labels::MAILPOD))
                .map(String::as_str)
                == Some(mailpod)
            {
                out.insert(
                    (K::kind(&()).to_string(), o.name_any()),
                    o.meta().resource_version.clone().unwrap_or_default(),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    add::<ConfigMap>(server, mailpod, &mut out);
    add::<Service>(server, mailpod, &mut out);
    add::<StatefulSet>(server, mailpod, &mut out);
    add::<PodDisruptionBudget>(server, mailpod, &mut out);
    add::<NetworkPolicy>(server, mailpod, &mut out);
    add::<StorageLUN>(server, mailpod, &mut out);
    out
}

fn placement(server: &ApiServer, mailpod: &str) -> BTreeMap<String, u32> {
    server
        .list::<StorageLUN>(Some(NS))
        .into_iter()
        .filter(|l| l.spec.mail_pod == mailpod)
        .flat_map(|l| {
            l.spec
                .mailboxes
                .iter()
                .map(move |m| (m.clone(), l.spec.index))
                .collect::<Vec<_>>()
        })
        .collect()
}

#[tokio::test]
async fn converges_with_owned_children_and_status_then_writes_nothing() {
    let server = ApiServer::new();
    let client = server.client();
    let ctx = ctx(&server);
    let mp = fixtures::create_mailpod(&client, NS, "corp", "corp.example", 2500).await;
    let uid = mp.uid().unwrap();

    let passes = reconcile_to_fixed_point(&server, &ctx, NS, "corp", 5).await;
    assert!(passes >= 1);

    let children = children_versions(&server, "corp");
    let names: BTreeSet<String> = children.keys().map(|(k, n)| format!("{k}/{n}")).collect();
    for expected in [
        "ConfigMap/corp-access-tables",
        "ConfigMap/corp-mail-settings",
        "StatefulSet/corp-mx",
        "StatefulSet/corp-submission",
        "StatefulSet/corp-imap",
        "Service/corp-mx",
        "Service/corp-mx-hl",
        "PodDisruptionBudget/corp-mx",
        "StorageLUN/corp-lun-0",
        "StorageLUN/corp-lun-1",
        "StorageLUN/corp-lun-2",
    ] {
        assert!(
            names.contains(expected),
            "{expected} missing from {names:?}"
        );
    }
    assert!(
        !names
            .iter()
            .any(|n| n.contains("pop3") || n.contains("webmail")),
        "{names:?}"
    );
    assert!(names.iter().any(|n| n.starts_with("NetworkPolicy/")));
    assert!(!names.contains("StorageLUN/corp-lun-3"));

    // Every child is owned by this MailPod (as controller) and labelled with it.
    for o in server.list::<StatefulSet>(Some(NS)) {
        let refs = o.metadata.owner_references.clone().unwrap_or_default();
        assert_eq!(refs.len(), 1, "{}", o.name_any());
        assert_eq!(refs[0].uid, uid);
        assert_eq!(refs[0].kind, "MailPod");
        assert_eq!(refs[0].controller, Some(true));
        assert_eq!(
            o.labels().get(labels::MANAGED_BY).map(String::as_str),
            Some(labels::MANAGER)
        );
    }
    let luns = server.list::<StorageLUN>(Some(NS));
    assert_eq!(
        luns.iter()
            .map(|l| l.spec.mailboxes.len())
            .collect::<Vec<_>>(),
        vec![1000, 1000, 500]
    );
    assert!(luns
        .iter()
        .all(|l| l.metadata.owner_references.as_ref().unwrap()[0].uid == uid));

    let mp: MailPod = server.get(NS, "corp").unwrap();
    let status = mp.status.clone().unwrap();
    assert_eq!(status.observed_generation, mp.metadata.generation);
    assert_eq!(status.mailboxes, 2500);
    assert_eq!(status.lun_count, 3);
    assert_eq!(
        status.luns.iter().map(|l| l.users).collect::<Vec<_>>(),
        vec![1000, 1000, 500]
    );
    assert_eq!(status.services.len(), 3);
    assert!(status
        .services
        .iter()
        .all(|s| s.desired == 2 && s.ready == 0));
    let tables: ConfigMap = server.get(NS, "corp-access-tables").unwrap();
    let hash = mailpod_operator::mailconfig::tables::data_hash(&tables.data.unwrap());
    assert_eq!(status.access_tables_hash.as_deref(), Some(hash.as_str()));
    // Nothing is running yet: not ready, and saying why.
    let ready = condition(&mp, condition::READY);
    assert_eq!(ready.status, "False");
    assert!(ready.message.contains("mx 0/2"), "{}", ready.message);

    // Steady state: a pass reads but writes nothing.
    server.clear_requests();
    let action = reconcile_once(&client, &ctx, NS, "corp").await.unwrap();
    assert_eq!(
        server.mutating_requests(),
        vec![],
        "steady-state reconcile wrote"
    );
    assert!(!server.requests().is_empty());
    assert_eq!(action, Action::requeue(mailpod::RESYNC));

    // The workloads come up: Ready=True, and again a pass after that writes nothing.
    mark_ready(&client, NS, "corp").await;
    let before = condition(&mp, condition::READY)
        .last_transition_time
        .clone();
    reconcile_to_fixed_point(&server, &ctx, NS, "corp", 3).await;
    let mp: MailPod = server.get(NS, "corp").unwrap();
    let ready = condition(&mp, condition::READY);
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("True", "Serving"),
        "{ready:?}"
    );
    assert_eq!(condition(&mp, condition::PROGRESSING).status, "False");
    assert_eq!(condition(&mp, condition::DEGRADED).status, "False");
    assert!(mp
        .status
        .as_ref()
        .unwrap()
        .services
        .iter()
        .all(|s| s.ready == 2));
    assert!(ready.last_transition_time.0 >= before.0);
    let transition = ready.last_transition_time.clone();
    server.clear_requests();
    reconcile_once(&client, &ctx, NS, "corp").await.unwrap();
    assert_eq!(server.mutating_requests(), vec![]);
    let mp: MailPod = server.get(NS, "corp").unwrap();
    assert_eq!(
        condition(&mp, condition::READY).last_transition_time,
        transition
    );

    // An mx pod is lost after the rollout: not ready, degraded, not progressing. (The whole status is
    // applied: with Server-Side Apply, fields the manager leaves out are removed.)
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), NS);
    let generation = sts.get("corp-mx").await.unwrap().metadata.generation;
    let status = json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "status": {
        "replicas": 2, "readyReplicas": 1, "updatedReplicas": 2, "availableReplicas": 1,
        "observedGeneration": generation, "currentRevision": "r1", "updateRevision": "r1"}});
    sts.patch_status(
        "corp-mx",
        &PatchParams::apply("kube-controller-manager").force(),
        &Patch::Apply(status),
    )
    .await
    .unwrap();
    reconcile_once(&client, &ctx, NS, "corp").await.unwrap();
    let mp: MailPod = server.get(NS, "corp").unwrap();
    let ready = condition(&mp, condition::READY);
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "ServicesNotReady")
    );
    assert!(ready.message.contains("mx 1/2"), "{}", ready.message);
    assert!(ready.last_transition_time.0 >= transition.0);
    let degraded = condition(&mp, condition::DEGRADED);
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("True", "ReplicasUnavailable")
    );
    assert_eq!(condition(&mp, condition::PROGRESSING).status, "False");
}

#[tokio::test]
async fn invalid_spec_reports_the_field_and_touches_no_child() {
    let server = ApiServer::new();
    let client = server.client();
    let ctx = ctx(&server);
    fixtures::create_mailpod(&client, NS, "corp", "corp.example", 50).await;
    reconcile_to_fixed_point(&server, &ctx, NS, "corp", 5).await;
    let before = children_versions(&server, "corp");

    let mps: Api<MailPod> = Api::namespaced(client.clone(), NS);
    mps.patch(
        "corp",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"mailboxes": {"inline": ["eve@elsewhere.example"]}, "backend": {"standbys": 9}}})),
    )
    .await
    .unwrap();
    server.clear_requests();
    let action = reconcile_once(&client, &ctx, NS, "corp").await.unwrap();
    assert_eq!(
        action,
        Action::await_change(),
        "an invalid spec waits for a change"
    );

    let mp: MailPod = server.get(NS, "corp").unwrap();
    let ready = condition(&mp, condition::READY);
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", condition::REASON_INVALID_SPEC)
    );
    assert!(
        ready.message.contains("spec.mailboxes.inline[0]"),
        "{}",
        ready.message
    );
    assert!(
        ready.message.contains("spec.backend.standbys"),
        "{}",
        ready.message
    );
    assert_eq!(
        mp.status.as_ref().unwrap().observed_generation,
        mp.metadata.generation
    );
    assert_eq!(
        children_versions(&server, "corp"),
        before,
        "a child changed"
    );
    let writes = server.mutating_requests();
    assert!(
        writes.iter().all(|r| r.method != Method::DELETE),
        "{writes:?}"
    );
    assert!(
        writes
            .iter()
            .all(|r| r.path.ends_with("/mailpods/corp/status") || r.path.contains("/events")),
        "{writes:?}"
    );
    assert!(
        writes.iter().any(|r| r.path.contains("/events")),
        "an InvalidSpec event is recorded"
    );

    // Reconciling the same invalid spec again writes nothing: no hot loop of status or events.
    server.clear_requests();
    reconcile_once(&client, &ctx, NS, "corp").await.unwrap();
    assert_eq!(server.mutating_requests(), vec![]);

    // A missing mailbox source is a spec problem too, named with the source.
    mps.patch(
        "corp",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"mailboxes": {"inline": [], "from": [{"configMap": {"name": "nope", "key": "users"}}]}, "backend": {"standbys": 1}}})),
    )
    .await
    .unwrap();
    reconcile_once(&client, &ctx, NS, "corp").await.unwrap();
    let mp: MailPod = server.get(NS, "corp").unwrap();
    let ready = condition(&mp, condition::READY);
    assert!(
        ready
            .message
            .contains("spec.mailboxes.from[0]: ConfigMap nope key users not found"),
        "{}",
        ready.message
    );
    assert_eq!(children_versions(&server, "corp"), before);
}

/// Site replication without a certificate would carry mail and the doveadm password across sites in clear:
/// refused, naming the field, and nothing running changes; with `tls` the LUNs' replication Services appear.
#[tokio::test]
async fn site_replication_without_tls_is_refused_and_touches_no_child() {
    let server = ApiServer::new();
    let client = server.client();
    let ctx = ctx(&server);
    fixtures::create_mailpod(&client, NS, "corp", "corp.example", 50).await;
    reconcile_to_fixed_point(&server, &ctx, NS, "corp", 5).await;
    let before = children_versions(&server, "corp");

    let mps: Api<MailPod> = Api::namespaced(client.clone(), NS);
    let site_replication = |tls: serde_json::Value| {
        let mut sr = json!({"sourceRanges": ["198.51.100.0/24"]});
        if !tls.is_null() {
            sr["tls"] = tls;
        }
        Patch::Merge(json!({"spec": {"backend": {"siteReplication": sr}}}))
    };
    mps.patch(
        "corp",
        &PatchParams::default(),
        &site_replication(serde_json::Value::Null),
    )
    .await
    .unwrap();
    server.clear_requests();
    let action = reconcile_once(&client, &ctx, NS, "corp").await.unwrap();
    assert_eq!(action, Action::await_change());
    let mp: MailPod = server.get(NS, "corp").unwrap();
    let ready = condition(&mp, condition::READY);
    assert_eq!(ready.reason, condition::REASON_INVALID_SPEC);
    assert!(
        ready
            .message
            .contains("spec.backend.siteReplication.tls: required"),
        "{}",
        ready.message
    );
    assert_eq!(
        children_versions(&server, "corp"),
        before,
        "a child changed"
    );
    assert!(
        server
            .mutating_requests()
            .iter()
            .all(|r| r.path.ends_with("/mailpods/corp/status") || r.path.contains("/events")),
        "only the status and an Event are written"
    );

    mps.patch(
        "corp",
        &PatchParams::default(),
        &site_replication(json!({"secretName": "corp-site-tls"})),
    )
    .await
    .unwrap();
    reconcile_to_fixed_point(&server, &ctx, NS, "corp", 5).await;
    let mp: MailPod = server.get(NS, "corp").unwrap();
    assert_ne!(
        condition(&mp, condition::READY).reason,
        condition::REASON_INVALID_SPEC
    );
    let lun: mailpod_operator::crd::StorageLUN = server.get(NS, "corp-lun-0").unwrap();
    assert_eq!(
        lun.spec
            .site_replication
            .and_then(|sr| sr.tls)
            .map(|t| t.secret_name)
            .as_deref(),
        Some("corp-site-tls"),
        "the LUN carries the certificate its stores mount"
    );
}

/// The store volumes' size and class are fixed once LUNs exist: a changed `lunTemplate` is refused by the
/// operator too (where the CRD's transition rule is missing, or in `render`), naming the field, and no
/// child changes.
#[tokio::test]
async fn a_changed_lun_capacity_or_class_is_refused_and_touches_no_child() {
    let server = ApiServer::new();
    let client = server.client();
    let ctx = ctx(&server);
    fixtures::create_mailpod(&client, NS, "corp", "corp.example", 50).await;
    reconcile_to_fixed_point(&server, &ctx, NS, "corp", 5).await;
    let before = children_versions(&server, "corp");
    let mps: Api<MailPod> = Api::namespaced(client.clone(), NS);
    for (change, field) in [
        (
            json!({"capacity": "999Gi"}),
            "spec.backend.lunTemplate.capacity",
        ),
        (
            json!({"storageClassName": "other"}),
            "spec.backend.lunTemplate.storageClassName",
        ),
    ] {
        let original: MailPod = server.get(NS, "corp").unwrap();
        mps.patch(
            "corp",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"backend": {"lunTemplate": change}}})),
        )
        .await
        .unwrap();
        reconcile_once(&client, &ctx, NS, "corp").await.unwrap();
        let mp: MailPod = server.get(NS, "corp").unwrap();
        let ready = condition(&mp, condition::READY);
        assert_eq!(ready.reason, condition::REASON_INVALID_SPEC);
        assert!(ready.message.contains(field), "{}", ready.message);
        assert_eq!(
            children_versions(&server, "corp"),
            before,
            "a child changed"
        );
        // Set back, it converges again with nothing changed.
        let template = serde_json::to_value(&original.spec.backend.lun_template).unwrap();
        mps.patch(
            "corp",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"backend": {"lunTemplate": {"capacity": template["capacity"], "storageClassName": template.get("storageClassName").cloned().unwrap_or(serde_json::Value::Null)}}}})),
        )
        .await
        .unwrap();
        reconcile_to_fixed_point(&server, &ctx, NS, "corp", 5).await;
        assert_eq!(children_versions(&server, "corp"), before);
    }
}

#[tokio::test]
async fn transient_errors_are_retried_and_converge_without_duplicates() {
    let server = ApiServer::new();
    let client = server.client();
    let ctx = ctx(&server);
    fixtures::create_mailpod(&client, NS, "corp", "corp.example", 1500).await;
    server.inject(Fault::new(
        Some(Method::PATCH),
        "/statefulsets/corp-submission",
        FaultKind::Status(500),
        2,
    ));
    server.inject(Fault::new(
        Some(Method::PATCH),
        "/storageluns/corp-lun-1",
        FaultKind::Status(409),
        1,
    ));
    server.inject(Fault::new(
        Some(Method::GET),
        "/services",
        FaultKind::Timeout,
        1,
    ));
    server.inject(Fault::new(
        Some(Method::PATCH),
        "/mailpods/corp/status",
        FaultKind::Status(503),
        1,
    ));

    let mut failures = 0;
    let mut delays = vec![];
    for _ in 0..20 {
        let mp = Arc::new(
            Api::<MailPod>::namespaced(client.clone(), NS)
                .get("corp")
                .await
                .unwrap(),
        );
        match mailpod::reconcile(mp.clone(), ctx.clone()).await {
            Ok(_) if server.pending_faults() == 0 => break,
            Ok(_) => {}
            Err(e) => {
                failures += 1;
                let action = mailpod::error_policy(mp, &e, ctx.clone());
                delays.push(format!("{action:?}"));
            }
        }
    }
    assert_eq!(server.pending_faults(), 0);
    assert_eq!(failures, 5, "each injected fault fails one reconcile");
    assert!(
        delays.iter().all(|d| d.contains("requeue_after: Some")),
        "{delays:?}"
    );
    // Backoff grows while failures continue.
    assert_ne!(delays[0], delays[1]);
    reconcile_to_fixed_point(&server, &ctx, NS, "corp", 5).await;

    let luns = server.list::<StorageLUN>(Some(NS));
    assert_eq!(luns.len(), 2);
    let placed = placement(&server, "corp");
    assert_eq!(placed.len(), 1500, "every mailbox placed exactly once");
    assert_eq!(server.list::<StatefulSet>(Some(NS)).len(), 3);
    let mp: MailPod = server.get(NS, "corp").unwrap();
    assert_eq!(mp.status.unwrap().mailboxes, 1500);
    // Creates went through apply: no POST of children, so no duplicate can have been made.
    assert!(server.requests().iter().all(|r| r.method != Method::POST
        || r.path.contains("/events")
        || r.path.ends_with("/configmaps")
        || r.path.ends_with("/mailpods")));
}

#[tokio::test]
async fn scaling_a_service_to_zero_removes_only_its_own_children() {
    let server = ApiServer::new();
    let client = server.client();
    let ctx = ctx(&server);
    fixtures::create_mailpod(&client, NS, "corp", "corp.example", 20).await;
    fixtures::create_mailpod(&client, NS, "other", "other.example", 20).await;
    reconcile_to_fixed_point(&server, &ctx, NS, "corp", 5).await;
    reconcile_to_fixed_point(&server, &ctx, NS, "other", 5).await;

    // An object that carries corp's label but that another MailPod owns must survive.
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
    let other_mp: MailPod = server.get(NS, "other").unwrap();
    let mut decoy = fixtures::mailbox_configmap(NS, "corp-imap-notes", "k", "v".into());
    decoy.metadata.labels = Some(BTreeMap::from([(
        labels::MAILPOD.to_string(),
        "corp".to_string(),
    )]));
    decoy.metadata.owner_references = Some(vec![mailpod_operator::resources::owner_reference(
        &other_mp,
    )]);
    cms.create(&PostParams::default(), &decoy).await.unwrap();

    let other_before = children_versions(&server, "other");
    let mps: Api<MailPod> = Api::namespaced(client.clone(), NS);
    mps.patch(
        "corp",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"frontend": {"imap": {"replicas": 0}}}})),
    )
    .await
    .unwrap();
    reconcile_to_fixed_point(&server, &ctx, NS, "corp", 5).await;

    let corp = children_versions(&server, "corp");
    let imap: Vec<_> = corp
        .keys()
        .filter(|(_, n)| n.starts_with("corp-imap"))
        .collect();
    assert_eq!(
        imap,
        vec![&("ConfigMap".to_string(), "corp-imap-notes".to_string())],
        "{corp:?}"
    );
    assert!(corp.contains_key(&("StatefulSet".to_string(), "corp-mx".to_string())));
    assert_eq!(
        children_versions(&server, "other"),
        other_before,
        "another MailPod's children changed"
    );
    let deletes: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|r| r.method == Method::DELETE)
        .collect();
    assert!(!deletes.is_empty());
    assert!(
        deletes.iter().all(|r| r.path.contains("/corp-imap")),
        "{deletes:?}"
    );
    let mp: MailPod = server.get(NS, "corp").unwrap();
    assert!(mp.status.unwrap().services.iter().all(|s| s.name != "imap"));
}

#[tokio::test]
async fn placement_is_stable_as_mailboxes_come_and_go() {
    let server = ApiServer::new();
    let client = server.client();
    let ctx = ctx(&server);
    fixtures::create_mailpod(&client, NS, "corp", "corp.example", 3500).await;
    reconcile_to_fixed_point(&server, &ctx, NS, "corp", 5).await;
    let first = placement(&server, "corp");
    assert_eq!(first.len(), 3500);

    // Remove 300 from the first LUN and 100 from the last, add 900 new ones.
    let keep: Vec<String> = fixtures::mailbox_lines("corp.example", 0, 3500)
        .lines()
        .enumerate()
        .filter(|(i, _)| !(*i < 300 || (3400..3500).contains(i)))
        .map(|(_, l)| format!("{l}\n"))
        .collect();
    let text = keep.concat() + &fixtures::mailbox_lines("corp.example", 10_000, 900);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
    cms.patch(
        "corp-users",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"users": text}})),
    )
    .await
    .unwrap();
    reconcile_to_fixed_point(&server, &ctx, NS, "corp", 5).await;
    let second = placement(&server, "corp");
    assert_eq!(second.len(), 3500 - 400 + 900);
    for (m, lun) in &second {
        if let Some(old) = first.get(m) {
            assert_eq!(old, lun, "{m} moved");
        }
    }
    let sizes: BTreeMap<u32, usize> = second.values().fold(BTreeMap::new(), |mut acc, l| {
        *acc.entry(*l).or_default() += 1;
        acc
    });
    // The freed slots are filled before any new LUN: 300 on LUN 0, 100 + 500 on LUN 3.
    assert_eq!(
        sizes,
        BTreeMap::from([(0, 1000), (1, 1000), (2, 1000), (3, 1000)])
    );

    // Emptying the last LUN: first emptied, then deleted; nobody else moves.
    let text: String = fixtures::mailbox_lines("corp.example", 0, 3500)
        .lines()
        .skip(300)
        .take(2700)
        .map(|l| format!("{l}\n"))
        .collect();
    cms.patch(
        "corp-users",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"users": text}})),
    )
    .await
    .unwrap();
    // 1300 of 4000 is a large share: held, nothing changed, until confirmed with that count.
    let before = children_versions(&server, "corp");
    reconcile_to_fixed_point(&server, &ctx, NS, "corp", 5).await;
    assert_eq!(children_versions(&server, "corp"), before);
    let mp: MailPod = server.get(NS, "corp").unwrap();
    let ready = condition(&mp, condition::READY);
    assert_eq!(ready.reason, "MailboxRemovalUnconfirmed");
    assert!(
        ready.message.contains("1300 of 4000") && ready.message.contains("=1300"),
        "{}",
        ready.message
    );
    let mps: Api<MailPod> = Api::namespaced(client.clone(), NS);
    mps.patch(
        "corp",
        &PatchParams::default(),
        &Patch::Merge(
            json!({"metadata": {"annotations": {"mailpod.io/confirm-mailbox-removal": "1300"}}}),
        ),
    )
    .await
    .unwrap();
    reconcile_to_fixed_point(&server, &ctx, NS, "corp", 5).await;
    let third = placement(&server, "corp");
    assert_eq!(third.len(), 2700);
    for (m, lun) in &third {
        assert_eq!(second.get(m), Some(lun), "{m} moved");
    }
    // The emptied LUN held mail: kept, and said so, until its deletion is confirmed.
    let luns = |server: &ApiServer| -> Vec<String> {
        server
            .list::<StorageLUN>(Some(NS))
            .iter()
            .map(|l| l.name_any())
            .collect()
    };
    assert_eq!(
        luns(&server),
        vec!["corp-lun-0", "corp-lun-1", "corp-lun-2", "corp-lun-3"]
    );
    let lun3: StorageLUN = server.get(NS, "corp-lun-3").unwrap();
    assert!(lun3.spec.mailboxes.is_empty());
    let mp: MailPod = server.get(NS, "corp").unwrap();
    let awaiting = condition(&mp, "AwaitingConfirmation");
    assert!(
        awaiting.message.contains("corp-lun-3"),
        "{}",
        awaiting.message
    );
    Api::<StorageLUN>::namespaced(client.clone(), NS)
        .patch(
            "corp-lun-3",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"annotations": {"mailpod.io/confirm-deletion": "true"}}}),
            ),
        )
        .await
        .unwrap();
    reconcile_to_fixed_point(&server, &ctx, NS, "corp", 5).await;
    assert_eq!(
        luns(&server),
        vec!["corp-lun-0", "corp-lun-1", "corp-lun-2"]
    );
    let mp: MailPod = server.get(NS, "corp").unwrap();
    assert!(!mp
        .status
        .as_ref()
        .unwrap()
        .conditions
        .iter()
        .any(|c| c.type_ == "AwaitingConfirmation"));
    assert_eq!(mp.status.unwrap().lun_count, 3);
}

/// A removed mailbox's Maildir stays on its LUN: when the address comes back it returns to that LUN, not
/// to the lowest LUN that happens to have room, but as a new incarnation with a home of its own (the
/// address may belong to somebody else now); once placed again the LUN forgets the removal and keeps the
/// incarnation, which counts on at each return.
#[tokio::test]
async fn a_removed_and_re_added_mailbox_returns_to_its_lun_with_a_new_home() {
    let server = ApiServer::new();
    let client = server.client();
    let ctx = ctx(&server);
    fixtures::create_mailpod(&client, NS, "corp", "corp.example", 2500).await;
    reconcile_to_fixed_point(&server, &ctx, NS, "corp", 5).await;
    let moved = "user001500@corp.example";
    assert_eq!(placement(&server, "corp")[moved], 1);
    let users = |skip: &[usize]| -> String {
        fixtures::mailbox_lines("corp.example", 0, 2500)
            .lines()
            .enumerate()
            .filter(|(i, _)| !skip.contains(i))
            .map(|(_, l)| format!("{l}\n"))
            .collect()
    };
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
    let set_users = |text: String| {
        let cms = cms.clone();
        async move {
            cms.patch(
                "corp-users",
                &PatchParams::default(),
                &Patch::Merge(json!({"data": {"users": text}})),
            )
            .await
            .unwrap();
        }
    };
    // Removed from LUN 1; then one from LUN 0 frees a slot lower down.
    set_users(users(&[1500])).await;
    reconcile_to_fixed_point(&server, &ctx, NS, "corp", 5).await;
    set_users(users(&[1500, 10])).await;
    reconcile_to_fixed_point(&server, &ctx, NS, "corp", 5).await;
    let lun1: StorageLUN = server.get(NS, "corp-lun-1").unwrap();
    assert_eq!(
        lun1.annotations()
            .get("mailpod.io/removed-mailboxes")
            .map(String::as_str),
        Some(r#"["user001500@corp.example"]"#),
        "the LUN remembers whose mail it still holds"
    );
    // It comes back.
    set_users(users(&[10])).await;
    reconcile_to_fixed_point(&server, &ctx, NS, "corp", 5).await;
    let now = placement(&server, "corp");
    assert_eq!(now[moved], 1, "back on the LUN that holds its Maildir");
    assert!(!now.contains_key("user000010@corp.example"));
    let lun1: StorageLUN = server.get(NS, "corp-lun-1").unwrap();
    assert!(!lun1
        .annotations()
        .contains_key("mailpod.io/removed-mailboxes"));
    let lun0: StorageLUN = server.get(NS, "corp-lun-0").unwrap();
    assert!(lun0.annotations()["mailpod.io/removed-mailboxes"].contains("user000010@corp.example"));

    // Its incarnation: recorded on the LUN, and in the tables the stores render their userdb from.
    let incarnation = |server: &ApiServer| {
        let lun1: StorageLUN = server.get(NS, "corp-lun-1").unwrap();
        let tables: ConfigMap = server.get(NS, "corp-access-tables").unwrap();
        let tables = mailpod_operator::mailconfig::tables::AccessTables::from_data(
            tables.data.as_ref().unwrap(),
        )
        .unwrap();
        (
            lun1.annotations()
                .get("mailpod.io/mailbox-incarnations")
                .cloned(),
            tables.incarnations,
        )
    };
    let (annotation, tables) = incarnation(&server);
    assert_eq!(
        annotation.as_deref(),
        Some(r#"{"user001500@corp.example":1}"#)
    );
    assert_eq!(tables, BTreeMap::from([(moved.to_string(), 1)]));
    // Removed: the LUN remembers the incarnation it had; back again: the next one.
    set_users(users(&[10, 1500])).await;
    reconcile_to_fixed_point(&server, &ctx, NS, "corp", 5).await;
    let (annotation, tables) = incarnation(&server);
    assert_eq!(
        annotation.as_deref(),
        Some(r#"{"user001500@corp.example":1}"#)
    );
    assert!(tables.is_empty());
    set_users(users(&[10])).await;
    reconcile_to_fixed_point(&server, &ctx, NS, "corp", 5).await;
    let (annotation, tables) = incarnation(&server);
    assert_eq!(
        annotation.as_deref(),
        Some(r#"{"user001500@corp.example":2}"#)
    );
    assert_eq!(tables, BTreeMap::from([(moved.to_string(), 2)]));
    // A quiet pass writes nothing.
    server.clear_requests();
    reconcile_to_fixed_point(&server, &ctx, NS, "corp", 5).await;
    assert_eq!(
        incarnation(&server).1,
        BTreeMap::from([(moved.to_string(), 2)])
    );

    // An unreadable record refuses the MailPod, naming it, and changes nothing.
    let luns: Api<StorageLUN> = Api::namespaced(client.clone(), NS);
    luns.patch(
        "corp-lun-1",
        &PatchParams::default(),
        &Patch::Merge(
            json!({"metadata": {"annotations": {"mailpod.io/mailbox-incarnations": "two"}}}),
        ),
    )
    .await
    .unwrap();
    let before = children_versions(&server, "corp");
    reconcile_to_fixed_point(&server, &ctx, NS, "corp", 5).await;
    let mp: MailPod = server.get(NS, "corp").unwrap();
    let ready = condition(&mp, condition::READY);
    assert_eq!(ready.status, "False");
    assert!(
        ready.message.contains(
            "StorageLUN corp-lun-1 metadata.annotations[mailpod.io/mailbox-incarnations]"
        ),
        "{}",
        ready.message
    );
    assert_eq!(children_versions(&server, "corp"), before);
}

/// An emptied mailbox list (a blank ConfigMap key) would drain every LUN: it is held with a clear
/// condition and nothing changes, instead of within seconds losing every mailbox.
#[tokio::test]
async fn an_emptied_mailbox_source_changes_nothing_until_confirmed() {
    let server = ApiServer::new();
    let client = server.client();
    let ctx = ctx(&server);
    fixtures::create_mailpod(&client, NS, "corp", "corp.example", 1500).await;
    reconcile_to_fixed_point(&server, &ctx, NS, "corp", 5).await;
    let before = children_versions(&server, "corp");
    Api::<ConfigMap>::namespaced(client.clone(), NS)
        .patch(
            "corp-users",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"users": ""}})),
        )
        .await
        .unwrap();
    server.clear_requests();
    reconcile_to_fixed_point(&server, &ctx, NS, "corp", 5).await;
    assert_eq!(children_versions(&server, "corp"), before);
    let writes: Vec<_> = server
        .mutating_requests()
        .into_iter()
        .filter(|r| !r.path.contains("/events") && !r.path.ends_with("/status"))
        .collect();
    assert_eq!(writes, vec![], "no child touched");
    assert_eq!(placement(&server, "corp").len(), 1500);
    let mp: MailPod = server.get(NS, "corp").unwrap();
    let ready = condition(&mp, condition::READY);
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "MailboxRemovalUnconfirmed")
    );
    assert!(ready.message.contains("1500 of 1500"), "{}", ready.message);
}

#[tokio::test]
async fn deleting_the_mailpod_removes_its_children() {
    let server = ApiServer::new();
    let client = server.client();
    let ctx = ctx(&server);
    fixtures::create_mailpod(&client, NS, "corp", "corp.example", 10).await;
    fixtures::create_mailpod(&client, NS, "other", "other.example", 10).await;
    reconcile_to_fixed_point(&server, &ctx, NS, "corp", 5).await;
    reconcile_to_fixed_point(&server, &ctx, NS, "other", 5).await;
    assert!(!children_versions(&server, "corp").is_empty());
    let other = children_versions(&server, "other");

    Api::<MailPod>::namespaced(client.clone(), NS)
        .delete("corp", &DeleteParams::default())
        .await
        .unwrap();
    assert_eq!(children_versions(&server, "corp"), BTreeMap::new());
    assert_eq!(children_versions(&server, "other"), other);
    // The mailbox list is the user's, not the MailPod's: it stays.
    assert!(server.get::<ConfigMap>(NS, "corp-users").is_some());
}

#[tokio::test]
async fn the_controller_runs_against_the_in_memory_api_and_follows_mailbox_sources() {
    let server = ApiServer::new();
    let client = server.client();
    // Without CRDs there is nothing to serve: in memory every kind exists, so this checks the happy path.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let config = RunConfig {
        namespace: Some(NS.into()),
        ..RunConfig::default()
    };
    let ctx = Arc::new(Context::new(client.clone(), config));
    let run = tokio::spawn(mailpod_operator::controller::run_mailpods(
        ctx.clone(),
        async {
            let _ = stopped.await;
        },
    ));
    fixtures::create_mailpod(&client, NS, "corp", "corp.example", 1200).await;

    let status_mailboxes = |n: i32| {
        let server = server.clone();
        async move {
            for _ in 0..200 {
                if let Some(mp) = server.get::<MailPod>(NS, "corp") {
                    if mp.status.as_ref().is_some_and(|s| s.mailboxes == n) {
                        return mp;
                    }
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            panic!("status.mailboxes never became {n}");
        }
    };
    status_mailboxes(1200).await;
    assert_eq!(server.list::<StorageLUN>(Some(NS)).len(), 2);

    // A change to the referenced ConfigMap alone reconciles the MailPod.
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
    let text = fixtures::mailbox_lines("corp.example", 0, 1200)
        + &fixtures::mailbox_lines("corp.example", 5000, 900);
    cms.patch(
        "corp-users",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"users": text}})),
    )
    .await
    .unwrap();
    status_mailboxes(2100).await;
    assert_eq!(server.list::<StorageLUN>(Some(NS)).len(), 3);

    // Pods coming up (StatefulSet status) reach the MailPod through the owned-children watch.
    mark_ready(&client, NS, "corp").await;
    let mut ready = false;
    for _ in 0..200 {
        let mp: MailPod = server.get(NS, "corp").unwrap();
        if mp.status.as_ref().is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == condition::READY && c.status == "True")
        }) {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(ready, "MailPod never became Ready");

    // Quiet once converged: no writes while nothing changes.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let writes = server.mutating_requests().len();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(server.mutating_requests().len(), writes);

    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(ctx.stats.reconciles() >= 3);
    assert_eq!(names::lun("corp", 2), "corp-lun-2");
}

/// What a real API server stores is not what was applied (`readOnly: false` dropped, `1000m` read back as
/// `1`, defaults added): the controller must still see its children as up to date, write nothing in a
/// steady state, record no Event, and report Ready.
#[tokio::test]
async fn a_steady_state_is_quiet_and_ready_when_the_server_normalises_children() {
    let server = ApiServer::new();
    server.normalise_like_kube_apiserver();
    let client = server.client();
    let ctx = ctx(&server);
    let mut mp = fixtures::create_mailpod(&client, NS, "corp", "corp.example", 10).await;
    mp.spec.frontend.mx.resources = Some(
        serde_json::from_value(json!({"requests": {"cpu": "1000m", "memory": "1024Mi"}})).unwrap(),
    );
    Api::<MailPod>::namespaced(client.clone(), NS)
        .replace("corp", &PostParams::default(), &mp)
        .await
        .unwrap();
    reconcile_to_fixed_point(&server, &ctx, NS, "corp", 5).await;
    let sts: StatefulSet = server.get(NS, "corp-mx").unwrap();
    let container = &sts.spec.unwrap().template.spec.unwrap().containers[0];
    let requests = container
        .resources
        .as_ref()
        .unwrap()
        .requests
        .as_ref()
        .unwrap();
    assert_eq!(requests["cpu"].0, "1", "the server normalised the quantity");

    mark_ready(&client, NS, "corp").await;
    reconcile_to_fixed_point(&server, &ctx, NS, "corp", 3).await;
    server.clear_requests();
    for _ in 0..3 {
        reconcile_once(&client, &ctx, NS, "corp").await.unwrap();
    }
    assert_eq!(
        server.mutating_requests(),
        vec![],
        "a steady state writes nothing, not even an Event"
    );
    let mp: MailPod = server.get(NS, "corp").unwrap();
    let ready = condition(&mp, condition::READY);
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("True", "Serving"),
        "{ready:?}"
    );
}

/// A field the spec no longer asks for is removed from the child, not left behind because the live object
/// still has everything desired.
#[tokio::test]
async fn a_field_dropped_from_the_spec_is_removed_from_the_child() {
    let server = ApiServer::new();
    let client = server.client();
    let ctx = ctx(&server);
    let mut mp = fixtures::create_mailpod(&client, NS, "corp", "corp.example", 10).await;
    // The defaults plus a CPU limit: without it, the desired container is a subset of the live one.
    mp.spec.frontend.mx.resources = Some(
        serde_json::from_value(json!({"requests": {"cpu": "100m", "memory": "128Mi"},
                                      "limits": {"cpu": "2", "memory": "512Mi"}}))
        .unwrap(),
    );
    let api = Api::<MailPod>::namespaced(client.clone(), NS);
    api.replace("corp", &PostParams::default(), &mp)
        .await
        .unwrap();
    reconcile_to_fixed_point(&server, &ctx, NS, "corp", 5).await;
    let resources = |server: &ApiServer| {
        let sts: StatefulSet = server.get(NS, "corp-mx").unwrap();
        sts.spec.unwrap().template.spec.unwrap().containers[0]
            .resources
            .clone()
    };
    let cpu_limit = |server: &ApiServer| {
        resources(server)
            .and_then(|r| r.limits)
            .and_then(|l| l.get("cpu").cloned())
    };
    assert!(cpu_limit(&server).is_some());

    let mut mp: MailPod = server.get(NS, "corp").unwrap();
    mp.spec.frontend.mx.resources = None;
    api.replace("corp", &PostParams::default(), &mp)
        .await
        .unwrap();
    reconcile_to_fixed_point(&server, &ctx, NS, "corp", 5).await;
    assert_eq!(cpu_limit(&server), None, "{:?}", resources(&server));
}

/// Someone else changing a child's spec leaves its applied-hash as it was; the controller still notices
/// (the generation moved since it last applied or saw it) and puts the spec back. A fresh process trusts
/// the hash and writes nothing.
#[tokio::test]
async fn a_child_changed_by_someone_else_is_put_back() {
    let server = ApiServer::new();
    let client = server.client();
    let ctx = ctx(&server);
    fixtures::create_mailpod(&client, NS, "corp", "corp.example", 10).await;
    reconcile_to_fixed_point(&server, &ctx, NS, "corp", 5).await;
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), NS);
    sts.patch(
        "corp-mx",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 5}})),
    )
    .await
    .unwrap();
    reconcile_to_fixed_point(&server, &ctx, NS, "corp", 5).await;
    assert_eq!(
        sts.get("corp-mx").await.unwrap().spec.unwrap().replicas,
        Some(2)
    );

    let restarted = Arc::new(Context::new(server.client(), RunConfig::default()));
    server.clear_requests();
    reconcile_once(&client, &restarted, NS, "corp")
        .await
        .unwrap();
    reconcile_once(&client, &restarted, NS, "corp")
        .await
        .unwrap();
    assert_eq!(
        server.mutating_requests(),
        vec![],
        "a restart writes nothing"
    );
}
