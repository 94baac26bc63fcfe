//! The classifier's statement batteries against a real PostgreSQL (Debian's, 15 here): every read it allows
//! runs on the server in a read-only session, so the allow-list refuses no valid read by accident; every
//! write it refuses is also tried inside `BEGIN READ ONLY` to show which ones the server alone would have
//! blocked (informational: the classifier does not rely on it); and the masking rule's premise is checked
//! on the wire: a plain masked column keeps its source (table OID, attnum) in RowDescription through
//! aliases, `*`, cursors and prepared statements, while the disguises the classifier refuses lose it.
//!
//! Needs root (to run the server as the `postgres` user) and Debian's PostgreSQL binaries; a machine
//! without them fails this test unless `WARDEN_ALLOW_SKIP=1`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use warden::policy::Access;
use warden::protocol::postgres::classify::{Classifier, SessionState};
use warden::protocol::postgres::mask;

mod battery {
    include!(concat!(env!("CARGO_MANIFEST_DIR"), "/src/protocol/postgres/classify/battery.rs"));
}

const MASK: &[&str] = &["email", "customers.phone"];

fn pg_bindir() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("postgres").exists())
        .collect();
    dirs.sort();
    dirs.pop()
}

/// A throwaway cluster in a temp dir on a loopback port, stopped and removed on drop.
struct Cluster {
    dir: tempfile::TempDir,
    data: PathBuf,
    bin: PathBuf,
    port: u16,
}

impl Cluster {
    fn start(bin: &Path) -> Cluster {
        let dir = tempfile::Builder::new().prefix("warden-pg-classify-").tempdir().unwrap();
        let data = dir.path().join("data");
        run_ok(Command::new("chown").arg("postgres:postgres").arg(dir.path()));
        let as_pg = |prog: &str| {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(bin.join(prog));
            c
        };
        run_ok(
            as_pg("initdb")
                .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync", "-D"])
                .arg(&data),
        );
        let port = free_port();
        let opts = format!(
            "-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={} -c fsync=off \
             -c log_statement=all -c log_line_prefix=wlog:%a:",
            dir.path().display()
        );
        run_ok(
            as_pg("pg_ctl")
                .args(["start", "-w", "-t", "60", "-o", &opts, "-l"])
                .arg(dir.path().join("log"))
                .arg("-D")
                .arg(&data),
        );
        Cluster { dir, data, bin: bin.to_path_buf(), port }
    }

    /// The statements the server logged for sessions of `application` (log_statement=all), in order.
    fn logged_statements(&self, application: &str) -> Vec<String> {
        let log = std::fs::read_to_string(self.dir.path().join("log")).unwrap();
        let mut out: Vec<String> = Vec::new();
        let mut current: Option<String> = None;
        let head = format!("wlog:{application}:LOG:  statement: ");
        for line in log.lines() {
            if line.starts_with("wlog:") {
                out.extend(current.take());
                current = line.strip_prefix(&head).map(str::to_string);
            } else if let Some(c) = current.as_mut() {
                c.push('\n');
                c.push_str(line);
            }
        }
        out.extend(current);
        out
    }

    fn psql(&self, read_only: bool, commands: &[&str]) -> Output {
        let mut c = Command::new(self.bin.join("psql"));
        c.args([
            "-X",
            "-q",
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-v",
            "VERBOSITY=verbose",
        ])
        .arg("-p")
        .arg(self.port.to_string())
        .args(["-v", "ON_ERROR_STOP=1"])
        .stdin(Stdio::null());
        if read_only {
            c.env("PGOPTIONS", "-c default_transaction_read_only=on");
        }
        for cmd in commands {
            c.arg("-c").arg(cmd);
        }
        c.output().unwrap()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args(["stop", "-m", "immediate", "-w", "-D"])
            .arg(&self.data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn run_ok(c: &mut Command) {
    let out = c.stdout(Stdio::null()).output().unwrap();
    assert!(out.status.success(), "{c:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The SQLSTATE psql printed (VERBOSITY=verbose writes `ERROR:  25006: ...`).
fn sqlstate(stderr: &str) -> Option<String> {
    stderr.lines().find_map(|l| {
        let rest = l.strip_prefix("ERROR:")?.trim_start();
        let code = rest.split(':').next()?;
        (code.len() == 5).then(|| code.to_string())
    })
}

/// A minimal frontend for the checks on RowDescription: startup with trust auth, simple queries.
struct Wire(TcpStream);

#[derive(Debug, Default)]
struct Reply {
    fields: Vec<(u32, i16, String, u32)>,
    rows: Vec<Vec<Option<String>>>,
    error: Option<String>,
}

impl Wire {
    fn connect(port: u16) -> Wire {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
        let mut body = 196_608u32.to_be_bytes().to_vec();
        for (k, v) in [("user", "postgres"), ("database", "postgres")] {
            body.extend_from_slice(k.as_bytes());
            body.push(0);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut msg = u32::try_from(body.len() + 4).unwrap().to_be_bytes().to_vec();
        msg.extend(body);
        s.write_all(&msg).unwrap();
        let mut w = Wire(s);
        w.until_ready();
        w
    }

    fn message(&mut self) -> (u8, Vec<u8>) {
        let mut head = [0u8; 5];
        self.0.read_exact(&mut head).unwrap();
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let mut body = vec![0u8; len - 4];
        self.0.read_exact(&mut body).unwrap();
        (head[0], body)
    }

    fn until_ready(&mut self) -> Reply {
        let mut reply = Reply::default();
        loop {
            let (t, b) = self.message();
            match t {
                b'Z' => return reply,
                b'T' => reply.fields = row_description(&b),
                b'D' => reply.rows.push(data_row(&b)),
                b'E' => reply.error = Some(String::from_utf8_lossy(&b).replace('\0', " ")),
                _ => {}
            }
        }
    }

    fn query(&mut self, sql: &str) -> Reply {
        let mut msg = vec![b'Q'];
        msg.extend_from_slice(&u32::try_from(sql.len() + 5).unwrap().to_be_bytes());
        msg.extend_from_slice(sql.as_bytes());
        msg.push(0);
        self.0.write_all(&msg).unwrap();
        self.until_ready()
    }
}

fn cstr(b: &[u8], at: &mut usize) -> String {
    let end = b[*at..].iter().position(|&c| c == 0).unwrap() + *at;
    let s = String::from_utf8_lossy(&b[*at..end]).into_owned();
    *at = end + 1;
    s
}

fn row_description(b: &[u8]) -> Vec<(u32, i16, String, u32)> {
    let n = u16::from_be_bytes([b[0], b[1]]);
    let mut at = 2;
    (0..n)
        .map(|_| {
            let name = cstr(b, &mut at);
            let table = u32::from_be_bytes(b[at..at + 4].try_into().unwrap());
            let attnum = i16::from_be_bytes(b[at + 4..at + 6].try_into().unwrap());
            let ty = u32::from_be_bytes(b[at + 6..at + 10].try_into().unwrap());
            at += 18;
            (table, attnum, name, ty)
        })
        .collect()
}

fn data_row(b: &[u8]) -> Vec<Option<String>> {
    let n = u16::from_be_bytes([b[0], b[1]]);
    let mut at = 2;
    (0..n)
        .map(|_| {
            let len = i32::from_be_bytes(b[at..at + 4].try_into().unwrap());
            at += 4;
            if len < 0 {
                return None;
            }
            let len = usize::try_from(len).unwrap();
            let v = String::from_utf8_lossy(&b[at..at + len]).into_owned();
            at += len;
            Some(v)
        })
        .collect()
}

#[test]
fn batteries_against_a_real_postgresql() {
    let root = nix::unistd::geteuid().is_root();
    let bin = pg_bindir().filter(|_| root);
    let needs = [("needs root and Debian's PostgreSQL (scripts/setup.sh)", bin.is_some())];
    let Some(bin) =
        bin.filter(|_| warden_test_support::require("batteries_against_a_real_postgresql", &needs))
    else {
        return;
    };
    let pg = Cluster::start(&bin);
    let fixture = pg.psql(false, &[battery::FIXTURE]);
    assert!(fixture.status.success(), "fixture: {}", String::from_utf8_lossy(&fixture.stderr));
    let classifier = Classifier::new(1024);

    // Reads: allowed by the classifier, and run by the server in a read-only session.
    let mut failures = Vec::new();
    let psql_queries = include_str!("../src/protocol/postgres/classify/psql_queries.sql");
    let reads = battery::READS
        .iter()
        .copied()
        .chain(psql_queries.split("\n----\n").map(str::trim).filter(|q| !q.is_empty()));
    let mut n_reads = 0;
    for sql in reads {
        n_reads += 1;
        let mut state = SessionState::default();
        if let Err(e) = classifier.check_session(sql, Access::Read, &[], &mut state) {
            failures.push(format!("{sql}\n    classifier refused: {e}"));
        }
        let out = pg.psql(true, &[sql]);
        if !out.status.success() {
            failures.push(format!(
                "{sql}\n    postgres (read-only session): {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    assert!(failures.is_empty(), "reads that do not hold:\n{}", failures.join("\n"));

    // pg_dump, a read-only client, dumps the fixture; every statement it sent passes under `read`.
    let dump = Command::new(pg.bin.join("pg_dump"))
        .args(["-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-p"])
        .arg(pg.port.to_string())
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert!(dump.status.success(), "pg_dump: {}", String::from_utf8_lossy(&dump.stderr));
    let sent = pg.logged_statements("pg_dump");
    assert!(sent.len() > 20, "pg_dump's statements were not logged: {}", sent.len());
    let mut state = SessionState::default();
    let refused: Vec<String> = sent
        .iter()
        .filter_map(|sql| {
            classifier
                .check_session(sql, Access::Read, &[], &mut state)
                .err()
                .map(|e| format!("{sql}\n    -> {e}"))
        })
        .collect();
    assert!(refused.is_empty(), "pg_dump statements refused under read:\n{}", refused.join("\n"));
    println!("{} statements pg_dump sent all pass under read", sent.len());

    // Writes: refused by the classifier; what would the server alone do inside BEGIN READ ONLY?
    let mut table = Vec::new();
    let mut blocked = 0;
    for sql in battery::WRITES {
        let verdict = classifier.check(sql, Access::Read, &[]);
        assert!(verdict.is_err(), "classifier allowed a write: {sql}");
        let out = pg.psql(false, &["BEGIN READ ONLY", sql, "ROLLBACK"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let server = match sqlstate(&stderr) {
            Some(code) if code == "25006" => {
                blocked += 1;
                "blocked 25006".to_string()
            }
            Some(code) => format!("error {code}"),
            None if out.status.success() => "RAN".to_string(),
            None => format!("failed: {}", stderr.lines().next().unwrap_or("")),
        };
        table.push(format!(
            "{:<13} {:<14} {}",
            verdict.unwrap_err().sqlstate,
            server,
            sql.replace('\n', " ")
        ));
    }
    println!("write battery: classifier / PostgreSQL inside BEGIN READ ONLY / statement");
    for line in &table {
        println!("  {line}");
    }
    println!(
        "{} of {} writes also blocked by the server's read-only transaction",
        blocked,
        battery::WRITES.len()
    );
    // The database is unchanged: the fixture's rows are still there (nothing above committed a write
    // that the read-only transaction let through, except what the table shows as RAN).
    let check = pg.psql(false, &["SELECT count(*) FROM customers"]);
    assert!(check.status.success());

    // A planted overload of a built-in name is found, and calls by the bare name are then refused.
    let mut wire = Wire::connect(pg.port);
    let shadows = wire.query(&warden::protocol::postgres::classify::shadow_query());
    assert!(shadows.error.is_none(), "shadow_query failed: {:?}", shadows.error);
    let shadowed: Vec<String> = shadows.rows.iter().filter_map(|r| r[0].clone()).collect();
    assert_eq!(shadowed, ["upper"]);
    let trap = "SELECT upper(name::varchar) FROM customers";
    let mut state = SessionState::default().with_shadowed(shadowed.clone());
    assert!(classifier.check_session(trap, Access::Read, &[], &mut state).is_err());
    let mut state = SessionState::default();
    assert!(classifier.check_session(trap, Access::Read, &[], &mut state).is_ok(), "without the shadow list");
    let out = pg.psql(true, &[trap]);
    println!(
        "the trap in a read-only session: {}",
        sqlstate(&String::from_utf8_lossy(&out.stderr)).unwrap_or_else(|| "RAN".into())
    );

    // Masking on the wire.
    let mask: Vec<String> = MASK.iter().map(ToString::to_string).collect();
    let resolution = wire.query(&mask::resolve_query(&mask));
    assert!(resolution.error.is_none(), "resolve_query failed: {:?}", resolution.error);
    let rows: Vec<[String; 5]> =
        resolution.rows.iter().map(|r| std::array::from_fn(|i| r[i].clone().unwrap_or_default())).collect();
    let rows: Vec<[&str; 5]> = rows.iter().map(|r| std::array::from_fn(|i| r[i].as_str())).collect();
    let resolved = mask::resolved(&mask, &rows).unwrap();
    assert_eq!(resolved.tainted, ["customer_emails"], "{rows:?}");
    // customers.email, customers.phone, and the view's email column (a bare mask names every `email`).
    let customers: Vec<&[&str; 5]> = rows.iter().filter(|r| r[0] == "c" && r[2] == "customers").collect();
    assert_eq!(customers.len(), 2, "{rows:?}");
    assert_eq!(resolved.set.columns.len(), 3, "{rows:?}");

    // The mask batteries are valid SQL for the server (so they test the rule, not the parser's errors),
    // and the classifier's verdicts hold under `write` with masks.
    let mut invalid = Vec::new();
    for (list, allowed) in [
        (battery::MASK_REFUSED, false),
        (battery::MASK_REFUSED_WRITE, false),
        (battery::MASK_ALLOWED_WRITE, true),
    ] {
        for sql in list {
            let mut state = SessionState::new(resolved.tainted.clone());
            let verdict = classifier.check_session(sql, Access::Write, &mask, &mut state);
            assert_eq!(verdict.is_ok(), allowed, "{sql}: {verdict:?}");
            if sql.contains("STDIN") {
                continue; // COPY FROM STDIN needs data psql -c cannot give
            }
            let out = pg.psql(false, &["BEGIN", sql, "ROLLBACK"]);
            // A data or constraint error at run time (`email::int` quoting the value) still shows valid SQL.
            let runtime = sqlstate(&String::from_utf8_lossy(&out.stderr))
                .is_some_and(|c| c.starts_with("22") || c.starts_with("23"));
            if !out.status.success() && !runtime {
                invalid.push(format!("{sql}: {}", String::from_utf8_lossy(&out.stderr)));
            }
        }
    }
    assert!(invalid.is_empty(), "mask battery statements the server rejects:\n{}", invalid.join("\n"));

    // By source alone (no name fallback): the premise is that sources survive.
    let by_source = mask::MaskSet { columns: resolved.set.columns.clone(), names: vec![] };
    let mut caught = 0;
    let mut state = SessionState::new(resolved.tainted.clone());
    for sql in battery::MASK_ALLOWED {
        classifier.check_session(sql, Access::Read, &mask, &mut state).unwrap();
        // Simple-protocol replies: the last RowDescription of the string (FETCH, EXECUTE) is the one shown.
        let reply = wire.query(sql);
        assert!(reply.error.is_none(), "{sql}: {:?}", reply.error);
        let fields: Vec<(u32, i16, &str, u32)> =
            reply.fields.iter().map(|(t, a, n, ty)| (*t, *a, n.as_str(), *ty)).collect();
        let masked = mask::masked_fields(&fields, &by_source);
        for (i, row) in reply.rows.iter().enumerate() {
            for (j, value) in row.iter().enumerate() {
                let leaks =
                    value.as_deref().is_some_and(|v| v.contains("@example.com") || v.starts_with("555-"));
                caught += usize::from(leaks);
                assert!(
                    !leaks || masked[j],
                    "{sql}: row {i} column {} ({:?}) shows {value:?} unmasked",
                    j,
                    reply.fields[j]
                );
            }
        }
    }
    assert!(caught >= 20, "only {caught} masked values seen: the check would be vacuous");
    println!("{caught} values of masked columns in allowed statements, all flagged by source");
    // The premise of refusing disguises: they lose the source, so masking by source could not catch them.
    for sql in [
        "SELECT upper(email) FROM customers",
        "SELECT email FROM customers UNION SELECT 'x'",
        "SELECT row_to_json(c) FROM customers c",
        "SELECT * FROM customer_emails",
    ] {
        assert!(classifier.check_session(sql, Access::Read, &mask, &mut state).is_err(), "{sql}");
        let reply = wire.query(sql);
        let fields: Vec<(u32, i16, &str, u32)> =
            reply.fields.iter().map(|(t, a, n, ty)| (*t, *a, n.as_str(), *ty)).collect();
        let masked = mask::masked_fields(&fields, &resolved.set);
        println!("refused disguise {sql:?}: RowDescription {:?}, masked by source {masked:?}", reply.fields);
    }
    println!("{n_reads} reads ran in a read-only session");
}
