// node bigsync.mjs <url> <automerge url> <changes>: an empty peer finds a large
// document and waits until it holds `changes` changes. Prints the time it took, the
// bytes and messages the gateway sent it, and the document's length.
import * as A from "@automerge/automerge";
import { Repo } from "@automerge/automerge-repo";
import { WebSocketClientAdapter } from "@automerge/automerge-repo-network-websocket";
import { until, done, fail } from "./lib.mjs";
const [url, docUrl, wanted] = process.argv.slice(2);
try {
  const adapter = new WebSocketClientAdapter(url, 500);
  let bytes = 0;
  let messages = 0;
  const receive = adapter.receiveMessage.bind(adapter);
  adapter.receiveMessage = data => {
    bytes += data.byteLength;
    messages += 1;
    return receive(data);
  };
  const repo = new Repo({ network: [adapter] });
  const started = performance.now();
  const handle = await repo.find(docUrl);
  await until("every change", () => A.getAllChanges(handle.doc()).length >= Number(wanted), 600000);
  const ms = performance.now() - started;
  done(repo, { ms, bytes, messages, changes: A.getAllChanges(handle.doc()).length, keys: Object.keys(handle.doc()).length });
} catch (error) { fail(error); }
