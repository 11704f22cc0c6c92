//! Cross-site replication with the real Dovecot: a standby whose own LUN host is unreachable (its site's LUN
//! is fenced) pulls from the other site's active named by the `mailpod.io/replication-source` annotation,
//! read from a downward-API annotations file the test rewrites as the kubelet does.

mod support;

use std::path::Path;
use std::time::Duration;

use support::*;

const WAIT: Duration = Duration::from_secs(30);
const USER: &str = "alice@example.com";

/// Replaces a downward-API file at once, like the kubelet.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn replication(agent: &Agent) -> serde_json::Value {
    let (code, body) = agent.get("/replication");
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

#[test]
fn standby_pulls_from_the_annotated_source() {
    if !mail_software_present("standby_pulls_from_the_annotated_source") {
        return;
    }
    let mut site = Site::new(1_000_000);
    let (pa, pb) = (Ports::free(), Ports::free());
    // Nothing listens here: B's own LUN host, as if its site's LUN were fenced.
    let closed = free_port();
    site.lun(0, &pa);
    site.mailbox(USER, 0, "alice-pw");
    site.publish();
    let root = site.root.path().to_path_buf();
    let password = root.join("doveadm-password");
    std::fs::write(&password, "replication-secret\n").unwrap();
    let (labels_a, labels_b, annotations_b) = (
        root.join("a.labels"),
        root.join("b.labels"),
        root.join("b.annotations"),
    );
    replace(&labels_a, "mailpod.io/role=\"active\"\n");
    replace(&labels_b, "mailpod.io/role=\"standby\"\n");
    let source_a = format!("127.0.0.1:{}", pa.doveadm);
    replace(
        &annotations_b,
        &format!("kubectl.kubernetes.io/default-container=\"store\"\nmailpod.io/replication-source=\"{source_a}\"\n"),
    );

    let replica = |name: &str, own: &Ports, lun_port: u16, labels: &Path, annotations: &Path| {
        Agent::start_replica(
            &site,
            name,
            own,
            ("127.0.0.1", lun_port),
            &password,
            labels,
            Some(annotations),
        )
    };
    let a = replica(
        "site-a",
        &pa,
        closed,
        &labels_a,
        &root.join("a.annotations-absent"),
    );
    let b = replica("site-b", &pb, closed, &labels_b, &annotations_b);

    // 1. Mail delivered to A appears exactly on B, pulled from the annotated source.
    let mut mail: Vec<String> = (0..12).map(|i| format!("xsite-{i:03}")).collect();
    wait_accepts_writes(&a);
    deliver_lmtp(pa.lmtp, USER, &mail);
    mail.sort();
    wait_for("A to hold the mail", WAIT, || {
        (maildir_subjects(&a, USER) == mail).then_some(())
    });
    let mut last = Vec::new();
    let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_for("B to mirror A across sites", WAIT, || {
            last = maildir_subjects(&b, USER);
            (last == mail).then_some(())
        })
    }));
    assert!(
        ok.is_ok(),
        "B has {:?}, want {:?}; replication {}",
        last,
        mail,
        b.get("/replication").1
    );
    let rb = wait_for("B to report in sync", WAIT, || {
        let r = replication(&b);
        (r["inSync"] == true).then_some(r)
    });
    assert_eq!(rb["role"], "standby");
    assert_eq!(rb["source"], source_a.as_str());
    assert!(rb["lastError"].is_null(), "{rb}");

    // 2. A malformed value is refused: the previous source is kept and the error reported.
    replace(
        &annotations_b,
        "mailpod.io/replication-source=\"127.0.0.1:not-a-port\"\n",
    );
    let rb = wait_for("B to refuse the malformed source", WAIT, || {
        let r = replication(&b);
        r["lastError"]
            .as_str()
            .is_some_and(|e| e.contains("mailpod.io/replication-source"))
            .then_some(r)
    });
    assert_eq!(rb["source"], source_a.as_str(), "{rb}");

    // 3. The annotation removed: back to the LUN host (closed), no longer in sync.
    replace(
        &annotations_b,
        "kubectl.kubernetes.io/default-container=\"store\"\n",
    );
    let lun_source = format!("127.0.0.1:{closed}");
    let rb = wait_for("B to go back to its LUN host", WAIT, || {
        let r = replication(&b);
        (r["source"] == lun_source.as_str()).then_some(r)
    });
    assert_eq!(rb["inSync"], false, "{rb}");
    std::thread::sleep(Duration::from_secs(3));
    let rb = replication(&b);
    assert_eq!(rb["inSync"], false, "the LUN host is unreachable: {rb}");
    assert!(
        rb["lastError"]
            .as_str()
            .is_some_and(|e| e.contains(&lun_source)),
        "{rb}"
    );
    assert_eq!(maildir_subjects(&b, USER), mail, "B keeps what it has");

    let mut agents = [a, b];
    for agent in agents.iter_mut() {
        assert!(agent.stop(), "store agent must exit cleanly");
    }
}
