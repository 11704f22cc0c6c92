//! Mail flow through the rendered configuration with the real Postfix and Dovecot: SMTP to mx -> LMTP to the
//! mailbox's own LUN -> read back over IMAP and POP3 through the proxy roles; access-table changes applied
//! without restarting anything.

mod support;

use std::time::Duration;

use mailpod_operator::mailconfig::tables::AccessEntry;
use support::*;

const WAIT: Duration = Duration::from_secs(20);

#[test]
fn mail_reaches_own_lun_and_reads_back_through_proxies_and_tables_change_live() {
    if !mail_software_present(
        "mail_reaches_own_lun_and_reads_back_through_proxies_and_tables_change_live",
    ) {
        return;
    }
    let mut site = Site::new(1_000_000);
    let (p0, p1) = (Ports::free(), Ports::free());
    site.lun(0, &p0);
    site.lun(1, &p1);
    site.mailbox("alice@example.com", 0, "alice-pw");
    site.mailbox("bob@example.com", 1, "bob-pw");
    site.tables
        .aliases
        .insert("sales@example.com".into(), vec!["alice@example.com".into()]);
    site.publish();

    let store0 = Agent::start(&site, "store", "store0", &p0);
    let store1 = Agent::start(&site, "store", "store1", &p1);
    let mx = Agent::start(&site, "mx", "mx", &Ports::free());
    let imap = Agent::start(&site, "imap", "imap", &Ports::free());
    let pop3 = Agent::start(&site, "pop3", "pop3", &Ports::free());
    for a in [&store0, &store1, &mx, &imap, &pop3] {
        assert_eq!(a.get("/healthz").0, 200, "{} healthz", a.role);
    }

    // Each user's mail lands on their own LUN only.
    assert_eq!(
        send_mail(
            mx.ports.smtp,
            "x@remote.test",
            &["alice@example.com"],
            "for-alice",
            100
        )
        .0,
        250
    );
    assert_eq!(
        send_mail(
            mx.ports.smtp,
            "x@remote.test",
            &["bob@example.com"],
            "for-bob",
            100
        )
        .0,
        250
    );
    wait_for("alice's mail on LUN 0", WAIT, || {
        (maildir_subjects(&store0, "alice@example.com") == ["for-alice"]).then_some(())
    });
    wait_for("bob's mail on LUN 1", WAIT, || {
        (maildir_subjects(&store1, "bob@example.com") == ["for-bob"]).then_some(())
    });
    assert!(
        maildir_subjects(&store1, "alice@example.com").is_empty(),
        "alice's mail must not reach LUN 1"
    );
    assert!(
        maildir_subjects(&store0, "bob@example.com").is_empty(),
        "bob's mail must not reach LUN 0"
    );

    // mx relays for nobody, whatever address the client has: loopback (a port-forward, a mesh sidecar)
    // included.
    for stream in [
        connect_from_client_address(mx.ports.smtp),
        std::net::TcpStream::connect(("127.0.0.1", mx.ports.smtp)).unwrap(),
    ] {
        let peer = stream.local_addr().unwrap().ip();
        let mut s = Session::from_stream(stream);
        assert_eq!(s.smtp_reply().0, 220);
        assert_eq!(s.smtp("EHLO client.test").0, 250);
        assert_eq!(s.smtp("MAIL FROM:<x@remote.test>").0, 250);
        let (code, text) = s.smtp("RCPT TO:<someone@elsewhere.test>");
        assert_eq!(code, 554, "relay from {peer}: {text}");
        assert!(text.contains("Relay access denied"), "{text}");
        let _ = s.smtp("QUIT");
    }

    // IMAP through the imap proxy, which routes alice to LUN 0.
    let mut s = Session::connect(imap.ports.imap);
    assert!(s.line().starts_with("* OK"));
    let (_, st) = s.imap("LOGIN alice@example.com wrong-pw");
    assert!(
        st.starts_with("t NO"),
        "wrong password must fail at the store: {st}"
    );
    let (_, st) = s.imap("LOGIN alice@example.com alice-pw");
    assert!(st.starts_with("t OK"), "{st}");
    let (untagged, st) = s.imap("SELECT INBOX");
    assert!(st.starts_with("t OK"), "{st}");
    assert!(
        untagged.iter().any(|l| l.trim_end() == "* 1 EXISTS"),
        "{untagged:?}"
    );
    let (lines, st) = s.imap("FETCH 1 (BODY.PEEK[HEADER.FIELDS (SUBJECT)])");
    assert!(st.starts_with("t OK"), "{st}");
    assert!(
        lines.iter().any(|l| l.trim_end() == "Subject: for-alice"),
        "{lines:?}"
    );
    s.imap("LOGOUT");

    // POP3 through the pop3 proxy, which routes bob to LUN 1.
    let mut p = Session::connect(pop3.ports.pop3);
    assert!(p.line().starts_with("+OK"));
    p.send("USER bob@example.com\r\n");
    assert!(p.line().starts_with("+OK"));
    p.send("PASS bob-pw\r\n");
    let l = p.line();
    assert!(l.starts_with("+OK"), "{l}");
    p.send("STAT\r\n");
    let stat = p.line();
    assert!(stat.starts_with("+OK 1 "), "{stat}");
    p.send("RETR 1\r\n");
    let mut retr = String::new();
    loop {
        let l = p.line();
        if l == ".\r\n" || l.is_empty() {
            break;
        }
        retr.push_str(&l);
    }
    assert!(retr.contains("Subject: for-bob"), "{retr}");
    p.send("QUIT\r\n");

    // Access-table changes, applied the way the kubelet updates a ConfigMap, with no restart.
    let pids: Vec<u32> = [&store0, &store1, &mx].iter().map(|a| a.pid()).collect();
    let applies_before = mx.metric("mailpod_config_applies_total").unwrap();
    let hash_before = site.tables.hash();
    site.tables.recipient_access.push(AccessEntry {
        pattern: "bob@example.com".into(),
        action: "REJECT mailbox closed".into(),
    });
    site.tables
        .aliases
        .insert("sales@example.com".into(), vec!["bob@example.com".into()]);
    site.tables
        .recipient_access
        .sort_by(|a, b| a.pattern.cmp(&b.pattern));
    // Only the alias changes bob's routing; the REJECT applies to mail addressed to bob directly.
    site.publish();
    let new_hash = site.tables.hash();
    assert_ne!(new_hash, hash_before);
    wait_for("mx to apply the new tables", WAIT, || {
        mx.get("/metrics")
            .1
            .contains(&format!(
                "mailpod_access_tables_info{{hash=\"{new_hash}\"}} 1"
            ))
            .then_some(())
    });
    assert!(mx.metric("mailpod_config_applies_total").unwrap() > applies_before);
    let (code, text) = wait_for("the REJECT to take effect", WAIT, || {
        let r = send_mail(
            mx.ports.smtp,
            "x@remote.test",
            &["bob@example.com"],
            "rejected",
            10,
        );
        (r.0 != 250).then_some(r)
    });
    assert_eq!(code, 554, "REJECT answers 554: {text}");
    assert!(text.contains("mailbox closed"), "{text}");
    assert_eq!(
        send_mail(
            mx.ports.smtp,
            "x@remote.test",
            &["sales@example.com"],
            "sales-1",
            10
        )
        .0,
        250
    );
    wait_for(
        "sales@ mail delivered to bob through the new alias",
        WAIT,
        || {
            maildir_subjects(&store1, "bob@example.com")
                .contains(&"sales-1".to_string())
                .then_some(())
        },
    );
    assert!(!maildir_subjects(&store0, "alice@example.com").contains(&"sales-1".to_string()));
    assert_eq!(
        [&store0, &store1, &mx]
            .iter()
            .map(|a| a.pid())
            .collect::<Vec<_>>(),
        pids,
        "no agent was restarted"
    );
    assert_eq!(
        mx.metric("mailpod_child_restarts_total{service=\"postfix\"}")
            .unwrap_or(0.0),
        0.0
    );

    // Orderly shutdown on SIGTERM.
    let mut agents = [store0, store1, mx, imap, pop3];
    for a in agents.iter_mut() {
        assert!(a.stop(), "{} agent must exit cleanly on SIGTERM", a.role);
    }
}

/// A configuration that fails to apply (here a compiled map cannot be replaced) is not forgotten: the
/// agent reports it (failures counter, pending gauge, /readyz 503 naming it) and retries with backoff until
/// it applies, with no further ConfigMap change.
#[test]
fn a_configuration_that_fails_to_apply_is_reported_and_retried() {
    if !mail_software_present("a_configuration_that_fails_to_apply_is_reported_and_retried") {
        return;
    }
    let mut site = Site::new(1_000_000);
    let p0 = Ports::free();
    site.lun(0, &p0);
    site.mailbox("alice@example.com", 0, "alice-pw");
    site.publish();
    let _store = Agent::start(&site, "store", "store0", &p0);
    let mx = Agent::start(&site, "mx", "mx", &Ports::free());
    assert_eq!(mx.metric("mailpod_config_pending"), Some(0.0));

    // The compiled recipient_access map cannot be replaced: a directory stands where it goes.
    let db = mx.work.join("postfix/maps/recipient_access.lmdb");
    std::fs::remove_file(&db).unwrap();
    std::fs::create_dir(&db).unwrap();
    site.tables.recipient_access.push(AccessEntry {
        pattern: "alice@example.com".into(),
        action: "REJECT mailbox closed".into(),
    });
    site.publish();
    wait_for("the failed apply to be reported", WAIT, || {
        (mx.metric("mailpod_config_apply_failures_total")
            .unwrap_or(0.0)
            >= 1.0)
            .then_some(())
    });
    assert_eq!(mx.metric("mailpod_config_pending"), Some(1.0));
    let (code, body) = mx.get("/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("not applied") && body.contains("recipient_access"),
        "{body}"
    );

    // The obstacle goes; nothing else changes: a retry applies the configuration.
    std::fs::remove_dir(&db).unwrap();
    wait_for("a retry to apply the configuration", WAIT, || {
        (mx.metric("mailpod_config_pending") == Some(0.0)).then_some(())
    });
    assert_eq!(mx.get("/readyz").0, 200);
    let (code, text) = send_mail(
        mx.ports.smtp,
        "x@remote.test",
        &["alice@example.com"],
        "closed",
        10,
    );
    assert_eq!(code, 554, "the REJECT applies: {text}");
}
