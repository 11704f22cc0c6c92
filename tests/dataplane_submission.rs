//! Submission under real Postfix: an authenticated user sends only as its own mailbox or as an alias that
//! delivers to it, never as another user, another alias or an address of another domain.

mod support;

use std::time::Duration;

use support::*;

/// The reply to RCPT TO after `MAIL FROM:<from>` (Postfix decides sender restrictions at RCPT), then RSET.
fn sender_verdict(s: &mut Session, from: &str, to: &str) -> (u16, String) {
    let (code, text) = s.smtp(&format!("MAIL FROM:<{from}>"));
    let verdict = if code == 250 {
        s.smtp(&format!("RCPT TO:<{to}>"))
    } else {
        (code, text)
    };
    assert_eq!(s.smtp("RSET").0, 250);
    verdict
}

#[test]
fn an_authenticated_user_sends_only_as_itself_or_its_aliases() {
    if !mail_software_present("an_authenticated_user_sends_only_as_itself_or_its_aliases") {
        return;
    }
    let mut site = Site::new(1_000_000);
    let ps = Ports::free();
    site.lun(0, &ps);
    site.mailbox("alice@example.com", 0, "alice-pw");
    site.mailbox("bob@example.com", 0, "bob-pw");
    site.tables
        .aliases
        .insert("sales@example.com".into(), vec!["alice@example.com".into()]);
    site.tables.aliases.insert(
        "team@example.com".into(),
        vec!["alice@example.com".into(), "bob@example.com".into()],
    );
    site.publish();
    let store = Agent::start(&site, "store", "store", &ps);
    let sub = Agent::start(&site, "submission", "submission", &Ports::free());

    let mut alice = logged_in(sub.ports.submission, "alice@example.com", "alice-pw");
    let mut bob = logged_in(sub.ports.submission, "bob@example.com", "bob-pw");
    for (who, from, allowed) in [
        ("alice", "alice@example.com", true),
        ("alice", "sales@example.com", true),
        ("alice", "team@example.com", true),
        ("alice", "bob@example.com", false),
        ("alice", "ceo@remote.test", false),
        ("alice", "nobody@example.com", false),
        ("bob", "bob@example.com", true),
        ("bob", "team@example.com", true),
        ("bob", "sales@example.com", false),
        ("bob", "alice@example.com", false),
        ("bob", "ALICE@Example.com", false),
    ] {
        let session = if who == "alice" { &mut alice } else { &mut bob };
        let (code, text) = sender_verdict(session, from, "someone@remote.test");
        if allowed {
            assert_eq!(code, 250, "{who} as <{from}>: {text}");
        } else {
            assert_eq!(
                code,
                553,
                "{who} as <{from}>: {text}\n{}",
                std::fs::read_to_string(sub.work.join("postfix/main.cf")).unwrap()
            );
            assert!(text.contains("5.7.1"), "{who} as <{from}>: {text}");
        }
    }

    // What is allowed is delivered: alice as the sales alias, to bob.
    assert_eq!(alice.smtp("MAIL FROM:<sales@example.com>").0, 250);
    assert_eq!(alice.smtp("RCPT TO:<bob@example.com>").0, 250);
    assert_eq!(alice.smtp("DATA").0, 354);
    alice.send(&message(
        "sales@example.com",
        &["bob@example.com"],
        "from sales",
        20,
    ));
    assert_eq!(alice.smtp(".").0, 250);
    alice.smtp("QUIT");
    bob.smtp("QUIT");
    wait_for("the message from sales", Duration::from_secs(20), || {
        (maildir_subjects(&store, "bob@example.com") == ["from sales"]).then_some(())
    });
}
