//! Lowering a LUN's `standbys` never removes the active replica. The StatefulSet removes the highest
//! ordinals, so while the active, a replica being promoted, or a demoted one still handing its mail over
//! has an ordinal the new count would remove, the store keeps its replicas; a settled active there is
//! first switched over to an in-sync standby below the new count (the demoted store hands over what
//! only it holds, and is kept until it reports itself in sync).

use std::time::Duration;

use super::failover::{choose_candidate, Decision, Note, Replica, Role, REASON_PROMOTING};
use crate::crd::StorageLUNStatus;

/// How soon to look again while a switchover waits for a standby that is ready and in sync.
const RETRY_SWITCHOVER: Duration = Duration::from_secs(10);

/// The ordinal of store pod `pod` of LUN `lun` (`corp-lun-0-2` -> 2).
pub fn ordinal(lun: &str, pod: &str) -> Option<i32> {
    pod.strip_prefix(lun)?.strip_prefix('-')?.parse().ok()
}

fn removed(lun: &str, name: Option<&str>, desired: i32) -> bool {
    name.and_then(|n| ordinal(lun, n))
        .is_some_and(|o| o >= desired)
}

/// The replica count the store StatefulSet may have now: `desired`, unless lowering the live count to
/// it would remove the active, the replica being promoted, or a demoted replica still handing over.
pub fn allowed_replicas(
    lun: &str,
    desired: i32,
    live: Option<i32>,
    status: &StorageLUNStatus,
) -> i32 {
    let Some(live) = live.filter(|l| *l > desired) else {
        return desired;
    };
    let busy = removed(lun, status.target_active.as_deref(), desired)
        || removed(lun, status.current_active.as_deref(), desired)
        || status
            .needs_resync
            .iter()
            .any(|n| removed(lun, Some(n), desired));
    if busy {
        live
    } else {
        desired
    }
}

/// While a lower count waits (`live > desired`) and the settled active's ordinal is one it removes,
/// decides a switchover to the most up-to-date in-sync standby below the new count. The old active must
/// resync (hand over) before it may serve again, and is kept until then.
pub fn switch_over(
    lun: &str,
    desired: i32,
    live: Option<i32>,
    d: &mut Decision,
    replicas: &[Replica],
) {
    if live.is_none_or(|l| l <= desired) || d.target_active != d.current_active {
        return;
    }
    let Some(active) = d.current_active.clone() else {
        return;
    };
    if !removed(lun, Some(&active), desired) || d.degraded.is_some() {
        return;
    }
    let below: Vec<Replica> = replicas
        .iter()
        .filter(|r| r.ordinal < desired && r.in_sync)
        .cloned()
        .collect();
    switch_to(d, &active, &below, replicas, |to| {
        format!("standbys lowered: switching over from {active} to {to} before {active} is removed")
    });
}

/// Switches `active` over to the most up-to-date of `candidates` (ready, not awaiting resync): the old
/// active must resync (hand over) before it may serve again. Without a candidate, looks again soon.
pub fn switch_to(
    d: &mut Decision,
    active: &str,
    candidates: &[Replica],
    replicas: &[Replica],
    why: impl FnOnce(&str) -> String,
) {
    let Some(c) = choose_candidate(candidates, &d.needs_resync, Some(active)).cloned() else {
        d.requeue_after = Some(
            d.requeue_after
                .map_or(RETRY_SWITCHOVER, |t| t.min(RETRY_SWITCHOVER)),
        );
        return;
    };
    d.target_active = Some(c.name.clone());
    if !d.needs_resync.iter().any(|n| n == active) {
        d.needs_resync.push(active.to_string());
    }
    d.roles.clear();
    for r in replicas {
        let want = if r.name == c.name {
            Role::Active
        } else {
            Role::Standby
        };
        if r.role != Some(want) {
            d.roles.insert(r.name.clone(), want);
        }
    }
    d.notes.push(Note {
        warning: false,
        reason: "Switchover",
        message: why(&c.name),
    });
    d.degraded = Some((
        REASON_PROMOTING,
        format!("switching over from {active} to {}", c.name),
    ));
    d.requeue_after = Some(Duration::from_secs(1));
}

#[cfg(test)]
mod tests {
    use super::*;

    const LUN: &str = "corp-lun-0";

    fn status(target: &str, current: &str, resync: &[&str]) -> StorageLUNStatus {
        StorageLUNStatus {
            target_active: Some(target.into()),
            current_active: Some(current.into()),
            needs_resync: resync.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn replica(ordinal: i32, role: Role, in_sync: bool, lag: f64) -> Replica {
        Replica {
            name: format!("{LUN}-{ordinal}"),
            ordinal,
            ready: true,
            role: Some(role),
            lag_seconds: Some(lag),
            in_sync,
            synced_at: None,
            passed_since_resync: false,
            updated: true,
            promotion: None,
        }
    }

    #[test]
    fn ordinals_are_read_from_pod_names() {
        assert_eq!(ordinal(LUN, "corp-lun-0-2"), Some(2));
        assert_eq!(ordinal(LUN, "corp-lun-01-2"), None);
        assert_eq!(ordinal(LUN, "other-0"), None);
    }

    #[test]
    fn the_store_keeps_its_replicas_while_the_active_or_a_hand_over_is_above_the_new_count() {
        let s = status("corp-lun-0-2", "corp-lun-0-2", &[]);
        assert_eq!(allowed_replicas(LUN, 2, Some(3), &s), 3);
        let s = status("corp-lun-0-0", "corp-lun-0-2", &[]);
        assert_eq!(allowed_replicas(LUN, 2, Some(3), &s), 3, "being promoted");
        let s = status("corp-lun-0-0", "corp-lun-0-0", &["corp-lun-0-2"]);
        assert_eq!(allowed_replicas(LUN, 2, Some(3), &s), 3, "handing over");
        let s = status("corp-lun-0-0", "corp-lun-0-0", &[]);
        assert_eq!(allowed_replicas(LUN, 2, Some(3), &s), 2);
        assert_eq!(
            allowed_replicas(LUN, 3, Some(2), &s),
            3,
            "raising is never held"
        );
        assert_eq!(allowed_replicas(LUN, 2, None, &s), 2);
    }

    #[test]
    fn a_settled_active_above_the_new_count_is_switched_over_to_an_in_sync_standby_below() {
        let replicas = [
            replica(0, Role::Standby, false, 0.1),
            replica(1, Role::Standby, true, 0.5),
            replica(2, Role::Active, false, 0.0),
        ];
        let mut d = Decision {
            target_active: Some("corp-lun-0-2".into()),
            current_active: Some("corp-lun-0-2".into()),
            ..Default::default()
        };
        switch_over(LUN, 2, Some(3), &mut d, &replicas);
        assert_eq!(d.target_active.as_deref(), Some("corp-lun-0-1"));
        assert_eq!(d.current_active.as_deref(), Some("corp-lun-0-2"));
        assert_eq!(d.needs_resync, ["corp-lun-0-2"]);
        assert_eq!(d.roles.get("corp-lun-0-1"), Some(&Role::Active));
        assert_eq!(d.roles.get("corp-lun-0-2"), Some(&Role::Standby));

        // No in-sync standby below: nothing moves, the store waits.
        let mut d = Decision {
            target_active: Some("corp-lun-0-2".into()),
            current_active: Some("corp-lun-0-2".into()),
            ..Default::default()
        };
        switch_over(LUN, 2, Some(3), &mut d, &replicas[..1]);
        assert_eq!(d.target_active.as_deref(), Some("corp-lun-0-2"));
        assert!(d.roles.is_empty());
    }
}
