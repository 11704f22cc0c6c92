//! The controllers that `mailpod-operator run` starts, and what they share.
//!
//! [`mailpod`] reconciles MailPods; [`lun`] StorageLUNs (stores, failover, replication); [`apply`] holds the Server-Side Apply and orphan removal every controller
//! uses; [`status`] computes conditions; [`error`] is the one error type.

pub mod apply;
pub mod cache;
pub mod client;
pub mod clock;
pub mod confirm;
pub mod dkim;
pub mod error;
pub mod failover;
pub mod leader;
pub mod lun;
pub mod mailpod;
pub mod status;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use futures::TryStreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, ListParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Config as ControllerConfig, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, Resource, ResourceExt};
use tracing::{info, warn};

use crate::crd::{MailPod, SiteFailover, StorageLUN};
use crate::names;

pub use error::{Error, Result};

/// How `mailpod-operator run` runs the controllers. Leader election and the metrics server plug in here.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// Watch only this namespace; all namespaces when `None`.
    pub namespace: Option<String>,
    /// Mail image for MailPods that name none.
    pub default_image: String,
    /// The cluster's DNS domain, which the builders qualify every Service name a mail daemon looks up with.
    pub cluster_domain: String,
    /// The operator's own namespace when it runs in the cluster (see `resources::Defaults`).
    pub operator_namespace: Option<String>,
    /// MailPods reconciled at once.
    pub concurrency: u16,
    /// Watch labelled Secret mailbox sources (which needs list/watch on Secrets); without, they are read
    /// by name on each reconcile only.
    pub watch_secret_sources: bool,
    /// Where the controllers' counters are reported (`run` sets it; tests and the benchmark need not).
    pub metrics: Option<Arc<crate::metrics::OperatorMetrics>>,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            namespace: None,
            default_image: names::DEFAULT_IMAGE.to_string(),
            cluster_domain: crate::resources::DEFAULT_CLUSTER_DOMAIN.to_string(),
            operator_namespace: None,
            concurrency: 8,
            watch_secret_sources: true,
            metrics: None,
        }
    }
}

impl RunConfig {
    /// What the builders take from this configuration.
    pub fn defaults(&self) -> crate::resources::Defaults<'_> {
        crate::resources::Defaults {
            image: &self.default_image,
            cluster_domain: &self.cluster_domain,
            operator_namespace: self.operator_namespace.as_deref(),
        }
    }
}

/// Counters of what the controllers did (exported as metrics by the metrics server, read by the benchmark).
pub struct Stats {
    pub reconciles: AtomicU64,
    pub failures: AtomicU64,
    pub invalid: AtomicU64,
    /// Seconds per reconcile.
    pub durations: prometheus_client::metrics::histogram::Histogram,
    /// How many objects of its kind the controller manages (its reflector's size), once it runs.
    managed: std::sync::OnceLock<Box<dyn Fn() -> usize + Send + Sync>>,
    /// The SiteFailover controller's last recorded status per `(namespace, name)`, with this site's name,
    /// for the per-pairing gauges.
    sites: std::sync::Mutex<std::collections::BTreeMap<(String, String), SiteReport>>,
    /// The StorageLUN controller's exact replication lag per `(namespace, name)`: status holds only coarse
    /// steps of it, so that a lag moving between sync passes writes nothing.
    /// Entries not refreshed for [`LUN_LAG_TTL`] (a deleted LUN's) are dropped.
    luns: std::sync::Mutex<
        std::collections::BTreeMap<(String, String), (std::time::Instant, LunLag)>,
    >,
}

/// How long a LUN's measured lag is reported without a new measurement: every LUN is reconciled at least
/// once a minute, so only a deleted LUN's figure gets this old.
pub const LUN_LAG_TTL: std::time::Duration = std::time::Duration::from_secs(180);

/// A StorageLUN's replication lag as last measured, with its snapshot and promotion record, for the metrics.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LunLag {
    /// Largest lag of a standby (or, with method `Volume`, of the other site's copy).
    pub lag_seconds: Option<f64>,
    /// Each standby's lag, by pod name.
    pub replicas: Vec<(String, f64)>,
    pub health: lun::health::LunHealth,
}

/// One SiteFailover as the metrics report it.
#[derive(Clone, Debug)]
pub struct SiteReport {
    pub site: String,
    pub peer: String,
    /// `spec.targets.rpoSeconds`, which the replication-lag alert compares against.
    pub rpo_target_seconds: f64,
    pub status: crate::crd::SiteFailoverStatus,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            reconciles: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            invalid: AtomicU64::new(0),
            // 5 ms .. ~20 s: a steady-state reconcile takes milliseconds, a first apply of a large MailPod seconds.
            durations: prometheus_client::metrics::histogram::Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.005, 2.0, 12),
            ),
            managed: std::sync::OnceLock::new(),
            sites: Default::default(),
            luns: Default::default(),
        }
    }
}

impl std::fmt::Debug for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stats")
            .field("reconciles", &self.reconciles)
            .field("failures", &self.failures)
            .field("invalid", &self.invalid)
            .finish()
    }
}

/// Records a reconcile's duration when dropped, whichever way the reconcile returns.
pub struct ReconcileTimer<'a> {
    stats: &'a Stats,
    start: std::time::Instant,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.stats
            .durations
            .observe(self.start.elapsed().as_secs_f64());
    }
}

impl Stats {
    /// Counts a reconcile and times it until the returned guard drops.
    pub fn start_reconcile(&self) -> ReconcileTimer<'_> {
        self.reconciles.fetch_add(1, Ordering::Relaxed);
        ReconcileTimer {
            stats: self,
            start: std::time::Instant::now(),
        }
    }

    /// Reports the size of the controller's object cache as its managed objects.
    pub fn set_managed(&self, count: impl Fn() -> usize + Send + Sync + 'static) {
        let _ = self.managed.set(Box::new(count));
    }

    /// Objects managed, when the controller runs.
    pub fn managed(&self) -> Option<usize> {
        self.managed.get().map(|f| f())
    }

    /// Records a SiteFailover's status as this site last wrote it (`None`: the object is gone).
    pub fn report_site(&self, ns: &str, name: &str, report: Option<SiteReport>) {
        let mut sites = self.sites.lock().unwrap_or_else(|p| p.into_inner());
        let key = (ns.to_string(), name.to_string());
        match report {
            Some(r) => {
                sites.insert(key, r);
            }
            None => {
                sites.remove(&key);
            }
        }
    }

    /// The SiteFailovers reported, by `(namespace, name)`.
    pub fn sites(&self) -> Vec<((String, String), SiteReport)> {
        let sites = self.sites.lock().unwrap_or_else(|p| p.into_inner());
        sites.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// Records a StorageLUN's exact replication lag (`None`: the object is gone).
    pub fn report_lun_lag(&self, ns: &str, name: &str, lag: Option<LunLag>) {
        let mut luns = self.luns.lock().unwrap_or_else(|p| p.into_inner());
        let key = (ns.to_string(), name.to_string());
        match lag {
            Some(l) => {
                luns.insert(key, (std::time::Instant::now(), l));
            }
            None => {
                luns.remove(&key);
            }
        }
    }

    /// The StorageLUNs' exact replication lags, by `(namespace, name)`, measured within [`LUN_LAG_TTL`].
    pub fn lun_lags(&self) -> Vec<((String, String), LunLag)> {
        let mut luns = self.luns.lock().unwrap_or_else(|p| p.into_inner());
        luns.retain(|_, (at, _)| at.elapsed() < LUN_LAG_TTL);
        luns.iter()
            .map(|(k, (_, v))| (k.clone(), v.clone()))
            .collect()
    }

    pub fn reconciles(&self) -> u64 {
        self.reconciles.load(Ordering::Relaxed)
    }
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }
}

/// What every reconcile gets.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub config: RunConfig,
    pub stats: Arc<Stats>,
    /// Where store replicas' replication reports come from (their agents, over HTTP).
    pub replication: Arc<dyn lun::reports::ReplicationSource>,
    /// Consecutive failures per object, for the backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// The children this controller applied, as it last saw them (see [`apply::Seen`]).
    pub applied: apply::Seen,
    /// The MailPod controller's cache of its children, once [`run_mailpods`] watches them; reconciles
    /// run without it (tests that call the reconciler directly) list children from the API server.
    pub children: std::sync::OnceLock<Arc<cache::ChildCache>>,
    /// The clock every wait is measured on (see [`clock`]).
    pub clock: clock::Monotonic,
    /// Per LUN, since when this process has seen the replica it serves from lost.
    pub losses: clock::FirstSeen,
    /// Per replica awaiting resync, the first pass time (its agent's clock) this process saw from it.
    pub resyncs: clock::FirstSeen,
    /// Per LUN (UID), when its generated Secrets were last seen to exist: they are read again only after
    /// [`lun::SECRETS_RECHECK`], not on every reconcile.
    pub secrets_seen: Mutex<HashMap<String, std::time::Instant>>,
}

impl Context {
    pub fn new(client: Client, config: RunConfig) -> Self {
        let reporter = Reporter {
            controller: names::FIELD_MANAGER.to_string(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            config,
            stats: Arc::new(Stats::default()),
            replication: Arc::new(lun::reports::HttpReplicationSource::new(
                std::time::Duration::from_secs(2),
            )),
            failures: Mutex::new(HashMap::new()),
            applied: apply::Seen::default(),
            children: std::sync::OnceLock::new(),
            clock: clock::Monotonic::default(),
            losses: clock::FirstSeen::default(),
            resyncs: clock::FirstSeen::default(),
            secrets_seen: Mutex::new(HashMap::new()),
        }
    }

    /// The same context with replication reports from `source` (tests give each pod the report they want).
    pub fn with_replication_source(
        mut self,
        source: Arc<dyn lun::reports::ReplicationSource>,
    ) -> Self {
        self.replication = source;
        self
    }

    fn key<K: Resource>(obj: &K) -> String {
        format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any())
    }

    /// Counts one more failure of `obj` and returns how many in a row.
    pub fn record_failure<K: Resource>(&self, obj: &K) -> u32 {
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = f.entry(Self::key(obj)).or_insert(0);
        *n += 1;
        *n
    }

    pub fn reset_failures<K: Resource>(&self, obj: &K) {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&Self::key(obj));
    }
}

/// Checks that the CRDs are installed, with the fix in the message when they are not.
/// Records an Event about `obj`. Events are for people: failing to record one never fails a reconcile.
pub async fn publish<K>(
    ctx: &Context,
    obj: &K,
    type_: kube::runtime::events::EventType,
    reason: &str,
    action: &str,
    note: String,
) where
    K: Resource<DynamicType = ()>,
{
    let event = kube::runtime::events::Event {
        type_,
        reason: reason.into(),
        note: Some(status::truncate(&note, 1024)),
        action: action.into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &obj.object_ref(&())).await {
        warn!(kind = %K::kind(&()), name = %obj.name_any(), error = %e, "cannot record event");
    }
}

/// [`check_crds`] could not get an answer from the API server (as opposed to an answer that refuses).
#[derive(Debug, thiserror::Error)]
#[error("cannot reach the API server to list {what}")]
pub struct ApiUnreachable {
    what: String,
    #[source]
    source: kube::Error,
}

/// In `namespace` when the operator watches only some namespaces (its Roles are namespaced there).
pub async fn check_crds(client: &Client, namespace: Option<&str>) -> anyhow::Result<()> {
    async fn one<K>(client: &Client, namespace: Option<&str>) -> anyhow::Result<()>
    where
        K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
    {
        let api: Api<K> = api(client, namespace);
        match api.list(&ListParams::default().limit(1)).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => anyhow::bail!(
                "the {} CustomResourceDefinition ({}.{}) is not installed; install the CRDs with \
                 `mailpod-operator crds | kubectl apply --server-side -f -` and start again",
                K::kind(&()),
                K::plural(&()),
                K::group(&())
            ),
            Err(kube::Error::Api(s)) if s.code == 403 => anyhow::bail!(
                "not allowed to list {}: {} (check the operator's ClusterRole)",
                K::plural(&()),
                s.message
            ),
            Err(e) => Err(anyhow::Error::new(ApiUnreachable {
                what: K::plural(&()).to_string(),
                source: e,
            })),
        }
    }
    one::<MailPod>(client, namespace).await?;
    one::<StorageLUN>(client, namespace).await?;
    one::<SiteFailover>(client, namespace).await?;
    Ok(())
}

/// Checks that the CRDs are installed. A missing CRD or a refusal ends the process with a hint; an API
/// server that does not answer (restarting, or this site cut off from it) is waited for, so the operator
/// starts by itself when it returns instead of crash-looping into an ever longer restart back-off.
/// Returns false when shut down while waiting.
pub async fn wait_for_crds(
    client: &Client,
    namespaces: &[Option<String>],
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<bool> {
    let mut shutdown = std::pin::pin!(shutdown);
    let mut pause = std::time::Duration::from_secs(1);
    'again: loop {
        for ns in namespaces {
            match check_crds(client, ns.as_deref()).await {
                Ok(()) => {}
                Err(e) if e.is::<ApiUnreachable>() => {
                    tracing::warn!(error = %format!("{e:#}"), retry_in = ?pause, "waiting for the API server");
                    tokio::select! {
                        () = &mut shutdown => return Ok(false),
                        () = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(std::time::Duration::from_secs(10));
                    continue 'again;
                }
                Err(e) => return Err(e),
            }
        }
        return Ok(true);
    }
}

fn api<K>(client: &Client, ns: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Runs every controller until `shutdown` resolves: MailPods and StorageLUNs always, SiteFailovers when this
/// operator knows its site. Each finishes its in-flight reconciles first.
pub async fn run_all<S>(
    client: Client,
    config: RunConfig,
    site: Option<String>,
    shutdown: S,
) -> anyhow::Result<()>
where
    S: Future<Output = ()> + Clone + Send + Sync + 'static,
{
    // Before anything starts, so a missing CRD stops the operator with its hint instead of leaving the
    // other controllers running.
    check_crds(&client, config.namespace.as_deref()).await?;
    let namespace = config.namespace.clone();
    let lun_ctx = Arc::new(Context::new(client.clone(), config.clone()));
    let mailpod_ctx = Arc::new(Context::new(client.clone(), config.clone()));
    if let Some(m) = &config.metrics {
        m.register("storagelun", lun_ctx.stats.clone());
        m.register("mailpod", mailpod_ctx.stats.clone());
    }
    let luns = lun::run(lun_ctx, namespace.clone(), shutdown.clone());
    let failover = async {
        match site {
            Some(site) => {
                let stats = Arc::new(Stats::default());
                if let Some(m) = &config.metrics {
                    m.register("sitefailover", stats.clone());
                }
                failover::run(
                    client.clone(),
                    namespace.clone(),
                    site,
                    stats,
                    shutdown.clone(),
                )
                .await
            }
            None => {
                info!(
                    "no --site given: SiteFailover resources are not reconciled by this operator"
                );
                Ok(())
            }
        }
    };
    let mailpods = run_mailpods(mailpod_ctx, shutdown.clone());
    let (m, (), f) = tokio::join!(mailpods, luns, failover);
    f?;
    m
}

/// Runs the MailPod controller with `ctx` (its client and [`RunConfig`]) until `shutdown` resolves;
/// in-flight reconciles finish first. Callers keep `ctx` to read its counters.
pub async fn run_mailpods(
    ctx: Arc<Context>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> anyhow::Result<()> {
    let client = ctx.client.clone();
    // The CRDs were checked by the caller (`run_all`) before any controller started.
    let config = ctx.config.clone();
    let ns = config.namespace.clone();
    let ns = ns.as_deref();
    let wc = watcher::Config::default().any_semantic();
    let children = watcher::Config::default()
        .labels(&format!(
            "{}={}",
            names::labels::MANAGED_BY,
            names::labels::MANAGER
        ))
        .any_semantic();
    // Only mailbox lists labelled as such are watched (metadata only: their content is read when a
    // MailPod that names them is reconciled); an unlabelled one is still read, see `mailpod::fetch_sources`.
    let sources = watcher::Config::default()
        .labels(&format!("{}=true", names::labels::MAILBOX_SOURCE))
        .any_semantic();
    // The MailPod's own status writes do not bring another reconcile.
    let (mailpods, writer) = kube::runtime::reflector::store();
    let own = changes_that_matter(
        watcher(api::<MailPod>(&client, ns), wc.clone())
            .modify(strip_managed_fields)
            .default_backoff()
            .reflect(writer),
        spec_and_metadata,
    );
    let controller = Controller::for_stream(own, mailpods.clone());
    let cache = mailpods.clone();
    ctx.stats.set_managed(move || cache.state().len());
    let for_sources = mailpods.clone();
    let for_secrets = mailpods.clone();
    let kinds = apply::mailpod_child_kinds();
    let child_cache = Arc::new(cache::ChildCache::new(&kinds));
    let _ = ctx.children.set(child_cache.clone());
    let controller = controller
        .owns_stream(cached::<PartialObjectMeta<ConfigMap>, ConfigMap>(
            &client,
            ns,
            &children,
            &child_cache,
        ))
        .owns_stream(cached::<PartialObjectMeta<NetworkPolicy>, NetworkPolicy>(
            &client,
            ns,
            &children,
            &child_cache,
        ))
        .owns_stream(cached::<PartialObjectMeta<Service>, Service>(
            &client,
            ns,
            &children,
            &child_cache,
        ))
        .owns_stream(cached::<
            PartialObjectMeta<PodDisruptionBudget>,
            PodDisruptionBudget,
        >(&client, ns, &children, &child_cache))
        .owns_stream(cached::<StorageLUN, StorageLUN>(
            &client,
            ns,
            &children,
            &child_cache,
        ))
        .owns_stream(cached::<StatefulSet, StatefulSet>(
            &client,
            ns,
            &children,
            &child_cache,
        ))
        // Mailbox lists kept in ConfigMaps and Secrets: a change there reconciles the MailPods that use them.
        .watches_stream(
            watcher(
                api::<PartialObjectMeta<ConfigMap>>(&client, ns),
                sources.clone(),
            )
            .default_backoff()
            .touched_objects(),
            move |cm: PartialObjectMeta<ConfigMap>| {
                referencing(&for_sources, &cm, |src| src.config_map.as_ref())
            },
        );
    let controller = if config.watch_secret_sources {
        controller.watches_stream(
            watcher(api::<PartialObjectMeta<Secret>>(&client, ns), sources)
                .default_backoff()
                .touched_objects(),
            move |s: PartialObjectMeta<Secret>| {
                referencing(&for_secrets, &s, |src| src.secret.as_ref())
            },
        )
    } else {
        controller
    };
    let controller = controller
        .with_config(ControllerConfig::default().concurrency(config.concurrency))
        .graceful_shutdown_on(shutdown);
    info!(
        namespace = ns.unwrap_or("(all)"),
        "MailPod controller starting"
    );
    controller
        .run(mailpod::reconcile, mailpod::error_policy, ctx.clone())
        .for_each(|res| async move {
            if let Err(e) = res {
                // Reconcile errors are logged by error_policy; this is watch/queue trouble.
                if !matches!(e, kube::runtime::controller::Error::ReconcilerFailed(..)) {
                    warn!(error = %e, "controller stream error");
                }
            }
        })
        .await;
    info!("MailPod controller stopped");
    Ok(())
}

/// Drops `managedFields` from an object before a reflector caches it: the server-side apply bookkeeping
/// of every manager, often larger than the object, and never read by the controllers.
pub fn strip_managed_fields<K: Resource>(obj: &mut K) {
    obj.meta_mut().managed_fields = None;
}

/// The watch of one kind of children (`W` is the kind, or its metadata only), feeding `cache` and
/// yielding each changed child for the controller to reconcile its owner.
pub(crate) fn cached<W, K>(
    client: &Client,
    ns: Option<&str>,
    wc: &watcher::Config,
    cache: &Arc<cache::ChildCache>,
) -> impl futures::Stream<Item = Result<W, watcher::Error>> + Send + 'static
where
    W: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    K: Resource<DynamicType = ()>,
{
    let ar = kube::api::ApiResource::erase::<K>(&());
    let keep = cache::keep_of(&ar.kind);
    let cache = cache.clone();
    watcher(api::<W>(client, ns), wc.clone())
        .default_backoff()
        .map_ok(move |event| {
            cache.observe(&event, &ar, keep);
            event
        })
        .touched_objects()
}

/// Hash of what a controller reacts to on its own objects: the spec (through `generation`), labels,
/// annotations, finalizers and the deletion mark. Status is left out: most status changes are the
/// controller's own writes, and reacting to them is what turns every write into another reconcile.
pub fn spec_and_metadata<K: Resource>(obj: &K) -> u64 {
    use std::hash::{Hash, Hasher};
    let m = obj.meta();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    m.generation.hash(&mut h);
    m.labels.hash(&mut h);
    m.annotations.hash(&mut h);
    m.finalizers.hash(&mut h);
    m.deletion_timestamp.is_some().hash(&mut h);
    h.finish()
}

/// The objects of a watch that a controller reconciles for: every deletion, and each applied object
/// whose `hash` differs from the last one seen for its UID. With [`spec_and_metadata`], status-only
/// changes are dropped (as kube-runtime's `predicates::generation` does, but keeping label, annotation
/// and finalizer changes); the controller's own requeues keep it looking at what status cannot tell it.
pub fn changes_that_matter<K, S, F>(
    events: S,
    hash: F,
) -> impl futures::Stream<Item = Result<K, watcher::Error>>
where
    K: Resource,
    S: futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
    F: Fn(&K) -> u64,
{
    let mut seen: HashMap<String, u64> = HashMap::new();
    events.filter_map(move |event| {
        let uid = |o: &K| o.meta().uid.clone().unwrap_or_default();
        let out = match event {
            Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => {
                let h = hash(&o);
                (seen.insert(uid(&o), h) != Some(h)).then_some(Ok(o))
            }
            Ok(watcher::Event::Delete(o)) => {
                seen.remove(&uid(&o));
                Some(Ok(o))
            }
            Ok(watcher::Event::Init | watcher::Event::InitDone) => None,
            Err(e) => Some(Err(e)),
        };
        futures::future::ready(out)
    })
}

/// MailPods in `obj`'s namespace whose mailbox sources name `obj`.
fn referencing<K: Resource>(
    mailpods: &kube::runtime::reflector::Store<MailPod>,
    obj: &K,
    key_ref: impl Fn(&crate::crd::MailboxSource) -> Option<&crate::crd::KeyRef>,
) -> Vec<ObjectRef<MailPod>> {
    let name = obj.name_any();
    let ns = obj.namespace();
    mailpods
        .state()
        .iter()
        .filter(|mp| mp.namespace() == ns)
        .filter(|mp| {
            mp.spec
                .mailboxes
                .from
                .iter()
                .any(|s| key_ref(s).is_some_and(|r| r.name == name))
        })
        .map(|mp| ObjectRef::from_obj(mp.as_ref()))
        .collect()
}
