//! The front-end tier: per traffic type a StatefulSet, a headless Service, a client-facing Service and a
//! PodDisruptionBudget.

use k8s_openapi::api::apps::v1::{
    StatefulSet, StatefulSetPersistentVolumeClaimRetentionPolicy, StatefulSetSpec,
};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, PersistentVolumeClaim, PodTemplateSpec, Probe, Service, ServicePort,
    ServiceSpec, TCPSocketAction,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::mailpod::Context;
use super::pod::{self, paths, ports, volumes};
use super::{labels, selector, Child};
use crate::crd::{ExposeType, ServiceKind};
use crate::names;

/// Size of each mx and submission pod's queue volume.
pub const QUEUE_CAPACITY: &str = "5Gi";

/// Whether pods of `kind` keep a Postfix queue (mx: inbound; submission: outbound) and so a queue PVC each.
pub fn has_queue(kind: ServiceKind) -> bool {
    matches!(kind, ServiceKind::Mx | ServiceKind::Submission)
}

/// Named ports a front-end service listens on. The implicit-TLS ports (RFC 8314: submissions, imaps,
/// pop3s) only with a certificate (`tls`), since without one nothing answers there.
pub fn service_ports(kind: ServiceKind, tls: bool) -> Vec<(&'static str, i32)> {
    let mut out = match kind {
        ServiceKind::Mx => vec![("smtp", ports::SMTP)],
        ServiceKind::Submission => vec![("submission", ports::SUBMISSION)],
        ServiceKind::Imap => vec![("imap", ports::IMAP), ("sieve", ports::SIEVE)],
        ServiceKind::Pop3 => vec![("pop3", ports::POP3)],
        ServiceKind::Webmail => vec![("http", ports::HTTP)],
    };
    let implicit = match kind {
        ServiceKind::Submission => Some(("submissions", ports::SUBMISSIONS)),
        ServiceKind::Imap => Some(("imaps", ports::IMAPS)),
        ServiceKind::Pop3 => Some(("pop3s", ports::POP3S)),
        ServiceKind::Mx | ServiceKind::Webmail => None,
    };
    if let Some(p) = implicit.filter(|_| tls) {
        out.insert(1, p);
    }
    out
}

/// Every object of one enabled front-end service.
pub fn build(ctx: &Context, kind: ServiceKind) -> Vec<Child> {
    let svc = ctx.spec().frontend.get(kind);
    let mut out = vec![
        Child::Service(headless_service(ctx, kind)),
        Child::Service(client_service(ctx, kind)),
    ];
    if svc.replicas >= 2 {
        out.push(Child::PodDisruptionBudget(pdb(ctx, kind)));
    }
    out.push(Child::StatefulSet(statefulset(ctx, kind)));
    out
}

fn headless_service(ctx: &Context, kind: ServiceKind) -> Service {
    Service {
        metadata: ctx.meta(names::frontend_headless(ctx.name(), kind), kind.as_str()),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            selector: Some(selector(ctx.name(), kind.as_str())),
            ports: Some(to_service_ports(ctx, kind)),
            publish_not_ready_addresses: Some(true),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn client_service(ctx: &Context, kind: ServiceKind) -> Service {
    let svc = ctx.spec().frontend.get(kind);
    let mut metadata = ctx.meta(names::frontend(ctx.name(), kind), kind.as_str());
    if !svc.service_annotations.is_empty() {
        metadata.annotations = Some(svc.service_annotations.clone());
    }
    let external = svc.service_type != ExposeType::ClusterIP;
    Service {
        metadata,
        spec: Some(ServiceSpec {
            type_: Some(svc.service_type.as_str().into()),
            selector: Some(selector(ctx.name(), kind.as_str())),
            ports: Some(to_service_ports(ctx, kind)),
            // Mail filtering (postscreen, rate limits, DNSBLs) needs the client's own address.
            external_traffic_policy: external.then(|| "Local".into()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn to_service_ports(ctx: &Context, kind: ServiceKind) -> Vec<ServicePort> {
    service_ports(kind, ctx.spec().tls.is_some())
        .into_iter()
        .map(|(name, port)| ServicePort {
            name: Some(name.into()),
            port,
            target_port: Some(IntOrString::String(name.into())),
            protocol: Some("TCP".into()),
            ..Default::default()
        })
        .collect()
}

/// Voluntary disruptions (drains, upgrades) never take the service below one ready replica.
fn pdb(ctx: &Context, kind: ServiceKind) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: ctx.meta(names::frontend(ctx.name(), kind), kind.as_str()),
        spec: Some(PodDisruptionBudgetSpec {
            min_available: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector(ctx.name(), kind.as_str())),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn statefulset(ctx: &Context, kind: ServiceKind) -> StatefulSet {
    let spec = ctx.spec();
    let svc = spec.frontend.get(kind);
    let image = svc.image.clone().unwrap_or_else(|| ctx.image().to_string());
    let container_ports: Vec<ContainerPort> = service_ports(kind, spec.tls.is_some())
        .into_iter()
        .map(|(name, port)| pod::container_port(name, port))
        .collect();
    let mut volumes_ = vec![];
    let container = if kind == ServiceKind::Webmail {
        webmail_container(&image, container_ports, svc.resources.clone())
    } else {
        let mut mounts = vec![
            pod::mount(volumes::TABLES, paths::TABLES, true),
            pod::mount(volumes::SETTINGS, paths::SETTINGS, true),
        ];
        volumes_.push(pod::config_map_volume(
            volumes::TABLES,
            &names::access_tables(ctx.name()),
        ));
        volumes_.push(pod::config_map_volume(
            volumes::SETTINGS,
            &names::mail_settings(ctx.name()),
        ));
        if let Some(tls) = &spec.tls {
            mounts.push(pod::mount(volumes::TLS, paths::TLS, true));
            volumes_.push(pod::secret_volume(volumes::TLS, &tls.secret_name));
        }
        let mut env = vec![];
        if kind == ServiceKind::Submission {
            if let Some(passwd) = &spec.mailboxes.passwd_file_secret {
                env.push(pod::users_file(passwd, &mut mounts, &mut volumes_));
            }
        }
        if has_queue(kind) {
            mounts.push(pod::mount(volumes::QUEUE, paths::QUEUE, false));
        }
        pod::agent_container(
            kind.as_str(),
            &image,
            container_ports,
            mounts,
            svc.resources.clone(),
            env,
        )
    };
    let labels_ = labels(ctx.name(), kind.as_str());
    let mut pod_spec = pod::mail_pod_spec(container, volumes_, selector(ctx.name(), kind.as_str()));
    let mut annotations = None;
    let extra = match kind {
        ServiceKind::Mx => super::filter::mx_parts(ctx, &image),
        ServiceKind::Submission => super::filter::submission_parts(ctx, &image),
        _ => None,
    };
    if let Some(f) = extra {
        pod_spec.containers.extend(f.containers);
        pod_spec
            .volumes
            .get_or_insert_with(Vec::new)
            .extend(f.volumes);
        annotations = Some(f.annotations);
    }
    StatefulSet {
        metadata: ctx.meta(names::frontend(ctx.name(), kind), kind.as_str()),
        spec: Some(StatefulSetSpec {
            replicas: Some(svc.replicas),
            service_name: Some(names::frontend_headless(ctx.name(), kind)),
            pod_management_policy: Some("Parallel".into()),
            selector: LabelSelector {
                match_labels: Some(selector(ctx.name(), kind.as_str())),
                ..Default::default()
            },
            // Queued mail is data: a queue volume outlives its pod and its StatefulSet.
            persistent_volume_claim_retention_policy: has_queue(kind).then(|| {
                StatefulSetPersistentVolumeClaimRetentionPolicy {
                    when_deleted: Some("Retain".into()),
                    when_scaled: Some("Retain".into()),
                }
            }),
            volume_claim_templates: has_queue(kind).then(|| vec![queue_claim(ctx, kind)]),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels_),
                    annotations,
                    ..Default::default()
                }),
                spec: Some(pod_spec),
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn queue_claim(ctx: &Context, kind: ServiceKind) -> PersistentVolumeClaim {
    pod::claim_template(
        volumes::QUEUE,
        labels(ctx.name(), kind.as_str()),
        QUEUE_CAPACITY,
        ctx.spec().backend.lun_template.storage_class_name.clone(),
    )
}

/// Webmail runs the user's image (none ships in the mail image); probed on its HTTP port.
fn webmail_container(
    image: &str,
    ports_: Vec<ContainerPort>,
    resources: Option<k8s_openapi::api::core::v1::ResourceRequirements>,
) -> Container {
    let probe = Probe {
        tcp_socket: Some(TCPSocketAction {
            port: IntOrString::String("http".into()),
            ..Default::default()
        }),
        period_seconds: Some(10),
        ..Default::default()
    };
    Container {
        name: ServiceKind::Webmail.as_str().into(),
        image: Some(image.into()),
        ports: Some(ports_),
        resources: Some(resources.unwrap_or_else(pod::default_resources)),
        readiness_probe: Some(probe.clone()),
        liveness_probe: Some(probe),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::MailPod;
    use crate::resources::Defaults;

    fn statefulsets(mp: &MailPod) -> Vec<StatefulSet> {
        let ctx = Context::new(mp, &Defaults::image("mail:1"));
        ServiceKind::ALL
            .into_iter()
            .map(|kind| statefulset(&ctx, kind))
            .collect()
    }

    #[test]
    fn mx_and_submission_keep_their_queue_on_a_retained_volume() {
        let spec = serde_json::from_value(serde_json::json!({"domains": ["example.com"]})).unwrap();
        let mut mp = MailPod::new("corp", spec);
        mp.metadata.namespace = Some("mail".into());
        for sts in statefulsets(&mp) {
            let name = sts.metadata.name.clone().unwrap();
            let spec = sts.spec.unwrap();
            let pod = spec.template.spec.unwrap();
            let queue_mount = pod.containers[0]
                .volume_mounts
                .iter()
                .flatten()
                .find(|m| m.name == volumes::QUEUE)
                .map(|m| (m.mount_path.clone(), m.read_only.unwrap_or(false)));
            let claims: Vec<String> = spec
                .volume_claim_templates
                .iter()
                .flatten()
                .filter_map(|c| c.metadata.name.clone())
                .collect();
            if name == "corp-mx" || name == "corp-submission" {
                assert_eq!(
                    queue_mount,
                    Some((paths::QUEUE.to_string(), false)),
                    "{name}"
                );
                assert_eq!(claims, [volumes::QUEUE], "{name}");
                let retention = spec.persistent_volume_claim_retention_policy.unwrap();
                assert_eq!(retention.when_deleted.as_deref(), Some("Retain"), "{name}");
                assert_eq!(retention.when_scaled.as_deref(), Some("Retain"), "{name}");
                // The claim is the pod's volume: no pod volume of that name shadows it.
                assert!(pod
                    .volumes
                    .iter()
                    .flatten()
                    .all(|v| v.name != volumes::QUEUE));
            } else {
                assert_eq!(queue_mount, None, "{name}");
                assert!(claims.is_empty(), "{name}");
            }
        }
    }
}
