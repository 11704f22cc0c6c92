//! Mailbox quota usage on a store, for /metrics: `doveadm quota get -A` on a timer.
//!
//! Bounded on every side: one doveadm at a time with a timeout (killed when it passes), at most
//! [`MAX_MAILBOXES`] mailboxes reported (a LUN holds at most `maxUsersPerLun`, itself at most that), and
//! series of mailboxes gone from the store removed at the next poll. Nothing is polled while the settings
//! say no quota is set.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::crd::MAX_USERS_PER_LUN;
use crate::mailconfig::settings::{MailSettings, SETTINGS_KEY};

/// Most mailboxes whose usage is reported.
pub const MAX_MAILBOXES: usize = MAX_USERS_PER_LUN as usize;
/// Longest one `doveadm quota get -A` may run.
pub const POLL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MailboxLabel {
    pub mailbox: String,
}

/// The quota gauges of one store.
#[derive(Clone, Default)]
pub struct QuotaMetrics {
    pub storage_bytes: Family<MailboxLabel, Gauge>,
    pub storage_limit_bytes: Family<MailboxLabel, Gauge>,
    pub messages: Family<MailboxLabel, Gauge>,
    pub messages_limit: Family<MailboxLabel, Gauge>,
    /// Mailboxes at or over a limit (storage or messages).
    pub mailboxes_full: Gauge,
    pub poll_failures: Counter,
}

impl QuotaMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "quota_storage_bytes",
            "Storage a mailbox uses, as its quota counts it (doveadm quota get)",
            self.storage_bytes.clone(),
        );
        registry.register(
            "quota_storage_limit_bytes",
            "A mailbox's storage limit (absent without one)",
            self.storage_limit_bytes.clone(),
        );
        registry.register(
            "quota_messages",
            "Messages in a mailbox, as its quota counts them",
            self.messages.clone(),
        );
        registry.register(
            "quota_messages_limit",
            "A mailbox's message limit (absent without one)",
            self.messages_limit.clone(),
        );
        registry.register(
            "quota_mailboxes_full",
            "Mailboxes at or over a quota limit",
            self.mailboxes_full.clone(),
        );
        registry.register(
            "quota_poll_failures",
            "Quota polls (doveadm quota get -A) that failed or timed out",
            self.poll_failures.clone(),
        );
    }

    /// Replaces every series with `usage`.
    pub fn set(&self, usage: &BTreeMap<String, Usage>) {
        for f in [
            &self.storage_bytes,
            &self.storage_limit_bytes,
            &self.messages,
            &self.messages_limit,
        ] {
            f.clear();
        }
        let mut full = 0;
        for (mailbox, u) in usage {
            let l = MailboxLabel {
                mailbox: mailbox.clone(),
            };
            let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            self.storage_bytes
                .get_or_create(&l)
                .set(gauge(u.storage_bytes));
            self.messages.get_or_create(&l).set(gauge(u.messages));
            if let Some(b) = u.storage_limit_bytes {
                self.storage_limit_bytes.get_or_create(&l).set(gauge(b));
            }
            if let Some(n) = u.messages_limit {
                self.messages_limit.get_or_create(&l).set(gauge(n));
            }
            if u.full() {
                full += 1;
            }
        }
        self.mailboxes_full.set(full);
    }
}

/// One mailbox's usage and limits.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub storage_bytes: u64,
    pub storage_limit_bytes: Option<u64>,
    pub messages: u64,
    pub messages_limit: Option<u64>,
}

impl Usage {
    pub fn full(&self) -> bool {
        self.storage_limit_bytes
            .is_some_and(|l| self.storage_bytes >= l)
            || self.messages_limit.is_some_and(|l| self.messages >= l)
    }
}

/// Parses `doveadm -f tab quota get -A`: a header, then `user, quota name, type, value, limit, %` per
/// line, STORAGE in KiB and MESSAGE in messages, `-` for no limit. At most [`MAX_MAILBOXES`] mailboxes.
pub fn parse_quota_get(text: &str) -> Result<BTreeMap<String, Usage>> {
    let mut lines = text.lines();
    match lines.next() {
        Some(h) if h.starts_with("Username\t") => {}
        other => bail!("doveadm quota get: unexpected header {other:?}"),
    }
    let mut usage: BTreeMap<String, Usage> = BTreeMap::new();
    for line in lines {
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() < 5 {
            bail!("doveadm quota get: unexpected line {line:?}");
        }
        if !usage.contains_key(f[0]) && usage.len() >= MAX_MAILBOXES {
            continue;
        }
        let value: u64 = f[3]
            .parse()
            .with_context(|| format!("doveadm quota get: value in {line:?}"))?;
        let limit = match f[4] {
            "-" => None,
            l => Some(
                l.parse::<u64>()
                    .with_context(|| format!("doveadm quota get: limit in {line:?}"))?,
            ),
        };
        let u = usage.entry(f[0].to_string()).or_default();
        match f[2] {
            "STORAGE" => {
                u.storage_bytes = value.saturating_mul(1024);
                u.storage_limit_bytes = limit.map(|l| l.saturating_mul(1024));
            }
            "MESSAGE" => {
                u.messages = value;
                u.messages_limit = limit;
            }
            _ => {}
        }
    }
    Ok(usage)
}

/// Where the poller finds Dovecot's configuration and the mounted settings.
pub struct QuotaPoller {
    pub dovecot_conf: PathBuf,
    pub config_dir: PathBuf,
    pub interval: Duration,
    pub metrics: QuotaMetrics,
}

impl QuotaPoller {
    /// Polls forever, every `interval` (the first after one interval, once Dovecot has started).
    pub async fn run(self) {
        let mut tick = tokio::time::interval(self.interval.max(Duration::from_secs(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            if let Err(e) = self.poll().await {
                self.metrics.poll_failures.inc();
                tracing::warn!(error = %format!("{e:#}"), "quota poll failed");
            }
        }
    }

    async fn poll(&self) -> Result<()> {
        let path = self.config_dir.join(SETTINGS_KEY);
        let text = tokio::fs::read_to_string(&path)
            .await
            .with_context(|| format!("reading {}", path.display()))?;
        let settings = MailSettings::from_yaml(&text)
            .with_context(|| format!("parsing {}", path.display()))?;
        if settings.features.quota.is_none() {
            self.metrics.set(&BTreeMap::new());
            return Ok(());
        }
        let child = tokio::process::Command::new("doveadm")
            .arg("-c")
            .arg(&self.dovecot_conf)
            .args(["-f", "tab", "quota", "get", "-A"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting doveadm quota get")?;
        let out = tokio::time::timeout(POLL_TIMEOUT, child.wait_with_output())
            .await
            .with_context(|| format!("doveadm quota get ran longer than {POLL_TIMEOUT:?}"))?
            .context("waiting for doveadm quota get")?;
        if !out.status.success() {
            bail!(
                "doveadm quota get exited with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let usage = parse_quota_get(&String::from_utf8_lossy(&out.stdout))?;
        self.metrics.set(&usage);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUTPUT: &str = "Username\tQuota name\tType\tValue\tLimit\t%\n\
        a@example.com\tUser quota\tSTORAGE\t3\t2\t150\n\
        a@example.com\tUser quota\tMESSAGE\t2\t-\t0\n\
        b@example.com\tUser quota\tSTORAGE\t0\t-\t0\n\
        b@example.com\tUser quota\tMESSAGE\t1\t10\t10\n";

    #[test]
    fn parses_usage_in_bytes_and_limits() {
        let u = parse_quota_get(OUTPUT).unwrap();
        assert_eq!(
            u["a@example.com"],
            Usage {
                storage_bytes: 3072,
                storage_limit_bytes: Some(2048),
                messages: 2,
                messages_limit: None,
            }
        );
        assert!(u["a@example.com"].full());
        assert!(!u["b@example.com"].full());
        assert_eq!(u["b@example.com"].messages_limit, Some(10));
        assert!(parse_quota_get("Error: quota plugin not loaded\n").is_err());
        assert!(parse_quota_get(
            "Username\tQuota name\tType\tValue\tLimit\t%\nx\tq\tSTORAGE\tten\t-\t0\n"
        )
        .is_err());
    }

    #[test]
    fn series_follow_the_last_poll() {
        let mut registry = Registry::with_prefix("mailpod");
        let m = QuotaMetrics::default();
        m.register(&mut registry);
        m.set(&parse_quota_get(OUTPUT).unwrap());
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for want in [
            "mailpod_quota_storage_bytes{mailbox=\"a@example.com\"} 3072",
            "mailpod_quota_storage_limit_bytes{mailbox=\"a@example.com\"} 2048",
            "mailpod_quota_messages_limit{mailbox=\"b@example.com\"} 10",
            "mailpod_quota_mailboxes_full 1",
        ] {
            assert!(text.contains(want), "{want} not in\n{text}");
        }
        assert!(!text.contains("mailpod_quota_storage_limit_bytes{mailbox=\"b@example.com\"}"));
        m.set(&BTreeMap::new());
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(!text.contains("a@example.com"), "{text}");
        assert!(text.contains("mailpod_quota_mailboxes_full 0"), "{text}");
    }
}
