//! The mailboxes of a MailPod: inline ones plus those listed in ConfigMaps and Secrets.

use std::collections::{BTreeMap, BTreeSet};

use crate::crd::{split_address, MailPodSpec, MailboxSource, ValidationErrors};

/// The text of one mailbox source, as fetched from the cluster (or from `render`'s input files).
/// `None` when the object or key does not exist.
pub trait SourceLookup {
    fn text(&self, source: &MailboxSource) -> Option<String>;
}

impl<F: Fn(&MailboxSource) -> Option<String>> SourceLookup for F {
    fn text(&self, source: &MailboxSource) -> Option<String> {
        self(source)
    }
}

/// Describes a source for messages: `ConfigMap corp-users key users.txt`.
pub fn describe(source: &MailboxSource) -> String {
    match (&source.config_map, &source.secret) {
        (Some(r), _) => format!("ConfigMap {} key {}", r.name, r.key),
        (None, Some(r)) => format!("Secret {} key {}", r.name, r.key),
        (None, None) => "an empty source".to_string(),
    }
}

/// Every mailbox of the spec, validated: each a lower-case address in `spec.domains`, none twice.
/// Errors name the field path, and for referenced lists the object, key and line.
pub fn resolve(
    spec: &MailPodSpec,
    lookup: &impl SourceLookup,
) -> Result<BTreeSet<String>, ValidationErrors> {
    let mut errs = ValidationErrors::default();
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    let mut add = |address: &str, path: String, errs: &mut ValidationErrors| {
        spec.check_mailbox(address, &path, errs);
        if let Some(first) = seen.get(address) {
            errs.push(
                path,
                format!("duplicate mailbox `{address}` (first at {first})"),
            );
        } else {
            seen.insert(address.to_string(), path);
        }
    };
    for (i, m) in spec.mailboxes.inline.iter().enumerate() {
        add(m, format!("spec.mailboxes.inline[{i}]"), &mut errs);
    }
    for (i, src) in spec.mailboxes.from.iter().enumerate() {
        let path = format!("spec.mailboxes.from[{i}]");
        let Some(text) = lookup.text(src) else {
            errs.push(path, format!("{} not found", describe(src)));
            continue;
        };
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            // A passwd-file line: the address ends at the first `:`.
            let address = line.split(':').next().unwrap_or_default().trim();
            add(
                address,
                format!("{path} ({} line {})", describe(src), n + 1),
                &mut errs,
            );
        }
    }
    // A quota override for an address that has no mailbox would silently do nothing.
    for (i, o) in spec
        .quota
        .iter()
        .flat_map(|q| q.overrides.iter())
        .enumerate()
    {
        if !seen.contains_key(&o.mailbox) {
            errs.push(
                format!("spec.quota.overrides[{i}].mailbox"),
                format!("`{}` is not a mailbox of this MailPod", o.mailbox),
            );
        }
    }
    check_targets(spec, &|a| seen.contains_key(a), &mut errs);
    errs.into_result()?;
    Ok(seen.into_keys().collect())
}

/// Mail sent on inside a hosted domain must reach someone: an alias target, an archive copy and the
/// postmaster in one of `spec.domains` must be a mailbox (`is_mailbox`), an alias, a `postmaster@` or
/// `abuse@` (which every domain has), or covered by the domain's catch-all alias. Addresses outside are
/// forwards and are not checked.
fn check_targets(
    spec: &MailPodSpec,
    is_mailbox: &dyn Fn(&str) -> bool,
    errs: &mut ValidationErrors,
) {
    let t = &spec.access_tables;
    let aliases: BTreeSet<&str> = t.aliases.iter().map(|a| a.address.as_str()).collect();
    let problem = |address: &str| -> Option<String> {
        let (local, domain) = split_address(address)?;
        let exists = !spec.domains.iter().any(|d| d == domain)
            || is_mailbox(address)
            || aliases.contains(address)
            || aliases.contains(format!("@{domain}").as_str())
            || local == "postmaster"
            || local == "abuse";
        (!exists).then(|| {
            format!("`{address}` is in hosted domain `{domain}` but is neither a mailbox nor an alias of this MailPod")
        })
    };
    for (i, a) in t.aliases.iter().enumerate() {
        for (j, target) in a.targets.iter().enumerate() {
            if let Some(m) = problem(target) {
                errs.push(format!("spec.accessTables.aliases[{i}].targets[{j}]"), m);
            }
        }
    }
    for (i, a) in t.archive_bcc.iter().enumerate() {
        if let Some(m) = problem(&a.bcc) {
            errs.push(format!("spec.accessTables.archiveBcc[{i}].bcc"), m);
        }
    }
    // The postmaster itself must not be one of the implied aliases it stands for.
    let postmaster = spec.postmaster_address();
    if let Some((_, domain)) = split_address(&postmaster) {
        let hosted = spec.domains.iter().any(|d| d == domain);
        let declared = is_mailbox(&postmaster)
            || aliases.contains(postmaster.as_str())
            || aliases.contains(format!("@{domain}").as_str());
        if hosted && !declared {
            let message = if spec.postmaster.is_none() {
                format!(
                    "required: `{postmaster}` is neither a mailbox nor an alias: name the address \
                     (a mailbox or alias here, or outside) that receives the postmaster@ and abuse@ mail \
                     of every domain (RFC 5321, RFC 2142)"
                )
            } else {
                format!(
                    "`{postmaster}` is in hosted domain `{domain}` but is neither a mailbox nor an alias \
                     of this MailPod"
                )
            };
            errs.push("spec.postmaster", message);
        }
    }
}

/// The MailPod's own checks and its mailboxes' together, so one pass reports every problem; on success,
/// the resolved mailboxes.
pub fn validate_and_resolve(
    mailpod: &crate::crd::MailPod,
    lookup: &impl SourceLookup,
) -> Result<BTreeSet<String>, ValidationErrors> {
    match (mailpod.validate(), resolve(&mailpod.spec, lookup)) {
        (Ok(()), Ok(m)) => Ok(m),
        (a, b) => Err(ValidationErrors(
            [a.err(), b.err()]
                .into_iter()
                .flatten()
                .flat_map(|e| e.0)
                .collect(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> MailPodSpec {
        serde_yaml::from_str(
            r#"
domains: [example.com]
postmaster: alice@example.com
mailboxes:
  inline: [alice@example.com]
  from:
    - configMap: {name: users, key: list}
    - secret: {name: passwd, key: passwd}
"#,
        )
        .unwrap()
    }

    #[test]
    fn merges_sources_and_reads_passwd_lines() {
        let lookup = |s: &MailboxSource| match s {
            MailboxSource {
                config_map: Some(_),
                ..
            } => Some("# staff\nbob@example.com\n\ncarol@example.com\n".into()),
            _ => Some("dave@example.com:{SHA512-CRYPT}$6$x::::::\n".into()),
        };
        let all = resolve(&spec(), &lookup).unwrap();
        assert_eq!(
            all.into_iter().collect::<Vec<_>>(),
            [
                "alice@example.com",
                "bob@example.com",
                "carol@example.com",
                "dave@example.com"
            ]
        );
    }

    #[test]
    fn errors_name_source_and_line() {
        let lookup = |s: &MailboxSource| match s {
            MailboxSource {
                config_map: Some(_),
                ..
            } => Some("bob@example.com\nalice@example.com\neve@other.org\n".into()),
            _ => None,
        };
        let err = resolve(&spec(), &lookup).unwrap_err().to_string();
        assert!(err.contains("spec.mailboxes.from[0] (ConfigMap users key list line 2): duplicate mailbox `alice@example.com` (first at spec.mailboxes.inline[0])"), "{err}");
        assert!(
            err.contains("line 3): `eve@other.org`: domain `other.org` is not in spec.domains"),
            "{err}"
        );
        assert!(
            err.contains("spec.mailboxes.from[1]: Secret passwd key passwd not found"),
            "{err}"
        );
    }

    #[test]
    fn quota_override_must_name_a_mailbox() {
        let mut spec = spec();
        spec.mailboxes.from.clear();
        spec.quota = Some(
            serde_yaml::from_str(
                "storage: 1Gi\noverrides: [{mailbox: alice@example.com, storage: 2Gi}, {mailbox: zed@example.com, messages: 9}]",
            )
            .unwrap(),
        );
        let err = resolve(&spec, &|_: &MailboxSource| None)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "spec.quota.overrides[1].mailbox: `zed@example.com` is not a mailbox of this MailPod"
        );
    }

    #[test]
    fn targets_in_hosted_domains_must_exist_and_every_domain_has_a_postmaster() {
        let mut spec: MailPodSpec = serde_yaml::from_str(
            r#"
domains: [example.com, example.org]
mailboxes:
  inline: [alice@example.com]
accessTables:
  aliases:
    - {address: sales@example.com, targets: [alice@example.com, x@outside.test, postmaster@example.org, gone@example.com]}
    - {address: team@example.com, targets: [sales@example.com]}
  archiveBcc:
    - {pattern: "@example.com", bcc: vault@example.org}
"#,
        )
        .unwrap();
        let none = |_: &MailboxSource| None;
        let err = resolve(&spec, &none).unwrap_err().to_string();
        assert_eq!(
            err.split("; ").collect::<Vec<_>>(),
            [
                "spec.accessTables.aliases[0].targets[3]: `gone@example.com` is in hosted domain `example.com` but is neither a mailbox nor an alias of this MailPod",
                "spec.accessTables.archiveBcc[0].bcc: `vault@example.org` is in hosted domain `example.org` but is neither a mailbox nor an alias of this MailPod",
                "spec.postmaster: required: `postmaster@example.com` is neither a mailbox nor an alias: name the address (a mailbox or alias here, or outside) that receives the postmaster@ and abuse@ mail of every domain (RFC 5321, RFC 2142)",
            ],
            "{err}"
        );
        spec.access_tables.aliases[0].targets.pop();
        spec.access_tables.archive_bcc[0].bcc = "alice@example.com".into();
        spec.postmaster = Some("bob@example.com".into());
        let err = resolve(&spec, &none).unwrap_err().to_string();
        assert!(
            err.starts_with("spec.postmaster: `bob@example.com` is in hosted domain"),
            "{err}"
        );
        // An outside postmaster needs nothing here; every domain gets postmaster@ and abuse@.
        spec.postmaster = Some("noc@provider.test".into());
        let mailboxes = resolve(&spec, &none).unwrap();
        let placement = crate::placement::place(&[], &mailboxes, 10);
        let t = crate::mailconfig::tables::AccessTables::build(&spec, &placement, |i| {
            crate::mailconfig::tables::LunEndpoint::in_cluster(format!("lun-{i}"))
        });
        for a in [
            "postmaster@example.com",
            "abuse@example.com",
            "postmaster@example.org",
            "abuse@example.org",
        ] {
            assert_eq!(t.aliases[a], ["noc@provider.test"], "{a}");
        }
        // Declared ones stay as declared; the default postmaster as a mailbox keeps its own mail.
        spec.postmaster = None;
        spec.mailboxes.inline.push("postmaster@example.com".into());
        spec.access_tables.aliases.push(crate::crd::Alias {
            address: "abuse@example.org".into(),
            targets: vec!["alice@example.com".into()],
        });
        let mailboxes = resolve(&spec, &none).unwrap();
        let placement = crate::placement::place(&[], &mailboxes, 10);
        let t = crate::mailconfig::tables::AccessTables::build(&spec, &placement, |i| {
            crate::mailconfig::tables::LunEndpoint::in_cluster(format!("lun-{i}"))
        });
        assert!(!t.aliases.contains_key("postmaster@example.com"));
        assert_eq!(t.aliases["abuse@example.com"], ["postmaster@example.com"]);
        assert_eq!(
            t.aliases["postmaster@example.org"],
            ["postmaster@example.com"]
        );
        assert_eq!(t.aliases["abuse@example.org"], ["alice@example.com"]);
    }
}
