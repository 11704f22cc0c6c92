//! A paused or stopped store defers mail; when it returns, every message is delivered exactly once, at
//! once (the agent retries the mail that waited for a store; nobody runs `postqueue -f`), while retries
//! to the internet keep Postfix's default schedule.
//! Also: the SMTP codes for failed authentication (535) and oversized messages (552).

mod support;

use std::time::Duration;

use support::*;

const WAIT: Duration = Duration::from_secs(20);
/// How soon mail that waited for a store must arrive once the store takes deliveries again: well below
/// any Postfix backoff (the agent looks every 2 s).
const PROMPT: Duration = Duration::from_secs(8);
const N: usize = 5;

fn deferred_in_queue(mx: &Agent) -> usize {
    mx.metric("mailpod_queue_messages{queue=\"deferred\"}")
        .unwrap_or(0.0) as usize
}

#[test]
fn paused_or_stopped_store_defers_then_delivers_all_exactly_once() {
    if !mail_software_present("paused_or_stopped_store_defers_then_delivers_all_exactly_once") {
        return;
    }
    let mut site = Site::new(1_000_000);
    let ps = Ports::free();
    site.lun(0, &ps);
    site.mailbox("carol@example.com", 0, "pw");
    site.publish();
    let mut store = Agent::start(&site, "store", "store", &ps);
    let mx = Agent::start(&site, "mx", "mx", &Ports::free());

    // Pause: the LMTP gate answers 4xx, mail waits in the mx queue.
    assert_eq!(store.post("/pause").0, 400, "a pause needs a deadline");
    let (code, body) = store.post("/pause?seconds=120");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"drained\":true"), "{body}");
    assert_eq!(store.metric("mailpod_lmtp_paused").unwrap(), 1.0);
    for i in 0..N {
        assert_eq!(
            send_mail(
                mx.ports.smtp,
                "x@remote.test",
                &["carol@example.com"],
                &format!("paused-{i}"),
                50
            )
            .0,
            250
        );
    }
    wait_for("all paused mail deferred", WAIT, || {
        (deferred_in_queue(&mx) == N).then_some(())
    });
    assert!(
        maildir_subjects(&store, "carol@example.com").is_empty(),
        "nothing delivered while paused"
    );
    let log = std::fs::read_to_string(mx.work.join("log/postfix.log")).unwrap();
    assert!(
        log.contains("421 4.3.2"),
        "deferral reason is the gate's 4xx"
    );

    assert_eq!(store.post("/resume").0, 200);
    let resumed = std::time::Instant::now();
    wait_for("paused mail delivered", PROMPT, || {
        (maildir_subjects(&store, "carol@example.com").len() >= N).then_some(())
    });
    // Give a duplicate a chance to show up before counting.
    std::thread::sleep(Duration::from_millis(500));
    let got = maildir_subjects(&store, "carol@example.com");
    assert_eq!(got.len(), N, "none lost, none duplicated: {got:?}");
    assert_eq!(unique(&got).len(), N);
    eprintln!(
        "{N} messages held by a pause delivered {:?} after resume",
        resumed.elapsed()
    );
    wait_for("empty queue", WAIT, || {
        (deferred_in_queue(&mx) == 0).then_some(())
    });

    // Stopped: the store is gone entirely, then comes back on the same volume.
    assert!(store.stop());
    for i in 0..N {
        assert_eq!(
            send_mail(
                mx.ports.smtp,
                "x@remote.test",
                &["carol@example.com"],
                &format!("down-{i}"),
                50
            )
            .0,
            250
        );
    }
    wait_for("mail deferred while the store is down", WAIT, || {
        (deferred_in_queue(&mx) == N).then_some(())
    });
    let store = Agent::start(&site, "store", "store", &ps);
    wait_for("mail delivered after the store returned", PROMPT, || {
        (maildir_subjects(&store, "carol@example.com").len() >= 2 * N).then_some(())
    });
    std::thread::sleep(Duration::from_millis(500));
    let got = maildir_subjects(&store, "carol@example.com");
    assert_eq!(got.len(), 2 * N, "{got:?}");
    assert_eq!(unique(&got).len(), 2 * N, "{got:?}");
    assert!(
        mx.metric("mailpod_deliveries_total{status=\"deferred\"}")
            .unwrap()
            >= (2 * N) as f64
    );
    assert!(
        mx.metric("mailpod_deliveries_total{status=\"sent\"}")
            .unwrap()
            >= (2 * N) as f64
    );
}

/// `postconf -h NAME` of a pod's rendered Postfix configuration, as Postfix itself reads it.
fn postconf(agent: &Agent, name: &str) -> String {
    let out = std::process::Command::new("postconf")
        .arg("-c")
        .arg(agent.work.join("postfix"))
        .args(["-h", name])
        .output()
        .unwrap();
    assert!(out.status.success(), "postconf {name}: {out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn internet_retries_keep_postfix_defaults_while_a_store_gets_its_mail_at_once() {
    if !mail_software_present(
        "internet_retries_keep_postfix_defaults_while_a_store_gets_its_mail_at_once",
    ) {
        return;
    }
    let mut site = Site::new(1_000_000);
    let ps = Ports::free();
    site.lun(0, &ps);
    site.mailbox("frank@example.com", 0, "pw");
    site.publish();
    let store = Agent::start(&site, "store", "store", &ps);
    let mx = Agent::start(&site, "mx", "mx", &Ports::free());
    let sub = Agent::start(&site, "submission", "submission", &Ports::free());
    // One schedule per Postfix instance, for every destination: the internet gets Postfix's own.
    for agent in [&mx, &sub] {
        assert_eq!(postconf(agent, "minimal_backoff_time"), "300s");
        assert_eq!(postconf(agent, "maximal_backoff_time"), "4000s");
        assert_eq!(postconf(agent, "queue_run_delay"), "300s");
    }

    // A snapshot-length pause: mail deferred, then delivered within seconds of the resume, with no
    // `postqueue -f` from anyone (Postfix alone would wait its 300 s backoff).
    assert_eq!(store.post("/pause?seconds=60").0, 200);
    for i in 0..2 {
        assert_eq!(
            send_mail(
                mx.ports.smtp,
                "x@remote.test",
                &["frank@example.com"],
                &format!("held-{i}"),
                50
            )
            .0,
            250
        );
    }
    wait_for("the held mail deferred", WAIT, || {
        (deferred_in_queue(&mx) == 2).then_some(())
    });
    // Still paused: nothing is pushed at a store that refuses.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(deferred_in_queue(&mx), 2);
    let log = std::fs::read_to_string(mx.work.join("log/postfix.log")).unwrap();
    assert_eq!(
        log.matches("status=deferred").count(),
        2,
        "one attempt per message while the store is paused:\n{log}"
    );
    assert_eq!(store.post("/resume").0, 200);
    let resumed = std::time::Instant::now();
    wait_for("the held mail delivered after resume", PROMPT, || {
        (maildir_subjects(&store, "frank@example.com").len() == 2).then_some(())
    });
    eprintln!("held mail delivered {:?} after resume", resumed.elapsed());
    wait_for("an empty queue", WAIT, || {
        (deferred_in_queue(&mx) == 0).then_some(())
    });
}

#[test]
fn pause_expires_by_itself() {
    if !mail_software_present("pause_expires_by_itself") {
        return;
    }
    let mut site = Site::new(1_000_000);
    let ps = Ports::free();
    site.lun(0, &ps);
    site.mailbox("dave@example.com", 0, "pw");
    site.publish();
    let store = Agent::start(&site, "store", "store", &ps);
    assert_eq!(store.post("/pause?seconds=1").0, 200);
    let mut s = Session::connect(ps.lmtp);
    assert!(s.line().starts_with("421 4.3.2"));
    wait_for("the pause to expire", Duration::from_secs(5), || {
        let mut s = Session::connect(ps.lmtp);
        s.line().starts_with("220").then_some(())
    });
    assert_eq!(store.metric("mailpod_lmtp_paused").unwrap(), 0.0);
}

/// Whoever reaches the control port without the LUN's control token cannot hold the store's mail.
#[test]
fn control_requests_without_the_luns_token_hold_no_mail() {
    if !mail_software_present("control_requests_without_the_luns_token_hold_no_mail") {
        return;
    }
    let mut site = Site::new(1_000_000);
    let ps = Ports::free();
    site.lun(0, &ps);
    site.mailbox("dave@example.com", 0, "pw");
    site.publish();
    let store = Agent::start(&site, "store", "store", &ps);
    for token in [None, Some("guess"), Some("")] {
        let (code, body) = store.post_as("/pause?seconds=60", token);
        assert_eq!(code, 401, "token {token:?}: {body}");
        assert_eq!(store.post_as("/resume", token).0, 401);
    }
    assert_eq!(store.metric("mailpod_lmtp_paused").unwrap(), 0.0);
    let mut s = Session::connect(ps.lmtp);
    assert!(s.line().starts_with("220"), "LMTP still takes deliveries");

    // Without its token file the port admits nobody, not even the old token.
    let token_file = site.root.path().join("store.control-token");
    std::fs::remove_file(&token_file).unwrap();
    assert_eq!(store.post("/pause?seconds=60").0, 503);
    // A token mounted later (the Secret created after the pod) is read on the next request.
    std::fs::write(&token_file, CONTROL_TOKEN).unwrap();
    assert_eq!(store.post("/pause?seconds=60").0, 200);
    let mut s = Session::connect(ps.lmtp);
    assert!(s.line().starts_with("421 4.3.2"), "paused with the token");
    assert_eq!(store.post("/resume").0, 200);
}

#[test]
fn auth_failure_535_and_oversized_552() {
    if !mail_software_present("auth_failure_535_and_oversized_552") {
        return;
    }
    let mut site = Site::new(20_000);
    let ps = Ports::free();
    site.lun(0, &ps);
    site.mailbox("erin@example.com", 0, "erin-pw");
    site.publish();
    let store = Agent::start(&site, "store", "store", &ps);
    let mx = Agent::start(&site, "mx", "mx", &Ports::free());
    let sub = Agent::start(&site, "submission", "submission", &Ports::free());

    // Submission refuses unauthenticated relaying and a wrong password; accepts the right one.
    let plain = |user: &str, pw: &str| {
        let raw = format!("\0{user}\0{pw}");
        base64(raw.as_bytes())
    };
    let mut s = Session::connect(sub.ports.submission);
    assert_eq!(s.smtp_reply().0, 220);
    let (code, ehlo) = s.smtp("EHLO client.test");
    assert_eq!(code, 250);
    assert!(ehlo.contains("AUTH PLAIN"), "{ehlo}");
    assert_eq!(s.smtp("MAIL FROM:<erin@example.com>").0, 250);
    let (code, text) = s.smtp("RCPT TO:<someone@remote.test>");
    assert_eq!(code, 554, "unauthenticated relay refused: {text}");
    s.smtp("RSET");
    let (code, text) = s.smtp(&format!(
        "AUTH PLAIN {}",
        plain("erin@example.com", "wrong")
    ));
    assert_eq!(code, 535, "{text}");
    let (code, text) = s.smtp(&format!(
        "AUTH PLAIN {}",
        plain("erin@example.com", "erin-pw")
    ));
    assert_eq!(code, 235, "{text}");
    assert_eq!(s.smtp("MAIL FROM:<erin@example.com>").0, 250);
    assert_eq!(s.smtp("RCPT TO:<erin@example.com>").0, 250);
    assert_eq!(s.smtp("DATA").0, 354);
    s.send(&message(
        "erin@example.com",
        &["erin@example.com"],
        "submitted",
        10,
    ));
    assert_eq!(s.smtp(".").0, 250);
    s.smtp("QUIT");
    wait_for("submitted mail delivered", WAIT, || {
        (maildir_subjects(&store, "erin@example.com") == ["submitted"]).then_some(())
    });

    // mx: declared size over the limit (MAIL FROM SIZE=) and actual size over the limit.
    let mut s = Session::connect(mx.ports.smtp);
    assert_eq!(s.smtp_reply().0, 220);
    assert_eq!(s.smtp("EHLO client.test").0, 250);
    let (code, text) = s.smtp("MAIL FROM:<x@remote.test> SIZE=50000");
    assert_eq!(code, 552, "{text}");
    s.smtp("QUIT");
    let (code, text) = send_mail(
        mx.ports.smtp,
        "x@remote.test",
        &["erin@example.com"],
        "too-big",
        30_000,
    );
    assert_eq!(code, 552, "{text}");
    assert_eq!(
        send_mail(
            mx.ports.smtp,
            "x@remote.test",
            &["erin@example.com"],
            "fits",
            5_000
        )
        .0,
        250
    );
    wait_for("the message that fits", WAIT, || {
        maildir_subjects(&store, "erin@example.com")
            .contains(&"fits".to_string())
            .then_some(())
    });
    assert!(!maildir_subjects(&store, "erin@example.com").contains(&"too-big".to_string()));
}

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
