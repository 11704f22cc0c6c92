//! Isolation: store ports accept only this MailPod's front-end pods; front-end pods accept only their own
//! service ports; the agents' control port only this MailPod's jobs and the operator.

use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::frontend::service_ports;
use super::mailpod::Context;
use super::pod::ports;
use super::{selector, Child};
use crate::crd::ServiceKind;
use crate::names::labels;

/// Component label of store pods.
pub const STORE: &str = "store";
/// Component label of snapshot and restore job pods.
pub const JOBS: &[&str] = &["snapshot", "restore"];

fn tcp(port: i32) -> NetworkPolicyPort {
    NetworkPolicyPort {
        port: Some(IntOrString::Int(port)),
        protocol: Some("TCP".into()),
        ..Default::default()
    }
}

fn pods_of(mailpod: &str, components: &[&str]) -> NetworkPolicyPeer {
    NetworkPolicyPeer {
        pod_selector: Some(LabelSelector {
            match_labels: Some([(labels::MAILPOD.to_string(), mailpod.to_string())].into()),
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: labels::COMPONENT.into(),
                operator: "In".into(),
                values: Some(components.iter().map(|c| c.to_string()).collect()),
            }]),
        }),
        ..Default::default()
    }
}

/// The label the API server sets on every namespace to its own name (immutable, so no tenant can claim
/// another namespace's name).
const NAMESPACE_NAME: &str = "kubernetes.io/metadata.name";

/// The operator's own pods, in its own namespace only: a pod anywhere else that copies the operator's
/// labels is not admitted.
fn operator_pods(namespace: &str) -> NetworkPolicyPeer {
    NetworkPolicyPeer {
        namespace_selector: Some(LabelSelector {
            match_labels: Some([(NAMESPACE_NAME.to_string(), namespace.to_string())].into()),
            ..Default::default()
        }),
        pod_selector: Some(LabelSelector {
            match_labels: Some([(labels::NAME.to_string(), labels::MANAGER.to_string())].into()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn policy(ctx: &Context, component: &str, ingress: Vec<NetworkPolicyIngressRule>) -> Child {
    Child::NetworkPolicy(NetworkPolicy {
        metadata: ctx.meta(format!("{}-{component}", ctx.name()), component),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(selector(ctx.name(), component)),
                ..Default::default()
            }),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(ingress),
            ..Default::default()
        }),
    })
}

/// Metrics are scraped from wherever Prometheus runs; the control port is for this MailPod's jobs and
/// the operator only.
fn agent_rules(ctx: &Context) -> Vec<NetworkPolicyIngressRule> {
    let mut control_peers = vec![pods_of(ctx.name(), JOBS)];
    control_peers.extend(ctx.operator_namespace().map(operator_pods));
    vec![
        NetworkPolicyIngressRule {
            ports: Some(vec![tcp(ports::METRICS)]),
            ..Default::default()
        },
        NetworkPolicyIngressRule {
            ports: Some(vec![tcp(ports::CONTROL)]),
            from: Some(control_peers),
        },
    ]
}

pub fn build(ctx: &Context) -> Vec<Child> {
    let frontends = ["mx", "submission", "imap", "pop3"];
    let mut out = vec![];
    let mut store_rules = vec![
        NetworkPolicyIngressRule {
            ports: Some(vec![
                tcp(ports::LMTP),
                tcp(ports::IMAP),
                tcp(ports::POP3),
                tcp(ports::SIEVE),
            ]),
            from: Some(vec![pods_of(ctx.name(), &frontends)]),
        },
        // Replication between the replicas of a LUN, and the restore jobs' imports.
        NetworkPolicyIngressRule {
            ports: Some(vec![tcp(ports::DOVEADM)]),
            from: Some(vec![pods_of(ctx.name(), &[STORE, "restore"])]),
        },
    ];
    // The other site's standby stores pull over the exposed doveadm service, on its TLS listener only.
    if let Some(sr) = &ctx.spec().backend.site_replication {
        store_rules.push(NetworkPolicyIngressRule {
            ports: Some(vec![tcp(ports::DOVEADM_TLS)]),
            from: (!sr.source_ranges.is_empty()).then(|| {
                sr.source_ranges
                    .iter()
                    .map(|cidr| NetworkPolicyPeer {
                        ip_block: Some(IPBlock {
                            cidr: cidr.clone(),
                            except: None,
                        }),
                        ..Default::default()
                    })
                    .collect()
            }),
        });
    }
    store_rules.extend(agent_rules(ctx));
    out.push(policy(ctx, STORE, store_rules));
    for (kind, _) in ctx.spec().frontend.enabled() {
        let mut rules = vec![NetworkPolicyIngressRule {
            ports: Some(
                service_ports(kind, ctx.spec().tls.is_some())
                    .into_iter()
                    .map(|(_, p)| tcp(p))
                    .collect(),
            ),
            ..Default::default()
        }];
        if kind != ServiceKind::Webmail {
            rules.extend(agent_rules(ctx));
        }
        out.push(policy(ctx, kind.as_str(), rules));
    }
    out
}
