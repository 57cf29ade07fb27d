"""Fetching an image URL on the server without opening a hole into its network.

A URL typed into the demo is fetched by the server, so a careless fetch lets
anyone read the server's own network (SSRF): http://127.0.0.1/admin, the cloud
metadata service at 169.254.169.254, hosts on 10.x, ...  `fetch_url`:

- allows http and https only, with no credentials in the URL;
- resolves the host once and refuses it if ANY address is loopback, private
  (RFC 1918, fc00::/7), link-local (169.254/16 with the metadata address,
  fe80::/10), carrier-grade NAT (100.64/10), multicast, unspecified,
  reserved or otherwise not public, including IPv4 addresses hidden in IPv6
  (::ffff:a.b.c.d, 6to4, Teredo, NAT64); cloud metadata host names are
  refused by name too;
- connects to the vetted address itself, so a DNS answer that changes
  between the check and the connect (DNS rebinding) is never used, while the
  Host header, TLS SNI and certificate check use the URL's host name;
- follows at most `max_redirects` redirects, vetting each hop the same way;
- stops at `max_bytes` (declared Content-Length or counted while streaming)
  and at `timeout` seconds for the whole fetch, DNS and redirects included.

Every refusal or failure raises `FetchError` with a message naming the URL and
the reason.  `allow_private=True`, or the environment variable
KOCLIP_ALLOW_PRIVATE_URLS=1, lets loopback, private, link-local and CGNAT
addresses through (metadata, multicast, unspecified and reserved ones stay
refused): it exists for tests that serve files from 127.0.0.1 and must never
be set on a public server.
"""

from __future__ import annotations

import http.client
import ipaddress
import os
import socket
import ssl
import threading
import time
from typing import Callable, NamedTuple, Sequence
from urllib.parse import quote, urljoin, urlsplit

from PIL import Image

from koclip.errors import FetchError
from koclip.images import open_image

ALLOW_PRIVATE_ENV = "KOCLIP_ALLOW_PRIVATE_URLS"  # "1": tests only, see module docstring

Resolver = Callable[[str, int], Sequence[str]]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Names that reach a cloud provider's instance metadata service from inside
# the instance (GCP, AWS).  They resolve to link-local addresses anyway; naming
# them gives a clearer refusal and does not depend on the resolver.
_METADATA_HOSTS = frozenset({
    "metadata", "metadata.google.internal", "metadata.goog",
    "instance-data", "instance-data.ec2.internal",
})
_METADATA_IPS = frozenset({ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")})
_RFC1918 = tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"))
_ULA = ipaddress.ip_network("fc00::/7")
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")  # Linux connects 0.x.x.x to the local host
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_REDIRECTS = (301, 302, 303, 307, 308)
_CHUNK = 64 * 1024


class _Target(NamedTuple):
    url: str
    scheme: str
    host: str          # ASCII (IDNA) host name or IP literal, no brackets
    port: int
    path: str          # path + query, percent-encoded ASCII
    host_header: str


def _reason(ip: IPAddress) -> tuple[str, bool] | None:
    """Why connecting to `ip` is refused, or None if it is a public address.

    Returns (reason, waivable): reason completes "<ip> is ..."; waivable says
    whether allow_private lifts the refusal (loopback, private, link-local,
    CGNAT).  The metadata address, multicast, unspecified and reserved ranges
    stay refused even then: no test needs them and nothing good lives there.
    """
    if ip.version == 6:
        # An IPv4 address inside IPv6 reaches that IPv4 address: judge that.
        in_nat64 = any(ip in n for n in _NAT64)
        embedded = (("an IPv4-mapped address for", ip.ipv4_mapped) if ip.ipv4_mapped
                    else ("a NAT64 address for", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)) if in_nat64
                    else ("a 6to4 address for", ip.sixtofour) if ip.sixtofour
                    else ("a Teredo address for", ip.teredo[1]) if ip.teredo
                    else None)
        if embedded:
            kind, v4 = embedded
            inner = _reason(v4)
            return (f"{kind} {v4}, which is {inner[0]}", inner[1]) if inner else None
    if ip in _METADATA_IPS:
        return "the cloud metadata service address", False
    if ip.is_unspecified or (ip.version == 4 and ip in _THIS_NETWORK):
        return "an unspecified ('this host') address", False
    if ip.is_loopback:
        return "a loopback address", True
    if ip.is_link_local:
        return "a link-local address", True
    if ip.version == 4 and ip in _CGNAT:
        return "a carrier-grade NAT (RFC 6598 shared) address", True
    if ip.is_multicast:
        return "a multicast address", False
    if ip.version == 4 and any(ip in n for n in _RFC1918):
        return "a private (RFC 1918) address", True
    if ip.version == 6 and ip in _ULA:
        return "a private (unique local, fc00::/7) address", True
    if ip.version == 6 and ip.is_site_local:
        return "a private (site-local) address", True
    if ip.is_reserved:
        return "a reserved address", False
    if not ip.is_global:
        return "a special-purpose address that is not publicly routable", False
    return None


def _parse(url: str) -> _Target:
    """Check the URL's form and split it; raises FetchError for anything but plain http(s)."""
    if not isinstance(url, str):
        raise FetchError(f"a URL must be a string, got {type(url).__name__}")
    shown = url if len(url) <= 200 else url[:200] + "..."
    if any(ord(ch) <= 32 or ord(ch) == 127 for ch in url):
        raise FetchError(f"refused {shown!r}: URLs may not contain spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise FetchError(f"refused {shown}: not a valid URL ({e})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        got = f"'{scheme}'" if scheme else "no scheme"
        raise FetchError(f"refused {shown}: only http:// and https:// URLs can be fetched, got {got}")
    if parts.username is not None or parts.password is not None:
        raise FetchError(f"refused {shown}: URLs with a user name or password are not fetched")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise FetchError(f"refused {shown}: the URL has no host name")
    try:
        host = host.encode("idna").decode("ascii") if not host.isascii() else host
    except UnicodeError:
        raise FetchError(f"refused {shown}: {parts.hostname!r} is not a valid host name") from None
    port = port or (443 if scheme == "https" else 80)
    path = quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~")
    if parts.query:
        path += "?" + quote(parts.query, safe="/%:@!$&'()*+,;=-._~?")
    is_v6 = ":" in host
    header = f"[{host}]" if is_v6 else host
    if port != (443 if scheme == "https" else 80):
        header += f":{port}"
    return _Target(shown, scheme, host, port, path, header)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _system_resolver(host: str, port: int) -> list[str]:
    """All addresses of `host`, via the operating system's resolver."""
    return [info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


def _resolve(t: _Target, resolver: Resolver, deadline: float) -> list[str]:
    """Resolve t.host within the deadline (getaddrinfo itself has no timeout)."""
    try:
        return [str(ipaddress.ip_address(t.host))]  # an IP literal needs no lookup
    except ValueError:
        pass
    box: dict = {}

    def work():
        try:
            box["ips"] = list(resolver(t.host, t.port))
        except Exception as e:  # noqa: BLE001 - handed to the caller below
            box["error"] = e

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    worker.join(max(deadline - time.monotonic(), 0.0))
    if worker.is_alive():
        raise FetchError(f"timed out resolving {t.host} for {t.url}")
    if "error" in box:
        e = box["error"]
        detail = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise FetchError(f"cannot fetch {t.url}: cannot resolve host {t.host!r} ({detail})")
    if not box["ips"]:
        raise FetchError(f"cannot fetch {t.url}: host {t.host!r} has no addresses")
    return box["ips"]


def _vet(t: _Target, resolver: Resolver, deadline: float, allow_private: bool) -> list[str]:
    """Resolve and check t's host; returns the addresses that may be connected to."""
    name = t.host.lower()
    if name in _METADATA_HOSTS:
        raise FetchError(f"refused {t.url}: {t.host} is a cloud metadata host name")
    if not allow_private and (name == "localhost" or name.endswith(".localhost")):
        raise FetchError(f"refused {t.url}: {t.host} is a loopback host name")
    ips = _resolve(t, resolver, deadline)
    for text in ips:
        try:
            ip = ipaddress.ip_address(text.split("%")[0])  # drop an IPv6 zone ("%eth0")
        except ValueError:
            raise FetchError(f"refused {t.url}: resolver gave {text!r}, which is not an IP address") from None
        refusal = _reason(ip)
        if refusal and not (allow_private and refusal[1]):
            # One bad address refuses the host: which one a client would use is not ours to predict.
            subject = t.host if _is_ip(t.host) else f"{t.host} resolves to {ip}, which"
            raise FetchError(f"refused {t.url}: {subject} is {refusal[0]}")
    return ips


def _connect_tcp(t: _Target, ips: Sequence[str], deadline: float) -> socket.socket:
    """Open a TCP connection to the first vetted address that answers."""
    error: OSError | None = None
    for ip in ips:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout("timed out")
        try:
            return socket.create_connection((ip, t.port), timeout=remaining)
        except OSError as e:
            error = e
    raise error or OSError("no address to connect to")


def _get(t: _Target, ips: Sequence[str], deadline: float, max_bytes: int,
         ssl_context: ssl.SSLContext | None) -> tuple[str | None, bytes]:
    """One GET. Returns (redirect location, b"") or (None, body)."""
    sock = _connect_tcp(t, ips, deadline)
    # A duplicate descriptor of the same connection: shutting it down stops
    # reads on `sock` too, even after TLS has taken `sock` over.
    handle = sock.dup()
    timed_out = threading.Event()

    def abort():
        # Socket timeouts bound each recv, not the sum of many slow ones; this
        # cuts the connection at the deadline whatever state the read is in.
        timed_out.set()
        try:
            handle.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    watchdog = threading.Timer(max(deadline - time.monotonic(), 0.0), abort)
    watchdog.daemon = True
    watchdog.start()
    conn = http.client.HTTPConnection(t.host, t.port)
    try:
        if t.scheme == "https":
            context = ssl_context or ssl.create_default_context()
            # server_hostname is the URL's host: SNI and the certificate check
            # use it, whatever vetted address we are connected to.
            sock = context.wrap_socket(sock, server_hostname=t.host)
        conn.sock = sock  # already connected to the vetted address; never re-resolved
        conn.putrequest("GET", t.path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", t.host_header)
        conn.putheader("User-Agent", "koclip-fetch/1")
        conn.putheader("Accept", "image/*, */*;q=0.1")
        conn.putheader("Accept-Encoding", "identity")  # a compressed body could be a bomb
        conn.putheader("Connection", "close")
        conn.endheaders()
        response = conn.getresponse()
        if response.status in _REDIRECTS:
            location = response.getheader("Location")
            if not location:
                raise FetchError(f"cannot fetch {t.url}: redirect {response.status} without a Location")
            return location, b""
        if response.status not in (200, 203):
            raise FetchError(f"cannot fetch {t.url}: the server answered {response.status} {response.reason}")
        declared = (response.getheader("Content-Length") or "").strip()
        # isascii: str.isdigit is also true of "¹" and other digits int() refuses.
        declared_n = int(declared) if declared.isascii() and declared.isdigit() else None
        if declared_n is not None and declared_n > max_bytes:
            raise FetchError(f"refused {t.url}: the body is {declared_n:,} bytes, over the limit of {max_bytes:,}")
        chunks, total = [], 0
        while True:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            chunk = response.read1(_CHUNK)
            if not chunk:
                break
            total += len(chunk)
            if total > max_bytes:
                raise FetchError(f"refused {t.url}: the body is over the limit of {max_bytes:,} bytes")
            chunks.append(chunk)
        if timed_out.is_set():  # the watchdog's shutdown reads as a clean end of body
            raise socket.timeout("timed out")
        if declared_n is not None and total < declared_n:
            raise FetchError(f"cannot fetch {t.url}: the connection closed after {total:,} "
                             f"of {declared_n:,} bytes")
        return None, b"".join(chunks)
    except FetchError:
        raise
    except Exception:
        if timed_out.is_set():
            raise socket.timeout("timed out") from None
        raise
    finally:
        watchdog.cancel()
        conn.close()
        sock.close()
        handle.close()


def fetch_url(url: str, *, max_bytes: int = 20 * 1024 * 1024, timeout: float = 10.0,
              max_redirects: int = 3, allow_private: bool = False,
              resolver: Resolver | None = None, ssl_context: ssl.SSLContext | None = None) -> bytes:
    """GET `url` and return its body, refusing anything that could reach private networks.

    max_bytes: largest body accepted.  timeout: seconds for the whole fetch,
    DNS, connects and redirects included.  max_redirects: redirects followed.
    allow_private: let loopback/private/link-local/CGNAT addresses through
    (tests only; KOCLIP_ALLOW_PRIVATE_URLS=1 does the same).
    resolver: (host, port) -> list of address strings, defaulting to the
    system's getaddrinfo (tests inject one).
    ssl_context: for https, defaulting to the system's trusted CAs with host
    name checking.
    Raises FetchError saying what was refused or what failed.
    """
    if max_bytes < 0 or timeout <= 0 or max_redirects < 0:
        raise ValueError(f"need max_bytes >= 0, timeout > 0 and max_redirects >= 0, got "
                         f"{max_bytes!r}, {timeout!r}, {max_redirects!r}")
    allow_private = allow_private or os.environ.get(ALLOW_PRIVATE_ENV) == "1"
    resolver = resolver or _system_resolver
    deadline = time.monotonic() + timeout
    current, via = url, None
    for _ in range(max_redirects + 1):
        try:
            t = _parse(current)
        except FetchError as e:
            if via is None:
                raise
            raise FetchError(f"{e} (where {via} redirected)") from None
        ips = _vet(t, resolver, deadline, allow_private)
        try:
            location, body = _get(t, ips, deadline, max_bytes, ssl_context)
        except FetchError:
            raise
        except (socket.timeout, TimeoutError):
            raise FetchError(f"cannot fetch {t.url}: timed out after {timeout:g} s") from None
        except ssl.SSLCertVerificationError as e:
            raise FetchError(f"cannot fetch {t.url}: the TLS certificate of {t.host} is not valid "
                             f"({e.verify_message})") from None
        except ssl.SSLError as e:
            raise FetchError(f"cannot fetch {t.url}: TLS with {t.host} failed ({e.reason or e})") from None
        except ConnectionRefusedError:
            raise FetchError(f"cannot fetch {t.url}: {t.host} port {t.port} refused the connection") from None
        except (http.client.HTTPException, OSError) as e:
            raise FetchError(f"cannot fetch {t.url}: {type(e).__name__}: {e}") from None
        if location is None:
            return body
        try:
            current, via = urljoin(current, location), t.url
        except ValueError as e:  # e.g. an unclosed "[" of an IPv6 host
            raise FetchError(f"cannot fetch {t.url}: it redirects to {location[:200]!r}, which is not a "
                             f"valid URL ({e})") from None
    raise FetchError(f"refused {_parse(url).url}: more than {max_redirects} redirects "
                     f"(the last one pointed to {current[:200]})")


def fetch_image(url: str, *, max_pixels: int = 40_000_000, **kwargs) -> Image.Image:
    """fetch_url(url, **kwargs), then `open_image`: an 8-bit RGB PIL image.

    Raises FetchError if the fetch fails, ImageError if the body is not an image.
    """
    return open_image(fetch_url(url, **kwargs), max_pixels=max_pixels, name=url[:200])
