//! What the alerts read of a StorageLUN's snapshots and promotions, from its spec and status (exported
//! as the operator's `storagelun_*` metrics, see src/metrics.rs).

use croner::parser::{CronParser, Seconds, Year};
use jiff::civil::DateTime;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::crd::{StorageLUNSpec, StorageLUNStatus};

/// Consecutive runs of a schedule looked at for its longest gap: enough for any hourly to monthly cadence.
const RUNS_LOOKED_AT: usize = 32;

/// A LUN's snapshot and promotion record as Unix seconds; `None` where there is nothing to report.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LunHealth {
    /// Longest time between two runs of the snapshot schedule (snapshots enabled only).
    pub snapshot_interval_seconds: Option<f64>,
    /// When the newest snapshot the LUN keeps was taken.
    pub last_snapshot_timestamp: Option<f64>,
    /// Whether the last snapshot job failed (unset before the first run).
    pub last_snapshot_failed: Option<bool>,
    /// When a standby was last promoted to active.
    pub last_promotion_timestamp: Option<f64>,
}

fn unix(t: &Time) -> Option<f64> {
    Some(t.0.as_millisecond() as f64 / 1000.0)
}

/// The longest gap between consecutive runs of a cron schedule, in seconds. Runs are taken in UTC, as
/// the snapshot CronJob sets no time zone; `None` for a schedule that does not parse.
pub fn schedule_interval_seconds(schedule: &str) -> Option<f64> {
    let cron = CronParser::builder()
        .seconds(Seconds::Disallowed)
        .year(Year::Disallowed)
        .build()
        .parse(schedule.trim())
        .ok()?;
    // A fixed start, so the figure does not move with the clock (a month's length, a leap day).
    let start = DateTime::constant(2025, 1, 1, 0, 0, 0, 0);
    let runs: Vec<DateTime> = cron.iter_after(start).take(RUNS_LOOKED_AT).collect();
    runs.windows(2)
        .map(|w| w[0].duration_until(w[1]).as_secs_f64())
        .reduce(f64::max)
}

/// `status`: the LUN's status as stored (the snapshot job writes its part); `promotion_status`: the one the
/// controller just computed, whose `lastPromotion` may be newer.
pub fn of(
    spec: &StorageLUNSpec,
    status: Option<&StorageLUNStatus>,
    promotion_status: &StorageLUNStatus,
) -> LunHealth {
    let enabled = spec.snapshots.enabled;
    let last_snapshot_timestamp = status.filter(|_| enabled).and_then(|s| {
        let kept = s.snapshots.iter().filter_map(|r| unix(&r.created_at));
        let succeeded = s
            .last_snapshot
            .as_ref()
            .filter(|r| r.result == "Succeeded")
            .and_then(|r| unix(&r.time));
        kept.chain(succeeded).reduce(f64::max)
    });
    LunHealth {
        snapshot_interval_seconds: enabled
            .then(|| schedule_interval_seconds(&spec.snapshots.schedule))
            .flatten(),
        last_snapshot_timestamp,
        last_snapshot_failed: status
            .filter(|_| enabled)
            .and_then(|s| s.last_snapshot.as_ref())
            .map(|r| r.result == "Failed"),
        last_promotion_timestamp: promotion_status
            .last_promotion
            .as_ref()
            .and_then(|p| unix(&p.promoted_at)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{Promotion, SnapshotRecord, SnapshotResult};

    #[test]
    fn schedule_intervals() {
        assert_eq!(schedule_interval_seconds("0 */8 * * *"), Some(8.0 * 3600.0));
        assert_eq!(schedule_interval_seconds("@hourly"), Some(3600.0));
        // Uneven: the longest gap counts (22 h from 02:00 to 00:00 the next day).
        assert_eq!(
            schedule_interval_seconds("0 0,2 * * *"),
            Some(22.0 * 3600.0)
        );
        assert_eq!(schedule_interval_seconds("@weekly"), Some(7.0 * 86400.0));
        assert_eq!(schedule_interval_seconds("not a schedule"), None);
    }

    fn spec() -> StorageLUNSpec {
        serde_json::from_value(
            serde_json::json!({"mailPod": "corp", "index": 0, "capacity": "1Gi"}),
        )
        .unwrap()
    }

    fn at(t: &str) -> Time {
        Time(t.parse().unwrap())
    }

    #[test]
    fn newest_snapshot_failure_and_promotion() {
        let stored = StorageLUNStatus {
            snapshots: vec![
                SnapshotRecord {
                    name: "b".into(),
                    created_at: at("2026-01-01T08:00:00Z"),
                    ready_to_use: true,
                },
                SnapshotRecord {
                    name: "a".into(),
                    created_at: at("2026-01-01T00:00:00Z"),
                    ready_to_use: true,
                },
            ],
            last_snapshot: Some(SnapshotResult {
                name: None,
                time: at("2026-01-01T16:00:00Z"),
                result: "Failed".into(),
                message: None,
                pause_millis: None,
            }),
            ..Default::default()
        };
        let computed = StorageLUNStatus {
            last_promotion: Some(Promotion {
                from: "corp-lun-0-0".into(),
                to: "corp-lun-0-1".into(),
                lost_at: at("2026-01-01T23:59:30Z"),
                promoted_at: at("2026-01-02T00:00:00Z"),
                seconds: 30.0,
            }),
            ..Default::default()
        };
        let h = of(&spec(), Some(&stored), &computed);
        assert_eq!(h.snapshot_interval_seconds, Some(28800.0));
        assert_eq!(h.last_snapshot_timestamp, unix(&at("2026-01-01T08:00:00Z")));
        assert_eq!(h.last_snapshot_failed, Some(true));
        assert_eq!(
            h.last_promotion_timestamp,
            unix(&at("2026-01-02T00:00:00Z"))
        );

        let mut off = spec();
        off.snapshots.enabled = false;
        let h = of(&off, Some(&stored), &StorageLUNStatus::default());
        assert_eq!(
            h,
            LunHealth::default(),
            "nothing to alert on without snapshots"
        );
    }
}
