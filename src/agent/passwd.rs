//! The users passwd-file, made readable by exactly the process that needs it.
//!
//! The users Secret is mounted by the kubelet root-owned with mode 0440 and no `fsGroup`, so only root can
//! read it. Dovecot's auth process, which opens the passwd-file, runs as Dovecot's internal user
//! ([`DOVECOT_INTERNAL_USER`]) after dropping root, and would fail every login with `Permission denied`
//! (`temp_fail`). The agent runs as root: it copies the Secret's file to a private file in its own
//! configuration directory, owned by that user with mode 0400, and copies again whenever the Secret
//! changes. Dovecot re-reads a passwd-file whose modification time changed, so no reload is needed.
//!
//! Why not `fsGroup` or a wider `defaultMode`: the `dovecot` group's number is whatever Debian's package
//! allocated when the image was built, so the pod spec cannot name it reliably; `fsGroup` would also
//! re-own every file of the mail volume on each mount; and a world-readable mode would expose the
//! password hashes to every mail process (Postfix's daemons, the login processes, the mail user).

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use anyhow::{Context, Result};

use crate::mailconfig::dovecot::DOVECOT_INTERNAL_USER;

/// Numeric uid and gid of `user` from `passwd` (the text of /etc/passwd).
pub fn lookup_user(passwd: &str, user: &str) -> Option<(u32, u32)> {
    passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 4 || f[0] != user {
            return None;
        }
        Some((f[2].parse().ok()?, f[3].parse().ok()?))
    })
}

/// The owner of the private copy: Dovecot's internal user from /etc/passwd.
pub fn dovecot_owner() -> Result<(u32, u32)> {
    let passwd = fs::read_to_string("/etc/passwd").context("reading /etc/passwd")?;
    lookup_user(&passwd, DOVECOT_INTERNAL_USER).with_context(|| {
        format!("no user `{DOVECOT_INTERNAL_USER}` in /etc/passwd (is Dovecot installed?)")
    })
}

/// Reads the mounted users file; `None` when no Secret is mounted (yet).
pub fn read_source(path: &Path) -> Result<Option<Vec<u8>>> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading the users file {}", path.display())),
    }
}

/// Makes `private` hold `content`, owned by `owner` with mode 0400, replacing it atomically (a new inode,
/// so a reader never sees half a file). True when it was written.
pub fn install(private: &Path, content: &[u8], owner: (u32, u32)) -> Result<bool> {
    if let (Ok(meta), Ok(current)) = (fs::metadata(private), fs::read(private)) {
        if current == content && (meta.uid(), meta.gid()) == owner && meta.mode() & 0o7777 == 0o400
        {
            return Ok(false);
        }
    }
    let tmp = private.with_extension("mailpod-new");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o400)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(content)
        .with_context(|| format!("writing {}", tmp.display()))?;
    drop(f);
    std::os::unix::fs::chown(&tmp, Some(owner.0), Some(owner.1)).with_context(|| {
        format!(
            "giving {} to uid {} gid {}",
            tmp.display(),
            owner.0,
            owner.1
        )
    })?;
    fs::rename(&tmp, private).with_context(|| format!("replacing {}", private.display()))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_from_passwd() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\ndovecot:x:104:109:Dovecot mail server,,,:/usr/lib/dovecot:/usr/sbin/nologin\n";
        assert_eq!(lookup_user(passwd, "dovecot"), Some((104, 109)));
        assert_eq!(lookup_user(passwd, "dove"), None);
        assert_eq!(lookup_user("dovecot:x:y:1:::\n", "dovecot"), None);
    }

    #[test]
    fn private_copy_is_replaced_only_on_change() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("users.passwd");
        let me = {
            let m = fs::metadata(dir.path()).unwrap();
            (m.uid(), m.gid())
        };
        assert!(install(&p, b"a@example.com:{PLAIN}x\n", me).unwrap());
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o7777, 0o400);
        assert!(!install(&p, b"a@example.com:{PLAIN}x\n", me).unwrap());
        assert!(install(&p, b"a@example.com:{PLAIN}y\n", me).unwrap());
        assert_eq!(fs::read(&p).unwrap(), b"a@example.com:{PLAIN}y\n");
        assert_eq!(read_source(&dir.path().join("missing")).unwrap(), None);
    }
}
