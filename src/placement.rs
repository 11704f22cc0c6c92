//! Placement of mailboxes onto StorageLUNs: deterministic and stable.
//!
//! A mailbox stays on the LUN it was placed on for as long as it exists; adding mailboxes never moves an
//! existing one and removing some never reshuffles the rest. New mailboxes (sorted, so the result does not
//! depend on input order) fill the lowest-indexed LUN with room; a new LUN is created only when every
//! existing one is full. The current placement is read back from the StorageLUNs themselves, so it survives
//! operator restarts and needs no other state.
//!
//! A removed mailbox's Maildir stays on its LUN's volumes, so each LUN also remembers (in the
//! [`REMOVED_MAILBOXES`] annotation, at most [`REMEMBERED_PER_LUN`], newest last) the mailboxes that left
//! it; one that comes back returns to that LUN when it has room.
//!
//! An address that comes back is not given the Maildir it left: the address may now belong to somebody
//! else. Each LUN records (in the [`MAILBOX_INCARNATIONS`] annotation) an incarnation for every address it
//! took back, and the stores give incarnation `n` a home of its own
//! ([`crate::mailconfig::layout::home`]), so the previous owner's mail, sieve scripts and vacation replies
//! stay where they were, on the volume, and the new owner starts empty.

use std::collections::{BTreeMap, BTreeSet};

/// Mailboxes on one LUN.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LunAssignment {
    pub index: u32,
    pub mailboxes: BTreeSet<String>,
    /// Mailbox -> its incarnation on this LUN, for mailboxes taken back after a removal (1, 2, ...);
    /// absent: the first, whose home is where it always was.
    pub incarnations: BTreeMap<String, u32>,
}

/// Places `wanted` onto LUNs of at most `max_users`, keeping every mailbox of `existing` where it is.
///
/// LUNs left empty keep their slot in the result (with no mailboxes) only while an existing LUN with a
/// higher index still holds mail, so indices never shift; trailing empty LUNs are dropped.
/// A LUN that already holds more than `max_users` (the limit was lowered) keeps its mailboxes and takes no
/// new ones: nobody moves unless asked.
pub fn place(
    existing: &[LunAssignment],
    wanted: &BTreeSet<String>,
    max_users: u32,
) -> Vec<LunAssignment> {
    let max = max_users as usize;
    let mut luns: BTreeMap<u32, BTreeSet<String>> = BTreeMap::new();
    let mut incarnations: BTreeMap<u32, BTreeMap<String, u32>> = BTreeMap::new();
    let mut placed: BTreeSet<&str> = BTreeSet::new();
    for lun in existing {
        let carried: BTreeMap<String, u32> = lun
            .incarnations
            .iter()
            .filter(|(m, n)| {
                **n > 0
                    && wanted.contains(*m)
                    && lun.mailboxes.contains(*m)
                    && !placed.contains(m.as_str())
            })
            .map(|(m, n)| (m.clone(), *n))
            .collect();
        if !carried.is_empty() {
            incarnations.entry(lun.index).or_default().extend(carried);
        }
        let kept: BTreeSet<String> = lun
            .mailboxes
            .iter()
            .filter(|m| wanted.contains(*m) && !placed.contains(m.as_str()))
            .cloned()
            .collect();
        placed.extend(
            lun.mailboxes
                .iter()
                .filter(|m| wanted.contains(*m))
                .map(String::as_str),
        );
        luns.entry(lun.index).or_default().extend(kept);
    }
    let mut new = wanted
        .iter()
        .filter(|m| !placed.contains(m.as_str()))
        .peekable();
    let mut index = 0u32;
    while new.peek().is_some() {
        let lun = luns.entry(index).or_default();
        while lun.len() < max {
            match new.next() {
                Some(m) => {
                    lun.insert(m.clone());
                }
                None => break,
            }
        }
        index += 1;
    }
    while luns.last_key_value().is_some_and(|(_, m)| m.is_empty()) {
        luns.pop_last();
    }
    luns.into_iter()
        .map(|(index, mailboxes)| LunAssignment {
            index,
            mailboxes,
            incarnations: incarnations.remove(&index).unwrap_or_default(),
        })
        .collect()
}

/// Annotation on a StorageLUN: the mailboxes removed from it whose mail it still holds, a JSON array.
pub const REMOVED_MAILBOXES: &str = "mailpod.io/removed-mailboxes";

/// How many removed mailboxes one LUN remembers (about 30 KiB of annotation for typical addresses).
pub const REMEMBERED_PER_LUN: usize = 1000;

/// The removed mailboxes a LUN remembers, from its annotation's value (nothing when unreadable).
pub fn parse_remembered(annotation: Option<&str>) -> Vec<String> {
    annotation
        .and_then(|a| serde_json::from_str(a).ok())
        .unwrap_or_default()
}

/// The annotation's value for `remembered`, `None` when there is nothing to remember.
pub fn format_remembered(remembered: &[String]) -> Option<String> {
    (!remembered.is_empty())
        .then(|| serde_json::to_string(remembered).expect("a list of strings serialises"))
}

/// Annotation on a StorageLUN: the incarnation of each address it took back after a removal, a JSON
/// object (`{"ann@example.com": 1}`), for the addresses it holds and those it remembers as removed.
pub const MAILBOX_INCARNATIONS: &str = "mailpod.io/mailbox-incarnations";

/// The incarnations a LUN records, from its annotation's value. An unreadable value is an error: reading
/// it as empty would give a returning address its previous owner's Maildir.
pub fn parse_incarnations(annotation: Option<&str>) -> Result<BTreeMap<String, u32>, String> {
    match annotation {
        None => Ok(BTreeMap::new()),
        Some(a) => serde_json::from_str(a).map_err(|e| {
            format!(
                "annotation {MAILBOX_INCARNATIONS} is not a JSON object of address: number ({e})"
            )
        }),
    }
}

/// The annotation's value for `incarnations`, `None` when there is nothing to record.
pub fn format_incarnations(incarnations: &BTreeMap<String, u32>) -> Option<String> {
    (!incarnations.is_empty())
        .then(|| serde_json::to_string(incarnations).expect("a map of numbers serialises"))
}

/// What each LUN records after a placement: the incarnations of the mailboxes `after` places on it, and
/// those `known` before of the mailboxes it still remembers as removed (`memory`), so that the next return
/// counts on from there.
pub fn record_incarnations(
    after: &[LunAssignment],
    known: &BTreeMap<u32, BTreeMap<String, u32>>,
    memory: &BTreeMap<u32, Vec<String>>,
) -> BTreeMap<u32, BTreeMap<String, u32>> {
    let mut out: BTreeMap<u32, BTreeMap<String, u32>> = BTreeMap::new();
    for (index, removed) in memory {
        if let Some(k) = known.get(index) {
            for m in removed {
                if let Some(n) = k.get(m) {
                    out.entry(*index).or_default().insert(m.clone(), *n);
                }
            }
        }
    }
    for a in after {
        if !a.incarnations.is_empty() {
            out.entry(a.index)
                .or_default()
                .extend(a.incarnations.iter().map(|(m, n)| (m.clone(), *n)));
        }
    }
    out
}

/// Puts each mailbox of `wanted` that no LUN holds but one remembers back on that LUN, while it has room
/// under `max_users`, so that [`place`] keeps it there, as its next incarnation there (one more than
/// `known` records): a new home, never the Maildir it left. When several LUNs remember it, the lowest with
/// room takes it.
pub fn return_remembered(
    existing: &mut [LunAssignment],
    remembered: &BTreeMap<u32, Vec<String>>,
    known: &BTreeMap<u32, BTreeMap<String, u32>>,
    wanted: &BTreeSet<String>,
    max_users: u32,
) {
    let placed: BTreeSet<String> = existing
        .iter()
        .flat_map(|a| a.mailboxes.iter().cloned())
        .collect();
    let mut returned: BTreeSet<String> = BTreeSet::new();
    for lun in existing.iter_mut() {
        let Some(names) = remembered.get(&lun.index) else {
            continue;
        };
        let mut back: Vec<&String> = names
            .iter()
            .filter(|m| wanted.contains(*m) && !placed.contains(*m) && !returned.contains(*m))
            .collect();
        back.sort();
        for m in back {
            if lun.mailboxes.len() >= max_users as usize {
                break;
            }
            let previous = known
                .get(&lun.index)
                .and_then(|k| k.get(m))
                .copied()
                .unwrap_or(0);
            lun.mailboxes.insert(m.clone());
            lun.incarnations.insert(m.clone(), previous + 1);
            returned.insert(m.clone());
        }
    }
}

/// What each LUN remembers after one placement: what it remembered before and the mailboxes that left
/// it between `before` and `after`, less every mailbox `after` places anywhere (its mail goes with it, or
/// it starts anew elsewhere), newest last and at most [`REMEMBERED_PER_LUN`]. LUNs `after` drops (emptied
/// on their way out) are included.
pub fn remember_removed(
    before: &[LunAssignment],
    remembered: &BTreeMap<u32, Vec<String>>,
    after: &[LunAssignment],
) -> BTreeMap<u32, Vec<String>> {
    let placed: BTreeSet<&str> = after
        .iter()
        .flat_map(|a| a.mailboxes.iter().map(String::as_str))
        .collect();
    let mut out: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    let indices: BTreeSet<u32> = before
        .iter()
        .map(|a| a.index)
        .chain(after.iter().map(|a| a.index))
        .chain(remembered.keys().copied())
        .collect();
    for index in indices {
        let mut list: Vec<String> = remembered
            .get(&index)
            .into_iter()
            .flatten()
            .filter(|m| !placed.contains(m.as_str()))
            .cloned()
            .collect();
        let left = before
            .iter()
            .filter(|a| a.index == index)
            .flat_map(|a| a.mailboxes.iter())
            .filter(|m| !placed.contains(m.as_str()));
        for m in left {
            list.retain(|r| r != m);
            list.push(m.clone());
        }
        if list.len() > REMEMBERED_PER_LUN {
            list.drain(..list.len() - REMEMBERED_PER_LUN);
        }
        if !list.is_empty() {
            out.insert(index, list);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_removed_and_re_added_mailbox_returns_to_its_lun() {
        let first = place(&[], &names(0..12), 4);
        let moved = "user00005@example.com".to_string();
        assert_eq!(where_is(&first)[&moved], 1);
        // user00005 is removed from LUN 1.
        let without: BTreeSet<String> = names(0..12).into_iter().filter(|m| *m != moved).collect();
        let second = place(&first, &without, 4);
        let memory = remember_removed(&first, &BTreeMap::new(), &second);
        assert_eq!(memory.get(&1), Some(&vec![moved.clone()]));
        // Then LUN 0 loses one too, so the lowest LUN with room is no longer where its mail is.
        let mut third_wanted = without.clone();
        third_wanted.remove("user00002@example.com");
        let third = place(&second, &third_wanted, 4);
        let memory = remember_removed(&second, &memory, &third);
        let mut wanted = third_wanted.clone();
        wanted.insert(moved.clone());
        assert_eq!(
            where_is(&place(&third, &wanted, 4))[&moved],
            0,
            "without memory it would start empty on LUN 0"
        );
        let mut back = third.clone();
        return_remembered(&mut back, &memory, &BTreeMap::new(), &wanted, 4);
        let fourth = place(&back, &wanted, 4);
        assert_eq!(where_is(&fourth)[&moved], 1, "back on the LUN it left");
        assert_eq!(
            fourth[1].incarnations.get(&moved),
            Some(&1),
            "as a new incarnation, not with the Maildir it left"
        );
        let memory = remember_removed(&third, &memory, &fourth);
        assert_eq!(memory.get(&1), None, "placed again: forgotten");
        assert_eq!(
            memory.get(&0),
            Some(&vec!["user00002@example.com".to_string()])
        );
    }

    #[test]
    fn memory_is_bounded_and_keeps_the_newest() {
        let first = place(&[], &names(0..1500), 2000);
        let second = place(&first, &BTreeSet::new(), 2000);
        let memory = remember_removed(&first, &BTreeMap::new(), &second);
        let list = &memory[&0];
        assert_eq!(list.len(), REMEMBERED_PER_LUN);
        let again = remember_removed(&second, &memory, &second);
        assert_eq!(&again[&0], list, "nothing new: unchanged");
        let text = format_remembered(list).unwrap();
        assert_eq!(&parse_remembered(Some(&text)), list);
        assert!(parse_remembered(Some("not json")).is_empty());
    }

    #[test]
    fn a_full_lun_takes_no_returning_mailbox() {
        let first = place(&[], &names(0..4), 4);
        let mut memory = BTreeMap::new();
        memory.insert(0, vec!["back@example.com".to_string()]);
        let mut existing = first.clone();
        let mut wanted = names(0..4);
        wanted.insert("back@example.com".into());
        return_remembered(&mut existing, &memory, &BTreeMap::new(), &wanted, 4);
        assert_eq!(existing, first);
    }

    #[test]
    fn each_return_is_a_new_incarnation_and_placement_keeps_it() {
        let ann = "ann@example.com".to_string();
        let mut wanted = names(0..3);
        wanted.insert(ann.clone());
        let mut luns = place(&[], &wanted, 10);
        let mut known: BTreeMap<u32, BTreeMap<String, u32>> = BTreeMap::new();
        let mut memory: BTreeMap<u32, Vec<String>> = BTreeMap::new();
        for round in 1..=3u32 {
            // Removed: remembered, with the incarnation it had.
            let mut without = wanted.clone();
            without.remove(&ann);
            let removed = place(&luns, &without, 10);
            memory = remember_removed(&luns, &memory, &removed);
            known = record_incarnations(&removed, &known, &memory);
            assert!(removed[0].incarnations.is_empty());
            if round > 1 {
                assert_eq!(known[&0][&ann], round - 1, "kept while remembered");
            }
            // Added again: the next incarnation.
            let mut back = removed.clone();
            return_remembered(&mut back, &memory, &known, &wanted, 10);
            luns = place(&back, &wanted, 10);
            memory = remember_removed(&removed, &memory, &luns);
            known = record_incarnations(&luns, &known, &memory);
            assert_eq!(luns[0].incarnations[&ann], round);
            // A pass that changes nothing keeps it; other mailboxes have none.
            let again = place(&luns, &wanted, 10);
            assert_eq!(again, luns);
            assert_eq!(again[0].incarnations.len(), 1);
        }
        let text = format_incarnations(&known[&0]).unwrap();
        assert_eq!(text, r#"{"ann@example.com":3}"#);
        assert_eq!(parse_incarnations(Some(&text)).unwrap(), known[&0]);
        let err = parse_incarnations(Some("[1]")).unwrap_err();
        assert!(err.contains(MAILBOX_INCARNATIONS), "{err}");
        // Forgotten by the LUN once it is placed nowhere and no longer remembered.
        assert!(record_incarnations(&[], &known, &BTreeMap::new()).is_empty());
    }

    fn names(range: std::ops::Range<u32>) -> BTreeSet<String> {
        range.map(|i| format!("user{i:05}@example.com")).collect()
    }

    fn where_is(luns: &[LunAssignment]) -> BTreeMap<String, u32> {
        luns.iter()
            .flat_map(|l| l.mailboxes.iter().map(move |m| (m.clone(), l.index)))
            .collect()
    }

    #[test]
    fn fills_luns_in_order() {
        let luns = place(&[], &names(0..2500), 1000);
        let sizes: Vec<usize> = luns.iter().map(|l| l.mailboxes.len()).collect();
        assert_eq!(sizes, vec![1000, 1000, 500]);
        assert_eq!(
            luns.iter().map(|l| l.index).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
    }

    #[test]
    fn adding_never_moves_and_removing_never_reshuffles() {
        let first = place(&[], &names(0..2500), 1000);
        let before = where_is(&first);
        // Remove 300 from LUN 0, add 1000 new ones.
        let mut wanted = names(300..2500);
        wanted.extend(names(10_000..11_000));
        let second = place(&first, &wanted, 1000);
        let after = where_is(&second);
        for (m, idx) in &after {
            if let Some(old) = before.get(m) {
                assert_eq!(old, idx, "{m} moved");
            }
        }
        assert_eq!(after.len(), wanted.len());
        assert!(second.iter().all(|l| l.mailboxes.len() <= 1000));
        // The 300 freed slots on LUN 0 and the 500 on LUN 2 are filled before a new LUN takes the rest.
        let sizes: Vec<usize> = second.iter().map(|l| l.mailboxes.len()).collect();
        assert_eq!(sizes, vec![1000, 1000, 1000, 200]);
        // Same input, same output.
        assert_eq!(place(&second, &wanted, 1000), second);
    }

    #[test]
    fn order_of_input_does_not_matter_and_empty_tail_goes() {
        let a = place(&[], &names(0..10), 4);
        let b = place(&[], &names(0..10).into_iter().rev().collect(), 4);
        assert_eq!(a, b);
        let shrunk = place(&a, &names(0..3), 4);
        assert_eq!(shrunk.len(), 1);
    }

    #[test]
    fn emptied_middle_lun_keeps_its_index() {
        let a = place(&[], &names(0..12), 4);
        let wanted: BTreeSet<String> = names(0..4).into_iter().chain(names(8..12)).collect();
        let b = place(&a, &wanted, 4);
        assert_eq!(
            b.iter()
                .map(|l| (l.index, l.mailboxes.len()))
                .collect::<Vec<_>>(),
            vec![(0, 4), (1, 0), (2, 4)]
        );
    }

    #[test]
    fn lowered_limit_moves_nobody() {
        let a = place(&[], &names(0..10), 10);
        let b = place(&a, &names(0..12), 4);
        assert_eq!(b[0].mailboxes.len(), 10);
        assert_eq!(b[1].mailboxes.len(), 2);
    }
}
