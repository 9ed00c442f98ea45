"""--web.config.file parsing (exporter-toolkit format): TLS context, bcrypt users, errors."""
from __future__ import annotations

import ssl

import bcrypt
import pytest

from iotrace.core.errors import ConfigError
from iotrace.serve.webconfig import load_web_config
from support.prometheus import self_signed_cert

HASH = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode()


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    cert, key = self_signed_cert(d, "localhost")
    other_cert, other_key = self_signed_cert(d / "other", "other")
    return d, cert, key, other_key


def write(tmp_path, text):
    p = tmp_path / "web.yml"
    p.write_text(text)
    return str(p)


def test_tls_and_users(tmp_path, certs):
    d, cert, key, _ = certs
    web = load_web_config(write(tmp_path, f"""
tls_server_config:
  cert_file: {cert}
  key_file: {key}
  min_version: TLS13
basic_auth_users:
  alice: '{HASH}'
http_server_config:
  headers:
    X-Frame-Options: deny
"""))
    assert web.tls and isinstance(web.ssl_context, ssl.SSLContext)
    assert web.ssl_context.minimum_version == ssl.TLSVersion.TLSv1_3
    assert web.ssl_context.verify_mode == ssl.CERT_NONE
    assert web.headers == {"X-Frame-Options": "deny"}
    assert web.check_password("alice", "s3cret")
    assert web.check_password("alice", "s3cret")          # cached path, same answer
    assert not web.check_password("alice", "wrong")
    assert not web.check_password("bob", "s3cret")
    assert not web.check_password("alice", "")


def test_relative_paths_and_client_ca(tmp_path, certs):
    d, cert, key, _ = certs
    (tmp_path / "c.crt").write_bytes(cert.read_bytes())
    (tmp_path / "c.key").write_bytes(key.read_bytes())
    web = load_web_config(write(tmp_path, """
tls_server_config:
  cert_file: c.crt
  key_file: c.key
  client_auth_type: RequireAndVerifyClientCert
  client_ca_file: c.crt
"""))
    assert web.ssl_context.verify_mode == ssl.CERT_REQUIRED
    assert not web.auth_required


def test_empty_file_means_plain_http(tmp_path):
    web = load_web_config(write(tmp_path, ""))
    assert not web.tls and not web.auth_required
    assert web.check_password("anyone", "anything")


@pytest.mark.parametrize("body,line,key,what", [
    ("tls_server_config:\n  cert_file: {cert}\n", 2, "tls_server_config.key_file",
     "needs key_file"),
    ("tls_server_config:\n  cert_file: {cert}\n  key_file: {other_key}\n", 2,
     "tls_server_config.cert_file", "cannot use"),
    ("tls_server_config:\n  cert_file: /nonexistent.crt\n  key_file: {key}\n", 2,
     "tls_server_config.cert_file", "no such file"),
    ("tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
     "  client_auth_type: RequireAnyClientCert\n", 4, "tls_server_config.client_auth_type",
     "not supported"),
    ("tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
     "  client_auth_type: RequireAndVerifyClientCert\n", 4,
     "tls_server_config.client_auth_type", "needs a client_ca_file"),
    ("tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n  min_version: TLS14\n", 4,
     "tls_server_config.min_version", "expected one of"),
    ("tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n  cipher_suites: [x]\n", 4,
     "tls_server_config.cipher_suites", "unknown key"),
    ("basic_auth_users:\n  alice: s3cret\n", 2, "basic_auth_users.alice", "not a bcrypt hash"),
    ("basic_auth_users:\n  alice: '$2b$12$" + "!" * 53 + "'\n", 2, "basic_auth_users.alice",
     "malformed bcrypt"),
    ("basic_auth_users: [alice]\n", 1, "basic_auth_users", "expected a mapping"),
    ("http_server_config:\n  headers:\n    Content-Type: x\n", 3,
     "http_server_config.headers.Content-Type", "set by the server"),
    ("tls_config:\n  cert_file: x\n", 1, "tls_config", "unknown key"),
])
def test_errors_are_one_line_with_file_line_key(tmp_path, certs, body, line, key, what):
    d, cert, k, other_key = certs
    path = write(tmp_path, body.format(cert=cert, key=k, other_key=other_key))
    with pytest.raises(ConfigError) as exc:
        load_web_config(path)
    msg = str(exc.value)
    assert msg.startswith(f"{path}:{line}: {key}: "), msg
    assert what in msg and "\n" not in msg


def test_bad_yaml(tmp_path):
    path = write(tmp_path, "basic_auth_users:\n  alice: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_web_config(path)
