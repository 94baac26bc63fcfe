//! The `exec` allow-list rule: which command strings a grant's `commands: [...]` patterns let through to the
//! remote shell, and which patterns are well formed ([`pattern_problem`], checked when a policy loads, so
//! `warden check` and the daemon both refuse a pattern the rule would never match). Pure; no I/O.
//!
//! # The rule
//!
//! An `exec` request's command is handed by the upstream `sshd` to the remote user's shell (`$SHELL -c
//! COMMAND`), so the string is shell source, not an argument vector. A pattern must never match its way
//! into a second command, a redirection or an expansion. Warden therefore proves a command safe before it
//! looks at the patterns, and refuses what it cannot prove:
//!
//! 1. The command is at most [`MAX_COMMAND`] bytes and is one or more **words** separated by ASCII spaces
//!    (leading, trailing and repeated spaces are ignored). Tabs, newlines and every other control character,
//!    NUL included, are refused.
//! 2. Every word is made only of the **safe set**: ASCII letters and digits and `- _ . / : = @ % + ,`.
//!    Everything the shells (sh, bash, dash, zsh, csh, fish) give a meaning to is outside it: `; & | < > ( )
//!    $ \` \\ ' " * ? [ ] { } ~ # ! ^` and any non-ASCII character. So no second command (`;`, `&&`, `||`,
//!    `|`, `&`, newline), no redirection (`>`, `<`), no substitution (`$(...)`, backticks, `$VAR`), no
//!    quoting or escapes, no globbing, no brace or tilde expansion, no comment, no history expansion.
//! 3. The first word names the program: it must not contain `=` (a shell would take `NAME=value` as an
//!    environment assignment for the word after it, e.g. `LD_PRELOAD=...`) and must not start with `-`
//!    or `=` (zsh expands a leading `=` to a path).
//! 4. The command, with its words joined by single spaces, must match one of the patterns. A pattern is
//!    written in the same safe words plus `*`; `*` matches any run (possibly empty) of safe characters
//!    and spaces, so `systemctl status *` matches `systemctl status nginx` and `systemctl status a b`,
//!    but only ever plain words. Everything else in a pattern matches itself exactly. A pattern holding
//!    any other character, or one that could only match a command refused by 1-3 (its first word starts
//!    with `-`, or holds `=` before any `*`), is invalid: the policy does not load.
//!
//! What a `*` may still match is ordinary arguments, options included (`find *` allows
//! `find / -delete`): write patterns as narrow as the task needs.

/// The longest command Warden will check.
pub const MAX_COMMAND: usize = 4096;

/// The characters a command word may be made of, besides ASCII letters and digits.
pub const SAFE_PUNCTUATION: &str = "-_./:=@%+,";

fn safe(c: char) -> bool {
    c.is_ascii_alphanumeric() || SAFE_PUNCTUATION.contains(c)
}

/// A short, printable name for a refused character.
fn describe(c: char) -> String {
    match c {
        '\n' => "a newline".into(),
        '\r' => "a carriage return".into(),
        '\t' => "a tab".into(),
        '\0' => "a NUL byte".into(),
        c if c.is_control() => format!("control character U+{:04X}", u32::from(c)),
        c if !c.is_ascii() => format!("non-ASCII character {c:?}"),
        c => format!("`{c}`"),
    }
}

/// Checks `command` against the grant's allow-list `patterns` under the rule above. `Err` holds the
/// message the client is shown (and the audit record keeps).
pub fn command_allowed(command: &str, patterns: &[String]) -> Result<(), String> {
    let words = words(command)?;
    let normal = words.join(" ");
    if patterns.iter().any(|p| pattern_valid(p) && glob(&normalise_pattern(p), &normal)) {
        return Ok(());
    }
    let list = if patterns.is_empty() {
        "the grant allows no commands".to_owned()
    } else {
        format!("allowed: {}", patterns.iter().map(|p| format!("`{p}`")).collect::<Vec<_>>().join(", "))
    };
    Err(format!("command `{normal}` is not in this grant's allow-list ({list})"))
}

/// Splits a command into its words, or says why it cannot be proven to be plain words.
pub fn words(command: &str) -> Result<Vec<&str>, String> {
    if command.len() > MAX_COMMAND {
        return Err(format!("command is {} bytes; warden checks at most {MAX_COMMAND}", command.len()));
    }
    if let Some((i, c)) = command.char_indices().find(|&(_, c)| c != ' ' && !safe(c)) {
        return Err(format!(
            "command contains {} at byte {i}, which a shell would interpret; warden allows only plain words \
             of letters, digits and {SAFE_PUNCTUATION} separated by spaces",
            describe(c)
        ));
    }
    let words: Vec<&str> = command.split(' ').filter(|w| !w.is_empty()).collect();
    let Some(first) = words.first() else {
        return Err("empty command; name the program to run".into());
    };
    if first.contains('=') {
        return Err(format!(
            "the first word `{first}` contains `=`, which a shell reads as an environment assignment"
        ));
    }
    if first.starts_with('-') {
        return Err(format!("the first word `{first}` starts with `-`; name the program to run"));
    }
    Ok(words)
}

/// Whether a pattern is well formed (see [`pattern_problem`]).
pub fn pattern_valid(pattern: &str) -> bool {
    pattern_problem(pattern).is_none()
}

/// Why a `commands` pattern can never let a command through under the rule, or `None` when it can: it
/// must be written only in safe characters, spaces and `*` (so `?`, `[...]`, `{...}` and other globs
/// are refused, not guessed at), and must not be one that only a refused command would match.
pub fn pattern_problem(pattern: &str) -> Option<String> {
    if pattern.len() > MAX_COMMAND {
        return Some(format!("pattern is {} bytes; commands are at most {MAX_COMMAND}", pattern.len()));
    }
    if let Some((i, c)) = pattern.char_indices().find(|&(_, c)| c != ' ' && c != '*' && !safe(c)) {
        let why = match c {
            '?' | '[' | ']' | '{' | '}' => "a glob the rule does not know (only `*` is a wildcard)",
            _ if c.is_control() || !c.is_ascii() => "a character no allowed command may hold",
            _ => "a character the rule refuses in every command",
        };
        return Some(format!(
            "pattern contains {} at byte {i}, {why}; patterns are plain words of letters, digits and \
             {SAFE_PUNCTUATION} separated by spaces, with `*` for any run of them",
            describe(c)
        ));
    }
    let pattern = pattern.trim_start_matches(' ');
    if pattern.trim_end_matches(' ').is_empty() {
        return Some("pattern is empty; it would match nothing".into());
    }
    if pattern.starts_with('-') {
        return Some("pattern starts with `-`, but a command's first word may not (name the program)".into());
    }
    // The literal start of the first word: what every matching command's program name begins with.
    let literal = pattern.split([' ', '*']).next().unwrap_or_default();
    if literal.contains('=') {
        return Some(format!(
            "pattern's first word `{literal}` contains `=`, but a command's first word may not (a shell \
             reads it as an environment assignment)"
        ));
    }
    None
}

fn normalise_pattern(pattern: &str) -> String {
    pattern.split(' ').filter(|w| !w.is_empty()).collect::<Vec<_>>().join(" ")
}

/// Glob match where `*` matches any run of characters (the text is already known to be safe characters
/// and single spaces). Iterative, with one backtrack point: linear in practice, quadratic at worst.
fn glob(pattern: &str, text: &str) -> bool {
    let p = pattern.as_bytes();
    let t = text.as_bytes();
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == b'*' {
        pi += 1;
    }
    pi == p.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pats(p: &[&str]) -> Vec<String> {
        p.iter().map(|s| (*s).to_owned()).collect()
    }

    fn allowed(cmd: &str, p: &[&str]) -> bool {
        command_allowed(cmd, &pats(p)).is_ok()
    }

    const DESIGN: &[&str] = &["uptime", "systemctl status *"];

    #[test]
    fn plain_commands_match_their_patterns() {
        assert!(allowed("uptime", DESIGN));
        assert!(allowed("systemctl status nginx", DESIGN));
        assert!(allowed("systemctl status nginx.service sshd", DESIGN));
        assert!(allowed("  systemctl   status  nginx  ", DESIGN));
        assert!(allowed("systemctl status", &["systemctl status*"]));
        assert!(allowed("ls -la /var/log", &["ls *"]));
        assert!(allowed("date +%Y-%m-%d", &["date *"]));
        assert!(allowed("echo a,b user@host key=value 1:2", &["echo *"]));
        assert!(allowed("cat /etc/os-release", &["cat /etc/*-release"]));
        assert!(allowed("true", &["*"]));
    }

    #[test]
    fn commands_outside_the_list_are_refused() {
        assert!(!allowed("uptime -p", DESIGN));
        assert!(!allowed("reboot", DESIGN));
        assert!(!allowed("systemctl restart nginx", DESIGN));
        assert!(!allowed("systemctl", DESIGN));
        assert!(!allowed("xuptime", DESIGN));
        assert!(!allowed("uptimex", DESIGN));
        assert!(!allowed("uptime", &[]));
        let e = command_allowed("reboot", &pats(DESIGN)).unwrap_err();
        assert!(e.contains("`reboot`") && e.contains("`systemctl status *`"), "{e}");
        assert!(command_allowed("x", &[]).unwrap_err().contains("allows no commands"));
    }

    /// Every shell trick is refused, whatever the pattern (even `*`).
    #[test]
    fn shell_metacharacters_are_refused_even_under_a_star() {
        let tricks = [
            "uptime; touch /tmp/x",
            "uptime;touch /tmp/x",
            "uptime && touch /tmp/x",
            "uptime || touch /tmp/x",
            "uptime | tee /tmp/x",
            "uptime & touch /tmp/x",
            "uptime > /tmp/x",
            "uptime >> /tmp/x",
            "uptime < /etc/passwd",
            "uptime 2>/tmp/x",
            "systemctl status $(touch /tmp/x)",
            "systemctl status `touch /tmp/x`",
            "systemctl status $HOME",
            "systemctl status ${IFS}",
            "systemctl status $'\\x3b'",
            "uptime\ntouch /tmp/x",
            "uptime\rtouch /tmp/x",
            "uptime\ttouch",
            "uptime\0touch /tmp/x",
            "systemctl status *",
            "systemctl status ngin?",
            "systemctl status [a-z]*",
            "systemctl status {a,b}",
            "systemctl status ~",
            "systemctl status ~root",
            "uptime # comment",
            "uptime #",
            "systemctl status 'a b'",
            "systemctl status \"a\"",
            "systemctl status a\\;b",
            "systemctl status !!",
            "! uptime",
            "(uptime)",
            "{ uptime; }",
            "uptime ^ touch",
            "systemctl status n\u{00e9}",
            "systemctl status \u{037e}",
            "systemctl status \u{ff1b}",
            "systemctl status \u{7f}",
            "systemctl status \u{1b}[2J",
            "systemctl\u{a0}status",
        ];
        for t in tricks {
            for p in [&["*"][..], DESIGN, &["systemctl status *", "uptime*", "* *"]] {
                assert!(!allowed(t, p), "{t:?} must be refused under {p:?}");
            }
        }
    }

    #[test]
    fn assignments_and_options_cannot_be_the_program() {
        for t in ["LD_PRELOAD=/tmp/x.so systemctl status nginx", "A=1 uptime", "=ls", "-c uptime", "--help"] {
            assert!(!allowed(t, &["*"]), "{t:?}");
        }
        assert!(command_allowed("A=1 uptime", &pats(&["*"])).unwrap_err().contains("assignment"));
        // `=` in a later word is only an argument.
        assert!(allowed("env FOO=1", &["env *"]));
    }

    #[test]
    fn refusals_name_the_character() {
        let e = command_allowed("uptime; id", &pats(&["*"])).unwrap_err();
        assert!(e.contains("`;`") && e.contains("byte 6"), "{e}");
        assert!(command_allowed("a\nb", &pats(&["*"])).unwrap_err().contains("a newline"));
        assert!(command_allowed("a\0b", &pats(&["*"])).unwrap_err().contains("NUL"));
        assert!(command_allowed("", &pats(&["*"])).unwrap_err().contains("empty"));
        assert!(command_allowed("   ", &pats(&["*"])).unwrap_err().contains("empty"));
        let long = "a".repeat(MAX_COMMAND + 1);
        assert!(command_allowed(&long, &pats(&["*"])).unwrap_err().contains("at most"));
    }

    #[test]
    fn pattern_problems_are_named() {
        let problem = |p: &str| pattern_problem(p).unwrap_or_default();
        assert!(problem("ls ?").contains("glob"), "{}", problem("ls ?"));
        assert!(problem("ls [ab]").contains("glob"));
        assert!(problem("ls {a,b}").contains("glob"));
        assert!(problem("uptime; id").contains("`;`"));
        assert!(problem("ls $HOME").contains("`$`"));
        assert!(problem("ls\tx").contains("a tab"));
        assert!(problem("ls \u{e9}").contains("non-ASCII"));
        assert!(problem("").contains("empty"));
        assert!(problem("   ").contains("empty"));
        assert!(problem(" -c *").contains("`-`"));
        assert!(problem("LD_PRELOAD=* ls").contains("`=`"));
        assert!(problem("A=1").contains("`=`"));
        assert!(problem(&"a".repeat(MAX_COMMAND + 1)).contains("at most"));
        for good in ["uptime", "systemctl status *", "*", "* -la", "env FOO=1", "*=1", "a*=1", "date +%F"] {
            assert_eq!(pattern_problem(good), None, "{good:?}");
        }
        // `*=1` can match `ls a=1` (the star spans the space), so it is not refused.
        assert!(allowed("ls a=1", &["*=1"]));
    }

    #[test]
    fn invalid_patterns_match_nothing() {
        assert!(!pattern_valid("uptime; *"));
        assert!(!pattern_valid("ls ?"));
        assert!(!pattern_valid(""));
        assert!(!pattern_valid("   "));
        assert!(pattern_valid("systemctl status *"));
        assert!(!allowed("uptime", &["uptime;*"]));
        assert!(!allowed("ls a", &["ls [a]"]));
        // A bad pattern beside a good one does not poison it.
        assert!(allowed("uptime", &["bad;", "uptime"]));
    }

    #[test]
    fn stars_match_within_and_across_words() {
        assert!(allowed("journalctl -u nginx -n 50", &["journalctl -u * -n *"]));
        assert!(!allowed("journalctl -u nginx", &["journalctl -u * -n *"]));
        assert!(allowed("git -C /srv/app status", &["git -C /srv/* status"]));
        assert!(!allowed("git -C /srv/app push", &["git -C /srv/* status"]));
        assert!(allowed("abc", &["a*b*c"]));
        assert!(allowed("aXbYc", &["a*b*c"]));
        assert!(!allowed("aXbY", &["a*b*c"]));
        assert!(allowed("a", &["a***"]));
        // Pathological patterns stay fast.
        let text = format!("{}b", "a ".repeat(1000));
        let pat = "*a*a*a*a*a*a*a*a*a*a*c".to_owned();
        assert!(!allowed(&text, &[pat.as_str()]));
    }

    #[test]
    fn scp_and_sftp_commands_are_plain_words_too() {
        // The transfer rule (sftp grants) is applied by the handler; here they are only words.
        assert!(allowed("scp -t /tmp", &["scp *"]));
        assert!(!allowed("scp -t /tmp; id", &["scp *"]));
    }
}
