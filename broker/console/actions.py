"""What an admin may do to enrolled connectors, as plain functions: the console's forms and
the admin JSON API both call them. Each raises EnrollmentError (status, code, message) when
it cannot be done."""

from broker.enrollment import DEFAULT_TTL, EnrollmentError, check_name, check_ttl, parse_models
from broker.hub import Hub
from broker.logs import log

# action → (the state it leads to, the states it may start from); "rotate" keeps the state.
STATES = {"approve": ("approved", ("pending",)), "revoke": ("revoked", ("pending", "approved"))}
ACTIONS = (*STATES, "rotate")


async def act(hub: Hub, name: str, action: str) -> str:
    """Approve a pending connector, revoke one (its tunnels close at once), or ask one for a
    new credential (its tunnels stay up); what was done, in words."""
    store = hub.enrollment.store
    assert store is not None  # started with the app
    if action == "rotate":
        done, outcome = await store.request_rotation(name), "asked for a new credential"
    elif action in STATES:
        state, only_from = STATES[action]
        done, outcome = await store.set_state(name, state, only_from=only_from), state  # type: ignore[arg-type]
    else:
        raise EnrollmentError(404, "not_found", "No such action.")
    if not done:
        raise EnrollmentError(404, "not_found", f"No enrolled connector {name[:64]!r} can be {outcome} now.")
    gone = await hub.enrollment.refresh()
    if hub.notices is not None:  # the other brokers drop theirs now, not at their next read
        for identity in gone:
            await hub.notices.revoked(identity)
    if action == "rotate":  # its polls come back at once, and their answer asks for the new credential
        for connector in hub.enrollment.enrolled.rows:
            if connector.name == name:
                hub.recycle_polls(bytes.fromhex(connector.identity))
    log.info("admin: connector %s %s", name, outcome)
    return outcome


async def new_code(hub: Hub, name: str, models: str, ttl: str | float | None) -> tuple[str, str, int]:
    """A one-time enrollment code (with the name and lifetime it has), never stored in clear."""
    name = check_name(name.strip())
    allowed = parse_models(models)
    try:
        seconds = check_ttl(float(ttl or DEFAULT_TTL))
    except (TypeError, ValueError):
        raise EnrollmentError(400, "invalid_ttl", "The code's lifetime must be a number of seconds.") from None
    if any(spec.name == name for spec in hub.settings.connectors):
        raise EnrollmentError(409, "name_taken", f"A configured connector is called {name!r} already.")
    store = hub.enrollment.store
    assert store is not None
    code = await store.create_code(name, allowed, seconds)
    log.info("admin: enrollment code made for connector %s (valid %d s)", name, seconds)
    return code, name, seconds
