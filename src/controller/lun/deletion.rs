//! Replication passes a standby refused for deleting too much (agent::replication_guard) wait for a
//! person: the LUN says so in the condition [`DELETION_REFUSED`] and a Warning Event, and the confirmation
//! a person puts on the LUN ([`CONFIRM`]) is copied to every store pod, whose agent reads it from its
//! downward-API annotations file. The copy is the only way in: a store pod takes no orders from anything
//! but its own files.

use std::collections::BTreeMap;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde::Deserialize;

use super::reports::ReplicationReport;
use crate::crd::{set_condition, StorageLUNStatus};
pub use crate::names::annotations::CONFIRM_REPLICATION_DELETION as CONFIRM;

/// Condition type, present (True) while a replica refuses a pass.
pub const DELETION_REFUSED: &str = "DeletionRefused";
/// Its reason, and the Event's.
pub const REASON: &str = "MassDeletionRefused";

/// A refused pass as the agent reports it (`deletionRefused` at `/replication`).
#[derive(Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Refusal {
    pub id: String,
    #[serde(default)]
    pub source: String,
    #[serde(default)]
    pub deleted_messages: u64,
    #[serde(default)]
    pub held_messages: u64,
    #[serde(default)]
    pub reasons: Vec<String>,
}

/// What the condition says: every replica that refuses, with the id that confirms its pass; `None` when
/// no replica refuses.
pub fn message(reports: &BTreeMap<String, ReplicationReport>) -> Option<String> {
    let refusing: Vec<String> = reports
        .iter()
        .filter_map(|(pod, r)| r.deletion_refused.as_ref().map(|d| (pod, d)))
        .map(|(pod, d)| {
            format!(
                "{pod} refused a replication pass from {} that would delete {} of its {} messages ({}); \
                 confirm with {CONFIRM}={}",
                d.source,
                d.deleted_messages,
                d.held_messages,
                d.reasons.join("; "),
                d.id
            )
        })
        .collect();
    (!refusing.is_empty()).then(|| {
        format!(
            "{}. Nothing was deleted; if the active's mail is what should be kept, annotate the StorageLUN \
             as given",
            refusing.join(". ")
        )
    })
}

/// Sets the condition while `message` says a replica refuses, removes it otherwise. Returns what an
/// Event should say: the new or changed refusal (Warning), or that none is left (Normal).
pub fn set(
    status: &mut StorageLUNStatus,
    message: Option<&str>,
    generation: Option<i64>,
    now: Timestamp,
) -> Option<(bool, String)> {
    let before = status
        .conditions
        .iter()
        .find(|c| c.type_ == DELETION_REFUSED)
        .map(|c| c.message.clone());
    match message {
        Some(m) => {
            set_condition(
                &mut status.conditions,
                DELETION_REFUSED,
                true,
                REASON,
                super::truncate_note(m),
                generation,
                Time(now),
            );
            (before.as_deref() != Some(&super::truncate_note(m))).then(|| (true, m.to_string()))
        }
        None => {
            status.conditions.retain(|c| c.type_ != DELETION_REFUSED);
            before.map(|_| {
                (
                    false,
                    "no replica refuses a replication pass any more".to_string(),
                )
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_condition_names_each_refusing_replica_and_its_id() {
        let mut reports = BTreeMap::new();
        reports.insert("corp-lun-0-0".to_string(), ReplicationReport::default());
        assert_eq!(message(&reports), None);
        reports.insert(
            "corp-lun-0-1".to_string(),
            ReplicationReport {
                deletion_refused: Some(Refusal {
                    id: "a1b2c3d4e5f6".into(),
                    source: "corp-lun-0:12345".into(),
                    deleted_messages: 240,
                    held_messages: 300,
                    reasons: vec!["the pass would delete 240 of the LUN's 300 messages".into()],
                }),
                ..Default::default()
            },
        );
        let m = message(&reports).unwrap();
        assert!(m.contains("corp-lun-0-1 refused"), "{m}");
        assert!(m.contains("240 of its 300"), "{m}");
        assert!(
            m.contains("mailpod.io/confirm-replication-deletion=a1b2c3d4e5f6"),
            "{m}"
        );

        let now = Timestamp::now();
        let mut status = StorageLUNStatus::default();
        assert_eq!(
            set(&mut status, Some(&m), Some(1), now),
            Some((true, m.clone()))
        );
        assert_eq!(set(&mut status, Some(&m), Some(1), now), None, "unchanged");
        assert_eq!(status.conditions[0].type_, DELETION_REFUSED);
        assert_eq!(status.conditions[0].status, "True");
        assert!(matches!(
            set(&mut status, None, Some(1), now),
            Some((false, _))
        ));
        assert!(status.conditions.is_empty());
        assert_eq!(set(&mut status, None, Some(1), now), None);
    }
}
