//! docs/crd-reference.md is generated from the CRD schemas (`mailpod_operator::crd::all_crds`): one table per
//! resource with every field's path, type, default, validation and description. This test fails when the
//! file is stale; regenerate with `MAILPOD_UPDATE_GOLDEN=1 cargo test --test crd_reference`.

use std::fmt::Write as _;
use std::path::PathBuf;

use mailpod_operator::crd::all_crds;
use serde_json::Value;

fn reference_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/crd-reference.md")
}

/// A table cell: one line, pipes escaped.
fn cell(s: &str) -> String {
    s.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('|', "\\|")
}

fn number(v: &Value) -> String {
    match v.as_f64() {
        Some(f) if f.fract() == 0.0 && f.abs() < 1e15 => format!("{}", f as i64),
        _ => v.to_string(),
    }
}

fn type_of(s: &Value) -> String {
    if s.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true)) {
        return "int or string".into();
    }
    if s.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true))
        && s.get("type").is_none()
    {
        return "any".into();
    }
    let base = match s["type"].as_str() {
        Some("array") => format!("[]{}", type_of(&s["items"])),
        Some("object") if s.get("additionalProperties").is_some() => {
            format!("map[string]{}", type_of(&s["additionalProperties"]))
        }
        Some(t) => t.to_string(),
        None if s.get("anyOf").is_some() || s.get("oneOf").is_some() => "one of several".into(),
        None => "any".into(),
    };
    match s["format"].as_str() {
        Some(f) => format!("{base} ({f})"),
        None => base,
    }
}

fn validation(s: &Value, required: bool) -> String {
    let mut out = vec![];
    if required {
        out.push("required".to_string());
    }
    if s.get("nullable") == Some(&Value::Bool(true)) {
        out.push("nullable".into());
    }
    if let Some(e) = s["enum"].as_array() {
        let values: Vec<String> = e
            .iter()
            .map(|v| {
                format!(
                    "`{}`",
                    v.as_str().map(String::from).unwrap_or(v.to_string())
                )
            })
            .collect();
        out.push(format!("one of {}", values.join(", ")));
    }
    for (key, label) in [
        ("minimum", "≥"),
        ("maximum", "≤"),
        ("minLength", "min length"),
        ("maxLength", "max length"),
        ("minItems", "min items"),
        ("maxItems", "max items"),
        ("minProperties", "min entries"),
        ("maxProperties", "max entries"),
    ] {
        if let Some(v) = s.get(key) {
            out.push(format!("{label} {}", number(v)));
        }
    }
    if let Some(p) = s["pattern"].as_str() {
        out.push(format!("pattern `{p}`"));
    }
    if let Some(t) = s["x-kubernetes-list-type"].as_str() {
        out.push(format!("list type {t}"));
    }
    for rule in s["x-kubernetes-validations"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let r = rule["rule"].as_str().unwrap_or_default();
        match rule["message"].as_str() {
            Some(m) => out.push(format!("{m} (CEL: `{r}`)")),
            None => out.push(format!("CEL: `{r}`")),
        }
    }
    out.join("; ")
}

fn default_of(s: &Value) -> String {
    match s.get("default") {
        None => String::new(),
        Some(Value::String(v)) => format!("`\"{v}\"`"),
        Some(v @ Value::Number(_)) => format!("`{}`", number(v)),
        Some(v) => format!("`{v}`"),
    }
}

/// Rows for `schema` at `path` and everything below it.
fn rows(path: &str, schema: &Value, required: bool, out: &mut Vec<[String; 5]>) {
    out.push([
        format!("`{path}`"),
        cell(&type_of(schema)),
        cell(&default_of(schema)),
        cell(&validation(schema, required)),
        cell(schema["description"].as_str().unwrap_or_default()),
    ]);
    let (object, prefix) = match schema["type"].as_str() {
        Some("array") => (&schema["items"], format!("{path}[]")),
        Some("object") if schema.get("additionalProperties").is_some() => {
            (&schema["additionalProperties"], format!("{path}.*"))
        }
        _ => (schema, path.to_string()),
    };
    let needed: Vec<&str> = object["required"]
        .as_array()
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if let Some(props) = object["properties"].as_object() {
        let mut names: Vec<&String> = props.keys().collect();
        names.sort();
        for name in names {
            rows(
                &format!("{prefix}.{name}"),
                &props[name],
                needed.contains(&name.as_str()),
                out,
            );
        }
    }
}

fn generate() -> String {
    let mut md = String::from(
        "# CRD reference\n\n\
         <!-- Generated from the CRD schemas by tests/crd_reference.rs; do not edit. \
         Regenerate with `MAILPOD_UPDATE_GOLDEN=1 cargo test --test crd_reference`. -->\n\n\
         Every field of the three resources, as the API server validates it (crds/). `≥`/`≤` are inclusive \
         bounds; CEL rules are checked by the API server on create and update, and the operator checks the \
         same rules again with field paths (`mailpod-operator render` shows them offline).\n",
    );
    for crd in all_crds() {
        let crd = serde_json::to_value(&crd).unwrap();
        let spec = &crd["spec"];
        let kind = spec["names"]["kind"].as_str().unwrap();
        let short: Vec<&str> = spec["names"]["shortNames"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        for version in spec["versions"].as_array().unwrap() {
            let v = version["name"].as_str().unwrap();
            let schema = &version["schema"]["openAPIV3Schema"];
            writeln!(
                md,
                "\n## {kind} ({}/{v})\n",
                spec["group"].as_str().unwrap()
            )
            .unwrap();
            writeln!(
                md,
                "Plural `{}`, short name{} {}, scope {}.{}",
                spec["names"]["plural"].as_str().unwrap(),
                if short.len() == 1 { "" } else { "s" },
                short
                    .iter()
                    .map(|s| format!("`{s}`"))
                    .collect::<Vec<_>>()
                    .join(", "),
                spec["scope"].as_str().unwrap(),
                if version["subresources"].get("status").is_some() {
                    " Status is a subresource."
                } else {
                    ""
                }
            )
            .unwrap();
            let mut table = vec![];
            for part in ["spec", "status"] {
                if let Some(s) = schema["properties"].get(part) {
                    let required = schema["required"]
                        .as_array()
                        .is_some_and(|r| r.iter().any(|x| x == part));
                    rows(part, s, required, &mut table);
                }
            }
            if let Some(rules) = schema["x-kubernetes-validations"].as_array() {
                md.push_str("\nRules on the whole object:\n\n");
                for r in rules {
                    writeln!(
                        md,
                        "- {} (CEL: `{}`)",
                        r["message"].as_str().unwrap_or("rule"),
                        r["rule"].as_str().unwrap_or_default()
                    )
                    .unwrap();
                }
            }
            md.push_str(
                "\n| field | type | default | validation | description |\n|---|---|---|---|---|\n",
            );
            for row in table {
                writeln!(md, "| {} |", row.join(" | ")).unwrap();
            }
        }
    }
    md
}

#[test]
fn crd_reference_is_current() {
    let want = generate();
    let path = reference_path();
    if std::env::var_os("MAILPOD_UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &want).unwrap();
    }
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        have == want,
        "docs/crd-reference.md is stale: run MAILPOD_UPDATE_GOLDEN=1 cargo test --test crd_reference and commit it"
    );
}

#[test]
fn crd_reference_names_every_spec_field_with_its_validation() {
    let md = generate();
    // Spot checks that tie the generator to the schema: a defaulted, bounded field and a CEL rule.
    let lun_row = md
        .lines()
        .find(|l| l.starts_with("| `spec.failoverThresholdSeconds` |") && l.contains("≥ 5"))
        .expect("StorageLUN failoverThresholdSeconds row with its minimum");
    assert!(lun_row.contains("`30`"), "{lun_row}");
    assert!(lun_row.contains("≤ 3600"), "{lun_row}");
    assert!(md
        .lines()
        .any(|l| l.starts_with("| `spec.capacity` |") && l.contains("CEL: `self.matches(")));
    for kind in ["MailPod", "StorageLUN", "SiteFailover"] {
        assert!(
            md.contains(&format!("## {kind} (mailpod.io/v1alpha1)")),
            "{kind}"
        );
    }
}
