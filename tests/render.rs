//! `mailpod-operator render`: the examples render, golden output shows reviewers what reaches the cluster,
//! placement read back from StorageLUNs stays stable, and bad input exits 2 naming file, object and field.
//!
//! Regenerate golden files with `MAILPOD_UPDATE_GOLDEN=1 cargo test --test render`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_yaml::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn render(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mailpod-operator"))
        .arg("render")
        .args(args)
        .current_dir(root())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    child.wait_with_output().unwrap()
}

fn docs(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| <Value as serde::Deserialize>::deserialize(d).unwrap())
        .collect()
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn golden(name: &str, actual: &str) {
    let path = root().join("tests/golden").join(name);
    if std::env::var_os("MAILPOD_UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_default();
    if want != actual {
        let first = want
            .lines()
            .zip(actual.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(want.lines().count().min(actual.lines().count()));
        panic!(
            "{} differs from render output at line {}: run MAILPOD_UPDATE_GOLDEN=1 cargo test --test render and review the diff",
            path.display(),
            first + 1
        );
    }
}

#[test]
fn small_example_matches_golden() {
    let out = render(&["-f", "examples/mailpod-small.yaml"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let yaml = String::from_utf8(out.stdout).unwrap();
    golden("render-small.yaml", &yaml);
    let d = docs(&yaml);
    // mx, submission, imap at 2 replicas by default; pop3 and webmail off.
    let sts: Vec<&str> = of_kind(&d, "StatefulSet")
        .iter()
        .map(|s| s["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        sts,
        ["small-lun-0", "small-mx", "small-submission", "small-imap"]
    );
    for o in &d {
        let owners = o["metadata"]["ownerReferences"].as_sequence().unwrap();
        assert_eq!(
            owners.len(),
            1,
            "{}",
            o["metadata"]["name"].as_str().unwrap()
        );
        assert_eq!(owners[0]["controller"], true);
    }
}

fn mailbox_luns(docs: &[Value]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for lun in of_kind(docs, "StorageLUN") {
        for m in lun["spec"]["mailboxes"].as_sequence().unwrap() {
            out.insert(
                m.as_str().unwrap().to_string(),
                lun["metadata"]["name"].as_str().unwrap().to_string(),
            );
        }
    }
    out
}

#[test]
fn corp_example_places_2501_mailboxes_on_three_luns() {
    let out = render(
        &[
            "-f",
            "examples/mailpod-corp.yaml",
            "-f",
            "examples/sitefailover.yaml",
        ],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let d = docs(&String::from_utf8(out.stdout).unwrap());
    let luns = of_kind(&d, "StorageLUN");
    let sizes: Vec<usize> = luns
        .iter()
        .map(|l| l["spec"]["mailboxes"].as_sequence().unwrap().len())
        .collect();
    assert_eq!(sizes, [1000, 1000, 501]);
    // Every LUN's chain is rendered: store StatefulSet with 1 + 1 replicas, active Service, snapshot CronJob.
    for i in 0..3 {
        let name = format!("corp-lun-{i}");
        let sts = d
            .iter()
            .find(|o| o["kind"] == "StatefulSet" && o["metadata"]["name"] == name.as_str())
            .unwrap_or_else(|| panic!("no StatefulSet {name}"));
        assert_eq!(sts["spec"]["replicas"], 2);
        assert_eq!(
            sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"],
            "200Gi"
        );
        assert!(d.iter().any(|o| o["kind"] == "CronJob"
            && o["metadata"]["name"] == format!("{name}-snapshot").as_str()));
        let svc = d
            .iter()
            .find(|o| o["kind"] == "Service" && o["metadata"]["name"] == name.as_str())
            .unwrap();
        assert_eq!(svc["spec"]["selector"]["mailpod.io/role"], "active");
    }
    let tables = d
        .iter()
        .find(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"] == "corp-access-tables")
        .unwrap();
    assert_eq!(
        tables["data"]["mailboxes"]
            .as_str()
            .unwrap()
            .lines()
            .count(),
        2501
    );
    assert!(tables["data"]["relay_domains"]
        .as_str()
        .unwrap()
        .contains("legacy.corp.example [mail.legacy.corp.example]:25"));
    // Every mail service is exposed with the client's address kept.
    for svc in ["corp-mx", "corp-submission", "corp-imap", "corp-pop3"] {
        let s = d
            .iter()
            .find(|o| o["kind"] == "Service" && o["metadata"]["name"] == svc)
            .unwrap();
        assert_eq!(s["spec"]["type"], "LoadBalancer");
        assert_eq!(s["spec"]["externalTrafficPolicy"], "Local");
    }
}

/// Render the corp example, then render again with its StorageLUNs as the current placement and a changed
/// mailbox list: nobody moves, freed slots are reused, and no LUN exceeds 1,000.
#[test]
fn placement_read_back_from_storageluns_is_stable() {
    let first = render(&["-f", "examples/mailpod-corp.yaml"], None);
    let d1 = docs(&String::from_utf8(first.stdout).unwrap());
    let before = mailbox_luns(&d1);
    let mut luns_yaml = String::new();
    for l in of_kind(&d1, "StorageLUN") {
        luns_yaml.push_str("---\n");
        luns_yaml.push_str(&serde_yaml::to_string(l).unwrap());
    }
    let example = std::fs::read_to_string(root().join("examples/mailpod-corp.yaml")).unwrap();
    // Remove every 10th mailbox and add 300 new ones.
    let mut changed = String::new();
    let mut n = 0;
    for line in example.lines() {
        if line.starts_with("    ") && line.contains('@') && !line.contains(':') {
            n += 1;
            if n % 10 == 0 {
                continue;
            }
        }
        changed.push_str(line);
        changed.push('\n');
    }
    for i in 0..300 {
        changed.push_str(&format!("    new{i:03}@labs.corp.example\n"));
    }
    let dir = tempfile::tempdir().unwrap();
    let mp = dir.path().join("corp.yaml");
    std::fs::write(&mp, changed).unwrap();
    let luns = dir.path().join("luns.yaml");
    std::fs::write(&luns, luns_yaml).unwrap();
    let second = render(&["-f", p(&mp), "-f", p(&luns)], None);
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    let d2 = docs(&String::from_utf8(second.stdout).unwrap());
    let after = mailbox_luns(&d2);
    let mut kept = 0;
    for (m, lun) in &after {
        if let Some(old) = before.get(m) {
            assert_eq!(old, lun, "{m} moved");
            kept += 1;
        }
    }
    assert_eq!(kept, 2501 - 250);
    assert_eq!(after.len(), 2501 - 250 + 300);
    let sizes: Vec<usize> = of_kind(&d2, "StorageLUN")
        .iter()
        .map(|l| l["spec"]["mailboxes"].as_sequence().unwrap().len())
        .collect();
    assert_eq!(
        sizes.len(),
        3,
        "freed slots are reused before a new LUN is made: {sizes:?}"
    );
    assert!(sizes.iter().all(|s| *s <= 1000));
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn assert_rejected(out: &Output, needles: &[&str]) {
    assert_eq!(
        out.status.code(),
        Some(2),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.is_empty(), "nothing on stdout on error");
    let err = String::from_utf8_lossy(&out.stderr);
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}:\n{err}");
    }
}

const MP: &str = "apiVersion: mailpod.io/v1alpha1\nkind: MailPod\nmetadata:\n  name: bad\n";

#[test]
fn invalid_input_names_file_object_and_field() {
    let out = render(
        &["-f", "-"],
        Some(&format!(
            "{MP}spec:\n  domains: [example.com]\n  mailboxes:\n    inline: [a@example.com, b@other.org, a@example.com]\n  backend:\n    standbys: 9\n"
        )),
    );
    assert_rejected(
        &out,
        &[
            "-: MailPod bad: spec.mailboxes.inline[1]: `b@other.org`: domain `other.org` is not in spec.domains",
            "spec.mailboxes.inline[2]: duplicate mailbox `a@example.com`",
            "spec.backend.standbys: must be at most 4",
        ],
    );
}

#[test]
fn type_errors_name_the_field() {
    let out = render(&["-f", "-"], Some(&format!("{MP}spec: {{domains: 17}}\n")));
    assert_rejected(
        &out,
        &["MailPod bad: spec.domains: invalid type: integer `17`, expected a sequence"],
    );
    let nested = render(
        &["-f", "-"],
        Some(&format!(
            "{MP}spec:\n  domains: [example.com]\n  backend:\n    standbys: many\n"
        )),
    );
    assert_rejected(
        &nested,
        &["MailPod bad: spec.backend.standbys: invalid type: string \"many\""],
    );
}

#[test]
fn unknown_fields_and_kinds_are_rejected() {
    let typo = render(
        &["-f", "-"],
        Some(&format!(
            "{MP}spec:\n  domains: [example.com]\n  backend:\n    standby: 2\n"
        )),
    );
    assert_rejected(&typo, &["MailPod bad: spec.backend.standby: unknown field"]);
    let kind = render(
        &["-f", "-"],
        Some("apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: x\n"),
    );
    assert_rejected(&kind, &["Deployment x: unsupported kind"]);
    let missing = render(&["-f", "no/such/file.yaml"], None);
    assert_rejected(&missing, &["no/such/file.yaml: cannot read"]);
    let cm = render(
        &["-f", "-"],
        Some(&format!(
            "{MP}spec:\n  domains: [example.com]\n  mailboxes:\n    from:\n      - configMap: {{name: users, key: list}}\n"
        )),
    );
    assert_rejected(
        &cm,
        &["spec.mailboxes.from[0]: ConfigMap users key list not found"],
    );
}

#[test]
fn one_bad_document_prints_nothing_for_the_good_ones() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: mailpod.io/v1alpha1\nkind: SiteFailover\nmetadata:\n  name: geo\nspec:\n  mailPods: [corp]\n  localSite: fra\n  primarySite: lon\n  peer:\n    name: ams\n    kubeconfigSecret: {name: k, key: kubeconfig}\n",
    )
    .unwrap();
    let out = render(&["-f", "examples/mailpod-small.yaml", "-f", p(&bad)], None);
    assert_rejected(&out, &["bad.yaml: SiteFailover geo: spec.primarySite: `lon` must be spec.localSite (`fra`) or spec.peer.name (`ams`)"]);
}

#[test]
fn site_replication_exposes_each_luns_active_replica_to_the_other_site() {
    let mp = format!(
        "{MP}spec:\n  domains: [example.com]\n  tls: {{secretName: t}}\n  postmaster: a@example.com\n  mailboxes:\n    inline: [a@example.com]\n  backend:\n    siteReplication:\n      sourceRanges: [198.51.100.0/24]\n      tls: {{secretName: bad-site-tls}}\n"
    );
    let out = render(&["-f", "-"], Some(&mp));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let d = docs(&String::from_utf8(out.stdout).unwrap());
    let svc = d
        .iter()
        .find(|o| o["kind"] == "Service" && o["metadata"]["name"] == "bad-lun-0-replication")
        .expect("the LUN's replication Service");
    assert_eq!(svc["spec"]["type"], "LoadBalancer");
    assert_eq!(svc["spec"]["selector"]["mailpod.io/role"], "active");
    // Only doveadm's TLS listener is exposed; the plain one stays inside the cluster.
    assert_eq!(svc["spec"]["ports"].as_sequence().unwrap().len(), 1);
    assert_eq!(svc["spec"]["ports"][0]["port"], 12346);
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], "doveadm-tls");
    assert_eq!(
        svc["spec"]["loadBalancerSourceRanges"][0],
        "198.51.100.0/24"
    );
    let np = d
        .iter()
        .find(|o| o["kind"] == "NetworkPolicy" && o["metadata"]["name"] == "bad-store")
        .unwrap();
    let rules = np["spec"]["ingress"].as_sequence().unwrap();
    assert!(
        rules
            .iter()
            .any(|r| r["from"][0]["ipBlock"]["cidr"] == "198.51.100.0/24"
                && r["ports"][0]["port"] == 12346
                && r["ports"].as_sequence().unwrap().len() == 1),
        "the other site reaches the TLS listener only: {np:?}"
    );
    // The store pods mount the certificate read-only, as a Secret volume of the rendered mode, and the
    // agent is told where it is.
    let sts = d
        .iter()
        .find(|o| o["kind"] == "StatefulSet" && o["metadata"]["name"] == "bad-lun-0")
        .unwrap();
    let pod = &sts["spec"]["template"]["spec"];
    let volume = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "site-tls")
        .expect("the site-tls volume");
    assert_eq!(volume["secret"]["secretName"], "bad-site-tls");
    assert_eq!(volume["secret"]["defaultMode"], 0o440);
    let container = &pod["containers"][0];
    let mount = container["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "site-tls")
        .expect("the site-tls mount");
    assert_eq!(mount["mountPath"], "/etc/mailpod/site-tls");
    assert_eq!(mount["readOnly"], true);
    assert!(container["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .any(|e| e["name"] == "MAILPOD_SITE_TLS_DIR" && e["value"] == "/etc/mailpod/site-tls"));
    assert!(container["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .any(|p| p["name"] == "doveadm-tls" && p["containerPort"] == 12346));

    // No certificate: refused, naming the field; the channel is never in clear.
    let bad = render(
        &["-f", "-"],
        Some(&format!(
            "{MP}spec:\n  domains: [example.com]\n  backend:\n    siteReplication:\n      sourceRanges: [198.51.100.0/24]\n"
        )),
    );
    assert_rejected(&bad, &["spec.backend.siteReplication.tls: required"]);
    let bad = render(
        &["-f", "-"],
        Some(&format!(
            "{MP}spec:\n  domains: [example.com]\n  backend:\n    siteReplication:\n      sourceRanges: [198.51.100.0/24]\n      tls: {{secretName: Not_A_Name}}\n"
        )),
    );
    assert_rejected(
        &bad,
        &["spec.backend.siteReplication.tls.secretName: `Not_A_Name` is not a Secret name"],
    );

    let bad = render(
        &["-f", "-"],
        Some(&format!(
            "{MP}spec:\n  domains: [example.com]\n  backend:\n    siteReplication:\n      sourceRanges: [anywhere]\n"
        )),
    );
    assert_rejected(
        &bad,
        &["spec.backend.siteReplication.sourceRanges[0]: `anywhere` is not a CIDR range"],
    );
    // No sources at all would open the doveadm service to any address.
    for empty in [
        "siteReplication: {}",
        "siteReplication:\n      sourceRanges: []",
    ] {
        let bad = render(
            &["-f", "-"],
            Some(&format!(
                "{MP}spec:\n  domains: [example.com]\n  backend:\n    {empty}\n"
            )),
        );
        assert_rejected(
            &bad,
            &["spec.backend.siteReplication.sourceRanges: must name the other site's egress ranges"],
        );
    }
}

/// Block replication: each store volume gets a csi-addons VolumeReplication, `primary` while its LUN
/// serves; the same LUN fenced (as at a standby site) renders with no store running and its images
/// `secondary`. Dovecot replication renders none.
#[test]
fn volume_replications_follow_fencing() {
    let out = render(&["-f", "examples/mailpod-rbd.yaml"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let yaml = String::from_utf8(out.stdout).unwrap();
    golden("render-rbd.yaml", &yaml);
    let d = docs(&yaml);
    let check = |d: &[Value], state: &str, stores: u64| {
        let vrs = of_kind(d, "VolumeReplication");
        let names: Vec<&str> = vrs
            .iter()
            .map(|v| v["metadata"]["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["mail-vault-lun-0-0", "mail-vault-lun-0-1"]);
        for v in vrs {
            assert_eq!(v["apiVersion"], "replication.storage.openshift.io/v1alpha1");
            assert_eq!(v["spec"]["replicationState"], state);
            assert_eq!(v["spec"]["dataSource"]["kind"], "PersistentVolumeClaim");
            assert_eq!(v["spec"]["dataSource"]["name"], v["metadata"]["name"]);
            assert_eq!(v["spec"]["volumeReplicationClass"], "rbd-mirror-5m");
            assert_eq!(v["spec"]["autoResync"], true);
            assert_eq!(v["metadata"]["ownerReferences"][0]["kind"], "StorageLUN");
            assert_eq!(v["metadata"]["ownerReferences"][0]["name"], "vault-lun-0");
        }
        let sts = d
            .iter()
            .find(|o| o["kind"] == "StatefulSet" && o["metadata"]["name"] == "vault-lun-0")
            .unwrap();
        assert_eq!(sts["spec"]["replicas"].as_u64(), Some(stores));
    };
    check(&d, "primary", 2);

    let mut lun = of_kind(&d, "StorageLUN")[0].clone();
    lun["spec"]["fenced"] = Value::Bool(true);
    let fenced = render(&["-f", "-"], Some(&serde_yaml::to_string(&lun).unwrap()));
    assert!(
        fenced.status.success(),
        "{}",
        String::from_utf8_lossy(&fenced.stderr)
    );
    check(
        &docs(&String::from_utf8(fenced.stdout).unwrap()),
        "secondary",
        0,
    );

    let dovecot = render(&["-f", "examples/mailpod-small.yaml"], None);
    let d = docs(&String::from_utf8(dovecot.stdout).unwrap());
    assert!(of_kind(&d, "VolumeReplication").is_empty());
}

fn env_of(sts: &Value) -> BTreeMap<String, String> {
    let c = &sts["spec"]["template"]["spec"]["containers"][0];
    c["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|e| {
            Some((
                e["name"].as_str()?.to_string(),
                e["value"].as_str()?.to_string(),
            ))
        })
        .collect()
}

fn mount_paths(sts: &Value) -> Vec<String> {
    sts["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|m| m["mountPath"].as_str().unwrap().to_string())
        .collect()
}

/// Every name a mail daemon looks up is fully qualified with the namespace and `--cluster-domain` (Postfix
/// does not complete names from the search list) and has no trailing dot (Postfix refuses it in a next-hop).
#[test]
fn names_daemons_look_up_are_fully_qualified_with_the_cluster_domain() {
    let mp = "apiVersion: mailpod.io/v1alpha1\nkind: MailPod\nmetadata: {name: corp, namespace: mail}\n\
              spec:\n  domains: [example.com]\n  tls: {secretName: corp-tls}\n  postmaster: a@example.com\n  mailboxes:\n    inline: [a@example.com]\n    \
              passwdFileSecret: {name: corp-users, key: users}\n  frontend: {pop3: {replicas: 1}}\n";
    let out = render(
        &["-f", "-", "--cluster-domain", "Cluster.Example."],
        Some(mp),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let d = docs(&String::from_utf8(out.stdout).unwrap());
    let tables = of_kind(&d, "ConfigMap")
        .into_iter()
        .find(|c| c["metadata"]["name"] == "corp-access-tables")
        .unwrap();
    assert_eq!(
        tables["data"]["luns"].as_str().unwrap(),
        "0 corp-lun-0.mail.svc.cluster.example 24 143 110\n"
    );
    let sts = of_kind(&d, "StatefulSet");
    let store = sts
        .iter()
        .find(|s| s["metadata"]["name"] == "corp-lun-0")
        .unwrap();
    assert_eq!(
        env_of(store)["MAILPOD_LUN_HOST"],
        "corp-lun-0.mail.svc.cluster.example"
    );

    // The default domain, and a domain that is not one.
    let out = render(&["-f", "-"], Some(mp));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("0 corp-lun-0.mail.svc.cluster.local 24 143 110"),
        "{text}"
    );
    let out = render(&["-f", "-", "--cluster-domain", "bad domain"], Some(mp));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a DNS domain"));
}

/// The pods that authenticate users (stores and submission) are told where the users Secret is mounted.
#[test]
fn store_and_submission_containers_name_the_mounted_users_file() {
    let mp =
        "apiVersion: mailpod.io/v1alpha1\nkind: MailPod\nmetadata: {name: corp, namespace: mail}\n\
              spec:\n  domains: [example.com]\n  tls: {secretName: corp-tls}\n  postmaster: a@example.com\n  mailboxes:\n    inline: [a@example.com]\n    \
              passwdFileSecret: {name: corp-users, key: users}\n";
    let out = render(&["-f", "-"], Some(mp));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let d = docs(&String::from_utf8(out.stdout).unwrap());
    for name in ["corp-lun-0", "corp-submission"] {
        let sts = of_kind(&d, "StatefulSet")
            .into_iter()
            .find(|s| s["metadata"]["name"] == name)
            .unwrap();
        let env = env_of(sts);
        let users = env
            .get("MAILPOD_USERS_FILE")
            .unwrap_or_else(|| panic!("{name}: no MAILPOD_USERS_FILE in {env:?}"));
        assert_eq!(users, "/etc/mailpod/passwd/users");
        assert!(
            mount_paths(sts)
                .iter()
                .any(|m| users.starts_with(&format!("{m}/"))),
            "{name}: {users} is not in a mounted volume"
        );
    }
}

/// The agents' control port (which can hold a LUN's mail) admits this MailPod's jobs and the operator's
/// pods from the operator's own namespace only, never a look-alike pod elsewhere; stores and snapshot jobs
/// carry the LUN's control token.
#[test]
fn control_port_admits_the_operators_namespace_and_asks_for_the_luns_token() {
    let control_rule = |d: &[Value]| -> Value {
        let np = d
            .iter()
            .find(|o| o["kind"] == "NetworkPolicy" && o["metadata"]["name"] == "small-store")
            .expect("the store NetworkPolicy")
            .clone();
        np["spec"]["ingress"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|r| r["ports"][0]["port"] == 8081)
            .expect("a rule for the control port")
            .clone()
    };
    let out = render(
        &[
            "-f",
            "examples/mailpod-small.yaml",
            "--operator-namespace",
            "mail-operator",
        ],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let d = docs(&String::from_utf8(out.stdout).unwrap());
    let from = control_rule(&d)["from"].as_sequence().unwrap().clone();
    assert_eq!(from.len(), 2, "{from:?}");
    assert_eq!(
        from[1]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
        "mail-operator"
    );
    assert_eq!(
        from[1]["podSelector"]["matchLabels"]["app.kubernetes.io/name"],
        "mailpod-operator"
    );
    assert!(
        from.iter()
            .all(|p| p["namespaceSelector"] != serde_yaml::from_str::<Value>("{}").unwrap()),
        "no peer admits every namespace: {from:?}"
    );

    let out = render(&["-f", "examples/mailpod-small.yaml"], None);
    let d = docs(&String::from_utf8(out.stdout).unwrap());
    let from = control_rule(&d)["from"].as_sequence().unwrap().clone();
    assert_eq!(from.len(), 1, "outside a cluster only the jobs: {from:?}");
    assert!(from[0]["namespaceSelector"].is_null());

    // The LUN's StorageLUN renders separately; its store pods and snapshot jobs get the token.
    let lun = d
        .iter()
        .find(|o| o["kind"] == "StatefulSet" && o["metadata"]["name"] == "small-lun-0")
        .expect("the store StatefulSet");
    let pod = &lun["spec"]["template"]["spec"];
    assert!(pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .any(|v| v["secret"]["secretName"] == "small-lun-0-control"));
    assert!(pod["containers"][0]["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .any(|e| e["name"] == "MAILPOD_CONTROL_TOKEN_FILE"
            && e["value"] == "/etc/mailpod/control/token"));
    let cron = d
        .iter()
        .find(|o| o["kind"] == "CronJob")
        .expect("the snapshot CronJob");
    let env = &cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["env"];
    assert!(env
        .as_sequence()
        .unwrap()
        .iter()
        .any(|e| e["name"] == "MAILPOD_CONTROL_TOKEN"
            && e["valueFrom"]["secretKeyRef"]["name"] == "small-lun-0-control"
            && e["valueFrom"]["secretKeyRef"]["key"] == "token"));
}

/// `spec.filtering`: rspamd, clamd and freshclam in each mx pod, the MailPod's Redis behind a policy that
/// admits only mx, mx's Postfix pointed at the milter with the spec's policy, and the spec's scores in
/// rspamd's files.
#[test]
fn filtering_example_matches_golden() {
    let out = render(&["-f", "examples/mailpod-filtering.yaml"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let yaml = String::from_utf8(out.stdout).unwrap();
    golden("render-filtering.yaml", &yaml);
    let d = docs(&yaml);
    let sts = of_kind(&d, "StatefulSet");
    let mx = sts
        .iter()
        .find(|s| s["metadata"]["name"] == "filtered-mx")
        .unwrap();
    let containers: Vec<&str> = mx["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(containers, ["mx", "rspamd", "clamd", "freshclam"]);
    assert!(
        mx["spec"]["template"]["metadata"]["annotations"]["mailpod.io/filter-config-hash"]
            .is_string()
    );
    let redis = sts
        .iter()
        .find(|s| s["metadata"]["name"] == "filtered-filter-redis")
        .expect("the MailPod's Redis");
    assert_eq!(redis["spec"]["replicas"], 1);
    let policy = of_kind(&d, "NetworkPolicy")
        .into_iter()
        .find(|p| p["metadata"]["name"] == "filtered-filter-redis")
        .unwrap();
    assert_eq!(
        policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
            ["app.kubernetes.io/component"],
        "mx"
    );
    let cms = of_kind(&d, "ConfigMap");
    let cm = |name: &str| {
        cms.iter()
            .find(|c| c["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("ConfigMap {name}"))
    };
    let settings = cm("filtered-mail-settings")["data"]["settings.yaml"]
        .as_str()
        .unwrap();
    assert!(
        settings.contains("milter: 127.0.0.1:11332") && settings.contains("tempfailWhenDown: true"),
        "{settings}"
    );
    let filter = &cm("filtered-filter")["data"];
    assert_eq!(
        filter["actions.conf"],
        "reject = 15;\nadd_header = 6;\ngreylist = 4;\n"
    );
    assert!(filter["redis.conf"]
        .as_str()
        .unwrap()
        .contains("filtered-filter-redis.mail.svc.cluster.local:6379"));
}
