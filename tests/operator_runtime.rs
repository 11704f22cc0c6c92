//! The operator's own endpoints: /metrics reports each controller's counters and the leader flag,
//! /readyz follows readiness, /healthz answers.
#![cfg(feature = "testkit")]

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use mailpod_operator::controller::{Context, RunConfig};
use mailpod_operator::metrics::{self, OperatorMetrics};
use mailpod_operator::testkit::ApiServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn get(port: u16, path: &str) -> (u16, String) {
    for _ in 0..50 {
        if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            s.write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            let code = out.split_whitespace().nth(1).unwrap().parse().unwrap();
            let body = out
                .split_once("\r\n\r\n")
                .map(|(_, b)| b.to_string())
                .unwrap_or_default();
            return (code, body);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("metrics server did not start");
}

#[tokio::test]
async fn metrics_health_and_readiness() {
    let server = ApiServer::new();
    let metrics = Arc::new(OperatorMetrics::default());
    let mailpods = Arc::new(Context::new(server.client(), RunConfig::default()));
    let luns = Arc::new(Context::new(server.client(), RunConfig::default()));
    metrics.register("mailpod", mailpods.stats.clone());
    metrics.register("storagelun", luns.stats.clone());
    let sites = std::sync::Arc::new(mailpod_operator::controller::Stats::default());
    metrics.register("sitefailover", sites.clone());
    drop(sites.start_reconcile());
    let status: mailpod_operator::crd::SiteFailoverStatus = serde_json::from_value(serde_json::json!({
        "phase": "FailedOver", "activeSite": "west", "epoch": 2, "fenced": false, "peerReachable": false,
        "consecutiveProbeFailures": 0, "accessTablesInSync": true, "replicationLagSeconds": 1.5,
        "witness": {"reachable": true, "holder": "west", "quorum": true},
        "lastFailover": {"from": "east", "to": "west", "epoch": 2, "startedAt": "2026-01-01T00:00:00Z",
                         "rtoSeconds": 20.0, "rpoSeconds": 1.5, "kind": "failover"}
    }))
    .unwrap();
    sites.report_site(
        "mail",
        "corp-geo",
        Some(mailpod_operator::controller::SiteReport {
            site: "west".into(),
            peer: "east".into(),
            rpo_target_seconds: 30.0,
            status,
        }),
    );
    luns.stats.report_lun_lag(
        "mail",
        "corp-lun-0",
        Some(mailpod_operator::controller::LunLag {
            lag_seconds: Some(2.0),
            replicas: vec![("corp-lun-0-1".into(), 2.0)],
            health: mailpod_operator::controller::lun::health::LunHealth {
                snapshot_interval_seconds: Some(28800.0),
                last_snapshot_timestamp: Some(1767225600.0),
                last_snapshot_failed: Some(true),
                last_promotion_timestamp: Some(1767229200.0),
            },
        }),
    );
    for _ in 0..3 {
        let _timer = mailpods.stats.start_reconcile();
    }
    mailpods.stats.set_managed(|| 7);
    mailpods.stats.invalid.fetch_add(1, Ordering::Relaxed);
    luns.stats.failures.fetch_add(2, Ordering::Relaxed);

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let task = tokio::spawn(metrics::serve(
        ([127, 0, 0, 1], port).into(),
        metrics.clone(),
    ));

    assert_eq!(get(port, "/healthz").await.0, 200);
    assert_eq!(
        get(port, "/readyz").await.0,
        503,
        "not ready before the CRD check"
    );
    metrics.set_ready(true);
    assert_eq!(get(port, "/readyz").await.0, 200);

    metrics.set_leader(true);
    let (code, body) = get(port, "/metrics").await;
    assert_eq!(code, 200);
    for line in [
        "mailpod_operator_reconciles_total{controller=\"mailpod\"} 3",
        "mailpod_operator_reconciles_total{controller=\"storagelun\"} 0",
        "mailpod_operator_reconcile_failures_total{controller=\"storagelun\"} 2",
        "mailpod_operator_invalid_specs_total{controller=\"mailpod\"} 1",
        "mailpod_operator_leader 1",
        "mailpod_operator_reconcile_duration_seconds_count{controller=\"mailpod\"} 3",
        "mailpod_operator_reconcile_duration_seconds_count{controller=\"storagelun\"} 0",
        "mailpod_operator_managed_objects{controller=\"mailpod\"} 7",
        "mailpod_operator_reconciles_total{controller=\"sitefailover\"} 1",
        "mailpod_operator_sitefailover_epoch{namespace=\"mail\",sitefailover=\"corp-geo\",site=\"west\",peer=\"east\"} 2.0",
        "mailpod_operator_sitefailover_active{namespace=\"mail\",sitefailover=\"corp-geo\",site=\"west\",peer=\"east\"} 1.0",
        "mailpod_operator_sitefailover_peer_reachable{namespace=\"mail\",sitefailover=\"corp-geo\",site=\"west\",peer=\"east\"} 0.0",
        "mailpod_operator_sitefailover_replication_lag_seconds{namespace=\"mail\",sitefailover=\"corp-geo\",site=\"west\",peer=\"east\"} 1.5",
        "mailpod_operator_sitefailover_quorum{namespace=\"mail\",sitefailover=\"corp-geo\",site=\"west\",peer=\"east\"} 1.0",
        "mailpod_operator_sitefailover_last_rto_seconds{namespace=\"mail\",sitefailover=\"corp-geo\",site=\"west\",peer=\"east\"} 20.0",
        "mailpod_operator_sitefailover_rpo_target_seconds{namespace=\"mail\",sitefailover=\"corp-geo\",site=\"west\",peer=\"east\"} 30.0",
        "mailpod_operator_storagelun_replication_lag_seconds{namespace=\"mail\",storagelun=\"corp-lun-0\"} 2.0",
        "mailpod_operator_storagelun_snapshot_interval_seconds{namespace=\"mail\",storagelun=\"corp-lun-0\"} 28800.0",
        "mailpod_operator_storagelun_last_snapshot_timestamp_seconds{namespace=\"mail\",storagelun=\"corp-lun-0\"} 1767225600.0",
        "mailpod_operator_storagelun_last_snapshot_failed{namespace=\"mail\",storagelun=\"corp-lun-0\"} 1.0",
        "mailpod_operator_storagelun_last_promotion_timestamp_seconds{namespace=\"mail\",storagelun=\"corp-lun-0\"} 1767229200.0",
    ] {
        assert!(
            body.lines().any(|l| l == line),
            "missing `{line}` in:\n{body}"
        );
    }
    // Not reported: values the status does not hold (no table sync recorded).
    assert!(
        !body.contains("sitefailover_seconds_since_table_sync{"),
        "{body}"
    );
    sites.report_site("mail", "corp-geo", None);
    assert!(!get(port, "/metrics")
        .await
        .1
        .contains("sitefailover_epoch{"));
    task.abort();
}

/// Without the CRDs the operator stops with the command that installs them.
#[tokio::test]
async fn missing_crds_stop_the_operator_with_a_hint() {
    use mailpod_operator::testkit::{Fault, FaultKind};
    let server = ApiServer::new();
    mailpod_operator::controller::check_crds(&server.client(), Some("mail"))
        .await
        .expect("CRDs served");
    server.inject(Fault::new(
        Some(http::Method::GET),
        "/storageluns",
        FaultKind::Status(404),
        1,
    ));
    let err = mailpod_operator::controller::check_crds(&server.client(), Some("mail"))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(
            "StorageLUN CustomResourceDefinition (storageluns.mailpod.io) is not installed"
        ),
        "{err}"
    );
    assert!(
        err.contains("mailpod-operator crds | kubectl apply --server-side -f -"),
        "{err}"
    );
}

/// An API server that does not answer at start-up is waited for: the operator starts once it answers,
/// instead of exiting into the kubelet's growing restart back-off.
#[tokio::test]
async fn an_unreachable_api_server_is_waited_for_at_start() {
    use mailpod_operator::testkit::{Fault, FaultKind};
    let server = ApiServer::new();
    server.inject(Fault::new(
        Some(http::Method::GET),
        "/mailpods",
        FaultKind::Timeout,
        2,
    ));
    let started = std::time::Instant::now();
    let ready = mailpod_operator::controller::wait_for_crds(
        &server.client(),
        &[Some("mail".to_string())],
        std::future::pending::<()>(),
    )
    .await
    .expect("waits, then finds the CRDs");
    assert!(ready);
    // Two failed checks: one pause of 1 s, one of 2 s.
    assert!(started.elapsed() >= std::time::Duration::from_secs(3));

    // A missing CRD is not waited for.
    server.inject(Fault::new(
        Some(http::Method::GET),
        "/sitefailovers",
        FaultKind::Status(404),
        1,
    ));
    let err = mailpod_operator::controller::wait_for_crds(
        &server.client(),
        &[Some("mail".to_string())],
        std::future::pending::<()>(),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("is not installed"), "{err}");

    // Shut down while waiting: returns false.
    server.inject(Fault::new(None, "/mailpods", FaultKind::Timeout, 100));
    let ready = mailpod_operator::controller::wait_for_crds(
        &server.client(),
        &[Some("mail".to_string())],
        tokio::time::sleep(std::time::Duration::from_millis(300)),
    )
    .await
    .unwrap();
    assert!(!ready);
}
