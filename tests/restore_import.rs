//! `mailpod-operator restore-import` with the real Dovecot: a live store (the agent's store role, with
//! its doveadm TCP service) and a "snapshot" made by copying the store's mail root, read-only to the mail
//! user as a mounted clone would be. After a folder, some messages and a whole mailbox's mail are deleted
//! from the live store and new mail arrives, one message, one folder, one mailbox and the whole LUN are
//! restored; every folder is counted exactly afterwards, and running a restore again changes nothing.
//! Then: a message moved to another folder since the snapshot is not brought back into its old one, a
//! deleted one comes back with its received date and flags, a mailbox no longer on the LUN is not
//! recreated by `--all`, and the staging folder an interrupted restore leaves is finished exactly once.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use support::*;

const ALICE: &str = "alice@example.com";
const BOB: &str = "bob@example.com";
const PASSWORD: &str = "restore-secret";

/// doveadm against the live store's own configuration (what a person would run on the store pod).
fn store_doveadm(store: &Agent, args: &[&str], input: Option<&str>) -> String {
    store_doveadm_bytes(store, args, input.map(str::as_bytes))
}

fn store_doveadm_bytes(store: &Agent, args: &[&str], input: Option<&[u8]>) -> String {
    use std::io::Write;
    let mut child = Command::new("doveadm")
        .arg("-c")
        .arg(store.work.join("dovecot/dovecot.conf"))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(text) = input {
        child.stdin.take().unwrap().write_all(text).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "doveadm {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn save(store: &Agent, user: &str, folder: &str, subject: &str, message_id: Option<&str>) {
    let id = message_id
        .map(|i| format!("Message-ID: {i}\n"))
        .unwrap_or_default();
    let text = format!(
        "From: <x@remote.test>\nTo: <{user}>\nSubject: {subject}\n{id}\n\tbody of {subject}\n"
    );
    store_doveadm(store, &["save", "-u", user, "-m", folder], Some(&text));
}

/// Every folder of `user` on the live store, with its subjects (sorted, repetitions kept).
fn folders(store: &Agent, user: &str) -> BTreeMap<String, Vec<String>> {
    let out = store_doveadm(
        store,
        &[
            "-f",
            "json",
            "fetch",
            "-u",
            user,
            "mailbox hdr.subject",
            "all",
        ],
        None,
    );
    let rows: Vec<BTreeMap<String, String>> = if out.trim().is_empty() {
        vec![]
    } else {
        serde_json::from_str(&out).unwrap()
    };
    let mut by_folder: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in rows {
        by_folder
            .entry(r["mailbox"].clone())
            .or_default()
            .push(r["hdr.subject"].trim().to_string());
    }
    // Every real folder, empty ones included (not hierarchy names: `mailbox status`, not `list`).
    let status = store_doveadm(
        store,
        &[
            "-f", "json", "mailbox", "status", "-u", user, "messages", "*",
        ],
        None,
    );
    let status: Vec<BTreeMap<String, String>> = serde_json::from_str(&status).unwrap();
    for folder in status {
        by_folder.entry(folder["mailbox"].clone()).or_default();
    }
    by_folder.values_mut().for_each(|v| v.sort());
    by_folder
}

fn owned(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

struct Restore<'a> {
    site: &'a Site,
    store: &'a Agent,
    snapshot: PathBuf,
    runs: std::cell::Cell<u32>,
}

impl Restore<'_> {
    /// Runs restore-import as the Job would; returns (success, stdout, stderr).
    fn run(&self, scope: &[&str], password_file: &Path) -> (bool, String, String) {
        let out = self.command(scope, password_file).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// The command of the next run, each with its own work directory.
    fn command(&self, scope: &[&str], password_file: &Path) -> Command {
        let n = self.runs.get() + 1;
        self.runs.set(n);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_mailpod-operator"));
        cmd.arg("restore-import")
            .args([
                "--target",
                &format!("127.0.0.1:{}", self.store.ports.doveadm),
            ])
            .arg("--mail-root")
            .arg(&self.snapshot)
            .arg("--work-dir")
            .arg(self.site.root.path().join(format!("restore-{n}")))
            .arg("--doveadm-password-file")
            .arg(password_file)
            .args(scope);
        cmd
    }

    fn ok(&self, scope: &[&str]) -> String {
        let (ok, stdout, stderr) = self.run(scope, &self.site.root.path().join("doveadm-password"));
        assert!(ok, "restore-import {scope:?} failed: {stderr}\n{stdout}");
        stdout
    }

    fn fails(&self, scope: &[&str]) -> String {
        let (ok, stdout, stderr) = self.run(scope, &self.site.root.path().join("doveadm-password"));
        assert!(!ok, "restore-import {scope:?} should fail: {stdout}");
        stderr
    }
}

fn restored_line(stdout: &str) -> &str {
    stdout
        .lines()
        .last()
        .unwrap_or_default()
        .split(" (")
        .next()
        .unwrap()
}

#[test]
fn restores_a_message_a_folder_a_mailbox_and_the_lun_exactly_once() {
    if !mail_software_present("restores_a_message_a_folder_a_mailbox_and_the_lun_exactly_once") {
        return;
    }
    let mut site = Site::new(1_000_000);
    let ports = Ports::free();
    site.lun(0, &ports);
    site.mailbox(ALICE, 0, "alice-pw");
    site.mailbox(BOB, 0, "bob-pw");
    site.publish();
    let password = site.root.path().join("doveadm-password");
    std::fs::write(&password, format!("{PASSWORD}\n")).unwrap();
    let extra = owned(&["--doveadm-password-file", password.to_str().unwrap()]);
    let store = Agent::start_with(&site, "store", "store", &ports, &extra);

    // Mail as the snapshot will see it. Over LMTP (no Message-ID, same size: told apart by headers).
    deliver_lmtp(
        ports.lmtp,
        ALICE,
        &owned(&["in-000", "in-001", "in-002", "in-003"]),
    );
    deliver_lmtp(ports.lmtp, BOB, &owned(&["bob-0", "bob-1", "bob-2"]));
    save(
        &store,
        ALICE,
        "INBOX",
        "keep-me",
        Some("<keep-me@example.com>"),
    );
    // The same message twice: both copies come back, and only those.
    save(&store, ALICE, "INBOX", "twice", Some("<twice@example.com>"));
    save(&store, ALICE, "INBOX", "twice", Some("<twice@example.com>"));
    store_doveadm(
        &store,
        &["mailbox", "create", "-u", ALICE, "Projects"],
        None,
    );
    for (i, s) in ["plan", "budget", "minutes"].iter().enumerate() {
        save(
            &store,
            ALICE,
            "Projects",
            s,
            Some(&format!("<p{i}@example.com>")),
        );
    }
    store_doveadm(
        &store,
        &[
            "flags",
            "add",
            "-u",
            ALICE,
            "\\Seen $Important",
            "mailbox",
            "Projects",
            "header",
            "Subject",
            "plan",
        ],
        None,
    );
    // 8-bit body, a form feed followed by what looks like the next record of doveadm's pager output,
    // no final newline: must come back byte for byte.
    store_doveadm_bytes(
        &store,
        &["save", "-u", ALICE, "-m", "Projects"],
        Some(b"From: <x@remote.test>\nSubject: odd\n\ncaf\xe9\n\x0c\nuid: 99\nsize.physical: 1\ntext:\nend"),
    );
    store_doveadm(&store, &["mailbox", "create", "-u", ALICE, "Empty"], None);
    // A folder whose parent is only a name in the hierarchy (Maildir++ `.Archive.2023`, no `.Archive`):
    // the restore must not make the parent a real folder.
    store_doveadm(
        &store,
        &["mailbox", "create", "-u", ALICE, "Archive.2023"],
        None,
    );
    save(&store, ALICE, "Archive.2023", "old-news", None);
    let before = folders(&store, ALICE);
    let bob_before = folders(&store, BOB);

    // The snapshot: the store's mail root copied, then read-only for the mail user like a read-only mount.
    let snapshot = site.root.path().join("snapshot");
    assert!(Command::new("cp")
        .arg("-a")
        .arg(store.work.join("mail"))
        .arg(&snapshot)
        .status()
        .unwrap()
        .success());
    assert!(Command::new("chown")
        .args(["-R", "root:root"])
        .arg(&snapshot)
        .status()
        .unwrap()
        .success());
    assert!(Command::new("chmod")
        .args(["-R", "a+rX,go-w"])
        .arg(&snapshot)
        .status()
        .unwrap()
        .success());

    // After the snapshot: deletions, and new mail that a restore must never remove.
    store_doveadm(
        &store,
        &[
            "expunge",
            "-u",
            ALICE,
            "mailbox",
            "INBOX",
            "header",
            "Message-ID",
            "keep-me",
        ],
        None,
    );
    store_doveadm(
        &store,
        &[
            "expunge", "-u", ALICE, "mailbox", "INBOX", "header", "Subject", "in-001",
        ],
        None,
    );
    store_doveadm(
        &store,
        &["mailbox", "delete", "-u", ALICE, "-r", "Projects"],
        None,
    );
    store_doveadm(&store, &["mailbox", "delete", "-u", ALICE, "Empty"], None);
    store_doveadm(
        &store,
        &["mailbox", "delete", "-u", ALICE, "-r", "Archive.2023"],
        None,
    );
    store_doveadm(
        &store,
        &["expunge", "-u", BOB, "mailbox", "INBOX", "all"],
        None,
    );
    deliver_lmtp(ports.lmtp, ALICE, &owned(&["in-004-new"]));
    let mut inbox_now = owned(&["in-000", "in-002", "in-003", "twice", "twice", "in-004-new"]);
    inbox_now.sort();
    assert_eq!(folders(&store, ALICE)["INBOX"], inbox_now);
    assert!(!folders(&store, ALICE).contains_key("Projects"));

    let restore = Restore {
        site: &site,
        store: &store,
        snapshot: snapshot.clone(),
        runs: Default::default(),
    };

    // 1. One message by Message-ID (with or without brackets), into the folder it was in.
    let out = restore.ok(&["--mailbox", ALICE, "--message-id", "<keep-me@example.com>"]);
    assert_eq!(restored_line(&out), "restored 1 messages", "{out}");
    let out = restore.ok(&["--mailbox", ALICE, "--message-id", "keep-me@example.com"]);
    assert_eq!(restored_line(&out), "restored 0 messages", "{out}");
    let mut want_inbox = inbox_now.clone();
    want_inbox.push("keep-me".into());
    want_inbox.sort();
    assert_eq!(folders(&store, ALICE)["INBOX"], want_inbox);

    // 2. One folder, deleted since: back with its four messages and their flags.
    let out = restore.ok(&["--mailbox", ALICE, "--folder", "Projects"]);
    assert_eq!(restored_line(&out), "restored 4 messages", "{out}");
    assert!(
        out.contains("alice@example.com/Projects: 4 in snapshot, 0 already present, 4 restored")
    );
    assert_eq!(folders(&store, ALICE)["Projects"], before["Projects"]);
    let flags = store_doveadm(
        &store,
        &[
            "fetch", "-u", ALICE, "flags", "mailbox", "Projects", "header", "Subject", "plan",
        ],
        None,
    );
    assert!(
        flags.contains("\\Seen") && flags.contains("$Important"),
        "{flags}"
    );
    let out = restore.ok(&["--mailbox", ALICE, "--folder", "Projects"]);
    assert_eq!(restored_line(&out), "restored 0 messages", "{out}");

    // The restored copies are the snapshot's messages byte for byte.
    let body = |root: &Path, subject: &str| -> Vec<u8> {
        let dir = root.join("example.com/alice/Maildir/.Projects");
        let needle = format!("Subject: {subject}\n");
        ["cur", "new"]
            .iter()
            .flat_map(|d| std::fs::read_dir(dir.join(d)).into_iter().flatten())
            .flatten()
            .filter_map(|e| std::fs::read(e.path()).ok())
            .find(|b| b.windows(needle.len()).any(|w| w == needle.as_bytes()))
            .unwrap_or_else(|| panic!("{subject} in {}", dir.display()))
    };
    for subject in ["budget", "odd"] {
        assert_eq!(
            body(&store.work.join("mail"), subject),
            body(&snapshot, subject),
            "{subject}"
        );
    }

    // 3. The whole mailbox: what is still missing (in-001, Archive.2023, the empty folder), nothing
    //    twice, the new mail kept.
    let out = restore.ok(&["--mailbox", ALICE]);
    assert_eq!(restored_line(&out), "restored 2 messages", "{out}");
    assert!(
        !store
            .work
            .join("mail/example.com/alice/Maildir/.Archive")
            .exists(),
        "no folder made of a hierarchy name"
    );
    let mut want = before.clone();
    want.get_mut("INBOX").unwrap().push("in-004-new".into());
    want.get_mut("INBOX").unwrap().sort();
    assert_eq!(folders(&store, ALICE), want);
    let out = restore.ok(&["--mailbox", ALICE]);
    assert_eq!(restored_line(&out), "restored 0 messages", "{out}");

    // 4. The whole LUN: bob's mail comes back, alice's stays as it is.
    let lun = format!("{ALICE},{BOB}");
    let err = restore.fails(&["--all"]);
    assert!(err.contains("--lun-mailboxes"), "{err}");
    let out = restore.ok(&["--all", "--lun-mailboxes", &lun]);
    assert_eq!(restored_line(&out), "restored 3 messages", "{out}");
    assert_eq!(folders(&store, BOB), bob_before);
    assert_eq!(folders(&store, ALICE), want);
    let out = restore.ok(&["--all", "--lun-mailboxes", &lun]);
    assert_eq!(restored_line(&out), "restored 0 messages", "{out}");
    assert_eq!(folders(&store, ALICE), want);
    assert_eq!(folders(&store, BOB), bob_before);

    // Errors name what is wrong, and change nothing.
    let err = restore.fails(&["--mailbox", ALICE, "--folder", "Nope"]);
    assert!(
        err.contains("folder \"Nope\" is not in the snapshot"),
        "{err}"
    );
    let err = restore.fails(&["--mailbox", ALICE, "--message-id", "<absent@example.com>"]);
    assert!(
        err.contains("no message with Message-ID <absent@example.com>"),
        "{err}"
    );
    let err = restore.fails(&["--mailbox", "carol@example.com"]);
    assert!(
        err.contains("mailbox carol@example.com has no mail in the snapshot"),
        "{err}"
    );
    let wrong = site.root.path().join("wrong-password");
    std::fs::write(&wrong, "not-it\n").unwrap();
    let (ok, _, err) = restore.run(&["--mailbox", BOB], &wrong);
    assert!(!ok, "a wrong doveadm password is refused");
    assert!(err.contains("restoring mailbox bob@example.com"), "{err}");
    assert_eq!(folders(&store, ALICE), want);
    assert_eq!(folders(&store, BOB), bob_before);

    // Each run stopped its local Dovecot.
    for n in 1..=restore.runs.get() {
        let pid = site.root.path().join(format!("restore-{n}/run/master.pid"));
        assert!(!pid.exists(), "{} left running", pid.display());
    }
}

const CAROL: &str = "carol@example.com";

/// A message put into `user`'s live Maildir as a file, received (mtime) at `received` (Unix seconds),
/// with Maildir flags `flags` (`S`, `FS`, ...): how mail with a received date other than today's is made.
fn old_message(store: &Agent, user: &str, folder: &str, subject: &str, received: i64, flags: &str) {
    let (local, domain) = user.split_once('@').unwrap();
    let mut dir = store
        .work
        .join("mail")
        .join(domain)
        .join(local)
        .join("Maildir");
    if folder != "INBOX" {
        dir = dir.join(format!(".{folder}"));
    }
    let file = dir.join("cur").join(format!(
        "{received}.M{}P1.restore-test:2,{flags}",
        subject.len()
    ));
    let text = format!(
        "From: <x@remote.test>\nTo: <{user}>\nSubject: {subject}\nMessage-ID: <{subject}@example.com>\n\nbody of {subject}\n"
    );
    std::fs::write(&file, text).unwrap();
    std::os::unix::fs::chown(&file, Some(5000), Some(5000)).unwrap();
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(received as u64);
    std::fs::File::options()
        .write(true)
        .open(&file)
        .unwrap()
        .set_modified(at)
        .unwrap();
}

/// Every message of `user` on the live store: (folder, subject, received date, flags), sorted.
fn dated(store: &Agent, user: &str) -> Vec<(String, String, String, String)> {
    let out = store_doveadm(
        store,
        &[
            "-f",
            "json",
            "fetch",
            "-u",
            user,
            "mailbox hdr.subject date.received flags",
            "all",
        ],
        None,
    );
    let rows: Vec<BTreeMap<String, String>> = serde_json::from_str(&out).unwrap();
    let mut v: Vec<_> = rows
        .into_iter()
        .map(|r| {
            let mut flags: Vec<&str> = r["flags"]
                .split_whitespace()
                .filter(|f| *f != "\\Recent")
                .collect();
            flags.sort();
            (
                r["mailbox"].clone(),
                r["hdr.subject"].trim().to_string(),
                r["date.received"].clone(),
                flags.join(" "),
            )
        })
        .collect();
    v.sort();
    v
}

fn copy_read_only(from: &Path, to: &Path) {
    assert!(Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap()
        .success());
    for args in [&["-R", "root:root"][..], &["-R", "a+rX,go-w"]] {
        let tool = if args[1] == "root:root" {
            "chown"
        } else {
            "chmod"
        };
        assert!(Command::new(tool)
            .args(args)
            .arg(to)
            .status()
            .unwrap()
            .success());
    }
}

#[test]
fn restore_keeps_received_dates_and_flags_and_neither_duplicates_nor_recreates() {
    if !mail_software_present(
        "restore_keeps_received_dates_and_flags_and_neither_duplicates_nor_recreates",
    ) {
        return;
    }
    let mut site = Site::new(1_000_000);
    let ports = Ports::free();
    site.lun(0, &ports);
    for m in [ALICE, BOB, CAROL] {
        site.mailbox(m, 0, "pw");
    }
    site.publish();
    let password = site.root.path().join("doveadm-password");
    std::fs::write(&password, format!("{PASSWORD}\n")).unwrap();
    let extra = owned(&["--doveadm-password-file", password.to_str().unwrap()]);
    let store = Agent::start_with(&site, "store", "store", &ports, &extra);

    for m in [ALICE, BOB, CAROL] {
        deliver_lmtp(ports.lmtp, m, &owned(&["hello"]));
    }
    for f in ["Archive", "Trash"] {
        store_doveadm(&store, &["mailbox", "create", "-u", ALICE, f], None);
    }
    // Received in 2020 and 2021, read, flagged, with a keyword.
    old_message(&store, ALICE, "INBOX", "old-read", 1_600_000_000, "S");
    old_message(&store, ALICE, "INBOX", "old-flagged", 1_610_000_000, "FS");
    old_message(&store, ALICE, "INBOX", "old-moved", 1_620_000_000, "");
    old_message(&store, ALICE, "Archive", "archived", 1_630_000_000, "S");
    store_doveadm(
        &store,
        &[
            "flags",
            "add",
            "-u",
            ALICE,
            "$Important",
            "mailbox",
            "INBOX",
            "header",
            "Subject",
            "old-flagged",
        ],
        None,
    );
    // The same message twice.
    save(&store, ALICE, "INBOX", "dup", Some("<dup@example.com>"));
    save(&store, ALICE, "INBOX", "dup", Some("<dup@example.com>"));
    let before = dated(&store, ALICE);
    let received = |rows: &[(String, String, String, String)], subject: &str| {
        rows.iter()
            .find(|r| r.1 == subject)
            .map(|r| (r.2.clone(), r.3.clone()))
            .unwrap_or_else(|| panic!("{subject} in {rows:?}"))
    };
    assert!(
        received(&before, "old-read").0.starts_with("2020-09-13"),
        "{before:?}"
    );
    assert_eq!(
        received(&before, "old-flagged").1,
        "$Important \\Flagged \\Seen"
    );

    let snapshot = site.root.path().join("snapshot");
    copy_read_only(&store.work.join("mail"), &snapshot);

    // Since the snapshot: one message moved to another folder, one copy of the pair to Trash, one
    // message deleted, carol's mailbox removed from the LUN (and her Maildir with it).
    store_doveadm(
        &store,
        &[
            "move",
            "-u",
            ALICE,
            "Archive",
            "mailbox",
            "INBOX",
            "header",
            "Subject",
            "old-moved",
        ],
        None,
    );
    let dup_uid = store_doveadm(
        &store,
        &[
            "-f", "flow", "search", "-u", ALICE, "mailbox", "INBOX", "header", "Subject", "dup",
        ],
        None,
    );
    let dup_uid = dup_uid.split_whitespace().last().unwrap().to_string();
    store_doveadm(
        &store,
        &[
            "move", "-u", ALICE, "Trash", "mailbox", "INBOX", "uid", &dup_uid,
        ],
        None,
    );
    store_doveadm(
        &store,
        &[
            "expunge",
            "-u",
            ALICE,
            "mailbox",
            "INBOX",
            "header",
            "Subject",
            "old-flagged",
        ],
        None,
    );
    std::fs::remove_dir_all(store.work.join("mail/example.com/carol")).unwrap();
    let moved_state = dated(&store, ALICE);

    let restore = Restore {
        site: &site,
        store: &store,
        snapshot: snapshot.clone(),
        runs: Default::default(),
    };
    let staging_left = || {
        store_doveadm(&store, &["mailbox", "list", "-u", ALICE], None)
            .lines()
            .filter(|l| l.starts_with("Restore-in-progress"))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };

    // A moved message is not brought back into its old folder, by folder or by Message-ID.
    let out = restore.ok(&[
        "--mailbox",
        ALICE,
        "--message-id",
        "<old-moved@example.com>",
    ]);
    assert_eq!(restored_line(&out), "restored 0 messages", "{out}");
    // The deleted one comes back with its received date and flags; the pair is not made whole again
    // (its second copy is in Trash); nothing else changes.
    let out = restore.ok(&["--mailbox", ALICE, "--folder", "INBOX"]);
    assert_eq!(restored_line(&out), "restored 1 messages", "{out}");
    assert!(
        out.contains("alice@example.com/INBOX: 6 in snapshot, 5 already present, 1 restored"),
        "{out}"
    );
    let after = dated(&store, ALICE);
    assert_eq!(
        received(&after, "old-flagged"),
        received(&before, "old-flagged")
    );
    let mut want = moved_state.clone();
    want.push(
        before
            .iter()
            .find(|r| r.1 == "old-flagged")
            .unwrap()
            .clone(),
    );
    want.sort();
    assert_eq!(after, want);
    assert!(staging_left().is_empty(), "{:?}", staging_left());
    // Whole mailbox, then the whole LUN: nothing more; carol is not recreated, and is named.
    let out = restore.ok(&["--mailbox", ALICE]);
    assert_eq!(restored_line(&out), "restored 0 messages", "{out}");
    let lun = format!("{ALICE},{BOB}");
    let out = restore.ok(&["--all", "--lun-mailboxes", &lun]);
    assert_eq!(restored_line(&out), "restored 0 messages", "{out}");
    assert!(
        out.contains(
            "carol@example.com: skipped, in the snapshot but not a mailbox of the LUN now"
        ),
        "{out}"
    );
    assert!(!store.work.join("mail/example.com/carol").exists());
    let err = restore.fails(&["--mailbox", CAROL, "--lun-mailboxes", &lun]);
    assert!(
        err.contains("mailbox carol@example.com is not on the LUN"),
        "{err}"
    );
    assert!(!store.work.join("mail/example.com/carol").exists());
    assert_eq!(dated(&store, ALICE), want);

    // What an interrupted restore leaves: a staging folder in the live mailbox holding a message that
    // is missing from its folder (stopped after dsync), and one that its folder holds too (a move
    // stopped between copy and expunge). The next run puts the first in place, drops the second
    // copy, deletes the staging folder and restores nothing twice.
    let staged = "Restore-in-progress.INBOX";
    store_doveadm(&store, &["mailbox", "create", "-u", ALICE, staged], None);
    store_doveadm(
        &store,
        &[
            "move", "-u", ALICE, staged, "mailbox", "INBOX", "header", "Subject", "old-read",
        ],
        None,
    );
    store_doveadm(
        &store,
        &[
            "copy",
            "-u",
            ALICE,
            staged,
            "mailbox",
            "INBOX",
            "header",
            "Subject",
            "old-flagged",
        ],
        None,
    );
    let out = restore.ok(&["--mailbox", ALICE]);
    assert_eq!(restored_line(&out), "restored 0 messages", "{out}");
    assert!(
        out.contains(
            "alice@example.com/INBOX: 1 messages left by an interrupted restore put in place"
        ),
        "{out}"
    );
    assert!(staging_left().is_empty(), "{:?}", staging_left());
    assert_eq!(dated(&store, ALICE), want);
    let out = restore.ok(&["--mailbox", ALICE]);
    assert_eq!(restored_line(&out), "restored 0 messages", "{out}");
    assert_eq!(dated(&store, ALICE), want);
}

#[test]
fn a_restore_killed_in_the_middle_is_finished_by_the_next_exactly_once() {
    if !mail_software_present("a_restore_killed_in_the_middle_is_finished_by_the_next_exactly_once")
    {
        return;
    }
    use std::os::unix::process::CommandExt;
    const N: usize = 1500;
    let mut site = Site::new(1_000_000);
    let ports = Ports::free();
    site.lun(0, &ports);
    site.mailbox(ALICE, 0, "pw");
    site.publish();
    let password = site.root.path().join("doveadm-password");
    std::fs::write(&password, format!("{PASSWORD}\n")).unwrap();
    let extra = owned(&["--doveadm-password-file", password.to_str().unwrap()]);
    let store = Agent::start_with(&site, "store", "store", &ports, &extra);
    deliver_lmtp(ports.lmtp, ALICE, &owned(&["hello"]));
    for i in 0..N {
        old_message(
            &store,
            ALICE,
            "INBOX",
            &format!("m{i:04}"),
            1_600_000_000 + i as i64 * 60,
            if i % 3 == 0 { "S" } else { "" },
        );
    }
    let before = dated(&store, ALICE);
    assert_eq!(before.len(), N + 1);
    let snapshot = site.root.path().join("snapshot");
    copy_read_only(&store.work.join("mail"), &snapshot);
    store_doveadm(
        &store,
        &[
            "expunge", "-u", ALICE, "mailbox", "INBOX", "header", "Subject", "m",
        ],
        None,
    );
    assert_eq!(dated(&store, ALICE).len(), 1);

    let restore = Restore {
        site: &site,
        store: &store,
        snapshot,
        runs: Default::default(),
    };
    // Killed, with every process it started (its own process group), as soon as messages arrive in
    // its staging folder in the live mailbox: in the middle of the dsync, before any move.
    let staged = store
        .work
        .join("mail/example.com/alice/Maildir/.Restore-in-progress.INBOX");
    let mut child = restore
        .command(&["--mailbox", ALICE], &password)
        .process_group(0)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let arrived = || {
        ["cur", "new"]
            .iter()
            .filter_map(|d| std::fs::read_dir(staged.join(d)).ok())
            .any(|mut d| d.next().is_some())
    };
    while !arrived() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the restore ended before it could be interrupted"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "no staging folder within 60 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    let group = format!("-{}", child.id());
    assert!(Command::new("kill")
        .args(["-KILL", "--", &group])
        .status()
        .unwrap()
        .success());
    child.wait().unwrap();
    // Its local Dovecot left the group when it daemonized: stop it by its pid.
    let pid_file = site.root.path().join("restore-1/run/master.pid");
    if let Ok(pid) = std::fs::read_to_string(&pid_file) {
        let _ = Command::new("kill").arg(pid.trim()).status();
    }
    // Left behind: the staging folder; nothing moved into INBOX yet. (The store's end of the dsync may
    // still be committing what it had received: the next run waits for it to hold still.)
    assert!(staged.exists());
    let inbox_then = dated(&store, ALICE)
        .iter()
        .filter(|r| r.0 == "INBOX")
        .count();
    assert_eq!(inbox_then, 1, "nothing was moved into INBOX yet");

    let out = restore.ok(&["--mailbox", ALICE]);
    let put_in_place: usize = out
        .lines()
        .find_map(|l| {
            l.strip_prefix("alice@example.com/INBOX: ")?
                .strip_suffix(" messages left by an interrupted restore put in place")
        })
        .unwrap_or_else(|| panic!("{out}"))
        .parse()
        .unwrap();
    assert!(put_in_place > 0, "{out}");
    assert_eq!(
        restored_line(&out),
        format!("restored {} messages", N - put_in_place),
        "{out}"
    );
    // Every message once, with its received date and flags; no staging folder left.
    assert_eq!(dated(&store, ALICE), before);
    assert!(!staged.exists());
    let out = restore.ok(&["--mailbox", ALICE]);
    assert_eq!(restored_line(&out), "restored 0 messages", "{out}");
    eprintln!("interrupted with {put_in_place} of {N} messages staged");
}

/// Subjects of `user`'s INBOX on the live store (its current home), sorted.
fn inbox(store: &Agent, user: &str) -> Vec<String> {
    let mut v = folders(store, user).remove("INBOX").unwrap_or_default();
    v.sort();
    v
}

/// An address its LUN took back after a removal is restored from its own incarnation's home in the
/// snapshot, with the LUN's mailboxes and incarnations read from the mounted tables as the Job does:
/// never the previous owner's mail, which a snapshot from before the return holds under the old home.
#[test]
fn a_taken_back_address_is_restored_from_its_own_home_only() {
    if !mail_software_present("a_taken_back_address_is_restored_from_its_own_home_only") {
        return;
    }
    const ANN: &str = "ann@example.com";
    let mut site = Site::new(1_000_000);
    let ports = Ports::free();
    site.lun(0, &ports);
    site.mailbox(ANN, 0, "pw");
    site.mailbox(BOB, 0, "pw");
    site.publish();
    let password = site.root.path().join("doveadm-password");
    std::fs::write(&password, format!("{PASSWORD}\n")).unwrap();
    let extra = owned(&["--doveadm-password-file", password.to_str().unwrap()]);
    let store = Agent::start_with(&site, "store", "store", &ports, &extra);
    deliver_lmtp(ports.lmtp, ANN, &owned(&["previous-owner"]));
    deliver_lmtp(ports.lmtp, BOB, &owned(&["bob-1"]));
    let before_return = site.root.path().join("snapshot-1");
    copy_read_only(&store.work.join("mail"), &before_return);

    // The LUN takes ann back for somebody else.
    site.tables.incarnations.insert(ANN.into(), 1);
    site.publish();
    // Mail the store takes before it reads the new tables goes where the address lived until then
    // (docs/architecture.md, "Placement"); the new owner's starts once it has.
    support::wait_for(
        "the store to read the new home",
        std::time::Duration::from_secs(30),
        || {
            std::fs::read_to_string(store.work.join("dovecot/userdb"))
                .unwrap_or_default()
                .contains(".incarnation-1/example.com/ann")
                .then_some(())
        },
    );
    support::wait_for(
        "the new owner's first mail taken",
        std::time::Duration::from_secs(30),
        || {
            let mut s = Session::connect(ports.lmtp);
            let ok = s.smtp_reply().0 == 220
                && s.smtp("LHLO t").0 == 250
                && s.smtp("MAIL FROM:<x@remote.test>").0 == 250
                && s.smtp(&format!("RCPT TO:<{ANN}>")).0 == 250
                && s.smtp("DATA").0 == 354;
            if !ok {
                std::thread::sleep(std::time::Duration::from_millis(100));
                return None;
            }
            s.send(&message("x@remote.test", &[ANN], "new-owner", 100));
            (s.smtp(".").0 == 250).then_some(())
        },
    );
    assert_eq!(inbox(&store, ANN), ["new-owner"]);
    let after_return = site.root.path().join("snapshot-2");
    copy_read_only(&store.work.join("mail"), &after_return);
    store_doveadm(
        &store,
        &["expunge", "-u", ANN, "mailbox", "INBOX", "all"],
        None,
    );
    store_doveadm(
        &store,
        &["expunge", "-u", BOB, "mailbox", "INBOX", "all"],
        None,
    );
    assert!(inbox(&store, ANN).is_empty());

    let tables = site.tables_dir();
    let lun = ["--tables-dir", tables.to_str().unwrap(), "--lun-index", "0"];
    let restore = |snapshot: &Path| Restore {
        site: &site,
        store: &store,
        snapshot: snapshot.to_path_buf(),
        runs: Default::default(),
    };
    // From before the return: ann's mail there was the previous owner's.
    let err = restore(&before_return).fails(&[&lun[..], &["--mailbox", ANN]].concat());
    assert!(err.contains("has no mail in the snapshot"), "{err}");
    let out = restore(&before_return).ok(&[&lun[..], &["--all"]].concat());
    assert!(
        out.contains(&format!(
            "{ANN}: skipped, in the snapshot but not a mailbox of the LUN now"
        )),
        "{out}"
    );
    assert_eq!(inbox(&store, ANN), Vec::<String>::new());
    assert_eq!(inbox(&store, BOB), ["bob-1"]);
    // From after it: the new owner's own mail.
    let out = restore(&after_return).ok(&[&lun[..], &["--mailbox", ANN]].concat());
    assert_eq!(restored_line(&out), "restored 1 messages", "{out}");
    assert_eq!(inbox(&store, ANN), ["new-owner"]);
    let legacy = store.work.join("mail/example.com/ann/Maildir/new");
    assert_eq!(
        std::fs::read_dir(&legacy).unwrap().count()
            + std::fs::read_dir(legacy.with_file_name("cur"))
                .unwrap()
                .count(),
        1,
        "the previous owner's Maildir is left as it was"
    );
}
