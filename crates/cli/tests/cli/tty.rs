//! Commands on a real pseudo-terminal (util-linux's `script`), for what batchdb
//! draws only there: the progress line, colour, the readable `status`.

use std::process::Command;

use crate::util::{BIN, DEADLINE, Env, text};

impl Env {
    /// Runs `batchdb --dir DB ARGS... > STDOUT_FILE` with stdin, stderr (and, without a
    /// redirection, stdout) on a pseudo-terminal; returns what the terminal showed.
    pub fn on_terminal(&self, args: &str, stdout_file: Option<&str>) -> String {
        self.on_terminal_with(args, stdout_file, &[])
    }

    /// [`Env::on_terminal`] with environment variables `vars` set.
    pub fn on_terminal_with(
        &self,
        args: &str,
        stdout_file: Option<&str>,
        vars: &[(&str, &str)],
    ) -> String {
        let env = self;
        let quote = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
        let db = env.db_dir();
        let mut line = format!(
            "{} --dir {} {args}",
            quote(BIN),
            quote(&db.to_string_lossy())
        );
        if let Some(f) = stdout_file {
            line.push_str(&format!(" > {}", quote(f)));
        }
        let mut script = Command::new("script");
        script
            .args([
                "--quiet",
                "--return",
                "--flush",
                "--command",
                &line,
                "/dev/null",
            ])
            .current_dir(env.root())
            .envs(vars.iter().copied());
        let out = env.output_within(script, None, DEADLINE);
        assert!(
            out.status.success(),
            "{line} on a terminal exited with {}:\n{}",
            out.status,
            text(&out.stdout)
        );
        text(&out.stdout)
    }
}
