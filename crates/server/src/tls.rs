//! TLS for `serve`: the certificate chain and private key it presents, loaded from
//! PEM files, and the handshake each accepted connection goes through first.
//!
//! rustls with the aws-lc-rs provider does the work; the server offers TLS 1.2 and
//! 1.3 and announces `http/1.1` through ALPN (it speaks nothing else).

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use batchdb::Error;
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls;

/// The certificate chain and private key that `serve` presents to its clients: a
/// shared [`rustls::ServerConfig`], cheap to clone.
#[derive(Clone)]
pub struct TlsConfig {
    config: Arc<rustls::ServerConfig>,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("alpn_protocols", &self.config.alpn_protocols)
            .finish_non_exhaustive()
    }
}

impl TlsConfig {
    /// Loads a certificate chain and its private key from PEM files.
    ///
    /// `cert` holds one or more `CERTIFICATE` sections: the server's own
    /// certificate first, then the intermediates that lead to a CA clients trust.
    /// `key` holds the private key of the first certificate, as PKCS#8
    /// (`PRIVATE KEY`), PKCS#1 (`RSA PRIVATE KEY`) or SEC1 (`EC PRIVATE KEY`); other
    /// sections in either file are skipped.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] naming the file (`tls-cert` or `tls-key`) and what is
    /// wrong with it: it cannot be read (missing, say), it holds no certificate or
    /// no private key, it is not valid PEM, its key is not usable, or the key does
    /// not match the certificate.
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<TlsConfig, Error> {
        let bad = |what: &'static str, path: &Path, why: String| Error::Config {
            what,
            value: path.display().to_string(),
            why,
        };
        let certs = read_certs(cert).map_err(|why| bad("tls-cert", cert, why))?;
        let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| {
            bad(
                "tls-key",
                key,
                pem_error(
                    e,
                    "no private key in it (expected a PEM PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY section)",
                ),
            )
        })?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        // Load the key on its own first, so that an unusable key is told apart
        // from one that does not match the certificate.
        provider
            .key_provider
            .load_private_key(key_der.clone_key())
            .map_err(|e| bad("tls-key", key, format!("not a usable private key: {e}")))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad("tls-cert", cert, format!("no usable TLS version: {e}")))?
            .with_no_client_auth()
            .with_single_cert(certs, key_der)
            .map_err(|e| match e {
                rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => bad(
                    "tls-key",
                    key,
                    format!(
                        "it does not match the certificate in {} (the first one there must be the server's own)",
                        cert.display()
                    ),
                ),
                e => bad("tls-cert", cert, format!("not a usable certificate: {e}")),
            })?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(TlsConfig::from_server_config(Arc::new(config)))
    }

    /// Uses a rustls configuration built elsewhere (client certificates, a
    /// certificate resolver, other protocol versions). Its ALPN protocols should
    /// be empty or offer `http/1.1`: the server speaks only HTTP/1.1.
    #[must_use]
    pub fn from_server_config(config: Arc<rustls::ServerConfig>) -> TlsConfig {
        TlsConfig { config }
    }

    /// The rustls configuration connections are accepted with.
    #[must_use]
    pub fn server_config(&self) -> &Arc<rustls::ServerConfig> {
        &self.config
    }

    /// The acceptor that does the server's side of the handshakes.
    pub(crate) fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config.clone())
    }
}

/// Every certificate in the PEM file at `path`, in order; why not, if none.
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    const NONE: &str = "no certificate in it (expected a PEM CERTIFICATE section)";
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| pem_error(e, NONE))?;
    if certs.is_empty() {
        return Err(NONE.into());
    }
    Ok(certs)
}

/// What a PEM error means for the user; `none` when the file holds nothing of the
/// kind sought.
fn pem_error(e: pem::Error, none: &str) -> String {
    match e {
        pem::Error::Io(e) if e.kind() == std::io::ErrorKind::NotFound => "no such file".into(),
        pem::Error::Io(e) => format!("cannot read it: {e}"),
        pem::Error::NoItemsFound => none.into(),
        e => format!("not valid PEM: {e}"),
    }
}

/// Does the server's side of the handshake on `stream`, within `timeout`; the
/// encrypted stream, or `None` (logged) when the client failed or was too slow.
pub(crate) async fn handshake(
    acceptor: &tokio_rustls::TlsAcceptor,
    stream: tokio::net::TcpStream,
    timeout: Duration,
) -> Option<tokio_rustls::server::TlsStream<tokio::net::TcpStream>> {
    match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
        Ok(Ok(s)) => Some(s),
        Ok(Err(e)) => {
            tracing::debug!("TLS handshake failed: {e}");
            None
        }
        Err(_) => {
            tracing::debug!("TLS handshake not done within {timeout:?}: closing");
            None
        }
    }
}
