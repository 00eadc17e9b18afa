//! `serve`: the HTTP API and dashboard.

use super::*;

/// `batchdb serve`: the HTTP API and dashboard until SIGINT or SIGTERM.
pub(super) async fn serve(db: BatchDb, s: ServeArgs) -> Result<ExitCode> {
    if s.token.as_deref().is_some_and(|t| t.trim().is_empty()) {
        return Err(Error::Config {
            what: "token",
            value: String::new(),
            why: "empty; give a token or none".into(),
        });
    }
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
    };
    let prefix = opts.normalized_prefix()?;
    if opts.token.is_none() && !addr.ip().is_loopback() {
        eprintln!(
            "batchdb: warning: listening on {addr} without --token: anyone who can reach it can queue shell commands"
        );
    }
    line(format_args!("listening on http://{addr}{prefix}/"))?;
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
    batchdb_server::serve(listener, db, opts, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}
