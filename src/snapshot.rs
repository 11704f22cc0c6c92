//! `mailpod-operator snapshot --lun NAME`: a consistent, online snapshot of a LUN's active replica.
//!
//! Order: check everything that can be checked without touching delivery (LUN, snapshot CRDs, class,
//! active replica) -> pause LMTP on the active replica (Postfix gets 4xx and keeps the mail queued) ->
//! create the VolumeSnapshot -> wait until it is cut (`status.creationTime`: later writes are not in it) ->
//! **resume, whatever happened** -> wait for readyToUse (uploading may take long; delivery runs meanwhile)
//! -> prune to `retain` -> record in the LUN's status and as an Event.
//!
//! Resume runs after the paused step whether it succeeded, failed, timed out, panicked or the job was told
//! to stop (SIGTERM from the Job's deadline). The pause request itself carries a deadline (the LUN's
//! `maxPauseSeconds`), after which the agent resumes by itself should this process die outright.

pub mod agent;
pub mod volume;

use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use futures::FutureExt;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, PostParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;

use crate::crd::{SnapshotRecord, SnapshotResult, StorageLUN};
use crate::names::{self, labels as l};
pub use agent::{HttpAgent, StoreAgent, CONTROL_TOKEN_ENV};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("StorageLUN {namespace}/{name} not found")]
    LunNotFound { namespace: String, name: String },
    #[error("StorageLUN {0}: snapshots are disabled (spec.snapshots.enabled=false)")]
    Disabled(String),
    #[error("VolumeSnapshot (snapshot.storage.k8s.io/v1) is not served by this cluster: install the external-snapshotter CRDs and snapshot controller")]
    SnapshotCrdMissing,
    #[error("VolumeSnapshotClass `{0}` not found")]
    ClassNotFound(String),
    #[error("no VolumeSnapshotClass named (--volume-snapshot-class or spec.snapshots.volumeSnapshotClassName) and none is marked default ({} = \"true\")", volume::DEFAULT_CLASS_ANNOTATION)]
    NoDefaultClass,
    #[error("StorageLUN {lun} has no active replica to snapshot: {reason}")]
    NoActive { lun: String, reason: String },
    #[error("pausing delivery on {pod}: {message}")]
    Pause { pod: String, message: String },
    #[error("resuming delivery on {pod} failed ({message}); its agent resumes by itself {deadline_seconds}s after the pause began")]
    Resume {
        pod: String,
        message: String,
        deadline_seconds: u32,
    },
    #[error("VolumeSnapshot {name} was not cut within {seconds}s while delivery was paused")]
    CutTimeout { name: String, seconds: u64 },
    #[error("VolumeSnapshot {name} failed: {message}")]
    SnapshotFailed { name: String, message: String },
    #[error("VolumeSnapshot {name} was not readyToUse within {seconds}s")]
    ReadyTimeout { name: String, seconds: u64 },
    #[error("interrupted while delivery was paused (delivery resumed)")]
    Interrupted,
    #[error("snapshot step panicked (delivery resumed): {0}")]
    Panicked(String),
    #[error("{context}: {source}")]
    Api {
        context: String,
        #[source]
        source: kube::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn api(context: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
    let context = context.into();
    move |source| Error::Api { context, source }
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

/// What one run is asked to do.
#[derive(Clone, Debug)]
pub struct Options {
    pub namespace: String,
    pub lun: String,
    /// Overrides `spec.snapshots.volumeSnapshotClassName`.
    pub volume_snapshot_class: Option<String>,
    /// How long to wait for readyToUse after delivery resumed.
    pub timeout: Duration,
    /// How often to look at the VolumeSnapshot while waiting.
    pub poll: Duration,
    /// How long delivery may stay paused waiting for the cut; three quarters of `maxPauseSeconds` when
    /// unset, so resume always comes before the agent's own deadline.
    pub cut_timeout: Option<Duration>,
    /// Check that the VolumeSnapshotClass exists before pausing delivery. The snapshot job skips it: its
    /// namespaced Role cannot read the cluster-scoped classes, the operator checks the class it names, and
    /// the snapshot controller reports a bad one on the VolumeSnapshot.
    pub check_class: bool,
}

impl Options {
    pub fn new(namespace: impl Into<String>, lun: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            lun: lun.into(),
            volume_snapshot_class: None,
            timeout: Duration::from_secs(600),
            poll: Duration::from_secs(1),
            cut_timeout: None,
            check_class: true,
        }
    }
}

/// A snapshot taken.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    pub name: String,
    pub pause: Duration,
    pub pruned: Vec<String>,
}

/// Takes one snapshot of `opts.lun`, records the result on the LUN and as an Event.
pub async fn run(client: &Client, agent: &dyn StoreAgent, opts: &Options) -> Result<Outcome> {
    let luns: Api<StorageLUN> = Api::namespaced(client.clone(), &opts.namespace);
    let lun = luns
        .get_opt(&opts.lun)
        .await
        .map_err(api(format!(
            "reading StorageLUN {}/{}",
            opts.namespace, opts.lun
        )))?
        .ok_or_else(|| Error::LunNotFound {
            namespace: opts.namespace.clone(),
            name: opts.lun.clone(),
        })?;
    if !lun.spec.snapshots.enabled {
        return Err(Error::Disabled(opts.lun.clone()));
    }
    let class = opts.volume_snapshot_class.clone().or(lun
        .spec
        .snapshots
        .volume_snapshot_class_name
        .clone());
    // Nothing below pauses delivery until these pass: a cluster without snapshot support fails here.
    preflight(client, &opts.namespace, class.as_deref(), opts.check_class).await?;
    let pod = active_pod(client, &lun).await?;
    let ordinal = crate::controller::lun::replicas::ordinal(&opts.lun, &pod.name_any())
        .expect("active pod is one of the LUN's StatefulSet pods");
    let pvc = names::lun_pvc(&opts.lun, ordinal);
    let name = volume::snapshot_name(&opts.lun, Timestamp::now());

    let snapshots: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        &opts.namespace,
        &volume::snapshot_resource(),
    );
    let object = volume::build(&lun, &name, &pvc, class.as_deref());
    let (paused, pause) = paused_step(agent, &lun, &pod, opts, &name, async {
        snapshots
            .create(&PostParams::default(), &object)
            .await
            .map_err(api(format!("creating VolumeSnapshot {name} of PVC {pvc}")))?;
        wait_for(&snapshots, &name, opts.poll, |s| s.cut).await
    })
    .await;
    let result = match paused {
        Ok(()) => finish(&snapshots, &lun, &name, opts).await,
        Err(e) => Err(e),
    };
    let outcome = result.map(|pruned| Outcome {
        name: name.clone(),
        pause,
        pruned,
    });
    record(client, &snapshots, &lun, &name, pause, &outcome).await;
    outcome
}

/// Pauses delivery on `pod`, runs `step`, and resumes in every case. Returns the step's result (or the
/// resume failure) and how long delivery was paused.
async fn paused_step(
    agent: &dyn StoreAgent,
    lun: &StorageLUN,
    pod: &Pod,
    opts: &Options,
    name: &str,
    step: impl std::future::Future<Output = Result<()>>,
) -> (Result<()>, Duration) {
    let max_pause = lun.spec.snapshots.max_pause_seconds;
    let cut_timeout = opts
        .cut_timeout
        .unwrap_or(Duration::from_millis(u64::from(max_pause) * 750));
    let pod_name = pod.name_any();
    let started = Instant::now();
    let result = match agent.pause(pod, max_pause).await {
        Err(message) => Err(Error::Pause {
            pod: pod_name.clone(),
            message,
        }),
        Ok(()) => {
            let guarded = AssertUnwindSafe(tokio::time::timeout(cut_timeout, step)).catch_unwind();
            tokio::select! {
                r = guarded => match r {
                    Ok(Ok(r)) => r,
                    Ok(Err(_)) => Err(Error::CutTimeout { name: name.to_string(), seconds: cut_timeout.as_secs() }),
                    Err(panic) => Err(Error::Panicked(panic_message(&panic))),
                },
                _ = terminated() => Err(Error::Interrupted),
            }
        }
    };
    // Even a failed pause request may have reached the agent: resume regardless.
    let resumed = resume(agent, pod).await;
    let pause = started.elapsed();
    let result = match (result, resumed) {
        (Ok(()), Err(message)) => Err(Error::Resume {
            pod: pod_name,
            message,
            deadline_seconds: max_pause,
        }),
        (r, Err(message)) => {
            tracing::error!(pod = %pod_name, %message, "resume failed; the agent's pause deadline resumes delivery");
            r
        }
        (r, Ok(())) => r,
    };
    (result, pause)
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Resume, retried a few times: a dropped connection must not leave delivery paused until the deadline.
async fn resume(agent: &dyn StoreAgent, pod: &Pod) -> Result<(), String> {
    let mut last = String::new();
    for attempt in 0..3u32 {
        match agent.resume(pod).await {
            Ok(()) => return Ok(()),
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
    }
    Err(last)
}

/// SIGTERM (the Job's deadline, a node drain) or SIGINT.
async fn terminated() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        }
        _ => futures::future::pending().await,
    }
}

/// The VolumeSnapshot CRDs are served, and the class to use exists.
async fn preflight(
    client: &Client,
    namespace: &str,
    class: Option<&str>,
    check_class: bool,
) -> Result<()> {
    let snapshots: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), namespace, &volume::snapshot_resource());
    match snapshots.list(&ListParams::default().limit(1)).await {
        Err(e) if is_not_found(&e) => return Err(Error::SnapshotCrdMissing),
        r => r.map_err(api("listing VolumeSnapshots"))?,
    };
    if !check_class {
        return Ok(());
    }
    // VolumeSnapshotClasses are cluster-scoped and the snapshot job's Role is namespaced: where it may not
    // read them, the check is left to the snapshot controller, which reports a bad class on the
    // VolumeSnapshot itself (and the job then fails on readyToUse, after resuming delivery).
    let forbidden = |e: &kube::Error| matches!(e, kube::Error::Api(s) if s.code == 403);
    let classes: Api<DynamicObject> = Api::all_with(client.clone(), &volume::class_resource());
    match class {
        Some(c) => match classes.get_opt(c).await {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err(Error::ClassNotFound(c.to_string())),
            Err(e) if forbidden(&e) => {
                tracing::info!(
                    class = c,
                    "may not read VolumeSnapshotClasses; not checking the class"
                );
                Ok(())
            }
            Err(e) => Err(api(format!("reading VolumeSnapshotClass {c}"))(e)),
        },
        None => match classes.list(&ListParams::default()).await {
            Ok(all) if volume::has_default_class(&all.items) => Ok(()),
            Ok(_) => Err(Error::NoDefaultClass),
            Err(e) if forbidden(&e) => {
                tracing::info!(
                    "may not read VolumeSnapshotClasses; not checking for a default class"
                );
                Ok(())
            }
            Err(e) => Err(api("listing VolumeSnapshotClasses")(e)),
        },
    }
}

/// The replica the LUN's status says serves, if it is ready and labelled active.
async fn active_pod(client: &Client, lun: &StorageLUN) -> Result<Pod> {
    let no_active = |reason: String| Error::NoActive {
        lun: lun.name_any(),
        reason,
    };
    let name = lun
        .status
        .as_ref()
        .and_then(|s| s.current_active.clone())
        .ok_or_else(|| no_active("status.currentActive is not set".into()))?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &lun.namespace().unwrap_or_default());
    let pod = pods
        .get_opt(&name)
        .await
        .map_err(api(format!("reading pod {name}")))?
        .ok_or_else(|| no_active(format!("pod {name} not found")))?;
    let ready = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    let labelled = pod.labels().get(l::ROLE).map(String::as_str) == Some(l::ROLE_ACTIVE);
    if !ready || !labelled {
        return Err(no_active(format!(
            "pod {name} is not ready and labelled {}={}",
            l::ROLE,
            l::ROLE_ACTIVE
        )));
    }
    Ok(pod)
}

/// Polls `name` until `done` holds, failing on a snapshot error.
async fn wait_for(
    snapshots: &Api<DynamicObject>,
    name: &str,
    poll: Duration,
    done: impl Fn(&volume::SnapshotState) -> bool,
) -> Result<()> {
    loop {
        if let Some(obj) = snapshots
            .get_opt(name)
            .await
            .map_err(api(format!("reading VolumeSnapshot {name}")))?
        {
            let state = volume::state(&obj);
            if let Some(message) = state.error {
                return Err(Error::SnapshotFailed {
                    name: name.to_string(),
                    message,
                });
            }
            if done(&state) {
                return Ok(());
            }
        }
        tokio::time::sleep(poll).await;
    }
}

/// After delivery resumed: wait for readyToUse, then prune. Returns the names pruned.
async fn finish(
    snapshots: &Api<DynamicObject>,
    lun: &StorageLUN,
    name: &str,
    opts: &Options,
) -> Result<Vec<String>> {
    tokio::time::timeout(
        opts.timeout,
        wait_for(snapshots, name, opts.poll, |s| s.ready_to_use),
    )
    .await
    .map_err(|_| Error::ReadyTimeout {
        name: name.to_string(),
        seconds: opts.timeout.as_secs(),
    })??;
    let lun_name = lun.name_any();
    let own = snapshots
        .list(&ListParams::default().labels(&volume::selector(&lun_name)))
        .await
        .map_err(api("listing VolumeSnapshots to prune"))?;
    let retain = lun.spec.snapshots.retain as usize;
    let mut pruned = vec![];
    for old in volume::to_prune(&lun_name, own.items, retain) {
        let old_name = old.name_any();
        match snapshots.delete(&old_name, &DeleteParams::default()).await {
            Ok(_) => pruned.push(old_name),
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(api(format!("pruning VolumeSnapshot {old_name}"))(e)),
        }
    }
    Ok(pruned)
}

/// Writes `snapshots` and `lastSnapshot` to the LUN's status and publishes an Event. Best effort: the
/// snapshot's own result is what the job reports.
async fn record(
    client: &Client,
    snapshots: &Api<DynamicObject>,
    lun: &StorageLUN,
    name: &str,
    pause: Duration,
    outcome: &Result<Outcome>,
) {
    let lun_name = lun.name_any();
    let kept = match snapshots
        .list(&ListParams::default().labels(&volume::selector(&lun_name)))
        .await
    {
        Ok(list) => volume::newest_first(list.items)
            .into_iter()
            .filter(|s| s.metadata.deletion_timestamp.is_none())
            .map(|s| SnapshotRecord {
                name: s.name_any(),
                created_at: Time(volume::created_at(&s).unwrap_or_default()),
                ready_to_use: volume::state(&s).ready_to_use,
            })
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "listing VolumeSnapshots for status");
            lun.status
                .as_ref()
                .map(|s| s.snapshots.clone())
                .unwrap_or_default()
        }
    };
    let pause_millis = (!pause.is_zero()).then_some(pause.as_millis() as u64);
    let last = match outcome {
        Ok(o) => SnapshotResult {
            name: Some(o.name.clone()),
            time: Time(Timestamp::now()),
            result: "Succeeded".into(),
            message: (!o.pruned.is_empty()).then(|| format!("pruned {}", o.pruned.join(", "))),
            pause_millis,
        },
        Err(e) => SnapshotResult {
            name: Some(name.to_string()),
            time: Time(Timestamp::now()),
            result: "Failed".into(),
            message: Some(e.to_string()),
            pause_millis,
        },
    };
    let luns: Api<StorageLUN> =
        Api::namespaced(client.clone(), &lun.namespace().unwrap_or_default());
    let status = json!({ "snapshots": kept, "lastSnapshot": last });
    if let Err(e) = crate::controller::apply::apply_status(
        &luns,
        &lun_name,
        names::SNAPSHOT_FIELD_MANAGER,
        &status,
        &["snapshots", "lastSnapshot"],
    )
    .await
    {
        tracing::warn!(error = %e, lun = %lun_name, "recording the snapshot in status");
    }
    let (type_, reason, note) = match outcome {
        Ok(o) => (
            EventType::Normal,
            "SnapshotTaken",
            format!(
                "{} taken; delivery paused {} ms",
                o.name,
                o.pause.as_millis()
            ),
        ),
        Err(e) => (EventType::Warning, "SnapshotFailed", e.to_string()),
    };
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "mailpod-operator-snapshot".into(),
            instance: std::env::var("HOSTNAME").ok(),
        },
    );
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(crate::controller::lun::truncate_note(&note)),
        action: "Snapshot".into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, &lun.object_ref(&())).await {
        tracing::warn!(error = %e, "publishing the snapshot Event");
    }
}
