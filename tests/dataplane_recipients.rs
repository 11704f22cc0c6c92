//! Who mx takes mail for, with the real Postfix under pod conditions: an unknown address in a hosted domain
//! and an unknown recipient of a relay domain are refused at RCPT with a permanent 550 (never accepted and
//! bounced later), a relay domain's recipients come from its list or from its next hop's answer, and a known
//! mailbox whose LUN has no endpoint yet is accepted and waits in the queue until the LUN answers.

mod support;

use std::time::{Duration, Instant};

use support::downstream::Downstream;
use support::*;

const WAIT: Duration = Duration::from_secs(30);

/// The answer to `RCPT TO:<rcpt>` in a fresh session. A recipient the next hop is still being asked
/// about gets 450 `verification in progress` at first; ask again (bounded) until the answer is final.
fn rcpt(port: u16, rcpt: &str) -> (u16, String) {
    let start = Instant::now();
    loop {
        let mut s = Session::connect(port);
        assert_eq!(s.smtp_reply().0, 220);
        assert_eq!(s.smtp("EHLO client.test").0, 250);
        assert_eq!(s.smtp("MAIL FROM:<x@remote.test>").0, 250);
        let (code, text) = s.smtp(&format!("RCPT TO:<{rcpt}>"));
        let _ = s.smtp("QUIT");
        if !(code == 450 && text.contains("in progress")) || start.elapsed() > WAIT {
            return (code, text);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The queue of a Postfix pod as `postqueue -j` shows it: (recipient, delay reason) per queued recipient.
fn queued(agent: &Agent) -> Vec<(String, String)> {
    let out = std::process::Command::new("postqueue")
        .arg("-c")
        .arg(agent.work.join("postfix"))
        .arg("-j")
        .output()
        .unwrap();
    assert!(out.status.success(), "postqueue -j: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .flat_map(|m| m["recipients"].as_array().cloned().unwrap_or_default())
        .map(|r| {
            let s = |k: &str| r[k].as_str().unwrap_or_default().to_string();
            (s("address"), s("delay_reason"))
        })
        .collect()
}

#[test]
fn unknown_recipients_are_refused_at_rcpt_and_mail_for_a_lun_without_endpoint_waits() {
    if !mail_software_present(
        "unknown_recipients_are_refused_at_rcpt_and_mail_for_a_lun_without_endpoint_waits",
    ) {
        return;
    }
    let mut site = Site::new(1_000_000);
    // The next hop of both relay domains knows amy@listed.test and vic@verified.test only.
    let downstream = Downstream::start(&site, "partner-mx", |r| {
        r == "amy@listed.test" || r == "vic@verified.test"
    });
    let p0 = Ports::free();
    site.lun(0, &p0);
    site.mailbox("alice@example.com", 0, "pw");
    // A mailbox on LUN 5, which has no store endpoint yet.
    site.tables
        .mailboxes
        .insert("waiting@example.com".into(), 5);
    for d in ["listed.test", "verified.test"] {
        site.tables
            .relay_domains
            .insert(d.into(), downstream.next_hop());
    }
    site.tables
        .relay_recipients
        .insert("amy@listed.test".into());
    site.publish();
    let store = Agent::start(&site, "store", "store0", &p0);
    let mx = Agent::start(&site, "mx", "mx", &Ports::free());
    let port = mx.ports.smtp;

    // Hosted domain: a mailbox is taken, an unknown address refused for good.
    assert_eq!(rcpt(port, "alice@example.com").0, 250);
    let (code, text) = rcpt(port, "nobody@example.com");
    assert_eq!(code, 550, "unknown user in a hosted domain: {text}");
    assert!(text.contains("5.1.1"), "{text}");

    // Relay domain with a recipient list: only the listed address, and the next hop is not asked.
    let (code, text) = rcpt(port, "amy@listed.test");
    assert_eq!(code, 250, "{text}");
    let (code, text) = rcpt(port, "bob@listed.test");
    assert_eq!(code, 550, "unlisted recipient of a relay domain: {text}");
    assert!(text.contains("5.1.1"), "{text}");
    assert!(
        !downstream
            .asked
            .lock()
            .unwrap()
            .iter()
            .any(|r| r.ends_with("@listed.test")),
        "a listed relay domain needs no probe"
    );

    // Relay domain without a list: the next hop's answer decides, at RCPT.
    let (code, text) = rcpt(port, "vic@verified.test");
    assert_eq!(code, 250, "{text}");
    let (code, text) = rcpt(port, "ghost@verified.test");
    assert_eq!(code, 550, "recipient the next hop refuses: {text}");
    assert!(
        downstream
            .asked
            .lock()
            .unwrap()
            .iter()
            .any(|r| r == "ghost@verified.test"),
        "the next hop was asked"
    );

    // Accepted relay mail reaches the next hop.
    assert_eq!(
        send_mail(port, "x@remote.test", &["amy@listed.test"], "to-amy", 100).0,
        250
    );
    let got = std::iter::from_fn(|| downstream.receive(WAIT))
        .find(|m| m.data.contains("Subject: to-amy"))
        .expect("relayed mail at the next hop");
    assert_eq!(got.to, ["amy@listed.test"]);

    // A known mailbox whose LUN has no endpoint: accepted, then it waits in the queue (not bounced).
    let (code, text) = send_mail(
        port,
        "x@remote.test",
        &["waiting@example.com"],
        "waits",
        100,
    );
    assert_eq!(code, 250, "mail for a LUN without endpoint: {text}");
    let reason = wait_for("the message deferred in the queue", WAIT, || {
        queued(&mx)
            .into_iter()
            .find(|(a, r)| a == "waiting@example.com" && !r.is_empty())
            .map(|(_, r)| r)
    });
    assert!(
        reason.contains("lun-5-has-no-store-endpoint-yet") && reason.contains("No such file"),
        "{reason}"
    );
    // Once LUN 5 answers (here by the same store), the queued mail is delivered.
    site.lun(5, &p0);
    site.publish();
    // Up to one retry interval of the agent's (30 s, agent::store_flush) more than the other waits: a
    // retry that reaches Postfix before its trivial-rewrite has reopened the changed transport map is
    // deferred once more, and the next one comes an interval later.
    wait_for(
        "the waiting mail delivered once its LUN answers",
        WAIT + Duration::from_secs(30),
        || {
            mx.flush_queue();
            maildir_subjects(&store, "waiting@example.com")
                .contains(&"waits".to_string())
                .then_some(())
        },
    );
    assert!(queued(&mx).is_empty(), "{:?}", queued(&mx));
}
