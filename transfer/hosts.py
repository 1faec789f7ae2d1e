"""Which address a worker binds and advertises, and which network device UCX may use for it.

``--host`` (the HTTP and bootstrap address) and ``--disaggregation-data-host`` (the KV data path's, default:
``--host``) name addresses of this machine. A specific address binds exactly there: the bootstrap server's
socket, and UCX's TCP transport only on the device holding that address (``net_devices_for``; "lo" for
127.0.0.1). A wildcard (0.0.0.0, ::, "") binds every device, and peers are told this host's outward
address (``advertised_host``), never the wildcard or a loopback address.
"""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import socket
import struct

logger = logging.getLogger(__name__)

WILDCARDS = ("", "0.0.0.0", "::", "[::]")
_SIOCGIFADDR = 0x8915


def is_wildcard(host: str | None) -> bool:
    return host is None or host.strip() in WILDCARDS


def resolve(host: str) -> str:
    """``host`` as an IP address (a name is looked up); ValueError when it cannot be."""
    h = host.strip().strip("[]")
    try:
        return str(ipaddress.ip_address(h))
    except ValueError:
        pass
    try:
        return str(socket.getaddrinfo(h, None, proto=socket.IPPROTO_TCP)[0][4][0])
    except (OSError, IndexError) as e:
        raise ValueError(f"cannot resolve host {host!r}: {e}") from e


def interface_addresses() -> dict[str, list[str]]:
    """Network device name -> its addresses (IPv4 through ioctl, IPv6 from /proc/net/if_inet6)."""
    out: dict[str, list[str]] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
                out.setdefault(name, []).append(socket.inet_ntoa(raw[20:24]))
            except OSError:
                out.setdefault(name, [])
    try:
        with open("/proc/net/if_inet6") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6:
                    addr = str(ipaddress.ip_address(bytes.fromhex(parts[0])))
                    out.setdefault(parts[5], []).append(addr)
    except OSError:
        pass
    return out


def net_devices_for(host: str | None) -> str | None:
    """UCX_NET_DEVICES for a worker whose data path binds ``host``: the device(s) holding that address.

    None (every device) for a wildcard, or when no device holds the address (logged)."""
    if host is None or is_wildcard(host):
        return None
    try:
        ip = ipaddress.ip_address(resolve(host))
    except ValueError as e:
        logger.warning("%s; UCX may use every network device", e)
        return None
    devices = interface_addresses()
    names = [name for name, addrs in devices.items() if str(ip) in addrs]
    if not names and ip.is_loopback:
        names = [name for name, addrs in devices.items() if any(ipaddress.ip_address(a).is_loopback for a in addrs)]
    if not names:
        logger.warning("no network device of this host holds %s (%s); UCX may use every network device", host, ip)
        return None
    return ",".join(sorted(set(names)))


def outward_address() -> str:
    """This host's address as other hosts see it: the source address of the default route, else the
    hostname's address, else any non-loopback device address; 127.0.0.1 only when there is none."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.254.254.254", 1))  # no packet is sent: this only picks the route's source address
            addr = s.getsockname()[0]
            if addr and not ipaddress.ip_address(addr).is_loopback and addr != "0.0.0.0":
                return str(addr)
        except OSError:
            pass
    try:
        addr = socket.gethostbyname(socket.gethostname())
        if not ipaddress.ip_address(addr).is_loopback:
            return addr
    except (OSError, ValueError):
        pass
    for addrs in interface_addresses().values():
        for a in addrs:
            ip = ipaddress.ip_address(a)
            if ip.version == 4 and not ip.is_loopback and not ip.is_link_local:
                return a
    return "127.0.0.1"


def advertised_host(host: str | None) -> str:
    """The address a peer should use to reach a socket bound to ``host``: ``host`` itself unless it is a wildcard."""
    if host is None or is_wildcard(host):
        return outward_address()
    return host.strip()
