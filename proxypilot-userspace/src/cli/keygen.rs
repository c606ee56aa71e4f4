//! `proxypilot keygen`: make a tokenizer key pair, or show the seal key of
//! an existing open key.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::tokenizer::OpenKey;

/// Create a tokenizer open key, or print the seal key of one.
///
/// The open (private) key is 32 random bytes in hex, written to FILE with
/// mode 0600; the matching seal (public) key is printed in hex on stdout.
/// Hand the seal key to whoever seals secrets (`proxypilot seal`); keep the
/// open key for `proxypilot tokenizer --open-key-file`.
#[derive(clap::Args, Debug)]
#[command(group = clap::ArgGroup::new("mode").required(true).args(["out", "show_seal_key"]))]
pub struct KeygenArgs {
    /// Write a new open key to FILE (created with mode 0600; never overwritten).
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,

    /// Print the seal key of the open key in FILE.
    #[arg(long, value_name = "FILE")]
    pub show_seal_key: Option<PathBuf>,
}

pub fn run(args: KeygenArgs) -> anyhow::Result<ExitCode> {
    run_to(args, &mut std::io::stdout().lock())
}

/// [`run`] writing to `out` (for tests).
pub fn run_to(args: KeygenArgs, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    let key = match (&args.out, &args.show_seal_key) {
        (Some(path), None) => {
            let key = OpenKey::generate();
            key.write_new_file(path)?;
            key
        }
        (None, Some(path)) => OpenKey::from_file(path)?,
        _ => anyhow::bail!("pass exactly one of --out FILE and --show-seal-key FILE"),
    };
    writeln!(out, "{}", key.seal_key().to_hex())?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: KeygenArgs,
    }

    #[test]
    fn keygen_then_show() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("pp-keygen-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("k");
        let _ = std::fs::remove_file(&p);
        let mut out = Vec::new();
        let a = T::try_parse_from(["x", "--out", p.to_str().unwrap()])
            .unwrap()
            .a;
        run_to(a, &mut out).unwrap();
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let seal = String::from_utf8(out).unwrap();
        assert_eq!(seal.trim().len(), 64);
        let mut out2 = Vec::new();
        let a = T::try_parse_from(["x", "--show-seal-key", p.to_str().unwrap()])
            .unwrap()
            .a;
        run_to(a, &mut out2).unwrap();
        assert_eq!(seal, String::from_utf8(out2).unwrap());
        assert!(T::try_parse_from(["x"]).is_err());
        assert!(T::try_parse_from(["x", "--out", "a", "--show-seal-key", "b"]).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
