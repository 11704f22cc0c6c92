//! Replication state as the store agents report it at `GET /replication` on their metrics port.
//!
//! The operator asks the agents rather than having them write to the API: a mail pod then needs no
//! Kubernetes credentials at all, and a compromised store cannot label itself active. Behind a trait so
//! tests give each pod the report they want.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::future::BoxFuture;
use http::Method;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use serde::Deserialize;

use crate::agent_client::AgentClient;
use crate::resources::pod::ports;

/// What a store agent says about its replication.
#[derive(Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ReplicationReport {
    /// The role the agent acts in (`active` or `standby`), as it read it from its labels.
    #[serde(default)]
    pub role: Option<String>,
    /// Where a standby pulls from.
    #[serde(default)]
    pub source: Option<String>,
    /// When its last complete sync pass finished (Unix seconds).
    #[serde(default)]
    pub last_sync_unix_seconds: Option<f64>,
    #[serde(default)]
    pub lag_seconds: Option<f64>,
    /// A complete pass from the current active finished since the agent last became a standby.
    #[serde(default)]
    pub in_sync: bool,
    #[serde(default)]
    pub last_error: Option<String>,
    /// The standby refuses its pass: it would delete too much (see [`super::deletion`]).
    #[serde(default)]
    pub deletion_refused: Option<super::deletion::Refusal>,
}

/// Where replication reports come from.
pub trait ReplicationSource: Send + Sync {
    /// The pod's report, or `None` when it cannot be had (not running, no answer in time).
    fn report<'a>(&'a self, pod: &'a Pod) -> BoxFuture<'a, Option<ReplicationReport>>;
}

/// Fixed reports by pod name, changed at will: for tests and the benchmark.
#[derive(Default)]
pub struct StaticReports(std::sync::Mutex<BTreeMap<String, ReplicationReport>>);

impl StaticReports {
    pub fn set(&self, pod: &str, report: ReplicationReport) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(pod.to_string(), report);
    }
}

impl ReplicationSource for StaticReports {
    fn report<'a>(&'a self, pod: &'a Pod) -> BoxFuture<'a, Option<ReplicationReport>> {
        let r = self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&pod.name_any())
            .cloned();
        Box::pin(async move { r })
    }
}

/// The agents themselves, over HTTP.
pub struct HttpReplicationSource {
    client: AgentClient,
}

impl HttpReplicationSource {
    pub fn new(timeout: Duration) -> Self {
        Self {
            client: AgentClient::new(timeout),
        }
    }
}

impl ReplicationSource for HttpReplicationSource {
    fn report<'a>(&'a self, pod: &'a Pod) -> BoxFuture<'a, Option<ReplicationReport>> {
        Box::pin(async move {
            match self
                .client
                .call(pod, ports::METRICS, Method::GET, "/replication")
                .await
            {
                Ok(a) if a.status == 200 => match serde_json::from_str(&a.body) {
                    Ok(r) => Some(r),
                    Err(e) => {
                        tracing::warn!(pod = %pod.name_any(), error = %e, "unreadable replication report");
                        None
                    }
                },
                Ok(a) => {
                    tracing::debug!(pod = %pod.name_any(), status = a.status, "no replication report");
                    None
                }
                Err(e) => {
                    tracing::debug!(pod = %pod.name_any(), error = %e, "no replication report");
                    None
                }
            }
        })
    }
}

/// Reports of every pod not being deleted, asked concurrently, by pod name.
pub async fn collect(
    source: &dyn ReplicationSource,
    pods: &[Pod],
) -> BTreeMap<String, ReplicationReport> {
    let running = pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none());
    let answers = futures::future::join_all(
        running.map(|p| async move { source.report(p).await.map(|r| (p.name_any(), r)) }),
    )
    .await;
    answers.into_iter().flatten().collect()
}
