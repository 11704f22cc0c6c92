//! The SiteFailover controller: thin I/O around the pure [`machine`]. Each tick reads this site's
//! SiteFailover fresh, observes both sites ([`observe`]), probes the peer's front ends when a probe is due,
//! decides, records the decision's status *before* acting (optimistic locking on the resourceVersion just
//! read, so a peer's concurrent epoch write is never overwritten), carries out the actions ([`act`]) and
//! records completion. A restart anywhere re-derives the same actions from the stored status.
//!
//! The mail path never waits on this: the data plane serves from its own ConfigMaps and LUNs; this only
//! changes which site's stores are fenced and where the DNS names point.

pub mod act;
pub mod machine;
pub mod observe;
pub mod peer;
pub mod volumes;
pub mod witness;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::runtime::controller::{Action as Requeue, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, Resource, ResourceExt};
use tracing::{info, warn};

use machine::{Action, Observation};
use observe::{timed, SiteState};
use peer::{FrontendProbe, PeerConnector, ProbeTarget};

use crate::crd::{SiteFailover, SiteFailoverStatus};

/// Field manager of this controller's applies: it owns `StorageLUN.spec.fenced`, mirrored MailPod specs
/// and DNSEndpoints, apart from the MailPod controller's `mailpod-operator`.
pub const FIELD_MANAGER: &str = "mailpod-operator-failover";
/// Annotation asking for a failback: `mailpod.io/failback=requested` on either site's SiteFailover.
pub const FAILBACK_ANNOTATION: &str = "mailpod.io/failback";
pub const FAILBACK_REQUESTED: &str = "requested";

/// Longest an Event may take to record before the tick goes on without it.
const EVENT_TIMEOUT: Duration = Duration::from_secs(1);

/// What can stop a tick. Peer trouble is not here: an unreachable peer is an observation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source}")]
    Kube {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("{what}: no answer within {timeout:?}")]
    Timeout { what: String, timeout: Duration },
    /// The peer holds a higher epoch than the one this tick acted on; the next tick adopts it.
    #[error("the peer holds epoch {epoch} (active site {active}); this site's decision is stale")]
    Superseded { epoch: i64, active: String },
    /// The SiteFailover was changed (by the peer telling us its epoch) between our read and our write.
    #[error("SiteFailover {0} changed while deciding; deciding again")]
    Conflict(String),
    #[error("SiteFailover {0} has no namespace")]
    MissingNamespace(String),
    /// A ConfigMap or Secret to mirror exists at this site with other data, and the mirror did not make it.
    #[error("{0} exists at this site with other data and was not made by the mirror; make it equal to the active site's, or delete it so the mirror can create it")]
    NotMirrored(String),
}

/// Current time, injectable so tests drive probes and RTO without sleeping.
pub trait Clock: Send + Sync {
    fn now(&self) -> Timestamp;
}

/// This process's monotonic clock (see [`super::clock`]): probe intervals, the witness Lease's lapse and
/// the renew deadline are durations between two of its readings, so a step of the wall clock neither
/// shortens nor stretches them.
#[derive(Default)]
pub struct SystemClock(super::clock::Monotonic);

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        self.0.now()
    }
}

/// Per SiteFailover: when the peer was last probed, and its front-end addresses last read.
type Memory = (Option<Timestamp>, Vec<ProbeTarget>);

/// What every tick gets.
pub struct Context {
    pub client: Client,
    /// This cluster's site name (`run --site`); a SiteFailover whose `spec.localSite` differs is refused.
    pub site: String,
    pub peers: Box<dyn PeerConnector>,
    pub probe: Box<dyn FrontendProbe>,
    pub clock: Box<dyn Clock>,
    recorder: Recorder,
    /// Ticks, failures and durations, for /metrics.
    pub stats: Arc<super::Stats>,
    /// In memory only: the last probe per SiteFailover (status keeps it only while probes fail, so a healthy
    /// steady state writes nothing), and the peer's front-end addresses last read through its API.
    memory: Mutex<HashMap<String, Memory>>,
    /// Per SiteFailover: what this site remembers of the witness Lease.
    witness_memory: Mutex<HashMap<String, witness::WitnessMemory>>,
    /// Per SiteFailover: the last replication lag read, and when.
    lag_memory: Mutex<HashMap<String, (f64, Timestamp)>>,
    /// SiteFailovers whose witness mismatch has been reported by this process.
    mismatch_said: Mutex<std::collections::HashSet<String>>,
    /// Arm a [`witness`] fence guard at every tick of an active site in quorum: a timer, independent of
    /// how long ticks take, that fences this site's stores when the renew deadline passes. On in
    /// production; tests that move an injected clock leave it off and rely on the tick's own check.
    pub fence_guard: bool,
    guards: Mutex<HashMap<String, tokio::task::JoinHandle<()>>>,
    /// When each armed guard fences: moved later by every renewal or agreement, as soon as it happens.
    fence_at: Arc<Mutex<HashMap<String, tokio::time::Instant>>>,
}

impl Context {
    pub fn new(
        client: Client,
        site: impl Into<String>,
        peers: Box<dyn PeerConnector>,
        probe: Box<dyn FrontendProbe>,
        clock: Box<dyn Clock>,
    ) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.to_string(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            site: site.into(),
            peers,
            probe,
            clock,
            memory: Mutex::new(HashMap::new()),
            witness_memory: Mutex::new(HashMap::new()),
            lag_memory: Mutex::new(HashMap::new()),
            mismatch_said: Mutex::default(),
            fence_guard: false,
            guards: Mutex::default(),
            fence_at: Arc::default(),
            stats: Arc::default(),
        }
    }

    /// The production context: kubeconfig Secrets, greeting probes, the system clock.
    pub fn production(client: Client, site: impl Into<String>) -> Self {
        let mut ctx = Self::new(
            client,
            site,
            Box::<peer::KubeconfigPeers>::default(),
            Box::<peer::GreetingProbe>::default(),
            Box::<SystemClock>::default(),
        );
        ctx.fence_guard = true;
        ctx
    }

    /// Stops the fence guard of one SiteFailover (deleted, invalid or not this site's).
    fn disarm(&self, key: &str) {
        let mut guards = lock(&self.guards);
        if let Some(g) = guards.remove(key) {
            g.abort();
        }
        lock(&self.fence_at).remove(key);
    }

    /// Moves an armed guard's fence time to `basis` (a renewal sent, or an agreement read) plus the renew
    /// deadline, if that is later. Does nothing when no guard is armed.
    fn extend_guard(&self, key: &str, basis: Timestamp, deadline_seconds: u32) {
        if !self.fence_guard {
            return;
        }
        let at = instant_of(self.clock.now(), basis, deadline_seconds);
        if let Some(cur) = lock(&self.fence_at).get_mut(key) {
            *cur = (*cur).max(at);
        }
    }

    /// Stops every fence guard: this process no longer reconciles (shutdown, or leadership lost).
    fn disarm_all(&self) {
        let mut guards = lock(&self.guards);
        for (_, g) in guards.drain() {
            g.abort();
        }
        lock(&self.fence_at).clear();
    }

    fn memory(&self) -> std::sync::MutexGuard<'_, HashMap<String, Memory>> {
        lock(&self.memory)
    }

    fn lag_memory(&self) -> std::sync::MutexGuard<'_, HashMap<String, (f64, Timestamp)>> {
        lock(&self.lag_memory)
    }

    fn witness_memory(&self) -> std::sync::MutexGuard<'_, HashMap<String, witness::WitnessMemory>> {
        lock(&self.witness_memory)
    }

    async fn note(&self, sf: &SiteFailover, warning: bool, reason: &str, message: String) {
        let event = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.into(),
            note: Some(super::status::truncate(&message, 1024)),
            action: "Failover".into(),
            secondary: None,
        };
        // Events are for people; a lost or slow one must not stop or delay a failover or a fence.
        match tokio::time::timeout(
            EVENT_TIMEOUT,
            self.recorder.publish(&event, &sf.object_ref(&())),
        )
        .await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(sitefailover = %sf.name_any(), error = %e, "cannot record event"),
            Err(_) => warn!(sitefailover = %sf.name_any(), "recording an event timed out"),
        }
    }
}

/// Writes `status` over the stored one if it differs, or when `confirm` (an unfence follows: the write's
/// resourceVersion check proves no peer changed our epoch since we read it). Returns the new object.
async fn record(
    ctx: &Context,
    sf: &SiteFailover,
    status: &SiteFailoverStatus,
    confirm: bool,
    timeout: Duration,
) -> Result<SiteFailover, Error> {
    if sf.status.as_ref() == Some(status) && !confirm {
        return Ok(sf.clone());
    }
    let ns = sf.namespace().unwrap_or_default();
    let name = sf.name_any();
    let api: Api<SiteFailover> = Api::namespaced(ctx.client.clone(), &ns);
    let mut next = sf.clone();
    next.status = Some(status.clone());
    match timed(
        format!("SiteFailover {ns}/{name} status"),
        timeout,
        api.replace_status(&name, &PostParams::default(), &next),
    )
    .await
    {
        Err(Error::Kube {
            source: kube::Error::Api(s),
            ..
        }) if s.code == 409 => Err(Error::Conflict(format!("{ns}/{name}"))),
        other => other,
    }
}

/// One tick for the SiteFailover `ns/name`; returns when to look again.
pub async fn reconcile_once(ctx: &Context, ns: &str, name: &str) -> Result<Duration, Error> {
    let api: Api<SiteFailover> = Api::namespaced(ctx.client.clone(), ns);
    let Some(sf) = timed(
        format!("SiteFailover {ns}/{name}"),
        Duration::from_secs(10),
        api.get_opt(name),
    )
    .await?
    else {
        ctx.stats.report_site(ns, name, None);
        ctx.disarm(&format!("{ns}/{name}"));
        return Ok(Duration::from_secs(300));
    };
    let spec = &sf.spec;
    let timeout = Duration::from_secs(u64::from(spec.detection.probe_timeout_seconds));
    if let Err(errs) = spec.validate() {
        ctx.note(&sf, true, "InvalidSpec", errs.to_string()).await;
        ctx.disarm(&format!("{ns}/{name}"));
        return Ok(Duration::from_secs(300));
    }
    if spec.local_site != ctx.site {
        ctx.note(
            &sf,
            true,
            "WrongSite",
            format!(
                "spec.localSite is `{}` but this operator runs with --site {}",
                spec.local_site, ctx.site
            ),
        )
        .await;
        ctx.disarm(&format!("{ns}/{name}"));
        return Ok(Duration::from_secs(300));
    }
    let key = format!("{ns}/{name}");
    let peer_ns = spec
        .peer
        .namespace
        .clone()
        .unwrap_or_else(|| ns.to_string());
    let now = ctx.clock.now();

    // Observe: this site must be readable; the peer is whatever answers in time.
    let local = SiteState::read(&ctx.client, ns, &sf, timeout, &ctx.site).await?;
    let peer_client = match ctx.peers.connect(&ctx.client, &sf, timeout).await {
        Ok(c) => Some(c),
        Err(e) => {
            info!(sitefailover = %key, error = %e, "peer API unreachable");
            None
        }
    };
    let peer_read_at = ctx.clock.now();
    let peer = match &peer_client {
        Some(c) => read_peer(c, &peer_ns, &sf, timeout).await,
        None => None,
    };
    if let Some((Some(p), _)) = &peer {
        // Said once per process while it lasts, not at every tick.
        let mismatch = witness::mismatch(&sf, p);
        let new = {
            let mut said = lock(&ctx.mismatch_said);
            match &mismatch {
                Some(_) => said.insert(key.clone()),
                None => {
                    said.remove(&key);
                    false
                }
            }
        };
        if let (Some(msg), true) = (mismatch, new) {
            ctx.note(&sf, true, "WitnessMismatch", msg).await;
        }
    }
    let status = sf.status.clone().unwrap_or_default();
    let local_active = status.active_site.as_deref() == Some(ctx.site.as_str()) && status.epoch > 0;
    let (last_probe, mut targets) = ctx.memory().get(&key).cloned().unwrap_or_default();
    if let (Some(c), Some(_)) = (&peer_client, &peer) {
        if let Ok(t) = observe::frontend_targets(c, &peer_ns, &sf, timeout).await {
            if !t.is_empty() {
                targets = t;
            }
        }
    }
    let last_probe = last_probe.max(status.last_probe_time.as_ref().map(|t| t.0));
    let frontend_ok = if !local_active && machine::probe_due(spec, last_probe, now) {
        let result = ctx.probe.check(&targets, timeout).await;
        if let Err(e) = &result {
            info!(sitefailover = %key, error = %e, "front-end probe of the peer failed");
        }
        ctx.memory()
            .insert(key.clone(), (Some(now), targets.clone()));
        Some(result.is_ok())
    } else {
        ctx.memory()
            .insert(key.clone(), (last_probe, targets.clone()));
        None
    };
    let peer_state = peer.as_ref().map(|(_, s)| s);
    let lag = {
        let read = observe::replication_lag(&local, peer_state, local_active);
        let mut last = ctx.lag_memory();
        match read {
            Some(l) => {
                last.insert(key.clone(), (l, now));
                Some(l)
            }
            // Not readable (a Volume LUN's figure is on the unreachable active site): the last reading
            // plus the time since, an upper bound of what the standby lacks.
            None if peer_state.is_none() => last
                .get(&key)
                .map(|(l, at)| l + now.duration_since(*at).as_secs_f64().max(0.0)),
            None => None,
        }
    };
    let obs = Observation {
        now,
        peer_read_at,
        peer: peer.as_ref().map(|(p, _)| observe::peer_view(p.as_ref())),
        frontend_ok,
        tables: observe::table_hashes(&sf, &local, peer_state),
        replication_lag_seconds: lag,
        failback_requested: observe::failback_requested(&sf)
            || peer
                .as_ref()
                .and_then(|(p, _)| p.as_ref())
                .is_some_and(observe::failback_requested),
        failover_requested: observe::failover_requested(&sf),
        local_fencing: local.fencing(),
        witness: None,
    };
    let mut obs = obs;
    let lease = match &spec.witness {
        Some(_) => {
            let (view, lease) =
                observe_witness(ctx, &sf, &key, &status, obs.peer.as_ref(), timeout).await;
            obs.witness = Some(view);
            lease
        }
        None => None,
    };
    // Decide on a fresh clock reading: observing may have taken several timeouts, and the renew deadline
    // must be judged at the time of the decision, not at the start of the tick.
    obs.now = ctx.clock.now();

    // Decide, record, act, record completion.
    let mut status_in = status.clone();
    status_in.observed_generation = sf.metadata.generation;
    let mut decision = machine::decide(spec, &status_in, &obs);
    if let (Some(epoch), Some((lease_ref, current))) = (decision.acquire_witness, &lease) {
        // A promotion is due: take the witness Lease for the new epoch first, then decide again with it.
        let sent = ctx.clock.now();
        match lease_ref
            .write(current.as_ref(), Some(&ctx.site), epoch, sent, timeout)
            .await
        {
            Ok(_) => {
                info!(sitefailover = %key, epoch, "took the witness Lease");
                let mut mem = ctx.witness_memory();
                let m = mem.entry(key.clone()).or_default();
                m.renewed_at = Some(sent);
                m.seen = None;
                if let Some(w) = obs.witness.as_mut() {
                    w.holder = Some(ctx.site.clone());
                    w.epoch = epoch;
                    w.renewed_at = Some(sent);
                }
                drop(mem);
                decision = machine::decide(spec, &status_in, &obs);
            }
            Err(e) => {
                warn!(sitefailover = %key, error = %e, "cannot take the witness Lease; not promoting");
            }
        }
    }
    // A fence or unfence follows: write the status even if unchanged, so its resourceVersion check proves
    // that no peer changed our epoch since we read it (a stale read must not fence a new active site).
    let confirm = decision
        .actions
        .iter()
        .any(|a| matches!(a, Action::FenceLocal(_)));
    if ctx.fence_guard {
        arm_guard(ctx, &sf, &key, &decision, &obs);
    }
    let sf = record(ctx, &sf, &decision.status, confirm, timeout).await?;
    for n in &decision.notes {
        ctx.note(&sf, n.warning, n.reason, n.message.clone()).await;
    }
    let phase = decision.status.phase;
    for action in &decision.actions {
        if *action == Action::FenceLocal(false) {
            if let Some(until) = quorum_until(&sf, &decision.status, &obs) {
                // The steps before may have taken several timeouts: unfence only while the renewal or
                // agreement this decision rests on still holds; else the next tick decides again.
                if ctx.clock.now() > until {
                    return Err(Error::Timeout {
                        what:
                            "unfencing this site: the witness renew deadline passed during the tick"
                                .to_string(),
                        timeout,
                    });
                }
            }
        }
        match carry_out(
            ctx,
            &sf,
            action,
            &local,
            peer_client.as_ref(),
            peer_state,
            ns,
            &peer_ns,
            timeout,
        )
        .await
        {
            Ok(()) => {}
            Err(e @ Error::Superseded { .. }) => return Err(e),
            Err(e) if action.best_effort(phase) => {
                info!(sitefailover = %key, action = ?action, error = %e, "peer step skipped (peer presumed lost)");
            }
            // Mirroring is for the tables of a later promotion; it never holds up this tick's other steps.
            Err(e) if *action == Action::MirrorFromPeer => {
                warn!(sitefailover = %key, error = %e, "mirroring from the peer failed");
                ctx.note(&sf, true, "MirrorFailed", e.to_string()).await;
            }
            Err(e) => return Err(e),
        }
    }
    let report = |status: &SiteFailoverStatus| super::SiteReport {
        site: ctx.site.clone(),
        peer: spec.peer.name.clone(),
        rpo_target_seconds: f64::from(spec.targets.rpo_seconds),
        status: status.clone(),
    };
    ctx.stats
        .report_site(ns, name, Some(report(&decision.status)));
    if let Some(after) = &decision.after {
        match record(ctx, &sf, after, false, timeout).await {
            // Our own actions may have changed the object since (clearing a request annotation): if its
            // status is still the one recorded before acting, record completion over the fresh version.
            Err(Error::Conflict(_)) => {
                let fresh = timed(
                    format!("SiteFailover {ns}/{name}"),
                    timeout,
                    api.get_opt(name),
                )
                .await?;
                match fresh {
                    Some(f) if f.status.as_ref() == Some(&decision.status) => {
                        record(ctx, &f, after, false, timeout).await?;
                    }
                    _ => return Err(Error::Conflict(format!("{ns}/{name}"))),
                }
            }
            other => {
                other?;
            }
        }
        ctx.stats.report_site(ns, name, Some(report(after)));
        if let Some(rec) = &after.last_failover {
            let msg = format!(
                "{} from {} to {} at epoch {} done: RTO {:.1} s, RPO {}",
                rec.kind,
                rec.from,
                rec.to,
                rec.epoch,
                rec.rto_seconds.unwrap_or_default(),
                rec.rpo_seconds
                    .map_or("unknown".to_string(), |r| format!("{r:.1} s"))
            );
            ctx.note(&sf, false, "Completed", msg).await;
        }
    }
    Ok(decision.requeue)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Until when this tick's quorum holds, with a witness: the renew deadline after the later of this tick's
/// renewal and the peer's agreement (read at `peer_read_at`, against the epoch the decision adopted).
/// `None` without a witness, or with neither.
fn quorum_until(
    sf: &SiteFailover,
    st: &SiteFailoverStatus,
    obs: &Observation,
) -> Option<Timestamp> {
    let w = sf.spec.witness.as_ref()?;
    let agreed = machine::peer_agrees(&sf.spec, st, obs).then_some(obs.peer_read_at);
    let renewed = obs.witness.as_ref().and_then(|v| v.renewed_at);
    let basis = agreed.max(renewed)?;
    let deadline = w.renew_deadline_seconds(sf.spec.detection.probe_interval_seconds);
    Some(basis + jiff::SignedDuration::from_secs(i64::from(deadline)))
}

/// The monotonic instant at which `basis + deadline` falls, given that the clock reads `now`.
fn instant_of(now: Timestamp, basis: Timestamp, deadline_seconds: u32) -> tokio::time::Instant {
    let until = basis + jiff::SignedDuration::from_secs(i64::from(deadline_seconds));
    let left = Duration::try_from(now.duration_until(until)).unwrap_or(Duration::ZERO);
    tokio::time::Instant::now() + left
}

/// Arms the fence guard of an active site in quorum with a witness, or moves its fence time: a task that
/// sleeps until the renew deadline of the latest renewal or agreement and then fences this site's stores.
/// Renewals move the time as soon as they succeed ([`Context::extend_guard`]), so a slow tick between two
/// renewals does not fence; a site out of quorum, standby, or without a witness has no guard. The tick's
/// own check fences too, but only when a tick runs; the guard holds the deadline when ticks are slow or stop.
fn arm_guard(
    ctx: &Context,
    sf: &SiteFailover,
    key: &str,
    decision: &machine::Decision,
    obs: &Observation,
) {
    let st = &decision.status;
    let active = st.active_site.as_deref() == Some(ctx.site.as_str());
    let in_quorum = st.witness.as_ref().is_some_and(|w| w.quorum) && st.fenced == Some(false);
    let Some(until) = quorum_until(sf, st, obs).filter(|_| active && in_quorum) else {
        ctx.disarm(key);
        return;
    };
    let at = instant_of(ctx.clock.now(), until, 0);
    {
        let mut fence_at = lock(&ctx.fence_at);
        let cur = fence_at.entry(key.to_string()).or_insert(at);
        *cur = (*cur).max(at);
    }
    let mut guards = lock(&ctx.guards);
    if guards.get(key).is_some_and(|g| !g.is_finished()) {
        return;
    }
    let client = ctx.client.clone();
    let sf = sf.clone();
    let site = ctx.site.clone();
    let timeout = Duration::from_secs(u64::from(sf.spec.detection.probe_timeout_seconds));
    let key_owned = key.to_string();
    let fence_at = ctx.fence_at.clone();
    guards.insert(
        key.to_string(),
        tokio::spawn(async move {
            loop {
                let Some(at) = lock(&fence_at).get(&key_owned).copied() else {
                    return;
                };
                if tokio::time::Instant::now() < at {
                    tokio::time::sleep_until(at).await;
                    continue;
                }
                break;
            }
            lock(&fence_at).remove(&key_owned);
            let ns = sf.namespace().unwrap_or_default();
            warn!(sitefailover = %key_owned, "witness renew deadline passed with no renewal or agreement: fencing this site's stores");
            match SiteState::read(&client, &ns, &sf, timeout, &site).await {
                Ok(local) => {
                    if let Err(e) = act::fence(&client, &ns, &local.luns, true, timeout, &site).await {
                        warn!(sitefailover = %key_owned, error = %e, "fence guard could not fence");
                    }
                }
                Err(e) => warn!(sitefailover = %key_owned, error = %e, "fence guard could not read the LUNs"),
            }
        }),
    );
}

/// Reads the witness Lease, renews it when this site is active (or gives it back when this standby holds it
/// with no promotion under way), and returns what the machine sees with the Lease as read (`None` when the
/// witness cannot be read).
async fn observe_witness(
    ctx: &Context,
    sf: &SiteFailover,
    key: &str,
    status: &SiteFailoverStatus,
    peer: Option<&machine::PeerView>,
    timeout: Duration,
) -> (
    witness::WitnessView,
    Option<(
        witness::LeaseRef,
        Option<k8s_openapi::api::coordination::v1::Lease>,
    )>,
) {
    let duration = sf
        .spec
        .witness
        .as_ref()
        .map_or(0, |w| w.lease_duration_seconds);
    let lease_ref = match ctx.peers.witness(&ctx.client, sf, timeout).await {
        Ok(c) => witness::LeaseRef::new(c, sf, duration),
        Err(e) => {
            info!(sitefailover = %key, error = %e, "witness unreachable");
            None
        }
    };
    let read = match &lease_ref {
        Some(r) => match r.read(timeout).await {
            Ok(l) => Some(l),
            Err(e) => {
                info!(sitefailover = %key, error = %e, "witness Lease unreadable");
                None
            }
        },
        None => None,
    };
    // Stamped after the read: a version is never taken as seen earlier than it was.
    let read_at = ctx.clock.now();
    let me = ctx.site.as_str();
    let mut mem = ctx.witness_memory().remove(key).unwrap_or_default();
    let mut view = witness::view(
        &witness::pairing(sf),
        read.as_ref().map(Option::as_ref),
        &mut mem,
        duration,
        read_at,
    );
    // Who is active at which epoch, as the machine will start from (a new pairing: the peer's view, else the
    // configured primary at epoch 1), so a new primary holds the Lease from its first tick.
    let (epoch, active_site) = match peer {
        _ if status.epoch > 0 => (status.epoch, status.active_site.clone()),
        Some(p) if p.epoch > 0 && p.active_site.is_some() => (p.epoch, p.active_site.clone()),
        _ => (1, Some(sf.spec.primary_site.clone())),
    };
    let active = active_site.as_deref() == Some(me);
    let mut read = read;
    if let (Some(r), Some(current)) = (&lease_ref, &mut read) {
        // The renewal counts from when it was sent: it may have landed any time after.
        let sent = ctx.clock.now();
        if active && witness::active_may_renew(&view, me, epoch, status.epoch == 0) {
            match r
                .write(current.as_ref(), Some(me), epoch, sent, timeout)
                .await
            {
                Ok(written) => {
                    *current = Some(written);
                    let deadline = sf.spec.witness.as_ref().map_or(0, |w| {
                        w.renew_deadline_seconds(sf.spec.detection.probe_interval_seconds)
                    });
                    ctx.extend_guard(key, sent, deadline);
                    mem.renewed_at = Some(sent);
                    mem.seen = None;
                    view.holder = Some(me.to_string());
                    view.epoch = epoch;
                    view.renewed_at = Some(sent);
                }
                Err(e) => info!(sitefailover = %key, error = %e, "cannot renew the witness Lease"),
            }
        } else if !active
            && view.held_by(me)
            && view.foreign.is_none()
            && status.consecutive_probe_failures == 0
            && status.phase != crate::crd::FailoverPhase::FailingOver
        {
            // Taken for a promotion that did not happen (the primary answers again): give it back.
            match r.write(current.as_ref(), None, epoch, sent, timeout).await {
                Ok(written) => {
                    *current = Some(written);
                    mem.renewed_at = None;
                    mem.seen = None;
                    view.holder = None;
                    view.epoch = epoch;
                    view.renewed_at = None;
                }
                Err(e) => {
                    info!(sitefailover = %key, error = %e, "cannot release the witness Lease")
                }
            }
        }
    }
    ctx.witness_memory().insert(key.to_string(), mem);
    (view, lease_ref.zip(read))
}

/// The peer's SiteFailover (same name) and state, or `None` when its API does not answer in time.
async fn read_peer(
    peer: &Client,
    ns: &str,
    sf: &SiteFailover,
    timeout: Duration,
) -> Option<(Option<SiteFailover>, SiteState)> {
    let api: Api<SiteFailover> = Api::namespaced(peer.clone(), ns);
    let site = &sf.spec.peer.name;
    let peer_sf = timed(
        format!("SiteFailover {ns}/{} at {site}", sf.name_any()),
        timeout,
        api.get_opt(&sf.name_any()),
    )
    .await
    .ok()?;
    let state = SiteState::read(peer, ns, sf, timeout, site).await.ok()?;
    Some((peer_sf, state))
}

#[allow(clippy::too_many_arguments)]
async fn carry_out(
    ctx: &Context,
    sf: &SiteFailover,
    action: &Action,
    local: &SiteState,
    peer: Option<&Client>,
    peer_state: Option<&SiteState>,
    ns: &str,
    peer_ns: &str,
    timeout: Duration,
) -> Result<(), Error> {
    let site = ctx.site.as_str();
    let peer_site = sf.spec.peer.name.as_str();
    let need_peer = || Error::Timeout {
        what: format!("the API of site {peer_site}"),
        timeout,
    };
    match action {
        Action::FenceLocal(f) => {
            let changed = act::fence(&ctx.client, ns, &local.luns, *f, timeout, site).await?;
            if !changed.is_empty() {
                let verb = if *f { "fenced" } else { "unfenced" };
                ctx.note(
                    sf,
                    *f,
                    if *f { "FencedStores" } else { "UnfencedStores" },
                    format!("{verb} {}", changed.join(", ")),
                )
                .await;
            }
        }
        Action::FencePeer(f) => {
            let (c, s) = peer.zip(peer_state).ok_or_else(need_peer)?;
            act::fence(c, peer_ns, &s.luns, *f, timeout, peer_site).await?;
        }
        Action::TellPeer { epoch, active_site } => {
            let c = peer.ok_or_else(need_peer)?;
            act::tell_peer(c, peer_ns, &sf.name_any(), *epoch, active_site, timeout).await?;
        }
        Action::MirrorFromPeer => {
            let (c, s) = peer.zip(peer_state).ok_or_else(need_peer)?;
            let changed = act::mirror(&act::Sides {
                local: &ctx.client,
                ns,
                peer: c,
                peer_ns,
                peer_state: s,
                local_state: local,
                peer_site,
                timeout,
            })
            .await?;
            if !changed.is_empty() {
                ctx.note(
                    sf,
                    false,
                    "Mirrored",
                    format!("from {peer_site}: {}", changed.join(", ")),
                )
                .await;
            }
        }
        Action::PublishDns => {
            let pending = act::publish_dns(&ctx.client, ns, sf, timeout).await?;
            if !pending.is_empty() {
                warn!(sitefailover = %sf.name_any(), names = ?pending, "DNS names wait for a load-balancer address");
            }
        }
        Action::WithdrawDns => {
            act::withdraw_dns(&ctx.client, ns, sf, timeout).await?;
        }
        Action::WithdrawPeerDns => {
            let c = peer.ok_or_else(need_peer)?;
            act::withdraw_dns(c, peer_ns, sf, timeout).await?;
        }
        Action::ClearFailbackRequest => {
            act::clear_annotation(
                &ctx.client,
                ns,
                &sf.name_any(),
                FAILBACK_ANNOTATION,
                timeout,
            )
            .await?;
            if let Some(c) = peer {
                act::clear_annotation(c, peer_ns, &sf.name_any(), FAILBACK_ANNOTATION, timeout)
                    .await?;
            }
        }
        Action::ClearFailoverRequest => {
            act::clear_annotation(
                &ctx.client,
                ns,
                &sf.name_any(),
                crate::plugin::FAILOVER_ANNOTATION,
                timeout,
            )
            .await?;
        }
    }
    Ok(())
}

async fn reconcile(sf: Arc<SiteFailover>, ctx: Arc<Context>) -> Result<Requeue, Error> {
    let _timer = ctx.stats.start_reconcile();
    let ns = sf
        .namespace()
        .ok_or_else(|| Error::MissingNamespace(sf.name_any()))?;
    let next = reconcile_once(&ctx, &ns, &sf.name_any()).await?;
    Ok(Requeue::requeue(next))
}

fn error_policy(sf: Arc<SiteFailover>, error: &Error, ctx: Arc<Context>) -> Requeue {
    ctx.stats
        .failures
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    warn!(sitefailover = %sf.name_any(), error = %error, "site failover tick failed");
    // Ticks are cheap and failover is time-critical: retry within a second.
    Requeue::requeue(Duration::from_secs(1))
}

/// What in a SiteFailover brings a tick before its timer: its spec and metadata (the failover and
/// failback annotations among them), and the epoch and active site a peer records in its status.
pub fn tick_relevant(sf: &SiteFailover) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    super::spec_and_metadata(sf).hash(&mut h);
    if let Some(st) = &sf.status {
        st.epoch.hash(&mut h);
        st.active_site.hash(&mut h);
        st.fenced.hash(&mut h);
    }
    h.finish()
}

/// Runs the SiteFailover controller for this cluster's `site` until `shutdown` resolves.
pub async fn run(
    client: Client,
    namespace: Option<String>,
    site: String,
    stats: Arc<super::Stats>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> anyhow::Result<()> {
    let api: Api<SiteFailover> = match &namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let mut ctx = Context::production(client.clone(), site.clone());
    ctx.stats = stats;
    let ctx = Arc::new(ctx);
    info!(site = %site, "SiteFailover controller starting");
    // No watches beyond the SiteFailovers: each tick requeues itself at the probe interval, which is
    // also how soon a changed access table at the active site is mirrored here. Of this site's own
    // status writes, only what the peer may have written (the epoch and the active site it records here)
    // brings a tick sooner.
    let (store, writer) = kube::runtime::reflector::store();
    let own = super::changes_that_matter(
        watcher(api, watcher::Config::default().any_semantic())
            .modify(super::strip_managed_fields)
            .default_backoff()
            .reflect(writer),
        tick_relevant,
    );
    Controller::for_stream(own, store)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|_| async {})
        .await;
    ctx.disarm_all();
    info!("SiteFailover controller stopped");
    Ok(())
}
