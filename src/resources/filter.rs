//! Inbound filtering (`spec.filtering`): the filter ConfigMap, the rspamd, clamd and freshclam containers
//! of each mx pod, and the MailPod's Redis (a one-replica StatefulSet, its Service and NetworkPolicy).
//!
//! rspamd and clamd sit in the mx pod and answer on 127.0.0.1: the filter scales with mx, and no Service
//! or network hop lies between Postfix and its milter. Redis is one per MailPod because the greylisting
//! and Bayes state must be shared by all mx replicas (a sender's retry may reach another one). Its data is
//! a cache: losing it costs a new greylisting round, no mail, so it keeps no volume.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, Container, EmptyDirVolumeSource, ExecAction,
    PersistentVolumeClaimVolumeSource, PodSpec, PodTemplateSpec, Probe, ResourceRequirements,
    SeccompProfile, SecurityContext, Service, ServicePort, ServiceSpec, TCPSocketAction, Volume,
};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::mailpod::Context;
use super::pod::{self, mount};
use super::{labels, selector, Child};
use crate::crd::{DkimSpec, FilteringSpec, SignatureSource};
use crate::mailconfig::rspamd::{
    clamd_conf, freshclam_conf, rspamd_files, signer_files, Endpoints, CLAMD_PORT, MILTER_IN_POD,
    MILTER_PORT, REDIS_PORT,
};
use crate::mailconfig::tables::data_hash;

/// Component label of the MailPod's Redis.
pub const REDIS: &str = "filter-redis";
/// Annotation on the mx pod template: the filter ConfigMap's hash, so a change rolls the mx pods (rspamd
/// and clamd read their configuration at start).
pub const CONFIG_HASH_ANNOTATION: &str = "mailpod.io/filter-config-hash";

/// Annotation on the submission pod template: the signer ConfigMap's hash.
pub const SIGNER_HASH_ANNOTATION: &str = "mailpod.io/signer-config-hash";

const CONFIG_VOLUME: &str = "filter-config";
const SIGNER_CONFIG: &str = "signer-config";
const DKIM_KEYS: &str = "dkim-keys";
/// The DKIM keys in the signer container: `<domain>.<selector>.key`.
pub const DKIM_DIR: &str = "/etc/mailpod/dkim";
const RSPAMD_DATA: &str = "rspamd-data";
const SIGNATURES: &str = "clamav-signatures";
/// The filter ConfigMap in every filter container; rspamd reads it as its `override.d`.
const CONFIG_DIR: &str = "/etc/mailpod/filter";
const RSPAMD_CONFDIR: &str = "/etc/mailpod/rspamd";
const RSPAMD_DBDIR: &str = "/var/lib/rspamd";
const SIGNATURES_DIR: &str = "/var/lib/clamav";

/// `<mailpod>-filter`: the ConfigMap of rspamd's files, clamd.conf and freshclam.conf.
pub fn config_map_name(mailpod: &str) -> String {
    format!("{mailpod}-filter")
}

/// `<mailpod>-filter-redis`: the Redis StatefulSet and Service.
pub fn redis_name(mailpod: &str) -> String {
    format!("{mailpod}-{REDIS}")
}

/// rspamd's arguments: Debian's /etc/rspamd/rspamd.conf with `confdir/override.d` over it, state in
/// `dbdir`, in the foreground, dropping to the `_rspamd` user.
pub fn rspamd_args(confdir: &str, dbdir: &str) -> Vec<String> {
    [
        "-f",
        "-u",
        "_rspamd",
        "-g",
        "_rspamd",
        "-c",
        "/etc/rspamd/rspamd.conf",
    ]
    .map(String::from)
    .into_iter()
    .chain([
        format!("--var=LOCAL_CONFDIR={confdir}"),
        format!("--var=DBDIR={dbdir}"),
        format!("--var=RUNDIR={dbdir}"),
    ])
    .collect()
}

fn filtering<'a>(ctx: &'a Context) -> Option<&'a FilteringSpec> {
    ctx.spec().filtering.as_ref()
}

fn data(ctx: &Context, f: &FilteringSpec) -> BTreeMap<String, String> {
    let max = ctx.spec().protection.max_message_bytes();
    let ep = Endpoints::in_pod(&ctx.service_host(&redis_name(ctx.name())));
    let mut data = rspamd_files(f, max, &ep);
    if f.scans_viruses() {
        data.insert(
            "clamd.conf".into(),
            clamd_conf(max, &ep.clamd, SIGNATURES_DIR),
        );
    }
    if f.downloads_signatures() {
        data.insert(
            "freshclam.conf".into(),
            freshclam_conf(
                f.antivirus.mirror.as_deref(),
                SIGNATURES_DIR,
                &format!("{CONFIG_DIR}/clamd.conf"),
            ),
        );
    }
    data
}

/// `<mailpod>-signer`: the ConfigMap of the DKIM signer's rspamd files (submission pods).
pub fn signer_config_map_name(mailpod: &str) -> String {
    format!("{mailpod}-signer")
}

fn config_map(ctx: &Context, name: String, data: BTreeMap<String, String>) -> ConfigMap {
    let hash = data_hash(&data);
    let mut cm = ConfigMap {
        metadata: ctx.meta(name, "config"),
        data: Some(data),
        ..Default::default()
    };
    cm.metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(super::config_map::HASH_ANNOTATION.into(), hash);
    cm
}

fn signer_data(d: &DkimSpec) -> BTreeMap<String, String> {
    signer_files(&d.selector, DKIM_DIR, MILTER_IN_POD)
}

/// The MailPod-level objects of filtering (ConfigMap, Redis NetworkPolicy, Service and StatefulSet) and
/// of DKIM signing (the signer's ConfigMap; its keys are [`crate::controller::dkim`]'s).
pub fn build(ctx: &Context) -> Vec<Child> {
    let mut out = vec![];
    if let Some(f) = filtering(ctx) {
        out.extend([
            Child::ConfigMap(config_map(ctx, config_map_name(ctx.name()), data(ctx, f))),
            Child::NetworkPolicy(redis_policy(ctx)),
            Child::Service(redis_service(ctx)),
            Child::StatefulSet(redis_statefulset(ctx)),
        ]);
    }
    if let Some(d) = &ctx.spec().dkim {
        out.push(Child::ConfigMap(config_map(
            ctx,
            signer_config_map_name(ctx.name()),
            signer_data(d),
        )));
    }
    out
}

/// What the submission pod gains with `spec.dkim`: the signer (rspamd, signing only, on 127.0.0.1) with
/// the keys mounted read-only in it alone, and the annotation that rolls the pods when its files change.
pub fn submission_parts(ctx: &Context, image: &str) -> Option<MxFilter> {
    let d = ctx.spec().dkim.as_ref()?;
    let hash = data_hash(&signer_data(d));
    let container = Container {
        name: "dkim-signer".into(),
        image: Some(image.into()),
        command: Some(vec!["rspamd".into()]),
        args: Some(rspamd_args(RSPAMD_CONFDIR, RSPAMD_DBDIR)),
        ports: Some(vec![pod::container_port("milter", MILTER_PORT.into())]),
        volume_mounts: Some(vec![
            mount(SIGNER_CONFIG, &format!("{RSPAMD_CONFDIR}/override.d"), true),
            mount(RSPAMD_DATA, RSPAMD_DBDIR, false),
            mount(DKIM_KEYS, DKIM_DIR, true),
        ]),
        resources: Some(sized("50m", "128Mi", "512Mi")),
        startup_probe: Some(loopback_probe(MILTER_PORT, 10, 30)),
        liveness_probe: Some(loopback_probe(MILTER_PORT, 20, 3)),
        security_context: Some(pod::mail_security_context()),
        ..Default::default()
    };
    // rspamd reads a key when it signs, as the unprivileged `_rspamd`, which is in no group of the pod's;
    // the keys are mounted in this container only. New keys (a domain added) appear without a restart.
    let mut keys = pod::secret_volume(DKIM_KEYS, &d.secret(ctx.name()));
    if let Some(s) = keys.secret.as_mut() {
        s.default_mode = Some(0o444);
    }
    Some(MxFilter {
        containers: vec![container],
        volumes: vec![
            pod::config_map_volume(SIGNER_CONFIG, &signer_config_map_name(ctx.name())),
            empty_dir(RSPAMD_DATA),
            keys,
        ],
        annotations: BTreeMap::from([(SIGNER_HASH_ANNOTATION.to_string(), hash)]),
    })
}

/// What an mx pod gains with filtering (or a submission pod with DKIM signing): containers, volumes and
/// the template annotation.
pub struct MxFilter {
    pub containers: Vec<Container>,
    pub volumes: Vec<Volume>,
    pub annotations: BTreeMap<String, String>,
}

pub fn mx_parts(ctx: &Context, image: &str) -> Option<MxFilter> {
    let f = filtering(ctx)?;
    let hash = data_hash(&data(ctx, f));
    let config = |path: &str| mount(CONFIG_VOLUME, path, true);
    let mut containers = vec![Container {
        name: "rspamd".into(),
        image: Some(image.into()),
        command: Some(vec!["rspamd".into()]),
        args: Some(rspamd_args(RSPAMD_CONFDIR, RSPAMD_DBDIR)),
        ports: Some(vec![pod::container_port("milter", MILTER_PORT.into())]),
        volume_mounts: Some(vec![
            config(&format!("{RSPAMD_CONFDIR}/override.d")),
            mount(RSPAMD_DATA, RSPAMD_DBDIR, false),
        ]),
        resources: Some(
            f.resources
                .clone()
                .unwrap_or_else(|| sized("100m", "256Mi", "1Gi")),
        ),
        // No readiness probe: whether mx takes mail while rspamd is away is `whenDown`'s to decide, not
        // the Service's. A hung rspamd is restarted.
        startup_probe: Some(loopback_probe(MILTER_PORT, 10, 30)),
        liveness_probe: Some(loopback_probe(MILTER_PORT, 20, 3)),
        security_context: Some(pod::mail_security_context()),
        ..Default::default()
    }];
    let mut volumes = vec![
        pod::config_map_volume(CONFIG_VOLUME, &config_map_name(ctx.name())),
        empty_dir(RSPAMD_DATA),
    ];
    if f.scans_viruses() {
        let av = &f.antivirus;
        let offline = av.signatures == SignatureSource::Volume;
        // clamd cannot start without signatures; until freshclam's first download it waits (rspamd
        // meanwhile passes mail unscanned for viruses, still scanned for spam).
        let start = format!(
            "until [ -e {SIGNATURES_DIR}/main.cvd ] || [ -e {SIGNATURES_DIR}/main.cld ]; do \
             echo waiting for ClamAV signatures in {SIGNATURES_DIR}; sleep 10; done; \
             exec clamd --config-file={CONFIG_DIR}/clamd.conf"
        );
        containers.push(Container {
            name: "clamd".into(),
            image: Some(image.into()),
            command: Some(vec!["sh".into(), "-c".into(), start]),
            volume_mounts: Some(vec![
                config(CONFIG_DIR),
                mount(SIGNATURES, SIGNATURES_DIR, offline),
            ]),
            resources: Some(
                av.resources
                    .clone()
                    .unwrap_or_else(|| sized("100m", "1536Mi", "3Gi")),
            ),
            // The first download of the signatures may take minutes.
            startup_probe: Some(loopback_probe(CLAMD_PORT, 10, 180)),
            liveness_probe: Some(loopback_probe(CLAMD_PORT, 20, 3)),
            security_context: Some(pod::mail_security_context()),
            ..Default::default()
        });
        if offline {
            volumes.push(Volume {
                name: SIGNATURES.into(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: av.signatures_claim_name.clone().unwrap_or_default(),
                    read_only: Some(true),
                }),
                ..Default::default()
            });
        } else {
            containers.push(Container {
                name: "freshclam".into(),
                image: Some(image.into()),
                command: Some(vec![
                    "freshclam".into(),
                    "--daemon".into(),
                    format!("--config-file={CONFIG_DIR}/freshclam.conf"),
                ]),
                volume_mounts: Some(vec![
                    config(CONFIG_DIR),
                    mount(SIGNATURES, SIGNATURES_DIR, false),
                ]),
                resources: Some(sized("10m", "64Mi", "512Mi")),
                security_context: Some(pod::mail_security_context()),
                ..Default::default()
            });
            volumes.push(empty_dir(SIGNATURES));
        }
    }
    Some(MxFilter {
        containers,
        volumes,
        annotations: BTreeMap::from([(CONFIG_HASH_ANNOTATION.to_string(), hash)]),
    })
}

fn sized(cpu: &str, memory: &str, memory_limit: &str) -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_string(), Quantity(cpu.into())),
            ("memory".to_string(), Quantity(memory.into())),
        ])),
        limits: Some(BTreeMap::from([(
            "memory".to_string(),
            Quantity(memory_limit.into()),
        )])),
        ..Default::default()
    }
}

/// A probe of a daemon that listens on 127.0.0.1 only (rspamd's milter, clamd): the kubelet's TCP probes
/// connect to the pod's address, where nothing listens, so the container connects to itself (bash's
/// `/dev/tcp`; bash is essential in Debian, so in every image built from mail-image/).
fn loopback_probe(port: u16, period: i32, failure_threshold: i32) -> Probe {
    Probe {
        exec: Some(ExecAction {
            command: Some(vec![
                "bash".into(),
                "-c".into(),
                format!("exec 3<>/dev/tcp/127.0.0.1/{port}"),
            ]),
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(5),
        failure_threshold: Some(failure_threshold),
        ..Default::default()
    }
}

fn tcp_probe(port: u16, period: i32, failure_threshold: i32) -> Probe {
    Probe {
        tcp_socket: Some(TCPSocketAction {
            port: IntOrString::Int(port.into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failure_threshold),
        ..Default::default()
    }
}

fn empty_dir(name: &str) -> Volume {
    Volume {
        name: name.into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Default::default()
    }
}

fn redis_service(ctx: &Context) -> Service {
    Service {
        metadata: ctx.meta(redis_name(ctx.name()), REDIS),
        spec: Some(ServiceSpec {
            selector: Some(selector(ctx.name(), REDIS)),
            ports: Some(vec![ServicePort {
                name: Some("redis".into()),
                port: REDIS_PORT.into(),
                target_port: Some(IntOrString::String("redis".into())),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Only this MailPod's mx pods reach its Redis (it has no password; the policy is its lock).
fn redis_policy(ctx: &Context) -> NetworkPolicy {
    NetworkPolicy {
        metadata: ctx.meta(redis_name(ctx.name()), REDIS),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(selector(ctx.name(), REDIS)),
                ..Default::default()
            }),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(vec![NetworkPolicyIngressRule {
                ports: Some(vec![NetworkPolicyPort {
                    port: Some(IntOrString::Int(REDIS_PORT.into())),
                    protocol: Some("TCP".into()),
                    ..Default::default()
                }]),
                from: Some(vec![NetworkPolicyPeer {
                    pod_selector: Some(LabelSelector {
                        match_labels: Some(selector(ctx.name(), "mx")),
                        ..Default::default()
                    }),
                    ..Default::default()
                }]),
            }]),
            ..Default::default()
        }),
    }
}

fn redis_statefulset(ctx: &Context) -> StatefulSet {
    let args = [
        "--bind",
        "0.0.0.0",
        "--port",
        "6379",
        // The NetworkPolicy admits only mx pods; protected mode would refuse them (no password is set).
        "--protected-mode",
        "no",
        "--save",
        "",
        "--appendonly",
        "no",
        "--maxmemory",
        "200mb",
        "--maxmemory-policy",
        "volatile-lru",
    ];
    let container = Container {
        name: "redis".into(),
        image: Some(ctx.image().into()),
        command: Some(vec!["redis-server".into()]),
        args: Some(args.map(String::from).to_vec()),
        ports: Some(vec![pod::container_port("redis", REDIS_PORT.into())]),
        resources: Some(sized("50m", "64Mi", "256Mi")),
        readiness_probe: Some(tcp_probe(REDIS_PORT, 10, 3)),
        liveness_probe: Some(tcp_probe(REDIS_PORT, 20, 3)),
        // Redis needs no privilege and writes nothing (no persistence).
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            run_as_non_root: Some(true),
            run_as_user: Some(65534),
            run_as_group: Some(65534),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    StatefulSet {
        metadata: ctx.meta(redis_name(ctx.name()), REDIS),
        spec: Some(StatefulSetSpec {
            replicas: Some(1),
            service_name: Some(redis_name(ctx.name())),
            selector: LabelSelector {
                match_labels: Some(selector(ctx.name(), REDIS)),
                ..Default::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(ctx.name(), REDIS)),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    enable_service_links: Some(false),
                    automount_service_account_token: Some(false),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}
