//! Mail that waited for a store is delivered as soon as the store takes it again.
//!
//! Postfix has one retry schedule per instance: the queue manager's `minimal_backoff_time` and
//! `maximal_backoff_time` apply to every transport, and a per-transport `-o` cannot change them (only
//! qmgr reads them). A schedule short enough for a store paused a few seconds for a snapshot would
//! retry every internet destination as often; the defaults (300 s to 4000 s) leave mail for a resumed
//! store waiting up to minutes. So main.cf keeps Postfix's defaults for the internet, and the agent of
//! each pod with a queue (mx, submission) drives the retries to the stores itself:
//!
//! every [`TICK`], while the deferred queue is not empty, it lists it (`postqueue -j`), takes the
//! messages with a recipient that is a mailbox of this MailPod, probes that mailbox's LUN endpoint
//! (a new LMTP session: the store's gate greets with `220` only while it takes deliveries, `421` while
//! paused or not its LUN's active) and asks Postfix to retry each such message now (`postqueue -i ID`).
//! flush(8) moves the message to the incoming queue and marks it to lift the queue manager's
//! dead-destination throttle for its next hop, so the retry is not answered from that cache. A store
//! that is still refusing is left alone (Postfix's own schedule still applies), and one message is asked
//! for again only after a growing interval ([`repeat_after`]), so a recipient the store keeps
//! deferring (a full mailbox) is not retried in a tight loop.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use super::metrics::count_files;
use super::render;
use crate::mailconfig::tables::AccessTables;

/// How often the deferred queue is looked at.
pub const TICK: Duration = Duration::from_secs(2);
/// Longest wait for a store's greeting.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// Most messages asked for in one pass (the rest follow on the next ticks).
const MAX_PER_PASS: usize = 500;

/// Interval before one message is asked for again after its `n`-th request: 30 s, doubling, at most an hour.
pub fn repeat_after(n: u32) -> Duration {
    Duration::from_secs(30u64.saturating_mul(1 << n.min(7))).min(Duration::from_secs(3600))
}

/// One line of `postqueue -j`.
#[derive(Debug, Deserialize)]
struct QueueEntry {
    queue_name: String,
    queue_id: String,
    #[serde(default)]
    recipients: Vec<QueueRecipient>,
}

#[derive(Debug, Deserialize)]
struct QueueRecipient {
    address: String,
}

/// Deferred messages by LUN index of their recipients (a message with recipients on two LUNs is under both).
pub fn deferred_by_lun(json_lines: &str, tables: &AccessTables) -> BTreeMap<u32, BTreeSet<String>> {
    let mut out: BTreeMap<u32, BTreeSet<String>> = BTreeMap::new();
    for line in json_lines.lines().filter(|l| !l.trim().is_empty()) {
        let Ok(entry) = serde_json::from_str::<QueueEntry>(line) else {
            tracing::debug!(line, "unreadable postqueue -j line");
            continue;
        };
        if entry.queue_name != "deferred" {
            continue;
        }
        for r in &entry.recipients {
            if let Some(lun) = tables.mailboxes.get(&r.address.to_ascii_lowercase()) {
                out.entry(*lun).or_default().insert(entry.queue_id.clone());
            }
        }
    }
    out
}

/// Whether a new LMTP session to `host:port` is greeted with `220` (the store takes deliveries now).
pub async fn store_accepts(host: &str, port: u16) -> bool {
    let probe = async {
        let stream = tokio::net::TcpStream::connect((host, port)).await.ok()?;
        let mut r = BufReader::new(stream);
        let mut greeting = String::new();
        r.read_line(&mut greeting).await.ok()?;
        let ok = greeting.starts_with("220");
        let _ = r.get_mut().write_all(b"QUIT\r\n").await;
        Some(ok)
    };
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT, probe).await,
        Ok(Some(true))
    )
}

/// The flush loop's memory: per queue id, when it was last asked for and how often.
#[derive(Debug, Default)]
pub struct Requested(HashMap<String, (Instant, u32)>);

impl Requested {
    /// Whether `id` may be asked for at `now`.
    pub fn due(&self, id: &str, now: Instant) -> bool {
        self.0
            .get(id)
            .is_none_or(|(at, n)| now.duration_since(*at) >= repeat_after(n.saturating_sub(1)))
    }

    pub fn note(&mut self, id: &str, now: Instant) {
        let e = self.0.entry(id.to_string()).or_insert((now, 0));
        *e = (now, e.1 + 1);
    }

    /// Forgets messages no longer deferred.
    pub fn retain(&mut self, deferred: &BTreeSet<&String>) {
        self.0.retain(|id, _| deferred.contains(id));
    }
}

/// Runs forever: see the module documentation.
pub async fn run(
    postfix_config: PathBuf,
    queue_dir: PathBuf,
    config_dir: PathBuf,
    tables_dir: PathBuf,
) {
    let mut requested = Requested::default();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if count_files(&queue_dir.join("deferred")) == 0 {
            requested = Requested::default();
            continue;
        }
        if let Err(e) = pass(&postfix_config, &config_dir, &tables_dir, &mut requested).await {
            tracing::warn!("retrying mail for the stores: {e:#}");
        }
    }
}

async fn pass(
    postfix_config: &Path,
    config_dir: &Path,
    tables_dir: &Path,
    requested: &mut Requested,
) -> Result<()> {
    let tables = render::read_inputs(config_dir, tables_dir)?.tables;
    let listing = postqueue(postfix_config, &["-j"]).await?;
    let by_lun = deferred_by_lun(&listing, &tables);
    requested.retain(&by_lun.values().flatten().collect());
    let mut asked = 0;
    for (lun, ids) in &by_lun {
        let Some(endpoint) = tables.luns.get(lun) else {
            continue;
        };
        let now = Instant::now();
        let due: Vec<&String> = ids.iter().filter(|id| requested.due(id, now)).collect();
        if due.is_empty() || !store_accepts(&endpoint.host, endpoint.lmtp_port).await {
            continue;
        }
        tracing::info!(lun, host = %endpoint.host, messages = due.len(), "store takes deliveries: retrying the mail that waited for it");
        for id in due {
            if asked == MAX_PER_PASS {
                return Ok(());
            }
            // A message delivered or removed since the listing makes postqueue fail; that is harmless.
            if let Err(e) = postqueue(postfix_config, &["-i", id]).await {
                tracing::debug!(queue_id = %id, "postqueue -i: {e:#}");
            }
            requested.note(id, now);
            asked += 1;
        }
    }
    Ok(())
}

/// `postqueue -c DIR ARGS...`: its output, or why it failed.
pub async fn postqueue(postfix_config: &Path, args: &[&str]) -> Result<String> {
    let out = tokio::process::Command::new("postqueue")
        .arg("-c")
        .arg(postfix_config)
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .context("running postqueue")?;
    if !out.status.success() {
        bail!(
            "postqueue {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deferred_messages_are_grouped_by_the_lun_of_their_mailboxes() {
        let mut t = AccessTables::default();
        t.mailboxes.insert("a@example.com".into(), 0);
        t.mailboxes.insert("b@example.com".into(), 1);
        let listing = concat!(
            r#"{"queue_name": "deferred", "queue_id": "A1", "recipients": [{"address": "A@example.com", "delay_reason": "421 4.3.2 paused"}]}"#,
            "\n",
            r#"{"queue_name": "deferred", "queue_id": "B2", "recipients": [{"address": "x@remote.test"}, {"address": "b@example.com"}, {"address": "a@example.com"}]}"#,
            "\n",
            r#"{"queue_name": "deferred", "queue_id": "C3", "recipients": [{"address": "x@remote.test"}]}"#,
            "\n",
            r#"{"queue_name": "active", "queue_id": "D4", "recipients": [{"address": "a@example.com"}]}"#,
            "\nnot json\n",
        );
        let got = deferred_by_lun(listing, &t);
        assert_eq!(
            got,
            BTreeMap::from([
                (0, BTreeSet::from(["A1".to_string(), "B2".to_string()])),
                (1, BTreeSet::from(["B2".to_string()])),
            ])
        );
    }

    #[test]
    fn a_message_is_asked_for_again_only_after_a_growing_interval() {
        let mut r = Requested::default();
        let t0 = Instant::now();
        assert!(r.due("Q", t0));
        r.note("Q", t0);
        assert!(!r.due("Q", t0 + Duration::from_secs(29)));
        assert!(r.due("Q", t0 + Duration::from_secs(30)));
        r.note("Q", t0 + Duration::from_secs(30));
        assert!(!r.due("Q", t0 + Duration::from_secs(89)));
        assert!(r.due("Q", t0 + Duration::from_secs(90)));
        assert_eq!(repeat_after(20), Duration::from_secs(3600));
        let keep = String::from("other");
        r.retain(&BTreeSet::from([&keep]));
        assert!(r.due("Q", t0), "a message no longer deferred is forgotten");
    }
}
