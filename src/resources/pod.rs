//! The pieces every mail pod shares: the agent container, its probes, security context and mounts.
//! Volume and port names are constants so mounts and volumes always match.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, ConfigMapVolumeSource, Container, ContainerPort, DownwardAPIVolumeFile,
    DownwardAPIVolumeSource, EnvVar, EnvVarSource, HTTPGetAction, ObjectFieldSelector,
    PersistentVolumeClaim, PersistentVolumeClaimSpec, PodAffinityTerm, PodAntiAffinity, PodSpec,
    Probe, ResourceRequirements, SeccompProfile, SecretVolumeSource, SecurityContext, Volume,
    VolumeMount, VolumeResourceRequirements, WeightedPodAffinityTerm,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// Where the agent finds what the operator renders.
pub mod paths {
    pub const TABLES: &str = "/etc/mailpod/tables";
    pub const SETTINGS: &str = "/etc/mailpod/settings";
    pub const TLS: &str = "/etc/mailpod/tls";
    pub const PASSWD: &str = "/etc/mailpod/passwd";
    /// Postfix queue of mx and submission pods (a PVC, so queued mail survives restarts).
    pub const QUEUE: &str = "/var/spool/postfix";
    /// Maildirs of store pods (the LUN's PVC).
    pub const MAIL: &str = "/var/mail/store";
    /// Downward-API files of store pods (`labels`).
    pub const PODINFO: &str = "/etc/podinfo";
    /// The LUN's replication Secret on store pods.
    pub const REPLICATION: &str = "/etc/mailpod/replication";
    /// The LUN's control Secret on store pods.
    pub const CONTROL: &str = "/etc/mailpod/control";
    /// The cross-site replication certificate (`spec.backend.siteReplication.tls`) on store pods.
    pub const SITE_TLS: &str = "/etc/mailpod/site-tls";
}

/// Volume names.
pub mod volumes {
    pub const TABLES: &str = "access-tables";
    pub const SETTINGS: &str = "mail-settings";
    pub const TLS: &str = "tls";
    pub const PASSWD: &str = "passwd";
    pub const QUEUE: &str = "queue";
    pub const MAIL: &str = "mail";
    pub const PODINFO: &str = "podinfo";
    pub const REPLICATION: &str = "replication";
    pub const CONTROL: &str = "control";
    pub const SITE_TLS: &str = "site-tls";
}

/// Ports (container and Service).
pub mod ports {
    pub const SMTP: i32 = 25;
    pub const SUBMISSION: i32 = 587;
    pub const SUBMISSIONS: i32 = 465;
    pub const IMAP: i32 = 143;
    pub const IMAPS: i32 = 993;
    pub const POP3: i32 = 110;
    pub const POP3S: i32 = 995;
    pub const LMTP: i32 = 24;
    /// ManageSieve, on the stores and (proxied) on the imap front end.
    pub const SIEVE: i32 = 4190;
    /// doveadm's TCP service, for replication between the replicas of a LUN.
    pub const DOVEADM: i32 = 12345;
    /// doveadm's TCP service over TLS, which the other site's standby stores pull from.
    pub const DOVEADM_TLS: i32 = 12346;
    pub const DOVEADM_TLS_NAME: &str = "doveadm-tls";
    pub const HTTP: i32 = 80;
    /// The agent's /healthz, /readyz and /metrics.
    pub const METRICS: i32 = 8080;
    pub const METRICS_NAME: &str = "http-metrics";
    /// The agent's control endpoint (pause/resume for snapshots), reachable only from this MailPod's jobs
    /// and the operator.
    pub const CONTROL: i32 = 8081;
    pub const CONTROL_NAME: &str = "http-control";
}

/// Seconds a mail pod gets to drain on shutdown (Postfix finishes deliveries in progress).
pub const TERMINATION_GRACE_SECONDS: i64 = 60;

pub fn container_port(name: &str, port: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.to_string()),
        container_port: port,
        protocol: Some("TCP".into()),
        ..Default::default()
    }
}

fn http_probe(path: &str, period: i32, failure_threshold: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String(ports::METRICS_NAME.into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(3),
        failure_threshold: Some(failure_threshold),
        ..Default::default()
    }
}

/// Postfix's master and Dovecot start as root and drop to their own users: they need these capabilities
/// and nothing else (no chroot is rendered, so no SYS_CHROOT).
pub fn mail_security_context() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        privileged: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: Some(
                [
                    "CHOWN",
                    "DAC_OVERRIDE",
                    "FOWNER",
                    "KILL",
                    "NET_BIND_SERVICE",
                    "SETGID",
                    "SETUID",
                ]
                .into_iter()
                .map(String::from)
                .collect(),
            ),
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The agent container for `role`.
pub fn agent_container(
    role: &str,
    image: &str,
    mut ports_: Vec<ContainerPort>,
    mounts: Vec<VolumeMount>,
    resources: Option<ResourceRequirements>,
    extra_env: Vec<EnvVar>,
) -> Container {
    ports_.push(container_port(ports::METRICS_NAME, ports::METRICS));
    let mut env = vec![
        field_env("POD_NAME", "metadata.name"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
        // The daemons must be stopped before the kubelet's SIGKILL.
        value_env(
            "MAILPOD_GRACE_SECONDS",
            &(TERMINATION_GRACE_SECONDS - 10).to_string(),
        ),
    ];
    env.extend(extra_env);
    Container {
        name: role.to_string(),
        image: Some(image.to_string()),
        args: Some(vec![
            "agent".to_string(),
            "--role".to_string(),
            role.to_string(),
        ]),
        env: Some(env),
        ports: Some(ports_),
        volume_mounts: Some(mounts),
        resources: Some(resources.unwrap_or_else(default_resources)),
        readiness_probe: Some(http_probe("/readyz", 5, 2)),
        liveness_probe: Some(http_probe("/healthz", 10, 3)),
        security_context: Some(mail_security_context()),
        ..Default::default()
    }
}

pub fn value_env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..Default::default()
    }
}

/// Mounts the users passwd-file Secret and points the agent at the key that holds it.
pub fn users_file(
    secret: &crate::crd::KeyRef,
    mounts: &mut Vec<VolumeMount>,
    volumes_: &mut Vec<Volume>,
) -> EnvVar {
    mounts.push(mount(volumes::PASSWD, paths::PASSWD, true));
    volumes_.push(secret_volume(volumes::PASSWD, &secret.name));
    value_env(
        "MAILPOD_USERS_FILE",
        &format!("{}/{}", paths::PASSWD, secret.key),
    )
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Requests sized for a small mail pod; limits only on memory (CPU limits throttle bursts of mail).
pub fn default_resources() -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_string(), Quantity("100m".into())),
            ("memory".to_string(), Quantity("128Mi".into())),
        ])),
        limits: Some(BTreeMap::from([(
            "memory".to_string(),
            Quantity("512Mi".into()),
        )])),
        ..Default::default()
    }
}

/// A volume mount; `readOnly` only when true, since the API server drops `false` (omitempty) and what is
/// applied should be what is stored.
pub fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: read_only.then_some(true),
        ..Default::default()
    }
}

pub fn config_map_volume(name: &str, config_map: &str) -> Volume {
    Volume {
        name: name.into(),
        config_map: Some(ConfigMapVolumeSource {
            name: config_map.into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn secret_volume(name: &str, secret: &str) -> Volume {
    Volume {
        name: name.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret.into()),
            default_mode: Some(0o440),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The pod of a mail StatefulSet: one agent container, its volumes, replicas spread across nodes, time to
/// drain on shutdown, no service-link environment (hundreds of Services would flood it) and no API token.
pub fn mail_pod_spec(
    container: Container,
    volumes_: Vec<Volume>,
    spread: BTreeMap<String, String>,
) -> PodSpec {
    PodSpec {
        containers: vec![container],
        volumes: (!volumes_.is_empty()).then_some(volumes_),
        affinity: Some(Affinity {
            pod_anti_affinity: Some(spread_across_nodes(spread)),
            ..Default::default()
        }),
        termination_grace_period_seconds: Some(TERMINATION_GRACE_SECONDS),
        enable_service_links: Some(false),
        // The agent never talks to the API server: no credentials in mail pods.
        automount_service_account_token: Some(false),
        ..Default::default()
    }
}

/// A ReadWriteOnce volumeClaimTemplate of `capacity`.
pub fn claim_template(
    name: &str,
    labels: BTreeMap<String, String>,
    capacity: &str,
    storage_class: Option<String>,
) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(labels),
            ..Default::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            storage_class_name: storage_class,
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_string(),
                    Quantity(capacity.into()),
                )])),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A Secret that may not exist yet (the pod starts; the agent waits for the file).
pub fn optional_secret_volume(name: &str, secret: &str) -> Volume {
    let mut v = secret_volume(name, secret);
    if let Some(s) = v.secret.as_mut() {
        s.optional = Some(true);
    }
    v
}

/// The pod's own labels and annotations as the files `labels` and `annotations`, updated by the kubelet
/// when they change: how the operator tells a store agent its role and its replication source.
pub fn podinfo_volume(name: &str) -> Volume {
    let item = |path: &str| DownwardAPIVolumeFile {
        path: path.into(),
        field_ref: Some(ObjectFieldSelector {
            field_path: format!("metadata.{path}"),
            ..Default::default()
        }),
        ..Default::default()
    };
    Volume {
        name: name.into(),
        downward_api: Some(DownwardAPIVolumeSource {
            items: Some(vec![item("labels"), item("annotations")]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Spread replicas across nodes when the cluster has room; preferred so a one-node cluster still runs.
pub fn spread_across_nodes(selector: BTreeMap<String, String>) -> PodAntiAffinity {
    PodAntiAffinity {
        preferred_during_scheduling_ignored_during_execution: Some(vec![WeightedPodAffinityTerm {
            weight: 100,
            pod_affinity_term: PodAffinityTerm {
                label_selector: Some(LabelSelector {
                    match_labels: Some(selector),
                    ..Default::default()
                }),
                topology_key: "kubernetes.io/hostname".into(),
                ..Default::default()
            },
        }]),
        ..Default::default()
    }
}
