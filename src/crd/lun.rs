//! `StorageLUN`: one storage unit of at most `maxUsers` mailboxes, run as 1 active + `standbys` store replicas.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{KeyRef, PvcRetention, ReplicationSpec, SnapshotPolicy};
use super::mailpod::{SiteReplication, MAX_STANDBYS, MAX_USERS_PER_LUN};
use super::validation::{
    is_dns_label, is_dns_subdomain, parse_bytes, split_address, ValidationErrors,
};

/// A storage unit of bounded size. Normally created and owned by its MailPod, which places mailboxes on it.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "mailpod.io",
    version = "v1alpha1",
    kind = "StorageLUN",
    plural = "storageluns",
    singular = "storagelun",
    shortname = "lun",
    namespaced,
    status = "StorageLUNStatus",
    printcolumn = r#"{"name":"MailPod","type":"string","jsonPath":".spec.mailPod"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Users","type":"integer","jsonPath":".status.users"}"#,
    printcolumn = r#"{"name":"Active","type":"string","jsonPath":".status.currentActive"}"#,
    printcolumn = r#"{"name":"Lag","type":"number","jsonPath":".status.replicationLagSeconds"}"#,
    printcolumn = r#"{"name":"Last-Snapshot","type":"date","jsonPath":".status.lastSnapshot.time"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = Rule::new("has(self.storageClassName) == has(oldSelf.storageClassName)").message("storageClassName cannot be set or unset once the LUN exists").field_path(".storageClassName"))]
#[x_kube(validation = Rule::new("size(self.mailboxes) <= self.maxUsers").message("more mailboxes than maxUsers").field_path(".mailboxes"))]
#[serde(rename_all = "camelCase")]
pub struct StorageLUNSpec {
    /// The MailPod this LUN belongs to.
    #[x_kube(validation = Rule::new("self == oldSelf").message("mailPod is immutable"))]
    #[schemars(length(max = 63))]
    pub mail_pod: String,
    /// Position of this LUN in its MailPod's placement (0, 1, ...).
    #[x_kube(validation = Rule::new("self == oldSelf").message("index is immutable"))]
    pub index: u32,
    /// Size of each replica's volume. Fixed once set: the store StatefulSet's volumeClaimTemplates cannot
    /// change (expand the PVCs themselves instead).
    #[x_kube(validation = Rule::new("self.matches('^[0-9]+(k|M|G|T|Ki|Mi|Gi|Ti)?$')").message("must be a whole quantity of bytes such as 50Gi"))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("capacity is immutable: the store StatefulSet's volumeClaimTemplates cannot change; expand the PVCs instead"))]
    #[schemars(length(max = 32))]
    pub capacity: String,
    /// StorageClass; the cluster's default when unset. Fixed once the LUN exists, as `capacity` is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("storageClassName is immutable: the store StatefulSet's volumeClaimTemplates cannot change"))]
    #[schemars(length(max = 253))]
    pub storage_class_name: Option<String>,
    /// Most mailboxes this LUN may hold.
    #[serde(default = "default_max_users")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_users: u32,
    /// Mailboxes placed on this LUN.
    #[serde(default)]
    #[schemars(length(max = 10000))]
    pub mailboxes: Vec<String>,
    /// Standby replicas beside the active one.
    #[serde(default = "default_standbys")]
    #[schemars(range(min = 0, max = 4))]
    pub standbys: u32,
    #[serde(default)]
    pub replication: ReplicationSpec,
    #[serde(default)]
    pub snapshots: SnapshotPolicy,
    /// Seconds the active replica may be unready before a standby is promoted.
    #[serde(default = "default_failover_threshold")]
    #[schemars(range(min = 5, max = 3600))]
    pub failover_threshold_seconds: u32,
    /// Store image; the operator's default mail image when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    #[serde(default)]
    pub pvc_retention: PvcRetention,
    /// Dovecot passwd-file Secret key the store authenticates users against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passwd_file_secret: Option<KeyRef>,
    /// Expose the active replica to the other site of a SiteFailover (from the MailPod's backend).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site_replication: Option<SiteReplication>,
    /// `host:port` of a doveadm endpoint in another site that this LUN's replicas pull from while the LUN is
    /// fenced: the live standby of a SiteFailover, which sets it on the standby site.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    // The CEL string literal holds `\\[`, so the regular expression gets `\[`: a bare `\[` is not a
    // valid escape in CEL and the API server refuses the whole CRD.
    #[x_kube(validation = Rule::new(r"self.matches('^[A-Za-z0-9.:\\[\\]-]+:[0-9]{1,5}$')").message("must be host:port"))]
    #[schemars(length(max = MAX_HOST_PORT))]
    pub replication_source: Option<String>,
    /// Fenced: no replica of this LUN serves as active (set during site failover, or by hand). With
    /// replication method `Volume` no store runs either, and the volumes' images are demoted to secondary
    /// once the stores are gone.
    /// Left out of the MailPod's apply so the site-failover controller and `kubectl mailpod fence` own it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fenced: bool,
}

/// Longest `spec.replicationSource`: a DNS name (253), brackets of an IPv6 address, `:` and a port.
pub const MAX_HOST_PORT: u32 = 262;
/// Longest capacity string; every valid quantity is far shorter.
pub const MAX_QUANTITY_LEN: usize = 32;

fn default_max_users() -> u32 {
    1000
}
fn default_standbys() -> u32 {
    1
}
fn default_failover_threshold() -> u32 {
    30
}

/// What the StorageLUN controller reports.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageLUNStatus {
    /// Keyed by `type` (a map list), so Server-Side Apply merges conditions by type, never by position.
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Mailboxes on this LUN.
    #[serde(default)]
    pub users: i32,
    /// Replica the operator is promoting (first step of a failover).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_active: Option<String>,
    /// Replica the Service sends traffic to (second step, once it serves).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_active: Option<String>,
    /// Replicas that must be resynchronised before they may become active again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub needs_resync: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<ReplicaStatus>,
    /// Largest lag of a standby behind the active replica. With replication method `Volume`: how far the
    /// other site's copy of the volumes is behind (now − the oldest `lastSyncTime` csi-addons reports),
    /// 0 while fenced and in sync, unset before a sync is reported. An upper bound in coarse steps (0;
    /// three sync intervals, or 30 s for `Volume`; 30 s; 1, 5, 15 minutes; 1, 4 hours; whole days), so
    /// it changes when replication falls behind rather than on every pass; the exact figure is the
    /// operator's `storagelun_replication_lag_seconds` metric.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication_lag_seconds: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_promotion: Option<Promotion>,
    /// Snapshots this LUN made and keeps, newest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<SnapshotRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_snapshot: Option<SnapshotResult>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaStatus {
    /// Pod name.
    pub name: String,
    /// `active` or `standby`.
    pub role: String,
    pub ready: bool,
    /// A standby's lag, in the coarse steps of `replicationLagSeconds`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_seconds: Option<f64>,
}

/// One promotion of a standby.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Promotion {
    pub from: String,
    pub to: String,
    /// When the old active was first seen unready.
    pub lost_at: Time,
    /// When the new active served.
    pub promoted_at: Time,
    /// Loss to promoted, in seconds.
    pub seconds: f64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotRecord {
    /// VolumeSnapshot name.
    pub name: String,
    /// The VolumeSnapshot's creation time.
    pub created_at: Time,
    #[serde(default)]
    pub ready_to_use: bool,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotResult {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// When the snapshot Job finished.
    pub time: Time,
    /// `Succeeded` or `Failed`.
    pub result: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// How long delivery to the LUN was paused, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_millis: Option<u64>,
}

impl StorageLUNSpec {
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errs = ValidationErrors::default();
        if !is_dns_label(&self.mail_pod) {
            errs.push("spec.mailPod", "must be the name of a MailPod");
        }
        if let Some(sc) = &self.storage_class_name {
            if !is_dns_subdomain(sc) {
                errs.push(
                    "spec.storageClassName",
                    format!("`{sc}` is not a StorageClass name"),
                );
            }
        }
        if self.capacity.len() > MAX_QUANTITY_LEN || parse_bytes(&self.capacity).is_none() {
            errs.push(
                "spec.capacity",
                format!(
                    "`{}` is not a whole quantity of bytes such as 50Gi",
                    self.capacity
                ),
            );
        }
        if !(1..=MAX_USERS_PER_LUN).contains(&self.max_users) {
            errs.push(
                "spec.maxUsers",
                format!("must be between 1 and {MAX_USERS_PER_LUN}"),
            );
        }
        if self.mailboxes.len() > self.max_users as usize {
            errs.push(
                "spec.mailboxes",
                format!(
                    "{} mailboxes is more than maxUsers ({})",
                    self.mailboxes.len(),
                    self.max_users
                ),
            );
        }
        let mut seen = BTreeSet::new();
        for (i, m) in self.mailboxes.iter().enumerate() {
            if split_address(m).is_none() {
                errs.push(
                    format!("spec.mailboxes[{i}]"),
                    format!("`{m}` is not a mail address"),
                );
            } else if !seen.insert(m.as_str()) {
                errs.push(
                    format!("spec.mailboxes[{i}]"),
                    format!("duplicate mailbox `{m}`"),
                );
            }
        }
        if self.standbys > MAX_STANDBYS {
            errs.push("spec.standbys", format!("must be at most {MAX_STANDBYS}"));
        }
        if !(5..=3600).contains(&self.failover_threshold_seconds) {
            errs.push(
                "spec.failoverThresholdSeconds",
                "must be between 5 and 3600",
            );
        }
        self.replication.validate("spec.replication", &mut errs);
        self.snapshots.validate("spec.snapshots", &mut errs);
        if let Some(src) = &self.replication_source {
            if src.len() > MAX_HOST_PORT as usize || parse_host_port(src).is_none() {
                errs.push(
                    "spec.replicationSource",
                    format!("`{src}` must be host:port (a doveadm endpoint of the other site)"),
                );
            }
        }
        errs.into_result()
    }

    /// Store replicas: the active one and the standbys.
    pub fn replicas(&self) -> i32 {
        1 + self.standbys as i32
    }
}

/// `host:port` with a non-empty host and a port from 1 to 65535 (`[v6]:port` allowed).
pub fn parse_host_port(s: &str) -> Option<(&str, u16)> {
    let (host, port) = s.rsplit_once(':')?;
    let port: u16 = port.parse().ok().filter(|p| *p > 0)?;
    let ok = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b));
    ok.then_some((host, port))
}

impl StorageLUN {
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errs = match self.spec.validate() {
            Ok(()) => ValidationErrors::default(),
            Err(e) => e,
        };
        let name = self.metadata.name.as_deref().unwrap_or_default();
        if !is_dns_label(name) || name.len() > 50 {
            errs.push(
                "metadata.name",
                "must be a DNS label of at most 50 characters",
            );
        }
        errs.into_result()
    }
}
