#!/usr/bin/env python3
"""Daytona's official Python SDK against a Daytona API (the emulator).

Pinned SDK: daytona==0.226.1 (`pip install daytona==0.226.1`); the same
checks also pass with daytona==0.183.0, the version the Paperclip plugin
was written against. The TypeScript twin is daytona_sdk.cjs.

Reads DAYTONA_API_URL and DAYTONA_API_KEY from the environment, runs one
check per SDK operation the emulator serves, prints `N passed, N failed`
and exits non-zero when a check fails. Every sandbox it creates is deleted
at the end, whatever failed.
"""

import asyncio
import os
import sys
import time
import traceback
import uuid

SDK_VERSION = "0.226.1"

try:
    import daytona
    from daytona import (
        CreateSandboxFromSnapshotParams,
        Daytona,
        DaytonaConfig,
        FileUpload,
        ListSandboxesQuery,
        SessionExecuteRequest,
    )
except ImportError as error:  # pragma: no cover - environment problem
    print(f"the daytona SDK is not installed (pip install daytona=={SDK_VERSION}): {error}")
    print("0 passed, 1 failed")
    sys.exit(1)


class Checks:
    """Runs named checks; each failure is reported and counted."""

    def __init__(self):
        self.passed = 0
        self.failed = 0

    def run(self, name, fn):
        try:
            fn()
        except Exception as error:  # noqa: BLE001 - every failure is a finding
            self.failed += 1
            print(f"FAIL {name}: {type(error).__name__}: {error}")
            traceback.print_exc(limit=3)
            return False
        self.passed += 1
        print(f"pass {name}")
        return True


def expect(actual, wanted, what):
    if actual != wanted:
        raise AssertionError(f"{what}: expected {wanted!r}, got {actual!r}")


def wait_for(predicate, what, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def main():
    api_url = os.environ.get("DAYTONA_API_URL")
    api_key = os.environ.get("DAYTONA_API_KEY")
    if not api_url or not api_key:
        print("DAYTONA_API_URL and DAYTONA_API_KEY must be set")
        print("0 passed, 1 failed")
        return 1
    installed = getattr(daytona, "__version__", None)
    if installed not in (None, SDK_VERSION):
        print(f"note: daytona {installed} installed, checks written for {SDK_VERSION}")

    client = Daytona(DaytonaConfig(api_key=api_key, api_url=api_url, target="us"))
    checks = Checks()
    run_label = f"sdk-check-{uuid.uuid4().hex[:8]}"
    created = []
    state = {}

    def create():
        sandbox = client.create(
            CreateSandboxFromSnapshotParams(
                labels={"suite": run_label},
                env_vars={"FROM_CREATE": "yes"},
                auto_stop_interval=15,
            ),
            timeout=60,
        )
        created.append(sandbox)
        state["sandbox"] = sandbox
        expect(str(sandbox.state.value if hasattr(sandbox.state, "value") else sandbox.state), "started", "state")

    if not checks.run("create (snapshot params, labels, env)", create):
        print(f"{checks.passed} passed, {checks.failed} failed")
        return 1
    sandbox = state["sandbox"]

    def get():
        again = client.get(sandbox.id)
        expect(again.id, sandbox.id, "id")
        expect(again.labels.get("suite"), run_label, "label")

    def list_by_label():
        found = [s.id for s in client.list(ListSandboxesQuery(labels={"suite": run_label}))]
        expect(found, [sandbox.id], "sandboxes with the run label")

    def dirs():
        work = sandbox.get_work_dir()
        home = sandbox.get_user_home_dir()
        if not work or not home:
            raise AssertionError(f"empty dirs: {work!r} {home!r}")
        state["work"] = work

    def exec_cwd_env():
        sandbox.fs.create_folder("sub", "755")
        response = sandbox.process.exec("pwd; echo $FOO $FROM_CREATE", cwd="sub", env={"FOO": "bar"})
        expect(response.exit_code, 0, "exit code")
        lines = response.result.strip().splitlines()
        expect(lines[-1], "bar yes", "env")
        if not lines[0].endswith("/sub"):
            raise AssertionError(f"cwd not honoured: {lines[0]!r}")

    def exec_exit_code():
        expect(sandbox.process.exec("exit 7").exit_code, 7, "exit code")

    def exec_timeout():
        try:
            sandbox.process.exec("sleep 10", timeout=1)
        except Exception:  # noqa: BLE001 - the SDK raises on the daemon's 408
            return
        raise AssertionError("a timed-out exec did not fail")

    def session_sync():
        sandbox.process.create_session("s1")
        sandbox.process.execute_session_command("s1", SessionExecuteRequest(command="cd sub && export KEPT=1"))
        response = sandbox.process.execute_session_command(
            "s1", SessionExecuteRequest(command="pwd; echo kept=$KEPT; echo oops >&2")
        )
        expect(response.exit_code, 0, "exit code")
        if not response.stdout.endswith("/sub\nkept=1\n"):
            raise AssertionError(f"session state not kept: {response.stdout!r}")
        expect(response.stderr, "oops\n", "stderr")

    def session_async_logs():
        response = sandbox.process.execute_session_command(
            "s1", SessionExecuteRequest(command="printf 'a\\nb'; printf e >&2", run_async=True)
        )
        cid = response.cmd_id
        wait_for(lambda: sandbox.process.get_session_command("s1", cid).exit_code is not None, "exit code")
        logs = sandbox.process.get_session_command_logs("s1", cid)
        expect(logs.stdout, "a\nb\n", "stdout (per-line framing)")
        expect(logs.stderr, "e\n", "stderr")

    def session_streamed_logs():
        response = sandbox.process.execute_session_command(
            "s1", SessionExecuteRequest(command="echo one; sleep 0.3; echo two", run_async=True)
        )
        out, err = [], []
        asyncio.run(
            sandbox.process.get_session_command_logs_async("s1", response.cmd_id, out.append, err.append)
        )
        expect("".join(out), "one\ntwo\n", "streamed stdout")

    def session_input():
        response = sandbox.process.execute_session_command(
            "s1", SessionExecuteRequest(command="read v; echo got-$v", run_async=True)
        )
        cid = response.cmd_id
        time.sleep(0.3)
        expect(sandbox.process.get_session_command("s1", cid).exit_code, None, "waits for input")
        sandbox.process.send_session_command_input("s1", cid, "x")
        wait_for(lambda: sandbox.process.get_session_command("s1", cid).exit_code is not None, "exit code")
        logs = sandbox.process.get_session_command_logs("s1", cid)
        if "got-x" not in logs.stdout:
            raise AssertionError(f"input not delivered: {logs.stdout!r}")

    def session_get_list_delete():
        session = sandbox.process.get_session("s1")
        expect(session.session_id, "s1", "session id")
        if len(session.commands) < 4:
            raise AssertionError(f"commands missing: {session.commands!r}")
        ids = [s.session_id for s in sandbox.process.list_sessions()]
        if "s1" not in ids:
            raise AssertionError(f"list_sessions: {ids!r}")
        sandbox.process.delete_session("s1")
        ids = [s.session_id for s in sandbox.process.list_sessions()]
        if "s1" in ids:
            raise AssertionError("the session survived its delete")

    def files():
        sandbox.fs.upload_file(b"hello", "up/hello.txt")
        sandbox.fs.upload_files([FileUpload(source=b"two", destination="up/two.txt")])
        expect(sandbox.fs.download_file("up/hello.txt"), b"hello", "download")
        names = sorted(f.name for f in sandbox.fs.list_files("up"))
        expect(names, ["hello.txt", "two.txt"], "list_files")
        try:
            sandbox.fs.delete_file("up")
        except Exception:  # noqa: BLE001 - a directory needs recursive=True
            pass
        else:
            raise AssertionError("deleting a directory without recursive succeeded")
        sandbox.fs.delete_file("up", recursive=True)
        if "up" in [f.name for f in sandbox.fs.list_files(".")]:
            raise AssertionError("the directory survived its recursive delete")

    def labels_and_intervals():
        labels = sandbox.set_labels({"suite": run_label, "extra": "1"})
        expect(labels.get("extra"), "1", "labels")
        sandbox.set_autostop_interval(30)
        expect(sandbox.auto_stop_interval, 30, "auto-stop interval")
        sandbox.set_auto_delete_interval(120)
        expect(sandbox.auto_delete_interval, 120, "auto-delete interval")

    def preview_link():
        link = sandbox.get_preview_link(3000)
        if not link.url or not link.token:
            raise AssertionError(f"preview link: {link!r}")

    def stop_start():
        sandbox.stop(timeout=30)
        sandbox.refresh_data()
        expect(str(getattr(sandbox.state, "value", sandbox.state)), "stopped", "state after stop")
        sandbox.start(timeout=30)
        sandbox.refresh_data()
        expect(str(getattr(sandbox.state, "value", sandbox.state)), "started", "state after start")
        expect(sandbox.process.exec("echo back").result.strip(), "back", "exec after restart")

    def archive_and_restore():
        sandbox.stop(timeout=30)
        sandbox.archive()
        sandbox.refresh_data()
        expect(str(getattr(sandbox.state, "value", sandbox.state)), "archived", "state after archive")
        sandbox.start(timeout=30)
        expect(sandbox.process.exec("echo restored").result.strip(), "restored", "exec after restore")

    def ssh_access():
        access = sandbox.create_ssh_access(expires_in_minutes=5)
        if not access.token or not access.ssh_command:
            raise AssertionError(f"ssh access: {access!r}")

    for name, fn in [
        ("get", get),
        ("list with a label filter", list_by_label),
        ("work and home dirs", dirs),
        ("process.exec with cwd and env", exec_cwd_env),
        ("process.exec exit code", exec_exit_code),
        ("process.exec timeout", exec_timeout),
        ("session: sync exec keeps shell state", session_sync),
        ("session: async exec, status, logs", session_async_logs),
        ("session: streamed logs", session_streamed_logs),
        ("session: send input", session_input),
        ("session: get, list, delete", session_get_list_delete),
        ("files: upload, download, list, delete", files),
        ("labels and intervals", labels_and_intervals),
        ("preview link", preview_link),
        ("stop and start", stop_start),
        ("archive and restore", archive_and_restore),
        ("ssh access", ssh_access),
    ]:
        checks.run(name, fn)

    def delete():
        for s in created:
            client.delete(s)
        created.clear()
        left = list(client.list(ListSandboxesQuery(labels={"suite": run_label})))
        expect(left, [], "sandboxes left")

    checks.run("delete", delete)
    for s in created:
        try:
            client.delete(s)
        except Exception:  # noqa: BLE001 - best-effort cleanup
            pass
    print(f"{checks.passed} passed, {checks.failed} failed")
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())
