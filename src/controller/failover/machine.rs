//! The site-failover state machine: pure, no I/O. One call per reconcile of a site's `SiteFailover`:
//! (spec, stored status, what was observed) -> (status to record *before* acting, actions, status to record
//! once every required action succeeded). Because progress is recorded first and every action is
//! idempotent, a controller restarted at any point re-derives the same actions from the stored status and
//! finishes what was started.
//!
//! Roles: the *active* site is `status.activeSite` at `status.epoch`; the other is the *standby*. Only the
//! standby acts on loss; the active site never promotes. Any site that sees a higher epoch on its peer
//! adopts it (and with it the peer's idea of who is active), so a returning old primary fences itself.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use sha2::{Digest, Sha256};

use failback::{failback_step, start_failback, swap_actions};

use super::witness::WitnessView;
use crate::crd::{
    set_condition, FailoverPhase, FailoverRecord, SiteFailoverSpec, SiteFailoverStatus,
    WitnessStatus,
};

/// Condition types on a SiteFailover.
pub mod condition {
    pub const PEER_REACHABLE: &str = "PeerReachable";
    pub const ACCESS_TABLES_IN_SYNC: &str = "AccessTablesInSync";
    pub const WITHIN_RPO: &str = "WithinRPO";
    pub const QUORUM: &str = "Quorum";
}

/// The peer's SiteFailover status as read through its API.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PeerView {
    pub epoch: i64,
    pub active_site: Option<String>,
    /// Failed probes the peer has recorded of this site's front ends (a standby about to promote).
    pub probe_failures: u32,
}

/// Access-table hashes of one covered MailPod on both sites (`None`: not reported yet or not readable).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableHashes {
    pub mail_pod: String,
    pub local: Option<String>,
    pub peer: Option<String>,
}

/// Fencing of this site's StorageLUNs as read from the cluster.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LocalFencing {
    pub any_fenced: bool,
    pub any_unfenced: bool,
}

/// What the controller saw this tick.
#[derive(Clone, Debug)]
pub struct Observation {
    pub now: Timestamp,
    /// `None` when the peer's API did not answer within the probe timeout.
    pub peer: Option<PeerView>,
    /// When the peer was read (a clock reading taken before the read): its agreement counts from then.
    pub peer_read_at: Timestamp,
    /// Front-end protocol check of the peer; `None` when no probe was due this tick.
    pub frontend_ok: Option<bool>,
    pub tables: Vec<TableHashes>,
    /// Seconds the standby's stores are behind the active site's.
    pub replication_lag_seconds: Option<f64>,
    /// `mailpod.io/failback=requested` on either site's SiteFailover.
    pub failback_requested: bool,
    /// `mailpod.io/failover=requested` on this site's SiteFailover (`kubectl mailpod promote`).
    pub failover_requested: bool,
    pub local_fencing: LocalFencing,
    /// The witness Lease (`None`: no `spec.witness`).
    pub witness: Option<WitnessView>,
}

/// One idempotent step for the controller to carry out.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Give this site's MailPods the peer's (the active site's) spec and LUN placement.
    MirrorFromPeer,
    /// Set `spec.fenced` on every StorageLUN of the covered MailPods on this site.
    FenceLocal(bool),
    /// Record `epoch` and `active_site` in the peer's SiteFailover status.
    TellPeer { epoch: i64, active_site: String },
    /// Set `spec.fenced` on the peer's StorageLUNs.
    FencePeer(bool),
    /// Point the DNS names at this site (DNSEndpoint objects here).
    PublishDns,
    /// Remove this site's DNSEndpoint objects.
    WithdrawDns,
    /// Remove the peer's DNSEndpoint objects.
    WithdrawPeerDns,
    /// Remove the failback request annotation (here and on the peer).
    ClearFailbackRequest,
    /// Remove the failover request annotation here.
    ClearFailoverRequest,
}

impl Action {
    /// Steps that reach the peer during a failover are best effort: the peer is presumed lost, and when it
    /// returns it learns the epoch by reading ours.
    pub fn best_effort(&self, phase: FailoverPhase) -> bool {
        phase == FailoverPhase::FailingOver
            && matches!(
                self,
                Action::TellPeer { .. } | Action::FencePeer(_) | Action::WithdrawPeerDns
            )
            || matches!(
                self,
                Action::ClearFailbackRequest | Action::ClearFailoverRequest
            )
    }
}

/// Something worth an Event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    pub warning: bool,
    pub reason: &'static str,
    pub message: String,
}

/// The outcome of one tick.
#[derive(Clone, Debug)]
pub struct Decision {
    /// Recorded before any action.
    pub status: SiteFailoverStatus,
    pub actions: Vec<Action>,
    /// Recorded once every non-best-effort action succeeded (`None`: nothing to finish).
    pub after: Option<SiteFailoverStatus>,
    pub notes: Vec<Note>,
    pub requeue: Duration,
    /// A promotion is due but needs the witness Lease first: take it for this epoch and decide again.
    pub acquire_witness: Option<i64>,
}

pub const KIND_FAILOVER: &str = "failover";
pub const KIND_FAILBACK: &str = "failback";
/// How soon to look again while a failover or failback is in progress.
pub const IN_PROGRESS_REQUEUE: Duration = Duration::from_secs(1);

fn rfc3339(t: Timestamp) -> MicroTime {
    MicroTime(t)
}

fn parse(t: &Option<MicroTime>) -> Option<Timestamp> {
    t.as_ref().map(|m| m.0)
}

fn seconds_between(from: Timestamp, to: Timestamp) -> f64 {
    to.duration_since(from).as_secs_f64()
}

/// Whether a probe is due: at most one counted probe per interval, whatever triggered the reconcile.
pub fn probe_due(spec: &SiteFailoverSpec, last_probe: Option<Timestamp>, now: Timestamp) -> bool {
    last_probe.is_none_or(|last| {
        seconds_between(last, now) >= f64::from(spec.detection.probe_interval_seconds)
    })
}

/// Combined hash of several MailPods' table hashes (one MailPod: its hash as is).
fn combined(hashes: &[(String, Option<String>)]) -> Option<String> {
    if hashes.iter().any(|(_, h)| h.is_none()) || hashes.is_empty() {
        return None;
    }
    if let [(_, h)] = hashes {
        return h.clone();
    }
    let mut sha = Sha256::new();
    for (mp, h) in hashes {
        sha.update(format!("{mp}={}\n", h.as_deref().unwrap_or_default()));
    }
    Some(hex::encode(&sha.finalize()[..8]))
}

/// The phase of a site with no failover or failback in progress.
fn steady_phase(spec: &SiteFailoverSpec, st: &SiteFailoverStatus) -> FailoverPhase {
    if st.active_site.as_deref() != Some(spec.primary_site.as_str()) {
        FailoverPhase::FailedOver
    } else if st.peer_reachable != Some(true) || st.consecutive_probe_failures > 0 {
        FailoverPhase::Degraded
    } else {
        FailoverPhase::Healthy
    }
}

/// Decides one tick. `status` is what is stored (default when new).
pub fn decide(spec: &SiteFailoverSpec, status: &SiteFailoverStatus, obs: &Observation) -> Decision {
    let me = spec.local_site.as_str();
    let peer = spec.peer.name.as_str();
    let now = obs.now;
    let mut st = status.clone();
    let mut notes = vec![];
    let mut actions = vec![];

    // A new pairing starts from the peer's view when it has one, else with the configured primary.
    if st.epoch == 0 {
        match &obs.peer {
            Some(p) if p.epoch > 0 && p.active_site.is_some() => {
                st.epoch = p.epoch;
                st.active_site = p.active_site.clone();
            }
            _ => {
                st.epoch = 1;
                st.active_site = Some(spec.primary_site.clone());
            }
        }
    }

    // Epoch rule: a higher epoch on the peer wins; so does the lower site name when two claims share one
    // epoch (only reachable by hand-edited status, but both sites must then agree).
    if let Some(p) = &obs.peer {
        let conflicting = p.epoch == st.epoch
            && p.active_site.is_some()
            && p.active_site != st.active_site
            && p.active_site.as_deref() < st.active_site.as_deref();
        if p.epoch > st.epoch || conflicting {
            let was_active = st.active_site.as_deref() == Some(me);
            st.epoch = p.epoch;
            st.active_site = p.active_site.clone();
            let now_active = st.active_site.as_deref() == Some(me);
            if matches!(
                st.phase,
                FailoverPhase::FailingOver | FailoverPhase::FailingBack
            ) {
                st.phase = FailoverPhase::Healthy; // re-derived below
            }
            if was_active && !now_active {
                notes.push(Note {
                    warning: true,
                    reason: "Fenced",
                    message: format!(
                        "site {peer} holds epoch {} and is active; fencing this site's stores",
                        p.epoch
                    ),
                });
            } else if now_active && !was_active {
                notes.push(Note {
                    warning: false,
                    reason: "HandedOver",
                    message: format!("site {peer} handed over at epoch {}; serving here", p.epoch),
                });
            }
        }
    }

    st.peer_reachable = Some(obs.peer.is_some());
    observe_tables(&mut st, obs);
    st.replication_lag_seconds = obs.replication_lag_seconds;
    let within_rpo = obs
        .replication_lag_seconds
        .is_some_and(|l| l <= f64::from(spec.targets.rpo_seconds));

    let active = st.active_site.as_deref() == Some(me);
    let quorum = if active {
        active_quorum(spec, &st, obs)
    } else {
        None
    };
    let mut after = None;
    let mut acquire_witness = None;
    let mut requeue = Duration::from_secs(u64::from(spec.detection.probe_interval_seconds));

    if active {
        // The active site does not probe to fail over; its view of the peer is API reachability.
        st.consecutive_probe_failures = 0;
        st.probe_failing_since = None;
        st.last_probe_time = None;
        match st.phase {
            FailoverPhase::FailingOver => {
                actions.extend(promotion_actions(me, st.epoch));
                if quorum == Some(false) {
                    // Resumed (after a restart, say) without the Lease or the peer's agreement: the other
                    // site may have moved on meanwhile. Tell and fence the peer if it answers, but do not
                    // serve here: fence what an earlier attempt may have unfenced.
                    actions
                        .retain(|a| !matches!(a, Action::FenceLocal(false) | Action::PublishDns));
                    if obs.local_fencing.any_unfenced {
                        actions.push(Action::FenceLocal(true));
                    }
                } else {
                    after = Some(finish(spec, &st, now));
                }
                requeue = IN_PROGRESS_REQUEUE;
            }
            FailoverPhase::FailingBack => {
                requeue = IN_PROGRESS_REQUEUE;
                failback_step(spec, &mut st, obs, &mut actions, &mut after, &mut notes);
            }
            _ if quorum == Some(false) => {
                // Cut off from the witness and the peer: the standby may soon hold the Lease, so this
                // site stops writing first. Mail waits in the mx queues (LMTP answers 4xx).
                st.phase = steady_phase(spec, &st);
                if obs.local_fencing.any_unfenced {
                    actions.push(Action::FenceLocal(true));
                }
                if status.witness.as_ref().is_none_or(|w| w.quorum) {
                    notes.push(Note {
                        warning: true,
                        reason: "QuorumLost",
                        message: quorum_lost_message(spec, &st, obs),
                    });
                }
            }
            _ => {
                st.phase = steady_phase(spec, &st);
                if obs.local_fencing.any_fenced {
                    actions.push(Action::FenceLocal(false));
                }
                actions.push(Action::PublishDns);
                // A reachable peer with an older epoch is a returned old primary: tell it and fence it.
                if let Some(p) = &obs.peer {
                    if p.epoch < st.epoch || p.active_site.as_deref() != Some(me) {
                        actions.push(Action::TellPeer {
                            epoch: st.epoch,
                            active_site: me.to_string(),
                        });
                        actions.push(Action::FencePeer(true));
                    }
                }
                let wants_failback = spec.primary_site == peer
                    && (obs.failback_requested || spec.policy.automatic_failback);
                // Resync first: the primary must follow this epoch, hold the same tables and be within
                // the RPO before delivery is paused for the switchover.
                let peer_follows = obs
                    .peer
                    .as_ref()
                    .is_some_and(|p| p.epoch == st.epoch && p.active_site.as_deref() == Some(me));
                let tables_ok = st.access_tables_in_sync == Some(true);
                if wants_failback && peer_follows && tables_ok && within_rpo {
                    start_failback(spec, &mut st, now, &mut notes);
                    requeue = IN_PROGRESS_REQUEUE;
                    // The DNS names stay here during the pause: mail queues at this site's mx.
                    actions.clear();
                    failback_step(spec, &mut st, obs, &mut actions, &mut after, &mut notes);
                } else if wants_failback && obs.failback_requested {
                    notes.push(Note {
                        warning: false,
                        reason: "FailbackWaiting",
                        message: format!(
                            "failback to {peer} waits for resync (peer follows epoch: {peer_follows}, \
                             tables in sync: {tables_ok}, lag within spec.targets.rpoSeconds: {within_rpo})"
                        ),
                    });
                }
            }
        }
    } else if st.phase == FailoverPhase::FailingBack {
        // The swap was recorded but not (fully) carried out: hand over again.
        requeue = IN_PROGRESS_REQUEUE;
        swap_actions(spec, &st, obs, &mut actions, &mut after);
    } else {
        standby_tick(
            spec,
            &mut st,
            obs,
            &mut actions,
            &mut after,
            &mut notes,
            &mut acquire_witness,
        );
        if st.phase == FailoverPhase::FailingOver {
            requeue = IN_PROGRESS_REQUEUE;
        } else if let Some(last) = parse(&st.last_probe_time) {
            // Come back when the next probe is due.
            let due = f64::from(spec.detection.probe_interval_seconds) - seconds_between(last, now);
            requeue = Duration::from_secs_f64(due.max(0.1));
        }
    }

    if quorum == Some(false) {
        // Out of quorum nothing unfences this site (a failback giving up, included).
        actions.retain(|a| !matches!(a, Action::FenceLocal(false)));
    }
    st.fenced = Some(
        st.active_site.as_deref() != Some(me)
            || st.phase == FailoverPhase::FailingBack
            || quorum == Some(false),
    );
    st.witness = obs.witness.as_ref().map(|w| WitnessStatus {
        reachable: w.reachable,
        holder: w.holder.clone(),
        quorum: quorum.unwrap_or(w.reachable || obs.peer.is_some()),
    });
    if let Some(a) = after.as_mut() {
        a.witness = st.witness.clone();
    }
    set_conditions(spec, &mut st, within_rpo, now);
    if let Some(a) = after.as_mut() {
        a.conditions = st.conditions.clone();
    }
    Decision {
        status: st,
        actions,
        after,
        notes,
        requeue,
        acquire_witness,
    }
}

/// Whether the active site may keep writing, with `spec.witness` (`None` without one): it renewed the
/// witness Lease within the renew deadline, or the peer answers, agrees that this site is active at this
/// epoch and counts no failed probe of it. Either way the standby cannot be promoting behind its back.
fn active_quorum(
    spec: &SiteFailoverSpec,
    st: &SiteFailoverStatus,
    obs: &Observation,
) -> Option<bool> {
    let w = spec.witness.as_ref()?;
    let me = spec.local_site.as_str();
    let view = obs.witness.clone().unwrap_or_default();
    let agrees = peer_agrees(spec, st, obs);
    let deadline = f64::from(w.renew_deadline_seconds(spec.detection.probe_interval_seconds));
    // An agreement read long ago (a slow tick) is as stale as an old renewal.
    let agrees = agrees && seconds_between(obs.peer_read_at, obs.now) <= deadline;
    let recent = view
        .renewed_at
        .is_some_and(|t| seconds_between(t, obs.now) <= deadline);
    // A readable Lease must still be ours at no higher epoch; an unreadable one counts until the deadline.
    let still_ours =
        !view.reachable || (view.held_by(me) && view.foreign.is_none() && view.epoch <= st.epoch);
    Some(agrees || (recent && still_ours))
}

/// The peer answers and agrees that this site is active at this epoch, counting no failed probe of it. A
/// standby that counts failures may take a lapsed Lease and promote, and might not reach this site's API
/// to fence it first, so its agreement ends with its first recorded failure.
pub fn peer_agrees(spec: &SiteFailoverSpec, st: &SiteFailoverStatus, obs: &Observation) -> bool {
    let me = spec.local_site.as_str();
    obs.peer.as_ref().is_some_and(|p| {
        p.epoch == st.epoch && p.active_site.as_deref() == Some(me) && p.probe_failures == 0
    })
}

fn witness_wait_message(
    me: &str,
    peer: &str,
    w: &WitnessView,
    failing_for: f64,
    duration: f64,
) -> String {
    if !w.reachable {
        return format!(
            "promotion of {me} needs the witness Lease and the witness does not answer"
        );
    }
    if let Some(other) = &w.foreign {
        return format!(
            "promotion of {me} needs the witness Lease, which belongs to another pairing ({other}): give this pairing its own spec.witness.leaseName"
        );
    }
    format!(
        "promotion of {me} waits for the witness Lease (held by {}, {}) and for {duration:.0} s of failed probes ({failing_for:.0} s so far): site {peer} may still be serving behind a partition",
        w.holder.as_deref().unwrap_or("nobody"),
        if w.lapsed { "lapsed" } else { "still changing" }
    )
}

fn quorum_lost_message(
    spec: &SiteFailoverSpec,
    st: &SiteFailoverStatus,
    obs: &Observation,
) -> String {
    let view = obs.witness.clone().unwrap_or_default();
    let witness = if !view.reachable {
        "the witness does not answer".to_string()
    } else if view.epoch > st.epoch {
        format!(
            "the witness Lease is held by {} at epoch {} (this site: {})",
            view.holder.as_deref().unwrap_or("nobody"),
            view.epoch,
            st.epoch
        )
    } else {
        format!(
            "the witness Lease is held by {}",
            view.holder.as_deref().unwrap_or("nobody")
        )
    };
    format!(
        "{witness} and site {} {}: fencing this site's stores so two sites never write; mail waits in the mx queues",
        spec.peer.name,
        if obs.peer.is_some() {
            "does not agree that this site is active"
        } else {
            "is unreachable"
        }
    )
}

fn observe_tables(st: &mut SiteFailoverStatus, obs: &Observation) {
    let local: Vec<_> = obs
        .tables
        .iter()
        .map(|t| (t.mail_pod.clone(), t.local.clone()))
        .collect();
    let peer: Vec<_> = obs
        .tables
        .iter()
        .map(|t| (t.mail_pod.clone(), t.peer.clone()))
        .collect();
    let previous = st.local_access_tables_hash.take();
    st.local_access_tables_hash = combined(&local);
    if obs.peer.is_some() {
        st.peer_access_tables_hash = combined(&peer);
    }
    let in_sync = obs.peer.is_some()
        && !obs.tables.is_empty()
        && obs
            .tables
            .iter()
            .all(|t| t.local.is_some() && t.local == t.peer);
    // The sync time moves only when a new table version is confirmed on both sides, so a steady state
    // writes nothing and "time since last sync" grows while the sites differ.
    let newly_synced = in_sync
        && (st.access_tables_in_sync != Some(true) || previous != st.local_access_tables_hash);
    if newly_synced {
        st.last_table_sync = Some(rfc3339(obs.now));
    }
    if obs.peer.is_some() || st.access_tables_in_sync.is_none() {
        st.access_tables_in_sync = Some(in_sync);
    }
}

fn standby_tick(
    spec: &SiteFailoverSpec,
    st: &mut SiteFailoverStatus,
    obs: &Observation,
    actions: &mut Vec<Action>,
    after: &mut Option<SiteFailoverStatus>,
    notes: &mut Vec<Note>,
    acquire_witness: &mut Option<i64>,
) {
    let me = spec.local_site.as_str();
    let peer = spec.peer.name.as_str();
    if obs.local_fencing.any_unfenced {
        actions.push(Action::FenceLocal(true));
    }
    actions.push(Action::WithdrawDns);
    if obs.peer.is_some() {
        actions.push(Action::MirrorFromPeer);
    }
    if let Some(ok) = obs.frontend_ok {
        if ok {
            st.consecutive_probe_failures = 0;
            st.probe_failing_since = None;
            st.last_probe_time = None;
        } else {
            st.consecutive_probe_failures += 1;
            st.probe_failing_since
                .get_or_insert_with(|| rfc3339(obs.now));
            st.last_probe_time = Some(rfc3339(obs.now));
            notes.push(Note {
                warning: true,
                reason: "ProbeFailed",
                message: format!(
                    "front ends of site {peer} did not answer ({} of {} failed probes; API {})",
                    st.consecutive_probe_failures,
                    spec.detection.failure_threshold,
                    if obs.peer.is_some() {
                        "reachable"
                    } else {
                        "unreachable"
                    }
                ),
            });
        }
    }
    let lost = st.consecutive_probe_failures >= spec.detection.failure_threshold;
    // A person may promote before the threshold or with automatic failover off, but only while the
    // primary's front ends are failing: promoting over a primary that serves would make two writers.
    let requested = obs.failover_requested && st.consecutive_probe_failures > 0;
    if obs.failover_requested && !requested {
        notes.push(Note {
            warning: true,
            reason: "PromoteRefused",
            message: format!(
                "promotion of {me} refused: the front ends of site {peer} answer; fail over with a planned failback from {peer} instead"
            ),
        });
        actions.push(Action::ClearFailoverRequest);
    }
    if (lost && spec.automatic_failover()) || requested {
        let started = parse(&st.probe_failing_since).unwrap_or(obs.now);
        let witness_epoch = obs.witness.as_ref().map_or(0, |w| w.epoch);
        let mut epoch = st.epoch.max(obs.peer.as_ref().map_or(0, |p| p.epoch)) + 1;
        if let (Some(cfg), Some(w)) = (&spec.witness, obs.witness.as_ref()) {
            // The active site may be in quorum through this site's agreement until it reads the failures
            // recorded here, and through its last renewal until the renew deadline: wait out both, whoever
            // the Lease names (an edited Lease, or one left by a tick that died, is no shortcut).
            let failing_for = seconds_between(started, obs.now);
            let duration = f64::from(cfg.lease_duration_seconds);
            let waited = w.lapsed && failing_for >= duration;
            let deadline =
                f64::from(cfg.renew_deadline_seconds(spec.detection.probe_interval_seconds));
            let fresh = w
                .renewed_at
                .is_some_and(|t| seconds_between(t, obs.now) <= deadline);
            let ours = waited && w.held_by(me) && w.foreign.is_none() && w.epoch > st.epoch;
            if ours && fresh {
                // Taken for this promotion in this tick (or just before).
                epoch = epoch.max(witness_epoch);
            } else if ours {
                // Taken by a tick that did not get to record the promotion: it may have lapsed since, and
                // the other site may have taken it meanwhile. Write it again (compare-and-swap on the
                // version read) before promoting.
                *acquire_witness = Some(epoch.max(witness_epoch));
                st.phase = steady_phase(spec, st);
                return;
            } else {
                let usable = w.reachable && w.foreign.is_none();
                if usable && waited {
                    *acquire_witness = Some(epoch.max(witness_epoch + 1));
                } else if st.consecutive_probe_failures == spec.detection.failure_threshold
                    || obs.failover_requested
                {
                    notes.push(Note {
                        warning: true,
                        reason: "WitnessWait",
                        message: witness_wait_message(me, peer, w, failing_for, duration),
                    });
                }
                st.phase = steady_phase(spec, st);
                return;
            }
        }
        st.epoch = epoch;
        st.active_site = Some(me.to_string());
        st.phase = FailoverPhase::FailingOver;
        st.last_failover = Some(FailoverRecord {
            from: peer.to_string(),
            to: me.to_string(),
            epoch,
            started_at: rfc3339(started),
            completed_at: None,
            rto_seconds: None,
            rpo_seconds: obs.replication_lag_seconds,
            kind: KIND_FAILOVER.to_string(),
        });
        notes.push(Note {
            warning: true,
            reason: "FailingOver",
            message: format!(
                "site {peer} lost after {} failed probes{}; promoting {me} at epoch {epoch}",
                st.consecutive_probe_failures,
                if requested { ", on request" } else { "" }
            ),
        });
        actions.retain(|a| !matches!(a, Action::FenceLocal(_) | Action::WithdrawDns));
        actions.extend(promotion_actions(me, epoch));
        if obs.failover_requested {
            actions.push(Action::ClearFailoverRequest);
        }
        *after = Some(finish(spec, st, obs.now));
        return;
    }
    if lost {
        notes.push(Note {
            warning: true,
            reason: "FailoverNeeded",
            message: format!(
                "site {peer} is lost and automatic failover is off (spec.policy.automaticFailover, on by default only with spec.witness); promote {me} with `kubectl mailpod promote`"
            ),
        });
    }
    st.phase = steady_phase(spec, st);
}

/// Promotion, in the order that keeps a single writer: tell and fence the peer (when it answers) before
/// this site's stores go active, then move the DNS names.
fn promotion_actions(me: &str, epoch: i64) -> Vec<Action> {
    vec![
        Action::TellPeer {
            epoch,
            active_site: me.to_string(),
        },
        Action::FencePeer(true),
        Action::WithdrawPeerDns,
        Action::FenceLocal(false),
        Action::PublishDns,
    ]
}

/// The status once a failover or failback has been carried out.
fn finish(spec: &SiteFailoverSpec, st: &SiteFailoverStatus, now: Timestamp) -> SiteFailoverStatus {
    let mut done = st.clone();
    if let Some(rec) = done.last_failover.as_mut() {
        rec.completed_at = Some(rfc3339(now));
        if let Some(start) = Some(rec.started_at.0) {
            rec.rto_seconds = Some(seconds_between(start, now));
        }
    }
    done.consecutive_probe_failures = 0;
    done.probe_failing_since = None;
    done.last_probe_time = None;
    done.phase = FailoverPhase::Healthy;
    let me_active = done.active_site.as_deref() == Some(spec.local_site.as_str());
    done.fenced = Some(!me_active);
    done.phase = steady_phase(spec, &done);
    done
}

fn set_conditions(
    spec: &SiteFailoverSpec,
    st: &mut SiteFailoverStatus,
    within_rpo: bool,
    now: Timestamp,
) {
    let gen = st.observed_generation;
    let t = Time(now);
    let reachable = st.peer_reachable == Some(true);
    set_condition(
        &mut st.conditions,
        condition::PEER_REACHABLE,
        reachable,
        if reachable {
            "Reachable"
        } else {
            "Unreachable"
        },
        if reachable {
            String::new()
        } else {
            format!("the API of site {} did not answer", spec.peer.name)
        },
        gen,
        t.clone(),
    );
    let in_sync = st.access_tables_in_sync == Some(true);
    set_condition(
        &mut st.conditions,
        condition::ACCESS_TABLES_IN_SYNC,
        in_sync,
        if in_sync {
            "HashesEqual"
        } else {
            "HashesDiffer"
        },
        if in_sync {
            String::new()
        } else {
            format!(
                "local {} vs peer {}",
                st.local_access_tables_hash.as_deref().unwrap_or("unknown"),
                st.peer_access_tables_hash.as_deref().unwrap_or("unknown")
            )
        },
        gen,
        t.clone(),
    );
    if let Some(w) = st.witness.clone() {
        set_condition(
            &mut st.conditions,
            condition::QUORUM,
            w.quorum,
            if w.quorum { "InQuorum" } else { "QuorumLost" },
            if w.quorum {
                String::new()
            } else {
                format!(
                    "neither the witness Lease (holder {}, witness {}) nor site {} confirms this site: its stores are fenced",
                    w.holder.as_deref().unwrap_or("none"),
                    if w.reachable { "reachable" } else { "unreachable" },
                    spec.peer.name
                )
            },
            gen,
            t.clone(),
        );
    }
    set_condition(
        &mut st.conditions,
        condition::WITHIN_RPO,
        within_rpo,
        if within_rpo {
            "LagWithinTarget"
        } else {
            "LagAboveTarget"
        },
        match st.replication_lag_seconds {
            Some(l) if !within_rpo => format!(
                "replication lag {l:.1} s exceeds spec.targets.rpoSeconds {}",
                spec.targets.rpo_seconds
            ),
            None => "replication lag not reported".to_string(),
            _ => String::new(),
        },
        gen,
        t,
    );
}

mod failback;
#[cfg(test)]
mod tests;
