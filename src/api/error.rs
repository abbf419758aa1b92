//! API errors: one type that every handler returns, rendered as an HTTP status and an
//! [`ErrorBody`](super::types::ErrorBody).

use super::types::{ErrorBody, ErrorDetail};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use basalt_config::ConfigError;

/// Why an API call failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No token, or a wrong one.
    #[error("missing or invalid API token")]
    Unauthorized,
    /// The named object does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request is malformed or asks for something impossible.
    #[error("{0}")]
    BadRequest(String),
    /// The request conflicts with existing state (a name taken, a path in use).
    #[error("{0}")]
    Conflict(String),
    /// A configuration document was refused; nothing was changed.
    #[error("configuration refused, nothing was changed")]
    InvalidConfig(Vec<ConfigError>),
    /// The appliance failed; details are in the daemon's log.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    fn code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ApiError::InvalidConfig(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_config"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl From<basalt_config::StoreError> for ApiError {
    fn from(e: basalt_config::StoreError) -> Self {
        match e {
            basalt_config::StoreError::Conflict(msg) => ApiError::Conflict(msg),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.code();
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(error = %self, "API call failed");
        }
        let details = match &self {
            ApiError::InvalidConfig(errors) => errors
                .iter()
                .map(|e| ErrorDetail {
                    line: e.line,
                    column: e.column,
                    message: e.message.clone(),
                })
                .collect(),
            _ => Vec::new(),
        };
        let body = ErrorBody {
            error: code.to_string(),
            message: self.to_string(),
            details,
        };
        let mut response = (status, Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}
