//! The mail image ships what the data-plane tests exercise: the packages of mail-image/packages.txt, on the
//! Debian release of the test machines, with the directories the agent expects by default.

use std::path::Path;

use mailpod_operator::mailconfig::layout::Layout;

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn packages() -> Vec<String> {
    read("mail-image/packages.txt")
        .lines()
        .map(|l| l.split('#').next().unwrap().trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

/// The Dockerfile's instructions with continuation lines joined.
fn instructions() -> Vec<String> {
    read("mail-image/Dockerfile")
        .replace("\\\n", " ")
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .map(str::to_string)
        .collect()
}

/// The `mail` stage (the default target).
fn mail_stage() -> Vec<String> {
    let all = instructions();
    let start = all
        .iter()
        .position(|l| l.starts_with("FROM ") && l.ends_with(" AS mail"))
        .expect("a `mail` stage");
    assert_eq!(
        all[start + 1..]
            .iter()
            .filter(|l| l.starts_with("FROM "))
            .count(),
        0,
        "the mail stage must be the last (default) stage"
    );
    all[start..].to_vec()
}

#[test]
fn mail_stage_installs_exactly_the_package_list() {
    let pkgs = packages();
    for wanted in [
        "postfix",
        "postfix-lmdb",
        "dovecot-core",
        "dovecot-imapd",
        "dovecot-pop3d",
        "dovecot-lmtpd",
    ] {
        assert!(
            pkgs.iter().any(|p| p == wanted),
            "packages.txt must list {wanted}"
        );
    }
    let stage = mail_stage();
    assert!(stage
        .iter()
        .any(|l| l == "COPY mail-image/packages.txt /tmp/packages.txt"));
    let installs: Vec<&String> = stage
        .iter()
        .filter(|l| l.contains("apt-get install"))
        .collect();
    assert_eq!(
        installs.len(),
        1,
        "one install step in the mail stage: {installs:?}"
    );
    let install = installs[0];
    assert!(
        install.contains("/tmp/packages.txt") && install.contains("xargs apt-get install"),
        "{install}"
    );
    // No package is named on the install line itself: the list is the only source.
    for p in &pkgs {
        assert!(
            !install.split_whitespace().any(|w| w == p),
            "{p} named in the Dockerfile instead of packages.txt"
        );
    }
}

#[test]
fn image_uses_the_test_machines_debian_release() {
    let os = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    let Some(codename) = os.lines().find_map(|l| l.strip_prefix("VERSION_CODENAME=")) else {
        eprintln!("SKIPPED image_uses_the_test_machines_debian_release: no VERSION_CODENAME in /etc/os-release");
        return;
    };
    let codename = codename.trim_matches('"');
    for from in instructions().iter().filter(|l| l.starts_with("FROM ")) {
        let image = from.split_whitespace().nth(1).unwrap();
        assert!(
            image.ends_with(&format!("-{codename}"))
                || image.ends_with(&format!(":{codename}-slim")),
            "{from}: every stage must be built on Debian {codename}, like the test machines"
        );
    }
}

#[test]
fn agent_default_paths_exist_in_the_image() {
    let stage = mail_stage().join("\n");
    let l = Layout::default();
    let dirs = [
        l.postfix_config.clone(),
        l.postfix_queue.clone(),
        l.postfix_data.clone(),
        l.dovecot_config.clone(),
        l.dovecot_base.clone(),
        l.dovecot_state.clone(),
        l.mail_root.clone(),
        l.log_dir.clone(),
        l.tls_dir.clone(),
        l.users_file.parent().unwrap().to_path_buf(),
        "/etc/mailpod/settings".into(),
        "/etc/mailpod/tables".into(),
    ];
    let mkdir = stage
        .lines()
        .find(|line| line.contains("mkdir -p"))
        .expect("a mkdir step");
    for d in dirs {
        let d = d.display().to_string();
        assert!(
            mkdir.split_whitespace().any(|w| w == d),
            "the image must create {d}"
        );
    }
    assert!(
        stage.contains(&format!("--uid {} ", l.mail_uid)),
        "vmail uid must be the agent's mail uid"
    );
    assert!(stage.contains(&format!("--gid {} ", l.mail_gid)));
    assert!(stage.contains("ENTRYPOINT [\"/usr/local/bin/mailpod-operator\"]"));
    let all = instructions().join("\n");
    assert!(
        all.contains("--no-default-features"),
        "the test-only `testkit` feature must not ship"
    );
}
