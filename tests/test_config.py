"""Config: the example loads and is complete; every error names the file, line and field."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from agent import config as config_module
from agent.config import AgentConfig, load_config
from agent.config_errors import TomlLocator
from runtimes.errors import ConfigError, EdgeAgentError

tomllib = config_module.tomllib  # tomli on Python 3.10

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "systemd" / "agent.example.toml"

MINIMAL = """\
[device]
id = "dev-1"

[mqtt]
host = "broker.local"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(textwrap.dedent(text))
    return path


def error_of(tmp_path: Path, text: str, **kwargs: Any) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, **kwargs)
    assert isinstance(info.value, EdgeAgentError)
    return str(info.value)


def line_of(text: str, needle: str) -> int:
    lines = textwrap.dedent(text).splitlines()
    return next(n for n, line in enumerate(lines, 1) if needle in line)


def models() -> list[type[BaseModel]]:
    return [
        obj
        for obj in vars(config_module).values()
        if isinstance(obj, type) and issubclass(obj, BaseModel) and obj.__module__ == "agent.config"
    ]


def test_example_loads() -> None:
    config = load_config(EXAMPLE, check_files=False)
    assert config.device.id == "cam-entrance-01"
    assert [p.name for p in config.pipelines] == ["entrance", "yard"]
    tflite, onnx = (p.runtime for p in config.pipelines)
    assert tflite is not None and tflite.type == "tflite"
    assert tflite.runtime_options().delegates[0].kind == "edgetpu"
    assert onnx is not None and onnx.type == "onnx"
    assert onnx.runtime_options().providers == ("CUDAExecutionProvider", "CPUExecutionProvider")


def test_example_documents_every_field() -> None:
    """Each field of each section appears as a key in the example (so it stays complete)."""
    keys: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            keys.update(node)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    text = EXAMPLE.read_text()
    walk(tomllib.loads(text))
    commented = {line.lstrip("# ").split(" =")[0] for line in text.splitlines() if " = " in line}
    for model in models():
        for name in model.model_fields:
            assert name in keys | commented, f"{model.__name__}.{name} missing from the example"


def test_every_model_is_closed_and_every_field_described() -> None:
    for model in models():
        assert model.model_config.get("extra") == "forbid", model.__name__
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"


def test_defaults_derive_from_the_device(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL))
    assert config.client_id == "dev-1"
    assert config.outbox_path == Path("/var/lib/edge-agent/outbox.db")
    assert config.mqtt.port == 1883 and config.mqtt.tls is None
    assert config.pipelines == []
    tls = load_config(write(tmp_path, MINIMAL + "[mqtt.tls]\n"), check_files=False)
    assert tls.mqtt.port == 8883


def test_unknown_key_names_key_line_and_suggestion(tmp_path: Path) -> None:
    text = MINIMAL + 'hots = "x"\n'
    message = error_of(tmp_path, text)
    assert f"agent.toml:{line_of(text, 'hots')}: mqtt.hots: unknown key 'hots'" in message
    assert "did you mean 'host'?" in message


def test_unknown_section(tmp_path: Path) -> None:
    text = MINIMAL + "\n[camera]\nfps = 5\n"
    message = error_of(tmp_path, text)
    assert f"agent.toml:{line_of(text, '[camera]')}: camera: unknown key 'camera'" in message


PIPELINES = (
    MINIMAL
    + """
[[pipelines]]
name = "a"
source = "/dev/video0"
model = "yolox-nano"

[[pipelines]]
name = "b"
source = \"\"\"rtspsrc location=rtsp://cam
conf = 7
\"\"\"
model = "m"
conf = 1.5   # out of range

[pipelines.runtime]
type = "onnx"
threads = "two"
provider = ["CPUExecutionProvider"]
"""
)


def test_errors_in_the_second_pipeline_point_at_their_lines(tmp_path: Path) -> None:
    message = error_of(tmp_path, PIPELINES)
    assert f"agent.toml:{line_of(PIPELINES, 'conf = 1.5')}: pipelines[1].conf:" in message
    assert "less than or equal to 1" in message
    threads = line_of(PIPELINES, 'threads = "two"')
    assert f"agent.toml:{threads}: pipelines[1].runtime.threads:" in message
    provider = line_of(PIPELINES, "provider =")
    assert f"agent.toml:{provider}: pipelines[1].runtime.provider: unknown key" in message
    assert "did you mean 'providers'?" in message
    assert message.startswith("invalid config ") and "(3 problems)" in message


def test_missing_key_points_at_its_table(tmp_path: Path) -> None:
    text = MINIMAL + '\n[[pipelines]]\nname = "a"\nsource = "s"\n'
    message = error_of(tmp_path, text)
    line = line_of(text, "[[pipelines]]")
    assert f"agent.toml:{line}: pipelines[0].model: required key 'model' is missing" in message


def test_missing_section(tmp_path: Path) -> None:
    message = error_of(tmp_path, '[device]\nid = "d"\n')
    assert "agent.toml:1: mqtt: required key 'mqtt' is missing" in message


def test_bad_runtime_type(tmp_path: Path) -> None:
    text = MINIMAL + '[[pipelines]]\nname = "a"\nsource = "s"\nmodel = "m"\n'
    text += 'runtime = { type = "tensorrt" }\n'
    message = error_of(tmp_path, text)
    line = line_of(text, "tensorrt")
    assert f"agent.toml:{line}: pipelines[0].runtime: Input tag 'tensorrt'" in message
    assert "'tflite', 'onnx'" in message


def test_duplicate_pipeline_names(tmp_path: Path) -> None:
    one = '[[pipelines]]\nname = "cam"\nsource = "s"\nmodel = "m"\n'
    text = MINIMAL + one + one
    message = error_of(tmp_path, text)
    second = [n for n, line in enumerate(text.splitlines(), 1) if line == 'name = "cam"'][1]
    assert f"agent.toml:{second}: pipelines[1].name: pipeline name 'cam' is taken" in message


def test_toml_syntax_error_has_line_and_column(tmp_path: Path) -> None:
    message = error_of(tmp_path, MINIMAL + "port = \n")
    assert message.startswith(f"{tmp_path / 'agent.toml'}:6:8: TOML syntax error: Invalid value")


def test_duplicate_key_is_a_syntax_error(tmp_path: Path) -> None:
    message = error_of(tmp_path, MINIMAL + 'host = "again"\n')
    assert "agent.toml:6:" in message and "TOML syntax error" in message


def test_unreadable_and_non_utf8_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.toml")
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[device]\nid = "caf\xe9"\n')
    with pytest.raises(ConfigError, match=r"latin1.toml:2: the config file is not UTF-8"):
        load_config(path)


def test_one_password_source_and_a_username(tmp_path: Path) -> None:
    text = MINIMAL + 'username = "u"\npassword_env = "A"\npassword_file = "/run/x"\n'
    message = error_of(tmp_path, text)
    line = line_of(text, "password_env")
    assert f"agent.toml:{line}: mqtt.password_env: give only one of" in message
    text = MINIMAL + 'password_env = "A"\n'
    assert "mqtt.password_env: a password needs a username" in error_of(tmp_path, text)


def test_password_env_and_file_are_checked_at_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = MINIMAL + 'username = "u"\npassword_env = "EDGE_TEST_PW"\n'
    monkeypatch.delenv("EDGE_TEST_PW", raising=False)
    message = error_of(tmp_path, text)
    line = line_of(text, "password_env")
    assert f"agent.toml:{line}: mqtt.password_env: environment variable EDGE_TEST_PW" in message
    monkeypatch.setenv("EDGE_TEST_PW", "pw")
    assert load_config(write(tmp_path, text)).mqtt.resolve_password() == "pw"

    secret = tmp_path / "secret"
    text = MINIMAL + f'username = "u"\npassword_file = "{secret}"\n'
    assert "mqtt.password_file: cannot read" in error_of(tmp_path, text)
    secret.write_text("from-file\n")
    config = load_config(write(tmp_path, text))
    assert config.mqtt.resolve_password() == "from-file"
    assert "from-file" not in repr(config)


def test_inline_password_is_not_printed(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL + 'username = "u"\npassword = "hunter2"\n'))
    assert config.mqtt.resolve_password() == "hunter2"
    assert "hunter2" not in repr(config) and "hunter2" not in str(config.model_dump())


def test_tls_cert_needs_key_and_files_must_exist(tmp_path: Path) -> None:
    text = MINIMAL + '[mqtt.tls]\ncert_file = "/etc/x.pem"\n'
    message = error_of(tmp_path, text)
    line = line_of(text, "[mqtt.tls]")
    assert f"agent.toml:{line}: mqtt.tls.key_file: cert_file and key_file" in message
    text = MINIMAL + f'[mqtt.tls]\nca_file = "{tmp_path / "nope.pem"}"\n'
    message = error_of(tmp_path, text)
    assert f"agent.toml:{line_of(text, 'ca_file')}: mqtt.tls.ca_file:" in message
    assert "does not exist" in message
    load_config(write(tmp_path, text), check_files=False)


def test_external_delegate_needs_library(tmp_path: Path) -> None:
    text = MINIMAL + textwrap.dedent(
        """
        [[pipelines]]
        name = "a"
        source = "s"
        model = "m"
        [pipelines.runtime]
        type = "tflite"
        [[pipelines.runtime.delegates]]
        kind = "gpu"
        [[pipelines.runtime.delegates]]
        kind = "external"
        """
    )
    message = error_of(tmp_path, text)
    line = line_of(text, 'kind = "external"') - 1
    assert f"agent.toml:{line}: pipelines[0].runtime.delegates[1].library:" in message


def test_locator_handles_toml_shapes() -> None:
    text = textwrap.dedent(
        '''\
        top = 1
        multi = """
        fake = 2
        """
        arr = [
          "a", # comment with = sign
          "b",
        ]
        [a.b]
        "quoted.key" = 3
        dotted.inner = 4
        inline = { x = 1, y = [1, 2] }
        [[list]]
        v = 1
        [[list]]
        v = 2
        [[list.sub]]
        w = 3
        [[list.sub]]
        w = 4
        '''
    )
    tomllib.loads(text)  # valid TOML
    loc = TomlLocator(text)
    assert loc.line_of(("top",)) == 1
    assert loc.line_of(("fake",)) == 1  # not a key: inside a string; falls back to line 1
    assert loc.line_of(("arr", 1)) == 5
    assert loc.line_of(("a", "b")) == 9
    assert loc.line_of(("a", "b", "quoted.key")) == 10
    assert loc.line_of(("a", "b", "dotted", "inner")) == 11
    assert loc.line_of(("a", "b", "inline", "y", 0)) == 12
    assert loc.line_of(("list", 0, "v")) == 14
    assert loc.line_of(("list", 1, "v")) == 16
    assert loc.line_of(("list", 1, "sub", 1, "w")) == 20
    assert loc.line_of(("list", 1, "missing")) == 15


def test_locator_finds_every_key_of_the_example() -> None:
    text = EXAMPLE.read_text()
    lines = text.splitlines()
    locator = TomlLocator(text)

    def walk(node: Any, loc: tuple[str | int, ...]) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                line = lines[locator.line_of((*loc, key)) - 1]
                assert key in line and not line.lstrip().startswith("#"), (loc, key, line)
                walk(value, (*loc, key))
        elif isinstance(node, list) and node and isinstance(node[0], dict):
            for index, value in enumerate(node):
                walk(value, (*loc, index))

    walk(tomllib.loads(text), ())
    second = lines[locator.line_of(("pipelines", 1, "runtime", "providers")) - 1]
    assert second.startswith("providers = [")


def test_config_is_immutable(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL))
    with pytest.raises(ValidationError, match="frozen"):
        config.device.id = "other"
    assert isinstance(config, AgentConfig)
