// A sandbox-provider plugin written the way Paperclip's own plugins are:
// with the published worker SDK (`@paperclipai/plugin-sdk`, `definePlugin`
// and `runWorker`). Each lease is a temp directory; commands run as local
// processes and stream their output through `ctx.execution.log`. It is the
// test client of the SDK host in `paperclip-env-core::plugin`: it prints to
// stdout like careless plugins do, calls back into the host (`state.*`,
// `config.get`, `logger`), and can hang or wedge on request.
//
// Environment (all optional):
//   SDK_LOCAL_ROOT      where lease directories go (default: the OS temp dir)
//   SDK_LOCAL_CONTROL   a directory for counters (`creates`, `executes`) and
//                       one-shot faults (`fail-next-<method>` files)
//   SDK_LOCAL_HANG_ON   a method whose handler never settles (the worker
//                       still answers `health`)
//   SDK_LOCAL_WEDGE_ON  a method whose handler spins forever (the worker
//                       answers nothing, `health` included)
import { definePlugin, runWorker } from "@paperclipai/plugin-sdk";
import { spawn } from "node:child_process";
import { existsSync, readFileSync, unlinkSync, writeFileSync } from "node:fs";
import { mkdtemp, rm, stat } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";

const ROOT = process.env.SDK_LOCAL_ROOT || tmpdir();
const CONTROL = process.env.SDK_LOCAL_CONTROL || null;
const LEASE_PREFIX = "sdk-local-";
const ID_SCHEME = "sdk-local://";

let ctx = null;

function bump(name) {
  if (!CONTROL) return;
  const file = path.join(CONTROL, name);
  const n = existsSync(file) ? Number(readFileSync(file, "utf8")) || 0 : 0;
  writeFileSync(file, String(n + 1));
}

/** Throws once when the test armed `fail-next-<method>`. */
function armedFault(method) {
  if (!CONTROL) return;
  const file = path.join(CONTROL, `fail-next-${method}`);
  if (existsSync(file)) {
    unlinkSync(file);
    throw new Error(`sdk-local: injected failure in ${method}`);
  }
}

async function faults(method) {
  if (process.env.SDK_LOCAL_WEDGE_ON === method) {
    // A busy loop: the event loop never turns again.
    for (;;) {}
  }
  if (process.env.SDK_LOCAL_HANG_ON === method) {
    await new Promise(() => {});
  }
  armedFault(method);
}

function leaseDir(providerLeaseId) {
  if (typeof providerLeaseId !== "string" || !providerLeaseId.startsWith(ID_SCHEME)) {
    throw new Error(`sdk-local: not a lease of this plugin: ${providerLeaseId}`);
  }
  const name = providerLeaseId.slice(ID_SCHEME.length);
  if (!name.startsWith(LEASE_PREFIX) || name.includes("/")) {
    throw new Error(`sdk-local: malformed lease id: ${providerLeaseId}`);
  }
  return path.join(ROOT, name);
}

function validate(config) {
  const errors = [];
  if (config.image !== undefined && typeof config.image !== "string") {
    errors.push("image must be a string");
  }
  if (config.timeoutMs !== undefined && !(Number.isInteger(config.timeoutMs) && config.timeoutMs > 0)) {
    errors.push("timeoutMs must be a positive integer");
  }
  return errors;
}

async function terminate(params) {
  if (!params.providerLeaseId) return undefined;
  const dir = leaseDir(params.providerLeaseId);
  await rm(dir, { recursive: true, force: true });
  return { providerLeaseId: params.providerLeaseId, state: "destroyed" };
}

function run(params) {
  return new Promise((resolve) => {
    const env = { PATH: process.env.PATH ?? "/usr/bin:/bin", HOME: params.cwd ?? ROOT, ...(params.env ?? {}) };
    let child;
    try {
      child = spawn(params.command, params.args ?? [], {
        cwd: params.cwd,
        env,
        detached: true,
        stdio: ["pipe", "pipe", "pipe"],
      });
    } catch (error) {
      resolve({ exitCode: 127, signal: null, timedOut: false, stdout: "", stderr: String(error?.message ?? error) });
      return;
    }
    let stdout = "";
    let stderr = "";
    let timedOut = false;
    let settled = false;
    const finish = (result) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      resolve(result);
    };
    child.stdout.setEncoding("utf8");
    child.stderr.setEncoding("utf8");
    child.stdout.on("data", (chunk) => {
      stdout += chunk;
      ctx.execution.log("stdout", chunk);
    });
    child.stderr.on("data", (chunk) => {
      stderr += chunk;
      ctx.execution.log("stderr", chunk);
    });
    child.on("error", (error) => {
      finish({ exitCode: 127, signal: null, timedOut: false, stdout, stderr: stderr + String(error.message) });
    });
    child.on("close", (code, signal) => {
      finish({ exitCode: code, signal: signal ?? null, timedOut, stdout, stderr });
    });
    const timer =
      params.timeoutMs > 0
        ? setTimeout(() => {
            timedOut = true;
            try {
              process.kill(-child.pid, "SIGKILL");
            } catch {}
          }, params.timeoutMs)
        : null;
    child.stdin.on("error", () => {});
    if (typeof params.stdin === "string" && params.stdin.length > 0) {
      child.stdin.end(params.stdin);
    } else {
      child.stdin.end();
    }
  });
}

const plugin = definePlugin({
  async setup(context) {
    ctx = context;
    // Careless plugins print to stdout; the host must log and skip it.
    console.log("sdk-local: setting up (this line is not JSON-RPC)");
    ctx.logger.info("sdk-local plugin ready");
  },

  async onHealth() {
    return { status: "ok" };
  },

  async onEnvironmentValidateConfig({ config }) {
    await faults("environmentValidateConfig");
    const errors = validate(config ?? {});
    return errors.length ? { ok: false, errors } : { ok: true, normalizedConfig: config };
  },

  async onEnvironmentProbe({ config }) {
    await faults("environmentProbe");
    console.log("sdk-local: probing");
    // Host services: the plugin's state survives between calls.
    const key = { scopeKind: "instance", stateKey: "probes" };
    const seen = (await ctx.state.get(key)) ?? 0;
    await ctx.state.set(key, seen + 1);
    const pluginConfig = await ctx.config.get();
    const errors = validate(config ?? {});
    if (errors.length) return { ok: false, summary: errors.join("; ") };
    return {
      ok: true,
      summary: `sdk-local ready (probe ${seen + 1})`,
      metadata: { probes: seen + 1, region: pluginConfig?.region ?? null },
    };
  },

  async onEnvironmentAcquireLease(params) {
    const { runId } = params;
    await faults("environmentAcquireLease");
    const dir = await mkdtemp(path.join(ROOT, LEASE_PREFIX));
    bump("creates");
    writeFileSync(path.join(dir, ".paperclip-run-id"), String(runId ?? ""));
    return {
      providerLeaseId: ID_SCHEME + path.basename(dir),
      metadata: {
        remoteCwd: dir,
        runId: runId ?? null,
        sdkLocal: true,
        // What the host sent beyond the ids, for the tests to check.
        requested: {
          agentId: params.agentId ?? null,
          executionWorkspaceId: params.executionWorkspaceId ?? null,
          adapterType: params.adapterType ?? null,
          requestedCwd: params.requestedCwd ?? null,
          requestedExpiresAt: params.requestedExpiresAt ?? null,
          workspaceMode: params.workspaceMode ?? null,
        },
      },
    };
  },

  async onEnvironmentResumeLease({ providerLeaseId }) {
    await faults("environmentResumeLease");
    const dir = leaseDir(providerLeaseId);
    const info = await stat(dir).catch(() => null);
    if (!info) throw new Error(`sdk-local: lease ${providerLeaseId} is gone`);
    return { providerLeaseId, metadata: { remoteCwd: dir, sdkLocal: true } };
  },

  async onEnvironmentReleaseLease(params) {
    await faults("environmentReleaseLease");
    return terminate(params);
  },

  async onEnvironmentDestroyLease(params) {
    await faults("environmentDestroyLease");
    return terminate(params);
  },

  async onEnvironmentRealizeWorkspace({ lease, workspace }) {
    await faults("environmentRealizeWorkspace");
    // The lease's own directory wins over a requested remote path.
    const dir = lease?.metadata?.remoteCwd || leaseDir(lease.providerLeaseId);
    return { cwd: dir || workspace?.remotePath };
  },

  async onEnvironmentExecute(params) {
    await faults("environmentExecute");
    bump("executes");
    console.log(`sdk-local: running ${params.command}`);
    const dir = leaseDir(params.lease?.providerLeaseId);
    if (!(await stat(dir).catch(() => null))) {
      throw new Error(`sdk-local: lease ${params.lease.providerLeaseId} not found`);
    }
    const cwd = params.cwd || dir;
    // The environment's timeoutMs bounds a command that names none.
    const timeoutMs = params.timeoutMs ?? params.config?.timeoutMs;
    return run({ ...params, cwd, timeoutMs });
  },

  async onShutdown() {
    if (CONTROL) writeFileSync(path.join(CONTROL, "shutdown"), "1");
  },
});

export default plugin;
runWorker(plugin, import.meta.url);
