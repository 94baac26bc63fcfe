//! Reads policy files into a [`Policy`], reporting every problem in every file at once.
//!
//! Checks: YAML syntax; unknown and repeated keys (with a suggestion for typos); required keys;
//! target names, addresses (`ip:port`, `[v6]:port` or `host:port`, syntax only: resolving is the
//! daemon's job), protocols, TLS modes, SSH host key lines; credentials that fit the protocol and whose
//! files the daemon can read (relative paths are resolved against the policy file's directory);
//! rules: names unique across files, a non-empty `match`, grant entries naming a known target (in any
//! file), an access that fits its protocol, a TTL such as `90s`, `15m`, `2h` or `1h30m` (at most 24h:
//! grants are meant to be short), masks only for postgres, commands only for ssh exec and
//! each `commands` pattern well formed (`commands::pattern_problem`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::yaml::{self, Node, Pos, Value};
use super::{Access, Approval, GrantSpec, Match, Policy, Protocol, Rule, Target};
use crate::config::Diagnostic;

/// The longest TTL a rule may give.
const MAX_TTL: Duration = Duration::from_secs(24 * 3600);

/// Parses and validates every file; on any problem returns all of them, located as `file:line:col`.
pub fn load(files: &[PathBuf]) -> Result<Policy, Vec<Diagnostic>> {
    let mut loader = Loader::default();
    for file in files {
        loader.file(file);
    }
    loader.finish(files)
}

/// A located problem, before it knows its file.
type Found = (Pos, String);

/// A grant entry whose target may be defined in another file: checked once every file is read.
struct PendingGrant {
    file: PathBuf,
    /// Which rule item (counting every one, duplicates included) the entry belongs to.
    rule_ix: usize,
    rule: String,
    pos: Pos,
    target: (String, Pos),
    access: (String, Pos),
    ttl: Option<Duration>,
    mask: Option<(Vec<String>, Pos)>,
    approval: Approval,
    commands: Option<(Vec<String>, Pos)>,
    forward: Option<(bool, Pos)>,
    sftp: Option<(bool, Pos)>,
}

#[derive(Default)]
struct Loader {
    diags: Vec<Diagnostic>,
    targets: BTreeMap<String, (Target, PathBuf, Pos)>,
    /// Valid rules with their item index.
    rules: Vec<(Rule, usize)>,
    rule_items: usize,
    rule_names: HashMap<String, (PathBuf, Pos)>,
    pending: Vec<PendingGrant>,
    broken_targets: HashSet<String>,
}

impl Loader {
    fn file(&mut self, file: &Path) {
        let text = match std::fs::read_to_string(file) {
            Ok(t) => t,
            Err(e) => {
                self.push(file, Pos { line: 1, col: 1 }, format!("cannot read policy file: {e}"));
                return;
            }
        };
        let root = match yaml::parse(&text) {
            Ok(Some(root)) if !root.is_null() => root,
            Ok(_) => return,
            Err(e) => {
                self.push(file, e.pos, e.message);
                return;
            }
        };
        let mut f = FileCtx { file, dir: file.parent().unwrap_or(Path::new(".")), found: Vec::new() };
        let fields = f.fields(&root, "a policy file", &["targets", "rules"]);
        if let Some((_, node)) = fields.get("targets") {
            self.targets_section(&mut f, node);
        }
        if let Some((_, node)) = fields.get("rules") {
            self.rules_section(&mut f, node);
        }
        for (pos, msg) in f.found {
            self.push(file, pos, msg);
        }
    }

    fn push(&mut self, file: &Path, pos: Pos, message: String) {
        self.diags.push(Diagnostic { file: file.to_path_buf(), line: pos.line, col: pos.col, message });
    }

    fn targets_section(&mut self, f: &mut FileCtx<'_>, node: &Node) {
        if node.is_null() {
            return;
        }
        let Value::Map(entries) = &node.value else {
            f.err(node.pos, format!("`targets` must be a mapping of target names, not {}", node.kind()));
            return;
        };
        for (key, value) in entries {
            let Some(name) = f.name(key, "target") else { continue };
            let target = f.target(&name, key.pos, value);
            if target.is_none() {
                // defined but broken: rules naming it get no second, misleading "unknown target"
                self.broken_targets.insert(name.clone());
            }
            if let Some((_, file, pos)) = self.targets.get(&name) {
                let msg = format!(
                    "duplicate target `{name}`; first defined at {}:{}:{}",
                    file.display(),
                    pos.line,
                    pos.col
                );
                f.err(key.pos, msg);
                continue;
            }
            if let Some(t) = target {
                self.targets.insert(name, (t, f.file.to_path_buf(), key.pos));
            }
        }
    }

    fn rules_section(&mut self, f: &mut FileCtx<'_>, node: &Node) {
        if node.is_null() {
            return;
        }
        let Value::Seq(items) = &node.value else {
            f.err(node.pos, format!("`rules` must be a list of rules, not {}", node.kind()));
            return;
        };
        for item in items {
            let fields = f.fields(item, "a rule", &["name", "match", "grant"]);
            if !matches!(item.value, Value::Map(_)) {
                continue;
            }
            let name = if let Some((_, n)) = fields.get("name") {
                f.name(n, "rule")
            } else {
                f.err(item.pos, "rule needs a `name`".into());
                None
            };
            let matcher = if let Some((_, m)) = fields.get("match") {
                f.matcher(m)
            } else {
                f.err(item.pos, "rule needs `match` (groups, scopes or clients)".into());
                None
            };
            let rule_name = name.clone().unwrap_or_default();
            let ix = self.rule_items;
            self.rule_items += 1;
            match fields.get("grant") {
                Some((_, g)) => self.grant_list(f, ix, &rule_name, g),
                None => f.err(item.pos, "rule needs a `grant` list".into()),
            }
            let (Some(name), Some(matcher)) = (name, matcher) else { continue };
            let pos = fields.get("name").map_or(item.pos, |(_, n)| n.pos);
            if let Some((file, first)) = self.rule_names.get(&name) {
                let msg = format!(
                    "duplicate rule `{name}`; first defined at {}:{}:{}",
                    file.display(),
                    first.line,
                    first.col
                );
                f.err(pos, msg);
                continue;
            }
            self.rule_names.insert(name.clone(), (f.file.to_path_buf(), pos));
            self.rules.push((Rule { name, file: f.file.to_path_buf(), matcher, grants: Vec::new() }, ix));
        }
    }

    fn grant_list(&mut self, f: &mut FileCtx<'_>, rule_ix: usize, rule: &str, node: &Node) {
        let Value::Seq(items) = &node.value else {
            f.err(node.pos, format!("`grant` must be a list of grant entries, not {}", node.kind()));
            return;
        };
        if items.is_empty() {
            f.err(node.pos, "`grant` is empty; a rule must grant something".into());
        }
        for item in items {
            let fields = f.fields(
                item,
                "a grant entry",
                &["target", "access", "ttl", "mask", "approval", "commands", "forward", "sftp"],
            );
            if !matches!(item.value, Value::Map(_)) {
                continue;
            }
            let target = f
                .required(&fields, "target", item.pos, "grant entry")
                .and_then(|n| f.string(n, "target").map(|s| (s, n.pos)));
            let access = f
                .required(&fields, "access", item.pos, "grant entry")
                .and_then(|n| f.string(n, "access").map(|s| (s, n.pos)));
            let ttl = f.required(&fields, "ttl", item.pos, "grant entry").and_then(|n| {
                let s = f.string(n, "ttl")?;
                crate::duration::parse(&s)
                    .map_err(|e| e.to_string())
                    .and_then(|d| {
                        if d > MAX_TTL {
                            Err(format!("ttl `{s}` is longer than 24h; grants are meant to be short"))
                        } else {
                            Ok(d)
                        }
                    })
                    .map_err(|m| f.err(n.pos, format!("ttl: {m}")))
                    .ok()
            });
            let mask = fields.get("mask").and_then(|(_, n)| f.strings(n, "mask").map(|v| (v, n.pos)));
            let commands = fields.get("commands").and_then(|(_, n)| {
                let list = f.strings(n, "commands")?;
                if let Value::Seq(items) = &n.value {
                    for (item, pattern) in items.iter().zip(&list) {
                        if let Some(why) = super::commands::pattern_problem(pattern) {
                            f.err(item.pos, format!("commands: `{}`: {why}", pattern.escape_debug()));
                        }
                    }
                }
                Some((list, n.pos))
            });
            let approval = match fields.get("approval") {
                None => Approval::None,
                Some((_, n)) => match f.string(n, "approval").as_deref() {
                    Some("none") | None => Approval::None,
                    Some("required") => Approval::Required,
                    Some(other) => {
                        f.err(n.pos, format!("approval `{other}` is not none or required"));
                        Approval::None
                    }
                },
            };
            let forward =
                fields.get("forward").and_then(|(_, n)| f.boolean(n, "forward").map(|b| (b, n.pos)));
            let sftp = fields.get("sftp").and_then(|(_, n)| f.boolean(n, "sftp").map(|b| (b, n.pos)));
            let (Some(target), Some(access)) = (target, access) else { continue };
            self.pending.push(PendingGrant {
                file: f.file.to_path_buf(),
                rule_ix,
                rule: rule.to_owned(),
                pos: item.pos,
                target,
                access,
                ttl,
                mask,
                approval,
                commands,
                forward,
                sftp,
            });
        }
    }

    /// Checks grant entries against the targets of every file, attaches them to their rules.
    fn finish(mut self, files: &[PathBuf]) -> Result<Policy, Vec<Diagnostic>> {
        let pending = std::mem::take(&mut self.pending);
        let mut seen: HashMap<(usize, String, Access), Pos> = HashMap::new();
        for g in pending {
            let mut found: Vec<Found> = Vec::new();
            let (target_name, target_pos) = &g.target;
            let Some((target, _, _)) = self.targets.get(target_name) else {
                if self.broken_targets.contains(target_name) {
                    continue;
                }
                let mut known: Vec<&str> =
                    self.targets.keys().chain(&self.broken_targets).map(String::as_str).collect();
                known.sort_unstable();
                let hint = suggest(target_name, &known).map_or_else(
                    || {
                        if known.is_empty() {
                            String::from("; no targets are defined")
                        } else {
                            format!("; known targets: {}", known.join(", "))
                        }
                    },
                    |s| format!("; did you mean `{s}`?"),
                );
                self.push(&g.file.clone(), *target_pos, format!("unknown target `{target_name}`{hint}"));
                continue;
            };
            let protocol = target.protocol();
            let (access_text, access_pos) = &g.access;
            let access = match Access::parse(access_text) {
                Some(a) if a.protocol() == protocol => Some(a),
                _ => {
                    let allowed: Vec<&str> = protocol.accesses().iter().map(|a| a.as_str()).collect();
                    found.push((
                        *access_pos,
                        format!("access `{access_text}` does not apply to {protocol} target `{target_name}`; use {}", allowed.join(" or ")),
                    ));
                    None
                }
            };
            if let Some((_, pos)) = &g.mask
                && protocol != Protocol::Postgres
            {
                found.push((
                    *pos,
                    format!("mask applies to postgres targets only; `{target_name}` is {protocol}"),
                ));
            }
            if let Some((_, pos)) = &g.commands
                && access != Some(Access::Exec)
            {
                found.push((*pos, "commands apply to ssh `access: exec` only".into()));
            }
            for (key, flag) in [("forward", &g.forward), ("sftp", &g.sftp)] {
                if let Some((_, pos)) = flag
                    && protocol != Protocol::Ssh
                {
                    found.push((
                        *pos,
                        format!("{key} applies to ssh targets only; `{target_name}` is {protocol}"),
                    ));
                }
            }
            if let Some(a) = access
                && let Some(first) = seen.insert((g.rule_ix, target_name.clone(), a), g.pos)
            {
                found.push((
                    g.pos,
                    format!(
                        "rule `{}` grants {a} on `{target_name}` twice (also at line {})",
                        g.rule, first.line
                    ),
                ));
            }
            let file = g.file.clone();
            let ok = found.is_empty();
            for (pos, msg) in found {
                self.push(&file, pos, msg);
            }
            let (Some(access), Some(ttl), true) = (access, g.ttl, ok) else { continue };
            if let Some((rule, _)) = self.rules.iter_mut().find(|(_, ix)| *ix == g.rule_ix) {
                rule.grants.push(GrantSpec {
                    target: target_name.clone(),
                    access,
                    ttl,
                    mask: g.mask.map(|(m, _)| m).unwrap_or_default(),
                    approval: g.approval,
                    commands: g.commands.map(|(c, _)| c),
                    forward: g.forward.is_some_and(|(b, _)| b),
                    sftp: g.sftp.is_some_and(|(b, _)| b),
                });
            }
        }
        if !self.diags.is_empty() {
            let order = |p: &Path| files.iter().position(|f| f == p).unwrap_or(usize::MAX);
            self.diags.sort_by_key(|d| (order(&d.file), d.line, d.col));
            return Err(self.diags);
        }
        Ok(Policy {
            targets: self.targets.into_iter().map(|(k, (t, _, _))| (k, t)).collect(),
            rules: self.rules.into_iter().map(|(r, _)| r).collect(),
            files: files.to_vec(),
        })
    }
}

/// Problems found while walking one file.
pub(super) struct FileCtx<'a> {
    pub(super) file: &'a Path,
    pub(super) dir: &'a Path,
    found: Vec<Found>,
}

pub(super) type Fields<'n> = BTreeMap<&'n str, (Pos, &'n Node)>;

impl FileCtx<'_> {
    pub(super) fn err(&mut self, pos: Pos, msg: String) {
        self.found.push((pos, msg));
    }

    /// The keys of a mapping; reports a non-mapping, unknown keys (suggesting the near one) and repeats.
    pub(super) fn fields<'n>(&mut self, node: &'n Node, what: &str, allowed: &[&str]) -> Fields<'n> {
        let mut out = Fields::new();
        let Value::Map(entries) = &node.value else {
            self.err(node.pos, format!("expected {what} (a mapping), found {}", node.kind()));
            return out;
        };
        for (key, value) in entries {
            let Value::Scalar { text, .. } = &key.value else {
                self.err(key.pos, format!("keys in {what} must be plain words"));
                continue;
            };
            if !allowed.contains(&text.as_str()) {
                let hint = suggest(text, allowed).map_or_else(
                    || format!("; expected one of: {}", allowed.join(", ")),
                    |s| format!("; did you mean `{s}`?"),
                );
                self.err(key.pos, format!("unknown key `{text}` in {what}{hint}"));
                continue;
            }
            if let Some((first, _)) = out.get(text.as_str()) {
                let msg = format!("`{text}` is set twice in {what} (first at line {})", first.line);
                self.err(key.pos, msg);
                continue;
            }
            out.insert(text.as_str(), (key.pos, value));
        }
        out
    }

    pub(super) fn required<'n>(
        &mut self,
        fields: &Fields<'n>,
        key: &str,
        at: Pos,
        what: &str,
    ) -> Option<&'n Node> {
        let found = fields.get(key).map(|(_, n)| *n);
        if found.is_none() {
            self.err(at, format!("{what} needs `{key}`"));
        }
        found
    }

    pub(super) fn string(&mut self, node: &Node, what: &str) -> Option<String> {
        match &node.value {
            _ if node.is_null() => {
                self.err(node.pos, format!("`{what}` has no value"));
                None
            }
            Value::Scalar { text, .. } => Some(text.clone()),
            _ => {
                self.err(node.pos, format!("`{what}` must be a single value, not {}", node.kind()));
                None
            }
        }
    }

    pub(super) fn strings(&mut self, node: &Node, what: &str) -> Option<Vec<String>> {
        let Value::Seq(items) = &node.value else {
            self.err(node.pos, format!("`{what}` must be a list (e.g. [a, b]), not {}", node.kind()));
            return None;
        };
        let mut out = Vec::new();
        for item in items {
            out.push(self.string(item, what)?);
        }
        Some(out)
    }

    pub(super) fn boolean(&mut self, node: &Node, what: &str) -> Option<bool> {
        match self.string(node, what)?.as_str() {
            "true" => Some(true),
            "false" => Some(false),
            other => {
                self.err(node.pos, format!("`{what}` must be true or false, not `{other}`"));
                None
            }
        }
    }

    /// A target or rule name: a non-empty single line.
    fn name(&mut self, node: &Node, what: &str) -> Option<String> {
        let name = self.string(node, &format!("{what} name"))?;
        if what == "target"
            && !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            self.err(
                node.pos,
                format!("target name `{name}` may use only letters, digits, `-`, `_` and `.`"),
            );
            return None;
        }
        if name.trim().is_empty() || name.contains('\n') {
            self.err(node.pos, format!("{what} name must be a non-empty single line"));
            return None;
        }
        Some(name)
    }

    fn matcher(&mut self, node: &Node) -> Option<Match> {
        let fields = self.fields(node, "`match`", &["groups", "scopes", "clients"]);
        if !matches!(node.value, Value::Map(_)) {
            return None;
        }
        let mut list =
            |key: &str| fields.get(key).and_then(|(_, n)| self.strings(n, key)).unwrap_or_default();
        let m = Match { groups: list("groups"), scopes: list("scopes"), clients: list("clients") };
        if m.groups.is_empty() && m.scopes.is_empty() && m.clients.is_empty() {
            self.err(node.pos, "`match` matches nobody; list groups, scopes or clients".into());
            return None;
        }
        Some(m)
    }
}

/// `ip:port`, `[v6]:port` or `host:port`, syntax only.
pub(super) fn parse_address(s: &str) -> Result<(String, u16), String> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, p) = rest.split_once("]:").ok_or_else(|| format!("`{s}` is not [ipv6]:port"))?;
        h.parse::<std::net::Ipv6Addr>().map_err(|_| format!("`{h}` is not an IPv6 address"))?;
        (h, p)
    } else {
        let (h, p) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("`{s}` needs a port (host:port, e.g. 10.0.0.5:5432)"))?;
        if h.contains(':') {
            return Err(format!("`{s}`: write IPv6 addresses in brackets, e.g. [::1]:5432"));
        }
        if h.parse::<IpAddr>().is_err() && !host_name(h) {
            return Err(format!("`{h}` is neither an IP address nor a host name"));
        }
        (h, p)
    };
    let port: u16 = p_port(port).ok_or_else(|| format!("`{port}` is not a port (1-65535)"))?;
    Ok((host.to_owned(), port))
}

fn p_port(p: &str) -> Option<u16> {
    p.parse::<u16>().ok().filter(|p| *p != 0)
}

fn host_name(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.trim_end_matches('.').split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
        // a bare number like `10.0.0` is a mistyped address, not a host name
        && !h.split('.').all(|l| l.chars().all(|c| c.is_ascii_digit()))
}

/// An OpenSSH public key line (optionally after markers such as `@cert-authority *`).
pub(super) fn ssh_key_line(line: &str) -> bool {
    let parts: Vec<&str> = line.split_whitespace().collect();
    parts.windows(2).any(|w| {
        let known = w[0].starts_with("ssh-") || w[0].starts_with("ecdsa-sha2-") || w[0].starts_with("sk-");
        let b64 = w[1].len() >= 16
            && w[1].chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '='));
        known && b64
    })
}

/// The closest candidate within two edits, for "did you mean".
fn suggest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (edit_distance(word, c), *c))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(parse_address("10.0.0.5:5432"), Ok(("10.0.0.5".into(), 5432)));
        assert_eq!(parse_address("[::1]:22"), Ok(("::1".into(), 22)));
        assert_eq!(parse_address("db.internal:5432"), Ok(("db.internal".into(), 5432)));
        for bad in [
            "10.0.0.5",
            "10.0.0.5:0",
            "10.0.0.5:70000",
            "::1:22",
            "bad_host:1",
            "10.0.0:5432",
            "[nope]:1",
            ":5432",
        ] {
            assert!(parse_address(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn suggestions() {
        assert_eq!(suggest("adress", &["protocol", "address"]), Some("address"));
        assert_eq!(suggest("zzz", &["protocol", "address"]), None);
        assert!(ssh_key_line("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA comment"));
        assert!(ssh_key_line("@cert-authority * ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA"));
        assert!(!ssh_key_line("AAAAC3NzaC1lZDI1NTE5AAAA"));
    }
}
