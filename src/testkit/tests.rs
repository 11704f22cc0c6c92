use std::collections::BTreeMap;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::core::ObjectMeta;
use serde_json::json;

use super::*;

fn cm(name: &str, data: &[(&str, &str)]) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(BTreeMap::from([("app".to_string(), name.to_string())])),
            ..Default::default()
        },
        data: Some(
            data.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ),
        ..Default::default()
    }
}

fn apply() -> PatchParams {
    PatchParams::apply("test").force()
}

#[tokio::test]
async fn create_get_list_with_selectors_and_pages() {
    let server = ApiServer::new();
    let api: Api<ConfigMap> = Api::namespaced(server.client(), "ns");
    for i in 0..5 {
        api.create(&PostParams::default(), &cm(&format!("c{i}"), &[("k", "v")]))
            .await
            .unwrap();
    }
    let err = api
        .create(&PostParams::default(), &cm("c0", &[]))
        .await
        .unwrap_err();
    assert!(matches!(err, kube::Error::Api(ref s) if s.code == 409 && s.reason == "AlreadyExists"));
    let got = api.get("c3").await.unwrap();
    assert_eq!(got.metadata.namespace.as_deref(), Some("ns"));
    assert!(got.metadata.uid.is_some() && got.metadata.resource_version.is_some());
    let err = api.get("nope").await.unwrap_err();
    assert!(matches!(err, kube::Error::Api(ref s) if s.code == 404));

    let all = api.list(&ListParams::default()).await.unwrap();
    assert_eq!(all.items.len(), 5);
    let one = api
        .list(&ListParams::default().labels("app=c2"))
        .await
        .unwrap();
    assert_eq!(one.items.len(), 1);
    let page = api.list(&ListParams::default().limit(2)).await.unwrap();
    assert_eq!(page.items.len(), 2);
    let rest = api
        .list(
            &ListParams::default()
                .limit(10)
                .continue_token(page.metadata.continue_.as_deref().unwrap()),
        )
        .await
        .unwrap();
    assert_eq!(rest.items.len(), 3);
    let other: Api<ConfigMap> = Api::namespaced(server.client(), "other");
    assert!(other
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .is_empty());
    let everywhere: Api<ConfigMap> = Api::all(server.client());
    assert_eq!(
        everywhere
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len(),
        5
    );
}

#[tokio::test]
async fn server_side_apply_is_a_no_op_when_nothing_changes() {
    let server = ApiServer::new();
    let api: Api<ConfigMap> = Api::namespaced(server.client(), "ns");
    let first = api
        .patch(
            "c",
            &apply(),
            &Patch::Apply(cm("c", &[("a", "1"), ("b", "2")])),
        )
        .await
        .unwrap();
    let rv = first.metadata.resource_version.clone();
    let again = api
        .patch(
            "c",
            &apply(),
            &Patch::Apply(cm("c", &[("a", "1"), ("b", "2")])),
        )
        .await
        .unwrap();
    assert_eq!(
        again.metadata.resource_version, rv,
        "unchanged apply must not bump resourceVersion"
    );
    assert!(!server.requests().last().unwrap().changed);

    // Dropping a field this manager applied removes it; a field another manager applied stays.
    let other = PatchParams::apply("someone-else");
    let mut extra = cm("c", &[("x", "9")]);
    extra.metadata.labels = None;
    api.patch("c", &other, &Patch::Apply(extra)).await.unwrap();
    let after = api
        .patch("c", &apply(), &Patch::Apply(cm("c", &[("a", "1")])))
        .await
        .unwrap();
    let data = after.data.unwrap();
    assert_eq!(data.get("a").map(String::as_str), Some("1"));
    assert_eq!(data.get("b"), None);
    assert_eq!(data.get("x").map(String::as_str), Some("9"));
    assert_ne!(after.metadata.resource_version, rv);

    // Without force, changing a field another manager owns is a conflict.
    let err = api
        .patch(
            "c",
            &PatchParams::apply("test"),
            &Patch::Apply(cm("c", &[("a", "1"), ("x", "0")])),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 409),
        "{err:?}"
    );
}

#[tokio::test]
async fn status_subresource_and_generation() {
    let server = ApiServer::new();
    let api: Api<StatefulSet> = Api::namespaced(server.client(), "ns");
    let sts = json!({
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": "s"},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"a": "b"}}, "serviceName": "s",
                 "template": {"metadata": {"labels": {"a": "b"}}}},
        "status": {"replicas": 99}
    });
    let created = api.patch("s", &apply(), &Patch::Apply(&sts)).await.unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    assert!(
        created.status.is_none(),
        "status is not written through the main resource"
    );

    let st = json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "status": {"replicas": 2, "readyReplicas": 1}});
    let with_status = api
        .patch_status("s", &apply(), &Patch::Apply(&st))
        .await
        .unwrap();
    assert_eq!(with_status.status.as_ref().unwrap().ready_replicas, Some(1));
    assert_eq!(
        with_status.metadata.generation,
        Some(1),
        "status changes do not bump generation"
    );

    let scaled = api
        .patch(
            "s",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 3}})),
        )
        .await
        .unwrap();
    assert_eq!(scaled.metadata.generation, Some(2));
    assert_eq!(
        scaled.status.unwrap().ready_replicas,
        Some(1),
        "spec writes keep status"
    );

    let jp: json_patch::Patch =
        serde_json::from_value(json!([{"op": "replace", "path": "/spec/replicas", "value": 1}]))
            .unwrap();
    let patched = api
        .patch("s", &PatchParams::default(), &Patch::<()>::Json(jp))
        .await
        .unwrap();
    assert_eq!(patched.spec.as_ref().unwrap().replicas, Some(1));

    let mut stale = patched.clone();
    stale.metadata.resource_version = Some("1".into());
    let err = api
        .replace("s", &PostParams::default(), &stale)
        .await
        .unwrap_err();
    assert!(matches!(err, kube::Error::Api(ref s) if s.code == 409));
}

#[tokio::test]
async fn delete_cascades_to_dependents_unless_orphaned() {
    let server = ApiServer::new();
    let api: Api<ConfigMap> = Api::namespaced(server.client(), "ns");
    let owner = api
        .create(&PostParams::default(), &cm("owner", &[]))
        .await
        .unwrap();
    let oref = OwnerReference {
        api_version: "v1".into(),
        kind: "ConfigMap".into(),
        name: "owner".into(),
        uid: owner.metadata.uid.clone().unwrap(),
        controller: Some(true),
        ..Default::default()
    };
    for name in ["child", "grandchild-owner"] {
        let mut c = cm(name, &[]);
        c.metadata.owner_references = Some(vec![oref.clone()]);
        api.create(&PostParams::default(), &c).await.unwrap();
    }
    let child_uid = api
        .get("grandchild-owner")
        .await
        .unwrap()
        .metadata
        .uid
        .unwrap();
    let mut gc = cm("grandchild", &[]);
    gc.metadata.owner_references = Some(vec![OwnerReference {
        uid: child_uid.clone(),
        name: "grandchild-owner".into(),
        ..oref.clone()
    }]);
    api.create(&PostParams::default(), &gc).await.unwrap();
    api.create(&PostParams::default(), &cm("bystander", &[]))
        .await
        .unwrap();

    // A precondition on another UID refuses the delete.
    let wrong = DeleteParams {
        preconditions: Some(kube::api::Preconditions {
            uid: Some("not-it".into()),
            resource_version: None,
        }),
        ..Default::default()
    };
    assert!(api.delete("owner", &wrong).await.is_err());

    api.delete("owner", &DeleteParams::default()).await.unwrap();
    let left: Vec<String> = server
        .list::<ConfigMap>(Some("ns"))
        .into_iter()
        .filter_map(|c| c.metadata.name)
        .collect();
    assert_eq!(left, vec!["bystander"]);

    let mut orphan = cm("orphan", &[]);
    let b = api.get("bystander").await.unwrap();
    orphan.metadata.owner_references = Some(vec![OwnerReference {
        uid: b.metadata.uid.unwrap(),
        name: "bystander".into(),
        ..oref
    }]);
    api.create(&PostParams::default(), &orphan).await.unwrap();
    api.delete("bystander", &DeleteParams::orphan())
        .await
        .unwrap();
    assert!(api.get("orphan").await.is_ok());
}

#[tokio::test]
async fn finalizers_hold_deletion() {
    let server = ApiServer::new();
    let api: Api<ConfigMap> = Api::namespaced(server.client(), "ns");
    let mut c = cm("f", &[]);
    c.metadata.finalizers = Some(vec!["mailpod.io/test".into()]);
    api.create(&PostParams::default(), &c).await.unwrap();
    api.delete("f", &DeleteParams::default()).await.unwrap();
    let held = api.get("f").await.unwrap();
    assert!(held.metadata.deletion_timestamp.is_some());
    api.patch(
        "f",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    assert!(api.get("f").await.is_err());
}

#[tokio::test]
async fn watch_streams_changes_from_a_resource_version() {
    let server = ApiServer::new();
    let api: Api<ConfigMap> = Api::namespaced(server.client(), "ns");
    api.create(&PostParams::default(), &cm("before", &[]))
        .await
        .unwrap();
    let rv = api
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    api.create(&PostParams::default(), &cm("a", &[]))
        .await
        .unwrap();
    let mut events = api
        .watch(&WatchParams::default().labels("app=a"), &rv)
        .await
        .unwrap()
        .boxed();
    api.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"k": "v"}})),
    )
    .await
    .unwrap();
    api.create(&PostParams::default(), &cm("b", &[]))
        .await
        .unwrap();
    api.delete("a", &DeleteParams::default()).await.unwrap();
    let mut seen = vec![];
    for _ in 0..3 {
        match events.try_next().await.unwrap().unwrap() {
            WatchEvent::Added(c) => seen.push(format!("added {}", c.metadata.name.unwrap())),
            WatchEvent::Modified(c) => seen.push(format!("modified {}", c.metadata.name.unwrap())),
            WatchEvent::Deleted(c) => seen.push(format!("deleted {}", c.metadata.name.unwrap())),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seen, vec!["added a", "modified a", "deleted a"]);
}

#[tokio::test]
async fn watch_from_an_expired_version_is_gone() {
    let server = ApiServer::with_history(2);
    let api: Api<ConfigMap> = Api::namespaced(server.client(), "ns");
    for i in 0..5 {
        api.create(&PostParams::default(), &cm(&format!("c{i}"), &[]))
            .await
            .unwrap();
    }
    let mut events = api
        .watch(&WatchParams::default(), "1")
        .await
        .unwrap()
        .boxed();
    match events.try_next().await.unwrap().unwrap() {
        WatchEvent::Error(e) => assert_eq!(e.code, 410),
        other => panic!("expected 410, got {other:?}"),
    }
}

#[tokio::test]
async fn a_merge_patch_with_a_resource_version_is_a_precondition() {
    let server = ApiServer::new();
    let api: Api<ConfigMap> = Api::namespaced(server.client(), "ns");
    let created = api
        .create(&PostParams::default(), &cm("c", &[("k", "1")]))
        .await
        .unwrap();
    let rv = created.metadata.resource_version.clone().unwrap();
    api.patch(
        "c",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"resourceVersion": rv}, "data": {"k": "2"}})),
    )
    .await
    .unwrap();
    let err = api
        .patch(
            "c",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"resourceVersion": rv}, "data": {"k": "3"}})),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 409),
        "{err}"
    );
    assert_eq!(api.get("c").await.unwrap().data.unwrap()["k"], "2");
}

#[tokio::test]
async fn injected_faults_fail_matching_requests_then_stop() {
    let server = ApiServer::new();
    let api: Api<ConfigMap> = Api::namespaced(server.client(), "ns");
    server.inject(Fault::new(
        Some(Method::PATCH),
        "/configmaps/",
        FaultKind::Status(500),
        1,
    ));
    server.inject(Fault::new(Some(Method::GET), "", FaultKind::Timeout, 1));
    let err = api
        .patch("c", &apply(), &Patch::Apply(cm("c", &[])))
        .await
        .unwrap_err();
    assert!(matches!(err, kube::Error::Api(ref s) if s.code == 500));
    assert!(api.get("c").await.is_err());
    assert_eq!(server.pending_faults(), 0);
    api.patch("c", &apply(), &Patch::Apply(cm("c", &[])))
        .await
        .unwrap();
    assert!(api.get("c").await.is_ok());
    let log = server.requests();
    assert_eq!(log.len(), 4);
    assert_eq!(server.mutating_requests().len(), 2);
    assert_eq!(log[1].status, 0);
}

#[tokio::test]
async fn a_runtime_watcher_sees_every_object() {
    use kube::runtime::{watcher, WatchStreamExt};
    let server = ApiServer::new();
    let api: Api<ConfigMap> = Api::namespaced(server.client(), "ns");
    for i in 0..3 {
        api.create(&PostParams::default(), &cm(&format!("c{i}"), &[]))
            .await
            .unwrap();
    }
    let mut stream = watcher(api.clone(), watcher::Config::default())
        .applied_objects()
        .boxed();
    let mut names = vec![];
    for _ in 0..3 {
        names.push(
            stream
                .try_next()
                .await
                .unwrap()
                .unwrap()
                .metadata
                .name
                .unwrap(),
        );
    }
    api.create(&PostParams::default(), &cm("late", &[]))
        .await
        .unwrap();
    names.push(
        stream
            .try_next()
            .await
            .unwrap()
            .unwrap()
            .metadata
            .name
            .unwrap(),
    );
    assert_eq!(names, vec!["c0", "c1", "c2", "late"]);
}

#[test]
fn routes() {
    let r = Route::parse("/apis/apps/v1/namespaces/ns/statefulsets/web/status").unwrap();
    assert_eq!(r.resource, "apps/v1/statefulsets");
    assert_eq!(r.namespace.as_deref(), Some("ns"));
    assert_eq!(r.name.as_deref(), Some("web"));
    assert_eq!(r.subresource.as_deref(), Some("status"));
    let r = Route::parse("/api/v1/configmaps").unwrap();
    assert_eq!(
        (r.resource.as_str(), r.namespace, r.name),
        ("v1/configmaps", None, None)
    );
    let r =
        Route::parse("/apis/apiextensions.k8s.io/v1/customresourcedefinitions/mailpods.mailpod.io")
            .unwrap();
    assert_eq!(r.name.as_deref(), Some("mailpods.mailpod.io"));
    assert!(Route::parse("/version").is_none());
}

#[tokio::test]
async fn label_index_follows_relabels_and_deletes() {
    let server = ApiServer::new();
    let api: Api<ConfigMap> = Api::namespaced(server.client(), "ns");
    let count = |sel: &'static str| {
        let api = api.clone();
        async move {
            api.list(&ListParams::default().labels(sel))
                .await
                .unwrap()
                .items
                .len()
        }
    };
    api.create(&PostParams::default(), &cm("a", &[]))
        .await
        .unwrap();
    assert_eq!(count("app=a").await, 1);
    api.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"app": "b"}}})),
    )
    .await
    .unwrap();
    assert_eq!(count("app=a").await, 0);
    assert_eq!(count("app=b").await, 1);
    assert_eq!(count("app=b,app!=b").await, 0);
    api.delete("a", &DeleteParams::default()).await.unwrap();
    assert_eq!(count("app=b").await, 0);
}
