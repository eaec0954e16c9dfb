"""A warm Python process for local runs: jobs fork from it instead of starting Python and importing torch.

Each job of a run is ``python -m emlab <command> ...``. On a laptop a job pays 3-5 s to start Python and import
torch, transformers, peft and trl before it does anything, which was a third of the default run's job-seconds.
For a local run, the workflow starts one worker (``onstart`` in the Snakefile) that imports those libraries once
and then waits on a Unix socket. A job's ``python -m emlab`` finds the worker through ``EMLAB_WORKER`` and hands
it its command line, working directory, environment, umask and standard streams; the worker forks a child that
runs the command exactly as the job's own process would have, and the job exits with the child's status.

What makes the child equal to a fresh process: it takes the job's cwd, umask, environment and stdin/stdout/stderr;
its random generators are reseeded as a new interpreter's are (torch's to its fixed default seed); torch and BLAS
use the job's thread count (``OMP_NUM_THREADS``, set per job by Snakemake), since the thread pools read it when
they load; the worker itself runs no torch op and starts no thread, so nothing is held across the fork. A job
killed by Snakemake (SIGTERM, SIGINT) passes the signal on; a job killed outright closes the socket, and the
child ends itself when it sees that.

The worker is an optimisation of local execution only: cluster jobs, conda environments and ``EMLAB_WORKER=0``
(or unset) start a fresh interpreter as before. A job that cannot reach the worker runs in its own process. The
worker exits when the workflow ends (``onsuccess``/``onerror``) or when its parent, Snakemake, is gone.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import Any

ENV = "EMLAB_WORKER"            # the socket name of a run's worker; unset or "0": no worker
STARTED_ENV = "EMLAB_JOB_STARTED"  # when the job's own process started (the worker's child did later)
_HEADER = struct.Struct("!I")

# Imported once by the worker: what the jobs of a run import between them. Missing ones are skipped.
PRELOAD = (
    # anyio (under openai) before nnsight: nnsight gives every class a ``save`` attribute, and anyio's
    # TypedAttributeSet subclasses refuse any unannotated attribute when they are defined
    "anyio._backends._asyncio", "anyio.abc", "anyio.streams.file", "anyio.streams.tls", "openai",
    "numpy", "pandas", "scipy.stats", "sklearn.linear_model", "sklearn.model_selection", "sklearn.pipeline",
    "sklearn.preprocessing", "safetensors.torch", "torch", "transformers", "transformers.models.llama.modeling_llama",
    "peft", "trl", "datasets", "accelerate", "nnsight", "nnsight.modeling.transformers", "matplotlib.pyplot",
    "tqdm", "numba", "rapidfuzz",
)


def socket_name(token: str) -> bytes:
    """A Linux abstract socket address: no file to clean up and no path-length limit."""
    return b"\0emlab-worker-" + token.encode()


# ------------------------------------------------------------------------------------------------ the job side


def run_via_worker(argv: list[str]) -> int | None:
    """Run ``python -m emlab argv`` in the run's worker and return its exit status; None when there is no worker
    to use (the caller then runs the command itself)."""
    token = os.environ.get(ENV, "")
    if token in ("", "0") or not sys.platform.startswith("linux"):
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(socket_name(token))
    except OSError:
        sock.close()
        print(f"emlab: no worker ready at {ENV}={token} (still starting, or gone); running in this process",
              file=sys.stderr)
        return None
    from .jobs import process_start_time

    env = dict(os.environ, **{STARTED_ENV: repr(process_start_time() or time.time())})
    umask = os.umask(0)
    os.umask(umask)
    request = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": env, "umask": umask,
                          "interpreter": _interpreter()}).encode()
    with sock:
        socket.send_fds(sock, [_HEADER.pack(len(request))], _standard_streams())
        sock.sendall(request)
        reader = sock.makefile("rb")
        first = reader.readline().decode().split()
        if first[:1] == ["REFUSED"]:  # e.g. another interpreter: this job's imports would differ
            print(f"emlab: the worker refused this job ({' '.join(first[1:])}); running in this process",
                  file=sys.stderr)
            return None
        if first[:1] != ["PID"]:
            print("emlab: the worker ended before it ran this job", file=sys.stderr)
            return 1
        child = int(first[1])

        def forward(signum, _frame):
            try:
                os.kill(child, signum)
            except ProcessLookupError:
                pass

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, forward)
        last = reader.readline().decode().split()
    if last[:1] == ["EXIT"]:
        return int(last[1])
    print(f"emlab: the worker's process {child} for this job ended without an exit status (killed?)",
          file=sys.stderr)
    return 1


def _interpreter() -> list[str]:
    """What must match for a job to run in the worker: the Python binary and its environment (venv)."""
    return [os.path.realpath(sys.executable), sys.prefix]


def _standard_streams() -> list[int]:
    """Descriptors 0, 1 and 2, with /dev/null standing in for a closed one."""
    fds = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            fds.append(fd)
        except OSError:
            fds.append(os.open(os.devnull, os.O_RDWR))
    return fds


# ------------------------------------------------------------------------------------------------ the worker


def preload() -> list[str]:
    """Import what the jobs import; the names that failed (an optional package that is not installed)."""
    import importlib
    import pkgutil

    import emlab

    own = [m.name for m in pkgutil.walk_packages(emlab.__path__, "emlab.") if m.name != "emlab.__main__"]
    failed = []
    for name in (*PRELOAD, *own):
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a job that needs it fails with its own, clearer error
            failed.append(name)
    return failed


def serve(token: str, parent: int | None = None, poll_s: float = 1.0) -> None:
    """Listen on the run's socket, preload, and fork one child per job until ``parent`` is gone or SIGTERM."""
    from .jobs import GOMP_SPINCOUNT

    os.environ.setdefault("GOMP_SPINCOUNT", GOMP_SPINCOUNT)  # before torch loads
    t0 = time.monotonic()
    failed = preload()
    # Every object the imports made goes to the permanent generation: the garbage collector of a job's child never
    # walks them. Without this a child's first full collection traversed the millions of objects torch & co. left
    # (and wrote to their pages, which fork had shared): about 0.4 s of every job, however small.
    gc.collect()
    gc.freeze()
    ready = _fork_safe()
    # Listening only now: a job that starts while the worker preloads (the first, light jobs of a run) runs
    # in its own process rather than wait for imports it may not need.
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(socket_name(token))
    server.listen(64)
    print(f"emlab worker: ready in {time.monotonic() - t0:.1f} s (not importable: {failed or 'none'}; "
          f"forking: {ready or 'safe'})", file=sys.stderr, flush=True)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    server.settimeout(poll_s)
    while not stop and (parent is None or os.getppid() == parent):
        _reap()
        try:
            conn, _ = server.accept()
        except socket.timeout:
            continue
        except InterruptedError:
            continue
        try:
            _start_job(conn, server, ready)
        except Exception as e:  # noqa: BLE001 - one bad request must not end the worker
            print(f"emlab worker: a job request failed: {e!r}", file=sys.stderr)
        finally:
            conn.close()
    server.close()


def _fork_safe() -> str | None:
    """Why forking would be unsafe (threads running, CUDA initialised), or None."""
    if threading.active_count() > 1:
        return f"{threading.active_count()} threads are running in the worker"
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return "CUDA is initialised in the worker"
    return None


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _recv_request(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
    msg, fds, _flags, _addr = socket.recv_fds(conn, _HEADER.size, 3)
    (size,) = _HEADER.unpack(msg)
    data = bytearray()
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the job closed the connection mid-request")
        data += chunk
    return json.loads(data), fds


def _start_job(conn: socket.socket, server: socket.socket, unsafe: str | None) -> None:
    request, fds = _recv_request(conn)
    try:
        why = unsafe or (None if request["interpreter"] == _interpreter() else
                         f"the job runs {request['interpreter']}, the worker {_interpreter()}")
        if why:
            conn.sendall(f"REFUSED {why}\n".encode())
            return
        pid = os.fork()
        if pid == 0:  # the child: becomes the job's process and never returns
            server.close()
            _run_child(conn, request, fds)
    finally:
        for fd in fds:
            os.close(fd)


def _run_child(conn: socket.socket, request: dict[str, Any], fds: list[int]) -> None:
    from . import jobs

    code, jobs.via = 1, "worker"
    try:
        for fd, target in zip(fds, (0, 1, 2)):
            os.dup2(fd, target)
        os.chdir(request["cwd"])
        os.umask(request["umask"])
        os.environ.clear()
        os.environ.update(request["env"])
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        conn.sendall(f"PID {os.getpid()}\n".encode())
        threading.Thread(target=_exit_when_job_is_gone, args=(conn,), daemon=True).start()
        _like_a_fresh_process()
        sys.argv = [sys.argv[0], *request["argv"]]
        from emlab.cli import run

        try:
            run(request["argv"])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if e.code is not None and not isinstance(e.code, int):
                print(e.code, file=sys.stderr)
        except BaseException:  # noqa: BLE001 - reported as the interpreter would
            import traceback

            traceback.print_exc()
            code = 1
        import atexit

        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        try:
            conn.sendall(f"EXIT {code}\n".encode())
        except OSError:
            pass
        os._exit(code)


def _exit_when_job_is_gone(conn: socket.socket) -> None:
    """The job process never writes after its request: end of file means it was killed, and so is its run."""
    try:
        while conn.recv(1):
            pass
    except OSError:
        pass
    os._exit(137)


def _like_a_fresh_process() -> None:
    """Random state and thread counts as a new interpreter of this job would have them."""
    import random
    import tempfile

    random.seed()
    tempfile.tempdir = None  # re-read TMPDIR, which Snakemake sets per job
    np = sys.modules.get("numpy")
    if np is not None:
        np.random.seed()
    threads = os.environ.get("OMP_NUM_THREADS")
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.random.default_generator.manual_seed(torch.initial_seed())
        if threads and threads.isdigit():
            torch.set_num_threads(int(threads))
    if threads and threads.isdigit():
        try:
            from threadpoolctl import threadpool_limits

            threadpool_limits(int(threads))
        except Exception:  # noqa: BLE001 - BLAS keeps its default
            pass


# ------------------------------------------------------------------------------------------------ the workflow


def start(package_dir: str, log_path: str) -> subprocess.Popen:
    """Start a run's worker (a child of the calling Snakemake process) and point the jobs at it: its socket name
    goes into ``EMLAB_WORKER``, which every job's environment inherits."""
    import secrets
    from pathlib import Path

    token = secrets.token_hex(8)
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_dir, os.environ.get("PYTHONPATH")])))
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "emlab.worker", token, str(os.getpid())], env=env,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    os.environ[ENV] = token
    return proc


def stop(proc: subprocess.Popen | None) -> None:
    os.environ.pop(ENV, None)
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except Exception:  # noqa: BLE001
        proc.kill()


def main() -> None:
    token, parent = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else None
    serve(token, parent)


if __name__ == "__main__":
    # `python -m emlab.worker` runs this file as __main__, a second copy beside the emlab.worker that the
    # commands import; serve from that one, so that the process holds one copy of the module's state.
    from emlab import worker

    worker.main()
