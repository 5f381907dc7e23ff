//! Hidden subcommands for packaging: shell completions and man pages generated from the clap
//! definition, so that they never disagree with the binary they ship with.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use clap::CommandFactory;

/// `egressd completions SHELL`: the completion script on stdout.
pub fn completions<C: CommandFactory>(shell: clap_complete::Shell) -> ExitCode {
    let mut cmd = C::command();
    clap_complete::generate(shell, &mut cmd, "egressd", &mut std::io::stdout());
    ExitCode::SUCCESS
}

/// `egressd man --out-dir DIR`: `egressd.1` and one page per visible subcommand
/// (`egressd-run.1`, `egressd-node-cordon.1`, ...).
pub fn man<C: CommandFactory>(out_dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    clap_mangen::generate_to(C::command(), out_dir)
        .with_context(|| format!("writing man pages to {}", out_dir.display()))
}
