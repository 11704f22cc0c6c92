//! MailPod-wide mail settings: the `<mailpod>-mail-settings` ConfigMap (`settings.yaml`).
//!
//! The agent renders Postfix main.cf/master.cf and Dovecot configuration from these plus its role.
//! A change here is applied by the agent with `postfix reload` / `doveadm reload`, not a pod restart.

use serde::{Deserialize, Serialize};

use crate::crd::MailPodSpec;

/// Key of the settings file in the ConfigMap.
pub const SETTINGS_KEY: &str = "settings.yaml";

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct MailSettings {
    /// The MailPod these pods belong to.
    pub mailpod: String,
    /// Name the mail servers greet with (`myhostname`).
    pub hostname: String,
    /// Largest message accepted, in bytes.
    pub max_message_bytes: u64,
    /// New connections per client per minute (anvil); 0: no limit.
    pub connection_rate_limit: u32,
    /// postscreen DNSBL sites with weights.
    #[serde(default)]
    pub dnsbl: Vec<String>,
    pub dnsbl_threshold: u32,
    /// Whether a TLS certificate is mounted at the agent's TLS directory.
    pub tls: bool,
    /// What Dovecot gives each mailbox beyond storage (quota); absent from settings.yaml when nothing is on.
    #[serde(default, skip_serializing_if = "StoreFeatures::is_off")]
    pub features: StoreFeatures,
    /// mx: the milter every message passes through before it is queued; none when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<FilterSettings>,
    /// submission: the milter that DKIM-signs every message before it is queued; none when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signer: Option<FilterSettings>,
}

/// How mx's Postfix talks to the filter (rspamd's milter, see [`super::rspamd`]).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct FilterSettings {
    /// `host:port` of the milter (rspamd in the same pod: `127.0.0.1:11332`).
    pub milter: String,
    /// Seconds Postfix waits for each milter answer.
    pub timeout_seconds: u32,
    /// While the milter does not answer: 451 (true) or take the message unscanned (false).
    pub tempfail_when_down: bool,
}

/// Dovecot features of the stores (and the proxies in front of them).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct StoreFeatures {
    /// Stores: the default mailbox quota (per-mailbox overrides are in the access tables); none when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<QuotaSettings>,
    /// Stores and the imap proxies: Sieve with ManageSieve (always on; these are its limits).
    #[serde(default, skip_serializing_if = "SieveSettings::is_default")]
    pub sieve: SieveSettings,
    /// Stores: the networks whose clients (the imap and pop3 proxies) may pass on the address of the
    /// client they serve (Dovecot `login_trusted_networks`); none when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trusted_proxy_networks: Vec<String>,
}

/// Sieve on the stores.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SieveSettings {
    pub max_script_bytes: u64,
    pub max_scripts: u32,
    /// `host:port` that takes vacation replies and redirects; without it they are off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<String>,
}

impl Default for SieveSettings {
    fn default() -> Self {
        let spec = crate::crd::SieveSpec::default();
        Self {
            max_script_bytes: spec.max_script_bytes(),
            max_scripts: spec.max_scripts,
            relay: None,
        }
    }
}

impl SieveSettings {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

impl StoreFeatures {
    pub fn is_off(&self) -> bool {
        *self == Self::default()
    }
}

/// The default quota of every mailbox of a store.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct QuotaSettings {
    /// Bytes; 0: no storage limit.
    pub storage_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<u64>,
    /// Over quota, LMTP answers 452 (true) rather than 552.
    pub tempfail: bool,
}

impl MailSettings {
    pub fn build(mailpod: &str, spec: &MailPodSpec) -> Self {
        let first = spec
            .domains
            .first()
            .map(String::as_str)
            .unwrap_or("localdomain");
        Self {
            mailpod: mailpod.to_string(),
            hostname: spec
                .hostname
                .clone()
                .unwrap_or_else(|| format!("mail.{first}")),
            max_message_bytes: spec.protection.max_message_bytes(),
            connection_rate_limit: spec.protection.connection_rate_limit,
            dnsbl: spec.protection.dnsbl.clone(),
            dnsbl_threshold: spec.protection.dnsbl_threshold,
            tls: spec.tls.is_some(),
            features: StoreFeatures {
                quota: spec.quota.as_ref().map(|q| QuotaSettings {
                    storage_bytes: q.storage_bytes(),
                    messages: q.messages,
                    tempfail: q.over_quota == crate::crd::OverQuota::Defer,
                }),
                sieve: spec
                    .sieve
                    .as_ref()
                    .map(|s| SieveSettings {
                        max_script_bytes: s.max_script_bytes(),
                        max_scripts: s.max_scripts,
                        relay: s.relay_host.clone(),
                    })
                    .unwrap_or_default(),
                trusted_proxy_networks: spec.backend.trusted_proxy_networks.clone(),
            },
            filter: spec.filtering.as_ref().map(|f| FilterSettings {
                milter: super::rspamd::MILTER_IN_POD.to_string(),
                timeout_seconds: f.timeout_seconds,
                tempfail_when_down: f.when_down == crate::crd::FilterDownPolicy::Tempfail,
            }),
            signer: spec.dkim.as_ref().map(|_| super::rspamd::signer_settings()),
        }
    }

    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).expect("settings serialize")
    }

    pub fn from_yaml(s: &str) -> Result<Self, serde_yaml::Error> {
        serde_yaml::from_str(s)
    }
}
