//! `kubectl mailpod status NAME`: a MailPod's services, LUNs, active replicas, last snapshots and site state
//! on one screen.

use std::fmt::Write as _;

use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};

use super::{not_found, PluginError};
use crate::crd::{condition, MailPod, SiteFailover, StorageLUN};
use crate::names::labels;

fn cond(
    conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    type_: &str,
) -> String {
    conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| {
            if c.message.is_empty() {
                format!("{} ({})", c.status, c.reason)
            } else {
                format!("{} ({}: {})", c.status, c.reason, c.message)
            }
        })
        .unwrap_or_else(|| "unknown".into())
}

pub async fn status(
    client: &Client,
    namespace: &str,
    mailpod: &str,
) -> Result<String, PluginError> {
    let mp = Api::<MailPod>::namespaced(client.clone(), namespace)
        .get(mailpod)
        .await
        .map_err(not_found("MailPod", namespace, mailpod))?;
    let mut luns = Api::<StorageLUN>::namespaced(client.clone(), namespace)
        .list(&ListParams::default().labels(&format!("{}={mailpod}", labels::MAILPOD)))
        .await?
        .items;
    luns.sort_by_key(|l| l.spec.index);
    let sites: Vec<SiteFailover> = Api::<SiteFailover>::namespaced(client.clone(), namespace)
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|sf| sf.spec.mail_pods.iter().any(|m| m == mailpod))
        .collect();

    let st = mp.status.clone().unwrap_or_default();
    let mut out = String::new();
    let _ = writeln!(out, "MailPod {namespace}/{mailpod}");
    let _ = writeln!(
        out,
        "  Ready:        {}",
        cond(&st.conditions, condition::READY)
    );
    let _ = writeln!(
        out,
        "  Degraded:     {}",
        cond(&st.conditions, condition::DEGRADED)
    );
    let _ = writeln!(out, "  Domains:      {}", mp.spec.domains.join(", "));
    let _ = writeln!(
        out,
        "  Mailboxes:    {} on {} LUN(s)",
        st.mailboxes, st.lun_count
    );
    let _ = writeln!(
        out,
        "  Tables hash:  {}",
        st.access_tables_hash.as_deref().unwrap_or("-")
    );
    let _ = writeln!(out, "\nSERVICE       READY");
    for s in &st.services {
        let _ = writeln!(out, "{:<13} {}/{}", s.name, s.ready, s.desired);
    }
    let _ = writeln!(
        out,
        "\n{:<20} {:>6} {:<24} {:>8} {:<22} READY",
        "LUN", "USERS", "ACTIVE", "LAG(s)", "LAST SNAPSHOT"
    );
    for lun in &luns {
        let s = lun.status.clone().unwrap_or_default();
        let active = if lun.spec.fenced {
            "(fenced)".to_string()
        } else {
            s.current_active.clone().unwrap_or_else(|| "-".into())
        };
        let lag = s
            .replication_lag_seconds
            .map(|l| format!("{l:.1}"))
            .unwrap_or_else(|| "-".into());
        let snap = s
            .last_snapshot
            .as_ref()
            .map(|r| format!("{} {}", r.time.0, r.result))
            .unwrap_or_else(|| "-".into());
        let ready = s
            .conditions
            .iter()
            .find(|c| c.type_ == condition::READY)
            .map(|c| c.status.clone())
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            out,
            "{:<20} {:>6} {:<24} {:>8} {:<22} {}",
            lun.name_any(),
            lun.spec.mailboxes.len(),
            active,
            lag,
            snap,
            ready
        );
    }
    if !st.dkim.is_empty() {
        let _ = writeln!(out, "\nDKIM: publish these TXT records");
        for r in &st.dkim {
            let _ = writeln!(out, "{} TXT \"{}\"", r.name, r.txt);
        }
    }
    if sites.is_empty() {
        let _ = writeln!(out, "\nSites: no SiteFailover covers this MailPod");
    }
    for sf in &sites {
        let s = sf.status.clone().unwrap_or_default();
        let _ = writeln!(
            out,
            "\nSiteFailover {}: {} (here) <-> {}, phase {:?}, active {}, epoch {}, tables in sync {}, lag {}",
            sf.name_any(),
            sf.spec.local_site,
            sf.spec.peer.name,
            s.phase,
            s.active_site.as_deref().unwrap_or("-"),
            s.epoch,
            s.access_tables_in_sync
                .map(|b| b.to_string())
                .unwrap_or_else(|| "-".into()),
            s.replication_lag_seconds
                .map(|l| format!("{l:.1}s"))
                .unwrap_or_else(|| "-".into()),
        );
        if let Some(w) = &s.witness {
            let _ = writeln!(
                out,
                "  witness: {}, Lease held by {}, {}",
                if w.reachable {
                    "reachable"
                } else {
                    "unreachable"
                },
                w.holder.as_deref().unwrap_or("nobody"),
                if w.quorum {
                    "in quorum"
                } else {
                    "QUORUM LOST: this site's stores are fenced"
                },
            );
        }
        if let Some(f) = &s.last_failover {
            let _ = writeln!(
                out,
                "  last {}: {} -> {} at {} (RTO {}, RPO {})",
                f.kind,
                f.from,
                f.to,
                f.started_at.0,
                f.rto_seconds
                    .map(|r| format!("{r:.1}s"))
                    .unwrap_or_else(|| "-".into()),
                f.rpo_seconds
                    .map(|r| format!("{r:.1}s"))
                    .unwrap_or_else(|| "-".into()),
            );
        }
    }
    Ok(out)
}
