"""nginx as the load balancer in front of several brokers, configured as the README says.

The README's "Several brokers" nginx block is used as written, but for its addresses:
the upstream servers become the test's brokers, the listener a free loopback port without
TLS, and the surrounding main block keeps every file in the balancer's own directory.
"""

import re
from dataclasses import dataclass
from pathlib import Path

from tests.proxies import NGINX_HINT, NGINX_MAIN, Proxy, require_binary
from tests.support import ROOT, Stack, free_port

# The access log names the brokers each request went to (and what each answered).
LOG = """\
    log_format balanced '$msec $request $status upstreams=$upstream_addr statuses=$upstream_status';
    access_log {dir}/access.log balanced;
"""


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def readme_block(title: str, language: str) -> str:
    """The first fenced block of ``language`` in the README's section ``title``."""
    found = re.search(rf"```{language}\n(.*?)```", readme_section(title), re.S)
    assert found, f"no {language} block under {title}"
    return found.group(1)


def balancer_site(upstreams: list[str], port: int) -> str:
    """The README's nginx block with these upstreams ("127.0.0.1:PORT") and a cleartext listener."""
    site = readme_block("Several brokers", "nginx")
    block = re.search(r"(?:^ *server \S+:\d+(.*);\n)+", site, re.M)
    assert block is not None, "the README's upstream lists no server"
    site = site.replace(block.group(0), "".join(f"    server {u}{block.group(1)};\n" for u in upstreams))
    site = re.sub(r"listen 443 ssl;", f"listen 127.0.0.1:{port};", site)
    return re.sub(r"^\s*(ssl_certificate\S*|server_name) .*\n", "", site, flags=re.M)


@dataclass
class Balancer:
    proxy: Proxy
    conf: Path

    @property
    def url(self) -> str:
        return self.proxy.url


def start_balancer(stack: Stack, workdir: Path, upstreams: list[str]) -> Balancer:
    binary = require_binary("nginx", NGINX_HINT)
    port = free_port()
    conf = workdir / "nginx.conf"
    http = LOG.format(dir=workdir) + balancer_site(upstreams, port)
    conf.write_text(NGINX_MAIN.format(dir=workdir, http=http))
    proc = stack.spawn("nginx-balancer", [binary, "-c", str(conf), "-p", str(workdir)])
    proxy = Proxy("nginx", port, proc, workdir, workdir / "access.log")
    proxy.wait_started()
    return Balancer(proxy, conf)
