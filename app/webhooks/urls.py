"""Which webhook URLs may be called: the guard against SSRF through a tenant's `webhook_url`.

`check(url)` parses with httpx (the parser that sends), resolves the host and refuses it unless every
address is globally routable or on the operator's `webhook_allowed_hosts`. It runs at job creation
and again before every delivery attempt, which connects to the checked address itself (`Target`),
so a DNS answer that changes after the check (rebinding) can't move the request inside."""

from __future__ import annotations

import ipaddress
import socket
import unicodedata
from dataclasses import dataclass

import httpx

from app.settings import Settings, get_settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_PORTS = {"http": 80, "https": 443}
NAT64 = ipaddress.ip_network("64:ff9b::/96")
CGNAT = ipaddress.ip_network("100.64.0.0/10")


class UnsafeWebhookUrl(Exception):
    """A refused URL. `public` is what a tenant may read; `detail` (str()) names addresses, for logs.
    `transient`: the name did not resolve, which may pass (a delivery retries it)."""

    def __init__(self, public: str, detail: str | None = None, *, transient: bool = False) -> None:
        super().__init__(detail or public)
        self.public = public
        self.transient = transient


@dataclass(frozen=True)
class Target:
    """A checked URL and the address its request must go to."""

    url: httpx.URL
    host: str  # ASCII (IDNA) name or IP literal, as in the URL
    address: IPAddress

    @property
    def is_ip_literal(self) -> bool:
        return _ip(self.host) is not None

    @property
    def pinned_url(self) -> httpx.URL:
        return self.url.copy_with(host=str(self.address))

    @property
    def host_header(self) -> str:
        return self.url.netloc.decode("ascii")

    @property
    def extensions(self) -> dict[str, str]:
        """TLS verifies the certificate against the name, not the pinned address."""
        return {"sni_hostname": self.host} if self.url.scheme == "https" and not self.is_ip_literal else {}


# --- syntax -------------------------------------------------------------------------------------

def _bad_character(url: str) -> bool:
    """Whitespace, CR/LF, NUL and other control or format characters; backslashes, which other
    parsers read as '/' and so as a different host."""
    return any(ch.isspace() or ch == "\\" or unicodedata.category(ch)[0] == "C" for ch in url)


def parse(url: str, settings: Settings) -> httpx.URL:
    if _bad_character(url):
        raise UnsafeWebhookUrl("webhook_url must not contain whitespace, control characters or backslashes.")
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        raise UnsafeWebhookUrl("webhook_url is not a valid URL.") from None
    schemes = ("https", "http") if settings.webhook_allow_http else ("https",)
    if parsed.scheme not in schemes:
        raise UnsafeWebhookUrl("webhook_url must use https." if "http" not in schemes
                               else "webhook_url must use https or http.")
    if parsed.userinfo:
        raise UnsafeWebhookUrl("webhook_url must not contain credentials (user:password@).")
    if not parsed.raw_host:
        raise UnsafeWebhookUrl("webhook_url has no host.")
    if parsed.port is not None and not 1 <= parsed.port <= 65535:
        raise UnsafeWebhookUrl("webhook_url has an invalid port.")
    return parsed


# --- addresses ----------------------------------------------------------------------------------

def resolve(host: str, port: int) -> list[str]:
    """The host's addresses (the one DNS call; tests replace it)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _ip(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses a v6 address carries, which translating networks may deliver to."""
    out = [a for a in (ip.ipv4_mapped, ip.sixtofour) if a is not None]
    if ip.teredo:
        out.extend(ip.teredo)
    if ip in NAT64:
        out.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return out


def is_public(ip: IPAddress) -> bool:
    """Globally routable unicast. Each flag is checked on its own: `is_global` alone misses
    multicast and, in some Python versions, site-local and IPv4-compatible v6 ranges."""
    if (not ip.is_global or ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
            or ip.is_reserved or ip.is_unspecified or ip in CGNAT):
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        return not ip.is_site_local and all(is_public(v4) for v4 in _embedded_ipv4(ip))
    return True


def _allowlist(entries: list[str]) -> tuple[set[str], list[IPNetwork]]:
    names: set[str] = set()
    networks: list[IPNetwork] = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            names.add(_name(entry))
    return names, networks


def _name(host: str) -> str:
    return host.strip().lower().rstrip(".")


def _addresses(parsed: httpx.URL) -> list[IPAddress]:
    host = parsed.raw_host.decode("ascii")
    if (literal := _ip(host)) is not None:
        return [literal]
    if _name(host) == "localhost" or _name(host).endswith(".localhost"):  # RFC 6761: always loopback
        return [ipaddress.ip_address("127.0.0.1")]
    try:
        found = resolve(host, parsed.port or DEFAULT_PORTS[parsed.scheme])
    except (OSError, UnicodeError) as exc:
        raise UnsafeWebhookUrl("webhook_url's host does not resolve.", f"{host}: {exc}", transient=True) from None
    addresses = [ip for a in found if (ip := _ip(a)) is not None]
    if not addresses:
        raise UnsafeWebhookUrl("webhook_url's host does not resolve.", f"{host}: no address", transient=True)
    return addresses


def check(url: str, settings: Settings | None = None) -> Target:
    """The URL, parsed, with the address to connect to; `UnsafeWebhookUrl` when it may not be called."""
    settings = settings or get_settings()
    parsed = parse(url, settings)
    host = parsed.raw_host.decode("ascii")
    addresses = _addresses(parsed)
    names, networks = _allowlist(settings.webhook_allowed_hosts)
    if _name(host) not in names:
        refused = [a for a in addresses if not is_public(a) and not any(a in n for n in networks)]
        if refused:
            raise UnsafeWebhookUrl("webhook_url resolves to a non-public address.",
                                   f"{host} resolves to non-public {', '.join(map(str, refused))}")
    return Target(parsed, host, addresses[0])
