//! End to end against a real cluster: the one KUBECONFIG names, with the chart installed (e2e/kind-up.sh sets
//! one up). Each scenario runs in its own namespace, deleted afterwards, one scenario at a time.
//!
//! Without KUBECONFIG every test prints why it is skipped and passes; with `MAILPOD_E2E_REQUIRED=1` it fails
//! instead. Settings (env): `MAILPOD_E2E_STORAGE_CLASS` (default `csi-hostpath-sc`),
//! `MAILPOD_E2E_SNAPSHOT_CLASS` (default `csi-hostpath-snapclass`), `MAILPOD_E2E_TIMEOUT_SECONDS` (per wait,
//! default 600), `MAILPOD_E2E_KEEP=1` keeps the namespaces for inspection. See e2e/README.md.
//!
//! The cluster is driven through `kubectl` (as a person would, and so port-forwarding needs no extra code).

use std::io::Write;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod e2e_support;
use e2e_support::*;

#[path = "support/dkimpy.rs"]
mod dkimpy;

const EXAMPLE: &str = "examples/mailpod-small.yaml";
const MAILPOD: &str = "small";
const LUN: &str = "small-lun-0";

/// One scenario at a time: each runs a whole MailPod, and a kind node has room for one comfortably.
static SERIAL: Mutex<()> = Mutex::new(());

/// A namespace for one scenario, deleted (with everything in it) when the scenario ends.
struct Scenario {
    ns: String,
    started: jiff::Timestamp,
    _serial: Option<std::sync::MutexGuard<'static, ()>>,
}

impl Scenario {
    fn new(name: &str) -> Self {
        let serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        let mut sc = Self::namespace(name);
        sc._serial = Some(serial);
        sc
    }

    /// Another namespace for the same scenario (the caller holds the scenario lock).
    fn namespace(name: &str) -> Self {
        let suffix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
            % 100_000;
        let ns = format!("mailpod-e2e-{name}-{suffix}");
        must(&["get", "crd", "mailpods.mailpod.io"]);
        must(&["create", "namespace", &ns]);
        // docs/security.md: mail pods meet the baseline Pod Security Standard; the API server enforces it.
        must(&[
            "label",
            "namespace",
            &ns,
            "pod-security.kubernetes.io/enforce=baseline",
        ]);
        Self {
            ns,
            started: jiff::Timestamp::now(),
            _serial: None,
        }
    }

    /// Applies the small example, adapted to the test cluster: a passwd Secret so IMAP can log in, no TLS
    /// (certificates are not what these tests are about; the test cluster's network is this machine's own,
    /// so the spec opts in to plaintext logins by name, `insecurePlaintextAuth`), the e2e storage and
    /// snapshot classes, and `retain` snapshots.
    fn apply_small(&self, retain: u32) {
        self.apply_small_with(retain, |_| {});
    }

    /// `apply_small`, then `tweak` on the MailPod's spec before it is applied.
    fn apply_small_with(
        &self,
        retain: u32,
        tweak: impl FnOnce(&mut serde_json::Map<String, Value>),
    ) {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/",
            "examples/mailpod-small.yaml"
        ))
        .unwrap_or_else(|e| panic!("{EXAMPLE}: {e}"));
        let mut mp: Value = serde_yaml::from_str(&text).unwrap();
        mp["metadata"]["namespace"] = json!(self.ns);
        let spec = mp["spec"].as_object_mut().unwrap();
        spec.remove("tls");
        spec.insert("insecurePlaintextAuth".into(), json!(true));
        let mailboxes: Vec<String> = spec["mailboxes"]["inline"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_str().unwrap().to_string())
            .collect();
        spec["mailboxes"]["passwdFileSecret"] = json!({"name": "small-passwd", "key": "passwd"});
        spec.insert(
            "snapshots".into(),
            json!({
                "schedule": "0 */8 * * *",
                "retain": retain,
                "volumeSnapshotClassName": setting("MAILPOD_E2E_SNAPSHOT_CLASS", "csi-hostpath-snapclass"),
            }),
        );
        let backend = spec.entry("backend").or_insert_with(|| json!({}));
        backend["lunTemplate"] = json!({
            "capacity": "1Gi",
            "storageClassName": setting("MAILPOD_E2E_STORAGE_CLASS", "csi-hostpath-sc"),
        });
        tweak(spec);
        let passwd: String = mailboxes
            .iter()
            .map(|m| format!("{m}:{{PLAIN}}{PASSWORD}\n"))
            .collect();
        let secret = json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "small-passwd", "namespace": self.ns},
            "stringData": {"passwd": passwd},
        });
        for doc in [secret, mp] {
            kubectl(&["apply", "-f", "-"], Some(&doc.to_string()))
                .unwrap_or_else(|e| panic!("{e}"));
        }
    }

    fn wait_ready(&self) {
        wait_for("MailPod small Ready=True", || {
            let mp = get_json(&self.ns, &["mailpod", MAILPOD]).ok_or("no MailPod")?;
            condition(&mp, "Ready")
                .filter(|s| s == "True")
                .ok_or_else(|| format!("conditions: {}", mp["status"]["conditions"]))
        });
        wait_for("StorageLUN small-lun-0 with an active replica", || {
            self.active()
                .ok_or_else(|| "no status.currentActive".to_string())
        });
    }

    fn active(&self) -> Option<String> {
        let lun = get_json(&self.ns, &["storagelun", LUN])?;
        lun["status"]["currentActive"]
            .as_str()
            .filter(|s| !s.is_empty())
            .map(String::from)
    }

    /// A self-signed certificate for mail.example.com in the `kubernetes.io/tls` Secret `small-tls`.
    fn create_tls_secret(&self) {
        let dir = tempfile::tempdir().unwrap();
        let (key, crt) = (dir.path().join("tls.key"), dir.path().join("tls.crt"));
        let out = Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30",
            ])
            .args(["-subj", "/CN=mail.example.com", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&crt)
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "openssl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        must(&[
            "create",
            "secret",
            "tls",
            "small-tls",
            "-n",
            &self.ns,
            "--cert",
            crt.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
        ]);
    }

    /// Names of objects of `kind` labelled as this MailPod's.
    fn names(&self, kind: &str) -> Vec<String> {
        let list = get_json(
            &self.ns,
            &[kind, "-l", &format!("mailpod.io/mailpod={MAILPOD}")],
        )
        .unwrap_or_else(|| json!({"items": []}));
        let mut names: Vec<String> = list["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["metadata"]["name"].as_str().unwrap().to_string())
            .collect();
        names.sort();
        names
    }
}

impl Drop for Scenario {
    fn drop(&mut self) {
        // Every scenario is also an RBAC test: nothing the operator or the scenario's own ServiceAccounts
        // (the snapshot and restore jobs') sent was refused by the chart's or the operator's Roles. Checked
        // after the namespace is gone, so a failure here does not leave its pods holding the node.
        let refusals = match (
            std::env::var("MAILPOD_E2E_AUDIT_LOG"),
            std::thread::panicking(),
        ) {
            (Ok(log), false) => {
                let operator = format!(
                    "system:serviceaccount:{}:mailpod-operator",
                    setting("MAILPOD_E2E_OPERATOR_NAMESPACE", "mailpod-system")
                );
                let own = format!("system:serviceaccount:{}:", self.ns);
                refused(&log, |u| u == operator || u.starts_with(&own), self.started)
            }
            _ => vec![],
        };
        if std::env::var("MAILPOD_E2E_KEEP").as_deref() == Ok("1") {
            eprintln!("keeping namespace {} (MAILPOD_E2E_KEEP=1)", self.ns);
            assert!(
                refusals.is_empty(),
                "requests refused by RBAC: {refusals:#?}"
            );
            return;
        }
        // PVCs are kept by the operator on purpose; the namespace takes them with it. Waiting for it to be
        // gone frees the node's CPU requests for the next scenario (one node holds one or two MailPods).
        let _ = kubectl(
            &[
                "delete",
                "namespace",
                &self.ns,
                "--wait=true",
                "--timeout=300s",
            ],
            None,
        );
        assert!(
            refusals.is_empty(),
            "requests refused by RBAC: {refusals:#?}"
        );
    }
}

/// A cordoned node, uncordoned on drop (also when the test fails).
struct Cordon(String);

impl Cordon {
    fn new(node: &str) -> Self {
        must(&["cordon", node]);
        Self(node.to_string())
    }
}

impl Drop for Cordon {
    fn drop(&mut self) {
        let _ = kubectl(&["uncordon", &self.0], None);
    }
}
#[test]
fn mailpod_becomes_ready_with_its_children_and_delivers_mail() {
    if !cluster_given("mailpod_becomes_ready_with_its_children_and_delivers_mail") {
        return;
    }
    let sc = Scenario::new("flow");
    sc.apply_small(5);
    sc.wait_ready();

    // mailpod-small: mx, submission and imap with 2 replicas each, one LUN of 1 active + 1 standby.
    assert_eq!(
        sc.names("statefulsets"),
        ["small-imap", "small-lun-0", "small-mx", "small-submission"]
    );
    for sts in sc.names("statefulsets") {
        let s = get_json(&sc.ns, &["statefulset", &sts]).unwrap();
        assert_eq!(
            s["status"]["readyReplicas"], s["spec"]["replicas"],
            "StatefulSet {sts} is fully ready"
        );
    }
    assert_eq!(sc.names("storageluns"), [LUN]);
    assert_eq!(sc.names("cronjobs"), ["small-lun-0-snapshot"]);
    assert_eq!(
        sc.names("configmaps"),
        ["small-access-tables", "small-mail-settings"]
    );
    for svc in [
        "small-mx",
        "small-submission",
        "small-imap",
        "small-lun-0",
        "small-lun-0-hl",
    ] {
        assert!(
            sc.names("services").contains(&svc.to_string()),
            "Service {svc}"
        );
    }
    assert!(sc
        .names("networkpolicies")
        .contains(&"small-store".to_string()));
    let lun = get_json(&sc.ns, &["storagelun", LUN]).unwrap();
    assert_eq!(condition(&lun, "Ready").as_deref(), Some("True"));

    // The access-tables hash in status is the one on the ConfigMap the pods mount.
    let mp = get_json(&sc.ns, &["mailpod", MAILPOD]).unwrap();
    let cm = get_json(&sc.ns, &["configmap", "small-access-tables"]).unwrap();
    assert_eq!(
        mp["status"]["accessTablesHash"],
        cm["metadata"]["annotations"]["mailpod.io/content-hash"]
    );

    let subject = format!("e2e-{}", sc.ns);
    send_mail(&sc.ns, "alice@example.com", &subject);
    wait_for("the message in alice's INBOX over IMAP", || {
        imap_has(&sc.ns, "alice@example.com", &subject)
    });
    // The alias postmaster -> alice from the example's access tables.
    let aliased = format!("{subject}-postmaster");
    send_mail(&sc.ns, "postmaster@example.com", &aliased);
    wait_for("the aliased message in alice's INBOX", || {
        imap_has(&sc.ns, "alice@example.com", &aliased)
    });

    store_ports_admit_only_the_mailpods_own_pods(&sc);
}

/// A pod that sleeps, with `labels`, in `ns`: the mail image (bash's /dev/tcp makes the connections).
fn probe_pod(ns: &str, name: &str, labels: Value) {
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 0,
            "containers": [{
                "name": "probe",
                "image": setting("MAILPOD_E2E_MAIL_IMAGE", "mailpod:e2e"),
                "imagePullPolicy": "Never",
                "command": ["sleep", "900"],
                "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}},
            }],
        },
    });
    kubectl(&["apply", "-f", "-"], Some(&pod.to_string())).unwrap_or_else(|e| panic!("{e}"));
    must(&[
        "wait",
        "-n",
        ns,
        "--for=condition=Ready",
        &format!("pod/{name}"),
        "--timeout=180s",
    ]);
}

/// Whether a TCP connection from the probe pod to `ip:port` is set up within 5 s.
fn connects(ns: &str, probe: &str, ip: &str, port: i32) -> bool {
    let script =
        format!("timeout 5 bash -c 'exec 3<>/dev/tcp/{ip}/{port}' && echo open || echo closed");
    let out = kubectl(
        &["exec", "-n", ns, probe, "--", "bash", "-c", &script],
        None,
    )
    .unwrap_or_else(|e| panic!("exec in {ns}/{probe}: {e}"));
    out.trim() == "open"
}

/// docs/security.md: the stores' LMTP port admits this MailPod's front-end pods only, their control port
/// this MailPod's jobs and the operator's pods in the operator's namespace only. Checked with the cluster
/// enforcing NetworkPolicies (kube-router on the local cluster): each refusal is shown beside a pod that
/// is admitted to the same port, so a refusal is the policy's and not a port that is down.
fn store_ports_admit_only_the_mailpods_own_pods(sc: &Scenario) {
    let active = sc.active().expect("an active store");
    let pod = get_json(&sc.ns, &["pod", &active]).expect("the active store's pod");
    let ip = pod["status"]["podIP"].as_str().expect("podIP").to_string();
    let (lmtp, control) = (24, 8081);
    let other = Scenario::namespace("other");

    probe_pod(
        &sc.ns,
        "probe-mx",
        json!({"mailpod.io/mailpod": MAILPOD, "app.kubernetes.io/component": "mx"}),
    );
    probe_pod(
        &sc.ns,
        "probe-job",
        json!({"mailpod.io/mailpod": MAILPOD, "app.kubernetes.io/component": "snapshot"}),
    );
    probe_pod(&sc.ns, "probe-plain", json!({"app": "probe"}));
    probe_pod(
        &other.ns,
        "probe-operator",
        json!({"app.kubernetes.io/name": "mailpod-operator"}),
    );

    assert!(
        connects(&sc.ns, "probe-mx", &ip, lmtp),
        "an mx pod reaches the store's LMTP port"
    );
    assert!(
        connects(&sc.ns, "probe-job", &ip, control),
        "a snapshot job's pod reaches the store's control port"
    );
    assert!(
        !connects(&sc.ns, "probe-plain", &ip, lmtp),
        "a pod that is not a front end of this MailPod is refused at LMTP"
    );
    assert!(
        !connects(&sc.ns, "probe-plain", &ip, control),
        "a pod that is not a job of this MailPod is refused at the control port"
    );
    assert!(
        !connects(&other.ns, "probe-operator", &ip, control),
        "a pod with the operator's labels outside the operator's namespace is refused at the control port"
    );
    assert!(
        !connects(&sc.ns, "probe-mx", &ip, control),
        "a front-end pod is refused at the control port"
    );
    for p in ["probe-mx", "probe-job", "probe-plain"] {
        let _ = kubectl(&["delete", "pod", "-n", &sc.ns, p, "--wait=false"], None);
    }
}

#[test]
fn killed_active_store_is_replaced_by_its_standby() {
    if !cluster_given("killed_active_store_is_replaced_by_its_standby") {
        return;
    }
    let sc = Scenario::new("failover");
    sc.apply_small(5);
    sc.wait_ready();
    let subject = format!("e2e-before-failover-{}", sc.ns);
    send_mail(&sc.ns, "bob@example.com", &subject);
    wait_for("mail delivered before the failover", || {
        imap_has(&sc.ns, "bob@example.com", &subject)
    });

    let old = sc.active().unwrap();
    // Replication to the standby is asynchronous (a pass every few seconds): the mail a promotion can
    // promise is what the standby holds when the active is lost. Wait until it holds this message.
    let standby = if old.ends_with("-0") {
        format!("{LUN}-1")
    } else {
        format!("{LUN}-0")
    };
    wait_for("the standby to hold the message", || {
        kubectl(
            &[
                "exec",
                "-n",
                &sc.ns,
                &standby,
                "--",
                "grep",
                "-rlF",
                &subject,
                "/var/mail/store",
            ],
            None,
        )
        .map(|_| ())
    });
    // The active replica's node is lost: cordoned, so the StatefulSet's replacement pod cannot start there
    // (on a one-node cluster it would otherwise be back within the failover threshold, and rightly no
    // failover would happen), and the pod deleted without grace, so it is really gone.
    let node = must(&[
        "get",
        "pod",
        "-n",
        &sc.ns,
        &old,
        "-o",
        "jsonpath={.spec.nodeName}",
    ]);
    let _cordon = Cordon::new(node.trim());
    must(&[
        "delete",
        "pod",
        "-n",
        &sc.ns,
        &old,
        "--grace-period=0",
        "--force",
        "--wait=false",
    ]);
    let new = wait_for("status.currentActive to move to the standby", || {
        match sc.active() {
            Some(a) if a != old => Ok(a),
            other => Err(format!("currentActive {other:?}")),
        }
    });
    let pod = get_json(&sc.ns, &["pod", &new]).unwrap();
    assert_eq!(pod["metadata"]["labels"]["mailpod.io/role"], "active");
    wait_for(
        "the LUN Service to point at the new active replica only",
        || {
            let ep = get_json(&sc.ns, &["endpoints", LUN]).ok_or("no Endpoints")?;
            let targets: Vec<String> = ep["subsets"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|s| s["addresses"].as_array().cloned().unwrap_or_default())
                .filter_map(|a| a["targetRef"]["name"].as_str().map(String::from))
                .collect();
            if targets == [new.clone()] {
                Ok(())
            } else {
                Err(format!("endpoints {targets:?}"))
            }
        },
    );
    // The standby had the mail: it is readable after the promotion.
    wait_for("mail delivered before the failover still readable", || {
        imap_has(&sc.ns, "bob@example.com", &subject)
    });
}

#[test]
fn snapshots_are_taken_and_pruned_to_retain() {
    if !cluster_given("snapshots_are_taken_and_pruned_to_retain") {
        return;
    }
    let sc = Scenario::new("snapshot");
    sc.apply_small(1);
    sc.wait_ready();
    let mut taken = vec![];
    for i in 1..=2 {
        let job = format!("e2e-snapshot-{i}");
        must(&[
            "create",
            "job",
            "-n",
            &sc.ns,
            &job,
            "--from=cronjob/small-lun-0-snapshot",
        ]);
        wait_job(&sc.ns, &job);
        let last = wait_for("status.lastSnapshot on the StorageLUN", || {
            let lun = get_json(&sc.ns, &["storagelun", LUN]).ok_or("no LUN")?;
            lun["status"]["lastSnapshot"]["name"]
                .as_str()
                .filter(|n| !taken.contains(&n.to_string()))
                .map(String::from)
                .ok_or_else(|| format!("lastSnapshot {}", lun["status"]["lastSnapshot"]))
        });
        taken.push(last);
    }
    // retain 1: only the newest snapshot is left, and it is ready to restore from.
    let snapshots = wait_for("pruning to one VolumeSnapshot", || {
        let list = get_json(&sc.ns, &["volumesnapshots"]).ok_or("cannot list VolumeSnapshots")?;
        let items = list["items"].as_array().cloned().unwrap_or_default();
        if items.len() == 1 {
            Ok(items)
        } else {
            Err(format!("{} VolumeSnapshots", items.len()))
        }
    });
    assert_eq!(
        snapshots[0]["metadata"]["name"].as_str(),
        Some(taken[1].as_str())
    );
    wait_for("the kept snapshot to be ready to use", || {
        let s = get_json(&sc.ns, &["volumesnapshot", &taken[1]]).ok_or("gone")?;
        (s["status"]["readyToUse"] == true)
            .then_some(())
            .ok_or_else(|| format!("status {}", s["status"]))
    });

    // Snapshots off: the CronJob and the ServiceAccount, Role and RoleBinding it ran with go (with the
    // chart's RBAC, through the real garbage collector for the Jobs); the snapshot taken stays, and so
    // does the store.
    must(&[
        "patch",
        "mailpod",
        MAILPOD,
        "-n",
        &sc.ns,
        "--type=merge",
        "-p",
        r#"{"spec":{"snapshots":{"enabled":false}}}"#,
    ]);
    let snapshot_children = [
        "cronjob",
        "serviceaccount",
        "role.rbac.authorization.k8s.io",
        "rolebinding.rbac.authorization.k8s.io",
    ];
    wait_for("the snapshot CronJob and its RBAC to be removed", || {
        let left: Vec<&str> = snapshot_children
            .iter()
            .copied()
            .filter(|kind| get_json(&sc.ns, &[kind, &format!("{LUN}-snapshot")]).is_some())
            .collect();
        left.is_empty()
            .then_some(())
            .ok_or_else(|| format!("still there: {left:?}"))
    });
    wait_for("the snapshot Jobs to be collected", || {
        let jobs = get_json(&sc.ns, &["jobs"]).ok_or("cannot list Jobs")?;
        let n = jobs["items"].as_array().map_or(0, Vec::len);
        (n == 0).then_some(()).ok_or_else(|| format!("{n} Jobs"))
    });
    assert!(
        get_json(&sc.ns, &["volumesnapshot", &taken[1]]).is_some(),
        "the snapshot outlives the schedule that took it"
    );
    assert!(get_json(&sc.ns, &["statefulset", LUN]).is_some());
    sc.wait_ready();
}

#[test]
fn deleted_mailpod_takes_its_children_and_keeps_the_mail() {
    if !cluster_given("deleted_mailpod_takes_its_children_and_keeps_the_mail") {
        return;
    }
    let sc = Scenario::new("delete");
    sc.apply_small(5);
    sc.wait_ready();
    let pvcs_before: Vec<String> = {
        let list = get_json(&sc.ns, &["pvc"]).unwrap();
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["metadata"]["name"].as_str().unwrap().to_string())
            .collect()
    };
    for want in ["mail-small-lun-0-0", "mail-small-lun-0-1"] {
        assert!(
            pvcs_before.contains(&want.to_string()),
            "store PVC {want} in {pvcs_before:?}"
        );
    }

    must(&[
        "delete",
        "mailpod",
        "-n",
        &sc.ns,
        MAILPOD,
        "--wait=true",
        "--timeout=300s",
    ]);
    wait_for("every child of the MailPod to be gone", || {
        let left: Vec<String> = [
            "statefulsets",
            "services",
            "configmaps",
            "storageluns",
            "cronjobs",
            "networkpolicies",
            "poddisruptionbudgets",
            "roles",
            "rolebindings",
            "serviceaccounts",
        ]
        .iter()
        .flat_map(|k| sc.names(k).into_iter().map(move |n| format!("{k}/{n}")))
        .collect();
        left.is_empty()
            .then_some(())
            .ok_or_else(|| format!("left: {left:?}"))
    });
    let after = get_json(&sc.ns, &["pvc"]).unwrap();
    let names: Vec<&str> = after["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["metadata"]["name"].as_str().unwrap())
        .collect();
    for pvc in &pvcs_before {
        assert!(
            names.contains(&pvc.as_str()),
            "PVC {pvc} kept after the MailPod is deleted"
        );
    }
}

/// Mutating requests the operator's ServiceAccount sent between `from` and `to`, read from the API server's
/// audit log, the leader Lease's renewals left out: `verb resource namespace/name` for each.
fn operator_writes(audit_log: &str, from: jiff::Timestamp, to: jiff::Timestamp) -> Vec<String> {
    let user = format!(
        "system:serviceaccount:{}:mailpod-operator",
        setting("MAILPOD_E2E_OPERATOR_NAMESPACE", "mailpod-system")
    );
    let text = std::fs::read_to_string(audit_log).unwrap_or_else(|e| panic!("{audit_log}: {e}"));
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["stage"] == "ResponseComplete" && e["user"]["username"] == user.as_str())
        .filter(|e| {
            matches!(
                e["verb"].as_str(),
                Some("create" | "update" | "patch" | "delete" | "deletecollection")
            )
        })
        .filter(|e| e["objectRef"]["resource"] != "leases")
        .filter(|e| received(e).is_some_and(|t| t >= from && t < to))
        .map(|e| request(&e))
        .collect()
}

#[test]
fn steady_state_sends_no_writes_in_a_quiet_minute() {
    if !cluster_given("steady_state_sends_no_writes_in_a_quiet_minute") {
        return;
    }
    let Ok(audit_log) = std::env::var("MAILPOD_E2E_AUDIT_LOG") else {
        assert!(
            std::env::var("MAILPOD_E2E_REQUIRE_AUDIT").as_deref() != Ok("1"),
            "MAILPOD_E2E_REQUIRE_AUDIT=1 but MAILPOD_E2E_AUDIT_LOG is not set"
        );
        eprintln!("SKIPPED steady_state_sends_no_writes_in_a_quiet_minute: MAILPOD_E2E_AUDIT_LOG (the API server's audit log) is not set");
        return;
    };
    // Two MailPods, each with a LUN of 1 active + 1 standby and snapshots on.
    let first = Scenario::new("quiet-a");
    let second = Scenario::namespace("quiet-b");
    first.apply_small(5);
    second.apply_small(5);
    first.wait_ready();
    second.wait_ready();
    // Steady state begins once every standby's first sync is reported (a new pod's connections are
    // admitted only once NetworkPolicy knows its address, so that may take a few retries).
    for sc in [&first, &second] {
        wait_for("every standby's first sync reported", || {
            let lun = get_json(&sc.ns, &["storagelun", LUN]).ok_or("no StorageLUN")?;
            let replicas = lun["status"]["replicas"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let pending: Vec<&Value> = replicas
                .iter()
                .filter(|r| r["role"] == "standby" && r["lagSeconds"].is_null())
                .collect();
            (replicas.len() == 2 && pending.is_empty())
                .then_some(())
                .ok_or_else(|| format!("replicas: {replicas:?}"))
        });
    }
    // Let what follows (the status written for it) settle.
    std::thread::sleep(Duration::from_secs(10));
    let statuses = || -> Vec<String> {
        [&first, &second]
            .iter()
            .map(|sc| {
                let luns = get_json(&sc.ns, &["storageluns"]).unwrap_or_default();
                format!(
                    "{}: {}",
                    sc.ns,
                    serde_json::to_string(&luns["items"].as_array().map(|items| {
                        items
                            .iter()
                            .map(|l| l["status"].clone())
                            .collect::<Vec<_>>()
                    }))
                    .unwrap()
                )
            })
            .collect()
    };
    let before = statuses();
    let from = jiff::Timestamp::now();
    std::thread::sleep(Duration::from_secs(60));
    let to = jiff::Timestamp::now();
    // The audit log is written asynchronously: give the last events time to land.
    std::thread::sleep(Duration::from_secs(2));
    let after = statuses();
    let writes = operator_writes(&audit_log, from, to);
    let mut counted = std::collections::BTreeMap::<&str, usize>::new();
    for w in &writes {
        *counted.entry(w.as_str()).or_default() += 1;
    }
    let summary: Vec<String> = counted
        .iter()
        .map(|(w, n)| format!("{n:>5} x {w}"))
        .collect();
    assert!(
        writes.is_empty(),
        "{} mutating requests by the operator in a quiet minute:\n{}\nLUN status before:\n{}\nafter:\n{}",
        writes.len(),
        summary.join("\n"),
        before.join("\n"),
        after.join("\n")
    );
}

/// Runs curl (SMTP, IMAP and POP3 over STARTTLS with certificate checks off: the certificate is the test's
/// own self-signed one) and returns its output, or curl's error.
fn curl(args: &[&str], stdin: Option<&str>) -> Result<String, String> {
    let mut all = vec!["-sS", "--max-time", "30"];
    all.extend(args);
    run("curl", &all, stdin)
}

/// The `host:port` of a Service's ClusterIP (curl connects there directly).
fn service_addr(ns: &str, service: &str, port: u16) -> String {
    format!("{}:{port}", cluster_ip(ns, service))
}

#[test]
fn front_ends_serve_tls_and_auth_and_refuse_unknown_recipients() {
    if !cluster_given("front_ends_serve_tls_and_auth_and_refuse_unknown_recipients") {
        return;
    }
    let sc = Scenario::new("frontends");
    sc.create_tls_secret();
    sc.apply_small_with(5, |spec| {
        spec.insert("tls".into(), json!({"secretName": "small-tls"}));
        spec.remove("insecurePlaintextAuth");
        spec.insert("frontend".into(), json!({"pop3": {"replicas": 1}}));
        spec.insert("dkim".into(), json!({}));
    });
    sc.wait_ready();
    if !matches!(
        ServicePort::new(&sc.ns, "small-mx", 25),
        ServicePort::Direct(_)
    ) {
        eprintln!("SKIPPED front_ends_serve_tls_and_auth_and_refuse_unknown_recipients: Service addresses are not routed from here (curl needs them)");
        return;
    }

    // An unknown recipient is refused at RCPT, before any mail is accepted (no backscatter).
    {
        let pf = ServicePort::new(&sc.ns, "small-mx", 25);
        let mut s = Session::new(pf.connect());
        s.smtp("220");
        s.send("EHLO e2e.test");
        s.smtp("250");
        s.send("MAIL FROM:<e2e@sender.test>");
        s.smtp("250");
        s.send("RCPT TO:<nobody@example.com>");
        let reply = s.line();
        assert!(reply.starts_with("550"), "unknown recipient: {reply:?}");
        s.send("QUIT");
    }

    // Submission: STARTTLS, then AUTH as alice, to bob.
    let user = "alice@example.com";
    let login = format!("{user}:{PASSWORD}");
    let subject = format!("e2e-submission-{}", sc.ns);
    let message = format!(
        "From: <{user}>\r\nTo: <bob@example.com>\r\nSubject: {subject}\r\n\r\nvia submission\r\n"
    );
    let submission = service_addr(&sc.ns, "small-submission", 587);
    wait_for("a message submitted with STARTTLS and AUTH", || {
        curl(
            &[
                "--ssl-reqd",
                "-k",
                &format!("smtp://{submission}"),
                "-u",
                &login,
                "--mail-from",
                user,
                "--mail-rcpt",
                "bob@example.com",
                "-T",
                "-",
            ],
            Some(&message),
        )
    });
    // Without TLS, submission offers no AUTH: the password is never sent in clear.
    let plain = curl(
        &[
            &format!("smtp://{submission}"),
            "-u",
            &login,
            "--mail-from",
            user,
            "--mail-rcpt",
            "bob@example.com",
            "-T",
            "-",
        ],
        Some(&message),
    );
    assert!(plain.is_err(), "submission accepted AUTH without TLS");
    // A wrong password is refused.
    let wrong = curl(
        &[
            "--ssl-reqd",
            "-k",
            &format!("smtp://{submission}"),
            "-u",
            &format!("{user}:not-the-password"),
            "--mail-from",
            user,
            "--mail-rcpt",
            "bob@example.com",
            "-T",
            "-",
        ],
        Some(&message),
    );
    assert!(wrong.is_err(), "submission accepted a wrong password");

    // Bob reads it over IMAP (STARTTLS) and over POP3 (STLS).
    let bob = format!("bob@example.com:{PASSWORD}");
    let imap = service_addr(&sc.ns, "small-imap", 143);
    wait_for("the submitted message over IMAP with STARTTLS", || {
        let found = curl(
            &[
                "--ssl-reqd",
                "-k",
                "-u",
                &bob,
                &format!("imap://{imap}/INBOX"),
                "-X",
                &format!("SEARCH SUBJECT \"{subject}\""),
            ],
            None,
        )?;
        let ids: Vec<&str> = found
            .lines()
            .find_map(|l| l.strip_prefix("* SEARCH"))
            .map(|r| r.split_whitespace().collect())
            .unwrap_or_default();
        ids.first()
            .map(|_| ())
            .ok_or_else(|| format!("SEARCH: {found}"))
    });
    let pop3 = service_addr(&sc.ns, "small-pop3", 110);
    let listed = wait_for("bob's mailbox over POP3 with STLS", || {
        curl(
            &["--ssl-reqd", "-k", "-u", &bob, &format!("pop3://{pop3}/")],
            None,
        )
    });
    let first = listed
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("POP3 LIST: {listed:?}"))
        .to_string();
    let body = curl(
        &[
            "--ssl-reqd",
            "-k",
            "-u",
            &bob,
            &format!("pop3://{pop3}/{first}"),
        ],
        None,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(body.contains(&subject), "POP3 RETR {first}: {body}");

    // DKIM: the key the operator generated verifies the signature with the record status publishes, as
    // receivers would check it; `kubectl mailpod status` shows the record.
    let mp = get_json(&sc.ns, &["mailpod", MAILPOD]).unwrap();
    let record = mp["status"]["dkim"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["domain"] == "example.com"))
        .cloned()
        .unwrap_or_else(|| panic!("no DKIM record for example.com in status: {}", mp["status"]));
    assert_eq!(record["name"], "mail._domainkey.example.com");
    let txt = record["txt"].as_str().unwrap();
    assert!(body.contains("DKIM-Signature:"), "not signed: {body}");
    if dkimpy::dkimpy_present("front_ends_serve_tls_and_auth_and_refuse_unknown_recipients") {
        dkimpy::dkimpy_verifies(&body, "example.com", "mail", txt)
            .unwrap_or_else(|e| panic!("dkimpy: {e}\n{body}"));
    }
    let status = plugin(&["-n", &sc.ns, "status", MAILPOD]).unwrap_or_else(|e| panic!("{e}"));
    assert!(status.contains(txt), "kubectl mailpod status: {status}");

    // Implicit TLS (RFC 8314) answers on 465, 993 and 995 through the Services.
    let submissions = service_addr(&sc.ns, "small-submission", 465);
    curl(
        &[
            "-k",
            &format!("smtps://{submissions}"),
            "-u",
            &login,
            "--mail-from",
            user,
            "--mail-rcpt",
            "bob@example.com",
            "-T",
            "-",
        ],
        Some(&message),
    )
    .unwrap_or_else(|e| panic!("submissions (465): {e}"));
    let imaps = service_addr(&sc.ns, "small-imap", 993);
    let examined = curl(
        &[
            "-k",
            "-u",
            &bob,
            &format!("imaps://{imaps}/INBOX"),
            "-X",
            "EXAMINE INBOX",
        ],
        None,
    )
    .unwrap_or_else(|e| panic!("imaps (993): {e}"));
    assert!(examined.contains("EXISTS"), "imaps EXAMINE: {examined}");
    let pop3s = service_addr(&sc.ns, "small-pop3", 995);
    curl(&["-k", "-u", &bob, &format!("pop3s://{pop3s}/")], None)
        .unwrap_or_else(|e| panic!("pop3s (995): {e}"));
}

/// The subjects in `user`'s `folder` that start with `prefix`, one entry per message (so a duplicate shows
/// twice), read over IMAP through the imap Service.
fn imap_subjects(ns: &str, user: &str, folder: &str, prefix: &str) -> Result<Vec<String>, String> {
    // A store that just became active may refuse logins for a moment.
    let mut s = imap_session(ns, user)?;
    s.send(&format!("b SELECT \"{folder}\""));
    let mut selected = String::new();
    loop {
        let l = s.line();
        selected.push_str(&l);
        if l.starts_with("b ") {
            break;
        }
    }
    if !selected
        .lines()
        .last()
        .unwrap_or_default()
        .starts_with("b OK")
    {
        s.imap("z", "LOGOUT");
        return Err(format!("SELECT {folder}: {selected}"));
    }
    let exists = selected
        .lines()
        .find_map(|l| {
            l.strip_suffix(" EXISTS\r")
                .or_else(|| l.strip_suffix(" EXISTS"))
        })
        .and_then(|l| l.trim_start_matches("* ").parse::<u32>().ok())
        .unwrap_or(0);
    let mut subjects = vec![];
    if exists > 0 {
        let all = s.imap("c", "FETCH 1:* BODY.PEEK[HEADER.FIELDS (SUBJECT)]");
        for l in all.lines() {
            if let Some(subject) = l.strip_prefix("Subject: ") {
                if subject.starts_with(prefix) {
                    subjects.push(subject.trim().to_string());
                }
            }
        }
    }
    s.imap("z", "LOGOUT");
    subjects.sort();
    Ok(subjects)
}

/// Runs an IMAP command sequence as `user` (each must answer OK).
fn imap_commands(ns: &str, user: &str, commands: &[&str]) {
    let pf = ServicePort::new(ns, "small-imap", 143);
    let mut s = Session::new(pf.connect());
    assert!(s.line().starts_with("* OK"));
    s.imap("a", &format!("LOGIN {user} {PASSWORD}"));
    for (i, c) in commands.iter().enumerate() {
        s.imap(&format!("c{i}"), c);
    }
    s.imap("z", "LOGOUT");
}

/// Appends a message with `subject` to `user`'s `folder` over IMAP.
fn imap_append(ns: &str, user: &str, folder: &str, subject: &str) {
    let pf = ServicePort::new(ns, "small-imap", 143);
    let mut s = Session::new(pf.connect());
    assert!(s.line().starts_with("* OK"));
    s.imap("a", &format!("LOGIN {user} {PASSWORD}"));
    let msg = format!("From: <{user}>\r\nSubject: {subject}\r\n\r\nsaved by tests/e2e.rs\r\n");
    s.send(&format!("b APPEND \"{folder}\" {{{}}}", msg.len()));
    let cont = s.line();
    assert!(cont.starts_with('+'), "APPEND: {cont:?}");
    s.writer.write_all(msg.as_bytes()).unwrap();
    s.send("");
    let done = s.line();
    assert!(done.starts_with("b OK"), "APPEND: {done:?}");
    s.imap("z", "LOGOUT");
}

/// Runs the kubectl plugin built from this crate against the cluster, as a person would.
fn plugin(args: &[&str]) -> Result<String, String> {
    let out = Command::new(env!("CARGO_BIN_EXE_kubectl-mailpod"))
        .args(args)
        .env(
            "MAILPOD_MAIL_IMAGE",
            setting("MAILPOD_E2E_MAIL_IMAGE", "mailpod:e2e"),
        )
        .output()
        .map_err(|e| format!("cannot run kubectl-mailpod: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "kubectl mailpod {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Waits for a Job to complete, failing fast (with its log) when it failed.
fn wait_job(ns: &str, job: &str) {
    wait_for(&format!("Job {job} to complete"), || {
        let j = get_json(ns, &["job", job]).ok_or("no Job")?;
        if condition(&j, "Failed").as_deref() == Some("True") {
            panic!(
                "Job {job} failed: {}",
                kubectl(&["logs", "-n", ns, &format!("job/{job}")], None).unwrap_or_default()
            );
        }
        (condition(&j, "Complete").as_deref() == Some("True"))
            .then_some(())
            .ok_or_else(|| format!("status {}", j["status"]))
    });
}

/// Takes a snapshot with `kubectl mailpod snapshot` and returns the VolumeSnapshot's name once it is ready.
fn snapshot_now(sc: &Scenario) -> String {
    let before = get_json(&sc.ns, &["storagelun", LUN]).unwrap()["status"]["lastSnapshot"]["name"]
        .as_str()
        .map(String::from);
    let out = plugin(&["-n", &sc.ns, "snapshot", LUN]).unwrap_or_else(|e| panic!("{e}"));
    let job = out
        .split_whitespace()
        .find_map(|w| w.strip_prefix("job/"))
        .unwrap_or_else(|| panic!("kubectl mailpod snapshot printed {out:?}"))
        .to_string();
    wait_job(&sc.ns, &job);
    let log = kubectl(&["logs", "-n", &sc.ns, &format!("job/{job}")], None).unwrap_or_default();
    if let Some(line) = log.lines().find(|l| l.contains("delivery paused")) {
        eprintln!("snapshot job {job}: {line}");
    }
    let name = wait_for("a new status.lastSnapshot", || {
        let lun = get_json(&sc.ns, &["storagelun", LUN]).ok_or("no LUN")?;
        lun["status"]["lastSnapshot"]["name"]
            .as_str()
            .filter(|n| Some(n.to_string()) != before)
            .map(String::from)
            .ok_or_else(|| format!("lastSnapshot {}", lun["status"]["lastSnapshot"]))
    });
    let lun = get_json(&sc.ns, &["storagelun", LUN]).unwrap();
    eprintln!(
        "snapshot {name}: delivery paused {} ms",
        lun["status"]["lastSnapshot"]["pauseMillis"]
    );
    wait_for("the snapshot to be ready to use", || {
        let s = get_json(&sc.ns, &["volumesnapshot", &name]).ok_or("no VolumeSnapshot")?;
        (s["status"]["readyToUse"] == true)
            .then_some(())
            .ok_or_else(|| format!("status {}", s["status"]))
    });
    name
}

#[test]
fn mail_sent_across_a_snapshot_pause_is_delivered_once() {
    if !cluster_given("mail_sent_across_a_snapshot_pause_is_delivered_once") {
        return;
    }
    let sc = Scenario::new("pause");
    sc.apply_small(5);
    sc.wait_ready();
    let prefix = format!("e2e-pause-{}-", sc.ns);
    let ns = sc.ns.clone();
    let p = prefix.clone();
    // Messages keep arriving at the mx while the snapshot pauses delivery to the store.
    let sender = std::thread::spawn(move || {
        for i in 0..20 {
            send_mail(&ns, "carol@example.com", &format!("{p}{i:02}"));
            std::thread::sleep(Duration::from_millis(500));
        }
    });
    let started = Instant::now();
    let snapshot = snapshot_now(&sc);
    eprintln!(
        "snapshot {snapshot} taken and ready in {:?}",
        started.elapsed()
    );
    sender.join().expect("every message accepted by mx");
    let want: Vec<String> = (0..20).map(|i| format!("{prefix}{i:02}")).collect();
    let delivered = Instant::now();
    wait_for("all 20 messages in carol's INBOX", || {
        let got = imap_subjects(&sc.ns, "carol@example.com", "INBOX", &prefix)?;
        if got.len() > want.len() {
            panic!("duplicates delivered: {got:?}");
        }
        (got == want)
            .then_some(())
            .ok_or_else(|| format!("{} of 20: {got:?}", got.len()))
    });
    eprintln!(
        "all delivered {:?} after the last was accepted",
        delivered.elapsed()
    );
    // Still exactly once a little later (nothing was left to deliver twice).
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        imap_subjects(&sc.ns, "carol@example.com", "INBOX", &prefix).unwrap(),
        want
    );
}

/// Restores `mailbox` (one `folder` of it, if given) from `snapshot` with `kubectl mailpod restore --wait`,
/// printing how long it took.
fn restore_with_plugin(sc: &Scenario, snapshot: &str, mailbox: &str, folder: Option<&str>) {
    let mut args = vec![
        "-n",
        &sc.ns,
        "restore",
        "--lun",
        LUN,
        "--snapshot",
        snapshot,
        "--mailbox",
        mailbox,
    ];
    if let Some(f) = folder {
        args.extend(["--folder", f]);
    }
    args.extend(["--wait", "--timeout", "600"]);
    let started = Instant::now();
    let out = plugin(&args).unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "restore of {mailbox} {}: {:?}\n{out}",
        folder.unwrap_or("(every folder)"),
        started.elapsed()
    );
}

#[test]
fn a_mailbox_and_a_folder_are_restored_from_a_snapshot() {
    if !cluster_given("a_mailbox_and_a_folder_are_restored_from_a_snapshot") {
        return;
    }
    let sc = Scenario::new("restore");
    sc.apply_small(5);
    sc.wait_ready();
    let prefix = format!("e2e-restore-{}-", sc.ns);
    let inbox: Vec<String> = (0..3).map(|i| format!("{prefix}inbox-{i}")).collect();
    for subject in &inbox {
        send_mail(&sc.ns, "alice@example.com", subject);
    }
    wait_for("alice's three messages", || {
        let got = imap_subjects(&sc.ns, "alice@example.com", "INBOX", &prefix)?;
        (got == inbox).then_some(()).ok_or(format!("{got:?}"))
    });
    imap_commands(&sc.ns, "bob@example.com", &["CREATE Projects"]);
    let project = format!("{prefix}project");
    imap_append(&sc.ns, "bob@example.com", "Projects", &project);
    // The standby has the mail too before the snapshot is taken of the active (both are replicas).
    let snapshot = snapshot_now(&sc);

    // Lost: alice's INBOX emptied, bob's folder deleted.
    imap_commands(
        &sc.ns,
        "alice@example.com",
        &["SELECT INBOX", "STORE 1:* +FLAGS (\\Deleted)", "EXPUNGE"],
    );
    imap_commands(&sc.ns, "bob@example.com", &["DELETE Projects"]);
    assert_eq!(
        imap_subjects(&sc.ns, "alice@example.com", "INBOX", &prefix).unwrap(),
        Vec::<String>::new()
    );

    restore_with_plugin(&sc, &snapshot, "alice@example.com", None);
    assert_eq!(
        imap_subjects(&sc.ns, "alice@example.com", "INBOX", &prefix).unwrap(),
        inbox,
        "alice's INBOX restored"
    );

    restore_with_plugin(&sc, &snapshot, "bob@example.com", Some("Projects"));
    assert_eq!(
        imap_subjects(&sc.ns, "bob@example.com", "Projects", &prefix).unwrap(),
        [project],
        "bob's Projects folder restored"
    );
    // Restoring again copies nothing twice.
    restore_with_plugin(&sc, &snapshot, "alice@example.com", None);
    assert_eq!(
        imap_subjects(&sc.ns, "alice@example.com", "INBOX", &prefix).unwrap(),
        inbox,
        "a second restore duplicates nothing"
    );
}

/// `kind/name version` of every child of the MailPod, to show that nothing was written.
fn child_versions(sc: &Scenario) -> Vec<String> {
    let mut out = vec![];
    for kind in [
        "statefulsets",
        "services",
        "configmaps",
        "storageluns",
        "cronjobs",
    ] {
        let list = get_json(
            &sc.ns,
            &[kind, "-l", &format!("mailpod.io/mailpod={MAILPOD}")],
        )
        .unwrap_or_else(|| json!({"items": []}));
        for o in list["items"].as_array().unwrap() {
            // The spec's generation where the kind has one (status writes by the controllers that run
            // these objects change resourceVersion, not generation), else the resourceVersion.
            let version = o["metadata"]["generation"]
                .as_i64()
                .map(|g| format!("generation {g}"))
                .unwrap_or_else(|| {
                    format!(
                        "resourceVersion {}",
                        o["metadata"]["resourceVersion"].as_str().unwrap()
                    )
                });
            out.push(format!(
                "{kind}/{} {version}",
                o["metadata"]["name"].as_str().unwrap()
            ));
        }
    }
    out.sort();
    out
}

#[test]
fn an_invalid_change_is_refused_or_reported_and_changes_nothing() {
    if !cluster_given("an_invalid_change_is_refused_or_reported_and_changes_nothing") {
        return;
    }
    let sc = Scenario::new("invalid");
    sc.apply_small(5);
    sc.wait_ready();
    let before = child_versions(&sc);

    // The API server refuses what the schema rules out, naming the field.
    let refused = kubectl(
        &[
            "patch",
            "mailpod",
            MAILPOD,
            "-n",
            &sc.ns,
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"backend":{"standbys":9}}}"#,
        ],
        None,
    )
    .expect_err("standbys: 9 accepted");
    assert!(refused.contains("spec.backend.standbys"), "{refused}");

    // A mailbox of a domain this MailPod does not serve: refused by the API server (CEL) or, if the
    // schema lets it through, reported as InvalidSpec by the operator; either way naming the field.
    let patched = kubectl(
        &[
            "patch",
            "mailpod",
            MAILPOD,
            "-n",
            &sc.ns,
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"mailboxes":{"inline":["alice@example.com","bob@example.com","carol@example.com","dave@other.org"]}}}"#,
        ],
        None,
    );
    match patched {
        Err(e) => assert!(e.contains("spec.mailboxes"), "{e}"),
        Ok(_) => {
            let message = wait_for("Ready=False with reason InvalidSpec", || {
                let mp = get_json(&sc.ns, &["mailpod", MAILPOD]).ok_or("no MailPod")?;
                let ready = mp["status"]["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|c| c["type"] == "Ready")
                    .cloned()
                    .unwrap_or_default();
                (ready["reason"] == "InvalidSpec")
                    .then(|| ready["message"].as_str().unwrap_or_default().to_string())
                    .ok_or_else(|| format!("Ready: {ready}"))
            });
            assert!(message.contains("spec.mailboxes.inline[3]"), "{message}");
        }
    }
    // Nothing the MailPod runs was written, and mail still flows.
    std::thread::sleep(Duration::from_secs(10));
    assert_eq!(
        child_versions(&sc),
        before,
        "children written after an invalid change"
    );
    let subject = format!("e2e-invalid-{}", sc.ns);
    send_mail(&sc.ns, "bob@example.com", &subject);
    wait_for("mail delivered while the spec is invalid", || {
        imap_has(&sc.ns, "bob@example.com", &subject)
    });
}

#[test]
fn a_fenced_lun_serves_nobody_and_its_mail_waits_in_the_queue() {
    if !cluster_given("a_fenced_lun_serves_nobody_and_its_mail_waits_in_the_queue") {
        return;
    }
    let sc = Scenario::new("fence");
    sc.apply_small(5);
    sc.wait_ready();
    let status = plugin(&["-n", &sc.ns, "status", MAILPOD]).unwrap_or_else(|e| panic!("{e}"));
    assert!(status.contains(LUN), "kubectl mailpod status: {status}");

    plugin(&["-n", &sc.ns, "fence", LUN]).unwrap_or_else(|e| panic!("{e}"));
    // Fenced: no replica is an endpoint of the LUN's Service, so no store takes mail or logins.
    wait_for("the LUN Service to have no endpoint", || {
        let ep = get_json(&sc.ns, &["endpoints", LUN]).ok_or("no Endpoints")?;
        let ready: usize = ep["subsets"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| s["addresses"].as_array().map_or(0, Vec::len))
            .sum();
        (ready == 0)
            .then_some(())
            .ok_or_else(|| format!("{ready} ready endpoints"))
    });
    let prefix = format!("e2e-fence-{}-", sc.ns);
    for i in 0..3 {
        send_mail(&sc.ns, "alice@example.com", &format!("{prefix}{i}"));
    }
    std::thread::sleep(Duration::from_secs(10));
    plugin(&["-n", &sc.ns, "unfence", LUN]).unwrap_or_else(|e| panic!("{e}"));
    let want: Vec<String> = (0..3).map(|i| format!("{prefix}{i}")).collect();
    let unfenced = Instant::now();
    wait_for("the queued mail delivered once after unfencing", || {
        let got = imap_subjects(&sc.ns, "alice@example.com", "INBOX", &prefix)?;
        assert!(got.len() <= 3, "duplicates: {got:?}");
        (got == want)
            .then_some(())
            .ok_or_else(|| format!("{got:?}"))
    });
    eprintln!(
        "queued mail delivered {:?} after unfencing",
        unfenced.elapsed()
    );
}

#[test]
fn standbys_are_added_and_removed_and_capacity_is_fixed() {
    if !cluster_given("standbys_are_added_and_removed_and_capacity_is_fixed") {
        return;
    }
    let sc = Scenario::new("scale");
    sc.apply_small(5);
    sc.wait_ready();
    let subject = format!("e2e-scale-{}", sc.ns);
    send_mail(&sc.ns, "alice@example.com", &subject);
    wait_for("mail delivered", || {
        imap_has(&sc.ns, "alice@example.com", &subject)
    });
    let active = sc.active().unwrap();
    let ready_replicas = |want: i64| {
        wait_for(&format!("{want} ready store replicas"), || {
            let s = get_json(&sc.ns, &["statefulset", LUN]).ok_or("no StatefulSet")?;
            let (spec, ready) = (
                s["spec"]["replicas"].as_i64(),
                s["status"]["readyReplicas"].as_i64().unwrap_or(0),
            );
            (spec == Some(want) && ready == want)
                .then_some(())
                .ok_or_else(|| format!("replicas {spec:?}, ready {ready}"))
        })
    };

    // docs/operations.md: capacity is fixed once set; the API server refuses the change, naming it.
    let refused = kubectl(
        &[
            "patch",
            "mailpod",
            MAILPOD,
            "-n",
            &sc.ns,
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"backend":{"lunTemplate":{"capacity":"2Gi"}}}}"#,
        ],
        None,
    )
    .expect_err("a capacity change was accepted");
    assert!(refused.contains("capacity"), "{refused}");

    // A second standby: three replicas, the active unchanged.
    must(&[
        "patch",
        "mailpod",
        MAILPOD,
        "-n",
        &sc.ns,
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"backend":{"standbys":2}}}"#,
    ]);
    ready_replicas(3);
    assert_eq!(sc.active().as_deref(), Some(active.as_str()));
    // Back to one: the highest ordinal goes, never the active, and the mail stays readable.
    must(&[
        "patch",
        "mailpod",
        MAILPOD,
        "-n",
        &sc.ns,
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"backend":{"standbys":1}}}"#,
    ]);
    ready_replicas(2);
    let now_active = sc.active().unwrap();
    assert_ne!(now_active, format!("{LUN}-2"), "the active was removed");
    wait_for("mail readable after scaling", || {
        imap_has(&sc.ns, "alice@example.com", &subject)
    });
}

/// One look at the store pods: (LUN, pod, UID, ready, role label, revision label).
type StoreSample = Vec<(String, String, String, bool, String, String)>;

fn store_sample(ns: &str) -> Option<StoreSample> {
    let list = get_json(ns, &["pods", "-l", "app.kubernetes.io/component=store"])?;
    let label = |p: &Value, k: &str| {
        p["metadata"]["labels"][k]
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    Some(
        list["items"]
            .as_array()?
            .iter()
            .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
            .map(|p| {
                let ready = p["status"]["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True");
                (
                    label(p, "mailpod.io/lun"),
                    p["metadata"]["name"].as_str().unwrap_or("").to_string(),
                    p["metadata"]["uid"].as_str().unwrap_or("").to_string(),
                    ready,
                    label(p, "mailpod.io/role"),
                    label(p, "controller-revision-hash"),
                )
            })
            .collect(),
    )
}

/// A new store pod template (here a change of the stores' resources, as an operator upgrade changes
/// their image) reaches the pods one LUN at a time, lowest index first; in each LUN the standby is
/// replaced first and the active only after a switchover, as a standby; no LUN ever has two pods
/// labelled active; mail sent all along is delivered.
#[test]
fn a_new_store_template_rolls_one_lun_at_a_time_standbys_first() {
    if !cluster_given("a_new_store_template_rolls_one_lun_at_a_time_standbys_first") {
        return;
    }
    let sc = Scenario::new("roll");
    sc.apply_small_with(5, |spec| {
        spec["backend"]["maxUsersPerLun"] = json!(2);
    });
    sc.wait_ready();
    let luns = ["small-lun-0", "small-lun-1"];
    let users = ["alice@example.com", "carol@example.com"];
    for lun in luns {
        wait_for(&format!("{lun} serving with its standby in sync"), || {
            let l = get_json(&sc.ns, &["storagelun", lun]).ok_or("no LUN")?;
            let replicas = l["status"]["replicas"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let synced = replicas
                .iter()
                .filter(|r| {
                    r["role"] == "standby" && r["ready"] == true && r["lagSeconds"].is_number()
                })
                .count();
            (l["status"]["currentActive"].is_string() && synced == 1)
                .then_some(())
                .ok_or_else(|| format!("status {}", l["status"]))
        });
    }
    let before = store_sample(&sc.ns).expect("store pods");
    assert_eq!(before.len(), 4, "{before:?}");
    let initial_active = |lun: &str| {
        before
            .iter()
            .find(|p| p.0 == lun && p.4 == "active")
            .map(|p| p.2.clone())
            .unwrap_or_else(|| panic!("no active pod of {lun}: {before:?}"))
    };
    let old_active = [initial_active(luns[0]), initial_active(luns[1])];

    must(&[
        "patch",
        "mailpod",
        MAILPOD,
        "-n",
        &sc.ns,
        "--type=merge",
        "-p",
        r#"{"spec":{"backend":{"resources":{"requests":{"cpu":"50m","memory":"96Mi"}}}}}"#,
    ]);
    let started = Instant::now();
    let old_uids: Vec<String> = before.iter().map(|p| p.2.clone()).collect();
    // The pods are looked at continuously by a thread of their own while mail is sent from this one.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (ns, done, old_uids) = (sc.ns.clone(), done.clone(), old_uids.clone());
        let first = before.clone();
        std::thread::spawn(move || {
            let mut samples: Vec<(f64, StoreSample)> = vec![(0.0, first)];
            let deadline = Duration::from_secs(600);
            while started.elapsed() < deadline {
                let t = started.elapsed().as_secs_f64();
                if let Some(s) = store_sample(&ns) {
                    let finished = s.len() == 4
                        && s.iter().all(|p| !old_uids.contains(&p.2) && p.3)
                        && ["small-lun-0", "small-lun-1"]
                            .iter()
                            .all(|l| s.iter().any(|p| p.0 == *l && p.4 == "active"));
                    samples.push((t, s));
                    if finished {
                        break;
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            samples
        })
    };
    let mut sent = vec![];
    while !done.load(std::sync::atomic::Ordering::SeqCst) {
        // Mail for a mailbox on each LUN all along the roll (the mx queues what a store cannot take).
        for user in users {
            let subject = format!("e2e-roll-{}-{}", sent.len(), sc.ns);
            send_mail(&sc.ns, user, &subject);
            sent.push((user, subject));
        }
        std::thread::sleep(Duration::from_secs(3));
    }
    let samples = sampler.join().expect("sampler");
    let (last_t, last) = samples.last().cloned().unwrap();
    assert!(
        last.len() == 4 && last.iter().all(|p| !old_uids.contains(&p.2) && p.3),
        "the roll did not finish in {last_t:.0} s: {last:?}"
    );
    let took = last_t;

    // Never two pods of a LUN labelled active.
    for (t, s) in &samples {
        for lun in luns {
            let actives = s.iter().filter(|p| p.0 == lun && p.4 == "active").count();
            assert!(
                actives <= 1,
                "{lun} at {t:.1} s: {actives} active pods: {s:?}"
            );
        }
    }
    // When each initial pod was last seen, and when each LUN was first all new and ready.
    let last_seen = |uid: &str| {
        samples
            .iter()
            .rev()
            .find_map(|(t, s)| s.iter().find(|p| p.2 == uid).map(|p| (*t, p.clone())))
    };
    let first_gone = |lun: &str| {
        samples
            .iter()
            .find(|(_, s)| {
                before
                    .iter()
                    .filter(|p| p.0 == lun)
                    .any(|p| !s.iter().any(|q| q.2 == p.2))
            })
            .map(|(t, _)| *t)
            .unwrap_or(f64::INFINITY)
    };
    let all_new = |lun: &str| {
        samples
            .iter()
            .find(|(_, s)| {
                let pods: Vec<_> = s.iter().filter(|p| p.0 == lun).collect();
                pods.len() == 2 && pods.iter().all(|p| !old_uids.contains(&p.2) && p.3)
            })
            .map(|(t, _)| *t)
            .unwrap_or(f64::INFINITY)
    };
    let (lun0_done, lun1_start) = (all_new(luns[0]), first_gone(luns[1]));
    eprintln!(
        "roll: {took:.1} s; {} started at {:.1} s, all new at {lun0_done:.1} s; {} started at {lun1_start:.1} s, all new at {:.1} s",
        luns[0],
        first_gone(luns[0]),
        luns[1],
        all_new(luns[1])
    );
    assert!(
        lun1_start >= lun0_done,
        "{} began before {} was done",
        luns[1],
        luns[0]
    );
    for (lun, active_uid) in luns.iter().zip(&old_active) {
        let standby_uid = before
            .iter()
            .find(|p| p.0 == *lun && p.2 != *active_uid)
            .map(|p| p.2.clone())
            .unwrap();
        let (standby_last, _) = last_seen(&standby_uid).unwrap();
        let (active_last, as_seen) = last_seen(active_uid).unwrap();
        assert!(
            standby_last < active_last,
            "{lun}: the standby goes first ({standby_last:.1} s), the active last ({active_last:.1} s)"
        );
        assert_eq!(
            as_seen.4, "standby",
            "{lun}: the old active is replaced only once switched over: {as_seen:?}"
        );
    }
    // A store takes logins only once its agent has seen its `active` label through the downward API, which
    // the kubelet rewrites some time after the switchover labelled it; until then the imap proxy gets the
    // store's refusal (docs/operations.md). How long that took is printed, then every message is read.
    let settled = Instant::now();
    for user in users {
        wait_for(&format!("{user} to log in after the roll"), || {
            imap_login(&sc.ns, user)
        });
    }
    eprintln!(
        "roll: logins taken again {:.1} s after the roll ended",
        settled.elapsed().as_secs_f64()
    );
    for (user, subject) in &sent {
        wait_for(&format!("{subject} delivered to {user}"), || {
            imap_has(&sc.ns, user, subject)
        });
    }
    eprintln!(
        "roll: {} messages sent during the roll, all delivered",
        sent.len()
    );
    sc.wait_ready();
}

/// The rendered userdb of a store pod, as its agent wrote it from the tables the kubelet mounted.
fn store_userdb(ns: &str, pod: &str) -> Result<String, String> {
    kubectl(
        &[
            "exec",
            "-n",
            ns,
            pod,
            "--",
            "cat",
            "/var/lib/mailpod/dovecot/userdb",
        ],
        None,
    )
}

/// A removed address that is added again belongs to its new owner only, through the real kubelet's
/// ConfigMap updates: once both store replicas have read the removal and then the return, the address
/// logs in to an empty INBOX in its new home, new mail lands there on both replicas, and the previous
/// owner's message stays on the volume where it was, unseen.
#[test]
fn a_removed_and_re_added_address_starts_empty_and_the_old_mail_stays() {
    if !cluster_given("a_removed_and_re_added_address_starts_empty_and_the_old_mail_stays") {
        return;
    }
    let sc = Scenario::new("readd");
    sc.apply_small(5);
    sc.wait_ready();
    let prefix = format!("e2e-readd-{}-", sc.ns);
    let carol = "carol@example.com";
    let old = format!("{prefix}previous-owner");
    send_mail(&sc.ns, carol, &old);
    wait_for("carol's message", || {
        let got = imap_subjects(&sc.ns, carol, "INBOX", &prefix)?;
        (got == [old.clone()])
            .then_some(())
            .ok_or(format!("{got:?}"))
    });
    let stores = [format!("{LUN}-0"), format!("{LUN}-1")];
    let inline = |list: &[&str]| {
        kubectl(
            &[
                "patch",
                "-n",
                &sc.ns,
                "mailpod",
                MAILPOD,
                "--type=merge",
                "-p",
                &json!({"spec": {"mailboxes": {"inline": list}}}).to_string(),
            ],
            None,
        )
        .unwrap_or_else(|e| panic!("{e}"));
    };
    inline(&["alice@example.com", "bob@example.com"]);
    for pod in &stores {
        wait_for(&format!("{pod} to read the removal"), || {
            let u = store_userdb(&sc.ns, pod)?;
            (!u.contains(carol)).then_some(()).ok_or(u)
        });
    }
    inline(&["alice@example.com", "bob@example.com", carol]);
    wait_for("the LUN to record carol's incarnation", || {
        let lun = get_json(&sc.ns, &["storagelun", LUN]).ok_or("no LUN")?;
        let a = lun["metadata"]["annotations"]["mailpod.io/mailbox-incarnations"].clone();
        (a == json!(r#"{"carol@example.com":1}"#))
            .then_some(())
            .ok_or(a.to_string())
    });
    for pod in &stores {
        wait_for(&format!("{pod} to read the return"), || {
            let u = store_userdb(&sc.ns, pod)?;
            u.contains("/var/mail/store/.incarnation-1/example.com/carol")
                .then_some(())
                .ok_or(u)
        });
    }
    wait_for("carol to log in to an empty INBOX", || {
        let got = imap_subjects(&sc.ns, carol, "INBOX", &prefix)?;
        got.is_empty().then_some(()).ok_or(format!("{got:?}"))
    });
    let new = format!("{prefix}new-owner");
    send_mail(&sc.ns, carol, &new);
    wait_for("the new owner's message", || {
        let got = imap_subjects(&sc.ns, carol, "INBOX", &prefix)?;
        (got == [new.clone()])
            .then_some(())
            .ok_or(format!("{got:?}"))
    });
    for pod in &stores {
        wait_for(&format!("the new home on {pod}"), || {
            kubectl(
                &[
                    "exec",
                    "-n",
                    &sc.ns,
                    pod,
                    "--",
                    "grep",
                    "-rlF",
                    &new,
                    "/var/mail/store/.incarnation-1/example.com/carol/Maildir",
                ],
                None,
            )
            .map(|_| ())
        });
        let legacy = kubectl(
            &[
                "exec",
                "-n",
                &sc.ns,
                pod,
                "--",
                "grep",
                "-rlF",
                &old,
                "/var/mail/store/example.com/carol/Maildir",
            ],
            None,
        );
        assert!(
            legacy.is_ok(),
            "the previous owner's message stays on {pod}: {legacy:?}"
        );
    }
}
