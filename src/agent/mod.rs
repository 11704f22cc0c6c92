//! `mailpod-operator agent`: PID 1 of a mail pod.
//!
//! It renders the role's Postfix/Dovecot configuration from the mounted ConfigMaps ([`render`]), runs the
//! daemons as supervised children ([`supervise`]), applies ConfigMap changes without restarting them,
//! tails the mail logs into its own output and into [`metrics`], serves [`http`] health, readiness,
//! metrics and (stores) pause/resume, and on stores owns the LMTP port through the pause gate
//! ([`lmtp_gate`]). Where mail is queued (mx, submission) it retries the mail that waited for a store as
//! soon as the store takes deliveries again ([`store_flush`]).

pub mod apply;
pub mod control_auth;
pub mod http;
pub mod lmtp_gate;
pub mod metrics;
pub mod passwd;
pub mod queue_age;
pub mod quota;
pub mod render;
pub mod replication;
pub mod replication_guard;
pub mod replication_mirror;
pub mod role;
pub mod store_flush;
pub mod supervise;

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use tokio::sync::watch;

use crate::mailconfig::layout::{Layout, Ports, Role};
use crate::mailconfig::tables::data_hash;
use http::AgentState;
use supervise::Daemon;

/// A mail log larger than this is truncated after it has been read (the agent has already forwarded it).
const MAX_LOG_BYTES: u64 = 64 << 20;

#[derive(Args, Debug, Clone)]
pub struct AgentArgs {
    /// mx, submission, imap, pop3 or store.
    #[arg(long, env = "MAILPOD_ROLE")]
    pub role: Role,
    /// Mounted `<mailpod>-mail-settings` ConfigMap (holds settings.yaml).
    #[arg(
        long,
        env = "MAILPOD_CONFIG_DIR",
        default_value = "/etc/mailpod/settings"
    )]
    pub config_dir: PathBuf,
    /// Mounted `<mailpod>-access-tables` ConfigMap.
    #[arg(
        long,
        env = "MAILPOD_TABLES_DIR",
        default_value = "/etc/mailpod/tables"
    )]
    pub tables_dir: PathBuf,
    /// Put every generated file, queue, mail root and log under this directory instead of the image's
    /// standard paths (/var/spool/postfix, /var/mail/store, ...). For tests and local runs.
    #[arg(long, env = "MAILPOD_WORK_DIR")]
    pub work_dir: Option<PathBuf>,
    /// Users passwd-file (Secret) for stores and submission.
    #[arg(long, env = "MAILPOD_USERS_FILE")]
    pub users_file: Option<PathBuf>,
    /// Directory with tls.crt and tls.key, used when settings say `tls: true`.
    #[arg(long, env = "MAILPOD_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "MAILPOD_LISTEN_METRICS", default_value = "0.0.0.0:8080")]
    pub listen_metrics: SocketAddr,
    /// Address of the store's control endpoint (`POST /pause?seconds=N`, `POST /resume`).
    #[arg(long, env = "MAILPOD_LISTEN_CONTROL", default_value = "0.0.0.0:8081")]
    pub listen_control: SocketAddr,
    /// Store: file holding the LUN's control token, which every control request must present
    /// (`Authorization: Bearer`). A store refuses to start its control endpoint without one.
    #[arg(long, env = "MAILPOD_CONTROL_TOKEN_FILE")]
    pub control_token_file: Option<PathBuf>,
    /// Address the mail services listen on.
    #[arg(long, env = "MAILPOD_LISTEN", default_value = "0.0.0.0")]
    pub listen: String,
    #[arg(long, env = "MAILPOD_SMTP_PORT", default_value_t = 25)]
    pub smtp_port: u16,
    #[arg(long, env = "MAILPOD_SUBMISSION_PORT", default_value_t = 587)]
    pub submission_port: u16,
    #[arg(long, env = "MAILPOD_IMAP_PORT", default_value_t = 143)]
    pub imap_port: u16,
    #[arg(long, env = "MAILPOD_POP3_PORT", default_value_t = 110)]
    pub pop3_port: u16,
    /// Implicit-TLS ports (RFC 8314), served only when settings say `tls: true`.
    #[arg(long, env = "MAILPOD_SUBMISSIONS_PORT", default_value_t = 465)]
    pub submissions_port: u16,
    #[arg(long, env = "MAILPOD_IMAPS_PORT", default_value_t = 993)]
    pub imaps_port: u16,
    #[arg(long, env = "MAILPOD_POP3S_PORT", default_value_t = 995)]
    pub pop3s_port: u16,
    #[arg(long, env = "MAILPOD_LMTP_PORT", default_value_t = 24)]
    pub lmtp_port: u16,
    /// Seconds the daemons get to stop after SIGTERM (keep below the pod's terminationGracePeriodSeconds).
    #[arg(long, env = "MAILPOD_GRACE_SECONDS", default_value_t = 20)]
    pub grace_seconds: u64,
    /// How often the mounted ConfigMaps are checked for changes, in milliseconds.
    #[arg(long, env = "MAILPOD_POLL_MS", default_value_t = 2000)]
    pub poll_ms: u64,
    /// Store: this replica's StorageLUN (`corp-lun-0`). Without it the store does not replicate.
    #[arg(long, env = "MAILPOD_LUN")]
    pub lun: Option<String>,
    /// Store: host of the LUN's active replica (default: the LUN's Service, named like the LUN).
    #[arg(long, env = "MAILPOD_LUN_HOST")]
    pub lun_host: Option<String>,
    /// Store: doveadm port of the LUN's active replica.
    #[arg(long, env = "MAILPOD_LUN_DOVEADM_PORT", default_value_t = 12345)]
    pub lun_doveadm_port: u16,
    /// Store: this replica's own doveadm TCP port (standbys pull from the active's).
    #[arg(long, env = "MAILPOD_DOVEADM_PORT", default_value_t = 12345)]
    pub doveadm_port: u16,
    /// Store: doveadm's TLS listener for the other site's standbys (served with `--site-tls-dir` only).
    #[arg(long, env = "MAILPOD_DOVEADM_TLS_PORT", default_value_t = 12346)]
    pub doveadm_tls_port: u16,
    /// Store: directory of the site replication certificate (`tls.crt`, `tls.key`, `ca.crt`, a
    /// kubernetes.io/tls Secret). With it the store serves doveadm over TLS on `--doveadm-tls-port`, and a
    /// standby pulls from a `mailpod.io/replication-source` only over TLS, verifying the peer's
    /// certificate and host name against `ca.crt`. Without it a standby pulls nothing across sites.
    #[arg(long, env = "MAILPOD_SITE_TLS_DIR")]
    pub site_tls_dir: Option<PathBuf>,
    /// Store: password the LUN's replicas share for doveadm (a Secret that may appear after start-up).
    #[arg(long, env = "MAILPOD_DOVEADM_PASSWORD_FILE")]
    pub doveadm_password_file: Option<PathBuf>,
    /// Store: downward-API labels file whose `mailpod.io/role` says active or standby.
    #[arg(
        long,
        env = "MAILPOD_LABELS_FILE",
        default_value = "/etc/podinfo/labels"
    )]
    pub labels_file: PathBuf,
    /// Store: downward-API annotations file; `mailpod.io/replication-source` (`host:port`) makes a standby
    /// pull from there instead of the LUN host (cross-site replication). A missing file means no override.
    #[arg(
        long,
        env = "MAILPOD_ANNOTATIONS_FILE",
        default_value = "/etc/podinfo/annotations"
    )]
    pub annotations_file: PathBuf,
    /// Store: seconds between a standby's replication passes (StorageLUN `syncIntervalSeconds`).
    #[arg(long, env = "MAILPOD_SYNC_INTERVAL_SECONDS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub sync_interval_seconds: u64,
    /// Store: largest share (percent) of the LUN's messages, or of one mailbox's, a standby's pass may
    /// delete before it waits for a person (StorageLUN `maxDeletionPercent`; 100: no limit).
    #[arg(long, env = "MAILPOD_MAX_DELETION_PERCENT", default_value_t = 50,
          value_parser = clap::value_parser!(u32).range(1..=100))]
    pub max_deletion_percent: u32,
    /// Store: seconds between polls of the mailboxes' quota usage for /metrics (see [`quota`]).
    #[arg(long, env = "MAILPOD_QUOTA_INTERVAL_SECONDS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub quota_interval_seconds: u64,
    /// Store and imap: ManageSieve's port.
    #[arg(long, env = "MAILPOD_SIEVE_PORT", default_value_t = 4190)]
    pub sieve_port: u16,
}

impl AgentArgs {
    pub fn layout(&self) -> Layout {
        let mut layout = match &self.work_dir {
            Some(dir) => Layout::under(dir),
            None => Layout::default(),
        };
        if let Some(f) = &self.users_file {
            layout.users_file = f.clone();
        }
        if let Some(d) = &self.tls_dir {
            layout.tls_dir = d.clone();
        }
        if let Some(f) = &self.doveadm_password_file {
            layout.doveadm_password_file = f.clone();
        }
        layout.site_tls_dir = self.site_tls_dir.clone();
        layout
    }

    pub fn ports(&self) -> Ports {
        Ports {
            listen: self.listen.clone(),
            smtp: self.smtp_port,
            submission: self.submission_port,
            submissions: self.submissions_port,
            imap: self.imap_port,
            imaps: self.imaps_port,
            pop3: self.pop3_port,
            pop3s: self.pop3s_port,
            lmtp: self.lmtp_port,
            doveadm: self.doveadm_port,
            doveadm_tls: self.doveadm_tls_port,
            sieve: self.sieve_port,
        }
    }
}

/// Entry point of `mailpod-operator agent`.
pub fn main(args: AgentArgs) -> ExitCode {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("agent: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("agent failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: AgentArgs) -> Result<()> {
    let role = args.role;
    let layout = args.layout();
    let ports = args.ports();
    let inputs = render::read_inputs(&args.config_dir, &args.tables_dir)?;
    render::apply(role, &inputs, &layout, &ports)?;
    tracing::info!(%role, tables_hash = %inputs.tables_hash, "configuration rendered");
    if !inputs.settings.tls && matches!(role, Role::Submission | Role::Imap | Role::Pop3) {
        tracing::warn!(
            %role,
            "INSECURE: no TLS certificate (spec.insecurePlaintextAuth): passwords are taken in clear"
        );
    }

    let daemons: Vec<Daemon> = [Daemon::Postfix, Daemon::Dovecot]
        .into_iter()
        .filter(|d| match d {
            Daemon::Postfix => role.runs_postfix(),
            Daemon::Dovecot => role.runs_dovecot(),
        })
        .collect();
    let alive: Vec<(&'static str, Arc<AtomicBool>)> = daemons
        .iter()
        .map(|d| (d.name(), Arc::new(AtomicBool::new(false))))
        .collect();
    let gate = (role == Role::Store)
        .then(|| lmtp_gate::Gate::new(layout.lmtp_socket(), inputs.settings.hostname.clone()));
    let queue_dir = role.runs_postfix().then(|| layout.postfix_queue.clone());
    let mut metrics = metrics::Metrics::new(queue_dir, role == Role::Store);
    // Stores present no front-end certificate; with site replication they present the site's.
    let presented = match (&layout.site_tls_dir, role) {
        (Some(dir), Role::Store) => dir.join("tls.crt"),
        _ => layout.tls_dir.join("tls.crt"),
    };
    metrics.watch_certificate(presented);
    let quota = (role == Role::Store).then(|| quota::QuotaPoller {
        dovecot_conf: layout.dovecot_conf(),
        config_dir: args.config_dir.clone(),
        interval: Duration::from_secs(args.quota_interval_seconds),
        metrics: metrics.register_quota(),
    });
    let replication = match (&args.lun, &metrics.replication) {
        (Some(lun), Some(m)) => Some(Arc::new(
            replication::Replication::new(
                replication::ReplicationConfig {
                    labels_file: args.labels_file.clone(),
                    annotations_file: args.annotations_file.clone(),
                    lun: lun.clone(),
                    mailpod: inputs.settings.mailpod.clone(),
                    source_host: args.lun_host.clone().unwrap_or_else(|| lun.clone()),
                    source_port: args.lun_doveadm_port,
                    interval: Duration::from_secs(args.sync_interval_seconds),
                    tables_dir: args.tables_dir.clone(),
                    dovecot_conf: layout.dovecot_conf(),
                    users_list: layout.dovecot_config.join("replication-users"),
                    role_file: layout.replica_role_file(),
                    layout: layout.clone(),
                    max_deletion_percent: args.max_deletion_percent,
                },
                m.clone(),
            )
            .with_gate(gate.clone().expect("stores have an LMTP gate")),
        )),
        (None, Some(_)) => {
            tracing::warn!("no LUN named (--lun / MAILPOD_LUN): this store does not replicate");
            None
        }
        _ => None,
    };
    if role == Role::Store {
        // A replica takes no writes until it has read that it is its LUN's active (agent::role); a store
        // that does not replicate always does.
        let writes = replication.is_none();
        if let Some(g) = &gate {
            g.set_granted(writes);
        }
        role::set_logins(&layout, writes)?;
    }
    let state = Arc::new(AgentState {
        role,
        layout: layout.clone(),
        ports: ports.clone(),
        metrics,
        gate: gate.clone(),
        alive: alive.clone(),
        replication: replication.clone(),
        config_failure: std::sync::Mutex::new(None),
    });
    state.metrics.set_tables_hash(&inputs.tables_hash);

    let http_listener = tokio::net::TcpListener::bind(args.listen_metrics)
        .await
        .with_context(|| format!("binding the metrics address {}", args.listen_metrics))?;
    let app = http::router(state.clone());
    tokio::spawn(async move {
        if let Err(e) = axum::serve(http_listener, app).await {
            tracing::error!(error = %e, "HTTP server stopped");
        }
    });
    if gate.is_some() {
        let token = args.control_token_file.clone().context(
            "a store needs --control-token-file (MAILPOD_CONTROL_TOKEN_FILE): its control endpoint admits only requests with that token",
        )?;
        let control_listener = tokio::net::TcpListener::bind(args.listen_control)
            .await
            .with_context(|| format!("binding the control address {}", args.listen_control))?;
        let control =
            http::control_router(state.clone(), control_auth::ControlToken { file: token });
        tokio::spawn(async move {
            if let Err(e) = axum::serve(control_listener, control).await {
                tracing::error!(error = %e, "control endpoint stopped");
            }
        });
    }
    if let Some(gate) = &gate {
        let addr = format!("{}:{}", ports.listen, ports.lmtp);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("binding the LMTP port {addr}"))?;
        tokio::spawn(lmtp_gate::serve(gate.clone(), listener));
    }

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let grace = Duration::from_secs(args.grace_seconds);
    let mut supervisors = tokio::task::JoinSet::new();
    for (daemon, (_, alive)) in daemons.iter().copied().zip(alive.iter()) {
        let (layout, alive, rx, state) = (
            layout.clone(),
            alive.clone(),
            shutdown_rx.clone(),
            state.clone(),
        );
        supervisors.spawn(async move {
            let restarts = state
                .metrics
                .restarts
                .get_or_create(&metrics::ServiceLabel {
                    service: daemon.name().into(),
                })
                .clone();
            supervise::supervise(daemon, layout, alive, rx, grace, move || {
                restarts.inc();
            })
            .await
        });
    }
    tokio::spawn(tail_logs(layout.clone(), state.clone()));
    if role.runs_postfix() {
        tokio::spawn(queue_age::run(
            layout.postfix_config.clone(),
            layout.postfix_queue.clone(),
            state.clone(),
        ));
        tokio::spawn(store_flush::run(
            layout.postfix_config.clone(),
            layout.postfix_queue.clone(),
            args.config_dir.clone(),
            args.tables_dir.clone(),
        ));
    }
    if let Some(r) = replication {
        tokio::spawn(async move { r.run().await });
    }
    if let Some(q) = quota {
        tokio::spawn(q.run());
    }

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut poll = tokio::time::interval(Duration::from_millis(args.poll_ms.max(100)));
    let mut config = apply::ApplyState::new(mounted_hash(&args, &layout)?);
    let outcome = loop {
        tokio::select! {
            _ = sigterm.recv() => break Ok(()),
            _ = tokio::signal::ctrl_c() => break Ok(()),
            done = supervisors.join_next() => {
                break match done {
                    Some(Ok(Ok(()))) | None => Ok(()),
                    Some(Ok(Err(e))) => Err(e),
                    Some(Err(e)) => Err(e.into()),
                };
            }
            _ = poll.tick() => {
                // Kubernetes updates a mounted ConfigMap by swapping a symlink to a new directory, so files
                // change all at once; comparing a hash of the content every tick sees each update without
                // relying on inotify across the symlink swap. A configuration counts as seen only once it
                // is applied: a failed one is retried with backoff (agent::apply).
                match mounted_hash(&args, &layout) {
                    Ok(h) if config.due(&h, std::time::Instant::now()) => {
                        let reload_all = config.retrying();
                        let applied =
                            reconfigure(&args, &layout, &ports, &daemons, &state, reload_all).await;
                        match applied {
                            Ok(()) => config.succeeded(&h),
                            Err(e) => {
                                state.metrics.config_apply_failures.inc();
                                let now = std::time::Instant::now();
                                let delay = config.failed(&h, format!("{e:#}"), now);
                                tracing::error!(
                                    retry_in = ?delay,
                                    "keeping the previous configuration: {e:#}"
                                );
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!("reading mounted ConfigMaps: {e:#}"),
                }
                state.metrics.config_pending.set(i64::from(config.is_pending()));
                *state.config_failure.lock().unwrap_or_else(|p| p.into_inner()) =
                    config.failure();
            }
        }
    };
    tracing::info!("shutting down");
    let _ = shutdown_tx.send(true);
    let drain = async {
        while let Some(r) = supervisors.join_next().await {
            if let Ok(Err(e)) = r {
                tracing::warn!("while stopping: {e:#}");
            }
        }
    };
    if tokio::time::timeout(grace + Duration::from_secs(5), drain)
        .await
        .is_err()
    {
        tracing::warn!("daemons did not stop within the grace period");
    }
    outcome
}

/// How long deliveries wait after a mailbox's home moved: Dovecot notices a changed passwd-file at its
/// next lookup in a later second, and the reload that follows replaces its auth process.
const HOME_MOVE_HOLD: Duration = Duration::from_secs(3);

/// Applies changed ConfigMaps: maps are recompiled (no reload); main.cf/master.cf and Dovecot changes reload.
/// `reload_all`: reload every daemon (a retry: the failed attempt may have written files it never reloaded).
async fn reconfigure(
    args: &AgentArgs,
    layout: &Layout,
    ports: &Ports,
    daemons: &[Daemon],
    state: &AgentState,
    reload_all: bool,
) -> Result<()> {
    let inputs = render::read_inputs(&args.config_dir, &args.tables_dir)?;
    let changes = render::apply(args.role, &inputs, layout, ports)?;
    if changes.homes_moved {
        if let Some(gate) = &state.gate {
            gate.hold(HOME_MOVE_HOLD);
        }
    }
    for daemon in daemons {
        let needed = match daemon {
            Daemon::Postfix => changes.postfix_config,
            Daemon::Dovecot => changes.dovecot,
        };
        if needed || reload_all {
            daemon.reload(layout).await?;
        }
    }
    if changes.any() {
        state.metrics.config_applies.inc();
    }
    state.metrics.set_tables_hash(&inputs.tables_hash);
    tracing::info!(tables_hash = %inputs.tables_hash, ?changes, "configuration change applied");
    Ok(())
}

fn mounted_hash(args: &AgentArgs, layout: &Layout) -> Result<String> {
    let mut all = BTreeMap::new();
    // The replication Secret may be mounted after start-up, or rotated.
    if args.role == Role::Store {
        if let Ok(p) = std::fs::read_to_string(&layout.doveadm_password_file) {
            all.insert("replication/doveadm-password".to_string(), p);
        }
    }
    // The TLS Secret: a renewed certificate must reach every daemon that presents it (render::TLS_DIGEST).
    if args.role != Role::Store {
        all.extend(render::tls_files(layout)?);
    }
    // The site replication certificate, likewise (its digest is in site-tls.conf).
    if args.role == Role::Store {
        all.extend(render::site_tls_files(layout)?);
    }
    // The users Secret, updated by the kubelet like a ConfigMap: its private copy follows (agent::passwd).
    if matches!(args.role, Role::Store | Role::Submission) {
        if let Some(users) = passwd::read_source(&layout.users_file)? {
            all.insert(
                "users".to_string(),
                String::from_utf8_lossy(&users).into_owned(),
            );
        }
    }
    for (prefix, dir) in [
        ("settings/", &args.config_dir),
        ("tables/", &args.tables_dir),
    ] {
        for (k, v) in render::read_configmap_dir(dir)? {
            all.insert(format!("{prefix}{k}"), v);
        }
    }
    Ok(data_hash(&all))
}

/// Forwards the Postfix and Dovecot logs to stdout (what `kubectl logs` shows) and counts deliveries.
async fn tail_logs(layout: Layout, state: Arc<AgentState>) {
    let mut files = [
        (layout.postfix_log(), 0u64, true),
        (layout.dovecot_log(), 0u64, false),
    ];
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        for (path, offset, is_postfix) in files.iter_mut() {
            let text = match read_from(path, offset) {
                Ok(t) => t,
                Err(_) => continue,
            };
            let mut out = std::io::stdout().lock();
            for line in text.lines() {
                if *is_postfix {
                    state.metrics.observe_maillog_line(line);
                }
                let _ = writeln!(out, "{line}");
            }
        }
    }
}

/// New complete lines of `path` since `offset`; truncates a log that grew past [`MAX_LOG_BYTES`].
fn read_from(path: &std::path::Path, offset: &mut u64) -> std::io::Result<String> {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)?;
    let len = f.metadata()?.len();
    if len < *offset {
        *offset = 0;
    }
    f.seek(SeekFrom::Start(*offset))?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)?;
    let complete = buf
        .iter()
        .rposition(|b| *b == b'\n')
        .map(|i| i + 1)
        .unwrap_or(0);
    buf.truncate(complete);
    *offset += complete as u64;
    if *offset > MAX_LOG_BYTES && *offset == len {
        f.set_len(0)?;
        *offset = 0;
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}
