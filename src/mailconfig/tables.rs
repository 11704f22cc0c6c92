//! The access tables of a MailPod, in the compact line format of its `<mailpod>-access-tables` ConfigMap.
//!
//! Each key is a text file of `key value` lines, sorted, so `kubectl get configmap -o yaml` is readable
//! and diffs are small. Per-mailbox data is one short line (`address lun-index`); the agent expands it
//! into Postfix transport/virtual maps and Dovecot proxy passdb files, which keeps the ConfigMap far below
//! the API server's 1 MiB object limit (about 25 bytes a mailbox).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use sha2::{Digest, Sha256};

use crate::crd::{AccessAction, ArchiveDirection, MailPodSpec};
use crate::placement::LunAssignment;

/// ConfigMap keys.
pub mod keys {
    pub const DOMAINS: &str = "domains";
    pub const MAILBOXES: &str = "mailboxes";
    pub const LUNS: &str = "luns";
    pub const RELAY_DOMAINS: &str = "relay_domains";
    pub const ALIASES: &str = "aliases";
    pub const RECIPIENT_ACCESS: &str = "recipient_access";
    pub const SENDER_ACCESS: &str = "sender_access";
    pub const RECIPIENT_BCC: &str = "recipient_bcc";
    pub const SENDER_BCC: &str = "sender_bcc";
    /// Per-mailbox quota overrides; present only when there are any, so tables without them (and their
    /// hash, which the sites compare) are what they were before quotas existed.
    pub const QUOTAS: &str = "quotas";
    /// The listed recipients of relay domains; present only when there are any, as `quotas`.
    pub const RELAY_RECIPIENTS: &str = "relay_recipients";
    /// `address n` for mailboxes taken back by their LUN after a removal, whose home is a new one
    /// (placement::MAILBOX_INCARNATIONS); present only when there are any, as `quotas`.
    pub const INCARNATIONS: &str = "incarnations";
}

/// Largest rendered size the operator accepts, leaving room for metadata under the 1 MiB object limit.
pub const MAX_DATA_BYTES: usize = 900 * 1024;

/// Where a LUN's active store answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LunEndpoint {
    /// Service name (same namespace) or address.
    pub host: String,
    pub lmtp_port: u16,
    pub imap_port: u16,
    pub pop3_port: u16,
    pub sieve_port: u16,
}

/// ManageSieve's standard port, which a store answers on in a cluster.
pub const SIEVE_PORT: u16 = 4190;

impl LunEndpoint {
    /// Standard in-cluster ports of a store: LMTP 24, IMAP 143, POP3 110, ManageSieve 4190.
    pub fn in_cluster(host: impl Into<String>) -> Self {
        Self {
            host: host.into(),
            lmtp_port: 24,
            imap_port: 143,
            pop3_port: 110,
            sieve_port: SIEVE_PORT,
        }
    }
}

/// Postfix access table entry: pattern and action (with optional text).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessEntry {
    pub pattern: String,
    pub action: String,
}

/// One mailbox's own quota limits (`None`: the MailPod's default).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MailboxQuota {
    /// Bytes; 0: no storage limit.
    pub storage_bytes: Option<u64>,
    pub messages: Option<u64>,
}

/// Everything the front ends need to route and filter mail, in one value that hashes and round-trips.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AccessTables {
    pub domains: Vec<String>,
    /// Mailbox address -> LUN index.
    pub mailboxes: BTreeMap<String, u32>,
    /// LUN index -> where its active store answers.
    pub luns: BTreeMap<u32, LunEndpoint>,
    /// Relay domain -> next hop (empty: MX lookup).
    pub relay_domains: BTreeMap<String, String>,
    /// The recipients relay domains list; a relay domain with none here is verified with its next hop.
    pub relay_recipients: BTreeSet<String>,
    /// Alias -> targets.
    pub aliases: BTreeMap<String, Vec<String>>,
    pub recipient_access: Vec<AccessEntry>,
    pub sender_access: Vec<AccessEntry>,
    /// Pattern -> archive address.
    pub recipient_bcc: BTreeMap<String, String>,
    pub sender_bcc: BTreeMap<String, String>,
    /// Mailbox -> its quota override (the stores render it into their userdb).
    pub quotas: BTreeMap<String, MailboxQuota>,
    /// Mailbox -> its incarnation on its LUN, when it is not the first (the stores give it a home of its
    /// own, mailconfig::layout::home).
    pub incarnations: BTreeMap<String, u32>,
}

/// The mailboxes the tables place on one LUN (sorted), and the incarnation of those the LUN took back
/// after a removal: what a store replicates and hands over, and what a restore may bring back.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LunMailboxes {
    pub users: Vec<String>,
    pub incarnations: BTreeMap<String, u32>,
}

impl LunMailboxes {
    /// `user`'s incarnation on the LUN (0: the first).
    pub fn incarnation(&self, user: &str) -> u32 {
        self.incarnations.get(user).copied().unwrap_or(0)
    }
}

/// A line of the ConfigMap that cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("access tables: key `{key}` line {line}: {message}")]
pub struct ParseError {
    pub key: String,
    pub line: usize,
    pub message: String,
}

impl AccessTables {
    /// The tables for a validated spec and its placement; `endpoint` says where LUN `index` answers.
    pub fn build(
        spec: &MailPodSpec,
        placement: &[LunAssignment],
        endpoint: impl Fn(u32) -> LunEndpoint,
    ) -> Self {
        let t = &spec.access_tables;
        let access = |rules: &[crate::crd::AccessRule]| {
            rules
                .iter()
                .map(|r| AccessEntry {
                    pattern: r.pattern.clone(),
                    action: match (&r.message, r.action) {
                        (
                            Some(m),
                            AccessAction::Reject | AccessAction::Defer | AccessAction::Hold,
                        ) => {
                            format!("{} {m}", r.action.as_str())
                        }
                        _ => r.action.as_str().to_string(),
                    },
                })
                .collect()
        };
        let bcc = |dir: ArchiveDirection| {
            t.archive_bcc
                .iter()
                .filter(|a| a.direction == dir || a.direction == ArchiveDirection::Both)
                .map(|a| (a.pattern.clone(), a.bcc.clone()))
                .collect()
        };
        let mut domains = spec.domains.clone();
        domains.sort();
        Self {
            domains,
            mailboxes: placement
                .iter()
                .flat_map(|l| l.mailboxes.iter().map(move |m| (m.clone(), l.index)))
                .collect(),
            luns: placement
                .iter()
                .map(|l| (l.index, endpoint(l.index)))
                .collect(),
            incarnations: placement
                .iter()
                .flat_map(|l| {
                    l.incarnations
                        .iter()
                        .filter(|(m, n)| **n > 0 && l.mailboxes.contains(*m))
                        .map(|(m, n)| (m.clone(), *n))
                })
                .collect(),
            relay_domains: t
                .relay_domains
                .iter()
                .map(|r| (r.domain.clone(), r.next_hop.clone().unwrap_or_default()))
                .collect(),
            relay_recipients: t
                .relay_domains
                .iter()
                .flat_map(|r| r.recipients.iter().cloned())
                .collect(),
            aliases: with_role_addresses(spec, placement),
            recipient_access: access(&t.recipient_access),
            sender_access: access(&t.sender_access),
            recipient_bcc: bcc(ArchiveDirection::Inbound),
            sender_bcc: bcc(ArchiveDirection::Outbound),
            quotas: spec
                .quota
                .iter()
                .flat_map(|q| q.overrides.iter())
                .map(|o| {
                    let quota = MailboxQuota {
                        storage_bytes: o.storage.as_deref().and_then(crate::crd::validation_bytes),
                        messages: o.messages,
                    };
                    (o.mailbox.clone(), quota)
                })
                .collect(),
        }
    }

    /// The ConfigMap's `data`.
    pub fn to_data(&self) -> BTreeMap<String, String> {
        let mut data = BTreeMap::new();
        let mut put = |key: &str, text: String| {
            data.insert(key.to_string(), text);
        };
        put(
            keys::DOMAINS,
            lines(self.domains.iter().map(|d| d.to_string())),
        );
        put(
            keys::MAILBOXES,
            lines(self.mailboxes.iter().map(|(m, i)| format!("{m} {i}"))),
        );
        put(
            keys::LUNS,
            // The ManageSieve port only when it is not the standard one, so that in-cluster tables
            // read as they did before it existed.
            lines(self.luns.iter().map(|(i, e)| {
                let mut line = format!(
                    "{i} {} {} {} {}",
                    e.host, e.lmtp_port, e.imap_port, e.pop3_port
                );
                if e.sieve_port != SIEVE_PORT {
                    let _ = write!(line, " {}", e.sieve_port);
                }
                line
            })),
        );
        put(
            keys::RELAY_DOMAINS,
            lines(self.relay_domains.iter().map(|(d, hop)| {
                if hop.is_empty() {
                    d.clone()
                } else {
                    format!("{d} {hop}")
                }
            })),
        );
        put(
            keys::ALIASES,
            lines(
                self.aliases
                    .iter()
                    .map(|(a, t)| format!("{a} {}", t.join(","))),
            ),
        );
        put(
            keys::RECIPIENT_ACCESS,
            lines(
                self.recipient_access
                    .iter()
                    .map(|e| format!("{} {}", e.pattern, e.action)),
            ),
        );
        put(
            keys::SENDER_ACCESS,
            lines(
                self.sender_access
                    .iter()
                    .map(|e| format!("{} {}", e.pattern, e.action)),
            ),
        );
        put(
            keys::RECIPIENT_BCC,
            lines(self.recipient_bcc.iter().map(|(p, b)| format!("{p} {b}"))),
        );
        put(
            keys::SENDER_BCC,
            lines(self.sender_bcc.iter().map(|(p, b)| format!("{p} {b}"))),
        );
        if !self.relay_recipients.is_empty() {
            put(
                keys::RELAY_RECIPIENTS,
                lines(self.relay_recipients.iter().cloned()),
            );
        }
        if !self.incarnations.is_empty() {
            put(
                keys::INCARNATIONS,
                lines(self.incarnations.iter().map(|(m, n)| format!("{m} {n}"))),
            );
        }
        if !self.quotas.is_empty() {
            put(
                keys::QUOTAS,
                lines(self.quotas.iter().map(|(m, q)| {
                    let mut line = m.clone();
                    if let Some(b) = q.storage_bytes {
                        let _ = write!(line, " storage={b}");
                    }
                    if let Some(n) = q.messages {
                        let _ = write!(line, " messages={n}");
                    }
                    line
                })),
            );
        }
        data
    }

    /// Reads the ConfigMap's `data` back (what the agent does with the mounted files).
    pub fn from_data(data: &BTreeMap<String, String>) -> Result<Self, ParseError> {
        let mut t = AccessTables::default();
        for (n, line) in entries(data, keys::DOMAINS) {
            let (d, rest) = split(line);
            if !rest.is_empty() {
                return Err(err(keys::DOMAINS, n, "expected one domain"));
            }
            t.domains.push(d.to_string());
        }
        for (n, line) in entries(data, keys::MAILBOXES) {
            let (m, i) = split(line);
            let i = i
                .parse()
                .map_err(|_| err(keys::MAILBOXES, n, "expected `address lun-index`"))?;
            t.mailboxes.insert(m.to_string(), i);
        }
        for (n, line) in entries(data, keys::LUNS) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let bad = || {
                err(
                    keys::LUNS,
                    n,
                    "expected `index host lmtp-port imap-port pop3-port [sieve-port]`",
                )
            };
            if !(5..=6).contains(&f.len()) {
                return Err(bad());
            }
            let port = |s: &str| s.parse::<u16>().map_err(|_| bad());
            t.luns.insert(
                f[0].parse().map_err(|_| bad())?,
                LunEndpoint {
                    host: f[1].to_string(),
                    lmtp_port: port(f[2])?,
                    imap_port: port(f[3])?,
                    pop3_port: port(f[4])?,
                    sieve_port: f.get(5).map_or(Ok(SIEVE_PORT), |p| port(p))?,
                },
            );
        }
        for (_, line) in entries(data, keys::RELAY_DOMAINS) {
            let (d, hop) = split(line);
            t.relay_domains.insert(d.to_string(), hop.to_string());
        }
        for (n, line) in entries(data, keys::RELAY_RECIPIENTS) {
            let (r, rest) = split(line);
            if !rest.is_empty() {
                return Err(err(keys::RELAY_RECIPIENTS, n, "expected one address"));
            }
            t.relay_recipients.insert(r.to_string());
        }
        for (n, line) in entries(data, keys::ALIASES) {
            let (a, targets) = split(line);
            if targets.is_empty() {
                return Err(err(keys::ALIASES, n, "expected `alias target[,target...]`"));
            }
            t.aliases.insert(
                a.to_string(),
                targets.split(',').map(str::to_string).collect(),
            );
        }
        for (key, list) in [
            (keys::RECIPIENT_ACCESS, &mut t.recipient_access),
            (keys::SENDER_ACCESS, &mut t.sender_access),
        ] {
            for (n, line) in entries(data, key) {
                let (p, action) = split(line);
                if action.is_empty() {
                    return Err(err(key, n, "expected `pattern action`"));
                }
                list.push(AccessEntry {
                    pattern: p.to_string(),
                    action: action.to_string(),
                });
            }
        }
        for (key, map) in [
            (keys::RECIPIENT_BCC, &mut t.recipient_bcc),
            (keys::SENDER_BCC, &mut t.sender_bcc),
        ] {
            for (n, line) in entries(data, key) {
                let (p, b) = split(line);
                if b.is_empty() {
                    return Err(err(key, n, "expected `pattern archive-address`"));
                }
                map.insert(p.to_string(), b.to_string());
            }
        }
        for (n, line) in entries(data, keys::INCARNATIONS) {
            let (m, i) = split(line);
            let i = i
                .parse()
                .ok()
                .filter(|i| *i > 0)
                .ok_or_else(|| err(keys::INCARNATIONS, n, "expected `address incarnation`"))?;
            t.incarnations.insert(m.to_string(), i);
        }
        for (n, line) in entries(data, keys::QUOTAS) {
            let bad = || {
                err(
                    keys::QUOTAS,
                    n,
                    "expected `address [storage=BYTES] [messages=N]`",
                )
            };
            let mut fields = line.split_whitespace();
            let mailbox = fields.next().ok_or_else(bad)?;
            let mut quota = MailboxQuota::default();
            for f in fields {
                match f.split_once('=') {
                    Some(("storage", v)) => {
                        quota.storage_bytes = Some(v.parse().map_err(|_| bad())?)
                    }
                    Some(("messages", v)) => quota.messages = Some(v.parse().map_err(|_| bad())?),
                    _ => return Err(bad()),
                }
            }
            if quota == MailboxQuota::default() {
                return Err(bad());
            }
            t.quotas.insert(mailbox.to_string(), quota);
        }
        Ok(t)
    }

    /// The mailboxes placed on LUN `index`, with their incarnations.
    pub fn lun(self, index: u32) -> LunMailboxes {
        let users: Vec<String> = self
            .mailboxes
            .into_iter()
            .filter(|(_, lun)| *lun == index)
            .map(|(m, _)| m)
            .collect();
        let incarnations = self
            .incarnations
            .into_iter()
            .filter(|(m, _)| users.binary_search(m).is_ok())
            .collect();
        LunMailboxes {
            users,
            incarnations,
        }
    }

    /// SHA-256 over the rendered data (keys and values in order): equal tables, equal hash, on any site.
    pub fn hash(&self) -> String {
        data_hash(&self.to_data())
    }
}

/// The spec's aliases plus `postmaster@` and `abuse@` of every domain that has neither a mailbox nor an
/// alias of that name, each to the spec's postmaster (RFC 5321 section 4.5.1, RFC 2142).
fn with_role_addresses(
    spec: &MailPodSpec,
    placement: &[LunAssignment],
) -> BTreeMap<String, Vec<String>> {
    let mut aliases: BTreeMap<String, Vec<String>> = spec
        .access_tables
        .aliases
        .iter()
        .map(|a| (a.address.clone(), a.targets.clone()))
        .collect();
    let postmaster = spec.postmaster_address();
    for domain in &spec.domains {
        for local in ["postmaster", "abuse"] {
            let address = format!("{local}@{domain}");
            let mailbox = placement.iter().any(|l| l.mailboxes.contains(&address));
            if !mailbox && address != postmaster && !aliases.contains_key(&address) {
                aliases.insert(address, vec![postmaster.clone()]);
            }
        }
    }
    aliases
}

/// Hash of a ConfigMap's data as the operator and the agent compute it (first 16 bytes, hex).
pub fn data_hash(data: &BTreeMap<String, String>) -> String {
    let mut h = Sha256::new();
    for (k, v) in data {
        h.update((k.len() as u64).to_le_bytes());
        h.update(k.as_bytes());
        h.update((v.len() as u64).to_le_bytes());
        h.update(v.as_bytes());
    }
    hex::encode(&h.finalize()[..16])
}

/// Total bytes of a ConfigMap's data.
pub fn data_size(data: &BTreeMap<String, String>) -> usize {
    data.iter().map(|(k, v)| k.len() + v.len()).sum()
}

fn lines(items: impl Iterator<Item = String>) -> String {
    let mut s = String::new();
    for item in items {
        let _ = writeln!(s, "{item}");
    }
    s
}

fn entries<'a>(
    data: &'a BTreeMap<String, String>,
    key: &str,
) -> impl Iterator<Item = (usize, &'a str)> {
    data.get(key)
        .map(String::as_str)
        .unwrap_or("")
        .lines()
        .enumerate()
        .map(|(n, l)| (n + 1, l.trim()))
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
}

fn split(line: &str) -> (&str, &str) {
    match line.split_once(char::is_whitespace) {
        Some((a, b)) => (a, b.trim()),
        None => (line, ""),
    }
}

fn err(key: &str, line: usize, message: &str) -> ParseError {
    ParseError {
        key: key.to_string(),
        line,
        message: message.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{AccessRule, Alias, ArchiveRule, RelayDomain};
    use crate::placement::place;

    fn spec() -> MailPodSpec {
        let mut spec: MailPodSpec =
            serde_yaml::from_str("domains: [example.com, example.org]").unwrap();
        spec.access_tables.recipient_access.push(AccessRule {
            pattern: "spam@example.com".into(),
            action: AccessAction::Reject,
            message: Some("no such user here".into()),
        });
        spec.access_tables.aliases.push(Alias {
            address: "sales@example.com".into(),
            targets: vec!["a@example.com".into(), "b@example.org".into()],
        });
        spec.access_tables.relay_domains.push(RelayDomain {
            domain: "partner.net".into(),
            next_hop: Some("[mx.partner.net]:25".into()),
            recipients: vec![],
        });
        spec.access_tables.archive_bcc.push(ArchiveRule {
            pattern: "@example.com".into(),
            bcc: "archive@example.org".into(),
            direction: ArchiveDirection::Inbound,
        });
        spec
    }

    #[test]
    fn round_trip_and_hash() {
        let wanted = ["a@example.com", "b@example.org", "c@example.com"]
            .into_iter()
            .map(String::from)
            .collect();
        let placement = place(&[], &wanted, 2);
        let t = AccessTables::build(&spec(), &placement, |i| {
            LunEndpoint::in_cluster(format!("corp-lun-{i}"))
        });
        let data = t.to_data();
        assert_eq!(
            data[keys::MAILBOXES],
            "a@example.com 0\nb@example.org 0\nc@example.com 1\n"
        );
        assert_eq!(
            data[keys::LUNS],
            "0 corp-lun-0 24 143 110\n1 corp-lun-1 24 143 110\n"
        );
        assert_eq!(
            data[keys::RECIPIENT_ACCESS],
            "spam@example.com REJECT no such user here\n"
        );
        assert_eq!(
            data[keys::RECIPIENT_BCC],
            "@example.com archive@example.org\n"
        );
        assert_eq!(data[keys::SENDER_BCC], "");
        let back = AccessTables::from_data(&data).unwrap();
        assert_eq!(back, t);
        assert_eq!(back.hash(), t.hash());
        let mut other = t.clone();
        other.mailboxes.insert("d@example.com".into(), 1);
        assert_ne!(other.hash(), t.hash());
    }

    #[test]
    fn incarnations_round_trip_and_are_absent_without_any() {
        let wanted = ["a@example.com", "b@example.org"]
            .into_iter()
            .map(String::from)
            .collect();
        let mut placement = place(&[], &wanted, 2);
        let endpoint = |i| LunEndpoint::in_cluster(format!("corp-lun-{i}"));
        let plain = AccessTables::build(&spec(), &placement, endpoint);
        assert!(!plain.to_data().contains_key(keys::INCARNATIONS));
        placement[0].incarnations.insert("b@example.org".into(), 3);
        // Only for mailboxes the LUN holds.
        placement[0]
            .incarnations
            .insert("gone@example.org".into(), 1);
        let t = AccessTables::build(&spec(), &placement, endpoint);
        let data = t.to_data();
        assert_eq!(data[keys::INCARNATIONS], "b@example.org 3\n");
        assert_eq!(AccessTables::from_data(&data).unwrap(), t);
        assert_ne!(t.hash(), plain.hash());
        for line in ["b@example.org\n", "b@example.org 0\n", "b@example.org x\n"] {
            let mut bad = data.clone();
            bad.insert(keys::INCARNATIONS.into(), line.into());
            assert_eq!(
                AccessTables::from_data(&bad).unwrap_err().key,
                "incarnations"
            );
        }
    }

    #[test]
    fn quota_overrides_round_trip_and_are_absent_without_any() {
        let wanted = ["a@example.com", "b@example.org"]
            .into_iter()
            .map(String::from)
            .collect();
        let placement = place(&[], &wanted, 2);
        let endpoint = |i| LunEndpoint::in_cluster(format!("corp-lun-{i}"));
        let mut spec = spec();
        let plain = AccessTables::build(&spec, &placement, endpoint);
        assert!(!plain.to_data().contains_key(keys::QUOTAS));
        spec.quota = Some(
            serde_yaml::from_str(
                "storage: 1Gi\noverrides: [{mailbox: a@example.com, storage: 2Ki}, {mailbox: b@example.org, messages: 7}]",
            )
            .unwrap(),
        );
        let t = AccessTables::build(&spec, &placement, endpoint);
        let data = t.to_data();
        assert_eq!(
            data[keys::QUOTAS],
            "a@example.com storage=2048\nb@example.org messages=7\n"
        );
        assert_eq!(AccessTables::from_data(&data).unwrap(), t);
        assert_ne!(t.hash(), plain.hash());
        let mut bad = data.clone();
        bad.insert(keys::QUOTAS.into(), "a@example.com size=3\n".into());
        assert_eq!(AccessTables::from_data(&bad).unwrap_err().key, "quotas");
    }

    #[test]
    fn relay_recipients_round_trip_and_are_absent_without_any() {
        let placement = place(&[], &BTreeSet::new(), 2);
        let endpoint = |i| LunEndpoint::in_cluster(format!("corp-lun-{i}"));
        let mut spec = spec();
        let plain = AccessTables::build(&spec, &placement, endpoint);
        assert!(!plain.to_data().contains_key(keys::RELAY_RECIPIENTS));
        spec.access_tables.relay_domains[0].recipients =
            vec!["zed@partner.net".into(), "amy@partner.net".into()];
        let t = AccessTables::build(&spec, &placement, endpoint);
        let data = t.to_data();
        assert_eq!(
            data[keys::RELAY_RECIPIENTS],
            "amy@partner.net\nzed@partner.net\n"
        );
        assert_eq!(AccessTables::from_data(&data).unwrap(), t);
        assert_ne!(t.hash(), plain.hash());
    }

    #[test]
    fn bad_line_is_named() {
        let mut data = BTreeMap::new();
        data.insert(keys::LUNS.to_string(), "0 host 24 143\n".to_string());
        let e = AccessTables::from_data(&data).unwrap_err();
        assert_eq!(e.key, "luns");
        assert_eq!(e.line, 1);
    }
}
