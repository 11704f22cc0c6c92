//! Label and field selectors as the API server reads them from `labelSelector` / `fieldSelector`.

use super::store::Obj;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed `labelSelector` plus the `metadata.name` / `metadata.namespace` field selectors.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    labels: Vec<Requirement>,
    fields: Vec<Requirement>,
}

impl Selector {
    pub fn parse(
        label_selector: Option<&str>,
        field_selector: Option<&str>,
    ) -> Result<Self, String> {
        let labels = label_selector
            .map(parse_requirements)
            .transpose()?
            .unwrap_or_default();
        let fields = field_selector
            .map(parse_requirements)
            .transpose()?
            .unwrap_or_default();
        for f in &fields {
            let key = match f {
                Requirement::Equals(k, _) | Requirement::NotEquals(k, _) => k,
                _ => return Err("field selectors support only = and !=".into()),
            };
            if key != "metadata.name" && key != "metadata.namespace" {
                return Err(format!("field label not supported: {key}"));
            }
        }
        Ok(Self { labels, fields })
    }

    /// The first `label=value` requirement, which an index can answer.
    pub fn equality(&self) -> Option<(&str, &str)> {
        self.labels.iter().find_map(|r| match r {
            Requirement::Equals(k, v) => Some((k.as_str(), v.as_str())),
            _ => None,
        })
    }

    pub fn matches(&self, obj: &Obj) -> bool {
        let label = |k: &str| obj.labels.get(k).map(String::as_str);
        let field = |k: &str| match k {
            "metadata.name" => Some(obj.name.as_str()),
            "metadata.namespace" => Some(obj.namespace.as_str()),
            _ => None,
        };
        self.labels.iter().all(|r| r.matches(label)) && self.fields.iter().all(|r| r.matches(field))
    }
}

impl Requirement {
    fn matches<'a>(&self, get: impl Fn(&str) -> Option<&'a str>) -> bool {
        match self {
            Requirement::Equals(k, v) => get(k) == Some(v.as_str()),
            Requirement::NotEquals(k, v) => get(k) != Some(v.as_str()),
            Requirement::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            Requirement::NotIn(k, vs) => get(k).is_none_or(|x| !vs.iter().any(|v| v == x)),
            Requirement::Exists(k) => get(k).is_some(),
            Requirement::NotExists(k) => get(k).is_none(),
        }
    }
}

/// Splits on commas that are not inside `( )`.
fn split_top(s: &str) -> Vec<&str> {
    let (mut depth, mut start, mut out) = (0, 0, vec![]);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn parse_requirements(s: &str) -> Result<Vec<Requirement>, String> {
    let mut out = vec![];
    for part in split_top(s)
        .into_iter()
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        let set = |rest: &str| -> Result<Vec<String>, String> {
            let inner = rest
                .trim()
                .strip_prefix('(')
                .and_then(|r| r.strip_suffix(')'))
                .ok_or_else(|| format!("bad set in selector `{part}`"))?;
            Ok(inner.split(',').map(|v| v.trim().to_string()).collect())
        };
        let req = if let Some((k, v)) = part.split_once("!=") {
            Requirement::NotEquals(k.trim().into(), v.trim().into())
        } else if let Some((k, v)) = part.split_once("==") {
            Requirement::Equals(k.trim().into(), v.trim().into())
        } else if let Some((k, v)) = part.split_once('=') {
            Requirement::Equals(k.trim().into(), v.trim().into())
        } else if let Some((k, rest)) = part.split_once(" notin ") {
            Requirement::NotIn(k.trim().into(), set(rest)?)
        } else if let Some((k, rest)) = part.split_once(" in ") {
            Requirement::In(k.trim().into(), set(rest)?)
        } else if let Some(k) = part.strip_prefix('!') {
            Requirement::NotExists(k.trim().into())
        } else if part
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
        {
            Requirement::Exists(part.into())
        } else {
            return Err(format!("unable to parse requirement `{part}`"));
        };
        out.push(req);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn obj(labels: &[(&str, &str)]) -> Obj {
        Obj {
            json: bytes::Bytes::new(),
            namespace: "ns".into(),
            name: "n".into(),
            uid: "u".into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
            owner_uids: vec![],
        }
    }

    #[test]
    fn label_selectors() {
        let o = obj(&[
            ("mailpod.io/mailpod", "corp"),
            ("app.kubernetes.io/component", "mx"),
        ]);
        let m = |s: &str| Selector::parse(Some(s), None).unwrap().matches(&o);
        assert!(m("mailpod.io/mailpod=corp"));
        assert!(m(
            "mailpod.io/mailpod==corp,app.kubernetes.io/component in (mx, imap)"
        ));
        assert!(!m("mailpod.io/mailpod=other"));
        assert!(m("mailpod.io/mailpod!=other"));
        assert!(m("mailpod.io/mailpod"));
        assert!(!m("!mailpod.io/mailpod"));
        assert!(m("mailpod.io/lun notin (a,b)"));
        assert!(!m("app.kubernetes.io/component notin (mx)"));
        assert!(Selector::parse(Some("a in b"), None).is_err());
    }

    #[test]
    fn field_selectors() {
        let o = obj(&[]);
        assert!(Selector::parse(None, Some("metadata.name=n"))
            .unwrap()
            .matches(&o));
        assert!(!Selector::parse(None, Some("metadata.name=x"))
            .unwrap()
            .matches(&o));
        assert!(Selector::parse(None, Some("spec.nodeName=x")).is_err());
    }
}
