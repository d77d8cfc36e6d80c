"""Run test functions in a Python process with AddressSanitizer and UndefinedBehaviorSanitizer.

The pytest process cannot load ASan-built code (ASan's runtime must be the first library loaded),
so a test sends ``(its module's file, a function name, keyword arguments)`` to a worker process
started with the sanitizer runtimes preloaded (``build.sanitizer_env("asan")``), which imports
the module there, calls the function and sends back its result or its traceback. Calls run one
after another in one worker. A sanitizer report or a simt abort ends the worker: that call fails
with the report, and the next call starts a fresh worker.
"""

from __future__ import annotations

import importlib.util
import pickle
import socket
import subprocess
import sys
import tempfile
import traceback
from multiprocessing.connection import Connection
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent


class Worker:
    def __init__(self, module_path: Path, env: dict[str, str], timeout: float = 900.0):
        self.env = {**env, "FUSEDLOSS_SIMT_MODULE": str(module_path)}
        self.timeout = timeout
        self.process: subprocess.Popen | None = None

    def _start(self) -> None:
        parent, child = socket.socketpair()
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen([sys.executable, __file__, str(child.fileno())], pass_fds=[child.fileno()],
                                        env=self.env, stdout=self.log, stderr=subprocess.STDOUT, cwd=TESTS.parent)
        child.close()
        self.connection = Connection(parent.detach())

    def _report(self) -> str:
        self.log.seek(0)
        return self.log.read()[-12000:].decode(errors="replace")

    def call(self, function, **kwargs):
        """function(**kwargs) in the worker; raises AssertionError with its traceback or the crash report."""
        __tracebackhide__ = True
        if self.process is None or self.process.poll() is not None:
            self._start()
        module_file = Path(sys.modules[function.__module__].__file__).resolve()
        self.connection.send((str(module_file), function.__name__, kwargs))
        try:
            if not self.connection.poll(self.timeout):
                self.close()
                raise AssertionError(f"simt worker: no answer after {self.timeout:.0f} s\n{self._report()}")
            status, value = self.connection.recv()
        except (EOFError, OSError):
            code = self.process.wait()
            report = self._report()
            self.process = None
            raise AssertionError(f"simt worker died (exit code {code}) in {function.__name__}({kwargs}):\n"
                                 f"{report}") from None
        if status == "error":
            raise AssertionError(value)
        return value

    def close(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


def _serve(fd: int) -> None:
    sys.path.insert(0, str(TESTS))
    connection = Connection(fd)
    modules = {}
    while True:
        try:
            path, name, kwargs = connection.recv()
        except EOFError:
            return
        try:
            if path not in modules:
                spec = importlib.util.spec_from_file_location(Path(path).stem, path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[spec.name] = module
                spec.loader.exec_module(module)
                modules[path] = module
            value = getattr(modules[path], name)(**kwargs)
            pickle.dumps(value)
            connection.send(("ok", value))
        except BaseException as e:  # noqa: BLE001 - every failure goes back to the test
            connection.send(("error", "".join(traceback.format_exception(e))))


if __name__ == "__main__":
    _serve(int(sys.argv[1]))
