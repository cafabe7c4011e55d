"""Which node of a multi-host job this host is, and a rendezvous of the nodes that never hangs.

    python -m launch.hosts plan --ips 10.0.0.1,10.0.0.2 [--host ADDR]      prints "INDEX ADDRESS INTERFACE"
    python -m launch.hosts rendezvous --ips ... --index I [--port P] [--timeout S]

A node is found by the addresses of its own network interfaces, not by resolving its hostname (which
often names a management network while --ips lists the data network). ``--host`` (or TSN_HOST)
overrides. Its interface is the one gloo and NCCL are told to use (GLOO_SOCKET_IFNAME,
NCCL_SOCKET_IFNAME): left alone, they too pick the address the hostname resolves to.

The rendezvous is a TCP barrier on the first node's address: every node joins within ``--timeout``
seconds or every node stops, naming the nodes that did not join and the address it waited on; a node
that dies while waiting is named the same way. run_dist.sh runs both before it starts Paddle's
launcher; ``mpi_address`` does the choosing for mpirun (docs/design.md "Several hosts").
"""

from __future__ import annotations

import argparse
import ctypes
import ipaddress
import os
import select
import socket
import sys
import time

from common import log as logs

log = logs.get_logger(__name__)

DEFAULT_PORT = 6069  # Paddle's launcher takes 6070.. (its --start_port) on every node
DEFAULT_TIMEOUT = 300.0


class HostError(RuntimeError):
    """A one-line error about the hosts of a job (run_dist.sh prints it and stops)."""


class _SockaddrIn(ctypes.Structure):  # Linux: sa_family is an unsigned short
    _fields_ = [("family", ctypes.c_ushort), ("port", ctypes.c_uint16), ("addr", ctypes.c_uint8 * 4)]


class _Ifaddrs(ctypes.Structure):
    pass


_Ifaddrs._fields_ = [
    ("next", ctypes.POINTER(_Ifaddrs)),
    ("name", ctypes.c_char_p),
    ("flags", ctypes.c_uint),
    ("addr", ctypes.POINTER(_SockaddrIn)),
    ("netmask", ctypes.POINTER(_SockaddrIn)),
    ("ifu", ctypes.c_void_p),
    ("data", ctypes.c_void_p),
]


def interfaces() -> list[tuple[str, ipaddress.IPv4Interface]]:
    """(interface name, IPv4 address and network) of every address of this host (network namespace),
    loopback included, in the kernel's order. getifaddrs(3), not the SIOCGIFADDR ioctl, which sees only
    an interface's first address: a data address added to an interface that already had one, or under a
    label (``ip addr add ... label eth0:data``), is found too, named by its label as gloo and NCCL name it."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.getifaddrs.argtypes = [ctypes.POINTER(ctypes.POINTER(_Ifaddrs))]
    libc.freeifaddrs.argtypes = [ctypes.POINTER(_Ifaddrs)]
    head = ctypes.POINTER(_Ifaddrs)()
    if libc.getifaddrs(ctypes.byref(head)) != 0:
        raise OSError(ctypes.get_errno(), "getifaddrs failed")
    out = []
    try:
        node = head
        while node:
            ifa = node.contents
            if ifa.addr and ifa.netmask and ifa.addr.contents.family == socket.AF_INET:
                addr, mask = (socket.inet_ntoa(bytes(a.contents.addr)) for a in (ifa.addr, ifa.netmask))
                out.append((ifa.name.decode(errors="replace"), ipaddress.IPv4Interface(f"{addr}/{mask}")))
            node = ifa.next
    finally:
        libc.freeifaddrs(head)
    return out


def own_addresses() -> set[str]:
    return {str(i.ip) for _, i in interfaces()}


def interface_of(address: str) -> str:
    """The name of the interface holding ``address`` ("" when none here, e.g. a --host override)."""
    return next((name for name, i in interfaces() if str(i.ip) == address), "")


def hidden_behind(address: str) -> str:
    """The address gloo and NCCL would use instead of ``address`` when told its interface's name: they
    take that name's first address ("" when that is ``address`` itself)."""
    name = interface_of(address)
    first = next((str(i.ip) for n, i in interfaces() if n == name), address)
    return "" if first == address else first


def address_warning(address: str) -> str:
    """Why gloo and NCCL would not use ``address`` and what fixes it ("" when they would)."""
    name, first = interface_of(address), hidden_behind(address)
    if not first:
        return ""
    return (
        f"{address} is not the first address of {name}, and gloo and NCCL (told the interface's name) will "
        f"use {first}; give {address} a label of its own (ip addr add {address}/PREFIX dev {name} label "
        f"{name}:data) unless the other nodes reach {first} as well"
    )


def parse_ips(text: str) -> list[str]:
    ips = [p.strip() for p in text.split(",") if p.strip()]
    for ip in ips:
        try:
            ipaddress.IPv4Address(ip)
        except ValueError:
            raise HostError(
                f"--ips: {ip!r} is not an IPv4 address (give the nodes' addresses, comma-separated)"
            ) from None
    if len(set(ips)) != len(ips):
        raise HostError(f"--ips {text}: an address is listed twice")
    return ips


def plan(ips: list[str], host: str | None = None, addresses: set[str] | None = None) -> tuple[int, str]:
    """(index in ``ips``, address) of this node: ``host`` if given, else the one of ``ips`` that is an
    address of this host's interfaces."""
    if host:
        if host not in ips:
            raise HostError(f"--host {host} is not one of --ips {','.join(ips)}")
        return ips.index(host), host
    addresses = own_addresses() if addresses is None else addresses
    mine = [ip for ip in ips if ip in addresses]
    if len(mine) == 1:
        return ips.index(mine[0]), mine[0]
    listed = ", ".join(sorted(addresses - {"127.0.0.1"})) or "none but 127.0.0.1"
    if not mine:
        raise HostError(
            f"this host ({socket.gethostname()}: {listed}) has none of --ips {','.join(ips)}; "
            "run it on one of those nodes, or name its address with --host ADDR"
        )
    raise HostError(f"this host has several of --ips ({', '.join(mine)}); say which node it is with --host ADDR")


def mpi_address(comm, probe_timeout: float = 2.0) -> tuple[str, str]:
    """(address, interface) this MPI rank announces to the others: on the network that every rank has an
    address in and can reach rank 0 on (tried by connecting, since a management network can look the
    same on every host while only the data network connects them). PADDLE_HOST overrides."""
    if os.environ.get("PADDLE_HOST"):
        return os.environ["PADDLE_HOST"], interface_of(os.environ["PADDLE_HOST"])
    mine = [(name, i) for name, i in interfaces() if not i.ip.is_loopback]
    everyone = comm.allgather(sorted(str(i) for _, i in mine))
    if all(other == everyone[0] for other in everyone):  # one host: its ranks meet on the loopback
        return "127.0.0.1", next((n for n, i in interfaces() if i.ip.is_loopback), "lo")
    offers, everyone_reached = _probe_rank0(comm, mine, everyone, probe_timeout)
    for addr, _ in offers:
        if all(addr in r for r in everyone_reached):
            name, iface = next((n, i) for n, i in mine if ipaddress.IPv4Address(addr) in i.network)
            return str(iface.ip), name
    raise HostError(
        "launch.mpi_env: no network reaches rank 0 from every rank (addresses: "
        + "; ".join(f"rank {r}: {', '.join(a) or 'none'}" for r, a in enumerate(everyone))
        + "); set PADDLE_HOST to each node's address on the data network"
    )


def _probe_rank0(comm, mine, everyone, probe_timeout: float) -> tuple[list, list[list[str]]]:
    """Rank 0 listens on each of its addresses in a network that every rank has an address in, and every
    other rank tries to connect to each: rank 0's offers (address, port), and the addresses each rank reached."""
    common = [
        i.network
        for _, i in mine
        if all(any(ipaddress.IPv4Interface(a).ip in i.network for a in other) for other in everyone)
    ]
    listeners = []
    if comm.Get_rank() == 0:  # listen on each candidate address; the others try to connect
        for _, i in mine:
            if i.network in common:
                s = socket.socket()
                s.bind((str(i.ip), 0))
                s.listen(comm.Get_size())
                listeners.append(s)
    offers = comm.bcast([s.getsockname() for s in listeners], root=0)
    reached = []
    for addr, port in offers:
        if comm.Get_rank() == 0:
            reached.append(addr)
            continue
        try:
            socket.create_connection((addr, port), timeout=probe_timeout).close()
            reached.append(addr)
        except OSError:
            pass
    everyone_reached = comm.allgather(reached)
    for s in listeners:
        s.close()
    return offers, everyone_reached


# ---------------------------------------------------------------- the rendezvous


def _lines(conn, deadline: float) -> str:
    """One line from ``conn`` before ``deadline`` ("" if the peer closed or the time ran out)."""
    buf = b""
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([conn], [], [], left)[0]:
            return ""
        chunk = conn.recv(256)
        if not chunk:
            return ""
        buf += chunk
    return buf.decode(errors="replace").strip()


def _lead(ips: list[str], port: int, timeout: float) -> None:
    """Node 0: wait until every other node has joined, then tell them all to go (or all to stop)."""
    deadline = time.monotonic() + timeout
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        server.bind((ips[0], port))
    except OSError as e:
        server.close()
        raise HostError(
            f"rendezvous: cannot listen on {ips[0]}:{port} ({e.strerror}); is a job already running here?"
        ) from None
    server.listen(len(ips))
    joined: dict[int, socket.socket] = {}
    try:
        while len(joined) < len(ips) - 1:
            left = deadline - time.monotonic()
            watched = [server, *joined.values()]
            ready = select.select(watched, [], [], max(0.0, left))[0] if left > 0 else []
            if not ready:
                missing = [ip for i, ip in enumerate(ips[1:], 1) if i not in joined]
                raise HostError(
                    f"rendezvous: waited {timeout:.0f}s on {ips[0]}:{port}; node(s) {', '.join(missing)} did not join "
                    "(not started, or cannot reach this address); every node stops"
                )
            for sock in ready:
                if sock is server:
                    _admit(server, ips, joined, deadline)
                else:
                    _check_still_joined(sock, ips, port, joined)
        for conn in joined.values():
            conn.sendall(b"go\n")
    except HostError as e:
        for conn in joined.values():
            try:
                conn.sendall(f"stop {e}\n".encode())
            except OSError:
                pass
        raise
    finally:
        for conn in joined.values():
            conn.close()
        server.close()


def _admit(server: socket.socket, ips: list[str], joined: dict[int, socket.socket], deadline: float) -> None:
    """Node 0: take one node's hello ("INDEX ADDRESS") into ``joined``; a node that joins twice is told to
    stop, anything else that connects is hung up on."""
    conn, _ = server.accept()
    hello = _lines(conn, deadline).split()
    if not (len(hello) == 2 and hello[0].isdigit() and 0 < int(hello[0]) < len(ips)):
        conn.close()
        return
    index = int(hello[0])
    if index in joined:
        conn.sendall(f"stop node {ips[index]} joined twice\n".encode())
        conn.close()
    else:
        joined[index] = conn


def _check_still_joined(sock: socket.socket, ips: list[str], port: int, joined: dict[int, socket.socket]) -> None:
    """Node 0: a joined node's connection became readable; closed, it means the node died while waiting."""
    index = next(i for i, c in joined.items() if c is sock)
    if not sock.recv(1):
        del joined[index]
        sock.close()
        raise HostError(
            f"rendezvous: node {ips[index]} joined at {ips[0]}:{port} and then went away "
            "(killed, or its job failed); every node stops"
        )


def _join(ips: list[str], index: int, port: int, timeout: float) -> None:
    """Node > 0: reach node 0 (retrying until the deadline), say who we are, wait for its word."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn = socket.create_connection((ips[0], port), timeout=max(0.1, min(5.0, deadline - time.monotonic())))
            break
        except OSError as e:
            if time.monotonic() >= deadline:
                raise HostError(
                    f"rendezvous: node {ips[index]} could not reach the first node at {ips[0]}:{port} within "
                    f"{timeout:.0f}s ({e.strerror or e}); is it started, and is that address reachable from here?"
                ) from None
            time.sleep(0.5)
    with conn:
        conn.sendall(f"{index} {socket.gethostname()}\n".encode())
        word = _lines(conn, deadline + 5)  # node 0 answers at its own deadline at the latest
    if word == "go":
        return
    if word.startswith("stop "):
        raise HostError(word[5:])
    raise HostError(f"rendezvous: the first node {ips[0]}:{port} went away before all nodes joined; every node stops")


def rendezvous(ips: list[str], index: int, port: int = DEFAULT_PORT, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Return when every node of ``ips`` has joined; raise HostError (on every node) when not."""
    if len(ips) < 2:
        return
    if index == 0:
        _lead(ips, port, timeout)
    else:
        _join(ips, index, port, timeout)


def main(argv=None) -> int:
    logs.setup()
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.partition("\n\n")[2],
    )
    p.add_argument(
        "action",
        choices=("plan", "rendezvous"),
        help="plan: print this node's index, address and interface; rendezvous: wait until every node joined",
    )
    p.add_argument("--ips", required=True, help="the nodes' IPv4 addresses, comma-separated, the first one leads")
    p.add_argument(
        "--host",
        default=os.environ.get("TSN_HOST") or None,
        help="this node's address among --ips (default TSN_HOST, else found among the interfaces' addresses)",
    )
    p.add_argument("--index", type=int, help="rendezvous: this node's index in --ips (plan prints it)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"rendezvous: the first node's port ({DEFAULT_PORT})")
    p.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT, help=f"rendezvous: seconds to wait ({DEFAULT_TIMEOUT:.0f})"
    )
    args = p.parse_args(argv)
    try:
        ips = parse_ips(args.ips)
        if args.action == "plan":
            index, address = plan(ips, args.host)
            print(index, address, interface_of(address) or "-")  # the plan run_dist.sh reads, not a message
            warning = address_warning(address)
            if warning:
                log.warning(f"run_dist.sh: warning: {warning}")
        else:
            from common.lifeline import link

            link()  # ends with run_dist.sh, like the launcher after it
            rendezvous(ips, args.index, args.port, args.timeout)
    except HostError as e:
        log.error(f"run_dist.sh: {e}")
        return 2 if args.action == "plan" else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
