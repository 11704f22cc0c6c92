//! The objects of one restore: a PVC cloned from the VolumeSnapshot and the Job that imports from it.
//! Pure; `restore::run` validates and creates them.
//!
//! Ownership: the Job is owned by the StorageLUN (deleting the LUN deletes its restores) but not as
//! controller, since the LUN controller does not manage it. The clone PVC is owned by the Job, so when
//! `ttlSecondsAfterFinished` removes the finished Job the garbage collector removes the clone too: a full
//! copy of a LUN's volume is not kept a moment longer than the logs are worth. The PVC is created after
//! the Job (it needs the Job's UID); the Job's pod waits for it meanwhile.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Container, EmptyDirVolumeSource, PersistentVolumeClaim, PersistentVolumeClaimSpec,
    PersistentVolumeClaimVolumeSource, PodSpec, PodTemplateSpec, TypedLocalObjectReference, Volume,
    VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::ResourceExt;

use super::import::Scope;
use crate::crd::StorageLUN;
use crate::names::labels as l;
use crate::resources::pod::{self, paths, ports, volumes};
use crate::resources::store::{replication_secret, REPLICATION_SECRET_KEY};
use crate::resources::{labels, owner_reference};
use crate::snapshot::volume;

/// Component label of restore Jobs, their pods and clone PVCs; the store's NetworkPolicy lets pods with
/// it reach the doveadm port.
pub const COMPONENT: &str = "restore";
/// Label naming the VolumeSnapshot a restore reads.
pub const SNAPSHOT_LABEL: &str = "mailpod.io/snapshot";
/// Where the restore's local Dovecot keeps its files (an emptyDir: the image's root may be read-only).
pub const WORK_DIR: &str = "/var/lib/mailpod/restore";
const WORK_VOLUME: &str = "work";
/// A finished restore Job (and with it the clone) is kept this long, for its logs.
pub const TTL_SECONDS_AFTER_FINISHED: i32 = 600;

/// What one restore is.
#[derive(Clone, Debug)]
pub struct Plan<'a> {
    pub lun: &'a StorageLUN,
    pub snapshot: &'a str,
    pub scope: &'a Scope,
    /// Name of the Job and of the clone PVC.
    pub name: String,
    pub image: &'a str,
    /// The cluster's DNS domain: the import reaches the live store by its Service's full name.
    pub cluster_domain: &'a str,
    /// The Job's activeDeadlineSeconds.
    pub deadline_seconds: i64,
    /// Size of the clone: the LUN's capacity, or the snapshot's `restoreSize` when that is larger (the LUN
    /// may have shrunk in spec since; a clone smaller than its source cannot be provisioned).
    pub capacity: String,
}

/// The clone's size from the LUN's capacity and the snapshot's `status.restoreSize`.
pub fn clone_capacity(lun_capacity: &str, restore_size: Option<&str>) -> String {
    use crate::crd::validation_bytes as bytes;
    match restore_size {
        None => lun_capacity.to_string(),
        Some(r) => match (bytes(lun_capacity), bytes(r)) {
            (Some(l), Some(s)) if l >= s => lun_capacity.to_string(),
            _ => r.to_string(),
        },
    }
}

/// `corp-lun-0-restore-20240305-080009`, within the 63 characters a Job name may have (its pods carry
/// it as a label).
pub fn restore_name(lun: &str, at: jiff::Timestamp) -> String {
    let suffix = format!("-restore-{}", at.strftime("%Y%m%d-%H%M%S"));
    let keep = 63 - suffix.len();
    let prefix: String = lun.chars().take(keep).collect();
    format!("{}{suffix}", prefix.trim_end_matches('-'))
}

fn restore_labels(plan: &Plan) -> BTreeMap<String, String> {
    let mut out = labels(&plan.lun.spec.mail_pod, COMPONENT);
    out.insert(l::LUN.to_string(), plan.lun.name_any());
    out.insert(SNAPSHOT_LABEL.to_string(), plan.snapshot.to_string());
    out
}

/// The arguments of `restore-import` for this plan.
pub fn import_args(plan: &Plan) -> Vec<String> {
    let mut args = vec![
        "restore-import".to_string(),
        "--target".to_string(),
        format!(
            "{}:{}",
            crate::resources::service_host(
                &plan.lun.name_any(),
                plan.lun.namespace().as_deref(),
                plan.cluster_domain
            ),
            ports::DOVEADM
        ),
        "--mail-root".to_string(),
        paths::MAIL.to_string(),
        "--work-dir".to_string(),
        WORK_DIR.to_string(),
        // The LUN's mailboxes and their incarnations as the MailPod's tables say when the import runs:
        // a Maildir in the snapshot of a mailbox moved or removed since, or of an address's previous
        // owner, stays where it is. Read from the mounted ConfigMap, not the command line, which could not
        // hold a full LUN's list.
        "--tables-dir".to_string(),
        paths::TABLES.to_string(),
        "--lun-index".to_string(),
        plan.lun.spec.index.to_string(),
    ];
    match plan.scope {
        Scope::All => args.push("--all".into()),
        Scope::Mailbox {
            address,
            folder,
            message_id,
        } => {
            args.extend(["--mailbox".to_string(), address.clone()]);
            if let Some(f) = folder {
                args.extend(["--folder".to_string(), f.clone()]);
            }
            if let Some(id) = message_id {
                args.extend(["--message-id".to_string(), id.clone()]);
            }
        }
    }
    args
}

/// The import Job: the clone mounted where the store keeps its mail, the LUN's doveadm password, scratch
/// space; the mail image's security context (Dovecot starts as root and drops to its users), and no API
/// credentials. The clone is the Job's own copy and is mounted read-write: Dovecot writes a Maildir's
/// uidlist and keywords files (and locks them) even to read it, and moving those elsewhere would lose the
/// snapshot's keyword names. The snapshot itself is never written.
pub fn job(plan: &Plan) -> Job {
    let lun = plan.lun;
    let mut owner = owner_reference(lun);
    owner.controller = Some(false);
    let mounts = vec![
        pod::mount(volumes::MAIL, paths::MAIL, false),
        pod::mount(volumes::REPLICATION, paths::REPLICATION, true),
        pod::mount(volumes::TABLES, paths::TABLES, true),
        pod::mount(WORK_VOLUME, WORK_DIR, false),
    ];
    let volumes_ = vec![
        Volume {
            name: volumes::MAIL.into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: plan.name.clone(),
                read_only: None,
            }),
            ..Default::default()
        },
        // Not optional: without the password the store refuses the import anyway; better a pod that
        // waits for the Secret and says so.
        pod::secret_volume(volumes::REPLICATION, &replication_secret(&lun.name_any())),
        pod::config_map_volume(
            volumes::TABLES,
            &crate::names::access_tables(&lun.spec.mail_pod),
        ),
        Volume {
            name: WORK_VOLUME.into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Default::default()
        },
    ];
    let container = Container {
        name: COMPONENT.into(),
        image: Some(plan.image.to_string()),
        args: Some(import_args(plan)),
        env: Some(vec![pod::value_env(
            "MAILPOD_DOVEADM_PASSWORD_FILE",
            &format!("{}/{}", paths::REPLICATION, REPLICATION_SECRET_KEY),
        )]),
        volume_mounts: Some(mounts),
        security_context: Some(pod::mail_security_context()),
        ..Default::default()
    };
    Job {
        metadata: ObjectMeta {
            name: Some(plan.name.clone()),
            namespace: lun.namespace(),
            labels: Some(restore_labels(plan)),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        spec: Some(JobSpec {
            // The import skips what the live store already holds, so a retry after a failure is safe.
            backoff_limit: Some(2),
            active_deadline_seconds: Some(plan.deadline_seconds),
            ttl_seconds_after_finished: Some(TTL_SECONDS_AFTER_FINISHED),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(restore_labels(plan)),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    volumes: Some(volumes_),
                    restart_policy: Some("Never".into()),
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        status: None,
    }
}

/// The clone: the LUN's storage class, `plan.capacity`, filled from the VolumeSnapshot.
/// `job` is the created Job (its UID makes it the owner); `None` for a dry run.
pub fn clone_pvc(plan: &Plan, job: Option<&Job>) -> PersistentVolumeClaim {
    let owner = match job {
        Some(j) => owner_reference(j),
        None => OwnerReference {
            api_version: "batch/v1".into(),
            kind: "Job".into(),
            name: plan.name.clone(),
            controller: Some(true),
            block_owner_deletion: Some(true),
            ..Default::default()
        },
    };
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(plan.name.clone()),
            namespace: plan.lun.namespace(),
            labels: Some(restore_labels(plan)),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            storage_class_name: plan.lun.spec.storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_string(),
                    Quantity(plan.capacity.clone()),
                )])),
                ..Default::default()
            }),
            data_source: Some(TypedLocalObjectReference {
                api_group: Some(volume::GROUP.into()),
                kind: "VolumeSnapshot".into(),
                name: plan.snapshot.to_string(),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod capacity_tests {
    use super::clone_capacity;

    #[test]
    fn the_clone_is_never_smaller_than_the_snapshot() {
        assert_eq!(clone_capacity("20Gi", None), "20Gi");
        assert_eq!(clone_capacity("20Gi", Some("10Gi")), "20Gi");
        assert_eq!(clone_capacity("20Gi", Some("30Gi")), "30Gi");
        // A quantity this crate does not parse (decimal) is the CSI driver's word: take it.
        assert_eq!(clone_capacity("20Gi", Some("20.5Gi")), "20.5Gi");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lun() -> StorageLUN {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "mailpod.io/v1alpha1", "kind": "StorageLUN",
            "metadata": {"name": "corp-lun-0", "namespace": "mail", "uid": "lun-uid"},
            "spec": {"mailPod": "corp", "index": 0, "capacity": "20Gi",
                     "storageClassName": "fast", "mailboxes": ["a@corp.example"]}
        }))
        .unwrap()
    }

    #[test]
    fn names_fit_a_job_and_sort_by_time() {
        let t: jiff::Timestamp = "2024-03-05T08:00:09Z".parse().unwrap();
        assert_eq!(
            restore_name("corp-lun-0", t),
            "corp-lun-0-restore-20240305-080009"
        );
        let long = restore_name(&"x".repeat(80), t);
        assert_eq!(long.len(), 63);
        assert!(long.ends_with("-restore-20240305-080009"));
    }

    #[test]
    fn job_mounts_the_clone_and_targets_the_active_service() {
        let lun = lun();
        let scope = Scope::Mailbox {
            address: "a@corp.example".into(),
            folder: Some("Projects".into()),
            message_id: None,
        };
        let plan = Plan {
            lun: &lun,
            snapshot: "corp-lun-0-20240101-000000",
            scope: &scope,
            name: "corp-lun-0-restore-x".into(),
            image: "mail:1",
            cluster_domain: "cluster.example",
            deadline_seconds: 3600,
            capacity: clone_capacity(&lun.spec.capacity, None),
        };
        let job = job(&plan);
        let owner = &job.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
            ("StorageLUN", "lun-uid", Some(false))
        );
        let spec = job.spec.as_ref().unwrap();
        let pod = spec.template.spec.as_ref().unwrap();
        let c = &pod.containers[0];
        assert_eq!(
            c.args.as_ref().unwrap()[..3],
            [
                "restore-import",
                "--target",
                "corp-lun-0.mail.svc.cluster.example:12345"
            ]
        );
        assert!(c.args.as_ref().unwrap().ends_with(&[
            "--mailbox".into(),
            "a@corp.example".into(),
            "--folder".into(),
            "Projects".into()
        ]));
        let mail = c
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.mount_path == paths::MAIL)
            .unwrap();
        assert_eq!(
            mail.read_only, None,
            "Dovecot writes uidlists while it reads"
        );
        let claim = pod.volumes.as_ref().unwrap()[0]
            .persistent_volume_claim
            .as_ref()
            .unwrap();
        assert_eq!(
            (claim.claim_name.as_str(), claim.read_only),
            ("corp-lun-0-restore-x", None)
        );
        let labels = spec
            .template
            .metadata
            .as_ref()
            .unwrap()
            .labels
            .as_ref()
            .unwrap();
        assert_eq!(labels[l::COMPONENT], COMPONENT);
        assert_eq!(labels[l::MAILPOD], "corp");
        assert_eq!(pod.automount_service_account_token, Some(false));

        let pvc = clone_pvc(&plan, Some(&job));
        let s = pvc.spec.unwrap();
        assert_eq!(s.storage_class_name.as_deref(), Some("fast"));
        assert_eq!(
            s.resources.unwrap().requests.unwrap()["storage"],
            Quantity("20Gi".into())
        );
        let src = s.data_source.unwrap();
        assert_eq!(
            (
                src.api_group.as_deref(),
                src.kind.as_str(),
                src.name.as_str()
            ),
            (
                Some(volume::GROUP),
                "VolumeSnapshot",
                "corp-lun-0-20240101-000000"
            )
        );
        assert_eq!(
            pvc.metadata.owner_references.unwrap()[0].kind,
            "Job",
            "the clone goes with its Job"
        );
    }
}
