//! The StorageLUNs a MailPod places its mailboxes onto.

use std::collections::BTreeMap;

use super::mailpod::Context;
use crate::crd::{StorageLUN, StorageLUNSpec};
use crate::names::{self, labels};
use crate::placement::LunAssignment;

/// Component label of StorageLUN objects.
pub const COMPONENT: &str = "lun";

/// StorageLUN number `a.index`, holding `a.mailboxes`, with the MailPod's back-end settings.
pub fn build(ctx: &Context, a: &LunAssignment) -> StorageLUN {
    let b = &ctx.spec().backend;
    let name = names::lun(ctx.name(), a.index);
    let mut meta = ctx.meta(name.clone(), COMPONENT);
    meta.labels
        .get_or_insert_with(BTreeMap::new)
        .insert(labels::LUN.to_string(), name.clone());
    StorageLUN {
        metadata: meta,
        spec: StorageLUNSpec {
            mail_pod: ctx.name().to_string(),
            index: a.index,
            capacity: b.lun_template.capacity.clone(),
            storage_class_name: b.lun_template.storage_class_name.clone(),
            max_users: b.max_users_per_lun.max(a.mailboxes.len() as u32),
            mailboxes: a.mailboxes.iter().cloned().collect(),
            standbys: b.standbys,
            replication: b.replication.clone(),
            snapshots: ctx.spec().snapshots.clone(),
            failover_threshold_seconds: b.failover_threshold_seconds,
            image: Some(ctx.image().to_string()),
            resources: b.resources.clone(),
            pvc_retention: b.pvc_retention,
            passwd_file_secret: ctx.spec().mailboxes.passwd_file_secret.clone(),
            site_replication: b.site_replication.clone(),
            replication_source: None,
            fenced: false,
        },
        status: None,
    }
}

/// The placement recorded in existing StorageLUNs of a MailPod (what `place` keeps stable).
pub fn assignments<'a>(luns: impl IntoIterator<Item = &'a StorageLUN>) -> Vec<LunAssignment> {
    let mut out: Vec<LunAssignment> = luns
        .into_iter()
        .map(|l| LunAssignment {
            index: l.spec.index,
            mailboxes: l.spec.mailboxes.iter().cloned().collect(),
        })
        .collect();
    out.sort_by_key(|a| a.index);
    out
}
