//! Reads the mounted ConfigMaps and writes the role's Postfix/Dovecot files, compiling lmdb maps.
//!
//! Files are replaced atomically (write beside, then rename) and only when their content changes, so the
//! caller knows exactly which reload, if any, a change needs.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::passwd;

use crate::mailconfig::dovecot::{
    doveadm_password_conf, dovecot_conf, proxy_passdb, proxy_protocols, site_tls_conf,
    store_userdb, PROXY_PASSDB_PREFIX, STORE_USERDB,
};
use crate::mailconfig::layout::{Layout, Ports, Role};
use crate::mailconfig::postfix::{main_cf, map_sources, master_cf};
use crate::mailconfig::settings::{MailSettings, SETTINGS_KEY};
use crate::mailconfig::tables::{data_hash, AccessTables};

/// What the mounted ConfigMaps say.
#[derive(Clone, Debug)]
pub struct Inputs {
    pub settings: MailSettings,
    pub tables: AccessTables,
    /// The tables' hash as the operator computes it (`data_hash` of the ConfigMap data).
    pub tables_hash: String,
}

/// The files of a ConfigMap volume: every regular file whose name does not start with `.` (the kubelet's
/// `..data` symlink and timestamped directories start with dots).
pub fn read_configmap_dir(dir: &Path) -> Result<BTreeMap<String, String>> {
    let mut data = BTreeMap::new();
    let entries = fs::read_dir(dir)
        .with_context(|| format!("reading ConfigMap directory {}", dir.display()))?;
    for entry in entries {
        let entry =
            entry.with_context(|| format!("reading ConfigMap directory {}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        if !path.is_file() {
            continue;
        }
        let text =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        data.insert(name, text);
    }
    Ok(data)
}

/// Reads settings (`<config_dir>/settings.yaml`) and the access tables (`tables_dir`).
pub fn read_inputs(config_dir: &Path, tables_dir: &Path) -> Result<Inputs> {
    let settings_path = config_dir.join(SETTINGS_KEY);
    let text = fs::read_to_string(&settings_path)
        .with_context(|| format!("reading {}", settings_path.display()))?;
    let settings = MailSettings::from_yaml(&text)
        .with_context(|| format!("parsing {}", settings_path.display()))?;
    if settings.hostname.trim().is_empty() || settings.hostname.contains(char::is_whitespace) {
        bail!(
            "{}: field `hostname` must be a host name, got {:?}",
            settings_path.display(),
            settings.hostname
        );
    }
    if settings.max_message_bytes == 0 {
        bail!(
            "{}: field `maxMessageBytes` must be positive",
            settings_path.display()
        );
    }
    let data = read_configmap_dir(tables_dir)?;
    let tables = AccessTables::from_data(&data)
        .with_context(|| format!("parsing tables in {}", tables_dir.display()))?;
    Ok(Inputs {
        settings,
        tables,
        tables_hash: data_hash(&data),
    })
}

/// Which rendered files changed in one [`apply`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// main.cf, master.cf or the certificate: needs `postfix reload` when Postfix runs.
    pub postfix_config: bool,
    /// lmdb maps recompiled (Postfix picks them up itself).
    pub postfix_maps: Vec<String>,
    /// dovecot.conf, the proxy passdb or the certificate: needs `doveadm reload` when Dovecot runs.
    pub dovecot: bool,
    /// The private copy of the users file (Dovecot re-reads it by itself).
    pub users: bool,
    /// Store: a mailbox of the userdb has another home (its LUN took the address back) or none (it left the
    /// tables): until Dovecot has read the new userdb, deliveries wait (lmtp_gate::Gate::hold) and Dovecot
    /// is reloaded, so no message lands in the home the address had before.
    pub homes_moved: bool,
}

impl Changes {
    pub fn any(&self) -> bool {
        self.postfix_config || !self.postfix_maps.is_empty() || self.dovecot || self.users
    }
}

/// File (beside main.cf, and beside dovecot.conf on the proxies) holding the digest of the certificate
/// and key the daemon presents: a renewal changes it, and a changed file asks for the daemon's reload.
pub const TLS_DIGEST: &str = "tls.digest";

/// Whether `role` presents the mounted certificate (stores sit behind the proxies and never do; the
/// submission pod's Dovecot only authenticates).
fn presents_certificate(role: Role, settings: &MailSettings) -> bool {
    settings.tls && role != Role::Store
}

/// The mounted certificate and key (a kubernetes.io/tls Secret), read through the kubelet's `..data`
/// symlinks, keyed `tls/<file>`; files not there are left out.
pub fn tls_files(layout: &Layout) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for key in ["tls.crt", "tls.key"] {
        let path = layout.tls_dir.join(key);
        match fs::read(&path) {
            Ok(b) => {
                out.insert(
                    format!("tls/{key}"),
                    String::from_utf8_lossy(&b).into_owned(),
                );
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }
    Ok(out)
}

/// The mounted site replication certificate, key and CA (`spec.backend.siteReplication.tls`), keyed
/// `site-tls/<file>`; empty without `--site-tls-dir`, files not there are left out.
pub fn site_tls_files(layout: &Layout) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let Some(dir) = &layout.site_tls_dir else {
        return Ok(out);
    };
    for key in ["tls.crt", "tls.key", "ca.crt"] {
        let path = dir.join(key);
        match fs::read(&path) {
            Ok(b) => {
                out.insert(
                    format!("site-tls/{key}"),
                    String::from_utf8_lossy(&b).into_owned(),
                );
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }
    Ok(out)
}

/// site-tls.conf of a store: the TLS listener once the certificate and key are both mounted (Dovecot
/// refuses to start on an `ssl_cert` it cannot read), with their digest so a renewal reloads Dovecot.
fn store_site_tls_conf(layout: &Layout, ports: &Ports) -> Result<String> {
    let files = site_tls_files(layout)?;
    let ready = ["site-tls/tls.crt", "site-tls/tls.key"]
        .iter()
        .all(|k| files.contains_key(*k));
    if layout.site_tls_dir.is_some() && !ready {
        tracing::warn!(
            "the site replication certificate (tls.crt, tls.key) is not mounted yet: no TLS listener \
             for the other site"
        );
    }
    let dir = layout.site_tls_dir.as_deref().filter(|_| ready);
    Ok(site_tls_conf(dir, ports.doveadm_tls, &data_hash(&files)))
}

/// Writes every file of `role` for `inputs`, compiling changed maps with `postmap`.
pub fn apply(role: Role, inputs: &Inputs, layout: &Layout, ports: &Ports) -> Result<Changes> {
    let mut changes = Changes::default();
    // Postfix and Dovecot read the certificate when they (re)load their configuration only.
    let tls_digest = if presents_certificate(role, &inputs.settings) {
        format!("{}\n", data_hash(&tls_files(layout)?))
    } else {
        String::new()
    };
    if role.runs_postfix() {
        let maps_dir = layout.postfix_maps();
        fs::create_dir_all(&maps_dir)
            .with_context(|| format!("creating {}", maps_dir.display()))?;
        changes.postfix_config |= write_if_changed(
            &layout.postfix_config.join("main.cf"),
            &main_cf(role, &inputs.settings, layout, ports),
        )?;
        changes.postfix_config |= write_if_changed(
            &layout.postfix_config.join("master.cf"),
            &master_cf(role, ports, inputs.settings.tls),
        )?;
        changes.postfix_config |=
            write_if_changed(&layout.postfix_config.join(TLS_DIGEST), &tls_digest)?;
        for (name, text) in map_sources(&inputs.tables) {
            let source = maps_dir.join(name);
            let db = maps_dir.join(format!("{name}.lmdb"));
            let current = fs::read_to_string(&source).ok();
            if current.as_deref() == Some(text.as_str()) && db.exists() {
                continue;
            }
            compile_map(&layout.postfix_config, &maps_dir, name, &text)?;
            changes.postfix_maps.push(name.to_string());
        }
    }
    if role.runs_dovecot() {
        fs::create_dir_all(&layout.dovecot_config)
            .with_context(|| format!("creating {}", layout.dovecot_config.display()))?;
        let users = if matches!(role, Role::Store | Role::Submission) {
            changes.users = install_users(layout)?;
            layout.private_users_file()
        } else {
            layout.users_file.clone()
        };
        changes.dovecot |= write_if_changed(
            &layout.dovecot_conf(),
            &dovecot_conf(role, &inputs.settings, layout, ports, &users),
        )?;
        if matches!(role, Role::Imap | Role::Pop3) {
            changes.dovecot |=
                write_if_changed(&layout.dovecot_config.join(TLS_DIGEST), &tls_digest)?;
        }
        for protocol in proxy_protocols(role) {
            changes.dovecot |= write_if_changed(
                &layout
                    .dovecot_config
                    .join(format!("{PROXY_PASSDB_PREFIX}{protocol}")),
                &proxy_passdb(protocol, &inputs.tables),
            )?;
        }
        if role == Role::Store {
            // Re-read by Dovecot when it changes, like the proxy passdb: no reload.
            let userdb = layout.dovecot_config.join(STORE_USERDB);
            let text = store_userdb(&inputs.tables, &layout.mail_root);
            changes.homes_moved =
                homes_moved(&fs::read_to_string(&userdb).unwrap_or_default(), &text);
            changes.users |= write_passwd_file_if_changed(&userdb, &text)?;
            changes.dovecot |= write_if_changed(
                &layout.site_tls_conf(),
                &store_site_tls_conf(layout, ports)?,
            )?;
            let password = read_doveadm_password(&layout.doveadm_password_file)?;
            changes.dovecot |= write_private_if_changed(
                &layout.doveadm_conf(),
                &doveadm_password_conf(password.as_deref()),
            )?;
        }
    }
    Ok(changes)
}

/// Whether a mailbox of the `old` userdb text has another home in `new` (the sixth passwd-file field;
/// empty: the default home), or is not in it.
fn homes_moved(old: &str, new: &str) -> bool {
    let homes = |text: &str| -> BTreeMap<String, String> {
        text.lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                Some((f.first()?.to_string(), f.get(5)?.to_string()))
            })
            .collect()
    };
    let after = homes(new);
    homes(old).iter().any(|(m, h)| after.get(m) != Some(h))
}

/// The replicas' doveadm password: `None` until the replication Secret is mounted.
fn read_doveadm_password(path: &Path) -> Result<Option<String>> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let password = text.trim_end_matches(['\r', '\n']);
    if password.is_empty() || password.contains(['\r', '\n']) {
        bail!(
            "{}: the doveadm password must be one non-empty line",
            path.display()
        );
    }
    Ok(Some(password.to_string()))
}

/// [`write_if_changed`] for a file holding a secret: readable by root (Dovecot's master and doveadm) only.
fn write_private_if_changed(path: &Path, text: &str) -> Result<bool> {
    use std::os::unix::fs::OpenOptionsExt;
    if fs::read_to_string(path).ok().as_deref() == Some(text) {
        return Ok(false);
    }
    let tmp = path.with_extension("mailpod-new");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    io::Write::write_all(&mut f, text.as_bytes())
        .with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    Ok(true)
}

/// Copies the mounted users Secret to the private file Dovecot's auth process reads (see [`passwd`]); with
/// no Secret mounted, an empty one, so that Dovecot starts, delivers mail, and refuses every login until the
/// Secret appears. A store replica that is not its LUN's active gets an empty one too (agent::role).
/// True when the private copy changed.
pub fn install_users(layout: &Layout) -> Result<bool> {
    if super::role::logins_refused(layout) {
        return passwd::install(&layout.private_users_file(), b"", passwd::dovecot_owner()?);
    }
    let source = passwd::read_source(&layout.users_file)?;
    if source.is_none() {
        tracing::warn!(
            path = %layout.users_file.display(),
            "no users file mounted: every login and SMTP AUTH will be refused"
        );
    }
    passwd::install(
        &layout.private_users_file(),
        source.as_deref().unwrap_or_default(),
        passwd::dovecot_owner()?,
    )
}

/// `postmap` a map into `<name>.lmdb` beside its source. The database is built under a temporary name and
/// renamed over the old one, so a Postfix process never opens a half-written map.
fn compile_map(config_dir: &Path, maps_dir: &Path, name: &str, text: &str) -> Result<()> {
    let tmp_source = maps_dir.join(format!(".{name}.new"));
    fs::write(&tmp_source, text).with_context(|| format!("writing {}", tmp_source.display()))?;
    let out = Command::new("postmap")
        .arg("-c")
        .arg(config_dir)
        .arg(format!("lmdb:{}", tmp_source.display()))
        .output()
        .context("running postmap (is Postfix installed?)")?;
    if !out.status.success() {
        bail!(
            "postmap of map `{name}` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let tmp_db = maps_dir.join(format!(".{name}.new.lmdb"));
    fs::rename(&tmp_db, maps_dir.join(format!("{name}.lmdb")))
        .with_context(|| format!("installing map `{name}`"))?;
    fs::rename(&tmp_source, maps_dir.join(name))
        .with_context(|| format!("installing map source `{name}`"))?;
    Ok(())
}

/// Replaces `path` with `text` when it differs; true when it was written.
pub fn write_if_changed(path: &Path, text: &str) -> Result<bool> {
    match fs::read_to_string(path) {
        Ok(current) if current == text => return Ok(false),
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    let tmp = path.with_extension("mailpod-new");
    fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    Ok(true)
}

/// [`write_if_changed`] for a passwd-file Dovecot re-reads by itself. Dovecot notices a change by the
/// file's modification time in whole seconds and its size, so a second write within the same second and of
/// the same size (a home `.incarnation-1` becoming `.incarnation-2`) would go unseen: the new file's time is
/// put at least a second after the old one's.
pub fn write_passwd_file_if_changed(path: &Path, text: &str) -> Result<bool> {
    let before = fs::metadata(path).and_then(|m| m.modified()).ok();
    if !write_if_changed(path, text)? {
        return Ok(false);
    }
    let Some(before) = before else {
        return Ok(true);
    };
    let secs = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    };
    let now = fs::metadata(path)
        .and_then(|m| m.modified())
        .with_context(|| format!("reading the time of {}", path.display()))?;
    if secs(now) <= secs(before) {
        let later = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs(before) + 1);
        fs::File::options()
            .write(true)
            .open(path)
            .and_then(|f| f.set_modified(later))
            .with_context(|| format!("setting the time of {}", path.display()))?;
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rewritten_passwd_file_always_looks_changed_to_dovecot() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("userdb");
        let stamp = |p: &Path| {
            let m = fs::metadata(p).unwrap();
            (
                m.modified()
                    .unwrap()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_secs(),
                m.len(),
            )
        };
        assert!(write_passwd_file_if_changed(&p, "b@x:::::/m/.incarnation-1/x/b::\n").unwrap());
        let mut seen = vec![stamp(&p)];
        for n in [2, 3, 4] {
            let text = format!("b@x:::::/m/.incarnation-{n}/x/b::\n");
            assert!(write_passwd_file_if_changed(&p, &text).unwrap());
            assert!(!write_passwd_file_if_changed(&p, &text).unwrap());
            let s = stamp(&p);
            assert!(!seen.contains(&s), "same time and size as before: {s:?}");
            seen.push(s);
        }
    }

    #[test]
    fn a_home_moves_when_it_changes_or_its_mailbox_leaves() {
        let old = "a@x:::::::\nb@x:::::/m/.incarnation-1/x/b::\n";
        assert!(!homes_moved(old, old));
        assert!(
            !homes_moved(old, &format!("{old}c@x:::::::\n")),
            "one added"
        );
        assert!(
            !homes_moved(
                old,
                "a@x:::::::userdb_quota_rule=*:storage=1B\nb@x:::::/m/.incarnation-1/x/b::\n"
            ),
            "a quota changed"
        );
        assert!(homes_moved(
            old,
            "a@x:::::::\nb@x:::::/m/.incarnation-2/x/b::\n"
        ));
        assert!(homes_moved(
            old,
            "a@x:::::/m/.incarnation-1/x/a::\nb@x:::::/m/.incarnation-1/x/b::\n"
        ));
        assert!(
            homes_moved(old, "b@x:::::/m/.incarnation-1/x/b::\n"),
            "one left"
        );
        assert!(!homes_moved("", old), "the first render");
    }

    #[test]
    fn configmap_dir_skips_kubelet_entries_and_names_bad_fields() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("..2024_01_01")).unwrap();
        fs::write(dir.path().join("..data"), "x").unwrap();
        fs::write(dir.path().join("domains"), "example.com\n").unwrap();
        let data = read_configmap_dir(dir.path()).unwrap();
        assert_eq!(data.keys().collect::<Vec<_>>(), ["domains"]);

        fs::write(dir.path().join("luns"), "0 host 24\n").unwrap();
        let cfg = tempfile::tempdir().unwrap();
        fs::write(
            cfg.path().join(SETTINGS_KEY),
            "mailpod: corp\nhostname: mail.example.com\nmaxMessageBytes: 10\nconnectionRateLimit: 0\ndnsblThreshold: 1\ntls: false\n",
        )
        .unwrap();
        let e = format!("{:#}", read_inputs(cfg.path(), dir.path()).unwrap_err());
        assert!(e.contains("key `luns` line 1"), "{e}");

        fs::write(cfg.path().join(SETTINGS_KEY), "mailpod: corp\n").unwrap();
        let e = format!("{:#}", read_inputs(cfg.path(), dir.path()).unwrap_err());
        assert!(e.contains("settings.yaml") && e.contains("hostname"), "{e}");
    }

    #[test]
    fn write_if_changed_reports_changes_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("main.cf");
        assert!(write_if_changed(&p, "a = 1\n").unwrap());
        assert!(!write_if_changed(&p, "a = 1\n").unwrap());
        assert!(write_if_changed(&p, "a = 2\n").unwrap());
        assert_eq!(fs::read_to_string(&p).unwrap(), "a = 2\n");
    }
}
