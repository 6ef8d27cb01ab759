// The reference: automerge-repo's own sync server, set up as its public sync server is
// (a Repo with NodeFS storage and the WebSocket server adapter, sharing nothing it is not
// asked for). node sync-server.mjs <port> <data dir>; prints "listening <port>" when ready
// (port 0: one the system picks).
import { WebSocketServer } from "ws";
import { Repo } from "@automerge/automerge-repo";
import { WebSocketServerAdapter } from "@automerge/automerge-repo-network-websocket";
import { NodeFSStorageAdapter } from "@automerge/automerge-repo-storage-nodefs";

const [port, dir] = process.argv.slice(2);
const wss = new WebSocketServer({ port: Number(port), host: "127.0.0.1" });
new Repo({
  network: [new WebSocketServerAdapter(wss)],
  storage: new NodeFSStorageAdapter(dir),
  peerId: `storage-server-reference`,
  sharePolicy: async () => false,
});
wss.on("listening", () => console.log(`listening ${wss.address().port}`));
