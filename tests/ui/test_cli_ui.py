"""`kinema ui`: usage refused before anything heavy loads, no gradio or torch behind `kinema --help`, and (slow) the
command serving the page until it is stopped."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from test_browser import free_port

from kinema.cli import main


def test_bad_usage_exits_2_with_one_line(tmp_path, capsys):
    missing = tmp_path / "missing"
    assert main(["ui", "--models-dir", str(missing)]) == 2
    assert capsys.readouterr().err.strip() == (f"kinema ui: error: --models-dir {missing} is missing; give the folder "
                                               "holding your models (or leave it out for the bundled ones)")
    (tmp_path / "file").write_text("")
    assert main(["ui", "--outputs-dir", str(tmp_path / "file")]) == 2
    assert "is a file; give a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as bad_port:
        main(["ui", "--port", "70000"])
    assert bad_port.value.code == 2


def test_the_cli_and_the_ui_package_import_no_gradio_or_torch():
    code = ("import json, sys, kinema.cli, kinema.cli.ui, kinema.ui, kinema.ui.form, kinema.ui.gallery; "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('gradio', 'torch'))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(done.stdout) == []


@pytest.mark.slow
def test_kinema_ui_serves_the_page_until_stopped(tmp_path):
    port = free_port()
    command = [sys.executable, "-m", "kinema", "ui", "--port", str(port), "--outputs-dir", str(tmp_path / "out")]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=5) as response:
                    config = json.load(response)
                break
            except OSError:
                assert server.poll() is None, server.communicate()[0]
                assert time.monotonic() < deadline, "kinema ui did not answer within 240 s"
                time.sleep(1)
        assert config["title"] == "kinema"
        assert (tmp_path / "out").is_dir()
    finally:
        server.send_signal(signal.SIGINT)
        try:
            output = server.communicate(timeout=60)[0]
        except subprocess.TimeoutExpired:
            server.kill()
            output = server.communicate()[0]
    assert server.returncode in (0, 130), output


def test_a_port_taken_while_the_app_starts_is_one_line_naming_port(tmp_path, monkeypatch, capsys):
    """gradio binds the port itself, after `kinema ui` checked it: a port taken in between (here, while the app is
    built) gives kinema's line about --port, not gradio's about GRADIO_SERVER_PORT."""
    import socket

    import kinema.ui.app as app_module

    port = free_port()
    rival = socket.socket()
    build = app_module.build_app

    def build_then_lose_the_port(**kwargs):
        rival.bind(("127.0.0.1", port))
        rival.listen()
        return build(**kwargs)

    monkeypatch.setattr(app_module, "build_app", build_then_lose_the_port)
    try:
        assert main(["ui", "--port", str(port), "--outputs-dir", str(tmp_path / "out")]) == 1
    finally:
        rival.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"kinema ui: error: port {port} is in use on 127.0.0.1 (another server, or this one already "
                       "running?); stop it or choose another --port")
