//! Inbound filtering with the real software: the mx agent's Postfix with the milter settings it renders,
//! and the filter of [`support::filter`] (Debian's rspamd, redis-server and clamd under the pod conditions,
//! cluster DNS answering NXDOMAIN for the internet, so rspamd's network checks fail fast as in an offline
//! cluster; a local test signature for clamd, since no download is possible here).

mod support;

use std::net::TcpListener;
use std::path::Path;
use std::time::{Duration, Instant};

use mailpod_operator::crd::FilteringSpec;
use mailpod_operator::mailconfig::settings::FilterSettings;
use support::filter::{filter_software_present, Filter, TEST_VIRUS};
use support::*;

/// rspamd's GTUBE: the pattern every spam filter refuses.
const GTUBE: &str = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X";

/// A site with one mailbox on a running store, settings pointing mx at `milter` with `policy`.
fn site_with_filter(milter: &str, timeout_seconds: u32, tempfail: bool) -> (Site, Agent) {
    let mut s = Site::new(2_000_000);
    let ps = Ports::free();
    s.lun(0, &ps);
    s.mailbox("dora@example.com", 0, "pw");
    s.publish();
    s.settings.filter = Some(FilterSettings {
        milter: milter.to_string(),
        timeout_seconds,
        tempfail_when_down: tempfail,
    });
    std::fs::write(s.config_dir().join("settings.yaml"), s.settings.to_yaml()).unwrap();
    let store = Agent::start(&s, "store", "store", &ps);
    (s, store)
}

/// One SMTP transaction with `body` as the whole message; the first reply that is not the expected one,
/// or the reply to the final dot.
fn transaction(port: u16, to: &str, message: &str) -> (u16, String) {
    let stream = connect_from_client_address(port);
    let mut s = Session::from_stream(stream.try_clone().unwrap());
    // Longer than any bounded wait of mx's (the read timeout is the socket's, shared by the clone).
    stream
        .set_read_timeout(Some(Duration::from_secs(90)))
        .unwrap();
    let (code, text) = s.smtp_reply();
    assert_eq!(code, 220, "banner: {text}");
    let (code, text) = s.smtp("EHLO client.test");
    if code != 250 {
        return (code, text);
    }
    for (command, want) in [
        ("MAIL FROM:<x@remote.test>".to_string(), 250),
        (format!("RCPT TO:<{to}>"), 250),
        ("DATA".to_string(), 354),
    ] {
        let (code, text) = s.smtp(&command);
        if code != want {
            return (code, text);
        }
    }
    s.send(message);
    let reply = s.smtp(".");
    let _ = s.smtp("QUIT");
    reply
}

fn plain(subject: &str, body: &str) -> String {
    format!(
        "From: <x@remote.test>\r\nTo: <dora@example.com>\r\nSubject: {subject}\r\n\
         Message-ID: <{subject}@remote.test>\r\nDate: Wed, 2 Dec 2026 07:00:00 +0000\r\n\r\n{body}\r\n"
    )
}

fn with_attachment(subject: &str, attachment: &str) -> String {
    format!(
        "From: <x@remote.test>\r\nTo: <dora@example.com>\r\nSubject: {subject}\r\n\
         Message-ID: <{subject}@remote.test>\r\nDate: Wed, 2 Dec 2026 07:00:00 +0000\r\nMIME-Version: 1.0\r\n\
         Content-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n--b1\r\nContent-Type: text/plain\r\n\r\n\
         the report is attached\r\n--b1\r\nContent-Type: application/octet-stream\r\n\
         Content-Disposition: attachment; filename=\"report.bin\"\r\nContent-Transfer-Encoding: base64\r\n\r\n\
         {}\r\n--b1--\r\n",
        base64(attachment.as_bytes())
    )
}

fn wait_delivered(store: &Agent, subject: &str) {
    wait_for(
        &format!("`{subject}` in dora's Maildir"),
        Duration::from_secs(30),
        || {
            maildir_subjects(store, "dora@example.com")
                .iter()
                .any(|s| s == subject)
                .then_some(())
        },
    );
}

fn maildir_file(store: &Agent, subject: &str) -> String {
    let dir = store.work.join("mail/example.com/dora/Maildir");
    for sub in ["new", "cur"] {
        for e in std::fs::read_dir(dir.join(sub))
            .into_iter()
            .flatten()
            .flatten()
        {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            if text.contains(&format!("Subject: {subject}\n")) {
                return text;
            }
        }
    }
    panic!("`{subject}` not delivered");
}

/// mx with its milter settings pointed at `filter` (whose ports are known only once it runs).
fn mx_behind(s: &Site, filter: &Filter) -> Agent {
    let mut settings = s.settings.clone();
    settings.filter.as_mut().unwrap().milter = filter.ep.milter.clone();
    std::fs::write(s.config_dir().join("settings.yaml"), settings.to_yaml()).unwrap();
    Agent::start(s, "mx", "mx", &Ports::free())
}

/// A clean message through `mx`, taken with 250 and delivered: the delivered file.
fn clean_mail_delivered(mx: &Agent, store: &Agent, filter: &Filter) -> String {
    let (code, text) = transaction(
        mx.ports.smtp,
        "dora@example.com",
        &plain("clean", "hello dora"),
    );
    assert_eq!(
        code,
        250,
        "clean mail: {text}\n{}",
        filter.rspamd.log_text()
    );
    wait_delivered(store, "clean");
    maildir_file(store, "clean")
}

fn queued_messages(mx: &Agent) -> usize {
    ["incoming", "active", "deferred", "maildrop", "hold"]
        .iter()
        .map(|q| walk_files(&mx.queue().join(q)))
        .sum()
}

fn walk_files(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| {
            if e.path().is_dir() {
                walk_files(&e.path())
            } else {
                1
            }
        })
        .sum()
}

#[test]
fn spam_and_a_test_virus_are_refused_at_data_clean_mail_is_delivered_and_a_filter_restart_loses_nothing(
) {
    if !filter_software_present("spam_and_a_test_virus_are_refused_at_data") {
        return;
    }
    let spec: FilteringSpec = serde_yaml::from_str("greylistScore: 0").unwrap();
    // mx's settings point at the filter once its ports are known.
    let (s, store) = site_with_filter("127.0.0.1:1", 30, true);
    let mut filter = Filter::start(&s, &spec);
    let mx = mx_behind(&s, &filter);

    let delivered = clean_mail_delivered(&mx, &store, &filter);
    assert!(
        delivered.contains("X-Spam-Status: No"),
        "rspamd's verdict header on delivered mail:\n{delivered}"
    );
    // SPF, DKIM and DMARC results for the receiver's mail client (offline here: no policy to find).
    assert!(
        delivered.contains("Authentication-Results: mail.example.com"),
        "inbound authentication results on delivered mail:\n{delivered}"
    );

    let (code, text) = transaction(mx.ports.smtp, "dora@example.com", &plain("gtube", GTUBE));
    assert!(
        (500..600).contains(&code),
        "GTUBE must be refused with a 5xx at DATA, got {code} {text}"
    );

    let (code, text) = transaction(
        mx.ports.smtp,
        "dora@example.com",
        &with_attachment("virus", TEST_VIRUS),
    );
    assert!(
        (500..600).contains(&code) && text.contains("Mailpod.Test.Virus"),
        "the test virus must be refused with a 5xx naming it, got {code} {text}\n{}",
        filter.rspamd.log_text()
    );

    // Filter down (tempfail): a 4xx, so the sending server keeps the message; mx holds nothing of it.
    filter.rspamd.stop();
    let (code, text) = transaction(
        mx.ports.smtp,
        "dora@example.com",
        &plain("retried", "again"),
    );
    assert!((400..500).contains(&code), "filter down: {code} {text}");
    assert_eq!(
        queued_messages(&mx),
        0,
        "nothing half-accepted in mx's queue"
    );
    // The sender's retry after the filter is back is taken and delivered.
    filter.restart_rspamd(&s);
    let (code, text) = transaction(
        mx.ports.smtp,
        "dora@example.com",
        &plain("retried", "again"),
    );
    assert_eq!(code, 250, "retry with the filter back: {text}");
    wait_delivered(&store, "retried");
    let subjects = maildir_subjects(&store, "dora@example.com");
    assert_eq!(
        subjects,
        ["clean", "retried"],
        "only clean mail delivered, once each"
    );
}

#[test]
fn filter_down_tempfails_or_accepts_as_the_spec_says_and_a_hung_filter_is_waited_for_a_bounded_time(
) {
    if !mail_software_present("filter_down_tempfails_or_accepts_as_the_spec_says") {
        return;
    }
    // Nothing listens on this port: the filter is down.
    let down = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };

    let (s, store) = site_with_filter(&format!("127.0.0.1:{down}"), 5, true);
    let mx = Agent::start(&s, "mx", "mx", &Ports::free());
    let (code, text) = transaction(mx.ports.smtp, "dora@example.com", &plain("tempfail", "x"));
    assert!((400..500).contains(&code), "tempfail policy: {code} {text}");
    assert_eq!(queued_messages(&mx), 0);
    assert!(maildir_subjects(&store, "dora@example.com").is_empty());
    drop(mx);

    // A filter that takes the connection and never answers: mx waits timeoutSeconds, no longer.
    let hung = TcpListener::bind("127.0.0.1:0").unwrap();
    let hung_port = hung.local_addr().unwrap().port();
    let mut settings = s.settings.clone();
    settings.filter.as_mut().unwrap().milter = format!("127.0.0.1:{hung_port}");
    std::fs::write(s.config_dir().join("settings.yaml"), settings.to_yaml()).unwrap();
    let mx = Agent::start(&s, "mx", "mx-hung", &Ports::free());
    let start = Instant::now();
    let (code, text) = transaction(mx.ports.smtp, "dora@example.com", &plain("hung", "x"));
    let waited = start.elapsed();
    assert!(
        (400..500).contains(&code),
        "hung filter, tempfail: {code} {text}"
    );
    assert!(
        waited < Duration::from_secs(5 * 3),
        "a hung filter held the client for {waited:?}"
    );
    eprintln!("hung filter: answered {code} after {waited:?} (timeoutSeconds 5)");
    drop(hung);
    drop(mx);

    // Accept policy: delivered unscanned while the filter is down.
    settings.filter = Some(FilterSettings {
        milter: format!("127.0.0.1:{down}"),
        timeout_seconds: 5,
        tempfail_when_down: false,
    });
    std::fs::write(s.config_dir().join("settings.yaml"), settings.to_yaml()).unwrap();
    let mx = Agent::start(&s, "mx", "mx-accept", &Ports::free());
    let (code, text) = transaction(mx.ports.smtp, "dora@example.com", &plain("accepted", "x"));
    assert_eq!(code, 250, "accept policy: {text}");
    wait_delivered(&store, "accepted");
    assert_eq!(maildir_subjects(&store, "dora@example.com"), ["accepted"]);
}

/// `redis-cli` against the filter's Redis: its output.
fn redis(filter: &Filter, args: &[&str]) -> String {
    let (host, port) = filter.ep.redis.rsplit_once(':').unwrap();
    let out = std::process::Command::new("/usr/bin/redis-cli")
        .args(["-h", host, "-p", port, "--raw"])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("redis-cli: {e}"));
    assert!(out.status.success(), "redis-cli {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A message rspamd scores without any network check: no Message-ID, no Date, no To header.
fn suspicious(subject: &str) -> String {
    format!("From: <x@remote.test>\r\nSubject: {subject}\r\n\r\nbuy now\r\n")
}

#[test]
fn a_suspicious_message_is_greylisted_then_taken_on_a_later_retry_with_the_spam_header() {
    if !filter_software_present("a_suspicious_message_is_greylisted") {
        return;
    }
    let spec: FilteringSpec =
        serde_yaml::from_str("greylistScore: 3\naddHeaderScore: 4\nrejectScore: 50").unwrap();
    let (s, store) = site_with_filter("127.0.0.1:1", 30, true);
    // rspamd's greylisting never greylists a client on a loopback address (any of 127/8, whatever
    // local_addrs says), and the test's client is on 127.0.0.2: here it is told to, as it would treat a
    // client from the internet. Nothing else of the rendered files changes.
    let filter = Filter::start_with(&s, &spec, |files| {
        files
            .get_mut("greylist.conf")
            .expect("greylist.conf rendered")
            .push_str("check_local = true;\n");
    });
    let mx = mx_behind(&s, &filter);

    // Clean mail scores under every threshold: taken at once, no spam header.
    let clean = clean_mail_delivered(&mx, &store, &filter);
    assert!(
        !clean.contains("X-Spam: Yes"),
        "clean mail marked:\n{clean}"
    );

    // Over greylistScore: 451 at DATA, and the sender's immediate retry too; mx keeps nothing of it.
    for attempt in ["first attempt", "immediate retry"] {
        let (code, text) = transaction(mx.ports.smtp, "dora@example.com", &suspicious("grey"));
        assert!(
            (400..500).contains(&code),
            "{attempt}: greylisting answers 4xx, got {code} {text}\n{}",
            filter.rspamd.log_text()
        );
        assert_eq!(queued_messages(&mx), 0, "{attempt}: nothing queued at mx");
    }
    // The record is in the MailPod's Redis (shared by every mx replica): the body and the envelope key.
    let keys: Vec<String> = redis(&filter, &["KEYS", "rg*"])
        .lines()
        .map(str::to_string)
        .filter(|k| !k.is_empty())
        .collect();
    assert_eq!(keys.len(), 2, "greylisting records in Redis: {keys:?}");
    // Six minutes pass for the records (greylisting waits 5): the sender's next retry is taken, with the
    // header of the add-header action, and delivered once.
    let first_seen = jiff::Timestamp::now().as_second() - 360;
    for k in &keys {
        redis(&filter, &["SET", k, &first_seen.to_string(), "KEEPTTL"]);
    }
    let (code, text) = transaction(mx.ports.smtp, "dora@example.com", &suspicious("grey"));
    assert_eq!(
        code,
        250,
        "retry after the greylisting delay: {text}\n{}",
        filter.rspamd.log_text()
    );
    wait_delivered(&store, "grey");
    let grey = maildir_file(&store, "grey");
    assert!(
        grey.contains("X-Spam: Yes"),
        "over addHeaderScore: delivered with `X-Spam: Yes`:\n{grey}"
    );
    assert_eq!(
        maildir_subjects(&store, "dora@example.com"),
        ["clean", "grey"]
    );
}
