//! Quotas with the real Dovecot, as a store renders them: over quota, LMTP answers what the MailPod chose
//! (452 4.2.2 to defer, 552 5.2.2 to refuse; switched live through the settings ConfigMap), IMAP APPEND
//! is refused with `[OVERQUOTA]`, a per-mailbox override from the access tables replaces the default,
//! and the agent's /metrics shows each mailbox's usage and limits.

mod support;

use std::time::Duration;

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
    let body = format!(
        "{}.\r\n",
        message("x@remote.test", &[to], subject, body_bytes)
    );
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
