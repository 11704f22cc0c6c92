//! Names of every object the operator creates, derived from the owner's name. One place, so builders,
//! controllers, the agent and `render` agree.

use crate::crd::ServiceKind;

/// Labels (app.kubernetes.io recommended set plus this operator's own).
pub mod labels {
    pub const NAME: &str = "app.kubernetes.io/name";
    pub const INSTANCE: &str = "app.kubernetes.io/instance";
    pub const COMPONENT: &str = "app.kubernetes.io/component";
    pub const PART_OF: &str = "app.kubernetes.io/part-of";
    pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
    /// The MailPod an object belongs to.
    pub const MAILPOD: &str = "mailpod.io/mailpod";
    /// The StorageLUN an object belongs to.
    pub const LUN: &str = "mailpod.io/lun";
    /// `"true"` on the ConfigMaps and Secrets that MailPods read mailboxes from (`spec.mailboxes.from`,
    /// passwd-file Secrets listed there too): the operator watches only these, so a change to one
    /// reconciles its MailPods at once. An unlabelled source is still read, on each reconcile, and
    /// reported in the MailPod's `MailboxSourcesWatched` condition.
    pub const MAILBOX_SOURCE: &str = "mailpod.io/mailbox-source";
    /// `active` or `standby` on store pods; the LUN's Service selects `active`.
    pub const ROLE: &str = "mailpod.io/role";
    pub const ROLE_ACTIVE: &str = "active";
    pub const ROLE_STANDBY: &str = "standby";
    /// On objects copied from the other site of a SiteFailover (the standby's PersistentVolumes that point
    /// at mirrored images): the site they were copied from.
    pub const MIRRORED_FROM: &str = "mailpod.io/mirrored-from";
    pub const APP_NAME: &str = "mailpod";
    pub const MANAGER: &str = "mailpod-operator";
}

/// Field manager for every Server-Side Apply of this operator.
pub const FIELD_MANAGER: &str = "mailpod-operator";

/// Field manager of the snapshot Job's status writes (`snapshots`, `lastSnapshot` of its StorageLUN).
pub const SNAPSHOT_FIELD_MANAGER: &str = "mailpod-operator-snapshot";

/// Default image of mail pods and of the operator's Jobs (the `mail` target of mail-image/Dockerfile; the
/// chart passes its own with `--mail-image`).
pub const DEFAULT_IMAGE: &str = concat!("ghcr.io/mailpod-io/mailpod:", env!("CARGO_PKG_VERSION"));

/// StatefulSet and client-facing Service of a front-end service: `corp-mx`.
pub fn frontend(mailpod: &str, kind: ServiceKind) -> String {
    format!("{mailpod}-{}", kind.as_str())
}

/// Headless Service that gives a front-end StatefulSet's pods stable names: `corp-mx-hl`.
pub fn frontend_headless(mailpod: &str, kind: ServiceKind) -> String {
    format!("{mailpod}-{}-hl", kind.as_str())
}

/// ConfigMap holding the access tables: `corp-access-tables`.
pub fn access_tables(mailpod: &str) -> String {
    format!("{mailpod}-access-tables")
}

/// ConfigMap holding the MailPod-wide mail settings: `corp-mail-settings`.
pub fn mail_settings(mailpod: &str) -> String {
    format!("{mailpod}-mail-settings")
}

/// StorageLUN number `index` of a MailPod: `corp-lun-0`. Also its StatefulSet and active Service.
pub fn lun(mailpod: &str, index: u32) -> String {
    format!("{mailpod}-lun-{index}")
}

/// Headless Service of a LUN's store StatefulSet: `corp-lun-0-hl`.
pub fn lun_headless(lun: &str) -> String {
    format!("{lun}-hl")
}

/// Snapshot CronJob of a LUN: `corp-lun-0-snapshot`.
pub fn lun_snapshot_cronjob(lun: &str) -> String {
    format!("{lun}-snapshot")
}

/// Pod `ordinal` of a StatefulSet.
pub fn pod(statefulset: &str, ordinal: i32) -> String {
    format!("{statefulset}-{ordinal}")
}

/// PVC of store replica `ordinal` (volumeClaimTemplate `mail` of the LUN's StatefulSet).
pub fn lun_pvc(lun: &str, ordinal: i32) -> String {
    format!("mail-{lun}-{ordinal}")
}

/// Annotations the operator writes on store pods: on a promoted one, so the second step of a promotion can
/// compute loss-to-promoted even when the old pod is gone; on the replicas of a fenced LUN with a
/// `spec.replicationSource`, where their agents pull from.
pub mod annotations {
    /// `host:port` of the other site's doveadm endpoint a standby pulls from (read by the agent from its
    /// downward-API annotations file).
    pub const REPLICATION_SOURCE: &str = "mailpod.io/replication-source";
    /// On a StorageLUN, copied by the operator to its store pods: the id of a replication pass a standby
    /// refused for deleting too much, which a person lets through (see agent::replication_guard).
    pub const CONFIRM_REPLICATION_DELETION: &str = "mailpod.io/confirm-replication-deletion";
    /// On a promoted pod: the replica it replaced.
    pub const PROMOTED_FROM: &str = "mailpod.io/promoted-from";
    /// On a promoted pod: when the replica it replaced was first seen unready (RFC 3339).
    pub const LOST_AT: &str = "mailpod.io/lost-at";
}
