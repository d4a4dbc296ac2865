"""The `kdcache` command line as users meet it: real `python -m cache_server` subprocesses.

A traceback sweep runs every subcommand on bad input (missing and wrong paths, damaged manifests, a running
build, bad numbers for every numeric option, bad temperatures, bad token files, a port in use) and expects
exit status 2, no traceback, and the error on ONE line ``kdcache <command>: error: ...``. Then: --version,
help texts (plain text, with examples, no internal names), internal errors and Ctrl-C, what `info` prints
(the build command, which reruns as "nothing to do"), and `verify` naming damaged shards and decoded copies.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from cache_server import format as fmt
from tests.cachefactory import make_synthetic_cache

REPO = Path(__file__).resolve().parent.parent
ERROR_LINE_RE = re.compile(r"^kdcache( [a-z]+)?: error: \S")
CASE_TIMEOUT_S = 90
T = 9
V = 40


def kdcache(*args: str, env: dict | None = None, timeout_s: float = CASE_TIMEOUT_S, cwd: Path = REPO):
    """Run ``python -m cache_server ARGS``; a command still running after ``timeout_s`` is killed."""
    full_env = {k: v for k, v in os.environ.items() if k != "KDCACHE_DEBUG"}  # tracebacks off, as for users
    full_env.update(PYTHONPATH=str(REPO), **(env or {}))
    try:
        return subprocess.run([sys.executable, "-m", "cache_server", *args], capture_output=True, text=True,
                              env=full_env, timeout=timeout_s, cwd=cwd)
    except subprocess.TimeoutExpired as exc:
        return subprocess.CompletedProcess(exc.cmd, "timeout", exc.stdout or "", f"TIMEOUT after {timeout_s}s: "
                                           f"the command kept running instead of refusing its input\n")


# ------------------------------------------------------------------------------------------------ the bad inputs

_HOLD_LOCK = (  # holds the build lock of every directory named, as a running build does
    "import sys, time\n"
    "from cache_server.format.build_lock import acquire_build_lock\n"
    "locks = [acquire_build_lock(d) for d in sys.argv[1:]]\n"
    "print('locked', flush=True)\n"
    "time.sleep(600)\n"
)


def _write_manifest(directory: Path, manifest_raw: bytes) -> str:
    directory.mkdir(parents=True)
    (directory / fmt.MANIFEST_NAME).write_bytes(manifest_raw)
    return str(directory)


def _inputs(root: Path, cache: Path) -> dict[str, str]:
    """Every bad (and the few good) paths the cases use, by name."""
    raw = (cache / fmt.MANIFEST_NAME).read_bytes()
    manifest = json.loads(raw)
    paths = {"cache": str(cache), "missing": str(root / "missing"), "file": str(root / "file.txt"),
             "plain_dir": str(root / "plain"), "out": str(root / "outs")}
    (root / "file.txt").write_text("not a cache\n")
    (root / "plain").mkdir()
    (root / "plain" / "notes.txt").write_text("precious")
    paths["bad_json"] = _write_manifest(root / "bad_json", raw[: len(raw) // 2])
    paths["bad_version"] = _write_manifest(root / "bad_version", fmt.manifest_bytes({**manifest, "format_version": 99}))
    paths["bad_shards"] = _write_manifest(root / "bad_shards", fmt.manifest_bytes({**manifest, "shards": {}}))
    (root / "unfinished").mkdir()
    (root / "unfinished" / "zarr.json").write_text("{}")
    paths["unfinished"] = str(root / "unfinished")
    (root / "running").mkdir()
    paths["running"] = str(root / "running")
    shutil.copytree(cache, root / "running_cache")  # a finished cache that a build (a repair) is running on
    paths["running_cache"] = str(root / "running_cache")
    (root / "empty_token.txt").write_text("\n")
    (root / "spaced_token.txt").write_text("two words\n")
    paths.update(empty_token=str(root / "empty_token.txt"), spaced_token=str(root / "spaced_token.txt"))
    np.save(root / "ok.npy", np.random.default_rng(0).integers(0, V, size=5 * T))
    (root / "doc.txt").write_text("some text for a tokenizer\n")
    paths.update(ok_npy=str(root / "ok.npy"), doc_txt=str(root / "doc.txt"))
    return paths


_TOP = [
    ("top-no-command", [], "required"),
    ("top-unknown-command", ["frobnicate"], "invalid choice"),
    ("top-unknown-option", ["--frobnicate"], ""),
]

_CACHE_DIR_CASES = [  # (name, directory key, needle): the same for info, verify and serve
    ("missing-dir", "missing", "does not exist"),
    ("file-not-dir", "file", "is a file"),
    ("not-a-cache", "plain_dir", "not a kdcache cache"),
    ("damaged-manifest-json", "bad_json", "not valid JSON"),
    ("unknown-version", "bad_version", "format_version 99"),
    ("malformed-shard-table", "bad_shards", "malformed"),
    ("unfinished-build", "unfinished", "unfinished build: rerun the same kdcache build command to resume"),
    ("running-build", "running", "is running"),
    ("running-build-on-a-finished-cache", "running_cache", "is not opened: a `kdcache build` is running on it (pid"),
]

_INFO_VERIFY = [
    (f"{cmd}-{name}", [cmd, "{%s}" % key], needle)
    for cmd in ("info", "verify")
    for name, key, needle in _CACHE_DIR_CASES
] + [
    ("info-no-dir", ["info"], "required"),
    ("verify-no-dir", ["verify"], "required"),
    ("verify-decode-dir-without-value", ["verify", "{cache}", "--decode-dir"], "expected one argument"),
    ("verify-decode-dir-is-file", ["verify", "{cache}", "--decoded", "--decode-dir", "{file}"], "--decode-dir"),
]

_SERVE = [(f"serve-{name}", ["serve", "{%s}" % key], needle) for name, key, needle in _CACHE_DIR_CASES] + [
    ("serve-no-dir", ["serve"], "required"),
    ("serve-token-file-missing", ["serve", "{cache}", "--token-file", "{missing}"], "--token-file"),
    ("serve-token-file-empty", ["serve", "{cache}", "--token-file", "{empty_token}"], "empty"),
    ("serve-token-file-spaces", ["serve", "{cache}", "--token-file", "{spaced_token}"], "token"),
    ("serve-token-file-is-dir", ["serve", "{cache}", "--token-file", "{plain_dir}"], "--token-file"),
    ("serve-public-without-token", ["serve", "{cache}", "--host", "0.0.0.0"], "--token-file"),
    ("serve-bad-name", ["serve", "bad name={cache}"], "bad name"),
    ("serve-duplicate-name", ["serve", "a={cache}", "a={cache}"], "two caches are named 'a'"),
    ("serve-port-in-use", ["serve", "{cache}", "--port", "{busy_port}"], "port"),
] + [
    (f"serve-{option.lstrip('-')}-{label}", ["serve", "{cache}", option, value], option)
    for option, bad_values in [
        ("--port", ["-1", "70000", "abc"]),
        ("--max-rows", ["0", "abc"]),
        ("--max-response-bytes", ["0", "abc"]),
        ("--decoded-cache-bytes", ["-1", "abc"]),
        ("--limit-concurrency", ["1", "abc"]),
        ("--timeout-keep-alive", ["0", "abc"]),
    ]
    for label, value in ((v if v != "abc" else "not-a-number", v) for v in bad_values)
]

_BUILD_BASE = ["build", "--no-progress", "--teacher", "{teacher}", "--data", "{ok_npy}", "--topk", "4",
               "--seq-len", str(T)]


def _build(case: str, *extra: str, base: list[str] = _BUILD_BASE) -> list[str]:
    """A build command whose --out is this case's own (never created by a refused build)."""
    return [*base, "--out", "{out}/" + case, *extra]


def _replace(argv: list[str], option: str, value: str) -> list[str]:
    out = list(argv)
    out[out.index(option) + 1] = value
    return out


_BUILD = [
    ("build-no-args", ["build"], "required"),
    ("build-teacher-missing", _replace(_build("t1"), "--teacher", "{missing}"), "does not exist"),
    ("build-teacher-is-text-file", _replace(_build("t2"), "--teacher", "{file}"), "teacher"),
    ("build-teacher-plain-dir", _replace(_build("t3"), "--teacher", "{plain_dir}"), "safetensors"),
    ("build-data-missing", _replace(_build("d1"), "--data", "{missing}/tokens.npy"), "does not exist"),
    ("build-data-plain-dir", _replace(_build("d2"), "--data", "{plain_dir}"), "dataset"),
    ("build-tokenizer-missing", _build("d3", "--tokenizer", "{missing}"), "tokenizer"),
    ("build-text-without-tokenizer", _replace(_build("d4"), "--data", "{doc_txt}"), "--tokenizer"),
    ("build-out-is-file", _replace(_build("o1"), "--out", "{file}"), "--out"),
    ("build-out-foreign-dir", _replace(_build("o2"), "--out", "{plain_dir}"), "not a kdcache cache"),
    ("build-seq-len-0", _replace(_build("n1"), "--seq-len", "0"), "--seq-len"),
    ("build-seq-len-not-a-number", _replace(_build("n3"), "--seq-len", "x"), "--seq-len"),
    ("build-topk-0", _replace(_build("n4"), "--topk", "0"), "--topk"),
    ("build-topk-over-vocab", _replace(_build("n5"), "--topk", str(V + 1)), "--topk"),
    ("build-topk-not-a-number", _replace(_build("n6"), "--topk", "1.5"), "--topk"),
    ("build-batch-size-0", _build("n7", "--batch-size", "0"), "--batch-size"),
    ("build-shard-seqs-0", _build("n8", "--shard-seqs", "0"), "--shard-seqs"),
    ("build-chunk-seqs-negative", _build("n9", "--chunk-seqs", "-1"), "--chunk-seqs"),
    ("build-shard-not-multiple-of-chunk", _build("n10", "--shard-seqs", "3", "--chunk-seqs", "2"), "--chunk-seqs"),
    ("build-max-sequences-0", _build("n11", "--max-sequences", "0"), "--max-sequences"),
    ("build-rank-negative", _build("n12", "--rank", "-1"), "--rank"),
    ("build-world-size-0", _build("n13", "--world-size", "0"), "--world-size"),
    ("build-rank-not-below-world-size", _build("n14", "--rank", "2", "--world-size", "2"), "--rank"),
    ("build-batch-size-not-a-number", _build("n15", "--batch-size", "many"), "--batch-size"),
    ("build-temperatures-words", _build("m1", "--temperatures", "a,b"), "--temperatures"),
    ("build-temperatures-zero", _build("m2", "--temperatures", "0"), "temperature"),
    ("build-temperatures-negative", _build("m3", "--temperatures", "2,-1"), "temperature"),
    ("build-temperatures-nan", _build("m4", "--temperatures", "nan"), "temperature"),
    ("build-device-bogus", _build("m6", "--device", "bogus"), "--device"),
]

CASES = {name: (argv, needle) for name, argv, needle in _TOP + _INFO_VERIFY + _SERVE + _BUILD}
assert len(CASES) == len(_TOP + _INFO_VERIFY + _SERVE + _BUILD), "case names must be unique"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Inputs for every case, a build lock held by a live process, a bound port, and a tiny teacher."""
    from tests.teachers import make_llama_teacher

    root = tmp_path_factory.mktemp("cli")
    cache, _ = make_synthetic_cache(root / "cache", num_sequences=6, seq_len=5, topk=3, vocab_size=20,
                                    shard_seqs=4, chunk_seqs=2)
    paths = _inputs(root, cache)
    paths["teacher"] = str(make_llama_teacher(root / "teacher", V, hidden_size=16, num_layers=1, seed=3))
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, paths["running"], paths["running_cache"]],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if holder.stdout.readline().strip() != "locked":
            raise RuntimeError("the build-lock holder did not start")
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        paths["busy_port"] = str(busy.getsockname()[1])
        yield paths
    finally:
        busy.close()
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()


@pytest.fixture(scope="module")
def sweep(world, request):
    """The result of every selected case, run three at a time (each is a separate interpreter)."""
    # Only this module's sweep items: other test files also have parameters named "case".
    selected = [item.callspec.params["case"] for item in request.session.items
                if getattr(item, "originalname", None) == "test_bad_input_is_one_error_line_without_traceback"
                and item.module is request.module]

    def run(name):
        argv, _ = CASES[name]
        return name, kdcache(*(a.format(**world) for a in argv))

    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(pool.map(run, selected))


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_error_line_without_traceback(sweep, world, case):
    result = sweep[case]
    _, needle = CASES[case]
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    assert result.returncode == 2, f"exit status {result.returncode}, expected 2 (bad input):\n{output}"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    error_lines = [line for line in lines if ERROR_LINE_RE.match(line)]
    assert len(error_lines) == 1 and lines[-1] == error_lines[0], f"expected one error line, last:\n{output}"
    command = case.split("-")[0]
    if command != "top":
        assert error_lines[0].startswith(f"kdcache {command}: error: "), error_lines[0]
    assert needle.lower() in error_lines[0].lower(), f"{needle!r} not in {error_lines[0]!r}"
    if command == "build":
        assert not (Path(world["out"]) / case).exists(), "a refused build must not create its output directory"
    assert Path(world["plain_dir"], "notes.txt").read_text() == "precious"
    assert sorted(p.name for p in Path(world["plain_dir"]).iterdir()) == ["notes.txt"]


def test_running_build_is_named_and_a_killed_one_says_resume(world, tmp_path):
    result = kdcache("info", world["running"])
    assert result.returncode == 2 and "a `kdcache build` is running on it (pid " in result.stderr, result.stderr
    assert "wait for that build to finish" in result.stderr
    directory = tmp_path / "killed"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(directory)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    assert holder.stdout.readline().strip() == "locked"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    holder.stdout.close()
    for command in ("info", "verify"):
        result = kdcache(command, str(directory))
        assert result.returncode == 2, result.stderr
        assert "unfinished build: rerun the same kdcache build command to resume" in result.stderr


def test_a_finished_cache_is_refused_while_a_build_runs_on_it_and_opens_after(world, tmp_path):
    """A build (e.g. a repair) may be rewriting a finished cache's shards: open_cache, info, verify and serve
    name the build instead of reading it (the sweep above checks the CLI); once it is gone, all read it."""
    import kdlib

    with pytest.raises(fmt.CacheError, match=r"is not opened: a `kdcache build` is running on it \(pid \d+ ") as info:
        kdlib.open_cache(world["running_cache"], decode_dir=tmp_path / "decoded")
    assert "wait for that build to finish" in str(info.value)
    cache = tmp_path / "cache"
    shutil.copytree(world["cache"], cache)
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(cache)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(fmt.CacheError, match=f"a `kdcache build` is running on it \\(pid {holder.pid} "):
            kdlib.open_cache(cache, decode_dir=tmp_path / "decoded")
        result = kdcache("info", str(cache))
        assert result.returncode == 2 and f"is running on it (pid {holder.pid} " in result.stderr, result.stderr
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()
    with kdlib.open_cache(cache, decode_dir=tmp_path / "decoded", readahead=0) as reader:
        assert reader.read(0, 2)["topk_ids"].shape[0] == 2
    assert kdcache("info", str(cache)).returncode == 0


# ------------------------------------------------------------------------------------------------ version, help


def test_version():
    result = kdcache("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"kdcache {importlib.metadata.version('kdcache')}\n"


@pytest.mark.parametrize("command", ["", "build", "info", "verify", "serve", "merge", "import", "export"])
def test_help_is_plain_text_with_examples(command):
    result = kdcache(*([command] if command else []), "--help")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert text.startswith(f"usage: kdcache {command}".rstrip()), text
    for markup in ("::", "``", "`", "plan_chunking", "cache_server.", ":func:", ":class:"):
        assert markup not in text, f"{markup!r} in the help of kdcache {command}:\n{text}"
    assert "examples:" in text and f"kdcache {command}".rstrip() + " " in text.split("examples:", 1)[1], text
    if not command:
        for name in ("build", "info", "verify", "serve", "merge", "import", "export"):
            assert re.search(rf"^\s+{name}\s+\S", text, re.M), f"{name} missing from kdcache --help:\n{text}"


# ------------------------------------------------------------------------------------------------ central handling

_FAKE_COMMAND = '''\
import argparse


def user_errors():
    return (ValueError,)


def run(args):
    if args.what == "user":
        raise ValueError("the input is wrong\\nin two lines")
    if args.what == "interrupt":
        raise KeyboardInterrupt
    raise RuntimeError("a bug")


def register(subparsers):
    parser = subparsers.add_parser("crash", help="raises")
    parser.add_argument("what")
    parser.set_defaults(func=run, user_errors=user_errors)
'''


@pytest.mark.parametrize(
    "what,debug,status,expected",
    [
        ("user", False, 2, "kdcache crash: error: the input is wrong in two lines"),
        ("bug", False, 1, "kdcache crash: internal error: RuntimeError: a bug (set KDCACHE_DEBUG=1 for the "
                          "traceback, and please report it)"),
        ("bug", True, 1, "RuntimeError: a bug"),
        ("interrupt", False, 130, "kdcache crash: interrupted"),
    ],
)
def test_main_turns_exceptions_into_one_line_and_an_exit_status(tmp_path, what, debug, status, expected):
    """A real subcommand module (written here) registered the way the CLI's own four are."""
    (tmp_path / "crashcmd.py").write_text(_FAKE_COMMAND)
    code = ("import sys; import cache_server.cli as cli; cli.SUBCOMMANDS['crash'] = 'crashcmd'; "
            "sys.exit(cli.main(sys.argv[1:]))")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}
    env.pop("KDCACHE_DEBUG", None)
    if debug:
        env["KDCACHE_DEBUG"] = "1"
    result = subprocess.run([sys.executable, "-c", code, "crash", what], capture_output=True, text=True, env=env,
                            timeout=CASE_TIMEOUT_S)
    assert result.returncode == status, result.stderr
    if debug:
        assert "Traceback" in result.stderr and result.stderr.rstrip().endswith(expected)
    else:
        assert result.stderr == expected + "\n"


# ------------------------------------------------------------------------------------------------ info and verify


@pytest.fixture(scope="module")
def built(world, tmp_path_factory):
    """A cache made by a real `kdcache build` (tiny teacher, extra temperature, explicit dtype)."""
    out = tmp_path_factory.mktemp("built") / "cache"
    result = kdcache("build", "--no-progress", "--teacher", world["teacher"], "--data", world["ok_npy"],
                     "--topk", "4", "--seq-len", str(T), "--temperatures", "2", "--logprob-dtype", "float32",
                     "--shard-seqs", "2", "--chunk-seqs", "1", "--out", str(out), timeout_s=300)
    assert result.returncode == 0, result.stderr
    return out


def test_info_prints_the_build_command_and_rerunning_it_is_a_no_op(built):
    result = kdcache("info", str(built))
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(None, 1) if " " in line else (line, "") for line in result.stdout.splitlines())
    assert "5 x 9 = 45 tokens" in result.stdout and "1, 2" in lines["temperatures"]
    command_line = next(line for line in result.stdout.splitlines() if line.startswith("build command"))
    argv = shlex.split(command_line.split(None, 2)[2])
    assert argv[:2] == ["kdcache", "build"] and argv[argv.index("--out") + 1] == str(built)
    assert argv[argv.index("--temperatures") + 1] == "2" and "--logprob-dtype" in argv
    before = {p: p.read_bytes() for p in built.rglob("*") if p.is_file()}
    again = kdcache(*argv[1:], "--no-progress", timeout_s=300)
    assert again.returncode == 0, again.stderr
    assert "nothing to do" in again.stdout + again.stderr, again.stdout + again.stderr
    assert {p: p.read_bytes() for p in built.rglob("*") if p.is_file()} == before
    as_json = json.loads(kdcache("info", str(built), "--json").stdout)
    assert shlex.split(as_json["build_command"]) == argv and as_json["summary"]["tokens"] == 45


def test_verify_names_each_damaged_and_missing_shard_and_the_repair(world, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(world["cache"], cache)
    ok = kdcache("verify", str(cache), "--no-progress")
    assert ok.returncode == 0 and " OK (" in ok.stdout, ok.stderr
    path = cache / fmt.shard_relpath("topk_ids", 1, 3)
    data = bytearray(path.read_bytes())
    data[5] ^= 0xFF
    path.write_bytes(bytes(data))
    (cache / fmt.shard_relpath("lse", 0, 2)).unlink()
    result = kdcache("verify", str(cache), "--no-progress")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert f"array 'topk_ids' shard 1 ({path}): sha256" in result.stderr
    assert "array 'lse' shard 0" in result.stderr and "missing" in result.stderr
    assert "rerun the same `kdcache build` command you built the cache with" in result.stderr
    quick = kdcache("verify", str(cache), "--quick", "--no-progress")
    assert quick.returncode == 1 and "'topk_ids' shard 1" in quick.stderr


def test_verify_decoded_names_each_damaged_decoded_copy(world, tmp_path):
    import kdlib
    from cache_server.format import decoded

    decode_root = tmp_path / "decoded"
    empty = kdcache("verify", world["cache"], "--decode-dir", str(decode_root), "--no-progress")
    assert empty.returncode == 0, empty.stderr  # nothing decoded yet: nothing damaged
    with kdlib.open_cache(world["cache"], decode_dir=decode_root, readahead=0) as cache:
        cache.read(0, 6)
    ok = kdcache("verify", world["cache"], "--decoded", "--decode-dir", str(decode_root), "--no-progress")
    assert ok.returncode == 0 and f"every decoded copy under {decode_root}" in ok.stdout, ok.stderr
    raw = (Path(world["cache"]) / fmt.MANIFEST_NAME).read_bytes()
    copy = decoded.decoded_shard_path(decoded.decoded_cache_dir(decode_root, raw), "topk_logprobs", 1)
    data = bytearray(copy.read_bytes())
    data[-3] ^= 0xFF
    copy.write_bytes(bytes(data))
    result = kdcache("verify", world["cache"], "--decoded", "--decode-dir", str(decode_root), "--no-progress")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert "decoded copy of 'topk_logprobs' shard 1" in result.stderr and str(copy) in result.stderr, result.stderr
    assert "'topk_logprobs' shard 0" not in result.stderr  # stored shards are intact; only the copy is named
