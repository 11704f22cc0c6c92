//! `kubectl mailpod`: the day-two commands of a mail operations team, as a kubectl plugin
//! (`kubectl-mailpod` on the PATH). Each command is a function of a `kube::Client`, so the tests drive
//! them against the in-memory API exactly as a user drives them against a cluster.

mod status;

use jiff::Timestamp;
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;

use crate::crd::{SiteFailover, StorageLUN};
use crate::names;

pub use status::status;

/// Field manager of the plugin's writes (distinct from the operator's, so ownership stays visible).
pub const FIELD_MANAGER: &str = "kubectl-mailpod";

/// Annotation on a SiteFailover asking the standby site to take over now.
pub const FAILOVER_ANNOTATION: &str = "mailpod.io/failover";
/// Annotation on a SiteFailover asking to switch back to the primary site after resync.
pub const FAILBACK_ANNOTATION: &str = "mailpod.io/failback";
/// Value of both annotations when a person asks for the switch.
pub const REQUESTED: &str = "requested";

/// Errors the plugin reports to its user, naming the object.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("{kind} {namespace}/{name} not found")]
    NotFound {
        kind: &'static str,
        namespace: String,
        name: String,
    },
    #[error("{0}")]
    Refused(String),
    #[error("Kubernetes API: {0}")]
    Api(#[from] kube::Error),
    #[error(transparent)]
    Restore(#[from] crate::restore::Error),
}

fn not_found(
    kind: &'static str,
    namespace: &str,
    name: &str,
) -> impl FnOnce(kube::Error) -> PluginError {
    let (namespace, name) = (namespace.to_string(), name.to_string());
    move |e| match e {
        kube::Error::Api(s) if s.code == 404 => PluginError::NotFound {
            kind,
            namespace,
            name,
        },
        e => PluginError::Api(e),
    }
}

/// Takes a snapshot of a LUN now: a Job made from the LUN's snapshot CronJob, as
/// `kubectl create job --from=cronjob/...` does, so it runs exactly what the schedule runs.
pub async fn snapshot_now(
    client: &Client,
    namespace: &str,
    lun: &str,
) -> Result<String, PluginError> {
    let luns: Api<StorageLUN> = Api::namespaced(client.clone(), namespace);
    luns.get(lun)
        .await
        .map_err(not_found("StorageLUN", namespace, lun))?;
    let cronjob_name = names::lun_snapshot_cronjob(lun);
    let cronjobs: Api<CronJob> = Api::namespaced(client.clone(), namespace);
    let cronjob = cronjobs.get(&cronjob_name).await.map_err(|e| match e {
        kube::Error::Api(s) if s.code == 404 => PluginError::Refused(format!(
            "StorageLUN {namespace}/{lun} has no snapshot CronJob {cronjob_name} (snapshots disabled, or not reconciled yet)"
        )),
        e => PluginError::Api(e),
    })?;
    let template = cronjob
        .spec
        .as_ref()
        .map(|s| s.job_template.clone())
        .ok_or_else(|| PluginError::Refused(format!("CronJob {cronjob_name} has no spec")))?;
    // Milliseconds, so two requests in one second make two Jobs.
    let stamp = Timestamp::now().strftime("%Y%m%d%H%M%S%3f").to_string();
    let mut meta = template.metadata.unwrap_or_default();
    meta.name = Some(format!("{}-manual-{stamp}", cronjob_name));
    meta.namespace = Some(namespace.to_string());
    meta.annotations
        .get_or_insert_with(Default::default)
        .insert("cronjob.kubernetes.io/instantiate".into(), "manual".into());
    meta.labels = cronjob.metadata.labels.clone();
    meta.owner_references = Some(vec![crate::resources::owner_reference(&cronjob)]);
    let job = Job {
        metadata: ObjectMeta { ..meta },
        spec: template.spec,
        status: None,
    };
    let jobs: Api<Job> = Api::namespaced(client.clone(), namespace);
    let created = jobs.create(&PostParams::default(), &job).await?;
    Ok(format!("job/{} created", created.name_any()))
}

/// Restores from a VolumeSnapshot into the live store: the same validation and objects as
/// `mailpod-operator restore` (see [`crate::restore`]).
pub async fn restore(
    client: &Client,
    request: &crate::restore::Request,
) -> Result<String, PluginError> {
    Ok(crate::restore::run(client, request).await?.to_string())
}

/// Fences or unfences a LUN: while fenced no replica serves as active.
pub async fn set_fenced(
    client: &Client,
    namespace: &str,
    lun: &str,
    fenced: bool,
) -> Result<String, PluginError> {
    let luns: Api<StorageLUN> = Api::namespaced(client.clone(), namespace);
    let current = luns
        .get(lun)
        .await
        .map_err(not_found("StorageLUN", namespace, lun))?;
    if current.spec.fenced == fenced {
        return Ok(format!(
            "storagelun/{lun} already {}",
            if fenced { "fenced" } else { "unfenced" }
        ));
    }
    // A merge patch: the person's decision wins over any apply that owned the field.
    luns.patch(
        lun,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"fenced": fenced}})),
    )
    .await?;
    Ok(format!(
        "storagelun/{lun} {}",
        if fenced { "fenced" } else { "unfenced" }
    ))
}

/// Asks the SiteFailover controller for a failover (`promote`) or a failback, by annotation; the controller
/// carries it out with the same steps as an automatic one and clears the annotation when done.
pub async fn request_switch(
    client: &Client,
    namespace: &str,
    site_failover: &str,
    annotation: &str,
) -> Result<String, PluginError> {
    let api: Api<SiteFailover> = Api::namespaced(client.clone(), namespace);
    let sf = api.get(site_failover).await.map_err(not_found(
        "SiteFailover",
        namespace,
        site_failover,
    ))?;
    let local = &sf.spec.local_site;
    let active = sf.status.as_ref().and_then(|s| s.active_site.clone());
    if annotation == FAILOVER_ANNOTATION && active.as_deref() == Some(local.as_str()) {
        return Err(PluginError::Refused(format!(
            "site {local} is already active for sitefailover/{site_failover}: run promote in the standby site's cluster"
        )));
    }
    if annotation == FAILBACK_ANNOTATION && active.as_deref() == Some(sf.spec.primary_site.as_str())
    {
        return Err(PluginError::Refused(format!(
            "the primary site {} is already active for sitefailover/{site_failover}: nothing to fail back",
            sf.spec.primary_site
        )));
    }
    api.patch(
        site_failover,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {annotation: REQUESTED}}})),
    )
    .await?;
    Ok(format!(
        "sitefailover/{site_failover} annotated {annotation}={REQUESTED}"
    ))
}
