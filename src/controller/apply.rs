//! Server-Side Apply of desired children, skipping those the live object already matches, and removal of
//! orphans. Shared by the controllers: children are found by label and kept only when owned by the
//! reconciled object's UID, so one compartment never touches another's objects.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, Preconditions,
};
use kube::{Client, Resource};
use serde_json::Value;

use super::error::{Error, Result};
use crate::crd::StorageLUN;
use crate::names::FIELD_MANAGER;
use crate::resources::Child;

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

/// What one apply pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ApplyReport {
    /// `Kind/name` of children created.
    pub created: Vec<String>,
    /// `Kind/name` of children changed.
    pub updated: Vec<String>,
    /// Children already as desired (no request made).
    pub unchanged: usize,
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

/// Applies `children` in order with one field manager; children whose live object already holds every
/// desired field get no request at all, so a steady-state reconcile writes nothing.
pub async fn apply_children(
    client: &Client,
    namespace: &str,
    children: &[Child],
    live: &LiveChildren,
) -> Result<ApplyReport> {
    let mut report = ApplyReport::default();
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    for child in children {
        let body = apply_body(child);
        let kind = child.kind();
        let name = child.name();
        let current = live.get(kind, &name);
        if let Some(current) = current {
            let current = serde_json::to_value(current).map_err(|source| Error::Decode {
                what: format!("{kind} {name}"),
                source,
            })?;
            if is_subset(&body, &current) {
                report.unchanged += 1;
                continue;
            }
        }
        let ar = api_resource_of(child);
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &ar);
        api.patch(&name, &pp, &Patch::Apply(&body))
            .await
            .map_err(|source| Error::Apply {
                kind,
                name: name.clone(),
                source,
            })?;
        let label = format!("{kind}/{name}");
        if current.is_some() {
            report.updated.push(label);
        } else {
            report.created.push(label);
        }
    }
    Ok(report)
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

/// Whether `live` already holds every field of `desired`: maps may have more keys (defaults, other
/// managers' fields, status), lists must have the same length with each element a subset in order,
/// scalars must be equal.
pub fn is_subset(desired: &Value, live: &Value) -> bool {
    match (desired, live) {
        (Value::Object(d), Value::Object(l)) => d.iter().all(|(k, dv)| match l.get(k) {
            Some(lv) => is_subset(dv, lv),
            None => dv.is_null() || dv.as_object().is_some_and(|m| m.is_empty()),
        }),
        (Value::Array(d), Value::Array(l)) => {
            d.len() == l.len() && d.iter().zip(l).all(|(d, l)| is_subset(d, l))
        }
        (Value::Number(d), Value::Number(l)) => d.as_f64() == l.as_f64(),
        (d, l) => d == l,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn subset_allows_defaults_and_status_but_not_differences() {
        let desired = json!({"spec": {"replicas": 2, "template": {"spec": {"containers": [{"name": "mx"}]}}}});
        let live = json!({
            "spec": {"replicas": 2, "revisionHistoryLimit": 10,
                     "template": {"spec": {"containers": [{"name": "mx", "imagePullPolicy": "IfNotPresent"}]}}},
            "status": {"readyReplicas": 1}
        });
        assert!(is_subset(&desired, &live));
        assert!(!is_subset(&json!({"spec": {"replicas": 3}}), &live));
        assert!(!is_subset(
            &json!({"spec": {"template": {"spec": {"containers": [{"name": "mx"}, {"name": "x"}]}}}}),
            &live
        ));
        assert!(!is_subset(
            &json!({"metadata": {"labels": {"a": "b"}}}),
            &json!({"metadata": {}})
        ));
        assert!(is_subset(&json!({"a": 1}), &json!({"a": 1.0})));
    }

    #[test]
    fn nulls_are_not_applied() {
        let mut v = json!({"a": null, "b": {"c": null, "d": [ {"e": null} ]}});
        strip_nulls(&mut v);
        assert_eq!(v, json!({"b": {"d": [{}]}}));
    }
}
