//! The relay state machine of one admitted session.
//!
//! Client messages are read one at a time: every `Query` and `Parse` is classified first; a refusal never
//! reaches the upstream. Every execution (`Query`, `Execute`, `FunctionCall`) is recorded as `pg.query`
//! *before* it is forwarded, and its outcome (rows, command tags, SQLSTATE, duration) as `pg.result` when
//! the upstream finishes it. Responses are matched to requests through a queue of what the upstream owes
//! (one entry per forwarded message), which lets Warden
//! - put its own `ErrorResponse` at the right place in a pipeline: on a refusal it sends the upstream a
//!   `Parse` that fails and a `Sync` of its own, and writes the error when that `Sync`'s `ReadyForQuery`
//!   comes back, after everything forwarded before; the upstream's failure aborts a transaction block as
//!   the refusal does for the client, so both sides agree on the state (`E`); in the extended protocol
//!   Warden then drops the client's messages up to its `Sync`, as a server does after an error;
//! - know which `RowDescription` describes the `DataRow`s that follow: with masks in force, Warden sends a
//!   `Describe` of the portal before every `Execute` (and swallows the answer), so the format codes the
//!   client chose in `Bind` are known per column.
//!
//! A fastpath `FunctionCall` names its function by OID: Warden holds it (and reads nothing more from the
//! client) until the upstream owes nothing, resolves the OID with a catalog query of its own on the
//! session's connection, and checks the function against the classifier's allow-list.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::time::Instant;

use postgres_protocol::message::frontend;

use super::upstream::{self, Upstream};
use super::wire::{self, Conn, Frame, Reader, WireError};
use super::{Connected, Greeting, Shared, classify, mask, pool};
use crate::policy::PostgresTarget;
use crate::protocol::{End, Session};

/// An execution recorded as `pg.query`, waiting for its outcome.
#[derive(Debug)]
struct Pending {
    n: u64,
    started: Instant,
    rows: u64,
    commands: Vec<String>,
    sqlstate: Option<String>,
    error: Option<String>,
}

/// What the upstream owes for one forwarded message.
#[derive(Debug)]
enum Expect {
    /// A simple `Query`: everything up to `ReadyForQuery`.
    Simple(Pending),
    /// A `FunctionCall`: `FunctionCallResponse`, then `ReadyForQuery`.
    Function(Pending),
    Parse,
    Bind,
    Close,
    /// `ParameterDescription`? then `RowDescription` or `NoData`; `ours`: Warden's own, swallowed.
    Describe {
        ours: bool,
    },
    Execute(Pending),
    /// Warden's own failing `Parse` (see [`ABORT_TEXT`]): its `ErrorResponse` is swallowed.
    Abort,
    /// `ReadyForQuery`; `refusal`: Warden's own `Sync` carrying an error to write in its place.
    Sync {
        refusal: Option<Refusal>,
    },
}

/// What Warden has the upstream parse on a refusal: a syntax error (or, if a client prepared a statement of
/// that name, a duplicate-name error), never anything that runs. Failing upstream aborts the transaction
/// block, or the extended protocol's implicit transaction, exactly as a server's own error would, so the
/// `ReadyForQuery` status the client then gets (`E` in a block) is the upstream's real state and a later
/// `COMMIT` commits nothing.
const ABORT_STATEMENT: &str = "warden: refused";
const ABORT_TEXT: &str = "warden refused a statement here";

#[derive(Debug)]
struct Refusal {
    error: Frame,
    /// Simple protocol: the client also gets the `ReadyForQuery`.
    simple: bool,
}

struct Statement {
    text: String,
    masks: Vec<String>,
}

/// A function a fastpath call's OID resolved to in the upstream's catalog.
#[derive(Debug, Clone)]
struct Function {
    schema: String,
    name: String,
    /// `name(argument types)`.
    signature: String,
}

/// What the settings the upstream reports must stay for this session ([`classify::check_parameter_status`]).
struct Pinned<'a> {
    access: crate::policy::Access,
    /// The login Warden made upstream (`session_authorization`).
    user: &'a str,
}

impl Pinned<'_> {
    fn check(&self, name: &str, value: &str) -> Result<(), classify::Refused> {
        classify::check_parameter_status(name, value, self.access, self.user)
    }
}

/// Function OIDs resolved per session, at most.
const MAX_FUNCTIONS: usize = 256;

struct Portal {
    text: String,
    masks: Vec<String>,
    params: serde_json::Value,
}

/// How the relay loop stops.
enum Stop {
    /// The client ended the session cleanly (`Terminate` or EOF between messages).
    Clean,
    End(End),
}

struct Relay<'a> {
    shared: &'a Shared,
    session: &'a Session,
    pg: &'a PostgresTarget,
    client: Conn,
    up: Upstream,
    expect: VecDeque<Expect>,
    skipping: bool,
    statements: HashMap<String, Statement>,
    portals: HashMap<String, Portal>,
    /// The resolved masks (empty: no masking).
    masks: mask::MaskSet,
    /// What the classifier knows of this session: statements it saw prepared, views over masked columns.
    state: classify::SessionState,
    masking: bool,
    /// For the current result set: per column, `Some((type oid, format))` when masked.
    masked: Vec<Option<(u32, i16)>>,
    status: u8,
    queries: u64,
    /// A fastpath `FunctionCall` waiting for the upstream to owe nothing, so Warden can look its OID up;
    /// the client's later messages wait behind it.
    held: Option<Frame>,
    functions: HashMap<u32, Option<Function>>,
    /// The fields every record of this session starts with ([`Session::record`]), serialised once.
    base: Option<std::sync::Arc<crate::audit::SharedFields>>,
}

fn client_fatal(client: &mut Conn, code: &str, message: &str) {
    client.send(&wire::error_response("FATAL", code, message));
}

pub(super) async fn run(g: Greeting, session: Session) -> End {
    let Greeting { shared, mut client, hello, target, negotiate, client_params, upstream, timing } = g;
    let run_start = timing.start.elapsed();
    let crate::policy::TargetKind::Postgres(pg) = &target.kind else {
        return End::ProtocolError { detail: "not a postgres target".into() };
    };
    let database = hello.database.clone().unwrap_or_default();
    let access = session.terms.access;
    let login = pg.credentials.for_access(access);
    let up = match upstream {
        Some(Connected::Pooled(up)) => Ok(up),
        Some(Connected::Fresh(tcp, dst)) => {
            let tls = if pg.tls == crate::policy::TlsMode::Disable {
                Ok(None)
            } else {
                shared.upstream_tls(&target, pg).map(Some)
            };
            match tls {
                Ok(tls) => {
                    let spec = upstream::LoginSpec {
                        target: &target,
                        pg,
                        tls,
                        login,
                        database: &database,
                        access,
                        client_params: &client_params,
                    };
                    tokio::select! {
                        r = upstream::login(tcp, dst, &spec) => r,
                        end = session.cut.cut_with() => Err(end),
                    }
                }
                Err(e) => Err(End::UpstreamRefused { detail: e }),
            }
        }
        None => Err(End::UpstreamUnreachable { detail: "connect was not called".into() }),
    };
    let mut up = match up {
        Ok(up) => up,
        Err(end) => {
            let code = if end.is_cut() { "57P01" } else { "08006" };
            client_fatal(&mut client, code, &format!("warden: cannot open the upstream session: {end}"));
            let _ = client.flush().await;
            return end;
        }
    };
    let resolved = if session.terms.mask.is_empty() {
        mask::Resolved::default()
    } else {
        match resolve_masks(&mut up, &session.terms.mask, &Pinned { access, user: &login.user }).await {
            Ok(m) => m,
            Err(end) => {
                client_fatal(
                    &mut client,
                    "08006",
                    &format!("warden: cannot resolve the grant's masks: {end}"),
                );
                let _ = client.flush().await;
                return end;
            }
        }
    };
    // The client's startup answer: version negotiation, no password asked, the upstream's parameters, a
    // cancel key of Warden's own.
    if let Some(unknown) = &negotiate {
        client.send(&wire::negotiate_protocol_version(unknown));
    }
    client.send(&wire::authentication_ok());
    for (k, v) in &up.params {
        client.send(&wire::parameter_status(k, v));
    }
    let key = shared.keys.mint(super::cancel::Issued {
        session: session.id.clone(),
        tagged_cgroup: session.origin.tagged_cgroup,
        upstream: up.dst,
        backend: up.backend,
    });
    client.send(&wire::backend_key_data(key.0, key.1));
    client.send(&wire::ready_for_query(b'I'));
    let login_done = timing.start.elapsed();
    if client.flush().await.is_err() {
        shared.keys.withdraw(key);
        tokio::spawn(abandon(up));
        return End::ClientError;
    }
    timing.log(run_start, login_done);
    let pool_key = pool::Key {
        target: target.name.clone(),
        dst: up.dst,
        user: login.user.clone(),
        password_file: login.password_file.clone(),
        database,
        access,
        client_params,
    };
    let masking = !session.terms.mask.is_empty();
    let mut relay = Relay {
        shared: &shared,
        session: &session,
        pg,
        client,
        up,
        expect: VecDeque::new(),
        skipping: false,
        statements: HashMap::new(),
        portals: HashMap::new(),
        masks: resolved.set,
        state: classify::SessionState::new(resolved.tainted),
        masking,
        masked: Vec::new(),
        status: b'I',
        queries: 0,
        held: None,
        functions: HashMap::new(),
        base: crate::audit::SharedFields::new(session.record("pg.query").fields).ok(),
    };
    let stop = relay.relay().await;
    shared.keys.withdraw(key);
    let Relay { mut client, up, expect, status, .. } = relay;
    match stop {
        Stop::Clean => {
            if expect.is_empty() && status == b'I' {
                // Reset by the pool's task, off this session's path.
                shared.pool.put(pool_key, up);
            } else {
                tokio::spawn(abandon(up));
            }
            End::ClientClosed
        }
        Stop::End(end) => {
            if end.is_cut() {
                client_fatal(&mut client, "57P01", &format!("warden: the session was ended: {end}"));
            } else if let End::ProtocolError { detail } = &end {
                client_fatal(&mut client, "08P01", &format!("warden: {detail}"));
            }
            let _ = client.flush().await;
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut client.io).await;
            tokio::spawn(abandon(up));
            end
        }
    }
}

/// Drops an upstream connection that may be busy: cancels what it runs, then terminates it.
async fn abandon(up: Upstream) {
    let _ = super::cancel::send(up.dst, up.backend).await;
    upstream::close(up).await;
}

/// Runs one simple query on an idle upstream connection, returning its rows (text) and failing on error.
/// A `NotificationResponse` (LISTEN/NOTIFY) that arrives meanwhile belongs to the client: it is kept in
/// `notices` for the caller to relay. Every `ParameterStatus` is checked as in the relay
/// ([`classify::check_parameter_status`]).
async fn simple(
    up: &mut Upstream,
    sql: &str,
    expected: &Pinned<'_>,
    notices: &mut Vec<Frame>,
) -> Result<Vec<Vec<Option<String>>>, End> {
    let broken = |e: &dyn std::fmt::Display| End::UpstreamRefused { detail: format!("upstream: {e}") };
    up.conn.send_raw(&wire::encoded(|b| frontend::query(sql, b)));
    up.conn.flush().await.map_err(|e| broken(&e))?;
    let mut rows = Vec::new();
    let mut error = None;
    loop {
        let f = up.conn.next().await.map_err(|e| broken(&e))?.ok_or_else(|| broken(&"closed"))?;
        match f.tag {
            b'D' => {
                let mut r = Reader::new(&f.body);
                let n = r.i16().map_err(|e| broken(&e))?;
                let mut row = Vec::new();
                for _ in 0..n {
                    row.push(
                        r.value().map_err(|e| broken(&e))?.map(|v| String::from_utf8_lossy(v).into_owned()),
                    );
                }
                rows.push(row);
            }
            b'E' => error = Some(wire::parse_error(&f.body)),
            b'S' => {
                let mut r = Reader::new(&f.body);
                let (k, v) = (r.cstr().map_err(|e| broken(&e))?, r.cstr().map_err(|e| broken(&e))?);
                if let Err(r) = expected.check(k, v) {
                    return Err(End::UpstreamRefused { detail: r.message });
                }
                up.set_param(k, v);
            }
            b'A' => notices.push(f),
            b'Z' => {
                return match error {
                    Some(e) => Err(End::UpstreamRefused { detail: format!("{}: {}", e.code, e.message) }),
                    None => Ok(rows),
                };
            }
            _ => {}
        }
    }
}

/// The grant's masks resolved on this upstream connection's catalog: the masked columns by (table oid,
/// attnum) and the views that expose one (cached per connection and mask list).
async fn resolve_masks(
    up: &mut Upstream,
    mask: &[String],
    expected: &Pinned<'_>,
) -> Result<mask::Resolved, End> {
    if let Some((list, resolved)) = &up.masks
        && list == mask
    {
        return Ok(resolved.clone());
    }
    // Before the client is greeted no notification can be owed to it.
    let rows = simple(up, &mask::resolve_query(mask), expected, &mut Vec::new()).await?;
    let rows: Vec<[&str; 5]> = rows
        .iter()
        .map(|r| std::array::from_fn(|i| r.get(i).and_then(Option::as_deref).unwrap_or("")))
        .collect();
    let resolved = mask::resolved(mask, &rows)
        .map_err(|e| End::UpstreamRefused { detail: format!("cannot resolve the grant's masks: {e}") })?;
    up.masks = Some((mask.to_vec(), resolved.clone()));
    Ok(resolved)
}

fn tag_of(f: &Frame) -> String {
    Reader::new(&f.body).cstr().unwrap_or_default().to_owned()
}

impl Relay<'_> {
    async fn relay(&mut self) -> Stop {
        // One wait on the cut for the whole session (not a new waiter per message).
        let session = self.session;
        let cut = session.cut.cut_with();
        tokio::pin!(cut);
        loop {
            if !self.up.conn.out.is_empty()
                && let Err(e) = self.up.conn.flush().await
            {
                tracing::debug!(error = %e, "upstream write failed");
                return Stop::End(End::UpstreamError);
            }
            if !self.client.out.is_empty() && self.client.flush().await.is_err() {
                return Stop::End(End::ClientError);
            }
            if self.expect.is_empty()
                && let Some(f) = self.held.take()
            {
                let r = tokio::select! {
                    end = &mut cut => Err(Stop::End(end)),
                    r = self.function_call(&f) => r,
                };
                if let Err(stop) = r {
                    let _ = self.client.flush().await;
                    return stop;
                }
                continue;
            }
            let stop = tokio::select! {
                end = &mut cut => Some(Stop::End(end)),
                f = self.client.next(), if self.held.is_none() => self.on_client_batch(f),
                f = self.up.conn.next() => self.on_upstream_batch(f),
            };
            if let Some(stop) = stop {
                // What was already answered still reaches the client.
                let _ = self.client.flush().await;
                return stop;
            }
        }
    }

    fn on_client_batch(&mut self, first: Result<Option<Frame>, WireError>) -> Option<Stop> {
        let mut next = first;
        loop {
            let f = match next {
                Ok(Some(f)) => f,
                Ok(None) => return Some(Stop::Clean),
                Err(WireError::Io(_)) => return Some(Stop::End(End::ClientError)),
                Err(e) => return Some(Stop::End(End::ProtocolError { detail: format!("client: {e}") })),
            };
            self.session.counters.up.fetch_add(f.wire_len() as u64, Ordering::Relaxed);
            if let Err(stop) = self.on_client(&f) {
                return Some(stop);
            }
            if self.held.is_some() {
                return None;
            }
            next = match self.client.try_next() {
                Ok(None) => return None,
                r => r,
            };
        }
    }

    fn on_upstream_batch(&mut self, first: Result<Option<Frame>, WireError>) -> Option<Stop> {
        let mut next = first;
        loop {
            let f = match next {
                Ok(Some(f)) => f,
                Ok(None) => return Some(Stop::End(End::UpstreamClosed)),
                Err(e) => {
                    tracing::debug!(error = %e, "upstream read failed");
                    return Some(Stop::End(End::UpstreamError));
                }
            };
            if let Err(stop) = self.on_upstream(&f) {
                return Some(stop);
            }
            // Keep the client's buffer bounded while a large result streams.
            if self.client.out.len() > 256 * 1024 {
                return None;
            }
            next = match self.up.conn.try_next() {
                Ok(None) => return None,
                r => r,
            };
        }
    }

    /// A record of this session's with its common fields.
    fn record(&self, event: &str) -> crate::audit::Record {
        match &self.base {
            Some(base) => crate::audit::Record::with_shared(event, base.clone()),
            None => self.session.record(event),
        }
    }

    fn append(&self, record: crate::audit::Record) -> Result<(), Stop> {
        self.session.audit.append(record).map_err(|e| {
            tracing::warn!(error = %e, session = %self.session.id, "pg record could not be queued; ending the session");
            Stop::End(End::AuditUnavailable)
        })
    }

    /// Records an execution before it is forwarded.
    fn record_query(
        &mut self,
        protocol: &str,
        text: &str,
        statements: Option<usize>,
        masks: &[String],
        params: Option<serde_json::Value>,
    ) -> Result<Pending, Stop> {
        self.queries += 1;
        let mut r = self
            .record("pg.query")
            .field("n", self.queries)
            .field("protocol", protocol)
            .field("text", text)
            .field("access", self.session.terms.access.as_str());
        if let Some(s) = statements {
            r = r.field("statements", s);
        }
        if !masks.is_empty() {
            r = r.field("masks", masks);
        }
        if let Some(p) = params {
            r = r.field("parameters", p);
        }
        self.append(r)?;
        Ok(Pending {
            n: self.queries,
            started: Instant::now(),
            rows: 0,
            commands: Vec::new(),
            sqlstate: None,
            error: None,
        })
    }

    fn record_result(&self, p: &Pending, skipped: bool) -> Result<(), Stop> {
        let mut r = self
            .record("pg.result")
            .field("n", p.n)
            .field("rows", p.rows)
            .field("commands", &p.commands)
            .field("duration_ms", p.started.elapsed().as_secs_f64() * 1000.0);
        if let Some(s) = &p.sqlstate {
            r = r.field("sqlstate", s).field("error", &p.error);
        }
        if skipped {
            r = r.field("skipped", true);
        }
        self.append(r)
    }

    /// Records a refusal and has Warden's error written in order (see the module docs).
    fn refuse(
        &mut self,
        protocol: &str,
        text: &str,
        sqlstate: &str,
        message: &str,
        simple: bool,
    ) -> Result<(), Stop> {
        self.queries += 1;
        let r = self
            .record("pg.query")
            .field("n", self.queries)
            .field("protocol", protocol)
            .field("text", text)
            .field("access", self.session.terms.access.as_str())
            .field("decision", "refused")
            .field("sqlstate", sqlstate)
            .field("reason", message);
        self.append(r)?;
        let message = format!(
            "warden: {} (policy rule `{}` grants `{}` access to target `{}`)",
            message.strip_prefix("warden: ").unwrap_or(message),
            self.session.terms.rule,
            self.session.terms.access,
            self.session.target.name
        );
        let error = wire::error_response("ERROR", sqlstate, &message);
        self.up.conn.send_raw(&wire::encoded(|b| {
            frontend::parse(ABORT_STATEMENT, ABORT_TEXT, std::iter::empty(), b)?;
            frontend::sync(b);
            Ok(())
        }));
        self.expect.push_back(Expect::Abort);
        self.expect.push_back(Expect::Sync { refusal: Some(Refusal { error, simple }) });
        if !simple {
            self.skipping = true;
        }
        Ok(())
    }

    /// A `Bind`'s parameters or a `FunctionCall`'s arguments as recorded: redacted unless the target says.
    fn params_value(&self, formats: &[i16], params: &[Option<Vec<u8>>]) -> serde_json::Value {
        if !self.pg.record_parameters {
            return serde_json::json!({ "count": params.len(), "redacted": true });
        }
        let fmt = |i: usize| match formats.len() {
            0 => 0,
            1 => formats[0],
            _ => formats.get(i).copied().unwrap_or(0),
        };
        let values: Vec<serde_json::Value> = params
            .iter()
            .enumerate()
            .map(|(i, p)| match p {
                None => serde_json::Value::Null,
                Some(v) if fmt(i) == 0 => String::from_utf8_lossy(v).into_owned().into(),
                Some(v) => format!("\\x{}", hex::encode(v)).into(),
            })
            .collect();
        values.into()
    }

    fn on_client(&mut self, f: &Frame) -> Result<(), Stop> {
        let malformed = |e: WireError| Stop::End(End::ProtocolError { detail: format!("client: {e}") });
        let access = self.session.terms.access;
        let masks = &self.session.terms.mask;
        match f.tag {
            // After an extended-protocol error everything up to Sync is dropped, as a server does.
            b'Q' | b'F' if self.skipping => {}
            b'Q' => {
                let text = Reader::new(&f.body).cstr().map_err(malformed)?;
                match self.shared.classifier.check_session(text, access, masks, &mut self.state) {
                    Err(r) => self.refuse("simple", text, r.sqlstate, &r.message, true)?,
                    Ok(c) => {
                        let p =
                            self.record_query("simple", text, Some(c.statements), &c.masks_applied, None)?;
                        self.up.conn.send(f);
                        self.expect.push_back(Expect::Simple(p));
                    }
                }
            }
            b'P' => {
                if self.skipping {
                    return Ok(());
                }
                let mut r = Reader::new(&f.body);
                let name = r.cstr().map_err(malformed)?.to_owned();
                let text = r.cstr().map_err(malformed)?.to_owned();
                match self.shared.classifier.check_session(&text, access, masks, &mut self.state) {
                    Err(r) => self.refuse("extended", &text, r.sqlstate, &r.message, false)?,
                    Ok(c) => {
                        self.statements.insert(name, Statement { text, masks: c.masks_applied.clone() });
                        self.up.conn.send(f);
                        self.expect.push_back(Expect::Parse);
                    }
                }
            }
            b'B' => {
                if self.skipping {
                    return Ok(());
                }
                let bind = wire::parse_bind(&f.body).map_err(malformed)?;
                let (text, stmt_masks) = match self.statements.get(&bind.statement) {
                    Some(s) => (s.text.clone(), s.masks.clone()),
                    // A statement prepared with SQL PREPARE (itself classified when it was prepared).
                    None => (format!("<prepared statement `{}`>", bind.statement), Vec::new()),
                };
                let params = self.params_value(&bind.formats, &bind.params);
                self.portals.insert(bind.portal, Portal { text, masks: stmt_masks, params });
                self.up.conn.send(f);
                self.expect.push_back(Expect::Bind);
            }
            b'D' => {
                if self.skipping {
                    return Ok(());
                }
                self.up.conn.send(f);
                self.expect.push_back(Expect::Describe { ours: false });
            }
            b'E' => {
                if self.skipping {
                    return Ok(());
                }
                let portal = Reader::new(&f.body).cstr().map_err(malformed)?.to_owned();
                let (text, pmasks, params) = match self.portals.get(&portal) {
                    Some(p) => (p.text.clone(), p.masks.clone(), p.params.clone()),
                    None => (format!("<portal `{portal}`>"), Vec::new(), serde_json::Value::Null),
                };
                let p = self.record_query("extended", &text, None, &pmasks, Some(params))?;
                if self.masking {
                    self.up.conn.send_raw(&wire::encoded(|b| frontend::describe(b'P', &portal, b)));
                    self.expect.push_back(Expect::Describe { ours: true });
                }
                self.up.conn.send(f);
                self.expect.push_back(Expect::Execute(p));
            }
            b'C' => {
                if self.skipping {
                    return Ok(());
                }
                let mut r = Reader::new(&f.body);
                let kind = r.u8().map_err(malformed)?;
                let name = r.cstr().map_err(malformed)?;
                if kind == b'S' {
                    self.statements.remove(name);
                } else {
                    self.portals.remove(name);
                }
                self.up.conn.send(f);
                self.expect.push_back(Expect::Close);
            }
            b'S' => {
                self.skipping = false;
                self.up.conn.send(f);
                self.expect.push_back(Expect::Sync { refusal: None });
            }
            // Checked once its OID is resolved, when the upstream owes nothing (see `function_call`).
            b'F' => {
                wire::parse_function_call(&f.body).map_err(malformed)?;
                self.held = Some(f.clone());
            }
            // Flush; COPY FROM STDIN data, which the upstream asks for only once the statement passed.
            b'H' | b'd' | b'c' | b'f' => self.up.conn.send(f),
            b'X' => return Err(Stop::Clean),
            other => {
                return Err(Stop::End(End::ProtocolError {
                    detail: format!("client: unexpected message type {:?}", char::from(other)),
                }));
            }
        }
        Ok(())
    }

    /// A fastpath call, once the upstream owes nothing: its OID resolved in the upstream's catalog, checked
    /// against the same allow-list as a call in a statement, recorded, then forwarded or refused.
    async fn function_call(&mut self, f: &Frame) -> Result<(), Stop> {
        let malformed = |e: WireError| Stop::End(End::ProtocolError { detail: format!("client: {e}") });
        let call = wire::parse_function_call(&f.body).map_err(malformed)?;
        let function = self.resolve_function(call.oid).await?;
        let text = match &function {
            Some(fun) => format!("fastpath {}.{}, oid {}", fun.schema, fun.signature, call.oid),
            None => format!("fastpath oid {} (not resolved in the catalog)", call.oid),
        };
        let named = function.as_ref().map(|f| (f.schema.as_str(), f.name.as_str()));
        let terms = &self.session.terms;
        if let Err(r) = classify::check_function_call(named, terms.access, !terms.mask.is_empty()) {
            return self.refuse("function", &text, r.sqlstate, &r.message, true);
        }
        let params = self.params_value(&call.formats, &call.args);
        let p = self.record_query("function", &text, None, &[], Some(params))?;
        self.up.conn.send(f);
        self.expect.push_back(Expect::Function(p));
        Ok(())
    }

    /// The function an OID names, from the upstream's catalog (cached for the session). `None` when it
    /// names none, or when the client's transaction is aborted (the upstream answers no query then, and
    /// would fail the call anyway).
    async fn resolve_function(&mut self, oid: u32) -> Result<Option<Function>, Stop> {
        if let Some(f) = self.functions.get(&oid) {
            return Ok(f.clone());
        }
        if self.status == b'E' {
            return Ok(None);
        }
        let sql = format!(
            "SELECT n.nspname::pg_catalog.text, p.proname::pg_catalog.text, \
               pg_catalog.pg_get_function_identity_arguments(p.oid) \
             FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace \
             WHERE p.oid = {oid}"
        );
        let access = self.session.terms.access;
        let expected = Pinned { access, user: &self.pg.credentials.for_access(access).user };
        let mut notices = Vec::new();
        let rows = simple(&mut self.up, &sql, &expected, &mut notices).await;
        // Notifications that came during Warden's own query reach the client, in order, before the
        // answer to its call.
        for n in &notices {
            self.client.send(n);
        }
        let rows = rows.map_err(Stop::End)?;
        let function = rows.into_iter().next().and_then(|r| match <[_; 3]>::try_from(r) {
            Ok([Some(schema), Some(name), Some(args)]) => {
                let signature = format!("{name}({args})");
                Some(Function { schema, name, signature })
            }
            _ => None,
        });
        if self.functions.len() < MAX_FUNCTIONS {
            self.functions.insert(oid, function.clone());
        }
        Ok(function)
    }

    fn finish(&self, p: &Pending) -> Result<(), Stop> {
        self.record_result(p, false)
    }

    fn on_upstream(&mut self, f: &Frame) -> Result<(), Stop> {
        let malformed = |e: WireError| {
            tracing::debug!(error = %e, "malformed upstream message");
            Stop::End(End::UpstreamError)
        };
        self.session.counters.down.fetch_add(f.wire_len() as u64, Ordering::Relaxed);
        match f.tag {
            b'Z' => {
                self.status = f.body.first().copied().unwrap_or(b'I');
                self.masked.clear();
                loop {
                    match self.expect.pop_front() {
                        Some(Expect::Simple(p) | Expect::Function(p)) => {
                            self.finish(&p)?;
                            break;
                        }
                        Some(Expect::Sync { refusal: Some(r) }) => {
                            self.client.send(&r.error);
                            if !r.simple {
                                return Ok(());
                            }
                            break;
                        }
                        Some(Expect::Sync { refusal: None }) | None => break,
                        Some(Expect::Execute(p)) => self.record_result(&p, true)?,
                        Some(_) => {}
                    }
                }
                self.client.send(f);
            }
            b'E' => {
                if matches!(self.expect.front(), Some(Expect::Abort)) {
                    self.expect.pop_front();
                    return Ok(());
                }
                let e = wire::parse_error(&f.body);
                match self.expect.front_mut() {
                    Some(Expect::Simple(p) | Expect::Function(p)) => {
                        if p.sqlstate.is_none() {
                            p.sqlstate = Some(e.code);
                            p.error = Some(e.message);
                        }
                    }
                    Some(Expect::Sync { .. }) | None => {}
                    Some(_) => {
                        // Extended protocol: this message failed and the upstream skips to Sync.
                        let mut first = true;
                        while !matches!(self.expect.front(), Some(Expect::Sync { .. }) | None) {
                            if let Some(Expect::Execute(mut p)) = self.expect.pop_front() {
                                if first {
                                    p.sqlstate = Some(e.code.clone());
                                    p.error = Some(e.message.clone());
                                }
                                self.record_result(&p, !first)?;
                            }
                            first = false;
                        }
                    }
                }
                self.masked.clear();
                self.send_error(f);
            }
            // Notices too may quote values.
            b'N' => self.send_error(f),
            b'1' | b'2' | b'3' => {
                self.expect.pop_front();
                self.client.send(f);
            }
            b'T' => {
                // Without masks nothing needs the columns: the description is relayed unread.
                self.masked.clear();
                if self.masking {
                    let fields = wire::parse_row_description(&f.body).map_err(malformed)?;
                    let view: Vec<(u32, i16, &str, u32)> =
                        fields.iter().map(|c| (c.table, c.column, c.name.as_str(), c.type_oid)).collect();
                    self.masked = mask::masked_fields(&view, &self.masks)
                        .into_iter()
                        .zip(&fields)
                        .map(|(m, c)| m.then_some((c.type_oid, c.format)))
                        .collect();
                }
                if self.describe_done() {
                    return Ok(());
                }
                self.client.send(f);
            }
            b'n' => {
                self.masked.clear();
                if self.describe_done() {
                    return Ok(());
                }
                self.client.send(f);
            }
            b'D' => {
                if self.masked.iter().any(Option::is_some) {
                    let masked: Vec<bool> = self.masked.iter().map(Option::is_some).collect();
                    let cols = &self.masked;
                    let row = wire::mask_data_row(&f.body, &masked, |i| {
                        cols.get(i).copied().flatten().and_then(|(t, fmt)| mask::replacement(t, fmt))
                    })
                    .map_err(malformed)?;
                    self.client.send(&row);
                } else {
                    self.client.send(f);
                }
            }
            b'C' => {
                let tag = tag_of(f);
                self.masked.clear();
                match self.expect.front_mut() {
                    Some(Expect::Simple(p) | Expect::Function(p)) => {
                        p.rows += wire::tag_rows(&tag).unwrap_or(0);
                        p.commands.push(tag);
                    }
                    Some(Expect::Execute(_)) => {
                        if let Some(Expect::Execute(mut p)) = self.expect.pop_front() {
                            p.rows += wire::tag_rows(&tag).unwrap_or(0);
                            p.commands.push(tag);
                            self.finish(&p)?;
                        }
                    }
                    _ => {}
                }
                self.client.send(f);
            }
            b'I' | b's' => {
                if matches!(self.expect.front(), Some(Expect::Execute(_)))
                    && let Some(Expect::Execute(mut p)) = self.expect.pop_front()
                {
                    if f.tag == b's' {
                        p.commands.push("suspended".into());
                    }
                    self.finish(&p)?;
                }
                self.client.send(f);
            }
            b'S' => {
                let mut r = Reader::new(&f.body);
                let k = r.cstr().map_err(malformed)?;
                let v = r.cstr().map_err(malformed)?;
                self.check_setting(k, v)?;
                self.up.set_param(k, v);
                self.client.send(f);
            }
            // A second BackendKeyData would leak the real key.
            b'K' => {}
            _ => self.client.send(f),
        }
        Ok(())
    }

    /// A setting the upstream reports changed mid-session (a function, a view over one, may change it
    /// where no statement Warden read said so): one Warden's checks rely on (read-only under `read`, the
    /// settings the lexer reads strings by, the session's role) ends the session, with a record and a
    /// `FATAL` the client reads.
    fn check_setting(&mut self, name: &str, value: &str) -> Result<(), Stop> {
        let access = self.session.terms.access;
        let expected = Pinned { access, user: &self.pg.credentials.for_access(access).user };
        let Err(r) = expected.check(name, value) else { return Ok(()) };
        let record = self
            .record("pg.setting")
            .field("name", name)
            .field("value", value)
            .field("decision", "ended")
            .field("sqlstate", r.sqlstate)
            .field("reason", &r.message);
        self.append(record)?;
        let message = format!(
            "warden: the server reported {name} = {value} mid-session: {} (policy rule `{}` grants `{}` \
             access to target `{}`); the session ends",
            r.message.strip_prefix("warden: ").unwrap_or(&r.message),
            self.session.terms.rule,
            access,
            self.session.target.name
        );
        client_fatal(&mut self.client, r.sqlstate, &message);
        Err(Stop::End(End::UpstreamRefused { detail: message }))
    }

    /// Relays an upstream `ErrorResponse` or `NoticeResponse`; under masks without the fields that may
    /// quote row values (see [`mask::error_field`]).
    fn send_error(&mut self, f: &Frame) {
        match self.masking.then(|| mask::filter_error_body(&f.body)).flatten() {
            Some(body) => self.client.send(&Frame { tag: f.tag, body: body.into() }),
            None => self.client.send(f),
        }
    }

    /// On a `RowDescription`/`NoData`: completes a pending `Describe`; true if it was Warden's own.
    fn describe_done(&mut self) -> bool {
        if let Some(Expect::Describe { ours }) = self.expect.front() {
            let ours = *ours;
            self.expect.pop_front();
            return ours;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        Frame { tag, body: bytes::Bytes::copy_from_slice(body) }.encode(&mut out);
        out
    }

    /// The upstream answers Warden's own query with a notification first (one that came in just before
    /// the server read the query), then the rows: the rows are the answer, the notification is kept for
    /// the client, and a setting Warden relies on changing ends it.
    #[tokio::test]
    async fn a_notification_during_warden_s_own_query_is_kept_for_the_client() {
        let (ours, mut server) = tokio::io::duplex(4096);
        let mut up = Upstream {
            conn: Conn::new(Box::new(ours), wire::Peer::Server),
            params: Vec::new(),
            backend: (1, 2),
            dst: "127.0.0.1:5432".parse().unwrap(),
            masks: None,
        };
        let notification = message(b'A', b"\0\0\0\x07chan\0during the lookup\0");
        let mut answer = notification.clone();
        answer.extend(message(b'T', b"\0\x01x\0\0\0\0\0\0\0\0\0\0\x19\xff\xff\xff\xff\xff\xff\0\0"));
        answer.extend(message(b'D', b"\0\x01\0\0\0\x02ok"));
        answer.extend(message(b'C', b"SELECT 1\0"));
        answer.extend(message(b'Z', b"I"));
        let script = answer.clone();
        let server_side = tokio::spawn(async move {
            let mut query = [0u8; 64];
            let n = server.read(&mut query).await.unwrap();
            assert_eq!(query[0], b'Q', "{:?}", &query[..n]);
            server.write_all(&script).await.unwrap();
            server
        });
        let expected = Pinned { access: crate::policy::Access::Read, user: "agent_ro" };
        let mut notices = Vec::new();
        let rows = simple(&mut up, "SELECT 'ok'", &expected, &mut notices).await.unwrap();
        assert_eq!(rows, vec![vec![Some("ok".to_owned())]]);
        assert_eq!(notices.len(), 1, "the notification is kept");
        let mut relayed = Vec::new();
        notices[0].encode(&mut relayed);
        assert_eq!(relayed, notification);
        // The same query while the server reports the read-only default lifted: refused.
        let mut server = server_side.await.unwrap();
        let lifted = message(b'S', b"default_transaction_read_only\0off\0");
        let script = [lifted, message(b'Z', b"I")].concat();
        let server_side = tokio::spawn(async move {
            let mut query = [0u8; 64];
            let _ = server.read(&mut query).await.unwrap();
            server.write_all(&script).await.unwrap();
            server
        });
        let end = simple(&mut up, "SELECT 'ok'", &expected, &mut notices).await.unwrap_err();
        assert!(matches!(&end, End::UpstreamRefused { detail } if detail.contains("read-only")), "{end:?}");
        drop(server_side.await.unwrap());
    }
}
