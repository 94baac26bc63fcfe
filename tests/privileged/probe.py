#!/usr/bin/env python3
"""What a process inside a tagged cgroup tries, for Warden's privileged tests. Prints one JSON line.

probe.py connect HOST PORT [v6]      connect (v6: an AF_INET6 socket; an IPv4 HOST is then mapped), read the greeting
probe.py tfo HOST PORT               TCP Fast Open: sendto(MSG_FASTOPEN) without connect
probe.py udp HOST PORT               sendto on an unconnected UDP socket
probe.py udp-connect HOST PORT       connect a UDP socket
probe.py raw | packet | icmp | sctp | vsock   open such a socket
probe.py bind HOST PORT              bind (and listen) on HOST:PORT
probe.py thread HOST PORT            connect from a new thread
probe.py child HOST PORT             connect from a forked child
probe.py hold HOST PORT SECS         connect, send a line every 100 ms for up to SECS, report how it ended
probe.py from LOCAL LPORT HOST PORT  bind to LOCAL:LPORT (SO_REUSEADDR) first, then connect
probe.py from-hold LOCAL LPORT HOST PORT   the same, then hold the connection until a line on stdin
probe.py late HOST PORT              make a socket, wait for a line on stdin, then connect it
probe.py holder HOST PORT            connect, print our fd, hold until a line on stdin
probe.py steal PID FD                pidfd_getfd another process's socket and use it; ptrace(SEIZE) it
probe.py tfo6 HOST PORT              TCP Fast Open on an AF_INET6 socket (e.g. to ::ffff:a.b.c.d)
probe.py unspec H1 P1 H2 P2          connect to H1, connect(AF_UNSPEC), then connect the same socket to H2
probe.py udp-redirect H1 P1 H2 P2    connect a UDP socket to H1, then sendto H2 on it
probe.py sendmmsg HOST PORT          sendmmsg(2) of two datagrams to HOST on an unconnected UDP socket
probe.py reuse-listen HOST PORT      bind+listen with SO_REUSEADDR and SO_REUSEPORT
probe.py cgroup-escape DIR...        write our pid into DIR/cgroup.procs, and mkdir DIR/escape, for each DIR
probe.py spin HOST PORT SECS N       leave N detached children retrying connect for SECS, then exit at once
probe.py autobind PORT SECS          listen() on unbound sockets until the kernel picks PORT (or SECS pass)
probe.py flood HOST PORT N           N connects (non-blocking, each closed at once); counts the outcomes
probe.py rthdr HOST PORT SEG         UDP to [HOST]:PORT with an IPv6 segment routing header through SEG: as a
                                     socket option (IPV6_RTHDR), then as ancillary data on sendmsg
probe.py ipopts HOST PORT HOP|rr     UDP to HOST:PORT with IPv4 options (a loose source route through HOP, or
                                     record-route): as IP_OPTIONS, then as ancillary data (IP_RETOPTS) on sendmsg
probe.py sniff IFACE                 (root) record the IPv4/IPv6 packets seen on IFACE until a line on stdin
probe.py hold-many HOST PORT N       N blocking connects kept open; counts the outcomes; hold until a line on stdin
probe.py bulk HOST PORT UP DOWN FIRST   send UP bytes (byte i is i % 251) and half-close, receive DOWN bytes (i % 241)
                                     to end of stream; FIRST=client sends first, FIRST=server receives first
probe.py stream HOST PORT SECS       send 64 KiB writes for up to SECS; report how and when (ended_at) it ended
probe.py recv-until HOST PORT        send a line, then read until end of stream or an error; report which
probe.py reset HOST PORT N           send N bytes, then close with a reset (SO_LINGER 0)
probe.py pretag HOST PORT UHOST UPORT   a TCP connection (greeting read), a connected UDP socket and an
                                     unconnected UDPv6 one (an IPV6_RTHDR set on another, as a control); after
                                     a line on stdin, use the first two again, set IPV6_RTHDR on the third,
                                     and report how that went
"""
import ctypes, errno as errnos, json, os, socket, struct, sys, threading, time

libc = ctypes.CDLL(None, use_errno=True)

def out(**kw):
    kw.setdefault("pid", os.getpid())
    print(json.dumps(kw), flush=True)

def err(e):
    return {"ok": False, "errno": getattr(e, "errno", None), "error": f"{type(e).__name__}: {e}"}

def connect(host, port, v6=False):
    if v6 and ":" not in host:
        host = "::ffff:" + host  # an IPv4 address on an AF_INET6 socket: its mapped form
    fam = socket.AF_INET6 if (v6 or ":" in host) else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(10)
    try:
        s.connect((host, int(port)))
        peer = s.getpeername()
        data = s.recv(200).decode(errors="replace")
        return {"ok": True, "peer": [peer[0], peer[1]], "data": data, "pid": os.getpid()}
    except OSError as e:
        return err(e)
    finally:
        s.close()

op, args = sys.argv[1], sys.argv[2:]
if op == "connect":
    out(**connect(args[0], args[1], len(args) > 2))
elif op == "tfo":
    fam = socket.AF_INET6 if ":" in args[0] else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setblocking(True)  # a blocking TFO sendto waits for the handshake instead of EINPROGRESS
    try:
        s.sendto(b"fastopen\n", socket.MSG_FASTOPEN, (args[0], int(args[1])))
        s.settimeout(10)
        data = s.recv(200).decode(errors="replace")
        out(ok=True, data=data, peer=list(s.getpeername()[:2]))
    except OSError as e:
        out(**err(e))
elif op == "udp":
    s = socket.socket(socket.AF_INET6 if ":" in args[0] else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.sendto(b"x", (args[0], int(args[1])))
        out(ok=True)
    except OSError as e:
        out(**err(e))
elif op == "udp-connect":
    s = socket.socket(socket.AF_INET6 if ":" in args[0] else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect((args[0], int(args[1])))
        out(ok=True)
    except OSError as e:
        out(**err(e))
elif op in ("raw", "packet", "icmp", "sctp", "mptcp", "udplite", "vsock"):
    spec = {
        "raw": (socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP),
        "packet": (socket.AF_PACKET, socket.SOCK_RAW, 0),
        "icmp": (socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP),
        "sctp": (socket.AF_INET, socket.SOCK_STREAM, 132),
        "mptcp": (socket.AF_INET, socket.SOCK_STREAM, 262),
        "udplite": (socket.AF_INET, socket.SOCK_DGRAM, 136),
        "vsock": (socket.AF_VSOCK, socket.SOCK_STREAM, 0),
    }[op]
    try:
        socket.socket(*spec).close()
        out(ok=True)
    except OSError as e:
        out(**err(e))
elif op == "bind":
    s = socket.socket(socket.AF_INET6 if ":" in args[0] else socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((args[0], int(args[1])))
        s.listen()
        out(ok=True)
    except OSError as e:
        out(**err(e))
elif op == "thread":
    res = {}
    t = threading.Thread(target=lambda: res.update(connect(args[0], args[1])))
    t.start(); t.join()
    out(**res)
elif op == "child":
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(w, json.dumps(connect(args[0], args[1])).encode())
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 4096):
        data += chunk
    os.waitpid(pid, 0)
    out(**json.loads(data))
elif op == "hold":
    s = socket.socket(socket.AF_INET6 if ":" in args[0] else socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(5)
    start = time.monotonic()
    try:
        s.connect((args[0], int(args[1])))
        s.recv(200)
    except OSError as e:
        out(**err(e)); sys.exit(0)
    ended, sent = "still open", 0
    while time.monotonic() - start < float(args[2]):
        try:
            s.sendall(b"ping\n"); sent += 1
            got = s.recv(100)
            if not got:
                ended = "closed by peer"; break
        except OSError as e:
            ended = f"{type(e).__name__}: {e}"; break
        time.sleep(0.1)
    out(ok=True, ended=ended, held_secs=round(time.monotonic() - start, 2), sent=sent)
elif op in ("from", "from-hold"):
    fam = socket.AF_INET6 if ":" in args[2] else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.settimeout(10)
    try:
        s.bind((args[0], int(args[1])))
        s.connect((args[2], int(args[3])))
        data = s.recv(200).decode(errors="replace")
        out(ok=True, data=data, peer=list(s.getpeername()[:2]), local=list(s.getsockname()[:2]))
        if op == "from-hold":
            sys.stdin.readline()
            out(ok=True, peer=list(s.getpeername()[:2]), closed=True)
    except OSError as e:
        out(**err(e))
elif op == "late":
    # A socket made before the process is tagged (or received from elsewhere), connected after.
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(10)
    out(ready=True)
    sys.stdin.readline()
    try:
        s.connect((args[0], int(args[1])))
        data = s.recv(200).decode(errors="replace")
        out(ok=True, data=data, peer=list(s.getpeername()[:2]))
    except OSError as e:
        out(**err(e))
elif op == "untagged-loop":
    # n connections one after the other, each with getpeername and a socket option, closed at once.
    host, port, n = args[0], int(args[1]), int(args[2])
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    done = 0
    try:
        for _ in range(n):
            s = socket.socket(fam, socket.SOCK_STREAM)
            s.settimeout(10)
            s.connect((host, port))
            s.getpeername()
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.close()
            done += 1
        out(ok=True, connected=done)
    except OSError as e:
        out(connected=done, **err(e))
elif op == "holder":
    # An untagged process's connected socket, for 'steal' to take: prints its pid and fd, waits for stdin.
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.connect((args[0], int(args[1])))
    s.recv(200)
    out(ok=True, fd=s.fileno())
    sys.stdin.readline()
elif op == "steal":
    # Take another process's connected socket (pidfd_getfd), else attach to it (ptrace), and use it.
    pid, fd = int(args[0]), int(args[1])
    res = {}
    pidfd = libc.syscall(434, pid, 0)
    got = libc.syscall(438, pidfd, fd, 0) if pidfd >= 0 else -1
    res["pidfd_getfd_errno"] = 0 if got >= 0 else ctypes.get_errno()
    if got >= 0:
        s = socket.socket(fileno=got)
        s.sendall(b"stolen\n")
        res["echo"] = s.recv(100).decode(errors="replace")
    PTRACE_SEIZE = 0x4206
    r = libc.ptrace(PTRACE_SEIZE, pid, None, None)
    res["ptrace_errno"] = 0 if r == 0 else ctypes.get_errno()
    out(ok=got >= 0 or r == 0, **res)
elif op == "tfo6":
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        s.sendto(b"fastopen\n", socket.MSG_FASTOPEN, (args[0], int(args[1])))
        s.settimeout(10)
        data = s.recv(200).decode(errors="replace")
        out(ok=True, data=data, peer=list(s.getpeername()[:2]))
    except OSError as e:
        out(**err(e))
elif op == "unspec":
    s = socket.socket(socket.AF_INET6 if ":" in args[0] else socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(10)
    try:
        s.connect((args[0], int(args[1])))
        s.recv(200)
    except OSError as e:
        out(stage="first connect", **err(e)); sys.exit(0)
    unspec = ctypes.create_string_buffer(struct.pack("H", socket.AF_UNSPEC) + b"\0" * 26)
    if libc.connect(s.fileno(), unspec, 28) != 0:
        e = ctypes.get_errno()
        out(ok=False, stage="AF_UNSPEC", errno=e, error=os.strerror(e)); sys.exit(0)
    try:
        s.connect((args[2], int(args[3])))
        data = s.recv(200).decode(errors="replace")
        out(ok=True, data=data)
    except OSError as e:
        out(stage="reconnect", **err(e))
elif op == "udp-redirect":
    s = socket.socket(socket.AF_INET6 if ":" in args[0] else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect((args[0], int(args[1])))
    except OSError as e:
        out(stage="connect", **err(e)); sys.exit(0)
    try:
        s.sendto(b"x", (args[2], int(args[3])))
        out(ok=True)
    except OSError as e:
        out(stage="sendto", **err(e))
elif op == "sendmmsg":
    class iovec(ctypes.Structure):
        _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
    class msghdr(ctypes.Structure):
        _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32), ("iov", ctypes.POINTER(iovec)),
                    ("iovlen", ctypes.c_size_t), ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                    ("flags", ctypes.c_int)]
    class mmsghdr(ctypes.Structure):
        _fields_ = [("hdr", msghdr), ("len", ctypes.c_uint)]
    v6 = ":" in args[0]
    s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
    if v6:
        addr = struct.pack("!HHI", socket.AF_INET6, int(args[1]), 0) + socket.inet_pton(socket.AF_INET6, args[0]) + b"\0" * 4
        addr = struct.pack("H", socket.AF_INET6) + addr[2:]
    else:
        addr = struct.pack("H", socket.AF_INET) + struct.pack("!H", int(args[1])) + socket.inet_aton(args[0]) + b"\0" * 8
    name = ctypes.create_string_buffer(addr, len(addr))
    payload = ctypes.create_string_buffer(b"mmsg")
    iov = iovec(ctypes.cast(payload, ctypes.c_void_p), 4)
    msgs = (mmsghdr * 2)()
    for m in msgs:
        m.hdr.name = ctypes.cast(name, ctypes.c_void_p)
        m.hdr.namelen = len(addr)
        m.hdr.iov = ctypes.pointer(iov)
        m.hdr.iovlen = 1
    n = libc.sendmmsg(s.fileno(), msgs, 2, 0)
    if n < 0:
        e = ctypes.get_errno()
        out(ok=False, errno=e, error=os.strerror(e))
    else:
        out(ok=n > 0, sent=n)
elif op == "reuse-listen":
    s = socket.socket(socket.AF_INET6 if ":" in args[0] else socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        s.bind((args[0], int(args[1])))
        s.listen()
        out(ok=True)
    except OSError as e:
        out(**err(e))
elif op == "cgroup-escape":
    results = []
    for d in args:
        for what, f in (("join", lambda: open(os.path.join(d, "cgroup.procs"), "w").write(str(os.getpid()))),
                        ("mkdir", lambda: os.mkdir(os.path.join(d, "escape")))):
            try:
                f()
                results.append({"dir": d, "what": what, "ok": True})
            except OSError as e:
                results.append({"dir": d, "what": what, "ok": False, "errno": e.errno})
    me = next(l for l in open("/proc/self/cgroup").read().splitlines() if l.startswith("0::"))
    out(ok=any(r["ok"] for r in results), results=results, cgroup=me)
elif op == "spin":
    host, port, secs, n = args[0], int(args[1]), float(args[2]), int(args[3])
    r, w = os.pipe()
    for _ in range(n):
        if os.fork() == 0:
            os.setsid()
            if os.fork() != 0:
                os._exit(0)
            os.close(r)
            fam = socket.AF_INET6 if ":" in host else socket.AF_INET
            os.write(w, b"x"); os.close(w)
            end = time.monotonic() + secs
            while time.monotonic() < end:
                s = socket.socket(fam, socket.SOCK_STREAM)
                try:
                    s.connect((host, port))
                    s.sendall(b"escaped\n")
                    time.sleep(1)
                    os._exit(0)
                except OSError:
                    pass
                finally:
                    s.close()
            os._exit(0)
    os.close(w)
    got = 0
    while got < n:
        got += len(os.read(r, n))
    # The children spin before the command exits, so they are live through the whole teardown.
    time.sleep(0.05)
    out(ok=True, spinning=n)
elif op == "autobind":
    want, end = int(args[0]), time.monotonic() + float(args[1])
    tries = 0
    while time.monotonic() < end:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tries += 1
        try:
            s.listen()
            if s.getsockname()[1] == want:
                out(ok=True, tries=tries, local=list(s.getsockname()))
                sys.exit(0)
        except OSError as e:
            out(tries=tries, **err(e)); sys.exit(0)
        finally:
            s.close()
    out(ok=False, tries=tries, error="the kernel never picked the port")
elif op == "flood":
    host, port, n = args[0], int(args[1]), int(args[2])
    counts = {}
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(n):
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect((host, port))
            k = "ok"
        except BlockingIOError:
            k = "inprogress"
        except OSError as e:
            k = errnos.errorcode.get(e.errno, str(e.errno))
        counts[k] = counts.get(k, 0) + 1
        s.close()
    out(ok=True, counts=counts)
elif op in ("rthdr", "ipopts"):
    host, port, via = args[0], int(args[1]), args[2]
    if op == "rthdr":
        fam, level, name = socket.AF_INET6, socket.IPPROTO_IPV6, 57  # IPV6_RTHDR
        # struct ipv6_sr_hdr: nexthdr, hdrlen (8-octet units after the first 8), type 4, segments_left 1,
        # last_entry 1, flags, tag; then segments[0] (the final destination, filled in by the kernel) and
        # segments[1] (the first hop).
        opt = bytes([0, 4, 4, 1, 1, 0, 0, 0]) + socket.inet_pton(fam, host) + socket.inet_pton(fam, via)
        cmsg_level, cmsg_type = socket.IPPROTO_IPV6, 57
    else:
        fam, level, name = socket.AF_INET, socket.IPPROTO_IP, 4  # IP_OPTIONS
        # Unprivileged users may not set source routes (LSRR/SSRR need CAP_NET_RAW on current kernels), but
        # any other option still shapes the packet: a record-route option (type 7, length 7, pointer 4,
        # one empty slot) if VIA is "rr", else a loose source route through VIA (type 131).
        if via == "rr":
            opt = bytes([7, 7, 4, 0, 0, 0, 0, 0])
        else:
            opt = bytes([131, 7, 4]) + socket.inet_aton(via) + bytes([0])
        cmsg_level, cmsg_type = socket.IPPROTO_IP, 7  # IP_RETOPTS
    res = {}
    s = socket.socket(fam, socket.SOCK_DGRAM)
    try:
        s.setsockopt(level, name, opt)
        res["sockopt"] = {"ok": True}
        try:
            s.sendto(b"routed-sockopt", (host, port))
            res["sockopt_send"] = {"ok": True}
        except OSError as e:
            res["sockopt_send"] = err(e)
    except OSError as e:
        res["sockopt"] = err(e)
    s.close()
    s = socket.socket(fam, socket.SOCK_DGRAM)
    try:
        s.sendmsg([b"routed-cmsg"], [(cmsg_level, cmsg_type, opt)], 0, (host, port))
        res["cmsg"] = {"ok": True}
    except OSError as e:
        res["cmsg"] = err(e)
    s.close()
    # Control: the same destination without any option.
    s = socket.socket(fam, socket.SOCK_DGRAM)
    try:
        s.sendto(b"plain", (host, port))
        res["plain"] = {"ok": True}
    except OSError as e:
        res["plain"] = err(e)
    out(ok=True, **res)
elif op == "sniff":
    import select
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    s.bind((args[0], 0))
    out(ready=True)
    seen = []
    def take(data):
        pkt = data[14:]  # loopback frames carry a zeroed Ethernet header
        if not pkt:
            return
        v = pkt[0] >> 4
        if v == 6 and len(pkt) >= 40:
            seen.append({"v": 6, "dst": socket.inet_ntop(socket.AF_INET6, pkt[24:40]), "nh": pkt[6]})
        elif v == 4 and len(pkt) >= 20:
            seen.append({"v": 4, "dst": socket.inet_ntop(socket.AF_INET, pkt[16:20]), "ihl": pkt[0] & 15})
    while True:
        r, _, _ = select.select([s, sys.stdin], [], [])
        if s in r:
            take(s.recv(65535))
        if sys.stdin in r:
            sys.stdin.readline()
            s.setblocking(False)
            try:
                while True:
                    take(s.recv(65535))
            except BlockingIOError:
                pass
            break
    out(ok=True, seen=seen)
elif op == "hold-many":
    host, port, n = args[0], int(args[1]), int(args[2])
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    counts, held = {}, []
    for _ in range(n):
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.settimeout(10)
        try:
            s.connect((host, port))
            k = "ok"
            held.append(s)
        except OSError as e:
            k = errnos.errorcode.get(e.errno, str(e.errno))
            s.close()
        counts[k] = counts.get(k, 0) + 1
    out(ok=True, counts=counts)
    sys.stdin.readline()
    for s in held:
        s.close()
    out(ok=True, closed=len(held))
elif op == "hold-greeted":
    # Opens n connections one after another, each waiting up to t seconds for the server's greeting, holds
    # them all until a line arrives on stdin, then closes them.
    host, port, n, t = args[0], int(args[1]), int(args[2]), float(args[3])
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    counts, held = {}, []
    for _ in range(n):
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.settimeout(t)
        try:
            s.connect((host, port))
            held.append(s)
            data = s.recv(200).decode(errors="replace")
            k = "greeted" if data.startswith("hello") else ("closed" if not data else "other")
        except socket.timeout:
            k = "silent"
        except OSError as e:
            k = errnos.errorcode.get(e.errno, str(e.errno))
        counts[k] = counts.get(k, 0) + 1
    out(ok=True, counts=counts)
    sys.stdin.readline()
    for s in held:
        s.close()
    out(ok=True, closed=len(held))
elif op == "storm":
    # Paced connects for secs seconds: trate/s to a target (closed at once with a reset, so no TIME_WAIT;
    # every `every`-th one blocking, waiting for the server's greeting) and nrate/s to a non-target.
    th, tp, nh, nport = args[0], int(args[1]), args[2], int(args[3])
    secs, trate, nrate, every = float(args[4]), int(args[5]), int(args[6]), int(args[7])
    counts = {}
    def bump(k):
        counts[k] = counts.get(k, 0) + 1
    def code(e):
        return errnos.errorcode.get(e.errno, type(e).__name__) if e.errno else type(e).__name__
    linger = struct.pack("ii", 1, 0)
    start = time.monotonic()
    sent_t = sent_n = greeted = sampled = 0
    while True:
        el = time.monotonic() - start
        if el >= secs:
            break
        if sent_t >= int(el * trate) and sent_n >= int(el * nrate):
            time.sleep(0.001)
            continue
        if sent_n < int(el * nrate):
            sent_n += 1
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect((nh, nport))
                bump("n_ok")
            except BlockingIOError:
                bump("n_inprogress")
            except OSError as e:
                bump("n_" + code(e))
            s.close()
        if sent_t < int(el * trate):
            sent_t += 1
            if sent_t % every == 0:
                sampled += 1
                s = socket.socket()
                s.settimeout(5)
                try:
                    s.connect((th, tp))
                    d = s.recv(100)
                    if d.startswith(b"hello"):
                        greeted += 1
                    else:
                        bump("t_sample_" + ("closed" if not d else "other"))
                except OSError as e:
                    bump("t_sample_" + code(e))
                s.close()
            else:
                s = socket.socket()
                s.setblocking(False)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                try:
                    s.connect((th, tp))
                    bump("t_ok")
                except BlockingIOError:
                    bump("t_inprogress")
                except OSError as e:
                    bump("t_" + code(e))
                s.close()
    out(ok=True, counts=counts, target=sent_t, other=sent_n, sampled=sampled, greeted=greeted,
        secs=round(time.monotonic() - start, 2), ms=int((time.monotonic() - start) * 1000))
elif op == "bulk":
    up, down, first = int(args[2]), int(args[3]), args[4]
    s = socket.socket(socket.AF_INET6 if ":" in args[0] else socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(30)
    pattern = bytes(range(251)) * (1 << 16)  # 16 MiB, a whole number of periods

    def send_all():
        left = up
        while left:
            k = min(left, len(pattern))
            s.sendall(pattern[:k]); left -= k
        s.shutdown(socket.SHUT_WR)

    def receive_all():
        got, intact, period = 0, True, bytes(range(241)) * 64
        while True:
            chunk = s.recv(1 << 20)
            if not chunk:
                return got, intact
            start = got % 241
            want = (period * (len(chunk) // len(period) + 2))[start:start + len(chunk)]
            intact = intact and chunk == want
            got += len(chunk)

    try:
        s.connect((args[0], int(args[1])))
        if first == "client":
            send_all(); received, intact = receive_all()
        else:
            received, intact = receive_all(); send_all()
            # The server closes once it has read everything.
            s.recv(1)
        out(ok=True, sent=up, received=received, intact=intact)
    except OSError as e:
        out(**err(e))
elif op == "stream":
    s = socket.socket(socket.AF_INET6 if ":" in args[0] else socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(10)
    chunk, sent, ended = b"x" * 65536, 0, "still open"
    try:
        s.connect((args[0], int(args[1])))
    except OSError as e:
        out(**err(e)); sys.exit(0)
    start = time.monotonic()
    while time.monotonic() - start < float(args[2]):
        try:
            s.sendall(chunk); sent += len(chunk)
        except OSError as e:
            ended = f"{type(e).__name__}: {e}"; break
    out(ok=True, ended=ended, ended_at=time.time(), sent=sent)
elif op == "recv-until":
    s = socket.socket(socket.AF_INET6 if ":" in args[0] else socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(10)
    try:
        s.connect((args[0], int(args[1])))
        s.sendall(b"hello\n")
        while s.recv(65536):
            pass
        out(ok=True, ended="eof")
    except OSError as e:
        out(ok=True, ended="error", errno=e.errno, error=f"{type(e).__name__}: {e}")
elif op == "reset":
    s = socket.socket(socket.AF_INET6 if ":" in args[0] else socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(10)
    try:
        s.connect((args[0], int(args[1])))
        s.sendall(b"r" * int(args[2]))
        time.sleep(0.2)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
        out(ok=True)
    except OSError as e:
        out(**err(e))
elif op == "pretag":
    t = socket.create_connection((args[0], int(args[1])), timeout=10)
    greeting = t.recv(200).decode(errors="replace")
    u = socket.socket(socket.AF_INET6 if ":" in args[2] else socket.AF_INET, socket.SOCK_DGRAM)
    u.connect((args[2], int(args[3])))
    u.send(b"before")
    # A segment routing header through ::1 (see rthdr): valid, so only a hook refuses it.
    srh = bytes([0, 4, 4, 1, 1, 0, 0, 0]) + socket.inet_pton(socket.AF_INET6, "::1") * 2
    r = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    c = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        c.setsockopt(socket.IPPROTO_IPV6, 57, srh)
        control = {"ok": True}
    except OSError as e:
        control = err(e)
    out(ready=True, greeting=greeting, rthdr_before=control)
    sys.stdin.readline()
    res = {}
    try:
        r.setsockopt(socket.IPPROTO_IPV6, 57, srh)
        res["rthdr"] = {"ok": True}
    except OSError as e:
        res["rthdr"] = err(e)
    try:
        t.sendall(b"after\n")
        data = t.recv(200)
        res["tcp"] = {"ok": bool(data), "data": data.decode(errors="replace")}
    except OSError as e:
        res["tcp"] = err(e)
    try:
        u.send(b"after")
        u.send(b"after")
        res["udp"] = {"ok": True}
    except OSError as e:
        res["udp"] = err(e)
    out(ok=True, **res)
else:
    out(ok=False, error=f"unknown op {op}")
