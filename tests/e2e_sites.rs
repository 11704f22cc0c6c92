//! Site failover against real API servers (e2e/sites-up.sh): the local cluster is the primary site `e2e`, with
//! its data plane and its operator in the cluster; `west` is a standby site's control plane (API server and
//! controller manager, no node) whose operator runs on the host as the chart's ServiceAccount; a third API
//! server holds the witness Lease. Both sites reach each other through kubeconfigs with the peer identity
//! docs/security.md prescribes, and the witness through a Lease-only identity, as docs/install.md says.
//!
//! The local cluster has no load-balancer implementation; the test plays that part for the primary's `mx`
//! Service, writing an address into its `status.loadBalancer` (kube-proxy then routes it), which is what the
//! standby's probes connect to. The west site has no node, so it runs no mail pods: what happens to mail on
//! the standby's side (its stores pulling the primary's mail, delivery after promotion, the resync a
//! failback waits for) is not covered here; tests/failover_sites.rs covers it against the in-memory API.
//!
//! Skipped without the sites' settings (the `export` lines e2e/sites-up.sh prints); with
//! `MAILPOD_E2E_REQUIRED=1` a missing setting fails instead.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod e2e_support;
use e2e_support::*;

const MAILPOD: &str = "small";
const LUN: &str = "small-lun-0";
const SF: &str = "small-geo";
const PRIMARY: &str = "e2e";
const STANDBY: &str = "west";
/// The address the test's stand-in load balancer gives the primary's mx Service (on the node's bridge).
const MX_LB_IP: &str = "10.244.0.240";
const PROBE_INTERVAL: u64 = 5;
const LEASE_SECONDS: u64 = 20;

/// The sites of e2e/sites-up.sh.
struct Sites {
    west: String,
    witness: String,
    west_server: String,
    witness_server: String,
    primary_server: String,
    ca: String,
    ns: String,
    witness_ns: String,
}

fn sites_given(test: &str) -> Option<Sites> {
    if !cluster_given(test) {
        return None;
    }
    let get = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let keys = [
        "MAILPOD_E2E_WEST_KUBECONFIG",
        "MAILPOD_E2E_WITNESS_KUBECONFIG",
        "MAILPOD_E2E_WEST_SERVER",
        "MAILPOD_E2E_WITNESS_SERVER",
        "MAILPOD_E2E_PRIMARY_SERVER",
        "MAILPOD_E2E_CA_FILE",
    ];
    if let Some(missing) = keys.iter().find(|k| get(k).is_none()) {
        assert!(
            std::env::var("MAILPOD_E2E_REQUIRED").as_deref() != Ok("1"),
            "{test}: MAILPOD_E2E_REQUIRED=1 but {missing} is not set; run e2e/sites-up.sh and export what it prints"
        );
        eprintln!("SKIPPED {test}: {missing} is not set (run e2e/sites-up.sh; see e2e/README.md)");
        return None;
    }
    let suffix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        % 100_000;
    Some(Sites {
        west: get(keys[0]).unwrap(),
        witness: get(keys[1]).unwrap(),
        west_server: get(keys[2]).unwrap(),
        witness_server: get(keys[3]).unwrap(),
        primary_server: get(keys[4]).unwrap(),
        ca: get(keys[5]).unwrap(),
        ns: format!("mailpod-e2e-sites-{suffix}"),
        witness_ns: format!("mailpod-witness-{suffix}"),
    })
}

/// Runs one of the e2e scripts (component.sh, partition.sh) with `args`.
fn script(name: &str, args: &[&str]) {
    let path = format!("{}/e2e/{name}", env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("bash")
        .arg(&path)
        .args(args)
        .output()
        .expect("run bash");
    assert!(
        out.status.success(),
        "{name} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Everything the scenario changed, undone when it ends (also when it fails): the cut healed, the primary's
/// API server running, the namespaces deleted in all three clusters.
struct Cleanup<'a>(&'a Sites);

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        script("partition.sh", &["heal"]);
        script("component.sh", &["start", "kube-apiserver"]);
        let _ = wait_until("the primary's API server", 120, || {
            kubectl(&["get", "--raw", "/readyz"], None).map(|_| ())
        });
        if std::env::var("MAILPOD_E2E_KEEP").as_deref() == Ok("1") {
            eprintln!("keeping namespace {} (MAILPOD_E2E_KEEP=1)", self.0.ns);
            return;
        }
        let s = self.0;
        let del = ["delete", "namespace", "--wait=true", "--timeout=300s"];
        let _ = kubectl_at(&s.west, &[&del[..], &[s.ns.as_str()]].concat(), None);
        let _ = kubectl_at(
            &s.witness,
            &[&del[..], &[s.witness_ns.as_str()]].concat(),
            None,
        );
        let _ = kubectl(&[&del[..], &[s.ns.as_str()]].concat(), None);
    }
}

/// Polls `check` once a second for at most `seconds`; Err with the last observation when time is up.
fn wait_until<T>(
    what: &str,
    seconds: u64,
    mut check: impl FnMut() -> Result<T, String>,
) -> Result<T, String> {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    loop {
        match check() {
            Ok(v) => return Ok(v),
            Err(last) if Instant::now() > deadline => {
                return Err(format!("{what} not within {seconds} s; last: {last}"))
            }
            Err(_) => std::thread::sleep(Duration::from_secs(1)),
        }
    }
}

/// A kubeconfig for `server` with a ServiceAccount token, as a user would hand to the other site.
fn token_kubeconfig(s: &Sites, server: &str, token: &str) -> String {
    let ca = run("base64", &["-w0", &s.ca], None).unwrap_or_else(|e| panic!("{e}"));
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {server}\n    \
         certificate-authority-data: {ca}\nusers:\n- name: u\n  user:\n    token: {token}\ncontexts:\n- name: c\n  \
         context: {{cluster: c, user: u}}\ncurrent-context: c\n"
    )
}

/// Applies `docs` (JSON objects) to the cluster `kubeconfig` names (None: the primary's).
fn apply(kubeconfig: Option<&str>, docs: &[Value]) {
    for doc in docs {
        let text = doc.to_string();
        let args = ["apply", "-f", "-"];
        match kubeconfig {
            Some(k) => kubectl_at(k, &args, Some(&text)),
            None => kubectl(&args, Some(&text)),
        }
        .unwrap_or_else(|e| panic!("{e}"));
    }
}

/// The peer identity of docs/security.md in `ns` of one cluster: a ServiceAccount bound to exactly the
/// Role the docs list. Returns a token for it.
fn peer_identity(kubeconfig: Option<&str>, ns: &str) -> String {
    let rules = json!([
        {"apiGroups": ["mailpod.io"], "resources": ["sitefailovers"], "verbs": ["get", "patch"]},
        {"apiGroups": ["mailpod.io"], "resources": ["sitefailovers/status"], "verbs": ["get", "update"]},
        {"apiGroups": ["mailpod.io"], "resources": ["mailpods"], "verbs": ["get"]},
        {"apiGroups": ["mailpod.io"], "resources": ["storageluns"], "verbs": ["get", "list", "patch"]},
        {"apiGroups": [""], "resources": ["services"], "verbs": ["get", "list"]},
        {"apiGroups": [""], "resources": ["configmaps", "secrets"], "verbs": ["get"]},
        {"apiGroups": ["externaldns.k8s.io"], "resources": ["dnsendpoints"], "verbs": ["list", "delete"]},
    ]);
    identity(kubeconfig, ns, "mailpod-peer", rules)
}

/// A ServiceAccount `name` in `ns` bound to a Role with `rules`; returns a token for it.
fn identity(kubeconfig: Option<&str>, ns: &str, name: &str, rules: Value) -> String {
    apply(
        kubeconfig,
        &[
            json!({"apiVersion": "v1", "kind": "ServiceAccount",
                   "metadata": {"name": name, "namespace": ns}}),
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                   "metadata": {"name": name, "namespace": ns}, "rules": rules}),
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                   "metadata": {"name": name, "namespace": ns},
                   "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
                   "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ns}]}),
        ],
    );
    let args = ["create", "token", name, "-n", ns, "--duration", "2h"];
    match kubeconfig {
        Some(k) => kubectl_at(k, &args, None),
        None => kubectl(&args, None),
    }
    .unwrap_or_else(|e| panic!("{e}"))
    .trim()
    .to_string()
}

fn secret(ns: &str, name: &str, kubeconfig: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": ns},
           "stringData": {"kubeconfig": kubeconfig}})
}

fn site_failover(s: &Sites, local: &str, peer: &str, peer_secret: &str) -> Value {
    json!({
        "apiVersion": "mailpod.io/v1alpha1", "kind": "SiteFailover",
        "metadata": {"name": SF, "namespace": s.ns},
        "spec": {
            "mailPods": [MAILPOD],
            "localSite": local,
            "primarySite": PRIMARY,
            "peer": {"name": peer, "namespace": s.ns,
                     "kubeconfigSecret": {"name": peer_secret, "key": "kubeconfig"}},
            "detection": {"probeIntervalSeconds": PROBE_INTERVAL, "failureThreshold": 3, "probeTimeoutSeconds": 2},
            "policy": {"automaticFailover": true},
            "witness": {"kubeconfigSecret": {"name": "witness-kubeconfig", "key": "kubeconfig"},
                        "namespace": s.witness_ns, "leaseDurationSeconds": LEASE_SECONDS},
            "targets": {"rtoSeconds": 60, "rpoSeconds": 30},
        }
    })
}

/// A small MailPod for the primary (as examples/mailpod-small.yaml, with one replica per front end): no TLS,
/// a passwd Secret, the e2e storage class, mx behind a LoadBalancer Service.
fn small_mailpod(ns: &str) -> Vec<Value> {
    let mailboxes = ["alice@example.com", "bob@example.com"];
    let passwd: String = mailboxes
        .iter()
        .map(|m| format!("{m}:{{PLAIN}}{PASSWORD}\n"))
        .collect();
    vec![
        json!({"apiVersion": "v1", "kind": "Secret",
               "metadata": {"name": "small-passwd", "namespace": ns},
               "stringData": {"passwd": passwd}}),
        json!({"apiVersion": "mailpod.io/v1alpha1", "kind": "MailPod",
        "metadata": {"name": MAILPOD, "namespace": ns},
        "spec": {
            "domains": ["example.com"],
            // The sites' networks are this machine's own; TLS is tests/e2e.rs's front-end scenario.
            "insecurePlaintextAuth": true,
            "mailboxes": {"inline": mailboxes,
                          "passwdFileSecret": {"name": "small-passwd", "key": "passwd"}},
            "accessTables": {"aliases": [{"address": "postmaster@example.com",
                                          "targets": ["alice@example.com"]}]},
            "backend": {"lunTemplate": {"capacity": "1Gi",
                        "storageClassName": setting("MAILPOD_E2E_STORAGE_CLASS", "csi-hostpath-sc")}},
            "frontend": {"mx": {"replicas": 1, "serviceType": "LoadBalancer"},
                         "submission": {"replicas": 1}, "imap": {"replicas": 1}},
            // Signed mail: the standby must hold the primary's keys, whose records are published.
            "dkim": {},
        }}),
    ]
}

fn status_of_mailpod(kubeconfig: Option<&str>, ns: &str) -> Result<Value, String> {
    let v = match kubeconfig {
        Some(k) => get_json_at(k, ns, &["mailpod", MAILPOD]),
        None => get_json(ns, &["mailpod", MAILPOD]),
    }
    .ok_or("MailPod unreadable")?;
    Ok(v["status"].clone())
}

fn status_of(kubeconfig: Option<&str>, ns: &str) -> Result<Value, String> {
    let v = match kubeconfig {
        Some(k) => get_json_at(k, ns, &["sitefailover", SF]),
        None => get_json(ns, &["sitefailover", SF]),
    }
    .ok_or("SiteFailover unreadable")?;
    Ok(v["status"].clone())
}

fn lun_fenced(kubeconfig: Option<&str>, ns: &str) -> Result<bool, String> {
    let v = match kubeconfig {
        Some(k) => get_json_at(k, ns, &["storagelun", LUN]),
        None => get_json(ns, &["storagelun", LUN]),
    }
    .ok_or("StorageLUN unreadable")?;
    Ok(v["spec"]["fenced"].as_bool().unwrap_or(false))
}

/// The primary's store pods labelled active: its writers.
fn primary_writers(ns: &str) -> Result<usize, String> {
    let v = get_json(
        ns,
        &[
            "pods",
            "-l",
            &format!("mailpod.io/lun={LUN},mailpod.io/role=active"),
        ],
    )
    .ok_or("pods unreadable")?;
    Ok(v["items"].as_array().map_or(0, Vec::len))
}

fn lease_holder(s: &Sites) -> Result<(String, String), String> {
    let v = get_json_at(
        &s.witness,
        &s.witness_ns,
        &["lease", &format!("sitefailover-{SF}")],
    )
    .ok_or("no Lease")?;
    Ok((
        v["spec"]["holderIdentity"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        v["spec"]["renewTime"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    ))
}

/// Container restarts of the primary's operator pods (the chart's Deployment).
fn operator_restarts() -> i64 {
    let v = get_json(
        &setting("MAILPOD_E2E_OPERATOR_NAMESPACE", "mailpod-system"),
        &["pods", "-l", "app.kubernetes.io/name=mailpod-operator"],
    )
    .expect("operator pods");
    v["items"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| {
            p["status"]["containerStatuses"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .map(|c| c["restartCount"].as_i64().unwrap_or(0))
        .sum()
}

fn since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}

#[test]
fn a_lost_primary_site_is_replaced_by_the_standby_and_fenced_when_it_returns() {
    let Some(s) =
        sites_given("a_lost_primary_site_is_replaced_by_the_standby_and_fenced_when_it_returns")
    else {
        return;
    };
    let west = Some(s.west.as_str());
    let started = jiff::Timestamp::now();
    must(&["create", "namespace", &s.ns]);
    let _cleanup = Cleanup(&s);
    must(&[
        "label",
        "namespace",
        &s.ns,
        "pod-security.kubernetes.io/enforce=baseline",
    ]);
    kubectl_at(&s.west, &["create", "namespace", &s.ns], None).unwrap();
    kubectl_at(&s.witness, &["create", "namespace", &s.witness_ns], None).unwrap();

    // Credentials as the docs describe them: each site reads the other through the peer identity, and both
    // keep the Lease through a Lease-only identity in the witness cluster.
    let to_west = token_kubeconfig(&s, &s.west_server, &peer_identity(west, &s.ns));
    let to_primary = token_kubeconfig(&s, &s.primary_server, &peer_identity(None, &s.ns));
    let witness_token = identity(
        Some(&s.witness),
        &s.witness_ns,
        "mailpod-witness",
        json!([{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                "verbs": ["get", "create", "update"]}]),
    );
    let to_witness = token_kubeconfig(&s, &s.witness_server, &witness_token);
    apply(
        None,
        &[
            secret(&s.ns, "west-kubeconfig", &to_west),
            secret(&s.ns, "witness-kubeconfig", &to_witness),
        ],
    );
    apply(
        west,
        &[
            secret(&s.ns, "e2e-kubeconfig", &to_primary),
            secret(&s.ns, "witness-kubeconfig", &to_witness),
        ],
    );

    // The primary serves the small MailPod; the stand-in load balancer gives its mx an address.
    apply(None, &small_mailpod(&s.ns));
    wait_for("MailPod small Ready=True at the primary", || {
        let mp = get_json(&s.ns, &["mailpod", MAILPOD]).ok_or("no MailPod")?;
        condition(&mp, "Ready")
            .filter(|c| c == "True")
            .ok_or_else(|| format!("conditions: {}", mp["status"]["conditions"]))
    });
    must(&[
        "patch",
        "service",
        &format!("{MAILPOD}-mx"),
        "-n",
        &s.ns,
        "--subresource=status",
        "--type=merge",
        "-p",
        &json!({"status": {"loadBalancer": {"ingress": [{"ip": MX_LB_IP}]}}}).to_string(),
    ]);
    let mx_lb: std::net::SocketAddr = format!("{MX_LB_IP}:25").parse().unwrap();
    wait_for("the mx load-balancer address to answer", || {
        std::net::TcpStream::connect_timeout(&mx_lb, Duration::from_secs(2))
            .map(|_| ())
            .map_err(|e| e.to_string())
    });

    apply(
        None,
        &[site_failover(&s, PRIMARY, STANDBY, "west-kubeconfig")],
    );
    apply(
        west,
        &[site_failover(&s, STANDBY, PRIMARY, "e2e-kubeconfig")],
    );

    // Paired: the primary active at epoch 1 holding the Lease; the standby follows with the mirrored
    // MailPod, its LUN fenced, the same access tables.
    wait_for("the primary active at epoch 1, in quorum", || {
        let st = status_of(None, &s.ns)?;
        (st["activeSite"] == PRIMARY && st["epoch"] == 1 && st["fenced"] != true)
            .then_some(())
            .ok_or_else(|| st.to_string())
    });
    wait_for(
        "the standby following with its LUN fenced and tables in sync",
        || {
            let st = status_of(west, &s.ns)?;
            let fenced = lun_fenced(west, &s.ns)?;
            (st["activeSite"] == PRIMARY
                && st["epoch"] == 1
                && st["accessTablesInSync"] == true
                && fenced)
                .then_some(())
                .ok_or_else(|| format!("LUN fenced: {fenced}; status {st}"))
        },
    );
    let mirrored = get_json_at(&s.west, &s.ns, &["mailpod", MAILPOD]).expect("mirrored MailPod");
    assert_eq!(
        mirrored["metadata"]["annotations"]["mailpod.io/mirrored-from"], PRIMARY,
        "{mirrored}"
    );
    // Both sites' replicas share the primary's doveadm password (the standby's own is replaced).
    wait_for(
        "the standby holding the primary's replication password",
        || {
            let secret = format!("{LUN}-replication");
            let ours = get_json(&s.ns, &["secret", &secret]).ok_or("no Secret at the primary")?;
            let theirs = get_json_at(&s.west, &s.ns, &["secret", &secret])
                .ok_or("no Secret at the standby")?;
            (ours["data"] == theirs["data"])
                .then_some(())
                .ok_or_else(|| "the passwords differ".to_string())
        },
    );
    // And the primary's DKIM keys: a promoted standby signs with the keys whose records are published.
    wait_for("the standby holding the primary's DKIM keys", || {
        let secret = format!("{MAILPOD}-dkim");
        let ours = get_json(&s.ns, &["secret", &secret]).ok_or("no DKIM Secret at the primary")?;
        let theirs = get_json_at(&s.west, &s.ns, &["secret", &secret])
            .ok_or("no DKIM Secret at the standby")?;
        let records = |kubeconfig: Option<&str>| {
            status_of_mailpod(kubeconfig, &s.ns).map(|st| st["dkim"].clone())
        };
        let (east_records, west_records) = (records(None)?, records(west)?);
        (ours["data"] == theirs["data"]
            && east_records.as_array().is_some_and(|r| !r.is_empty())
            && east_records == west_records)
            .then_some(())
            .ok_or_else(|| {
                format!(
                    "keys equal: {}; records {east_records} / {west_records}",
                    ours["data"] == theirs["data"]
                )
            })
    });
    wait_for("the witness Lease held by the primary", || {
        let (holder, _) = lease_holder(&s)?;
        (holder == PRIMARY).then_some(()).ok_or(holder)
    });
    assert!(!lun_fenced(None, &s.ns).unwrap());

    // 0. A promotion asked while the primary's front ends answer is refused: two sites would write.
    plugin_at(&s.west, &["promote", SF, "-n", &s.ns]);
    wait_for("PromoteRefused at the standby", || {
        let ev = get_json_at(
            &s.west,
            &s.ns,
            &["events", "--field-selector", "reason=PromoteRefused"],
        )
        .ok_or("events unreadable")?;
        (!ev["items"].as_array().unwrap().is_empty())
            .then_some(())
            .ok_or("no PromoteRefused Event yet".to_string())
    });
    let st = status_of(west, &s.ns).unwrap();
    assert_eq!(st["activeSite"], PRIMARY, "{st}");
    assert!(lun_fenced(west, &s.ns).unwrap());
    assert!(!lun_fenced(None, &s.ns).unwrap());

    // 1. The primary's API server stops; its data plane goes on. The standby's probes of the front ends
    //    succeed, so it does not promote: a site whose mail flows is never replaced for losing its API.
    // Addresses read while the API server answers: the Services keep routing without it.
    let direct = |service: &str, port: u16| {
        ServicePort::from(
            format!("{}:{port}", cluster_ip(&s.ns, service))
                .parse::<std::net::SocketAddr>()
                .unwrap(),
        )
    };
    let (mx, imap) = (direct("small-mx", 25), direct("small-imap", 143));
    let restarts = operator_restarts();
    script("component.sh", &["stop", "kube-apiserver"]);
    let down = Instant::now();
    send_mail_via(
        &mx,
        "alice@example.com",
        "sent while the primary's API is down",
    );
    wait_until("mail delivered without the API server", 60, || {
        imap_has_via(
            &imap,
            "alice@example.com",
            "sent while the primary's API is down",
        )
    })
    .unwrap();
    let quiet_for = LEASE_SECONDS + 4 * PROBE_INTERVAL;
    while down.elapsed() < Duration::from_secs(quiet_for) {
        let st = status_of(west, &s.ns).unwrap();
        assert_eq!(
            st["activeSite"], PRIMARY,
            "the standby promoted itself: {st}"
        );
        assert_ne!(st["phase"], "FailingOver", "{st}");
        std::thread::sleep(Duration::from_secs(2));
    }
    eprintln!(
        "API loss: no promotion in {:.0} s with the primary's front ends answering",
        since(down)
    );
    script("component.sh", &["start", "kube-apiserver"]);
    wait_until("the primary's API server back", 120, || {
        kubectl(&["get", "--raw", "/readyz"], None).map(|_| ())
    })
    .unwrap();
    let back = Instant::now();
    // Its operator lost the leader Lease with the API and restarts; it is back when it renews the witness.
    let (_, renewed) = lease_holder(&s).unwrap();
    let (holder, _) = wait_until("the primary renewing the witness Lease again", 180, || {
        let (h, t) = lease_holder(&s)?;
        if t != renewed && h == PRIMARY {
            Ok((h, t))
        } else {
            Err(format!("{h} {t}"))
        }
    })
    .unwrap();
    eprintln!(
        "API back: the primary renews the witness Lease after {:.0} s",
        since(back)
    );
    assert_eq!(holder, PRIMARY);
    // The operator stepped down and campaigned again in the same process: no crash, no restart back-off.
    assert_eq!(
        operator_restarts(),
        restarts,
        "the primary's operator restarted"
    );
    wait_for("the primary in quorum again", || {
        let st = status_of(None, &s.ns)?;
        (st["activeSite"] == PRIMARY && st["fenced"] != true && !lun_fenced(None, &s.ns)?)
            .then_some(())
            .ok_or_else(|| st.to_string())
    });

    // 2. The primary is cut off from the standby and the witness (its API and front ends unreachable from
    //    the standby; the standby and the witness unreachable from it). It must stop writing before the
    //    standby takes over.
    script("partition.sh", &["isolate-primary", MX_LB_IP]);
    let cut = Instant::now();
    let (mut primary_fenced_at, mut promoted_at, mut west_unfenced_at) = (None, None, None);
    let mut both = vec![];
    let limit = Duration::from_secs(LEASE_SECONDS + 6 * PROBE_INTERVAL + 30);
    while cut.elapsed() < limit && (primary_fenced_at.is_none() || west_unfenced_at.is_none()) {
        let writers = primary_writers(&s.ns).unwrap_or(usize::MAX);
        let primary_lun_fenced = lun_fenced(None, &s.ns).unwrap_or(false);
        if primary_fenced_at.is_none() && primary_lun_fenced && writers == 0 {
            primary_fenced_at = Some(since(cut));
        }
        let st = status_of(west, &s.ns).unwrap_or_default();
        if promoted_at.is_none() && st["activeSite"] == STANDBY {
            promoted_at = Some(since(cut));
        }
        let west_fenced = lun_fenced(west, &s.ns).unwrap_or(true);
        if west_unfenced_at.is_none() && !west_fenced {
            west_unfenced_at = Some(since(cut));
        }
        if !west_fenced && writers != 0 {
            both.push(format!(
                "{:.1} s: {writers} active store(s) at the primary",
                since(cut)
            ));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let st = status_of(west, &s.ns).unwrap();
    eprintln!(
        "isolated primary: fenced itself at {primary_fenced_at:?} s, standby promoted at {promoted_at:?} s, \
         its LUN unfenced at {west_unfenced_at:?} s after the cut; recorded {}",
        st["lastFailover"]
    );
    let fenced_at = primary_fenced_at.expect("the isolated primary fenced itself");
    let unfenced_at = west_unfenced_at.expect("the standby promoted itself and unfenced its LUN");
    assert!(both.is_empty(), "two writers: {both:?}");
    assert!(
        fenced_at < unfenced_at,
        "fenced at {fenced_at} s, standby serving at {unfenced_at} s"
    );
    assert_eq!(st["activeSite"], STANDBY, "{st}");
    assert_eq!(st["epoch"], 2, "{st}");
    assert_eq!(st["lastFailover"]["kind"], "failover", "{st}");
    // docs/failover-runbook.md: with a witness the standby promotes once its probes have failed and the Lease
    // has stood still for leaseDurationSeconds, each observed on a tick.
    let rto = st["lastFailover"]["rtoSeconds"]
        .as_f64()
        .expect("rtoSeconds");
    assert!(
        rto <= (LEASE_SECONDS + 2 * PROBE_INTERVAL) as f64,
        "RTO {rto} s over the documented bound"
    );
    let (holder, _) = lease_holder(&s).unwrap();
    assert_eq!(holder, STANDBY);

    // 3. The cut heals: the old primary sees the higher epoch and stays fenced; it serves nothing.
    script("partition.sh", &["heal"]);
    wait_for("the old primary following epoch 2, fenced", || {
        let st = status_of(None, &s.ns)?;
        (st["activeSite"] == STANDBY && st["epoch"] == 2 && lun_fenced(None, &s.ns)?)
            .then_some(())
            .ok_or_else(|| st.to_string())
    });
    for _ in 0..(3 * PROBE_INTERVAL) {
        assert_eq!(
            primary_writers(&s.ns).unwrap(),
            0,
            "the old primary serves again"
        );
        assert!(lun_fenced(None, &s.ns).unwrap());
        std::thread::sleep(Duration::from_secs(1));
    }
    wait_for("the standby seeing its peer again", || {
        let st = status_of(west, &s.ns)?;
        (st["peerReachable"] == true && st["activeSite"] == STANDBY)
            .then_some(())
            .ok_or_else(|| st.to_string())
    });

    // 4. A failback asked now does not move the roles: the west site has no stores, so nothing can resync
    //    (docs/failover-runbook.md, "Failing back"). Either it waits for the resync (`FailbackWaiting`), or,
    //    when the old primary's lag still reads within spec.targets.rpoSeconds, it pauses delivery, waits
    //    for the final sync for spec.targets.rtoSeconds, gives up and resumes (`FailbackAborted`).
    plugin_at(&s.west, &["failback", SF, "-n", &s.ns]);
    let reason = wait_for("the failback held back at the active site", || {
        for reason in ["FailbackWaiting", "FailbackAborted"] {
            let ev = get_json_at(
                &s.west,
                &s.ns,
                &["events", "--field-selector", &format!("reason={reason}")],
            )
            .ok_or("events unreadable")?;
            if !ev["items"].as_array().unwrap().is_empty() {
                return Ok(reason);
            }
        }
        Err("neither FailbackWaiting nor FailbackAborted yet".to_string())
    });
    eprintln!("failback request: {reason}");
    let st = status_of(west, &s.ns).unwrap();
    assert_eq!(st["activeSite"], STANDBY, "{st}");
    assert_eq!(st["epoch"], 2, "{st}");
    assert!(lun_fenced(None, &s.ns).unwrap());
    wait_for(
        "the active site serving again after the failback gave up",
        || {
            (!lun_fenced(west, &s.ns)?)
                .then_some(())
                .ok_or_else(|| "the standby's LUN is fenced".to_string())
        },
    );

    // Every request of the operators and of the peer identities was allowed: the chart's RBAC and the
    // documented peer Role are enough for all of the above.
    let sa = |ns: &str, name: &str| format!("system:serviceaccount:{ns}:{name}");
    let users = [
        sa("mailpod-system", "mailpod-operator"),
        sa(&s.ns, "mailpod-peer"),
    ];
    for (site, log) in [
        ("primary", std::env::var("MAILPOD_E2E_AUDIT_LOG").ok()),
        ("west", std::env::var("MAILPOD_E2E_WEST_AUDIT_LOG").ok()),
    ] {
        match log {
            Some(log) => {
                let r = refused(&log, |u| users.iter().any(|x| x == u), started);
                assert!(r.is_empty(), "refused at the {site} site: {r:#?}");
            }
            None => eprintln!("no audit log for the {site} site: RBAC refusals not checked"),
        }
    }
}

/// Runs the kubectl plugin built from this crate against the cluster `kubeconfig` names.
fn plugin_at(kubeconfig: &str, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_kubectl-mailpod"))
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .output()
        .expect("run kubectl-mailpod");
    assert!(
        out.status.success(),
        "kubectl mailpod {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
