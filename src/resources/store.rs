//! What a StorageLUN runs: the store StatefulSet (1 active + standbys, a PVC each), the Service that
//! selects the active replica, a headless Service for replication, and the snapshot CronJob with the
//! ServiceAccount and Role it runs under.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    StatefulSet, StatefulSetPersistentVolumeClaimRetentionPolicy, StatefulSetSpec,
    StatefulSetUpdateStrategy,
};
use k8s_openapi::api::batch::v1::{CronJob, CronJobSpec, JobSpec, JobTemplateSpec};
use k8s_openapi::api::core::v1::{
    Container, PersistentVolumeClaim, PodSpec, PodTemplateSpec, Service, ServiceAccount,
    ServicePort, ServiceSpec,
};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;

use super::pod::{self, paths, ports, volumes};
use super::{labels, object_meta, owner_reference, service_host, Child, Defaults};
use crate::crd::{PvcRetention, StorageLUN};
use crate::names::{self, labels as l};

/// Component label of store pods and their Services.
pub const COMPONENT: &str = "store";
/// Component label of snapshot job pods.
pub const SNAPSHOT_COMPONENT: &str = "snapshot";

/// What the builders of one StorageLUN share.
pub struct Context<'a> {
    lun: &'a StorageLUN,
    owner: OwnerReference,
    image: &'a str,
    cluster_domain: &'a str,
}

impl<'a> Context<'a> {
    pub fn new(lun: &'a StorageLUN, defaults: &Defaults<'a>) -> Self {
        Self {
            owner: owner_reference(lun),
            image: lun.spec.image.as_deref().unwrap_or(defaults.image),
            cluster_domain: defaults.cluster_domain,
            lun,
        }
    }

    pub fn name(&self) -> &str {
        self.lun.metadata.name.as_deref().unwrap_or_default()
    }

    fn labels(&self, component: &str) -> BTreeMap<String, String> {
        let mut out = labels(&self.lun.spec.mail_pod, component);
        out.insert(l::LUN.to_string(), self.name().to_string());
        out
    }

    /// Selects every replica of this LUN.
    pub fn replica_selector(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (l::LUN.to_string(), self.name().to_string()),
            (l::COMPONENT.to_string(), COMPONENT.to_string()),
        ])
    }

    fn meta(&self, name: String, component: &str) -> ObjectMeta {
        object_meta(
            &self.owner,
            self.lun.namespace(),
            name,
            self.labels(component),
        )
    }
}

/// Every object of a validated StorageLUN, in apply order.
pub fn build(lun: &StorageLUN, defaults: &Defaults) -> Vec<Child> {
    let ctx = Context::new(lun, defaults);
    let mut out = vec![];
    if lun.spec.snapshots.enabled {
        out.extend(snapshot_rbac(&ctx));
    }
    out.push(Child::Service(headless_service(&ctx)));
    out.push(Child::Service(active_service(&ctx)));
    if let Some(sr) = &lun.spec.site_replication {
        out.push(Child::Service(site_replication_service(&ctx, sr)));
    }
    if lun.spec.snapshots.enabled {
        out.push(Child::CronJob(snapshot_cronjob(&ctx)));
    }
    out.push(Child::StatefulSet(statefulset(&ctx)));
    out
}

fn store_ports() -> Vec<(&'static str, i32)> {
    vec![
        ("lmtp", ports::LMTP),
        ("imap", ports::IMAP),
        ("pop3", ports::POP3),
        ("sieve", ports::SIEVE),
        ("doveadm", ports::DOVEADM),
    ]
}

/// The ports of a store container: the replication certificate adds doveadm's TLS listener.
fn container_ports(lun: &StorageLUN) -> Vec<(&'static str, i32)> {
    let mut out = store_ports();
    if site_tls_secret(lun).is_some() {
        out.push((ports::DOVEADM_TLS_NAME, ports::DOVEADM_TLS));
    }
    out
}

/// The Secret of `spec.siteReplication.tls`, when the LUN is exposed to the other site.
pub fn site_tls_secret(lun: &StorageLUN) -> Option<&str> {
    lun.spec
        .site_replication
        .as_ref()
        .and_then(|sr| sr.tls.as_ref())
        .map(|t| t.secret_name.as_str())
}

fn service_ports(list: &[(&'static str, i32)]) -> Vec<ServicePort> {
    list.iter()
        .map(|(name, port)| ServicePort {
            name: Some(name.to_string()),
            port: *port,
            target_port: Some(IntOrString::String(name.to_string())),
            protocol: Some("TCP".into()),
            ..Default::default()
        })
        .collect()
}

/// Every replica by a stable name (`corp-lun-0-1.corp-lun-0-hl`), ready or not, so replicas can sync.
fn headless_service(ctx: &Context) -> Service {
    Service {
        metadata: ctx.meta(names::lun_headless(ctx.name()), COMPONENT),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            selector: Some(ctx.replica_selector()),
            ports: Some(service_ports(&store_ports())),
            publish_not_ready_addresses: Some(true),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The front ends reach the LUN here; it selects only the replica the operator labelled active, so a
/// promotion moves traffic without touching any front end.
fn active_service(ctx: &Context) -> Service {
    let mut selector = ctx.replica_selector();
    selector.insert(l::ROLE.to_string(), l::ROLE_ACTIVE.to_string());
    Service {
        metadata: ctx.meta(ctx.name().to_string(), COMPONENT),
        spec: Some(ServiceSpec {
            selector: Some(selector),
            // doveadm included: standbys replicate from whichever replica is active.
            ports: Some(service_ports(&store_ports())),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Name of the Service through which the other site's standby stores pull this LUN's mail.
pub fn site_replication_service_name(lun: &str) -> String {
    format!("{lun}-replication")
}

/// The active replica's doveadm service for the other site, over TLS only (the plain listener stays inside
/// the cluster): its address is what the peer's SiteFailover controller sets as its LUN's
/// `spec.replicationSource`.
fn site_replication_service(ctx: &Context, sr: &crate::crd::SiteReplication) -> Service {
    let mut selector = ctx.replica_selector();
    selector.insert(l::ROLE.to_string(), l::ROLE_ACTIVE.to_string());
    let mut metadata = ctx.meta(site_replication_service_name(ctx.name()), COMPONENT);
    if !sr.annotations.is_empty() {
        metadata.annotations = Some(sr.annotations.clone());
    }
    let lb = sr.service_type == crate::crd::ExposeType::LoadBalancer;
    Service {
        metadata,
        spec: Some(ServiceSpec {
            type_: Some(sr.service_type.as_str().into()),
            selector: Some(selector),
            ports: Some(service_ports(&[(
                ports::DOVEADM_TLS_NAME,
                ports::DOVEADM_TLS,
            )])),
            load_balancer_source_ranges: (lb && !sr.source_ranges.is_empty())
                .then(|| sr.source_ranges.clone()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn statefulset(ctx: &Context) -> StatefulSet {
    let spec = &ctx.lun.spec;
    let mut container_ports: Vec<_> = container_ports(ctx.lun)
        .into_iter()
        .map(|(n, p)| pod::container_port(n, p))
        .collect();
    container_ports.push(pod::container_port(ports::CONTROL_NAME, ports::CONTROL));
    let mut mounts = vec![
        pod::mount(volumes::MAIL, paths::MAIL, false),
        pod::mount(volumes::SETTINGS, paths::SETTINGS, true),
        pod::mount(volumes::TABLES, paths::TABLES, true),
    ];
    let mut volumes_ = vec![
        pod::config_map_volume(volumes::SETTINGS, &names::mail_settings(&spec.mail_pod)),
        pod::config_map_volume(volumes::TABLES, &names::access_tables(&spec.mail_pod)),
    ];
    // The pod's labels and annotations as files the kubelet keeps current: the agent learns from
    // `mailpod.io/role` whether it is the active replica or a standby, and from
    // `mailpod.io/replication-source` where a standby site pulls from, with no API access of its own.
    mounts.push(pod::mount(volumes::PODINFO, paths::PODINFO, true));
    volumes_.push(pod::podinfo_volume(volumes::PODINFO));
    // Replicas authenticate to each other's doveadm service with the LUN's replication secret.
    mounts.push(pod::mount(volumes::REPLICATION, paths::REPLICATION, true));
    volumes_.push(pod::optional_secret_volume(
        volumes::REPLICATION,
        &replication_secret(ctx.name()),
    ));
    // The control port admits only requests with the LUN's control token (see agent::control_auth).
    mounts.push(pod::mount(volumes::CONTROL, paths::CONTROL, true));
    volumes_.push(pod::optional_secret_volume(
        volumes::CONTROL,
        &control_secret(ctx.name()),
    ));
    // The certificate doveadm's TLS listener presents to the other site, and the CA this site's standbys
    // verify the other site's with. Optional, like the replication Secret: until it is there the store
    // serves without that listener (and a standby pulls nothing across sites) instead of not starting.
    let site_tls = site_tls_secret(ctx.lun);
    if let Some(secret) = site_tls {
        mounts.push(pod::mount(volumes::SITE_TLS, paths::SITE_TLS, true));
        volumes_.push(pod::optional_secret_volume(volumes::SITE_TLS, secret));
    }
    let mut env = vec![
        pod::value_env(
            "MAILPOD_CONTROL_TOKEN_FILE",
            &format!("{}/{}", paths::CONTROL, CONTROL_SECRET_KEY),
        ),
        pod::value_env("MAILPOD_LUN", ctx.name()),
        // Standbys pull from the LUN's Service by its fully qualified name, like every name a mail
        // daemon looks up (see resources::service_host).
        pod::value_env(
            "MAILPOD_LUN_HOST",
            &service_host(
                ctx.name(),
                ctx.lun.namespace().as_deref(),
                ctx.cluster_domain,
            ),
        ),
        pod::value_env(
            "MAILPOD_SYNC_INTERVAL_SECONDS",
            &spec.replication.sync_interval_seconds.to_string(),
        ),
        pod::value_env(
            "MAILPOD_MAX_DELETION_PERCENT",
            &spec.replication.max_deletion_percent.to_string(),
        ),
        pod::value_env(
            "MAILPOD_DOVEADM_PASSWORD_FILE",
            &format!("{}/{}", paths::REPLICATION, REPLICATION_SECRET_KEY),
        ),
    ];
    if site_tls.is_some() {
        env.push(pod::value_env("MAILPOD_SITE_TLS_DIR", paths::SITE_TLS));
    }
    // Users authenticate against the MailPod's passwd-file Secret, when it names one.
    env.extend(
        spec.passwd_file_secret
            .iter()
            .map(|passwd| pod::users_file(passwd, &mut mounts, &mut volumes_)),
    );
    let container = pod::agent_container(
        COMPONENT,
        ctx.image,
        container_ports,
        mounts,
        spec.resources.clone(),
        env,
    );
    let retention = match spec.pvc_retention {
        PvcRetention::Retain => "Retain",
        PvcRetention::Delete => "Delete",
    };
    StatefulSet {
        metadata: ctx.meta(ctx.name().to_string(), COMPONENT),
        spec: Some(StatefulSetSpec {
            replicas: Some(spec.replicas()),
            service_name: Some(names::lun_headless(ctx.name())),
            // Replicas are peers; which one is active is the operator's decision, not the ordinal's.
            pod_management_policy: Some("Parallel".into()),
            // A new template reaches the pods when the StorageLUN controller replaces them, one LUN at
            // a time, standbys first, the active after a switchover (controller::lun::roll).
            update_strategy: Some(StatefulSetUpdateStrategy {
                type_: Some("OnDelete".into()),
                rolling_update: None,
            }),
            selector: LabelSelector {
                match_labels: Some(ctx.replica_selector()),
                ..Default::default()
            },
            persistent_volume_claim_retention_policy: Some(
                StatefulSetPersistentVolumeClaimRetentionPolicy {
                    when_deleted: Some(retention.into()),
                    when_scaled: Some("Retain".into()),
                },
            ),
            volume_claim_templates: Some(vec![claim_template(ctx)]),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(ctx.labels(COMPONENT)),
                    ..Default::default()
                }),
                spec: Some(pod::mail_pod_spec(
                    container,
                    volumes_,
                    ctx.replica_selector(),
                )),
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The `mail` volumeClaimTemplate of the store StatefulSet.
fn claim_template(ctx: &Context) -> PersistentVolumeClaim {
    pod::claim_template(
        volumes::MAIL,
        ctx.labels(COMPONENT),
        &ctx.lun.spec.capacity,
        ctx.lun.spec.storage_class_name.clone(),
    )
}

/// The PVC the StatefulSet would create for replica `ordinal` (`mail-corp-lun-0-1`): name, namespace,
/// labels and spec of its volumeClaimTemplate. A PVC created ahead of it with these is adopted as is.
pub fn store_claim(lun: &StorageLUN, ordinal: i32) -> PersistentVolumeClaim {
    let ctx = Context::new(lun, &Defaults::image(""));
    let mut claim = claim_template(&ctx);
    claim.metadata.name = Some(names::lun_pvc(ctx.name(), ordinal));
    claim.metadata.namespace = lun.namespace();
    claim
}

/// Sets the replica count of the store StatefulSet among `children` (a fenced LUN with block replication
/// runs no store: its volumes are read-only secondaries).
pub fn set_store_replicas(children: &mut [Child], replicas: i32) {
    for child in children {
        if let Child::StatefulSet(sts) = child {
            if let Some(spec) = sts.spec.as_mut() {
                spec.replicas = Some(replicas);
            }
        }
    }
}

/// Secret holding the doveadm password the replicas of a LUN share (created once by the StorageLUN
/// controller with a random value; never part of an apply, so it is never rotated by surprise).
pub fn replication_secret(lun: &str) -> String {
    format!("{lun}-replication")
}

/// Key of the doveadm password in the replication Secret.
pub const REPLICATION_SECRET_KEY: &str = "doveadm-password";

/// Secret holding the token every request to the store agents' control port must carry (created once by
/// the StorageLUN controller with a random value, like the replication Secret).
pub fn control_secret(lun: &str) -> String {
    format!("{lun}-control")
}

/// Key of the token in the control Secret.
pub const CONTROL_SECRET_KEY: &str = "token";

/// ServiceAccount (and Role) the snapshot jobs of a LUN run as.
pub fn snapshot_service_account(lun: &str) -> String {
    format!("{lun}-snapshot")
}

/// The snapshot job may create and prune VolumeSnapshots and record results on its LUN; nothing else.
fn snapshot_rbac(ctx: &Context) -> Vec<Child> {
    let sa = snapshot_service_account(ctx.name());
    let rule = |group: &str, resources: &[&str], verbs: &[&str]| PolicyRule {
        api_groups: Some(vec![group.to_string()]),
        resources: Some(resources.iter().map(|r| r.to_string()).collect()),
        verbs: verbs.iter().map(|v| v.to_string()).collect(),
        ..Default::default()
    };
    vec![
        Child::ServiceAccount(ServiceAccount {
            metadata: ctx.meta(sa.clone(), SNAPSHOT_COMPONENT),
            automount_service_account_token: Some(true),
            ..Default::default()
        }),
        Child::Role(Role {
            metadata: ctx.meta(sa.clone(), SNAPSHOT_COMPONENT),
            rules: Some(vec![
                rule(
                    "snapshot.storage.k8s.io",
                    &["volumesnapshots"],
                    &["get", "list", "create", "delete"],
                ),
                rule("mailpod.io", &["storageluns"], &["get"]),
                rule("mailpod.io", &["storageluns/status"], &["get", "patch"]),
                rule("", &["pods"], &["get", "list"]),
                // kube's event Recorder writes events.k8s.io/v1 and patches repeats into a series.
                rule("events.k8s.io", &["events"], &["create", "patch"]),
            ]),
        }),
        Child::RoleBinding(RoleBinding {
            metadata: ctx.meta(sa.clone(), SNAPSHOT_COMPONENT),
            role_ref: RoleRef {
                api_group: "rbac.authorization.k8s.io".into(),
                kind: "Role".into(),
                name: sa.clone(),
            },
            subjects: Some(vec![Subject {
                kind: "ServiceAccount".into(),
                name: sa,
                namespace: ctx.lun.namespace(),
                ..Default::default()
            }]),
        }),
    ]
}

fn snapshot_cronjob(ctx: &Context) -> CronJob {
    let policy = &ctx.lun.spec.snapshots;
    let mut args = vec![
        "snapshot".to_string(),
        "--lun".to_string(),
        ctx.name().to_string(),
        // Its Role is namespaced; the operator checks the class (see snapshot::Options::check_class).
        "--skip-class-check".to_string(),
    ];
    if let Some(class) = &policy.volume_snapshot_class_name {
        args.extend(["--volume-snapshot-class".to_string(), class.clone()]);
    }
    let container = Container {
        name: SNAPSHOT_COMPONENT.into(),
        image: Some(ctx.image.to_string()),
        args: Some(args),
        env: Some(vec![
            k8s_openapi::api::core::v1::EnvVar {
                name: "POD_NAMESPACE".into(),
                value_from: Some(k8s_openapi::api::core::v1::EnvVarSource {
                    field_ref: Some(k8s_openapi::api::core::v1::ObjectFieldSelector {
                        field_path: "metadata.namespace".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            },
            // The job pauses the stores through their control port, which asks for this token.
            k8s_openapi::api::core::v1::EnvVar {
                name: crate::snapshot::CONTROL_TOKEN_ENV.into(),
                value_from: Some(k8s_openapi::api::core::v1::EnvVarSource {
                    secret_key_ref: Some(k8s_openapi::api::core::v1::SecretKeySelector {
                        name: control_secret(ctx.name()),
                        key: CONTROL_SECRET_KEY.into(),
                        optional: Some(false),
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            },
        ]),
        security_context: Some(restricted_security_context()),
        ..Default::default()
    };
    CronJob {
        metadata: ctx.meta(names::lun_snapshot_cronjob(ctx.name()), SNAPSHOT_COMPONENT),
        spec: Some(CronJobSpec {
            schedule: policy.schedule.clone(),
            concurrency_policy: Some("Forbid".into()),
            starting_deadline_seconds: Some(600),
            successful_jobs_history_limit: Some(3),
            failed_jobs_history_limit: Some(3),
            job_template: JobTemplateSpec {
                metadata: None,
                spec: Some(JobSpec {
                    backoff_limit: Some(2),
                    active_deadline_seconds: Some(i64::from(policy.max_pause_seconds) * 10),
                    ttl_seconds_after_finished: Some(86_400),
                    template: PodTemplateSpec {
                        metadata: Some(ObjectMeta {
                            labels: Some(ctx.labels(SNAPSHOT_COMPONENT)),
                            ..Default::default()
                        }),
                        spec: Some(PodSpec {
                            containers: vec![container],
                            restart_policy: Some("Never".into()),
                            service_account_name: Some(snapshot_service_account(ctx.name())),
                            ..Default::default()
                        }),
                    },
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The snapshot job only talks to the API server and the agent: it runs as nobody with nothing.
fn restricted_security_context() -> k8s_openapi::api::core::v1::SecurityContext {
    k8s_openapi::api::core::v1::SecurityContext {
        allow_privilege_escalation: Some(false),
        run_as_non_root: Some(true),
        run_as_user: Some(65534),
        read_only_root_filesystem: Some(true),
        capabilities: Some(k8s_openapi::api::core::v1::Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Default::default()
        }),
        seccomp_profile: Some(k8s_openapi::api::core::v1::SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}
