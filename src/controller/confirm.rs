//! Changes that lose service for many users wait for a person to confirm them: the operator cannot tell
//! an emptied mailbox list (a blank ConfigMap key, the wrong Secret) from an intended clean-up.
//!
//! - Removing more than [`LARGE_SHARE`] of a MailPod's mailboxes at once (and at least [`MIN_LARGE`]) is
//!   refused, with nothing changed, until the MailPod carries [`CONFIRM_MAILBOX_REMOVAL`] set to the
//!   number of mailboxes removed.
//! - A LUN that held mail is emptied when its mailboxes go, but deleted only once it carries
//!   [`CONFIRM_DELETION`]`: "true"` (its store volumes hold the mail; with `pvcRetention: Delete` they go
//!   with it).

use std::collections::BTreeSet;

use kube::ResourceExt;

use crate::crd::{MailPod, StorageLUN};

/// On a MailPod: the number of mailboxes a large removal takes away, confirming it.
pub const CONFIRM_MAILBOX_REMOVAL: &str = "mailpod.io/confirm-mailbox-removal";
/// On a StorageLUN: `"true"` lets its MailPod delete it once emptied.
pub const CONFIRM_DELETION: &str = "mailpod.io/confirm-deletion";
/// Set by the operator on a LUN it empties of mailboxes: the LUN held mail.
pub const HELD_MAIL: &str = "mailpod.io/held-mail";

/// A removal of more than this share of the current mailboxes needs confirmation.
pub const LARGE_SHARE: f64 = 0.25;
/// Removals of fewer mailboxes than this never need confirmation.
pub const MIN_LARGE: usize = 3;

/// Reason on `Ready=False` while a large removal waits for confirmation.
pub const REASON_REMOVAL_UNCONFIRMED: &str = "MailboxRemovalUnconfirmed";

/// A large removal that is not confirmed: what it would remove.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LargeRemoval {
    pub removed: usize,
    pub current: usize,
    /// A few of the addresses, for the message.
    pub examples: Vec<String>,
}

impl LargeRemoval {
    pub fn message(&self) -> String {
        format!(
            "the mailbox sources would remove {} of {} mailboxes ({}{}); nothing was changed. If that is \
             intended, annotate the MailPod {CONFIRM_MAILBOX_REMOVAL}={}",
            self.removed,
            self.current,
            self.examples.join(", "),
            if self.removed > self.examples.len() {
                ", ..."
            } else {
                ""
            },
            self.removed
        )
    }
}

/// The large removal `wanted` would make from `current`, unless `mp` confirms exactly that many.
pub fn unconfirmed_large_removal(
    mp: &MailPod,
    current: &BTreeSet<String>,
    wanted: &BTreeSet<String>,
) -> Option<LargeRemoval> {
    let removed: Vec<&String> = current.difference(wanted).collect();
    let large =
        removed.len() >= MIN_LARGE && removed.len() as f64 > LARGE_SHARE * current.len() as f64;
    if !large {
        return None;
    }
    let confirmed = mp
        .annotations()
        .get(CONFIRM_MAILBOX_REMOVAL)
        .and_then(|v| v.trim().parse::<usize>().ok())
        == Some(removed.len());
    (!confirmed).then(|| LargeRemoval {
        removed: removed.len(),
        current: current.len(),
        examples: removed.iter().take(3).map(|s| s.to_string()).collect(),
    })
}

/// Whether an emptied LUN may be deleted: it never held mail, or a person confirmed.
pub fn may_delete_lun(lun: &StorageLUN) -> bool {
    let a = lun.annotations();
    !a.contains_key(HELD_MAIL) || a.get(CONFIRM_DELETION).map(String::as_str) == Some("true")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(n: usize) -> BTreeSet<String> {
        (0..n).map(|i| format!("u{i}@example.com")).collect()
    }

    fn mailpod(confirm: Option<&str>) -> MailPod {
        let mut mp = MailPod::new(
            "corp",
            serde_json::from_value(serde_json::json!({"domains": ["example.com"]})).unwrap(),
        );
        if let Some(c) = confirm {
            mp.annotations_mut()
                .insert(CONFIRM_MAILBOX_REMOVAL.into(), c.into());
        }
        mp
    }

    #[test]
    fn a_large_share_needs_the_exact_count_confirmed() {
        let current = set(100);
        let removal =
            unconfirmed_large_removal(&mailpod(None), &current, &BTreeSet::new()).unwrap();
        assert_eq!((removal.removed, removal.current), (100, 100));
        assert!(removal.message().contains("=100"), "{}", removal.message());
        assert!(
            unconfirmed_large_removal(&mailpod(Some("100")), &current, &BTreeSet::new()).is_none()
        );
        assert!(
            unconfirmed_large_removal(&mailpod(Some("99")), &current, &BTreeSet::new()).is_some()
        );
        // A quarter or less, or very few, goes ahead.
        assert!(unconfirmed_large_removal(
            &mailpod(None),
            &current,
            &set(100).into_iter().skip(25).collect()
        )
        .is_none());
        assert!(unconfirmed_large_removal(
            &mailpod(None),
            &current,
            &set(100).into_iter().skip(26).collect()
        )
        .is_some());
        assert!(unconfirmed_large_removal(&mailpod(None), &set(2), &BTreeSet::new()).is_none());
        // Adding is never a removal.
        assert!(unconfirmed_large_removal(&mailpod(None), &BTreeSet::new(), &current).is_none());
    }
}
