//! The operator's client to the API server, with every call bounded in time.
//!
//! kube's default client has no read timeout: a connection that stops answering would hang a Lease
//! renewal or a reconcile for ever. Connecting and sending have their limits, and every request but a
//! watch must be answered within [`REQUEST_TIMEOUT`]. A watch's stream is ended by its server-side
//! `timeoutSeconds` (290 s in kube-runtime) and kube-runtime's idle timeout; the read timeout, which also
//! applies to it, sits above both.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Request;
use kube::client::ClientBuilder;
use kube::{Client, Config};
use tower::{BoxError, Layer, Service};

pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for the answer to a request that is not a watch.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest silence on a connection: above a quiet watch's server-side timeout, so the server ends it.
pub const READ_TIMEOUT: Duration = Duration::from_secs(300);

/// Sets the operator's connect, write and read timeouts on a client configuration.
pub fn with_timeouts(mut config: Config) -> Config {
    config.connect_timeout = Some(CONNECT_TIMEOUT);
    config.write_timeout = Some(WRITE_TIMEOUT);
    config.read_timeout = Some(READ_TIMEOUT);
    // Counted from the request, not from when a pooled connection went idle.
    config.reset_reader_on_write = true;
    config
}

/// The client `mailpod-operator run` uses: kubeconfig or in-cluster configuration, with the timeouts above.
pub async fn operator_client() -> Result<Client, kube::Error> {
    let config = Config::infer().await.map_err(kube::Error::InferConfig)?;
    Ok(ClientBuilder::try_from(with_timeouts(config))?
        .with_layer(&RequestTimeoutLayer(REQUEST_TIMEOUT))
        .build())
}

/// Fails a request (other than a watch) that has no answer within the limit.
#[derive(Clone, Copy, Debug)]
pub struct RequestTimeoutLayer(pub Duration);

impl<S> Layer<S> for RequestTimeoutLayer {
    type Service = RequestTimeout<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestTimeout {
            inner,
            limit: self.0,
        }
    }
}

#[derive(Clone, Debug)]
pub struct RequestTimeout<S> {
    inner: S,
    limit: Duration,
}

/// The error of a request that had no answer in time.
#[derive(Debug, thiserror::Error)]
#[error("the API server did not answer within {0:?}")]
pub struct TimedOut(pub Duration);

fn is_watch<B>(req: &Request<B>) -> bool {
    req.uri()
        .query()
        .is_some_and(|q| q.split('&').any(|p| p == "watch=true" || p == "watch=1"))
}

impl<S, B> Service<Request<B>> for RequestTimeout<S>
where
    S: Service<Request<B>>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let watch = is_watch(&req);
        let limit = self.limit;
        let answer = self.inner.call(req);
        Box::pin(async move {
            if watch {
                return answer.await.map_err(Into::into);
            }
            match tokio::time::timeout(limit, answer).await {
                Ok(r) => r.map_err(Into::into),
                Err(_) => Err(Box::new(TimedOut(limit)) as BoxError),
            }
        })
    }
}

#[cfg(all(test, feature = "testkit"))]
mod tests {
    use super::*;
    use crate::testkit::{ApiServer, Fault, FaultKind};
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::Api;

    fn client(server: &ApiServer) -> Client {
        Client::new(
            RequestTimeoutLayer(Duration::from_millis(200)).layer(server.clone()),
            "default",
        )
    }

    #[tokio::test]
    async fn a_request_the_server_never_answers_fails_after_the_limit() {
        let server = ApiServer::new();
        server.inject(Fault::new(None, "/configmaps", FaultKind::Hang, 1));
        let maps: Api<ConfigMap> = Api::namespaced(client(&server), "mail");
        let started = tokio::time::Instant::now();
        let answer = tokio::time::timeout(Duration::from_secs(5), maps.get_opt("x"))
            .await
            .expect("the client's own limit ends the call");
        assert!(answer.is_err(), "{answer:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
        // The next request is answered as usual.
        assert!(maps.get_opt("x").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_watch_is_not_cut_by_the_request_limit() {
        let server = ApiServer::new();
        server.inject(Fault::new(None, "/configmaps", FaultKind::Hang, 1));
        let req = Request::get("/api/v1/namespaces/mail/configmaps?watch=true")
            .body(kube::client::Body::empty())
            .unwrap();
        let mut service = RequestTimeoutLayer(Duration::from_millis(200)).layer(server.clone());
        let call = service.call(req);
        assert!(
            tokio::time::timeout(Duration::from_secs(1), call)
                .await
                .is_err(),
            "a watch waits for its events as long as its own timeouts allow"
        );
    }
}
