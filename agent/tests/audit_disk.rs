//! A full disk: the audit directory on a small tmpfs mounted by the test. The writer fails closed while
//! it cannot write (durable appends refused with the reason), loses nothing acknowledged, and resumes by
//! itself when space returns, the chain intact across the gap.
//! Needs root to mount; without it the test fails (unless `WARDEN_ALLOW_SKIP=1` is set).

use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use tokio_util::sync::CancellationToken;
use warden::audit::verify::verify_dir;
use warden::audit::{Audit, AuditError, AuditOptions, Record, sign};

fn skip(reason: &str) {
    warden_test_support::require(
        "a_full_disk_refuses_durable_work_until_space_returns_then_the_writer_resumes",
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
async fn a_full_disk_refuses_durable_work_until_space_returns_then_the_writer_resumes() {
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
        AuditError::Unavailable { reason } => reason.clone(),
        other => panic!("expected the record to be unavailable, got {other}"),
    };
    assert!(reason.contains("No space left on device"), "{reason}");
    // A transient fault: the writer rides it out instead of stopping.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), failed.cancelled()).await.is_err(),
        "the failure token fired on a full disk"
    );
    assert_eq!(audit.stopped_reason(), None);
    assert!(audit.unavailable_reason().is_some_and(|r| r.contains("No space left")));
    // Meanwhile what must be durable is refused at once, with the reason; a record of something already
    // done is held.
    let refused = audit.append_durable(Record::new("session.start")).await.unwrap_err();
    assert!(matches!(refused, AuditError::Unavailable { .. }), "{refused}");
    assert!(refused.to_string().contains("No space left"), "{refused}");
    assert!(matches!(audit.append(Record::new("pg.query")), Err(AuditError::Unavailable { .. })));
    audit.append_or_hold(Record::new("session.end").field("session", "held")).unwrap();

    // Space returns: the writer resumes by itself, within its backoff.
    mount(None::<&str>, &mnt, None::<&str>, MsFlags::MS_REMOUNT, Some("size=4m")).expect("grow the tmpfs");
    tokio::time::timeout(Duration::from_secs(10), async {
        while audit.unavailable_reason().is_some() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the writer resumes once space returns");
    let after = audit.append_durable(Record::new("session.start").field("session", "after")).await.unwrap();
    shutdown.cancel();
    writer.await.unwrap();

    // Everything acknowledged is on disk, the chain is intact across the gap (the failed batch was cut
    // back and the chain continued from the last record on disk), and the gap is recorded.
    let key = sign::load(root.path()).unwrap().verifying_key();
    let report = verify_dir(&opts.config.dir, Some(&key)).unwrap();
    assert!(report.intact(), "{}", report.problem.unwrap());
    assert!(acked.len() > 50, "only {} records fitted", acked.len());
    assert!(report.last_seq.unwrap() > after);
    let records = warden_test_support::audit_records(&opts.config.dir);
    let seqs: Vec<u64> = records.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    for seq in &acked {
        assert!(seqs.contains(seq), "acknowledged seq {seq} is on disk");
    }
    let resumed = records.iter().position(|r| r["event"] == "audit.resumed").expect("audit.resumed");
    let r = &records[resumed];
    assert!(r["reason"].as_str().is_some_and(|x| x.contains("No space left")), "{r}");
    assert!(r["refused"].as_u64() >= Some(2) && r["held"].as_u64() >= Some(1), "{r}");
    assert!(
        records[resumed + 1..].iter().any(|x| x["event"] == "session.end" && x["session"] == "held"),
        "the held record follows audit.resumed"
    );
    drop(guard);
}
