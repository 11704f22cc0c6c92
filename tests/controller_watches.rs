//! What the controllers watch and read: only objects labelled for them, children from their caches, and
//! a mailbox source without its label still read (and reported), never ignored.

#![cfg(feature = "testkit")]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use http::Method;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, Patch, PatchParams, PostParams};
use mailpod_operator::controller::status::{REASON_SOURCE_NOT_LABELLED, SOURCES_WATCHED};
use mailpod_operator::controller::{lun, Context, RunConfig};
use mailpod_operator::crd::MailPod;
use mailpod_operator::names::labels;
use mailpod_operator::testkit::fixtures::{self, reconcile_to_fixed_point};
use mailpod_operator::testkit::{ApiServer, RequestRecord};
use serde_json::json;

const NS: &str = "mail";

fn label_selector(r: &RequestRecord) -> Option<String> {
    form_urlencoded_get(&r.query, "labelSelector")
}

fn form_urlencoded_get(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|p| {
        let (k, v) = p.split_once('=')?;
        (k == key).then(|| {
            v.replace("%3D", "=")
                .replace("%2F", "/")
                .replace("%2C", ",")
                .replace('+', " ")
        })
    })
}

/// Every watch of `plural` made so far, by label selector.
fn watch_selectors(server: &ApiServer, plural: &str) -> Vec<Option<String>> {
    server
        .requests()
        .iter()
        .filter(|r| r.is_watch() && r.path.ends_with(&format!("/{plural}")))
        .map(label_selector)
        .collect()
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..400 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{what} never happened");
}

fn condition(mp: &MailPod, type_: &str) -> Option<(String, String, String)> {
    mp.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

#[tokio::test]
async fn the_mailpod_controller_watches_only_labelled_objects_and_reads_children_from_its_caches() {
    let server = ApiServer::new();
    let client = server.client();
    // Neither may reach the operator: an unrelated Secret and ConfigMap (a Helm release, say).
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), NS);
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "sh.helm.release.v1.x.v1", "labels": {"owner": "helm"}}, "data": {"release": "eA=="}})).unwrap(),
        )
        .await
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let ctx = Arc::new(Context::new(
        client.clone(),
        RunConfig {
            namespace: Some(NS.into()),
            ..RunConfig::default()
        },
    ));
    let run = tokio::spawn(mailpod_operator::controller::run_mailpods(
        ctx.clone(),
        async {
            let _ = stopped.await;
        },
    ));
    fixtures::create_mailpod(&client, NS, "corp", "corp.example", 1200).await;
    let converged = |server: &ApiServer| {
        server
            .get::<MailPod>(NS, "corp")
            .is_some_and(|mp| mp.status.as_ref().is_some_and(|s| s.mailboxes == 1200))
    };
    eventually("convergence", || converged(&server)).await;

    let source = format!("{}=true", labels::MAILBOX_SOURCE);
    let children = format!("{}={}", labels::MANAGED_BY, labels::MANAGER);
    let expected: BTreeMap<&str, Vec<&str>> = BTreeMap::from([
        ("configmaps", vec![children.as_str(), source.as_str()]),
        ("secrets", vec![source.as_str()]),
        ("statefulsets", vec![children.as_str()]),
        ("services", vec![children.as_str()]),
        ("storageluns", vec![children.as_str()]),
    ]);
    for (plural, wanted) in &expected {
        let mut seen: Vec<String> = watch_selectors(&server, plural)
            .into_iter()
            .map(|s| {
                s.unwrap_or_else(|| panic!("a watch of every {plural}, with no label selector"))
            })
            .collect();
        seen.sort();
        seen.dedup();
        let mut wanted: Vec<String> = wanted.iter().map(|s| s.to_string()).collect();
        wanted.sort();
        assert_eq!(seen, wanted, "label selectors of the {plural} watches");
    }

    // A change to the labelled source reconciles at once.
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
    let text = fixtures::mailbox_lines("corp.example", 0, 1300);
    cms.patch(
        "corp-users",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"users": text}})),
    )
    .await
    .unwrap();
    eventually("the source change reconciled", || {
        server
            .get::<MailPod>(NS, "corp")
            .is_some_and(|mp| mp.status.as_ref().is_some_and(|s| s.mailboxes == 1300))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Steady state: reconciles that change nothing read the mailbox source and nothing else; the six
    // kinds of children come from the watches' caches.
    server.clear_requests();
    let before = ctx.stats.reconciles();
    let mps: Api<MailPod> = Api::namespaced(client.clone(), NS);
    for i in 0..3 {
        mps.patch(
            "corp",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"test/touch": i.to_string()}}})),
        )
        .await
        .unwrap();
        let want = before + i + 1;
        eventually("a reconcile after the touch", || {
            ctx.stats.reconciles() >= want
        })
        .await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let reconciles = ctx.stats.reconciles() - before;
    let log = server.requests();
    let reads: Vec<&RequestRecord> = log
        .iter()
        .filter(|r| r.method == Method::GET && !r.is_watch())
        .collect();
    let writes: Vec<&RequestRecord> = log
        .iter()
        .filter(|r| r.is_mutating() && !(r.path.ends_with("/mailpods/corp")))
        .collect();
    assert!(reconciles >= 3, "{reconciles} reconciles");
    assert!(
        reads.len() as u64 <= reconciles,
        "{} reads in {reconciles} steady-state reconciles: {reads:?}",
        reads.len()
    );
    assert!(
        reads
            .iter()
            .all(|r| r.path.ends_with("/configmaps/corp-users")),
        "{reads:?}"
    );
    assert!(writes.is_empty(), "{writes:?}");

    // A child deleted behind the controller's back is seen through the cache and recreated.
    cms.delete("corp-access-tables", &Default::default())
        .await
        .unwrap();
    eventually("the deleted child recreated", || {
        server.get::<ConfigMap>(NS, "corp-access-tables").is_some()
    })
    .await;

    stop.send(()).ok();
    run.await.unwrap().unwrap();
}

#[tokio::test]
async fn an_unlabelled_mailbox_source_is_still_read_and_reported() {
    let server = ApiServer::new();
    let client = server.client();
    let ctx = Arc::new(Context::new(server.client(), RunConfig::default()));
    let mut cm = fixtures::mailbox_configmap(
        NS,
        "corp-users",
        "users",
        fixtures::mailbox_lines("corp.example", 0, 40),
    );
    cm.metadata.labels = None;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
    cms.create(&PostParams::default(), &cm).await.unwrap();
    Api::<MailPod>::namespaced(client.clone(), NS)
        .create(
            &PostParams::default(),
            &fixtures::mailpod(NS, "corp", "corp.example"),
        )
        .await
        .unwrap();
    reconcile_to_fixed_point(&server, &ctx, NS, "corp", 5).await;

    let mp: MailPod = server.get(NS, "corp").unwrap();
    assert_eq!(
        mp.status.as_ref().unwrap().mailboxes,
        40,
        "served all the same"
    );
    let (status, reason, message) = condition(&mp, SOURCES_WATCHED).expect("condition");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", REASON_SOURCE_NOT_LABELLED)
    );
    assert!(
        message.contains("ConfigMap corp-users")
            && message.contains("mailpod.io/mailbox-source=true"),
        "{message}"
    );
    let warnings: Vec<Event> = server
        .list::<Event>(Some(NS))
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(REASON_SOURCE_NOT_LABELLED))
        .collect();
    assert_eq!(warnings.len(), 1, "one Event telling what to label");

    // Labelled, it is watched and the condition says so.
    cms.patch(
        "corp-users",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {labels::MAILBOX_SOURCE: "true"}}})),
    )
    .await
    .unwrap();
    reconcile_to_fixed_point(&server, &ctx, NS, "corp", 5).await;
    let mp: MailPod = server.get(NS, "corp").unwrap();
    let (status, _, _) = condition(&mp, SOURCES_WATCHED).expect("condition");
    assert_eq!(status, "True");
}

#[tokio::test]
async fn the_lun_controller_watches_its_own_children_and_the_pods_of_luns() {
    let server = ApiServer::new();
    let ctx = Arc::new(Context::new(server.client(), RunConfig::default()));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(lun::run(ctx, Some(NS.into()), async {
        let _ = stopped.await;
    }));
    let children = [
        "statefulsets",
        "services",
        "cronjobs",
        "serviceaccounts",
        "roles",
        "rolebindings",
    ];
    eventually("the watches", || {
        !watch_selectors(&server, "pods").is_empty()
            && children
                .iter()
                .all(|c| !watch_selectors(&server, c).is_empty())
    })
    .await;
    for s in watch_selectors(&server, "pods") {
        assert_eq!(
            s.as_deref(),
            Some(labels::LUN),
            "pods watched by the LUN label"
        );
    }
    for kind in children {
        for s in watch_selectors(&server, kind) {
            assert_eq!(
                s,
                Some(format!(
                    "{},{}={}",
                    labels::LUN,
                    labels::MANAGED_BY,
                    labels::MANAGER
                )),
                "only the operator's {kind} of a LUN"
            );
        }
    }
    stop.send(()).ok();
    run.await.unwrap();
}

#[tokio::test]
async fn without_secret_watching_no_secret_is_listed_or_watched_and_secret_sources_are_still_read()
{
    let server = ApiServer::new();
    let client = server.client();
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), NS);
    let text = fixtures::mailbox_lines("corp.example", 0, 30);
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "corp-passwd",
                "labels": {labels::MAILBOX_SOURCE: "true"}}, "stringData": {}, "data": {
                "passwd": k8s_openapi::ByteString(text.into_bytes())}}))
            .unwrap(),
        )
        .await
        .unwrap();
    let mut mp = fixtures::mailpod(NS, "corp", "corp.example");
    mp.spec.mailboxes.from =
        vec![
            serde_json::from_value(json!({"secret": {"name": "corp-passwd", "key": "passwd"}}))
                .unwrap(),
        ];
    Api::<MailPod>::namespaced(client.clone(), NS)
        .create(&PostParams::default(), &mp)
        .await
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let ctx = Arc::new(Context::new(
        client.clone(),
        RunConfig {
            namespace: Some(NS.into()),
            watch_secret_sources: false,
            ..RunConfig::default()
        },
    ));
    let run = tokio::spawn(mailpod_operator::controller::run_mailpods(
        ctx.clone(),
        async {
            let _ = stopped.await;
        },
    ));
    eventually("the Secret's mailboxes served", || {
        server
            .get::<MailPod>(NS, "corp")
            .is_some_and(|mp| mp.status.as_ref().is_some_and(|s| s.mailboxes == 30))
    })
    .await;
    let on_secrets: Vec<RequestRecord> = server
        .requests()
        .into_iter()
        .filter(|r| {
            r.method == Method::GET
                && r.path.contains("/secrets")
                && !r.path.ends_with("/secrets/corp-passwd")
        })
        .collect();
    assert!(on_secrets.is_empty(), "{on_secrets:?}");
    let mp: MailPod = server.get(NS, "corp").unwrap();
    let (status, _, message) = condition(&mp, SOURCES_WATCHED).expect("condition");
    assert_eq!(status, "False");
    assert!(
        message.contains("--watch-secret-sources=false"),
        "{message}"
    );
    stop.send(()).ok();
    run.await.unwrap().unwrap();
}
