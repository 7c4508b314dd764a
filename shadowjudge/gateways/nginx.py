"""nginx weighted upstreams: a real gateway that splits real traffic by the pushed weights.

The adapter owns one include file (http context) holding, per route, an `upstream shadowjudge_<route>` block with
one `server` per target (`weight=<w>`, or `down` at 0, since nginx refuses weight=0) and a `map` that exposes the
weights (`a=95,b=5`) in `$shadowjudge_weights_<route>`. The main config proxies to the upstream and may serve that
variable (see configs/gateways/nginx/nginx.conf), so the read-back asks the running nginx, not the file.

Validation runs `nginx -t` on the rendered file inside a throwaway wrapper config before anything is written;
the push writes atomically and runs the reload command (`nginx -s reload`); a target's server parameters other
than its weight (max_fails, ...), other servers and directives inside the upstream block (keepalive, ...) and text
outside the managed blocks are kept. A target's `backup` is dropped: nginx sends a backup server traffic only when
every other server is down, so the pushed split would not be the one served (yet read back as if it were).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from shadowjudge.config import RouteConfig
from shadowjudge.gateways.base import GatewayConfigInvalid, GatewayRejected, GatewayUnavailable, Weights
from shadowjudge.gateways.files import FileGateway

_SAFE_NAME = re.compile(r"^[A-Za-z0-9._:@/-]+$")
_SERVER = re.compile(r"^\s*server\s+(?P<addr>\S+)(?P<params>[^;#]*);\s*(?:#\s*target=(?P<target>\S+))?\s*$")
STATUS_PATH = "/__shadowjudge/weights/"
READ_BACK_WAIT_S = 10.0


def nginx_binary() -> str | None:
    found = shutil.which("nginx")
    return found or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None)


def parse_weights_payload(text: str) -> Weights:
    """`a=95,b=5`, as the map variable holds it (no braces or quotes: it sits in an nginx string)."""
    pairs = [item.split("=", 1) for item in text.strip().split(",") if item]
    if any(len(p) != 2 for p in pairs):
        raise ValueError(f"not a weights payload: {text[:200]!r}")
    return {name: int(value) for name, value in pairs}


def upstream_name(route: str) -> str:
    return "shadowjudge_" + re.sub(r"[^A-Za-z0-9_]", "_", route)


def weights_variable(route: str) -> str:
    return "$shadowjudge_weights_" + re.sub(r"[^A-Za-z0-9_]", "_", route)


def target_address(base_url: str) -> str:
    parts = urlsplit(base_url)
    if not parts.hostname:
        raise GatewayConfigInvalid(f"nginx gateway: cannot take a host from base_url '{base_url}'")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{host}:{port}"


class NginxGateway(FileGateway):
    kind = "nginx"

    def __init__(self, route: RouteConfig, path: str | Path, reload_command: Sequence[str] | None = None,
                 status_url: str | None = None) -> None:
        super().__init__(route, path, reload_command)
        self.status_url = status_url.rstrip("/") if status_url else None
        self.addresses = {t.name: target_address(t.base_url) for t in route.targets}
        for t in route.targets:
            if not _SAFE_NAME.match(t.name):
                raise GatewayConfigInvalid(
                    f"nginx gateway: target name '{t.name}' has characters nginx configs cannot carry")
        shared = {a for a in self.addresses.values() if list(self.addresses.values()).count(a) > 1}
        if shared:
            clash = {n: a for n, a in self.addresses.items() if a in shared}
            raise GatewayConfigInvalid(
                f"route '{route.name}': nginx splits traffic by upstream address, but targets share one: {clash}")

    # -- format ------------------------------------------------------------------------------------------------
    def parse_weights(self, text: str) -> Weights:
        self._check_no_name_clash(text)
        body = self._upstream_body(text)
        if body is None:
            return {}
        by_address = {a: n for n, a in self.addresses.items()}
        weights: Weights = {}
        for line in body.splitlines():
            if not re.match(r"^\s*server\s", line):
                continue
            m = _SERVER.match(line)
            if not m:
                raise GatewayConfigInvalid(f"{self.path}: cannot read upstream line {line.strip()!r}")
            params = m.group("params").split()
            weight = 0 if "down" in params else next(
                (int(p.split("=", 1)[1]) for p in params if p.startswith("weight=")), 1)
            owner = m.group("target") or by_address.get(m.group("addr"))
            if owner not in self.addresses:
                if weight:
                    raise GatewayConfigInvalid(
                        f"{self.path}: upstream server {m.group('addr')} takes traffic but is not a target of route "
                        f"'{self.route.name}'")
                continue
            if owner in weights:
                raise GatewayConfigInvalid(f"{self.path}: a second upstream server for target '{owner}'")
            weights[owner] = weight
        return weights

    def render_text(self, text: str | None, weights: Mapping[str, int]) -> str:
        """Each target's `server` line gets its weight (or `down`) and keeps its other parameters (max_fails,
        max_conns, ...) but `backup`, which would override the split; every other line of the upstream, other
        servers included, is carried over as it was."""
        text = text or ""
        self._check_no_name_clash(text)
        kept: list[str] = []
        extra: dict[str, list[str]] = {}
        by_address = {a: n for n, a in self.addresses.items()}
        body = self._upstream_body(text)
        for ln in (body or "").splitlines():
            m = _SERVER.match(ln)
            owner = (m.group("target") or by_address.get(m.group("addr"))) if m else None
            if m and owner in self.addresses:
                given = m.group("params").split()
                extra.setdefault(owner, [p for p in given
                                         if p not in ("down", "backup") and not p.startswith("weight=")])
            elif ln.strip():
                kept.append(ln.strip())
        lines = [f"upstream {upstream_name(self.route.name)} {{"]
        for t in self.route.targets:
            w = int(weights.get(t.name, 0))
            params = " ".join([f"weight={w}" if w > 0 else "weight=1 down", *extra.get(t.name, [])])
            lines.append(f"    server {self.addresses[t.name]} {params};  # target={t.name}")
        lines += [f"    {ln}" for ln in kept]
        lines.append("}")
        payload = ",".join(f"{t.name}={int(weights.get(t.name, 0))}" for t in self.route.targets)
        lines += [f"map $host {weights_variable(self.route.name)} {{", f"    default '{payload}';", "}"]
        block = "\n".join(lines) + "\n"
        rest = self._without_managed_blocks(text).strip()
        header = f"# Managed by ShadowJudge for route '{self.route.name}': weights are rewritten on every push.\n"
        return (rest + "\n\n" if rest else "") + header + block

    def check_rendered(self, text: str) -> None:
        binary = nginx_binary()
        if binary is None:
            raise GatewayUnavailable("nginx gateway: no nginx binary to validate with (apt-get install -y nginx-light)")
        with tempfile.TemporaryDirectory(prefix="sj-nginx-t-") as tmp:
            candidate = Path(tmp, "candidate.conf")
            candidate.write_text(text)
            wrapper = Path(tmp, "nginx.conf")
            wrapper.write_text(f"pid {tmp}/nginx.pid;\nevents {{}}\nhttp {{\n    include {candidate};\n}}\n")
            try:
                proc = subprocess.run([binary, "-t", "-q", "-e", "stderr", "-p", tmp + "/", "-c", str(wrapper)],
                                      capture_output=True, text=True, timeout=30, check=False)
            except subprocess.TimeoutExpired:
                raise GatewayUnavailable("nginx -t timed out") from None
            if proc.returncode != 0:
                tail = proc.stderr.strip().replace(str(candidate), "<rendered>")[-500:]
                raise GatewayRejected(f"{self.path}: nginx -t rejected the rendered config: {tail}")

    # -- read-back from the running nginx ---------------------------------------------------------------------
    def read_back(self) -> Weights:
        expected = super().read_back()
        if not self.status_url:
            return expected
        url = f"{self.status_url}{STATUS_PATH}{self.route.name}"
        deadline = time.monotonic() + READ_BACK_WAIT_S
        while True:  # workers pick a reload up within moments; wait for them rather than report a stale answer
            try:
                answer = httpx.get(url, timeout=2.0)
                answer.raise_for_status()
                served = parse_weights_payload(answer.text)
            except (httpx.HTTPError, ValueError) as exc:
                if time.monotonic() > deadline:
                    raise GatewayUnavailable(f"{url}: nginx did not report its weights: {exc}") from None
                served = None
            if served == expected or (served is not None and time.monotonic() > deadline):
                return served
            time.sleep(0.1)

    # -- text helpers ------------------------------------------------------------------------------------------
    def _check_no_name_clash(self, text: str) -> None:
        """Route names map to nginx names many-to-one ('chat-a' and 'chat_a' both give shadowjudge_chat_a): a file
        another route's block already uses under our name would be read and overwritten as ours."""
        ours = upstream_name(self.route.name)
        for other in re.findall(r"# Managed by ShadowJudge for route '([^']+)'", text):
            if other != self.route.name and upstream_name(other) == ours:
                raise GatewayConfigInvalid(f"{self.path}: routes '{other}' and '{self.route.name}' both map to the "
                                           f"nginx upstream '{ours}'; rename one of them")

    def _upstream_body(self, text: str) -> str | None:
        m = re.search(rf"upstream\s+{re.escape(upstream_name(self.route.name))}\s*\{{(?P<body>[^}}]*)\}}", text)
        return m.group("body") if m else None

    def _without_managed_blocks(self, text: str) -> str:
        text = re.sub(rf"upstream\s+{re.escape(upstream_name(self.route.name))}\s*\{{[^}}]*\}}\n?", "", text)
        text = re.sub(rf"map\s+\$host\s+{re.escape(weights_variable(self.route.name))}\s*\{{[^}}]*\}}\n?", "", text)
        return re.sub(rf"# Managed by ShadowJudge for route '{re.escape(self.route.name)}'[^\n]*\n?", "", text)
