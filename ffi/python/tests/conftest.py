"""A `meridian dev` deployment for the SDK's tests, started once per run."""

import os
import pathlib
import signal
import subprocess
import tempfile
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[3]


def meridian_bin() -> pathlib.Path:
    path = pathlib.Path(os.environ.get("MERIDIAN_BIN", ROOT / "target" / "debug" / "meridian"))
    if not path.exists():
        pytest.fail(
            f"{path} does not exist: build it with `cargo build -p meridian-cli` "
            "(or set MERIDIAN_BIN), or run everything with scripts/test",
            pytrace=False,
        )
    return path


class Dev:
    """A running `meridian dev` and what its clients need."""

    def __init__(self, data_dir: pathlib.Path, process: subprocess.Popen):
        self.data_dir = data_dir
        self.process = process
        self.config = str(data_dir / "client.toml")
        self.bin = str(meridian_bin())

    def cli(self, *args: str, timeout: float = 60) -> str:
        """Runs `meridian <args>` and returns its standard output."""
        done = subprocess.run(
            [self.bin, *args], capture_output=True, text=True, timeout=timeout
        )
        if done.returncode != 0:
            raise AssertionError(f"meridian {' '.join(args)} failed: {done.stderr}")
        return done.stdout


@pytest.fixture(scope="session")
def dev():
    binary = meridian_bin()
    data_dir = pathlib.Path(tempfile.mkdtemp(prefix="meridian-py-"))
    log = open(data_dir / "dev.out", "w")
    process = subprocess.Popen(
        [str(binary), "dev", "--data-dir", str(data_dir), "--nodes", "2"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while "is running" not in (data_dir / "dev.out").read_text():
            if process.poll() is not None:
                pytest.fail(
                    f"meridian dev exited: {(data_dir / 'dev.out').read_text()}", pytrace=False
                )
            if time.monotonic() > deadline:
                pytest.fail("meridian dev did not start within 120 s", pytrace=False)
            time.sleep(0.2)
        yield Dev(data_dir, process)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.close()
