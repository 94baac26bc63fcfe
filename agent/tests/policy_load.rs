//! Policy files as `warden check` sees them: the shipped examples are valid, and broken files report
//! every problem at once as `file:line:col: message`.

use std::path::{Path, PathBuf};

use warden::policy::{self, Access, Decision, PgCredentials, Protocol, Subject, TargetKind, TlsMode};

fn examples() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    files
}

/// Writes `files` (name, text) into a temp dir and loads them; returns the diagnostics as printed.
fn check(files: &[(&str, &str)]) -> (tempfile::TempDir, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret"), "pw\n").unwrap();
    let paths: Vec<PathBuf> = files
        .iter()
        .map(|(name, text)| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p
        })
        .collect();
    let diags = match policy::load(&paths) {
        Ok(_) => Vec::new(),
        Err(d) => {
            d.iter().map(|d| d.to_string().replace(&format!("{}/", dir.path().display()), "")).collect()
        }
    };
    (dir, diags)
}

#[test]
fn every_example_policy_is_valid() {
    let files = examples();
    assert!(files.len() >= 3, "{files:?}");
    let policy = match policy::load(&files) {
        Ok(p) => p,
        Err(diags) => panic!("{}", diags.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n")),
    };
    let protocols: Vec<Protocol> = policy.targets().map(policy::Target::protocol).collect();
    for p in [Protocol::Postgres, Protocol::Ssh, Protocol::Tcp] {
        assert!(protocols.contains(&p), "no {p} example");
    }
    let db = policy.target("orders-db").unwrap();
    let TargetKind::Postgres(pg) = &db.kind else { panic!("{db:?}") };
    assert_eq!((db.host.as_str(), db.port, pg.tls), ("10.0.0.5", 5432, TlsMode::VerifyFull));
    let PgCredentials::One(creds) = &pg.credentials else { panic!("{pg:?}") };
    assert!(creds.password_file.as_ref().unwrap().ends_with("policies/secrets/orders-db"), "{creds:?}");
    assert_eq!(policy.target("metrics").unwrap().host, "fd00::20");

    let research = Subject {
        client_id: "0oa1".into(),
        sub: "0oa1".into(),
        groups: vec!["agents-research".into()],
        scopes: vec![],
    };
    let Decision::Allow(t) = policy.decide(&research, "orders-db", None) else { panic!() };
    assert_eq!((t.access, t.mask.len(), t.ttl.as_secs()), (Access::Read, 2, 900));
    let deploy = Subject { groups: vec![], scopes: vec!["warden.build".into()], ..research.clone() };
    let Decision::Allow(t) = policy.decide(&deploy, "build-host", None) else { panic!() };
    assert_eq!(t.access, Access::Exec);
    assert!(t.commands.unwrap().contains(&"uptime".to_owned()));
    let billing = Subject { client_id: "0oa1billing".into(), groups: vec![], ..research.clone() };
    let Decision::Allow(t) = policy.decide(&billing, "orders-db-primary", None) else { panic!() };
    assert_eq!((t.access, t.approval), (Access::Write, policy::Approval::Required));
    let Decision::Deny { reason } = policy.decide(&billing, "orders-db", None) else { panic!() };
    assert_eq!(reason, "no rule grants client 0oa1billing (groups: none) access to orders-db");
}

#[test]
fn several_errors_in_one_file_are_all_reported_in_order() {
    let text = "\
targets:
  orders-db:
    protocol: postgres
    adress: 10.0.0.5:5432
    databases: [orders]
    credentials: { user: ro, password_file: missing-secret }
  build-host:
    protocol: ssh
    address: 10.0.0.9
    host_key: not-a-key
    credentials: { user: deploy, private_key_file: secret }
  web:
    protocol: tcp
    address: 10.0.0.7:80
    tls: require
rules:
  - name: research
    match: { groups: [research] }
    grant:
      - target: web
        access: shell
        ttl: 15
      - target: ordrs-db
        access: read
        ttl: 15m
      - target: web
        access: connect
        ttl: 3d
        mask: [email]
";
    let (_dir, diags) = check(&[("p.yaml", text)]);
    let want = [
        "p.yaml:2:3: target `orders-db` needs `address`",
        "p.yaml:4:5: unknown key `adress` in target `orders-db`; did you mean `address`?",
        "p.yaml:6:45: cannot read password_file ",
        "p.yaml:9:14: address: `10.0.0.9` needs a port (host:port, e.g. 10.0.0.5:5432)",
        "p.yaml:10:15: host_key must be an OpenSSH public key line such as `ssh-ed25519 AAAA...`",
        "p.yaml:15:5: `tls` applies to postgres targets only; `web` is tcp",
        "p.yaml:21:17: access `shell` does not apply to tcp target `web`; use connect",
        "p.yaml:22:14: ttl: `15` is not a duration; write a number and a unit: s, m or h (e.g. 90s, 15m, 2h)",
        "p.yaml:23:17: unknown target `ordrs-db`; did you mean `orders-db`?",
        "p.yaml:28:14: ttl: `3d` is not a duration; write a number and a unit: s, m or h (e.g. 90s, 15m, 2h)",
        "p.yaml:29:15: mask applies to postgres targets only; `web` is tcp",
    ];
    assert_eq!(diags.len(), want.len(), "{}", diags.join("\n"));
    for (got, want) in diags.iter().zip(want) {
        assert!(got.starts_with(want), "got  {got}\nwant {want}\nall:\n{}", diags.join("\n"));
    }
    assert!(diags[2].contains("No such file or directory"), "{}", diags[2]);
}

#[test]
fn duplicates_across_files_name_the_first_definition() {
    let a = "targets:\n  db: { protocol: tcp, address: 127.0.0.1:1 }\nrules:\n  - name: r\n    match: { groups: [g] }\n    grant: [{ target: db, access: connect, ttl: 1m }]\n";
    let b = "targets:\n  db: { protocol: tcp, address: 127.0.0.1:2 }\nrules:\n  - name: r\n    match: { groups: [g] }\n    grant: [{ target: db, access: connect, ttl: 1m }]\n";
    let (_dir, diags) = check(&[("a.yaml", a), ("b.yaml", b)]);
    assert_eq!(diags.len(), 2, "{diags:?}");
    assert!(diags[0].starts_with("b.yaml:2:3: duplicate target `db`; first defined at "), "{}", diags[0]);
    assert!(diags[0].ends_with("a.yaml:2:3"), "{}", diags[0]);
    assert!(diags[1].starts_with("b.yaml:4:11: duplicate rule `r`; first defined at "), "{}", diags[1]);
}

#[test]
fn rules_may_name_targets_from_other_files() {
    let targets = "targets:\n  db: { protocol: tcp, address: db.internal:9000 }\n";
    let rules = "rules:\n  - name: r\n    match: { clients: [0oa1] }\n    grant: [{ target: db, access: connect, ttl: 90s }]\n";
    let (_dir, diags) = check(&[("a.yaml", targets), ("b.yaml", rules)]);
    assert!(diags.is_empty(), "{diags:?}");
}

#[test]
fn structural_mistakes_are_located() {
    let text = "\
targets:
  db:
    protocol: mysql
    address: 127.0.0.1:3306
rule:
  - name: x
rules:
  - name: empty
    match: {}
    grant: []
  - match: { groups: [g] }
    grant:
      - { target: db, access: read, ttl: 1m, approval: maybe }
";
    let (_dir, diags) = check(&[("p.yaml", text)]);
    let want = [
        "p.yaml:3:15: protocol `mysql` is not postgres, ssh or tcp",
        "p.yaml:5:1: unknown key `rule` in a policy file; did you mean `rules`?",
        "p.yaml:9:12: `match` matches nobody; list groups, scopes or clients",
        "p.yaml:10:12: `grant` is empty; a rule must grant something",
        "p.yaml:11:5: rule needs a `name`",
        "p.yaml:13:56: approval `maybe` is not none or required",
    ];
    assert_eq!(diags, want, "\n{}", diags.join("\n"));
}

#[test]
fn yaml_syntax_errors_are_located_and_other_files_still_checked() {
    let bad = "targets:\n  db: [unclosed\n";
    let other = "targets:\n  x: { protocol: tcp, address: 127.0.0.1:1, credentials: { user: u } }\n";
    let (_dir, diags) = check(&[("bad.yaml", bad), ("other.yaml", other)]);
    assert_eq!(diags.len(), 2, "{diags:?}");
    assert!(diags[0].starts_with("bad.yaml:") && diags[0].contains("invalid YAML"), "{}", diags[0]);
    assert!(diags[1].starts_with("other.yaml:2:45: tcp targets carry opaque bytes"), "{}", diags[1]);
}

#[test]
fn an_unreadable_policy_file_is_reported() {
    let missing = PathBuf::from("/nonexistent/warden/policy.yaml");
    let diags = policy::load(std::slice::from_ref(&missing)).unwrap_err();
    assert_eq!(diags.len(), 1);
    assert!(
        diags[0].to_string().starts_with("/nonexistent/warden/policy.yaml:1:1: cannot read policy file"),
        "{}",
        diags[0]
    );
}

#[test]
fn a_secret_path_that_is_a_directory_is_an_error() {
    let text = "targets:\n  db:\n    protocol: postgres\n    address: 127.0.0.1:5432\n    databases: [d]\n    credentials: { user: u, password_file: . }\n";
    let (_dir, diags) = check(&[("p.yaml", text)]);
    assert_eq!(diags.len(), 1, "{diags:?}");
    assert!(
        diags[0].starts_with("p.yaml:6:44: password_file ") && diags[0].ends_with("is not a regular file"),
        "{}",
        diags[0]
    );
}
