//! `mailpod-operator restore`: one message, one folder, one mailbox or a whole LUN from a VolumeSnapshot
//! into the live store, without stopping service for anyone else.
//!
//! Run with the credentials of the person asking (or by `kubectl mailpod restore`): validate everything
//! (the LUN, the snapshot is this LUN's and readyToUse, the mailbox is on the LUN, the flags fit
//! together) before creating anything, then create the import Job and the PVC cloned from the snapshot
//! ([`job`]). The Job runs `restore-import` ([`import`]), which copies into the live store, over its
//! doveadm service, what the snapshot holds and the live store lacks.

pub mod doveadm;
pub mod import;
pub mod job;
pub mod local;
pub mod staging;

use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, LogParams, PostParams};
use kube::{Client, ResourceExt};

use crate::crd::StorageLUN;
use crate::names::labels as l;
use crate::snapshot::volume;
pub use import::Scope;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Flags(String),
    #[error("StorageLUN {namespace}/{name} not found")]
    LunNotFound { namespace: String, name: String },
    #[error("VolumeSnapshot {namespace}/{name} not found (list this LUN's with `kubectl get volumesnapshots -l mailpod.io/lun={lun}`)")]
    SnapshotNotFound {
        namespace: String,
        name: String,
        lun: String,
    },
    #[error(
        "VolumeSnapshot {name} is not a snapshot of StorageLUN {lun}: its label {} is {found}",
        l::LUN
    )]
    SnapshotOfAnotherLun {
        name: String,
        lun: String,
        found: String,
    },
    #[error("VolumeSnapshot {name} is not readyToUse{}", .error.as_ref().map(|e| format!(": {e}")).unwrap_or_default())]
    SnapshotNotReady { name: String, error: Option<String> },
    #[error("mailbox {mailbox} is not on StorageLUN {lun} (not in its spec.mailboxes)")]
    MailboxNotOnLun { mailbox: String, lun: String },
    #[error("restore Job {job} failed: {message}")]
    JobFailed { job: String, message: String },
    #[error("restore Job {job} did not finish within {seconds}s (it keeps running; `kubectl logs job/{job}`)")]
    WaitTimeout { job: String, seconds: u64 },
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

/// The flags of `mailpod-operator restore` and `kubectl mailpod restore` (each adds its own namespace flag).
#[derive(clap::Args, Clone, Debug)]
pub struct RestoreFlags {
    /// StorageLUN holding the mailbox.
    #[arg(long)]
    pub lun: String,
    /// VolumeSnapshot of that LUN to restore from (`kubectl get volumesnapshots -l mailpod.io/lun=LUN`).
    #[arg(long)]
    pub snapshot: String,
    /// Mailbox (address) to restore.
    #[arg(long)]
    pub mailbox: Option<String>,
    /// Every mailbox of the LUN instead of one.
    #[arg(long)]
    pub all: bool,
    /// Only this folder of the mailbox (as `doveadm mailbox list` names it, e.g. `Projects` or `INBOX`).
    #[arg(long)]
    pub folder: Option<String>,
    /// Only the message with this Message-ID (with or without <>).
    #[arg(long)]
    pub message_id: Option<String>,
    /// Print the PVC and Job as YAML instead of creating them.
    #[arg(long)]
    pub dry_run: bool,
    /// Wait for the Job and print its report.
    #[arg(long)]
    pub wait: bool,
    /// Deadline of the Job (and of --wait), in seconds.
    #[arg(long, default_value_t = 3600)]
    pub timeout: u64,
    /// Mail image for the Job when the LUN names none.
    #[arg(long, env = "MAILPOD_MAIL_IMAGE", default_value = crate::names::DEFAULT_IMAGE)]
    pub image: String,
    /// The cluster's DNS domain: the Job reaches the live store by its Service's fully qualified name.
    #[arg(long, env = "MAILPOD_CLUSTER_DOMAIN", default_value = crate::resources::DEFAULT_CLUSTER_DOMAIN,
          value_parser = crate::resources::parse_cluster_domain)]
    pub cluster_domain: String,
}

impl RestoreFlags {
    /// The request these flags make in `namespace`.
    pub fn request(&self, namespace: &str) -> Request {
        let mut req = Request::new(namespace, &self.lun, &self.snapshot);
        req.mailbox = self.mailbox.clone();
        req.all = self.all;
        req.folder = self.folder.clone();
        req.message_id = self.message_id.clone();
        req.dry_run = self.dry_run;
        req.wait = self.wait;
        req.timeout = Duration::from_secs(self.timeout);
        req.image = self.image.clone();
        req.cluster_domain = self.cluster_domain.clone();
        req
    }
}

/// What a person asked for, as flags.
#[derive(Clone, Debug, Default)]
pub struct Request {
    pub namespace: String,
    pub lun: String,
    pub snapshot: String,
    pub mailbox: Option<String>,
    pub all: bool,
    pub folder: Option<String>,
    pub message_id: Option<String>,
    /// Mail image for the Job when the LUN names none.
    pub image: String,
    /// The cluster's DNS domain.
    pub cluster_domain: String,
    /// Print the objects instead of creating them.
    pub dry_run: bool,
    /// Wait for the Job and report its result.
    pub wait: bool,
    /// The Job's deadline, and how long `wait` waits.
    pub timeout: Duration,
    /// How often `wait` looks at the Job.
    pub poll: Duration,
}

impl Request {
    pub fn new(
        namespace: impl Into<String>,
        lun: impl Into<String>,
        snapshot: impl Into<String>,
    ) -> Self {
        Self {
            namespace: namespace.into(),
            lun: lun.into(),
            snapshot: snapshot.into(),
            image: crate::names::DEFAULT_IMAGE.into(),
            cluster_domain: crate::resources::DEFAULT_CLUSTER_DOMAIN.into(),
            timeout: Duration::from_secs(3600),
            poll: Duration::from_secs(2),
            ..Default::default()
        }
    }

    /// The scope the flags ask for; each refusal names the flags.
    pub fn scope(&self) -> Result<Scope> {
        let flags = |m: &str| Err(Error::Flags(m.to_string()));
        if self.mailbox.is_none() && self.message_id.is_some() {
            return flags("--message-id needs --mailbox (the mailbox the message was in)");
        }
        if self.mailbox.is_none() && self.folder.is_some() {
            return flags("--folder needs --mailbox (with --all every folder is restored)");
        }
        match (&self.mailbox, self.all) {
            (Some(_), true) => flags("--mailbox and --all exclude each other"),
            (None, false) => {
                flags("name what to restore: --mailbox ADDR, or --all for the whole LUN")
            }
            (None, true) => Ok(Scope::All),
            (Some(m), false) if !m.contains('@') => Err(Error::Flags(format!(
                "--mailbox {m:?} is not an address (user@domain)"
            ))),
            (Some(m), false) => Ok(Scope::Mailbox {
                address: m.to_lowercase(),
                folder: self.folder.clone(),
                message_id: self.message_id.clone(),
            }),
        }
    }
}

/// What `run` did.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// `--dry-run`: the objects as YAML.
    DryRun(String),
    Created {
        job: String,
        pvc: String,
        /// With `--wait`: the import's report (the Job's log).
        report: Option<String>,
    },
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::DryRun(yaml) => f.write_str(yaml),
            Outcome::Created { job, pvc, report } => {
                writeln!(f, "job/{job} created")?;
                writeln!(f, "persistentvolumeclaim/{pvc} created (cloned from the snapshot; deleted with the Job)")?;
                match report {
                    Some(r) => write!(f, "job/{job} succeeded:\n{r}"),
                    None => writeln!(f, "follow it with: kubectl logs -f job/{job}"),
                }
            }
        }
    }
}

/// Validates, then creates (or prints) the clone PVC and the import Job.
pub async fn run(client: &Client, req: &Request) -> Result<Outcome> {
    let scope = req.scope()?;
    let ns = &req.namespace;
    let luns: Api<StorageLUN> = Api::namespaced(client.clone(), ns);
    let lun = luns
        .get_opt(&req.lun)
        .await
        .map_err(api(format!("reading StorageLUN {ns}/{}", req.lun)))?
        .ok_or_else(|| Error::LunNotFound {
            namespace: ns.clone(),
            name: req.lun.clone(),
        })?;
    if let Scope::Mailbox { address, .. } = &scope {
        if !lun
            .spec
            .mailboxes
            .iter()
            .any(|m| m.eq_ignore_ascii_case(address))
        {
            return Err(Error::MailboxNotOnLun {
                mailbox: address.clone(),
                lun: req.lun.clone(),
            });
        }
    }
    let restore_size = check_snapshot(client, req).await?;

    let plan = job::Plan {
        lun: &lun,
        snapshot: &req.snapshot,
        scope: &scope,
        name: job::restore_name(&req.lun, jiff::Timestamp::now()),
        image: lun.spec.image.as_deref().unwrap_or(&req.image),
        cluster_domain: &req.cluster_domain,
        deadline_seconds: req.timeout.as_secs().max(60) as i64,
        capacity: job::clone_capacity(&lun.spec.capacity, restore_size.as_deref()),
    };
    if req.dry_run {
        return Ok(Outcome::DryRun(dry_run_yaml(&plan)));
    }
    let jobs: Api<Job> = Api::namespaced(client.clone(), ns);
    let created = jobs
        .create(&PostParams::default(), &job::job(&plan))
        .await
        .map_err(api(format!("creating Job {}", plan.name)))?;
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    if let Err(e) = pvcs
        .create(
            &PostParams::default(),
            &job::clone_pvc(&plan, Some(&created)),
        )
        .await
    {
        // Leave nothing behind: a Job without its volume would wait forever.
        let _ = jobs.delete(&plan.name, &DeleteParams::background()).await;
        return Err(api(format!(
            "creating PersistentVolumeClaim {} from VolumeSnapshot {}",
            plan.name, req.snapshot
        ))(e));
    }
    let report = if req.wait {
        Some(wait(client, req, &plan.name).await?)
    } else {
        None
    };
    Ok(Outcome::Created {
        job: plan.name.clone(),
        pvc: plan.name,
        report,
    })
}

/// The snapshot exists, belongs to this LUN (by label), and can be restored from.
/// Checks the snapshot and returns its `status.restoreSize`, when the snapshot controller set one.
async fn check_snapshot(client: &Client, req: &Request) -> Result<Option<String>> {
    let snapshots: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &req.namespace, &volume::snapshot_resource());
    let snap = snapshots
        .get_opt(&req.snapshot)
        .await
        .map_err(api(format!(
            "reading VolumeSnapshot {}/{}",
            req.namespace, req.snapshot
        )))?
        .ok_or_else(|| Error::SnapshotNotFound {
            namespace: req.namespace.clone(),
            name: req.snapshot.clone(),
            lun: req.lun.clone(),
        })?;
    let owner = snap.labels().get(l::LUN).cloned();
    if owner.as_deref() != Some(req.lun.as_str()) {
        return Err(Error::SnapshotOfAnotherLun {
            name: req.snapshot.clone(),
            lun: req.lun.clone(),
            found: owner.map_or("missing".into(), |o| format!("{o:?}")),
        });
    }
    let state = volume::state(&snap);
    if !state.ready_to_use {
        return Err(Error::SnapshotNotReady {
            name: req.snapshot.clone(),
            error: state.error,
        });
    }
    Ok(snap
        .data
        .get("status")
        .and_then(|s| s.get("restoreSize"))
        .and_then(|r| r.as_str())
        .map(str::to_string))
}

fn dry_run_yaml(plan: &job::Plan) -> String {
    let with_type = |mut v: serde_json::Value, api_version: &str, kind: &str| {
        v["apiVersion"] = api_version.into();
        v["kind"] = kind.into();
        v
    };
    let job = with_type(
        serde_json::to_value(job::job(plan)).expect("a Job serializes"),
        "batch/v1",
        "Job",
    );
    let pvc = with_type(
        serde_json::to_value(job::clone_pvc(plan, None)).expect("a PVC serializes"),
        "v1",
        "PersistentVolumeClaim",
    );
    [job, pvc]
        .iter()
        .map(|o| format!("---\n{}", serde_yaml::to_string(o).expect("YAML")))
        .collect()
}

/// Waits for the Job to finish; on success returns its pod's log (the import's report).
async fn wait(client: &Client, req: &Request, name: &str) -> Result<String> {
    let jobs: Api<Job> = Api::namespaced(client.clone(), &req.namespace);
    let finished = async {
        loop {
            let job = jobs
                .get(name)
                .await
                .map_err(api(format!("reading Job {name}")))?;
            let conditions = job
                .status
                .as_ref()
                .and_then(|s| s.conditions.clone())
                .unwrap_or_default();
            let true_ = |t: &str| {
                conditions
                    .iter()
                    .find(|c| c.type_ == t && c.status == "True")
            };
            if true_("Complete").is_some() {
                return Ok(());
            }
            if let Some(c) = true_("Failed") {
                let log = pod_log(client, &req.namespace, name).await;
                let message = c.message.clone().or(c.reason.clone()).unwrap_or_default();
                return Err(Error::JobFailed {
                    job: name.to_string(),
                    message: match log {
                        Some(l) => format!("{message}; last log lines:\n{l}"),
                        None => message,
                    },
                });
            }
            tokio::time::sleep(req.poll).await;
        }
    };
    tokio::time::timeout(req.timeout, finished)
        .await
        .map_err(|_| Error::WaitTimeout {
            job: name.to_string(),
            seconds: req.timeout.as_secs(),
        })??;
    Ok(pod_log(client, &req.namespace, name)
        .await
        .unwrap_or_else(|| "(the pod's log could not be read)\n".into()))
}

/// The last lines of the newest pod of Job `name`, if it can be read.
async fn pod_log(client: &Client, namespace: &str, name: &str) -> Option<String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let list = pods
        .list(&ListParams::default().labels(&format!("job-name={name}")))
        .await
        .ok()?;
    let newest = list
        .items
        .into_iter()
        .max_by_key(|p| p.metadata.creation_timestamp.as_ref().map(|t| t.0))?;
    let params = LogParams {
        tail_lines: Some(50),
        ..Default::default()
    };
    pods.logs(&newest.name_any(), &params).await.ok()
}
