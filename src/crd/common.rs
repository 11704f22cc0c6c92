//! Types shared by the three custom resources.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::validation::{check_cron, ValidationErrors};

/// Condition types every controller of this operator reports.
pub mod condition {
    /// The resource serves as specified.
    pub const READY: &str = "Ready";
    /// The operator is still applying changes or waiting for children to converge.
    pub const PROGRESSING: &str = "Progressing";
    /// Some part is not serving (a service below its replicas, a store without an active replica).
    pub const DEGRADED: &str = "Degraded";
    /// Reason on `Ready=False` for a spec that cannot be applied; children are left untouched.
    pub const REASON_INVALID_SPEC: &str = "InvalidSpec";
}

/// A key of a ConfigMap or Secret in the resource's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeyRef {
    /// Name of the ConfigMap or Secret.
    pub name: String,
    /// Key within it.
    pub key: String,
}

/// What happens to the PVCs of mail stores when their owner is deleted. Mail is data: the default keeps it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum PvcRetention {
    /// PVCs outlive the MailPod/StorageLUN; delete them by hand when the mail is no longer needed.
    #[default]
    Retain,
    /// PVCs are deleted with their StatefulSet (Kubernetes' persistentVolumeClaimRetentionPolicy).
    Delete,
}

/// How the replicas of a LUN are kept in sync.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ReplicationMethod {
    /// The store agents run Dovecot's `doveadm sync` from the active replica to each standby, continuously.
    #[default]
    Dovecot,
    /// The storage replicates blocks (Ceph RBD mirroring to another cluster): the operator creates a
    /// csi-addons `VolumeReplication` per store volume, `primary` while the LUN serves and `secondary`
    /// while it is fenced (then no store runs).
    Volume,
}

/// Replication between the replicas of a LUN.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.method != 'Volume' || has(self.volumeReplicationClass)").message("volumeReplicationClass is required when method is Volume").field_path(".volumeReplicationClass"))]
pub struct ReplicationSpec {
    /// `Dovecot` (default) or `Volume`.
    #[serde(default)]
    pub method: ReplicationMethod,
    /// The csi-addons VolumeReplicationClass, for method `Volume`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_replication_class: Option<String>,
    /// Seconds between incremental sync passes for method `Dovecot` (default 5).
    #[serde(default = "default_sync_interval")]
    #[schemars(range(min = 1, max = 3600))]
    pub sync_interval_seconds: u32,
    /// Largest share (percent) of the LUN's messages, or of one mailbox's, that one replication pass may
    /// delete on a standby before it waits for a person (method `Dovecot`; default 50; 100: no limit). A
    /// folder replaced at the source (new UIDVALIDITY) counts as deleted whole. A refused pass is reported
    /// on the LUN (condition `DeletionRefused`) and goes through once the LUN carries the annotation
    /// `mailpod.io/confirm-replication-deletion` set to the id it names.
    #[serde(default = "default_max_deletion_percent")]
    #[schemars(range(min = 1, max = 100))]
    pub max_deletion_percent: u32,
}

fn default_sync_interval() -> u32 {
    5
}
fn default_max_deletion_percent() -> u32 {
    50
}

impl Default for ReplicationSpec {
    fn default() -> Self {
        Self {
            method: ReplicationMethod::default(),
            volume_replication_class: None,
            sync_interval_seconds: default_sync_interval(),
            max_deletion_percent: default_max_deletion_percent(),
        }
    }
}

impl ReplicationSpec {
    pub fn validate(&self, path: &str, errs: &mut ValidationErrors) {
        if self.method == ReplicationMethod::Volume && self.volume_replication_class.is_none() {
            errs.push(
                format!("{path}.volumeReplicationClass"),
                "is required when method is Volume",
            );
        }
        if !(1..=3600).contains(&self.sync_interval_seconds) {
            errs.push(
                format!("{path}.syncIntervalSeconds"),
                "must be between 1 and 3600",
            );
        }
        if !(1..=100).contains(&self.max_deletion_percent) {
            errs.push(
                format!("{path}.maxDeletionPercent"),
                "must be between 1 and 100",
            );
        }
    }
}

/// Scheduled, consistent snapshots of every LUN.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotPolicy {
    /// Take snapshots at all (default true).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Cron schedule, five fields (default every 8 hours).
    #[serde(default = "default_schedule")]
    #[x_kube(validation = Rule::new("self.matches('^(@(yearly|annually|monthly|weekly|daily|hourly)|[^ ]+ +[^ ]+ +[^ ]+ +[^ ]+ +[^ ]+)$')").message("must be a five-field cron schedule or an @ descriptor"))]
    #[schemars(length(max = MAX_SCHEDULE_LEN))]
    pub schedule: String,
    /// How many snapshots of each LUN to keep; older ones this LUN made are deleted (default 5).
    #[serde(default = "default_retain")]
    #[schemars(range(min = 1, max = 100))]
    pub retain: u32,
    /// VolumeSnapshotClass to snapshot with; the cluster's default class when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_snapshot_class_name: Option<String>,
    /// Longest time delivery to a LUN may stay paused for one snapshot; it resumes by itself after it (default 60).
    #[serde(default = "default_max_pause")]
    #[schemars(range(min = 5, max = 600))]
    pub max_pause_seconds: u32,
}

/// Longest cron schedule accepted; it bounds the cost of the schedule's CEL rule.
pub const MAX_SCHEDULE_LEN: u32 = 128;

fn default_true() -> bool {
    true
}
fn default_schedule() -> String {
    "0 */8 * * *".into()
}
fn default_retain() -> u32 {
    5
}
fn default_max_pause() -> u32 {
    60
}

impl Default for SnapshotPolicy {
    fn default() -> Self {
        Self {
            enabled: true,
            schedule: default_schedule(),
            retain: default_retain(),
            volume_snapshot_class_name: None,
            max_pause_seconds: default_max_pause(),
        }
    }
}

impl SnapshotPolicy {
    pub fn validate(&self, path: &str, errs: &mut ValidationErrors) {
        if self.schedule.len() > MAX_SCHEDULE_LEN as usize {
            errs.push(
                format!("{path}.schedule"),
                format!("must be at most {MAX_SCHEDULE_LEN} characters"),
            );
        } else if let Err(e) = check_cron(&self.schedule) {
            errs.push(format!("{path}.schedule"), e);
        }
        if !(1..=100).contains(&self.retain) {
            errs.push(format!("{path}.retain"), "must be between 1 and 100");
        }
        if !(5..=600).contains(&self.max_pause_seconds) {
            errs.push(
                format!("{path}.maxPauseSeconds"),
                "must be between 5 and 600",
            );
        }
    }
}

/// Sets `type`'s condition, keeping `lastTransitionTime` unless the status really changes.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    observed_generation: Option<i64>,
    now: Time,
) {
    let status = if status { "True" } else { "False" }.to_string();
    let message = message.into();
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            if c.status != status {
                c.last_transition_time = now;
            }
            c.status = status;
            c.reason = reason.into();
            c.message = message;
            c.observed_generation = observed_generation;
        }
        None => conditions.push(Condition {
            type_: type_.into(),
            status,
            reason: reason.into(),
            message,
            observed_generation,
            last_transition_time: now,
        }),
    }
}

/// Whether `type_` is present with status `True`.
pub fn condition_is_true(conditions: &[Condition], type_: &str) -> bool {
    conditions
        .iter()
        .any(|c| c.type_ == type_ && c.status == "True")
}
