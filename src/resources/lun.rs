//! The StorageLUNs a MailPod places its mailboxes onto.

use std::collections::BTreeMap;

use super::mailpod::Context;
use crate::crd::{StorageLUN, StorageLUNSpec};
use crate::names::{self, labels};
use crate::placement::{self, LunAssignment};

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

/// The incarnations each existing StorageLUN records ([`placement::MAILBOX_INCARNATIONS`]), by index.
/// An unreadable annotation is an error naming the LUN: read as empty, it would give an address that came
/// back the Maildir of its previous owner.
pub fn recorded_incarnations<'a>(
    luns: impl IntoIterator<Item = &'a StorageLUN>,
) -> Result<BTreeMap<u32, BTreeMap<String, u32>>, (String, String)> {
    let mut out = BTreeMap::new();
    for l in luns {
        let value = l
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(placement::MAILBOX_INCARNATIONS));
        let known = placement::parse_incarnations(value.map(String::as_str)).map_err(|e| {
            (
                format!(
                    "StorageLUN {} metadata.annotations[{}]",
                    l.metadata.name.as_deref().unwrap_or_default(),
                    placement::MAILBOX_INCARNATIONS
                ),
                e,
            )
        })?;
        if !known.is_empty() {
            out.insert(l.spec.index, known);
        }
    }
    Ok(out)
}

/// The placement recorded in existing StorageLUNs of a MailPod (what `place` keeps stable), with the
/// incarnations `known` records for the mailboxes each holds.
pub fn assignments<'a>(
    luns: impl IntoIterator<Item = &'a StorageLUN>,
    known: &BTreeMap<u32, BTreeMap<String, u32>>,
) -> Vec<LunAssignment> {
    let mut out: Vec<LunAssignment> = luns
        .into_iter()
        .map(|l| {
            let mailboxes: std::collections::BTreeSet<String> =
                l.spec.mailboxes.iter().cloned().collect();
            let incarnations = known
                .get(&l.spec.index)
                .into_iter()
                .flatten()
                .filter(|(m, n)| **n > 0 && mailboxes.contains(*m))
                .map(|(m, n)| (m.clone(), *n))
                .collect();
            LunAssignment {
                index: l.spec.index,
                mailboxes,
                incarnations,
            }
        })
        .collect();
    out.sort_by_key(|a| a.index);
    out
}
