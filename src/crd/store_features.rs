//! What the stores give each mailbox beyond storing mail: quotas (Dovecot's quota plugin) and Sieve
//! filtering with ManageSieve and vacation replies (Pigeonhole).

use std::collections::BTreeSet;

use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::validation::{parse_bytes, split_address, ValidationErrors};

/// Most per-mailbox quota overrides one MailPod may declare; it bounds the object and its CEL cost.
pub const MAX_QUOTA_OVERRIDES: u32 = 1000;
/// Largest message-count limit (Dovecot counts in 64 bits; this keeps values readable and sane).
pub const MAX_QUOTA_MESSAGES: u64 = 100_000_000;
const MAX_QUANTITY_LEN: usize = 32;

/// Mailbox quotas, enforced by each store's Dovecot (quota plugin, `count` backend).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct QuotaSpec {
    /// Storage each mailbox may use (`2Gi`); `0` for no storage limit.
    #[x_kube(validation = Rule::new("self.matches('^[0-9]+(k|M|G|T|Ki|Mi|Gi|Ti)?$')").message("must be a whole quantity of bytes such as 2Gi"))]
    #[schemars(length(max = 32))]
    pub storage: String,
    /// Messages each mailbox may hold; no message limit when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100_000_000))]
    pub messages: Option<u64>,
    /// What a store answers when a delivery would exceed the quota: `Defer` (LMTP 452 4.2.2: the mx keeps
    /// the message queued and retries until the mailbox has room or the queue lifetime ends) or `Refuse`
    /// (552 5.2.2: the mx returns it to the sender at once). Default `Defer`.
    #[serde(default)]
    pub over_quota: OverQuota,
    /// Mailboxes with limits of their own; each replaces the defaults above for that mailbox.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_QUOTA_OVERRIDES))]
    pub overrides: Vec<QuotaOverride>,
}

/// The LMTP answer to a delivery over quota.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum OverQuota {
    /// 452 4.2.2: a temporary failure (Dovecot's `quota_full_tempfail = yes`).
    #[default]
    Defer,
    /// 552 5.2.2: a permanent failure.
    Refuse,
}

/// One mailbox's own limits.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.storage) || has(self.messages)").message("set storage, messages or both"))]
pub struct QuotaOverride {
    /// A mailbox of this MailPod, such as `alice@example.com`.
    #[schemars(length(max = 254))]
    pub mailbox: String,
    /// Storage this mailbox may use; `0` for no limit; the MailPod's default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[0-9]+(k|M|G|T|Ki|Mi|Gi|Ti)?$')").message("must be a whole quantity of bytes such as 10Gi"))]
    #[schemars(length(max = 32))]
    pub storage: Option<String>,
    /// Messages this mailbox may hold; the MailPod's default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100_000_000))]
    pub messages: Option<u64>,
}

impl QuotaSpec {
    /// The default storage limit in bytes (validated specs only; 0: none).
    pub fn storage_bytes(&self) -> u64 {
        parse_bytes(&self.storage).unwrap_or(0)
    }

    /// Field rules the schema states too, plus those across fields; `path` is `spec.quota`. Whether each
    /// override names a mailbox of the MailPod is checked with the mailboxes (`resources::mailboxes`).
    pub fn validate(&self, path: &str, errs: &mut ValidationErrors) {
        check_quantity(&self.storage, &format!("{path}.storage"), errs);
        check_messages(self.messages, &format!("{path}.messages"), errs);
        if self.overrides.len() > MAX_QUOTA_OVERRIDES as usize {
            errs.push(
                format!("{path}.overrides"),
                format!("at most {MAX_QUOTA_OVERRIDES} overrides"),
            );
        }
        let mut seen = BTreeSet::new();
        for (i, o) in self.overrides.iter().enumerate() {
            let p = format!("{path}.overrides[{i}]");
            if split_address(&o.mailbox).is_none() {
                errs.push(
                    format!("{p}.mailbox"),
                    format!("`{}` is not a lower-case mail address", o.mailbox),
                );
            } else if !seen.insert(o.mailbox.as_str()) {
                errs.push(
                    format!("{p}.mailbox"),
                    format!("duplicate override for `{}`", o.mailbox),
                );
            }
            if o.storage.is_none() && o.messages.is_none() {
                errs.push(p.clone(), "set storage, messages or both");
            }
            if let Some(s) = &o.storage {
                check_quantity(s, &format!("{p}.storage"), errs);
            }
            check_messages(o.messages, &format!("{p}.messages"), errs);
        }
    }
}

fn check_quantity(s: &str, path: &str, errs: &mut ValidationErrors) {
    if s.len() > MAX_QUANTITY_LEN || parse_bytes(s).is_none() {
        errs.push(
            path,
            format!("`{s}` is not a whole quantity of bytes such as 2Gi"),
        );
    }
}

fn check_messages(m: Option<u64>, path: &str, errs: &mut ValidationErrors) {
    if let Some(m) = m {
        if !(1..=MAX_QUOTA_MESSAGES).contains(&m) {
            errs.push(path, format!("must be between 1 and {MAX_QUOTA_MESSAGES}"));
        }
    }
}

/// Most Sieve scripts one mailbox may keep.
pub const MAX_SIEVE_SCRIPTS: u32 = 100;
/// Largest Sieve script a user may upload.
pub const MAX_SIEVE_SCRIPT_BYTES: u64 = 1 << 20;

/// Sieve filtering (always on: every mailbox may upload scripts through ManageSieve, port 4190 of the imap
/// Service) and what leaves the stores on a script's behalf.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SieveSpec {
    /// Largest script a mailbox may upload (default `64Ki`, at most `1Mi`).
    #[serde(default = "default_max_script_size")]
    #[x_kube(validation = Rule::new("self.matches('^[0-9]+(k|M|Ki|Mi)?$')").message("must be a whole quantity of bytes such as 64Ki"))]
    #[schemars(length(max = 32))]
    pub max_script_size: String,
    /// Most scripts one mailbox may keep (default 10).
    #[serde(default = "default_max_scripts")]
    #[schemars(range(min = 1, max = 100))]
    pub max_scripts: u32,
    /// SMTP relay (`host:port`) that takes the stores' vacation replies and redirects, unauthenticated, and
    /// sends them on: an in-cluster relay or the smarthost. Without it the `vacation` extension and
    /// `redirect` are off, so a script using them is refused at upload instead of never sending anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9.]*[a-z0-9])?:[0-9]{1,5}$')").message("must be host:port, such as relay.mail.svc.cluster.local:25"))]
    #[schemars(length(max = 260))]
    pub relay_host: Option<String>,
}

fn default_max_script_size() -> String {
    "64Ki".into()
}
fn default_max_scripts() -> u32 {
    10
}

impl Default for SieveSpec {
    fn default() -> Self {
        Self {
            max_script_size: default_max_script_size(),
            max_scripts: default_max_scripts(),
            relay_host: None,
        }
    }
}

impl SieveSpec {
    /// `maxScriptSize` in bytes (validated specs only).
    pub fn max_script_bytes(&self) -> u64 {
        parse_bytes(&self.max_script_size).unwrap_or(64 << 10)
    }

    /// The rules the schema states too; `path` is `spec.sieve`.
    pub fn validate(&self, path: &str, errs: &mut ValidationErrors) {
        match parse_bytes(&self.max_script_size) {
            Some(b) if (1..=MAX_SIEVE_SCRIPT_BYTES).contains(&b) => {}
            _ => errs.push(
                format!("{path}.maxScriptSize"),
                format!(
                    "`{}` must be a whole quantity of bytes from 1 to 1Mi, such as 64Ki",
                    self.max_script_size
                ),
            ),
        }
        if !(1..=MAX_SIEVE_SCRIPTS).contains(&self.max_scripts) {
            errs.push(
                format!("{path}.maxScripts"),
                format!("must be between 1 and {MAX_SIEVE_SCRIPTS}"),
            );
        }
        if let Some(relay) = &self.relay_host {
            let ok = relay.rsplit_once(':').is_some_and(|(host, port)| {
                super::validation::is_dns_subdomain(host)
                    && port.len() <= 5
                    && port.parse::<u16>().is_ok_and(|p| p > 0)
            });
            if !ok {
                errs.push(
                    format!("{path}.relayHost"),
                    format!("`{relay}` must be host:port, such as relay.mail.svc.cluster.local:25"),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_errors_name_the_field() {
        let q: QuotaSpec = serde_yaml::from_str(
            r#"
storage: 2 GB
messages: 0
overrides:
  - {mailbox: alice@example.com, storage: 10Gi}
  - {mailbox: alice@example.com, messages: 5}
  - {mailbox: Bob}
"#,
        )
        .unwrap();
        let mut errs = ValidationErrors::default();
        q.validate("spec.quota", &mut errs);
        let text = errs.into_result().unwrap_err().to_string();
        for want in [
            "spec.quota.storage: `2 GB` is not a whole quantity of bytes",
            "spec.quota.messages: must be between 1 and",
            "spec.quota.overrides[1].mailbox: duplicate override for `alice@example.com`",
            "spec.quota.overrides[2].mailbox: `Bob` is not a lower-case mail address",
            "spec.quota.overrides[2]: set storage, messages or both",
        ] {
            assert!(text.contains(want), "{want}\nnot in\n{text}");
        }
        assert!(!text.contains("overrides[0]"), "{text}");
    }

    #[test]
    fn sieve_errors_name_the_field() {
        let s: SieveSpec =
            serde_yaml::from_str("maxScriptSize: 2Mi\nmaxScripts: 0\nrelayHost: relay.example.com")
                .unwrap();
        let mut errs = ValidationErrors::default();
        s.validate("spec.sieve", &mut errs);
        let text = errs.into_result().unwrap_err().to_string();
        for want in [
            "spec.sieve.maxScriptSize: `2Mi` must be a whole quantity of bytes from 1 to 1Mi",
            "spec.sieve.maxScripts: must be between 1 and 100",
            "spec.sieve.relayHost: `relay.example.com` must be host:port",
        ] {
            assert!(text.contains(want), "{want}\nnot in\n{text}");
        }
        let ok: SieveSpec =
            serde_yaml::from_str("relayHost: relay.mail.svc.cluster.local:25").unwrap();
        let mut errs = ValidationErrors::default();
        ok.validate("spec.sieve", &mut errs);
        assert!(errs.is_empty(), "{errs}");
        assert_eq!(ok.max_script_bytes(), 65536);
        assert_eq!(ok.max_scripts, 10);
    }

    #[test]
    fn over_quota_defaults_to_defer() {
        let q: QuotaSpec = serde_yaml::from_str("storage: 1Gi").unwrap();
        assert_eq!(q.over_quota, OverQuota::Defer);
        assert_eq!(q.storage_bytes(), 1 << 30);
        let mut errs = ValidationErrors::default();
        q.validate("spec.quota", &mut errs);
        assert!(errs.is_empty());
    }
}
