//! Stable identities under real Postfix and Dovecot: the host name of the MailPod spec is what mx and
//! submission greet with and say in HELO; POP3 UIDLs do not change when a store renumbers its UIDs.

mod support;

use mailpod_operator::crd::MailPod;
use mailpod_operator::mailconfig::settings::MailSettings;
use support::*;

fn mailpod(spec: serde_json::Value) -> MailPod {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "mailpod.io/v1alpha1", "kind": "MailPod", "metadata": {"name": "corp"}, "spec": spec}))
    .unwrap()
}

/// `postconf -x -h NAME` (expanded) of a pod's rendered Postfix configuration.
fn postconf(agent: &Agent, name: &str) -> String {
    let out = std::process::Command::new("postconf")
        .arg("-c")
        .arg(agent.work.join("postfix"))
        .args(["-x", "-h", name])
        .output()
        .unwrap();
    assert!(out.status.success(), "postconf {name}: {out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn the_spec_host_name_is_the_banner_and_the_helo_name() {
    if !mail_software_present("the_spec_host_name_is_the_banner_and_the_helo_name") {
        return;
    }
    let spec = mailpod(
        serde_json::json!({"domains": ["example.com"], "hostname": "mx1.provider.example",
                           "tls": {"secretName": "corp-tls"}}),
    );
    assert!(spec.validate().is_ok(), "{:?}", spec.validate());
    let mut site = Site::new(1_000_000);
    site.settings.hostname = MailSettings::build("corp", &spec.spec).hostname;
    std::fs::write(
        site.config_dir().join("settings.yaml"),
        site.settings.to_yaml(),
    )
    .unwrap();
    let ps = Ports::free();
    site.lun(0, &ps);
    site.mailbox("erin@example.com", 0, "pw");
    site.publish();
    let mx = Agent::start(&site, "mx", "mx", &Ports::free());
    let sub = Agent::start(&site, "submission", "submission", &Ports::free());
    for (agent, port) in [(&mx, mx.ports.smtp), (&sub, sub.ports.submission)] {
        let mut s = Session::connect(port);
        let (code, banner) = s.smtp_reply();
        assert_eq!(code, 220);
        assert!(
            banner
                .lines()
                .all(|l| l.contains("mx1.provider.example ESMTP")),
            "{}: {banner}",
            agent.role
        );
        let (code, ehlo) = s.smtp("EHLO client.test");
        assert_eq!(code, 250);
        assert!(
            ehlo.lines()
                .next()
                .is_some_and(|l| l.trim_end() == "250-mx1.provider.example"),
            "{}: {ehlo}",
            agent.role
        );
        s.smtp("QUIT");
        assert_eq!(postconf(agent, "smtp_helo_name"), "mx1.provider.example");
    }

    // Without the field: mail.<first domain>; a name that is not a host name is refused, naming the field.
    let default = mailpod(serde_json::json!({"domains": ["example.com", "example.org"]}));
    assert_eq!(
        MailSettings::build("corp", &default.spec).hostname,
        "mail.example.com"
    );
    for bad in [
        "mail",
        "Mail.Example.com",
        "mail example.com",
        "mail.example.com.",
    ] {
        let mp = mailpod(serde_json::json!({"domains": ["example.com"], "hostname": bad}));
        let e = mp.validate().unwrap_err().to_string();
        assert!(e.contains("spec.hostname"), "{bad}: {e}");
    }
}

/// `UIDL` of `user` over POP3 on `port`: message number -> UIDL.
fn uidls(port: u16, user: &str, password: &str) -> Vec<String> {
    let mut p = Session::connect(port);
    assert!(p.line().starts_with("+OK"));
    p.send(&format!("USER {user}\r\n"));
    assert!(p.line().starts_with("+OK"));
    p.send(&format!("PASS {password}\r\n"));
    let l = p.line();
    assert!(l.starts_with("+OK"), "{l}");
    p.send("UIDL\r\n");
    let l = p.line();
    assert!(l.starts_with("+OK"), "{l}");
    let mut out = vec![];
    loop {
        let l = p.line();
        if l == ".\r\n" || l.is_empty() {
            break;
        }
        out.push(l.trim_end().split_once(' ').unwrap().1.to_string());
    }
    p.send("QUIT\r\n");
    out
}

#[test]
fn pop3_uidls_survive_renumbered_uids() {
    if !mail_software_present("pop3_uidls_survive_renumbered_uids") {
        return;
    }
    let mut site = Site::new(1_000_000);
    let ps = Ports::free();
    site.lun(0, &ps);
    site.mailbox("finn@example.com", 0, "finn-pw");
    site.publish();
    let store = Agent::start(&site, "store", "store", &ps);
    let subjects: Vec<String> = (0..3).map(|i| format!("keep-{i}")).collect();
    deliver_lmtp(ps.lmtp, "finn@example.com", &subjects);
    let before = uidls(ps.pop3, "finn@example.com", "finn-pw");
    assert_eq!(before.len(), 3, "{before:?}");
    assert_eq!(unique(&before).len(), 3, "{before:?}");

    // Renumber: the UID list and indexes are gone (as when a hand-over rebuilds a Maildir), so Dovecot
    // gives every message a new UID under a new UIDVALIDITY (taken from the clock: wait for a new second).
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let maildir = store.work.join("mail/example.com/finn/Maildir");
    let mut removed = 0;
    for e in std::fs::read_dir(&maildir).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("dovecot") {
            std::fs::remove_file(e.path()).unwrap();
            removed += 1;
        }
    }
    assert!(removed > 0, "no dovecot-uidlist in {}", maildir.display());
    let after = uidls(ps.pop3, "finn@example.com", "finn-pw");
    assert_eq!(after, before, "UIDLs changed when the UIDs were renumbered");
}
