//! DKIM signing on submission with the real software: the submission agent's Postfix with the milter
//! settings it renders, rspamd with the signer's rendered files and a key the operator generates; the
//! delivered message verified by an independent verifier (dkimpy, Debian's python3-dkim) against the TXT
//! record the operator publishes in status.

mod support;

use std::time::Duration;

use mailpod_operator::controller::dkim::{generate_key, txt_record};
use mailpod_operator::mailconfig::rspamd::signer_settings;
use support::dkimpy::{dkimpy_present, dkimpy_verifies};
use support::filter::{filter_software_present, Signer};
use support::*;

/// Sends one message as alice; the first reply that is not the expected one, or the reply to the dot.
fn send(s: &mut Session, to: &str, subject: &str) -> (u16, String) {
    for (command, want) in [
        ("MAIL FROM:<alice@example.com>".to_string(), 250),
        (format!("RCPT TO:<{to}>"), 250),
        ("DATA".to_string(), 354),
    ] {
        let (code, text) = s.smtp(&command);
        if code != want {
            return (code, text);
        }
    }
    s.send(&format!(
        "From: Alice <alice@example.com>\r\nTo: <{to}>\r\nSubject: {subject}\r\n\
         Message-ID: <{subject}@example.com>\r\nDate: Thu, 3 Dec 2026 07:00:00 +0000\r\n\r\n\
         Signed by the MailPod.\r\nA second line.\r\n"
    ));
    s.smtp(".")
}

fn delivered(store: &Agent, user: &str, subject: &str) -> String {
    let (local, domain) = user.split_once('@').unwrap();
    let dir = store
        .work
        .join("mail")
        .join(domain)
        .join(local)
        .join("Maildir");
    wait_for(
        &format!("`{subject}` in {user}'s Maildir"),
        Duration::from_secs(30),
        || {
            ["new", "cur"]
                .iter()
                .flat_map(|sub| {
                    std::fs::read_dir(dir.join(sub))
                        .into_iter()
                        .flatten()
                        .flatten()
                })
                .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
                .find(|text| text.contains(&format!("Subject: {subject}\n")))
        },
    )
}

#[test]
fn mail_sent_through_submission_is_signed_and_verifies_against_the_published_record() {
    if !filter_software_present("mail_sent_through_submission_is_signed") {
        return;
    }
    if !dkimpy_present("mail_sent_through_submission_is_signed") {
        return;
    }
    let pem = generate_key().unwrap();
    let record = txt_record(&pem).unwrap();
    let mut site = Site::new(1_000_000);
    let ps = Ports::free();
    site.lun(0, &ps);
    site.mailbox("alice@example.com", 0, "alice-pw");
    site.mailbox("bob@example.com", 0, "bob-pw");
    site.publish();
    let mut signer = Signer::start(&site, "mail", &[("example.com", &pem)]);
    let mut settings = site.settings.clone();
    settings.signer = Some(signer_settings());
    settings.signer.as_mut().unwrap().milter = signer.milter.clone();
    std::fs::write(site.config_dir().join("settings.yaml"), settings.to_yaml()).unwrap();
    let store = Agent::start(&site, "store", "store", &ps);
    let sub = Agent::start(&site, "submission", "submission", &Ports::free());

    let mut alice = logged_in(sub.ports.submission, "alice@example.com", "alice-pw");
    let (code, text) = send(&mut alice, "bob@example.com", "signed");
    assert_eq!(code, 250, "{text}\n{}", signer.rspamd.log_text());
    let message = delivered(&store, "bob@example.com", "signed");
    assert!(
        message.contains("DKIM-Signature:"),
        "no signature:\n{message}\n{}",
        signer.rspamd.log_text()
    );
    dkimpy_verifies(&message, "example.com", "mail", &record)
        .unwrap_or_else(|e| panic!("dkimpy: {e}\n{message}"));
    // Another key's record does not verify it: the check is real.
    let other = txt_record(&generate_key().unwrap()).unwrap();
    assert!(dkimpy_verifies(&message, "example.com", "mail", &other).is_err());

    // Signer down: 4xx, the user's client keeps the message; nothing leaves unsigned.
    signer.rspamd.stop();
    // (Postfix answers 451 from the first command after the milter is found unreachable: AUTH or MAIL.)
    let mut s = Session::connect(sub.ports.submission);
    assert_eq!(s.smtp_reply().0, 220);
    assert_eq!(s.smtp("EHLO client.test").0, 250);
    let (mut code, mut text) = s.smtp(&format!(
        "AUTH PLAIN {}",
        base64(b"\0alice@example.com\0alice-pw")
    ));
    if code == 235 {
        (code, text) = send(&mut s, "bob@example.com", "unsigned");
    }
    assert!((400..500).contains(&code), "signer down: {code} {text}");
    std::thread::sleep(Duration::from_secs(3));
    let subjects = maildir_subjects(&store, "bob@example.com");
    assert_eq!(subjects, ["signed"], "nothing delivered unsigned");
}
