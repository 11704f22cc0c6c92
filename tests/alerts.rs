//! The chart's alerting: the PrometheusRule rendered with Helm and run through `promtool test rules` with
//! the input series of tests/alerts/rules_test.yaml; every metric that a rule or a query of the Grafana
//! dashboard names is one the agent or the operator exports, as their registries encode them in-process;
//! the rule, the dashboard ConfigMap and the mail pods' PodMonitor render only when asked for.
//!
//! Helm comes as in tests/chart.rs ($HELM, scripts/install-helm.sh, PATH) and promtool from Debian's
//! `prometheus` package (tests/packages.txt). Without either these tests skip with a message, except when
//! `CI` is set: then they fail.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};

use serde::Deserialize;
use serde_json::Value;

const NAMESPACE: &str = "mailpod-system";
const PROMETHEUS_RULE_API: &str = "monitoring.coreos.com/v1/PrometheusRule";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn runs(program: &Path, arg: &str) -> bool {
    Command::new(program)
        .arg(arg)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn find_helm() -> Result<PathBuf, String> {
    if let Some(h) = std::env::var_os("HELM") {
        let h = PathBuf::from(h);
        return if runs(&h, "version") {
            Ok(h)
        } else {
            Err(format!("$HELM ({}) does not run", h.display()))
        };
    }
    let script = root().join("scripts/install-helm.sh");
    match Command::new("bash").arg(&script).output() {
        Ok(out) if out.status.success() => {
            let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if runs(&path, "version") {
                return Ok(path);
            }
        }
        _ => {}
    }
    if runs(Path::new("helm"), "version") {
        return Ok(PathBuf::from("helm"));
    }
    Err(format!(
        "{} did not install Helm and no `helm` is on PATH",
        script.display()
    ))
}

/// A tool for this test, or `None` after printing why the test is skipped. Panics under CI.
fn tool(
    found: &'static OnceLock<Result<PathBuf, String>>,
    find: fn() -> Result<PathBuf, String>,
) -> Option<&'static Path> {
    match found.get_or_init(find) {
        Ok(p) => Some(p.as_path()),
        Err(why) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "required in CI (CI is set): {why}"
            );
            eprintln!("SKIPPED: {why}; set CI=1 to make this fail");
            None
        }
    }
}

fn helm() -> Option<&'static Path> {
    static HELM: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    tool(&HELM, find_helm)
}

fn promtool() -> Option<&'static Path> {
    static PROMTOOL: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    tool(&PROMTOOL, || {
        let p = PathBuf::from("promtool");
        if runs(&p, "--version") {
            Ok(p)
        } else {
            Err(
                "promtool is not installed (Debian package `prometheus`, tests/packages.txt)"
                    .into(),
            )
        }
    })
}

fn run(program: &Path, args: &[&str], dir: Option<&Path>) -> Result<String, String> {
    let mut cmd = Command::new(program);
    cmd.args(args);
    if let Some(d) = dir {
        cmd.current_dir(d);
    }
    let out = cmd.output().expect("run a tool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!("{} {args:?} failed:\n{text}", program.display()))
    }
}

/// The chart's templates rendered with `extra` arguments (`--set ...`, `--api-versions ...`).
fn template(helm: &Path, extra: &[&str]) -> Vec<Value> {
    let chart = root().join("charts/mailpod-operator");
    let mut args = vec![
        "template",
        "mp",
        chart.to_str().unwrap(),
        "--namespace",
        NAMESPACE,
    ];
    args.extend(extra);
    let out = run(helm, &args, None).unwrap_or_else(|e| panic!("{e}"));
    serde_yaml::Deserializer::from_str(&out)
        .map(|d| Value::deserialize(d).expect("rendered YAML parses"))
        .filter(|v| !v.is_null())
        .collect()
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

/// The PrometheusRule as the chart renders it where the cluster serves the API.
fn prometheus_rule(helm: &Path) -> Value {
    let docs = template(
        helm,
        &[
            "--set",
            "prometheusRule.enabled=true",
            "--api-versions",
            PROMETHEUS_RULE_API,
        ],
    );
    let rules = of_kind(&docs, "PrometheusRule");
    assert_eq!(rules.len(), 1, "one PrometheusRule");
    rules[0].clone()
}

/// The dashboard JSON as the chart's ConfigMap carries it.
fn dashboard(helm: &Path) -> Value {
    let docs = template(helm, &["--set", "grafanaDashboard.enabled=true"]);
    let maps: Vec<_> = of_kind(&docs, "ConfigMap")
        .into_iter()
        .filter(|c| c["data"].get("mailpod.json").is_some())
        .collect();
    assert_eq!(maps.len(), 1, "one dashboard ConfigMap");
    serde_json::from_str(maps[0]["data"]["mailpod.json"].as_str().unwrap())
        .expect("the dashboard is JSON")
}

/// Series names in a Prometheus text exposition: each `# TYPE` family with the suffixes its samples carry.
fn series_names(exposition: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in exposition.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let (name, kind) = rest.split_once(' ').expect("`# TYPE name kind`");
        let suffixes: &[&str] = match kind {
            "counter" => &["_total", "_created"],
            "histogram" => &["_bucket", "_sum", "_count", "_created"],
            "summary" => &["", "_sum", "_count", "_created"],
            _ => &[""],
        };
        out.extend(suffixes.iter().map(|s| format!("{name}{s}")));
    }
    out
}

/// Every series name the agent (a store, with quota and replication; a pod with a Postfix queue and a
/// certificate) and the operator (with a LUN and a SiteFailover reported) export.
fn exported_metrics() -> BTreeSet<String> {
    use mailpod_operator::agent::metrics::Metrics;
    use mailpod_operator::controller::{LunLag, SiteReport, Stats};
    let queue = tempfile::tempdir().unwrap();
    let mut agent = Metrics::new(Some(queue.path().to_path_buf()), true);
    // Families without a series are not encoded: give each labelled one what the agent would.
    let quota = agent.register_quota();
    quota.set(
        &mailpod_operator::agent::quota::parse_quota_get(
            "Username\tQuota name\tType\tValue\tLimit\t%\n\
             a@example.com\tUser quota\tSTORAGE\t3\t2\t150\n\
             a@example.com\tUser quota\tMESSAGE\t2\t10\t20\n",
        )
        .unwrap(),
    );
    agent.set_tables_hash("0123abcd");
    agent.observe_maillog_line(
        "x postfix/lmtp[9]: 4Q: to=<a@example.com>, relay=s, delay=0.05, delays=0, dsn=2.0.0, status=sent (ok)",
    );
    agent
        .restarts
        .get_or_create(&mailpod_operator::agent::metrics::ServiceLabel {
            service: "postfix".into(),
        })
        .inc();
    let crt = queue.path().join("tls.crt");
    let made = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=mail.example.com", "-keyout"])
        .arg(queue.path().join("tls.key"))
        .arg("-out")
        .arg(&crt)
        .output()
        .expect("openssl (tests/packages.txt)");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    agent.watch_certificate(crt);
    let mut names = series_names(&agent.encode());

    let operator = Arc::new(mailpod_operator::metrics::OperatorMetrics::default());
    let stats = Arc::new(Stats::default());
    stats.set_managed(|| 1);
    let status = serde_json::from_value(serde_json::json!({
        "phase": "Healthy", "activeSite": "east", "epoch": 1, "fenced": false, "peerReachable": true,
        "consecutiveProbeFailures": 0, "accessTablesInSync": true, "replicationLagSeconds": 1.0,
        "lastTableSync": "2026-01-01T00:00:00Z",
        "witness": {"reachable": true, "holder": "east", "quorum": true},
        "lastFailover": {"from": "west", "to": "east", "epoch": 1, "startedAt": "2026-01-01T00:00:00Z",
                         "rtoSeconds": 20.0, "rpoSeconds": 1.0, "kind": "failover"}
    }))
    .unwrap();
    stats.report_site(
        "mail",
        "corp-geo",
        Some(SiteReport {
            site: "east".into(),
            peer: "west".into(),
            rpo_target_seconds: 30.0,
            status,
        }),
    );
    stats.report_lun_lag(
        "mail",
        "corp-lun-0",
        Some(LunLag {
            lag_seconds: Some(1.0),
            replicas: vec![("corp-lun-0-1".into(), 1.0)],
            ..Default::default()
        }),
    );
    operator.register("storagelun", stats);
    names.extend(series_names(&operator.render()));
    names
}

/// Names in a PromQL expression that look like this project's metrics and are not among `exported`.
fn unexported<'a>(expr: &'a str, exported: &BTreeSet<String>) -> Vec<&'a str> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|t| t.starts_with("mailpod_"))
        .filter(|t| !exported.contains(*t))
        .collect()
}

/// Every PromQL string in the dashboard: panel targets' `expr` and template variables' queries.
fn dashboard_queries(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr" | "query" | "definition", Value::String(s)) => out.push(s.clone()),
                    _ => dashboard_queries(v, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| dashboard_queries(v, out)),
        _ => {}
    }
}

#[test]
fn alert_rules_pass_promtool_unit_tests() {
    let (Some(helm), Some(promtool)) = (helm(), promtool()) else {
        return;
    };
    let rule = prometheus_rule(helm);
    let dir = tempfile::tempdir().unwrap();
    let rules =
        serde_yaml::to_string(&serde_json::json!({"groups": rule["spec"]["groups"]})).unwrap();
    std::fs::write(dir.path().join("rules.yaml"), rules).unwrap();
    std::fs::copy(
        root().join("tests/alerts/rules_test.yaml"),
        dir.path().join("rules_test.yaml"),
    )
    .unwrap();
    let checked = run(
        promtool,
        &["check", "rules", "rules.yaml"],
        Some(dir.path()),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(checked.contains("SUCCESS: 10 rules found"), "{checked}");
    let tested = run(
        promtool,
        &["test", "rules", "rules_test.yaml"],
        Some(dir.path()),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(tested.contains("SUCCESS"), "{tested}");

    // Every alert has its unit test, so a new one cannot go in untested.
    let spec = std::fs::read_to_string(root().join("tests/alerts/rules_test.yaml")).unwrap();
    for group in rule["spec"]["groups"].as_array().unwrap() {
        for r in group["rules"].as_array().unwrap() {
            let name = r["alert"].as_str().unwrap();
            assert!(
                spec.contains(&format!("alertname: {name}\n")),
                "{name} has no case in tests/alerts/rules_test.yaml"
            );
        }
    }
}

#[test]
fn rules_and_dashboard_name_only_exported_metrics() {
    let Some(helm) = helm() else { return };
    let exported = exported_metrics();
    // The check itself: a name nobody exports is caught, the ones the alerts rely on are there.
    assert_eq!(
        unexported("rate(mailpod_no_such_metric_total[5m]) > 0", &exported),
        ["mailpod_no_such_metric_total"]
    );
    for name in [
        "mailpod_queue_oldest_message_age_seconds",
        "mailpod_tls_certificate_expiry_timestamp_seconds",
        "mailpod_delivery_seconds_bucket",
        "mailpod_operator_storagelun_last_snapshot_timestamp_seconds",
        "mailpod_operator_sitefailover_rpo_target_seconds",
    ] {
        assert!(exported.contains(name), "{name} not in {exported:?}");
    }

    let rule = prometheus_rule(helm);
    let mut exprs: Vec<(String, String)> = Vec::new();
    for group in rule["spec"]["groups"].as_array().unwrap() {
        for r in group["rules"].as_array().unwrap() {
            let name = r["alert"].as_str().or(r["record"].as_str()).unwrap();
            exprs.push((
                format!("rule {name}"),
                r["expr"].as_str().unwrap().to_string(),
            ));
        }
    }
    let mut queries = Vec::new();
    dashboard_queries(&dashboard(helm), &mut queries);
    assert!(
        queries.len() >= 10,
        "the dashboard has its queries: {queries:?}"
    );
    exprs.extend(queries.into_iter().map(|q| ("dashboard".to_string(), q)));

    let mut named = BTreeSet::new();
    let mut missing = Vec::new();
    for (what, expr) in &exprs {
        named.extend(
            expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|t| t.starts_with("mailpod_"))
                .map(str::to_string),
        );
        for name in unexported(expr, &exported) {
            missing.push(format!("{what}: {name}"));
        }
    }
    assert!(missing.is_empty(), "metrics nobody exports: {missing:#?}");
    assert!(
        named.len() >= 15,
        "rules and dashboard name the metrics: {named:?}"
    );
}

#[test]
fn rule_renders_only_with_the_api_or_when_forced() {
    let Some(helm) = helm() else { return };
    let none = |docs: &[Value]| of_kind(docs, "PrometheusRule").is_empty();
    assert!(none(&template(helm, &[])), "not by default");
    assert!(
        none(&template(helm, &["--api-versions", PROMETHEUS_RULE_API])),
        "not unless enabled"
    );
    assert!(
        none(&template(helm, &["--set", "prometheusRule.enabled=true"])),
        "not where the cluster has no PrometheusRule API"
    );
    let forced = template(
        helm,
        &[
            "--set",
            "prometheusRule.enabled=true,prometheusRule.force=true",
            "--set",
            "prometheusRule.labels.release=prom,prometheusRule.additionalAlertLabels.team=mail",
        ],
    );
    let rule = of_kind(&forced, "PrometheusRule");
    assert_eq!(rule.len(), 1, "forced");
    assert_eq!(rule[0]["metadata"]["namespace"], NAMESPACE);
    assert_eq!(rule[0]["metadata"]["labels"]["release"], "prom");
    for group in rule[0]["spec"]["groups"].as_array().unwrap() {
        for r in group["rules"].as_array().unwrap() {
            assert_eq!(r["labels"]["team"], "mail", "{r}");
            assert!(r["annotations"]["runbook_url"]
                .as_str()
                .unwrap()
                .contains("/docs/operations.md#mailpod"));
        }
    }
}

#[test]
fn dashboard_config_map_and_pod_monitor_when_enabled() {
    let Some(helm) = helm() else { return };
    let defaults = template(helm, &[]);
    assert!(of_kind(&defaults, "PodMonitor").is_empty());
    assert!(
        !of_kind(&defaults, "ConfigMap")
            .iter()
            .any(|c| c["data"].get("mailpod.json").is_some()),
        "no dashboard unless enabled"
    );

    let docs = template(
        helm,
        &[
            "--set",
            "grafanaDashboard.enabled=true,grafanaDashboard.namespace=monitoring",
            "--set",
            "grafanaDashboard.annotations.grafana_folder=Mail,metrics.podMonitor.enabled=true",
        ],
    );
    let cm = of_kind(&docs, "ConfigMap")
        .into_iter()
        .find(|c| c["data"].get("mailpod.json").is_some())
        .expect("dashboard ConfigMap");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    assert_eq!(cm["metadata"]["namespace"], "monitoring");
    assert_eq!(cm["metadata"]["annotations"]["grafana_folder"], "Mail");
    let json: Value = serde_json::from_str(cm["data"]["mailpod.json"].as_str().unwrap()).unwrap();
    assert_eq!(json["uid"], "mailpod-overview");

    // The PodMonitor selects the mail pods the operator renders, by their labels and metrics port.
    let pm = of_kind(&docs, "PodMonitor");
    assert_eq!(pm.len(), 1);
    assert_eq!(pm[0]["spec"]["namespaceSelector"]["any"], true);
    let port = pm[0]["spec"]["podMetricsEndpoints"][0]["port"]
        .as_str()
        .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mailpod-operator"))
        .args(["render", "-f"])
        .arg(root().join("examples/mailpod-small.yaml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rendered: Vec<Value> =
        serde_yaml::Deserializer::from_str(&String::from_utf8(out.stdout).unwrap())
            .map(|d| Value::deserialize(d).unwrap())
            .filter(|v| !v.is_null())
            .collect();
    let sets = of_kind(&rendered, "StatefulSet");
    assert!(sets.len() >= 2, "stores and front ends");
    for sts in sets {
        let pod = &sts["spec"]["template"];
        for (k, v) in pm[0]["spec"]["selector"]["matchLabels"]
            .as_object()
            .unwrap()
        {
            assert_eq!(
                &pod["metadata"]["labels"][k], v,
                "{}",
                sts["metadata"]["name"]
            );
        }
        let ports: Vec<&str> = pod["spec"]["containers"][0]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|p| p["name"].as_str())
            .collect();
        assert!(
            ports.contains(&port),
            "{} has no {port} port",
            sts["metadata"]["name"]
        );
    }

    let scoped = template(
        helm,
        &[
            "--set",
            "metrics.podMonitor.enabled=true",
            "--set",
            "watchNamespaces={mail,mail-eu}",
        ],
    );
    let pm = of_kind(&scoped, "PodMonitor");
    assert_eq!(
        pm[0]["spec"]["namespaceSelector"]["matchNames"],
        serde_json::json!(["mail", "mail-eu"])
    );
    let chart = root().join("charts/mailpod-operator");
    run(
        helm,
        &[
            "lint",
            "--strict",
            chart.to_str().unwrap(),
            "--set",
            "prometheusRule.enabled=true,prometheusRule.force=true,grafanaDashboard.enabled=true",
            "--set",
            "metrics.podMonitor.enabled=true,metrics.serviceMonitor.enabled=true",
        ],
        None,
    )
    .unwrap_or_else(|e| panic!("{e}"));
}
