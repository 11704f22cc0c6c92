//! Site failover of a MailPod whose stores replicate by block mirroring (`replication.method: Volume`),
//! between two in-memory clusters: the standby gets PersistentVolumes for the mirrored images and claims
//! bound to them, keeps its LUNs fenced with no store running and its images secondary; after the primary
//! is lost the standby's images are promoted before its stores start; the returning old primary is fenced
//! and demotes its images only once its stores are gone.
//!
//! Nothing binds claims or fills VolumeReplication status in the in-memory API: the test plays the storage
//! (tests/storage_support) and the StatefulSet controller.

mod failover_support;
mod storage_support;

use std::sync::atomic::Ordering;

use failover_support::{mailpod_manifest, Site, Sites, INTERVAL, NS, THRESHOLD};
use jiff::{Timestamp, ToSpan};
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use mailpod_operator::crd::{FailoverPhase, StorageLUN};
use serde_json::json;
use storage_support::*;

const LUN: &str = "corp-lun-0";
const CLAIMS: [&str; 2] = ["mail-corp-lun-0-0", "mail-corp-lun-0-1"];

fn volume_mailpod() -> serde_json::Value {
    let mut mp = mailpod_manifest();
    mp["spec"]["backend"] =
        json!({"replication": {"method": "Volume", "volumeReplicationClass": CLASS}});
    mp
}

/// Both sites' StorageLUN controllers and the StatefulSet controller they rely on, once.
async fn settle_stores(sites: &Sites) {
    for site in [&sites.east, &sites.west] {
        site.settle_luns().await;
        follow_statefulset(&site.server, NS, LUN).await;
        site.settle_luns().await;
    }
}

/// A probe interval with the stores following.
async fn round(sites: &Sites) {
    sites.round().await;
    settle_stores(sites).await;
}

fn lun(site: &Site) -> StorageLUN {
    site.server.get::<StorageLUN>(NS, LUN).expect("the LUN")
}

fn store_pods(site: &Site) -> Vec<String> {
    site.server
        .list::<Pod>(Some(NS))
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect()
}

fn degraded(l: &StorageLUN) -> (String, String) {
    let c = l
        .status
        .as_ref()
        .unwrap()
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .unwrap();
    (c.reason.clone(), c.message.clone())
}

/// East serves from images that its storage mirrors to west; west is the live standby.
async fn converged() -> Sites {
    let sites = Sites::with_mailpod(volume_mailpod()).await;
    create_replication_class(&sites.east.server).await;
    create_replication_class(&sites.west.server).await;
    // East's LUN starts its stores; the provisioner binds their claims to fresh RBD images, csi-addons
    // promotes them and reports the last mirror snapshot 20 s ago.
    sites.east.settle_luns().await;
    assert_eq!(store_replicas(&sites.east.server, NS, LUN), Some(2));
    for (i, claim) in CLAIMS.into_iter().enumerate() {
        provision_bound_claim(
            &sites.east.server,
            NS,
            claim,
            &format!("pvc-east-{i}"),
            json!({"mailpod.io/lun": LUN, "mailpod.io/mailpod": "corp"}),
        )
        .await;
        report_state(
            &sites.east.server,
            NS,
            claim,
            "Primary",
            Some(Timestamp::now() - 20.seconds()),
        )
        .await;
    }
    settle_stores(&sites).await;
    for _ in 0..3 {
        round(&sites).await;
    }
    sites
}

#[tokio::test]
async fn volume_replicated_mailpod_fails_over_and_back_in_the_right_order() {
    let sites = converged().await;
    let (east, west) = (&sites.east, &sites.west);
    assert_eq!(sites.serving(), vec!["east"]);

    // --- The live standby -------------------------------------------------------------------------
    // West's LUN was created fenced by the mirror step (a POST; the MailPod controller applies), before
    // its MailPod could start stores on fresh volumes: no store pod ever ran at west.
    let standby = lun(west);
    assert!(standby.spec.fenced);
    let requests = west.server.requests();
    let created_luns: Vec<_> = requests
        .iter()
        .filter(|r| r.method == http::Method::POST && r.path.ends_with("/storageluns"))
        .collect();
    assert_eq!(created_luns.len(), 1, "{created_luns:?}");
    assert!(
        !requests
            .iter()
            .any(|r| r.method == http::Method::POST && r.path.ends_with("/pods")),
        "a store started at the standby"
    );
    assert_eq!(
        standby
            .metadata
            .owner_references
            .as_ref()
            .map(|o| o[0].kind.as_str()),
        Some("MailPod"),
        "adopted by west's own MailPod"
    );
    for (i, claim) in CLAIMS.into_iter().enumerate() {
        let name = format!("pvc-east-{i}");
        let theirs: PersistentVolume = east.server.get("", &name).unwrap();
        let pv: PersistentVolume = west
            .server
            .get("", &name)
            .expect("a PV for the mirrored image, named as at the primary");
        let spec = pv.spec.as_ref().unwrap();
        assert_eq!(
            spec.persistent_volume_reclaim_policy.as_deref(),
            Some("Retain")
        );
        let csi = spec.csi.as_ref().unwrap();
        assert_eq!(csi.volume_handle, handle(&name));
        assert_eq!(spec.csi, theirs.spec.as_ref().unwrap().csi, "same image");
        let claim_ref = spec.claim_ref.as_ref().unwrap();
        assert_eq!(
            (claim_ref.namespace.as_deref(), claim_ref.name.as_deref()),
            (Some(NS), Some(claim))
        );
        assert_eq!(
            pv.metadata.labels.as_ref().unwrap()["mailpod.io/mirrored-from"],
            "east"
        );
        let pvc: PersistentVolumeClaim = west.server.get(NS, claim).expect("the standby's claim");
        assert_eq!(
            pvc.spec.as_ref().unwrap().volume_name.as_deref(),
            Some(name.as_str())
        );
        assert_eq!(pvc.metadata.labels.as_ref().unwrap()["mailpod.io/lun"], LUN);
        assert_eq!(
            pvc.spec
                .as_ref()
                .unwrap()
                .resources
                .as_ref()
                .unwrap()
                .requests
                .as_ref()
                .unwrap()["storage"]
                .0,
            "50Gi",
            "the size of the StatefulSet's volumeClaimTemplate"
        );
        // The PV controller binds the pre-bound claim.
        bind(&west.server, NS, claim).await;
    }
    assert_eq!(store_replicas(&west.server, NS, LUN), Some(0));
    assert!(
        store_pods(west).is_empty(),
        "no store runs on secondary images"
    );
    assert_eq!(
        requested_states(&west.server, NS).await,
        [
            (CLAIMS[0].to_string(), "secondary".to_string()),
            (CLAIMS[1].to_string(), "secondary".to_string())
        ]
    );
    assert_eq!(
        requested_states(&east.server, NS).await,
        [
            (CLAIMS[0].to_string(), "primary".to_string()),
            (CLAIMS[1].to_string(), "primary".to_string())
        ]
    );
    assert_eq!(store_replicas(&east.server, NS, LUN), Some(2));
    for claim in CLAIMS {
        report_state(&west.server, NS, claim, "Secondary", None).await;
    }

    // The lag is the active site's: its images' oldest lastSyncTime, 20 s ago, in status as its step.
    let east_lag = lun(east).status.unwrap().replication_lag_seconds.unwrap();
    assert_eq!(east_lag, 30.0);
    assert_eq!(lun(west).status.unwrap().replication_lag_seconds, None);
    round(&sites).await;
    for s in [east.status(), west.status()] {
        assert_eq!(s.replication_lag_seconds, Some(east_lag));
    }

    // Mirroring again creates nothing: what exists is never rewritten.
    west.server.clear_requests();
    sites.advance(INTERVAL);
    west.tick().await;
    let writes = west.writes();
    assert!(writes.is_empty(), "steady standby wrote {writes:?}");

    // --- East is lost; west is promoted ------------------------------------------------------------
    let last_read = lun(east).status.unwrap().replication_lag_seconds.unwrap();
    sites.partition(true);
    east.frontends_up.store(false, Ordering::SeqCst);
    for _ in 0..THRESHOLD {
        sites.advance(INTERVAL);
        west.tick().await;
        east.tick().await; // east, cut off, keeps serving its island
    }
    let w = west.status();
    assert_eq!((w.active_site.as_deref(), w.epoch), (Some("west"), 2));
    assert_eq!(w.phase, FailoverPhase::FailedOver);
    assert_eq!(
        w.last_failover.unwrap().rpo_seconds,
        Some(last_read + f64::from(THRESHOLD) * INTERVAL as f64),
        "the active site's images were out of reach: the last lag read plus the time since, an upper bound"
    );
    assert!(!lun(west).spec.fenced);

    // Images asked primary first; the stores wait for csi-addons to report it.
    west.settle_luns().await;
    assert_eq!(
        requested_states(&west.server, NS).await,
        [
            (CLAIMS[0].to_string(), "primary".to_string()),
            (CLAIMS[1].to_string(), "primary".to_string())
        ]
    );
    assert_eq!(store_replicas(&west.server, NS, LUN), Some(0));
    let (reason, message) = degraded(&lun(west));
    assert_eq!(reason, "AwaitingVolumePrimary");
    assert!(message.contains(CLAIMS[0]), "{message}");
    report_state(&west.server, NS, CLAIMS[0], "Primary", None).await;
    west.settle_luns().await;
    assert_eq!(store_replicas(&west.server, NS, LUN), Some(0));
    report_state(&west.server, NS, CLAIMS[1], "Primary", None).await;
    west.settle_luns().await;
    assert_eq!(store_replicas(&west.server, NS, LUN), Some(2));
    follow_statefulset(&west.server, NS, LUN).await;
    west.settle_luns().await;
    west.settle_luns().await;
    assert_eq!(
        lun(west).status.unwrap().current_active.as_deref(),
        Some("corp-lun-0-0"),
        "west's stores serve the mirrored mail"
    );

    // --- East returns: fenced under epoch 2; its images demoted only after its stores are gone ------
    sites.partition(false);
    east.frontends_up.store(true, Ordering::SeqCst);
    sites.advance(INTERVAL);
    east.tick().await;
    let e = east.status();
    assert_eq!((e.epoch, e.fenced), (2, Some(true)));
    assert!(lun(east).spec.fenced);
    east.settle_luns().await;
    assert_eq!(store_replicas(&east.server, NS, LUN), Some(0));
    assert_eq!(store_pods(east).len(), 2);
    assert_eq!(
        requested_states(&east.server, NS).await,
        [
            (CLAIMS[0].to_string(), "primary".to_string()),
            (CLAIMS[1].to_string(), "primary".to_string())
        ],
        "still primary while its stores run"
    );
    assert_eq!(degraded(&lun(east)).0, "StoppingStores");
    follow_statefulset(&east.server, NS, LUN).await;
    assert!(store_pods(east).is_empty());
    east.settle_luns().await;
    assert_eq!(
        requested_states(&east.server, NS).await,
        [
            (CLAIMS[0].to_string(), "secondary".to_string()),
            (CLAIMS[1].to_string(), "secondary".to_string())
        ]
    );

    // East is now the standby: it mirrors from west, but its own claims exist and are left as they are.
    east.server.clear_requests();
    for _ in 0..2 {
        round(&sites).await;
    }
    assert_eq!(sites.serving(), vec!["west"]);
    let created: Vec<_> = east
        .server
        .mutating_requests()
        .into_iter()
        .filter(|r| r.path.contains("persistentvolume"))
        .collect();
    assert!(created.is_empty(), "{created:?}");
    let claim: PersistentVolumeClaim = east.server.get(NS, CLAIMS[0]).unwrap();
    assert_eq!(
        claim.spec.unwrap().volume_name.as_deref(),
        Some("pvc-east-0"),
        "east keeps its own image, which resyncs from west"
    );
}

/// The primary's front ends fail while its API still answers: the RPO is the active site's image lag at
/// the promotion, and the new active site fences the old primary directly, whose images are demoted only
/// after its stores are gone.
#[tokio::test]
async fn with_the_primarys_api_reachable_the_rpo_is_its_image_lag() {
    let sites = converged().await;
    let (east, west) = (&sites.east, &sites.west);
    for claim in CLAIMS {
        bind(&west.server, NS, claim).await;
    }
    let east_lag = lun(east).status.unwrap().replication_lag_seconds.unwrap();
    east.frontends_up.store(false, Ordering::SeqCst);
    for _ in 0..THRESHOLD {
        sites.advance(INTERVAL);
        west.tick().await;
    }
    let w = west.status();
    assert_eq!(w.active_site.as_deref(), Some("west"));
    assert_eq!(w.last_failover.unwrap().rpo_seconds, Some(east_lag));
    // West told east and fenced its LUN in the same tick.
    assert!(lun(east).spec.fenced);
    east.settle_luns().await;
    assert_eq!(store_replicas(&east.server, NS, LUN), Some(0));
    assert_eq!(
        requested_state(&east.server, NS, CLAIMS[0])
            .await
            .as_deref(),
        Some("primary"),
        "east's stores still run"
    );
    follow_statefulset(&east.server, NS, LUN).await;
    east.settle_luns().await;
    assert_eq!(
        requested_state(&east.server, NS, CLAIMS[0])
            .await
            .as_deref(),
        Some("secondary")
    );
    // West promotes its images, then starts its stores.
    west.settle_luns().await;
    assert_eq!(store_replicas(&west.server, NS, LUN), Some(0));
    for claim in CLAIMS {
        report_state(&west.server, NS, claim, "Primary", None).await;
    }
    west.settle_luns().await;
    assert_eq!(store_replicas(&west.server, NS, LUN), Some(2));
}

/// Planned failback of a block-replicated MailPod: west pauses delivery, stops its stores, demotes its
/// images, and hands over only once csi-addons reports the demoted images in sync (the primary's copy holds
/// every write); east then promotes its images before starting its stores. No phase has two sites'
/// stores running or two primaries asked for.
#[tokio::test]
async fn planned_failback_waits_for_the_demoted_images_to_reach_the_primary() {
    let sites = converged().await;
    let (east, west) = (&sites.east, &sites.west);
    for claim in CLAIMS {
        bind(&west.server, NS, claim).await;
    }
    // East fails; west takes over and serves from its images.
    east.frontends_up.store(false, Ordering::SeqCst);
    for _ in 0..THRESHOLD {
        sites.advance(INTERVAL);
        west.tick().await;
    }
    assert_eq!(west.status().active_site.as_deref(), Some("west"));
    west.settle_luns().await;
    for claim in CLAIMS {
        report_state(
            &west.server,
            NS,
            claim,
            "Primary",
            Some(Timestamp::now() - 5.seconds()),
        )
        .await;
    }
    settle_stores(&sites).await;
    for claim in CLAIMS {
        report_state(&east.server, NS, claim, "Secondary", None).await;
    }
    east.frontends_up.store(true, Ordering::SeqCst);
    round(&sites).await;
    assert_eq!(sites.serving(), vec!["west"]);
    assert_eq!(store_replicas(&west.server, NS, LUN), Some(2));
    assert_eq!(store_replicas(&east.server, NS, LUN), Some(0));

    // Failback requested: west pauses (fences), its stores stop, its images are demoted.
    east.annotate_failback().await;
    round(&sites).await;
    assert_eq!(west.status().phase, FailoverPhase::FailingBack);
    assert!(lun(west).spec.fenced);
    assert_eq!(store_replicas(&west.server, NS, LUN), Some(0));
    assert_eq!(
        requested_states(&west.server, NS).await,
        [
            (CLAIMS[0].to_string(), "secondary".to_string()),
            (CLAIMS[1].to_string(), "secondary".to_string())
        ]
    );
    // Demoted but not yet shipped: no handover, whatever the time.
    for claim in CLAIMS {
        report_state(&west.server, NS, claim, "Secondary", None).await;
    }
    for _ in 0..3 {
        round(&sites).await;
        assert_eq!(west.status().phase, FailoverPhase::FailingBack);
        assert!(
            sites.serving().is_empty(),
            "delivery paused: mail waits in the mx queues"
        );
        assert_eq!(lun(west).status.unwrap().replication_lag_seconds, None);
        assert!(lun(east).spec.fenced);
    }
    // One image in sync is not enough.
    report_demoted_in_sync(&west.server, NS, CLAIMS[0]).await;
    round(&sites).await;
    assert_eq!(west.status().phase, FailoverPhase::FailingBack);
    // Both in sync: the final sync is done (lag 0) and the roles swap.
    report_demoted_in_sync(&west.server, NS, CLAIMS[1]).await;
    settle_stores(&sites).await;
    assert_eq!(lun(west).status.unwrap().replication_lag_seconds, Some(0.0));
    round(&sites).await;
    let w = west.status();
    assert_eq!((w.active_site.as_deref(), w.epoch), (Some("east"), 3));
    let rec = w.last_failover.unwrap();
    assert_eq!(
        (rec.kind.as_str(), rec.rpo_seconds),
        ("failback", Some(0.0))
    );
    assert!(!lun(east).spec.fenced);
    // East promotes its images first and starts its stores once csi-addons reports them Primary.
    assert_eq!(
        requested_states(&east.server, NS).await,
        [
            (CLAIMS[0].to_string(), "primary".to_string()),
            (CLAIMS[1].to_string(), "primary".to_string())
        ]
    );
    assert_eq!(store_replicas(&east.server, NS, LUN), Some(0));
    for claim in CLAIMS {
        report_state(&east.server, NS, claim, "Primary", None).await;
    }
    settle_stores(&sites).await;
    assert_eq!(store_replicas(&east.server, NS, LUN), Some(2));
    assert_eq!(store_replicas(&west.server, NS, LUN), Some(0));
    assert_eq!(
        requested_states(&west.server, NS).await,
        [
            (CLAIMS[0].to_string(), "secondary".to_string()),
            (CLAIMS[1].to_string(), "secondary".to_string())
        ]
    );
}
