// automerge-repo clients against Meridian's WebSocket gateway and against the reference
// automerge-repo sync server (sync-server.mjs), side by side, in one invocation:
//
//   cargo build --release -p meridian-cli
//   (cd benches/gateway && npm ci && node bench.mjs [--scenario steady|fanout|large-doc|all]
//     [--duration SECONDS] [--runs N] [--servers meridian,reference]
//     [--meridian ../../target/release/meridian])
//
// Scenarios (the same clients and edits for both servers):
//   steady    100 clients, 10 documents (10 clients each), every client 1 edit/s
//   fanout    100 subscribers of one document, 5 writers among them at 1 edit/s each
//   large-doc a 20,000-change text, loaded by 10 clients, 5 of them typing 1 edit/s
// Reported per server: server CPU per edit (utime + stime of the server process over the
// edit phase, divided by the edits made; the phase starts once the server is quiet, so
// that what the setup started, such as a background snapshot of the large document or
// the readers' first sync, is not counted as the edits'; `settle_s` says how long that took), delivered latency p50/p99 (from an edit to its
// arrival at every other client of the document, one clock: one process), the server's
// RSS at the end and its peak, deliveries missing at the end (must be 0), the
// WebSocket messages per edit the clients received from the server and sent to it, and
// the CPU per edit of this process (every client) over the edit phase.
// `--runs N` runs every scenario N times, alternating which server goes first, and ends
// with each server's medians and, per run, whether Meridian's p99 was at most the
// reference's.
import { spawn } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import * as A from "@automerge/automerge";
import { Repo } from "@automerge/automerge-repo";
import { WebSocketClientAdapter } from "@automerge/automerge-repo-network-websocket";

const args = Object.fromEntries(
  process.argv.slice(2).reduce((pairs, arg, i, all) => {
    if (arg.startsWith("--")) pairs.push([arg.slice(2), all[i + 1]]);
    return pairs;
  }, []),
);
const here = path.dirname(new URL(import.meta.url).pathname);
const meridianBin = path.resolve(here, args.meridian ?? "../../target/release/meridian");
const duration = Number(args.duration ?? 20);
const runs = Math.max(1, Number.parseInt(args.runs ?? "1", 10) || 1);
const only = args.scenario ?? "all";
const sleep = ms => new Promise(r => setTimeout(r, ms));

// ---- servers ----------------------------------------------------------------------------

function cpuSeconds(pid) {
  const stat = fs.readFileSync(`/proc/${pid}/stat`, "utf8");
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return (Number(fields[11]) + Number(fields[12])) / 100; // utime + stime, in ticks of 10 ms
}

function memory(pid) {
  const status = fs.readFileSync(`/proc/${pid}/status`, "utf8");
  const kib = key => Number(status.match(new RegExp(`${key}:\\s+(\\d+)`))?.[1] ?? 0);
  return { rss: kib("VmRSS") / 1024, peak: kib("VmHWM") / 1024 };
}

async function startMeridian() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "meridian-gw-bench-"));
  const child = spawn(meridianBin, ["dev", "--nodes", "1", "--rate-limits", "benchmark", "--data-dir", dir],
    { stdio: ["pipe", "pipe", "inherit"] });
  let out = "";
  child.stdout.on("data", chunk => { out += chunk; });
  for (let i = 0; i < 600 && !/browser\s+ws:/.test(out); i++) await sleep(50);
  const url = out.match(/browser\s+(ws:\S+)/)?.[1];
  if (!url) throw new Error(`meridian dev did not print a gateway URL:\n${out}`);
  const pid = Number(fs.readFileSync(path.join(dir, "node-1.pid"), "utf8"));
  return { name: "meridian", url, pid, stop: () => child.kill("SIGINT") };
}

async function startReference() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "reference-sync-"));
  // Port 0: the system picks a free one, and the server says which.
  const child = spawn(process.execPath, [path.join(here, "sync-server.mjs"), "0", dir],
    { stdio: ["ignore", "pipe", "inherit"] });
  const port = await new Promise((resolve, reject) => {
    child.stdout.on("data", chunk => {
      const found = String(chunk).match(/listening (\d+)/);
      if (found) resolve(Number(found[1]));
    });
    child.on("exit", code => reject(new Error(`reference server exited ${code}`)));
  });
  return { name: "reference", url: `ws://127.0.0.1:${port}`, pid: child.pid, stop: () => child.kill("SIGTERM") };
}

// ---- clients ----------------------------------------------------------------------------

// WebSocket messages every client received and sent (all clients are in this process).
const messages = { received: 0, sent: 0 };
{
  const { receiveMessage, send } = WebSocketClientAdapter.prototype;
  WebSocketClientAdapter.prototype.receiveMessage = function (bytes) {
    messages.received += 1;
    return receiveMessage.call(this, bytes);
  };
  WebSocketClientAdapter.prototype.send = function (message) {
    messages.sent += 1;
    return send.call(this, message);
  };
}

function client(url) {
  return new Repo({ network: [new WebSocketClientAdapter(url, 1000)] });
}

async function waitFor(what, check, ms = 120000) {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    if (await check()) return;
    await sleep(50);
  }
  throw new Error(`timed out: ${what}`);
}

// Waits, at most 30 s, until the server used under 5 % of a core over one second; returns
// the seconds waited.
async function quiet(pid) {
  const started = Date.now();
  let last = cpuSeconds(pid);
  while (Date.now() - started < 30000) {
    await sleep(1000);
    const now = cpuSeconds(pid);
    if (now - last < 0.05) break;
    last = now;
  }
  return (Date.now() - started) / 1000;
}

// Creates a document on the server (through a creator client), returns its URL once a
// fresh client can find it.
async function createDoc(server, init) {
  const creator = client(server.url);
  const handle = creator.create();
  init(handle);
  const probe = client(server.url);
  await waitFor("the document to reach the server", async () => {
    try {
      const found = await probe.find(handle.url);
      return JSON.stringify(found.heads()) === JSON.stringify(handle.heads());
    } catch { return false; }
  });
  setupRepos.push(creator, probe);
  return { url: handle.url, creator, probe };
}

// Every repo the setup opened: shut down with the scenario's own, so that none keeps
// reconnecting to a server that was stopped.
const setupRepos = [];

// Runs a scenario: `docs` document URLs, `clients` assignments of {doc index, writes}.
// Every edit sets the writer's key to {t, n}; a reader records now - t for each new n.
async function run(server, docs, plan, { rate = 1 } = {}) {
  const repos = [];
  const handles = [];
  for (const entry of plan) {
    const repo = client(server.url);
    repos.push(repo);
    handles.push(await repo.find(docs[entry.doc]));
  }
  const latencies = [];
  const seen = handles.map(() => new Map());
  handles.forEach((handle, i) => {
    handle.on("change", ({ doc }) => {
      const now = Date.now();
      for (const [key, value] of Object.entries(doc.w ?? {})) {
        if (key === `c${i}` || typeof value?.n !== "number") continue;
        const last = seen[i].get(key) ?? 0;
        if (value.n > last) {
          seen[i].set(key, value.n);
          if (last > 0 || value.n === 1) latencies.push(now - value.t);
        }
      }
    });
  });
  const settle_s = await quiet(server.pid);
  const before = cpuSeconds(server.pid);
  const messagesBefore = { ...messages };
  const clientBefore = process.cpuUsage();
  let edits = 0;
  const counts = plan.map(() => 0);
  const timers = plan.map((entry, i) => entry.writes && setTimeout(() => {
    const tick = () => {
      counts[i] += 1;
      edits += 1;
      handles[i].change(d => {
        if (!d.w) d.w = {};
        d.w[`c${i}`] = { t: Date.now(), n: counts[i] };
        if (entry.text) A.splice(d, ["text"], Math.floor(Math.random() * d.text.length), 0, "x");
      });
    };
    tick();
    timers[i] = setInterval(tick, 1000 / rate);
  }, Math.random() * 1000));
  await sleep(duration * 1000);
  timers.forEach(t => clearInterval(t));
  const cpu = cpuSeconds(server.pid) - before;
  const clientCpu = process.cpuUsage(clientBefore);
  const received = messages.received - messagesBefore.received;
  const sent = messages.sent - messagesBefore.sent;
  // Every reader of a document must end up with every writer's last edit.
  const expected = () => plan.reduce((missing, entry, i) => missing + plan.filter((other, j) =>
    j !== i && other.writes && other.doc === entry.doc && (seen[i].get(`c${j}`) ?? 0) < counts[j]).length, 0);
  const deadline = Date.now() + 30000;
  while (expected() > 0 && Date.now() < deadline) await sleep(100);
  const missing = expected();
  const mem = memory(server.pid);
  for (const repo of [...repos, ...setupRepos.splice(0)]) repo.shutdown?.();
  latencies.sort((a, b) => a - b);
  const pct = p => latencies[Math.min(latencies.length - 1, Math.floor(p * latencies.length))] ?? NaN;
  return {
    edits,
    settle_s,
    cpu_ms_per_edit: (cpu * 1000) / Math.max(edits, 1),
    client_cpu_ms_per_edit: (clientCpu.user + clientCpu.system) / 1000 / Math.max(edits, 1),
    p50_ms: pct(0.5),
    p99_ms: pct(0.99),
    deliveries: latencies.length,
    missing,
    msgs_in_per_edit: received / Math.max(edits, 1),
    msgs_out_per_edit: sent / Math.max(edits, 1),
    rss_mib: mem.rss,
    peak_rss_mib: mem.peak,
  };
}

const scenarios = {
  async steady(server) {
    const docs = [];
    for (let d = 0; d < 10; d++) docs.push((await createDoc(server, h => h.change(doc => { doc.w = {}; }))).url);
    const plan = Array.from({ length: 100 }, (_, i) => ({ doc: i % 10, writes: true }));
    return run(server, docs, plan);
  },
  async fanout(server) {
    const docs = [(await createDoc(server, h => h.change(doc => { doc.w = {}; }))).url];
    const plan = Array.from({ length: 100 }, (_, i) => ({ doc: 0, writes: i < 5 }));
    return run(server, docs, plan);
  },
  async "large-doc"(server) {
    const docs = [(await createDoc(server, h => {
      h.change(doc => { doc.w = {}; doc.text = ""; });
      for (let i = 0; i < 20000; i++) h.change(doc => { A.splice(doc, ["text"], i, 0, "a"); });
    })).url];
    const plan = Array.from({ length: 10 }, (_, i) => ({ doc: 0, writes: i < 5, text: true }));
    return run(server, docs, plan);
  },
};

const chosen = only === "all" ? Object.keys(scenarios) : [only];
const servers = { meridian: startMeridian, reference: startReference };
const names = (args.servers ?? "meridian,reference").split(",");
const rows = [];
for (const name of chosen) {
  for (let run = 1; run <= runs; run++) {
    // Alternate which server goes first, so that a drift of the machine over the
    // invocation does not always favour the same one.
    const order = run % 2 === 1 ? names : [...names].reverse();
    for (const start of order.map(n => servers[n])) {
      const server = await start();
      try {
        const result = await scenarios[name](server);
        rows.push({ scenario: name, server: server.name, run, ...result });
        console.error(JSON.stringify(rows.at(-1)));
      } finally {
        server.stop();
        await sleep(2000);
      }
    }
  }
}
const fmt = n => (typeof n === "number" ? (Number.isInteger(n) ? String(n) : n.toFixed(3)) : String(n));
const table = (columns, lines) => {
  console.log(`| ${columns.join(" | ")} |`);
  console.log(`|${columns.map(() => "---").join("|")}|`);
  for (const line of lines) console.log(`| ${columns.map(c => fmt(line[c])).join(" | ")} |`);
};
table(["scenario", "server", "run", "edits", "settle_s", "cpu_ms_per_edit", "client_cpu_ms_per_edit", "p50_ms", "p99_ms", "deliveries",
  "missing", "msgs_in_per_edit", "msgs_out_per_edit", "rss_mib", "peak_rss_mib"], rows);
if (runs > 1) {
  const median = values => {
    const sorted = [...values].sort((a, b) => a - b);
    const mid = Math.floor(sorted.length / 2);
    return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
  };
  const summary = [];
  for (const scenario of chosen) {
    const of = server => rows.filter(r => r.scenario === scenario && r.server === server);
    // Meridian's run against the reference's run of the same number.
    const theirs = of("reference");
    const pairs = of("meridian").map(o => [o, theirs.find(t => t.run === o.run)]).filter(([, t]) => t);
    for (const server of names) {
      const own = of(server);
      const compared = server === "meridian" && pairs.length > 0;
      summary.push({
        scenario,
        server,
        runs: own.length,
        cpu_ms_per_edit: median(own.map(r => r.cpu_ms_per_edit)),
        p50_ms: median(own.map(r => r.p50_ms)),
        p99_ms: median(own.map(r => r.p99_ms)),
        missing: own.reduce((sum, r) => sum + r.missing, 0),
        peak_rss_mib: Math.max(...own.map(r => r.peak_rss_mib)),
        cpu_ratio: compared
          ? pairs.map(([o, t]) => (t.cpu_ms_per_edit / o.cpu_ms_per_edit).toFixed(1)).join(" / ") : "",
        p99_at_most_reference: compared
          ? `${pairs.filter(([o, t]) => o.p99_ms <= t.p99_ms).length} of ${pairs.length}` : "",
      });
    }
  }
  console.log();
  table(["scenario", "server", "runs", "cpu_ms_per_edit", "p50_ms", "p99_ms", "missing", "peak_rss_mib",
    "cpu_ratio", "p99_at_most_reference"], summary);
}
process.exit(rows.some(r => r.missing > 0) ? 1 : 0);
