//! Store pods as the failover decision sees them: readiness, role label, and what the agent reports in
//! annotations on its own pod.

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;

use super::failover::{PromotionMark, Replica, Role};
use crate::names::{annotations as a, labels as l};

/// A sync report older than this many sync intervals no longer vouches for the lag it states.
const STALE_INTERVALS: f64 = 3.0;

/// The ordinal of `pod` in the LUN's StatefulSet (`corp-lun-0-2` -> 2).
pub fn ordinal(lun: &str, pod: &str) -> Option<i32> {
    pod.strip_prefix(lun)?.strip_prefix('-')?.parse().ok()
}

/// Replicas of `lun` observed from its pods, sorted by ordinal. Pods being deleted are left out: they no
/// longer serve, and a successor with the same name will be observed instead.
pub fn observe(
    lun: &str,
    pods: &[Pod],
    sync_interval_seconds: u32,
    now: Timestamp,
) -> Vec<Replica> {
    let mut out: Vec<Replica> = pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| replica(lun, p, sync_interval_seconds, now))
        .collect();
    out.sort_by_key(|r| r.ordinal);
    out
}

fn replica(lun: &str, pod: &Pod, sync_interval_seconds: u32, now: Timestamp) -> Option<Replica> {
    let name = pod.name_any();
    let ordinal = ordinal(lun, &name)?;
    let ready_condition = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"));
    let ready = ready_condition.is_some_and(|c| c.status == "True");
    let unready_since = (!ready).then(|| {
        ready_condition
            .and_then(|c| c.last_transition_time.as_ref().map(|t| t.0))
            .or(pod.metadata.creation_timestamp.as_ref().map(|t| t.0))
            .unwrap_or(now)
    });
    let ann = pod.annotations();
    let time = |key: &str| ann.get(key).and_then(|v| v.parse::<Timestamp>().ok());
    let synced_at = time(a::SYNCED_AT);
    let reported_lag = ann
        .get(a::REPLICATION_LAG)
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|l| l.is_finite() && *l >= 0.0);
    // An agent that stopped reporting must not keep a small lag forever: past a few sync intervals the
    // report's age is the better bound on how far behind it is.
    let lag_seconds = match (reported_lag, synced_at) {
        (Some(lag), Some(at)) => {
            let age = (now.as_millisecond() - at.as_millisecond()).max(0) as f64 / 1000.0;
            if age > STALE_INTERVALS * f64::from(sync_interval_seconds) {
                Some(lag.max(age))
            } else {
                Some(lag)
            }
        }
        (lag, _) => lag,
    };
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
        unready_since,
        lag_seconds,
        synced_from: ann.get(a::SYNCED_FROM).cloned(),
        synced_at,
        promotion,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, ready: bool, ann: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": {"mailpod.io/role": "standby"}, "annotations": ann},
            "status": {"conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"},
                                        "lastTransitionTime": "2024-01-01T00:00:00Z"}]}
        }))
        .unwrap()
    }

    #[test]
    fn reads_readiness_role_and_agent_reports() {
        let now: Timestamp = "2024-01-01T00:00:10Z".parse().unwrap();
        let pods = vec![
            pod(
                "corp-lun-0-1",
                true,
                serde_json::json!({
                "mailpod.io/replication-lag-seconds": "1.5",
                "mailpod.io/synced-from": "corp-lun-0-0",
                "mailpod.io/synced-at": "2024-01-01T00:00:08Z"}),
            ),
            pod("corp-lun-0-0", false, serde_json::json!({})),
            pod("other-0", true, serde_json::json!({})),
        ];
        let r = observe("corp-lun-0", &pods, 5, now);
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].ordinal, r[0].ready), (0, false));
        assert_eq!(
            r[0].unready_since,
            Some("2024-01-01T00:00:00Z".parse().unwrap())
        );
        assert_eq!(r[1].lag_seconds, Some(1.5));
        assert_eq!(r[1].role, Some(Role::Standby));
        assert_eq!(r[1].synced_from.as_deref(), Some("corp-lun-0-0"));
    }

    #[test]
    fn a_stale_lag_report_is_bounded_by_its_age() {
        let now: Timestamp = "2024-01-01T00:10:00Z".parse().unwrap();
        let pods = vec![pod(
            "corp-lun-0-1",
            true,
            serde_json::json!({
            "mailpod.io/replication-lag-seconds": "0.2",
            "mailpod.io/synced-at": "2024-01-01T00:00:00Z"}),
        )];
        assert_eq!(
            observe("corp-lun-0", &pods, 5, now)[0].lag_seconds,
            Some(600.0)
        );
    }

    #[test]
    fn ordinals_need_the_exact_lun_prefix() {
        assert_eq!(ordinal("corp-lun-1", "corp-lun-1-3"), Some(3));
        assert_eq!(ordinal("corp-lun-1", "corp-lun-10-3"), None);
    }
}
