//! How restored messages reach the live store with their received dates. `doveadm save` stamps the
//! time of saving (Dovecot 2.3's has no date option), so the messages a restore brings back go another
//! way, each step with the real tools and each keeping the received date (a Maildir file's mtime), the
//! flags, the keywords and the GUID:
//!
//! 1. `doveadm import` copies them from the source Maildir (the snapshot clone, or a demoted replica's
//!    own volume) into a scratch Maildir, under [`STAGING`]`.<folder>`;
//! 2. `doveadm sync -1 -m STAGING.<folder>` (dsync over the store's doveadm service) creates that folder
//!    in the live mailbox with exactly those messages;
//! 3. inside the live store, `doveadm move` puts them into `<folder>`, and the staging folder is deleted.
//!
//! A restore interrupted after step 2 leaves a staging folder in the live mailbox. The next restore or
//! hand-over of that mailbox finishes it first ([`finish`]): moves what it holds into place, except
//! copies whose GUID the destination already holds (a move interrupted between its copy and its
//! expunge), and deletes it. Only then is the live mailbox compared with the source, so what was
//! staged counts as present and comes back exactly once.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::doveadm::{Doveadm, Side};

/// Parent of the staging folders, a name users can read (`Restore-in-progress.INBOX`): it shows only
/// while a restore runs, or until the next one finishes what an interrupted one left. Reserved: a
/// restore moves what a folder below it holds into the folder it names.
pub const STAGING: &str = "Restore-in-progress";
/// The store's hierarchy separator (Maildir++, `mail_location = maildir:~/Maildir`).
const SEPARATOR: char = '.';

/// Whether `folder` is a staging folder (below [`STAGING`]).
pub fn is_staging(folder: &str) -> bool {
    folder
        .strip_prefix(STAGING)
        .is_some_and(|rest| rest.starts_with(SEPARATOR) && rest.len() > 1)
}

/// The folder a staged message belongs in: `Restore-in-progress.Archive.2023` -> `Archive.2023`
/// (repeatedly, for a snapshot taken while a restore was staging).
pub fn target_of(folder: &str) -> &str {
    let mut f = folder;
    while is_staging(f) {
        f = &f[STAGING.len() + 1..];
    }
    f
}

/// The staging folder for messages of `folder`.
pub fn staging_folder(folder: &str) -> String {
    format!("{STAGING}{SEPARATOR}{folder}")
}

/// `user`'s Maildir under `root` in its `incarnation` on the LUN (`<domain>/<user>/Maildir` for the first,
/// see mailconfig::layout::home); anything but a plain address is refused.
pub fn maildir(root: &Path, user: &str, incarnation: u32) -> Result<PathBuf> {
    match crate::mailconfig::layout::home(root, user, incarnation) {
        Some(home) => Ok(home.join("Maildir")),
        None => anyhow::bail!("mailbox {user:?} is not an address (user@domain)"),
    }
}

/// Where messages are read from and staged: the Maildirs under `mail_root` (`<domain>/<user>/Maildir`)
/// and a scratch directory of this process's own, owned by the mail user so that doveadm (which runs
/// as it) can write there.
#[derive(Clone, Debug)]
pub struct Origin {
    pub mail_root: PathBuf,
    pub scratch: PathBuf,
    pub mail_uid: u32,
    pub mail_gid: u32,
    /// The incarnation of each mailbox its LUN took back after a removal (absent: the first).
    pub incarnations: std::collections::BTreeMap<String, u32>,
}

impl Origin {
    /// `user`'s Maildir under the mail root, in its current incarnation: never a previous owner's.
    pub fn maildir(&self, user: &str) -> Result<PathBuf> {
        let n = self.incarnations.get(user).copied().unwrap_or(0);
        maildir(&self.mail_root, user, n)
    }

    /// An empty scratch Maildir location (its parent created and owned by the mail user).
    fn fresh_scratch(&self) -> Result<PathBuf> {
        let home = self.scratch.join("staging");
        if home.exists() {
            std::fs::remove_dir_all(&home)
                .with_context(|| format!("emptying {}", home.display()))?;
        }
        for dir in [&self.scratch, &home] {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            std::os::unix::fs::chown(dir, Some(self.mail_uid), Some(self.mail_gid))
                .with_context(|| format!("giving {} to the mail user", dir.display()))?;
        }
        Ok(home.join("Maildir"))
    }
}

/// Copies the messages `uids` of the source folder `folder` of `user` into the live folder
/// `target_of(folder)` (which must exist), keeping their received dates, flags and GUIDs; returns how
/// many arrived.
pub fn transfer(
    d: &Doveadm,
    origin: &Origin,
    live: &Side,
    user: &str,
    folder: &str,
    uids: &[u32],
) -> Result<usize> {
    let scratch = origin.fresh_scratch()?;
    let source = origin.maildir(user)?;
    d.import_to_scratch(&scratch, user, &source, folder, STAGING, uids)
        .with_context(|| format!("copying {} messages of {folder:?} to scratch", uids.len()))?;
    let staged = staging_folder(folder);
    d.sync_to_live(&scratch, user, &staged, live)
        .with_context(|| format!("dsync of {staged:?} into the live store"))?;
    let moved = move_in_place(d, live, user, &staged)?;
    let _ = std::fs::remove_dir_all(scratch.parent().unwrap_or(&scratch));
    Ok(moved)
}

/// What a restore interrupted earlier left in `user`'s live mailbox, now in place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finished {
    pub mailbox: String,
    pub folder: String,
    pub moved: usize,
}

/// Finishes every staging folder of `user`'s live mailbox (`live_folders`, as listed): see the module's
/// comment.
pub fn finish(
    d: &Doveadm,
    live: &Side,
    user: &str,
    live_folders: &[String],
) -> Result<Vec<Finished>> {
    let mut out = vec![];
    // Deepest first: a staging folder below another is not its parent's content.
    let mut staged: Vec<&String> = live_folders.iter().filter(|f| is_staging(f)).collect();
    staged.sort_by_key(|f| std::cmp::Reverse(f.len()));
    for folder in staged {
        let target = target_of(folder);
        if !live_folders.iter().any(|f| f == target) {
            create_folder(d, live, user, target)?;
        }
        settle(d, live, user, folder)?;
        let moved = move_in_place(d, live, user, folder)
            .with_context(|| format!("finishing {folder:?}, left by an interrupted restore"))?;
        out.push(Finished {
            mailbox: user.to_string(),
            folder: target.to_string(),
            moved,
        });
    }
    Ok(out)
}

/// How long a staging folder must stay unchanged before it is finished, and how long to wait for that.
const QUIET: Duration = Duration::from_secs(2);
const SETTLE_LIMIT: Duration = Duration::from_secs(60);

/// Waits until nothing writes into a staging folder any more (its count and UIDNEXT hold still for
/// [`QUIET`]): when a restore is killed, the store's end of its dsync still commits what it had
/// received. Past [`SETTLE_LIMIT`] it goes ahead: what arrives later is finished by the next run, and
/// copies of messages restored meanwhile are recognised by their GUID.
fn settle(d: &Doveadm, live: &Side, user: &str, folder: &str) -> Result<()> {
    let started = Instant::now();
    let mut last = d.counts(live, user, folder)?;
    while started.elapsed() < SETTLE_LIMIT {
        std::thread::sleep(QUIET);
        let now = d.counts(live, user, folder)?;
        if now == last {
            return Ok(());
        }
        last = now;
    }
    tracing::warn!(
        "{folder:?} of {user} is still changing after {SETTLE_LIMIT:?}; finishing it anyway"
    );
    Ok(())
}

/// Creates `folder`, unless it appeared meanwhile (a client, or INBOX created on first access).
pub fn create_folder(d: &Doveadm, live: &Side, user: &str, folder: &str) -> Result<()> {
    if let Err(e) = d.create_folder(live, user, folder) {
        if !d.folders(live, user)?.iter().any(|f| f == folder) {
            return Err(e.context(format!("creating folder {folder:?}")));
        }
    }
    Ok(())
}

/// Moves the staging folder's messages into their folder and deletes it; returns how many it moved.
/// A message whose GUID the destination holds already is that message's second copy (a move stopped
/// between copying and expunging): it is expunged instead. Dovecot refuses to delete a folder that got
/// mail meanwhile (the far end of a dsync cut off mid-way may still be committing): then the new mail
/// is moved too, a few times at most.
fn move_in_place(d: &Doveadm, live: &Side, user: &str, staged: &str) -> Result<usize> {
    const ATTEMPTS: u32 = 5;
    let mut moved = 0;
    for attempt in 1..=ATTEMPTS {
        moved += move_once(d, live, user, staged)?;
        match d.delete_folder(live, user, staged) {
            Ok(()) => return Ok(moved),
            Err(e) if attempt < ATTEMPTS => {
                tracing::warn!("deleting {staged:?} of {user}: {e:#}; moving what arrived");
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
            Err(e) => return Err(e.context(format!("deleting {staged:?}"))),
        }
    }
    unreachable!("the last attempt returns")
}

fn move_once(d: &Doveadm, live: &Side, user: &str, staged: &str) -> Result<usize> {
    let target = target_of(staged);
    let staged_guids = d.guids(live, user, staged)?;
    if staged_guids.is_empty() {
        return Ok(0);
    }
    let there: std::collections::HashSet<String> = d
        .guids(live, user, target)?
        .into_iter()
        .map(|(_, g)| g)
        .collect();
    let twice: Vec<u32> = staged_guids
        .iter()
        .filter(|(_, g)| there.contains(g))
        .map(|(uid, _)| *uid)
        .collect();
    if !twice.is_empty() {
        d.expunge(live, user, staged, &twice)?;
    }
    let moved = staged_guids.len() - twice.len();
    if moved > 0 {
        d.move_all(live, user, staged, target)
            .with_context(|| format!("moving {staged:?} into {target:?}"))?;
    }
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_folders_name_their_destination() {
        assert!(is_staging("Restore-in-progress.INBOX"));
        assert!(is_staging("Restore-in-progress.Archive.2023"));
        assert!(!is_staging("Restore-in-progress"));
        assert!(!is_staging("Restore-in-progress."));
        assert!(!is_staging("Restore-in-progressX.INBOX"));
        assert!(!is_staging("INBOX"));
        assert_eq!(
            target_of("Restore-in-progress.Archive.2023"),
            "Archive.2023"
        );
        assert_eq!(
            target_of("Restore-in-progress.Restore-in-progress.INBOX"),
            "INBOX"
        );
        assert_eq!(target_of("Projects"), "Projects");
        assert_eq!(staging_folder("INBOX"), "Restore-in-progress.INBOX");
    }

    #[test]
    fn maildirs_are_addresses_only() {
        let o = Origin {
            mail_root: "/m".into(),
            scratch: "/s".into(),
            mail_uid: 5000,
            mail_gid: 5000,
            incarnations: [("bob@a.example".to_string(), 2)].into(),
        };
        assert_eq!(
            o.maildir("bob@a.example").unwrap(),
            Path::new("/m/.incarnation-2/a.example/bob/Maildir")
        );
        assert_eq!(
            o.maildir("ann@a.example").unwrap(),
            Path::new("/m/a.example/ann/Maildir")
        );
        assert!(o.maildir("../etc@x").is_err());
        assert!(o.maildir("nobody").is_err());
        assert!(o.maildir("a/b@x").is_err());
    }
}
