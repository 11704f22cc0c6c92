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

/// Replicas A (active) and B (standby) of LUN 0, each reaching "the LUN's active" at the other's doveadm
/// port under `host` (as the LUN Service would route), with the labels files that give their roles.
struct Pair {
    a: Agent,
    b: Agent,
    labels_a: std::path::PathBuf,
    labels_b: std::path::PathBuf,
}

fn pair(site: &Site, pa: &Ports, pb: &Ports, host: &str) -> Pair {
    let password = site.root.path().join("doveadm-password");
    std::fs::write(&password, "replication-secret\n").unwrap();
    let (labels_a, labels_b) = (
        site.root.path().join("a.labels"),
        site.root.path().join("b.labels"),
    );
    set_role(&labels_a, Some("active"));
    set_role(&labels_b, Some("standby"));
    let a = Agent::start_replica(
        site,
        "replica-a",
        pa,
        (host, pb.doveadm),
        &password,
        &labels_a,
        None,
    );
    let b = Agent::start_replica(
        site,
        "replica-b",
        pb,
        (host, pa.doveadm),
        &password,
        &labels_b,
        None,
    );
    Pair {
        a,
        b,
        labels_a,
        labels_b,
    }
}

/// A site whose LUN 0 holds `USER`, with [`pair`] on 127.0.0.1: A active holding `n` delivered messages,
/// B mirroring them. Returns the site, the pair and the messages' subjects.
fn mirrored_pair(pa: &Ports, pb: &Ports, n: usize) -> (Site, Pair, Vec<String>) {
    let mut site = Site::new(1_000_000);
    site.lun(0, pa);
    site.mailbox(USER, 0, "alice-pw");
    site.publish();
    let p = pair(&site, pa, pb, "127.0.0.1");
    wait_accepts_writes(&p.a);
    let first = subjects("first", n);
    deliver_lmtp(pa.lmtp, USER, &first);
    wait_for_exactly("the standby to mirror the active", &p.b, &first);
    (site, p, first)
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
        let mut seen = std::collections::BTreeSet::new();
        let twice: Vec<&String> = last.iter().filter(|s| !seen.insert(*s)).collect();
        let mut log = String::new();
        for e in std::fs::read_dir(store.work.parent().unwrap())
            .unwrap()
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(agent) = name.strip_suffix(".agent.log") {
                for l in std::fs::read_to_string(e.path())
                    .unwrap_or_default()
                    .lines()
                {
                    log.push_str(&format!("{agent}: {l}\n"));
                }
            }
        }
        let replication_log: Vec<&str> = log
            .lines()
            .filter(|l| {
                ["hand", "role", "dsync", "Error", "grant"]
                    .iter()
                    .any(|k| l.contains(k))
            })
            .collect();
        panic!(
            "{what}: {} has {} messages, want {}; twice {twice:?}; log {replication_log:#?}; missing {:?}; extra {:?}; replication {}",
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
    let Pair {
        a,
        b,
        labels_a,
        labels_b,
    } = pair(&site, &pa, &pb, "127.0.0.1");

    // 1. Mail delivered to the active appears on the standby, exactly.
    let first = subjects("first", 20);
    wait_accepts_writes(&a);
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
    wait_accepts_writes(&b);
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
    let Pair { a, b, .. } = pair(&site, &pa, &pb, &support::pod::cluster_name("corp-lun-0"));

    let all: Vec<String> = [with_password, without].concat();
    wait_accepts_writes(&a);
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

/// One LMTP delivery in a session of its own; false when the store refuses it with 421 (not active).
fn lmtp_one(port: u16, subject: &str) -> bool {
    let mut s = Session::connect(port);
    let (code, text) = s.smtp_reply();
    if code == 421 {
        return false;
    }
    assert_eq!(code, 220, "LMTP banner: {text}");
    assert_eq!(s.smtp("LHLO client.test").0, 250);
    let (code, text) = s.smtp("MAIL FROM:<x@remote.test>");
    if code == 421 {
        return false;
    }
    assert_eq!(code, 250, "{text}");
    assert_eq!(s.smtp(&format!("RCPT TO:<{USER}>")).0, 250);
    assert_eq!(s.smtp("DATA").0, 354);
    s.send(&message("x@remote.test", &[USER], subject, 200));
    let (code, text) = s.smtp(".");
    if code == 421 {
        // Cut off by the demotion before it was stored; the sender tries again (as Postfix would).
        return false;
    }
    assert_eq!(code, 250, "{subject}: {text}");
    let _ = s.smtp("QUIT");
    true
}

/// A demoted store takes no more writes: a standby refuses LMTP; on demotion the old active refuses the
/// next transaction of a cached LMTP session, kicks its IMAP sessions and refuses new logins. Mail sent all
/// through the demotion (to the old active until it refuses, then to the new one, as Postfix's retries
/// through the LUN Service would) ends on both replicas exactly once: none lost to the mirror, none
/// duplicated by the hand-over.
#[test]
fn a_demoted_store_takes_no_more_writes_and_loses_nothing() {
    if !mail_software_present("a_demoted_store_takes_no_more_writes_and_loses_nothing") {
        return;
    }
    let (pa, pb) = (Ports::free(), Ports::free());
    // The site holds the agents' files: kept to the end of the test.
    let (
        _site,
        Pair {
            a,
            b,
            labels_a,
            labels_b,
        },
        first,
    ) = mirrored_pair(&pa, &pb, 10);

    // A standby never accepts LMTP.
    assert!(
        !lmtp_one(pb.lmtp, "to-the-standby"),
        "the standby took LMTP"
    );

    // A cached LMTP session and a logged-in IMAP session on the active.
    let mut cached = Session::connect(pa.lmtp);
    assert_eq!(cached.smtp_reply().0, 220);
    assert_eq!(cached.smtp("LHLO client.test").0, 250);
    let mut imap = Session::connect(pa.imap);
    assert!(imap.line().starts_with("* OK"));
    assert!(imap
        .imap(&format!("LOGIN {USER} alice-pw"))
        .1
        .starts_with("t OK"));
    assert!(imap.imap("SELECT INBOX").1.starts_with("t OK"));

    // Mail keeps coming through the demotion.
    let (pa_lmtp, pb_lmtp) = (pa.lmtp, pb.lmtp);
    let sender = std::thread::spawn(move || {
        let (mut accepted, mut refused, mut by_old) = (Vec::new(), 0usize, 0usize);
        for i in 0..40 {
            let subject = format!("through-{i:03}");
            let start = std::time::Instant::now();
            loop {
                if lmtp_one(pa_lmtp, &subject) {
                    by_old += 1;
                    accepted.push(subject.clone());
                    break;
                }
                if lmtp_one(pb_lmtp, &subject) {
                    accepted.push(subject.clone());
                    break;
                }
                refused += 1;
                assert!(start.elapsed() < WAIT, "{subject}: neither replica took it");
                std::thread::sleep(Duration::from_millis(100));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        (accepted, refused, by_old)
    });
    std::thread::sleep(Duration::from_millis(600));
    set_role(&labels_a, Some("standby"));
    set_role(&labels_b, Some("active"));

    // The old active: the cached session's next transaction is refused, IMAP is kicked, logins refused.
    wait_for("A to stop taking writes", WAIT, || {
        (replication(&a)["acceptsWrites"] == false && replication(&a)["role"] == "standby")
            .then_some(())
    });
    let (code, text) = cached.smtp("MAIL FROM:<x@remote.test>");
    assert_eq!(
        code, 421,
        "a cached LMTP session on the demoted store: {text}"
    );
    let kicked = wait_for("the IMAP session to be kicked", WAIT, || {
        if imap.try_send("t NOOP\r\n").is_err() {
            return Some("closed".to_string());
        }
        match imap.try_line() {
            Err(_) => Some("closed".to_string()),
            Ok(l) if l.is_empty() => Some("closed".to_string()),
            Ok(l) if l.starts_with("* BYE") => Some(l),
            Ok(_) => {
                std::thread::sleep(Duration::from_millis(200));
                None
            }
        }
    });
    eprintln!("IMAP session on the demoted store: {}", kicked.trim());
    // Dovecot looks at a changed users file at most once a second.
    wait_for("logins on the demoted store to be refused", WAIT, || {
        let mut again = Session::connect(pa.imap);
        assert!(again.line().starts_with("* OK"));
        let st = again.imap(&format!("LOGIN {USER} alice-pw")).1;
        st.starts_with("t NO").then_some(())
    });

    let (accepted, refused, by_old) = sender.join().unwrap();
    let all: Vec<String> = [first, accepted.clone()].concat();
    wait_for_exactly(
        "the new active to hold every accepted message once",
        &b,
        &all,
    );
    wait_for_exactly("the old active to end as the same copy", &a, &all);
    eprintln!(
        "through a demotion: {} sent and accepted ({by_old} by the old active before it refused, {} by the \
         new one, {refused} waits with neither taking mail), 0 lost, 0 duplicated",
        accepted.len(),
        accepted.len() - by_old,
    );
    let mut agents = [a, b];
    for agent in agents.iter_mut() {
        assert!(agent.stop(), "store agent must exit cleanly");
    }
}

/// The operator's push on the control port (`POST /role`) switches the replicas at once, with the labels
/// files still as they were (the kubelet not yet caught up): the demoted one refuses writes before it
/// answers, the promoted one takes LMTP and logins, and when the files catch up nothing changes again.
/// Without the LUN's token a push changes nothing.
#[test]
fn a_pushed_role_takes_effect_before_the_labels_file_changes() {
    if !mail_software_present("a_pushed_role_takes_effect_before_the_labels_file_changes") {
        return;
    }
    let (pa, pb) = (Ports::free(), Ports::free());
    // The site holds the agents' files: kept to the end of the test.
    let (
        _site,
        Pair {
            a,
            b,
            labels_a,
            labels_b,
        },
        first,
    ) = mirrored_pair(&pa, &pb, 5);

    assert_eq!(a.post_as("/role?role=standby", Some("guess")).0, 401);
    assert_eq!(replication(&a)["acceptsWrites"], true);

    let (code, body) = a.post("/role?role=standby");
    assert_eq!(code, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        answer["acceptsWrites"], false,
        "refused before it answers: {body}"
    );
    assert!(
        !lmtp_one(pa.lmtp, "to-the-demoted"),
        "the demoted store took LMTP"
    );
    let (code, body) = b.post("/role?role=active");
    assert_eq!(code, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["acceptsWrites"], true, "{body}");
    assert_eq!(replication(&b)["role"], "active");
    let promoted = std::time::Instant::now();
    let second = subjects("second", 5);
    deliver_lmtp(pb.lmtp, USER, &second);
    // Dovecot looks at a changed users file at most once a second.
    wait_for("logins on the promoted store", WAIT, || {
        let mut s = Session::connect(pb.imap);
        assert!(s.line().starts_with("* OK"));
        s.imap(&format!("LOGIN {USER} alice-pw"))
            .1
            .starts_with("t OK")
            .then_some(())
    });
    eprintln!(
        "logins on the promoted store {:.1} s after the push, labels files unchanged",
        promoted.elapsed().as_secs_f64()
    );

    // The kubelet's copies catch up: the roles stay as pushed, and the demoted store hands over and mirrors.
    set_role(&labels_a, Some("standby"));
    set_role(&labels_b, Some("active"));
    let all: Vec<String> = [first, second].concat();
    wait_for_exactly("the old active to mirror the new one", &a, &all);
    assert_eq!(replication(&b)["acceptsWrites"], true);
    assert_eq!(replication(&a)["acceptsWrites"], false);
    let mut agents = [a, b];
    for agent in agents.iter_mut() {
        assert!(agent.stop(), "store agent must exit cleanly");
    }
}

/// One LMTP delivery of `subject` to `to`, in a session of its own: the first non-250 code the store
/// answers, or 250 once the message is taken.
fn lmtp_attempt(port: u16, to: &str, subject: &str) -> u16 {
    let mut s = Session::connect(port);
    let (code, _) = s.smtp_reply();
    if code != 220 {
        return code;
    }
    for command in [
        "LHLO client.test".to_string(),
        "MAIL FROM:<x@remote.test>".to_string(),
        format!("RCPT TO:<{to}>"),
    ] {
        let (code, _) = s.smtp(&command);
        if code != 250 {
            return code;
        }
    }
    let (code, _) = s.smtp("DATA");
    if code != 354 {
        return code;
    }
    s.send(&message("x@remote.test", &[to], subject, 200));
    let (code, _) = s.smtp(".");
    let _ = s.smtp("QUIT");
    code
}

/// A store does not know an address until it has read the tables that list it (each pod's copy of a
/// ConfigMap is updated on its own, so the mx may know it first): the delivery waits (450), it neither
/// bounces nor lands in a default home.
#[test]
fn an_address_the_store_does_not_know_yet_waits() {
    if !mail_software_present("an_address_the_store_does_not_know_yet_waits") {
        return;
    }
    let (pa, pb) = (Ports::free(), Ports::free());
    let (mut site, p, _) = mirrored_pair(&pa, &pb, 1);
    let late = "late@example.com";
    let mut s = Session::connect(pa.lmtp);
    assert_eq!(s.smtp_reply().0, 220);
    assert_eq!(s.smtp("LHLO client.test").0, 250);
    assert_eq!(s.smtp("MAIL FROM:<x@remote.test>").0, 250);
    let (code, text) = s.smtp(&format!("RCPT TO:<{late}>"));
    assert_eq!(code, 450, "{text}");
    assert!(text.contains(" 4.1.1 "), "{text}");
    let _ = s.smtp("QUIT");
    assert!(
        !p.a.work.join("mail/example.com/late").exists(),
        "no Maildir for an address the tables do not list"
    );
    // Once the store has the tables that list it, the same delivery is taken.
    site.tables.mailboxes.insert(late.into(), 0);
    site.publish();
    wait_for("the late mailbox taken", WAIT, || {
        (lmtp_attempt(pa.lmtp, late, "late-1") == 250).then_some(())
    });
    assert_eq!(maildir_subjects(&p.a, late), ["late-1"]);
    let mut agents = [p.a, p.b];
    for agent in agents.iter_mut() {
        assert!(agent.stop(), "store agent must exit cleanly");
    }
}

/// Subjects in the Maildir `home`/Maildir (new and cur) of a store's work dir, sorted.
fn subjects_in(store: &Agent, home: &str) -> Vec<String> {
    let maildir = store.work.join("mail").join(home).join("Maildir");
    let mut out = Vec::new();
    for sub in ["new", "cur"] {
        for e in std::fs::read_dir(maildir.join(sub))
            .into_iter()
            .flatten()
            .flatten()
        {
            if let Ok(text) = std::fs::read_to_string(e.path()) {
                out.extend(
                    text.lines()
                        .find_map(|l| l.strip_prefix("Subject: "))
                        .map(|s| s.trim().to_string()),
                );
            }
        }
    }
    out.sort();
    out
}

/// How many messages IMAP shows in INBOX to `user` logging in on a store.
fn imap_exists(port: u16, user: &str, password: &str) -> usize {
    let mut s = Session::connect(port);
    assert!(s.line().starts_with("* OK"));
    let (_, st) = s.imap(&format!("LOGIN {user} {password}"));
    assert!(st.starts_with("t OK"), "{st}");
    let (untagged, st) = s.imap("SELECT INBOX");
    assert!(st.starts_with("t OK"), "{st}");
    let _ = s.imap("LOGOUT");
    untagged
        .iter()
        .find_map(|l| {
            l.trim_end()
                .strip_prefix("* ")?
                .strip_suffix(" EXISTS")?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no EXISTS in {untagged:?}"))
}

/// An address its LUN took back after a removal (incarnation 1 in the tables) may belong to somebody else
/// now: on both replicas its mail, logins and replication use a new home, and the previous owner's Maildir
/// stays untouched where it was. A store that has read the removal refuses the address (450) until it
/// reads the return; mail offered while the home moves waits (421), and none lands in the old home. When a
/// store sees the next return without the removal between (both within one refresh of its ConfigMap), the
/// standby's deletion guard does not take the new, empty mailbox for a wiped one. The documented copy
/// gives the old mail back with its dates.
#[test]
fn an_address_taken_back_starts_empty_and_the_previous_owners_mail_stays() {
    if !mail_software_present(
        "an_address_taken_back_starts_empty_and_the_previous_owners_mail_stays",
    ) {
        return;
    }
    let (pa, pb) = (Ports::free(), Ports::free());
    let (mut site, p, first) = mirrored_pair(&pa, &pb, 12);
    assert_eq!(imap_exists(pa.imap, USER, "alice-pw"), 12);
    let userdb = |agent: &Agent| {
        std::fs::read_to_string(agent.work.join("dovecot").join("userdb")).unwrap_or_default()
    };

    // Removed: both stores read it; the address is refused as one they do not know.
    site.tables.mailboxes.remove(USER);
    site.set_users("");
    site.publish();
    let mut answers = std::collections::BTreeMap::<u16, usize>::new();
    wait_for("the removal read", WAIT, || {
        let code = lmtp_attempt(pa.lmtp, USER, "while-removed");
        *answers.entry(code).or_default() += 1;
        std::thread::sleep(Duration::from_millis(50));
        (code == 450).then_some(())
    });
    for agent in [&p.a, &p.b] {
        wait_for("the removal read", WAIT, || {
            (!userdb(agent).contains(USER)).then_some(())
        });
    }
    // Taken before the store read the removal (250), into the home the address had then; afterwards held
    // (421) or unknown (450), never taken.
    let taken = answers.get(&250).copied().unwrap_or(0);
    assert!(
        answers.keys().all(|c| [250, 421, 450].contains(c)),
        "{answers:?}"
    );
    // What each replica holds in the old home from now on: the active may also hold what it took just
    // before the removal, which the standby had no pass left to copy.
    let mut first_sorted = first.clone();
    first_sorted.sort();
    let old_a = subjects_in(&p.a, "example.com/alice");
    let old_b = subjects_in(&p.b, "example.com/alice");
    assert_eq!(old_a.len(), first.len() + taken, "{old_a:?}");
    assert!(
        old_b.len() >= first.len() && old_b.iter().all(|s| old_a.contains(s)),
        "{old_b:?}"
    );

    // Taken back by its LUN, by somebody else. Mail for the new owner from the moment the tables change:
    // each message is offered until the store takes it, as Postfix retries.
    site.tables.mailboxes.insert(USER.into(), 0);
    site.tables.incarnations.insert(USER.into(), 1);
    site.set_users(&format!("{USER}:{{PLAIN}}new-owner-pw\n"));
    site.publish();
    let offer = |subjects: &[String]| {
        let mut answers = std::collections::BTreeMap::<u16, usize>::new();
        for subject in subjects {
            wait_for(&format!("{subject} taken"), WAIT, || {
                let code = lmtp_attempt(pa.lmtp, USER, subject);
                *answers.entry(code).or_default() += 1;
                std::thread::sleep(Duration::from_millis(50));
                (code == 250).then_some(())
            });
        }
        assert!(
            answers.keys().all(|c| [250, 421, 450].contains(c)),
            "only temporary refusals while the home moves: {answers:?}"
        );
    };
    let new = subjects("new-owner", 12);
    offer(&new);
    let home1 = ".incarnation-1/example.com/alice";
    wait_for("the new owner's mail on the standby", WAIT, || {
        (subjects_in(&p.b, home1) == new).then_some(())
    });
    assert_eq!(subjects_in(&p.a, home1), new);
    assert_eq!(
        imap_exists(pa.imap, USER, "new-owner-pw"),
        12,
        "the new owner sees only their own mail"
    );
    for (agent, old) in [(&p.a, &old_a), (&p.b, &old_b)] {
        assert_eq!(
            &subjects_in(agent, "example.com/alice"),
            old,
            "the previous owner's Maildir is left as it was on {}",
            agent.work.display()
        );
    }

    // Removed and taken back again, both within one refresh: the stores go from incarnation 1 to 2.
    site.tables.incarnations.insert(USER.into(), 2);
    site.set_users(&format!("{USER}:{{PLAIN}}third-owner-pw\n"));
    site.publish();
    for agent in [&p.a, &p.b] {
        wait_for("the next home read", WAIT, || {
            userdb(agent).contains(".incarnation-2/").then_some(())
        });
    }
    let third = subjects("third-owner", 1);
    offer(&third);
    let home2 = ".incarnation-2/example.com/alice";
    wait_for("the third owner's mail on the standby", WAIT, || {
        (subjects_in(&p.b, home2) == third).then_some(())
    });
    wait_for("a pass after the change, without a refusal", WAIT, || {
        let r = replication(&p.b);
        (r["inSync"] == true && r["lastError"].is_null() && r["deletionRefused"].is_null())
            .then_some(())
    });
    assert_eq!(subjects_in(&p.b, home1), new, "kept on the standby too");
    assert_eq!(subjects_in(&p.a, "example.com/alice"), old_a);
    assert_eq!(subjects_in(&p.b, "example.com/alice"), old_b);

    // The first removal was a mistake: the documented copy on the active (docs/operations.md) gives the
    // old mail back, with its dates, and the standby takes it from there.
    let date = |agent: &Agent, home: &str| {
        let mail = agent.work.join("mail");
        let out = std::process::Command::new("doveadm")
            .arg("-c")
            .arg(agent.work.join("dovecot/dovecot.conf"))
            .args([
                "-o",
                &format!("mail_location=maildir:{}/{home}/Maildir", mail.display()),
            ])
            .args(["fetch", "-u", USER, "date.received", "subject", "first-000"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let before = date(&p.a, "example.com/alice");
    std::thread::sleep(Duration::from_millis(1100));
    let out = std::process::Command::new("doveadm")
        .arg("-c")
        .arg(p.a.work.join("dovecot/dovecot.conf"))
        .args(["import", "-u", USER])
        .arg(format!(
            "maildir:{}",
            p.a.work.join("mail/example.com/alice/Maildir").display()
        ))
        .args(["", "all"])
        .output()
        .unwrap();
    assert!(out.status.success(), "doveadm import: {out:?}");
    let mut all = [old_a.clone(), third.clone()].concat();
    all.sort();
    wait_for("the old mail back on the standby", WAIT, || {
        (subjects_in(&p.b, home2) == all).then_some(())
    });
    assert_eq!(subjects_in(&p.a, home2), all);
    assert_eq!(imap_exists(pa.imap, USER, "third-owner-pw"), all.len());
    assert_eq!(date(&p.a, home2), before, "the received date comes along");

    let mut agents = [p.a, p.b];
    for agent in agents.iter_mut() {
        assert!(agent.stop(), "store agent must exit cleanly");
    }
}
