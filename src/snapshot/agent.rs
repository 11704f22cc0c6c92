//! Pausing and resuming delivery on a store replica through its agent's control endpoint
//! (`POST /pause?seconds=N`, `POST /resume` on port 8081). Behind a trait so tests count the calls.

use std::time::Duration;

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::resources::pod::ports;

/// Delivery control of one store replica.
pub trait StoreAgent: Send + Sync {
    /// Pauses LMTP delivery for at most `seconds`; the agent resumes by itself at that deadline.
    fn pause<'a>(&'a self, pod: &'a Pod, seconds: u32) -> BoxFuture<'a, Result<(), String>>;
    fn resume<'a>(&'a self, pod: &'a Pod) -> BoxFuture<'a, Result<(), String>>;
}

/// The real agent, over HTTP/1.1 to the pod's IP. A plain request on a socket: the body is a short JSON
/// line, and the only thing that matters is the status code.
pub struct HttpAgent {
    pub timeout: Duration,
}

impl HttpAgent {
    async fn post(&self, pod: &Pod, path_and_query: &str) -> Result<(), String> {
        let name = pod.name_any();
        let ip = pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.clone())
            .ok_or_else(|| format!("pod {name} has no IP"))?;
        let addr = if ip.contains(':') {
            format!("[{ip}]:{}", ports::CONTROL)
        } else {
            format!("{ip}:{}", ports::CONTROL)
        };
        let request = format!(
            "POST {path_and_query} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        let exchange = async {
            let mut stream = TcpStream::connect(&addr).await?;
            stream.write_all(request.as_bytes()).await?;
            let mut response = Vec::new();
            stream.read_to_end(&mut response).await?;
            Ok::<_, std::io::Error>(response)
        };
        let response = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| format!("{name} ({addr}): no answer within {:?}", self.timeout))?
            .map_err(|e| format!("{name} ({addr}): {e}"))?;
        let text = String::from_utf8_lossy(&response);
        let status_line = text.lines().next().unwrap_or_default();
        match status_line.split_whitespace().nth(1) {
            Some(code) if code.starts_with('2') => Ok(()),
            _ => Err(format!(
                "{name} ({addr}): {path_and_query} answered `{status_line}`"
            )),
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
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn status_code_decides_success() {
        // The control port is fixed (8081), so the test serves on it only when it is free.
        let Ok(listener) = TcpListener::bind(("127.0.0.1", ports::CONTROL as u16)).await else {
            eprintln!("port {} busy; skipping", ports::CONTROL);
            return;
        };
        let server = tokio::spawn(async move {
            let mut seen = vec![];
            for answer in ["HTTP/1.1 200 OK", "HTTP/1.1 404 Not Found"] {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 512];
                let n = s.read(&mut buf).await.unwrap();
                seen.push(
                    String::from_utf8_lossy(&buf[..n])
                        .lines()
                        .next()
                        .unwrap()
                        .to_string(),
                );
                s.write_all(format!("{answer}\r\nContent-Length: 0\r\n\r\n").as_bytes())
                    .await
                    .unwrap();
            }
            seen
        });
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "corp-lun-0-0"}, "status": {"podIP": "127.0.0.1"}
        }))
        .unwrap();
        let agent = HttpAgent {
            timeout: Duration::from_secs(5),
        };
        agent.pause(&pod, 60).await.unwrap();
        let err = agent.resume(&pod).await.unwrap_err();
        assert!(err.contains("404"), "{err}");
        let seen = server.await.unwrap();
        assert_eq!(
            seen,
            ["POST /pause?seconds=60 HTTP/1.1", "POST /resume HTTP/1.1"]
        );
    }
}
