//! The command's environment: proxypilot's own, so PATH, TERM, LANG and
//! the tools' settings keep working, minus everything that is a
//! credential proxypilot holds for it.
//!
//! Removed: every `--secret` variable (the command sees `dummy` instead),
//! every `--target` variable (sealed secrets), the `--tokenizer-auth-env`
//! variable, and any other variable whose value contains one of those
//! values. CA variables point at the run's bundle; HOME, USER and LOGNAME
//! match the identity the command runs as.

use std::{
    ffi::{OsStr, OsString},
    os::unix::ffi::OsStrExt,
    path::Path,
};

use super::{identity::Identity, trust, DUMMY};

/// What must not reach the command.
#[derive(Default)]
pub struct Withheld {
    /// Variables removed by name.
    pub names: Vec<String>,
    /// Values (real keys, sealed secrets, tokens) no variable may contain.
    pub values: Vec<String>,
    /// Variables set to [`DUMMY`] (the `--secret` ones).
    pub dummies: Vec<String>,
}

impl Withheld {
    fn hides(&self, name: &OsStr, value: &OsStr) -> bool {
        let name = name.to_string_lossy();
        self.names.iter().chain(&self.dummies).any(|n| *n == name)
            || trust::CA_VARS.contains(&name.as_ref())
            || self
                .values
                .iter()
                .filter(|v| !v.is_empty())
                .any(|v| contains(value.as_bytes(), v.as_bytes()))
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    memchr::memmem::find(haystack, needle).is_some()
}

/// Builds the environment from `parent` (proxypilot's own).
pub fn for_command(
    parent: impl IntoIterator<Item = (OsString, OsString)>,
    withheld: &Withheld,
    bundle: &Path,
    identity: &Identity,
    home: &Path,
) -> Vec<(OsString, OsString)> {
    let (user, home) = match identity {
        // Root of its own user namespace.
        Identity::Fresh { .. } => ("root".to_string(), home.to_path_buf()),
        Identity::User(r) => (r.name.clone(), r.home.clone()),
    };
    let mut env: Vec<(OsString, OsString)> = parent
        .into_iter()
        .filter(|(k, v)| {
            !withheld.hides(k, v) && !matches!(k.to_str(), Some("HOME" | "USER" | "LOGNAME"))
        })
        .collect();
    env.extend(
        withheld
            .dummies
            .iter()
            .map(|v| (OsString::from(v), OsString::from(DUMMY))),
    );
    env.extend(trust::env_for(bundle));
    env.push(("HOME".into(), home.into_os_string()));
    env.push(("USER".into(), user.clone().into()));
    env.push(("LOGNAME".into(), user.into()));
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        pairs.iter().map(|(k, v)| (k.into(), v.into())).collect()
    }

    #[test]
    fn credentials_are_withheld_and_the_rest_passes() {
        let withheld = Withheld {
            names: vec!["ANTHROPIC_SEALED".into(), "TOKENIZER_TOKEN".into()],
            values: vec!["sealed-blob".into(), "tok-123".into(), "sk-real".into()],
            dummies: vec!["ANTHROPIC_API_KEY".into()],
        };
        let env = for_command(
            vars(&[
                ("PATH", "/usr/bin"),
                ("TERM", "xterm"),
                ("ANTHROPIC_API_KEY", "sk-real"),
                ("ANTHROPIC_SEALED", "sealed-blob"),
                ("TOKENIZER_TOKEN", "tok-123"),
                ("COPY_OF_KEY", "Bearer sk-real"),
                ("OTHER_NAME", "sealed-blob"),
                ("SSL_CERT_FILE", "/etc/ssl/x.pem"),
                ("HOME", "/root"),
            ]),
            &withheld,
            Path::new("/tmp/b.pem"),
            &Identity::Fresh { uid: 7, gid: 7 },
            Path::new("/tmp/home"),
        );
        let get = |k: &str| {
            env.iter()
                .filter(|(n, _)| n == k)
                .map(|(_, v)| v.to_str().unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(get("PATH"), ["/usr/bin"]);
        assert_eq!(get("TERM"), ["xterm"]);
        assert_eq!(get("ANTHROPIC_API_KEY"), [DUMMY]);
        assert_eq!(get("SSL_CERT_FILE"), ["/tmp/b.pem"]);
        assert_eq!(get("HOME"), ["/tmp/home"]);
        assert_eq!(get("USER"), ["root"]);
        for gone in [
            "ANTHROPIC_SEALED",
            "TOKENIZER_TOKEN",
            "COPY_OF_KEY",
            "OTHER_NAME",
        ] {
            assert!(get(gone).is_empty(), "{gone}");
        }
        for (_, v) in &env {
            let v = v.to_str().unwrap();
            assert!(!v.contains("sk-real") && !v.contains("sealed-blob") && !v.contains("tok-123"));
        }
    }
}
