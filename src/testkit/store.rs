//! The object store behind the in-memory API server: objects as JSON per (resource, namespace, name),
//! resourceVersion/uid/generation bookkeeping, Server-Side Apply, garbage collection and watch history.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use serde_json::{json, Map, Value};

use super::selector::Selector;

/// `apps/v1/statefulsets`, `v1/configmaps`, `mailpod.io/v1alpha1/mailpods`.
pub type ResourceKey = Arc<str>;

/// One stored version of an object: its JSON and what selectors and the garbage collector need.
#[derive(Debug)]
pub struct Obj {
    pub json: Bytes,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub labels: BTreeMap<String, String>,
    pub owner_uids: Vec<String>,
}

impl Obj {
    fn from_value(value: &Value) -> Arc<Obj> {
        let meta = &value["metadata"];
        let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
        let labels = meta["labels"]
            .as_object()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), s(v))).collect())
            .unwrap_or_default();
        let owner_uids = meta["ownerReferences"]
            .as_array()
            .map(|refs| refs.iter().map(|r| s(&r["uid"])).collect())
            .unwrap_or_default();
        Arc::new(Obj {
            json: Bytes::from(serde_json::to_vec(value).expect("JSON value serializes")),
            namespace: s(&meta["namespace"]),
            name: s(&meta["name"]),
            uid: s(&meta["uid"]),
            labels,
            owner_uids,
        })
    }

    pub fn value(&self) -> Value {
        serde_json::from_slice(&self.json).expect("stored JSON parses")
    }
}

/// A change, kept for watches that start from an older resourceVersion.
#[derive(Debug, Clone)]
pub struct Change {
    pub rv: u64,
    pub resource: ResourceKey,
    pub old: Option<Arc<Obj>>,
    pub new: Option<Arc<Obj>>,
}

/// `(label, value)` -> `(namespace, name)` of the objects carrying it.
type LabelIndex = HashMap<(String, String), BTreeSet<(String, String)>>;

/// A leaf field path of an applied configuration (maps are walked; lists and scalars are leaves).
type FieldPath = Vec<String>;

#[derive(Debug, Default)]
struct Entry {
    obj: Option<Arc<Obj>>,
    /// Fields each Server-Side Apply manager set last time.
    managers: BTreeMap<String, BTreeSet<FieldPath>>,
}

/// Why a write was refused, as the API server says it (HTTP code, reason, message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn not_found(resource: &str, name: &str) -> Self {
        Self {
            code: 404,
            reason: "NotFound",
            message: format!("{resource} \"{name}\" not found"),
        }
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self {
            code: 409,
            reason: "Conflict",
            message: message.into(),
        }
    }
    pub fn already_exists(resource: &str, name: &str) -> Self {
        Self {
            code: 409,
            reason: "AlreadyExists",
            message: format!("{resource} \"{name}\" already exists"),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            code: 400,
            reason: "BadRequest",
            message: message.into(),
        }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self {
            code: 422,
            reason: "Invalid",
            message: message.into(),
        }
    }
    /// The `Status` body the API server sends with an error.
    pub fn status_json(&self) -> Value {
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        })
    }
}

/// Which part of an object a write addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subresource {
    Main,
    Status,
}

/// How a PATCH body is to be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchKind {
    Apply { force: bool },
    Merge,
    Json,
}

/// Result of a write: the object now stored and whether anything changed.
#[derive(Debug)]
pub struct Written {
    pub obj: Arc<Obj>,
    pub changed: bool,
}

/// Rewrites every object as it is stored, as the real API server's defaulting and serialisation do
/// (`omitempty`, canonical quantities, defaults): the resource key (`apps/v1/statefulsets`) and the object.
#[derive(Clone)]
pub struct Normaliser(pub Arc<NormaliseFn>);

/// The rewrite a [`Normaliser`] applies.
pub type NormaliseFn = dyn Fn(&str, &mut Value) + Send + Sync;

impl std::fmt::Debug for Normaliser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Normaliser")
    }
}

/// Every object of the in-memory cluster.
#[derive(Debug)]
pub struct Store {
    /// Applied to every object written, when set.
    pub normaliser: Option<Normaliser>,
    rv: u64,
    uid_seq: u64,
    collections: HashMap<ResourceKey, BTreeMap<(String, String), Entry>>,
    kinds: HashMap<ResourceKey, (String, String)>,
    /// Per resource, `label=value` -> objects carrying it, so equality selectors do not scan every object
    /// (the API server's watch cache indexes the same way for the labels operators select by).
    label_index: HashMap<ResourceKey, LabelIndex>,
    history: VecDeque<Change>,
    history_cap: usize,
    /// Changes with a resourceVersion above this are all still in `history`.
    history_floor: u64,
}

impl Store {
    pub fn new(history_cap: usize) -> Self {
        Self {
            normaliser: None,
            rv: 0,
            uid_seq: 0,
            collections: HashMap::new(),
            kinds: HashMap::new(),
            label_index: HashMap::new(),
            history: VecDeque::new(),
            history_cap,
            history_floor: 0,
        }
    }

    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    /// Objects stored, of all kinds.
    pub fn count(&self) -> usize {
        self.collections
            .values()
            .map(|c| c.values().filter(|e| e.obj.is_some()).count())
            .sum()
    }

    pub fn history_floor(&self) -> u64 {
        self.history_floor
    }

    pub fn history_since(&self, rv: u64) -> impl Iterator<Item = &Change> {
        self.history.iter().filter(move |c| c.rv > rv)
    }

    /// `(apiVersion, kind)` seen for a resource, for list responses.
    pub fn kind_of(&self, resource: &str) -> Option<&(String, String)> {
        self.kinds.get(resource)
    }

    pub fn key(resource: &str) -> ResourceKey {
        Arc::from(resource)
    }

    pub fn get(&self, resource: &str, ns: &str, name: &str) -> Option<Arc<Obj>> {
        self.collections
            .get(resource)?
            .get(&(ns.to_string(), name.to_string()))?
            .obj
            .clone()
    }

    /// Objects of a resource, in one namespace or all, sorted by (namespace, name).
    pub fn list(&self, resource: &str, ns: Option<&str>, selector: &Selector) -> Vec<Arc<Obj>> {
        let Some(coll) = self.collections.get(resource) else {
            return vec![];
        };
        let in_ns = |o_ns: &str| ns.is_none_or(|n| n == o_ns);
        if let Some((k, v)) = selector.equality() {
            let Some(keys) = self
                .label_index
                .get(resource)
                .and_then(|idx| idx.get(&(k.to_string(), v.to_string())))
            else {
                return vec![];
            };
            return keys
                .iter()
                .filter(|(o_ns, _)| in_ns(o_ns))
                .filter_map(|key| coll.get(key)?.obj.clone())
                .filter(|o| selector.matches(o))
                .collect();
        }
        let entries: Box<dyn Iterator<Item = (&(String, String), &Entry)>> = match ns {
            Some(n) => Box::new(
                coll.range((n.to_string(), String::new())..)
                    .take_while(move |((o_ns, _), _)| o_ns == n),
            ),
            None => Box::new(coll.iter()),
        };
        entries
            .filter_map(|(_, e)| e.obj.clone())
            .filter(|o| selector.matches(o))
            .collect()
    }

    fn index(&mut self, resource: &ResourceKey, old: Option<&Obj>, new: Option<&Obj>) {
        let idx = self.label_index.entry(resource.clone()).or_default();
        if let Some(o) = old {
            for (k, v) in &o.labels {
                if let Some(set) = idx.get_mut(&(k.clone(), v.clone())) {
                    set.remove(&(o.namespace.clone(), o.name.clone()));
                    if set.is_empty() {
                        idx.remove(&(k.clone(), v.clone()));
                    }
                }
            }
        }
        if let Some(o) = new {
            for (k, v) in &o.labels {
                idx.entry((k.clone(), v.clone()))
                    .or_default()
                    .insert((o.namespace.clone(), o.name.clone()));
            }
        }
    }

    fn record(
        &mut self,
        resource: &ResourceKey,
        old: Option<Arc<Obj>>,
        new: Option<Arc<Obj>>,
    ) -> Change {
        let change = Change {
            rv: self.rv,
            resource: resource.clone(),
            old,
            new,
        };
        self.history.push_back(change.clone());
        while self.history.len() > self.history_cap {
            if let Some(c) = self.history.pop_front() {
                self.history_floor = c.rv;
            }
        }
        change
    }

    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn remember_kind(&mut self, resource: &ResourceKey, value: &Value) {
        if !self.kinds.contains_key(resource) {
            if let (Some(av), Some(kind)) = (value["apiVersion"].as_str(), value["kind"].as_str()) {
                self.kinds
                    .insert(resource.clone(), (av.to_string(), kind.to_string()));
            }
        }
    }

    /// POST: creates `value` in `ns`; 409 AlreadyExists when the name is taken.
    pub fn create(
        &mut self,
        resource: &ResourceKey,
        ns: &str,
        mut value: Value,
        changes: &mut Vec<Change>,
    ) -> Result<Written, ApiError> {
        if !value.is_object() {
            return Err(ApiError::bad_request("body must be a JSON object"));
        }
        let meta = value
            .as_object_mut()
            .expect("checked above")
            .entry("metadata")
            .or_insert_with(|| json!({}));
        if meta
            .get("name")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            let Some(prefix) = meta.get("generateName").and_then(Value::as_str) else {
                return Err(ApiError::invalid(
                    "metadata.name or metadata.generateName is required",
                ));
            };
            let generated = format!("{prefix}{:05x}", self.uid_seq + 1);
            meta["name"] = json!(generated);
        }
        let name = meta["name"].as_str().unwrap_or_default().to_string();
        if self.get(resource, ns, &name).is_some() {
            return Err(ApiError::already_exists(resource, &name));
        }
        if let Some(o) = value.as_object_mut() {
            o.remove("status");
        }
        let obj = self.insert_new(resource, ns, value, changes);
        Ok(Written { obj, changed: true })
    }

    fn insert_new(
        &mut self,
        resource: &ResourceKey,
        ns: &str,
        mut value: Value,
        changes: &mut Vec<Change>,
    ) -> Arc<Obj> {
        self.remember_kind(resource, &value);
        self.uid_seq += 1;
        let rv = self.next_rv();
        let meta = &mut value["metadata"];
        if !ns.is_empty() {
            meta["namespace"] = json!(ns);
        }
        meta["uid"] = json!(format!("00000000-0000-4000-8000-{:012x}", self.uid_seq));
        meta["resourceVersion"] = json!(rv.to_string());
        meta["generation"] = json!(1);
        meta["creationTimestamp"] = json!(jiff::Timestamp::now()
            .strftime("%Y-%m-%dT%H:%M:%SZ")
            .to_string());
        if let Some(m) = meta.as_object_mut() {
            m.remove("managedFields");
            m.remove("deletionTimestamp");
        }
        string_data_into_data(resource, &mut value);
        if let Some(n) = &self.normaliser {
            (n.0)(resource, &mut value);
        }
        let obj = Obj::from_value(&value);
        let name = obj.name.clone();
        self.collections
            .entry(resource.clone())
            .or_default()
            .entry((ns.to_string(), name))
            .or_default()
            .obj = Some(obj.clone());
        self.index(resource, None, Some(&obj));
        changes.push(self.record(resource, None, Some(obj.clone())));
        obj
    }

    /// Stores `new` in place of `old` (same resource/ns/name), bumping resourceVersion and, when anything but
    /// metadata and status changed, generation. Returns `changed: false` and leaves everything alone when the
    /// result equals the stored object.
    fn replace_with(
        &mut self,
        resource: &ResourceKey,
        ns: &str,
        name: &str,
        old_value: &Value,
        mut new_value: Value,
        changes: &mut Vec<Change>,
    ) -> Written {
        // Identity fields are the server's.
        for field in [
            "uid",
            "creationTimestamp",
            "generation",
            "resourceVersion",
            "deletionTimestamp",
        ] {
            match old_value["metadata"].get(field) {
                Some(v) => new_value["metadata"][field] = v.clone(),
                None => {
                    if let Some(m) = new_value["metadata"].as_object_mut() {
                        m.remove(field);
                    }
                }
            }
        }
        new_value["metadata"]["name"] = json!(name);
        if !ns.is_empty() {
            new_value["metadata"]["namespace"] = json!(ns);
        }
        if let Some(m) = new_value["metadata"].as_object_mut() {
            m.remove("managedFields");
        }
        string_data_into_data(resource, &mut new_value);
        if let Some(n) = &self.normaliser {
            (n.0)(resource, &mut new_value);
        }
        let entry_obj = self
            .get(resource, ns, name)
            .expect("replace_with on a stored object");
        if &new_value == old_value {
            return Written {
                obj: entry_obj,
                changed: false,
            };
        }
        if spec_part(old_value) != spec_part(&new_value) {
            let generation = old_value["metadata"]["generation"].as_i64().unwrap_or(1) + 1;
            new_value["metadata"]["generation"] = json!(generation);
        }
        let rv = self.next_rv();
        new_value["metadata"]["resourceVersion"] = json!(rv.to_string());
        let finalizers_empty = new_value["metadata"]["finalizers"]
            .as_array()
            .is_none_or(Vec::is_empty);
        if new_value["metadata"].get("deletionTimestamp").is_some() && finalizers_empty {
            // The last finalizer is gone: the deletion completes.
            let obj = Obj::from_value(&new_value);
            self.remove(resource, ns, name, Some(obj), true, changes);
            return Written {
                obj: entry_obj,
                changed: true,
            };
        }
        let obj = Obj::from_value(&new_value);
        self.collections
            .get_mut(resource)
            .and_then(|c| c.get_mut(&(ns.to_string(), name.to_string())))
            .expect("stored")
            .obj = Some(obj.clone());
        self.index(resource, Some(&entry_obj), Some(&obj));
        changes.push(self.record(resource, Some(entry_obj), Some(obj.clone())));
        Written { obj, changed: true }
    }

    /// PUT: replaces the object (or its status). A resourceVersion in the body must match (optimistic locking).
    pub fn update(
        &mut self,
        resource: &ResourceKey,
        ns: &str,
        name: &str,
        sub: Subresource,
        body: Value,
        changes: &mut Vec<Change>,
    ) -> Result<Written, ApiError> {
        let current = self
            .get(resource, ns, name)
            .ok_or_else(|| ApiError::not_found(resource, name))?;
        let old = current.value();
        if let Some(rv) = body["metadata"]["resourceVersion"].as_str() {
            if Some(rv) != old["metadata"]["resourceVersion"].as_str() {
                return Err(ApiError::conflict(format!(
                    "Operation cannot be fulfilled on {resource} \"{name}\": the object has been modified; \
                     please apply your changes to the latest version and try again"
                )));
            }
        }
        let new = match sub {
            Subresource::Status => with_status(&old, body.get("status").cloned()),
            Subresource::Main => with_status(&body, old.get("status").cloned()),
        };
        Ok(self.replace_with(resource, ns, name, &old, new, changes))
    }

    /// PATCH: merge patch, JSON patch or Server-Side Apply (which creates the object when absent).
    #[allow(clippy::too_many_arguments)]
    pub fn patch(
        &mut self,
        resource: &ResourceKey,
        ns: &str,
        name: &str,
        sub: Subresource,
        kind: PatchKind,
        field_manager: Option<&str>,
        patch: Value,
        changes: &mut Vec<Change>,
    ) -> Result<Written, ApiError> {
        let current = self.get(resource, ns, name);
        let Some(current) = current else {
            let PatchKind::Apply { .. } = kind else {
                return Err(ApiError::not_found(resource, name));
            };
            if sub == Subresource::Status {
                return Err(ApiError::not_found(resource, name));
            }
            let manager = field_manager.ok_or_else(|| {
                ApiError::bad_request("fieldManager is required for apply patches")
            })?;
            let mut value = patch.clone();
            if !value.is_object() {
                return Err(ApiError::bad_request("apply patch must be an object"));
            }
            value["metadata"]["name"] = json!(name);
            if let Some(o) = value.as_object_mut() {
                o.remove("status");
            }
            let fields = leaf_paths(&strip_for_ownership(&patch, sub));
            let obj = self.insert_new(resource, ns, value, changes);
            let entry = self.entry_mut(resource, ns, name);
            entry.managers.insert(manager.to_string(), fields);
            return Ok(Written { obj, changed: true });
        };
        let old = current.value();
        // A resourceVersion in a merge patch is a precondition, as on the real API server.
        if let (PatchKind::Merge, Some(rv)) = (&kind, patch["metadata"]["resourceVersion"].as_str())
        {
            if Some(rv) != old["metadata"]["resourceVersion"].as_str() {
                return Err(ApiError::conflict(format!(
                    "Operation cannot be fulfilled on {resource} \"{name}\": the object has been modified; \
                     please apply your changes to the latest version and try again"
                )));
            }
        }
        let new = match kind {
            PatchKind::Merge => {
                let mut v = old.clone();
                json_patch::merge(&mut v, &scope(&patch, sub));
                v
            }
            PatchKind::Json => {
                let ops: json_patch::Patch = serde_json::from_value(patch)
                    .map_err(|e| ApiError::bad_request(format!("not a JSON patch: {e}")))?;
                let mut v = old.clone();
                json_patch::patch(&mut v, &ops)
                    .map_err(|e| ApiError::invalid(format!("JSON patch failed: {e}")))?;
                v
            }
            PatchKind::Apply { force } => {
                let manager = field_manager.ok_or_else(|| {
                    ApiError::bad_request("fieldManager is required for apply patches")
                })?;
                return self.apply(
                    resource, ns, name, sub, &old, &patch, manager, force, changes,
                );
            }
        };
        let new = match sub {
            Subresource::Status => with_status(&old, new.get("status").cloned()),
            Subresource::Main => with_status(&new, old.get("status").cloned()),
        };
        Ok(self.replace_with(resource, ns, name, &old, new, changes))
    }

    fn entry_mut(&mut self, resource: &ResourceKey, ns: &str, name: &str) -> &mut Entry {
        self.collections
            .get_mut(resource)
            .and_then(|c| c.get_mut(&(ns.to_string(), name.to_string())))
            .expect("entry exists")
    }

    #[allow(clippy::too_many_arguments)]
    fn apply(
        &mut self,
        resource: &ResourceKey,
        ns: &str,
        name: &str,
        sub: Subresource,
        old: &Value,
        patch: &Value,
        manager: &str,
        force: bool,
        changes: &mut Vec<Change>,
    ) -> Result<Written, ApiError> {
        let scoped = scope(patch, sub);
        let owned = strip_for_ownership(&scoped, sub);
        let fields = leaf_paths(&owned);
        let entry = self.entry_mut(resource, ns, name);
        // Conflicts: a field another manager applied, set here to a different value.
        let mut conflicts = vec![];
        for (other, other_fields) in &entry.managers {
            if other == manager {
                continue;
            }
            for f in fields.intersection(other_fields) {
                if lookup(old, f) != lookup(&owned, f) {
                    conflicts.push(format!(".{} (owned by \"{other}\")", f.join(".")));
                }
            }
        }
        if !conflicts.is_empty() && !force {
            return Err(ApiError::conflict(format!(
                "Apply failed with {} conflict(s): {}",
                conflicts.len(),
                conflicts.join(", ")
            )));
        }
        // Fields this manager applied before and no longer does are removed, unless another manager holds them.
        let mut new = old.clone();
        let previous = entry.managers.get(manager).cloned().unwrap_or_default();
        for gone in previous.difference(&fields) {
            let held = entry.managers.iter().any(|(m, fs)| {
                m != manager
                    && fs
                        .iter()
                        .any(|f| f.starts_with(gone) || gone.starts_with(f))
            });
            if !held {
                remove_path(&mut new, gone);
            }
        }
        merge_apply(&mut new, &scoped);
        if force {
            for (other, other_fields) in entry.managers.iter_mut() {
                if other != manager {
                    let taken: Vec<FieldPath> = other_fields
                        .intersection(&fields)
                        .filter(|f| lookup(old, f) != lookup(&owned, f))
                        .cloned()
                        .collect();
                    for f in taken {
                        other_fields.remove(&f);
                    }
                }
            }
        }
        entry.managers.insert(manager.to_string(), fields);
        let new = match sub {
            Subresource::Status => with_status(old, new.get("status").cloned()),
            Subresource::Main => with_status(&new, old.get("status").cloned()),
        };
        Ok(self.replace_with(resource, ns, name, old, new, changes))
    }

    /// DELETE. With finalizers the object only gets a deletionTimestamp; otherwise it goes, and so do its
    /// dependents (background cascade, as the garbage collector would) unless `orphan`.
    pub fn delete(
        &mut self,
        resource: &ResourceKey,
        ns: &str,
        name: &str,
        precondition_uid: Option<&str>,
        orphan: bool,
        changes: &mut Vec<Change>,
    ) -> Result<Arc<Obj>, ApiError> {
        let current = self
            .get(resource, ns, name)
            .ok_or_else(|| ApiError::not_found(resource, name))?;
        if let Some(uid) = precondition_uid {
            if uid != current.uid {
                return Err(ApiError::conflict(format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    current.uid
                )));
            }
        }
        let mut value = current.value();
        let has_finalizers = value["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        if has_finalizers {
            if value["metadata"].get("deletionTimestamp").is_none() {
                let rv = self.next_rv();
                value["metadata"]["deletionTimestamp"] = json!(jiff::Timestamp::now()
                    .strftime("%Y-%m-%dT%H:%M:%SZ")
                    .to_string());
                value["metadata"]["resourceVersion"] = json!(rv.to_string());
                let obj = Obj::from_value(&value);
                self.entry_mut(resource, ns, name).obj = Some(obj.clone());
                changes.push(self.record(resource, Some(current), Some(obj.clone())));
                return Ok(obj);
            }
            return Ok(current);
        }
        self.remove(resource, ns, name, None, !orphan, changes);
        Ok(current)
    }

    fn remove(
        &mut self,
        resource: &ResourceKey,
        ns: &str,
        name: &str,
        last: Option<Arc<Obj>>,
        cascade: bool,
        changes: &mut Vec<Change>,
    ) {
        let Some(entry) = self
            .collections
            .get_mut(resource)
            .and_then(|c| c.remove(&(ns.to_string(), name.to_string())))
        else {
            return;
        };
        let Some(old) = entry.obj else { return };
        self.index(resource, Some(&old), None);
        self.next_rv();
        let uid = old.uid.clone();
        let final_state = last.unwrap_or(old);
        changes.push(self.record(resource, Some(final_state), None));
        if cascade {
            self.collect_dependents(&uid, changes);
        }
    }

    /// Deletes every object whose owners are all gone once `owner_uid` is.
    fn collect_dependents(&mut self, owner_uid: &str, changes: &mut Vec<Change>) {
        let live: BTreeSet<String> = self
            .collections
            .values()
            .flat_map(|c| {
                c.values()
                    .filter_map(|e| e.obj.as_ref().map(|o| o.uid.clone()))
            })
            .collect();
        let mut doomed = vec![];
        for (resource, coll) in &self.collections {
            for ((ns, name), e) in coll {
                if let Some(o) = &e.obj {
                    if o.owner_uids.iter().any(|u| u == owner_uid)
                        && !o.owner_uids.iter().any(|u| live.contains(u))
                    {
                        doomed.push((resource.clone(), ns.clone(), name.clone()));
                    }
                }
            }
        }
        for (resource, ns, name) in doomed {
            // Dependents with finalizers wait for them, as with any delete.
            let _ = self.delete(&resource, &ns, &name, None, false, changes);
        }
    }
}

/// A Secret's `stringData` is write-only, as on the real API server: merged into `data` (base64) and
/// never stored.
fn string_data_into_data(resource: &ResourceKey, value: &mut Value) {
    if &**resource != "v1/secrets" {
        return;
    }
    let Some(obj) = value.as_object_mut() else {
        return;
    };
    let Some(Value::Object(strings)) = obj.remove("stringData") else {
        return;
    };
    let data = obj.entry("data").or_insert_with(|| json!({}));
    if !data.is_object() {
        *data = json!({});
    }
    for (k, v) in strings {
        let bytes = v.as_str().unwrap_or_default().as_bytes().to_vec();
        data[k.as_str()] = serde_json::to_value(k8s_openapi::ByteString(bytes)).unwrap_or_default();
    }
}

/// Everything but metadata and status: what bumps `metadata.generation` when it changes.
fn spec_part(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(o) = v.as_object_mut() {
        o.remove("metadata");
        o.remove("status");
    }
    v
}

fn with_status(v: &Value, status: Option<Value>) -> Value {
    let mut v = v.clone();
    if let Some(o) = v.as_object_mut() {
        match status {
            Some(s) if !s.is_null() => {
                o.insert("status".into(), s);
            }
            _ => {
                o.remove("status");
            }
        }
    }
    v
}

/// The part of a patch a subresource write may touch.
fn scope(patch: &Value, sub: Subresource) -> Value {
    let mut p = patch.clone();
    if let Some(o) = p.as_object_mut() {
        match sub {
            Subresource::Main => {
                o.remove("status");
            }
            Subresource::Status => {
                o.retain(|k, _| k == "status" || k == "apiVersion" || k == "kind")
            }
        }
    }
    p
}

/// What a manager owns from an apply: not the identity fields every apply repeats.
fn strip_for_ownership(patch: &Value, sub: Subresource) -> Value {
    let mut p = scope(patch, sub);
    if let Some(o) = p.as_object_mut() {
        o.remove("apiVersion");
        o.remove("kind");
        if let Some(Value::Object(meta)) = o.get_mut("metadata") {
            meta.remove("name");
            meta.remove("namespace");
            meta.remove("resourceVersion");
            meta.remove("managedFields");
            if meta.is_empty() {
                o.remove("metadata");
            }
        }
    }
    p
}

/// Leaf paths of an applied configuration: maps are walked; anything else (lists included) is one field.
fn leaf_paths(v: &Value) -> BTreeSet<FieldPath> {
    fn walk(v: &Value, path: &mut FieldPath, out: &mut BTreeSet<FieldPath>) {
        match v {
            Value::Object(m) if !m.is_empty() => {
                for (k, child) in m {
                    path.push(k.clone());
                    walk(child, path, out);
                    path.pop();
                }
            }
            _ => {
                if !path.is_empty() {
                    out.insert(path.clone());
                }
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(v, &mut vec![], &mut out);
    out
}

fn lookup<'a>(v: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(k))
}

/// Removes a field, and the maps it leaves empty.
fn remove_path(v: &mut Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    if let Some(Value::Object(m)) = parents.iter().try_fold(&mut *v, |v, k| v.get_mut(k)) {
        m.remove(last);
        if m.is_empty() && !parents.is_empty() {
            remove_path(v, parents);
        }
    }
}

/// Server-Side Apply merge, faithful enough for one manager per field: maps merge recursively, lists and
/// scalars replace, `null` removes.
pub fn merge_apply(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, pv) in p {
                if pv.is_null() {
                    t.remove(k);
                } else {
                    match t.get_mut(k) {
                        Some(tv) if tv.is_object() && pv.is_object() => merge_apply(tv, pv),
                        _ => {
                            let mut fresh = Value::Object(Map::new());
                            if pv.is_object() {
                                merge_apply(&mut fresh, pv);
                            } else {
                                fresh = pv.clone();
                            }
                            t.insert(k.clone(), fresh);
                        }
                    }
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apply_merges_maps_and_replaces_lists() {
        let mut t = json!({"a": {"b": 1, "c": [1, 2]}, "d": "x"});
        merge_apply(&mut t, &json!({"a": {"c": [3], "e": true}, "d": null}));
        assert_eq!(t, json!({"a": {"b": 1, "c": [3], "e": true}}));
    }

    #[test]
    fn leaf_paths_walk_maps_only() {
        let p = leaf_paths(
            &json!({"metadata": {"labels": {"a": "1"}}, "spec": {"list": [1], "empty": {}}}),
        );
        let p: Vec<String> = p.iter().map(|f| f.join(".")).collect();
        assert_eq!(p, vec!["metadata.labels.a", "spec.empty", "spec.list"]);
    }

    #[test]
    fn remove_path_prunes_empty_maps() {
        let mut v = json!({"metadata": {"annotations": {"x": "1"}, "name": "n"}});
        remove_path(
            &mut v,
            &["metadata".into(), "annotations".into(), "x".into()],
        );
        assert_eq!(v, json!({"metadata": {"name": "n"}}));
    }
}
