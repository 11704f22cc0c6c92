//! The age of the oldest message in each Postfix queue, for `mailpod_queue_oldest_message_age_seconds`.
//!
//! A queue file's modification time is not its arrival: the queue manager sets a deferred file's mtime to
//! its next retry. The arrival time is what `postqueue -j` reports (`arrival_time`), so the agent lists
//! the queue with it every [`INTERVAL`] while any queue holds mail, and the exposition turns the oldest
//! arrival into an age at scrape time (see [`super::metrics::Metrics::encode`]).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::http::AgentState;
use super::metrics::{count_files, QUEUES};
use super::store_flush::postqueue;

/// How often the queue is listed while it is not empty: well below the alerts' thresholds (minutes).
pub const INTERVAL: Duration = Duration::from_secs(10);

/// One line of `postqueue -j`, the fields used here.
#[derive(Debug, Deserialize)]
struct Listed {
    queue_name: String,
    arrival_time: f64,
}

/// The oldest arrival (Unix seconds) per queue name in `postqueue -j` output; unreadable lines are skipped.
pub fn oldest_arrivals(json_lines: &str) -> BTreeMap<String, f64> {
    let mut out: BTreeMap<String, f64> = BTreeMap::new();
    for line in json_lines.lines().filter(|l| !l.trim().is_empty()) {
        let Ok(m) = serde_json::from_str::<Listed>(line) else {
            tracing::debug!(line, "unreadable postqueue -j line");
            continue;
        };
        let oldest = out.entry(m.queue_name).or_insert(m.arrival_time);
        *oldest = oldest.min(m.arrival_time);
    }
    out
}

/// Keeps the metrics' oldest arrivals current; runs for the agent's lifetime.
pub async fn run(postfix_config: PathBuf, queue_dir: PathBuf, state: Arc<AgentState>) {
    let metrics = &state.metrics;
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let queued: usize = QUEUES.iter().map(|q| count_files(&queue_dir.join(q))).sum();
        if queued == 0 {
            metrics.set_oldest_arrivals(BTreeMap::new());
            continue;
        }
        let listing = tokio::time::timeout(INTERVAL, postqueue(&postfix_config, &["-j"])).await;
        match listing {
            Ok(Ok(text)) => metrics.set_oldest_arrivals(oldest_arrivals(&text)),
            // The last figures stay: their ages keep growing, which is what a stuck queue does.
            Ok(Err(e)) => tracing::debug!("listing the queue for its oldest message: {e:#}"),
            Err(_) => tracing::debug!("postqueue -j took longer than {INTERVAL:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oldest_arrival_per_queue() {
        let listing = concat!(
            r#"{"queue_name": "deferred", "queue_id": "A1", "arrival_time": 1700000100, "message_size": 3, "recipients": []}"#,
            "\n",
            r#"{"queue_name": "deferred", "queue_id": "A2", "arrival_time": 1700000050, "message_size": 3, "recipients": []}"#,
            "\n",
            r#"{"queue_name": "active", "queue_id": "B1", "arrival_time": 1700000200, "message_size": 3, "recipients": []}"#,
            "\nnot json\n"
        );
        let got = oldest_arrivals(listing);
        assert_eq!(got.get("deferred"), Some(&1700000050.0));
        assert_eq!(got.get("active"), Some(&1700000200.0));
        assert_eq!(got.len(), 2);
    }
}
