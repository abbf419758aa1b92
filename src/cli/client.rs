//! The CLI's connection to the daemon: HTTP over the unix socket in the data directory
//! (the default), or HTTPS to `--url`, with the admin token as a bearer token.
//!
//! A small hyper client rather than a general one: the CLI makes one request per run,
//! and no maintained client crate speaks both unix sockets and rustls with a pinned
//! self-signed certificate without pulling in a second TLS stack.

use crate::api::types::ErrorBody;
use crate::daemon::{security, SOCKET_FILE};
use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde::de::DeserializeOwned;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};

enum Endpoint {
    Unix(PathBuf),
    Https {
        authority: String,
        server_name: ServerName<'static>,
        tls: tokio_rustls::TlsConnector,
    },
}

/// A client of one daemon.
pub struct Client {
    endpoint: Endpoint,
    token: String,
}

/// An error answer from the daemon.
#[derive(Debug)]
pub struct ApiFailure {
    /// HTTP status.
    pub status: StatusCode,
    /// The decoded body.
    pub body: ErrorBody,
}

impl std::fmt::Display for ApiFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.body.message)?;
        if self.status.is_server_error() {
            write!(f, " (HTTP {}; the daemon's log has details)", self.status)?;
        }
        for d in &self.body.details {
            match (d.line, d.column) {
                (Some(l), Some(c)) => write!(f, "\n  line {l}, column {c}: {}", d.message)?,
                (Some(l), None) => write!(f, "\n  line {l}: {}", d.message)?,
                _ => write!(f, "\n  {}", d.message)?,
            }
        }
        Ok(())
    }
}

impl std::error::Error for ApiFailure {}

impl Client {
    /// Connects through the unix socket of `data_dir`, or to `url` when given.
    pub fn new(
        data_dir: &Path,
        url: Option<&str>,
        token: Option<String>,
        ca_cert: Option<&Path>,
    ) -> Result<Client> {
        let token = match token {
            Some(t) => t,
            None => {
                let path = data_dir.join(security::TOKEN_FILE);
                std::fs::read_to_string(&path)
                    .with_context(|| {
                        format!(
                            "cannot read the API token {} (is the daemon set up on this data directory? \
                             use --data-dir, or --token with --url)",
                            path.display()
                        )
                    })?
                    .trim()
                    .to_string()
            }
        };
        let endpoint = match url {
            None => Endpoint::Unix(data_dir.join(SOCKET_FILE)),
            Some(url) => {
                let rest = url
                    .strip_prefix("https://")
                    .ok_or_else(|| anyhow!("--url must start with https://"))?;
                let authority = rest.trim_end_matches('/').to_string();
                let host = host_of(&authority);
                let server_name = ServerName::try_from(host.to_string())
                    .map_err(|_| anyhow!("bad host in --url: {host}"))?;
                let ca = ca_cert
                    .map(Path::to_path_buf)
                    .unwrap_or_else(|| data_dir.join(security::TLS_DIR).join(security::CERT_FILE));
                let mut roots = rustls::RootCertStore::empty();
                for cert in CertificateDer::pem_file_iter(&ca).with_context(|| {
                    format!(
                        "cannot read CA certificate {} (give --ca-cert)",
                        ca.display()
                    )
                })? {
                    roots
                        .add(cert.with_context(|| format!("bad certificate in {}", ca.display()))?)
                        .context("unusable CA certificate")?;
                }
                let provider = Arc::new(rustls::crypto::ring::default_provider());
                let config = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .context("TLS protocol versions")?
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                Endpoint::Https {
                    authority,
                    server_name,
                    tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
                }
            }
        };
        Ok(Client { endpoint, token })
    }

    /// Sends one request; returns the status and body of any answer.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
    ) -> Result<(StatusCode, Bytes)> {
        let (authority, content_type, payload) = match (&self.endpoint, body) {
            (Endpoint::Unix(_), b) => (
                "localhost".to_string(),
                b.as_ref().map(|b| b.0.to_string()),
                b.map(|b| b.1),
            ),
            (Endpoint::Https { authority, .. }, b) => (
                authority.clone(),
                b.as_ref().map(|b| b.0.to_string()),
                b.map(|b| b.1),
            ),
        };
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, authority)
            .header(
                hyper::header::AUTHORIZATION,
                format!("Bearer {}", self.token),
            );
        if let Some(ct) = content_type {
            builder = builder.header(hyper::header::CONTENT_TYPE, ct);
        }
        let request = builder.body(Full::new(Bytes::from(payload.unwrap_or_default())))?;
        match &self.endpoint {
            Endpoint::Unix(socket) => {
                let stream = tokio::net::UnixStream::connect(socket).await.with_context(|| {
                    format!(
                        "cannot reach the daemon at {} (is `basalt serve` running on this data directory?)",
                        socket.display()
                    )
                })?;
                exchange(stream, request).await
            }
            Endpoint::Https {
                authority,
                server_name,
                tls,
            } => {
                let tcp = tokio::net::TcpStream::connect(authority.as_str())
                    .await
                    .with_context(|| format!("cannot connect to {authority}"))?;
                let stream = tls
                    .connect(server_name.clone(), tcp)
                    .await
                    .with_context(|| format!("TLS with {authority} failed"))?;
                exchange(stream, request).await
            }
        }
    }

    /// Sends a request and decodes a JSON answer, turning error answers into errors.
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
    ) -> Result<T> {
        let bytes = self.call_raw(method, path, body).await?;
        serde_json::from_slice(&bytes).context("the daemon's answer does not decode")
    }

    /// Sends a request and returns the body of a successful answer.
    pub async fn call_raw(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
    ) -> Result<Bytes> {
        let (status, bytes) = self.send(method, path, body).await?;
        if status.is_success() {
            return Ok(bytes);
        }
        match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(body) => Err(ApiFailure { status, body }.into()),
            Err(_) => bail!(
                "the daemon answered {status}: {}",
                String::from_utf8_lossy(&bytes)
            ),
        }
    }
}

fn host_of(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    authority.rsplit_once(':').map_or(authority, |(h, _)| h)
}

async fn exchange<S>(stream: S, request: Request<Full<Bytes>>) -> Result<(StatusCode, Bytes)>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("HTTP handshake with the daemon failed")?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let response = sender
        .send_request(request)
        .await
        .context("the request to the daemon failed")?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .context("reading the daemon's answer failed")?
        .to_bytes();
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::host_of;

    #[test]
    fn hosts() {
        assert_eq!(host_of("localhost:8443"), "localhost");
        assert_eq!(host_of("[::1]:8443"), "::1");
        assert_eq!(host_of("10.0.0.1:1"), "10.0.0.1");
    }
}
