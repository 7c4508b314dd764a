"""Process-wide settings of shadowjudge.environment: the httpx log redactor."""

from __future__ import annotations

import logging

import httpx
import pytest

from shadowjudge.environment import apply_defaults


@pytest.mark.parametrize("url", ["https://hooks.example.com?token=S3CRET", "https://hooks.example.com#S3CRET",
                                 "https://hooks.example.com/services/T0/B0/S3CRET",
                                 "https://user:S3CRET@hooks.example.com", "https://hooks.example.com:8443?k=S3CRET"])
def test_httpx_request_log_keeps_only_scheme_and_host(url, caplog):
    """A webhook URL with its secret in the query and no path kept the secret in httpx's INFO line."""
    apply_defaults()
    with caplog.at_level(logging.INFO, logger="httpx"):
        with httpx.Client(transport=httpx.MockTransport(lambda request: httpx.Response(200))) as client:
            client.post(url, json={})
    lines = [r.getMessage() for r in caplog.records if r.name == "httpx"]
    assert lines and all("hooks.example.com" in line and "S3CRET" not in line for line in lines), lines
