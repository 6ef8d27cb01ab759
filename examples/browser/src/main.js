// A shared list: an automerge-repo document synced through a Meridian gateway.
//
// Open index.html?gateway=ws://127.0.0.1:PORT&token=TOKEN (what `meridian dev` prints
// as the browser URL gives both). Without a document in the address's fragment, the
// page creates one and puts its `automerge:` URL there: share the address to edit
// together.
import { Repo, initializeBase64Wasm } from "@automerge/automerge-repo/slim";
import { automergeWasmBase64 } from "@automerge/automerge/automerge.wasm.base64";
import { WebSocketClientAdapter } from "@automerge/automerge-repo-network-websocket";

const params = new URLSearchParams(location.search);
const gateway = params.get("gateway");
const token = params.get("token");
const status = document.getElementById("status");

async function start() {
  if (!gateway || !token) {
    status.textContent = "add ?gateway=ws://…&token=… to the address";
    return;
  }
  await initializeBase64Wasm(automergeWasmBase64);
  const url = `${gateway}/?token=${encodeURIComponent(token)}`;
  const repo = new Repo({ network: [new WebSocketClientAdapter(url)] });
  let handle;
  if (location.hash.startsWith("#automerge:")) {
    handle = await repo.find(location.hash.slice(1));
  } else {
    handle = repo.create({ items: [] });
    history.replaceState(null, "", `${location.search}#${handle.url}`);
  }
  const render = () => {
    const doc = handle.doc();
    const list = document.getElementById("items");
    list.replaceChildren(...(doc.items ?? []).map(text => {
      const li = document.createElement("li");
      li.textContent = text;
      return li;
    }));
    status.textContent = `${doc.items?.length ?? 0} item(s) in ${handle.url}`;
  };
  handle.on("change", render);
  render();
  document.getElementById("add").addEventListener("submit", event => {
    event.preventDefault();
    const input = document.getElementById("item");
    if (!input.value) return;
    const text = input.value;
    handle.change(doc => {
      if (!doc.items) doc.items = [];
      doc.items.push(text);
    });
    input.value = "";
  });
  // For tests and the console.
  window.meridian = { repo, handle };
}

start().catch(error => {
  status.textContent = `error: ${error.message ?? error}`;
  console.error(error);
});
