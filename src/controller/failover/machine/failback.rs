//! Planned failback: resync first, then pause, final sync and swap under a new epoch. Driven by the active
//! site, which is the one that must stop writing before the primary may start.

use jiff::Timestamp;

use super::{
    finish, rfc3339, seconds_between, steady_phase, Action, Note, Observation, KIND_FAILBACK,
};
use crate::crd::{FailoverPhase, FailoverRecord, SiteFailoverSpec, SiteFailoverStatus};

pub(super) fn start_failback(
    spec: &SiteFailoverSpec,
    st: &mut SiteFailoverStatus,
    now: Timestamp,
    notes: &mut Vec<Note>,
) {
    st.phase = FailoverPhase::FailingBack;
    st.last_failover = Some(FailoverRecord {
        from: spec.local_site.clone(),
        to: spec.peer.name.clone(),
        epoch: st.epoch + 1,
        started_at: rfc3339(now),
        completed_at: None,
        rto_seconds: None,
        rpo_seconds: None,
        kind: KIND_FAILBACK.to_string(),
    });
    notes.push(Note {
        warning: false,
        reason: "FailingBack",
        message: format!(
            "site {} is resynchronised; pausing delivery here for the final sync",
            spec.peer.name
        ),
    });
}

/// Planned switchover from this (active) site back to the primary: pause delivery by fencing this site's
/// stores (LMTP answers 4xx, mail waits in the mx queues), wait for the final sync (lag 0), then hand over
/// under epoch + 1. Gives up, unpaused, when the final sync takes longer than the RTO target.
pub(super) fn failback_step(
    spec: &SiteFailoverSpec,
    st: &mut SiteFailoverStatus,
    obs: &Observation,
    actions: &mut Vec<Action>,
    after: &mut Option<SiteFailoverStatus>,
    notes: &mut Vec<Note>,
) {
    let me = spec.local_site.as_str();
    let peer = spec.peer.name.as_str();
    let started = st
        .last_failover
        .as_ref()
        .map(|r| r.started_at.0)
        .unwrap_or(obs.now);
    if obs.local_fencing.any_unfenced {
        actions.push(Action::FenceLocal(true));
    }
    let synced = obs.replication_lag_seconds == Some(0.0) && obs.peer.is_some();
    if !synced {
        if seconds_between(started, obs.now) > f64::from(spec.targets.rto_seconds) {
            notes.push(Note {
                warning: true,
                reason: "FailbackAborted",
                message: format!(
                    "final sync to {peer} did not finish within spec.targets.rtoSeconds ({} s); \
                     delivery resumed here; request failback again",
                    spec.targets.rto_seconds
                ),
            });
            actions.clear();
            actions.push(Action::FenceLocal(false));
            actions.push(Action::ClearFailbackRequest);
            st.last_failover = None;
            st.phase = steady_phase(spec, st);
        }
        return;
    }
    let epoch = st.last_failover.as_ref().map_or(st.epoch + 1, |r| r.epoch);
    st.epoch = epoch;
    st.active_site = Some(peer.to_string());
    notes.push(Note {
        warning: false,
        reason: "FailedBack",
        message: format!("final sync done; site {peer} serves at epoch {epoch}, {me} is standby"),
    });
    swap_actions(spec, st, obs, actions, after);
}

/// The hand-over of a failback, once the swap is recorded (this site fenced, the peer active).
pub(super) fn swap_actions(
    spec: &SiteFailoverSpec,
    st: &SiteFailoverStatus,
    obs: &Observation,
    actions: &mut Vec<Action>,
    after: &mut Option<SiteFailoverStatus>,
) {
    if obs.local_fencing.any_unfenced && !actions.contains(&Action::FenceLocal(true)) {
        actions.push(Action::FenceLocal(true));
    }
    actions.extend([
        Action::WithdrawDns,
        Action::TellPeer {
            epoch: st.epoch,
            active_site: spec.peer.name.clone(),
        },
        Action::FencePeer(false),
        Action::ClearFailbackRequest,
    ]);
    let mut done = finish(spec, st, obs.now);
    if let Some(r) = done.last_failover.as_mut() {
        // Delivery was paused until the lag was zero: nothing was behind at the swap.
        r.rpo_seconds = Some(0.0);
    }
    *after = Some(done);
}
