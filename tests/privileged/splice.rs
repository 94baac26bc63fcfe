//! Opaque TCP spliced in the kernel (`bpf::Kernel::splice`): bytes each way go from one socket straight out
//! of the other and are counted (at about the speed of a direct connection: the test prints it), end of
//! stream still reaches each socket (so half-close can be passed on), and `unsplice` leaves nothing behind.

use std::io::{Read as _, Write as _};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::Duration;

use crate::harness::{can_run, cgroup_root, is_root, wait_for};

/// The kernel programs installed under a bpffs directory of this test's own; uninstalled on drop.
struct Installed {
    kernel: Option<warden::bpf::Kernel>,
    bpffs: std::path::PathBuf,
    _state: tempfile::TempDir,
}

impl Drop for Installed {
    fn drop(&mut self) {
        self.kernel.take();
        let _ = warden::bpf::uninstall(&self.bpffs);
    }
}

/// A connected pair: (the side we write as a peer would, the side Warden holds).
fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let outer = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (inner, _) = l.accept().unwrap();
    for s in [&outer, &inner] {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    }
    (outer, inner)
}

#[test]
fn spliced_sockets_move_and_count_bytes_in_the_kernel() {
    if !can_run("spliced_sockets_move_and_count_bytes_in_the_kernel", &[("needs root (BPF)", is_root())]) {
        return;
    }
    let state = tempfile::tempdir().unwrap();
    let bpffs = std::path::PathBuf::from(format!("/sys/fs/bpf/warden-test-splice-{}", std::process::id()));
    let settings = warden::bpf::Settings {
        bpffs_dir: bpffs.clone(),
        cgroup_root: cgroup_root(),
        state_dir: state.path().to_path_buf(),
    };
    let mut installed =
        Installed { kernel: Some(warden::bpf::install(&settings).expect("install")), bpffs, _state: state };
    let kernel = installed.kernel.as_mut().unwrap();
    assert!(kernel.splice_available(), "this kernel takes the splice program: {:?}", kernel.report);

    // client ── a (accepted by "the proxy") ... b (its upstream connection) ── server
    let (mut client, a) = pair();
    let (mut server, b) = pair();
    let s = kernel.splice(&a, &b).expect("splice").expect("splice available");

    let timer = std::time::Instant::now();
    for _ in 0..200 {
        client.write_all(b"p").unwrap();
        let mut one = [0u8; 1];
        server.read_exact(&mut one).unwrap();
        server.write_all(b"!").unwrap();
        client.read_exact(&mut one).unwrap();
    }
    println!("ping-pong through the splice: {:?} per round trip", timer.elapsed() / 200);
    let timer = std::time::Instant::now();
    let chunk = vec![1u8; 1 << 20];
    let mut sink = vec![0u8; 1 << 20];
    for _ in 0..64 {
        client.write_all(&chunk).unwrap();
        server.read_exact(&mut sink).unwrap();
    }
    println!("64 MiB through the splice: {:.2} Gbit/s", 64.0 * 8.0 / 1024.0 / timer.elapsed().as_secs_f64());
    client.write_all(b"hello from the client").unwrap();
    let mut buf = [0u8; 64];
    let n = server.read(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"hello from the client");
    let big = vec![7u8; 1 << 20];
    server.write_all(&big).unwrap();
    let mut got = vec![0u8; big.len()];
    client.read_exact(&mut got).unwrap();
    assert_eq!(got, big);
    let bytes = wait_for("the byte counts", Duration::from_secs(5), || {
        let b = kernel.spliced_bytes(&s);
        (b.b_to_a == 200 + big.len() as u64).then_some(b)
    });
    assert_eq!(bytes.a_to_b, 200 + (64 << 20) + 21, "{bytes:?}");

    // Half-close: the client's FIN reaches Warden's socket (EOF), which passes it on.
    client.shutdown(Shutdown::Write).unwrap();
    let mut a = a;
    assert_eq!(a.read(&mut buf).unwrap(), 0, "end of stream reaches the spliced socket");
    b.shutdown(Shutdown::Write).unwrap();
    assert_eq!(server.read(&mut buf).unwrap(), 0, "and is passed on");
    // The other way still flows until the server is done.
    server.write_all(b"last words").unwrap();
    let n = client.read(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"last words");

    // Unspliced: the final counts; the caller then closes both sockets.
    let end = kernel.unsplice(&s);
    assert_eq!(end.b_to_a, 200 + big.len() as u64 + 10, "{end:?}");
    assert_eq!(kernel.spliced_bytes(&s), warden::bpf::SplicedBytes::default(), "nothing left in the maps");
}
