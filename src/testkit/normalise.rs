//! What a real kube-apiserver does to an object between a write and the next read, as far as it decides
//! whether a controller sees its own children as changed: `omitempty` drops `false` and empty values,
//! quantities come back in canonical form, and defaults appear. Opt in with
//! [`ApiServer::normalise_like_kube_apiserver`](super::ApiServer::normalise_like_kube_apiserver).

use serde_json::{json, Value};

/// Rewrites `obj` (of `resource`, such as `apps/v1/statefulsets`) as the API server would store it.
pub fn like_kube_apiserver(resource: &str, obj: &mut Value) {
    if resource == "apps/v1/statefulsets" {
        let spec = &mut obj["spec"];
        if spec.is_object() {
            default(spec, "revisionHistoryLimit", json!(10));
            default(spec, "podManagementPolicy", json!("OrderedReady"));
            if let Some(pod) = spec.pointer_mut("/template/spec") {
                pod_spec(pod);
            }
        }
    }
    if resource == "v1/pods" {
        if let Some(pod) = obj.get_mut("spec") {
            pod_spec(pod);
        }
    }
}

fn default(map: &mut Value, key: &str, value: Value) {
    if let Some(m) = map.as_object_mut() {
        m.entry(key).or_insert(value);
    }
}

fn pod_spec(pod: &mut Value) {
    default(pod, "restartPolicy", json!("Always"));
    default(pod, "dnsPolicy", json!("ClusterFirst"));
    default(pod, "terminationGracePeriodSeconds", json!(30));
    for list in ["initContainers", "containers"] {
        for c in pod
            .get_mut(list)
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
        {
            default(c, "terminationMessagePath", json!("/dev/termination-log"));
            default(c, "imagePullPolicy", json!("IfNotPresent"));
            for m in c
                .get_mut("volumeMounts")
                .and_then(Value::as_array_mut)
                .into_iter()
                .flatten()
            {
                // `readOnly` is `omitempty`: false is not stored.
                if m.get("readOnly") == Some(&json!(false)) {
                    m.as_object_mut().map(|m| m.remove("readOnly"));
                }
            }
            if let Some(res) = c.get_mut("resources").and_then(Value::as_object_mut) {
                for part in res.values_mut().filter_map(Value::as_object_mut) {
                    for q in part.values_mut() {
                        if let Some(s) = q.as_str() {
                            *q = json!(canonical_quantity(s));
                        }
                    }
                }
            }
        }
    }
}

/// The canonical form of a quantity, for the cases that matter here: `1000m` -> `1`, `1024Mi` -> `1Gi`,
/// `1000M` -> `1G`. Anything else is kept as written.
pub fn canonical_quantity(q: &str) -> String {
    let split = q.find(|c: char| !c.is_ascii_digit()).unwrap_or(q.len());
    let (num, suffix) = q.split_at(split);
    let Ok(mut n) = num.parse::<u64>() else {
        return q.to_string();
    };
    const BINARY: [&str; 5] = ["", "Ki", "Mi", "Gi", "Ti"];
    const DECIMAL: [&str; 6] = ["m", "", "k", "M", "G", "T"];
    let (ladder, base): (&[&str], u64) = if BINARY[1..].contains(&suffix) {
        (&BINARY, 1024)
    } else if DECIMAL.contains(&suffix) {
        (&DECIMAL, 1000)
    } else {
        return q.to_string();
    };
    let mut i = ladder.iter().position(|s| *s == suffix).unwrap_or(0);
    while n != 0 && n % base == 0 && i + 1 < ladder.len() {
        n /= base;
        i += 1;
    }
    format!("{n}{}", ladder[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_come_back_canonical() {
        assert_eq!(canonical_quantity("1000m"), "1");
        assert_eq!(canonical_quantity("1024Mi"), "1Gi");
        assert_eq!(canonical_quantity("1500m"), "1500m");
        assert_eq!(canonical_quantity("64Mi"), "64Mi");
        assert_eq!(canonical_quantity("2000M"), "2G");
    }

    #[test]
    fn false_read_only_is_dropped_and_defaults_added() {
        let mut sts = json!({"spec": {"template": {"spec": {"containers": [{
            "name": "mx", "volumeMounts": [{"name": "a", "mountPath": "/a", "readOnly": false},
                                           {"name": "b", "mountPath": "/b", "readOnly": true}],
            "resources": {"requests": {"cpu": "1000m", "memory": "1024Mi"}}}]}}}});
        like_kube_apiserver("apps/v1/statefulsets", &mut sts);
        let c = &sts["spec"]["template"]["spec"]["containers"][0];
        assert!(c["volumeMounts"][0].get("readOnly").is_none());
        assert_eq!(c["volumeMounts"][1]["readOnly"], true);
        assert_eq!(
            c["resources"]["requests"],
            json!({"cpu": "1", "memory": "1Gi"})
        );
        assert_eq!(c["imagePullPolicy"], "IfNotPresent");
        assert_eq!(sts["spec"]["revisionHistoryLimit"], 10);
    }
}
