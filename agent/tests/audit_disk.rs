//! A full disk: the audit directory on a small tmpfs mounted by the test. The writer fails closed (the
//! failure token fires, every later append is refused with the reason) and nothing acknowledged is lost.
//! Needs root to mount; without it the test fails (unless `WARDEN_ALLOW_SKIP=1` is set).

use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use tokio_util::sync::CancellationToken;
use warden::audit::verify::verify_dir;
use warden::audit::{Audit, AuditError, AuditOptions, Record, sign};

fn skip(reason: &str) {
    warden_test_support::require(
        "a_full_disk_refuses_new_work_with_the_reason_and_loses_nothing_written",
        &[(reason, false)],
    );
}

/// Unmounts on drop, even when the test fails.
struct Tmpfs(PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = umount2(&self.0, MntFlags::MNT_DETACH);
    }
}

fn mount_tmpfs(at: &Path, size: &str) -> Result<Tmpfs, nix::Error> {
    mount(
        Some("tmpfs"),
        at,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(format!("size={size}").as_str()),
    )?;
    Ok(Tmpfs(at.to_path_buf()))
}

#[tokio::test]
async fn a_full_disk_refuses_new_work_with_the_reason_and_loses_nothing_written() {
    if !nix::unistd::geteuid().is_root() {
        skip("mounting a tmpfs needs root");
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let mnt = root.path().join("small");
    std::fs::create_dir(&mnt).unwrap();
    let guard = match mount_tmpfs(&mnt, "128k") {
        Ok(g) => g,
        Err(e) => {
            skip(&format!("cannot mount a tmpfs here: {e}"));
            return;
        }
    };
    let mut opts = AuditOptions::in_dir(root.path());
    opts.config.dir = mnt.join("audit");
    opts.config.checkpoint_records = 20;
    let shutdown = CancellationToken::new();
    let (audit, writer) = Audit::start_with(&opts, shutdown.clone()).unwrap();
    let failed = audit.failed();

    let filler = "x".repeat(900);
    let mut acked = Vec::new();
    let err = loop {
        assert!(acked.len() < 10_000, "a 128 KiB disk never filled");
        match audit
            .append_durable(Record::new("session.start").field("session", acked.len()).field("pad", &filler))
            .await
        {
            Ok(seq) => acked.push(seq),
            Err(e) => break e,
        }
    };
    let reason = match &err {
        AuditError::Stopped { reason } => reason.clone(),
        other => panic!("expected the writer to stop, got {other}"),
    };
    assert!(reason.contains("No space left on device"), "{reason}");
    tokio::time::timeout(Duration::from_secs(10), failed.cancelled()).await.expect("the failure token fires");
    assert_eq!(audit.stopped_reason().as_deref(), Some(reason.as_str()));
    // New sessions are refused with the same, clear reason.
    let refused = audit.append_durable(Record::new("session.start")).await.unwrap_err();
    assert_eq!(refused.to_string(), format!("audit writer has stopped: {reason}"));
    assert!(matches!(audit.append(Record::new("x")), Err(AuditError::Stopped { .. })));
    shutdown.cancel();
    writer.await.unwrap();

    // Everything acknowledged is on disk and the chain is intact (the failed batch was cut back).
    let key = sign::load(root.path()).unwrap().verifying_key();
    let report = verify_dir(&opts.config.dir, Some(&key)).unwrap();
    assert!(report.intact(), "{}", report.problem.unwrap());
    assert!(acked.len() > 50, "only {} records fitted", acked.len());
    assert!(report.last_seq.unwrap() >= *acked.last().unwrap());
    drop(guard);
}
