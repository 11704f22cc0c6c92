//! Reaching the other site: a `kube::Client` built from the kubeconfig Secret, and the front-end protocol
//! probe. Both sit behind traits so tests can stand two in-memory clusters side by side and cut the link.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config, ResourceExt};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;

use crate::crd::{KeyRef, SiteFailover};

/// Gives a client for the peer cluster of a SiteFailover, or for its witness cluster, or says why there
/// is none.
pub trait PeerConnector: Send + Sync {
    fn connect<'a>(
        &'a self,
        local: &'a Client,
        sf: &'a SiteFailover,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Client, String>>;

    /// The cluster of `spec.witness`.
    fn witness<'a>(
        &'a self,
        local: &'a Client,
        sf: &'a SiteFailover,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Client, String>>;
}

/// The production connector: reads `spec.peer.kubeconfigSecret` (or `spec.witness.kubeconfigSecret`) from the
/// SiteFailover's namespace and builds a client whose every connection and read is bounded by the probe timeout. Clients are cached per Secret
/// resourceVersion, so a rotated kubeconfig is picked up at the next tick.
#[derive(Default)]
pub struct KubeconfigPeers {
    cache: Mutex<HashMap<String, (String, Client)>>,
}

impl PeerConnector for KubeconfigPeers {
    fn connect<'a>(
        &'a self,
        local: &'a Client,
        sf: &'a SiteFailover,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Client, String>> {
        Box::pin(self.client_from_secret(
            local,
            sf,
            &sf.spec.peer.kubeconfig_secret,
            "spec.peer.kubeconfigSecret",
            sf.spec.peer.namespace.clone(),
            timeout,
        ))
    }

    fn witness<'a>(
        &'a self,
        local: &'a Client,
        sf: &'a SiteFailover,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Client, String>> {
        Box::pin(async move {
            let Some(w) = &sf.spec.witness else {
                return Err("spec.witness is not set".to_string());
            };
            self.client_from_secret(
                local,
                sf,
                &w.kubeconfig_secret,
                "spec.witness.kubeconfigSecret",
                w.namespace.clone(),
                timeout,
            )
            .await
        })
    }
}

impl KubeconfigPeers {
    /// A client for the cluster whose kubeconfig is in `secret` (in the SiteFailover's namespace), every
    /// connection and read bounded by `timeout`.
    async fn client_from_secret(
        &self,
        local: &Client,
        sf: &SiteFailover,
        secret_ref: &KeyRef,
        field: &str,
        default_ns: Option<String>,
        timeout: Duration,
    ) -> Result<Client, String> {
        let ns = sf.namespace().unwrap_or_default();
        let r = secret_ref;
        let what = format!("{field} (Secret {ns}/{} key {})", r.name, r.key);
        let secrets: Api<Secret> = Api::namespaced(local.clone(), &ns);
        let secret = tokio::time::timeout(timeout, secrets.get(&r.name))
            .await
            .map_err(|_| format!("{what}: timed out reading it"))?
            .map_err(|e| format!("{what}: {e}"))?;
        let version = secret.resource_version().unwrap_or_default();
        let key = format!("{ns}/{}/{}", r.name, r.key);
        if let Some((v, c)) = self.lock().get(&key) {
            if *v == version {
                return Ok(c.clone());
            }
        }
        let bytes = secret
            .data
            .as_ref()
            .and_then(|d| d.get(&r.key))
            .ok_or_else(|| format!("{what}: the key is missing"))?;
        let yaml =
            String::from_utf8(bytes.0.clone()).map_err(|_| format!("{what}: not UTF-8 text"))?;
        let kubeconfig =
            Kubeconfig::from_yaml(&yaml).map_err(|e| format!("{what}: not a kubeconfig: {e}"))?;
        let mut config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .map_err(|e| format!("{what}: {e}"))?;
        config.connect_timeout = Some(timeout);
        config.read_timeout = Some(timeout);
        config.write_timeout = Some(timeout);
        if let Some(ns) = default_ns {
            config.default_namespace = ns;
        }
        let client = Client::try_from(config).map_err(|e| format!("{what}: {e}"))?;
        self.lock().insert(key, (version, client.clone()));
        Ok(client)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (String, Client)>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// An address of the peer's public front end.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ProbeTarget {
    pub host: String,
    pub port: u16,
}

/// Checks that the peer's front ends answer their protocol.
pub trait FrontendProbe: Send + Sync {
    /// `Ok` when every target answered its greeting within `timeout`.
    fn check<'a>(
        &'a self,
        targets: &'a [ProbeTarget],
        timeout: Duration,
    ) -> BoxFuture<'a, Result<(), String>>;
}

/// Connects to each target and reads the server greeting: `220` for SMTP (25, 587, 465 answers after TLS
/// so only the connection counts there), `* OK` for IMAP (143), `+OK` for POP3 (110); other ports: the
/// connection alone.
#[derive(Default)]
pub struct GreetingProbe;

fn expected_greeting(port: u16) -> Option<&'static str> {
    match port {
        25 | 587 => Some("220"),
        143 => Some("* OK"),
        110 => Some("+OK"),
        _ => None,
    }
}

impl FrontendProbe for GreetingProbe {
    fn check<'a>(
        &'a self,
        targets: &'a [ProbeTarget],
        timeout: Duration,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            if targets.is_empty() {
                return Err("no front-end address known for the peer".into());
            }
            for t in targets {
                let addr = format!("{}:{}", t.host, t.port);
                let one = async {
                    let stream = TcpStream::connect(&addr).await.map_err(|e| e.to_string())?;
                    if let Some(want) = expected_greeting(t.port) {
                        let mut line = String::new();
                        BufReader::new(stream)
                            .read_line(&mut line)
                            .await
                            .map_err(|e| e.to_string())?;
                        if !line.starts_with(want) {
                            return Err(format!("greeting `{}`", line.trim_end()));
                        }
                    }
                    Ok::<(), String>(())
                };
                match tokio::time::timeout(timeout, one).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(format!("{addr}: {e}")),
                    Err(_) => return Err(format!("{addr}: no answer within {timeout:?}")),
                }
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn greeting_probe_accepts_smtp_and_rejects_silence() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let _ = s.write_all(b"220 mx.example ESMTP\r\n").await;
            }
        });
        // The greeting check applies to well-known ports; test the parser and the bare connection path.
        assert_eq!(expected_greeting(25), Some("220"));
        let t = [ProbeTarget {
            host: "127.0.0.1".into(),
            port,
        }];
        GreetingProbe
            .check(&t, Duration::from_secs(2))
            .await
            .unwrap();

        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead = closed.local_addr().unwrap().port();
        drop(closed);
        let t = [ProbeTarget {
            host: "127.0.0.1".into(),
            port: dead,
        }];
        let err = GreetingProbe.check(&t, Duration::from_secs(2)).await;
        assert!(err.unwrap_err().contains(&dead.to_string()));
        assert!(GreetingProbe
            .check(&[], Duration::from_secs(1))
            .await
            .is_err());
    }
}
