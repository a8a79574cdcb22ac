#!/usr/bin/env python3
"""The official Python Kubernetes client against the API server emulator.

Pinned client: kubernetes==37.0.2 (`pip install kubernetes==37.0.2`).

Reads KUBECONFIG from the environment (as `paperclip-env emulate kubernetes`
prints it), runs one check per client operation the provider relies on
(discovery, CRUD with the server's defaulting and validation, merge and JSON
patches, watch, the Sandbox CRD and its controller, Jobs, pod exec over the
WebSocket channel protocol with its status channel, ApiException bodies),
prints `N passed, N failed` and exits non-zero when a check fails. The
namespace it creates is deleted at the end, whatever failed.
"""

import base64
import json
import os
import sys
import time
import traceback
import uuid

CLIENT_VERSION = "37.0.2"

try:
    from kubernetes import client, config, watch
    from kubernetes.client.rest import ApiException
    from kubernetes.stream import stream
except ImportError as error:  # pragma: no cover - environment problem
    print(f"the kubernetes client is not installed (pip install kubernetes=={CLIENT_VERSION}): {error}")
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


def api_error(fn):
    """The ApiException `fn` raises, with its body parsed (a metav1.Status)."""
    try:
        fn()
    except ApiException as error:
        return error, json.loads(error.body or "{}")
    raise AssertionError("expected an ApiException")


def wait_for(what, predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def main():
    config.load_kube_config(config_file=os.environ["KUBECONFIG"])
    core = client.CoreV1Api()
    batch = client.BatchV1Api()
    custom = client.CustomObjectsApi()
    ns = f"vendor-{uuid.uuid4().hex[:8]}"
    checks = Checks()
    state = {}

    def discovery():
        version = client.VersionApi().get_code()
        if not version.git_version:
            raise AssertionError(f"no gitVersion: {version}")
        groups = {g.name for g in client.ApisApi().get_api_versions().groups}
        for group in ("batch", "agents.x-k8s.io"):
            if group not in groups:
                raise AssertionError(f"{group} not discovered: {sorted(groups)}")

    def namespace_create():
        created = core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
        expect(created.metadata.name, ns, "namespace name")
        if not created.metadata.uid or not created.metadata.resource_version:
            raise AssertionError("no uid/resourceVersion on a created object")
        if created.metadata.creation_timestamp is None:
            raise AssertionError("no creationTimestamp")
        names = [n.metadata.name for n in core.list_namespace().items]
        if ns not in names or "default" not in names:
            raise AssertionError(f"namespaces listed: {names}")

    def secret_string_data():
        core.create_namespaced_secret(
            ns,
            client.V1Secret(metadata=client.V1ObjectMeta(name="creds"), string_data={"token": "t0ken"}),
        )
        read = core.read_namespaced_secret("creds", ns)
        expect(base64.b64decode(read.data["token"]).decode(), "t0ken", "stringData folded into data")
        expect(read.string_data, None, "stringData kept")

    def pod_create_and_run():
        pod = client.V1Pod(
            metadata=client.V1ObjectMeta(name="box", labels={"app": "vendor"}),
            spec=client.V1PodSpec(
                restart_policy="Never",
                containers=[client.V1Container(name="main", image="docker.io/library/busybox:1.36", command=["sleep", "300"])],
            ),
        )
        core.create_namespaced_pod(ns, pod)
        w = watch.Watch()
        phase = None
        for event in w.stream(core.list_namespaced_pod, ns, field_selector="metadata.name=box", timeout_seconds=20):
            phase = event["object"].status.phase
            if phase == "Running":
                w.stop()
        expect(phase, "Running", "pod phase seen through watch")
        read = core.read_namespaced_pod("box", ns)
        expect(read.spec.service_account_name, "default", "defaulted service account")
        state["pod_rv"] = read.metadata.resource_version

    def duplicate_is_already_exists():
        error, body = api_error(lambda: core.create_namespaced_pod(
            ns,
            client.V1Pod(
                metadata=client.V1ObjectMeta(name="box"),
                spec=client.V1PodSpec(containers=[client.V1Container(name="main", image="busybox")]),
            ),
        ))
        expect(error.status, 409, "status")
        expect((body.get("kind"), body.get("reason")), ("Status", "AlreadyExists"), "Status body")

    def missing_is_not_found():
        error, body = api_error(lambda: core.read_namespaced_pod("nope", ns))
        expect(error.status, 404, "status")
        expect(body.get("reason"), "NotFound", "reason")
        expect(body.get("details", {}).get("name"), "nope", "details.name")

    def invalid_is_unprocessable():
        error, body = api_error(lambda: core.create_namespaced_pod(
            ns,
            client.V1Pod(
                metadata=client.V1ObjectMeta(name="Bad_Name"),
                spec=client.V1PodSpec(containers=[client.V1Container(name="main", image="busybox")]),
            ),
        ))
        expect(error.status, 422, "status")
        expect(body.get("reason"), "Invalid", "reason")
        if not body.get("details", {}).get("causes"):
            raise AssertionError(f"no causes: {body}")

    def merge_patch_labels():
        patched = core.patch_namespaced_pod("box", ns, {"metadata": {"labels": {"tier": "agent"}}})
        expect(patched.metadata.labels.get("tier"), "agent", "merged label")
        expect(patched.metadata.labels.get("app"), "vendor", "kept label")
        if patched.metadata.resource_version == state.get("pod_rv"):
            raise AssertionError("resourceVersion did not move on patch")
        selected = core.list_namespaced_pod(ns, label_selector="tier in (agent),app=vendor").items
        expect([p.metadata.name for p in selected], ["box"], "label selector")

    def json_patch_annotation():
        # The client picks JSON patch for a list body.
        patched = core.patch_namespaced_pod(
            "box", ns, [{"op": "add", "path": "/metadata/annotations", "value": {"note": "json-patch"}}]
        )
        expect(patched.metadata.annotations.get("note"), "json-patch", "annotation")

    def exec_with_status_channel():
        ws = stream(
            core.connect_get_namespaced_pod_exec,
            "box",
            ns,
            command=["sh", "-c", "echo out; echo err >&2; exit 3"],
            stderr=True,
            stdin=False,
            stdout=True,
            tty=False,
            _preload_content=False,
        )
        ws.run_forever(timeout=20)
        out = ws.read_stdout() if ws.peek_stdout() else ""
        err = ws.read_stderr() if ws.peek_stderr() else ""
        code = ws.returncode
        ws.close()
        expect(out, "out\n", "stdout")
        expect(err, "err\n", "stderr")
        expect(code, 3, "exit code from the status channel")

    def exec_with_stdin():
        ws = stream(
            core.connect_get_namespaced_pod_exec,
            "box",
            ns,
            command=["cat"],
            stderr=True,
            stdin=True,
            stdout=True,
            tty=False,
            _preload_content=False,
        )
        ws.write_stdin("piped through\n")
        collected = ""
        deadline = time.monotonic() + 10
        while "piped through" not in collected and time.monotonic() < deadline:
            ws.update(timeout=1)
            if ws.peek_stdout():
                collected += ws.read_stdout()
        ws.close()
        expect(collected, "piped through\n", "stdin echoed")

    def sandbox_custom_object():
        group, version = "agents.x-k8s.io", "v1alpha1"
        body = {
            "apiVersion": f"{group}/{version}",
            "kind": "Sandbox",
            "metadata": {"name": "sbx", "labels": {"paperclip.ai/run": "vendor"}},
            "spec": {
                "podTemplate": {
                    "spec": {"containers": [{"name": "agent", "image": "docker.io/library/busybox:1.36", "command": ["sleep", "300"]}]}
                }
            },
        }
        created = custom.create_namespaced_custom_object(group, version, ns, "sandboxes", body)
        expect(created["spec"].get("replicas"), 1, "v1alpha1 default replicas")

        def ready():
            sbx = custom.get_namespaced_custom_object(group, version, ns, "sandboxes", "sbx")
            conditions = sbx.get("status", {}).get("conditions", [])
            return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions) and sbx

        wait_for("the Sandbox to be Ready", ready)
        pod = core.read_namespaced_pod("sbx", ns)
        owners = [(o.kind, o.name, o.controller) for o in pod.metadata.owner_references or []]
        expect(owners, [("Sandbox", "sbx", True)], "pod owner")
        listed = custom.list_namespaced_custom_object(group, version, ns, "sandboxes", label_selector="paperclip.ai/run=vendor")
        expect([i["metadata"]["name"] for i in listed["items"]], ["sbx"], "listed by label")
        custom.delete_namespaced_custom_object(group, version, ns, "sandboxes", "sbx")

        def pod_gone():
            try:
                core.read_namespaced_pod("sbx", ns)
                return False
            except ApiException as error:
                return error.status == 404

        wait_for("the Sandbox's pod to be collected", pod_gone)

    def job_runs_to_completion():
        job = client.V1Job(
            metadata=client.V1ObjectMeta(name="once"),
            spec=client.V1JobSpec(
                template=client.V1PodTemplateSpec(
                    spec=client.V1PodSpec(
                        restart_policy="Never",
                        containers=[client.V1Container(name="main", image="busybox", command=["sh", "-c", "exit 0"])],
                    )
                )
            ),
        )
        created = batch.create_namespaced_job(ns, job)
        expect(created.spec.backoff_limit, 6, "defaulted backoffLimit")
        done = wait_for(
            "the Job to succeed",
            lambda: (lambda j: j if (j.status.succeeded or 0) >= 1 else None)(batch.read_namespaced_job("once", ns)),
        )
        conditions = {c.type: c.status for c in done.status.conditions or []}
        expect(conditions.get("Complete"), "True", "Complete condition")
        pods = core.list_namespaced_pod(ns, label_selector="job-name=once").items
        if not pods:
            raise AssertionError("no pod labelled job-name=once")
        batch.delete_namespaced_job("once", ns, propagation_policy="Background")

    def dry_run_stores_nothing():
        core.create_namespaced_config_map(
            ns, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="dry"), data={"k": "v"}), dry_run="All"
        )
        error, _ = api_error(lambda: core.read_namespaced_config_map("dry", ns))
        expect(error.status, 404, "a dry-run object was stored")

    def delete_pod():
        core.delete_namespaced_pod("box", ns)
        wait_for("the pod to go", lambda: "box" not in [p.metadata.name for p in core.list_namespaced_pod(ns).items])

    try:
        for name, fn in [
            ("discovery: version and API groups", discovery),
            ("namespace create/list with uid, resourceVersion, creationTimestamp", namespace_create),
            ("secret stringData folded into data", secret_string_data),
            ("pod create, Running through watch, defaulted serviceAccountName", pod_create_and_run),
            ("duplicate create: 409 AlreadyExists Status", duplicate_is_already_exists),
            ("missing object: 404 NotFound Status", missing_is_not_found),
            ("invalid name: 422 Invalid with causes", invalid_is_unprocessable),
            ("merge patch of labels, label selectors", merge_patch_labels),
            ("JSON patch", json_patch_annotation),
            ("exec: stdout, stderr and exit code on the status channel", exec_with_status_channel),
            ("exec with stdin", exec_with_stdin),
            ("Sandbox CR: defaults, controller pod, Ready, list, garbage collection", sandbox_custom_object),
            ("Job: defaults, pod, Complete", job_runs_to_completion),
            ("dryRun=All stores nothing", dry_run_stores_nothing),
            ("pod delete", delete_pod),
        ]:
            checks.run(name, fn)
    finally:
        try:
            core.delete_namespace(ns)
        except Exception as error:  # noqa: BLE001 - cleanup is best effort, but said
            print(f"cleanup: deleting namespace {ns} failed: {error}")
    print(f"{checks.passed} passed, {checks.failed} failed")
    return 0 if checks.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
