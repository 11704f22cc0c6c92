//! The mail image ships what the data-plane tests exercise: the packages of mail-image/packages.txt, on the
//! Debian release of the test machines, with the directories the agent expects by default. The images that
//! e2e/build-images.sh makes without Docker carry out the same Dockerfile stages (checked on its `--plan`).

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
        "dovecot-sieve",
        "dovecot-managesieved",
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
    let mkdir = stage
        .lines()
        .find(|line| line.contains("mkdir -p"))
        .expect("a mkdir step");
    for d in agent_dirs() {
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

// ---- e2e/build-images.sh: the images built here without Docker follow the Dockerfile ----

/// What e2e/build-images.sh would build (`--plan`: it reads the Dockerfile, builds nothing, needs no root).
fn build_plan() -> serde_json::Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("e2e/build-images.sh");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .arg("--plan")
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", script.display()));
    assert!(
        out.status.success(),
        "e2e/build-images.sh --plan failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the plan is JSON")
}

fn planned<'a>(plan: &'a serde_json::Value, what: &str) -> &'a serde_json::Value {
    plan["images"]
        .as_array()
        .expect("images")
        .iter()
        .find(|i| i["what"] == what)
        .unwrap_or_else(|| panic!("the plan builds no {what} image"))
}

/// The instructions of one stage, FROM included.
fn stage(name: &str) -> Vec<String> {
    let all: Vec<String> = instructions()
        .into_iter()
        .filter(|l| !l.trim().is_empty())
        .collect();
    let start = all
        .iter()
        .position(|l| l.starts_with("FROM ") && l.ends_with(&format!(" AS {name}")))
        .unwrap_or_else(|| panic!("a `{name}` stage"));
    let end = all[start + 1..]
        .iter()
        .position(|l| l.starts_with("FROM "))
        .map_or(all.len(), |n| start + 1 + n);
    all[start..end].to_vec()
}

fn words(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn json_words(v: &serde_json::Value) -> String {
    words(v.as_str().unwrap_or_else(|| panic!("a string: {v}")))
}

/// The directories the agent uses by default (mailconfig::layout::Layout::default and its flags).
fn agent_dirs() -> Vec<String> {
    let l = Layout::default();
    [
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
    ]
    .iter()
    .map(|d| d.display().to_string())
    .collect()
}

/// Each stage the script builds carries out the stage's own instructions, in order, from the same base,
/// and its image config is the stage's: a Dockerfile change the script would not follow (an instruction
/// it skips or reads differently, a hard-coded step) fails here.
#[test]
fn build_script_carries_out_each_dockerfile_stage() {
    let plan = build_plan();
    for (what, name, image) in [
        ("mail", "mail", "mailpod:e2e"),
        ("operator", "operator", "mailpod-operator:e2e"),
    ] {
        let p = planned(&plan, what);
        assert_eq!(p["name"], image);
        assert_eq!(p["stage"], name);
        let st = stage(name);
        let base = st[0].split_whitespace().nth(1).unwrap();
        let suite = base
            .strip_prefix("debian:")
            .and_then(|t| t.strip_suffix("-slim"))
            .unwrap_or_else(|| panic!("{}: the script makes only debian:<suite>-slim", st[0]));
        assert_eq!(
            p["base"]["debootstrap"],
            serde_json::json!(["--variant=minbase", suite]),
            "{what}: {base} is made with debootstrap --variant=minbase {suite}"
        );

        // Filesystem steps, in the Dockerfile's order.
        let mut want = Vec::new();
        let mut config = serde_json::Map::new();
        for ins in &st[1..] {
            let (kw, rest) = ins.split_once(' ').unwrap_or((ins, ""));
            let rest = rest.trim();
            match kw {
                "RUN" => want.push(format!("RUN {}", words(rest))),
                "COPY" => {
                    let w: Vec<&str> = rest.split_whitespace().collect();
                    if w[0] == "--from=builder" {
                        assert_eq!(w[1], "/usr/local/bin/mailpod-operator", "{ins}");
                        want.push(format!("COPY_BINARY {}", w[2]));
                    } else {
                        want.push(format!("COPY {} {}", w[0], w[1]));
                    }
                }
                "WORKDIR" => want.push(format!("MKDIR {rest}")),
                "ENTRYPOINT" | "CMD" => {
                    let v: serde_json::Value = serde_json::from_str(rest)
                        .unwrap_or_else(|e| panic!("{ins}: exec form expected: {e}"));
                    config.insert(if kw == "CMD" { "Cmd" } else { "Entrypoint" }.into(), v);
                }
                "EXPOSE" => {
                    let ports = config
                        .entry("ExposedPorts")
                        .or_insert_with(|| serde_json::json!({}));
                    for port in rest.split_whitespace() {
                        let key = if port.contains('/') {
                            port.to_string()
                        } else {
                            format!("{port}/tcp")
                        };
                        ports[key] = serde_json::json!({});
                    }
                }
                "STOPSIGNAL" => {
                    config.insert("StopSignal".into(), rest.into());
                }
                "USER" => {
                    config.insert("User".into(), rest.into());
                }
                other => {
                    panic!("{what}: {other} is not followed by this test; teach it and the script")
                }
            }
        }
        let got: Vec<String> = p["steps"]
            .as_array()
            .expect("steps")
            .iter()
            .map(|s| match s["op"].as_str().unwrap() {
                "RUN" => {
                    let argv = s["argv"].as_array().unwrap();
                    assert_eq!(
                        argv[..2],
                        [serde_json::json!("/bin/sh"), serde_json::json!("-c")]
                    );
                    format!("RUN {}", json_words(&argv[2]))
                }
                "COPY" => format!("COPY {} {}", json_words(&s["src"]), json_words(&s["dest"])),
                "COPY_BINARY" => format!("COPY_BINARY {}", json_words(&s["dest"])),
                "MKDIR" => format!("MKDIR {}", json_words(&s["path"])),
                op => panic!("unknown step {op}"),
            })
            .collect();
        pretty_assertions::assert_eq!(got, want, "{what}: the script's steps are the stage's");
        for key in ["Entrypoint", "Cmd", "ExposedPorts", "StopSignal", "User"] {
            assert_eq!(
                p["config"].get(key),
                config.get(key),
                "{what}: image config {key} must be the Dockerfile's"
            );
        }
    }
}

/// What the mail software needs of the image built here: the one package list, vmail with the agent's
/// uid, the agent's directories, the binary where the entrypoint runs it; owners kept by the packer.
#[test]
fn built_images_have_the_package_list_users_directories_and_entrypoints() {
    let plan = build_plan();
    let mail = planned(&plan, "mail");
    let steps = mail["steps"].as_array().unwrap();
    assert!(
        steps.iter().any(|s| s["op"] == "COPY"
            && s["src"] == "mail-image/packages.txt"
            && s["dest"] == "/tmp/packages.txt"),
        "the mail image installs mail-image/packages.txt"
    );
    let runs: Vec<String> = steps
        .iter()
        .filter(|s| s["op"] == "RUN")
        .map(|s| json_words(&s["argv"][2]))
        .collect();
    let installs: Vec<&String> = runs
        .iter()
        .filter(|r| r.contains("apt-get install"))
        .collect();
    assert_eq!(installs.len(), 1, "{installs:?}");
    assert!(
        installs[0].contains("/tmp/packages.txt") && installs[0].contains("xargs apt-get install")
    );
    let l = Layout::default();
    let all = runs.join("\n");
    assert!(all.contains(&format!("--uid {} ", l.mail_uid)), "vmail uid");
    assert!(all.contains(&format!("--gid {} ", l.mail_gid)), "vmail gid");
    let mkdir = runs
        .iter()
        .find(|r| r.contains("mkdir -p"))
        .expect("a mkdir step");
    for d in agent_dirs() {
        assert!(
            mkdir.split_whitespace().any(|w| w == d),
            "the built image must create {d}"
        );
    }
    for (what, cmd, user) in [
        ("mail", "agent", None),
        ("operator", "run", Some("65532:65532")),
    ] {
        let p = planned(&plan, what);
        let entry = &p["config"]["Entrypoint"];
        assert_eq!(
            *entry,
            serde_json::json!(["/usr/local/bin/mailpod-operator"])
        );
        assert!(
            p["steps"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s["op"] == "COPY_BINARY" && s["dest"] == entry[0]),
            "{what}: the binary is copied where the entrypoint runs it"
        );
        assert_eq!(p["config"]["Cmd"], serde_json::json!([cmd]));
        assert_eq!(p["config"].get("User").and_then(|u| u.as_str()), user);
    }
    let ports: Vec<&str> = mail["config"]["ExposedPorts"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    for p in ["25/tcp", "587/tcp", "143/tcp", "110/tcp", "24/tcp"] {
        assert!(ports.contains(&p), "mail image exposes {p}: {ports:?}");
    }
    // Postfix, Dovecot and vmail keep their uids only if the layer is packed with numeric owners.
    let script = read("e2e/build-images.sh");
    assert!(
        script.contains("\"--numeric-owner\""),
        "layers packed with --numeric-owner"
    );
}

/// The sandbox image is built here (no pull) under the name the e2e cluster's containerd is given.
#[test]
fn pause_image_is_the_sandbox_image_of_the_e2e_cluster() {
    let plan = build_plan();
    let pause = planned(&plan, "pause");
    assert!(Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(pause["source"].as_str().unwrap())
        .is_file());
    let mut names = vec![pause["name"].as_str().unwrap().to_string()];
    names.extend(
        pause["also"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|n| n.as_str().unwrap().to_string()),
    );
    let up = Path::new(env!("CARGO_MANIFEST_DIR")).join("e2e/cluster-up.sh");
    let Ok(text) = std::fs::read_to_string(&up) else {
        eprintln!("SKIPPED the cluster-up.sh part: no e2e/cluster-up.sh");
        return;
    };
    for line in text
        .lines()
        .filter(|l| l.trim_start().starts_with("sandbox_image"))
    {
        let image = line.split('"').nth(1).expect("sandbox_image = \"...\"");
        assert!(
            names.iter().any(|n| n == image),
            "e2e/cluster-up.sh sets sandbox_image {image}; e2e/build-images.sh builds {names:?}"
        );
    }
}
