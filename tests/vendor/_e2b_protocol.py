"""Checks of the E2B protocol through an E2B-compatible Python SDK (`e2b`,
`novita_sandbox.core`), against `paperclip-env emulate`. Each suite file
calls `run(sdk)` with its SDK module; one check per documented operation;
prints `N passed, N failed` and exits non-zero on any failure.
"""

import os
import sys
import time
import traceback
import uuid


def run(sdk, close_stdin=True):
    Sandbox = sdk.Sandbox
    passed = 0
    failed = 0

    def check(name):
        def wrap(fn):
            nonlocal passed, failed
            try:
                fn()
                passed += 1
                print(f"ok   {name}")
            except Exception as error:  # noqa: BLE001 - every failure is reported
                failed += 1
                print(f"FAIL {name}: {type(error).__name__}: {error}")
                traceback.print_exc(limit=3, file=sys.stdout)
            return fn

        return wrap

    def expect(condition, message):
        if not condition:
            raise AssertionError(message)

    run_tag = uuid.uuid4().hex[:8]
    state = {}


    @check("Sandbox.create with metadata, envs and timeout")
    def _():
        sbx = Sandbox.create(
            template="base",
            timeout=120,
            metadata={"suite": run_tag, "kind": "main"},
            envs={"FROM_CREATE": "create-value"},
        )
        expect(sbx.sandbox_id, "no sandbox id")
        state["sbx"] = sbx


    sbx = state.get("sbx")
    if sbx is None:
        print(f"{passed} passed, {failed} failed")
        sys.exit(1)


    @check("Sandbox.is_running")
    def _():
        expect(sbx.is_running(), "not running")


    @check("Sandbox.get_info (startedAt, endAt, metadata)")
    def _():
        info = sbx.get_info()
        expect(info.sandbox_id == sbx.sandbox_id, f"id {info.sandbox_id}")
        expect(info.metadata.get("suite") == run_tag, f"metadata {info.metadata}")
        expect(info.end_at > info.started_at, f"{info.started_at} .. {info.end_at}")


    @check("commands.run: stdout and exit code 0")
    def _():
        result = sbx.commands.run("echo hello")
        expect(result.stdout == "hello\n", repr(result.stdout))
        expect(result.exit_code == 0, result.exit_code)


    @check("commands.run: stderr")
    def _():
        result = sbx.commands.run("echo oops >&2")
        expect(result.stderr == "oops\n", repr(result.stderr))


    @check("commands.run: non-zero exit raises CommandExitException")
    def _():
        try:
            sbx.commands.run("echo partial; exit 3")
        except sdk.CommandExitException as error:
            expect(error.exit_code == 3, error.exit_code)
            expect(error.stdout == "partial\n", repr(error.stdout))
            return
        raise AssertionError("no CommandExitException")


    @check("commands.run: envs")
    def _():
        result = sbx.commands.run('echo "$GREETING"', envs={"GREETING": "hi there"})
        expect(result.stdout == "hi there\n", repr(result.stdout))


    @check("commands.run: envVars given at create reach every command")
    def _():
        result = sbx.commands.run('echo "$FROM_CREATE"')
        expect(result.stdout == "create-value\n", repr(result.stdout))


    @check("commands.run: cwd")
    def _():
        sbx.files.make_dir("/home/user/work")
        result = sbx.commands.run("pwd", cwd="/home/user/work")
        expect(result.stdout == "/home/user/work\n", repr(result.stdout))


    @check("commands.run: the sandbox user and home")
    def _():
        result = sbx.commands.run('echo "$USER $LOGNAME $HOME"; pwd')
        expect(result.stdout == "user user /home/user\n/home/user\n", repr(result.stdout))


    @check("commands.run: on_stdout streams output")
    def _():
        seen = []
        sbx.commands.run("printf a; sleep 0.2; printf b", on_stdout=seen.append)
        expect("".join(seen) == "ab", seen)


    @check("commands.run: timeout")
    def _():
        started = time.monotonic()
        try:
            sbx.commands.run("sleep 30", timeout=1)
        except sdk.TimeoutException:
            expect(time.monotonic() - started < 20, "took too long")
            return
        raise AssertionError("no TimeoutException")


    @check("commands.run(background) + send_stdin + wait")
    def _():
        handle = sbx.commands.run("read line; echo got:$line", background=True, stdin=True)
        sbx.commands.send_stdin(handle.pid, "first\n")
        result = handle.wait()
        expect(result.stdout == "got:first\n", repr(result.stdout))


    if close_stdin:

        @check("commands.close_stdin ends the input")
        def _():
            handle = sbx.commands.run("cat", background=True, stdin=True)
            sbx.commands.send_stdin(handle.pid, "all\n")
            sbx.commands.close_stdin(handle.pid)
            expect(handle.wait().stdout == "all\n", "cat did not see EOF")


    @check("commands.list, commands.connect and commands.kill")
    def _():
        handle = sbx.commands.run("sleep 60", background=True)
        pids = [p.pid for p in sbx.commands.list()]
        expect(handle.pid in pids, f"{handle.pid} not in {pids}")
        attached = sbx.commands.connect(handle.pid)
        expect(sbx.commands.kill(handle.pid), "kill returned False")
        try:
            attached.wait()
        except sdk.CommandExitException as error:
            expect(error.exit_code != 0, error.exit_code)
        expect(handle.pid not in [p.pid for p in sbx.commands.list()], "still listed")


    @check("files.write + files.read (absolute and relative paths)")
    def _():
        sbx.files.write("/home/user/notes/a.txt", "alpha")
        expect(sbx.files.read("/home/user/notes/a.txt") == "alpha", "absolute")
        sbx.files.write("relative.txt", "beta")
        expect(sbx.files.read("/home/user/relative.txt") == "beta", "relative against home")
        expect(sbx.commands.run("cat relative.txt").stdout == "beta", "seen by commands")


    @check("files.write: bytes and multiple files")
    def _():
        sbx.files.write("/tmp/bin.dat", b"\x00\x01\xff")
        expect(sbx.files.read("/tmp/bin.dat", format="bytes") == b"\x00\x01\xff", "bytes")
        sbx.files.write_files([
            {"path": "/home/user/many/1.txt", "data": "one"},
            {"path": "/home/user/many/2.txt", "data": "two"},
        ])
        expect(sbx.files.read("/home/user/many/2.txt") == "two", "write_files")


    @check("files.list")
    def _():
        names = sorted(entry.name for entry in sbx.files.list("/home/user/many"))
        expect(names == ["1.txt", "2.txt"], names)


    @check("files.exists")
    def _():
        expect(sbx.files.exists("/home/user/notes/a.txt"), "existing file")
        expect(not sbx.files.exists("/home/user/nope.txt"), "missing file")


    @check("files.get_info")
    def _():
        info = sbx.files.get_info("/home/user/notes/a.txt")
        expect(info.size == 5, info.size)
        expect(info.path == "/home/user/notes/a.txt", info.path)


    @check("files.rename")
    def _():
        sbx.files.rename("/home/user/notes/a.txt", "/home/user/notes/b.txt")
        expect(sbx.files.exists("/home/user/notes/b.txt"), "renamed")
        expect(not sbx.files.exists("/home/user/notes/a.txt"), "old name gone")


    @check("files.remove")
    def _():
        sbx.files.remove("/home/user/notes")
        expect(not sbx.files.exists("/home/user/notes/b.txt"), "removed")


    @check("files.read of a missing file raises NotFoundException")
    def _():
        try:
            sbx.files.read("/home/user/missing.txt")
        except sdk.NotFoundException:
            return
        raise AssertionError("no NotFoundException")


    @check("files stay inside the sandbox (no host file reachable)")
    def _():
        marker = f"/tmp/paperclip-vendor-{run_tag}"
        sbx.files.write(marker, "inside")
        expect(not os.path.exists(marker), "the SDK wrote the host's /tmp")


    @check("Sandbox.list with a metadata filter")
    def _():
        other = Sandbox.create(template="base", timeout=60, metadata={"suite": run_tag, "kind": "other"})
        try:
            found = Sandbox.list(query=sdk.SandboxQuery(metadata={"suite": run_tag, "kind": "main"})).next_items()
            ids = [s.sandbox_id for s in found]
            expect(ids == [sbx.sandbox_id], ids)
        finally:
            other.kill()


    @check("Sandbox.connect")
    def _():
        again = Sandbox.connect(sbx.sandbox_id)
        expect(again.commands.run("echo again").stdout == "again\n", "command after connect")


    @check("Sandbox.set_timeout")
    def _():
        sbx.set_timeout(300)
        info = sbx.get_info()
        expect((info.end_at - info.started_at).total_seconds() > 200, info.end_at)


    @check("pause, then connect resumes with files kept")
    def _():
        sbx.files.write("/home/user/kept.txt", "kept")
        sbx.pause()
        expect(Sandbox.get_info(sbx.sandbox_id).state.value == "paused", "not paused")
        resumed = Sandbox.connect(sbx.sandbox_id)
        expect(resumed.files.read("/home/user/kept.txt") == "kept", "files lost")


    @check("kill")
    def _():
        expect(sbx.kill(), "kill returned False")
        expect(not Sandbox.kill(sbx.sandbox_id), "second kill found it")


    @check("connect to a killed sandbox raises NotFoundException")
    def _():
        try:
            Sandbox.connect(sbx.sandbox_id)
        except sdk.NotFoundException:
            return
        raise AssertionError("no NotFoundException")


    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
