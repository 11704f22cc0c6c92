//! Cross-site replication with the real Dovecot: a standby whose own LUN host is unreachable (its site's LUN
//! is fenced) pulls from the other site's active named by the `mailpod.io/replication-source` annotation,
//! read from a downward-API annotations file the test rewrites as the kubelet does. Across sites it pulls
//! only over TLS: both stores mount the site replication certificate (tls.crt, tls.key, ca.crt, laid out
//! as the kubelet lays out a Secret), the active serves doveadm on its TLS listener, and the standby
//! verifies the peer's certificate and host name against ca.crt.

mod support;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use support::pod::{cluster_name, KubeletVolume};
use support::*;

const WAIT: Duration = Duration::from_secs(30);
const USER: &str = "alice@example.com";
const PASSWORD: &str = "replication-secret";

/// Replaces a downward-API file at once, like the kubelet.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn replication(agent: &Agent) -> serde_json::Value {
    let (code, body) = agent.get("/replication");
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn openssl(args: &[&str], dir: &Path) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is installed with Dovecot (dovecot-core -> ssl-cert -> openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA (`<name>.crt`, `<name>.key` in `dir`), as cert-manager's CA issuer would hold.
fn make_ca(dir: &Path, name: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    openssl(
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.crt"),
        ],
        dir,
    );
    dir.join(format!("{name}.crt"))
}

/// A server certificate for `host` issued by CA `ca` (in `dir`), with serial `serial`: the Secret's files.
fn issue(dir: &Path, ca: &str, host: &str, serial: u32) -> BTreeMap<String, Vec<u8>> {
    issue_for(dir, ca, &[host], serial)
}

/// [`issue`] for every name of `hosts` (the first is the subject's CN).
fn issue_for(dir: &Path, ca: &str, hosts: &[&str], serial: u32) -> BTreeMap<String, Vec<u8>> {
    let host = hosts[0];
    let leaf = format!("{host}-{serial}");
    let names: Vec<String> = hosts.iter().map(|h| format!("DNS:{h}")).collect();
    std::fs::write(
        dir.join(format!("{leaf}.ext")),
        format!(
            "subjectAltName={}\nbasicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\n",
            names.join(",")
        ),
    )
    .unwrap();
    openssl(
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            &format!("/CN={host}"),
            "-keyout",
            &format!("{leaf}.key"),
            "-out",
            &format!("{leaf}.csr"),
        ],
        dir,
    );
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            &format!("{leaf}.csr"),
            "-days",
            "2",
            "-CA",
            &format!("{ca}.crt"),
            "-CAkey",
            &format!("{ca}.key"),
            "-set_serial",
            &serial.to_string(),
            "-extfile",
            &format!("{leaf}.ext"),
            "-out",
            &format!("{leaf}.crt"),
        ],
        dir,
    );
    let read = |f: String| std::fs::read(dir.join(f)).unwrap();
    BTreeMap::from([
        ("tls.crt".to_string(), read(format!("{leaf}.crt"))),
        ("tls.key".to_string(), read(format!("{leaf}.key"))),
        ("ca.crt".to_string(), read(format!("{ca}.crt"))),
    ])
}

/// The serial of the certificate `127.0.0.1:port` presents, when it verifies against `ca` for `host`.
fn presented_serial(port: u16, ca: &Path, host: &str) -> Option<String> {
    let hello = Command::new("timeout")
        .args([
            "5",
            "openssl",
            "s_client",
            "-connect",
            &format!("127.0.0.1:{port}"),
        ])
        .args([
            "-servername",
            host,
            "-verify_hostname",
            host,
            "-verify_return_error",
        ])
        .arg("-CAfile")
        .arg(ca)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    if !hello.status.success() {
        return None;
    }
    let mut x509 = Command::new("openssl")
        .args(["x509", "-noout", "-serial"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    x509.stdin.take().unwrap().write_all(&hello.stdout).unwrap();
    let out = x509.wait_with_output().unwrap();
    Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// What a doveadm client speaking in clear gets back from `port` within 2 s: a doveadm server answers
/// its `VERSION` line with `+` or `-` (authenticate).
fn clear_text_greeting(port: u16) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s.write_all(b"VERSION\tdoveadm-server\t1\t0\n").unwrap();
    let mut buf = vec![0u8; 256];
    let n = s.read(&mut buf).unwrap_or(0);
    buf.truncate(n);
    buf
}

/// One site's store: its downward-API files and its site replication Secret volume.
struct Replica {
    labels: PathBuf,
    annotations: PathBuf,
    site_tls: KubeletVolume,
}

impl Replica {
    fn new(root: &Path, name: &str, role: &str) -> Self {
        let r = Self {
            labels: root.join(format!("{name}.labels")),
            annotations: root.join(format!("{name}.annotations")),
            site_tls: KubeletVolume::new(
                root.join(format!("{name}-site-tls")),
                rendered_secret_mode(),
            ),
        };
        replace(&r.labels, &format!("mailpod.io/role=\"{role}\"\n"));
        r
    }

    fn pull_from(&self, source: &str) {
        replace(
            &self.annotations,
            &format!("kubectl.kubernetes.io/default-container=\"store\"\nmailpod.io/replication-source=\"{source}\"\n"),
        );
    }

    fn start(
        &self,
        site: &Site,
        name: &str,
        ports: &Ports,
        lun_port: u16,
        password: &Path,
    ) -> Agent {
        Agent::start_replica_with(
            site,
            name,
            ports,
            ("127.0.0.1", lun_port),
            password,
            &self.labels,
            Some(&self.annotations),
            &[
                "--site-tls-dir".to_string(),
                self.site_tls.dir.display().to_string(),
            ],
        )
    }
}

/// Waits until the standby reports a `lastError` containing `want`.
fn wait_error(b: &Agent, what: &str, want: &str) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_for(what, WAIT, || {
            last = replication(b);
            last["lastError"]
                .as_str()
                .is_some_and(|e| e.contains(want))
                .then_some(())
        })
    }));
    assert!(
        ok.is_ok(),
        "{what}: want lastError with {want:?}, got {last}"
    );
    eprintln!("{what}: {last}");
    last
}

struct Sites {
    site: Site,
    root: PathBuf,
    password: PathBuf,
    /// A's replication Service, as the other site's DNS would name it; in the certificate.
    host: String,
    /// Nothing listens here: B's own LUN host, as if its site's LUN were fenced.
    closed: u16,
}

fn sites() -> Sites {
    let site = Site::new(1_000_000);
    let root = site.root.path().to_path_buf();
    let password = root.join("doveadm-password");
    std::fs::write(&password, format!("{PASSWORD}\n")).unwrap();
    let host = cluster_name("corp-lun-0-replication");
    site.dns.set(&host, Ipv4Addr::LOCALHOST);
    Sites {
        site,
        root,
        password,
        host,
        closed: free_port(),
    }
}

#[test]
fn standby_pulls_from_the_annotated_source_over_verified_tls() {
    if !mail_software_present("standby_pulls_from_the_annotated_source_over_verified_tls") {
        return;
    }
    let Sites {
        mut site,
        root,
        password,
        host,
        closed,
    } = sites();
    let (pa, pb) = (Ports::free(), Ports::free());
    site.lun(0, &pa);
    site.mailbox(USER, 0, "alice-pw");
    site.publish();
    let certs = root.join("certs");
    let ca = make_ca(&certs, "site-ca");
    // The same Secret at both sites: the SiteFailover mirrors it to the standby.
    let secret = issue(&certs, "site-ca", &host, 1);
    let (ra, rb) = (
        Replica::new(&root, "a", "active"),
        Replica::new(&root, "b", "standby"),
    );
    ra.site_tls.publish(&secret);
    rb.site_tls.publish(&secret);
    let source_a = format!("{host}:{}", pa.doveadm_tls);
    rb.pull_from(&source_a);
    let a = ra.start(&site, "site-a", &pa, closed, &password);
    let b = rb.start(&site, "site-b", &pb, closed, &password);

    // A serves doveadm over TLS on its own listener, with the Secret's certificate, verified for the name.
    assert_eq!(
        presented_serial(pa.doveadm_tls, &ca, &host).as_deref(),
        Some("serial=01"),
        "A's TLS listener presents the site certificate"
    );
    // Its expiry is watched like a front end's certificate.
    let expiry = wait_for("A to report the site certificate's expiry", WAIT, || {
        let (_, body) = a.get("/metrics");
        body.lines()
            .find(|l| {
                l.starts_with("mailpod_tls_certificate_expiry_timestamp_seconds{")
                    && l.contains("site-tls")
            })
            .map(String::from)
    });
    let not_after: f64 = expiry.rsplit(' ').next().unwrap().parse().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (now + 86_400.0..now + 3.0 * 86_400.0).contains(&not_after),
        "a 2-day certificate: {expiry}"
    );
    // Nothing there answers in clear; the in-site listener does (it needs the password first).
    let greeting = clear_text_greeting(pa.doveadm_tls);
    assert!(
        !greeting.starts_with(b"+") && !greeting.starts_with(b"-"),
        "a doveadm client in clear got a greeting from the TLS listener: {:?}",
        String::from_utf8_lossy(&greeting)
    );
    assert!(
        clear_text_greeting(pa.doveadm).starts_with(b"-"),
        "the in-site listener asks a clear-text client to authenticate"
    );

    // 1. Mail delivered to A appears exactly on B, pulled over TLS from the annotated source.
    let mut mail: Vec<String> = (0..12).map(|i| format!("xsite-{i:03}")).collect();
    wait_accepts_writes(&a);
    deliver_lmtp(pa.lmtp, USER, &mail);
    mail.sort();
    wait_for("A to hold the mail", WAIT, || {
        (maildir_subjects(&a, USER) == mail).then_some(())
    });
    let mut last = Vec::new();
    let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_for("B to mirror A across sites", WAIT, || {
            last = maildir_subjects(&b, USER);
            (last == mail).then_some(())
        })
    }));
    assert!(
        ok.is_ok(),
        "B has {:?}, want {:?}; replication {}",
        last,
        mail,
        b.get("/replication").1
    );
    let rb_state = wait_for("B to report in sync", WAIT, || {
        let r = replication(&b);
        (r["inSync"] == true).then_some(r)
    });
    assert_eq!(rb_state["role"], "standby");
    assert_eq!(rb_state["source"], source_a.as_str());
    assert!(rb_state["lastError"].is_null(), "{rb_state}");

    // 2. A renewed certificate in the Secret reaches A's Dovecot, and B keeps pulling.
    let renewed = issue(&certs, "site-ca", &host, 2);
    ra.site_tls.publish(&renewed);
    wait_for("A to present the renewed certificate", WAIT, || {
        (presented_serial(pa.doveadm_tls, &ca, &host).as_deref() == Some("serial=02")).then_some(())
    });
    let more = vec!["after-renewal".to_string()];
    deliver_lmtp(pa.lmtp, USER, &more);
    let mut all = [mail.clone(), more].concat();
    all.sort();
    wait_for("B to pull after the renewal", WAIT, || {
        (maildir_subjects(&b, USER) == all).then_some(())
    });

    // 3. The annotation names A's plain listener: B speaks only TLS across sites, so it pulls nothing.
    let plain_a = format!("{host}:{}", pa.doveadm);
    rb.pull_from(&plain_a);
    let rb_state = wait_error(&b, "B to fail against a clear-text listener", &plain_a);
    assert_eq!(rb_state["inSync"], false, "{rb_state}");
    let late = vec!["never-in-clear".to_string()];
    deliver_lmtp(pa.lmtp, USER, &late);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(maildir_subjects(&b, USER), all, "nothing crossed in clear");

    // 4. A malformed value is refused: the previous source is kept and the error reported.
    rb.pull_from("127.0.0.1:not-a-port");
    let rb_state = wait_error(
        &b,
        "B to refuse the malformed source",
        "mailpod.io/replication-source",
    );
    assert_eq!(rb_state["source"], plain_a.as_str(), "{rb_state}");

    // 5. The annotation removed: back to the LUN host (closed), no longer in sync.
    replace(
        &rb.annotations,
        "kubectl.kubernetes.io/default-container=\"store\"\n",
    );
    let lun_source = format!("127.0.0.1:{closed}");
    let rb_state = wait_for("B to go back to its LUN host", WAIT, || {
        let r = replication(&b);
        (r["source"] == lun_source.as_str()).then_some(r)
    });
    assert_eq!(rb_state["inSync"], false, "{rb_state}");
    let rb_state = wait_error(&b, "B to report its unreachable LUN host", &lun_source);
    assert_eq!(
        rb_state["inSync"], false,
        "the LUN host is unreachable: {rb_state}"
    );
    assert_eq!(maildir_subjects(&b, USER), all, "B keeps what it has");

    let mut agents = [a, b];
    for agent in agents.iter_mut() {
        assert!(agent.stop(), "store agent must exit cleanly");
    }
}

#[test]
fn a_standby_refuses_a_peer_its_ca_did_not_sign_or_that_names_another_host() {
    if !mail_software_present(
        "a_standby_refuses_a_peer_its_ca_did_not_sign_or_that_names_another_host",
    ) {
        return;
    }
    let Sites {
        mut site,
        root,
        password,
        host,
        closed,
    } = sites();
    let (pa, pb) = (Ports::free(), Ports::free());
    site.lun(0, &pa);
    site.mailbox(USER, 0, "alice-pw");
    // Another name for the same address, which A's certificate does not carry.
    let other = cluster_name("corp-lun-0-elsewhere");
    site.dns.set(&other, Ipv4Addr::LOCALHOST);
    site.publish();
    let certs = root.join("certs");
    make_ca(&certs, "site-ca");
    make_ca(&certs, "other-ca");
    let secret = issue(&certs, "site-ca", &host, 1);
    let (ra, rb) = (
        Replica::new(&root, "a", "active"),
        Replica::new(&root, "b", "standby"),
    );
    ra.site_tls.publish(&secret);
    // B trusts a CA that did not sign A's certificate.
    let mut untrusting = secret.clone();
    untrusting.insert(
        "ca.crt".into(),
        std::fs::read(certs.join("other-ca.crt")).unwrap(),
    );
    rb.site_tls.publish(&untrusting);
    let source_a = format!("{host}:{}", pa.doveadm_tls);
    rb.pull_from(&source_a);
    let a = ra.start(&site, "site-a", &pa, closed, &password);
    let b = rb.start(&site, "site-b", &pb, closed, &password);
    wait_accepts_writes(&a);
    let mail: Vec<String> = (0..3).map(|i| format!("refused-{i}")).collect();
    deliver_lmtp(pa.lmtp, USER, &mail);

    // 1. A CA that did not sign the peer's certificate: nothing pulled, the reason reported.
    let rb_state = wait_error(&b, "B to refuse A's certificate", "SSL certificate");
    assert_eq!(rb_state["inSync"], false, "{rb_state}");
    assert_eq!(rb_state["source"], source_a.as_str());
    assert!(
        maildir_subjects(&b, USER).is_empty(),
        "B pulled from an unverified peer"
    );

    // 2. The right CA but a name the certificate does not carry: refused too.
    rb.site_tls.publish(&secret);
    let via_other = format!("{other}:{}", pa.doveadm_tls);
    rb.pull_from(&via_other);
    let rb_state = wait_error(
        &b,
        "B to refuse a certificate for another host",
        "host name",
    );
    assert_eq!(rb_state["source"], via_other.as_str(), "{rb_state}");
    assert!(
        maildir_subjects(&b, USER).is_empty(),
        "B pulled from a peer of another name"
    );

    // 3. The name the certificate carries: the same CA and peer are accepted, so the refusals were the
    // verification's.
    rb.pull_from(&source_a);
    let mut want = mail.clone();
    want.sort();
    wait_for("B to pull from the verified peer", WAIT, || {
        (maildir_subjects(&b, USER) == want).then_some(())
    });
    let rb_state = wait_for("B to report in sync", WAIT, || {
        let r = replication(&b);
        (r["inSync"] == true).then_some(r)
    });
    assert!(rb_state["lastError"].is_null(), "{rb_state}");

    let mut agents = [a, b];
    for agent in agents.iter_mut() {
        assert!(agent.stop(), "store agent must exit cleanly");
    }
}

/// A primary site's store that comes back after the other site took over: fenced, it becomes a standby
/// that pulls from the other site, and first hands over (over TLS, doveadm's fetch and save with `-S`) the
/// mail only it holds. Every message ends on both sites exactly once.
#[test]
fn a_returning_primarys_store_hands_its_mail_to_the_other_site_over_tls() {
    if !mail_software_present(
        "a_returning_primarys_store_hands_its_mail_to_the_other_site_over_tls",
    ) {
        return;
    }
    let Sites {
        mut site,
        root,
        password,
        host,
        closed,
    } = sites();
    let (pa, pb) = (Ports::free(), Ports::free());
    site.lun(0, &pa);
    site.mailbox(USER, 0, "alice-pw");
    // The other site's replication Service, by its own name in the certificate.
    let host_b = cluster_name("corp-lun-0-replication-b");
    site.dns.set(&host_b, Ipv4Addr::LOCALHOST);
    site.publish();
    let certs = root.join("certs");
    make_ca(&certs, "site-ca");
    // One certificate naming both sites' addresses, as the runbook asks.
    let secret = issue_for(&certs, "site-ca", &[&host, &host_b], 1);
    let (ra, rb) = (
        Replica::new(&root, "a", "active"),
        Replica::new(&root, "b", "standby"),
    );
    ra.site_tls.publish(&secret);
    rb.site_tls.publish(&secret);
    rb.pull_from(&format!("{host}:{}", pa.doveadm_tls));
    let a = ra.start(&site, "site-a", &pa, closed, &password);
    let b = rb.start(&site, "site-b", &pb, closed, &password);

    // 1. B mirrors A.
    wait_accepts_writes(&a);
    let first: Vec<String> = (0..5).map(|i| format!("first-{i}")).collect();
    deliver_lmtp(pa.lmtp, USER, &first);
    let mut want = first.clone();
    want.sort();
    wait_for("B to mirror A", WAIT, || {
        (maildir_subjects(&b, USER) == want).then_some(())
    });

    // 2. Site B takes over: its LUN unfenced, its store active. A, cut off, still took mail meanwhile.
    replace(
        &rb.annotations,
        "kubectl.kubernetes.io/default-container=\"store\"\n",
    );
    replace(&rb.labels, "mailpod.io/role=\"active\"\n");
    wait_accepts_writes(&b);
    let only_a: Vec<String> = (0..3).map(|i| format!("only-on-a-{i}")).collect();
    deliver_lmtp(pa.lmtp, USER, &only_a);
    let on_b: Vec<String> = (0..2).map(|i| format!("on-b-{i}")).collect();
    deliver_lmtp(pb.lmtp, USER, &on_b);

    // 3. A returns fenced: a standby of the other site.
    ra.pull_from(&format!("{host_b}:{}", pb.doveadm_tls));
    replace(&ra.labels, "mailpod.io/role=\"standby\"\n");
    let mut all = [first, only_a, on_b].concat();
    all.sort();
    let mut last = (Vec::new(), Vec::new());
    let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_for(
            "both sites to hold every message exactly once",
            WAIT,
            || {
                last = (maildir_subjects(&b, USER), maildir_subjects(&a, USER));
                (last.0 == all && last.1 == all).then_some(())
            },
        )
    }));
    assert!(
        ok.is_ok(),
        "B {:?}, A {:?}, want {all:?}; A's replication {}",
        last.0,
        last.1,
        a.get("/replication").1
    );
    let ra_state = wait_for("A to report in sync with B", WAIT, || {
        let r = replication(&a);
        (r["inSync"] == true).then_some(r)
    });
    assert_eq!(ra_state["source"], format!("{host_b}:{}", pb.doveadm_tls));

    let mut agents = [a, b];
    for agent in agents.iter_mut() {
        assert!(agent.stop(), "store agent must exit cleanly");
    }
}
