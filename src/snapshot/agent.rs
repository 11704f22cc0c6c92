//! Pausing and resuming delivery on a store replica through its agent's control endpoint
//! (`POST /pause?seconds=N`, `POST /resume` on port 8081). Behind a trait so tests count the calls.

use std::time::Duration;

use futures::future::BoxFuture;
use http::Method;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;

use crate::agent_client::AgentClient;

use crate::resources::pod::ports;

/// Delivery control of one store replica.
pub trait StoreAgent: Send + Sync {
    /// Pauses LMTP delivery for at most `seconds`; the agent resumes by itself at that deadline.
    fn pause<'a>(&'a self, pod: &'a Pod, seconds: u32) -> BoxFuture<'a, Result<(), String>>;
    fn resume<'a>(&'a self, pod: &'a Pod) -> BoxFuture<'a, Result<(), String>>;
}

/// Environment variable with the LUN's control token, which the snapshot job gets from the LUN's control
/// Secret and the stores' control port asks of every request.
pub const CONTROL_TOKEN_ENV: &str = "MAILPOD_CONTROL_TOKEN";

/// The real agent: HTTP to the pod's control port.
pub struct HttpAgent {
    client: AgentClient,
    port: i32,
    token: Option<String>,
}

impl HttpAgent {
    /// The stores' control port, with the token of [`CONTROL_TOKEN_ENV`]. A refused connection is retried
    /// for `connect_retry`: a job's pod that has just started is admitted by the stores' NetworkPolicy only
    /// once the policy implementation has learnt its IP.
    pub fn new(timeout: Duration, connect_retry: Duration) -> Self {
        let token = std::env::var(CONTROL_TOKEN_ENV)
            .ok()
            .filter(|t| !t.trim().is_empty());
        let mut agent = Self::on_port(ports::CONTROL, timeout).with_token(token);
        agent.client = agent.client.retry_connect_for(connect_retry);
        agent
    }

    /// An agent whose control endpoint listens on `port` (tests).
    pub fn on_port(port: i32, timeout: Duration) -> Self {
        Self {
            client: AgentClient::new(timeout),
            port,
            token: None,
        }
    }

    /// Sends `token` as the bearer token of every request.
    pub fn with_token(mut self, token: Option<String>) -> Self {
        self.token = token.map(|t| t.trim().to_string());
        self
    }

    async fn post(&self, pod: &Pod, path_and_query: &str) -> Result<(), String> {
        let answer = self
            .client
            .call_with_token(
                pod,
                self.port,
                Method::POST,
                path_and_query,
                self.token.as_deref(),
            )
            .await?;
        if (200..300).contains(&answer.status) {
            Ok(())
        } else {
            Err(format!(
                "{}: {path_and_query} answered {} {}",
                pod.name_any(),
                answer.status,
                answer.body.trim()
            ))
        }
    }
}

impl StoreAgent for HttpAgent {
    fn pause<'a>(&'a self, pod: &'a Pod, seconds: u32) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move { self.post(pod, &format!("/pause?seconds={seconds}")).await })
    }

    fn resume<'a>(&'a self, pod: &'a Pod) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move { self.post(pod, "/resume").await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn status_code_decides_success() {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let mut seen = vec![];
            for answer in ["HTTP/1.1 200 OK", "HTTP/1.1 404 Not Found"] {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 512];
                let n = s.read(&mut buf).await.unwrap();
                let request = String::from_utf8_lossy(&buf[..n]).to_lowercase();
                let line = request.lines().next().unwrap().to_string();
                let token = request
                    .lines()
                    .find_map(|l| l.strip_prefix("authorization: "))
                    .map(str::to_string);
                seen.push((line, token));
                s.write_all(
                    format!("{answer}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                        .as_bytes(),
                )
                .await
                .unwrap();
            }
            seen
        });
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "corp-lun-0-0"}, "status": {"podIP": "127.0.0.1"}
        }))
        .unwrap();
        let agent = HttpAgent::on_port(i32::from(port), Duration::from_secs(5))
            .with_token(Some("tok3n\n".into()));
        agent.pause(&pod, 60).await.unwrap();
        let err = agent.resume(&pod).await.unwrap_err();
        assert!(err.contains("404"), "{err}");
        let seen = server.await.unwrap();
        let bearer = Some("bearer tok3n".to_string());
        assert_eq!(
            seen,
            [
                (
                    "post /pause?seconds=60 http/1.1".to_string(),
                    bearer.clone()
                ),
                ("post /resume http/1.1".to_string(), bearer)
            ]
        );
    }
}
