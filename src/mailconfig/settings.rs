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
            hostname: format!("mail.{first}"),
            max_message_bytes: spec.protection.max_message_bytes(),
            connection_rate_limit: spec.protection.connection_rate_limit,
            dnsbl: spec.protection.dnsbl.clone(),
            dnsbl_threshold: spec.protection.dnsbl_threshold,
            tls: spec.tls.is_some(),
        }
    }

    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).expect("settings serialize")
    }

    pub fn from_yaml(s: &str) -> Result<Self, serde_yaml::Error> {
        serde_yaml::from_str(s)
    }
}
