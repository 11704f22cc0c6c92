use super::*;
use crate::crd::StorageLUN;

fn spec() -> StorageLUNSpec {
    let lun: StorageLUN = serde_json::from_value(serde_json::json!({
        "apiVersion": "mailpod.io/v1alpha1", "kind": "StorageLUN",
        "metadata": {"name": "corp-lun-0"},
        "spec": {"mailPod": "corp", "index": 0, "capacity": "1Gi", "standbys": 2,
                 "failoverThresholdSeconds": 30}
    }))
    .unwrap();
    lun.spec
}

fn t(s: i64) -> Timestamp {
    Timestamp::from_second(1_700_000_000 + s).unwrap()
}

fn replica(ordinal: i32, ready: bool, role: Option<Role>) -> Replica {
    Replica {
        name: format!("corp-lun-0-{ordinal}"),
        ordinal,
        ready,
        role,
        lag_seconds: None,
        in_sync: false,
        synced_at: None,
        passed_since_resync: false,
        updated: true,
        promotion: None,
    }
}

/// [`super::decide`] as the controller calls it when it first saw the serving replica lost at `t(0)`.
fn decide(
    spec: &StorageLUNSpec,
    status: &StorageLUNStatus,
    pods: &[Replica],
    now: Timestamp,
) -> Decision {
    let lost_since = lost_serving(spec, status, pods).map(|_| t(0));
    super::decide(spec, status, pods, lost_since, now)
}

fn serving(current: &str) -> StorageLUNStatus {
    StorageLUNStatus {
        target_active: Some(current.into()),
        current_active: Some(current.into()),
        ..Default::default()
    }
}

#[test]
fn initial_election_picks_ordinal_zero_then_confirms_in_a_second_step() {
    let pods = vec![replica(0, true, None), replica(1, true, None)];
    let d = decide(&spec(), &StorageLUNStatus::default(), &pods, t(0));
    assert_eq!(d.target_active.as_deref(), Some("corp-lun-0-0"));
    assert_eq!(d.current_active, None);
    assert_eq!(d.roles["corp-lun-0-0"], Role::Active);
    assert_eq!(d.roles["corp-lun-0-1"], Role::Standby);

    let status = StorageLUNStatus {
        target_active: d.target_active.clone(),
        ..Default::default()
    };
    let pods = vec![
        replica(0, true, Some(Role::Active)),
        replica(1, true, Some(Role::Standby)),
    ];
    let d = decide(&spec(), &status, &pods, t(1));
    assert_eq!(d.current_active.as_deref(), Some("corp-lun-0-0"));
    assert!(d.roles.is_empty());
    assert_eq!(
        d.last_promotion, None,
        "a first election is not a promotion"
    );
    assert_eq!(d.degraded, None);
}

#[test]
fn initial_election_skips_an_unready_ordinal_zero() {
    let pods = vec![replica(0, false, None), replica(1, true, None)];
    let d = decide(&spec(), &StorageLUNStatus::default(), &pods, t(0));
    assert_eq!(d.target_active.as_deref(), Some("corp-lun-0-1"));
}

#[test]
fn no_promotion_before_the_threshold() {
    let pods = vec![
        replica(0, false, Some(Role::Active)),
        replica(1, true, Some(Role::Standby)),
    ];
    let d = decide(&spec(), &serving("corp-lun-0-0"), &pods, t(29));
    assert_eq!(d.target_active.as_deref(), Some("corp-lun-0-0"));
    assert!(d.roles.is_empty());
    assert_eq!(d.degraded.as_ref().unwrap().0, REASON_ACTIVE_UNREADY);
    assert!(d.requeue_after.unwrap() <= Duration::from_secs(1));
    assert!(d.needs_resync.is_empty());
}

#[test]
fn promotes_the_least_lagging_standby_after_the_threshold_in_two_steps() {
    let mut a = replica(1, true, Some(Role::Standby));
    a.lag_seconds = Some(4.0);
    let mut b = replica(2, true, Some(Role::Standby));
    b.lag_seconds = Some(0.5);
    let pods = vec![replica(0, false, Some(Role::Active)), a, b];
    let d = decide(&spec(), &serving("corp-lun-0-0"), &pods, t(31));
    assert_eq!(d.target_active.as_deref(), Some("corp-lun-0-2"));
    assert_eq!(
        d.current_active.as_deref(),
        Some("corp-lun-0-0"),
        "step one records only the target"
    );
    assert_eq!(d.roles["corp-lun-0-2"], Role::Active);
    assert_eq!(d.roles["corp-lun-0-0"], Role::Standby);
    assert_eq!(d.needs_resync, vec!["corp-lun-0-0".to_string()]);
    let (to, mark) = d.mark.clone().unwrap();
    assert_eq!(
        (to.as_str(), mark.from.as_str(), mark.lost_at),
        ("corp-lun-0-2", "corp-lun-0-0", t(0))
    );
    assert!(d.notes.iter().any(|n| n.reason == "Failover" && n.warning));

    // Second step: the promoted pod is ready and labelled.
    let status = StorageLUNStatus {
        target_active: d.target_active.clone(),
        current_active: d.current_active.clone(),
        needs_resync: d.needs_resync.clone(),
        ..Default::default()
    };
    let mut promoted = replica(2, true, Some(Role::Active));
    promoted.promotion = Some(mark);
    let pods = vec![
        replica(0, false, Some(Role::Standby)),
        replica(1, true, Some(Role::Standby)),
        promoted,
    ];
    let d = decide(&spec(), &status, &pods, t(33));
    assert_eq!(d.current_active.as_deref(), Some("corp-lun-0-2"));
    let p = d.last_promotion.unwrap();
    assert_eq!(
        (p.from.as_str(), p.to.as_str(), p.seconds),
        ("corp-lun-0-0", "corp-lun-0-2", 33.0)
    );
    assert_eq!(d.degraded, None);
}

#[test]
fn ties_in_lag_go_to_the_lowest_ordinal_and_unknown_lag_ranks_last() {
    let mut r2 = replica(2, true, Some(Role::Standby));
    r2.lag_seconds = Some(1.0);
    let mut r3 = replica(3, true, Some(Role::Standby));
    r3.lag_seconds = Some(1.0);
    let pods = vec![replica(1, true, Some(Role::Standby)), r3, r2];
    assert_eq!(choose_candidate(&pods, &[], None).unwrap().ordinal, 2);
}

#[test]
fn a_replica_awaiting_resync_is_never_promoted_until_it_reports_sync() {
    let mut status = serving("corp-lun-0-1");
    status.needs_resync = vec!["corp-lun-0-0".into()];
    status.last_promotion = Some(Promotion {
        from: "corp-lun-0-0".into(),
        to: "corp-lun-0-1".into(),
        lost_at: Time(t(0)),
        promoted_at: Time(t(30)),
        seconds: 30.0,
    });
    let mut old = replica(0, true, Some(Role::Standby));
    old.lag_seconds = Some(0.0);
    // A pass that finished before this process began watching its resync does not count.
    old.in_sync = true;
    old.synced_at = Some(t(20));
    old.passed_since_resync = false;
    let mut pods = vec![old, replica(1, false, Some(Role::Active))];
    let d = decide(&spec(), &status, &pods, t(200));
    assert_eq!(
        d.target_active.as_deref(),
        Some("corp-lun-0-1"),
        "nothing else may serve"
    );
    assert_eq!(d.degraded.as_ref().unwrap().0, REASON_NO_STANDBY);
    assert!(d
        .roles
        .get("corp-lun-0-0")
        .is_none_or(|r| *r == Role::Standby));
    assert_eq!(d.needs_resync, vec!["corp-lun-0-0".to_string()]);

    // Once it reports a sync pass after the promotion, it is cleared and may take over.
    pods[0].synced_at = Some(t(40));
    pods[0].passed_since_resync = true;
    let d = decide(&spec(), &status, &pods, t(200));
    assert!(d.needs_resync.contains(&"corp-lun-0-1".to_string()));
    assert!(!d.needs_resync.contains(&"corp-lun-0-0".to_string()));
    assert_eq!(d.target_active.as_deref(), Some("corp-lun-0-0"));
}

#[test]
fn a_serving_replica_whose_pod_is_gone_is_lost_and_replaced_after_the_threshold() {
    let status = serving("corp-lun-0-0");
    let pods = vec![replica(1, true, Some(Role::Standby))];
    assert_eq!(lost_serving(&spec(), &status, &pods), Some("corp-lun-0-0"));
    let d = decide(&spec(), &status, &pods, t(10));
    assert_eq!(
        d.target_active.as_deref(),
        Some("corp-lun-0-0"),
        "10s < threshold"
    );
    let d = decide(&spec(), &status, &pods, t(31));
    assert_eq!(d.target_active.as_deref(), Some("corp-lun-0-1"));
    assert_eq!(d.mark.unwrap().1.lost_at, t(0));
}

#[test]
fn the_threshold_counts_from_the_loss_this_process_saw() {
    let status = serving("corp-lun-0-0");
    let pods = vec![
        replica(0, false, Some(Role::Active)),
        replica(1, true, Some(Role::Standby)),
    ];
    // Seen lost 5 s ago, whatever any other clock says: no promotion yet.
    let d = super::decide(&spec(), &status, &pods, Some(t(95)), t(100));
    assert_eq!(d.target_active.as_deref(), Some("corp-lun-0-0"));
    assert_eq!(d.degraded.as_ref().unwrap().0, REASON_ACTIVE_UNREADY);
    let d = super::decide(&spec(), &status, &pods, Some(t(95)), t(126));
    assert_eq!(d.target_active.as_deref(), Some("corp-lun-0-1"));
}

#[test]
fn fenced_lun_has_no_active_replica() {
    let pods = vec![
        replica(0, true, Some(Role::Active)),
        replica(1, true, Some(Role::Standby)),
    ];
    let mut s = spec();
    s.fenced = true;
    let d = decide(&s, &serving("corp-lun-0-0"), &pods, t(0));
    assert_eq!(d.current_active, None);
    assert_eq!(d.target_active, None);
    assert_eq!(d.roles.len(), 1);
    assert_eq!(d.roles["corp-lun-0-0"], Role::Standby);
    assert_eq!(d.degraded.unwrap().0, REASON_FENCED);
}

#[test]
fn steady_state_changes_nothing() {
    let pods = vec![
        replica(0, true, Some(Role::Active)),
        replica(1, true, Some(Role::Standby)),
    ];
    let status = serving("corp-lun-0-0");
    let d = decide(&spec(), &status, &pods, t(0));
    assert!(d.roles.is_empty() && d.notes.is_empty() && d.mark.is_none());
    assert_eq!(d.requeue_after, None);
    assert_eq!(d.current_active, status.current_active);
}

#[test]
fn a_recreated_active_pod_without_labels_gets_its_label_back() {
    let pods = vec![
        replica(0, true, None),
        replica(1, true, Some(Role::Standby)),
    ];
    let d = decide(&spec(), &serving("corp-lun-0-0"), &pods, t(0));
    assert_eq!(d.roles["corp-lun-0-0"], Role::Active);
    assert_eq!(d.current_active.as_deref(), Some("corp-lun-0-0"));
}
