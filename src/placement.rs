//! Placement of mailboxes onto StorageLUNs: deterministic and stable.
//!
//! A mailbox stays on the LUN it was placed on for as long as it exists; adding mailboxes never moves an
//! existing one and removing some never reshuffles the rest. New mailboxes (sorted, so the result does not
//! depend on input order) fill the lowest-indexed LUN with room; a new LUN is created only when every
//! existing one is full. The current placement is read back from the StorageLUNs themselves, so it survives
//! operator restarts and needs no other state.

use std::collections::{BTreeMap, BTreeSet};

/// Mailboxes on one LUN.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LunAssignment {
    pub index: u32,
    pub mailboxes: BTreeSet<String>,
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
    let mut placed: BTreeSet<&str> = BTreeSet::new();
    for lun in existing {
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
        .map(|(index, mailboxes)| LunAssignment { index, mailboxes })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

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
