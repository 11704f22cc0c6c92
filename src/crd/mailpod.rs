//! `MailPod`: one compartment of mail service. It owns everything it runs; nothing is shared between MailPods.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{KeyRef, PvcRetention, ReplicationSpec, SnapshotPolicy};
use super::validation::{
    is_dns_label, is_mail_domain, parse_bytes, split_address, ValidationErrors,
};

/// Submission, imap and pop3 take passwords: they run only with a certificate, unless the spec opts in
/// to plaintext by name. A service given without `replicas` has 0; one not given has its default (2 for
/// submission and imap).
const LOGINS_NEED_TLS_CEL: &str = "has(self.tls) || (has(self.insecurePlaintextAuth) && self.insecurePlaintextAuth) || (has(self.frontend) && has(self.frontend.submission) && (!has(self.frontend.submission.replicas) || self.frontend.submission.replicas == 0) && has(self.frontend.imap) && (!has(self.frontend.imap.replicas) || self.frontend.imap.replicas == 0) && (!has(self.frontend.pop3) || !has(self.frontend.pop3.replicas) || self.frontend.pop3.replicas == 0))";
const LOGINS_NEED_TLS: &str = "required while submission, imap or pop3 have replicas: they take passwords, which must not cross the network in clear (set spec.tls.secretName; on a network nobody else can reach, spec.insecurePlaintextAuth: true)";

/// Most standby replicas a LUN may have (the M of N+M).
pub const MAX_STANDBYS: u32 = 4;
/// Most mailboxes one LUN may hold: the blast radius of one storage unit stays small.
pub const MAX_USERS_PER_LUN: u32 = 10_000;
/// Most ConfigMaps/Secrets one MailPod may read mailboxes from; it bounds the cost of their CEL rule.
pub const MAX_MAILBOX_SOURCES: u32 = 64;
/// Longest quantity string (capacity, message size); every valid quantity is far shorter.
const MAX_QUANTITY_LEN: usize = 32;

/// A compartment of mail service: front-end tier (mx, submission, imap, pop3, webmail), back-end stores placed
/// onto StorageLUNs of bounded size, the access tables, protection limits and snapshot policy.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "mailpod.io",
    version = "v1alpha1",
    kind = "MailPod",
    plural = "mailpods",
    shortname = "mp",
    namespaced,
    status = "MailPodStatus",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Mailboxes","type":"integer","jsonPath":".status.mailboxes"}"#,
    printcolumn = r#"{"name":"LUNs","type":"integer","jsonPath":".status.lunCount"}"#,
    printcolumn = r#"{"name":"Services","type":"string","jsonPath":".status.servicesReady"}"#,
    printcolumn = r#"{"name":"Tables","type":"string","priority":1,"jsonPath":".status.accessTablesHash"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(LOGINS_NEED_TLS_CEL).message(LOGINS_NEED_TLS).field_path(".tls"))]
pub struct MailPodSpec {
    /// Mail domains this MailPod hosts mailboxes for. Every mailbox must be in one of them.
    #[schemars(
        length(min = 1, max = 1000),
        inner(
            length(max = 253),
            regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)+$")
        )
    )]
    pub domains: Vec<String>,
    /// Image for every mail pod (the mailpod-operator image with Postfix and Dovecot); each service may override it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The front-end tier: one StatefulSet and Service per traffic type, each scaled on its own.
    #[serde(default)]
    pub frontend: Frontend,
    /// The back-end mail stores.
    #[serde(default)]
    pub backend: Backend,
    /// Who has a mailbox here.
    #[serde(default)]
    pub mailboxes: Mailboxes,
    /// Postfix/Dovecot lookup tables rendered by the operator and applied by the pods without restart.
    #[serde(default)]
    pub access_tables: AccessTables,
    /// Throttling and limits applied before mail is accepted.
    #[serde(default)]
    pub protection: Protection,
    /// Consistent snapshots of every LUN.
    #[serde(default)]
    pub snapshots: SnapshotPolicy,
    /// TLS certificate for SMTP, submission, IMAP and POP3. Required while submission, imap or pop3 run:
    /// they take passwords, which never cross the network in clear.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,
    /// Lets submission, imap and pop3 run without `tls`, taking passwords in clear (AUTH PLAIN, IMAP
    /// LOGIN, POP3 USER/PASS) from anyone who can reach their Services. Only for a network nobody else
    /// can reach or read (a test cluster). The agents log a warning at start while it is in use.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure_plaintext_auth: bool,
    /// Mailbox quotas: a default for every mailbox and per-mailbox overrides. No quota when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<super::QuotaSpec>,
    /// Sieve limits and the relay for vacation replies; Sieve and ManageSieve are on with defaults when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sieve: Option<super::SieveSpec>,
    /// Spam and virus filtering on mx (rspamd as a milter, ClamAV); no filtering when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filtering: Option<super::FilteringSpec>,
    /// DKIM signing of the mail submission accepts, one key per domain; no signing when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dkim: Option<super::DkimSpec>,
    /// The mail servers' host name: the SMTP banner, the name mx and submission give in HELO/EHLO to other
    /// servers (Postfix `myhostname`), and the host part of bounce senders. Use the name your MX and PTR
    /// records give, since receivers check it. Default `mail.<first domain>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)+$")
    )]
    pub hostname: Option<String>,
    /// Who receives the mail of `postmaster@` and `abuse@` of every domain that declares no mailbox or
    /// alias of that name (RFC 5321 and RFC 2142 require both): an address, which in a hosted domain must
    /// be a mailbox or an alias. Default `postmaster@<first domain>`, which must then be one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 254))]
    pub postmaster: Option<String>,
}

/// The front-end services. Each runs as its own StatefulSet behind its own Service.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Frontend {
    /// Inbound SMTP (port 25). Default 2 replicas.
    #[serde(default = "FrontendService::two")]
    pub mx: FrontendService,
    /// Authenticated submission (587 STARTTLS, 465 implicit TLS). Default 2 replicas.
    #[serde(default = "FrontendService::two")]
    pub submission: FrontendService,
    /// IMAP proxy (143, 993). Default 2 replicas.
    #[serde(default = "FrontendService::two")]
    pub imap: FrontendService,
    /// POP3 proxy (110, 995). Default 0 replicas (off).
    #[serde(default)]
    pub pop3: FrontendService,
    /// Webmail over HTTP. Off unless replicas > 0 and an image is given (no webmail ships in the mail image).
    #[serde(default)]
    pub webmail: FrontendService,
}

impl Default for Frontend {
    fn default() -> Self {
        Self {
            mx: FrontendService::two(),
            submission: FrontendService::two(),
            imap: FrontendService::two(),
            pop3: FrontendService::default(),
            webmail: FrontendService::default(),
        }
    }
}

/// One front-end service.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FrontendService {
    /// Replicas; 0 turns the service off.
    #[serde(default)]
    #[schemars(range(min = 0, max = 100))]
    pub replicas: i32,
    /// Container resources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Image for this service only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// How the client-facing Service is exposed. With `LoadBalancer` the Service keeps client source
    /// addresses (externalTrafficPolicy Local), which postscreen, rate limits and DNSBLs need.
    #[serde(default)]
    pub service_type: ExposeType,
    /// Extra annotations on the client-facing Service (load-balancer settings, external-dns names).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub service_annotations: std::collections::BTreeMap<String, String>,
}

/// Service type of a front-end service.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ExposeType {
    #[default]
    ClusterIP,
    NodePort,
    LoadBalancer,
}

impl ExposeType {
    pub fn as_str(self) -> &'static str {
        match self {
            ExposeType::ClusterIP => "ClusterIP",
            ExposeType::NodePort => "NodePort",
            ExposeType::LoadBalancer => "LoadBalancer",
        }
    }
}

impl FrontendService {
    fn two() -> Self {
        Self {
            replicas: 2,
            ..Default::default()
        }
    }
}

/// The front-end traffic types, in the order the operator applies them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ServiceKind {
    Mx,
    Submission,
    Imap,
    Pop3,
    Webmail,
}

impl ServiceKind {
    pub const ALL: [ServiceKind; 5] = [
        ServiceKind::Mx,
        ServiceKind::Submission,
        ServiceKind::Imap,
        ServiceKind::Pop3,
        ServiceKind::Webmail,
    ];

    /// Name used in object names, labels and the agent's `--role`.
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceKind::Mx => "mx",
            ServiceKind::Submission => "submission",
            ServiceKind::Imap => "imap",
            ServiceKind::Pop3 => "pop3",
            ServiceKind::Webmail => "webmail",
        }
    }
}

impl Frontend {
    pub fn get(&self, kind: ServiceKind) -> &FrontendService {
        match kind {
            ServiceKind::Mx => &self.mx,
            ServiceKind::Submission => &self.submission,
            ServiceKind::Imap => &self.imap,
            ServiceKind::Pop3 => &self.pop3,
            ServiceKind::Webmail => &self.webmail,
        }
    }

    /// The services with replicas > 0, in apply order.
    pub fn enabled(&self) -> impl Iterator<Item = (ServiceKind, &FrontendService)> {
        ServiceKind::ALL
            .into_iter()
            .map(|k| (k, self.get(k)))
            .filter(|(_, s)| s.replicas > 0)
    }
}

/// The back-end: LUNs of at most `maxUsersPerLun` mailboxes, each 1 active + `standbys` replicas.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Backend {
    /// Standby replicas per LUN, kept in sync with the active one (the M of N+M). Default 1.
    #[serde(default = "default_standbys")]
    #[schemars(range(min = 0, max = 4))]
    pub standbys: u32,
    /// Most mailboxes on one LUN (default 1000): a failure touches at most this many users.
    #[serde(default = "default_max_users")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_users_per_lun: u32,
    /// What every LUN's volumes look like.
    #[serde(default)]
    pub lun_template: LunTemplate,
    /// How replicas are kept in sync.
    #[serde(default)]
    pub replication: ReplicationSpec,
    /// Store container resources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Seconds the active replica may be unready before a standby is promoted (default 30).
    #[serde(default = "default_failover_threshold")]
    #[schemars(range(min = 5, max = 3600))]
    pub failover_threshold_seconds: u32,
    /// Keep (default) or delete store PVCs when the MailPod or a LUN is deleted.
    #[serde(default)]
    pub pvc_retention: PvcRetention,
    /// Expose each LUN's active replica to the other site of a SiteFailover, whose standby stores pull
    /// from it (doveadm, password-protected; restrict the sources).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site_replication: Option<SiteReplication>,
    /// Networks the stores trust to be this MailPod's imap and pop3 proxies (Dovecot
    /// `login_trusted_networks`): a client there may pass on the address of the client it serves, so
    /// auth penalties and per-IP connection limits apply per client, not per proxy pod. The default is the
    /// private and shared address ranges pod networks use; the store NetworkPolicy admits only this
    /// MailPod's front-end pods to the IMAP and POP3 ports. Set the cluster's pod CIDR to narrow it,
    /// or `[]` to trust nobody (every limit then counts the proxy's address).
    #[serde(default = "default_trusted_proxy_networks")]
    #[schemars(length(max = 32), inner(length(max = 43)))]
    #[x_kube(validation = Rule::new("self.all(n, isCIDR(n))").message("each entry must be a CIDR range such as 10.0.0.0/8"))]
    pub trusted_proxy_networks: Vec<String>,
}

/// How a LUN's doveadm service is reached from the other site.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.sourceRanges) && size(self.sourceRanges) > 0").message("sourceRanges must name the other site's egress ranges: the doveadm service carries mail and a password that authorises every doveadm command, and an empty list would admit any address").field_path(".sourceRanges"))]
#[x_kube(validation = Rule::new("has(self.tls)").message(SITE_REPLICATION_NEEDS_TLS).field_path(".tls"))]
pub struct SiteReplication {
    /// Service type of `<lun>-replication` (default LoadBalancer).
    #[serde(default = "default_replication_expose")]
    pub service_type: ExposeType,
    /// Annotations of the Service (an internal load balancer, for example).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub annotations: std::collections::BTreeMap<String, String>,
    /// Client ranges allowed in (the other site's egress addresses): the Service's
    /// loadBalancerSourceRanges and the store NetworkPolicy's ipBlocks. Required, at least one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(max = 43)))]
    pub source_ranges: Vec<String>,
    /// The certificate the exposed doveadm service presents, and the CA the other site's standbys verify
    /// it with. Required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<SiteReplicationTls>,
}

/// Why a `siteReplication` without `tls` is refused (the CRD's rule and the operator's validation).
pub const SITE_REPLICATION_NEEDS_TLS: &str = "required: the doveadm service carries mail and a \
     password that authorises every doveadm command across sites, so it is served only over TLS (name a \
     kubernetes.io/tls Secret with tls.crt, tls.key and ca.crt)";

/// TLS of the exposed doveadm service.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SiteReplicationTls {
    /// A `kubernetes.io/tls` Secret in the MailPod's namespace with `tls.crt`, `tls.key` and `ca.crt`
    /// (the layout cert-manager writes). The certificate must name every address a standby pulls from:
    /// the load-balancer host name or IP of each LUN's `<lun>-replication` Service, at both sites (either
    /// may be active). `ca.crt` must be the CA that issued it: the standby site, whose MailPod carries the
    /// same spec (the SiteFailover mirrors this Secret), verifies the peer's certificate and host name
    /// against it.
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: String,
}

fn default_replication_expose() -> ExposeType {
    ExposeType::LoadBalancer
}

/// RFC 1918, RFC 6598 (shared address space, used by several managed clusters' pod networks) and IPv6
/// unique local addresses.
pub fn default_trusted_proxy_networks() -> Vec<String> {
    [
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "100.64.0.0/10",
        "fc00::/7",
    ]
    .map(String::from)
    .to_vec()
}

fn default_standbys() -> u32 {
    1
}
fn default_max_users() -> u32 {
    1000
}
fn default_failover_threshold() -> u32 {
    30
}

impl Default for Backend {
    fn default() -> Self {
        Self {
            standbys: default_standbys(),
            max_users_per_lun: default_max_users(),
            lun_template: LunTemplate::default(),
            replication: ReplicationSpec::default(),
            resources: None,
            failover_threshold_seconds: default_failover_threshold(),
            pvc_retention: PvcRetention::default(),
            site_replication: None,
            trusted_proxy_networks: default_trusted_proxy_networks(),
        }
    }
}

/// The volume of each store replica (and the storage class of the mx queue). Fixed once the MailPod
/// exists: StatefulSets' volumeClaimTemplates cannot change, so a change would leave every store
/// StatefulSet refusing its apply.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.storageClassName) == has(oldSelf.storageClassName)").message("lunTemplate.storageClassName cannot be set or unset once the MailPod exists").field_path(".storageClassName"))]
pub struct LunTemplate {
    /// Size of each replica's volume (default `50Gi`); expand the PVCs themselves to grow a LUN.
    #[serde(default = "default_capacity")]
    #[x_kube(validation = Rule::new("self.matches('^[0-9]+(k|M|G|T|Ki|Mi|Gi|Ti)?$')").message("must be a whole quantity of bytes such as 50Gi"))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("lunTemplate.capacity is immutable: the store StatefulSets' volumeClaimTemplates cannot change; expand the PVCs instead"))]
    #[schemars(length(max = 32))]
    pub capacity: String,
    /// StorageClass; the cluster's default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("lunTemplate.storageClassName is immutable: the StatefulSets' volumeClaimTemplates cannot change"))]
    #[schemars(length(max = 253))]
    pub storage_class_name: Option<String>,
}

fn default_capacity() -> String {
    "50Gi".into()
}

impl Default for LunTemplate {
    fn default() -> Self {
        Self {
            capacity: default_capacity(),
            storage_class_name: None,
        }
    }
}

/// Mailboxes given inline and/or in ConfigMaps/Secrets.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Mailboxes {
    /// Addresses, such as `alice@example.com`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inline: Vec<String>,
    /// ConfigMaps or Secrets holding one mailbox per line. A line is an address, optionally followed by `:` and
    /// the rest of a Dovecot passwd-file entry, so a passwd-file Secret can list the mailboxes too.
    /// Blank lines and lines starting with `#` are ignored.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_MAILBOX_SOURCES))]
    pub from: Vec<MailboxSource>,
    /// Dovecot passwd-file (`address:{SCHEME}hash`) the stores and submission authenticate against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passwd_file_secret: Option<KeyRef>,
}

/// Where a list of mailboxes is kept: exactly one of `configMap` and `secret`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.configMap) != has(self.secret)").message("exactly one of configMap and secret must be set"))]
pub struct MailboxSource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map: Option<KeyRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<KeyRef>,
}

/// Postfix access actions for recipient and sender access tables.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum AccessAction {
    #[serde(rename = "OK")]
    Ok,
    #[serde(rename = "REJECT")]
    Reject,
    #[serde(rename = "DEFER")]
    Defer,
    #[serde(rename = "DISCARD")]
    Discard,
    #[serde(rename = "HOLD")]
    Hold,
}

impl AccessAction {
    pub fn as_str(self) -> &'static str {
        match self {
            AccessAction::Ok => "OK",
            AccessAction::Reject => "REJECT",
            AccessAction::Defer => "DEFER",
            AccessAction::Discard => "DISCARD",
            AccessAction::Hold => "HOLD",
        }
    }
}

/// One access rule: an address, `@domain` or domain, and what to do with mail to/from it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AccessRule {
    /// `user@example.com`, `@example.com` or `example.com`.
    pub pattern: String,
    pub action: AccessAction,
    /// Text returned with REJECT/DEFER/HOLD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// A virtual alias: mail to `address` goes to every target.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Alias {
    /// `sales@example.com`, or `@example.com` for a catch-all.
    pub address: String,
    #[schemars(length(min = 1))]
    pub targets: Vec<String>,
}

// That each recipient is in the domain is the operator's check (InvalidSpec naming the entry), not a CEL
// rule: over up to 1000 domains of up to 10000 recipients the API server's cost estimate of one exceeds its
// budget a hundredfold, and it refuses the CRD.
/// A domain this MailPod accepts mail for and relays to another host.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RelayDomain {
    #[schemars(length(max = 253))]
    pub domain: String,
    /// Postfix next hop, such as `[mail.internal.example.net]:25`; MX lookup of the domain when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_hop: Option<String>,
    /// The addresses of this domain that exist (Postfix `relay_recipient_maps`): mx refuses any other at
    /// RCPT with 550. When empty, mx asks the next hop instead, at RCPT, whether it takes the recipient
    /// (`reject_unverified_recipient`, answers cached), so no unknown address is accepted and bounced later.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10000), inner(length(max = 254)))]
    pub recipients: Vec<String>,
}

/// Which mail an archive rule copies.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ArchiveDirection {
    /// Mail addressed to the pattern (recipient_bcc_maps).
    Inbound,
    /// Mail sent by the pattern (sender_bcc_maps).
    Outbound,
    /// Both.
    #[default]
    Both,
}

/// Archive copies: mail matching `pattern` is also delivered (BCC) to `bcc`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ArchiveRule {
    /// `user@example.com` or `@example.com`.
    pub pattern: String,
    pub bcc: String,
    #[serde(default)]
    pub direction: ArchiveDirection,
}

/// The access tables every front end and every site must hold current.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AccessTables {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recipient_access: Vec<AccessRule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sender_access: Vec<AccessRule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<Alias>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1000))]
    pub relay_domains: Vec<RelayDomain>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub archive_bcc: Vec<ArchiveRule>,
}

/// Throttling before mail is accepted.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Protection {
    /// New connections one client may open per minute (anvil); 0 turns the limit off. Default 60.
    #[serde(default = "default_rate")]
    #[schemars(range(min = 0, max = 100000))]
    pub connection_rate_limit: u32,
    /// DNS blocklists for postscreen: `name=filter` with an optional weight, such as
    /// `zen.spamhaus.org=127.0.0.[2..11]*2`. The reply filter is required: without one any answer counts,
    /// and Spamhaus answers `127.255.255.254` for every client to queries through public resolvers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(max = 300)))]
    #[x_kube(validation = Rule::new(DNSBL_CEL).message("each DNSBL needs a reply filter, such as zen.spamhaus.org=127.0.0.[2..11] with an optional *weight"))]
    pub dnsbl: Vec<String>,
    /// Summed DNSBL weight at which postscreen rejects a client (default 1).
    #[serde(default = "default_dnsbl_threshold")]
    #[schemars(range(min = 1, max = 100))]
    pub dnsbl_threshold: u32,
    /// Largest message accepted (default `25Mi`).
    #[serde(default = "default_max_size")]
    #[x_kube(validation = Rule::new("self.matches('^[0-9]+(k|M|G|Ki|Mi|Gi)?$')").message("must be a whole quantity of bytes such as 25Mi"))]
    #[schemars(length(max = 32))]
    pub max_message_size: String,
}

/// The CEL form of [`dnsbl_entry_problem`]: a DNS name, `=`, four octets each a number or a bracketed list
/// of numbers and ranges, an optional `*weight`.
const DNSBL_CEL: &str = r"self.all(s, s.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)+=([0-9]{1,3}|\\[[0-9]{1,3}(\\.\\.[0-9]{1,3})?(;[0-9]{1,3}(\\.\\.[0-9]{1,3})?)*\\])(\\.([0-9]{1,3}|\\[[0-9]{1,3}(\\.\\.[0-9]{1,3})?(;[0-9]{1,3}(\\.\\.[0-9]{1,3})?)*\\])){3}(\\*-?[0-9]+)?$'))";

/// What is wrong with one `spec.protection.dnsbl` entry, if anything: Postfix's
/// `name=d.d.d.d*weight`, where each `d` is a number or a bracketed `;` list of numbers and `n..m` ranges.
pub fn dnsbl_entry_problem(entry: &str) -> Option<String> {
    let (site, weight) = match entry.rsplit_once('*') {
        Some((site, w)) => (site, Some(w)),
        None => (entry, None),
    };
    if weight.is_some_and(|w| w.strip_prefix('-').unwrap_or(w).parse::<u16>().is_err()) {
        return Some(format!(
            "`{entry}`: the weight after `*` must be a whole number"
        ));
    }
    let Some((name, filter)) = site.split_once('=') else {
        return Some(format!(
            "`{entry}` has no reply filter: any answer would count, and public resolvers get \
             127.255.255.254 from Spamhaus for every client; write `{site}=127.0.0.[2..11]` (the codes \
             the list documents)"
        ));
    };
    if !is_mail_domain(name) {
        return Some(format!("`{entry}`: `{name}` is not a DNS name"));
    }
    let number = |n: &str| !n.is_empty() && n.len() <= 3 && n.bytes().all(|b| b.is_ascii_digit());
    let octet = |o: &str| {
        number(o)
            || o.strip_prefix('[')
                .and_then(|o| o.strip_suffix(']'))
                .is_some_and(|list| {
                    list.split(';').all(|item| match item.split_once("..") {
                        Some((lo, hi)) => number(lo) && number(hi),
                        None => number(item),
                    })
                })
    };
    let octets: Vec<&str> = filter.split('.').collect();
    // `..` inside brackets splits too: join the pieces of each bracketed octet back.
    let mut joined: Vec<String> = vec![];
    for o in octets {
        match joined.last_mut() {
            Some(last) if last.starts_with('[') && !last.ends_with(']') => {
                last.push('.');
                last.push_str(o);
            }
            _ => joined.push(o.to_string()),
        }
    }
    if joined.len() != 4 || !joined.iter().all(|o| octet(o)) {
        return Some(format!(
            "`{entry}`: the reply filter `{filter}` must be four octets, each a number or a bracketed \
             list such as [2..11] or [2;4]"
        ));
    }
    None
}

fn default_rate() -> u32 {
    60
}
fn default_dnsbl_threshold() -> u32 {
    1
}
fn default_max_size() -> String {
    "25Mi".into()
}

impl Default for Protection {
    fn default() -> Self {
        Self {
            connection_rate_limit: default_rate(),
            dnsbl: vec![],
            dnsbl_threshold: default_dnsbl_threshold(),
            max_message_size: default_max_size(),
        }
    }
}

impl Protection {
    /// `maxMessageSize` in bytes (validated specs only).
    pub fn max_message_bytes(&self) -> u64 {
        parse_bytes(&self.max_message_size).unwrap_or(25 << 20)
    }
}

/// TLS for the mail protocols.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TlsSpec {
    /// A `kubernetes.io/tls` Secret (tls.crt, tls.key), for example one cert-manager keeps current.
    pub secret_name: String,
}

/// What the MailPod controller reports.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MailPodStatus {
    /// Keyed by `type` (a map list), so Server-Side Apply merges conditions by type, never by position.
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Front-end services: ready and desired replicas.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<ServiceStatus>,
    /// `ready/desired` replicas summed over all front-end services, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub services_ready: Option<String>,
    /// Mailboxes placed.
    #[serde(default)]
    pub mailboxes: i32,
    /// StorageLUNs in use.
    #[serde(default)]
    pub lun_count: i32,
    /// Users per LUN.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub luns: Vec<LunPlacement>,
    /// SHA-256 of the access tables now applied, so any site can prove it is current.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_tables_hash: Option<String>,
    /// With `spec.dkim`: the TXT record each domain must publish for its signatures to verify.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dkim: Vec<super::DkimRecord>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceStatus {
    pub name: String,
    pub ready: i32,
    pub desired: i32,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LunPlacement {
    /// StorageLUN name.
    pub name: String,
    pub index: u32,
    pub users: u32,
}

impl MailPodSpec {
    /// The same rules as the CRD schema, plus those that need more than one field; paths are `spec.…`.
    /// Mailboxes are validated by `resources::mailboxes::resolve`, which sees referenced lists too.
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errs = ValidationErrors::default();
        if self.domains.is_empty() {
            errs.push("spec.domains", "at least one domain is required");
        }
        let mut seen = BTreeSet::new();
        for (i, d) in self.domains.iter().enumerate() {
            if !is_mail_domain(d) {
                errs.push(
                    format!("spec.domains[{i}]"),
                    format!("`{d}` is not a lower-case DNS name with at least two labels"),
                );
            } else if !seen.insert(d.as_str()) {
                errs.push(
                    format!("spec.domains[{i}]"),
                    format!("duplicate domain `{d}`"),
                );
            }
        }
        if let Some(p) = self
            .postmaster
            .as_deref()
            .filter(|p| split_address(p).is_none())
        {
            errs.push(
                "spec.postmaster",
                format!("`{p}` is not a lower-case mail address"),
            );
        }
        if let Some(h) = self.hostname.as_deref().filter(|h| !is_mail_domain(h)) {
            errs.push(
                "spec.hostname",
                format!("`{h}` is not a lower-case DNS name with at least two labels"),
            );
        }
        for (kind, svc) in ServiceKind::ALL.iter().map(|k| (*k, self.frontend.get(*k))) {
            let path = format!("spec.frontend.{}", kind.as_str());
            if !(0..=100).contains(&svc.replicas) {
                errs.push(format!("{path}.replicas"), "must be between 0 and 100");
            }
            if kind == ServiceKind::Webmail && svc.replicas > 0 && svc.image.is_none() {
                errs.push(
                    format!("{path}.image"),
                    "is required when webmail is enabled (no webmail ships in the mail image)",
                );
            }
        }
        let b = &self.backend;
        if b.standbys > MAX_STANDBYS {
            errs.push(
                "spec.backend.standbys",
                format!("must be at most {MAX_STANDBYS}, got {}", b.standbys),
            );
        }
        if !(1..=MAX_USERS_PER_LUN).contains(&b.max_users_per_lun) {
            errs.push(
                "spec.backend.maxUsersPerLun",
                format!("must be between 1 and {MAX_USERS_PER_LUN}"),
            );
        }
        if let Some(sc) = &b.lun_template.storage_class_name {
            if !is_dns_subdomain_name(sc) {
                errs.push(
                    "spec.backend.lunTemplate.storageClassName",
                    format!("`{sc}` is not a StorageClass name"),
                );
            }
        }
        if b.lun_template.capacity.len() > MAX_QUANTITY_LEN
            || parse_bytes(&b.lun_template.capacity).is_none()
        {
            errs.push(
                "spec.backend.lunTemplate.capacity",
                format!(
                    "`{}` is not a whole quantity of bytes such as 50Gi",
                    b.lun_template.capacity
                ),
            );
        }
        if !(5..=3600).contains(&b.failover_threshold_seconds) {
            errs.push(
                "spec.backend.failoverThresholdSeconds",
                "must be between 5 and 3600",
            );
        }
        b.replication
            .validate("spec.backend.replication", &mut errs);
        for (i, n) in b.trusted_proxy_networks.iter().enumerate() {
            if !is_cidr(n) {
                errs.push(
                    format!("spec.backend.trustedProxyNetworks[{i}]"),
                    format!("`{n}` is not a CIDR range such as 10.0.0.0/8"),
                );
            }
        }
        if let Some(sr) = &b.site_replication {
            if sr.source_ranges.is_empty() {
                errs.push(
                    "spec.backend.siteReplication.sourceRanges",
                    "must name the other site's egress ranges: the doveadm service carries mail and a \
                     password that authorises every doveadm command, and an empty list would admit any \
                     address",
                );
            }
            for (i, r) in sr.source_ranges.iter().enumerate() {
                if !is_cidr(r) {
                    errs.push(
                        format!("spec.backend.siteReplication.sourceRanges[{i}]"),
                        format!("`{r}` is not a CIDR range such as 198.51.100.0/24"),
                    );
                }
            }
            match &sr.tls {
                None => errs.push(
                    "spec.backend.siteReplication.tls",
                    SITE_REPLICATION_NEEDS_TLS,
                ),
                Some(t) if !is_dns_subdomain_name(&t.secret_name) => errs.push(
                    "spec.backend.siteReplication.tls.secretName",
                    format!("`{}` is not a Secret name", t.secret_name),
                ),
                Some(_) => {}
            }
        }

        // Mailbox addresses (inline and referenced) are checked where they are all known:
        // `resources::mailboxes::resolve`.
        if self.mailboxes.from.len() > MAX_MAILBOX_SOURCES as usize {
            errs.push(
                "spec.mailboxes.from",
                format!("at most {MAX_MAILBOX_SOURCES} sources"),
            );
        }
        for (i, src) in self.mailboxes.from.iter().enumerate() {
            if src.config_map.is_some() == src.secret.is_some() {
                errs.push(
                    format!("spec.mailboxes.from[{i}]"),
                    "exactly one of configMap and secret must be set",
                );
            }
        }
        self.validate_access_tables(&mut errs);

        let p = &self.protection;
        if p.max_message_size.len() > MAX_QUANTITY_LEN || parse_bytes(&p.max_message_size).is_none()
        {
            errs.push(
                "spec.protection.maxMessageSize",
                format!(
                    "`{}` is not a whole quantity of bytes such as 25Mi",
                    p.max_message_size
                ),
            );
        }
        if !(1..=100).contains(&p.dnsbl_threshold) {
            errs.push(
                "spec.protection.dnsblThreshold",
                "must be between 1 and 100",
            );
        }
        for (i, site) in p.dnsbl.iter().enumerate() {
            if let Some(problem) = dnsbl_entry_problem(site) {
                errs.push(format!("spec.protection.dnsbl[{i}]"), problem);
            }
        }
        self.snapshots.validate("spec.snapshots", &mut errs);
        if let Some(s) = &self.sieve {
            s.validate("spec.sieve", &mut errs);
        }
        if let Some(d) = &self.dkim {
            d.validate("spec.dkim", &mut errs);
        }
        if let Some(f) = &self.filtering {
            f.validate("spec.filtering", &mut errs);
        }
        if let Some(q) = &self.quota {
            q.validate("spec.quota", &mut errs);
            // Its domain must be hosted here (its address is checked above).
            for (i, o) in q.overrides.iter().enumerate() {
                if split_address(&o.mailbox).is_some() {
                    let path = format!("spec.quota.overrides[{i}].mailbox");
                    self.check_mailbox(&o.mailbox, &path, &mut errs);
                }
            }
        }
        if let Some(tls) = &self.tls {
            if !is_dns_subdomain_name(&tls.secret_name) {
                errs.push("spec.tls.secretName", "must be a Secret name");
            }
        } else if !self.insecure_plaintext_auth && self.serves_logins() {
            errs.push("spec.tls", LOGINS_NEED_TLS);
        }
        errs.into_result()
    }

    /// Where `postmaster@` and `abuse@` mail goes when a domain declares neither (see `postmaster`).
    pub fn postmaster_address(&self) -> String {
        self.postmaster.clone().unwrap_or_else(|| {
            format!(
                "postmaster@{}",
                self.domains.first().map_or("", String::as_str)
            )
        })
    }

    /// Whether a front end that takes passwords runs (submission, imap, pop3).
    pub fn serves_logins(&self) -> bool {
        let f = &self.frontend;
        [&f.submission, &f.imap, &f.pop3]
            .iter()
            .any(|s| s.replicas > 0)
    }

    /// An address is valid and in one of `domains`.
    pub fn check_mailbox(&self, address: &str, path: &str, errs: &mut ValidationErrors) {
        match split_address(address) {
            None => errs.push(
                path,
                format!("`{address}` is not a lower-case mail address"),
            ),
            Some((_, domain)) if !self.domains.iter().any(|d| d == domain) => errs.push(
                path,
                format!("`{address}`: domain `{domain}` is not in spec.domains"),
            ),
            Some(_) => {}
        }
    }

    fn validate_access_tables(&self, errs: &mut ValidationErrors) {
        let t = &self.access_tables;
        for (name, rules) in [
            ("recipientAccess", &t.recipient_access),
            ("senderAccess", &t.sender_access),
        ] {
            for (i, r) in rules.iter().enumerate() {
                if !is_access_pattern(&r.pattern) {
                    errs.push(
                        format!("spec.accessTables.{name}[{i}].pattern"),
                        format!("`{}` must be an address, @domain or domain", r.pattern),
                    );
                }
                if let Some(m) = &r.message {
                    if m.contains('\n') {
                        errs.push(
                            format!("spec.accessTables.{name}[{i}].message"),
                            "must be one line",
                        );
                    }
                }
            }
        }
        let mut alias_keys = BTreeSet::new();
        for (i, a) in t.aliases.iter().enumerate() {
            if !is_access_pattern(&a.address) || !a.address.contains('@') {
                errs.push(
                    format!("spec.accessTables.aliases[{i}].address"),
                    format!("`{}` must be an address or @domain", a.address),
                );
            } else if !alias_keys.insert(a.address.as_str()) {
                errs.push(
                    format!("spec.accessTables.aliases[{i}].address"),
                    format!("duplicate alias `{}`", a.address),
                );
            }
            if a.targets.is_empty() {
                errs.push(
                    format!("spec.accessTables.aliases[{i}].targets"),
                    "at least one target is required",
                );
            }
            for (j, target) in a.targets.iter().enumerate() {
                if split_address(target).is_none() {
                    errs.push(
                        format!("spec.accessTables.aliases[{i}].targets[{j}]"),
                        format!("`{target}` is not a mail address"),
                    );
                }
            }
        }
        for (i, r) in t.relay_domains.iter().enumerate() {
            if !is_mail_domain(&r.domain) {
                errs.push(
                    format!("spec.accessTables.relayDomains[{i}].domain"),
                    format!("`{}` is not a DNS name", r.domain),
                );
            } else if self.domains.contains(&r.domain) {
                errs.push(
                    format!("spec.accessTables.relayDomains[{i}].domain"),
                    format!(
                        "`{}` is hosted here (spec.domains); it cannot also be relayed",
                        r.domain
                    ),
                );
            }
            if let Some(hop) = &r.next_hop {
                if hop.is_empty() || hop.contains(char::is_whitespace) {
                    errs.push(
                        format!("spec.accessTables.relayDomains[{i}].nextHop"),
                        "must be a host, [host] or [host]:port",
                    );
                }
            }
            for (j, rcpt) in r.recipients.iter().enumerate() {
                if split_address(rcpt).is_none_or(|(_, d)| d != r.domain) {
                    errs.push(
                        format!("spec.accessTables.relayDomains[{i}].recipients[{j}]"),
                        format!("`{rcpt}` is not a lower-case address in `{}`", r.domain),
                    );
                }
            }
        }
        for (i, a) in t.archive_bcc.iter().enumerate() {
            if !is_access_pattern(&a.pattern) || !a.pattern.contains('@') {
                errs.push(
                    format!("spec.accessTables.archiveBcc[{i}].pattern"),
                    format!("`{}` must be an address or @domain", a.pattern),
                );
            }
            if split_address(&a.bcc).is_none() {
                errs.push(
                    format!("spec.accessTables.archiveBcc[{i}].bcc"),
                    format!("`{}` is not a mail address", a.bcc),
                );
            }
        }
    }
}

fn is_dns_subdomain_name(s: &str) -> bool {
    super::validation::is_dns_subdomain(s)
}

/// An IPv4 or IPv6 CIDR range.
fn is_cidr(s: &str) -> bool {
    let Some((addr, len)) = s.split_once('/') else {
        return false;
    };
    match (addr.parse::<std::net::IpAddr>(), len.parse::<u8>()) {
        (Ok(std::net::IpAddr::V4(_)), Ok(l)) => l <= 32,
        (Ok(std::net::IpAddr::V6(_)), Ok(l)) => l <= 128,
        _ => false,
    }
}

/// `user@domain`, `@domain` or `domain`.
fn is_access_pattern(p: &str) -> bool {
    match p.strip_prefix('@') {
        Some(domain) => is_mail_domain(domain),
        None if p.contains('@') => split_address(p).is_some(),
        None => is_mail_domain(p),
    }
}

impl MailPod {
    /// Object name checks that the API server cannot make: the name prefixes every child's name.
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errs = match self.spec.validate() {
            Ok(()) => ValidationErrors::default(),
            Err(e) => e,
        };
        let name = self.metadata.name.as_deref().unwrap_or_default();
        // Children are named `<name>-submission-<ordinal>` and `<name>-lun-<n>-<ordinal>`: keep room for them.
        if !is_dns_label(name) || name.len() > 40 {
            errs.push(
                "metadata.name",
                "must be a DNS label of at most 40 characters (it prefixes the names of every child)",
            );
        }
        errs.into_result()
    }
}
