//! Which names the sandbox may resolve: the intercepted hosts, the
//! `--allow` hosts and patterns, and `--allow-dns` names. Pure.

use crate::policy::HostPattern;

/// Exact names and `*.suffix` patterns, matched against a lowercase name
/// without its trailing dot.
#[derive(Debug, Clone, Default)]
pub struct NameAllowList {
    patterns: Vec<HostPattern>,
}

impl NameAllowList {
    pub fn new(patterns: impl IntoIterator<Item = HostPattern>) -> Self {
        let mut patterns: Vec<HostPattern> = patterns.into_iter().collect();
        patterns.sort();
        patterns.dedup();
        NameAllowList { patterns }
    }

    /// Whether `name` (lowercase, no trailing dot) may be resolved.
    pub fn allows(&self, name: &str) -> bool {
        self.patterns.iter().any(|p| p.matches(name))
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// The patterns, as given (`*.suffix` or exact), for the start-up log.
    pub fn describe(&self) -> Vec<String> {
        self.patterns.iter().map(ToString::to_string).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_and_suffix_names() {
        let list = NameAllowList::new(
            ["api.example.com", "*.pythonhosted.org", "pypi.org"]
                .iter()
                .map(|s| HostPattern::parse(s).unwrap()),
        );
        for yes in [
            "api.example.com",
            "files.pythonhosted.org",
            "a.b.pythonhosted.org",
            "pypi.org",
        ] {
            assert!(list.allows(yes), "{yes}");
        }
        for no in [
            "example.com",
            "x.api.example.com",
            "pythonhosted.org",
            "evilpythonhosted.org",
            "pypi.org.attacker.example",
            "data.attacker.example",
            "",
        ] {
            assert!(!list.allows(no), "{no}");
        }
    }
}
