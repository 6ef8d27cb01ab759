// Helpers shared by the scenario scripts: a repo on the gateway, waits with deadlines.
import { Repo } from "@automerge/automerge-repo";
import { WebSocketClientAdapter } from "@automerge/automerge-repo-network-websocket";

export function connect(url, { storage } = {}) {
  return new Repo({ network: [new WebSocketClientAdapter(url, 500)], storage });
}

export async function until(what, check, ms = 20000) {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    const value = await check();
    if (value) return value;
    await new Promise(r => setTimeout(r, 25));
  }
  throw new Error(`timed out waiting for ${what}`);
}

const sameHeads = (a, b) =>
  a !== undefined && b !== undefined && a.length === b.length && [...a].sort().every((h, i) => h === [...b].sort()[i]);

// Resolves once the gateway reports (as the storage peer `storageId`) every head of the
// handle's document: what the tenant's storage holds.
export async function stored(handle, storageId, ms) {
  await until(`the gateway to store ${handle.url}`, () =>
    sameHeads(handle.getSyncInfo(storageId)?.lastHeads, handle.heads()), ms);
}

export function done(repo, output) {
  if (output !== undefined) console.log(JSON.stringify(output));
  repo.shutdown?.();
  process.exit(0);
}

export function fail(error) {
  console.error(error?.stack ?? String(error));
  process.exit(1);
}
