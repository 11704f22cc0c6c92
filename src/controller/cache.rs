//! The MailPod and StorageLUN controllers' caches of the children they own, fed by the same watches that
//! trigger their reconciles, so a steady-state reconcile reads its children from memory instead of
//! listing six kinds.
//!
//! Memory is bounded by keeping only what a reconcile reads: every child without `managedFields` or
//! `last-applied-configuration`; ConfigMaps, Services, NetworkPolicies and PodDisruptionBudgets as
//! metadata only (they are watched metadata-only, so their data never reaches the operator); StatefulSets
//! with `spec.replicas`, their claim templates and status, without the pod template; StorageLUNs whole. Each child is kept as its compact JSON,
//! decoded only when its owner is reconciled.
//!
//! The cache serves a reconcile only once every kind has completed its first list; until then, and in
//! tests that call the reconciler directly without one, children are listed from the API server. What a
//! reconcile applies or deletes is written into the cache at once, so the next reconcile does not act
//! again on a child whose watch event is still on its way.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use kube::api::{ApiResource, DynamicObject};
use kube::runtime::watcher;
use serde::Serialize;
use serde_json::Value;

use super::apply::LiveChildren;

/// Annotation kubectl's client-side apply leaves, a copy of the whole object: never needed here.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// What of a kind's objects the cache keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Keep {
    /// Metadata only.
    Metadata,
    /// Metadata, `spec.replicas`, `spec.volumeClaimTemplates` and status (StatefulSets: whether they
    /// rolled out and are ready, and which claim templates they were created with, which cannot change).
    ReplicasAndStatus,
    /// The whole object (StorageLUNs: the placement they record).
    All,
}

/// What the cache keeps of each kind a MailPod owns.
pub fn keep_of(kind: &str) -> Keep {
    match kind {
        "StorageLUN" => Keep::All,
        "StatefulSet" => Keep::ReplicasAndStatus,
        _ => Keep::Metadata,
    }
}

/// One cached child.
#[derive(Debug)]
struct Entry {
    uid: String,
    /// resourceVersion, so an older watch event never replaces what an apply returned.
    resource_version: Option<u64>,
    json: Box<[u8]>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Owner UID -> (kind, name) -> child.
    by_owner: HashMap<String, BTreeMap<(String, String), Entry>>,
    /// Kinds whose first list has completed.
    synced: BTreeSet<String>,
    /// Kind -> UIDs seen since its current (re)list began.
    relisting: HashMap<String, HashSet<String>>,
}

/// Children of every MailPod, by owner UID.
#[derive(Debug, Default)]
pub struct ChildCache {
    inner: RwLock<Inner>,
    /// Kinds that must be synced before the cache serves a reconcile.
    kinds: BTreeSet<String>,
}

/// `obj` as the cache keeps it: typed as `ar`, without what no reconcile reads.
pub fn stripped(mut obj: Value, ar: &ApiResource, keep: Keep) -> Value {
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("managedFields");
        if let Some(a) = meta.get_mut("annotations").and_then(Value::as_object_mut) {
            a.remove(LAST_APPLIED);
        }
    }
    if let Some(o) = obj.as_object_mut() {
        match keep {
            Keep::Metadata => o.retain(|k, _| k == "metadata"),
            Keep::ReplicasAndStatus => {
                o.retain(|k, _| k == "metadata" || k == "spec" || k == "status");
                if let Some(spec) = o.get_mut("spec").and_then(Value::as_object_mut) {
                    spec.retain(|k, _| k == "replicas" || k == "volumeClaimTemplates");
                }
            }
            Keep::All => {}
        }
        o.insert("apiVersion".into(), Value::String(ar.api_version.clone()));
        o.insert("kind".into(), Value::String(ar.kind.clone()));
    }
    obj
}

fn owner_uids(obj: &Value) -> Vec<String> {
    obj.pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .map(|refs| {
            refs.iter()
                .filter_map(|r| r.get("uid").and_then(Value::as_str).map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn text<'a>(obj: &'a Value, pointer: &str) -> Option<&'a str> {
    obj.pointer(pointer).and_then(Value::as_str)
}

impl ChildCache {
    /// A cache that serves reconciles once each of `kinds` has been listed.
    pub fn new(kinds: &[ApiResource]) -> Self {
        Self {
            inner: RwLock::default(),
            kinds: kinds.iter().map(|ar| ar.kind.clone()).collect(),
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether every kind has completed its first list.
    pub fn synced(&self) -> bool {
        let inner = self.read();
        self.kinds.iter().all(|k| inner.synced.contains(k))
    }

    /// Children cached under each owner.
    pub fn len(&self) -> usize {
        self.read().by_owner.values().map(BTreeMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Records a child as the API server returned it (an apply's answer or a watch event).
    pub fn insert(&self, obj: Value, ar: &ApiResource, keep: Keep) {
        let obj = stripped(obj, ar, keep);
        let (Some(uid), Some(name)) = (
            text(&obj, "/metadata/uid").map(str::to_string),
            text(&obj, "/metadata/name").map(str::to_string),
        ) else {
            return;
        };
        let resource_version = text(&obj, "/metadata/resourceVersion").and_then(|v| v.parse().ok());
        let owners = owner_uids(&obj);
        let json: Box<[u8]> = match serde_json::to_vec(&obj) {
            Ok(v) => v.into_boxed_slice(),
            Err(_) => return,
        };
        let mut inner = self.write();
        if let Some(seen) = inner.relisting.get_mut(&ar.kind) {
            seen.insert(uid.clone());
        }
        let key = (ar.kind.clone(), name);
        // A child whose owners changed is no longer under the old ones.
        for (owner, children) in inner.by_owner.iter_mut() {
            if !owners.contains(owner) && children.get(&key).is_some_and(|e| e.uid == uid) {
                children.remove(&key);
            }
        }
        for owner in owners {
            let children = inner.by_owner.entry(owner).or_default();
            let newer = match (children.get(&key), resource_version) {
                (Some(old), Some(new)) if old.uid == uid => {
                    old.resource_version.is_none_or(|o| new >= o)
                }
                _ => true,
            };
            if newer {
                children.insert(
                    key.clone(),
                    Entry {
                        uid: uid.clone(),
                        resource_version,
                        json: json.clone(),
                    },
                );
            }
        }
        inner.by_owner.retain(|_, c| !c.is_empty());
    }

    /// Forgets a child (deleted, or deleted by this controller).
    pub fn remove(&self, kind: &str, name: &str, uid: &str) {
        let key = (kind.to_string(), name.to_string());
        let mut inner = self.write();
        for children in inner.by_owner.values_mut() {
            if children.get(&key).is_some_and(|e| e.uid == uid) {
                children.remove(&key);
            }
        }
        inner.by_owner.retain(|_, c| !c.is_empty());
    }

    /// Follows one watch event of `ar`'s kind.
    pub fn observe<K: Serialize>(&self, event: &watcher::Event<K>, ar: &ApiResource, keep: Keep) {
        let json = |o: &K| serde_json::to_value(o).ok();
        match event {
            watcher::Event::Init => {
                self.write()
                    .relisting
                    .insert(ar.kind.clone(), HashSet::new());
            }
            watcher::Event::InitApply(o) | watcher::Event::Apply(o) => {
                if let Some(v) = json(o) {
                    self.insert(v, ar, keep);
                }
            }
            watcher::Event::Delete(o) => {
                if let Some(v) = json(o) {
                    if let (Some(name), Some(uid)) =
                        (text(&v, "/metadata/name"), text(&v, "/metadata/uid"))
                    {
                        self.remove(&ar.kind, name, uid);
                    }
                }
            }
            watcher::Event::InitDone => {
                let mut inner = self.write();
                let seen = inner.relisting.remove(&ar.kind).unwrap_or_default();
                // What the new list no longer holds was deleted while the watch was down.
                for children in inner.by_owner.values_mut() {
                    children.retain(|(kind, _), e| *kind != ar.kind || seen.contains(&e.uid));
                }
                inner.by_owner.retain(|_, c| !c.is_empty());
                inner.synced.insert(ar.kind.clone());
            }
        }
    }

    /// The cached children of `owner_uid` of the given kinds, as [`LiveChildren::list`] would list them.
    pub fn live(&self, owner_uid: &str, kinds: &[ApiResource]) -> LiveChildren {
        let wanted: BTreeSet<&str> = kinds.iter().map(|ar| ar.kind.as_str()).collect();
        let inner = self.read();
        let objects = inner
            .by_owner
            .get(owner_uid)
            .into_iter()
            .flatten()
            .filter(|((kind, _), _)| wanted.contains(kind.as_str()))
            .filter_map(|(key, e)| {
                serde_json::from_slice::<DynamicObject>(&e.json)
                    .ok()
                    .map(|o| (key.clone(), o))
            })
            .collect();
        LiveChildren { objects }
    }
}

/// Puts what a reconcile applied (`report`, children of `kinds`) into `cache`, so the next reconcile
/// does not act again on a child whose watch event is still on its way.
pub fn remember(
    cache: Option<&std::sync::Arc<ChildCache>>,
    report: &super::apply::ApplyReport,
    kinds: &[ApiResource],
) {
    let Some(cache) = cache else { return };
    for obj in &report.applied {
        let Some(types) = obj.types.as_ref() else {
            continue;
        };
        let Some(ar) = kinds
            .iter()
            .find(|ar| ar.kind == types.kind && ar.api_version == types.api_version)
        else {
            continue;
        };
        if let Ok(v) = serde_json::to_value(obj) {
            cache.insert(v, ar, keep_of(&ar.kind));
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::apps::v1::StatefulSet;
    use k8s_openapi::api::core::v1::ConfigMap;
    use serde_json::json;

    use super::*;

    fn cm(name: &str, uid: &str, rv: &str, owner: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": "mail", "uid": uid, "resourceVersion": rv,
                "ownerReferences": [{"apiVersion": "mailpod.io/v1alpha1", "kind": "MailPod", "name": "corp", "uid": owner}],
                "managedFields": [{"manager": "mailpod-operator", "fieldsV1": {"f:data": {}}}],
                "annotations": {"mailpod.io/applied-hash": "h1", LAST_APPLIED: "{...}"}},
            "data": {"main.cf": "x".repeat(1000)}})
    }

    #[test]
    fn keeps_only_what_a_reconcile_reads() {
        let ar = ApiResource::erase::<ConfigMap>(&());
        let cache = ChildCache::new(std::slice::from_ref(&ar));
        cache.insert(cm("corp-tables", "u1", "5", "mp"), &ar, Keep::Metadata);
        let live = cache.live("mp", std::slice::from_ref(&ar));
        let obj = live.get("ConfigMap", "corp-tables").expect("cached");
        assert!(obj.metadata.managed_fields.is_none());
        assert_eq!(
            obj.metadata
                .annotations
                .as_ref()
                .unwrap()
                .keys()
                .collect::<Vec<_>>(),
            vec!["mailpod.io/applied-hash"]
        );
        assert!(
            obj.data.get("data").is_none(),
            "a ConfigMap's data is not kept"
        );
        assert_eq!(obj.types.as_ref().unwrap().kind, "ConfigMap");

        let sts = ApiResource::erase::<StatefulSet>(&());
        let big = json!({"apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": {"name": "corp-mx", "uid": "u2", "ownerReferences": [{"uid": "mp"}]},
            "spec": {"replicas": 2, "template": {"spec": {"containers": [{"name": "mx"}]}},
                "volumeClaimTemplates": [{"metadata": {"name": "queue"}}]},
            "status": {"readyReplicas": 2}});
        let kept = stripped(big, &sts, Keep::ReplicasAndStatus);
        assert_eq!(
            kept["spec"],
            json!({"replicas": 2, "volumeClaimTemplates": [{"metadata": {"name": "queue"}}]})
        );
        assert_eq!(kept["status"], json!({"readyReplicas": 2}));
        let decoded: StatefulSet =
            serde_json::from_value(kept).expect("decodes without a template");
        assert_eq!(decoded.spec.unwrap().replicas, Some(2));
    }

    #[test]
    fn follows_watch_events_and_relists() {
        let ar = ApiResource::erase::<ConfigMap>(&());
        let cache = ChildCache::new(std::slice::from_ref(&ar));
        let event = |v: Value| serde_json::from_value::<ConfigMap>(v).unwrap();
        assert!(!cache.synced());
        cache.observe(&watcher::Event::<ConfigMap>::Init, &ar, Keep::Metadata);
        cache.observe(
            &watcher::Event::InitApply(event(cm("a", "ua", "1", "mp"))),
            &ar,
            Keep::Metadata,
        );
        cache.observe(
            &watcher::Event::InitApply(event(cm("b", "ub", "2", "mp"))),
            &ar,
            Keep::Metadata,
        );
        cache.observe(&watcher::Event::<ConfigMap>::InitDone, &ar, Keep::Metadata);
        assert!(cache.synced());
        assert_eq!(cache.len(), 2);
        // An apply's answer is newer than a late watch event for the same object.
        cache.insert(cm("a", "ua", "9", "mp"), &ar, Keep::Metadata);
        cache.observe(
            &watcher::Event::Apply(event(cm("a", "ua", "3", "mp"))),
            &ar,
            Keep::Metadata,
        );
        let live = cache.live("mp", std::slice::from_ref(&ar));
        assert_eq!(
            live.get("ConfigMap", "a")
                .unwrap()
                .metadata
                .resource_version
                .as_deref(),
            Some("9")
        );
        cache.observe(
            &watcher::Event::Delete(event(cm("a", "ua", "10", "mp"))),
            &ar,
            Keep::Metadata,
        );
        assert!(cache
            .live("mp", std::slice::from_ref(&ar))
            .get("ConfigMap", "a")
            .is_none());
        // A relist that no longer holds `b` (deleted while the watch was down) drops it.
        cache.observe(&watcher::Event::<ConfigMap>::Init, &ar, Keep::Metadata);
        cache.observe(
            &watcher::Event::InitApply(event(cm("c", "uc", "11", "other"))),
            &ar,
            Keep::Metadata,
        );
        cache.observe(&watcher::Event::<ConfigMap>::InitDone, &ar, Keep::Metadata);
        assert!(cache
            .live("mp", std::slice::from_ref(&ar))
            .objects
            .is_empty());
        assert_eq!(
            cache.live("other", std::slice::from_ref(&ar)).objects.len(),
            1
        );
    }
}
