//! Describe filters (`Filter.N.Name`, `Filter.N.Value.M`) and EC2's matching of their values.

/// One `Filter.N` of a Describe request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Filter {
    pub name: String,
    pub values: Vec<String>,
}

impl Filter {
    /// Whether `value` matches one of the filter's values (EC2 filter values may use `*` and
    /// `?` wildcards).
    pub fn matches(&self, value: &str) -> bool {
        self.values
            .iter()
            .any(|pattern| wildcard_match(pattern, value))
    }
}

/// EC2's filter-value matching: `*` is any run of characters, `?` zero or one character, and a
/// backslash makes the next character literal (`\*`, `\?`, `\\`).
fn wildcard_match(pattern: &str, value: &str) -> bool {
    #[derive(Clone, Copy, PartialEq)]
    enum Tok {
        Any,
        ZeroOrOne,
        Char(char),
    }
    fn go(p: &[Tok], v: &[char]) -> bool {
        match p.split_first() {
            None => v.is_empty(),
            Some((Tok::Any, rest)) => (0..=v.len()).any(|i| go(rest, &v[i..])),
            Some((Tok::ZeroOrOne, rest)) => go(rest, v) || (!v.is_empty() && go(rest, &v[1..])),
            Some((Tok::Char(c), rest)) => v.first() == Some(c) && go(rest, &v[1..]),
        }
    }
    let mut toks = Vec::new();
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        toks.push(match c {
            '\\' => Tok::Char(chars.next().unwrap_or('\\')),
            '*' => Tok::Any,
            '?' => Tok::ZeroOrOne,
            c => Tok::Char(c),
        });
    }
    let v: Vec<char> = value.chars().collect();
    go(&toks, &v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_values_match_as_ec2_matches_them() {
        let f = |v: &str| Filter {
            name: "tag:Name".into(),
            values: vec![v.into()],
        };
        assert!(f("git*").matches("gitlab") && f("git*").matches("git*"));
        assert!(f("git\\*").matches("git*") && !f("git\\*").matches("gitlab"));
        // `?` is zero or one character.
        assert!(f("a?c").matches("ac") && f("a?c").matches("abc") && !f("a?c").matches("abbc"));
        assert!(f("a\\?").matches("a?") && !f("a\\?").matches("ab"));
        assert!(f(r"a\\b").matches(r"a\b"));
        // No character classes.
        assert!(f("x[1]").matches("x[1]") && !f("x[1]").matches("x1"));
    }

    #[test]
    fn filter_wildcards() {
        let f = Filter {
            name: "tag:Name".into(),
            values: vec!["state-*".into(), "exact".into()],
        };
        assert!(f.matches("state-1"));
        assert!(f.matches("exact"));
        assert!(!f.matches("exactly"));
        assert!(!f.matches("stat"));
    }
}
