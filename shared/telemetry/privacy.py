"""What of a caller's identity may leave the gateway in telemetry: client addresses and user ids, reduced by default.

A full client address and a free-text user id (often an e-mail address) are personal data. By default the address is
truncated to its network (/24 for IPv4, /48 for IPv6, as Application Insights' own IP masking does for geolocation)
and the user id is validated and capped; `raw` values are sent only when a setting asks for them, and user ids can be
replaced by a keyed hash, so per-user charts keep working without names.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
from dataclasses import dataclass, field
from functools import lru_cache

from shared.config import IpMode, Settings, UserIdMode

USER_ID_MAX = 64
INVALID = "(invalid)"
_USER_ID_RE = re.compile(rf"[A-Za-z0-9._@+:/=-]{{1,{USER_ID_MAX}}}")


@lru_cache(maxsize=4096)
def truncate_ip(address: str) -> str:
    """10.1.2.3 -> 10.1.2.0; 2001:db8:1:2::5 -> 2001:db8:1::; anything unreadable -> "" (never echoed)."""
    try:
        ip = ipaddress.ip_address(address.strip())
    except ValueError:
        return ""
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    prefix = 24 if ip.version == 4 else 48
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False).network_address)


def capped_user_id(value: str) -> str:
    """The header as sent when it is a plain identifier of at most 64 characters; otherwise a fixed marker, so a
    client cannot smuggle arbitrary text (or a different series per request) into the telemetry."""
    if not value:
        return ""
    return value if _USER_ID_RE.fullmatch(value) else INVALID


@dataclass(frozen=True)
class Privacy:
    ip_mode: IpMode = Settings.client_ip_mode
    user_id_mode: UserIdMode = Settings.user_id_mode
    user_id_key: bytes = field(default=b"", repr=False)

    def client_ip(self, address: str) -> str:
        if self.ip_mode == "raw":
            return address
        if self.ip_mode == "omit":
            return ""
        return truncate_ip(address)

    def user_id(self, value: str) -> str:
        mode = self.user_id_mode
        if mode == "omit" or not value:
            return ""
        if mode == "raw":
            return value[:256]
        if mode == "hashed":
            return hmac.new(self.user_id_key, value.encode("utf-8", "replace"), hashlib.sha256).hexdigest()[:16]
        return capped_user_id(value)
