//! Two in-memory clusters standing for two sites (`east`, the primary, and `west`), each with the real
//! MailPod reconciler and a SiteFailover controller whose peer link, front-end probe and clock the tests
//! control: cut the link, fail the probe, move time, with no sleeping.
#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use mailpod_operator::controller::failover::peer::{FrontendProbe, PeerConnector, ProbeTarget};
use mailpod_operator::controller::failover::{self, Clock};
use mailpod_operator::controller::lun::reports::StaticReports;
use mailpod_operator::controller::{lun, mailpod, Context as MailPodContext, RunConfig};
use mailpod_operator::crd::{MailPod, SiteFailover, SiteFailoverStatus, StorageLUN};
use mailpod_operator::testkit::ApiServer;
use serde_json::json;

pub const NS: &str = "mail";
pub const SF: &str = "corp-geo";
pub const INTERVAL: i64 = 5;
pub const THRESHOLD: u32 = 3;

/// A clock the test moves by hand, shared by both sites.
#[derive(Clone)]
pub struct TestClock(Arc<Mutex<Timestamp>>);

impl Clock for TestClock {
    fn now(&self) -> Timestamp {
        *self.0.lock().unwrap()
    }
}

/// The link to the peer's API (up unless cut) and to the witness cluster (up unless cut).
struct TestPeers {
    peer: ApiServer,
    cut: Arc<AtomicBool>,
    witness: ApiServer,
    witness_cut: Arc<AtomicBool>,
}

/// A client for `server`, unless the link to it is cut.
fn link(
    server: &ApiServer,
    cut: &AtomicBool,
    what: &str,
) -> BoxFuture<'static, Result<Client, String>> {
    let result = if cut.load(Ordering::SeqCst) {
        Err(format!("{what} unreachable"))
    } else {
        Ok(server.client())
    };
    Box::pin(async move { result })
}

impl PeerConnector for TestPeers {
    fn connect<'a>(
        &'a self,
        _local: &'a Client,
        _sf: &'a SiteFailover,
        _timeout: Duration,
    ) -> BoxFuture<'a, Result<Client, String>> {
        link(&self.peer, &self.cut, "peer")
    }

    fn witness<'a>(
        &'a self,
        _local: &'a Client,
        _sf: &'a SiteFailover,
        _timeout: Duration,
    ) -> BoxFuture<'a, Result<Client, String>> {
        link(&self.witness, &self.witness_cut, "witness")
    }
}

/// The peer's front ends as seen from this site: answering or not.
struct TestProbe {
    up: Arc<AtomicBool>,
}

impl FrontendProbe for TestProbe {
    fn check<'a>(
        &'a self,
        _targets: &'a [ProbeTarget],
        _timeout: Duration,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            if self.up.load(Ordering::SeqCst) {
                Ok(())
            } else {
                Err("no greeting".to_string())
            }
        })
    }
}

pub struct Site {
    pub name: &'static str,
    pub server: ApiServer,
    pub failover: failover::Context,
    mailpods: Arc<MailPodContext>,
    /// The StorageLUN controller's context (agents' reports are fixed: none).
    luns: Arc<MailPodContext>,
    /// This site's view of the peer's API.
    pub link_cut: Arc<AtomicBool>,
    /// Whether this site's front ends answer the peer's probe.
    pub frontends_up: Arc<AtomicBool>,
    /// This site's view of the witness cluster.
    pub witness_cut: Arc<AtomicBool>,
}

pub struct Sites {
    pub east: Site,
    pub west: Site,
    pub clock: TestClock,
    /// The third cluster holding the witness Lease (used when the SiteFailovers name one).
    pub witness: ApiServer,
}

/// Lease duration of the witness in tests with one: 4 probe intervals.
pub const LEASE: u32 = 20;

pub fn mailpod_manifest() -> serde_json::Value {
    json!({
        "apiVersion": "mailpod.io/v1alpha1", "kind": "MailPod",
        "metadata": {"name": "corp", "namespace": NS},
        "spec": {
            "domains": ["corp.example"],
            "postmaster": "alice@corp.example",
            "tls": {"secretName": "corp-tls"},
            "frontend": {"mx": {"replicas": 2, "serviceType": "LoadBalancer"}},
            "mailboxes": {"inline": ["alice@corp.example", "bob@corp.example", "carol@corp.example"]},
            "accessTables": {"recipientAccess": [{"pattern": "noreply@corp.example", "action": "REJECT"}]}
        }
    })
}

fn sitefailover(local: &str, peer: &str, witness: bool) -> SiteFailover {
    let mut sf = json!({
        "apiVersion": "mailpod.io/v1alpha1", "kind": "SiteFailover",
        "metadata": {"name": SF, "namespace": NS},
        "spec": {
            "mailPods": ["corp"], "localSite": local, "primarySite": "east",
            "peer": {"name": peer, "kubeconfigSecret": {"name": "peer-kubeconfig", "key": "kubeconfig"}},
            "detection": {"probeIntervalSeconds": INTERVAL, "failureThreshold": THRESHOLD, "probeTimeoutSeconds": 2},
            "targets": {"rtoSeconds": 60, "rpoSeconds": 30},
            "dns": [{"name": "mx.corp.example", "mailPod": "corp", "service": "mx"}]
        }
    });
    if !witness {
        // These scenarios exercise automatic failover without a witness, which must be asked for.
        sf["spec"]["policy"] =
            json!({"automaticFailover": true, "automaticFailoverWithoutWitness": true});
    }
    if witness {
        sf["spec"]["witness"] = json!({
            "kubeconfigSecret": {"name": "witness-kubeconfig", "key": "kubeconfig"},
            "namespace": "mailpod-witness",
            "leaseDurationSeconds": LEASE,
        });
    }
    serde_json::from_value(sf).unwrap()
}

impl Sites {
    /// Both clusters with their SiteFailover; the MailPod exists only at the primary (east); the standby's is
    /// created by mirroring.
    pub async fn new() -> Self {
        Self::build(mailpod_manifest(), false).await
    }

    /// Both sites with a witness cluster named in their SiteFailovers.
    pub async fn with_witness() -> Self {
        Self::build(mailpod_manifest(), true).await
    }

    /// As [`Sites::new`], with the primary's MailPod `corp` given.
    pub async fn with_mailpod(manifest: serde_json::Value) -> Self {
        Self::build(manifest, false).await
    }

    async fn build(manifest: serde_json::Value, witness: bool) -> Self {
        let clock = TestClock(Arc::new(Mutex::new(
            Timestamp::from_second(1_700_000_000).unwrap(),
        )));
        let (es, ws, wit) = (ApiServer::new(), ApiServer::new(), ApiServer::new());
        let east_up = Arc::new(AtomicBool::new(true));
        let west_up = Arc::new(AtomicBool::new(true));
        let east_cut = Arc::new(AtomicBool::new(false));
        let west_cut = Arc::new(AtomicBool::new(false));
        let site = |name,
                    server: &ApiServer,
                    peer: &ApiServer,
                    cut: &Arc<AtomicBool>,
                    peer_up: &Arc<AtomicBool>,
                    up: &Arc<AtomicBool>| {
            let witness_cut = Arc::new(AtomicBool::new(false));
            Site {
                name,
                server: server.clone(),
                failover: failover::Context::new(
                    server.client(),
                    name,
                    Box::new(TestPeers {
                        peer: peer.clone(),
                        cut: cut.clone(),
                        witness: wit.clone(),
                        witness_cut: witness_cut.clone(),
                    }),
                    Box::new(TestProbe {
                        up: peer_up.clone(),
                    }),
                    Box::new(clock.clone()),
                ),
                mailpods: Arc::new(MailPodContext::new(server.client(), RunConfig::default())),
                luns: Arc::new(
                    MailPodContext::new(server.client(), RunConfig::default())
                        .with_replication_source(Arc::new(StaticReports::default())),
                ),
                link_cut: cut.clone(),
                frontends_up: up.clone(),
                witness_cut,
            }
        };
        let sites = Sites {
            east: site("east", &es, &ws, &east_cut, &west_up, &east_up),
            west: site("west", &ws, &es, &west_cut, &east_up, &west_up),
            clock: clock.clone(),
            witness: wit.clone(),
        };
        let mp: Api<MailPod> = Api::namespaced(es.client(), NS);
        mp.create(
            &PostParams::default(),
            &serde_json::from_value(manifest).unwrap(),
        )
        .await
        .unwrap();
        for (s, local, peer) in [(&es, "east", "west"), (&ws, "west", "east")] {
            let api: Api<SiteFailover> = Api::namespaced(s.client(), NS);
            api.create(&PostParams::default(), &sitefailover(local, peer, witness))
                .await
                .unwrap();
        }
        sites.east.settle_mailpod().await;
        sites
    }

    /// A fresh controller for west (the old one's memory is gone), as after an operator restart: same peer
    /// link, witness link, view of east's front ends and clock.
    pub fn restart_west(&mut self) {
        self.west.failover = failover::Context::new(
            self.west.server.client(),
            self.west.name,
            Box::new(TestPeers {
                peer: self.east.server.clone(),
                cut: self.west.link_cut.clone(),
                witness: self.witness.clone(),
                witness_cut: self.west.witness_cut.clone(),
            }),
            Box::new(TestProbe {
                up: self.east.frontends_up.clone(),
            }),
            Box::new(self.clock.clone()),
        );
    }

    pub fn advance(&self, secs: i64) {
        let mut t = self.clock.0.lock().unwrap();
        *t = t
            .checked_add(jiff::SignedDuration::from_secs(secs))
            .unwrap();
    }

    /// Cuts (or restores) the link between the sites in both directions.
    pub fn partition(&self, cut: bool) {
        self.east.link_cut.store(cut, Ordering::SeqCst);
        self.west.link_cut.store(cut, Ordering::SeqCst);
    }

    /// Sites whose stores serve: the SiteFailover says it is active and no LUN of it is fenced.
    pub fn serving(&self) -> Vec<&'static str> {
        [&self.east, &self.west]
            .into_iter()
            .filter(|s| s.serving())
            .map(|s| s.name)
            .collect()
    }

    /// One probe interval: both controllers tick, both MailPod controllers reconcile, and no moment (after
    /// any single step) has two serving sites while they can see each other.
    pub async fn round(&self) {
        self.advance(INTERVAL);
        for step in 0..4 {
            match step {
                0 => self.west.tick().await,
                1 => self.east.tick().await,
                2 => self.west.settle_mailpod().await,
                _ => self.east.settle_mailpod().await,
            }
            self.assert_single_writer();
        }
    }

    pub fn assert_single_writer(&self) {
        let serving = self.serving();
        let connected = !self.east.link_cut.load(Ordering::SeqCst);
        if connected {
            assert!(serving.len() <= 1, "two sites serve at once: {serving:?}");
        }
    }
}

impl Site {
    /// The writes this site's API server took since its requests were last cleared, Events aside.
    pub fn writes(&self) -> Vec<mailpod_operator::testkit::RequestRecord> {
        self.server
            .mutating_requests()
            .into_iter()
            .filter(|r| !r.path.contains("/events"))
            .collect()
    }

    pub async fn tick(&self) {
        failover::reconcile_once(&self.failover, NS, SF)
            .await
            .unwrap_or_else(|e| panic!("tick at {}: {e}", self.name));
    }

    /// A tick that may fail (a stale decision, a conflict); returns the error text.
    pub async fn try_tick(&self) -> Result<Duration, String> {
        failover::reconcile_once(&self.failover, NS, SF)
            .await
            .map_err(|e| e.to_string())
    }

    /// Runs the MailPod reconciler until the MailPod's status settles (twice: children, then status).
    pub async fn settle_mailpod(&self) {
        let api: Api<MailPod> = Api::namespaced(self.server.client(), NS);
        for _ in 0..3 {
            let Some(mp) = api.get_opt("corp").await.unwrap() else {
                return;
            };
            mailpod::reconcile(Arc::new(mp), self.mailpods.clone())
                .await
                .unwrap_or_else(|e| panic!("MailPod reconcile at {}: {e}", self.name));
        }
        // Load balancers of this cluster hand out an address per site.
        let svc: Api<Service> = Api::namespaced(self.server.client(), NS);
        if let Some(s) = svc.get_opt("corp-mx").await.unwrap() {
            if s.status
                .as_ref()
                .and_then(|s| s.load_balancer.as_ref())
                .is_none()
            {
                let ip = if self.name == "east" {
                    "192.0.2.10"
                } else {
                    "198.51.100.10"
                };
                let body = json!({"status": {"loadBalancer": {"ingress": [{"ip": ip}]}}});
                svc.patch_status("corp-mx", &PatchParams::default(), &Patch::Merge(&body))
                    .await
                    .unwrap();
            }
        }
    }

    /// Runs the StorageLUN reconciler once for every LUN of this site.
    pub async fn settle_luns(&self) {
        for l in self.luns() {
            lun::reconcile(Arc::new(l), self.luns.clone())
                .await
                .unwrap_or_else(|e| panic!("StorageLUN reconcile at {}: {e}", self.name));
        }
    }

    pub fn status(&self) -> SiteFailoverStatus {
        self.server
            .get::<SiteFailover>(NS, SF)
            .and_then(|s| s.status)
            .unwrap_or_default()
    }

    pub fn luns(&self) -> Vec<StorageLUN> {
        self.server.list::<StorageLUN>(Some(NS))
    }

    pub fn serving(&self) -> bool {
        let luns = self.luns();
        self.status().active_site.as_deref() == Some(self.name)
            && !luns.is_empty()
            && luns.iter().all(|l| !l.spec.fenced)
    }

    pub fn mailpod(&self) -> Option<MailPod> {
        self.server.get::<MailPod>(NS, "corp")
    }

    /// Sets the replication lag every LUN of this site reports.
    pub async fn set_lag(&self, lag: f64) {
        let api: Api<StorageLUN> = Api::namespaced(self.server.client(), NS);
        for l in self.luns() {
            let body = json!({"status": {"replicationLagSeconds": lag}});
            api.patch_status(&l.name_any(), &PatchParams::default(), &Patch::Merge(&body))
                .await
                .unwrap();
        }
    }

    pub async fn annotate_failback(&self) {
        let api: Api<SiteFailover> = Api::namespaced(self.server.client(), NS);
        let body = json!({"metadata": {"annotations": {"mailpod.io/failback": "requested"}}});
        api.patch(SF, &PatchParams::default(), &Patch::Merge(&body))
            .await
            .unwrap();
    }

    /// Makes this site's next StorageLUN write time out: a tick that dies after recording its decision.
    pub fn fail_next_lun_write(&self) {
        self.server.inject(mailpod_operator::testkit::Fault::new(
            Some(http::Method::PATCH),
            "/storageluns/",
            mailpod_operator::testkit::FaultKind::Timeout,
            1,
        ));
    }
}
