//! A StatefulSet whose claim templates change is replaced with its pods kept: a submission StatefulSet
//! rendered before submission had a queue volume gains one without its pods being deleted.
//!
//! The in-memory API does not refuse a changed `volumeClaimTemplates` as the real API server does (422,
//! the field is immutable), so what this proves is the replacement itself: the old StatefulSet is deleted
//! with its pods orphaned and a new one (a new UID) carries the template; that an update is refused is the
//! API server's documented behaviour.

#![cfg(feature = "testkit")]

use std::sync::Arc;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, PostParams};
use kube::ResourceExt;
use mailpod_operator::controller::{Context, RunConfig};
use mailpod_operator::testkit::fixtures::{self, reconcile_to_fixed_point};
use mailpod_operator::testkit::ApiServer;
use serde_json::json;

const NS: &str = "mail";

fn claim_names(sts: &StatefulSet) -> Vec<String> {
    sts.spec
        .as_ref()
        .and_then(|s| s.volume_claim_templates.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|c| c.metadata.name.clone())
        .collect()
}

#[tokio::test]
async fn submission_gains_its_queue_volume_with_its_pods_kept() {
    let server = ApiServer::new();
    let client = server.client();
    let ctx = Arc::new(Context::new(client.clone(), RunConfig::default()));
    fixtures::create_mailpod(&client, NS, "corp", "corp.example", 3).await;
    reconcile_to_fixed_point(&server, &ctx, NS, "corp", 10).await;
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), NS);
    let rendered = sts.get("corp-submission").await.unwrap();
    assert_eq!(claim_names(&rendered), ["queue"]);
    let mx_uid = sts.get("corp-mx").await.unwrap().uid();

    // The StatefulSet as an earlier version applied it: no queue claim, no queue mount; and one pod of it.
    let mut old = rendered.clone();
    old.metadata.uid = None;
    old.metadata.resource_version = None;
    old.metadata.creation_timestamp = None;
    old.metadata.managed_fields = None;
    old.metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(
            "mailpod.io/applied-hash".into(),
            "from-an-earlier-version".into(),
        );
    let spec = old.spec.as_mut().unwrap();
    spec.volume_claim_templates = None;
    spec.persistent_volume_claim_retention_policy = None;
    let container = &mut spec.template.spec.as_mut().unwrap().containers[0];
    container
        .volume_mounts
        .as_mut()
        .unwrap()
        .retain(|m| m.name != "queue");
    sts.delete("corp-submission", &DeleteParams::default())
        .await
        .unwrap();
    let old = sts.create(&PostParams::default(), &old).await.unwrap();
    let old_uid = old.uid().unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "corp-submission-0", "namespace": NS,
            "labels": rendered.spec.as_ref().unwrap().selector.match_labels.clone(),
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet",
                "name": "corp-submission", "uid": old_uid, "controller": true}]},
        "spec": {"containers": [{"name": "submission", "image": "mail:old"}]}
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();

    reconcile_to_fixed_point(&server, &ctx, NS, "corp", 10).await;

    let now = sts.get("corp-submission").await.unwrap();
    assert_eq!(claim_names(&now), ["queue"], "the queue claim template");
    assert_ne!(now.uid().unwrap(), old_uid, "replaced, not patched");
    assert!(
        now.spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
            .containers[0]
            .volume_mounts
            .iter()
            .flatten()
            .any(|m| m.name == "queue" && m.mount_path == "/var/spool/postfix"),
        "the queue is mounted"
    );
    assert!(
        pods.get_opt("corp-submission-0").await.unwrap().is_some(),
        "the running pod is kept for the new StatefulSet to adopt and roll"
    );
    // A StatefulSet whose claim templates did not change keeps its identity.
    assert_eq!(sts.get("corp-mx").await.unwrap().uid(), mx_uid);
}
