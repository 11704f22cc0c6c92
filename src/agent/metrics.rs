//! Prometheus metrics of a mail pod: queue sizes and the age of each queue's oldest message, deliveries by
//! outcome and delivery latency parsed from the Postfix maillog, the access-tables hash in use, the TLS
//! certificate's expiry, child restarts and the store's pause state.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Postfix queues counted for `mailpod_queue_messages`.
pub const QUEUES: [&str; 5] = ["maildrop", "incoming", "active", "deferred", "hold"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabel {
    pub queue: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HashLabel {
    pub hash: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabel {
    pub service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FileLabel {
    pub file: String,
}

pub struct Metrics {
    registry: Registry,
    queue: Family<QueueLabel, Gauge>,
    oldest_age: Family<QueueLabel, Gauge<f64, AtomicU64>>,
    /// Oldest arrival (Unix seconds) per queue, as agent::queue_age last listed it.
    oldest_arrivals: Mutex<BTreeMap<String, f64>>,
    deliveries: Family<StatusLabel, Counter>,
    delivery_seconds: Histogram,
    tables: Family<HashLabel, Gauge>,
    current_hash: Mutex<String>,
    pub config_applies: Counter,
    /// Attempts to apply a mounted configuration that failed (each is retried; see agent::apply).
    pub config_apply_failures: Counter,
    /// 1 while the mounted configuration is not the one applied.
    pub config_pending: Gauge,
    pub restarts: Family<ServiceLabel, Counter>,
    pub lmtp_paused: Gauge,
    /// Stores only.
    pub replication: Option<ReplicationMetrics>,
    queue_dir: Option<PathBuf>,
    certificate_expiry: Family<FileLabel, Gauge<f64, AtomicU64>>,
    certificate_file: Option<PathBuf>,
}

/// A store replica's replication from its LUN's active (see agent::replication).
#[derive(Clone, Default)]
pub struct ReplicationMetrics {
    /// Seconds the standby may be behind: now minus the start of the last successful pass.
    pub lag_seconds: Gauge<f64, AtomicU64>,
    /// Start time (Unix seconds) of the last pass that completed for every mailbox.
    pub last_success: Gauge<f64, AtomicU64>,
    pub failures: Counter,
    pub passes: Counter,
    /// 1 when a standby holds the active's mail within the allowed lag (always 1 on the active).
    pub in_sync: Gauge,
    /// 1 while this replica is the LUN's active.
    pub active: Gauge,
    /// 1 while the last pass was refused for deleting too much (see agent::replication_guard).
    pub deletion_refused: Gauge,
    /// Messages the refused pass would have deleted here.
    pub refused_deletion_messages: Gauge,
    pub refused_passes: Counter,
}

impl Metrics {
    /// `queue_dir`: the Postfix queue to count (roles that run Postfix); `replication`: stores.
    pub fn new(queue_dir: Option<PathBuf>, replication: bool) -> Self {
        let mut registry = Registry::with_prefix("mailpod");
        let queue = Family::<QueueLabel, Gauge>::default();
        let oldest_age = Family::<QueueLabel, Gauge<f64, AtomicU64>>::default();
        let certificate_expiry = Family::<FileLabel, Gauge<f64, AtomicU64>>::default();
        let deliveries = Family::<StatusLabel, Counter>::default();
        // 10 ms .. ~82 s: from loopback LMTP to a long retry.
        let delivery_seconds = Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.01, 2.0, 14),
        );
        let tables = Family::<HashLabel, Gauge>::default();
        let config_applies = Counter::default();
        let config_apply_failures = Counter::default();
        let config_pending = Gauge::default();
        let restarts = Family::<ServiceLabel, Counter>::default();
        let lmtp_paused = Gauge::default();
        registry.register(
            "queue_messages",
            "Messages in each Postfix queue",
            queue.clone(),
        );
        registry.register(
            "queue_oldest_message_age_seconds",
            "Age of the oldest message in each Postfix queue (0 when it is empty), from its arrival time",
            oldest_age.clone(),
        );
        registry.register(
            "tls_certificate_expiry_timestamp_seconds",
            "When the mounted TLS certificate expires (notAfter, Unix time); absent without a certificate",
            certificate_expiry.clone(),
        );
        registry.register(
            "deliveries",
            "Delivery attempts by outcome (sent, deferred, bounced), from the Postfix maillog",
            deliveries.clone(),
        );
        registry.register(
            "delivery_seconds",
            "Time from Postfix accepting a message to its delivery (maillog delay=)",
            delivery_seconds.clone(),
        );
        registry.register(
            "access_tables_info",
            "Hash of the access tables in use (value 1)",
            tables.clone(),
        );
        registry.register(
            "config_applies",
            "Configuration changes applied without restart",
            config_applies.clone(),
        );
        registry.register(
            "config_apply_failures",
            "Attempts to apply a mounted configuration that failed (retried with backoff)",
            config_apply_failures.clone(),
        );
        registry.register(
            "config_pending",
            "1 while the mounted configuration is not yet applied",
            config_pending.clone(),
        );
        registry.register(
            "child_restarts",
            "Restarts of a supervised mail daemon",
            restarts.clone(),
        );
        registry.register(
            "lmtp_paused",
            "1 while store delivery is paused for a snapshot",
            lmtp_paused.clone(),
        );
        let replication = replication.then(|| {
            let r = ReplicationMetrics::default();
            registry.register(
                "replication_lag_seconds",
                "How far this standby may be behind its LUN's active: now minus the start of the last successful pass",
                r.lag_seconds.clone(),
            );
            registry.register(
                "replication_last_success_timestamp_seconds",
                "Start (Unix time) of the last replication pass that completed for every mailbox",
                r.last_success.clone(),
            );
            registry.register(
                "replication_failures",
                "Replication passes that failed",
                r.failures.clone(),
            );
            registry.register(
                "replication_passes",
                "Replication passes that completed",
                r.passes.clone(),
            );
            registry.register(
                "replication_in_sync",
                "1 when this replica holds its LUN's mail within the allowed lag (always 1 on the active)",
                r.in_sync.clone(),
            );
            registry.register(
                "replication_active",
                "1 while this replica is its LUN's active",
                r.active.clone(),
            );
            registry.register(
                "replication_deletion_refused",
                "1 while this standby refuses a replication pass that would delete more than maxDeletionPercent of its mail, waiting for a person's confirmation",
                r.deletion_refused.clone(),
            );
            registry.register(
                "replication_refused_deletion_messages",
                "Messages the refused replication pass would have deleted on this standby",
                r.refused_deletion_messages.clone(),
            );
            registry.register(
                "replication_refused_passes",
                "Replication passes refused for deleting too much",
                r.refused_passes.clone(),
            );
            r
        });
        Self {
            replication,
            registry,
            queue,
            oldest_age,
            oldest_arrivals: Mutex::new(BTreeMap::new()),
            deliveries,
            delivery_seconds,
            tables,
            current_hash: Mutex::new(String::new()),
            config_applies,
            config_apply_failures,
            config_pending,
            restarts,
            lmtp_paused,
            queue_dir,
            certificate_expiry,
            certificate_file: None,
        }
    }

    /// Reports the expiry of the certificate in `file` (PEM), read at each scrape: a renewed Secret is
    /// seen at once, and a pod without a certificate reports none.
    pub fn watch_certificate(&mut self, file: PathBuf) {
        self.certificate_file = Some(file);
    }

    /// The oldest arrival per queue name (see agent::queue_age).
    pub fn set_oldest_arrivals(&self, arrivals: BTreeMap<String, f64>) {
        *self.oldest_arrivals.lock().expect("metrics lock") = arrivals;
    }

    /// Registers a store's mailbox quota series, which the quota poller keeps current (agent::quota).
    pub fn register_quota(&mut self) -> super::quota::QuotaMetrics {
        let q = super::quota::QuotaMetrics::default();
        q.register(&mut self.registry);
        q
    }

    pub fn set_tables_hash(&self, hash: &str) {
        let mut current = self.current_hash.lock().expect("metrics lock");
        if *current != hash {
            self.tables.remove(&HashLabel {
                hash: current.clone(),
            });
            self.tables
                .get_or_create(&HashLabel {
                    hash: hash.to_string(),
                })
                .set(1);
            *current = hash.to_string();
        }
    }

    pub fn tables_hash(&self) -> String {
        self.current_hash.lock().expect("metrics lock").clone()
    }

    /// Counts one maillog line if it reports a delivery outcome.
    pub fn observe_maillog_line(&self, line: &str) {
        if let Some(d) = parse_delivery(line) {
            self.deliveries
                .get_or_create(&StatusLabel {
                    status: d.status.to_string(),
                })
                .inc();
            if d.status == "sent" {
                self.delivery_seconds.observe(d.delay);
            }
        }
    }

    /// Prometheus text exposition, with queue sizes counted, ages and the certificate read now.
    pub fn encode(&self) -> String {
        if let Some(dir) = &self.queue_dir {
            let now = unix_now();
            let arrivals = self.oldest_arrivals.lock().expect("metrics lock").clone();
            for q in QUEUES {
                let n = count_files(&dir.join(q));
                let label = QueueLabel {
                    queue: q.to_string(),
                };
                self.queue.get_or_create(&label).set(n as i64);
                // An emptied queue reads 0 at once, not at the next listing.
                let age = match arrivals.get(q) {
                    Some(t) if n > 0 => (now - t).max(0.0),
                    _ => 0.0,
                };
                self.oldest_age.get_or_create(&label).set(age);
            }
        }
        if let Some(file) = &self.certificate_file {
            self.certificate_expiry.clear();
            match certificate_not_after(file) {
                Ok(Some(t)) => {
                    self.certificate_expiry
                        .get_or_create(&FileLabel {
                            file: file.display().to_string(),
                        })
                        .set(t);
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(file = %file.display(), "reading the TLS certificate: {e}")
                }
            }
        }
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("encoding metrics into a String");
        out
    }
}

/// A delivery outcome from a Postfix delivery agent's log line.
#[derive(Debug, PartialEq)]
pub struct Delivery<'a> {
    pub status: &'a str,
    pub delay: f64,
}

/// Parses `... postfix/lmtp[9]: 4Q: to=<a@b>, relay=..., delay=0.05, delays=..., dsn=2.0.0, status=sent (...)`.
pub fn parse_delivery(line: &str) -> Option<Delivery<'_>> {
    if !line.contains(" to=<") {
        return None;
    }
    let field = |name: &str| {
        let start = line.find(name)? + name.len();
        let rest = &line[start..];
        Some(&rest[..rest.find([',', ' ']).unwrap_or(rest.len())])
    };
    let status = field(", status=")?;
    if !matches!(status, "sent" | "deferred" | "bounced") {
        return None;
    }
    let delay = field(", delay=")
        .and_then(|d| d.parse().ok())
        .unwrap_or(0.0);
    Some(Delivery { status, delay })
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The notAfter (Unix seconds) of the first certificate in a PEM file; `None` when there is no file.
pub fn certificate_not_after(file: &Path) -> Result<Option<f64>, String> {
    let pem = match std::fs::read(file) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).map_err(|e| format!("not PEM: {e}"))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    Ok(Some(cert.validity().not_after.timestamp() as f64))
}

/// Regular files under `dir`, recursively (Postfix hashes queue files into subdirectories).
pub fn count_files(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => count_files(&e.path()),
            Ok(t) if t.is_file() => 1,
            _ => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_delivery_lines() {
        let sent = "Jan  1 00:00:00 h postfix/lmtp[9]: 4Q: to=<a@example.com>, relay=s[1.2.3.4]:24, delay=0.05, delays=0.01/0/0/0.04, dsn=2.0.0, status=sent (250 2.0.0 <a@example.com> Saved)";
        assert_eq!(
            parse_delivery(sent),
            Some(Delivery {
                status: "sent",
                delay: 0.05
            })
        );
        let deferred = "x postfix/lmtp[9]: 4Q: to=<a@example.com>, relay=none, delay=31, delays=31/0/0/0, dsn=4.4.1, status=deferred (connect refused)";
        assert_eq!(parse_delivery(deferred).unwrap().status, "deferred");
        assert_eq!(
            parse_delivery("x postfix/qmgr[1]: 4Q: from=<a@b>, size=3, nrcpt=1 (queue active)"),
            None
        );
    }

    #[test]
    fn exposition_has_queue_deliveries_and_hash() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("deferred/A")).unwrap();
        std::fs::write(dir.path().join("deferred/A/ABC"), "").unwrap();
        std::fs::write(dir.path().join("deferred/A/ABD"), "").unwrap();
        let m = Metrics::new(Some(dir.path().to_path_buf()), false);
        m.set_tables_hash("aaaa");
        m.set_tables_hash("bbbb");
        m.observe_maillog_line("p postfix/lmtp[1]: Q: to=<a@b>, relay=r, delay=0.2, delays=0, dsn=2.0.0, status=sent (ok)");
        let text = m.encode();
        assert!(
            text.contains("mailpod_queue_messages{queue=\"deferred\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("mailpod_queue_messages{queue=\"active\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("mailpod_deliveries_total{status=\"sent\"} 1"),
            "{text}"
        );
        assert!(text.contains("mailpod_delivery_seconds_count 1"), "{text}");
        assert!(
            text.contains("mailpod_access_tables_info{hash=\"bbbb\"} 1"),
            "{text}"
        );
        assert!(!text.contains("aaaa"), "{text}");
    }

    #[test]
    fn oldest_message_age_reads_zero_once_its_queue_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("deferred/A")).unwrap();
        std::fs::write(dir.path().join("deferred/A/ABC"), "").unwrap();
        let m = Metrics::new(Some(dir.path().to_path_buf()), false);
        let arrived = unix_now() - 600.0;
        m.set_oldest_arrivals(BTreeMap::from([
            ("deferred".to_string(), arrived),
            ("active".to_string(), arrived),
        ]));
        let text = m.encode();
        let age = |q: &str| -> f64 {
            let series = format!("mailpod_queue_oldest_message_age_seconds{{queue=\"{q}\"}} ");
            let line = text.lines().find(|l| l.starts_with(&series)).unwrap();
            line[series.len()..].parse().unwrap()
        };
        assert!((600.0..610.0).contains(&age("deferred")), "{text}");
        // Listed as holding mail, but its directory is empty now: delivered since.
        assert_eq!(age("active"), 0.0, "{text}");
    }

    #[test]
    fn certificate_expiry_is_read_from_the_mounted_file() {
        let dir = tempfile::tempdir().unwrap();
        let crt = dir.path().join("tls.crt");
        let mut m = Metrics::new(None, false);
        m.watch_certificate(crt.clone());
        assert!(
            !m.encode()
                .contains("mailpod_tls_certificate_expiry_timestamp_seconds{"),
            "no certificate, no series"
        );
        let out = std::process::Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "10",
            ])
            .args(["-subj", "/CN=mail.example.com", "-keyout"])
            .arg(dir.path().join("tls.key"))
            .arg("-out")
            .arg(&crt)
            .output()
            .expect("openssl (tests/packages.txt)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = m.encode();
        let series = format!(
            "mailpod_tls_certificate_expiry_timestamp_seconds{{file=\"{}\"}} ",
            crt.display()
        );
        let line = text.lines().find(|l| l.starts_with(&series)).expect(&text);
        let not_after: f64 = line[series.len()..].parse().unwrap();
        let in_ten_days = unix_now() + 10.0 * 86400.0;
        assert!((not_after - in_ten_days).abs() < 120.0, "{line}");
    }
}
