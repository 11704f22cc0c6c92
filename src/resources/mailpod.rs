//! Everything a MailPod owns, in apply order.

use std::collections::BTreeSet;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::ResourceExt;

use super::{
    config_map, frontend, lun, network_policy, object_meta, owner_reference, service_host, Child,
    Defaults,
};
use crate::crd::{MailPod, MailPodSpec, ValidationErrors};
use crate::mailconfig::tables::{data_size, AccessTables, LunEndpoint, MAX_DATA_BYTES};
use crate::names;
use crate::placement::{place, LunAssignment};

/// What the builders of one MailPod share.
pub struct Context<'a> {
    mailpod: &'a MailPod,
    owner: OwnerReference,
    image: &'a str,
    cluster_domain: &'a str,
    operator_namespace: Option<&'a str>,
}

impl<'a> Context<'a> {
    pub fn new(mailpod: &'a MailPod, defaults: &Defaults<'a>) -> Self {
        Self {
            owner: owner_reference(mailpod),
            image: mailpod.spec.image.as_deref().unwrap_or(defaults.image),
            cluster_domain: defaults.cluster_domain,
            operator_namespace: defaults.operator_namespace,
            mailpod,
        }
    }

    /// The namespace the operator's own pods run in, when it runs in the cluster.
    pub fn operator_namespace(&self) -> Option<&str> {
        self.operator_namespace
    }

    /// Fully qualified name of this MailPod's Service `service` (see [`service_host`]).
    pub fn service_host(&self, service: &str) -> String {
        service_host(service, self.namespace().as_deref(), self.cluster_domain)
    }

    pub fn name(&self) -> &str {
        self.mailpod.metadata.name.as_deref().unwrap_or_default()
    }

    pub fn namespace(&self) -> Option<String> {
        self.mailpod.namespace()
    }

    pub fn spec(&self) -> &MailPodSpec {
        &self.mailpod.spec
    }

    pub fn image(&self) -> &str {
        self.image
    }

    pub fn owner(&self) -> &OwnerReference {
        &self.owner
    }

    /// Metadata of a child named `name`, labelled as `component` of this MailPod.
    pub fn meta(&self, name: String, component: &str) -> ObjectMeta {
        object_meta(
            &self.owner,
            self.namespace(),
            name,
            super::labels(self.name(), component),
        )
    }
}

/// The desired state of a MailPod.
#[derive(Clone, Debug)]
pub struct Desired {
    /// Children in apply order.
    pub children: Vec<Child>,
    /// Where every mailbox lives.
    pub placement: Vec<LunAssignment>,
    /// The access tables, and their hash as it goes into status.
    pub tables: AccessTables,
    pub tables_hash: String,
}

/// Builds the desired children of a validated MailPod. `mailboxes` are the resolved mailboxes
/// ([`super::mailboxes::resolve`]); `existing` is the placement read back from its StorageLUNs.
pub fn build(
    mailpod: &MailPod,
    mailboxes: &BTreeSet<String>,
    existing: &[LunAssignment],
    defaults: &Defaults,
) -> Result<Desired, ValidationErrors> {
    mailpod.validate()?;
    let ctx = Context::new(mailpod, defaults);
    let placement = place(existing, mailboxes, mailpod.spec.backend.max_users_per_lun);
    let tables = AccessTables::build(&mailpod.spec, &placement, |i| {
        LunEndpoint::in_cluster(ctx.service_host(&names::lun(ctx.name(), i)))
    });
    let data = tables.to_data();
    if data_size(&data) > MAX_DATA_BYTES {
        let mut errs = ValidationErrors::default();
        errs.push(
            "spec.mailboxes",
            format!(
                "{} mailboxes make access tables of {} KiB, more than the {} KiB one ConfigMap can hold; split them over more MailPods",
                mailboxes.len(),
                data_size(&data) / 1024,
                MAX_DATA_BYTES / 1024
            ),
        );
        return Err(errs);
    }
    let tables_hash = crate::mailconfig::tables::data_hash(&data);

    let mut children = vec![
        Child::ConfigMap(config_map::access_tables(&ctx, data)),
        Child::ConfigMap(config_map::mail_settings(&ctx)),
    ];
    children.extend(network_policy::build(&ctx));
    children.extend(super::filter::build(&ctx));
    children.extend(
        placement
            .iter()
            .map(|a| Child::StorageLUN(lun::build(&ctx, a))),
    );
    for (kind, _) in mailpod.spec.frontend.enabled() {
        children.extend(frontend::build(&ctx, kind));
    }
    children.sort_by_key(apply_rank);
    Ok(Desired {
        children,
        placement,
        tables,
        tables_hash,
    })
}

/// Position in apply order: configuration, then policy and services, then LUNs, then workloads.
pub fn apply_rank(child: &Child) -> u8 {
    match child {
        Child::ConfigMap(_) => 0,
        Child::ServiceAccount(_) => 1,
        Child::Role(_) => 2,
        Child::RoleBinding(_) => 3,
        Child::NetworkPolicy(_) => 4,
        Child::Service(_) => 5,
        Child::PodDisruptionBudget(_) => 6,
        Child::StorageLUN(_) => 7,
        Child::CronJob(_) => 8,
        Child::StatefulSet(_) => 9,
    }
}
