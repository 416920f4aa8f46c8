"""`kinema serve`'s checks: no other host than loopback without an API key, data folders that are not the server's,
one server per data folder, and a --help that loads no web framework."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from kinema.api.store import lock_data_dir
from kinema.cli import main, serve
from kinema.cli.serve import is_loopback
from kinema.errors import KinemaError


def never_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    """A check that lets bad usage through must fail the test, not start a server that never returns."""
    def started(args: object) -> None:
        raise AssertionError("kinema serve started although its check should have refused")

    monkeypatch.setattr(serve, "run_serve", started)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "example.com", ""])
def test_any_host_but_loopback_is_refused_without_a_key(host, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("KINEMA_API_KEY", raising=False)
    never_serve(monkeypatch)
    assert main(["serve", "--host", host, "--data-dir", str(tmp_path / "data")]) == 2
    message = capsys.readouterr().err
    assert "needs an API key" in message and "--api-key" in message and "KINEMA_API_KEY" in message
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("127.8.0.1", True), ("::1", True),
                                                ("[::1]", True), ("localhost", True), ("0.0.0.0", False),
                                                ("10.0.0.1", False), ("example.com", False),
                                                ("::ffff:127.0.0.1", True), ("::ffff:10.0.0.1", False)])
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_the_key_can_come_from_the_environment(tmp_path, monkeypatch):
    from kinema.cli import build_parser

    monkeypatch.setenv("KINEMA_API_KEY", "from-env")
    args = build_parser().parse_args(["serve", "--host", "0.0.0.0", "--data-dir", str(tmp_path / "data")])
    args.check(args)  # no error: the key is set
    assert args.api_key == "from-env"
    args = build_parser().parse_args(["serve", "--host", "0.0.0.0", "--api-key", "flag", "--data-dir",
                                      str(tmp_path / "data")])
    args.check(args)
    assert args.api_key == "flag"  # the flag wins over the environment


def test_a_folder_of_the_users_is_not_a_data_folder(tmp_path, monkeypatch, capsys):
    never_serve(monkeypatch)
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["serve", "--data-dir", str(tmp_path)]) == 2
    assert "not a kinema serve data folder" in capsys.readouterr().err
    assert main(["serve", "--data-dir", str(tmp_path / "notes.txt")]) == 2
    assert main(["serve", "--data-dir", str(tmp_path / "new"), "--models-dir", str(tmp_path / "none")]) == 2
    assert "no models folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    # Named like a server's folder, but holding the user's files and no jobs database.
    (tmp_path / "mine" / "results").mkdir(parents=True)
    (tmp_path / "mine" / "results" / "notes.txt").write_text("mine")
    assert main(["serve", "--data-dir", str(tmp_path / "mine")]) == 2
    assert "not a kinema serve data folder's (such as results)" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["results"]


def test_an_earlier_servers_data_folder_is_taken_with_its_jobs(tmp_path, monkeypatch):
    # Its jobs table has no warnings column: the data folder is still a server's, and JobStore adds the column.
    import sqlite3

    from kinema.api.store import DATABASE, JobStore, check_data_dir

    with sqlite3.connect(tmp_path / DATABASE) as db:
        db.execute("CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, status TEXT "
                   "NOT NULL, created REAL NOT NULL, started REAL, finished REAL, spec TEXT NOT NULL, settings TEXT "
                   "NOT NULL, step INTEGER NOT NULL DEFAULT 0, total INTEGER NOT NULL DEFAULT 0, error TEXT, videos "
                   "TEXT NOT NULL DEFAULT '[]', cancel_requested INTEGER NOT NULL DEFAULT 0, attempts INTEGER NOT NULL "
                   "DEFAULT 0)")
    db.close()
    (tmp_path / "results").mkdir()
    assert check_data_dir(tmp_path) == tmp_path
    JobStore(tmp_path).close()


def test_a_users_database_named_like_the_servers_is_refused_untouched(tmp_path, monkeypatch, capsys):
    import hashlib
    import sqlite3

    from kinema.api.store import JobStore

    never_serve(monkeypatch)
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with sqlite3.connect(folder / "jobs.sqlite3") as db:  # the user's own, with a jobs table of other columns
        db.execute("CREATE TABLE jobs (name TEXT)")
    db.close()
    digest = hashlib.md5((folder / "jobs.sqlite3").read_bytes()).hexdigest()
    for content, words in ((None, "its jobs table has no id column"), (b"a text file", "not an SQLite database")):
        if content is not None:
            (folder / "jobs.sqlite3").write_bytes(content)
            digest = hashlib.md5(content).hexdigest()
        assert main(["serve", "--data-dir", str(folder)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"jobs.sqlite3 is not a kinema serve jobs database ({words})" in err, err
        assert sorted(p.name for p in folder.iterdir()) == ["jobs.sqlite3", "notes.txt"]
        assert hashlib.md5((folder / "jobs.sqlite3").read_bytes()).hexdigest() == digest
    JobStore(tmp_path / "served").close()  # a server's own folder is taken again
    lock_data_dir(tmp_path / "served").close()


def test_one_server_per_data_folder(tmp_path):
    first = lock_data_dir(tmp_path / "data")
    try:
        with pytest.raises(KinemaError, match="another kinema serve is using the data folder"):
            lock_data_dir(tmp_path / "data")
    finally:
        first.close()
    lock_data_dir(tmp_path / "data").close()  # free again once the first lets go


def test_serve_help_imports_no_web_framework_or_torch():
    code = ("import sys, json, contextlib, io\n"
            "from kinema.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try:\n"
            "        main(['serve', '--help'])\n"
            "    except SystemExit:\n"
            "        pass\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('fastapi', 'starlette', 'uvicorn', 'torch', 'pydantic'))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == []


def test_the_options_defaults_are_the_apps():
    from kinema.api.app import DEFAULT_MAX_UPLOAD_MB, JobLimits
    from kinema.cli import build_parser

    args = build_parser().parse_args(["serve"])
    assert args.max_upload_mb == DEFAULT_MAX_UPLOAD_MB
    assert (args.max_frames, args.max_side, args.max_steps) == (JobLimits().frames, JobLimits().side,
                                                                JobLimits().steps)


def test_a_port_in_use_is_one_line_before_anything_loads(tmp_path, capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for command in ("serve", "ui"):
            folder = ["--data-dir", str(tmp_path / "data")] if command == "serve" else []
            assert main([command, "--port", str(port), *folder]) == 1
            err = capsys.readouterr().err.strip().splitlines()
            assert err == [f"kinema {command}: error: port {port} is in use on 127.0.0.1 (another server, or this one "
                           "already running?); stop it or choose another --port"]
    assert not (tmp_path / "data").exists()


def test_serve_holds_its_port_from_the_check_until_uvicorn_serves_it(tmp_path, monkeypatch, capsys):
    # A port found free and bound only once the app had started could be taken in between.
    import socket

    import uvicorn

    import kinema.api.app as api_app

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    real_create_app = api_app.create_app

    def create_app(*args, **kwargs):
        devices.append(kwargs["device"])
        with socket.socket() as rival, pytest.raises(OSError):  # the port is taken while the app starts
            rival.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            rival.bind(("127.0.0.1", port))
        return real_create_app(*args, **kwargs)

    served, devices = [], []
    monkeypatch.setattr(api_app, "create_app", create_app)
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: served.extend(
        (self.config.port, sock.getsockname()[1]) for sock in sockets))
    assert main(["serve", "--port", str(port), "--data-dir", str(tmp_path / "data")]) == 0
    assert served == [(port, port)]
    # uvicorn says nothing of a socket it is handed: kinema names the address (the port --port 0 picked).
    assert f"kinema serve: listening on http://127.0.0.1:{port} (the API's page: http://127.0.0.1:{port}/docs)" in \
        capsys.readouterr().err
    assert devices == [torch.device("cuda" if torch.cuda.is_available() else "cpu")]  # --device auto, resolved
    with socket.socket() as after:  # given back when the server stops
        after.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        after.bind(("127.0.0.1", port))


def test_the_port_check_names_a_host_that_is_not_here():
    from kinema.cli.args import check_port_free

    check_port_free("127.0.0.1", 0)  # any free port
    with pytest.raises(KinemaError, match="--host 192.0.2.1 is not an address of this machine"):
        check_port_free("192.0.2.1", 8000)  # TEST-NET-1: never a local address
    with pytest.raises(KinemaError, match="--host nohost.invalid is not a host name"):
        check_port_free("nohost.invalid", 8000)


def test_an_empty_api_key_is_refused(tmp_path, monkeypatch, capsys):
    # "--api-key ''" (an unset shell variable, say) served without a key without a word.
    never_serve(monkeypatch)
    for key in ("", "  "):
        assert main(["serve", "--api-key", key, "--data-dir", str(tmp_path / "data")]) == 2
        assert "--api-key is empty" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()
