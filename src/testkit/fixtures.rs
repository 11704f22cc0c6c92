//! Objects and steps the reconcile tests and the benchmark share.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::core::ObjectMeta;
use kube::runtime::controller::Action;
use kube::{Client, ResourceExt};
use serde_json::json;

use super::ApiServer;
use crate::controller::{mailpod, Context, Error};
use crate::crd::{KeyRef, MailPod, MailPodSpec, MailboxSource, StorageLUN};
use crate::names::labels;

/// `count` mailbox addresses `user{n}@{domain}` starting at `first`, one per line.
pub fn mailbox_lines(domain: &str, first: usize, count: usize) -> String {
    (first..first + count)
        .map(|i| format!("user{i:06}@{domain}\n"))
        .collect()
}

/// A ConfigMap holding a mailbox list under `key`, labelled as a mailbox source.
pub fn mailbox_configmap(ns: &str, name: &str, key: &str, text: String) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.into()),
            labels: Some(BTreeMap::from([(
                labels::MAILBOX_SOURCE.to_string(),
                "true".to_string(),
            )])),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(key.to_string(), text)])),
        ..Default::default()
    }
}

/// A MailPod hosting `example.com`-style `domain` with mx, submission and imap (2 replicas each), its
/// mailboxes listed in ConfigMap `{name}-users` key `users`.
pub fn mailpod(ns: &str, name: &str, domain: &str) -> MailPod {
    let spec: MailPodSpec = serde_json::from_value(json!({
        "domains": [domain],
        "tls": {"secretName": format!("{name}-tls")},
        // Outside, so that no mailbox list of a test has to keep a postmaster.
        "postmaster": "noc@operations.example",
    }))
    .expect("fixture spec");
    let mut mp = MailPod::new(name, spec);
    mp.metadata.namespace = Some(ns.into());
    mp.spec.mailboxes.from = vec![MailboxSource {
        config_map: Some(KeyRef {
            name: format!("{name}-users"),
            key: "users".into(),
        }),
        secret: None,
    }];
    mp
}

/// Creates a MailPod and its mailbox ConfigMap with `mailboxes` addresses.
pub async fn create_mailpod(
    client: &Client,
    ns: &str,
    name: &str,
    domain: &str,
    mailboxes: usize,
) -> MailPod {
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    cms.create(
        &PostParams::default(),
        &mailbox_configmap(
            ns,
            &format!("{name}-users"),
            "users",
            mailbox_lines(domain, 0, mailboxes),
        ),
    )
    .await
    .expect("create mailbox ConfigMap");
    let mps: Api<MailPod> = Api::namespaced(client.clone(), ns);
    mps.create(&PostParams::default(), &mailpod(ns, name, domain))
        .await
        .expect("create MailPod")
}

/// One reconcile of the MailPod as stored now.
pub async fn reconcile_once(
    client: &Client,
    ctx: &Arc<Context>,
    ns: &str,
    name: &str,
) -> Result<Action, Error> {
    let mp = Api::<MailPod>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .expect("MailPod exists");
    mailpod::reconcile(Arc::new(mp), ctx.clone()).await
}

/// Reconciles until a pass makes no mutating request; returns the number of passes that did.
/// Panics after `max` passes or on an error.
pub async fn reconcile_to_fixed_point(
    server: &ApiServer,
    ctx: &Arc<Context>,
    ns: &str,
    name: &str,
    max: usize,
) -> usize {
    let client = server.client();
    for pass in 0..max {
        let before = server.mutating_requests().len();
        reconcile_once(&client, ctx, ns, name)
            .await
            .expect("reconcile succeeds");
        if server.mutating_requests().len() == before {
            return pass;
        }
    }
    panic!("{ns}/{name} did not reach a fixed point in {max} passes");
}

/// Plays the StatefulSet controller and the StorageLUN controller: every StatefulSet and LUN of `mailpod`
/// reports all replicas ready and rolled out.
pub async fn mark_ready(client: &Client, ns: &str, mailpod: &str) {
    let lp = ListParams::default().labels(&format!("{}={mailpod}", labels::MAILPOD));
    let pp = PatchParams::apply("kube-controller-manager").force();
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), ns);
    for s in sts.list(&lp).await.expect("list StatefulSets") {
        let replicas = s.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
        let status = json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "status": {
            "replicas": replicas, "readyReplicas": replicas, "updatedReplicas": replicas,
            "availableReplicas": replicas, "observedGeneration": s.metadata.generation,
            "currentRevision": "r1", "updateRevision": "r1"}});
        sts.patch_status(&s.name_any(), &pp, &Patch::Apply(status))
            .await
            .expect("StatefulSet status");
    }
    let luns: Api<StorageLUN> = Api::namespaced(client.clone(), ns);
    let pp = PatchParams::apply("mailpod-operator-lun").force();
    for l in luns.list(&lp).await.expect("list StorageLUNs") {
        let status = json!({"apiVersion": "mailpod.io/v1alpha1", "kind": "StorageLUN", "status": {
            "users": l.spec.mailboxes.len(),
            "conditions": [{"type": "Ready", "status": "True", "reason": "Serving", "message": "",
                            "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": l.metadata.generation}]}});
        luns.patch_status(&l.name_any(), &pp, &Patch::Apply(status))
            .await
            .expect("StorageLUN status");
    }
}
