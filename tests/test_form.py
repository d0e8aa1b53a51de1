"""The broker's search for the model field of a multipart form (sans-IO, no processes)."""

import asyncio

from broker.body import BodyBudget, HeldBody, read_held
from broker.form import MODEL_SCAN_LIMIT, FormModel

CT = 'multipart/form-data; boundary="b0undary"'


def part(name: str, value: bytes, extra: str = "") -> bytes:
    return f'--b0undary\r\nContent-Disposition: form-data; name="{name}"{extra}\r\n\r\n'.encode() + value + b"\r\n"


def first_settled(form: FormModel, body: bytes, step: int) -> tuple[int, str | None]:
    """How many bytes it took to settle, fed ``step`` bytes at a time, and the model found."""
    for end in range(step, len(body) + step, step):
        if form.enough(body[:end]):
            return end, form.model
    return len(body), form.model


def test_the_model_is_found_once_its_part_is_whole_however_the_body_is_split() -> None:
    body = part("language", b"en") + part("model", b"whisper-1") + part("file", b"\x00\xff" * 5000, '; filename="a"')
    for step in (1, 7, 100, len(body)):
        _, model = first_settled(FormModel.of(CT), body, step)
        assert model == "whisper-1"
    assert not FormModel.of(CT).enough(body[: body.index(b"whisper-1") + 9])  # its delimiter may still change it


def test_a_file_named_model_or_a_missing_field_finds_nothing() -> None:
    form = FormModel.of("multipart/form-data; boundary=b0undary")
    body = part("file", b"x", '; filename="model"') + part("prompt", b'name="model"') + b"--b0undary--\r\n"
    assert form.enough(body) and form.model is None and form.ended


def test_only_the_head_is_searched() -> None:
    body = part("prompt", b"x" * MODEL_SCAN_LIMIT) + part("model", b"whisper-1")
    form = FormModel.of(CT)
    assert form.enough(body[:MODEL_SCAN_LIMIT]) and form.model is None


def test_a_body_that_is_no_form_settles_at_once() -> None:
    for content_type in (None, "application/json", "multipart/form-data"):
        form = FormModel.of(content_type)
        assert form.enough(b'{"model": "whisper-1"}') and form.model is None


def test_a_model_that_is_not_utf8_is_empty() -> None:
    form = FormModel.of(CT)
    assert form.enough(part("model", b"\xff\xfe") + b"--b0undary--") and form.model == ""


def test_read_held_shows_the_head_as_it_grows_and_at_its_end() -> None:
    body = part("model", b"whisper-1") + part("file", b"\x00" * 100_000, '; filename="a"') + b"--b0undary--\r\n"

    def read(pieces: list[bytes]) -> tuple[bool, str | None, int]:
        form = FormModel.of(CT)
        messages = [{"type": "http.request", "body": p, "more_body": i < len(pieces) - 1} for i, p in enumerate(pieces)]

        async def receive() -> dict[str, object]:
            return messages.pop(0)

        held = HeldBody(BodyBudget(10 * MODEL_SCAN_LIMIT))
        more = asyncio.run(read_held(receive, held, limit=MODEL_SCAN_LIMIT, timeout=5, until=form.enough))
        return more, form.model, held.size

    assert read([body]) == (False, "whisper-1", len(body))  # one last message: looked at all the same
    head = body.index(b"--b0undary", 10) + len(b"--b0undary")  # the model's part and the next delimiter
    assert read([body[i : i + 1] for i in range(len(body))]) == (True, "whisper-1", head)  # a byte at a time


def test_a_closing_delimiter_split_from_its_dashes_still_ends_the_form() -> None:
    body = part("language", b"en") + b"--b0undary--\r\n"
    form = FormModel.of(CT)
    cut = len(body) - 4
    assert not form.enough(body[:cut])
    assert form.enough(body) and form.ended and form.model is None
