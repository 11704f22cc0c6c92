use super::*;
use crate::crd::{Detection, FailoverPolicy, KeyRef, PeerSite, Targets};

fn spec(local: &str) -> SiteFailoverSpec {
    let peer = if local == "east" { "west" } else { "east" };
    SiteFailoverSpec {
        mail_pods: vec!["corp".into()],
        local_site: local.into(),
        peer: PeerSite {
            name: peer.into(),
            kubeconfig_secret: KeyRef {
                name: "peer".into(),
                key: "kubeconfig".into(),
            },
            namespace: None,
        },
        primary_site: "east".into(),
        detection: Detection {
            probe_interval_seconds: 5,
            failure_threshold: 3,
            probe_timeout_seconds: 2,
        },
        // The machine's logic without a witness; a spec needs automaticFailoverWithoutWitness for it.
        policy: FailoverPolicy {
            automatic_failover: Some(true),
            automatic_failover_without_witness: true,
            automatic_failback: false,
        },
        targets: Targets::default(),
        dns: vec![],
        witness: None,
    }
}

fn with_witness(local: &str) -> SiteFailoverSpec {
    let mut s = spec(local);
    s.witness = Some(crate::crd::Witness {
        kubeconfig_secret: KeyRef {
            name: "witness".into(),
            key: "kubeconfig".into(),
        },
        namespace: None,
        lease_name: None,
        lease_duration_seconds: 20,
    });
    s
}

fn lease(holder: Option<&str>, epoch: i64, renewed_at: Option<i64>, lapsed: bool) -> WitnessView {
    WitnessView {
        reachable: true,
        holder: holder.map(str::to_string),
        epoch,
        renewed_at: renewed_at.map(t),
        lapsed,
        foreign: None,
        exists: true,
    }
}

fn t(secs: i64) -> Timestamp {
    Timestamp::from_second(1_700_000_000 + secs).unwrap()
}

fn peer(epoch: i64, active: &str) -> Option<PeerView> {
    Some(PeerView {
        epoch,
        active_site: Some(active.into()),
        probe_failures: 0,
    })
}

fn obs(now: i64, peer: Option<PeerView>, frontend_ok: Option<bool>) -> Observation {
    Observation {
        now: t(now),
        peer_read_at: t(now),
        peer,
        frontend_ok,
        tables: vec![TableHashes {
            mail_pod: "corp".into(),
            local: Some("h1".into()),
            peer: Some("h1".into()),
        }],
        replication_lag_seconds: Some(1.0),
        failback_requested: false,
        failover_requested: false,
        local_fencing: LocalFencing::default(),
        witness: None,
    }
}

fn fenced() -> LocalFencing {
    LocalFencing {
        any_fenced: true,
        any_unfenced: false,
    }
}
fn unfenced() -> LocalFencing {
    LocalFencing {
        any_fenced: false,
        any_unfenced: true,
    }
}

/// The status the controller stores after a tick whose actions all succeeded.
fn stored(d: &Decision) -> SiteFailoverStatus {
    d.after.clone().unwrap_or_else(|| d.status.clone())
}

/// A west standby that has seen `failures` failed probes of east.
fn standby_after_failures(failures: u32) -> SiteFailoverStatus {
    let s = spec("west");
    let mut st = stored(&decide(
        &s,
        &Default::default(),
        &obs(0, peer(1, "east"), Some(true)),
    ));
    for i in 1..=failures {
        let d = decide(&s, &st, &obs(5 * i64::from(i), None, Some(false)));
        st = stored(&d);
    }
    st
}

#[test]
fn new_pairing_starts_with_the_primary_active_at_epoch_1() {
    let d = decide(&spec("east"), &Default::default(), &obs(0, None, None));
    assert_eq!(d.status.epoch, 1);
    assert_eq!(d.status.active_site.as_deref(), Some("east"));
    assert_eq!(d.status.fenced, Some(false));
    // Peer unreachable: the primary serves but is not protected.
    assert_eq!(d.status.phase, FailoverPhase::Degraded);

    let d = decide(
        &spec("west"),
        &Default::default(),
        &obs(0, peer(1, "east"), Some(true)),
    );
    assert_eq!(d.status.active_site.as_deref(), Some("east"));
    assert_eq!(d.status.phase, FailoverPhase::Healthy);
    assert_eq!(d.status.fenced, Some(true));
    assert!(d.actions.contains(&Action::MirrorFromPeer));
    assert!(d.actions.contains(&Action::WithdrawDns));
}

#[test]
fn a_new_site_adopts_the_peers_epoch() {
    let d = decide(
        &spec("east"),
        &Default::default(),
        &obs(0, peer(4, "west"), None),
    );
    assert_eq!(d.status.epoch, 4);
    assert_eq!(d.status.active_site.as_deref(), Some("west"));
    assert_eq!(d.status.phase, FailoverPhase::FailedOver);
}

#[test]
fn standby_fences_its_stores_and_active_unfences_its_own() {
    let mut o = obs(0, peer(1, "east"), Some(true));
    o.local_fencing = unfenced();
    let d = decide(&spec("west"), &Default::default(), &o);
    assert!(d.actions.contains(&Action::FenceLocal(true)));

    let mut o = obs(0, peer(1, "east"), None);
    o.local_fencing = fenced();
    let d = decide(&spec("east"), &Default::default(), &o);
    assert!(d.actions.contains(&Action::FenceLocal(false)));
    assert!(d.actions.contains(&Action::PublishDns));
}

#[test]
fn steady_state_changes_nothing() {
    let s = spec("west");
    let first = stored(&decide(
        &s,
        &Default::default(),
        &obs(0, peer(1, "east"), Some(true)),
    ));
    let mut o = obs(5, peer(1, "east"), Some(true));
    o.local_fencing = fenced();
    let d = decide(&s, &first, &o);
    assert_eq!(d.status, first, "a healthy standby records nothing new");
    assert!(d.after.is_none());
    assert!(!d.actions.iter().any(|a| matches!(a, Action::FenceLocal(_))));
}

#[test]
fn failover_happens_at_exactly_the_threshold() {
    let s = spec("west");
    let two = standby_after_failures(2);
    assert_eq!(two.consecutive_probe_failures, 2);
    assert_eq!(two.phase, FailoverPhase::Degraded);
    assert_eq!(
        two.active_site.as_deref(),
        Some("east"),
        "not before the threshold"
    );
    assert_eq!(two.probe_failing_since, Some(rfc3339(t(5))));

    let d = decide(&s, &two, &obs(15, None, Some(false)));
    assert_eq!(d.status.phase, FailoverPhase::FailingOver);
    assert_eq!(d.status.epoch, 2);
    assert_eq!(d.status.active_site.as_deref(), Some("west"));
    let rec = d.status.last_failover.clone().unwrap();
    assert_eq!(
        (rec.from.as_str(), rec.to.as_str(), rec.epoch),
        ("east", "west", 2)
    );
    assert_eq!(rec.rpo_seconds, Some(1.0), "RPO is the lag at promotion");
    assert!(
        rec.completed_at.is_none(),
        "progress is recorded before acting"
    );
    // The peer is told and fenced before this site's stores go active.
    let pos = |a: &Action| d.actions.iter().position(|x| x == a).unwrap();
    assert!(pos(&Action::FencePeer(true)) < pos(&Action::FenceLocal(false)));
    assert!(pos(&Action::FenceLocal(false)) < pos(&Action::PublishDns));

    let done = d.after.unwrap();
    assert_eq!(done.phase, FailoverPhase::FailedOver);
    assert_eq!(done.fenced, Some(false));
    // First failed probe at 5 s, promoted at 15 s.
    assert_eq!(done.last_failover.unwrap().rto_seconds, Some(10.0));
}

#[test]
fn a_successful_probe_resets_the_count() {
    let s = spec("west");
    let two = standby_after_failures(2);
    let ok = stored(&decide(&s, &two, &obs(15, peer(1, "east"), Some(true))));
    assert_eq!(ok.consecutive_probe_failures, 0);
    assert_eq!(ok.probe_failing_since, None);
    assert_eq!(ok.phase, FailoverPhase::Healthy);
    let again = stored(&decide(&s, &ok, &obs(20, None, Some(false))));
    assert_eq!(again.consecutive_probe_failures, 1);
}

#[test]
fn ticks_without_a_probe_do_not_count() {
    let s = spec("west");
    let one = standby_after_failures(1);
    let d = decide(&s, &one, &obs(6, None, None));
    assert_eq!(d.status.consecutive_probe_failures, 1);
    assert!(!probe_due(&s, parse(&one.last_probe_time), t(9)));
    assert!(probe_due(&s, parse(&one.last_probe_time), t(10)));
}

#[test]
fn api_loss_alone_never_fails_over() {
    let s = spec("west");
    let mut st = standby_after_failures(0);
    for i in 1..10 {
        st = stored(&decide(&s, &st, &obs(5 * i, None, Some(true))));
    }
    assert_eq!(st.active_site.as_deref(), Some("east"));
    assert_eq!(st.phase, FailoverPhase::Degraded);
    assert_eq!(st.peer_reachable, Some(false));
}

#[test]
fn without_automatic_failover_the_standby_only_reports() {
    let mut s = spec("west");
    s.policy.automatic_failover = Some(false);
    let mut st = stored(&decide(
        &s,
        &Default::default(),
        &obs(0, peer(1, "east"), Some(true)),
    ));
    let mut notes = vec![];
    for i in 1..=5 {
        let d = decide(&s, &st, &obs(5 * i, None, Some(false)));
        notes.extend(d.notes.iter().map(|n| n.reason));
        st = stored(&d);
    }
    assert_eq!(st.active_site.as_deref(), Some("east"));
    assert_eq!(st.epoch, 1);
    assert!(notes.contains(&"FailoverNeeded"));
}

#[test]
fn a_failover_in_progress_is_resumed_from_the_stored_status() {
    let s = spec("west");
    let d = decide(&s, &standby_after_failures(2), &obs(15, None, Some(false)));
    let recorded = d.status.clone();
    // Restart: only the recorded status survives; the peer is still gone.
    let again = decide(&s, &recorded, &obs(40, None, None));
    assert_eq!(again.status.epoch, 2, "no second epoch bump");
    assert!(again.actions.contains(&Action::FenceLocal(false)));
    assert!(again.actions.contains(&Action::PublishDns));
    let done = again.after.unwrap();
    assert_eq!(done.phase, FailoverPhase::FailedOver);
    assert_eq!(done.last_failover.unwrap().rto_seconds, Some(35.0));
}

#[test]
fn best_effort_covers_only_peer_steps_of_a_failover() {
    assert!(Action::FencePeer(true).best_effort(FailoverPhase::FailingOver));
    assert!(!Action::FenceLocal(false).best_effort(FailoverPhase::FailingOver));
    assert!(!Action::FencePeer(false).best_effort(FailoverPhase::FailingBack));
}

#[test]
fn a_returning_primary_sees_the_higher_epoch_and_fences_itself() {
    let s = spec("east");
    let mut o = obs(0, peer(1, "east"), None);
    o.local_fencing = fenced();
    let east = stored(&decide(&s, &Default::default(), &o));
    assert_eq!(east.active_site.as_deref(), Some("east"));

    let mut back = obs(100, peer(2, "west"), None);
    back.local_fencing = unfenced();
    let d = decide(&s, &east, &back);
    assert_eq!(d.status.epoch, 2);
    assert_eq!(d.status.active_site.as_deref(), Some("west"));
    assert_eq!(d.status.fenced, Some(true));
    assert_eq!(d.status.phase, FailoverPhase::FailedOver);
    assert!(d.actions.contains(&Action::FenceLocal(true)));
    assert!(!d.actions.contains(&Action::PublishDns));
    assert!(d.notes.iter().any(|n| n.reason == "Fenced"));
}

#[test]
fn the_active_site_tells_and_fences_a_peer_with_an_older_epoch() {
    let s = spec("west");
    let mut st = standby_after_failures(2);
    st = stored(&decide(&s, &st, &obs(15, None, Some(false))));
    let d = decide(&s, &st, &obs(60, peer(1, "east"), None));
    assert!(d.actions.contains(&Action::TellPeer {
        epoch: 2,
        active_site: "west".into()
    }));
    assert!(d.actions.contains(&Action::FencePeer(true)));
    assert_eq!(d.status.active_site.as_deref(), Some("west"));
}

#[test]
fn equal_epochs_with_two_claims_resolve_the_same_way_on_both_sites() {
    let mut east = stored(&decide(
        &spec("east"),
        &Default::default(),
        &obs(0, None, None),
    ));
    east.epoch = 2;
    let mut west = east.clone();
    west.active_site = Some("west".into());
    let e = decide(&spec("east"), &east, &obs(1, peer(2, "west"), None));
    let w = decide(&spec("west"), &west, &obs(1, peer(2, "east"), None));
    assert_eq!(e.status.active_site, w.status.active_site);
}

/// West active at epoch 2 after a failover, east following and resynchronised.
fn west_failed_over() -> (SiteFailoverSpec, SiteFailoverStatus) {
    let s = spec("west");
    let st = stored(&decide(
        &s,
        &standby_after_failures(2),
        &obs(15, None, Some(false)),
    ));
    (s, st)
}

#[test]
fn failback_is_manual_by_default_and_waits_for_resync() {
    let (s, st) = west_failed_over();
    let d = decide(&s, &st, &obs(100, peer(2, "west"), None));
    assert_eq!(
        d.status.phase,
        FailoverPhase::FailedOver,
        "no request: stays"
    );

    let mut o = obs(100, peer(2, "west"), None);
    o.failback_requested = true;
    o.replication_lag_seconds = Some(120.0);
    let d = decide(&s, &st, &o);
    assert_eq!(
        d.status.phase,
        FailoverPhase::FailedOver,
        "lag above RPO: waits"
    );
    assert!(d.notes.iter().any(|n| n.reason == "FailbackWaiting"));

    let mut o = obs(100, peer(2, "west"), None);
    o.failback_requested = true;
    o.tables[0].peer = Some("old".into());
    assert_eq!(decide(&s, &st, &o).status.phase, FailoverPhase::FailedOver);
}

#[test]
fn planned_failback_pauses_syncs_and_swaps_under_a_new_epoch() {
    let (s, st) = west_failed_over();
    let mut o = obs(100, peer(2, "west"), None);
    o.failback_requested = true;
    o.local_fencing = unfenced();
    let d = decide(&s, &st, &o);
    assert_eq!(d.status.phase, FailoverPhase::FailingBack);
    assert_eq!(
        d.status.active_site.as_deref(),
        Some("west"),
        "still serving until synced"
    );
    assert_eq!(
        d.actions,
        vec![Action::FenceLocal(true)],
        "pause delivery first"
    );
    let paused = stored(&d);

    // Final sync not done yet.
    let mut o = obs(101, peer(2, "west"), None);
    o.replication_lag_seconds = Some(0.5);
    o.local_fencing = fenced();
    let d = decide(&s, &paused, &o);
    assert_eq!(d.status.phase, FailoverPhase::FailingBack);
    assert!(d.after.is_none());

    let mut o = obs(103, peer(2, "west"), None);
    o.replication_lag_seconds = Some(0.0);
    o.local_fencing = fenced();
    let d = decide(&s, &paused, &o);
    assert_eq!(d.status.epoch, 3);
    assert_eq!(d.status.active_site.as_deref(), Some("east"));
    assert!(d.actions.contains(&Action::TellPeer {
        epoch: 3,
        active_site: "east".into()
    }));
    assert!(d.actions.contains(&Action::FencePeer(false)));
    assert!(d.actions.contains(&Action::ClearFailbackRequest));
    let done = d.after.unwrap();
    assert_eq!(done.phase, FailoverPhase::Healthy);
    let rec = done.last_failover.unwrap();
    assert_eq!(rec.kind, KIND_FAILBACK);
    assert_eq!(
        rec.rto_seconds,
        Some(3.0),
        "delivery paused from 100 s to 103 s"
    );
    assert_eq!(rec.rpo_seconds, Some(0.0));

    // Restart between recording the swap and handing over: the hand-over is repeated.
    let resumed = decide(&s, &d.status, &obs(104, peer(2, "west"), None));
    assert!(resumed.actions.contains(&Action::FencePeer(false)));
    assert_eq!(resumed.after.unwrap().phase, FailoverPhase::Healthy);
}

#[test]
fn failback_gives_up_and_resumes_delivery_when_the_final_sync_stalls() {
    let (s, st) = west_failed_over();
    let mut o = obs(100, peer(2, "west"), None);
    o.failback_requested = true;
    let paused = stored(&decide(&s, &st, &o));
    let mut o = obs(100 + 61, peer(2, "west"), None);
    o.replication_lag_seconds = Some(3.0);
    o.local_fencing = fenced();
    let d = decide(&s, &paused, &o);
    assert!(d.actions.contains(&Action::FenceLocal(false)));
    assert_eq!(d.status.phase, FailoverPhase::FailedOver);
    assert_eq!(d.status.active_site.as_deref(), Some("west"));
    assert!(d.notes.iter().any(|n| n.reason == "FailbackAborted"));
}

#[test]
fn automatic_failback_needs_no_request() {
    let (mut s, st) = west_failed_over();
    s.policy.automatic_failback = true;
    let d = decide(&s, &st, &obs(100, peer(2, "west"), None));
    assert_eq!(d.status.phase, FailoverPhase::FailingBack);
}

#[test]
fn the_primary_adopts_a_handover() {
    let s = spec("east");
    let mut o = obs(0, peer(2, "west"), None);
    o.local_fencing = fenced();
    let east = stored(&decide(&s, &Default::default(), &o));
    assert_eq!(east.fenced, Some(true));
    let mut o = obs(10, peer(3, "east"), None);
    o.local_fencing = fenced();
    let d = decide(&s, &east, &o);
    assert_eq!(d.status.active_site.as_deref(), Some("east"));
    assert_eq!(d.status.phase, FailoverPhase::Healthy);
    assert!(d.actions.contains(&Action::FenceLocal(false)));
    assert!(d.notes.iter().any(|n| n.reason == "HandedOver"));
}

#[test]
fn tables_in_sync_and_last_sync_time() {
    let s = spec("west");
    let mut o = obs(0, peer(1, "east"), Some(true));
    o.tables[0].local = Some("old".into());
    let st = stored(&decide(&s, &Default::default(), &o));
    assert_eq!(st.access_tables_in_sync, Some(false));
    assert_eq!(st.last_table_sync, None);
    let st = stored(&decide(&s, &st, &obs(7, peer(1, "east"), None)));
    assert_eq!(st.access_tables_in_sync, Some(true));
    assert_eq!(st.last_table_sync, Some(rfc3339(t(7))));
    assert_eq!(st.local_access_tables_hash.as_deref(), Some("h1"));
    // Still equal later: the sync time stays (nothing to write).
    let again = stored(&decide(&s, &st, &obs(20, peer(1, "east"), None)));
    assert_eq!(again.last_table_sync, Some(rfc3339(t(7))));
    // Several MailPods: one combined hash, in sync only when all are.
    let mut o = obs(30, peer(1, "east"), None);
    o.tables.push(TableHashes {
        mail_pod: "ops".into(),
        local: Some("a".into()),
        peer: None,
    });
    let st = stored(&decide(&s, &again, &o));
    assert_eq!(st.access_tables_in_sync, Some(false));
    assert!(st.peer_access_tables_hash.is_none());
}

#[test]
fn a_requested_promotion_needs_failing_front_ends_and_then_skips_the_threshold() {
    let mut s = spec("west");
    s.policy.automatic_failover = Some(false);
    // Healthy primary: the request is refused and cleared; nothing is promoted.
    let st = standby_after_failures(0);
    let mut o = obs(10, peer(1, "east"), Some(true));
    o.failover_requested = true;
    let d = decide(&s, &st, &o);
    assert_eq!(stored(&d).active_site.as_deref(), Some("east"));
    assert!(d.notes.iter().any(|n| n.reason == "PromoteRefused"));
    assert!(d.actions.contains(&Action::ClearFailoverRequest));
    assert!(!d.actions.contains(&Action::FenceLocal(false)));

    // One failed probe of three, automatic failover off: only the request promotes.
    let st = standby_after_failures(1);
    let d = decide(&s, &st, &obs(10, None, Some(false)));
    assert_eq!(
        stored(&d).active_site.as_deref(),
        Some("east"),
        "no request, no promotion"
    );
    let mut o = obs(10, None, Some(false));
    o.failover_requested = true;
    let d = decide(&s, &st, &o);
    let after = stored(&d);
    assert_eq!(after.active_site.as_deref(), Some("west"));
    assert_eq!(after.epoch, st.epoch + 1);
    assert!(d.actions.contains(&Action::FenceLocal(false)));
    assert!(d.actions.contains(&Action::ClearFailoverRequest));
    assert!(d.notes.iter().any(|n| n.message.contains("on request")));
}

#[test]
fn an_active_site_cut_off_from_witness_and_peer_fences_itself_at_the_renew_deadline() {
    let s = with_witness("east");
    // Deadline: 20 s lease - 2 × 5 s interval = 10 s after the last renewal at 0 s.
    let mut st = stored(&decide(
        &s,
        &Default::default(),
        &obs(0, peer(1, "east"), None),
    ));
    for now in [5, 10] {
        let mut o = obs(now, None, None);
        o.local_fencing = unfenced();
        o.witness = Some(WitnessView {
            renewed_at: Some(t(0)),
            ..Default::default()
        });
        let d = decide(&s, &st, &o);
        assert!(
            !d.actions.contains(&Action::FenceLocal(true)),
            "fenced at {now} s"
        );
        assert!(d.status.witness.as_ref().unwrap().quorum);
        st = stored(&d);
    }
    let mut o = obs(11, None, None);
    o.local_fencing = unfenced();
    o.witness = Some(WitnessView {
        renewed_at: Some(t(0)),
        ..Default::default()
    });
    let d = decide(&s, &st, &o);
    assert_eq!(d.actions, vec![Action::FenceLocal(true)]);
    assert_eq!(d.status.fenced, Some(true));
    assert!(!d.status.witness.as_ref().unwrap().quorum);
    assert!(d.notes.iter().any(|n| n.reason == "QuorumLost"));
    let c = d
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == condition::QUORUM)
        .unwrap();
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", "QuorumLost")
    );
    assert_eq!(
        d.status.active_site.as_deref(),
        Some("east"),
        "still the active site"
    );
    // Quorum back (the Lease renewed): the stores are unfenced again.
    let st = stored(&d);
    let mut o = obs(16, None, None);
    o.local_fencing = fenced();
    o.witness = Some(lease(Some("east"), 1, Some(16), true));
    let d = decide(&s, &st, &o);
    assert!(d.actions.contains(&Action::FenceLocal(false)));
    assert_eq!(d.status.fenced, Some(false));
    assert!(!d.notes.iter().any(|n| n.reason == "QuorumLost"));
}

#[test]
fn an_active_site_keeps_serving_while_the_peer_agrees_or_the_lease_is_fresh() {
    let s = with_witness("east");
    let st = stored(&decide(
        &s,
        &Default::default(),
        &obs(0, peer(1, "east"), None),
    ));
    // Witness down, peer agrees.
    let mut o = obs(60, peer(1, "east"), None);
    o.witness = Some(WitnessView::default());
    let d = decide(&s, &st, &o);
    assert_eq!(d.status.fenced, Some(false));
    assert!(!d.actions.contains(&Action::FenceLocal(true)));
    // Witness down, peer agrees but counts failed probes of this site: it may be about to promote.
    let mut o = obs(60, peer(1, "east"), None);
    o.peer.as_mut().unwrap().probe_failures = 1;
    o.witness = Some(WitnessView::default());
    o.local_fencing = unfenced();
    let d = decide(&s, &st, &o);
    assert_eq!(d.status.fenced, Some(true));
    assert!(d.actions.contains(&Action::FenceLocal(true)));
    // Peer gone, Lease renewed this tick.
    let mut o = obs(60, None, None);
    o.witness = Some(lease(Some("east"), 1, Some(60), true));
    assert_eq!(decide(&s, &st, &o).status.fenced, Some(false));
    // Peer gone, the Lease taken by the standby for epoch 2: out of quorum even if renewed recently.
    let mut o = obs(60, None, None);
    o.local_fencing = unfenced();
    o.witness = Some(lease(Some("west"), 2, Some(55), false));
    let d = decide(&s, &st, &o);
    assert_eq!(d.status.fenced, Some(true));
    let note = d.notes.iter().find(|n| n.reason == "QuorumLost").unwrap();
    assert!(note.message.contains("epoch 2"), "{}", note.message);
}

#[test]
fn the_standby_promotes_only_holding_the_witness_lease() {
    let s = with_witness("west");
    // Failures since 5 s (standby_after_failures); the threshold is reached at 15 s.
    let two = standby_after_failures(2);
    // Held by east, not yet unchanged for the lease duration: no promotion.
    let mut o = obs(15, None, Some(false));
    o.witness = Some(lease(Some("east"), 1, None, false));
    let d = decide(&s, &two, &o);
    assert_eq!(d.status.active_site.as_deref(), Some("east"));
    assert_eq!(d.acquire_witness, None);
    assert!(!d.actions.contains(&Action::FenceLocal(false)));
    assert!(d.notes.iter().any(|n| n.reason == "WitnessWait"));
    let three = stored(&d);
    // Witness unreachable: no promotion either.
    let mut o = obs(15, None, Some(false));
    o.witness = Some(WitnessView::default());
    let d = decide(&s, &two, &o);
    assert_eq!(d.status.active_site.as_deref(), Some("east"));
    assert!(d
        .notes
        .iter()
        .any(|n| n.message.contains("does not answer")));
    // Lapsed, but the probes have failed for only 10 s of the 20 s lease: east may still be in quorum
    // through west's agreement, so no promotion. The same for a free Lease, or one west itself holds
    // from before (not taken for this epoch).
    for held in [Some("east"), None, Some("west")] {
        let mut o = obs(15, None, Some(false));
        o.witness = Some(lease(held, 1, None, true));
        let d = decide(&s, &two, &o);
        assert_eq!(d.acquire_witness, None, "{held:?}");
        assert_eq!(d.status.active_site.as_deref(), Some("east"));
    }
    // Failing for the whole lease duration and lapsed: the controller is asked to take it for epoch 2.
    let mut st = three;
    for now in [20, 25] {
        let mut o = obs(now, None, Some(false));
        o.witness = Some(lease(Some("east"), 1, None, true));
        let d = decide(&s, &st, &o);
        if now == 20 {
            assert_eq!(d.acquire_witness, None, "15 s of failures");
            // Past the threshold the wait is not announced again at every probe.
            assert!(!d.notes.iter().any(|n| n.reason == "WitnessWait"));
            st = stored(&d);
            continue;
        }
        assert_eq!(d.acquire_witness, Some(2));
        assert_eq!(d.status.active_site.as_deref(), Some("east"));
        assert!(d
            .actions
            .iter()
            .all(|a| !matches!(a, Action::FenceLocal(false) | Action::PublishDns)));
        // Taken: the same tick decided again promotes at the Lease's epoch.
        o.witness = Some(lease(Some("west"), 2, Some(25), true));
        let d = decide(&s, &st, &o);
        assert_eq!(d.acquire_witness, None);
        assert_eq!(d.status.phase, FailoverPhase::FailingOver);
        assert_eq!(d.status.epoch, 2);
        assert!(d.actions.contains(&Action::FenceLocal(false)));
    }
}

#[test]
fn a_promotion_resumed_out_of_quorum_fences_instead_of_serving() {
    let s = with_witness("west");
    // West recorded its promotion at epoch 2 (FailingOver), and may have unfenced before it stopped.
    let mut st = stored(&decide(
        &s,
        &Default::default(),
        &obs(0, peer(1, "east"), Some(true)),
    ));
    st.epoch = 2;
    st.active_site = Some("west".into());
    st.phase = FailoverPhase::FailingOver;
    // Now: no peer, the witness Lease taken by east once west's lapsed.
    let mut o = obs(100, None, None);
    o.local_fencing = unfenced();
    o.witness = Some(lease(Some("east"), 1, Some(20), false));
    let d = decide(&s, &st, &o);
    assert!(
        d.actions.contains(&Action::FenceLocal(true)),
        "{:?}",
        d.actions
    );
    assert!(!d
        .actions
        .iter()
        .any(|a| matches!(a, Action::FenceLocal(false) | Action::PublishDns)));
    assert!(d.after.is_none(), "not recorded as done");
    assert_eq!(d.status.fenced, Some(true));
}

#[test]
fn a_lease_taken_by_a_tick_that_died_is_written_again_before_promoting() {
    let s = with_witness("west");
    let two = standby_after_failures(2);
    // West holds the Lease at epoch 2 from a take 35 s ago that was never recorded; both waits are over.
    let mut o = obs(60, None, Some(false));
    o.witness = Some(lease(Some("west"), 2, Some(25), true));
    let d = decide(&s, &two, &o);
    assert_eq!(
        d.acquire_witness,
        Some(2),
        "compare-and-swap the Lease again first"
    );
    assert_eq!(d.status.active_site.as_deref(), Some("east"));
    assert!(!d.actions.contains(&Action::FenceLocal(false)));
    // Written again just now: promote.
    o.witness = Some(lease(Some("west"), 2, Some(60), true));
    let d = decide(&s, &two, &o);
    assert_eq!(d.status.phase, FailoverPhase::FailingOver);
    assert_eq!(d.status.epoch, 2);
}
