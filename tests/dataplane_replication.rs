//! Replication between the two replicas of a LUN with the real Dovecot: the standby pulls from the active
//! over doveadm's TCP service; a promotion (labels files rewritten, as the kubelet does for the downward
//! API) reverses the direction, and the demoted old active first merges what only it had. Messages are
//! counted exactly: none lost, none duplicated.

mod support;

use std::path::Path;
use std::time::Duration;

use support::*;

const WAIT: Duration = Duration::from_secs(30);
const USER: &str = "alice@example.com";

fn set_role(labels: &Path, role: Option<&str>) {
    let mut text =
        "app.kubernetes.io/name=\"mailpod\"\nmailpod.io/lun=\"corp-lun-0\"\n".to_string();
    if let Some(r) = role {
        text.push_str(&format!("mailpod.io/role=\"{r}\"\n"));
    }
    // Like the kubelet: the file is replaced, never seen half-written.
    let tmp = labels.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, labels).unwrap();
}

fn subjects(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:03}")).collect()
}

fn replication(agent: &Agent) -> serde_json::Value {
    let (code, body) = agent.get("/replication");
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Waits until `store` holds exactly `want` (sorted) in the user's INBOX.
fn wait_for_exactly(what: &str, store: &Agent, want: &[String]) {
    let mut want = want.to_vec();
    want.sort();
    let mut last = Vec::new();
    let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_for(what, WAIT, || {
            last = maildir_subjects(store, USER);
            (last == want).then_some(())
        })
    }));
    if ok.is_err() {
        panic!(
            "{what}: {} has {} messages, want {}; missing {:?}; extra {:?}; replication {}",
            store.work.display(),
            last.len(),
            want.len(),
            want.iter()
                .filter(|s| !last.contains(s))
                .collect::<Vec<_>>(),
            last.iter()
                .filter(|s| !want.contains(s))
                .collect::<Vec<_>>(),
            store.get("/replication").1
        );
    }
}

#[test]
fn standby_mirrors_active_and_roles_swap_on_promotion() {
    if !mail_software_present("standby_mirrors_active_and_roles_swap_on_promotion") {
        return;
    }
    let mut site = Site::new(1_000_000);
    let (pa, pb) = (Ports::free(), Ports::free());
    site.lun(0, &pa);
    site.mailbox(USER, 0, "alice-pw");
    site.mailbox("bob@example.com", 0, "bob-pw");
    site.publish();
    let password = site.root.path().join("doveadm-password");
    std::fs::write(&password, "replication-secret\n").unwrap();
    let (labels_a, labels_b) = (
        site.root.path().join("a.labels"),
        site.root.path().join("b.labels"),
    );
    set_role(&labels_a, Some("active"));
    set_role(&labels_b, Some("standby"));

    // Each replica reaches "the LUN's active" at the other's doveadm port, as the LUN Service would route.
    let replica = |name: &str, own: &Ports, peer: &Ports, labels: &Path| {
        let extra: Vec<String> = [
            "--lun",
            "corp-lun-0",
            "--lun-host",
            "127.0.0.1",
            "--lun-doveadm-port",
            &peer.doveadm.to_string(),
            "--doveadm-password-file",
            password.to_str().unwrap(),
            "--labels-file",
            labels.to_str().unwrap(),
            "--sync-interval-seconds",
            "1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        Agent::start_with(&site, "store", name, own, &extra)
    };
    let a = replica("replica-a", &pa, &pb, &labels_a);
    let b = replica("replica-b", &pb, &pa, &labels_b);

    // 1. Mail delivered to the active appears on the standby, exactly.
    let first = subjects("first", 20);
    deliver_lmtp(pa.lmtp, USER, &first);
    wait_for_exactly("the active's mail", &a, &first);
    wait_for_exactly("the standby to mirror the active", &b, &first);
    let rb = wait_for("the standby to report in sync", WAIT, || {
        let r = replication(&b);
        (r["inSync"] == true).then_some(r)
    });
    assert_eq!(rb["role"], "standby");
    assert_eq!(rb["source"], format!("127.0.0.1:{}", pa.doveadm));
    assert!(rb["lastSyncUnixSeconds"].as_f64().unwrap() > 1.7e9);
    assert!(rb["lagSeconds"].as_f64().unwrap() < 10.0, "{rb}");
    assert!(rb["lastError"].is_null(), "{rb}");
    let ra = replication(&a);
    assert_eq!(ra["role"], "active");
    assert!(ra["source"].is_null());
    assert!(b.metric("mailpod_replication_passes_total").unwrap() >= 1.0);
    assert_eq!(b.metric("mailpod_replication_in_sync").unwrap(), 1.0);
    assert!(b.metric("mailpod_replication_lag_seconds").is_some());
    assert_eq!(a.metric("mailpod_replication_active").unwrap(), 1.0);
    assert_eq!(
        a.metric("mailpod_replication_passes_total").unwrap(),
        0.0,
        "the active pulls nothing"
    );

    // 2. The operator takes B's role away (say the active is being lost): B stops pulling, and mail
    //    still reaches A that B never sees.
    set_role(&labels_b, None);
    wait_for("B to drop its role", WAIT, || {
        (replication(&b)["role"] == "unassigned").then_some(())
    });
    let unreplicated = subjects("unreplicated", 5);
    deliver_lmtp(pa.lmtp, USER, &unreplicated);
    std::thread::sleep(Duration::from_secs(3));
    wait_for_exactly("B unchanged while it has no role", &b, &first);

    // 3. Promotion: B becomes active, A is demoted. A's first pass hands the mail only A had to B (instead
    //    of deleting it), while B already takes new deliveries; then A mirrors B, including the new mail.
    set_role(&labels_a, Some("standby"));
    set_role(&labels_b, Some("active"));
    wait_for("A to report the demotion", WAIT, || {
        (replication(&a)["role"] == "standby").then_some(())
    });
    let second = subjects("second", 15);
    deliver_lmtp(pb.lmtp, USER, &second);
    let all: Vec<String> = [first.clone(), unreplicated, second].concat();
    wait_for_exactly("the new active to hold every message", &b, &all);
    wait_for_exactly("the old active to resync from the new one", &a, &all);
    let ra = wait_for("A to report in sync", WAIT, || {
        let r = replication(&a);
        (r["inSync"] == true).then_some(r)
    });
    assert_eq!(ra["source"], format!("127.0.0.1:{}", pb.doveadm));
    assert_eq!(replication(&b)["role"], "active");
    assert_eq!(a.metric("mailpod_replication_failures_total"), Some(0.0));

    // 4. Expunges replicate too: the standby is an exact copy, not an accumulation.
    let mut s = Session::connect(pb.imap);
    assert!(s.line().starts_with("* OK"));
    assert!(s
        .imap("LOGIN alice@example.com alice-pw")
        .1
        .starts_with("t OK"));
    assert!(s.imap("SELECT INBOX").1.starts_with("t OK"));
    assert!(s.imap("STORE 1:3 +FLAGS (\\Deleted)").1.starts_with("t OK"));
    assert!(s.imap("EXPUNGE").1.starts_with("t OK"));
    s.imap("LOGOUT");
    let mut remaining = all.clone();
    remaining.sort();
    let remaining = remaining.split_off(3);
    wait_for_exactly("the expunge on the active", &b, &remaining);
    wait_for_exactly("the expunge to reach the standby", &a, &remaining);

    let mut agents = [a, b];
    for agent in agents.iter_mut() {
        assert!(agent.stop(), "store agent must exit cleanly");
    }
}

/// Every mailbox the access tables place on the LUN is replicated, those with no password entry (which
/// the static userdb accepts but cannot list) included, and no other LUN's: the standby replicates from the
/// LUN's mailbox list, never by iterating users.
#[test]
fn every_mailbox_of_the_lun_is_replicated() {
    if !mail_software_present("every_mailbox_of_the_lun_is_replicated") {
        return;
    }
    let mut site = Site::new(1_000_000);
    let (pa, pb) = (Ports::free(), Ports::free());
    site.lun(0, &pa);
    let with_password: Vec<String> = (0..3).map(|i| format!("user{i}@example.com")).collect();
    let without: Vec<String> = (0..3).map(|i| format!("nopass{i}@example.org")).collect();
    for m in &with_password {
        site.mailbox(m, 0, "pw");
    }
    for m in &without {
        // In the tables only: the Secret has no line for it.
        site.tables.mailboxes.insert(m.clone(), 0);
        site.tables.domains.push("example.org".into());
    }
    site.tables.domains.sort();
    site.tables.domains.dedup();
    site.tables
        .mailboxes
        .insert("elsewhere@example.com".into(), 1);
    site.publish();
    let password = site.root.path().join("doveadm-password");
    std::fs::write(&password, "replication-secret\n").unwrap();
    let (labels_a, labels_b) = (
        site.root.path().join("a.labels"),
        site.root.path().join("b.labels"),
    );
    set_role(&labels_a, Some("active"));
    set_role(&labels_b, Some("standby"));
    let replica = |name: &str, own: &Ports, peer: &Ports, labels: &Path| {
        let extra: Vec<String> = [
            "--lun",
            "corp-lun-0",
            "--lun-host",
            &support::pod::cluster_name("corp-lun-0"),
            "--lun-doveadm-port",
            &peer.doveadm.to_string(),
            "--doveadm-password-file",
            password.to_str().unwrap(),
            "--labels-file",
            labels.to_str().unwrap(),
            "--sync-interval-seconds",
            "1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        Agent::start_with(&site, "store", name, own, &extra)
    };
    let a = replica("replica-a", &pa, &pb, &labels_a);
    let b = replica("replica-b", &pb, &pa, &labels_b);

    let all: Vec<String> = [with_password, without].concat();
    for m in &all {
        deliver_lmtp(pa.lmtp, m, &[format!("for-{m}")]);
    }
    // Also mail for a mailbox of another LUN that reached this store by mistake: not this LUN's to copy.
    deliver_lmtp(pa.lmtp, "elsewhere@example.com", &["stray".to_string()]);
    for m in &all {
        wait_for(&format!("{m} on the standby"), WAIT, || {
            (maildir_subjects(&b, m) == [format!("for-{m}")]).then_some(())
        });
    }
    wait_for("a full pass reported", WAIT, || {
        (replication(&b)["inSync"] == true).then_some(())
    });
    assert!(
        maildir_subjects(&b, "elsewhere@example.com").is_empty(),
        "a mailbox of another LUN is not replicated"
    );
    for name in ["replica-a", "replica-b"] {
        let log = std::fs::read_to_string(site.root.path().join(format!("{name}.agent.log")))
            .unwrap_or_default();
        assert!(
            !log.contains("iterate users"),
            "{name} tried to iterate users:\n{log}"
        );
    }
    let mut agents = [a, b];
    for agent in agents.iter_mut() {
        assert!(agent.stop(), "store agent must exit cleanly");
    }
}
