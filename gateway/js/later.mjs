// node later.mjs <gateway url> <storage id> <json>: creates a document as create.mjs
// does, counting what would make an app reconnect: `error` messages from the gateway
// and closes of the socket. Prints {"url": ..., "errors": n, "disconnects": n}.
import { Repo } from "@automerge/automerge-repo";
import { WebSocketClientAdapter } from "@automerge/automerge-repo-network-websocket";
import { stored, done, fail } from "./lib.mjs";
const [url, storageId, json] = process.argv.slice(2);
try {
  const adapter = new WebSocketClientAdapter(url, 500);
  const { cbor } = await import("@automerge/automerge-repo/slim");
  let errors = 0;
  let disconnects = 0;
  const original = adapter.receiveMessage.bind(adapter);
  adapter.receiveMessage = bytes => {
    if (cbor.decode(new Uint8Array(bytes)).type === "error") errors++;
    return original(bytes);
  };
  const repo = new Repo({ network: [adapter] });
  repo.networkSubsystem.on("peer-disconnected", () => disconnects++);
  const handle = repo.create(JSON.parse(json));
  await stored(handle, storageId, 60000);
  done(repo, { url: handle.url, errors, disconnects });
} catch (error) { fail(error); }
