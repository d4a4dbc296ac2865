"""The Docker files parse, COPY files that exist, and run `kdcache` subcommands the CLI really has."""

from __future__ import annotations

import importlib
import json
import shlex
from pathlib import Path

import pytest
import yaml

from cache_server import cli

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        keyword, _, rest = full.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    assert not pending, f"{path}: dangling line continuation"
    return out


def exec_form(args: str) -> list[str]:
    return json.loads(args) if args.startswith("[") else shlex.split(args)


@pytest.mark.parametrize("name", ["Dockerfile.server", "Dockerfile.build"])
def test_dockerfile_copies_existing_files(name):
    instructions = dockerfile_instructions(DOCKER / name)
    assert instructions[0][0] == "FROM"
    copies = [args for kw, args in instructions if kw == "COPY" and "--from" not in args]
    assert copies
    for args in copies:
        parts = exec_form(args)
        for source in [p for p in parts[:-1] if not p.startswith("--")]:
            assert (REPO / source).exists(), f"{name} copies {source}, which is not in the build context"
    assert any(kw == "RUN" and "pip install" in args for kw, args in instructions)


def _entrypoint_and_cmd(name: str) -> tuple[list[str], list[str]]:
    instructions = dict(dockerfile_instructions(DOCKER / name))
    return exec_form(instructions["ENTRYPOINT"]), exec_form(instructions.get("CMD", "[]"))


def test_server_image_runs_kdcache_serve_with_a_token():
    entrypoint, cmd = _entrypoint_and_cmd("Dockerfile.server")
    assert entrypoint == ["kdcache", "serve"]
    assert "serve" in cli.SUBCOMMANDS
    args = cli.build_parser(entrypoint[1:] + cmd).parse_args(entrypoint[1:] + cmd)
    from cache_server.commands import serve

    assert args.func is serve.run
    # the image binds 0.0.0.0, which `kdcache serve` refuses without a token
    assert args.host == "0.0.0.0" and args.token_file is not None


def test_build_image_runs_kdcache_build():
    entrypoint, _ = _entrypoint_and_cmd("Dockerfile.build")
    assert entrypoint == ["kdcache", "build"]
    assert "build" in cli.SUBCOMMANDS
    assert "nvidia/cuda" in dict(dockerfile_instructions(DOCKER / "Dockerfile.build"))["FROM"]


def test_compose_wires_build_volume_to_server():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    for service in ("build", "server"):
        build = services[service]["build"]
        assert (DOCKER / build["context"] / build["dockerfile"]).is_file()
    server_volumes = services["server"]["volumes"]
    build_volumes = services["build"]["volumes"]
    assert "caches:/caches:ro" in server_volumes and "caches:/caches" in build_volumes
    assert "caches" in compose["volumes"]
    assert services["server"]["depends_on"]["build"]["condition"] == "service_completed_successfully"
    # the server's command parses as `kdcache serve ...` and points at the cache the build writes
    command = ["serve"] + services["server"]["command"]
    args = cli.build_parser(command).parse_args(command)
    build_command = services["build"]["command"]
    out_dir = build_command[build_command.index("--out") + 1]
    assert args.caches == [out_dir]
    assert args.token_file == Path("/run/secrets/kdcache_token")
    assert "kdcache_token" in services["server"]["secrets"] and "kdcache_token" in compose["secrets"]
    assert all(port.startswith("127.0.0.1:") for port in services["server"]["ports"])
    try:
        importlib.import_module("cache_server.commands.build")
    except ImportError:
        pytest.skip("cache_server.commands.build is not importable here: build arguments not checked")
    parsed = cli.build_parser(["build"] + build_command).parse_args(["build"] + build_command)
    assert parsed.func is not None
