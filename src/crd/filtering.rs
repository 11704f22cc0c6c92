//! Inbound filtering on mx: rspamd as a Postfix milter (spam actions by score, greylisting in a Redis per
//! MailPod) and ClamAV through rspamd's antivirus module.

use k8s_openapi::api::core::v1::ResourceRequirements;
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::validation::{is_dns_subdomain, ValidationErrors};

/// Highest spam score a threshold may name.
pub const MAX_SCORE: u32 = 1000;
/// Bounds of `timeoutSeconds`: long enough for a scan, short enough that no SMTP client gives up first.
pub const MIN_FILTER_TIMEOUT: u32 = 5;
pub const MAX_FILTER_TIMEOUT: u32 = 120;

/// Spam and virus filtering of every message mx accepts, before it is queued for a store.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.addHeaderScore) ? self.addHeaderScore : 6) == 0 || (has(self.rejectScore) ? self.rejectScore : 15) == 0 || (has(self.addHeaderScore) ? self.addHeaderScore : 6) < (has(self.rejectScore) ? self.rejectScore : 15)").message("addHeaderScore must be below rejectScore").field_path(".addHeaderScore"))]
#[x_kube(validation = Rule::new("(has(self.greylistScore) ? self.greylistScore : 4) == 0 || (has(self.rejectScore) ? self.rejectScore : 15) == 0 || (has(self.greylistScore) ? self.greylistScore : 4) < (has(self.rejectScore) ? self.rejectScore : 15)").message("greylistScore must be below rejectScore").field_path(".greylistScore"))]
pub struct FilteringSpec {
    /// What mx answers while the filter does not answer within `timeoutSeconds` (down, overloaded,
    /// starting): `Tempfail` (default: 451 4.7.1, the sender keeps the message and retries, nothing
    /// unscanned gets in) or `Accept` (the message is taken unscanned, mail keeps flowing).
    #[serde(default)]
    pub when_down: FilterDownPolicy,
    /// Seconds mx waits for each answer of the filter (Postfix's milter command and content timeouts;
    /// connecting waits at most 5 s of it). Default 30, from 5 to 120.
    #[serde(default = "default_timeout")]
    #[schemars(range(min = 5, max = 120))]
    pub timeout_seconds: u32,
    /// Score at which a message is refused at DATA with 554 5.7.1 (default 15; 0: never).
    #[serde(default = "default_reject")]
    #[schemars(range(min = 0, max = 1000))]
    pub reject_score: u32,
    /// Score at which a message is delivered with `X-Spam: Yes` (default 6; 0: never).
    #[serde(default = "default_add_header")]
    #[schemars(range(min = 0, max = 1000))]
    pub add_header_score: u32,
    /// Score at which an unknown sender is greylisted (451 at DATA, accepted on a retry after 5 minutes;
    /// the state is in the MailPod's Redis, shared by all mx replicas). Default 4; 0: no greylisting.
    #[serde(default = "default_greylist")]
    #[schemars(range(min = 0, max = 1000))]
    pub greylist_score: u32,
    /// ClamAV (clamd in each mx pod, asked by rspamd): a message carrying a known virus is refused.
    #[serde(default)]
    pub antivirus: AntivirusSpec,
    /// Resources of the rspamd container of each mx pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

/// The answer to mail while the filter cannot scan it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum FilterDownPolicy {
    /// 451 4.7.1: the sending server keeps the message and retries.
    #[default]
    Tempfail,
    /// Take the message unscanned.
    Accept,
}

/// Virus scanning.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.signatures) || self.signatures != 'Volume' || has(self.signaturesClaimName)").message("signaturesClaimName is required when signatures is Volume").field_path(".signaturesClaimName"))]
pub struct AntivirusSpec {
    /// Scan with ClamAV (default true).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Where clamd's signatures come from: `Download` (default: a freshclam container in each mx pod
    /// keeps them current from `mirror`) or `Volume` (offline: read-only from the PersistentVolumeClaim
    /// `signaturesClaimName`, kept current by whoever fills it).
    #[serde(default)]
    pub signatures: SignatureSource,
    /// ReadOnlyMany PersistentVolumeClaim holding `main.cvd`, `daily.cvd` (or `.cld`) and `bytecode.cvd`;
    /// for `signatures: Volume`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub signatures_claim_name: Option<String>,
    /// Host freshclam downloads from (default `database.clamav.net`); a private mirror for clusters
    /// without access to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub mirror: Option<String>,
    /// Resources of the clamd container (the signatures take about 1 GiB of memory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

/// Source of ClamAV signatures.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum SignatureSource {
    /// freshclam in each mx pod, checking `mirror` every two hours.
    #[default]
    Download,
    /// A mounted volume, read-only; no download.
    Volume,
}

fn yes() -> bool {
    true
}
fn default_timeout() -> u32 {
    30
}
fn default_reject() -> u32 {
    15
}
fn default_add_header() -> u32 {
    6
}
fn default_greylist() -> u32 {
    4
}

impl Default for AntivirusSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            signatures: SignatureSource::default(),
            signatures_claim_name: None,
            mirror: None,
            resources: None,
        }
    }
}

impl Default for FilteringSpec {
    fn default() -> Self {
        Self {
            when_down: FilterDownPolicy::default(),
            timeout_seconds: default_timeout(),
            reject_score: default_reject(),
            add_header_score: default_add_header(),
            greylist_score: default_greylist(),
            antivirus: AntivirusSpec::default(),
            resources: None,
        }
    }
}

impl FilteringSpec {
    /// The rules the schema states too; `path` is `spec.filtering`.
    pub fn validate(&self, path: &str, errs: &mut ValidationErrors) {
        if !(MIN_FILTER_TIMEOUT..=MAX_FILTER_TIMEOUT).contains(&self.timeout_seconds) {
            errs.push(
                format!("{path}.timeoutSeconds"),
                format!("must be between {MIN_FILTER_TIMEOUT} and {MAX_FILTER_TIMEOUT}"),
            );
        }
        for (name, score) in [
            ("rejectScore", self.reject_score),
            ("addHeaderScore", self.add_header_score),
            ("greylistScore", self.greylist_score),
        ] {
            if score > MAX_SCORE {
                errs.push(
                    format!("{path}.{name}"),
                    format!("must be between 0 and {MAX_SCORE}"),
                );
            }
        }
        let below_reject = |s: u32| s == 0 || self.reject_score == 0 || s < self.reject_score;
        if !below_reject(self.add_header_score) {
            errs.push(
                format!("{path}.addHeaderScore"),
                "addHeaderScore must be below rejectScore",
            );
        }
        if !below_reject(self.greylist_score) {
            errs.push(
                format!("{path}.greylistScore"),
                "greylistScore must be below rejectScore",
            );
        }
        let av = &self.antivirus;
        let av_path = format!("{path}.antivirus");
        match &av.signatures_claim_name {
            Some(claim) if !is_dns_subdomain(claim) => errs.push(
                format!("{av_path}.signaturesClaimName"),
                format!("`{claim}` is not a PersistentVolumeClaim name"),
            ),
            None if av.signatures == SignatureSource::Volume => errs.push(
                format!("{av_path}.signaturesClaimName"),
                "signaturesClaimName is required when signatures is Volume",
            ),
            _ => {}
        }
        if let Some(m) = av.mirror.as_deref().filter(|m| !is_dns_subdomain(m)) {
            errs.push(
                format!("{av_path}.mirror"),
                format!("`{m}` is not a host name such as clamav-mirror.example.com"),
            );
        }
    }

    /// Whether clamd runs (and rspamd asks it).
    pub fn scans_viruses(&self) -> bool {
        self.antivirus.enabled
    }

    /// Whether a freshclam container keeps the signatures current.
    pub fn downloads_signatures(&self) -> bool {
        self.scans_viruses() && self.antivirus.signatures == SignatureSource::Download
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filtering_errors_name_the_field() {
        let f: FilteringSpec = serde_yaml::from_str(
            "timeoutSeconds: 600\nrejectScore: 10\naddHeaderScore: 12\ngreylistScore: 2000\n\
             antivirus: {signatures: Volume, mirror: 'http://x'}",
        )
        .unwrap();
        let mut errs = ValidationErrors::default();
        f.validate("spec.filtering", &mut errs);
        let text = errs.into_result().unwrap_err().to_string();
        for want in [
            "spec.filtering.timeoutSeconds: must be between 5 and 120",
            "spec.filtering.greylistScore: must be between 0 and 1000",
            "spec.filtering.addHeaderScore: addHeaderScore must be below rejectScore",
            "spec.filtering.greylistScore: greylistScore must be below rejectScore",
            "spec.filtering.antivirus.signaturesClaimName: signaturesClaimName is required",
            "spec.filtering.antivirus.mirror: `http://x` is not a host name",
        ] {
            assert!(text.contains(want), "{want}\nnot in\n{text}");
        }
    }

    #[test]
    fn defaults_filter_with_greylisting_and_downloaded_signatures() {
        let f: FilteringSpec = serde_yaml::from_str("{}").unwrap();
        assert_eq!(f, FilteringSpec::default());
        assert_eq!(f.when_down, FilterDownPolicy::Tempfail);
        assert!(f.downloads_signatures());
        let mut errs = ValidationErrors::default();
        f.validate("spec.filtering", &mut errs);
        assert!(errs.is_empty(), "{errs}");
        // 0 turns an action off and is never out of order.
        let off: FilteringSpec =
            serde_yaml::from_str("rejectScore: 0\naddHeaderScore: 50\ngreylistScore: 0").unwrap();
        let mut errs = ValidationErrors::default();
        off.validate("spec.filtering", &mut errs);
        assert!(errs.is_empty(), "{errs}");
    }
}
