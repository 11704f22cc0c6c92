//! The agent's metrics that the chart's alerts read, from the real Postfix: the age of the oldest queued
//! message (from `postqueue -j`'s arrival times) while a paused store holds mail back, and 0 once it is
//! delivered; the mounted TLS certificate's expiry, following a renewal of the kubelet-mounted Secret.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use support::*;

/// Longer than the agent's queue listing interval (10 s) plus Postfix's first deferral.
const WAIT: Duration = Duration::from_secs(40);

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[test]
fn oldest_queued_message_age_grows_while_a_store_holds_mail_and_clears_on_delivery() {
    if !mail_software_present(
        "oldest_queued_message_age_grows_while_a_store_holds_mail_and_clears_on_delivery",
    ) {
        return;
    }
    let mut site = Site::new(1_000_000);
    let ps = Ports::free();
    site.lun(0, &ps);
    site.mailbox("carol@example.com", 0, "pw");
    site.publish();
    let store = Agent::start(&site, "store", "store", &ps);
    let mx = Agent::start(&site, "mx", "mx", &Ports::free());
    let age =
        |mx: &Agent| mx.metric("mailpod_queue_oldest_message_age_seconds{queue=\"deferred\"}");
    assert_eq!(age(&mx), Some(0.0), "an empty queue reads 0");

    let (code, body) = store.post("/pause?seconds=120");
    assert_eq!(code, 200, "{body}");
    let sent = Instant::now();
    let (code, reply) = send_mail(
        mx.ports.smtp,
        "x@remote.test",
        &["carol@example.com"],
        "held",
        50,
    );
    assert_eq!(code, 250, "{reply}");
    let seen = wait_for("the deferred message's age", WAIT, || {
        age(&mx).filter(|a| *a >= 1.0)
    });
    // Counted from the message's arrival, not from when the agent first listed it.
    assert!(
        seen <= sent.elapsed().as_secs_f64() + 1.0,
        "age {seen} s, but the message was sent {:?} ago",
        sent.elapsed()
    );
    std::thread::sleep(Duration::from_secs(2));
    let later = age(&mx).unwrap();
    assert!(
        later >= seen + 1.5,
        "the age grows at scrape time: {seen} then {later}"
    );

    assert_eq!(store.post("/resume").0, 200);
    wait_for("the held message delivered", WAIT, || {
        (maildir_subjects(&store, "carol@example.com") == ["held"]).then_some(())
    });
    wait_for("the age back to 0", WAIT, || {
        (age(&mx) == Some(0.0)).then_some(())
    });
}

/// A self-signed pair valid for `days`, as the bytes of a kubernetes.io/tls Secret.
fn certificate(dir: &Path, days: u32) -> BTreeMap<String, Vec<u8>> {
    std::fs::create_dir_all(dir).unwrap();
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            &days.to_string(),
        ])
        .args(["-subj", "/CN=mail.example.com", "-keyout"])
        .arg(dir.join("tls.key"))
        .arg("-out")
        .arg(dir.join("tls.crt"))
        .output()
        .expect("openssl (tests/packages.txt)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ["tls.crt", "tls.key"]
        .map(|k| (k.to_string(), std::fs::read(dir.join(k)).unwrap()))
        .into()
}

#[test]
fn certificate_expiry_metric_follows_a_renewed_secret() {
    if !mail_software_present("certificate_expiry_metric_follows_a_renewed_secret") {
        return;
    }
    let mut site = Site::new(1_000_000);
    site.settings.tls = true;
    std::fs::write(
        site.config_dir().join("settings.yaml"),
        site.settings.to_yaml(),
    )
    .unwrap();
    site.lun(0, &Ports::free());
    site.publish();
    // The Secret as the kubelet mounts it: root-owned files behind `..data`, swapped on renewal.
    let secret =
        pod::KubeletVolume::new(site.root.path().join("tls-secret"), rendered_secret_mode());
    secret.publish(&certificate(&site.root.path().join("cert-1"), 5));
    let tls_args = ["--tls-dir".to_string(), secret.dir.display().to_string()];
    let mx = Agent::start_with(&site, "mx", "mx", &Ports::free(), &tls_args);
    let series = format!(
        "mailpod_tls_certificate_expiry_timestamp_seconds{{file=\"{}\"}}",
        secret.dir.join("tls.crt").display()
    );
    let days_left = |mx: &Agent| mx.metric(&series).map(|t| (t - unix_now()) / 86400.0);
    let left = days_left(&mx).expect("the certificate's expiry is reported");
    assert!((4.99..5.01).contains(&left), "{left} days left");

    secret.publish(&certificate(&site.root.path().join("cert-2"), 40));
    let left = days_left(&mx).unwrap();
    assert!((39.99..40.01).contains(&left), "renewed: {left} days left");
}
