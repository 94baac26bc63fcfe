//! The reference docs cannot drift from the code: every command, subcommand, flag and positional argument
//! of the clap definition (`warden::cli::Cli`) is documented in its own section of `docs/cli.md`, and every
//! `warden.toml` key the config types accept appears in `docs/configuration.md`.
//!
//! The config keys are not a hand list. [`Probe`] is a serde `Deserializer` that, asked to deserialize
//! `Config`, answers every struct with all the fields serde's derive says it has (the `FIELDS` list the
//! derive passes to `deserialize_struct`), every map with one entry named `NAME`, every list with one
//! element and every option with a value, and writes down each field's dotted path. A field added to any
//! config struct (or a new section) is therefore a key this test requires the docs to name.

use std::collections::BTreeSet;
use std::path::Path;

use clap::CommandFactory;
use serde::Deserialize;
use serde::de::value::{BorrowedStrDeserializer, Error as DeError};
use serde::de::{self, DeserializeSeed, IntoDeserializer, Visitor};

fn docs(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

// ---- config keys ----

/// Walks a type's `Deserialize` impl, recording the dotted path of every struct field it asks for.
struct Probe<'a> {
    path: String,
    keys: &'a mut BTreeSet<String>,
}

impl Probe<'_> {
    fn at(&mut self, field: &str) -> Probe<'_> {
        let path = if self.path.is_empty() { field.to_owned() } else { format!("{}.{field}", self.path) };
        Probe { path, keys: &mut *self.keys }
    }
}

/// toml's `Spanned<T>` deserializes as a struct of these private fields around `T`; it is not a table.
const SPANNED_PREFIX: &str = "$__serde_spanned_private_";

/// One struct's fields (or one map entry), each answered by a probe one level down.
struct Fields<'a, 'k> {
    parent: &'a mut Probe<'k>,
    names: &'static [&'static str],
    next: usize,
}

impl<'de> de::MapAccess<'de> for Fields<'_, '_> {
    type Error = DeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, DeError> {
        let Some(field) = self.names.get(self.next) else { return Ok(None) };
        seed.deserialize(BorrowedStrDeserializer::new(field)).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, DeError> {
        let field = self.names[self.next];
        self.next += 1;
        if let Some(part) = field.strip_prefix(SPANNED_PREFIX) {
            // start and end are offsets; value is the spanned thing itself, at the same path.
            if part == "value" {
                let probe = Probe { path: self.parent.path.clone(), keys: &mut *self.parent.keys };
                return seed.deserialize(probe);
            }
            return seed.deserialize(IntoDeserializer::<DeError>::into_deserializer(0u64));
        }
        let probe = self.parent.at(field);
        probe.keys.insert(probe.path.clone());
        seed.deserialize(probe)
    }
}

/// A list with one element, at the list's own path.
struct One<'a, 'k> {
    parent: Option<&'a mut Probe<'k>>,
}

impl<'de> de::SeqAccess<'de> for One<'_, '_> {
    type Error = DeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>, DeError> {
        let Some(parent) = self.parent.take() else { return Ok(None) };
        seed.deserialize(Probe { path: parent.path.clone(), keys: &mut *parent.keys }).map(Some)
    }
}

impl<'de> de::Deserializer<'de> for Probe<'_> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, DeError> {
        Err(de::Error::custom(format!(
            "`{}` deserializes without saying its shape (deserialize_any); teach docs_reference's Probe about it",
            self.path
        )))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        mut self,
        _name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        visitor.visit_map(Fields { parent: &mut self, names: fields, next: 0 })
    }

    fn deserialize_map<V: Visitor<'de>>(mut self, visitor: V) -> Result<V::Value, DeError> {
        // One entry, keyed `NAME` (e.g. `[identity.NAME]`).
        visitor.visit_map(Fields { parent: &mut self, names: &["NAME"], next: 0 })
    }

    fn deserialize_seq<V: Visitor<'de>>(mut self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_seq(One { parent: Some(&mut self) })
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        visitor.visit_enum(IntoDeserializer::<DeError>::into_deserializer(variants[0]))
    }

    // Leaves. Strings get a value every string-typed key parses (a path, an address, a duration).
    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_str("1s")
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_str("1s")
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_bool(false)
    }

    fn deserialize_u8<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_u64(1)
    }

    fn deserialize_u16<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_u64(1)
    }

    fn deserialize_u32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_u64(1)
    }

    fn deserialize_u64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_u64(1)
    }

    fn deserialize_i8<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_i64(1)
    }

    fn deserialize_i16<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_i64(1)
    }

    fn deserialize_i32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_i64(1)
    }

    fn deserialize_i64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_i64(1)
    }

    fn deserialize_f32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_f64(1.0)
    }

    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_f64(1.0)
    }

    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_char('a')
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_bytes(b"")
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_bytes(b"")
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_unit()
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        visitor.visit_unit()
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_unit()
    }
}

/// Every `warden.toml` key, dotted (`agent.state_dir`, `identity.NAME.issuer`, `binding.cgroup`); tables
/// that only hold other keys (`agent`, `audit.serve`) are left out.
fn config_keys() -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    warden::config::Config::deserialize(Probe { path: String::new(), keys: &mut keys })
        .unwrap_or_else(|e| panic!("probing the config types: {e}"));
    let tables: BTreeSet<String> = keys
        .iter()
        .filter(|k| {
            keys.iter().any(|other| other.strip_prefix(k.as_str()).is_some_and(|r| r.starts_with('.')))
        })
        .cloned()
        .collect();
    keys.retain(|k| !tables.contains(k));
    keys
}

#[test]
fn the_probe_sees_the_config_types_keys() {
    // The control: keys known to exist are found, in every kind of place (a table, an array of
    // tables, a map of tables, a nested table), and tables are not reported as keys.
    let keys = config_keys();
    for k in [
        "agent.state_dir",
        "binding.cgroup",
        "identity.NAME.issuer",
        "audit.serve.listen",
        "grants.pending_max",
    ] {
        assert!(keys.contains(k), "probe missed `{k}`; it found {keys:?}");
    }
    assert!(!keys.contains("agent") && !keys.contains("audit.serve"), "{keys:?}");
    assert!(keys.len() > 30, "suspiciously few keys: {keys:?}");
}

#[test]
fn every_config_key_is_in_the_configuration_reference() {
    let doc = docs("configuration.md");
    let missing: Vec<String> =
        config_keys().into_iter().filter(|k| !doc.contains(&format!("`{k}`"))).collect();
    assert!(
        missing.is_empty(),
        "docs/configuration.md does not document these warden.toml keys (write each as `section.key`, in \
         backticks, with its type, default and an example): {missing:?}"
    );
}

// ---- CLI ----

/// One command to document: its words after `warden`, and what a reader must find in its section.
struct Documented {
    words: String,
    must_mention: Vec<String>,
}

fn commands(cmd: &clap::Command, prefix: &str, out: &mut Vec<Documented>) {
    for sub in cmd.get_subcommands() {
        if sub.get_name() == "help" {
            continue;
        }
        let words = if prefix.is_empty() {
            sub.get_name().to_owned()
        } else {
            format!("{prefix} {}", sub.get_name())
        };
        let mut must_mention = Vec::new();
        for arg in sub.get_arguments() {
            if matches!(arg.get_id().as_str(), "help" | "version") {
                continue;
            }
            if let Some(long) = arg.get_long() {
                must_mention.push(format!("--{long}"));
            }
            if let Some(short) = arg.get_short() {
                must_mention.push(format!("-{short}"));
            }
            if arg.is_positional() {
                let name = arg
                    .get_value_names()
                    .and_then(|v| v.first())
                    .map_or_else(|| arg.get_id().as_str().to_uppercase(), ToString::to_string);
                must_mention.push(name);
            }
        }
        out.push(Documented { words: words.clone(), must_mention });
        commands(sub, &words, out);
    }
}

/// The section of `doc` whose heading names `` `warden WORDS`` (followed by a space or the closing
/// backtick), up to the next heading that names a command.
fn section<'d>(doc: &'d str, words: &str) -> Option<&'d str> {
    let needle = format!("`warden {words}");
    let mut start = None;
    let mut offset = 0;
    for line in doc.split_inclusive('\n') {
        let heading = line.starts_with('#') && line.contains("`warden ");
        if heading {
            if let Some(s) = start {
                return Some(&doc[s..offset]);
            }
            if let Some(at) = line.find(&needle) {
                let after = line[at + needle.len()..].chars().next();
                if matches!(after, Some(' ' | '`')) {
                    start = Some(offset);
                }
            }
        }
        offset += line.len();
    }
    start.map(|s| &doc[s..])
}

#[test]
fn every_command_and_flag_is_in_the_cli_reference() {
    let doc = docs("cli.md");
    let mut all = Vec::new();
    commands(&warden::cli::Cli::command(), "", &mut all);
    assert!(all.iter().any(|c| c.words == "audit verify"), "the walk missed nested subcommands");
    let mut problems = Vec::new();
    for c in &all {
        let Some(text) = section(&doc, &c.words) else {
            problems.push(format!("no section whose heading names `warden {}`", c.words));
            continue;
        };
        for m in &c.must_mention {
            if !text.contains(m.as_str()) {
                problems.push(format!("the section of `warden {}` does not mention {m}", c.words));
            }
        }
    }
    assert!(problems.is_empty(), "docs/cli.md is behind the clap definition:\n{}", problems.join("\n"));
}

#[test]
fn every_exit_code_is_in_the_cli_reference() {
    let doc = docs("cli.md");
    for code in [
        warden::cli::EXIT_FAILED,
        warden::cli::EXIT_INVALID,
        warden::cli::EXIT_UNAVAILABLE,
        warden::cli::EXIT_INTERNAL,
        warden::cli::EXIT_NOPERM,
    ] {
        assert!(doc.contains(&format!("| `{code}` |")), "docs/cli.md's exit code table lacks `{code}`");
    }
}

// ---- the independent verify script ----

/// The Python script between the `verify-script` markers of docs/audit.md.
fn verify_script() -> String {
    let doc = docs("audit.md");
    let (_, rest) =
        doc.split_once("<!-- verify-script:begin -->").expect("audit.md lacks the verify-script markers");
    let (block, _) = rest.split_once("<!-- verify-script:end -->").expect("audit.md lacks verify-script:end");
    let code = block.trim().strip_prefix("```python").and_then(|c| c.strip_suffix("```"));
    code.expect("the verify script is not one ```python block").to_owned()
}

fn run_script(script: &Path, pubkey: &Path, dir: &Path) -> (Option<i32>, String) {
    let out = std::process::Command::new("python3").arg(script).arg(pubkey).arg(dir).output().expect(
        "python3 runs the docs' verify script (scripts/setup.sh installs python3 and python3-cryptography)",
    );
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code(), text)
}

#[tokio::test]
async fn the_verify_script_in_audit_md_accepts_a_real_record_and_catches_an_edit() {
    use warden::audit::{Audit, AuditOptions, Record};

    let root = tempfile::tempdir().unwrap();
    let mut opts = AuditOptions::in_dir(root.path());
    opts.config.checkpoint_records = 7;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let (audit, handle) = Audit::start_with(&opts, shutdown.clone()).unwrap();
    for i in 0..20u32 {
        // Text that exercises the escaping the script's canonical check relies on.
        let text = format!("select 'é \"{i}\"'\n\t\u{1}/ ✓");
        audit
            .append_durable(Record::new("pg.query").field("session", "s1").field("text", text).field("n", i))
            .await
            .unwrap();
    }
    shutdown.cancel();
    handle.await.unwrap();

    let script = root.path().join("verify_audit.py");
    std::fs::write(&script, verify_script()).unwrap();
    let pubkey = root.path().join(warden::audit::sign::PUB_FILE);
    let dir = &opts.config.dir;
    let (code, out) = run_script(&script, &pubkey, dir);
    assert_eq!(code, Some(0), "the script rejects an intact record: {out}");
    assert!(out.contains("intact through seq") && !out.contains("signed through seq None"), "{out}");

    // The control: one changed value (its hash left as it was) is caught and named.
    let file = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .unwrap();
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, text.replacen("\"n\":5,", "\"n\":6,", 1)).unwrap();
    let (code, out) = run_script(&script, &pubkey, dir);
    assert_eq!(code, Some(1), "the script accepts an edited record: {out}");
    assert!(out.contains("TAMPERED") && out.contains("hash does not match"), "{out}");
}
