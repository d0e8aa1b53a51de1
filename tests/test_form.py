"""The broker's search for the model field of a multipart form (sans-IO, no processes)."""

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
