#!/usr/bin/env python3
"""What a process inside a tagged cgroup tries, for Warden's privileged tests. Prints one JSON line.

probe.py connect HOST PORT [v6]      connect (v6: an AF_INET6 socket, e.g. for ::ffff:a.b.c.d), read the greeting
probe.py tfo HOST PORT               TCP Fast Open: sendto(MSG_FASTOPEN) without connect
probe.py udp HOST PORT               sendto on an unconnected UDP socket
probe.py udp-connect HOST PORT       connect a UDP socket
probe.py raw | packet | icmp | sctp | vsock   open such a socket
probe.py bind HOST PORT              bind (and listen) on HOST:PORT
probe.py thread HOST PORT            connect from a new thread
probe.py child HOST PORT             connect from a forked child
probe.py hold HOST PORT SECS         connect, send a line every 100 ms for up to SECS, report how it ended
"""
import json, os, socket, sys, threading, time

def out(**kw):
    kw.setdefault("pid", os.getpid())
    print(json.dumps(kw), flush=True)

def err(e):
    return {"ok": False, "errno": getattr(e, "errno", None), "error": f"{type(e).__name__}: {e}"}

def connect(host, port, v6=False):
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
else:
    out(ok=False, error=f"unknown op {op}")
