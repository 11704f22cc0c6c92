//! `mailpod-operator run`: the controllers, behind leader election, with metrics, health and logs.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;
use futures::FutureExt;

use crate::controller::{self, leader};
use crate::metrics::{self, OperatorMetrics};
use crate::names;
use crate::telemetry::{self, LogFormat};

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Namespaces to watch, comma-separated; all namespaces when unset.
    #[arg(
        long = "watch-namespaces",
        short = 'n',
        alias = "namespace",
        env = "MAILPOD_WATCH_NAMESPACES",
        value_delimiter = ','
    )]
    pub watch_namespaces: Vec<String>,
    /// Mail image (the `mail` target of mail-image/Dockerfile) for MailPods that name none, and for the
    /// snapshot and restore jobs.
    #[arg(long = "mail-image", alias = "image", env = "MAILPOD_MAIL_IMAGE", default_value = names::DEFAULT_IMAGE)]
    pub mail_image: String,
    /// The cluster's DNS domain (the kubelet's `--cluster-domain`): the operator renders every Service name
    /// a mail daemon looks up as `<service>.<namespace>.svc.<domain>`.
    #[arg(long, env = "MAILPOD_CLUSTER_DOMAIN", default_value = crate::resources::DEFAULT_CLUSTER_DOMAIN,
          value_parser = crate::resources::parse_cluster_domain)]
    pub cluster_domain: String,
    /// The namespace the operator's pods run in (the chart sets it from the downward API): the mail pods'
    /// NetworkPolicies admit the operator from this namespace only. Unset outside a cluster.
    #[arg(long, env = "POD_NAMESPACE")]
    pub operator_namespace: Option<String>,
    /// MailPods reconciled at once.
    #[arg(long, default_value_t = 8)]
    pub concurrency: u16,
    /// Watch Secrets labelled `mailpod.io/mailbox-source=true`, so a change to a Secret mailbox list is
    /// applied at once. `false` needs no list/watch on Secrets: Secret sources are read by name on each
    /// reconcile and their changes seen at the next resync.
    #[arg(long, env = "MAILPOD_WATCH_SECRET_SOURCES", default_value_t = true, action = clap::ArgAction::Set)]
    pub watch_secret_sources: bool,
    /// This cluster's site name: starts the SiteFailover controller for SiteFailovers whose
    /// `spec.localSite` is this name. Without it SiteFailovers are left alone.
    #[arg(long, env = "MAILPOD_SITE")]
    pub site: Option<String>,
    /// Log lines as text or JSON.
    #[arg(long, value_enum, env = "MAILPOD_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "MAILPOD_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,
    /// Elect one leader among replicas through a Lease; only the leader reconciles.
    #[arg(long, env = "MAILPOD_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_elect: bool,
    /// Namespace of the leader Lease (the operator's own; the client's default namespace when unset).
    #[arg(long = "leader-election-namespace", env = "POD_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// Name of the leader Lease.
    #[arg(long, default_value = "mailpod-operator")]
    pub lease_name: String,
    /// This replica's identity in the Lease (the pod name; the host name when unset).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
}

pub fn main(args: RunArgs) -> ExitCode {
    telemetry::init_with(args.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mailpod-operator: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let metrics = Arc::new(OperatorMetrics::default());
    // Health and metrics first, so a standby replica answers its probes while it waits for the Lease.
    let server = tokio::spawn(metrics::serve(args.metrics_addr, metrics.clone()));
    let client = controller::client::operator_client().await.map_err(|e| {
        anyhow::anyhow!("cannot configure a Kubernetes client (kubeconfig or in-cluster): {e}")
    })?;
    let namespaces: Vec<Option<String>> = if args.watch_namespaces.is_empty() {
        vec![None]
    } else {
        args.watch_namespaces.iter().cloned().map(Some).collect()
    };
    // One shutdown signal for every controller, each finishing its in-flight work.
    let shutdown = shutdown_signal().boxed().shared();
    if !controller::wait_for_crds(&client, &namespaces, shutdown.clone()).await? {
        server.abort();
        return Ok(());
    }
    metrics.set_ready(true);

    let run_controllers =
        |stop: futures::future::Shared<futures::future::BoxFuture<'static, ()>>| {
            let client = client.clone();
            let metrics = metrics.clone();
            let (site, image, concurrency) =
                (args.site.clone(), args.mail_image.clone(), args.concurrency);
            let cluster_domain = args.cluster_domain.clone();
            let operator_namespace = args.operator_namespace.clone();
            let watch_secret_sources = args.watch_secret_sources;
            let namespaces = namespaces.clone();
            async move {
                // One set of controllers per watched namespace; all of them stop together.
                let runs = namespaces.into_iter().map(|namespace| {
                    let config = controller::RunConfig {
                        namespace,
                        default_image: image.clone(),
                        cluster_domain: cluster_domain.clone(),
                        operator_namespace: operator_namespace.clone(),
                        concurrency,
                        watch_secret_sources,
                        metrics: Some(metrics.clone()),
                    };
                    controller::run_all(client.clone(), config, site.clone(), stop.clone())
                });
                futures::future::try_join_all(runs).await.map(|_| ())
            }
        };

    let result = if !args.leader_elect {
        metrics.set_leader(true);
        run_controllers(shutdown.clone()).await
    } else {
        let identity = args.identity.clone().unwrap_or_else(|| {
            std::env::var("HOSTNAME")
                .unwrap_or_else(|_| format!("mailpod-operator-{}", std::process::id()))
        });
        let lease = leader::LeaseConfig::new(
            args.lease_namespace
                .clone()
                .unwrap_or_else(|| client.default_namespace().to_string()),
            args.lease_name.clone(),
            identity,
        );
        let elector = Arc::new(leader::LeaderElector::new(client.clone(), lease));
        // Leading ends when the Lease cannot be renewed in time (the API server gone, or this replica cut
        // off from it): every controller stops, then this replica campaigns again and, once it leads,
        // starts them afresh with new caches. Staying up (rather than exiting) keeps the kubelet's restart
        // back-off from delaying the return by minutes after a long API outage.
        loop {
            if !elector.acquire(shutdown.clone()).await {
                break Ok(());
            }
            metrics.set_leader(true);
            let holder = elector.clone();
            let lost = async move { holder.hold().await }.boxed().shared();
            let stop = futures::future::select(shutdown.clone(), lost.clone())
                .map(|_| ())
                .boxed()
                .shared();
            let result = run_controllers(stop).await;
            metrics.set_leader(false);
            if lost.peek().is_some() && result.is_ok() {
                tracing::warn!("lost the leader lease; stopped reconciling; campaigning again");
                continue;
            }
            elector.release().await;
            break result;
        }
    };
    server.abort();
    result
}

/// SIGTERM (what Kubernetes sends) or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
