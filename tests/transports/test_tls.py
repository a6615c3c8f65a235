"""TLS for the TCP transport: ``options={"ssl": ctx}`` on the server and on the client,
with a self-signed certificate made for this run (by the ``openssl`` CLI, else the
``cryptography`` package).  A plaintext peer and a peer that does not trust the
certificate fail clearly, and the server goes on serving.
"""

from __future__ import annotations

import asyncio
import datetime
import gc
import ipaddress
import shutil
import ssl
import subprocess
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

import pytest
from conftest import wait_until

from nestpy_mini import (
    ConnectionClosedError,
    Controller,
    Ctx,
    MessagePattern,
    Module,
    NestFactory,
    NestMicroservice,
)
from nestpy_mini.transports.tcp import TcpClient, TcpContext


@Controller()
class TlsController:
    @MessagePattern({"cmd": "sum"})
    def sum(self, data: list[int]) -> int:
        return sum(data)

    @MessagePattern({"cmd": "slow"})
    async def slow(self, data: int) -> int:
        await asyncio.sleep(0.2)
        return data

    @MessagePattern({"cmd": "count"})
    async def count(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    @MessagePattern({"cmd": "tls"})
    def tls(self, data: object, ctx: Annotated[TcpContext, Ctx()]) -> str | None:
        """The TLS version the server side of this connection speaks."""
        transport = ctx.get_socket_ref().transport
        ssl_object = transport.get_extra_info("ssl_object") if transport else None
        return ssl_object.version() if ssl_object else None


@Module(controllers=[TlsController])
class TlsModule:
    pass


def _with_openssl(cert: Path, key: Path) -> None:
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec",
            "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(key), "-out", str(cert), "-days", "2",
            "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )  # fmt: skip


def _with_cryptography(cert: Path, key: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(private, hashes.SHA256())
    )
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1: ``(cert, key)``."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    if shutil.which("openssl"):
        _with_openssl(cert, key)
    else:
        try:
            _with_cryptography(cert, key)
        except ImportError:
            pytest.skip("neither the openssl CLI nor the cryptography package is available")
    return cert, key


@pytest.fixture
def server_ctx(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(*certificate)
    return ctx


@pytest.fixture
def client_ctx(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certificate[0]))


@pytest.fixture
async def tls_app(server_ctx: ssl.SSLContext) -> AsyncIterator[NestMicroservice]:
    app = await NestFactory.create_microservice(
        TlsModule, options={"port": 0, "ssl": server_ctx, "close_grace": 1}
    )
    await app.start()
    yield app
    await app.close()


@pytest.fixture
async def make_client() -> AsyncIterator[Any]:
    clients: list[TcpClient] = []

    def make(port: int, **options: Any) -> TcpClient:
        client = TcpClient({"port": port, "timeout": 5, **options})
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


def port_of(app: NestMicroservice) -> int:
    return app.server.port  # type: ignore[attr-defined,no-any-return]


async def test_requests_streams_and_load_over_tls(
    tls_app: NestMicroservice, client_ctx: ssl.SSLContext, make_client: Any
) -> None:
    client = make_client(port_of(tls_app), ssl=client_ctx)
    assert await client.send({"cmd": "sum"}, [1, 2, 3]) == 6
    assert (await client.send({"cmd": "tls"}, 0)).startswith("TLSv1.")
    assert await client.send({"cmd": "count"}, 5).to_list() == [0, 1, 2, 3, 4]
    big = list(range(50_000))  # many TLS records for one frame
    assert await client.send({"cmd": "sum"}, big) == sum(big)
    sums = await asyncio.gather(*(client.send({"cmd": "sum"}, [i, 1]) for i in range(300)))
    assert sums == [i + 1 for i in range(300)]


async def test_a_plaintext_client_fails_clearly_and_the_server_keeps_serving(
    tls_app: NestMicroservice, client_ctx: ssl.SSLContext, make_client: Any
) -> None:
    plain = make_client(port_of(tls_app))
    loop = asyncio.get_running_loop()
    started = loop.time()
    # Its frame is no TLS record: the server drops the connection at once.
    with pytest.raises(ConnectionClosedError, match=f"tcp://127.0.0.1:{port_of(tls_app)} closed"):
        await plain.send({"cmd": "sum"}, [1])
    assert loop.time() - started < 1.0  # not its 5 s timeout
    secure = make_client(port_of(tls_app), ssl=client_ctx)
    assert await secure.send({"cmd": "sum"}, [2, 2]) == 4


async def test_failed_handshakes_are_not_kept_by_the_server(
    tls_app: NestMicroservice, client_ctx: ssl.SSLContext, make_client: Any
) -> None:
    """A handshake that fails never reaches ``connection_made``/``connection_lost``;
    the server must not hold on to it (it once kept one connection object per failure)."""
    port = port_of(tls_app)
    for _ in range(20):
        with pytest.raises(ConnectionClosedError):
            await TcpClient({"port": port}).send({"cmd": "sum"}, [1])
        _, writer = await asyncio.open_connection("127.0.0.1", port)  # connect, say nothing
        writer.close()
        await writer.wait_closed()
    secure = make_client(port, ssl=client_ctx)
    assert await secure.send({"cmd": "sum"}, [5]) == 5
    await wait_until(lambda: len(tls_app.server._connections) == 1)  # type: ignore[attr-defined]


async def test_a_client_that_does_not_trust_the_certificate_fails_with_an_ssl_error(
    tls_app: NestMicroservice, client_ctx: ssl.SSLContext, make_client: Any
) -> None:
    untrusting = make_client(port_of(tls_app), ssl=ssl.create_default_context())
    with pytest.raises(ConnectionError, match="CERTIFICATE_VERIFY_FAILED") as info:
        await untrusting.send({"cmd": "sum"}, [1])
    assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)
    assert f"cannot connect to tcp://127.0.0.1:{port_of(tls_app)}" in str(info.value)
    trusting = make_client(port_of(tls_app), ssl=client_ctx)
    assert await trusting.send({"cmd": "sum"}, [3]) == 3


async def test_a_tls_client_against_a_plaintext_server_fails_clearly(
    client_ctx: ssl.SSLContext, make_client: Any
) -> None:
    app = await NestFactory.create_microservice(TlsModule, options={"port": 0})
    await app.start()
    try:
        client = make_client(port_of(app), ssl=client_ctx)
        loop = asyncio.get_running_loop()
        started = loop.time()
        # Its ClientHello is no frame: the server drops it, the handshake fails.
        with pytest.raises(ConnectionError, match=r"cannot connect to tcp://127\.0\.0\.1"):
            await client.send({"cmd": "sum"}, [1])
        assert loop.time() - started < 1.0
        plain = make_client(port_of(app))
        assert await plain.send({"cmd": "sum"}, [4]) == 4
    finally:
        await app.close()


async def test_close_over_tls_delivers_replies_and_leaves_nothing_behind(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", ResourceWarning)
        app = await NestFactory.create_microservice(
            TlsModule, options={"port": 0, "ssl": server_ctx, "close_grace": 2}
        )
        await app.start()
        clients = [TcpClient({"port": port_of(app), "ssl": client_ctx}) for _ in range(3)]
        for client in clients:
            assert await client.send({"cmd": "sum"}, [1]) == 1
        in_flight = [
            asyncio.ensure_future(c.send({"cmd": "slow"}, i)) for i, c in enumerate(clients)
        ]
        await wait_until(lambda: len(app.server._tasks) == 3)
        await app.close()
        assert await asyncio.gather(*in_flight) == [0, 1, 2]
        assert not app.server._connections  # type: ignore[attr-defined]
        for client in clients:
            await client.close()
        gc.collect()
    assert [str(w.message) for w in seen if issubclass(w.category, ResourceWarning)] == []
    assert asyncio.all_tasks() - {asyncio.current_task()} == set()
