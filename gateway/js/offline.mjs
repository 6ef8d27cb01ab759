// node offline.mjs <url> <automerge url> <storage id>: syncs, goes offline, edits,
// waits for the native client's edit made meanwhile (the `native_offline` key, which the
// test sets once this prints "offline"), comes back online and waits until the gateway
// stores the offline edits. Prints the merged document.
import { WebSocketClientAdapter } from "@automerge/automerge-repo-network-websocket";
import { connect, until, stored, done, fail } from "./lib.mjs";
import * as readline from "node:readline";
const [url, docUrl, storageId] = process.argv.slice(2);
try {
  const repo = connect(url);
  const handle = await repo.find(docUrl);
  await stored(handle, storageId);
  for (const adapter of repo.networkSubsystem.adapters) adapter.disconnect();
  for (let i = 0; i < 20; i++) handle.change(d => { d[`offline_${i}`] = i; });
  console.log("offline");
  // The test answers on stdin once its native edit is durable.
  const lines = readline.createInterface({ input: process.stdin });
  await new Promise(resolve => lines.once("line", resolve));
  repo.networkSubsystem.addNetworkAdapter(new WebSocketClientAdapter(url, 500));
  await until("the native edit", () => handle.doc().native_offline !== undefined);
  await stored(handle, storageId);
  done(repo, handle.doc());
} catch (error) { fail(error); }
