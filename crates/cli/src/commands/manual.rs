//! `completions` and `man`: shell completion scripts and manual pages, generated from
//! the same clap definitions that parse the command line, so they never drift from it.
//! Neither opens a database.

use std::path::Path;

use clap::CommandFactory;

use super::*;

/// `completions SHELL`: the completion script on stdout.
pub(super) fn completions(shell: clap_complete::Shell) -> Result<ExitCode> {
    let mut cmd = Cli::command();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, "batchdb", &mut out);
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(&out)
        .and_then(|()| stdout.flush())
        .map_err(stdout_err)?;
    Ok(ExitCode::SUCCESS)
}

/// `man [DIR]`: `batchdb.1` on stdout, or it and one page per command
/// (`batchdb-add.1`, …) written into DIR, each one line `wrote PATH`.
pub(super) fn man(dir: Option<&Path>) -> Result<ExitCode> {
    let mut cmd = Cli::command();
    // Built, the subcommands carry the global options too.
    cmd.build();
    let Some(dir) = dir else {
        let mut stdout = std::io::stdout().lock();
        clap_mangen::Man::new(cmd)
            .render(&mut stdout)
            .and_then(|()| stdout.flush())
            .map_err(stdout_err)?;
        return Ok(ExitCode::SUCCESS);
    };
    std::fs::create_dir_all(dir).map_err(|e| Error::io("create directory", dir, e))?;
    let mut pages = vec![(String::from("batchdb"), cmd.clone())];
    for sub in cmd.get_subcommands() {
        // A subcommand's page is named and titled as a person types it.
        let name = format!("batchdb-{}", sub.get_name());
        pages.push((name.clone(), sub.clone().name(name)));
    }
    for (name, page) in pages {
        let path = dir.join(format!("{name}.1"));
        let mut bytes = Vec::new();
        clap_mangen::Man::new(page)
            .render(&mut bytes)
            .map_err(|e| Error::io("render manual page", &path, e))?;
        std::fs::write(&path, bytes).map_err(|e| Error::io("write", &path, e))?;
        line(format_args!("wrote {}", path.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}
