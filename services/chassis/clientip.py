"""The caller's address behind proxies: one implementation for every service.

X-Forwarded-For is believed only as far as it was written by proxies we trust: walk the list from
the right (the entry our direct peer appended) and take the first address that is not a trusted
proxy (MDN's "right-most untrusted" rule, Envoy's xff_num_trusted_hops). The left part of the
header is whatever the client sent and is never used. With no trusted proxies (the default) the
header is ignored and the TCP peer is the caller.
"""
from __future__ import annotations

import ipaddress
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(value: str | Iterable[str] | None) -> list[Network]:
    """CIDRs (or single addresses) from a comma-separated setting; invalid entries fail at start."""
    items = value.split(",") if isinstance(value, str) else list(value or [])
    return [ipaddress.ip_network(c.strip(), strict=False) for c in items if c and c.strip()]


def _ip(value: str):
    value = value.strip()
    if value.startswith("[") and "]" in value:  # "[2001:db8::1]:443"
        value = value[1:value.index("]")]
    elif value.count(":") == 1:  # "192.0.2.1:1234"
        value = value.split(":", 1)[0]
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        return None


def _trusted(addr, trusted: list[Network]) -> bool:
    return any(addr.version == n.version and addr in n for n in trusted)


def client_address(peer: str | None, forwarded_for: str | None, trusted: list[Network]) -> str | None:
    """The right-most address not in `trusted`, reading the TCP peer first, then X-Forwarded-For
    from right to left. A malformed entry stops the walk: the last trusted hop's view is used."""
    peer_ip = _ip(peer) if peer else None
    if peer_ip is None or not trusted or not _trusted(peer_ip, trusted) or not forwarded_for:
        return str(peer_ip) if peer_ip is not None else peer
    current = peer_ip
    for entry in reversed(forwarded_for.split(",")):
        addr = _ip(entry)
        if addr is None:
            break
        current = addr
        if not _trusted(addr, trusted):
            break
    return str(current)
