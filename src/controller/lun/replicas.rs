//! Store pods as the failover decision sees them: readiness, role label, and the replication state their
//! agents report.

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;

use std::collections::BTreeMap;

use super::failover::{PromotionMark, Replica, Role};
use super::reports::ReplicationReport;
use crate::names::{annotations as a, labels as l};

/// A standby up to this many sync intervals behind is in its normal range (the floor of [`lag_bucket`]).
pub const STALE_INTERVALS: f64 = 3.0;

/// Replication lag as status reports it: an upper bound in coarse steps, so that a lag moving between
/// sync passes (a standby's lag is the time since its last pass) writes no status. 0 stays 0 (fully
/// synced); up to `floor` (for `doveadm sync`, three sync intervals: the normal range of a standby that
/// keeps up) reads as `floor`; above it, the next of 30 s, 1, 5 and 15 minutes, 1 and 4 hours, then whole
/// days. Being an upper bound, it never makes a lag look within an RPO target that it is not. The exact
/// figures are metrics.
pub fn lag_bucket(lag: f64, floor: f64) -> f64 {
    const STEPS: [f64; 6] = [30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0];
    const DAY: f64 = 86400.0;
    if lag <= 0.0 {
        return 0.0;
    }
    if lag <= floor {
        return floor;
    }
    STEPS
        .into_iter()
        .find(|s| lag <= *s)
        .unwrap_or_else(|| (lag / DAY).ceil() * DAY)
}

/// The ordinal of `pod` in the LUN's StatefulSet (`corp-lun-0-2` -> 2).
pub fn ordinal(lun: &str, pod: &str) -> Option<i32> {
    pod.strip_prefix(lun)?.strip_prefix('-')?.parse().ok()
}

/// Replicas of `lun` observed from its pods, sorted by ordinal. Pods being deleted are left out: they no
/// longer serve, and a successor with the same name will be observed instead.
pub fn observe(
    lun: &str,
    pods: &[Pod],
    reports: &BTreeMap<String, ReplicationReport>,
) -> Vec<Replica> {
    let mut out: Vec<Replica> = pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| replica(lun, p, reports.get(&p.name_any())))
        .collect();
    out.sort_by_key(|r| r.ordinal);
    out
}

fn replica(lun: &str, pod: &Pod, report: Option<&ReplicationReport>) -> Option<Replica> {
    let name = pod.name_any();
    let ordinal = ordinal(lun, &name)?;
    let ready_condition = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"));
    let ready = ready_condition.is_some_and(|c| c.status == "True");
    let ann = pod.annotations();
    let time = |key: &str| ann.get(key).and_then(|v| v.parse::<Timestamp>().ok());
    let synced_at = report
        .and_then(|r| r.last_sync_unix_seconds)
        .filter(|s| s.is_finite())
        .and_then(|s| Timestamp::from_millisecond((s * 1000.0) as i64).ok());
    let reported_lag = report
        .and_then(|r| r.lag_seconds)
        .filter(|l| l.is_finite() && *l >= 0.0);
    // The agent's own figure: the time since its last complete pass, on its own clock, as of this very
    // report (reports are asked afresh on every pass, never kept). The pass time is never compared with
    // this machine's clock: a store whose clock is behind would read as that far behind.
    let lag_seconds = reported_lag;
    let promotion = match (ann.get(a::PROMOTED_FROM), time(a::LOST_AT)) {
        (Some(from), Some(lost_at)) => Some(PromotionMark {
            from: from.clone(),
            lost_at,
        }),
        _ => None,
    };
    Some(Replica {
        name,
        ordinal,
        ready,
        role: pod.labels().get(l::ROLE).and_then(|r| Role::parse(r)),
        lag_seconds,
        in_sync: report.is_some_and(|r| r.in_sync),
        synced_at,
        passed_since_resync: false,
        updated: true,
        promotion,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, ready: bool) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": {"mailpod.io/role": "standby"}},
            "status": {"conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"},
                                        "lastTransitionTime": "2024-01-01T00:00:00Z"}]}
        }))
        .unwrap()
    }

    fn report(pod: &str, lag: f64, at: &str, in_sync: bool) -> BTreeMap<String, ReplicationReport> {
        let at: Timestamp = at.parse().unwrap();
        BTreeMap::from([(
            pod.to_string(),
            serde_json::from_value(serde_json::json!({
                "role": "standby", "source": "corp-lun-0:12345", "lagSeconds": lag,
                "lastSyncUnixSeconds": at.as_second() as f64, "inSync": in_sync
            }))
            .unwrap(),
        )])
    }

    #[test]
    fn reads_readiness_role_and_agent_reports() {
        let pods = vec![
            pod("corp-lun-0-1", true),
            pod("corp-lun-0-0", false),
            pod("other-0", true),
        ];
        let reports = report("corp-lun-0-1", 1.5, "2024-01-01T00:00:08Z", true);
        let r = observe("corp-lun-0", &pods, &reports);
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].ordinal, r[0].ready), (0, false));
        assert_eq!(r[1].lag_seconds, Some(1.5));
        assert_eq!(r[1].role, Some(Role::Standby));
        assert!(r[1].in_sync);
        assert_eq!(
            r[1].synced_at,
            Some("2024-01-01T00:00:08Z".parse().unwrap())
        );
        assert!(!r[0].in_sync, "no report: not in sync");
    }

    #[test]
    fn the_lag_is_the_agents_own_whatever_its_clock_says() {
        // The pass ended at 00:00:00 by the store's clock, 0.2 s before its report; whatever this
        // machine's clock says now (minutes later, were the store's behind), the lag is the store's figure.
        let pods = vec![pod("corp-lun-0-1", true)];
        let reports = report("corp-lun-0-1", 0.2, "2024-01-01T00:00:00Z", true);
        assert_eq!(
            observe("corp-lun-0", &pods, &reports)[0].lag_seconds,
            Some(0.2)
        );
    }

    #[test]
    fn lag_buckets_are_coarse_upper_bounds_that_keep_zero() {
        assert_eq!(lag_bucket(0.0, 15.0), 0.0);
        for lag in [0.1, 4.9, 5.2, 14.9, 15.0] {
            assert_eq!(lag_bucket(lag, 15.0), 15.0, "{lag}");
        }
        assert_eq!(lag_bucket(15.1, 15.0), 30.0);
        assert_eq!(lag_bucket(30.5, 15.0), 60.0);
        assert_eq!(lag_bucket(61.0, 15.0), 300.0);
        assert_eq!(lag_bucket(3599.0, 15.0), 3600.0);
        assert_eq!(lag_bucket(90000.0, 15.0), 172800.0);
        // A floor above a step keeps its own value.
        assert_eq!(lag_bucket(100.0, 120.0), 120.0);
        assert_eq!(lag_bucket(121.0, 120.0), 300.0);
    }

    #[test]
    fn ordinals_need_the_exact_lun_prefix() {
        assert_eq!(ordinal("corp-lun-1", "corp-lun-1-3"), Some(3));
        assert_eq!(ordinal("corp-lun-1", "corp-lun-10-3"), None);
    }
}
