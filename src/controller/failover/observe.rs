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
use crate::crd::{MailPod, ReplicationMethod, ServiceKind, SiteFailover, StorageLUN};
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

/// Replication lag of the covered LUNs, each read at the site where its method measures it: a `Dovecot`
/// LUN at the standby (its stores pull from the active site and report how far behind they are), a
/// `Volume` LUN at the active site (csi-addons reports `lastSyncTime` on primary images only; the
/// standby's secondary images report nothing). The largest figure reported; `None` when none is.
pub fn replication_lag(
    local: &SiteState,
    peer: Option<&SiteState>,
    local_active: bool,
) -> Option<f64> {
    let (active, standby) = if local_active {
        (Some(local), peer)
    } else {
        (peer, Some(local))
    };
    fn reported(site: Option<&SiteState>, method: ReplicationMethod) -> Vec<f64> {
        site.iter()
            .flat_map(|s| s.luns.iter())
            .filter(|l| l.spec.replication.method == method)
            .filter_map(|l| l.status.as_ref().and_then(|s| s.replication_lag_seconds))
            .collect()
    }
    reported(standby, ReplicationMethod::Dovecot)
        .into_iter()
        .chain(reported(active, ReplicationMethod::Volume))
        .reduce(f64::max)
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
            probe_failures: s.consecutive_probe_failures,
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn lun(name: &str, method: &str, lag: Option<f64>) -> StorageLUN {
        serde_json::from_value(json!({
            "apiVersion": "mailpod.io/v1alpha1", "kind": "StorageLUN",
            "metadata": {"name": name, "namespace": "mail"},
            "spec": {"mailPod": "corp", "index": 0, "capacity": "1Gi",
                     "replication": {"method": method, "volumeReplicationClass": "rbd"}},
            "status": {"replicationLagSeconds": lag},
        }))
        .unwrap()
    }

    fn site(luns: Vec<StorageLUN>) -> SiteState {
        SiteState {
            mailpods: BTreeMap::new(),
            luns,
        }
    }

    #[test]
    fn volume_lag_comes_from_the_active_site_and_dovecot_lag_from_the_standby() {
        let active = site(vec![
            lun("corp-lun-0", "Dovecot", Some(1.0)),
            lun("corp-lun-1", "Volume", Some(42.0)),
        ]);
        let standby = site(vec![
            lun("corp-lun-0", "Dovecot", Some(3.0)),
            // A standby's secondary images report nothing; a stale figure here must not count.
            lun("corp-lun-1", "Volume", Some(900.0)),
        ]);
        // Seen from either side, the same figure.
        assert_eq!(replication_lag(&standby, Some(&active), false), Some(42.0));
        assert_eq!(replication_lag(&active, Some(&standby), true), Some(42.0));
        // The standby alone (the active site unreachable): only what it measures itself.
        assert_eq!(replication_lag(&standby, None, false), Some(3.0));
        // Dovecot only: exactly the standby's own figure, as before.
        let dovecot_active = site(vec![lun("corp-lun-0", "Dovecot", Some(1.0))]);
        let dovecot_standby = site(vec![lun("corp-lun-0", "Dovecot", Some(3.0))]);
        assert_eq!(
            replication_lag(&dovecot_standby, Some(&dovecot_active), false),
            dovecot_standby.lag()
        );
        assert_eq!(
            replication_lag(&dovecot_active, Some(&dovecot_standby), true),
            dovecot_standby.lag()
        );
        // Volume LUNs whose images report no sync yet: unknown.
        let unreported = site(vec![lun("corp-lun-1", "Volume", None)]);
        assert_eq!(
            replication_lag(&site(vec![]), Some(&unreported), false),
            None
        );
    }
}
