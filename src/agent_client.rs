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

/// A client for the agents' endpoints.
#[derive(Clone)]
pub struct AgentClient {
    http: Client<HttpConnector, Empty<Bytes>>,
    timeout: Duration,
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
        }
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
        let mut request = Request::builder()
            .method(method)
            .uri(format!("http://{authority}{path}"));
        if let Some(token) = token {
            request = request.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = request
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("{name}: {e}"))?;
        let exchange = async {
            let response = self
                .http
                .request(request)
                .await
                .map_err(|e| e.to_string())?;
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
