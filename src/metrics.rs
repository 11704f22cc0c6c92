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
