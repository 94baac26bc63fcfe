//! The command line, the top layer: the clap types, exit codes and the mapping from typed errors to
//! them, and one file of handlers per command group (`run.rs`: run/check/uninstall, `exec.rs`, `tag.rs`,
//! `grants.rs`: grants/grant/sessions, `audit.rs`, `status.rs`). Nothing below imports it.
//!
//! Exit codes: 0 success; 1 a check failed (e.g. `audit verify` found tampering) or an operation was
//! refused; 64 invalid configuration or policy (`check`, and `run` before binding anything); 69 the daemon
//! is not reachable; 70 an internal error; 77 not permitted (run as root). `warden exec` returns its
//! command's status (128 + the signal when one killed it; 126 when it cannot be run).

mod audit;
mod audit_s3;
mod ca;
mod exec;
mod grants;
mod run;
mod status;
mod tag;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use serde_json::Value;

use crate::control::{ClientError, Request};

pub const EXIT_FAILED: u8 = 1;
pub const EXIT_INVALID: u8 = 64;
pub const EXIT_UNAVAILABLE: u8 = 69;
pub const EXIT_INTERNAL: u8 = 70;
pub const EXIT_NOPERM: u8 = 77;

pub const DEFAULT_CONFIG: &str = "/etc/warden/warden.toml";

#[derive(Debug, Parser)]
#[command(name = "warden", version, about = "Forces an AI agent's TCP through a verifying, recording proxy")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Args)]
pub struct ConfigArg {
    /// The daemon's configuration file.
    #[arg(long, short = 'c', env = "WARDEN_CONFIG", default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct JsonArg {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon in the foreground.
    Run(ConfigArg),
    /// Validate the config and every policy file; print each error as file:line:col: message.
    Check(ConfigArg),
    /// Bind a cgroup to an identity at run time.
    Tag {
        /// A cgroup path, relative to the cgroup2 root or absolute.
        cgroup: String,
        #[arg(long)]
        identity: String,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Remove a run-time binding.
    Untag {
        cgroup: String,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Run a command in a fresh cgroup bound to an identity; the cgroup is removed when it exits.
    Exec {
        #[arg(long)]
        identity: String,
        /// A task id, recorded with the binding and its grants.
        #[arg(long)]
        task: Option<String>,
        /// Drop to this user (name or uid) before exec.
        #[arg(long)]
        user: Option<String>,
        #[command(flatten)]
        config: ConfigArg,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// List live grants.
    Grants {
        #[command(flatten)]
        json: JsonArg,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Issue, approve or revoke a grant.
    Grant {
        #[command(subcommand)]
        action: GrantAction,
    },
    /// List live sessions, or kill one.
    Sessions {
        #[command(subcommand)]
        action: Option<SessionAction>,
        #[command(flatten)]
        json: JsonArg,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Read and verify the audit record.
    Audit {
        #[command(subcommand)]
        action: AuditAction,
    },
    /// Show what the daemon and the kernel programs are doing.
    Status {
        #[command(flatten)]
        json: JsonArg,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Detach and unpin every kernel program and map: the one command that lifts enforcement.
    Uninstall(ConfigArg),
    /// Print Warden's local certificate authorities, for agents to trust.
    Ca {
        #[command(subcommand)]
        action: CaAction,
    },
}

#[derive(Debug, Subcommand)]
pub enum CaAction {
    /// The CA (PEM) that issues the TLS certificates PostgreSQL clients see (for `sslmode=verify-full`).
    Tls(ConfigArg),
    /// The `@cert-authority * ssh-ed25519 ...` line for an agent's known_hosts (made on first use).
    Ssh(ConfigArg),
}

#[derive(Debug, Subcommand)]
pub enum GrantAction {
    /// Issue a grant ahead of the first connection.
    Issue {
        #[arg(long)]
        identity: String,
        #[arg(long)]
        target: String,
        /// The cgroup the grant is for (relative to the cgroup2 root or absolute).
        #[arg(long)]
        cgroup: String,
        /// Access to grant; defaults to what the matching rule grants.
        #[arg(long)]
        access: Option<String>,
        #[command(flatten)]
        json: JsonArg,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Approve a grant waiting for approval.
    Approve {
        id: String,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// End a grant and every session under it now.
    Revoke {
        id: String,
        #[command(flatten)]
        config: ConfigArg,
    },
}

#[derive(Debug, Subcommand)]
pub enum SessionAction {
    /// End a live session now.
    Kill {
        id: String,
        #[command(flatten)]
        config: ConfigArg,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditAction {
    /// Check every file, hash, link, sequence number and checkpoint signature.
    Verify {
        /// The audit directory; defaults to the config's audit.dir.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// The host's public key (as printed by `warden audit pubkey`); defaults to the one in state_dir.
        #[arg(long)]
        pubkey: Option<PathBuf>,
        #[command(flatten)]
        config: ConfigArg,
        /// With --s3: verify the chain in the bucket (and, with --dir, compare the local files with it).
        #[command(flatten)]
        s3: audit_s3::S3Args,
    },
    /// Stream records for auditors.
    Export {
        /// A sequence number or an RFC 3339 time.
        #[arg(long)]
        since: Option<String>,
        /// A sequence number or an RFC 3339 time.
        #[arg(long)]
        until: Option<String>,
        #[arg(long, default_value = "jsonl")]
        format: String,
        /// After a complete export, record its last seq as exported (lets retention delete it).
        #[arg(long)]
        mark: bool,
        /// Also copy the SSH terminal recordings the exported `ssh.recording` records name into this
        /// directory, at the same relative paths (`recordings/...`), so they can be verified beside the export.
        #[arg(long, value_name = "DIR")]
        recordings: Option<PathBuf>,
        #[arg(long)]
        dir: Option<PathBuf>,
        #[command(flatten)]
        config: ConfigArg,
        /// With --s3: stream the records from the bucket instead.
        #[command(flatten)]
        s3: audit_s3::S3Args,
    },
    /// A readable account of one session.
    Show {
        session: String,
        #[arg(long)]
        dir: Option<PathBuf>,
        #[command(flatten)]
        json: JsonArg,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Print the last records; with -f, follow.
    Tail {
        #[arg(short = 'f', long)]
        follow: bool,
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: usize,
        #[arg(long)]
        dir: Option<PathBuf>,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Play a recorded SSH terminal back with its timing.
    Replay {
        session: String,
        /// Playback speed; 0 prints everything at once.
        #[arg(long, default_value_t = 1.0)]
        speed: f64,
        #[arg(long)]
        dir: Option<PathBuf>,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Print the host's audit signing public key.
    Pubkey {
        #[command(flatten)]
        config: ConfigArg,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // `run` sets up its log once it has read `agent.log_format`.
    if !matches!(cli.command, Command::Run(_)) {
        init_tracing();
    }
    let code = match cli.command {
        Command::Run(c) => run::run(&c.config),
        Command::Check(c) => run::check(&c.config),
        Command::Uninstall(c) => run::uninstall(&c.config),
        Command::Exec { identity, task, user, config, command } => {
            exec::exec(&config.config, &identity, task.as_deref(), user.as_deref(), &command)
        }
        Command::Tag { cgroup, identity, config } => tag::tag(&config.config, cgroup, identity),
        Command::Untag { cgroup, config } => tag::untag(&config.config, cgroup),
        Command::Grants { json, config } => grants::list(&config.config, json.json),
        Command::Grant { action } => grants::grant(action),
        Command::Sessions { action, json, config } => grants::sessions(action, json.json, &config.config),
        Command::Audit { action } => audit::run(action),
        Command::Status { json, config } => status::status(&config.config, json.json),
        Command::Ca { action: CaAction::Tls(c) } => ca::tls(&c.config),
        Command::Ca { action: CaAction::Ssh(c) } => ca::ssh(&c.config),
    };
    ExitCode::from(code)
}

fn init_tracing() {
    crate::logging::init(crate::config::LogFormat::Plain);
}

/// Prints a verification's notes and, if it found one, the first problem; returns the exit code then
/// (for `verify` of a directory and of a bucket alike).
fn print_notes_and_problem(report: &crate::audit::verify::Report) -> Option<u8> {
    for note in &report.notes {
        println!("note: {note}");
    }
    let problem = report.problem.as_ref()?;
    println!("TAMPERED: {problem}");
    if let Some(last) = report.last_seq {
        println!("records up to seq {last} verified before it");
    }
    Some(EXIT_FAILED)
}

/// Prints an error for the operator and returns the exit code.
pub fn fail(code: u8, err: &dyn std::fmt::Display) -> u8 {
    eprintln!("warden: {err}");
    code
}

/// The exit code for a failed control request.
fn client_exit(e: &ClientError) -> u8 {
    match e {
        ClientError::Unavailable { .. } => EXIT_UNAVAILABLE,
        ClientError::Permission { .. } => EXIT_NOPERM,
        ClientError::Refused(_) | ClientError::Protocol(_) => EXIT_FAILED,
    }
}

/// Sends one request to the daemon of `config`, prints its answer (as JSON, or through `render`) and
/// returns the exit code.
fn ask_daemon(config: &Path, request: &Request, json: bool, render: fn(&Value) -> String) -> u8 {
    let socket = match crate::config::Config::load(config) {
        Ok(c) => c.agent.control_socket,
        Err(e) => return fail(EXIT_INVALID, &e),
    };
    match crate::control::request(&socket, request) {
        Ok(data) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&data).unwrap_or_default());
            } else {
                println!("{}", render(&data));
            }
            0
        }
        Err(e) => fail(client_exit(&e), &e),
    }
}
