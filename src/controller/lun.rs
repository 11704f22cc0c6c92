//! The StorageLUN controller: validate -> build the store objects (pure) -> Server-Side Apply (skipping
//! what is already as desired) -> observe the store pods -> move the `mailpod.io/role` label as the
//! failover decision says -> write status, only when it changed.
//!
//! The failover decision (`targetActive`, `currentActive`, `needsResync`, `lastPromotion`) is recorded
//! before the role labels move, by a merge patch with the resourceVersion read as precondition: on a
//! conflict the LUN is read again and the decision made again from what is recorded. The other fields
//! this controller owns are applied (Server-Side Apply on the status subresource, field manager
//! `mailpod-operator`); the snapshot job applies `snapshots` and `lastSnapshot` as
//! `mailpod-operator-snapshot`, so neither overwrites the other. After the labels move, the agents are
//! told their new roles on the control port ([`push_roles`]).

pub mod deletion;
pub mod failover;
pub mod health;
pub mod replicas;
pub mod replication;
pub mod reports;
pub mod roll;
pub mod scale;
pub mod volume;

use crate::controller::publish;
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::batch::v1::CronJob;
use k8s_openapi::api::core::v1::{Pod, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role as RbacRole, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, ApiResource, DynamicObject, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use serde_json::{json, Value};
use tracing::{info, warn};

use super::apply::{self, LiveChildren};
use super::{Context, Error, Result};
use crate::crd::{
    condition, set_condition, ReplicaStatus, ReplicationMethod, StorageLUN, StorageLUNStatus,
    ValidationErrors,
};
use crate::names::{annotations, labels as l, FIELD_MANAGER};
use crate::resources::store;
use failover::{Decision, Role};

/// Longest time between two looks at a LUN; pod and child changes arrive as watch events sooner.
const RESYNC: Duration = Duration::from_secs(60);

/// Smallest step of a `Volume` LUN's lag in status: csi-addons reports a sync once per mirroring
/// interval, so the lag grows between syncs; 30 s stays within the default RPO target.
const VOLUME_LAG_FLOOR: f64 = 30.0;

/// How often a LUN's agents are asked for their replication reports: a few sync intervals, at most
/// [`RESYNC`].
fn poll_interval(lun: &StorageLUN) -> Duration {
    let interval = u64::from(lun.spec.replication.sync_interval_seconds);
    Duration::from_secs((interval * 3).clamp(5, RESYNC.as_secs()))
}

/// The exact lags behind a computed status, for the metrics.
fn measured_lag(status: &StorageLUNStatus, observed: &[failover::Replica]) -> super::LunLag {
    let replicas: Vec<(String, f64)> = status
        .replicas
        .iter()
        .filter(|r| r.role == Role::Standby.as_str())
        .filter_map(|r| {
            observed
                .iter()
                .find(|o| o.name == r.name)
                .and_then(|o| o.lag_seconds)
                .map(|l| (r.name.clone(), l))
        })
        .collect();
    super::LunLag {
        lag_seconds: replicas.iter().map(|(_, l)| *l).reduce(f64::max),
        replicas,
        health: Default::default(),
    }
}

/// Kinds a StorageLUN owns and applies.
pub fn lun_child_kinds() -> Vec<ApiResource> {
    vec![
        ApiResource::erase::<ServiceAccount>(&()),
        ApiResource::erase::<RbacRole>(&()),
        ApiResource::erase::<RoleBinding>(&()),
        ApiResource::erase::<Service>(&()),
        ApiResource::erase::<CronJob>(&()),
        ApiResource::erase::<StatefulSet>(&()),
    ]
}

/// Status fields this controller owns (everything but the snapshot job's and the decision) and applies.
const OWNED_STATUS_FIELDS: &[&str] = &[
    "conditions",
    "observedGeneration",
    "users",
    "replicas",
    "replicationLagSeconds",
];

/// Status fields that record the failover decision: written only by compare-and-swap
/// ([`record_decision`]), never by the apply of the other fields, which could carry a stale one.
const DECISION_STATUS_FIELDS: &[&str] = &[
    "targetActive",
    "currentActive",
    "needsResync",
    "lastPromotion",
];

/// How often one reconcile reads the LUN again after a conflicting decision write before it gives up
/// (and is retried with the backoff).
const DECISION_ATTEMPTS: u32 = 3;

/// Whether `d` records anything other than what `current` holds.
fn changes_decision(current: &StorageLUNStatus, d: &Decision) -> bool {
    current.target_active != d.target_active
        || current.current_active != d.current_active
        || current.needs_resync != d.needs_resync
        || current.last_promotion != d.last_promotion
}

/// Writes the decision part of status with the resourceVersion of `lun` as a precondition. `Ok(false)`:
/// the LUN changed since it was read (409), nothing was written.
async fn record_decision(ctx: &Context, lun: &StorageLUN, d: &Decision) -> Result<bool> {
    let mut status = lun.status.clone().unwrap_or_default();
    status.target_active = d.target_active.clone();
    status.current_active = d.current_active.clone();
    status.needs_resync = d.needs_resync.clone();
    status.last_promotion = d.last_promotion.clone();
    let mut body = serde_json::to_value(&status).map_err(|source| Error::Decode {
        what: format!("status of StorageLUN {}", lun.name_any()),
        source,
    })?;
    let obj = body.as_object_mut().expect("status is an object");
    obj.retain(|k, _| DECISION_STATUS_FIELDS.contains(&k.as_str()));
    for field in DECISION_STATUS_FIELDS {
        obj.entry(field.to_string()).or_insert(Value::Null);
    }
    let patch = json!({
        "metadata": { "resourceVersion": lun.resource_version() },
        "status": body,
    });
    let api: Api<StorageLUN> =
        Api::namespaced(ctx.client.clone(), &lun.namespace().unwrap_or_default());
    match api
        .patch_status(
            &lun.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(source) => Err(Error::Status { source }),
    }
}

/// Reconciles one StorageLUN. The work is boxed: its future is large, and callers (the controller, tests
/// that drive several sites on one thread) then hold only a pointer to it.
pub async fn reconcile(lun: Arc<StorageLUN>, ctx: Arc<Context>) -> Result<Action> {
    Box::pin(reconcile_lun(lun, ctx)).await
}

async fn reconcile_lun(lun: Arc<StorageLUN>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.stats.start_reconcile();
    if lun.meta().deletion_timestamp.is_some() {
        ctx.stats
            .report_lun_lag(&lun.namespace().unwrap_or_default(), &lun.name_any(), None);
        return Ok(Action::await_change());
    }
    let name = lun.name_any();
    let ns = lun
        .namespace()
        .ok_or_else(|| Error::MissingNamespace(format!("StorageLUN {name}")))?;
    if let Err(errs) = lun.validate() {
        return reject(&ctx, &lun, errs).await;
    }

    let mut desired = store::build(&lun, &ctx.config.defaults());
    let selector = format!("{}={name}", l::LUN);
    let uid = lun.uid().unwrap_or_default();
    let kinds = lun_child_kinds();
    // From the controller's cache once it holds every kind; listed when there is none yet.
    let cache = ctx.children.get().filter(|c| c.synced());
    let live = match cache {
        Some(c) => c.live(&uid, &kinds),
        None => LiveChildren::list(&ctx.client, &ns, &kinds, &selector, &uid).await?,
    };
    // Block replication: whether the stores may run depends on the state of their images.
    let volume = if lun.spec.replication.method == ReplicationMethod::Volume {
        let prepared = volume::prepare(&ctx.client, &lun, &live).await?;
        store::set_store_replicas(&mut desired, prepared.plan.store_replicas);
        Some(prepared)
    } else {
        None
    };
    // A lowered `standbys` waits while it would remove the active (or a replica being promoted or
    // handing over); the switchover it needs is decided below.
    let desired_replicas = 1 + lun.spec.standbys as i32;
    let live_replicas = live
        .get("StatefulSet", &name)
        .and_then(|o| o.data["spec"]["replicas"].as_i64())
        .map(|r| r as i32);
    if volume.is_none() {
        let status = lun.status.clone().unwrap_or_default();
        let allowed = scale::allowed_replicas(&name, desired_replicas, live_replicas, &status);
        if allowed != desired_replicas {
            store::set_store_replicas(&mut desired, allowed);
        }
    }
    // A child that cannot be applied (an immutable field changed, a webhook refusing) must not keep the
    // failover below from running: the failure is reported and retried, roles are still decided and
    // moved, and only the steps whose order depends on the apply (the images of a Volume LUN) wait.
    // Boxed: this future is large and the reconcile's own would carry it across every later await.
    let applied = match Box::pin(apply::apply_children(
        &ctx.client,
        &ns,
        &desired,
        &live,
        &ctx.applied,
        &uid,
    ))
    .await
    {
        Ok(report) => {
            super::cache::remember(cache, &report, &kinds);
            Box::pin(ensure_generated_secrets(&ctx, &ns, &lun))
                .await
                .map(|()| report)
        }
        Err(e) => Err(e),
    };
    // Kept as text: the error itself is large and need not live across the awaits below.
    let (report, apply_failure) = match applied {
        Ok(report) => match Box::pin(remove_orphans(&ctx, &lun, &ns, &live, &desired)).await {
            Ok(()) => (report, None),
            Err(e) => (report, Some((e.to_string(), e.metric_label()))),
        },
        Err(e) => (
            apply::ApplyReport::default(),
            Some((e.to_string(), e.metric_label())),
        ),
    };
    if report.changed() {
        let mut parts = vec![];
        if !report.created.is_empty() {
            parts.push(format!("created {}", report.created.join(", ")));
        }
        if !report.updated.is_empty() {
            parts.push(format!("updated {}", report.updated.join(", ")));
        }
        publish(
            &ctx,
            lun.as_ref(),
            EventType::Normal,
            "Applied",
            "Apply",
            parts.join("; "),
        )
        .await;
    }
    let replication_issue = match &volume {
        Some(v) => {
            if let Some(state) = v.plan.images.filter(|_| apply_failure.is_none()) {
                let written = replication::apply(&ctx.client, &lun, state, &v.replications).await?;
                if !written.is_empty() {
                    publish(
                        &ctx,
                        lun.as_ref(),
                        EventType::Normal,
                        "VolumeReplication",
                        "Replicate",
                        format!("{} set to {}", written.join(", "), state.spec_value()),
                    )
                    .await;
                }
            }
            v.replications.issue.clone()
        }
        None => None,
    };

    // Observe the store pods and decide who serves.
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let pod_list = pods
        .list(&ListParams::default().labels(&format!(
            "{selector},{}={}",
            l::COMPONENT,
            store::COMPONENT
        )))
        .await
        .map_err(|source| Error::Read {
            what: format!("store pods of StorageLUN {name}"),
            source,
        })?;
    let reports = reports::collect(ctx.replication.as_ref(), &pod_list.items).await;
    let now = ctx.clock.now();
    let mut observed = replicas::observe(&name, &pod_list.items, &reports);
    // Which pods run the StatefulSet's current template, and whether this LUN's turn to roll has come.
    mark_updated(
        &mut observed,
        live.get("StatefulSet", &name),
        &pod_list.items,
    );
    // The replicas the StatefulSet runs now (a pod being recreated is missing from the list meanwhile).
    let roll_expected = live_replicas.unwrap_or(desired_replicas).max(0) as usize;
    let roll_gate = if observed.iter().all(|r| r.updated) {
        true
    } else {
        roll_gate_open(&ctx, &lun, &ns).await?
    };
    let loss_key = format!("{ns}/{name}");
    let decide = |lun: &StorageLUN, current: &StorageLUNStatus| {
        // The threshold counts from this process's first sight of the loss, on its own clock: never from
        // the kubelet's lastTransitionTime or a time another replica of the operator wrote.
        let lost_since = match failover::lost_serving(&lun.spec, current, &observed) {
            Some(replica) => Some(ctx.losses.since(&loss_key, replica, now)),
            None => {
                ctx.losses.clear(&loss_key);
                None
            }
        };
        let observed = resync_passes(&ctx, &loss_key, current, &observed);
        let mut decision = failover::decide(&lun.spec, current, &observed, lost_since, now);
        if volume.is_none() {
            scale::switch_over(
                &name,
                desired_replicas,
                live_replicas,
                &mut decision,
                &observed,
            );
            roll::switch_over(&mut decision, &observed, roll_expected, roll_gate);
        }
        if let Some(v) = &volume {
            if let Some(condition) = &v.plan.condition {
                decision.degraded = Some(condition.clone());
            }
            if v.plan.waiting {
                decision.requeue_after = Some(
                    decision
                        .requeue_after
                        .map_or(volume::WAIT, |d| d.min(volume::WAIT)),
                );
            }
        }
        decision
    };
    let mut lun = lun;
    let mut current = lun.status.clone().unwrap_or_default();
    let mut decision = decide(&lun, &current);
    // A decision is recorded before it is acted on, by compare-and-swap on the LUN's resourceVersion: a
    // second leader (or one acting on a stale cache) that decided otherwise gets a conflict, reads the
    // recorded decision and decides again from it, so two leaders never promote different replicas.
    let mut recorded = false;
    let mut attempts = 0;
    while changes_decision(&current, &decision) {
        attempts += 1;
        match record_decision(&ctx, &lun, &decision).await? {
            true => {
                current.target_active = decision.target_active.clone();
                current.current_active = decision.current_active.clone();
                current.needs_resync = decision.needs_resync.clone();
                current.last_promotion = decision.last_promotion.clone();
                recorded = true;
            }
            false if attempts < DECISION_ATTEMPTS => {
                let api: Api<StorageLUN> = Api::namespaced(ctx.client.clone(), &ns);
                let fresh = api.get(&name).await.map_err(|source| Error::Read {
                    what: format!("StorageLUN {name}"),
                    source,
                })?;
                lun = Arc::new(fresh);
                current = lun.status.clone().unwrap_or_default();
                decision = decide(&lun, &current);
            }
            false => return Err(Error::DecisionConflict(name)),
        }
    }
    actuate(&pods, &decision).await?;
    push_roles(
        &ctx,
        &ns,
        &name,
        &pod_list.items,
        &observed,
        &decision,
        &reports,
    )
    .await;
    point_replicas(&pods, &lun, &pod_list.items).await?;
    let rolling = match roll::next(&decision, &observed, roll_expected, roll_gate) {
        roll::Step::Idle => false,
        roll::Step::Wait(why) => {
            info!(lun = %name, %why, "new store template: waiting");
            true
        }
        roll::Step::Evict(pod) => {
            evict(&pods, &pod_list.items, &pod).await?;
            publish(
                &ctx,
                lun.as_ref(),
                EventType::Normal,
                "Rolling",
                "Evict",
                format!("replacing {pod} with the store's new pod template"),
            )
            .await;
            true
        }
    };
    for note in &decision.notes {
        let type_ = if note.warning {
            EventType::Warning
        } else {
            EventType::Normal
        };
        publish(
            &ctx,
            lun.as_ref(),
            type_,
            note.reason,
            "Failover",
            note.message.clone(),
        )
        .await;
    }

    let mut status = compute_status(&lun, &current, &decision, &observed, replication_issue, now);
    let mut lag = measured_lag(&status, &observed);
    if let Some(v) = &volume {
        // The figure that matters across sites: how far the other site's copy of the images is behind.
        lag.lag_seconds = volume::lag(lun.spec.fenced, &v.replications.live, now);
        status.replication_lag_seconds = lag
            .lag_seconds
            .map(|l| replicas::lag_bucket(l, VOLUME_LAG_FLOOR));
    }
    lag.health = health::of(&lun.spec, lun.status.as_ref(), &status);
    ctx.stats.report_lun_lag(&ns, &name, Some(lag));
    let refusal_note = deletion::set(
        &mut status,
        deletion::message(&reports).as_deref(),
        lun.metadata.generation,
        now,
    );
    set_apply_condition(
        &mut status,
        apply_failure.as_ref().map(|(e, _)| e.as_str()),
        lun.metadata.generation,
        now,
    );
    let newly_failing = apply_failure.is_some()
        && !current
            .conditions
            .iter()
            .any(|c| c.type_ == APPLY_FAILED && c.status == "True");
    let written = write_status(&ctx, &lun, &current, &status).await?;
    if let Some((refused, note)) = refusal_note.filter(|_| written) {
        let type_ = if refused {
            EventType::Warning
        } else {
            EventType::Normal
        };
        publish(
            &ctx,
            lun.as_ref(),
            type_,
            deletion::REASON,
            "Replicate",
            note,
        )
        .await;
    }
    if let Some((e, kind)) = apply_failure {
        if newly_failing {
            publish(
                &ctx,
                lun.as_ref(),
                EventType::Warning,
                "ApplyFailed",
                "Apply",
                e.clone(),
            )
            .await;
        }
        // Retried with the backoff, but never later than the failover decision wants to look again.
        let delay = super::mailpod::backoff(ctx.record_failure(lun.as_ref()));
        warn!(lun = %name, error = %e, kind, "children not applied; roles still decided");
        ctx.stats
            .failures
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        return Ok(Action::requeue(
            decision.requeue_after.map_or(delay, |d| d.min(delay)),
        ));
    }
    ctx.reset_failures(lun.as_ref());
    // Status writes do not bring the next reconcile (the LUN watch ignores status-only changes), and
    // the agents' reports are not watch events: the LUN is looked at again on a timer, sooner while a
    // promotion is under way.
    let promoting = (written || recorded) && status.target_active != status.current_active;
    Ok(match decision.requeue_after {
        Some(d) => Action::requeue(d),
        None if promoting => Action::requeue(Duration::from_secs(1)),
        None if report.changed() => Action::requeue(Duration::from_secs(5)),
        None if rolling => Action::requeue(roll::ROLL_POLL),
        None => Action::requeue(poll_interval(&lun)),
    })
}

/// `observed` with [`failover::Replica::passed_since_resync`] set: for each replica awaiting resync, this
/// process remembers the first pass time its agent reported while it waited, and counts a pass only once
/// the agent reports a later one. A replica no longer awaiting resync is forgotten.
fn resync_passes(
    ctx: &Context,
    lun_key: &str,
    status: &StorageLUNStatus,
    observed: &[failover::Replica],
) -> Vec<failover::Replica> {
    observed
        .iter()
        .map(|r| {
            let key = format!("{lun_key}/{}", r.name);
            let mut r = r.clone();
            if status.needs_resync.contains(&r.name) {
                let first =
                    ctx.resyncs
                        .since(&key, "resync", r.synced_at.unwrap_or(Timestamp::MIN));
                r.passed_since_resync = r.synced_at.is_some_and(|at| at > first);
            } else {
                ctx.resyncs.clear(&key);
            }
            r
        })
        .collect()
}

/// Sets [`failover::Replica::updated`]: a pod is on the current template when its
/// `controller-revision-hash` is the StatefulSet's `updateRevision`. Unknown (no StatefulSet status yet, or
/// one the StatefulSet controller has not caught up with) counts as updated: nothing is replaced on a guess.
fn mark_updated(observed: &mut [failover::Replica], sts: Option<&DynamicObject>, pods: &[Pod]) {
    let Some(sts) = sts else { return };
    let status = &sts.data["status"];
    let caught_up =
        status["observedGeneration"].as_i64().unwrap_or(0) >= sts.metadata.generation.unwrap_or(0);
    let Some(revision) = status["updateRevision"].as_str().filter(|_| caught_up) else {
        return;
    };
    for r in observed {
        let label = pods
            .iter()
            .find(|p| p.metadata.name.as_deref() == Some(r.name.as_str()))
            .and_then(|p| p.labels().get(STS_REVISION_LABEL).cloned());
        r.updated = label.is_none_or(|l| l == revision);
    }
}

/// The label the StatefulSet controller puts on each pod: the revision of the template it was made from.
const STS_REVISION_LABEL: &str = "controller-revision-hash";

/// Whether this LUN may replace pods now: every store StatefulSet of its MailPod with a lower LUN index
/// has all its pods on their template and ready ([`roll`]). Read only while a roll is pending.
async fn roll_gate_open(ctx: &Context, lun: &StorageLUN, ns: &str) -> Result<bool> {
    let Some(mine) = roll::lun_index(&lun.name_any()) else {
        return Ok(true);
    };
    let api: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), ns);
    let selector = format!(
        "{}={},{}={}",
        l::MAILPOD,
        lun.spec.mail_pod,
        l::COMPONENT,
        store::COMPONENT
    );
    let list = api
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(|source| Error::Read {
            what: format!("store StatefulSets of MailPod {}", lun.spec.mail_pod),
            source,
        })?;
    Ok(list
        .items
        .iter()
        .all(|sts| roll::lun_index(&sts.name_any()).is_none_or(|i| i >= mine) || roll::rolled(sts)))
}

/// Evicts store pod `name` (only the pod listed, by UID): the StatefulSet recreates it from its current
/// template. An eviction the cluster refuses for now (429, a disruption budget) is tried again later.
async fn evict(pods: &Api<Pod>, listed: &[Pod], name: &str) -> Result<()> {
    let uid = listed
        .iter()
        .find(|p| p.metadata.name.as_deref() == Some(name))
        .and_then(|p| p.metadata.uid.clone());
    let params = kube::api::EvictParams {
        delete_options: Some(kube::api::DeleteParams {
            preconditions: Some(kube::api::Preconditions {
                uid,
                resource_version: None,
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    match pods.evict(name, &params).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if [404, 409, 429].contains(&s.code) => {
            warn!(pod = %name, code = s.code, message = %s.message, "eviction not done now; tried again");
            Ok(())
        }
        Err(source) => Err(Error::Delete {
            kind: "Pod".into(),
            name: name.to_string(),
            source,
        }),
    }
}

/// Kinds never removed as orphans: the store StatefulSet is the mail service itself and goes only with
/// its LUN (by garbage collection, its volumes by `pvcRetention`).
const NEVER_ORPHANED: &[&str] = &["StatefulSet"];

/// Deletes the children the LUN no longer wants: the snapshot CronJob and its ServiceAccount, Role and
/// RoleBinding once snapshots are off, the doveadm Service once site replication is removed. Only an
/// object that is still the one listed (same UID) is deleted; each deletion is an Event.
async fn remove_orphans(
    ctx: &Context,
    lun: &StorageLUN,
    ns: &str,
    live: &LiveChildren,
    desired: &[crate::resources::Child],
) -> Result<()> {
    let mut deleted = vec![];
    for (kind, name, obj) in apply::orphans(live, desired) {
        if NEVER_ORPHANED.contains(&kind) {
            continue;
        }
        if apply::delete_child(&ctx.client, ns, obj).await? {
            deleted.push(format!("{kind}/{name}"));
        }
        if let Some(c) = ctx.children.get() {
            c.remove(kind, name, obj.metadata.uid.as_deref().unwrap_or_default());
        }
    }
    if !deleted.is_empty() {
        info!(lun = %lun.name_any(), deleted = %deleted.join(", "), "removed children no longer wanted");
        publish(
            ctx,
            lun,
            EventType::Normal,
            "Deleted",
            "Delete",
            format!("deleted {}", deleted.join(", ")),
        )
        .await;
    }
    Ok(())
}

/// Condition type, present while the LUN's children cannot be applied.
pub const APPLY_FAILED: &str = "ApplyFailed";

/// Sets or clears the [`APPLY_FAILED`] condition.
fn set_apply_condition(
    status: &mut StorageLUNStatus,
    failure: Option<&str>,
    generation: Option<i64>,
    now: Timestamp,
) {
    match failure {
        Some(e) => set_condition(
            &mut status.conditions,
            APPLY_FAILED,
            true,
            "ApplyFailed",
            truncate_note(e),
            generation,
            Time(now),
        ),
        None => status.conditions.retain(|c| c.type_ != APPLY_FAILED),
    }
}

/// Creates the LUN's generated Secrets once, each with a random value, and never updates them: a changed
/// value would cut off every pod that has not seen it yet.
/// - `<lun>-replication`: the doveadm password the LUN's replicas (and its restore jobs) share. A
///   SiteFailover's standby replaces it with the primary's, so both sites' replicas can reach each other.
/// - `<lun>-control`: the token the store agents' control port asks of every request (the snapshot jobs).
async fn ensure_generated_secrets(ctx: &Context, ns: &str, lun: &StorageLUN) -> Result<()> {
    let uid = lun.uid().unwrap_or_default();
    let seen = ctx
        .secrets_seen
        .lock()
        .expect("secrets-seen lock")
        .get(&uid)
        .is_some_and(|at| at.elapsed() < SECRETS_RECHECK);
    if seen {
        return Ok(());
    }
    let client = &ctx.client;
    for (name, key) in [
        (
            store::replication_secret(&lun.name_any()),
            store::REPLICATION_SECRET_KEY,
        ),
        (
            store::control_secret(&lun.name_any()),
            store::CONTROL_SECRET_KEY,
        ),
    ] {
        ensure_generated_secret(client, ns, lun, name, key).await?;
    }
    ctx.secrets_seen
        .lock()
        .expect("secrets-seen lock")
        .insert(uid, std::time::Instant::now());
    Ok(())
}

/// How long a LUN's generated Secrets, once seen, are taken to exist before they are read again (one
/// deleted by hand is recreated within this time).
pub const SECRETS_RECHECK: Duration = Duration::from_secs(600);

async fn ensure_generated_secret(
    client: &kube::Client,
    ns: &str,
    lun: &StorageLUN,
    name: String,
    key: &str,
) -> Result<()> {
    use k8s_openapi::api::core::v1::Secret;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let read = |source| Error::Read {
        what: format!("Secret {name}"),
        source,
    };
    if secrets.get_opt(&name).await.map_err(read)?.is_some() {
        return Ok(());
    }
    let mut bytes = [0u8; 24];
    getrandom::fill(&mut bytes).map_err(|e| Error::Random(e.to_string()))?;
    let mut labels = std::collections::BTreeMap::new();
    labels.insert(l::LUN.to_string(), lun.name_any());
    labels.insert(l::MAILPOD.to_string(), lun.spec.mail_pod.clone());
    labels.insert(l::MANAGED_BY.to_string(), l::MANAGER.to_string());
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(ns.to_string()),
            labels: Some(labels),
            owner_references: Some(vec![crate::resources::owner_reference(lun)]),
            ..Default::default()
        },
        string_data: Some([(key.to_string(), hex::encode(bytes))].into()),
        type_: Some("Opaque".into()),
        ..Default::default()
    };
    match secrets.create(&Default::default(), &secret).await {
        Ok(_) => Ok(()),
        // Created meanwhile (another reconcile, or the SiteFailover mirror): keep that one.
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(source) => Err(Error::Apply {
            kind: "Secret",
            name,
            source,
        }),
    }
}

/// Tells every replica where to pull from: the other site's endpoint while the LUN is fenced and has a
/// `spec.replicationSource` (a live standby site), otherwise nothing (the agent pulls from its own LUN's
/// active); and which refused pass a person confirmed (the LUN's [`deletion::CONFIRM`]). Only pods whose
/// annotations differ are patched, so a steady state writes nothing.
async fn point_replicas(pods: &Api<Pod>, lun: &StorageLUN, current: &[Pod]) -> Result<()> {
    let want = [
        (
            annotations::REPLICATION_SOURCE,
            lun.spec
                .replication_source
                .as_deref()
                .filter(|_| lun.spec.fenced),
        ),
        (
            deletion::CONFIRM,
            lun.annotations().get(deletion::CONFIRM).map(String::as_str),
        ),
    ];
    for pod in current
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
    {
        let differ: serde_json::Map<String, Value> = want
            .iter()
            .filter(|(key, value)| pod.annotations().get(*key).map(String::as_str) != *value)
            .map(|(key, value)| (key.to_string(), json!(value)))
            .collect();
        if differ.is_empty() {
            continue;
        }
        let name = pod.name_any();
        let patch = json!({ "metadata": { "annotations": differ } });
        match pods
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(source) => {
                return Err(Error::Apply {
                    kind: "Pod",
                    name,
                    source,
                })
            }
        }
    }
    Ok(())
}

/// Moves role labels (and writes the promotion mark) as decided. The promoted pod is labelled before
/// the old one is unlabelled only in the sense that both are in one pass; the Service never selects two
/// ready replicas because the old active is unready by the time it is replaced.
async fn actuate(pods: &Api<Pod>, d: &Decision) -> Result<()> {
    // Demotions first: the LUN's Service never selects two active replicas, not even between patches.
    let mut order: Vec<(&String, &Role)> = d.roles.iter().collect();
    order.sort_by_key(|(_, role)| **role == Role::Active);
    for (pod, role) in order {
        let mut patch = json!({ "metadata": { "labels": { l::ROLE: role.as_str() } } });
        if let Some((target, mark)) = &d.mark {
            if target == pod && *role == Role::Active {
                patch["metadata"]["annotations"] = json!({
                    annotations::PROMOTED_FROM: mark.from,
                    annotations::LOST_AT: mark.lost_at.to_string(),
                });
            }
        }
        match pods
            .patch(pod, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {}
            // Deleted between list and patch: its successor is labelled on the next pass.
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(source) => {
                return Err(Error::Apply {
                    kind: "Pod",
                    name: pod.clone(),
                    source,
                })
            }
        }
    }
    Ok(())
}

/// Pushes each store agent the role its label now has, where the agent acts in another (the label was
/// just moved, or an earlier push failed), on the agent's control port: the kubelet rewrites the pod's
/// downward-API labels file only on its next sync of the pod, and until then a promoted store refuses
/// logins and a demoted one still takes writes. Demotions go first; the new active is pushed only once
/// every other replica has answered that it takes no writes (a demotion is enforced before the agent
/// answers), so a push never lets two replicas write: a replica that cannot be asked (a lost active) leaves
/// the promotion to the label, as before. Best effort: the labels stay the truth, a failed push is logged
/// and tried again on the next pass, and a steady state asks nothing.
async fn push_roles(
    ctx: &Context,
    ns: &str,
    lun: &str,
    pods: &[Pod],
    observed: &[failover::Replica],
    d: &Decision,
    reports: &std::collections::BTreeMap<String, reports::ReplicationReport>,
) {
    let label = |r: &failover::Replica| d.roles.get(&r.name).copied().or(r.role);
    let acts_in = |r: &failover::Replica| reports.get(&r.name).and_then(|p| p.role.clone());
    let behind: Vec<(&failover::Replica, Role)> = observed
        .iter()
        .filter_map(|r| label(r).map(|role| (r, role)))
        .filter(|(r, role)| {
            reports.contains_key(&r.name) && acts_in(r).as_deref() != Some(role.as_str())
        })
        .collect();
    if behind.is_empty() {
        return;
    }
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(ctx.client.clone(), ns);
    let token = match secrets.get_opt(&store::control_secret(lun)).await {
        Ok(Some(s)) => s
            .data
            .and_then(|d| d.get(store::CONTROL_SECRET_KEY).cloned())
            .map(|b| String::from_utf8_lossy(&b.0).trim().to_string()),
        Ok(None) => None,
        Err(e) => {
            warn!(lun, error = %e, "reading the control token to push roles");
            return;
        }
    };
    let Some(token) = token else {
        warn!(lun, "no control token yet: roles follow the labels alone");
        return;
    };
    let mut takes_writes: std::collections::BTreeMap<&str, bool> = observed
        .iter()
        .map(|r| {
            let writes = reports.get(&r.name).is_none_or(|p| p.accepts_writes);
            (r.name.as_str(), writes)
        })
        .collect();
    async fn push(
        ctx: &Context,
        pods: &[Pod],
        name: &str,
        role: Role,
        token: &str,
    ) -> Result<bool, String> {
        let Some(p) = pods.iter().find(|p| p.name_any() == name) else {
            return Err(format!("pod {name} is gone"));
        };
        ctx.replication.push_role(p, role.as_str(), token).await
    }
    for (r, role) in behind.iter().filter(|(_, role)| *role != Role::Active) {
        match push(ctx, pods, &r.name, *role, &token).await {
            Ok(writes) => {
                info!(lun, pod = %r.name, role = role.as_str(), writes, "role pushed");
                takes_writes.insert(r.name.as_str(), writes);
            }
            Err(e) => {
                warn!(lun, pod = %r.name, role = role.as_str(), error = %e, "pushing the role")
            }
        }
    }
    for (r, _) in behind.iter().filter(|(_, role)| *role == Role::Active) {
        let others_write: Vec<&str> = takes_writes
            .iter()
            .filter(|(n, writes)| **n != r.name && **writes)
            .map(|(n, _)| *n)
            .collect();
        if !others_write.is_empty() {
            info!(lun, pod = %r.name, ?others_write, "not pushing active while another replica may write");
            continue;
        }
        match push(ctx, pods, &r.name, Role::Active, &token).await {
            Ok(writes) => info!(lun, pod = %r.name, writes, "role pushed: active"),
            Err(e) => warn!(lun, pod = %r.name, error = %e, "pushing the role: active"),
        }
    }
}

fn compute_status(
    lun: &StorageLUN,
    current: &StorageLUNStatus,
    d: &Decision,
    observed: &[failover::Replica],
    replication_issue: Option<String>,
    now: Timestamp,
) -> StorageLUNStatus {
    let generation = lun.metadata.generation;
    let t = Time(now);
    let mut s = current.clone();
    s.observed_generation = generation;
    s.users = lun.spec.mailboxes.len() as i32;
    s.target_active = d.target_active.clone();
    s.current_active = d.current_active.clone();
    s.needs_resync = d.needs_resync.clone();
    s.last_promotion = d.last_promotion.clone();
    // Lag in coarse steps: status changes when a standby falls behind, not as time passes.
    let floor = replicas::STALE_INTERVALS * f64::from(lun.spec.replication.sync_interval_seconds);
    s.replicas = observed
        .iter()
        .map(|r| {
            let active = d.current_active.as_deref() == Some(r.name.as_str());
            ReplicaStatus {
                name: r.name.clone(),
                role: if active { Role::Active } else { Role::Standby }
                    .as_str()
                    .into(),
                ready: r.ready,
                lag_seconds: if active {
                    None
                } else {
                    r.lag_seconds.map(|l| replicas::lag_bucket(l, floor))
                },
            }
        })
        .collect();
    s.replication_lag_seconds = s
        .replicas
        .iter()
        .filter_map(|r| r.lag_seconds)
        .reduce(f64::max);
    let c = &mut s.conditions;
    match &d.degraded {
        Some((reason, message)) => set_condition(
            c,
            condition::DEGRADED,
            true,
            reason,
            message.clone(),
            generation,
            t.clone(),
        ),
        None => set_condition(
            c,
            condition::DEGRADED,
            false,
            "Serving",
            "an active replica serves",
            generation,
            t.clone(),
        ),
    }
    match (&replication_issue, &d.degraded) {
        (Some(issue), _) => set_condition(
            c,
            condition::READY,
            false,
            "ReplicationUnavailable",
            issue.clone(),
            generation,
            t.clone(),
        ),
        (None, Some((reason, message))) => set_condition(
            c,
            condition::READY,
            false,
            reason,
            message.clone(),
            generation,
            t.clone(),
        ),
        (None, None) => set_condition(
            c,
            condition::READY,
            true,
            "Serving",
            format!("{} serves", d.current_active.as_deref().unwrap_or_default()),
            generation,
            t.clone(),
        ),
    }
    let progressing = d.target_active != d.current_active;
    set_condition(
        c,
        condition::PROGRESSING,
        progressing,
        if progressing {
            failover::REASON_PROMOTING
        } else {
            "Settled"
        },
        if progressing {
            "promotion in progress"
        } else {
            "roles settled"
        },
        generation,
        t,
    );
    s
}

/// Writes the owned part of `status` when it differs from what is stored ([`apply::apply_status`]).
async fn write_status(
    ctx: &Context,
    lun: &StorageLUN,
    current: &StorageLUNStatus,
    status: &StorageLUNStatus,
) -> Result<bool> {
    if current == status {
        return Ok(false);
    }
    let body = serde_json::to_value(status).map_err(|source| Error::Decode {
        what: format!("status of StorageLUN {}", lun.name_any()),
        source,
    })?;
    let api: Api<StorageLUN> =
        Api::namespaced(ctx.client.clone(), &lun.namespace().unwrap_or_default());
    apply::apply_status(
        &api,
        &lun.name_any(),
        FIELD_MANAGER,
        &body,
        OWNED_STATUS_FIELDS,
    )
    .await
    .map_err(|source| Error::Status { source })?;
    Ok(true)
}

/// An invalid spec: Ready=False naming the field, children and pods left as they are, no retry until the
/// LUN changes.
async fn reject(ctx: &Context, lun: &StorageLUN, errs: ValidationErrors) -> Result<Action> {
    let current = lun.status.clone().unwrap_or_default();
    let mut status = current.clone();
    let generation = lun.metadata.generation;
    status.observed_generation = generation;
    let message = truncate_note(&errs.to_string());
    let now = Time(ctx.clock.now());
    set_condition(
        &mut status.conditions,
        condition::READY,
        false,
        condition::REASON_INVALID_SPEC,
        message,
        generation,
        now.clone(),
    );
    set_condition(
        &mut status.conditions,
        condition::PROGRESSING,
        false,
        condition::REASON_INVALID_SPEC,
        "waiting for a valid spec; existing objects are left as they are",
        generation,
        now,
    );
    if write_status(ctx, lun, &current, &status).await? {
        publish(
            ctx,
            lun,
            EventType::Warning,
            "InvalidSpec",
            "Validate",
            errs.to_string(),
        )
        .await;
    }
    info!(lun = %lun.name_any(), field = errs.first_path().unwrap_or("spec"), "invalid spec; objects left untouched");
    ctx.stats
        .invalid
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Ok(Action::await_change())
}

/// Transient failures are retried with the shared per-object backoff; an invalid spec waits for a change.
pub fn error_policy(lun: Arc<StorageLUN>, error: &Error, ctx: Arc<Context>) -> Action {
    let delay = super::mailpod::backoff(ctx.record_failure(lun.as_ref()));
    warn!(lun = %lun.name_any(), error = %error, kind = error.metric_label(), "reconcile failed");
    ctx.stats
        .failures
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    match error {
        Error::InvalidSpec(_) => Action::await_change(),
        _ => Action::requeue(delay),
    }
}

/// Event notes are limited to 1 KiB by the API server.
pub fn truncate_note(note: &str) -> String {
    const MAX: usize = 1024;
    if note.len() <= MAX {
        return note.to_string();
    }
    let mut end = MAX - 3;
    while !note.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &note[..end])
}

/// Runs the StorageLUN controller until `shutdown` resolves. Store pods are watched too: readiness and the
/// agent's replication reports arrive as pod changes, mapped to their LUN by the `mailpod.io/lun` label.
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    use futures::StreamExt;
    use kube::runtime::reflector::ObjectRef;
    use kube::runtime::{watcher, Controller, WatchStreamExt};
    let client = ctx.client.clone();
    let luns: Api<StorageLUN> = match &namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let pods: Api<Pod> = match &namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    // Only what this operator labels as a LUN's: its children, and pods of a StorageLUN (whatever else in
    // the cluster is called a "store").
    let store_pods = watcher::Config::default().labels(l::LUN).any_semantic();
    let own_children = watcher::Config::default()
        .labels(&format!("{},{}={}", l::LUN, l::MANAGED_BY, l::MANAGER))
        .any_semantic();
    // The LUN's own status writes (and the snapshot job's) do not bring another reconcile; the agents
    // are polled on the requeue timer instead.
    let (cache, writer) = kube::runtime::reflector::store();
    let own = super::changes_that_matter(
        watcher(luns, watcher::Config::default().any_semantic())
            .modify(super::strip_managed_fields)
            .default_backoff()
            .reflect(writer),
        super::spec_and_metadata,
    );
    let controller = Controller::for_stream(own, cache.clone());
    ctx.stats.set_managed(move || cache.state().len());
    // The LUN's children, watched and cached (metadata only but for the StatefulSet), so a steady-state
    // reconcile lists none of them.
    let kinds = lun_child_kinds();
    let child_cache = Arc::new(super::cache::ChildCache::new(&kinds));
    let _ = ctx.children.set(child_cache.clone());
    let ns = namespace.as_deref();
    use super::cached;
    use kube::core::PartialObjectMeta;
    controller
        .owns_stream(cached::<PartialObjectMeta<ServiceAccount>, ServiceAccount>(
            &client,
            ns,
            &own_children,
            &child_cache,
        ))
        .owns_stream(cached::<PartialObjectMeta<RbacRole>, RbacRole>(
            &client,
            ns,
            &own_children,
            &child_cache,
        ))
        .owns_stream(cached::<PartialObjectMeta<RoleBinding>, RoleBinding>(
            &client,
            ns,
            &own_children,
            &child_cache,
        ))
        .owns_stream(cached::<PartialObjectMeta<Service>, Service>(
            &client,
            ns,
            &own_children,
            &child_cache,
        ))
        .owns_stream(cached::<PartialObjectMeta<CronJob>, CronJob>(
            &client,
            ns,
            &own_children,
            &child_cache,
        ))
        .owns_stream(cached::<StatefulSet, StatefulSet>(
            &client,
            ns,
            &own_children,
            &child_cache,
        ))
        .watches(pods, store_pods, |pod: Pod| {
            let lun = pod.labels().get(l::LUN).cloned();
            lun.map(|name| ObjectRef::new(&name).within(&pod.namespace().unwrap_or_default()))
        })
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|_| futures::future::ready(()))
        .await;
}
