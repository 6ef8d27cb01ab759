// node refused.mjs <url> [automerge url]: connects and reports what the gateway says:
// the `error` message (for a refused token or origin), or, for a document, whether it
// is unavailable, whether the gateway said so in a `doc-unavailable` message (rather
// than, say, closing the socket) and the first `error` it sent, if any. Prints
// {"error": ...} or {"unavailable": true|false, "told": true|false, "error": ...}.
import { Repo } from "@automerge/automerge-repo";
import { WebSocketClientAdapter } from "@automerge/automerge-repo-network-websocket";
import { done, fail } from "./lib.mjs";
const [url, docUrl] = process.argv.slice(2);
try {
  const adapter = new WebSocketClientAdapter(url, 0);
  const errors = [];
  let told = false;
  const original = adapter.receiveMessage.bind(adapter);
  const { cbor } = await import("@automerge/automerge-repo/slim");
  adapter.receiveMessage = bytes => {
    const message = cbor.decode(new Uint8Array(bytes));
    if (message.type === "error") errors.push(message.message);
    if (message.type === "doc-unavailable") told = true;
    return original(bytes);
  };
  const repo = new Repo({ network: [adapter] });
  if (!docUrl) {
    await new Promise(r => setTimeout(r, 1500));
    done(repo, { error: errors[0] ?? null });
  }
  try {
    const handle = await repo.find(docUrl);
    done(repo, { unavailable: false, doc: handle.doc() });
  } catch (error) {
    done(repo, { unavailable: true, told, error: errors[0] ?? null, reason: String(error.message ?? error) });
  }
} catch (error) { fail(error); }
