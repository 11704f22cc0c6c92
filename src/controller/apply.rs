//! Server-Side Apply of desired children, skipping those whose last applied body is the one desired, and
//! removal of orphans. Shared by the controllers: children are found by label and kept only when owned by
//! the reconciled object's UID, so one compartment never touches another's objects.
//!
//! Whether a child needs applying is decided from what was sent, never from what the API server returns:
//! every applied body carries [`APPLIED_HASH`], a hash of its canonical JSON, and a child is applied only
//! when it is missing or that annotation differs from the hash of the body now desired. What the server
//! does to the stored object (`omitempty`, canonical quantities, defaults, list merges, other managers'
//! fields) cannot make a steady state write, and a field dropped from the desired body changes the hash,
//! so the apply that removes it is sent.
//!
//! A change someone else makes to a child's spec leaves the annotation as it was; [`Seen`] catches it:
//! it keeps the generation (or, for kinds without one, the resourceVersion) of each child as this
//! process last applied or found it, and a child whose generation moved since is applied again. After a
//! restart the first pass only records, so a restart never writes.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, Preconditions,
};
use kube::{Client, Resource};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::error::{Error, Result};
use crate::crd::StorageLUN;
use crate::names::FIELD_MANAGER;
use crate::resources::Child;

/// Annotation on every applied object: the hash of the body last applied ([`applied_hash`]).
pub const APPLIED_HASH: &str = "mailpod.io/applied-hash";

/// The hash of an apply body: SHA-256 of its canonical JSON (keys sorted at every level, no whitespace),
/// 32 hex digits. The body's own [`APPLIED_HASH`] annotation, if any, is left out.
pub fn applied_hash(body: &Value) -> String {
    let mut body = body.clone();
    if let Some(annotations) = body
        .pointer_mut("/metadata/annotations")
        .and_then(Value::as_object_mut)
    {
        annotations.remove(APPLIED_HASH);
        if annotations.is_empty() {
            body["metadata"]
                .as_object_mut()
                .map(|m| m.remove("annotations"));
        }
    }
    let mut text = String::new();
    canonical_json(&body, &mut text);
    hex::encode(&Sha256::digest(text.as_bytes())[..16])
}

/// JSON with object keys sorted, whatever order the map keeps them in.
fn canonical_json(v: &Value, out: &mut String) {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                canonical_json(&m[k], out);
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, e) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical_json(e, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// `body` with its [`APPLIED_HASH`] annotation set, and the hash.
pub fn with_applied_hash(mut body: Value) -> (Value, String) {
    let hash = applied_hash(&body);
    if let Some(meta) = body.get_mut("metadata").and_then(Value::as_object_mut) {
        let annotations = meta
            .entry("annotations")
            .or_insert_with(|| Value::Object(Default::default()));
        if let Some(a) = annotations.as_object_mut() {
            a.insert(APPLIED_HASH.to_string(), Value::String(hash.clone()));
        }
    }
    (body, hash)
}

/// Whether the live object (as JSON) was last applied with the body whose hash is `hash`.
pub fn applied_with(live: &Value, hash: &str) -> bool {
    live.pointer("/metadata/annotations")
        .and_then(|a| a.get(APPLIED_HASH))
        .and_then(Value::as_str)
        == Some(hash)
}

/// Per owner UID, per child UID: the child's generation (`g:N`) or resourceVersion (`rv:N`) as this
/// process last applied or found it up to date.
#[derive(Debug, Default)]
pub struct Seen(std::sync::Mutex<std::collections::HashMap<String, BTreeMap<String, String>>>);

impl Seen {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, BTreeMap<String, String>>>
    {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forgets an owner (it is gone).
    pub fn forget(&self, owner_uid: &str) {
        self.lock().remove(owner_uid);
    }
}

/// What [`Seen`] remembers of an object: its generation, or its resourceVersion for kinds without one
/// (their only writers are the owner and people).
fn marker(meta: &kube::api::ObjectMeta) -> Option<String> {
    match (meta.generation, &meta.resource_version) {
        (Some(g), _) => Some(format!("g:{g}")),
        (None, Some(rv)) => Some(format!("rv:{rv}")),
        (None, None) => None,
    }
}

/// The kinds a MailPod owns directly, with the API resource to reach them.
pub fn mailpod_child_kinds() -> Vec<ApiResource> {
    vec![
        ApiResource::erase::<ConfigMap>(&()),
        ApiResource::erase::<NetworkPolicy>(&()),
        ApiResource::erase::<Service>(&()),
        ApiResource::erase::<PodDisruptionBudget>(&()),
        ApiResource::erase::<StorageLUN>(&()),
        ApiResource::erase::<StatefulSet>(&()),
    ]
}

/// Live children of one owner: objects of the given kinds carrying the owner's label and its UID as owner.
#[derive(Debug, Default)]
pub struct LiveChildren {
    /// (kind, name) -> object.
    pub objects: BTreeMap<(String, String), DynamicObject>,
}

impl LiveChildren {
    /// Lists each kind in `namespace` by `label_selector` and keeps what `owner_uid` owns.
    pub async fn list(
        client: &Client,
        namespace: &str,
        kinds: &[ApiResource],
        label_selector: &str,
        owner_uid: &str,
    ) -> Result<Self> {
        let mut objects = BTreeMap::new();
        let lp = ListParams::default().labels(label_selector);
        for ar in kinds {
            let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, ar);
            let list = api.list(&lp).await.map_err(|source| Error::Read {
                what: format!("{} labelled {label_selector}", ar.plural),
                source,
            })?;
            for mut obj in list.items {
                let owned = obj
                    .metadata
                    .owner_references
                    .as_deref()
                    .unwrap_or_default()
                    .iter()
                    .any(|r| r.uid == owner_uid);
                if owned {
                    // List items may come without their type; the kind is known from the request.
                    obj.types = Some(kube::api::TypeMeta {
                        api_version: ar.api_version.clone(),
                        kind: ar.kind.clone(),
                    });
                    let name = obj.metadata.name.clone().unwrap_or_default();
                    objects.insert((ar.kind.clone(), name), obj);
                }
            }
        }
        Ok(Self { objects })
    }

    pub fn get(&self, kind: &str, name: &str) -> Option<&DynamicObject> {
        self.objects.get(&(kind.to_string(), name.to_string()))
    }

    /// Live objects of one kind, decoded.
    pub fn typed<K: Resource<DynamicType = ()> + serde::de::DeserializeOwned>(
        &self,
    ) -> Result<Vec<K>> {
        let kind = K::kind(&());
        self.objects
            .iter()
            .filter(|((k, _), _)| *k == kind)
            .map(|((_, name), o)| {
                serde_json::to_value(o)
                    .and_then(serde_json::from_value)
                    .map_err(|source| Error::Decode {
                        what: format!("{kind} {name}"),
                        source,
                    })
            })
            .collect()
    }
}

/// Live children that `desired` no longer names, as `(kind, name, object)`.
pub fn orphans<'a>(
    live: &'a LiveChildren,
    desired: &[Child],
) -> Vec<(&'a str, &'a str, &'a DynamicObject)> {
    let wanted: std::collections::BTreeSet<(&str, String)> =
        desired.iter().map(|c| (c.kind(), c.name())).collect();
    live.objects
        .iter()
        .filter(|((kind, name), _)| !wanted.contains(&(kind.as_str(), name.clone())))
        .map(|((kind, name), obj)| (kind.as_str(), name.as_str(), obj))
        .collect()
}

/// What one apply pass did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ApplyReport {
    /// `Kind/name` of children created.
    pub created: Vec<String>,
    /// `Kind/name` of children changed.
    pub updated: Vec<String>,
    /// Children already as desired (no request made).
    pub unchanged: usize,
    /// The applied children as the API server returned them, for a cache of children to hold at once.
    pub applied: Vec<DynamicObject>,
}

impl ApplyReport {
    pub fn changed(&self) -> bool {
        !self.created.is_empty() || !self.updated.is_empty()
    }
}

/// The JSON applied for a child. Fields another actor owns are left out so the apply never takes them:
/// a StorageLUN's `spec.fenced` belongs to site failover (or an administrator), not to its MailPod.
pub fn apply_body(child: &Child) -> Value {
    let mut body = child.to_json();
    strip_nulls(&mut body);
    if let Child::StorageLUN(lun) = child {
        if !lun.spec.fenced {
            if let Some(spec) = body.get_mut("spec").and_then(Value::as_object_mut) {
                spec.remove("fenced");
            }
        }
    }
    if let Some(o) = body.as_object_mut() {
        o.remove("status");
    }
    body
}

/// Applies `children` of the owner `owner_uid` in order with one field manager; a child whose live object
/// was last applied with the body desired now, and that nobody changed since (`seen`), gets no request at
/// all, so a steady-state reconcile writes nothing.
pub async fn apply_children(
    client: &Client,
    namespace: &str,
    children: &[Child],
    live: &LiveChildren,
    seen: &Seen,
    owner_uid: &str,
) -> Result<ApplyReport> {
    let mut report = ApplyReport::default();
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    // Children gone since the last pass are forgotten.
    let live_uids: BTreeSet<&str> = live
        .objects
        .values()
        .filter_map(|o| o.metadata.uid.as_deref())
        .collect();
    seen.lock()
        .entry(owner_uid.to_string())
        .or_default()
        .retain(|uid, _| live_uids.contains(uid.as_str()));
    for child in children {
        let (body, hash) = with_applied_hash(apply_body(child));
        let kind = child.kind();
        let name = child.name();
        let mut current = live.get(kind, &name);
        if let Some(c) = current.filter(|c| claim_templates_differ(c, &body)) {
            replace_statefulset(client, namespace, c).await?;
            current = None;
        }
        let up_to_date = current.is_some_and(|c| {
            c.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(APPLIED_HASH))
                == Some(&hash)
        });
        let changed_by_others = current.is_some_and(|c| {
            let (Some(uid), Some(now)) = (c.metadata.uid.as_deref(), marker(&c.metadata)) else {
                return false;
            };
            let mut seen = seen.lock();
            let last = seen.entry(owner_uid.to_string()).or_default();
            match last.get(uid) {
                Some(before) => *before != now,
                None => {
                    last.insert(uid.to_string(), now);
                    false
                }
            }
        });
        if up_to_date && !changed_by_others {
            report.unchanged += 1;
            continue;
        }
        let ar = api_resource_of(child);
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &ar);
        let applied = api
            .patch(&name, &pp, &Patch::Apply(&body))
            .await
            .map_err(|source| Error::Apply {
                kind,
                name: name.clone(),
                source,
            })?;
        if let (Some(uid), Some(m)) = (applied.metadata.uid.clone(), marker(&applied.metadata)) {
            seen.lock()
                .entry(owner_uid.to_string())
                .or_default()
                .insert(uid, m);
        }
        report.applied.push(applied);
        let label = format!("{kind}/{name}");
        if current.is_some() {
            report.updated.push(label);
        } else {
            report.created.push(label);
        }
    }
    Ok(report)
}

/// Names of a StatefulSet's `spec.volumeClaimTemplates` (empty for any other object).
fn claim_template_names(obj: &Value) -> Vec<&str> {
    obj.pointer("/spec/volumeClaimTemplates")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|t| t.pointer("/metadata/name").and_then(Value::as_str))
        .collect()
}

/// Whether the live StatefulSet `live` has other claim templates (by name) than `desired`. The API server
/// refuses any change of `volumeClaimTemplates` (422), so such a StatefulSet is replaced, not patched.
fn claim_templates_differ(live: &DynamicObject, desired: &Value) -> bool {
    if desired["kind"] != "StatefulSet" {
        return false;
    }
    let live = serde_json::to_value(live).unwrap_or_default();
    claim_template_names(&live) != claim_template_names(desired)
}

/// Deletes the StatefulSet `obj` with its pods orphaned, so it can be created anew with other claim
/// templates (a submission StatefulSet gaining its queue volume): the pods keep serving, the new StatefulSet
/// adopts them (same name and selector) and rolls them onto its template one at a time. While the old one
/// is still being deleted the create fails and the reconcile is retried.
async fn replace_statefulset(client: &Client, namespace: &str, obj: &DynamicObject) -> Result<()> {
    let name = obj.metadata.name.clone().unwrap_or_default();
    tracing::info!(statefulset = %name, "claim templates changed: replacing the StatefulSet, its pods kept");
    let api: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        namespace,
        &ApiResource::erase::<StatefulSet>(&()),
    );
    let dp = DeleteParams {
        preconditions: Some(Preconditions {
            uid: obj.metadata.uid.clone(),
            resource_version: None,
        }),
        ..DeleteParams::orphan()
    };
    match api.delete(&name, &dp).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(source) => Err(Error::Delete {
            kind: "StatefulSet".into(),
            name,
            source,
        }),
    }
}

/// Deletes one child, only if it is still the object with `uid` (a recreated namesake is left alone).
/// Returns whether it was deleted by this call.
pub async fn delete_child(client: &Client, namespace: &str, obj: &DynamicObject) -> Result<bool> {
    let types = obj.types.clone().unwrap_or_default();
    let (group, version) = match types.api_version.split_once('/') {
        Some((g, v)) => (g.to_string(), v.to_string()),
        None => (String::new(), types.api_version.clone()),
    };
    let ar = mailpod_child_kinds()
        .into_iter()
        .find(|ar| ar.kind == types.kind && ar.group == group && ar.version == version)
        .unwrap_or_else(|| {
            ApiResource::from_gvk(&kube::api::GroupVersionKind::gvk(
                &group,
                &version,
                &types.kind,
            ))
        });
    let name = obj.metadata.name.clone().unwrap_or_default();
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &ar);
    let dp = DeleteParams {
        preconditions: Some(Preconditions {
            uid: obj.metadata.uid.clone(),
            resource_version: None,
        }),
        ..DeleteParams::background()
    };
    match api.delete(&name, &dp).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
        // The UID precondition failed: someone recreated the object; it is not our orphan.
        Err(kube::Error::Api(s)) if s.code == 409 && s.message.contains("Precondition") => {
            Ok(false)
        }
        Err(source) => Err(Error::Delete {
            kind: types.kind,
            name,
            source,
        }),
    }
}

fn api_resource_of(child: &Child) -> ApiResource {
    match child {
        Child::ConfigMap(_) => ApiResource::erase::<ConfigMap>(&()),
        Child::ServiceAccount(_) => {
            ApiResource::erase::<k8s_openapi::api::core::v1::ServiceAccount>(&())
        }
        Child::Role(_) => ApiResource::erase::<k8s_openapi::api::rbac::v1::Role>(&()),
        Child::RoleBinding(_) => ApiResource::erase::<k8s_openapi::api::rbac::v1::RoleBinding>(&()),
        Child::NetworkPolicy(_) => ApiResource::erase::<NetworkPolicy>(&()),
        Child::Service(_) => ApiResource::erase::<Service>(&()),
        Child::PodDisruptionBudget(_) => ApiResource::erase::<PodDisruptionBudget>(&()),
        Child::StorageLUN(_) => ApiResource::erase::<StorageLUN>(&()),
        Child::CronJob(_) => ApiResource::erase::<k8s_openapi::api::batch::v1::CronJob>(&()),
        Child::StatefulSet(_) => ApiResource::erase::<StatefulSet>(&()),
    }
}

/// Removes `null`s, which in an apply would mean "delete this field" rather than "not set".
fn strip_nulls(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|_, v| !v.is_null());
            m.values_mut().for_each(strip_nulls);
        }
        Value::Array(a) => a.iter_mut().for_each(strip_nulls),
        _ => {}
    }
}

/// Writes status the one way this operator writes it outside a recorded decision: Server-Side Apply on the
/// status subresource with `manager`, forced, so the fields `manager` set last time and no longer sets are
/// removed by the server. Decisions (which replica is active, a site's epoch) are written by
/// compare-and-swap instead: StorageLUN's `record_decision`, SiteFailover's `record`.
///
/// `owned` lists the top-level status fields `manager` writes; the rest of `status` is left out. A field of
/// `owned` that the stored status still holds after the apply, though `status` no longer sets it, belongs to
/// no apply manager (an operator version before this one wrote status with merge patches): it is cleared
/// once with a merge patch of nulls, and from then on the apply alone owns it.
pub async fn apply_status<K>(
    api: &Api<K>,
    name: &str,
    manager: &str,
    status: &Value,
    owned: &[&str],
) -> kube::Result<K>
where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
{
    let mut fields = serde_json::Map::new();
    if let Some(s) = status.as_object() {
        for (k, v) in s {
            if owned.contains(&k.as_str()) && !v.is_null() {
                fields.insert(k.clone(), v.clone());
            }
        }
    }
    let body = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "metadata": { "name": name },
        "status": fields,
    });
    let applied = api
        .patch_status(
            name,
            &PatchParams::apply(manager).force(),
            &Patch::Apply(&body),
        )
        .await?;
    let stored = serde_json::to_value(&applied).unwrap_or_default();
    let leftovers: serde_json::Map<String, Value> = owned
        .iter()
        .filter(|f| !fields.contains_key(**f))
        .filter(|f| stored["status"].get(**f).is_some_and(|v| !v.is_null()))
        .map(|f| (f.to_string(), Value::Null))
        .collect();
    if leftovers.is_empty() {
        return Ok(applied);
    }
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(&serde_json::json!({ "status": leftovers })),
    )
    .await
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn applied_hash_ignores_key_order_and_its_own_annotation() {
        let a = json!({"metadata": {"name": "n", "labels": {"a": "1", "b": "2"}}, "spec": {"x": [1, {"p": 1, "q": 2}]}});
        let b = json!({"spec": {"x": [1, {"q": 2, "p": 1}]}, "metadata": {"labels": {"b": "2", "a": "1"}, "name": "n"}});
        assert_eq!(applied_hash(&a), applied_hash(&b));
        let (annotated, hash) = with_applied_hash(a.clone());
        assert_eq!(hash, applied_hash(&a));
        assert_eq!(applied_hash(&annotated), hash);
        assert!(applied_with(&annotated, &hash));
        assert_eq!(hash.len(), 32);
        // A list's order is meaning, and any change of a value or of the set of fields is a new body.
        assert_ne!(
            applied_hash(&json!({"x": [1, 2]})),
            applied_hash(&json!({"x": [2, 1]}))
        );
        assert_ne!(
            applied_hash(&json!({"x": 1, "y": 2})),
            applied_hash(&json!({"x": 1}))
        );
    }

    /// What the API server returns differs from what was applied (omitempty, canonical quantities,
    /// defaults, other managers' fields); the decision to apply again looks only at the annotation, so
    /// none of it makes a steady state write.
    #[test]
    #[cfg(feature = "testkit")]
    fn a_normalised_live_object_is_still_up_to_date() {
        let desired = json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "corp-mx"},
            "spec": {"replicas": 2, "template": {"spec": {"containers": [{"name": "mx",
                "volumeMounts": [{"name": "spool", "mountPath": "/var/spool/postfix"}],
                "resources": {"requests": {"cpu": "1000m", "memory": "1024Mi"}}}]}}}});
        let (sent, hash) = with_applied_hash(desired.clone());
        let mut live = sent.clone();
        crate::testkit::normalise::like_kube_apiserver("apps/v1/statefulsets", &mut live);
        live["metadata"]["annotations"]["deployment.kubernetes.io/revision"] = json!("3");
        live["metadata"]["resourceVersion"] = json!("42");
        live["status"] = json!({"readyReplicas": 2});
        assert_ne!(live, sent, "the server changed the object");
        assert!(applied_with(&live, &applied_hash(&desired)));
        assert!(applied_with(&live, &hash));
        // A field removed from the desired body is a different body: applied again, which removes it.
        let mut smaller = desired.clone();
        smaller["spec"]["template"]["spec"]["containers"][0]
            .as_object_mut()
            .unwrap()
            .remove("resources");
        assert!(!applied_with(&live, &applied_hash(&smaller)));
    }

    #[test]
    fn nulls_are_not_applied() {
        let mut v = json!({"a": null, "b": {"c": null, "d": [ {"e": null} ]}});
        strip_nulls(&mut v);
        assert_eq!(v, json!({"b": {"d": [{}]}}));
    }
}
