//! What a PostgreSQL session may run: read-only classification (`access: read`), the mask rule, and the
//! few statements that would take a session out of Warden's control under any access. Pure: the handler
//! feeds it statement text and acts on the verdict; nothing here does I/O.
//!
//! # The parser is PostgreSQL's
//! Statements are parsed by `pg_query` (libpg_query: PostgreSQL's own grammar and lexer, compiled in). A gate
//! must read a string exactly as the server will: if the gate's parser ends a string literal, a comment or a
//! dollar-quoted body where the server does not (nested `/* */`, `E'\''`, `U&'...' UESCAPE`, `$tag$`), a
//! statement the gate took for text inside a literal is one the server runs. The server's lexer also
//! depends on settings, so the classifier pins them: `client_encoding` stays UTF-8 (client-only encodings
//! like SJIS carry `\` inside multibyte characters) and `standard_conforming_strings` stays on; any `SET`,
//! `set_config` or startup parameter that would change them is refused ([`check_startup`] checks the
//! startup packet). Interior NUL bytes (where the server would stop reading) are refused.
//!
//! # `access: read`: an allow-list, proved on the whole tree
//! The parse tree (every node, walked generically from pg_query's protobuf form, so no node kind can be
//! missed) must consist only of node kinds on an allow-list; anything else is refused with `25006`:
//! - statements: `SELECT`/`VALUES`/`TABLE` (without `INTO` or `FOR UPDATE/SHARE`, which create a table and
//!   take row locks), `EXPLAIN` without `ANALYZE` of a read, `SHOW`, `SET`/`RESET` of settings on
//!   [`READ_SETTINGS`] (`default_transaction_read_only`/`transaction_read_only` only towards `on`;
//!   `search_path` without `pg_catalog` or `pg_temp`, so built-in functions stay first), `RESET ALL`
//!   (it falls back to the read-only default the handler sets at startup), `BEGIN`/`START TRANSACTION`/
//!   `SET TRANSACTION` without `READ WRITE`, `COMMIT`/`ROLLBACK`/savepoints (not two-phase commit),
//!   `DECLARE` of a read, `FETCH`/`MOVE`/`CLOSE`, `PREPARE` of a read, `EXECUTE` of a name this session
//!   prepared through Warden ([`SessionState`]), `DEALLOCATE`, `DISCARD`, `LISTEN`/`UNLISTEN`, and
//!   `COPY ... TO STDOUT` of a table or a read;
//! - every function call, wherever it is (select list, CTE, subquery, `FROM`, default, `ORDER BY`), must
//!   name a built-in on [`FUNCTIONS`], unqualified or in `pg_catalog`; every cast a built-in type
//!   ([`TYPES`]; a domain's CHECK may call a function); every operator a built-in symbol
//!   ([`OPERATORS`]), `OPERATOR(pg_catalog.x)` at most.
//!
//! Refused, among others: data-modifying CTEs, `SELECT INTO`, `CREATE TABLE AS`, `EXPLAIN ANALYZE`,
//! `COPY FROM`, `MERGE`, `DO`, `CALL`, DDL, `GRANT`, `VACUUM`, `ANALYZE`, `LOCK` (but `IN ACCESS SHARE
//! MODE`, the lock a SELECT takes), `NOTIFY`, `CHECKPOINT`, `nextval`, `setval`, `set_config` (but of a
//! setting `SET` may change, with constant arguments), `pg_terminate_backend`, `lo_*`, `dblink*`,
//! user-defined functions. `pg_dump` works under `read` (its statements are tested).
//!
//! What the tree cannot show, and what covers it: an operator or cast on a *user-defined type* resolves to
//! whatever function its owner chose, and a user function may overload a built-in name with other
//! argument types (the handler finds those not written in C with [`shadow_query`], and then only the
//! `pg_catalog.` spelling is allowed); views run their definitions. Those objects were made by the database's owners, not by
//! the agent (which cannot create any under `read`), and the second and third layers hold for them: the
//! session's `default_transaction_read_only` (set at startup by the handler, so even `RESET ALL` returns to
//! it) makes the server refuse their writes, and a read grant can log in as a read-only role.
//!
//! # Any access: staying in Warden's control
//! Refused with `42501` under `write` too: `SET ROLE`/`SET SESSION AUTHORIZATION` and `set_config` of them
//! (the grant names the login), settings that change how the server lexes (above), `CREATE`/`ALTER`/`DROP
//! ROLE` (a login whose password the agent knows would bypass Warden), `GRANT`/`REVOKE` of role
//! membership (the read login could gain a writing role), `ALTER DATABASE ... SET` (it changes the
//! defaults of later read sessions), `ALTER SYSTEM`, `LOAD`, and `COPY` to or from a server file or
//! program. Code run by the server (functions, `DO`) under `write` can do
//! what the login may; the write login should not be a member of other roles.
//!
//! # Masks
//! `mask` entries name a column (`email`, any table) or `table.col`. The agent never sees a masked value:
//! 1. the handler replaces the value of every result column whose source (RowDescription's table OID and
//!    attribute number) is a masked column ([`super::mask::masked_fields`]);
//! 2. [`Classifier::check`] refuses with `42501` any statement in which a column named like a masked column
//!    (compared by name, in any table, case-insensitively: the tree does not say which table a name
//!    belongs to, so `table.col` masks every `col` reference for this check) appears anywhere other than as
//!    a plain column of the outer `SELECT` list (or of a `DECLARE`d, `PREPARE`d or `EXPLAIN`ed one, or one
//!    under `EXISTS`, whose values are discarded): not in an expression, function, cast (`email::int`
//!    quotes the value in its error), row or JSON constructor, aggregate, `WHERE`/`JOIN`/`ORDER BY`/
//!    `GROUP BY`/`DISTINCT ON`/window (probing), subquery or CTE list, set operation (`UNION` results have
//!    no source), `RETURNING`, `ON CONFLICT`, `USING`, `INSERT ... SELECT`; output aliases of masked
//!    columns and `ORDER BY 2`-style positions are treated alike. Also refused under masks: whole-row
//!    references (`t`, `row_to_json(t)`), `*` anywhere but the outer select list, `NATURAL JOIN`, column
//!    renaming aliases on tables (`FROM t AS x(a, b)`), `COPY ... TO`, `SELECT INTO`, relations that
//!    expose values elsewhere ([`VALUE_EXPOSING_RELATIONS`]: `pg_stats`, `pg_stat_activity`...) and
//!    views or materialized views the handler found depending on a masked column ([`SessionState::new`],
//!    from [`super::mask::resolve_query`]), every function not on the built-in list (its body could read
//!    the column) and every statement kind but reads, `INSERT`/`UPDATE`/`DELETE`/`MERGE` and `COPY FROM`
//!    (DDL can rename a column, copy it or index it so errors quote it; a trigger's body is not SQL Warden
//!    can read); and writing a masked column (`INSERT`/`MERGE`/`COPY FROM` naming it or without a column
//!    list, `UPDATE`/`ON CONFLICT` setting it): a unique or foreign-key violation would answer whether a
//!    guessed value exists, the same probe `WHERE email = ...` is refused for;
//! 3. the handler withholds error and notice fields that may quote values
//!    ([`super::mask::error_field`]).
//!
//! # What the handler does with this module
//! - StartupMessage: [`check_startup`] on the client's parameters; upstream, add [`PINNED_SETTINGS`] the
//!   client did not give (and `default_transaction_read_only=on` for `read`) to the startup parameters.
//! - Once per upstream connection of a `read` or masked session: run [`shadow_query`] (and, with masks,
//!   [`super::mask::resolve_query`]) and keep a [`SessionState`] built from the answers; reset it when the
//!   pooled connection is reset.
//! - Every Query and Parse: [`Classifier::check_session`]; a refusal is an `ErrorResponse` with its
//!   SQLSTATE (then skip to Sync in the extended protocol). `FunctionCall` messages name a function by OID,
//!   outside any parse tree: refuse them under `read` and masks.
//! - Every upstream ParameterStatus: [`check_parameter_status`] (end the session on an error).
//! - With masks: [`super::mask::masked_fields`] on each RowDescription (format codes from Bind),
//!   [`super::mask::replacement`] in DataRows, [`super::mask::error_field`] on errors and notices.
//!
//! # The cache
//! Verdicts are cached by a digest of the exact text (with the access, masks and the session's tainted and
//! shadowed names), and, for the strings whose constants the verdict provably did not depend on, by their
//! *shape*: the text with every constant token (string, bit string, integer, numeric, as PostgreSQL's own
//! lexer finds them) taken out, keeping each one's token kind. A string's shape verdict is stored only if
//! (a) it was let through, (b) every constant token became a plain constant node of the tree (an
//! `AConst` at that token's offset: not an option value, a file name or a `FETCH` count) and (c) no rule read any constant's value while classifying it (the rules that do,
//! `SET` values, `set_config` arguments, `EXPLAIN`/transaction options, count each read). So
//! `... WHERE aid = 17` and `... WHERE aid = 42` share a verdict, while `SET ... = 'on'` and `= 'off'`
//! never do. Two strings with one shape have the same tokens in the same places but for constants of the
//! same kinds, so the parser builds the same tree for both but for those constants' values.
//!
//! Known limit: statements nesting deeper than about 50 expression levels (`1 + 1 + ...` with 50 terms)
//! exceed the protobuf decoder's recursion limit and are refused as unparsable (`42601`).

mod lists;

use std::cell::Cell;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use pg_query::protobuf::Token;

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::policy::Access;

pub use lists::{FUNCTIONS, OPERATORS, READ_SETTINGS, TYPES, VALUE_EXPOSING_RELATIONS};

/// SQLSTATE `read_only_sql_transaction`: a statement not proven read-only under `access: read`.
pub const READ_ONLY: &str = "25006";
/// SQLSTATE `insufficient_privilege`: a mask, or a statement that would leave Warden's control.
pub const PRIVILEGE: &str = "42501";
/// SQLSTATE `syntax_error`: the statement does not parse.
pub const SYNTAX: &str = "42601";

/// The deepest parse tree the classifier walks; deeper is refused (the parser stops far earlier).
const MAX_DEPTH: usize = 2000;

/// A query string the classifier let through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    /// How many statements the string holds (0 for an empty or comment-only string).
    pub statements: usize,
    /// Each statement's command tag, e.g. `SELECT`, `SET`, `BEGIN`.
    pub tags: Vec<String>,
    /// The mask entries that may apply to the results (the handler masks them by source).
    pub masks_applied: Vec<String>,
    /// What the string does to the session's prepared statements, in order.
    pub session: Vec<SessionEffect>,
}

/// A change to a session's SQL-level prepared statements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEffect {
    Prepare(String),
    Execute(String),
    Deallocate(String),
    DeallocateAll,
}

/// Why a query string is refused: sent to the client as an `ErrorResponse` with this SQLSTATE.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Refused {
    /// [`READ_ONLY`] (not proven read-only under `read`), [`PRIVILEGE`] (mask, control) or [`SYNTAX`].
    pub sqlstate: &'static str,
    pub message: String,
}

impl Refused {
    fn read(what: impl std::fmt::Display) -> Self {
        Self {
            sqlstate: READ_ONLY,
            message: format!(
                "warden: this grant is read-only and {what} is not known to be read-only; ask for a write grant"
            ),
        }
    }

    fn mask(col: &str, place: &str) -> Self {
        Self {
            sqlstate: PRIVILEGE,
            message: format!(
                "warden: column \"{col}\" is masked: it may be selected only as a plain column of the outer \
                 SELECT list, not used in {place}"
            ),
        }
    }

    fn masked(what: impl std::fmt::Display) -> Self {
        Self { sqlstate: PRIVILEGE, message: format!("warden: masks apply to this session and {what}") }
    }

    fn control(what: impl std::fmt::Display) -> Self {
        Self {
            sqlstate: PRIVILEGE,
            message: format!("warden: {what} would take the session out of Warden's control"),
        }
    }
}

/// What Warden knows about one client session across query strings: the prepared statements it saw
/// prepared (so `EXECUTE` of them is as safe as their `PREPARE` was) and the relations the handler found
/// exposing masked columns. The handler keeps one per session and resets it when the upstream connection
/// is reset (`DISCARD ALL` on a pooled connection).
#[derive(Debug, Clone, Default)]
pub struct SessionState {
    prepared: HashSet<String>,
    tainted: Arc<[String]>,
    shadowed: Arc<[String]>,
    digest: [u8; 32],
}

impl SessionState {
    /// `tainted`: relation names (views, materialized views) that depend on a masked column, as resolved
    /// by [`super::mask::resolve_query`]; empty when the grant has no masks.
    pub fn new(tainted: impl IntoIterator<Item = String>) -> Self {
        let mut s = Self {
            prepared: HashSet::new(),
            tainted: sorted(tainted),
            shadowed: Arc::new([]),
            digest: [0; 32],
        };
        s.digest = s.scope_digest();
        s
    }

    /// Built-in function and operator names that a user-written (not C) function in another schema
    /// overloads, as found by [`shadow_query`]: under `read` and masks, these are allowed only spelled
    /// `pg_catalog.name` / `OPERATOR(pg_catalog.op)`, since overload resolution could pick the user's.
    #[must_use]
    pub fn with_shadowed(mut self, shadowed: impl IntoIterator<Item = String>) -> Self {
        self.shadowed = sorted(shadowed);
        self.digest = self.scope_digest();
        self
    }

    fn scope_digest(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        for n in self.tainted.iter() {
            h.update(n.as_bytes());
            h.update([0]);
        }
        h.update([1]);
        for n in self.shadowed.iter() {
            h.update(n.as_bytes());
            h.update([0]);
        }
        h.finalize().into()
    }

    /// The session's prepared statements were all dropped (`DISCARD ALL`, a pooled connection's reset).
    pub fn reset(&mut self) {
        self.prepared.clear();
    }

    /// The handler let an extended-protocol Parse of a named statement through (it checked the text):
    /// SQL `EXECUTE` of that name shares the namespace, so it is allowed too.
    pub fn parsed(&mut self, name: &str) {
        if !name.is_empty() {
            self.prepared.insert(name.to_string());
        }
    }

    /// An extended-protocol Close of a named statement.
    pub fn closed(&mut self, name: &str) {
        self.prepared.remove(name);
    }

    /// Apply a checked string's effects, or refuse it if it executes a name Warden did not see prepared
    /// in a session where that matters (`read`, or masks).
    fn admit(&mut self, checked: &Checked, guarded: bool) -> Result<(), Refused> {
        if checked.session.is_empty() {
            // Most strings: nothing to apply (and no copy of the set to make).
            return Ok(());
        }
        // Applied to a copy, kept only if every effect is admitted.
        let mut prepared = self.prepared.clone();
        for effect in &checked.session {
            match effect {
                SessionEffect::Prepare(n) => {
                    prepared.insert(n.clone());
                }
                SessionEffect::Execute(n) if guarded && !prepared.contains(n) => {
                    return Err(Refused {
                        sqlstate: READ_ONLY,
                        message: format!(
                            "warden: prepared statement \"{n}\" was not prepared through Warden in this \
                             session, so it cannot be shown to be allowed; PREPARE it first"
                        ),
                    });
                }
                SessionEffect::Execute(_) => {}
                SessionEffect::Deallocate(n) => {
                    prepared.remove(n);
                }
                SessionEffect::DeallocateAll => prepared.clear(),
            }
        }
        self.prepared = prepared;
        Ok(())
    }
}

type Outcome = Result<Checked, Refused>;

fn sorted(names: impl IntoIterator<Item = String>) -> Arc<[String]> {
    let mut names: Vec<String> = names.into_iter().map(|t| t.to_lowercase()).collect();
    names.sort();
    names.dedup();
    names.into()
}

/// SQL (catalog only, one statement) listing the built-in function and operator names on Warden's lists
/// that a function not written in C (so possibly by a database user, not an extension's superuser)
/// overloads in another schema: one text column, the name. The handler runs it once per upstream
/// connection of a `read` or masked session and passes the names to [`SessionState::with_shadowed`].
pub fn shadow_query() -> String {
    let quote = |names: &[&str]| {
        names.iter().map(|n| format!("'{}'", n.replace('\'', "''"))).collect::<Vec<_>>().join(", ")
    };
    format!(
        "SELECT DISTINCT p.proname::pg_catalog.text FROM pg_catalog.pg_proc p \
           JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace \
           JOIN pg_catalog.pg_language l ON l.oid = p.prolang \
         WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND l.lanname NOT IN ('c', 'internal') \
           AND p.proname IN ({}) \
         UNION \
         SELECT DISTINCT o.oprname::pg_catalog.text FROM pg_catalog.pg_operator o \
           JOIN pg_catalog.pg_namespace n ON n.oid = o.oprnamespace \
           JOIN pg_catalog.pg_proc p ON p.oid = o.oprcode \
           JOIN pg_catalog.pg_language l ON l.oid = p.prolang \
         WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND l.lanname NOT IN ('c', 'internal')",
        quote(lists::FUNCTIONS)
    )
}

/// Check a setting the upstream reports (ParameterStatus, at login and mid-session: a function, or a view
/// calling one, may change a setting where no statement Warden read said so) for a session granted
/// `access` that logged in as `user`: the settings the server lexes query strings by must stay what
/// Warden parses with, a `read` session's default must stay read-only, and the session's authorization
/// must stay the login's. On an error the handler ends the session.
pub fn check_parameter_status(name: &str, value: &str, access: Access, user: &str) -> Result<(), Refused> {
    let truthy = |v: &str| matches!(v.to_ascii_lowercase().as_str(), "on" | "true" | "yes" | "1");
    match name.to_ascii_lowercase().as_str() {
        "client_encoding"
            if !value.eq_ignore_ascii_case("utf8") && !value.eq_ignore_ascii_case("sql_ascii") =>
        {
            Err(Refused::control(format!("client_encoding {value} (Warden parses statements as UTF-8)")))
        }
        "standard_conforming_strings" if !truthy(value) => Err(Refused::control(
            "standard_conforming_strings off (the server would split query strings differently from Warden)",
        )),
        "default_transaction_read_only" if access != Access::Write && !truthy(value) => Err(Refused {
            sqlstate: READ_ONLY,
            message: "warden: this grant is read-only and the session's default is no longer read-only"
                .into(),
        }),
        "session_authorization" if value != user => {
            Err(Refused::control(format!("session authorization {value} (Warden logged in as {user})")))
        }
        _ => Ok(()),
    }
}

/// The settings the handler pins on every upstream connection (startup parameters, where the client gave
/// none: [`check_startup`] lets a client give only these values), so the server lexes query strings the
/// way Warden's parser does whatever the server's or the database's defaults.
pub const PINNED_SETTINGS: &[(&str, &str)] =
    &[("client_encoding", "UTF8"), ("standard_conforming_strings", "on")];

/// Classifies query strings, caching verdicts by a digest of (statement text, access, masks, tainted
/// relations); shared by all sessions. The cache keeps at most `capacity` entries per generation and two
/// generations (an entry used in the older one moves to the newer), so it is bounded and keeps what is hot.
pub struct Classifier {
    cache: Mutex<Cache>,
    /// Strings parsed (verdicts not found in the cache), for tests and benchmarks.
    parsed: AtomicU64,
}

struct Cache {
    capacity: usize,
    current: HashMap<[u8; 32], Cached>,
    previous: HashMap<[u8; 32], Cached>,
}

/// A cached verdict: a statement let through is shared, not copied, by every hit.
type Cached = Result<Arc<Checked>, Refused>;

impl Classifier {
    pub fn new(capacity: usize) -> Self {
        Self {
            cache: Mutex::new(Cache {
                capacity: capacity.max(1),
                current: HashMap::new(),
                previous: HashMap::new(),
            }),
            parsed: AtomicU64::new(0),
        }
    }

    /// One query string (simple-protocol Query, or an extended-protocol Parse), which may hold several
    /// statements, for a session granted `access` (policy::Access::Read or Write) with masks `mask`
    /// (the grant's `mask` entries: `col` or `table.col`).
    ///
    /// Without a [`SessionState`], `EXECUTE` is refused under `read` and masks, and views over masked
    /// columns are not known: handlers use [`Classifier::check_session`].
    pub fn check(&self, sql: &str, access: Access, mask: &[String]) -> Result<Checked, Refused> {
        let mut state = SessionState::default();
        self.check_session(sql, access, mask, &mut state).map(Arc::unwrap_or_clone)
    }

    /// [`Classifier::check`] within a session: `EXECUTE` of names this session prepared through Warden is
    /// allowed, and the session's tainted relations are refused under masks.
    pub fn check_session(
        &self,
        sql: &str,
        access: Access,
        mask: &[String],
        state: &mut SessionState,
    ) -> Result<Arc<Checked>, Refused> {
        let key = cache_key(sql, access, mask, &state.digest);
        let cached = self.lock().get(&key);
        let outcome = if let Some(o) = cached {
            o
        } else {
            let constants = constant_tokens(sql);
            let shape =
                (!constants.is_empty()).then(|| shape_key(sql, &constants, access, mask, &state.digest));
            let by_shape = shape.and_then(|k| self.lock().get(&k));
            if let Some(o) = by_shape {
                o
            } else {
                self.parsed.fetch_add(1, Ordering::Relaxed);
                let (o, blind) = classify_blind(sql, access, mask, &state.tainted, &state.shadowed);
                let o = o.map(Arc::new);
                let mut cache = self.lock();
                cache.put(key, o.clone());
                if let (Some(shape), Some(blind)) = (shape, blind)
                    && constants.iter().all(|&(start, _, _)| blind.contains(&i64::from(start)))
                {
                    cache.put(shape, o.clone());
                }
                o
            }
        };
        let checked = outcome?;
        state.admit(&checked, access != Access::Write || mask.iter().any(|m| !m.trim().is_empty()))?;
        Ok(checked)
    }

    /// How many verdicts are cached (both generations).
    pub fn cached(&self) -> usize {
        let cache = self.lock();
        cache.current.len() + cache.previous.len()
    }

    /// How many strings were parsed because no cached verdict (by text or by shape) applied.
    pub fn parsed(&self) -> u64 {
        self.parsed.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Cache {
    fn get(&mut self, key: &[u8; 32]) -> Option<Cached> {
        if let Some(o) = self.current.get(key) {
            return Some(o.clone());
        }
        let o = self.previous.remove(key)?;
        self.put(*key, o.clone());
        Some(o)
    }

    fn put(&mut self, key: [u8; 32], o: Cached) {
        if self.current.len() >= self.capacity {
            self.previous = std::mem::take(&mut self.current);
        }
        self.current.insert(key, o);
    }
}

fn cache_key(sql: &str, access: Access, mask: &[String], tainted: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(access.as_str().as_bytes());
    h.update([0]);
    for m in mask {
        h.update(m.as_bytes());
        h.update([0]);
    }
    h.update([1]);
    h.update(tainted);
    h.update(sql.as_bytes());
    h.finalize().into()
}

/// The constant tokens of `sql` (string, bit string, integer and numeric literals) as (start, end) byte
/// offsets and token kind, found by PostgreSQL's lexer; empty if it has none, or does not lex. Strings in
/// the plain subset [`plain_constants`] reads are not handed to the lexer: for those it finds the same
/// tokens (debug builds check every call against the lexer).
fn constant_tokens(sql: &str) -> Vec<(i32, i32, i32)> {
    if let Some(plain) = plain_constants(sql) {
        debug_assert_eq!(
            plain,
            lexed_constants(sql),
            "the plain reader and PostgreSQL's lexer disagree on {sql:?}"
        );
        return plain;
    }
    lexed_constants(sql)
}

/// [`constant_tokens`] by PostgreSQL's lexer (libpg_query's scanner).
fn lexed_constants(sql: &str) -> Vec<(i32, i32, i32)> {
    const CONSTANTS: [Token; 6] =
        [Token::Sconst, Token::Usconst, Token::Bconst, Token::Xconst, Token::Iconst, Token::Fconst];
    // Nothing but whitespace has no tokens, and pg_query 18.1's `scan_tokens` then builds a slice from a
    // null pointer (undefined behaviour; debug builds abort on it): not asked.
    if sql.contains('\0') || sql.bytes().all(|c| matches!(c, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)) {
        return Vec::new();
    }
    let Ok(tokens) = pg_query::scan_tokens(sql) else { return Vec::new() };
    tokens
        .into_iter()
        .filter(|t| CONSTANTS.iter().any(|&c| c as i32 == t.token))
        .map(|t| (t.start, t.end, t.token))
        .collect()
}

/// The constant tokens of a string in a plain subset of SQL where PostgreSQL's lexer provably finds exactly
/// these, without calling it (it costs more than the rest of a cached statement's check); `None` for
/// every other string, which then goes to the lexer. The subset: ASCII whitespace (space, tab, newline,
/// carriage return), identifiers and keywords of ASCII letters, digits and `_` (not followed by a quote
/// or `$`, so no `E'...'`, `B'...'`, `X'...'`, `N'...'`), unsigned decimal integers not followed by a
/// letter, digit, `_`, `.` or quote (so no `1.5`, `1e5`, `0x1f`, `1_000`; an integer beyond `int4` is a
/// numeric constant, as the lexer makes it), standard strings `'...'` of printable ASCII with `''`
/// escapes (no backslash, and not followed by another string, which a newline would join to it), and
/// the punctuation and operator characters that can neither start a comment nor join a constant
/// (`( ) , ; [ ] : = < > + * % ^ | ~ ! @ # ?` and `.` not before a digit). No `-`, `/`, `"`, `$`, `&`,
/// `\`, backquote, control or non-ASCII byte.
fn plain_constants(sql: &str) -> Option<Vec<(i32, i32, i32)>> {
    let b = sql.as_bytes();
    i32::try_from(b.len()).ok()?;
    let at = |i: usize| i32::try_from(i).ok();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let space = |c: u8| matches!(c, b' ' | b'\t' | b'\n' | b'\r');
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        match c {
            c if space(c) => i += 1,
            b'a'..=b'z' | b'A'..=b'Z' | b'_' => {
                while b.get(i).copied().is_some_and(ident) {
                    i += 1;
                }
                if matches!(b.get(i), Some(b'\'' | b'$')) {
                    return None;
                }
            }
            b'0'..=b'9' => {
                let start = i;
                while b.get(i).is_some_and(u8::is_ascii_digit) {
                    i += 1;
                }
                if b.get(i).is_some_and(|&n| ident(n) || matches!(n, b'.' | b'\'' | b'$')) {
                    return None;
                }
                // The lexer makes an integer that does not fit int4 a numeric constant.
                let kind = if sql[start..i].parse::<i32>().is_ok() { Token::Iconst } else { Token::Fconst };
                out.push((at(start)?, at(i)?, kind as i32));
            }
            b'\'' => {
                let start = i;
                i += 1;
                loop {
                    match *b.get(i)? {
                        b'\'' if b.get(i + 1) == Some(&b'\'') => i += 2,
                        b'\'' => {
                            i += 1;
                            break;
                        }
                        b' '..=b'~' if b[i] != b'\\' => i += 1,
                        b'\n' | b'\t' | b'\r' => i += 1,
                        _ => return None,
                    }
                }
                let mut next = i;
                while b.get(next).copied().is_some_and(space) {
                    next += 1;
                }
                if b.get(next) == Some(&b'\'') || b.get(i).copied().is_some_and(ident) {
                    return None;
                }
                out.push((at(start)?, at(i)?, Token::Sconst as i32));
            }
            b'.' if b.get(i + 1).is_some_and(u8::is_ascii_digit) => return None,
            b'(' | b')' | b',' | b';' | b'[' | b']' | b':' | b'=' | b'<' | b'>' | b'+' | b'*' | b'%'
            | b'^' | b'|' | b'~' | b'!' | b'@' | b'#' | b'?' | b'.' => i += 1,
            _ => return None,
        }
    }
    Some(out)
}

/// The digest of a string's shape (see the module docs): the text between its constants, each length-
/// prefixed so the encoding is unambiguous, and each constant's token kind, under the same scope as
/// [`cache_key`] (and apart from it).
fn shape_key(
    sql: &str,
    constants: &[(i32, i32, i32)],
    access: Access,
    mask: &[String],
    tainted: &[u8; 32],
) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"shape\0");
    h.update(cache_key("", access, mask, tainted));
    let bytes = sql.as_bytes();
    let mut at = 0usize;
    let piece = |h: &mut Sha256, from: usize, to: usize| {
        let seg = bytes.get(from..to).unwrap_or_default();
        h.update((seg.len() as u64).to_le_bytes());
        h.update(seg);
    };
    for &(start, end, kind) in constants {
        let (start, end) = (usize::try_from(start).unwrap_or(0), usize::try_from(end).unwrap_or(0));
        piece(&mut h, at, start);
        h.update(kind.to_le_bytes());
        at = end.max(start);
    }
    piece(&mut h, at, bytes.len());
    h.finalize().into()
}

thread_local! {
    /// How many times a rule read a constant's value on this thread ([`const_text`]): [`classify_blind`]
    /// compares it before and after a string's walk to know whether its verdict depends on a constant.
    static CONSTANTS_READ: Cell<u64> = const { Cell::new(0) };
}

/// The byte offsets of every `AConst` node in a parse tree.
fn const_locations(v: &Value, out: &mut HashSet<i64>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                if k == "AConst"
                    && let Some(at) = x.get("location").and_then(Value::as_i64)
                {
                    out.insert(at);
                }
                const_locations(x, out);
            }
        }
        Value::Array(items) => items.iter().for_each(|x| const_locations(x, out)),
        _ => {}
    }
}

/// Classify without the cache or session state (what [`Classifier`] caches).
pub fn classify(
    sql: &str,
    access: Access,
    mask: &[String],
    tainted: &[String],
    shadowed: &[String],
) -> Outcome {
    classify_blind(sql, access, mask, tainted, shadowed).0
}

/// [`classify`], and for a string let through whose verdict read no constant's value, the offsets of its
/// plain constants (`AConst` nodes): the verdict holds for any values of those.
fn classify_blind(
    sql: &str,
    access: Access,
    mask: &[String],
    tainted: &[String],
    shadowed: &[String],
) -> (Outcome, Option<HashSet<i64>>) {
    let reads = CONSTANTS_READ.with(Cell::get);
    let mut blind = None;
    let outcome = walk(sql, access, mask, tainted, shadowed, &mut blind);
    if outcome.is_err() || CONSTANTS_READ.with(Cell::get) != reads {
        blind = None;
    }
    (outcome, blind)
}

fn walk(
    sql: &str,
    access: Access,
    mask: &[String],
    tainted: &[String],
    shadowed: &[String],
    constants: &mut Option<HashSet<i64>>,
) -> Outcome {
    if sql.contains('\0') {
        return Err(Refused {
            sqlstate: SYNTAX,
            message: "warden: the statement contains a NUL byte, where the server would stop reading it"
                .into(),
        });
    }
    let parsed = pg_query::parse(sql, 0).map_err(|e| Refused {
        sqlstate: SYNTAX,
        message: format!("warden could not parse the statement: {e}"),
    })?;
    let tree = serde_json::to_value(&parsed.protobuf).map_err(|e| Refused {
        sqlstate: SYNTAX,
        message: format!("warden could not read the statement's parse tree: {e}"),
    })?;
    let mut locations = HashSet::new();
    const_locations(&tree, &mut locations);
    *constants = Some(locations);
    let masks = Masks::new(mask);
    let tainted: HashSet<&str> = tainted.iter().map(String::as_str).collect();
    let shadowed: HashSet<&str> = shadowed.iter().map(String::as_str).collect();
    let mut walker = Walker {
        read: access != Access::Write,
        masks: &masks,
        tainted: &tainted,
        shadowed: &shadowed,
        relnames: HashSet::new(),
        output_aliases: HashSet::new(),
        applied: BTreeSet::new(),
        effects: Vec::new(),
        depth: 0,
        pinned_setting: None,
    };
    let stmts = tree.get("stmts").and_then(Value::as_array).map_or(&[][..], Vec::as_slice);
    let mut tags = Vec::with_capacity(stmts.len());
    for raw in stmts {
        let Some((kind, body)) = raw.get("stmt").and_then(tagged) else {
            return Err(Refused::read("an empty statement node"));
        };
        tags.push(tag(kind, body));
        walker.relnames.clear();
        collect_relnames(raw, &mut walker.relnames);
        walker.output_aliases.clear();
        walker.node(kind, body, Ctx { output: true, place: "the statement" })?;
    }
    Ok(Checked {
        statements: stmts.len(),
        tags,
        masks_applied: walker.applied.into_iter().collect(),
        session: walker.effects,
    })
}

/// Check a StartupMessage's parameters (and the settings inside `options`) for a session granted
/// `access`, with the same rules as `SET`; the handler refuses the session with `FATAL` on an error.
/// `user`, `database` and protocol options (`_pq_.*`) are the handler's; `replication` is refused (a
/// replication connection is not recorded statement by statement).
pub fn check_startup(params: &[(&str, &str)], access: Access) -> Result<(), Refused> {
    let read = access != Access::Write;
    for &(name, value) in params {
        match name {
            "user" | "database" => {}
            n if n.starts_with("_pq_.") => {}
            "replication" => {
                if !matches!(value.to_ascii_lowercase().as_str(), "false" | "off" | "0" | "no") {
                    return Err(Refused::control("a replication connection"));
                }
            }
            "options" => {
                for (n, v) in split_options(value)? {
                    setting_rule(&n.to_lowercase(), &[v], false, read)?;
                }
            }
            n => setting_rule(&n.to_lowercase(), &[value.to_string()], false, read)?,
        }
    }
    Ok(())
}

/// Check a fastpath `FunctionCall` for a session granted `access` (`masked`: the grant has masks), by the
/// function its OID resolved to in the upstream's catalog (`None`: it resolved to nothing). Its arguments
/// are values, never SQL, so the function alone decides, on the same allow-list as a call in a statement:
/// under `read` or masks only a `pg_catalog` function on the list; `set_config` never (in SQL it is judged
/// by its constant arguments, which a fastpath call does not have).
pub fn check_function_call(
    function: Option<(&str, &str)>,
    access: Access,
    masked: bool,
) -> Result<(), Refused> {
    let read = access != Access::Write;
    let shown = function.map_or_else(
        || "a function Warden cannot find in the catalog".to_owned(),
        |(s, n)| format!("function {s}.{n}() called by fastpath"),
    );
    match function {
        Some(("pg_catalog", "set_config")) => Err(if read {
            Refused::read(shown)
        } else {
            Refused::control("set_config() called by fastpath (its setting cannot be checked)")
        }),
        Some(("pg_catalog", name)) if lists::function_allowed(name) => Ok(()),
        _ if read => Err(Refused::read(format!(
            "{shown} (it is not on Warden's list of built-in functions known not to write)"
        ))),
        _ if masked => Err(Refused::masked(format!(
            "{shown} is refused (it is not on Warden's list of built-in functions, and could read a masked column)"
        ))),
        _ => Ok(()),
    }
}

/// The `-c name=value` / `--name=value` pairs of a startup `options` string (space-separated, `\` escapes).
fn split_options(options: &str) -> Result<Vec<(String, String)>, Refused> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => word.extend(chars.next()),
            c if c.is_ascii_whitespace() => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    let bad = |w: &str| Refused::control(format!("the startup option \"{w}\""));
    let mut out = Vec::new();
    let mut it = words.into_iter();
    while let Some(w) = it.next() {
        let pair = if w == "-c" {
            it.next().ok_or_else(|| bad(&w))?
        } else if let Some(rest) = w.strip_prefix("--").or_else(|| w.strip_prefix("-c")) {
            rest.to_string()
        } else {
            return Err(bad(&w));
        };
        let (n, v) = pair.split_once('=').ok_or_else(|| bad(&pair))?;
        out.push((n.replace('-', "_"), v.to_string()));
    }
    Ok(out)
}

/// The rule for changing setting `name` to `values` (or resetting it: `reset`).
fn setting_rule(name: &str, values: &[String], reset: bool, read: bool) -> Result<(), Refused> {
    let value = values.join(",").to_lowercase();
    let truthy = matches!(value.trim_matches('\'').trim(), "on" | "true" | "yes" | "1" | "t" | "y");
    match name {
        "client_encoding"
            if reset
                || matches!(value.replace(['-', '_', '\''], "").trim(), "utf8" | "unicode" | "sqlascii") =>
        {
            Ok(())
        }
        "standard_conforming_strings" if reset || truthy => Ok(()),
        "client_encoding" | "standard_conforming_strings" | "backslash_quote" if !reset => {
            Err(Refused::control(format!(
                "changing {name} (it changes how the server splits a query string from how Warden reads it)"
            )))
        }
        "role" | "session_authorization" if !reset && value.trim_matches('\'') != "none" => Err(
            Refused::control(format!("SET {} (Warden logs in as the grant's login)", name.to_uppercase())),
        ),
        "role" | "session_authorization" => Ok(()),
        _ if !read || reset => Ok(()),
        "default_transaction_read_only" | "transaction_read_only" if truthy => Ok(()),
        "default_transaction_read_only" | "transaction_read_only" => {
            Err(Refused::read(format!("setting {name} off")))
        }
        "search_path" if value.contains("pg_catalog") || value.contains("pg_temp") => Err(Refused::read(
            "a search_path naming pg_catalog or pg_temp (it can put other functions before the built-in ones)",
        )),
        "search_path" => Ok(()),
        n if lists::read_setting_allowed(n) => Ok(()),
        n => Err(Refused::read(format!("changing the setting \"{n}\""))),
    }
}

/// The grant's mask entries, by column name.
struct Masks {
    /// Lowercased column names (the last part of each entry).
    cols: HashSet<String>,
    /// (table, column, entry as written), lowercased table and column.
    entries: Vec<(Option<String>, String, String)>,
}

impl Masks {
    fn new(mask: &[String]) -> Self {
        let mut cols = HashSet::new();
        let mut entries = Vec::new();
        for m in mask {
            let m = m.trim();
            if m.is_empty() {
                continue;
            }
            let lower = m.to_lowercase();
            let (table, col) = match lower.rsplit_once('.') {
                Some((t, c)) => (Some(t.rsplit('.').next().unwrap_or(t).to_string()), c.to_string()),
                None => (None, lower.clone()),
            };
            cols.insert(col.clone());
            entries.push((table, col, m.to_string()));
        }
        Self { cols, entries }
    }

    fn active(&self) -> bool {
        !self.entries.is_empty()
    }
}

#[derive(Clone, Copy)]
struct Ctx {
    /// Column references here are plain columns of an output list the handler masks by source (or
    /// discards).
    output: bool,
    /// Where this node is, for refusal messages.
    place: &'static str,
}

struct Walker<'a> {
    read: bool,
    masks: &'a Masks,
    tainted: &'a HashSet<&'a str>,
    shadowed: &'a HashSet<&'a str>,
    /// Relation names and aliases in the current statement (a bare name among them is a whole-row value).
    relnames: HashSet<String>,
    /// Output names of masked columns in the current statement (visible to ORDER BY, GROUP BY).
    output_aliases: HashSet<String>,
    applied: BTreeSet<String>,
    effects: Vec<SessionEffect>,
    depth: usize,
    /// In `SELECT set_config(name, ...) FROM pg_settings WHERE name = 'x'` (pg_dump sends it), `name` is 'x'.
    pinned_setting: Option<String>,
}

/// A tagged protobuf `Node` (`{"node": {"Kind": {...}}}`) as (kind, body); `None` for an empty node.
fn tagged(v: &Value) -> Option<(&str, &Map<String, Value>)> {
    let inner = v.as_object()?.get("node")?.as_object()?;
    let (k, b) = inner.iter().next()?;
    Some((k.as_str(), b.as_object()?))
}

/// Is this JSON object a `Node` wrapper (rather than a message of a fixed type)?
fn is_wrapper(m: &Map<String, Value>) -> bool {
    m.len() == 1 && m.contains_key("node")
}

/// The kind of a message-typed field that is not a `Node` (so carries no tag), by its parent and name.
fn untagged_kind(parent: &str, field: &str) -> &'static str {
    match (parent, field) {
        ("SelectStmt", "larg" | "rarg") => "SelectStmt",
        ("JsonObjectAgg", "arg") => "JsonKeyValue",
        (_, "into_clause") => "IntoClause",
        (_, "with_clause") => "WithClause",
        (_, "alias" | "join_using_alias" | "eref") => "Alias",
        (_, "type_name" | "of_typename") => "TypeName",
        (_, "over") => "WindowDef",
        ("PartitionCmd", "name") | (_, "relation" | "rel" | "identity_sequence") => "RangeVar",
        (_, "returning_clause") => "ReturningClause",
        (_, "on_conflict_clause") => "OnConflictClause",
        (_, "infer") => "InferClause",
        (_, "search_clause") => "CtesearchClause",
        (_, "cycle_clause") => "CtecycleClause",
        (_, "format") => "JsonFormat",
        (_, "returning") => "JsonReturning",
        (_, "output") => "JsonOutput",
        (_, "on_empty" | "on_error") => "JsonBehavior",
        (_, "pathspec") => "JsonTablePathSpec",
        (_, "constructor") => "JsonAggConstructor",
        ("JsonArrayAgg", "arg") | (_, "val" | "value" | "context_item" | "expr") => "JsonValueExpr",
        (_, "coll_clause") => "CollateClause",
        (_, "view_query") => "Query",
        (_, "bound" | "partbound") => "PartitionBoundSpec",
        (_, "partspec") => "PartitionSpec",
        _ => "?",
    }
}

/// Node kinds a read may consist of. Statement kinds among them get their own checks.
const READ_KINDS: &[&str] = &[
    // statements
    "SelectStmt",
    "ExplainStmt",
    "VariableShowStmt",
    "VariableSetStmt",
    "TransactionStmt",
    "DeclareCursorStmt",
    "FetchStmt",
    "ClosePortalStmt",
    "PrepareStmt",
    "ExecuteStmt",
    "DeallocateStmt",
    "DiscardStmt",
    "ListenStmt",
    "UnlistenStmt",
    "CopyStmt",
    // clauses and expressions
    "ResTarget",
    "ColumnRef",
    "AStar",
    "AConst",
    "ParamRef",
    "AExpr",
    "BoolExpr",
    "NullTest",
    "BooleanTest",
    "FuncCall",
    "GroupingFunc",
    "TypeCast",
    "TypeName",
    "CollateClause",
    "SubLink",
    "CaseExpr",
    "CaseWhen",
    "CoalesceExpr",
    "MinMaxExpr",
    "RowExpr",
    "AArrayExpr",
    "AIndirection",
    "AIndices",
    "SqlvalueFunction",
    "SortBy",
    "WindowDef",
    "RangeVar",
    "RangeSubselect",
    "RangeFunction",
    "JoinExpr",
    "Alias",
    "WithClause",
    "CommonTableExpr",
    "CtesearchClause",
    "CtecycleClause",
    "GroupingSet",
    "String",
    "Integer",
    "Float",
    "Boolean",
    "BitString",
    "List",
    "NamedArgExpr",
    "XmlExpr",
    "XmlSerialize",
    "RangeTableFunc",
    "RangeTableFuncCol",
    "ColumnDef",
    "DefElem",
    "JsonObjectConstructor",
    "JsonArrayConstructor",
    "JsonArrayQueryConstructor",
    "JsonAggConstructor",
    "JsonObjectAgg",
    "JsonArrayAgg",
    "JsonKeyValue",
    "JsonValueExpr",
    "JsonOutput",
    "JsonReturning",
    "JsonFormat",
    "JsonParseExpr",
    "JsonScalarExpr",
    "JsonSerializeExpr",
    "JsonFuncExpr",
    "JsonIsPredicate",
    "JsonArgument",
    "JsonBehavior",
    "JsonTable",
    "JsonTableColumn",
    "JsonTablePathSpec",
];

/// Node kinds a write under masks may add to the read kinds: DML that does not copy or rename columns.
const MASKED_WRITE_KINDS: &[&str] = &[
    "InsertStmt",
    "UpdateStmt",
    "DeleteStmt",
    "MergeStmt",
    "MultiAssignRef",
    "SetToDefault",
    "OnConflictClause",
    "InferClause",
    "IndexElem",
    "ReturningClause",
    "ReturningOption",
    "MergeWhenClause",
    "CurrentOfExpr",
    "LockingClause",
    "TruncateStmt",
];

/// Statement kinds refused under any access (they would take the session out of Warden's control).
const CONTROL_KINDS: &[&str] = &[
    "CreateRoleStmt",
    "AlterRoleStmt",
    "AlterRoleSetStmt",
    "DropRoleStmt",
    "AlterSystemStmt",
    "LoadStmt",
    "AlterDatabaseSetStmt",
    "GrantRoleStmt",
];

fn str_field<'v>(body: &'v Map<String, Value>, field: &str) -> &'v str {
    body.get(field).and_then(Value::as_str).unwrap_or("")
}

fn int_field(body: &Map<String, Value>, field: &str) -> i64 {
    body.get(field).and_then(Value::as_i64).unwrap_or(0)
}

fn bool_field(body: &Map<String, Value>, field: &str) -> bool {
    body.get(field).and_then(Value::as_bool).unwrap_or(false)
}

fn list<'v>(body: &'v Map<String, Value>, field: &str) -> &'v [Value] {
    body.get(field).and_then(Value::as_array).map_or(&[][..], Vec::as_slice)
}

/// The `sval`s of a list of `String` nodes, lowercased (for column names, compared conservatively);
/// `None` if any item is not a `String`.
fn names(items: &[Value]) -> Option<Vec<String>> {
    Some(exact_names(items)?.into_iter().map(|n| n.to_lowercase()).collect())
}

/// The `sval`s as the parser left them (it folds unquoted identifiers): function, type, schema and operator
/// names are compared exactly, since `"LOWER"` or `"PG_CATALOG"` quoted name other objects than `lower`.
fn exact_names(items: &[Value]) -> Option<Vec<String>> {
    items
        .iter()
        .map(|i| match tagged(i) {
            Some(("String", b)) => Some(str_field(b, "sval").to_string()),
            _ => None,
        })
        .collect()
}

/// A constant's value as text: an `AConst`, or the bare `String`/`Integer`/`Boolean`/`Float` nodes that
/// option lists (`EXPLAIN (ANALYZE off)`) carry; `None` for anything else.
fn const_text(v: &Value) -> Option<String> {
    CONSTANTS_READ.with(|n| n.set(n.get() + 1));
    let (kind, body) = tagged(v)?;
    match kind {
        "String" => return Some(str_field(body, "sval").to_string()),
        "Integer" => return Some(int_field(body, "ival").to_string()),
        "Boolean" => return Some(bool_field(body, "boolval").to_string()),
        "Float" => return Some(str_field(body, "fval").to_string()),
        "AConst" => {}
        _ => return None,
    }
    let val = body.get("val")?.as_object()?;
    let (k, inner) = val.iter().next()?;
    let inner = inner.as_object()?;
    Some(match k.as_str() {
        "Sval" => str_field(inner, "sval").to_string(),
        "Ival" => int_field(inner, "ival").to_string(),
        "Fval" => str_field(inner, "fval").to_string(),
        "Boolval" => bool_field(inner, "boolval").to_string(),
        "Bsval" => str_field(inner, "bsval").to_string(),
        _ => return None,
    })
}

/// PostgreSQL's `parse_bool` accepts unique prefixes; anything that is not clearly false counts as true.
fn is_false_text(s: &str) -> bool {
    let s = s.trim().to_lowercase();
    s == "0"
        || s == "of"
        || s == "off"
        || (!s.is_empty() && ("false".starts_with(&s) || "no".starts_with(&s)))
}

fn is_true_text(s: &str) -> bool {
    matches!(s.to_lowercase().as_str(), "on" | "true" | "yes" | "1" | "t" | "y")
}

/// `FROM pg_settings WHERE name = 'x'` (one relation, one equality): the setting `name` stands for.
fn pinned_setting(select: &Map<String, Value>) -> Option<String> {
    let [from] = list(select, "from_clause") else { return None };
    let ("RangeVar", rv) = tagged(from)? else { return None };
    if str_field(rv, "relname") != "pg_settings" || !matches!(str_field(rv, "schemaname"), "" | "pg_catalog")
    {
        return None;
    }
    let ("AExpr", e) = select.get("where_clause").and_then(tagged)? else { return None };
    if int_field(e, "kind") != 1 || exact_names(list(e, "name"))? != ["="] {
        return None;
    }
    let ("ColumnRef", c) = e.get("lexpr").and_then(tagged)? else { return None };
    if names(list(c, "fields"))? != ["name"] {
        return None;
    }
    e.get("rexpr").and_then(const_text)
}

/// Is this ORDER BY / GROUP BY / DISTINCT ON item (or a grouping set inside one) an output position?
fn positional(item: &Value) -> bool {
    match tagged(item) {
        Some(("SortBy", sb)) => sb.get("node").is_some_and(positional),
        Some(("GroupingSet", gs)) => list(gs, "content").iter().any(positional),
        Some(("RowExpr", r)) => list(r, "args").iter().any(positional),
        Some(("AConst", _)) => true,
        _ => false,
    }
}

/// Collect relation names and aliases (RangeVar, Alias, CTE names) anywhere in a statement.
fn collect_relnames(v: &Value, out: &mut HashSet<String>) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| collect_relnames(i, out)),
        Value::Object(m) => {
            for key in ["relname", "aliasname", "ctename"] {
                if let Some(s) = m.get(key).and_then(Value::as_str)
                    && !s.is_empty()
                {
                    out.insert(s.to_lowercase());
                }
            }
            m.values().for_each(|c| collect_relnames(c, out));
        }
        _ => {}
    }
}

/// The place a child field of `kind` is in, for messages: a clause always names it; an expression kind
/// only refines a place that names no clause.
fn place_of(kind: &str, field: &str, parent: &'static str) -> &'static str {
    let generic = matches!(parent, "the statement" | "an expression in the select list" | "EXPLAIN");
    match clause_of(field) {
        Some(p) => p,
        None if generic => place_of_kind(kind, field).unwrap_or(parent),
        None => parent,
    }
}

fn clause_of(field: &str) -> Option<&'static str> {
    Some(match field {
        "where_clause" => "WHERE",
        "quals" => "a JOIN condition",
        "sort_clause" => "ORDER BY",
        "group_clause" => "GROUP BY",
        "having_clause" => "HAVING",
        "distinct_clause" => "DISTINCT ON",
        "window_clause" | "over" => "a window definition",
        "limit_count" | "limit_offset" => "LIMIT/OFFSET",
        "returning_clause" | "returning_list" => "RETURNING",
        "values_lists" => "VALUES",
        _ => return None,
    })
}

fn place_of_kind(kind: &str, field: &str) -> Option<&'static str> {
    Some(match (kind, field) {
        (_, "from_clause") => "FROM",
        ("SelectStmt", "target_list") => "the select list of a subquery, CTE or set operation",
        ("FuncCall", _) => "a function call or aggregate",
        ("TypeCast", _) => "a cast",
        ("AExpr" | "BoolExpr" | "NullTest" | "BooleanTest", _) => "an expression",
        ("RowExpr", _) => "a row constructor",
        ("SubLink", _) => "a subquery expression",
        ("CaseExpr" | "CaseWhen", _) => "a CASE expression",
        ("CoalesceExpr" | "MinMaxExpr", _) => "COALESCE/GREATEST/LEAST",
        ("AIndirection" | "AArrayExpr" | "AIndices", _) => "an array or field access",
        ("CollateClause", _) => "COLLATE",
        ("XmlExpr" | "XmlSerialize", _) => "an XML constructor",
        ("CommonTableExpr", _) => "a WITH query",
        ("RangeSubselect", _) => "a subquery in FROM",
        ("RangeFunction", _) => "a function in FROM",
        ("InsertStmt", _) => "INSERT",
        ("UpdateStmt", _) => "UPDATE",
        ("DeleteStmt", _) => "DELETE",
        ("MergeStmt", _) => "MERGE",
        ("OnConflictClause" | "InferClause", _) => "ON CONFLICT",
        ("CopyStmt", _) => "COPY",
        (k, _) if k.starts_with("Json") => "a JSON constructor",
        _ => return None,
    })
}

/// The command tag of a top-level statement.
fn tag(kind: &str, body: &Map<String, Value>) -> String {
    let s = match kind {
        "SelectStmt" if body.get("into_clause").is_some_and(|v| !v.is_null()) => "SELECT INTO",
        "SelectStmt" => "SELECT",
        "InsertStmt" => "INSERT",
        "UpdateStmt" => "UPDATE",
        "DeleteStmt" => "DELETE",
        "MergeStmt" => "MERGE",
        "VariableSetStmt" if matches!(int_field(body, "kind"), 5 | 6) => "RESET",
        "VariableSetStmt" => "SET",
        "VariableShowStmt" => "SHOW",
        "ExplainStmt" => "EXPLAIN",
        "DeclareCursorStmt" => "DECLARE CURSOR",
        "FetchStmt" if bool_field(body, "ismove") => "MOVE",
        "FetchStmt" => "FETCH",
        "ClosePortalStmt" => "CLOSE CURSOR",
        "CreateStmt" => "CREATE TABLE",
        "CreateTableAsStmt" if int_field(body, "objtype") == 24 => "CREATE MATERIALIZED VIEW",
        "CreateTableAsStmt" => "CREATE TABLE AS",
        "ViewStmt" => "CREATE VIEW",
        "IndexStmt" => "CREATE INDEX",
        "CreateSeqStmt" => "CREATE SEQUENCE",
        "AlterSeqStmt" => "ALTER SEQUENCE",
        "CreateTrigStmt" => "CREATE TRIGGER",
        "RuleStmt" => "CREATE RULE",
        "DefineStmt" => "CREATE AGGREGATE/OPERATOR/TYPE",
        "CreateEnumStmt" | "CompositeTypeStmt" | "CreateRangeStmt" => "CREATE TYPE",
        "CreatedbStmt" => "CREATE DATABASE",
        "DropdbStmt" => "DROP DATABASE",
        "RenameStmt" => "ALTER ... RENAME",
        "GrantStmt" if bool_field(body, "is_grant") => "GRANT",
        "GrantStmt" => "REVOKE",
        "VacuumStmt" if bool_field(body, "is_vacuumcmd") => "VACUUM",
        "VacuumStmt" => "ANALYZE",
        "RefreshMatViewStmt" => "REFRESH MATERIALIZED VIEW",
        "CheckPointStmt" => "CHECKPOINT",
        "SecLabelStmt" => "SECURITY LABEL",
        "ConstraintsSetStmt" => "SET CONSTRAINTS",
        "LockStmt" => "LOCK TABLE",
        "TransactionStmt" => match int_field(body, "kind") {
            1 => "BEGIN",
            2 => "START TRANSACTION",
            3 => "COMMIT",
            4 | 7 => "ROLLBACK",
            5 => "SAVEPOINT",
            6 => "RELEASE",
            8 => "PREPARE TRANSACTION",
            9 => "COMMIT PREPARED",
            10 => "ROLLBACK PREPARED",
            _ => "TRANSACTION",
        },
        k => {
            let base = k.strip_suffix("Stmt").unwrap_or(k);
            let mut out = String::new();
            for (i, c) in base.chars().enumerate() {
                if c.is_ascii_uppercase() && i > 0 {
                    out.push(' ');
                }
                out.push(c.to_ascii_uppercase());
            }
            return out;
        }
    };
    s.to_string()
}

impl Walker<'_> {
    /// Visit one node of `kind`.
    fn node(&mut self, kind: &str, body: &Map<String, Value>, ctx: Ctx) -> Result<(), Refused> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(Refused {
                sqlstate: SYNTAX,
                message: "warden: the statement is nested too deeply".into(),
            });
        }
        let r = self.admit(kind, body).and_then(|()| self.visit(kind, body, ctx));
        self.depth -= 1;
        r
    }

    /// Is a node of this kind allowed here at all?
    fn admit(&self, kind: &str, body: &Map<String, Value>) -> Result<(), Refused> {
        if CONTROL_KINDS.contains(&kind) {
            return Err(Refused::control(tag(kind, body)));
        }
        // LOCK ... IN ACCESS SHARE MODE takes the lock any SELECT takes (pg_dump sends it).
        if READ_KINDS.contains(&kind) || (kind == "LockStmt" && int_field(body, "mode") == 1) {
            return Ok(());
        }
        if self.read {
            return Err(match kind {
                "LockingClause" => Refused::read("SELECT ... FOR UPDATE/SHARE (it takes row locks)"),
                "IntoClause" => Refused::read("SELECT INTO (it creates a table)"),
                k if k.ends_with("Stmt") => Refused::read(tag(k, body)),
                "?" => Refused::read("a clause Warden does not know"),
                k => Refused::read(format!("a {k} clause")),
            });
        }
        if self.masks.active() && !MASKED_WRITE_KINDS.contains(&kind) {
            return Err(Refused::masked(format!(
                "{} is refused (schema changes and server-side code can copy, rename or expose a masked \
                 column)",
                if kind.ends_with("Stmt") { tag(kind, body) } else { format!("a {kind} clause") }
            )));
        }
        Ok(())
    }

    /// Visit the children of a node: every field, tagged or not.
    fn children(
        &mut self,
        kind: &str,
        body: &Map<String, Value>,
        ctx: Ctx,
        skip: &[&str],
    ) -> Result<(), Refused> {
        for (field, v) in body {
            if skip.contains(&field.as_str()) {
                continue;
            }
            let child = Ctx { output: false, place: place_of(kind, field, ctx.place) };
            self.value(kind, field, v, child)?;
        }
        Ok(())
    }

    fn value(&mut self, parent: &str, field: &str, v: &Value, ctx: Ctx) -> Result<(), Refused> {
        match v {
            Value::Array(items) => {
                for i in items {
                    self.value(parent, field, i, ctx)?;
                }
                Ok(())
            }
            Value::Object(m) if is_wrapper(m) => match tagged(v) {
                Some((k, b)) => self.node(k, b, ctx),
                None if m.get("node").is_some_and(Value::is_null) => Ok(()),
                None => self.node("?", m, ctx),
            },
            Value::Object(m) => self.node(untagged_kind(parent, field), m, ctx),
            _ => Ok(()),
        }
    }

    /// Visit one tagged child field with an explicit context.
    fn field(
        &mut self,
        parent: &str,
        body: &Map<String, Value>,
        field: &str,
        ctx: Ctx,
    ) -> Result<(), Refused> {
        match body.get(field) {
            Some(v) => self.value(parent, field, v, ctx),
            None => Ok(()),
        }
    }

    fn visit(&mut self, kind: &str, body: &Map<String, Value>, ctx: Ctx) -> Result<(), Refused> {
        match kind {
            "AConst" => Ok(()),
            "SelectStmt" => self.select(body, ctx),
            "ResTarget" => {
                let plain = ctx.output && matches!(body.get("val").and_then(tagged), Some(("ColumnRef", _)));
                let place = if ctx.output { "an expression in the select list" } else { ctx.place };
                self.field(kind, body, "val", Ctx { output: plain, place })?;
                self.children(kind, body, ctx, &["val"])
            }
            "ColumnRef" => self.column_ref(body, ctx),
            "String" => self.string(body, ctx),
            "FuncCall" => {
                self.func_call(body)?;
                self.children(kind, body, ctx, &["funcname"])
            }
            "TypeName" => {
                self.type_name(body)?;
                self.children(kind, body, ctx, &["names"])
            }
            "AExpr" => {
                if !matches!(int_field(body, "kind"), 11..=14) {
                    self.operator(list(body, "name"))?;
                }
                self.children(kind, body, ctx, &["name"])
            }
            "SortBy" => {
                self.operator(list(body, "use_op"))?;
                self.children(kind, body, ctx, &["use_op"])
            }
            "SubLink" => {
                self.operator(list(body, "oper_name"))?;
                // EXISTS discards its subquery's values: its select list is as harmless as an output one.
                let exists = int_field(body, "sub_link_type") == 1;
                self.field(kind, body, "subselect", Ctx { output: exists, place: "a subquery expression" })?;
                self.children(kind, body, ctx, &["oper_name", "subselect"])
            }
            "RangeVar" => {
                self.range_var(body)?;
                self.children(kind, body, ctx, &[])
            }
            "JoinExpr" => {
                if self.masks.active() {
                    if bool_field(body, "is_natural") {
                        return Err(Refused::masked(
                            "NATURAL JOIN compares columns by name, masked ones included; use JOIN ... ON",
                        ));
                    }
                    Self::renaming_alias(body, "a join")?;
                }
                self.children(kind, body, ctx, &[])
            }
            "InsertStmt" | "UpdateStmt" | "OnConflictClause" | "MergeWhenClause" if self.masks.active() => {
                self.assignments(kind, body)?;
                self.children(kind, body, ctx, &[])
            }
            "IndexElem" => {
                let name = str_field(body, "name").to_lowercase();
                if self.masks.active() && self.masks.cols.contains(&name) {
                    return Err(Refused::mask(&name, ctx.place));
                }
                self.children(kind, body, ctx, &[])
            }
            "VariableSetStmt" => self.variable_set(body),
            "TransactionStmt" => {
                let k = int_field(body, "kind");
                if self.read && matches!(k, 8..=10) {
                    return Err(Refused::read(format!(
                        "{} (two-phase commit keeps a transaction past the session)",
                        tag(kind, body)
                    )));
                }
                if self.read && matches!(k, 1 | 2) {
                    Self::transaction_options(list(body, "options"))?;
                }
                Ok(())
            }
            "ExplainStmt" => {
                if self.read {
                    for o in list(body, "options") {
                        if let Some(("DefElem", d)) = tagged(o)
                            && matches!(
                                str_field(d, "defname").to_lowercase().as_str(),
                                "analyze" | "analyse"
                            )
                            && d.get("arg").and_then(const_text).is_none_or(|v| !is_false_text(&v))
                        {
                            return Err(Refused::read("EXPLAIN ANALYZE (it runs the statement)"));
                        }
                    }
                }
                self.field(kind, body, "query", Ctx { output: true, place: "EXPLAIN" })?;
                self.children(kind, body, ctx, &["query"])
            }
            "DeclareCursorStmt" | "PrepareStmt" => {
                if kind == "PrepareStmt" {
                    self.effects.push(SessionEffect::Prepare(str_field(body, "name").to_string()));
                }
                self.field(kind, body, "query", Ctx { output: true, place: "the statement" })?;
                self.children(kind, body, ctx, &["query"])
            }
            "ExecuteStmt" => {
                self.effects.push(SessionEffect::Execute(str_field(body, "name").to_string()));
                self.children(kind, body, ctx, &[])
            }
            "DeallocateStmt" => {
                let name = str_field(body, "name");
                self.effects.push(if bool_field(body, "isall") || name.is_empty() {
                    SessionEffect::DeallocateAll
                } else {
                    SessionEffect::Deallocate(name.to_string())
                });
                Ok(())
            }
            "DiscardStmt" => {
                if int_field(body, "target") == 1 {
                    self.effects.push(SessionEffect::DeallocateAll);
                }
                Ok(())
            }
            "CopyStmt" => self.copy(body, ctx),
            _ => self.children(kind, body, ctx, &[]),
        }
    }

    fn select(&mut self, body: &Map<String, Value>, ctx: Ctx) -> Result<(), Refused> {
        if body.get("into_clause").is_some_and(|v| !v.is_null()) {
            if self.read {
                return Err(Refused::read("SELECT INTO (it creates a table)"));
            }
            if self.masks.active() {
                return Err(Refused::masked("SELECT INTO would copy masked columns into a table"));
            }
        }
        // A set operation's result columns have no source, so its arms are never output lists.
        let output = ctx.output && int_field(body, "op") <= 1;
        if output && self.masks.active() {
            self.output_masks(body)?;
        }
        let outer_pin = std::mem::replace(&mut self.pinned_setting, pinned_setting(body));
        let r = self.field(
            "SelectStmt",
            body,
            "target_list",
            Ctx { output, place: "the select list of a subquery, CTE or set operation" },
        );
        self.pinned_setting = outer_pin;
        r?;
        self.children("SelectStmt", body, ctx, &["target_list"])
    }

    /// For an output select list under masks: remember the output names of masked columns, and refuse
    /// positional `ORDER BY`/`GROUP BY`/`DISTINCT ON` when a masked column (or `*`) is in the list.
    fn output_masks(&mut self, body: &Map<String, Value>) -> Result<(), Refused> {
        let mut masked = false;
        for t in list(body, "target_list") {
            let Some(("ResTarget", rt)) = tagged(t) else { continue };
            let Some(("ColumnRef", cr)) = rt.get("val").and_then(tagged) else { continue };
            let fields = list(cr, "fields");
            let star = fields.last().and_then(tagged).is_some_and(|(k, _)| k == "AStar");
            let col = names(fields).and_then(|n| n.last().cloned());
            if star || col.as_ref().is_some_and(|c| self.masks.cols.contains(c)) {
                masked = true;
                let alias = str_field(rt, "name").to_lowercase();
                if !alias.is_empty() {
                    self.output_aliases.insert(alias);
                }
            }
        }
        if !masked {
            return Ok(());
        }
        for (field, place) in
            [("sort_clause", "ORDER BY"), ("group_clause", "GROUP BY"), ("distinct_clause", "DISTINCT ON")]
        {
            for item in list(body, field) {
                if positional(item) {
                    return Err(Refused::masked(format!(
                        "a position in {place} can refer to a masked column; name the column (unmasked) instead"
                    )));
                }
            }
        }
        Ok(())
    }

    fn column_ref(&mut self, body: &Map<String, Value>, ctx: Ctx) -> Result<(), Refused> {
        if !self.masks.active() {
            return Ok(());
        }
        let fields = list(body, "fields");
        if fields.last().and_then(tagged).is_some_and(|(k, _)| k == "AStar") {
            if ctx.output {
                for (table, _, entry) in &self.masks.entries {
                    if table.as_ref().is_none_or(|t| self.relnames.contains(t)) {
                        self.applied.insert(entry.clone());
                    }
                }
                return Ok(());
            }
            return Err(Refused::masked(format!(
                "`*` in {} would carry masked columns; name the columns instead",
                ctx.place
            )));
        }
        let Some(parts) = names(fields) else {
            return Err(Refused::masked("a column reference Warden cannot read is refused"));
        };
        let Some(col) = parts.last() else { return Ok(()) };
        if parts.len() == 1 && self.relnames.contains(col) && !self.masks.cols.contains(col) {
            return Err(Refused::masked(format!(
                "\"{col}\" as a whole-row value would carry masked columns; name the columns instead"
            )));
        }
        if self.masks.cols.contains(col) || self.output_aliases.contains(col) {
            if !ctx.output {
                return Err(Refused::mask(col, ctx.place));
            }
            let mut any = false;
            for (table, c, entry) in &self.masks.entries {
                if c == col && table.as_ref().is_none_or(|t| self.relnames.contains(t)) {
                    self.applied.insert(entry.clone());
                    any = true;
                }
            }
            if !any {
                for (_, c, entry) in &self.masks.entries {
                    if c == col {
                        self.applied.insert(entry.clone());
                    }
                }
            }
        }
        Ok(())
    }

    fn string(&self, body: &Map<String, Value>, ctx: Ctx) -> Result<(), Refused> {
        let s = str_field(body, "sval").to_lowercase();
        if self.masks.active() && self.masks.cols.contains(&s) {
            return Err(Refused::mask(&s, ctx.place));
        }
        Ok(())
    }

    fn func_call(&self, body: &Map<String, Value>) -> Result<(), Refused> {
        let Some(parts) = exact_names(list(body, "funcname")) else {
            return Err(Refused::read("a function whose name Warden cannot read"));
        };
        let (schema, name) = match parts.as_slice() {
            [n] => (None, n.as_str()),
            [s, n] => (Some(s.as_str()), n.as_str()),
            _ => (Some(""), parts.last().map_or("", String::as_str)),
        };
        // set_config is judged by its (constant) arguments below, like SET.
        let listed = lists::function_allowed(name) || name == "set_config";
        let builtin = match schema {
            None => listed && !self.shadowed.contains(name),
            Some(s) => s == "pg_catalog" && listed,
        };
        let shown = parts.join(".");
        if !builtin {
            if self.read && schema.is_none() && self.shadowed.contains(name) {
                return Err(Refused::read(format!(
                    "function {shown}() (a function written by a database user overloads this built-in name; \
                     call pg_catalog.{name}() instead)"
                )));
            }
            if self.read {
                return Err(Refused::read(format!(
                    "function {shown}() (it is not on Warden's list of built-in functions known not to write)"
                )));
            }
            if self.masks.active() {
                return Err(Refused::masked(format!(
                    "function {shown}() is refused (it is not on Warden's list of built-in functions, and could \
                     read a masked column)"
                )));
            }
        }
        if schema.is_none_or(|s| s == "pg_catalog") && name == "set_config" {
            let args = list(body, "args");
            let setting = args.first().and_then(const_text).or_else(|| {
                let by_name = args.first().and_then(tagged).is_some_and(|(k, b)| {
                    k == "ColumnRef" && names(list(b, "fields")).is_some_and(|n| n == ["name"])
                });
                by_name.then(|| self.pinned_setting.clone()).flatten()
            });
            let value = args.get(1).and_then(const_text);
            let (Some(setting), Some(value)) = (setting, value) else {
                return Err(if self.read {
                    Refused::read("set_config() with a computed setting name or value")
                } else {
                    Refused::control("set_config() with a computed setting name or value")
                });
            };
            setting_rule(&setting.to_lowercase(), &[value], false, self.read)?;
        }
        Ok(())
    }

    fn type_name(&self, body: &Map<String, Value>) -> Result<(), Refused> {
        if !self.read && !self.masks.active() {
            return Ok(());
        }
        let parts = exact_names(list(body, "names")).unwrap_or_default();
        let ok = !bool_field(body, "pct_type")
            && match parts.as_slice() {
                [t] => lists::type_allowed(t),
                [s, t] => s == "pg_catalog" && lists::type_allowed(t),
                _ => false,
            };
        if ok {
            return Ok(());
        }
        let shown = parts.join(".");
        if self.read {
            Err(Refused::read(format!(
                "a cast to type {shown} (only built-in types are known to be side-effect free)"
            )))
        } else {
            Err(Refused::masked(format!(
                "a cast to type {shown} is refused (only built-in types are allowed)"
            )))
        }
    }

    fn operator(&self, name: &[Value]) -> Result<(), Refused> {
        if name.is_empty() || (!self.read && !self.masks.active()) {
            return Ok(());
        }
        let parts = exact_names(name).unwrap_or_default();
        let ok = match parts.as_slice() {
            [op] => lists::operator_allowed(op) && !self.shadowed.contains(op.as_str()),
            [s, op] => s == "pg_catalog" && lists::operator_allowed(op),
            _ => false,
        };
        if ok {
            return Ok(());
        }
        let shown = parts.join(".");
        if self.read {
            Err(Refused::read(format!("operator {shown} (only built-in operators are allowed)")))
        } else {
            Err(Refused::masked(format!("operator {shown} is refused (only built-in operators are allowed)")))
        }
    }

    fn range_var(&self, body: &Map<String, Value>) -> Result<(), Refused> {
        if !self.masks.active() {
            return Ok(());
        }
        let rel = str_field(body, "relname").to_lowercase();
        if lists::exposes_values(&rel) || self.tainted.contains(rel.as_str()) {
            return Err(Refused::masked(format!(
                "relation \"{rel}\" is refused (it exposes values of a masked column: a view over one, or \
                 statistics); query the table itself"
            )));
        }
        Self::renaming_alias(body, "a table")
    }

    /// `FROM t AS x(a, b)` renames a table's columns, so a masked column would go by another name.
    fn renaming_alias(body: &Map<String, Value>, what: &str) -> Result<(), Refused> {
        let renames =
            body.get("alias").and_then(Value::as_object).is_some_and(|a| !list(a, "colnames").is_empty());
        if renames {
            return Err(Refused::masked(format!(
                "renaming the columns of {what} in FROM would hide a masked column's name; alias columns in \
                 the select list instead"
            )));
        }
        Ok(())
    }

    fn transaction_options(options: &[Value]) -> Result<(), Refused> {
        for o in options {
            if let Some(("DefElem", d)) = tagged(o)
                && str_field(d, "defname") == "transaction_read_only"
                && !d.get("arg").and_then(const_text).is_some_and(|v| is_true_text(&v))
            {
                return Err(Refused::read("a READ WRITE transaction"));
            }
        }
        Ok(())
    }

    fn variable_set(&self, body: &Map<String, Value>) -> Result<(), Refused> {
        let kind = int_field(body, "kind");
        let name = str_field(body, "name").to_lowercase();
        match kind {
            6 => Ok(()),
            4 => {
                if self.read && matches!(name.as_str(), "transaction" | "session characteristics") {
                    Self::transaction_options(list(body, "args"))?;
                }
                if self.read
                    && !matches!(
                        name.as_str(),
                        "transaction" | "session characteristics" | "transaction snapshot"
                    )
                {
                    return Err(Refused::read(format!("SET {}", name.to_uppercase())));
                }
                Ok(())
            }
            _ => {
                let values: Vec<String> =
                    list(body, "args").iter().map(|a| const_text(a).unwrap_or_else(|| "?".into())).collect();
                setting_rule(&name, &values, matches!(kind, 2 | 5), self.read)
            }
        }
    }

    fn copy(&mut self, body: &Map<String, Value>, ctx: Ctx) -> Result<(), Refused> {
        if bool_field(body, "is_program") || !str_field(body, "filename").is_empty() {
            return Err(Refused::control("COPY to or from a server file or program"));
        }
        let from = bool_field(body, "is_from");
        if self.read && from {
            return Err(Refused::read("COPY FROM (it writes rows)"));
        }
        if self.masks.active() && !from {
            return Err(Refused::masked(
                "COPY ... TO is refused (it sends values outside the row description Warden masks by); select \
                 the columns instead",
            ));
        }
        if self.masks.active() && from {
            let cols = names(list(body, "attlist")).unwrap_or_default();
            if cols.is_empty() {
                return Err(Refused::masked(
                    "COPY FROM without a column list may write a masked column; list the columns",
                ));
            }
            if let Some(c) = cols.iter().find(|c| self.masks.cols.contains(*c)) {
                return Err(Self::write_refusal(c));
            }
        }
        self.children("CopyStmt", body, ctx, &["attlist"])
    }

    /// Under masks, a masked column may not be written: a unique or foreign-key violation would answer
    /// whether a guessed value exists (the probing `WHERE email = ...` is refused for).
    fn assignments(&self, kind: &str, body: &Map<String, Value>) -> Result<(), Refused> {
        let field = if kind == "InsertStmt" { "cols" } else { "target_list" };
        let targets = list(body, field);
        let inserts =
            kind == "InsertStmt" || (kind == "MergeWhenClause" && int_field(body, "command_type") == 4);
        if inserts
            && targets.is_empty()
            && !(kind == "InsertStmt" && body.get("select_stmt").is_none_or(Value::is_null))
        {
            return Err(Refused::masked(
                "INSERT without a column list may write a masked column; list the columns",
            ));
        }
        for t in targets {
            let Some(("ResTarget", rt)) = tagged(t) else { continue };
            let name = str_field(rt, "name").to_lowercase();
            if self.masks.cols.contains(&name) {
                return Err(Self::write_refusal(&name));
            }
        }
        Ok(())
    }

    fn write_refusal(col: &str) -> Refused {
        Refused::masked(format!(
            "writing masked column \"{col}\" is refused (a unique or foreign-key violation would tell whether a \
             guessed value exists)"
        ))
    }
}

#[cfg(test)]
mod tests;
