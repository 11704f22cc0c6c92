//! The MailPod reconciler: dereference → validate → read placement → build → apply → remove orphans → status.
//! Only the ends talk to the API server; `build` is the pure builder that `render` runs too.

use crate::controller::publish;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::{debug, info, warn};

use super::apply::{self, LiveChildren};
use super::confirm;
use super::error::{Error, Result};
use super::status::{self, Observed};
use super::Context;
use crate::crd::{MailPod, MailPodStatus, MailboxSource, StorageLUN, ValidationErrors};
use crate::names::{labels, FIELD_MANAGER};
use crate::placement::{self, LunAssignment};
use crate::resources::{self, lun::assignments, mailboxes, Child};

/// How often a converged MailPod is looked at again even with no event (a safety net, not the trigger).
pub const RESYNC: Duration = Duration::from_secs(300);

/// The text of every mailbox source a spec references, fetched once per reconcile.
/// Key: (`ConfigMap`|`Secret`, name, key); `None` when the object or key does not exist.
type Sources = BTreeMap<(&'static str, String, String), Option<String>>;

/// Whether a mailbox source carries [`labels::MAILBOX_SOURCE`], without which the operator does not watch it.
fn watched(meta: &kube::api::ObjectMeta) -> bool {
    meta.labels
        .as_ref()
        .and_then(|l| l.get(labels::MAILBOX_SOURCE))
        .is_some_and(|v| v == "true")
}

/// The referenced sources' text, and those that exist but are not labelled to be watched
/// (`ConfigMap name`, `Secret name`): read all the same, by name, on every reconcile.
async fn fetch_sources(ctx: &Context, ns: &str, mp: &MailPod) -> Result<(Sources, Vec<String>)> {
    let mut objects: BTreeMap<(&'static str, String), Option<BTreeMap<String, String>>> =
        BTreeMap::new();
    let mut sources = Sources::new();
    let mut unwatched = vec![];
    for src in &mp.spec.mailboxes.from {
        let (kind, r) = match (&src.config_map, &src.secret) {
            (Some(r), _) => ("ConfigMap", r),
            (None, Some(r)) => ("Secret", r),
            (None, None) => continue,
        };
        let key = (kind, r.name.clone());
        if !objects.contains_key(&key) {
            let data = match kind {
                "ConfigMap" => {
                    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), ns);
                    api.get_opt(&r.name)
                        .await
                        .map_err(|source| Error::Read {
                            what: format!("ConfigMap {}", r.name),
                            source,
                        })?
                        .map(|cm| {
                            if !watched(&cm.metadata) {
                                unwatched.push(format!("ConfigMap {}", r.name));
                            }
                            cm.data.unwrap_or_default()
                        })
                }
                _ => {
                    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
                    api.get_opt(&r.name)
                        .await
                        .map_err(|source| Error::Read {
                            what: format!("Secret {}", r.name),
                            source,
                        })?
                        .map(|s| {
                            if !ctx.config.watch_secret_sources {
                                unwatched.push(format!(
                                    "Secret {} (Secrets are not watched: --watch-secret-sources=false)",
                                    r.name
                                ));
                            } else if !watched(&s.metadata) {
                                unwatched.push(format!("Secret {}", r.name));
                            }
                            s.data
                                .unwrap_or_default()
                                .into_iter()
                                .map(|(k, v)| (k, String::from_utf8_lossy(&v.0).into_owned()))
                                .collect()
                        })
                }
            };
            objects.insert(key.clone(), data);
        }
        let text = objects[&key].as_ref().and_then(|d| d.get(&r.key).cloned());
        sources.insert((kind, r.name.clone(), r.key.clone()), text);
    }
    Ok((sources, unwatched))
}

/// Sets the [`status::SOURCES_WATCHED`] condition: false, naming the label to add, while a source is
/// read only by name.
fn set_sources_watched(status: &mut MailPodStatus, unwatched: &[String], mp: &MailPod) {
    let (ok, reason, message) = if unwatched.is_empty() {
        (
            true,
            "Labelled",
            "every mailbox source is watched".to_string(),
        )
    } else {
        (
            false,
            status::REASON_SOURCE_NOT_LABELLED,
            format!(
                "not watched: {}; read on each reconcile, but a change is seen only at the next resync \
                 (up to {} s); label mailbox sources {}=true so changes apply at once",
                unwatched.join(", "),
                RESYNC.as_secs(),
                labels::MAILBOX_SOURCE,
            ),
        )
    };
    crate::crd::set_condition(
        &mut status.conditions,
        status::SOURCES_WATCHED,
        ok,
        reason,
        message,
        mp.metadata.generation,
        now(),
    );
}

fn lookup(sources: &Sources) -> impl Fn(&MailboxSource) -> Option<String> + '_ {
    move |src: &MailboxSource| {
        let (kind, r) = match (&src.config_map, &src.secret) {
            (Some(r), _) => ("ConfigMap", r),
            (None, Some(r)) => ("Secret", r),
            (None, None) => return None,
        };
        sources
            .get(&(kind, r.name.clone(), r.key.clone()))
            .cloned()
            .flatten()
    }
}

fn now() -> Time {
    Time(jiff::Timestamp::now())
}

/// Writes `status` by Server-Side Apply on the status subresource, unless it equals what is stored.
async fn write_status(ctx: &Context, mp: &MailPod, status: MailPodStatus) -> Result<bool> {
    if mp.status.as_ref() == Some(&status) {
        return Ok(false);
    }
    let ns = mp.namespace().unwrap_or_default();
    let api: Api<MailPod> = Api::namespaced(ctx.client.clone(), &ns);
    let body = json!({
        "apiVersion": MailPod::api_version(&()),
        "kind": MailPod::kind(&()),
        "status": status,
    });
    api.patch_status(
        &mp.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await
    .map_err(|source| Error::Status { source })?;
    Ok(true)
}

/// An invalid spec: report it and leave every child as it is. No error, so no retry: the MailPod (or a
/// watched mailbox source) changing is what brings the next reconcile.
/// The LUN template's capacity and storage class as the existing LUNs were made with them: their store
/// StatefulSets' volumeClaimTemplates cannot change, so a different value is refused here too (the CRD's
/// transition rules refuse it at the API server, unless the CRDs predate them), naming the field, before
/// anything is applied. Grow a LUN by expanding its PVCs.
pub fn volumes_unchanged(
    mp: &MailPod,
    luns: &[StorageLUN],
) -> std::result::Result<(), ValidationErrors> {
    let t = &mp.spec.backend.lun_template;
    let mut errs = ValidationErrors::default();
    if let Some(l) = luns.iter().find(|l| l.spec.capacity != t.capacity) {
        errs.push(
            "spec.backend.lunTemplate.capacity",
            format!(
                "is {} but StorageLUN {} was made with {}: the store volumes' size cannot change here; \
                 set it back, and expand the PVCs to grow a LUN",
                t.capacity,
                l.name_any(),
                l.spec.capacity
            ),
        );
    }
    if let Some(l) = luns
        .iter()
        .find(|l| l.spec.storage_class_name != t.storage_class_name)
    {
        let show = |c: &Option<String>| c.clone().unwrap_or_else(|| "(the default)".into());
        errs.push(
            "spec.backend.lunTemplate.storageClassName",
            format!(
                "is {} but StorageLUN {} was made with {}: the store volumes' class cannot change",
                show(&t.storage_class_name),
                l.name_any(),
                show(&l.spec.storage_class_name)
            ),
        );
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs)
    }
}

async fn reject(ctx: &Context, mp: &MailPod, errs: ValidationErrors) -> Result<Action> {
    let status = status::invalid(mp, &errs, now());
    let first = errs.first_path().unwrap_or("spec").to_string();
    if write_status(ctx, mp, status).await? {
        publish(
            ctx,
            mp,
            EventType::Warning,
            "InvalidSpec",
            "Validate",
            errs.to_string(),
        )
        .await;
    }
    info!(mailpod = %mp.name_any(), field = %first, "invalid spec; children left untouched");
    ctx.stats
        .invalid
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Ok(Action::await_change())
}

/// A large removal of mailboxes waiting for confirmation: reported, every child left as it is, no retry
/// until the MailPod (its confirmation annotation) or a mailbox source changes.
async fn hold_removal(
    ctx: &Context,
    mp: &MailPod,
    removal: confirm::LargeRemoval,
) -> Result<Action> {
    let message = removal.message();
    let status = status::refused(
        mp,
        confirm::REASON_REMOVAL_UNCONFIRMED,
        &message,
        "waiting for the removal to be confirmed; existing children are left as they are",
        now(),
    );
    if write_status(ctx, mp, status).await? {
        publish(
            ctx,
            mp,
            EventType::Warning,
            confirm::REASON_REMOVAL_UNCONFIRMED,
            "Validate",
            message,
        )
        .await;
    }
    info!(mailpod = %mp.name_any(), removed = removal.removed, of = removal.current, "large mailbox removal held for confirmation");
    Ok(Action::await_change())
}

/// Reconciles one MailPod to its spec.
pub async fn reconcile(mp: Arc<MailPod>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.stats.start_reconcile();
    let name = mp.name_any();
    if mp.meta().deletion_timestamp.is_some() {
        // Children go with it through their owner references; nothing to do.
        ctx.applied.forget(&mp.uid().unwrap_or_default());
        return Ok(Action::await_change());
    }
    let ns = mp
        .namespace()
        .ok_or_else(|| Error::MissingNamespace(format!("MailPod {name}")))?;
    let uid = mp.uid().unwrap_or_default();

    // Dereference and validate.
    let (sources, unwatched) = fetch_sources(&ctx, &ns, &mp).await?;
    let wanted = match mailboxes::validate_and_resolve(&mp, &lookup(&sources)) {
        Ok(m) => m,
        Err(errs) => return reject(&ctx, &mp, errs).await,
    };

    // Current children, and the placement they record.
    let selector = format!("{}={name}", labels::MAILPOD);
    let kinds = apply::mailpod_child_kinds();
    // From the controller's cache once it holds every kind; listed when there is none yet.
    let cache = ctx.children.get().filter(|c| c.synced());
    let live = match cache {
        Some(c) => c.live(&uid, &kinds),
        None => LiveChildren::list(&ctx.client, &ns, &kinds, &selector, &uid).await?,
    };
    let live_luns: Vec<StorageLUN> = live.typed()?;
    if let Err(errs) = volumes_unchanged(&mp, &live_luns) {
        return reject(&ctx, &mp, errs).await;
    }
    let known = match resources::lun::recorded_incarnations(&live_luns) {
        Ok(k) => k,
        Err((path, message)) => {
            let mut errs = ValidationErrors::default();
            errs.push(path, message);
            return reject(&ctx, &mp, errs).await;
        }
    };
    let existing = assignments(&live_luns, &known);
    let current: BTreeSet<String> = existing
        .iter()
        .flat_map(|a| a.mailboxes.iter().cloned())
        .collect();
    if let Some(removal) = confirm::unconfirmed_large_removal(&mp, &current, &wanted) {
        return hold_removal(&ctx, &mp, removal).await;
    }

    // A re-added mailbox goes back to the LUN that still holds its Maildir.
    let remembered: BTreeMap<u32, Vec<String>> = live_luns
        .iter()
        .map(|l| {
            let list = placement::parse_remembered(
                l.annotations()
                    .get(placement::REMOVED_MAILBOXES)
                    .map(String::as_str),
            );
            (l.spec.index, list)
        })
        .filter(|(_, list)| !list.is_empty())
        .collect();
    let mut returning = existing.clone();
    placement::return_remembered(
        &mut returning,
        &remembered,
        &known,
        &wanted,
        mp.spec.backend.max_users_per_lun,
    );

    // Build (pure).
    let mut desired =
        match resources::mailpod::build(&mp, &wanted, &returning, &ctx.config.defaults()) {
            Ok(d) => d,
            Err(errs) => return reject(&ctx, &mp, errs).await,
        };
    let memory = placement::remember_removed(&existing, &remembered, &desired.placement);
    let incarnations = placement::record_incarnations(&desired.placement, &known, &memory);
    for child in &mut desired.children {
        if let Child::StorageLUN(lun) = child {
            remember_on(lun, &memory, &incarnations);
        }
    }

    // The DKIM keys before the pods that mount them.
    let dkim_records = match super::dkim::ensure_keys(&ctx.client, &ns, &mp).await? {
        super::dkim::Keys::Off => vec![],
        super::dkim::Keys::Records(r) => r,
        super::dkim::Keys::Invalid(errs) => return reject(&ctx, &mp, errs).await,
    };

    // Apply, in the builders' order.
    let report = apply::apply_children(
        &ctx.client,
        &ns,
        &desired.children,
        &live,
        &ctx.applied,
        &uid,
    )
    .await?;
    remember_applied(cache, &report);

    // Orphans: owned children no longer desired.
    let mut deleted = vec![];
    let mut drained = vec![];
    let mut awaiting_deletion = vec![];
    for (kind, child, obj) in apply::orphans(&live, &desired.children) {
        if kind == "StorageLUN" {
            // A LUN goes only once it holds no mailboxes: first emptied (its store stops being a target),
            // deleted on a later pass. Its PVCs follow the LUN's pvcRetention (kept by default).
            let lun = live_luns.iter().find(|l| l.name_any() == child);
            if let Some(lun) = lun.filter(|l| !l.spec.mailboxes.is_empty()) {
                let empty = LunAssignment {
                    index: lun.spec.index,
                    ..Default::default()
                };
                let bctx = resources::mailpod::Context::new(&mp, &ctx.config.defaults());
                let mut emptied = resources::lun::build(&bctx, &empty);
                remember_on(&mut emptied, &memory, &incarnations);
                // Its volumes keep the mail: deleting it later needs a person's confirmation.
                emptied
                    .metadata
                    .annotations
                    .get_or_insert_with(Default::default)
                    .insert(confirm::HELD_MAIL.to_string(), "true".to_string());
                let emptied = Child::StorageLUN(emptied);
                let r =
                    apply::apply_children(&ctx.client, &ns, &[emptied], &live, &ctx.applied, &uid)
                        .await?;
                remember_applied(cache, &r);
                drained.extend(r.updated);
                continue;
            }
            if lun.is_some_and(|l| !confirm::may_delete_lun(l)) {
                awaiting_deletion.push(child.to_string());
                continue;
            }
        }
        if apply::delete_child(&ctx.client, &ns, obj).await? {
            deleted.push(format!("{kind}/{child}"));
        }
        if let Some(c) = cache {
            c.remove(kind, child, obj.metadata.uid.as_deref().unwrap_or_default());
        }
    }

    let changed = report.changed() || !deleted.is_empty() || !drained.is_empty();
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
            mp.as_ref(),
            EventType::Normal,
            "Applied",
            "Apply",
            parts.join("; "),
        )
        .await;
    }
    if !deleted.is_empty() || !drained.is_empty() {
        let mut parts = vec![];
        if !deleted.is_empty() {
            parts.push(format!("deleted {}", deleted.join(", ")));
        }
        if !drained.is_empty() {
            parts.push(format!(
                "emptied {} (deleted on the next pass)",
                drained.join(", ")
            ));
        }
        publish(
            &ctx,
            mp.as_ref(),
            EventType::Normal,
            "Deleted",
            "Delete",
            parts.join("; "),
        )
        .await;
    }

    // Status from what the cluster reports.
    let statefulsets: Vec<StatefulSet> = live.typed()?;
    let mut status = status::compute(
        &Observed {
            mailpod: &mp,
            placement: &desired.placement,
            tables_hash: &desired.tables_hash,
            statefulsets: &statefulsets,
            luns: &live_luns,
            changed,
            awaiting_deletion: &awaiting_deletion,
        },
        now(),
    );
    let newly_awaiting = !awaiting_deletion.is_empty()
        && condition_message(mp.status.as_ref(), status::AWAITING_CONFIRMATION)
            != condition_message(Some(&status), status::AWAITING_CONFIRMATION);
    let message = condition_message(Some(&status), status::AWAITING_CONFIRMATION);
    status.dkim = dkim_records;
    set_sources_watched(&mut status, &unwatched, &mp);
    let unwatched_message = (!unwatched.is_empty())
        .then(|| condition_message(Some(&status), status::SOURCES_WATCHED))
        .flatten()
        .filter(|m| {
            condition_message(mp.status.as_ref(), status::SOURCES_WATCHED).as_ref() != Some(m)
        });
    write_status(&ctx, &mp, status.clone()).await?;
    if let Some(note) = unwatched_message {
        publish(
            &ctx,
            mp.as_ref(),
            EventType::Warning,
            status::REASON_SOURCE_NOT_LABELLED,
            "Reconcile",
            note,
        )
        .await;
    }
    if newly_awaiting {
        publish(
            &ctx,
            mp.as_ref(),
            EventType::Warning,
            "LunDeletionUnconfirmed",
            "Delete",
            message.unwrap_or_default(),
        )
        .await;
    }
    debug!(
        mailpod = %name,
        created = report.created.len(),
        updated = report.updated.len(),
        unchanged = report.unchanged,
        deleted = deleted.len(),
        "reconciled"
    );
    ctx.reset_failures(mp.as_ref());
    // Changes roll out through the owned children's watch events; this is only a safety net.
    Ok(if changed || !drained.is_empty() {
        Action::requeue(Duration::from_secs(5))
    } else {
        Action::requeue(RESYNC)
    })
}

/// Puts what this reconcile applied into the controller's cache of children, so the next reconcile
/// does not apply it again before its watch event arrives.
fn remember_applied(cache: Option<&Arc<super::cache::ChildCache>>, report: &apply::ApplyReport) {
    super::cache::remember(cache, report, &apply::mailpod_child_kinds());
}

fn condition_message(status: Option<&MailPodStatus>, type_: &str) -> Option<String> {
    status?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.message.clone())
}

/// Writes on `lun` the removed mailboxes it remembers and the incarnations it records (see
/// [`placement::REMOVED_MAILBOXES`] and [`placement::MAILBOX_INCARNATIONS`]).
fn remember_on(
    lun: &mut StorageLUN,
    memory: &BTreeMap<u32, Vec<String>>,
    incarnations: &BTreeMap<u32, BTreeMap<String, u32>>,
) {
    let index = lun.spec.index;
    let values = [
        (
            placement::REMOVED_MAILBOXES,
            memory
                .get(&index)
                .and_then(|list| placement::format_remembered(list)),
        ),
        (
            placement::MAILBOX_INCARNATIONS,
            incarnations
                .get(&index)
                .and_then(placement::format_incarnations),
        ),
    ];
    for (key, value) in values {
        if let Some(value) = value {
            lun.metadata
                .annotations
                .get_or_insert_with(Default::default)
                .insert(key.to_string(), value);
        }
    }
}

/// Transient failures (API errors, timeouts) are retried with a per-object exponential backoff.
pub fn error_policy(mp: Arc<MailPod>, error: &Error, ctx: Arc<Context>) -> Action {
    let failures = ctx.record_failure(mp.as_ref());
    let delay = backoff(failures);
    warn!(
        mailpod = %mp.name_any(),
        error = %error,
        kind = error.metric_label(),
        retry_in_ms = delay.as_millis() as u64,
        "reconcile failed"
    );
    ctx.stats
        .failures
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    match error {
        Error::InvalidSpec(_) => Action::await_change(),
        _ => Action::requeue(delay),
    }
}

/// 0.5 s, 1 s, 2 s, … capped at 5 minutes.
pub fn backoff(failures: u32) -> Duration {
    let ms = 500u64.saturating_mul(1u64 << failures.saturating_sub(1).min(20));
    Duration::from_millis(ms.min(300_000))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        assert_eq!(backoff(1), Duration::from_millis(500));
        assert_eq!(backoff(2), Duration::from_secs(1));
        assert_eq!(backoff(4), Duration::from_secs(4));
        assert_eq!(backoff(40), Duration::from_secs(300));
    }
}
