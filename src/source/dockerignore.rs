//! `.dockerignore` matching with Docker's rules, as the docker CLI applies them when it
//! packs a build context (`moby/patternmatcher`, `docker/cli` `build/context.go`):
//!
//! - one pattern per line; lines starting with `#` are comments; surrounding spaces are
//!   trimmed; `!` makes an exception; each pattern is cleaned like Go's `filepath.Clean`
//!   and a leading `/` is stripped (patterns are relative to the context root);
//! - `*` matches any run of characters except `/`, `?` one character except `/`, `[…]` a
//!   class, `\` escapes the next character, and `**` any number of directories (zero
//!   included);
//! - a pattern matches a path if it matches the path itself or one of its parent
//!   directories (`MatchesOrParentMatches`), so excluding a directory excludes its content;
//! - the last pattern that matches decides: later patterns win.
//!
//! The `glob`/`globset` crates follow gitignore or shell rules (a `*` pattern with no `/`
//! matches at any depth in gitignore; Docker anchors every pattern at the root), so this is
//! a small regex translation of Docker's own, with its documented examples as tests.

use regex::Regex;

#[derive(Debug)]
struct Pattern {
    /// The cleaned pattern, without `!`.
    text: String,
    exception: bool,
    regex: Regex,
}

/// A parsed `.dockerignore`.
#[derive(Debug, Default)]
pub(crate) struct DockerIgnore {
    patterns: Vec<Pattern>,
}

#[derive(Debug, thiserror::Error)]
#[error(".dockerignore line {line}: invalid pattern {pattern:?}: {reason}")]
pub struct PatternError {
    pub(crate) line: usize,
    pub(crate) pattern: String,
    pub(crate) reason: String,
}

impl DockerIgnore {
    /// Parses the content of a `.dockerignore` file.
    pub(crate) fn parse(content: &str) -> Result<Self, PatternError> {
        let mut lines = Vec::new();
        for (i, raw) in content.lines().enumerate() {
            let raw = if i == 0 {
                raw.trim_start_matches('\u{feff}')
            } else {
                raw
            };
            if raw.starts_with('#') {
                continue;
            }
            let line = raw.trim();
            if line.is_empty() {
                continue;
            }
            lines.push((i + 1, line.to_owned()));
        }
        Self::from_lines(lines)
    }

    /// Builds a matcher from patterns in the `.dockerignore` syntax (with `!`).
    #[cfg(test)]
    pub(crate) fn from_patterns<S: AsRef<str>>(patterns: &[S]) -> Result<Self, PatternError> {
        Self::from_lines(
            patterns
                .iter()
                .enumerate()
                .map(|(i, p)| (i + 1, p.as_ref().trim().to_owned()))
                .filter(|(_, p)| !p.is_empty())
                .collect(),
        )
    }

    fn from_lines(lines: Vec<(usize, String)>) -> Result<Self, PatternError> {
        let mut patterns = Vec::new();
        for (line, text) in lines {
            let (exception, rest) = match text.strip_prefix('!') {
                Some(rest) => (true, rest.trim()),
                None => (false, text.as_str()),
            };
            let mut cleaned = if rest.is_empty() {
                String::new()
            } else {
                clean(rest)
            };
            if cleaned.len() > 1 && cleaned.starts_with('/') {
                cleaned.remove(0);
            }
            if cleaned.is_empty() {
                // Docker refuses a lone "!".
                return Err(PatternError {
                    line,
                    pattern: text.clone(),
                    reason: "illegal exclusion pattern".into(),
                });
            }
            let regex = Regex::new(&to_regex(&cleaned)).map_err(|e| PatternError {
                line,
                pattern: text.clone(),
                reason: e.to_string(),
            })?;
            patterns.push(Pattern {
                text: cleaned,
                exception,
                regex,
            });
        }
        Ok(Self { patterns })
    }

    /// Adds an exception (`!pattern`) at the end, so it wins over everything before it.
    pub(crate) fn keep(&mut self, path: &str) {
        let cleaned = clean(path);
        let regex = Regex::new(&to_regex(&cleaned)).expect("an escaped literal is a valid regex");
        self.patterns.push(Pattern {
            text: cleaned,
            exception: true,
            regex,
        });
    }

    /// Whether any `!` pattern exists (then an excluded directory may still hold files to
    /// send).
    pub(crate) fn has_exceptions(&self) -> bool {
        self.patterns.iter().any(|p| p.exception)
    }

    /// Whether `path` (relative to the context root, `/`-separated, no trailing `/`) is
    /// excluded from the context.
    pub(crate) fn is_excluded(&self, path: &str) -> bool {
        let parents: Vec<&str> = {
            let mut v = Vec::new();
            let mut idx = 0;
            while let Some(pos) = path[idx..].find('/') {
                v.push(&path[..idx + pos]);
                idx += pos + 1;
            }
            v
        };
        let mut excluded = false;
        for p in &self.patterns {
            // An exclusion cannot change an excluded path, an exception cannot change an
            // included one.
            if p.exception != excluded {
                continue;
            }
            let matched =
                p.regex.is_match(path) || parents.iter().any(|parent| p.regex.is_match(parent));
            if matched {
                excluded = !p.exception;
            }
        }
        excluded
    }

    /// For an excluded directory: whether the walk must still enter it because an
    /// exception could bring back something inside (the docker CLI's rule: an exception
    /// pattern that starts with the directory's path).
    pub(crate) fn must_descend(&self, dir: &str) -> bool {
        let prefix = format!("{dir}/");
        self.patterns
            .iter()
            .filter(|p| p.exception)
            .any(|p| format!("{}/", p.text).starts_with(&prefix))
    }
}

/// Go's `filepath.Clean` on a `/`-separated path.
pub(crate) fn clean(path: &str) -> String {
    if path.is_empty() {
        return ".".into();
    }
    let rooted = path.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|p| *p != "..") {
                    parts.pop();
                } else if !rooted {
                    parts.push("..");
                }
            }
            p => parts.push(p),
        }
    }
    let joined = parts.join("/");
    match (rooted, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".into(),
        (false, false) => joined,
    }
}

/// Docker's translation of a pattern into a regular expression
/// (`patternmatcher.Pattern.compile`).
fn to_regex(pattern: &str) -> String {
    let mut re = String::from("^");
    let chars: Vec<char> = pattern.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let ch = chars[i];
        match ch {
            '*' if chars.get(i + 1) == Some(&'*') => {
                i += 1;
                // "**/" is "**": eat the slash.
                if chars.get(i + 1) == Some(&'/') {
                    i += 1;
                }
                if i + 1 >= chars.len() {
                    re.push_str(".*");
                } else {
                    re.push_str("(.*/)?");
                }
            }
            '*' => re.push_str("[^/]*"),
            '?' => re.push_str("[^/]"),
            '.' | '+' | '(' | ')' | '|' | '{' | '}' | '$' | '^' if !in_class(&chars, i) => {
                re.push('\\');
                re.push(ch);
            }
            '\\' => {
                if let Some(next) = chars.get(i + 1) {
                    re.push_str(&regex::escape(&next.to_string()));
                    i += 1;
                } else {
                    re.push_str("\\\\");
                }
            }
            '[' | ']' => re.push(ch),
            // Characters the regex crate treats specially inside classes or elsewhere.
            '&' | '~' | '-' | '#' | ' ' if !in_class(&chars, i) => {
                re.push_str(&regex::escape(&ch.to_string()));
            }
            _ => re.push(ch),
        }
        i += 1;
    }
    re.push('$');
    re
}

/// Whether position `i` is inside a `[…]` class (where `^` negates and `.` is literal).
fn in_class(chars: &[char], i: usize) -> bool {
    let mut open = false;
    let mut k = 0;
    while k < i {
        match chars[k] {
            '\\' => k += 1,
            '[' if !open => open = true,
            ']' if open => open = false,
            _ => {}
        }
        k += 1;
    }
    open
}

#[cfg(test)]
mod tests {
    use super::*;

    fn excluded(patterns: &[&str], path: &str) -> bool {
        DockerIgnore::from_patterns(patterns)
            .unwrap()
            .is_excluded(path)
    }

    /// The examples of Docker's `.dockerignore` documentation.
    #[test]
    fn documented_examples() {
        let file = "# comment\n*/temp*\n*/*/temp*\ntemp?\n";
        let ig = DockerIgnore::parse(file).unwrap();
        assert!(ig.is_excluded("somedir/temporary.txt"));
        assert!(ig.is_excluded("somedir/temp"));
        assert!(ig.is_excluded("somedir/subdir/temporary.txt"));
        assert!(ig.is_excluded("tempa"));
        assert!(ig.is_excluded("tempb"));
        assert!(
            !ig.is_excluded("temporary.txt"),
            "*/temp* needs a directory"
        );
        assert!(!ig.is_excluded("tempab"));
        assert!(!ig.is_excluded("comment"));

        assert!(excluded(&["**/*.go"], "main.go"));
        assert!(excluded(&["**/*.go"], "a/b/c.go"));
        assert!(!excluded(&["**/*.go"], "a/b/c.gox"));

        // "*.md / !README.md": markdown files right below the root, except README.md.
        let p = ["*.md", "!README.md"];
        assert!(excluded(&p, "CHANGES.md"));
        assert!(!excluded(&p, "README.md"));
        assert!(
            !excluded(&p, "docs/guide.md"),
            "*.md is anchored at the root"
        );

        // "*.md / !README*.md / README-secret.md": no markdown but READMEs, and not the
        // secret one.
        let p = ["*.md", "!README*.md", "README-secret.md"];
        assert!(excluded(&p, "CHANGES.md"));
        assert!(!excluded(&p, "README.md"));
        assert!(!excluded(&p, "README-dev.md"));
        assert!(excluded(&p, "README-secret.md"));

        // The same with the exception last: it wins, every README is included.
        let p = ["*.md", "README-secret.md", "!README*.md"];
        assert!(!excluded(&p, "README-secret.md"));
        assert!(excluded(&p, "CHANGES.md"));
    }

    /// Single-pattern cases from moby's patternmatcher tests (`TestMatches`).
    #[test]
    fn patternmatcher_table() {
        let table: &[(&str, &str, bool)] = &[
            ("**", "file", true),
            ("**", "dir/file", true),
            ("**/", "dir/file", true),
            ("**/**", "dir/file", true),
            ("dir/**", "dir/file", true),
            ("dir/**", "dir/dir2/file", true),
            ("**/dir", "dir", true),
            ("**/dir", "dir/file", true),
            ("**/dir2/*", "dir/dir2/file", true),
            ("**/dir2/**", "dir/dir2/dir3/file", true),
            ("**file", "file", true),
            ("**file", "dir/file", true),
            ("**/file", "dir/file", true),
            ("**file", "dir/dir/file", true),
            ("**/file", "dir/dir/file", true),
            ("**/file*", "dir/dir/file", true),
            ("**/file*", "dir/dir/file.txt", true),
            ("**/file*txt", "dir/dir/file.txt", true),
            ("**/file*.txt", "dir/dir/file.txt", true),
            ("**/file*.txt*", "dir/dir/file.txt", true),
            ("**/**/*.txt", "dir/dir/file.txt", true),
            ("**/**/*.txt2", "dir/dir/file.txt", false),
            ("**/*.txt", "file.txt", true),
            ("**/**/*.txt", "file.txt", true),
            ("a**/*.txt", "a/file.txt", true),
            ("a**/*.txt", "a/dir/file.txt", true),
            ("a**/*.txt", "a/dir/dir/file.txt", true),
            ("a/*.txt", "a/dir/file.txt", false),
            ("a/*.txt", "a/file.txt", true),
            ("a/*.txt**", "a/file.txt", true),
            ("a[b-d]e", "ae", false),
            ("a[b-d]e", "ace", true),
            ("a[b-d]e", "aae", false),
            ("a[^b-d]e", "aze", true),
            (".*", ".foo", true),
            (".*", "foo", false),
            ("abc.def", "abcdef", false),
            ("abc.def", "abc.def", true),
            ("abc.def", "abcZdef", false),
            ("abc?def", "abcZdef", true),
            ("abc?def", "abcdef", false),
            ("a\\\\", "a\\", true),
            ("**/foo/bar", "foo/bar", true),
            ("**/foo/bar", "dir/foo/bar", true),
            ("**/foo/bar", "dir/dir2/foo/bar", true),
            ("abc/**", "abc", false),
            ("abc/**", "abc/def", true),
            ("abc/**", "abc/def/ghi", true),
            ("**/.foo", ".foo", true),
            ("**/.foo", "bar.foo", false),
            ("a(b)c/def", "a(b)c/def", true),
            ("a(b)c/def", "a(b)c/xyz", false),
            ("a.|)$(}+{bc", "a.|)$(}+{bc", true),
            (
                "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl",
                "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl",
                true,
            ),
            (
                "dist/*.whl",
                "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl",
                true,
            ),
        ];
        for (pattern, path, want) in table {
            assert_eq!(excluded(&[pattern], path), *want, "{pattern:?} vs {path:?}");
        }
    }

    #[test]
    fn directories_exclude_their_content() {
        assert!(excluded(&["node_modules"], "node_modules/a/b.js"));
        assert!(!excluded(&["node_modules"], "src/node_modules/a.js"));
        assert!(excluded(&["**/node_modules"], "a/b/node_modules/c/d.js"));
        assert!(
            excluded(&["build/"], "build/out.o"),
            "trailing slash is cleaned"
        );
    }

    #[test]
    fn leading_slash_and_dots_are_cleaned() {
        assert!(excluded(&["/secret.txt"], "secret.txt"));
        assert!(excluded(&["./a/../b"], "b"));
        assert!(excluded(&["a//b/"], "a/b"));
        assert!(excluded(&["! /keep", "*", "!/keep"], "x"));
        assert!(!excluded(&["*", "! /keep"], "keep"));
        assert_eq!(clean("/"), "/");
        assert_eq!(clean("a/./b/../../c"), "c");
        assert_eq!(clean("../a"), "../a");
        assert_eq!(clean(""), ".");
    }

    #[test]
    fn exceptions_reopen_excluded_directories() {
        let ig = DockerIgnore::from_patterns(&["docs", "!docs/keep.md"]).unwrap();
        assert!(ig.is_excluded("docs"));
        assert!(ig.is_excluded("docs/other.md"));
        assert!(!ig.is_excluded("docs/keep.md"));
        assert!(ig.must_descend("docs"));
        assert!(!ig.must_descend("src"));
        let ig = DockerIgnore::from_patterns(&["docs", "!**/keep.md"]).unwrap();
        assert!(
            !ig.must_descend("docs"),
            "the docker CLI only descends for prefixes"
        );
    }

    #[test]
    fn comments_blank_lines_and_bom() {
        let ig = DockerIgnore::parse("\u{feff}a\n\n   \n#b\n  c  \n").unwrap();
        assert!(ig.is_excluded("a"));
        assert!(!ig.is_excluded("#b"));
        assert!(ig.is_excluded("c"));
        // A '#' not at the start of the line is part of the pattern.
        let ig = DockerIgnore::parse(" #x\n").unwrap();
        assert!(ig.is_excluded("#x"));
    }

    #[test]
    fn bad_patterns_name_their_line() {
        let err = DockerIgnore::parse("ok\n!\n").unwrap_err();
        assert_eq!(err.line, 2);
        let err = DockerIgnore::parse("a[\n").unwrap_err();
        assert_eq!(err.line, 1);
    }

    #[test]
    fn keep_wins_over_everything_before() {
        let mut ig = DockerIgnore::parse("*\n").unwrap();
        assert!(ig.is_excluded("Dockerfile"));
        ig.keep("Dockerfile");
        assert!(!ig.is_excluded("Dockerfile"));
        assert!(ig.is_excluded("other"));
    }
}
