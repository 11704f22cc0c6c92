//! `mailpod-operator restore-import`: what the restore Job runs. It reads the snapshot (a read-only clone
//! of the LUN's volume) through a local, auth-only Dovecot and brings back into the live store, over the
//! store's doveadm TCP service, every selected message the live mailbox does not hold anywhere.
//!
//! Why not dsync of the whole snapshot: `doveadm sync -1` from the snapshot to the live store keeps the
//! destination's expunges and folder deletions (its manual says so, and it restores nothing in a test
//! with a deleted message and a deleted folder), and `doveadm backup` would delete mail that arrived after
//! the snapshot. Restore wants the opposite of both: bring back what is gone, touch nothing else. So each
//! message is compared by [`MessageKey`] (header block and size), as a multiset over the whole mailbox: a
//! message is brought back only as many times as the snapshot holds it more often than the live mailbox,
//! in whichever folders. A message moved to another folder since the snapshot is present; two identical
//! copies in the snapshot are two. Running the same restore twice brings back nothing the second time.
//! The missing messages travel through a staging folder with dsync ([`staging`]), so they keep their
//! received dates, flags and keywords.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::doveadm::{Doveadm, Listed, MessageKey, Side};
use super::local::LocalDovecot;
use super::staging::{self, Finished, Origin};

/// What to restore.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Every mailbox found in the snapshot that the LUN still holds.
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
    /// The mailboxes the LUN holds now (its `spec.mailboxes`): a mailbox of the snapshot that is not
    /// among them is not restored. Required with [`Scope::All`].
    pub lun_mailboxes: Option<Vec<String>>,
    /// The incarnation of each mailbox its LUN took back after a removal (absent: the first): its mail
    /// in the snapshot is in that incarnation's home, and a previous owner's is never restored to it.
    pub incarnations: BTreeMap<String, u32>,
    /// Owner of the Maildirs (the image's vmail user).
    pub mail_uid: u32,
    pub mail_gid: u32,
}

/// The mailboxes the MailPod's tables (as mounted in `dir`) place on LUN `index`, and the incarnations of
/// those that have one.
pub fn lun_from_tables(dir: &Path, index: u32) -> Result<(Vec<String>, BTreeMap<String, u32>)> {
    let data = crate::agent::render::read_configmap_dir(dir)
        .with_context(|| format!("reading the access tables in {}", dir.display()))?;
    let lun = crate::mailconfig::tables::AccessTables::from_data(&data)?.lun(index);
    Ok((lun.users, lun.incarnations))
}

/// What happened in one folder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FolderReport {
    pub mailbox: String,
    pub folder: String,
    /// Selected messages in the snapshot.
    pub in_snapshot: usize,
    /// Of those, already in the live mailbox (in this folder or another).
    pub present: usize,
    pub restored: usize,
}

/// What happened in one mailbox.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MailboxReport {
    pub folders: Vec<FolderReport>,
    /// Staging folders an interrupted restore had left, finished first.
    pub finished: Vec<Finished>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub folders: Vec<FolderReport>,
    pub finished: Vec<Finished>,
    /// Mailboxes with mail in the snapshot that the LUN no longer holds, not restored.
    pub skipped: Vec<String>,
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
        for s in &self.skipped {
            writeln!(
                f,
                "{s}: skipped, in the snapshot but not a mailbox of the LUN now (removed since, or its address taken back by a new owner)"
            )?;
        }
        for r in &self.finished {
            writeln!(
                f,
                "{}/{}: {} messages left by an interrupted restore put in place",
                r.mailbox, r.folder, r.moved
            )?;
        }
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
    let on_lun = |m: &str| {
        opts.lun_mailboxes
            .as_ref()
            .is_none_or(|l| l.iter().any(|x| x.eq_ignore_ascii_case(m)))
    };
    let mut report = Report::default();
    let mailboxes = match &opts.scope {
        Scope::All => {
            if opts.lun_mailboxes.is_none() {
                bail!("--all needs --lun-mailboxes (the LUN's spec.mailboxes): only mailboxes the LUN still holds are restored");
            }
            let (mut keep, skip): (Vec<String>, Vec<String>) = mailboxes_in(&opts.mail_root)?
                .into_iter()
                .partition(|m| on_lun(m) && !opts.incarnations.contains_key(m));
            report.skipped = skip;
            // Mailboxes taken back after a removal: from their own incarnation's home only.
            for m in opts.incarnations.keys().filter(|m| on_lun(m)) {
                if staging::maildir(&opts.mail_root, m, opts.incarnations[m])?.is_dir() {
                    keep.push(m.clone());
                }
            }
            keep.sort();
            if keep.is_empty() {
                bail!(
                    "the snapshot holds no mailbox the LUN lists (under {})",
                    opts.mail_root.display()
                );
            }
            keep
        }
        Scope::Mailbox { address, .. } => {
            if !on_lun(address) {
                bail!("mailbox {address} is not on the LUN (not in --lun-mailboxes, the LUN's spec.mailboxes): not restored");
            }
            let incarnation = opts.incarnations.get(address).copied().unwrap_or(0);
            let dir = staging::maildir(&opts.mail_root, address, incarnation)?;
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
    let origin = Origin {
        mail_root: opts.mail_root.clone(),
        scratch: opts.work_dir.join("scratch"),
        mail_uid: opts.mail_uid,
        mail_gid: opts.mail_gid,
        incarnations: opts.incarnations.clone(),
    };
    for mailbox in &mailboxes {
        let (folder, message_id) = match &opts.scope {
            Scope::All => (None, None),
            Scope::Mailbox {
                folder, message_id, ..
            } => (folder.as_deref(), message_id.as_deref()),
        };
        let done = restore_mailbox(&local.doveadm, &origin, &live, mailbox, folder, message_id)
            .with_context(|| format!("restoring mailbox {mailbox}"))?;
        report.folders.extend(done.folders);
        report.finished.extend(done.finished);
    }
    drop(local);
    Ok(report)
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

/// Brings back into `live` every message of `mailbox` (one folder, one Message-ID, or all) that the
/// side `d` runs locally on holds more often, as a multiset over the whole mailbox; running it again
/// copies nothing. Staging folders an interrupted run left are finished first. Also the hand-over of a
/// demoted store replica (agent::replication), whose own Dovecot and volume are the local side.
pub(crate) fn restore_mailbox(
    d: &Doveadm,
    origin: &Origin,
    live: &Side,
    mailbox: &str,
    folder: Option<&str>,
    message_id: Option<&str>,
) -> Result<MailboxReport> {
    let snap = Side::Snapshot;
    let snapshot_folders = d.folders(&snap, mailbox)?;
    if let Some(f) = folder {
        if !snapshot_folders.iter().any(|x| staging::target_of(x) == f) {
            bail!(
                "folder {f:?} is not in the snapshot (its folders: {})",
                snapshot_folders.join(", ")
            );
        }
    }
    let mut live_folders = d.folders(live, mailbox)?;
    let mut finished = staging::finish(d, live, mailbox, &live_folders)?;
    if !finished.is_empty() {
        live_folders = d.folders(live, mailbox)?;
    }
    let snapshot = list_all(d, &snap, mailbox, &snapshot_folders, message_id)?;
    if let (Some(id), true) = (message_id, snapshot.is_empty()) {
        bail!(
            "no message with Message-ID <{}> in the snapshot",
            bare_id(id)
        );
    }
    let present = list_all(d, live, mailbox, &live_folders, message_id)?;
    let missing = missing(&snapshot, &present);

    // Per destination folder, the selection; empty folders of the snapshot too (a folder deleted since
    // the snapshot comes back even when it was empty), unless one message was asked for.
    let mut selected: BTreeMap<String, FolderReport> = BTreeMap::new();
    let wanted = |f: &str| folder.is_none_or(|x| x == f);
    if message_id.is_none() {
        for f in snapshot_folders.iter().map(|f| staging::target_of(f)) {
            if wanted(f) {
                selected
                    .entry(f.to_string())
                    .or_insert_with(|| report(mailbox, f));
            }
        }
    }
    for m in &snapshot {
        let f = staging::target_of(&m.folder);
        if wanted(f) {
            let r = selected
                .entry(f.to_string())
                .or_insert_with(|| report(mailbox, f));
            r.in_snapshot += 1;
        }
    }
    if let (Some(id), true) = (message_id, selected.is_empty()) {
        bail!(
            "no message with Message-ID <{}> in folder {} of the snapshot",
            bare_id(id),
            folder.unwrap_or_default()
        );
    }
    // UIDs to bring back, per source folder of the snapshot.
    let mut by_source: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
    for m in missing
        .iter()
        .filter(|m| wanted(staging::target_of(&m.folder)))
    {
        by_source.entry(&m.folder).or_default().push(m.uid);
    }
    for name in selected.keys() {
        if !live_folders.iter().any(|f| f == name) {
            staging::create_folder(d, live, mailbox, name)
                .with_context(|| format!("folder {name:?}"))?;
        }
    }
    for (source, uids) in by_source {
        let target = staging::target_of(source);
        let moved = staging::transfer(d, origin, live, mailbox, source, &uids)
            .with_context(|| format!("folder {target:?}"))?;
        if let Some(r) = selected.get_mut(target) {
            r.restored += moved;
        }
    }
    // A staging folder that appeared meanwhile (the store's end of a dsync cut off earlier, still
    // committing) is finished now rather than left for the next run.
    let now = d.folders(live, mailbox)?;
    if now.iter().any(|f| staging::is_staging(f)) {
        finished.extend(staging::finish(d, live, mailbox, &now)?);
    }
    let mut folders: Vec<FolderReport> = selected.into_values().collect();
    for r in &mut folders {
        r.present = r.in_snapshot.saturating_sub(
            missing
                .iter()
                .filter(|m| staging::target_of(&m.folder) == r.folder)
                .count(),
        );
    }
    Ok(MailboxReport { folders, finished })
}

fn report(mailbox: &str, folder: &str) -> FolderReport {
    FolderReport {
        mailbox: mailbox.to_string(),
        folder: folder.to_string(),
        in_snapshot: 0,
        present: 0,
        restored: 0,
    }
}

/// The messages of `mailbox` on `side` (only those with `message_id`, when given), listed folder by
/// folder, so one doveadm answer never holds a whole mailbox's headers.
fn list_all(
    d: &Doveadm,
    side: &Side,
    mailbox: &str,
    folders: &[String],
    message_id: Option<&str>,
) -> Result<Vec<Listed>> {
    let mut out = vec![];
    for name in folders {
        let mut query = vec!["mailbox", name.as_str()];
        if let Some(id) = message_id {
            query.extend(["header", "Message-ID", bare_id(id)]);
        }
        let mut messages = d
            .list(side, mailbox, &query)
            .with_context(|| format!("folder {name:?} on {side}"))?;
        if let Some(id) = message_id {
            // The header search matches substrings; keep exact matches only.
            messages.retain(|m| bare_id(&m.key.message_id) == bare_id(id));
        }
        out.extend(messages);
    }
    Ok(out)
}

/// The snapshot's messages the live mailbox does not hold, as multisets of [`MessageKey`] over the
/// whole mailbox: a live copy first answers for a snapshot copy in the same folder, the remaining ones
/// for copies in any folder (a message moved since the snapshot), so each live copy answers once.
fn missing(snapshot: &[Listed], live: &[Listed]) -> Vec<Listed> {
    let mut in_folder: HashMap<(&MessageKey, &str), usize> = HashMap::new();
    for m in live {
        *in_folder
            .entry((&m.key, staging::target_of(&m.folder)))
            .or_default() += 1;
    }
    let mut elsewhere = vec![];
    for m in snapshot {
        match in_folder.get_mut(&(&m.key, staging::target_of(&m.folder))) {
            Some(n) if *n > 0 => *n -= 1,
            _ => elsewhere.push(m),
        }
    }
    let mut anywhere: HashMap<&MessageKey, usize> = HashMap::new();
    for ((key, _), n) in in_folder {
        *anywhere.entry(key).or_default() += n;
    }
    elsewhere
        .into_iter()
        .filter(|m| match anywhere.get_mut(&m.key) {
            Some(n) if *n > 0 => {
                *n -= 1;
                false
            }
            _ => true,
        })
        .cloned()
        .collect()
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
    fn a_message_anywhere_in_the_mailbox_is_present() {
        // Moved to Trash since the snapshot: present. Two copies in the snapshot, one live (in the other
        // folder): the copy of the folder that lost it is the one missing.
        let snap = [
            listed("INBOX", 1, "<moved>"),
            listed("INBOX", 2, "<dup>"),
            listed("Projects", 1, "<dup>"),
            listed("Restore-in-progress.Projects", 1, "<staged>"),
        ];
        let live = [
            listed("Trash", 7, "<moved>"),
            listed("Projects", 4, "<dup>"),
            listed("Projects", 5, "<staged>"),
        ];
        let gone: Vec<(String, u32)> = missing(&snap, &live)
            .into_iter()
            .map(|m| (m.folder, m.uid))
            .collect();
        assert_eq!(gone, [("INBOX".to_string(), 2)]);
        // Every live copy answers once only.
        let live = [listed("Trash", 7, "<dup>")];
        assert_eq!(missing(&snap[1..3], &live).len(), 1);
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
    }

    #[test]
    fn message_ids_compare_without_brackets() {
        assert_eq!(bare_id(" <a@b> "), "a@b");
        assert_eq!(bare_id("a@b"), "a@b");
    }
}
