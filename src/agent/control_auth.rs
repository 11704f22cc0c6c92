//! Who may pause a store. Whoever reaches the control port can hold a store's mail, so the NetworkPolicy
//! that admits only the LUN's jobs and the operator is not enough on its own (a cluster may not enforce
//! NetworkPolicies): every control request carries `Authorization: Bearer <token>`, the token of the LUN's
//! control Secret (`<lun>-control`, key `token`), which the operator creates with a random value and
//! mounts in the store pods and the snapshot jobs.
//!
//! The token is read from its file on each request, so a Secret the kubelet mounts after start-up (or
//! replaces) takes effect at once. With no token file yet, every request is refused: the port fails
//! closed.

use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

/// The file the LUN's control token is mounted at.
#[derive(Clone, Debug)]
pub struct ControlToken {
    pub file: PathBuf,
}

/// Why a control request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The token file is missing or empty: nobody is admitted.
    NoToken,
    /// No `Authorization: Bearer` header, or another token.
    WrongToken,
}

impl ControlToken {
    fn current(&self) -> Option<Vec<u8>> {
        let text = std::fs::read(&self.file).ok()?;
        let token = text.trim_ascii().to_vec();
        (!token.is_empty()).then_some(token)
    }

    /// Checks an `Authorization` header value against the current token, in constant time.
    pub fn check(&self, authorization: Option<&[u8]>) -> Result<(), Refusal> {
        let expected = self.current().ok_or(Refusal::NoToken)?;
        let given = authorization
            .and_then(|v| v.strip_prefix(b"Bearer "))
            .map(|t| t.trim_ascii())
            .ok_or(Refusal::WrongToken)?;
        if bool::from(given.ct_eq(&expected)) {
            Ok(())
        } else {
            Err(Refusal::WrongToken)
        }
    }
}

/// Middleware for the control router: passes only requests with the current token.
pub async fn require_token(
    State(token): State<Arc<ControlToken>>,
    request: Request,
    next: Next,
) -> Response {
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    match token.check(authorization) {
        Ok(()) => next.run(request).await,
        Err(Refusal::NoToken) => {
            tracing::warn!(file = %token.file.display(), "control request refused: no control token mounted");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "no control token is mounted yet; nothing is admitted\n",
            )
                .into_response()
        }
        Err(Refusal::WrongToken) => {
            tracing::warn!("control request refused: missing or wrong bearer token");
            (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                "a control request needs the LUN's control token\n",
            )
                .into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token_in(dir: &tempfile::TempDir, content: Option<&str>) -> ControlToken {
        let file = dir.path().join("token");
        if let Some(c) = content {
            std::fs::write(&file, c).unwrap();
        }
        ControlToken { file }
    }

    #[test]
    fn only_the_current_token_is_admitted() {
        let dir = tempfile::tempdir().unwrap();
        let token = token_in(&dir, Some("s3cret\n"));
        assert_eq!(token.check(Some(b"Bearer s3cret")), Ok(()));
        assert_eq!(token.check(Some(b"Bearer s3cre")), Err(Refusal::WrongToken));
        assert_eq!(token.check(Some(b"s3cret")), Err(Refusal::WrongToken));
        assert_eq!(token.check(None), Err(Refusal::WrongToken));
        // A replaced Secret takes effect on the next request.
        std::fs::write(&token.file, "rotated").unwrap();
        assert_eq!(
            token.check(Some(b"Bearer s3cret")),
            Err(Refusal::WrongToken)
        );
        assert_eq!(token.check(Some(b"Bearer rotated")), Ok(()));
    }

    #[test]
    fn without_a_token_nobody_is_admitted() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            token_in(&dir, None).check(Some(b"Bearer ")),
            Err(Refusal::NoToken)
        );
        assert_eq!(
            token_in(&dir, Some(" \n")).check(Some(b"Bearer ")),
            Err(Refusal::NoToken)
        );
    }
}
