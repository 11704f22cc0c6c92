//! A StorageLUN's children follow its spec both ways: turning snapshots off removes the snapshot CronJob
//! and the ServiceAccount, Role and RoleBinding it ran with; removing site replication removes the doveadm
//! Service the other site reached. The store StatefulSet and its Services stay, and so does what the LUN
//! does not own.

mod lun_common;

use std::collections::BTreeSet;
use std::sync::Arc;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, DynamicObject, PostParams};
use kube::ResourceExt;
use lun_common::*;
use mailpod_operator::controller::lun::{self, lun_child_kinds};
use mailpod_operator::controller::{Context, RunConfig};
use mailpod_operator::crd::StorageLUN;
use mailpod_operator::testkit::ApiServer;
use serde_json::json;

const LUN: &str = "corp-lun-0";

async fn reconcile(server: &ApiServer, ctx: &Arc<Context>) {
    let api = Api::<StorageLUN>::namespaced(server.client(), NS);
    let l = api.get(LUN).await.unwrap();
    lun::reconcile(Arc::new(l), ctx.clone()).await.unwrap();
}

/// `Kind/name` of every object of the kinds a LUN owns, owned or not.
async fn children(server: &ApiServer) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for ar in lun_child_kinds() {
        let api: Api<DynamicObject> = Api::namespaced_with(server.client(), NS, &ar);
        for o in api.list(&Default::default()).await.unwrap().items {
            out.insert(format!("{}/{}", ar.kind, o.name_any()));
        }
    }
    out
}

#[tokio::test]
async fn children_no_longer_wanted_are_removed_and_the_store_stays() {
    let server = ApiServer::new();
    let mut l = lun(LUN, &["a@corp.example"], 10);
    l.spec.site_replication =
        Some(serde_json::from_value(json!({"sourceRanges": ["192.0.2.0/24"]})).unwrap());
    create_lun(&server, &l).await;
    // Labelled like the LUN's children but not owned by it: never touched.
    let foreign: Service = serde_json::from_value(json!({
        "metadata": {"name": "corp-lun-0-foreign", "namespace": NS,
                     "labels": {"mailpod.io/lun": LUN}},
        "spec": {"ports": [{"port": 1}]}
    }))
    .unwrap();
    Api::<Service>::namespaced(server.client(), NS)
        .create(&PostParams::default(), &foreign)
        .await
        .unwrap();
    let ctx = Arc::new(Context::new(server.client(), RunConfig::default()));
    create_pod(&server, LUN, 0, true, None).await;
    create_pod(&server, LUN, 1, true, None).await;
    reconcile(&server, &ctx).await;
    let before = children(&server).await;
    let snapshot_children: Vec<&String> = before
        .iter()
        .filter(|c| {
            c.starts_with("CronJob/")
                || c.starts_with("Role/")
                || c.starts_with("RoleBinding/")
                || c.starts_with("ServiceAccount/")
        })
        .collect();
    assert_eq!(
        snapshot_children.len(),
        4,
        "snapshots on: a CronJob and its ServiceAccount, Role and RoleBinding; got {before:?}"
    );
    let replication = format!("Service/{LUN}-replication");
    assert!(before.contains(&replication), "{before:?}");
    let statefulset = format!("StatefulSet/{LUN}");
    assert!(before.contains(&statefulset), "{before:?}");

    patch_lun_spec(&server, LUN, json!({"snapshots": {"enabled": false}})).await;
    reconcile(&server, &ctx).await;
    let after_snapshots = children(&server).await;
    let gone: Vec<&String> = before.difference(&after_snapshots).collect();
    assert_eq!(
        gone, snapshot_children,
        "snapshots off removes exactly the snapshot CronJob and its RBAC"
    );

    patch_lun_spec(&server, LUN, json!({"siteReplication": null})).await;
    reconcile(&server, &ctx).await;
    let after = children(&server).await;
    let gone: Vec<&String> = after_snapshots.difference(&after).collect();
    assert_eq!(
        gone,
        vec![&replication],
        "site replication off removes its Service"
    );
    for kept in [
        statefulset,
        format!("Service/{LUN}"),
        format!("Service/{LUN}-hl"),
        "Service/corp-lun-0-foreign".to_string(),
    ] {
        assert!(after.contains(&kept), "{kept} stays: {after:?}");
    }
    let sts = Api::<StatefulSet>::namespaced(server.client(), NS)
        .get(LUN)
        .await
        .unwrap();
    assert!(sts.metadata.deletion_timestamp.is_none());

    // A quiet pass after the removals deletes nothing more.
    reconcile(&server, &ctx).await;
    assert_eq!(children(&server).await, after);
}
