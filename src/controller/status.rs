//! MailPod status from what was applied and what the cluster reports: conditions, per-service replica
//! counts, placement figures and the access-tables hash.

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;

use crate::crd::{
    condition, condition_is_true, set_condition, LunPlacement, MailPod, MailPodStatus,
    ServiceStatus, StorageLUN, ValidationErrors,
};
use crate::names;
use crate::placement::LunAssignment;

/// Reasons this controller puts on conditions.
pub mod reason {
    pub const SERVING: &str = "Serving";
    pub const APPLIED: &str = "Applied";
    pub const ROLLING_OUT: &str = "RollingOut";
    pub const CONVERGED: &str = "Converged";
    pub const SERVICES_NOT_READY: &str = "ServicesNotReady";
    pub const STORES_NOT_READY: &str = "StoresNotReady";
    pub const REPLICAS_UNAVAILABLE: &str = "ReplicasUnavailable";
    pub const AS_EXPECTED: &str = "AsExpected";
}

/// What the status is computed from.
pub struct Observed<'a> {
    pub mailpod: &'a MailPod,
    pub placement: &'a [LunAssignment],
    pub tables_hash: &'a str,
    /// Front-end StatefulSets as the cluster reports them.
    pub statefulsets: &'a [StatefulSet],
    /// The MailPod's StorageLUNs as the cluster reports them.
    pub luns: &'a [StorageLUN],
    /// Whether this reconcile created, changed or deleted a child.
    pub changed: bool,
    /// Emptied LUNs kept because they held mail, until a person confirms their deletion.
    pub awaiting_deletion: &'a [String],
}

/// Condition type, present while emptied LUNs that held mail wait for a person to confirm their deletion.
pub const AWAITING_CONFIRMATION: &str = "AwaitingConfirmation";

/// Condition type: whether every mailbox source the MailPod reads is labelled to be watched.
pub const SOURCES_WATCHED: &str = "MailboxSourcesWatched";
/// Reason (and Event reason) while a mailbox source lacks the `mailpod.io/mailbox-source` label.
pub const REASON_SOURCE_NOT_LABELLED: &str = "MailboxSourceNotLabelled";

/// A StatefulSet has rolled out its current spec.
fn rolled_out(sts: &StatefulSet) -> bool {
    let want = sts.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    sts.status.as_ref().is_some_and(|s| {
        s.observed_generation >= sts.metadata.generation
            && s.updated_replicas.unwrap_or(0) >= want
            && s.current_revision == s.update_revision
    })
}

/// The status a reconcile that applied everything should leave.
pub fn compute(o: &Observed, now: Time) -> MailPodStatus {
    let mp = o.mailpod;
    let mut status = mp.status.clone().unwrap_or_default();
    let generation = mp.metadata.generation;

    let mut services = vec![];
    let mut not_ready = vec![];
    let mut not_rolled_out = vec![];
    for (kind, svc) in mp.spec.frontend.enabled() {
        let name = names::frontend(&mp.name_any(), kind);
        let sts = o.statefulsets.iter().find(|s| s.name_any() == name);
        let ready = sts
            .and_then(|s| s.status.as_ref())
            .and_then(|s| s.ready_replicas)
            .unwrap_or(0);
        if ready < svc.replicas {
            not_ready.push(format!("{} {ready}/{}", kind.as_str(), svc.replicas));
        }
        if !sts.is_some_and(rolled_out) {
            not_rolled_out.push(kind.as_str().to_string());
        }
        services.push(ServiceStatus {
            name: kind.as_str().to_string(),
            ready,
            desired: svc.replicas,
        });
    }
    let luns_not_ready: Vec<String> = o
        .placement
        .iter()
        .map(|a| names::lun(&mp.name_any(), a.index))
        .filter(|name| {
            !o.luns.iter().any(|l| {
                l.name_any() == *name
                    && l.status
                        .as_ref()
                        .is_some_and(|s| condition_is_true(&s.conditions, condition::READY))
            })
        })
        .collect();

    let (ready_sum, desired_sum) = services
        .iter()
        .fold((0, 0), |(r, d), s| (r + s.ready, d + s.desired));
    status.services_ready = Some(format!("{ready_sum}/{desired_sum}"));
    status.services = services;
    status.mailboxes = o.placement.iter().map(|a| a.mailboxes.len() as i32).sum();
    status.lun_count = o.placement.len() as i32;
    status.luns = o
        .placement
        .iter()
        .map(|a| LunPlacement {
            name: names::lun(&mp.name_any(), a.index),
            index: a.index,
            users: a.mailboxes.len() as u32,
        })
        .collect();
    status.access_tables_hash = Some(o.tables_hash.to_string());
    status.observed_generation = generation;

    let progressing = o.changed || !not_rolled_out.is_empty();
    let (p_reason, p_message) = if o.changed {
        (
            reason::APPLIED,
            "children created or updated; waiting for them to roll out".to_string(),
        )
    } else if !not_rolled_out.is_empty() {
        (
            reason::ROLLING_OUT,
            format!("rolling out: {}", not_rolled_out.join(", ")),
        )
    } else {
        (
            reason::CONVERGED,
            "every child matches the spec".to_string(),
        )
    };
    let ready = not_ready.is_empty() && luns_not_ready.is_empty() && !o.changed;
    let (r_reason, r_message) = if !not_ready.is_empty() {
        (
            reason::SERVICES_NOT_READY,
            format!("services not ready: {}", not_ready.join(", ")),
        )
    } else if !luns_not_ready.is_empty() {
        (
            reason::STORES_NOT_READY,
            format!("stores not ready: {}", luns_not_ready.join(", ")),
        )
    } else if o.changed {
        (
            reason::APPLIED,
            "children changed; waiting for them to report".to_string(),
        )
    } else {
        (
            reason::SERVING,
            format!(
                "{} mailboxes on {} LUNs; services {ready_sum}/{desired_sum} ready",
                status.mailboxes, status.lun_count
            ),
        )
    };
    let degraded = !ready && !progressing;
    let (d_reason, d_message) = if degraded {
        (reason::REPLICAS_UNAVAILABLE, r_message.clone())
    } else {
        (reason::AS_EXPECTED, String::new())
    };
    set_condition(
        &mut status.conditions,
        condition::READY,
        ready,
        r_reason,
        r_message,
        generation,
        now.clone(),
    );
    set_condition(
        &mut status.conditions,
        condition::PROGRESSING,
        progressing,
        p_reason,
        p_message,
        generation,
        now.clone(),
    );
    set_condition(
        &mut status.conditions,
        condition::DEGRADED,
        degraded,
        d_reason,
        d_message,
        generation,
        now.clone(),
    );
    if o.awaiting_deletion.is_empty() {
        status
            .conditions
            .retain(|c| c.type_ != AWAITING_CONFIRMATION);
    } else {
        set_condition(
            &mut status.conditions,
            AWAITING_CONFIRMATION,
            true,
            "LunDeletionUnconfirmed",
            format!(
                "emptied but kept because they held mail: {}; to delete one, annotate its StorageLUN \
                 {}=true",
                o.awaiting_deletion.join(", "),
                crate::controller::confirm::CONFIRM_DELETION
            ),
            generation,
            now,
        );
    }
    status
}

/// The status of a MailPod whose spec cannot be applied: `Ready=False` with reason `InvalidSpec` naming every
/// offending field; everything else (placement figures, hash) stays as last applied.
pub fn invalid(mp: &MailPod, errs: &ValidationErrors, now: Time) -> MailPodStatus {
    refused(
        mp,
        condition::REASON_INVALID_SPEC,
        &errs.to_string(),
        "waiting for a valid spec; existing children are left as they are",
        now,
    )
}

/// The status of a MailPod whose children are left as they are for `reason`: `Ready=False` and
/// `Progressing=False` saying why; everything else stays as last applied.
pub fn refused(
    mp: &MailPod,
    reason: &str,
    message: &str,
    waiting: &str,
    now: Time,
) -> MailPodStatus {
    let mut status = mp.status.clone().unwrap_or_default();
    let generation = mp.metadata.generation;
    status.observed_generation = generation;
    set_condition(
        &mut status.conditions,
        condition::READY,
        false,
        reason,
        truncate(message, 2048),
        generation,
        now.clone(),
    );
    set_condition(
        &mut status.conditions,
        condition::PROGRESSING,
        false,
        reason,
        waiting,
        generation,
        now,
    );
    status
}

/// Cuts at a character boundary, marking the cut.
pub fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}
