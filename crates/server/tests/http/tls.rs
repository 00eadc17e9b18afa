//! HTTPS: a server given a certificate (made here with a private CA) answers clients
//! that trust that CA, is refused by clients that do not, does not answer plain
//! HTTP, closes a connection that never does its handshake after the header
//! timeout, and `TlsConfig::from_pem_files` names the file and what is wrong with it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use batchdb_server::{Limits, ServeOptions, TlsConfig};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::util::*;

/// A certificate authority made for one test.
struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    /// A self-signed root CA.
    fn root(name: &str) -> Ca {
        let params = ca_params(name);
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA certificate");
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// An intermediate CA signed by this one.
    fn intermediate(&self, name: &str) -> Ca {
        let mut params = ca_params(name);
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().expect("intermediate key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("intermediate certificate");
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A server certificate for `localhost` and 127.0.0.1 signed by this CA: (its
    /// PEM, its private key's PEM).
    fn server(&self) -> (String, String) {
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .expect("names");
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        params.use_authority_key_identifier_extension = true;
        params.key_usages.push(KeyUsagePurpose::DigitalSignature);
        params
            .extended_key_usages
            .push(ExtendedKeyUsagePurpose::ServerAuth);
        let key = KeyPair::generate().expect("server key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("server certificate");
        (cert.pem(), key.serialize_pem())
    }
}

fn ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("no names");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
    ];
    params
}

/// Writes `text` to `dir/name`; its path.
fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write PEM file");
    path
}

/// A client that trusts only the CA in `ca_pem`.
fn client(ca_pem: &str) -> reqwest13::Client {
    let ca = reqwest13::Certificate::from_pem(ca_pem.as_bytes()).expect("CA PEM");
    reqwest13::Client::builder()
        .tls_certs_only([ca])
        .timeout(DEADLINE)
        .build()
        .expect("client")
}

/// A server over TLS with the certificate chain `cert_pem` and the key `key_pem`,
/// its connections timed out after `timeout`.
async fn tls_server(cert_pem: &str, key_pem: &str, timeout: Duration) -> Server {
    let dir = tempfile::tempdir().expect("temp dir");
    let cert = write(dir.path(), "cert.pem", cert_pem);
    let key = write(dir.path(), "key.pem", key_pem);
    let tls = TlsConfig::from_pem_files(&cert, &key).expect("TLS config");
    Server::with(ServeOptions {
        tls: Some(tls),
        limits: Limits::new((64, 8), timeout, timeout),
        ..ServeOptions::default()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_answers_a_client_that_trusts_the_ca_and_refuses_others() {
    let ca = Ca::root("batchdb test CA");
    let (cert, key) = ca.server();
    let s = tls_server(&cert, &key, Duration::from_secs(30)).await;
    let port = s.addr.port();
    let trusting = client(&ca.pem);
    for host in ["localhost", "127.0.0.1"] {
        let r = trusting
            .get(format!("https://{host}:{port}/healthz"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET https://{host}:{port}/healthz: {e:?}"));
        assert_eq!(r.status(), 200, "{host}");
        assert_eq!(r.version(), reqwest13::Version::HTTP_11);
    }
    // A request that does something goes through as well.
    let r = trusting
        .post(format!("https://localhost:{port}/create"))
        .body("echo over tls")
        .send()
        .await
        .expect("POST /create");
    assert_eq!(r.status(), 200);
    assert_eq!(s.db.counts().await.expect("counts").pending, 1);
    // An event stream, written outside the HTTP library, is encrypted the same way.
    let mut r = trusting
        .get(format!("https://localhost:{port}/events"))
        .send()
        .await
        .expect("GET /events");
    assert_eq!(r.status(), 200);
    let mut got = String::new();
    while !got.contains(r#""event":"push""#) {
        let chunk = r.chunk().await.expect("read the stream").expect("open");
        got.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(got.contains(r#""event":"create""#), "{got}");
    drop(r);

    // A client that trusts another CA does not get through.
    let other = Ca::root("some other CA");
    let e = client(&other.pem)
        .get(format!("https://localhost:{port}/healthz"))
        .send()
        .await
        .expect_err("a client trusting another CA is refused");
    assert!(e.is_connect(), "{e:?}");

    // Plain HTTP on the TLS port gets no HTTP answer.
    let plain = reqwest13::Client::builder()
        .timeout(DEADLINE)
        .build()
        .expect("client");
    let r = plain
        .get(format!("http://localhost:{port}/healthz"))
        .send()
        .await;
    assert!(r.is_err(), "plain HTTP on the TLS port answered: {r:?}");

    // The server still answers after all that.
    let r = trusting
        .get(format!("https://localhost:{port}/healthz"))
        .send()
        .await
        .expect("GET /healthz again");
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_a_chain_through_an_intermediate_ca() {
    let root = Ca::root("batchdb test root");
    let intermediate = root.intermediate("batchdb test intermediate");
    let (cert, key) = intermediate.server();
    // The server's certificate first, then the intermediate; clients know the root.
    let chain = format!("{cert}{}", intermediate.pem);
    let s = tls_server(&chain, &key, Duration::from_secs(30)).await;
    let r = client(&root.pem)
        .get(format!("https://localhost:{}/healthz", s.addr.port()))
        .send()
        .await
        .expect("GET /healthz through the chain");
    assert_eq!(r.status(), 200);
    // Without the intermediate in the file, a client knowing only the root cannot
    // build the chain.
    let s = tls_server(&cert, &key, Duration::from_secs(30)).await;
    let e = client(&root.pem)
        .get(format!("https://localhost:{}/healthz", s.addr.port()))
        .send()
        .await
        .expect_err("no chain without the intermediate");
    assert!(e.is_connect(), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_does_its_handshake_is_closed_after_the_header_timeout() {
    let ca = Ca::root("batchdb test CA");
    let (cert, key) = ca.server();
    let s = tls_server(&cert, &key, Duration::from_secs(1)).await;
    let started = Instant::now();
    let mut silent = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    // One that starts a handshake and stalls is closed the same way.
    let mut stalled = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    stalled.write_all(&[0x16, 0x03, 0x01, 0x02]).await.unwrap();
    for c in [&mut silent, &mut stalled] {
        let mut buf = Vec::new();
        let read = tokio::time::timeout(DEADLINE, c.read_to_end(&mut buf))
            .await
            .expect("the server closes the connection");
        // Closed, with nothing sent (or a TLS alert at most, never HTTP).
        assert!(
            read.is_err() || !String::from_utf8_lossy(&buf).contains("HTTP"),
            "{buf:?}"
        );
    }
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(900), "{waited:?}");
    assert!(waited < Duration::from_secs(10), "{waited:?}");
    // The server still answers.
    let r = client(&ca.pem)
        .get(format!("https://localhost:{}/healthz", s.addr.port()))
        .send()
        .await
        .expect("GET /healthz");
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_in_progress_count_against_the_connection_cap_as_idle_connections() {
    let ca = Ca::root("batchdb test CA");
    let (cert, key) = ca.server();
    let dir = tempfile::tempdir().expect("temp dir");
    let tls = TlsConfig::from_pem_files(
        &write(dir.path(), "cert.pem", &cert),
        &write(dir.path(), "key.pem", &key),
    )
    .expect("TLS config");
    // A cap of 4 and a header timeout longer than the test: only evicting the
    // silent connections lets a real client in.
    let s = Server::with(ServeOptions {
        tls: Some(tls),
        limits: Limits::new((4, 4), Duration::from_secs(60), Duration::from_secs(60)),
        ..ServeOptions::default()
    })
    .await;
    let mut silent = Vec::new();
    for _ in 0..12 {
        silent.push(tokio::net::TcpStream::connect(s.addr).await.unwrap());
    }
    let r = client(&ca.pem)
        .get(format!("https://localhost:{}/healthz", s.addr.port()))
        .send()
        .await
        .expect("GET /healthz past a flood of silent connections");
    assert_eq!(r.status(), 200);
    // The oldest silent connections were closed to make room.
    let mut closed = 0;
    for c in &mut silent {
        let mut buf = [0u8; 64];
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_millis(200), c.read(&mut buf)).await
        {
            closed += 1;
        }
    }
    assert!(closed >= 8, "{closed} of 12 silent connections closed");
}

#[test]
fn from_pem_files_names_the_file_and_what_is_wrong() {
    let ca = Ca::root("batchdb test CA");
    let (cert, key) = ca.server();
    let (_, other_key) = ca.server();
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path();
    let cert_file = write(d, "cert.pem", &cert);
    let key_file = write(d, "key.pem", &key);
    let other_key_file = write(d, "other-key.pem", &other_key);
    let garbage = write(d, "garbage.pem", "not a PEM file\n");
    let broken = write(
        d,
        "broken.pem",
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    );
    let missing = d.join("missing.pem");
    TlsConfig::from_pem_files(&cert_file, &key_file).expect("a good pair loads");
    // The cert file may also hold the key: other sections are skipped.
    let both = write(d, "both.pem", &format!("{key}{cert}"));
    TlsConfig::from_pem_files(&both, &both).expect("one file with both");

    let err = |cert: &Path, key: &Path| {
        TlsConfig::from_pem_files(cert, key)
            .expect_err("a bad pair is refused")
            .to_string()
    };
    let cases: [(&Path, &Path, &str, &Path, &str); 6] = [
        (&missing, &key_file, "tls-cert", &missing, "no such file"),
        (&cert_file, &missing, "tls-key", &missing, "no such file"),
        (&garbage, &key_file, "tls-cert", &garbage, "no certificate"),
        (
            &cert_file,
            &cert_file,
            "tls-key",
            &cert_file,
            "no private key",
        ),
        (
            &cert_file,
            &broken,
            "tls-key",
            &broken,
            "not a usable private key",
        ),
        (
            &cert_file,
            &other_key_file,
            "tls-key",
            &other_key_file,
            "does not match the certificate",
        ),
    ];
    for (c, k, what, file, why) in cases {
        let msg = err(c, k);
        assert!(msg.contains(what), "{what}: {msg}");
        assert!(msg.contains(&*file.to_string_lossy()), "{file:?}: {msg}");
        assert!(msg.contains(why), "{why}: {msg}");
        assert!(!msg.contains('\n'), "one line: {msg}");
    }
}
