//! `serve`: the HTTP API and dashboard.

use super::*;

/// `batchdb serve`: the HTTP API and dashboard until SIGINT or SIGTERM.
pub(super) async fn serve(db: BatchDb, s: ServeArgs) -> Result<ExitCode> {
    for (what, t) in [("token", &s.token), ("worker-token", &s.worker_token)] {
        if t.as_deref().is_some_and(|t| t.trim().is_empty()) {
            return Err(Error::Config {
                what,
                value: String::new(),
                why: "empty; give a token or none".into(),
            });
        }
    }
    let limits = limits(&s)?;
    let prune_age = s
        .prune_after
        .as_deref()
        .map(|d| super::maint::duration("prune-after", d))
        .transpose()?;
    // A bad certificate or key stops here, before anything listens.
    let tls = match (&s.tls_cert, &s.tls_key) {
        (Some(cert), Some(key)) => Some(batchdb_server::TlsConfig::from_pem_files(cert, key)?),
        _ => None,
    };
    let listener = tokio::net::TcpListener::bind(&s.listen)
        .await
        .map_err(|e| Error::io("listen on", &s.listen, e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::io("read the address of", &s.listen, e))?;
    let opts = batchdb_server::ServeOptions {
        prefix: s.prefix,
        token: s.token,
        auth_reads: s.auth_reads,
        local_hosts_only: addr.ip().is_loopback(),
        limits,
        worker_token: s.worker_token,
        tls,
    };
    let prefix = opts.normalized_prefix()?;
    if opts.token.is_none() && !addr.ip().is_loopback() {
        eprintln!(
            "batchdb: warning: listening on {addr} without --token: anyone who can reach it can queue shell commands"
        );
    }
    if opts.tls.is_none() && !addr.ip().is_loopback() {
        eprintln!(
            "batchdb: warning: listening on {addr} without TLS (--tls-cert/--tls-key): tokens and payloads cross the network in clear text"
        );
    }
    let scheme = if opts.tls.is_some() { "https" } else { "http" };
    line(format_args!("listening on {scheme}://{addr}{prefix}/"))?;
    let shutdown = async {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) {
            (Ok(mut int), Ok(mut term)) => {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
            }
            _ => std::future::pending::<()>().await,
        }
    };
    let pruner = prune_age.map(|age| super::maint::prune_in_background(&db, age));
    let served = batchdb_server::serve(listener, db, opts, shutdown).await;
    if let Some(p) = pruner {
        p.abort();
    }
    served?;
    Ok(ExitCode::SUCCESS)
}

/// The connection limits `s` asks for, checked; the open-file limit is raised to
/// its hard limit so that they can be reached.
fn limits(s: &ServeArgs) -> Result<batchdb_server::Limits> {
    let at_least = |what: &'static str, n: usize, min: usize| {
        if n < min {
            return Err(Error::Config {
                what,
                value: n.to_string(),
                why: format!("expected at least {min}"),
            });
        }
        Ok(n)
    };
    let max_connections = at_least("max-connections", s.max_connections, 2)?;
    let max_streams = at_least("max-streams", s.max_streams, 1)?;
    let header = secs("header-timeout", s.header_timeout)?;
    let body = secs("body-timeout", s.body_timeout)?;
    for (what, d, v) in [
        ("header-timeout", header, s.header_timeout),
        ("body-timeout", body, s.body_timeout),
    ] {
        if d.is_zero() {
            return Err(Error::Config {
                what,
                value: v.to_string(),
                why: "expected more than 0 s".into(),
            });
        }
    }
    let files = raise_open_files();
    if files.is_some_and(|f| f < max_connections as u64 + 64) {
        eprintln!(
            "batchdb: warning: --max-connections {max_connections} is above what the open-file limit ({}) allows; accepting fails beyond it",
            files.unwrap_or_default()
        );
    }
    Ok(batchdb_server::Limits::new(
        (max_connections, max_streams),
        header,
        body,
    ))
}

/// Raises the soft open-file limit to the hard one; the limit now, if known.
fn raise_open_files() -> Option<u64> {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut l) != 0 {
            return None;
        }
        if l.rlim_cur < l.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: l.rlim_max,
                rlim_max: l.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raw const raised) == 0 {
                l.rlim_cur = l.rlim_max;
            }
        }
    }
    Some(l.rlim_cur)
}
