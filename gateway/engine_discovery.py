"""Where the engine replicas are: a static list of addresses, or a DNS name whose A/AAAA
records are the replicas (a Kubernetes headless Service), resolved again periodically.

A source is an async function returning the engine addresses (``tcp://10.0.3.7:7700``)
as they are now; :class:`gateway.routed_client.RoutedEngineClient` calls it every
``engine_dns_refresh_s`` and connects to what came, leaves what went.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable

from loraplex.gateway.settings import GatewaySettings

Resolve = Callable[[str], list[str]]  # host name -> its IP addresses
Source = Callable[[], Awaitable[list[str]]]


def parse_urls(text: str) -> list[str]:
    """``tcp://a:7700, tcp://b:7700`` -> the addresses, in order, without repeats."""
    seen: dict[str, None] = {}
    for part in text.split(","):
        if part.strip():
            seen[part.strip()] = None
    return list(seen)


def system_resolve(host: str) -> list[str]:
    """The host's addresses from the system resolver (each once, sorted)."""
    infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


def split_host_port(name: str) -> tuple[str, int]:
    """``engine.ns.svc:7700`` (or ``tcp://engine.ns.svc:7700``) -> (host, port)."""
    rest = name.removeprefix("tcp://")
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"{name!r} is not host:port")
    return host, int(port)


def tcp_url(ip: str, port: int) -> str:
    return f"tcp://[{ip}]:{port}" if ipaddress.ip_address(ip).version == 6 else f"tcp://{ip}:{port}"


def static_source(urls: list[str]) -> Source:
    async def source() -> list[str]:
        return list(urls)

    return source


def dns_source(name: str, resolve: Resolve = system_resolve) -> Source:
    """The replicas behind ``host:port``: one address per IP the name resolves to. A failed
    lookup raises (the caller keeps the replicas it has)."""
    host, port = split_host_port(name)

    async def source() -> list[str]:
        ips = await asyncio.to_thread(resolve, host)
        return [tcp_url(ip, port) for ip in ips]

    return source


def engine_source(settings: GatewaySettings) -> Source | None:
    """The replica source the settings name: LORAPLEX_ENGINE_DNS, else LORAPLEX_ENGINE_URLS
    (plus LORAPLEX_ENGINE_URL); None when they name at most one engine (the gateway then
    talks to it directly, as before)."""
    if settings.engine_dns:
        return dns_source(settings.engine_dns)
    urls = parse_urls(",".join(u for u in (settings.engine_url, settings.engine_urls) if u))
    return static_source(urls) if len(urls) > 1 else None
