//! The restore's local Dovecot: no listeners, only the auth process doveadm needs for user lookups,
//! reading the snapshot clone.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::doveadm::Doveadm;
use super::import::ImportOptions;
use crate::mailconfig::dovecot::doveadm_password_conf;

/// A Dovecot with no listeners, only the auth process doveadm needs for user lookups, over the snapshot.
/// Indexes stay in memory: the snapshot is mounted read-only. Stopped on drop.
pub struct LocalDovecot {
    pub doveadm: Doveadm,
    base_dir: PathBuf,
}

impl LocalDovecot {
    pub fn start(opts: &ImportOptions, password: &str) -> Result<Self> {
        let work = &opts.work_dir;
        let base_dir = work.join("run");
        std::fs::create_dir_all(work).with_context(|| format!("creating {}", work.display()))?;
        let secret = work.join("doveadm.conf");
        write_private(&secret, &doveadm_password_conf(Some(password)))?;
        // The homes of mailboxes their LUN took back after a removal, as the stores' userdb has them.
        let userdb = work.join("userdb");
        let tables = crate::mailconfig::tables::AccessTables {
            mailboxes: opts.incarnations.keys().map(|m| (m.clone(), 0)).collect(),
            incarnations: opts.incarnations.clone(),
            ..Default::default()
        };
        std::fs::write(
            &userdb,
            crate::mailconfig::dovecot::store_userdb(&tables, &opts.mail_root),
        )
        .with_context(|| format!("writing {}", userdb.display()))?;
        let config = work.join("dovecot.conf");
        std::fs::write(&config, local_conf(opts, &base_dir, &secret))
            .with_context(|| format!("writing {}", config.display()))?;
        let status = Command::new("dovecot")
            .arg("-c")
            .arg(&config)
            .status()
            .context("starting dovecot (is Dovecot installed?)")?;
        if !status.success() {
            bail!(
                "dovecot -c {} exited with {status}; see {}",
                config.display(),
                work.join("dovecot.log").display()
            );
        }
        let started = Self {
            doveadm: Doveadm::new(config),
            base_dir,
        };
        let socket = started.base_dir.join("auth-userdb");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if Instant::now() > deadline {
                bail!("the local Dovecot did not open {}", socket.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(started)
    }
}

impl Drop for LocalDovecot {
    fn drop(&mut self) {
        let _ = Command::new("doveadm")
            .arg("-c")
            .arg(&self.doveadm.config)
            .arg("stop")
            .status();
        // `doveadm stop` returns before the master has exited; wait for its pid file to go.
        let pid = self.base_dir.join("master.pid");
        let deadline = Instant::now() + Duration::from_secs(5);
        while pid.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// dovecot.conf of the restore's local Dovecot.
pub fn local_conf(opts: &ImportOptions, base_dir: &Path, secret: &Path) -> String {
    let home = opts.mail_root.join("%d").join("%n");
    let (uid, gid) = (opts.mail_uid, opts.mail_gid);
    format!(
        "# Rendered by mailpod-operator restore-import: reads a snapshot, serves no one.\n\
         base_dir = {base}\n\
         state_dir = {work}/state\n\
         log_path = {work}/dovecot.log\n\
         protocols = none\n\
         default_internal_user = dovecot\n\
         default_login_user = dovenull\n\
         ssl = no\n\
         mail_uid = {uid}\nmail_gid = {gid}\nfirst_valid_uid = {uid}\nfirst_valid_gid = {gid}\n\
         # No login service listens: the passdb only satisfies the auth process.\n\
         passdb {{\n  driver = static\n  args = nopassword=y\n}}\n\
         userdb {{\n  driver = passwd-file\n  args = {work}/userdb\n  default_fields = uid={uid} gid={gid} home={home}\n}}\n\
         userdb {{\n  driver = static\n  args = uid={uid} gid={gid} home={home} allow_all_users=yes\n}}\n\
         mail_location = maildir:~/Maildir:INDEX=MEMORY\n\
         !include {secret}\n",
        base = base_dir.display(),
        work = opts.work_dir.display(),
        home = home.display(),
        secret = secret.display(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::restore::import::Scope;

    #[test]
    fn local_conf_reads_the_snapshot_with_memory_indexes() {
        let opts = ImportOptions {
            mail_root: "/var/mail/store".into(),
            work_dir: "/w".into(),
            target: "corp-lun-0:12345".into(),
            password_file: "/p".into(),
            scope: Scope::All,
            lun_mailboxes: None,
            incarnations: Default::default(),
            mail_uid: 5000,
            mail_gid: 5000,
        };
        let conf = local_conf(&opts, Path::new("/w/run"), Path::new("/w/doveadm.conf"));
        assert!(conf.contains("protocols = none\n"));
        assert!(conf.contains("home=/var/mail/store/%d/%n allow_all_users=yes"));
        assert!(conf.contains("mail_location = maildir:~/Maildir:INDEX=MEMORY\n"));
        assert!(conf.ends_with("!include /w/doveadm.conf\n"));
    }
}
