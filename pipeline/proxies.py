"""Which proxy a download goes through (``download.proxy``), decided once per Session.

    "env"          HTTP_PROXY / HTTPS_PROXY (or their lower-case forms), and NO_PROXY
    "http://h:p"   that proxy, for http and https URLs alike
    "" or "none"   no proxy, whatever the environment says

Sessions run with ``trust_env = False`` (requests would otherwise read the environment, and
netrc, on every request), so the environment is read here, once, and NO_PROXY is matched by the
adapter against each request's host: ``*``, host names (``example.com`` also matches its
subdomains; a leading ``.`` is the same), IP addresses and CIDR networks; a ``:port`` is ignored.
Loopback hosts (``localhost``, 127.0.0.0/8, ::1) always go direct.
"""

from __future__ import annotations

import ipaddress
import urllib.request
from dataclasses import dataclass

from .config import PROXY_OFF


@dataclass(frozen=True, slots=True)
class Proxies:
    """The proxies for ``Session.proxies``, and the hosts that bypass them."""

    proxies: dict[str, str]
    no_proxy: tuple[str, ...] = ()

    @classmethod
    def resolve(cls, setting: str) -> Proxies:
        if setting in PROXY_OFF:
            return cls({})
        if setting != "env":
            return cls({"http": setting, "https": setting})
        env = urllib.request.getproxies_environment()  # lower-cased scheme keys; "no": NO_PROXY
        proxies = {scheme: env[scheme] for scheme in ("http", "https") if env.get(scheme)}
        entries = env.get("no", "").replace(" ", ",").split(",")
        return cls(proxies, tuple(_entry(item) for item in entries if item.strip()))

    def bypass(self, host: str) -> bool:
        """True if requests to ``host`` go direct: NO_PROXY names it, or it is loopback."""
        host = host.strip("[]").lower()
        try:
            ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
        except ValueError:
            ip = None
        if host == "localhost" or (ip is not None and ip.is_loopback):
            return True  # (as Go's http.ProxyFromEnvironment: a proxy would reach its own)
        for entry in self.no_proxy:
            if entry == "*" or host == entry or host.endswith("." + entry):
                return True
            if ip is not None and _in_network(ip, entry):
                return True
        return False


def _entry(item: str) -> str:
    item = item.strip().lower().lstrip(".")
    if item.startswith("["):  # [::1]:8080
        return item[1:].partition("]")[0]
    host, colon, port = item.rpartition(":")
    return host if colon and port.isdigit() and ":" not in host else item


def _in_network(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, entry: str) -> bool:
    try:
        return ip in ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return False
