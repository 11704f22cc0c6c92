//! Continuous replication between the replicas of a LUN (the `Dovecot` method).
//!
//! Dovecot 2.4 removed the replicator service, so the agent drives dsync itself. Each store replica reads
//! its role from the downward-API labels file (`mailpod.io/role`, moved by the operator on promotion):
//!
//! - **active**: serves, pulls nothing. Its doveadm TCP service answers the standbys.
//! - **standby**: every interval, for every mailbox the access tables place on this LUN, runs
//!   `doveadm backup -R -u <mailbox> tcp:<LUN Service>:<doveadm port>`: a one-way pull that makes the
//!   standby an exact copy of the active, expunges and flag changes included (mailbox by mailbox, under
//!   the deletion guard: agent::replication_mirror). `doveadm sync -1` is not
//!   used: it keeps destination-only changes, so a standby would slowly diverge (its manual says it
//!   "doesn't currently work perfectly"), and a standby never legitimately has changes of its own.
//! - **demoted** (was active, now standby: fenced or switched over): mail delivered to it that never
//!   reached the new active would be deleted by a one-way backup. On leaving active it stops taking
//!   writes at once (agent::role: LMTP refused, logins denied, sessions kicked). Its first passes hand
//!   what only it has to the new active: every message it holds more often than the new active, compared
//!   per folder by header block and size, is saved there with its flags (restore::import, the same
//!   comparison a restore makes), and the pass repeats until one copies nothing; only then does it mirror
//!   with `backup -R`. `doveadm sync -1` did this before and duplicated mail: while the new active takes
//!   deliveries, dsync stops with "Mailbox changes caused a desync", and a second `sync -1` copies again
//!   what the first had copied (UIDs conflict, so the copies are not recognised). A two-way `sync`
//!   renumbers conflicting UIDs on both sides. Its last role is kept on the mail volume so a restart in
//!   between does not forget it.
//! - no role yet (before the operator elects one): nothing.
//!
//! A role change away from standby stops a pass in flight at once (the doveadm child is killed).
//!
//! Cross-site replication: on a standby site every replica is a standby and must pull from the other
//! site's LUN. The operator names it in the pod annotation `mailpod.io/replication-source` (`host:port`),
//! read from the downward-API annotations file like the role; while it is set, a standby pulls from there
//! instead of `<lun host>:<lun doveadm port>`. A changed source needs a complete pass before `inSync`; a
//! malformed value is refused (logged, `lastError`) and the previous source is kept.
//!
//! Before each mirror pass a standby checks that the pass would not delete most of what it holds
//! ([`super::replication_guard`]): an emptied or replaced active volume is refused and reported
//! (`deletionRefused`, metrics) until a person confirms it.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use std::sync::Arc;

use super::lmtp_gate::Gate;
use super::metrics::ReplicationMetrics;
use super::render::read_configmap_dir;
use super::replication_guard::{self as guard, Guard, Refusal, Refused};
use super::replication_mirror as mirror;
use crate::mailconfig::tables::{AccessTables, LunMailboxes};
use crate::names::annotations;
use crate::names::labels as l;

/// How often the labels file is read: a promotion stops pulling within this time.
const ROLE_POLL: Duration = Duration::from_millis(250);
/// Longest a role the operator pushed (`POST /role` on the control port) stands in for the labels file
/// while that file does not change. The operator moves the label before it pushes, so the kubelet's copy
/// normally follows within seconds; should it never, the labels file is the role again.
pub const PUSH_HOLD: Duration = Duration::from_secs(120);
/// A standby more than this many intervals behind is not in sync.
const IN_SYNC_INTERVALS: u32 = 3;
/// Longest a single pass may take before it is abandoned and counted as a failure.
const MAX_PASS: Duration = Duration::from_secs(600);
/// Hand-over passes in one attempt before giving up until the next interval (with writes refused the
/// second pass copies nothing).
const MAX_HAND_OVER_PASSES: usize = 10;

/// This replica's role, from the labels file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum ReplicaRole {
    Active,
    Standby,
    /// No role label yet.
    Unassigned,
}

impl ReplicaRole {
    /// Reads `mailpod.io/role` from a downward-API labels file (`key="value"` lines). A missing file or
    /// label means the operator has not chosen yet.
    pub fn from_labels(text: &str) -> Self {
        let value = text.lines().find_map(|line| {
            let (k, v) = line.split_once('=')?;
            (k.trim() == l::ROLE).then(|| v.trim().trim_matches('"').to_string())
        });
        match value.as_deref() {
            Some(l::ROLE_ACTIVE) => ReplicaRole::Active,
            Some(l::ROLE_STANDBY) => ReplicaRole::Standby,
            _ => ReplicaRole::Unassigned,
        }
    }

    fn read(path: &Path) -> Self {
        std::fs::read_to_string(path)
            .map(|t| Self::from_labels(&t))
            .unwrap_or(ReplicaRole::Unassigned)
    }
}

/// Reads the value of `key` from a downward-API file (`key="value"` lines, values quoted and escaped
/// like Go's `%q`). `None` when the key is absent.
pub fn downward_api_value(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once('=')?;
        (k.trim() == key).then(|| unquote(v.trim()))
    })
}

fn unquote(v: &str) -> String {
    let Some(inner) = v
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .filter(|_| v.len() >= 2)
    else {
        return v.to_string();
    };
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

/// Checks a `mailpod.io/replication-source` value: `host:port`, the port numeric (1-65535), the host
/// non-empty without spaces (an IPv6 address in brackets). Returns it trimmed.
pub fn parse_source(value: &str) -> Result<String, String> {
    let value = value.trim();
    let refuse = |why: &str| {
        Err(format!(
            "annotation {} = {value:?} refused: {why} (want host:port with a numeric port)",
            annotations::REPLICATION_SOURCE
        ))
    };
    let Some((host, port)) = value.rsplit_once(':') else {
        return refuse("no port");
    };
    if host.is_empty() {
        return refuse("no host");
    }
    if host
        .chars()
        .any(|c| c.is_whitespace() || c == '/' || c == '@')
    {
        return refuse("invalid host");
    }
    let bracketed = host.starts_with('[') && host.ends_with(']') && host.len() > 2;
    if host.contains(':') && !bracketed {
        return refuse("an IPv6 host must be in brackets");
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 && port.bytes().all(|b| b.is_ascii_digit()) => Ok(format!("{host}:{p}")),
        _ => refuse("the port is not a number between 1 and 65535"),
    }
}

/// Where to replicate from and how often.
#[derive(Clone, Debug)]
pub struct ReplicationConfig {
    pub labels_file: PathBuf,
    /// Downward-API annotations file; `mailpod.io/replication-source` overrides the LUN host.
    pub annotations_file: PathBuf,
    /// Name of this replica's StorageLUN (`corp-lun-0`).
    pub lun: String,
    /// The MailPod, to find this LUN's index in the access tables.
    pub mailpod: String,
    /// The LUN's active replica (its Service), and its doveadm port.
    pub source_host: String,
    pub source_port: u16,
    pub interval: Duration,
    pub tables_dir: PathBuf,
    /// dovecot.conf: doveadm reads the mail location and `doveadm_password` from it.
    pub dovecot_conf: PathBuf,
    /// Scratch file with the pass's user list.
    pub users_list: PathBuf,
    /// Last role of this replica, on the mail volume.
    pub role_file: PathBuf,
    /// The store's files: the login marker and users file the role changes (agent::role), the Maildirs a
    /// hand-over sets aside.
    pub layout: crate::mailconfig::layout::Layout,
    /// Largest share (percent) of the LUN's messages, or of a mailbox's, one pass may delete unconfirmed.
    pub max_deletion_percent: u32,
}

impl ReplicationConfig {
    /// The LUN's own active (its Service): the source without an override.
    pub fn lun_source(&self) -> String {
        format!("{}:{}", self.source_host, self.source_port)
    }

    /// The source the annotations file asks for: the override when set, else the LUN host; `Err` when the
    /// override is malformed. A missing file, or an empty value, is no override.
    fn wanted_source(&self) -> Result<String, String> {
        let text = std::fs::read_to_string(&self.annotations_file).unwrap_or_default();
        match downward_api_value(&text, annotations::REPLICATION_SOURCE) {
            Some(v) if !v.trim().is_empty() => parse_source(&v),
            _ => Ok(self.lun_source()),
        }
    }

    /// How doveadm reaches `source`: the LUN's own active over the plain in-site listener; any other
    /// (the `mailpod.io/replication-source` of a standby site) only over TLS, verified against the site
    /// replication CA. Without that CA nothing is pulled across sites: the mail and the doveadm password
    /// would cross in clear.
    pub fn remote(&self, source: &str) -> Result<mirror::Remote> {
        if source == self.lun_source() {
            return Ok(mirror::Remote {
                addr: source.to_string(),
                ca_file: None,
            });
        }
        let Some(ca) = self.layout.site_ca_file() else {
            bail!(
                "not pulling from {source} across sites in clear: no site replication certificate \
                 (spec.backend.siteReplication.tls, --site-tls-dir)"
            );
        };
        if !ca.exists() {
            bail!(
                "not pulling from {source} across sites: {} is not mounted yet \
                 (spec.backend.siteReplication.tls names a Secret with ca.crt)",
                ca.display()
            );
        }
        Ok(mirror::Remote {
            addr: source.to_string(),
            ca_file: Some(ca),
        })
    }

    /// The refused pass a person confirmed, from the annotations file.
    fn confirmation(&self) -> Option<String> {
        let text = std::fs::read_to_string(&self.annotations_file).unwrap_or_default();
        downward_api_value(&text, annotations::CONFIRM_REPLICATION_DELETION)
    }

    /// Index of this LUN in the access tables (`<mailpod>-lun-<index>`, see `names::lun`).
    fn lun_index(&self) -> Result<u32> {
        self.lun
            .strip_prefix(&format!("{}-lun-", self.mailpod))
            .and_then(|i| i.parse().ok())
            .filter(|i| crate::names::lun(&self.mailpod, *i) == self.lun)
            .with_context(|| {
                format!(
                    "LUN name {:?} is not a LUN of MailPod {:?} (<mailpod>-lun-<index>)",
                    self.lun, self.mailpod
                )
            })
    }

    /// The mailboxes the access tables place on this LUN.
    fn mailboxes(&self) -> Result<LunMailboxes> {
        let index = self.lun_index()?;
        let tables = AccessTables::from_data(&read_configmap_dir(&self.tables_dir)?)?;
        Ok(tables.lun(index))
    }
}

/// What `GET /replication` answers; the operator reads it to pick the most current standby for promotion
/// and to clear `needsResync`.
#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ReplicationReport {
    pub role: ReplicaRole,
    /// `host:port` pulled from (standby only).
    pub source: Option<String>,
    /// Start of the last pass that completed for every mailbox: the standby holds all mail the active
    /// had at that moment.
    pub last_sync_unix_seconds: Option<f64>,
    pub lag_seconds: Option<f64>,
    /// Standby: a full pass completed since it became standby, the last pass succeeded and the lag is
    /// within a few intervals. Active: always true.
    pub in_sync: bool,
    pub last_error: Option<String>,
    /// Whether this replica takes writes (LMTP, logins) as enforced now: only the active, once enforced.
    pub accepts_writes: bool,
    /// The last pass was refused: it would have deleted too much (see agent::replication_guard).
    pub deletion_refused: Option<Refusal>,
}

#[derive(Debug)]
struct State {
    role: ReplicaRole,
    last_success: Option<SystemTime>,
    /// A full pass has completed since this replica last became standby.
    caught_up: bool,
    last_error: Option<String>,
    /// `host:port` passes pull from (or hand over to).
    source: String,
    /// The replication-source annotation is malformed (the previous source is kept).
    source_error: Option<String>,
    deletion_refused: Option<Refusal>,
}

pub struct Replication {
    pub config: ReplicationConfig,
    state: Mutex<State>,
    metrics: ReplicationMetrics,
    /// The store's LMTP gate, granted writes only while this replica is active (agent::role).
    gate: Option<Arc<Gate>>,
    /// Whether writes are currently allowed as enforced (`None`: not yet enforced).
    enforced: Mutex<Option<bool>>,
    /// One enforcement at a time (the run loop's and a pushed role's), each of the latest observed role.
    enforcing: tokio::sync::Mutex<()>,
    /// A role the operator pushed, standing in for the labels file until that file changes.
    pushed: Mutex<Option<Pushed>>,
    guard: Mutex<Guard>,
}

/// A pushed role, with what the labels file said when it came: the file changing (the kubelet's copy of
/// the label the operator moved, or a newer decision) ends it.
#[derive(Clone, Copy, Debug)]
struct Pushed {
    role: ReplicaRole,
    label: ReplicaRole,
    at: std::time::Instant,
}

impl Replication {
    pub fn new(config: ReplicationConfig, metrics: ReplicationMetrics) -> Self {
        Self {
            state: Mutex::new(State {
                role: ReplicaRole::Unassigned,
                last_success: None,
                caught_up: false,
                last_error: None,
                source: config.lun_source(),
                source_error: None,
                deletion_refused: None,
            }),
            config,
            metrics,
            gate: None,
            enforced: Mutex::new(None),
            enforcing: tokio::sync::Mutex::new(()),
            pushed: Mutex::new(None),
            guard: Mutex::default(),
        }
    }

    /// Enforces the role on `gate` too (see agent::role).
    pub fn with_gate(mut self, gate: Arc<Gate>) -> Self {
        self.gate = Some(gate);
        self
    }

    /// Makes what this replica allows match `role`: writes (LMTP, logins) only while active. On leaving
    /// active, LMTP is refused first, then logins, then every session is kicked. A step that fails is
    /// tried again on the next look at the role.
    async fn enforce(&self) {
        let _one = self.enforcing.lock().await;
        // The latest observed role, not one read before waiting for the lock: a push that came meanwhile wins.
        let role = self.state.lock().expect("replication state").role;
        let active = role == ReplicaRole::Active;
        if *self.enforced.lock().expect("replication state") == Some(active) {
            return;
        }
        if !active {
            if let Some(g) = &self.gate {
                g.set_granted(false);
            }
        }
        let result = async {
            super::role::set_logins(&self.config.layout, active)?;
            if !active {
                super::role::kick_all_sessions(&self.config.dovecot_conf).await?;
            }
            anyhow::Ok(())
        }
        .await;
        match result {
            Ok(()) => {
                if active {
                    if let Some(g) = &self.gate {
                        g.set_granted(true);
                    }
                }
                tracing::info!(?role, writes = active, "role enforced");
                *self.enforced.lock().expect("replication state") = Some(active);
            }
            Err(e) => tracing::warn!(?role, "enforcing the role: {e:#}"),
        }
    }

    pub fn report(&self) -> ReplicationReport {
        let s = self.state.lock().expect("replication state");
        let now = SystemTime::now();
        let last = s
            .last_success
            .map(|t| t.duration_since(UNIX_EPOCH).unwrap_or_default());
        let lag = s
            .last_success
            .map(|t| now.duration_since(t).unwrap_or_default());
        let in_sync = match s.role {
            ReplicaRole::Active => true,
            ReplicaRole::Standby => {
                s.caught_up
                    && s.last_error.is_none()
                    && lag.is_some_and(|l| l <= self.config.interval * IN_SYNC_INTERVALS)
            }
            ReplicaRole::Unassigned => false,
        };
        let accepts_writes = *self.enforced.lock().expect("replication state") == Some(true);
        let report = ReplicationReport {
            accepts_writes,
            role: s.role,
            source: (s.role == ReplicaRole::Standby).then(|| s.source.clone()),
            last_sync_unix_seconds: last.map(|d| d.as_secs_f64()),
            lag_seconds: match s.role {
                ReplicaRole::Active => Some(0.0),
                _ => lag.map(|d| d.as_secs_f64()),
            },
            in_sync,
            last_error: match (&s.source_error, &s.last_error) {
                (Some(a), Some(b)) => Some(format!("{a}; {b}")),
                (a, b) => a.clone().or_else(|| b.clone()),
            },
            deletion_refused: s.deletion_refused.clone(),
        };
        self.metrics.in_sync.set(i64::from(in_sync));
        self.metrics
            .deletion_refused
            .set(i64::from(s.deletion_refused.is_some()));
        self.metrics
            .active
            .set(i64::from(s.role == ReplicaRole::Active));
        if let Some(lag) = report.lag_seconds {
            self.metrics.lag_seconds.set(lag);
        }
        report
    }

    /// Runs for the life of the agent.
    pub async fn run(&self) {
        let mut next_pass = tokio::time::Instant::now();
        loop {
            let role = self.observe_role();
            self.enforce().await;
            if self.observe_source() {
                next_pass = tokio::time::Instant::now();
            }
            if role == ReplicaRole::Standby && tokio::time::Instant::now() >= next_pass {
                let started = SystemTime::now();
                let hand_over = self.last_role_on_disk() == Some(ReplicaRole::Active);
                let source = self.current_source();
                let outcome = tokio::select! {
                    r = tokio::time::timeout(MAX_PASS, self.pass(hand_over, &source)) => {
                        r.unwrap_or_else(|_| Err(anyhow::anyhow!("pass took longer than {MAX_PASS:?}")))
                    }
                    () = self.role_leaves(ReplicaRole::Standby) => {
                        tracing::info!("role changed during a replication pass; pass abandoned");
                        continue;
                    }
                    () = self.source_leaves(&source) => {
                        tracing::info!(from = %source, "replication source changed during a pass; pass abandoned");
                        continue;
                    }
                };
                self.record(started, hand_over, outcome);
                next_pass = tokio::time::Instant::now() + self.config.interval;
            }
            tokio::time::sleep(ROLE_POLL).await;
        }
    }

    /// The role the operator asks for now: a pushed one while the labels file says what it said when the
    /// push came (and for at most [`PUSH_HOLD`]), else the labels file's.
    fn wanted_role(&self) -> ReplicaRole {
        let label = ReplicaRole::read(&self.config.labels_file);
        let mut pushed = self.pushed.lock().expect("pushed role");
        match *pushed {
            Some(p) if p.label == label && p.at.elapsed() < PUSH_HOLD => p.role,
            Some(_) => {
                *pushed = None;
                label
            }
            None => label,
        }
    }

    /// Takes `role` from the operator at once, ahead of the kubelet's copy of the label, and enforces it;
    /// returns whether this replica takes writes now. A demotion is enforced (LMTP refused, logins denied,
    /// sessions kicked) before this returns, so the operator may then let another replica take writes.
    pub async fn push_role(&self, role: ReplicaRole) -> bool {
        let label = ReplicaRole::read(&self.config.labels_file);
        *self.pushed.lock().expect("pushed role") = (role != label).then(|| Pushed {
            role,
            label,
            at: std::time::Instant::now(),
        });
        tracing::info!(?role, ?label, "role pushed by the operator");
        self.observe_role();
        self.enforce().await;
        *self.enforced.lock().expect("replication state") == Some(true)
    }

    /// Reads the role (see [`Self::wanted_role`]) and records a change.
    fn observe_role(&self) -> ReplicaRole {
        let role = self.wanted_role();
        let mut s = self.state.lock().expect("replication state");
        if s.role != role {
            tracing::info!(from = ?s.role, to = ?role, source = %s.source, "replica role changed");
            if role == ReplicaRole::Standby {
                s.caught_up = false;
            }
            s.last_error = None;
            s.deletion_refused = None;
            *self.guard.lock().expect("replication guard") = Guard::default();
            s.role = role;
        }
        drop(s);
        if role == ReplicaRole::Active {
            self.remember_role(ReplicaRole::Active);
        }
        role
    }

    fn current_source(&self) -> String {
        self.state.lock().expect("replication state").source.clone()
    }

    /// Reads the annotations file and records a change of source; true when the source changed. A
    /// malformed override is refused and the previous source kept.
    fn observe_source(&self) -> bool {
        let wanted = self.config.wanted_source();
        let mut s = self.state.lock().expect("replication state");
        match wanted {
            Ok(source) => {
                s.source_error = None;
                if source == s.source {
                    return false;
                }
                tracing::info!(from = %s.source, to = %source, lun = %self.config.lun_source(), "replication source changed");
                s.source = source;
                // A new source needs a complete pass before this replica is in sync with it.
                s.caught_up = false;
                s.last_error = None;
                s.deletion_refused = None;
                *self.guard.lock().expect("replication guard") = Guard::default();
                true
            }
            Err(e) => {
                if s.source_error.as_ref() != Some(&e) {
                    tracing::error!(keeping = %s.source, "{e}");
                    s.source_error = Some(e);
                }
                false
            }
        }
    }

    /// Returns once the wanted source is valid and differs from `source`.
    async fn source_leaves(&self, source: &str) {
        loop {
            tokio::time::sleep(ROLE_POLL).await;
            if self.config.wanted_source().is_ok_and(|w| w != source) {
                return;
            }
        }
    }

    async fn role_leaves(&self, role: ReplicaRole) {
        loop {
            tokio::time::sleep(ROLE_POLL).await;
            if self.wanted_role() != role {
                return;
            }
        }
    }

    fn record(&self, started: SystemTime, handed_over: bool, outcome: Result<usize>) {
        let mut s = self.state.lock().expect("replication state");
        match outcome {
            Ok(users) => {
                tracing::debug!(users, handed_over, "replication pass done");
                if handed_over {
                    drop(s);
                    self.remember_role(ReplicaRole::Standby);
                    s = self.state.lock().expect("replication state");
                }
                s.last_success = Some(started);
                s.caught_up = true;
                s.last_error = None;
                s.deletion_refused = None;
                self.metrics.passes.inc();
                self.metrics.last_success.set(
                    started
                        .duration_since(UNIX_EPOCH)
                        .unwrap_or_default()
                        .as_secs_f64(),
                );
            }
            Err(e) => {
                if let Some(Refused(r)) = e.downcast_ref::<Refused>() {
                    if s.deletion_refused.as_ref().map(|d| &d.id) != Some(&r.id) {
                        tracing::error!(id = %r.id, deleted = r.deleted_messages, held = r.held_messages, "{}", r.message());
                    }
                    s.deletion_refused = Some(r.clone());
                    self.metrics.deletion_refused.set(1);
                    self.metrics
                        .refused_deletion_messages
                        .set(r.deleted_messages as i64);
                    self.metrics.refused_passes.inc();
                } else {
                    tracing::warn!(source = %s.source, "replication pass failed: {e:#}");
                    self.metrics.failures.inc();
                }
                s.last_error = Some(format!("{e:#}"));
            }
        }
    }

    fn last_role_on_disk(&self) -> Option<ReplicaRole> {
        match std::fs::read_to_string(&self.config.role_file).ok()?.trim() {
            l::ROLE_ACTIVE => Some(ReplicaRole::Active),
            l::ROLE_STANDBY => Some(ReplicaRole::Standby),
            _ => None,
        }
    }

    fn remember_role(&self, role: ReplicaRole) {
        if self.last_role_on_disk() == Some(role) {
            return;
        }
        let text = match role {
            ReplicaRole::Active => l::ROLE_ACTIVE,
            _ => l::ROLE_STANDBY,
        };
        let path = &self.config.role_file;
        let result = path
            .parent()
            .map(std::fs::create_dir_all)
            .transpose()
            .and_then(|_| std::fs::write(path, format!("{text}\n")));
        if let Err(e) = result {
            tracing::warn!(path = %path.display(), "recording the replica role: {e}");
        }
    }

    /// One pass over every mailbox of the LUN; returns how many there were. A hand-over repeats until a
    /// pass copies nothing.
    async fn pass(&self, hand_over: bool, source: &str) -> Result<usize> {
        let c = &self.config;
        let lun = c.mailboxes()?;
        let users = &lun.users;
        if users.is_empty() {
            return Ok(0);
        }
        let source = &c.remote(source)?;
        if !hand_over {
            let confirmed = self.mirror(&lun, source).await?;
            self.guard
                .lock()
                .expect("replication guard")
                .passed(confirmed);
            self.remove_set_aside(&lun);
            return Ok(users.len());
        }
        tracing::info!(
            users = users.len(),
            "after demotion: handing mail only this replica has to the new active"
        );
        for n in 1..=MAX_HAND_OVER_PASSES {
            let copied = self.hand_over_once(&lun, source).await?;
            tracing::info!(pass = n, copied, "hand-over pass");
            if copied == 0 {
                self.set_aside(&lun)?;
                return Ok(users.len());
            }
        }
        bail!("still copying after {MAX_HAND_OVER_PASSES} hand-over passes; not mirroring yet")
    }

    /// One mirror pass under the deletion guard (see agent::replication_mirror); true when a person's
    /// confirmation let deletions beyond the limit through. Only mailboxes that have a Maildir here are
    /// asked about locally: nothing else can lose mail, and asking doveadm would create them.
    async fn mirror(&self, lun: &LunMailboxes, source: &mirror::Remote) -> Result<bool> {
        let c = &self.config;
        let users = &lun.users;
        let present: Vec<String> = users
            .iter()
            .filter(|u| self.maildirs(lun, u).is_some_and(|(m, _)| m.exists()))
            .cloned()
            .collect();
        let held = if present.is_empty() {
            guard::Mailboxes::new()
        } else {
            std::fs::write(&c.users_list, present.join("\n") + "\n")
                .with_context(|| format!("writing {}", c.users_list.display()))?;
            mirror::held(&c.dovecot_conf, &c.users_list).await?
        };
        let reference = self.guard.lock().expect("replication guard").reference(
            &held,
            users,
            &lun.incarnations,
            std::time::Instant::now(),
        );
        let pass = mirror::MirrorPass {
            conf: &c.dovecot_conf,
            source,
            users,
            reference,
            max_percent: c.max_deletion_percent,
            confirmation: c.confirmation(),
        };
        let confirmed = mirror::mirror(pass, &self.guard).await?;
        if confirmed {
            tracing::warn!(%source, "a person confirmed this pass: the source's deletions were mirrored");
        }
        Ok(confirmed)
    }

    /// One hand-over pass: copies to `source` (the new active) every message of the LUN's mailboxes that
    /// this replica holds more often than it, compared over the whole mailbox by header block and size
    /// (as a restore does, see restore::import; a message the new active holds in another folder is
    /// there), with its received date and flags; returns how many it copied. Unlike `doveadm sync -1`, a repeated pass
    /// never copies a message twice, so a pass interrupted by mail arriving on the new active (dsync's
    /// "Mailbox changes caused a desync") can simply run again.
    async fn hand_over_once(&self, lun: &LunMailboxes, source: &mirror::Remote) -> Result<usize> {
        let doveadm = crate::restore::doveadm::Doveadm {
            config: self.config.dovecot_conf.clone(),
            options: source.options(),
        };
        let live = crate::restore::doveadm::Side::Live(source.addr.clone());
        let layout = &self.config.layout;
        let origin = crate::restore::staging::Origin {
            mail_root: layout.mail_root.clone(),
            // Off the mail volume: nothing of it belongs to a mailbox, and it goes after each folder.
            scratch: layout.dovecot_state.join("hand-over"),
            mail_uid: layout.mail_uid,
            mail_gid: layout.mail_gid,
            incarnations: lun.incarnations.clone(),
        };
        let users = lun.users.clone();
        tokio::task::spawn_blocking(move || {
            let mut copied = 0;
            for user in &users {
                let done = crate::restore::import::restore_mailbox(
                    &doveadm, &origin, &live, user, None, None,
                )
                .with_context(|| format!("handing over mailbox {user}"))?;
                copied += done.folders.iter().map(|f| f.restored).sum::<usize>();
            }
            anyhow::Ok(copied)
        })
        .await
        .context("hand-over task")?
    }

    /// A user's Maildir on this replica (in its incarnation, as the userdb says), and where a hand-over
    /// sets it aside.
    fn maildirs(&self, lun: &LunMailboxes, user: &str) -> Option<(PathBuf, PathBuf)> {
        let home = crate::mailconfig::layout::home(
            &self.config.layout.mail_root,
            user,
            lun.incarnation(user),
        )?;
        Some((home.join("Maildir"), home.join("Maildir.handed-over")))
    }

    /// After a complete hand-over every message here is also on the new active, but under other UIDs;
    /// `backup -R` cannot repair such a copy (it would delete INBOX, which it cannot). So the handed-over
    /// Maildirs are set aside and the first mirror pass rebuilds them from the active.
    fn set_aside(&self, lun: &LunMailboxes) -> Result<()> {
        for user in &lun.users {
            let Some((maildir, aside)) = self.maildirs(lun, user) else {
                continue;
            };
            if !maildir.exists() {
                continue;
            }
            let _ = std::fs::remove_dir_all(&aside);
            std::fs::rename(&maildir, &aside)
                .with_context(|| format!("setting aside {}", maildir.display()))?;
        }
        Ok(())
    }

    /// Once a mirror pass has rebuilt them, the set-aside Maildirs go.
    fn remove_set_aside(&self, lun: &LunMailboxes) {
        for user in &lun.users {
            if let Some((_, aside)) = self.maildirs(lun, user) {
                if aside.exists() {
                    if let Err(e) = std::fs::remove_dir_all(&aside) {
                        tracing::warn!(path = %aside.display(), "removing a handed-over Maildir: {e}");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_from_downward_api_labels() {
        let text = "app.kubernetes.io/name=\"mailpod\"\nmailpod.io/lun=\"corp-lun-0\"\nmailpod.io/role=\"standby\"\n";
        assert_eq!(ReplicaRole::from_labels(text), ReplicaRole::Standby);
        assert_eq!(
            ReplicaRole::from_labels("mailpod.io/role=\"active\""),
            ReplicaRole::Active
        );
        assert_eq!(
            ReplicaRole::from_labels("mailpod.io/lun=\"corp-lun-0\"\n"),
            ReplicaRole::Unassigned
        );
        assert_eq!(
            ReplicaRole::from_labels("mailpod.io/role=\"leader\"\n"),
            ReplicaRole::Unassigned
        );
    }

    fn config(dir: &Path, lun: &str) -> ReplicationConfig {
        ReplicationConfig {
            labels_file: dir.join("labels"),
            annotations_file: dir.join("annotations"),
            lun: lun.into(),
            mailpod: "corp".into(),
            source_host: "corp-lun-0".into(),
            source_port: 12345,
            interval: Duration::from_secs(5),
            tables_dir: dir.join("tables"),
            dovecot_conf: dir.join("dovecot.conf"),
            users_list: dir.join("users"),
            role_file: dir.join("role"),
            layout: crate::mailconfig::layout::Layout::under(dir),
            max_deletion_percent: 50,
        }
    }

    #[test]
    fn mailboxes_of_this_lun_only() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("tables")).unwrap();
        std::fs::write(
            dir.path().join("tables/mailboxes"),
            "a@example.com 0\nb@example.com 1\nc@example.com 1\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("tables/incarnations"),
            "a@example.com 4\nc@example.com 2\n",
        )
        .unwrap();
        let c = config(dir.path(), "corp-lun-1");
        let lun = c.mailboxes().unwrap();
        assert_eq!(lun.users, ["b@example.com", "c@example.com"]);
        assert_eq!(
            lun.incarnations,
            std::collections::BTreeMap::from([("c@example.com".to_string(), 2)]),
            "the incarnations of this LUN's mailboxes"
        );
        assert_eq!(
            (
                lun.incarnation("b@example.com"),
                lun.incarnation("c@example.com")
            ),
            (0, 2)
        );
        let bad = config(dir.path(), "other-lun-1");
        assert!(format!("{:#}", bad.mailboxes().unwrap_err()).contains("not a LUN of MailPod"));
        assert!(config(dir.path(), "corp-lun-01").lun_index().is_err());
    }

    #[tokio::test]
    async fn a_pushed_role_stands_until_the_labels_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let r = Replication::new(config(dir.path(), "corp-lun-0"), Default::default());
        let labels = dir.path().join("labels");
        std::fs::write(&labels, "mailpod.io/role=\"standby\"\n").unwrap();
        assert_eq!(r.observe_role(), ReplicaRole::Standby);
        // The operator promotes before the kubelet has rewritten the labels file.
        r.push_role(ReplicaRole::Active).await;
        assert_eq!(r.report().role, ReplicaRole::Active);
        assert_eq!(
            r.observe_role(),
            ReplicaRole::Active,
            "the run loop keeps it"
        );
        // The kubelet's copy catches up: the label is the role again.
        std::fs::write(&labels, "mailpod.io/role=\"active\"\n").unwrap();
        assert_eq!(r.observe_role(), ReplicaRole::Active);
        assert!(r.pushed.lock().unwrap().is_none());
        // A push whose label then moves elsewhere ends with that move: a newer decision wins.
        r.push_role(ReplicaRole::Standby).await;
        assert_eq!(r.observe_role(), ReplicaRole::Standby);
        std::fs::write(&labels, "mailpod.io/role=\"unknown\"\n").unwrap();
        assert_eq!(r.observe_role(), ReplicaRole::Unassigned);
        // A push never outlives PUSH_HOLD while the file stays as it was.
        std::fs::write(&labels, "mailpod.io/role=\"standby\"\n").unwrap();
        r.push_role(ReplicaRole::Active).await;
        assert_eq!(r.observe_role(), ReplicaRole::Active);
        r.pushed.lock().unwrap().as_mut().unwrap().at -= PUSH_HOLD;
        assert_eq!(r.observe_role(), ReplicaRole::Standby);
    }

    #[test]
    fn report_before_any_pass_and_on_active() {
        let dir = tempfile::tempdir().unwrap();
        let r = Replication::new(config(dir.path(), "corp-lun-0"), Default::default());
        std::fs::write(dir.path().join("labels"), "mailpod.io/role=\"standby\"\n").unwrap();
        assert_eq!(r.observe_role(), ReplicaRole::Standby);
        let rep = r.report();
        assert_eq!(rep.source.as_deref(), Some("corp-lun-0:12345"));
        assert!(!rep.in_sync);
        assert_eq!(rep.lag_seconds, None);
        r.record(SystemTime::now(), false, Ok(3));
        assert!(r.report().in_sync);
        r.record(SystemTime::now(), false, Err(anyhow::anyhow!("refused")));
        let rep = r.report();
        assert!(!rep.in_sync);
        assert_eq!(rep.last_error.as_deref(), Some("refused"));

        std::fs::write(dir.path().join("labels"), "mailpod.io/role=\"active\"\n").unwrap();
        assert_eq!(r.observe_role(), ReplicaRole::Active);
        let rep = r.report();
        assert!(rep.in_sync && rep.source.is_none() && rep.last_error.is_none());
        assert_eq!(r.last_role_on_disk(), Some(ReplicaRole::Active));
        // Demoted: not in sync until a full pass completes; the hand-over pass clears the demotion mark.
        std::fs::write(dir.path().join("labels"), "mailpod.io/role=\"standby\"\n").unwrap();
        r.observe_role();
        assert!(!r.report().in_sync);
        r.record(SystemTime::now(), true, Ok(1));
        assert!(r.report().in_sync);
        assert_eq!(r.last_role_on_disk(), Some(ReplicaRole::Standby));
    }

    #[test]
    fn replication_source_annotation() {
        let text = "kubectl.kubernetes.io/restartedAt=\"2026-01-01T00:00:00Z\"\nmailpod.io/replication-source=\"mail.site-b.example:12345\"\n";
        assert_eq!(
            downward_api_value(text, annotations::REPLICATION_SOURCE).as_deref(),
            Some("mail.site-b.example:12345")
        );
        assert_eq!(
            downward_api_value("a=\"x \\\"y\\\" \\\\ z\\n\"\n", "a").as_deref(),
            Some("x \"y\" \\ z\n")
        );
        assert_eq!(downward_api_value("a=\"x\"\n", "b"), None);
        assert_eq!(parse_source(" 10.0.0.7:12345 ").unwrap(), "10.0.0.7:12345");
        assert_eq!(parse_source("[fd00::7]:12345").unwrap(), "[fd00::7]:12345");
        for bad in [
            "host",
            "host:",
            ":12345",
            "host:port",
            "host:0",
            "host:70000",
            "host:+12",
            "fd00::7:12345",
            "a b:1",
        ] {
            let e = parse_source(bad).unwrap_err();
            assert!(e.contains("mailpod.io/replication-source"), "{bad}: {e}");
        }
    }

    #[test]
    fn only_the_luns_own_active_is_pulled_from_in_clear() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config(dir.path(), "corp-lun-0");
        let own = c.remote(&c.lun_source()).unwrap();
        assert_eq!(own.ca_file, None);
        // Across sites with no certificate: refused, naming the field.
        let e = c.remote("198.51.100.9:12346").unwrap_err().to_string();
        assert!(e.contains("spec.backend.siteReplication.tls"), "{e}");
        // The certificate's directory named but ca.crt not there yet: refused too.
        let tls = dir.path().join("site-tls");
        c.layout.site_tls_dir = Some(tls.clone());
        let e = c.remote("198.51.100.9:12346").unwrap_err().to_string();
        assert!(e.contains("ca.crt"), "{e}");
        std::fs::create_dir(&tls).unwrap();
        std::fs::write(tls.join("ca.crt"), "-----BEGIN CERTIFICATE-----\n").unwrap();
        let r = c.remote("198.51.100.9:12346").unwrap();
        assert_eq!(r.ca_file, Some(tls.join("ca.crt")));
        assert_eq!(r.dsync_target(), "tcps:198.51.100.9:12346");
    }

    #[test]
    fn source_override_switches_and_resets_in_sync() {
        let dir = tempfile::tempdir().unwrap();
        let annotations = dir.path().join("annotations");
        let r = Replication::new(config(dir.path(), "corp-lun-0"), Default::default());
        std::fs::write(dir.path().join("labels"), "mailpod.io/role=\"standby\"\n").unwrap();
        r.observe_role();
        // No annotations file: the LUN host.
        assert!(!r.observe_source());
        r.record(SystemTime::now(), false, Ok(1));
        assert!(r.report().in_sync);

        std::fs::write(
            &annotations,
            "mailpod.io/replication-source=\"site-a.example:2000\"\n",
        )
        .unwrap();
        assert!(r.observe_source());
        let rep = r.report();
        assert_eq!(rep.source.as_deref(), Some("site-a.example:2000"));
        assert!(!rep.in_sync, "a new source needs a complete pass");
        r.record(SystemTime::now(), false, Ok(1));
        assert!(r.report().in_sync);
        assert!(!r.observe_source(), "unchanged");

        // Malformed: refused, the previous source kept, the error reported.
        std::fs::write(
            &annotations,
            "mailpod.io/replication-source=\"site-b.example\"\n",
        )
        .unwrap();
        assert!(!r.observe_source());
        let rep = r.report();
        assert_eq!(rep.source.as_deref(), Some("site-a.example:2000"));
        assert!(rep.last_error.unwrap().contains("refused"));

        // Removed: back to the LUN host, not in sync until a pass completes.
        std::fs::write(&annotations, "other=\"x\"\n").unwrap();
        assert!(r.observe_source());
        let rep = r.report();
        assert_eq!(rep.source.as_deref(), Some("corp-lun-0:12345"));
        assert!(!rep.in_sync && rep.last_error.is_none());
    }
}
