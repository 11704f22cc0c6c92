//! `kubectl mailpod`: status, snapshot, fence/unfence and site switches for mailpod-operator resources.
//! Install by putting this binary on the PATH; kubectl finds it as a plugin.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mailpod_operator::plugin::{self, PluginError, FAILBACK_ANNOTATION, FAILOVER_ANNOTATION};

#[derive(Parser)]
#[command(
    name = "kubectl-mailpod",
    version,
    about = "Operate mailpod-operator resources: status, snapshots, restores, fencing, site failover and failback"
)]
struct Cli {
    /// Namespace (defaults to the kubeconfig context's).
    #[arg(short = 'n', long, global = true)]
    namespace: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// A MailPod's services, LUNs, active replicas, last snapshots and site state on one screen.
    Status { mailpod: String },
    /// Take a snapshot of a StorageLUN now (a Job from its snapshot CronJob).
    Snapshot { lun: String },
    /// Restore a message, folder, mailbox or whole LUN from a VolumeSnapshot into the live store.
    Restore(Box<mailpod_operator::restore::RestoreFlags>),
    /// Fence a StorageLUN: no replica serves as active until unfenced.
    Fence { lun: String },
    /// Unfence a StorageLUN: the operator elects an active replica again.
    Unfence { lun: String },
    /// Ask the standby site of a SiteFailover to take over now (run against the standby's cluster).
    #[command(alias = "failover")]
    Promote { site_failover: String },
    /// Ask a SiteFailover to switch back to its primary site once resynchronised.
    Failback { site_failover: String },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let result: Result<String, PluginError> = runtime.block_on(async {
        let client = kube::Client::try_default().await?;
        let ns = cli
            .namespace
            .clone()
            .unwrap_or_else(|| client.default_namespace().to_string());
        match &cli.command {
            Command::Status { mailpod } => plugin::status(&client, &ns, mailpod).await,
            Command::Snapshot { lun } => plugin::snapshot_now(&client, &ns, lun).await,
            Command::Restore(args) => plugin::restore(&client, &args.request(&ns)).await,
            Command::Fence { lun } => plugin::set_fenced(&client, &ns, lun, true).await,
            Command::Unfence { lun } => plugin::set_fenced(&client, &ns, lun, false).await,
            Command::Promote { site_failover } => {
                plugin::request_switch(&client, &ns, site_failover, FAILOVER_ANNOTATION).await
            }
            Command::Failback { site_failover } => {
                plugin::request_switch(&client, &ns, site_failover, FAILBACK_ANNOTATION).await
            }
        }
    });
    match result {
        Ok(out) => {
            print!("{out}");
            if !out.ends_with('\n') {
                println!();
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("kubectl-mailpod: {e}");
            ExitCode::FAILURE
        }
    }
}
