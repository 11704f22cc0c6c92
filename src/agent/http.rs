//! The agent's HTTP endpoints: `/healthz`, `/readyz`, `/metrics`, and on stores' control port `POST /pause`,
//! `POST /resume` and `POST /role`.
//!
//! `/readyz` speaks each service's protocol on the loopback interface (SMTP banner, IMAP/POP3 greeting, LMTP
//! LHLO) so a pod is ready only when its mail service really answers.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use axum::extract::State;
use axum::http::StatusCode;
use axum::http::Uri;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};

use super::lmtp_gate::Gate;
use super::metrics::Metrics;
use super::replication::Replication;
use crate::mailconfig::layout::{Layout, Ports, Role};

const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest pause a snapshot may ask for; a pause always ends by itself.
pub const MAX_PAUSE: Duration = Duration::from_secs(600);

pub struct AgentState {
    pub role: Role,
    pub layout: Layout,
    pub ports: Ports,
    pub metrics: Metrics,
    pub gate: Option<Arc<Gate>>,
    /// (daemon name, running) for each supervised daemon.
    pub alive: Vec<(&'static str, Arc<AtomicBool>)>,
    /// Stores with a LUN: replication from the LUN's active.
    pub replication: Option<Arc<Replication>>,
    /// Why the mounted configuration is not applied, while an attempt has failed (see agent::apply).
    pub config_failure: std::sync::Mutex<Option<String>>,
}

/// Health and metrics: open to the kubelet and to Prometheus.
pub fn router(state: Arc<AgentState>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/replication", get(replication))
        .with_state(state)
}

/// Pause/resume of delivery and the operator's role pushes, on a port of its own so a NetworkPolicy can
/// open it to the snapshot jobs and the operator only, and only with the LUN's control token: whoever
/// reaches it can hold a store's mail.
pub fn control_router(state: Arc<AgentState>, token: super::control_auth::ControlToken) -> Router {
    Router::new()
        .route("/pause", post(pause))
        .route("/resume", post(resume))
        .route("/role", post(push_role))
        .with_state(state)
        .layer(axum::middleware::from_fn_with_state(
            Arc::new(token),
            super::control_auth::require_token,
        ))
}

async fn healthz(State(s): State<Arc<AgentState>>) -> impl IntoResponse {
    let down: Vec<&str> = s
        .alive
        .iter()
        .filter(|(_, a)| !a.load(Ordering::SeqCst))
        .map(|(n, _)| *n)
        .collect();
    if down.is_empty() {
        (StatusCode::OK, "ok\n".to_string())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not running: {}\n", down.join(", ")),
        )
    }
}

async fn readyz(State(s): State<Arc<AgentState>>) -> impl IntoResponse {
    let failure = s
        .config_failure
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    if let Some(f) = failure {
        return (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {f}\n"));
    }
    match probe_role(s.role, &s.layout, &s.ports).await {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {e:#}\n"),
        ),
    }
}

async fn metrics(State(s): State<Arc<AgentState>>) -> impl IntoResponse {
    if let Some(gate) = &s.gate {
        s.metrics.lmtp_paused.set(i64::from(gate.is_paused()));
    }
    if let Some(r) = &s.replication {
        // Refreshes the lag and in-sync gauges as of now.
        r.report();
    }
    (
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}

/// This replica's replication state as JSON (see [`super::replication::ReplicationReport`]); the operator polls it.
async fn replication(State(s): State<Arc<AgentState>>) -> axum::response::Response {
    match &s.replication {
        Some(r) => (
            [("content-type", "application/json")],
            serde_json::to_string(&r.report()).expect("report serializes") + "\n",
        )
            .into_response(),
        None => (
            StatusCode::NOT_FOUND,
            "replication runs on store pods of a LUN only\n",
        )
            .into_response(),
    }
}

/// `seconds=N` from a query string: after N seconds delivery resumes by itself.
fn pause_seconds(uri: &Uri) -> Option<u64> {
    uri.query()?
        .split('&')
        .find_map(|kv| kv.strip_prefix("seconds="))
        .and_then(|v| v.parse().ok())
}

async fn pause(State(s): State<Arc<AgentState>>, uri: Uri) -> impl IntoResponse {
    let Some(gate) = &s.gate else {
        return (
            StatusCode::NOT_FOUND,
            "pause is served by store pods only\n".to_string(),
        );
    };
    let deadline = match pause_seconds(&uri).map(Duration::from_secs) {
        Some(d) if !d.is_zero() && d <= MAX_PAUSE => d,
        _ => {
            return (
                StatusCode::BAD_REQUEST,
                "query parameter `seconds` must be 1-600\n".to_string(),
            )
        }
    };
    let q_seconds = deadline.as_secs();
    // Give transactions in flight a bounded time to finish, never longer than the pause itself.
    let outcome = gate
        .pause(deadline, deadline.min(Duration::from_secs(10)))
        .await;
    s.metrics.lmtp_paused.set(1);
    let body = format!(
        "{{\"paused\":true,\"seconds\":{},\"drained\":{},\"inTransaction\":{}}}\n",
        q_seconds, outcome.drained, outcome.in_transaction
    );
    let status = if outcome.drained {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    (status, body)
}

async fn resume(State(s): State<Arc<AgentState>>) -> impl IntoResponse {
    let Some(gate) = &s.gate else {
        return (
            StatusCode::NOT_FOUND,
            "resume is served by store pods only\n".to_string(),
        );
    };
    gate.resume();
    s.metrics.lmtp_paused.set(0);
    (StatusCode::OK, "{\"paused\":false}\n".to_string())
}

/// `POST /role?role=active|standby`: the operator's role for this replica, taken at once rather than when
/// the kubelet's copy of the label changes (see agent::replication). Answers once the role is enforced,
/// with whether this replica takes writes.
async fn push_role(State(s): State<Arc<AgentState>>, uri: Uri) -> impl IntoResponse {
    use super::replication::ReplicaRole;
    let Some(repl) = &s.replication else {
        return (
            StatusCode::NOT_FOUND,
            "roles are served by the store pods of a LUN only\n".to_string(),
        );
    };
    let wanted = uri
        .query()
        .unwrap_or("")
        .split('&')
        .find_map(|kv| match kv.split_once('=') {
            Some(("role", crate::names::labels::ROLE_ACTIVE)) => Some(ReplicaRole::Active),
            Some(("role", crate::names::labels::ROLE_STANDBY)) => Some(ReplicaRole::Standby),
            _ => None,
        });
    let Some(role) = wanted else {
        return (
            StatusCode::BAD_REQUEST,
            "role=active or role=standby is required\n".to_string(),
        );
    };
    let writes = repl.push_role(role).await;
    let body = serde_json::json!({ "role": role, "acceptsWrites": writes });
    (StatusCode::OK, format!("{body}\n"))
}

/// Speaks the role's protocol to its own listeners.
pub async fn probe_role(role: Role, layout: &Layout, ports: &Ports) -> Result<()> {
    let host = if ports.listen == "0.0.0.0" {
        "127.0.0.1"
    } else {
        ports.listen.as_str()
    };
    match role {
        Role::Mx => greeting(&format!("{host}:{}", ports.smtp), "220")
            .await
            .context("SMTP"),
        Role::Submission => greeting(&format!("{host}:{}", ports.submission), "220")
            .await
            .context("submission"),
        Role::Imap => greeting(&format!("{host}:{}", ports.imap), "* OK")
            .await
            .context("IMAP"),
        Role::Pop3 => greeting(&format!("{host}:{}", ports.pop3), "+OK")
            .await
            .context("POP3"),
        Role::Store => {
            lhlo(&layout.lmtp_socket()).await.context("LMTP")?;
            greeting(&format!("{host}:{}", ports.imap), "* OK")
                .await
                .context("IMAP")?;
            greeting(&format!("{host}:{}", ports.pop3), "+OK")
                .await
                .context("POP3")
        }
    }
}

async fn greeting(addr: &str, expect: &str) -> Result<()> {
    tokio::time::timeout(PROBE_TIMEOUT, async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        let mut r = BufReader::new(stream);
        let line = read_reply_line(&mut r).await?;
        if !line.starts_with(expect) {
            bail!(
                "{addr} greeted with {:?}, expected {expect:?}",
                line.trim_end()
            );
        }
        let quit = if expect == "* OK" {
            "a LOGOUT\r\n"
        } else {
            "QUIT\r\n"
        };
        let _ = r.get_mut().write_all(quit.as_bytes()).await;
        Ok(())
    })
    .await
    .with_context(|| format!("no answer from {addr} within {PROBE_TIMEOUT:?}"))?
}

async fn lhlo(socket: &Path) -> Result<()> {
    tokio::time::timeout(PROBE_TIMEOUT, async {
        let stream = tokio::net::UnixStream::connect(socket)
            .await
            .with_context(|| format!("connecting to {}", socket.display()))?;
        let mut r = BufReader::new(stream);
        let banner = read_reply_line(&mut r).await?;
        if !banner.starts_with("220") {
            bail!("LMTP banner {:?}", banner.trim_end());
        }
        r.get_mut().write_all(b"LHLO readiness-probe\r\n").await?;
        loop {
            let line = read_reply_line(&mut r).await?;
            if !line.starts_with("250") {
                bail!("LHLO answered {:?}", line.trim_end());
            }
            if line.as_bytes().get(3) == Some(&b' ') {
                break;
            }
        }
        let _ = r.get_mut().write_all(b"QUIT\r\n").await;
        Ok(())
    })
    .await
    .context("no LMTP answer in time")?
}

async fn read_reply_line<S: AsyncRead + AsyncWrite + Unpin>(
    r: &mut BufReader<S>,
) -> Result<String> {
    let mut line = String::new();
    if r.read_line(&mut line).await? == 0 {
        bail!("connection closed before a reply");
    }
    Ok(line)
}
