//! Carrying out the state machine's actions. Each is idempotent (it compares before it writes) and uses
//! Server-Side Apply under [`FIELD_MANAGER`], so this controller owns `StorageLUN.spec.fenced` and the
//! mirrored MailPod spec without fighting the MailPod controller's own apply.

use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch,
    PatchParams, PostParams,
};
use kube::{Client, Resource, ResourceExt};
use serde_json::{json, Value};

use super::observe::{lb_address, service_kind, timed, SiteState};
use super::{Error, FIELD_MANAGER};
use crate::crd::{MailPod, SiteFailover, StorageLUN};
use crate::names;

/// Label on DNSEndpoints naming the SiteFailover that publishes them.
pub const SITEFAILOVER_LABEL: &str = "mailpod.io/sitefailover";
/// Annotation on a standby MailPod naming the site its spec is mirrored from.
pub const MIRRORED_FROM: &str = "mailpod.io/mirrored-from";

fn apply_params() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force()
}

/// A field manager of its own for each group of StorageLUN fields this controller sets (`fenced`, the
/// mirrored placement, the replication source): with Server-Side Apply, a manager's apply that leaves out
/// a field it owned removes that field, so one shared manager would unfence a LUN by mirroring its
/// placement.
fn apply_lun_part(part: &str) -> PatchParams {
    PatchParams::apply(&format!("{FIELD_MANAGER}-{part}")).force()
}

/// external-dns's `DNSEndpoint` (externaldns.k8s.io/v1alpha1).
pub fn dns_endpoint_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("externaldns.k8s.io", "v1alpha1", "DNSEndpoint"),
        "dnsendpoints",
    )
}

/// Sets `spec.fenced` on the StorageLUNs that differ. Returns the names changed.
pub async fn fence(
    client: &Client,
    ns: &str,
    luns: &[StorageLUN],
    fenced: bool,
    timeout: Duration,
    site: &str,
) -> Result<Vec<String>, Error> {
    let api: Api<StorageLUN> = Api::namespaced(client.clone(), ns);
    let mut changed = vec![];
    for lun in luns.iter().filter(|l| l.spec.fenced != fenced) {
        let name = lun.name_any();
        let body = json!({
            "apiVersion": StorageLUN::api_version(&()),
            "kind": StorageLUN::kind(&()),
            "metadata": {"name": name},
            "spec": {"fenced": fenced},
        });
        timed(
            format!("StorageLUN {ns}/{name} spec.fenced at site {site}"),
            timeout,
            api.patch(&name, &apply_params(), &Patch::Apply(&body)),
        )
        .await?;
        changed.push(name);
    }
    Ok(changed)
}

/// Records `epoch` and `active` in the peer's SiteFailover status, never lowering its epoch. Optimistic
/// locking (the read resourceVersion) keeps a concurrent write by the peer's own controller from being lost.
pub async fn tell_peer(
    peer: &Client,
    ns: &str,
    name: &str,
    epoch: i64,
    active: &str,
    timeout: Duration,
) -> Result<(), Error> {
    let api: Api<SiteFailover> = Api::namespaced(peer.clone(), ns);
    let what = format!("SiteFailover {ns}/{name} status at the peer");
    let Some(mut sf) = timed(what.clone(), timeout, api.get_opt(name)).await? else {
        return Ok(());
    };
    let mut status = sf.status.clone().unwrap_or_default();
    if status.epoch > epoch {
        return Err(Error::Superseded {
            epoch: status.epoch,
            active: status.active_site.unwrap_or_default(),
        });
    }
    if status.epoch == epoch && status.active_site.as_deref() == Some(active) {
        return Ok(());
    }
    status.epoch = epoch;
    status.active_site = Some(active.to_string());
    status.fenced = Some(sf.spec.local_site != active);
    sf.status = Some(status);
    timed(
        what,
        timeout,
        api.replace_status(name, &PostParams::default(), &sf),
    )
    .await?;
    Ok(())
}

/// Both sites as a mirror step sees them: clients, namespaces, what was read this tick, the peer's name
/// and the deadline of each call.
#[derive(Clone, Copy)]
pub struct Sides<'a> {
    pub local: &'a Client,
    pub ns: &'a str,
    pub peer: &'a Client,
    pub peer_ns: &'a str,
    pub peer_state: &'a SiteState,
    pub local_state: &'a SiteState,
    pub peer_site: &'a str,
    pub timeout: Duration,
}

/// Gives this site's MailPods the peer's spec, the ConfigMaps and Secrets their mailbox lists name, their
/// DKIM keys, and
/// the peer's LUN placement, so both sites render the same access tables (equal `accessTablesHash`).
/// LUNs are only updated, never created (the standby's MailPod controller creates and owns them), except
/// block-replicated ones, which [`super::volumes`] creates fenced and points at the mirrored images.
pub async fn mirror(sides: &Sides<'_>) -> Result<Vec<String>, Error> {
    let Sides {
        local,
        ns,
        peer,
        peer_ns,
        peer_state,
        local_state,
        peer_site,
        timeout,
    } = *sides;
    // Block-replicated LUNs first: they must exist fenced before the mirrored spec reaches the MailPod.
    let mut changed = super::volumes::mirror(sides).await?;
    let mailpods: Api<MailPod> = Api::namespaced(local.clone(), ns);
    for (name, theirs) in &peer_state.mailpods {
        let Some(theirs) = theirs else { continue };
        for (kind, src) in referenced_sources(theirs) {
            if copy_source(sides, kind, &src).await? {
                changed.push(format!("{kind}/{src}"));
            }
        }
        let ours = local_state.mailpods.get(name).and_then(|m| m.as_ref());
        // A large mailbox removal confirmed at the peer is confirmed here too: both sites place the same.
        let confirm = crate::controller::confirm::CONFIRM_MAILBOX_REMOVAL;
        let confirmed = |m: &MailPod| m.annotations().get(confirm).cloned();
        if ours.map(|m| &m.spec) != Some(&theirs.spec)
            || (confirmed(theirs).is_some() && ours.and_then(confirmed) != confirmed(theirs))
        {
            let mut annotations = serde_json::Map::new();
            annotations.insert(MIRRORED_FROM.into(), json!(peer_site));
            if let Some(c) = confirmed(theirs) {
                annotations.insert(confirm.into(), json!(c));
            }
            let body = json!({
                "apiVersion": MailPod::api_version(&()),
                "kind": MailPod::kind(&()),
                "metadata": {"name": name, "annotations": annotations},
                "spec": theirs.spec,
            });
            timed(
                format!("MailPod {ns}/{name} (mirrored spec)"),
                timeout,
                mailpods.patch(name, &apply_params(), &Patch::Apply(&body)),
            )
            .await?;
            changed.push(format!("MailPod/{name}"));
        }
    }
    let luns: Api<StorageLUN> = Api::namespaced(local.clone(), ns);
    for theirs in &peer_state.luns {
        let lname = theirs.name_any();
        let Some(ours) = local_state.luns.iter().find(|l| l.name_any() == lname) else {
            continue;
        };
        // The replicas of both sites share the primary's doveadm password, and this site's (fenced) replicas
        // pull from the primary's exposed replication Service when it has one.
        let secret = crate::resources::store::replication_secret(&lname);
        if copy_source(sides, "Secret", &secret).await? {
            changed.push(format!("Secret/{secret}"));
        }
        let source = peer_replication_address(peer, peer_ns, &lname, timeout).await?;
        if source.is_some() && ours.spec.replication_source != source {
            let body = json!({
                "apiVersion": StorageLUN::api_version(&()),
                "kind": StorageLUN::kind(&()),
                "metadata": {"name": lname},
                "spec": {"replicationSource": source},
            });
            timed(
                format!("StorageLUN {ns}/{lname} (replication source)"),
                timeout,
                luns.patch(&lname, &apply_lun_part("replication"), &Patch::Apply(&body)),
            )
            .await?;
            changed.push(format!("StorageLUN/{lname} replicationSource"));
        }
        if ours.spec.mailboxes != theirs.spec.mailboxes {
            let body = json!({
                "apiVersion": StorageLUN::api_version(&()),
                "kind": StorageLUN::kind(&()),
                "metadata": {"name": lname},
                "spec": {"mailboxes": theirs.spec.mailboxes},
            });
            timed(
                format!("StorageLUN {ns}/{lname} (mirrored placement)"),
                timeout,
                luns.patch(&lname, &apply_lun_part("placement"), &Patch::Apply(&body)),
            )
            .await?;
            changed.push(format!("StorageLUN/{lname}"));
        }
    }
    Ok(changed)
}

/// `address:port` of the peer LUN's exposed replication Service, once its load balancer has an address.
async fn peer_replication_address(
    peer: &Client,
    peer_ns: &str,
    lun: &str,
    timeout: Duration,
) -> Result<Option<String>, Error> {
    let name = crate::resources::store::site_replication_service_name(lun);
    let api: Api<k8s_openapi::api::core::v1::Service> = Api::namespaced(peer.clone(), peer_ns);
    let svc = timed(
        format!("Service {peer_ns}/{name} at the peer"),
        timeout,
        api.get_opt(&name),
    )
    .await?;
    let address = svc
        .and_then(|s| s.status)
        .and_then(|st| st.load_balancer)
        .and_then(|lb| lb.ingress)
        .and_then(|ing| ing.into_iter().find_map(|i| i.ip.or(i.hostname)));
    Ok(address.map(|a| {
        let host = if a.contains(':') { format!("[{a}]") } else { a };
        format!("{host}:{}", crate::resources::pod::ports::DOVEADM_TLS)
    }))
}

fn referenced_sources(mp: &MailPod) -> Vec<(&'static str, String)> {
    let mut out = vec![];
    for src in &mp.spec.mailboxes.from {
        if let Some(r) = &src.config_map {
            out.push(("ConfigMap", r.name.clone()));
        }
        if let Some(r) = &src.secret {
            out.push(("Secret", r.name.clone()));
        }
    }
    if let Some(r) = &mp.spec.mailboxes.passwd_file_secret {
        out.push(("Secret", r.name.clone()));
    }
    // The DKIM keys: a promoted standby signs with the keys whose records are published, not with keys of
    // its own (receivers would fail DKIM, and DMARC would refuse the mail).
    if let Some(d) = &mp.spec.dkim {
        out.push(("Secret", d.secret(&mp.name_any())));
    }
    // The cross-site replication certificate: the standby's stores verify the primary's with its ca.crt,
    // and present the same certificate once promoted.
    if let Some(t) = mp
        .spec
        .backend
        .site_replication
        .as_ref()
        .and_then(|sr| sr.tls.as_ref())
    {
        out.push(("Secret", t.secret_name.clone()));
    }
    out.sort();
    out.dedup();
    out
}

/// Copies the data of one ConfigMap or Secret from the peer when it differs. Returns whether it wrote.
async fn copy_source(sides: &Sides<'_>, kind: &'static str, name: &str) -> Result<bool, Error> {
    let Sides {
        local,
        ns,
        peer,
        peer_ns,
        peer_site,
        timeout,
        ..
    } = *sides;
    async fn data<K>(
        client: &Client,
        ns: &str,
        name: &str,
        t: Duration,
        what: String,
    ) -> Result<Option<(Value, bool)>, Error>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + serde::de::DeserializeOwned
            + serde::Serialize
            + std::fmt::Debug,
    {
        let api: Api<K> = Api::namespaced(client.clone(), ns);
        let obj = timed(what, t, api.get_opt(name)).await?;
        Ok(obj.map(|o| {
            // The operator's own: the mirror's copy says so, or (made before it said so) its fields are the
            // mirror's; or it is one the operator made at this site (a LUN's replication password, which the
            // primary's replaces so both sites' replicas share one).
            let mirrored = o.annotations().contains_key(MIRRORED_FROM)
                || o.labels()
                    .get(names::labels::MANAGED_BY)
                    .map(String::as_str)
                    == Some(names::labels::MANAGER)
                || o.meta()
                    .managed_fields
                    .iter()
                    .flatten()
                    .any(|m| m.manager.as_deref() == Some(FIELD_MANAGER));
            let v = serde_json::to_value(o).unwrap_or_default();
            (
                json!({"data": v.get("data").cloned().unwrap_or(json!({}))}),
                mirrored,
            )
        }))
    }
    let (theirs, ours) = if kind == "ConfigMap" {
        (
            data::<ConfigMap>(
                peer,
                peer_ns,
                name,
                timeout,
                format!("ConfigMap {peer_ns}/{name} at the peer"),
            )
            .await?,
            data::<ConfigMap>(local, ns, name, timeout, format!("ConfigMap {ns}/{name}")).await?,
        )
    } else {
        (
            data::<Secret>(
                peer,
                peer_ns,
                name,
                timeout,
                format!("Secret {peer_ns}/{name} at the peer"),
            )
            .await?,
            data::<Secret>(local, ns, name, timeout, format!("Secret {ns}/{name}")).await?,
        )
    };
    let Some((theirs, _)) = theirs else {
        return Ok(false);
    };
    match &ours {
        Some((ours, _)) if *ours == theirs => return Ok(false),
        // A credential or list someone else made here is never overwritten.
        Some((_, false)) => return Err(Error::NotMirrored(format!("{kind} {ns}/{name}"))),
        _ => {}
    }
    let body = json!({
        "apiVersion": "v1",
        "kind": kind,
        "metadata": {"name": name, "annotations": {MIRRORED_FROM: peer_site}},
        "data": theirs["data"],
    });
    let what = format!("{kind} {ns}/{name} (mirrored)");
    if kind == "ConfigMap" {
        let api: Api<ConfigMap> = Api::namespaced(local.clone(), ns);
        timed(
            what,
            timeout,
            api.patch(name, &apply_params(), &Patch::Apply(&body)),
        )
        .await?;
    } else {
        let api: Api<Secret> = Api::namespaced(local.clone(), ns);
        timed(
            what,
            timeout,
            api.patch(name, &apply_params(), &Patch::Apply(&body)),
        )
        .await?;
    }
    Ok(true)
}

/// Points every `spec.dns` name at this site's Service of that traffic type. Names whose Service has no
/// load-balancer address yet are returned, so the caller can say so.
pub async fn publish_dns(
    client: &Client,
    ns: &str,
    sf: &SiteFailover,
    timeout: Duration,
) -> Result<Vec<String>, Error> {
    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    let endpoints: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), ns, &dns_endpoint_resource());
    let sf_name = sf.name_any();
    let mut pending = vec![];
    for d in &sf.spec.dns {
        let Some(kind) = service_kind(&d.service) else {
            continue;
        };
        let svc_name = names::frontend(&d.mail_pod, kind);
        let svc = timed(
            format!("Service {ns}/{svc_name}"),
            timeout,
            services.get_opt(&svc_name),
        )
        .await?;
        let Some(target) = svc.as_ref().and_then(lb_address) else {
            pending.push(d.name.clone());
            continue;
        };
        let record_type = if target.parse::<std::net::Ipv4Addr>().is_ok() {
            "A"
        } else if target.parse::<std::net::Ipv6Addr>().is_ok() {
            "AAAA"
        } else {
            "CNAME"
        };
        let name = dns_endpoint_name(&sf_name, &d.name);
        let body = json!({
            "apiVersion": "externaldns.k8s.io/v1alpha1",
            "kind": "DNSEndpoint",
            "metadata": {"name": name, "labels": {SITEFAILOVER_LABEL: sf_name}},
            "spec": {"endpoints": [{
                "dnsName": d.name,
                "recordType": record_type,
                "recordTTL": d.ttl,
                "targets": [target],
            }]},
        });
        let live = timed(
            format!("DNSEndpoint {ns}/{name}"),
            timeout,
            endpoints.get_opt(&name),
        )
        .await?;
        let current = live.map(|o| o.data.get("spec").cloned().unwrap_or_default());
        if current.as_ref() == Some(&body["spec"]) {
            continue;
        }
        timed(
            format!("DNSEndpoint {ns}/{name}"),
            timeout,
            endpoints.patch(&name, &apply_params(), &Patch::Apply(&body)),
        )
        .await?;
    }
    Ok(pending)
}

/// Deletes the DNSEndpoints this SiteFailover published on a site. Returns how many.
pub async fn withdraw_dns(
    client: &Client,
    ns: &str,
    sf: &SiteFailover,
    timeout: Duration,
) -> Result<usize, Error> {
    if sf.spec.dns.is_empty() {
        return Ok(0);
    }
    let endpoints: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), ns, &dns_endpoint_resource());
    let lp = ListParams::default().labels(&format!("{SITEFAILOVER_LABEL}={}", sf.name_any()));
    let list = timed(
        format!("DNSEndpoints in {ns}"),
        timeout,
        endpoints.list(&lp),
    )
    .await?;
    for o in &list.items {
        let name = o.name_any();
        match timed(
            format!("DNSEndpoint {ns}/{name}"),
            timeout,
            endpoints.delete(&name, &DeleteParams::default()),
        )
        .await
        {
            Ok(_) => {}
            Err(Error::Kube {
                source: kube::Error::Api(s),
                ..
            }) if s.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(list.items.len())
}

/// `corp-failover-mx-example-com`: a DNS name made into an object name.
pub fn dns_endpoint_name(sf: &str, dns_name: &str) -> String {
    let mut n = format!("{sf}-{}", dns_name.trim_end_matches('.').replace('.', "-"));
    n.truncate(253);
    n.trim_end_matches('-').to_lowercase()
}

/// Removes a request annotation (`mailpod.io/failback`, `mailpod.io/failover`) from a SiteFailover when
/// present.
pub async fn clear_annotation(
    client: &Client,
    ns: &str,
    name: &str,
    annotation: &str,
    timeout: Duration,
) -> Result<(), Error> {
    let api: Api<SiteFailover> = Api::namespaced(client.clone(), ns);
    let what = format!("SiteFailover {ns}/{name} annotation {annotation}");
    let Some(sf) = timed(what.clone(), timeout, api.get_opt(name)).await? else {
        return Ok(());
    };
    if !sf.annotations().contains_key(annotation) {
        return Ok(());
    }
    let patch = json!({"metadata": {"annotations": {annotation: null}}});
    timed(
        what,
        timeout,
        api.patch(name, &PatchParams::default(), &Patch::Merge(&patch)),
    )
    .await?;
    Ok(())
}
