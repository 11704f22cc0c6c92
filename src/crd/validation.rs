//! Field errors that name the path of the offending field, as the API server does.

use std::fmt;

/// One invalid field: its path (`spec.backend.standbys`) and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Every invalid field of one object, collected so a user can fix them all at once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ValidationErrors(pub Vec<FieldError>);

impl ValidationErrors {
    pub fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            path: path.into(),
            message: message.into(),
        });
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn into_result(self) -> Result<(), ValidationErrors> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(self)
        }
    }

    /// The first path, for a condition's short message.
    pub fn first_path(&self) -> Option<&str> {
        self.0.first().map(|e| e.path.as_str())
    }
}

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&parts.join("; "))
    }
}

impl std::error::Error for ValidationErrors {}

/// RFC 1123 DNS subdomain, as Kubernetes names and mail domains must be.
pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// RFC 1123 label: what a Kubernetes object name used as a prefix of child names must be.
pub fn is_dns_label(s: &str) -> bool {
    !s.contains('.') && s.len() <= 63 && is_dns_subdomain(s)
}

/// A mail domain: a DNS name of at least two labels, lower case.
pub fn is_mail_domain(s: &str) -> bool {
    is_dns_subdomain(s) && s.contains('.')
}

/// The local part of an address: dot-atom characters of RFC 5322 (no quoted strings).
pub fn is_local_part(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && !s.starts_with('.')
        && !s.ends_with('.')
        && !s.contains("..")
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+/=?^_`{|}~-.".contains(&b))
}

/// Splits `local@domain`; `None` when it is not a plain address.
pub fn split_address(s: &str) -> Option<(&str, &str)> {
    let (local, domain) = s.rsplit_once('@')?;
    (is_local_part(local) && is_mail_domain(domain)).then_some((local, domain))
}

/// A Kubernetes quantity of bytes (`50Gi`, `500M`, `1048576`), returned in bytes.
pub fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match suffix {
        "" => 1,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// The shape of a cron schedule as CronJob accepts it: five fields or an `@` descriptor.
pub fn check_cron(s: &str) -> Result<(), String> {
    use croner::parser::{CronParser, Seconds, Year};
    let trimmed = s.trim();
    if trimmed.starts_with("TZ=") || trimmed.starts_with("CRON_TZ=") {
        return Err("time zones belong in the CronJob's timeZone, not in the schedule".into());
    }
    if !trimmed.starts_with('@') && trimmed.split_whitespace().count() != 5 {
        return Err(format!(
            "`{s}` must have five fields (minute hour day-of-month month day-of-week)"
        ));
    }
    CronParser::builder()
        .seconds(Seconds::Disallowed)
        .year(Year::Disallowed)
        .build()
        .parse(trimmed)
        .map(|_| ())
        .map_err(|e| format!("`{s}` is not a valid cron schedule: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            split_address("a.b+c@example.com"),
            Some(("a.b+c", "example.com"))
        );
        assert!(split_address("nodomain").is_none());
        assert!(split_address("a@localhost").is_none());
        assert!(split_address(".a@example.com").is_none());
        assert!(split_address("a b@example.com").is_none());
        assert!(split_address("a@Example.com").is_none());
    }

    #[test]
    fn quantities() {
        assert_eq!(parse_bytes("50Gi"), Some(50 << 30));
        assert_eq!(parse_bytes("25M"), Some(25_000_000));
        assert_eq!(parse_bytes("1024"), Some(1024));
        assert_eq!(parse_bytes("1.5Gi"), None);
        assert_eq!(parse_bytes("Gi"), None);
    }

    #[test]
    fn cron() {
        assert!(check_cron("0 */8 * * *").is_ok());
        assert!(check_cron("@daily").is_ok());
        assert!(check_cron("0 0 */8 * * *").is_err());
        assert!(check_cron("61 * * * *").is_err());
        assert!(check_cron("TZ=UTC 0 * * * *").is_err());
    }

    #[test]
    fn names() {
        assert!(is_dns_label("corp-mail"));
        assert!(!is_dns_label("Corp"));
        assert!(!is_dns_label("a.b"));
        assert!(is_mail_domain("mail.example.org"));
        assert!(!is_mail_domain("example"));
    }
}
