"""TLS: a real service process serves HTTPS from <PREFIX>TLS_CERTFILE/KEYFILE, refuses to start in
plain HTTP when <PREFIX>REQUIRE_TLS is set, and the chassis HTTP client trusts AISTACK_CA_BUNDLE.

The certificates are generated here with `cryptography`: a self-signed development CA and a
server certificate it signs for 127.0.0.1 and localhost (what deploy/tls/gen-dev-cert.sh makes).
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.conftest import free_port


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "aistack test"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, Path]:
    """ca.pem (self-signed CA), server.pem + server.key (signed by it, SAN 127.0.0.1/localhost),
    and other-ca.pem (a CA that signed nothing here)."""
    d = tmp_path_factory.mktemp("tls")
    now = dt.datetime.now(dt.UTC)

    def ca(cn: str):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=2))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False,
                                             encipher_only=False, decipher_only=False), critical=True)
                .sign(key, hashes.SHA256()))
        return key, cert

    ca_key, ca_cert = ca("aistack test CA")
    _, other_cert = ca("someone else's CA")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name("localhost")).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    paths = {"ca": d / "ca.pem", "other_ca": d / "other-ca.pem", "cert": d / "server.pem", "key": d / "server.key"}
    paths["ca"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths["other_ca"].write_bytes(other_cert.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(_pem_key(key))
    paths["key"].chmod(0o600)
    return paths


def _gateway_env(redis_url: str, port: int, **extra: str) -> dict[str, str]:
    dead = f"http://127.0.0.1:{free_port()}"  # upstreams nobody serves: this test needs none
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "AISTACK_CA", "SSL_CERT"))}
    return {**env, "REDIS_URL": redis_url, "GATEWAY_HOST": "127.0.0.1", "GATEWAY_PORT": str(port),
            "GATEWAY_ORCHESTRATOR_URLS": dead, "GATEWAY_AUTH_URL": dead, "GATEWAY_FEATURES_URL": dead,
            "GATEWAY_MODEL_URLS": dead, "GATEWAY_PIPELINE_URLS": dead, "GATEWAY_READY_MAX_CPU_PERCENT": "100",
            "GATEWAY_OVERVIEW_SCRAPE_S": "3600", "PYTHONUNBUFFERED": "1", "OTEL_SERVICE_NAME": "gateway", **extra}


@pytest.fixture(scope="module")
def tls_gateway(certs, redis_url, tmp_path_factory):
    """The real gateway process (services/gateway/__main__.py -> chassis run()) serving HTTPS."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("tls-logs") / "gateway.log"
    env = _gateway_env(redis_url, port, GATEWAY_TLS_CERTFILE=str(certs["cert"]),
                       GATEWAY_TLS_KEYFILE=str(certs["key"]), GATEWAY_REQUIRE_TLS="true")
    with log_path.open("ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "services.gateway"], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    url = f"https://127.0.0.1:{port}"
    trust = ssl.create_default_context(cafile=str(certs["ca"]))
    deadline = time.monotonic() + 90
    try:
        while True:
            assert proc.poll() is None, f"gateway exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}"
            try:
                if httpx.get(f"{url}/health", verify=trust, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"TLS gateway not up:\n{log_path.read_text()[-3000:]}"
            time.sleep(0.2)
        yield url, port
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_gateway_serves_https_with_the_configured_certificate(tls_gateway, certs):
    url, port = tls_gateway
    trust = ssl.create_default_context(cafile=str(certs["ca"]))
    r = httpx.get(f"{url}/health", verify=trust, timeout=10)
    assert r.status_code == 200 and r.json()["service"] == "gateway"
    assert r.http_version.startswith("HTTP/1")
    # The served certificate is the one we configured.
    served = ssl.get_server_certificate(("127.0.0.1", port))
    assert x509.load_pem_x509_certificate(served.encode()) == x509.load_pem_x509_certificate(
        certs["cert"].read_bytes())


def test_plain_http_on_the_tls_port_gets_no_answer(tls_gateway):
    _, port = tls_gateway
    try:
        r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
    except httpx.HTTPError:
        return  # the TLS server drops a plaintext request: what uvicorn does
    assert r.status_code != 200, "the TLS port answered plain HTTP"


def test_a_client_that_does_not_trust_the_ca_is_refused(tls_gateway, certs):
    url, _ = tls_gateway
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{url}/health", verify=ssl.create_default_context(cafile=str(certs["other_ca"])), timeout=5)


async def test_chassis_http_client_trusts_aistack_ca_bundle(tls_gateway, certs, monkeypatch):
    from services.chassis.clients import http_client

    url, _ = tls_gateway
    for var in ("SSL_CERT_FILE", "SSL_CERT_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("AISTACK_CA_BUNDLE", raising=False)
    async with http_client(url, timeout=5) as client:  # public roots only: our CA is unknown
        with pytest.raises(httpx.ConnectError):
            await client.get("/health")
    monkeypatch.setenv("AISTACK_CA_BUNDLE", str(certs["ca"]))
    async with http_client(url, timeout=5) as client:
        r = await client.get("/health")
    assert r.status_code == 200
    monkeypatch.setenv("AISTACK_CA_BUNDLE", str(certs["other_ca"]))
    async with http_client(url, timeout=5) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get("/health")


def test_require_tls_without_a_certificate_refuses_to_start(redis_url):
    env = _gateway_env(redis_url, free_port(), GATEWAY_REQUIRE_TLS="true")
    done = subprocess.run([sys.executable, "-m", "services.gateway"], env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode != 0
    assert "GATEWAY_REQUIRE_TLS" in done.stderr and "GATEWAY_TLS_CERTFILE" in done.stderr


@pytest.mark.parametrize("fields,message", [
    ({"tls_certfile": "CERT"}, "TLS needs both GATEWAY_TLS_CERTFILE and GATEWAY_TLS_KEYFILE"),
    ({"tls_certfile": "CERT", "tls_keyfile": "/nonexistent/key.pem"}, "GATEWAY_TLS_KEYFILE"),
    ({"require_tls": True}, "refusing to serve plain HTTP"),
])
def test_tls_options_fail_early_on_half_a_configuration(certs, fields, message):
    from services.chassis.app import tls_options
    from services.gateway.settings import GatewaySettings

    fields = {k: str(certs["cert"]) if v == "CERT" else v for k, v in fields.items()}
    with pytest.raises(RuntimeError, match=message):
        tls_options(GatewaySettings(**fields))


def test_tls_options_from_prefixed_environment(certs, monkeypatch):
    from services.chassis.app import tls_options
    from services.gateway.settings import GatewaySettings

    monkeypatch.setenv("GATEWAY_TLS_CERTFILE", str(certs["cert"]))
    monkeypatch.setenv("GATEWAY_TLS_KEYFILE", str(certs["key"]))
    assert tls_options(GatewaySettings()) == {"ssl_certfile": str(certs["cert"]), "ssl_keyfile": str(certs["key"]),
                                             "ssl_keyfile_password": None}
    monkeypatch.delenv("GATEWAY_TLS_CERTFILE")
    monkeypatch.delenv("GATEWAY_TLS_KEYFILE")
    assert tls_options(GatewaySettings()) == {}
