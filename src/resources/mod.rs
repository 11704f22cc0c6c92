//! Pure builders: a validated resource in, the Kubernetes objects the operator applies out. No I/O.
//!
//! The controllers apply exactly these objects and `render` prints them, so what a reviewer sees in the
//! golden files is what reaches the cluster.

pub mod config_map;
pub mod filter;
pub mod frontend;
pub mod lun;
pub mod mailboxes;
pub mod mailpod;
pub mod network_policy;
pub mod pod;
pub mod store;

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::batch::v1::CronJob;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};
use serde::Serialize;

use crate::crd::StorageLUN;
use crate::names::labels;

/// The DNS domain of a cluster when the operator is told none (the kubelet's default `--cluster-domain`).
pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";

/// What the builders take from the operator's own configuration rather than from a resource.
#[derive(Clone, Copy, Debug)]
pub struct Defaults<'a> {
    /// Image of mail pods and jobs whose resources name none.
    pub image: &'a str,
    /// The cluster's DNS domain (`cluster.local`), without a trailing dot.
    pub cluster_domain: &'a str,
    /// The operator's own namespace, when it runs in the cluster: the NetworkPolicies admit its pods from
    /// there only.
    pub operator_namespace: Option<&'a str>,
}

impl<'a> Defaults<'a> {
    /// `image` in a cluster whose domain is [`DEFAULT_CLUSTER_DOMAIN`].
    pub fn image(image: &'a str) -> Self {
        Self {
            image,
            cluster_domain: DEFAULT_CLUSTER_DOMAIN,
            operator_namespace: None,
        }
    }
}

/// The fully qualified name of Service `service` in `namespace`: `corp-lun-0.mail.svc.cluster.local`.
///
/// Every name a mail daemon looks up is rendered this way. Postfix's SMTP and LMTP clients resolve next
/// hops with DNS and ignore the resolv.conf search list, so a bare Service name (`corp-lun-0`) is never
/// found from a pod (`5.4.4 Host or domain name not found`); and a trailing dot, which would make the name
/// absolute for every resolver, is refused by Postfix in a next-hop.
pub fn service_host(service: &str, namespace: Option<&str>, cluster_domain: &str) -> String {
    format!(
        "{service}.{}.svc.{cluster_domain}",
        namespace.unwrap_or("default")
    )
}

/// Checks a `--cluster-domain` value: DNS labels of letters, digits and `-`, separated by dots; one
/// trailing dot is dropped (see [`service_host`]). Returns it in lower case.
pub fn parse_cluster_domain(value: &str) -> Result<String, String> {
    let domain = value
        .strip_suffix('.')
        .unwrap_or(value)
        .to_ascii_lowercase();
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if domain.is_empty() || domain.len() > 200 || !domain.split('.').all(label_ok) {
        return Err(format!(
            "{value:?} is not a DNS domain (labels of letters, digits and '-' separated by dots, like cluster.local)"
        ));
    }
    Ok(domain)
}

/// One object the operator applies. Variants are listed in apply order: configuration first, then what
/// uses it, StatefulSets last.
// A few dozen children per reconcile: boxing the large variants would buy nothing measurable.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum Child {
    ConfigMap(ConfigMap),
    ServiceAccount(ServiceAccount),
    Role(Role),
    RoleBinding(RoleBinding),
    NetworkPolicy(NetworkPolicy),
    Service(Service),
    PodDisruptionBudget(PodDisruptionBudget),
    StorageLUN(StorageLUN),
    CronJob(CronJob),
    StatefulSet(StatefulSet),
}

macro_rules! for_each_child {
    ($self:expr, $o:ident => $body:expr) => {
        match $self {
            Child::ConfigMap($o) => $body,
            Child::ServiceAccount($o) => $body,
            Child::Role($o) => $body,
            Child::RoleBinding($o) => $body,
            Child::NetworkPolicy($o) => $body,
            Child::Service($o) => $body,
            Child::PodDisruptionBudget($o) => $body,
            Child::StorageLUN($o) => $body,
            Child::CronJob($o) => $body,
            Child::StatefulSet($o) => $body,
        }
    };
}

impl Child {
    /// Kubernetes kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Child::ConfigMap(_) => "ConfigMap",
            Child::ServiceAccount(_) => "ServiceAccount",
            Child::Role(_) => "Role",
            Child::RoleBinding(_) => "RoleBinding",
            Child::NetworkPolicy(_) => "NetworkPolicy",
            Child::Service(_) => "Service",
            Child::PodDisruptionBudget(_) => "PodDisruptionBudget",
            Child::StorageLUN(_) => "StorageLUN",
            Child::CronJob(_) => "CronJob",
            Child::StatefulSet(_) => "StatefulSet",
        }
    }

    pub fn name(&self) -> String {
        for_each_child!(self, o => o.name_any())
    }

    pub fn meta(&self) -> &ObjectMeta {
        for_each_child!(self, o => o.meta())
    }

    /// The object as JSON with `apiVersion` and `kind`, as Server-Side Apply and `render` need it.
    pub fn to_json(&self) -> serde_json::Value {
        fn with_type<K: Resource<DynamicType = ()> + Serialize>(o: &K) -> serde_json::Value {
            let mut v = serde_json::to_value(o).expect("k8s objects serialize");
            if let Some(map) = v.as_object_mut() {
                map.insert("apiVersion".into(), K::api_version(&()).into());
                map.insert("kind".into(), K::kind(&()).into());
            }
            v
        }
        for_each_child!(self, o => with_type(o))
    }
}

/// The recommended labels plus this operator's own, for one component of one MailPod.
pub fn labels(mailpod: &str, component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (labels::NAME.to_string(), labels::APP_NAME.to_string()),
        (labels::INSTANCE.to_string(), mailpod.to_string()),
        (labels::COMPONENT.to_string(), component.to_string()),
        (labels::PART_OF.to_string(), labels::APP_NAME.to_string()),
        (labels::MANAGED_BY.to_string(), labels::MANAGER.to_string()),
        (labels::MAILPOD.to_string(), mailpod.to_string()),
    ])
}

/// The labels that select one component's pods (a subset of [`labels`] that never changes).
pub fn selector(mailpod: &str, component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (labels::MAILPOD.to_string(), mailpod.to_string()),
        (labels::COMPONENT.to_string(), component.to_string()),
    ])
}

/// Metadata of a child: name, namespace, labels, and the owner as controller.
pub fn object_meta(
    owner: &OwnerReference,
    namespace: Option<String>,
    name: String,
    labels: BTreeMap<String, String>,
) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace,
        labels: Some(labels),
        owner_references: Some(vec![owner.clone()]),
        ..Default::default()
    }
}

/// Owner reference to `owner` as controller, with blockOwnerDeletion so foreground deletion waits for it.
pub fn owner_reference<K: Resource<DynamicType = ()>>(owner: &K) -> OwnerReference {
    let meta = owner.meta();
    OwnerReference {
        api_version: K::api_version(&()).into_owned(),
        kind: K::kind(&()).into_owned(),
        name: meta.name.clone().unwrap_or_default(),
        // Offline (`render`) objects have no UID yet; the API server's always do.
        uid: meta.uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names_are_fully_qualified_without_a_trailing_dot() {
        assert_eq!(
            service_host("corp-lun-0", Some("mail"), "cluster.local"),
            "corp-lun-0.mail.svc.cluster.local"
        );
        assert_eq!(
            service_host("corp-lun-0", None, "k8s.example"),
            "corp-lun-0.default.svc.k8s.example"
        );
        assert_eq!(
            parse_cluster_domain("Cluster.Local.").unwrap(),
            "cluster.local"
        );
        for bad in [
            "",
            ".",
            "a..b",
            "-a.b",
            "a b",
            "a_b.local",
            "cluster.local..",
        ] {
            assert!(parse_cluster_domain(bad).is_err(), "{bad:?}");
        }
    }
}
