//! The operator's own Prometheus metrics and its /healthz, /readyz and /metrics endpoints.
//!
//! Counters live in each controller's [`Context`] (plain atomics the reconcilers bump); a collector reads
//! them at scrape time, so the hot path never touches the registry.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::controller::Stats;

/// What the operator reports about itself.
#[derive(Default)]
pub struct OperatorMetrics {
    controllers: Mutex<Vec<(&'static str, Arc<Stats>)>>,
    leader: AtomicBool,
    ready: AtomicBool,
}

impl OperatorMetrics {
    /// Reports a controller's counters under `controller` (`mailpod`, `storagelun`, `sitefailover`).
    pub fn register(&self, controller: &'static str, stats: Arc<Stats>) {
        self.controllers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((controller, stats));
    }

    pub fn set_leader(&self, leader: bool) {
        self.leader.store(leader, Ordering::Relaxed);
    }

    /// Ready once the API server answered and the CRDs are installed (leader or standby alike).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(self: &Arc<Self>) -> String {
        let mut registry = Registry::with_prefix("mailpod_operator");
        registry.register_collector(Box::new(self.clone()));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry)
            .expect("metrics encode to a String");
        out
    }
}

impl std::fmt::Debug for OperatorMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self
            .controllers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(n, _)| *n)
            .collect();
        f.debug_struct("OperatorMetrics")
            .field("controllers", &names)
            .field("leader", &self.leader)
            .field("ready", &self.ready)
            .finish()
    }
}

impl Collector for OperatorMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let controllers = self.controllers.lock().unwrap_or_else(|p| p.into_inner());
        type Read = fn(&Stats) -> u64;
        let counters: [(&str, &str, Read); 3] = [
            ("reconciles", "Reconciles run, by controller.", |c| {
                c.reconciles()
            }),
            (
                "reconcile_failures",
                "Reconciles that failed and were retried, by controller.",
                |c| c.failures(),
            ),
            (
                "invalid_specs",
                "Reconciles that found an invalid spec and changed nothing, by controller.",
                |c| c.invalid.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, read) in counters {
            let mut family = encoder.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (controller, ctx) in controllers.iter() {
                let labels = [("controller", *controller)];
                ConstCounter::new(read(ctx)).encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "reconcile_duration_seconds",
            "Time per reconcile, by controller.",
            None,
            prometheus_client::metrics::MetricType::Histogram,
        )?;
        for (controller, ctx) in controllers.iter() {
            let labels = [("controller", *controller)];
            ctx.durations.encode(family.encode_family(&labels)?)?;
        }
        let mut family = encoder.encode_descriptor(
            "managed_objects",
            "Objects each controller manages (MailPods, StorageLUNs), from its cache.",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (controller, ctx) in controllers.iter() {
            if let Some(n) = ctx.managed() {
                let labels = [("controller", *controller)];
                ConstGauge::new(n as i64).encode(family.encode_family(&labels)?)?;
            }
        }
        encode_sites(&mut encoder, &controllers)?;
        encode_lun_lags(&mut encoder, &controllers)?;
        let gauge = ConstGauge::new(i64::from(self.leader.load(Ordering::Relaxed)));
        gauge.encode(encoder.encode_descriptor(
            "leader",
            "1 while this replica holds the leader Lease and reconciles.",
            None,
            gauge.metric_type(),
        )?)?;
        Ok(())
    }
}

/// Per-SiteFailover gauges from the statuses the SiteFailover controller last wrote, labelled with the
/// object, this site and the peer. Absent values (lag not reported, no failover yet) are left out rather
/// than reported as 0.
fn encode_sites(
    encoder: &mut DescriptorEncoder,
    controllers: &[(&'static str, Arc<Stats>)],
) -> Result<(), std::fmt::Error> {
    use crate::crd::{FailoverPhase, SiteFailoverStatus};
    let sites: Vec<_> = controllers.iter().flat_map(|(_, s)| s.sites()).collect();
    if sites.is_empty() {
        return Ok(());
    }
    let now = jiff::Timestamp::now();
    let since = move |t: &Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime>| {
        t.as_ref()
            .map(|t| now.duration_since(t.0).as_secs_f64().max(0.0))
    };
    fn b(v: Option<bool>) -> Option<f64> {
        v.map(|b| if b { 1.0 } else { 0.0 })
    }
    type Read<'a> = Box<dyn Fn(&SiteFailoverStatus, &str) -> Option<f64> + 'a>;
    let gauges: Vec<(&str, &str, Read)> = vec![
        ("sitefailover_epoch", "Epoch this site holds.", Box::new(|s, _| Some(s.epoch as f64))),
        (
            "sitefailover_active",
            "1 when this site is the active site and its stores are not fenced.",
            Box::new(|s, me| {
                b(Some(s.active_site.as_deref() == Some(me) && s.fenced != Some(true)))
            }),
        ),
        ("sitefailover_fenced", "1 while this site's stores are fenced.", Box::new(|s, _| b(s.fenced))),
        (
            "sitefailover_failing_over",
            "1 while a failover or failback is in progress.",
            Box::new(|s, _| {
                b(Some(matches!(s.phase, FailoverPhase::FailingOver | FailoverPhase::FailingBack)))
            }),
        ),
        ("sitefailover_peer_reachable", "1 when the peer's API answered at the last tick.", Box::new(|s, _| b(s.peer_reachable))),
        (
            "sitefailover_probe_failures",
            "Consecutive failed probes of the peer's front ends.",
            Box::new(|s, _| Some(f64::from(s.consecutive_probe_failures))),
        ),
        ("sitefailover_access_tables_in_sync", "1 when both sites' access-table hashes are equal.", Box::new(|s, _| b(s.access_tables_in_sync))),
        (
            "sitefailover_seconds_since_table_sync",
            "Seconds since the current access tables were confirmed equal on both sites.",
            Box::new(move |s, _| since(&s.last_table_sync)),
        ),
        (
            "sitefailover_replication_lag_seconds",
            "How far the standby's stores are behind the active site's (the RPO if it were lost now).",
            Box::new(|s, _| s.replication_lag_seconds),
        ),
        (
            "sitefailover_quorum",
            "With a witness: 1 while this site is in quorum (an active site out of quorum fences itself).",
            Box::new(|s, _| b(s.witness.as_ref().map(|w| w.quorum))),
        ),
        (
            "sitefailover_last_rto_seconds",
            "Measured RTO of the last failover or failback.",
            Box::new(|s, _| s.last_failover.as_ref().and_then(|f| f.rto_seconds)),
        ),
        (
            "sitefailover_last_rpo_seconds",
            "Replication lag at the last failover or failback.",
            Box::new(|s, _| s.last_failover.as_ref().and_then(|f| f.rpo_seconds)),
        ),
    ];
    for (name, help, read) in gauges {
        let mut family = encoder.encode_descriptor(
            name,
            help,
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for ((ns, sf), r) in &sites {
            if let Some(v) = read(&r.status, &r.site) {
                let labels = [
                    ("namespace", ns.as_str()),
                    ("sitefailover", sf.as_str()),
                    ("site", r.site.as_str()),
                    ("peer", r.peer.as_str()),
                ];
                ConstGauge::new(v).encode(family.encode_family(&labels)?)?;
            }
        }
    }
    // From the spec, not the status: with the same labels as the lag, so an alert compares the two directly.
    let mut family = encoder.encode_descriptor(
        "sitefailover_rpo_target_seconds",
        "The recovery point objective (spec.targets.rpoSeconds) the replication lag is held to.",
        None,
        prometheus_client::metrics::MetricType::Gauge,
    )?;
    for ((ns, sf), r) in &sites {
        let labels = [
            ("namespace", ns.as_str()),
            ("sitefailover", sf.as_str()),
            ("site", r.site.as_str()),
            ("peer", r.peer.as_str()),
        ];
        ConstGauge::new(r.rpo_target_seconds).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// The StorageLUNs' exact replication lag (status holds only coarse steps of it).
fn encode_lun_lags(
    encoder: &mut DescriptorEncoder,
    controllers: &[(&'static str, Arc<Stats>)],
) -> Result<(), std::fmt::Error> {
    let luns: Vec<_> = controllers.iter().flat_map(|(_, s)| s.lun_lags()).collect();
    if luns.is_empty() {
        return Ok(());
    }
    let mut family = encoder.encode_descriptor(
        "storagelun_replication_lag_seconds",
        "Largest lag of a LUN's standbys behind its active replica (Volume: of the other site's copy).",
        None,
        prometheus_client::metrics::MetricType::Gauge,
    )?;
    for ((ns, lun), lag) in &luns {
        if let Some(v) = lag.lag_seconds {
            let labels = [("namespace", ns.as_str()), ("storagelun", lun.as_str())];
            ConstGauge::new(v).encode(family.encode_family(&labels)?)?;
        }
    }
    let mut family = encoder.encode_descriptor(
        "storagelun_replica_lag_seconds",
        "Lag of each standby replica behind its LUN's active replica.",
        None,
        prometheus_client::metrics::MetricType::Gauge,
    )?;
    for ((ns, lun), lag) in &luns {
        for (replica, v) in &lag.replicas {
            let labels = [
                ("namespace", ns.as_str()),
                ("storagelun", lun.as_str()),
                ("replica", replica.as_str()),
            ];
            ConstGauge::new(*v).encode(family.encode_family(&labels)?)?;
        }
    }
    encode_lun_health(encoder, &luns)
}

/// The StorageLUNs' snapshot and promotion record, for the snapshot and promotion alerts.
fn encode_lun_health(
    encoder: &mut DescriptorEncoder,
    luns: &[((String, String), crate::controller::LunLag)],
) -> Result<(), std::fmt::Error> {
    use crate::controller::lun::health::LunHealth;
    type Read = fn(&LunHealth) -> Option<f64>;
    let gauges: [(&str, &str, Read); 4] = [
        (
            "storagelun_snapshot_interval_seconds",
            "Longest time between two runs of the LUN's snapshot schedule (snapshots enabled only).",
            |h| h.snapshot_interval_seconds,
        ),
        (
            "storagelun_last_snapshot_timestamp_seconds",
            "When the newest snapshot the LUN keeps was taken (Unix time).",
            |h| h.last_snapshot_timestamp,
        ),
        (
            "storagelun_last_snapshot_failed",
            "1 when the LUN's last snapshot job failed, 0 when it succeeded.",
            |h| h.last_snapshot_failed.map(|f| if f { 1.0 } else { 0.0 }),
        ),
        (
            "storagelun_last_promotion_timestamp_seconds",
            "When a standby of the LUN was last promoted to active (Unix time).",
            |h| h.last_promotion_timestamp,
        ),
    ];
    for (name, help, read) in gauges {
        let mut family = encoder.encode_descriptor(
            name,
            help,
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for ((ns, lun), lag) in luns {
            if let Some(v) = read(&lag.health) {
                let labels = [("namespace", ns.as_str()), ("storagelun", lun.as_str())];
                ConstGauge::new(v).encode(family.encode_family(&labels)?)?;
            }
        }
    }
    Ok(())
}

/// Serves /healthz (the process answers), /readyz (see [`OperatorMetrics::set_ready`]) and /metrics.
pub async fn serve(addr: SocketAddr, metrics: Arc<OperatorMetrics>) -> anyhow::Result<()> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(scrape))
        .with_state(metrics);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("binding the metrics address {addr}: {e}"))?;
    axum::serve(listener, app).await?;
    Ok(())
}

async fn readyz(State(m): State<Arc<OperatorMetrics>>) -> impl IntoResponse {
    if m.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n")
    }
}

async fn scrape(State(m): State<Arc<OperatorMetrics>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.render(),
    )
}
