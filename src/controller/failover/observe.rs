//! Reading both sites for one tick. Every call is bounded by the probe timeout; a peer read that fails or
//! times out means "peer unreachable", never an error of the tick, so the local site always decides.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};

use super::machine::{LocalFencing, PeerView, TableHashes};
use super::peer::ProbeTarget;
use super::{Error, FAILBACK_ANNOTATION, FAILBACK_REQUESTED};
use crate::crd::{MailPod, ServiceKind, SiteFailover, StorageLUN};
use crate::names;

/// Runs one API call with a deadline; `what` names the object in the error.
pub async fn timed<T>(
    what: impl Into<String>,
    timeout: Duration,
    fut: impl Future<Output = Result<T, kube::Error>>,
) -> Result<T, Error> {
    let what = what.into();
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(Error::Kube { what, source }),
        Err(_) => Err(Error::Timeout { what, timeout }),
    }
}

/// One site's side of the covered MailPods.
pub struct SiteState {
    pub mailpods: BTreeMap<String, Option<MailPod>>,
    /// StorageLUNs of the covered MailPods.
    pub luns: Vec<StorageLUN>,
}

impl SiteState {
    pub async fn read(
        client: &Client,
        ns: &str,
        sf: &SiteFailover,
        timeout: Duration,
        site: &str,
    ) -> Result<Self, Error> {
        let api: Api<MailPod> = Api::namespaced(client.clone(), ns);
        let mut mailpods = BTreeMap::new();
        for mp in &sf.spec.mail_pods {
            let got = timed(
                format!("MailPod {ns}/{mp} at site {site}"),
                timeout,
                api.get_opt(mp),
            )
            .await?;
            mailpods.insert(mp.clone(), got);
        }
        let luns: Api<StorageLUN> = Api::namespaced(client.clone(), ns);
        let luns = timed(
            format!("StorageLUNs in {ns} at site {site}"),
            timeout,
            luns.list(&ListParams::default()),
        )
        .await?
        .items
        .into_iter()
        .filter(|l| sf.spec.mail_pods.contains(&l.spec.mail_pod))
        .collect();
        Ok(Self { mailpods, luns })
    }

    pub fn fencing(&self) -> LocalFencing {
        LocalFencing {
            any_fenced: self.luns.iter().any(|l| l.spec.fenced),
            any_unfenced: self.luns.iter().any(|l| !l.spec.fenced),
        }
    }

    fn hash(&self, mp: &str) -> Option<String> {
        self.mailpods
            .get(mp)
            .and_then(|m| m.as_ref())
            .and_then(|m| m.status.as_ref())
            .and_then(|s| s.access_tables_hash.clone())
    }

    /// Largest replication lag its LUNs report (how far this site's stores are behind their source).
    pub fn lag(&self) -> Option<f64> {
        self.luns
            .iter()
            .filter_map(|l| l.status.as_ref().and_then(|s| s.replication_lag_seconds))
            .reduce(f64::max)
    }
}

pub fn table_hashes(
    sf: &SiteFailover,
    local: &SiteState,
    peer: Option<&SiteState>,
) -> Vec<TableHashes> {
    sf.spec
        .mail_pods
        .iter()
        .map(|mp| TableHashes {
            mail_pod: mp.clone(),
            local: local.hash(mp),
            peer: peer.and_then(|p| p.hash(mp)),
        })
        .collect()
}

pub fn peer_view(peer_sf: Option<&SiteFailover>) -> PeerView {
    match peer_sf.and_then(|p| p.status.as_ref()) {
        Some(s) => PeerView {
            epoch: s.epoch,
            active_site: s.active_site.clone(),
        },
        None => PeerView::default(),
    }
}

pub fn failover_requested(sf: &SiteFailover) -> bool {
    sf.annotations()
        .get(crate::plugin::FAILOVER_ANNOTATION)
        .map(String::as_str)
        == Some(crate::plugin::REQUESTED)
}

pub fn failback_requested(sf: &SiteFailover) -> bool {
    sf.annotations()
        .get(FAILBACK_ANNOTATION)
        .map(String::as_str)
        == Some(FAILBACK_REQUESTED)
}

/// Public addresses of the peer's front ends: the load-balancer ingress of each covered MailPod's `mx`
/// Service and of the Services named in `spec.dns`.
pub async fn frontend_targets(
    peer: &Client,
    ns: &str,
    sf: &SiteFailover,
    timeout: Duration,
) -> Result<Vec<ProbeTarget>, Error> {
    let mut wanted: Vec<(String, ServiceKind)> = sf
        .spec
        .mail_pods
        .iter()
        .map(|mp| (mp.clone(), ServiceKind::Mx))
        .collect();
    for d in &sf.spec.dns {
        if let Some(kind) = service_kind(&d.service) {
            if !wanted.contains(&(d.mail_pod.clone(), kind)) {
                wanted.push((d.mail_pod.clone(), kind));
            }
        }
    }
    let api: Api<Service> = Api::namespaced(peer.clone(), ns);
    let mut out = vec![];
    for (mp, kind) in wanted {
        let name = names::frontend(&mp, kind);
        let Some(svc) = timed(
            format!("Service {ns}/{name} at the peer"),
            timeout,
            api.get_opt(&name),
        )
        .await?
        else {
            continue;
        };
        if let Some(host) = lb_address(&svc) {
            out.push(ProbeTarget {
                host,
                port: service_port(kind),
            });
        }
    }
    Ok(out)
}

/// The load-balancer IP or hostname of a Service.
pub fn lb_address(svc: &Service) -> Option<String> {
    svc.status
        .as_ref()?
        .load_balancer
        .as_ref()?
        .ingress
        .as_ref()?
        .iter()
        .find_map(|i| i.ip.clone().or_else(|| i.hostname.clone()))
}

pub fn service_kind(s: &str) -> Option<ServiceKind> {
    ServiceKind::ALL.into_iter().find(|k| k.as_str() == s)
}

/// The port a probe uses for a front-end service.
pub fn service_port(kind: ServiceKind) -> u16 {
    match kind {
        ServiceKind::Mx => 25,
        ServiceKind::Submission => 587,
        ServiceKind::Imap => 143,
        ServiceKind::Pop3 => 110,
        ServiceKind::Webmail => 80,
    }
}
