//! An in-memory Kubernetes API server for tests and benchmarks, served as a `tower::Service` that
//! [`kube::Client::new`] takes, so the code under test runs its real client calls, reflectors and
//! `kube::runtime::Controller` against it.
//!
//! It serves any kind from the URL (`/api/v1/namespaces/{ns}/configmaps`,
//! `/apis/{group}/{version}/namespaces/{ns}/{plural}/{name}[/status]`, cluster-scoped paths too): GET, LIST
//! (label and field selectors, `limit`/`continue`), POST, PUT, PATCH (Server-Side Apply, merge patch, JSON
//! patch), the `status` subresource, DELETE with ownerReference cascade and finalizers, and watches
//! (`?watch=true` from a resourceVersion, newline-delimited events). It records every request and can fail
//! chosen requests on purpose.
//!
//! What it does not do: admission, defaulting (unless asked to imitate some, see [`normalise`]), schema
//! validation, field selectors beyond name/namespace,
//! SSA list merge keys (lists are atomic), and running workloads (no StatefulSet controller: tests set
//! status themselves through the `status` subresource).

mod selector;
mod store;

pub mod fixtures;
pub mod normalise;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::channel::mpsc;
use futures::future::BoxFuture;
use futures::StreamExt;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use kube::Resource;
use serde::de::DeserializeOwned;
use serde_json::Value;

pub use selector::Selector;
use store::{ApiError, Change, Obj, PatchKind, ResourceKey, Store, Subresource};

/// Response body of the in-memory server: a whole JSON document, or a stream of watch events.
pub type ResponseBody = UnsyncBoxBody<Bytes, Infallible>;

/// One request as the server saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    pub method: Method,
    pub path: String,
    pub query: String,
    /// HTTP status answered (0 for an injected transport error).
    pub status: u16,
    /// Whether the request changed a stored object.
    pub changed: bool,
}

impl RequestRecord {
    /// POST, PUT, PATCH and DELETE: requests that ask for a change, whether or not one happened.
    pub fn is_mutating(&self) -> bool {
        matches!(
            self.method,
            Method::POST | Method::PUT | Method::PATCH | Method::DELETE
        )
    }

    pub fn is_watch(&self) -> bool {
        self.query
            .split('&')
            .any(|p| p == "watch=true" || p == "watch=1")
    }
}

/// What an injected fault does to a matching request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// Answer with this HTTP status and a `Status` body, without touching the store.
    Status(u16),
    /// Fail at the transport level, as a timed-out connection does.
    Timeout,
    /// Never answer, as a server behind a dead connection: only a client-side timeout ends the call.
    Hang,
}

/// Fails the next `remaining` requests that match.
#[derive(Debug, Clone)]
pub struct Fault {
    pub method: Option<Method>,
    /// Substring of the path (`/statefulsets/`), or empty for any.
    pub path_contains: String,
    pub kind: FaultKind,
    pub remaining: usize,
}

impl Fault {
    pub fn new(
        method: Option<Method>,
        path_contains: impl Into<String>,
        kind: FaultKind,
        times: usize,
    ) -> Self {
        Self {
            method,
            path_contains: path_contains.into(),
            kind,
            remaining: times,
        }
    }

    fn matches(&self, method: &Method, path: &str) -> bool {
        self.remaining > 0
            && self.method.as_ref().is_none_or(|m| m == method)
            && path.contains(&self.path_contains)
    }
}

struct Watcher {
    resource: ResourceKey,
    namespace: Option<String>,
    selector: Selector,
    tx: mpsc::UnboundedSender<Bytes>,
}

struct State {
    store: Store,
    watchers: Vec<Watcher>,
    log: Vec<RequestRecord>,
    faults: VecDeque<Fault>,
}

/// The in-memory API server. Cheap to clone; clones share the cluster.
#[derive(Clone)]
pub struct ApiServer {
    state: Arc<Mutex<State>>,
}

impl Default for ApiServer {
    fn default() -> Self {
        Self::new()
    }
}

/// `v1/configmaps`, `apps/v1/statefulsets`: the key a kind is stored under.
pub fn resource_key<K: Resource<DynamicType = ()>>() -> String {
    format!("{}/{}", K::api_version(&()), K::plural(&()))
}

impl ApiServer {
    pub fn new() -> Self {
        Self::with_history(100_000)
    }

    /// A server that keeps the last `changes` changes for watches that resume from an older resourceVersion
    /// (older ones get `410 Gone`, and the client re-lists).
    pub fn with_history(changes: usize) -> Self {
        Self {
            state: Arc::new(Mutex::new(State {
                store: Store::new(changes),
                watchers: vec![],
                log: vec![],
                faults: VecDeque::new(),
            })),
        }
    }

    /// Rewrites every object written from now on with `f` (resource key, object), as a real API server's
    /// defaulting and serialisation would.
    pub fn normalise_with(&self, f: impl Fn(&str, &mut Value) + Send + Sync + 'static) {
        self.lock().store.normaliser = Some(store::Normaliser(Arc::new(f)));
    }

    /// Stores objects as a real kube-apiserver returns them: `omitempty`, canonical quantities, defaults
    /// (see [`normalise`]).
    pub fn normalise_like_kube_apiserver(&self) {
        self.normalise_with(normalise::like_kube_apiserver);
    }

    /// A client talking to this server, default namespace `default`.
    pub fn client(&self) -> kube::Client {
        kube::Client::new(self.clone(), "default")
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.lock().log.clone()
    }

    /// Requests that asked for a change (POST, PUT, PATCH, DELETE).
    pub fn mutating_requests(&self) -> Vec<RequestRecord> {
        self.lock()
            .log
            .iter()
            .filter(|r| r.is_mutating())
            .cloned()
            .collect()
    }

    /// Forgets the request log (not the objects).
    pub fn clear_requests(&self) {
        self.lock().log.clear();
    }

    /// Fails requests on purpose.
    pub fn inject(&self, fault: Fault) {
        self.lock().faults.push_back(fault);
    }

    /// Faults not yet used up.
    pub fn pending_faults(&self) -> usize {
        self.lock().faults.iter().map(|f| f.remaining).sum()
    }

    /// The current resourceVersion of the whole store.
    pub fn resource_version(&self) -> u64 {
        self.lock().store.resource_version()
    }

    /// Objects of kind `K` (in `ns`, or everywhere), sorted by namespace and name.
    pub fn list<K: Resource<DynamicType = ()> + DeserializeOwned>(
        &self,
        ns: Option<&str>,
    ) -> Vec<K> {
        let key = resource_key::<K>();
        self.lock()
            .store
            .list(&key, ns, &Selector::default())
            .iter()
            .map(|o| serde_json::from_slice(&o.json).expect("stored object has the kind's shape"))
            .collect()
    }

    /// One object of kind `K`, if stored.
    pub fn get<K: Resource<DynamicType = ()> + DeserializeOwned>(
        &self,
        ns: &str,
        name: &str,
    ) -> Option<K> {
        let key = resource_key::<K>();
        let obj = self.lock().store.get(&key, ns, name)?;
        Some(serde_json::from_slice(&obj.json).expect("stored object has the kind's shape"))
    }

    /// Total number of stored objects of all kinds.
    pub fn object_count(&self) -> usize {
        // Listing every kind through the store keeps this honest about what is really stored.
        let state = self.lock();
        state.store.count()
    }

    fn dispatch(state: &mut State, changes: &[Change]) {
        if changes.is_empty() || state.watchers.is_empty() {
            return;
        }
        state.watchers.retain(|w| !w.tx.is_closed());
        for change in changes {
            for w in &state.watchers {
                if let Some(line) = watch_line(w, change) {
                    let _ = w.tx.unbounded_send(line);
                }
            }
        }
    }

    async fn serve(
        self,
        req: Request<kube::client::Body>,
    ) -> Result<Response<ResponseBody>, kube::Error> {
        let (parts, body) = req.into_parts();
        let body = body.collect_bytes().await?;
        match self.answer(parts, body) {
            Some(answer) => answer,
            None => std::future::pending().await,
        }
    }

    /// The answer to one request; `None` for a request that is never answered (an injected hang).
    fn answer(
        &self,
        parts: http::request::Parts,
        body: Bytes,
    ) -> Option<Result<Response<ResponseBody>, kube::Error>> {
        let method = parts.method.clone();
        let path = parts.uri.path().to_string();
        let query_str = parts.uri.query().unwrap_or_default().to_string();
        let content_type = parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();

        // Bodies are parsed before taking the store lock, so concurrent requests only serialize on the store.
        let parsed: Result<Value, String> = if body.is_empty() {
            Ok(Value::Null)
        } else {
            serde_json::from_slice(&body).or_else(|e| {
                if content_type.starts_with("application/apply-patch+yaml") {
                    serde_yaml::from_slice(&body)
                        .map_err(|e| format!("body is not YAML or JSON: {e}"))
                } else {
                    Err(format!("body is not JSON: {e}"))
                }
            })
        };

        let mut state = self.lock();
        let fault = state
            .faults
            .iter_mut()
            .find(|f| f.matches(&method, &path))
            .map(|f| {
                f.remaining -= 1;
                f.kind
            });
        state.faults.retain(|f| f.remaining > 0);
        let mut record = RequestRecord {
            method: method.clone(),
            path: path.clone(),
            query: query_str.clone(),
            status: 0,
            changed: false,
        };
        match fault {
            Some(FaultKind::Hang) => {
                state.log.push(record);
                return None;
            }
            Some(FaultKind::Timeout) => {
                state.log.push(record);
                return Some(Err(kube::Error::Service(
                    "injected fault: request timed out".into(),
                )));
            }
            Some(FaultKind::Status(code)) => {
                record.status = code;
                state.log.push(record);
                let err = ApiError {
                    code,
                    reason: match code {
                        409 => "Conflict",
                        429 => "TooManyRequests",
                        500 => "InternalError",
                        503 => "ServiceUnavailable",
                        _ => "InjectedFault",
                    },
                    message: format!("injected fault: HTTP {code}"),
                };
                return Some(Ok(error_response(&err)));
            }
            None => {}
        }

        let query = Query::parse(&query_str);
        let result = match Route::parse(&path) {
            None => Err(ApiError::not_found("path", &path)),
            Some(route) => self.route(&mut state, &method, &route, &query, &content_type, parsed),
        };
        let response = match result {
            Ok(Answer::Json {
                code,
                body,
                changes,
                changed,
            }) => {
                record.status = code;
                record.changed = changed;
                Self::dispatch(&mut state, &changes);
                full_response(code, body)
            }
            Ok(Answer::Watch(rx, timeout)) => {
                record.status = 200;
                let stream = rx
                    .map(|b| Ok::<_, Infallible>(http_body::Frame::data(b)))
                    .take_until(tokio::time::sleep(timeout));
                Response::builder()
                    .status(200)
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .body(BodyExt::boxed_unsync(StreamBody::new(stream)))
                    .expect("valid response")
            }
            Err(e) => {
                record.status = e.code;
                error_response(&e)
            }
        };
        state.log.push(record);
        Some(Ok(response))
    }

    fn route(
        &self,
        state: &mut State,
        method: &Method,
        route: &Route,
        query: &Query,
        content_type: &str,
        body: Result<Value, String>,
    ) -> Result<Answer, ApiError> {
        let store = &mut state.store;
        let ns = route.namespace.as_deref().unwrap_or_default();
        let key: ResourceKey = Store::key(&route.resource);
        let mut changes = vec![];
        let sub = match route.subresource.as_deref() {
            None => Subresource::Main,
            Some("status") => Subresource::Status,
            Some(other) => return Err(ApiError::not_found("subresource", other)),
        };
        let json = |code: u16, obj: &Obj, changes: Vec<Change>, changed: bool| Answer::Json {
            code,
            body: obj.json.clone(),
            changes,
            changed,
        };
        match (method.clone(), route.name.as_deref()) {
            (Method::GET, None) => {
                let selector =
                    Selector::parse(query.get("labelSelector"), query.get("fieldSelector"))
                        .map_err(ApiError::bad_request)?;
                if query.flag("watch") {
                    let from = query.get("resourceVersion").unwrap_or("0");
                    let timeout = query
                        .get("timeoutSeconds")
                        .and_then(|s| s.parse().ok())
                        .map(Duration::from_secs)
                        .unwrap_or(Duration::from_secs(1800));
                    let (tx, rx) = mpsc::unbounded();
                    let watcher = Watcher {
                        resource: key.clone(),
                        namespace: route.namespace.clone(),
                        selector: selector.clone(),
                        tx,
                    };
                    let from: u64 = from.parse().unwrap_or(0);
                    if from == 0 {
                        for obj in store.list(&key, route.namespace.as_deref(), &selector) {
                            let _ = watcher.tx.unbounded_send(event_line("ADDED", &obj.json));
                        }
                    } else if from < store.history_floor() {
                        let gone = ApiError {
                            code: 410,
                            reason: "Expired",
                            message: format!(
                                "too old resource version: {from} ({})",
                                store.history_floor()
                            ),
                        };
                        let status = serde_json::to_vec(&gone.status_json()).expect("serializes");
                        let _ = watcher.tx.unbounded_send(event_line("ERROR", &status));
                        return Ok(Answer::Watch(rx, timeout));
                    } else {
                        for change in store.history_since(from) {
                            if let Some(line) = watch_line(&watcher, change) {
                                let _ = watcher.tx.unbounded_send(line);
                            }
                        }
                    }
                    state.watchers.push(watcher);
                    return Ok(Answer::Watch(rx, timeout));
                }
                let mut items = store.list(&key, route.namespace.as_deref(), &selector);
                if let Some(token) = query.get("continue") {
                    let (c_ns, c_name) = token.split_once('/').unwrap_or(("", token));
                    items.retain(|o| (o.namespace.as_str(), o.name.as_str()) > (c_ns, c_name));
                }
                let limit = query
                    .get("limit")
                    .and_then(|l| l.parse::<usize>().ok())
                    .filter(|l| *l > 0);
                let mut next = None;
                if let Some(limit) = limit {
                    if items.len() > limit {
                        items.truncate(limit);
                        next = items.last().map(|o| format!("{}/{}", o.namespace, o.name));
                    }
                }
                let (api_version, kind) = store
                    .kind_of(&key)
                    .cloned()
                    .unwrap_or_else(|| (route.api_version.clone(), "List".into()));
                let mut meta =
                    serde_json::json!({"resourceVersion": store.resource_version().to_string()});
                if let Some(next) = next {
                    meta["continue"] = Value::String(next);
                }
                let mut out =
                    Vec::with_capacity(items.iter().map(|o| o.json.len() + 1).sum::<usize>() + 256);
                out.extend_from_slice(
                    format!(
                        r#"{{"apiVersion":{},"kind":{},"metadata":{},"items":["#,
                        Value::String(api_version),
                        Value::String(format!("{kind}List")),
                        meta
                    )
                    .as_bytes(),
                );
                for (i, o) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    out.extend_from_slice(&o.json);
                }
                out.extend_from_slice(b"]}");
                Ok(Answer::Json {
                    code: 200,
                    body: Bytes::from(out),
                    changes,
                    changed: false,
                })
            }
            (Method::GET, Some(name)) => {
                let obj = store
                    .get(&key, ns, name)
                    .ok_or_else(|| ApiError::not_found(&key, name))?;
                Ok(json(200, &obj, changes, false))
            }
            (Method::POST, None) => {
                let value = body.map_err(ApiError::bad_request)?;
                if query.get("dryRun").is_some() {
                    return Err(ApiError::bad_request(
                        "dryRun is not supported by the in-memory API",
                    ));
                }
                let w = store.create(&key, ns, value, &mut changes)?;
                Ok(json(201, &w.obj, changes, true))
            }
            (Method::PUT, Some(name)) => {
                let value = body.map_err(ApiError::bad_request)?;
                let w = store.update(&key, ns, name, sub, value, &mut changes)?;
                Ok(json(200, &w.obj, changes, w.changed))
            }
            (Method::PATCH, Some(name)) => {
                let kind = match content_type.split(';').next().unwrap_or_default().trim() {
                    "application/apply-patch+yaml" => PatchKind::Apply {
                        force: query.flag("force"),
                    },
                    "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
                        PatchKind::Merge
                    }
                    "application/json-patch+json" => PatchKind::Json,
                    other => {
                        return Err(ApiError {
                            code: 415,
                            reason: "UnsupportedMediaType",
                            message: format!(
                                "the body of the request was in an unknown format: {other}"
                            ),
                        })
                    }
                };
                let existed = store.get(&key, ns, name).is_some();
                let w = store.patch(
                    &key,
                    ns,
                    name,
                    sub,
                    kind,
                    query.get("fieldManager"),
                    body.map_err(ApiError::bad_request)?,
                    &mut changes,
                )?;
                Ok(json(
                    if existed { 200 } else { 201 },
                    &w.obj,
                    changes,
                    w.changed,
                ))
            }
            (Method::DELETE, Some(name)) => {
                let opts = body.map_err(ApiError::bad_request)?;
                let policy = query
                    .get("propagationPolicy")
                    .map(str::to_string)
                    .or_else(|| opts["propagationPolicy"].as_str().map(str::to_string));
                let orphan = policy.as_deref() == Some("Orphan")
                    || opts["orphanDependents"] == Value::Bool(true);
                let uid = opts["preconditions"]["uid"].as_str();
                let obj = store.delete(&key, ns, name, uid, orphan, &mut changes)?;
                Ok(json(200, &obj, changes, true))
            }
            (m, _) => Err(ApiError {
                code: 405,
                reason: "MethodNotAllowed",
                message: format!("{m} is not supported here"),
            }),
        }
    }
}

enum Answer {
    Json {
        code: u16,
        body: Bytes,
        changes: Vec<Change>,
        changed: bool,
    },
    Watch(mpsc::UnboundedReceiver<Bytes>, Duration),
}

fn full_response(code: u16, body: Bytes) -> Response<ResponseBody> {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(BodyExt::boxed_unsync(Full::new(body)))
        .expect("valid response")
}

fn error_response(e: &ApiError) -> Response<ResponseBody> {
    full_response(
        e.code,
        Bytes::from(serde_json::to_vec(&e.status_json()).expect("serializes")),
    )
}

fn event_line(kind: &str, object: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(object.len() + 32);
    out.extend_from_slice(format!(r#"{{"type":"{kind}","object":"#).as_bytes());
    out.extend_from_slice(object);
    out.extend_from_slice(b"}\n");
    Bytes::from(out)
}

/// The event a watcher sees for a change: objects entering its selector are ADDED, leaving it DELETED.
fn watch_line(w: &Watcher, change: &Change) -> Option<Bytes> {
    if w.resource != change.resource {
        return None;
    }
    let in_scope = |o: &Option<Arc<Obj>>| -> Option<Arc<Obj>> {
        o.as_ref()
            .filter(|o| w.namespace.as_deref().is_none_or(|n| n == o.namespace))
            .filter(|o| w.selector.matches(o))
            .cloned()
    };
    match (in_scope(&change.old), in_scope(&change.new)) {
        (None, Some(new)) => Some(event_line("ADDED", &new.json)),
        (Some(_), Some(new)) => Some(event_line("MODIFIED", &new.json)),
        (Some(old), None) => {
            let last = change.new.as_ref().unwrap_or(&old);
            Some(event_line("DELETED", &last.json))
        }
        (None, None) => None,
    }
}

/// A request path split into what the store needs.
#[derive(Debug, PartialEq, Eq)]
struct Route {
    /// `v1` or `apps/v1`.
    api_version: String,
    /// `v1/configmaps`, `apps/v1/statefulsets`.
    resource: String,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

impl Route {
    fn parse(path: &str) -> Option<Route> {
        let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (api_version, rest) = match segs.as_slice() {
            ["api", v, rest @ ..] => (v.to_string(), rest),
            ["apis", g, v, rest @ ..] => (format!("{g}/{v}"), rest),
            _ => return None,
        };
        let (namespace, rest) = match rest {
            ["namespaces", ns, plural, rest @ ..] => {
                (Some(ns.to_string()), [&[*plural][..], rest].concat())
            }
            other => (None, other.to_vec()),
        };
        let (plural, name, subresource) = match rest.as_slice() {
            [plural] => (plural, None, None),
            [plural, name] => (plural, Some(name.to_string()), None),
            [plural, name, sub] => (plural, Some(name.to_string()), Some(sub.to_string())),
            _ => return None,
        };
        Some(Route {
            resource: format!("{api_version}/{plural}"),
            api_version,
            namespace,
            name,
            subresource,
        })
    }
}

struct Query(Vec<(String, String)>);

impl Query {
    fn parse(q: &str) -> Query {
        Query(form_urlencoded::parse(q.as_bytes()).into_owned().collect())
    }
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
    fn flag(&self, key: &str) -> bool {
        matches!(self.get(key), Some("true" | "1"))
    }
}

impl tower::Service<Request<kube::client::Body>> for ApiServer {
    type Response = Response<ResponseBody>;
    type Error = kube::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<kube::client::Body>) -> Self::Future {
        Box::pin(self.clone().serve(req))
    }
}

#[cfg(test)]
mod tests;
