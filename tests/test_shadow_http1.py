"""The engine's HTTP/1.1 transport against a scripted loopback server: framing, reuse, limits, failures."""

from __future__ import annotations

import asyncio
import datetime
import socket
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Self

import httpx2
import pytest

from shadowjudge.config import TargetConfig
from shadowjudge.shadow.endpoint import AttemptError, OpenAIEndpoint
from shadowjudge.shadow.http1 import Http1Transport

SECRET = "sk-test-secret-0123456789abcdef"
Reply = Callable[[bytes, asyncio.StreamWriter], Awaitable[bool]]  # returns whether to keep the connection


class ScriptedServer:
    """Reads HTTP/1.1 requests (Content-Length bodies) and answers each with the next scripted reply."""

    def __init__(self, replies: list[Reply], tls: ssl.SSLContext | None = None):
        self.replies = replies
        self.tls = tls
        self.requests: list[bytes] = []
        self.connections = 0
        self.open_now = 0
        self.most_open = 0

    async def __aenter__(self) -> Self:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                request = head + await reader.readexactly(length)
                if b"\r\ntransfer-encoding: chunked" in head.lower():  # kept as sent, up to the last chunk
                    request += await reader.readuntil(b"0\r\n\r\n")
                self.requests.append(request)
                if not await self.replies.pop(0)(request, writer):
                    return
        finally:
            self.open_now -= 1
            writer.close()


def fixed(body: bytes, status: int = 200, extra: bytes = b"") -> Reply:
    async def reply(request: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 %d X\r\ncontent-length: %d\r\n%s\r\n%s" % (status, len(body), extra, body))
        await writer.drain()
        return True
    return reply


def chunked(pieces: list[bytes], pause_s: float = 0.0) -> Reply:
    async def reply(request: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        for piece in pieces:
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
            await asyncio.sleep(pause_s)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True
    return reply


def until_close(body: bytes) -> Reply:
    async def reply(request: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n" + body)
        await writer.drain()
        return False
    return reply


def raw(data: bytes, keep: bool = False) -> Reply:
    async def reply(request: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(data)
        await writer.drain()
        return keep
    return reply


def silent(seconds: float) -> Reply:
    async def reply(request: bytes, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(seconds)
        return False
    return reply


def client(max_connections: int = 4, timeout: float = 5.0) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(transport=Http1Transport(max_connections=max_connections), timeout=timeout)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sequential_requests_share_one_connection_and_bodies_arrive_whole():
    async def main() -> None:
        replies = [fixed(b"first"), chunked([b"se", b"cond"], 0.01), fixed(b"", 204),
                   raw(b"HTTP/1.1 200 OK\r\ncontent-length: 99\r\n\r\n")]
        async with ScriptedServer(replies) as srv, client() as http:
            base = f"http://127.0.0.1:{srv.port}"
            first = await http.post(f"{base}/v1/a?x=1", content=b'{"q": 1}', headers={"authorization": "k"})
            second = await http.post(f"{base}/v1/b", content=b"{}")
            third = await http.get(f"{base}/v1/c")
            head = await http.head(f"{base}/v1/d")  # its content-length describes a body that is not sent
        assert (first.status_code, first.content, first.reason_phrase) == (200, b"first", "X")
        assert (second.status_code, second.text) == (200, "second")
        assert (third.status_code, third.content) == (204, b"")
        assert (head.status_code, head.content, head.headers["content-length"]) == (200, b"", "99")
        assert srv.connections == 1
        head, _, body = srv.requests[0].partition(b"\r\n\r\n")
        assert head.startswith(b"POST /v1/a?x=1 HTTP/1.1\r\n") and body == b'{"q": 1}'
        assert b"\r\nauthorization: k" in head.lower() and b"\r\nhost: 127.0.0.1:" in head.lower()

    asyncio.run(main())


def test_a_streamed_request_body_goes_as_one_chunk():
    async def parts():
        yield b'{"a": '
        yield b"1}"

    async def main() -> None:
        async with ScriptedServer([fixed(b"got it")]) as srv, client() as http:
            answer = await http.post(f"http://127.0.0.1:{srv.port}/up", content=parts())
        assert answer.content == b"got it"
        head, _, body = srv.requests[0].partition(b"\r\n\r\n")
        assert b"transfer-encoding: chunked" in head.lower() and body == b'8\r\n{"a": 1}\r\n0\r\n\r\n'

    asyncio.run(main())


def test_close_delimited_body_and_a_server_closed_idle_connection_get_a_new_connection():
    async def main() -> None:
        replies = [until_close(b"to the end"), raw(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"), fixed(b"again")]
        async with ScriptedServer(replies) as srv, client() as http:
            url = f"http://127.0.0.1:{srv.port}/"
            assert (await http.get(url)).content == b"to the end"
            assert (await http.get(url)).content == b"ok"  # the server closes this one after answering
            await asyncio.sleep(0.05)
            assert (await http.get(url)).content == b"again"
        assert srv.connections == 3

    asyncio.run(main())


def test_open_connections_stay_within_the_limit():
    async def main() -> None:
        async with ScriptedServer([chunked([b"a", b"b"], 0.02) for _ in range(12)]) as srv, client(3) as http:
            url = f"http://127.0.0.1:{srv.port}/"
            answers = await asyncio.gather(*(http.get(url) for _ in range(12)))
        assert [a.content for a in answers] == [b"ab"] * 12
        assert srv.most_open <= 3 and srv.connections <= 3

    asyncio.run(main())


@pytest.mark.parametrize(("reply", "error"), [
    (raw(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort"), httpx2.ReadError),  # closed mid-body
    (raw(b"NOT HTTP AT ALL\r\n\r\n", keep=True), httpx2.RemoteProtocolError),
    (silent(1.0), httpx2.ReadTimeout),
])
def test_failures_map_to_httpx_errors_without_the_headers(reply, error):
    async def main() -> None:
        async with ScriptedServer([reply]) as srv, client(timeout=0.3) as http:
            with pytest.raises(error) as caught:
                await http.get(f"http://127.0.0.1:{srv.port}/", headers={"authorization": f"Bearer {SECRET}"})
        assert SECRET not in str(caught.value)

    asyncio.run(main())


def test_refused_connection_is_a_connect_error():
    async def main() -> None:
        async with client() as http:
            with pytest.raises(httpx2.ConnectError):
                await http.get(f"http://127.0.0.1:{closed_port()}/")

    asyncio.run(main())


def endpoint(port: int) -> OpenAIEndpoint:
    target = TargetConfig(name="t", model="m", base_url=f"http://127.0.0.1:{port}/v1", concurrency=2)
    return OpenAIEndpoint(target, SECRET, timeout_s=2.0)


def test_openai_endpoint_streams_through_the_transport_and_classifies_failures():
    sse = [b'data: {"choices":[{"index":0,"delta":{"content":"Hel"}}]}\n\n',
           b'data: {"choices":[{"index":0,"delta":{"content":"lo"},"finish_reason":"stop"}],',
           b'"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\ndata: [DONE]\n\n']
    replies = [chunked(sse, 0.02), fixed(b'{"error": {"message": "slow down"}}', 429, b"retry-after: 3\r\n"),
               raw(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\ndata:\r\n")]

    async def main() -> None:
        async with ScriptedServer(replies) as srv:
            ep = endpoint(srv.port)
            try:
                done = await ep.complete({"model": "m", "messages": []}, stream=True, timeout_s=2.0)
                with pytest.raises(AttemptError) as limited:
                    await ep.complete({"model": "m", "messages": []}, stream=True, timeout_s=2.0)
                with pytest.raises(AttemptError) as cut:
                    await ep.complete({"model": "m", "messages": []}, stream=True, timeout_s=2.0)
            finally:
                await ep.aclose()
            assert b"authorization: bearer " + SECRET.encode() in srv.requests[0].lower()
        assert (done.text, done.input_tokens, done.output_tokens, done.finish_reason) == ("Hello", 3, 2, "stop")
        assert done.ttft_ms is not None and done.itl_ms is not None and done.latency_ms >= done.ttft_ms
        assert (limited.value.error_class, limited.value.retry_after_s) == ("rate_limited", 3)
        assert limited.value.status == 429
        assert cut.value.error_class == "connection_error" and SECRET not in str(cut.value)

    asyncio.run(main())


def test_openai_endpoint_refused_and_silent_servers():
    async def main() -> None:
        ep = endpoint(closed_port())
        try:
            with pytest.raises(AttemptError) as refused:
                await ep.complete({"model": "m", "messages": []}, stream=True, timeout_s=1.0)
        finally:
            await ep.aclose()
        assert refused.value.error_class == "connection_error" and refused.value.retryable
        async with ScriptedServer([silent(2.0)]) as srv:
            ep = endpoint(srv.port)
            try:
                with pytest.raises(AttemptError) as late:
                    await ep.complete({"model": "m", "messages": []}, stream=True, timeout_s=0.3)
            finally:
                await ep.aclose()
        assert late.value.error_class == "timeout" and late.value.retryable

    asyncio.run(main())


def test_a_request_waiting_for_a_full_pool_times_out_as_a_pool_timeout():
    async def main() -> None:
        timeout = httpx2.Timeout(5.0, pool=0.2)
        async with ScriptedServer([chunked([b"slow", b"ly"], 0.5), fixed(b"next")]) as srv, \
                httpx2.AsyncClient(transport=Http1Transport(max_connections=1), timeout=timeout) as http:
            url = f"http://127.0.0.1:{srv.port}/"
            async with http.stream("GET", url) as holding:
                with pytest.raises(httpx2.PoolTimeout):
                    await http.get(url)
                assert await holding.aread() == b"slowly"
            assert (await http.get(url)).content == b"next"  # the slot came back with the first response
        assert srv.connections == 1

    asyncio.run(main())


def self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """A certificate for 'localhost' and its key, PEM files."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_https_reuses_a_verified_tls_connection_and_refuses_an_unknown_certificate(tmp_path):
    cert, key = self_signed_cert(tmp_path)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    trusting = ssl.create_default_context(cafile=str(cert))

    async def main() -> None:
        async with ScriptedServer([fixed(b"secure"), chunked([b"sec", b"ond"], 0.01)], server_tls) as srv:
            url = f"https://localhost:{srv.port}/v1"
            async with httpx2.AsyncClient(transport=Http1Transport(ssl_context=trusting), timeout=5) as http:
                assert (await http.get(url)).content == b"secure"
                assert (await http.get(url)).content == b"second"
            assert srv.connections == 1
            async with httpx2.AsyncClient(transport=Http1Transport(), timeout=5) as http:  # the system's CAs only
                with pytest.raises(httpx2.ConnectError, match="certificate"):
                    await http.get(url)

    asyncio.run(main())
