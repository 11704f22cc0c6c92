//! DKIM signing of the mail users send (`spec.dkim`): one key per domain, kept in a Secret, and the DNS
//! record each key needs in the MailPod's status.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::validation::{is_dns_label, is_dns_subdomain, ValidationErrors};

/// Signing of every message submission accepts, with the key of its From domain.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DkimSpec {
    /// The selector: receivers look the key up at `<selector>._domainkey.<domain>`. Default `mail`. A
    /// new selector means new keys (the old ones stay in the Secret), so a key can be rotated by
    /// publishing the new record first and changing the selector after.
    #[serde(default = "default_selector")]
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub selector: String,
    /// Secret with the private keys, one PEM entry per domain and selector named
    /// `<domain>.<selector>.key`. Default `<mailpod>-dkim`. The operator generates (RSA 2048) and adds
    /// the keys it lacks; it never replaces or deletes one, and the Secret outlives the MailPod, so a
    /// published record stays valid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub secret_name: Option<String>,
}

fn default_selector() -> String {
    "mail".into()
}

impl Default for DkimSpec {
    fn default() -> Self {
        Self {
            selector: default_selector(),
            secret_name: None,
        }
    }
}

impl DkimSpec {
    /// The rules the schema states too; `path` is `spec.dkim`.
    pub fn validate(&self, path: &str, errs: &mut ValidationErrors) {
        if !is_dns_label(&self.selector) {
            errs.push(
                format!("{path}.selector"),
                format!(
                    "`{}` is not a DNS label (lower-case letters, digits and `-`)",
                    self.selector
                ),
            );
        }
        if let Some(s) = self.secret_name.as_deref().filter(|s| !is_dns_subdomain(s)) {
            errs.push(
                format!("{path}.secretName"),
                format!("`{s}` is not a Secret name"),
            );
        }
    }

    /// The Secret holding the keys of MailPod `mailpod`.
    pub fn secret(&self, mailpod: &str) -> String {
        self.secret_name
            .clone()
            .unwrap_or_else(|| format!("{mailpod}-dkim"))
    }
}

/// Key of `domain`'s private key in the Secret (the file name the signer reads).
pub fn dkim_key_name(domain: &str, selector: &str) -> String {
    format!("{domain}.{selector}.key")
}

/// The DNS record one domain must publish for its signatures to verify.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DkimRecord {
    pub domain: String,
    pub selector: String,
    /// Where the TXT record goes: `<selector>._domainkey.<domain>`.
    pub name: String,
    /// The TXT record's text: `v=DKIM1; k=rsa; p=<public key>`.
    pub txt: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_selector_must_be_a_dns_label_and_the_secret_a_name() {
        let mut errs = ValidationErrors::default();
        DkimSpec {
            selector: "Mail_2026".into(),
            secret_name: Some("Keys!".into()),
        }
        .validate("spec.dkim", &mut errs);
        let text = errs.to_string();
        assert!(text.contains("spec.dkim.selector"), "{text}");
        assert!(text.contains("spec.dkim.secretName"), "{text}");
        let mut ok = ValidationErrors::default();
        DkimSpec::default().validate("spec.dkim", &mut ok);
        assert!(ok.is_empty(), "{ok}");
        assert_eq!(DkimSpec::default().secret("corp"), "corp-dkim");
        assert_eq!(dkim_key_name("example.com", "mail"), "example.com.mail.key");
    }
}
