//! The standby's side of block replication (`spec.replication.method: Volume`): the storage mirrors each
//! store image of the active site (Ceph RBD mirroring), and this makes the standby cluster's claims point
//! at those images, so that on promotion its stores mount the mail the active site wrote.
//!
//! On each mirror step, for every Volume LUN of the active site:
//!
//! 1. the standby's LUN of that name is created **fenced** when it does not exist yet, before the mirrored
//!    MailPod spec could make its MailPod controller create it unfenced: an unfenced LUN would start stores
//!    whose StatefulSet provisions fresh, empty claims, and those could never be bound to the mirrored
//!    images afterwards;
//! 2. for every store claim of the active site that is `Bound`, when the standby has no claim of that name:
//!    a PersistentVolume with the active site's PV name and CSI source (driver, volumeHandle, attributes,
//!    fsType, secret references), `Retain` (the standby must never delete a mirrored image) and pre-bound
//!    to the standby's claim; then that claim, as the StatefulSet's volumeClaimTemplate would make it, with
//!    `volumeName` set, so the StatefulSet adopts it.
//!
//! Nothing existing is modified or deleted: a PV of that name that is not this claim's is left alone and
//! logged.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{
    ObjectReference, PersistentVolume, PersistentVolumeClaim, PersistentVolumeSpec,
};
use kube::api::{Api, ObjectMeta, PostParams};
use kube::{Client, ResourceExt};
use tracing::warn;

use super::act::Sides;
use super::observe::timed;
use super::{Error, FIELD_MANAGER};
use crate::controller::lun::volume::is_bound;
use crate::crd::{ReplicationMethod, StorageLUN};
use crate::names::{self, labels as l};
use crate::resources::{self, store};

/// Creates what the standby lacks for the active site's Volume LUNs. Returns what it created
/// (`StorageLUN/…`, `PersistentVolume/…`, `PersistentVolumeClaim/…`).
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
    let mut changed = vec![];
    let luns: Api<StorageLUN> = Api::namespaced(local.clone(), ns);
    for theirs in peer_state
        .luns
        .iter()
        .filter(|l| l.spec.replication.method == ReplicationMethod::Volume)
    {
        let lname = theirs.name_any();
        let known = local_state.luns.iter().any(|l| l.name_any() == lname);
        // Read again: this tick may just have fenced it.
        let mut ours = timed(
            format!("StorageLUN {ns}/{lname}"),
            timeout,
            luns.get_opt(&lname),
        )
        .await?;
        if ours.is_none() && !known {
            ours = create_fenced_lun(&luns, ns, theirs, timeout).await?;
            changed.push(format!("StorageLUN/{lname} (fenced)"));
        }
        let Some(ours) = ours else { continue };
        // Only a fenced LUN whose stores are stopped gets claims from here: running stores make their own.
        if !ours.spec.fenced || stores_running(local, ns, &lname, timeout).await? {
            continue;
        }
        for ordinal in 0..theirs.spec.replicas() {
            changed.extend(
                mirror_claim(local, ns, peer, peer_ns, &ours, ordinal, peer_site, timeout).await?,
            );
        }
    }
    Ok(changed)
}

/// The active site's LUN, fenced and without its replication source, as this site's LUN until its own
/// MailPod controller adopts it (which leaves `fenced` to this controller).
async fn create_fenced_lun(
    luns: &Api<StorageLUN>,
    ns: &str,
    theirs: &StorageLUN,
    timeout: Duration,
) -> Result<Option<StorageLUN>, Error> {
    let lname = theirs.name_any();
    let mut spec = theirs.spec.clone();
    spec.fenced = true;
    spec.replication_source = None;
    let lun = StorageLUN {
        metadata: ObjectMeta {
            name: Some(lname.clone()),
            namespace: Some(ns.to_string()),
            labels: Some(theirs.labels().clone()),
            ..Default::default()
        },
        spec,
        status: None,
    };
    let pp = PostParams {
        field_manager: Some(FIELD_MANAGER.to_string()),
        ..Default::default()
    };
    let what = format!("StorageLUN {ns}/{lname} (created fenced)");
    match timed(what.clone(), timeout, luns.create(&pp, &lun)).await {
        Ok(created) => Ok(Some(created)),
        // Created meanwhile (by its MailPod controller): fenced at the next tick like any other.
        Err(Error::Kube {
            source: kube::Error::Api(s),
            ..
        }) if s.code == 409 => timed(what, timeout, luns.get_opt(&lname)).await,
        Err(e) => Err(e),
    }
}

async fn stores_running(
    local: &Client,
    ns: &str,
    lun: &str,
    timeout: Duration,
) -> Result<bool, Error> {
    let api: Api<StatefulSet> = Api::namespaced(local.clone(), ns);
    let sts = timed(format!("StatefulSet {ns}/{lun}"), timeout, api.get_opt(lun)).await?;
    Ok(sts
        .and_then(|s| s.spec)
        .and_then(|s| s.replicas)
        .is_some_and(|r| r > 0))
}

/// Mirrors the claim of replica `ordinal` when this site has none and the active site's is bound.
#[allow(clippy::too_many_arguments)]
async fn mirror_claim(
    local: &Client,
    ns: &str,
    peer: &Client,
    peer_ns: &str,
    lun: &StorageLUN,
    ordinal: i32,
    peer_site: &str,
    timeout: Duration,
) -> Result<Vec<String>, Error> {
    let claim = names::lun_pvc(&lun.name_any(), ordinal);
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(local.clone(), ns);
    let what = format!("PersistentVolumeClaim {ns}/{claim}");
    if timed(what.clone(), timeout, claims.get_opt(&claim))
        .await?
        .is_some()
    {
        return Ok(vec![]);
    }
    let peer_claims: Api<PersistentVolumeClaim> = Api::namespaced(peer.clone(), peer_ns);
    let theirs = timed(
        format!("PersistentVolumeClaim {peer_ns}/{claim} at {peer_site}"),
        timeout,
        peer_claims.get_opt(&claim),
    )
    .await?;
    let Some(volume) = theirs
        .filter(is_bound)
        .and_then(|c| c.spec.and_then(|s| s.volume_name))
    else {
        return Ok(vec![]);
    };
    let peer_volumes: Api<PersistentVolume> = Api::all(peer.clone());
    let Some(their_volume) = timed(
        format!("PersistentVolume {volume} at {peer_site}"),
        timeout,
        peer_volumes.get_opt(&volume),
    )
    .await?
    else {
        return Ok(vec![]);
    };
    let Some(pv) = mirrored_volume(&their_volume, lun, &claim, peer_site) else {
        warn!(volume = %volume, site = %peer_site, "not a CSI volume: cannot point this site at its mirrored image");
        return Ok(vec![]);
    };
    let mut created = vec![];
    let volumes: Api<PersistentVolume> = Api::all(local.clone());
    let pv_what = format!("PersistentVolume {volume}");
    match timed(pv_what.clone(), timeout, volumes.get_opt(&volume)).await? {
        None => {
            timed(pv_what, timeout, volumes.create(&post_params(), &pv)).await?;
            created.push(format!("PersistentVolume/{volume}"));
        }
        // Left from an earlier tick whose claim was not created yet: use it.
        Some(existing) if claims_for(&existing, ns, &claim) => {}
        Some(_) => {
            warn!(volume = %volume, claim = %claim, "a PersistentVolume of that name exists for another claim; left alone");
            return Ok(vec![]);
        }
    }
    let pvc = mirrored_claim(lun, ordinal, &pv);
    match timed(what, timeout, claims.create(&post_params(), &pvc)).await {
        Ok(_) => created.push(format!("PersistentVolumeClaim/{claim}")),
        Err(Error::Kube {
            source: kube::Error::Api(s),
            ..
        }) if s.code == 409 => {}
        Err(e) => return Err(e),
    }
    Ok(created)
}

fn post_params() -> PostParams {
    PostParams {
        field_manager: Some(FIELD_MANAGER.to_string()),
        ..Default::default()
    }
}

/// Whether `pv` is reserved for the claim `ns/claim`.
fn claims_for(pv: &PersistentVolume, ns: &str, claim: &str) -> bool {
    pv.spec
        .as_ref()
        .and_then(|s| s.claim_ref.as_ref())
        .is_some_and(|r| r.namespace.as_deref() == Some(ns) && r.name.as_deref() == Some(claim))
}

/// This site's PersistentVolume for the image behind the active site's `theirs`: same name and CSI
/// source (with Ceph-CSI the volumeHandle names the image by cluster and pool ID, which the standby's
/// Ceph-CSI maps through its clusterIDMapping), kept on release (`Retain`: deleting the claim must never
/// delete a mirrored image), reserved for this site's claim `claim`. `None` when it is not a CSI volume.
pub fn mirrored_volume(
    theirs: &PersistentVolume,
    lun: &StorageLUN,
    claim: &str,
    peer_site: &str,
) -> Option<PersistentVolume> {
    let spec = theirs.spec.as_ref()?;
    let csi = spec.csi.clone()?;
    let mut labels: BTreeMap<String, String> =
        resources::labels(&lun.spec.mail_pod, store::COMPONENT);
    labels.insert(l::LUN.to_string(), lun.name_any());
    labels.insert(l::MIRRORED_FROM.to_string(), peer_site.to_string());
    Some(PersistentVolume {
        metadata: ObjectMeta {
            name: theirs.metadata.name.clone(),
            labels: Some(labels),
            ..Default::default()
        },
        spec: Some(PersistentVolumeSpec {
            csi: Some(csi),
            capacity: spec.capacity.clone(),
            access_modes: spec.access_modes.clone(),
            volume_mode: spec.volume_mode.clone(),
            storage_class_name: spec.storage_class_name.clone(),
            mount_options: spec.mount_options.clone(),
            persistent_volume_reclaim_policy: Some("Retain".into()),
            claim_ref: Some(ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("PersistentVolumeClaim".into()),
                namespace: lun.namespace(),
                name: Some(claim.to_string()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        status: None,
    })
}

/// The claim of replica `ordinal` as the StatefulSet would make it, bound ahead to `pv`. Its storage
/// class and volume mode are the PV's, which binding requires (an unset class would get the cluster's
/// default and never match).
pub fn mirrored_claim(
    lun: &StorageLUN,
    ordinal: i32,
    pv: &PersistentVolume,
) -> PersistentVolumeClaim {
    let mut claim = store::store_claim(lun, ordinal);
    let pv_spec = pv.spec.clone().unwrap_or_default();
    if let Some(spec) = claim.spec.as_mut() {
        spec.volume_name = pv.metadata.name.clone();
        spec.storage_class_name = Some(pv_spec.storage_class_name.unwrap_or_default());
        spec.volume_mode = pv_spec.volume_mode;
    }
    claim
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn lun() -> StorageLUN {
        serde_json::from_value(json!({
            "apiVersion": "mailpod.io/v1alpha1", "kind": "StorageLUN",
            "metadata": {"name": "corp-lun-0", "namespace": "mail"},
            "spec": {"mailPod": "corp", "index": 0, "capacity": "50Gi", "standbys": 1,
                     "replication": {"method": "Volume", "volumeReplicationClass": "rbd"},
                     "fenced": true}
        }))
        .unwrap()
    }

    fn primary_pv() -> PersistentVolume {
        serde_json::from_value(json!({
            "metadata": {"name": "pvc-5e1f", "annotations": {"pv.kubernetes.io/provisioned-by": "rbd.csi.ceph.com"},
                         "uid": "east-uid", "resourceVersion": "77"},
            "spec": {
                "capacity": {"storage": "50Gi"},
                "accessModes": ["ReadWriteOnce"],
                "volumeMode": "Filesystem",
                "storageClassName": "ceph-rbd",
                "mountOptions": ["discard"],
                "persistentVolumeReclaimPolicy": "Delete",
                "claimRef": {"namespace": "mail", "name": "mail-corp-lun-0-1", "uid": "east-claim"},
                "csi": {"driver": "rbd.csi.ceph.com", "fsType": "ext4",
                        "volumeHandle": "0001-0009-rook-ceph-0000000000000002-5e1f",
                        "volumeAttributes": {"clusterID": "rook-ceph", "pool": "mail", "imageName": "csi-vol-5e1f"},
                        "nodeStageSecretRef": {"name": "rook-csi-rbd-node", "namespace": "rook-ceph"}},
                "nodeAffinity": {"required": {"nodeSelectorTerms": []}}
            },
            "status": {"phase": "Bound"}
        }))
        .unwrap()
    }

    #[test]
    fn the_mirrored_volume_points_at_the_same_image_and_is_never_deleted() {
        let theirs = primary_pv();
        let pv = mirrored_volume(&theirs, &lun(), "mail-corp-lun-0-1", "east").unwrap();
        let spec = pv.spec.as_ref().unwrap();
        assert_eq!(pv.metadata.name.as_deref(), Some("pvc-5e1f"));
        assert_eq!(
            spec.csi,
            theirs.spec.as_ref().unwrap().csi,
            "same CSI source"
        );
        assert_eq!(
            spec.persistent_volume_reclaim_policy.as_deref(),
            Some("Retain")
        );
        assert_eq!(spec.storage_class_name.as_deref(), Some("ceph-rbd"));
        assert_eq!(spec.access_modes, Some(vec!["ReadWriteOnce".to_string()]));
        assert_eq!(spec.volume_mode.as_deref(), Some("Filesystem"));
        assert_eq!(spec.mount_options, Some(vec!["discard".to_string()]));
        assert_eq!(spec.capacity, theirs.spec.as_ref().unwrap().capacity);
        let claim_ref = spec.claim_ref.as_ref().unwrap();
        assert_eq!(claim_ref.namespace.as_deref(), Some("mail"));
        assert_eq!(claim_ref.name.as_deref(), Some("mail-corp-lun-0-1"));
        assert_eq!(
            claim_ref.uid, None,
            "reserved by name for a claim that does not exist yet"
        );
        // Nothing of the other cluster's bookkeeping or topology comes along.
        assert_eq!(pv.metadata.uid, None);
        assert_eq!(pv.metadata.resource_version, None);
        assert_eq!(pv.metadata.annotations, None);
        assert_eq!(spec.node_affinity, None);
        assert_eq!(pv.status, None);
        let labels = pv.metadata.labels.as_ref().unwrap();
        assert_eq!(labels[l::MIRRORED_FROM], "east");
        assert_eq!(labels[l::LUN], "corp-lun-0");
        assert_eq!(labels[l::MAILPOD], "corp");

        let mut not_csi = primary_pv();
        not_csi.spec.as_mut().unwrap().csi = None;
        assert!(mirrored_volume(&not_csi, &lun(), "x", "east").is_none());
    }

    #[test]
    fn the_mirrored_claim_is_the_statefulsets_own_bound_ahead() {
        let l = lun();
        let pv = mirrored_volume(&primary_pv(), &l, "mail-corp-lun-0-1", "east").unwrap();
        let claim = mirrored_claim(&l, 1, &pv);
        let template = store::store_claim(&l, 1);
        assert_eq!(claim.metadata.name.as_deref(), Some("mail-corp-lun-0-1"));
        assert_eq!(claim.metadata.namespace.as_deref(), Some("mail"));
        assert_eq!(claim.metadata.labels, template.metadata.labels);
        let spec = claim.spec.as_ref().unwrap();
        let want = template.spec.as_ref().unwrap();
        assert_eq!(spec.resources, want.resources, "the template's size");
        assert_eq!(spec.access_modes, want.access_modes);
        assert_eq!(spec.volume_name.as_deref(), Some("pvc-5e1f"));
        assert_eq!(spec.storage_class_name.as_deref(), Some("ceph-rbd"));
        assert_eq!(spec.volume_mode.as_deref(), Some("Filesystem"));
        // The template is the StatefulSet's: same labels as its volumeClaimTemplate.
        let sts = store::build(&l, &crate::resources::Defaults::image("img"))
            .into_iter()
            .find_map(|c| match c {
                crate::resources::Child::StatefulSet(s) => Some(s),
                _ => None,
            })
            .unwrap();
        let vct = &sts.spec.unwrap().volume_claim_templates.unwrap()[0];
        assert_eq!(vct.metadata.labels, claim.metadata.labels);
        assert_eq!(vct.spec.as_ref().unwrap().resources, spec.resources);
    }
}
