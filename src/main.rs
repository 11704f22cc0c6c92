//! `mailpod-operator`: one binary for the operator, the in-pod agent, snapshot/restore jobs and offline tools.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use mailpod_operator::{names, render, snapshot};

#[derive(Parser)]
#[command(
    name = "mailpod-operator",
    version,
    about = "Kubernetes operator for highly-available mail service (MailPod, StorageLUN, SiteFailover)",
    long_about = "Kubernetes operator for highly-available mail service.\n\n\
        One binary with several roles: the controllers (`run`), the in-pod mail agent (`agent`), the jobs \
        that snapshot and restore mail stores, and offline tools (`render`, `crds`)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the CustomResourceDefinitions (MailPod, StorageLUN, SiteFailover) as multi-document YAML.
    ///
    /// crds/ in the source tree holds this output; install with `mailpod-operator crds | kubectl apply -f -`.
    Crds,
    /// Print every object the operator would apply for the given resources, with no cluster.
    ///
    /// Reads MailPod, StorageLUN and SiteFailover documents (multi-document YAML allowed), plus ConfigMaps and
    /// Secrets that MailPods reference for their mailbox lists. Follows the chain MailPod -> StorageLUNs ->
    /// store objects. StorageLUNs given beside their MailPod are read as its current placement.
    /// On invalid input prints one line per problem (file, object, field) on stderr, nothing on stdout, and
    /// exits with status 2.
    Render(RenderArgs),
    /// Run as PID 1 of a mail pod: render, supervise and hot-reload Postfix/Dovecot for one role.
    Agent(Box<mailpod_operator::agent::AgentArgs>),
    /// Take a consistent snapshot of a StorageLUN's active replica (what the LUN's CronJob runs).
    ///
    /// Pauses delivery to the LUN (LMTP answers 4xx; Postfix keeps the mail queued), creates a VolumeSnapshot
    /// of the active replica's PVC, resumes delivery whatever happens, waits for readyToUse, prunes to the
    /// LUN's `retain`, and records the result in the LUN's status. Exit status 1 on failure.
    Snapshot(SnapshotArgs),
    /// Restore one message, one folder, one mailbox or a whole LUN from a VolumeSnapshot into the live store.
    ///
    /// Checks the StorageLUN, that the snapshot is this LUN's (label mailpod.io/lun) and readyToUse, and that
    /// the mailbox is on the LUN; then creates a PVC cloned from the snapshot and a Job that copies into the
    /// live store what the snapshot holds and the store lacks (nothing is deleted or duplicated; running it
    /// twice restores nothing the second time). Nothing is created when a check fails.
    Restore(RestoreArgs),
    /// Inside a restore Job: copy mail from the mounted snapshot clone into the live store (internal).
    #[command(hide = true)]
    RestoreImport(RestoreImportArgs),
    /// Run the controllers against the cluster of the current kubeconfig, or the in-cluster config.
    ///
    /// Checks first that the CRDs are installed. Stops on SIGTERM or Ctrl-C after in-flight reconciles finish.
    Run(mailpod_operator::operator::RunArgs),
}

#[derive(Args)]
struct SnapshotArgs {
    /// StorageLUN to snapshot.
    #[arg(long)]
    lun: String,
    /// Namespace of the StorageLUN.
    #[arg(short = 'n', long, env = "POD_NAMESPACE", default_value = "default")]
    namespace: String,
    /// VolumeSnapshotClass; the LUN's `spec.snapshots.volumeSnapshotClassName`, else the cluster default.
    #[arg(long)]
    volume_snapshot_class: Option<String>,
    /// Seconds to wait for the snapshot to become readyToUse (delivery runs meanwhile).
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// Do not check the VolumeSnapshotClass first (the snapshot job: its namespaced Role cannot read the
    /// cluster-scoped classes; the operator checks the class it names).
    #[arg(long)]
    skip_class_check: bool,
}

#[derive(Args)]
struct RestoreArgs {
    #[command(flatten)]
    flags: mailpod_operator::restore::RestoreFlags,
    /// Namespace of the StorageLUN.
    #[arg(short = 'n', long, env = "POD_NAMESPACE", default_value = "default")]
    namespace: String,
}

#[derive(Args)]
struct RestoreImportArgs {
    /// The live store's doveadm service, `host:port` (the LUN's active Service).
    #[arg(long)]
    target: String,
    /// Mailbox to restore; without it, `--all`.
    #[arg(long, conflicts_with = "all", required_unless_present = "all")]
    mailbox: Option<String>,
    /// Every mailbox in the snapshot.
    #[arg(long)]
    all: bool,
    /// Only this folder of the mailbox.
    #[arg(long, requires = "mailbox")]
    folder: Option<String>,
    /// Only the message with this Message-ID.
    #[arg(long, requires = "mailbox")]
    message_id: Option<String>,
    /// The mailboxes the LUN holds now, comma-separated: a mailbox of the snapshot not among them is not
    /// restored (reported as skipped with --all, refused with --mailbox). With --all, this or
    /// --tables-dir is required.
    #[arg(long, env = "MAILPOD_LUN_MAILBOXES", value_delimiter = ',')]
    lun_mailboxes: Option<Vec<String>>,
    /// The MailPod's access tables as mounted (the restore Job's): the LUN's mailboxes and the
    /// incarnations of those it took back after a removal come from there, as the stores read them.
    #[arg(long, requires = "lun_index", conflicts_with = "lun_mailboxes")]
    tables_dir: Option<PathBuf>,
    /// Index of the LUN in its MailPod (with --tables-dir).
    #[arg(long, requires = "tables_dir")]
    lun_index: Option<u32>,
    /// Mail root of the snapshot clone (the store layout's).
    #[arg(long, default_value = mailpod_operator::resources::pod::paths::MAIL)]
    mail_root: PathBuf,
    /// Scratch directory for the local Dovecot.
    #[arg(long, default_value = "/var/lib/mailpod/restore")]
    work_dir: PathBuf,
    /// File holding the LUN's doveadm password.
    #[arg(long, env = "MAILPOD_DOVEADM_PASSWORD_FILE")]
    doveadm_password_file: PathBuf,
    /// Numeric owner of the Maildirs.
    #[arg(long, default_value_t = 5000)]
    mail_uid: u32,
    #[arg(long, default_value_t = 5000)]
    mail_gid: u32,
}

#[derive(Args)]
struct RenderArgs {
    /// Input file; `-` reads standard input. May be given several times.
    #[arg(short = 'f', long = "filename", required = true, value_name = "FILE")]
    files: Vec<PathBuf>,
    /// Namespace of input objects that name none.
    #[arg(short = 'n', long, default_value = "default")]
    namespace: String,
    /// Mail image for resources that name none.
    #[arg(long, default_value = names::DEFAULT_IMAGE)]
    image: String,
    /// The cluster's DNS domain, as `run --cluster-domain`.
    #[arg(long, default_value = mailpod_operator::resources::DEFAULT_CLUSTER_DOMAIN,
          value_parser = mailpod_operator::resources::parse_cluster_domain)]
    cluster_domain: String,
    /// The operator's namespace, as `run --operator-namespace`: the NetworkPolicies admit its pods from
    /// there. Without it they admit only the MailPod's own jobs to the control port.
    #[arg(long)]
    operator_namespace: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crds => {
            print!("{}", mailpod_operator::crd::crds_yaml());
            ExitCode::SUCCESS
        }
        Command::Render(args) => run_render(args),
        Command::Agent(args) => mailpod_operator::agent::main(*args),
        Command::Snapshot(args) => run_snapshot(args),
        Command::Run(args) => mailpod_operator::operator::main(args),
        Command::RestoreImport(args) => run_restore_import(args),
        Command::Restore(args) => run_restore(args),
    }
}

fn run_restore(args: RestoreArgs) -> ExitCode {
    let req = args.flags.request(&args.namespace);
    let result = job_runtime().block_on(async {
        let client = kube::Client::try_default().await?;
        Ok::<_, anyhow::Error>(mailpod_operator::restore::run(&client, &req).await?)
    });
    match result {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("restore from {}: {e:#}", req.snapshot);
            ExitCode::FAILURE
        }
    }
}

fn run_restore_import(args: RestoreImportArgs) -> ExitCode {
    use mailpod_operator::restore::import::{self, ImportOptions, Scope};
    // Logs go to stderr; stdout carries the report.
    mailpod_operator::telemetry::init();
    let scope = match args.mailbox {
        Some(address) => Scope::Mailbox {
            address,
            folder: args.folder,
            message_id: args.message_id,
        },
        None => Scope::All,
    };
    let (lun_mailboxes, incarnations) = match (&args.tables_dir, args.lun_index) {
        (Some(dir), Some(index)) => match import::lun_from_tables(dir, index) {
            Ok((m, i)) => (Some(m), i),
            Err(e) => {
                eprintln!("restore-import: {e:#}");
                return ExitCode::FAILURE;
            }
        },
        _ => (
            args.lun_mailboxes.map(|l| {
                l.into_iter()
                    .map(|m| m.trim().to_lowercase())
                    .filter(|m| !m.is_empty())
                    .collect()
            }),
            Default::default(),
        ),
    };
    let opts = ImportOptions {
        mail_root: args.mail_root,
        work_dir: args.work_dir,
        target: args.target,
        password_file: args.doveadm_password_file,
        scope,
        lun_mailboxes,
        incarnations,
        mail_uid: args.mail_uid,
        mail_gid: args.mail_gid,
    };
    match import::run(&opts) {
        Ok(report) => {
            print!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("restore into {}: {e:#}", opts.target);
            ExitCode::FAILURE
        }
    }
}

fn job_runtime() -> tokio::runtime::Runtime {
    mailpod_operator::telemetry::init();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn run_snapshot(args: SnapshotArgs) -> ExitCode {
    let mut opts = snapshot::Options::new(args.namespace, args.lun);
    opts.volume_snapshot_class = args.volume_snapshot_class;
    opts.timeout = std::time::Duration::from_secs(args.timeout);
    opts.check_class = !args.skip_class_check;
    let result = job_runtime().block_on(async {
        let client = kube::Client::try_default().await?;
        // A job pod that has just started may wait for the stores' NetworkPolicy to admit it.
        let agent = snapshot::HttpAgent::new(
            std::time::Duration::from_secs(30),
            std::time::Duration::from_secs(20),
        );
        Ok::<_, anyhow::Error>(snapshot::run(&client, &agent, &opts).await?)
    });
    match result {
        Ok(out) => {
            println!(
                "{} taken; delivery paused {} ms; pruned: {}",
                out.name,
                out.pause.as_millis(),
                if out.pruned.is_empty() {
                    "none".to_string()
                } else {
                    out.pruned.join(", ")
                }
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("snapshot of {}: {e:#}", opts.lun);
            ExitCode::FAILURE
        }
    }
}

fn run_render(args: RenderArgs) -> ExitCode {
    let mut files = vec![];
    for path in &args.files {
        let name = path.display().to_string();
        let text = if name == "-" {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s).map(|_| s)
        } else {
            std::fs::read_to_string(path)
        };
        match text {
            Ok(t) => files.push((name, t)),
            Err(e) => {
                eprintln!("{name}: cannot read: {e}");
                return ExitCode::from(2);
            }
        }
    }
    let opts = render::Options {
        namespace: args.namespace,
        image: args.image,
        cluster_domain: args.cluster_domain,
        operator_namespace: args.operator_namespace,
    };
    match render::render(&files, &opts) {
        Ok(yaml) => {
            print!("{yaml}");
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprint!("{errors}");
            ExitCode::from(2)
        }
    }
}
