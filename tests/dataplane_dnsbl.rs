//! DNSBLs under real postscreen, with cluster DNS answering the blocklist queries: an answer outside the
//! reply filter (Spamhaus's 127.255.255.254 "query through a public resolver") does not count, one inside
//! it blocks the client, and a list without a filter, which the MailPod validation now refuses, blocks
//! every client whatever the list answers.

mod support;

use std::net::Ipv4Addr;

use support::*;

/// An mx whose only DNSBL is `site`, with cluster DNS answering `answer` for the test client's address
/// (127.0.0.2, looked up as `2.0.0.127.<list>`); the reply to one message from that client.
fn send_through_dnsbl(list: &str, site: &str, answer: Ipv4Addr) -> (u16, String, String) {
    let mut s = Site::new(1_000_000);
    let ps = Ports::free();
    s.lun(0, &ps);
    s.mailbox("dora@example.com", 0, "pw");
    s.publish();
    s.settings.dnsbl = vec![site.to_string()];
    s.settings.dnsbl_threshold = 1;
    std::fs::write(s.config_dir().join("settings.yaml"), s.settings.to_yaml()).unwrap();
    s.dns.set(&format!("2.0.0.127.{list}"), answer);
    let _store = Agent::start(&s, "store", "store", &ps);
    let mx = Agent::start(&s, "mx", "mx", &Ports::free());
    let (code, text) = send_mail(
        mx.ports.smtp,
        "x@remote.test",
        &["dora@example.com"],
        "hi",
        20,
    );
    // postscreen logs its verdict as it answers: give the line a moment to reach the log.
    let path = mx.work.join("log/postfix.log");
    let read = || std::fs::read_to_string(&path).unwrap_or_default();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while code == 550 && !read().contains("DNSBL rank") && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    (code, text, read())
}

#[test]
fn only_answers_inside_the_reply_filter_count() {
    if !mail_software_present("only_answers_inside_the_reply_filter_count") {
        return;
    }
    let public_resolver = Ipv4Addr::new(127, 255, 255, 254);
    let listed = Ipv4Addr::new(127, 0, 0, 2);

    let (code, text, log) = send_through_dnsbl(
        "bl-public.test",
        "bl-public.test=127.0.0.[2..11]",
        public_resolver,
    );
    assert_eq!(code, 250, "answer outside the filter: {text}\n{log}");
    assert!(!log.contains("DNSBL rank"), "{log}");

    let (code, text, log) =
        send_through_dnsbl("bl-listed.test", "bl-listed.test=127.0.0.[2..11]", listed);
    assert_eq!(code, 550, "answer inside the filter: {text}\n{log}");
    assert!(text.contains("bl-listed.test"), "{text}");
    assert!(log.contains("DNSBL rank 1 for [127.0.0.2]"), "{log}");

    // What a list without a filter does: the public-resolver answer blocks the client.
    let (code, text, log) = send_through_dnsbl("bl-open.test", "bl-open.test", public_resolver);
    assert_eq!(code, 550, "no filter: {text}\n{log}");
    let typed: mailpod_operator::crd::MailPod = serde_json::from_value(serde_json::json!({
        "apiVersion": "mailpod.io/v1alpha1", "kind": "MailPod", "metadata": {"name": "m"},
        "spec": {"domains": ["example.com"], "protection": {"dnsbl": ["bl-open.test"]}}}))
    .unwrap();
    let refused = typed.validate().unwrap_err().to_string();
    assert!(refused.contains("spec.protection.dnsbl[0]"), "{refused}");
}
