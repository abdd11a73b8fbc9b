import subprocess
import sys


def run(*args):
    return subprocess.run([sys.executable, "-m", "fastattr", *args], capture_output=True, text=True, timeout=120)


def test_info_runs_the_self_test():
    r = run("info")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "grad_dot         cpu: yes" in r.stdout
    assert "self-test: passed" in r.stdout
    assert r.stdout.count("PASS") >= 9


def test_help_and_unknown_command():
    r = run("--help")
    assert r.returncode == 0 and "train" in r.stdout and "info" in r.stdout
    r = run("frobnicate")
    assert r.returncode == 2 and "unknown command" in r.stderr
    r = run()
    assert r.returncode == 2 and "train" in r.stderr and not r.stdout
