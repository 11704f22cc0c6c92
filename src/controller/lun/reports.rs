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
    /// Whether the agent takes writes (LMTP, logins) as it enforces its role now.
    #[serde(default)]
    pub accepts_writes: bool,
}

/// Where replication reports come from, and where roles are pushed to.
pub trait ReplicationSource: Send + Sync {
    /// The pod's report, or `None` when it cannot be had (not running, no answer in time).
    fn report<'a>(&'a self, pod: &'a Pod) -> BoxFuture<'a, Option<ReplicationReport>>;

    /// Gives the pod's agent `role` (`active` or `standby`) at once, on its control port with the LUN's
    /// `token`, ahead of the kubelet's copy of the label; answers whether it takes writes once enforced.
    fn push_role<'a>(
        &'a self,
        pod: &'a Pod,
        role: &'a str,
        token: &'a str,
    ) -> BoxFuture<'a, Result<bool, String>>;
}

/// Fixed reports by pod name, changed at will: for tests and the benchmark. A pushed role is taken by
/// the pod's report (as an agent takes it) and recorded, in order; a pod without a report takes none.
#[derive(Default)]
pub struct StaticReports {
    reports: std::sync::Mutex<BTreeMap<String, ReplicationReport>>,
    pushes: std::sync::Mutex<Vec<(String, String)>>,
}

impl StaticReports {
    pub fn set(&self, pod: &str, report: ReplicationReport) {
        self.reports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(pod.to_string(), report);
    }

    /// The pushes so far, `(pod, role)` in order, and forgets them.
    pub fn take_pushes(&self) -> Vec<(String, String)> {
        std::mem::take(&mut *self.pushes.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl ReplicationSource for StaticReports {
    fn report<'a>(&'a self, pod: &'a Pod) -> BoxFuture<'a, Option<ReplicationReport>> {
        let r = self
            .reports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&pod.name_any())
            .cloned();
        Box::pin(async move { r })
    }

    fn push_role<'a>(
        &'a self,
        pod: &'a Pod,
        role: &'a str,
        _token: &'a str,
    ) -> BoxFuture<'a, Result<bool, String>> {
        let name = pod.name_any();
        let mut reports = self.reports.lock().unwrap_or_else(|p| p.into_inner());
        let r = match reports.get_mut(&name) {
            Some(r) => {
                r.role = Some(role.to_string());
                r.accepts_writes = role == crate::names::labels::ROLE_ACTIVE;
                self.pushes
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((name, role.to_string()));
                Ok(r.accepts_writes)
            }
            None => Err(format!("pod {name} does not answer")),
        };
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

    fn push_role<'a>(
        &'a self,
        pod: &'a Pod,
        role: &'a str,
        token: &'a str,
    ) -> BoxFuture<'a, Result<bool, String>> {
        Box::pin(async move {
            let path = format!("/role?role={role}");
            let a = self
                .client
                .call_with_token(pod, ports::CONTROL, Method::POST, &path, Some(token))
                .await?;
            if a.status != 200 {
                return Err(format!(
                    "pod {}: {} {}",
                    pod.name_any(),
                    a.status,
                    a.body.trim()
                ));
            }
            #[derive(Deserialize)]
            #[serde(rename_all = "camelCase")]
            struct Pushed {
                accepts_writes: bool,
            }
            serde_json::from_str::<Pushed>(&a.body)
                .map(|p| p.accepts_writes)
                .map_err(|e| format!("pod {}: unreadable answer: {e}", pod.name_any()))
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
