//! A new store pod template (an operator upgrade, a changed spec) reaches the pods on the operator's
//! schedule, never all at once: the store StatefulSet's `updateStrategy` is `OnDelete`, so the StatefulSet
//! controller only creates missing pods, and this controller evicts outdated ones in this order:
//!
//! - **One LUN at a time.** The LUNs of a MailPod roll lowest index first: a LUN starts only once every
//!   LUN below it has all its pods on their template and ready. A template that never becomes ready stops
//!   the roll at the first LUN, with every other LUN still serving from its old pods.
//! - **Standbys first.** One outdated standby at a time, only while every other replica is ready and in
//!   sync and no promotion or hand-over is under way.
//! - **The active last, after a switchover.** Once only the active is outdated it is switched over to an
//!   updated, in-sync standby; the demoted replica hands over what only it holds (`needsResync`), and is
//!   replaced only after that, as a standby.
//! - A LUN with no standby restarts its only replica in place; its mail waits in the mx queue meanwhile.
//! - A fenced LUN (a standby site's) has no writer: its replicas are replaced one at a time like standbys.
//!
//! Pods are evicted (the Eviction API), never deleted: an eviction is the voluntary disruption the cluster
//! knows how to account for, and it needs no right to delete pods.

use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;

use super::failover::{Decision, Replica, REASON_FENCED};
use super::scale;

/// How soon to look again while a roll is under way.
pub const ROLL_POLL: Duration = Duration::from_secs(5);

/// What the roll does next for one LUN.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Every pod is on its template.
    Idle,
    /// Outdated pods remain, and the reason none is replaced now.
    Wait(String),
    /// Evict this pod; the StatefulSet recreates it from its template.
    Evict(String),
}

/// Whether a store StatefulSet has every pod on its current template and ready, as its controller last
/// reported: the gate for the LUNs above it.
pub fn rolled(sts: &StatefulSet) -> bool {
    let Some(status) = sts.status.as_ref() else {
        return false;
    };
    let replicas = sts.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let observed = status.observed_generation.unwrap_or(0) >= sts.metadata.generation.unwrap_or(0);
    observed
        && status.updated_replicas.unwrap_or(0) >= replicas
        && status.ready_replicas.unwrap_or(0) >= replicas
}

/// The LUN index in a store StatefulSet's (and LUN's) name, `corp-lun-3` -> 3.
pub fn lun_index(name: &str) -> Option<u32> {
    name.rsplit_once("-lun-")?.1.parse().ok()
}

fn serving(d: &Decision) -> Option<&str> {
    d.target_active.as_deref().or(d.current_active.as_deref())
}

/// Whether a roll may act now: its turn (`gate_open`), and the LUN settled (no promotion, switchover or
/// loss under way).
fn settled(d: &Decision, gate_open: bool) -> Result<(), String> {
    if !gate_open {
        return Err("a LUN with a lower index is still rolling".into());
    }
    // A fenced LUN (a standby site's) has no active and no writer: its replicas are all replaced like
    // standbys.
    let fenced = d.current_active.is_none()
        && d.target_active.is_none()
        && d.degraded
            .as_ref()
            .is_some_and(|(r, _)| *r == REASON_FENCED);
    if d.target_active != d.current_active || (d.degraded.is_some() && !fenced) {
        return Err("a promotion or switchover is under way".into());
    }
    Ok(())
}

/// The next step of the roll for a LUN whose failover decision is `d`, whose replicas are `replicas` and
/// whose StatefulSet runs `expected` of them.
pub fn next(d: &Decision, replicas: &[Replica], expected: usize, gate_open: bool) -> Step {
    if replicas.iter().all(|r| r.updated) {
        return Step::Idle;
    }
    if let Err(why) = settled(d, gate_open) {
        return Step::Wait(why);
    }
    // A replica being recreated has no pod for a moment: never mistake the LUN for a smaller one.
    if replicas.len() < expected {
        return Step::Wait("a replica is being recreated".into());
    }
    let active = serving(d);
    let standby = |r: &&Replica| Some(r.name.as_str()) != active;
    let resyncing = |r: &Replica| d.needs_resync.contains(&r.name);
    let outdated: Vec<&Replica> = replicas
        .iter()
        .filter(standby)
        .filter(|r| !r.updated)
        .collect();
    if replicas.iter().any(|r| !r.ready) {
        // One replica unavailable at a time: an outdated standby that is down already is replaced.
        return match outdated.iter().find(|r| !r.ready && !resyncing(r)) {
            Some(r) => Step::Evict(r.name.clone()),
            None => Step::Wait("a replica is not ready".into()),
        };
    }
    if let Some(r) = outdated
        .iter()
        .filter(|r| !resyncing(r))
        .max_by_key(|r| r.ordinal)
    {
        // The other standbys keep the LUN's copies while this one restarts.
        let others_in_sync = replicas
            .iter()
            .filter(standby)
            .filter(|o| o.name != r.name)
            .all(|o| o.in_sync);
        return if others_in_sync {
            Step::Evict(r.name.clone())
        } else {
            Step::Wait("waiting for the other standbys to be in sync".into())
        };
    }
    if !outdated.is_empty() {
        return Step::Wait("the demoted replica is handing its mail over".into());
    }
    // Only the active is outdated.
    match active {
        Some(a) if expected <= 1 => Step::Evict(a.to_string()),
        Some(_) => Step::Wait("switching over before the active is replaced".into()),
        None => Step::Wait("no replica serves yet".into()),
    }
}

/// Decides the switchover that lets the active be replaced last: when it is the only outdated replica of
/// all `expected`, the LUN is settled and an updated standby is ready and in sync.
pub fn switch_over(d: &mut Decision, replicas: &[Replica], expected: usize, gate_open: bool) {
    if settled(d, gate_open).is_err() || replicas.len() < expected {
        return;
    }
    let Some(active) = d.current_active.clone() else {
        return;
    };
    let only_active_outdated = replicas
        .iter()
        .all(|r| r.updated == (r.name != active) && r.ready);
    if !only_active_outdated || replicas.len() < 2 {
        return;
    }
    let candidates: Vec<Replica> = replicas
        .iter()
        .filter(|r| r.name != active && r.in_sync)
        .cloned()
        .collect();
    scale::switch_to(d, &active, &candidates, replicas, |to| {
        format!(
            "new pod template: switching over from {active} to {to} before {active} is replaced"
        )
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::lun::failover::Role;

    fn replica(ordinal: i32, updated: bool) -> Replica {
        Replica {
            name: format!("corp-lun-0-{ordinal}"),
            ordinal,
            ready: true,
            role: Some(if ordinal == 0 {
                Role::Active
            } else {
                Role::Standby
            }),
            lag_seconds: Some(0.1),
            in_sync: true,
            synced_at: None,
            passed_since_resync: false,
            promotion: None,
            updated,
        }
    }

    fn serving_0() -> Decision {
        Decision {
            target_active: Some("corp-lun-0-0".into()),
            current_active: Some("corp-lun-0-0".into()),
            ..Default::default()
        }
    }

    #[test]
    fn standbys_go_first_highest_ordinal_first_one_at_a_time() {
        let pods = vec![replica(0, false), replica(1, false), replica(2, false)];
        assert_eq!(
            next(&serving_0(), &pods, pods.len(), true),
            Step::Evict("corp-lun-0-2".into())
        );
        // Replica 2 restarting: nothing else goes.
        let mut pods = pods;
        pods[2].ready = false;
        pods[2].updated = true;
        assert!(matches!(
            next(&serving_0(), &pods, pods.len(), true),
            Step::Wait(_)
        ));
        // Back, but not yet in sync: replica 1 waits for it.
        pods[2].ready = true;
        pods[2].in_sync = false;
        assert!(matches!(
            next(&serving_0(), &pods, pods.len(), true),
            Step::Wait(_)
        ));
        pods[2].in_sync = true;
        assert_eq!(
            next(&serving_0(), &pods, pods.len(), true),
            Step::Evict("corp-lun-0-1".into())
        );
    }

    #[test]
    fn the_active_is_switched_over_never_evicted_while_a_standby_can_serve() {
        let pods = vec![replica(0, false), replica(1, true)];
        assert!(matches!(
            next(&serving_0(), &pods, pods.len(), true),
            Step::Wait(_)
        ));
        let mut d = serving_0();
        switch_over(&mut d, &pods, pods.len(), true);
        assert_eq!(d.target_active.as_deref(), Some("corp-lun-0-1"));
        assert_eq!(d.needs_resync, vec!["corp-lun-0-0".to_string()]);
        // While the switchover completes and the demoted replica hands over, nothing is evicted.
        assert!(matches!(next(&d, &pods, pods.len(), true), Step::Wait(_)));
        let handing_over = Decision {
            target_active: Some("corp-lun-0-1".into()),
            current_active: Some("corp-lun-0-1".into()),
            needs_resync: vec!["corp-lun-0-0".into()],
            ..Default::default()
        };
        assert!(matches!(
            next(&handing_over, &pods, pods.len(), true),
            Step::Wait(_)
        ));
        // Handed over: now a standby like any other, it is replaced.
        let done = Decision {
            needs_resync: vec![],
            ..handing_over
        };
        assert_eq!(
            next(&done, &pods, pods.len(), true),
            Step::Evict("corp-lun-0-0".into())
        );
    }

    #[test]
    fn no_switchover_to_a_standby_out_of_sync_or_while_standbys_are_outdated() {
        let mut pods = vec![replica(0, false), replica(1, true)];
        pods[1].in_sync = false;
        let mut d = serving_0();
        switch_over(&mut d, &pods, pods.len(), true);
        assert_eq!(d.target_active.as_deref(), Some("corp-lun-0-0"));
        let pods = vec![replica(0, false), replica(1, false)];
        let mut d = serving_0();
        switch_over(&mut d, &pods, pods.len(), true);
        assert_eq!(d.target_active.as_deref(), Some("corp-lun-0-0"));
    }

    #[test]
    fn a_closed_gate_or_a_loss_under_way_waits() {
        let pods = vec![replica(0, false), replica(1, false)];
        assert!(matches!(
            next(&serving_0(), &pods, pods.len(), false),
            Step::Wait(_)
        ));
        let mut d = serving_0();
        d.degraded = Some(("ActiveUnready", "x".into()));
        assert!(matches!(next(&d, &pods, pods.len(), true), Step::Wait(_)));
        let mut d = serving_0();
        switch_over(&mut d, &[replica(0, false), replica(1, true)], 2, false);
        assert_eq!(d.target_active.as_deref(), Some("corp-lun-0-0"));
    }

    #[test]
    fn a_single_replica_restarts_in_place_and_an_updated_lun_is_idle() {
        assert_eq!(
            next(&serving_0(), &[replica(0, false)], 1, true),
            Step::Evict("corp-lun-0-0".into())
        );
        assert_eq!(
            next(&serving_0(), &[replica(0, true), replica(1, true)], 2, true),
            Step::Idle
        );
    }

    /// Found on the real cluster: while the evicted standby is recreated it has no pod, and the LUN must
    /// not look like a one-replica LUN whose active restarts in place.
    #[test]
    fn a_replica_being_recreated_is_waited_for_never_taken_for_a_smaller_lun() {
        let pods = vec![replica(0, false)];
        assert!(matches!(next(&serving_0(), &pods, 2, true), Step::Wait(_)));
        let mut d = serving_0();
        switch_over(&mut d, &[replica(0, false), replica(1, true)], 3, true);
        assert_eq!(d.target_active.as_deref(), Some("corp-lun-0-0"));
    }

    #[test]
    fn a_fenced_lun_replaces_its_replicas_one_at_a_time() {
        let fenced = Decision {
            degraded: Some((REASON_FENCED, "fenced".into())),
            ..Default::default()
        };
        let pods = vec![replica(0, false), replica(1, false)];
        assert_eq!(
            next(&fenced, &pods, 2, true),
            Step::Evict("corp-lun-0-1".into())
        );
        let mut pods = pods;
        pods[1].updated = true;
        pods[1].ready = false;
        assert!(matches!(next(&fenced, &pods, 2, true), Step::Wait(_)));
        pods[1].ready = true;
        assert_eq!(
            next(&fenced, &pods, 2, true),
            Step::Evict("corp-lun-0-0".into())
        );
    }

    #[test]
    fn lun_index_is_read_from_the_name() {
        assert_eq!(lun_index("corp-lun-3"), Some(3));
        assert_eq!(lun_index("my-lun-app-lun-12"), Some(12));
        assert_eq!(lun_index("corp"), None);
    }
}
