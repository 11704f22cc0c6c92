//! Site failover with a witness cluster (a third in-memory API holding the Lease): a primary cut off from
//! everything fences itself before the standby takes over, a partition between the two sites alone
//! promotes nobody, a witness outage alone fences nobody, and the Lease follows a failback.

mod failover_support;

use std::sync::atomic::Ordering;

use failover_support::{Sites, INTERVAL, LEASE, THRESHOLD};
use k8s_openapi::api::coordination::v1::Lease;
use mailpod_operator::crd::FailoverPhase;

const LEASE_NAME: &str = "sitefailover-corp-geo";

async fn converged() -> Sites {
    let sites = Sites::with_witness().await;
    for _ in 0..3 {
        sites.round().await;
    }
    assert_eq!(sites.serving(), vec!["east"]);
    sites
}

/// (holder, epoch) of the witness Lease.
fn lease(sites: &Sites) -> (Option<String>, i64) {
    let l = sites
        .witness
        .get::<Lease>("mailpod-witness", LEASE_NAME)
        .expect("the witness Lease exists");
    let epoch = l
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get("mailpod.io/epoch"))
        .and_then(|e| e.parse().ok())
        .unwrap_or(0);
    (l.spec.and_then(|s| s.holder_identity), epoch)
}

/// Whether a site has recorded an Event with this reason.
fn has_event(site: &failover_support::Site, reason: &str) -> bool {
    site.server
        .list::<k8s_openapi::api::events::v1::Event>(Some(failover_support::NS))
        .iter()
        .any(|e| e.reason.as_deref() == Some(reason))
}

/// Asserts that at most one site serves, partition or not: the point of the witness.
fn assert_one_writer(sites: &Sites, when: &str) {
    let serving = sites.serving();
    assert!(
        serving.len() <= 1,
        "two sites serve at once {when}: {serving:?}"
    );
}

#[tokio::test]
async fn the_primary_holds_the_lease_and_a_healthy_pair_keeps_it() {
    let sites = converged().await;
    assert_eq!(lease(&sites), (Some("east".into()), 1));
    let (e, w) = (sites.east.status(), sites.west.status());
    let ew = e.witness.unwrap();
    assert!(ew.reachable && ew.quorum);
    assert_eq!(ew.holder.as_deref(), Some("east"));
    assert!(w.witness.unwrap().quorum);
    assert!(!has_event(&sites.east, "QuorumLost"));
}

#[tokio::test]
async fn an_isolated_primary_stops_writing_before_the_standby_takes_over() {
    let sites = converged().await;
    // East is cut off from the standby and the witness; its front ends are unreachable from west.
    sites.partition(true);
    sites.east.witness_cut.store(true, Ordering::SeqCst);
    sites.east.frontends_up.store(false, Ordering::SeqCst);
    let (mut east_fenced_at, mut west_serving_at) = (None, None);
    for round in 1..=8 {
        sites.advance(INTERVAL);
        sites.west.tick().await;
        assert_one_writer(&sites, &format!("after west's tick in round {round}"));
        sites.east.tick().await;
        assert_one_writer(&sites, &format!("after east's tick in round {round}"));
        if east_fenced_at.is_none() && !sites.east.serving() {
            east_fenced_at = Some(round);
        }
        if west_serving_at.is_none() && sites.west.serving() {
            west_serving_at = Some(round);
        }
    }
    let (fenced, promoted) = (east_fenced_at.unwrap(), west_serving_at.unwrap());
    // Renew deadline: 20 s lease - 2 intervals = 10 s after east's last renewal (0 s), so east fences at
    // its first tick past it (15 s). West has failed its probes by 15 s, but it first saw that renewal at
    // 5 s (east ticks after west) and may take the Lease only once unchanged for 20 s: at 25 s.
    assert_eq!(fenced, 3, "east fenced at 15 s");
    assert_eq!(promoted, 5, "west promoted at 25 s");
    assert!(fenced < promoted);
    let e = sites.east.status();
    assert_eq!(
        e.active_site.as_deref(),
        Some("east"),
        "east never learned of the promotion"
    );
    assert_eq!(e.fenced, Some(true));
    assert!(!e.witness.unwrap().quorum);
    assert!(has_event(&sites.east, "QuorumLost"));
    assert!(has_event(&sites.west, "WitnessWait"));
    let w = sites.west.status();
    assert_eq!((w.active_site.as_deref(), w.epoch), (Some("west"), 2));
    assert_eq!(w.phase, FailoverPhase::FailedOver);
    // RTO: from the first failed probe (5 s) to promotion (25 s): the Lease duration bounds it.
    let rec = w.last_failover.unwrap();
    assert_eq!(rec.rto_seconds, Some(f64::from(LEASE)));
    assert_eq!(lease(&sites), (Some("west".into()), 2));

    // East comes back: it adopts epoch 2 and stays fenced; west keeps the Lease.
    sites.partition(false);
    sites.east.witness_cut.store(false, Ordering::SeqCst);
    sites.east.frontends_up.store(true, Ordering::SeqCst);
    for _ in 0..3 {
        sites.round().await;
        assert_one_writer(&sites, "after the return");
    }
    assert_eq!(sites.serving(), vec!["west"]);
    let e = sites.east.status();
    assert_eq!((e.active_site.as_deref(), e.epoch), (Some("west"), 2));
    assert_eq!(lease(&sites), (Some("west".into()), 2));
}

#[tokio::test]
async fn a_partition_between_the_sites_alone_promotes_nobody() {
    let sites = converged().await;
    // The sites cannot see each other (API nor front ends); both still reach the witness.
    sites.partition(true);
    sites.east.frontends_up.store(false, Ordering::SeqCst);
    for round in 0..(THRESHOLD + 6) {
        sites.advance(INTERVAL);
        sites.west.tick().await;
        sites.east.tick().await;
        assert_one_writer(&sites, &format!("in round {round}"));
    }
    assert_eq!(sites.serving(), vec!["east"], "east keeps serving its mail");
    let w = sites.west.status();
    assert_eq!(w.active_site.as_deref(), Some("east"));
    assert!(w.consecutive_probe_failures >= THRESHOLD);
    assert!(has_event(&sites.west, "WitnessWait"));
    assert_eq!(lease(&sites), (Some("east".into()), 1));
    assert!(sites.east.status().witness.unwrap().quorum);
}

#[tokio::test]
async fn a_witness_outage_alone_fences_nobody() {
    let sites = converged().await;
    sites.east.witness_cut.store(true, Ordering::SeqCst);
    sites.west.witness_cut.store(true, Ordering::SeqCst);
    for _ in 0..6 {
        sites.round().await;
    }
    // The standby agrees that east is active: a majority of the three.
    assert_eq!(sites.serving(), vec!["east"]);
    let e = sites.east.status();
    let ew = e.witness.unwrap();
    assert!(!ew.reachable);
    assert!(ew.quorum);
    assert!(!has_event(&sites.east, "QuorumLost"));

    // With the witness down too, losing east promotes nobody: the standby cannot prove east is not serving.
    sites.partition(true);
    sites.east.frontends_up.store(false, Ordering::SeqCst);
    for _ in 0..(THRESHOLD + 2) {
        sites.advance(INTERVAL);
        sites.west.tick().await;
        sites.east.tick().await;
        assert_one_writer(&sites, "witness down and sites partitioned");
    }
    assert!(sites.serving().is_empty(), "east fenced itself; west waits");
    assert!(has_event(&sites.west, "WitnessWait"));
    // The witness returns: west, having seen the Lease unchanged for its duration, takes over.
    sites.west.witness_cut.store(false, Ordering::SeqCst);
    for _ in 0..(LEASE as i64 / INTERVAL + 2) {
        sites.advance(INTERVAL);
        sites.west.tick().await;
        sites.east.tick().await;
        assert_one_writer(&sites, "witness back for west");
    }
    assert_eq!(sites.serving(), vec!["west"]);
    assert_eq!(lease(&sites), (Some("west".into()), 2));
}

#[tokio::test]
async fn a_primary_that_sees_the_standby_but_not_the_witness_is_fenced_before_the_standby_serves() {
    let sites = converged().await;
    // East's front ends stop answering west's probe, and east loses the witness (but sees west).
    sites.east.frontends_up.store(false, Ordering::SeqCst);
    sites.east.witness_cut.store(true, Ordering::SeqCst);
    for round in 0..6 {
        sites.round().await;
        assert_one_writer(&sites, &format!("in round {round}"));
    }
    // West took the Lease and promoted; reachable, east was told and fenced before west served.
    assert_eq!(sites.serving(), vec!["west"]);
    assert_eq!(lease(&sites), (Some("west".into()), 2));
    assert_eq!(sites.east.status().epoch, 2);
}

#[tokio::test]
async fn the_lease_follows_a_planned_failback() {
    let sites = converged().await;
    sites.partition(true);
    sites.east.witness_cut.store(true, Ordering::SeqCst);
    sites.east.frontends_up.store(false, Ordering::SeqCst);
    for _ in 0..5 {
        sites.advance(INTERVAL);
        sites.west.tick().await;
        sites.east.tick().await;
    }
    assert_eq!(sites.serving(), vec!["west"]);
    sites.partition(false);
    sites.east.witness_cut.store(false, Ordering::SeqCst);
    sites.east.frontends_up.store(true, Ordering::SeqCst);
    sites.round().await;
    sites.east.set_lag(0.0).await;
    sites.east.annotate_failback().await;
    for _ in 0..4 {
        sites.round().await;
        assert_one_writer(&sites, "during the failback");
    }
    assert_eq!(sites.serving(), vec!["east"]);
    assert_eq!(sites.west.status().last_failover.unwrap().kind, "failback");
    assert_eq!(lease(&sites), (Some("east".into()), 3));
    assert!(sites.east.status().witness.unwrap().quorum);
}

#[tokio::test]
async fn a_standby_that_took_the_lease_gives_it_back_when_the_primary_answers() {
    let sites = converged().await;
    // As if west took the Lease for a promotion and its operator stopped before recording it.
    let api: kube::Api<Lease> = kube::Api::namespaced(sites.witness.client(), "mailpod-witness");
    let mut l = api.get(LEASE_NAME).await.unwrap();
    l.spec.as_mut().unwrap().holder_identity = Some("west".into());
    l.metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert("mailpod.io/epoch".into(), "2".into());
    api.replace(LEASE_NAME, &Default::default(), &l)
        .await
        .unwrap();
    for round in 0..3 {
        sites.round().await;
        assert_one_writer(&sites, &format!("in round {round}"));
        // East never stops: west agrees that it is active.
        assert_eq!(sites.serving(), vec!["east"]);
    }
    assert_eq!(lease(&sites), (Some("east".into()), 1));
    assert_eq!(sites.west.status().active_site.as_deref(), Some("east"));
}

#[tokio::test]
async fn a_restart_after_taking_the_lease_finishes_the_promotion() {
    let mut sites = converged().await;
    sites.partition(true);
    sites.east.witness_cut.store(true, Ordering::SeqCst);
    sites.east.frontends_up.store(false, Ordering::SeqCst);
    for _ in 0..4 {
        sites.advance(INTERVAL);
        sites.west.tick().await;
        sites.east.tick().await;
    }
    assert!(!sites.east.serving() && !sites.west.serving());
    // The promoting tick takes the Lease and records its decision, then dies before unfencing.
    sites.advance(INTERVAL);
    sites.west.fail_next_lun_write();
    assert!(sites.west.try_tick().await.is_err());
    assert_eq!(sites.west.status().phase, FailoverPhase::FailingOver);
    assert_eq!(lease(&sites), (Some("west".into()), 2));
    assert!(sites.serving().is_empty());

    // A new operator process: no memory of the Lease, only the stored status and the Lease itself.
    sites.restart_west();
    sites.advance(1);
    sites.west.tick().await;
    let w = sites.west.status();
    assert_eq!((w.phase, w.epoch), (FailoverPhase::FailedOver, 2));
    assert_eq!(sites.serving(), vec!["west"]);
    assert_eq!(lease(&sites), (Some("west".into()), 2));
}

#[tokio::test]
async fn a_primary_the_standby_cannot_reach_stops_before_the_standby_serves() {
    let sites = converged().await;
    // One-way trouble: east still reads west's API, but west reaches neither east's API nor its front
    // ends, and east has lost the witness. West cannot fence east when it promotes; east must stop first.
    sites.west.link_cut.store(true, Ordering::SeqCst);
    sites.east.frontends_up.store(false, Ordering::SeqCst);
    sites.east.witness_cut.store(true, Ordering::SeqCst);
    let (mut east_fenced_at, mut west_serving_at) = (None, None);
    for round in 1..=8 {
        sites.round().await;
        assert_one_writer(&sites, &format!("in round {round}"));
        if east_fenced_at.is_none() && !sites.east.serving() {
            east_fenced_at = Some(round);
        }
        if west_serving_at.is_none() && sites.west.serving() {
            west_serving_at = Some(round);
        }
    }
    let (fenced, promoted) = (east_fenced_at.unwrap(), west_serving_at.unwrap());
    assert!(
        fenced < promoted,
        "east fenced in round {fenced}, west served in round {promoted}"
    );
    // East saw west count failed probes, so west's agreement no longer kept it in quorum.
    assert!(has_event(&sites.east, "QuorumLost"));
    assert_eq!(sites.serving(), vec!["west"]);
    assert_eq!(
        sites.east.status().epoch,
        2,
        "east read the new epoch from west"
    );
}

#[tokio::test]
async fn a_witness_named_on_one_site_only_is_reported_on_both() {
    let sites = converged().await;
    let api: kube::Api<mailpod_operator::crd::SiteFailover> =
        kube::Api::namespaced(sites.west.server.client(), failover_support::NS);
    let body = serde_json::json!({"spec": {"witness": null}});
    api.patch(
        failover_support::SF,
        &Default::default(),
        &kube::api::Patch::Merge(&body),
    )
    .await
    .unwrap();
    assert!(!has_event(&sites.east, "WitnessMismatch"));
    sites.round().await;
    assert!(has_event(&sites.east, "WitnessMismatch"));
    assert!(has_event(&sites.west, "WitnessMismatch"));
}

/// Every step of a round (each site's tick, each MailPod reconcile) with the single-writer check.
async fn checked_round(sites: &Sites, when: &str) {
    sites.advance(INTERVAL);
    sites.west.tick().await;
    assert_one_writer(sites, &format!("{when}, after west's tick"));
    sites.east.tick().await;
    assert_one_writer(sites, &format!("{when}, after east's tick"));
}

#[tokio::test]
async fn a_promotion_asked_at_the_first_failed_probe_waits_until_the_primary_has_stopped() {
    let sites = converged().await;
    // East loses the witness for longer than the Lease: it stays in quorum through west's agreement, and
    // the Lease lapses in west's eyes.
    sites.east.witness_cut.store(true, Ordering::SeqCst);
    for round in 0..6 {
        checked_round(&sites, &format!("witness lost, round {round}")).await;
    }
    assert_eq!(sites.serving(), vec!["east"]);
    // Then west loses east (API and front ends; east still reads west) and a person promotes west at
    // once, after the first failed probe: the promotion must wait until east has stopped.
    sites.west.link_cut.store(true, Ordering::SeqCst);
    sites.east.frontends_up.store(false, Ordering::SeqCst);
    sites.advance(INTERVAL);
    sites.west.tick().await;
    assert_eq!(sites.west.status().consecutive_probe_failures, 1);
    let api: kube::Api<mailpod_operator::crd::SiteFailover> =
        kube::Api::namespaced(sites.west.server.client(), failover_support::NS);
    let body =
        serde_json::json!({"metadata": {"annotations": {"mailpod.io/failover": "requested"}}});
    api.patch(
        failover_support::SF,
        &Default::default(),
        &kube::api::Patch::Merge(&body),
    )
    .await
    .unwrap();
    let _ = sites.west.try_tick().await;
    assert_one_writer(&sites, "promotion requested");
    assert!(!sites.west.serving(), "promoted before east could stop");
    sites.east.tick().await;
    assert_one_writer(&sites, "east saw west's failures");
    assert!(!sites.east.serving(), "east no longer has west's agreement");
    let mut promoted = false;
    for round in 0..8 {
        checked_round(&sites, &format!("after the request, round {round}")).await;
        promoted |= sites.west.serving();
    }
    assert!(promoted, "west took over once the wait was over");
}

#[tokio::test]
async fn a_deleted_lease_is_not_taken_before_a_whole_duration() {
    let sites = converged().await;
    // West's probes of east's front ends have been failing for a while (its view of them is broken), but
    // east renews the Lease and serves: no promotion.
    sites.east.frontends_up.store(false, Ordering::SeqCst);
    for round in 0..6 {
        checked_round(&sites, &format!("probes failing, round {round}")).await;
    }
    assert_eq!(sites.serving(), vec!["east"]);
    // Then east is cut off from everything, and the Lease is deleted (or the witness namespace recreated).
    sites.partition(true);
    sites.east.witness_cut.store(true, Ordering::SeqCst);
    let api: kube::Api<Lease> = kube::Api::namespaced(sites.witness.client(), "mailpod-witness");
    api.delete(LEASE_NAME, &Default::default()).await.unwrap();
    let mut promoted_at = None;
    for round in 1..=8 {
        checked_round(&sites, &format!("lease deleted, round {round}")).await;
        if promoted_at.is_none() && sites.west.serving() {
            promoted_at = Some(round);
        }
    }
    // East renewed last in the round before the cut and fences at its first tick past the 10 s deadline;
    // west first sees the Lease missing one round after the cut and creates it once missing for 20 s.
    assert_eq!(promoted_at, Some(5));
    assert_eq!(lease(&sites), (Some("west".into()), 2));
}

#[tokio::test]
async fn a_lease_left_by_an_earlier_pairing_of_the_same_sites_is_brought_to_this_epoch() {
    let sites = Sites::with_witness().await;
    // Left over from an earlier incarnation: held by east at epoch 5.
    let api: kube::Api<Lease> = kube::Api::namespaced(sites.witness.client(), "mailpod-witness");
    let mut old: Lease = serde_json::from_value(serde_json::json!({
        "metadata": {"name": LEASE_NAME, "namespace": "mailpod-witness",
                     "annotations": {"mailpod.io/epoch": "5",
                                     "mailpod.io/pairing": "corp-geo:east=mail,west=mail"}},
        "spec": {"holderIdentity": "east", "leaseDurationSeconds": 20}
    }))
    .unwrap();
    old.metadata.namespace = Some("mailpod-witness".into());
    api.create(&Default::default(), &old).await.unwrap();
    for _ in 0..3 {
        sites.round().await;
    }
    assert_eq!(lease(&sites), (Some("east".into()), 1));
    // A partition between the sites alone then promotes nobody, as with a fresh Lease.
    sites.partition(true);
    sites.east.frontends_up.store(false, Ordering::SeqCst);
    for round in 0..(THRESHOLD + 6) {
        checked_round(&sites, &format!("partition, round {round}")).await;
    }
    assert_eq!(sites.serving(), vec!["east"]);
}

#[tokio::test]
async fn the_fence_guard_fences_at_the_deadline_when_no_tick_comes() {
    let mut sites = converged().await;
    // Short figures, on both sites: probes every 2 s, a Lease of 8 s, so a renew deadline of 4 s.
    for site in [&sites.east, &sites.west] {
        let api: kube::Api<mailpod_operator::crd::SiteFailover> =
            kube::Api::namespaced(site.server.client(), failover_support::NS);
        let body = serde_json::json!({"spec": {
            "detection": {"probeIntervalSeconds": 2, "probeTimeoutSeconds": 1, "failureThreshold": 3},
            "witness": {"leaseDurationSeconds": 8}}});
        api.patch(
            failover_support::SF,
            &Default::default(),
            &kube::api::Patch::Merge(&body),
        )
        .await
        .unwrap();
    }
    sites.east.failover.fence_guard = true;
    sites.east.tick().await;
    assert_eq!(sites.serving(), vec!["east"]);
    // A tick renews within the deadline: the guard is re-armed from then.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    sites.east.tick().await;
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    assert_eq!(
        sites.serving(),
        vec!["east"],
        "re-armed by the second renewal"
    );
    // No tick comes (the operator is stuck in slow calls, say): the guard fences at the deadline.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert!(
        sites.east.luns().iter().all(|l| l.spec.fenced),
        "the guard fenced east's stores"
    );
    assert!(sites.serving().is_empty());
    // The next tick that renews unfences them.
    sites.east.tick().await;
    assert_eq!(sites.serving(), vec!["east"]);
}

/// East cut off from everything; west takes over. Returns once west serves.
async fn fail_over_to_west(sites: &Sites) {
    sites.partition(true);
    sites.east.witness_cut.store(true, Ordering::SeqCst);
    sites.east.frontends_up.store(false, Ordering::SeqCst);
    for round in 0..6 {
        checked_round(sites, &format!("failing over, round {round}")).await;
    }
    assert_eq!(sites.serving(), vec!["west"]);
}

#[tokio::test]
async fn a_stale_old_primary_never_serves_beside_the_new_active_site_over_a_deleted_lease() {
    let sites = converged().await;
    fail_over_to_west(&sites).await;
    // East reaches the witness again but still not west, and the Lease is deleted: east must not recreate
    // it at epoch 1 and serve beside west.
    sites.east.witness_cut.store(false, Ordering::SeqCst);
    let api: kube::Api<Lease> = kube::Api::namespaced(sites.witness.client(), "mailpod-witness");
    api.delete(LEASE_NAME, &Default::default()).await.unwrap();
    for round in 0..12 {
        checked_round(&sites, &format!("lease deleted, round {round}")).await;
    }
    // The sites see each other again: west serves at epoch 2.
    sites.partition(false);
    sites.east.frontends_up.store(true, Ordering::SeqCst);
    for round in 0..6 {
        checked_round(&sites, &format!("reunited, round {round}")).await;
    }
    assert_eq!(sites.serving(), vec!["west"]);
    assert_eq!(sites.east.status().epoch, 2);
}

#[tokio::test]
async fn a_failback_cut_off_mid_pause_never_resumes_beside_a_promoted_primary() {
    let sites = converged().await;
    fail_over_to_west(&sites).await;
    sites.partition(false);
    sites.east.witness_cut.store(false, Ordering::SeqCst);
    sites.east.frontends_up.store(true, Ordering::SeqCst);
    for round in 0..2 {
        checked_round(&sites, &format!("east back, round {round}")).await;
    }
    sites.east.set_lag(3.0).await;
    sites.east.annotate_failback().await;
    checked_round(&sites, "failback requested").await;
    assert_eq!(sites.west.status().phase, FailoverPhase::FailingBack);
    // West, paused for the final sync, is cut off from east and the witness; east's probes of west fail.
    sites.partition(true);
    sites.west.witness_cut.store(true, Ordering::SeqCst);
    sites.west.frontends_up.store(false, Ordering::SeqCst);
    let mut east_served = false;
    // Past the RTO target (60 s), when west gives the failback up.
    for round in 0..16 {
        checked_round(&sites, &format!("cut off mid-pause, round {round}")).await;
        east_served |= sites.east.serving();
    }
    assert!(east_served, "east took over with the witness");
    assert!(!sites.west.serving(), "west did not resume out of quorum");
}
