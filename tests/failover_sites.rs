//! Site failover between two in-memory clusters: table mirroring, loss and promotion at the threshold,
//! partition and return with fencing, planned failback, and an operator restart mid-failover.

mod failover_support;

use std::sync::atomic::Ordering;

use failover_support::{Sites, INTERVAL, NS, SF, THRESHOLD};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use mailpod_operator::crd::{FailoverPhase, MailPod, StorageLUN};
use serde_json::json;

/// Where the DNSEndpoint of a site points, if it publishes one.
async fn dns_target(server: &mailpod_operator::testkit::ApiServer) -> Option<String> {
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("externaldns.k8s.io", "v1alpha1", "DNSEndpoint"),
        "dnsendpoints",
    );
    let list = Api::<DynamicObject>::namespaced_with(server.client(), NS, &ar)
        .list(&Default::default())
        .await
        .unwrap();
    list.items.first().and_then(|o| {
        o.data["spec"]["endpoints"][0]["targets"][0]
            .as_str()
            .map(String::from)
    })
}

/// Both sites converged: west mirrors east, tables equal, east serves, west fenced.
async fn converged() -> Sites {
    let sites = Sites::new().await;
    for _ in 0..3 {
        sites.round().await;
    }
    sites
}

#[tokio::test]
async fn standby_mirrors_the_primary_and_table_changes_follow() {
    let sites = converged().await;
    let (e, w) = (sites.east.status(), sites.west.status());
    assert_eq!(sites.serving(), vec!["east"]);
    assert_eq!(e.epoch, 1);
    assert_eq!(w.active_site.as_deref(), Some("east"));
    assert_eq!(w.fenced, Some(true));
    let east_hash = sites
        .east
        .mailpod()
        .unwrap()
        .status
        .unwrap()
        .access_tables_hash;
    let west_hash = sites
        .west
        .mailpod()
        .unwrap()
        .status
        .unwrap()
        .access_tables_hash;
    assert!(east_hash.is_some());
    assert_eq!(east_hash, west_hash, "the standby renders the same tables");
    assert_eq!(w.access_tables_in_sync, Some(true));
    assert_eq!(w.phase, FailoverPhase::Healthy);
    // Only the active site publishes the DNS name, pointing at its own load balancer.
    assert_eq!(
        dns_target(&sites.east.server).await.as_deref(),
        Some("192.0.2.10")
    );
    assert_eq!(dns_target(&sites.west.server).await, None);

    // A table change at the primary reaches the standby within one probe interval.
    let synced_before = w.last_table_sync.clone();
    let api: Api<MailPod> = Api::namespaced(sites.east.server.client(), NS);
    let patch = json!({"spec": {"accessTables": {"recipientAccess": [
        {"pattern": "noreply@corp.example", "action": "REJECT"},
        {"pattern": "@spam.example", "action": "REJECT"}]}}});
    api.patch("corp", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    sites.east.settle_mailpod().await;
    let new_hash = sites
        .east
        .mailpod()
        .unwrap()
        .status
        .unwrap()
        .access_tables_hash;
    assert_ne!(new_hash, east_hash);
    sites.west.tick().await; // mirrors the spec
    sites.west.settle_mailpod().await; // the standby renders it
    sites.advance(INTERVAL);
    sites.west.tick().await; // compares the hashes
    let w = sites.west.status();
    assert_eq!(
        sites
            .west
            .mailpod()
            .unwrap()
            .status
            .unwrap()
            .access_tables_hash,
        new_hash
    );
    assert_eq!(w.access_tables_in_sync, Some(true));
    assert_eq!(w.local_access_tables_hash, new_hash);
    assert_ne!(
        w.last_table_sync, synced_before,
        "the sync time moves with the new tables"
    );

    // A steady state writes nothing on either site.
    sites.round().await;
    sites.east.server.clear_requests();
    sites.west.server.clear_requests();
    sites.advance(INTERVAL);
    sites.west.tick().await;
    sites.east.tick().await;
    for s in [&sites.east, &sites.west] {
        let m = s.writes();
        assert!(m.is_empty(), "steady state wrote {m:?}");
    }
}

/// The primary exposes LUN 0's replication Service; the standby's LUN learns its address and shares the
/// primary's doveadm password, so its fenced replicas can pull across sites.
#[tokio::test]
async fn standby_luns_pull_from_the_primarys_replication_service() {
    use k8s_openapi::api::core::v1::{Secret, Service};
    let sites = converged().await;
    let east = sites.east.server.client();
    let lun = "corp-lun-0";
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": format!("{lun}-replication"), "namespace": NS},
        "data": {"doveadm-password": "c2VjcmV0LW9mLWVhc3Q="}
    }))
    .unwrap();
    Api::<Secret>::namespaced(east.clone(), NS)
        .create(&Default::default(), &secret)
        .await
        .unwrap();
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": format!("{lun}-replication"), "namespace": NS},
        "spec": {"type": "LoadBalancer", "ports": [{"name": "doveadm-tls", "port": 12346}]}
    }))
    .unwrap();
    let services = Api::<Service>::namespaced(east.clone(), NS);
    services.create(&Default::default(), &svc).await.unwrap();
    // The standby's own LUN controller made a password of its own first (as on a real cluster); the
    // primary's replaces it.
    let own: Secret = serde_json::from_value(json!({
        "metadata": {"name": format!("{lun}-replication"), "namespace": NS,
                     "labels": {"app.kubernetes.io/managed-by": "mailpod-operator"}},
        "data": {"doveadm-password": "b3duLW9mLXdlc3Q="}
    }))
    .unwrap();
    Api::<Secret>::namespaced(sites.west.server.client(), NS)
        .create(&Default::default(), &own)
        .await
        .unwrap();

    // No load-balancer address yet: nothing to point at.
    sites.advance(INTERVAL);
    sites.west.tick().await;
    let luns = Api::<StorageLUN>::namespaced(sites.west.server.client(), NS);
    assert_eq!(luns.get(lun).await.unwrap().spec.replication_source, None);
    let west_secret = Api::<Secret>::namespaced(sites.west.server.client(), NS)
        .get(&format!("{lun}-replication"))
        .await
        .unwrap();
    assert_eq!(
        west_secret.data.unwrap()["doveadm-password"].0,
        b"secret-of-east".to_vec(),
        "both sites' replicas share the primary's password"
    );

    services
        .patch_status(
            &format!("{lun}-replication"),
            &PatchParams::default(),
            &Patch::Merge(
                json!({"status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.9"}]}}}),
            ),
        )
        .await
        .unwrap();
    sites.advance(INTERVAL);
    sites.west.tick().await;
    let standby_lun = luns.get(lun).await.unwrap();
    assert_eq!(
        standby_lun.spec.replication_source.as_deref(),
        Some("198.51.100.9:12346"),
        "the replication Service's TLS port"
    );
    assert!(
        standby_lun.spec.fenced,
        "the standby's replicas pull; none serves"
    );

    // Nothing more to write while the address holds.
    sites.west.server.clear_requests();
    sites.advance(INTERVAL);
    sites.west.tick().await;
    let m = sites.west.writes();
    assert!(m.is_empty(), "steady state wrote {m:?}");
}

/// The standby's stores verify the primary's doveadm certificate with the CA of the site replication
/// Secret, and present the same certificate once promoted: the mirror copies it, and a renewal follows.
#[tokio::test]
async fn the_standby_holds_the_primarys_site_replication_certificate() {
    use k8s_openapi::api::core::v1::Secret;
    let mut manifest = failover_support::mailpod_manifest();
    manifest["spec"]["backend"] = json!({"siteReplication": {
        "sourceRanges": ["198.51.100.0/24"],
        "tls": {"secretName": "corp-site-tls"}
    }});
    let sites = Sites::with_mailpod(manifest).await;
    let tls = |crt: &str| -> Secret {
        serde_json::from_value(json!({
            "metadata": {"name": "corp-site-tls", "namespace": NS},
            "type": "kubernetes.io/tls",
            "stringData": {"tls.crt": crt, "tls.key": "key", "ca.crt": "ca"}
        }))
        .unwrap()
    };
    let east_secrets = Api::<Secret>::namespaced(sites.east.server.client(), NS);
    let west_secrets = Api::<Secret>::namespaced(sites.west.server.client(), NS);
    east_secrets
        .create(&Default::default(), &tls("crt-1"))
        .await
        .unwrap();
    for _ in 0..3 {
        sites.round().await;
    }
    let data = |s: Secret| {
        let mut d: Vec<(String, Vec<u8>)> = s
            .data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.0))
            .collect();
        d.extend(
            s.string_data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.into_bytes())),
        );
        d.sort();
        d
    };
    let want = |crt: &str| {
        vec![
            ("ca.crt".to_string(), b"ca".to_vec()),
            ("tls.crt".to_string(), crt.as_bytes().to_vec()),
            ("tls.key".to_string(), b"key".to_vec()),
        ]
    };
    assert_eq!(
        data(west_secrets.get("corp-site-tls").await.unwrap()),
        want("crt-1"),
        "the standby holds the primary's certificate, key and CA"
    );
    assert_eq!(
        sites.west.mailpod().unwrap().spec.backend.site_replication,
        sites.east.mailpod().unwrap().spec.backend.site_replication,
        "both sites' MailPods name it"
    );

    // A renewal at the primary (cert-manager rewrites the Secret) reaches the standby.
    east_secrets
        .replace("corp-site-tls", &Default::default(), &tls("crt-2"))
        .await
        .unwrap();
    sites.round().await;
    assert_eq!(
        data(west_secrets.get("corp-site-tls").await.unwrap()),
        want("crt-2")
    );
}

/// East's site goes dark: its API and its front ends stop answering.
async fn lose_east(sites: &Sites) {
    sites.partition(true);
    sites.east.frontends_up.store(false, Ordering::SeqCst);
}

#[tokio::test]
async fn primary_loss_promotes_the_standby_at_exactly_the_threshold() {
    let sites = converged().await;
    sites.west.set_lag(2.0).await;
    lose_east(&sites).await;
    for probe in 1..THRESHOLD {
        sites.advance(INTERVAL);
        sites.west.tick().await;
        let w = sites.west.status();
        assert_eq!(w.consecutive_probe_failures, probe);
        assert_eq!(
            w.active_site.as_deref(),
            Some("east"),
            "promoted before the threshold"
        );
        assert_eq!(w.phase, FailoverPhase::Degraded);
        // Extra reconciles within the interval do not count as probes.
        sites.west.tick().await;
        assert_eq!(sites.west.status().consecutive_probe_failures, probe);
    }
    sites.advance(INTERVAL);
    sites.west.tick().await;
    let w = sites.west.status();
    assert_eq!(w.active_site.as_deref(), Some("west"));
    assert_eq!(w.epoch, 2);
    assert_eq!(w.phase, FailoverPhase::FailedOver);
    assert!(
        sites.west.luns().iter().all(|l| !l.spec.fenced),
        "standby stores active"
    );
    let rec = w.last_failover.unwrap();
    assert_eq!(rec.kind, "failover");
    // First failed probe to promotion: (threshold - 1) intervals on the injected clock.
    assert_eq!(
        rec.rto_seconds,
        Some(f64::from(THRESHOLD - 1) * INTERVAL as f64)
    );
    assert_eq!(rec.rpo_seconds, Some(2.0));
    assert_eq!(
        dns_target(&sites.west.server).await.as_deref(),
        Some("198.51.100.10")
    );
}

#[tokio::test]
async fn a_returning_primary_fences_itself_and_two_sites_never_serve() {
    let sites = converged().await;
    lose_east(&sites).await;
    for _ in 0..THRESHOLD {
        sites.advance(INTERVAL);
        sites.west.tick().await;
        // East, cut off, keeps serving its island: its mail path never waits on the other site.
        sites.east.tick().await;
    }
    assert_eq!(sites.west.status().epoch, 2);
    assert_eq!(sites.east.status().active_site.as_deref(), Some("east"));
    assert!(sites.east.status().epoch < sites.west.status().epoch);

    // The link returns. Whichever site ticks first, the old primary is fenced by the end of that tick.
    sites.partition(false);
    sites.east.frontends_up.store(true, Ordering::SeqCst);
    sites.east.tick().await;
    sites.assert_single_writer();
    let e = sites.east.status();
    assert_eq!(e.epoch, 2);
    assert_eq!(e.active_site.as_deref(), Some("west"));
    assert_eq!(e.fenced, Some(true));
    assert!(sites.east.luns().iter().all(|l| l.spec.fenced));
    assert_eq!(e.phase, FailoverPhase::FailedOver);
    for _ in 0..3 {
        sites.round().await;
    }
    assert_eq!(sites.serving(), vec!["west"]);
    assert_eq!(
        dns_target(&sites.east.server).await,
        None,
        "the old primary withdrew its DNS name"
    );
}

#[tokio::test]
async fn the_new_active_site_fences_a_returning_primary_that_has_not_looked_yet() {
    let sites = converged().await;
    lose_east(&sites).await;
    for _ in 0..THRESHOLD {
        sites.advance(INTERVAL);
        sites.west.tick().await;
    }
    sites.partition(false);
    sites.west.tick().await;
    sites.assert_single_writer();
    assert!(sites.east.luns().iter().all(|l| l.spec.fenced));
    assert_eq!(sites.east.status().epoch, 2);
}

#[tokio::test]
async fn planned_failback_resyncs_then_swaps_roles() {
    let sites = converged().await;
    lose_east(&sites).await;
    for _ in 0..THRESHOLD {
        sites.advance(INTERVAL);
        sites.west.tick().await;
    }
    sites.partition(false);
    sites.east.frontends_up.store(true, Ordering::SeqCst);
    for _ in 0..2 {
        sites.round().await;
    }
    // Manual by default: nothing happens without a request.
    assert_eq!(sites.serving(), vec!["west"]);

    // Requested while east is still far behind: waits for resync.
    sites.east.set_lag(300.0).await;
    sites.east.annotate_failback().await;
    sites.round().await;
    assert_eq!(sites.west.status().phase, FailoverPhase::FailedOver);
    assert_eq!(sites.serving(), vec!["west"]);

    // Resynchronised within the RPO: west pauses delivery (fences its stores) for the final sync.
    sites.east.set_lag(3.0).await;
    sites.round().await;
    assert_eq!(sites.west.status().phase, FailoverPhase::FailingBack);
    assert!(
        sites.serving().is_empty(),
        "delivery paused: mail waits in the mx queues"
    );
    sites.east.set_lag(0.0).await;
    sites.round().await;
    let (e, w) = (sites.east.status(), sites.west.status());
    assert_eq!(sites.serving(), vec!["east"]);
    assert_eq!((e.epoch, w.epoch), (3, 3));
    assert_eq!(w.active_site.as_deref(), Some("east"));
    assert_eq!(w.phase, FailoverPhase::Healthy);
    let rec = w.last_failover.unwrap();
    assert_eq!(rec.kind, "failback");
    assert_eq!(rec.rpo_seconds, Some(0.0));
    // One probe interval of paused delivery on the injected clock.
    assert_eq!(rec.rto_seconds, Some(INTERVAL as f64));
    let east_sf = sites
        .east
        .server
        .get::<mailpod_operator::crd::SiteFailover>(NS, SF)
        .unwrap();
    assert!(!east_sf
        .metadata
        .annotations
        .unwrap_or_default()
        .contains_key("mailpod.io/failback"));
    assert_eq!(
        dns_target(&sites.east.server).await.as_deref(),
        Some("192.0.2.10")
    );
    assert_eq!(dns_target(&sites.west.server).await, None);
}

#[tokio::test]
async fn a_restart_in_the_middle_of_a_failover_finishes_it() {
    let mut sites = converged().await;
    lose_east(&sites).await;
    for _ in 1..THRESHOLD {
        sites.advance(INTERVAL);
        sites.west.tick().await;
    }
    // The promoting tick records its decision, then dies before acting: fail every LUN write once.
    sites.advance(INTERVAL);
    sites.west.fail_next_lun_write();
    assert!(sites.west.try_tick().await.is_err());
    let w = sites.west.status();
    assert_eq!(w.phase, FailoverPhase::FailingOver);
    assert_eq!(w.epoch, 2);
    assert!(
        sites.west.luns().iter().any(|l| l.spec.fenced),
        "not yet promoted"
    );

    // A new operator process: no memory, only the stored status.
    sites.restart_west();
    sites.advance(1);
    sites.west.tick().await;
    let w = sites.west.status();
    assert_eq!(w.phase, FailoverPhase::FailedOver);
    assert_eq!(w.epoch, 2, "resumed, not promoted twice");
    assert!(sites.west.luns().iter().all(|l| !l.spec.fenced));
    let rec = w.last_failover.unwrap();
    assert_eq!(
        rec.rto_seconds,
        Some(f64::from(THRESHOLD - 1) * INTERVAL as f64 + 1.0)
    );
}

/// A Secret at the standby that the mirror did not make is never overwritten; the failed mirror step is
/// reported and holds up nothing else: with the primary's front ends down (its API still answering) the
/// standby promotes at the threshold.
#[tokio::test]
async fn a_secret_the_mirror_did_not_make_is_left_alone_and_promotion_goes_on() {
    use k8s_openapi::api::core::v1::Secret;
    use k8s_openapi::api::events::v1::Event;
    let sites = converged().await;
    let secret = |ns_data: &str| -> Secret {
        serde_json::from_value(json!({
            "metadata": {"name": "corp-lun-0-replication", "namespace": NS},
            "data": {"doveadm-password": ns_data}
        }))
        .unwrap()
    };
    Api::<Secret>::namespaced(sites.east.server.client(), NS)
        .create(&Default::default(), &secret("c2VjcmV0LW9mLWVhc3Q="))
        .await
        .unwrap();
    let west_secrets = Api::<Secret>::namespaced(sites.west.server.client(), NS);
    west_secrets
        .create(&Default::default(), &secret("bWFkZS1ieS1oYW5k"))
        .await
        .unwrap();
    sites.advance(INTERVAL);
    sites.west.try_tick().await.expect("the tick goes on");
    let kept = west_secrets.get("corp-lun-0-replication").await.unwrap();
    assert_eq!(
        kept.data.unwrap()["doveadm-password"].0,
        b"made-by-hand".to_vec()
    );
    let events = Api::<Event>::namespaced(sites.west.server.client(), NS)
        .list(&Default::default())
        .await
        .unwrap();
    let failed: Vec<_> = events
        .items
        .iter()
        .filter(|e| e.reason.as_deref() == Some("MirrorFailed"))
        .filter_map(|e| e.note.clone())
        .collect();
    assert!(
        failed
            .iter()
            .any(|m| m.contains("Secret corp-lun-0-replication")
                || m.contains("corp-lun-0-replication")),
        "{failed:?}"
    );

    sites.east.frontends_up.store(false, Ordering::SeqCst);
    for _ in 0..THRESHOLD {
        sites.advance(INTERVAL);
        sites.west.try_tick().await.expect("the tick goes on");
        sites.east.tick().await;
    }
    let w = sites.west.status();
    assert_eq!(w.active_site.as_deref(), Some("west"), "{w:?}");
    assert!(sites.west.serving());
    assert!(
        !sites.east.serving(),
        "the new active site fenced the old one"
    );
}

/// The standby signs with the primary's DKIM keys: its own MailPod controller made a key first (as on a real
/// cluster, where it may run before the first mirror), and the primary's replaces it, so both sites publish
/// the same record and a promoted standby's mail verifies against the DNS record already out there.
#[tokio::test]
async fn the_standby_signs_with_the_primarys_dkim_keys() {
    use k8s_openapi::api::core::v1::Secret;
    let mut manifest = failover_support::mailpod_manifest();
    manifest["spec"]["dkim"] = json!({});
    let sites = Sites::with_mailpod(manifest).await;
    for _ in 0..3 {
        sites.round().await;
    }
    let key = |s: &Secret| s.data.as_ref().unwrap()["corp.example.mail.key"].0.clone();
    let east_secrets = Api::<Secret>::namespaced(sites.east.server.client(), NS);
    let west_secrets = Api::<Secret>::namespaced(sites.west.server.client(), NS);
    let east_key = key(&east_secrets.get("corp-dkim").await.unwrap());
    assert_eq!(
        key(&west_secrets.get("corp-dkim").await.unwrap()),
        east_key,
        "the standby holds the primary's key"
    );
    let records = |mp: MailPod| mp.status.unwrap().dkim;
    let east_records = records(sites.east.mailpod().unwrap());
    assert_eq!(east_records.len(), 1, "{east_records:?}");
    assert_eq!(records(sites.west.mailpod().unwrap()), east_records);

    // A key the standby's controller generated itself (labelled as the operator's) is replaced.
    let own = mailpod_operator::controller::dkim::generate_key().unwrap();
    west_secrets
        .patch(
            "corp-dkim",
            &PatchParams::default(),
            &Patch::Merge(json!({
                "metadata": {"labels": {"app.kubernetes.io/managed-by": "mailpod-operator"}},
                "data": {"corp.example.mail.key": k8s_openapi::ByteString(own.into_bytes())}
            })),
        )
        .await
        .unwrap();
    assert_ne!(key(&west_secrets.get("corp-dkim").await.unwrap()), east_key);
    sites.round().await;
    sites.west.settle_mailpod().await;
    assert_eq!(
        key(&west_secrets.get("corp-dkim").await.unwrap()),
        east_key,
        "the mirror restores the primary's key"
    );
    assert_eq!(records(sites.west.mailpod().unwrap()), east_records);

    // Quiet once equal.
    sites.round().await;
    sites.west.server.clear_requests();
    sites.advance(INTERVAL);
    sites.west.tick().await;
    let m = sites.west.writes();
    assert!(m.is_empty(), "steady state wrote {m:?}");
}
