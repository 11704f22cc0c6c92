//! Quotas and Sieve with the real Dovecot and Pigeonhole, as a store and an imap proxy render them.
//!
//! Quotas: over quota, LMTP answers what the MailPod chose (452 4.2.2 to defer, 552 5.2.2 to refuse;
//! switched live through the settings ConfigMap), IMAP APPEND is refused with `[OVERQUOTA]`, a per-mailbox
//! override from the access tables replaces the default, and the agent's /metrics shows each mailbox's
//! usage and limits.
//!
//! Sieve: a script uploaded over ManageSieve through the imap proxy (a small client here speaks the
//! protocol, RFC 5804) files a message into a folder, and its vacation action sends a reply through the
//! relay, an SMTP server in the test reached by a Service name through cluster DNS; without a relay a
//! script using vacation is refused at upload.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use mailpod_operator::mailconfig::settings::{MailSettings, QuotaSettings, SETTINGS_KEY};
use mailpod_operator::mailconfig::tables::MailboxQuota;
use support::*;

const WAIT: Duration = Duration::from_secs(30);

/// Writes the settings ConfigMap's file as a volume update would: whole, never half-written.
fn publish_settings(site: &Site, settings: &MailSettings) {
    let tmp = site.config_dir().join(".settings.new");
    std::fs::write(&tmp, settings.to_yaml()).unwrap();
    std::fs::rename(&tmp, site.config_dir().join(SETTINGS_KEY)).unwrap();
}

/// One LMTP transaction of a message with a body of about `body_bytes`; the first reply that was not the
/// expected one, else DATA's final one. A connection closed under it reads as code 0.
fn lmtp_once(port: u16, to: &str, subject: &str, body_bytes: usize) -> (u16, String) {
    lmtp_raw(
        port,
        to,
        &message("x@remote.test", &[to], subject, body_bytes),
    )
}

/// [`lmtp_once`] with the message's text as given.
fn lmtp_raw(port: u16, to: &str, text: &str) -> (u16, String) {
    let mut s = Session::connect(port);
    let reply = |s: &mut Session, text: Option<&str>| -> (u16, String) {
        if let Some(t) = text {
            if let Err(e) = s.try_send(t) {
                return (0, format!("closed: {e}"));
            }
        }
        let mut all = String::new();
        loop {
            match s.try_line() {
                Ok(l) if l.len() >= 4 => {
                    all.push_str(&l);
                    if l.as_bytes()[3] == b' ' {
                        return (l[..3].parse().unwrap_or(0), all);
                    }
                }
                other => return (0, format!("closed: {other:?} after {all:?}")),
            }
        }
    };
    let banner = reply(&mut s, None);
    if banner.0 != 220 {
        return banner;
    }
    for (command, want) in [
        ("LHLO client.test".to_string(), 250),
        ("MAIL FROM:<x@remote.test>".to_string(), 250),
        (format!("RCPT TO:<{to}>"), 250),
        ("DATA".to_string(), 354),
    ] {
        let r = reply(&mut s, Some(&format!("{command}\r\n")));
        if r.0 != want {
            return r;
        }
    }
    let body = format!("{text}.\r\n");
    let r = reply(&mut s, Some(&body));
    let _ = s.try_send("QUIT\r\n");
    r
}

/// Delivers messages until the store stops accepting them (at most `limit`); returns how many it took and
/// the refusal.
fn fill(port: u16, to: &str, body_bytes: usize, limit: usize) -> (usize, (u16, String)) {
    for n in 0..limit {
        let reply = lmtp_once(port, to, &format!("fill {n}"), body_bytes);
        if reply.0 != 250 {
            return (n, reply);
        }
    }
    panic!("{to} took {limit} messages of {body_bytes} bytes: no quota enforced");
}

/// IMAP LOGIN then APPEND of a message of about `body_bytes` to INBOX; the APPEND's tagged reply.
fn imap_append(port: u16, user: &str, password: &str, body_bytes: usize) -> String {
    let mut s = Session::connect(port);
    let greeting = s.line();
    assert!(greeting.starts_with("* OK"), "{greeting}");
    let (_, done) = s.imap(&format!("LOGIN {user} {password}"));
    assert!(done.starts_with("t OK"), "{done}");
    let msg = message(user, &[user], "appended", body_bytes);
    s.send(&format!("t APPEND INBOX {{{}}}\r\n", msg.len()));
    let cont = s.line();
    // Dovecot may refuse from the literal's announced size, before the message is sent.
    if cont.starts_with("t ") {
        return cont;
    }
    assert!(cont.starts_with('+'), "APPEND continuation: {cont}");
    s.send(&format!("{msg}\r\n"));
    loop {
        let l = s.line();
        assert!(!l.is_empty(), "IMAP connection closed during APPEND");
        if l.starts_with("t ") {
            let _ = s.imap("LOGOUT");
            return l;
        }
    }
}

#[test]
fn over_quota_lmtp_defers_or_refuses_as_chosen_append_is_refused_and_usage_is_in_metrics() {
    if !mail_software_present("over_quota_lmtp_defers_or_refuses_as_chosen") {
        return;
    }
    let mut site = Site::new(10 << 20);
    let mut settings = site.settings.clone();
    settings.features.quota = Some(QuotaSettings {
        storage_bytes: 4000,
        messages: None,
        tempfail: true,
    });
    publish_settings(&site, &settings);
    let p = Ports::free();
    site.lun(0, &p);
    site.mailbox("alice@example.com", 0, "alice-pw");
    site.mailbox("bob@example.com", 0, "bob-pw");
    // Bob's own limit: no storage limit, one message.
    site.tables.quotas.insert(
        "bob@example.com".into(),
        MailboxQuota {
            storage_bytes: Some(0),
            messages: Some(1),
        },
    );
    site.publish();
    let store = Agent::start_with(
        &site,
        "store",
        "store0",
        &p,
        &["--quota-interval-seconds".into(), "1".into()],
    );

    // Defer: 452 4.2.2, so the mx keeps the message queued.
    let (taken, (code, text)) = fill(p.lmtp, "alice@example.com", 1500, 10);
    assert!(
        (1..=3).contains(&taken),
        "a 4000-byte quota took {taken} messages of 1.5 kB"
    );
    assert_eq!(code, 452, "{text}");
    assert!(text.contains("4.2.2"), "{text}");
    assert_eq!(
        maildir_subjects(&store, "alice@example.com").len(),
        taken,
        "the refused message was not stored"
    );

    // IMAP APPEND over quota is refused.
    let append = imap_append(p.imap, "alice@example.com", "alice-pw", 1500);
    assert!(
        append.starts_with("t NO [OVERQUOTA]"),
        "APPEND over quota: {append}"
    );

    // Refuse: the MailPod switches to 552 and the store answers so without a restart.
    let pid = store.pid();
    settings.features.quota.as_mut().unwrap().tempfail = false;
    publish_settings(&site, &settings);
    // While Dovecot reloads, the old LMTP process answers 421 ("Shutting down") or closes the connection:
    // retried, as Postfix would.
    let (code, text) = wait_for("LMTP to refuse with 552", WAIT, || {
        let r = lmtp_once(p.lmtp, "alice@example.com", "after switch", 1500);
        (r.0 != 452 && r.0 != 421 && r.0 != 0).then_some(r)
    });
    assert_eq!(code, 552, "{text}");
    assert!(text.contains("5.2.2"), "{text}");
    assert_eq!(store.pid(), pid);

    // Bob's override: any size, one message.
    let (code, text) = lmtp_once(p.lmtp, "bob@example.com", "big", 20_000);
    assert_eq!(code, 250, "no storage limit for bob: {text}");
    let (code, text) = lmtp_once(p.lmtp, "bob@example.com", "second", 100);
    assert_eq!(code, 552, "bob's one-message limit: {text}");

    // Usage and limits in /metrics, from doveadm quota get -A.
    let alice_bytes = wait_for("alice's usage in /metrics", WAIT, || {
        store
            .metric("mailpod_quota_storage_bytes{mailbox=\"alice@example.com\"}")
            .filter(|v| *v > 0.0)
    });
    assert!(
        alice_bytes >= 1024.0 * (taken as f64 * 1.5).floor() - 1024.0,
        "{alice_bytes}"
    );
    // doveadm reports KiB: the 4000-byte limit within one KiB.
    let limit = store
        .metric("mailpod_quota_storage_limit_bytes{mailbox=\"alice@example.com\"}")
        .expect("alice's storage limit");
    assert!((limit - 4000.0).abs() < 1024.0, "{limit}");
    assert_eq!(
        store.metric("mailpod_quota_messages{mailbox=\"bob@example.com\"}"),
        Some(1.0)
    );
    assert_eq!(
        store.metric("mailpod_quota_messages_limit{mailbox=\"bob@example.com\"}"),
        Some(1.0)
    );
    assert_eq!(
        store.metric("mailpod_quota_storage_limit_bytes{mailbox=\"bob@example.com\"}"),
        None,
        "no storage limit for bob"
    );
    assert_eq!(store.metric("mailpod_quota_mailboxes_full"), Some(2.0));
    assert_eq!(store.metric("mailpod_quota_poll_failures_total"), Some(0.0));
}

/// A ManageSieve session (RFC 5804): responses end with a line starting `OK`, `NO` or `BYE`.
struct ManageSieve {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl ManageSieve {
    fn connect(port: u16) -> Self {
        let s = connect_from_client_address(port);
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let mut m = Self {
            w: s.try_clone().unwrap(),
            r: BufReader::new(s),
        };
        let (status, lines) = m.response();
        assert!(status.starts_with("OK"), "greeting: {lines:?} {status}");
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("\"SIEVE\"") && l.contains("fileinto")),
            "capabilities: {lines:?}"
        );
        m
    }

    /// [`ManageSieve::connect`], or `None` while the server closes connections (a reload).
    fn connect_any(port: u16) -> Option<Self> {
        let s = connect_from_client_address(port);
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        loop {
            let mut l = String::new();
            if r.read_line(&mut l).ok()? == 0 {
                return None;
            }
            if l.starts_with("OK") {
                return Some(Self { w: s, r });
            }
        }
    }

    /// The lines before the status line, and the status line (a `{n}` literal's text is read in).
    fn response(&mut self) -> (String, Vec<String>) {
        let mut lines = Vec::new();
        loop {
            let mut l = String::new();
            self.r
                .read_line(&mut l)
                .expect("reading a ManageSieve response");
            assert!(!l.is_empty(), "connection closed after {lines:?}");
            let mut l = l.trim_end().to_string();
            if let Some(n) = l
                .strip_suffix('}')
                .and_then(|x| x.rsplit_once('{'))
                .and_then(|(_, n)| n.trim_end_matches('+').parse::<usize>().ok())
            {
                let mut buf = vec![0u8; n];
                std::io::Read::read_exact(&mut self.r, &mut buf).unwrap();
                l.push(' ');
                l.push_str(&String::from_utf8_lossy(&buf));
            }
            if ["OK", "NO", "BYE"].iter().any(|s| l.starts_with(s)) {
                return (l, lines);
            }
            lines.push(l);
        }
    }

    fn command(&mut self, text: &str) -> (String, Vec<String>) {
        self.w.write_all(text.as_bytes()).unwrap();
        self.response()
    }

    fn login(&mut self, user: &str, password: &str) {
        let token = base64(format!("\0{user}\0{password}").as_bytes());
        let (status, _) = self.command(&format!("AUTHENTICATE \"PLAIN\" \"{token}\"\r\n"));
        assert!(status.starts_with("OK"), "login: {status}");
    }

    fn put_script(&mut self, name: &str, script: &str) -> String {
        self.command(&format!(
            "PUTSCRIPT \"{name}\" {{{}+}}\r\n{script}\r\n",
            script.len()
        ))
        .0
    }
}

/// An SMTP server for the relay: takes messages until `deadline` and hands each over as
/// (MAIL FROM, RCPT TOs, data).
fn smtp_relay(
    listener: TcpListener,
    deadline: Instant,
    tx: mpsc::Sender<(String, Vec<String>, String)>,
) {
    listener.set_nonblocking(true).unwrap();
    while Instant::now() < deadline {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(_) => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
        };
        stream.set_nonblocking(false).unwrap();
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let mut w = stream.try_clone().unwrap();
        let mut r = BufReader::new(stream);
        let mut say = |t: &str| w.write_all(format!("{t}\r\n").as_bytes());
        let _ = say("220 relay.test ESMTP");
        let (mut from, mut to, mut data) = (String::new(), Vec::new(), String::new());
        loop {
            let mut l = String::new();
            if r.read_line(&mut l).unwrap_or(0) == 0 {
                break;
            }
            let upper = l.to_ascii_uppercase();
            if upper.starts_with("EHLO") || upper.starts_with("HELO") {
                let _ = say("250 relay.test");
            } else if upper.starts_with("MAIL FROM:") {
                from = l[10..].trim().to_string();
                let _ = say("250 2.1.0 ok");
            } else if upper.starts_with("RCPT TO:") {
                to.push(l[8..].trim().to_string());
                let _ = say("250 2.1.5 ok");
            } else if upper.starts_with("DATA") {
                let _ = say("354 go ahead");
                loop {
                    let mut d = String::new();
                    if r.read_line(&mut d).unwrap_or(0) == 0 || d == ".\r\n" {
                        break;
                    }
                    data.push_str(&d);
                }
                let _ = say("250 2.0.0 queued");
                let _ = tx.send((from.clone(), to.clone(), data.clone()));
            } else if upper.starts_with("QUIT") {
                let _ = say("221 bye");
                break;
            } else {
                let _ = say("250 ok");
            }
        }
    }
}

/// A message with a Message-ID, addressed to `to` (vacation answers only mail addressed to the mailbox).
fn lmtp_message(port: u16, to: &str, subject: &str, id: &str) -> (u16, String) {
    lmtp_raw(
        port,
        to,
        &format!(
            "From: <x@remote.test>\r\nTo: <{to}>\r\nSubject: {subject}\r\nMessage-ID: <{id}@remote.test>\r\n\r\nhello\r\n"
        ),
    )
}

/// Pigeonhole's ManageSieve and LMTP plugin (Debian's dovecot-managesieved, dovecot-sieve).
fn sieve_present(test: &str) -> bool {
    let missing: Vec<&str> = [
        "/usr/lib/dovecot/managesieve",
        "/usr/lib/dovecot/modules/lib90_sieve_plugin.so",
    ]
    .into_iter()
    .filter(|p| !std::path::Path::new(p).exists())
    .collect();
    if missing.is_empty() {
        return true;
    }
    let why = format!(
        "{test}: Pigeonhole not installed ({}); install mail-image/packages.txt",
        missing.join(", ")
    );
    assert!(std::env::var_os("CI").is_none(), "{why}");
    eprintln!("SKIPPED {why}");
    false
}

const SCRIPT: &str = "require [\"fileinto\", \"vacation\"];\r\n\
if header :contains \"subject\" \"[list]\" {\r\n  fileinto \"Lists\";\r\n  stop;\r\n}\r\n\
vacation :days 1 :subject \"Away\" \"I am away until Monday.\";\r\n";

#[test]
fn sieve_script_uploaded_through_the_imap_proxy_files_mail_and_answers_with_a_vacation_reply() {
    let test = "sieve_script_uploaded_through_the_imap_proxy_files_mail_and_answers";
    if !mail_software_present(test) || !sieve_present(test) {
        return;
    }
    let mut site = Site::new(10 << 20);
    // The relay the spec names, by a Service name that cluster DNS answers.
    let listener = TcpListener::bind(("127.0.0.1", free_port())).unwrap();
    let relay_port = listener.local_addr().unwrap().port();
    let relay_host = support::pod::cluster_name("relay");
    site.dns.set(&relay_host, std::net::Ipv4Addr::LOCALHOST);
    let (tx, rx) = mpsc::channel();
    let deadline = Instant::now() + Duration::from_secs(120);
    std::thread::spawn(move || smtp_relay(listener, deadline, tx));
    let mut settings = site.settings.clone();
    settings.features.sieve.relay = Some(format!("{relay_host}:{relay_port}"));
    publish_settings(&site, &settings);

    let p = Ports::free();
    site.lun(0, &p);
    site.mailbox("alice@example.com", 0, "alice-pw");
    site.publish();
    let store = Agent::start(&site, "store", "store0", &p);
    let imap = Agent::start(&site, "imap", "imap", &Ports::free());

    // Uploaded and activated through the proxy, which forwards ManageSieve to alice's store.
    let mut ms = ManageSieve::connect(imap.ports.sieve);
    ms.login("alice@example.com", "alice-pw");
    let bad = ms.put_script("broken", "require [\"nosuch\"];\r\n");
    assert!(
        bad.starts_with("NO") && bad.contains("nosuch"),
        "a script that does not compile is refused: {bad}"
    );
    let put = ms.put_script("main", SCRIPT);
    assert!(put.starts_with("OK"), "PUTSCRIPT: {put}");
    let (status, _) = ms.command("SETACTIVE \"main\"\r\n");
    assert!(status.starts_with("OK"), "SETACTIVE: {status}");
    let (status, scripts) = ms.command("LISTSCRIPTS\r\n");
    assert!(status.starts_with("OK"), "{status}");
    assert_eq!(scripts, ["\"main\" ACTIVE"]);
    let (_, _) = ms.command("LOGOUT\r\n");
    // The script lives on the store, in the mailbox's home on the mail volume.
    assert!(store
        .work
        .join("mail/example.com/alice/sieve/main.sieve")
        .exists());

    let (code, text) = lmtp_message(
        p.lmtp,
        "alice@example.com",
        "[list] weekly digest",
        "digest1",
    );
    assert_eq!(code, 250, "{text}");
    let (code, text) = lmtp_message(p.lmtp, "alice@example.com", "lunch?", "lunch1");
    assert_eq!(code, 250, "{text}");

    // Filed by the script: the list mail in Lists, the other in INBOX, as IMAP through the proxy shows.
    let mut s = Session::connect(imap.ports.imap);
    let greeting = s.line();
    assert!(greeting.starts_with("* OK"), "{greeting}");
    let (_, done) = s.imap("LOGIN alice@example.com alice-pw");
    assert!(done.starts_with("t OK"), "{done}");
    let (lines, done) = s.imap("STATUS Lists (MESSAGES)");
    assert!(done.starts_with("t OK"), "{done}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("\"Lists\" (MESSAGES 1)") || l.contains("Lists (MESSAGES 1)")),
        "{lines:?}"
    );
    let (lines, _) = s.imap("STATUS INBOX (MESSAGES)");
    assert!(
        lines.iter().any(|l| l.contains("(MESSAGES 1)")),
        "{lines:?}"
    );
    let (lines, _) = s.imap("LSUB \"\" \"*\"");
    assert!(
        lines.iter().any(|l| l.trim_end().ends_with("Lists")),
        "the folder made by fileinto is subscribed: {lines:?}"
    );
    let _ = s.imap("LOGOUT");

    // The vacation reply, through the relay: a null sender, to the original sender, marked auto-replied.
    let (from, to, data) = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("a vacation reply at the relay");
    assert_eq!(from, "<>", "{data}");
    assert_eq!(to, ["<x@remote.test>"], "{data}");
    for want in [
        "Subject: Away\r\n",
        "To: <x@remote.test>\r\n",
        "In-Reply-To: <lunch1@remote.test>\r\n",
        "Auto-Submitted: auto-replied (vacation)\r\n",
        "I am away until Monday.",
    ] {
        assert!(data.contains(want), "{want:?} not in\n{data}");
    }
    assert!(
        data.contains("From: <alice@example.com>") || data.contains("From: alice@example.com"),
        "{data}"
    );
    // One reply: the list mail was filed before the vacation action.
    assert!(rx.recv_timeout(Duration::from_secs(2)).is_err());

    // Without a relay the vacation extension is off: a script using it is refused at upload.
    settings.features.sieve.relay = None;
    publish_settings(&site, &settings);
    let refused = wait_for("the store to drop vacation", WAIT, || {
        let mut ms = ManageSieve::connect_any(imap.ports.sieve)?;
        ms.login("alice@example.com", "alice-pw");
        let r = ms.put_script("again", SCRIPT);
        r.starts_with("NO").then_some(r)
    });
    assert!(refused.contains("vacation"), "{refused}");
}

/// A replica's labels file as the downward API writes it: replaced, never half-written.
fn set_role(labels: &std::path::Path, role: &str) {
    let tmp = labels.with_extension("tmp");
    std::fs::write(
        &tmp,
        format!("app.kubernetes.io/name=\"mailpod\"\nmailpod.io/lun=\"corp-lun-0\"\nmailpod.io/role=\"{role}\"\n"),
    )
    .unwrap();
    std::fs::rename(&tmp, labels).unwrap();
}

/// A store replica of LUN corp-lun-0 pulling from `peer` every second.
fn replica(
    site: &Site,
    name: &str,
    own: &Ports,
    peer: &Ports,
    labels: &std::path::Path,
    password: &std::path::Path,
) -> Agent {
    Agent::start_replica(
        site,
        name,
        own,
        (&support::pod::cluster_name("corp-lun-0"), peer.doveadm),
        password,
        labels,
        None,
    )
}

/// The replicas' labels files and doveadm password, active first.
fn replica_files(site: &Site) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let password = site.root.path().join("doveadm-password");
    std::fs::write(&password, "replication-secret\n").unwrap();
    let (labels_a, labels_b) = (
        site.root.path().join("a.labels"),
        site.root.path().join("b.labels"),
    );
    set_role(&labels_a, "active");
    set_role(&labels_b, "standby");
    (labels_a, labels_b, password)
}

#[test]
fn a_mailbox_over_quota_still_replicates_whole() {
    if !mail_software_present("a_mailbox_over_quota_still_replicates_whole") {
        return;
    }
    let mut site = Site::new(1_000_000);
    let mut settings = site.settings.clone();
    settings.features.quota = Some(QuotaSettings {
        storage_bytes: 0,
        messages: Some(3),
        tempfail: true,
    });
    publish_settings(&site, &settings);
    let (pa, pb) = (Ports::free(), Ports::free());
    site.lun(0, &pa);
    site.mailbox("alice@example.com", 0, "alice-pw");
    site.publish();
    let (labels_a, labels_b, password) = replica_files(&site);
    let a = replica(&site, "replica-a", &pa, &pb, &labels_a, &password);
    wait_accepts_writes(&a);
    let subjects: Vec<String> = (0..3).map(|i| format!("kept-{i}")).collect();
    deliver_lmtp(pa.lmtp, "alice@example.com", &subjects);
    // The limit drops below what the mailbox holds (an administrator lowers it): the active is over quota.
    settings.features.quota.as_mut().unwrap().messages = Some(1);
    publish_settings(&site, &settings);
    wait_for("the active to apply the lower limit", WAIT, || {
        let conf = std::fs::read_to_string(a.work.join("dovecot/dovecot.conf")).ok()?;
        (conf.contains("quota_rule2 = *:messages=1\n")
            && a.metric("mailpod_config_pending") == Some(0.0))
        .then_some(())
    });
    let (code, text) = wait_for("LMTP after the reload", WAIT, || {
        let r = lmtp_once(pa.lmtp, "alice@example.com", "one more", 100);
        (r.0 != 421 && r.0 != 0).then_some(r)
    });
    assert_eq!(code, 452, "the active is over quota: {text}");
    // A standby that starts now pulls every message, though its own limit is 1: replication is no delivery.
    let b = replica(&site, "replica-b", &pb, &pa, &labels_b, &password);
    wait_for("all three messages on the standby", WAIT, || {
        (maildir_subjects(&b, "alice@example.com") == subjects).then_some(())
    });
    assert_eq!(maildir_subjects(&a, "alice@example.com"), subjects);
}

#[test]
fn sieve_scripts_reach_the_standby_with_the_mail() {
    let test = "sieve_scripts_reach_the_standby_with_the_mail";
    if !mail_software_present(test) || !sieve_present(test) {
        return;
    }
    let mut site = Site::new(1_000_000);
    let (pa, pb) = (Ports::free(), Ports::free());
    site.lun(0, &pa);
    site.mailbox("alice@example.com", 0, "alice-pw");
    site.publish();
    let (labels_a, labels_b, password) = replica_files(&site);
    let a = replica(&site, "replica-a", &pa, &pb, &labels_a, &password);
    let b = replica(&site, "replica-b", &pb, &pa, &labels_b, &password);
    wait_accepts_writes(&a);

    let mut ms = ManageSieve::connect(pa.sieve);
    ms.login("alice@example.com", "alice-pw");
    let put = ms.put_script("main", "require \"fileinto\";\r\nfileinto \"Filed\";\r\n");
    assert!(put.starts_with("OK"), "{put}");
    let (status, _) = ms.command("SETACTIVE \"main\"\r\n");
    assert!(status.starts_with("OK"), "{status}");
    deliver_lmtp(pa.lmtp, "alice@example.com", &["filed".to_string()]);

    let home = b.work.join("mail/example.com/alice");
    wait_for("the script and the filed mail on the standby", WAIT, || {
        let script = std::fs::read_to_string(home.join("sieve/main.sieve")).ok()?;
        let filed = std::fs::read_dir(home.join("Maildir/.Filed/cur"))
            .into_iter()
            .chain(std::fs::read_dir(home.join("Maildir/.Filed/new")))
            .flatten()
            .count();
        (script.contains("fileinto \"Filed\"") && filed == 1).then_some(())
    });
    // Active on the standby too, so a promoted standby filters as the active did.
    let active = std::fs::read_link(home.join(".dovecot.sieve")).expect("an active script link");
    assert!(
        active.to_string_lossy().ends_with("main.sieve"),
        "{active:?}"
    );
}
