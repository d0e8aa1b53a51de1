"""The HTTP face of the tunnel: the paths and headers both sides must agree on."""

import ipaddress

REGISTER_PATH = "/tunnel/v1/register"  # POST a Hello frame, get a Welcome frame back
POLL_PATH = "/tunnel/v1/poll"  # GET: a streaming response of broker → connector frames
REPLY_PATH = "/tunnel/v1/reply"  # POST: a streaming body of reply frames (the connector's uplink)
# POST {"code": CODE} → {"name", "credential", "state"}: a one-time code exchanged for a credential.
ENROLL_PATH = "/tunnel/v1/enroll"
ENROLL_BODY_LIMIT = 4096
# On a poll's response: an admin asked this enrolled connector to rotate its credential. It
# then POSTs {"credential": NEW} here with its current one, and uses NEW from then on.
ROTATE_HEADER = "x-remotellm-rotate"
ROTATE_PATH = "/tunnel/v1/credential"
CREDENTIAL_PREFIX = "rlc_"  # an enrolled connector's credential, as the broker or the connector makes it

# The resume credential of Welcome.session: with the token, it names the session.
SESSION_HEADER = "x-remotellm-session"
# On a register, poll or uplink meant for one broker process (wire.Welcome.broker): any other
# answers MISDIRECTED, and the connector tries again on a new connection (a load balancer
# or a shared port puts each connection, or each request, on any of them).
BROKER_HEADER = "x-remotellm-broker"
MISDIRECTED = 421
# On a poll: how many broker frames the connector has received; the rest is sent again.
RECEIVED_HEADER = "x-remotellm-received"
# Either side takes the other for dead after this many ping intervals without a sign of life.
DEAD_AFTER_PINGS = 3
# A poll the broker ends as soon as it has frames (for paths that buffer whole responses).
SHORT_POLL_QUERY = "mode=short"
FRAMES_CONTENT_TYPE = "application/x-remotellm-frames"


def loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) stays on this machine: cleartext there is fine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
