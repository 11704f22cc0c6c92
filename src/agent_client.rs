//! HTTP to the agent in a mail pod, by the pod's IP: replication reports on the metrics port, pause and
//! resume on the store's control port. Every call has a timeout; nothing in the mail path waits on it.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;

/// Pause between connection attempts of [`AgentClient::retry_connect_for`].
const CONNECT_RETRY_STEP: Duration = Duration::from_millis(250);

/// A client for the agents' endpoints.
#[derive(Clone)]
pub struct AgentClient {
    http: Client<HttpConnector, Empty<Bytes>>,
    timeout: Duration,
    connect_retry: Duration,
}

/// Status code and body of an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

impl AgentClient {
    pub fn new(timeout: Duration) -> Self {
        Self {
            http: Client::builder(TokioExecutor::new()).build_http(),
            timeout,
            connect_retry: Duration::ZERO,
        }
    }

    /// Retries a connection that is refused or unreachable for up to `window` (within the call's timeout).
    /// A pod that has just started may not be admitted yet by the network policy implementation, which
    /// learns of its IP only after the kubelet reports it; nothing was sent, so the retry is safe.
    pub fn retry_connect_for(mut self, window: Duration) -> Self {
        self.connect_retry = window;
        self
    }

    /// `method path` on `port` of `pod`; an error names the pod and address.
    pub async fn call(
        &self,
        pod: &Pod,
        port: i32,
        method: Method,
        path: &str,
    ) -> Result<Answer, String> {
        self.call_with_token(pod, port, method, path, None).await
    }

    /// `call` with `Authorization: Bearer <token>` (the control port's LUN token) when one is given.
    pub async fn call_with_token(
        &self,
        pod: &Pod,
        port: i32,
        method: Method,
        path: &str,
        token: Option<&str>,
    ) -> Result<Answer, String> {
        let name = pod.name_any();
        let ip = pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.clone())
            .ok_or_else(|| format!("pod {name} has no IP"))?;
        let authority = if ip.contains(':') {
            format!("[{ip}]:{port}")
        } else {
            format!("{ip}:{port}")
        };
        let build = || {
            let mut request = Request::builder()
                .method(method.clone())
                .uri(format!("http://{authority}{path}"));
            if let Some(token) = token {
                request = request.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
            }
            request
                .body(Empty::<Bytes>::new())
                .map_err(|e| format!("{name}: {e}"))
        };
        let started = tokio::time::Instant::now();
        let exchange = async {
            let response = loop {
                match self.http.request(build()?).await {
                    Ok(response) => break response,
                    Err(e) if e.is_connect() && started.elapsed() < self.connect_retry => {
                        tokio::time::sleep(CONNECT_RETRY_STEP).await;
                    }
                    Err(e) => return Err(e.to_string()),
                }
            };
            let status = response.status().as_u16();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok::<_, String>(Answer {
                status,
                body: String::from_utf8_lossy(&body).into_owned(),
            })
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| {
                format!(
                    "{name} ({authority}{path}): no answer within {:?}",
                    self.timeout
                )
            })?
            .map_err(|e| format!("{name} ({authority}{path}): {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::PodStatus;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn pod_at(ip: &str) -> Pod {
        let mut pod = Pod::default();
        pod.metadata.name = Some("store-0".into());
        pod.status = Some(PodStatus {
            pod_ip: Some(ip.into()),
            ..Default::default()
        });
        pod
    }

    /// A port nobody listens on yet: bound, its number read, then closed.
    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    async fn answer_once_after(port: u16, delay: Duration) {
        tokio::time::sleep(delay).await;
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let (mut conn, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 1024];
        let _ = conn.read(&mut buf).await.unwrap();
        conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nok\n")
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_refused_connection_is_retried_within_the_window_and_answered() {
        let port = free_port();
        let server = tokio::spawn(answer_once_after(port, Duration::from_millis(700)));
        let client =
            AgentClient::new(Duration::from_secs(10)).retry_connect_for(Duration::from_secs(8));
        let answer = client
            .call(
                &pod_at("127.0.0.1"),
                i32::from(port),
                Method::POST,
                "/pause?seconds=5",
            )
            .await
            .expect("answered once the port opens");
        assert_eq!(
            answer,
            Answer {
                status: 200,
                body: "ok\n".into()
            }
        );
        server.await.unwrap();
    }

    #[tokio::test]
    async fn without_a_window_a_refused_connection_fails_at_once_naming_the_pod() {
        let port = free_port();
        let client = AgentClient::new(Duration::from_secs(10));
        let started = std::time::Instant::now();
        let err = client
            .call(
                &pod_at("127.0.0.1"),
                i32::from(port),
                Method::POST,
                "/resume",
            )
            .await
            .unwrap_err();
        assert!(
            err.starts_with(&format!("store-0 (127.0.0.1:{port}/resume)")),
            "{err}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn past_the_window_the_connection_error_is_reported() {
        let port = free_port();
        let client =
            AgentClient::new(Duration::from_secs(10)).retry_connect_for(Duration::from_millis(600));
        let started = std::time::Instant::now();
        let err = client
            .call(
                &pod_at("127.0.0.1"),
                i32::from(port),
                Method::POST,
                "/resume",
            )
            .await
            .unwrap_err();
        assert!(err.contains("127.0.0.1"), "{err}");
        assert!(
            started.elapsed() >= Duration::from_millis(600),
            "{:?}",
            started.elapsed()
        );
    }
}
