"""Image URL fetching (``serving/images.py``) is immune to DNS rebinding, on loopback only.

The resolver is replaced (``socket.getaddrinfo``, the one httpx would also use) so test names resolve
to loopback addresses: a name resolving to 127.0.0.1 is refused unless it is on the allow-list by its
exact name; an allowed fetch connects to the address that was checked (the Host header carries the
name); a name that answers a public address to the check and a loopback one afterwards is connected at
the checked public address (seen through a mock transport: no traffic leaves the machine), never at
the second answer, and the name is looked up once; HTTPS to the pinned address sends the name as SNI
and verifies the certificate for the name (a real TLS server on 127.0.0.1, a self-signed certificate).
"""

from __future__ import annotations

import http.server
import io
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("PIL")

from berth.server.serving import images  # noqa: E402
from berth.server.serving.errors import ApiError  # noqa: E402
from berth.server.settings import ServerSettings  # noqa: E402

NAME = "img.cluster.test"


def png_bytes() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


class Handler(http.server.BaseHTTPRequestHandler):
    hosts: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        type(self).hosts.append(self.headers.get("Host", ""))
        if self.path == "/moved":
            self.send_response(302)
            self.send_header("Location", "/x.png")
            self.end_headers()
            return
        body = png_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[int]:
    Handler.hosts = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def resolver(monkeypatch: pytest.MonkeyPatch) -> Callable[[list[str]], list[str]]:
    """resolver([a1, a2, ...]): NAME resolves to a1 on its first lookup, a2 on the second...; returns
    the list of NAME lookups so far. Other names (IP literals included) resolve as usual."""
    real = socket.getaddrinfo
    lookups: list[str] = []
    answers: list[str] = []

    def fake(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host == NAME:
            addr = answers[min(len(lookups), len(answers) - 1)]
            lookups.append(addr)
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (addr, int(port or 0)))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)

    def set_answers(addrs: list[str]) -> list[str]:
        answers[:] = addrs
        return lookups

    return set_answers


def settings(*domains: str) -> ServerSettings:
    return ServerSettings(allow_image_urls=True, image_url_domains=domains, image_fetch_timeout=5.0)


def fetch(url: str, s: ServerSettings, transport: Any = None) -> bytes:
    return images._fetch(images.ImageRef("messages[0].content[0]", url), s, transport)


def test_a_name_resolving_to_loopback_is_refused_unless_listed_by_name(
    server: int, resolver: Callable[[list[str]], list[str]]
) -> None:
    lookups = resolver(["127.0.0.1"])
    url = f"http://{NAME}:{server}/x.png"
    with pytest.raises(ApiError) as e:  # allowed as a subdomain of cluster.test, but not public
        fetch(url, settings("cluster.test"))
    assert "not a public address" in e.value.message and e.value.param == "messages[0].content[0]"
    assert Handler.hosts == []  # refused before any connection
    lookups.clear()
    assert fetch(url, settings(NAME)) == png_bytes()  # listed by its exact name: allowed
    assert Handler.hosts == [f"{NAME}:{server}"]  # the original Host header, at the checked address
    assert lookups == ["127.0.0.1"]  # one lookup


def test_the_connection_goes_to_the_checked_address_not_a_second_answer(
    server: int, resolver: Callable[[list[str]], list[str]]
) -> None:
    # listed, so loopback is allowed; the server listens on 127.0.0.1 only: a second lookup (answering
    # 127.0.0.2) would fail to connect; a same-host redirect keeps the address too
    lookups = resolver(["127.0.0.1", "127.0.0.2"])
    assert fetch(f"http://{NAME}:{server}/moved", settings(NAME)) == png_bytes()
    assert Handler.hosts == [f"{NAME}:{server}"] * 2
    assert lookups == ["127.0.0.1"]


def test_dns_rebinding_public_then_loopback_never_reaches_loopback(
    server: int, resolver: Callable[[list[str]], list[str]]
) -> None:
    lookups = resolver(["93.184.216.34", "127.0.0.1"])  # public to the check, loopback afterwards
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=png_bytes())

    body = fetch(f"https://{NAME}:{server}/x.png", settings("cluster.test"), httpx.MockTransport(handle))
    assert body == png_bytes()
    assert [str(r.url.host) for r in seen] == ["93.184.216.34"]  # the checked address
    assert seen[0].headers["host"] == f"{NAME}:{server}"
    assert seen[0].extensions["sni_hostname"] == NAME  # TLS verifies the certificate for the name
    assert lookups == ["93.184.216.34"]
    assert Handler.hosts == []  # nothing reached the loopback server


def test_a_redirect_to_another_host_is_refused(resolver: Callable[[list[str]], list[str]]) -> None:
    resolver(["93.184.216.34"])

    def handle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(302, headers={"Location": "http://127.0.0.1/x.png"})

    with pytest.raises(ApiError) as e:
        fetch(f"http://{NAME}/x.png", settings("cluster.test"), httpx.MockTransport(handle))
    assert "another host" in e.value.message


def self_signed(name: str, directory: Any) -> tuple[str, str, bytes]:
    """(cert file, key file, cert PEM) of a self-signed certificate for the DNS name ``name``."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(pem)
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return str(cert_file), str(key_file), pem


@pytest.mark.parametrize("cert_name", [NAME, "other.test"])
def test_https_at_the_checked_address_verifies_the_certificate_for_the_name(
    cert_name: str, tmp_path: Any, resolver: Callable[[list[str]], list[str]]
) -> None:
    """A real TLS server on 127.0.0.1: the pinned connection sends the name as SNI and verifies the
    certificate against it (not against the address): a certificate for another name is refused."""
    import ssl

    pytest.importorskip("cryptography")
    cert_file, key_file, pem = self_signed(cert_name, tmp_path)
    Handler.hosts = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert_file, key_file)
    httpd.socket = server_ctx.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        port = httpd.server_address[1]
        resolver(["127.0.0.1"])
        client_ctx = ssl.create_default_context(cadata=pem.decode())
        transport = httpx.HTTPTransport(verify=client_ctx)
        url = f"https://{NAME}:{port}/x.png"
        if cert_name == NAME:
            assert fetch(url, settings(NAME), transport) == png_bytes()
            assert Handler.hosts == [f"{NAME}:{port}"]
        else:
            with pytest.raises(ApiError) as e:
                fetch(url, settings(NAME), transport)
            assert "fetching the image failed" in e.value.message
            assert "CERTIFICATE_VERIFY_FAILED" in repr(e.value.__cause__)
            assert Handler.hosts == []
    finally:
        httpd.shutdown()
        httpd.server_close()
