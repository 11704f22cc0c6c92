//! No mass deletion by replication.
//!
//! `doveadm backup -R` makes a standby an exact copy of its source, so an emptied or wrong active volume
//! (a wiped PVC, the wrong snapshot restored, a mistaken `rm`) would reach every standby, and the other
//! site, within one interval. Before each mirror pass the standby compares, per mailbox and folder, what
//! it holds (what the last pass left) with what the source holds now:
//!
//! - a folder with the same UIDVALIDITY that holds fewer messages loses the difference (expunges);
//! - a folder whose UIDVALIDITY changed was replaced: every message it holds here counts as deleted;
//! - a folder gone from the source loses every message; when INBOX itself was replaced, the whole mailbox
//!   was (a wiped Maildir is recreated with a new UIDVALIDITY) and such a folder counts as replaced.
//!
//! A pass is refused when it would delete more than `maxDeletionPercent` of the LUN's messages, or when
//! replaced folders would take more than that share of one mailbox's, and at least [`MIN_GUARDED`]
//! messages either way. Expunges alone never refuse for one mailbox: a POP3 client that downloads and
//! deletes, or a user emptying a folder, is the normal case. A refused pass changes nothing: the standby
//! keeps its copy, reports the refusal and asks again every interval. A person lets it through by setting
//! the pod annotation [`CONFIRM_ANNOTATION`] (the operator copies it from the StorageLUN) to the refusal's
//! id; that covers a pass deleting no more, and replacing no other folder, than the refusal it names.
//!
//! "What it holds" is the most each folder held within the last hour ([`Guard::reference`]), so a wipe
//! that takes several passes adds up. Between the comparison and the pass the source may change; that
//! gap is one pass long, and the next comparison sees what it missed.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use crate::names::annotations::CONFIRM_REPLICATION_DELETION as CONFIRM_ANNOTATION;
/// A pass that deletes fewer messages than this never waits for a person.
pub const MIN_GUARDED: u64 = 10;
/// Refusals remembered for a confirmation that arrives late (the kubelet refreshes annotations files
/// within about a minute, while the source may change between passes).
const REMEMBERED: usize = 16;
/// Mailboxes named in a report.
const REPORTED_MAILBOXES: usize = 10;
/// How long deletions add up before the reference is taken afresh (see [`Guard::reference`]).
pub const WINDOW: Duration = Duration::from_secs(3600);

/// One folder as `doveadm mailbox status` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Folder {
    pub messages: u64,
    pub uidvalidity: u64,
}

/// Mailbox address -> folder name -> status.
pub type Mailboxes = BTreeMap<String, BTreeMap<String, Folder>>;

/// What a pass would take from one mailbox.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MailboxLoss {
    pub mailbox: String,
    /// Messages this replica holds there that the pass would delete.
    pub deleted: u64,
    /// Messages this replica holds there.
    pub held: u64,
    /// Folders replaced at the source (new UIDVALIDITY, or the whole mailbox recreated).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replaced: Vec<String>,
}

/// What a pass would delete, and why it must wait (no reasons: it may go).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assessment {
    pub deleted: u64,
    pub held: u64,
    /// Every mailbox that would lose messages, the largest loss first.
    pub losses: Vec<MailboxLoss>,
    pub reasons: Vec<String>,
}

impl Assessment {
    pub fn allowed(&self) -> bool {
        self.reasons.is_empty()
    }

    fn replaced(&self) -> BTreeSet<(String, String)> {
        self.losses
            .iter()
            .flat_map(|l| l.replaced.iter().map(|f| (l.mailbox.clone(), f.clone())))
            .collect()
    }
}

fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        100.0 * part as f64 / whole as f64
    }
}

/// Compares what this replica holds (`held`, the last pass's result) with the `source` a pass would copy,
/// and decides whether the pass may delete what it would.
pub fn assess(held: &Mailboxes, source: &Mailboxes, max_percent: u32) -> Assessment {
    let empty = BTreeMap::new();
    let mut losses = vec![];
    let mut reasons = vec![];
    let (mut deleted, mut total) = (0, 0);
    for (mailbox, folders) in held {
        let there = source.get(mailbox).unwrap_or(&empty);
        let inbox_replaced = folders.get("INBOX").is_some_and(|mine| {
            there
                .get("INBOX")
                .is_none_or(|s| s.uidvalidity != mine.uidvalidity)
        });
        let mut loss = MailboxLoss {
            mailbox: mailbox.clone(),
            deleted: 0,
            held: 0,
            replaced: vec![],
        };
        let mut replaced_messages = 0;
        for (name, mine) in folders {
            // A restore's staging folder empties into other folders of the same mailbox: its messages
            // move, they are not deleted (restore::staging).
            if crate::restore::staging::is_staging(name) {
                continue;
            }
            loss.held += mine.messages;
            let (gone, replaced) = match there.get(name) {
                Some(s) if s.uidvalidity != mine.uidvalidity => (mine.messages, true),
                Some(s) => (mine.messages.saturating_sub(s.messages), false),
                // Gone with the whole mailbox, or deleted by its user.
                None => (mine.messages, inbox_replaced),
            };
            loss.deleted += gone;
            if replaced && mine.messages > 0 {
                replaced_messages += gone;
                loss.replaced.push(name.clone());
            }
        }
        deleted += loss.deleted;
        total += loss.held;
        if replaced_messages >= MIN_GUARDED
            && percent(replaced_messages, loss.held) > f64::from(max_percent)
        {
            reasons.push(format!(
                "mailbox {mailbox}: {} replaced at the source (new UIDVALIDITY), {replaced_messages} of its {} messages ({:.0}%)",
                loss.replaced.join(", "),
                loss.held,
                percent(replaced_messages, loss.held)
            ));
        }
        if loss.deleted > 0 {
            losses.push(loss);
        }
    }
    if deleted >= MIN_GUARDED && percent(deleted, total) > f64::from(max_percent) {
        reasons.insert(
            0,
            format!(
                "the LUN would have lost {deleted} of its {total} messages within the hour ({:.0}%)",
                percent(deleted, total)
            ),
        );
    }
    losses.sort_by(|a, b| b.deleted.cmp(&a.deleted).then(a.mailbox.cmp(&b.mailbox)));
    Assessment {
        deleted,
        held: total,
        losses,
        reasons,
    }
}

/// A refused pass, as `/replication` reports it (`deletionRefused`).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Refusal {
    /// What a person sets [`CONFIRM_ANNOTATION`] to, to let this pass through.
    pub id: String,
    /// The replication source (`host:port`) the pass would have copied from.
    pub source: String,
    pub deleted_messages: u64,
    pub held_messages: u64,
    pub max_deletion_percent: u32,
    pub reasons: Vec<String>,
    /// The mailboxes that would lose most.
    pub mailboxes: Vec<MailboxLoss>,
    #[serde(skip)]
    replaced: BTreeSet<(String, String)>,
}

impl Refusal {
    fn new(a: &Assessment, source: &str, max_percent: u32) -> Self {
        let mut h = Sha256::new();
        h.update(source.as_bytes());
        for l in &a.losses {
            h.update(format!(
                "\n{} {} {} {}",
                l.mailbox,
                l.deleted,
                l.held,
                l.replaced.join("/")
            ));
        }
        Self {
            id: hex::encode(&h.finalize()[..6]),
            source: source.to_string(),
            deleted_messages: a.deleted,
            held_messages: a.held,
            max_deletion_percent: max_percent,
            reasons: a.reasons.clone(),
            mailboxes: a.losses.iter().take(REPORTED_MAILBOXES).cloned().collect(),
            replaced: a.replaced(),
        }
    }

    /// A confirmation of this refusal covers `a`: it deletes no more, replaces nothing else, from the
    /// same source.
    fn covers(&self, a: &Assessment, source: &str) -> bool {
        self.source == source
            && a.deleted <= self.deleted_messages
            && a.replaced().is_subset(&self.replaced)
    }

    pub fn message(&self) -> String {
        format!(
            "refused a replication pass from {} that would delete {} of {} messages (counted over \
             the last hour): {}; nothing was deleted (the mailboxes that lose nothing are still mirrored). If the source's mail is what \
             should be kept, confirm with the annotation {}={}",
            self.source,
            self.deleted_messages,
            self.held_messages,
            self.reasons.join("; "),
            CONFIRM_ANNOTATION,
            self.id
        )
    }
}

/// What this replica held at most during the current window, and the refusals a confirmation may name.
#[derive(Debug, Default)]
pub struct Guard {
    refused: Vec<Refusal>,
    /// Per folder, the most messages held since `since` (a replaced folder starts again).
    marks: Mailboxes,
    since: Option<Instant>,
    /// The incarnation each marked mailbox had (absent: the first).
    incarnations: BTreeMap<String, u32>,
}

/// What the guard says about one pass.
#[derive(Debug, PartialEq)]
pub enum Admission {
    /// Within the limits.
    Allowed,
    /// Beyond them, let through by the confirmation of this refusal id.
    Confirmed(String),
    Refused(Refusal),
}

impl Guard {
    /// What a pass is measured against: per folder, the most messages this replica held during the
    /// current [`WINDOW`], `held` (now) included. Against the last pass alone, a wipe spread over several
    /// passes (an `rm -r` of a large volume takes longer than an interval) would go through a share at a
    /// time; against the high-water mark it adds up, while mail that comes and goes (a POP3 client
    /// fetching and deleting all day) counts once. Only the mailboxes in `users` (the LUN's) are kept, and
    /// a mailbox in another incarnation than when it was marked (`incarnations`: its LUN took the address
    /// back after a removal, with a new, empty home) starts again: its previous owner's mail is not
    /// deleted, it is simply not this mailbox's.
    pub fn reference(
        &mut self,
        held: &Mailboxes,
        users: &[String],
        incarnations: &BTreeMap<String, u32>,
        now: Instant,
    ) -> Mailboxes {
        let renewed: Vec<String> = self
            .marks
            .keys()
            .filter(|m| self.incarnations.get(*m) != incarnations.get(*m))
            .cloned()
            .collect();
        for m in renewed {
            self.marks.remove(&m);
        }
        self.incarnations = incarnations.clone();
        if self.since.is_none_or(|t| now.duration_since(t) > WINDOW) {
            self.marks = held.clone();
            self.since = Some(now);
        } else {
            for (mailbox, folders) in held {
                let marks = self.marks.entry(mailbox.clone()).or_default();
                for (name, f) in folders {
                    match marks.get_mut(name) {
                        Some(m) if m.uidvalidity == f.uidvalidity => {
                            m.messages = m.messages.max(f.messages)
                        }
                        _ => {
                            marks.insert(name.clone(), *f);
                        }
                    }
                }
            }
        }
        let users: BTreeSet<&String> = users.iter().collect();
        self.marks.retain(|m, _| users.contains(m));
        self.marks.clone()
    }

    /// Whether `confirmation` names a refusal that covers `a` (see [`Guard::admit`]).
    pub fn confirms(&self, a: &Assessment, source: &str, confirmation: Option<&str>) -> bool {
        confirmation
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .is_some_and(|id| {
                self.refused
                    .iter()
                    .any(|r| r.id == id && r.covers(a, source))
            })
    }

    /// Allows `a` within the limits, or beyond them when `confirmation` names an earlier refusal that
    /// covers it; otherwise records and returns the refusal.
    pub fn admit(
        &mut self,
        a: &Assessment,
        source: &str,
        max_percent: u32,
        confirmation: Option<&str>,
    ) -> Admission {
        if a.allowed() {
            return Admission::Allowed;
        }
        if self.confirms(a, source, confirmation) {
            return Admission::Confirmed(confirmation.unwrap_or_default().trim().to_string());
        }
        let refusal = Refusal::new(a, source, max_percent);
        self.refused.retain(|r| r.id != refusal.id);
        self.refused.push(refusal.clone());
        if self.refused.len() > REMEMBERED {
            self.refused.remove(0);
        }
        Admission::Refused(refusal)
    }

    /// After a complete pass no earlier refusal applies any more; after a confirmed one, what it deleted
    /// no longer counts either (the window starts again).
    pub fn passed(&mut self, confirmed: bool) {
        self.refused.clear();
        if confirmed {
            self.since = None;
        }
    }
}

/// The error of a refused pass, told apart from failures by `downcast_ref`.
#[derive(Debug)]
pub struct Refused(pub Refusal);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.message())
    }
}

impl std::error::Error for Refused {}

#[cfg(test)]
mod tests {
    use super::*;

    fn folders(list: &[(&str, u64, u64)]) -> BTreeMap<String, Folder> {
        list.iter()
            .map(|(n, m, v)| {
                (
                    n.to_string(),
                    Folder {
                        messages: *m,
                        uidvalidity: *v,
                    },
                )
            })
            .collect()
    }

    /// `n` mailboxes `u<i>@example.com` each with `inbox` messages in INBOX (UIDVALIDITY 100).
    fn lun(n: usize, inbox: u64) -> Mailboxes {
        (0..n)
            .map(|i| {
                (
                    format!("u{i}@example.com"),
                    folders(&[("INBOX", inbox, 100)]),
                )
            })
            .collect()
    }

    #[test]
    fn ordinary_deletions_and_new_mail_go_ahead() {
        let held = lun(10, 20);
        // A user expunges a few, another downloads and deletes all over POP3, new mail and a new mailbox.
        let mut now = held.clone();
        now.get_mut("u0@example.com")
            .unwrap()
            .get_mut("INBOX")
            .unwrap()
            .messages = 15;
        now.get_mut("u1@example.com")
            .unwrap()
            .get_mut("INBOX")
            .unwrap()
            .messages = 0;
        now.get_mut("u2@example.com")
            .unwrap()
            .get_mut("INBOX")
            .unwrap()
            .messages = 40;
        now.insert("new@example.com".into(), folders(&[("INBOX", 3, 7)]));
        let a = assess(&held, &now, 50);
        assert!(a.allowed(), "{:?}", a.reasons);
        assert_eq!((a.deleted, a.held), (25, 200));
        assert_eq!(a.losses[0].mailbox, "u1@example.com");
        assert_eq!(a.losses.len(), 2);
        // A user deleting a folder is an ordinary deletion too.
        let mut held = lun(4, 20);
        held.get_mut("u0@example.com").unwrap().insert(
            "Archive".into(),
            Folder {
                messages: 30,
                uidvalidity: 101,
            },
        );
        let mut now = held.clone();
        now.get_mut("u0@example.com").unwrap().remove("Archive");
        let a = assess(&held, &now, 50);
        assert!(a.allowed(), "{:?}", a.reasons);
        assert_eq!(a.deleted, 30);
    }

    #[test]
    fn a_restores_staging_folder_emptying_is_no_deletion() {
        // A standby mirrored while a restore staged 500 messages; they have moved into INBOX since.
        let mut held = lun(2, 20);
        held.get_mut("u0@example.com").unwrap().insert(
            "Restore-in-progress.INBOX".into(),
            Folder {
                messages: 500,
                uidvalidity: 102,
            },
        );
        let mut now = lun(2, 20);
        now.get_mut("u0@example.com")
            .unwrap()
            .get_mut("INBOX")
            .unwrap()
            .messages = 520;
        let a = assess(&held, &now, 50);
        assert!(a.allowed(), "{:?}", a.reasons);
        assert_eq!((a.deleted, a.held), (0, 40));
    }

    #[test]
    fn emptying_most_of_the_lun_is_refused() {
        let held = lun(10, 20);
        let mut now = held.clone();
        for i in 0..6 {
            now.get_mut(&format!("u{i}@example.com"))
                .unwrap()
                .get_mut("INBOX")
                .unwrap()
                .messages = 0;
        }
        let a = assess(&held, &now, 50);
        assert!(!a.allowed());
        assert_eq!((a.deleted, a.held), (120, 200));
        assert!(
            a.reasons[0].contains("lost 120 of its 200 messages within the hour (60%)"),
            "{:?}",
            a.reasons
        );
        // The same pass within a higher limit, and a smaller one within this limit.
        assert!(assess(&held, &now, 60).allowed());
        now.get_mut("u5@example.com")
            .unwrap()
            .get_mut("INBOX")
            .unwrap()
            .messages = 20;
        assert!(
            assess(&held, &now, 50).allowed(),
            "exactly half is not more than half"
        );
        // A vanished source (every mailbox gone) is a deletion of everything.
        let a = assess(&held, &Mailboxes::new(), 50);
        assert_eq!(a.deleted, 200);
        assert!(!a.allowed());
        // Very few messages never wait.
        assert!(assess(&lun(3, 3), &Mailboxes::new(), 50).allowed());
        // 100% turns the guard off.
        assert!(assess(&held, &Mailboxes::new(), 100).allowed());
    }

    #[test]
    fn a_replaced_mailbox_counts_whole_and_is_refused_alone() {
        let mut held = lun(10, 20);
        held.get_mut("u3@example.com").unwrap().insert(
            "Sent".into(),
            Folder {
                messages: 5,
                uidvalidity: 200,
            },
        );
        // u3's Maildir wiped and recreated by a new delivery: INBOX has a new UIDVALIDITY, Sent is gone.
        let mut now = held.clone();
        now.insert("u3@example.com".into(), folders(&[("INBOX", 1, 999)]));
        let a = assess(&held, &now, 50);
        assert!(!a.allowed());
        assert_eq!(
            a.deleted, 25,
            "every message u3 held, though the LUN keeps most"
        );
        assert_eq!(a.reasons.len(), 1, "{:?}", a.reasons);
        assert!(
            a.reasons[0].contains("mailbox u3@example.com: INBOX, Sent replaced"),
            "{:?}",
            a.reasons
        );
        assert_eq!(a.losses[0].replaced, ["INBOX", "Sent"]);
        // One folder replaced, holding most of the mailbox.
        let mut now = held.clone();
        now.get_mut("u3@example.com")
            .unwrap()
            .get_mut("INBOX")
            .unwrap()
            .uidvalidity = 5;
        let a = assess(&held, &now, 50);
        assert!(!a.allowed() && a.losses[0].replaced == ["INBOX"], "{a:?}");
        // A replaced folder holding a small share of the mailbox, or an empty one, goes ahead.
        let mut now = held.clone();
        now.get_mut("u3@example.com")
            .unwrap()
            .get_mut("Sent")
            .unwrap()
            .uidvalidity = 5;
        assert!(assess(&held, &now, 50).allowed());
        let held = lun(10, 0);
        let mut now = held.clone();
        now.get_mut("u3@example.com")
            .unwrap()
            .get_mut("INBOX")
            .unwrap()
            .uidvalidity = 5;
        assert!(assess(&held, &now, 50).allowed());
    }

    #[test]
    fn a_confirmation_lets_exactly_that_pass_through() {
        let held = lun(10, 20);
        let mut now = held.clone();
        for i in 0..8 {
            now.remove(&format!("u{i}@example.com"));
        }
        let a = assess(&held, &now, 50);
        let mut guard = Guard::default();
        let Admission::Refused(r) = guard.admit(&a, "active:12345", 50, None) else {
            panic!("not refused")
        };
        assert_eq!(r.deleted_messages, 160);
        assert!(
            r.message()
                .contains(&format!("{CONFIRM_ANNOTATION}={}", r.id)),
            "{}",
            r.message()
        );
        // The same state gives the same id; a wrong id or another source does not confirm.
        let Admission::Refused(again) = guard.admit(&a, "active:12345", 50, Some("beef")) else {
            panic!()
        };
        assert_eq!(again.id, r.id);
        assert!(matches!(
            guard.admit(&a, "other:12345", 50, Some(&r.id)),
            Admission::Refused(_)
        ));
        // New mail at the source meanwhile: the pass deletes less, and the confirmation still covers it.
        let mut fewer = now.clone();
        fewer.insert("u0@example.com".into(), folders(&[("INBOX", 20, 100)]));
        let b = assess(&held, &fewer, 50);
        assert_eq!(
            guard.admit(&b, "active:12345", 50, Some(&r.id)),
            Admission::Confirmed(r.id.clone())
        );
        // More deleted than confirmed, or a folder replaced that the refusal did not name: refused anew.
        let more = assess(&held, &Mailboxes::new(), 50);
        assert!(
            matches!(guard.admit(&more, "active:12345", 50, Some(&r.id)), Admission::Refused(x) if x.id != r.id)
        );
        let mut replaced = now.clone();
        replaced.insert("u7@example.com".into(), folders(&[("INBOX", 20, 100)]));
        replaced.insert("u9@example.com".into(), folders(&[("INBOX", 20, 5)]));
        let c = assess(&held, &replaced, 50);
        assert_eq!(c.deleted, 160);
        assert!(matches!(
            guard.admit(&c, "active:12345", 50, Some(&r.id)),
            Admission::Refused(_)
        ));
        // Once a pass went through, an old confirmation confirms nothing.
        guard.passed(true);
        assert!(matches!(
            guard.admit(&a, "active:12345", 50, Some(&r.id)),
            Admission::Refused(_)
        ));
        // Within the limits, nothing to confirm.
        assert_eq!(
            guard.admit(&assess(&held, &held, 50), "active:12345", 50, None),
            Admission::Allowed
        );
    }

    #[test]
    fn a_wipe_over_several_passes_adds_up_within_the_window() {
        let users: Vec<String> = (0..10).map(|i| format!("u{i}@example.com")).collect();
        let none = BTreeMap::new();
        let t0 = Instant::now();
        let mut guard = Guard::default();
        let mut held = lun(10, 20);
        // Each pass the source has lost the mail of two more mailboxes: 20% at a time, allowed until the total passes
        // half of what the replica held.
        let mut verdicts = vec![];
        for step in 1..=4 {
            let mut source = lun(10, 20);
            for i in 0..2 * step {
                let inbox = source.get_mut(&format!("u{i}@example.com")).unwrap();
                inbox.get_mut("INBOX").unwrap().messages = 0;
            }
            let reference =
                guard.reference(&held, &users, &none, t0 + Duration::from_secs(step as u64));
            let a = assess(&reference, &source, 50);
            verdicts.push(a.allowed());
            if a.allowed() {
                held = source.clone(); // the pass mirrored it
            }
        }
        assert_eq!(verdicts, [true, true, false, false]);
        // Mail that comes and goes counts once: a POP3 user fetching and deleting 20 a time.
        let mut guard = Guard::default();
        let mut held = lun(10, 20);
        for step in 1..=6u64 {
            let mut source = held.clone();
            let inbox = source
                .get_mut("u0@example.com")
                .unwrap()
                .get_mut("INBOX")
                .unwrap();
            inbox.messages = if step % 2 == 0 { 20 } else { 0 };
            let a = assess(
                &guard.reference(&held, &users, &none, t0 + Duration::from_secs(step)),
                &source,
                50,
            );
            assert!(a.allowed() && a.deleted <= 20, "{a:?}");
            held = source;
        }
        // After the window, or a confirmed pass, the reference is what the replica holds now.
        let mut guard = Guard::default();
        let full = lun(10, 20);
        guard.reference(&full, &users, &none, t0);
        let half = lun(5, 20);
        let later = guard.reference(&half, &users, &none, t0 + WINDOW + Duration::from_secs(1));
        assert_eq!(later, half);
        guard.reference(&full, &users, &none, t0 + WINDOW + Duration::from_secs(2));
        guard.passed(true);
        assert_eq!(
            guard.reference(&half, &users, &none, t0 + WINDOW + Duration::from_secs(3)),
            half
        );
        // Mailboxes no longer on the LUN are dropped.
        assert_eq!(
            guard
                .reference(
                    &half,
                    &users[..2],
                    &none,
                    t0 + WINDOW + Duration::from_secs(4)
                )
                .len(),
            2
        );
    }

    #[test]
    fn an_address_taken_back_in_a_new_incarnation_starts_again() {
        let users: Vec<String> = (0..10).map(|i| format!("u{i}@example.com")).collect();
        let t0 = Instant::now();
        let mut guard = Guard::default();
        let held = lun(10, 20);
        guard.reference(&held, &users, &BTreeMap::new(), t0);
        // u0 was removed and taken back: on the source its new home holds one new INBOX; here the
        // previous owner's 20 messages are in the old home, which the pass does not list.
        let mut source = held.clone();
        source.insert(
            "u0@example.com".into(),
            folders(&[("INBOX", 0, 177), ("Sent", 0, 178)]),
        );
        let mut here = held.clone();
        here.remove("u0@example.com");
        let same = guard.reference(&here, &users, &BTreeMap::new(), t0 + Duration::from_secs(1));
        assert!(
            !assess(&same, &source, 50).allowed(),
            "in the same incarnation, a replaced mailbox is refused"
        );
        let taken_back = BTreeMap::from([("u0@example.com".to_string(), 1)]);
        let reference = guard.reference(&here, &users, &taken_back, t0 + Duration::from_secs(2));
        assert!(!reference.contains_key("u0@example.com"));
        let a = assess(&reference, &source, 50);
        assert!(a.allowed() && a.deleted == 0, "{a:?}");
        // The others keep their marks.
        assert_eq!(reference.len(), 9);
    }
}
