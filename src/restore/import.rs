//! `mailpod-operator restore-import`: what the restore Job runs. It reads the snapshot (a read-only clone
//! of the LUN's volume) through a local, auth-only Dovecot and copies into the live store, over the store's
//! doveadm TCP service, every selected message the live store does not hold.
//!
//! Why not dsync: `doveadm sync -1` from the snapshot to the live store keeps the destination's
//! expunges and folder deletions (its manual says so, and it restores nothing in a test with a deleted
//! message and a deleted folder), and `doveadm backup` would delete mail that arrived after the snapshot.
//! Restore wants the opposite of both: bring back what is gone, touch nothing else. So each message is
//! compared by [`MessageKey`] (header block and size, kept byte for byte by `save`), per folder, as a
//! multiset: a message is copied only as many times as the snapshot holds it more often than the live
//! folder. Running the same restore twice copies nothing the second time. Copies keep their flags
//! (`\Seen`, `\Answered`, keywords).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::doveadm::{Doveadm, Listed, MessageKey, Side};
use super::local::LocalDovecot;

/// What to restore.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Every mailbox found in the snapshot.
    All,
    /// One mailbox, optionally one folder of it, optionally one message (by Message-ID).
    Mailbox {
        address: String,
        folder: Option<String>,
        message_id: Option<String>,
    },
}

#[derive(Clone, Debug)]
pub struct ImportOptions {
    /// The store layout's mail root on the mounted snapshot clone (`<domain>/<user>/Maildir`).
    pub mail_root: PathBuf,
    /// Writable scratch directory for the local Dovecot.
    pub work_dir: PathBuf,
    /// The live store's doveadm service, `host:port` (the LUN's active Service).
    pub target: String,
    /// The LUN's doveadm password (its replication Secret).
    pub password_file: PathBuf,
    pub scope: Scope,
    /// Owner of the Maildirs (the image's vmail user).
    pub mail_uid: u32,
    pub mail_gid: u32,
}

/// What happened in one folder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FolderReport {
    pub mailbox: String,
    pub folder: String,
    /// Selected messages in the snapshot.
    pub in_snapshot: usize,
    /// Of those, already in the live folder.
    pub present: usize,
    pub restored: usize,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub folders: Vec<FolderReport>,
}

impl Report {
    pub fn restored(&self) -> usize {
        self.folders.iter().map(|f| f.restored).sum()
    }
    pub fn present(&self) -> usize {
        self.folders.iter().map(|f| f.present).sum()
    }
    pub fn in_snapshot(&self) -> usize {
        self.folders.iter().map(|f| f.in_snapshot).sum()
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for r in &self.folders {
            writeln!(
                f,
                "{}/{}: {} in snapshot, {} already present, {} restored",
                r.mailbox, r.folder, r.in_snapshot, r.present, r.restored
            )?;
        }
        writeln!(
            f,
            "restored {} messages ({} selected in the snapshot, {} already present)",
            self.restored(),
            self.in_snapshot(),
            self.present()
        )
    }
}

/// Runs the import. Every error names the mailbox, folder or message it concerns.
pub fn run(opts: &ImportOptions) -> Result<Report> {
    let password = std::fs::read_to_string(&opts.password_file)
        .with_context(|| {
            format!(
                "reading the doveadm password from {} (the LUN's replication Secret)",
                opts.password_file.display()
            )
        })?
        .trim_end_matches(['\r', '\n'])
        .to_string();
    let mailboxes = match &opts.scope {
        Scope::All => mailboxes_in(&opts.mail_root)?,
        Scope::Mailbox { address, .. } => {
            let dir = maildir(&opts.mail_root, address)?;
            if !dir.is_dir() {
                bail!(
                    "mailbox {address} has no mail in the snapshot (no {})",
                    dir.display()
                );
            }
            vec![address.clone()]
        }
    };
    let local = LocalDovecot::start(opts, &password)?;
    let live = Side::Live(opts.target.clone());
    let mut report = Report::default();
    for mailbox in &mailboxes {
        let (folder, message_id) = match &opts.scope {
            Scope::All => (None, None),
            Scope::Mailbox {
                folder, message_id, ..
            } => (folder.as_deref(), message_id.as_deref()),
        };
        let done = restore_mailbox(&local.doveadm, &live, mailbox, folder, message_id)
            .with_context(|| format!("restoring mailbox {mailbox}"))?;
        report.folders.extend(done);
    }
    drop(local);
    Ok(report)
}

fn maildir(root: &Path, address: &str) -> Result<PathBuf> {
    match address.split_once('@') {
        Some((user, domain))
            if !user.is_empty()
                && !domain.is_empty()
                && !address.contains('/')
                && !user.starts_with('.')
                && !domain.starts_with('.') =>
        {
            Ok(root.join(domain).join(user).join("Maildir"))
        }
        _ => bail!("--mailbox {address:?} is not an address (user@domain)"),
    }
}

/// Mailboxes with a Maildir under `root` (`<domain>/<user>/Maildir`), sorted.
fn mailboxes_in(root: &Path) -> Result<Vec<String>> {
    let dirs = |p: &Path| -> Result<Vec<String>> {
        let mut out = vec![];
        for e in std::fs::read_dir(p).with_context(|| format!("reading {}", p.display()))? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            if e.file_type()?.is_dir() && !name.starts_with('.') {
                out.push(name);
            }
        }
        Ok(out)
    };
    let mut out = vec![];
    for domain in dirs(root)? {
        for user in dirs(&root.join(&domain))? {
            if root.join(&domain).join(&user).join("Maildir").is_dir() {
                out.push(format!("{user}@{domain}"));
            }
        }
    }
    out.sort();
    if out.is_empty() {
        bail!(
            "the snapshot holds no mailboxes (no <domain>/<user>/Maildir under {})",
            root.display()
        );
    }
    Ok(out)
}

/// Message-IDs compare without their angle brackets and surrounding space.
fn bare_id(id: &str) -> &str {
    id.trim().trim_start_matches('<').trim_end_matches('>')
}

/// Copies into `live` every message of `mailbox` (one folder, one Message-ID, or all) that the side `d`
/// runs locally on holds more often, as a multiset per folder; running it again copies nothing. Also the
/// hand-over of a demoted store replica (agent::replication), whose own Dovecot is that local side.
pub(crate) fn restore_mailbox(
    d: &Doveadm,
    live: &Side,
    mailbox: &str,
    folder: Option<&str>,
    message_id: Option<&str>,
) -> Result<Vec<FolderReport>> {
    let snap = Side::Snapshot;
    let snapshot_folders = d.folders(&snap, mailbox)?;
    let folders: Vec<String> = match folder {
        Some(f) if snapshot_folders.iter().any(|x| x == f) => vec![f.to_string()],
        Some(f) => bail!(
            "folder {f:?} is not in the snapshot (its folders: {})",
            snapshot_folders.join(", ")
        ),
        None => snapshot_folders,
    };
    // Listed folder by folder, so one doveadm answer never holds a whole mailbox's headers.
    let mut selected: Vec<(String, Vec<Listed>)> = vec![];
    for name in folders {
        let mut query = vec!["mailbox", name.as_str()];
        if let Some(id) = message_id {
            query.extend(["header", "Message-ID", bare_id(id)]);
        }
        let mut messages = d
            .list(&snap, mailbox, &query)
            .with_context(|| format!("folder {name:?} of the snapshot"))?;
        if let Some(id) = message_id {
            // The header search matches substrings; keep exact matches only.
            messages.retain(|m| bare_id(&m.key.message_id) == bare_id(id));
            if messages.is_empty() {
                continue;
            }
        }
        selected.push((name, messages));
    }
    if let (Some(id), true) = (message_id, selected.is_empty()) {
        bail!(
            "no message with Message-ID <{}> in the snapshot{}",
            bare_id(id),
            folder.map(|f| format!(" (folder {f})")).unwrap_or_default()
        );
    }
    let live_folders = d.folders(live, mailbox)?;
    let mut out = vec![];
    for (name, messages) in selected {
        let exists = live_folders.contains(&name);
        let report = restore_folder(d, live, mailbox, &name, messages, exists)
            .with_context(|| format!("folder {name:?}"))?;
        out.push(report);
    }
    Ok(out)
}

/// Copies into the live `folder` the messages of `messages` it lacks, then their flags.
fn restore_folder(
    d: &Doveadm,
    live: &Side,
    mailbox: &str,
    folder: &str,
    messages: Vec<Listed>,
    exists: bool,
) -> Result<FolderReport> {
    let present_live = if exists {
        d.list(live, mailbox, &["mailbox", folder])?
    } else {
        vec![]
    };
    let missing = missing(&messages, &present_live);
    let mut report = FolderReport {
        mailbox: mailbox.to_string(),
        folder: folder.to_string(),
        in_snapshot: messages.len(),
        present: messages.len() - missing.len(),
        restored: 0,
    };
    // A folder deleted since the snapshot comes back even when it was empty.
    if !exists {
        if let Err(e) = d.create_folder(live, mailbox, folder) {
            // Created meanwhile (a client, or INBOX created on first access) is fine.
            if !d.folders(live, mailbox)?.iter().any(|f| f == folder) {
                return Err(e);
            }
        }
    }
    if missing.is_empty() {
        return Ok(report);
    }
    let uid_next = d.uid_next(live, mailbox, folder)?;
    for batch in missing.chunks(READ_BATCH) {
        let raw = read_batch(d, mailbox, folder, batch)?;
        report.restored += save_parallel(d, live, mailbox, folder, &raw)?;
    }
    restore_flags(d, live, mailbox, folder, &missing, uid_next)?;
    Ok(report)
}

/// Messages read from the snapshot per doveadm run.
const READ_BATCH: usize = 100;
/// Concurrent `doveadm save` runs: each is a process and a TCP session, and the store takes saves to
/// one folder concurrently (Maildir needs no lock to add a file). The cost: restored copies get UIDs in
/// an order that may differ from the snapshot's.
const SAVERS: usize = 4;

/// The batch's messages from the snapshot, in one doveadm run; one by one if that answer cannot be
/// parsed. A message the snapshot lists but cannot give back is an error naming it.
fn read_batch(
    d: &Doveadm,
    mailbox: &str,
    folder: &str,
    batch: &[Listed],
) -> Result<Vec<(Listed, Vec<u8>)>> {
    let snap = Side::Snapshot;
    let uids: Vec<u32> = batch.iter().map(|m| m.uid).collect();
    let mut read = d
        .messages(&snap, mailbox, folder, &uids)
        .unwrap_or_else(|e| {
            tracing::warn!(
                "reading {} messages at once: {e:#}; reading one by one",
                uids.len()
            );
            Default::default()
        });
    batch
        .iter()
        .map(|m| {
            let raw = match read.remove(&m.uid) {
                Some(raw) => raw,
                None => d
                    .message(&snap, mailbox, folder, m.uid)
                    .with_context(|| format!("reading message uid {} from the snapshot", m.uid))?,
            };
            Ok((m.clone(), raw))
        })
        .collect()
}

/// Saves `messages` into the live `folder` with [`SAVERS`] workers; returns how many were saved, or
/// the first failure.
fn save_parallel(
    d: &Doveadm,
    live: &Side,
    mailbox: &str,
    folder: &str,
    messages: &[(Listed, Vec<u8>)],
) -> Result<usize> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failed = std::sync::atomic::AtomicBool::new(false);
    let results: Vec<Result<usize>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..SAVERS.min(messages.len()))
            .map(|_| {
                scope.spawn(|| {
                    let mut saved = 0;
                    while !failed.load(std::sync::atomic::Ordering::SeqCst) {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let Some((m, raw)) = messages.get(i) else {
                            break;
                        };
                        if let Err(e) = d.save(live, mailbox, folder, raw) {
                            failed.store(true, std::sync::atomic::Ordering::SeqCst);
                            return Err(e.context(format!(
                                "saving message {} (snapshot uid {})",
                                m.key.message_id, m.uid
                            )));
                        }
                        saved += 1;
                    }
                    Ok(saved)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("a save worker panicked"))
            .collect()
    });
    let mut saved = 0;
    for r in results {
        saved += r?;
    }
    Ok(saved)
}

/// The snapshot's messages the live folder does not hold, counting repeated copies.
fn missing(snapshot: &[Listed], live: &[Listed]) -> Vec<Listed> {
    let mut have: HashMap<&MessageKey, usize> = HashMap::new();
    for m in live {
        *have.entry(&m.key).or_default() += 1;
    }
    snapshot
        .iter()
        .filter(|m| match have.get_mut(&m.key) {
            Some(n) if *n > 0 => {
                *n -= 1;
                false
            }
            _ => true,
        })
        .cloned()
        .collect()
}

/// `save` cannot set flags: find the copies among the UIDs assigned since `uid_next` (mail delivered
/// meanwhile has other keys) and set each snapshot message's flags on its copy, grouped by flag set.
fn restore_flags(
    d: &Doveadm,
    live: &Side,
    mailbox: &str,
    folder: &str,
    restored: &[Listed],
    uid_next: u32,
) -> Result<()> {
    if restored.iter().all(|m| m.flags.is_empty()) {
        return Ok(());
    }
    let range = format!("{uid_next}:*");
    let mut copies = d.list(live, mailbox, &["mailbox", folder, "uid", &range])?;
    copies.retain(|c| c.uid >= uid_next);
    let mut copy_uids: HashMap<&MessageKey, Vec<u32>> = HashMap::new();
    for c in &copies {
        copy_uids.entry(&c.key).or_default().push(c.uid);
    }
    let mut by_flags: BTreeMap<Vec<String>, Vec<u32>> = BTreeMap::new();
    for m in restored.iter().filter(|m| !m.flags.is_empty()) {
        if let Some(uid) = copy_uids.get_mut(&m.key).and_then(Vec::pop) {
            by_flags.entry(m.flags.clone()).or_default().push(uid);
        }
    }
    for (flags, uids) in by_flags {
        d.add_flags(live, mailbox, folder, &flags, &uids)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(folder: &str, uid: u32, id: &str) -> Listed {
        Listed {
            folder: folder.into(),
            uid,
            flags: vec![],
            key: MessageKey {
                message_id: id.into(),
                size: 10,
                header_hash: id.len() as u64 + id.bytes().map(u64::from).sum::<u64>(),
            },
        }
    }

    #[test]
    fn missing_counts_repeated_copies() {
        let snap = [
            listed("INBOX", 1, "<a>"),
            listed("INBOX", 2, "<a>"),
            listed("INBOX", 3, "<b>"),
            listed("INBOX", 4, "<c>"),
        ];
        let live = [listed("INBOX", 9, "<a>"), listed("INBOX", 10, "<c>")];
        let uids: Vec<u32> = missing(&snap, &live).iter().map(|m| m.uid).collect();
        assert_eq!(uids, [2, 3]);
        assert!(missing(&snap, &snap).is_empty());
    }

    #[test]
    fn mailboxes_are_found_by_their_maildir() {
        let root = tempfile::tempdir().unwrap();
        for p in [
            "b.example/zed/Maildir/cur",
            "a.example/ann/Maildir",
            "a.example/nomail",
            "lost+found",
        ] {
            std::fs::create_dir_all(root.path().join(p)).unwrap();
        }
        std::fs::write(root.path().join(".mailpod-replica-role"), "active\n").unwrap();
        assert_eq!(
            mailboxes_in(root.path()).unwrap(),
            ["ann@a.example", "zed@b.example"]
        );
        let empty = tempfile::tempdir().unwrap();
        assert!(mailboxes_in(empty.path())
            .unwrap_err()
            .to_string()
            .contains("no mailboxes"));
        assert!(maildir(root.path(), "../etc@x").is_err());
        assert!(maildir(root.path(), "nobody").is_err());
    }

    #[test]
    fn message_ids_compare_without_brackets() {
        assert_eq!(bare_id(" <a@b> "), "a@b");
        assert_eq!(bare_id("a@b"), "a@b");
    }
}
