//! `loadtest`: see the library ([`gateway_loadtest`]) and docs/LOADTEST.md.

use std::process::ExitCode;

fn main() -> ExitCode {
    match gateway_loadtest::cli::main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("loadtest: {e:#}");
            ExitCode::from(1)
        }
    }
}
