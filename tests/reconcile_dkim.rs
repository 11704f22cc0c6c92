//! `spec.dkim` against the in-memory Kubernetes API: the key Secret is created once, only missing keys are
//! added, nothing is replaced, the records are in status, and an unusable key refuses the MailPod without
//! touching anything. (tests/e2e.rs proves signing and the records on the real cluster.)

#![cfg(feature = "testkit")]

use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::{Api, Patch, PatchParams};
use mailpod_operator::controller::dkim::txt_record;
use mailpod_operator::controller::{Context, RunConfig};
use mailpod_operator::crd::{condition, MailPod};
use mailpod_operator::testkit::fixtures::{self, reconcile_to_fixed_point};
use mailpod_operator::testkit::ApiServer;
use serde_json::json;

const NS: &str = "mail";

fn key(secret: &Secret, name: &str) -> Option<String> {
    secret
        .data
        .as_ref()?
        .get(name)
        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
}

#[tokio::test]
async fn keys_are_generated_once_added_for_new_domains_never_replaced_and_published_in_status() {
    let server = ApiServer::new();
    let client = server.client();
    let ctx = Arc::new(Context::new(server.client(), RunConfig::default()));
    fixtures::create_mailpod(&client, NS, "corp", "corp.example", 20).await;
    let mps: Api<MailPod> = Api::namespaced(client.clone(), NS);
    mps.patch(
        "corp",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"dkim": {}}})),
    )
    .await
    .unwrap();
    reconcile_to_fixed_point(&server, &ctx, NS, "corp", 5).await;

    let secret: Secret = server.get(NS, "corp-dkim").expect("the key Secret");
    assert!(
        secret.metadata.owner_references.is_none(),
        "the keys outlive the MailPod"
    );
    let first = key(&secret, "corp.example.mail.key").expect("corp.example's key");
    let mp: MailPod = server.get(NS, "corp").unwrap();
    let records = &mp.status.as_ref().unwrap().dkim;
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0].name, "mail._domainkey.corp.example");
    assert_eq!(records[0].txt, txt_record(&first).unwrap());
    let version = secret.metadata.resource_version.clone();

    // Another pass changes nothing.
    server.clear_requests();
    reconcile_to_fixed_point(&server, &ctx, NS, "corp", 3).await;
    let again: Secret = server.get(NS, "corp-dkim").unwrap();
    assert_eq!(again.metadata.resource_version, version);
    let writes: Vec<String> = server
        .mutating_requests()
        .iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert!(writes.is_empty(), "writes in a quiet pass: {writes:?}");

    // A new domain gets a key; the old one is kept as it was.
    mps.patch(
        "corp",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"domains": ["corp.example", "labs.example"]}})),
    )
    .await
    .unwrap();
    reconcile_to_fixed_point(&server, &ctx, NS, "corp", 5).await;
    let grown: Secret = server.get(NS, "corp-dkim").unwrap();
    assert_eq!(
        key(&grown, "corp.example.mail.key").as_deref(),
        Some(first.as_str())
    );
    let labs = key(&grown, "labs.example.mail.key").expect("labs.example's key");
    assert_ne!(labs, first);
    let mp: MailPod = server.get(NS, "corp").unwrap();
    let names: Vec<&str> = mp
        .status
        .as_ref()
        .unwrap()
        .dkim
        .iter()
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(
        names,
        [
            "mail._domainkey.corp.example",
            "mail._domainkey.labs.example"
        ]
    );

    // A key that is not one: the MailPod is refused naming it, and the Secret is left as it is.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    secrets
        .patch(
            "corp-dkim",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"data": {"labs.example.mail.key": ByteString(b"garbage".to_vec())}}),
            ),
        )
        .await
        .unwrap();
    reconcile_to_fixed_point(&server, &ctx, NS, "corp", 3).await;
    let mp: MailPod = server.get(NS, "corp").unwrap();
    let ready = mp
        .status
        .as_ref()
        .unwrap()
        .conditions
        .iter()
        .find(|c| c.type_ == condition::READY)
        .unwrap();
    assert_eq!(ready.reason, condition::REASON_INVALID_SPEC);
    assert!(
        ready.message.contains("spec.dkim.secretName")
            && ready.message.contains("labs.example.mail.key"),
        "{}",
        ready.message
    );
    let kept: Secret = server.get(NS, "corp-dkim").unwrap();
    assert_eq!(
        key(&kept, "labs.example.mail.key").as_deref(),
        Some("garbage")
    );
    assert_eq!(
        key(&kept, "corp.example.mail.key").as_deref(),
        Some(first.as_str())
    );
}
