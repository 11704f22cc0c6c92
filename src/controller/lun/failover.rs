//! Which store replica of a LUN serves as active: a pure function of the LUN, what its pods report and the
//! time, so every case (loss, threshold, promotion in two steps, resync, fencing) is tested without I/O.
//!
//! The record is the LUN's status (`targetActive`, `currentActive`, `needsResync`); the `mailpod.io/role`
//! pod label is the actuator the active Service selects by. A pod the StatefulSet recreates loses its
//! labels, so the active replica is always taken from status, never inferred from labels alone.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::crd::{condition, Promotion, StorageLUNSpec, StorageLUNStatus};

/// Degraded reasons that mean "the active replica is lost". Their condition's lastTransitionTime records
/// when the operator first saw the loss, for people and for the loss-to-promoted figure; the failover
/// threshold itself counts on the deciding process's own clock (`lost_since` of [`decide`]).
pub const REASON_ACTIVE_UNREADY: &str = "ActiveUnready";
pub const REASON_PROMOTING: &str = "Promoting";
pub const REASON_NO_STANDBY: &str = "NoStandbyAvailable";
pub const REASON_FENCED: &str = "Fenced";
pub const REASON_ELECTING: &str = "Electing";

/// How soon to look again while a label change is on its way to the API server and the pod.
const FOLLOW_UP: Duration = Duration::from_secs(1);
/// How often to retry while no replica can be promoted.
const RETRY_NO_STANDBY: Duration = Duration::from_secs(10);

/// The `mailpod.io/role` label of a store pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Active,
    Standby,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Active => crate::names::labels::ROLE_ACTIVE,
            Role::Standby => crate::names::labels::ROLE_STANDBY,
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            crate::names::labels::ROLE_ACTIVE => Some(Role::Active),
            crate::names::labels::ROLE_STANDBY => Some(Role::Standby),
            _ => None,
        }
    }
}

/// Where a promoted pod came from, written on it with its `active` label so the second step can compute
/// loss-to-promoted even when the old pod is gone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PromotionMark {
    pub from: String,
    pub lost_at: Timestamp,
}

/// One store pod as observed.
#[derive(Clone, Debug, PartialEq)]
pub struct Replica {
    pub name: String,
    pub ordinal: i32,
    pub ready: bool,
    pub role: Option<Role>,
    /// Replication lag the agent reports.
    pub lag_seconds: Option<f64>,
    /// The agent reports a complete pass from the current active since it last became a standby, and
    /// when its last pass finished.
    pub in_sync: bool,
    pub synced_at: Option<Timestamp>,
    /// A pass finished after this process began watching the replica's resync: its `synced_at` moved past
    /// the one first seen then. Both times are the agent's own, so no two clocks are compared.
    pub passed_since_resync: bool,
    /// The pod runs the StatefulSet's current template (its `controller-revision-hash` is the
    /// StatefulSet's `updateRevision`); true while that is unknown.
    pub updated: bool,
    pub promotion: Option<PromotionMark>,
}

/// Something worth an Event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    pub warning: bool,
    pub reason: &'static str,
    pub message: String,
}

/// What the controller should do.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Decision {
    /// New role label for each pod whose label must change.
    pub roles: BTreeMap<String, Role>,
    /// Annotations to write on a pod being promoted.
    pub mark: Option<(String, PromotionMark)>,
    pub target_active: Option<String>,
    pub current_active: Option<String>,
    pub needs_resync: Vec<String>,
    pub last_promotion: Option<Promotion>,
    /// `Some((reason, message))` while no replica serves as active.
    pub degraded: Option<(&'static str, String)>,
    pub notes: Vec<Note>,
    pub requeue_after: Option<Duration>,
}

/// When the operator recorded the active replica lost, if it is still recorded as lost: only for the
/// loss-to-promoted figure of a promotion whose pod carries no mark.
fn recorded_loss(status: &StorageLUNStatus) -> Option<Timestamp> {
    status
        .conditions
        .iter()
        .find(|c| {
            c.type_ == condition::DEGRADED
                && c.status == "True"
                && [REASON_ACTIVE_UNREADY, REASON_PROMOTING, REASON_NO_STANDBY]
                    .contains(&c.reason.as_str())
        })
        .map(|c| c.last_transition_time.0)
}

/// The most up-to-date ready replica that may serve: smallest reported lag (unknown lag last), then lowest
/// ordinal. Replicas awaiting resync are never chosen.
pub fn choose_candidate<'a>(
    replicas: &'a [Replica],
    needs_resync: &[String],
    exclude: Option<&str>,
) -> Option<&'a Replica> {
    replicas
        .iter()
        .filter(|r| r.ready && Some(r.name.as_str()) != exclude)
        .filter(|r| !needs_resync.contains(&r.name))
        .min_by(|a, b| {
            let lag = |r: &Replica| r.lag_seconds.unwrap_or(f64::INFINITY);
            lag(a).total_cmp(&lag(b)).then(a.ordinal.cmp(&b.ordinal))
        })
}

/// Every pod but `active` labelled standby; `active` labelled active.
fn settle_roles(d: &mut Decision, replicas: &[Replica], active: Option<&str>) {
    for r in replicas {
        let want = if Some(r.name.as_str()) == active {
            Role::Active
        } else {
            Role::Standby
        };
        if r.role != Some(want) {
            d.roles.insert(r.name.clone(), want);
        }
    }
}

fn seconds_between(from: Timestamp, to: Timestamp) -> f64 {
    (to.as_millisecond() - from.as_millisecond()).max(0) as f64 / 1000.0
}

/// The replica a LUN serves from (or is promoting) when it is lost: not ready, or gone. `None` when it
/// serves, when none is chosen yet, and when the LUN is fenced.
pub fn lost_serving<'a>(
    spec: &StorageLUNSpec,
    status: &'a StorageLUNStatus,
    replicas: &[Replica],
) -> Option<&'a str> {
    if spec.fenced {
        return None;
    }
    let active = status
        .target_active
        .as_deref()
        .or(status.current_active.as_deref())?;
    (!replicas.iter().any(|r| r.name == active && r.ready)).then_some(active)
}

/// Decides roles and the failover part of status for one LUN. `lost_since`: when this process first saw
/// the replica it serves from lost ([`lost_serving`]), on its own monotonic clock, as `now` is; the
/// failover threshold counts from there.
pub fn decide(
    spec: &StorageLUNSpec,
    status: &StorageLUNStatus,
    replicas: &[Replica],
    lost_since: Option<Timestamp>,
    now: Timestamp,
) -> Decision {
    let mut d = Decision {
        target_active: status.target_active.clone(),
        current_active: status.current_active.clone(),
        needs_resync: status.needs_resync.clone(),
        last_promotion: status.last_promotion.clone(),
        ..Default::default()
    };
    clear_resynced(&mut d, replicas);

    if spec.fenced {
        if d.current_active.is_some() || d.target_active.is_some() {
            d.notes.push(Note {
                warning: true,
                reason: REASON_FENCED,
                message: "LUN fenced: no replica serves as active".into(),
            });
        }
        d.target_active = None;
        d.current_active = None;
        settle_roles(&mut d, replicas, None);
        d.degraded = Some((REASON_FENCED, "fenced: no replica serves as active".into()));
        return d;
    }

    let by_name: BTreeMap<&str, &Replica> = replicas.iter().map(|r| (r.name.as_str(), r)).collect();
    // The replica that serves or is being promoted to serve.
    let Some(active) = d.target_active.clone().or(d.current_active.clone()) else {
        elect(&mut d, replicas);
        return d;
    };

    match by_name.get(active.as_str()) {
        Some(r) if r.ready => {
            settle_roles(&mut d, replicas, Some(&active));
            if d.current_active.as_deref() == Some(&active) {
                d.target_active = Some(active);
            } else if r.role == Some(Role::Active) {
                // Second step: the promoted pod is ready and carries the label the Service selects.
                complete_promotion(&mut d, r, status, now);
            } else {
                d.degraded = Some((REASON_PROMOTING, format!("promoting {active}")));
                d.requeue_after = Some(FOLLOW_UP);
            }
        }
        _ => handle_loss(
            &mut d,
            spec,
            status,
            replicas,
            &active,
            lost_since.unwrap_or(now),
            now,
        ),
    }
    d
}

fn elect(d: &mut Decision, replicas: &[Replica]) {
    match choose_candidate(replicas, &d.needs_resync, None) {
        Some(c) => {
            d.target_active = Some(c.name.clone());
            settle_roles(d, replicas, Some(&c.name));
            d.notes.push(Note {
                warning: false,
                reason: REASON_ELECTING,
                message: format!("no active replica: electing {}", c.name),
            });
            d.degraded = Some((REASON_ELECTING, format!("electing {}", c.name)));
            d.requeue_after = Some(FOLLOW_UP);
        }
        None => {
            settle_roles(d, replicas, None);
            d.degraded = Some((
                REASON_ELECTING,
                "waiting for a ready replica to elect".into(),
            ));
            d.requeue_after = Some(RETRY_NO_STANDBY);
        }
    }
}

fn complete_promotion(d: &mut Decision, r: &Replica, status: &StorageLUNStatus, now: Timestamp) {
    let previous = d.current_active.replace(r.name.clone());
    d.target_active = Some(r.name.clone());
    let Some(from) = r
        .promotion
        .as_ref()
        .map(|m| m.from.clone())
        .or(previous.clone())
    else {
        // First election of a new LUN: nothing was lost.
        d.notes.push(Note {
            warning: false,
            reason: "Elected",
            message: format!("{} serves as active", r.name),
        });
        return;
    };
    let lost_at = r
        .promotion
        .as_ref()
        .map(|m| m.lost_at)
        .or(recorded_loss(status))
        .unwrap_or(now);
    let seconds = seconds_between(lost_at, now);
    d.notes.push(Note {
        warning: false,
        reason: "Promoted",
        message: format!(
            "{} serves as active in place of {from}, {seconds:.1}s after it was lost",
            r.name
        ),
    });
    d.last_promotion = Some(Promotion {
        from,
        to: r.name.clone(),
        lost_at: Time(lost_at),
        promoted_at: Time(now),
        seconds,
    });
}

fn handle_loss(
    d: &mut Decision,
    spec: &StorageLUNSpec,
    status: &StorageLUNStatus,
    replicas: &[Replica],
    active: &str,
    lost_at: Timestamp,
    now: Timestamp,
) {
    let pod = replicas.iter().find(|r| r.name == active);
    let elapsed = seconds_between(lost_at, now);
    let threshold = f64::from(spec.failover_threshold_seconds);
    // Keep labels as they are while waiting: an unready pod has no endpoints anyway, and a pod that comes
    // back within the threshold serves again with no change.
    if elapsed < threshold {
        settle_roles(d, replicas, Some(active));
        // Status states when the loss began, not for how long: a message that changes on every pass would
        // write status on every pass.
        d.degraded = Some((
            REASON_ACTIVE_UNREADY,
            format!(
                "active replica {active} unready since {lost_at} (failover after {threshold:.0}s)"
            ),
        ));
        d.requeue_after = Some(Duration::from_secs_f64((threshold - elapsed).max(1.0)));
        return;
    }
    let Some(c) = choose_candidate(replicas, &d.needs_resync, Some(active)) else {
        settle_roles(d, replicas, Some(active));
        let message = format!(
            "active replica {active} unready since {lost_at} and no standby is ready and in sync"
        );
        if !degraded_with(status, REASON_NO_STANDBY) {
            d.notes.push(Note {
                warning: true,
                reason: REASON_NO_STANDBY,
                message: message.clone(),
            });
        }
        d.degraded = Some((REASON_NO_STANDBY, message));
        d.requeue_after = Some(RETRY_NO_STANDBY);
        return;
    };
    // A failed promotion target keeps the original loss time in its mark.
    let mark = match pod.and_then(|p| p.promotion.clone()) {
        Some(m) if d.current_active.as_deref() != Some(active) => PromotionMark {
            from: active.to_string(),
            lost_at: m.lost_at,
        },
        _ => PromotionMark {
            from: active.to_string(),
            lost_at,
        },
    };
    // The old active may hold mail the standby never received: it must resync before it serves again.
    if !d.needs_resync.iter().any(|n| n == active) {
        d.needs_resync.push(active.to_string());
    }
    d.target_active = Some(c.name.clone());
    settle_roles(d, replicas, Some(&c.name));
    d.mark = Some((c.name.clone(), mark));
    let lag = c
        .lag_seconds
        .map_or("unknown".to_string(), |l| format!("{l:.1}s"));
    d.notes.push(Note {
        warning: true,
        reason: "Failover",
        message: format!(
            "active replica {active} unready for {elapsed:.0}s: promoting {} (lag {lag})",
            c.name
        ),
    });
    d.degraded = Some((
        REASON_PROMOTING,
        format!("promoting {} in place of {active}", c.name),
    ));
    d.requeue_after = Some(FOLLOW_UP);
}

fn degraded_with(status: &StorageLUNStatus, reason: &str) -> bool {
    status
        .conditions
        .iter()
        .any(|c| c.type_ == condition::DEGRADED && c.status == "True" && c.reason == reason)
}

/// A demoted replica may serve again once it reports itself in sync (a complete pass since it became a
/// standby, pulling from the LUN's Service, which selects the current active) with a pass that finished
/// after that active was promoted.
fn clear_resynced(d: &mut Decision, replicas: &[Replica]) {
    let Some(current) = d.current_active.clone() else {
        return;
    };
    let synced: BTreeSet<String> = replicas
        .iter()
        .filter(|r| d.needs_resync.contains(&r.name))
        .filter(|r| r.in_sync && r.passed_since_resync)
        .map(|r| r.name.clone())
        .collect();
    for name in &synced {
        d.notes.push(Note {
            warning: false,
            reason: "Resynchronised",
            message: format!("{name} is in sync with {current} and may serve again"),
        });
    }
    d.needs_resync.retain(|n| !synced.contains(n));
}

#[cfg(test)]
#[path = "failover_tests.rs"]
mod tests;
