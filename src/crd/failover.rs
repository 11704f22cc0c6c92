//! `SiteFailover`: pairs this cluster's site with a peer site in another cluster for geographic redundancy.

use std::collections::BTreeSet;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::KeyRef;
use super::validation::{is_dns_label, is_dns_subdomain, ValidationErrors};

/// A live standby site for some MailPods: access tables mirrored and hash-checked, stores replicated, the
/// primary probed, automatic failover under a higher epoch with fencing, and failback after resync.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "mailpod.io",
    version = "v1alpha1",
    kind = "SiteFailover",
    plural = "sitefailovers",
    shortname = "sf",
    namespaced,
    status = "SiteFailoverStatus",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Active","type":"string","jsonPath":".status.activeSite"}"#,
    printcolumn = r#"{"name":"Epoch","type":"integer","jsonPath":".status.epoch"}"#,
    printcolumn = r#"{"name":"Fenced","type":"boolean","jsonPath":".status.fenced"}"#,
    printcolumn = r#"{"name":"Quorum","type":"boolean","priority":1,"jsonPath":".status.witness.quorum"}"#,
    printcolumn = r#"{"name":"Tables-In-Sync","type":"boolean","jsonPath":".status.accessTablesInSync"}"#,
    printcolumn = r#"{"name":"Lag","type":"number","jsonPath":".status.replicationLagSeconds"}"#,
    printcolumn = r#"{"name":"Last-RTO","type":"number","priority":1,"jsonPath":".status.lastFailover.rtoSeconds"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = Rule::new("!has(self.policy) || !has(self.policy.automaticFailover) || !self.policy.automaticFailover || has(self.witness) || (has(self.policy.automaticFailoverWithoutWitness) && self.policy.automaticFailoverWithoutWitness)").message("policy.automaticFailover needs spec.witness (or policy.automaticFailoverWithoutWitness: true): without one, a partition leaves both sites writing").field_path(".policy.automaticFailover"))]
#[x_kube(validation = Rule::new("self.localSite != self.peer.name").message("localSite and peer.name must differ").field_path(".peer.name"))]
#[x_kube(validation = Rule::new("self.primarySite == self.localSite || self.primarySite == self.peer.name").message("primarySite must be localSite or peer.name").field_path(".primarySite"))]
#[x_kube(validation = Rule::new("!has(self.witness) || (has(self.witness.leaseDurationSeconds) ? self.witness.leaseDurationSeconds : 40) >= 4 * (has(self.detection) && has(self.detection.probeIntervalSeconds) ? self.detection.probeIntervalSeconds : 5)").message("witness.leaseDurationSeconds must be at least 4 × detection.probeIntervalSeconds").field_path(".witness.leaseDurationSeconds"))]
#[serde(rename_all = "camelCase")]
pub struct SiteFailoverSpec {
    /// MailPods (in this namespace) this pairing covers.
    #[schemars(length(min = 1))]
    pub mail_pods: Vec<String>,
    /// This cluster's site name; must match the operator's `--site`.
    #[schemars(length(max = 63))]
    pub local_site: String,
    /// The other cluster.
    pub peer: PeerSite,
    /// Site that serves while both are healthy.
    #[schemars(length(max = 63))]
    pub primary_site: String,
    #[serde(default)]
    pub detection: Detection,
    #[serde(default)]
    pub policy: FailoverPolicy,
    #[serde(default)]
    pub targets: Targets,
    /// DNS names switched to the active site through external-dns `DNSEndpoint` objects.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_DNS_NAMES))]
    pub dns: Vec<DnsName>,
    /// A third cluster holding a Lease that decides which site may write when the two cannot see each
    /// other. With it, a primary cut off from both the witness and the standby stops serving before the
    /// standby may take over, so a partition never leaves two sites writing; without it the old primary
    /// keeps serving its side of a partition until it sees the higher epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub witness: Option<Witness>,
}

/// The witness cluster and its Lease. Both sites must name the same cluster, namespace and Lease.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Witness {
    /// Secret key holding a kubeconfig for the witness cluster. It needs only get, create and update on
    /// `coordination.k8s.io` Leases in `namespace`.
    pub kubeconfig_secret: KeyRef,
    /// Namespace of the Lease in the witness cluster; this SiteFailover's namespace when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Name of the Lease; `sitefailover-<name>` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_name: Option<String>,
    /// How long a Lease not renewed stays with its holder (default 40). The active site stops serving when
    /// it has neither renewed the Lease for `leaseDurationSeconds - 2 × probeIntervalSeconds` nor seen the
    /// standby agree; the standby takes the Lease only after seeing it unchanged for the whole duration.
    #[serde(default = "default_lease_duration")]
    #[schemars(range(min = 4, max = 600))]
    pub lease_duration_seconds: u32,
}

/// 40 s: long enough that an active site whose operator crashes is fenced by the replica that takes over
/// (leader Lease of 15 s, retried every 5 s, then a tick) before the standby may take the witness Lease.
fn default_lease_duration() -> u32 {
    40
}

impl Witness {
    /// The Lease's name for the SiteFailover `sf`.
    pub fn lease_name(&self, sf: &str) -> String {
        self.lease_name
            .clone()
            .unwrap_or_else(|| format!("sitefailover-{sf}"))
    }

    /// How long the active site may go without renewing (or without the peer's agreement) before it fences
    /// itself: the lease duration less two probe intervals (one tick of the active site, one of margin).
    pub fn renew_deadline_seconds(&self, probe_interval: u32) -> u32 {
        self.lease_duration_seconds
            .saturating_sub(2 * probe_interval)
    }
}

/// The peer cluster.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PeerSite {
    /// The peer's site name.
    #[schemars(length(max = 63))]
    pub name: String,
    /// Secret key holding a kubeconfig for the peer cluster.
    pub kubeconfig_secret: KeyRef,
    /// Namespace of the peer's MailPods; this SiteFailover's namespace when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// How the standby decides that the primary is gone.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Detection {
    /// Seconds between probes of the primary (API and front-end protocols). Default 5.
    #[serde(default = "default_probe_interval")]
    #[schemars(range(min = 1, max = 300))]
    pub probe_interval_seconds: u32,
    /// Consecutive failed probes before the primary is declared lost. Default 3.
    #[serde(default = "default_failure_threshold")]
    #[schemars(range(min = 1, max = 100))]
    pub failure_threshold: u32,
    /// Timeout of one probe. Default 2.
    #[serde(default = "default_probe_timeout")]
    #[schemars(range(min = 1, max = 60))]
    pub probe_timeout_seconds: u32,
}

fn default_probe_interval() -> u32 {
    5
}
fn default_failure_threshold() -> u32 {
    3
}
fn default_probe_timeout() -> u32 {
    2
}

impl Default for Detection {
    fn default() -> Self {
        Self {
            probe_interval_seconds: default_probe_interval(),
            failure_threshold: default_failure_threshold(),
            probe_timeout_seconds: default_probe_timeout(),
        }
    }
}

/// Whether failover and failback happen by themselves.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailoverPolicy {
    /// Promote the standby when the primary is lost. Default: true with `spec.witness`, false without
    /// one. Without a witness a partition between the sites looks like a lost primary from the standby,
    /// and both sites write until the old primary sees the higher epoch; `true` without a witness is
    /// refused unless `automaticFailoverWithoutWitness` accepts that.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub automatic_failover: Option<bool>,
    /// Accept `automaticFailover: true` without a witness, and with it two writing sites for as long as
    /// a partition between them lasts (default false).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub automatic_failover_without_witness: bool,
    /// Switch back to the primary site once it is resynchronised (default false: an operator decides).
    #[serde(default)]
    pub automatic_failback: bool,
}

/// Recovery objectives; status reports measured figures against them.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Targets {
    /// Recovery time objective in seconds (default 60).
    #[serde(default = "default_rto")]
    #[schemars(range(min = 1))]
    pub rto_seconds: u32,
    /// Recovery point objective in seconds (default 30).
    #[serde(default = "default_rpo")]
    #[schemars(range(min = 0))]
    pub rpo_seconds: u32,
}

fn default_rto() -> u32 {
    60
}
fn default_rpo() -> u32 {
    30
}

impl Default for Targets {
    fn default() -> Self {
        Self {
            rto_seconds: default_rto(),
            rpo_seconds: default_rpo(),
        }
    }
}

/// A DNS name pointed at the active site's Service of one traffic type.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct DnsName {
    /// Fully qualified name, such as `mx.example.com`.
    pub name: String,
    /// MailPod whose Service the name points to.
    pub mail_pod: String,
    /// `mx`, `submission`, `imap`, `pop3` or `webmail`.
    // An OpenAPI enum rather than a CEL rule: checked by the schema at no CEL cost.
    #[schemars(extend("enum" = DNS_SERVICES))]
    pub service: String,
    /// Record TTL in seconds (default 30, short so clients follow a failover).
    #[serde(default = "default_ttl")]
    #[schemars(range(min = 1, max = 86400))]
    pub ttl: u32,
}

/// Most DNS names one SiteFailover switches.
pub const MAX_DNS_NAMES: u32 = 64;
/// The values of `spec.dns[].service`.
pub const DNS_SERVICES: [&str; 5] = ["mx", "submission", "imap", "pop3", "webmail"];

fn default_ttl() -> u32 {
    30
}

/// Phase of a site pairing.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum FailoverPhase {
    /// Both sites up; the standby is current.
    #[default]
    Healthy,
    /// The peer is unreachable or behind, below the failure threshold.
    Degraded,
    /// The standby is taking over.
    FailingOver,
    /// The standby site serves.
    FailedOver,
    /// Switching back to the primary site.
    FailingBack,
}

/// What the SiteFailover controller reports.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SiteFailoverStatus {
    /// Keyed by `type` (a map list), so Server-Side Apply merges conditions by type, never by position.
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    pub phase: FailoverPhase,
    /// Site that serves now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_site: Option<String>,
    /// Raised at every failover and failback; a site that sees a higher epoch than its own is fenced.
    #[serde(default)]
    pub epoch: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_reachable: Option<bool>,
    #[serde(default)]
    pub consecutive_probe_failures: u32,
    /// Time of the last counted probe of the peer: a probe counts at most once per
    /// `probeIntervalSeconds`, so extra reconciles (watch events) never hasten a failover. Microseconds, as
    /// every time of this status: the pacing and the RTO are measured in fractions of a second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_probe_time: Option<MicroTime>,
    /// Time of the first failed probe of the current run of failures; the RTO is measured from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe_failing_since: Option<MicroTime>,
    /// Whether this site's StorageLUNs are fenced (standby, or a site that saw a higher epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fenced: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_tables_in_sync: Option<bool>,
    /// Hash of the access tables on this site and on the peer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_access_tables_hash: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_access_tables_hash: Option<String>,
    /// Time of the last table sync.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_table_sync: Option<MicroTime>,
    /// Data behind the active site (the RPO if it were lost now). While the figure cannot be read (a
    /// `Volume` LUN's is reported by the active site, which may be unreachable), the last reading plus the
    /// time since: an upper bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication_lag_seconds: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failover: Option<FailoverRecord>,
    /// The witness Lease as this site last saw it (with `spec.witness`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub witness: Option<WitnessStatus>,
}

/// What this site knows of the witness Lease.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WitnessStatus {
    /// Whether the witness's API answered at the last tick.
    pub reachable: bool,
    /// Site holding the Lease (none: free).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<String>,
    /// On the active site: whether it may write, having renewed the Lease within the renew deadline or
    /// heard the standby agree (an active site out of quorum has fenced its stores). On the standby:
    /// whether it reaches the witness or the active site (it sees a majority).
    pub quorum: bool,
}

/// One failover or failback, with its measured figures.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailoverRecord {
    pub from: String,
    pub to: String,
    pub epoch: i64,
    /// When it began: the first failed probe of the peer (a failover) or the request (a failback).
    pub started_at: MicroTime,
    /// When the new active site served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<MicroTime>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rto_seconds: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpo_seconds: Option<f64>,
    /// `failover` or `failback`.
    pub kind: String,
}

impl SiteFailoverSpec {
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errs = ValidationErrors::default();
        if self.mail_pods.is_empty() {
            errs.push("spec.mailPods", "at least one MailPod is required");
        }
        let mut seen = BTreeSet::new();
        for (i, mp) in self.mail_pods.iter().enumerate() {
            if !is_dns_label(mp) {
                errs.push(
                    format!("spec.mailPods[{i}]"),
                    format!("`{mp}` is not a MailPod name"),
                );
            } else if !seen.insert(mp) {
                errs.push(
                    format!("spec.mailPods[{i}]"),
                    format!("duplicate MailPod `{mp}`"),
                );
            }
        }
        if !is_dns_label(&self.local_site) {
            errs.push("spec.localSite", "must be a DNS label");
        }
        if !is_dns_label(&self.peer.name) {
            errs.push("spec.peer.name", "must be a DNS label");
        } else if self.peer.name == self.local_site {
            errs.push("spec.peer.name", "must differ from spec.localSite");
        }
        if self.primary_site != self.local_site && self.primary_site != self.peer.name {
            errs.push(
                "spec.primarySite",
                format!(
                    "`{}` must be spec.localSite (`{}`) or spec.peer.name (`{}`)",
                    self.primary_site, self.local_site, self.peer.name
                ),
            );
        }
        if let Some(ns) = &self.peer.namespace {
            if !is_dns_label(ns) {
                errs.push("spec.peer.namespace", "must be a namespace name");
            }
        }
        let d = &self.detection;
        if !(1..=300).contains(&d.probe_interval_seconds) {
            errs.push(
                "spec.detection.probeIntervalSeconds",
                "must be between 1 and 300",
            );
        }
        if !(1..=100).contains(&d.failure_threshold) {
            errs.push(
                "spec.detection.failureThreshold",
                "must be between 1 and 100",
            );
        }
        if !(1..=60).contains(&d.probe_timeout_seconds) {
            errs.push(
                "spec.detection.probeTimeoutSeconds",
                "must be between 1 and 60",
            );
        } else if d.probe_timeout_seconds > d.probe_interval_seconds {
            errs.push(
                "spec.detection.probeTimeoutSeconds",
                "must not exceed probeIntervalSeconds",
            );
        }
        if let Some(w) = &self.witness {
            if !(4..=600).contains(&w.lease_duration_seconds) {
                errs.push(
                    "spec.witness.leaseDurationSeconds",
                    "must be between 4 and 600",
                );
            } else if w.lease_duration_seconds < 4 * d.probe_interval_seconds {
                errs.push(
                    "spec.witness.leaseDurationSeconds",
                    format!(
                        "must be at least 4 × spec.detection.probeIntervalSeconds ({}): the active site \
                         fences itself two intervals before the standby may take the Lease",
                        4 * d.probe_interval_seconds
                    ),
                );
            }
            if let Some(ns) = &w.namespace {
                if !is_dns_label(ns) {
                    errs.push("spec.witness.namespace", "must be a namespace name");
                }
            }
            if let Some(n) = &w.lease_name {
                if !is_dns_subdomain(n) {
                    errs.push(
                        "spec.witness.leaseName",
                        format!("`{n}` is not an object name"),
                    );
                }
            }
        }
        if self.policy.automatic_failover == Some(true)
            && self.witness.is_none()
            && !self.policy.automatic_failover_without_witness
        {
            errs.push(
                "spec.policy.automaticFailover",
                "needs spec.witness: without one, a partition between the sites leaves both writing \
                 (set spec.policy.automaticFailoverWithoutWitness: true to accept that)",
            );
        }
        if self.targets.rto_seconds == 0 {
            errs.push("spec.targets.rtoSeconds", "must be at least 1");
        }
        if self.dns.len() > MAX_DNS_NAMES as usize {
            errs.push("spec.dns", format!("at most {MAX_DNS_NAMES} names"));
        }
        for (i, dns) in self.dns.iter().enumerate() {
            if !is_dns_subdomain(&dns.name) {
                errs.push(
                    format!("spec.dns[{i}].name"),
                    format!("`{}` is not a DNS name", dns.name),
                );
            }
            if !self.mail_pods.contains(&dns.mail_pod) {
                errs.push(
                    format!("spec.dns[{i}].mailPod"),
                    format!("`{}` is not in spec.mailPods", dns.mail_pod),
                );
            }
            if !DNS_SERVICES.contains(&dns.service.as_str()) {
                errs.push(
                    format!("spec.dns[{i}].service"),
                    "must be mx, submission, imap, pop3 or webmail",
                );
            }
        }
        errs.into_result()
    }

    /// Whether the standby promotes itself when the primary is lost: as `policy.automaticFailover` says,
    /// by default only with a witness.
    pub fn automatic_failover(&self) -> bool {
        self.policy
            .automatic_failover
            .unwrap_or(self.witness.is_some())
    }

    /// Whether this site is the configured primary.
    pub fn local_is_primary(&self) -> bool {
        self.primary_site == self.local_site
    }
}
