//! What the operator renders for a MailPod, run as its pods would run it: the access-tables and
//! mail-settings ConfigMaps verbatim (only the stores' ports are the test's), each agent told only what its
//! rendered container's environment tells it, the users Secret and the stores' site replication
//! certificate mounted as the kubelet mounts them (mode as rendered, root-owned, `..data` symlinks), names resolved by cluster DNS through a pod's resolv.conf
//! (search list, ndots:5), the rendered capabilities (no SYS_CHROOT) and clients on another address.
//!
//! Each defect this catches broke every installation: deliveries bounced because Postfix's LMTP client
//! does not complete a bare Service name from the search list; Dovecot's auth process (user `dovecot`)
//! could not read the 0440 root:root Secret, so no login worked; submission's container never got
//! `MAILPOD_USERS_FILE`, so every SMTP AUTH got 535; and Dovecot's default chroots fail without SYS_CHROOT.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::Container;
use mailpod_operator::crd::MailPod;
use mailpod_operator::mailconfig::dovecot::dovecot_conf;
use mailpod_operator::mailconfig::layout::{Layout, Ports as ServicePorts, Role};
use mailpod_operator::mailconfig::settings::{MailSettings, SETTINGS_KEY};
use mailpod_operator::mailconfig::tables::AccessTables;
use mailpod_operator::resources::pod::paths;
use mailpod_operator::resources::{self, mailboxes, Child, Defaults};
use support::pod::{cluster_name, NAMESPACE};
use support::*;

const WAIT: Duration = Duration::from_secs(30);

const MAILPOD: &str = r#"
apiVersion: mailpod.io/v1alpha1
kind: MailPod
metadata: {name: corp, namespace: mail, uid: corp-uid}
spec:
  domains: [example.com]
  mailboxes:
    inline: [alice@example.com, bob@example.com, carol@example.com]
    passwdFileSecret: {name: corp-users, key: users}
  backend:
    maxUsersPerLun: 2
    standbys: 0
    # The stores mount the site replication certificate and serve doveadm over TLS with it.
    siteReplication: {sourceRanges: [198.51.100.0/24], tls: {secretName: corp-site-tls}}
  postmaster: alice@example.com
  # The pod conditions are what this test is about; TLS has its own (tests/dataplane_tls.rs).
  insecurePlaintextAuth: true
  frontend:
    mx: {replicas: 1}
    submission: {replicas: 1}
    imap: {replicas: 1}
    pop3: {replicas: 1}
"#;

/// What the operator renders for [`MAILPOD`]: the ConfigMaps' data and every agent container by role
/// (stores by LUN name).
struct Rendered {
    tables: BTreeMap<String, String>,
    settings: String,
    containers: BTreeMap<String, Container>,
    /// `defaultMode` of the stores' site replication Secret volume.
    site_tls_mode: Option<u32>,
}

fn render() -> Rendered {
    let mp: MailPod = serde_yaml::from_str(MAILPOD).unwrap();
    let wanted = mailboxes::resolve(&mp.spec, &|_: &_| None).unwrap();
    let desired = resources::mailpod::build(&mp, &wanted, &[], &Defaults::image("img")).unwrap();
    let mut out = Rendered {
        tables: BTreeMap::new(),
        settings: String::new(),
        containers: BTreeMap::new(),
        site_tls_mode: None,
    };
    let mut add_sts = |sts: &k8s_openapi::api::apps::v1::StatefulSet| {
        let name = sts.metadata.name.clone().unwrap();
        let pod = sts.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        out.containers.insert(name, pod.containers[0].clone());
        let site_tls = pod.volumes.iter().flatten().find(|v| v.name == "site-tls");
        if let Some(mode) = site_tls.and_then(|v| v.secret.as_ref()?.default_mode) {
            out.site_tls_mode = Some(mode as u32);
        }
    };
    for child in &desired.children {
        match child {
            Child::StatefulSet(sts) => add_sts(sts),
            Child::StorageLUN(lun) => {
                for c in resources::store::build(lun, &Defaults::image("img")) {
                    if let Child::StatefulSet(sts) = c {
                        add_sts(&sts);
                    }
                }
            }
            _ => {}
        }
    }
    for child in &desired.children {
        if let Child::ConfigMap(cm) = child {
            let data = cm.data.clone().unwrap();
            if let Some(s) = data.get(SETTINGS_KEY) {
                out.settings = s.clone();
            } else {
                out.tables = data;
            }
        }
    }
    out
}

/// The container's environment as its agent sees it: values as rendered, downward-API fields filled in,
/// paths inside the rendered volume mounts mapped to where the test keeps those volumes.
fn container_env(
    c: &Container,
    pod: &str,
    volumes: &BTreeMap<&str, PathBuf>,
) -> Vec<(String, String)> {
    let mut env = vec![];
    for e in c.env.clone().unwrap_or_default() {
        let value = match (&e.value, &e.value_from) {
            (Some(v), _) => {
                let mapped = volumes.iter().find_map(|(mount, dir)| {
                    v.strip_prefix(mount)
                        .map(|rest| format!("{}{rest}", dir.display()))
                });
                mapped.unwrap_or_else(|| v.clone())
            }
            (None, Some(from)) => match from.field_ref.as_ref().map(|f| f.field_path.as_str()) {
                Some("metadata.name") => pod.to_string(),
                Some("metadata.namespace") => NAMESPACE.to_string(),
                other => panic!("{}: unexpected env source {other:?}", e.name),
            },
            (None, None) => String::new(),
        };
        env.push((e.name, value));
    }
    env
}

/// The name the site replication certificate is for.
const SITE_HOST: &str = "corp-replication.site-a.example";

/// A self-signed certificate and key for `host` in `dir` (its own CA).
fn self_signed(dir: &Path, host: &str) -> (PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let (crt, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    let out = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args(["-subj", &format!("/CN={host}")])
        .args(["-addext", &format!("subjectAltName=DNS:{host}")])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&crt)
        .output()
        .expect("openssl is installed with Dovecot");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (crt, key)
}

fn mounts_of(c: &Container) -> BTreeSet<String> {
    c.volume_mounts
        .iter()
        .flatten()
        .map(|m| m.mount_path.clone())
        .collect()
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

fn wait_delivered(what: &str, store: &Agent, address: &str, subject: &str, mx: &Agent) {
    let start = std::time::Instant::now();
    while !maildir_subjects(store, address).contains(&subject.to_string()) {
        if start.elapsed() > WAIT {
            panic!(
                "{what}: `{subject}` never reached {address}'s Maildir on {}; mx log:\n{}",
                store.work.display(),
                log_tail(&mx.work.join("log/postfix.log"))
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn imap_login(port: u16, user: &str, password: &str) -> String {
    let mut s = Session::connect(port);
    let greeting = s.line();
    assert!(greeting.starts_with("* OK"), "{greeting}");
    let (_, st) = s.imap(&format!("LOGIN {user} {password}"));
    s.imap("LOGOUT");
    st
}

fn smtp_auth(port: u16, user: &str, password: &str) -> (u16, String) {
    let mut s = Session::connect(port);
    assert_eq!(s.smtp_reply().0, 220);
    assert_eq!(s.smtp("EHLO client.test").0, 250);
    let token = base64(format!("\0{user}\0{password}").as_bytes());
    let r = s.smtp(&format!("AUTH PLAIN {token}"));
    let _ = s.smtp("QUIT");
    r
}

#[test]
fn rendered_mailpod_delivers_and_logs_in_under_pod_conditions() {
    if !mail_software_present("rendered_mailpod_delivers_and_logs_in_under_pod_conditions") {
        return;
    }
    let rendered = render();
    let mut site = Site::new(1_000_000);
    std::fs::write(site.config_dir().join(SETTINGS_KEY), &rendered.settings).unwrap();
    site.settings = MailSettings::from_yaml(&rendered.settings).unwrap();

    // The rendered tables, verbatim but for the stores' ports (each store is a pod of its own in a cluster,
    // all on the standard ports; here they share 127.0.0.1).
    let mut tables = AccessTables::from_data(&rendered.tables).unwrap();
    let mut store_ports = BTreeMap::new();
    for (index, endpoint) in tables.luns.iter_mut() {
        let p = Ports::free();
        endpoint.lmtp_port = p.lmtp;
        endpoint.imap_port = p.imap;
        endpoint.pop3_port = p.pop3;
        // Cluster DNS knows each LUN's Service by its name in the namespace, whatever the tables say.
        site.dns.set(
            &cluster_name(&mailpod_operator::names::lun("corp", *index)),
            std::net::Ipv4Addr::LOCALHOST,
        );
        store_ports.insert(*index, p);
    }
    assert_eq!(
        tables.luns.len(),
        2,
        "three mailboxes, two a LUN: {tables:?}"
    );
    site.tables = tables;
    site.publish();
    site.set_users(
        "alice@example.com:{PLAIN}alice-pw\nbob@example.com:{PLAIN}bob-pw\ncarol@example.com:{PLAIN}carol-pw\n",
    );
    let mode = std::fs::metadata(site.users_file()).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o440,
        "the Secret is mounted as rendered"
    );

    let replication_dir = site.root.path().join("replication-secret");
    std::fs::create_dir_all(&replication_dir).unwrap();
    // The site replication Secret as the kubelet mounts it, at the rendered mode.
    let site_tls = support::pod::KubeletVolume::new(
        site.root.path().join("site-tls-secret"),
        rendered
            .site_tls_mode
            .expect("the stores mount the site replication Secret"),
    );
    let certificate = self_signed(&site.root.path().join("certs"), SITE_HOST);
    site_tls.publish(&BTreeMap::from([
        (
            "tls.crt".to_string(),
            std::fs::read(&certificate.0).unwrap(),
        ),
        (
            "tls.key".to_string(),
            std::fs::read(&certificate.1).unwrap(),
        ),
        ("ca.crt".to_string(), std::fs::read(&certificate.0).unwrap()),
    ]));
    let volumes: BTreeMap<&str, PathBuf> = BTreeMap::from([
        (paths::PASSWD, site.users.dir.clone()),
        (paths::TABLES, site.tables_dir()),
        (paths::SETTINGS, site.config_dir()),
        (paths::REPLICATION, replication_dir),
        (paths::SITE_TLS, site_tls.dir.clone()),
    ]);
    let start = |role: &'static str, sts: &str, ports: &Ports| {
        let c = rendered
            .containers
            .get(sts)
            .unwrap_or_else(|| panic!("no StatefulSet {sts} rendered"));
        assert_eq!(c.args.as_ref().unwrap()[..3], ["agent", "--role", role]);
        let env = container_env(c, &format!("{sts}-0"), &volumes);
        // Every path the agent is told must lie in a volume its container mounts.
        for (k, v) in c
            .env
            .iter()
            .flatten()
            .filter_map(|e| Some((&e.name, e.value.as_ref()?)))
        {
            if v.starts_with('/') {
                assert!(
                    mounts_of(c).iter().any(|m| v.starts_with(m.as_str())),
                    "{sts}: {k}={v} is not in a mounted volume"
                );
            }
        }
        // The downward-API files the store reads its role from (the operator labels one replica active).
        let mut extra = vec![];
        if role == "store" {
            let podinfo = site.root.path().join(format!("{sts}-podinfo"));
            std::fs::create_dir_all(&podinfo).unwrap();
            std::fs::write(podinfo.join("labels"), "mailpod.io/role=\"active\"\n").unwrap();
            assert!(mounts_of(c).contains(paths::PODINFO));
            for (flag, file) in [
                ("--labels-file", "labels"),
                ("--annotations-file", "annotations"),
            ] {
                extra.push(flag.to_string());
                extra.push(podinfo.join(file).display().to_string());
            }
        }
        let agent = Agent::start_with_env(&site, role, sts, ports, &extra, &env);
        if role == "store" {
            wait_accepts_writes(&agent);
        }
        agent
    };
    let store0 = start("store", "corp-lun-0", &store_ports[&0]);
    let store1 = start("store", "corp-lun-1", &store_ports[&1]);
    let mx = start("mx", "corp-mx", &Ports::free());
    let submission = start("submission", "corp-submission", &Ports::free());
    let imap = start("imap", "corp-imap", &Ports::free());
    let pop3 = start("pop3", "corp-pop3", &Ports::free());
    let lun_of = |m: &str| site.tables.mailboxes[m];
    let store_for = |m: &str| if lun_of(m) == 0 { &store0 } else { &store1 };

    // 1. Every accepted message is delivered to its mailbox's LUN, whose name Postfix resolved itself.
    for m in ["alice@example.com", "bob@example.com"] {
        let r = send_mail(
            mx.ports.smtp,
            "x@remote.test",
            &[m],
            &format!("mx-to-{m}"),
            100,
        );
        assert_eq!(r.0, 250, "{r:?}");
    }
    for m in ["alice@example.com", "bob@example.com"] {
        wait_delivered("inbound SMTP", store_for(m), m, &format!("mx-to-{m}"), &mx);
    }
    let asked = site.dns.queries();
    for lun in ["corp-lun-0", "corp-lun-1"] {
        assert!(
            asked.contains(&cluster_name(lun)),
            "the daemons looked up {lun} by its full name: {asked:?}"
        );
    }

    // 2. Logins work against the Secret as mounted: IMAP and POP3 through the proxies, SMTP AUTH on
    //    submission (whose container must say where the Secret is).
    let st = imap_login(imap.ports.imap, "alice@example.com", "alice-pw");
    assert!(st.starts_with("t OK"), "IMAP login through the proxy: {st}");
    let st = imap_login(imap.ports.imap, "alice@example.com", "wrong");
    assert!(st.starts_with("t NO"), "a wrong password is refused: {st}");
    let mut p = Session::connect(pop3.ports.pop3);
    assert!(p.line().starts_with("+OK"));
    p.send("USER bob@example.com\r\n");
    assert!(p.line().starts_with("+OK"));
    p.send("PASS bob-pw\r\n");
    let l = p.line();
    assert!(l.starts_with("+OK"), "POP3 login through the proxy: {l}");
    p.send("QUIT\r\n");
    let (code, text) = smtp_auth(submission.ports.submission, "carol@example.com", "carol-pw");
    assert_eq!(code, 235, "SMTP AUTH on submission: {text}");
    let (code, _) = smtp_auth(submission.ports.submission, "carol@example.com", "wrong");
    assert_eq!(code, 535, "a wrong password is refused");

    // Submission delivers local mail to the LUN by name as well.
    {
        let mut s = Session::connect(submission.ports.submission);
        assert_eq!(s.smtp_reply().0, 220);
        assert_eq!(s.smtp("EHLO client.test").0, 250);
        let token = base64(b"\0carol@example.com\0carol-pw");
        assert_eq!(s.smtp(&format!("AUTH PLAIN {token}")).0, 235);
        assert_eq!(s.smtp("MAIL FROM:<carol@example.com>").0, 250);
        assert_eq!(s.smtp("RCPT TO:<alice@example.com>").0, 250);
        assert_eq!(s.smtp("DATA").0, 354);
        s.send(&message(
            "carol@example.com",
            &["alice@example.com"],
            "from-carol",
            10,
        ));
        assert_eq!(s.smtp(".").0, 250);
        let _ = s.smtp("QUIT");
    }
    wait_delivered(
        "submission",
        store_for("alice@example.com"),
        "alice@example.com",
        "from-carol",
        &submission,
    );

    // A changed Secret is read again, with no restart: the new password works, the old one no longer.
    let pids: Vec<u32> = [&store0, &store1, &submission]
        .iter()
        .map(|a| a.pid())
        .collect();
    site.set_users(
        "alice@example.com:{PLAIN}alice-new\nbob@example.com:{PLAIN}bob-pw\ncarol@example.com:{PLAIN}carol-new\n",
    );
    wait_for("the store to take alice's new password", WAIT, || {
        imap_login(imap.ports.imap, "alice@example.com", "alice-new")
            .starts_with("t OK")
            .then_some(())
    });
    assert!(imap_login(imap.ports.imap, "alice@example.com", "alice-pw").starts_with("t NO"));
    wait_for("submission to take carol's new password", WAIT, || {
        (smtp_auth(
            submission.ports.submission,
            "carol@example.com",
            "carol-new",
        )
        .0 == 235)
            .then_some(())
    });
    assert_eq!(
        [&store0, &store1, &submission]
            .iter()
            .map(|a| a.pid())
            .collect::<Vec<_>>(),
        pids,
        "no agent was restarted"
    );

    // 3. The stores read the site replication Secret as mounted (root-owned, the rendered mode, `..data`
    //    symlinks) and serve doveadm over TLS with it, for the other site.
    for (index, store) in [(0, &store0), (1, &store1)] {
        let port = store_ports[&index].doveadm_tls;
        let hello = std::process::Command::new("timeout")
            .args([
                "5",
                "openssl",
                "s_client",
                "-connect",
                &format!("127.0.0.1:{port}"),
            ])
            .args([
                "-verify_hostname",
                SITE_HOST,
                "-verify_return_error",
                "-CAfile",
            ])
            .arg(&certificate.0)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        assert!(
            hello.status.success(),
            "{}: doveadm's TLS listener with the mounted certificate: {}",
            store.work.display(),
            String::from_utf8_lossy(&hello.stderr)
        );
        // Dovecot's global `ssl = yes` (which that listener needs) gives the mail protocols no STARTTLS:
        // the proxies speak to the stores in clear inside the cluster.
        let mut s = Session::connect(store_ports[&index].imap);
        let greeting = s.line();
        assert!(
            greeting.starts_with("* OK") && !greeting.contains("STARTTLS"),
            "{greeting}"
        );
        let (lines, done) = s.imap("CAPABILITY");
        assert!(done.starts_with("t OK"), "{done}");
        assert!(lines.iter().all(|l| !l.contains("STARTTLS")), "{lines:?}");
    }

    // 4. The stores run under the rendered capabilities: no Dovecot process needed a chroot.
    for store in [&store0, &store1] {
        let log = std::fs::read_to_string(store.work.join("log/dovecot.log")).unwrap_or_default();
        assert!(
            !log.contains("chroot("),
            "{}: {}",
            store.work.display(),
            log_tail(&store.work.join("log/dovecot.log"))
        );
        assert_eq!(
            store
                .metric("mailpod_child_restarts_total{service=\"dovecot\"}")
                .unwrap_or(0.0),
            0.0
        );
    }

    let mut agents = [store0, store1, mx, submission, imap, pop3];
    for a in agents.iter_mut() {
        assert!(a.stop(), "{} agent must exit cleanly on SIGTERM", a.role);
    }
}

/// No rendered Dovecot service chroots (each would need CAP_SYS_CHROOT, which mail pods drop), as the
/// installed Dovecot resolves its defaults: a Dovecot that adds a default chroot fails here.
#[test]
fn no_dovecot_service_of_any_role_chroots() {
    if !mail_software_present("no_dovecot_service_of_any_role_chroots") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let layout = Layout::under(dir.path());
    let settings: MailSettings = MailSettings::from_yaml(&render().settings).unwrap();
    for role in Role::ALL.into_iter().filter(|r| r.runs_dovecot()) {
        let conf = dir.path().join(format!("{role}.conf"));
        std::fs::write(
            &conf,
            dovecot_conf(
                role,
                &settings,
                &layout,
                &ServicePorts::default(),
                Path::new("/u"),
            ),
        )
        .unwrap();
        let out = std::process::Command::new("doveconf")
            .arg("-c")
            .arg(&conf)
            .arg("-a")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{role}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let mut service = "";
        let mut chrooted = vec![];
        for line in text.lines() {
            if let Some(s) = line.strip_prefix("service ") {
                service = s.trim_end_matches(" {").trim();
            } else if let Some(v) = line.strip_prefix("  chroot = ") {
                if !v.trim().is_empty() {
                    chrooted.push(format!("{service} (chroot = {v})"));
                }
            }
        }
        assert!(
            chrooted.is_empty(),
            "{role}: services that chroot: {chrooted:?}"
        );
    }
}
