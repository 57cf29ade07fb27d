"""Tests for koclip.fetch against a local HTTP(S) server; nothing touches the internet."""

import http.server
import io
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
from PIL import Image

from koclip.errors import FetchError, ImageError
from koclip.fetch import ALLOW_PRIVATE_ENV, fetch_image, fetch_url


def png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


PNG = png_bytes()


class Handler(http.server.BaseHTTPRequestHandler):
    """Routes: /image.png, /chain/N (N redirects, then the image), /to?url=U,
    /big?n=N[&length=0], /chunked?n=N, /short, /slow-body, /slow-headers, /trickle-headers,
    /text, /host, /404."""

    requests: list = []
    completed: set = set()  # slow routes that sent their whole answer (a client that waited it out)

    def log_message(self, *args):  # keep test output clean
        pass

    def send_body(self, body: bytes, ctype="application/octet-stream", length=True):
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def redirect(self, location: str):
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self):  # noqa: C901 - a flat router is the clearest here
        Handler.requests.append(self.path)
        parts = urlsplit(self.path)
        q = {k: v[0] for k, v in parse_qs(parts.query).items()}
        path = parts.path
        try:
            if path == "/image.png":
                self.send_body(PNG, "image/png")
            elif path.startswith("/chain/"):
                n = int(path.rsplit("/", 1)[1])
                self.redirect(f"/chain/{n - 1}") if n > 0 else self.send_body(PNG, "image/png")
            elif path == "/to":
                self.redirect(q["url"])
            elif path == "/big":
                self.send_body(b"x" * int(q["n"]), length=q.get("length") != "0")
            elif path == "/chunked":
                self.protocol_version = "HTTP/1.1"
                self.send_response(200)
                self.send_header("Transfer-Encoding", "chunked")
                self.send_header("Connection", "close")
                self.end_headers()
                for _ in range(int(q["n"]) // 1000):
                    self.wfile.write(b"3e8\r\n" + b"y" * 1000 + b"\r\n")
                self.wfile.write(b"0\r\n\r\n")
            elif path == "/short":
                self.send_response(200)
                self.send_header("Content-Length", "1000")
                self.end_headers()
                self.wfile.write(b"z" * 10)
            elif path == "/slow-body":
                self.send_response(200)
                self.end_headers()
                for _ in range(100):  # one byte every 0.1 s: each read is quick, the total is not
                    self.wfile.write(b"s")
                    self.wfile.flush()
                    time.sleep(0.1)
                Handler.completed.add(path)
            elif path == "/slow-headers":
                time.sleep(3)
                self.send_body(PNG, "image/png")
                Handler.completed.add(path)
            elif path == "/trickle-headers":
                self.send_response(200)
                self.flush_headers()
                for i in range(30):  # a header line every 0.1 s: no single read is slow
                    self.wfile.write(f"X-Pad-{i}: x\r\n".encode())
                    self.wfile.flush()
                    time.sleep(0.1)
                self.end_headers()
                Handler.completed.add(path)
            elif path == "/text":
                self.send_body(b"<html><body>not a picture</body></html>", "text/html")
            elif path == "/host":
                self.send_body(self.headers["Host"].encode(), "text/plain")
            else:
                self.send_error(404)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up first, as several tests intend


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass


def start(server):
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server


@pytest.fixture(scope="module")
def base():
    server = start(Server(("127.0.0.1", 0), Handler))
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def get(url, **kw):
    return fetch_url(url, allow_private=True, **kw)


# ------------------------------------------------------------- local server

def test_fetches_an_image_body(base):
    assert get(f"{base}/image.png") == PNG


def test_fetch_image_decodes_to_rgb(base):
    im = fetch_image(f"{base}/image.png", allow_private=True)
    assert im.mode == "RGB" and im.size == (8, 6)
    assert tuple(np.asarray(im)[0, 0]) == (10, 200, 30)


def test_fetch_image_of_a_web_page_is_an_image_error(base):
    with pytest.raises(ImageError, match="HTML"):
        fetch_image(f"{base}/text", allow_private=True)


def test_loopback_is_refused_without_allow_private_and_nothing_is_sent(base):
    Handler.requests.clear()
    expected = r"refused http://127\.0\.0\.1:\d+/image\.png: 127\.0\.0\.1 is a loopback address"
    with pytest.raises(FetchError, match=expected):
        fetch_url(f"{base}/image.png")
    assert Handler.requests == []


def test_env_var_allows_private_for_tests(base, monkeypatch):
    monkeypatch.setenv(ALLOW_PRIVATE_ENV, "1")
    assert fetch_url(f"{base}/image.png") == PNG


def test_three_redirects_are_followed(base):
    assert get(f"{base}/chain/3") == PNG


def test_four_redirects_are_refused(base):
    with pytest.raises(FetchError, match="more than 3 redirects"):
        get(f"{base}/chain/4")


def test_relative_and_absolute_redirects_both_work(base):
    assert get(f"{base}/to?url=/image.png") == PNG
    assert get(f"{base}/to?url={base}/image.png") == PNG


def test_redirect_to_metadata_address_is_refused_even_with_allow_private(base):
    with pytest.raises(FetchError, match="169.254.169.254 is the cloud metadata service address"):
        get(f"{base}/to?url=http://169.254.169.254/latest/meta-data/")


def test_redirect_to_file_url_is_refused(base):
    with pytest.raises(FetchError, match="only http:// and https://"):
        get(f"{base}/to?url=file:///etc/passwd")


def test_body_over_limit_with_content_length_is_refused_before_reading(base):
    with pytest.raises(FetchError, match=r"body is 5,000 bytes, over the limit of 4,000"):
        get(f"{base}/big?n=5000", max_bytes=4000)


def test_body_over_limit_without_content_length_is_cut_while_streaming(base):
    with pytest.raises(FetchError, match=r"over the limit of 4,000 bytes"):
        get(f"{base}/big?n=50000&length=0", max_bytes=4000)


def test_chunked_body_over_limit_is_cut_while_streaming(base):
    with pytest.raises(FetchError, match=r"over the limit of 4,000 bytes"):
        get(f"{base}/chunked?n=50000", max_bytes=4000)


def test_chunked_body_under_limit_is_read_whole(base):
    assert get(f"{base}/chunked?n=3000") == b"y" * 3000


def test_body_at_exactly_the_limit_is_accepted(base):
    assert len(get(f"{base}/big?n=4000&length=0", max_bytes=4000)) == 4000


def test_body_shorter_than_content_length_is_an_error(base):
    with pytest.raises(FetchError, match="closed after 10 of 1,000 bytes"):
        get(f"{base}/short")


# The timeouts are checked by what happened first, not by a stopwatch: the client must give up
# while the server is still sending (10 s of body, 3 s of headers), not once it has finished.

def test_slow_body_hits_total_timeout(base):
    Handler.completed.discard("/slow-body")
    with pytest.raises(FetchError, match="timed out after 0.5 s"):
        get(f"{base}/slow-body", timeout=0.5)
    assert "/slow-body" not in Handler.completed


def test_slow_headers_hit_total_timeout(base):
    Handler.completed.discard("/slow-headers")
    with pytest.raises(FetchError, match="timed out"):
        get(f"{base}/slow-headers", timeout=0.5)
    assert "/slow-headers" not in Handler.completed


def test_trickled_headers_hit_total_timeout(base):
    Handler.completed.discard("/trickle-headers")
    with pytest.raises(FetchError, match="timed out after 0.5 s"):
        get(f"{base}/trickle-headers", timeout=0.5)
    assert "/trickle-headers" not in Handler.completed


def test_http_error_status_is_reported(base):
    with pytest.raises(FetchError, match="answered 404"):
        get(f"{base}/missing")


def test_connection_refused_is_a_fetch_error():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))  # a port that nothing listens on
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(FetchError, match="refused the connection"):
        get(f"http://127.0.0.1:{port}/")


def test_connects_to_the_vetted_address_and_sends_the_url_host(base):
    # "images.test" is unknown to the system resolver: the fetch can only work
    # by connecting to the address our resolver vetted, and the server still
    # sees the URL's host name.
    port = int(base.rsplit(":", 1)[1])
    answers = iter([["127.0.0.1"], ["169.254.169.254"]])  # a rebinding resolver
    calls = []

    def resolver(host, p):
        calls.append((host, p))
        return next(answers)

    assert get(f"http://images.test:{port}/host", resolver=resolver) == f"images.test:{port}".encode()
    assert calls == [("images.test", port)]  # resolved once: no second lookup to rebind


def test_resolver_is_consulted_again_for_each_redirect_hop(base):
    port = int(base.rsplit(":", 1)[1])
    calls = []

    def resolver(host, p):
        calls.append(host)
        return ["127.0.0.1"]

    get(f"http://a.test:{port}/to?url=http://b.test:{port}/image.png", resolver=resolver)
    assert calls == ["a.test", "b.test"]


# ------------------------------------------------------------- refused addresses (no connection made)

REFUSED = {
    "10.0.0.1": "private (RFC 1918)",
    "192.168.1.1": "private (RFC 1918)",
    "172.16.0.1": "private (RFC 1918)",
    "169.254.169.254": "cloud metadata",
    "::1": "loopback",
    "fe80::1": "link-local",
    "fc00::1": "unique local",
    "224.0.0.1": "multicast",
    "0.0.0.0": "unspecified",
    "::ffff:127.0.0.1": "IPv4-mapped address for 127.0.0.1, which is a loopback",
    "100.64.0.1": "carrier-grade NAT",
    "127.0.0.1": "loopback",
    "255.255.255.255": "reserved",
    "64:ff9b::a00:1": "NAT64 address for 10.0.0.1",
    "2002:a9fe:a9fe::1": "6to4 address for 169.254.169.254",
}


def never_connect(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("tried to connect to a refused address")
    monkeypatch.setattr(socket, "create_connection", fail)


@pytest.mark.parametrize("address", sorted(REFUSED))
def test_resolved_address_class_is_refused(address, monkeypatch):
    never_connect(monkeypatch)
    with pytest.raises(FetchError, match=rf"refused http://evil\.example/a\.png: evil\.example resolves to "
                                         rf"\S+, which is (a|an|the) .*{re.escape(REFUSED[address])}"):
        fetch_url("http://evil.example/a.png", resolver=lambda h, p: [address])


@pytest.mark.parametrize("address", ["10.0.0.1", "[::1]", "[::ffff:127.0.0.1]", "[fe80::1]", "0.0.0.0"])
def test_ip_literal_url_is_refused_without_lookup(address, monkeypatch):
    never_connect(monkeypatch)

    def no_lookup(h, p):
        raise AssertionError("an IP literal needs no lookup")
    with pytest.raises(FetchError, match="refused"):
        fetch_url(f"http://{address}/x", resolver=no_lookup)


def test_one_private_address_among_public_ones_refuses_the_host(monkeypatch):
    never_connect(monkeypatch)
    with pytest.raises(FetchError, match="10.0.0.1"):
        fetch_url("http://mixed.example/", resolver=lambda h, p: ["93.184.216.34", "10.0.0.1"])


def test_decimal_ip_spelling_of_loopback_is_refused(monkeypatch):
    never_connect(monkeypatch)
    with pytest.raises(FetchError, match="resolves to 127.0.0.1, which is a loopback"):
        fetch_url("http://2130706433/", resolver=lambda h, p: ["127.0.0.1"])


@pytest.mark.parametrize("host", ["metadata.google.internal", "metadata.google.internal.", "localhost", "a.localhost"])
def test_metadata_and_localhost_names_are_refused_before_lookup(host, monkeypatch):
    never_connect(monkeypatch)

    def no_lookup(h, p):
        raise AssertionError("refused names are not looked up")
    with pytest.raises(FetchError, match="metadata host name|loopback host name"):
        fetch_url(f"http://{host}/computeMetadata/v1/", resolver=no_lookup)


@pytest.mark.parametrize("url,match", [
    ("ftp://example.com/a.png", "got 'ftp'"),
    ("file:///etc/passwd", "got 'file'"),
    ("gopher://example.com/", "got 'gopher'"),
    ("example.com/a.png", "got no scheme"),
    ("http://user:pw@example.com/", "user name or password"),
    ("http:///nohost", "no host name"),
    ("http://example.com:99999/", "not a valid URL"),
    ("http://exa mple.com/", "spaces or control characters"),
])
def test_malformed_or_non_http_urls_are_refused(url, match, monkeypatch):
    never_connect(monkeypatch)
    with pytest.raises(FetchError, match=match):
        fetch_url(url, resolver=lambda h, p: ["93.184.216.34"])


def test_unresolvable_host_is_a_fetch_error():
    def nxdomain(h, p):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    with pytest.raises(FetchError, match="cannot resolve host 'nowhere.example'"):
        fetch_url("http://nowhere.example/", resolver=nxdomain)


def test_slow_resolver_counts_against_the_timeout():
    answered = threading.Event()

    def slow(host, port):
        time.sleep(2)
        answered.set()
        return ["93.184.216.34"]

    with pytest.raises(FetchError, match="timed out resolving"):
        fetch_url("http://slow.example/", timeout=0.3, resolver=slow)
    assert not answered.is_set()  # it gave up while the resolver was still busy, not once it answered


# ------------------------------------------------------------- https

@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    """An HTTPS server on 127.0.0.1 with a self-signed certificate for images.test."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl command not available to make a test certificate")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem"), "-days", "2",
         "-subj", "/CN=images.test", "-addext", "subjectAltName=DNS:images.test"],
        check=True, capture_output=True)
    server = Server(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(d / "cert.pem", d / "key.pem")
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    start(server)
    yield server.server_address[1], str(d / "cert.pem")
    server.shutdown()
    server.server_close()


def test_https_uses_url_host_for_sni_and_certificate(tls):
    port, cert = tls
    trust = ssl.create_default_context(cafile=cert)
    body = get(f"https://images.test:{port}/host", resolver=lambda h, p: ["127.0.0.1"], ssl_context=trust)
    assert body == f"images.test:{port}".encode()


def test_https_certificate_for_another_host_is_refused(tls):
    port, cert = tls
    trust = ssl.create_default_context(cafile=cert)
    with pytest.raises(FetchError, match="TLS certificate of other.test is not valid"):
        get(f"https://other.test:{port}/image.png", resolver=lambda h, p: ["127.0.0.1"], ssl_context=trust)


def test_https_untrusted_certificate_is_refused_by_default(tls):
    port, _ = tls
    with pytest.raises(FetchError, match="TLS certificate of images.test is not valid"):
        get(f"https://images.test:{port}/image.png", resolver=lambda h, p: ["127.0.0.1"])
